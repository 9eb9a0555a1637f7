//! The files the dnsproxy keeps in `state_dir` (the journal, the policy snapshot): written
//! whole or not at all, and set aside for a look when they do not decode, since the next save
//! would overwrite them.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `path` with `suffix` appended to its file name (`journal.pb` → `journal.pb.tmp`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`: a
/// crash mid-write leaves the previous file, never half of one. The folder is synced too, so
/// that the rename itself survives a power loss (the agent takes a save as done).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let staging = beside(path, ".tmp");
    let mut file = std::fs::File::create(&staging)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&staging, path)?;
    match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => std::fs::File::open(folder)?.sync_all(),
        _ => Ok(()),
    }
}

/// Moves an unreadable `path` to `<path>.corrupt`; says how that went, for the log.
pub(crate) fn set_aside(path: &Path) -> String {
    let aside = beside(path, ".corrupt");
    match std::fs::rename(path, &aside) {
        Ok(()) => format!("set aside as {}", aside.display()),
        Err(error) => format!("could not be set aside: {error}"),
    }
}
