//! The eBPF datapath end to end: a workload cgroup of our own, the lab's "internet" namespace
//! with HTTP hosts at the zones' addresses, knotd on port 53 of a loopback address, and the
//! real `warden-agent` binary with `datapath.mode: ebpf` attached at the test's cgroup root.
//! Needs root; every test holds the lab's lock, so they run one at a time.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use warden_tests::firewall::{CURL_TIMEOUT as SHORT, Firewall, FirewallOptions, quick_refusal};
use warden_tests::lab::{
    ConnectLoop, CurlResult, HOST_V4, HOST_V6, INTERNET_V4, INTERNET_V6, curl_with, getent_addrs,
    getent_hosts, python3, require_lab, spawn_in_cgroup,
};
use warden_tests::warden::{TalkPolicy, http_get, metric_value};
use warden_tests::zones::*;
use warden_tests::{DigOpts, DnsReply};

/// The fixture's calls, failing the test at once on a lab error.
trait Lab {
    fn curl_ok(&self, url: &str, extra: &[&str]) -> CurlResult;
    async fn dig_ok(&self, name: &str, qtype: &str, opts: DigOpts) -> DnsReply;
}

impl Lab for Firewall {
    fn curl_ok(&self, url: &str, extra: &[&str]) -> CurlResult {
        self.curl(url, extra).unwrap()
    }

    async fn dig_ok(&self, name: &str, qtype: &str, opts: DigOpts) -> DnsReply {
        self.dig(name, qtype, opts).await.unwrap()
    }
}

/// Programs the datapath attaches at its cgroup root.
const PROGRAMS: usize = 13;

async fn firewall(idle_grace_s: u64) -> Firewall {
    Firewall::start(FirewallOptions {
        idle_grace_s,
        ..FirewallOptions::default()
    })
    .await
    .unwrap()
}

/// The lab with `policy` and an `endpoints_dir` for endpoints a test adds live.
async fn firewall_with_endpoints_dir(policy: String) -> Firewall {
    Firewall::start(FirewallOptions {
        policy,
        endpoints_dir: true,
        ..FirewallOptions::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_talks_policy_holds_for_dns_tcp_ipv4_and_ipv6() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let lab = firewall(60).await;

    // dig to "any address" is answered by the proxy, and shows the server it asked.
    let reply = lab.dig_ok("cilium.io", "A", DigOpts::default()).await;
    assert_eq!(reply.status, "NOERROR", "{}", reply.raw);
    assert_eq!(reply.ips(), vec![IpAddr::V4(CILIUM_IO_V4)]);
    let server = format!("SERVER: {}#53", lab.upstream.addr().ip());
    assert!(reply.raw.contains(&server), "{}", reply.raw);
    let tcp = lab.dig_ok("google.com", "A", DigOpts::tcp()).await;
    assert_eq!(tcp.ips(), vec![IpAddr::V4(GOOGLE_COM_V4)], "{}", tcp.raw);
    assert!(tcp.raw.contains(&server), "{}", tcp.raw);
    let flows = lab.flows(lab.agent.admin).await.unwrap();
    assert!(
        flows.iter().any(|flow| flow["type"] == "dns"
            && flow["endpoint"] == "youssef/test"
            && flow["qname"] == "cilium.io."
            && flow["server"] == lab.upstream.addr().to_string()),
        "{flows:?}"
    );

    // glibc through a resolv.conf in a private mount namespace.
    let getent = getent_hosts(
        &lab.workload,
        &format!("nameserver {}\n", lab.upstream.addr().ip()),
        "cilium.io",
    )
    .unwrap();
    let addrs = getent_addrs(&getent);
    assert!(
        addrs.contains(&IpAddr::V6(CILIUM_IO_V6)) || addrs.contains(&IpAddr::V4(CILIUM_IO_V4)),
        "{getent:?}"
    );

    // Allowed names on 80 work, over IPv4 and IPv6.
    for (url, family) in [
        ("http://cilium.io/", "-4"),
        ("http://google.com/", "-4"),
        ("http://cilium.io/", "-6"),
        ("http://google.com:443/", "-6"),
    ] {
        let result = lab.curl_ok(url, &[family]);
        assert!(result.ok(), "{url} {family}: {result:?}");
    }

    // bbc.co.uk resolves, but the connection is refused at once, and the drop is reported.
    let bbc = lab.dig_ok("bbc.co.uk", "A", DigOpts::default()).await;
    assert_eq!(bbc.ips(), vec![IpAddr::V4(BBC_CO_UK_V4)]);
    for family in ["-4", "-6"] {
        let denied = lab.curl_ok("http://bbc.co.uk/", &[family]);
        assert!(quick_refusal(&denied), "bbc.co.uk {family}: {denied:?}");
    }
    // The allowed name on a port the policy does not list.
    let other_port = lab.curl_ok("http://cilium.io:8080/", &["-4"]);
    assert!(quick_refusal(&other_port), "{other_port:?}");
    assert_eq!(
        lab.internet
            .connections_to(SocketAddr::new(IpAddr::V4(BBC_CO_UK_V4), 80)),
        0
    );
    assert_eq!(
        lab.internet
            .connections_to(SocketAddr::new(IpAddr::V4(CILIUM_IO_V4), 8080)),
        0
    );

    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let flows = lab.flows(lab.agent.admin).await.unwrap();
        let dropped = |ip: String, port: u16| {
            flows.iter().any(|flow| {
                flow["type"] == "drop"
                    && flow["destination"] == ip
                    && flow["port"] == port
                    && flow["endpoint"] == "youssef/test"
            })
        };
        if dropped(BBC_CO_UK_V4.to_string(), 80)
            && dropped(BBC_CO_UK_V6.to_string(), 80)
            && dropped(CILIUM_IO_V4.to_string(), 8080)
        {
            break;
        }
        assert!(Instant::now() < deadline, "drop events missing: {flows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        lab.agent.log().contains("datapath drop"),
        "drops are logged"
    );
    let scrape = http_get(lab.agent.admin, "/metrics").await.unwrap();
    assert!(metric_value(&scrape, "warden_datapath_drops_total", &[]) >= 3.0);
    assert!(
        metric_value(
            &scrape,
            "warden_dns_processing_seconds_count",
            &[("scope", "datapath_hold")]
        ) >= 2.0
    );
}

#[tokio::test]
async fn new_ips_work_at_once_and_old_ones_go_after_ttl_and_idle_grace() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let idle_grace = 3;
    let mut lab = firewall(idle_grace).await;
    let old = IpAddr::V4(CILIUM_IO_V4);
    let new = IpAddr::V4(EDGE_CILIUM_IO_V4[0]);
    lab.upstream.set_addrs("cilium.io.", 2, &[old]).unwrap();
    assert!(lab.curl_ok("http://cilium.io/", &["-4"]).ok());

    // The zone changes: the next lookup's IP works right away.
    lab.upstream.set_addrs("cilium.io.", 2, &[new]).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let moved = lab.curl_ok("http://cilium.io/", &["-4"]);
    assert!(moved.ok(), "{moved:?}");
    assert!(moved.body.contains(&new.to_string()), "{}", moved.body);

    // Nothing uses the old IP any more: after its TTL and the idle grace it is denied. (Each
    // attempt would itself be traffic that keeps the IP alive, so wait, then try once.)
    tokio::time::sleep(Duration::from_secs(2 + idle_grace + 2)).await;
    let attempt = curl_with(&lab.workload, &format!("http://{old}/"), &[], SHORT).unwrap();
    assert!(quick_refusal(&attempt), "old IP still allowed: {attempt:?}");

    // A connection kept busy across the TTL (and beyond the grace) is not cut.
    let busy = format!(
        r#"import socket, sys, time
s = socket.create_connection(("{new}", 80), timeout=2)
for i in range(16):
    s.sendall(b"GET / HTTP/1.1\r\nHost: cilium.io\r\n\r\n")
    data = s.recv(4096)
    if not data.startswith(b"HTTP/1.1 200"):
        sys.exit(1)
    time.sleep(0.5)
"#
    );
    assert!(
        lab.curl_ok("http://cilium.io/", &["-4"]).ok(),
        "the lookup that starts the TTL"
    );
    let mut busy_client = spawn_in_cgroup(
        &lab.workload,
        Command::new("/usr/bin/python3").args(["-c", &busy]),
    )
    .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = busy_client.try_exited().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "busy client hung"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "the busy connection was cut: {status:?}");
    assert!(
        started.elapsed() > Duration::from_secs(2 + idle_grace),
        "it outlived TTL and grace"
    );
    let _ = &mut lab;
}

/// An answer with a TTL of 0 (or 1, late in a second) once expired in the cache the second it
/// came: the reconciler's next pass revoked the allow entry nothing used yet, and the connect
/// that followed the lookup met the default deny. Each round a new address, looked up, then
/// connected to 700 ms later (a pass in between in seven rounds of ten).
#[tokio::test]
async fn an_answer_with_ttl_0_still_opens_the_connection_that_follows_it() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = firewall(1).await;
    let addresses = [CILIUM_IO_V4, EDGE_CILIUM_IO_V4[0], EDGE_CILIUM_IO_V4[1]];
    for address in addresses {
        let ip = IpAddr::V4(address);
        lab.upstream.set_addrs("cilium.io.", 0, &[ip]).unwrap();
        let reply = lab.dig_ok("cilium.io", "A", DigOpts::default()).await;
        assert_eq!(reply.status, "NOERROR", "{reply:?}");
        let answered: Vec<(&str, u32)> = reply
            .answers
            .iter()
            .map(|record| (record.data.as_str(), record.ttl))
            .collect();
        assert_eq!(answered, [(ip.to_string().as_str(), 0)], "{reply:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let attempt = curl_with(&lab.workload, &format!("http://{ip}/"), &[], SHORT).unwrap();
        assert!(
            attempt.ok(),
            "{ip} refused 700 ms after its lookup: {attempt:?}"
        );
    }
}

/// The talk policy, its toFQDNs rule on `ports` (`None`: every port).
fn talk_on(ports: Option<&[u16]>) -> String {
    let fqdn_ports = "    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n      - port: \"443\"\n        protocol: TCP\n";
    let talk = TalkPolicy::default().yaml();
    assert!(talk.ends_with(fqdn_ports));
    let mut yaml = talk[..talk.len() - fqdn_ports.len()].to_owned();
    if let Some(ports) = ports {
        yaml += "    toPorts:\n    - ports:\n";
        for port in ports {
            yaml += &format!("      - port: \"{port}\"\n        protocol: TCP\n");
        }
    }
    yaml
}

/// A pod (`late`) keeps using an address the workload resolved, past the TTL, on port 443,
/// while the rule goes from `before` to `after` (both allowing 443): afterwards port 80 is
/// refused and 443 never was, not once.
async fn narrowing(before: &str, after: &str) {
    narrowing_names(before, after, &[("cilium.io", 3)]).await;
}

/// [`narrowing`], the workload resolving each of `names` to the one address (with its TTL).
async fn narrowing_names(before: &str, after: &str, names: &[(&str, u32)]) {
    let mut lab = Firewall::start(FirewallOptions {
        policy: before.to_owned(),
        late_workload: true,
        ..FirewallOptions::default()
    })
    .await
    .unwrap();
    let late = lab.cgroups.child("late").unwrap();
    let ip = IpAddr::V4(CILIUM_IO_V4);
    for (name, ttl) in names {
        lab.upstream
            .set_addrs(&format!("{name}."), *ttl, &[ip])
            .unwrap();
    }
    // The workload resolves and goes quiet; `late`, which the same rule selects, uses the
    // address. Once the TTL is over the workload's record expires and only `late`'s traffic
    // keeps its entries, on idle grace.
    let enrolled = Instant::now();
    loop {
        for (name, _) in names {
            let reply = lab.dig_ok(name, "A", DigOpts::default()).await;
            assert!(
                reply
                    .answers
                    .iter()
                    .any(|answer| answer.data == ip.to_string()),
                "{}",
                reply.raw
            );
        }
        if curl_with(&late, &format!("http://{ip}:443/"), &[], SHORT)
            .unwrap()
            .ok()
        {
            break;
        }
        assert!(
            enrolled.elapsed() < Duration::from_secs(10),
            "late never allowed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let in_use =
        ConnectLoop::start(&late, SocketAddr::new(ip, 443), Duration::from_millis(200)).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let port_80 = |expected: bool| {
        let attempt = curl_with(&late, &format!("http://{ip}/"), &[], SHORT).unwrap();
        if expected {
            assert!(attempt.ok(), "port 80 refused on idle grace: {attempt:?}");
        } else {
            assert!(
                quick_refusal(&attempt),
                "port 80 still allowed: {attempt:?}"
            );
        }
    };
    port_80(true);

    lab.dir.write_policy("talk.yaml", after).unwrap();
    // Past the reload (a file is read once settled) and the 2 s an unexpired entry no name
    // grants is given before it goes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    port_80(false);
    let attempts = in_use.attempts().unwrap();
    let failed: Vec<_> = attempts.iter().filter(|a| a.error.is_some()).collect();
    assert!(
        attempts.len() > 20 && failed.is_empty(),
        "443 cut: {failed:?} of {}",
        attempts.len()
    );
}

/// The idle grace keeps an address a pod still uses, not a port its policy took away:
/// traffic marks the address, so the port's entry would otherwise outlive the rule.
#[tokio::test]
async fn a_port_the_policy_takes_away_goes_though_the_address_is_still_in_use() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    narrowing(&talk_on(Some(&[80, 443])), &talk_on(Some(&[443]))).await;
}

/// Two names on one address: cilium.io's rule (443) goes and google.com's narrows from every
/// port to 443 in one change. The 443 entry, cilium.io's, was revoked as its name's rule was
/// gone, and google.com's replacement for it skipped as present: both went, the connection
/// google.com still allows cut.
#[tokio::test]
async fn a_narrowed_rule_keeps_the_entry_another_names_rule_leaves() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let cilium_443 = TalkPolicy {
        fqdns: &["matchName: cilium.io"],
        ..TalkPolicy::default()
    }
    .yaml()
    .replace("      - port: \"80\"\n        protocol: TCP\n", "");
    let google_any = "  - toFQDNs:\n    - matchName: google.com\n";
    let before = cilium_443 + google_any;
    let after = TalkPolicy {
        fqdns: &["matchName: google.com"],
        ..TalkPolicy::default()
    }
    .yaml()
    .replace("      - port: \"80\"\n        protocol: TCP\n", "");
    narrowing_names(&before, &after, &[("cilium.io", 3), ("google.com", 3)]).await;
    // The same with cilium.io's answer still within its TTL: the 443 entry, wanted by no cache
    // entry now, went as unwanted 2 s later, though google.com's rule grants it.
    narrowing_names(&before, &after, &[("cilium.io", 300), ("google.com", 3)]).await;
}

/// `warden fqdn cache clean` promises that connections to the cleaned names' addresses are cut
/// until the workload looks them up again: the allow entries go within seconds, TTL or not.
#[tokio::test]
async fn a_cache_clean_revokes_the_names_entries() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = firewall(60).await;
    let ip = IpAddr::V4(CILIUM_IO_V4);
    lab.upstream.set_addrs("cilium.io.", 300, &[ip]).unwrap();
    assert!(lab.curl_ok("http://cilium.io/", &["-4"]).ok());
    let cleaned = lab
        .agent
        .cli(&["fqdn", "cache", "clean", "-n", "cilium.io", "-f"])
        .unwrap();
    assert!(cleaned.status.success(), "{cleaned:?}");
    // Past the agent's first 10 s too, in which nothing unexpired is revoked (a dnsproxy's
    // mappings may still be on their way).
    let deadline = Instant::now() + Duration::from_secs(16);
    loop {
        let attempt = curl_with(&lab.workload, &format!("http://{ip}/"), &[], SHORT).unwrap();
        if quick_refusal(&attempt) {
            break;
        }
        assert!(Instant::now() < deadline, "still allowed: {attempt:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every port narrowed to 443: the idle entry for every port went, and with no cache entry
/// wanting the address, none for 443 came in its place: the connection in use was cut.
#[tokio::test]
async fn every_port_narrowed_to_one_keeps_that_one_for_the_address_in_use() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    narrowing(&talk_on(None), &talk_on(Some(&[443]))).await;
}

#[tokio::test]
async fn enforcement_holds_through_kill_9_and_restarts_without_a_gap() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = firewall(60).await;
    assert_eq!(
        lab.dig_ok("cilium.io", "A", DigOpts::default())
            .await
            .status,
        "NOERROR"
    );
    assert_eq!(
        lab.dig_ok("bbc.co.uk", "A", DigOpts::default())
            .await
            .status,
        "NOERROR"
    );
    assert_eq!(lab.attached_programs().unwrap(), PROGRAMS);
    // The allow entry is written before the answer is released: connect at once.
    let allowed = ConnectLoop::start(
        &lab.workload,
        SocketAddr::new(IpAddr::V4(CILIUM_IO_V4), 80),
        Duration::from_millis(100),
    )
    .unwrap();
    let denied = ConnectLoop::start(
        &lab.workload,
        SocketAddr::new(IpAddr::V4(BBC_CO_UK_V4), 80),
        Duration::from_millis(100),
    )
    .unwrap();
    allowed
        .wait_for_attempts(5, Duration::from_secs(5))
        .unwrap();
    // The cache is written within 750 ms of a change (a 500 ms pause between writes, noticed
    // on a 250 ms tick): the SIGKILL must come after that for the cache to survive it.
    lab.dir
        .wait_cache_saved("cilium.io.", Duration::from_secs(5))
        .await
        .unwrap();

    lab.agent.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lab.agent.restart().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A graceful restart replaces the programs in place (BPF_LINK_UPDATE) under the loops.
    lab.agent.restart().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let allowed = allowed.stop().unwrap();
    let denied = denied.stop().unwrap();
    assert!(
        allowed.len() > 20 && denied.len() > 20,
        "{} {}",
        allowed.len(),
        denied.len()
    );
    let failures: Vec<_> = allowed.iter().filter(|attempt| !attempt.ok()).collect();
    assert!(
        failures.is_empty(),
        "allowed connections failed: {failures:?}"
    );
    let leaks: Vec<_> = denied.iter().filter(|attempt| attempt.ok()).collect();
    assert!(leaks.is_empty(), "denied connections succeeded: {leaks:?}");
    assert_eq!(
        lab.internet
            .connections_to(SocketAddr::new(IpAddr::V4(BBC_CO_UK_V4), 80)),
        0
    );
    assert_eq!(
        lab.attached_programs().unwrap(),
        PROGRAMS,
        "nothing attached twice"
    );

    // The cache survived the SIGKILL.
    let cache = lab
        .agent
        .cli(&["fqdn", "cache", "list", "-o", "json"])
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&cache.stdout).unwrap();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|row| row["name"] == "cilium.io."),
        "{rows}"
    );
    // And the restarted agent still answers and enforces.
    assert!(lab.curl_ok("http://cilium.io/", &["-4"]).ok());
}

/// An agent killed before it saved its cache (or whose cache file is unreadable at the restart)
/// knows no name for the allow entries it finds: past its startup grace it revoked those still
/// within their TTL, connections in use or not, though the same entries past their TTL were
/// kept for the idle grace while used.
#[tokio::test]
async fn an_entry_in_use_survives_a_restart_that_lost_the_cache() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = firewall(60).await;
    let ip = IpAddr::V4(CILIUM_IO_V4);
    // A second address of the name, never used (traffic within the idle grace counts as use).
    let idle = IpAddr::V4(GOOGLE_COM_V4);
    lab.upstream
        .set_addrs("cilium.io.", 300, &[ip, idle])
        .unwrap();
    assert_eq!(
        lab.dig_ok("cilium.io", "A", DigOpts::default())
            .await
            .ips()
            .len(),
        2
    );
    let in_use = ConnectLoop::start(
        &lab.workload,
        SocketAddr::new(ip, 80),
        Duration::from_millis(200),
    )
    .unwrap();
    in_use.wait_for_attempts(3, Duration::from_secs(5)).unwrap();
    lab.dir
        .wait_cache_saved("cilium.io.", Duration::from_secs(5))
        .await
        .unwrap();
    lab.agent.kill().unwrap();
    std::fs::remove_file(lab.dir.state_dir().join("fqdn-cache.json")).unwrap();
    lab.agent.restart().await.unwrap();
    let restarted = std::time::SystemTime::now();
    // Past the startup grace (10 s) and the unwanted entry's (2 s), with passes to spare.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let attempts = in_use.stop().unwrap();
    let late: Vec<_> = attempts
        .iter()
        .filter(|attempt| attempt.at > restarted + Duration::from_secs(11))
        .collect();
    assert!(late.len() > 10, "{attempts:?}");
    let failed: Vec<_> = late.iter().filter(|attempt| !attempt.ok()).collect();
    assert!(failed.is_empty(), "connections cut: {failed:?}");
    // The idle address, known by no name either, went: only traffic keeps a nameless entry.
    let attempt = curl_with(&lab.workload, &format!("http://{idle}/"), &[], SHORT).unwrap();
    assert!(quick_refusal(&attempt), "{attempt:?}");
    // And only while some toFQDNs rule of the endpoint's could grant it: port 80 taken away,
    // the entry in use goes (past the reload and the 2 s an unwanted entry is given).
    let still = curl_with(&lab.workload, &format!("http://{ip}/"), &[], SHORT).unwrap();
    assert!(still.ok(), "{still:?}");
    lab.dir
        .write_policy("talk.yaml", &talk_on(Some(&[443])))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = curl_with(&lab.workload, &format!("http://{ip}/"), &[], SHORT).unwrap();
        if quick_refusal(&attempt) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "port 80 still allowed: {attempt:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A UDP echo service on every address (dual-stack) at the port given.
const UDP_ECHO_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(512)
    s.sendto(b"echo " + data, peer)
"#;

/// A client in the lab's internet: "ping" to `host:port` until an answer (or 5 s); the answer.
const UDP_ASK_PY: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(10):
    s.sendto(b"ping", (host, port))
    try:
        print(s.recvfrom(512)[0].decode(), end="")
        sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
"#;

fn udp_ask(lab: &Firewall, host: IpAddr, port: u16) -> String {
    let out = warden_tests::run_blocking(
        Command::new("ip")
            .args(["netns", "exec", lab.internet.netns()])
            .arg(python3().unwrap())
            .args(["-c", UDP_ASK_PY, &host.to_string(), &port.to_string()]),
        Duration::from_secs(10),
    )
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Egress policy restricts what a workload opens, not whom it answers: a server in the enforced
/// workload serves a client of the lab's internet (whose address no rule allows) over IPv4
/// and IPv6, before and after the agent is killed and restarted, while the workload's own
/// connection to that client is refused. Its answers used to be dropped, SYN-ACK first.
#[tokio::test]
async fn an_enforced_workload_serves_clients_it_may_not_call() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig"]) {
        return;
    }
    let mut lab = firewall(60).await;
    let port = warden_tests::free_port(IpAddr::V4(HOST_V4)).unwrap();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("index.html"), "served from the workload\n").unwrap();
    // `::` is dual-stack for http.server: one process serves both families.
    let _server = spawn_in_cgroup(
        &lab.workload,
        Command::new(python3().unwrap())
            .args(["-m", "http.server", "--bind", "::", "--directory"])
            .arg(site.path())
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    let urls = [
        format!("http://{HOST_V4}:{port}/"),
        format!("http://[{HOST_V6}]:{port}/"),
    ];
    let served = |lab: &Firewall, url: &str| {
        let result = lab.internet.curl(url, SHORT).unwrap();
        result.ok() && result.body.contains("served from the workload")
    };
    // The server needs a moment to listen.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !served(&lab, &urls[0]) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            lab.internet.curl(&urls[0], SHORT)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for url in &urls {
        assert!(
            served(&lab, url),
            "{url}: {:?}",
            lab.internet.curl(url, SHORT)
        );
    }
    for client in [
        format!("http://{INTERNET_V4}/"),
        format!("http://[{INTERNET_V6}]/"),
    ] {
        let call = lab.curl_ok(&client, &[]);
        assert!(quick_refusal(&call), "{client}: {call:?}");
    }
    // And a UDP service answers its clients too.
    let udp_port = warden_tests::free_port(IpAddr::V4(HOST_V4)).unwrap();
    let _echo = spawn_in_cgroup(
        &lab.workload,
        Command::new(python3().unwrap())
            .args(["-c", UDP_ECHO_PY, &udp_port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    let hosts = [IpAddr::V4(HOST_V4), IpAddr::V6(HOST_V6)];
    for host in hosts {
        assert_eq!(udp_ask(&lab, host, udp_port), "echo ping", "{host}");
    }

    lab.agent.kill().unwrap();
    lab.agent.restart().await.unwrap();
    lab.wait_enrolled().await.unwrap();
    for url in &urls {
        assert!(served(&lab, url), "after a restart, {url}");
    }
    for host in hosts {
        assert_eq!(
            udp_ask(&lab, host, udp_port),
            "echo ping",
            "after a restart, {host}"
        );
    }
    let call = lab.curl_ok(&format!("http://{INTERNET_V4}/"), &[]);
    assert!(quick_refusal(&call), "after a restart: {call:?}");
}

#[tokio::test]
async fn cleanup_leaves_no_programs_and_no_pins() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = firewall(60).await;
    assert_eq!(lab.attached_programs().unwrap(), PROGRAMS);
    assert!(Path::new(&lab.bpffs).exists());
    lab.agent.stop().unwrap();
    assert_eq!(
        lab.attached_programs().unwrap(),
        PROGRAMS,
        "programs stay after the agent exits"
    );
    let out = lab.cleanup().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(lab.attached_programs().unwrap(), 0);
    assert!(!lab.bpffs.exists(), "pins left in {}", lab.bpffs.display());
    // Nothing is enforced any more.
    let direct = curl_with(
        &lab.workload,
        &format!("http://{BBC_CO_UK_V4}/"),
        &[],
        SHORT,
    )
    .unwrap();
    assert!(direct.ok(), "{direct:?}");
}

/// A client whose UDP socket connects to `host:port` at once, pings through it, writes
/// `before=<answer or timeout>` to `flag.connected`, waits for `flag.go`, pings again and writes
/// `after=<answer, timeout or refused>` to `flag.done`.
const EARLY_SOCKET_PY: &str = r#"
import os, socket, sys, time
host, port, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, port))
s.settimeout(0.5)
def ping():
    for _ in range(4):
        try:
            s.send(b"ping")
            return s.recv(512).decode()
        except socket.timeout:
            pass
        except OSError as error:
            return "refused " + str(error)
    return "timeout"
open(flag + ".connected", "w").write("before=" + ping())
while not os.path.exists(flag + ".go"):
    time.sleep(0.05)
open(flag + ".done", "w").write("after=" + ping())
"#;

/// A socket connected to a DNS server before its cgroup was enrolled is never redirected (a
/// connected socket's sends run no hook), and a rule's `rules.dns` opened its port 53 as a
/// plain allow: the socket's queries reached the server past the proxy, and any name
/// resolved. Port 53 goes to the proxy only now; such a socket's packets are dropped (a
/// resolver asks again, on a socket the redirect sees).
#[tokio::test]
async fn a_socket_connected_before_enrollment_does_not_reach_dns_past_the_proxy() {
    if !require_lab() || !warden_tests::require_tools(&["knotd"]) {
        return;
    }
    let policy = TalkPolicy {
        dns_server: Some(IpAddr::V4(INTERNET_V4)),
        ..TalkPolicy::default()
    }
    .yaml();
    let lab = firewall_with_endpoints_dir(policy).await;
    // A "DNS server" of the lab's internet, on port 53: it echoes what it gets.
    let _server = warden_tests::ProcessGuard::spawn(
        Command::new("ip")
            .args(["netns", "exec", lab.internet.netns()])
            .arg(python3().unwrap())
            .args(["-c", UDP_ECHO_PY, "53"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
        "echo on 53",
    )
    .unwrap();
    // Listening before the client's first ping, which a refusal would end.
    let deadline = Instant::now() + Duration::from_secs(5);
    while udp_ask(&lab, IpAddr::V4(INTERNET_V4), 53) != "echo ping" {
        assert!(Instant::now() < deadline, "the echo server never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cgroup = lab.cgroups.child("early").unwrap();
    let flags = tempfile::tempdir().unwrap();
    let flag = flags.path().join("early");
    let with = |suffix: &str| flag.with_extension(suffix);
    let _client = spawn_in_cgroup(
        &cgroup,
        Command::new(python3().unwrap())
            .args(["-c", EARLY_SOCKET_PY, &INTERNET_V4.to_string(), "53"])
            .arg(&flag)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    let read_when_there = |path: std::path::PathBuf| async move {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && !text.is_empty()
            {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{} never written",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // The server answers the socket while its cgroup is no endpoint's.
    assert_eq!(read_when_there(with("connected")).await, "before=echo ping");
    let endpoints = lab.config.endpoints_dir.as_ref().unwrap();
    std::fs::write(
        endpoints.join("early.yaml"),
        "- {name: early, namespace: youssef, labels: {app: test}, cgroup: early}\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = http_get(lab.agent.admin, "/metrics").await.unwrap();
        if metric_value(&scrape, "warden_datapath_enrolled_endpoints", &[]) >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the early endpoint never enrolled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(with("go"), "").unwrap();
    let after = read_when_there(with("done")).await;
    assert!(
        after == "after=timeout" || after.starts_with("after=refused"),
        "the enforced socket reached port 53 past the proxy: {after}"
    );
}

/// A `dns_target` without a port: the map refused it at every pass, and the pod's DNS was
/// never redirected (its queries went past the proxy, unpoliced). It goes to `dns.listen` now.
#[tokio::test]
async fn a_dns_target_without_a_port_is_ignored() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = firewall_with_endpoints_dir(TalkPolicy::default().yaml()).await;
    let cgroups = [
        ("portless", lab.cgroups.child("portless").unwrap()),
        ("alone", lab.cgroups.child("alone").unwrap()),
    ];
    std::fs::write(
        lab.config
            .endpoints_dir
            .as_ref()
            .unwrap()
            .join("portless.yaml"),
        // Beside a usable IPv6 target the IPv4 one's family still goes to `dns.listen`, and
        // alone (the second endpoint) both families do.
        "- {name: portless, namespace: youssef, labels: {app: test}, cgroup: portless, \
         dns_target: ['127.0.0.1:0', '[::1]:5353']}\n\
         - {name: alone, namespace: youssef, labels: {app: test}, cgroup: alone, \
         dns_target: ['127.0.0.1:0']}\n",
    )
    .unwrap();
    for (name, cgroup) in &cgroups {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = warden_tests::lab::dig_in_cgroup(
                cgroup,
                lab.upstream.addr(),
                "cilium.io",
                "A",
                DigOpts::default(),
            )
            .await
            .unwrap();
            assert_eq!(reply.status, "NOERROR", "{}", reply.raw);
            let flows = lab.flows(lab.agent.admin).await.unwrap();
            let endpoint = format!("youssef/{name}");
            if flows
                .iter()
                .any(|flow| flow["type"] == "dns" && flow["endpoint"] == endpoint.as_str())
            {
                break;
            }
            assert!(Instant::now() < deadline, "{name} never through the proxy");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Entries in the pinned map `name` (in the datapath's versioned folder under `bpffs`).
fn map_entries(bpffs: &Path, name: &str) -> usize {
    let map = std::fs::read_dir(bpffs)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.path().join(name))
        .find(|path| path.exists())
        .unwrap();
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .unwrap();
    assert!(dump.status.success(), "{dump:?}");
    let entries: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    entries.as_array().unwrap().len()
}

/// A pod's cgroup goes before its endpoint does: the pass in between, which unenrolls and
/// clears it, must not write its CIDR entries again, or the ones `cidr_entries` does not list
/// (the barrier keeping IPv4 out of `::/0`) stay in the pinned map for good, one per pod.
#[tokio::test]
async fn a_pod_whose_cgroup_went_first_leaves_no_cidr_entries_behind() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "bpftool"]) {
        return;
    }
    // `world` on a port: `::/0`, which takes in the IPv4-mapped addresses, with its barrier.
    let policy = TalkPolicy::default().yaml()
        + "  - toEntities: [world]\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n";
    let lab = firewall_with_endpoints_dir(policy).await;
    let enrolled = |count: f64| {
        let admin = lab.agent.admin;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let scrape = http_get(admin, "/metrics").await.unwrap();
                if metric_value(&scrape, "warden_datapath_enrolled_endpoints", &[]) == count {
                    return;
                }
                assert!(Instant::now() < deadline, "never {count} enrolled");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let before = map_entries(&lab.bpffs, "cidr_allow");
    let cgroup = lab.cgroups.child("gone").unwrap();
    let endpoint = lab.config.endpoints_dir.as_ref().unwrap().join("gone.yaml");
    std::fs::write(
        &endpoint,
        "- {name: gone, namespace: youssef, labels: {app: test}, cgroup: gone}\n",
    )
    .unwrap();
    enrolled(2.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = map_entries(&lab.bpffs, "cidr_allow");
    assert!(during > before, "{before} then {during}");

    std::fs::remove_dir(&cgroup).unwrap();
    enrolled(1.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::remove_file(&endpoint).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(map_entries(&lab.bpffs, "cidr_allow"), before);

    // What an earlier release leaked that way (the barrier of an endpoint gone) is swept.
    let pins = warden_datapath::Datapath::open_pinned(&lab.bpffs).unwrap();
    let everything_v6 = "::/0".parse().unwrap();
    pins.set_cidr_rules(4242, everything_v6, &[]).unwrap();
    pins.remove_cidr(4242, everything_v6).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while map_entries(&lab.bpffs, "cidr_allow") != before {
        assert!(Instant::now() < deadline, "the orphan barrier stayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A UDP sender as fast as it goes: `host port seconds`; prints the datagrams sent and those
/// the datapath refused (EPERM), then whether one to `port + 1` is refused.
const UDP_FLOOD_PY: &str = r#"
import errno, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + seconds
sent = refused = 0
while time.monotonic() < end:
    for _ in range(200):
        try:
            s.sendto(b"x", (host, port))
            sent += 1
        except OSError as error:
            if error.errno != errno.EPERM:
                raise
            refused += 1
try:
    s.sendto(b"x", (host, port + 1))
    other = "sent"
except OSError as error:
    other = "refused" if error.errno == errno.EPERM else str(error)
print(sent, refused, other)
"#;

/// What [`UDP_FLOOD_PY`] reported.
struct FloodReport {
    sent: u64,
    refused: u64,
    /// `refused` or `sent` for the datagram to the next port.
    other: String,
    report: String,
}

impl FloodReport {
    /// The workload was enforced by the end (the datagram to another port refused), and not
    /// one datagram it is allowed to send was refused `during` the change.
    fn assert_enforced_and_nothing_cut(&self, during: &str) {
        let FloodReport {
            sent,
            refused,
            other,
            report,
        } = self;
        assert_eq!(other, "refused", "never enforced: {report}");
        assert!(*sent > 10_000, "{report}");
        assert_eq!(*refused, 0, "{refused} of {sent} refused {during}");
    }
}

/// `app=app`'s policy allowing UDP port 9 to the egress peer `peer` (a YAML list item's
/// fields, its continuation lines indented by four), as [`start_udp_flood`] sends.
fn port_9_policy(app: &str, peer: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: talk\n  namespace: youssef\nspec:\n  endpointSelector:\n    matchLabels:\n      app: {app}\n  egress:\n  - {peer}\n    toPorts:\n    - ports:\n      - port: \"9\"\n        protocol: UDP\n"
    )
}

/// Starts [`UDP_FLOOD_PY`] in `cgroup` against port 9 of the lab's internet for `seconds`.
fn start_udp_flood(cgroup: &Path, seconds: u32) -> std::thread::JoinHandle<FloodReport> {
    let cgroup = cgroup.to_path_buf();
    std::thread::spawn(move || {
        let out = warden_tests::lab::run_in_cgroup(
            &cgroup,
            Command::new(python3().unwrap()).args([
                "-c",
                UDP_FLOOD_PY,
                &INTERNET_V4.to_string(),
                "9",
                &seconds.to_string(),
            ]),
            Duration::from_secs(20),
        )
        .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        let fields: Vec<&str> = report.split_whitespace().collect();
        assert_eq!(
            fields.len(),
            3,
            "{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        FloodReport {
            sent: fields[0].parse().unwrap(),
            refused: fields[1].parse().unwrap(),
            other: fields[2].to_owned(),
            report,
        }
    })
}

/// A policy that comes to select a running workload allows what it sends from the first
/// packet: the agent enrolled the endpoint as enforced at the start of its pass and wrote its
/// allow entries after, and every packet in between was dropped.
#[tokio::test]
async fn a_policy_selecting_a_running_workload_cuts_nothing_it_allows() {
    if !require_lab() || !warden_tests::require_tools(&["knotd"]) {
        return;
    }
    let policy = |app: &str| port_9_policy(app, &format!("toCIDR: [\"{INTERNET_V4}/32\"]"));
    let lab = Firewall::start(FirewallOptions {
        policy: policy("nobody"),
        ..FirewallOptions::default()
    })
    .await
    .unwrap();
    let flood = start_udp_flood(&lab.workload, 6);
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.dir.write_policy("talk.yaml", &policy("test")).unwrap();
    flood
        .join()
        .unwrap()
        .assert_enforced_and_nothing_cut("while the policy came in");
}

/// A toCIDRSet whose `except` list grows (and shrinks again) splits the prefix its traffic
/// goes by into others (128.0.0.0/1 into 192.0.0.0/2 and more, around 172.16.0.0/12): the
/// reconciler removed the old prefix before it wrote the new ones, and what the workload sent
/// in between met the default deny.
#[tokio::test]
async fn a_cidr_rule_split_by_a_new_except_cuts_nothing_it_allows() {
    if !require_lab() || !warden_tests::require_tools(&["knotd"]) {
        return;
    }
    let policy = |except: &str| {
        port_9_policy(
            "test",
            &format!("toCIDRSet:\n    - cidr: 0.0.0.0/0\n      except: [{except}]"),
        )
    };
    let (narrow, wide) = (policy("10.0.0.0/8"), policy("10.0.0.0/8, 172.16.0.0/12"));
    let lab = Firewall::start(FirewallOptions {
        policy: narrow.clone(),
        ..FirewallOptions::default()
    })
    .await
    .unwrap();
    let flood = start_udp_flood(&lab.workload, 5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for change in 0..8 {
        let next = if change % 2 == 0 { &wide } else { &narrow };
        lab.dir.write_policy("talk.yaml", next).unwrap();
        tokio::time::sleep(Duration::from_millis(450)).await;
    }
    flood
        .join()
        .unwrap()
        .assert_enforced_and_nothing_cut("while the except list changed");
}

/// An endpoint whose cgroup is nested in an enforced one's is enforced by that one's policy
/// until its own enrollment: enrolling it took no moment unenforced in between (a new pod's
/// cgroup is first enrolled unenforced, to redirect its DNS, only when the nearest enrolled
/// cgroup above it does not enforce).
#[tokio::test]
async fn a_nested_endpoint_is_never_unenforced_on_its_way_in() {
    if !require_lab() || !warden_tests::require_tools(&["knotd"]) {
        return;
    }
    let lab = firewall_with_endpoints_dir(TalkPolicy::default().yaml()).await;
    let inner = lab.cgroups.child("workload/inner").unwrap();
    let flood = start_udp_flood(&inner, 5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(
        lab.config
            .endpoints_dir
            .as_ref()
            .unwrap()
            .join("inner.yaml"),
        "- {name: inner, namespace: youssef, labels: {app: test}, cgroup: workload/inner}\n",
    )
    .unwrap();
    let FloodReport {
        sent,
        refused,
        report,
        ..
    } = flood.join().unwrap();
    let scrape = http_get(lab.agent.admin, "/metrics").await.unwrap();
    assert_eq!(
        metric_value(&scrape, "warden_datapath_enrolled_endpoints", &[]),
        2.0,
        "the nested endpoint was never enrolled"
    );
    assert!(refused > 10_000, "{report}");
    assert_eq!(sent, 0, "sent past the policy on the way in: {report}");
}

/// Two endpoints naming one cgroup: the first keeps it. Each pass enrolled the other one,
/// clearing the first's entries, and its traffic went by whichever policy enrolled last.
#[tokio::test]
async fn a_cgroup_two_endpoints_name_stays_with_the_first() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "bpftool"]) {
        return;
    }
    let lab = firewall_with_endpoints_dir(TalkPolicy::default().yaml()).await;
    std::fs::write(
        lab.config.endpoints_dir.as_ref().unwrap().join("twin.yaml"),
        "- {name: twin, namespace: youssef, labels: {app: other}, cgroup: workload}\n",
    )
    .unwrap();
    let enrollments = || async {
        let scrape = http_get(lab.agent.admin, "/metrics").await.unwrap();
        metric_value(
            &scrape,
            "warden_datapath_updates_total",
            &[("op", "enroll")],
        )
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = enrollments().await;
    for _ in 0..3 {
        // `twin` has no policy: were it enrolled, this would pass.
        let attempt =
            curl_with(&lab.workload, &format!("http://{INTERNET_V4}/"), &[], SHORT).unwrap();
        assert!(quick_refusal(&attempt), "{attempt:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(enrollments().await, settled, "enrolled again and again");
    assert!(lab.curl_ok("http://cilium.io/", &["-4"]).ok());
}

/// Asks a resolver on port 53 of each loopback address, over UDP and TCP, from inside the
/// process's own network namespace, answering itself as that resolver would.
const LOOPBACK_RESOLVER_PY: &str = r#"
import socket

def udp(family, host):
    server = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 53))
    server.settimeout(3)
    client = socket.socket(family, socket.SOCK_DGRAM)
    client.settimeout(3)
    try:
        client.sendto(b"ping", (host, 53))
        data, peer = server.recvfrom(512)
        server.sendto(b"echo " + data, peer)
        answer, source = client.recvfrom(512)
        return f"{answer.decode()} from {source[0]}"
    except OSError as e:
        return f"error {e}"

def tcp(family, host):
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 53))
    server.listen()
    server.settimeout(3)
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(3)
    try:
        client.connect((host, 53))
        client.sendall(b"ping")
        conn, _ = server.accept()
        conn.settimeout(3)
        conn.sendall(b"echo " + conn.recv(512))
        return f"{client.recv(512).decode()} from {client.getpeername()[0]}"
    except OSError as e:
        return f"error {e}"

for family, host in [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]:
    print(f"udp {host}: {udp(family, host)}")
print(f"tcp 127.0.0.1: {tcp(socket.AF_INET, '127.0.0.1')}")
"#;

/// A pod's loopback is its own: a resolver it runs on port 53 of 127.0.0.1 or ::1 (a sidecar,
/// a local cache) answers it directly. Such queries were redirected to the proxy, which asked
/// the loopback of its own namespace (the host's) instead, or could not reach the proxy at all.
/// The lab's other tests ask knotd on the host's loopback from the host's namespace, which is
/// the proxy's and stays redirected.
#[tokio::test]
async fn a_workload_in_its_own_network_namespace_reaches_its_loopback_resolver() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "unshare", "ip"]) {
        return;
    }
    let lab = firewall(60).await;
    if lab
        .agent
        .log()
        .contains("does not tell a socket's network namespace")
    {
        eprintln!("skipping: this kernel has no SO_NETNS_COOKIE (Linux 5.14)");
        return;
    }
    let ip = warden_tests::tool_path("ip").unwrap();
    let out = warden_tests::lab::run_in_cgroup(
        &lab.workload,
        Command::new(warden_tests::tool_path("unshare").unwrap())
            .args([
                "--net",
                "sh",
                "-c",
                "\"$0\" link set lo up && exec \"$1\" -c \"$2\"",
            ])
            .arg(ip)
            .arg(python3().unwrap())
            .arg(LOOPBACK_RESOLVER_PY),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "udp 127.0.0.1: echo ping from 127.0.0.1\n\
         udp ::1: echo ping from ::1\n\
         tcp 127.0.0.1: echo ping from 127.0.0.1\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A dual-stack socket (as Java's and many runtimes' are) connected to a v4-mapped server on
/// port 53, asking twice: prints the peer the application sees before and after, where each
/// answer came from, and the first address answered; then an unconnected one asking once.
const DUAL_STACK_ASK_PY: &str = r#"
import socket, struct, sys

server = "::ffff:" + sys.argv[1]
query = struct.pack(">HHHHHH", 0x5757, 0x0100, 1, 0, 0, 0) + b"\x06cilium\x02io\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.settimeout(3)
s.connect((server, 53))
print("peer", s.getpeername()[:2])
for _ in range(2):
    s.send(query)
    answer, source = s.recvfrom(512)
    count = struct.unpack(">H", answer[6:8])[0]
    print("answer", answer[:2] == query[:2], count, socket.inet_ntop(socket.AF_INET, answer[-4:]), "from", source[:2])
print("peer", s.getpeername()[:2])
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.settimeout(3)
u.sendto(query, (server, 53))
answer, source = u.recvfrom(512)
print("unconnected", struct.unpack(">H", answer[6:8])[0], socket.inet_ntop(socket.AF_INET, answer[-4:]), "from", source[:2])
"#;

/// A dual-stack UDP socket connected to a v4-mapped server on port 53 is redirected at its
/// connect, and its answers keep showing the server it asked, query after query, while the
/// proxy asks that server (not `dns.upstream`) and learns what the answers grant. The kernel
/// sends such a socket's datagrams through its IPv4 path, which runs sendmsg4 with the
/// connected address (the DNS target) every time: the program took that for a query addressed
/// to the target itself and forgot the original at the first send, with the DNS target on a
/// port of its own and, in a second way, on port 53 (a node-local resolver address). Unconnected,
/// each send is redirected on its own.
#[tokio::test]
async fn a_dual_stack_socket_connected_to_a_v4_mapped_server_is_redirected_for_good() {
    if !require_lab() || !warden_tests::require_tools(&["knotd"]) {
        return;
    }
    for dns_on_port_53 in [false, true] {
        let lab = Firewall::start(FirewallOptions {
            dns_on_port_53,
            ..FirewallOptions::default()
        })
        .await
        .unwrap();
        // Another server than `dns.upstream`, with the same zones.
        let asked = warden_tests::KnotUpstream::start_on(SocketAddr::new(
            warden_tests::unique_loopback_v4(),
            53,
        ))
        .unwrap();
        let server = asked.addr().ip().to_string();
        let out = warden_tests::lab::run_in_cgroup(
            &lab.workload,
            Command::new(python3().unwrap()).args(["-c", DUAL_STACK_ASK_PY, &server]),
            Duration::from_secs(20),
        )
        .unwrap();
        let seen = format!("('::ffff:{server}', 53)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!(
                "peer {seen}\n\
                 answer True 1 {CILIUM_IO_V4} from {seen}\n\
                 answer True 1 {CILIUM_IO_V4} from {seen}\n\
                 peer {seen}\n\
                 unconnected 1 {CILIUM_IO_V4} from {seen}\n"
            ),
            "DNS target {}: {}",
            lab.agent.dns,
            String::from_utf8_lossy(&out.stderr)
        );
        let flows = lab.flows(lab.agent.admin).await.unwrap();
        let asked_there = flows
            .iter()
            .filter(|flow| flow["type"] == "dns" && flow["qname"] == "cilium.io.")
            .map(|flow| flow["server"].clone())
            .collect::<Vec<_>>();
        assert_eq!(
            asked_there,
            vec![serde_json::json!(asked.addr().to_string()); 3],
            "DNS target {}",
            lab.agent.dns
        );
        // Through the proxy, not past it: the answer opened the name's address.
        let url = format!("http://{CILIUM_IO_V4}/");
        let call = lab.curl_ok(&url, &["-H", "Host: cilium.io"]);
        assert!(call.ok(), "{call:?}");
    }
}

/// Asks `big.cilium.io` (EDNS, so the whole answer comes over UDP) and, the moment the answer is
/// read, tries port 80 of every address it carries, the last first (the last written):
/// prints how many it carried and which ones a connect found refused by policy.
const BIG_ANSWER_PY: &str = r#"
import errno, socket, struct, sys

query = struct.pack(">HHHHHH", 0x6b6b, 0x0100, 1, 0, 0, 1) + b"\x03big\x06cilium\x02io\x00\x00\x01\x00\x01"
query += b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(query, (sys.argv[1], 53))
answer = s.recv(4096)
addrs, at = [], 12
at = answer.index(b"\x00\x01\x00\x01", at) + 4
for _ in range(struct.unpack(">H", answer[6:8])[0]):
    if answer[at] & 0xc0 == 0xc0:
        at += 2
    else:
        while answer[at]:
            at += answer[at] + 1
        at += 1
    rtype, _, _, length = struct.unpack(">HHIH", answer[at:at + 10])
    at += 10
    if rtype == 1:
        addrs.append(socket.inet_ntoa(answer[at:at + 4]))
    at += length
refused = []
for addr in reversed(addrs):
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.setblocking(False)
    if c.connect_ex((addr, 80)) == errno.EPERM:
        refused.append(addr)
    c.close()
print(len(addrs), "refused:", refused)
"#;

/// An answer whose allow entries are too many to write on the answer loop (40 addresses on two
/// ports) has them written on a thread of its own, and is released only once they all are: a
/// client connecting to every address the moment it reads the answer is refused none.
#[tokio::test]
async fn a_large_answer_is_released_once_all_its_allow_entries_are_written() {
    if !require_lab() || !warden_tests::require_tools(&["knotd"]) {
        return;
    }
    let policy = TalkPolicy {
        fqdns: &[r#"matchPattern: "*.cilium.io""#],
        ..TalkPolicy::default()
    }
    .yaml();
    let lab = Firewall::start(FirewallOptions {
        policy,
        ..FirewallOptions::default()
    })
    .await
    .unwrap();
    let before = http_get(lab.agent.admin, "/metrics").await.unwrap();
    let out = warden_tests::lab::run_in_cgroup(
        &lab.workload,
        Command::new(python3().unwrap()).args([
            "-c",
            BIG_ANSWER_PY,
            &lab.upstream.addr().ip().to_string(),
        ]),
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{BIG_CILIUM_IO_COUNT} refused: []\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = http_get(lab.agent.admin, "/metrics").await.unwrap();
    let written =
        |scrape: &str| metric_value(scrape, "warden_datapath_updates_total", &[("op", "allow")]);
    assert!(
        written(&after) - written(&before) >= f64::from(BIG_CILIUM_IO_COUNT) * 2.0,
        "{} allow entries written",
        written(&after) - written(&before)
    );
    let deferred =
        |scrape: &str| metric_value(scrape, "warden_datapath_allow_batches_deferred_total", &[]);
    assert_eq!(
        deferred(&after) - deferred(&before),
        1.0,
        "written by the allow writer"
    );
}
