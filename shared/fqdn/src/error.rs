/// What can go wrong in this crate. Only reading a snapshot can fail: cache operations accept
/// any input.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The snapshot was written by a format this build does not understand (newer or older).
    #[error(
        "unsupported DNS cache snapshot version {found} (this build reads version {supported})"
    )]
    UnsupportedVersion { found: u64, supported: u32 },
    /// The bytes are not a snapshot at all, or a field of it is malformed.
    #[error("invalid DNS cache snapshot: {0}")]
    Decode(#[source] serde_json::Error),
}
