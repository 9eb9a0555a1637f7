//! The agent's side of the agent ⇄ `warden-dnsproxy` protocol (`warden-api`).
//!
//! Each proxy holds one session: the agent sends the policy snapshot (again on every change),
//! takes the proxy's journal, cache and live mappings into its cache (so the reconciler keeps
//! the proxy's allow entries), records its flow events, and sends back its whole cache once
//! and every mapping that changes its own proxy's cache afterwards, so both caches stay equal
//! (the whole cache again should the session fall behind those). What goes to the proxy waits
//! in `Outgoing` until the proxy takes it: the loop never waits to send, so it never stops
//! reading the proxy.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use warden_api::proto::agent_message::Kind as AgentKind;
use warden_api::proto::agent_server::{Agent, AgentServer};
use warden_api::proto::proxy_message::Kind as ProxyKind;
use warden_api::proto::{
    AgentMessage, CacheClean, DatapathSettings, DnsSettings, Endpoint, Mapping as WireMapping,
    Mappings, PolicyFile, PolicySnapshot, ProxyMessage, Received, ResyncDone,
};
use warden_api::{MAPPINGS_PER_MESSAGE, MAX_MESSAGE_BYTES, PeerMapping};
use warden_config::{AgentConfig, DatapathMode, RejectCode};
use warden_enforce::Enforcement;
use warden_proxy::{Mapping, MappingObserver, SharedCache};
use warden_telemetry::{
    CacheFilter, CompiledCacheFilter, FlowEvent, FlowLog, LogBudget, Metrics, WallMoment,
    unix_millis,
};

use crate::policy_store::PolicyStore;

/// A proxy must say hello this soon after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// A proxy that takes none of the agent's messages for this long is stuck, or stalls on
/// purpose (answering HTTP/2 pings, reading nothing): the session ends rather than pin its task
/// and report a peer that is not there. A healthy proxy takes a chunk of a cache dump in
/// milliseconds.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A session that fell behind the agent's own mappings sends the whole cache again, at most
/// this often: the skipped ones are in it, and a peer slow enough to fall behind should not be
/// buried in dumps.
const CATCH_UP_INTERVAL: Duration = Duration::from_secs(10);

/// Largest message the agent accepts from a proxy: batches of mappings and flows are small,
/// so anything near this is a broken or hostile peer.
pub const MAX_PROXY_MESSAGE_BYTES: usize = 4 << 20;

/// What sessions share with the rest of the agent.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub config: AgentConfig,
    pub policy: Arc<PolicyStore>,
    pub cache: SharedCache,
    pub enforcement: Arc<Enforcement>,
    pub metrics: Metrics,
    pub flows: Arc<FlowLog>,
    pub sessions: Arc<Sessions>,
    /// Mappings the agent's own proxy learned, forwarded to every session.
    pub local_mappings: broadcast::Sender<Mapping>,
    /// Bumped when the cache changes, so it is persisted.
    pub cache_changes: Arc<CacheChanges>,
    /// Cache cleans made on the agent, passed on to every session.
    pub cleans: CleanFanout,
}

/// Cleans the agent remembers, the latest of each filter: enough for any operator's use, and
/// a bound on what each mapping from a proxy is checked against.
const CLEANS_REMEMBERED: usize = 256;

/// A cache clean made on the agent: what it removes, and when. It removes what was answered
/// before then, wherever that is, and nothing answered since.
#[derive(Debug, Clone)]
pub struct Clean {
    pub filter: CacheFilter,
    pub compiled: CompiledCacheFilter,
    /// When: what the times answered are read against.
    made: WallMoment,
}

impl Clean {
    /// When the clean was made, on the wall clock as it reads now (see [`WallMoment`]: answers
    /// given after a step back would otherwise read as older than the clean, and be dropped).
    pub fn made_at_ms(&self) -> u64 {
        self.made.unix_millis()
    }
}

/// Cleans with their times read once: the one rule of what a clean removes, a name it matches
/// answered before it.
#[derive(Debug, Default)]
struct CleanTimes {
    cleans: Vec<(u64, CompiledCacheFilter)>,
    /// The latest of the times: answers given since, nearly all of them, cost one comparison.
    latest_ms: u64,
}

impl CleanTimes {
    fn push(&mut self, made_ms: u64, compiled: CompiledCacheFilter) {
        self.latest_ms = self.latest_ms.max(made_ms);
        self.cleans.push((made_ms, compiled));
    }

    /// Whether a clean removes a name answered at `learned_ms` (0: not known, before all),
    /// `matches` telling whether a clean's filter takes it.
    fn removes(&self, learned_ms: u64, matches: impl Fn(&CompiledCacheFilter) -> bool) -> bool {
        learned_ms < self.latest_ms
            && self
                .cleans
                .iter()
                .any(|(made_ms, compiled)| learned_ms < *made_ms && matches(compiled))
    }

    /// [`Self::removes`] of a mapping as it goes to a proxy.
    fn removes_wire(&self, mapping: &WireMapping) -> bool {
        self.removes(mapping.learned_at_ms, |compiled| {
            compiled.matches(&mapping.endpoint, &mapping.name)
        })
    }
}

/// The cleans remembered, with their times read once, to check a batch of mappings against.
#[derive(Debug, Default)]
struct CleanCheck {
    times: CleanTimes,
    /// [`CleanFanout::generation`] when read.
    generation: u64,
}

impl CleanCheck {
    /// `batch` of the agent's own answers, without what a clean removes: an answer given
    /// before a clean may be broadcast after it (its datapath hold comes between), and the
    /// proxy would keep what the clean removed here. None if nothing is left.
    fn keep_live(&self, batch: AgentKind) -> Option<AgentKind> {
        let AgentKind::Cache(mut mappings) = batch else {
            return Some(batch);
        };
        mappings
            .mappings
            .retain(|mapping| !self.times.removes_wire(mapping));
        (!mappings.mappings.is_empty()).then_some(AgentKind::Cache(mappings))
    }

    /// Whether a clean removes `mapping` from a proxy. A mapping of a time not known (a proxy
    /// of an older build) is kept, as it was before times were known: dropped, an answer
    /// given after the clean would lose its allow entries.
    fn removes_from_proxy(&self, mapping: &PeerMapping) -> bool {
        mapping.learned_at_ms != 0
            && self.times.removes(mapping.learned_at_ms, |compiled| {
                compiled.matches_name(&mapping.endpoint, &mapping.name)
            })
    }
}

/// Hands each cache clean made on the agent to every session, a queue each, and remembers the
/// latest [`CLEANS_REMEMBERED`]. Not a broadcast, which drops what a busy session has not
/// read: a clean missed leaves its names on the proxy, and which names it removed cannot be
/// told afterwards. Nothing piles up in practice: each clean comes after the admin API's own
/// scan of the agent's cache, and a session moves each into its queue toward the proxy as it
/// comes, after a scan of its own (a proxy that takes nothing for [`SEND_TIMEOUT`] loses the
/// session, and its queue with it).
///
/// Remembered, because a proxy away when a clean was made (or whose mappings crossed it on
/// the socket) still holds what it removed and hands it back: each new session gets the
/// cleans remembered, and what a proxy sends of what they removed is dropped on arrival. Kept
/// in `state_dir` ([`CleanFanout::open`]), for a proxy away across an agent's restart.
#[derive(Debug, Clone, Default)]
pub struct CleanFanout {
    shared: Arc<Mutex<CleansShared>>,
    /// Moves with every clean remembered, under the cache's lock (see [`Self::record`]).
    generation: Arc<AtomicU64>,
    /// Where the cleans are kept across restarts, if anywhere.
    saving: Option<Arc<CleansFile>>,
}

#[derive(Debug)]
struct CleansFile {
    file: PathBuf,
    /// Held across a write, so that writes do not interleave in the staging file.
    writer: Mutex<()>,
    errors: prometheus::IntCounterVec,
}

#[derive(Debug, Default)]
struct CleansShared {
    sessions: Vec<mpsc::UnboundedSender<Clean>>,
    remembered: Arc<Vec<Clean>>,
}

/// The cleans remembered, in `state_dir`.
const CLEANS_FILE: &str = "cache-cleans.json";

/// [`CLEANS_FILE`]'s format.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedCleans {
    version: u32,
    cleans: Vec<SavedClean>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedClean {
    endpoint: Option<String>,
    name: Option<String>,
    made_at_ms: u64,
}

impl SavedCleans {
    const VERSION: u32 = 1;

    fn of(cleans: &[Clean]) -> SavedCleans {
        SavedCleans {
            version: Self::VERSION,
            cleans: cleans
                .iter()
                .map(|clean| SavedClean {
                    endpoint: clean.filter.endpoint.clone(),
                    name: clean.filter.name.clone(),
                    made_at_ms: clean.made.recorded_ms(),
                })
                .collect(),
        }
    }

    fn write(&self, file: &Path) -> Result<(), String> {
        let bytes = serde_json::to_vec(self).map_err(|error| error.to_string())?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|error| error.to_string())?;
        }
        warden_state::write_atomically(file, &bytes).map_err(|error| error.to_string())
    }

    /// What `file` holds: none if it is missing, and none, the file set aside, if it cannot be
    /// read; a clean whose filter does not compile is left out.
    fn read(file: &Path) -> Vec<Clean> {
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(error) => {
                let set_aside = warden_state::set_aside(file);
                tracing::error!(path = %file.display(), %error, set_aside, "cannot read the cache cleans kept in state_dir");
                return Vec::new();
            }
        };
        let saved = match serde_json::from_slice::<SavedCleans>(&bytes) {
            Ok(saved) if saved.version == Self::VERSION => saved,
            Ok(saved) => {
                let set_aside = warden_state::set_aside(file);
                tracing::error!(path = %file.display(), version = saved.version, set_aside, "cache cleans kept in state_dir of another format");
                return Vec::new();
            }
            Err(error) => {
                let set_aside = warden_state::set_aside(file);
                tracing::error!(path = %file.display(), %error, set_aside, "cache cleans kept in state_dir do not parse");
                return Vec::new();
            }
        };
        let skip = saved.cleans.len().saturating_sub(CLEANS_REMEMBERED);
        saved
            .cleans
            .into_iter()
            .skip(skip)
            .filter_map(|saved| {
                let filter = CacheFilter {
                    endpoint: saved.endpoint,
                    name: saved.name,
                };
                match filter.compile() {
                    Ok(compiled) => Some(Clean {
                        filter,
                        compiled,
                        // Its age is not known: placed by its wall time, never later than now.
                        made: WallMoment::at(saved.made_at_ms),
                    }),
                    Err(error) => {
                        tracing::warn!(path = %file.display(), error = error.trim_end(), "a kept cache clean left out");
                        None
                    }
                }
            })
            .collect()
    }
}

/// What makes two filters the same clean: a name pattern is matched without case or the
/// final dot.
fn clean_key(filter: &CacheFilter) -> (Option<&str>, Option<String>) {
    (
        filter.endpoint.as_deref(),
        filter
            .name
            .as_deref()
            .map(|name| name.trim_end_matches('.').to_ascii_lowercase()),
    )
}

impl CleanFanout {
    fn shared(&self) -> std::sync::MutexGuard<'_, CleansShared> {
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A session's queue of the cleans made from now on, and those remembered. The queues of
    /// sessions ended go here too, not only at the next clean: sessions come and go while
    /// cleans are rare.
    pub fn subscribe(&self) -> (mpsc::UnboundedReceiver<Clean>, Arc<Vec<Clean>>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut shared = self.shared();
        shared.sessions.retain(|session| !session.is_closed());
        shared.sessions.push(sender);
        (receiver, Arc::clone(&shared.remembered))
    }

    /// Remembers a clean made now, before `cache` is cleaned: from here on no mapping from a
    /// proxy brings back what it removes. Under `cache`'s lock, as [`absorb`] checks each
    /// mapping: a batch checked before the clean was remembered is in the cache before the
    /// clean walks it. A clean of the same filter made before is forgotten (this one removes
    /// all it did), and all others with a clean of everything.
    pub fn record(
        &self,
        filter: CacheFilter,
        compiled: CompiledCacheFilter,
        cache: &SharedCache,
    ) -> Clean {
        let clean = Clean {
            filter,
            compiled,
            made: WallMoment::now(),
        };
        let everything = clean.filter.endpoint.is_none() && clean.filter.name.is_none();
        let _held = cache.lock();
        let mut shared = self.shared();
        let mut remembered: Vec<Clean> = shared
            .remembered
            .iter()
            .filter(|old| !everything && clean_key(&old.filter) != clean_key(&clean.filter))
            .cloned()
            .collect();
        if remembered.len() >= CLEANS_REMEMBERED {
            remembered.remove(0);
        }
        remembered.push(clean.clone());
        shared.remembered = Arc::new(remembered);
        self.generation.fetch_add(1, Ordering::Release);
        clean
    }

    /// Writes the cleans remembered now to `state_dir` (after [`Self::record`]), on the
    /// blocking pool: the runtime's workers answer DNS. One write at a time, each of the list
    /// as it stands when it begins, so the last write holds the latest clean. A failure is
    /// logged and counted (`warden_state_persist_errors_total{file="cache_cleans"}`); the next
    /// clean writes the whole list again.
    pub async fn save(&self) {
        let Some(saving) = self.saving.clone() else {
            return;
        };
        let fanout = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = saving
                .writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let remembered = Arc::clone(&fanout.shared().remembered);
            SavedCleans::of(&remembered).write(&saving.file)
        })
        .await
        .unwrap_or_else(|error| Err(error.to_string()));
        if let Err(error) = written
            && let Some(saving) = &self.saving
        {
            saving.errors.with_label_values(&["cache_cleans"]).inc();
            tracing::error!(path = %saving.file.display(), %error, "cannot keep the cache cleans in state_dir");
        }
    }

    /// The cleans an earlier run remembered in `state_dir`, where this one keeps them too
    /// ([`Self::save`], its failures counted in `errors`): a proxy away across an agent's
    /// restart still has what they removed. A file that cannot be read is set aside
    /// (`.corrupt`), and the agent starts without.
    pub fn open(state_dir: &Path, errors: prometheus::IntCounterVec) -> CleanFanout {
        let file = state_dir.join(CLEANS_FILE);
        let remembered = SavedCleans::read(&file);
        if !remembered.is_empty() {
            tracing::info!(
                cleans = remembered.len(),
                "cache cleans remembered from an earlier run"
            );
        }
        CleanFanout {
            shared: Arc::new(Mutex::new(CleansShared {
                sessions: Vec::new(),
                remembered: Arc::new(remembered),
            })),
            generation: Arc::default(),
            saving: Some(Arc::new(CleansFile {
                file,
                writer: Mutex::new(()),
                errors,
            })),
        }
    }

    /// Whether a clean remembered removes an entry of the agent's persisted cache: one made
    /// before the crash that kept the cache's file from its next write still holds the names.
    pub fn removes_restored(&self) -> impl Fn(&warden_fqdn::CacheEntry) -> bool + use<> {
        let times = self.check().times;
        move |entry| {
            times.removes(entry.learned_at_ms, |compiled| {
                compiled.matches(&entry.endpoint, &entry.name)
            })
        }
    }

    /// Queues `clean` for every session; those ended leave the list.
    pub fn send(&self, clean: &Clean) {
        self.shared()
            .sessions
            .retain(|session| session.send(clean.clone()).is_ok());
    }

    /// The cleans remembered, their times read now.
    fn check(&self) -> CleanCheck {
        let shared = self.shared();
        let mut check = CleanCheck {
            generation: self.generation.load(Ordering::Acquire),
            ..CleanCheck::default()
        };
        for clean in shared.remembered.iter() {
            check.times.push(clean.made_at_ms(), clean.compiled.clone());
        }
        check
    }

    /// [`Self::check`] again if a clean was remembered since `check` was read.
    fn refresh(&self, check: &mut CleanCheck) {
        if self.generation.load(Ordering::Acquire) != check.generation {
            *check = self.check();
        }
    }
}

/// The connected proxies, for `/v1/status`.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, SessionInfo>>,
    unfinished: Mutex<Unfinished>,
}

/// Since when resyncs have not finished: the start of the first unfinished session seen since
/// the last resync that finished, or since a quiet stretch without any. Sessions that come
/// and go without finishing theirs (a proxy failing at each try) do not move it, so they
/// hold revocations back for [`RESYNC_GRACE_TOTAL`] at most.
#[derive(Debug, Default)]
struct Unfinished {
    since: Option<Instant>,
    last_seen: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub instance: String,
    pub pid: u32,
    pub serving: bool,
    pub acked_revision: u64,
    pub last_resync_ms: Option<u64>,
    pub last_resync_at_ms: Option<u64>,
    /// When the session said hello.
    pub started: Instant,
}

/// How long a session's resync may hold back the revocation of unwanted allow entries (see
/// [`Sessions::any_resyncing`]): a peer that never finishes it must not keep entries of a
/// removed rule alive for good.
const RESYNC_GRACE: Duration = Duration::from_secs(60);

/// How long resyncs that keep failing, one session after another, may hold revocations back:
/// room for a second try.
const RESYNC_GRACE_TOTAL: Duration = Duration::from_secs(120);

/// How long without an unfinished session before the next one gets a grace of its own: a
/// failing proxy reconnects within a few seconds.
const RESYNC_QUIET: Duration = Duration::from_secs(30);

/// How long after a session ended before its resync finished revocations stay held back (within
/// [`RESYNC_GRACE_TOTAL`]): the proxy still has the mappings and reconnects within its longest
/// backoff after a failed session (5 s), to replay them.
const RESYNC_RECONNECT: Duration = Duration::from_secs(7);

impl Sessions {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SessionInfo>> {
        self.live
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn snapshot(&self) -> Vec<SessionInfo> {
        self.live().values().cloned().collect()
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut SessionInfo)) {
        if let Some(info) = self.live().get_mut(&id) {
            change(info);
        }
    }
}

impl Sessions {
    pub fn is_empty(&self) -> bool {
        self.live().is_empty()
    }

    /// Whether a proxy connected within [`RESYNC_GRACE`] has not finished its resync: the
    /// mappings behind the allow entries it wrote meanwhile are still on their way to this
    /// cache.
    pub fn any_resyncing(&self) -> bool {
        let live = self.live();
        let unfinished = || {
            live.values()
                .filter(|info| info.last_resync_at_ms.is_none())
        };
        let mut watch = self
            .unfinished
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let Some(oldest) = unfinished().map(|info| info.started).min() else {
            if watch
                .last_seen
                .is_none_or(|seen| seen.elapsed() > RESYNC_QUIET)
            {
                watch.since = None;
            }
            // Between a session that broke off its resync and the proxy's next one.
            return watch
                .last_seen
                .is_some_and(|seen| seen.elapsed() < RESYNC_RECONNECT)
                && watch
                    .since
                    .is_some_and(|since| since.elapsed() < RESYNC_GRACE_TOTAL);
        };
        watch.last_seen = Some(Instant::now());
        let since = *watch.since.get_or_insert(oldest);
        since.elapsed() < RESYNC_GRACE_TOTAL
            && unfinished().any(|info| info.started.elapsed() < RESYNC_GRACE)
    }

    /// A session ended; one that had not finished its resync leaves its proxy's mappings on
    /// their way, until the proxy's next session (see [`RESYNC_RECONNECT`]).
    fn ended(&self, id: u64) {
        let Some(info) = self.live().remove(&id) else {
            return;
        };
        if info.last_resync_at_ms.is_none() {
            let mut watch = self
                .unfinished
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            watch.since.get_or_insert(info.started);
            watch.last_seen = Some(Instant::now());
        }
    }

    /// A session finished its resync: the next unfinished one starts a new grace.
    fn resync_finished(&self) {
        self.unfinished
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .since = None;
    }
}

/// Counts cache changes so the persister writes only when there is something new.
#[derive(Debug, Default)]
pub struct CacheChanges(pub AtomicU64);

/// Publishes the agent's own mappings to the sessions and marks the cache as changed.
#[derive(Debug)]
pub struct LocalMappings {
    pub sender: broadcast::Sender<Mapping>,
    pub changes: Arc<CacheChanges>,
}

impl MappingObserver for LocalMappings {
    fn on_mapping(&self, mapping: Mapping) {
        self.changes.0.fetch_add(1, Ordering::Relaxed);
        // No receiver means no proxy is connected: nothing to forward.
        let _ = self.sender.send(mapping);
    }
}

/// The gRPC service of the agent socket.
pub fn service(state: ApiState) -> AgentServer<AgentApi> {
    AgentServer::new(AgentApi { state })
        .max_decoding_message_size(MAX_PROXY_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[derive(Debug)]
pub struct AgentApi {
    state: ApiState,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<AgentMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let inbound = request.into_inner();
        let (outbound, stream) = mpsc::channel(64);
        tokio::spawn(run_session(self.state.clone(), inbound, outbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }
}

/// Why a session ended early; each is counted under `warden_api_rejected_total`.
#[derive(Debug)]
enum SessionEnd {
    /// The proxy went away or the agent is stopping.
    Closed,
    Rejected(&'static str, String),
}

async fn run_session(
    state: ApiState,
    mut inbound: Streaming<ProxyMessage>,
    outbound: mpsc::Sender<Result<AgentMessage, Status>>,
) {
    let id = state.sessions.next.fetch_add(1, Ordering::Relaxed);
    let ended = session(&state, id, &mut inbound, &outbound).await;
    // Counted before the session is seen to end: whoever waits for the gauge finds it counted.
    if let SessionEnd::Rejected(reason, _) = &ended {
        state
            .metrics
            .peer
            .rejected
            .with_label_values(&[reason])
            .inc();
    }
    state.sessions.ended(id);
    state
        .metrics
        .peer
        .connected
        .set(i64::try_from(state.sessions.live().len()).unwrap_or(i64::MAX));
    match ended {
        SessionEnd::Closed => tracing::info!(session = id, "dnsproxy session ended"),
        SessionEnd::Rejected(reason, detail) => {
            tracing::warn!(session = id, reason, detail, "dnsproxy session refused");
            // Not awaited: a stalled proxy would hold this send as it held the others.
            let _ = outbound.try_send(Err(Status::invalid_argument(format!("{reason}: {detail}"))));
        }
    }
}

async fn session(
    state: &ApiState,
    id: u64,
    inbound: &mut Streaming<ProxyMessage>,
    outbound: &mpsc::Sender<Result<AgentMessage, Status>>,
) -> SessionEnd {
    let started = Instant::now();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Err(_) => return SessionEnd::Rejected("protocol", "no hello".into()),
        Ok(Err(status)) => return rejected_status(&status),
        Ok(Ok(None)) => return SessionEnd::Closed,
        Ok(Ok(Some(ProxyMessage {
            kind: Some(ProxyKind::Hello(hello)),
        }))) => hello,
        Ok(Ok(Some(_))) => {
            return SessionEnd::Rejected("protocol", "first message is not hello".into());
        }
    };
    tracing::info!(
        session = id,
        pid = hello.pid,
        revision = hello.revision,
        journal = hello.journal,
        "dnsproxy connected"
    );
    state.sessions.live().insert(
        id,
        SessionInfo {
            instance: hello.instance.clone(),
            pid: hello.pid,
            serving: hello.serving,
            acked_revision: hello.revision,
            last_resync_ms: None,
            last_resync_at_ms: None,
            started: Instant::now(),
        },
    );
    state
        .metrics
        .peer
        .connected
        .set(i64::try_from(state.sessions.live().len()).unwrap_or(i64::MAX));

    let mut revisions = state.policy.subscribe();
    let mut local = state.local_mappings.subscribe();
    let (mut cleans, remembered) = state.cleans.subscribe();
    let mut outgoing = Outgoing::default();
    // Before anything else of the agent's: the proxy may hold what they removed (it was away,
    // or took them before this agent's cache was restored), and removes it. Those made after
    // the proxy's last session remove something; the others, nothing answered since.
    outgoing.queue.extend(remembered.iter().map(clean_message));
    // The generation before the snapshot, as at every later tick: read after, a change of the
    // cgroups in between would be marked sent without being in it, and never followed.
    let mut sent_generation = state.enforcement.generation();
    let snapshot = build_snapshot(state);
    let mut sent_revision = snapshot.revision;
    outgoing.snapshot = Some(snapshot);
    // Endpoints' cgroups are enrolled after start and may change without a new revision.
    let mut directory_check = tokio::time::interval(Duration::from_millis(500));
    let mut catch_up = CatchUp::default();
    let mut resync_asked = false;
    let mut live_check = state.cleans.check();
    loop {
        outgoing
            .stall
            .track(outgoing.is_pending(), tokio::time::Instant::now());
        tokio::select! {
            permit = outbound.reserve(), if outgoing.is_pending() => {
                let Ok(permit) = permit else {
                    return SessionEnd::Closed;
                };
                outgoing.stall.taken(tokio::time::Instant::now());
                match outgoing.next() {
                    Some(Next::Message(kind)) => permit.send(Ok(AgentMessage { kind: Some(kind) })),
                    Some(Next::CaughtUp { sent }) => {
                        tracing::info!(session = id, entries = sent, "dnsproxy session caught up with the agent's cache");
                    }
                    Some(Next::ResyncDone { sent }) => {
                        permit.send(Ok(AgentMessage {
                            kind: Some(AgentKind::ResyncDone(ResyncDone { entries: sent })),
                        }));
                        let elapsed = started.elapsed();
                        state.metrics.peer.resync_completed(elapsed);
                        state.sessions.update(id, |info| {
                            info.last_resync_ms = Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
                            info.last_resync_at_ms = Some(unix_millis());
                        });
                        state.sessions.resync_finished();
                        tracing::info!(session = id, entries = sent, ms = elapsed.as_millis(), "resync with dnsproxy done");
                    }
                    None => {}
                }
            }
            () = outgoing.stall.expired() => {
                // Room in the queue: the proxy took something while this loop was busy.
                if outbound.capacity() > 0 {
                    outgoing.stall.taken(tokio::time::Instant::now());
                    continue;
                }
                return SessionEnd::Rejected(
                    "stalled",
                    format!("the proxy took no message for {} s", SEND_TIMEOUT.as_secs()),
                );
            }
            () = catch_up.wait(), if outgoing.dump.is_none() => {
                // The broadcast dropped mappings this session had not forwarded: they are in the
                // cache, so the cache goes again, merged on the other side like live mappings.
                outgoing.start_copy(state, &mut local, &mut cleans, &mut catch_up, false).await;
            }
            _ = directory_check.tick() => {
                let generation = state.enforcement.generation();
                if generation != sent_generation {
                    sent_generation = generation;
                    outgoing.snapshot = Some(build_snapshot(state));
                }
            }
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => return SessionEnd::Closed,
                    Err(status) => return rejected_status(&status),
                };
                match message.kind {
                    Some(ProxyKind::Mappings(batch)) => {
                        absorb(state, &batch.mappings);
                        // In order with what the agent sends: the proxy's journal may forget
                        // these now.
                        if batch.confirm != 0 {
                            outgoing.confirm(batch.confirm);
                        }
                    }
                    Some(ProxyKind::Flows(flows)) => {
                        // A bad event is skipped and counted, like a bad mapping: the session
                        // and the events beside it carry on.
                        let mut first_error = None;
                        for event in flows.events {
                            match serde_json::from_str::<FlowEvent>(&event) {
                                Ok(event) => state.flows.record(event),
                                Err(error) => {
                                    state.metrics.peer.rejected.with_label_values(&["malformed"]).inc();
                                    first_error.get_or_insert(error);
                                }
                            }
                        }
                        if let Some(error) = first_error {
                            tracing::warn!(%error, "flow events from the peer skipped");
                        }
                    }
                    Some(ProxyKind::Ack(ack)) => {
                        state.metrics.peer.acked_revision.set(i64::try_from(ack.revision).unwrap_or(i64::MAX));
                        state.sessions.update(id, |info| info.acked_revision = ack.revision);
                    }
                    Some(ProxyKind::Serving(serving)) => {
                        state.sessions.update(id, |info| info.serving = serving.serving);
                    }
                    Some(ProxyKind::ResyncDone(_)) => {
                        // The proxy's journal and cache are in: the agent's cache follows, then
                        // `ResyncDone`, completing the exchange. Both then hold the union. (A
                        // catch-up still on its way is replaced: this copy is newer.) Once per
                        // session: each costs a copy of the whole cache.
                        if resync_asked {
                            return SessionEnd::Rejected("protocol", "a second ResyncDone".into());
                        }
                        resync_asked = true;
                        outgoing.start_copy(state, &mut local, &mut cleans, &mut catch_up, true).await;
                    }
                    Some(ProxyKind::Hello(_)) | None => {
                        return SessionEnd::Rejected("protocol", "unexpected message".into());
                    }
                }
            }
            changed = revisions.changed() => {
                if changed.is_err() {
                    return SessionEnd::Closed;
                }
                let snapshot = build_snapshot(state);
                if snapshot.revision > sent_revision {
                    sent_revision = snapshot.revision;
                    outgoing.snapshot = Some(snapshot);
                }
            }
            // One live batch waits at a time: past it the broadcast holds them, and a session
            // that falls too far behind catches up with a copy of the cache.
            mapping = local.recv(), if !outgoing.has_live() => {
                let mapping = match mapping {
                    Ok(mapping) => mapping,
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        fell_behind(state, id, skipped, &mut catch_up);
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return SessionEnd::Closed,
                };
                let batch = live_batch(Some(&mapping), &mut local, |skipped| {
                    fell_behind(state, id, skipped, &mut catch_up);
                });
                state.cleans.refresh(&mut live_check);
                outgoing.queue.extend(batch.and_then(|batch| live_check.keep_live(batch)));
            }
            clean = cleans.recv() => {
                let Some(clean) = clean else {
                    return SessionEnd::Closed;
                };
                // The agent's answers broadcast before the clean go before it, however many wait
                // (at most the broadcast's 4,096): behind it they would bring back what it
                // removed. A live batch still queued does not hold them back here.
                state.cleans.refresh(&mut live_check);
                while let Some(batch) = live_batch(None, &mut local, |skipped| {
                    fell_behind(state, id, skipped, &mut catch_up);
                }) {
                    outgoing.queue.extend(live_check.keep_live(batch));
                }
                let compiled = clean.compiled.clone();
                outgoing.clean(&clean);
                // What the agent's cache holds of the clean's names now goes again, behind it:
                // an answer of the agent's that repeated its cache since the clean kept the name
                // here (the time answered moved) but was not broadcast, and the proxy, which
                // removes what it holds of the name from before the clean, would lack it.
                let since = warden_api::cache_dump_matching(&state.cache, move |endpoint, name| {
                    compiled.matches(endpoint, name)
                })
                .await;
                outgoing.queue.extend(warden_api::into_mapping_batches(since).map(|mappings| {
                    AgentKind::Cache(Mappings { mappings, resync: false, confirm: 0, })
                }));
            }
        }
    }
}

/// What a session has for the proxy, handed over as the proxy takes it, through the one
/// `reserve()` branch of the session loop: the loop never waits to send, so it goes on reading
/// the proxy however slowly the proxy reads. (It once awaited each send in place, and a copy
/// of the cache, or any live mapping behind one, stopped it reading for as long as that took.)
/// The latest snapshot goes first; then, in turn, the queue and the chunks of a copy of the
/// cache, so that neither starves the other.
#[derive(Default)]
struct Outgoing {
    /// The latest only: a newer one replaces one not yet sent.
    snapshot: Option<PolicySnapshot>,
    /// Live mappings and cleans, in the order they happened: a clean must not overtake the
    /// mappings it removes, nor a later answer's mapping overtake the clean.
    queue: VecDeque<AgentKind>,
    dump: Option<Dump>,
    /// Whether the copy or the queue goes at the next turn.
    dump_turn: bool,
    stall: StallClock,
}

/// What the session hands over next.
enum Next {
    Message(AgentKind),
    /// A catch-up's last chunk has gone.
    CaughtUp {
        sent: u64,
    },
    /// A resync's last chunk has gone: `ResyncDone` follows.
    ResyncDone {
        sent: u64,
    },
}

impl Outgoing {
    /// Confirmations are cumulative: one waiting at the tail of the queue takes the newer
    /// number rather than another queued behind it (a proxy that read one message in a while
    /// and kept sending grew the queue by one per batch it sent).
    fn confirm(&mut self, number: u64) {
        if let Some(AgentKind::Received(waiting)) = self.queue.back_mut() {
            waiting.confirm = waiting.confirm.max(number);
            return;
        }
        self.queue
            .push_back(AgentKind::Received(Received { confirm: number }));
    }

    fn is_pending(&self) -> bool {
        self.snapshot.is_some() || !self.queue.is_empty() || self.dump.is_some()
    }

    fn has_live(&self) -> bool {
        self.queue
            .iter()
            .any(|message| matches!(message, AgentKind::Cache(_)))
    }

    fn next(&mut self) -> Option<Next> {
        if let Some(snapshot) = self.snapshot.take() {
            return Some(Next::Message(AgentKind::Snapshot(snapshot)));
        }
        self.dump_turn = !self.dump_turn;
        if (self.dump_turn || self.queue.is_empty())
            && let Some(dump) = self.dump.as_mut()
            && dump.after == 0
        {
            if let Some(chunk) = dump.next_chunk() {
                dump.sent += chunk.len() as u64;
                let batch = Mappings {
                    mappings: chunk,
                    resync: dump.resync,
                    confirm: 0,
                };
                return Some(Next::Message(AgentKind::Cache(batch)));
            }
            let Dump { sent, resync, .. } = self.dump.take()?;
            return Some(if resync {
                Next::ResyncDone { sent }
            } else {
                Next::CaughtUp { sent }
            });
        }
        let message = self.queue.pop_front()?;
        if let Some(dump) = self.dump.as_mut() {
            dump.after = dump.after.saturating_sub(1);
        }
        Some(Next::Message(message))
    }

    /// Copies the cache for the proxy (see [`Dump::start`]). What the queue holds goes first,
    /// and with it the cleans not yet received: they are older than the copy, which lacks what
    /// they removed, so they must reach the proxy before it and not take anything out of it
    /// (an entry answered again since would go).
    async fn start_copy(
        &mut self,
        state: &ApiState,
        local: &mut broadcast::Receiver<Mapping>,
        cleans: &mut mpsc::UnboundedReceiver<Clean>,
        catch_up: &mut CatchUp,
        resync: bool,
    ) {
        while let Ok(clean) = cleans.try_recv() {
            self.queue.push_back(clean_message(&clean));
        }
        let mut dump = Dump::start(state, local, catch_up, resync).await;
        dump.after = self.queue.len();
        self.dump = Some(dump);
    }

    /// Queues a clean after what it follows. What a copy on its way still holds of what the
    /// clean removes is dropped from it: sent after the clean, it would bring that back.
    fn clean(&mut self, clean: &Clean) {
        if let Some(dump) = &mut self.dump {
            dump.removed
                .push(clean.made_at_ms(), clean.compiled.clone());
        }
        self.queue.push_back(clean_message(clean));
    }
}

/// A clean made on the agent, as the proxy gets it.
fn clean_message(clean: &Clean) -> AgentKind {
    AgentKind::Clean(CacheClean {
        endpoint: clean.filter.endpoint.clone(),
        name: clean.filter.name.clone(),
        made_at_ms: clean.made_at_ms(),
    })
}

/// Since when the session has had something for a proxy that took none of it: a proxy that
/// takes nothing for [`SEND_TIMEOUT`] is stuck, or stalls on purpose.
#[derive(Debug, Default)]
struct StallClock {
    waiting_since: Option<tokio::time::Instant>,
}

impl StallClock {
    /// Called every turn of the loop: the clock runs only while something waits.
    fn track(&mut self, pending: bool, now: tokio::time::Instant) {
        if !pending {
            self.waiting_since = None;
        } else if self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
    }

    /// The proxy took a message: the wait starts again.
    fn taken(&mut self, now: tokio::time::Instant) {
        self.waiting_since = Some(now);
    }

    /// Ready once the proxy has taken nothing for [`SEND_TIMEOUT`] while something waited.
    async fn expired(&self) {
        match self.waiting_since {
            Some(since) => tokio::time::sleep_until(since + SEND_TIMEOUT).await,
            None => std::future::pending().await,
        }
    }
}

/// A copy of the agent's cache on its way to the proxy, a chunk per turn (see [`Outgoing`]).
struct Dump {
    chunks: std::vec::IntoIter<Vec<WireMapping>>,
    sent: u64,
    /// A resync's: `ResyncDone` follows the last chunk.
    resync: bool,
    /// Messages of the queue that go before the first chunk: those queued before the copy.
    after: usize,
    /// Cleans made since the copy, with their times: what they remove leaves the chunks as
    /// they go (a chunk at a time, not the whole copy on the clean's turn of the loop).
    removed: CleanTimes,
}

impl Dump {
    /// Copies the cache. The session's receiver of the agent's mappings starts afresh first:
    /// whatever it still held is in the cache (a mapping is broadcast after its cache insert),
    /// so the copy carries it, and a session that fell behind does not fall behind again on
    /// the backlog it already skipped.
    async fn start(
        state: &ApiState,
        local: &mut broadcast::Receiver<Mapping>,
        catch_up: &mut CatchUp,
        resync: bool,
    ) -> Dump {
        *local = state.local_mappings.subscribe();
        catch_up.started(tokio::time::Instant::now());
        let copy = warden_api::cache_dump(&state.cache).await;
        Dump {
            chunks: warden_api::into_mapping_batches(copy)
                .collect::<Vec<_>>()
                .into_iter(),
            sent: 0,
            resync,
            after: 0,
            removed: CleanTimes::default(),
        }
    }

    /// The next chunk with what the cleans since the copy removed taken out; none once all
    /// are out.
    fn next_chunk(&mut self) -> Option<Vec<WireMapping>> {
        for mut chunk in self.chunks.by_ref() {
            chunk.retain(|mapping| !self.removed.removes_wire(mapping));
            if !chunk.is_empty() {
                return Some(chunk);
            }
        }
        None
    }
}

/// A live batch from what `local` holds: `first` (just received) and those already waiting,
/// one message per burst, not per answer, up to the batch bounds (a broadcast receiver cannot
/// put one back, so the last mapping may take a batch past BATCH_BYTES; the proxy accepts
/// 16 MiB). None when nothing waits. `fell_behind` is told of mappings the receiver skipped.
fn live_batch(
    first: Option<&Mapping>,
    local: &mut broadcast::Receiver<Mapping>,
    mut fell_behind: impl FnMut(u64),
) -> Option<AgentKind> {
    let mut mappings: Vec<WireMapping> = first.map(WireMapping::from).into_iter().collect();
    let mut bytes: usize = mappings.iter().map(warden_api::mapping_bytes).sum();
    while mappings.len() < MAPPINGS_PER_MESSAGE && bytes < warden_api::BATCH_BYTES {
        match local.try_recv() {
            Ok(more) => {
                let more = WireMapping::from(&more);
                bytes += warden_api::mapping_bytes(&more);
                mappings.push(more);
            }
            Err(broadcast::error::TryRecvError::Lagged(skipped)) => fell_behind(skipped),
            // Empty, or closed (the next recv says so).
            Err(_) => break,
        }
    }
    (!mappings.is_empty()).then_some(AgentKind::Cache(Mappings {
        mappings,
        resync: false,
        confirm: 0,
    }))
}

/// Counts what a session skipped and schedules its catch-up.
fn fell_behind(state: &ApiState, id: u64, skipped: u64, catch_up: &mut CatchUp) {
    state.metrics.peer.mappings_skipped.inc_by(skipped);
    let due = catch_up.fell_behind(tokio::time::Instant::now());
    tracing::warn!(
        session = id,
        skipped,
        catch_up_in_ms = due.as_millis(),
        "dnsproxy session fell behind the agent's mappings; the whole cache follows"
    );
}

/// When a session that fell behind its broadcast of the agent's mappings next sends the whole
/// cache: at once the first time, then at most every [`CATCH_UP_INTERVAL`].
#[derive(Debug, Default)]
struct CatchUp {
    due: Option<tokio::time::Instant>,
    last: Option<tokio::time::Instant>,
}

impl CatchUp {
    /// Schedules a catch-up (one already scheduled covers this fall too); how long until it.
    fn fell_behind(&mut self, now: tokio::time::Instant) -> Duration {
        let due = *self.due.get_or_insert_with(|| {
            self.last
                .map_or(now, |last| (last + CATCH_UP_INTERVAL).max(now))
        });
        due.saturating_duration_since(now)
    }

    /// A copy of the cache is on its way (a catch-up, or a resync's): it covers every fall so
    /// far, and the next catch-up waits for the interval.
    fn started(&mut self, now: tokio::time::Instant) {
        self.due = None;
        self.last = Some(now);
    }

    /// Ready when a catch-up is due; never when none is scheduled.
    async fn wait(&self) {
        match self.due {
            Some(due) => tokio::time::sleep_until(due).await,
            None => std::future::pending().await,
        }
    }
}

/// A stream error from tonic: a message over the size limit, or one that does not decode; or
/// the proxy gone, which is no refusal.
fn rejected_status(status: &Status) -> SessionEnd {
    let message = status.message().to_owned();
    if message.contains("message length too large") || message.contains("too large") {
        SessionEnd::Rejected("oversized", message)
    } else if status.code() == tonic::Code::Cancelled
        || status.code() == tonic::Code::Unavailable
        || connection_lost(status)
    {
        SessionEnd::Closed
    } else {
        SessionEnd::Rejected("malformed", message)
    }
}

/// Whether the stream broke because its connection did (the proxy killed: a broken pipe or a
/// reset under HTTP/2), which tonic reports as `Unknown`, like a message that does not decode.
fn connection_lost(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        if error.is::<std::io::Error>()
            || error
                .downcast_ref::<h2::Error>()
                .is_some_and(h2::Error::is_io)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Takes a proxy's mappings into the agent's cache (checked, see
/// [`warden_api::merge_mappings`]); the reconciler then keeps their allow entries (the proxy
/// wrote them already). But for what a clean made since they were answered removes: each is
/// checked under the cache's lock, where cleans are remembered ([`CleanFanout::record`]), so
/// one checked before a clean was remembered is in the cache before the clean's walk begins
/// (and the walk takes it), and one checked after is dropped.
fn absorb(state: &ApiState, mappings: &[WireMapping]) {
    let mut check = state.cleans.check();
    let (_, cleaned) =
        warden_api::merge_mappings_unless(&state.cache, mappings, &state.metrics.peer, |mapping| {
            state.cleans.refresh(&mut check);
            check.removes_from_proxy(mapping)
        });
    if cleaned > 0 {
        state.metrics.peer.mappings_cleaned.inc_by(cleaned as u64);
        tracing::debug!(
            cleaned,
            "mappings from the proxy a clean since removed, dropped"
        );
    }
    state.cache_changes.0.fetch_add(1, Ordering::Relaxed);
}

/// The snapshot of the policy in force, with everything a proxy needs to act alone.
fn build_snapshot(state: &ApiState) -> PolicySnapshot {
    let (revision, files) = state.policy.documents();
    let directory = state.enforcement.directory();
    let mut cgroups: HashMap<u32, Vec<u64>> = HashMap::new();
    for (cgroup_id, (endpoint, _)) in &directory.by_cgroup {
        cgroups.entry(endpoint.0).or_default().push(*cgroup_id);
    }
    let endpoints = state
        .policy
        .endpoints()
        .entries()
        .map(|(info, _, config)| Endpoint {
            id: info.id.0,
            name: config.name.clone(),
            namespace: config.namespace.clone(),
            labels: config.labels.clone().into_iter().collect(),
            ips: config.ips.iter().map(ToString::to_string).collect(),
            cgroup_ids: cgroups.get(&info.id.0).cloned().unwrap_or_default(),
            peer_only: config.peer_only,
        })
        .collect();
    let dns = &state.config.dns;
    let snapshot = PolicySnapshot {
        revision,
        policies: files
            .iter()
            .map(|(path, text)| PolicyFile {
                path: path.display().to_string(),
                text: text.clone(),
            })
            .collect(),
        endpoints,
        dns: Some(DnsSettings {
            upstream: dns.upstream.to_string(),
            reject: match dns.reject {
                RejectCode::Refused => "refused".into(),
                RejectCode::Nxdomain => "nxdomain".into(),
            },
            min_ttl: dns.min_ttl,
            max_ips_per_name: dns.max_ips_per_name as u64,
            max_names_per_endpoint: dns.max_names_per_endpoint as u64,
            idle_grace_s: dns.idle_grace_s,
            max_ttl: dns.max_ttl,
        }),
        datapath: Some(DatapathSettings {
            mode: match state.config.datapath.mode {
                DatapathMode::None => "none".into(),
                DatapathMode::Ebpf => "ebpf".into(),
            },
            bpffs: state.config.datapath.bpffs.display().to_string(),
        }),
    };
    // Past the message limit the snapshot cannot be sent, and the session it opens ends at
    // once, at every reconnect: the dnsproxy goes on with the policy it has. Said plainly,
    // rather than by the session's end alone. (Endpoints are taken all the same: refused,
    // new pods would go unenforced.)
    // The message around it adds its field's tag and length.
    let bytes = prost::Message::encoded_len(&snapshot) + 16;
    if bytes > MAX_MESSAGE_BYTES {
        static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
        if let Some(held_back) = BUDGET.allow() {
            tracing::error!(
                bytes,
                limit = MAX_MESSAGE_BYTES,
                policy_files = snapshot.policies.len(),
                endpoints = snapshot.endpoints.len(),
                held_back,
                "the policy snapshot is larger than a message to warden-dnsproxy: its sessions end at their start and it keeps the policy it has"
            );
        }
    }
    snapshot
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy reading one message in a while and sending batch after batch grew the queue by
    /// a confirmation per batch: confirmations side by side are one, the newest number.
    #[test]
    fn confirmations_side_by_side_are_one() {
        let mut outgoing = Outgoing::default();
        for number in [3, 5, 4] {
            outgoing.confirm(number);
        }
        outgoing.queue.push_back(live("one.live."));
        outgoing.confirm(7);
        let confirms: Vec<Option<u64>> = outgoing
            .queue
            .iter()
            .map(|kind| match kind {
                AgentKind::Received(received) => Some(received.confirm),
                _ => None,
            })
            .collect();
        assert_eq!(confirms, [Some(5), None, Some(7)]);
    }

    /// A clean older than a copy (the copy lacks what it removed) goes before the copy and
    /// takes nothing out of it: an entry answered again since is in the copy, and must stay.
    #[test]
    fn a_copy_goes_after_what_was_queued_before_it() {
        let mut outgoing = Outgoing::default();
        outgoing.queue.push_back(live("one.live."));
        outgoing.queue.push_back(AgentKind::Clean(CacheClean {
            endpoint: None,
            name: Some("again.*".into()),
            made_at_ms: unix_millis(),
        }));
        outgoing.dump = Some(Dump {
            chunks: vec![vec![WireMapping {
                endpoint: "youssef/test".into(),
                name: "again.copy.".into(),
                ..WireMapping::default()
            }]]
            .into_iter(),
            sent: 0,
            resync: false,
            after: outgoing.queue.len(),
            removed: CleanTimes::default(),
        });
        let mut order = Vec::new();
        while outgoing.is_pending() {
            order.extend(names(outgoing.next()));
        }
        assert_eq!(
            order,
            ["one.live.", "clean again.*", "again.copy.", "caught up 1"]
        );
    }

    /// A proxy that said hello and then read nothing (while answering HTTP/2 pings) once held
    /// its session task for ever, reported as connected: the clock runs while something waits
    /// for the proxy, from the last message it took.
    #[tokio::test(start_paused = true)]
    async fn a_proxy_that_takes_nothing_for_the_limit_is_stalled() {
        let mut clock = StallClock::default();
        let start = tokio::time::Instant::now();
        clock.track(false, start);
        let idle = tokio::time::timeout(SEND_TIMEOUT * 3, clock.expired()).await;
        assert!(idle.is_err(), "nothing waiting, never stalled");

        let now = tokio::time::Instant::now();
        clock.track(true, now);
        tokio::time::advance(SEND_TIMEOUT / 2).await;
        clock.taken(tokio::time::Instant::now());
        clock.track(true, tokio::time::Instant::now());
        let taken_at = tokio::time::Instant::now();
        clock.expired().await;
        assert_eq!(
            taken_at.elapsed(),
            SEND_TIMEOUT,
            "from the last message taken"
        );

        clock.track(false, tokio::time::Instant::now());
        let idle = tokio::time::timeout(SEND_TIMEOUT * 3, clock.expired()).await;
        assert!(idle.is_err(), "all taken, the clock stops");
    }

    fn live(name: &str) -> AgentKind {
        AgentKind::Cache(Mappings {
            mappings: vec![WireMapping {
                endpoint: "youssef/test".into(),
                name: name.into(),
                ..WireMapping::default()
            }],
            resync: false,
            confirm: 0,
        })
    }

    fn names(next: Option<Next>) -> Vec<String> {
        match next {
            Some(Next::Message(AgentKind::Cache(batch))) => batch
                .mappings
                .into_iter()
                .map(|mapping| mapping.name)
                .collect(),
            Some(Next::Message(AgentKind::Clean(clean))) => {
                vec![format!("clean {}", clean.name.unwrap_or_default())]
            }
            Some(Next::Message(AgentKind::Snapshot(_))) => vec!["snapshot".into()],
            Some(Next::ResyncDone { sent }) => vec![format!("resync done {sent}")],
            Some(Next::CaughtUp { sent }) => vec![format!("caught up {sent}")],
            Some(Next::Message(_)) => vec!["other".into()],
            None => vec![],
        }
    }

    /// The snapshot first; then the queue and a copy of the cache in turn, neither starving the
    /// other; a clean in order with the live mappings, and taken out of the copy still to go.
    #[test]
    fn outgoing_messages_take_turns_and_a_clean_reaches_the_copy_on_its_way() {
        let chunk = |names: &[&str]| {
            names
                .iter()
                .map(|name| WireMapping {
                    endpoint: "youssef/test".into(),
                    name: (*name).into(),
                    ..WireMapping::default()
                })
                .collect::<Vec<_>>()
        };
        let mut outgoing = Outgoing {
            dump: Some(Dump {
                chunks: vec![
                    chunk(&["a.copy."]),
                    chunk(&["gone.copy."]),
                    chunk(&["b.copy.", "gone.copy."]),
                ]
                .into_iter(),
                sent: 0,
                resync: true,
                after: 0,
                removed: CleanTimes::default(),
            }),
            ..Outgoing::default()
        };
        outgoing.snapshot = Some(PolicySnapshot::default());
        outgoing.queue.push_back(live("one.live."));
        outgoing.queue.push_back(live("gone.live."));
        let gone = CacheFilter {
            endpoint: None,
            name: Some("gone.*".into()),
        };
        let compiled = gone.compile().unwrap();
        let cache = SharedCache::new(warden_fqdn::DnsCache::default());
        outgoing.clean(&CleanFanout::default().record(gone, compiled, &cache));
        outgoing.queue.push_back(live("two.live."));
        assert!(outgoing.has_live());

        let mut order = Vec::new();
        while outgoing.is_pending() {
            order.extend(names(outgoing.next()));
        }
        assert_eq!(
            order,
            [
                "snapshot",
                "a.copy.",
                "one.live.",
                "b.copy.",
                "gone.live.",
                "resync done 2",
                "clean gone.*",
                "two.live.",
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_falls_behind_catches_up_at_once_then_at_most_every_interval() {
        let mut catch_up = CatchUp::default();
        let idle = tokio::time::timeout(Duration::from_secs(3600), catch_up.wait()).await;
        assert!(idle.is_err(), "nothing scheduled, nothing due");

        let start = tokio::time::Instant::now();
        assert_eq!(
            catch_up.fell_behind(start),
            Duration::ZERO,
            "the first at once"
        );
        catch_up.wait().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        catch_up.started(tokio::time::Instant::now());

        tokio::time::advance(Duration::from_secs(3)).await;
        let due = catch_up.fell_behind(tokio::time::Instant::now());
        assert_eq!(due, CATCH_UP_INTERVAL - Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            catch_up.fell_behind(tokio::time::Instant::now()),
            CATCH_UP_INTERVAL - Duration::from_secs(4),
            "a second fall joins the catch-up already scheduled"
        );
        catch_up.wait().await;
        assert_eq!(start.elapsed(), CATCH_UP_INTERVAL);
        catch_up.started(tokio::time::Instant::now());

        tokio::time::advance(CATCH_UP_INTERVAL * 2).await;
        assert_eq!(
            catch_up.fell_behind(tokio::time::Instant::now()),
            Duration::ZERO,
            "long after the last, at once again"
        );
    }

    /// A proxy's session on the agent at `socket` that has said hello and got its snapshot.
    async fn open_session(
        socket: &std::path::Path,
    ) -> (mpsc::Sender<ProxyMessage>, Streaming<AgentMessage>) {
        let mut client = slow_reader(socket).await;
        let (say, said) = mpsc::channel(4);
        let hello = warden_api::proto::Hello {
            instance: "dnsproxy".into(),
            ..Default::default()
        };
        say.send(ProxyMessage {
            kind: Some(ProxyKind::Hello(hello)),
        })
        .await
        .unwrap();
        let mut inbound = client
            .session(ReceiverStream::new(said))
            .await
            .unwrap()
            .into_inner();
        let first = inbound.message().await.unwrap().unwrap();
        assert!(matches!(first.kind, Some(AgentKind::Snapshot(_))));
        (say, inbound)
    }

    /// An agent's socket served from a state of its own, and one proxy session on it that has
    /// said hello and got its snapshot.
    struct Harness {
        _dir: tempfile::TempDir,
        state: ApiState,
        say: mpsc::Sender<ProxyMessage>,
        inbound: Streaming<AgentMessage>,
        shutdown: tokio_util::sync::CancellationToken,
        server: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        /// `local_capacity`: the broadcast of the agent's own mappings (the agent's is 4,096);
        /// `cached`: names in the agent's cache before the session.
        async fn start(local_capacity: usize, cached: usize) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let mut config = AgentConfig::default();
            config.policy.dir = dir.path().join("policies");
            config.state_dir = dir.path().join("state");
            config.socket = dir.path().join("agent.sock");
            config.dns.max_names_per_endpoint = cached + 10_000;
            std::fs::create_dir_all(&config.policy.dir).unwrap();
            let metrics = Metrics::new("agent").unwrap();
            let policy = PolicyStore::open(
                &config.policy.dir,
                &config.state_dir,
                &[],
                None,
                metrics.policy.clone(),
            );
            let cache = SharedCache::new(warden_fqdn::DnsCache::new(warden_enforce::cache_limits(
                &config.dns,
            )));
            let now = warden_proxy::unix_now();
            for i in 0..cached {
                cache.lock().insert(
                    now,
                    "youssef/test",
                    &format!("c{i}.cached.test."),
                    &[IP],
                    300,
                );
            }
            let state = ApiState {
                config: config.clone(),
                policy,
                cache,
                enforcement: Arc::new(Enforcement::new(metrics.clone())),
                metrics,
                flows: Arc::new(FlowLog::new(16)),
                sessions: Arc::new(Sessions::default()),
                local_mappings: broadcast::channel(local_capacity).0,
                cache_changes: Arc::new(CacheChanges::default()),
                cleans: CleanFanout::default(),
            };
            let listener = warden_api::server::bind(&config.socket, None).unwrap();
            let shutdown = tokio_util::sync::CancellationToken::new();
            let server = tokio::spawn(warden_api::server::serve(
                listener,
                tonic::service::Routes::new(service(state.clone())),
                warden_api::server::PeerPolicy::new(&[]),
                Arc::new(|_| {}),
                shutdown.clone(),
            ));

            let (say, inbound) = open_session(&config.socket).await;
            Harness {
                _dir: dir,
                state,
                say,
                inbound,
                shutdown,
                server,
            }
        }

        /// Another proxy's session on the same agent, past its snapshot.
        async fn another_session(&self) -> (mpsc::Sender<ProxyMessage>, Streaming<AgentMessage>) {
            open_session(&self.state.config.socket).await
        }

        /// Reads the session until the names of its cache messages include all of `names`.
        async fn read_until_seen(&mut self, names: &std::collections::BTreeSet<String>) {
            let mut seen = std::collections::BTreeSet::new();
            while !names.is_subset(&seen) {
                let message =
                    tokio::time::timeout(Duration::from_secs(5), self.inbound.message()).await;
                let Ok(Ok(Some(message))) = message else {
                    panic!(
                        "{} of {} names reached the peer, then {message:?}",
                        names.intersection(&seen).count(),
                        names.len()
                    );
                };
                if let Some(AgentKind::Cache(batch)) = message.kind {
                    seen.extend(batch.mappings.into_iter().map(|mapping| mapping.name));
                }
            }
        }

        /// The agent's own proxy answers `name`: into the cache, then to the sessions.
        fn agent_answers(&self, name: &str) {
            let now = unix_millis();
            let inserted =
                self.state
                    .cache
                    .lock()
                    .insert_answered(now, "youssef/test", name, &[IP], 300);
            let _ = self.state.local_mappings.send(Mapping {
                endpoint: Arc::from("youssef/test"),
                name: warden_policy::DnsName::new(name).unwrap(),
                ips: vec![IP],
                ttl: 300,
                expires_at: inserted.expires_at,
                learned_at_ms: now,
                server: "127.0.0.1:53".parse().unwrap(),
            });
        }

        /// The agent's half of a clean, as the admin API makes it before passing it on:
        /// remembered, then the agent's cache cleaned.
        async fn clean_agent_cache(&self, filter: &CacheFilter) -> Clean {
            let compiled = filter.compile().unwrap();
            let clean =
                self.state
                    .cleans
                    .record(filter.clone(), compiled.clone(), &self.state.cache);
            self.state
                .cache
                .clean_learned_before(clean.made_at_ms(), move |endpoint, name| {
                    compiled.matches(endpoint, name)
                })
                .await
                .unwrap();
            clean
        }

        /// The proxy ends its side of the resync and then reads nothing: the agent's copy of
        /// its cache fills what the session's queue and HTTP/2 hold. Returns once the session
        /// has read a first answer of the proxy's, so the copy is made and on its way.
        async fn resync_with_a_reader_that_pauses(&self) {
            let done = ProxyMessage {
                kind: Some(ProxyKind::ResyncDone(warden_api::proto::ResyncDone {
                    entries: 0,
                })),
            };
            self.say.send(done).await.unwrap();
            // Long: the copy is made first, 100,000 names in a debug build on a busy machine.
            self.proxy_answers("probe.example.", Duration::from_secs(30))
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        /// The proxy sends a mapping of its own answers; returns once the agent's cache has
        /// it (the session read it), failing after `limit`.
        async fn proxy_answers(&self, name: &str, limit: Duration) {
            let answer = WireMapping {
                endpoint: "youssef/test".into(),
                name: name.into(),
                ips: vec!["198.18.9.9".into()],
                ttl: 300,
                expires_at: warden_proxy::unix_now().0 + 300,
                server: String::new(),
                kept_by_connections: false,
                learned_at_ms: unix_millis(),
            };
            let message = ProxyMessage {
                kind: Some(ProxyKind::Mappings(Mappings {
                    mappings: vec![answer],
                    resync: false,
                    confirm: 0,
                })),
            };
            self.say.send(message).await.unwrap();
            let deadline = tokio::time::Instant::now() + limit;
            let now = warden_proxy::unix_now();
            while self
                .state
                .cache
                .lock()
                .lookup(now, "youssef/test", name)
                .is_empty()
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the session did not read the proxy's {name}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn stop(self) {
            drop(self.say);
            self.shutdown.cancel();
            self.server.await.unwrap();
        }
    }

    /// A proxy's client whose HTTP/2 windows are the protocol's default 64 KiB rather than
    /// tonic's 2 MiB: a pause in its reading reaches the agent's session sooner.
    async fn slow_reader(
        socket: &std::path::Path,
    ) -> warden_api::proto::agent_client::AgentClient<tonic::transport::Channel> {
        let socket = socket.to_path_buf();
        let channel = tonic::transport::Endpoint::from_static("http://warden-agent.sock")
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .unwrap();
        warden_api::proto::agent_client::AgentClient::new(channel)
            .max_decoding_message_size(warden_api::MAX_MESSAGE_BYTES)
    }

    const IP: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 7, 7));

    /// A session that fell more than its broadcast's capacity behind the agent's own mappings
    /// once dropped the skipped ones until the peer reconnected, leaving the two caches
    /// different: it now sends the whole cache again, so the peer gets every name.
    #[tokio::test]
    async fn a_session_that_falls_behind_still_delivers_every_mapping() {
        const NAMES: usize = 3_000;
        // Far smaller than the agent's 4,096, so that a few thousand names overflow it.
        let mut lab = Harness::start(16, 0).await;

        // The agent's proxy answers names faster than the session forwards them: on this
        // single-threaded runtime the session runs only once they are all out.
        let names: std::collections::BTreeSet<String> =
            (0..NAMES).map(|i| format!("n{i}.churn.test.")).collect();
        for name in &names {
            lab.agent_answers(name);
        }
        lab.read_until_seen(&names).await;
        assert_eq!(
            lab.state.metrics.peer.mappings_skipped.get(),
            (NAMES - 16) as u64,
            "one fall, of what the broadcast dropped"
        );
        lab.stop().await;
    }

    /// A copy of the cache on its way to a proxy slow to take it (a resync's, or a catch-up)
    /// was sent in one go, and the session read nothing from the proxy until it was all out:
    /// the proxy's mappings, for allow entries it had written, waited meanwhile, and the
    /// reconciler could take those entries for unwanted. The copy now goes a message per turn
    /// of the session loop.
    #[tokio::test]
    async fn a_copy_of_the_cache_on_its_way_does_not_stop_the_session_reading_the_proxy() {
        // Well over what the session's queue (64 messages of 1,024) and HTTP/2 hold.
        const CACHED: usize = 100_000;
        let mut lab = Harness::start(4096, CACHED).await;
        lab.resync_with_a_reader_that_pauses().await;
        // The agent's own proxy goes on answering: a live mapping once waited in place for
        // room, and the session then read nothing from the proxy either.
        for i in 0..100 {
            lab.agent_answers(&format!("l{i}.live.test."));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        lab.proxy_answers("proxy.example.", Duration::from_secs(3))
            .await;
        // And the copy arrives whole, with the live mappings, then the end of the resync.
        let names = (0..CACHED)
            .map(|i| format!("c{i}.cached.test."))
            .chain((0..100).map(|i| format!("l{i}.live.test.")))
            .collect();
        lab.read_until_seen(&names).await;
        let resync_done = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let message = lab.inbound.message().await.unwrap().unwrap();
                if let Some(AgentKind::ResyncDone(done)) = message.kind {
                    return done.entries;
                }
            }
        });
        assert!(resync_done.await.expect("no ResyncDone") >= CACHED as u64);
        lab.stop().await;
    }

    /// A clean broadcast while a live batch waited for room went into the queue ahead of the
    /// agent's answers still in the broadcast, though they came before it: sent after the
    /// clean, they brought back on the proxy what the agent had removed.
    #[tokio::test]
    async fn a_clean_goes_after_the_answers_that_came_before_it() {
        const CACHED: usize = 100_000;
        let mut lab = Harness::start(4096, CACHED).await;
        lab.resync_with_a_reader_that_pauses().await;
        // One answer waits in the session's queue as a live batch.
        lab.agent_answers("x.kept.test.");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // More answers, which wait in the broadcast behind it, then a clean of them.
        for i in 0..10 {
            lab.agent_answers(&format!("y{i}.gone.test."));
        }
        // A clean takes what was answered before it, to the millisecond.
        tokio::time::sleep(Duration::from_millis(5)).await;
        // As the admin API cleans: the agent's cache, then the sessions.
        let filter = CacheFilter {
            endpoint: None,
            name: Some("*.gone.test".into()),
        };
        let clean = lab.clean_agent_cache(&filter).await;
        lab.state.cleans.send(&clean);
        // An answer after the clean: the proxy must end with it.
        lab.agent_answers("y0.gone.test.");

        // What the proxy ends with, applying the messages in order as it does.
        let mut held = std::collections::BTreeSet::new();
        let (mut cleaned, mut resynced) = (false, false);
        while !(cleaned && resynced && held.contains("x.kept.test.")) {
            let message = tokio::time::timeout(Duration::from_secs(10), lab.inbound.message())
                .await
                .expect("the session went quiet")
                .unwrap()
                .unwrap();
            match message.kind {
                Some(AgentKind::Cache(batch)) => {
                    held.extend(batch.mappings.into_iter().map(|mapping| mapping.name));
                }
                Some(AgentKind::Clean(_)) => {
                    held.retain(|name| !name.ends_with(".gone.test."));
                    cleaned = true;
                }
                Some(AgentKind::ResyncDone(_)) => resynced = true,
                _ => {}
            }
        }
        // Anything still on its way comes within a moment.
        while let Ok(Ok(Some(message))) =
            tokio::time::timeout(Duration::from_millis(300), lab.inbound.message()).await
        {
            if let Some(AgentKind::Cache(batch)) = message.kind {
                held.extend(batch.mappings.into_iter().map(|mapping| mapping.name));
            }
        }
        let back: Vec<_> = held.iter().filter(|name| name.contains(".gone.")).collect();
        assert_eq!(
            back,
            ["y0.gone.test."],
            "cleaned names brought back, or a later answer lost"
        );
        lab.stop().await;
    }

    /// A proxy away when a clean was made held what it removed and handed it back at its next
    /// resync, which brought it back into the agent's cache. The clean now reaches the next
    /// session before anything else of the agent's, and what the proxy sends of what it removed
    /// (answered before it) is dropped; what was answered since, or at a time not known, stays.
    #[tokio::test]
    async fn a_clean_made_while_the_proxy_was_away_reaches_its_next_session() {
        let lab = Harness::start(4096, 0).await;
        let filter = CacheFilter {
            endpoint: None,
            name: Some("*.gone.test".into()),
        };
        let clean = lab.clean_agent_cache(&filter).await;
        lab.state.cleans.send(&clean);

        let (say, mut inbound) = lab.another_session().await;
        let first = tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Some(AgentKind::Clean(sent)) = first.kind else {
            panic!("the session began with {first:?}, not the clean");
        };
        assert_eq!(sent.name.as_deref(), Some("*.gone.test"));
        // Read off the monotonic clock too: within two milliseconds (each clock's reading is
        // cut to the millisecond).
        assert!(
            (clean.made.recorded_ms() - 2..=clean.made.recorded_ms()).contains(&sent.made_at_ms),
            "{} for {}",
            sent.made_at_ms,
            clean.made.recorded_ms()
        );

        let answered = |name: &str, learned_at_ms: u64| WireMapping {
            endpoint: "youssef/test".into(),
            name: name.into(),
            ips: vec!["198.18.9.9".into()],
            ttl: 300,
            expires_at: warden_proxy::unix_now().0 + 300,
            learned_at_ms,
            ..WireMapping::default()
        };
        let replay = vec![
            answered("before.gone.test.", clean.made.recorded_ms() - 10),
            answered("since.gone.test.", clean.made.recorded_ms()),
            answered("unknown.gone.test.", 0),
            answered("before.kept.test.", clean.made.recorded_ms() - 10),
        ];
        for kind in [
            ProxyKind::Mappings(Mappings {
                mappings: replay,
                resync: true,
                confirm: 0,
            }),
            ProxyKind::ResyncDone(ResyncDone { entries: 4 }),
        ] {
            say.send(ProxyMessage { kind: Some(kind) }).await.unwrap();
        }
        // The agent's ResyncDone comes after it read everything sent before the proxy's.
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), inbound.message())
                .await
                .unwrap()
                .unwrap()
                .expect("the session ended");
            if matches!(message.kind, Some(AgentKind::ResyncDone(_))) {
                break;
            }
        }
        let now = warden_proxy::unix_now();
        let held: Vec<String> = lab
            .state
            .cache
            .lock()
            .entries(now)
            .into_iter()
            .map(|entry| entry.name)
            .collect();
        assert_eq!(
            held,
            [
                "before.kept.test.",
                "since.gone.test.",
                "unknown.gone.test."
            ]
        );
        assert_eq!(lab.state.metrics.peer.mappings_cleaned.get(), 1);
        drop(say);
        lab.stop().await;
    }

    /// Mappings a proxy sent from its journal during a live session left the journal's file at
    /// once: the agent now says when it took them, in order with what it sends.
    #[tokio::test]
    async fn the_agent_confirms_what_a_proxy_sent_from_its_journal() {
        let mut lab = Harness::start(4096, 0).await;
        let sent = WireMapping {
            endpoint: "youssef/test".into(),
            name: "journaled.test.".into(),
            ips: vec!["198.18.9.9".into()],
            expires_at: warden_proxy::unix_now().0 + 300,
            learned_at_ms: unix_millis(),
            ..WireMapping::default()
        };
        lab.say
            .send(ProxyMessage {
                kind: Some(ProxyKind::Mappings(Mappings {
                    mappings: vec![sent],
                    resync: false,
                    confirm: 7,
                })),
            })
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), lab.inbound.message())
                .await
                .expect("no confirmation")
                .unwrap()
                .expect("the session ended");
            if let Some(AgentKind::Received(received)) = message.kind {
                assert_eq!(received.confirm, 7);
                break;
            }
        }
        let now = warden_proxy::unix_now();
        let held = lab
            .state
            .cache
            .lock()
            .lookup(now, "youssef/test", "journaled.test.");
        assert_eq!(held.len(), 1, "confirmed before it was in the cache");
        lab.stop().await;
    }

    /// The cleans remembered: the latest of each filter (a name without case or final dot),
    /// at most [`CLEANS_REMEMBERED`], and none before a clean of everything.
    #[test]
    fn cleans_are_remembered_once_per_filter_and_boundedly() {
        let fanout = CleanFanout::default();
        let cache = SharedCache::new(warden_fqdn::DnsCache::default());
        let record = |name: Option<&str>| {
            let filter = CacheFilter {
                endpoint: None,
                name: name.map(str::to_owned),
            };
            let compiled = filter.compile().unwrap();
            fanout.record(filter, compiled, &cache)
        };
        record(Some("a.test"));
        record(Some("b.test"));
        let again = record(Some("A.test."));
        let (_, remembered) = fanout.subscribe();
        let names: Vec<_> = remembered
            .iter()
            .map(|clean| (clean.filter.name.clone().unwrap(), clean.made.recorded_ms()))
            .collect();
        assert_eq!(
            names,
            [
                ("b.test".to_owned(), names[0].1),
                ("A.test.".to_owned(), again.made.recorded_ms())
            ]
        );
        for i in 0..CLEANS_REMEMBERED {
            record(Some(&format!("n{i}.test")));
        }
        let (_, remembered) = fanout.subscribe();
        assert_eq!(remembered.len(), CLEANS_REMEMBERED);
        assert_eq!(remembered[0].filter.name.as_deref(), Some("n0.test"));
        record(None);
        let (_, remembered) = fanout.subscribe();
        assert_eq!(
            remembered.len(),
            1,
            "a clean of everything covers the others"
        );
    }

    /// The cleans a batch of mappings is checked against are read again once a clean was
    /// remembered since (what `absorb` does for each address, under the cache's lock where
    /// cleans are remembered): a clean remembered during a merge, whose walk of the cache may
    /// already have passed where a mapping lands, still drops what it removes.
    #[test]
    fn a_clean_remembered_during_a_merge_still_drops_what_it_removes() {
        let fanout = CleanFanout::default();
        let cache = SharedCache::new(warden_fqdn::DnsCache::default());
        let mut check = fanout.check();
        let filter = CacheFilter {
            endpoint: None,
            name: Some("gone.test".into()),
        };
        let compiled = filter.compile().unwrap();
        let clean = fanout.record(filter, compiled, &cache);
        let answered = PeerMapping {
            endpoint: "youssef/test".into(),
            name: warden_policy::DnsName::new("gone.test").unwrap(),
            ips: Vec::new(),
            expires_at: warden_fqdn::UnixTime(0),
            source: warden_fqdn::Source::Lookup,
            learned_at_ms: clean.made.recorded_ms() - 10,
        };
        assert!(
            !check.removes_from_proxy(&answered),
            "read before the clean"
        );
        fanout.refresh(&mut check);
        assert!(check.removes_from_proxy(&answered));
    }

    /// The cleans remembered are kept in `state_dir` and come back with a restarted agent: a
    /// proxy away across the restart still holds what they removed. A file that does not
    /// parse is set aside, and the agent starts without; a write that fails is counted.
    #[tokio::test]
    async fn cleans_are_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let metrics = Metrics::new("agent").unwrap();
        let open = |state_dir: &std::path::Path| {
            CleanFanout::open(state_dir, metrics.peer.state_persist_errors.clone())
        };
        let cache = SharedCache::new(warden_fqdn::DnsCache::default());
        let filter = CacheFilter {
            endpoint: Some("youssef/test".into()),
            name: Some("*.gone.test".into()),
        };
        let fanout = open(&state_dir);
        let clean = fanout.record(filter.clone(), filter.compile().unwrap(), &cache);
        fanout.save().await;
        let (_, remembered) = open(&state_dir).subscribe();
        let kept: Vec<_> = remembered
            .iter()
            .map(|clean| {
                (
                    clean.filter.endpoint.clone(),
                    clean.filter.name.clone(),
                    clean.made.recorded_ms(),
                )
            })
            .collect();
        assert_eq!(
            kept,
            [(
                filter.endpoint.clone(),
                filter.name.clone(),
                clean.made.recorded_ms()
            )]
        );
        // The restarted agent leaves out of its restored cache what the clean removed (the
        // cache's file may not have been written since).
        let removes = open(&state_dir).removes_restored();
        let entry = |name: &str, learned_at_ms: u64| warden_fqdn::CacheEntry {
            endpoint: "youssef/test".into(),
            name: name.into(),
            ips: Vec::new(),
            learned_at_ms,
        };
        let made_ms = clean.made_at_ms();
        assert!(removes(&entry("www.gone.test.", made_ms - 1)));
        assert!(removes(&entry("www.gone.test.", 0)), "a time not known");
        assert!(
            !removes(&entry("www.gone.test.", made_ms)),
            "answered since"
        );
        assert!(!removes(&entry("www.kept.test.", made_ms - 1)));

        std::fs::write(state_dir.join(CLEANS_FILE), b"not json").unwrap();
        let (_, remembered) = open(&state_dir).subscribe();
        assert!(remembered.is_empty());
        assert!(state_dir.join("cache-cleans.json.corrupt").exists());

        // A state_dir that cannot be made: a file stands in its way.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, b"").unwrap();
        let fanout = open(&blocked.join("state"));
        fanout.record(filter.clone(), filter.compile().unwrap(), &cache);
        fanout.save().await;
        let failures = metrics
            .peer
            .state_persist_errors
            .with_label_values(&["cache_cleans"])
            .get();
        assert_eq!(failures, 1);
    }

    /// An answer of the agent's given before a clean can be broadcast after it (the datapath
    /// hold comes between): sent on, it gave the proxy back what the clean removed.
    #[test]
    fn the_agents_answers_from_before_a_clean_do_not_cross_after_it() {
        let fanout = CleanFanout::default();
        let cache = SharedCache::new(warden_fqdn::DnsCache::default());
        let filter = CacheFilter {
            endpoint: None,
            name: Some("*.gone.test".into()),
        };
        let compiled = filter.compile().unwrap();
        let clean = fanout.record(filter, compiled, &cache);
        let answer = |name: &str, learned_at_ms: u64| WireMapping {
            endpoint: "youssef/test".into(),
            name: name.into(),
            learned_at_ms,
            ..WireMapping::default()
        };
        let batch = |mappings| {
            AgentKind::Cache(Mappings {
                mappings,
                resync: false,
                confirm: 0,
            })
        };
        let check = fanout.check();
        let kept = check.keep_live(batch(vec![
            answer("before.gone.test.", clean.made.recorded_ms() - 10),
            answer("since.gone.test.", clean.made.recorded_ms() + 10),
            answer("before.kept.test.", clean.made.recorded_ms() - 10),
        ]));
        let Some(AgentKind::Cache(kept)) = kept else {
            panic!("{kept:?}");
        };
        let names: Vec<&str> = kept.mappings.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["since.gone.test.", "before.kept.test."]);
        let none = check.keep_live(batch(vec![answer(
            "before.gone.test.",
            clean.made.recorded_ms() - 10,
        )]));
        assert!(none.is_none(), "{none:?}");
    }

    /// A clean is placed on the wall clock as it reads now: should it have stepped back since
    /// the clean (by more than the time since), answers given after the step would read as
    /// older than the clean, and a proxy's be dropped and their allow entries revoked.
    #[test]
    fn a_clean_is_never_later_than_the_wall_clock_reads_now() {
        let filter = CacheFilter::default();
        let now_ms = unix_millis();
        let clean = Clean {
            compiled: filter.compile().unwrap(),
            filter,
            // Made before the wall clock stepped back a minute.
            made: WallMoment::at(now_ms + 60_000),
        };
        assert!(
            clean.made_at_ms() <= unix_millis(),
            "{}",
            clean.made_at_ms()
        );
        assert!(clean.made_at_ms() >= now_ms);
    }

    /// Cleans reached the sessions through a broadcast of 64: those a busy session missed were
    /// lost, and the proxy kept the names they removed.
    #[tokio::test]
    async fn cleans_made_while_a_session_is_busy_all_reach_the_proxy() {
        /// What the proxy holds, applying the session's messages in order as it does.
        #[derive(Default)]
        struct Proxy {
            held: std::collections::BTreeSet<String>,
            cleans: usize,
        }
        impl Proxy {
            fn take(&mut self, message: AgentMessage) {
                match message.kind {
                    Some(AgentKind::Cache(batch)) => {
                        self.held
                            .extend(batch.mappings.into_iter().map(|mapping| mapping.name));
                    }
                    Some(AgentKind::Clean(clean)) => {
                        let filter = CacheFilter {
                            endpoint: clean.endpoint,
                            name: clean.name,
                        }
                        .compile()
                        .unwrap();
                        self.held
                            .retain(|name| !filter.matches("youssef/test", name));
                        self.cleans += 1;
                    }
                    _ => {}
                }
            }
        }
        async fn next(lab: &mut Harness, limit: Duration) -> Option<AgentMessage> {
            match tokio::time::timeout(limit, lab.inbound.message()).await {
                Ok(message) => Some(message.unwrap().expect("the session ended")),
                Err(_) => None,
            }
        }

        let mut lab = Harness::start(4096, 10).await;
        let gone: Vec<String> = (0..6).map(|i| format!("n{i}.gone.test.")).collect();
        for name in gone.iter().chain(["x.kept.test.".to_owned()].iter()) {
            lab.agent_answers(name);
        }
        let mut proxy = Proxy::default();
        while !gone.iter().all(|name| proxy.held.contains(name)) {
            let message = next(&mut lab, Duration::from_secs(5));
            proxy.take(message.await.expect("the session went quiet"));
        }
        // A hundred cleans as the admin API makes them, six of names held and then others,
        // sent with no await between them: the session, on this thread, gets to them only
        // once all are made (a broadcast of 64 dropped the first 36).
        let filters: Vec<CacheFilter> = gone
            .iter()
            .map(|name| name.trim_end_matches('.').to_owned())
            .chain((0..94).map(|i| format!("other{i}.test")))
            .map(|name| CacheFilter {
                endpoint: None,
                name: Some(name),
            })
            .collect();
        // A clean takes what was answered before it, to the millisecond.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut cleans = Vec::new();
        for filter in &filters {
            cleans.push(lab.clean_agent_cache(filter).await);
        }
        for clean in &cleans {
            lab.state.cleans.send(clean);
        }
        while proxy.cleans < filters.len() {
            let message = next(&mut lab, Duration::from_secs(30));
            proxy.take(message.await.expect("the session went quiet"));
        }
        while let Some(message) = next(&mut lab, Duration::from_millis(300)).await {
            proxy.take(message);
        }
        let left: Vec<_> = proxy
            .held
            .iter()
            .filter(|name| name.contains(".gone."))
            .collect();
        assert!(left.is_empty(), "the proxy kept cleaned names: {left:?}");
        assert!(
            proxy.held.contains("x.kept.test."),
            "the proxy lost a name not cleaned"
        );
        lab.stop().await;
    }

    /// Each `ResyncDone` costs a copy of the whole cache, and the proxy sends one per
    /// session: a second is refused, not copied again.
    #[tokio::test]
    async fn a_second_resync_done_ends_the_session() {
        let mut lab = Harness::start(16, 10).await;
        for _ in 0..2 {
            let done = ProxyMessage {
                kind: Some(ProxyKind::ResyncDone(warden_api::proto::ResyncDone {
                    entries: 0,
                })),
            };
            lab.say.send(done).await.unwrap();
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match lab.inbound.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return "closed".to_owned(),
                    Err(status) => return status.message().to_owned(),
                }
            }
        })
        .await
        .expect("the session went on");
        assert!(ended.contains("a second ResyncDone"), "{ended}");
        assert_eq!(
            lab.state
                .metrics
                .peer
                .rejected
                .with_label_values(&["protocol"])
                .get(),
            1
        );
        lab.stop().await;
    }

    /// A dnsproxy session that said hello at `started`, its resync finished or not.
    fn session_info(started: Instant, resynced: bool) -> SessionInfo {
        SessionInfo {
            instance: "dnsproxy".into(),
            pid: 1,
            serving: true,
            acked_revision: 1,
            last_resync_ms: resynced.then_some(5),
            last_resync_at_ms: resynced.then_some(1),
            started,
        }
    }

    #[test]
    fn only_a_recent_unfinished_resync_holds_revocations_back() {
        let sessions = Sessions::default();
        let info = session_info;
        assert!(!sessions.any_resyncing());
        sessions.live().insert(1, info(Instant::now(), true));
        assert!(!sessions.any_resyncing(), "resynced");
        let long_ago = Instant::now()
            .checked_sub(RESYNC_GRACE + Duration::from_secs(1))
            .unwrap();
        sessions.live().insert(2, info(long_ago, false));
        assert!(
            !sessions.any_resyncing(),
            "a resync that never ends stops counting"
        );
        sessions.live().insert(3, info(Instant::now(), false));
        assert!(sessions.any_resyncing());
    }

    /// A proxy whose sessions each failed before their resync finished, reconnecting within
    /// the grace, held the revocation of a removed rule's entries back for good: each new
    /// session started the grace again.
    #[test]
    fn sessions_failing_again_and_again_hold_revocations_back_for_a_while_only() {
        let sessions = Sessions::default();
        let unfinished = |started: Instant| session_info(started, false);
        let first = Instant::now()
            .checked_sub(RESYNC_GRACE_TOTAL + Duration::from_secs(1))
            .unwrap();
        sessions.live().insert(1, unfinished(first));
        assert!(!sessions.any_resyncing(), "its grace is long over");
        // It fails, and the next session of the same proxy starts.
        sessions.live().remove(&1);
        sessions.live().insert(2, unfinished(Instant::now()));
        assert!(
            !sessions.any_resyncing(),
            "a new session of a proxy that never finishes restarted the grace"
        );
        // A resync that finishes gives the next one a grace of its own.
        sessions.resync_finished();
        assert!(sessions.any_resyncing());
        // And so does a quiet stretch without any unfinished session (the proxy gone for a
        // while, a new one connecting).
        sessions.live().clear();
        sessions.unfinished.lock().unwrap().since.replace(first);
        assert!(!sessions.any_resyncing());
        sessions.unfinished.lock().unwrap().last_seen =
            Instant::now().checked_sub(RESYNC_QUIET + Duration::from_secs(1));
        assert!(!sessions.any_resyncing());
        sessions.live().insert(3, unfinished(Instant::now()));
        assert!(sessions.any_resyncing(), "after a quiet stretch");
    }

    /// A session that broke off its resync (the proxy killed during its replay, a keepalive
    /// lost) left the grace at once: the next pass revoked the entries whose mappings the
    /// proxy still had, cutting connections until it reconnected and replayed them.
    #[test]
    fn a_session_that_broke_off_its_resync_holds_revocations_until_the_next_one() {
        let sessions = Sessions::default();
        sessions
            .live()
            .insert(1, session_info(Instant::now(), false));
        sessions.ended(1);
        assert!(sessions.any_resyncing(), "the proxy reconnects to replay");
        sessions.unfinished.lock().unwrap().last_seen =
            Instant::now().checked_sub(RESYNC_RECONNECT + Duration::from_secs(1));
        assert!(!sessions.any_resyncing(), "it did not come back");

        // A session that had finished its resync leaves nothing on its way.
        let sessions = Sessions::default();
        sessions
            .live()
            .insert(1, session_info(Instant::now(), true));
        sessions.ended(1);
        assert!(!sessions.any_resyncing());
    }
}
