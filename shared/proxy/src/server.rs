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
use crate::engine::Engine;
use crate::listener::bind_pair;
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
    /// 0 = unlimited.
    pub concurrency_limit: usize,
    pub upstream_sockets: usize,
    /// A TCP client connection with no query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// After steering the port's traffic to the peer at shutdown, how long the listeners keep
    /// reading what was already queued on them before they close.
    pub linger: Duration,
}

/// A bound, not yet serving, DNS proxy.
#[derive(Debug)]
pub struct DnsProxy {
    tcp_listeners: Vec<TcpListener>,
    engine: Arc<Engine>,
}

impl DnsProxy {
    /// Binds every listen address (UDP and TCP) and opens the upstream pool. Must run inside
    /// a tokio runtime.
    pub fn bind(settings: ProxySettings, context: ProxyContext) -> Result<DnsProxy, ProxyError> {
        let mut udp_listeners = Vec::with_capacity(settings.listen.len());
        let mut tcp_listeners = Vec::with_capacity(settings.listen.len());
        for address in &settings.listen {
            let pair = bind_pair(*address)?;
            udp_listeners.push(Arc::new(pair.udp));
            tcp_listeners.push(pair.tcp);
        }
        let upstream = UpstreamPool::open(settings.upstream_sockets, settings.upstream)?;
        Ok(DnsProxy {
            tcp_listeners,
            engine: Arc::new(Engine::new(settings, context, udp_listeners, upstream)),
        })
    }

    /// The bound addresses, in the order of `listen` (the real port when 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.engine
            .udp_listeners
            .iter()
            .filter_map(|socket| socket.local_addr().ok())
            .collect()
    }

    /// The listener sockets, for registering them with the datapath's reuseport selection:
    /// UDP then TCP of each listen address.
    pub fn listener_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.engine
            .udp_listeners
            .iter()
            .zip(&self.tcp_listeners)
            .flat_map(|(udp, tcp)| [udp.as_fd(), tcp.as_fd()])
            .collect()
    }

    /// Serves until `shutdown` is cancelled; then leaves the port's serving group (see
    /// [`DnsProxy::serve_and_leave`]), lets the queries in flight finish, and returns.
    pub async fn serve(self, shutdown: CancellationToken) {
        self.serve_and_leave(shutdown, || {}).await;
    }

    /// Like [`DnsProxy::serve`]; at shutdown `leave` runs first (it steers new queries to the
    /// peer process), the listeners keep reading for `linger` so nothing already queued on
    /// them is lost, then they stop and the queries in flight finish.
    pub async fn serve_and_leave(self, shutdown: CancellationToken, leave: impl FnOnce()) {
        let tracker = TaskTracker::new();
        let engine = self.engine;
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
        for listener in self.tcp_listeners {
            listener_loops.push(tokio::spawn(tcp::listener_loop(
                listener,
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
        for listener_loop in listener_loops {
            // The loops end on the same token; joining them closes the TCP listeners.
            let _ = listener_loop.await;
        }
        engine.context.metrics.dns.serving.set(0);
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
        // Whatever still waits gets its SERVFAIL rather than silence.
        for waiting in engine.upstream.drain() {
            udp::time_out(&engine, waiting, &tracker);
        }
    }
}
