//! Dense storage addressed by `u32` ids, so that indexes can refer to items with 4 bytes
//! instead of a pointer or a copy of the key.

/// Marks "no item" in intrusive links stored as `u32`.
pub(crate) const NONE: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub(crate) struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// The most recently vacated id (`NONE`: none), reused before the vector grows, so churn
    /// does not grow it.
    free: u32,
    live: usize,
}

/// The list of vacant ids is threaded through the vacant slots themselves: freeing never
/// allocates. (A separate vector of free ids was copied whole each time it doubled: up to
/// 4 ms inside one step of a sweep, under the cache's lock, when most of a million entries
/// expired together.)
#[derive(Clone, Debug)]
enum Slot<T> {
    Occupied(T),
    /// Vacant; holds the next vacant id (or `NONE`).
    Vacant(u32),
}

impl<T> Slab<T> {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Slab {
            slots: Vec::with_capacity(capacity),
            free: NONE,
            live: 0,
        }
    }

    /// `None` once ids would collide with [`NONE`]; nothing that fits in memory gets there.
    pub(crate) fn insert(&mut self, item: T) -> Option<u32> {
        if let Some(slot) = self.slots.get_mut(self.free as usize)
            && let Slot::Vacant(next) = *slot
        {
            let id = self.free;
            *slot = Slot::Occupied(item);
            self.free = next;
            self.live += 1;
            return Some(id);
        }
        let id = u32::try_from(self.slots.len())
            .ok()
            .filter(|&id| id != NONE)?;
        self.slots.push(Slot::Occupied(item));
        self.live += 1;
        Some(id)
    }

    pub(crate) fn remove(&mut self, id: u32) -> Option<T> {
        let slot = self.slots.get_mut(id as usize)?;
        let item = match std::mem::replace(slot, Slot::Vacant(self.free)) {
            Slot::Occupied(item) => item,
            vacant @ Slot::Vacant(_) => {
                *slot = vacant;
                return None;
            }
        };
        self.live -= 1;
        if self.live == 0 {
            // Cheap full reset: the vector is about to be reused from the start anyway.
            self.slots.clear();
            self.free = NONE;
        } else {
            self.free = id;
        }
        Some(item)
    }

    pub(crate) fn get(&self, id: u32) -> Option<&T> {
        match self.slots.get(id as usize)? {
            Slot::Occupied(item) => Some(item),
            Slot::Vacant(_) => None,
        }
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        match self.slots.get_mut(id as usize)? {
            Slot::Occupied(item) => Some(item),
            Slot::Vacant(_) => None,
        }
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
            .filter_map(|(slot, id)| match slot {
                Slot::Occupied(item) => Some((id, item)),
                Slot::Vacant(_) => None,
            })
    }

    /// True when most of the allocated slots are vacant, i.e. a compacting rebuild would
    /// give back a meaningful amount of memory.
    pub(crate) fn is_sparse(&self, min_slots: usize) -> bool {
        self.slots.capacity() >= min_slots && self.live.saturating_mul(4) < self.slots.capacity()
    }

    /// Bytes of the slot vector (items' own heap allocations not included).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Slot<T>>()
    }
}

/// Bytes a slot of `T` takes (the layout tests keep it at the item's own size).
#[cfg(test)]
pub(crate) fn slot_bytes<T>() -> usize {
    size_of::<Slot<T>>()
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
        // Vacated ids come back most recent first.
        let d = s.insert("d").unwrap();
        let e = s.insert("e").unwrap();
        assert_eq!((d, e), (2, 3));
        s.remove(d);
        s.remove(a);
        assert_eq!(s.remove(d), None);
        assert_eq!(s.insert("f"), Some(a));
        assert_eq!(s.insert("g"), Some(d));
        assert_eq!(s.insert("h"), Some(4));
        assert_eq!(s.len(), 5);
        for id in [b, a, d, e, 4] {
            s.remove(id);
        }
        assert_eq!(s.len(), 0);
        assert_eq!(s.id_bound(), 0);
        assert_eq!(s.get(7), None);
        assert_eq!(s.get_mut(NONE), None);
    }
}
