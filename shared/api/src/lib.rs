//! The agent ⇄ `warden-dnsproxy` protocol.
//!
//! [`proto`] is the code generated from `proto/warden/v1/agent.proto` (one bidirectional
//! `Session` stream per proxy; the file explains the conversation). [`server`] serves it on
//! the agent's Unix socket: mode 0600 (0660 with a group), the peer's credentials checked
//! before a byte is read, every connection served on its own so a peer sending garbage loses
//! only its own connection, and each refusal reported. [`client`] connects a proxy, with HTTP/2
//! keepalives that notice a dead agent within two seconds.

#![forbid(unsafe_code)]

pub mod client;
mod error;
pub mod server;

pub use error::ApiError;

use std::net::IpAddr;

use warden_fqdn::{MAX_DNS_TTL, Source, UnixTime};
use warden_policy::DnsName;
use warden_telemetry::PeerMetrics;

/// Generated from `proto/warden/v1/agent.proto`.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("warden.v1");
}

impl From<&warden_proxy::Mapping> for proto::Mapping {
    fn from(mapping: &warden_proxy::Mapping) -> Self {
        proto::Mapping {
            endpoint: mapping.endpoint.to_string(),
            name: mapping.name.as_str().to_owned(),
            ips: mapping.ips.iter().map(ToString::to_string).collect(),
            ttl: mapping.ttl,
            expires_at: mapping.expires_at.0,
            server: mapping.server.to_string(),
            // An answer's, just given.
            kept_by_connections: false,
            learned_at_ms: mapping.learned_at_ms,
        }
    }
}

/// A mapping from the peer, checked field by field: what either side may take into its cache.
/// Both sides skip (and count) a mapping that fails the check and keep the session: ending it
/// would only bring the same mapping back with the resync, and take the good ones with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMapping {
    pub endpoint: String,
    pub name: DnsName,
    pub ips: Vec<IpAddr>,
    pub expires_at: UnixTime,
    /// [`Source::Connection`] for IPs only connections keep, else [`Source::Lookup`].
    pub source: Source,
    /// When it was answered, Unix milliseconds; never later than the check's second (0: not
    /// known).
    pub learned_at_ms: u64,
}

impl PeerMapping {
    /// Checks `mapping` field by field, its expiry against `now` (one reading for a batch).
    pub fn check(mapping: &proto::Mapping, now: UnixTime) -> Result<PeerMapping, ApiError> {
        let bad = |field: &'static str, value: &str, reason: String| ApiError::BadMapping {
            field,
            // Bounded: the value is the peer's, and goes into a log line.
            value: value.chars().take(80).collect(),
            reason,
        };
        if mapping.endpoint.is_empty() {
            return Err(bad("endpoint", "", "empty".into()));
        }
        let name = DnsName::new(&mapping.name)
            .map_err(|error| bad("name", &mapping.name, error.to_string()))?;
        let ips = mapping
            .ips
            .iter()
            .map(|ip| {
                ip.parse::<IpAddr>()
                    .map_err(|error| bad("ip", ip, error.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // No DNS answer lasts longer (RFC 2181 §8), and connections keep an address for their
        // idle grace only: later is garbage, which with no `max_ttl` would never expire, and
        // would come back with every resync.
        let latest = now.0.saturating_add(MAX_DNS_TTL);
        if mapping.expires_at > latest {
            return Err(bad(
                "expires_at",
                &mapping.expires_at.to_string(),
                format!("more than {MAX_DNS_TTL} s from now"),
            ));
        }
        Ok(PeerMapping {
            endpoint: mapping.endpoint.clone(),
            name,
            ips,
            expires_at: UnixTime(mapping.expires_at),
            source: if mapping.kept_by_connections {
                Source::Connection
            } else {
                Source::Lookup
            },
            // A time to come would shield the mapping from every clean made until then.
            learned_at_ms: mapping
                .learned_at_ms
                .min(now.0.saturating_add(1).saturating_mul(1000)),
        })
    }
}

/// Folds the peer's mappings into `cache` (later expiry wins), checking each first: one that
/// fails is skipped and counted (`warden_api_rejected_total{reason="malformed"}`), the batch's
/// first error logged, and the rest taken. Returns how many were taken. The agent takes the
/// proxy's this way, and the proxy the agent's.
pub fn merge_mappings(
    cache: &warden_proxy::SharedCache,
    mappings: &[proto::Mapping],
    metrics: &PeerMetrics,
) -> usize {
    merge_mappings_unless(cache, mappings, metrics, |_| false).0
}

/// [`merge_mappings`] but for those `removed` holds for, asked under the cache's lock for each
/// address just before it goes in (the lock is let go between chunks, and what `removed`
/// depends on may change there). Returns how many mappings went in, and how many were held
/// back (in whole or from some address on).
pub fn merge_mappings_unless(
    cache: &warden_proxy::SharedCache,
    mappings: &[proto::Mapping],
    metrics: &PeerMetrics,
    mut removed: impl FnMut(&PeerMapping) -> bool,
) -> (usize, usize) {
    let now = warden_proxy::unix_now();
    let mut checked = Vec::with_capacity(mappings.len());
    let mut first_error = None;
    for mapping in mappings {
        match PeerMapping::check(mapping, now) {
            // Expired on its way (a journal replayed long after): in the cache until the next
            // sweep, traffic to its addresses would bring it back as kept by connections,
            // and with it every grant of its name. A restore drops such entries too.
            Ok(mapping) if mapping.expires_at <= now => {}
            Ok(mapping) => checked.push(mapping),
            Err(error) => {
                metrics.rejected.with_label_values(&["malformed"]).inc();
                first_error.get_or_insert(error);
            }
        }
    }
    if let Some(error) = first_error {
        tracing::warn!(%error, "mappings from the peer skipped");
    }
    let (limits, refusals_before) = {
        let cache = cache.lock();
        (cache.limits(), cache.merge_refusals())
    };
    let addresses = checked
        .iter()
        .enumerate()
        .flat_map(|(index, mapping)| mapping.ips.iter().map(move |ip| (index, mapping, *ip)));
    let mut skipped = 0;
    let mut last_skipped = None;
    cache.for_each_in_chunks(addresses, |cache, (index, mapping, ip)| {
        if removed(mapping) {
            if last_skipped != Some(index) {
                skipped += 1;
                last_skipped = Some(index);
            }
            return;
        }
        // A peer configured with a longer (or no) `max_ttl` does not lengthen ours.
        let expires_at = limits.bounded_expiry(now, mapping.expires_at);
        cache.insert_entry(
            &mapping.endpoint,
            mapping.name.as_str(),
            ip,
            expires_at,
            mapping.source,
            mapping.learned_at_ms,
        );
    });
    // Addresses of names past four times the cache's cap (counted per address): no cache
    // within it sends so many.
    let refused = cache
        .lock()
        .merge_refusals()
        .saturating_sub(refusals_before);
    if refused > 0 {
        metrics
            .rejected
            .with_label_values(&["over_cap"])
            .inc_by(refused);
        tracing::warn!(
            refused,
            "addresses of names from the peer past four times the cache's cap dropped"
        );
    }
    metrics.mappings_received.inc_by(checked.len() as u64);
    (checked.len() - skipped, skipped)
}

/// The live entries of `cache` as wire mappings, for a resync (either side's cache dump):
/// copied a chunk per hold of its lock and converted on a blocking thread, not a runtime
/// worker (hundreds of ms of CPU at a million entries). Empty, with an error logged, should
/// that thread panic: the resync then sends nothing and the peers keep what they hold.
pub async fn cache_dump(cache: &warden_proxy::SharedCache) -> Vec<proto::Mapping> {
    cache_dump_matching(cache, |_, _| true).await
}

/// [`cache_dump`] of the (endpoint, name) pairs `wanted` holds for.
pub async fn cache_dump_matching(
    cache: &warden_proxy::SharedCache,
    wanted: impl FnMut(&str, &str) -> bool + Send + 'static,
) -> Vec<proto::Mapping> {
    let copied = cache
        .off_runtime(|cache| {
            let now = warden_proxy::unix_now();
            wire_entries(&cache.entries_matching(now, wanted), now)
        })
        .await;
    copied.unwrap_or_else(|error| {
        tracing::error!(%error, "the cache copy for the peer failed");
        Vec::new()
    })
}

/// Cache entries as wire mappings: one per (endpoint, name, expiry, kept by connections or not),
/// since IPs of one name may expire at different times, some kept past their answer only by
/// connections. Those go as such, to be held as such: taken for an answer's, they showed as
/// answered in the peer's listing, and a fresh answer shorter than their grace was no news
/// there and did not cross back.
fn wire_entries(
    entries: &[warden_fqdn::CacheEntry],
    now: warden_fqdn::UnixTime,
) -> Vec<proto::Mapping> {
    let mut wire = Vec::new();
    for entry in entries {
        let mut by_expiry: std::collections::BTreeMap<(u64, bool), Vec<String>> =
            Default::default();
        for cached in &entry.ips {
            by_expiry
                .entry((cached.expires_at.0, cached.source == Source::Connection))
                .or_default()
                .push(cached.ip.to_string());
        }
        for ((expires_at, kept_by_connections), ips) in by_expiry {
            wire.push(proto::Mapping {
                endpoint: entry.endpoint.clone(),
                name: entry.name.clone(),
                ips,
                ttl: u32::try_from(expires_at.saturating_sub(now.0)).unwrap_or(u32::MAX),
                expires_at,
                server: String::new(),
                kept_by_connections,
                learned_at_ms: entry.learned_at_ms,
            });
        }
    }
    wire
}

/// Largest message either side accepts. A snapshot carries policy documents and a cache dump
/// is sent in chunks, so this is far above what a healthy peer sends.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

// A snapshot carries every policy file whole, and the endpoints beside them.
const _: () = assert!(warden_policy::MAX_FOLDER_TEXT_BYTES + (4 << 20) <= MAX_MESSAGE_BYTES);

/// Mappings per message when a cache is dumped or a journal replayed.
pub const MAPPINGS_PER_MESSAGE: usize = 1024;

/// Most bytes of items (mappings, flow events) one message carries: a quarter of what the
/// agent accepts from a proxy. A count alone did not bound a message: 1,024 names answered
/// with a thousand addresses each encode to some 15 MB, which the agent refused, ending the
/// session, again at every reconnect.
pub const BATCH_BYTES: usize = 1 << 20;

/// `items` in consecutive runs of at most `max_items` whose sizes (`size` of each) add up to at
/// most [`BATCH_BYTES`]; an item larger than that makes a run of its own.
pub fn batches<T>(
    items: &[T],
    max_items: usize,
    size: impl Fn(&T) -> usize,
) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut end = 0;
        while end < rest.len().min(max_items.max(1)) {
            bytes += size(&rest[end]);
            if end > 0 && bytes > BATCH_BYTES {
                break;
            }
            end += 1;
        }
        let (batch, more) = rest.split_at(end);
        rest = more;
        Some(batch)
    })
}

/// [`batches`] of an owned list, each run moved out of it rather than copied, in one pass:
/// draining each run from the front of the list shifted the rest every time, quadratic in a
/// cache copy's million mappings.
pub fn into_batches<T>(
    items: Vec<T>,
    max_items: usize,
    size: impl Fn(&T) -> usize,
) -> impl Iterator<Item = Vec<T>> {
    let lengths: Vec<usize> = batches(&items, max_items, size).map(<[T]>::len).collect();
    let mut items = items.into_iter();
    lengths
        .into_iter()
        .map(move |length| items.by_ref().take(length).collect())
}

/// A mapping's share of a message: its encoding, its field tag and its length prefix.
pub fn mapping_bytes(mapping: &proto::Mapping) -> usize {
    use prost::Message as _;
    mapping.encoded_len() + 6
}

/// Mappings in runs fit for one message each (see [`batches`]).
pub fn mapping_batches(mappings: &[proto::Mapping]) -> impl Iterator<Item = &[proto::Mapping]> {
    batches(mappings, MAPPINGS_PER_MESSAGE, mapping_bytes)
}

/// [`mapping_batches`] of an owned list (a cache dump), each run moved out of it.
pub fn into_mapping_batches(
    mappings: Vec<proto::Mapping>,
) -> impl Iterator<Item = Vec<proto::Mapping>> {
    into_batches(mappings, MAPPINGS_PER_MESSAGE, mapping_bytes)
}

/// HTTP/2 pings: a peer that stops answering is noticed within interval + timeout.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1000);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_bounded_by_count_and_by_bytes() {
        let sizes = |items: &[usize], max| -> Vec<Vec<usize>> {
            batches(items, max, |n| *n).map(<[usize]>::to_vec).collect()
        };
        assert!(sizes(&[], 4).is_empty());
        assert_eq!(
            sizes(&[1, 2, 3, 4, 5], 2),
            [vec![1, 2], vec![3, 4], vec![5]]
        );
        let half = BATCH_BYTES / 2;
        assert_eq!(
            sizes(&[half, half, 1, half], 100),
            [vec![half, half], vec![1, half]]
        );
        // An item over the budget travels alone; nothing is dropped, nothing loops.
        assert_eq!(
            sizes(&[1, BATCH_BYTES * 3, 1], 100),
            [vec![1], vec![BATCH_BYTES * 3], vec![1]]
        );
        assert_eq!(sizes(&[1, 1], 0), [vec![1], vec![1]]);
        let owned: Vec<Vec<usize>> = into_batches(vec![half, half, 1, half], 100, |n| *n).collect();
        assert_eq!(owned, sizes(&[half, half, 1, half], 100));
    }

    /// The owned runs, now taken in one pass, are the borrowed runs, in order.
    #[test]
    fn owned_batches_are_the_borrowed_runs_in_order() {
        let items: Vec<usize> = (0..10_000).map(|i| i % 700 + 1).collect();
        let borrowed: Vec<Vec<usize>> = batches(&items, 100, |n| *n * 300)
            .map(<[usize]>::to_vec)
            .collect();
        let owned: Vec<Vec<usize>> = into_batches(items.clone(), 100, |n| *n * 300).collect();
        assert_eq!(owned, borrowed);
        assert_eq!(owned.concat(), items);
        assert!(owned.len() > 100, "the byte budget cut runs too");
    }

    /// The failure that made the budget: a cache of names with a thousand addresses each,
    /// dumped in runs of 1,024 mappings, made messages the agent refused.
    #[test]
    fn a_dump_of_wide_names_fits_the_agents_limit() {
        let ips: Vec<String> = (0..1000)
            .map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))
            .collect();
        let wide: Vec<proto::Mapping> = (0..1500)
            .map(|i| proto::Mapping {
                endpoint: "default/app".into(),
                name: format!("n{i}.example.com."),
                ips: ips.clone(),
                ttl: 30,
                expires_at: 1_000,
                server: String::new(),
                kept_by_connections: false,
                learned_at_ms: 0,
            })
            .collect();
        let runs: Vec<&[proto::Mapping]> = mapping_batches(&wide).collect();
        assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), wide.len());
        let message = |run: &[proto::Mapping]| {
            use prost::Message as _;
            proto::Mappings {
                mappings: run.to_vec(),
                resync: true,
                confirm: 0,
            }
            .encoded_len()
        };
        assert!(
            runs.iter().all(|run| message(run) <= BATCH_BYTES),
            "a run over budget"
        );
        assert!(runs.len() > 2, "the budget, not the count, cut them");
    }

    fn wire(endpoint: &str, name: &str, ips: &[&str]) -> proto::Mapping {
        proto::Mapping {
            endpoint: endpoint.into(),
            name: name.into(),
            ips: ips.iter().map(|ip| (*ip).to_owned()).collect(),
            ttl: 30,
            expires_at: 1_000,
            server: String::new(),
            kept_by_connections: false,
            learned_at_ms: 0,
        }
    }

    /// What `removed` holds for stays out, asked for each address: one that turns true part
    /// way through a mapping (a clean remembered while the lock was let go between chunks)
    /// stops the rest of it. Counted once per mapping.
    #[test]
    fn a_merge_holds_back_what_it_is_told_to_address_by_address() {
        use warden_fqdn::DnsCache;
        let cache = warden_proxy::SharedCache::new(DnsCache::default());
        let metrics = warden_telemetry::Metrics::new("test").unwrap();
        let now = warden_proxy::unix_now();
        let mapping = |name: &str, ips: &[&str]| proto::Mapping {
            expires_at: now.0 + 60,
            ..wire("youssef/test", name, ips)
        };
        let batch = [
            mapping("kept.test", &["198.18.1.1"]),
            mapping("gone.test", &["198.18.1.2", "198.18.1.3"]),
            mapping("cut.test", &["198.18.1.4", "198.18.1.5", "198.18.1.6"]),
        ];
        let mut asked = 0;
        let (taken, held_back) = merge_mappings_unless(&cache, &batch, &metrics.peer, |m| {
            asked += 1;
            match m.name.as_str() {
                "gone.test." => true,
                // Its first address goes in, then it is held back.
                "cut.test." => asked > 4,
                _ => false,
            }
        });
        assert_eq!((taken, held_back), (1, 2));
        assert_eq!(asked, 6, "asked for every address");
        let held: Vec<(String, usize)> = cache
            .lock()
            .entries(now)
            .into_iter()
            .map(|entry| (entry.name, entry.ips.len()))
            .collect();
        assert_eq!(
            held,
            [("cut.test.".to_owned(), 1), ("kept.test.".to_owned(), 1)]
        );
    }

    /// When a name was answered crosses with it, both ways, so that a clean made on the agent
    /// tells what it removes; a time to come (which would shield a mapping from every clean
    /// until then) is read as now.
    #[test]
    fn the_time_answered_crosses_and_is_never_later_than_now() {
        use warden_fqdn::DnsCache;
        let now = warden_proxy::unix_now();
        let ours = warden_proxy::SharedCache::new(DnsCache::default());
        let answered_ms = now.0 * 1000 - 1_500;
        ours.lock().insert_answered(
            answered_ms,
            "youssef/test",
            "cilium.io.",
            &["198.18.1.10".parse().unwrap()],
            60,
        );
        let dump = wire_entries(&ours.lock().entries(now), now);
        assert_eq!(dump[0].learned_at_ms, answered_ms);
        let theirs = warden_proxy::SharedCache::new(DnsCache::default());
        let metrics = warden_telemetry::Metrics::new("test").unwrap();
        merge_mappings(&theirs, &dump, &metrics.peer);
        assert_eq!(theirs.lock().entries(now)[0].learned_at_ms, answered_ms);

        let future = proto::Mapping {
            learned_at_ms: u64::MAX,
            ..wire("youssef/test", "cilium.io", &["198.18.1.10"])
        };
        let checked = PeerMapping::check(&future, now).unwrap();
        assert!(checked.learned_at_ms <= (now.0 + 1) * 1000, "{checked:?}");
    }

    /// A peer with a longer (or no) `max_ttl` would lengthen ours through its mappings.
    #[test]
    fn merged_mappings_are_bounded_by_our_max_ttl() {
        use warden_fqdn::{CacheLimits, DnsCache};
        let cache = warden_proxy::SharedCache::new(DnsCache::new(CacheLimits {
            max_ttl: 600,
            ..CacheLimits::UNLIMITED
        }));
        let metrics = warden_telemetry::Metrics::new("test").unwrap();
        let now = warden_proxy::unix_now();
        let mut far = wire("youssef/test", "cilium.io", &["198.18.1.10"]);
        far.expires_at = now.0 + 30 * 86_400;
        let mut near = wire("youssef/test", "google.com", &["198.18.1.20"]);
        near.expires_at = now.0 + 60;
        assert_eq!(merge_mappings(&cache, &[far, near], &metrics.peer), 2);
        let cache = cache.lock();
        let expiry = |name| cache.lookup(now, "youssef/test", name)[0].expires_at.0;
        let bounded = expiry("cilium.io.");
        assert!((now.0 + 600..=now.0 + 601).contains(&bounded), "{bounded}");
        assert_eq!(expiry("google.com."), now.0 + 60);
    }

    /// A mapping expired before it came (a journal replayed late) went into the cache, where
    /// the reconciler's keep-alive for traffic to its address brought it back to life.
    #[test]
    fn mappings_expired_on_their_way_stay_out() {
        use warden_fqdn::DnsCache;
        let cache = warden_proxy::SharedCache::new(DnsCache::default());
        let metrics = warden_telemetry::Metrics::new("test").unwrap();
        let now = warden_proxy::unix_now();
        let mut old = wire("youssef/test", "old.example", &["198.18.1.10"]);
        old.expires_at = now.0 - 3600;
        let mut fresh = wire("youssef/test", "cilium.io", &["198.18.1.11"]);
        fresh.expires_at = now.0 + 60;
        assert_eq!(merge_mappings(&cache, &[old, fresh], &metrics.peer), 1);
        let mut cache = cache.lock();
        let ip: IpAddr = "198.18.1.10".parse().unwrap();
        assert_eq!(
            cache.keep_alive("youssef/test", ip, UnixTime(now.0 + 60)),
            0
        );
        assert!(cache.lookup(now, "youssef/test", "old.example.").is_empty());
        assert_eq!(cache.lookup(now, "youssef/test", "cilium.io.").len(), 1);
    }

    /// A peer's mapping of 400,000 addresses was taken whole, each address looked for among
    /// the ones before it under the cache's lock: a name is held near its cap as it goes in,
    /// and names past four times the endpoint's cap are dropped, and counted.
    #[test]
    fn a_peer_past_the_caps_is_held_near_them_and_counted() {
        use warden_fqdn::{CacheLimits, DnsCache};
        let limits = CacheLimits {
            max_ips_per_name: 1000,
            max_names_per_endpoint: 1,
            ..CacheLimits::UNLIMITED
        };
        let cache = warden_proxy::SharedCache::new(DnsCache::new(limits));
        let metrics = warden_telemetry::Metrics::new("test").unwrap();
        let ips: Vec<String> = (0..5000_u32)
            .map(|n| std::net::Ipv4Addr::from(0xc612_0000 + n).to_string())
            .collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let expires_at = warden_proxy::unix_now().0 + 60;
        let mut mappings = vec![wire("youssef/test", "cilium.io", &ips)];
        for name in ["a.io", "b.io", "c.io", "d.io"] {
            mappings.push(wire("youssef/test", name, &["198.18.1.1"]));
        }
        for mapping in &mut mappings {
            mapping.expires_at = expires_at;
        }
        assert_eq!(merge_mappings(&cache, &mappings, &metrics.peer), 5);
        let now = warden_proxy::unix_now();
        let held = cache.lock().lookup(now, "youssef/test", "cilium.io.").len();
        assert!((1000..=2000).contains(&held), "{held}");
        assert_eq!(
            metrics.peer.rejected.with_label_values(&["over_cap"]).get(),
            1,
            "the fifth name"
        );
    }

    /// IPs only connections kept past their answer went to the peer as an answer's: listed as
    /// answered there, and a fresh answer shorter than their grace was no news.
    #[test]
    fn ips_kept_only_by_connections_cross_as_such() {
        use warden_fqdn::DnsCache;
        let now = warden_proxy::unix_now();
        let ours = warden_proxy::SharedCache::new(DnsCache::default());
        let answered: IpAddr = "198.18.1.10".parse().unwrap();
        let kept: IpAddr = "198.18.1.11".parse().unwrap();
        {
            let mut cache = ours.lock();
            let until = UnixTime(now.0 + 60);
            cache.insert_entry(
                "youssef/test",
                "cilium.io.",
                answered,
                until,
                Source::Lookup,
                0,
            );
            cache.insert_entry(
                "youssef/test",
                "cilium.io.",
                kept,
                until,
                Source::Connection,
                0,
            );
        }
        let dump = wire_entries(&ours.lock().entries(now), now);
        assert_eq!(dump.len(), 2, "one mapping per kind: {dump:?}");
        assert!(
            dump.iter()
                .any(|m| m.kept_by_connections && m.ips == ["198.18.1.11"])
        );

        let theirs = warden_proxy::SharedCache::new(DnsCache::default());
        let metrics = warden_telemetry::Metrics::new("test").unwrap();
        merge_mappings(&theirs, &dump, &metrics.peer);
        let sources: Vec<(IpAddr, Source)> = theirs
            .lock()
            .lookup(now, "youssef/test", "cilium.io.")
            .iter()
            .map(|cached| (cached.ip, cached.source))
            .collect();
        assert!(sources.contains(&(answered, Source::Lookup)), "{sources:?}");
        assert!(sources.contains(&(kept, Source::Connection)), "{sources:?}");
    }

    #[test]
    fn a_peer_mapping_is_checked_field_by_field() {
        let now = warden_proxy::unix_now();
        let good = PeerMapping::check(
            &wire("youssef/test", "Cilium.IO", &["198.18.1.10", "fd00::1"]),
            now,
        )
        .unwrap();
        assert_eq!(good.name.as_str(), "cilium.io.");
        assert_eq!(good.ips.len(), 2);
        assert_eq!(good.expires_at, UnixTime(1_000));

        let cases = [
            (wire("", "cilium.io", &["198.18.1.10"]), "endpoint"),
            (
                wire("youssef/test", "empty..label.io", &["198.18.1.10"]),
                "name",
            ),
            (wire("youssef/test", &"x".repeat(300), &[]), "name"),
            (
                wire("youssef/test", "cilium.io", &["198.18.1.10", "not an ip"]),
                "ip",
            ),
            (
                proto::Mapping {
                    expires_at: u64::MAX,
                    ..wire("youssef/test", "cilium.io", &["198.18.1.10"])
                },
                "expires_at",
            ),
        ];
        for (mapping, field) in cases {
            match PeerMapping::check(&mapping, now) {
                Err(ApiError::BadMapping {
                    field: got, value, ..
                }) => {
                    assert_eq!(got, field);
                    assert!(value.chars().count() <= 80, "bounded for the log");
                }
                other => panic!("{mapping:?}: {other:?}"),
            }
        }
    }
}
