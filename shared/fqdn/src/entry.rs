use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::UnixTime;

/// The addresses of one answer an insert sorted: most answers carry a few, which stay inline
/// (every answer makes an [`InsertOutcome`], and a heap list each was about 1% of the proxy's
/// samples under load).
pub type AnswerIps = SmallVec<[IpAddr; 4]>;

/// Why an IP is (still) in the cache.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Learned from a DNS answer whose TTL has not run out yet.
    #[default]
    Lookup,
    /// The DNS TTL has run out but connections still use the IP, so it is kept for their idle
    /// grace (Cilium calls these "zombies"). New lookups did not vouch for it.
    Connection,
    /// Read from a snapshot or journal and not confirmed by an answer since.
    Restored,
}

/// One cached IP of a name, as seen from outside the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CachedIp {
    pub ip: IpAddr,
    /// Absolute, so the remaining TTL survives a restart of the process holding it.
    pub expires_at: UnixTime,
    pub source: Source,
}

impl CachedIp {
    /// Seconds left at `now` (0 once expired).
    pub const fn ttl_remaining(&self, now: UnixTime) -> u64 {
        self.expires_at.saturating_sub(now)
    }
}

/// The IPs one endpoint learned for one name; the unit of listing, snapshots and resync.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CacheEntry {
    pub endpoint: String,
    pub name: String,
    pub ips: Vec<CachedIp>,
    /// When the latest answer behind these IPs came, Unix milliseconds (0: not known, as in
    /// snapshots of builds before it was kept): a clean made since removes them, one made
    /// after does not.
    #[serde(default)]
    pub learned_at_ms: u64,
}

/// An (endpoint, name, IP) triple that left the cache; the caller revokes the datapath entries
/// it derived from it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Expired {
    pub endpoint: String,
    pub name: String,
    pub ip: IpAddr,
}

/// What [`DnsCache::insert`](crate::DnsCache::insert) changed.
///
/// `added` tells the caller which datapath entries to create, `evicted` which to revoke. An
/// IP that would be evicted by the very answer that brought it is in neither list: it never
/// became visible.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct InsertOutcome {
    /// IPs the (endpoint, name) did not hold before.
    pub added: AnswerIps,
    /// IPs it already held (expiry set to the later of old and new).
    pub refreshed: AnswerIps,
    /// IPs it held before and lost to `max_ips_per_name`, soonest-expiring first.
    pub evicted: AnswerIps,
    /// Whether some IP it already held got a later expiry (or, on an equal one, an answer's
    /// backing where it had only a restored one).
    pub extended: bool,
    /// Expiry this answer gave, after raising its TTL to `min_ttl`.
    pub expires_at: UnixTime,
    /// The answer was for a name the endpoint did not hold, and it already held
    /// `max_names_per_endpoint`: nothing was cached.
    pub refused: bool,
}

impl InsertOutcome {
    /// Whether the answer changed the cache. An answer repeating what the cache holds (the
    /// same IPs, expiring no later, as every answer from a caching resolver does until the
    /// record expires there) does not, so it need not be told to anyone who has the cache.
    pub fn changed(&self) -> bool {
        self.extended || !self.added.is_empty() || !self.evicted.is_empty()
    }

    /// Keeps of `answer` (the addresses given to the insert) only those the cache holds for
    /// the name now, in their order: all of them unless `max_ips_per_name` trimmed the answer
    /// (or the cache could not index one).
    pub fn retain_kept(&self, answer: &mut Vec<IpAddr>) {
        if self.added.len() + self.refreshed.len() == answer.len() {
            return;
        }
        let kept: std::collections::HashSet<IpAddr> =
            self.added.iter().chain(&self.refreshed).copied().collect();
        answer.retain(|ip| kept.contains(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_serializes_lowercase() {
        assert_eq!(
            serde_json::to_string(&[Source::Lookup, Source::Connection, Source::Restored]).unwrap(),
            r#"["lookup","connection","restored"]"#
        );
        let s: Source = serde_json::from_str(r#""connection""#).unwrap();
        assert_eq!(s, Source::Connection);
    }

    #[test]
    fn entry_json_shape() {
        let e = CacheEntry {
            endpoint: "youssef/test".into(),
            name: "cilium.io.".into(),
            ips: vec![CachedIp {
                ip: "104.198.14.52".parse().unwrap(),
                expires_at: UnixTime(100),
                source: Source::Lookup,
            }],
            learned_at_ms: 40_123,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"endpoint":"youssef/test","name":"cilium.io.","ips":[{"ip":"104.198.14.52","expires_at":100,"source":"lookup"}],"learned_at_ms":40123}"#
        );
        assert_eq!(serde_json::from_str::<CacheEntry>(&json).unwrap(), e);
        // As written before the time learned was kept: not known.
        let older = r#"{"endpoint":"youssef/test","name":"cilium.io.","ips":[]}"#;
        assert_eq!(
            serde_json::from_str::<CacheEntry>(older)
                .unwrap()
                .learned_at_ms,
            0
        );
        assert_eq!(e.ips[0].ttl_remaining(UnixTime(40)), 60);
        assert_eq!(e.ips[0].ttl_remaining(UnixTime(400)), 0);
    }
}
