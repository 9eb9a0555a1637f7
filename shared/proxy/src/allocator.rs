//! One setting of glibc's allocator for the processes that hold the FQDN cache.
//!
//! glibc keeps small freed blocks in "fastbins" and merges them only later, all at once, when
//! some larger allocation needs room. A whole-cache copy (the agent takes two a second, each
//! two strings and a vector per entry) frees millions of such blocks together; the merge then
//! lands in whatever allocation comes next, possibly under the cache's lock: measured at a
//! million entries, one 1,024-pair step of the expiry sweep took 45-60 ms after a copy (perf:
//! `malloc_consolidate`, `unlink_chunk`), 0.08 ms without fastbins. Freed blocks then merge as
//! they are freed, spreading the cost (the copy itself ~10% slower); the per-thread caches in
//! front of the allocator still serve the hot path's small allocations.

// The one call below is an FFI call; nothing else here.
#![allow(unsafe_code)]

/// Turns glibc's fastbins off (`mallopt(M_MXFAST, 0)`). Call at the very start of `main`,
/// before other threads exist. Returns whether the setting took (always false where the C
/// library is not glibc, which has no fastbins to turn off).
pub fn merge_freed_blocks_at_once() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes a tuning parameter of the allocator, M_MXFAST = 0 is a
        // documented value (no fastbins), and the caller runs this before any other thread
        // allocates, so no allocation is in progress while the setting changes.
        unsafe { libc::mallopt(libc::M_MXFAST, 0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
