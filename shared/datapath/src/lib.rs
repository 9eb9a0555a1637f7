//! Warden's eBPF datapath: the only code that knows the programs' map names and layouts.
//!
//! The C programs in `bpf/` (compiled by this crate's build script and embedded) redirect
//! workloads' DNS to the proxy, enforce egress per endpoint, and pick the serving socket of the
//! proxies' `SO_REUSEPORT` group. [`Datapath::open`] loads them, reuses or creates the maps
//! pinned under the bpffs directory, and attaches every program at the cgroup root (replacing
//! programs in place on restart); [`Datapath::open_pinned`] opens the pinned maps only, for a
//! second process such as the standalone proxy. The remaining methods are typed wrappers over
//! the maps: enrollment of cgroups as endpoints, DNS targets, FQDN and CIDR allow entries,
//! last-seen times, redirect records, and the reuseport selection; [`Datapath::events`] reads
//! drop events; [`Datapath::cleanup`] detaches and unpins everything.
//!
//! Modules: `abi` mirrors `bpf/warden.h`; `sys` is the one unsafe module (`Pod` impls and the
//! bpf(2) commands aya does not expose); `loader` loads, attaches, replaces and cleans up;
//! `maps` holds the typed map operations; `slots` reads the redirect records the egress program
//! publishes in memory-mapped slots; `events` reads the ring buffer; `types` holds the
//! public value types; `clock` converts kernel boot-time stamps to wall-clock time.

#![deny(unsafe_code)]

mod abi;
mod clock;
mod error;
mod events;
mod loader;
mod maps;
mod slots;
mod sys;
mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::DatapathError;

/// The port rules one (endpoint, prefix) entry of the CIDR map holds.
pub const PORT_RULES_PER_PREFIX: usize = abi::CIDR_MAX_RULES;
pub use events::{DropEvent, DropEvents, DropReason};
pub use loader::LinkAction;
pub use types::{
    CleanupReport, DatapathOptions, DnsTarget, EndpointEntry, FqdnKey, PortRule, RedirectLookup,
    RedirectRecord, RedirectSource,
};

/// The default bpffs directory for Warden's pins.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/warden";

/// Number of proxy instances the `SO_REUSEPORT` selection knows (slots `0..N`).
pub const REUSEPORT_INSTANCES: u32 = abi::REUSEPORT_INSTANCES;

/// The compiled programs (`bpf/warden.bpf.c`), aligned for the ELF parser.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warden.bpf.o"));

/// A handle on the pinned datapath: cheap to clone, `Send + Sync`. Every map handle sits
/// behind its own mutex, so concurrent callers only wait on the map they touch.
#[derive(Clone, Debug)]
pub struct Datapath {
    inner: Arc<maps::Maps>,
    last_open: Arc<Vec<(&'static str, LinkAction)>>,
}

// The agent shares one handle between its tasks and the proxy engine.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Datapath>();
    send_sync::<DropEvents>();
};

impl Datapath {
    /// Loads the programs, reuses (or creates and pins) the maps, and attaches every program at
    /// the cgroup root; links pinned by an earlier run get the new programs in place through
    /// `BPF_LINK_UPDATE` instead of a second attachment. Mounts bpffs at /sys/fs/bpf when it is
    /// absent and the pin directory is below it.
    pub fn open(options: &DatapathOptions) -> Result<Datapath, DatapathError> {
        let actions = loader::load_and_attach(options)?;
        let mut datapath = Self::open_pinned(&options.bpffs)?;
        datapath.last_open = Arc::new(actions);
        Ok(datapath)
    }

    /// Opens the pinned maps only (no program load or attach): for a second process, such as
    /// the standalone proxy, that writes allow entries and reads redirect records.
    pub fn open_pinned(bpffs: &Path) -> Result<Datapath, DatapathError> {
        Ok(Datapath {
            inner: Arc::new(maps::Maps::open(bpffs)?),
            last_open: Arc::new(Vec::new()),
        })
    }

    /// What the `open` that made this handle did with each program's link (empty for
    /// `open_pinned`).
    pub fn link_actions(&self) -> &[(&'static str, LinkAction)] {
        &self.last_open
    }

    /// The bpffs directory of the pins.
    pub fn bpffs(&self) -> &Path {
        self.inner.bpffs()
    }

    /// The cgroup id of a cgroup v2 directory (its inode number), as the programs see it.
    pub fn cgroup_id(path: &Path) -> Result<u64, DatapathError> {
        loader::cgroup_id(path)
    }

    /// The cgroup v2 mount to use when none is configured: `/sys/fs/cgroup` if it is cgroup2,
    /// else `/sys/fs/cgroup/unified` (hybrid hosts).
    pub fn detect_cgroup_root() -> Result<PathBuf, DatapathError> {
        loader::detect_cgroup_root()
    }

    /// Detaches every pinned link and removes every pin under `options.bpffs` (all layout
    /// versions), then the directory itself if nothing foreign is left in it.
    pub fn cleanup(options: &DatapathOptions) -> Result<CleanupReport, DatapathError> {
        loader::cleanup(options)
    }
}
