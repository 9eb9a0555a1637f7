//! The proxy's life: binding the listeners, serving them, and leaving gracefully.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ProxyError;
use crate::context::ProxyContext;
use crate::datagram::Datagram;
use crate::datagram::{LISTEN_BUFFERS, receive_buffer_share};
use crate::engine::Engine;
use crate::listener::{bind_pair, bind_udp};
use crate::upstream::UpstreamPool;
use crate::{tcp, udp};

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
    /// Longest TTL an answer may carry, in seconds: longer ones are lowered in the answer and
    /// in the cache alike. 0 = as the upstream gave them.
    pub max_ttl: u32,
    /// 0 = unlimited.
    pub concurrency_limit: usize,
    pub upstream_sockets: usize,
    /// UDP sockets per listen address, each read by a loop of its own (at least 1).
    pub listen_sockets: usize,
    /// A TCP client connection with no query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// After steering the port's traffic to the peer at shutdown, how long the listeners go on
    /// serving as before (what the kernel already queued on them) before they leave the port.
    /// Only when something was steered: see [`DnsProxy::serve_and_leave`].
    pub linger: Duration,
}

/// A bound, not yet serving, DNS proxy.
#[derive(Debug)]
pub struct DnsProxy {
    /// `listen_sockets` per listen address, in the order of `listen`. Also in the engine,
    /// which may close them; kept here for their descriptors until serving starts.
    udp_listeners: Vec<Arc<Datagram>>,
    tcp_listeners: Vec<TcpListener>,
    engine: Arc<Engine>,
}

impl DnsProxy {
    /// Binds every listen address (UDP and TCP) and opens the upstream pool. Must run inside
    /// a tokio runtime.
    pub fn bind(settings: ProxySettings, context: ProxyContext) -> Result<DnsProxy, ProxyError> {
        let per_address = settings.listen_sockets.max(1);
        let receive_buffer = receive_buffer_share(LISTEN_BUFFERS, per_address);
        let mut udp_listeners = Vec::with_capacity(settings.listen.len() * per_address);
        let mut tcp_listeners = Vec::with_capacity(settings.listen.len());
        for address in &settings.listen {
            let pair = bind_pair(*address, receive_buffer)?;
            // The kernel hands each of the port's sockets its share of the clients (by a hash
            // of their addresses), and each socket has a loop of its own: one reading every
            // query is one core's work however many the node has.
            let bound = pair.udp.local_addr().map_err(|source| ProxyError::Bind {
                transport: "udp",
                address: *address,
                source,
            })?;
            udp_listeners.push(Arc::new(pair.udp));
            for _ in 1..per_address {
                udp_listeners.push(Arc::new(bind_udp(bound, receive_buffer)?));
            }
            tcp_listeners.push(pair.tcp);
        }
        let upstream = UpstreamPool::open(settings.upstream_sockets, settings.upstream)?;
        let engine = Engine::new(settings, context, udp_listeners.clone(), upstream);
        Ok(DnsProxy {
            udp_listeners,
            tcp_listeners,
            engine: Arc::new(engine),
        })
    }

    /// The bound addresses, in the order of `listen` (the real port when 0 was asked for; UDP
    /// and TCP share it).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.tcp_listeners
            .iter()
            .filter_map(|socket| socket.local_addr().ok())
            .collect()
    }

    /// The listener sockets, for registering them with the datapath's reuseport selection:
    /// the UDP sockets, then the TCP one, of each listen address.
    pub fn listener_fds(&self) -> Vec<BorrowedFd<'_>> {
        let per_address = self.engine.settings.listen_sockets.max(1);
        self.udp_listeners
            .chunks(per_address)
            .zip(&self.tcp_listeners)
            .flat_map(|(udp, tcp)| {
                udp.iter()
                    .map(|socket| socket.as_fd())
                    .chain(std::iter::once(tcp.as_fd()))
            })
            .collect()
    }

    /// Serves until `shutdown` is cancelled; then leaves the port's serving group (see
    /// [`DnsProxy::serve_and_leave`]), lets the queries in flight finish, and returns.
    pub async fn serve(self, shutdown: CancellationToken) {
        self.serve_and_leave(shutdown, || false).await;
    }

    /// Like [`DnsProxy::serve`]; at shutdown `leave` runs first: it steers new queries to the
    /// peer process and says whether it did. If it did, the listeners keep serving for
    /// `linger`, what the kernel queued on them before the switch. Then each UDP listener
    /// leaves the port's SO_REUSEPORT group and serves what it already holds (see
    /// `udp::listener_loop`), the TCP listeners stop accepting, the queries in flight finish,
    /// and the sockets close. Without steering, lingering would only delay the exit: the kernel
    /// keeps choosing these sockets until they leave the group.
    pub async fn serve_and_leave(self, shutdown: CancellationToken, leave: impl FnOnce() -> bool) {
        let tracker = TaskTracker::new();
        let DnsProxy {
            udp_listeners,
            tcp_listeners,
            engine,
        } = self;
        // From here the engine's handles are the only ones: closing them closes the sockets.
        drop(udp_listeners);
        let stop_reading = CancellationToken::new();
        let upstream_shutdown = CancellationToken::new();
        engine.context.metrics.dns.serving.set(1);
        let mut upstream_loops = Vec::new();
        for socket in engine.upstream.sockets() {
            upstream_loops.push(tokio::spawn(udp::answer_loop(
                engine.clone(),
                socket.clone(),
                upstream_shutdown.clone(),
                tracker.clone(),
            )));
        }
        upstream_loops.push(tokio::spawn(udp::sweep_loop(
            engine.clone(),
            upstream_shutdown.clone(),
            tracker.clone(),
        )));
        let mut listener_loops = Vec::new();
        for index in 0..engine.udp_listeners.len() {
            listener_loops.push(tokio::spawn(udp::listener_loop(
                engine.clone(),
                index,
                stop_reading.clone(),
            )));
        }
        for listener in tcp_listeners {
            listener_loops.push(tokio::spawn(tcp::listener_loop(
                listener,
                engine.clone(),
                stop_reading.clone(),
                tracker.clone(),
            )));
        }
        shutdown.cancelled().await;
        let steered = leave();
        // Serving no more from here: the port's new queries go to the peer.
        engine.context.metrics.dns.serving.set(0);
        if steered && !engine.settings.linger.is_zero() {
            tokio::time::sleep(engine.settings.linger).await;
        }
        stop_reading.cancel();
        for listener_loop in listener_loops {
            // The loops end on the same token; joining them closes the TCP listeners.
            let _ = listener_loop.await;
        }
        let drained = async {
            engine.in_flight.idle().await;
            tracker.close();
            tracker.wait().await;
        };
        if tokio::time::timeout(engine.drain_timeout(), drained)
            .await
            .is_err()
        {
            tracing::warn!("queries still in flight after the drain timeout");
        }
        upstream_shutdown.cancel();
        for upstream_loop in upstream_loops {
            let _ = upstream_loop.await;
        }
        // Whatever still waits gets its SERVFAIL rather than silence, from the socket its query
        // came in on: before the listeners close.
        for waiting in engine.upstream.drain() {
            udp::time_out(&engine, waiting, &tracker);
        }
        // Out of the port's group and drained, the listeners close now that their queries are
        // answered.
        for slot in &engine.udp_listeners {
            slot.close();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The engine end to end in one process: a fake upstream, one endpoint, one policy, and a
    //! datapath hook whose writes take a while.

    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use crate::udp::{BATCHES_PER_TURN, SWEEP_EVERY, SWEEPS_BEFORE_SLEEP};
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use tokio::net::UdpSocket;
    use warden_fqdn::{CacheLimits, DnsCache};
    use warden_policy::{EndpointId, EndpointInfo, Labels, PolicyRepository, parse_str};
    use warden_telemetry::{FlowLog, Metrics};

    use super::*;
    use crate::context::{
        AllowRequest, ClientContext, DatapathHook, EndpointLookup, HoldFuture, Mapping,
        MappingObserver, PolicySource, SharedCache, Transport,
    };

    /// Every sender is endpoint 1, `default/test`.
    struct OneEndpoint;

    impl EndpointLookup for OneEndpoint {
        fn lookup(&self, _client: SocketAddr, _transport: Transport) -> ClientContext {
            ClientContext {
                endpoint: Some((EndpointId(1), Arc::from("default/test"))),
                original_server: None,
                unresolved: false,
            }
        }
    }

    /// Every sender is an enrolled workload whose endpoint this process does not know.
    struct UnknownEnrolled;

    impl EndpointLookup for UnknownEnrolled {
        fn lookup(&self, _client: SocketAddr, _transport: Transport) -> ClientContext {
            ClientContext {
                endpoint: None,
                original_server: None,
                unresolved: true,
            }
        }
    }

    /// Every sender is endpoint 2, which no policy selects, or no endpoint at all (`None`).
    struct Unenforced(Option<EndpointId>);

    impl EndpointLookup for Unenforced {
        fn lookup(&self, _client: SocketAddr, _transport: Transport) -> ClientContext {
            ClientContext {
                endpoint: self.0.map(|id| (id, Arc::from("default/other"))),
                original_server: None,
                unresolved: false,
            }
        }
    }

    struct Fixed(Arc<PolicyRepository>);

    impl PolicySource for Fixed {
        fn current(&self) -> Arc<PolicyRepository> {
            self.0.clone()
        }
    }

    /// Allow entries that take `delay` to be written; the addresses of each request.
    struct SlowDatapath {
        delay: Duration,
        calls: AtomicUsize,
        allowed: Mutex<Vec<Vec<IpAddr>>>,
    }

    impl DatapathHook for SlowDatapath {
        fn allow(&self, request: &AllowRequest<'_>) -> Option<HoldFuture> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.allowed.lock().unwrap().push(request.ips.to_vec());
            Some(Box::pin(tokio::time::sleep(self.delay)))
        }
    }

    #[derive(Default)]
    struct Recorded(Mutex<Vec<Mapping>>);

    impl MappingObserver for Recorded {
        fn on_mapping(&self, mapping: Mapping) {
            self.0.lock().unwrap().push(mapping);
        }
    }

    /// `app=test` may ask `upstream` for anything and reach cilium.io on 443.
    fn policy(upstream: SocketAddr) -> Arc<PolicyRepository> {
        let yaml = format!(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: test, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: test}}}}
  egress:
  - toCIDR: ["{ip}/32"]
    toPorts:
    - ports: [{{port: "{port}", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: "*"}}]
  - toFQDNs: [{{matchName: cilium.io}}]
    toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
"#,
            ip = upstream.ip(),
            port = upstream.port()
        );
        let policies = parse_str(&yaml, Path::new("test.yaml")).unwrap();
        let labels = BTreeMap::from([("app".to_owned(), "test".to_owned())]);
        let endpoint = EndpointInfo {
            id: EndpointId(1),
            name: "test".to_owned(),
            namespace: "default".to_owned(),
            labels: Labels::from_k8s(&labels, "default"),
            ips: vec![IpAddr::from([127, 0, 0, 1])],
            peer_only: false,
        };
        Arc::new(PolicyRepository::build(&policies, &[endpoint]))
    }

    /// A server answering every question with one A record, or never when `silent`.
    async fn fake_upstream(silent: bool) -> SocketAddr {
        fake_upstream_answering(silent, 1).await
    }

    /// A server answering every question with `addresses` A records (198.18.x.y).
    async fn fake_upstream_answering(silent: bool, addresses: u16) -> SocketAddr {
        fake_upstream_answering_ttl(silent, addresses, 60).await
    }

    /// [`fake_upstream_answering`] with records of `ttl` seconds.
    async fn fake_upstream_answering_ttl(silent: bool, addresses: u16, ttl: u32) -> SocketAddr {
        fake_upstream_sending(move |answer| {
            if silent {
                return None;
            }
            for n in 1..=addresses {
                let [high, low] = n.to_be_bytes();
                let name = answer.queries[0].name().clone();
                answer.add_answer(Record::from_rdata(
                    name,
                    ttl,
                    RData::A(A::new(198, 18, high, low)),
                ));
            }
            Some(answer.to_vec().unwrap())
        })
        .await
    }

    /// A server answering every question with what `build` makes of the answer to it (the
    /// question echoed, nothing else yet), or not at all when it makes nothing.
    async fn fake_upstream_sending(
        build: impl Fn(&mut Message) -> Option<Vec<u8>> + Send + 'static,
    ) -> SocketAddr {
        fake_upstream_sending_after(Duration::ZERO, build).await
    }

    /// [`fake_upstream_sending`], each answer sent `delay` after its question came.
    async fn fake_upstream_sending_after(
        delay: Duration,
        build: impl Fn(&mut Message) -> Option<Vec<u8>> + Send + 'static,
    ) -> SocketAddr {
        fake_upstream_seeing(delay, move |answer, _| build(answer)).await
    }

    /// [`fake_upstream_sending_after`], `build` told where each question came from too.
    async fn fake_upstream_seeing(
        delay: Duration,
        build: impl Fn(&mut Message, SocketAddr) -> Option<Vec<u8>> + Send + 'static,
    ) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 1500];
            while let Ok((length, from)) = socket.recv_from(&mut buffer).await {
                let query = Message::from_vec(&buffer[..length]).unwrap();
                let mut answer = Message::response(query.metadata.id, OpCode::Query);
                answer.add_queries(query.queries.clone());
                if let Some(bytes) = build(&mut answer, from) {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        address
    }

    struct Running {
        dns: SocketAddr,
        datapath: Arc<SlowDatapath>,
        mappings: Arc<Recorded>,
        cache: SharedCache,
        flows: Arc<FlowLog>,
        metrics: Metrics,
        shutdown: CancellationToken,
        served: tokio::task::JoinHandle<()>,
    }

    impl Running {
        /// `warden_dns_upstream_unexpected_total{reason}` so far.
        fn unexpected(&self, reason: &str) -> u64 {
            self.metrics
                .dns
                .upstream_unexpected
                .with_label_values(&[reason])
                .get()
        }
    }

    async fn start(upstream: SocketAddr, hold: Duration, upstream_timeout: Duration) -> Running {
        start_on(
            "127.0.0.1:0".parse().unwrap(),
            upstream,
            hold,
            upstream_timeout,
        )
        .await
    }

    async fn start_on(
        listen: SocketAddr,
        upstream: SocketAddr,
        hold: Duration,
        upstream_timeout: Duration,
    ) -> Running {
        start_with(
            listen,
            upstream,
            hold,
            upstream_timeout,
            Duration::ZERO,
            false,
            Arc::new(OneEndpoint),
        )
        .await
    }

    /// The tests' settings: two sockets of each kind, REFUSED for denied queries.
    fn settings(
        listen: SocketAddr,
        upstream: SocketAddr,
        upstream_timeout: Duration,
        linger: Duration,
    ) -> ProxySettings {
        ProxySettings {
            listen: vec![listen],
            upstream,
            reject: ResponseCode::Refused,
            response_max_delay: Duration::from_millis(300),
            upstream_timeout,
            max_ttl: 0,
            concurrency_limit: 0,
            upstream_sockets: 2,
            // More than one, so that every test here runs the port's sockets side by side.
            listen_sockets: 2,
            tcp_idle_timeout: Duration::from_secs(5),
            linger,
        }
    }

    /// A proxy whose `leave` at shutdown says it steered traffic away (`steers`) or not.
    async fn start_with(
        listen: SocketAddr,
        upstream: SocketAddr,
        hold: Duration,
        upstream_timeout: Duration,
        linger: Duration,
        steers: bool,
        endpoints: Arc<dyn EndpointLookup>,
    ) -> Running {
        let settings = settings(listen, upstream, upstream_timeout, linger);
        start_with_settings(settings, hold, steers, endpoints).await
    }

    async fn start_with_settings(
        settings: ProxySettings,
        hold: Duration,
        steers: bool,
        endpoints: Arc<dyn EndpointLookup>,
    ) -> Running {
        let upstream = settings.upstream;
        let datapath = Arc::new(SlowDatapath {
            delay: hold,
            calls: AtomicUsize::new(0),
            allowed: Mutex::default(),
        });
        let mappings = Arc::new(Recorded::default());
        let cache = SharedCache::new(DnsCache::new(CacheLimits::default()));
        let flows = Arc::new(FlowLog::new(100));
        let metrics = Metrics::new("test").unwrap();
        let context = ProxyContext {
            instance: Arc::from("test"),
            endpoints,
            policy: Arc::new(Fixed(policy(upstream))),
            cache: cache.clone(),
            datapath: datapath.clone(),
            mappings: mappings.clone(),
            metrics: metrics.clone(),
            flows: flows.clone(),
        };
        let proxy = DnsProxy::bind(settings, context).unwrap();
        let dns = proxy.local_addrs()[0];
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(proxy.serve_and_leave(shutdown.clone(), move || steers));
        Running {
            dns,
            datapath,
            mappings,
            cache,
            flows,
            metrics,
            shutdown,
            served,
        }
    }

    /// Asks `dns` over UDP; returns the answer and how long it took.
    async fn ask(dns: SocketAddr, name: &str) -> (Message, Duration) {
        ask_taking(dns, name, None).await
    }

    /// [`ask`] with an OPT record saying the client takes `payload` bytes over UDP.
    async fn ask_taking(dns: SocketAddr, name: &str, payload: Option<u16>) -> (Message, Duration) {
        let mut query = Message::query();
        query.metadata.id = 4242;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(payload) = payload {
            let mut edns = hickory_proto::op::Edns::new();
            edns.set_max_payload(payload);
            query.set_edns(edns);
        }
        let started = Instant::now();
        let answer = exchange(dns, &query).await;
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        (answer, started.elapsed())
    }

    /// Sends `query` to `dns` over UDP and reads its answer, which must carry the query's ID.
    async fn exchange(dns: SocketAddr, query: &Message) -> Message {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        exchange_from(&client, dns, query).await
    }

    /// [`exchange`] from `client`'s socket.
    async fn exchange_from(client: &UdpSocket, dns: SocketAddr, query: &Message) -> Message {
        client.send_to(&query.to_vec().unwrap(), dns).await.unwrap();
        let mut buffer = vec![0u8; 65_535];
        // Past the slowest answer a test waits for (one held to the max delay, 4 s, on a
        // loaded machine): only a lost answer runs into it.
        let (length, _) =
            tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut buffer))
                .await
                .expect("an answer")
                .unwrap();
        let answer = Message::from_vec(&buffer[..length]).unwrap();
        assert_eq!(answer.metadata.id, query.metadata.id);
        answer
    }

    /// A query for cilium.io. A.
    fn cilium_io_query() -> Message {
        let mut query = Message::query();
        query.add_query(Query::query(
            Name::from_ascii("cilium.io.").unwrap(),
            RecordType::A,
        ));
        query
    }

    /// A query for cilium.io. A with `id`, framed for TCP (length first).
    fn tcp_query(id: u16) -> Vec<u8> {
        let mut query = cilium_io_query();
        query.metadata.id = id;
        let wire = query.to_vec().unwrap();
        let mut framed = u16::try_from(wire.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(&wire);
        framed
    }

    /// A silent upstream on UDP and TCP at one address: the TCP server takes connections and
    /// never answers; how many it took so far. A port free for UDP may be another test's TCP
    /// port meanwhile (these tests open hundreds of connections): another is tried then.
    async fn silent_upstreams() -> (SocketAddr, Arc<AtomicUsize>) {
        loop {
            let upstream = fake_upstream(true).await;
            if let Ok(listener) = tokio::net::TcpListener::bind(upstream).await {
                return (upstream, silent_tcp_upstream(listener));
            }
        }
    }

    fn silent_tcp_upstream(listener: tokio::net::TcpListener) -> Arc<AtomicUsize> {
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        accepted
    }

    /// How many upstream connections a proxy in front of a silent upstream (both UDP and TCP)
    /// opened after `clients` TCP clients each sent `queries` queries at once and read no
    /// answer: once `expected` are open (or after 10 s, on a machine too loaded to get there),
    /// and a moment more, for any the proxy would open beyond them.
    async fn upstream_connections_for(clients: usize, queries: u16, expected: usize) -> usize {
        use tokio::io::AsyncWriteExt;
        let (upstream, accepted) = silent_upstreams().await;
        // Far past the wait below: a query timing out frees its exchange and its place on the
        // connection for the next, whose connection would count as one over the bound.
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(30)).await;
        let framed: Vec<u8> = (0..queries).flat_map(tcp_query).collect();
        let mut connected = Vec::new();
        for _ in 0..clients {
            let mut client = tokio::net::TcpStream::connect(proxy.dns).await.unwrap();
            client.write_all(&framed).await.unwrap();
            connected.push(client);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while accepted.load(Ordering::SeqCst) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Connections past the bound would come with the others: a second more to see one,
        // past the 300 to 500 ms the whole test once waited.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let opened = accepted.load(Ordering::SeqCst);
        // Not waited for: the drain would wait out the queries' 30 s upstream timeout.
        proxy.shutdown.cancel();
        opened
    }

    /// Each TCP query is a connection of its own to the upstream: clients pipelining on many
    /// connections had the proxy open sixteen per connection, up to sixteen thousand.
    #[tokio::test]
    async fn tcp_exchanges_with_the_upstream_are_bounded() {
        let bound = crate::tcp::UPSTREAM_EXCHANGES;
        assert_eq!(
            upstream_connections_for(20, 16, bound).await,
            bound,
            "320 queries in flight"
        );
    }

    #[tokio::test]
    async fn a_client_pipelining_over_tcp_gets_only_its_share_of_the_proxy() {
        // A hundred queries at once, and never an answer read.
        let share = crate::tcp::QUERIES_PER_CONNECTION;
        assert_eq!(
            upstream_connections_for(1, 100, share).await,
            share,
            "the proxy took more of the client's queries than one connection may have in flight"
        );
    }

    /// Waits up to `limit` for `counter` to read `want`.
    async fn wait_count(counter: impl Fn() -> u64, want: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while counter() != want {
            assert!(Instant::now() < deadline, "{} after {limit:?}", counter());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client that stopped inside a length prefix lost its connection at the idle timeout
    /// uncounted (one stopping inside the message was counted as malformed).
    #[tokio::test]
    async fn a_tcp_client_stopping_inside_a_length_prefix_is_counted() {
        use tokio::io::AsyncWriteExt;
        let upstream = fake_upstream(true).await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(1)).await;
        let mut halfway = tokio::net::TcpStream::connect(proxy.dns).await.unwrap();
        halfway.write_all(&[0]).await.unwrap();
        // The test proxy's idle timeout is 5 s.
        let malformed = || {
            proxy
                .metrics
                .dns
                .malformed
                .with_label_values(&["tcp"])
                .get()
        };
        wait_count(malformed, 1, Duration::from_secs(15)).await;
        drop(halfway);
        proxy.shutdown.cancel();
        proxy.served.await.unwrap();
    }

    /// A TCP query of up to 64 KiB was read whole and held until its answer came (a few
    /// clients' pipelines pinned the process's memory): one longer than a UDP query may be is
    /// counted malformed and ends the connection, and nothing is asked upstream.
    #[tokio::test]
    async fn a_tcp_query_longer_than_any_real_one_is_refused_unread() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (upstream, accepted) = silent_upstreams().await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        let mut client = tokio::net::TcpStream::connect(proxy.dns).await.unwrap();
        // A query padded past the bound: its header and question, then zeros.
        let mut query = tcp_query(7)[2..].to_vec();
        query.resize(crate::udp::QUERY_SLOT + 1, 0);
        let mut framed = u16::try_from(query.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(&query);
        client.write_all(&framed).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut rest))
            .await
            .expect("the connection is closed");
        assert!(closed.is_err() || rest.is_empty(), "{rest:?}");
        let malformed = proxy.metrics.dns.malformed.with_label_values(&["tcp"]);
        assert_eq!(malformed.get(), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
        proxy.shutdown.cancel();
        proxy.served.await.unwrap();
    }

    /// Eight client addresses holding their share of connections silent took every TCP slot
    /// until the idle timeout (and, sending a byte now and then, for good): every other
    /// client's TCP retry waited in the accept queue. With few slots left, a connection
    /// waiting for a query gives its slot up after a second (RFC 7766 6.2.3).
    #[tokio::test]
    async fn silent_tcp_connections_make_way_when_the_slots_run_short() {
        tcp_slots_held_make_way(&[]).await;
    }

    /// The same, held inside a message (a byte sent, and nothing more for a while): the rest
    /// of a message has one deadline, a second while the slots run short.
    #[tokio::test]
    async fn tcp_connections_inside_a_message_make_way_when_the_slots_run_short() {
        tcp_slots_held_make_way(&[0]).await;
    }

    /// Every TCP slot of a proxy taken by connections that sent `sent` and then nothing, one
    /// more client's query is answered.
    async fn tcp_slots_held_make_way(sent: &'static [u8]) {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Both ends of 1,025 connections in this process, beside the other tests'.
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        if hard < 8192 || setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            eprintln!("fewer than 8,192 file descriptors allowed: skipped");
            return;
        }
        let upstream = fake_upstream(true).await;
        let mut settings = settings(
            "127.0.0.1:0".parse().unwrap(),
            upstream,
            Duration::from_secs(1),
            Duration::ZERO,
        );
        // Far past the test's wait: only the pressure can close them in time.
        settings.tcp_idle_timeout = Duration::from_secs(120);
        let proxy =
            start_with_settings(settings, Duration::ZERO, false, Arc::new(OneEndpoint)).await;
        let connect_from = |ip: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((ip, 0))).unwrap();
            socket.connect(proxy.dns).await.unwrap()
        };
        let mut held = Vec::new();
        for client in 2..10u8 {
            for _ in 0..crate::tcp::CONNECTIONS_PER_CLIENT {
                let mut connection = connect_from([127, 0, 0, client]).await;
                connection.write_all(sent).await.unwrap();
                held.push(connection);
            }
        }
        let started = Instant::now();
        let mut asking = connect_from([127, 0, 0, 10]).await;
        asking.write_all(&tcp_query(9)).await.unwrap();
        let mut length = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(30), asking.read_exact(&mut length))
            .await
            .expect("answered while the slots were held")
            .unwrap();
        println!("answered after {:?}", started.elapsed());
        proxy.shutdown.cancel();
        drop(held);
    }

    /// An answer the kernel would not send (here to port 0, where a raw socket's queries came
    /// from) was dropped with a debug line only: it is counted, by whichever way it leaves (a
    /// held answer's own send, the answer loop's batch, the listener's replies). Root only.
    #[tokio::test]
    async fn answers_the_kernel_will_not_send_are_counted() {
        use socket2::{Domain, Protocol, Socket, Type};
        let Ok(raw) = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)) else {
            eprintln!("no raw socket (not root): skipped");
            return;
        };
        let upstream = fake_upstream(false).await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(1)).await;
        let query = |names: &[&str]| {
            let mut query = Message::query();
            query.metadata.id = 5;
            for name in names {
                query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            }
            query.to_vec().unwrap()
        };
        let unsent = || proxy.metrics.dns.answers_unsent.get();
        // cilium.io's answer is held for its allow entries, and sent on its own; another
        // name's goes with the answer loop's batch; two questions get FORMERR from the
        // listener's loop.
        let queries = [
            query(&["cilium.io."]),
            query(&["example.org."]),
            query(&["cilium.io.", "example.org."]),
        ];
        for (sent, query) in queries.iter().enumerate() {
            // A UDP header from port 0 (no checksum: optional over IPv4), then the query.
            let length = u16::try_from(8 + query.len()).unwrap();
            let mut datagram = vec![0, 0];
            datagram.extend_from_slice(&proxy.dns.port().to_be_bytes());
            datagram.extend_from_slice(&length.to_be_bytes());
            datagram.extend_from_slice(&[0, 0]);
            datagram.extend_from_slice(query);
            raw.send_to(&datagram, &proxy.dns.into()).unwrap();
            wait_count(
                unsent,
                u64::try_from(sent).unwrap() + 1,
                Duration::from_secs(5),
            )
            .await;
        }
        proxy.shutdown.cancel();
        proxy.served.await.unwrap();
    }

    /// A client that took none of its answers lost its connection at the idle timeout, and the
    /// answers waiting for it, uncounted.
    #[tokio::test]
    async fn a_tcp_client_not_reading_its_answers_is_counted() {
        use tokio::io::AsyncWriteExt;
        let upstream = fake_upstream(true).await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(1)).await;
        // Queries the proxy answers itself (FORMERR: no question), none of the answers read,
        // through a small receive buffer: more answers than the proxy's socket may buffer
        // (the kernel grows a send buffer up to 4 MiB, counting each small write's overhead;
        // 64 KB answers, fewer and larger, were buffered in full).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let deaf = socket.connect(proxy.dns).await.unwrap();
        let (_unread, mut writer) = deaf.into_split();
        let no_question: Vec<u8> = (0..400_000u32)
            .flat_map(|id| {
                let mut framed = vec![0, 12];
                framed.extend_from_slice(&id.to_be_bytes()[2..]);
                framed.extend_from_slice(&[0; 10]);
                framed
            })
            .collect();
        let sending = tokio::spawn(async move {
            let _ = writer.write_all(&no_question).await;
            writer
        });

        // The test proxy's idle timeout is 5 s.
        // The queries take seconds of a debug build's CPU before the timeout starts: a wide
        // margin on a busy machine.
        let unread = || proxy.metrics.dns.tcp_unread.get();
        wait_count(unread, 1, Duration::from_secs(60)).await;
        sending.abort();
        proxy.shutdown.cancel();
        proxy.served.await.unwrap();
    }

    /// At shutdown a TCP connection closed over a query its client sent after the reader had
    /// stopped: the close reset the connection and threw away the answers still in its send
    /// queue (a client reading slowly had not taken them yet). The client must get every
    /// answer and then an orderly close.
    #[tokio::test]
    async fn a_tcp_connection_closing_at_shutdown_delivers_every_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const QUERIES: u16 = 8;
        // A TCP upstream that answers each query after 300 ms, with 60 addresses (~1 KiB), and
        // says when it has a query.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let (forwarded_tx, mut forwarded) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let forwarded_tx = forwarded_tx.clone();
                tokio::spawn(async move {
                    let length = stream.read_u16().await.unwrap();
                    let mut query = vec![0u8; usize::from(length)];
                    stream.read_exact(&mut query).await.unwrap();
                    let _ = forwarded_tx.send(());
                    let query = Message::from_vec(&query).unwrap();
                    let mut answer = Message::response(query.metadata.id, OpCode::Query);
                    answer.add_queries(query.queries.clone());
                    for n in 1..=60 {
                        answer.add_answer(Record::from_rdata(
                            query.queries[0].name().clone(),
                            60,
                            RData::A(A::new(198, 18, 0, n)),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let wire = answer.to_vec().unwrap();
                    let mut framed = u16::try_from(wire.len()).unwrap().to_be_bytes().to_vec();
                    framed.extend_from_slice(&wire);
                    let _ = stream.write_all(&framed).await;
                });
            }
        });
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        // A small receive window: most answers wait in the proxy's send queue.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1024).unwrap();
        let mut client = socket.connect(proxy.dns).await.unwrap();
        for id in 1..=QUERIES {
            client.write_all(&tcp_query(id)).await.unwrap();
        }
        // Every query read before the shutdown: forwarded, so each has its answer coming.
        for _ in 0..QUERIES {
            tokio::time::timeout(Duration::from_secs(5), forwarded.recv())
                .await
                .expect("every query forwarded in time")
                .expect("the upstream still running");
        }
        proxy.shutdown.cancel();
        // Well inside the upstream's 300 ms: the connection still waits for its answers.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Sent after the reader stopped: never read.
        client.write_all(&tcp_query(QUERIES + 1)).await.unwrap();
        // Read once the answers are written and the proxy is closing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut ids = Vec::new();
        loop {
            let read = tokio::time::timeout(Duration::from_secs(3), client.read_u16())
                .await
                .expect("an answer or the end in time");
            let length = match read {
                Ok(length) => length,
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(error) => panic!("after {} answers: {error}", ids.len()),
            };
            let mut answer = vec![0u8; usize::from(length)];
            client.read_exact(&mut answer).await.unwrap();
            ids.push(Message::from_vec(&answer).unwrap().metadata.id);
        }
        ids.sort_unstable();
        assert_eq!(ids, (1..=QUERIES).collect::<Vec<_>>());
        drop(client);
        proxy.served.await.unwrap();
    }

    /// A TCP query that waited for one of the upstream exchanges then had a whole
    /// `upstream_timeout` for its own: up to twice what the docs promise, and longer than the
    /// drain at shutdown waits.
    #[tokio::test]
    async fn a_tcp_query_waiting_for_an_exchange_fails_within_the_upstream_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // An upstream that takes every connection and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let timeout = Duration::from_secs(1);
        let proxy = start(upstream, Duration::ZERO, timeout).await;
        // More queries at once than there are exchanges.
        let per_connection = u16::try_from(crate::tcp::QUERIES_PER_CONNECTION).unwrap();
        let connections = crate::tcp::UPSTREAM_EXCHANGES / usize::from(per_connection) + 1;
        let started = Instant::now();
        let clients: Vec<_> = (0..connections)
            .map(|_| {
                let dns = proxy.dns;
                tokio::spawn(async move {
                    let mut client = tokio::net::TcpStream::connect(dns).await.unwrap();
                    for id in 1..=per_connection {
                        client.write_all(&tcp_query(id)).await.unwrap();
                    }
                    for _ in 0..per_connection {
                        let length = client.read_u16().await.unwrap();
                        let mut answer = vec![0u8; usize::from(length)];
                        client.read_exact(&mut answer).await.unwrap();
                        let answer = Message::from_vec(&answer).unwrap();
                        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
                    }
                })
            })
            .collect();
        for client in clients {
            client.await.unwrap();
        }
        let took = started.elapsed();
        // Without the one deadline: two timeouts, 2 s at least.
        assert!(took < timeout + Duration::from_millis(900), "{took:?}");
        proxy.shutdown.cancel();
        proxy.served.await.unwrap();
    }

    /// One client address could hold all of the proxy's TCP connections, keeping every
    /// other client's TCP retries waiting in the accept queue.
    #[tokio::test]
    async fn one_client_holds_at_most_its_share_of_the_tcp_connections() {
        use tokio::io::AsyncReadExt;
        let upstream = fake_upstream(true).await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(1)).await;
        // Whether the proxy closes the connection (EOF) within `wait`. Closed ones are given
        // seconds, for a loaded machine; open ones a moment, which a close would not outlast.
        async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
            let mut byte = [0u8; 1];
            matches!(
                tokio::time::timeout(wait, stream.read(&mut byte)).await,
                Ok(Ok(0) | Err(_))
            )
        }
        let (closed_soon, open_for) = (Duration::from_secs(5), Duration::from_millis(300));
        let connect_from = |ip: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((ip, 0))).unwrap();
            socket.connect(proxy.dns).await.unwrap()
        };
        let share = crate::tcp::CONNECTIONS_PER_CLIENT;
        let mut held = Vec::new();
        for _ in 0..share {
            held.push(connect_from([127, 0, 0, 1]).await);
        }
        let mut over = connect_from([127, 0, 0, 1]).await;
        assert!(
            closed_within(&mut over, closed_soon).await,
            "one over the share is closed"
        );
        assert!(
            !closed_within(&mut held[0], open_for).await,
            "the share stays open"
        );
        let mut other = connect_from([127, 0, 0, 2]).await;
        assert!(
            !closed_within(&mut other, open_for).await,
            "another client is served"
        );
        // Closing one gives its place back, once the proxy has seen it close.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut again = connect_from([127, 0, 0, 1]).await;
            if !closed_within(&mut again, open_for).await {
                break;
            }
            assert!(Instant::now() < deadline, "the freed place never came back");
        }
        proxy.shutdown.cancel();
    }

    #[tokio::test]
    async fn only_answers_that_change_the_cache_reach_the_mapping_observer() {
        let upstream = fake_upstream(false).await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        for _ in 0..6 {
            let (answer, _) = ask(proxy.dns, "cilium.io.").await;
            assert_eq!(answer.answers.len(), 1);
        }
        // Every answer writes its allow entries; only the first (and the first of a new
        // second, the expiry having moved) is news for the peer.
        assert_eq!(proxy.datapath.calls.load(Ordering::SeqCst), 6);
        let told = proxy.mappings.0.lock().unwrap().len();
        assert!(
            (1..=2).contains(&told),
            "{told} mappings for 6 equal answers"
        );
        proxy.shutdown.cancel();
    }

    /// An answer of more addresses than `max_ips_per_name` once had all of them allowed, sent
    /// to the peer and logged, though the cache kept only the cap: a crafted 64 KiB answer cost
    /// a map update per address, grant and port, and a mapping the agent refused to decode.
    #[tokio::test]
    async fn only_the_addresses_the_cache_keeps_are_allowed_told_and_logged() {
        let upstream = fake_upstream_answering(false, 60).await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        proxy.cache.lock().set_limits(CacheLimits {
            max_ips_per_name: 10,
            ..CacheLimits::UNLIMITED
        });
        let (answer, _) = ask_taking(proxy.dns, "cilium.io.", Some(4096)).await;
        assert_eq!(answer.answers.len(), 60, "the client gets the whole answer");
        assert_eq!(proxy.cache.lock().ip_count(), 10);

        let sorted = |mut ips: Vec<IpAddr>| {
            ips.sort();
            ips
        };
        let allowed = proxy.datapath.allowed.lock().unwrap().clone();
        assert_eq!(allowed.len(), 1);
        let kept = sorted(allowed[0].clone());
        assert_eq!(kept.len(), 10);
        let told = proxy.mappings.0.lock().unwrap().clone();
        assert_eq!(sorted(told[0].ips.clone()), kept);
        let logged = proxy
            .flows
            .recent()
            .into_iter()
            .find_map(|event| match event {
                warden_telemetry::FlowEvent::Dns(flow) if flow.qname == "cilium.io." => {
                    Some(flow.ips)
                }
                _ => None,
            })
            .expect("a flow event");
        assert_eq!(sorted(logged), kept);
        proxy.shutdown.cancel();
    }

    /// An upstream that ignored the client's limit: the whole answer went on, and a client
    /// that takes 512 bytes got a datagram it could not read whole, not a TC to retry over TCP.
    #[tokio::test]
    async fn an_answer_too_big_for_the_client_goes_as_a_tc_answer() {
        // Some 1,600 bytes.
        let upstream = fake_upstream_answering(false, 100).await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        // cilium.io's answer waits for its allow entries (a task of its own); another name's
        // leaves with the answer loop's batch.
        for (name, payload) in [
            ("cilium.io.", None),
            ("cilium.io.", Some(1232)),
            ("example.org.", None),
        ] {
            let (answer, _) = ask_taking(proxy.dns, name, payload).await;
            assert!(answer.metadata.truncation, "{name} {payload:?}: {answer:?}");
            assert!(answer.answers.is_empty(), "{name} {payload:?}");
            assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
            assert_eq!(answer.queries.len(), 1);
            assert_eq!(answer.edns.is_some(), payload.is_some());
        }
        // What fits goes whole.
        let (answer, _) = ask_taking(proxy.dns, "cilium.io.", Some(4096)).await;
        assert!(!answer.metadata.truncation);
        assert_eq!(answer.answers.len(), 100);
        assert_eq!(proxy.unexpected("oversized"), 3);
        // The flows say what each client got: the records once, in the answer that fit.
        let mut addresses: Vec<usize> = proxy
            .flows
            .recent()
            .into_iter()
            .filter_map(|event| match event {
                warden_telemetry::FlowEvent::Dns(flow) => Some(flow.ips.len()),
                warden_telemetry::FlowEvent::Drop(_) => None,
            })
            .collect();
        addresses.sort_unstable();
        assert_eq!(addresses, [0, 0, 0, 100]);
        proxy.shutdown.cancel();
    }

    /// A NOTIFY (another opcode than QUERY) gets NOTIMP, and is counted: it went uncounted.
    #[tokio::test]
    async fn a_message_of_another_opcode_gets_notimp_and_is_counted() {
        let upstream = fake_upstream(false).await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        let mut notify = Message::query();
        notify.metadata.id = 77;
        notify.metadata.op_code = OpCode::Notify;
        notify.add_query(Query::query(
            Name::from_ascii("cilium.io.").unwrap(),
            RecordType::SOA,
        ));
        let answer = exchange(proxy.dns, &notify).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NotImp);
        let malformed = proxy.metrics.dns.malformed.with_label_values(&["udp"]);
        assert_eq!(malformed.get(), 1);
        proxy.shutdown.cancel();
    }

    /// A TC answer cut inside a record (as some servers truncate) was refused as malformed:
    /// the client waited for a SERVFAIL at the timeout instead of asking again over TCP.
    #[tokio::test]
    async fn a_tc_answer_cut_inside_a_record_reaches_the_client_as_tc_at_once() {
        let upstream = fake_upstream_sending(|answer| {
            for n in 1..=100u8 {
                let name = answer.queries[0].name().clone();
                answer.add_answer(Record::from_rdata(
                    name,
                    60,
                    RData::A(A::new(198, 18, 0, n)),
                ));
            }
            let mut bytes = answer.to_vec().unwrap();
            // TC, and the header and question (27 bytes) then 29 records and a half.
            bytes[2] |= 0x02;
            bytes.truncate(500);
            Some(bytes)
        })
        .await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        for name in ["cilium.io.", "example.org."] {
            let (answer, took) = ask(proxy.dns, name).await;
            assert!(answer.metadata.truncation, "{name}: {answer:?}");
            assert!(answer.answers.is_empty(), "{name}");
            assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
            assert!(took < Duration::from_secs(1), "{name}: {took:?}");
        }
        assert_eq!(
            proxy.cache.lock().ip_count(),
            0,
            "nothing in it is believed"
        );
        assert_eq!(proxy.unexpected("cut_short"), 2);
        proxy.shutdown.cancel();
    }

    /// With no `max_ttl`, a TTL of 2^31 or more went to the client as sent, while the cache
    /// read it as 0: the client kept using an address whose allow entries were gone.
    #[tokio::test]
    async fn a_ttl_the_cache_reads_as_zero_reaches_the_client_as_zero() {
        let upstream = fake_upstream_answering_ttl(false, 1, 0x8000_0005).await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        let (answer, _) = ask(proxy.dns, "cilium.io.").await;
        assert_eq!(answer.answers.len(), 1);
        assert_eq!(answer.answers[0].ttl, 0);
        proxy.shutdown.cancel();
    }

    #[tokio::test]
    async fn an_answer_waits_for_its_allow_entries_but_no_longer_than_the_max_delay() {
        // The hold, the max delay and the bounds a second or more apart: a loaded machine
        // wakes hundreds of milliseconds late, which must not carry an answer across one.
        let hold = Duration::from_secs(1);
        let max_delay = Duration::from_secs(4);
        let upstream = fake_upstream(false).await;
        // A proxy whose allow entries take `writes` to be written.
        let holding = |writes: Duration| {
            let proxy_settings = ProxySettings {
                response_max_delay: max_delay,
                ..settings(
                    "127.0.0.1:0".parse().unwrap(),
                    upstream,
                    Duration::from_secs(2),
                    Duration::ZERO,
                )
            };
            start_with_settings(proxy_settings, writes, false, Arc::new(OneEndpoint))
        };
        let quick = holding(hold).await;
        let (answer, took) = ask(quick.dns, "cilium.io.").await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer.answers.len(), 1);
        assert!(took >= hold, "released at {took:?}");
        // Released when its entries are written, not at the max delay.
        assert!(
            took < max_delay - Duration::from_secs(1),
            "released at {took:?}"
        );
        assert_eq!(quick.datapath.calls.load(Ordering::SeqCst), 1);
        assert_eq!(quick.mappings.0.lock().unwrap().len(), 1);

        // A name no toFQDNs selector matches has nothing to write and does not wait.
        let (answer, took) = ask(quick.dns, "example.org.").await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(took < hold, "released at {took:?}");
        assert_eq!(quick.datapath.calls.load(Ordering::SeqCst), 1);
        quick.shutdown.cancel();

        let stuck = holding(Duration::from_secs(30)).await;
        let (answer, took) = ask(stuck.dns, "cilium.io.").await;
        assert_eq!(answer.answers.len(), 1, "released anyway");
        assert!(took >= max_delay, "released at {took:?}");
        assert!(
            took < max_delay + Duration::from_secs(3),
            "released at {took:?}"
        );
        stuck.shutdown.cancel();
    }

    /// The standalone proxy lingered 300 ms at every exit, though without a datapath to steer
    /// the port's traffic there was nothing to wait for.
    #[tokio::test]
    async fn a_proxy_lingers_at_shutdown_only_after_steering_traffic_away() {
        let upstream = fake_upstream(false).await;
        let linger = Duration::from_secs(1);
        for steers in [false, true] {
            let running = start_with(
                "127.0.0.1:0".parse().unwrap(),
                upstream,
                Duration::ZERO,
                Duration::from_secs(2),
                linger,
                steers,
                Arc::new(OneEndpoint),
            )
            .await;
            let (answer, _) = ask(running.dns, "cilium.io.").await;
            assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
            let stopping = Instant::now();
            running.shutdown.cancel();
            running.served.await.unwrap();
            let took = stopping.elapsed();
            if steers {
                assert!(took >= linger, "steered, yet left after {took:?}");
            } else {
                assert!(
                    took < linger / 2,
                    "nothing steered, yet left after {took:?}"
                );
            }
        }
    }

    /// A query the datapath redirected from an enrolled cgroup this process cannot place (its
    /// enrollment newer than its view) passed as an unenforced sender's, skipping the DNS rules.
    #[tokio::test]
    async fn a_sender_of_no_known_endpoint_gets_servfail_and_nothing_is_forwarded() {
        let upstream = fake_upstream(false).await;
        let running = start_with(
            "127.0.0.1:0".parse().unwrap(),
            upstream,
            Duration::ZERO,
            Duration::from_secs(2),
            Duration::ZERO,
            false,
            Arc::new(UnknownEnrolled),
        )
        .await;
        let (answer, took) = ask(running.dns, "cilium.io.").await;
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert!(answer.answers.is_empty());
        assert!(
            took < Duration::from_secs(1),
            "at once, not at the timeout: {took:?}"
        );
        assert_eq!(
            running.cache.lock().name_count(),
            0,
            "nothing was forwarded"
        );
        assert_eq!(running.datapath.calls.load(Ordering::SeqCst), 0);
        running.shutdown.cancel();
    }

    /// An unenforced sender may ask any server (one it runs) anything: what it is told must not
    /// open `app=test`'s toFQDNs rule for cilium.io. It was cached and granted to every
    /// endpoint whose rules matched the name.
    #[tokio::test]
    async fn an_unenforced_senders_answers_open_nothing() {
        let upstream = fake_upstream(false).await;
        for sender in [Some(EndpointId(2)), None] {
            let running = start_with(
                "127.0.0.1:0".parse().unwrap(),
                upstream,
                Duration::ZERO,
                Duration::from_secs(2),
                Duration::ZERO,
                false,
                Arc::new(Unenforced(sender)),
            )
            .await;
            let (answer, _) = ask(running.dns, "cilium.io.").await;
            assert_eq!(answer.answers.len(), 1, "{sender:?}: answered all the same");
            assert_eq!(running.cache.lock().name_count(), 0, "{sender:?}");
            assert_eq!(
                running.datapath.calls.load(Ordering::SeqCst),
                0,
                "{sender:?}"
            );
            assert!(running.mappings.0.lock().unwrap().is_empty(), "{sender:?}");
            running.shutdown.cancel();
        }
    }

    /// A slow upstream's answer, after its query timed out, was counted with the forgeries
    /// (`id`), which dashboards read as possible spoofing.
    #[tokio::test]
    async fn an_answer_after_the_timeout_counts_as_late_not_as_a_forgery() {
        let upstream =
            fake_upstream_sending_after(Duration::from_millis(400), |answer| answer.to_vec().ok())
                .await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_millis(150)).await;
        let (answer, _) = ask(proxy.dns, "cilium.io.").await;
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        wait_count(|| proxy.unexpected("late"), 1, Duration::from_secs(2)).await;
        assert_eq!(proxy.unexpected("id"), 0);
        proxy.shutdown.cancel();
    }

    /// A query whose datagram the upstream never got (its queue full in a burst, a conntrack
    /// race on the way) waited the whole `upstream_timeout` and got SERVFAIL; the client's
    /// own retry would come later still. It is sent again after a few round trips.
    #[tokio::test]
    async fn a_query_lost_on_the_way_upstream_is_answered_after_its_second_copy() {
        let seen = Mutex::new(std::collections::HashSet::new());
        // Drops the first copy of every query it gets.
        let upstream = fake_upstream_sending(move |answer| {
            if seen.lock().unwrap().insert(answer.metadata.id) {
                return None;
            }
            answer.to_vec().ok()
        })
        .await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        let (answer, took) = ask(proxy.dns, "cilium.io.").await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(
            took >= crate::upstream::RETRANSMIT_INITIAL && took < Duration::from_secs(1),
            "answered at {took:?}"
        );
        assert_eq!(proxy.metrics.dns.upstream_retransmits.get(), 1);
        assert_eq!(proxy.unexpected("late"), 0);
        proxy.shutdown.cancel();
    }

    #[tokio::test]
    async fn a_silent_upstream_gets_servfail_after_the_timeout() {
        let upstream = fake_upstream(true).await;
        let running = start(upstream, Duration::ZERO, Duration::from_millis(300)).await;
        let (answer, took) = ask(running.dns, "cilium.io.").await;
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(answer.queries.len(), 1, "the question is echoed");
        assert!(took >= Duration::from_millis(300), "answered at {took:?}");
        assert!(took < Duration::from_secs(1), "answered at {took:?}");

        // Idle for over a second, the sweep loop sleeps; the next query wakes it.
        tokio::time::sleep(SWEEP_EVERY * (SWEEPS_BEFORE_SLEEP + 20)).await;
        let (answer, took) = ask(running.dns, "cilium.io.").await;
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert!(took >= Duration::from_millis(300), "answered at {took:?}");
        assert!(took < Duration::from_secs(1), "answered at {took:?}");
        running.shutdown.cancel();
    }

    /// A listener loop forwards a run of batches from one pool socket, then the next run from
    /// another: the answers coming back on one socket are read together, by one answer loop.
    #[tokio::test]
    async fn a_listener_forwards_a_run_of_batches_from_one_pool_socket() {
        let (sources_tx, mut sources_rx) = tokio::sync::mpsc::unbounded_channel();
        let upstream = fake_upstream_seeing(Duration::ZERO, move |answer, from| {
            let _ = sources_tx.send((from.port(), answer.queries[0].name().to_ascii()));
            answer.to_vec().ok()
        })
        .await;
        let proxy = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        // One client socket, so one listener socket gets every query; one query at a time, so
        // each is a batch of its own.
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for id in 0..=BATCHES_PER_TURN {
            let mut query = Message::query();
            query.metadata.id = u16::try_from(id).unwrap();
            // A name of its own: the proxy's upstream IDs are random and may repeat.
            query.add_query(Query::query(
                Name::from_ascii(format!("q{id}.cilium.io.")).unwrap(),
                RecordType::A,
            ));
            let answer = exchange_from(&client, proxy.dns, &query).await;
            assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        }
        // A copy sent again on a stalled machine comes from the same port with the same question.
        let mut seen = std::collections::HashSet::new();
        let mut sources = Vec::new();
        while let Ok((port, name)) = sources_rx.try_recv() {
            if seen.insert((port, name)) {
                sources.push(port);
            }
        }
        let run = usize::try_from(BATCHES_PER_TURN).unwrap();
        assert_eq!(sources.len(), run + 1, "one question upstream per query");
        assert!(
            sources[..run].iter().all(|port| *port == sources[0]),
            "one pool socket for the run: {sources:?}"
        );
        // `settings` gives the pool two sockets: the next turn is the other one.
        assert_ne!(
            sources[run], sources[0],
            "the next run from the next socket"
        );
        proxy.shutdown.cancel();
    }

    /// `listen_sockets` sockets share each listen address's port, and the kernel hands each
    /// its share of the clients: one socket read by one loop was one core's work.
    #[tokio::test]
    async fn every_socket_of_an_address_gets_its_share_of_the_clients() {
        let upstream = fake_upstream(false).await;
        let settings = ProxySettings {
            upstream_sockets: 1,
            listen_sockets: 3,
            ..settings(
                "127.0.0.1:0".parse().unwrap(),
                upstream,
                Duration::from_secs(2),
                Duration::ZERO,
            )
        };
        let context = ProxyContext {
            instance: Arc::from("shares"),
            endpoints: Arc::new(OneEndpoint),
            policy: Arc::new(Fixed(policy(upstream))),
            cache: SharedCache::new(DnsCache::new(CacheLimits::default())),
            datapath: Arc::new(SlowDatapath {
                delay: Duration::ZERO,
                calls: AtomicUsize::new(0),
                allowed: Mutex::default(),
            }),
            mappings: Arc::new(Recorded::default()),
            metrics: Metrics::new("shares").unwrap(),
            flows: Arc::new(FlowLog::new(10)),
        };
        let proxy = DnsProxy::bind(settings, context).unwrap();
        let port = proxy.local_addrs();
        assert_eq!(port.len(), 1, "one address for the three sockets");
        assert_eq!(proxy.udp_listeners.len(), 3);
        assert_eq!(
            proxy.listener_fds().len(),
            4,
            "the UDP sockets and the TCP one"
        );

        // Not serving yet: what each socket holds is what the kernel gave it.
        for _ in 0..64 {
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            client.send_to(b"not read", port[0]).await.unwrap();
        }
        let mut inbox = crate::datagram::Inbox::new(64, 512);
        let mut shares = vec![0; proxy.udp_listeners.len()];
        let deadline = Instant::now() + Duration::from_secs(5);
        // Delivery may lag the sends on a loaded machine.
        while shares.iter().sum::<usize>() < 64 && Instant::now() < deadline {
            for (socket, share) in proxy.udp_listeners.iter().zip(&mut shares) {
                assert_eq!(socket.local_addr().unwrap(), port[0]);
                *share += socket.recv_batch_now(&mut inbox).unwrap_or(0);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(shares.iter().sum::<usize>(), 64, "{shares:?}");
        assert!(shares.iter().all(|share| *share > 0), "{shares:?}");

        // Serving, every socket is read: 64 clients, spread over the port's two sockets, are
        // all answered.
        let running = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        let mut asking = Vec::new();
        for _ in 0..64 {
            asking.push(tokio::spawn(ask(running.dns, "cilium.io.")));
        }
        for asked in asking {
            let (answer, _) = asked.await.unwrap();
            assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        }
        running.shutdown.cancel();
    }

    /// A socket bound to the wildcard stays in the port's group while it drains, so a steady
    /// stream kept its drain, and the shutdown, going for as long as the stream lasted.
    #[tokio::test]
    async fn a_wildcard_listener_under_steady_traffic_still_shuts_down() {
        let upstream = fake_upstream(false).await;
        let running = start_on(
            "0.0.0.0:0".parse().unwrap(),
            upstream,
            Duration::ZERO,
            Duration::from_secs(2),
        )
        .await;
        let target = SocketAddr::from(([127, 0, 0, 1], running.dns.port()));
        let packet = cilium_io_query().to_vec().unwrap();
        let stream = CancellationToken::new();
        let sender = tokio::spawn({
            let stream = stream.clone();
            async move {
                // Many source ports, so that both sockets of the address get their share.
                let mut clients = Vec::new();
                for _ in 0..16 {
                    clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                }
                let mut ticks = tokio::time::interval(Duration::from_micros(200));
                let mut index = 0;
                while !stream.is_cancelled() {
                    ticks.tick().await;
                    let _ = clients[index % clients.len()]
                        .send_to(&packet, target)
                        .await;
                    index += 1;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        running.shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), running.served).await;
        stream.cancel();
        sender.await.unwrap();
        assert!(ended.is_ok(), "the shutdown waited for the traffic to stop");
    }

    #[tokio::test]
    async fn a_proxy_leaving_a_shared_port_loses_no_query() {
        let upstream = fake_upstream(false).await;
        let leaving = start(upstream, Duration::ZERO, Duration::from_secs(2)).await;
        let staying = start_on(
            leaving.dns,
            upstream,
            Duration::ZERO,
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(staying.dns, leaving.dns);

        // Many source ports, so that the kernel spreads the queries over both sockets.
        let mut clients = Vec::new();
        for _ in 0..16 {
            clients.push(Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()));
        }
        let answered = Arc::new(AtomicUsize::new(0));
        let mut readers = Vec::new();
        for client in &clients {
            let (client, answered) = (client.clone(), answered.clone());
            readers.push(tokio::spawn(async move {
                let mut buffer = vec![0u8; 1500];
                // Silence for seconds is the end: a loaded machine delays an answer hundreds of
                // milliseconds.
                while let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buffer))
                        .await
                {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        let packet = cilium_io_query().to_vec().unwrap();
        // 3 s of queries, the leaving proxy stopped after the first second: the stream goes on
        // for 2 s more, past the bound on its leaving below.
        let mut ticks = tokio::time::interval(Duration::from_micros(500));
        let sent = 6_000;
        let mut left = None;
        let mut leaving_served = Some(leaving.served);
        for index in 0..sent {
            ticks.tick().await;
            if index == sent / 3 {
                leaving.shutdown.cancel();
                let served = leaving_served.take().unwrap();
                left = Some(tokio::spawn(async move {
                    let stopped = Instant::now();
                    served.await.unwrap();
                    stopped.elapsed()
                }));
            }
            clients[index % clients.len()]
                .send_to(&packet, leaving.dns)
                .await
                .unwrap();
        }
        for reader in readers {
            reader.await.unwrap();
        }
        assert_eq!(answered.load(Ordering::SeqCst), sent);
        // It drained at once: leaving does not wait on the traffic (waiting, it would take 2 s).
        let took = left.unwrap().await.unwrap();
        assert!(took < Duration::from_secs(1), "left after {took:?}");
        staying.shutdown.cancel();
    }
}
