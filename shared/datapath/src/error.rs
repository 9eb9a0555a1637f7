//! The crate's single error type.

use std::io;
use std::path::PathBuf;

/// What failed in the datapath, and on what (map, pin path, cgroup path, errno).
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The cgroup root (or an endpoint's cgroup) could not be opened or inspected.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// The underlying error (errno).
        #[source]
        source: io::Error,
    },

    /// No cgroup v2 hierarchy at the usual places and none was configured.
    #[error(
        "no cgroup v2 mount found at /sys/fs/cgroup or /sys/fs/cgroup/unified; set datapath.cgroup_root"
    )]
    NoCgroup2,

    /// The configured path is not on a cgroup v2 filesystem.
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 {
        /// The offending path.
        path: PathBuf,
    },

    /// bpffs is not mounted where the pins should go, and it is not ours to mount there.
    #[error(
        "{path} is not on a bpf filesystem (mount bpffs there, or use a path under /sys/fs/bpf)"
    )]
    NotBpffs {
        /// The configured pin directory.
        path: PathBuf,
    },

    /// Mounting bpffs at /sys/fs/bpf failed.
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs {
        /// The mount point.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },

    /// A pin file or directory could not be created, read, locked or removed.
    #[error("pin path {path}: {source}")]
    Pin {
        /// The pin file or directory.
        path: PathBuf,
        /// The underlying error (errno).
        #[source]
        source: io::Error,
    },

    /// The maps are not pinned at the given directory (`open_pinned` before any `open`).
    #[error("map {map} is not pinned at {path}: {source} (has the agent loaded the datapath?)")]
    NotPinned {
        /// The map name.
        map: &'static str,
        /// The expected pin path.
        path: PathBuf,
        /// Why opening it failed.
        #[source]
        source: aya::maps::MapError,
    },

    /// Parsing the embedded object or creating/reusing its maps failed.
    #[error("loading the eBPF object (maps pinned under {pin_dir}): {source}")]
    Load {
        /// The map pin directory.
        pin_dir: PathBuf,
        /// The loader error.
        #[source]
        source: Box<aya::EbpfError>,
    },

    /// The embedded object lacks a program this crate attaches (build mismatch).
    #[error("program {program} is missing from the embedded eBPF object")]
    MissingProgram {
        /// The program (function) name.
        program: &'static str,
    },

    /// The embedded object lacks a map this crate writes (build mismatch).
    #[error("map {map} is missing from the embedded eBPF object")]
    MissingMap {
        /// The map name.
        map: &'static str,
    },

    /// The kernel refused a program (verifier) or it could not be prepared.
    #[error("program {program}: {source}")]
    Program {
        /// The program (function) name.
        program: &'static str,
        /// The loader or verifier error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// Attaching a program to the cgroup root failed.
    #[error("attaching {program} to cgroup {cgroup}: {source}")]
    Attach {
        /// The program name.
        program: &'static str,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// The attach error (aya's ProgramError or LinkError).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A map pinned by an earlier run has another key or value size than this build expects
    /// (a layout change without a version bump): run cleanup, or bump the layout version.
    #[error("map {map} at {path} has key/value sizes {found:?}, this build expects {expected:?}")]
    Layout {
        /// The map name.
        map: &'static str,
        /// Its pin path.
        path: PathBuf,
        /// (key, value) sizes expected.
        expected: (u32, u32),
        /// (key, value) sizes of the pinned map.
        found: (u32, u32),
    },

    /// A link or program could not be pinned.
    #[error("pinning {program} at {path}: {source}")]
    PinObject {
        /// The program name.
        program: &'static str,
        /// The pin path.
        path: PathBuf,
        /// The pin error.
        #[source]
        source: Box<aya::pin::PinError>,
    },

    /// A raw bpf(2) command on a pinned link failed.
    #[error("{command} on {path}: {source}")]
    Link {
        /// The bpf command (BPF_OBJ_GET, BPF_LINK_UPDATE, ...).
        command: &'static str,
        /// The link pin path.
        path: PathBuf,
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// A map operation failed.
    #[error("map {map}: {op}: {source}")]
    Map {
        /// The map name.
        map: &'static str,
        /// What was being done (insert, remove, lookup, iterate, open).
        op: &'static str,
        /// The map error (errno inside).
        #[source]
        source: Box<aya::maps::MapError>,
    },

    /// A value given to the API does not fit the map layout.
    #[error("invalid argument for map {map}: {reason}")]
    Invalid {
        /// The map concerned.
        map: &'static str,
        /// What is wrong with the value.
        reason: String,
    },

    /// Socket-level operations (SO_REUSEPORT program attach, socket type query) failed.
    #[error("socket operation {op}: {source}")]
    Socket {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// The drop-event reader could not be set up or polled.
    #[error("events ring buffer: {source}")]
    Events {
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A lock guarding a map handle was poisoned by a panic in another thread.
    #[error("map {map}: handle lock poisoned")]
    Poisoned {
        /// The map name.
        map: &'static str,
    },
}

impl DatapathError {
    pub(crate) fn map(map: &'static str, op: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            map,
            op,
            source: Box::new(source),
        }
    }
}
