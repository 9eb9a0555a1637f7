//! Observability end to end, the way a newcomer meets it: the real `warden-agent` binary on a
//! real knotd upstream, real dig queries, and what `warden observe`, `warden fqdn cache`,
//! `warden endpoint list`, `warden status` and `/metrics` say about them. With root, the eBPF
//! lab too: a refused connection shows in `warden observe`, also one refused while the agent
//! was dead (read from the pinned ring buffer once it is back).

// The fixtures below are test code too: a failure there should fail the test at once.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use warden_config::EndpointConfig;
use warden_tests::firewall::{Firewall, FirewallOptions, quick_refusal};
use warden_tests::lab::{curl_with, dig_in_cgroup, require_lab};
use warden_tests::warden::{
    AgentDir, AgentProcess, TalkPolicy, binary, http_get, metric_value, warden_cli,
};
use warden_tests::zones::*;
use warden_tests::{
    DigOpts, KnotUpstream, ProcessGuard, dig, free_port, require_tools, unique_loopback_v4,
};

/// `app=test` in `youssef` may resolve cilium.io, its subdomains and google.com through the
/// lab's upstream, and reach cilium.io and google.com on 80/443.
fn policy(upstream: SocketAddr) -> String {
    TalkPolicy {
        dns_server: None,
        dns_rules: &[
            "matchName: cilium.io",
            r#"matchPattern: "*.cilium.io""#,
            "matchName: google.com",
        ],
        ..TalkPolicy::through(upstream)
    }
    .yaml()
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// An admin URL where nothing listens: tests name the dnsproxy explicitly, so a process on
/// the machine's default port 9891 cannot mix into what they see.
fn nobody() -> String {
    let port = free_port("127.0.0.1".parse().unwrap()).unwrap();
    format!("http://127.0.0.1:{port}")
}

/// `warden --agent http://ADMIN --dnsproxy NOBODY args...`, which must succeed.
fn cli_ok(admin: SocketAddr, dnsproxy: &str, args: &[&str]) -> String {
    let mut full = vec!["--dnsproxy", dnsproxy];
    full.extend_from_slice(args);
    let out = warden_cli(admin, &full).unwrap();
    assert!(
        out.status.success(),
        "warden {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// The DNS flow of `qname`/`qtype` from `flows`; exactly one is expected.
fn dns_flow<'a>(flows: &'a [Value], qname: &str, qtype: &str, protocol: &str) -> &'a Value {
    let matching: Vec<&Value> = flows
        .iter()
        .filter(|flow| {
            flow["type"] == "dns"
                && flow["qname"] == qname
                && flow["qtype"] == qtype
                && flow["protocol"] == protocol
        })
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "{qname} {qtype} {protocol}: {matching:#?}"
    );
    matching[0]
}

/// `warden observe --follow` running in the background, its stdout going to a file.
struct Follower {
    guard: Option<ProcessGuard>,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Follower {
    fn start(admin: SocketAddr, dnsproxy: &str, args: &[&str]) -> Follower {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("observe.out");
        let err = dir.path().join("observe.err");
        let mut command = Command::new(binary("warden").unwrap());
        command
            .arg("--agent")
            .arg(format!("http://{admin}"))
            .args(["--dnsproxy", dnsproxy, "observe", "--follow"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(err).unwrap());
        let guard = ProcessGuard::spawn(&mut command, "warden observe --follow").unwrap();
        Follower {
            guard: Some(guard),
            out,
            _dir: dir,
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.out.with_file_name("observe.err")).unwrap_or_default()
    }

    /// Complete lines only: the last one may be half written.
    fn lines(&self) -> Vec<Value> {
        let text = self.text();
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        json_lines(complete)
    }

    /// Waits until `wanted` holds for the lines printed so far.
    async fn wait_for(&self, what: &str, wanted: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let lines = self.lines();
            if wanted(&lines) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "observe --follow never showed {what}:\n{}\nstderr:\n{}",
                self.text(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            let _ = guard.stop();
        }
    }
}

#[tokio::test]
async fn a_newcomers_loop_sees_every_query_in_observe_and_in_the_counters() {
    if !require_tools(&["knotd", "dig"]) {
        return;
    }
    let upstream = KnotUpstream::start(unique_loopback_v4()).unwrap();
    let dir = AgentDir::new().unwrap();
    dir.write_policy("newcomer.yaml", &policy(upstream.addr()))
        .unwrap();
    let client = unique_loopback_v4();
    let mut config = dir.config(unique_loopback_v4(), upstream.addr());
    config.endpoints = vec![EndpointConfig {
        name: "test".into(),
        namespace: "youssef".into(),
        labels: [("app".to_owned(), "test".to_owned())].into(),
        ips: vec![client],
        cgroup: None,
        dns_target: Vec::new(),
        peer_only: false,
    }];
    let agent = AgentProcess::start(&dir, config).await.unwrap();
    let dnsproxy = nobody();
    let started_ms = now_ms();
    let before = http_get(agent.admin, "/metrics").await.unwrap();
    let follower = Follower::start(
        agent.admin,
        &dnsproxy,
        &["-o", "json", "--instance", "agent"],
    );

    let udp = DigOpts::default().with_source(client);
    let tcp = DigOpts { tcp: true, ..udp };
    for (name, opts, status) in [
        ("cilium.io", udp, "NOERROR"),
        ("www.cilium.io", udp, "NOERROR"),
        ("google.com", tcp, "NOERROR"),
        ("bbc.co.uk", udp, "REFUSED"),
        ("example.org", tcp, "REFUSED"),
    ] {
        let reply = dig(agent.dns, name, "A", opts).await.unwrap();
        assert_eq!(reply.status, status, "{name}: {}", reply.raw);
    }

    // `warden observe -o json`: one line per query, with what the proxy knew.
    let flows = json_lines(&cli_ok(agent.admin, &dnsproxy, &["observe", "-o", "json"]));
    assert_eq!(flows.len(), 5, "{flows:#?}");
    let ended_ms = now_ms();
    for flow in &flows {
        assert_eq!(flow["instance"], "agent", "{flow}");
        assert_eq!(flow["endpoint"], "youssef/test", "{flow}");
        assert_eq!(flow["server"], upstream.addr().to_string(), "{flow}");
        let client_addr: SocketAddr = flow["client"].as_str().unwrap().parse().unwrap();
        assert_eq!(client_addr.ip(), client, "{flow}");
        let time_ms = flow["time_ms"].as_u64().unwrap();
        assert!(
            (started_ms..=ended_ms).contains(&time_ms),
            "{time_ms} not in {started_ms}..={ended_ms}"
        );
        let latency_us = flow["latency_us"].as_u64().unwrap();
        assert!(latency_us > 0 && latency_us < 2_000_000, "{flow}");
    }
    let cilium = dns_flow(&flows, "cilium.io.", "A", "udp");
    assert_eq!(cilium["verdict"], "allowed");
    assert_eq!(cilium["rcode"], "NOERROR");
    assert_eq!(cilium["ips"], serde_json::json!([CILIUM_IO_V4.to_string()]));
    assert_eq!(cilium["ttl"], DEFAULT_TTL);
    assert_eq!(cilium["cnames"], serde_json::json!([]));
    let www = dns_flow(&flows, "www.cilium.io.", "A", "udp");
    assert_eq!(www["verdict"], "allowed");
    assert_eq!(
        www["ips"],
        serde_json::json!(EDGE_CILIUM_IO_V4.map(|ip| ip.to_string()))
    );
    assert_eq!(www["ttl"], EDGE_CILIUM_IO_TTL, "the chain's smallest TTL");
    assert_eq!(
        www["cnames"],
        serde_json::json!(["web.cilium.io.", "edge.cilium.io."])
    );
    let google = dns_flow(&flows, "google.com.", "A", "tcp");
    assert_eq!(google["verdict"], "allowed");
    assert_eq!(
        google["ips"],
        serde_json::json!([GOOGLE_COM_V4.to_string()])
    );
    assert_eq!(google["ttl"], GOOGLE_COM_TTL);
    for (qname, protocol) in [("bbc.co.uk.", "udp"), ("example.org.", "tcp")] {
        let denied = dns_flow(&flows, qname, "A", protocol);
        assert_eq!(denied["verdict"], "denied", "{denied}");
        assert_eq!(denied["rcode"], "REFUSED", "{denied}");
        assert_eq!(denied["ips"], serde_json::json!([]), "{denied}");
        assert_eq!(denied["ttl"], 0, "{denied}");
    }

    // The same events, Hubble-style, one line each, oldest first.
    let table = cli_ok(agent.admin, &dnsproxy, &["observe", "--instance", "agent"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    let expected = [
        format!("dns/udp ALLOWED (cilium.io. A NOERROR, {CILIUM_IO_V4}, TTL {DEFAULT_TTL}, "),
        format!(
            "dns/udp ALLOWED (www.cilium.io. A NOERROR, CNAME web.cilium.io.,edge.cilium.io., \
             {},{}, TTL {EDGE_CILIUM_IO_TTL}, ",
            EDGE_CILIUM_IO_V4[0], EDGE_CILIUM_IO_V4[1]
        ),
        format!("dns/tcp ALLOWED (google.com. A NOERROR, {GOOGLE_COM_V4}, TTL {GOOGLE_COM_TTL}, "),
        "dns/udp DENIED (bbc.co.uk. A REFUSED, ".to_owned(),
        "dns/tcp DENIED (example.org. A REFUSED, ".to_owned(),
    ];
    for (line, expected) in lines.iter().zip(&expected) {
        assert!(
            line.contains(expected.as_str()),
            "{line}\nwanted: {expected}"
        );
        assert!(
            line.contains(&format!("[agent]: youssef/test ({client}:"))
                && line.contains(&format!(") -> {} dns/", upstream.addr())),
            "{line}"
        );
        assert!(line.ends_with("ms)"), "{line}");
    }

    // The follower printed the same five, each once, as they happened.
    let followed = follower
        .wait_for("the five queries", |lines| lines.len() >= 5)
        .await;
    assert_eq!(followed, flows, "follow shows what the ring holds");
    // And what comes next.
    let reply = dig(agent.dns, "anysub.cilium.io", "A", udp).await.unwrap();
    assert_eq!(reply.status, "NOERROR");
    let followed = follower
        .wait_for("a sixth query", |lines| lines.len() >= 6)
        .await;
    assert_eq!(followed[5]["qname"], "anysub.cilium.io.");
    assert_eq!(
        followed[5]["ips"],
        serde_json::json!([ANYSUB_CILIUM_IO_V4.to_string()])
    );
    drop(follower);

    // `?since_ms=` keeps only the events from then on.
    let since = followed[5]["time_ms"].as_u64().unwrap();
    let recent = json_lines(&cli_ok(
        agent.admin,
        &dnsproxy,
        &["observe", "-o", "json", "--last", "1"],
    ));
    assert_eq!(recent, vec![followed[5].clone()]);
    let body = http_get(agent.admin, &format!("/v1/flows?since_ms={since}"))
        .await
        .unwrap();
    let since_flows: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert!(
        since_flows
            .iter()
            .all(|flow| flow["time_ms"].as_u64() >= Some(since))
    );
    assert!(since_flows.contains(&followed[5]));

    // The counters moved by exactly the queries made.
    let after = http_get(agent.admin, "/metrics").await.unwrap();
    let moved = |name: &str, labels: &[(&str, &str)]| {
        metric_value(&after, name, labels) - metric_value(&before, name, labels)
    };
    let queries = "warden_dns_queries_total";
    for (labels, count) in [
        (
            [
                ("verdict", "allowed"),
                ("rcode", "NOERROR"),
                ("protocol", "udp"),
            ],
            3.0,
        ),
        (
            [
                ("verdict", "allowed"),
                ("rcode", "NOERROR"),
                ("protocol", "tcp"),
            ],
            1.0,
        ),
        (
            [
                ("verdict", "denied"),
                ("rcode", "REFUSED"),
                ("protocol", "udp"),
            ],
            1.0,
        ),
        (
            [
                ("verdict", "denied"),
                ("rcode", "REFUSED"),
                ("protocol", "tcp"),
            ],
            1.0,
        ),
    ] {
        assert_eq!(moved(queries, &labels), count, "{labels:?}");
    }
    assert_eq!(moved(queries, &[]), 6.0);
    assert_eq!(moved(queries, &[("verdict", "error")]), 0.0);
    let count = "warden_dns_processing_seconds_count";
    assert_eq!(moved(count, &[("scope", "total")]), 6.0);
    assert_eq!(moved(count, &[("scope", "policy_check")]), 6.0);
    assert_eq!(
        moved(count, &[("scope", "upstream")]),
        4.0,
        "denied: not asked"
    );
    assert_eq!(moved(count, &[("scope", "datapath_hold")]), 4.0);
    assert_eq!(moved("warden_dns_upstream_errors_total", &[]), 0.0);
    assert_eq!(metric_value(&after, "warden_dns_serving", &[]), 1.0);

    // The cache, by name pattern, and cleaned by pattern.
    let listed = |pattern: &str| -> Vec<String> {
        let rows: Value = serde_json::from_str(&cli_ok(
            agent.admin,
            &dnsproxy,
            &["fqdn", "cache", "list", "-n", pattern, "-o", "json"],
        ))
        .unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|row| row["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        listed("*.cilium.io"),
        ["anysub.cilium.io.", "www.cilium.io."]
    );
    assert_eq!(listed("cilium.io"), ["cilium.io."]);
    assert_eq!(
        listed("*"),
        [
            "anysub.cilium.io.",
            "cilium.io.",
            "google.com.",
            "www.cilium.io."
        ]
    );
    // Output that cannot be written (a full disk behind `>`) is a failure, not a short success.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    for args in [
        &["fqdn", "cache", "list"][..],
        &["--dnsproxy", &dnsproxy, "observe", "--follow"],
    ] {
        let mut child = Command::new(binary("warden").unwrap())
            .arg("--agent")
            .arg(format!("http://{}", agent.admin))
            .args(args)
            .stdout(full.try_clone().unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // A follower that ignored the failed write would follow for ever: bounded here.
        let deadline = Instant::now() + Duration::from_secs(15);
        let written = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?}: still running after a failed write");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            !written.success(),
            "{args:?}: a failed write exited {written}"
        );
    }
    let typo = warden_cli(agent.admin, &["fqdn", "cache", "list", "-n", "cilium.io/"]).unwrap();
    assert!(!typo.status.success());
    let flush = warden_cli(agent.admin, &["fqdn", "cache", "clean"]).unwrap();
    assert!(!flush.status.success(), "a flush of everything needs -f");
    // A misspelled filter is refused, not taken for none (a clean would empty the cache).
    let misspelled = http_get(agent.admin, "/v1/fqdn/cache?nmae=cilium.io").await;
    let error = misspelled.expect_err("an unknown parameter was ignored");
    assert!(error.to_string().contains("400"), "{error}");
    let cleaned: Value = serde_json::from_str(&cli_ok(
        agent.admin,
        &dnsproxy,
        &[
            "fqdn",
            "cache",
            "clean",
            "-n",
            "www*.cilium.io",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(cleaned["names"], 1, "{cleaned}");
    assert_eq!(cleaned["ips"], 2, "{cleaned}");
    assert!(
        cleaned["removed"]
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["name"] == "www.cilium.io." && entry["endpoint"] == "youssef/test")
    );
    assert_eq!(listed("*.cilium.io"), ["anysub.cilium.io."]);
    let table = cli_ok(
        agent.admin,
        &dnsproxy,
        &[
            "fqdn",
            "cache",
            "clean",
            "-e",
            "youssef/test",
            "-n",
            "google.com",
        ],
    );
    assert!(
        table.starts_with("Removed 1 names (1 IPs) from the agent's FQDN cache\n"),
        "{table}"
    );

    // Endpoints.
    let endpoints: Value = serde_json::from_str(&cli_ok(
        agent.admin,
        &dnsproxy,
        &["endpoint", "list", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(endpoints[0]["endpoint"], "youssef/test");
    assert_eq!(endpoints[0]["enforced"], true);
    assert_eq!(endpoints[0]["ips"], serde_json::json!([client.to_string()]));
    let labels = endpoints[0]["labels"].as_array().unwrap();
    assert!(labels.contains(&Value::from("k8s:app=test")), "{labels:?}");
    let table = cli_ok(agent.admin, &dnsproxy, &["endpoint", "list"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    let id = endpoints[0]["id"].to_string();
    assert_eq!(&row[..4], [&id, "youssef/test", "yes", &client.to_string()]);

    // Status: the agent serves, the dnsproxy (nothing there) is down, not an error.
    let status = cli_ok(agent.admin, &dnsproxy, &["status"]);
    assert!(status.starts_with("DNS served by:   agent\n"), "{status}");
    assert!(status.contains("Serving DNS:     yes"), "{status}");
    assert!(
        status.contains(&format!("== dnsproxy ({dnsproxy}): down (")),
        "{status}"
    );
    let both_down = warden_cli(
        "127.0.0.1:1".parse().unwrap(),
        &["--dnsproxy", &dnsproxy, "status"],
    )
    .unwrap();
    assert!(
        !both_down.status.success(),
        "neither instance answers: an error"
    );
}

// ---------------------------------------------------------------------------------------
// The eBPF lab
// ---------------------------------------------------------------------------------------

/// A connection the policy does not allow, refused at once by the connect hook.
fn refused_connect(lab: &Firewall, destination: SocketAddr) {
    let result = curl_with(
        &lab.workload,
        &format!("http://{destination}/"),
        &[],
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(quick_refusal(&result), "{destination}: {result:?}");
}

fn is_drop_to(flow: &Value, destination: SocketAddr) -> bool {
    flow["type"] == "drop"
        && flow["destination"] == destination.ip().to_string()
        && flow["port"] == destination.port()
}

#[tokio::test]
async fn drops_show_in_observe_also_those_made_while_the_agent_was_dead() {
    if !require_lab() || !require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = Firewall::start(FirewallOptions {
        policy: TalkPolicy {
            dns_rules: &[
                "matchName: cilium.io",
                r#"matchPattern: "*.cilium.io""#,
                "matchName: google.com",
            ],
            ..TalkPolicy::default()
        }
        .yaml(),
        ..FirewallOptions::default()
    })
    .await
    .unwrap();
    let dnsproxy = nobody();

    // A redirected lookup and a refused connection, as `warden observe` shows them.
    let reply = dig_in_cgroup(
        &lab.workload,
        lab.upstream.addr(),
        "cilium.io",
        "A",
        DigOpts::default(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, "NOERROR", "{}", reply.raw);
    let before_kill = SocketAddr::new(IpAddr::V4(BBC_CO_UK_V4), 80);
    refused_connect(&lab, before_kill);
    let follower = Follower::start(
        lab.agent.admin,
        &dnsproxy,
        &["-o", "json", "--instance", "agent"],
    );
    let lines = follower
        .wait_for("the drop before the kill", |lines| {
            lines.iter().any(|flow| is_drop_to(flow, before_kill))
        })
        .await;
    let dropped = lines
        .iter()
        .find(|flow| is_drop_to(flow, before_kill))
        .unwrap();
    assert_eq!(dropped["endpoint"], "youssef/test", "{dropped}");
    assert_eq!(dropped["protocol"], "tcp", "{dropped}");
    assert_eq!(dropped["instance"], "agent", "{dropped}");
    let lookup = lines
        .iter()
        .find(|flow| flow["type"] == "dns" && flow["qname"] == "cilium.io.")
        .expect("the redirected lookup");
    assert_eq!(lookup["endpoint"], "youssef/test");
    assert_eq!(lookup["server"], lab.upstream.addr().to_string());
    assert_eq!(lookup["verdict"], "allowed");

    // kill -9: the pinned programs go on refusing, and write their events to the ring buffer
    // that nobody reads now.
    lab.agent.kill().unwrap();
    let killed_ms = now_ms();
    let while_dead = SocketAddr::new(IpAddr::V4(BBC_CO_UK_V4), 443);
    refused_connect(&lab, while_dead);
    tokio::time::sleep(Duration::from_millis(300)).await;
    lab.agent.restart().await.unwrap();

    // The restarted agent reads them: in its flows, and in the follower, which reconnected.
    let lines = follower
        .wait_for("the drop made while the agent was dead", |lines| {
            lines.iter().any(|flow| is_drop_to(flow, while_dead))
        })
        .await;
    let dropped = lines
        .iter()
        .find(|flow| is_drop_to(flow, while_dead))
        .unwrap();
    assert_eq!(dropped["protocol"], "tcp", "{dropped}");
    // Read before the restarted agent's first reconciliation has indexed the cgroups: the
    // endpoint must still be named (the event carries its endpoint ID), not `cgroup:N`.
    assert_eq!(dropped["endpoint"], "youssef/test", "{dropped}");
    let time_ms = dropped["time_ms"].as_u64().unwrap();
    assert!(
        time_ms >= killed_ms.saturating_sub(1000) && time_ms <= now_ms(),
        "the drop keeps the time it happened: {time_ms} (killed at {killed_ms})"
    );
    // To the nanosecond as well, which tells apart drops alike within a millisecond.
    let time_ns = dropped["time_ns"].as_u64().unwrap();
    assert_eq!(time_ns / 1_000_000, time_ms, "{dropped}");
    assert_eq!(
        lines
            .iter()
            .filter(|flow| is_drop_to(flow, before_kill))
            .count(),
        1,
        "nothing printed twice across the reconnection"
    );
    let retained = json_lines(&cli_ok(
        lab.agent.admin,
        &dnsproxy,
        &["observe", "-o", "json", "--instance", "agent"],
    ));
    assert!(
        retained.iter().any(|flow| is_drop_to(flow, while_dead)),
        "{retained:#?}"
    );
    let scrape = http_get(lab.agent.admin, "/metrics").await.unwrap();
    assert!(metric_value(&scrape, "warden_datapath_drops_total", &[]) >= 1.0);
    drop(follower);
}
