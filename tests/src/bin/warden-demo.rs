//! `make demo`: the local lab, played as a transcript.
//!
//! A real knotd serves google.com, cilium.io (with a CNAME chain) and bbc.co.uk on loopback;
//! `warden-agent` runs with the talk's policy for the workload `youssef/test` (source address
//! 127.0.0.2); dig asks through the proxy; the `warden` CLI shows status and the FQDN cache.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use warden_config::EndpointConfig;
use warden_tests::warden::{AgentDir, AgentProcess};
use warden_tests::{DigOpts, KnotUpstream, dig, unique_loopback_v4};

const WORKLOAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fqdn
  namespace: youssef
spec:
  endpointSelector:
    matchLabels:
      app: test
  egress:
  - toCIDR: ["UPSTREAM_IP/32"]
    toPorts:
    - ports:
      - port: "UPSTREAM_PORT"
        protocol: ANY
      rules:
        dns:
        - matchName: google.com
        - matchName: cilium.io
        - matchPattern: "*.cilium.io"
  - toFQDNs:
    - matchName: google.com
    - matchName: cilium.io
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      - port: "443"
        protocol: TCP
"#;

#[tokio::main]
async fn main() -> Result<()> {
    let upstream = KnotUpstream::start(unique_loopback_v4()).context("starting knotd")?;
    let dir = AgentDir::new()?;
    let policy = POLICY
        .replace("UPSTREAM_IP", &upstream.addr().ip().to_string())
        .replace("UPSTREAM_PORT", &upstream.addr().port().to_string());
    dir.write_policy("fqdn.yaml", &policy)?;
    let mut config = dir.config(IpAddr::V4(Ipv4Addr::LOCALHOST), upstream.addr());
    config.endpoints = vec![EndpointConfig {
        name: "test".into(),
        namespace: "youssef".into(),
        labels: [("app".to_owned(), "test".to_owned())].into(),
        ips: vec![WORKLOAD],
        cgroup: None,
        dns_target: Vec::new(),
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
