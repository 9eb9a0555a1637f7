use std::path::PathBuf;

/// What went wrong on the agent's socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot prepare the socket folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind the agent socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set the permissions of {path}: {source}")]
    Permissions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unknown group {group:?} for the agent socket")]
    UnknownGroup { group: String },
    #[error("cannot connect to the agent socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("mapping from the peer with a bad {field} {value:?}: {reason}")]
    BadMapping {
        field: &'static str,
        value: String,
        reason: String,
    },
}
