//! The FQDN cache on disk: `state_dir/fqdn-cache.json`, written atomically, so that a restarted
//! agent still knows what its workloads resolved (and for how much longer).

use std::path::{Path, PathBuf};

use warden_fqdn::{CacheEntry, CacheLimits, CacheSnapshot, DnsCache, MAX_DNS_TTL, UnixTime};
use warden_state::StateError;

const CACHE_FILE: &str = "fqdn-cache.json";

#[derive(Debug, Clone)]
pub struct CacheFile {
    path: PathBuf,
}

impl CacheFile {
    pub fn new(state_dir: &Path) -> CacheFile {
        CacheFile {
            path: state_dir.join(CACHE_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted cache, without what expired meanwhile nor what `cleaned` says a clean
    /// removed. A missing file is a first start; an unreadable one is set aside (`.corrupt`)
    /// for inspection and the agent starts empty rather than not at all.
    pub fn restore(
        &self,
        limits: CacheLimits,
        now: UnixTime,
        cleaned: impl Fn(&CacheEntry) -> bool,
    ) -> DnsCache {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return DnsCache::new(limits);
            }
            Err(error) => {
                // Set aside as a file that does not parse is: left in place, the first save
                // would replace what may be the last good cache.
                let set_aside = warden_state::set_aside(&self.path);
                tracing::error!(path = %self.path.display(), %error, set_aside, "cannot read the persisted FQDN cache; starting empty");
                return DnsCache::new(limits);
            }
        };
        let restored = CacheSnapshot::from_json(&bytes).and_then(|mut snapshot| {
            // Only a hand-edited or damaged file holds such entries; kept, they would travel to
            // the dnsproxy and back, and the agent refuses a session carrying a bad name.
            let before = snapshot.entries.len();
            snapshot.entries.retain(|entry| {
                !entry.endpoint.is_empty() && warden_policy::DnsName::new(&entry.name).is_ok()
            });
            let dropped = before - snapshot.entries.len();
            if dropped > 0 {
                tracing::warn!(path = %self.path.display(), dropped, "persisted FQDN cache entries without a valid name or endpoint left out");
            }
            // The peer refuses the same in a mapping; with no `max_ttl` it would never expire.
            let latest = now.plus_secs(MAX_DNS_TTL);
            let mut dropped = 0;
            for entry in &mut snapshot.entries {
                let before = entry.ips.len();
                entry.ips.retain(|ip| ip.expires_at <= latest);
                dropped += before - entry.ips.len();
            }
            if dropped > 0 {
                tracing::warn!(path = %self.path.display(), dropped, "persisted FQDN cache addresses expiring more than 2^31 - 1 s from now left out");
            }
            // The file is written up to half a second after a change: a crash between a clean
            // and that write restored what the clean removed, and every proxy's session got it.
            let before = snapshot.entries.len();
            snapshot.entries.retain(|entry| !cleaned(entry));
            let cleaned = before - snapshot.entries.len();
            if cleaned > 0 {
                tracing::info!(path = %self.path.display(), cleaned, "persisted FQDN cache entries a cache clean removed left out");
            }
            DnsCache::restore(limits, snapshot, now)
        });
        match restored {
            Ok(cache) => {
                tracing::info!(
                    names = cache.name_count(),
                    ips = cache.ip_count(),
                    "FQDN cache restored"
                );
                cache
            }
            Err(error) => {
                let set_aside = warden_state::set_aside(&self.path);
                tracing::error!(path = %self.path.display(), %error, set_aside, "persisted FQDN cache does not load; starting empty");
                DnsCache::new(limits)
            }
        }
    }

    /// Replaces the file whole (a crash mid-write leaves the previous cache, never half a
    /// file), synced with its folder.
    pub fn save(&self, snapshot: &CacheSnapshot) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(snapshot).map_err(|error| StateError::Write {
            path: self.path.clone(),
            source: error.into(),
        })?;
        warden_state::write_atomically(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: CacheLimits = CacheLimits {
        min_ttl: 0,
        max_ttl: 0,
        max_ips_per_name: 10,
        max_names_per_endpoint: 0,
    };

    #[test]
    fn a_saved_cache_comes_back_with_its_remaining_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let file = CacheFile::new(dir.path());
        let mut cache = DnsCache::new(LIMITS);
        let ip = "198.18.1.10".parse().unwrap();
        cache.insert(UnixTime(1_000), "youssef/test", "cilium.io.", &[ip], 300);
        file.save(&cache.snapshot(UnixTime(1_000))).unwrap();
        let restored = file.restore(LIMITS, UnixTime(1_100), |_| false);
        let entries = restored.lookup(UnixTime(1_100), "youssef/test", "cilium.io.");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].expires_at, UnixTime(1_300));
    }

    #[test]
    fn entries_without_a_valid_name_are_left_out_and_the_rest_restored() {
        let dir = tempfile::tempdir().unwrap();
        let file = CacheFile::new(dir.path());
        let mut cache = DnsCache::new(LIMITS);
        let ip = "198.18.1.10".parse().unwrap();
        cache.insert(UnixTime(1_000), "youssef/test", "cilium.io.", &[ip], 300);
        cache.insert(UnixTime(1_000), "youssef/test", "bad..name.", &[ip], 300);
        cache.insert(UnixTime(1_000), "", "google.com.", &[ip], 300);
        file.save(&cache.snapshot(UnixTime(1_000))).unwrap();
        let restored = file.restore(LIMITS, UnixTime(1_100), |_| false);
        assert_eq!(restored.name_count(), 1);
        assert_eq!(
            restored
                .lookup(UnixTime(1_100), "youssef/test", "cilium.io.")
                .len(),
            1
        );
    }

    /// A damaged digit made an expiry 136 years away: restored, it never expired, and every
    /// session with a dnsproxy carried a mapping the proxy refuses.
    #[test]
    fn an_expiry_no_answer_can_give_is_left_out_and_the_rest_restored() {
        let dir = tempfile::tempdir().unwrap();
        let file = CacheFile::new(dir.path());
        let mut cache = DnsCache::new(LIMITS);
        let (good, bad) = (
            "198.18.1.10".parse().unwrap(),
            "198.18.1.11".parse().unwrap(),
        );
        cache.insert(UnixTime(1_000), "youssef/test", "cilium.io.", &[good], 300);
        // As a damaged digit makes it: no answer gives such an expiry.
        cache.insert_entry(
            "youssef/test",
            "cilium.io.",
            bad,
            UnixTime(1_000 + (1 << 32)),
            warden_fqdn::Source::Lookup,
            1_000_000,
        );
        file.save(&cache.snapshot(UnixTime(1_000))).unwrap();
        let restored = file.restore(LIMITS, UnixTime(1_100), |_| false);
        let entries = restored.lookup(UnixTime(1_100), "youssef/test", "cilium.io.");
        let ips: Vec<_> = entries.iter().map(|cached| cached.ip).collect();
        assert_eq!(ips, [good]);
    }

    /// Cleaned a moment before a crash, the file still held the names, and the agent brought
    /// them back (and handed them to every proxy).
    #[test]
    fn what_a_clean_removed_is_left_out_of_the_restored_cache() {
        let dir = tempfile::tempdir().unwrap();
        let file = CacheFile::new(dir.path());
        let mut cache = DnsCache::new(LIMITS);
        let ip = "198.18.1.10".parse().unwrap();
        cache.insert_answered(1_000_000, "youssef/test", "gone.test.", &[ip], 300);
        cache.insert_answered(1_000_000, "youssef/test", "kept.test.", &[ip], 300);
        cache.insert_answered(1_002_000, "youssef/test", "again.gone.test.", &[ip], 300);
        file.save(&cache.snapshot(UnixTime(1_002))).unwrap();
        // A clean of *gone.test. made at 1,001 s: what was answered since stays.
        let restored = file.restore(LIMITS, UnixTime(1_003), |entry| {
            entry.name.ends_with("gone.test.") && entry.learned_at_ms < 1_001_000
        });
        let names: Vec<String> = restored
            .entries(UnixTime(1_003))
            .into_iter()
            .map(|entry| entry.name)
            .collect();
        assert_eq!(names, ["again.gone.test.", "kept.test."]);
    }

    #[test]
    fn a_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let file = CacheFile::new(dir.path());
        std::fs::write(file.path(), b"{not json").unwrap();
        let cache = file.restore(LIMITS, UnixTime(1), |_| false);
        assert_eq!(cache.name_count(), 0);
        assert!(dir.path().join("fqdn-cache.json.corrupt").exists());
    }

    /// A file that cannot be read (here a folder in its place; EIO or EACCES alike) stayed
    /// where the first save would replace it.
    #[test]
    fn an_unreadable_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let file = CacheFile::new(dir.path());
        std::fs::create_dir(file.path()).unwrap();
        let cache = file.restore(LIMITS, UnixTime(1), |_| false);
        assert_eq!(cache.name_count(), 0);
        assert!(dir.path().join("fqdn-cache.json.corrupt").is_dir());
        assert!(!file.path().exists());
    }
}
