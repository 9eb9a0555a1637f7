//! IP -> pairs index, so that "which names does this IP belong to" is a lookup, not a scan.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;

use hashbrown::HashTable;

use super::malloc_size;
use super::slab::Slab;

/// 32 bytes. Nearly every IP belongs to exactly one (endpoint, name), so the first reference is
/// inline and the rest (shared CDN addresses) spill into a boxed vector.
#[derive(Clone, Debug)]
struct IpNode {
    ip: IpAddr,
    first: u32,
    #[allow(
        clippy::box_collection,
        reason = "a thin 8-byte pointer instead of a 24-byte Vec keeps every node at 32 bytes"
    )]
    more: Option<Box<Vec<u32>>>,
}

impl IpNode {
    fn refs(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.first).chain(self.more.iter().flat_map(|m| m.iter().copied()))
    }

    /// Keeps the references `keep` accepts, in place; returns whether none is left.
    fn retain(&mut self, keep: impl Fn(u32) -> bool) -> bool {
        if let Some(more) = self.more.as_deref_mut() {
            more.retain(|&pair| keep(pair));
        }
        if !keep(self.first) {
            match self.more.as_deref_mut().and_then(Vec::pop) {
                Some(last) => self.first = last,
                None => return true,
            }
        }
        if let Some(more) = self.more.as_deref_mut() {
            if more.is_empty() {
                self.more = None;
            } else if more.capacity() > 8 && more.len() * 4 < more.capacity() {
                more.shrink_to_fit();
            }
        }
        false
    }
}

/// A set of pair ids within one range, as a bitmap: membership is a shift and a mask.
struct PairSet {
    low: u32,
    words: Vec<u64>,
}

impl PairSet {
    /// Room for every id from the lowest to the highest of `pairs` (none set).
    fn spanning(pairs: impl Iterator<Item = u32> + Clone) -> PairSet {
        let low = pairs.clone().min().unwrap_or(0);
        let high = pairs.max().unwrap_or(0);
        let bits = usize::try_from(high - low)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        PairSet {
            low,
            words: vec![0; bits.div_ceil(64)],
        }
    }

    fn slot(&self, pair: u32) -> Option<(usize, u64)> {
        let offset = usize::try_from(pair.checked_sub(self.low)?).ok()?;
        (offset / 64 < self.words.len()).then(|| (offset / 64, 1 << (offset % 64)))
    }

    fn set(&mut self, refs: &[(IpAddr, u32)], on: bool) {
        for &(_, pair) in refs {
            if let Some((word, bit)) = self.slot(pair)
                && let Some(slot) = self.words.get_mut(word)
            {
                if on {
                    *slot |= bit;
                } else {
                    *slot &= !bit;
                }
            }
        }
    }

    fn contains(&self, pair: u32) -> bool {
        self.slot(pair)
            .and_then(|(word, bit)| self.words.get(word).map(|w| w & bit != 0))
            .unwrap_or(false)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct IpIndex {
    nodes: Slab<IpNode>,
    table: HashTable<u32>,
    hasher: RandomState,
}

impl IpIndex {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        IpIndex {
            nodes: Slab::with_capacity(capacity),
            table: HashTable::with_capacity(capacity),
            hasher: RandomState::new(),
        }
    }

    fn find(&self, ip: IpAddr) -> Option<u32> {
        let nodes = &self.nodes;
        self.table
            .find(self.hasher.hash_one(ip), |&id| {
                nodes.get(id).is_some_and(|n| n.ip == ip)
            })
            .copied()
    }

    /// Pair ids that hold `ip` (callers check expiry themselves).
    pub(crate) fn pairs_of(&self, ip: IpAddr) -> impl Iterator<Item = u32> + '_ {
        self.find(ip)
            .and_then(|id| self.nodes.get(id))
            .into_iter()
            .flat_map(IpNode::refs)
    }

    /// Records that `pair` holds `ip`; the caller guarantees it was not recorded already.
    /// `false` only if the index is full (ids exhausted).
    pub(crate) fn add(&mut self, ip: IpAddr, pair: u32) -> bool {
        let hash = self.hasher.hash_one(ip);
        let IpIndex {
            nodes,
            table,
            hasher,
        } = self;
        if let Some(&id) = table.find(hash, |&id| nodes.get(id).is_some_and(|n| n.ip == ip)) {
            let Some(node) = nodes.get_mut(id) else {
                return false;
            };
            node.more.get_or_insert_with(Box::default).push(pair);
            return true;
        }
        let Some(id) = nodes.insert(IpNode {
            ip,
            first: pair,
            more: None,
        }) else {
            return false;
        };
        table.insert_unique(hash, id, |&id| {
            nodes.get(id).map_or(0, |n| hasher.hash_one(n.ip))
        });
        true
    }

    pub(crate) fn remove(&mut self, ip: IpAddr, pair: u32) {
        let Some(id) = self.find(ip) else {
            return;
        };
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        if let Some(more) = node.more.as_deref_mut() {
            if node.first == pair {
                if let Some(last) = more.pop() {
                    node.first = last;
                }
            } else if let Some(pos) = more.iter().position(|&p| p == pair) {
                more.swap_remove(pos);
            }
            if more.is_empty() {
                node.more = None;
            } else if more.capacity() > 8 && more.len() * 4 < more.capacity() {
                more.shrink_to_fit();
            }
            return;
        }
        if node.first != pair {
            return;
        }
        self.drop_node(ip, id);
    }

    /// Removes many (IP, pair) references at once, walking each IP's list once however many
    /// of its pairs go. One by one, each removal scans the list: quadratic for an IP that many
    /// names share (random names under a wildcard that all resolve to one address), and the
    /// expiry sweep, which removes them all together, runs under the cache's lock. The walk
    /// tests each pair against a bitmap of the removed ones (the sweep removes pairs of one
    /// range of ids, a chunk of it at a time) and keeps the rest in place.
    pub(crate) fn remove_many(&mut self, mut refs: Vec<(IpAddr, u32)>) {
        refs.sort_unstable();
        let mut doomed = PairSet::spanning(refs.iter().map(|&(_, pair)| pair));
        for group in refs.chunk_by(|a, b| a.0 == b.0) {
            let [(ip, first), ..] = group else {
                continue;
            };
            if group.len() == 1 {
                self.remove(*ip, *first);
                continue;
            }
            let Some(id) = self.find(*ip) else {
                continue;
            };
            let Some(node) = self.nodes.get_mut(id) else {
                continue;
            };
            doomed.set(group, true);
            let emptied = node.retain(|pair| !doomed.contains(pair));
            doomed.set(group, false);
            if emptied {
                self.drop_node(*ip, id);
            }
        }
    }

    fn drop_node(&mut self, ip: IpAddr, id: u32) {
        let hash = self.hasher.hash_one(ip);
        if let Ok(entry) = self.table.find_entry(hash, |&other| other == id) {
            entry.remove();
        }
        self.nodes.remove(id);
    }

    /// Every (IP, pair) reference, for consistency checks.
    #[cfg(test)]
    pub(crate) fn references(&self) -> Vec<(IpAddr, u32)> {
        self.nodes
            .iter()
            .flat_map(|(_, n)| n.refs().map(move |pid| (n.ip, pid)))
            .collect()
    }

    /// Distinct IPs indexed.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn is_sparse(&self, min_slots: usize) -> bool {
        self.nodes.is_sparse(min_slots)
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        let spill: usize = self
            .nodes
            .iter()
            .filter_map(|(_, n)| n.more.as_deref())
            .map(|m| malloc_size(size_of::<Vec<u32>>()) + malloc_size(m.capacity() * 4))
            .sum();
        self.nodes.heap_bytes() + self.table.allocation_size() + spill
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_is_compact() {
        assert_eq!(size_of::<IpNode>(), 32);
        assert_eq!(super::super::slab::slot_bytes::<IpNode>(), 32);
    }

    #[test]
    fn shared_ips_keep_every_reference() {
        let mut idx = IpIndex::with_capacity(0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(idx.add(ip, 1));
        assert!(idx.add(ip, 2));
        assert!(idx.add(ip, 3));
        assert!(idx.add(other, 1));
        let mut got: Vec<u32> = idx.pairs_of(ip).collect();
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3]);
        idx.remove(ip, 1);
        idx.remove(ip, 9);
        let mut got: Vec<u32> = idx.pairs_of(ip).collect();
        got.sort_unstable();
        assert_eq!(got, [2, 3]);
        idx.remove(ip, 3);
        idx.remove(ip, 2);
        assert_eq!(idx.pairs_of(ip).count(), 0);
        assert_eq!(idx.len(), 1);
        idx.remove(other, 2);
        assert_eq!(idx.len(), 1);
        idx.remove(other, 1);
        assert_eq!(idx.len(), 0);
        idx.remove(other, 1);
    }

    #[test]
    fn many_references_go_at_once() {
        let mut idx = IpIndex::with_capacity(0);
        let shared: IpAddr = "10.0.0.1".parse().unwrap();
        let alone: IpAddr = "10.0.0.2".parse().unwrap();
        let emptied: IpAddr = "10.0.0.3".parse().unwrap();
        for pair in 0..1000 {
            assert!(idx.add(shared, pair));
        }
        assert!(idx.add(alone, 5));
        assert!(idx.add(emptied, 7));
        assert!(idx.add(emptied, 8));
        let mut refs: Vec<(IpAddr, u32)> = (0..1000)
            .filter(|pair| pair % 10 != 0)
            .map(|pair| (shared, pair))
            .collect();
        refs.extend([(emptied, 8), (alone, 5), (emptied, 7), (shared, 5000)]);
        idx.remove_many(refs);
        let mut left: Vec<u32> = idx.pairs_of(shared).collect();
        left.sort_unstable();
        assert_eq!(left, (0..1000).step_by(10).collect::<Vec<u32>>());
        assert_eq!(idx.pairs_of(alone).count(), 0);
        assert_eq!(idx.pairs_of(emptied).count(), 0);
        assert_eq!(idx.len(), 1, "only the shared IP is left");
        idx.remove_many((0..1000).step_by(10).map(|pair| (shared, pair)).collect());
        assert_eq!(idx.len(), 0);
    }
}
