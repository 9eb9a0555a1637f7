use serde::{Deserialize, Serialize};

/// Bounds applied to what the cache keeps.
///
/// `min_ttl` exists because many names are served with TTLs of a few seconds while clients
/// keep using the addresses for much longer; without a floor the allow entries would be revoked
/// under live traffic. `max_ips_per_name` stops one name (e.g. a DNS-based load balancer
/// rotating through a large pool) from growing the cache and the datapath without bound, and
/// `max_names_per_endpoint` one client (asking random names under an allowed wildcard, each
/// answered) from growing the node's memory without bound: it can then only fill its own share
/// (every sender the proxy knows no endpoint for shares one, `reserved:unknown`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheLimits {
    /// TTLs below this many seconds are raised to it.
    pub min_ttl: u32,
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
        max_ips_per_name: 0,
        max_names_per_endpoint: 0,
    };

    /// The TTL actually applied to an answer that carried `ttl`.
    pub const fn effective_ttl(&self, ttl: u32) -> u32 {
        if ttl < self.min_ttl {
            self.min_ttl
        } else {
            ttl
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_floor_and_cap() {
        let l = CacheLimits {
            min_ttl: 60,
            max_ips_per_name: 2,
            max_names_per_endpoint: 3,
        };
        assert_eq!(l.effective_ttl(5), 60);
        assert_eq!(l.effective_ttl(600), 600);
        assert!(!l.is_over(2));
        assert!(l.is_over(3));
        assert!(!l.is_full(2));
        assert!(l.is_full(3));
        assert!(!CacheLimits::UNLIMITED.is_full(usize::MAX));
        assert!(!CacheLimits::UNLIMITED.is_over(usize::MAX));
        assert_eq!(CacheLimits::default(), CacheLimits::UNLIMITED);
    }

    #[test]
    fn deserializes_with_defaults() {
        let l: CacheLimits = serde_json::from_str(r#"{"min_ttl": 5}"#).unwrap();
        assert_eq!(l.min_ttl, 5);
        assert_eq!(l.max_ips_per_name, 0);
        assert_eq!(l.max_names_per_endpoint, 0);
    }
}
