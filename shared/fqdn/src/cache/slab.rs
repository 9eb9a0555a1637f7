//! Dense storage addressed by `u32` ids, so that indexes can refer to items with 4 bytes
//! instead of a pointer or a copy of the key.

/// Marks "no item" in intrusive links stored as `u32`.
pub(crate) const NONE: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub(crate) struct Slab<T> {
    slots: Vec<Option<T>>,
    /// Vacated ids, reused before the vector grows, so churn does not grow it.
    free: Vec<u32>,
    live: usize,
}

impl<T> Slab<T> {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Slab {
            slots: Vec::with_capacity(capacity),
            free: Vec::new(),
            live: 0,
        }
    }

    /// `None` once ids would collide with [`NONE`]; nothing that fits in memory gets there.
    pub(crate) fn insert(&mut self, item: T) -> Option<u32> {
        if let Some(id) = self.free.pop()
            && let Some(slot) = self.slots.get_mut(id as usize)
        {
            *slot = Some(item);
            self.live += 1;
            return Some(id);
        }
        let id = u32::try_from(self.slots.len())
            .ok()
            .filter(|&id| id != NONE)?;
        self.slots.push(Some(item));
        self.live += 1;
        Some(id)
    }

    pub(crate) fn remove(&mut self, id: u32) -> Option<T> {
        let item = self.slots.get_mut(id as usize)?.take()?;
        self.live -= 1;
        if self.live == 0 {
            // Cheap full reset keeps the free list from holding ids of a vector about to be
            // reused from the start anyway.
            self.slots.clear();
            self.free.clear();
        } else {
            self.free.push(id);
        }
        Some(item)
    }

    pub(crate) fn get(&self, id: u32) -> Option<&T> {
        self.slots.get(id as usize)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        self.slots.get_mut(id as usize)?.as_mut()
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// One past the highest id ever handed out since the last reset.
    pub(crate) fn id_bound(&self) -> u32 {
        u32::try_from(self.slots.len()).unwrap_or(NONE)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots
            .iter()
            .zip(0u32..)
            .filter_map(|(slot, id)| slot.as_ref().map(|item| (id, item)))
    }

    /// True when most of the allocated slots are vacant, i.e. a compacting rebuild would
    /// give back a meaningful amount of memory.
    pub(crate) fn is_sparse(&self, min_slots: usize) -> bool {
        self.slots.capacity() >= min_slots && self.live.saturating_mul(4) < self.slots.capacity()
    }

    /// Bytes of the slot and free-id vectors (items' own heap allocations not included).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Option<T>>() + self.free.capacity() * size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_ids_and_resets_when_empty() {
        let mut s = Slab::with_capacity(0);
        let a = s.insert("a").unwrap();
        let b = s.insert("b").unwrap();
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        let c = s.insert("c").unwrap();
        assert_eq!(c, a);
        assert_eq!(s.len(), 2);
        assert_eq!(s.iter().map(|(_, v)| *v).collect::<Vec<_>>(), ["c", "b"]);
        s.remove(b);
        s.remove(c);
        assert_eq!(s.id_bound(), 0);
        assert_eq!(s.get(7), None);
        assert_eq!(s.get_mut(NONE), None);
    }
}
