//! Compaction in steps. Rebuilding a large cache at its live size takes tens of milliseconds
//! (about 0.35 µs a pair: each is interned, hashed and indexed afresh), too long to hold the
//! lock the DNS answers wait for; so the compacted copy is built a chunk of pairs per step
//! while the cache stays in use, and takes its place once complete.

use std::net::IpAddr;

use super::slab::NONE;
use super::{DnsCache, IpList, IpRec};

/// A compacted copy of the cache under construction. The cache stays authoritative
/// throughout: pairs are copied in id order, a chunk per step, and a change to a pair already
/// copied (new IPs, a refresh, its removal) is copied at once, so that when the cursor passes
/// the last pair the copy holds exactly what the cache holds.
#[derive(Clone, Debug)]
pub(super) struct Rebuild {
    fresh: DnsCache,
    /// Pairs numbered below this were copied; a pair at or past it is copied as it is when
    /// the cursor gets there.
    cursor: u32,
    /// By pair id in the cache, below the cursor: the pair's id in the copy, or `NONE` (a
    /// vacant slot, or a pair removed since).
    copied: Vec<u32>,
    /// The cache's pair id bound at the last step: what it grew by since is copied on top of
    /// a step's pairs, so that the cursor gains on the bound however fast pairs are added.
    bound_seen: u32,
}

/// The structures a finished compaction replaced, handed back so that they are freed after
/// the caller releases the lock the cache is under: freeing a large cache takes milliseconds.
#[derive(Debug)]
pub struct Retired {
    _replaced: DnsCache,
}

impl DnsCache {
    /// Starts a compaction in steps (see [`rebuild_step`](Self::rebuild_step)), sized for what
    /// the cache holds now and a quarter more: growing the copy's tables while it is built
    /// would rehash them inside one step.
    pub(super) fn start_rebuild(&mut self) {
        let bound = self.pairs.id_bound();
        self.rebuild = Some(Box::new(Rebuild {
            fresh: self.empty_sized_for(|held| held + held / 4),
            cursor: 0,
            copied: Vec::with_capacity(bound as usize),
            bound_seen: bound,
        }));
    }

    /// Copies the next `pairs` pairs (at least one) of a compaction under way, plus as many as
    /// were added since the last step. Once all are copied the copy becomes the cache: returns
    /// `true` then (or when no compaction is under way) with the replaced structures.
    pub(super) fn rebuild_step(&mut self, pairs: u32) -> (bool, Option<Retired>) {
        let bound = self.pairs.id_bound();
        let Some(rebuild) = self.rebuild.as_deref_mut() else {
            return (true, None);
        };
        let grown = bound.saturating_sub(rebuild.bound_seen);
        rebuild.bound_seen = bound;
        let from = rebuild.cursor;
        let to = from
            .saturating_add(pairs.max(1))
            .saturating_add(grown)
            .min(bound);
        if rebuild.copied.len() < to as usize {
            rebuild.copied.resize(to as usize, NONE);
        }
        for pid in from..to {
            let Some(pair) = self.pairs.get(pid) else {
                continue;
            };
            let copy = rebuild.fresh.put_pair(
                self.endpoints.text(pair.endpoint),
                self.names.text(pair.name),
                pair.learned,
                &pair.ips,
            );
            if let Some(slot) = rebuild.copied.get_mut(pid as usize) {
                *slot = copy;
            }
        }
        rebuild.cursor = to;
        if to < bound {
            return (false, None);
        }
        (true, self.finish_rebuild())
    }

    /// The copy, complete, takes the cache's place with the cache's settings and bookkeeping.
    fn finish_rebuild(&mut self) -> Option<Retired> {
        let rebuild = self.rebuild.take()?;
        let mut fresh = rebuild.fresh;
        fresh.limits = self.limits;
        // Still no later than anything held: the copy holds the same records.
        fresh.next_expiry = self.next_expiry;
        fresh.over_limit = self.over_limit || self.sweep.is_some_and(|sweep| sweep.enforce);
        fresh.merge_refusals = self.merge_refusals;
        fresh.compactions = self.compactions + 1;
        Some(Retired {
            _replaced: std::mem::replace(self, fresh),
        })
    }

    /// Brings the copy of pair `pid` up to date after a change to it (its IPs, its creation in
    /// a reused slot, its removal), if a compaction under way has copied it already. Every
    /// change to a pair's IPs or existence ends with this; without a compaction it is one test.
    pub(super) fn mirror(&mut self, pid: u32) {
        let Some(rebuild) = self.rebuild.as_deref_mut() else {
            return;
        };
        if pid >= rebuild.cursor {
            return;
        }
        let Some(slot) = rebuild.copied.get_mut(pid as usize) else {
            return;
        };
        *slot = match (self.pairs.get(pid), *slot) {
            (Some(pair), NONE) => rebuild.fresh.put_pair(
                self.endpoints.text(pair.endpoint),
                self.names.text(pair.name),
                pair.learned,
                &pair.ips,
            ),
            (Some(pair), copy) => {
                if rebuild.fresh.set_ips(copy, pair.learned, &pair.ips) {
                    copy
                } else {
                    NONE
                }
            }
            (None, NONE) => NONE,
            (None, copy) => {
                rebuild.fresh.remove_pair(copy);
                NONE
            }
        };
    }

    /// Gives (endpoint, name) exactly the records `ips` holds; returns its pair id, or `NONE`
    /// if it holds nothing (ids exhausted, or `ips` empty).
    pub(super) fn put_pair(
        &mut self,
        endpoint: &str,
        name: &str,
        learned: u64,
        ips: &IpList,
    ) -> u32 {
        let Some(pid) = self.pair_for(endpoint, name) else {
            return NONE;
        };
        if self.set_ips(pid, learned, ips) {
            pid
        } else {
            NONE
        }
    }

    /// Replaces pair `pid`'s records with `ips`, indexing only the IPs that changed (an IP
    /// shared by many pairs has a long list to edit); a pair left with none is removed.
    /// Returns whether the pair is still held.
    fn set_ips(&mut self, pid: u32, learned: u64, ips: &IpList) -> bool {
        let Some(pair) = self.pairs.get_mut(pid) else {
            return false;
        };
        pair.learned = learned;
        // The common case, a refresh: the same IPs in the same order, new expiries.
        let same_ips = !ips.is_empty()
            && pair.ips.len() == ips.len()
            && pair
                .ips
                .as_slice()
                .iter()
                .zip(ips.as_slice())
                .all(|(held, new)| held.ip() == new.ip());
        if same_ips {
            pair.ips = ips.clone();
            return true;
        }
        let old = std::mem::replace(&mut pair.ips, IpList::Many(Vec::new()));
        // Sorted, so that a name with a thousand IPs costs n log n here, not n².
        let sorted = |list: &IpList| {
            let mut ips: Vec<IpAddr> = list.as_slice().iter().map(IpRec::ip).collect();
            ips.sort_unstable();
            ips
        };
        let (before, after) = (sorted(&old), sorted(ips));
        for ip in &before {
            if after.binary_search(ip).is_err() {
                self.ips.remove(*ip, pid);
            }
        }
        self.ip_count = self.ip_count.saturating_sub(old.len());
        let mut list = ips.clone();
        // Only fails if ids ran out; drop rather than index inconsistently.
        list.extract(|rec| {
            before.binary_search(&rec.ip()).is_err() && !self.ips.add(rec.ip(), pid)
        });
        self.ip_count += list.len();
        match self.pairs.get_mut(pid) {
            Some(pair) if !list.is_empty() => {
                pair.ips = list;
                true
            }
            _ => {
                self.remove_pair(pid);
                false
            }
        }
    }
}

impl Rebuild {
    pub(super) fn heap_bytes(&self) -> usize {
        self.fresh.approx_heap_bytes() + self.copied.capacity() * size_of::<u32>()
    }
}

#[cfg(test)]
impl DnsCache {
    /// Panics unless the copy of a compaction under way holds exactly the cache's pairs below
    /// the cursor, record for record, and is consistent in itself.
    pub(super) fn assert_copy_matches(&self) {
        let Some(rebuild) = self.rebuild.as_deref() else {
            return;
        };
        let mut fresh = rebuild.fresh.clone();
        // Set when the copy takes over, not while it is built.
        fresh.next_expiry = 0;
        fresh.assert_consistent();
        let mut below = 0;
        for (pid, pair) in self.pairs.iter().filter(|&(pid, _)| pid < rebuild.cursor) {
            below += 1;
            let endpoint = self.endpoints.text(pair.endpoint);
            let name = self.names.text(pair.name);
            let copy = fresh.find_pair(endpoint, name);
            assert_eq!(
                rebuild.copied.get(pid as usize).copied(),
                copy,
                "copy of pair {pid} ({endpoint}, {name})"
            );
            let copied = copy.and_then(|id| fresh.pairs.get(id)).map(|p| &p.ips);
            assert_eq!(
                copied.map(IpList::sorted),
                Some(pair.ips.sorted()),
                "records of ({endpoint}, {name})"
            );
        }
        assert_eq!(
            fresh.name_count(),
            below,
            "the copy holds pairs the cache does not"
        );
    }
}
