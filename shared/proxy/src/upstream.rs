//! Forwarding to upstream servers.
//!
//! UDP queries share a small pool of sockets, each bound once to a kernel-chosen (random)
//! source port; a query gets a random ID unused on its socket. One receive task per socket
//! accepts an answer only when it comes from the server asked, with the query's ID and the
//! same question; anything else is counted and dropped, and the query keeps waiting for the
//! real answer, so a spoofed packet cannot even cut a query short. TCP queries (a client retrying
//! after TC) get a connection of their own for the exchange.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use warden_telemetry::Metrics;

use crate::ProxyError;
use crate::response::{packet_id, set_id};

/// Largest DNS message over UDP (and over TCP, by its 16-bit length prefix).
pub const MAX_MESSAGE: usize = 65_535;

/// Tries at drawing an unused random ID on one socket before moving to the next socket.
const ID_DRAWS: usize = 8;

/// An upstream answer: the packet as the server sent it, and its decoded form.
#[derive(Debug)]
pub struct UpstreamAnswer {
    pub packet: Vec<u8>,
    pub message: Message,
}

/// Why no answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    Timeout,
    Io,
    /// The server's reply could not be decoded or did not match the query.
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

struct Pending {
    server: SocketAddr,
    question: Query,
    reply: oneshot::Sender<UpstreamAnswer>,
}

struct PoolSocket {
    socket: UdpSocket,
    /// Dual-stack sockets reach IPv4 servers through IPv4-mapped addresses.
    dual_stack: bool,
    pending: Mutex<HashMap<u16, Pending>>,
}

impl PoolSocket {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The shared UDP sockets toward upstream servers.
pub struct UpstreamPool {
    sockets: Vec<Arc<PoolSocket>>,
    next: AtomicUsize,
    metrics: Metrics,
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("sockets", &self.sockets.len())
            .finish()
    }
}

impl UpstreamPool {
    /// Opens `size` sockets and starts their receive tasks, which end with `shutdown`.
    pub fn start(
        size: usize,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Arc<UpstreamPool>, ProxyError> {
        let mut sockets = Vec::with_capacity(size);
        for _ in 0..size.max(1) {
            let socket = dual_stack_socket().map_err(ProxyError::UpstreamSocket)?;
            let dual_stack = socket.local_addr().is_ok_and(|local| local.is_ipv6());
            let socket = Arc::new(PoolSocket {
                socket,
                dual_stack,
                pending: Mutex::new(HashMap::new()),
            });
            tokio::spawn(receive_answers(
                socket.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
            sockets.push(socket);
        }
        Ok(Arc::new(UpstreamPool {
            sockets,
            next: AtomicUsize::new(0),
            metrics,
        }))
    }

    /// Sends `packet` (a query whose ID will be replaced) to `server` and waits for the
    /// matching answer, which comes back with the query's original ID.
    pub async fn exchange_udp(
        &self,
        server: SocketAddr,
        question: &Query,
        packet: &[u8],
        timeout: Duration,
    ) -> Result<UpstreamAnswer, UpstreamFailure> {
        let client_id = packet_id(packet).ok_or(UpstreamFailure::Malformed)?;
        let server = canonical(server);
        let (socket, id, receiver) = self.register(server, question)?;
        let _cleanup = PendingGuard {
            socket: &socket,
            id,
        };
        let mut outgoing = packet.to_vec();
        set_id(&mut outgoing, id);
        let target = match server {
            SocketAddr::V4(v4) if socket.dual_stack => {
                SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port()))
            }
            other => other,
        };
        if let Err(error) = socket.socket.send_to(&outgoing, target).await {
            tracing::debug!(%server, %error, "cannot send to upstream");
            return Err(UpstreamFailure::Io);
        }
        let mut answer = match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => return Err(UpstreamFailure::Io),
            Err(_) => return Err(UpstreamFailure::Timeout),
        };
        set_id(&mut answer.packet, client_id);
        answer.message.metadata.id = client_id;
        Ok(answer)
    }

    fn register(
        &self,
        server: SocketAddr,
        question: &Query,
    ) -> Result<(Arc<PoolSocket>, u16, oneshot::Receiver<UpstreamAnswer>), UpstreamFailure> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for offset in 0..self.sockets.len() {
            let socket = &self.sockets[(start + offset) % self.sockets.len()];
            let mut pending = socket.pending();
            for _ in 0..ID_DRAWS {
                let id: u16 = rand::random();
                if let std::collections::hash_map::Entry::Vacant(slot) = pending.entry(id) {
                    let (reply, receiver) = oneshot::channel();
                    slot.insert(Pending {
                        server,
                        question: question.clone(),
                        reply,
                    });
                    return Ok((socket.clone(), id, receiver));
                }
            }
        }
        self.metrics
            .dns
            .upstream_errors
            .with_label_values(&["exhausted"])
            .inc();
        Err(UpstreamFailure::Exhausted)
    }
}

/// Removes a query's pending entry however its wait ends (answer, timeout, cancellation).
struct PendingGuard<'a> {
    socket: &'a PoolSocket,
    id: u16,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.socket.pending().remove(&self.id);
    }
}

async fn receive_answers(socket: Arc<PoolSocket>, metrics: Metrics, shutdown: CancellationToken) {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let unexpected = |reason: &str| {
        metrics
            .dns
            .upstream_unexpected
            .with_label_values(&[reason])
            .inc();
    };
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = socket.socket.recv_from(&mut buffer) => received,
        };
        let (length, from) = match received {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors from earlier sends surface here; they concern no one query.
                tracing::trace!(%error, "upstream socket receive error");
                continue;
            }
        };
        let from = canonical(from);
        let packet = &buffer[..length];
        let Some(id) = packet_id(packet) else {
            unexpected("short");
            continue;
        };
        let expected = socket.pending().get(&id).map(|pending| pending.server);
        match expected {
            None => {
                unexpected("id");
                continue;
            }
            Some(server) if server != from => {
                unexpected("source");
                continue;
            }
            Some(_) => {}
        }
        let message = match Message::from_vec(packet) {
            Ok(message) if message.metadata.message_type == MessageType::Response => message,
            _ => {
                unexpected("malformed");
                continue;
            }
        };
        let mut pending = socket.pending();
        let matches = pending.get(&id).is_some_and(|waiting| {
            waiting.server == from && message.queries.first() == Some(&waiting.question)
        });
        if !matches {
            drop(pending);
            unexpected("question");
            continue;
        }
        if let Some(waiting) = pending.remove(&id) {
            drop(pending);
            // The waiter may have timed out in between; then the answer is simply dropped.
            let _ = waiting.reply.send(UpstreamAnswer {
                packet: packet.to_vec(),
                message,
            });
        }
    }
}

/// One TCP exchange: connect, send the length-prefixed query with a random ID, read one answer
/// that must carry that ID and the same question.
pub async fn exchange_tcp(
    server: SocketAddr,
    question: &Query,
    packet: &[u8],
    timeout: Duration,
) -> Result<UpstreamAnswer, UpstreamFailure> {
    let client_id = packet_id(packet).ok_or(UpstreamFailure::Malformed)?;
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
        let mut answer = vec![0u8; usize::from(length)];
        stream
            .read_exact(&mut answer)
            .await
            .map_err(|_| UpstreamFailure::Io)?;
        let message = Message::from_vec(&answer).map_err(|_| UpstreamFailure::Malformed)?;
        if message.metadata.id != id
            || message.metadata.message_type != MessageType::Response
            || message.queries.first() != Some(question)
        {
            return Err(UpstreamFailure::Malformed);
        }
        Ok(UpstreamAnswer {
            packet: answer,
            message,
        })
    };
    let mut answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| UpstreamFailure::Timeout)??;
    set_id(&mut answer.packet, client_id);
    answer.message.metadata.id = client_id;
    Ok(answer)
}

/// A socket for IPv4 and IPv6 servers alike, falling back to IPv4 only on hosts without IPv6.
fn dual_stack_socket() -> std::io::Result<UdpSocket> {
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
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// IPv4-mapped IPv6 addresses (what a dual-stack socket reports) back to plain IPv4.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::OpCode;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::str::FromStr;

    fn question(name: &str) -> Query {
        Query::query(Name::from_str(name).unwrap(), RecordType::A)
    }

    fn query_packet(id: u16, name: &str) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = id;
        message.add_query(question(name));
        message.to_vec().unwrap()
    }

    fn answer_to(query: &[u8], name: &str, id: u16) -> Vec<u8> {
        let mut message = Message::response(id, OpCode::Query);
        message.add_query(question(name));
        let parsed = Message::from_vec(query).unwrap();
        assert_eq!(parsed.queries.len(), 1);
        message.add_answer(Record::from_rdata(
            Name::from_str(name).unwrap(),
            60,
            RData::A(hickory_proto::rr::rdata::A::new(198, 18, 1, 10)),
        ));
        message.to_vec().unwrap()
    }

    #[tokio::test]
    async fn only_the_real_answer_is_accepted() {
        let metrics = Metrics::new("test").unwrap();
        let shutdown = CancellationToken::new();
        let pool = UpstreamPool::start(2, metrics.clone(), shutdown.clone()).unwrap();
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let spoofer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();

        let answered = tokio::spawn(async move {
            let mut buffer = vec![0u8; 512];
            let (length, proxy) = server.recv_from(&mut buffer).await.unwrap();
            let query = buffer[..length].to_vec();
            let id = packet_id(&query).unwrap();
            // A stranger guessing the ID, the server with a wrong ID, the server with another
            // question: all ignored. Then the real answer.
            spoofer
                .send_to(&answer_to(&query, "cilium.io.", id), proxy)
                .await
                .unwrap();
            let wrong_id = id.wrapping_add(1);
            server
                .send_to(&answer_to(&query, "cilium.io.", wrong_id), proxy)
                .await
                .unwrap();
            server
                .send_to(&answer_to(&query, "evil.example.", id), proxy)
                .await
                .unwrap();
            server
                .send_to(&answer_to(&query, "cilium.io.", id), proxy)
                .await
                .unwrap();
            id
        });
        let answer = pool
            .exchange_udp(
                server_addr,
                &question("cilium.io."),
                &query_packet(4242, "cilium.io."),
                Duration::from_secs(2),
            )
            .await
            .unwrap();
        let upstream_id = answered.await.unwrap();
        assert_ne!(upstream_id, 4242, "upstream sees a random ID");
        assert_eq!(
            packet_id(&answer.packet),
            Some(4242),
            "the client's ID is restored"
        );
        assert_eq!(answer.message.answers.len(), 1);
        let unexpected = |reason: &str| {
            metrics
                .dns
                .upstream_unexpected
                .with_label_values(&[reason])
                .get()
        };
        assert_eq!(unexpected("source"), 1);
        assert_eq!(unexpected("question"), 1);
        // The wrong ID may land on a pending query of another socket or none: counted as "id".
        assert_eq!(unexpected("id"), 1);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn silence_is_a_timeout() {
        let shutdown = CancellationToken::new();
        let pool = UpstreamPool::start(1, Metrics::new("test").unwrap(), shutdown.clone()).unwrap();
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let result = pool
            .exchange_udp(
                silent.local_addr().unwrap(),
                &question("cilium.io."),
                &query_packet(1, "cilium.io."),
                Duration::from_millis(100),
            )
            .await;
        assert_eq!(result.unwrap_err(), UpstreamFailure::Timeout);
        shutdown.cancel();
    }
}
