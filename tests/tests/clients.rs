//! The client wrappers against misbehaving servers: they must report what happened rather
//! than hang or claim success.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use warden_tests::unique_loopback_v4;
use warden_tests::{DigOpts, NoReply, dig, init_tracing, kdig, kdig_tcp_multi, require_tools};

/// A TCP DNS server that answers one query per connection with REFUSED, then closes it.
async fn one_query_per_connection_server() -> (SocketAddr, tokio::task::JoinHandle<usize>) {
    let ip = unique_loopback_v4();
    let listener = TcpListener::bind((ip, 0)).await.expect("fake server");
    let addr = listener.local_addr().expect("fake server");
    let task = tokio::spawn(async move {
        let mut connections = 0;
        while let Ok(Ok((mut conn, _))) =
            tokio::time::timeout(Duration::from_secs(10), listener.accept()).await
        {
            connections += 1;
            let len = conn.read_u16().await.expect("fake server");
            let mut buf = vec![0; usize::from(len)];
            conn.read_exact(&mut buf).await.expect("fake server");
            let query = Message::from_vec(&buf).expect("fake server");
            let mut reply =
                Message::error_msg(query.metadata.id, OpCode::Query, ResponseCode::Refused);
            reply.add_queries(query.queries.iter().cloned());
            let wire = reply.to_vec().expect("fake server");
            conn.write_u16(u16::try_from(wire.len()).expect("fake server"))
                .await
                .expect("fake server");
            conn.write_all(&wire).await.expect("fake server");
            // Dropping `conn` closes it: the next query needs a new connection.
        }
        connections
    });
    (addr, task)
}

#[tokio::test]
async fn kdig_tcp_multi_fails_when_the_server_closes_between_queries() {
    init_tracing();
    if !require_tools(&["kdig"]) {
        return;
    }
    let (addr, server) = one_query_per_connection_server().await;
    let err = kdig_tcp_multi(addr, &["a.example", "b.example", "c.example"])
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("over one TCP connection"),
        "{err:#}"
    );
    server.abort();

    // One name needs no reuse, so the same server is fine for it.
    let (addr, server) = one_query_per_connection_server().await;
    let replies = kdig_tcp_multi(addr, &["a.example"]).await.unwrap();
    assert_eq!(replies[0].status, "REFUSED", "{}", replies[0].raw);
    server.abort();
}

#[tokio::test]
async fn silent_server_gives_no_reply_within_the_timeout() {
    init_tracing();
    if !require_tools(&["dig", "kdig"]) {
        return;
    }
    // Bound but never read: queries vanish, as with a proxy that drops them.
    let ip = unique_loopback_v4();
    let sock = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = sock.local_addr().unwrap();
    let opts = DigOpts {
        timeout_s: 1,
        ..DigOpts::default()
    };
    let start = Instant::now();
    let err = dig(addr, "cilium.io", "A", opts).await.unwrap_err();
    assert!(err.downcast_ref::<NoReply>().is_some(), "{err:#}");
    let err = kdig(addr, "cilium.io", "A", opts).await.unwrap_err();
    assert!(err.downcast_ref::<NoReply>().is_some(), "{err:#}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    drop(sock);
}
