//! The crate's only unsafe code: `Pod` for the map layouts, the few bpf(2) commands aya 0.14
//! does not expose (opening a pinned link's fd, `BPF_LINK_UPDATE`, reading a cgroup link's
//! target, `BPF_LINK_DETACH`, the maps a loaded program uses), the read-only mapping of the
//! redirect slots into this process, and reading a socket's network-namespace cookie.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use aya::Pod;
use aya::maps::{MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::abi::{
    RawCidrData, RawCidrValue, RawClientKey, RawDnsTarget, RawEndpoint, RawFqdnKey, RawFqdnValue,
    RawLastSeenKey, RawNodeConfig, RawRedirectRecord, RawReuseportConfig, RawSockOrig,
};

// SAFETY: each of these is #[repr(C)], Copy, made only of integers and integer arrays, with
// every padding byte spelled out as a field (checked by the size assertions in `abi`), so
// every bit pattern is a valid value and no byte is uninitialised when aya copies it.
unsafe impl Pod for RawEndpoint {}
// SAFETY: as above (integers and byte arrays, explicit padding, size asserted).
unsafe impl Pod for RawDnsTarget {}
// SAFETY: as above.
unsafe impl Pod for RawSockOrig {}
// SAFETY: as above.
unsafe impl Pod for RawClientKey {}
// SAFETY: as above.
unsafe impl Pod for RawRedirectRecord {}
// SAFETY: as above.
unsafe impl Pod for RawFqdnKey {}
// SAFETY: as above.
unsafe impl Pod for RawFqdnValue {}
// SAFETY: as above.
unsafe impl Pod for RawCidrData {}
// SAFETY: as above; the rules array holds RawPortRule, itself integers with explicit padding.
unsafe impl Pod for RawCidrValue {}
// SAFETY: as above.
unsafe impl Pod for RawLastSeenKey {}
// SAFETY: as above.
unsafe impl Pod for RawReuseportConfig {}
// SAFETY: as above.
unsafe impl Pod for RawNodeConfig {}

/// Registers the ring buffer with tokio's reactor (must run inside a runtime).
pub(crate) fn async_ring(ring: RingBuf<MapData>) -> io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the RingBuf owns its MapData, whose fd stays open and unchanged until the RingBuf
    // is dropped, and its as_raw_fd always returns that fd; the AsyncFd owns the RingBuf, and
    // `DropEvents` only calls `next()` through `get_mut`, never swapping the map.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(io::Error::from)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// Issues bpf(2) with `attr` (a #[repr(C)] prefix of `union bpf_attr`, zero-padded).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed #[repr(C)] struct of exactly
    // size_of::<T>() bytes whose layout matches the kernel's `bpf_attr` member for `cmd`; the
    // kernel reads (and for some commands writes) at most that many bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    pad: u32,
}

/// `BPF_OBJ_GET`: a new fd for the object pinned at `path`.
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The kernel's `struct bpf_link_info` for a cgroup link: type, id, prog_id, then (8-aligned)
/// the `cgroup` union member { cgroup_id, attach_type }. The rest of the union is left zero.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    pad2: u32,
    rest: [u64; 6],
}

/// What a pinned link is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CgroupLinkInfo {
    /// 0 once the cgroup is gone (the link is then defunct).
    pub cgroup_id: u64,
    pub attach_type: u32,
    pub prog_id: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link; `None` when it is not a cgroup link.
pub(crate) fn cgroup_link_info(link: impl AsFd) -> io::Result<Option<CgroupLinkInfo>> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(link.as_fd().as_raw_fd())?,
        info_len: size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.link_type != BPF_LINK_TYPE_CGROUP {
        return Ok(None);
    }
    Ok(Some(CgroupLinkInfo {
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
        prog_id: info.prog_id,
    }))
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `BPF_LINK_UPDATE`: swap the link's program atomically (no moment without a program).
pub(crate) fn link_update(link: impl AsFd, program: impl AsFd) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: fd_u32(link.as_fd().as_raw_fd())?,
        new_prog_fd: fd_u32(program.as_fd().as_raw_fd())?,
        ..LinkUpdateAttr::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
    pad: u32,
}

/// `BPF_LINK_DETACH`: detach now, even while other fds or pins still hold the link.
pub(crate) fn link_detach(link: impl AsFd) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: fd_u32(link.as_fd().as_raw_fd())?,
        pad: 0,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// The cookie of the network namespace this process's sockets live in (`SO_NETNS_COOKIE`, Linux
/// 5.14), the value `bpf_get_netns_cookie` gives the programs for a socket there.
pub(crate) fn netns_cookie() -> io::Result<u64> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

    let probe = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `probe` is an open socket for the whole call; the kernel writes at most `len`
    // bytes into `cookie`, a live, exclusively borrowed u64, and the length it wrote into `len`.
    let rc = unsafe {
        libc::getsockopt(
            probe.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<u64>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_NETNS_COOKIE gave {len} bytes, not 8"),
        ));
    }
    Ok(cookie)
}

fn fd_u32(fd: i32) -> io::Result<u32> {
    u32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
}

/// The kernel's `struct bpf_prog_info` up to `map_ids`; the kernel fills what it has of the rest
/// only when asked (pointers and lengths left zero).
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
}

/// A loaded program's id and the ids of the maps it uses (`BPF_OBJ_GET_INFO_BY_FD`; on a
/// program opened from its pin, which needs no capability beyond access to the file).
pub(crate) fn program_maps(program: impl AsFd) -> io::Result<(u32, Vec<u32>)> {
    // A program uses a handful of maps (warden_egress: under twenty); past 64 the list is cut,
    // which can only make a caller looking for a map not find it.
    let mut ids = vec![0_u32; 64];
    let mut info = ProgInfo {
        nr_map_ids: ids.len() as u32,
        map_ids: ids.as_mut_ptr() as u64,
        ..ProgInfo::default()
    };
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(program.as_fd().as_raw_fd())?,
        info_len: size_of::<ProgInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    ids.truncate(info.nr_map_ids as usize);
    Ok((info.id, ids))
}

/// A pinned map's values mapped read-only into this process (an array created with
/// `BPF_F_MMAPABLE`), seen as 64-bit words that the programs write concurrently.
pub(crate) struct MappedWords {
    base: std::ptr::NonNull<libc::c_void>,
    bytes: usize,
}

// SAFETY: the mapping is shared memory read only through atomics (`words`), valid until Drop
// unmaps it; no thread-local state is attached to it.
unsafe impl Send for MappedWords {}
// SAFETY: as above: `&MappedWords` only hands out `&[AtomicU64]`, which is Sync.
unsafe impl Sync for MappedWords {}

impl MappedWords {
    /// Maps the first `bytes` (a multiple of 8) of the map behind `map`.
    pub(crate) fn map(map: impl AsFd, bytes: usize) -> io::Result<MappedWords> {
        if bytes == 0 || !bytes.is_multiple_of(8) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh read-only shared mapping chosen by the kernel (no address hint, so it
        // aliases nothing of ours) of a map fd that is valid for this call; the kernel keeps the
        // map alive as long as the mapping exists, even after the fd closes.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = std::ptr::NonNull::new(base).ok_or_else(|| io::Error::other("mmap gave 0"))?;
        Ok(MappedWords { base, bytes })
    }

    /// Only ever read with `load(Ordering::Relaxed)`: on read-only memory that is what Rust
    /// promises to be sound for atomics of a pointer's width or less, and the crate reads these
    /// only on 64-bit targets (`slots`).
    pub(crate) fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping is `bytes` long, page-aligned (so 8-aligned), readable, and
        // stays mapped while `self` lives; AtomicU64 has u64's size and alignment, and atomic
        // loads are the right way to read memory another agent (the programs) writes at the
        // same time. Nothing in this process writes through the mapping (it is read-only, and
        // the only reader, `slots`, does relaxed loads, plain loads on 64-bit targets).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().cast(), self.bytes / 8) }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference from `words` outlives
        // `self`.
        unsafe {
            libc::munmap(self.base.as_ptr(), self.bytes);
        }
    }
}

impl std::fmt::Debug for MappedWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedWords")
            .field("bytes", &self.bytes)
            .finish()
    }
}
