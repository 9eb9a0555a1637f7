//! The traits through which the engine reaches the process it runs in.
//!
//! The agent implements them in-process; `warden-dnsproxy` implements them from the policy
//! snapshot it receives over the agent's Unix socket. Every method is called on the hot path,
//! so implementations answer from memory and never block on I/O.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use warden_fqdn::{CacheEntry, DnsCache, Expired, UnixTime};
use warden_policy::{DnsName, EndpointId, FqdnGrant, L4Proto, PolicyRepository};
use warden_telemetry::{CacheMetrics, FlowLog, Metrics};

/// The cache key of clients that are no known endpoint.
pub const UNKNOWN_ENDPOINT: &str = "reserved:unknown";

/// The transport a query came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }

    pub fn l4(self) -> L4Proto {
        match self {
            Transport::Udp => L4Proto::Udp,
            Transport::Tcp => L4Proto::Tcp,
        }
    }
}

/// What the process knows about a query's sender.
#[derive(Debug, Clone, Default)]
pub struct ClientContext {
    /// The endpoint and its stable key (`namespace/name`), when the sender is one.
    pub endpoint: Option<(EndpointId, Arc<str>)>,
    /// Where the client sent the query before the datapath redirected it to us.
    pub original_server: Option<SocketAddr>,
    /// The datapath vouches that an enrolled workload sent the query, yet this process does
    /// not know (or no longer knows) the endpoint its cgroup belongs to: its policy cannot be
    /// checked, and the query must not pass for an unenforced sender's. It gets SERVFAIL,
    /// which clients retry.
    pub unresolved: bool,
}

/// Who sent a query: by source address, or by the datapath's redirect record.
pub trait EndpointLookup: Send + Sync + 'static {
    fn lookup(&self, client: SocketAddr, transport: Transport) -> ClientContext;
}

/// The policy in force. A query uses one revision from start to end.
pub trait PolicySource: Send + Sync + 'static {
    fn current(&self) -> Arc<PolicyRepository>;
}

/// What an allowed answer taught: `ips` of `name`, allowed until `expires_at` for every grant.
#[derive(Debug)]
pub struct AllowRequest<'a> {
    pub name: &'a DnsName,
    pub ips: &'a [IpAddr],
    pub expires_at: UnixTime,
    pub grants: &'a [FqdnGrant],
}

/// A future the answer waits for, bounded by `response_max_delay`.
pub type HoldFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Writes allow entries before an answer is released.
pub trait DatapathHook: Send + Sync + 'static {
    /// Called once per allowed answer that carries IPs matched by at least one toFQDNs
    /// selector. Synchronous writes (map updates) happen inside the call; an implementation
    /// that must wait for something returns a future, and the answer waits for it.
    fn allow(&self, request: &AllowRequest<'_>) -> Option<HoldFuture>;
}

/// `datapath.mode: none`: connections are not policed, so there is nothing to write.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDatapath;

impl DatapathHook for NoDatapath {
    fn allow(&self, _request: &AllowRequest<'_>) -> Option<HoldFuture> {
        None
    }
}

/// An answered name, as the proxy recorded it; sent to the agent by `warden-dnsproxy`.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub endpoint: Arc<str>,
    pub name: DnsName,
    pub ips: Vec<IpAddr>,
    pub ttl: u32,
    pub expires_at: UnixTime,
    /// When the answer came, Unix milliseconds: a cache clean made after it removes the
    /// mapping.
    pub learned_at_ms: u64,
    pub server: SocketAddr,
}

/// Told, after the answer is released, of every mapping that changed the cache (a new IP, a
/// later expiry); an answer repeating what the cache holds is not told again. Must not block.
pub trait MappingObserver: Send + Sync + 'static {
    fn on_mapping(&self, mapping: Mapping);
}

impl MappingObserver for () {
    fn on_mapping(&self, _mapping: Mapping) {}
}

/// The FQDN cache, shared between the engine and its process. Critical sections are a map
/// operation long and never span an `.await`. A `parking_lot` mutex, for its fair unlock: a
/// walk over the whole cache taken a chunk per hold hands the lock to a waiting answer between
/// chunks, where a plain unlock let the walker take it straight back (measured: answers
/// waited up to 18 ms on a sweep of a million entries in 1,024-pair holds).
#[derive(Debug, Clone)]
pub struct SharedCache(Arc<Mutex<DnsCache>>);

impl SharedCache {
    pub fn new(cache: DnsCache) -> SharedCache {
        SharedCache(Arc::new(Mutex::new(cache)))
    }

    /// The cache (also after a thread panicked holding it: its maps stay consistent because
    /// every mutation is a single call that completes or leaves nothing half-done).
    pub fn lock(&self) -> MutexGuard<'_, DnsCache> {
        self.0.lock()
    }

    /// Removes what expired at `now` (see [`DnsCache::gc`]), [`GC_CHUNK`] pairs per hold of
    /// the lock, so that a sweep of a large cache, and the compaction that follows one that
    /// left it mostly vacant, never hold up a DNS answer for longer than a chunk; returns how
    /// many IPs went. About 20 ms of CPU at a million entries with 1% due: callers run it off
    /// the runtime's workers.
    pub fn gc(&self, now: UnixTime) -> usize {
        let mut removed = 0;
        loop {
            let mut cache = self.lock();
            let step = cache.gc_step(now, GC_CHUNK);
            // Waiting answers go before the next chunk.
            MutexGuard::unlock_fair(cache);
            removed += step.removed;
            // Freed here, off the lock: milliseconds for a large cache.
            drop(step.retired);
            if step.done {
                return removed;
            }
        }
    }

    /// The once-a-second expiry of both processes: [`gc`](Self::gc) on a blocking thread
    /// (milliseconds of CPU at a million entries, which the DNS answers on a runtime worker
    /// would wait out), counted in `metrics`, whose size gauges it brings up to date; returns
    /// how many IPs went.
    pub async fn expire(&self, now: UnixTime, metrics: &CacheMetrics) -> usize {
        let expired = match self.off_runtime(move |cache| cache.gc(now)).await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::warn!(%error, "cache sweep panicked");
                0
            }
        };
        metrics
            .gc_deletions
            .inc_by(u64::try_from(expired).unwrap_or(u64::MAX));
        let (names, ips) = {
            let cache = self.lock();
            (cache.name_count(), cache.ip_count())
        };
        metrics.names.set(crate::engine::gauge(names));
        metrics.ips.set(crate::engine::gauge(ips));
        expired
    }

    /// Every unexpired entry, in no particular order, copied [`COPY_CHUNK`] pairs per hold
    /// of the lock, so that a copy of a large cache (the agent takes two a second) never holds
    /// up the DNS answers, which need the lock too, for longer than a chunk. Not one instant's
    /// view: a pair added meanwhile below the chunk being copied is left for the next copy. A
    /// compaction under way renumbers the pairs and starts the copy over; should compactions
    /// keep coming, the last try copies in one hold.
    pub fn entries_unordered(&self, now: UnixTime) -> Vec<CacheEntry> {
        self.entries_matching(now, |_, _| true)
    }

    /// [`Self::entries_unordered`] of the (endpoint, name) pairs `wanted` holds for, asked
    /// pair by pair before anything is copied: a listing of a few names of a large cache never
    /// copies it whole.
    pub fn entries_matching(
        &self,
        now: UnixTime,
        mut wanted: impl FnMut(&str, &str) -> bool,
    ) -> Vec<CacheEntry> {
        let mut entries = Vec::new();
        self.walk_in_chunks(
            |cache, from| cache.entries_chunk_matching(now, from, COPY_CHUNK, &mut wanted),
            |chunk, first| {
                if first {
                    entries.clear();
                }
                entries.extend(chunk);
            },
        );
        entries
    }

    /// [`DnsCache::keep_alive`] for each (endpoint, IP, until), [`COPY_CHUNK`] of them per hold
    /// of the lock: the agent's reconciler asserts every destination its datapath saw in use
    /// (up to 65,536) once a second. Returns how many (endpoint, name) records matched.
    pub fn keep_alive_all(&self, alive: &[(&str, IpAddr, UnixTime)]) -> usize {
        // By address: the endpoints using one go in one walk of the pairs holding it
        // ([`DnsCache::keep_alive_for`]), in the same hold.
        let mut by_address: Vec<(IpAddr, &str, UnixTime)> = alive
            .iter()
            .map(|&(endpoint, ip, until)| (ip, endpoint, until))
            .collect();
        by_address.sort_unstable_by_key(|&(ip, ..)| ip);
        let mut matched = 0;
        let mut endpoints = Vec::new();
        self.for_each_weighed_in_chunks(
            by_address.chunk_by(|a, b| a.0 == b.0),
            |group| group.len(),
            |cache, group| {
                endpoints.clear();
                endpoints.extend(group.iter().map(|&(_, endpoint, until)| (endpoint, until)));
                if let Some(&(ip, ..)) = group.first() {
                    matched += cache.keep_alive_for(ip, &endpoints);
                }
            },
        );
        matched
    }

    /// `work` on each of `items` under the lock, handing the lock to a waiting answer (a fair
    /// unlock) after every [`COPY_CHUNK`] of them: a peer's batch of mappings can hold tens of
    /// thousands of addresses, and the DNS path waits for this lock.
    pub fn for_each_in_chunks<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        work: impl FnMut(&mut DnsCache, T),
    ) {
        self.for_each_weighed_in_chunks(items, |_| 1, work);
    }

    /// [`for_each_in_chunks`](Self::for_each_in_chunks) where an item counts for `weight` of
    /// them (a group of several), the lock handed on once [`COPY_CHUNK`] have been done.
    fn for_each_weighed_in_chunks<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        weight: impl Fn(&T) -> usize,
        mut work: impl FnMut(&mut DnsCache, T),
    ) {
        let chunk = usize::try_from(COPY_CHUNK).unwrap_or(usize::MAX);
        let mut cache = self.lock();
        let mut in_hold = 0;
        for item in items {
            if in_hold >= chunk {
                MutexGuard::bump(&mut cache);
                in_hold = 0;
            }
            in_hold += weight(&item);
            work(&mut cache, item);
        }
    }

    /// Every unexpired entry, sorted (an admin listing): [`entries_unordered`], then sorted, on
    /// a blocking thread rather than a runtime worker (hundreds of ms of CPU at a million
    /// entries). Fails if that thread panicked or the runtime is shutting down.
    ///
    /// [`entries_unordered`]: Self::entries_unordered
    pub async fn entries_sorted(
        &self,
        now: UnixTime,
        wanted: impl FnMut(&str, &str) -> bool + Send + 'static,
    ) -> Result<Vec<CacheEntry>, String> {
        self.off_runtime(move |cache| {
            let mut entries = cache.entries_matching(now, wanted);
            warden_fqdn::sort_entries(&mut entries);
            entries
        })
        .await
        .map_err(|error| format!("the cache copy failed: {error}\n"))
    }

    /// [`DnsCache::remove_matching`], [`COPY_CHUNK`] pairs per hold of the lock (a quarter as
    /// many removals), as the copy is taken: a clean of a large cache walks every pair to find
    /// what matches. Pairs added meanwhile below the chunk being cleaned stay. Returns the
    /// removed IPs, sorted, each once: a pair removed, answered again and placed in a slot
    /// ahead of the walk is removed twice.
    pub fn remove_matching(&self, filter: impl FnMut(&str, &str) -> bool) -> Vec<Expired> {
        self.remove_learned_before(u64::MAX, filter)
    }

    /// [`remove_matching`](Self::remove_matching) of the pairs answered before `before_ms`
    /// (see [`DnsCache::remove_learned_before`]).
    pub fn remove_learned_before(
        &self,
        before_ms: u64,
        mut filter: impl FnMut(&str, &str) -> bool,
    ) -> Vec<Expired> {
        let removals = usize::try_from(COPY_CHUNK / 4).unwrap_or(usize::MAX);
        let mut removed = Vec::new();
        self.walk_in_chunks(
            |cache, from| {
                cache.remove_matching_chunk(&mut filter, before_ms, from, COPY_CHUNK, removals)
            },
            // What went, went: a walk started over after a compaction finds only the rest.
            |chunk, _first| removed.extend(chunk),
        );
        removed.sort_unstable();
        removed.dedup();
        removed
    }

    /// [`remove_matching`](Self::remove_matching) on a blocking thread rather than a runtime
    /// worker (a clean walks every pair: 160 to 180 ms of CPU for 100,000 of a million), for the
    /// agent's `warden fqdn cache clean` and the dnsproxy's copy of it. Fails if that thread
    /// panicked or the runtime is shutting down; what was removed until then stays removed.
    pub async fn clean(
        &self,
        filter: impl FnMut(&str, &str) -> bool + Send + 'static,
    ) -> Result<Vec<Expired>, String> {
        self.off_runtime(move |cache| cache.remove_matching(filter))
            .await
            .map_err(|error| format!("the cache clean failed: {error}\n"))
    }

    /// [`clean`](Self::clean) of what was answered before `before_ms` (Unix milliseconds):
    /// the dnsproxy's copy of a clean made then on the agent.
    pub async fn clean_learned_before(
        &self,
        before_ms: u64,
        filter: impl FnMut(&str, &str) -> bool + Send + 'static,
    ) -> Result<Vec<Expired>, String> {
        self.off_runtime(move |cache| cache.remove_learned_before(before_ms, filter))
            .await
            .map_err(|error| format!("the cache clean failed: {error}\n"))
    }

    /// Runs `work` on the cache on a blocking thread rather than a runtime worker, which
    /// answers DNS: for whatever walks the whole cache (milliseconds to hundreds of ms of CPU
    /// at a million entries). Fails if that thread panicked or the runtime is shutting down.
    pub async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&SharedCache) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let cache = self.clone();
        tokio::task::spawn_blocking(move || work(&cache)).await
    }

    /// Walks every pair a chunk per hold of the lock: `take` does a chunk's work under the lock
    /// from a pair number and says where to go on; `sink` gets its result after the lock,
    /// told whether it is the first of a walk (one started over when a compaction renumbered
    /// the pairs). Should compactions keep coming, the last walk is taken in one hold.
    fn walk_in_chunks<T>(
        &self,
        mut take: impl FnMut(&mut DnsCache, u32) -> (T, u32),
        mut sink: impl FnMut(T, bool),
    ) {
        'attempts: for _ in 0..COPY_ATTEMPTS {
            let started = self.lock().compactions();
            let mut from = 0;
            loop {
                let (chunk, next, bound) = {
                    let mut cache = self.lock();
                    if cache.compactions() != started {
                        continue 'attempts;
                    }
                    let (chunk, next) = take(&mut cache, from);
                    let bound = cache.pair_id_bound();
                    // Waiting answers go before the next chunk.
                    MutexGuard::unlock_fair(cache);
                    (chunk, next, bound)
                };
                sink(chunk, from == 0);
                if next >= bound {
                    return;
                }
                from = next;
            }
        }
        let mut cache = self.lock();
        let mut from = 0;
        loop {
            let (chunk, next) = take(&mut cache, from);
            sink(chunk, from == 0);
            if next >= cache.pair_id_bound() {
                return;
            }
            from = next;
        }
    }
}

/// Pairs copied (or cleaned, or keep-alives asserted) per hold of the cache's lock: well under
/// a millisecond of work.
pub const COPY_CHUNK: u32 = 1024;
/// Pairs swept for expiry per hold of the cache's lock: about 20 µs when few of them are
/// due. A hold stops after a quarter as many removals (each frees strings and table slots),
/// about 0.2 ms when most of a million entries expire at once; the compaction that may follow
/// copies this many pairs per hold (`make bench`, part 3).
pub const GC_CHUNK: u32 = 1024;
/// Chunked walks (copies, cleans) a compaction may restart before one is taken in a single hold.
const COPY_ATTEMPTS: usize = 3;

/// Everything the engine needs from its process.
#[derive(Clone)]
pub struct ProxyContext {
    /// `agent` or `dnsproxy`, in flow events.
    pub instance: Arc<str>,
    pub endpoints: Arc<dyn EndpointLookup>,
    pub policy: Arc<dyn PolicySource>,
    pub cache: SharedCache,
    pub datapath: Arc<dyn DatapathHook>,
    pub mappings: Arc<dyn MappingObserver>,
    pub metrics: Metrics,
    pub flows: Arc<FlowLog>,
}

impl std::fmt::Debug for ProxyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyContext")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch, from the wall clock: cache expiries survive restarts.
pub fn unix_now() -> UnixTime {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    UnixTime(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_fqdn::CacheLimits;

    const NOW: UnixTime = UnixTime(1_000);

    /// The IP of name `n` in [`filled`].
    fn nth_ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | n))
    }

    /// A cache of `pairs` names of one endpoint, one IP each, name `n` with TTL `ttl(n)`.
    fn filled(pairs: u32, ttl: impl Fn(u32) -> u32) -> DnsCache {
        let mut cache = DnsCache::new(CacheLimits::UNLIMITED);
        for n in 0..pairs {
            let ip = nth_ip(n);
            cache.insert(
                NOW,
                "default/test",
                &format!("n{n}.example."),
                &[ip],
                ttl(n),
            );
        }
        cache
    }

    #[test]
    fn a_chunked_copy_holds_every_entry_of_a_cache_larger_than_a_chunk() {
        let pairs = COPY_CHUNK * 2 + 7;
        let cache = filled(pairs, |_| 60);
        let whole = cache.entries(NOW);
        let shared = SharedCache::new(cache);
        let mut chunked = shared.entries_unordered(NOW);
        warden_fqdn::sort_entries(&mut chunked);
        assert_eq!(chunked.len(), usize::try_from(pairs).unwrap());
        assert_eq!(chunked, whole);
    }

    #[test]
    fn a_chunked_sweep_removes_every_expired_entry_of_a_cache_larger_than_a_chunk() {
        let pairs = GC_CHUNK * 2 + 7;
        // Every third name outlives the sweep.
        let shared = SharedCache::new(filled(pairs, |n| if n % 3 == 0 { 600 } else { 60 }));
        let later = UnixTime(NOW.0 + 60);
        let expired = pairs - pairs.div_ceil(3);
        assert_eq!(shared.gc(later), usize::try_from(expired).unwrap());
        assert_eq!(
            shared.lock().ip_count(),
            usize::try_from(pairs - expired).unwrap()
        );
        assert_eq!(shared.gc(later), 0, "nothing left due");
    }

    #[test]
    fn keep_alives_in_chunks_reach_every_entry() {
        let pairs = COPY_CHUNK * 2 + 3;
        let shared = SharedCache::new(filled(pairs, |_| 60));
        let ips: Vec<IpAddr> = (0..pairs).map(nth_ip).collect();
        let until = UnixTime(NOW.0 + 600);
        let alive: Vec<(&str, IpAddr, UnixTime)> =
            ips.iter().map(|&ip| ("default/test", ip, until)).collect();
        assert_eq!(shared.keep_alive_all(&alive), ips.len());
        // Past the TTL every entry is still there, kept for connections.
        let later = UnixTime(NOW.0 + 300);
        assert_eq!(shared.gc(later), 0);
        assert_eq!(shared.lock().entries(later).len(), ips.len());
    }

    #[test]
    fn keep_alives_of_one_address_for_several_endpoints_reach_each() {
        let mut cache = DnsCache::default();
        let (shared_ip, own_ip) = (nth_ip(1), nth_ip(2));
        for endpoint in ["default/a", "default/b"] {
            cache.insert(NOW, endpoint, "lb.example.", &[shared_ip], 60);
            cache.insert(NOW, endpoint, "www.example.", &[shared_ip], 60);
        }
        cache.insert(NOW, "default/a", "own.example.", &[own_ip], 60);
        let shared = SharedCache::new(cache);
        let until = UnixTime(NOW.0 + 600);
        let alive = [
            ("default/b", shared_ip, until),
            ("default/a", own_ip, until),
            ("default/a", shared_ip, until),
            ("default/unknown", shared_ip, until),
        ];
        assert_eq!(shared.keep_alive_all(&alive), 5);
        let later = UnixTime(NOW.0 + 300);
        assert_eq!(shared.gc(later), 0);
        assert_eq!(shared.lock().entries(later).len(), 5);
    }

    #[test]
    fn a_long_run_of_work_hands_the_lock_to_a_waiting_answer_between_chunks() {
        let shared = SharedCache::new(DnsCache::default());
        let chunk = COPY_CHUNK as usize;
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut waiter = None;
        let mut seen = 0;
        shared.for_each_in_chunks(0..2 * chunk, |_, item| {
            seen += 1;
            if item == 0 {
                let (shared, answered, waiting) =
                    (shared.clone(), answered.clone(), waiting.clone());
                waiter = Some(std::thread::spawn(move || {
                    waiting.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _cache = shared.lock();
                    answered.store(true, std::sync::atomic::Ordering::SeqCst);
                }));
            }
            if item == chunk - 1 {
                // The waiter runs, then has time to queue on the lock (half a second: a loaded
                // machine may take a while to run it the few steps there).
                while !waiting.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            if item == chunk {
                assert!(answered.load(std::sync::atomic::Ordering::SeqCst));
            }
        });
        assert_eq!(seen, 2 * chunk);
        waiter.unwrap().join().unwrap();
    }

    #[tokio::test]
    async fn a_sorted_copy_off_the_runtime_is_the_whole_cache_in_order() {
        let cache = filled(COPY_CHUNK + 5, |_| 60);
        let whole = cache.entries(NOW);
        let shared = SharedCache::new(cache);
        assert_eq!(
            shared.entries_sorted(NOW, |_, _| true).await,
            Ok(whole.clone())
        );
        // A filtered copy holds what passes, from every chunk.
        let wanted = |name: &str| name.ends_with("3.example.");
        let some: Vec<_> = whole.into_iter().filter(|e| wanted(&e.name)).collect();
        assert!(some.len() > 1);
        assert_eq!(
            shared
                .entries_sorted(NOW, move |_, name| wanted(name))
                .await,
            Ok(some)
        );
    }

    #[test]
    fn a_chunked_clean_removes_what_a_whole_one_does() {
        let pairs = COPY_CHUNK * 2 + 7;
        let mut whole = filled(pairs, |_| 60);
        let shared = SharedCache::new(whole.clone());
        let doomed = |_: &str, name: &str| name.ends_with("3.example.");
        let expected = whole.remove_matching(doomed);
        assert_eq!(expected.len(), usize::try_from(pairs.div_ceil(10)).unwrap());
        assert_eq!(shared.remove_matching(doomed), expected);
        assert_eq!(shared.lock().entries(NOW), whole.entries(NOW));
        // Everything: past the removals a hold takes, chunk after chunk.
        let rest = whole.remove_matching(|_, _| true);
        assert_eq!(shared.remove_matching(|_, _| true), rest);
        assert!(shared.lock().is_empty());
    }

    /// A compaction between two chunks renumbers the pairs: the walk starts over, and its
    /// first chunk says so.
    #[test]
    fn a_chunked_walk_starts_over_when_a_compaction_renumbers_the_pairs() {
        let pairs = COPY_CHUNK * 3;
        // Seven in eight expire at `later`: a sweep then compacts what is left.
        let shared = SharedCache::new(filled(pairs, |n| if n % 8 == 0 { 600 } else { 60 }));
        let later = UnixTime(NOW.0 + 60);
        let (mut walks, mut seen) = (0, 0);
        shared.walk_in_chunks(
            |cache, from| cache.entries_chunk(later, from, COPY_CHUNK),
            |chunk, first| {
                if first {
                    walks += 1;
                    seen = 0;
                }
                seen += chunk.len();
                if walks == 1 {
                    // Between two holds, as the once-a-second sweep would.
                    let mut cache = shared.lock();
                    let compactions = cache.compactions();
                    cache.gc(later);
                    assert!(cache.compactions() > compactions);
                }
            },
        );
        assert_eq!(walks, 2);
        assert_eq!(seen, usize::try_from(pairs / 8).unwrap());
    }
}
