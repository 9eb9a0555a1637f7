//! The proxy itself: listener loops, the per-query pipeline, and graceful shutdown.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use prometheus::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warden_policy::{DnsName, PolicyRepository};
use warden_telemetry::{DnsFlow, FlowEvent, Scope, Verdict, unix_millis};

use crate::ProxyError;
use crate::answer::{AnswerSummary, normalized, summarize};
use crate::context::{AllowRequest, Mapping, ProxyContext, Transport, UNKNOWN_ENDPOINT, unix_now};
use crate::listener::{ListenerPair, bind_pair};
use crate::response::{error_response, rcode_name};
use crate::upstream::{MAX_MESSAGE, UpstreamFailure, UpstreamPool, exchange_tcp};

/// How the proxy behaves; built from the `dns` section of the config.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: Vec<SocketAddr>,
    /// Where queries go when the original destination is unknown.
    pub upstream: SocketAddr,
    /// REFUSED or NXDOMAIN for denied queries.
    pub reject: ResponseCode,
    pub response_max_delay: Duration,
    pub upstream_timeout: Duration,
    /// 0 = unlimited.
    pub concurrency_limit: usize,
    pub upstream_sockets: usize,
    /// A TCP client connection with no query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// After steering the port's traffic to the peer at shutdown, how long the listeners keep
    /// reading what was already queued on them before they close.
    pub linger: Duration,
}

impl ProxySettings {
    /// The longest a query can take once admitted: how long shutdown waits for stragglers.
    fn drain_timeout(&self) -> Duration {
        self.upstream_timeout + self.response_max_delay + Duration::from_secs(1)
    }
}

/// A bound, not yet serving, DNS proxy.
#[derive(Debug)]
pub struct DnsProxy {
    listeners: Vec<ListenerPair>,
    engine: Arc<Engine>,
    upstream_shutdown: CancellationToken,
}

struct Engine {
    settings: ProxySettings,
    context: ProxyContext,
    /// The histograms of each query's phases, looked up once rather than per query.
    timings: Timings,
    upstream: Arc<UpstreamPool>,
    limiter: Option<Arc<Semaphore>>,
}

struct Timings {
    total: Histogram,
    policy_check: Histogram,
    upstream: Histogram,
    datapath_hold: Histogram,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl DnsProxy {
    /// Binds every listen address (UDP and TCP) and opens the upstream pool. Must run inside
    /// a tokio runtime.
    pub fn bind(settings: ProxySettings, context: ProxyContext) -> Result<DnsProxy, ProxyError> {
        let listeners = settings
            .listen
            .iter()
            .map(|address| bind_pair(*address))
            .collect::<Result<Vec<_>, _>>()?;
        let upstream_shutdown = CancellationToken::new();
        let upstream = UpstreamPool::start(
            settings.upstream_sockets,
            context.metrics.clone(),
            upstream_shutdown.clone(),
        )?;
        let limiter = (settings.concurrency_limit > 0)
            .then(|| Arc::new(Semaphore::new(settings.concurrency_limit)));
        let timings = Timings {
            total: context.metrics.histogram(Scope::Total),
            policy_check: context.metrics.histogram(Scope::PolicyCheck),
            upstream: context.metrics.histogram(Scope::Upstream),
            datapath_hold: context.metrics.histogram(Scope::DatapathHold),
        };
        Ok(DnsProxy {
            listeners,
            engine: Arc::new(Engine {
                settings,
                context,
                timings,
                upstream,
                limiter,
            }),
            upstream_shutdown,
        })
    }

    /// The bound addresses, in the order of `listen` (the real port when 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(ListenerPair::local_addr)
            .collect()
    }

    /// The listener sockets, for registering them with the datapath's reuseport selection.
    pub fn listener_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.listeners
            .iter()
            .flat_map(|pair| [pair.udp.as_fd(), pair.tcp.as_fd()])
            .collect()
    }

    /// Serves until `shutdown` is cancelled; then leaves the port's serving group (see
    /// [`DnsProxy::serve_and_leave`]), lets the queries in flight finish, and returns.
    pub async fn serve(self, shutdown: CancellationToken) {
        self.serve_and_leave(shutdown, || {}).await;
    }

    /// Like [`DnsProxy::serve`]; at shutdown `leave` runs first (it steers new queries to the
    /// peer process), the listeners keep reading for `linger` so nothing already queued on
    /// them is lost, then they close and the queries in flight finish.
    pub async fn serve_and_leave(self, shutdown: CancellationToken, leave: impl FnOnce()) {
        let tracker = TaskTracker::new();
        let engine = self.engine;
        let stop_reading = CancellationToken::new();
        engine.context.metrics.dns.serving.set(1);
        let mut loops = Vec::new();
        for pair in self.listeners {
            loops.push(tokio::spawn(udp_loop(
                Arc::new(pair.udp),
                engine.clone(),
                stop_reading.clone(),
                tracker.clone(),
            )));
            loops.push(tokio::spawn(tcp_loop(
                pair.tcp,
                engine.clone(),
                stop_reading.clone(),
                tracker.clone(),
            )));
        }
        shutdown.cancelled().await;
        leave();
        if !engine.settings.linger.is_zero() {
            tokio::time::sleep(engine.settings.linger).await;
        }
        stop_reading.cancel();
        for listener_loop in loops {
            // The loops end on the same token; joining them closes their sockets.
            let _ = listener_loop.await;
        }
        engine.context.metrics.dns.serving.set(0);
        tracker.close();
        if tokio::time::timeout(engine.settings.drain_timeout(), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("queries still in flight after the drain timeout");
        }
        self.upstream_shutdown.cancel();
    }
}

async fn udp_loop(
    socket: Arc<UdpSocket>,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buffer) => received,
        };
        let (length, client) = match received {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "DNS UDP receive error");
                continue;
            }
        };
        let packet = buffer[..length].to_vec();
        let engine = engine.clone();
        let socket = socket.clone();
        tracker.spawn(async move {
            if let Some(answer) = engine.handle(client, Transport::Udp, packet).await
                && let Err(error) = socket.send_to(&answer, client).await
            {
                tracing::debug!(%client, %error, "cannot send DNS answer");
            }
        });
    }
}

async fn tcp_loop(
    listener: TcpListener,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => {
                let _ = stream.set_nodelay(true);
                tracker.spawn(tcp_connection(
                    stream,
                    client,
                    engine.clone(),
                    shutdown.clone(),
                    tracker.clone(),
                ));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "DNS TCP accept error");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One client connection: queries are read in a loop and answered concurrently (a client may
/// pipeline several); answers are written by one writer in the order they complete.
async fn tcp_connection(
    stream: TcpStream,
    client: SocketAddr,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let (mut reader, mut writer) = stream.into_split();
    let (answers, mut outgoing) = mpsc::channel::<Vec<u8>>(32);
    let write_loop = tokio::spawn(async move {
        while let Some(answer) = outgoing.recv().await {
            let Ok(length) = u16::try_from(answer.len()) else {
                continue;
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&length.to_be_bytes());
            framed.extend_from_slice(&answer);
            if writer.write_all(&framed).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    let idle = engine.settings.tcp_idle_timeout;
    loop {
        let length = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            length = tokio::time::timeout(idle, reader.read_u16()) => length,
        };
        let length = match length {
            Ok(Ok(length)) => usize::from(length),
            // Idle, closed by the client, or reset: nothing more to read.
            _ => break,
        };
        let mut packet = vec![0u8; length];
        match tokio::time::timeout(idle, reader.read_exact(&mut packet)).await {
            Ok(Ok(_)) => {}
            _ => {
                engine.malformed(Transport::Tcp);
                break;
            }
        }
        let engine = engine.clone();
        let answers = answers.clone();
        tracker.spawn(async move {
            if let Some(answer) = engine.handle(client, Transport::Tcp, packet).await {
                let _ = answers.send(answer).await;
            }
        });
    }
    drop(answers);
    let _ = write_loop.await;
}

/// Releases its slot and lowers the in-flight gauge however the query ends.
struct InFlight<'a> {
    engine: &'a Engine,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.engine.context.metrics.dns.in_flight.dec();
    }
}

/// The outcome of one query, for metrics and the flow event.
struct Outcome {
    verdict: Verdict,
    rcode: ResponseCode,
    summary: AnswerSummary,
    server: SocketAddr,
}

impl Engine {
    fn malformed(&self, transport: Transport) {
        self.context
            .metrics
            .dns
            .malformed
            .with_label_values(&[transport.as_str()])
            .inc();
    }

    fn admit(&self) -> Result<InFlight<'_>, ()> {
        let permit = match &self.limiter {
            None => None,
            Some(limiter) => Some(limiter.clone().try_acquire_owned().map_err(|_| ())?),
        };
        self.context.metrics.dns.in_flight.inc();
        Ok(InFlight {
            engine: self,
            _permit: permit,
        })
    }

    /// The whole life of one query; `None` when the packet deserves no answer.
    async fn handle(
        &self,
        client: SocketAddr,
        transport: Transport,
        packet: Vec<u8>,
    ) -> Option<Vec<u8>> {
        let started = Instant::now();
        let query = match Message::from_vec(&packet) {
            Ok(query) if query.metadata.message_type == MessageType::Query => query,
            _ => {
                self.malformed(transport);
                return None;
            }
        };
        if query.metadata.op_code != OpCode::Query {
            return error_response(&query, ResponseCode::NotImp);
        }
        if query.queries.len() != 1 {
            self.malformed(transport);
            return error_response(&query, ResponseCode::FormErr);
        }
        let question = &query.queries[0];
        let qname = normalized(question.name());
        let client_context = self.context.endpoints.lookup(client, transport);
        let endpoint_key = client_context
            .endpoint
            .as_ref()
            .map_or_else(|| Arc::from(UNKNOWN_ENDPOINT), |(_, key)| key.clone());
        let server = client_context
            .original_server
            .unwrap_or(self.settings.upstream);

        let (answer, outcome) = match self.admit() {
            Err(()) => {
                self.context.metrics.dns.concurrency_rejections.inc();
                let outcome = Outcome {
                    verdict: Verdict::Error,
                    rcode: ResponseCode::ServFail,
                    summary: AnswerSummary::default(),
                    server,
                };
                (error_response(&query, ResponseCode::ServFail), outcome)
            }
            Ok(_in_flight) => {
                self.resolve(
                    &query,
                    &packet,
                    transport,
                    &client_context,
                    &endpoint_key,
                    &qname,
                    server,
                )
                .await
            }
        };

        let elapsed = started.elapsed();
        self.timings.total.observe(elapsed.as_secs_f64());
        self.context
            .metrics
            .dns
            .queries
            .with_label_values(&[
                outcome.verdict.as_str(),
                rcode_name(outcome.rcode),
                transport.as_str(),
            ])
            .inc();
        self.context.flows.record(FlowEvent::Dns(DnsFlow {
            time_ms: unix_millis(),
            instance: self.context.instance.to_string(),
            endpoint: endpoint_key.to_string(),
            client,
            server: outcome.server,
            protocol: transport.as_str().to_owned(),
            qname,
            qtype: question.query_type().to_string(),
            rcode: rcode_name(outcome.rcode).to_owned(),
            verdict: outcome.verdict,
            ips: outcome.summary.ips,
            ttl: outcome.summary.ttl,
            cnames: outcome.summary.cnames,
            latency_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        }));
        answer
    }

    /// Policy check, forwarding and recording of one admitted query.
    #[allow(clippy::too_many_arguments)]
    async fn resolve(
        &self,
        query: &Message,
        packet: &[u8],
        transport: Transport,
        client: &crate::ClientContext,
        endpoint_key: &Arc<str>,
        qname: &str,
        server: SocketAddr,
    ) -> (Option<Vec<u8>>, Outcome) {
        let question = &query.queries[0];
        let checked = Instant::now();
        let policy = self.context.policy.current();
        let name = DnsName::new(qname).ok();
        let allowed = match (&client.endpoint, &name) {
            // No policy can select a sender that is no endpoint: it is not enforced.
            (None, _) => true,
            (Some((endpoint, _)), Some(name)) => {
                policy.dns_allowed(*endpoint, server, transport.l4(), name)
            }
            // A name no rule can express (the root, say) is only for unenforced endpoints.
            (Some((endpoint, _)), None) => !policy.is_enforced(*endpoint),
        };
        self.timings
            .policy_check
            .observe(checked.elapsed().as_secs_f64());
        let mut outcome = Outcome {
            verdict: Verdict::Denied,
            rcode: self.settings.reject,
            summary: AnswerSummary::default(),
            server,
        };
        if !allowed {
            return (error_response(query, self.settings.reject), outcome);
        }

        let asked = Instant::now();
        let exchanged = match transport {
            Transport::Udp => {
                self.upstream
                    .exchange_udp(server, question, packet, self.settings.upstream_timeout)
                    .await
            }
            Transport::Tcp => {
                exchange_tcp(server, question, packet, self.settings.upstream_timeout).await
            }
        };
        self.timings.upstream.observe(asked.elapsed().as_secs_f64());
        let answer = match exchanged {
            Ok(answer) => answer,
            Err(failure) => {
                self.count_upstream_failure(failure, server, qname);
                outcome.verdict = Verdict::Error;
                outcome.rcode = ResponseCode::ServFail;
                return (error_response(query, ResponseCode::ServFail), outcome);
            }
        };
        outcome.verdict = Verdict::Allowed;
        outcome.rcode = answer.message.metadata.response_code;
        outcome.summary = summarize(&answer.message, question.name());
        if outcome.rcode == ResponseCode::NoError
            && !outcome.summary.ips.is_empty()
            && let Some(name) = name
        {
            self.record(&policy, endpoint_key, name, &outcome.summary, server)
                .await;
        }
        (Some(answer.packet), outcome)
    }

    fn count_upstream_failure(&self, failure: UpstreamFailure, server: SocketAddr, qname: &str) {
        tracing::debug!(%server, qname, reason = failure.as_str(), "upstream failed");
        self.context
            .metrics
            .dns
            .upstream_errors
            .with_label_values(&[failure.as_str()])
            .inc();
    }

    /// Caches the answer and writes its allow entries; the answer is released after this
    /// returns or `response_max_delay` passes, whichever comes first.
    async fn record(
        &self,
        policy: &PolicyRepository,
        endpoint_key: &Arc<str>,
        name: DnsName,
        summary: &AnswerSummary,
        server: SocketAddr,
    ) {
        let held = Instant::now();
        let now = unix_now();
        let expires_at = {
            let mut cache = self.context.cache.lock();
            let outcome = cache.insert(now, endpoint_key, name.as_str(), &summary.ips, summary.ttl);
            self.context
                .metrics
                .cache
                .names
                .set(gauge(cache.name_count()));
            self.context.metrics.cache.ips.set(gauge(cache.ip_count()));
            outcome.expires_at
        };
        let mut grants = Vec::new();
        policy.fqdn_grants(&name, &mut grants);
        if !grants.is_empty() {
            let request = AllowRequest {
                name: &name,
                ips: &summary.ips,
                expires_at,
                grants: &grants,
            };
            if let Some(wait) = self.context.datapath.allow(&request)
                && tokio::time::timeout(self.settings.response_max_delay, wait)
                    .await
                    .is_err()
            {
                tracing::warn!(
                    name = name.as_str(),
                    "answer released before its allow entries were written"
                );
            }
        }
        self.timings
            .datapath_hold
            .observe(held.elapsed().as_secs_f64());
        self.context.mappings.on_mapping(Mapping {
            endpoint: endpoint_key.clone(),
            name,
            ips: summary.ips.clone(),
            ttl: summary.ttl,
            expires_at,
            server,
        });
    }
}

fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
