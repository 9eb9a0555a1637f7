//! Forwarding to upstream servers.
//!
//! UDP queries share a small pool of sockets, each bound once to a kernel-chosen (random)
//! source port; a query gets a random ID unused on its socket and waits in that socket's
//! pending table, not in a task of its own. Half the pool is connected to the configured
//! upstream, where nearly every query goes: the kernel then routes once, not per packet, and
//! drops whatever another address sends to those ports. The other half, unconnected and dual
//! stack, carries queries to other servers (a client's original destination). The socket's receive loop claims an answer only
//! when it comes from the server asked, with the query's ID and the same question; anything
//! else is counted and dropped, and the query keeps waiting for the real answer, so a spoofed
//! packet cannot even cut a query short. A query still unanswered after a few of the
//! upstream's round trips is sent once more, the same bytes under the same ID, so a datagram
//! lost on the way (an upstream whose receive queue overflowed in a burst, a conntrack race)
//! costs the client a fraction of a second instead of its own retry after seconds; queries
//! whose deadline passes are taken out. Both by [`UpstreamPool::sweep`]. TCP queries (a client
//! retrying after TC) get a connection of their own for the exchange.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ProxyError;
use crate::datagram::{Datagram, POOL_BUFFERS, receive_buffer_share};
use crate::response::{packet_id, set_id};
use crate::wire::{self, Answer};

/// Largest DNS message over UDP (and over TCP, by its 16-bit length prefix).
pub const MAX_MESSAGE: usize = 65_535;

/// Tries at drawing an unused random ID on one socket before moving to the next socket.
const ID_DRAWS: usize = 8;

/// The earliest a query is sent again: an upstream answering from its cache in a millisecond
/// may take a hundred times that to resolve a name it does not hold, and a query sent twice
/// costs it twice.
pub const RETRANSMIT_MIN: Duration = Duration::from_millis(100);
/// When a query is sent again before any answer told how far the upstream is.
pub const RETRANSMIT_INITIAL: Duration = Duration::from_millis(250);
/// Doublings of the wait at most while copies go unanswered (16 times the estimate): past the
/// usual `upstream_timeout` then, so a slow upstream's queries stop going twice.
const MAX_BACKOFF: u32 = 4;

/// Why no answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    Timeout,
    Io,
    /// The server's reply could not be read or did not match the query.
    Malformed,
    /// Every ID of every pool socket is in use.
    Exhausted,
}

impl UpstreamFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Io => "io",
            UpstreamFailure::Malformed => "malformed",
            UpstreamFailure::Exhausted => "exhausted",
        }
    }
}

/// A query waiting in the pool: whatever its owner needs to finish it once answered (or not).
pub trait Waiter: Send + 'static {
    /// The question as sent (name, type, class, in wire form): an answer must repeat it.
    fn question(&self) -> &[u8];
    /// The query as forwarded but for its ID: what is sent again when no answer comes.
    fn packet(&self) -> &[u8];
}

struct Pending<W> {
    server: SocketAddr,
    deadline: Instant,
    /// When it was first sent, for the round-trip estimate.
    sent: Instant,
    /// When it is due to be sent again; `None` once it was, or if that would come after the
    /// deadline.
    resend_at: Option<Instant>,
    /// Sent twice: its answer's round trip is ambiguous (which copy does it answer?), so it
    /// tells the estimate nothing (Karn's rule).
    resent: bool,
    waiter: W,
}

/// The smoothed round trip of one pool socket's queries and its variation (RFC 6298's
/// estimator, in microseconds), which say when a query is late enough to be sent again, and
/// how many times that wait is doubled. The socket's answer loop writes it and listener loops
/// read it when they file, without a lock: a sample lost to a race moves the estimate a little
/// less, which is all an estimate needs. One per socket, not one per pool, so that the answer
/// loops on different threads do not write the same memory for every answer.
///
/// A copy's answer tells nothing (which copy does it answer?: Karn's rule), so were the
/// upstream to slow down past the wait, no answer would raise the estimate and every query
/// would go twice, to an upstream already struggling: each sweep that sends copies doubles
/// the wait instead (RFC 6298 §5.5), up to [`MAX_BACKOFF`] times, until an answer to a query
/// sent once says how far the upstream now is.
#[derive(Debug, Default)]
struct RoundTrip {
    smoothed_us: AtomicU64,
    variation_us: AtomicU64,
    backoff: AtomicU32,
}

impl RoundTrip {
    fn observe(&self, sample: Duration) {
        if self.backoff.load(Ordering::Relaxed) != 0 {
            self.backoff.store(0, Ordering::Relaxed);
        }
        let sample = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX).max(1);
        let smoothed = self.smoothed_us.load(Ordering::Relaxed);
        if smoothed == 0 {
            self.smoothed_us.store(sample, Ordering::Relaxed);
            self.variation_us.store(sample / 2, Ordering::Relaxed);
            return;
        }
        let variation = self.variation_us.load(Ordering::Relaxed);
        let deviation = smoothed.abs_diff(sample);
        self.variation_us
            .store((3 * variation + deviation) / 4, Ordering::Relaxed);
        self.smoothed_us
            .store((7 * smoothed + sample) / 8, Ordering::Relaxed);
    }

    /// How long a query waits for its answer before it is sent again.
    fn retransmit_after(&self) -> Duration {
        let smoothed = self.smoothed_us.load(Ordering::Relaxed);
        let estimate = if smoothed == 0 {
            RETRANSMIT_INITIAL
        } else {
            let variation = self.variation_us.load(Ordering::Relaxed);
            Duration::from_micros(smoothed.saturating_add(variation.saturating_mul(4)))
                .max(RETRANSMIT_MIN)
        };
        estimate * (1 << self.backoff.load(Ordering::Relaxed).min(MAX_BACKOFF))
    }

    /// Copies went unanswered for the wait: the next queries wait twice as long.
    fn back_off(&self) {
        let backoff = self.backoff.load(Ordering::Relaxed);
        self.backoff
            .store((backoff + 1).min(MAX_BACKOFF), Ordering::Relaxed);
    }
}

/// One socket of the pool and the queries waiting on it.
pub struct PoolSocket<W> {
    socket: Datagram,
    /// The server the socket is connected to, if it is.
    peer: Option<SocketAddr>,
    /// Dual-stack sockets reach IPv4 servers through IPv4-mapped addresses.
    dual_stack: bool,
    round_trip: RoundTrip,
    pending: Mutex<Table<W>>,
}

/// A pending table keyed by query ID.
type IdMap<V> = HashMap<u16, V, BuildHasherDefault<IdHasher>>;

/// The hash of a query ID. The tables' keys are IDs this proxy drew at random, never chosen by
/// a sender (an answer's ID is only looked up), so they need no keyed hash against collisions:
/// one multiply (Fibonacci hashing) by an odd constant keeps the low bits, which pick the
/// bucket, as uniform as the IDs and spreads them over the top seven, the tag each probe compares,
/// for a fraction of SipHash's cost, paid twice per query.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u16(&mut self, id: u16) {
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    // Only IDs are hashed here; any other key still hashes to something usable.
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
}

/// Queries remembered per socket after they leave the table: a slow upstream's answers come
/// within moments of the timeout.
const RETIRED_KEPT: usize = 512;

/// The queries waiting on a socket, and the last ones that left (answered, timed out,
/// cancelled) by ID and server: an answer to one of those is late, not a forgery. One lock for
/// both, which an answer takes once.
struct Table<W> {
    waiting: IdMap<Pending<W>>,
    retired: std::collections::VecDeque<(u16, SocketAddr)>,
    /// Queries sent twice and answered, until their deadline: the other copy's answer may
    /// still come, later than the last [`RETIRED_KEPT`] IDs go under load. Their IDs stay
    /// out of use meanwhile, so that answer can neither pass for a new query's nor be
    /// counted as a forgery.
    echoes: IdMap<(SocketAddr, Instant)>,
}

impl<W> Table<W> {
    fn new() -> Table<W> {
        Table {
            waiting: IdMap::default(),
            retired: std::collections::VecDeque::with_capacity(RETIRED_KEPT),
            echoes: IdMap::default(),
        }
    }

    /// The query under `id`, out of the table and remembered as retired.
    fn take(&mut self, id: u16) -> Option<Pending<W>> {
        let pending = self.waiting.remove(&id)?;
        if self.retired.len() >= RETIRED_KEPT {
            self.retired.pop_front();
        }
        self.retired.push_back((id, pending.server));
        Some(pending)
    }

    /// Whether `id` from `server` was a query of this socket that left the table lately.
    fn retired(&self, id: u16, server: SocketAddr) -> bool {
        self.retired.contains(&(id, server))
    }
}

impl<W> std::fmt::Debug for PoolSocket<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSocket")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl<W: Waiter> PoolSocket<W> {
    fn pending(&self) -> MutexGuard<'_, Table<W>> {
        self.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The socket, for sending queries and reading answers.
    pub fn datagram(&self) -> &Datagram {
        &self.socket
    }

    /// Where to send a query for `server` from this socket: nowhere to say for a connected
    /// socket; dual-stack sockets reach IPv4 servers through IPv4-mapped addresses.
    fn target(&self, server: SocketAddr) -> Option<SocketAddr> {
        if self.peer.is_some() {
            return None;
        }
        Some(match server {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port()))
            }
            other => other,
        })
    }

    /// Takes back a query registered under `id` (its send failed, say).
    pub fn cancel(&self, id: u16) -> Option<W> {
        self.pending().take(id).map(|pending| pending.waiter)
    }

    /// The query `packet` (from `from`) answers, with what the answer says; or why the packet
    /// answers none, as the `upstream_unexpected` reason (`late` for an answer to a query that
    /// timed out or was answered already, which a slow upstream sends, not a forger). Only a
    /// packet from the server asked, with the query's ID and question, ends the wait.
    /// `received_at` is when the packet's batch was read, for the round-trip estimate.
    pub fn claim(
        &self,
        from: SocketAddr,
        packet: &[u8],
        received_at: Instant,
    ) -> Result<(W, Answer), &'static str> {
        let from = canonical(from);
        let id = packet_id(packet).ok_or("short")?;
        let mut pending = self.pending();
        let Some(waiting) = pending.waiting.get(&id) else {
            if pending
                .echoes
                .get(&id)
                .is_some_and(|(server, _)| *server == from)
            {
                pending.echoes.remove(&id);
                return Err("late");
            }
            return Err(if pending.retired(id, from) {
                "late"
            } else {
                "id"
            });
        };
        // An ID is drawn again as soon as its query leaves: a slow server's answer to the one
        // before is late, not a forgery, though a new query waits under its ID.
        let late_or = |reason| {
            if pending.retired(id, from) {
                "late"
            } else {
                reason
            }
        };
        if waiting.server != from {
            return Err(late_or("source"));
        }
        let asked = waiting.waiter.question();
        let answer = match wire::parse_answer(packet, asked) {
            Ok(answer) => answer,
            Err(wire::WireError::QuestionMismatch) => return Err(late_or("question")),
            // A cut inside a record reads as short; anything else stays malformed.
            Err(wire::WireError::Short) => {
                wire::cut_short_answer(packet, asked).ok_or("malformed")?
            }
            Err(_) => return Err("malformed"),
        };
        let waiting = pending.take(id).ok_or("id")?;
        if waiting.resent {
            pending.echoes.insert(id, (from, waiting.deadline));
        } else {
            drop(pending);
            self.round_trip
                .observe(received_at.saturating_duration_since(waiting.sent));
        }
        Ok((waiting.waiter, answer))
    }

    /// When a query filed now for `deadline` is due to be sent again: not if its copy would
    /// not have the same wait for an answer before the deadline.
    fn resend_at(&self, now: Instant, deadline: Instant) -> Option<Instant> {
        let wait = self.round_trip.retransmit_after();
        Some(now + wait).filter(|at| *at + wait <= deadline)
    }
}

/// Where a query was filed: the pool socket's index, the ID, and the address to send it to from
/// that socket (`None`: the socket is connected to it).
pub type Filed = (usize, u16, Option<SocketAddr>);

/// Files `waiter`, sent `now`, in `pending` under a random unused ID, or gives it back after
/// [`ID_DRAWS`] draws found none.
fn file<W>(
    pending: &mut Table<W>,
    server: SocketAddr,
    (now, resend_at, deadline): (Instant, Option<Instant>, Instant),
    waiter: W,
) -> Result<u16, W> {
    for _ in 0..ID_DRAWS {
        let id: u16 = rand::random();
        if pending.echoes.contains_key(&id) {
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = pending.waiting.entry(id) {
            slot.insert(Pending {
                server,
                deadline,
                sent: now,
                resend_at,
                resent: false,
                waiter,
            });
            return Ok(id);
        }
    }
    Err(waiter)
}

/// The shared UDP sockets toward upstream servers and the queries waiting on them.
pub struct UpstreamPool<W> {
    /// The connected sockets first, then the unconnected ones.
    sockets: Vec<Arc<PoolSocket<W>>>,
    connected: usize,
    next: AtomicUsize,
}

impl<W> std::fmt::Debug for UpstreamPool<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("sockets", &self.sockets.len())
            .finish()
    }
}

impl<W: Waiter> UpstreamPool<W> {
    /// Opens `size` sockets connected to `upstream` and `size` unconnected ones (at least one
    /// of each). Their owner reads each socket's datagrams and hands them to
    /// [`PoolSocket::claim`]. An upstream that cannot be connected to now (no route yet, say)
    /// is reached through the unconnected sockets instead, as any other server is.
    pub fn open(size: usize, upstream: SocketAddr) -> Result<UpstreamPool<W>, ProxyError> {
        let size = size.max(1);
        let upstream = canonical(upstream);
        let receive_buffer = receive_buffer_share(POOL_BUFFERS, 2 * size);
        let mut sockets = Vec::with_capacity(2 * size);
        for _ in 0..size {
            match connected_socket(upstream, receive_buffer) {
                Ok(socket) => sockets.push(Arc::new(PoolSocket {
                    socket,
                    peer: Some(upstream),
                    dual_stack: false,
                    round_trip: RoundTrip::default(),
                    pending: Mutex::new(Table::new()),
                })),
                Err(error) => {
                    tracing::warn!(%upstream, %error, "cannot connect to the upstream; using unconnected sockets for it");
                    sockets.clear();
                    break;
                }
            }
        }
        let connected = sockets.len();
        // An unconnected socket's estimate mixes the other servers it asks (mostly one
        // resolver of the cluster's): a server farther off than the rest at worst gets a copy
        // of a query it was slow to answer, and then the wait backs off.
        for _ in 0..size {
            let socket = dual_stack_socket(receive_buffer).map_err(ProxyError::UpstreamSocket)?;
            let dual_stack = socket.local_addr().is_ok_and(|local| local.is_ipv6());
            sockets.push(Arc::new(PoolSocket {
                socket,
                peer: None,
                dual_stack,
                round_trip: RoundTrip::default(),
                pending: Mutex::new(Table::new()),
            }));
        }
        Ok(UpstreamPool {
            sockets,
            connected,
            next: AtomicUsize::new(0),
        })
    }

    pub fn sockets(&self) -> &[Arc<PoolSocket<W>>] {
        &self.sockets
    }

    /// The next turn, for [`UpstreamPool::register`]: queries read together leave together on
    /// one socket, in one system call, and their answers come back together on it; the
    /// sockets (and their ports) take turns, a listener loop keeping each for a run of batches.
    pub fn next_socket(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Files `waiter` until `deadline` under a random ID unused on the socket for `server`
    /// whose turn `turn` is (see [`UpstreamPool::next_socket`]), or on the next ones if it has
    /// none free: returns the socket's index, the ID, and the address to send the query to
    /// from that socket (`None`: the socket is connected to it). The waiter comes back when
    /// every socket for that server is out of IDs.
    pub fn register(
        &self,
        server: SocketAddr,
        deadline: Instant,
        mut waiter: W,
        turn: usize,
    ) -> Result<Filed, W> {
        let server = canonical(server);
        let group = self.group(server);
        let group_size = group.len().max(1);
        let now = Instant::now();
        for offset in 0..group.len() {
            let index = group.start + (turn + offset) % group_size;
            let Some(socket) = self.sockets.get(index) else {
                break;
            };
            let times = (now, socket.resend_at(now, deadline), deadline);
            match file(&mut socket.pending(), server, times, waiter) {
                Ok(id) => return Ok((index, id, socket.target(server))),
                Err(back) => waiter = back,
            }
        }
        Err(waiter)
    }

    /// [`UpstreamPool::register`] for a batch read together, each of `filings` a (tag,
    /// server, deadline, waiter), `filed` told of each by its tag. Consecutive queries for one
    /// socket, the usual batch, are filed under one hold of its table's lock instead of one
    /// each: the answer loop takes that lock too, from another thread, and its hand-over was
    /// about 1.5% of the proxy's samples under load. `filed` is told of a filed query with
    /// that lock held, so it must not call into the pool; the lock is released before it is
    /// told of a waiter that found no free ID.
    pub fn register_batch<T>(
        &self,
        turn: usize,
        filings: impl IntoIterator<Item = (T, SocketAddr, Instant, W)>,
        mut filed: impl FnMut(T, Result<Filed, W>),
    ) {
        let mut held: Option<(usize, MutexGuard<'_, Table<W>>)> = None;
        let now = Instant::now();
        for (tag, server, deadline, waiter) in filings {
            let server = canonical(server);
            let group = self.group(server);
            let index = group.start + turn % group.len().max(1);
            let Some(socket) = self.sockets.get(index) else {
                held = None;
                filed(tag, Err(waiter));
                continue;
            };
            let pending = match &mut held {
                Some((at, pending)) if *at == index => pending,
                _ => {
                    // One lock at a time, the held one released before the next is taken:
                    // two listener loops filing for two sockets in opposite orders would
                    // otherwise each hold the lock the other waits for.
                    held = None;
                    &mut held.insert((index, socket.pending())).1
                }
            };
            let times = (now, socket.resend_at(now, deadline), deadline);
            match file(pending, server, times, waiter) {
                Ok(id) => filed(tag, Ok((index, id, socket.target(server)))),
                Err(waiter) => {
                    held = None;
                    filed(tag, self.register(server, deadline, waiter, turn + 1));
                }
            }
        }
    }

    /// The sockets for `server`: the connected ones for the upstream they are connected to,
    /// the unconnected ones for any other.
    fn group(&self, server: SocketAddr) -> std::ops::Range<usize> {
        match self.sockets.first() {
            Some(first) if self.connected > 0 && first.peer == Some(server) => 0..self.connected,
            _ => self.connected..self.sockets.len(),
        }
    }

    /// Takes out every query whose deadline is at or before `now`, and hands `resend` each
    /// one due to be sent again (once: see [`RoundTrip`]) as (socket index, ID, the address to
    /// send it to from that socket, the waiter), with that socket's lock held: `resend` must
    /// not call into the pool.
    pub fn sweep(
        &self,
        now: Instant,
        mut resend: impl FnMut(usize, u16, Option<SocketAddr>, &W),
    ) -> Vec<W> {
        let mut expired = Vec::new();
        for (index, socket) in self.sockets.iter().enumerate() {
            let mut pending = socket.pending();
            if !pending.echoes.is_empty() {
                pending.echoes.retain(|_, (_, until)| *until > now);
            }
            let mut expiring = false;
            let mut resent = false;
            for (id, waiting) in &mut pending.waiting {
                if waiting.deadline <= now {
                    expiring = true;
                } else if waiting.resend_at.is_some_and(|at| at <= now) {
                    waiting.resend_at = None;
                    waiting.resent = true;
                    resent = true;
                    resend(index, *id, socket.target(waiting.server), &waiting.waiter);
                }
            }
            if resent {
                socket.round_trip.back_off();
            }
            if !expiring {
                continue;
            }
            let ids: Vec<u16> = pending
                .waiting
                .iter()
                .filter(|(_, waiting)| waiting.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(waiting) = pending.take(id) {
                    expired.push(waiting.waiter);
                }
            }
        }
        expired
    }

    /// Takes out every waiting query, whatever its deadline (shutdown).
    pub fn drain(&self) -> Vec<W> {
        self.sockets
            .iter()
            .flat_map(|socket| {
                socket
                    .pending()
                    .waiting
                    .drain()
                    .map(|(_, waiting)| waiting.waiter)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// One TCP exchange: connect, send the length-prefixed query with a random ID, read one answer
/// that must carry that ID and the question at `question` of `packet`. The answer comes back
/// with the client's ID.
pub async fn exchange_tcp(
    server: SocketAddr,
    packet: &[u8],
    question: std::ops::Range<usize>,
    timeout: Duration,
) -> Result<(Vec<u8>, Answer), UpstreamFailure> {
    let client_id = packet_id(packet).ok_or(UpstreamFailure::Malformed)?;
    let asked = packet.get(question).ok_or(UpstreamFailure::Malformed)?;
    let exchange = async {
        let mut stream = TcpStream::connect(server)
            .await
            .map_err(|_| UpstreamFailure::Io)?;
        let _ = stream.set_nodelay(true);
        let id: u16 = rand::random();
        let length = u16::try_from(packet.len()).map_err(|_| UpstreamFailure::Malformed)?;
        let mut outgoing = Vec::with_capacity(packet.len() + 2);
        outgoing.extend_from_slice(&length.to_be_bytes());
        outgoing.extend_from_slice(packet);
        set_id(&mut outgoing[2..], id);
        stream
            .write_all(&outgoing)
            .await
            .map_err(|_| UpstreamFailure::Io)?;
        let length = stream.read_u16().await.map_err(|_| UpstreamFailure::Io)?;
        let mut reply = vec![0u8; usize::from(length)];
        stream
            .read_exact(&mut reply)
            .await
            .map_err(|_| UpstreamFailure::Io)?;
        if packet_id(&reply) != Some(id) {
            return Err(UpstreamFailure::Malformed);
        }
        // The exchange is over and the connection used once: closed with a reset rather than
        // a FIN, it leaves no TIME_WAIT here. Each keeps its port for a minute, and past some
        // 470 TCP queries a second to one upstream the ephemeral ports ran out (off loopback,
        // where the kernel reuses none early): every TCP query then failed.
        let _ = stream.set_zero_linger();
        let answer = wire::parse_answer(&reply, asked).map_err(|_| UpstreamFailure::Malformed)?;
        Ok((reply, answer))
    };
    let (mut reply, answer) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| UpstreamFailure::Timeout)??;
    set_id(&mut reply, client_id);
    Ok((reply, answer))
}

/// A socket of the upstream's family, bound to a random port and connected to it.
fn connected_socket(upstream: SocketAddr, receive_buffer: usize) -> std::io::Result<Datagram> {
    let socket = Socket::new(
        Domain::for_address(upstream),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    socket.bind(&any.into())?;
    socket.connect(&upstream.into())?;
    crate::datagram::set_receive_buffer(&socket, receive_buffer);
    Datagram::new(socket.into())
}

/// A socket for IPv4 and IPv6 servers alike, falling back to IPv4 only on hosts without IPv6.
fn dual_stack_socket(receive_buffer: usize) -> std::io::Result<Datagram> {
    let socket = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
        Ok(socket) => {
            socket.set_only_v6(false)?;
            socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
            socket
        }
        Err(_) => {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            socket.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into())?;
            socket
        }
    };
    crate::datagram::set_receive_buffer(&socket, receive_buffer);
    Datagram::new(socket.into())
}

/// IPv4-mapped IPv6 addresses (what a dual-stack socket reports) back to plain IPv4.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, OpCode, Query};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::str::FromStr;

    /// The table picks a bucket by the hash's low bits and compares the top seven (its control
    /// bytes) in each probe: the IDs of a busy socket must spread over both, or every lookup
    /// would compare every key of a group.
    #[test]
    fn id_hashes_spread_over_the_high_bits() {
        use std::hash::BuildHasher;
        let hashes = BuildHasherDefault::<IdHasher>::default();
        let mut top_bits = std::collections::HashSet::new();
        let mut low_bits = std::collections::HashSet::new();
        for id in 0..512_u16 {
            let hash = hashes.hash_one(id);
            top_bits.insert(hash >> 57);
            low_bits.insert(hash & 511);
        }
        assert_eq!(top_bits.len(), 128, "every value of the top seven bits");
        assert_eq!(
            low_bits.len(),
            512,
            "512 IDs, 512 buckets of a 512-slot table"
        );
    }

    /// A question, and the query it came in.
    struct Asked(Vec<u8>, Vec<u8>);

    impl Waiter for Asked {
        fn question(&self) -> &[u8] {
            &self.0
        }

        fn packet(&self) -> &[u8] {
            &self.1
        }
    }

    fn query_packet(id: u16, name: &str) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = id;
        message.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        message.to_vec().unwrap()
    }

    /// A TCP exchange left its port in TIME_WAIT for a minute (the proxy closed first): at a
    /// few hundred TCP queries a second to one upstream, the ephemeral ports ran out.
    #[tokio::test]
    async fn a_tcp_exchange_leaves_no_time_wait() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        // A server as they are: answers, then closes once the client has.
        let upstream = tokio::spawn(async move {
            let (mut stream, peer) = listener.accept().await.unwrap();
            let length = stream.read_u16().await.unwrap();
            let mut query = vec![0u8; usize::from(length)];
            stream.read_exact(&mut query).await.unwrap();
            let id = u16::from_be_bytes([query[0], query[1]]);
            let answer = answer_packet("cilium.io.", id);
            let mut framed = u16::try_from(answer.len()).unwrap().to_be_bytes().to_vec();
            framed.extend_from_slice(&answer);
            stream.write_all(&framed).await.unwrap();
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
            peer
        });
        let packet = query_packet(7, "cilium.io.");
        let question = wire::parse_query(&packet).unwrap().question;
        let (reply, _) = exchange_tcp(server, &packet, question, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(packet_id(&reply), Some(7));
        let client = upstream.await.unwrap();
        // /proc/net/tcp: "sl local_address rem_address st ...", addresses as hex IP:port
        // (127.0.0.1 as 0100007F). The proxy's end, in any state (TIME_WAIT is 06).
        let (local, remote) = (
            format!("0100007F:{:04X}", client.port()),
            format!("0100007F:{:04X}", server.port()),
        );
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let lingering: Vec<&str> = table
            .lines()
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str())
            })
            .collect();
        assert!(lingering.is_empty(), "{lingering:?}");
    }

    fn waiter_for(packet: &[u8]) -> Asked {
        let query = wire::parse_query(packet).unwrap();
        Asked(packet[query.question.clone()].to_vec(), packet.to_vec())
    }

    fn answer_packet(name: &str, id: u16) -> Vec<u8> {
        let mut message = Message::response(id, OpCode::Query);
        message.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        message.add_answer(Record::from_rdata(
            Name::from_str(name).unwrap(),
            60,
            RData::A(hickory_proto::rr::rdata::A::new(198, 18, 1, 10)),
        ));
        message.to_vec().unwrap()
    }

    /// Files `query` for `server` and sends it the way the proxy does; returns the socket and ID.
    async fn forward(
        pool: &UpstreamPool<Asked>,
        server: SocketAddr,
        query: &[u8],
    ) -> (Arc<PoolSocket<Asked>>, u16, Option<SocketAddr>) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let Ok((index, id, target)) =
            pool.register(server, deadline, waiter_for(query), pool.next_socket())
        else {
            panic!("no ID free in an empty pool");
        };
        let socket = pool.sockets()[index].clone();
        let mut outbox = crate::datagram::Outbox::new(4);
        set_id(outbox.push(query, target), id);
        assert!(socket.datagram().send_batch(&mut outbox).await.is_empty());
        (socket, id, target)
    }

    /// A batch is filed as single queries are: the upstream's queries on the turn's connected
    /// socket, another server's on an unconnected one, each under its own ID, every filing
    /// reported under its tag; a socket out of IDs hands its queries to the next one.
    #[tokio::test]
    async fn a_batch_is_filed_as_its_queries_one_by_one_would_be() {
        let upstream: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let other: SocketAddr = "127.0.0.2:53".parse().unwrap();
        let pool = UpstreamPool::<Asked>::open(2, upstream).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let asked = waiter_for(&query_packet(1, "cilium.io."));
        let filings =
            [(0, upstream), (1, upstream), (2, other), (3, upstream)].map(|(tag, server)| {
                (
                    tag,
                    server,
                    deadline,
                    Asked(asked.0.clone(), asked.1.clone()),
                )
            });
        let mut filed = Vec::new();
        pool.register_batch(1, filings, |tag, result| {
            let Ok((index, id, target)) = result else {
                panic!("no ID free in an empty pool");
            };
            filed.push((tag, index, id, target));
        });
        let tags: Vec<_> = filed.iter().map(|(tag, ..)| *tag).collect();
        assert_eq!(tags, [0, 1, 2, 3]);
        for (tag, index, _, target) in &filed {
            if *tag == 2 {
                // A dual-stack socket's target is the v4-mapped address.
                let target = target.map(|t| SocketAddr::new(t.ip().to_canonical(), t.port()));
                assert_eq!((*index, target), (3, Some(other)), "unconnected, turn 1");
            } else {
                assert_eq!((*index, *target), (1, None), "connected, turn 1");
            }
        }
        let mut ids: Vec<_> = filed
            .iter()
            .map(|(_, index, id, _)| (*index, *id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 4, "an ID is never given twice on a socket");

        // Socket 1 out of IDs: the batch goes to socket 0, the next of its group.
        {
            let mut pending = pool.sockets()[1].pending();
            for id in 0..=u16::MAX {
                pending.waiting.entry(id).or_insert(Pending {
                    server: upstream,
                    deadline,
                    sent: Instant::now(),
                    resend_at: None,
                    resent: false,
                    waiter: Asked(asked.0.clone(), asked.1.clone()),
                });
            }
        }
        let mut moved = Vec::new();
        pool.register_batch(
            1,
            [(
                (),
                upstream,
                deadline,
                Asked(asked.0.clone(), asked.1.clone()),
            )],
            |_, result| {
                moved.push(result.map(|(index, _, _)| index).ok());
            },
        );
        assert_eq!(moved, [Some(0)]);
    }

    /// Listener loops file their batches from two threads, and a batch may mix servers (each
    /// query goes to the server its client asked): moving from one socket's lock to the next,
    /// the filing took the next before it let go of the first, so two batches in opposite
    /// orders could each hold the lock the other waited for, and the runtime stopped.
    #[tokio::test]
    async fn batches_filing_in_opposite_orders_never_wait_on_each_other() {
        let upstream: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let other: SocketAddr = "127.0.0.2:53".parse().unwrap();
        let pool = Arc::new(UpstreamPool::<Asked>::open(1, upstream).unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        let query = query_packet(1, "cilium.io.");
        let (done, finished) = std::sync::mpsc::channel();
        for order in [[upstream, other], [other, upstream]] {
            let (pool, done, query) = (pool.clone(), done.clone(), query.clone());
            std::thread::spawn(move || {
                for _ in 0..2_000 {
                    let batch = order.map(|server| ((), server, deadline, waiter_for(&query)));
                    pool.register_batch(0, batch, |(), filed| assert!(filed.is_ok()));
                }
                let _ = done.send(());
            });
        }
        for _ in 0..2 {
            assert!(
                finished.recv_timeout(Duration::from_secs(30)).is_ok(),
                "two batches filing in opposite orders waited on each other for good"
            );
        }
    }

    #[tokio::test]
    async fn only_the_real_answer_is_claimed() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let spoofer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let server_addr = server.local_addr().unwrap();
        let pool = UpstreamPool::<Asked>::open(2, server_addr).unwrap();
        let query = query_packet(4242, "cilium.io.");
        let (socket, id, target) = forward(&pool, server_addr, &query).await;
        assert_eq!(target, None, "the configured upstream is reached connected");
        let mut buffer = vec![0u8; 512];
        let (length, _) = server.recv_from(&mut buffer).await.unwrap();
        assert_eq!(packet_id(&buffer[..length]), Some(id));

        // A stranger guessing the ID, the server with a wrong ID, the server with another
        // question, a server reply too short to be DNS: all refused, the query still waits.
        let real = answer_packet("cilium.io.", id);
        assert_eq!(
            socket.claim(spoofer, &real, Instant::now()).err(),
            Some("source")
        );
        assert_eq!(
            socket
                .claim(
                    server_addr,
                    &answer_packet("cilium.io.", id.wrapping_add(1)),
                    Instant::now()
                )
                .err(),
            Some("id")
        );
        assert_eq!(
            socket
                .claim(
                    server_addr,
                    &answer_packet("evil.example.", id),
                    Instant::now()
                )
                .err(),
            Some("question")
        );
        assert_eq!(
            socket.claim(server_addr, &real[..5], Instant::now()).err(),
            Some("short")
        );
        assert_eq!(
            socket.claim(server_addr, &real[..20], Instant::now()).err(),
            Some("malformed")
        );
        let (_, answer) = socket.claim(server_addr, &real, Instant::now()).unwrap();
        assert_eq!(answer.summary.ips.len(), 1);
        assert_eq!(
            socket.claim(server_addr, &real, Instant::now()).err(),
            Some("late"),
            "an answer is claimed once; a repeat is late, not a forgery"
        );
    }

    #[tokio::test]
    async fn other_servers_are_reached_unconnected_and_answer_there() {
        let configured: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let pool = UpstreamPool::<Asked>::open(2, configured).unwrap();
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let query = query_packet(7, "cilium.io.");
        let (socket, id, target) = forward(&pool, server_addr, &query).await;
        assert!(target.is_some());
        let mut buffer = vec![0u8; 512];
        let (length, proxy) = server.recv_from(&mut buffer).await.unwrap();
        assert_eq!(packet_id(&buffer[..length]), Some(id));
        server
            .send_to(&answer_packet("cilium.io.", id), proxy)
            .await
            .unwrap();
        let mut inbox = crate::datagram::Inbox::new(4, 512);
        assert_eq!(socket.datagram().recv_batch(&mut inbox).await.unwrap(), 1);
        let (packet, from) = inbox.get_mut(0).unwrap().unwrap();
        let (_, answer) = socket.claim(from, packet, Instant::now()).unwrap();
        assert_eq!(answer.summary.ips.len(), 1);
    }

    #[tokio::test]
    async fn an_upstream_that_refuses_a_connect_is_asked_unconnected() {
        // A UDP socket without SO_BROADCAST may not connect to the broadcast address (EACCES):
        // the pool still opens, and queries for that server use the unconnected sockets.
        let refused: SocketAddr = "255.255.255.255:53".parse().unwrap();
        let pool = UpstreamPool::<Asked>::open(2, refused).unwrap();
        assert_eq!(pool.connected, 0);
        assert_eq!(pool.sockets().len(), 2);
        let query = query_packet(1, "cilium.io.");
        let deadline = Instant::now() + Duration::from_secs(1);
        let Ok((_, _, target)) = pool.register(refused, deadline, waiter_for(&query), 0) else {
            panic!("no socket for the upstream");
        };
        assert!(
            target.is_some(),
            "sent with an address, not on a connected socket"
        );
    }

    #[tokio::test]
    async fn deadlines_sweep_queries_out() {
        let server: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let pool = UpstreamPool::<Asked>::open(1, server).unwrap();
        let now = Instant::now();
        let query = query_packet(1, "cilium.io.");
        for seconds in [1, 2, 3] {
            assert!(
                pool.register(
                    server,
                    now + Duration::from_secs(seconds),
                    waiter_for(&query),
                    0,
                )
                .is_ok()
            );
        }
        let never_resent = |_: usize, _: u16, _: Option<SocketAddr>, _: &Asked| {};
        assert!(pool.sweep(now, never_resent).is_empty());
        assert_eq!(
            pool.sweep(now + Duration::from_secs(2), never_resent).len(),
            2
        );
        assert_eq!(pool.drain().len(), 1);
        assert!(pool.drain().is_empty());
    }

    /// (socket index, ID, target) of the queries a sweep at `at` sends again.
    fn resent_at(pool: &UpstreamPool<Asked>, at: Instant) -> Vec<(usize, u16, Option<SocketAddr>)> {
        let mut resent = Vec::new();
        let expired = pool.sweep(at, |index, id, target, waiter| {
            assert_eq!(packet_id(waiter.packet()), Some(4242), "the client's query");
            resent.push((index, id, target));
        });
        assert!(expired.is_empty());
        resent
    }

    /// Files a query for `server` (ID 4242 as the client sent it) until `deadline`.
    fn file_query(pool: &UpstreamPool<Asked>, server: SocketAddr, deadline: Instant) -> Filed {
        let query = query_packet(4242, "cilium.io.");
        let Ok(filed) = pool.register(server, deadline, waiter_for(&query), 0) else {
            panic!("no ID free in an empty pool");
        };
        filed
    }

    /// A query unanswered for a few round trips goes once more under its ID: its first copy
    /// may be lost, and the client would wait for its own retry (5 s with glibc's defaults).
    #[tokio::test]
    async fn a_late_query_is_sent_again_once_under_its_id() {
        let server: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let pool = UpstreamPool::<Asked>::open(1, server).unwrap();
        let filed_at = Instant::now();
        let (index, id, _) = file_query(&pool, server, filed_at + Duration::from_secs(2));
        // Filed between `filed_at` and `filed_by`, however long a loaded machine held this.
        let filed_by = Instant::now();
        assert!(resent_at(&pool, filed_at + RETRANSMIT_INITIAL / 2).is_empty());
        let due = filed_by + RETRANSMIT_INITIAL + Duration::from_millis(100);
        assert_eq!(resent_at(&pool, due), [(index, id, None)], "connected");
        assert!(
            resent_at(&pool, due + Duration::from_secs(1)).is_empty(),
            "once"
        );

        // The copies' sweep doubled the wait.
        assert_eq!(
            pool.sockets()[index].round_trip.retransmit_after(),
            2 * RETRANSMIT_INITIAL
        );

        // Another server's query goes again from an unconnected socket, to its address
        // (v4-mapped on a dual-stack socket).
        let other: SocketAddr = "127.0.0.2:53".parse().unwrap();
        let filed_at = Instant::now();
        let (index, id, target) = file_query(&pool, other, filed_at + Duration::from_secs(2));
        let filed_by = Instant::now();
        assert!(target.is_some());
        let due = filed_by + RETRANSMIT_INITIAL + Duration::from_millis(100);
        assert_eq!(resent_at(&pool, due), [(index, id, target)]);

        // One whose copy would have less than the wait before the deadline goes once.
        file_query(&pool, server, Instant::now() + RETRANSMIT_INITIAL * 3);
        assert!(resent_at(&pool, Instant::now() + RETRANSMIT_INITIAL * 2).is_empty());
    }

    /// A server that never answers, a pool in front of it, and a query forwarded there and sent
    /// again a second later: the server (to keep), its address, the pool, the query's socket
    /// and ID.
    async fn a_query_sent_twice() -> (
        tokio::net::UdpSocket,
        SocketAddr,
        UpstreamPool<Asked>,
        Arc<PoolSocket<Asked>>,
        u16,
    ) {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let pool = UpstreamPool::<Asked>::open(1, server_addr).unwrap();
        let query = query_packet(4242, "cilium.io.");
        let (socket, id, _) = forward(&pool, server_addr, &query).await;
        assert_eq!(
            resent_at(&pool, Instant::now() + Duration::from_secs(1)).len(),
            1
        );
        (server, server_addr, pool, socket, id)
    }

    /// A timed-out query's ID drawn again at once for a new one: the slow server's answer to
    /// the first found the second waiting and was counted as a forgery (`question`).
    #[tokio::test]
    async fn an_answer_to_a_retired_query_under_a_new_ones_id_is_late() {
        let server: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let pool = UpstreamPool::<Asked>::open(1, server).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let register = |name: &str| {
            let query = query_packet(7, name);
            let Ok((index, id, _)) = pool.register(server, deadline, waiter_for(&query), 0) else {
                panic!("no ID free in an empty pool");
            };
            (pool.sockets()[index].clone(), id)
        };
        let (socket, old) = register("cilium.io.");
        assert!(socket.cancel(old).is_some(), "timed out");
        let (_, new) = register("google.com.");
        {
            let mut table = socket.pending();
            let waiting = table.waiting.remove(&new).unwrap();
            table.waiting.insert(old, waiting);
        }
        let late = answer_packet("cilium.io.", old);
        assert_eq!(
            socket.claim(server, &late, Instant::now()).err(),
            Some("late")
        );
        // From a server the retired query did not ask, it is still a forgery.
        let other: SocketAddr = "127.0.0.2:53".parse().unwrap();
        assert_eq!(
            socket.claim(other, &late, Instant::now()).err(),
            Some("source")
        );
        assert!(socket.cancel(old).is_some(), "the new query still waits");
    }

    /// The answer to a query's other copy, after the first was claimed, is late, however many
    /// queries came and went meanwhile, and its ID is not given to a new query until then.
    #[tokio::test]
    async fn the_answer_to_the_other_copy_is_late() {
        let (_server, server_addr, pool, socket, id) = a_query_sent_twice().await;
        let query = query_packet(4242, "cilium.io.");
        let answer = answer_packet("cilium.io.", id);
        socket.claim(server_addr, &answer, Instant::now()).unwrap();
        // More queries answered than the socket remembers.
        for _ in 0..2 * RETIRED_KEPT {
            let (socket, other_id, _) = forward(&pool, server_addr, &query).await;
            assert_ne!(other_id, id, "the ID stays out of use");
            socket
                .claim(
                    server_addr,
                    &answer_packet("cilium.io.", other_id),
                    Instant::now(),
                )
                .unwrap();
        }
        assert_eq!(
            socket.claim(server_addr, &answer, Instant::now()).err(),
            Some("late")
        );
    }

    /// The wait before a query goes again follows the upstream's round trips, not below
    /// [`RETRANSMIT_MIN`]; an answer to a query sent twice does not move it.
    #[tokio::test]
    async fn the_wait_before_sending_again_follows_the_round_trip() {
        let round_trip = RoundTrip::default();
        assert_eq!(round_trip.retransmit_after(), RETRANSMIT_INITIAL);
        for _ in 0..20 {
            round_trip.observe(Duration::from_millis(1));
        }
        assert_eq!(round_trip.retransmit_after(), RETRANSMIT_MIN);
        for _ in 0..40 {
            round_trip.observe(Duration::from_millis(400));
        }
        let slow = round_trip.retransmit_after();
        assert!(
            slow >= Duration::from_millis(400) && slow < Duration::from_millis(600),
            "{slow:?}"
        );

        let (_server, server_addr, pool, socket, id) = a_query_sent_twice().await;
        let query = query_packet(4242, "cilium.io.");
        socket
            .claim(
                server_addr,
                &answer_packet("cilium.io.", id),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(
            socket.round_trip.retransmit_after(),
            2 * RETRANSMIT_INITIAL,
            "no sample from a query sent twice; the wait doubled"
        );
        let (socket, id, _) = forward(&pool, server_addr, &query).await;
        socket
            .claim(
                server_addr,
                &answer_packet("cilium.io.", id),
                Instant::now(),
            )
            .unwrap();
        assert!(
            socket.round_trip.retransmit_after() < RETRANSMIT_INITIAL,
            "a query sent once is a sample, and ends the backoff"
        );
    }

    /// Copies going unanswered double the wait, at most [`MAX_BACKOFF`] times: an upstream
    /// slower than the wait would otherwise get every query twice for good.
    #[test]
    fn unanswered_copies_back_off_until_an_answer() {
        let round_trip = RoundTrip::default();
        for _ in 0..20 {
            round_trip.observe(Duration::from_millis(1));
        }
        round_trip.back_off();
        assert_eq!(round_trip.retransmit_after(), 2 * RETRANSMIT_MIN);
        for _ in 0..10 {
            round_trip.back_off();
        }
        assert_eq!(
            round_trip.retransmit_after(),
            (1 << MAX_BACKOFF) * RETRANSMIT_MIN
        );
        round_trip.observe(Duration::from_millis(1));
        assert_eq!(round_trip.retransmit_after(), RETRANSMIT_MIN);
    }

    #[tokio::test]
    async fn a_full_socket_hands_the_waiter_back() {
        let server: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let pool = UpstreamPool::<Asked>::open(1, server).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let query = query_packet(1, "cilium.io.");
        let mut registered = 0;
        for _ in 0..70_000 {
            match pool.register(server, deadline, waiter_for(&query), 0) {
                Ok(_) => registered += 1,
                Err(_) => break,
            }
        }
        // Random draws stop finding free IDs somewhat before all 65,536 are taken.
        assert!(registered > 10_000 && registered <= 65_536, "{registered}");
    }
}
