//! The FQDN cache of Warden: which IPs each endpoint learned for each DNS name, and until
//! when, modelled on Cilium's `pkg/fqdn` DNSCache. The DNS proxy records every answer it
//! forwards ([`DnsCache::insert`]); policy turns the cached name -> IP mappings into datapath
//! allow entries; connection tracking keeps IPs in use alive past their TTL
//! ([`DnsCache::keep_alive`]); [`DnsCache::gc`] reports what to revoke. Agent and proxy hand
//! the cache over as a versioned [`CacheSnapshot`] and resync by folding each other's entries in
//! one address at a time ([`DnsCache::insert_entry`]; [`DnsCache::merge`] does it for a whole
//! list).
//!
//! The crate is pure: no I/O and no clock. Time comes in as [`UnixTime`] (wall-clock seconds,
//! so expiries persisted in a snapshot keep their meaning across restarts). `time`, `limits`
//! and `entry` hold the plain data types, `snapshot` the persisted form, `cache` the
//! memory-compact cache itself (interned strings, id-only hash tables, inline IP lists and a
//! reverse IP index, all in private submodules).

#![forbid(unsafe_code)]

mod cache;
pub use cache::{DnsCache, GcStep, Retired, sort_entries};

mod entry;
pub use entry::{AnswerIps, CacheEntry, CachedIp, Expired, InsertOutcome, Source};

mod error;
pub use error::CacheError;

mod limits;
pub use limits::CacheLimits;

mod snapshot;
pub use snapshot::{CacheSnapshot, SNAPSHOT_VERSION};

mod time;
pub use time::{MAX_DNS_TTL, UnixTime};
