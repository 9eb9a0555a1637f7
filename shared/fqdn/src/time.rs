use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest TTL a DNS record can carry, s (2^31 - 1, RFC 2181 §8). Connections keep an
/// address for their idle grace, bounded alike: an expiry further from now than this is
/// garbage (a damaged file, a broken peer), which with no `max_ttl` would never expire.
pub const MAX_DNS_TTL: u64 = (1 << 31) - 1;

/// Wall-clock seconds since the Unix epoch.
///
/// The cache never reads a clock: callers pass `now` in, which keeps the cache deterministic
/// under test. Wall-clock (not monotonic) time is used so that an expiry written into a snapshot
/// still means the same instant after a process restart.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixTime(pub u64);

impl UnixTime {
    /// The latest representable instant; used as "never expires".
    pub const MAX: UnixTime = UnixTime(u64::MAX);

    /// Seconds since the epoch.
    pub const fn secs(self) -> u64 {
        self.0
    }

    /// `self + secs`, saturating at [`UnixTime::MAX`] so a huge TTL cannot wrap into the past.
    #[must_use]
    pub const fn plus_secs(self, secs: u64) -> UnixTime {
        UnixTime(self.0.saturating_add(secs))
    }

    /// Seconds from `earlier` to `self`, or 0 if `earlier` is not before `self`.
    pub const fn saturating_sub(self, earlier: UnixTime) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for UnixTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u64> for UnixTime {
    fn from(secs: u64) -> Self {
        UnixTime(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(UnixTime(10).plus_secs(5), UnixTime(15));
        assert_eq!(UnixTime(u64::MAX - 1).plus_secs(5), UnixTime::MAX);
        assert_eq!(UnixTime(15).saturating_sub(UnixTime(10)), 5);
        assert_eq!(UnixTime(10).saturating_sub(UnixTime(15)), 0);
        assert_eq!(UnixTime(7).secs(), 7);
        assert_eq!(UnixTime::from(3), UnixTime(3));
        assert_eq!(UnixTime(42).to_string(), "42");
    }

    #[test]
    fn serializes_as_a_bare_number() {
        assert_eq!(
            serde_json::to_string(&UnixTime(1_700_000_000)).unwrap(),
            "1700000000"
        );
        let t: UnixTime = serde_json::from_str("12").unwrap();
        assert_eq!(t, UnixTime(12));
    }
}
