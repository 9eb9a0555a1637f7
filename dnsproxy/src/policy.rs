//! The policy the proxy enforces: the agent's last snapshot, compiled with the same code the
//! agent uses, and kept in `state_dir` so a proxy started while the agent is down enforces it.
//! Installing never touches the disk: the receive loop that installs shares the runtime with
//! the DNS listeners, and an fsync there would stall them; the persister saves the latest
//! snapshot beside the journal.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use prost::Message;
use warden_api::proto::{DnsSettings, PolicySnapshot};
use warden_config::{DnsConfig, RejectCode};
use warden_enforce::EndpointDirectory;
use warden_policy::{EndpointId, EndpointInfo, Labels, Policy, PolicyRepository};
use warden_proxy::PolicySource;

const SNAPSHOT_FILE: &str = "policy-snapshot.pb";

/// What a snapshot turned into.
#[derive(Debug)]
pub struct Compiled {
    pub repository: PolicyRepository,
    pub directory: EndpointDirectory,
    pub policies: usize,
    /// `ebpf` snapshots carry the bpffs folder of the agent's pins.
    pub datapath_bpffs: Option<PathBuf>,
}

/// The documents of the last snapshot compiled, parsed. A snapshot comes with every change of
/// endpoints or of their cgroups, mostly with the same documents, and parsing them was most of
/// a compile (a second for 10,000 selectors in a debug build, where building the repository
/// for the new endpoints took 70 ms).
#[derive(Debug, Default)]
pub struct ParsedDocuments {
    last: Mutex<Option<Parsed>>,
}

/// Documents as (path, text), and what they parsed to.
type Parsed = (Vec<(String, String)>, Arc<Vec<Policy>>);

impl ParsedDocuments {
    /// The snapshot's documents parsed, from the last snapshot's when they are the same.
    fn parse(&self, snapshot: &PolicySnapshot) -> Result<Arc<Vec<Policy>>, String> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some((documents, policies)) = last.as_ref()
            && documents.len() == snapshot.policies.len()
            && documents
                .iter()
                .zip(&snapshot.policies)
                .all(|((path, text), file)| *path == file.path && *text == file.text)
        {
            return Ok(policies.clone());
        }
        let mut policies = Vec::new();
        for file in &snapshot.policies {
            let parsed = warden_policy::parse_str(&file.text, Path::new(&file.path))
                .map_err(|error| error.to_string())?;
            policies.extend(parsed);
        }
        // No folder checks here (duplicate names, size): the agent makes them on its folder,
        // and may send its last good copy, which a release before them saved.
        let policies = Arc::new(policies);
        let documents = snapshot
            .policies
            .iter()
            .map(|file| (file.path.clone(), file.text.clone()))
            .collect();
        *last = Some((documents, policies.clone()));
        Ok(policies)
    }
}

/// Compiles a snapshot; any document or address that does not parse rejects the whole of it,
/// so a bad snapshot never replaces a good one. So does revision 0: the agent has loaded no
/// policy at all (a broken folder and no last good copy), and installing its empty snapshot
/// would replace, on disk too, the policy this proxy keeps for exactly that case.
pub fn compile(snapshot: &PolicySnapshot, parsed: &ParsedDocuments) -> Result<Compiled, String> {
    if snapshot.revision == 0 {
        return Err("the agent has no policy loaded yet (revision 0)".to_owned());
    }
    let policies = parsed.parse(snapshot)?;
    let mut infos = Vec::with_capacity(snapshot.endpoints.len());
    let mut directory = EndpointDirectory::default();
    for endpoint in &snapshot.endpoints {
        let ips = endpoint
            .ips
            .iter()
            .map(|ip| ip.parse::<IpAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("endpoint {}: {error}", endpoint.name))?;
        let labels: BTreeMap<String, String> = endpoint.labels.clone().into_iter().collect();
        let id = EndpointId(endpoint.id);
        let key: Arc<str> = Arc::from(format!("{}/{}", endpoint.namespace, endpoint.name));
        // A peer sends nothing of its own: no query is taken for one of its.
        if !endpoint.peer_only {
            for ip in &ips {
                directory.by_ip.insert(ip.to_canonical(), (id, key.clone()));
            }
        }
        for cgroup_id in &endpoint.cgroup_ids {
            directory.by_cgroup.insert(*cgroup_id, (id, key.clone()));
        }
        directory.by_id.insert(id, key.clone());
        infos.push(EndpointInfo {
            id,
            name: endpoint.name.clone(),
            namespace: endpoint.namespace.clone(),
            labels: Labels::from_k8s(&labels, &endpoint.namespace),
            ips,
            peer_only: endpoint.peer_only,
        });
    }
    let datapath_bpffs = snapshot
        .datapath
        .as_ref()
        .filter(|datapath| datapath.mode == "ebpf")
        .map(|datapath| PathBuf::from(&datapath.bpffs));
    Ok(Compiled {
        repository: PolicyRepository::build(&policies, &infos),
        directory,
        policies: policies.len(),
        datapath_bpffs,
    })
}

/// The settings of the agent's `dns` section that shape answers and the cache, where this
/// proxy's own config differs: the same query should not get REFUSED from one process and
/// NXDOMAIN from the other, nor its IPs a different lifetime. Each as `field: ours vs agent's`.
pub fn settings_differences(ours: &DnsConfig, agent: &DnsSettings) -> Vec<String> {
    let reject = match ours.reject {
        RejectCode::Refused => "refused",
        RejectCode::Nxdomain => "nxdomain",
    };
    let mut differences = Vec::new();
    let mut compare = |field: &str, ours: String, theirs: String| {
        if ours != theirs {
            differences.push(format!("dns.{field}: {ours} here, {theirs} in the agent"));
        }
    };
    compare("reject", reject.to_owned(), agent.reject.clone());
    compare(
        "upstream",
        ours.upstream.to_string(),
        agent.upstream.clone(),
    );
    compare(
        "min_ttl",
        ours.min_ttl.to_string(),
        agent.min_ttl.to_string(),
    );
    compare(
        "max_ttl",
        ours.max_ttl.to_string(),
        agent.max_ttl.to_string(),
    );
    compare(
        "max_ips_per_name",
        ours.max_ips_per_name.to_string(),
        agent.max_ips_per_name.to_string(),
    );
    compare(
        "max_names_per_endpoint",
        ours.max_names_per_endpoint.to_string(),
        agent.max_names_per_endpoint.to_string(),
    );
    compare(
        "idle_grace_s",
        ours.idle_grace_s.to_string(),
        agent.idle_grace_s.to_string(),
    );
    differences
}

/// The policy in force in the proxy, and where it came from.
#[derive(Debug)]
pub struct ProxyPolicy {
    current: RwLock<Arc<PolicyRepository>>,
    state: Mutex<PolicyState>,
    file: PathBuf,
    unsaved: Mutex<Unsaved>,
    /// Wakes the persister when `unsaved` is filled.
    save_wanted: tokio::sync::Notify,
    /// The number of the last install from the agent whose save was tried, or skipped while
    /// the disk refused the last write (see [`ProxyPolicy::settle_unsaved`]): the session
    /// acknowledges a revision only then, so an acknowledged policy is on disk unless writes
    /// fail (counted and logged).
    settled: tokio::sync::watch::Sender<u64>,
    /// The persisted snapshot was from before the last boot, and loaded without its cgroup
    /// ids (see [`ProxyPolicy::load_persisted`]).
    persisted_before_boot: std::sync::atomic::AtomicBool,
}

/// The latest snapshot from the agent not yet on disk; a newer one replaces it.
#[derive(Debug, Default)]
struct Unsaved {
    /// Shared with a save in progress, so that a write that fails (or panics) leaves it here
    /// for the next one.
    encoded: Option<Arc<[u8]>>,
    /// Installs from the agent so far (saved or not); `encoded` is the last of them.
    installs: u64,
}

#[derive(Debug, Clone, Default)]
pub struct PolicyState {
    pub revision: u64,
    pub policies: usize,
    pub selectors: usize,
    pub endpoints: usize,
    /// `agent` (received in this run) or `snapshot` (read from state_dir at start).
    pub source: String,
    pub last_error: Option<String>,
}

impl PolicySource for ProxyPolicy {
    fn current(&self) -> Arc<PolicyRepository> {
        self.current
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}

impl ProxyPolicy {
    pub fn new(state_dir: &Path) -> ProxyPolicy {
        ProxyPolicy {
            current: RwLock::new(Arc::new(PolicyRepository::empty())),
            state: Mutex::new(PolicyState::default()),
            file: state_dir.join(SNAPSHOT_FILE),
            unsaved: Mutex::new(Unsaved::default()),
            save_wanted: tokio::sync::Notify::new(),
            settled: tokio::sync::watch::Sender::new(0),
            persisted_before_boot: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the persisted snapshot loaded last was from before the last boot: enforced
    /// without its cgroup ids, it places no sender by cgroup.
    pub fn persisted_before_boot(&self) -> bool {
        self.persisted_before_boot
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn state(&self) -> PolicyState {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// The snapshot persisted by an earlier run, if any and if it decodes. One that cannot be
    /// read (not one that is missing) is said, not taken for none: without it the proxy starts
    /// with no policy.
    pub fn load_persisted(&self) -> Option<PolicySnapshot> {
        let bytes = match std::fs::read(&self.file) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::error!(path = %self.file.display(), %error, "cannot read the persisted policy snapshot");
                return None;
            }
        };
        let decoded = unseal(&bytes)
            .and_then(|payload| PolicySnapshot::decode(payload).map_err(|error| error.to_string()));
        match decoded {
            Ok(mut snapshot) => {
                // A cgroup id is an inode number of the cgroup filesystem, which starts over
                // at boot: one saved before the last boot may name another pod's cgroup now.
                // Until the agent's snapshot comes, such senders are placed by address or,
                // from an enrolled cgroup, get SERVFAIL, rather than another pod's policy.
                let before_boot = saved_before_boot(&self.file);
                self.persisted_before_boot
                    .store(before_boot, std::sync::atomic::Ordering::Relaxed);
                if before_boot {
                    tracing::info!(path = %self.file.display(), "the persisted snapshot is from before the last boot: its cgroup ids are not used");
                    for endpoint in &mut snapshot.endpoints {
                        endpoint.cgroup_ids.clear();
                    }
                }
                Some(snapshot)
            }
            Err(error) => {
                let set_aside = warden_state::set_aside(&self.file);
                tracing::error!(path = %self.file.display(), %error, set_aside, "persisted policy snapshot does not decode");
                None
            }
        }
    }

    /// Installs a compiled snapshot; one from the agent is handed to the persister. Returns the
    /// number of the agent's installs so far, which [`ProxyPolicy::settled`] reaches once the
    /// persister tried to save this one (for a snapshot read from disk it is 0 or the last
    /// agent install's, already saved).
    pub fn install(&self, snapshot: &PolicySnapshot, compiled: Compiled, source: &str) -> u64 {
        let selectors = compiled.repository.selector_count();
        *self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(compiled.repository);
        {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            *state = PolicyState {
                revision: snapshot.revision,
                policies: compiled.policies,
                selectors,
                endpoints: snapshot.endpoints.len(),
                source: source.to_owned(),
                last_error: None,
            };
        }
        let installs = {
            let mut unsaved = self.unsaved();
            if source == "agent" {
                unsaved.encoded = Some(Arc::from(seal(&snapshot.encode_to_vec())));
                unsaved.installs += 1;
                self.save_wanted.notify_one();
            }
            unsaved.installs
        };
        tracing::info!(
            revision = snapshot.revision,
            policies = compiled.policies,
            selectors,
            source,
            "policy in force"
        );
        installs
    }

    pub fn fail(&self, error: String) {
        tracing::error!(%error, "policy snapshot rejected; the previous one stays in force");
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .last_error = Some(error);
    }

    fn unsaved(&self) -> std::sync::MutexGuard<'_, Unsaved> {
        self.unsaved
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Resolves when a snapshot from the agent was installed since the last wake-up: a hint to
    /// save soon; [`ProxyPolicy::has_unsaved`] says whether there is anything to save.
    pub async fn wait_for_unsaved(&self) {
        self.save_wanted.notified().await;
    }

    /// Whether a snapshot from the agent waits to be written.
    pub fn has_unsaved(&self) -> bool {
        self.unsaved().encoded.is_some()
    }

    /// Follows the number of the last install from the agent whose save was tried.
    pub fn settled(&self) -> tokio::sync::watch::Receiver<u64> {
        self.settled.subscribe()
    }

    /// Settles the latest install without a write, as a failed write does: the persister
    /// waits before trying again a disk that refused the last one, and the agent should not
    /// wait as long to hear the policy is in force.
    pub fn settle_unsaved(&self) {
        let install = self.unsaved().installs;
        self.settle(install);
    }

    /// Says the save of `install` (and of every one before it) was tried.
    fn settle(&self, install: u64) {
        self.settled.send_if_modified(|settled| {
            let moved = install > *settled;
            *settled = (*settled).max(install);
            moved
        });
    }

    /// Writes the latest unsaved snapshot to `state_dir` (temporary file, fsync, rename); blocks.
    /// A failed write keeps it for the next call, and settles its install all the same: the
    /// policy is in force, and a disk that refuses it should not keep the agent from hearing so.
    pub fn save(&self) -> Result<(), warden_state::StateError> {
        let (encoded, install) = {
            let unsaved = self.unsaved();
            (unsaved.encoded.clone(), unsaved.installs)
        };
        let Some(encoded) = encoded else {
            return Ok(());
        };
        let written = warden_state::write_atomically(&self.file, &encoded);
        if written.is_ok() {
            let mut unsaved = self.unsaved();
            // A newer install meanwhile still waits for its own write.
            if unsaved.installs == install {
                unsaved.encoded = None;
            }
        }
        self.settle(install);
        written
    }
}

/// Whether `file` was last written before the machine booted (`btime` of `/proc/stat`); not
/// when either cannot be read.
fn saved_before_boot(file: &Path) -> bool {
    let Ok(modified) = std::fs::metadata(file).and_then(|metadata| metadata.modified()) else {
        return false;
    };
    let Some(boot) = boot_time() else {
        return false;
    };
    modified < boot
}

fn boot_time() -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let seconds: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
}

/// Opens a sealed snapshot file: protobuf alone cannot tell a file cut at a field's end from a
/// whole one, and such a file decoded as a policy with its later fields (the datapath's part,
/// endpoints) missing. A valid protobuf message never starts with the mark (its first byte
/// would be a field of wire type 7).
const SEAL_MARK: &[u8; 8] = b"WRDNPOL1";

/// The snapshot as written to disk: the mark, the message, its CRC-32.
fn seal(encoded: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(SEAL_MARK.len() + encoded.len() + 4);
    sealed.extend_from_slice(SEAL_MARK);
    sealed.extend_from_slice(encoded);
    sealed.extend_from_slice(&crc32fast::hash(encoded).to_le_bytes());
    sealed
}

/// The message of a sealed file, checked whole; a file of an earlier release (no mark) as it
/// is, which is all it can be taken for.
fn unseal(bytes: &[u8]) -> Result<&[u8], String> {
    let Some(rest) = bytes.strip_prefix(SEAL_MARK) else {
        return Ok(bytes);
    };
    let Some((payload, crc)) = rest.split_last_chunk::<4>() else {
        return Err("cut short before its checksum".to_owned());
    };
    if crc32fast::hash(payload).to_le_bytes() != *crc {
        return Err("checksum mismatch: cut short or damaged".to_owned());
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_api::proto::{Endpoint, PolicyFile};

    #[test]
    fn settings_that_differ_from_the_agents_are_named() {
        let ours = DnsConfig::default();
        let same = DnsSettings {
            upstream: ours.upstream.to_string(),
            reject: "refused".into(),
            min_ttl: ours.min_ttl,
            max_ips_per_name: ours.max_ips_per_name as u64,
            idle_grace_s: ours.idle_grace_s,
            max_names_per_endpoint: ours.max_names_per_endpoint as u64,
            max_ttl: ours.max_ttl,
        };
        assert_eq!(settings_differences(&ours, &same), Vec::<String>::new());
        let other = DnsSettings {
            reject: "nxdomain".into(),
            max_ttl: 300,
            ..same
        };
        assert_eq!(
            settings_differences(&ours, &other),
            [
                "dns.reject: refused here, nxdomain in the agent",
                "dns.max_ttl: 0 here, 300 in the agent"
            ]
        );
    }

    const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: youssef}
spec:
  endpointSelector: {matchLabels: {app: test}}
  egress:
  - toPorts:
    - ports: [{port: \"53\"}]
      rules: {dns: [{matchName: cilium.io}]}
";

    fn snapshot(text: &str) -> PolicySnapshot {
        PolicySnapshot {
            revision: 7,
            policies: vec![PolicyFile {
                path: "p.yaml".into(),
                text: text.into(),
            }],
            endpoints: vec![Endpoint {
                id: 1,
                name: "test".into(),
                namespace: "youssef".into(),
                labels: [("app".to_owned(), "test".to_owned())].into(),
                ips: vec!["127.0.0.2".into()],
                cgroup_ids: vec![42],
                peer_only: false,
            }],
            ..PolicySnapshot::default()
        }
    }

    #[test]
    fn a_snapshot_compiles_to_the_same_verdicts_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let policy = ProxyPolicy::new(dir.path());
        let compiled = compile(&snapshot(POLICY), &ParsedDocuments::default()).unwrap();
        assert_eq!(compiled.directory.by_cgroup[&42].1.as_ref(), "youssef/test");
        policy.install(&snapshot(POLICY), compiled, "agent");
        assert!(
            !dir.path().join(SNAPSHOT_FILE).exists(),
            "installing wrote to disk"
        );
        policy.save().unwrap();
        let server = "127.0.0.153:53".parse().unwrap();
        let allowed = |policy: &ProxyPolicy, name: &str| {
            policy.current().dns_allowed(
                EndpointId(1),
                server,
                warden_policy::L4Proto::Udp,
                &warden_policy::DnsName::new(name).unwrap(),
            )
        };
        assert!(allowed(&policy, "cilium.io"));
        assert!(!allowed(&policy, "bbc.co.uk"));

        let restarted = ProxyPolicy::new(dir.path());
        let persisted = restarted.load_persisted().unwrap();
        assert_eq!(persisted.revision, 7);
        restarted.install(
            &persisted,
            compile(&persisted, &ParsedDocuments::default()).unwrap(),
            "snapshot",
        );
        assert!(!allowed(&restarted, "bbc.co.uk"));
        assert!(allowed(&restarted, "cilium.io"));
    }

    /// Cgroup ids start over at boot: a snapshot persisted before the last one placed a pod
    /// whose new cgroup took an old id as the endpoint that had it, until the agent's came.
    #[test]
    fn cgroup_ids_saved_before_the_last_boot_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let policy = ProxyPolicy::new(dir.path());
        let compiled = compile(&snapshot(POLICY), &ParsedDocuments::default()).unwrap();
        policy.install(&snapshot(POLICY), compiled, "agent");
        policy.save().unwrap();
        let cgroups = |loaded: PolicySnapshot| loaded.endpoints[0].cgroup_ids.clone();
        let restarted = ProxyPolicy::new(dir.path());
        assert_eq!(cgroups(restarted.load_persisted().unwrap()), [42]);
        assert!(!restarted.persisted_before_boot());

        let file = std::fs::File::options()
            .write(true)
            .open(dir.path().join(SNAPSHOT_FILE))
            .unwrap();
        let before_boot = boot_time().unwrap() - std::time::Duration::from_secs(60);
        file.set_modified(before_boot).unwrap();
        let rebooted = ProxyPolicy::new(dir.path());
        let earlier_boot = rebooted.load_persisted().unwrap();
        assert_eq!(earlier_boot.revision, 7);
        assert!(cgroups(earlier_boot).is_empty());
        assert!(rebooted.persisted_before_boot());
    }

    #[test]
    fn the_latest_snapshot_is_saved_and_a_failed_save_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let policy = ProxyPolicy::new(&state_dir);
        for revision in [7, 8] {
            let newer = PolicySnapshot {
                revision,
                ..snapshot(POLICY)
            };
            policy.install(
                &newer,
                compile(&newer, &ParsedDocuments::default()).unwrap(),
                "agent",
            );
        }
        let settled = policy.settled();
        assert_eq!(*settled.borrow(), 0, "settled before any save");
        // No state_dir yet: the write fails and the snapshot waits, but the install settles
        // (the session would otherwise never acknowledge it).
        assert!(policy.save().is_err());
        assert_eq!(*settled.borrow(), 2);
        assert!(policy.has_unsaved());
        std::fs::create_dir(&state_dir).unwrap();
        policy.save().unwrap();
        assert!(!policy.has_unsaved());
        assert_eq!(policy.load_persisted().unwrap().revision, 8);
        // One read from a persisted snapshot is not written back.
        let persisted = policy.load_persisted().unwrap();
        std::fs::remove_file(state_dir.join(SNAPSHOT_FILE)).unwrap();
        policy.install(
            &persisted,
            compile(&persisted, &ParsedDocuments::default()).unwrap(),
            "snapshot",
        );
        policy.save().unwrap();
        assert!(!state_dir.join(SNAPSHOT_FILE).exists());
    }

    /// A snapshot file cut at the end of a field decoded without error, as a policy missing
    /// what came after (the datapath's part, endpoints).
    #[test]
    fn a_persisted_snapshot_cut_short_is_set_aside_and_an_earlier_releases_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let policy = ProxyPolicy::new(dir.path());
        let whole = snapshot(POLICY);
        policy.install(
            &whole,
            compile(&whole, &ParsedDocuments::default()).unwrap(),
            "agent",
        );
        policy.save().unwrap();
        let file = dir.path().join(SNAPSHOT_FILE);
        let saved = std::fs::read(&file).unwrap();
        let encoded = whole.encode_to_vec();
        // Cut so that what comes before the last four bytes is the first field alone, which
        // decodes as a (smaller) snapshot by itself: only the checksum tells.
        let first_field = encoded.len()
            - PolicySnapshot {
                revision: 0,
                ..whole.clone()
            }
            .encode_to_vec()
            .len();
        assert!(PolicySnapshot::decode(&encoded[..first_field]).is_ok());
        std::fs::write(&file, &saved[..SEAL_MARK.len() + first_field + 4]).unwrap();
        assert!(ProxyPolicy::new(dir.path()).load_persisted().is_none());
        assert!(dir.path().join("policy-snapshot.pb.corrupt").exists());

        // A file of an earlier release: the message alone.
        std::fs::write(&file, &encoded).unwrap();
        let loaded = ProxyPolicy::new(dir.path()).load_persisted().unwrap();
        assert_eq!(loaded, whole);
    }

    #[test]
    fn a_persisted_snapshot_that_does_not_decode_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SNAPSHOT_FILE), b"\xff\xff\xff not protobuf").unwrap();
        assert!(ProxyPolicy::new(dir.path()).load_persisted().is_none());
        assert!(dir.path().join("policy-snapshot.pb.corrupt").exists());
        assert!(!dir.path().join(SNAPSHOT_FILE).exists());
    }

    #[test]
    fn documents_are_parsed_again_only_when_they_change() {
        let parsed = ParsedDocuments::default();
        let first = parsed.parse(&snapshot(POLICY)).unwrap();
        let moved = PolicySnapshot {
            revision: 8,
            endpoints: Vec::new(),
            ..snapshot(POLICY)
        };
        let same = parsed.parse(&moved).unwrap();
        assert!(Arc::ptr_eq(&first, &same), "same documents, parsed again");
        let edited = snapshot(&POLICY.replace("matchName: cilium.io", "matchName: bbc.co.uk"));
        let other = parsed.parse(&edited).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &other),
            "an edited document kept its old parse"
        );
        let renamed = PolicySnapshot {
            policies: vec![PolicyFile {
                path: "q.yaml".into(),
                text: POLICY.replace("matchName: cilium.io", "matchName: bbc.co.uk"),
            }],
            ..snapshot(POLICY)
        };
        let after_rename = parsed.parse(&renamed).unwrap();
        assert!(
            !Arc::ptr_eq(&other, &after_rename),
            "a renamed file kept its old parse"
        );
        // A broken document is refused and does not replace the last good parse.
        assert!(parsed.parse(&snapshot("kind: Nonsense\n")).is_err());
        assert!(Arc::ptr_eq(&after_rename, &parsed.parse(&renamed).unwrap()));
    }

    #[test]
    fn a_broken_document_rejects_the_whole_snapshot() {
        assert!(compile(&snapshot("kind: Nonsense\n"), &ParsedDocuments::default()).is_err());
    }

    #[test]
    fn an_agent_without_a_policy_replaces_nothing() {
        let empty = PolicySnapshot {
            revision: 0,
            ..PolicySnapshot::default()
        };
        let error = compile(&empty, &ParsedDocuments::default())
            .err()
            .unwrap_or_default();
        assert!(error.contains("revision 0"), "{error:?}");
    }
}
