//! The standalone proxy and the HA protocol end to end, on the lab of the datapath tests:
//! `warden-agent` and `warden-dnsproxy` share the DNS port, and each is killed, restarted and
//! left alone while workloads resolve and connect. Needs root; one test at a time (lab lock).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use warden_tests::firewall::{Firewall, FirewallOptions, quick_refusal};
use warden_tests::lab::{dig_in_cgroup, dnsperf_in_cgroup, require_lab};
use warden_tests::warden::{TalkPolicy, http_get, http_json, metric_value, sorted_ips};
use warden_tests::zones::*;
use warden_tests::{DigOpts, DnsperfOpts, write_queries_file};

/// The talk's policy, plus every subdomain of cilium.io by pattern.
fn policy_with_pattern() -> String {
    TalkPolicy {
        fqdns: &[
            "matchName: google.com",
            "matchName: cilium.io",
            r#"matchPattern: "*.cilium.io""#,
        ],
        ..TalkPolicy::default()
    }
    .yaml()
}

/// A DNS policy that refuses names: only cilium.io, its subdomains and google.com resolve.
fn refusing_policy() -> String {
    TalkPolicy {
        dns_rules: &[
            "matchName: cilium.io",
            r#"matchPattern: "*.cilium.io""#,
            "matchName: google.com",
        ],
        ..TalkPolicy::default()
    }
    .yaml()
}

/// The lab with warden-dnsproxy beside the agent, once the proxy's session with it is up.
async fn lab(policy: String) -> Firewall {
    lab_with(FirewallOptions {
        policy,
        ..FirewallOptions::default()
    })
    .await
}

/// [`lab`] with more of the options (the dnsproxy is always on).
async fn lab_with(options: FirewallOptions) -> Firewall {
    let mut lab = Firewall::start(FirewallOptions {
        with_dnsproxy: true,
        ..options
    })
    .await
    .unwrap();
    wait_status(lab.dnsproxy().admin, Duration::from_secs(15), |s| {
        s["peer_connected"] == true
    })
    .await;
    // The proxy acknowledges the policy the agent sent it (compiled and saved: seconds when
    // every test of this file starts its two processes at once on a small machine).
    let revision = status(lab.agent.admin).await["policy_revision"]
        .as_f64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let scrape = http_get(lab.agent.admin, "/metrics").await.unwrap();
        if metric_value(&scrape, "warden_peer_policy_revision", &[]) == revision {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revision {revision} never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lab
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    http_json(admin, "/v1/status").await.unwrap()
}

/// dnsperf from the workload at `qps` for `seconds`, in the background: 4 clients, a query
/// unanswered for 2 s counts as lost.
fn steady_load(
    lab: &Firewall,
    queries: &std::path::Path,
    qps: u32,
    seconds: u32,
) -> tokio::task::JoinHandle<anyhow::Result<warden_tests::DnsperfReport>> {
    let workload = lab.workload.clone();
    let server = lab.upstream.addr();
    let opts = DnsperfOpts {
        qps: Some(qps),
        clients: 4,
        timeout_s: 2,
        ..DnsperfOpts::new(queries, seconds)
    };
    tokio::spawn(async move { dnsperf_in_cgroup(&workload, server, &opts).await })
}

/// Waits until `check` holds for the status at `admin`.
async fn wait_status(
    admin: SocketAddr,
    limit: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let current = status(admin).await;
        if check(&current) {
            return current;
        }
        assert!(Instant::now() < deadline, "status never matched: {current}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The names of a cache listing.
fn cache_names(rows: &serde_json::Value) -> BTreeSet<String> {
    cache_set(rows)
        .into_iter()
        .map(|(_, name, _)| name)
        .collect()
}

/// (endpoint, name, sorted IPs) of a cache listing.
fn cache_set(rows: &serde_json::Value) -> BTreeSet<(String, String, Vec<String>)> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["endpoint"].as_str().unwrap().to_owned(),
                row["name"].as_str().unwrap().to_owned(),
                sorted_ips(row),
            )
        })
        .collect()
}

/// Answers held while their allow entries were written: how many, and the bucket bounds under
/// which half and 99% of them fell.
fn hold_summary(scrape: &str) -> String {
    let labels = [("scope", "datapath_hold")];
    let count = metric_value(scrape, "warden_dns_processing_seconds_count", &labels);
    let sum = metric_value(scrape, "warden_dns_processing_seconds_sum", &labels);
    let bound = |quantile: f64| {
        scrape
            .lines()
            .filter(|line| {
                line.starts_with("warden_dns_processing_seconds_bucket")
                    && line.contains("scope=\"datapath_hold\"")
            })
            .filter_map(|line| {
                let le = line
                    .split("le=\"")
                    .nth(1)?
                    .split('"')
                    .next()?
                    .parse::<f64>()
                    .ok()?;
                let value = line.rsplit(' ').next()?.parse::<f64>().ok()?;
                Some((le, value))
            })
            .find(|(_, value)| *value >= quantile * count)
            .map_or(f64::NAN, |(le, _)| le * 1e6)
    };
    format!(
        "{count} answers, mean {:.0} µs, p50 ≤ {:.0} µs, p99 ≤ {:.0} µs",
        sum / count.max(1.0) * 1e6,
        bound(0.5),
        bound(0.99)
    )
}

/// A pod's cgroup appears while both processes run: the agent enrolls it (its DNS now goes to
/// the dnsproxy) up to a second before the dnsproxy's snapshot names it. Queries in that gap
/// got SERVFAIL from the dnsproxy (an enrolled cgroup it could not place), the very first
/// lookups of a starting application. It places the cgroup by the endpoint ID of its
/// enrollment instead, and the pod's DNS rules apply from the first redirected query.
#[tokio::test]
async fn a_pod_starting_under_the_dnsproxy_is_answered_from_its_first_query() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig"]) {
        return;
    }
    let mut lab = lab_with(FirewallOptions {
        policy: refusing_policy(),
        late_workload: true,
        ..FirewallOptions::default()
    })
    .await;
    let late = lab.cgroups.child("late").unwrap();
    let opts = DigOpts {
        timeout_s: 2,
        ..DigOpts::default()
    };
    // Until it is enrolled knotd answers it directly; from then on the dnsproxy does, with
    // its verdict. Neither may ever be SERVFAIL. (Eighty digs, each a process started in the
    // cgroup: 5 s was too little on a machine busy building.)
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut refused = 0;
    while refused < 40 {
        assert!(Instant::now() < deadline, "only {refused} refusals");
        let allowed = dig_in_cgroup(&late, lab.upstream.addr(), "cilium.io", "A", opts)
            .await
            .unwrap();
        assert_eq!(allowed.status, "NOERROR", "{}", allowed.raw);
        let denied = dig_in_cgroup(&late, lab.upstream.addr(), "bbc.co.uk", "A", opts)
            .await
            .unwrap();
        match denied.status.as_str() {
            "REFUSED" => refused += 1,
            "NOERROR" => assert_eq!(refused, 0, "answered after a refusal: {}", denied.raw),
            _ => panic!("{}", denied.raw),
        }
    }
    // And what the dnsproxy answered, it answered as the pod's: no query of the late cgroup
    // passed for an unknown sender's or failed.
    let proxy_admin = lab.dnsproxy().admin;
    let flows = lab.flows(proxy_admin).await.unwrap();
    let late_flows: Vec<_> = flows
        .iter()
        .filter(|flow| flow["type"] == "dns" && flow["qname"] == "bbc.co.uk.")
        .collect();
    assert!(!late_flows.is_empty(), "{flows:?}");
    for flow in late_flows {
        assert_eq!(flow["endpoint"], "youssef/late", "{flow}");
        assert_eq!(flow["verdict"], "denied", "{flow}");
    }
    // The dnsproxy's sockets went into the agent's reuseport selection, and without error.
    let scrape = http_get(proxy_admin, "/metrics").await.unwrap();
    let reuseport = [("op", "reuseport")];
    assert!(metric_value(&scrape, "warden_datapath_updates_total", &reuseport) >= 1.0);
    assert_eq!(
        metric_value(&scrape, "warden_datapath_errors_total", &reuseport),
        0.0
    );
}

#[tokio::test]
async fn a_pod_written_into_endpoints_dir_is_policed_by_both_processes_until_removed() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig"]) {
        return;
    }
    let lab = lab_with(FirewallOptions {
        policy: refusing_policy(),
        endpoints_dir: true,
        ..FirewallOptions::default()
    })
    .await;
    let pod = lab.cgroups.child("dyn").unwrap();
    let opts = DigOpts {
        timeout_s: 2,
        ..DigOpts::default()
    };
    let ask = |name: &'static str| {
        let pod = pod.clone();
        let server = lab.upstream.addr();
        async move { dig_in_cgroup(&pod, server, name, "A", opts).await.unwrap() }
    };
    // Not an endpoint: knotd answers it directly.
    assert_eq!(ask("bbc.co.uk").await.status, "NOERROR");

    let file = lab.config.endpoints_dir.clone().unwrap().join("dyn.yaml");
    std::fs::write(
        &file,
        "- {name: dyn, namespace: youssef, labels: {app: test}, cgroup: dyn}\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask("bbc.co.uk").await.status != "REFUSED" {
        assert!(Instant::now() < deadline, "the new pod is not policed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ask("cilium.io").await.status, "NOERROR");
    // The dnsproxy (preferred) knows the pod by name too: the agent's snapshot carried it.
    let proxy_admin = lab.dnsproxy.as_ref().unwrap().admin;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let flows = lab.flows(proxy_admin).await.unwrap();
        if flows
            .iter()
            .any(|flow| flow["endpoint"] == "youssef/dyn" && flow["verdict"] == "denied")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dnsproxy never placed the pod: {flows:?}"
        );
        ask("bbc.co.uk").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The pod's file goes: it is nobody's again, its queries go to knotd.
    std::fs::remove_file(&file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask("bbc.co.uk").await.status != "NOERROR" {
        assert!(
            Instant::now() < deadline,
            "the removed pod is still policed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_talk_holds_with_every_agent_down_and_the_caches_converge() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = lab(policy_with_pattern()).await;
    let proxy_admin = lab.dnsproxy().admin;
    let online = status(proxy_admin).await;
    assert_eq!(online["peer_connected"], true);
    assert_eq!(online["mode"], "online");
    assert_eq!(online["instance"], "dnsproxy");
    let agent_status = wait_status(lab.agent.admin, Duration::from_secs(15), |s| {
        s["peer_connected"] == true
    })
    .await;
    let holders: Vec<_> = agent_status["dns_port_holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(holders, ["agent", "dnsproxy"], "{agent_status}");
    assert_eq!(agent_status["preferred"], "dnsproxy");

    for url in ["http://cilium.io/", "http://google.com/"] {
        let result = lab.curl(url, &["-4"]).unwrap();
        assert!(result.ok(), "{url}: {result:?}");
    }
    let bbc = lab.curl("http://bbc.co.uk/", &["-4"]).unwrap();
    assert!(quick_refusal(&bbc), "{bbc:?}");

    // Every agent down.
    lab.agent.kill().unwrap();
    let offline = wait_status(proxy_admin, Duration::from_secs(10), |s| {
        s["mode"] == "offline"
    })
    .await;
    assert_eq!(offline["serving"], true);
    assert_eq!(offline["peer_connected"], false);
    for url in ["http://cilium.io/", "http://google.com/"] {
        let result = lab.curl(url, &["-4"]).unwrap();
        assert!(result.ok(), "agent down, {url}: {result:?}");
    }
    let bbc = lab.curl("http://bbc.co.uk/", &["-4"]).unwrap();
    assert!(quick_refusal(&bbc), "agent down, bbc.co.uk: {bbc:?}");
    // A name never resolved before, allowed by a pattern: the proxy writes its entries itself.
    let fresh = lab.curl("http://anysub.cilium.io/", &["-4"]).unwrap();
    assert!(fresh.ok(), "agent down, anysub.cilium.io: {fresh:?}");
    assert!(fresh.body.contains(&ANYSUB_CILIUM_IO_V4.to_string()));
    let journal = metric_value(
        &http_get(proxy_admin, "/metrics").await.unwrap(),
        "warden_journal_entries",
        &[],
    );
    assert!(journal >= 1.0, "mappings journaled while the agent is away");

    // The agent comes back: within 5 s it knows what was learned without it, and both
    // caches are equal.
    lab.agent.restart().await.unwrap();
    let restarted = Instant::now();
    let converged = loop {
        let agent_cache = lab
            .agent
            .cli(&["fqdn", "cache", "list", "-o", "json"])
            .unwrap();
        let agent_rows: serde_json::Value = serde_json::from_slice(&agent_cache.stdout).unwrap();
        let proxy_rows = http_json(proxy_admin, "/v1/fqdn/cache").await.unwrap();
        let agent_set = cache_set(&agent_rows);
        if agent_set
            .iter()
            .any(|(_, name, _)| name == "anysub.cilium.io.")
            && agent_set == cache_set(&proxy_rows)
        {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "caches did not converge:\nagent {agent_rows}\nproxy {proxy_rows}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("agent ready to converged caches: {converged:?}");
    let back = wait_status(proxy_admin, Duration::from_secs(10), |s| {
        s["mode"] == "online"
    })
    .await;
    assert!(back["last_resync_ms"].as_u64().is_some(), "{back}");
    let scrape = http_get(lab.agent.admin, "/metrics").await.unwrap();
    assert!(metric_value(&scrape, "warden_resyncs_total", &[]) >= 1.0);
    for (instance, admin) in [("agent", lab.agent.admin), ("dnsproxy", proxy_admin)] {
        let scrape = http_get(admin, "/metrics").await.unwrap();
        println!("{instance} datapath hold: {}", hold_summary(&scrape));
    }
    assert!(metric_value(&scrape, "warden_peer_mappings_received_total", &[]) >= 1.0);
}

/// The names in the agent's FQDN cache.
fn agent_cache_names(lab: &Firewall) -> BTreeSet<String> {
    let listed = lab
        .agent
        .cli(&["fqdn", "cache", "list", "-o", "json"])
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap_or_default();
    cache_names(&rows)
}

/// Waits until the agent's cache lists `name`.
async fn wait_agent_cache(lab: &Firewall, name: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if agent_cache_names(lab).contains(name) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{name} not in the agent's cache after {limit:?}: {:?}",
            agent_cache_names(lab)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_agent_that_lost_its_state_gets_the_proxys_cache_back_and_keeps_its_entries() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = lab(policy_with_pattern()).await;
    let proxy_admin = lab.dnsproxy().admin;
    wait_status(lab.agent.admin, Duration::from_secs(15), |s| {
        s["preferred"] == "dnsproxy"
    })
    .await;

    // The proxy answers; the agent is told live, so nothing is journaled.
    let cilium = lab.curl("http://cilium.io/", &["-4"]).unwrap();
    assert!(cilium.ok(), "{cilium:?}");
    wait_agent_cache(&lab, "cilium.io.", Duration::from_secs(3)).await;
    // Its flow event reaches the agent's log too, field for field as the proxy recorded it.
    let proxy_flows = lab.flows(proxy_admin).await.unwrap();
    let answered = proxy_flows
        .iter()
        .find(|flow| flow["qname"] == "cilium.io." && flow["qtype"] == "A")
        .unwrap_or_else(|| panic!("no cilium.io. A event in {proxy_flows:?}"))
        .clone();
    assert_eq!(answered["instance"], "dnsproxy");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !lab
        .flows(lab.agent.admin)
        .await
        .unwrap()
        .contains(&answered)
    {
        assert!(
            Instant::now() < deadline,
            "{answered} never reached the agent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The agent dies and its state with it (a crash before its next save, a lost volume).
    lab.agent.kill().unwrap();
    match std::fs::remove_file(lab.dir.state_dir().join("fqdn-cache.json")) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => panic!("{error}"),
        _ => {}
    }
    // And the proxy is slow to come back (stopped here, so it has no session yet): in its first
    // seconds the new agent's reconciler must not take the entries the proxy wrote for
    // unwanted (the agent's cache lacks their mappings) and cut the workload's connections.
    // This is the agent's startup grace (10 s; the 4 s here leave room for a slow start); a
    // resync under way holding revocations back is unit-tested in agent/src/api.rs.
    let proxy_pid =
        nix::unistd::Pid::from_raw(i32::try_from(lab.dnsproxy().pid().unwrap()).unwrap());
    nix::sys::signal::kill(proxy_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let restarted = lab.agent.restart().await;
    let restarted_at = Instant::now();
    if restarted.is_ok() {
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let while_away = lab.curl(&format!("http://{CILIUM_IO_V4}/"), &[]);
    nix::sys::signal::kill(proxy_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    restarted.unwrap();
    let while_away = while_away.unwrap();
    assert!(
        while_away.ok(),
        "revoked before the proxy's resync: {while_away:?}"
    );
    // The proxy's resync carries its whole cache, not only its (empty) journal, and a repeat
    // answer would not tell the agent again: mappings cross only when they change a cache.
    let back = wait_agent_cache(&lab, "cilium.io.", Duration::from_secs(5)).await;
    println!("agent restart to cilium.io back in its cache: {back:?}");

    // Past the agent's startup grace (10 s) and the reconciler's grace for entries no cache
    // wants (2 s), and a pass after, the proxy's allow entries stand: a connection by
    // address, without a new DNS query, still goes through.
    let past_graces = Duration::from_secs(14);
    tokio::time::sleep(past_graces.saturating_sub(restarted_at.elapsed())).await;
    let by_address = lab.curl(&format!("http://{CILIUM_IO_V4}/"), &[]).unwrap();
    assert!(by_address.ok(), "{by_address:?}");
}

#[tokio::test]
async fn a_stopping_proxy_hands_every_flow_event_to_the_agent() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool", "dnsperf"]) {
        return;
    }
    let mut lab = lab(policy_with_pattern()).await;
    wait_status(lab.agent.admin, Duration::from_secs(15), |s| {
        s["preferred"] == "dnsproxy"
    })
    .await;

    // The proxy answers a steady load until it is stopped mid-run; the agent answers the rest.
    // Far below the proxy's forwarding budget (5,000 events a second) and within the agent's
    // flow log (10,000), every query is one event in the agent's log, whoever answered it,
    // including those of the proxy's last flow window and of its drain.
    let queries = write_queries_file(&[("www.cilium.io", "A")]).unwrap();
    let load = steady_load(&lab, queries.path(), 1000, 2);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let exit = lab.dnsproxy().stop().unwrap();
    assert!(exit.success(), "{exit:?}");
    let report = load.await.unwrap().unwrap();
    assert_eq!(report.lost, 0, "{}", report.raw);

    let flows = lab.flows(lab.agent.admin).await.unwrap();
    let answered_by = |instance: &str| {
        flows
            .iter()
            .filter(|flow| flow["qname"] == "www.cilium.io." && flow["instance"] == instance)
            .count() as u64
    };
    let (by_proxy, by_agent) = (answered_by("dnsproxy"), answered_by("agent"));
    println!(
        "{} queries: {by_proxy} events from the dnsproxy, {by_agent} from the agent",
        report.completed
    );
    assert!(by_proxy > 0 && by_agent > 0, "both served");
    let log = lab.dnsproxy().log();
    assert_eq!(
        by_proxy + by_agent,
        report.completed,
        "flow events lost at the proxy's stop; its log:\n{log}"
    );
    assert!(
        log.contains("the agent has every message"),
        "the session did not close gracefully:\n{log}"
    );
}

/// The lab, its workload having reached cilium.io and google.com, both names in the agent's
/// cache; None where the lab cannot run.
async fn lab_that_reached_both() -> Option<Firewall> {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return None;
    }
    let lab = lab(policy_with_pattern()).await;
    for url in ["http://cilium.io/", "http://google.com/"] {
        let result = lab.curl(url, &["-4"]).unwrap();
        assert!(result.ok(), "{url}: {result:?}");
    }
    wait_agent_cache(&lab, "cilium.io.", Duration::from_secs(3)).await;
    wait_agent_cache(&lab, "google.com.", Duration::from_secs(3)).await;
    Some(lab)
}

/// Waits until the proxy's cache has lost cilium.io, and checks it kept google.com.
async fn wait_proxy_cleaned_of_cilium(proxy_admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let names = cache_names(&http_json(proxy_admin, "/v1/fqdn/cache").await.unwrap());
        if !names.contains("cilium.io.") {
            assert!(
                names.contains("google.com."),
                "only the pattern goes: {names:?}"
            );
            return;
        }
        assert!(Instant::now() < deadline, "the proxy kept {names:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `warden fqdn cache clean -n cilium.io` on the agent, then waits until the proxy's copy
/// has lost it too.
async fn clean_cilium_and_wait_for_the_proxy(lab: &Firewall, proxy_admin: SocketAddr) {
    let cleaned = lab
        .agent
        .cli(&["fqdn", "cache", "clean", "-n", "cilium.io", "-f"])
        .unwrap();
    assert!(cleaned.status.success(), "{cleaned:?}");
    wait_proxy_cleaned_of_cilium(proxy_admin).await;
}

#[tokio::test]
async fn a_cache_clean_on_the_agent_cleans_the_proxys_copy_and_no_resync_undoes_it() {
    let Some(mut lab) = lab_that_reached_both().await else {
        return;
    };
    let proxy_admin = lab.dnsproxy().admin;
    clean_cilium_and_wait_for_the_proxy(&lab, proxy_admin).await;

    // The agent restarts; the proxy's resync sends its whole cache, which no longer holds it.
    let resynced_before = status(proxy_admin).await["last_resync_at_ms"].clone();
    lab.agent.restart().await.unwrap();
    after_the_next_resync_the_agent_lacks_cilium(&lab, proxy_admin, &resynced_before).await;
}

/// Waits for a resync of the proxy's other than the one that ended at `resynced_before`, and
/// checks that the agent's cache holds google.com and not cilium.io.
async fn after_the_next_resync_the_agent_lacks_cilium(
    lab: &Firewall,
    proxy_admin: SocketAddr,
    resynced_before: &serde_json::Value,
) {
    wait_status(proxy_admin, Duration::from_secs(10), |s| {
        s["peer_connected"] == true && s["last_resync_at_ms"] != *resynced_before
    })
    .await;
    let names = agent_cache_names(lab);
    assert!(names.contains("google.com."), "{names:?}");
    assert!(
        !names.contains("cilium.io."),
        "the proxy's resync undid the clean: {names:?}"
    );
}

/// A clean made on the agent while the proxy was away (stopped here across an agent restart,
/// so that no session of it carries the clean) came undone at the proxy's next resync, which
/// handed its copy of the names back. The agent now remembers the clean, in its state_dir too
/// (it restarts once more before the proxy is back): the new session starts with it, and what
/// the proxy sends of what it removed (answered before it) is dropped.
#[tokio::test]
async fn a_clean_made_while_the_proxy_was_away_is_not_undone_by_its_resync() {
    let Some(mut lab) = lab_that_reached_both().await else {
        return;
    };
    let proxy_admin = lab.dnsproxy().admin;
    let resynced_before = status(proxy_admin).await["last_resync_at_ms"].clone();

    let proxy_pid =
        nix::unistd::Pid::from_raw(i32::try_from(lab.dnsproxy().pid().unwrap()).unwrap());
    nix::sys::signal::kill(proxy_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let restarted = lab.agent.restart().await;
    let cleaned = restarted.as_ref().ok().map(|()| {
        lab.agent
            .cli(&["fqdn", "cache", "clean", "-n", "cilium.io", "-f"])
    });
    let again = match &cleaned {
        Some(Ok(_)) => Some(lab.agent.restart().await),
        _ => None,
    };
    nix::sys::signal::kill(proxy_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    restarted.unwrap();
    let cleaned = cleaned.unwrap().unwrap();
    assert!(cleaned.status.success(), "{cleaned:?}");
    again.unwrap().unwrap();

    after_the_next_resync_the_agent_lacks_cilium(&lab, proxy_admin, &resynced_before).await;
    // (Whether the agent dropped the proxy's copy of cilium.io, or the proxy cleaned it before
    // copying its cache, depends on which side's messages went first: both end without it.)
    wait_proxy_cleaned_of_cilium(proxy_admin).await;
}

/// The agent writes its cache's file up to half a second after a change: killed between a
/// clean and that write, it restarted on a file still holding the cleaned names, and brought
/// them back (to every proxy's cache too). It now leaves out of the restored cache what the
/// cleans it remembers removed.
#[tokio::test]
async fn a_clean_survives_a_crash_before_the_agents_cache_file_is_written() {
    let Some(mut lab) = lab_that_reached_both().await else {
        return;
    };
    let proxy_admin = lab.dnsproxy().admin;
    let cache_file = lab.dir.state_dir().join("fqdn-cache.json");
    lab.dir
        .wait_cache_saved("cilium.io.", Duration::from_secs(3))
        .await
        .unwrap();
    let before_clean = std::fs::read_to_string(&cache_file).unwrap();
    clean_cilium_and_wait_for_the_proxy(&lab, proxy_admin).await;

    // Killed, its cache's file as it was before the clean: the write that never came.
    let resynced_before = status(proxy_admin).await["last_resync_at_ms"].clone();
    lab.agent.kill().unwrap();
    std::fs::write(&cache_file, before_clean).unwrap();
    lab.agent.restart().await.unwrap();
    let names = agent_cache_names(&lab);
    assert!(names.contains("google.com."), "{names:?}");
    assert!(
        !names.contains("cilium.io."),
        "the clean came undone: {names:?}"
    );
    after_the_next_resync_the_agent_lacks_cilium(&lab, proxy_admin, &resynced_before).await;
    wait_proxy_cleaned_of_cilium(proxy_admin).await;
}

#[tokio::test]
async fn the_agent_serves_alone_and_a_lone_proxy_enforces_its_persisted_snapshot() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = lab(refusing_policy()).await;

    // The proxy killed: the agent answers every query.
    lab.dnsproxy().kill().unwrap();
    for _ in 0..20 {
        let reply = lab.dig("cilium.io", "A", DigOpts::default()).await.unwrap();
        assert_eq!(reply.status, "NOERROR", "{}", reply.raw);
    }
    assert_eq!(
        lab.dig("bbc.co.uk", "A", DigOpts::default())
            .await
            .unwrap()
            .status,
        "REFUSED"
    );
    // A killed proxy's session ended as a closed one: it counted as a malformed peer, which
    // alerts on hostile or broken peers would have fired at every crash. Read once the agent
    // has seen the session end (it counts a refusal before that), and for a while after (the
    // connection's own end is counted apart).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let scrape = http_get(lab.agent.admin, "/metrics").await.unwrap();
        if metric_value(&scrape, "warden_peer_connected", &[]) == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never saw the session end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..5 {
        let scrape = http_get(lab.agent.admin, "/metrics").await.unwrap();
        assert_eq!(
            metric_value(&scrape, "warden_api_rejected_total", &[]),
            0.0,
            "{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Both down, then the proxy alone: it enforces the snapshot it persisted.
    lab.agent.kill().unwrap();
    let started = Instant::now();
    lab.start_dnsproxy().await.unwrap();
    let ready_after = started.elapsed();
    println!("lone dnsproxy ready after {ready_after:?}");
    // Well under a second on an idle machine; the bound leaves a loaded one room to spawn it.
    assert!(
        ready_after < Duration::from_secs(2),
        "not enforcing within 2 s: {ready_after:?}"
    );
    let lone = status(lab.dnsproxy().admin).await;
    assert_eq!(lone["mode"], "offline");
    assert_eq!(lone["policy"]["source"], "snapshot");
    let reply = lab
        .dig("google.com", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(reply.ips(), vec![IpAddr::V4(GOOGLE_COM_V4)]);
    assert_eq!(
        lab.dig("bbc.co.uk", "A", DigOpts::default())
            .await
            .unwrap()
            .status,
        "REFUSED"
    );
    let google = lab.curl("http://google.com/", &["-4"]).unwrap();
    assert!(google.ok(), "{google:?}");
    let bbc = lab.curl(&format!("http://{BBC_CO_UK_V4}/"), &[]).unwrap();
    assert!(quick_refusal(&bbc), "{bbc:?}");

    // A lone proxy without any snapshot (its state lost) knows no policy: the enrolled
    // workload's queries get SERVFAIL, neither an answer nor a verdict.
    lab.dnsproxy().kill().unwrap();
    std::fs::remove_dir_all(lab.dir.path().join("dnsproxy-state")).unwrap();
    lab.start_unready_dnsproxy().await.unwrap();
    let blank = status(lab.dnsproxy().admin).await;
    assert_eq!(blank["policy_revision"], 0, "{blank}");
    for name in ["bbc.co.uk", "google.com"] {
        let reply = lab.dig(name, "A", DigOpts::default()).await.unwrap();
        assert_eq!(reply.status, "SERVFAIL", "{}", reply.raw);
    }
}

/// A dnsproxy without a policy (its state lost, and no session with the agent: here it is
/// given a socket the agent does not serve) took the datapath's preference on start, and every
/// query of the enrolled workload got its SERVFAIL while the agent, serving beside it, had the
/// policy. The agent keeps the queries until the proxy has a policy.
#[tokio::test]
async fn a_proxy_without_a_policy_leaves_the_queries_to_the_agent() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = lab(refusing_policy()).await;
    lab.dnsproxy().kill().unwrap();
    std::fs::remove_dir_all(lab.dir.path().join("dnsproxy-state")).unwrap();
    lab.config.socket = lab.dir.path().join("served-by-nobody.sock");
    lab.start_unready_dnsproxy().await.unwrap();
    // Its sockets are in the selection.
    let proxy_admin = lab.dnsproxy().admin;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let scrape = http_get(proxy_admin, "/metrics").await.unwrap();
        let reuseport = [("op", "reuseport")];
        if metric_value(&scrape, "warden_datapath_updates_total", &reuseport) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "never joined: {scrape}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answered_by_the_agent = async |lab: &Firewall| {
        for _ in 0..10 {
            let reply = lab.dig("cilium.io", "A", DigOpts::default()).await.unwrap();
            assert_eq!(reply.status, "NOERROR", "{}", reply.raw);
        }
        let refused = lab.dig("bbc.co.uk", "A", DigOpts::default()).await.unwrap();
        assert_eq!(refused.status, "REFUSED", "{}", refused.raw);
    };
    assert_eq!(status(lab.agent.admin).await["preferred"], "agent");
    answered_by_the_agent(&lab).await;
    // The agent restarted (it steers to the proxy as it stops, and applies dns.prefer as it
    // starts): the proxy, still without a policy, hands the queries back (past a stopping
    // agent's drain: 3.4 s with these settings, checked each second).
    lab.agent.restart().await.unwrap();
    wait_status(lab.agent.admin, Duration::from_secs(15), |s| {
        s["preferred"] == "agent"
    })
    .await;
    answered_by_the_agent(&lab).await;
}

/// The status code of `/readyz` at `admin`, or `None` once its connection is refused.
async fn readyz_code(admin: SocketAddr) -> Option<u16> {
    match warden_tests::warden::http_get(admin, "/readyz").await {
        Ok(_) => Some(200),
        Err(error) if error.to_string().contains("503") => Some(503),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_draining_process_says_so_until_it_exits() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool"]) {
        return;
    }
    let mut lab = lab(refusing_policy()).await;
    let (agent_admin, proxy_admin) = (lab.agent.admin, lab.dnsproxy().admin);

    // The dnsproxy drains: its /readyz says 503 and, while it does, the agent no longer lists
    // it among the port's holders.
    lab.dnsproxy().terminate().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut unready, mut delisted) = (false, false);
    while let Some(code) = readyz_code(proxy_admin).await {
        assert!(Instant::now() < deadline, "the dnsproxy never exited");
        if code == 503 {
            unready = true;
            let holders = status(agent_admin).await["dns_port_holders"].clone();
            delisted |= holders == serde_json::json!(["agent"])
                && readyz_code(proxy_admin).await == Some(503);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        unready,
        "the dnsproxy's admin API went away without saying it drained"
    );
    assert!(
        delisted,
        "the agent listed a draining dnsproxy as holding the port"
    );
    lab.dnsproxy().stop().unwrap();

    // The agent alike.
    lab.agent.terminate().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut unready = false;
    while let Some(code) = readyz_code(agent_admin).await {
        assert!(Instant::now() < deadline, "the agent never exited");
        unready |= code == 503;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        unready,
        "the agent's admin API went away without saying it drained"
    );
    lab.agent.stop().unwrap();
}

#[tokio::test]
async fn graceful_restarts_under_load_lose_no_query_and_change_no_verdict() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool", "dnsperf"]) {
        return;
    }
    let mut lab = lab(refusing_policy()).await;
    // Three allowed names, one refused, in this order, over and over.
    let queries = write_queries_file(&[
        ("cilium.io", "A"),
        ("google.com", "A"),
        ("www.cilium.io", "A"),
        ("bbc.co.uk", "A"),
    ])
    .unwrap();
    let rate = 400;
    let duration = 22;
    let load = steady_load(&lab, queries.path(), rate, duration);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for round in 0..5 {
        lab.agent.restart().await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        lab.dnsproxy().restart().await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        println!("round {round} done");
    }
    let report = load.await.unwrap().unwrap();
    println!(
        "SIGTERM restarts: sent {} completed {} lost {} rcodes {:?}",
        report.sent, report.completed, report.lost, report.rcodes
    );
    assert_eq!(
        report.lost, 0,
        "queries lost across graceful restarts:\n{}",
        report.raw
    );
    let refused = report.rcodes.get("REFUSED").copied().unwrap_or(0);
    let noerror = report.rcodes.get("NOERROR").copied().unwrap_or(0);
    assert_eq!(
        noerror + refused,
        report.completed,
        "only NOERROR and REFUSED: {:?}",
        report.rcodes
    );
    // dnsperf walks the file in order: one query in four is the refused one.
    let expected_refused = report.sent / 4;
    assert!(
        refused.abs_diff(expected_refused) <= 4,
        "wrong verdicts: {refused} refused of {} sent",
        report.sent
    );
}

#[tokio::test]
async fn sigkill_under_load_loses_at_most_the_queries_in_flight() {
    if !require_lab() || !warden_tests::require_tools(&["knotd", "dig", "bpftool", "dnsperf"]) {
        return;
    }
    let mut lab = lab(refusing_policy()).await;
    let queries =
        write_queries_file(&[("cilium.io", "A"), ("google.com", "A"), ("bbc.co.uk", "A")]).unwrap();
    let rate = 400;
    let load = steady_load(&lab, queries.path(), rate, 12);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The serving process (dnsproxy, the default preference) dies, then the agent.
    lab.dnsproxy().kill().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.start_dnsproxy().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.agent.kill().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.agent.restart().await.unwrap();
    let report = load.await.unwrap().unwrap();
    println!(
        "SIGKILL x2 at {rate} qps: sent {} completed {} lost {}",
        report.sent, report.completed, report.lost
    );
    // What was queued on a killed process's socket or being answered by it is gone; nothing
    // else may be (a quarter second of traffic per kill is a generous bound).
    assert!(report.lost <= u64::from(rate) / 2, "{}", report.raw);
}
