//! Pieces of the admin HTTP API common to both processes: serving a router until shutdown,
//! the `/metrics` and `/healthz` handlers, and the flow-event endpoints.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast, watch};

use crate::flows::{FlowFollower, FlowLine, LostEvents};

mod stall;
use crate::{FlowEvent, FlowLog, Metrics, TelemetryError, unix_millis};
use stall::StallLimit;

/// Events per chunk when a stream sends the retained events, or live ones that queued up.
const STREAM_BATCH: usize = 256;

/// How long requests in progress may take to finish once the server shuts down. A client that
/// stopped reading (`warden observe --follow | less`, a listing piped into a pager) would
/// otherwise hold the process's exit until it read or went away.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Flow streams followed at once, in each process (`warden observe` takes one per process).
const FOLLOWERS_AT_ONCE: usize = 16;

/// Flow listings (`GET /v1/flows` without `follow`) served at once: each holds its copy of
/// the retained events (several MB at 10,000 events with long names and many addresses)
/// until its client has read it.
const LISTINGS_AT_ONCE: usize = 4;

/// Admin connections open at once, in each process. Each holds a socket and hyper's buffers
/// (growing to hundreds of KB for a client trickling header bytes): without a bound, clients
/// opening connections and sending nothing ran the process out of file descriptors, which
/// the DNS proxy's TCP and upstream sockets need too. Past it a new connection is closed at
/// once; probes and scrapes take one at a time.
const CONNECTIONS_AT_ONCE: usize = 128;

/// How long a connection may take to send a request's head, counted from when it opened or
/// got its last answer: a connection idle for longer is closed (Prometheus and the CLI
/// connect again), so silent clients cannot keep their places among [`CONNECTIONS_AT_ONCE`].
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a response may wait for room in its socket before the connection is closed: a
/// client that asks and never reads (a listing or a busy flow stream into a stopped pager, a
/// deliberate flood) would otherwise keep its place among [`CONNECTIONS_AT_ONCE`], and a
/// listing's copy, for as long as it stays connected. The kernel makes room only once the
/// client has taken a good part of the send buffer (a third of up to 4 MB on loopback), so a
/// client reading for good but slower than about 10 KB/s is closed too (`warden observe
/// --follow` connects again where it left off). A response with nothing to send, a quiet
/// followed stream, is never timed.
const WRITE_STALL_LIMIT: Duration = Duration::from_secs(120);

/// Binds the admin listener. Separate from [`serve`] so callers learn the bound address
/// (port 0 in tests) before they start serving.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, TelemetryError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| TelemetryError::Bind { address, source })
}

/// Tells flow streams that the server is shutting down. A graceful shutdown waits for every
/// response to finish, and a followed stream never finishes by itself.
#[derive(Debug, Clone)]
struct StreamsClosing(watch::Receiver<bool>);

/// Serves `router` until `shutdown` resolves, then ends the flow streams being followed and
/// lets the other requests in progress finish, for [`SHUTDOWN_GRACE`] at most: responses not
/// taken by then are dropped with the process.
///
/// At most [`CONNECTIONS_AT_ONCE`] connections are open at once, and each must send a
/// request's head within [`HEADER_READ_TIMEOUT`] of opening or of its last answer, else it is
/// closed: the admin port is on the node's address in the Kubernetes manifests, and clients
/// holding connections open and silent would otherwise shut the kubelet's probes out (and,
/// without the cap, run the process out of file descriptors). A response being written has no
/// deadline as a whole (a followed stream goes on for hours), but one whose client takes none
/// of it for [`WRITE_STALL_LIMIT`] is closed.
pub async fn serve(
    mut listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (closing, closed) = watch::channel(false);
    let router = router.layer(Extension(StreamsClosing(closed.clone())));
    let open = Arc::new(Semaphore::new(CONNECTIONS_AT_ONCE));
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, client) = tokio::select! {
            () = &mut shutdown => break,
            // Finished connections leave the set as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
        };
        let Ok(place) = Arc::clone(&open).try_acquire_owned() else {
            static BUDGET: crate::LogBudget = crate::LogBudget::new(crate::LogBudget::INTERVAL);
            if let Some(held_back) = BUDGET.allow() {
                tracing::warn!(
                    %client,
                    held_back,
                    "{CONNECTIONS_AT_ONCE} admin connections open already: closed"
                );
            }
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut closed = closed.clone();
        connections.spawn(async move {
            let _place = place;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(StallLimit::new(stream, WRITE_STALL_LIMIT)),
                    service,
                );
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                // An error is the client's (gone, too slow, not HTTP): nothing to do.
                _ = connection.as_mut() => return,
                // An error means the server is gone: shut down all the same.
                _ = closed.wait_for(|closing| *closing) => {}
            }
            // The request in progress finishes (a followed stream ends at `closing`), then
            // the connection closes.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener);
    // No receiver left only means no connection is open.
    let _ = closing.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    // What did not finish in time is dropped with the set.
}

/// `/healthz` (the process is alive), `/metrics`, and `/v1/flows` (flow events).
///
/// `GET /v1/flows` answers a JSON array of the retained events, oldest first;
/// `?since_ms=T` keeps those with `time_ms >= T`. `?follow=true` answers newline-delimited
/// JSON instead: the retained events (after `since_ms`), then every new event as it is
/// recorded, until the client goes away or the server shuts down. A follower too slow to keep
/// up gets a `{"type":"lost","time_ms":..,"count":N}` line in place of the N events it missed;
/// recording never waits for it.
pub fn common_routes(metrics: Metrics, flows: Arc<FlowLog>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(metrics): State<Metrics>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics.render(),
                )
            })
            .with_state(metrics),
        )
        .route(
            "/v1/flows",
            get(flows_handler).with_state(FlowsState {
                log: flows,
                followers: Arc::new(Semaphore::new(FOLLOWERS_AT_ONCE)),
                listings: Arc::new(Semaphore::new(LISTINGS_AT_ONCE)),
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowQuery {
    follow: Option<String>,
    since_ms: Option<u64>,
}

/// The flow log, and the places of the streams followed and the listings served at once:
/// each holds its copy of the retained events until its client has read them.
#[derive(Debug, Clone)]
struct FlowsState {
    log: Arc<FlowLog>,
    followers: Arc<Semaphore>,
    listings: Arc<Semaphore>,
}

async fn flows_handler(
    State(FlowsState {
        log: flows,
        followers,
        listings,
    }): State<FlowsState>,
    closing: Option<Extension<StreamsClosing>>,
    Query(query): Query<FlowQuery>,
) -> Response {
    let follow = match query
        .follow
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("false" | "0" | "no") => false,
        Some("" | "true" | "1" | "yes") => true,
        Some(other) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("follow must be true or false, not {other:?}\n"),
            )
                .into_response();
        }
    };
    if !follow {
        let Ok(listing) = listings.try_acquire_owned() else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{LISTINGS_AT_ONCE} flow listings served already; try again\n"),
            )
                .into_response();
        };
        // A JSON array written out in chunks as the client reads it, holding its place
        // until the last one is taken.
        let events = flows.recent_since(query.since_ms).into_iter();
        let chunks = futures_util::stream::unfold(
            (Some(events), true, false, listing),
            |(events, first_chunk, wrote_any, listing)| async move {
                let mut events = events?;
                let mut chunk = if first_chunk {
                    b"[".to_vec()
                } else {
                    Vec::new()
                };
                let mut wrote_any = wrote_any;
                for event in events.by_ref().take(STREAM_BATCH) {
                    // Serializing plain data cannot fail; a failure would only lose an event.
                    let Ok(json) = serde_json::to_vec(&event) else {
                        continue;
                    };
                    if wrote_any {
                        chunk.push(b',');
                    }
                    chunk.extend_from_slice(&json);
                    wrote_any = true;
                }
                let rest = if events.len() > 0 {
                    Some(events)
                } else {
                    chunk.push(b']');
                    None
                };
                Some((
                    Ok::<_, Infallible>(Bytes::from(chunk)),
                    (rest, false, wrote_any, listing),
                ))
            },
        );
        return (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(chunks),
        )
            .into_response();
    }
    let Ok(following) = followers.try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{FOLLOWERS_AT_ONCE} flow streams followed already; try again\n"),
        )
            .into_response();
    };
    let (retained, follower) = flows.follow_since(query.since_ms);
    let stream = FlowStream {
        retained: retained.into_iter(),
        follower,
        closing: closing.map(|Extension(StreamsClosing(closing))| closing),
        _following: Some(following),
    };
    let body = Body::from_stream(futures_util::stream::unfold(stream, FlowStream::next));
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The state of one `?follow=true` response.
struct FlowStream {
    retained: std::vec::IntoIter<FlowEvent>,
    follower: FlowFollower,
    /// `None` when the router is served by something other than [`serve`] (tests).
    closing: Option<watch::Receiver<bool>>,
    /// Its place among the streams followed at once.
    _following: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl FlowStream {
    /// The next chunk of lines; `None` ends the response.
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, FlowStream)> {
        let mut chunk = Vec::new();
        for event in self.retained.by_ref().take(STREAM_BATCH) {
            push_line(&mut chunk, &FlowLine::from(event));
        }
        if !chunk.is_empty() {
            return Some((Ok(Bytes::from(chunk)), self));
        }
        let received = tokio::select! {
            () = closed(self.closing.as_mut()) => return None,
            received = self.follower.recv() => received,
        };
        let mut pending = Some(received);
        for _ in 0..STREAM_BATCH {
            let received = match pending.take() {
                Some(received) => received,
                // Whatever else queued up meanwhile goes in the same chunk.
                None => match self.follower.try_recv() {
                    Ok(event) => Ok(event),
                    Err(broadcast::error::TryRecvError::Lagged(count)) => {
                        Err(broadcast::error::RecvError::Lagged(count))
                    }
                    Err(_) => break,
                },
            };
            match received {
                Ok(event) => push_line(&mut chunk, &FlowLine::from(event)),
                Err(broadcast::error::RecvError::Lagged(count)) => push_line(
                    &mut chunk,
                    &FlowLine::Lost(LostEvents {
                        time_ms: unix_millis(),
                        instance: String::new(),
                        count,
                    }),
                ),
                Err(broadcast::error::RecvError::Closed) if chunk.is_empty() => return None,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        Some((Ok(Bytes::from(chunk)), self))
    }
}

/// Resolves once the server shuts down; never without a shutdown signal to watch.
async fn closed(closing: Option<&mut watch::Receiver<bool>>) {
    match closing {
        // An error means the sender is gone: the server stopped.
        Some(closing) => {
            let _ = closing.wait_for(|closing| *closing).await;
        }
        None => std::future::pending().await,
    }
}

fn push_line(chunk: &mut Vec<u8>, line: &FlowLine) {
    // Serializing plain data cannot fail; a failure would only lose this line.
    if let Ok(json) = serde_json::to_vec(line) {
        chunk.extend_from_slice(&json);
        chunk.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::flows::FOLLOW_BACKLOG;
    use crate::{DropFlow, FlowEvent};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    fn drop_event(port: u16) -> FlowEvent {
        FlowEvent::Drop(DropFlow {
            time_ms: u64::from(port),
            time_ns: u64::from(port) * 1_000_000,
            instance: "agent".into(),
            endpoint: "youssef/test".into(),
            destination: "198.18.1.30".parse().unwrap(),
            port,
            protocol: "tcp".into(),
        })
    }

    /// [`serve`] with the common routes over `flows` on a free loopback port: its address,
    /// the sender that stops it, and its task.
    async fn served(
        flows: Arc<FlowLog>,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let metrics = Metrics::new("agent").unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, common_routes(metrics, flows), async move {
            let _ = stopped.await;
        }));
        (address, stop, server)
    }

    /// Reads one line of the body, skipping the HTTP head and chunk-size lines.
    async fn next_json_line(
        reader: &mut BufReader<tokio::net::TcpStream>,
    ) -> Option<serde_json::Value> {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            if line.starts_with('{') {
                return serde_json::from_str(line.trim()).ok();
            }
        }
    }

    #[tokio::test]
    async fn a_followed_stream_sends_retained_then_live_events_and_ends_at_shutdown() {
        let flows = Arc::new(FlowLog::new(16));
        flows.record(drop_event(1));
        flows.record(drop_event(2));
        let (address, stop, server) = served(flows.clone()).await;
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /v1/flows?follow=true&since_ms=2 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reader = BufReader::new(stream);
        let first = next_json_line(&mut reader).await.unwrap();
        assert_eq!(first["port"], 2, "since_ms drops older events: {first}");
        flows.record(drop_event(3));
        let live = next_json_line(&mut reader).await.unwrap();
        assert_eq!(live["port"], 3);
        let _ = stop.send(());
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while next_json_line(&mut reader).await.is_some() {}
        })
        .await;
        assert!(ended.is_ok(), "the stream did not end at shutdown");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("graceful shutdown waited on a followed stream")
            .unwrap();
    }

    /// A client that stopped reading held the graceful shutdown, and with it the process's
    /// exit, until it read or went away.
    #[tokio::test]
    async fn a_client_that_stops_reading_does_not_hold_the_shutdown() {
        // More than the socket buffers hold, then a stream that would go on.
        let flows = Arc::new(FlowLog::new(60_000));
        for port in 0..60_000u16 {
            flows.record(drop_event(port));
        }
        let (address, stop, server) = served(flows).await;
        // Some MB of events, none read, through a small window.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut deaf = socket.connect(address).await.unwrap();
        deaf.write_all(b"GET /v1/flows?follow=true HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = stop.send(());
        tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(3), server)
            .await
            .expect("the shutdown waited for a client that does not read")
            .unwrap();
        drop(deaf);
    }

    /// Followers that read slowly or not at all each held a copy of the retained events, as
    /// many as clients asked for.
    #[tokio::test]
    async fn followers_past_the_limit_get_503() {
        let state = FlowsState {
            log: Arc::new(FlowLog::new(4)),
            followers: Arc::new(tokio::sync::Semaphore::new(1)),
            listings: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        let follow = || {
            flows_handler(
                State(state.clone()),
                None,
                Query(FlowQuery {
                    follow: Some("true".into()),
                    since_ms: None,
                }),
            )
        };
        let following = follow().await;
        assert_eq!(following.status(), StatusCode::OK);
        assert_eq!(follow().await.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(following);
        assert_eq!(follow().await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_follower_that_lags_gets_a_lost_marker() {
        let flows = FlowLog::new(4);
        let (retained, follower) = flows.follow_since(None);
        for port in 0..(FOLLOW_BACKLOG + 7) {
            flows.record(drop_event(u16::try_from(port % 60_000).unwrap()));
        }
        let stream = FlowStream {
            retained: retained.into_iter(),
            follower,
            closing: None,
            _following: None,
        };
        let (chunk, _) = stream.next().await.unwrap();
        let chunk = chunk.unwrap();
        let first = std::str::from_utf8(&chunk).unwrap().lines().next().unwrap();
        let line: FlowLine = serde_json::from_str(first).unwrap();
        assert!(
            matches!(line, FlowLine::Lost(LostEvents { count: 7, .. })),
            "{first}"
        );
    }

    fn listing_state(events: u16) -> FlowsState {
        let flows = Arc::new(FlowLog::new(usize::from(events).max(1)));
        for port in 1..=events {
            flows.record(drop_event(port));
        }
        FlowsState {
            log: flows,
            followers: Arc::new(tokio::sync::Semaphore::new(1)),
            listings: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    async fn listing(state: &FlowsState, since_ms: Option<u64>) -> Response {
        flows_handler(
            State(state.clone()),
            None,
            Query(FlowQuery {
                follow: None,
                since_ms,
            }),
        )
        .await
    }

    async fn listed(response: Response) -> Vec<FlowEvent> {
        assert_eq!(response.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn flows_without_follow_are_a_json_array_filtered_by_time() {
        let state = listing_state(5);
        assert_eq!(
            listed(listing(&state, Some(5)).await).await,
            vec![drop_event(5)]
        );
        assert!(listed(listing(&state, Some(6)).await).await.is_empty());
        // Written out in chunks, one array all the same.
        let state = listing_state(1_000);
        let events = listed(listing(&state, None).await).await;
        assert_eq!(events.len(), 1_000);
        assert_eq!(events[999], drop_event(1_000));
    }

    /// Each listing holds its copy of up to 10,000 events until its client reads it: clients
    /// asking and never reading held as many as they liked.
    #[tokio::test]
    async fn listings_past_the_limit_get_503() {
        let state = listing_state(3);
        let unread = listing(&state, None).await;
        assert_eq!(unread.status(), StatusCode::OK);
        assert_eq!(
            listing(&state, None).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Read to its end, it gives its place back.
        assert_eq!(listed(unread).await.len(), 3);
        assert_eq!(listed(listing(&state, None).await).await.len(), 3);
    }

    /// A connection silent for longer than the header read timeout is closed, so that
    /// silent clients cannot hold the places probes need; one that asks in time is answered,
    /// and closed once it has been idle as long after its answer.
    #[tokio::test(start_paused = true)]
    async fn silent_admin_connections_are_closed() {
        use tokio::io::AsyncReadExt;
        let flows = Arc::new(FlowLog::new(4));
        let (address, stop, server) = served(flows).await;
        // The clock is paused: it moves to the server's timer once everything waits. The
        // connection closes a header read timeout (and less than two) after `since`.
        let closes_after = |mut stream: tokio::net::TcpStream, since: tokio::time::Instant| async move {
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(HEADER_READ_TIMEOUT * 4, stream.read_to_end(&mut rest));
            assert_eq!(closed.await.expect("never closed").unwrap_or(0), 0);
            let waited = since.elapsed();
            assert!(
                (HEADER_READ_TIMEOUT..HEADER_READ_TIMEOUT * 2).contains(&waited),
                "closed {waited:?} after"
            );
        };
        let started = tokio::time::Instant::now();
        let silent = tokio::net::TcpStream::connect(address).await.unwrap();
        closes_after(silent, started).await;
        let mut asking = tokio::net::TcpStream::connect(address).await.unwrap();
        asking
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0; 256];
        let read = asking.read(&mut answer).await.unwrap();
        assert!(answer[..read].starts_with(b"HTTP/1.1 200"), "{answer:?}");
        closes_after(asking, tokio::time::Instant::now()).await;
        let _ = stop.send(());
        server.await.unwrap();
    }

    /// Clients opening connections and sending nothing ran the process out of file
    /// descriptors: past the cap a new connection is closed at once, and one that closes
    /// makes room.
    #[tokio::test]
    async fn admin_connections_past_the_cap_are_closed() {
        use tokio::io::AsyncReadExt;
        let flows = Arc::new(FlowLog::new(4));
        let (address, stop, server) = served(flows).await;
        let mut idle = Vec::new();
        for _ in 0..CONNECTIONS_AT_ONCE {
            idle.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        let healthz = |address| async move {
            let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
            // The write may fail once the server has closed the connection.
            let _ = client
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut answer = String::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut answer))
                    .await
                    .expect("neither answered nor closed");
            (read.is_ok(), answer)
        };
        let (_, refused) = healthz(address).await;
        assert!(refused.is_empty(), "answered past the cap: {refused}");
        drop(idle.pop());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, answer) = healthz(address).await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no room made: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(idle);
        let _ = stop.send(());
        server.await.unwrap();
    }
}
