use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use prometheus::IntCounter;
use warden_datapath::{Datapath, DatapathError, FqdnKey, RedirectLookup, RedirectSource};
use warden_policy::EndpointId;
use warden_proxy::{
    AllowRequest, ClientContext, DatapathHook, EndpointLookup, HoldFuture, Transport,
};
use warden_telemetry::{LogBudget, Metrics};

use crate::keys::{TCP, UDP, fqdn_keys};

/// The node's endpoints as the proxy looks them up: by source address and by enrolled cgroup.
#[derive(Debug, Clone, Default)]
pub struct EndpointDirectory {
    pub by_ip: HashMap<IpAddr, (EndpointId, Arc<str>)>,
    pub by_cgroup: HashMap<u64, (EndpointId, Arc<str>)>,
    /// Every endpoint's key: a cgroup enrolled since `by_cgroup` was built is placed by the
    /// endpoint ID its enrollment in the datapath carries.
    pub by_id: HashMap<EndpointId, Arc<str>>,
}

impl EndpointDirectory {
    pub fn by_ip(&self, ip: IpAddr) -> Option<(EndpointId, Arc<str>)> {
        self.by_ip.get(&ip.to_canonical()).cloned()
    }
}

/// The allow entries this process asserted in the current second, each with the latest expiry
/// it asserted. Most answers repeat one the cache already had (the same second's, a caching
/// resolver's counted-down TTL); their entries are found here instead of by a `bpf()` lookup
/// each, a system call that cost more than the rest of the answer's handling. The memo forgets
/// at every second, so an entry someone else removed meanwhile (the agent's reconciler, which
/// also re-adds every entry a cache wants once a second) is asserted again within a second.
#[derive(Debug, Default)]
struct AllowMemo {
    second: u64,
    asserted: HashMap<FqdnKey, u64>,
}

impl AllowMemo {
    /// Whether `key` was asserted until `expires_at` or later during the second `now`. An
    /// entry expiring now is never covered: the reconciler may remove it any moment. A caller
    /// still in an earlier second (a batch begun before the memo moved on) is told nothing is
    /// covered, and leaves the memo as it is; further back than a second, the wall clock
    /// stepped back (NTP correcting a clock set ahead), and the memo starts over at `now`:
    /// left as it was, it covered nothing and grew with every key until the clock came back.
    fn covers(&mut self, now: u64, key: &FqdnKey, expires_at: u64) -> bool {
        if now.saturating_add(1) < self.second {
            self.second = now;
            self.asserted.clear();
        }
        if now < self.second {
            return false;
        }
        if self.second != now {
            self.second = now;
            self.asserted.clear();
        }
        expires_at > now
            && self
                .asserted
                .get(key)
                .is_some_and(|asserted| *asserted >= expires_at)
    }

    fn assert(&mut self, key: FqdnKey, expires_at: u64) {
        let asserted = self.asserted.entry(key).or_insert(expires_at);
        *asserted = (*asserted).max(expires_at);
    }
}

/// Allow entries an answer writes on the answer loop itself; more (a wildcard granted to many
/// endpoints, answered with many addresses, on several ports) go to the allow writer's thread
/// while the answer waits for them, so that the loop goes on answering other queries instead
/// of spending a `bpf()` call per entry first.
const INLINE_ALLOW_WRITES: usize = 32;

/// The datapath answers write into, with the memo of what they asserted there: a datapath
/// replaced (the agent's maps pinned anew) comes with an empty memo, and a batch still being
/// written into the old one asserts nothing about the new.
#[derive(Debug)]
struct AllowTarget {
    datapath: Datapath,
    memo: Mutex<AllowMemo>,
}

impl AllowTarget {
    fn memo(&self) -> std::sync::MutexGuard<'_, AllowMemo> {
        self.memo
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Writes the entries of `keys` the memo does not cover (asked again here: a batch queued
    /// behind another of the same name finds its entries written), remembering each one
    /// written. The memo is looked at once per 64 keys, and not held across a map update:
    /// other answers check it meanwhile.
    fn write(&self, metrics: &Metrics, keys: &[FqdnKey], expires_at: u64) {
        for chunk in keys.chunks(64) {
            let missing = {
                let now = warden_proxy::unix_now().0;
                let mut memo = self.memo();
                chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, key)| !memo.covers(now, key, expires_at))
                    .fold(0_u64, |missing, (at, _)| missing | 1 << at)
            };
            for (at, key) in chunk.iter().enumerate() {
                if missing & 1 << at == 0 {
                    continue;
                }
                let written = self.datapath.allow_fqdn(*key, expires_at);
                if written.is_ok() {
                    self.memo().assert(*key, expires_at);
                }
                count(metrics, "allow", written);
            }
        }
    }
}

/// A large answer's allow entries, for the writer's thread.
struct AllowBatch {
    target: Arc<AllowTarget>,
    keys: Vec<FqdnKey>,
    expires_at: u64,
    /// Dropped (or sent) once they are written: the answer waits for it.
    done: tokio::sync::oneshot::Sender<()>,
}

/// Batches waiting for the allow writer; past them an answer writes its own entries, on its
/// answer loop, as if there were no writer (the queue is first in, first out: an answer
/// behind a long one would outwait its hold anyway).
const ALLOW_BATCHES_QUEUED: usize = 64;

/// Starts the thread that writes large answers' allow entries, one batch after the other (the
/// map's writes go through one lock anyway, so more threads would only queue there). It ends
/// when its sender, held by the [`Enforcement`], is dropped. A batch the answer stopped waiting
/// for (`response_max_delay`) is still written.
fn spawn_allow_writer(metrics: Metrics) -> Option<mpsc::SyncSender<AllowBatch>> {
    let (sender, batches) = mpsc::sync_channel::<AllowBatch>(ALLOW_BATCHES_QUEUED);
    let spawned = std::thread::Builder::new()
        .name("allow-writer".into())
        .spawn(move || {
            while let Ok(batch) = batches.recv() {
                batch.target.write(&metrics, &batch.keys, batch.expires_at);
                let _ = batch.done.send(());
            }
        });
    match spawned {
        Ok(_) => Some(sender),
        Err(error) => {
            tracing::warn!(%error, "cannot start the allow writer's thread; large answers' allow entries are written on the answer loops");
            None
        }
    }
}

/// The proxy engine's view of endpoints and datapath; both replaceable while serving.
#[derive(Debug)]
pub struct Enforcement {
    datapath: RwLock<Option<Arc<AllowTarget>>>,
    directory: RwLock<Arc<EndpointDirectory>>,
    /// Bumped whenever the directory's content changes, so peers can be told.
    generation: AtomicU64,
    /// Started with the first large answer; `None` if its thread could not be.
    allow_writer: OnceLock<Option<mpsc::SyncSender<AllowBatch>>>,
    metrics: Metrics,
    /// `warden_datapath_redirect_lookups_total`, resolved once: one of them counts each query.
    redirect_lookups: RedirectLookupCounters,
}

#[derive(Debug)]
struct RedirectLookupCounters {
    /// By [source (slot, map)][result (found, absent)].
    counters: [[IntCounter; 2]; 2],
}

impl RedirectLookupCounters {
    fn new(metrics: &Metrics) -> RedirectLookupCounters {
        let counter = |source: RedirectSource, result| {
            metrics
                .datapath
                .redirect_lookups
                .with_label_values(&[source.as_str(), result])
        };
        let by_result = |source| [counter(source, "found"), counter(source, "absent")];
        RedirectLookupCounters {
            counters: [
                by_result(RedirectSource::Slot),
                by_result(RedirectSource::Map),
            ],
        }
    }

    fn count(&self, lookup: &RedirectLookup) {
        let source = match lookup.source {
            RedirectSource::Slot => 0,
            RedirectSource::Map => 1,
        };
        self.counters[source][usize::from(lookup.record.is_none())].inc();
    }
}

impl Enforcement {
    pub fn new(metrics: Metrics) -> Enforcement {
        Enforcement {
            datapath: RwLock::new(None),
            directory: RwLock::new(Arc::new(EndpointDirectory::default())),
            generation: AtomicU64::new(0),
            allow_writer: OnceLock::new(),
            redirect_lookups: RedirectLookupCounters::new(&metrics),
            metrics,
        }
    }

    pub fn set_datapath(&self, datapath: Option<Datapath>) {
        // With a memo of its own: other maps may hold none of what was asserted.
        *self
            .datapath
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = datapath.map(|datapath| {
            Arc::new(AllowTarget {
                datapath,
                memo: Mutex::default(),
            })
        });
    }

    fn allow_target(&self) -> Option<Arc<AllowTarget>> {
        self.datapath
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    pub fn datapath(&self) -> Option<Datapath> {
        self.allow_target().map(|target| target.datapath.clone())
    }

    pub fn set_directory(&self, directory: EndpointDirectory) {
        *self
            .directory
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(directory);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes whenever the directory does.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Replaces the address and ID indexes, keeping the cgroup index (the agent's endpoints
    /// changed; its reconciler updates the cgroups at its next pass).
    pub fn set_addresses(&self, addresses: EndpointDirectory) {
        let mut directory = self
            .directory
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        let updated = EndpointDirectory {
            by_cgroup: directory.by_cgroup.clone(),
            ..addresses
        };
        *directory = Arc::new(updated);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Replaces only the cgroup index (the agent's reconciler learns cgroup ids as it enrolls).
    pub fn set_cgroups(&self, by_cgroup: HashMap<u64, (EndpointId, Arc<str>)>) {
        let mut directory = self
            .directory
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        if directory.by_cgroup == by_cgroup {
            return;
        }
        let mut updated = EndpointDirectory::clone(&directory);
        updated.by_cgroup = by_cgroup;
        *directory = Arc::new(updated);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn directory(&self) -> Arc<EndpointDirectory> {
        self.directory
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}

fn count(metrics: &Metrics, op: &str, result: Result<(), DatapathError>) {
    match result {
        Ok(()) => metrics.datapath.updates.with_label_values(&[op]).inc(),
        Err(error) => {
            metrics.datapath.errors.with_label_values(&[op]).inc();
            // Every answer's writes fail alike once a map is full: one line per interval.
            static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
            if let Some(held_back) = BUDGET.allow() {
                tracing::warn!(%error, op, held_back, "datapath update failed");
            }
        }
    }
}

impl EndpointLookup for Enforcement {
    /// The redirect record says which cgroup asked and which server it meant; without one
    /// (no datapath, or a client that sent to the proxy directly) the source address decides.
    fn lookup(&self, client: SocketAddr, transport: Transport) -> ClientContext {
        let directory = self.directory();
        let by_ip = || ClientContext {
            endpoint: directory.by_ip(client.ip()),
            original_server: None,
            unresolved: false,
        };
        let Some(datapath) = self.datapath() else {
            return by_ip();
        };
        let proto = match transport {
            Transport::Udp => UDP,
            Transport::Tcp => TCP,
        };
        let lookup = datapath.redirect_record(client, proto);
        if let Ok(lookup) = &lookup {
            self.redirect_lookups.count(lookup);
        }
        match lookup.map(|lookup| lookup.record) {
            Ok(Some(record)) => match place(&datapath, &directory, record.cgroup_id) {
                Placed::Endpoint(endpoint) => ClientContext {
                    endpoint: Some(endpoint),
                    original_server: record.original,
                    unresolved: false,
                },
                // A record left by a socket long gone, of a cgroup no longer enrolled: it says
                // nothing about this sender.
                Placed::NotEnrolled => by_ip(),
                // Enrolled, as an endpoint this process does not know (a configuration newer
                // than its view of it), or the datapath cannot say: failing open would let it
                // skip its DNS rules.
                Placed::Unknown => {
                    let endpoint = directory.by_ip(client.ip());
                    ClientContext {
                        unresolved: endpoint.is_none(),
                        endpoint,
                        original_server: record.original,
                    }
                }
            },
            Ok(None) => by_ip(),
            Err(error) => {
                static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
                if let Some(held_back) = BUDGET.allow() {
                    tracing::warn!(%client, %error, held_back, "cannot read the redirect record");
                }
                by_ip()
            }
        }
    }
}

/// Where a redirect record's cgroup belongs.
enum Placed {
    Endpoint((EndpointId, Arc<str>)),
    NotEnrolled,
    Unknown,
}

/// The index first; a cgroup enrolled since it was built (the dnsproxy's snapshot lags the
/// agent's enrollments by up to a second, and a pod's first queries fall in that gap) by the
/// endpoint ID the datapath enrolled it under, one map lookup.
fn place(datapath: &Datapath, directory: &EndpointDirectory, cgroup_id: u64) -> Placed {
    if let Some(endpoint) = directory.by_cgroup.get(&cgroup_id) {
        return Placed::Endpoint(endpoint.clone());
    }
    match datapath.enrollment(cgroup_id) {
        Ok(Some(entry)) => {
            let id = EndpointId(entry.endpoint_id);
            match directory.by_id.get(&id) {
                Some(key) => Placed::Endpoint((id, key.clone())),
                None => Placed::Unknown,
            }
        }
        Ok(None) => Placed::NotEnrolled,
        Err(_) => Placed::Unknown,
    }
}

impl DatapathHook for Enforcement {
    /// Up to 32 entries are written here, and the answer is released right after; a larger
    /// batch goes to the allow writer's thread, and the answer waits for it.
    fn allow(&self, request: &AllowRequest<'_>) -> Option<HoldFuture> {
        let target = self.allow_target()?;
        let expires_at = request.expires_at.0;
        let keys: Vec<FqdnKey> = request
            .grants
            .iter()
            .flat_map(|grant| request.ips.iter().flat_map(|ip| fqdn_keys(grant, *ip)))
            .collect();
        if keys.len() <= INLINE_ALLOW_WRITES {
            target.write(&self.metrics, &keys, expires_at);
            return None;
        }
        let mut keys = {
            let now = warden_proxy::unix_now().0;
            let mut memo = target.memo();
            keys.into_iter()
                .filter(|key| !memo.covers(now, key, expires_at))
                .collect::<Vec<_>>()
        };
        // Overlapping grants of one endpoint give the same key twice.
        keys.sort_unstable();
        keys.dedup();
        if keys.len() <= INLINE_ALLOW_WRITES {
            target.write(&self.metrics, &keys, expires_at);
            return None;
        }
        let writer = self
            .allow_writer
            .get_or_init(|| spawn_allow_writer(self.metrics.clone()));
        let (done, written) = tokio::sync::oneshot::channel();
        let batch = AllowBatch {
            target,
            keys,
            expires_at,
            done,
        };
        let Some(writer) = writer else {
            // No thread: written here, as if there were none.
            batch
                .target
                .write(&self.metrics, &batch.keys, batch.expires_at);
            return None;
        };
        match writer.try_send(batch) {
            Ok(()) => {
                self.metrics.datapath.allow_batches_deferred.inc();
                Some(Box::pin(async move {
                    // Sent or dropped, the batch is over: the answer goes either way.
                    let _ = written.await;
                }))
            }
            // A backlog, or a writer that ended (a panic): written here after all.
            Err(mpsc::TrySendError::Full(batch) | mpsc::TrySendError::Disconnected(batch)) => {
                static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
                if let Some(held_back) = BUDGET.allow() {
                    tracing::warn!(
                        held_back,
                        "the allow writer is {} batches behind, or gone: writing a large \
                         answer's allow entries on the answer loop",
                        ALLOW_BATCHES_QUEUED
                    );
                }
                batch
                    .target
                    .write(&self.metrics, &batch.keys, batch.expires_at);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FqdnKey {
        FqdnKey {
            endpoint_id: 7,
            ip: IpAddr::from([198, 18, 0, 1]),
            proto: Some(6),
            port: Some(port),
        }
    }

    #[test]
    fn the_allow_memo_covers_repeats_within_its_second_only() {
        let mut memo = AllowMemo::default();
        assert!(
            !memo.covers(1_000, &key(443), 1_300),
            "nothing asserted yet"
        );
        memo.assert(key(443), 1_300);
        assert!(
            memo.covers(1_000, &key(443), 1_300),
            "the same answer again"
        );
        assert!(memo.covers(1_000, &key(443), 1_299), "a counted-down TTL");
        assert!(
            !memo.covers(1_000, &key(443), 1_301),
            "a later expiry is written"
        );
        assert!(!memo.covers(1_000, &key(80), 1_300), "another key");

        // An earlier expiry asserted later never lowers what the memo knows.
        memo.assert(key(443), 1_200);
        assert!(memo.covers(1_000, &key(443), 1_300));

        // The next second starts from nothing: whatever was removed meanwhile is written again.
        assert!(!memo.covers(1_001, &key(443), 1_300));
        memo.assert(key(443), 1_300);
        assert!(memo.covers(1_001, &key(443), 1_300));

        // An entry expiring now is left to the map, which the reconciler may be emptying.
        memo.assert(key(80), 1_001);
        assert!(!memo.covers(1_001, &key(80), 1_001));

        // A batch begun in the second before is told nothing, and leaves the memo alone (it
        // cleared it, and the next answer cleared it again, back and forth).
        assert!(!memo.covers(1_000, &key(443), 1_300));
        assert!(memo.covers(1_001, &key(443), 1_300));

        // The wall clock stepped back minutes: the memo starts over there (it covered nothing
        // until the clock came back, and grew with every key meanwhile).
        assert!(!memo.covers(501, &key(443), 1_300));
        memo.assert(key(443), 1_300);
        assert!(memo.covers(501, &key(443), 1_300));
        assert_eq!(memo.asserted.len(), 1);
    }
}
