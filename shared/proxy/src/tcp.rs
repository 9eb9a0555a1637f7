//! DNS over TCP: one task per client connection, one per query on it (a client may pipeline
//! several), and a connection of its own to the upstream for each forwarded query. TCP is the
//! rare path (a retry after a truncated UDP answer), so it favours simplicity over speed, within
//! bounds a client cannot push: [`MAX_CONNECTIONS`] at once, of which one client address holds
//! at most [`CONNECTIONS_PER_CLIENT`], [`QUERIES_PER_CONNECTION`] in flight on each, and a
//! connection whose client stops reading its answers is closed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warden_telemetry::Verdict;

use crate::context::Transport;
use crate::engine::{Engine, Outcome};
use crate::upstream::{UpstreamFailure, exchange_tcp};
use crate::wire;

/// Client connections served at once; more wait in the kernel's accept queue.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// With fewer free connection slots than this, a connection waiting for its next query gives
/// its slot up after [`BUSY_IDLE`] rather than the idle timeout (RFC 7766 6.2.3: close idle
/// connections under pressure), so that silent clients cannot keep others' TCP retries in the
/// accept queue.
const BUSY_BELOW_FREE: usize = MAX_CONNECTIONS / 4;
const BUSY_IDLE: Duration = Duration::from_secs(1);
/// Connections one client address may hold at once: a client keeping hundreds open (a query
/// every few seconds keeps each) would otherwise leave every other client's TCP retries
/// waiting in the accept queue. Further ones are closed at once and counted.
pub(crate) const CONNECTIONS_PER_CLIENT: usize = MAX_CONNECTIONS / 8;

/// Connections held per client address.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

impl PerClient {
    /// One more connection for `client`, unless it holds its share already.
    fn admit(self: &Arc<Self>, client: IpAddr) -> Option<ClientSlot> {
        let mut held = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        let count = held.entry(client).or_default();
        if *count >= CONNECTIONS_PER_CLIENT {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            table: self.clone(),
            client,
        })
    }
}

/// A client's connection, counted until dropped.
struct ClientSlot {
    table: Arc<PerClient>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut held = self
            .table
            .0
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(count) = held.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.client);
            }
        }
    }
}
/// Queries of one connection in the proxy at once: a client pipelining more is held back by
/// TCP's own flow control instead of having the proxy hold (and forward) all it sends.
pub(crate) const QUERIES_PER_CONNECTION: usize = 16;
/// Answers waiting for the connection's writer.
const ANSWERS_QUEUED: usize = 32;
/// Exchanges with the upstream at once, per listener. Each is a connection of its own: clients
/// pipelining on every connection a listener takes would otherwise have it open sixteen
/// thousand (and run out of file descriptors); the rest wait, within the upstream timeout.
pub(crate) const UPSTREAM_EXCHANGES: usize = 256;
/// How long a connection closing at shutdown waits for its client to close too.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Accepts connections until `stop`.
pub(crate) async fn listener_loop(
    listener: TcpListener,
    engine: Arc<Engine>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let exchanges = Arc::new(Semaphore::new(UPSTREAM_EXCHANGES));
    let per_client = Arc::new(PerClient::default());
    loop {
        let admitted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            permit = connections.clone().acquire_owned() => permit,
        };
        let Ok(admitted) = admitted else {
            return;
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => {
                let Some(slot) = per_client.admit(client.ip()) else {
                    engine.tcp_refused();
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (engine, stop, queries) = (engine.clone(), stop.clone(), tracker.clone());
                let (exchanges, slots) = (exchanges.clone(), connections.clone());
                tracker.spawn(async move {
                    connection(stream, client, engine, exchanges, slots, stop, queries).await;
                    drop((slot, admitted));
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "DNS TCP accept error");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One read from `reader`, within `idle` of `started`, or [`BUSY_IDLE`] of it while the free
/// slots are few (checked at least once a [`BUSY_IDLE`]); `None` when the wait is over.
async fn read_some_within(
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    buffer: &mut [u8],
    started: tokio::time::Instant,
    idle: Duration,
    slots: &Semaphore,
) -> Option<std::io::Result<usize>> {
    loop {
        let left = wait_limit(idle, slots).saturating_sub(started.elapsed());
        if left.is_zero() {
            return None;
        }
        // A read cut short by its timeout has taken nothing: the next one gets what came.
        if let Ok(read) = tokio::time::timeout(left.min(BUSY_IDLE), reader.read(buffer)).await {
            return Some(read);
        }
    }
}

/// Fills `buffer` from `reader` within [`read_some_within`]'s wait; whether it is full.
async fn read_within(
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    buffer: &mut [u8],
    started: tokio::time::Instant,
    idle: Duration,
    slots: &Semaphore,
) -> bool {
    let mut filled = 0;
    while let Some(rest) = buffer.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match read_some_within(reader, rest, started, idle, slots).await {
            Some(Ok(read)) if read > 0 => filled += read,
            _ => return false,
        }
    }
    true
}

/// How long a connection may wait for a client: `idle`, or [`BUSY_IDLE`] while the free slots
/// are few.
fn wait_limit(idle: Duration, slots: &Semaphore) -> Duration {
    if slots.available_permits() < BUSY_BELOW_FREE {
        idle.min(BUSY_IDLE)
    } else {
        idle
    }
}

/// One client connection: queries are read in a loop and answered concurrently, at most
/// [`QUERIES_PER_CONNECTION`] at a time; answers are written by one writer in the order they
/// complete. A client that takes no answer for the idle timeout loses the connection.
async fn connection(
    stream: TcpStream,
    client: SocketAddr,
    engine: Arc<Engine>,
    exchanges: Arc<Semaphore>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let idle = engine.settings.tcp_idle_timeout;
    let (mut reader, mut writer) = stream.into_split();
    let (answers, mut outgoing) = mpsc::channel::<Vec<u8>>(ANSWERS_QUEUED);
    let writer_engine = engine.clone();
    let write_loop = tokio::spawn(async move {
        while let Some(answer) = outgoing.recv().await {
            let Ok(length) = u16::try_from(answer.len()) else {
                continue;
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&length.to_be_bytes());
            framed.extend_from_slice(&answer);
            match tokio::time::timeout(idle, writer.write_all(&framed)).await {
                Ok(Ok(())) => {}
                // Gone: the reader sees the channel close and stops too.
                Ok(Err(_)) => return,
                // Not reading: its socket's buffers full for the idle timeout.
                Err(_) => {
                    writer_engine.tcp_unread();
                    return;
                }
            }
        }
        let _ = writer.shutdown().await;
    });
    let in_flight = Arc::new(Semaphore::new(QUERIES_PER_CONNECTION));
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            () = answers.closed() => break,
            permit = in_flight.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else {
            break;
        };
        let mut prefix = [0u8; 2];
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            () = answers.closed() => break,
            first = read_some_within(&mut reader, &mut prefix, tokio::time::Instant::now(), idle, &slots) => first,
        };
        match first {
            Some(Ok(read)) if read > 0 => {}
            // Idle, closed by the client, or reset: nothing more to read.
            _ => break,
        }
        // The rest of the message within one deadline from its first byte: a byte now and
        // then must not hold a connection, least of all while the slots run short.
        let message_started = tokio::time::Instant::now();
        // Half a length prefix, then silence or the end: a broken client, counted as one
        // that stops inside a message.
        if matches!(first, Some(Ok(1))) {
            let second = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                second = read_within(&mut reader, &mut prefix[1..], message_started, idle, &slots) => second,
            };
            if !second {
                engine.malformed(Transport::Tcp);
                break;
            }
        }
        let length = usize::from(u16::from_be_bytes(prefix));
        // Held until its answer comes: at up to 64 KiB a query, a few clients' pipelines
        // would pin the process's memory. No real query comes near the bound (UDP's), and
        // what follows an unread message cannot be framed: the connection ends.
        if length > crate::udp::QUERY_SLOT {
            engine.malformed(Transport::Tcp);
            break;
        }
        let started = Instant::now();
        let mut packet = vec![0u8; length];
        let read = tokio::select! {
            biased;
            // Stopping: a client slow to send its query asks the peer again.
            _ = stop.cancelled() => break,
            read = read_within(&mut reader, &mut packet, message_started, idle, &slots) => read,
        };
        if !read {
            engine.malformed(Transport::Tcp);
            break;
        }
        let (engine, exchanges) = (engine.clone(), exchanges.clone());
        let answers = answers.clone();
        tracker.spawn(async move {
            if let Some(answer) = query(&engine, &exchanges, client, &packet, started).await {
                let _ = answers.send(answer).await;
            }
            drop(permit);
        });
    }
    drop(answers);
    let _ = write_loop.await;
    if stop.is_cancelled() {
        // The answers are written and the FIN queued; what the client sent meanwhile sits
        // unread, and closing over unread data resets the connection, which can discard
        // answers the client has not read yet. Read it away until the client closes too (a
        // resolver retries what went unanswered on a new connection, to the peer).
        let discard = async {
            let mut scratch = [0u8; 4096];
            while matches!(reader.read(&mut scratch).await, Ok(read) if read > 0) {}
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, discard).await;
    }
}

/// The whole life of one TCP query; `None` when the packet deserves no answer.
async fn query(
    engine: &Engine,
    exchanges: &Semaphore,
    client: SocketAddr,
    packet: &[u8],
    started: Instant,
) -> Option<Vec<u8>> {
    let mut query = match engine.read(packet, Transport::Tcp) {
        Ok(query) => query,
        Err(refusal) => return refusal,
    };
    let checked = engine.check(&mut query, client, Transport::Tcp, started);
    if !checked.allowed {
        return Some(engine.deny(&query, checked));
    }
    let servfail = || wire::error_response(&query, u16::from(ResponseCode::ServFail));
    let Some(_in_flight) = engine.admit() else {
        engine.finish(checked, Outcome::failed());
        return Some(servfail());
    };
    // One deadline for the wait for an exchange and the exchange: each with a timeout of its
    // own, a query took up to twice `upstream_timeout`, and outlived the drain at shutdown.
    let asked = checked.checked_at;
    let deadline = tokio::time::Instant::from_std(asked) + engine.settings.upstream_timeout;
    let exchange = tokio::time::timeout_at(deadline, exchanges.acquire());
    let Ok(Ok(_exchange)) = exchange.await else {
        engine.upstream_failed(UpstreamFailure::Exhausted, &checked);
        engine.finish(checked, Outcome::failed());
        return Some(servfail());
    };
    let exchanged = exchange_tcp(
        checked.server,
        packet,
        query.question.clone(),
        deadline.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await;
    let (mut reply, answer) = match exchanged {
        Ok(exchanged) => exchanged,
        Err(failure) => {
            // As over UDP: a query that never reached the upstream (no connection) did not
            // wait for it.
            if !matches!(failure, UpstreamFailure::Io) {
                engine.upstream_waited(asked);
            }
            engine.upstream_failed(failure, &checked);
            engine.finish(checked, Outcome::failed());
            return Some(servfail());
        }
    };
    let answered = engine.upstream_waited(asked);
    let (outcome, hold) = engine.record(&checked, answer, &mut reply, answered);
    if let Some(hold) = hold {
        engine.hold(hold).await;
    }
    let released = outcome.verdict != Verdict::Error;
    engine.finish(checked, outcome);
    Some(if released { reply } else { servfail() })
}
