//! The JSON documents of the admin API that both processes serve and the `warden` CLI reads.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// `GET /v1/status` of either process; `warden status` reads both.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub instance: String,
    pub version: String,
    pub serving: bool,
    pub ready: bool,
    /// Whether the peer process is connected over the agent's socket.
    pub peer_connected: bool,
    /// `online`, or `offline` for the standalone proxy while the agent is away.
    pub mode: String,
    pub policy_revision: u64,
    pub policy: PolicyStatusView,
    pub cache_names: usize,
    pub cache_ips: usize,
    pub endpoints: usize,
    pub dns_listen: Vec<SocketAddr>,
    /// Instances holding the DNS port now, as this process knows them.
    pub dns_port_holders: Vec<String>,
    pub datapath: String,
    pub uptime_s: u64,
    /// The instance the datapath steers new queries to (`agent`, `dnsproxy`), or `share`;
    /// absent without the eBPF datapath.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred: Option<String>,
    /// When the last resync with the peer completed (Unix ms), and how long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resync_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resync_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyStatusView {
    pub revision: u64,
    pub policies: usize,
    pub selectors: usize,
    pub source: String,
    pub last_error: Option<String>,
}

/// One row of `GET /v1/fqdn/cache`: a name an endpoint resolved, with its IPs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheRow {
    pub endpoint: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// Seconds until the last of these IPs expires.
    pub ttl: u64,
    /// Unix seconds when the last of these IPs expires.
    pub expires_at: u64,
    /// `lookup`, `connection` (kept alive by traffic past its TTL) or `restored`.
    pub source: String,
    pub entries: Vec<CacheRowIp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheRowIp {
    pub ip: IpAddr,
    pub ttl: u64,
    pub expires_at: u64,
    pub source: String,
}

impl CacheRow {
    /// A cache entry as listed: its IPs with their remaining TTL, the row's TTL being the
    /// longest, its source `lookup` if any IP still stands on an answer.
    pub fn from_entry(entry: warden_fqdn::CacheEntry, now: warden_fqdn::UnixTime) -> CacheRow {
        use warden_fqdn::Source;
        let source_name = |source: Source| match source {
            Source::Lookup => "lookup",
            Source::Connection => "connection",
            Source::Restored => "restored",
        };
        let entries: Vec<CacheRowIp> = entry
            .ips
            .iter()
            .map(|cached| CacheRowIp {
                ip: cached.ip,
                ttl: cached.expires_at.0.saturating_sub(now.0),
                expires_at: cached.expires_at.0,
                source: source_name(cached.source).to_owned(),
            })
            .collect();
        let expires_at = entries.iter().map(|ip| ip.expires_at).max().unwrap_or(0);
        let source = if entry.ips.iter().any(|ip| ip.source == Source::Lookup) {
            Source::Lookup
        } else {
            entry.ips.first().map_or(Source::Lookup, |ip| ip.source)
        };
        CacheRow {
            endpoint: entry.endpoint,
            name: entry.name,
            ips: entries.iter().map(|ip| ip.ip).collect(),
            ttl: expires_at.saturating_sub(now.0),
            expires_at,
            source: source_name(source).to_owned(),
            entries,
        }
    }
}

/// The filters of `GET /v1/fqdn/cache` and `POST /v1/fqdn/cache/clean`, the same in both
/// processes: an endpoint key, and a name as a Cilium `matchPattern` (a plain name matches
/// itself). An unknown parameter is refused (400), not ignored: a misspelled filter would
/// otherwise widen a clean to the whole cache.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFilter {
    pub endpoint: Option<String>,
    pub name: Option<String>,
}

/// A [`CacheFilter`] whose pattern was checked.
#[derive(Debug, Clone)]
pub struct CompiledCacheFilter {
    endpoint: Option<String>,
    pattern: Option<warden_policy::NamePattern>,
}

impl CacheFilter {
    /// The error is the text of the 400 answer.
    pub fn compile(&self) -> Result<CompiledCacheFilter, String> {
        let pattern = self
            .name
            .as_deref()
            .map(|name| {
                warden_policy::NamePattern::new(name)
                    .map_err(|error| format!("invalid name pattern: {error}\n"))
            })
            .transpose()?;
        Ok(CompiledCacheFilter {
            endpoint: self.endpoint.clone(),
            pattern,
        })
    }
}

/// Cache listings answered at a time, in each process.
pub const LISTINGS_AT_ONCE: usize = 4;

/// Rows per piece of a streamed `GET /v1/fqdn/cache` body, and the bytes past which a piece
/// ends sooner (rows of a thousand addresses each are some 100 kB).
const ROWS_PER_PIECE: usize = 1024;
const PIECE_BYTES: usize = 1 << 20;

impl CacheFilter {
    /// The answer to `GET /v1/fqdn/cache`, the same in both processes: the rows of the cache
    /// entries at `now` that pass, 400 for a name pattern that does not parse (the cache is
    /// not read then), or 500 with the text `entries` failed with. `entries` is given the
    /// filter, to copy only what passes; the JSON array is written out a thousand rows at a
    /// time as the client reads it, not built whole (a million entries are some 200 MB).
    ///
    /// At most [`LISTINGS_AT_ONCE`] are answered at a time (503 past them): each holds its copy
    /// of the cache until its client has read it, and a few read slowly (into a pager), or not
    /// at all, could hold more than the process's memory limit.
    pub async fn listing<Fut>(
        &self,
        now: warden_fqdn::UnixTime,
        entries: impl FnOnce(warden_fqdn::UnixTime, CompiledCacheFilter) -> Fut,
    ) -> axum::response::Response
    where
        Fut: Future<Output = Result<Vec<warden_fqdn::CacheEntry>, String>>,
    {
        static LISTINGS: tokio::sync::Semaphore =
            tokio::sync::Semaphore::const_new(LISTINGS_AT_ONCE);
        self.listing_within(&LISTINGS, now, entries).await
    }

    async fn listing_within<Fut>(
        &self,
        listings: &'static tokio::sync::Semaphore,
        now: warden_fqdn::UnixTime,
        entries: impl FnOnce(warden_fqdn::UnixTime, CompiledCacheFilter) -> Fut,
    ) -> axum::response::Response
    where
        Fut: Future<Output = Result<Vec<warden_fqdn::CacheEntry>, String>>,
    {
        use axum::http::{StatusCode, header};
        use axum::response::IntoResponse;
        let Ok(listing) = listings.try_acquire() else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{LISTINGS_AT_ONCE} cache listings in progress; try again\n"),
            )
                .into_response();
        };
        let filter = match self.compile() {
            Ok(filter) => filter,
            Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
        };
        let entries = match entries(now, filter.clone()).await {
            Ok(entries) => entries,
            Err(message) => return (StatusCode::INTERNAL_SERVER_ERROR, message).into_response(),
        };
        let mut rows = entries
            .into_iter()
            .filter(move |entry| filter.matches(&entry.endpoint, &entry.name))
            .map(move |entry| CacheRow::from_entry(entry, now));
        let mut opened = false;
        let mut closed = false;
        let pieces = std::iter::from_fn(move || {
            // Held until the body is read or dropped.
            let _listing = &listing;
            if closed {
                return None;
            }
            let mut piece = Vec::with_capacity(ROWS_PER_PIECE * 256);
            for _ in 0..ROWS_PER_PIECE {
                if piece.len() >= PIECE_BYTES {
                    break;
                }
                let Some(row) = rows.next() else {
                    closed = true;
                    break;
                };
                piece.push(if opened { b',' } else { b'[' });
                opened = true;
                // Writing a row into memory cannot fail: its fields are plain data.
                let _ = serde_json::to_writer(&mut piece, &row);
            }
            if closed {
                piece.extend_from_slice(if opened { b"]" } else { b"[]" });
            }
            Some(Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(
                piece,
            )))
        });
        (
            [(header::CONTENT_TYPE, "application/json")],
            axum::body::Body::from_stream(futures_util::stream::iter(pieces)),
        )
            .into_response()
    }
}

impl CompiledCacheFilter {
    /// Whether a cached (endpoint, name) passes. Cached names are canonical already; one that
    /// does not parse matches only the absence of a name filter.
    pub fn matches(&self, endpoint: &str, name: &str) -> bool {
        self.endpoint
            .as_deref()
            .is_none_or(|wanted| wanted == endpoint)
            && self.pattern.as_ref().is_none_or(|pattern| {
                warden_policy::DnsName::new(name).is_ok_and(|name| pattern.matches(&name))
            })
    }

    /// [`Self::matches`] of a name already parsed.
    pub fn matches_name(&self, endpoint: &str, name: &warden_policy::DnsName) -> bool {
        self.endpoint
            .as_deref()
            .is_none_or(|wanted| wanted == endpoint)
            && self
                .pattern
                .as_ref()
                .is_none_or(|pattern| pattern.matches(name))
    }

    /// The listing of `entries` that pass, as `GET /v1/fqdn/cache` answers it.
    pub fn rows(
        &self,
        entries: Vec<warden_fqdn::CacheEntry>,
        now: warden_fqdn::UnixTime,
    ) -> Vec<CacheRow> {
        entries
            .into_iter()
            .filter(|entry| self.matches(&entry.endpoint, &entry.name))
            .map(|entry| CacheRow::from_entry(entry, now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use warden_fqdn::{CacheEntry, UnixTime};

    fn entry(endpoint: &str, name: &str) -> CacheEntry {
        CacheEntry {
            endpoint: endpoint.into(),
            name: name.into(),
            ips: Vec::new(),
            learned_at_ms: 0,
        }
    }

    async fn body_rows(response: axum::response::Response) -> Vec<CacheRow> {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn a_listing_filters_rows_and_refuses_a_bad_pattern() {
        let now = UnixTime(1_000);
        let filter = CacheFilter {
            endpoint: None,
            name: Some("*.cilium.io".into()),
        };
        let listed = filter
            .listing(now, |_, _| async {
                Ok(vec![
                    entry("default/a", "www.cilium.io."),
                    entry("default/a", "bbc.co.uk."),
                ])
            })
            .await;
        assert_eq!(listed.status(), StatusCode::OK);
        let rows = body_rows(listed).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].name, "www.cilium.io.");
        let failed = filter
            .listing(now, |_, _| async { Err("the copy failed\n".to_owned()) })
            .await;
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let compiled = filter.compile().unwrap();
        let rows = compiled.rows(vec![entry("default/a", "www.cilium.io.")], now);
        assert_eq!(rows.len(), 1);

        let bad = CacheFilter {
            endpoint: None,
            name: Some("a..b".into()),
        };
        let mut asked = false;
        let refused = bad
            .listing(now, |_, _| {
                asked = true;
                async { Ok(Vec::new()) }
            })
            .await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert!(!asked, "a refused filter does not read the cache");
    }

    /// Listings read slowly or not at all each held a copy of the cache, as many as clients
    /// asked for.
    #[tokio::test]
    async fn listings_past_the_limit_wait_for_none_and_get_503() {
        let listings: &'static tokio::sync::Semaphore =
            Box::leak(Box::new(tokio::sync::Semaphore::new(2)));
        let now = UnixTime(1_000);
        let everything = CacheFilter::default();
        let list = || {
            everything.listing_within(listings, now, |_, _| async {
                Ok(vec![entry("default/a", "www.cilium.io.")])
            })
        };
        let unread = [list().await, list().await];
        assert!(unread.iter().all(|r| r.status() == StatusCode::OK));
        let refused = list().await;
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        // A listing read to its end (or dropped) makes room.
        let [first, _second] = unread;
        assert_eq!(body_rows(first).await.len(), 1);
        assert_eq!(list().await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_streamed_listing_is_one_json_array_whatever_its_length() {
        let now = UnixTime(1_000);
        let everything = CacheFilter::default();
        for count in [
            0,
            1,
            ROWS_PER_PIECE,
            ROWS_PER_PIECE + 1,
            3 * ROWS_PER_PIECE + 7,
        ] {
            let listed = everything
                .listing(now, |_, _| async move {
                    Ok((0..count)
                        .map(|i| entry("default/a", &format!("n{i}.example.")))
                        .collect())
                })
                .await;
            let rows = body_rows(listed).await;
            assert_eq!(rows.len(), count);
            if count > 0 {
                assert_eq!(rows[count - 1].name, format!("n{}.example.", count - 1));
            }
        }
    }
}
