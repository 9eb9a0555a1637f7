//! Wiring: config in, a serving agent out.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warden_api::server::PeerPolicy;
use warden_config::{AgentConfig, DatapathMode, Prefer};
use warden_datapath::{Datapath, DatapathOptions};
use warden_enforce::Enforcement;
use warden_enforce::serving::{self, AGENT_INSTANCE, DNSPROXY_INSTANCE};
use warden_fqdn::CacheSnapshot;
use warden_proxy::{DnsProxy, ProxyContext, SharedCache, unix_now};
use warden_telemetry::{FlowLog, Metrics};

use crate::admin::{self, AdminState};
use crate::api::{self, ApiState, CacheChanges, LocalMappings, Sessions};
use crate::datapath::{Reconciler, reconcile_loop, watch_drops};
use crate::policy_store::PolicyStore;
use crate::state::CacheFile;

/// Flow events kept in memory for `/v1/flows` and `warden observe`.
const FLOW_LOG_CAPACITY: usize = 10_000;
/// Expired cache entries are removed this often.
const GC_INTERVAL: Duration = Duration::from_secs(1);
/// A changed cache is written to `state_dir` this soon (and once more at shutdown), or ten
/// times as long as the last write took if that is longer, so a huge cache does not spend the
/// agent's time on rewriting itself.
const PERSIST_INTERVAL: Duration = Duration::from_millis(500);
/// How often the maintenance loop wakes: a change is noticed within this.
const MAINTENANCE_TICK: Duration = Duration::from_millis(250);

/// A started agent; dropping it does not stop it, [`RunningAgent::shutdown`] does.
#[derive(Debug)]
pub struct RunningAgent {
    dns_addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningAgent {
    /// The DNS listen addresses as bound (real ports when the config said 0).
    pub fn dns_addrs(&self) -> &[SocketAddr] {
        &self.dns_addrs
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Graceful stop: leave the DNS port, finish the queries in flight, persist the cache.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("agent task panicked")?
    }
}

/// Starts the agent and serves until `shutdown` resolves.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let agent = start(config).await?;
    tracing::info!(dns = ?agent.dns_addrs(), admin = %agent.admin_addr(), "warden-agent serving");
    shutdown.await;
    tracing::info!("shutting down");
    agent.shutdown().await
}

/// Binds everything and starts serving; returns once DNS and the admin API accept traffic.
pub async fn start(config: AgentConfig) -> anyhow::Result<RunningAgent> {
    warden_state::create_private_dir(&config.state_dir)
        .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
    // Made for whoever writes the endpoint files; one the agent cannot make is reported by
    // the reader and polled until it can be read.
    if let Some(dir) = &config.endpoints_dir
        && let Err(error) = std::fs::create_dir_all(dir)
    {
        tracing::warn!(%error, dir = %dir.display(), "cannot create endpoints_dir");
    }
    let metrics = Metrics::new("agent")?;
    // The admin port first: a second agent started by mistake on the node (the port held by
    // the running one) must fail before it touches anything they share: the saved state it
    // would rewrite, the pinned programs it would replace with its own build, and the socket,
    // which is bound over the one in place (cutting the running agent's dnsproxies off).
    let admin_listener = warden_telemetry::admin::bind(config.admin.listen).await?;
    let flows = Arc::new(FlowLog::new(FLOW_LOG_CAPACITY));
    let policy = PolicyStore::open(
        &config.policy.dir,
        &config.state_dir,
        &config.endpoints,
        config.endpoints_dir.as_deref(),
        metrics.policy.clone(),
    );
    let limits = warden_enforce::cache_limits(&config.dns);
    let cleans =
        crate::api::CleanFanout::open(&config.state_dir, metrics.peer.state_persist_errors.clone());
    let cache_file = CacheFile::new(&config.state_dir);
    let cache = SharedCache::new(cache_file.restore(limits, unix_now(), cleans.removes_restored()));
    let changes = Arc::new(CacheChanges::default());
    let (local_mappings, _) = tokio::sync::broadcast::channel(4096);
    let sessions = Arc::new(Sessions::default());

    let ebpf = match config.datapath.mode {
        DatapathMode::None => None,
        DatapathMode::Ebpf => Some(open_datapath(&config)?),
    };
    let enforcement = Arc::new(Enforcement::new(metrics.clone()));
    enforcement.set_directory(policy.endpoints().directory());
    enforcement.set_datapath(ebpf.as_ref().map(|(datapath, _)| datapath.clone()));

    let context = ProxyContext {
        instance: Arc::from("agent"),
        endpoints: enforcement.clone(),
        policy: policy.clone(),
        cache: cache.clone(),
        datapath: enforcement.clone(),
        mappings: Arc::new(LocalMappings {
            sender: local_mappings.clone(),
            changes: changes.clone(),
        }),
        metrics: metrics.clone(),
        flows: flows.clone(),
    };
    let settings = warden_enforce::proxy_settings(&config.dns);
    let proxy = DnsProxy::bind(settings, context)?;
    let dns_addrs = proxy.local_addrs();
    let api_listener = warden_api::server::bind(&config.socket, config.socket_group.as_deref())?;
    let admin_addr = admin_listener.local_addr()?;

    let serving = Arc::new(AtomicBool::new(true));
    let admin_state = AdminState {
        policy: policy.clone(),
        cache: cache.clone(),
        serving: serving.clone(),
        dns_listen: dns_addrs.clone(),
        started: Instant::now(),
        sessions: sessions.clone(),
        datapath: ebpf.as_ref().map(|(datapath, _)| datapath.clone()),
        cache_changes: changes.clone(),
        cleans: cleans.clone(),
    };
    let flows_for_drops = flows.clone();
    let flows_for_api = flows.clone();
    let router = admin::router(admin_state, metrics.clone(), flows);

    // One pass before the first query is read (the kernel queues them meanwhile): the proxy
    // then knows every enrolled cgroup's endpoint, and a redirected query from a cgroup it
    // does not know is refused rather than taken for an unenforced sender's.
    let reconciler = match &ebpf {
        None => None,
        Some((datapath, cgroup_root)) => {
            let mut reconciled = config.clone();
            // Redirect targets default to the proxy's addresses as bound (port 0 in tests).
            reconciled.dns.listen = dns_addrs.clone();
            let mut reconciler = Reconciler {
                datapath: datapath.clone(),
                cgroup_root: cgroup_root.clone(),
                config: reconciled,
                enforcement: enforcement.clone(),
                policy: policy.clone(),
                cache: cache.clone(),
                metrics: metrics.clone(),
                unwanted_since: HashMap::new(),
                sessions: sessions.clone(),
                started: Instant::now(),
                missing_cgroups: HashSet::new(),
                shared_cgroups: HashSet::new(),
                uncleared: HashSet::new(),
                wanted_by: HashMap::new(),
                adopted: HashMap::new(),
                inherited: None,
                traffic_listed_at: Instant::now(),
            };
            let first_pass = tokio::task::spawn_blocking(move || {
                reconciler.reconcile();
                // The startup grace is the dnsproxy's time to reconnect and resync, and its
                // socket is served only after this pass: counted from before a pass of
                // several seconds (large maps, many cgroups), it was over before the proxy
                // could send what it wrote while the agent was away.
                reconciler.started = Instant::now();
                reconciler
            });
            Some(
                first_pass
                    .await
                    .context("the first datapath pass panicked")?,
            )
        }
    };
    // Only now may the kernel prefer these sockets for the port's queries.
    if let Some((datapath, _)) = &ebpf {
        join_serving_group(datapath, &proxy, config.dns.prefer)?;
    }

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    {
        let shutdown = shutdown.clone();
        let serving = serving.clone();
        let datapath = ebpf.as_ref().map(|(datapath, _)| datapath.clone());
        tasks.spawn(async move {
            proxy
                .serve_and_leave(shutdown, || {
                    // Not ready from the moment the port's queries are steered away: the
                    // admin API says so through the drain.
                    serving.store(false, Ordering::Relaxed);
                    datapath.is_some_and(|datapath| serving::steer_to(&datapath, DNSPROXY_INSTANCE))
                })
                .await;
            Ok(())
        });
    }
    {
        let state = ApiState {
            config: config.clone(),
            policy: policy.clone(),
            cache: cache.clone(),
            enforcement: enforcement.clone(),
            metrics: metrics.clone(),
            flows: flows_for_api.clone(),
            sessions: sessions.clone(),
            local_mappings: local_mappings.clone(),
            cache_changes: changes.clone(),
            cleans: cleans.clone(),
        };
        let routes = tonic::service::Routes::new(api::service(state));
        let rejected = metrics.peer.rejected.clone();
        let on_reject: warden_api::server::RejectHook = Arc::new(move |reason| {
            rejected.with_label_values(&[reason]).inc();
        });
        let peers = match config.socket_group {
            Some(_) => PeerPolicy::by_file_access(),
            None => PeerPolicy::new(&[]),
        };
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            warden_api::server::serve(api_listener, routes, peers, on_reject, shutdown).await;
            Ok(())
        });
    }
    {
        let watch = policy.clone().watch(shutdown.clone());
        tasks.spawn(async move {
            watch.await;
            Ok(())
        });
    }
    tasks.spawn(maintain_cache(
        cache.clone(),
        cache_file.clone(),
        changes,
        metrics.clone(),
        shutdown.clone(),
    ));
    {
        // The proxy finds senders by address in the directory: new endpoints there at once,
        // not at the reconciler's next pass (which adds their cgroups; there is none without
        // the datapath).
        let (mut changes, enforcement, shutdown) = (
            policy.subscribe_endpoints(),
            enforcement.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move {
            loop {
                // The table in force first: a change made before this task subscribed counts
                // as seen.
                let table = changes.borrow_and_update().clone();
                enforcement.set_addresses(table.directory());
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        });
    }
    if let (Some((datapath, _)), Some(reconciler)) = (ebpf, reconciler) {
        let loop_shutdown = shutdown.clone();
        tasks.spawn(async move {
            reconcile_loop(reconciler, loop_shutdown).await;
            Ok(())
        });
        let drop_policy = policy.clone();
        let (drop_metrics, drop_flows, drop_shutdown) =
            (metrics.clone(), flows_for_drops.clone(), shutdown.clone());
        tasks.spawn(async move {
            watch_drops(
                datapath,
                enforcement,
                drop_policy,
                drop_metrics,
                drop_flows,
                drop_shutdown,
            )
            .await;
            Ok(())
        });
    }
    // The admin API outlives the rest: `/readyz` and `/v1/status` answer through the drain.
    let admin_stop = CancellationToken::new();
    let task = tokio::spawn(async move {
        let admin = tokio::spawn(warden_telemetry::admin::serve(
            admin_listener,
            router,
            admin_stop.clone().cancelled_owned(),
        ));
        let mut result = Ok(());
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(error)) => result = Err(error),
                Err(error) => result = Err(anyhow::anyhow!("agent task failed: {error}")),
            }
        }
        // Every query has drained by now: this snapshot holds the last answers given. Taken
        // off the runtime, whose admin API still answers.
        let saved = cache.off_runtime(move |cache| {
            let snapshot = cache.lock().snapshot(unix_now());
            cache_file.save(&snapshot)
        });
        match saved.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot persist the FQDN cache at shutdown"),
            Err(error) => tracing::warn!(%error, "the FQDN cache's last save panicked"),
        }
        admin_stop.cancel();
        admin.await.context("admin API task panicked")?;
        result
    });
    Ok(RunningAgent {
        dns_addrs,
        admin_addr,
        shutdown,
        task,
    })
}

/// Puts the agent's DNS sockets into the datapath's reuseport selection and applies
/// `dns.prefer`. The proxy's sockets are registered by the proxy itself.
fn join_serving_group(datapath: &Datapath, proxy: &DnsProxy, prefer: Prefer) -> anyhow::Result<()> {
    serving::join(datapath, AGENT_INSTANCE, &proxy.listener_fds())
        .context("cannot register the DNS sockets for reuseport selection")?;
    serving::prefer(datapath, serving::preferred_instance(prefer))?;
    // A TCP connection queued on a listener that closes moves to the peer's listener.
    if let Err(error) = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
        tracing::warn!(%error, "cannot enable net.ipv4.tcp_migrate_req; TCP queries queued at a restart may be lost");
    }
    Ok(())
}

/// Loads and attaches the eBPF datapath (reusing pins left by an earlier run); returns it with
/// the cgroup root the programs act on.
fn open_datapath(config: &AgentConfig) -> anyhow::Result<(Datapath, PathBuf)> {
    let cgroup_root = match &config.datapath.cgroup_root {
        Some(root) => root.clone(),
        None => Datapath::detect_cgroup_root()?,
    };
    let options = DatapathOptions {
        cgroup_root: Some(cgroup_root.clone()),
        bpffs: config.datapath.bpffs.clone(),
    };
    let datapath = Datapath::open(&options).context("cannot load the eBPF datapath")?;
    for (program, action) in datapath.link_actions() {
        tracing::debug!(program, ?action, "datapath program");
    }
    tracing::info!(cgroup_root = %cgroup_root.display(), bpffs = %options.bpffs.display(), "eBPF datapath attached");
    Ok((datapath, cgroup_root))
}

/// Expires cache entries every second and persists the cache when it changed. The last save
/// happens at shutdown, after the proxy has drained (see [`start`]).
async fn maintain_cache(
    cache: SharedCache,
    file: CacheFile,
    changes: Arc<CacheChanges>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(MAINTENANCE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saved_at_change = 0;
    let mut last_save = Instant::now();
    let mut save_pause = PERSIST_INTERVAL;
    let mut last_gc = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = unix_now();
        if last_gc.elapsed() >= GC_INTERVAL {
            last_gc = Instant::now();
            if cache.expire(now, &metrics.cache).await > 0 {
                changes.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let change = changes.0.load(Ordering::Relaxed);
        if change == saved_at_change || last_save.elapsed() < save_pause {
            continue;
        }
        let started = Instant::now();
        // The copy is taken a chunk per hold of the lock the DNS path waits for; sorting and
        // writing come after, off the runtime's workers.
        let file = file.clone();
        let saved = cache
            .off_runtime(move |cache| {
                let snapshot = CacheSnapshot::new(now, cache.entries_unordered(now));
                file.save(&snapshot)
            })
            .await;
        save_pause = PERSIST_INTERVAL.max(started.elapsed() * 10);
        match saved {
            Ok(Ok(())) => saved_at_change = change,
            Ok(Err(error)) => {
                metrics.cache.persist_errors.inc();
                tracing::warn!(%error, "cannot persist the FQDN cache");
            }
            Err(error) => tracing::warn!(%error, "cache persister panicked"),
        }
        last_save = Instant::now();
    }
}
