mod interner;
mod rebuild;
mod record;
mod reverse;
mod slab;

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;

use hashbrown::HashTable;

use crate::{
    CacheEntry, CacheError, CacheLimits, CacheSnapshot, CachedIp, Expired, InsertOutcome,
    MAX_DNS_TTL, SNAPSHOT_VERSION, Source, UnixTime,
};
use interner::Interner;
use rebuild::Rebuild;
pub use rebuild::Retired;
use record::{IpList, IpRec};
use reverse::IpIndex;
use slab::{NONE, Slab};

/// Structures smaller than this are never compacted: the rebuild would cost more than the
/// memory it returns.
const COMPACT_MIN_SLOTS: usize = 1024;

/// Heap bytes a `malloc(bytes)` really takes (glibc-like: 8-byte header, 16-byte granules,
/// 32-byte minimum), so the estimate does not flatter small allocations such as names.
pub(crate) fn malloc_size(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        (bytes.saturating_add(8 + 15) & !15).max(32)
    }
}

/// The shortest time an answer's addresses stay in the cache, whatever its TTL (0 included):
/// its client connects right after it, and the reconciler, once a second, revokes an expired
/// entry nothing uses yet. With the second an answer came in, a TTL of 0 or 1 left a few
/// milliseconds: the connection it was asked for met the default deny.
const SHORTEST_LIFETIME_SECS: u32 = 1;

/// When the entries of an answer that came at `answered_ms` (Unix milliseconds) with `ttl`
/// expire: never sooner than the TTL says, so the end is rounded up to the second; but never
/// past [`MAX_DNS_TTL`] from the answer's second, where the peer and a restore draw the line
/// between an answer and garbage (the rounding would take the longest TTL a second past it).
fn answer_expiry(answered_ms: u64, ttl: u32) -> UnixTime {
    let lifetime_ms = u64::from(ttl.max(SHORTEST_LIFETIME_SECS)) * 1000;
    let rounded_up = answered_ms.saturating_add(lifetime_ms).div_ceil(1000);
    UnixTime(rounded_up.min((answered_ms / 1000).saturating_add(MAX_DNS_TTL)))
}

fn hash_pair(hasher: &RandomState, endpoint: u32, name: u32) -> u64 {
    hasher.hash_one((u64::from(endpoint) << 32) | u64::from(name))
}

/// The IPs one endpoint learned for one name. 56 bytes.
#[derive(Clone, Debug)]
struct Pair {
    endpoint: u32,
    name: u32,
    /// Neighbours among the pairs of the same name (any endpoint); see [`interner::Sym::head`].
    prev: u32,
    next: u32,
    /// When the latest answer behind these IPs came, here or at a peer (Unix milliseconds; 0:
    /// not known, as in a snapshot of an older build). A cache clean made while a peer was away
    /// reaches what the peer learned before it and spares what it learned since.
    learned: u64,
    ips: IpList,
}

/// Per-endpoint cache of DNS answers: (endpoint, name) -> IPs, each with its own expiry.
///
/// Layout, chosen for memory (the agent may hold millions of entries): endpoints and names are
/// interned once and referred to by `u32` ids; each (endpoint, name) is a 56-byte `Pair` in a
/// dense slab holding its first IP inline; every hash table stores only `u32` ids (5 bytes a
/// bucket). The reverse index maps each distinct IP to the pairs holding it. Vacated slots are
/// reused, and a structure left mostly empty after expiry is rebuilt compactly, so memory
/// follows the live set rather than its historical peak.
#[derive(Clone)]
pub struct DnsCache {
    limits: CacheLimits,
    endpoints: Interner,
    names: Interner,
    pairs: Slab<Pair>,
    pair_table: HashTable<u32>,
    pair_hasher: RandomState,
    ips: IpIndex,
    ip_count: usize,
    /// No record expires before this (it may be earlier than the true minimum), so `gc` can
    /// return at once until then instead of scanning.
    next_expiry: u64,
    /// Some pair may hold more than `max_ips_per_name` (after a merge, a restore or a lowered
    /// cap); the next `gc` trims and reports them, as those paths have no way to report.
    over_limit: bool,
    /// Names merges refused at four times the cap (see
    /// [`CacheLimits::merge_refuses_name`]), for the caller to count.
    merge_refusals: u64,
    /// Times the cache was compacted, which renumbers its pairs: a copy or a clean taken in
    /// chunks ([`entries_chunk`](Self::entries_chunk),
    /// [`remove_matching_chunk`](Self::remove_matching_chunk)) starts over when this changes
    /// under it.
    compactions: u64,
    /// The expiry sweep under way in steps ([`gc_step`](Self::gc_step)), if any.
    sweep: Option<Sweep>,
    /// The compaction under way in steps (the steps of [`gc_step`](Self::gc_step) that follow
    /// a sweep), if any.
    rebuild: Option<Box<Rebuild>>,
}

/// How far an expiry sweep taken in steps has got.
#[derive(Clone, Copy, Debug)]
struct Sweep {
    /// The first pair not swept yet.
    cursor: u32,
    /// The soonest expiry among what the sweep kept and what was added since it began: the
    /// cache's `next_expiry` once it ends.
    soonest: u64,
    /// Whether it trims names over `max_ips_per_name` (the cache was over the cap when it began).
    enforce: bool,
}

/// What one step of an expiry sweep did.
#[derive(Debug, Default)]
pub struct GcStep {
    /// IPs removed (expired, or over `max_ips_per_name`).
    pub removed: usize,
    /// The sweep, and the compaction that may follow it, went past the last pair (or nothing
    /// was due): no step is pending.
    pub done: bool,
    /// What a compaction finished by this step replaced: drop it after releasing the lock the
    /// cache is under.
    pub retired: Option<Retired>,
}

impl Default for DnsCache {
    fn default() -> Self {
        DnsCache::new(CacheLimits::UNLIMITED)
    }
}

impl fmt::Debug for DnsCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsCache")
            .field("limits", &self.limits)
            .field("names", &self.pairs.len())
            .field("ips", &self.ip_count)
            .finish_non_exhaustive()
    }
}

impl DnsCache {
    pub fn new(limits: CacheLimits) -> Self {
        DnsCache::with_capacity(limits, 0, 0, 0, 0)
    }

    fn with_capacity(
        limits: CacheLimits,
        endpoints: usize,
        names: usize,
        pairs: usize,
        ips: usize,
    ) -> Self {
        DnsCache {
            limits,
            endpoints: Interner::with_capacity(endpoints),
            names: Interner::with_capacity(names),
            pairs: Slab::with_capacity(pairs),
            pair_table: HashTable::with_capacity(pairs),
            pair_hasher: RandomState::new(),
            ips: IpIndex::with_capacity(ips),
            ip_count: 0,
            next_expiry: u64::MAX,
            over_limit: false,
            merge_refusals: 0,
            compactions: 0,
            sweep: None,
            rebuild: None,
        }
    }

    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// Names merges ([`insert_entry`](Self::insert_entry)) refused so far, at four times
    /// `max_names_per_endpoint`: only a peer, journal or snapshot holding what no cache within
    /// the cap holds sends that many.
    pub fn merge_refusals(&self) -> u64 {
        self.merge_refusals
    }

    /// The new `min_ttl` applies to later answers. A lower `max_ips_per_name` is enforced by
    /// the next [`gc`](Self::gc), which reports what it drops like any expiry.
    pub fn set_limits(&mut self, limits: CacheLimits) {
        let old = self.limits.max_ips_per_name;
        let new = limits.max_ips_per_name;
        if new != 0 && (old == 0 || new < old) {
            self.over_limit = true;
        }
        self.limits = limits;
    }

    /// Records a DNS answer for `name` seen by `endpoint`.
    ///
    /// The TTL is raised to `min_ttl` (and to a second), its end rounded up
    /// to the second; an IP already present keeps the later of its old and
    /// new expiry; past `max_ips_per_name` the soonest-expiring IPs go first (on a tie, IPs
    /// not in this answer before those in it, and the answer's last records before its
    /// first).
    pub fn insert(
        &mut self,
        now: UnixTime,
        endpoint: &str,
        name: &str,
        ips: &[IpAddr],
        ttl: u32,
    ) -> InsertOutcome {
        self.insert_answered(now.0.saturating_mul(1000), endpoint, name, ips, ttl)
    }

    /// [`insert`](Self::insert) of an answer that came at `answered_ms` (Unix milliseconds),
    /// which the pair remembers to the millisecond (see
    /// [`remove_learned_before`](Self::remove_learned_before)).
    pub fn insert_answered(
        &mut self,
        answered_ms: u64,
        endpoint: &str,
        name: &str,
        ips: &[IpAddr],
        ttl: u32,
    ) -> InsertOutcome {
        let expires = answer_expiry(answered_ms, self.limits.effective_ttl(ttl));
        let mut out = InsertOutcome {
            expires_at: expires,
            ..InsertOutcome::default()
        };
        if ips.is_empty() {
            return out;
        }
        // The cap is looked at only for a name new to the endpoint: a repeat answer, the
        // common case, costs the one lookup it did before there was a cap.
        let pid = match self.find_pair(endpoint, name) {
            Some(pid) => pid,
            None if self.endpoint_is_full(endpoint) => {
                out.refused = true;
                return out;
            }
            None => match self.pair_for(endpoint, name) {
                Some(pid) => pid,
                None => return out,
            },
        };
        if let Some(pair) = self.pairs.get_mut(pid) {
            pair.learned = pair.learned.max(answered_ms);
        }
        for &ip in ips {
            if out.added.contains(&ip) || out.refreshed.contains(&ip) {
                continue;
            }
            let Some(pair) = self.pairs.get_mut(pid) else {
                break;
            };
            if let Some(rec) = pair.ips.find_mut(ip) {
                out.extended |= rec.extend_dns(expires.0, Source::Lookup);
                out.refreshed.push(ip);
            } else if self.ips.add(ip, pid) {
                pair.ips
                    .push(IpRec::from_dns(ip, expires.0, Source::Lookup));
                self.ip_count += 1;
                out.added.push(ip);
            }
        }
        self.note_expiry(expires.0);
        for rec in self.trim(pid, ips) {
            let ip = rec.ip();
            if let Some(pos) = out.added.iter().position(|&a| a == ip) {
                out.added.remove(pos);
            } else {
                out.refreshed.retain(|r| *r != ip);
                out.evicted.push(ip);
            }
        }
        if self.pairs.get(pid).is_some_and(|p| p.ips.is_empty()) {
            self.remove_pair(pid);
        }
        self.mirror(pid);
        out
    }

    /// Folds in one IP with an absolute expiry, as found in a peer's cache, a journal or a
    /// snapshot, answered at `learned_ms` (Unix milliseconds). Later expiry wins (on a tie Lookup beats
    /// Restored), and the later time learned, so merging in any order converges;
    /// `Source::Connection` extends only the connection grace. Returns whether an IP changed.
    /// A name at twice `max_ips_per_name` is trimmed to it first
    /// ([`CacheLimits::merge_trims_ips`]); a name new to an endpoint at four times
    /// `max_names_per_endpoint` is refused (counted in [`merge_refusals`](Self::merge_refusals)).
    pub fn insert_entry(
        &mut self,
        endpoint: &str,
        name: &str,
        ip: IpAddr,
        expires_at: UnixTime,
        source: Source,
        learned_ms: u64,
    ) -> bool {
        let pid = match self.find_pair(endpoint, name) {
            Some(pid) => pid,
            None if self.endpoint_refuses_merged_name(endpoint) => {
                self.merge_refusals += 1;
                return false;
            }
            None => match self.pair_for(endpoint, name) {
                Some(pid) => pid,
                None => return false,
            },
        };
        if let Some(pair) = self.pairs.get_mut(pid) {
            pair.learned = pair.learned.max(learned_ms);
        }
        let changed = self.fold_in(pid, ip, expires_at, source);
        self.mirror(pid);
        changed
    }

    /// `insert_entry`'s work on its pair, found or just made; returns whether anything
    /// changed. Apart, so that every way out of it ends with one `mirror`.
    fn fold_in(&mut self, pid: u32, ip: IpAddr, expires_at: UnixTime, source: Source) -> bool {
        let Some(pair) = self.pairs.get_mut(pid) else {
            return false;
        };
        if let Some(rec) = pair.ips.find_mut(ip) {
            return rec.extend_dns(expires_at.0, source);
        }
        if self.limits.merge_trims_ips(pair.ips.len()) {
            // What the next sweep would drop, dropped now: amortized, one trim per cap's
            // worth of additions. Its allow entries go as the reconciler finds them unwanted.
            self.trim(pid, &[]);
        }
        let Some(pair) = self.pairs.get_mut(pid) else {
            return false;
        };
        let added = self.ips.add(ip, pid);
        if added {
            pair.ips.push(IpRec::from_dns(ip, expires_at.0, source));
            let held = pair.ips.len();
            self.ip_count += 1;
            self.over_limit |= self.limits.is_over(held);
            self.note_expiry(expires_at.0);
        } else if pair.ips.is_empty() {
            // Created for this IP, which the index could not take (ids exhausted).
            self.remove_pair(pid);
        }
        added
    }

    /// Unexpired IPs `endpoint` learned for `name`, sorted by IP, including those only kept
    /// for connections ([`Source::Connection`]); whether those still admit new connections is
    /// the caller's policy.
    pub fn lookup(&self, now: UnixTime, endpoint: &str, name: &str) -> Vec<CachedIp> {
        self.find_pair(endpoint, name)
            .and_then(|pid| self.pairs.get(pid))
            .map(|p| live_ips(&p.ips, now.0))
            .unwrap_or_default()
    }

    /// Unexpired IPs of `name` learned by any endpoint, sorted and deduplicated.
    pub fn lookup_any_endpoint(&self, now: UnixTime, name: &str) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .pairs_of_name(name)
            .flat_map(|p| p.ips.as_slice())
            .filter(|r| r.is_live(now.0))
            .map(IpRec::ip)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// (endpoint, name) pairs holding `ip` unexpired, sorted.
    pub fn names_for_ip(&self, now: UnixTime, ip: IpAddr) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .ips
            .pairs_of(ip)
            .filter_map(|pid| self.pairs.get(pid))
            .filter(|p| p.ips.find(ip).is_some_and(|r| r.is_live(now.0)))
            .map(|p| {
                (
                    self.endpoints.text(p.endpoint).to_owned(),
                    self.names.text(p.name).to_owned(),
                )
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Keeps `ip` alive for `endpoint` (under every name it came from) until at least `until`,
    /// because connections still use it; once the DNS TTL has run out the IP shows as
    /// [`Source::Connection`]. This also saves an IP whose TTL ran out but that `gc` has not
    /// removed yet, as its datapath entry still exists. Returns how many names matched.
    pub fn keep_alive(&mut self, endpoint: &str, ip: IpAddr, until: UnixTime) -> usize {
        self.keep_alive_for(ip, &[(endpoint, until)])
    }

    /// [`keep_alive`](Self::keep_alive) of `ip` for each (endpoint, until) of `endpoints`, in
    /// one walk of the pairs holding the address: a load balancer's address that thousands of
    /// names under a wildcard resolve to is held by as many pairs per endpoint, and a walk per
    /// endpoint walked them all again for each. Returns how many names matched.
    pub fn keep_alive_for(&mut self, ip: IpAddr, endpoints: &[(&str, UnixTime)]) -> usize {
        // By endpoint id, the latest `until` of each.
        let mut wanted: Vec<(u32, u64)> = endpoints
            .iter()
            .filter_map(|&(endpoint, until)| Some((self.endpoints.find(endpoint)?, until.0)))
            .collect();
        wanted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        wanted.dedup_by_key(|&mut (ep, _)| ep);
        if wanted.is_empty() {
            return 0;
        }
        let mut matched = 0;
        // Only while compacting: the pairs whose record changed, to copy again.
        let mut changed = Vec::new();
        for pid in self.ips.pairs_of(ip) {
            let Some(pair) = self.pairs.get_mut(pid) else {
                continue;
            };
            let Some(&(_, until)) = wanted
                .binary_search_by_key(&pair.endpoint, |&(ep, _)| ep)
                .ok()
                .and_then(|at| wanted.get(at))
            else {
                continue;
            };
            if let Some(rec) = pair.ips.find_mut(ip) {
                if rec.extend_alive(until) && self.rebuild.is_some() {
                    changed.push(pid);
                }
                matched += 1;
            }
        }
        for pid in changed {
            self.mirror(pid);
        }
        matched
    }

    /// Removes every IP expired at `now` (and trims names over `max_ips_per_name` after a
    /// merge, restore or lowered cap); returns what was removed, sorted, so the caller can
    /// revoke the datapath entries derived from it. One pass over every pair: under a lock the
    /// DNS path waits for, prefer [`gc_step`](Self::gc_step).
    pub fn gc(&mut self, now: UnixTime) -> Vec<Expired> {
        // A compaction in steps under way is dropped: the cache it copies is still whole, and
        // this sweep compacts in one go if it leaves the cache sparse.
        self.rebuild = None;
        // A whole sweep covers every pair at this `now`, so one under way starts over.
        if let Some(sweep) = self.sweep.take() {
            self.over_limit |= sweep.enforce;
        }
        let mut removed = Vec::new();
        self.sweep_step(now, u32::MAX, usize::MAX, Some(&mut removed));
        self.compact_if_sparse();
        removed.sort_unstable();
        removed
    }

    /// The same sweep as [`gc`](Self::gc), `pairs` pairs at a time: call again (with the lock
    /// released in between) until [`GcStep::done`]. A pair added or refreshed between steps is
    /// accounted for, whichever side of the sweep it lands on: what it holds expires no
    /// later than the next sweep after its TTL. Returns at once when nothing is due.
    ///
    /// A step ends early once `pairs / 4` IPs were removed. A sweep that leaves the cache
    /// mostly vacant (or a call that finds it so, after [`remove_matching`]) goes on into a
    /// compaction, also in steps of `pairs` pairs (a copied pair costs less than an expiring
    /// one), during which the cache answers and changes as usual; the step that finishes it
    /// hands back the replaced structures ([`GcStep::retired`]), to be dropped after the lock.
    ///
    /// [`remove_matching`]: Self::remove_matching
    pub fn gc_step(&mut self, now: UnixTime, pairs: u32) -> GcStep {
        if self.rebuild.is_some() {
            let (done, retired) = self.rebuild_step(pairs);
            return GcStep {
                removed: 0,
                done,
                retired,
            };
        }
        // A removal costs tens of times a look at a pair that stays (strings freed, tables
        // edited, cache misses): a step of a mass expiry stops at a quarter as many, so that it
        // holds the lock about as long as an ordinary one.
        let removals = usize::try_from(pairs / 4).unwrap_or(usize::MAX).max(1);
        let mut step = self.sweep_step(now, pairs, removals, None);
        if step.done && self.is_sparse() {
            self.start_rebuild();
            step.done = false;
        }
        step
    }

    /// Sweeps up to `pairs` pairs, stopping early once `removals` IPs went.
    fn sweep_step(
        &mut self,
        now: UnixTime,
        pairs: u32,
        removals: usize,
        mut report: Option<&mut Vec<Expired>>,
    ) -> GcStep {
        // Never with a compaction under way (`gc_step` goes on with it, `gc` drops it), so the
        // changes below need no mirroring into its copy.
        debug_assert!(self.rebuild.is_none(), "sweep during a compaction");
        let now = now.0;
        let mut sweep = match self.sweep.take() {
            Some(sweep) => sweep,
            None if now < self.next_expiry && !self.over_limit => {
                return GcStep {
                    removed: 0,
                    done: true,
                    retired: None,
                };
            }
            None => Sweep {
                cursor: 0,
                soonest: u64::MAX,
                enforce: std::mem::take(&mut self.over_limit),
            },
        };
        // At least one pair a step, so that a caller looping until done always gets there.
        let to = sweep
            .cursor
            .saturating_add(pairs.max(1))
            .min(self.pairs.id_bound());
        let mut removed = 0;
        let mut unindexed = Vec::new();
        let mut next = sweep.cursor;
        while next < to && removed < removals {
            let pid = next;
            next += 1;
            let Some(pair) = self.pairs.get_mut(pid) else {
                continue;
            };
            let (ep, nm) = (pair.endpoint, pair.name);
            let mut gone = pair.ips.extract(|r| !r.is_live(now));
            for rec in &gone {
                unindexed.push((rec.ip(), pid));
                self.ip_count = self.ip_count.saturating_sub(1);
            }
            if sweep.enforce {
                gone.extend(self.trim(pid, &[]));
            }
            let Some(pair) = self.pairs.get(pid) else {
                continue;
            };
            for rec in pair.ips.as_slice() {
                sweep.soonest = sweep.soonest.min(rec.expires());
            }
            let emptied = pair.ips.is_empty();
            removed += gone.len();
            if let Some(report) = report.as_deref_mut()
                && !gone.is_empty()
            {
                let (endpoint, name) = (self.endpoints.text(ep), self.names.text(nm));
                report.extend(gone.iter().map(|rec| Expired {
                    endpoint: endpoint.to_owned(),
                    name: name.to_owned(),
                    ip: rec.ip(),
                }));
            }
            if emptied {
                self.remove_pair(pid);
            }
        }
        // Together: an IP shared by many expiring names is then walked once, not once each.
        self.ips.remove_many(unindexed);
        if next < self.pairs.id_bound() {
            sweep.cursor = next;
            self.sweep = Some(sweep);
            return GcStep {
                removed,
                done: false,
                retired: None,
            };
        }
        self.next_expiry = sweep.soonest;
        GcStep {
            removed,
            done: true,
            retired: None,
        }
    }

    /// Something added now expires at `at`: the next sweep must not start later.
    fn note_expiry(&mut self, at: u64) {
        self.next_expiry = self.next_expiry.min(at);
        if let Some(sweep) = &mut self.sweep {
            sweep.soonest = sweep.soonest.min(at);
        }
    }

    /// Removes every (endpoint, name) for which `filter` returns true, expired or not (e.g.
    /// `warden fqdn cache clean`); returns the removed IPs like [`gc`](Self::gc). A cache left
    /// mostly vacant is compacted by the next [`gc_step`](Self::gc_step) or [`gc`](Self::gc).
    /// One pass over every pair: under a lock the DNS path waits for, prefer
    /// [`remove_matching_chunk`](Self::remove_matching_chunk).
    pub fn remove_matching(&mut self, mut filter: impl FnMut(&str, &str) -> bool) -> Vec<Expired> {
        self.remove_learned_before(u64::MAX, &mut filter)
    }

    /// [`remove_matching`](Self::remove_matching) of the pairs last answered before
    /// `before_ms` (Unix milliseconds; or at a time not known): a clean made then elsewhere,
    /// which must not take what was answered since.
    pub fn remove_learned_before(
        &mut self,
        before_ms: u64,
        mut filter: impl FnMut(&str, &str) -> bool,
    ) -> Vec<Expired> {
        let (mut removed, _) =
            self.remove_matching_chunk(&mut filter, before_ms, 0, u32::MAX, usize::MAX);
        removed.sort_unstable();
        removed
    }

    /// The removal of [`remove_learned_before`](Self::remove_learned_before) (`u64::MAX`: of
    /// everything matching) for the pairs numbered `from` up to `from + pairs`, stopping early
    /// once `removals` pairs matched (a removal costs tens of times a look), and the number to
    /// go on from (at or past [`pair_id_bound`](Self::pair_id_bound) when done), unsorted: a
    /// clean of a large cache taken a piece per hold of its lock. Valid while
    /// [`compactions`](Self::compactions) stays the same.
    pub fn remove_matching_chunk(
        &mut self,
        filter: &mut impl FnMut(&str, &str) -> bool,
        learned_before_ms: u64,
        from: u32,
        pairs: u32,
        removals: usize,
    ) -> (Vec<Expired>, u32) {
        let end = from.saturating_add(pairs).min(self.pairs.id_bound());
        let mut doomed = Vec::new();
        let mut to = from;
        while to < end && doomed.len() < removals {
            let pid = to;
            to += 1;
            if self.pairs.get(pid).is_some_and(|p| {
                p.learned < learned_before_ms
                    && filter(self.endpoints.text(p.endpoint), self.names.text(p.name))
            }) {
                doomed.push(pid);
            }
        }
        let mut removed = Vec::new();
        for pid in doomed {
            let Some(pair) = self.pairs.get(pid) else {
                continue;
            };
            let endpoint = self.endpoints.text(pair.endpoint).to_owned();
            let name = self.names.text(pair.name).to_owned();
            for rec in self.remove_pair(pid) {
                removed.push(Expired {
                    endpoint: endpoint.clone(),
                    name: name.clone(),
                    ip: rec.ip(),
                });
            }
        }
        (removed, to)
    }

    /// Everything unexpired, sorted by endpoint then name, IPs sorted within.
    pub fn entries(&self, now: UnixTime) -> Vec<CacheEntry> {
        let mut out = self.entries_unordered(now);
        sort_entries(&mut out);
        out
    }

    /// Everything unexpired, in no particular order (IPs sorted within): the copy to take
    /// under a lock the DNS path waits for, leaving the sorting, most of the cost, to after.
    pub fn entries_unordered(&self, now: UnixTime) -> Vec<CacheEntry> {
        self.entries_chunk(now, 0, u32::MAX).0
    }

    /// Unexpired entries of the pairs numbered `from` up to `from + pairs`, and the number to
    /// go on from (at or past [`pair_id_bound`](Self::pair_id_bound) when done): a copy of a
    /// large cache taken a piece per hold of its lock. Valid while
    /// [`compactions`](Self::compactions) stays the same.
    pub fn entries_chunk(&self, now: UnixTime, from: u32, pairs: u32) -> (Vec<CacheEntry>, u32) {
        self.entries_chunk_matching(now, from, pairs, |_, _| true)
    }

    /// [`Self::entries_chunk`] of the (endpoint, name) pairs `wanted` holds for, asked before
    /// anything of a pair is copied: a few names of a large cache cost a walk, not a copy.
    pub fn entries_chunk_matching(
        &self,
        now: UnixTime,
        from: u32,
        pairs: u32,
        mut wanted: impl FnMut(&str, &str) -> bool,
    ) -> (Vec<CacheEntry>, u32) {
        let to = from.saturating_add(pairs).min(self.pairs.id_bound());
        let entries = (from..to)
            .filter_map(|pid| {
                let pair = self.pairs.get(pid)?;
                let (endpoint, name) = (
                    self.endpoints.text(pair.endpoint),
                    self.names.text(pair.name),
                );
                if !wanted(endpoint, name) {
                    return None;
                }
                let ips = live_ips(&pair.ips, now.0);
                (!ips.is_empty()).then(|| CacheEntry {
                    endpoint: endpoint.to_owned(),
                    name: name.to_owned(),
                    ips,
                    learned_at_ms: pair.learned,
                })
            })
            .collect();
        (entries, to)
    }

    /// One past the highest pair number in use.
    pub fn pair_id_bound(&self) -> u32 {
        self.pairs.id_bound()
    }

    /// Changes whenever pairs are renumbered.
    pub fn compactions(&self) -> u64 {
        self.compactions
    }

    /// (endpoint, name) pairs held, including any that expired but were not collected yet.
    pub fn name_count(&self) -> usize {
        self.pairs.len()
    }

    /// (endpoint, name, IP) triples held, including any that expired but were not collected.
    pub fn ip_count(&self) -> usize {
        self.ip_count
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.len() == 0
    }

    /// Distinct endpoints, names and IPs held (what the interners and reverse index store).
    pub fn distinct_counts(&self) -> (usize, usize, usize) {
        (self.endpoints.len(), self.names.len(), self.ips.len())
    }

    /// Everything unexpired at `now`, to be serialized by the caller.
    pub fn snapshot(&self, now: UnixTime) -> CacheSnapshot {
        CacheSnapshot::new(now, self.entries_unordered(now))
    }

    /// Rebuilds a cache from a snapshot: entries already expired at `now` are dropped, the
    /// rest keep their absolute expiry, within `max_ttl` of `now` (one set since the snapshot
    /// was written bounds it too), and become [`Source::Restored`] (those kept for
    /// connections stay [`Source::Connection`]).
    pub fn restore(
        limits: CacheLimits,
        snapshot: CacheSnapshot,
        now: UnixTime,
    ) -> Result<DnsCache, CacheError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(CacheError::UnsupportedVersion {
                found: u64::from(snapshot.version),
                supported: SNAPSHOT_VERSION,
            });
        }
        let mut cache = DnsCache::new(limits);
        for entry in &snapshot.entries {
            for ip in entry.ips.iter().filter(|ip| ip.expires_at > now) {
                let source = match ip.source {
                    Source::Connection => Source::Connection,
                    Source::Lookup | Source::Restored => Source::Restored,
                };
                let expires_at = limits.bounded_expiry(now, ip.expires_at);
                cache.insert_entry(
                    &entry.endpoint,
                    &entry.name,
                    ip.ip,
                    expires_at,
                    source,
                    entry.learned_at_ms,
                );
            }
        }
        Ok(cache)
    }

    /// Union with another cache's entries, later expiry winning (see
    /// [`insert_entry`](Self::insert_entry)); commutative and idempotent, so both sides of a
    /// resync converge. Returns how many IPs changed.
    pub fn merge(&mut self, other: &[CacheEntry]) -> usize {
        let mut changed = 0;
        for entry in other {
            for ip in &entry.ips {
                if self.insert_entry(
                    &entry.endpoint,
                    &entry.name,
                    ip.ip,
                    ip.expires_at,
                    ip.source,
                    entry.learned_at_ms,
                ) {
                    changed += 1;
                }
            }
        }
        changed
    }

    /// Estimated heap bytes held, allocator overhead included. Walks every entry (O(n)).
    pub fn approx_heap_bytes(&self) -> usize {
        let lists: usize = self.pairs.iter().map(|(_, p)| p.ips.heap_bytes()).sum();
        self.rebuild.as_deref().map_or(0, Rebuild::heap_bytes)
            + self.endpoints.heap_bytes()
            + self.names.heap_bytes()
            + self.pairs.heap_bytes()
            + self.pair_table.allocation_size()
            + lists
            + self.ips.heap_bytes()
    }

    fn find_pair(&self, endpoint: &str, name: &str) -> Option<u32> {
        let ep = self.endpoints.find(endpoint)?;
        let nm = self.names.find(name)?;
        let pairs = &self.pairs;
        self.pair_table
            .find(hash_pair(&self.pair_hasher, ep, nm), |&id| {
                pairs
                    .get(id)
                    .is_some_and(|p| p.endpoint == ep && p.name == nm)
            })
            .copied()
    }

    /// The pair for (endpoint, name), created empty if absent; a caller that then adds
    /// nothing must remove it again. `None` only when ids are exhausted.
    fn pair_for(&mut self, endpoint: &str, name: &str) -> Option<u32> {
        if let Some(pid) = self.find_pair(endpoint, name) {
            return Some(pid);
        }
        let ep = self.endpoints.acquire(endpoint)?;
        let Some(nm) = self.names.acquire(name) else {
            self.endpoints.release(ep);
            return None;
        };
        let head = self.names.get(nm).map_or(NONE, |s| s.head);
        let Some(pid) = self.pairs.insert(Pair {
            endpoint: ep,
            name: nm,
            prev: NONE,
            next: head,
            learned: 0,
            ips: IpList::Many(Vec::new()),
        }) else {
            self.names.release(nm);
            self.endpoints.release(ep);
            return None;
        };
        if let Some(old_head) = self.pairs.get_mut(head) {
            old_head.prev = pid;
        }
        if let Some(sym) = self.names.get_mut(nm) {
            sym.head = pid;
        }
        let (pairs, hasher) = (&self.pairs, &self.pair_hasher);
        self.pair_table
            .insert_unique(hash_pair(hasher, ep, nm), pid, |&id| {
                pairs
                    .get(id)
                    .map_or(0, |p| hash_pair(hasher, p.endpoint, p.name))
            });
        Some(pid)
    }

    /// Whether `endpoint` holds `max_names_per_endpoint` names (each of its pairs holds one
    /// reference on it).
    fn endpoint_is_full(&self, endpoint: &str) -> bool {
        // Without a cap, not even the endpoint's lookup.
        self.limits.max_names_per_endpoint != 0
            && self.endpoints.find(endpoint).is_some_and(|ep| {
                self.limits
                    .is_full(usize::try_from(self.endpoints.refs(ep)).unwrap_or(usize::MAX))
            })
    }

    /// Whether a merge may not add a name to `endpoint` (see [`CacheLimits::merge_refuses_name`]).
    fn endpoint_refuses_merged_name(&self, endpoint: &str) -> bool {
        self.limits.max_names_per_endpoint != 0
            && self.endpoints.find(endpoint).is_some_and(|ep| {
                self.limits.merge_refuses_name(
                    usize::try_from(self.endpoints.refs(ep)).unwrap_or(usize::MAX),
                )
            })
    }

    /// Removes a pair with everything it still holds and returns those records.
    fn remove_pair(&mut self, pid: u32) -> Vec<IpRec> {
        let Some(pair) = self.pairs.remove(pid) else {
            return Vec::new();
        };
        let hash = hash_pair(&self.pair_hasher, pair.endpoint, pair.name);
        if let Ok(entry) = self.pair_table.find_entry(hash, |&id| id == pid) {
            entry.remove();
        }
        if let Some(prev) = self.pairs.get_mut(pair.prev) {
            prev.next = pair.next;
        } else if let Some(sym) = self.names.get_mut(pair.name) {
            sym.head = pair.next;
        }
        if let Some(next) = self.pairs.get_mut(pair.next) {
            next.prev = pair.prev;
        }
        let recs = pair.ips.as_slice().to_vec();
        for rec in &recs {
            self.ips.remove(rec.ip(), pid);
            self.ip_count = self.ip_count.saturating_sub(1);
        }
        self.names.release(pair.name);
        self.endpoints.release(pair.endpoint);
        self.mirror(pid);
        recs
    }

    /// Drops the pair's soonest-expiring IPs beyond `max_ips_per_name` and returns them in that
    /// order. Ties: IPs not in `answer` go first, then the answer's from its last record back,
    /// so that the records a client tries first stay allowed; then by IP.
    fn trim(&mut self, pid: u32, answer: &[IpAddr]) -> Vec<IpRec> {
        let Some(pair) = self.pairs.get_mut(pid) else {
            return Vec::new();
        };
        if !self.limits.is_over(pair.ips.len()) {
            return Vec::new();
        }
        // The answer's addresses with their place in it, sorted for lookup; a repeated address
        // keeps its first place.
        let mut fresh: Vec<(IpAddr, usize)> = answer.iter().copied().zip(0..).collect();
        fresh.sort_unstable();
        fresh.dedup_by_key(|&mut (ip, _)| ip);
        let excess = pair.ips.len() - self.limits.max_ips_per_name;
        let doom_order = |rec: &IpRec| {
            let ip = rec.ip();
            let place = fresh
                .binary_search_by_key(&ip, |&(ip, _)| ip)
                .ok()
                .map(|at| fresh[at].1);
            (
                rec.expires(),
                place.is_some(),
                std::cmp::Reverse(place.unwrap_or(0)),
                ip,
            )
        };
        let mut order: Vec<_> = pair.ips.as_slice().iter().map(doom_order).collect();
        order.sort_unstable();
        order.truncate(excess);
        let mut doomed: Vec<IpAddr> = order.iter().map(|&(_, _, _, ip)| ip).collect();
        doomed.sort_unstable();
        let mut gone = pair.ips.extract(|r| doomed.binary_search(&r.ip()).is_ok());
        for rec in &gone {
            self.ips.remove(rec.ip(), pid);
            self.ip_count = self.ip_count.saturating_sub(1);
        }
        gone.sort_unstable_by_key(doom_order);
        gone
    }

    fn pairs_of_name<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Pair> + use<'a> {
        let head = self
            .names
            .find(name)
            .and_then(|nm| self.names.get(nm))
            .map_or(NONE, |s| s.head);
        let mut cursor = head;
        // Bounded by the pair count so that even a broken link could not loop forever.
        std::iter::from_fn(move || {
            let pair = self.pairs.get(cursor)?;
            cursor = pair.next;
            Some(pair)
        })
        .take(self.pairs.len())
    }

    /// Rebuilds everything at its live size once a structure is mostly vacant, so a burst
    /// (or a long churn) does not pin its peak memory. Amortized O(1): at least three
    /// quarters of the entries went away since the structure last had this size. This one
    /// rebuilds in one go, for [`gc`](Self::gc); [`gc_step`](Self::gc_step) takes it in steps.
    fn compact_if_sparse(&mut self) {
        if self.is_sparse() {
            let compactions = self.compactions + 1;
            *self = self.compacted();
            self.compactions = compactions;
        }
    }

    fn is_sparse(&self) -> bool {
        self.pairs.is_sparse(COMPACT_MIN_SLOTS)
            || self.names.is_sparse(COMPACT_MIN_SLOTS)
            || self.endpoints.is_sparse(COMPACT_MIN_SLOTS)
            || self.ips.is_sparse(COMPACT_MIN_SLOTS)
            || (self.pair_table.capacity() >= COMPACT_MIN_SLOTS
                && self.pair_table.len() * 4 < self.pair_table.capacity())
    }

    /// An empty cache with the same limits, sized for `room(n)` of each of the `n` things this
    /// one holds.
    fn empty_sized_for(&self, room: impl Fn(usize) -> usize) -> DnsCache {
        DnsCache::with_capacity(
            self.limits,
            room(self.endpoints.len()),
            room(self.names.len()),
            room(self.pairs.len()),
            room(self.ips.len()),
        )
    }

    fn compacted(&self) -> DnsCache {
        let mut fresh = self.empty_sized_for(|held| held);
        for (_, pair) in self.pairs.iter() {
            fresh.put_pair(
                self.endpoints.text(pair.endpoint),
                self.names.text(pair.name),
                pair.learned,
                &pair.ips,
            );
        }
        // A sweep under way is dropped (the pairs are renumbered); the next starts over, and
        // `next_expiry` is still no later than anything held, as a sweep only raises it at its end.
        fresh.next_expiry = self.next_expiry;
        fresh.over_limit = self.over_limit || self.sweep.is_some_and(|sweep| sweep.enforce);
        fresh.merge_refusals = self.merge_refusals;
        fresh
    }
}

/// By endpoint, then name: the order of [`DnsCache::entries`] and of a snapshot.
pub fn sort_entries(entries: &mut [CacheEntry]) {
    entries.sort_unstable_by(|a, b| (&a.endpoint, &a.name).cmp(&(&b.endpoint, &b.name)));
}

fn live_ips(list: &IpList, now: u64) -> Vec<CachedIp> {
    let mut out: Vec<CachedIp> = list
        .as_slice()
        .iter()
        .filter(|r| r.is_live(now))
        .map(|r| {
            let (expires, source) = r.view(now);
            CachedIp {
                ip: r.ip(),
                expires_at: UnixTime(expires),
                source,
            }
        })
        .collect();
    out.sort_unstable_by_key(|c| c.ip);
    out
}

#[cfg(test)]
impl DnsCache {
    /// Cross-checks every index against the pairs; panics on the first inconsistency.
    fn assert_consistent(&self) {
        let mut expected: Vec<(IpAddr, u32)> = Vec::new();
        let mut triples = 0;
        for (pid, pair) in self.pairs.iter() {
            assert!(!pair.ips.is_empty(), "empty pair {pid} kept");
            let endpoint = self.endpoints.text(pair.endpoint);
            let name = self.names.text(pair.name);
            assert_eq!(self.find_pair(endpoint, name), Some(pid));
            assert!(
                self.pairs_of_name(name).any(|p| std::ptr::eq(p, pair)),
                "pair {pid} missing from its name's list"
            );
            let mut seen: Vec<IpAddr> = pair.ips.as_slice().iter().map(IpRec::ip).collect();
            triples += seen.len();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), pair.ips.len(), "duplicate IP in pair {pid}");
            expected.extend(seen.into_iter().map(|ip| (ip, pid)));
        }
        let mut actual = self.ips.references();
        expected.sort_unstable();
        actual.sort_unstable();
        assert_eq!(actual, expected, "reverse index disagrees with the pairs");
        assert_eq!(triples, self.ip_count);
        assert_eq!(self.pair_table.len(), self.pairs.len());
        let mut pairs_by_name: std::collections::HashMap<&str, usize> = Default::default();
        for (_, pair) in self.pairs.iter() {
            *pairs_by_name.entry(self.names.text(pair.name)).or_default() += 1;
        }
        assert_eq!(
            self.names.len(),
            pairs_by_name.len(),
            "leaked or lost names"
        );
        for (name, actual) in pairs_by_name {
            let listed = self.pairs_of_name(name).count();
            assert_eq!(listed, actual, "name list of {name}");
        }
        let mut distinct_eps: Vec<u32> = self.pairs.iter().map(|(_, p)| p.endpoint).collect();
        distinct_eps.sort_unstable();
        distinct_eps.dedup();
        assert_eq!(
            self.endpoints.len(),
            distinct_eps.len(),
            "leaked or lost endpoints"
        );
        for (_, pair) in self.pairs.iter() {
            for rec in pair.ips.as_slice() {
                assert!(rec.expires() >= self.next_expiry, "next_expiry too late");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const EP: &str = "youssef/test";

    fn ip4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n))
    }

    fn ip6(n: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n))
    }

    fn t(secs: u64) -> UnixTime {
        UnixTime(secs)
    }

    #[test]
    fn the_unordered_copy_holds_the_same_entries_and_sorts_into_the_snapshot() {
        let mut cache = DnsCache::new(CacheLimits::UNLIMITED);
        for (n, name) in ["z.io.", "a.io.", "m.io."].into_iter().enumerate() {
            let n = u32::try_from(n).unwrap();
            cache.insert(t(100), "b/ep", name, &[ip4(n)], 60);
            cache.insert(t(100), "a/ep", name, &[ip4(n + 10)], 60);
        }
        let sorted = cache.snapshot(t(120));
        let unordered = cache.entries_unordered(t(120));
        let mut names: Vec<&str> = unordered.iter().map(|e| e.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names, ["a.io.", "m.io.", "z.io."]);
        assert_eq!(CacheSnapshot::new(t(120), unordered), sorted);
        assert_eq!(sorted.entries, cache.entries(t(120)));

        // The same, a chunk at a time.
        let mut chunked = Vec::new();
        let mut from = 0;
        while from < cache.pair_id_bound() {
            let (chunk, next) = cache.entries_chunk(t(120), from, 2);
            assert!(chunk.len() <= 2);
            chunked.extend(chunk);
            from = next;
        }
        sort_entries(&mut chunked);
        assert_eq!(chunked, sorted.entries);

        // Only the wanted pairs, each asked once, the others never copied.
        let mut asked = Vec::new();
        let (mut wanted, _) =
            cache.entries_chunk_matching(t(120), 0, u32::MAX, |endpoint, name| {
                asked.push(format!("{endpoint} {name}"));
                endpoint == "a/ep" && name != "m.io."
            });
        sort_entries(&mut wanted);
        let expected: Vec<CacheEntry> = sorted
            .entries
            .iter()
            .filter(|entry| entry.endpoint == "a/ep" && entry.name != "m.io.")
            .cloned()
            .collect();
        assert_eq!(wanted, expected);
        assert_eq!(asked.len(), 6);
    }

    fn limits(min_ttl: u32, max_ips_per_name: usize) -> CacheLimits {
        CacheLimits {
            min_ttl,
            max_ttl: 0,
            max_ips_per_name,
            max_names_per_endpoint: 0,
        }
    }

    fn ips_of(found: &[CachedIp]) -> Vec<IpAddr> {
        found.iter().map(|c| c.ip).collect()
    }

    fn expired(endpoint: &str, name: &str, ip: IpAddr) -> Expired {
        Expired {
            endpoint: endpoint.into(),
            name: name.into(),
            ip,
        }
    }

    /// splitmix64: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len() as u64) as usize]
        }
    }

    #[test]
    fn can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync + Clone + fmt::Debug + Default>() {}
        assert_send_sync::<DnsCache>();
    }

    #[test]
    fn layout_stays_compact() {
        assert_eq!(size_of::<Pair>(), 56);
        assert_eq!(slab::slot_bytes::<Pair>(), 56);
        assert_eq!(slab::slot_bytes::<interner::Sym>(), 24);
    }

    #[test]
    fn min_ttl_raises_short_ttls_only() {
        let mut c = DnsCache::new(limits(60, 0));
        let out = c.insert(t(1000), EP, "short.example.", &[ip4(1)], 5);
        assert_eq!(out.expires_at, t(1060));
        assert_eq!(out.added.as_slice(), [ip4(1)]);
        assert_eq!(
            c.lookup(t(1059), EP, "short.example.")[0].expires_at,
            t(1060)
        );
        let out = c.insert(t(1000), EP, "long.example.", &[ip4(2)], 300);
        assert_eq!(out.expires_at, t(1300));
        let out = c.insert(t(1000), EP, "zero.example.", &[ip4(3)], 0);
        assert_eq!(out.expires_at, t(1060));
        c.set_limits(limits(0, 0));
        let out = c.insert(t(1000), EP, "later.example.", &[ip4(4)], 5);
        assert_eq!(out.expires_at, t(1005));
        assert_eq!(c.limits(), limits(0, 0));
    }

    #[test]
    fn an_answer_lives_its_whole_ttl_and_at_least_a_second() {
        let mut c = DnsCache::new(limits(0, 0));
        // Late in second 100: a TTL of 1 once expired at 101, a millisecond later.
        let out = c.insert_answered(100_999, EP, "one.example.", &[ip4(1)], 1);
        assert_eq!(out.expires_at, t(102));
        assert_eq!(c.lookup(t(101), EP, "one.example.").len(), 1);
        // A TTL of 0 once expired the second it came: the client's connect met no entry.
        let out = c.insert_answered(100_999, EP, "zero.example.", &[ip4(2)], 0);
        assert_eq!(out.expires_at, t(102));
        let out = c.insert_answered(100_000, EP, "exact.example.", &[ip4(3)], 0);
        assert_eq!(out.expires_at, t(101));
        // A whole second's answer keeps its TTL to the second.
        let out = c.insert_answered(100_000, EP, "five.example.", &[ip4(4)], 5);
        assert_eq!(out.expires_at, t(105));
        let out = c.insert_answered(100_001, EP, "later.example.", &[ip4(5)], 5);
        assert_eq!(out.expires_at, t(106));
        // The longest TTL stays within what the peer takes from this second.
        let longest = u32::try_from(MAX_DNS_TTL).unwrap();
        let out = c.insert_answered(100_001, EP, "long.example.", &[ip4(6)], longest);
        assert_eq!(out.expires_at, t(100).plus_secs(MAX_DNS_TTL));
    }

    #[test]
    fn expiry_is_exactly_at_ttl() {
        let mut c = DnsCache::default();
        c.insert(t(100), EP, "cilium.io.", &[ip4(1)], 30);
        let visible = |c: &DnsCache, now| {
            (
                c.lookup(t(now), EP, "cilium.io.").len(),
                c.lookup_any_endpoint(t(now), "cilium.io.").len(),
                c.names_for_ip(t(now), ip4(1)).len(),
                c.entries(t(now)).len(),
            )
        };
        assert_eq!(visible(&c, 129), (1, 1, 1, 1));
        assert_eq!(
            c.lookup(t(129), EP, "cilium.io.")[0].ttl_remaining(t(129)),
            1
        );
        assert_eq!(visible(&c, 130), (0, 0, 0, 0));
        assert!(c.gc(t(129)).is_empty());
        assert_eq!(c.name_count(), 1);
        assert_eq!(c.gc(t(130)), [expired(EP, "cilium.io.", ip4(1))]);
        assert_eq!((c.name_count(), c.ip_count()), (0, 0));
        assert!(c.is_empty());
        assert_eq!(c.distinct_counts(), (0, 0, 0));
        c.assert_consistent();
    }

    #[test]
    fn refresh_keeps_the_later_expiry() {
        let mut c = DnsCache::default();
        c.insert(t(0), EP, "a.example.", &[ip4(1), ip4(2)], 100);
        let out = c.insert(t(10), EP, "a.example.", &[ip4(2), ip4(3)], 20);
        assert_eq!(out.added.as_slice(), [ip4(3)]);
        assert_eq!(out.refreshed.as_slice(), [ip4(2)]);
        assert!(out.evicted.is_empty());
        let found = c.lookup(t(10), EP, "a.example.");
        let expiries: Vec<u64> = found.iter().map(|f| f.expires_at.0).collect();
        assert_eq!(ips_of(&found), [ip4(1), ip4(2), ip4(3)]);
        assert_eq!(expiries, [100, 100, 30]);
        c.insert(t(90), EP, "a.example.", &[ip4(1)], 50);
        assert_eq!(c.lookup(t(90), EP, "a.example.")[0].expires_at, t(140));
    }

    #[test]
    fn an_answer_repeating_the_cache_changes_nothing() {
        let mut c = DnsCache::default();
        assert!(c.insert(t(0), EP, "a.example.", &[ip4(1)], 100).changed());
        // The same answer in the same second, and a caching resolver's counted-down TTL.
        let same = c.insert(t(0), EP, "a.example.", &[ip4(1)], 100);
        assert!(!same.changed() && !same.extended);
        assert_eq!(same.refreshed.as_slice(), [ip4(1)]);
        assert!(!c.insert(t(40), EP, "a.example.", &[ip4(1)], 60).changed());
        // A later expiry, a new IP, another endpoint: each is news.
        assert!(c.insert(t(1), EP, "a.example.", &[ip4(1)], 100).extended);
        assert!(
            c.insert(t(1), EP, "a.example.", &[ip4(1), ip4(2)], 100)
                .changed()
        );
        assert!(
            c.insert(t(1), "ns/other", "a.example.", &[ip4(1)], 100)
                .changed()
        );
        // An answer whose only IP is evicted at once leaves the cache as it was.
        let mut capped = DnsCache::new(limits(0, 1));
        capped.insert(t(0), EP, "lb.example.", &[ip4(1)], 100);
        assert!(
            !capped
                .insert(t(0), EP, "lb.example.", &[ip4(2)], 10)
                .changed()
        );
        // A restored record gets an answer's backing on an equal expiry: that is a change.
        let mut restored = DnsCache::default();
        restored.insert_entry(EP, "a.example.", ip4(1), t(100), Source::Restored, 0);
        assert!(
            restored
                .insert(t(0), EP, "a.example.", &[ip4(1)], 100)
                .extended
        );
    }

    #[test]
    fn duplicate_and_empty_answers() {
        let mut c = DnsCache::default();
        let out = c.insert(
            t(0),
            EP,
            "a.example.",
            &[ip4(1), ip4(1), ip4(2), ip4(1)],
            10,
        );
        assert_eq!(out.added.as_slice(), [ip4(1), ip4(2)]);
        assert!(out.refreshed.is_empty());
        assert_eq!(c.ip_count(), 2);
        let out = c.insert(t(0), EP, "nothing.example.", &[], 10);
        assert_eq!(out.expires_at, t(10));
        assert_eq!(c.name_count(), 1);
        c.assert_consistent();
    }

    /// Of an answer longer than the cap, the addresses kept were the lowest-numbered ones, not
    /// the first records, which clients try first.
    #[test]
    fn of_a_long_answer_the_first_records_are_kept() {
        let mut c = DnsCache::new(limits(0, 3));
        let answer = [ip4(5), ip4(1), ip4(4), ip4(2), ip4(3)];
        let out = c.insert(t(0), EP, "lb.example.", &answer, 10);
        assert_eq!(out.added.as_slice(), [ip4(5), ip4(1), ip4(4)]);
        let kept: Vec<IpAddr> = c
            .lookup(t(0), EP, "lb.example.")
            .iter()
            .map(|cached| cached.ip)
            .collect();
        assert_eq!(kept, [ip4(1), ip4(4), ip4(5)]);
        c.assert_consistent();
    }

    #[test]
    fn max_ips_evicts_soonest_expiring_first() {
        let mut c = DnsCache::new(limits(0, 3));
        c.insert(t(0), EP, "lb.example.", &[ip4(1)], 10);
        c.insert(t(0), EP, "lb.example.", &[ip4(2)], 30);
        c.insert(t(0), EP, "lb.example.", &[ip4(3)], 20);
        let out = c.insert(t(0), EP, "lb.example.", &[ip4(4)], 25);
        assert_eq!(out.added.as_slice(), [ip4(4)]);
        assert_eq!(out.evicted.as_slice(), [ip4(1)]);
        let out = c.insert(t(0), EP, "lb.example.", &[ip4(5), ip4(6)], 40);
        assert_eq!(out.evicted.as_slice(), [ip4(3), ip4(4)]);
        assert_eq!(
            ips_of(&c.lookup(t(0), EP, "lb.example.")),
            [ip4(2), ip4(5), ip4(6)]
        );
        assert!(c.names_for_ip(t(0), ip4(1)).is_empty());
        assert_eq!(c.ip_count(), 3);
        c.assert_consistent();
    }

    #[test]
    fn an_endpoint_at_its_name_cap_takes_no_new_name_but_keeps_refreshing() {
        let mut c = DnsCache::new(CacheLimits {
            max_names_per_endpoint: 2,
            ..CacheLimits::UNLIMITED
        });
        assert!(!c.insert(t(100), EP, "a.io.", &[ip4(1)], 10).refused);
        assert!(!c.insert(t(100), EP, "b.io.", &[ip4(2)], 60).refused);
        let third = c.insert(t(100), EP, "c.io.", &[ip4(3)], 60);
        assert!(third.refused);
        assert!(!third.changed());
        assert!(c.lookup(t(100), EP, "c.io.").is_empty(), "nothing cached");
        // A name it holds still takes new IPs and later expiries.
        let again = c.insert(t(100), EP, "b.io.", &[ip4(2), ip4(4)], 90);
        assert!(!again.refused);
        assert_eq!(again.added.as_slice(), [ip4(4)]);
        // Other endpoints have caps of their own.
        assert!(!c.insert(t(100), "other/ep", "c.io.", &[ip4(3)], 60).refused);
        // Once a name expires and is swept, there is room again.
        c.gc(t(110));
        assert!(!c.insert(t(110), EP, "c.io.", &[ip4(3)], 60).refused);
        assert_eq!(c.name_count(), 3);
        c.assert_consistent();
    }

    #[test]
    fn an_ip_evicted_by_its_own_answer_is_never_reported() {
        let mut c = DnsCache::new(limits(0, 2));
        c.insert(t(0), EP, "lb.example.", &[ip4(1), ip4(2)], 100);
        let out = c.insert(t(0), EP, "lb.example.", &[ip4(3)], 10);
        assert!(out.added.is_empty() && out.evicted.is_empty() && out.refreshed.is_empty());
        assert_eq!(ips_of(&c.lookup(t(0), EP, "lb.example.")), [ip4(1), ip4(2)]);
        assert!(c.names_for_ip(t(0), ip4(3)).is_empty());
        // On equal expiry the IPs this answer did not mention go first.
        let out = c.insert(t(0), EP, "lb.example.", &[ip4(2), ip4(4)], 100);
        assert_eq!(out.added.as_slice(), [ip4(4)]);
        assert_eq!(out.refreshed.as_slice(), [ip4(2)]);
        assert_eq!(out.evicted.as_slice(), [ip4(1)]);
        c.assert_consistent();
    }

    #[test]
    fn lowering_the_cap_is_enforced_and_reported_by_gc() {
        let mut c = DnsCache::default();
        c.insert(t(0), EP, "lb.example.", &[ip4(1)], 10);
        c.insert(t(0), EP, "lb.example.", &[ip4(2), ip4(3)], 20);
        c.insert(t(0), "other", "lb.example.", &[ip4(1)], 10);
        c.set_limits(limits(0, 1));
        let removed = c.gc(t(1));
        assert_eq!(
            removed,
            [
                expired(EP, "lb.example.", ip4(1)),
                expired(EP, "lb.example.", ip4(2))
            ]
        );
        assert_eq!(ips_of(&c.lookup(t(1), EP, "lb.example.")), [ip4(3)]);
        assert_eq!(c.lookup(t(1), "other", "lb.example.").len(), 1);
        assert!(c.gc(t(1)).is_empty());
        c.assert_consistent();
    }

    #[test]
    fn reverse_and_cross_endpoint_lookups() {
        let mut c = DnsCache::default();
        c.insert(t(0), "ns/a", "cdn.example.", &[ip4(1), ip6(1)], 100);
        c.insert(t(0), "ns/b", "cdn.example.", &[ip4(1), ip4(2)], 50);
        c.insert(t(0), "ns/b", "alias.example.", &[ip4(1)], 10);
        assert_eq!(
            c.lookup_any_endpoint(t(0), "cdn.example."),
            [ip4(1), ip4(2), ip6(1)]
        );
        assert_eq!(
            c.lookup_any_endpoint(t(60), "cdn.example."),
            [ip4(1), ip6(1)]
        );
        assert!(c.lookup_any_endpoint(t(0), "unknown.example.").is_empty());
        let owners = |now| c.names_for_ip(t(now), ip4(1));
        assert_eq!(
            owners(0),
            [
                ("ns/a".to_owned(), "cdn.example.".to_owned()),
                ("ns/b".to_owned(), "alias.example.".to_owned()),
                ("ns/b".to_owned(), "cdn.example.".to_owned()),
            ]
        );
        assert_eq!(owners(20).len(), 2);
        assert!(c.names_for_ip(t(0), ip4(99)).is_empty());
        assert!(c.lookup(t(0), "ns/a", "alias.example.").is_empty());
        assert!(c.lookup(t(0), "ns/zzz", "cdn.example.").is_empty());
        assert_eq!((c.name_count(), c.ip_count()), (3, 5));
        assert_eq!(c.distinct_counts(), (2, 2, 3));
        c.assert_consistent();
    }

    #[test]
    fn keep_alive_holds_an_ip_past_its_ttl() {
        let mut c = DnsCache::default();
        c.insert(t(0), EP, "a.example.", &[ip4(1)], 10);
        c.insert(t(0), EP, "b.example.", &[ip4(1), ip4(2)], 10);
        c.insert(t(0), "other", "a.example.", &[ip4(1)], 10);
        assert_eq!(c.keep_alive(EP, ip4(1), t(50)), 2);
        assert_eq!(c.keep_alive("nobody", ip4(1), t(50)), 0);
        assert_eq!(c.keep_alive(EP, ip4(9), t(50)), 0);

        let before = c.lookup(t(5), EP, "a.example.");
        assert_eq!(
            (before[0].expires_at, before[0].source),
            (t(10), Source::Lookup)
        );
        let removed = c.gc(t(10));
        assert_eq!(
            removed,
            [
                expired("other", "a.example.", ip4(1)),
                expired(EP, "b.example.", ip4(2)),
            ]
        );
        let after = c.lookup(t(10), EP, "a.example.");
        assert_eq!(
            (after[0].expires_at, after[0].source),
            (t(50), Source::Connection)
        );
        assert_eq!(c.names_for_ip(t(30), ip4(1)).len(), 2);
        // A fresh answer vouches for it again.
        c.insert(t(20), EP, "a.example.", &[ip4(1)], 100);
        let again = c.lookup(t(20), EP, "a.example.");
        assert_eq!(
            (again[0].expires_at, again[0].source),
            (t(120), Source::Lookup)
        );
        assert!(c.gc(t(49)).is_empty());
        assert_eq!(c.gc(t(50)), [expired(EP, "b.example.", ip4(1))]);
        // Extending the grace of an IP whose TTL ran out but that gc has not removed yet
        // saves it, as its datapath entry still exists.
        assert_eq!(c.keep_alive(EP, ip4(1), t(200)), 1);
        assert!(c.gc(t(150)).is_empty());
        assert_eq!(
            c.lookup(t(150), EP, "a.example.")[0].source,
            Source::Connection
        );
        assert_eq!(c.gc(t(200)).len(), 1);
        assert_eq!(c.name_count(), 0);
        c.assert_consistent();
    }

    #[test]
    fn remove_matching_reports_everything_it_drops() {
        let mut c = DnsCache::default();
        c.insert(t(0), "ns/a", "api.example.com.", &[ip4(1), ip4(2)], 10);
        c.insert(t(0), "ns/b", "www.example.com.", &[ip4(1)], 1);
        c.insert(t(0), "ns/b", "cilium.io.", &[ip4(3)], 10);
        let removed = c.remove_matching(|_, name| name.ends_with(".example.com."));
        assert_eq!(
            removed,
            [
                expired("ns/a", "api.example.com.", ip4(1)),
                expired("ns/a", "api.example.com.", ip4(2)),
                expired("ns/b", "www.example.com.", ip4(1)),
            ]
        );
        assert_eq!(c.entries(t(0)).len(), 1);
        assert!(c.names_for_ip(t(0), ip4(1)).is_empty());
        let removed = c.remove_matching(|endpoint, _| endpoint == "ns/b");
        assert_eq!(removed, [expired("ns/b", "cilium.io.", ip4(3))]);
        assert_eq!(c.distinct_counts(), (0, 0, 0));
        c.assert_consistent();
    }

    /// A pair is as recent as its latest answer, here or at a peer; an older peer's copy
    /// does not make it older.
    #[test]
    fn a_pair_remembers_when_it_was_last_answered() {
        let mut c = DnsCache::default();
        let learned = |c: &DnsCache| c.entries(t(30))[0].learned_at_ms;
        c.insert(t(10), EP, "a.example.", &[ip4(1)], 100);
        assert_eq!(learned(&c), 10_000);
        c.insert_answered(20_250, EP, "a.example.", &[ip4(1)], 100);
        assert_eq!(learned(&c), 20_250);
        // 120.25 s, rounded up: never sooner than the TTL.
        assert_eq!(c.lookup(t(30), EP, "a.example.")[0].expires_at, t(121));
        c.insert_entry(EP, "a.example.", ip4(2), t(200), Source::Lookup, 15_000);
        assert_eq!(learned(&c), 20_250);
        c.insert_entry(EP, "a.example.", ip4(2), t(200), Source::Lookup, 25_500);
        assert_eq!(learned(&c), 25_500);
        // Kept by a restart, and by a peer's merge.
        let restored = DnsCache::restore(CacheLimits::UNLIMITED, c.snapshot(t(30)), t(30)).unwrap();
        assert_eq!(learned(&restored), 25_500);
        let mut peer = DnsCache::default();
        peer.merge(&c.entries(t(30)));
        assert_eq!(learned(&peer), 25_500);
    }

    /// A clean made elsewhere at a given time takes what was answered before it (or at a time
    /// not known) and spares what was answered since.
    #[test]
    fn remove_learned_before_spares_later_answers() {
        let mut c = DnsCache::default();
        c.insert_answered(19_999, EP, "old.example.", &[ip4(1)], 100);
        c.insert_answered(20_000, EP, "new.example.", &[ip4(2)], 100);
        c.insert(t(10), EP, "other.io.", &[ip4(3)], 100);
        c.insert_entry(EP, "unknown.example.", ip4(4), t(100), Source::Lookup, 0);
        let removed = c.remove_learned_before(20_000, |_, name| name.ends_with(".example."));
        assert_eq!(
            removed,
            [
                expired(EP, "old.example.", ip4(1)),
                expired(EP, "unknown.example.", ip4(4)),
            ]
        );
        let left: Vec<String> = c.entries(t(30)).into_iter().map(|e| e.name).collect();
        assert_eq!(left, ["new.example.", "other.io."]);
        c.assert_consistent();
    }

    /// A peer's name of 400,000 addresses was all kept until the next sweep, each looked for
    /// among the ones before it under the cache's lock: a merge trims a name at twice the cap
    /// (the soonest-expiring go, the peer's newest stay), and refuses names past four times
    /// the endpoint's cap.
    #[test]
    fn merges_are_held_near_the_caps() {
        let mut c = DnsCache::new(CacheLimits {
            max_ips_per_name: 2,
            max_names_per_endpoint: 1,
            ..CacheLimits::UNLIMITED
        });
        for last in 1..=5 {
            c.insert_entry(
                EP,
                "a.",
                ip4(last),
                t(100 + u64::from(last)),
                Source::Lookup,
                0,
            );
        }
        // At four, trimmed to the two latest (3 and 4), then 5 added.
        assert_eq!(ips_of(&c.lookup(t(10), EP, "a.")), [ip4(3), ip4(4), ip4(5)]);
        assert_eq!(c.merge_refusals(), 0);
        c.assert_consistent();
        // An address held is still refreshed.
        assert!(c.insert_entry(EP, "a.", ip4(3), t(200), Source::Lookup, 0));
        for name in ["b.", "c.", "d."] {
            assert!(
                c.insert_entry(EP, name, ip4(1), t(100), Source::Lookup, 0),
                "{name}"
            );
        }
        assert!(!c.insert_entry(EP, "e.", ip4(1), t(100), Source::Lookup, 0));
        assert_eq!(c.merge_refusals(), 1);
        assert!(c.lookup(t(10), EP, "e.").is_empty());
        assert!(c.insert_entry("other", "e.", ip4(1), t(100), Source::Lookup, 0));
        // The sweep trims the merged names to the cap, as before.
        c.gc(t(10));
        assert_eq!(ips_of(&c.lookup(t(10), EP, "a.")), [ip4(3), ip4(5)]);
        c.assert_consistent();
    }

    #[test]
    fn insert_entry_later_expiry_wins() {
        let mut c = DnsCache::default();
        let ip = ip4(1);
        assert!(c.insert_entry(EP, "a.", ip, t(100), Source::Restored, 0));
        assert!(!c.insert_entry(EP, "a.", ip, t(100), Source::Restored, 0));
        assert!(!c.insert_entry(EP, "a.", ip, t(90), Source::Lookup, 0));
        assert!(c.insert_entry(EP, "a.", ip, t(100), Source::Lookup, 0));
        assert!(!c.insert_entry(EP, "a.", ip, t(100), Source::Restored, 0));
        assert!(c.insert_entry(EP, "a.", ip, t(150), Source::Connection, 0));
        let found = c.lookup(t(99), EP, "a.");
        assert_eq!(
            (found[0].expires_at, found[0].source),
            (t(100), Source::Lookup)
        );
        let found = c.lookup(t(100), EP, "a.");
        assert_eq!(
            (found[0].expires_at, found[0].source),
            (t(150), Source::Connection)
        );
        assert!(c.insert_entry(EP, "b.", ip, t(20), Source::Connection, 0));
        let found = c.lookup(t(0), EP, "b.");
        assert_eq!(
            (found[0].expires_at, found[0].source),
            (t(20), Source::Connection)
        );
        c.assert_consistent();
    }

    #[test]
    fn entries_are_sorted_and_skip_expired() {
        let mut c = DnsCache::default();
        c.insert(t(0), "b", "z.", &[ip4(2), ip4(1)], 10);
        c.insert(t(0), "a", "y.", &[ip4(3)], 10);
        c.insert(t(0), "b", "a.", &[ip4(4)], 10);
        c.insert(t(0), "a", "gone.", &[ip4(5)], 1);
        let keys: Vec<(String, String)> = c
            .entries(t(5))
            .into_iter()
            .map(|e| (e.endpoint, e.name))
            .collect();
        assert_eq!(
            keys,
            [
                ("a".to_owned(), "y.".to_owned()),
                ("b".to_owned(), "a.".to_owned()),
                ("b".to_owned(), "z.".to_owned())
            ]
        );
        assert_eq!(ips_of(&c.entries(t(5))[2].ips), [ip4(1), ip4(2)]);
    }

    #[test]
    fn snapshot_round_trip_keeps_remaining_ttl() {
        let now = t(1_700_000_000);
        let mut c = DnsCache::new(limits(0, 10));
        c.insert(now, EP, "cilium.io.", &[ip4(1), ip6(1)], 300);
        c.insert(now, EP, "short.example.", &[ip4(2)], 5);
        c.insert(now, "ns/other", "held.example.", &[ip4(3)], 1);
        c.keep_alive("ns/other", ip4(3), now.plus_secs(60));
        let snap = c.snapshot(now.plus_secs(2));
        assert_eq!(snap.version, SNAPSHOT_VERSION);
        assert_eq!(snap.ip_count(), 4);

        let json = serde_json::to_vec(&snap).unwrap();
        let decoded = CacheSnapshot::from_json(&json).unwrap();
        assert_eq!(decoded, snap);

        let later = now.plus_secs(10);
        let r = DnsCache::restore(c.limits(), decoded, later).unwrap();
        let found = r.lookup(later, EP, "cilium.io.");
        assert_eq!(ips_of(&found), [ip4(1), ip6(1)]);
        for ip in &found {
            assert_eq!(ip.ttl_remaining(later), 290);
            assert_eq!(ip.source, Source::Restored);
        }
        assert!(r.lookup(later, EP, "short.example.").is_empty());
        let held = r.lookup(later, "ns/other", "held.example.");
        assert_eq!(
            (held[0].ttl_remaining(later), held[0].source),
            (50, Source::Connection)
        );
        assert_eq!((r.name_count(), r.ip_count()), (2, 3));
        assert_eq!(r.limits(), c.limits());
        r.assert_consistent();

        // A fresh answer turns a restored IP back into a looked-up one.
        let mut r = r;
        r.insert(later, EP, "cilium.io.", &[ip4(1)], 30);
        let found = r.lookup(later, EP, "cilium.io.");
        assert_eq!(found[0].source, Source::Restored);
        r.insert(later, EP, "cilium.io.", &[ip4(1)], 600);
        assert_eq!(r.lookup(later, EP, "cilium.io.")[0].source, Source::Lookup);
    }

    /// An entry saved with a TTL of a month, restored after `max_ttl` was set, kept its allow
    /// entries for the month: a ceiling set later bounds what was saved before.
    #[test]
    fn restore_bounds_saved_expiries_by_max_ttl() {
        let mut c = DnsCache::new(CacheLimits::UNLIMITED);
        c.insert(t(1_000), EP, "long.example.", &[ip4(1)], 30 * 86_400);
        c.insert(t(1_000), EP, "short.example.", &[ip4(2)], 60);
        let limits = CacheLimits {
            max_ttl: 3_600,
            ..CacheLimits::UNLIMITED
        };
        let restored = DnsCache::restore(limits, c.snapshot(t(1_000)), t(1_010)).unwrap();
        let expiry = |name| restored.lookup(t(1_010), EP, name)[0].expires_at;
        assert_eq!(expiry("long.example."), t(1_010 + 3_600));
        assert_eq!(
            expiry("short.example."),
            t(1_060),
            "shorter ones keep their own"
        );
    }

    #[test]
    fn restore_rejects_unknown_versions() {
        let snap = CacheSnapshot {
            version: 7,
            taken_at: t(0),
            entries: Vec::new(),
        };
        let err = DnsCache::restore(CacheLimits::UNLIMITED, snap, t(0)).unwrap_err();
        assert!(matches!(
            err,
            CacheError::UnsupportedVersion {
                found: 7,
                supported: 1
            }
        ));
    }

    #[test]
    fn restore_trims_over_cap_names_on_first_gc() {
        let mut c = DnsCache::default();
        c.insert(t(0), EP, "lb.", &[ip4(1), ip4(2), ip4(3)], 100);
        c.insert(t(1), EP, "lb.", &[ip4(2)], 100);
        let mut r = DnsCache::restore(limits(0, 1), c.snapshot(t(1)), t(1)).unwrap();
        // Trimmed at twice the cap as it went in; the sweep keeps the latest.
        assert_eq!(r.ip_count(), 2);
        let removed = r.gc(t(1));
        assert_eq!(removed.len(), 1);
        assert_eq!(ips_of(&r.lookup(t(1), EP, "lb.")), [ip4(2)]);
        r.assert_consistent();
    }

    #[test]
    fn debug_shows_sizes_not_contents() {
        let mut c = DnsCache::default();
        c.insert(t(0), EP, "secret.example.", &[ip4(1)], 10);
        let dbg = format!("{c:?}");
        assert!(dbg.contains("names: 1"), "{dbg}");
        assert!(!dbg.contains("secret"), "{dbg}");
    }

    // ---- property test against a naive model ----

    #[derive(Clone, Copy, Debug)]
    struct ModelRec {
        dns: Option<u64>,
        expires: u64,
        origin: Source,
    }

    fn model_rank(source: Source) -> u8 {
        match source {
            Source::Connection => 0,
            Source::Restored => 1,
            Source::Lookup => 2,
        }
    }

    impl ModelRec {
        fn new(expires: u64, source: Source) -> Self {
            match source {
                Source::Connection => ModelRec {
                    dns: None,
                    expires,
                    origin: Source::Restored,
                },
                _ => ModelRec {
                    dns: Some(expires),
                    expires,
                    origin: source,
                },
            }
        }

        fn extend_dns(&mut self, until: u64, origin: Source) -> bool {
            if origin == Source::Connection {
                return self.extend_alive(until);
            }
            let takes = match self.dns {
                None => until > 0,
                Some(d) => {
                    until > d || (until == d && model_rank(origin) > model_rank(self.origin))
                }
            };
            if takes {
                self.dns = Some(until);
                self.expires = self.expires.max(until);
                self.origin = origin;
            }
            takes
        }

        fn extend_alive(&mut self, until: u64) -> bool {
            if until <= self.expires {
                return false;
            }
            self.expires = until;
            if self.dns == Some(0) {
                self.dns = None;
            }
            true
        }

        fn view(&self, now: u64) -> (u64, Source) {
            match self.dns {
                Some(d) if now < d => (d, self.origin),
                _ => (self.expires, Source::Connection),
            }
        }
    }

    #[derive(Default)]
    struct Model {
        limits: CacheLimits,
        pairs: BTreeMap<(String, String), BTreeMap<IpAddr, ModelRec>>,
        /// The latest time each pair held was learned.
        learned: BTreeMap<(String, String), u64>,
    }

    impl Model {
        fn insert(
            &mut self,
            now: u64,
            ep: &str,
            name: &str,
            ips: &[IpAddr],
            ttl: u32,
        ) -> InsertOutcome {
            let expires = now + u64::from(ttl.max(self.limits.min_ttl).max(1));
            let mut out = InsertOutcome {
                expires_at: t(expires),
                ..InsertOutcome::default()
            };
            if ips.is_empty() {
                return out;
            }
            self.learn(ep, name, now * 1000);
            let recs = self.pairs.entry((ep.into(), name.into())).or_default();
            for &ip in ips {
                if out.added.contains(&ip) || out.refreshed.contains(&ip) {
                    continue;
                }
                if let Some(r) = recs.get_mut(&ip) {
                    out.extended |= r.extend_dns(expires, Source::Lookup);
                    out.refreshed.push(ip);
                } else {
                    recs.insert(ip, ModelRec::new(expires, Source::Lookup));
                    out.added.push(ip);
                }
            }
            let max = self.limits.max_ips_per_name;
            if max != 0 && recs.len() > max {
                let mut order: Vec<(u64, bool, std::cmp::Reverse<usize>, IpAddr)> = recs
                    .iter()
                    .map(|(ip, r)| {
                        let place = ips.iter().position(|x| x == ip);
                        (
                            r.expires,
                            place.is_some(),
                            std::cmp::Reverse(place.unwrap_or(0)),
                            *ip,
                        )
                    })
                    .collect();
                order.sort();
                for &(_, _, _, ip) in &order[..recs.len() - max] {
                    recs.remove(&ip);
                    if let Some(pos) = out.added.iter().position(|&a| a == ip) {
                        out.added.remove(pos);
                    } else {
                        out.refreshed.retain(|r| *r != ip);
                        out.evicted.push(ip);
                    }
                }
            }
            out
        }

        fn insert_entry(
            &mut self,
            ep: &str,
            name: &str,
            ip: IpAddr,
            expires: u64,
            source: Source,
            learned: u64,
        ) -> bool {
            self.learn(ep, name, learned);
            let recs = self.pairs.entry((ep.into(), name.into())).or_default();
            let held = recs.len();
            match recs.get_mut(&ip) {
                Some(r) => r.extend_dns(expires, source),
                None if self.limits.merge_trims_ips(held) => {
                    // As `DnsCache::trim` with no answer: the soonest-expiring go first, then
                    // the lowest address.
                    let mut order: Vec<(u64, IpAddr)> =
                        recs.iter().map(|(ip, rec)| (rec.expires, *ip)).collect();
                    order.sort_unstable();
                    let excess = held - self.limits.max_ips_per_name;
                    for (_, doomed) in order.into_iter().take(excess) {
                        recs.remove(&doomed);
                    }
                    recs.insert(ip, ModelRec::new(expires, source));
                    true
                }
                None => {
                    recs.insert(ip, ModelRec::new(expires, source));
                    true
                }
            }
        }

        fn learn(&mut self, ep: &str, name: &str, at: u64) {
            let learned = self.learned.entry((ep.into(), name.into())).or_default();
            *learned = (*learned).max(at);
        }

        /// A pair removed forgets when it was learned: made again, it starts over.
        fn forget_removed(&mut self) {
            let pairs = &self.pairs;
            self.learned.retain(|key, _| pairs.contains_key(key));
        }

        fn keep_alive(&mut self, ep: &str, ip: IpAddr, until: u64) -> usize {
            let mut n = 0;
            for ((e, _), recs) in &mut self.pairs {
                if e == ep
                    && let Some(r) = recs.get_mut(&ip)
                {
                    r.extend_alive(until);
                    n += 1;
                }
            }
            n
        }

        fn gc(&mut self, now: u64) -> Vec<Expired> {
            let max = self.limits.max_ips_per_name;
            let mut out = Vec::new();
            for ((ep, name), recs) in &mut self.pairs {
                let mut doomed: Vec<IpAddr> = recs
                    .iter()
                    .filter(|(_, r)| r.expires <= now)
                    .map(|(ip, _)| *ip)
                    .collect();
                let mut live: Vec<(u64, IpAddr)> = recs
                    .iter()
                    .filter(|(_, r)| r.expires > now)
                    .map(|(ip, r)| (r.expires, *ip))
                    .collect();
                live.sort();
                if max != 0 && live.len() > max {
                    doomed.extend(live[..live.len() - max].iter().map(|&(_, ip)| ip));
                }
                for ip in doomed {
                    recs.remove(&ip);
                    out.push(expired(ep, name, ip));
                }
            }
            self.pairs.retain(|_, recs| !recs.is_empty());
            self.forget_removed();
            out.sort();
            out
        }

        /// The pairs of `name` last answered before `before_ms`.
        fn remove_name(&mut self, name: &str, before_ms: u64) -> Vec<Expired> {
            let mut out = Vec::new();
            let learned = &self.learned;
            self.pairs.retain(|(ep, n), recs| {
                let key = (ep.clone(), n.clone());
                if n != name || learned.get(&key).copied().unwrap_or(0) >= before_ms {
                    return true;
                }
                out.extend(recs.keys().map(|&ip| expired(ep, n, ip)));
                false
            });
            self.forget_removed();
            out.sort();
            out
        }

        fn entries(&self, now: u64) -> Vec<CacheEntry> {
            self.pairs
                .iter()
                .filter_map(|((ep, name), recs)| {
                    let ips: Vec<CachedIp> = recs
                        .iter()
                        .filter(|(_, r)| now < r.expires)
                        .map(|(&ip, r)| {
                            let (e, source) = r.view(now);
                            CachedIp {
                                ip,
                                expires_at: t(e),
                                source,
                            }
                        })
                        .collect();
                    (!ips.is_empty()).then(|| CacheEntry {
                        endpoint: ep.clone(),
                        name: name.clone(),
                        ips,
                        learned_at_ms: self
                            .learned
                            .get(&(ep.clone(), name.clone()))
                            .copied()
                            .unwrap_or(0),
                    })
                })
                .collect()
        }
    }

    const ENDPOINTS: [&str; 3] = ["ns/a", "ns/b", "ns/c"];
    const NAMES: [&str; 5] = [
        "a.example.",
        "b.example.",
        "c.example.",
        "cdn.example.net.",
        "x.io.",
    ];

    fn ip_pool() -> Vec<IpAddr> {
        (1..=6).map(ip4).chain((1..=3).map(ip6)).collect()
    }

    fn random_source(rng: &mut Rng) -> Source {
        *rng.pick(&[Source::Lookup, Source::Restored, Source::Connection])
    }

    fn compare(cache: &DnsCache, model: &Model, now: u64, pool: &[IpAddr]) {
        cache.assert_consistent();
        let entries = model.entries(now);
        assert_eq!(cache.entries(t(now)), entries, "entries at {now}");
        for ep in ENDPOINTS {
            for name in NAMES {
                let want: Vec<CachedIp> = entries
                    .iter()
                    .find(|e| e.endpoint == ep && e.name == name)
                    .map(|e| e.ips.clone())
                    .unwrap_or_default();
                assert_eq!(cache.lookup(t(now), ep, name), want);
            }
        }
        for name in NAMES {
            let mut want: Vec<IpAddr> = entries
                .iter()
                .filter(|e| e.name == name)
                .flat_map(|e| e.ips.iter().map(|c| c.ip))
                .collect();
            want.sort();
            want.dedup();
            assert_eq!(cache.lookup_any_endpoint(t(now), name), want);
        }
        for &ip in pool {
            let want: Vec<(String, String)> = entries
                .iter()
                .filter(|e| e.ips.iter().any(|c| c.ip == ip))
                .map(|e| (e.endpoint.clone(), e.name.clone()))
                .collect();
            assert_eq!(cache.names_for_ip(t(now), ip), want, "owners of {ip}");
        }
        assert_eq!(cache.name_count(), model.pairs.len());
        assert_eq!(
            cache.ip_count(),
            model.pairs.values().map(BTreeMap::len).sum::<usize>()
        );
    }

    #[test]
    fn behaves_like_a_naive_model() {
        let pool = ip_pool();
        for seed in 0..12 {
            let mut rng = Rng(seed);
            let lim = limits(rng.below(4) as u32, rng.below(4) as usize);
            let mut cache = DnsCache::new(lim);
            let mut model = Model {
                limits: lim,
                ..Model::default()
            };
            let mut now = 1_000;
            for step in 0..1_500 {
                let ep = *rng.pick(&ENDPOINTS);
                let name = *rng.pick(&NAMES);
                let ip = *rng.pick(&pool);
                match rng.below(100) {
                    0..40 => {
                        let count = rng.below(4) as usize;
                        let ips: Vec<IpAddr> = (0..count).map(|_| *rng.pick(&pool)).collect();
                        let ttl = rng.below(15) as u32;
                        let got = cache.insert(t(now), ep, name, &ips, ttl);
                        let want = model.insert(now, ep, name, &ips, ttl);
                        assert_eq!(got, want, "seed {seed} step {step}: insert");
                    }
                    40..55 => {
                        let expires = now + rng.below(20);
                        let source = random_source(&mut rng);
                        // A peer's answers may be older than this cache's; on a coarse grid,
                        // so that times often tie with a clean's.
                        let learned = now.saturating_sub(rng.below(3)) * 1000 + rng.below(2) * 500;
                        let got = cache.insert_entry(ep, name, ip, t(expires), source, learned);
                        let want = model.insert_entry(ep, name, ip, expires, source, learned);
                        assert_eq!(got, want, "seed {seed} step {step}: insert_entry");
                    }
                    55..61 => {
                        let until = now + rng.below(25);
                        let got = cache.keep_alive(ep, ip, t(until));
                        assert_eq!(got, model.keep_alive(ep, ip, until));
                    }
                    61..67 => {
                        // Two endpoints of one address in one walk, as the reconciler's
                        // keep-alives go: the same endpoint twice takes the later time.
                        let (other, until, other_until) = (
                            *rng.pick(&ENDPOINTS),
                            now + rng.below(25),
                            now + rng.below(25),
                        );
                        let got =
                            cache.keep_alive_for(ip, &[(ep, t(until)), (other, t(other_until))]);
                        let want = if other == ep {
                            model.keep_alive(ep, ip, until.max(other_until))
                        } else {
                            model.keep_alive(ep, ip, until)
                                + model.keep_alive(other, ip, other_until)
                        };
                        assert_eq!(got, want, "seed {seed} step {step}: keep_alive_for");
                    }
                    67..80 => {
                        now += rng.below(4);
                        assert_eq!(
                            cache.gc(t(now)),
                            model.gc(now),
                            "seed {seed} step {step}: gc"
                        );
                    }
                    80..90 => {
                        now += rng.below(4);
                        let mut removed = Vec::new();
                        let mut steps = 0;
                        loop {
                            let pairs = 1 + rng.below(5) as u32;
                            let removals = 1 + rng.below(3) as usize;
                            let step =
                                cache.sweep_step(t(now), pairs, removals, Some(&mut removed));
                            assert_eq!(step.removed, removed.len() - steps);
                            steps = removed.len();
                            if step.done {
                                break;
                            }
                            cache.assert_consistent();
                        }
                        removed.sort_unstable();
                        assert_eq!(removed, model.gc(now), "seed {seed} step {step}: gc_step");
                    }
                    90..93 => {
                        // Everything of the name, or what was answered before a time.
                        let (got, want) = if rng.below(2) == 0 {
                            let got = cache.remove_matching(|_, n| n == name);
                            (got, model.remove_name(name, u64::MAX))
                        } else {
                            let before_ms =
                                now.saturating_sub(rng.below(4)) * 1000 + rng.below(2) * 500;
                            let got = cache.remove_learned_before(before_ms, |_, n| n == name);
                            (got, model.remove_name(name, before_ms))
                        };
                        assert_eq!(got, want, "seed {seed} step {step}: remove");
                    }
                    93..95 => {
                        let lim = limits(rng.below(4) as u32, rng.below(4) as usize);
                        cache.set_limits(lim);
                        model.limits = lim;
                    }
                    _ => now += rng.below(6),
                }
                compare(&cache, &model, now, &pool);
            }
        }
    }

    fn random_cache(seed: u64, now: u64) -> DnsCache {
        let pool = ip_pool();
        let mut rng = Rng(seed);
        let mut c = DnsCache::default();
        let mut at = now - 20;
        while at < now {
            let ep = *rng.pick(&ENDPOINTS);
            let name = *rng.pick(&NAMES);
            let ip = *rng.pick(&pool);
            match rng.below(10) {
                0..5 => {
                    c.insert(t(at), ep, name, &[ip], rng.below(30) as u32);
                }
                5..7 => {
                    let source = random_source(&mut rng);
                    c.insert_entry(ep, name, ip, t(at + rng.below(30)), source, 0);
                }
                7..9 => {
                    c.keep_alive(ep, ip, t(at + rng.below(40)));
                }
                _ => {
                    c.gc(t(at));
                    at += 1;
                }
            }
        }
        c
    }

    /// A sweep in steps, with answers recorded between the steps (some into slots below the
    /// cursor, some expiring soon), ends where a whole sweep ends, and its bookkeeping of the
    /// next expiry still lets the following sweep find what they added.
    #[test]
    fn a_sweep_in_steps_matches_a_whole_sweep_with_answers_between_steps() {
        for seed in 0..40 {
            let now = 10_000;
            let mut whole = random_cache(seed, now);
            if seed % 4 == 0 {
                // Over the cap, so the sweep trims as well.
                whole.set_limits(limits(0, 1));
            }
            let mut stepped = whole.clone();
            let mut rng = Rng(seed + 7_000);
            let mut removed_whole = whole.gc(t(now)).len();
            let mut removed_stepped = 0;
            let mut added = 0;
            loop {
                let step = stepped.gc_step(t(now), 1 + rng.below(4) as u32);
                removed_stepped += step.removed;
                if step.done {
                    break;
                }
                // Fresh names on IPs of their own, so the two caches see the same change
                // whatever the sweep has reached; short TTLs, to be found by the next sweep.
                let name = format!("new-{added}.example.");
                let ip = IpAddr::V4(Ipv4Addr::new(10, 99, (added >> 8) as u8, added as u8));
                let ttl = 1 + rng.below(3) as u32;
                let ep = *rng.pick(&ENDPOINTS);
                match rng.below(5) {
                    0 if added > 0 => {
                        // A later answer for a name added earlier, with a longer TTL.
                        let k = rng.below(added);
                        let earlier = format!("new-{k}.example.");
                        let earlier_ip = IpAddr::V4(Ipv4Addr::new(10, 99, (k >> 8) as u8, k as u8));
                        for cache in [&mut whole, &mut stepped] {
                            for endpoint in ENDPOINTS {
                                cache.insert(t(now), endpoint, &earlier, &[earlier_ip], 2 + ttl);
                            }
                        }
                    }
                    1 => {
                        let expires = t(now + u64::from(ttl));
                        whole.insert_entry(ep, &name, ip, expires, Source::Restored, 0);
                        stepped.insert_entry(ep, &name, ip, expires, Source::Restored, 0);
                    }
                    2 => {
                        whole.insert(t(now), ep, &name, &[ip], ttl);
                        stepped.insert(t(now), ep, &name, &[ip], ttl);
                        // Traffic keeps it a little longer.
                        let until = t(now + u64::from(ttl) + 1);
                        assert_eq!(
                            whole.keep_alive(ep, ip, until),
                            stepped.keep_alive(ep, ip, until)
                        );
                    }
                    // Not while a trim is under way: a cap changed mid-sweep applies to the
                    // pairs the sweep has yet to reach, where a whole sweep used the old one.
                    3 if seed % 4 != 0 => {
                        let cap = rng.below(3) as usize;
                        whole.set_limits(limits(0, cap));
                        stepped.set_limits(limits(0, cap));
                    }
                    _ => {
                        whole.insert(t(now), ep, &name, &[ip], ttl);
                        stepped.insert(t(now), ep, &name, &[ip], ttl);
                    }
                }
                added += 1;
                if rng.below(8) == 0 {
                    // A compaction or a plain removal between steps.
                    let victim = *rng.pick(&NAMES);
                    let a = whole.remove_matching(|_, n| n == victim).len();
                    let b = stepped.remove_matching(|_, n| n == victim).len();
                    removed_whole += a;
                    removed_stepped += b;
                }
                stepped.assert_consistent();
            }
            assert_eq!(removed_stepped, removed_whole, "seed {seed}: removed");
            assert_eq!(
                stepped.entries(t(now)),
                whole.entries(t(now)),
                "seed {seed}"
            );
            assert_eq!(stepped.ip_count(), whole.ip_count(), "seed {seed}: held");
            whole.assert_consistent();
            stepped.assert_consistent();
            // Second by second past the short TTLs: each sweep finds what the whole one does
            // (one that started late, misled by its bookkeeping, would find less).
            for later in (now + 1)..=(now + 8) {
                let whole_later = whole.gc(t(later)).len();
                let mut stepped_later = 0;
                while !{
                    let step = stepped.gc_step(t(later), 3);
                    stepped_later += step.removed;
                    step.done
                } {}
                assert_eq!(stepped_later, whole_later, "seed {seed}: sweep at {later}");
                assert_eq!(stepped.entries(t(later)), whole.entries(t(later)));
                assert_eq!(
                    stepped.ip_count(),
                    whole.ip_count(),
                    "seed {seed}: held at {later}"
                );
                stepped.assert_consistent();
            }
        }
    }

    /// A removal between two steps of a sweep leaves the cache mostly vacant: the sweep goes
    /// on, still trimming names over a lowered cap, and the compaction follows it in steps
    /// rather than in the removal's hold.
    #[test]
    fn a_removal_between_steps_leaves_the_trim_and_the_compaction_to_the_sweep() {
        let mut c = DnsCache::default();
        for i in 0..4_000 {
            c.insert(
                t(100),
                EP,
                &format!("n{i}.example."),
                &[ip4(2 * i), ip4(2 * i + 1)],
                300,
            );
        }
        c.set_limits(limits(0, 1));
        let step = c.gc_step(t(101), 40);
        assert_eq!(
            step.removed, 10,
            "one IP of each of ten names trimmed: a quarter of 40"
        );
        let compactions = c.compactions();
        c.remove_matching(|_, name| !name.starts_with("n1"));
        assert_eq!(c.compactions(), compactions, "not in the removal's hold");
        assert!(c.is_sparse());
        let (mut removed, mut compacting_steps) = (0, 0);
        while !{
            let step = c.gc_step(t(101), 100);
            removed += step.removed;
            compacting_steps += usize::from(c.rebuild.is_some());
            c.assert_copy_matches();
            step.done
        } {}
        assert!(removed > 0);
        assert!(compacting_steps > 1, "compacted in steps");
        assert_eq!(c.compactions(), compactions + 1);
        assert_eq!(c.ip_count(), c.name_count(), "one IP per name left");
        assert!(!c.is_sparse());
        c.assert_consistent();
    }

    /// Every record of every pair, raw (keep-alive and source included), by (endpoint, name).
    fn records(c: &DnsCache) -> BTreeMap<(String, String), Vec<IpRec>> {
        c.pairs
            .iter()
            .map(|(_, pair)| {
                let key = (
                    c.endpoints.text(pair.endpoint).to_owned(),
                    c.names.text(pair.name).to_owned(),
                );
                (key, pair.ips.sorted())
            })
            .collect()
    }

    /// Pairs added faster than a step copies still let the compaction finish: a step copies
    /// what was added since the last one on top of its own pairs.
    #[test]
    fn a_compaction_finishes_while_pairs_are_added_faster_than_steps_copy() {
        let (mut reference, mut c) = compacting(0);
        let mut added = 0;
        for steps in 1.. {
            for cache in [&mut c, &mut reference] {
                for i in added..added + 40 {
                    let name = format!("flood{i}.example.");
                    cache.insert(t(100), "ns/d", &name, &[ip4(10_000 + i)], 60);
                }
            }
            added += 40;
            if c.gc_step(t(100), 16).done {
                break;
            }
            if steps % 16 == 0 {
                c.assert_copy_matches();
            }
            assert!(steps < 1_000, "the compaction does not finish");
        }
        assert_same_records(&c, &reference, "flood");
        c.assert_consistent();
    }

    /// A chunk of a clean stops at its removals and says where to go on.
    #[test]
    fn a_clean_chunk_stops_after_its_removals() {
        let mut c = DnsCache::default();
        for i in 0..20 {
            c.insert(t(100), EP, &format!("n{i}.example."), &[ip4(i)], 60);
        }
        // Every other name, at most three of them, from pair 4 on.
        let mut even = |_: &str, name: &str| {
            name.trim_start_matches('n')
                .trim_end_matches(".example.")
                .parse::<u32>()
                .is_ok_and(|n| n % 2 == 0)
        };
        let (gone, next) = c.remove_matching_chunk(&mut even, u64::MAX, 4, 100, 3);
        let names: Vec<&str> = gone.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["n4.example.", "n6.example.", "n8.example."]);
        assert_eq!(next, 9);
        let (gone, next) = c.remove_matching_chunk(&mut even, u64::MAX, next, 100, usize::MAX);
        assert_eq!(gone.len(), 5);
        assert_eq!(next, 20);
        assert_eq!(c.name_count(), 20 - 8);
        c.assert_consistent();
    }

    /// Copying nothing leaves nothing: no empty pair is kept, whether new or held.
    #[test]
    fn putting_no_records_keeps_no_pair() {
        let mut c = DnsCache::default();
        assert_eq!(
            c.put_pair(EP, "a.example.", 0, &IpList::Many(Vec::new())),
            NONE
        );
        assert!(c.is_empty());
        c.insert(t(100), EP, "a.example.", &[ip4(1)], 60);
        assert_eq!(
            c.put_pair(EP, "a.example.", 0, &IpList::Many(Vec::new())),
            NONE
        );
        assert!(c.is_empty());
        assert_eq!(c.ip_count(), 0);
        c.assert_consistent();
    }

    /// A whole sweep drops a compaction in steps under way (the cache it copies is whole) and
    /// compacts in one go.
    #[test]
    fn a_whole_gc_drops_a_compaction_under_way() {
        let (mut reference, mut c) = compacting(5);
        assert!(c.rebuild.is_some());
        assert_eq!(c.gc(t(110)), reference.gc(t(110)));
        assert!(c.rebuild.is_none());
        assert_eq!(c.compactions(), reference.compactions());
        assert_same_records(&c, &reference, "after gc");
        c.assert_consistent();
    }

    /// Panics naming the first (endpoint, name) whose records differ, if any.
    fn assert_same_records(a: &DnsCache, b: &DnsCache, context: &str) {
        let (a, b) = (records(a), records(b));
        for key in a.keys().chain(b.keys()) {
            assert_eq!(a.get(key), b.get(key), "{context}: {key:?}");
        }
    }

    /// 3,000 names over three endpoints, 80% of them expiring at 105, IPs shared in threes.
    fn mostly_expiring() -> DnsCache {
        let mut c = DnsCache::default();
        for i in 0..3_000u32 {
            let ttl = if i % 5 == 0 { 3_600 } else { 5 };
            let ep = ENDPOINTS[(i % 3) as usize];
            c.insert(t(100), ep, &format!("m{i}.example."), &[ip4(i / 3)], ttl);
        }
        c
    }

    /// [`mostly_expiring`] twice: as it is, and with a compaction in steps started on it and
    /// `steps` steps of 100 pairs taken (none finishing it).
    fn compacting(steps: usize) -> (DnsCache, DnsCache) {
        let reference = mostly_expiring();
        let mut c = reference.clone();
        c.start_rebuild();
        for _ in 0..steps {
            assert!(!c.gc_step(t(100), 100).done);
        }
        (reference, c)
    }

    /// One change between two steps, the same to both caches: answers for names held (below
    /// and past the compaction's cursor) and new ones, peer records, keep-alives, cap changes
    /// and now and then a removal.
    fn change_both(rng: &mut Rng, round: u64, caches: [&mut DnsCache; 2]) {
        let i = rng.below(3_200) as u32;
        let ep = ENDPOINTS[(i % 3) as usize];
        let name = format!("m{i}.example.");
        let ip = ip4(rng.below(1_500) as u32);
        let kind = rng.below(21);
        let ttl = 1 + rng.below(20) as u32;
        let cap = rng.below(4) as usize;
        for c in caches {
            match kind {
                0..8 => {
                    c.insert(t(110), ep, &name, &[ip], ttl);
                }
                8..12 => {
                    c.insert_entry(ep, &name, ip, t(110 + u64::from(ttl)), Source::Restored, 0);
                }
                12..16 => {
                    c.keep_alive(ep, ip, t(115 + round % 7));
                }
                16..18 => c.set_limits(limits(0, cap)),
                18 => {
                    c.remove_matching(|_, n| n == name);
                }
                19 => {
                    // A peer's burst for one name: past twice a small cap the merge trims it
                    // while the compaction is under way.
                    for k in 0..5_u32 {
                        let expires = t(110 + u64::from(ttl) + u64::from(k));
                        c.insert_entry(ep, &name, ip4(1_600 + k), expires, Source::Lookup, 0);
                    }
                }
                _ => {
                    c.insert(t(110), ep, &name, &[ip, ip4(2_000 + i)], ttl);
                }
            }
        }
    }

    /// A sweep that leaves the cache mostly vacant goes on into a compaction in steps; the
    /// cache answers and changes as usual meanwhile, and the compacted cache that takes its
    /// place holds exactly what a cache compacted in one go holds after the same changes.
    #[test]
    fn a_compaction_in_steps_keeps_every_change_made_meanwhile() {
        for seed in 0..12 {
            let mut whole = mostly_expiring();
            let mut stepped = whole.clone();
            let mut rng = Rng(seed + 9_000);
            let compactions = stepped.compactions();
            let removed_whole = whole.gc(t(110)).len();
            let mut removed_stepped = 0;
            let mut rebuilding_steps = 0;
            let mut retired = 0;
            for round in 0.. {
                let step = stepped.gc_step(t(110), 1 + rng.below(200) as u32);
                removed_stepped += step.removed;
                retired += usize::from(step.retired.is_some());
                if step.done {
                    break;
                }
                // Changes during the sweep itself are another test's: a keep-alive, say,
                // saves an expired IP the sweep has yet to reach.
                if stepped.rebuild.is_some() {
                    rebuilding_steps += 1;
                    // While compacting, the cache is the one answering: check it as it stands.
                    assert_same_records(&stepped, &whole, &format!("seed {seed}"));
                    change_both(&mut rng, round, [&mut whole, &mut stepped]);
                    stepped.assert_copy_matches();
                }
            }
            assert_eq!(removed_stepped, removed_whole, "seed {seed}: removed");
            assert!(rebuilding_steps > 1, "seed {seed}: compacted in steps");
            assert!(stepped.compactions() > compactions, "seed {seed}");
            assert!(stepped.rebuild.is_none());
            assert!(retired <= 1, "seed {seed}: retired {retired} times");
            assert_same_records(&stepped, &whole, &format!("seed {seed}"));
            assert_eq!(stepped.ip_count(), whole.ip_count(), "seed {seed}");
            assert!(!stepped.is_sparse(), "seed {seed}: still sparse");
            stepped.assert_consistent();
            whole.assert_consistent();
            // The bookkeeping of the next expiry came through: later sweeps agree.
            for later in 111..=140 {
                let whole_later = whole.gc(t(later)).len();
                let mut stepped_later = 0;
                while !{
                    let step = stepped.gc_step(t(later), 64);
                    stepped_later += step.removed;
                    step.done
                } {}
                assert_eq!(stepped_later, whole_later, "seed {seed}: sweep at {later}");
                assert_same_records(&stepped, &whole, &format!("seed {seed} at {later}"));
                stepped.assert_consistent();
            }
        }
    }

    /// Pairs removed behind the compaction's cursor leave the copy, new pairs in their reused
    /// slots enter it, and keep-alives reach it.
    #[test]
    fn a_compaction_in_steps_follows_removals_and_reused_slots() {
        let (mut reference, mut c) = compacting(10);
        let behind_the_cursor = |name: &str| {
            name.strip_prefix('m')
                .and_then(|n| n.strip_suffix(".example."))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n < 500)
        };
        for cache in [&mut reference, &mut c] {
            // m0 to m499 are pairs 0 to 499; the cursor is at 1,000.
            let gone = cache.remove_matching(|_, name| behind_the_cursor(name));
            assert_eq!(gone.len(), 500);
            // Into the vacated slots.
            for i in 0..300 {
                cache.insert(t(100), "ns/d", &format!("late{i}."), &[ip4(i)], 60);
            }
            assert_eq!(cache.keep_alive("ns/d", ip4(7), t(1_000)), 1);
            // m601's IP, which m600 and m602 share under other endpoints.
            assert_eq!(cache.keep_alive("ns/b", ip4(200), t(1_000)), 1);
        }
        c.assert_copy_matches();
        assert!(c.rebuild.is_some(), "the removal compacted nothing itself");
        assert_same_records(&c, &reference, "reference");
        let mut retired = None;
        while retired.is_none() {
            let step = c.gc_step(t(100), 100);
            retired = step.retired;
            assert_eq!(step.done, retired.is_some());
        }
        assert!(c.rebuild.is_none());
        assert_same_records(&c, &reference, "reference");
        assert_eq!(c.ip_count(), reference.ip_count());
        assert_eq!(
            c.pair_id_bound() as usize,
            c.name_count(),
            "densely numbered"
        );
        c.assert_consistent();
    }

    #[test]
    fn a_step_returns_at_once_when_nothing_is_due() {
        let mut c = DnsCache::default();
        for i in 0..100 {
            let ttl = if i % 10 == 0 { 30 } else { 300 };
            c.insert(t(100), EP, &format!("n{i}.example."), &[ip4(i)], ttl);
        }
        let step = c.gc_step(t(129), 1);
        assert_eq!((step.removed, step.done), (0, true));
        let sweep = |c: &mut DnsCache, now: u64| {
            let (mut steps, mut removed) = (0, 0);
            loop {
                steps += 1;
                let step = c.gc_step(t(now), 40);
                assert!(step.removed <= 10, "at most a quarter of 40 removed a step");
                removed += step.removed;
                if step.done {
                    return (steps, removed);
                }
            }
        };
        // Few due: 40 pairs a step.
        assert_eq!(sweep(&mut c, 130), (3, 10));
        // All due: 10 removals a step.
        assert_eq!(sweep(&mut c, 400), (9, 90));
        assert!(c.is_empty());

        // A step of zero pairs still moves on.
        c.insert(t(200), EP, "z.example.", &[ip4(1)], 30);
        let mut steps = 0;
        while !c.gc_step(t(300), 0).done {
            steps += 1;
            assert!(steps < 10, "a zero-pair step never ends the sweep");
        }
        assert!(c.is_empty());
    }

    #[test]
    fn merge_is_commutative_and_idempotent() {
        let now = t(10_000);
        for seed in 0..40 {
            let a = random_cache(seed, now.0);
            let b = random_cache(seed + 1_000, now.0);
            let (ea, eb) = (a.entries(now), b.entries(now));

            let mut ab = a.clone();
            ab.merge(&eb);
            let mut ba = b.clone();
            ba.merge(&ea);
            assert_eq!(ab.entries(now), ba.entries(now), "seed {seed}");

            let before = ab.entries(now);
            assert_eq!(
                ab.merge(&eb),
                0,
                "seed {seed}: merging twice changes nothing"
            );
            assert_eq!(
                ab.merge(&before),
                0,
                "seed {seed}: merging itself changes nothing"
            );
            assert_eq!(ab.entries(now), before);

            // A cache rebuilt from nothing but the merged views agrees as well.
            let mut fresh = DnsCache::default();
            fresh.merge(&eb);
            fresh.merge(&ea);
            assert_eq!(fresh.entries(now), before, "seed {seed}");
            ab.assert_consistent();
            ba.assert_consistent();
        }
    }

    // ---- memory ----

    fn bench_name(i: usize) -> String {
        format!("n{i:07}.bench.example.com.")
    }

    fn filled(names: usize, ips_per_name: u32) -> DnsCache {
        let mut c = DnsCache::default();
        for i in 0..names {
            let base = u32::try_from(i).unwrap() * ips_per_name;
            let ips: Vec<IpAddr> = (0..ips_per_name).map(|k| ip4(base + k)).collect();
            c.insert(t(0), "default/client", &bench_name(i), &ips, 3_600);
        }
        c
    }

    #[test]
    fn heap_estimate_under_250_bytes_per_entry_at_100k() {
        for (names, per_name) in [(100_000, 1), (10_000, 10)] {
            let c = filled(names, per_name);
            assert_eq!(c.ip_count(), 100_000);
            let per_entry = c.approx_heap_bytes() / c.ip_count();
            eprintln!("{per_entry} bytes per entry: {names} names x {per_name} IPs");
            assert!(
                per_entry < 250,
                "{per_entry} bytes per entry with {per_name} IPs per name"
            );
            assert!(per_entry > 50, "estimate implausibly low: {per_entry}");
        }
    }

    #[test]
    #[ignore = "slow in debug builds; run with --release --ignored to print the 1M figure"]
    fn heap_estimate_at_one_million() {
        let c = filled(1_000_000, 1);
        let per_entry = c.approx_heap_bytes() / c.ip_count();
        println!("{per_entry} bytes per entry at 1,000,000 entries");
        assert!(per_entry < 250, "{per_entry}");
    }

    #[test]
    fn memory_is_returned_after_mass_expiry() {
        let mut c = filled(20_000, 2);
        let full = c.approx_heap_bytes();
        c.insert(t(0), EP, "survivor.example.", &[ip4(1)], 100_000);
        let removed = c.gc(t(3_600));
        assert_eq!(removed.len(), 40_000);
        assert_eq!((c.name_count(), c.ip_count()), (1, 1));
        let after = c.approx_heap_bytes();
        assert!(after * 50 < full, "{after} bytes left of {full}");
        assert_eq!(c.lookup(t(3_600), EP, "survivor.example.").len(), 1);
        assert_eq!(c.names_for_ip(t(3_600), ip4(1)).len(), 1);
        c.assert_consistent();
        c.remove_matching(|_, _| true);
        assert!(c.approx_heap_bytes() < 1_024);
    }

    /// 60 simulated minutes of 10,000 new names a minute with a 5 s TTL and gc every second.
    /// Memory must plateau: hash tables may double once while their tombstones settle (in
    /// the first minutes), then nothing may grow.
    #[test]
    fn churn_keeps_memory_flat() {
        const PER_MINUTE: u64 = 10_000;
        const TTL: u32 = 5;
        let start = 1_700_000_000;
        let mut c = DnsCache::default();
        let mut counter: u64 = 0;
        let mut first_minute = 0;
        let mut steady: Option<usize> = None;
        let mut max_names = 0;
        for second in 0..3_600u64 {
            let now = t(start + second);
            let due = PER_MINUTE * (second + 1) / 60 - PER_MINUTE * second / 60;
            for _ in 0..due {
                let name = format!("c{counter:08}.churn.example.");
                let ip = ip4(u32::try_from(counter % 0x00ff_ffff).unwrap());
                let endpoint = ENDPOINTS[(counter % 3) as usize];
                c.insert(now, endpoint, &name, &[ip], TTL);
                counter += 1;
            }
            c.gc(now);
            max_names = max_names.max(c.name_count());
            let heap = c.approx_heap_bytes();
            match second {
                59 => first_minute = heap,
                299 => steady = Some(heap),
                _ => {}
            }
            if let Some(steady) = steady {
                let (lo, hi) = (steady * 9 / 10, steady * 11 / 10);
                assert!(
                    (lo..=hi).contains(&heap),
                    "second {second}: {heap} bytes vs steady {steady}"
                );
            }
        }
        let steady = steady.unwrap();
        assert!(
            steady * 4 <= first_minute * 5,
            "warm-up grew from {first_minute} to {steady}"
        );
        assert_eq!(counter, 600_000);
        let per_second = PER_MINUTE.div_ceil(60) as usize;
        assert!(
            max_names <= per_second * (TTL as usize + 1),
            "{max_names} names live at once"
        );
        assert!(
            steady / max_names < 250,
            "{} bytes per name",
            steady / max_names
        );
        let (endpoints, names, ips) = c.distinct_counts();
        assert_eq!(endpoints, 3);
        assert_eq!(names, c.name_count());
        assert_eq!(ips, c.ip_count());
        c.assert_consistent();
    }
}
