//! Kernel timestamps (CLOCK_BOOTTIME ns, what `bpf_ktime_get_boot_ns` returns) to wall clock.
//!
//! The programs cannot read the wall clock cheaply, and boot time keeps counting across
//! suspend, so the maps store boot ns and userspace converts with the current offset.

use std::time::{Duration, SystemTime};

use nix::time::{ClockId, clock_gettime};

/// Now, on CLOCK_BOOTTIME, in nanoseconds.
pub(crate) fn boot_now_ns() -> u64 {
    // clock_gettime(CLOCK_BOOTTIME) cannot fail on Linux with a valid clock id; 0 would only
    // make every timestamp look as old as the boot, which errs towards "idle".
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|ts| {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000_000).saturating_add(nanos)
        })
        .unwrap_or(0)
}

/// The wall-clock time of a boot-ns timestamp.
pub(crate) fn boot_ns_to_system(ns: u64) -> SystemTime {
    let now_boot = boot_now_ns();
    let now = SystemTime::now();
    if ns <= now_boot {
        now.checked_sub(Duration::from_nanos(now_boot - ns))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    } else {
        now + Duration::from_nanos(ns - now_boot)
    }
}

/// Unix seconds of a boot-ns timestamp.
pub(crate) fn boot_ns_to_unix_secs(ns: u64) -> u64 {
    boot_ns_to_system(ns)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
