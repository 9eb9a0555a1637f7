//! Loading, attaching, pinning, in-place replacement and cleanup.
//!
//! Pin layout under the bpffs directory (`DatapathOptions::bpffs`):
//!
//! ```text
//! <bpffs>/v1/<map name>          every map, pinned by name (layout-versioned folder)
//! <bpffs>/v1/progs/warden_reuse  the sk_reuseport program, for processes that attach it later
//! <bpffs>/v1/progs/warden_egress the egress program last attached, so that a process without
//!                                CAP_SYS_ADMIN can tell it writes the redirect slots
//! <bpffs>/links/<program name>   one cgroup link per hook (not versioned: a new layout's
//!                                programs replace the old ones in the same links)
//! ```
//!
//! A pinned link keeps its program attached after the loader exits (even on SIGKILL). On the
//! next `open`, a link already attached to the configured cgroup gets the new program through
//! `BPF_LINK_UPDATE`, so there is neither a moment without a program nor a second attachment.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use aya::EbpfLoader;
use aya::maps::{Array, MapData};
use aya::programs::links::FdLink;
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SkReuseport, SockOps,
};
use nix::fcntl::{Flock, FlockArg};
use nix::mount::MsFlags;
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};

use crate::abi::{self, LAYOUT_VERSION, RawNodeConfig, map};
use crate::{CleanupReport, DatapathError, DatapathOptions, OBJECT, sys};

/// The cgroup programs and how they attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    SockAddr,
    SkbEgress,
    SkbIngress,
    SockOps,
}

const CGROUP_PROGRAMS: [(&str, Hook); 13] = [
    ("warden_conn4", Hook::SockAddr),
    ("warden_conn6", Hook::SockAddr),
    ("warden_sendmsg4", Hook::SockAddr),
    ("warden_sendmsg6", Hook::SockAddr),
    ("warden_recvmsg4", Hook::SockAddr),
    ("warden_recvmsg6", Hook::SockAddr),
    ("warden_peer4", Hook::SockAddr),
    ("warden_peer6", Hook::SockAddr),
    // Before ingress and egress: a service socket is marked when it binds.
    ("warden_bind4", Hook::SockAddr),
    ("warden_bind6", Hook::SockAddr),
    // Before egress: a peer's datagram opens the reply window before the reply is checked.
    ("warden_ingress", Hook::SkbIngress),
    // Before egress: a connection accepted once egress enforces is marked already.
    ("warden_sockops", Hook::SockOps),
    (EGRESS_PROGRAM, Hook::SkbEgress),
];

const EGRESS_PROGRAM: &str = "warden_egress";

pub(crate) const REUSEPORT_PROGRAM: &str = "warden_reuse";

const BPFFS_MOUNT: &str = "/sys/fs/bpf";

pub(crate) fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(format!("v{LAYOUT_VERSION}"))
}

fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// Where the egress program's link is pinned (it alone writes the redirect records).
pub(crate) fn egress_link_path(bpffs: &Path) -> PathBuf {
    links_dir(bpffs).join(EGRESS_PROGRAM)
}

/// Where the egress program itself is pinned: opening a program by id takes CAP_SYS_ADMIN,
/// opening its pin only access to the file.
pub(crate) fn egress_prog_path(bpffs: &Path) -> PathBuf {
    maps_dir(bpffs).join("progs").join(EGRESS_PROGRAM)
}

pub(crate) fn reuseport_prog_path(bpffs: &Path) -> PathBuf {
    maps_dir(bpffs).join("progs").join(REUSEPORT_PROGRAM)
}

/// What `open` did with one hook's link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// No link was pinned: attached and pinned a new one.
    Attached,
    /// The pinned link was attached to the configured cgroup: its program was replaced in place.
    Updated,
    /// The pinned link was attached elsewhere (another cgroup root, or a removed cgroup): a new
    /// link was attached at the configured root first, then the old one detached.
    Moved,
}

/// The cgroup v2 directory to attach at when none is configured.
pub(crate) fn detect_cgroup_root() -> Result<PathBuf, DatapathError> {
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Ok(fs) = statfs(candidate)
            && fs.filesystem_type() == CGROUP2_SUPER_MAGIC
        {
            return Ok(PathBuf::from(candidate));
        }
    }
    Err(DatapathError::NoCgroup2)
}

pub(crate) fn cgroup_id(path: &Path) -> Result<u64, DatapathError> {
    let fs = statfs(path).map_err(|errno| DatapathError::Cgroup {
        path: path.to_path_buf(),
        source: io::Error::from(errno),
    })?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        return Err(DatapathError::NotCgroup2 {
            path: path.to_path_buf(),
        });
    }
    // On cgroup v2 the cgroup id the kernel hands to BPF is the kernfs node id, which is the
    // directory's inode number.
    let meta = fs::metadata(path).map_err(|source| DatapathError::Cgroup {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(meta.ino())
}

/// Makes sure `dir` will be on bpffs: fine if its nearest existing ancestor already is; else
/// mounts bpffs at /sys/fs/bpf when `dir` is below it (hosts that do not mount it at boot).
pub(crate) fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    // Two threads of one process opening at once must not both mount: the second mount would
    // stack on the first and hide its pins.
    static MOUNT_LOCK: Mutex<()> = Mutex::new(());
    let _guard = MOUNT_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent,
            None => break,
        }
    }
    if statfs(probe).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC) {
        return Ok(());
    }
    if !dir.starts_with(BPFFS_MOUNT) {
        return Err(DatapathError::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    nix::mount::mount(
        Some("bpffs"),
        BPFFS_MOUNT,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| DatapathError::MountBpffs {
        path: PathBuf::from(BPFFS_MOUNT),
        source,
    })?;
    tracing::info!(mount = BPFFS_MOUNT, "mounted bpffs");
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), DatapathError> {
    fs::create_dir_all(path).map_err(|source| DatapathError::Pin {
        path: path.to_path_buf(),
        source,
    })
}

/// Serialises `open` and `cleanup` across processes (two agents starting at once must not
/// both attach): an exclusive flock on the bpffs directory, released on drop.
fn lock_dir(dir: &Path) -> Result<Flock<File>, DatapathError> {
    let file = File::open(dir).map_err(|source| DatapathError::Pin {
        path: dir.to_path_buf(),
        source,
    })?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| DatapathError::Pin {
        path: dir.to_path_buf(),
        source: io::Error::from(errno),
    })
}

/// Refuses to reuse pinned maps whose sizes differ from this build's layout.
fn check_pinned_layouts(dir: &Path) -> Result<(), DatapathError> {
    for (name, key, value) in abi::MAP_SIZES {
        let path = dir.join(name);
        let Ok(map) = MapData::from_pin(&path) else {
            continue; // not pinned yet: the loader creates it
        };
        let info = map
            .info()
            .map_err(|e| DatapathError::map(name, "get info", e))?;
        let found = (info.key_size(), info.value_size());
        // The ring buffer's "value size" is 0 and its size lives in max_entries; nothing to
        // compare there.
        if name != abi::map::EVENTS && found != (key, value) {
            return Err(DatapathError::Layout {
                map: name,
                path,
                expected: (key, value),
                found,
            });
        }
    }
    Ok(())
}

/// Loads the programs, reuses or creates the pinned maps, and attaches (or replaces in place)
/// every cgroup program at `cgroup_root`. Returns what happened to each link.
pub(crate) fn load_and_attach(
    options: &DatapathOptions,
) -> Result<Vec<(&'static str, LinkAction)>, DatapathError> {
    let cgroup_root = match &options.cgroup_root {
        Some(path) => path.clone(),
        None => detect_cgroup_root()?,
    };
    let cgroup_id = cgroup_id(&cgroup_root)?;
    let cgroup = File::open(&cgroup_root).map_err(|source| DatapathError::Cgroup {
        path: cgroup_root.clone(),
        source,
    })?;

    ensure_bpffs(&options.bpffs)?;
    create_dir(&options.bpffs)?;
    let _lock = lock_dir(&options.bpffs)?;
    let maps = maps_dir(&options.bpffs);
    let links = links_dir(&options.bpffs);
    create_dir(&maps)?;
    create_dir(&links)?;
    create_dir(&maps.join("progs"))?;
    check_pinned_layouts(&maps)?;

    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&maps)
        .load(OBJECT)
        .map_err(|source| DatapathError::Load {
            pin_dir: maps.clone(),
            source: Box::new(source),
        })?;

    // Before any program runs with this build: they read it on every loopback query.
    write_node_config(&mut ebpf)?;

    load_programs(&mut ebpf)?;

    let mut actions = Vec::with_capacity(CGROUP_PROGRAMS.len());
    for (name, hook) in CGROUP_PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| missing_program(name))?;
        let link_path = links.join(name);
        // A staging pin left by a crash mid-move (see `replace_pin`): unpinned and held by no
        // one, its link detaches, whichever way this start goes.
        remove_if_exists(&staging_path(&link_path))?;
        // Cgroup links are always multi-attach in the kernel: the flag must be 0 (`Single`).
        let action = match hook {
            Hook::SockAddr => {
                let prog: &mut CgroupSockAddr =
                    program.try_into().map_err(|e| program_error(name, e))?;
                let reuse = reuse_link(
                    &link_path,
                    prog.fd().map_err(|e| program_error(name, e))?,
                    cgroup_id,
                )?;
                relink(name, &link_path, reuse, || {
                    let id = prog.attach(&cgroup, CgroupAttachMode::Single);
                    pinnable(name, &cgroup_root, id.and_then(|id| prog.take_link(id)))
                })?
            }
            Hook::SockOps => {
                let prog: &mut SockOps = program.try_into().map_err(|e| program_error(name, e))?;
                let reuse = reuse_link(
                    &link_path,
                    prog.fd().map_err(|e| program_error(name, e))?,
                    cgroup_id,
                )?;
                relink(name, &link_path, reuse, || {
                    let id = prog.attach(&cgroup, CgroupAttachMode::Single);
                    pinnable(name, &cgroup_root, id.and_then(|id| prog.take_link(id)))
                })?
            }
            Hook::SkbEgress | Hook::SkbIngress => {
                let prog: &mut CgroupSkb =
                    program.try_into().map_err(|e| program_error(name, e))?;
                let direction = match hook {
                    Hook::SkbIngress => CgroupSkbAttachType::Ingress,
                    _ => CgroupSkbAttachType::Egress,
                };
                let reuse = reuse_link(
                    &link_path,
                    prog.fd().map_err(|e| program_error(name, e))?,
                    cgroup_id,
                )?;
                let action = relink(name, &link_path, reuse, || {
                    let id = prog.attach(&cgroup, direction, CgroupAttachMode::Single);
                    pinnable(name, &cgroup_root, id.and_then(|id| prog.take_link(id)))
                })?;
                if matches!(hook, Hook::SkbEgress) {
                    // After the link runs it: a reader that finds the pinned program and the
                    // link's differ trusts neither.
                    repin(name, &egress_prog_path(&options.bpffs), |path| {
                        prog.pin(path)
                    })?;
                }
                action
            }
        };
        tracing::debug!(program = name, ?action, cgroup = %cgroup_root.display(), "datapath link");
        actions.push((name, action));
    }

    // The sk_reuseport program is attached to sockets later, possibly by another process
    // (the standalone proxy): pin it so they can open it. Replacing the pin does not affect
    // groups that already run the previous version; they switch when they attach again.
    let prog = reuseport_program(&mut ebpf)?;
    repin(
        REUSEPORT_PROGRAM,
        &reuseport_prog_path(&options.bpffs),
        |path| prog.pin(path),
    )?;
    remove_other_layouts(&options.bpffs);
    Ok(actions)
}

/// Whether `entry` is the folder of a layout version's maps (`v<N>`): a folder itself, not a
/// link to one, whose contents would otherwise be removed wherever it points.
fn is_layout_dir(entry: &fs::DirEntry) -> bool {
    let name = entry.file_name();
    let is_version = name
        .to_string_lossy()
        .strip_prefix('v')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    is_version && entry.file_type().is_ok_and(|kind| kind.is_dir())
}

/// Unpins the maps of every other layout version (an upgrade's or a rollback's), once the
/// links run this build's programs, which read none of them. A process that kept them open,
/// a warden-dnsproxy of another release, then sees its pins gone and stops writing allow
/// entries where no program reads them. The maps themselves live on while anything holds
/// them. A failure leaves them pinned, as before, and is only logged: the datapath runs.
fn remove_other_layouts(bpffs: &Path) {
    let own = maps_dir(bpffs);
    let entries = match read_dir(bpffs) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(%error, "cannot list other layouts' pins");
            return;
        }
    };
    for entry in entries {
        let path = entry.path();
        if path == own || !is_layout_dir(&entry) {
            continue;
        }
        let mut removed = Vec::new();
        match remove_tree(&path, &mut removed) {
            Ok(()) => {
                tracing::info!(folder = %path.display(), pins = removed.len(), "another layout's pins removed")
            }
            Err(error) => {
                tracing::warn!(folder = %path.display(), %error, "cannot remove another layout's pins")
            }
        }
    }
}

/// Every program through the verifier before any is attached: one the kernel refuses (a kernel
/// other than the build expects) leaves the hooks as they were, not the first ones replaced by
/// this build and the rest run by the one before.
fn load_programs(ebpf: &mut aya::Ebpf) -> Result<(), DatapathError> {
    for (name, hook) in CGROUP_PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| missing_program(name))?;
        let loaded = match hook {
            Hook::SockAddr => {
                let prog: &mut CgroupSockAddr =
                    program.try_into().map_err(|e| program_error(name, e))?;
                prog.load()
            }
            Hook::SockOps => {
                let prog: &mut SockOps = program.try_into().map_err(|e| program_error(name, e))?;
                prog.load()
            }
            Hook::SkbEgress | Hook::SkbIngress => {
                let prog: &mut CgroupSkb =
                    program.try_into().map_err(|e| program_error(name, e))?;
                prog.load()
            }
        };
        loaded.map_err(|e| program_error(name, e))?;
    }
    reuseport_program(ebpf)?
        .load()
        .map_err(|e| program_error(REUSEPORT_PROGRAM, e))
}

/// The object's `sk_reuseport` program.
fn reuseport_program(ebpf: &mut aya::Ebpf) -> Result<&mut SkReuseport, DatapathError> {
    ebpf.program_mut(REUSEPORT_PROGRAM)
        .ok_or_else(|| missing_program(REUSEPORT_PROGRAM))?
        .try_into()
        .map_err(|e| program_error(REUSEPORT_PROGRAM, e))
}

/// Tells the programs which network namespace the proxies serve in (`struct
/// warden_node_config`): the loader's, as the agent and warden-dnsproxy share the node's
/// (`hostNetwork`). Without `SO_NETNS_COOKIE` (Linux 5.14) the cookie stays 0 and port 53 of
/// every loopback destination is redirected, as before the programs knew the difference.
fn write_node_config(ebpf: &mut aya::Ebpf) -> Result<(), DatapathError> {
    let proxy_netns_cookie = match sys::netns_cookie() {
        Ok(cookie) => cookie,
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
            tracing::warn!(
                "this kernel does not tell a socket's network namespace (SO_NETNS_COOKIE, \
                 Linux 5.14): port 53 on a pod's own loopback is redirected to the proxy too"
            );
            0
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot read this process's network namespace cookie: port 53 on a pod's own \
                 loopback is redirected to the proxy too"
            );
            0
        }
    };
    let map = ebpf
        .map_mut(map::NODE_CONFIG)
        .ok_or(DatapathError::MissingMap {
            map: map::NODE_CONFIG,
        })?;
    let mut config: Array<&mut MapData, RawNodeConfig> =
        Array::try_from(map).map_err(|e| DatapathError::map(map::NODE_CONFIG, "open", e))?;
    config
        .set(0, RawNodeConfig { proxy_netns_cookie }, 0)
        .map_err(|e| DatapathError::map(map::NODE_CONFIG, "update", e))
}

/// Pins the freshly loaded program `name` at `path` in place of whatever was pinned there.
fn repin(
    name: &'static str,
    path: &Path,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), DatapathError> {
    remove_if_exists(path)?;
    pin(path).map_err(|source| DatapathError::PinObject {
        program: name,
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

enum Reuse {
    /// The pinned link now runs the new program.
    Updated,
    /// Attach a new link: none is pinned (`None`), or the pinned one is attached elsewhere or
    /// defunct (its fd, so it can be detached once the replacement is in place).
    Replace(Option<std::os::fd::OwnedFd>),
}

fn reuse_link(
    link_path: &Path,
    prog_fd: &aya::programs::ProgramFd,
    cgroup_id: u64,
) -> Result<Reuse, DatapathError> {
    let link = match sys::obj_get(link_path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Reuse::Replace(None)),
        Err(source) => {
            return Err(DatapathError::Link {
                command: "BPF_OBJ_GET",
                path: link_path.to_path_buf(),
                source,
            });
        }
    };
    let info = sys::cgroup_link_info(&link).map_err(|source| DatapathError::Link {
        command: "BPF_OBJ_GET_INFO_BY_FD",
        path: link_path.to_path_buf(),
        source,
    })?;
    match info {
        Some(info) if info.cgroup_id == cgroup_id => {
            sys::link_update(&link, prog_fd).map_err(|source| DatapathError::Link {
                command: "BPF_LINK_UPDATE",
                path: link_path.to_path_buf(),
                source,
            })?;
            Ok(Reuse::Updated)
        }
        _ => Ok(Reuse::Replace(Some(link))),
    }
}

/// The link of `name` after `reuse_link` said what to do: updated in place, or a fresh one from
/// `attach` pinned over the stale one.
fn relink(
    name: &'static str,
    link_path: &Path,
    reuse: Reuse,
    attach: impl FnOnce() -> Result<FdLink, DatapathError>,
) -> Result<LinkAction, DatapathError> {
    match reuse {
        Reuse::Updated => Ok(LinkAction::Updated),
        Reuse::Replace(old) => replace_pin(name, link_path, attach()?, old),
    }
}

/// A link program `name` just took at `cgroup_path`, as an fd link that can be pinned.
fn pinnable<L>(
    name: &'static str,
    cgroup_path: &Path,
    taken: Result<L, aya::programs::ProgramError>,
) -> Result<FdLink, DatapathError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::error::Error + Send + Sync + 'static,
{
    let attach_error = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
        program: name,
        cgroup: cgroup_path.to_path_buf(),
        source,
    };
    let link = taken.map_err(|e| attach_error(Box::new(e)))?;
    FdLink::try_from(link).map_err(|e| attach_error(Box::new(e)))
}

/// Pins the freshly attached `link` at `path` in place of the stale link pinned there (if any),
/// and only then detaches the stale one: pinned beside it first and renamed over it, so that a
/// failure or a crash at any step leaves a program on the hook (for a moment, both).
fn replace_pin(
    name: &'static str,
    path: &Path,
    link: FdLink,
    old: Option<std::os::fd::OwnedFd>,
) -> Result<LinkAction, DatapathError> {
    let action = if old.is_some() {
        LinkAction::Moved
    } else {
        LinkAction::Attached
    };
    let staging = staging_path(path);
    remove_if_exists(&staging)?;
    link.pin(&staging)
        .map_err(|source| DatapathError::PinObject {
            program: name,
            path: staging.clone(),
            source: Box::new(source),
        })?;
    fs::rename(&staging, path).map_err(|source| DatapathError::Pin {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(old) = old {
        // Unpinned by the rename; detached explicitly in case another process holds an fd.
        if let Err(e) = sys::link_detach(&old) {
            tracing::warn!(program = name, error = %e, "detaching the stale link failed");
        }
    }
    Ok(action)
}

/// Where a link is pinned before it is renamed over `path` (bpffs refuses names with a dot).
fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push("_new");
    path.with_file_name(name)
}

fn remove_if_exists(path: &Path) -> Result<(), DatapathError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Pin {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn missing_program(name: &'static str) -> DatapathError {
    DatapathError::MissingProgram { program: name }
}

fn program_error(name: &'static str, e: aya::programs::ProgramError) -> DatapathError {
    DatapathError::Program {
        program: name,
        source: Box::new(e),
    }
}

/// Detaches every pinned link and removes every pin of every layout version.
pub(crate) fn cleanup(options: &DatapathOptions) -> Result<CleanupReport, DatapathError> {
    let mut report = CleanupReport::default();
    let root = &options.bpffs;
    if !root.exists() {
        return Ok(report);
    }
    let lock = lock_dir(root)?;

    let links = links_dir(root);
    for entry in read_dir(&links)? {
        let path = entry.path();
        match sys::obj_get(&path) {
            Ok(link) => {
                if let Err(source) = sys::link_detach(&link) {
                    // A defunct link (its cgroup removed) is already detached.
                    if source.raw_os_error() != Some(libc::ENOLINK) {
                        return Err(DatapathError::Link {
                            command: "BPF_LINK_DETACH",
                            path,
                            source,
                        });
                    }
                }
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "not a link; removing"),
        }
        remove_if_exists(&path)?;
        report
            .links_detached
            .push(entry.file_name().to_string_lossy().into_owned());
    }
    remove_dir(&links)?;

    // Every v<N> folder: maps and programs of this and older layouts.
    for entry in read_dir(root)? {
        if is_layout_dir(&entry) {
            remove_tree(&entry.path(), &mut report.pins_removed)?;
        }
    }
    drop(lock);
    report.dir_removed = fs::remove_dir(root).is_ok();
    Ok(report)
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, DatapathError> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            entries
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| DatapathError::Pin {
                    path: dir.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(DatapathError::Pin {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn remove_dir(dir: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Pin {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn remove_tree(dir: &Path, removed: &mut Vec<PathBuf>) -> Result<(), DatapathError> {
    for entry in read_dir(dir)? {
        let path = entry.path();
        // Not through a link: only the link goes.
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            remove_tree(&path, removed)?;
        } else {
            remove_if_exists(&path)?;
            removed.push(path);
        }
    }
    remove_dir(dir)
}
