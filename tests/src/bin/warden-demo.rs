//! `make demo`: the local lab, played as a transcript.
//!
//! As root (the eBPF datapath, namespaces and cgroups need it) it plays the talk: a workload
//! cgroup `youssef/test`, an "internet" namespace serving google.com, cilium.io and bbc.co.uk,
//! knotd as the DNS server, `warden-agent` and `warden-dnsproxy` sharing the DNS port. Allowed
//! curls work, the denied one is refused at once with a drop event; then every agent goes down
//! and enforcement carries on; then the agent comes back and the caches resync. The health
//! endpoints' answers are shown at each step.
//!
//! Without root it plays the DNS part only: the agent answers and polices `dig` from a
//! loopback source address that the config names as the workload.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use warden_config::EndpointConfig;
use warden_tests::warden::{AgentDir, AgentProcess, TalkPolicy};
use warden_tests::{DigOpts, KnotUpstream, dig, unique_loopback_v4};

const WORKLOAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

#[tokio::main]
async fn main() -> Result<()> {
    if nix::unistd::geteuid().is_root() && warden_tests::lab::require_lab() {
        return talk::play().await;
    }
    println!("(not root: playing the DNS-only lab; run as root for the datapath and HA demo)\n");
    dns_only().await
}

/// The DNS-only lab: knotd, the agent, dig from a loopback source address.
async fn dns_only() -> Result<()> {
    let upstream = KnotUpstream::start(unique_loopback_v4()).context("starting knotd")?;
    let dir = AgentDir::new()?;
    let policy = TalkPolicy {
        dns_rules: &[
            "matchName: google.com",
            "matchName: cilium.io",
            r#"matchPattern: "*.cilium.io""#,
        ],
        ..TalkPolicy::through(upstream.addr())
    }
    .yaml();
    dir.write_policy("fqdn.yaml", &policy)?;
    let mut config = dir.config(IpAddr::V4(Ipv4Addr::LOCALHOST), upstream.addr());
    config.endpoints = vec![EndpointConfig {
        name: "test".into(),
        namespace: "youssef".into(),
        labels: [("app".to_owned(), "test".to_owned())].into(),
        ips: vec![WORKLOAD],
        cgroup: None,
        dns_target: Vec::new(),
        peer_only: false,
    }];
    let agent = AgentProcess::start(&dir, config).await?;

    println!("== Warden demo: DNS policy on a local lab ==");
    println!("upstream: knotd on {}", upstream.addr());
    println!(
        "agent:    warden-agent (pid {}) DNS on {}, admin on http://{}",
        agent.pid().unwrap_or(0),
        agent.dns,
        agent.admin
    );
    println!("workload: youssef/test (app=test) sending from {WORKLOAD}");
    println!("policy:   {}", dir.policy_dir().join("fqdn.yaml").display());
    println!("{}", indent(&policy));

    let opts = DigOpts::default().with_source(WORKLOAD);
    let mut verdicts = Vec::new();
    for name in ["cilium.io", "google.com", "www.cilium.io", "bbc.co.uk"] {
        verdicts.push((name, show(agent.dns, name, opts).await?));
    }
    println!("\n$ warden status");
    print!(
        "{}",
        indent(&String::from_utf8_lossy(&agent.cli(&["status"])?.stdout))
    );
    println!("\n$ warden fqdn cache list");
    print!(
        "{}",
        indent(&String::from_utf8_lossy(
            &agent.cli(&["fqdn", "cache", "list"])?.stdout
        ))
    );
    println!();
    for (name, status) in &verdicts {
        println!("{name:<14} {status}");
    }
    let expected = ["NOERROR", "NOERROR", "NOERROR", "REFUSED"];
    let as_expected = verdicts
        .iter()
        .zip(expected)
        .all(|((_, status), wanted)| status == wanted);
    drop(agent);
    anyhow::ensure!(as_expected, "the lab did not behave as the policy says");
    println!(
        "Allowed names resolved, the denied name was refused, the cache holds what was learned."
    );
    Ok(())
}

/// Asks through the proxy, prints the answer, returns its status.
async fn show(server: SocketAddr, name: &str, opts: DigOpts) -> Result<String> {
    let reply = dig(server, name, "A", opts).await?;
    println!(
        "\n$ dig -b {WORKLOAD} @{} -p {} {name}",
        server.ip(),
        server.port()
    );
    let answers: Vec<String> = reply
        .answers
        .iter()
        .map(|r| format!("{} {} {} {}", r.name, r.ttl, r.rtype, r.data))
        .collect();
    println!("  status: {}", reply.status);
    for answer in answers {
        println!("  {answer}");
    }
    Ok(reply.status)
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("  {line}\n")).collect()
}

mod talk {
    use std::net::SocketAddr;
    use std::time::Duration;

    use anyhow::{Context, Result, ensure};
    use warden_tests::DigOpts;
    use warden_tests::firewall::{Firewall, FirewallOptions, quick_refusal};
    use warden_tests::warden::TalkPolicy;
    use warden_tests::warden::http_json;

    use super::indent;

    pub async fn play() -> Result<()> {
        let policy = TalkPolicy {
            fqdns: &[
                "matchName: google.com",
                "matchName: cilium.io",
                r#"matchPattern: "*.cilium.io""#,
            ],
            ..TalkPolicy::default()
        }
        .yaml();
        let mut lab = Firewall::start(FirewallOptions {
            policy: policy.clone(),
            with_dnsproxy: true,
            ..FirewallOptions::default()
        })
        .await
        .context("starting the lab")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("== Warden demo: the talk, on a lab of namespaces and cgroups ==");
        println!(
            "workload:   cgroup {} (youssef/test, app=test)",
            lab.workload.display()
        );
        println!("DNS server: knotd on {}", lab.upstream.addr());
        println!(
            "internet:   namespace {} serving every lab address on 80, 443, 8080",
            lab.internet.netns()
        );
        println!("policy:\n{}", indent(&policy));

        step("1. agent and dnsproxy up");
        health(&mut lab).await?;
        let reply = lab.dig("cilium.io", "A", DigOpts::default()).await?;
        println!(
            "$ dig @{} cilium.io   (from the workload; redirected to the proxy)",
            lab.upstream.addr().ip()
        );
        println!("  {} {:?}", reply.status, reply.ips());
        ensure!(
            curl(&lab, "http://cilium.io/", true)?,
            "cilium.io should work"
        );
        ensure!(
            curl(&lab, "http://google.com/", true)?,
            "google.com should work"
        );
        ensure!(
            curl(&lab, "http://bbc.co.uk/", false)?,
            "bbc.co.uk should be refused"
        );
        drops(&lab, lab.agent.admin).await?;

        step("2. kill -9 warden-agent: the dnsproxy serves and enforces alone");
        lab.agent.kill()?;
        tokio::time::sleep(Duration::from_millis(800)).await;
        health(&mut lab).await?;
        ensure!(
            curl(&lab, "http://cilium.io/", true)?,
            "cilium.io should still work"
        );
        ensure!(
            curl(&lab, "http://bbc.co.uk/", false)?,
            "bbc.co.uk should still be refused"
        );
        println!("  a name never resolved before, allowed by the pattern *.cilium.io:");
        ensure!(
            curl(&lab, "http://anysub.cilium.io/", true)?,
            "anysub.cilium.io should work"
        );

        step("3. kill -9 warden-dnsproxy too: no agent at all, the pinned datapath still enforces");
        // The journal reaches state_dir within a quarter second of an answer.
        tokio::time::sleep(Duration::from_millis(500)).await;
        lab.dnsproxy().kill()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cilium = format!("http://{}/", warden_tests::zones::CILIUM_IO_V4);
        let bbc = format!("http://{}/", warden_tests::zones::BBC_CO_UK_V4);
        ensure!(
            curl(&lab, &cilium, true)?,
            "cilium.io's IP should still work"
        );
        ensure!(
            curl(&lab, &bbc, false)?,
            "bbc.co.uk's IP should still be refused"
        );

        step("4. warden-dnsproxy back alone: it enforces its persisted snapshot at once");
        lab.start_dnsproxy().await?;
        health(&mut lab).await?;
        ensure!(
            curl(&lab, "http://google.com/", true)?,
            "google.com should work"
        );

        step("5. warden-agent back: bidirectional resync");
        lab.agent.restart().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        health(&mut lab).await?;
        println!("$ warden fqdn cache list   (the agent, including what was learned without it)");
        let listing = lab.agent.cli(&["fqdn", "cache", "list"])?;
        print!("{}", indent(&String::from_utf8_lossy(&listing.stdout)));
        println!(
            "\nEnforcement never stopped: allowed traffic worked and denied traffic was refused at every step."
        );
        Ok(())
    }

    fn step(title: &str) {
        println!("\n---- {title} ----");
    }

    /// `/v1/status` of both processes, one line each.
    async fn health(lab: &mut Firewall) -> Result<()> {
        let mut admins = vec![("warden-agent", lab.agent.admin)];
        if let Some(proxy) = lab.dnsproxy.as_ref() {
            admins.push(("warden-dnsproxy", proxy.admin));
        }
        for (name, admin) in admins {
            match http_json(admin, "/v1/status").await {
                Ok(status) => println!(
                    "  GET /v1/status {name}: serving={} mode={} peer_connected={} policy_revision={} cache_names={} dns_port_holders={} preferred={}",
                    status["serving"],
                    status["mode"],
                    status["peer_connected"],
                    status["policy_revision"],
                    status["cache_names"],
                    status["dns_port_holders"],
                    status["preferred"]
                ),
                Err(_) => println!("  GET /v1/status {name}: down"),
            }
        }
        Ok(())
    }

    /// curl from the workload; prints the outcome and says whether it was what was expected.
    fn curl(lab: &Firewall, url: &str, expect_ok: bool) -> Result<bool> {
        let result = lab.curl(url, &["-4"])?;
        let outcome = if result.ok() {
            format!(
                "HTTP {} in {:?}",
                result.http_code.unwrap_or(0),
                result.elapsed
            )
        } else {
            format!(
                "refused ({}) in {:?}",
                result.connect_error().unwrap_or("connect failed"),
                result.elapsed
            )
        };
        println!("$ curl {url}\n  {outcome}");
        Ok(if expect_ok {
            result.ok()
        } else {
            quick_refusal(&result)
        })
    }

    async fn drops(lab: &Firewall, admin: SocketAddr) -> Result<()> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let flows = lab.flows(admin).await?;
        for flow in flows.iter().filter(|flow| flow["type"] == "drop") {
            println!(
                "  drop event: endpoint={} destination={}:{} protocol={}",
                flow["endpoint"], flow["destination"], flow["port"], flow["protocol"]
            );
        }
        Ok(())
    }
}
