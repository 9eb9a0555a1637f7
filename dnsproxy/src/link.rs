//! The session with the agent: connect (with backoff), say hello, replay the journal, then
//! take snapshots and cache updates in and send mappings and flows out. While there is no
//! session the proxy is offline: it keeps serving from its snapshot and journals mappings.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warden_api::MAPPINGS_PER_MESSAGE;
use warden_api::proto::agent_message::Kind as AgentKind;
use warden_api::proto::proxy_message::Kind as ProxyKind;
use warden_api::proto::{
    Ack, CacheClean, Flows, Hello, Mapping as WireMapping, Mappings, PolicySnapshot, ProxyMessage,
    ResyncDone, Serving,
};
use warden_proxy::{Mapping, MappingObserver, SharedCache};
use warden_telemetry::{CacheFilter, FlowEvent, FlowLog, Metrics, WallMoment, unix_millis};

use crate::journal::Journal;

/// Reconnection backoff: quick at first (an agent restart takes about a second), capped so a
/// returning agent is found within this. Only a session that got as far as the agent's
/// resync resets it: one that fails every time (a snapshot the proxy cannot take, an agent
/// that refuses it) would otherwise resend the journal and the whole cache ten times a second.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The cap after a session that connected and ended before the agent's resync: each costs a
/// copy of the journal and the whole cache, and one that fails every time (an agent of another
/// version refusing it, say) would otherwise cost that every second. Well under the agent's
/// 10 s startup grace: an agent that restarted during resyncs, healthy again, must have the
/// proxy's mappings before its reconciler takes the proxy's allow entries for unwanted. An
/// agent not reachable at all is still looked for every second.
const FAILED_SESSION_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The wait before the next attempt, after waiting `current`.
fn next_backoff(current: Duration, session_failed: bool) -> Duration {
    let cap = if session_failed {
        FAILED_SESSION_BACKOFF_MAX
    } else {
        BACKOFF_MAX
    };
    (current * 2).min(cap)
}

/// Applies a snapshot from the agent; returns the number of its installs so far (see
/// [`LinkContext::snapshot_settled`]) or an error text when it was rejected.
pub type SnapshotSink = Arc<dyn Fn(&PolicySnapshot) -> Result<u64, String> + Send + Sync>;

/// The outgoing half of the current session, if any: the hot path's mappings go through it.
#[derive(Debug, Default)]
pub struct Link {
    outbound: Mutex<Option<mpsc::Sender<ProxyMessage>>>,
    connected: AtomicBool,
    last_resync_at_ms: AtomicU64,
    last_resync_ms: AtomicU64,
    applied_cleans: Mutex<AppliedCleans>,
}

/// How many of the cleans it applied a proxy remembers: four times what the agent hands a
/// session.
const APPLIED_CLEANS_REMEMBERED: usize = 1024;

/// A clean by its filter and time.
type CleanKey = (Option<String>, Option<String>, u64);

/// The cleans this process applied. The agent hands every new session those it remembers (up
/// to 256), and one applied before has nothing left to remove: what the cache and journal
/// took in since was answered after it, or came from the agent, which holds to it. Applied
/// again it would cost walks of both, for each of them, at every session's start.
#[derive(Debug, Default)]
struct AppliedCleans {
    order: std::collections::VecDeque<CleanKey>,
    known: std::collections::HashSet<CleanKey>,
}

impl Link {
    fn applied_cleans(&self) -> std::sync::MutexGuard<'_, AppliedCleans> {
        self.applied_cleans
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Whether this process applied `clean` already.
    fn applied_before(&self, clean: &CleanKey) -> bool {
        self.applied_cleans().known.contains(clean)
    }

    /// `clean` is applied: the oldest remembered goes past [`APPLIED_CLEANS_REMEMBERED`].
    fn remember_applied(&self, clean: CleanKey) {
        let mut applied = self.applied_cleans();
        if applied.known.insert(clean.clone()) {
            applied.order.push_back(clean);
        }
        while applied.order.len() > APPLIED_CLEANS_REMEMBERED {
            if let Some(oldest) = applied.order.pop_front() {
                applied.known.remove(&oldest);
            }
        }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// (when, how long) of the last completed resync.
    pub fn last_resync(&self) -> Option<(u64, u64)> {
        let at = self.last_resync_at_ms.load(Ordering::Relaxed);
        (at > 0).then(|| (at, self.last_resync_ms.load(Ordering::Relaxed)))
    }

    /// Tells the agent whether this proxy serves the DNS port (its `/v1/status` lists the
    /// port's holders). Best effort: a full channel or no session drops it, and the next
    /// session's hello says it again.
    pub fn tell_serving(&self, serving: bool) {
        if let Some(sender) = self.sender() {
            let _ = sender.try_send(ProxyMessage {
                kind: Some(ProxyKind::Serving(Serving { serving })),
            });
        }
    }

    fn sender(&self) -> Option<mpsc::Sender<ProxyMessage>> {
        self.outbound
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    fn set(&self, sender: Option<mpsc::Sender<ProxyMessage>>) {
        self.connected.store(sender.is_some(), Ordering::Relaxed);
        *self
            .outbound
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = sender;
    }
}

/// The engine's mapping observer. Every mapping goes through the journal, connected or not:
/// a live session sends it from there at once, numbered, and the journal's file keeps it
/// until the agent confirms it. Sent straight on the session's channel, a mapping the agent
/// had not taken yet (slow to read) was lost with a proxy killed meanwhile, and the agent
/// then revoked its allow entries, still in use, as unwanted. Never waits.
#[derive(Debug)]
pub struct LinkMappings {
    pub journal: Arc<Journal>,
}

impl MappingObserver for LinkMappings {
    fn on_mapping(&self, mapping: Mapping) {
        self.journal.push(WireMapping::from(&mapping));
    }
}

/// Everything a session needs.
#[derive(Clone)]
pub struct LinkContext {
    pub socket: PathBuf,
    pub link: Arc<Link>,
    pub journal: Arc<Journal>,
    pub cache: SharedCache,
    pub metrics: Metrics,
    pub flows: Arc<FlowLog>,
    pub apply_snapshot: SnapshotSink,
    /// The revision in force now, for the hello.
    pub revision: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// The number of the last install whose save to `state_dir` was tried (or skipped while
    /// the disk refused the last write): a revision is acknowledged once in force and its save
    /// tried, so what the agent sees acknowledged is what a restarted proxy enforces, unless
    /// writes fail (counted and logged).
    pub snapshot_settled: tokio::sync::watch::Receiver<u64>,
    pub serving: Arc<AtomicBool>,
}

impl std::fmt::Debug for LinkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkContext")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// Keeps a session with the agent until `shutdown`, which the proxy signals once it has left
/// the DNS port and answered what it held: the session then closes gracefully (see
/// [`close`]), within [`CLOSE_LIMIT`].
pub async fn run(context: LinkContext, shutdown: CancellationToken) {
    let mut backoff = BACKOFF_FIRST;
    context.metrics.peer.offline.set(1);
    loop {
        let client = tokio::select! {
            _ = shutdown.cancelled() => return,
            client = warden_api::client::connect(&context.socket) => client,
        };
        let mut session_failed = false;
        match client {
            Ok(client) => {
                let mut resynced = false;
                let ended = tokio::select! {
                    ended = session(&context, client, &shutdown, &mut resynced) => ended,
                    () = over_time(&shutdown) => "shutting down: the agent did not take the last messages in time".to_owned(),
                };
                if resynced {
                    backoff = BACKOFF_FIRST;
                } else {
                    session_failed = true;
                }
                // What the replay took, and what the session sent from the journal, wait for
                // the next session if the agent did not say it has them (its ResyncDone, its
                // Received): the next numbers its batches from 1 again.
                context.journal.session_ended();
                context.link.set(None);
                context.metrics.peer.connected.set(0);
                context.metrics.peer.offline.set(1);
                if shutdown.is_cancelled() {
                    tracing::info!(reason = ended, "agent session closed");
                    return;
                }
                tracing::warn!(
                    reason = ended,
                    retry_in_ms = backoff.as_millis(),
                    "agent session ended; serving offline from the last snapshot"
                );
            }
            Err(error) => {
                tracing::debug!(%error, "agent not reachable");
                // Looked for every second, however long the failed sessions before made it.
                backoff = backoff.min(BACKOFF_MAX);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = next_backoff(backoff, session_failed);
    }
}

/// The session's outbound stream. The engine hands over one live mapping per answer that
/// changed the cache; those waiting together in the channel leave as one message (up to
/// `MAPPINGS_PER_MESSAGE` and `BATCH_BYTES`), so that under load the agent gets a message per
/// burst rather than per answer.
struct Coalescing {
    receiver: mpsc::Receiver<ProxyMessage>,
    /// A message read while gathering mappings that is not one: it goes next.
    held: Option<ProxyMessage>,
}

impl Coalescing {
    fn new(receiver: mpsc::Receiver<ProxyMessage>) -> Coalescing {
        Coalescing {
            receiver,
            held: None,
        }
    }
}

/// The mappings of a live (not resync) mappings message.
fn live_mappings(message: &mut ProxyMessage) -> Option<&mut Mappings> {
    match &mut message.kind {
        Some(ProxyKind::Mappings(batch)) if !batch.resync => Some(batch),
        _ => None,
    }
}

impl tokio_stream::Stream for Coalescing {
    type Item = ProxyMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ProxyMessage>> {
        let this = &mut *self;
        let mut first = match this.held.take() {
            Some(message) => message,
            None => match this.receiver.poll_recv(cx) {
                Poll::Ready(Some(message)) => message,
                other => return other,
            },
        };
        if let Some(batch) = live_mappings(&mut first) {
            let mut bytes: usize = batch.mappings.iter().map(warden_api::mapping_bytes).sum();
            while batch.mappings.len() < MAPPINGS_PER_MESSAGE {
                let Ok(mut next) = this.receiver.try_recv() else {
                    break;
                };
                let joined = match live_mappings(&mut next) {
                    Some(more) => {
                        let more_bytes: usize =
                            more.mappings.iter().map(warden_api::mapping_bytes).sum();
                        let fits = bytes + more_bytes <= warden_api::BATCH_BYTES;
                        if fits {
                            bytes += more_bytes;
                            batch.mappings.append(&mut more.mappings);
                            // Confirmations are cumulative: the later number covers both.
                            batch.confirm = batch.confirm.max(more.confirm);
                        }
                        fits
                    }
                    None => false,
                };
                if !joined {
                    this.held = Some(next);
                    break;
                }
            }
        }
        Poll::Ready(Some(first))
    }
}

/// Aborts a task when dropped. A session is dropped unfinished when shutdown runs over time,
/// and its replay must not go on taking from the journal once `run` has put back what it took.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a closing session may take to hand its last messages over to the agent.
const CLOSE_LIMIT: Duration = Duration::from_secs(1);

/// Ready [`CLOSE_LIMIT`] after `shutdown`.
async fn over_time(shutdown: &CancellationToken) {
    shutdown.cancelled().await;
    tokio::time::sleep(CLOSE_LIMIT).await;
}

/// One session, until it ends (the reason is returned); `resynced` is set once the agent
/// has sent its side of the resync.
async fn session(
    context: &LinkContext,
    mut client: warden_api::proto::agent_client::AgentClient<tonic::transport::Channel>,
    shutdown: &CancellationToken,
    resynced: &mut bool,
) -> String {
    let started = Instant::now();
    // When the replay copied the cache for the agent: see apply_clean.
    let copied = Arc::new(CopiedAt::default());
    let (outbound, stream) = mpsc::channel::<ProxyMessage>(1024);
    let journaled = context.journal.take_for_replay();
    let hello = ProxyMessage {
        kind: Some(ProxyKind::Hello(Hello {
            instance: "dnsproxy".into(),
            pid: std::process::id(),
            revision: (context.revision)(),
            serving: context.serving.load(Ordering::Relaxed),
            journal: journaled.len() as u64,
        })),
    };
    if outbound.send(hello).await.is_err() {
        return "could not say hello".into();
    }
    let response = match client.session(Coalescing::new(stream)).await {
        Ok(response) => response,
        Err(status) => return format!("session refused: {status}"),
    };
    let mut inbound = response.into_inner();
    // The replay runs beside the reading, not before it: the agent sends too (its snapshot,
    // its own live mappings) and waits for room to do so inside the loop that reads this side,
    // so a proxy reading nothing until a long replay was queued could stall them both.
    let replay_stop = CancellationToken::new();
    let mut replay = tokio::spawn(replay(
        context.clone(),
        outbound.clone(),
        journaled,
        Arc::clone(&copied),
        replay_stop.clone(),
    ));
    let _replay_ends_with_the_session = AbortOnDrop(replay.abort_handle());
    let mut replay_done = false;

    let last_flows = CancellationToken::new();
    let forwarder = tokio::spawn(forward_flows(
        context.flows.clone(),
        outbound.clone(),
        context.metrics.peer.flows_dropped.clone(),
        last_flows.clone(),
    ));
    // The revision applied and not yet acknowledged, with its install number. Acks wait for
    // its save and for room on the outbound channel beside the reading, not in its way:
    // awaited inline, a full channel (the agent busy sending) stopped this loop from reading,
    // which could stop the agent's sends too.
    let mut unacked: Option<(u64, u64)> = None;
    // The number of the last journal batch sent live (see `Journal::take_to_send`).
    let mut sent_number = 0;
    let mut settled = context.snapshot_settled.clone();
    let ended = loop {
        // Mappings journaled while the session is up (the channel was full: the agent is
        // slow to read) follow as soon as there is room, not at the next session: until the
        // agent has them its reconciler takes their allow entries for unwanted.
        let journaled = replay_done && !context.journal.is_empty();
        let message = tokio::select! {
            biased;
            () = shutdown.cancelled() => None,
            replayed = &mut replay, if !replay_done => {
                replay_done = true;
                match replayed {
                    Ok(Ok(replayed)) => {
                        context.metrics.peer.connected.set(1);
                        context.metrics.peer.offline.set(0);
                        tracing::info!(replayed, "connected to the agent");
                        continue;
                    }
                    Ok(Err(reason)) => break reason,
                    Err(error) => break format!("the replay failed: {error}"),
                }
            }
            permit = outbound.reserve(),
                if unacked.is_some_and(|(_, install)| *settled.borrow() >= install) => {
                let Ok(permit) = permit else {
                    break "agent went away".to_owned();
                };
                let (revision, _) = unacked.take().unwrap_or_default();
                permit.send(ProxyMessage {
                    kind: Some(ProxyKind::Ack(Ack { revision })),
                });
                continue;
            }
            Ok(()) = settled.changed(),
                if unacked.is_some_and(|(_, install)| *settled.borrow() < install) => continue,
            permit = outbound.reserve(), if journaled => {
                let Ok(permit) = permit else {
                    break "agent went away".to_owned();
                };
                // Kept in the journal's file until the agent says it took them.
                sent_number += 1;
                let mappings = context.journal.take_to_send(
                    MAPPINGS_PER_MESSAGE,
                    warden_api::BATCH_BYTES,
                    sent_number,
                );
                if !mappings.is_empty() {
                    permit.send(ProxyMessage {
                        kind: Some(ProxyKind::Mappings(Mappings {
                            mappings,
                            resync: false,
                            confirm: sent_number,
                        })),
                    });
                }
                continue;
            }
            () = context.journal.pushed(), if replay_done && !journaled => continue,
            message = inbound.message() => Some(message),
        };
        let Some(message) = message else {
            // What the replay has not queued goes back to the journal, which is saved.
            stop_replay(&replay_stop, replay, replay_done).await;
            drop(outbound);
            return close(context, forwarder, last_flows, inbound).await;
        };
        let message = match message {
            Ok(Some(message)) => message,
            Ok(None) => break "agent closed the session".to_owned(),
            Err(status) => break format!("agent session broke: {status}"),
        };
        match message.kind {
            Some(AgentKind::Snapshot(snapshot)) => {
                let revision = snapshot.revision;
                // A compile takes milliseconds to a second (documents that changed are parsed,
                // the repository built for every endpoint): on the blocking pool, not on a
                // worker the DNS listeners share. Snapshots still apply one at a time, in order.
                let apply = context.apply_snapshot.clone();
                let applied = tokio::task::spawn_blocking(move || apply(&snapshot))
                    .await
                    .unwrap_or_else(|error| Err(format!("the compile did not finish: {error}")));
                match applied {
                    Ok(install) => {
                        context
                            .metrics
                            .peer
                            .acked_revision
                            .set(i64::try_from(revision).unwrap_or(i64::MAX));
                        // A newer revision's ack replaces one still waiting.
                        unacked = Some((revision, install));
                    }
                    Err(error) => {
                        tracing::error!(revision, %error, "snapshot from the agent rejected")
                    }
                }
            }
            Some(AgentKind::Cache(batch)) => merge(context, &batch.mappings),
            Some(AgentKind::Clean(clean)) => apply_clean(context, clean, &copied).await,
            Some(AgentKind::Received(received)) => {
                context.journal.sent_confirmed(received.confirm);
            }
            Some(AgentKind::ResyncDone(done)) => {
                *resynced = true;
                context.journal.replay_confirmed();
                let elapsed = started.elapsed();
                context.metrics.peer.resync_completed(elapsed);
                context.link.last_resync_ms.store(
                    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                context
                    .link
                    .last_resync_at_ms
                    .store(unix_millis(), Ordering::Relaxed);
                tracing::info!(
                    entries = done.entries,
                    ms = elapsed.as_millis(),
                    "resync with the agent done"
                );
            }
            None => {}
        }
    };
    stop_replay(&replay_stop, replay, replay_done).await;
    forwarder.abort();
    ended
}

/// Stops a replay still running and waits for it to put back what it had not queued.
async fn stop_replay(
    stop: &CancellationToken,
    replay: tokio::task::JoinHandle<Result<usize, String>>,
    done: bool,
) {
    stop.cancel();
    if !done {
        let _ = replay.await;
    }
}

/// The proxy's side of the resync: its journal (what the agent missed), then its whole cache
/// (the agent may have lost what it was told live before it stopped: it persists once a
/// second, and a state directory can be lost; and mappings cross only when they change a
/// cache, so a repeat answer would never tell it again), then live mappings flow and what was
/// journaled meanwhile follows, then `ResyncDone`. Returns how many mappings it replayed.
/// The journal entries it takes stay in the journal's file until the agent's `ResyncDone`.
async fn replay(
    context: LinkContext,
    outbound: mpsc::Sender<ProxyMessage>,
    journaled: Vec<WireMapping>,
    copied: Arc<CopiedAt>,
    stop: CancellationToken,
) -> Result<usize, String> {
    let send = |message: ProxyMessage| {
        let (outbound, stop) = (&outbound, &stop);
        async move {
            tokio::select! {
                () = stop.cancelled() => false,
                sent = outbound.send(message) => sent.is_ok(),
            }
        }
    };
    // What is taken stays in the journal's file until the agent's ResyncDone, and goes back
    // into the journal if the session ends first (`run`).
    let journal = &context.journal;
    let send_journal = |entries: Vec<WireMapping>| async move {
        for chunk in warden_api::mapping_batches(&entries) {
            if !send(resync_message(chunk.to_vec())).await {
                return false;
            }
        }
        true
    };
    let mut replayed = journaled.len();
    if !send_journal(journaled).await {
        return Err("agent went away during the journal replay".into());
    }
    // Before the copy: a time answered moved after this may be missing from it.
    copied.mark();
    let cached = warden_api::cache_dump(&context.cache).await;
    replayed += cached.len();
    for chunk in warden_api::into_mapping_batches(cached) {
        if !send(resync_message(chunk)).await {
            return Err("agent went away during the cache resync".into());
        }
    }
    context.link.set(Some(outbound.clone()));
    if !send_journal(journal.take_for_replay()).await {
        return Err("agent went away during the journal replay".into());
    }
    let done = ProxyMessage {
        kind: Some(ProxyKind::ResyncDone(ResyncDone {
            entries: replayed as u64,
        })),
    };
    if !send(done).await {
        return Err("agent went away before the end of the resync".into());
    }
    Ok(replayed)
}

/// Ends a session at shutdown without losing what is still on its way: the proxy has answered
/// its last query, so new mappings (none are expected) go to the journal; the flow forwarder
/// sends the events of its unfinished window; then the outbound stream ends once the agent has
/// taken everything queued on it, which the agent acknowledges by ending its side.
async fn close(
    context: &LinkContext,
    forwarder: tokio::task::JoinHandle<()>,
    last_flows: CancellationToken,
    mut inbound: tonic::Streaming<warden_api::proto::AgentMessage>,
) -> String {
    context.link.set(None);
    last_flows.cancel();
    if let Err(error) = forwarder.await {
        tracing::warn!(%error, "flow forwarder failed");
    }
    loop {
        match inbound.message().await {
            Ok(Some(warden_api::proto::AgentMessage {
                kind: Some(AgentKind::Received(received)),
            })) => context.journal.sent_confirmed(received.confirm),
            Ok(Some(_)) => continue,
            Ok(None) => {
                // The agent ends its side once it has read (and taken) everything sent.
                context.journal.sent_confirmed(u64::MAX);
                return "shutting down: the agent has every message".to_owned();
            }
            Err(status) => return format!("shutting down: the session broke: {status}"),
        }
    }
}

/// When a session's replay began to copy the cache for the agent.
#[derive(Debug, Default)]
struct CopiedAt(std::sync::OnceLock<WallMoment>);

impl CopiedAt {
    fn mark(&self) {
        let _ = self.0.set(WallMoment::now());
    }

    /// On the wall clock as it reads now, as a clean's time is read; `u64::MAX` before the
    /// copy.
    fn millis(&self) -> u64 {
        self.0.get().map_or(u64::MAX, WallMoment::unix_millis)
    }
}

/// An operator's cache clean on the agent, done here too: otherwise this cache would hand the
/// entries back at the next resync. It takes what was answered before the clean was made, not
/// since: the agent sends the cleans it remembers to every new session, also those this proxy
/// had, or made while it was away, when it may have answered the names again. A filter that
/// does not compile is the agent's bug, logged. Awaited before the session's next message,
/// which may refill what it removes (the session reads nothing meanwhile: a clean of a million
/// entries takes a fraction of a second).
async fn apply_clean(context: &LinkContext, clean: CacheClean, copied: &CopiedAt) {
    // An agent of an older build says not when (0): nothing tells one of its cleans from
    // the next, and it hands none to a new session.
    let key = (clean.made_at_ms != 0)
        .then(|| (clean.endpoint.clone(), clean.name.clone(), clean.made_at_ms));
    if let Some(key) = &key
        && context.link.applied_before(key)
    {
        tracing::debug!(
            endpoint = clean.endpoint.as_deref().unwrap_or("*"),
            name = clean.name.as_deref().unwrap_or("*"),
            "cache clean from the agent applied before"
        );
        return;
    }
    let filter = CacheFilter {
        endpoint: clean.endpoint,
        name: clean.name,
    };
    // An agent of an older build says not when: everything matching.
    let before_ms = match clean.made_at_ms {
        0 => u64::MAX,
        made_at_ms => made_at_ms,
    };
    match filter.compile() {
        Ok(compiled) => {
            // The journal too: its entries would go back to the agent's cache at once.
            let journaled = context.journal.remove_matching(|mapping| {
                mapping.learned_at_ms < before_ms
                    && compiled.matches(&mapping.endpoint, &mapping.name)
            });
            let walked = compiled.clone();
            let cleaned = context
                .cache
                .clean_learned_before(before_ms, move |endpoint, name| {
                    walked.matches(endpoint, name)
                })
                .await;
            // What stays of the clean's names was answered since it was made, and the agent,
            // which removed what was answered before, may lack it: an answer repeating what
            // this cache held (a caching resolver's) moves the time answered but crosses to the
            // agent as no news. Without it the agent's reconciler would take this proxy's allow
            // entries for unwanted. What the session's copy of the cache (read by the agent
            // against its cleans) carried with its time is not sent again: only what was
            // answered since both the clean and the copy, none before the copy.
            // Read after the walk, which lets the cache's lock go between chunks: a copy begun
            // meanwhile may have read an entry before a repeat answer moved its time.
            let since_ms = before_ms.max(copied.millis());
            if since_ms != u64::MAX {
                let kept =
                    warden_api::cache_dump_matching(&context.cache, move |endpoint, name| {
                        compiled.matches(endpoint, name)
                    })
                    .await;
                for mapping in kept
                    .into_iter()
                    .filter(|mapping| mapping.learned_at_ms >= since_ms)
                {
                    context.journal.push(mapping);
                }
            }
            let removed = match cleaned {
                Ok(removed) => removed.len(),
                Err(message) => {
                    tracing::error!(
                        error = message.trim_end(),
                        "cache clean from the agent failed"
                    );
                    return;
                }
            };
            if let Some(key) = key {
                context.link.remember_applied(key);
            }
            let endpoint = filter.endpoint.as_deref().unwrap_or("*");
            let name = filter.name.as_deref().unwrap_or("*");
            // Every session starts with the cleans the agent remembers, most of which find
            // nothing left to remove.
            if removed + journaled > 0 {
                tracing::info!(
                    removed,
                    journaled,
                    endpoint,
                    name,
                    "FQDN cache cleaned as the agent's was"
                );
            } else {
                tracing::debug!(
                    endpoint,
                    name,
                    "cache clean from the agent: nothing to remove"
                );
            }
        }
        Err(error) => tracing::warn!(
            error = error.trim_end(),
            "cache clean from the agent rejected"
        ),
    }
}

/// Mappings of the resync (journal or cache), as opposed to live ones.
fn resync_message(mappings: Vec<WireMapping>) -> ProxyMessage {
    ProxyMessage {
        kind: Some(ProxyKind::Mappings(Mappings {
            mappings,
            resync: true,
            confirm: 0,
        })),
    }
}

/// The agent's cache entries into ours: union, later expiry wins (each mapping checked, as
/// the agent checks ours: see [`warden_api::merge_mappings`]).
fn merge(context: &LinkContext, mappings: &[WireMapping]) {
    warden_api::merge_mappings(&context.cache, mappings, &context.metrics.peer);
}

/// How long the flow forwarder gathers events before sending them. Sending what was waiting
/// as soon as anything was took a few events per message at full rate, each message a write
/// and a wake-up of the agent; flow events are observability, which can wait this long.
const FLOW_WINDOW: Duration = Duration::from_millis(20);

/// At most this many events per message, so that a message stays well inside the agent's
/// decoding limit.
const FLOWS_PER_MESSAGE: usize = 1024;

/// Flow events forwarded per second at most, in bursts of up to a second's worth. Encoding and
/// decoding one costs about 2 µs, as much as a fifth of what its query cost: at tens of
/// thousands a second that was most of what the pair paid beyond one proxy, for a copy the
/// agent keeps only for its last 10,000 events. The dnsproxy's own `/v1/flows` (which
/// `warden observe` reads too) has every event.
const FLOWS_FORWARDED_PER_SECOND: f64 = 5_000.0;

/// A token bucket over [`FLOWS_FORWARDED_PER_SECOND`], on tokio's clock.
#[derive(Debug)]
struct FlowBudget {
    tokens: f64,
    refilled: tokio::time::Instant,
}

impl FlowBudget {
    fn new() -> FlowBudget {
        FlowBudget {
            tokens: FLOWS_FORWARDED_PER_SECOND,
            refilled: tokio::time::Instant::now(),
        }
    }

    /// How many of `wanted` events may go now.
    fn take(&mut self, wanted: usize) -> usize {
        let now = tokio::time::Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * FLOWS_FORWARDED_PER_SECOND;
        self.tokens = (self.tokens + earned).min(FLOWS_FORWARDED_PER_SECOND);
        self.refilled = now;
        let granted = wanted.min(self.tokens as usize);
        self.tokens -= granted as f64;
        granted
    }
}

/// The proxy's DNS flow events, batched per [`FLOW_WINDOW`] and within
/// [`FLOWS_FORWARDED_PER_SECOND`], to the agent's flow log, until `last`: then the unfinished
/// window goes at once and the forwarder ends. Best effort: a flow event is observability,
/// never worth holding a query for; what is not forwarded is counted in `dropped` by reason.
/// The follower's backlog (4,096 events) covers a window at any rate the proxy reaches.
async fn forward_flows(
    flows: Arc<FlowLog>,
    outbound: mpsc::Sender<ProxyMessage>,
    dropped: prometheus::IntCounterVec,
    last: CancellationToken,
) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let lagged = dropped.with_label_values(&["lagged"]);
    let over_budget = dropped.with_label_values(&["budget"]);
    let queue_full = dropped.with_label_values(&["queue_full"]);
    let mut budget = FlowBudget::new();
    let mut follower = flows.follow();
    while !last.is_cancelled() {
        let mut gathered = Vec::new();
        tokio::select! {
            biased;
            () = last.cancelled() => {}
            received = follower.recv() => match received {
                Ok(event) => {
                    gathered.push(event);
                    tokio::select! {
                        () = last.cancelled() => {}
                        () = tokio::time::sleep(FLOW_WINDOW) => {}
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    lagged.inc_by(missed);
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
        }
        loop {
            match follower.try_recv() {
                Ok(event) => gathered.push(event),
                Err(TryRecvError::Lagged(missed)) => lagged.inc_by(missed),
                Err(_) => break,
            }
        }
        gathered.retain(|event| matches!(event, FlowEvent::Dns(_)));
        let granted = budget.take(gathered.len());
        over_budget.inc_by((gathered.len() - granted) as u64);
        gathered.truncate(granted);
        let encoded: Vec<String> = gathered
            .iter()
            .filter_map(|event| serde_json::to_string(event).ok())
            .collect();
        // An event of an answer with thousands of addresses is tens of kB: bytes bound a
        // message as much as the count does.
        for events in warden_api::into_batches(encoded, FLOWS_PER_MESSAGE, |event| event.len() + 4)
        {
            let count = events.len() as u64;
            let message = ProxyMessage {
                kind: Some(ProxyKind::Flows(Flows { events })),
            };
            match outbound.try_send(message) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => queue_full.inc_by(count),
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    /// A session refused every time (before the agent's resync) cost a copy of the journal
    /// and the whole cache every second; an agent not reachable is still looked for every
    /// second, and a session that resynced starts the backoff afresh (in `run`).
    #[test]
    fn sessions_that_keep_failing_back_off_further_than_an_agent_not_reachable() {
        let mut refused = BACKOFF_FIRST;
        for _ in 0..20 {
            refused = next_backoff(refused, true);
        }
        assert_eq!(refused, FAILED_SESSION_BACKOFF_MAX);
        let mut unreachable = BACKOFF_FIRST;
        for _ in 0..20 {
            unreachable = next_backoff(unreachable, false);
        }
        assert_eq!(unreachable, BACKOFF_MAX);
        // After refusals, an agent gone away is looked for within a second again.
        assert_eq!(next_backoff(refused, false), BACKOFF_MAX);
    }

    /// An agent on a real socket that answers a hello with a policy snapshot (when `snapshot`)
    /// and its `ResyncDone` (when `resync`), or ends the session at once, and records the
    /// names of the mappings it gets.
    mod fake_agent {
        use std::sync::atomic::AtomicUsize;

        use tokio_stream::wrappers::ReceiverStream;
        use tonic::{Request, Response, Status, Streaming};
        use warden_api::proto::agent_server::{Agent, AgentServer};
        use warden_api::proto::{AgentMessage, agent_message};

        use super::*;

        #[derive(Debug, Default)]
        pub struct Seen {
            pub sessions: AtomicUsize,
            pub names: Mutex<Vec<String>>,
        }

        struct FakeAgent {
            snapshot: bool,
            resync: bool,
            seen: Arc<Seen>,
        }

        #[tonic::async_trait]
        impl Agent for FakeAgent {
            type SessionStream = ReceiverStream<Result<AgentMessage, Status>>;

            async fn session(
                &self,
                request: Request<Streaming<ProxyMessage>>,
            ) -> Result<Response<Self::SessionStream>, Status> {
                self.seen.sessions.fetch_add(1, Ordering::Relaxed);
                let mut inbound = request.into_inner();
                let (outbound, stream) = mpsc::channel(4);
                let (snapshot, resync, seen) = (self.snapshot, self.resync, self.seen.clone());
                tokio::spawn(async move {
                    if snapshot {
                        let snapshot = AgentMessage {
                            kind: Some(agent_message::Kind::Snapshot(
                                warden_api::proto::PolicySnapshot {
                                    revision: 1,
                                    ..Default::default()
                                },
                            )),
                        };
                        if outbound.send(Ok(snapshot)).await.is_err() {
                            return;
                        }
                    }
                    if !resync {
                        return;
                    }
                    let done = AgentMessage {
                        kind: Some(agent_message::Kind::ResyncDone(ResyncDone { entries: 0 })),
                    };
                    if outbound.send(Ok(done)).await.is_err() {
                        return;
                    }
                    while let Ok(Some(message)) = inbound.message().await {
                        if let Some(ProxyKind::Mappings(batch)) = message.kind {
                            let mut names = seen.names.lock().unwrap();
                            names.extend(batch.mappings.into_iter().map(|m| m.name));
                        }
                    }
                });
                Ok(Response::new(ReceiverStream::new(stream)))
            }
        }

        /// Serves at `socket` until `shutdown`.
        pub fn start(
            socket: &std::path::Path,
            snapshot: bool,
            resync: bool,
            shutdown: CancellationToken,
        ) -> Arc<Seen> {
            let seen = Arc::new(Seen::default());
            let listener = warden_api::server::bind(socket, None).unwrap();
            let routes = tonic::service::Routes::new(AgentServer::new(FakeAgent {
                snapshot,
                resync,
                seen: seen.clone(),
            }));
            tokio::spawn(warden_api::server::serve(
                listener,
                routes,
                warden_api::server::PeerPolicy::new(&[]),
                Arc::new(|_| {}),
                shutdown,
            ));
            seen
        }
    }

    fn link_context(socket: &std::path::Path) -> LinkContext {
        let metrics = Metrics::new("dnsproxy").unwrap();
        let (_, settled) = tokio::sync::watch::channel(0);
        LinkContext {
            socket: socket.to_path_buf(),
            link: Arc::new(Link::default()),
            journal: Arc::new(Journal::new(1000, metrics.peer.clone())),
            cache: SharedCache::new(warden_fqdn::DnsCache::default()),
            metrics,
            flows: Arc::new(FlowLog::new(16)),
            apply_snapshot: Arc::new(|_| Ok(1)),
            revision: Arc::new(|| 1),
            snapshot_settled: settled,
            serving: Arc::new(AtomicBool::new(true)),
        }
    }

    fn wire(name: &str) -> WireMapping {
        WireMapping {
            endpoint: "youssef/test".into(),
            name: name.into(),
            ..WireMapping::default()
        }
    }

    /// A clean from the agent takes what was answered before it was made, in the cache and in
    /// the journal, and spares what was answered since: the agent sends the cleans it
    /// remembers to every new session, also ones made long before. What a clean made during
    /// the session spares goes to the agent.
    #[tokio::test]
    async fn a_clean_spares_what_was_answered_after_it() {
        let context = link_context(std::path::Path::new("/nonexistent"));
        let made_at_ms = 1_700_000_000_000;
        let answer = |name: &str, learned_at_ms: u64| WireMapping {
            ips: vec!["198.18.9.9".into()],
            expires_at: warden_proxy::unix_now().0 + 300,
            learned_at_ms,
            ..wire(name)
        };
        let answers = [
            answer("before.gone.test.", made_at_ms - 1),
            answer("since.gone.test.", made_at_ms),
            answer("before.kept.test.", made_at_ms - 1),
        ];
        warden_api::merge_mappings(&context.cache, &answers, &context.metrics.peer);
        for mapping in answers {
            context.journal.push(mapping);
        }
        let clean = |made_at_ms| CacheClean {
            endpoint: None,
            name: Some("*.gone.test".into()),
            made_at_ms,
        };
        let copied_at = |at_ms| {
            let copied = CopiedAt::default();
            let _ = copied.0.set(WallMoment::at(at_ms));
            copied
        };
        let held = |context: &LinkContext| {
            let cached: Vec<String> = context
                .cache
                .lock()
                .entries(warden_proxy::unix_now())
                .into_iter()
                .map(|entry| entry.name)
                .collect();
            let journaled: Vec<String> = context
                .journal
                .take_for_replay()
                .into_iter()
                .map(|mapping| mapping.name)
                .collect();
            context.journal.session_ended();
            (cached, journaled)
        };

        // Before the session's copy of the cache: the copy carries what stays.
        apply_clean(&context, clean(made_at_ms), &CopiedAt::default()).await;
        let (cached, journaled) = held(&context);
        assert_eq!(cached, ["before.kept.test.", "since.gone.test."]);
        assert_eq!(journaled, ["since.gone.test.", "before.kept.test."]);

        // After the copy: what stays of its names goes to the agent, which may lack an answer
        // given since that repeated this cache (sent as no news), and would revoke its allow
        // entries. What was answered before the copy, the copy carried.
        apply_clean(&context, clean(made_at_ms - 5), &copied_at(made_at_ms + 1)).await;
        let (_, journaled) = held(&context);
        assert_eq!(journaled, ["since.gone.test.", "before.kept.test."]);
        apply_clean(&context, clean(made_at_ms - 1), &copied_at(made_at_ms - 10)).await;
        let (_, journaled) = held(&context);
        assert_eq!(
            journaled,
            ["since.gone.test.", "before.kept.test.", "since.gone.test."]
        );

        // An agent of an older build says not when: everything matching goes.
        apply_clean(&context, clean(0), &copied_at(0)).await;
        let (cached, journaled) = held(&context);
        assert_eq!(cached, ["before.kept.test."]);
        assert_eq!(journaled, ["before.kept.test."]);
    }

    #[test]
    fn the_cleans_applied_are_remembered_within_a_bound() {
        let link = Link::default();
        let key = |n: u64| (None, Some("*.gone.test".to_owned()), n);
        for n in 1..=APPLIED_CLEANS_REMEMBERED as u64 + 1 {
            link.remember_applied(key(n));
        }
        link.remember_applied(key(2));
        assert!(!link.applied_before(&key(1)), "the oldest forgotten");
        assert!(link.applied_before(&key(2)));
        assert_eq!(link.applied_cleans().order.len(), APPLIED_CLEANS_REMEMBERED);
    }

    /// Every new session starts with the cleans the agent remembers (up to 256), each a walk of
    /// the cache and the journal; one this process applied has nothing left to remove, and is
    /// not applied again. What the walk would find is planted here to tell.
    #[tokio::test]
    async fn a_clean_applied_before_is_not_applied_again() {
        let context = link_context(std::path::Path::new("/nonexistent"));
        let made_at_ms = 1_700_000_000_000;
        let plant = |context: &LinkContext| {
            let answer = WireMapping {
                ips: vec!["198.18.9.9".into()],
                expires_at: warden_proxy::unix_now().0 + 300,
                learned_at_ms: made_at_ms - 1,
                ..wire("www.gone.test.")
            };
            warden_api::merge_mappings(&context.cache, &[answer], &context.metrics.peer);
        };
        let cached = |context: &LinkContext| context.cache.lock().name_count();
        let clean = |made_at_ms| CacheClean {
            endpoint: None,
            name: Some("*.gone.test".into()),
            made_at_ms,
        };
        plant(&context);
        apply_clean(&context, clean(made_at_ms), &CopiedAt::default()).await;
        assert_eq!(cached(&context), 0);
        plant(&context);
        apply_clean(&context, clean(made_at_ms), &CopiedAt::default()).await;
        assert_eq!(cached(&context), 1, "applied again");
        apply_clean(&context, clean(made_at_ms + 1), &CopiedAt::default()).await;
        assert_eq!(cached(&context), 0, "another clean of the same names");
        // An agent of an older build's cleans carry no time to tell them apart.
        for _ in 0..2 {
            plant(&context);
            apply_clean(&context, clean(0), &CopiedAt::default()).await;
            assert_eq!(cached(&context), 0);
        }
    }

    /// A link to a fake agent that resyncs and confirms nothing (stopped by `agent_stop`),
    /// connected, and `name` answered (handed to the hot path's mapping observer); returns
    /// once the agent has it.
    async fn journaled_and_sent(
        socket: &std::path::Path,
        stop: &CancellationToken,
        agent_stop: &CancellationToken,
        name: &str,
    ) -> (
        LinkContext,
        Arc<fake_agent::Seen>,
        tokio::task::JoinHandle<()>,
    ) {
        let seen = fake_agent::start(socket, false, true, agent_stop.clone());
        let context = link_context(socket);
        let session = tokio::spawn(run(context.clone(), stop.clone()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !context.link.connected() {
            assert!(Instant::now() < deadline, "never connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        LinkMappings {
            journal: context.journal.clone(),
        }
        .on_mapping(Mapping {
            endpoint: Arc::from("youssef/test"),
            name: warden_policy::DnsName::new(name).unwrap(),
            ips: vec!["198.18.1.10".parse().unwrap()],
            ttl: 60,
            expires_at: warden_fqdn::UnixTime(unix_millis() / 1000 + 60),
            learned_at_ms: unix_millis(),
            server: "127.0.0.1:53".parse().unwrap(),
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        while !seen.names.lock().unwrap().iter().any(|n| n == name) {
            assert!(
                Instant::now() < deadline,
                "the journaled mapping never left"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (context, seen, session)
    }

    #[tokio::test]
    async fn mappings_journaled_during_a_live_session_reach_the_agent_in_that_session() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let (context, seen, session) = journaled_and_sent(
            &dir.path().join("agent.sock"),
            &stop,
            &stop,
            "late.example.",
        )
        .await;
        assert!(context.journal.is_empty());
        assert_eq!(seen.sessions.load(Ordering::Relaxed), 1);
        stop.cancel();
        let _ = session.await;
    }

    /// A snapshot's compile ran on the worker that read the session, one the DNS listeners
    /// share: a second of parsing (10,000 selectors, debug build) stalled the queries queued
    /// behind it. On this single-threaded runtime the compile below finishes only if a task
    /// of the runtime, as a listener is, runs meanwhile.
    #[tokio::test]
    async fn a_snapshot_compiles_off_the_runtime_the_listeners_share() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let stop = CancellationToken::new();
        let _seen = fake_agent::start(&socket, true, true, stop.clone());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let (applied, mut outcome) = tokio::sync::watch::channel(None);
        let mut context = link_context(&socket);
        context.apply_snapshot = Arc::new(move |_| {
            let released = released.lock().unwrap();
            // Only a release sent while the compile runs counts.
            while released.try_recv().is_ok() {}
            let waited = released.recv_timeout(Duration::from_secs(3));
            applied.send_replace(Some(waited.is_ok()));
            Ok(1)
        });
        let listener = tokio::spawn(async move {
            loop {
                if release.send(()).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let session = tokio::spawn(run(context, stop.clone()));
        let ran_beside =
            tokio::time::timeout(Duration::from_secs(10), outcome.wait_for(Option::is_some))
                .await
                .expect("no snapshot applied")
                .unwrap()
                .unwrap_or(false);
        assert!(
            ran_beside,
            "the runtime's other tasks stood still during the compile"
        );
        stop.cancel();
        let _ = session.await;
        listener.abort();
    }

    #[tokio::test]
    async fn a_session_that_never_resyncs_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let stop = CancellationToken::new();
        let seen = fake_agent::start(&socket, false, false, stop.clone());
        let session = tokio::spawn(run(link_context(&socket), stop.clone()));
        tokio::time::sleep(Duration::from_millis(1600)).await;
        // 100, 200, 400, 800 ms between attempts: five at most in 1.6 s, not sixteen.
        let sessions = seen.sessions.load(Ordering::Relaxed);
        assert!((2..=5).contains(&sessions), "{sessions} sessions");
        stop.cancel();
        let _ = session.await;
    }

    fn live(name: &str) -> ProxyMessage {
        ProxyMessage {
            kind: Some(ProxyKind::Mappings(Mappings {
                mappings: vec![WireMapping {
                    name: name.to_owned(),
                    ..WireMapping::default()
                }],
                resync: false,
                confirm: 0,
            })),
        }
    }

    fn names(message: &ProxyMessage) -> Vec<String> {
        match &message.kind {
            Some(ProxyKind::Mappings(batch)) => {
                batch.mappings.iter().map(|m| m.name.clone()).collect()
            }
            _ => vec!["(other)".to_owned()],
        }
    }

    /// A numbered journal batch joined behind a live mapping lost its number, and the agent
    /// never confirmed it.
    #[tokio::test]
    async fn a_joined_batch_carries_the_highest_number_to_confirm() {
        let (sender, receiver) = mpsc::channel(8);
        let numbered = |name: &str, confirm: u64| {
            let mut message = live(name);
            if let Some(ProxyKind::Mappings(batch)) = &mut message.kind {
                batch.confirm = confirm;
            }
            message
        };
        for message in [numbered("a.", 0), numbered("b.", 4), numbered("c.", 0)] {
            sender.send(message).await.unwrap();
        }
        drop(sender);
        let messages: Vec<ProxyMessage> = Coalescing::new(receiver).collect().await;
        assert_eq!(messages.len(), 1, "joined");
        let Some(ProxyKind::Mappings(batch)) = &messages[0].kind else {
            panic!("{messages:?}");
        };
        assert_eq!(batch.confirm, 4);
    }

    /// A session that got as far as the agent's ResyncDone left what it had sent from the
    /// journal, unconfirmed, in flight for good: only a failed resync put it back. And an
    /// answer's mapping sent straight on the session's channel was never in the journal at
    /// all: lost with the session if the agent had not taken it.
    #[tokio::test]
    async fn what_a_session_sent_unconfirmed_goes_back_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (stop, agent_stop) = (CancellationToken::new(), CancellationToken::new());
        // An agent that never confirms (an older build's), then goes away.
        let (context, _seen, session) = journaled_and_sent(
            &dir.path().join("agent.sock"),
            &stop,
            &agent_stop,
            "sent.example.",
        )
        .await;
        assert!(context.journal.is_empty(), "in flight, not in the journal");
        agent_stop.cancel();
        let deadline = Instant::now() + Duration::from_secs(5);
        while context.link.connected() {
            assert!(Instant::now() < deadline, "the session never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let back: Vec<String> = context
            .journal
            .take()
            .into_iter()
            .map(|mapping| mapping.name)
            .collect();
        assert_eq!(
            back,
            ["sent.example."],
            "back in the journal, for the next session"
        );
        stop.cancel();
        let _ = session.await;
    }

    #[tokio::test]
    async fn live_mappings_of_wide_names_leave_in_messages_the_agent_accepts() {
        use prost::Message as _;
        let ips: Vec<String> = (0..1000)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let (sender, receiver) = mpsc::channel(512);
        for n in 0..300 {
            let mut message = live(&format!("n{n}.io."));
            if let Some(ProxyKind::Mappings(batch)) = &mut message.kind {
                batch.mappings[0].ips = ips.clone();
            }
            sender.send(message).await.unwrap();
        }
        drop(sender);
        let messages: Vec<ProxyMessage> = Coalescing::new(receiver).collect().await;
        let names: usize = messages.iter().map(|m| names(m).len()).sum();
        assert_eq!(names, 300, "every mapping, once");
        assert!(
            messages.len() > 1,
            "300 mappings of 1,000 addresses in one message"
        );
        for message in &messages {
            assert!(message.encoded_len() <= warden_api::BATCH_BYTES + 64);
        }
    }

    #[tokio::test]
    async fn live_mappings_waiting_together_leave_as_one_message() {
        let (sender, receiver) = mpsc::channel(16);
        for name in ["a.io.", "b.io."] {
            sender.send(live(name)).await.unwrap();
        }
        sender
            .send(ProxyMessage {
                kind: Some(ProxyKind::ResyncDone(ResyncDone::default())),
            })
            .await
            .unwrap();
        sender.send(live("c.io.")).await.unwrap();
        drop(sender);
        let messages: Vec<ProxyMessage> = Coalescing::new(receiver).collect().await;
        let seen: Vec<Vec<String>> = messages.iter().map(names).collect();
        assert_eq!(
            seen,
            vec![
                vec!["a.io.".to_owned(), "b.io.".to_owned()],
                vec!["(other)".to_owned()],
                vec!["c.io.".to_owned()],
            ],
            "order kept; only adjacent live mappings merged"
        );
    }

    fn dns_event(name: &str) -> FlowEvent {
        FlowEvent::Dns(warden_telemetry::DnsFlow {
            time_ms: 1_780_576_496_789,
            instance: "dnsproxy".into(),
            endpoint: "default/test".into(),
            client: "127.0.0.2:53211".parse().unwrap(),
            server: "127.105.0.1:53".parse().unwrap(),
            protocol: "udp".into(),
            qname: name.to_owned(),
            qtype: "A".into(),
            rcode: "NOERROR".into(),
            verdict: warden_telemetry::Verdict::Allowed,
            ips: vec!["198.18.1.11".parse().unwrap()],
            ttl: 60,
            cnames: Vec::new(),
            latency_us: 120,
        })
    }

    /// A `warden_peer_flows_dropped_total` of the test's own.
    fn dropped_counter() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("dropped", "test"), &["reason"])
            .unwrap()
    }

    /// The events of each message the forwarder sent so far.
    fn sent_flows(sent: &mut mpsc::Receiver<ProxyMessage>) -> Vec<usize> {
        std::iter::from_fn(|| sent.try_recv().ok())
            .map(|message| match message.kind {
                Some(ProxyKind::Flows(flows)) => flows.events.len(),
                _ => usize::MAX,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn flow_events_leave_once_per_window_within_the_budget_and_the_rest_is_counted() {
        let flows = Arc::new(FlowLog::new(16));
        let (outbound, mut sent) = mpsc::channel(64);
        let dropped = dropped_counter();
        let forwarder = tokio::spawn(forward_flows(
            flows.clone(),
            outbound,
            dropped.clone(),
            CancellationToken::new(),
        ));
        let count = |reason: &str| dropped.with_label_values(&[reason]).get();
        tokio::time::sleep(Duration::from_millis(1)).await;

        for n in 0..300 {
            flows.record(dns_event(&format!("n{n}.example.")));
        }
        tokio::time::sleep(FLOW_WINDOW / 2).await;
        assert!(
            sent_flows(&mut sent).is_empty(),
            "nothing before the window ends"
        );
        // Events of the same window go along, past the flow log's own small ring.
        for n in 300..500 {
            flows.record(dns_event(&format!("n{n}.example.")));
        }
        tokio::time::sleep(FLOW_WINDOW).await;
        assert_eq!(sent_flows(&mut sent), [500]);

        // A burst larger than a message is split.
        for n in 0..2500 {
            flows.record(dns_event(&format!("m{n}.example.")));
        }
        tokio::time::sleep(FLOW_WINDOW * 2).await;
        assert_eq!(
            sent_flows(&mut sent),
            [
                FLOWS_PER_MESSAGE,
                FLOWS_PER_MESSAGE,
                2500 - 2 * FLOWS_PER_MESSAGE
            ]
        );
        assert_eq!(count("budget") + count("lagged") + count("queue_full"), 0);

        // Past a second's worth of events, the rest waits for the budget to refill: counted,
        // not encoded. About 2,000 of the budget are left now, and a few hundred came back.
        for n in 0..4000 {
            flows.record(dns_event(&format!("b{n}.example.")));
        }
        tokio::time::sleep(FLOW_WINDOW * 2).await;
        let forwarded: usize = sent_flows(&mut sent).iter().sum();
        assert_eq!(forwarded as u64 + count("budget"), 4000);
        assert!((2000..2600).contains(&forwarded), "{forwarded} forwarded");

        // A second later the budget is whole again.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for n in 0..4000 {
            flows.record(dns_event(&format!("c{n}.example.")));
        }
        tokio::time::sleep(FLOW_WINDOW * 2).await;
        assert_eq!(sent_flows(&mut sent).iter().sum::<usize>(), 4000);

        // More than the follower's backlog before the forwarder runs: the oldest are lost to
        // the lag, and counted as such.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = count("budget");
        for n in 0..5000 {
            flows.record(dns_event(&format!("o{n}.example.")));
        }
        tokio::time::sleep(FLOW_WINDOW * 2).await;
        let forwarded: usize = sent_flows(&mut sent).iter().sum();
        assert!(count("lagged") > 0, "nothing counted");
        assert_eq!(
            forwarded as u64 + count("lagged") + count("budget") - before,
            5000
        );
        forwarder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_window_leaves_at_once_when_the_session_closes() {
        let flows = Arc::new(FlowLog::new(16));
        let (outbound, mut sent) = mpsc::channel(64);
        let dropped = dropped_counter();
        let last = CancellationToken::new();
        let forwarder = tokio::spawn(forward_flows(
            flows.clone(),
            outbound,
            dropped,
            last.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(1)).await;
        for n in 0..3 {
            flows.record(dns_event(&format!("n{n}.example.")));
        }
        tokio::time::sleep(FLOW_WINDOW / 4).await;
        assert!(sent_flows(&mut sent).is_empty(), "the window is not over");
        // An event recorded after the window began but before the close goes along too.
        flows.record(dns_event("late.example."));
        let closed_at = tokio::time::Instant::now();
        last.cancel();
        forwarder.await.unwrap();
        assert_eq!(
            closed_at.elapsed(),
            Duration::ZERO,
            "no wait for the window"
        );
        assert_eq!(sent_flows(&mut sent), [4]);
        assert!(
            sent.recv().await.is_none(),
            "the forwarder let go of the stream"
        );
    }
}
