//! Reference-counted string interning: each distinct endpoint or name is stored once, however
//! many entries use it, and is freed with the last of them so churn does not accumulate.

use std::hash::BuildHasher;
use std::hash::RandomState;

use hashbrown::HashTable;

use super::malloc_size;
use super::slab::{NONE, Slab};

#[derive(Clone, Debug)]
pub(crate) struct Sym {
    pub(crate) text: Box<str>,
    refs: u32,
    /// Head of an intrusive list of the pairs using this string (kept for names, so that a
    /// name's entries across endpoints are found without a scan).
    pub(crate) head: u32,
}

/// The table holds only ids and hashes the strings through the slab, which costs 5 bytes a
/// bucket instead of a second copy of each key.
#[derive(Clone, Debug)]
pub(crate) struct Interner {
    syms: Slab<Sym>,
    table: HashTable<u32>,
    hasher: RandomState,
}

impl Interner {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Interner {
            syms: Slab::with_capacity(capacity),
            table: HashTable::with_capacity(capacity),
            hasher: RandomState::new(),
        }
    }

    pub(crate) fn find(&self, text: &str) -> Option<u32> {
        let syms = &self.syms;
        self.table
            .find(self.hasher.hash_one(text), |&id| {
                syms.get(id).is_some_and(|s| &*s.text == text)
            })
            .copied()
    }

    /// Id of `text`, created if needed, with one more reference counted against it.
    pub(crate) fn acquire(&mut self, text: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(text);
        let Interner {
            syms,
            table,
            hasher,
        } = self;
        if let Some(&id) = table.find(hash, |&id| syms.get(id).is_some_and(|s| &*s.text == text)) {
            let sym = syms.get_mut(id)?;
            sym.refs = sym.refs.checked_add(1)?;
            return Some(id);
        }
        let id = syms.insert(Sym {
            text: text.into(),
            refs: 1,
            head: NONE,
        })?;
        table.insert_unique(hash, id, |&id| {
            syms.get(id).map_or(0, |s| hasher.hash_one(&*s.text))
        });
        Some(id)
    }

    /// References held on `id` (0 for an id not in use).
    pub(crate) fn refs(&self, id: u32) -> u32 {
        self.syms.get(id).map_or(0, |sym| sym.refs)
    }

    /// Drops one reference; the string is freed with the last one.
    pub(crate) fn release(&mut self, id: u32) {
        let Some(sym) = self.syms.get_mut(id) else {
            return;
        };
        sym.refs = sym.refs.saturating_sub(1);
        if sym.refs > 0 {
            return;
        }
        let hash = self.hasher.hash_one(&*sym.text);
        if let Ok(entry) = self.table.find_entry(hash, |&other| other == id) {
            entry.remove();
        }
        self.syms.remove(id);
    }

    pub(crate) fn get(&self, id: u32) -> Option<&Sym> {
        self.syms.get(id)
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut Sym> {
        self.syms.get_mut(id)
    }

    /// The string of `id`, or "" for an id that is not live (never the case for ids held by
    /// the cache's own structures).
    pub(crate) fn text(&self, id: u32) -> &str {
        self.syms.get(id).map_or("", |s| &s.text)
    }

    pub(crate) fn len(&self) -> usize {
        self.syms.len()
    }

    pub(crate) fn is_sparse(&self, min_slots: usize) -> bool {
        self.syms.is_sparse(min_slots)
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        let texts: usize = self
            .syms
            .iter()
            .map(|(_, s)| malloc_size(s.text.len()))
            .sum();
        self.syms.heap_bytes() + self.table.allocation_size() + texts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_references_and_frees_with_the_last() {
        let mut i = Interner::with_capacity(0);
        let a = i.acquire("cilium.io.").unwrap();
        assert_eq!(i.acquire("cilium.io.").unwrap(), a);
        let b = i.acquire("example.com.").unwrap();
        assert_ne!(a, b);
        assert_eq!(i.find("cilium.io."), Some(a));
        assert_eq!(i.text(b), "example.com.");
        i.release(a);
        assert_eq!(i.find("cilium.io."), Some(a));
        i.release(a);
        assert_eq!(i.find("cilium.io."), None);
        assert_eq!(i.text(a), "");
        assert_eq!(i.len(), 1);
        i.release(a);
        assert_eq!(i.len(), 1);
        i.release(b);
        assert_eq!(i.len(), 0);
        assert_eq!(i.find("example.com."), None);
    }
}
