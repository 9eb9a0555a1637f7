//! The files a Warden process keeps in its `state_dir` (the agent's FQDN cache and last good
//! policy, the dnsproxy's policy snapshot, and its journal when written whole rather than
//! appended to), so that a restart or a crash finds
//! what the process knew. `file` writes them the one way both processes need: whole or not at
//! all, synced with their folder where the filesystem can, and set aside rather than
//! overwritten when they no longer decode; `error` names the file and the step that failed.

#![forbid(unsafe_code)]

mod error;
pub use error::StateError;

mod file;
pub use file::{
    beside, create_private, create_private_dir, set_aside, sync_folder, write_atomically,
};
