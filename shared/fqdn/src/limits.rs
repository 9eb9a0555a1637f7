use serde::{Deserialize, Serialize};

use crate::UnixTime;

/// Bounds applied to what the cache keeps.
///
/// `min_ttl` exists because many names are served with TTLs of a few seconds while clients
/// keep using the addresses for much longer; without a floor the allow entries would be revoked
/// under live traffic. `max_ips_per_name` stops one name (e.g. a DNS-based load balancer
/// rotating through a large pool) from growing the cache and the datapath without bound, and
/// `max_names_per_endpoint` one client (asking random names under an allowed wildcard, each
/// answered) from growing the node's memory without bound: it can then only fill its own share.
/// `max_ttl`
/// bounds how long any answer keeps its entries, wherever they came from: answers, a restored
/// snapshot, the peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheLimits {
    /// TTLs below this many seconds are raised to it.
    pub min_ttl: u32,
    /// TTLs above this many seconds are lowered to it (before `min_ttl` applies); 0 means
    /// no ceiling.
    pub max_ttl: u32,
    /// Most IPs kept per (endpoint, name); 0 means unlimited.
    pub max_ips_per_name: usize,
    /// Most names kept per endpoint; an answer for a further name is not cached until some
    /// are swept (the proxy answers SERVFAIL where the endpoint's rules need the entry).
    /// 0 means unlimited.
    pub max_names_per_endpoint: usize,
}

impl CacheLimits {
    /// No TTL floor and no caps.
    pub const UNLIMITED: CacheLimits = CacheLimits {
        min_ttl: 0,
        max_ttl: 0,
        max_ips_per_name: 0,
        max_names_per_endpoint: 0,
    };

    /// The TTL actually applied to an answer that carried `ttl`.
    pub const fn effective_ttl(&self, ttl: u32) -> u32 {
        let ttl = if self.max_ttl != 0 && ttl > self.max_ttl {
            self.max_ttl
        } else {
            ttl
        };
        if ttl < self.min_ttl {
            self.min_ttl
        } else {
            ttl
        }
    }

    /// `expires_at` (from a snapshot or the peer), brought within `max_ttl` of `now`.
    pub const fn bounded_expiry(&self, now: UnixTime, expires_at: UnixTime) -> UnixTime {
        if self.max_ttl == 0 {
            return expires_at;
        }
        let latest = now.plus_secs(self.effective_ttl(self.max_ttl) as u64);
        if expires_at.0 > latest.0 {
            latest
        } else {
            expires_at
        }
    }

    /// Whether a name holding `count` IPs is over the cap.
    pub const fn is_over(&self, count: usize) -> bool {
        self.max_ips_per_name != 0 && count > self.max_ips_per_name
    }

    /// Whether an endpoint holding `names` names may not take another.
    pub const fn is_full(&self, names: usize) -> bool {
        self.max_names_per_endpoint != 0 && names >= self.max_names_per_endpoint
    }

    /// Whether a merge (the peer's cache, a journal, a snapshot) adding an IP to a name
    /// holding `count` trims the name to `max_ips_per_name` first, as the next `gc` would
    /// (the soonest-expiring go). Merges may leave a name over the cap until that `gc` (the
    /// union of two caches within it holds up to twice it, and a peer streams each answer that
    /// changed its cache), but not past twice it: each IP a merge adds is looked for among
    /// its name's, so a peer's name of 400,000 cost minutes of CPU under the cache's lock.
    pub const fn merge_trims_ips(&self, count: usize) -> bool {
        self.max_ips_per_name != 0 && count >= self.max_ips_per_name.saturating_mul(2)
    }

    /// Whether a merge may not add a name to an endpoint holding `names`: four times
    /// `max_names_per_endpoint`, past what the union of two caches within it holds (with the
    /// names expired here but not yet swept, and new ones the peer streams meanwhile), which
    /// only a peer sending what no cache within the cap holds reaches.
    pub const fn merge_refuses_name(&self, names: usize) -> bool {
        self.max_names_per_endpoint != 0 && names >= self.max_names_per_endpoint.saturating_mul(4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_floor_and_cap() {
        let l = CacheLimits {
            min_ttl: 60,
            max_ttl: 0,
            max_ips_per_name: 2,
            max_names_per_endpoint: 3,
        };
        assert_eq!(l.effective_ttl(5), 60);
        assert_eq!(l.effective_ttl(600), 600);
        assert_eq!(
            l.bounded_expiry(UnixTime(100), UnixTime::MAX),
            UnixTime::MAX
        );
        let capped = CacheLimits { max_ttl: 300, ..l };
        assert_eq!(capped.effective_ttl(5), 60);
        assert_eq!(capped.effective_ttl(600), 300);
        assert_eq!(
            capped.bounded_expiry(UnixTime(100), UnixTime::MAX),
            UnixTime(400)
        );
        assert_eq!(
            capped.bounded_expiry(UnixTime(100), UnixTime(150)),
            UnixTime(150)
        );
        // The floor wins over the ceiling, as for answers.
        let floor_above = CacheLimits {
            min_ttl: 900,
            ..capped
        };
        assert_eq!(floor_above.effective_ttl(600), 900);
        assert_eq!(
            floor_above.bounded_expiry(UnixTime(100), UnixTime::MAX),
            UnixTime(1000)
        );
        assert!(!l.is_over(2));
        assert!(l.is_over(3));
        assert!(!l.is_full(2));
        assert!(l.is_full(3));
        assert!(!l.merge_trims_ips(3));
        assert!(l.merge_trims_ips(4));
        assert!(!l.merge_refuses_name(11));
        assert!(l.merge_refuses_name(12));
        assert!(!CacheLimits::UNLIMITED.merge_trims_ips(usize::MAX));
        assert!(!CacheLimits::UNLIMITED.merge_refuses_name(usize::MAX));
        assert!(!CacheLimits::UNLIMITED.is_full(usize::MAX));
        assert!(!CacheLimits::UNLIMITED.is_over(usize::MAX));
        assert_eq!(CacheLimits::default(), CacheLimits::UNLIMITED);
    }

    #[test]
    fn deserializes_with_defaults() {
        let l: CacheLimits = serde_json::from_str(r#"{"min_ttl": 5}"#).unwrap();
        assert_eq!(l.min_ttl, 5);
        assert_eq!(l.max_ttl, 0);
        assert_eq!(l.max_ips_per_name, 0);
        assert_eq!(l.max_names_per_endpoint, 0);
    }
}
