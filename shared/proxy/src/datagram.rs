//! UDP sockets registered with the runtime for readability only.
//!
//! tokio's `UdpSocket` asks epoll for writability too, and the kernel reports a UDP socket
//! writable again each time one of its sent packets is freed: at tens of thousands of
//! answers a second that is a wake-up of the runtime per packet, for nothing, since a UDP
//! send almost never finds the buffer full. Here sends go straight to the socket, and the
//! rare full buffer is retried briefly.
//!
//! Under load, datagrams are read and written in batches ([`Inbox`], [`Outbox`]: recvmmsg and
//! sendmmsg), so that a burst of queries costs one system call and one wake-up of each peer
//! instead of one per packet.
//!
//! The crate's only `unsafe` code is here, each with its safety argument: registering a file
//! descriptor with the runtime's reactor, declaring nix's receive headers `Send`, and sending a
//! batch through libc's `sendmmsg` (nix's wrapper reports how many went out only through an
//! iterator that reads, as if received, address storage a send never writes).

#![allow(unsafe_code)]

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage, recvmmsg};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How long a send that finds the buffer full keeps trying before the packet is dropped (a
/// DNS client retries; a UDP server under overload drops).
const FULL_BUFFER_RETRY: Duration = Duration::from_millis(1);
const FULL_BUFFER_ATTEMPTS: u32 = 50;

/// The receive buffers of one listen address's UDP sockets, and of the upstream pool's, shared
/// out among them: bursts of queries (or answers) queue there while the loops are busy. A
/// budget, not a size per socket: with a socket per CPU (64 at most) and up to 1,024 pool
/// sockets, a fixed size each would let a stalled process's buffers grow past its memory
/// limit (the kernel counts up to twice the size asked for, and charges it to the process's
/// cgroup).
pub(crate) const LISTEN_BUFFERS: usize = 8 << 20;
pub(crate) const POOL_BUFFERS: usize = 8 << 20;
/// No socket gets less (some 16 small datagrams): past 512 sockets in a set the budget grows
/// by this much a socket.
const MIN_RECEIVE_BUFFER: usize = 16 << 10;

/// One socket's share of `budget` among `sockets`.
pub(crate) fn receive_buffer_share(budget: usize, sockets: usize) -> usize {
    (budget / sockets.max(1)).max(MIN_RECEIVE_BUFFER)
}

/// Gives `socket` a receive buffer of `bytes`. SO_RCVBUF is capped at `net.core.rmem_max`
/// (212,992 bytes by default: some 400 small datagrams, a few milliseconds of a busy node's
/// queries) without a word; a process with CAP_NET_ADMIN, as both are, may pass the cap
/// (SO_RCVBUFFORCE). A buffer smaller than asked for is logged, once per process.
pub(crate) fn set_receive_buffer(socket: &impl AsFd, bytes: usize) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
    // The kernel reports twice what it grants (the other half is its bookkeeping).
    let granted = getsockopt(socket, sockopt::RcvBuf).map_or(0, |doubled| doubled / 2);
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if granted < bytes && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            asked = bytes,
            granted,
            "DNS sockets get smaller receive buffers than asked for (no CAP_NET_ADMIN, and net.core.rmem_max below): bursts may be dropped"
        );
    }
}

#[derive(Debug)]
pub struct Datagram {
    io: AsyncFd<UdpSocket>,
}

impl Datagram {
    /// Takes a bound socket; must run inside a tokio runtime.
    pub fn new(socket: UdpSocket) -> io::Result<Datagram> {
        socket.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the std socket, which owns its descriptor: it stays open
        // and the same for as long as the AsyncFd lives, and `as_raw_fd` always returns it.
        let io = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|error| error.into_parts().1)?;
        Ok(Datagram { io })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    /// Sends now, or fails with `WouldBlock` when the socket's buffer is full.
    pub fn try_send_to(&self, packet: &[u8], target: SocketAddr) -> io::Result<usize> {
        self.io.get_ref().send_to(packet, target)
    }

    /// Sends, retrying a full buffer for a moment before giving up.
    pub async fn send_to(&self, packet: &[u8], target: SocketAddr) -> io::Result<usize> {
        let mut attempts = 0;
        loop {
            match self.try_send_to(packet, target) {
                Err(error)
                    if error.kind() == io::ErrorKind::WouldBlock
                        && attempts < FULL_BUFFER_ATTEMPTS =>
                {
                    attempts += 1;
                    tokio::time::sleep(FULL_BUFFER_RETRY).await;
                }
                sent => return sent,
            }
        }
    }

    /// Waits for datagrams, then reads as many as are queued (up to the inbox's size) in one
    /// system call; returns how many.
    pub async fn recv_batch(&self, inbox: &mut Inbox) -> io::Result<usize> {
        loop {
            let mut ready = self.io.readable().await?;
            match ready.try_io(|socket| inbox.fill(socket.get_ref().as_raw_fd())) {
                Ok(Ok(count)) => {
                    // Fewer than asked for: the queue is empty now. Saying so spares the next
                    // call a system call that would only find nothing; a datagram arriving
                    // meanwhile raises readiness again (epoll is edge-triggered per arrival).
                    if count < inbox.slots() {
                        ready.clear_ready();
                    }
                    return Ok(count);
                }
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => continue,
            }
        }
    }

    /// Stops taking datagrams from clients while keeping what is queued: connected to its own
    /// address, the socket no longer matches their datagrams, so the kernel gives them to
    /// another socket of the port's SO_REUSEPORT group. Sending to explicit addresses still
    /// works. A socket bound to the wildcard stays: a connect would also fix its source
    /// address (to loopback, the route to itself), and its answers to every client not on
    /// loopback would then fail (EINVAL). Returns whether the socket left the group.
    pub fn stop_receiving(&self) -> io::Result<bool> {
        let local = self.local_addr()?;
        if local.ip().is_unspecified() {
            return Ok(false);
        }
        self.io.get_ref().connect(local)?;
        Ok(true)
    }

    /// Reads what is queued now, without waiting: `WouldBlock` when nothing is. Asks the
    /// socket itself, not the runtime's record of its readiness.
    pub fn recv_batch_now(&self, inbox: &mut Inbox) -> io::Result<usize> {
        inbox.fill(self.io.get_ref().as_raw_fd())
    }

    /// Sends everything in `outbox`, in as few system calls as the kernel allows, and empties
    /// it; returns the indexes (in push order) of the datagrams that could not be sent.
    pub async fn send_batch(&self, outbox: &mut Outbox) -> Vec<usize> {
        self.send_all(outbox, true).await
    }

    /// [`Datagram::send_batch`] without waiting for room in a full send buffer: what does
    /// not fit now is among the failed.
    pub async fn send_batch_now(&self, outbox: &mut Outbox) -> Vec<usize> {
        self.send_all(outbox, false).await
    }

    async fn send_all(&self, outbox: &mut Outbox, wait_for_room: bool) -> Vec<usize> {
        let mut failed = Vec::new();
        let mut next = 0;
        let mut full_buffer_attempts = 0;
        let mut stale_report_for = None;
        while next < outbox.len() {
            match outbox.send_from(self.io.get_ref().as_raw_fd(), next) {
                Ok(sent) => next += sent.max(1),
                // An error the kernel kept from an ICMP message about an earlier datagram of
                // this connected socket (its upstream was down a moment, a firewall refused
                // one: port or protocol unreachable, administratively prohibited, a
                // parameter problem, too big) is reported by the next send, which it stops:
                // this datagram never left. Any error but a full buffer gets one more try, or
                // a healthy query would fail for an old one; one that lasts (no route, port
                // 0) fails the second time too.
                Err(error)
                    if error.kind() != io::ErrorKind::WouldBlock
                        && stale_report_for != Some(next) =>
                {
                    stale_report_for = Some(next);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock && !wait_for_room => {
                    failed.extend(next..outbox.len());
                    break;
                }
                Err(error)
                    if error.kind() == io::ErrorKind::WouldBlock
                        && full_buffer_attempts < FULL_BUFFER_ATTEMPTS =>
                {
                    full_buffer_attempts += 1;
                    tokio::time::sleep(FULL_BUFFER_RETRY).await;
                }
                // The kernel reports an error for the first datagram it could not send; the
                // ones after it get their own attempt.
                Err(error) => {
                    tracing::debug!(target = %outbox.target(next), %error, "cannot send datagram");
                    failed.push(next);
                    next += 1;
                }
            }
        }
        outbox.clear();
        failed
    }
}

/// Datagrams read by one [`Datagram::recv_batch`].
pub struct Inbox {
    /// All slots, back to back: one allocation large enough to be mapped straight from the
    /// kernel, whose pages stay untouched (and cost no memory) until a datagram lands there.
    buffer: Vec<u8>,
    slot_size: usize,
    headers: Headers,
    received: Vec<Received>,
}

/// The kernel's message headers for recvmmsg, kept between calls: built anew each time they
/// cost two allocations large enough to make the allocator consolidate its free lists, once
/// per batch.
struct Headers(MultiHeaders<SockaddrStorage>);

// Reuse is sound for recvmmsg too although nix does not reset the address length the kernel
// writes back into each header: a socket's sources are all of one family (IPv4 sockets,
// IPv6-only listeners, dual-stack sockets that report IPv4 peers as mapped IPv6), so the
// length left by one call is the one the next needs. Were it ever short, the kernel would
// cut that one address, the datagram would come out as Err(()), and the length be right again.
//
// SAFETY: MultiHeaders is not Send only because it holds raw pointers. They point into its
// own heap buffers (the addresses) and, during one recvmmsg call, into iovecs that outlive
// that call; they are never read outside such a call. A `Headers` is owned by one Inbox and
// only used through `&mut`, so moving it to another thread between calls shares nothing.
unsafe impl Send for Headers {}

impl Headers {
    fn new(slots: usize) -> Headers {
        Headers(MultiHeaders::preallocate(slots, None))
    }
}

#[derive(Debug, Clone, Copy)]
struct Received {
    length: usize,
    source: Option<SocketAddr>,
    /// Larger than its buffer: the kernel cut it.
    truncated: bool,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("slots", &self.slots())
            .field("received", &self.received.len())
            .finish()
    }
}

impl Inbox {
    /// Room for `slots` (at most [`MAX_BATCH`]) datagrams of up to `slot_size` bytes each, all
    /// read by one call. Only the pages datagrams are written to become resident: 32 slots of
    /// 64 KiB for upstream answers take about 128 KiB of memory in practice, not 2 MiB (which
    /// every process start would zero and every exit unmap, both before the sockets are served
    /// or closed).
    pub fn new(slots: usize, slot_size: usize) -> Inbox {
        let slots = slots.clamp(1, MAX_BATCH);
        let slot_size = slot_size.max(1);
        Inbox {
            buffer: vec![0u8; slots * slot_size],
            slot_size,
            headers: Headers::new(slots),
            received: Vec::with_capacity(slots),
        }
    }

    /// The `index`th datagram of the last batch and its sender; `Err(())` for one the kernel
    /// had to cut or that came from no IP address.
    pub fn get_mut(&mut self, index: usize) -> Option<Result<(&mut [u8], SocketAddr), ()>> {
        let received = *self.received.get(index)?;
        let buffer = self.buffer.chunks_exact_mut(self.slot_size).nth(index)?;
        Some(match received.source {
            Some(source) if !received.truncated => buffer
                .get_mut(..received.length)
                .map(|packet| (packet, source))
                .ok_or(()),
            _ => Err(()),
        })
    }

    fn slots(&self) -> usize {
        self.buffer.len() / self.slot_size
    }

    fn fill(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut slices: [[IoSliceMut<'_>; 1]; MAX_BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(&mut [])]);
        let mut count = 0;
        for (slice, slot) in slices
            .iter_mut()
            .zip(self.buffer.chunks_exact_mut(self.slot_size))
        {
            *slice = [IoSliceMut::new(slot)];
            count += 1;
        }
        let results = recvmmsg(
            fd,
            &mut self.headers.0,
            slices[..count].iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        self.received.clear();
        for message in results {
            self.received.push(Received {
                length: message.bytes,
                source: message.address.as_ref().and_then(socket_addr),
                truncated: message.flags.contains(MsgFlags::MSG_TRUNC),
            });
        }
        Ok(self.received.len())
    }
}

/// Datagrams queued for one [`Datagram::send_batch`]: their bytes back to back in one buffer.
pub struct Outbox {
    bytes: Vec<u8>,
    datagrams: Vec<(Range<usize>, Option<SocketAddr>)>,
    addresses: Vec<Option<SockaddrStorage>>,
    batch: usize,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("datagrams", &self.datagrams.len())
            .finish()
    }
}

/// One outbox per socket of a set (the listeners, the pool's sockets), each made when first
/// used: an outbox is some 28 KiB, and a loop may only ever send from a few of the set (with
/// the datapath preferring this process, one listener socket per address takes the queries).
pub struct Outboxes {
    outboxes: Vec<Option<Outbox>>,
    batch: usize,
}

impl Outboxes {
    pub fn new(sockets: usize, batch: usize) -> Outboxes {
        Outboxes {
            outboxes: (0..sockets).map(|_| None).collect(),
            batch,
        }
    }

    /// The outbox of socket `index`, made now if this is its first use; `None` past the set.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut Outbox> {
        let batch = self.batch;
        let slot = self.outboxes.get_mut(index)?;
        Some(slot.get_or_insert_with(|| Outbox::new(batch)))
    }

    /// The outboxes holding something to send, with their socket's index.
    pub fn filled(&mut self) -> impl Iterator<Item = (usize, &mut Outbox)> {
        self.outboxes
            .iter_mut()
            .enumerate()
            .filter_map(|(index, outbox)| Some((index, outbox.as_mut()?)))
            .filter(|(_, outbox)| !outbox.is_empty())
    }
}

/// The most datagrams one receive or send call moves. Their I/O slices are on the stack: two
/// lists of them, made per call, were two of the hot path's allocations per query at low rates
/// (a call per datagram).
pub const MAX_BATCH: usize = 64;

/// Bytes per datagram of its batch an emptied outbox keeps at most: room for ordinary answers
/// and more.
const KEPT_BYTES_PER_DATAGRAM: usize = 4096;

impl Outbox {
    /// An outbox sending up to `batch` (at most [`MAX_BATCH`]) datagrams per system call (it
    /// holds any number).
    pub fn new(batch: usize) -> Outbox {
        let batch = batch.clamp(1, MAX_BATCH);
        Outbox {
            bytes: Vec::with_capacity(batch * 512),
            datagrams: Vec::with_capacity(batch),
            addresses: Vec::with_capacity(batch),
            batch,
        }
    }

    /// Queues a copy of `packet` for `target` (`None`: the connected peer); returns the copy,
    /// for last touches (its ID).
    pub fn push(&mut self, packet: &[u8], target: impl Into<Option<SocketAddr>>) -> &mut [u8] {
        let target = target.into();
        let start = self.bytes.len();
        self.bytes.extend_from_slice(packet);
        let range = start..self.bytes.len();
        self.datagrams.push((range.clone(), target));
        self.addresses.push(target.map(SockaddrStorage::from));
        &mut self.bytes[range]
    }

    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.datagrams.clear();
        self.addresses.clear();
        // A batch of large answers (up to 64 KiB each, as a client's EDNS size and its
        // server allow) grows the buffer to megabytes, which every (loop, socket) pair would
        // otherwise keep for the process's life.
        if self.bytes.capacity() > self.batch * KEPT_BYTES_PER_DATAGRAM {
            self.bytes.shrink_to(self.batch * 512);
        }
    }

    /// Where the `index`th datagram goes, for messages.
    fn target(&self, index: usize) -> String {
        match self.datagrams.get(index) {
            Some((_, Some(target))) => target.to_string(),
            _ => "the connected peer".to_owned(),
        }
    }

    /// One sendmmsg of the datagrams from `first` on (at most a batch); returns how many the
    /// kernel took.
    fn send_from(&mut self, fd: RawFd, first: usize) -> io::Result<usize> {
        let last = (first + self.batch).min(self.datagrams.len());
        let (Some(datagrams), Some(addresses)) = (
            self.datagrams.get(first..last),
            self.addresses.get(first..last),
        ) else {
            return Ok(0);
        };
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_BATCH];
        for (iovec, (range, _)) in iovecs.iter_mut().zip(datagrams) {
            let bytes = self.bytes.get(range.clone()).unwrap_or_default();
            iovec.iov_base = bytes.as_ptr().cast_mut().cast();
            iovec.iov_len = bytes.len();
        }
        // SAFETY: mmsghdr is a plain C struct (pointers, lengths, flags; padding fields on some
        // C libraries, hence no literal) for which all-zero bytes are a valid value: no name,
        // no iovec, no control data.
        let mut headers: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        for ((header, iovec), address) in headers.iter_mut().zip(&mut iovecs).zip(addresses) {
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            if let Some(address) = address {
                header.msg_hdr.msg_name = address.as_ptr().cast_mut().cast();
                header.msg_hdr.msg_namelen = address.len();
            }
        }
        let count = libc::c_uint::try_from(datagrams.len()).unwrap_or(0);
        // SAFETY: the first `count` headers (count <= MAX_BATCH, the array's length) each point
        // to one iovec of `iovecs` and to an address of `self.addresses` or to none; every
        // iovec points into `self.bytes`. The kernel only reads through these pointers, and
        // writes each header's `msg_len`; all of them outlive the call, and nothing else
        // touches them during it (`self` is borrowed mutably).
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                headers.as_mut_ptr(),
                count,
                MsgFlags::MSG_DONTWAIT.bits(),
            )
        };
        usize::try_from(sent).map_err(|_| io::Error::last_os_error())
    }
}

fn socket_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    storage
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

impl AsFd for Datagram {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.io.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connected to leave the port's group, a wildcard socket took loopback as its source, and
    /// its answers to clients elsewhere (pods, hosts) failed while it drained.
    #[tokio::test]
    async fn a_wildcard_socket_keeps_its_wildcard_source() {
        let wildcard = Datagram::new(UdpSocket::bind("0.0.0.0:0").unwrap()).unwrap();
        assert!(!wildcard.stop_receiving().unwrap());
        assert!(wildcard.local_addr().unwrap().ip().is_unspecified());
        let specific = Datagram::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        assert!(specific.stop_receiving().unwrap());
        assert_eq!(
            specific.io.get_ref().peer_addr().unwrap(),
            specific.local_addr().unwrap()
        );
    }

    /// A batch of 60 KiB answers grew an outbox to 2 MiB, kept after it was sent.
    #[test]
    fn an_outbox_gives_back_what_a_batch_of_large_answers_took() {
        let mut outbox = Outbox::new(32);
        let large = vec![0u8; 60 * 1024];
        for _ in 0..32 {
            outbox.push(&large, None);
        }
        assert!(outbox.bytes.capacity() >= 32 * large.len());
        outbox.clear();
        assert!(outbox.bytes.capacity() <= 32 * KEPT_BYTES_PER_DATAGRAM);
        // Ordinary answers keep their room from batch to batch.
        for _ in 0..32 {
            outbox.push(&[0u8; 100], None);
        }
        let room = outbox.bytes.as_ptr();
        outbox.clear();
        outbox.push(&[0u8; 100], None);
        assert_eq!(outbox.bytes.as_ptr(), room);
    }

    #[tokio::test]
    async fn sends_and_receives() {
        let one = Datagram::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let two = Datagram::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let target = two.local_addr().unwrap();
        one.send_to(b"first", target).await.unwrap();
        one.try_send_to(b"second", target).unwrap();
        let mut inbox = Inbox::new(1, 16);
        for expected in [&b"first"[..], b"second"] {
            assert_eq!(two.recv_batch(&mut inbox).await.unwrap(), 1);
            let (packet, from) = inbox.get_mut(0).unwrap().unwrap();
            assert_eq!(packet, expected);
            assert_eq!(from, one.local_addr().unwrap());
        }
    }

    /// A port-unreachable for an earlier datagram made the next send fail with ECONNREFUSED,
    /// which the proxy took for that datagram's own failure: a healthy query got SERVFAIL for
    /// the moment its upstream had been down.
    #[tokio::test]
    async fn a_send_after_an_icmp_error_is_not_lost() {
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = closed.local_addr().unwrap();
        drop(closed);
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(target).unwrap();
        let sender = Datagram::new(socket).unwrap();
        let mut outbox = Outbox::new(4);
        outbox.push(b"into the void", None);
        assert!(sender.send_batch(&mut outbox).await.is_empty());
        // The port-unreachable comes back at once on loopback (a loaded machine given time).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let receiver = Datagram::new(UdpSocket::bind(target).unwrap()).unwrap();
        outbox.push(b"after", None);
        assert_eq!(sender.send_batch(&mut outbox).await, Vec::<usize>::new());
        let mut inbox = Inbox::new(4, 64);
        assert_eq!(receiver.recv_batch(&mut inbox).await.unwrap(), 1);
        assert_eq!(inbox.get_mut(0).unwrap().unwrap().0, b"after");
    }

    /// Only port, host and network unreachable were taken for an earlier datagram's report:
    /// after a protocol unreachable (or an ICMPv6 administratively prohibited, EACCES, as a
    /// firewall's reject sends), the next healthy query failed. Root only: the ICMP message
    /// is sent from a raw socket.
    #[tokio::test]
    async fn a_send_after_any_icmp_error_is_not_lost() {
        use socket2::{Domain, Protocol, Socket, Type};
        let Ok(raw) = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)) else {
            eprintln!("no raw socket (not root): skipped");
            return;
        };
        let receiver = Datagram::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let target = receiver.local_addr().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(target).unwrap();
        let source = socket.local_addr().unwrap();
        let sender = Datagram::new(socket).unwrap();

        // Protocol unreachable (type 3, code 2: a hard error, ENOPROTOOPT), quoting a datagram
        // of the sender's: its IP header and the first 8 bytes of its UDP header.
        let mut icmp = vec![3u8, 2, 0, 0, 0, 0, 0, 0];
        let mut quoted_ip = vec![0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0];
        quoted_ip.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
        icmp.extend_from_slice(&quoted_ip);
        icmp.extend_from_slice(&source.port().to_be_bytes());
        icmp.extend_from_slice(&target.port().to_be_bytes());
        icmp.extend_from_slice(&[0, 16, 0, 0]);
        let checksum = internet_checksum(&icmp);
        icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
        raw.send_to(&icmp, &SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        // Delivered at once on loopback (a loaded machine given time).
        tokio::time::sleep(Duration::from_millis(100)).await;

        let mut outbox = Outbox::new(4);
        outbox.push(b"after", None);
        assert_eq!(sender.send_batch(&mut outbox).await, Vec::<usize>::new());
        let mut inbox = Inbox::new(4, 64);
        assert_eq!(receiver.recv_batch(&mut inbox).await.unwrap(), 1);
        assert_eq!(inbox.get_mut(0).unwrap().unwrap().0, b"after");
    }

    /// RFC 1071's sum, for the ICMP message above.
    fn internet_checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !u16::try_from(sum).unwrap()
    }

    /// The 4 MiB asked for were capped at net.core.rmem_max without a word (212,992 bytes on
    /// a default node). Asked past the cap, a process with CAP_NET_ADMIN gets it all.
    #[test]
    fn the_receive_buffer_passes_rmem_max_when_it_may() {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt};
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        if setsockopt(&socket, sockopt::RcvBufForce, &MIN_RECEIVE_BUFFER).is_err() {
            eprintln!("no CAP_NET_ADMIN: skipped");
            return;
        }
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Past the cap, and within what the kernel takes (an int, doubled).
        let asked = rmem_max.saturating_mul(2).min(1 << 29);
        set_receive_buffer(&socket, asked);
        let doubled: usize = getsockopt(&socket, sockopt::RcvBuf).unwrap();
        assert!(doubled >= 2 * asked, "{doubled} for {asked}");
    }

    /// A budget shared out, within bounds whatever the number of sockets.
    #[test]
    fn receive_buffers_are_a_budget_shared_out() {
        assert_eq!(receive_buffer_share(LISTEN_BUFFERS, 2), 4 << 20);
        assert_eq!(receive_buffer_share(LISTEN_BUFFERS, 0), LISTEN_BUFFERS);
        // The most sockets the settings allow: 64 listeners, 2 × 1,024 pool sockets.
        assert!(64 * receive_buffer_share(LISTEN_BUFFERS, 64) <= LISTEN_BUFFERS);
        assert!(2048 * receive_buffer_share(POOL_BUFFERS, 2048) <= 4 * POOL_BUFFERS);
    }

    #[tokio::test]
    async fn batches_go_out_and_come_in_whole() {
        let sender = Datagram::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let receiver = Datagram::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let target = receiver.local_addr().unwrap();
        // More than one system call's worth, and one datagram too big for an inbox slot.
        let mut outbox = Outbox::new(4);
        for index in 0..10u8 {
            outbox.push(&[index; 8], target);
        }
        outbox.push(&[0xee; 100], target);
        outbox.push(b"to nowhere", SocketAddr::from(([127, 0, 0, 1], 0)));
        let failed = sender.send_batch(&mut outbox).await;
        assert_eq!(failed, vec![11], "port 0 is refused, the rest went out");
        assert!(outbox.is_empty());

        let mut inbox = Inbox::new(8, 64);
        let mut seen = Vec::new();
        while seen.len() < 11 {
            let count = receiver.recv_batch(&mut inbox).await.unwrap();
            assert!((1..=8).contains(&count));
            for index in 0..count {
                match inbox.get_mut(index).unwrap() {
                    Ok((packet, from)) => {
                        assert_eq!(from, sender.local_addr().unwrap());
                        seen.push(packet[0]);
                    }
                    Err(()) => seen.push(0xee),
                }
            }
            assert!(inbox.get_mut(count).is_none());
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xee]);
    }
}
