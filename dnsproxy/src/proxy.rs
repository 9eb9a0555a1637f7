//! Wiring: config in, a serving proxy out.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Json;
use axum::routing::get;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warden_api::proto::PolicySnapshot;
use warden_config::{Prefer, ProxyConfig};
use warden_datapath::Datapath;
use warden_enforce::Enforcement;
use warden_enforce::serving::{self, AGENT_INSTANCE, DNSPROXY_INSTANCE};
use warden_fqdn::DnsCache;
use warden_proxy::{DnsProxy, ProxyContext, SharedCache, unix_now};
use warden_telemetry::{
    CacheFilter, FlowLog, InstanceStatus, LogBudget, Metrics, PolicyStatusView,
};

use crate::journal::Journal;
use crate::link::{self, Link, LinkContext, LinkMappings};
use crate::policy::{ProxyPolicy, compile};

const FLOW_LOG_CAPACITY: usize = 10_000;

/// A started proxy; [`RunningProxy::shutdown`] stops it gracefully.
#[derive(Debug)]
pub struct RunningProxy {
    dns_addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningProxy {
    pub fn dns_addrs(&self) -> &[SocketAddr] {
        &self.dns_addrs
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Leave the DNS port (steering its traffic to the agent), finish the queries in flight.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("dnsproxy task panicked")?
    }
}

pub async fn run(config: ProxyConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let proxy = start(config).await?;
    tracing::info!(dns = ?proxy.dns_addrs(), admin = %proxy.admin_addr(), "warden-dnsproxy serving");
    shutdown.await;
    tracing::info!("shutting down");
    proxy.shutdown().await
}

/// The datapath as the proxy uses it: opened from the agent's pins, never loaded or attached
/// here. The DNS sockets are kept (as duplicates, until the proxy leaves the port) to register
/// them with whichever pins the agent names.
struct ProxyDatapath {
    enforcement: Arc<Enforcement>,
    sockets: Mutex<Vec<OwnedFd>>,
    prefer: Prefer,
    /// Whether the sockets are in the open pins' reuseport selection: a registration that
    /// failed is tried again at the next snapshot rather than left until a restart, while the
    /// agent's sockets take every query.
    registered: AtomicBool,
    /// Whether `dns.prefer` is in force: not before a policy is installed (see
    /// [`ProxyDatapath::apply_preference`]).
    preference_applied: AtomicBool,
    /// Whether a policy the proxy can place senders by was installed.
    policy_installed: AtomicBool,
    /// Since when [`ProxyDatapath::keep_agent_preferred`] has found another instance
    /// preferred.
    not_agent_since: Mutex<Option<Instant>>,
    /// How long a preference not the agent's lasts before a proxy without a policy takes it
    /// back: past a stopping agent's drain (its linger, then its queries in flight, up to
    /// `upstream_timeout` and `response_max_delay` and a second more), with a second to
    /// spare; the two processes share the `dns` settings.
    steer_back_after: Duration,
    /// Registrations counted under `warden_datapath_{updates,errors}_total{op="reuseport"}`:
    /// the status's `dns_port_holders` says who serves, not whether the datapath can steer to
    /// this process.
    metrics: Metrics,
}

impl ProxyDatapath {
    /// Opens the pins under `bpffs`, unless those are open already, and registers the DNS
    /// sockets there. Pins opened from the proxy's own config before any snapshot give way to
    /// those the agent's snapshot names, and maps the agent pinned anew (its `cleanup` and a
    /// new start) to the new ones: kept, the proxy's allow entries went into maps no program
    /// reads.
    /// `policy_installed`: whether the proxy enforces a policy now (see
    /// [`ProxyDatapath::apply_preference`]).
    fn ensure(&self, bpffs: &Path, policy_installed: bool) {
        if policy_installed {
            self.policy_installed.store(true, Ordering::Relaxed);
        }
        if let Some(open) = self.enforcement.datapath()
            && open.bpffs() == bpffs
        {
            if !open.pins_replaced() {
                if !self.registered.load(Ordering::Relaxed) {
                    self.join(&open, policy_installed);
                } else if policy_installed && !self.preference_applied.load(Ordering::Relaxed) {
                    self.apply_preference(&open, policy_installed);
                }
                return;
            }
            tracing::warn!(bpffs = %bpffs.display(), "the agent's pinned maps were replaced; opening the new ones");
        }
        match Datapath::open_pinned(bpffs) {
            Ok(datapath) => {
                tracing::info!(bpffs = %bpffs.display(), "writing allow entries into the agent's pinned maps");
                // Out of the maps it leaves first: the kernel refuses a socket another map
                // still holds, and frees the old maps only when their last user closes them.
                if let Some(old) = self.enforcement.datapath()
                    && let Err(error) = old.reuseport_unregister(DNSPROXY_INSTANCE)
                {
                    tracing::warn!(%error, "cannot take the DNS sockets out of the replaced maps");
                }
                self.join(&datapath, policy_installed);
                self.enforcement.set_datapath(Some(datapath));
            }
            Err(error) => {
                tracing::warn!(bpffs = %bpffs.display(), %error, "agent's pinned maps not available; allow entries are not written");
                // Here only with the open maps' pins replaced or gone (above): an agent of
                // another release pinned its own layout and removed this one's. Kept, the
                // proxy would write allow entries no program reads and look its clients up in
                // redirect records no program writes.
                if let Some(open) = self.enforcement.datapath()
                    && open.bpffs() == bpffs
                {
                    tracing::warn!(bpffs = %bpffs.display(), "not writing into the replaced maps");
                    self.let_go(&open);
                }
            }
        }
    }

    /// Puts the DNS sockets in `datapath`'s reuseport selection and applies `dns.prefer`;
    /// remembers whether that worked. Nothing once the proxy has left the port (its sockets
    /// handed back): applying `prefer` then would steer the queries back to it.
    fn join(&self, datapath: &Datapath, policy_installed: bool) {
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if sockets.is_empty() {
            return;
        }
        let joined = serving::join(datapath, DNSPROXY_INSTANCE, &sockets);
        drop(sockets);
        let counter = match &joined {
            Ok(()) => &self.metrics.datapath.updates,
            Err(error) => {
                tracing::warn!(%error, "cannot register the DNS sockets for reuseport selection; trying again at the next snapshot");
                &self.metrics.datapath.errors
            }
        };
        counter.with_label_values(&["reuseport"]).inc();
        self.registered.store(joined.is_ok(), Ordering::Relaxed);
        self.apply_preference(datapath, policy_installed);
    }

    /// Applies `dns.prefer` once a policy is installed. Before, the proxy can place no sender
    /// and answers an enrolled workload's queries with SERVFAIL, which the agent, while it
    /// serves, answers as its policy says: the agent is preferred until then (the selection
    /// falls back to this process's sockets while the agent has none).
    fn apply_preference(&self, datapath: &Datapath, policy_installed: bool) {
        // Held while the preference is decided and written: the keeper, the installs and the
        // leave at shutdown each decide on what they read under it.
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        // Left the port (its sockets handed back at shutdown): steering to it now would send
        // the queries to sockets about to close.
        if sockets.is_empty() {
            return;
        }
        self.write_preference(datapath, policy_installed);
    }

    /// [`ProxyDatapath::apply_preference`], with `sockets` held.
    fn write_preference(&self, datapath: &Datapath, policy_installed: bool) {
        let preferred = if policy_installed {
            serving::preferred_instance(self.prefer)
        } else {
            Some(AGENT_INSTANCE)
        };
        match serving::prefer(datapath, preferred) {
            Ok(()) => self
                .preference_applied
                .store(policy_installed, Ordering::Relaxed),
            Err(error) => tracing::warn!(%error, "cannot apply dns.prefer"),
        }
    }

    /// Called once a second: while the proxy has no policy, keeps the agent preferred. The
    /// agent applies `dns.prefer` at each of its starts, which left the enrolled workloads'
    /// queries to this process's SERVFAIL until the agent's next stop. The agent steers to
    /// this process at each graceful stop too, and drains its sockets for up to a few seconds
    /// before they close: a preference not the agent's is taken back only once it has lasted
    /// `steer_back_after` (an agent gone by then has no sockets, and the selection falls back
    /// to these).
    fn keep_agent_preferred(&self) {
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        let mut not_agent_since = self
            .not_agent_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let datapath = self.enforcement.datapath();
        let Some(datapath) = datapath.filter(|_| {
            !sockets.is_empty()
                && !self.policy_installed.load(Ordering::Relaxed)
                && self.registered.load(Ordering::Relaxed)
        }) else {
            *not_agent_since = None;
            return;
        };
        if datapath.reuseport_preferred().ok() == Some(Some(AGENT_INSTANCE)) {
            *not_agent_since = None;
            return;
        }
        let since = *not_agent_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.steer_back_after {
            return;
        }
        *not_agent_since = None;
        tracing::info!("no policy yet: DNS steered back to the agent");
        self.write_preference(&datapath, false);
    }

    /// The agent runs without the eBPF datapath: pins opened before its snapshot said so are
    /// not its, and nothing is written into them.
    fn forget(&self) {
        if let Some(open) = self.enforcement.datapath() {
            tracing::info!(bpffs = %open.bpffs().display(), "the agent runs without the eBPF datapath; not writing into these pins");
            self.let_go(&open);
        }
    }

    /// Stops using `open`, which the agent no longer runs.
    fn let_go(&self, open: &Datapath) {
        // Out of their selection too: while these maps live on, the kernel would refuse the
        // sockets to maps the agent pins later.
        if let Err(error) = open.reuseport_unregister(DNSPROXY_INSTANCE) {
            tracing::warn!(%error, "cannot take the DNS sockets out of the pins left");
        }
        self.registered.store(false, Ordering::Relaxed);
        self.preference_applied.store(false, Ordering::Relaxed);
        self.enforcement.set_datapath(None);
    }

    /// At shutdown, before the sockets close: new queries go to the agent from now on.
    /// Returns whether the datapath steered them (without it there is nothing to wait for).
    fn leave(&self) -> bool {
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        // The duplicates must go: they would keep the sockets open after they close.
        sockets.clear();
        self.enforcement
            .datapath()
            .is_some_and(|datapath| serving::steer_to(&datapath, AGENT_INSTANCE))
    }
}

pub async fn start(config: ProxyConfig) -> anyhow::Result<RunningProxy> {
    warden_state::create_private_dir(&config.state_dir)
        .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
    let state_lock = lock_state_dir(&config.state_dir).await?;
    let started = Instant::now();
    let metrics = Metrics::new("dnsproxy")?;
    let flows = Arc::new(FlowLog::new(FLOW_LOG_CAPACITY));
    let enforcement = Arc::new(Enforcement::new(metrics.clone()));
    let policy = Arc::new(ProxyPolicy::new(&config.state_dir));
    let cache = SharedCache::new(DnsCache::new(warden_enforce::cache_limits(&config.dns)));
    let journal = Arc::new(Journal::open(
        &config.state_dir,
        config.journal_max,
        metrics.peer.clone(),
    ));
    journal.fill(&cache);
    let link = Arc::new(Link::default());
    let datapath = Arc::new(ProxyDatapath {
        enforcement: enforcement.clone(),
        sockets: Mutex::new(Vec::new()),
        prefer: config.dns.prefer,
        registered: AtomicBool::new(false),
        preference_applied: AtomicBool::new(false),
        policy_installed: AtomicBool::new(false),
        not_agent_since: Mutex::new(None),
        steer_back_after: warden_enforce::LEAVE_LINGER
            + config.dns.upstream_timeout()
            + config.dns.response_max_delay()
            + Duration::from_secs(2),
        metrics: metrics.clone(),
    });

    let apply_snapshot = {
        let (policy, enforcement, datapath, metrics) = (
            policy.clone(),
            enforcement.clone(),
            datapath.clone(),
            metrics.clone(),
        );
        let own_dns = config.dns.clone();
        let warned_differences = Mutex::new(Vec::new());
        let parsed = crate::policy::ParsedDocuments::default();
        Arc::new(
            move |snapshot: &PolicySnapshot, source: &str| -> Result<u64, String> {
                // Said once per change, not at every snapshot (one comes with every new
                // cgroup enrollment).
                let differences = snapshot.dns.as_ref().map_or_else(Vec::new, |agent| {
                    crate::policy::settings_differences(&own_dns, agent)
                });
                let mut warned = warned_differences
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
                if *warned != differences {
                    if !differences.is_empty() {
                        tracing::warn!(
                            differences = differences.join("; "),
                            "this dnsproxy's dns settings differ from the agent's: the two answer alike only with the same settings"
                        );
                    }
                    *warned = differences;
                }
                drop(warned);
                let compiled = match compile(snapshot, &parsed) {
                    Ok(compiled) => compiled,
                    Err(error) => {
                        policy.fail(error.clone());
                        metrics.policy.reload_errors.inc();
                        return Err(error);
                    }
                };
                let bpffs = compiled.datapath_bpffs.clone();
                enforcement.set_directory(compiled.directory.clone());
                metrics
                    .policy
                    .revision
                    .set(i64::try_from(snapshot.revision).unwrap_or(i64::MAX));
                metrics
                    .policy
                    .policies
                    .set(i64::try_from(compiled.policies).unwrap_or(i64::MAX));
                metrics
                    .policy
                    .endpoints
                    .set(i64::try_from(snapshot.endpoints.len()).unwrap_or(i64::MAX));
                metrics
                    .policy
                    .selectors
                    .set(i64::try_from(compiled.repository.selector_count()).unwrap_or(i64::MAX));
                let installs = policy.install(snapshot, compiled, source);
                match bpffs {
                    // One from before the last boot places no sender by cgroup: the agent
                    // answers enrolled workloads better until its own snapshot comes.
                    Some(bpffs) => datapath.ensure(
                        &bpffs,
                        source != "snapshot" || !policy.persisted_before_boot(),
                    ),
                    None => datapath.forget(),
                }
                Ok(installs)
            },
        )
    };

    let context = ProxyContext {
        instance: Arc::from("dnsproxy"),
        endpoints: enforcement.clone(),
        policy: policy.clone(),
        cache: cache.clone(),
        datapath: enforcement.clone(),
        mappings: Arc::new(LinkMappings {
            journal: journal.clone(),
        }),
        metrics: metrics.clone(),
        flows: flows.clone(),
    };
    let settings = warden_enforce::proxy_settings(&config.dns);
    let proxy = DnsProxy::bind(settings, context)?;
    let dns_addrs = proxy.local_addrs();
    {
        let mut sockets = datapath.sockets.lock().unwrap_or_else(|p| p.into_inner());
        for socket in proxy.listener_fds() {
            sockets.push(socket.try_clone_to_owned()?);
        }
    }
    // Cold start: enforce the last snapshot at once, before the agent is even looked for.
    let mut enforcing = false;
    if let Some(snapshot) = policy.load_persisted() {
        if let Err(error) = apply_snapshot(&snapshot, "snapshot") {
            tracing::error!(%error, "persisted snapshot rejected");
        } else {
            enforcing = true;
            tracing::info!(
                revision = snapshot.revision,
                ms = started.elapsed().as_millis(),
                "enforcing the persisted snapshot"
            );
        }
    }
    // Without a policy the proxy knows no endpoint, and a query would pass as an unenforced
    // sender's. With the agent's pins open, a query its datapath redirected from an enrolled
    // cgroup is known to come from a workload the proxy cannot place, and gets SERVFAIL
    // until the agent's snapshot arrives; the datapath steers such queries to the agent
    // meanwhile, while it serves.
    if !enforcing && config.datapath.bpffs.exists() {
        tracing::warn!(
            "no usable policy snapshot: DNS is steered to the agent, and without it enrolled workloads get SERVFAIL, until the agent sends one"
        );
        datapath.ensure(&config.datapath.bpffs, false);
    } else if !enforcing {
        tracing::warn!(
            "no usable policy snapshot and no datapath pins: every sender is unknown, so queries pass unpoliced until the agent sends a snapshot"
        );
    }

    let serving = Arc::new(AtomicBool::new(true));
    let admin_listener = warden_telemetry::admin::bind(config.admin.listen).await?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_state = AdminState {
        policy: policy.clone(),
        cache: cache.clone(),
        link: link.clone(),
        serving: serving.clone(),
        dns_listen: dns_addrs.clone(),
        enforcement: enforcement.clone(),
        started,
    };
    let router = admin_router(admin_state, metrics.clone(), flows.clone());

    // Shutdown runs in order: the proxy leaves the port and answers what it holds (`drained`),
    // then the agent session hands over its last mappings and flow events (`unlinked`), then
    // the journal is saved with whatever could not be handed over, and the last snapshot
    // from the agent if it is not on disk yet.
    let shutdown = CancellationToken::new();
    let drained = CancellationToken::new();
    let unlinked = CancellationToken::new();
    let mut tasks = JoinSet::new();
    {
        let (shutdown, serving, datapath, link) = (
            shutdown.clone(),
            serving.clone(),
            datapath.clone(),
            link.clone(),
        );
        // A guard, so that a panic in serving cannot leave the rest waiting forever.
        let drained = drained.clone().drop_guard();
        tasks.spawn(async move {
            proxy
                .serve_and_leave(shutdown, || {
                    // Not ready, and no holder of the port in the agent's status, from the
                    // moment the port's queries are steered away.
                    serving.store(false, Ordering::Relaxed);
                    link.tell_serving(false);
                    datapath.leave()
                })
                .await;
            drop(drained);
        });
    }
    {
        let apply = apply_snapshot.clone();
        let policy_for_revision = policy.clone();
        let link_context = LinkContext {
            socket: config.socket.clone(),
            link: link.clone(),
            journal: journal.clone(),
            cache: cache.clone(),
            metrics: metrics.clone(),
            flows: flows.clone(),
            apply_snapshot: Arc::new(move |snapshot| apply(snapshot, "agent")),
            revision: Arc::new(move || policy_for_revision.state().revision),
            snapshot_settled: policy.settled(),
            serving: serving.clone(),
        };
        let unlinked = unlinked.clone().drop_guard();
        tasks.spawn(async move {
            link::run(link_context, drained).await;
            drop(unlinked);
        });
    }
    tasks.spawn(expire_cache(
        cache.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tasks.spawn({
        let (datapath, shutdown) = (datapath.clone(), shutdown.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => datapath.keep_agent_preferred(),
                }
            }
        }
    });
    tasks.spawn(persist_state(
        StateFiles {
            journal: journal.clone(),
            policy: policy.clone(),
            state_dir: config.state_dir.clone(),
            errors: metrics.peer.state_persist_errors.clone(),
            _lock: state_lock,
        },
        unlinked,
    ));
    // The admin API outlives the rest: `/readyz` and `/v1/status` answer through the drain.
    let admin_stop = CancellationToken::new();
    let task = tokio::spawn(async move {
        let admin = tokio::spawn(warden_telemetry::admin::serve(
            admin_listener,
            router,
            admin_stop.clone().cancelled_owned(),
        ));
        while let Some(joined) = tasks.join_next().await {
            if let Err(error) = joined {
                tracing::error!(%error, "dnsproxy task failed");
            }
        }
        admin_stop.cancel();
        admin.await.context("admin API task panicked")?;
        Ok(())
    });
    Ok(RunningProxy {
        dns_addrs,
        admin_addr,
        shutdown,
        task,
    })
}

/// What the dnsproxy keeps in `state_dir`, and the count of the writes that failed.
struct StateFiles {
    journal: Arc<Journal>,
    policy: Arc<ProxyPolicy>,
    state_dir: PathBuf,
    errors: prometheus::IntCounterVec,
    /// Held until the last save ([`lock_state_dir`]).
    _lock: Option<std::fs::File>,
}

/// Whether a proxy that cannot make its lock file goes on without it: where `state_dir` is
/// read-only or not its to write (it cannot write its journal either, and another proxy could
/// not lock it), not where the disk is full or it is out of file descriptors (a proxy started
/// next could take the lock and write the journal beside it).
fn lockless(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
    )
}

/// How long a proxy waits for one on the same `state_dir` to exit (a restart whose old
/// process is still draining) before it gives up.
const STATE_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes `state_dir` for this process: two proxies on one would append to one journal under
/// overlapping numbers (each one's removals deleting the other's mappings) and write over each
/// other's snapshot. The lock goes with the process, however it ends. `None` where it cannot
/// be taken (a read-only or foreign `state_dir`, a file system that cannot lock), which is
/// said rather than refused: such a proxy still enforces its persisted snapshot.
async fn lock_state_dir(state_dir: &Path) -> anyhow::Result<Option<std::fs::File>> {
    let path = state_dir.join("lock");
    // flock needs no write access: a lock file made earlier is taken read-only too.
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        Err(error) => match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(_) if lockless(&error) => {
                tracing::warn!(%error, path = %path.display(), "cannot make the state_dir lock; going on without it");
                return Ok(None);
            }
            Err(_) => {
                return Err(error).with_context(|| format!("cannot open {}", path.display()));
            }
        },
    };
    let deadline = tokio::time::Instant::now() + STATE_LOCK_WAIT;
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                if !std::mem::replace(&mut said, true) {
                    tracing::warn!(path = %path.display(), "another warden-dnsproxy holds state_dir; waiting for it to exit");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another warden-dnsproxy holds state_dir {} (its lock file {}); one proxy per state_dir",
                state_dir.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(error)) => {
                tracing::warn!(%error, path = %path.display(), "cannot lock state_dir; going on without the lock");
                return Ok(None);
            }
        }
    }
}

/// What one round of [`StateFiles::save`] did: for each file, whether it was written (`None`:
/// not tried).
struct SaveOutcome {
    journal: Option<bool>,
    policy: Option<bool>,
}

impl StateFiles {
    /// Writes the journal (if `journal`) and the agent's unsaved policy snapshot (if `policy`)
    /// on the blocking pool.
    async fn save(&self, journal: bool, policy: bool) -> SaveOutcome {
        let (journal_file, policy_file, dir) = (
            self.journal.clone(),
            self.policy.clone(),
            self.state_dir.clone(),
        );
        let saving = tokio::task::spawn_blocking(move || {
            let journal = journal.then(|| journal_file.save(&dir));
            let policy = policy.then(|| policy_file.save());
            (journal, policy)
        });
        let (journal, policy) = match saving.await {
            Ok(results) => results,
            Err(error) => {
                tracing::warn!(%error, "state persister panicked");
                return SaveOutcome {
                    journal: journal.then_some(false),
                    policy: policy.then_some(false),
                };
            }
        };
        let outcome = SaveOutcome {
            journal: journal.as_ref().map(Result::is_ok),
            policy: policy.as_ref().map(Result::is_ok),
        };
        // A full or read-only disk fails every round: one line per interval and file, every
        // failure counted.
        static POLICY_BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
        static JOURNAL_BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
        if let Some(Err(error)) = policy {
            self.errors.with_label_values(&["policy_snapshot"]).inc();
            if let Some(held_back) = POLICY_BUDGET.allow() {
                tracing::warn!(%error, held_back, "cannot persist the policy snapshot");
            }
        }
        if let Some(Err(error)) = journal {
            self.errors.with_label_values(&["journal"]).inc();
            if let Some(held_back) = JOURNAL_BUDGET.allow() {
                tracing::warn!(%error, held_back, "cannot persist the journal");
            }
        }
        outcome
    }
}

/// When a file whose last save failed is tried again: after 0.5 s, twice as long after each
/// failure, up to 10 s. A failed journal save is tried again as a whole file (up to 64 MiB),
/// and a policy snapshot is up to 16 MiB: on a full disk, tried four times a second, they
/// took, then gave back, the space every other writer of the filesystem needed.
#[derive(Debug)]
struct Backoff {
    retry_after: Duration,
    retry_at: Option<tokio::time::Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(10);

    fn new() -> Backoff {
        Backoff {
            retry_after: Backoff::FIRST,
            retry_at: None,
        }
    }

    fn due(&self) -> bool {
        self.retry_at
            .is_none_or(|at| tokio::time::Instant::now() >= at)
    }

    fn settle(&mut self, written: Option<bool>) {
        match written {
            None => {}
            Some(true) => *self = Backoff::new(),
            Some(false) => {
                self.retry_at = Some(tokio::time::Instant::now() + self.retry_after);
                self.retry_after = (self.retry_after * 2).min(Backoff::MAX);
            }
        }
    }
}

/// Keeps the journal in `state_dir` within a moment of every change and the agent's policy
/// snapshot as soon as it arrives, both once more at exit. The writes (fsync) run on the
/// blocking pool, never on a worker the DNS listeners need.
async fn persist_state(files: StateFiles, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // After a slow fsync, one round rather than a burst of the ticks it missed.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // From 0: what changed since the journal was opened (a push before this task ran, a
    // damaged or older-format file to write again) is saved at the first round.
    let mut saved = 0;
    // Each file waits after its own failures (see `Backoff`): a snapshot the disk refuses
    // does not hold back the journal's small appends. The last round at exit tries both.
    let (mut journal_retry, mut policy_retry) = (Backoff::new(), Backoff::new());
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
            _ = files.policy.wait_for_unsaved() => false,
        };
        let changes = files.journal.changes();
        let journal = changes != saved && (stopping || journal_retry.due());
        let policy_unsaved = files.policy.has_unsaved();
        let policy = policy_unsaved && (stopping || policy_retry.due());
        if policy_unsaved && !policy {
            files.policy.settle_unsaved();
        }
        if journal || policy {
            let outcome = files.save(journal, policy).await;
            if outcome.journal == Some(true) {
                saved = changes;
            }
            journal_retry.settle(outcome.journal);
            policy_retry.settle(outcome.policy);
        }
        if stopping {
            return;
        }
    }
}

/// Expired answers leave the proxy's cache every second.
async fn expire_cache(cache: SharedCache, metrics: Metrics, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        cache.expire(unix_now(), &metrics.cache).await;
    }
}

#[derive(Clone)]
struct AdminState {
    policy: Arc<ProxyPolicy>,
    cache: SharedCache,
    link: Arc<Link>,
    serving: Arc<AtomicBool>,
    dns_listen: Vec<SocketAddr>,
    enforcement: Arc<Enforcement>,
    started: Instant,
}

impl AdminState {
    fn status(&self) -> InstanceStatus {
        let policy = self.policy.state();
        let serving = self.serving.load(Ordering::Relaxed);
        let connected = self.link.connected();
        let (cache_names, cache_ips) = {
            let cache = self.cache.lock();
            (cache.name_count(), cache.ip_count())
        };
        let datapath = self.enforcement.datapath();
        let last_resync = self.link.last_resync();
        InstanceStatus {
            instance: "dnsproxy".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            serving,
            ready: serving && policy.revision > 0,
            peer_connected: connected,
            mode: if connected { "online" } else { "offline" }.to_owned(),
            policy_revision: policy.revision,
            policy: PolicyStatusView {
                revision: policy.revision,
                policies: policy.policies,
                selectors: policy.selectors,
                source: policy.source,
                last_error: policy.last_error,
            },
            cache_names,
            cache_ips,
            endpoints: policy.endpoints,
            dns_listen: self.dns_listen.clone(),
            // The proxy sees the agent's sockets only through the session.
            dns_port_holders: serving
                .then(|| "dnsproxy".to_owned())
                .into_iter()
                .chain(connected.then(|| "agent".to_owned()))
                .collect(),
            datapath: if datapath.is_some() { "ebpf" } else { "none" }.to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            preferred: datapath.as_ref().and_then(serving::preferred_name),
            last_resync_at_ms: last_resync.map(|(at, _)| at),
            last_resync_ms: last_resync.map(|(_, took)| took),
        }
    }
}

fn admin_router(state: AdminState, metrics: Metrics, flows: Arc<FlowLog>) -> Router {
    let api = Router::new()
        .route(
            "/readyz",
            get(|State(state): State<AdminState>| async move {
                let status = state.status();
                if status.ready {
                    (StatusCode::OK, "ready\n")
                } else if !status.serving {
                    (StatusCode::SERVICE_UNAVAILABLE, "not serving DNS\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "no policy snapshot yet\n")
                }
            }),
        )
        .route(
            "/v1/status",
            get(|State(state): State<AdminState>| async move { Json(state.status()) }),
        )
        .route(
            "/v1/fqdn/cache",
            get(
                |State(state): State<AdminState>, Query(filter): Query<CacheFilter>| async move {
                    filter
                        .listing(unix_now(), |now, filter| {
                            state.cache.entries_sorted(now, move |endpoint, name| {
                                filter.matches(endpoint, name)
                            })
                        })
                        .await
                },
            ),
        )
        .with_state(state);
    warden_telemetry::admin::common_routes(metrics, flows).merge(api)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_api::proto::Mapping;

    /// A state_dir the proxy cannot write (remounted read-only after errors) still lets it
    /// start, on its persisted snapshot, without the lock: the lock once made that fatal. Any
    /// other failure to make the lock file stays one: a proxy going on without it could share
    /// the journal with the next one.
    #[tokio::test]
    async fn only_a_state_dir_it_may_not_write_goes_without_the_lock() {
        use std::io::{Error, ErrorKind};
        assert!(lockless(&Error::from(ErrorKind::ReadOnlyFilesystem)));
        assert!(lockless(&Error::from(ErrorKind::PermissionDenied)));
        assert!(!lockless(&Error::from(ErrorKind::StorageFull)));
        let dir = tempfile::tempdir().unwrap();
        // A lock file that can be neither made nor opened: a link into a folder that is not.
        std::os::unix::fs::symlink(dir.path().join("missing/lock"), dir.path().join("lock"))
            .unwrap();
        let error = lock_state_dir(dir.path()).await.unwrap_err();
        assert!(error.to_string().contains("lock"), "{error:#}");
    }

    /// Two proxies on one state_dir wrote one journal under overlapping numbers: the second
    /// waits for the first to exit, and gives up with an error naming the folder.
    #[tokio::test(start_paused = true)]
    async fn one_proxy_per_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_state_dir(dir.path()).await.unwrap();
        assert!(first.is_some());
        let error = lock_state_dir(dir.path()).await.unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&dir.path().display().to_string()),
            "{error}"
        );
        // The first exits while the next waits: the next goes on.
        let waiting = tokio::spawn({
            let dir = dir.path().to_path_buf();
            async move { lock_state_dir(&dir).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(first);
        assert!(waiting.await.unwrap().unwrap().is_some());
    }

    /// The files of `state_dir` with `policy` and a journal holding one mapping, unsaved.
    fn journaled_state(
        state_dir: &Path,
        policy: Arc<ProxyPolicy>,
        metrics: &Metrics,
    ) -> StateFiles {
        let journal = Arc::new(Journal::new(16, metrics.peer.clone()));
        journal.push(Mapping {
            endpoint: "youssef/test".into(),
            name: "cilium.io.".into(),
            ..Mapping::default()
        });
        StateFiles {
            journal,
            policy,
            state_dir: state_dir.to_path_buf(),
            errors: metrics.peer.state_persist_errors.clone(),
            _lock: None,
        }
    }

    /// The persister took the journal's count of changes at its start for saved: a push made
    /// before it ran, or a damaged journal to write again, waited for another change, and a
    /// proxy killed meanwhile lost them.
    #[tokio::test]
    async fn what_changed_before_the_persister_started_is_saved_at_its_first_round() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new("dnsproxy").unwrap();
        let files = journaled_state(dir.path(), Arc::new(ProxyPolicy::new(dir.path())), &metrics);
        // Stopped at once: one round, the last.
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        persist_state(files, shutdown).await;
        let reopened = Journal::open(dir.path(), 16, metrics.peer.clone());
        assert_eq!(reopened.len(), 1);
    }

    /// A state_dir that refuses writes: each file's failures are counted, the journal is not
    /// taken for saved, and both are written once the directory is back.
    #[tokio::test]
    async fn failed_writes_are_counted_by_file_and_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let metrics = Metrics::new("dnsproxy").unwrap();
        let policy = Arc::new(ProxyPolicy::new(&state_dir));
        let snapshot = PolicySnapshot {
            revision: 3,
            ..PolicySnapshot::default()
        };
        policy.install(
            &snapshot,
            compile(&snapshot, &Default::default()).unwrap(),
            "agent",
        );
        let files = journaled_state(&state_dir, policy.clone(), &metrics);
        let failures = |file: &str| files.errors.with_label_values(&[file]).get();

        let outcome = files.save(true, true).await;
        assert_eq!(
            (outcome.journal, outcome.policy),
            (Some(false), Some(false)),
            "no state_dir, yet saved"
        );
        assert_eq!((failures("journal"), failures("policy_snapshot")), (1, 1));
        assert!(policy.has_unsaved());

        std::fs::create_dir(&state_dir).unwrap();
        let outcome = files.save(true, true).await;
        assert_eq!((outcome.journal, outcome.policy), (Some(true), Some(true)));
        assert_eq!((failures("journal"), failures("policy_snapshot")), (1, 1));
        assert_eq!(policy.load_persisted().map(|s| s.revision), Some(3));
        assert!(state_dir.join("journal.log").exists());
    }

    /// A save failing every round (a full disk) was tried again every 250 ms, the journal
    /// each time whole: tries now wait longer after each failure, and what is saved once
    /// the folder is back is all of it.
    #[tokio::test(start_paused = true)]
    async fn failed_saves_are_tried_again_less_and_less_often() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let metrics = Metrics::new("dnsproxy").unwrap();
        let files = journaled_state(&state_dir, Arc::new(ProxyPolicy::new(&state_dir)), &metrics);
        let failures = files.errors.with_label_values(&["journal"]);
        let shutdown = CancellationToken::new();
        let persister = tokio::spawn(persist_state(files, shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(10)).await;
        // At 0, 0.5, 1.5, 3.5 and 7.5 s; every 250 ms it was 40.
        assert_eq!(failures.get(), 5);
        std::fs::create_dir(&state_dir).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(failures.get(), 5);
        shutdown.cancel();
        persister.await.unwrap();
        let reopened = Journal::open(&state_dir, 16, metrics.peer.clone());
        assert_eq!(reopened.len(), 1);
    }

    /// The agent hears a policy is in force once its save was tried; while the persister
    /// waited to try a refusing disk again (up to 10 s), every new revision was acknowledged
    /// that much later.
    #[tokio::test(start_paused = true)]
    async fn a_policy_is_acknowledged_while_its_saves_wait() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let metrics = Metrics::new("dnsproxy").unwrap();
        let policy = Arc::new(ProxyPolicy::new(&state_dir));
        let install = |revision| {
            let snapshot = PolicySnapshot {
                revision,
                ..PolicySnapshot::default()
            };
            policy.install(
                &snapshot,
                compile(&snapshot, &Default::default()).unwrap(),
                "agent",
            )
        };
        install(3);
        let files = journaled_state(&state_dir, policy.clone(), &metrics);
        let shutdown = CancellationToken::new();
        let persister = tokio::spawn(persist_state(files, shutdown.clone()));
        // Failed at 0, 0.5, 1.5, 3.5 and 7.5 s: the next try is due at 15.5 s.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let settled = policy.settled();
        let latest = install(4);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*settled.borrow(), latest);
        shutdown.cancel();
        persister.await.unwrap();
    }
}
