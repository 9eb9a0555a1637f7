//! The policy in force: loaded from `policy.dir`, watched, and swapped atomically.
//!
//! A reload that fails (a broken file) leaves the last good policy in force and reports the
//! error in logs, `warden_policy_reload_failing`, and `/v1/status`. The files of every good
//! load are copied to `state_dir`, so an agent restarted while the folder is broken still
//! starts with the last policy that worked rather than with none (which would allow all).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use warden_config::EndpointConfig;
use warden_policy::{EndpointInfo, Policy, PolicyRepository};
use warden_proxy::PolicySource;
use warden_state::StateError;
use warden_telemetry::PolicyMetrics;

use crate::endpoint_files::EndpointFiles;
use crate::endpoints::EndpointTable;
use crate::folder::SETTLE;

/// How often the folder is re-read even without a change notification (editors that replace
/// files, folders mounted from a ConfigMap).
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What `/v1/status` says about the policy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyStatus {
    /// Bumped by every change that took effect; 0 until a policy loaded.
    pub revision: u64,
    pub policies: usize,
    pub selectors: usize,
    /// Where the policy in force came from: `dir`, or `last-good` (state_dir) after a start
    /// with a broken folder.
    pub source: String,
    /// Why the files on disk are not in force, while they are not.
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    last_good_dir: PathBuf,
    /// The endpoints the policy is compiled for; a change recompiles it (a new revision).
    endpoints: tokio::sync::watch::Sender<Arc<EndpointTable>>,
    /// `endpoints_dir`, when configured.
    endpoint_files: Option<Mutex<EndpointFiles>>,
    current: RwLock<Arc<PolicyRepository>>,
    /// The parsed policy in force, held through a compile: the policy and the endpoint table
    /// it is compiled for change together, one compile at a time, and an endpoints change
    /// compiles without parsing the files again. Apart from `status`, so that the readers of
    /// the status (`/readyz`, `/v1/status`, the dnsproxy sessions' snapshots, on the runtime's
    /// workers) wait for the swap that follows a compile, not for the compile.
    in_force: Mutex<Vec<Policy>>,
    status: Mutex<StoreState>,
    metrics: PolicyMetrics,
    revisions: tokio::sync::watch::Sender<u64>,
    folder_reads: AtomicU64,
}

#[derive(Debug, Default)]
struct StoreState {
    status: PolicyStatus,
    /// Hash of the file contents last looked at, good or bad: unchanged files are not reloaded.
    seen: Option<u64>,
    /// Why the files of `seen` failed, when they did: shown again once the folder can be read
    /// after a failure to read it, which replaced it in the status.
    seen_error: Option<String>,
    /// Hash of the folder's files in force (none after a start on the last good copy).
    installed: Option<u64>,
    /// The documents of the policy in force, for the snapshot sent to warden-dnsproxy.
    files: Arc<PolicyFiles>,
}

/// Policy files as (path, text), in name order.
pub type PolicyFiles = Vec<(PathBuf, String)>;

/// Parses the folder's files, refusing what the folder checks refuse (a duplicate policy
/// name, more text than a snapshot carries).
fn parse_all(files: &PolicyFiles) -> Result<Vec<Policy>, warden_policy::PolicyError> {
    warden_policy::check_folder_size(files.iter().map(|(_, text)| text.len()))?;
    let policies = parse_documents(files)?;
    warden_policy::check_unique(&policies)?;
    Ok(policies)
}

/// Parses files as they are: the last good copy, which a release before the folder checks
/// saved and enforced. Refusing it now would leave no policy at all, every endpoint
/// unenforced, where the folder it came from was enforced until the upgrade.
fn parse_documents(files: &PolicyFiles) -> Result<Vec<Policy>, warden_policy::PolicyError> {
    let mut policies = Vec::new();
    for (path, text) in files {
        policies.append(&mut warden_policy::parse_str(text, path)?);
    }
    Ok(policies)
}

impl PolicySource for PolicyStore {
    fn current(&self) -> Arc<PolicyRepository> {
        self.current
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}

impl PolicyStore {
    /// Loads the folder; on failure falls back to the last good copy in `state_dir`. The
    /// endpoints are `declared` and, with `endpoints_dir`, those of its files.
    pub fn open(
        dir: &Path,
        state_dir: &Path,
        declared: &[EndpointConfig],
        endpoints_dir: Option<&Path>,
        metrics: PolicyMetrics,
    ) -> Arc<PolicyStore> {
        // What the files held in force when the agent stopped, until they are read.
        let endpoint_files = endpoints_dir
            .map(|endpoints_dir| EndpointFiles::new(endpoints_dir, state_dir, declared));
        let initial = endpoint_files
            .as_ref()
            .map_or(declared, |files| files.merged());
        metrics
            .endpoints
            .set(i64::try_from(initial.len()).unwrap_or(i64::MAX));
        let store = Arc::new(PolicyStore {
            dir: dir.to_path_buf(),
            last_good_dir: state_dir.join("last-good-policies"),
            endpoints: tokio::sync::watch::Sender::new(Arc::new(EndpointTable::from_config(
                initial,
            ))),
            endpoint_files: endpoint_files.map(Mutex::new),
            current: RwLock::new(Arc::new(PolicyRepository::empty())),
            in_force: Mutex::new(Vec::new()),
            status: Mutex::new(StoreState::default()),
            metrics,
            revisions: tokio::sync::watch::Sender::new(0),
            folder_reads: AtomicU64::new(0),
        });
        // A file written just before the start is read once it has settled, not half-written.
        if let Some(wait) = store.endpoint_files.as_ref().and_then(|files| {
            files
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .unsettled()
        }) {
            std::thread::sleep(wait);
        }
        store.reload_endpoints();
        if let Some(wait) = policy_paths(&store.dir)
            .ok()
            .and_then(|paths| unsettled(&paths))
        {
            std::thread::sleep(wait);
        }
        store.reload();
        let last_good = store.last_good_copy();
        if store.status().revision == 0
            && let Some(last_good) = last_good
        {
            let loaded = read_policy_files(&last_good)
                .map_err(|error| error.to_string())
                .and_then(|files| {
                    let policies = parse_documents(&files).map_err(|error| error.to_string())?;
                    Ok((files, policies))
                });
            match loaded {
                Ok((files, policies)) => {
                    tracing::warn!(
                        dir = %store.dir.display(),
                        "policy folder does not load; enforcing the last good policy from state_dir"
                    );
                    // The folder still fails, and is not read again until it changes: its error
                    // stays on show (status, `warden_policy_reload_failing`) under the copy.
                    let failing = store.status().last_error;
                    store.install(policies, files, "last-good");
                    if let Some(error) = failing {
                        store.still_failing(error);
                    }
                }
                Err(error) => tracing::error!(%error, "last good policy copy does not load"),
            }
        }
        store
    }

    /// The revision in force and its documents, read together.
    pub fn documents(&self) -> (u64, Arc<PolicyFiles>) {
        let state = self.state();
        (state.status.revision, state.files.clone())
    }

    /// Notified with every new revision.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// The endpoints in force.
    pub fn endpoints(&self) -> Arc<EndpointTable> {
        self.endpoints.borrow().clone()
    }

    /// Notified with every change of the endpoints.
    pub fn subscribe_endpoints(&self) -> tokio::sync::watch::Receiver<Arc<EndpointTable>> {
        self.endpoints.subscribe()
    }

    /// Re-reads `endpoints_dir`; returns whether the endpoints changed. A change recompiles the
    /// policy in force for them (a new revision: the dnsproxy gets them with it).
    pub fn reload_endpoints(&self) -> bool {
        let Some(files) = &self.endpoint_files else {
            return false;
        };
        let read = files
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .read();
        for error in &read.new_errors {
            tracing::error!(%error, "endpoint file refused; what it last held stays");
            self.metrics.endpoint_file_errors.inc();
        }
        let Some(endpoints) = read.changed else {
            return false;
        };
        let table = Arc::new(EndpointTable::from_config(&endpoints));
        self.metrics
            .endpoints
            .set(i64::try_from(endpoints.len()).unwrap_or(i64::MAX));
        // Compiled as an install is, one at a time: one in between would compile for the other
        // table. The table is published after the policy compiled for it: whoever reads the
        // table first (the reconciler) then finds a policy that knows its endpoints.
        let policies = self.compile_lock();
        if self.documents().0 == 0 {
            self.endpoints.send_replace(table);
            tracing::info!(endpoints = endpoints.len(), "endpoints changed");
            return true;
        }
        let (mut state, compile_ms) = self.swap_in_compiled(&policies, table.infos());
        self.endpoints.send_replace(table);
        self.publish_revision(&mut state);
        tracing::info!(
            endpoints = endpoints.len(),
            revision = state.status.revision,
            compile_ms,
            "endpoints changed; policy compiled for them"
        );
        true
    }

    pub fn status(&self) -> PolicyStatus {
        self.state().status.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StoreState> {
        self.status
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Compiles `policies` for `endpoints` and puts the result in force, under the state's
    /// lock, which it returns held with the compile's time in ms: the caller records what else
    /// changed with it, then [`Self::publish_revision`]. Called with the compile lock held.
    fn swap_in_compiled(
        &self,
        policies: &[Policy],
        endpoints: &[EndpointInfo],
    ) -> (std::sync::MutexGuard<'_, StoreState>, u128) {
        let started = Instant::now();
        let repository = PolicyRepository::build(policies, endpoints);
        let compile_ms = started.elapsed().as_millis();
        let mut state = self.state();
        state.status.selectors = repository.selector_count();
        self.metrics.selectors.set(gauge(state.status.selectors));
        *self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(repository);
        (state, compile_ms)
    }

    /// The next revision, counted and announced (the dnsproxy sessions send it on).
    fn publish_revision(&self, state: &mut StoreState) {
        state.status.revision += 1;
        self.revisions.send_replace(state.status.revision);
        self.metrics.revision.set(gauge(state.status.revision));
    }

    fn compile_lock(&self) -> std::sync::MutexGuard<'_, Vec<Policy>> {
        self.in_force
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Re-reads the folder; returns whether a new policy took effect. A folder with a file
    /// modified less than [`SETTLE`] ago is left for the next read: a file still being written
    /// may parse as a shorter policy (cut after its selector, a rule with no egress at all),
    /// which would be enforced, and kept as the last good one, until the writer is done.
    pub fn reload(&self) -> bool {
        let paths = policy_paths(&self.dir);
        if paths
            .as_deref()
            .is_ok_and(|paths| unsettled(paths).is_some())
        {
            return false;
        }
        self.folder_reads.fetch_add(1, Ordering::Relaxed);
        let files = match paths.and_then(read_files) {
            Ok(files) => files,
            Err(error) => {
                self.fail(
                    None,
                    format!("cannot read policy folder {}: {error}", self.dir.display()),
                );
                return false;
            }
        };
        let fingerprint = fingerprint(&files);
        {
            let mut state = self.state();
            if state.seen == Some(fingerprint) {
                // Back to the files in force after a failure to read the folder (an unreadable
                // file since removed, one gone between the listing and the read): that error
                // is over, though nothing changed since the install.
                if state.installed == Some(fingerprint) && state.status.last_error.is_some() {
                    state.status.last_error = None;
                    self.metrics.reload_failing.set(0);
                    tracing::info!("policy folder readable again; the policy in force is its own");
                } else if state.seen_error.is_some() && state.status.last_error != state.seen_error
                {
                    // Back to broken files after a failure to read the folder: their own
                    // error, not the read's, is what is wrong until they change.
                    state.status.last_error = state.seen_error.clone();
                    self.metrics.reload_failing.set(1);
                    tracing::info!(error = ?state.seen_error, "policy folder readable again; its files still fail");
                }
                return false;
            }
        }
        let policies = match parse_all(&files) {
            Ok(policies) => policies,
            Err(error) => {
                self.fail(Some(fingerprint), error.to_string());
                return false;
            }
        };
        self.install(policies, files, "dir");
        {
            let mut state = self.state();
            state.seen = Some(fingerprint);
            state.seen_error = None;
            state.installed = Some(fingerprint);
        }
        // After the install: the copy only matters at the next start, and its syncs should
        // not hold a new policy back.
        let installed = self.state().files.clone();
        if let Err(error) = self.save_last_good(&installed) {
            tracing::warn!(%error, "cannot keep a copy of the good policy in state_dir");
        }
        true
    }

    fn install(&self, policies: Vec<Policy>, files: PolicyFiles, source: &str) {
        // Once per policy installed (not per answer, where the datapath meets it again).
        for warning in policies.iter().flat_map(warden_enforce::datapath_warnings) {
            tracing::warn!(%warning, "policy not enforceable as written");
        }
        // One compile at a time, as an endpoints change is: the table cannot change meanwhile.
        let mut in_force = self.compile_lock();
        let (mut state, compile_ms) = self.swap_in_compiled(&policies, self.endpoints().infos());
        state.files = Arc::new(files);
        state.status.policies = policies.len();
        state.status.source = source.to_owned();
        state.status.last_error = None;
        self.metrics.policies.set(gauge(policies.len()));
        self.metrics.reload_failing.set(0);
        self.publish_revision(&mut state);
        tracing::info!(
            revision = state.status.revision,
            policies = policies.len(),
            selectors = state.status.selectors,
            source,
            compile_ms,
            "policy in force"
        );
        drop(state);
        *in_force = policies;
    }

    /// Shows `error` again, already logged and counted, after installing the last good copy.
    fn still_failing(&self, error: String) {
        self.state().status.last_error = Some(error);
        self.metrics.reload_failing.set(1);
    }

    /// The last good copy in state_dir: its folder, or the previous one that a save moved aside
    /// and did not get to remove (a crash between its two renames).
    fn last_good_copy(&self) -> Option<PathBuf> {
        [
            self.last_good_dir.clone(),
            self.last_good_dir.with_extension("old"),
        ]
        .into_iter()
        .find(|dir| dir.is_dir())
    }

    fn fail(&self, fingerprint: Option<u64>, error: String) {
        let mut state = self.state();
        if fingerprint.is_some() {
            state.seen = fingerprint;
            state.seen_error = Some(error.clone());
        }
        if state.status.last_error.as_deref() != Some(error.as_str()) {
            tracing::error!(%error, revision = state.status.revision, "policy reload failed; the last good policy stays in force");
            self.metrics.reload_errors.inc();
        }
        state.status.last_error = Some(error);
        self.metrics.reload_failing.set(1);
    }

    fn save_last_good(&self, files: &[(PathBuf, String)]) -> Result<(), StateError> {
        let staging = self.last_good_dir.with_extension("new");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|source| StateError::Write {
            path: staging.clone(),
            source,
        })?;
        for (path, text) in files {
            if let Some(name) = path.file_name() {
                let copy = staging.join(name);
                // Synced before the renames: after a power loss they could otherwise be on
                // disk before the data, leaving a copy of empty files (no policy at all).
                let written = warden_state::create_private(&copy).and_then(|mut file| {
                    file.write_all(text.as_bytes())?;
                    file.sync_all()
                });
                written.map_err(|source| StateError::Write { path: copy, source })?;
            }
        }
        warden_state::sync_folder(&staging)?;
        // Moved aside, not removed, until the new copy is in place: a crash in between leaves
        // the old copy for the next start (see `last_good_copy`). When the copy is missing, an
        // earlier save was cut there and the one aside is the only copy: it stays until the new
        // one is in.
        let aside = self.last_good_dir.with_extension("old");
        let rename = |from: &Path, to: &Path| {
            std::fs::rename(from, to).map_err(|source| StateError::Rename {
                from: from.to_path_buf(),
                to: to.to_path_buf(),
                source,
            })
        };
        if self.last_good_dir.is_dir() {
            let _ = std::fs::remove_dir_all(&aside);
            rename(&self.last_good_dir, &aside)?;
        }
        rename(&staging, &self.last_good_dir)?;
        if let Some(state_dir) = self.last_good_dir.parent() {
            warden_state::sync_folder(state_dir)?;
        }
        let _ = std::fs::remove_dir_all(&aside);
        Ok(())
    }

    /// Reloads on change notifications and, as a safety net, every second, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let (notify_tx, mut notified) = tokio::sync::mpsc::channel::<()>(1);
        // The watchers live as long as this task; without them (inotify limits) polling remains.
        let _endpoint_watcher = self.endpoint_files.as_ref().and_then(|files| {
            let dir = files
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .dir()
                .to_path_buf();
            watch_folder(&dir, notify_tx.clone())
        });
        let _watcher = watch_folder(&self.dir, notify_tx);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = poll.tick() => {}
                Some(()) = notified.recv() => {
                    // Settling must not hold up a shutdown: the agent exits, and its DNS port
                    // is unserved, only once this task has ended.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(SETTLE) => {}
                    }
                }
            }
            let store = self.clone();
            // File reads are blocking I/O: keep them off the proxy's worker threads.
            let _ = tokio::task::spawn_blocking(move || {
                store.reload_endpoints();
                store.reload();
            })
            .await;
        }
    }

    /// How many times the folder has been read (at start, on notifications and by polling).
    pub fn folder_reads(&self) -> u64 {
        self.folder_reads.load(Ordering::Relaxed)
    }
}

/// Whether a notification may mean new policy: files created, written, removed or renamed.
/// Reading the folder raises open, read and close events of its own, which must not trigger
/// the next read: that would re-read it every `SETTLE` for as long as the agent runs.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        // Overflow and rescan requests: something may have been missed.
        EventKind::Other => true,
    }
}

fn watch_folder(
    dir: &Path,
    notify_tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // An error may hide a change: reload to be sure.
        let may_have_changed = match &event {
            Ok(event) => is_change(&event.kind),
            Err(_) => true,
        };
        if may_have_changed {
            // Full means a reload is already due, which covers this change too.
            let _ = notify_tx.try_send(());
        }
    })
    .map_err(|error| tracing::warn!(%error, "cannot watch the folder; polling only"))
    .ok()?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|error| tracing::warn!(%error, dir = %dir.display(), "cannot watch the folder; polling only"))
        .ok()?;
    Some(watcher)
}

/// The policy files of a folder with their text, sorted by name; hidden files are skipped.
fn read_policy_files(dir: &Path) -> std::io::Result<PolicyFiles> {
    read_files(policy_paths(dir)?)
}

fn read_files(paths: Vec<PathBuf>) -> std::io::Result<PolicyFiles> {
    paths
        .into_iter()
        .map(|path| match crate::folder::read_text(&path) {
            Ok(text) => Ok((path, text)),
            // Named, or "stream did not contain valid UTF-8" leaves the reader to guess which.
            Err(error) => Err(std::io::Error::new(
                error.kind(),
                format!("{}: {error}", path.display()),
            )),
        })
        .collect()
}

/// The policy files of a folder, sorted by name; hidden files are skipped. A policy's name
/// that is something else than a file (a folder put in its place) is an error, not an absent
/// policy: the others enforced without it would also become the last good copy.
fn policy_paths(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let (paths, not_files) = warden_policy::folder_files(dir)?;
    if let Some(path) = not_files.first() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(paths)
}

/// How long until every one of the policy files `paths` was last modified [`SETTLE`] ago, if
/// one was modified more recently.
fn unsettled(paths: &[PathBuf]) -> Option<Duration> {
    crate::folder::unsettled(paths, SETTLE)
}

fn fingerprint(files: &[(PathBuf, String)]) -> u64 {
    let mut hasher = DefaultHasher::new();
    files.hash(&mut hasher);
    hasher.finish()
}

fn gauge(count: impl TryInto<i64>) -> i64 {
    count.try_into().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: test
spec:
  endpointSelector:
    matchLabels:
      app: test
  egress:
    - toFQDNs:
        - matchName: example.com
";

    fn store(dir: &Path, state: &Path) -> Arc<PolicyStore> {
        store_and_metrics(dir, state).0
    }

    fn store_and_metrics(
        dir: &Path,
        state: &Path,
    ) -> (Arc<PolicyStore>, warden_telemetry::Metrics) {
        let metrics = warden_telemetry::Metrics::new("agent").expect("metrics");
        let store = PolicyStore::open(dir, state, &[], None, metrics.policy.clone());
        (store, metrics)
    }

    /// The status and the documents in force sat behind the lock a compile held (a compile at
    /// 10,000 selectors takes 70 ms in a debug build, and an endpoints change parsed the files
    /// again, a second more), so `/readyz`, `/v1/status` and the dnsproxy sessions waited for
    /// it on the runtime's workers: they now wait only for the swap that follows a compile.
    #[test]
    fn the_status_does_not_wait_for_a_compile() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("test.yaml"), POLICY).unwrap();
        let store = store(dir.path(), state.path());
        let compiling = store.compile_lock();
        assert_eq!(compiling.len(), 1, "the parsed policy in force is kept");
        let (told, answered) = std::sync::mpsc::channel();
        let reader = store.clone();
        std::thread::spawn(move || {
            let _ = told.send((reader.status().revision, reader.documents().0));
        });
        let read = answered.recv_timeout(Duration::from_secs(5));
        drop(compiling);
        assert_eq!(read, Ok((1, 1)), "the status waited for the compile");
    }

    /// An endpoints change recompiles the policy in force from its kept parse: a policy file
    /// edited since, and not yet read, does not slip in with the new endpoint.
    #[test]
    fn an_endpoints_change_recompiles_the_policy_in_force_not_the_folder() {
        let settled = |path: &Path, text: &str| {
            std::fs::write(path, text).unwrap();
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
                .unwrap();
        };
        let (dir, state, endpoints) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        settled(&dir.path().join("test.yaml"), POLICY);
        let metrics = warden_telemetry::Metrics::new("agent").unwrap();
        let store = PolicyStore::open(
            dir.path(),
            state.path(),
            &[],
            Some(endpoints.path()),
            metrics.policy.clone(),
        );
        assert_eq!(store.documents().0, 1);

        settled(
            &dir.path().join("test.yaml"),
            &POLICY.replace("example.com", "example.org"),
        );
        settled(
            &endpoints.path().join("pod.yaml"),
            "- {name: pod, namespace: default, labels: {app: test}, ips: [10.0.0.7]}",
        );
        assert!(store.reload_endpoints());
        let (revision, files) = store.documents();
        assert_eq!(revision, 2);
        assert!(files[0].1.contains("example.com"), "{files:?}");
        let pod = store
            .endpoints()
            .entries()
            .map(|(info, _, _)| info.id)
            .next()
            .expect("the pod is an endpoint");
        let grants = |name: &str| {
            let mut grants = Vec::new();
            store
                .current()
                .fqdn_grants(&warden_policy::DnsName::new(name).unwrap(), &mut grants);
            grants
                .into_iter()
                .map(|grant| grant.endpoint)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            grants("example.com"),
            vec![pod],
            "compiled for the new endpoint"
        );
        assert!(
            grants("example.org").is_empty(),
            "the unread edit slipped in"
        );
    }

    #[test]
    fn reads_are_not_changes_but_writes_renames_and_removals_are() {
        use notify::EventKind;
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode,
        };
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(!is_change(&kind), "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Other,
        ] {
            assert!(is_change(&kind), "{kind:?}");
        }
    }

    #[test]
    fn a_file_is_read_only_once_it_has_settled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("test.yaml"), POLICY).expect("write policy");
        let store = store(dir.path(), state.path());
        assert_eq!(
            store.status().revision,
            1,
            "the start waits for the file to settle"
        );

        // Half a file, as a reader could catch it mid-write: valid YAML, a rule without egress.
        // Only a look within SETTLE of the write proves anything; a loaded machine can hold
        // this thread past it (the half file has then settled, and may be read): written again.
        let half = POLICY.split("  egress:").next().unwrap_or_default();
        let mut revision = 1;
        for attempt in 1.. {
            let written = Instant::now();
            std::fs::write(dir.path().join("test.yaml"), half).expect("write half");
            let seen_unsettled = unsettled(&policy_paths(dir.path()).expect("list")).is_some();
            let reloaded = store.reload();
            if written.elapsed() < SETTLE {
                assert!(seen_unsettled, "written {:?} ago", written.elapsed());
                assert!(!reloaded, "read while still being written");
                assert_eq!(store.status().revision, revision);
                break;
            }
            assert!(attempt < 20, "never looked within {SETTLE:?} of a write");
            revision = store.status().revision;
        }

        std::fs::write(
            dir.path().join("test.yaml"),
            POLICY.replace("example.com", "example.org"),
        )
        .expect("finish the write");
        std::thread::sleep(SETTLE);
        assert!(store.reload(), "the finished file, once settled");
        assert_eq!(store.status().revision, revision + 1);
        assert_eq!(store.status().policies, 1);
    }

    /// A policy file replaced by a folder once counted as removed: the policy went, and the
    /// rest became the last good copy.
    #[test]
    fn a_policy_name_that_is_not_a_file_keeps_the_policy_in_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("test.yaml");
        std::fs::write(&file, POLICY).expect("write policy");
        let store = store(dir.path(), state.path());
        assert_eq!((store.status().revision, store.status().policies), (1, 1));

        std::fs::remove_file(&file).expect("remove");
        std::fs::create_dir(&file).expect("a folder in its place");
        assert!(!store.reload());
        let status = store.status();
        assert_eq!((status.revision, status.policies), (1, 1));
        let error = status.last_error.unwrap_or_default();
        assert!(error.contains("test.yaml is not a regular file"), "{error}");
        // The last good copy is untouched.
        let kept = std::fs::read_to_string(state.path().join("last-good-policies/test.yaml"))
            .expect("last good copy");
        assert_eq!(kept, POLICY);

        // A link left dangling is a removal, as a ConfigMap's deleted key leaves one.
        std::fs::remove_dir(&file).expect("remove the folder");
        std::os::unix::fs::symlink(dir.path().join("..data/test.yaml"), &file).expect("link");
        assert!(store.reload(), "the policy's removal is a change");
        assert_eq!(store.status().policies, 0);
        assert_eq!(store.status().last_error, None);
    }

    /// Broken files, then a moment the folder could not be read, then the same broken files:
    /// the status went on saying the folder could not be read, until the files changed.
    #[test]
    fn broken_files_read_again_after_a_read_failure_show_their_own_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("test.yaml"), POLICY).expect("write policy");
        let store = store(dir.path(), state.path());
        std::fs::write(dir.path().join("test.yaml"), "kind: ConfigMap\n").expect("break it");
        std::thread::sleep(SETTLE);
        assert!(!store.reload());
        let broken = store.status().last_error.unwrap_or_default();
        assert!(broken.contains("kind"), "{broken}");

        let in_the_way = dir.path().join("other.yaml");
        std::fs::create_dir(&in_the_way).expect("a folder in a file's place");
        assert!(!store.reload());
        let unreadable = store.status().last_error.unwrap_or_default();
        assert!(unreadable.contains("not a regular file"), "{unreadable}");

        std::fs::remove_dir(&in_the_way).expect("remove the folder");
        assert!(!store.reload());
        let status = store.status();
        assert_eq!(status.last_error, Some(broken));
        assert_eq!((status.revision, status.policies), (1, 1));
    }

    /// Files under each one's own limits but more together than a snapshot message carries
    /// were installed, and every dnsproxy session broke at its first message, for good.
    #[test]
    fn a_folder_too_large_for_a_snapshot_keeps_the_policy_in_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("test.yaml"), POLICY).expect("write policy");
        let store = store(dir.path(), state.path());
        assert_eq!((store.status().revision, store.status().policies), (1, 1));

        // Comments cost nothing to parse, and each file is within its own limits.
        let padding = format!("# {}\n", "x".repeat(1 << 20)).repeat(7);
        for name in ["a.yaml", "b.yaml"] {
            std::fs::write(dir.path().join(name), &padding).expect("write");
        }
        // Read once settled.
        std::thread::sleep(SETTLE * 2);
        assert!(!store.reload());
        let status = store.status();
        assert_eq!((status.revision, status.policies), (1, 1));
        let error = status.last_error.unwrap_or_default();
        assert!(error.contains("in one message"), "{error}");
    }

    /// A release before the folder checks saved, as its last good copy, a folder they refuse
    /// (here two files of one policy name): refusing the copy too left no policy at all.
    #[test]
    fn a_last_good_copy_from_before_the_folder_checks_still_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        let last_good = state.path().join("last-good-policies");
        std::fs::create_dir(&last_good).expect("last good folder");
        for folder in [dir.path(), last_good.as_path()] {
            for name in ["web.yaml", "web-v2.yaml"] {
                std::fs::write(folder.join(name), POLICY).expect("write policy");
            }
        }
        let store = store(dir.path(), state.path());
        let status = store.status();
        assert_eq!((status.source.as_str(), status.policies), ("last-good", 2));
        let error = status.last_error.unwrap_or_default();
        assert!(error.contains("declared again"), "{error}");
    }

    /// A start on a broken folder enforced the last good copy and cleared the folder's error,
    /// which stayed cleared (the folder is read again only when it changes): status and alert
    /// said all was well.
    #[test]
    fn a_start_on_a_broken_folder_enforces_the_last_good_copy_and_keeps_failing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("test.yaml"), POLICY).expect("write policy");
        drop(store(dir.path(), state.path()));
        std::fs::write(dir.path().join("test.yaml"), "kind: [unclosed\n").expect("break it");

        let (restarted, metrics) = store_and_metrics(dir.path(), state.path());
        let status = restarted.status();
        assert_eq!((status.source.as_str(), status.policies), ("last-good", 1));
        let error = status.last_error.unwrap_or_default();
        assert!(error.contains("test.yaml"), "{error:?}");
        assert_eq!(metrics.policy.reload_failing.get(), 1);
        assert!(
            !restarted.reload(),
            "the unchanged folder is not read again"
        );
        assert!(restarted.status().last_error.is_some());
    }

    /// A file that is not UTF-8 failed the reload with "stream did not contain valid UTF-8"
    /// and the folder's name, not the file's.
    #[test]
    fn a_file_that_cannot_be_read_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("test.yaml"), POLICY).expect("write policy");
        let store = store(dir.path(), state.path());
        std::fs::write(dir.path().join("latin1.yaml"), b"name: caf\xe9\n").expect("write");
        std::thread::sleep(SETTLE);
        assert!(!store.reload());
        let error = store.status().last_error.unwrap_or_default();
        assert!(
            error.contains("latin1.yaml: stream did not contain valid UTF-8"),
            "{error}"
        );
        assert_eq!(store.status().policies, 1, "the policy in force stays");
        // The file removed, the folder holds what is in force again: the error is over (it
        // stayed, the folder being unchanged since the install).
        std::fs::remove_file(dir.path().join("latin1.yaml")).expect("remove");
        assert!(!store.reload(), "nothing new to install");
        assert_eq!(store.status().last_error, None);
    }

    /// Saving a new copy once removed the old one before renaming the new one in: a crash
    /// between the two left no copy at all.
    #[test]
    fn a_copy_moved_aside_by_an_interrupted_save_is_still_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("test.yaml"), POLICY).expect("write policy");
        drop(store(dir.path(), state.path()));
        let copy = state.path().join("last-good-policies");
        std::fs::rename(&copy, copy.with_extension("old")).expect("as a crash leaves it");
        std::fs::write(dir.path().join("test.yaml"), "kind: [unclosed\n").expect("break it");

        let restarted = store(dir.path(), state.path());
        let status = restarted.status();
        assert_eq!((status.source.as_str(), status.policies), ("last-good", 1));

        // The folder mended: the new copy goes in, and only then the one aside goes.
        let mended = POLICY.replace("example.com", "example.org");
        std::fs::write(dir.path().join("test.yaml"), &mended).expect("mend it");
        std::thread::sleep(SETTLE);
        assert!(restarted.reload());
        let kept = std::fs::read_to_string(copy.join("test.yaml")).expect("the new copy");
        assert_eq!(kept, mended);
        assert!(!copy.with_extension("old").exists());
    }

    /// The watch once re-read the folder every 100 ms for ever: its own reads raised the
    /// notifications that triggered the next read.
    #[tokio::test]
    async fn reading_the_folder_does_not_trigger_another_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("test.yaml"), POLICY).expect("write policy");
        let store = store(dir.path(), state.path());
        assert_eq!(store.status().revision, 1);
        let shutdown = CancellationToken::new();
        let watch = tokio::spawn(store.clone().watch(shutdown.clone()));
        // The watch's first poll reads at once, the next one a second later.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let reads = store.folder_reads();
        assert!(
            reads <= 3,
            "{reads} reads of an unchanged folder in 0.9 s (the start, the first poll, and at most one notification)"
        );

        // A real change still gets in.
        let before = store.folder_reads();
        std::fs::write(
            dir.path().join("test.yaml"),
            POLICY.replace("example.com", "example.org"),
        )
        .expect("rewrite policy");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while store.status().revision < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            store.status().revision,
            2,
            "the rewritten policy took effect"
        );
        assert!(store.folder_reads() > before);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), watch)
            .await
            .expect("the watch ends on shutdown")
            .expect("the watch did not panic");
    }
}
