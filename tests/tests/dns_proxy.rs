//! The agent's embedded DNS proxy end to end: real knotd upstream, real dig/kdig clients,
//! the agent started in-process on port 0 (or as its binary where restarts matter).

// The lab helpers below are test code too: a failure there should fail the test at once.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use warden_config::{AgentConfig, EndpointConfig, RejectCode};
use warden_tests::warden::{
    AgentDir, AgentProcess, InProcessAgent, TalkPolicy, binary, http_get, http_json, metric_value,
    sorted_ips, warden_cli,
};
use warden_tests::zones::*;
use warden_tests::{DigOpts, KnotUpstream, dig, kdig_tcp_multi, require_tools, unique_loopback_v4};

/// Answers from knotd travel over loopback; a generous timeout keeps a loaded CI box green.
fn opts(source: IpAddr) -> DigOpts {
    DigOpts {
        timeout_s: 3,
        ..DigOpts::default()
    }
    .with_source(source)
}

/// dig through `server`, failing the test if dig itself fails (no answer is an error there).
async fn ask(server: SocketAddr, name: &str, qtype: &str, opts: DigOpts) -> warden_tests::DnsReply {
    dig(server, name, qtype, opts).await.unwrap()
}

fn endpoint(name: &str, app: &str, ips: &[IpAddr]) -> EndpointConfig {
    EndpointConfig {
        name: name.to_owned(),
        namespace: "youssef".to_owned(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        ips: ips.to_vec(),
        cgroup: None,
        dns_target: Vec::new(),
        peer_only: false,
    }
}

/// One DNS rule for one `app` label, toward any server on `port`.
/// The talk's policy, DNS only through the lab's knotd (its address and its random port).
fn talk_policy(upstream: SocketAddr) -> String {
    TalkPolicy {
        dns_rules: &[
            "matchName: cilium.io",
            "matchName: google.com",
            r#"matchPattern: "*.cilium.io""#,
            r#"matchPattern: "*.example.org""#,
        ],
        ..TalkPolicy::through(upstream)
    }
    .yaml()
}

fn pattern_policy(app: &str, selector: &str, port: u16) -> String {
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: dns-{app}
  namespace: youssef
spec:
  endpointSelector:
    matchLabels:
      app: {app}
  egress:
  - toPorts:
    - ports:
      - port: "{port}"
      rules:
        dns:
        - {selector}
"#
    )
}

struct Lab {
    upstream: KnotUpstream,
    dir: AgentDir,
    client: IpAddr,
    agent: InProcessAgent,
}

impl Lab {
    /// knotd, and an agent whose endpoint `youssef/test` is `client` (and `::1`).
    async fn start(adjust: impl FnOnce(&mut AgentConfig)) -> Lab {
        let upstream = KnotUpstream::start(unique_loopback_v4()).unwrap();
        let dir = AgentDir::new().unwrap();
        dir.write_policy("talk.yaml", &talk_policy(upstream.addr()))
            .unwrap();
        let client = unique_loopback_v4();
        let mut config = dir.config(unique_loopback_v4(), upstream.addr());
        config.endpoints = vec![endpoint("test", "test", &[client, "::1".parse().unwrap()])];
        adjust(&mut config);
        let agent = InProcessAgent::start(config).await.unwrap();
        Lab {
            upstream,
            dir,
            client,
            agent,
        }
    }

    async fn cache(&self) -> serde_json::Value {
        http_json(self.agent.admin(), "/v1/fqdn/cache")
            .await
            .unwrap()
    }

    async fn cache_row(&self, name: &str) -> Option<serde_json::Value> {
        let rows = self.cache().await;
        rows.as_array()?
            .iter()
            .find(|row| row["name"] == name)
            .cloned()
    }
}

fn record_set(reply: &warden_tests::DnsReply) -> Vec<(String, u32, String, String)> {
    let mut records: Vec<_> = reply
        .answers
        .iter()
        .map(|r| {
            (
                r.name.to_ascii_lowercase(),
                r.ttl,
                r.rtype.clone(),
                r.data.clone(),
            )
        })
        .collect();
    records.sort();
    records
}

#[tokio::test]
async fn allowed_queries_get_upstreams_answer_and_denied_ones_are_refused() {
    if !require_tools(&["knotd", "dig", "kdig"]) {
        return;
    }
    let lab = Lab::start(|_| {}).await;
    let source = opts(lab.client);

    for (name, qtype) in [
        ("cilium.io", "A"),
        ("cilium.io", "AAAA"),
        ("www.cilium.io", "A"),
        ("google.com", "A"),
    ] {
        let direct = ask(lab.upstream.addr(), name, qtype, DigOpts::default()).await;
        let proxied = ask(lab.agent.dns_v4(), name, qtype, source).await;
        assert_eq!(proxied.status, "NOERROR", "{}", proxied.raw);
        assert_eq!(record_set(&proxied), record_set(&direct), "{name} {qtype}");
        assert!(!record_set(&proxied).is_empty());
    }
    let denied = ask(lab.agent.dns_v4(), "bbc.co.uk", "A", source).await;
    assert_eq!(denied.status, "REFUSED", "{}", denied.raw);
    assert!(denied.answers.is_empty());

    // TCP, and three queries on one connection.
    let tcp = ask(
        lab.agent.dns_v4(),
        "google.com",
        "A",
        DigOpts {
            tcp: true,
            ..source
        },
    )
    .await;
    assert_eq!(tcp.ips(), vec![IpAddr::V4(GOOGLE_COM_V4)]);
    let denied_tcp = ask(
        lab.agent.dns_v4(),
        "bbc.co.uk",
        "A",
        DigOpts {
            tcp: true,
            ..source
        },
    )
    .await;
    assert_eq!(denied_tcp.status, "REFUSED");

    // IPv6 listener; the endpoint owns ::1, which is where dig sends from.
    let v6 = ask(
        lab.agent.dns_v6(),
        "cilium.io",
        "AAAA",
        DigOpts {
            source: None,
            ..source
        },
    )
    .await;
    assert_eq!(v6.ips(), vec![IpAddr::V6(CILIUM_IO_V6)]);
    let v6_denied = ask(
        lab.agent.dns_v6(),
        "bbc.co.uk",
        "AAAA",
        DigOpts {
            source: None,
            ..source
        },
    )
    .await;
    assert_eq!(v6_denied.status, "REFUSED");
    let v6_tcp = ask(
        lab.agent.dns_v6(),
        "google.com",
        "A",
        DigOpts {
            source: None,
            ..DigOpts::tcp()
        },
    )
    .await;
    assert_eq!(v6_tcp.ips(), vec![IpAddr::V4(GOOGLE_COM_V4)]);

    // kdig sends from ::1 as well; the replies come back on one connection, in any order.
    let replies = kdig_tcp_multi(
        lab.agent.dns_v6(),
        &["cilium.io", "google.com", "bbc.co.uk"],
    )
    .await
    .unwrap();
    assert_eq!(replies.len(), 3);
    let mut statuses: Vec<_> = replies.iter().map(|r| r.status.clone()).collect();
    statuses.sort();
    assert_eq!(statuses, ["NOERROR", "NOERROR", "REFUSED"]);

    let scrape = http_get(lab.agent.admin(), "/metrics").await.unwrap();
    assert!(
        metric_value(
            &scrape,
            "warden_dns_queries_total",
            &[("verdict", "denied"), ("rcode", "REFUSED")]
        ) >= 4.0,
        "{scrape}"
    );
    assert!(
        metric_value(
            &scrape,
            "warden_dns_queries_total",
            &[("verdict", "allowed"), ("protocol", "tcp")]
        ) >= 3.0
    );
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn reject_nxdomain_answers_nxdomain() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = Lab::start(|config| config.dns.reject = RejectCode::Nxdomain).await;
    let reply = ask(lab.agent.dns_v4(), "bbc.co.uk", "A", opts(lab.client)).await;
    assert_eq!(reply.status, "NXDOMAIN", "{}", reply.raw);
    let allowed = ask(lab.agent.dns_v4(), "cilium.io", "A", opts(lab.client)).await;
    assert_eq!(allowed.status, "NOERROR");
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn name_matching_follows_ciliums_documented_cases() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let upstream = KnotUpstream::start(unique_loopback_v4()).unwrap();
    let dir = AgentDir::new().unwrap();
    let cases = [
        ("star", r#"matchPattern: "*.cilium.io""#),
        ("double", r#"matchPattern: "**.cilium.io""#),
        ("subs", r#"matchPattern: "sub*.cilium.io""#),
        ("all", r#"matchPattern: "*""#),
        ("name", "matchName: cilium.io"),
    ];
    let mut config = dir.config(unique_loopback_v4(), upstream.addr());
    let mut sources = std::collections::HashMap::new();
    for (app, selector) in cases {
        dir.write_policy(
            &format!("{app}.yaml"),
            &pattern_policy(app, selector, upstream.addr().port()),
        )
        .unwrap();
        let ip = unique_loopback_v4();
        sources.insert(app, ip);
        config.endpoints.push(endpoint(app, app, &[ip]));
    }
    let agent = InProcessAgent::start(config).await.unwrap();
    let expectations = [
        ("star", "anysub.cilium.io", "NOERROR"),
        ("star", "cilium.io", "REFUSED"),
        ("star", "a.b.cilium.io", "REFUSED"),
        ("double", "a.b.cilium.io", "NOERROR"),
        ("double", "sub.cilium.io", "NOERROR"),
        ("double", "cilium.io", "REFUSED"),
        ("subs", "subdomain.cilium.io", "NOERROR"),
        ("subs", "sub.cilium.io", "NOERROR"),
        ("subs", "www.cilium.io", "REFUSED"),
        ("all", "_foobar._tcp.cilium.io", "NOERROR"),
        ("all", "bbc.co.uk", "NOERROR"),
        ("name", "CILIUM.IO", "NOERROR"),
        ("name", "cilium.io.", "NOERROR"),
        ("name", "www.cilium.io", "REFUSED"),
    ];
    for (app, name, status) in expectations {
        let reply = ask(agent.dns_v4(), name, "A", opts(sources[app])).await;
        assert_eq!(reply.status, status, "{app} asking {name}:\n{}", reply.raw);
    }
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_cname_chain_is_cached_under_the_queried_name_with_its_smallest_ttl() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = Lab::start(|config| config.dns.max_ips_per_name = 5).await;
    let reply = ask(lab.agent.dns_v4(), "www.cilium.io", "A", opts(lab.client)).await;
    assert_eq!(reply.status, "NOERROR");
    let row = lab
        .cache_row("www.cilium.io.")
        .await
        .expect("www.cilium.io. cached");
    assert_eq!(row["endpoint"], "youssef/test");
    let ips = sorted_ips(&row);
    let mut expected: Vec<String> = EDGE_CILIUM_IO_V4.iter().map(ToString::to_string).collect();
    expected.sort();
    assert_eq!(ips, expected);
    // Its expiry is rounded up to the second (never sooner than the TTL): a second more at most.
    let ttl = row["ttl"].as_u64().unwrap();
    assert!(
        ttl <= u64::from(EDGE_CILIUM_IO_TTL) + 1 && ttl >= u64::from(EDGE_CILIUM_IO_TTL) - 5,
        "ttl {ttl}"
    );
    assert!(
        lab.cache_row("edge.cilium.io.").await.is_none(),
        "only the queried name is recorded"
    );

    // max_ips_per_name caps a name with 40 addresses.
    let big = ask(
        lab.agent.dns_v4(),
        "big.cilium.io",
        "A",
        DigOpts {
            tcp: true,
            ..opts(lab.client)
        },
    )
    .await;
    assert_eq!(big.ips().len(), usize::from(BIG_CILIUM_IO_COUNT));
    let row = lab
        .cache_row("big.cilium.io.")
        .await
        .expect("big.cilium.io. cached");
    assert_eq!(row["ips"].as_array().unwrap().len(), 5);

    // Entries expire after their TTL.
    let short = ask(
        lab.agent.dns_v4(),
        "short.example.org",
        "A",
        opts(lab.client),
    )
    .await;
    assert_eq!(short.status, "NOERROR", "{}", short.raw);
    assert!(lab.cache_row("short.example.org.").await.is_some());
    let deadline = Instant::now() + Duration::from_secs(6);
    while lab.cache_row("short.example.org.").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "short.example.org. did not expire"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn min_ttl_raises_the_cached_ttl() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = Lab::start(|config| config.dns.min_ttl = 3600).await;
    let reply = ask(lab.agent.dns_v4(), "www.cilium.io", "A", opts(lab.client)).await;
    assert_eq!(
        reply.min_ttl(),
        Some(EDGE_CILIUM_IO_TTL),
        "the answer itself is untouched"
    );
    let row = lab.cache_row("www.cilium.io.").await.unwrap();
    // Rounded up to the second: 3,601 at most.
    let ttl = row["ttl"].as_u64().unwrap();
    assert!((3590..=3601).contains(&ttl), "ttl {ttl}");
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn max_ttl_lowers_long_ttls_in_the_answer_and_the_cache() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    const MAX_TTL: u32 = 100;
    let lab = Lab::start(|config| config.dns.max_ttl = MAX_TTL).await;
    for transport in [
        opts(lab.client),
        DigOpts {
            tcp: true,
            ..opts(lab.client)
        },
    ] {
        // CNAMEs of 300 and 120 s lowered to the cap; the A records' 60 s kept.
        let reply = ask(lab.agent.dns_v4(), "www.cilium.io", "A", transport).await;
        let ttls: Vec<(&str, u32)> = reply
            .answers
            .iter()
            .map(|record| (record.rtype.as_str(), record.ttl))
            .collect();
        assert_eq!(
            ttls,
            [
                ("CNAME", MAX_TTL),
                ("CNAME", MAX_TTL),
                ("A", EDGE_CILIUM_IO_TTL),
                ("A", EDGE_CILIUM_IO_TTL)
            ],
            "{}",
            reply.raw
        );
        assert!(reply.ips().len() == 2, "{}", reply.raw);
        let reply = ask(lab.agent.dns_v4(), "google.com", "A", transport).await;
        assert_eq!(reply.min_ttl(), Some(MAX_TTL), "{}", reply.raw);
    }
    // What the cache keeps (and so the allow entries) agrees with what the client was told: at
    // least as long, and at most the second the expiry is rounded up to beyond it.
    let row = lab.cache_row("google.com.").await.unwrap();
    let ttl = row["ttl"].as_u64().unwrap();
    assert!((90..=u64::from(MAX_TTL) + 1).contains(&ttl), "ttl {ttl}");
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn truncated_answers_reach_the_client_and_tcp_gets_the_whole_answer() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = Lab::start(|_| {}).await;
    let udp = DigOpts {
        edns: false,
        ignore_tc: true,
        ..opts(lab.client)
    };
    let truncated = ask(lab.agent.dns_v4(), "big.cilium.io", "A", udp).await;
    assert!(truncated.truncated(), "{}", truncated.raw);
    let full = ask(
        lab.agent.dns_v4(),
        "big.cilium.io",
        "A",
        DigOpts {
            tcp: true,
            ..opts(lab.client)
        },
    )
    .await;
    assert!(!full.truncated());
    assert_eq!(full.ips().len(), usize::from(BIG_CILIUM_IO_COUNT));
    // dig's own fallback: UDP, TC, then TCP.
    let retried = ask(
        lab.agent.dns_v4(),
        "big.cilium.io",
        "A",
        DigOpts {
            edns: false,
            ..opts(lab.client)
        },
    )
    .await;
    assert_eq!(
        retried.ips().len(),
        usize::from(BIG_CILIUM_IO_COUNT),
        "{}",
        retried.raw
    );
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn an_endpoint_at_its_name_cap_gets_servfail_for_new_names_its_rules_need() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = Lab::start(|config| config.dns.max_names_per_endpoint = 2).await;
    let dns = lab.agent.dns_v4();
    // Two names the DNS rules allow (`*`) but no toFQDNs rule of the endpoint's matches.
    for name in ["anysub.cilium.io", "sub.cilium.io"] {
        let reply = ask(dns, name, "A", opts(lab.client)).await;
        assert_eq!(reply.status, "NOERROR", "{name}: {}", reply.raw);
    }
    // Full. A new name its toFQDNs rules match is not cached, so nothing would allow the IPs
    // it is about to use: the client is told to try again later rather than given them.
    let udp = ask(dns, "google.com", "A", opts(lab.client)).await;
    assert_eq!(udp.status, "SERVFAIL", "{}", udp.raw);
    let tcp = DigOpts {
        tcp: true,
        ..opts(lab.client)
    };
    let reply = ask(dns, "google.com", "A", tcp).await;
    assert_eq!(reply.status, "SERVFAIL", "over TCP: {}", reply.raw);
    // A new name none of its rules needs is answered, uncached.
    let reply = ask(dns, "subdomain.cilium.io", "A", opts(lab.client)).await;
    assert_eq!(reply.status, "NOERROR", "{}", reply.raw);
    assert_eq!(reply.ips(), vec![IpAddr::V4(SUBDOMAIN_CILIUM_IO_V4)]);
    // The names it holds are still answered and refreshed.
    let reply = ask(dns, "anysub.cilium.io", "A", opts(lab.client)).await;
    assert_eq!(reply.status, "NOERROR", "{}", reply.raw);
    let mut names: Vec<String> = lab
        .cache()
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["anysub.cilium.io.", "sub.cilium.io."]);
    let scrape = http_get(lab.agent.admin(), "/metrics").await.unwrap();
    assert_eq!(
        metric_value(&scrape, "warden_fqdn_cache_names_refused_total", &[]),
        3.0
    );
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn upstream_down_gives_servfail_and_garbage_is_counted() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = Lab::start(|_| {}).await;
    // A second agent whose upstream is a loopback address where nothing listens.
    let dir = AgentDir::new().unwrap();
    let dead = SocketAddr::new(unique_loopback_v4(), 53);
    dir.write_policy("talk.yaml", &talk_policy(dead)).unwrap();
    let mut config = dir.config(unique_loopback_v4(), dead);
    config.dns.upstream_timeout_ms = 500;
    config.endpoints = vec![endpoint("test", "test", &[lab.client])];
    let orphan = InProcessAgent::start(config).await.unwrap();
    let started = Instant::now();
    let reply = ask(orphan.dns_v4(), "cilium.io", "A", opts(lab.client)).await;
    assert_eq!(reply.status, "SERVFAIL", "{}", reply.raw);
    // After the configured 500 ms, not the default 2 s (plus a loaded machine's slack).
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    orphan.stop().await.unwrap();

    // Garbage to the live agent: counted, dropped, and the next query is answered.
    let socket = tokio::net::UdpSocket::bind(SocketAddr::new(lab.client, 0))
        .await
        .unwrap();
    for garbage in [&b"\x00"[..], b"hello, this is not DNS", &[0xff; 40]] {
        socket.send_to(garbage, lab.agent.dns_v4()).await.unwrap();
    }
    let mut tcp = tokio::net::TcpStream::connect(lab.agent.dns_v4())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"\x00\x05junk!")
        .await
        .unwrap();
    let reply = ask(lab.agent.dns_v4(), "cilium.io", "A", opts(lab.client)).await;
    assert_eq!(reply.status, "NOERROR");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let scrape = http_get(lab.agent.admin(), "/metrics").await.unwrap();
        let malformed = metric_value(&scrape, "warden_dns_malformed_total", &[]);
        if malformed >= 4.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "malformed packets not counted: {malformed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lab.agent.stop().await.unwrap();
}

/// A UDP relay to `server` that loses the first datagram of every query ID on the way there,
/// as a full receive queue or a conntrack race does; answers go back to whoever sent the copy
/// that got through, from the relay's address.
async fn lossy_relay(server: SocketAddr) -> SocketAddr {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    let front = Arc::new(
        tokio::net::UdpSocket::bind(SocketAddr::new(unique_loopback_v4(), 0))
            .await
            .unwrap(),
    );
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(server).await.unwrap();
    let address = front.local_addr().unwrap();
    let askers = Arc::new(Mutex::new(HashMap::<u16, SocketAddr>::new()));
    let (queries_in, queries_out, queries_askers) = (front.clone(), back.clone(), askers.clone());
    tokio::spawn(async move {
        let mut lost = HashSet::new();
        let mut buffer = vec![0u8; 4096];
        while let Ok((length, from)) = queries_in.recv_from(&mut buffer).await {
            let Some(id) = buffer.get(..2).map(|id| u16::from_be_bytes([id[0], id[1]])) else {
                continue;
            };
            if length < 12 || lost.insert(id) {
                continue;
            }
            queries_askers.lock().unwrap().insert(id, from);
            let _ = queries_out.send(&buffer[..length]).await;
        }
    });
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_535];
        while let Ok(length) = back.recv(&mut buffer).await {
            if length < 12 {
                continue;
            }
            let id = u16::from_be_bytes([buffer[0], buffer[1]]);
            let asker = askers.lock().unwrap().get(&id).copied();
            if let Some(asker) = asker {
                let _ = front.send_to(&buffer[..length], asker).await;
            }
        }
    });
    address
}

/// A query whose datagram to the upstream was lost waited the whole `upstream_timeout` (2 s)
/// for a SERVFAIL, and the pod's resolver retries only after 5 s by default; the proxy sends
/// it again after a few round trips and the answer comes within a fraction of a second.
#[tokio::test]
async fn a_query_lost_on_the_way_to_knotd_is_answered_from_its_second_copy() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = Lab::start(|_| {}).await;
    let relay = lossy_relay(lab.upstream.addr()).await;
    let dir = AgentDir::new().unwrap();
    dir.write_policy("talk.yaml", &talk_policy(relay)).unwrap();
    let mut config = dir.config(unique_loopback_v4(), relay);
    config.endpoints = vec![endpoint("test", "test", &[lab.client])];
    let agent = InProcessAgent::start(config).await.unwrap();
    let started = Instant::now();
    let reply = ask(agent.dns_v4(), "cilium.io", "A", opts(lab.client)).await;
    let took = started.elapsed();
    assert_eq!(reply.status, "NOERROR", "{}", reply.raw);
    assert!(!reply.answers.is_empty(), "{}", reply.raw);
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(1900),
        "answered after {took:?}"
    );
    let scrape = http_get(agent.admin(), "/metrics").await.unwrap();
    assert_eq!(
        metric_value(&scrape, "warden_dns_upstream_retransmits_total", &[]),
        1.0
    );
    assert_eq!(
        metric_value(
            &scrape,
            "warden_dns_upstream_errors_total",
            &[("reason", "timeout")]
        ),
        0.0
    );
    agent.stop().await.unwrap();
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn policy_edits_apply_within_two_seconds_and_broken_files_keep_the_last_good_policy() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = Lab::start(|_| {}).await;
    let status = |reply: warden_tests::DnsReply| reply.status;
    let query = |name: &'static str| ask(lab.agent.dns_v4(), name, "A", opts(lab.client));
    assert_eq!(status(query("bbc.co.uk").await), "REFUSED");

    let widened = talk_policy(lab.upstream.addr()).replace(
        "        - matchName: google.com\n",
        "        - matchName: google.com\n        - matchName: bbc.co.uk\n",
    );
    let policy_revision = || async {
        http_json(lab.agent.admin(), "/v1/status").await.unwrap()["policy_revision"]
            .as_u64()
            .unwrap()
    };
    let before = policy_revision().await;
    lab.dir.write_policy("talk.yaml", &widened).unwrap();
    // The 2 s are the agent's: timed on its revision, not on dig processes, whose start a
    // loaded machine delays.
    let edited = Instant::now();
    let revision = loop {
        let revision = policy_revision().await;
        if revision != before {
            break revision;
        }
        assert!(
            edited.elapsed() < Duration::from_secs(2),
            "edit not applied within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The store swaps the policy in before it publishes the revision: answered at once.
    assert_eq!(status(query("bbc.co.uk").await), "NOERROR");

    lab.dir.write_policy("broken.yaml", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: broken}\nspec:\n  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"53\", protocol: SCTPX}]}]\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let status_json = loop {
        let status_json = http_json(lab.agent.admin(), "/v1/status").await.unwrap();
        if !status_json["policy"]["last_error"].is_null() {
            break status_json;
        }
        assert!(
            Instant::now() < deadline,
            "broken file not reported: {status_json}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = status_json["policy"]["last_error"].as_str().unwrap();
    assert!(error.contains("broken.yaml"), "{error}");
    assert_eq!(
        status_json["policy_revision"].as_u64().unwrap(),
        revision,
        "the last good policy stays"
    );
    assert_eq!(status(query("bbc.co.uk").await), "NOERROR");
    assert_eq!(status(query("example.org").await), "REFUSED");
    let scrape = http_get(lab.agent.admin(), "/metrics").await.unwrap();
    assert_eq!(
        metric_value(&scrape, "warden_policy_reload_failing", &[]),
        1.0
    );
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn endpoints_written_into_endpoints_dir_come_and_go_without_a_restart() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let endpoints_dir = tempfile::tempdir().unwrap();
    let lab =
        Lab::start(|config| config.endpoints_dir = Some(endpoints_dir.path().to_owned())).await;
    let newcomer = unique_loopback_v4();
    let query = || ask(lab.agent.dns_v4(), "bbc.co.uk", "A", opts(newcomer));
    let wait_for = |wanted: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let status = query().await.status;
            if status == wanted {
                return;
            }
            assert!(Instant::now() < deadline, "still {status}, not {wanted}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Not an endpoint yet: its queries pass unpoliced.
    assert_eq!(query().await.status, "NOERROR");

    // A pod appears: the policy selecting app=test now applies to its address.
    let pod = endpoints_dir.path().join("pod-b.yaml");
    std::fs::write(
        &pod,
        format!("- {{name: b, namespace: youssef, labels: {{app: test}}, ips: [{newcomer}]}}\n"),
    )
    .unwrap();
    wait_for("REFUSED").await;
    let listed = http_json(lab.agent.admin(), "/v1/endpoints").await.unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|row| row["endpoint"] == "youssef/b" && row["enforced"] == true),
        "{listed}"
    );

    // A broken edit keeps what the file held; a file stealing an address is refused whole.
    std::fs::write(&pod, "- {name: b, ips: [not-an-address]}\n").unwrap();
    std::fs::write(
        endpoints_dir.path().join("thief.yaml"),
        format!("- {{name: thief, ips: [{}]}}\n", lab.client),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let scrape = http_get(lab.agent.admin(), "/metrics").await.unwrap();
        if metric_value(&scrape, "warden_endpoint_file_errors_total", &[]) >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the bad files were not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = http_json(lab.agent.admin(), "/v1/endpoints").await.unwrap();
    let rows = listed.as_array().unwrap();
    assert!(
        rows.iter()
            .any(|row| row["endpoint"] == "youssef/b" && row["enforced"] == true)
            && !rows.iter().any(|row| row["endpoint"] == "default/thief"),
        "{listed}"
    );
    // Past a poll of the folder (1 s), still policed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(query().await.status, "REFUSED");
    let own = ask(lab.agent.dns_v4(), "bbc.co.uk", "A", opts(lab.client)).await;
    assert_eq!(
        own.status, "REFUSED",
        "the declared endpoint keeps its address"
    );

    // The pod goes: its address is nobody's again.
    std::fs::remove_file(&pod).unwrap();
    wait_for("NOERROR").await;
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn pods_written_by_warden_endpoint_sync_are_policed() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let endpoints_dir = tempfile::tempdir().unwrap();
    let lab =
        Lab::start(|config| config.endpoints_dir = Some(endpoints_dir.path().to_owned())).await;
    let pod_ip = unique_loopback_v4();
    let pods = format!(
        r#"{{"kind": "PodList", "items": [
          {{"metadata": {{"name": "web", "namespace": "youssef", "uid": "0a1b-2c3d",
                         "labels": {{"app": "test"}}}},
            "spec": {{"nodeName": "n1"}},
            "status": {{"phase": "Running", "qosClass": "BestEffort", "podIP": "{pod_ip}"}}}}]}}"#
    );
    let sync = |pods: String| {
        let dir = endpoints_dir.path().to_owned();
        let mut command = std::process::Command::new(binary("warden").unwrap());
        command
            .args(["endpoint", "sync", "--node", "n1", "--dir"])
            .arg(&dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(pods.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let said = sync(pods);
    assert!(said.contains("1 written"), "{said}");
    let query = || ask(lab.agent.dns_v4(), "bbc.co.uk", "A", opts(pod_ip));
    let deadline = Instant::now() + Duration::from_secs(3);
    while query().await.status != "REFUSED" {
        assert!(Instant::now() < deadline, "the synced pod is not policed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The pod gone from the list: its file goes, and so does its policing.
    let said = sync(r#"{"kind": "PodList", "items": []}"#.to_owned());
    assert!(said.contains("1 removed"), "{said}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while query().await.status != "NOERROR" {
        assert!(Instant::now() < deadline, "the gone pod is still policed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lab.agent.stop().await.unwrap();
}

/// `--watch`: each value of the stream takes effect as it comes, not at its end; the watch's
/// ERROR event ends it with a failure and leaves the files as they were.
#[tokio::test]
async fn pods_streamed_to_warden_endpoint_sync_watch_are_policed_as_they_change() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let endpoints_dir = tempfile::tempdir().unwrap();
    let lab =
        Lab::start(|config| config.endpoints_dir = Some(endpoints_dir.path().to_owned())).await;
    let pod = |uid: &str, ip: std::net::IpAddr| {
        format!(
            r#"{{"kind": "Pod", "metadata": {{"name": "p{uid}", "namespace": "youssef", "uid": "{uid}",
                 "labels": {{"app": "test"}}}},
                "spec": {{"nodeName": "n1"}},
                "status": {{"phase": "Running", "qosClass": "BestEffort", "podIP": "{ip}"}}}}"#
        )
    };
    let mut child = std::process::Command::new(binary("warden").unwrap())
        .args(["endpoint", "sync", "--watch", "--node", "n1", "--dir"])
        .arg(endpoints_dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stream = child.stdin.take().unwrap();
    let mut say = |text: String| {
        use std::io::Write as _;
        stream.write_all(text.as_bytes()).unwrap();
        stream.flush().unwrap();
    };
    let dns = lab.agent.dns_v4();
    let policed = |ip: std::net::IpAddr, expected: &'static str, what: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(3);
        while ask(dns, "bbc.co.uk", "A", opts(ip)).await.status != expected {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (first, second) = (unique_loopback_v4(), unique_loopback_v4());
    say(format!(
        r#"{{"kind": "PodList", "items": [{}]}}"#,
        pod("0a1b", first)
    ));
    policed(first, "REFUSED", "the listed pod is not policed").await;
    say(format!(
        r#"{{"type": "ADDED", "object": {}}}"#,
        pod("2c3d", second)
    ));
    policed(second, "REFUSED", "the added pod is not policed").await;
    say(format!(
        r#"{{"type": "DELETED", "object": {}}}"#,
        pod("0a1b", first)
    ));
    policed(first, "NOERROR", "the deleted pod is still policed").await;
    say(
        r#"{"type": "ERROR", "object": {"kind": "Status", "message": "too old resource version"}}"#
            .into(),
    );
    drop(stream);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("too old resource version"),
        "{out:?}"
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.lines().count(), 3, "a line per change: {said}");
    // Past a poll of the folder (1 s), the pod still there is still policed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    policed(second, "REFUSED", "the files changed at the watch's end").await;
    lab.agent.stop().await.unwrap();
}

/// Cilium's own DNS rule, `toEndpoints` naming kube-dns: pods send their queries to the
/// kube-dns Service, whose address is no pod's, and every query was refused. The Services
/// written by `warden endpoint sync --services` stand for the pods they pick (here the
/// Service's address is the lab's knotd, where the agent sends what it forwards).
#[tokio::test]
async fn to_endpoints_naming_kube_dns_reaches_it_through_its_service() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let endpoints_dir = tempfile::tempdir().unwrap();
    let lab =
        Lab::start(|config| config.endpoints_dir = Some(endpoints_dir.path().to_owned())).await;
    let upstream = lab.upstream.addr();
    let kube_dns_policy = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: dns
  namespace: youssef
spec:
  endpointSelector:
    matchLabels:
      app: test
  egress:
  - toEndpoints:
    - matchLabels:
        k8s:io.kubernetes.pod.namespace: kube-system
        k8s:k8s-app: kube-dns
    toPorts:
    - ports:
      - port: "{}"
        protocol: ANY
      rules:
        dns:
        - matchPattern: "*.cilium.io"
"#,
        upstream.port()
    );
    lab.dir.write_policy("talk.yaml", &kube_dns_policy).unwrap();
    let dns = lab.agent.dns_v4();
    let client = lab.client;
    let answered = |name: &'static str, expected: &'static str, what: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(4);
        loop {
            let status = ask(dns, name, "A", opts(client)).await.status;
            if status == expected {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {name} {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    answered("www.cilium.io", "REFUSED", "no kube-dns known: refused").await;

    let services = format!(
        r#"{{"kind": "ServiceList", "items": [
            {{"metadata": {{"name": "kube-dns", "namespace": "kube-system", "uid": "5e41-ce"}},
              "spec": {{"selector": {{"k8s-app": "kube-dns"}}, "clusterIP": "{}"}}}}]}}"#,
        upstream.ip()
    );
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(list.path(), services).unwrap();
    let synced = std::process::Command::new(binary("warden").unwrap())
        .args(["endpoint", "sync", "--services"])
        .arg(list.path())
        .arg("--dir")
        .arg(endpoints_dir.path())
        .output()
        .unwrap();
    assert!(synced.status.success(), "{synced:?}");
    assert!(
        String::from_utf8_lossy(&synced.stdout).starts_with("1 services: 1 written"),
        "{synced:?}"
    );
    answered(
        "www.cilium.io",
        "NOERROR",
        "the Service stands for kube-dns",
    )
    .await;
    answered("bbc.co.uk", "REFUSED", "its DNS rule still holds").await;
    // Only a peer: listed, and enforced for nobody.
    let listed = http_json(lab.agent.admin(), "/v1/endpoints").await.unwrap();
    let service = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["endpoint"] == "kube-system/service:kube-dns")
        .cloned()
        .unwrap_or_default();
    assert_eq!(service["enforced"], false, "{listed}");
    assert_eq!(service["peer_only"], true, "{listed}");
    lab.agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_restarted_agent_lists_the_entries_learned_before_with_their_remaining_ttl() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let upstream = KnotUpstream::start(unique_loopback_v4()).unwrap();
    let dir = AgentDir::new().unwrap();
    dir.write_policy("talk.yaml", &talk_policy(upstream.addr()))
        .unwrap();
    let client = unique_loopback_v4();
    let mut config = dir.config(unique_loopback_v4(), upstream.addr());
    config.endpoints = vec![endpoint("test", "test", &[client])];
    let mut agent = AgentProcess::start(&dir, config).await.unwrap();
    for name in ["cilium.io", "google.com"] {
        let reply = ask(agent.dns, name, "A", opts(client)).await;
        assert_eq!(reply.status, "NOERROR", "{}", reply.raw);
    }

    let before = http_json(agent.admin, "/v1/fqdn/cache?name=google.com")
        .await
        .unwrap();
    let expires_at = before[0]["expires_at"].as_u64().unwrap();

    // SIGTERM: the cache is written at shutdown.
    agent.restart().await.unwrap();
    let listed = agent.cli(&["fqdn", "cache", "list", "-o", "json"]).unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let google = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["name"] == "google.com.")
        .expect("google.com. survives a restart");
    assert_eq!(google["ips"][0], GOOGLE_COM_V4.to_string());
    // The same absolute expiry: the remaining TTL went on counting down across the restart.
    assert_eq!(google["expires_at"].as_u64().unwrap(), expires_at);
    let ttl = google["ttl"].as_u64().unwrap();
    assert!(
        ttl <= u64::from(GOOGLE_COM_TTL) + 1 && ttl > u64::from(GOOGLE_COM_TTL) - 30,
        "ttl {ttl}"
    );

    // SIGKILL: what was persisted in the background survives too.
    let reply = ask(agent.dns, "www.cilium.io", "A", opts(client)).await;
    assert_eq!(reply.status, "NOERROR");
    dir.wait_cache_saved("www.cilium.io.", Duration::from_secs(10))
        .await
        .unwrap();
    agent.kill().unwrap();
    agent.restart().await.unwrap();
    let table = agent.cli(&["fqdn", "cache", "list"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().next().unwrap().starts_with("ENDPOINT"),
        "{table}"
    );
    assert!(table.contains("www.cilium.io."), "{table}");
    assert!(table.contains("youssef/test"), "{table}");

    let status = agent.cli(&["status"]).unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("Serving DNS:     yes"), "{status}");
    agent.stop().unwrap();
}

#[tokio::test]
async fn warden_policy_validate_reports_errors_with_the_file_name() {
    let dir = AgentDir::new().unwrap();
    let good = dir.policy_dir().join("good.yaml");
    std::fs::write(&good, talk_policy("127.0.0.153:53".parse().unwrap())).unwrap();
    let bad = dir.policy_dir().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspec:\n  endpointSelector: {}\n  ingress: []\n").unwrap();
    let any_admin: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let ok = warden_cli(any_admin, &["policy", "validate", good.to_str().unwrap()]).unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert!(ok.stderr.is_empty(), "{ok:?}");
    // Valid, but a toFQDNs port range the datapath cannot expand: a warning, still valid.
    let wide = dir.policy_dir().join("wide.yaml");
    std::fs::write(
        &wide,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: wide, namespace: youssef}\nspec:\n  endpointSelector: {matchLabels: {app: test}}\n  egress:\n  - toFQDNs: [{matchName: cilium.io}]\n    toPorts: [{ports: [{port: \"1024\", endPort: 65535}]}]\n",
    )
    .unwrap();
    let warned = warden_cli(any_admin, &["policy", "validate", wide.to_str().unwrap()]).unwrap();
    assert!(warned.status.success(), "{warned:?}");
    let stderr = String::from_utf8_lossy(&warned.stderr);
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("wide.yaml")
            && stderr.contains("1024-65535"),
        "{stderr}"
    );
    let failed = warden_cli(
        any_admin,
        &[
            "policy",
            "validate",
            good.to_str().unwrap(),
            bad.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("ingress"),
        "{stderr}"
    );
}
