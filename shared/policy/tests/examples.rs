//! Cilium's DNS policy examples and the "talk" policy, loaded from files and checked against
//! what their documentation says they do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use warden_policy::{
    DnsName, EndpointId, EndpointInfo, FqdnGrant, L4Proto, Labels, PolicyRepository, PortRange,
    load_path,
};

const ALLIANCE: EndpointId = EndpointId(1);
const EMPIRE: EndpointId = EndpointId(2);
const KUBE_DNS: EndpointId = EndpointId(3);
const TALKER: EndpointId = EndpointId(4);
const TEST_ELSEWHERE: EndpointId = EndpointId(5);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn endpoint(id: EndpointId, namespace: &str, labels: &[(&str, &str)], ip: &str) -> EndpointInfo {
    let k8s: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    EndpointInfo {
        id,
        name: format!("pod-{id}"),
        namespace: namespace.to_owned(),
        labels: Labels::from_k8s(&k8s, namespace),
        ips: vec![ip.parse().expect("test addresses are valid")],
        peer_only: false,
    }
}

fn endpoints() -> Vec<EndpointInfo> {
    vec![
        endpoint(ALLIANCE, "default", &[("org", "alliance")], "10.0.1.1"),
        endpoint(EMPIRE, "default", &[("org", "empire")], "10.0.1.2"),
        endpoint(
            KUBE_DNS,
            "kube-system",
            &[("k8s-app", "kube-dns")],
            "10.96.0.10",
        ),
        endpoint(TALKER, "youssef", &[("app", "test")], "10.0.2.1"),
        endpoint(TEST_ELSEWHERE, "default", &[("app", "test")], "10.0.2.2"),
    ]
}

fn repository(file: &str) -> PolicyRepository {
    let policies = load_path(&fixture(file)).expect("fixtures are valid policies");
    PolicyRepository::build(&policies, &endpoints())
}

fn name(text: &str) -> DnsName {
    DnsName::new(text).expect("test names are valid")
}

const KUBE_DNS_SERVER: &str = "10.96.0.10:53";

fn asks(repo: &PolicyRepository, who: EndpointId, server: &str, qname: &str) -> bool {
    let server: SocketAddr = server.parse().expect("test servers are valid");
    let udp = repo.dns_allowed(who, server, L4Proto::Udp, &name(qname));
    let tcp = repo.dns_allowed(who, server, L4Proto::Tcp, &name(qname));
    assert_eq!(udp, tcp, "protocol ANY treats UDP and TCP alike");
    udp
}

fn grants(repo: &PolicyRepository, qname: &str) -> Vec<FqdnGrant> {
    let mut out = Vec::new();
    repo.fqdn_grants(&name(qname), &mut out);
    out
}

fn tcp(port: u16) -> PortRange {
    PortRange {
        first: port,
        last: port,
        proto: Some(L4Proto::Tcp),
    }
}

#[test]
fn the_examples_directory_validates() {
    let policies = load_path(&fixture("cilium-dns")).unwrap();
    let files: Vec<_> = policies
        .iter()
        .map(|p| p.origin.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        ["dns-upgrade.yaml", "dns-visibility.yaml", "dns.yaml"]
    );
}

#[test]
fn dns_example() {
    let repo = repository("cilium-dns/dns.yaml");
    assert!(repo.is_enforced(ALLIANCE));
    assert!(!repo.is_enforced(EMPIRE));
    assert_eq!(repo.selector_count(), 7);

    // "L7 DNS policy allows queries for cilium.io, any subdomains of cilium.io, and any
    // subdomains of api.cilium.io. No other DNS queries will be allowed."
    for allowed in [
        "cilium.io",
        "sub.cilium.io",
        "anothersub.cilium.io",
        "service1.api.cilium.io",
    ] {
        assert!(asks(&repo, ALLIANCE, KUBE_DNS_SERVER, allowed), "{allowed}");
    }
    for refused in ["example.com", "a.b.cilium.io", "cilium.io.example.com"] {
        assert!(
            !asks(&repo, ALLIANCE, KUBE_DNS_SERVER, refused),
            "{refused}"
        );
    }
    assert!(
        !asks(&repo, ALLIANCE, "8.8.8.8:53", "cilium.io"),
        "only kube-dns"
    );
    assert!(
        asks(&repo, EMPIRE, "8.8.8.8:53", "example.com"),
        "unselected pods are free"
    );

    // "The separate L3 toFQDNs egress rule allows connections to any IPs returned in DNS
    // queries for cilium.io, sub.cilium.io, service1.api.cilium.io and any matches of
    // special*service.api.cilium.io ... restricting connections to TCP port 80."
    for granted in [
        "cilium.io",
        "sub.cilium.io",
        "service1.api.cilium.io",
        "special-region1-service.api.cilium.io",
    ] {
        let found = grants(&repo, granted);
        assert_eq!(found.len(), 1, "{granted}");
        assert_eq!(found[0].endpoint, ALLIANCE);
        assert_eq!(*found[0].ports, [tcp(80)]);
    }
    // "... but not region1-service.api.cilium.io. DNS queries to anothersub.cilium.io are
    // allowed but connections to the returned IPs are not."
    assert!(grants(&repo, "region1-service.api.cilium.io").is_empty());
    assert!(grants(&repo, "anothersub.cilium.io").is_empty());
    assert_eq!(
        &*grants(&repo, "special-x-service.api.cilium.io")[0].selector,
        "special*service.api.cilium.io."
    );

    // kube-dns is reached through the proxy only (the datapath sends port 53 there), never
    // as a plain allow that a socket the redirect did not see could use.
    assert!(repo.static_allows(ALLIANCE).is_empty());
}

#[test]
fn dns_upgrade_example() {
    let repo = repository("cilium-dns/dns-upgrade.yaml");
    // `matchPattern: "*"`: every query to kube-dns is allowed (and seen by the proxy).
    for qname in ["cilium.io", "example.com", "_sip._tcp.example.org", "."] {
        assert!(asks(&repo, ALLIANCE, KUBE_DNS_SERVER, qname), "{qname}");
    }
    assert!(!asks(&repo, ALLIANCE, "1.1.1.1:53", "cilium.io"));
    // No toPorts on the toFQDNs rule: every port.
    assert!(grants(&repo, "sub.cilium.io")[0].ports.is_empty());
    assert!(grants(&repo, "www.cilium.io").is_empty());
}

#[test]
fn dns_visibility_example() {
    // As published, the kube-dns selector says "k8s.io.kubernetes.pod.namespace" where
    // "k8s:io.kubernetes.pod.namespace" was meant: a label no pod has, in Cilium as here, so
    // kube-dns is not selected and queries are refused.
    let repo = repository("cilium-dns/dns-visibility.yaml");
    assert!(repo.is_enforced(ALLIANCE));
    assert!(!asks(&repo, ALLIANCE, KUBE_DNS_SERVER, "cilium.io"));
    assert_eq!(grants(&repo, "x.sub.cilium.io").len(), 1);
    assert!(grants(&repo, "x.cilium.io").is_empty());

    // With the prefix it was meant to have, every query is allowed: DNS visibility.
    let text = std::fs::read_to_string(fixture("cilium-dns/dns-visibility.yaml")).unwrap();
    let fixed = text.replace("\"k8s.io.kubernetes", "\"k8s:io.kubernetes");
    let policies = warden_policy::parse_str(&fixed, Path::new("fixed.yaml")).unwrap();
    let repo = PolicyRepository::build(&policies, &endpoints());
    for qname in ["cilium.io", "example.com", "a.b.c.d"] {
        assert!(asks(&repo, ALLIANCE, KUBE_DNS_SERVER, qname), "{qname}");
    }
}

#[test]
fn talk_policy() {
    let repo = repository("talk.yaml");
    assert_eq!(repo.policy_count(), 1);
    assert_eq!(repo.selector_count(), 3);
    assert!(repo.is_enforced(TALKER));
    assert!(
        !repo.is_enforced(TEST_ELSEWHERE),
        "app=test outside namespace youssef"
    );

    // Rule 1: kube-dns (in kube-system, named explicitly) on 53, any name, UDP or TCP.
    for qname in ["google.com", "cilium.io", "example.com", "x.y.z"] {
        assert!(asks(&repo, TALKER, KUBE_DNS_SERVER, qname), "{qname}");
    }
    assert!(!asks(&repo, TALKER, "10.96.0.10:5353", "google.com"));
    assert!(!asks(&repo, TALKER, "1.1.1.1:53", "google.com"));
    assert!(
        !asks(&repo, TALKER, "10.0.1.2:53", "google.com"),
        "another pod"
    );

    // Rule 2: google.com and cilium.io, exactly, on 80/TCP and 443/TCP.
    for qname in ["google.com", "GOOGLE.com.", "cilium.io"] {
        assert_eq!(
            grants(&repo, qname),
            [FqdnGrant {
                endpoint: TALKER,
                ports: vec![tcp(80), tcp(443)].into(),
                selector: name(qname).to_string().into(),
            }],
            "{qname}"
        );
    }
    assert!(grants(&repo, "www.google.com").is_empty());
    assert!(grants(&repo, "cilium.io.evil.com").is_empty());

    assert!(
        repo.static_allows(TALKER).is_empty(),
        "through the proxy only"
    );
    assert!(repo.static_allows(TEST_ELSEWHERE).is_empty());
}
