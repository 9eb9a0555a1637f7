//! Policy check cost: one check against 10, 1,000 and 10,000 selectors, timed directly on the
//! real code (the criterion bench `cargo bench -p warden-policy --bench matcher` measures the
//! matcher alone the same way, with more statistics and more time).
//!
//! Three calls are timed: `NameMatcher::is_match` (the index alone), and the two calls the
//! proxy makes per query on a compiled `PolicyRepository`: `dns_allowed` (the verdict) and
//! `fqdn_grants` (who may reach the answer's addresses). And what a policy change costs before
//! any of that: parsing the document, and compiling it for 1 and for 1,000 endpoints (the
//! agent at every change of policy or of endpoints, the dnsproxy at every snapshot).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use warden_policy::{
    DnsName, EndpointId, EndpointInfo, FqdnSelector, L4Proto, Labels, NameMatcher, PolicyRepository,
};

/// Selector `i` in one of five shapes under its own domain (as the criterion bench has it).
fn selector(i: usize) -> (bool, String) {
    match i % 5 {
        0 => (true, format!("api.service{i}.example.com")),
        1 => (false, format!("*.service{i}.example.com")),
        2 => (false, format!("**.service{i}.example.net")),
        3 => (false, format!("special*service.api{i}.example.org")),
        _ => (false, format!("*.*.service{i}.example.io")),
    }
}

/// Selector 7 (`**.service7.example.net`) exists at every size.
const HIT: &str = "a.b.service7.example.net";
const MISS: &str = "www.unrelated.example.com";

/// Nanoseconds per call at one size.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PolicyCost {
    pub selectors: usize,
    pub matcher_hit_ns: f64,
    pub matcher_miss_ns: f64,
    pub dns_allowed_hit_ns: f64,
    pub dns_allowed_miss_ns: f64,
    pub fqdn_grants_hit_ns: f64,
    /// The YAML document to policies.
    pub parse_ms: f64,
    /// `PolicyRepository::build` for one endpoint, and for 1,000 the policy selects.
    pub compile_one_endpoint_ms: f64,
    pub compile_thousand_endpoints_ms: f64,
}

impl PolicyCost {
    /// The slowest of the per-query checks.
    pub fn worst_check_ns(&self) -> f64 {
        [
            self.matcher_hit_ns,
            self.matcher_miss_ns,
            self.dns_allowed_hit_ns,
            self.dns_allowed_miss_ns,
        ]
        .into_iter()
        .fold(0.0, f64::max)
    }
}

/// Times every call at each size in `sizes`; `iterations` calls per batch.
pub fn measure(sizes: &[usize], iterations: u32) -> Result<Vec<PolicyCost>> {
    sizes.iter().map(|&n| measure_one(n, iterations)).collect()
}

fn measure_one(count: usize, iterations: u32) -> Result<PolicyCost> {
    let hit = DnsName::new(HIT).context("hit name")?;
    let miss = DnsName::new(MISS).context("miss name")?;

    let mut matcher = NameMatcher::new();
    for i in 0..count {
        let (literal, text) = selector(i);
        let selector = if literal {
            FqdnSelector::name(&text)
        } else {
            FqdnSelector::pattern(&text)
        }
        .context("generated selector")?;
        matcher.insert(&selector, i);
    }

    let server: SocketAddr = "127.0.0.153:53".parse().context("server")?;
    let yaml = policy_yaml(count, server);
    let policies = warden_policy::parse_str(&yaml, Path::new("bench.yaml"))
        .context("parsing the generated policy")?;
    let labels: BTreeMap<String, String> = [("app".to_owned(), "bench".to_owned())].into();
    let endpoint = |n: u32| EndpointInfo {
        id: EndpointId(n),
        name: format!("client{n}"),
        namespace: "bench".into(),
        labels: Labels::from_k8s(&labels, "bench"),
        ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            0x7f09_0000 + n,
        ))],
        peer_only: false,
    };
    let thousand: Vec<EndpointInfo> = (1..=1_000).map(endpoint).collect();
    let repository = PolicyRepository::build(&policies, &[endpoint(1)]);
    // A policy change is rare next to queries: a few runs, not batches of thousands.
    let runs = if iterations >= 100_000 { 5 } else { 1 };
    let parse_ms = median_ms(runs, || {
        warden_policy::parse_str(&yaml, Path::new("bench.yaml")).map(|policies| policies.len())
    });
    let compile_one_endpoint_ms = median_ms(runs, || {
        PolicyRepository::build(&policies, &[endpoint(1)]).selector_count()
    });
    let compile_thousand_endpoints_ms = median_ms(runs, || {
        PolicyRepository::build(&policies, &thousand).selector_count()
    });
    let id = EndpointId(1);
    // The generated policy must behave, or the timings mean nothing.
    anyhow::ensure!(repository.dns_allowed(id, server, L4Proto::Udp, &hit));
    anyhow::ensure!(!repository.dns_allowed(id, server, L4Proto::Udp, &miss));
    anyhow::ensure!(matcher.is_match(&hit) && !matcher.is_match(&miss));

    let mut grants = Vec::with_capacity(4);
    Ok(PolicyCost {
        selectors: count,
        matcher_hit_ns: time(iterations, || matcher.is_match(black_box(&hit))),
        matcher_miss_ns: time(iterations, || matcher.is_match(black_box(&miss))),
        dns_allowed_hit_ns: time(iterations, || {
            repository.dns_allowed(id, server, L4Proto::Udp, black_box(&hit))
        }),
        dns_allowed_miss_ns: time(iterations, || {
            repository.dns_allowed(id, server, L4Proto::Udp, black_box(&miss))
        }),
        fqdn_grants_hit_ns: time(iterations, || {
            grants.clear();
            repository.fqdn_grants(black_box(&hit), &mut grants);
            grants.len()
        }),
        parse_ms,
        compile_one_endpoint_ms,
        compile_thousand_endpoints_ms,
    })
}

/// Median of `runs` calls, in ms.
fn median_ms<T>(runs: usize, mut call: impl FnMut() -> T) -> f64 {
    let mut times: Vec<Duration> = (0..runs.max(1))
        .map(|_| {
            let started = Instant::now();
            black_box(call());
            started.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[times.len() / 2].as_secs_f64() * 1e3
}

/// Median over 7 batches of `iterations` calls, in ns per call (one warm-up batch first).
fn time<T>(iterations: u32, mut call: impl FnMut() -> T) -> f64 {
    let mut batch = || {
        let started = Instant::now();
        for _ in 0..iterations {
            black_box(call());
        }
        started.elapsed()
    };
    batch();
    let mut batches: Vec<Duration> = (0..7).map(|_| batch()).collect();
    batches.sort_unstable();
    batches[3].as_secs_f64() * 1e9 / f64::from(iterations.max(1))
}

/// One policy whose `rules.dns` and `toFQDNs` both list the `count` selectors.
fn policy_yaml(count: usize, server: SocketAddr) -> String {
    let selectors: Vec<String> = (0..count)
        .map(|i| {
            let (literal, text) = selector(i);
            let key = if literal { "matchName" } else { "matchPattern" };
            format!("{key}: \"{text}\"")
        })
        .collect();
    crate::lab::policy_listing(&selectors, server)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_size_builds_and_times() {
        let costs = measure(&[10, 100], 50).unwrap();
        assert_eq!(costs.len(), 2);
        assert!(costs.iter().all(|c| c.worst_check_ns() > 0.0));
        assert!(
            costs
                .iter()
                .all(|c| c.parse_ms > 0.0 && c.compile_thousand_endpoints_ms > 0.0)
        );
    }
}
