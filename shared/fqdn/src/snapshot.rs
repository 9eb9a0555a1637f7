use serde::{Deserialize, Serialize};

use crate::{CacheEntry, CacheError, UnixTime};

/// The snapshot format written by this build.
pub const SNAPSHOT_VERSION: u32 = 1;

/// A serializable copy of a cache, written before a restart or handed to a peer process.
///
/// Expiries are absolute wall-clock times, so a snapshot restored later keeps exactly the TTL
/// that was left, and entries that ran out while nothing was running are dropped on restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSnapshot {
    /// Format version; restore refuses anything but [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// When the snapshot was taken; informational (restore relies on the absolute expiries).
    pub taken_at: UnixTime,
    /// Unexpired entries, sorted by endpoint then name.
    pub entries: Vec<CacheEntry>,
}

/// Only the version, so that a snapshot from another format version is reported as such
/// rather than as whatever field first fails to parse.
#[derive(Deserialize)]
struct VersionProbe {
    version: u64,
}

impl CacheSnapshot {
    /// A snapshot of `entries` taken at `taken_at`, put in order.
    pub fn new(taken_at: UnixTime, mut entries: Vec<CacheEntry>) -> CacheSnapshot {
        crate::cache::sort_entries(&mut entries);
        CacheSnapshot {
            version: SNAPSHOT_VERSION,
            taken_at,
            entries,
        }
    }

    /// Decodes a JSON snapshot, checking its version before anything else.
    pub fn from_json(bytes: &[u8]) -> Result<CacheSnapshot, CacheError> {
        let probe: VersionProbe = serde_json::from_slice(bytes).map_err(CacheError::Decode)?;
        if probe.version != u64::from(SNAPSHOT_VERSION) {
            return Err(CacheError::UnsupportedVersion {
                found: probe.version,
                supported: SNAPSHOT_VERSION,
            });
        }
        serde_json::from_slice(bytes).map_err(CacheError::Decode)
    }

    /// Number of (endpoint, name, IP) triples in the snapshot.
    pub fn ip_count(&self) -> usize {
        self.entries.iter().map(|e| e.ips.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_other_versions_by_number() {
        let err = CacheSnapshot::from_json(br#"{"version": 2, "whatever": []}"#).unwrap_err();
        assert!(matches!(
            err,
            CacheError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ));
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn reports_what_is_malformed() {
        let err = CacheSnapshot::from_json(b"not json").unwrap_err();
        assert!(matches!(err, CacheError::Decode(_)));
        let err = CacheSnapshot::from_json(br#"{"entries": []}"#).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        let err = CacheSnapshot::from_json(
            br#"{"version":1,"taken_at":5,"entries":[{"endpoint":"a","name":"b.","ips":[{"ip":"300.1.1.1","expires_at":9,"source":"lookup"}]}]}"#,
        )
        .unwrap_err();
        assert!(matches!(err, CacheError::Decode(_)));
        assert!(err.to_string().contains("invalid"), "{err}");
    }

    #[test]
    fn decodes_current_version() {
        let snap = CacheSnapshot::from_json(
            br#"{"version":1,"taken_at":5,"entries":[{"endpoint":"a","name":"b.","ips":[{"ip":"10.0.0.1","expires_at":9,"source":"restored"}]}]}"#,
        )
        .unwrap();
        assert_eq!(snap.taken_at, UnixTime(5));
        assert_eq!(snap.ip_count(), 1);
    }
}
