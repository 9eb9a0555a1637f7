use std::path::PathBuf;

/// A state file that could not be made durable, with the path and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Creating, writing or syncing the file's temporary copy failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The finished copy could not take the file's place.
    #[error("cannot rename {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The folder holding the file could not be synced, so a power loss could undo the rename.
    #[error("cannot sync folder {folder}: {source}")]
    SyncFolder {
        folder: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
