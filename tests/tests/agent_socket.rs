//! The agent's Unix socket under abuse: garbage bytes, an oversized message, a peer that is
//! not allowed. Each is logged, counted, and costs only that connection: the agent keeps
//! serving DNS and keeps talking to well-behaved peers.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use warden_api::proto::proxy_message::Kind;
use warden_api::proto::{Flows, Hello, Mapping, Mappings, ProxyMessage};
use warden_tests::warden::{AgentDir, InProcessAgent, http_get, metric_value};
use warden_tests::{DigOpts, KnotUpstream, dig, run_blocking, unique_loopback_v4};

async fn rejected(agent: &InProcessAgent, reason: &str) -> f64 {
    let scrape = http_get(agent.admin(), "/metrics").await.unwrap();
    metric_value(&scrape, "warden_api_rejected_total", &[("reason", reason)])
}

async fn wait_rejected(agent: &InProcessAgent, reason: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while rejected(agent, reason).await < at_least {
        assert!(Instant::now() < deadline, "no {reason} refusal counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// As uid and gid 65534, no other groups: connects to `socket`, sends the HTTP/2 client
/// preface and an empty SETTINGS frame, and says whether the agent `answered` or `closed`.
fn nobody_connects(socket: &std::path::Path) -> String {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.settimeout(2)\ntry:\n    s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n\\x00\\x00\\x00\\x04\\x00\\x00\\x00\\x00\\x00')\n    print('answered' if s.recv(100) else 'closed')\nexcept (ConnectionResetError, BrokenPipeError, TimeoutError):\n    print('closed')\n",
        socket.display().to_string()
    );
    let out = run_blocking(
        Command::new("setpriv").args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ]),
        Duration::from_secs(10),
    )
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!said.is_empty(), "the peer said nothing: {out:?}");
    said
}

// Multi-threaded: the non-root peer runs as a blocking child while the agent must accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_and_strangers_cost_only_their_connection() {
    if !warden_tests::require_tools(&["knotd", "dig"]) {
        return;
    }
    let upstream = KnotUpstream::start(unique_loopback_v4()).unwrap();
    let dir = AgentDir::new().unwrap();
    let agent = InProcessAgent::start(dir.config(unique_loopback_v4(), upstream.addr()))
        .await
        .unwrap();
    let socket = dir.socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the socket is for root and the agent's user only"
    );

    // Bytes that are not HTTP/2.
    let mut garbage = tokio::net::UnixStream::connect(&socket).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.0\r\n\r\nthis is not a gRPC peer\0\xff\xfe")
        .await
        .unwrap();
    drop(garbage);
    wait_rejected(&agent, "protocol", 1.0).await;

    // A real client whose second message is over the size limit.
    let mut client = warden_api::client::connect(&socket).await.unwrap();
    let hello = ProxyMessage {
        kind: Some(Kind::Hello(Hello {
            instance: "dnsproxy".into(),
            ..Hello::default()
        })),
    };
    let oversized = ProxyMessage {
        kind: Some(Kind::Mappings(Mappings {
            mappings: vec![Mapping {
                endpoint: "youssef/test".into(),
                name: "x".repeat(6 << 20),
                ..Mapping::default()
            }],
            resync: false,
            confirm: 0,
        })),
    };
    let outbound = tokio_stream::iter(vec![hello, oversized]);
    let mut inbound = client.session(outbound).await.unwrap().into_inner();
    // The session ends with an error after the snapshot, never with a crash.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), inbound.next()).await {
            Ok(Some(Ok(_snapshot))) => {}
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => assert!(Instant::now() < deadline, "session not closed"),
        }
    }
    wait_rejected(&agent, "oversized", 1.0).await;

    // A peer with a uid the agent does not allow (the socket opened to everyone for the test,
    // so that the credential check itself is what refuses it).
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    if nix::unistd::geteuid().is_root() {
        assert_eq!(
            nobody_connects(&socket),
            "closed",
            "closed without an answer"
        );
        wait_rejected(&agent, "credentials", 1.0).await;
    } else {
        println!("skipping the non-root peer part: needs root to switch users");
    }

    // Through all of it the agent serves DNS, and a well-behaved peer still gets a session.
    let reply = dig(agent.dns_v4(), "cilium.io", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(reply.status, "NOERROR");
    let mut client = warden_api::client::connect(&socket).await.unwrap();
    let hello = ProxyMessage {
        kind: Some(Kind::Hello(Hello {
            instance: "dnsproxy".into(),
            ..Hello::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello).await.unwrap();
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(2), inbound.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        first.kind,
        Some(warden_api::proto::agent_message::Kind::Snapshot(_))
    ));

    // A bad mapping and a bad flow event beside good ones: skipped and counted, while the
    // good mapping goes in and the session stays up.
    let expires_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let mapping = |name: &str, ip: &str| Mapping {
        endpoint: "youssef/test".into(),
        name: name.into(),
        ips: vec![ip.into()],
        ttl: 300,
        expires_at,
        ..Mapping::default()
    };
    let before = rejected(&agent, "malformed").await;
    tx.send(ProxyMessage {
        kind: Some(Kind::Mappings(Mappings {
            mappings: vec![
                mapping("empty..label.example", "198.18.9.1"),
                mapping("good.example", "198.18.9.2"),
            ],
            resync: false,
            confirm: 0,
        })),
    })
    .await
    .unwrap();
    tx.send(ProxyMessage {
        kind: Some(Kind::Flows(Flows {
            events: vec!["{not a flow event".into()],
        })),
    })
    .await
    .unwrap();
    wait_rejected(&agent, "malformed", before + 2.0).await;
    let cache = http_get(agent.admin(), "/v1/fqdn/cache").await.unwrap();
    assert!(cache.contains("good.example."), "{cache}");
    assert!(cache.contains("198.18.9.2"), "{cache}");
    assert!(!cache.contains("198.18.9.1"), "{cache}");
    match tokio::time::timeout(Duration::from_millis(700), inbound.next()).await {
        Err(_) | Ok(Some(Ok(_))) => {}
        Ok(other) => panic!("the session ended: {other:?}"),
    }
    drop(tx);
    agent.stop().await.unwrap();
}

// Multi-threaded: the peer in the group runs as a blocking child while the agent serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_the_socket_group_gets_a_session() {
    if !warden_tests::require_tools(&["knotd"]) {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("skipping: needs root to switch users");
        return;
    }
    let upstream = KnotUpstream::start(unique_loopback_v4()).unwrap();
    let dir = AgentDir::new().unwrap();
    // The peer must be able to reach the socket through its folder.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = dir.config(unique_loopback_v4(), upstream.addr());
    config.socket_group = Some("nogroup".into());
    let agent = InProcessAgent::start(config).await.unwrap();
    let socket = dir.socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    // A non-root peer in the group: the HTTP/2 preface gets the agent's settings back.
    assert_eq!(
        nobody_connects(&socket),
        "answered",
        "the group's peer was refused"
    );
    assert_eq!(rejected(&agent, "credentials").await, 0.0);
    agent.stop().await.unwrap();
}

/// A second agent on the same config cannot start (its admin port is the first one's), and
/// must leave the running agent's socket in place: it bound its socket over the first one's
/// before it found the port taken, and the path then led to a socket nobody served, every
/// dnsproxy cut off from the running agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_start_leaves_the_running_agents_socket() {
    if !warden_tests::require_tools(&["knotd"]) {
        return;
    }
    let upstream = KnotUpstream::start(unique_loopback_v4()).unwrap();
    let dir = AgentDir::new().unwrap();
    let config = dir.config(unique_loopback_v4(), upstream.addr());
    let running = InProcessAgent::start(config.clone()).await.unwrap();
    // Nor may it touch the state they share (it rewrote the saved policy and endpoints, and
    // with the eBPF datapath would have replaced the pinned programs, before the port clash).
    let state = |dir: &AgentDir| -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
        let mut files: Vec<_> = std::fs::read_dir(dir.state_dir())
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                (entry.path(), entry.metadata().unwrap().modified().unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let before = state(&dir);
    assert!(!before.is_empty());
    let mut second = config;
    second.admin.listen = running.admin();
    assert!(InProcessAgent::start(second).await.is_err());
    assert!(
        tokio::net::UnixStream::connect(dir.socket()).await.is_ok(),
        "the running agent's socket was replaced by a dead one"
    );
    assert_eq!(state(&dir), before, "the second agent rewrote the state");
    running.stop().await.unwrap();
}
