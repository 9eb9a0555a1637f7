//! A counting global allocator: the cache's memory measured from what it really asks of the
//! allocator, not from its own estimate. It keeps two running totals: the bytes requested,
//! and the bytes the allocator really hands out for them (glibc's usable size plus its 8-byte
//! chunk header), which is what resident memory grows by.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// Wraps the system allocator; every other allocation of the process is counted too, so
/// callers take differences around the code they measure and keep other threads idle.
#[derive(Debug)]
pub struct Counting;

static REQUESTED: AtomicIsize = AtomicIsize::new(0);
static HELD: AtomicIsize = AtomicIsize::new(0);

/// glibc keeps one size word in front of every chunk.
const CHUNK_HEADER: isize = 8;

fn held_by(ptr: *mut u8) -> isize {
    // SAFETY: `ptr` was just returned by (or is about to be given back to) the system
    // allocator, which on Linux is glibc malloc for every layout `System` serves:
    // malloc_usable_size accepts any live pointer it returned.
    #[allow(unsafe_code)]
    let usable = unsafe { libc::malloc_usable_size(ptr.cast()) };
    isize::try_from(usable).unwrap_or(isize::MAX) + CHUNK_HEADER
}

fn size_of(layout: Layout) -> isize {
    isize::try_from(layout.size()).unwrap_or(isize::MAX)
}

// SAFETY: every method forwards to `System` with the same arguments and only adds relaxed
// atomic counting, which neither allocates nor touches the memory handed out.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            REQUESTED.fetch_add(size_of(layout), Ordering::Relaxed);
            HELD.fetch_add(held_by(ptr), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            REQUESTED.fetch_add(size_of(layout), Ordering::Relaxed);
            HELD.fetch_add(held_by(ptr), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        REQUESTED.fetch_sub(size_of(layout), Ordering::Relaxed);
        HELD.fetch_sub(held_by(ptr), Ordering::Relaxed);
        // SAFETY: forwarded unchanged; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let before = held_by(ptr);
        // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            let grown = isize::try_from(new_size).unwrap_or(isize::MAX) - size_of(layout);
            REQUESTED.fetch_add(grown, Ordering::Relaxed);
            HELD.fetch_add(held_by(new) - before, Ordering::Relaxed);
        }
        new
    }
}

/// Bytes live right now: (requested by the program, held by the allocator for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub requested: isize,
    pub held: isize,
}

impl Usage {
    pub fn now() -> Usage {
        Usage {
            requested: REQUESTED.load(Ordering::Relaxed),
            held: HELD.load(Ordering::Relaxed),
        }
    }

    /// What was allocated (net) since `earlier`.
    pub fn since(self, earlier: Usage) -> Usage {
        Usage {
            requested: self.requested - earlier.requested,
            held: self.held - earlier.held,
        }
    }
}
