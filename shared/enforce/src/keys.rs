use std::net::IpAddr;

use warden_datapath::{FqdnKey, PORT_RULES_PER_PREFIX, PortRule};
use warden_policy::{FqdnGrant, L4Proto, Policy, PortRange};
use warden_telemetry::LogBudget;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// Widest `endPort` range written as one FQDN entry per port. The FQDN map holds exact ports
/// (so two processes can write entries without merging values); a wider range is refused
/// rather than widened to "any port".
const MAX_EXPANDED_PORTS: usize = 1024;

/// The map keys a grant gives one IP: one per protocol and port (or "any").
pub fn fqdn_keys(grant: &FqdnGrant, ip: IpAddr) -> Vec<FqdnKey> {
    let endpoint_id = grant.endpoint.0;
    // As the datapath stores it and reads it back: an AAAA of `::ffff:a.b.c.d` is the IPv4
    // address's key (the kernel sends IPv4 packets to it), and a key the reconciler wants in
    // another form than it finds would be revoked and written again, pass after pass.
    let ip = ip.to_canonical();
    if grant.ports.is_empty() {
        return vec![FqdnKey::any(endpoint_id, ip)];
    }
    let mut keys = Vec::new();
    for range in grant.ports.iter() {
        let protos = protocols(range);
        let ports: Vec<Option<u16>> = if is_every_port(range) {
            vec![None]
        } else if fits_the_datapath(range) {
            (range.first..=range.last).map(Some).collect()
        } else {
            // A policy's property, met again by every answer it grants: one line per interval.
            static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
            if let Some(held_back) = BUDGET.allow() {
                tracing::error!(
                    first = range.first,
                    last = range.last,
                    selector = &*grant.selector,
                    held_back,
                    "toFQDNs port range too wide for the datapath; not allowed"
                );
            }
            continue;
        };
        for proto in protos {
            for port in &ports {
                keys.push(FqdnKey {
                    endpoint_id,
                    ip,
                    proto: *proto,
                    port: *port,
                });
            }
        }
    }
    keys
}

/// Whether `key` is among [`fqdn_keys`] of `grant` for its address, without building them
/// (a range is up to 1,024 keys).
pub fn grants_key(grant: &FqdnGrant, key: &FqdnKey) -> bool {
    if grant.endpoint.0 != key.endpoint_id {
        return false;
    }
    if grant.ports.is_empty() {
        return key.proto.is_none() && key.port.is_none();
    }
    grant.ports.iter().any(|range| {
        let port = if is_every_port(range) {
            key.port.is_none()
        } else if fits_the_datapath(range) {
            key.port
                .is_some_and(|port| (range.first..=range.last).contains(&port))
        } else {
            false
        };
        port && protocols(range).contains(&key.proto)
    })
}

fn is_every_port(range: &PortRange) -> bool {
    range.first == 0 && range.last == u16::MAX
}

fn fits_the_datapath(range: &PortRange) -> bool {
    is_every_port(range) || usize::from(range.last - range.first) < MAX_EXPANDED_PORTS
}

/// What in `policy` is not enforced as written, for `warden policy validate` and the agent's
/// log: what loading changed (a namespaced policy's subject confined to its namespace); a
/// toFQDNs rule whose `toPorts` range spans more than the datapath expands per name (1,024
/// ports; every port, `port: 0`, is fine), which allows nothing, as widening it to "any port"
/// would allow more than the policy says; DNS rules on a port the datapath does not redirect.
pub fn datapath_warnings(policy: &Policy) -> Vec<String> {
    // What loading said first (a namespace overwritten; what validate refuses but is loaded
    // as earlier releases did), then what the datapath cannot do.
    let mut warnings = policy.warnings.clone();
    warnings.extend(policy.refused_by_validate.iter().map(|problem| {
        format!("{problem} (not enforced as written; warden policy validate refuses it)")
    }));
    let name = policy.qualified_name();
    for rule in &policy.rules {
        for egress in rule
            .egress
            .iter()
            .filter(|egress| !egress.to_fqdns.is_empty())
        {
            for port in egress.to_ports.iter().flat_map(|to_ports| &to_ports.ports) {
                let range = PortRange::from(port);
                if !fits_the_datapath(&range) {
                    warnings.push(format!(
                        "{}: policy {name}: toFQDNs port range {}-{} ({} ports) is wider than the \
                         {MAX_EXPANDED_PORTS} ports the datapath allows per name; connections \
                         on it will be refused",
                        policy.origin.display(),
                        range.first,
                        range.last,
                        u32::from(range.last - range.first) + 1,
                    ));
                }
            }
        }
        // An L3/L4 rule's ports and protocols become port rules of each of its prefixes,
        // which the datapath holds 8 of (merged with other rules' for the same prefix).
        for egress in rule
            .egress
            .iter()
            .filter(|egress| egress.to_fqdns.is_empty())
        {
            let port_rules = datapath_port_rules(&egress.to_ports);
            if port_rules > PORT_RULES_PER_PREFIX {
                warnings.push(format!(
                    "{}: policy {name}: an egress rule's toPorts make {port_rules} port rules \
                     (a port of protocol ANY is two, TCP and UDP) for each address it allows; \
                     the datapath holds {PORT_RULES_PER_PREFIX} per address: connections on the \
                     others will be refused (name the protocol, or use port ranges)",
                    policy.origin.display(),
                ));
            }
        }
        // The datapath redirects port 53 only: DNS rules on another port police what the
        // proxy forwards to an upstream on that port, but no workload's traffic reaches
        // them, and that port stays closed (the rule allows it for DNS through the proxy).
        for egress in &rule.egress {
            for to_ports in egress
                .to_ports
                .iter()
                .filter(|to| !to.dns_rules().is_empty())
            {
                for port in to_ports.ports.iter().filter(|port| port.port != 53) {
                    warnings.push(format!(
                        "{}: policy {name}: rules.dns on port {}: with the eBPF datapath, which \
                         redirects port 53 only, workloads' DNS to that port is not proxied and \
                         stays blocked",
                        policy.origin.display(),
                        port.port,
                    ));
                }
            }
        }
    }
    warnings
}

/// The datapath's protocols of a port range: ANY is TCP and UDP, also on every port (`port: 0`).
/// Only a rule without `toPorts` allows every protocol: as in Cilium, any layer-4 rule leaves
/// ICMP and the other port-less protocols out.
fn protocols(range: &PortRange) -> &'static [Option<u8>] {
    match range.proto {
        Some(L4Proto::Tcp) => &[Some(TCP)],
        Some(L4Proto::Udp) => &[Some(UDP)],
        None => &[Some(TCP), Some(UDP)],
    }
}

/// The datapath's port rules for an allow's ports (empty: every port and protocol): a port
/// of protocol ANY is a rule for TCP and one for UDP.
pub fn port_rules(ports: &[PortRange]) -> Vec<PortRule> {
    if ports.is_empty() {
        return vec![PortRule::ANY];
    }
    ports
        .iter()
        .flat_map(|range| {
            protocols(range)
                .iter()
                .map(|proto| PortRule::range(*proto, range.first, range.last))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Adds `rules` to `into` as one prefix's rules: a rule another covers is left out (and those
/// it covers go), so that "every port" absorbs the rest.
pub fn merge_port_rules(into: &mut Vec<PortRule>, rules: &[PortRule]) {
    for rule in rules {
        if into.iter().any(|held| held.covers(rule)) {
            continue;
        }
        into.retain(|held| !rule.covers(held));
        into.push(*rule);
    }
}

/// The port rules of the datapath an L3/L4 rule's `toPorts` make for each address, as the
/// agent makes them ([`port_rules`], merged): a group with DNS rules opens none (its port 53
/// goes to the proxy), nor does a group without ports (see `PolicyRepository::add_rule`);
/// merged as [`merge_port_rules`] merges them.
fn datapath_port_rules(to_ports: &[warden_policy::PortRule]) -> usize {
    let mut ranges = Vec::new();
    for group in to_ports {
        if !group.dns_rules().is_empty() {
            continue;
        }
        ranges.extend(group.ports.iter().map(PortRange::from));
    }
    if ranges.is_empty() {
        return 0;
    }
    let mut rules = Vec::new();
    merge_port_rules(&mut rules, &port_rules(&ranges));
    rules.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_policy::EndpointId;

    /// The datapath warnings of the policies of `yaml`, read as the file `file`.
    fn warnings_of(yaml: &str, file: &str) -> Vec<String> {
        let policies = warden_policy::parse_str(yaml, std::path::Path::new(file)).unwrap();
        policies.iter().flat_map(datapath_warnings).collect()
    }

    /// `grants_key` says what `fqdn_keys` would build, for every shape of grant.
    #[test]
    fn a_key_is_granted_exactly_when_the_grant_builds_it() {
        let ip: IpAddr = "198.18.1.10".parse().unwrap();
        let range = |first, last, proto| PortRange { first, last, proto };
        let grants: Vec<FqdnGrant> = [
            vec![],
            vec![range(443, 443, Some(L4Proto::Tcp))],
            vec![range(53, 53, None), range(8000, 8010, Some(L4Proto::Udp))],
            vec![range(0, u16::MAX, Some(L4Proto::Tcp))],
            vec![range(1, 5000, None)],
        ]
        .into_iter()
        .map(|ports| FqdnGrant {
            endpoint: EndpointId(3),
            ports: ports.into(),
            selector: "cilium.io".into(),
        })
        .collect();
        let mut keys: Vec<FqdnKey> = grants.iter().flat_map(|g| fqdn_keys(g, ip)).collect();
        for endpoint_id in [3, 4] {
            for proto in [None, Some(TCP), Some(UDP), Some(132)] {
                for port in [
                    None,
                    Some(53),
                    Some(443),
                    Some(8005),
                    Some(8011),
                    Some(4999),
                ] {
                    keys.push(FqdnKey {
                        endpoint_id,
                        ip,
                        proto,
                        port,
                    });
                }
            }
        }
        for grant in &grants {
            let built = fqdn_keys(grant, ip);
            for key in &keys {
                assert_eq!(
                    grants_key(grant, key),
                    built.contains(key),
                    "{grant:?} {key:?}"
                );
            }
        }
    }

    #[test]
    fn an_ipv4_mapped_address_gets_the_ipv4_key() {
        let grant = FqdnGrant {
            endpoint: EndpointId(3),
            ports: [].into(),
            selector: "cilium.io".into(),
        };
        let mapped: IpAddr = "::ffff:198.18.1.10".parse().unwrap();
        let v4: IpAddr = "198.18.1.10".parse().unwrap();
        assert_eq!(fqdn_keys(&grant, mapped), vec![FqdnKey::any(3, v4)]);
    }

    #[test]
    fn grants_become_exact_keys() {
        let ip: IpAddr = "198.18.1.10".parse().unwrap();
        let grant = |ports: Vec<PortRange>| FqdnGrant {
            endpoint: EndpointId(3),
            ports: ports.into(),
            selector: "cilium.io".into(),
        };
        assert_eq!(fqdn_keys(&grant(vec![]), ip), vec![FqdnKey::any(3, ip)]);
        let web = grant(vec![
            PortRange {
                first: 80,
                last: 80,
                proto: Some(L4Proto::Tcp),
            },
            PortRange {
                first: 443,
                last: 443,
                proto: Some(L4Proto::Tcp),
            },
        ]);
        let keys = fqdn_keys(&web, ip);
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().all(|key| key.proto == Some(TCP)));
        let both = grant(vec![PortRange {
            first: 53,
            last: 53,
            proto: None,
        }]);
        assert_eq!(fqdn_keys(&both, ip).len(), 2, "ANY is TCP and UDP");
        // `port: 0`, every port, is still a layer-4 rule: TCP and UDP, never ICMP.
        assert_eq!(
            fqdn_keys(&grant(vec![PortRange::ALL]), ip),
            vec![
                FqdnKey {
                    endpoint_id: 3,
                    ip,
                    proto: Some(TCP),
                    port: None,
                },
                FqdnKey {
                    endpoint_id: 3,
                    ip,
                    proto: Some(UDP),
                    port: None,
                },
            ]
        );
        assert_eq!(
            port_rules(&[PortRange::ALL]),
            vec![
                PortRule::range(Some(TCP), 0, u16::MAX),
                PortRule::range(Some(UDP), 0, u16::MAX),
            ]
        );
        assert_eq!(port_rules(&[]), vec![PortRule::ANY]);
        let wide = grant(vec![PortRange {
            first: 1,
            last: 60_000,
            proto: Some(L4Proto::Tcp),
        }]);
        assert!(
            fqdn_keys(&wide, ip).is_empty(),
            "too wide: refused, never widened"
        );
    }

    #[test]
    fn merged_port_rules_leave_out_what_another_covers() {
        let (dns, web) = (PortRule::port(UDP, 53), PortRule::port(TCP, 443));
        let tcp_all = PortRule::range(Some(TCP), 0, u16::MAX);
        let mut rules = Vec::new();
        merge_port_rules(&mut rules, &[dns, web, web]);
        assert_eq!(rules, vec![dns, web], "the same rule twice is one");
        merge_port_rules(&mut rules, &[tcp_all]);
        assert_eq!(
            rules,
            vec![dns, tcp_all],
            "a wider rule takes the narrower's place"
        );
        merge_port_rules(&mut rules, &[PortRule::port(TCP, 80)]);
        assert_eq!(rules, vec![dns, tcp_all], "a covered rule adds nothing");
        merge_port_rules(&mut rules, &[PortRule::ANY]);
        assert_eq!(rules, vec![PortRule::ANY]);
    }

    #[test]
    fn a_subject_moved_into_the_policys_namespace_is_reported() {
        let yaml = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: moved, namespace: youssef}
spec:
  endpointSelector: {matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, app: test}}
  egress: [{toEntities: [world]}]
"#;
        let warnings = warnings_of(yaml, "moved.yaml");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("moved.yaml")
                && warnings[0].contains("youssef/moved")
                && warnings[0].contains("\"kube-system\""),
            "{warnings:?}"
        );
    }

    #[test]
    fn what_validate_refuses_is_said_when_loaded() {
        let yaml = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: host, namespace: youssef}
spec:
  endpointSelector: {matchLabels: {app: test}}
  egress: [{toEndpoints: [{matchLabels: {"reserved:host": ""}}]}]
"#;
        let warnings = warnings_of(yaml, "host.yaml");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("youssef/host") && warnings[0].contains("not enforced as written"),
            "{warnings:?}"
        );
    }

    #[test]
    fn dns_rules_off_port_53_are_reported() {
        let yaml = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: consul, namespace: youssef}
spec:
  endpointSelector: {matchLabels: {app: test}}
  egress:
  - toCIDR: [10.0.0.10/32]
    toPorts:
    - ports: [{port: "53", protocol: UDP}, {port: "8600", protocol: UDP}]
      rules: {dns: [{matchPattern: "*.service.consul"}]}
    - ports: [{port: "8500", protocol: TCP}]
"#;
        let warnings = warnings_of(yaml, "consul.yaml");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("youssef/consul") && warnings[0].contains("port 8600"),
            "{warnings:?}"
        );
    }

    #[test]
    fn tofqdns_ranges_wider_than_the_datapath_are_reported() {
        let yaml = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: wide, namespace: youssef}
spec:
  endpointSelector: {matchLabels: {app: test}}
  egress:
  - toFQDNs: [{matchName: cilium.io}]
    toPorts: [{ports: [{port: "1024", endPort: 65535}, {port: "8000", endPort: 9023}, {port: "0"}]}]
  - toCIDR: [10.0.0.0/8]
    toPorts: [{ports: [{port: "1024", endPort: 65535}]}]
"#;
        let warnings = warnings_of(yaml, "wide.yaml");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(!warnings[0].contains("rules.dns"), "{warnings:?}");
        assert!(
            warnings[0].contains("wide.yaml")
                && warnings[0].contains("youssef/wide")
                && warnings[0].contains("1024-65535")
                && warnings[0].contains("64512 ports"),
            "{warnings:?}"
        );
    }

    /// Past 8 port rules for one address the datapath refused the rest, said only in the
    /// agent's log, every second.
    #[test]
    fn l3_rules_of_more_port_rules_than_the_datapath_holds_are_reported() {
        let rule = |ports: &str| {
            format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: many, \
                 namespace: youssef}}\nspec:\n  endpointSelector: {{matchLabels: {{app: \
                 test}}}}\n  egress:\n  - toCIDR: [10.0.0.0/8]\n    toPorts: [{{ports: \
                 [{ports}]}}]\n"
            )
        };
        let any = |count: u16| {
            (0..count)
                .map(|n| format!("{{port: \"{}\"}}", 8000 + n))
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert!(warnings_of(&rule(&any(4)), "many.yaml").is_empty());
        let warnings = warnings_of(&rule(&any(5)), "many.yaml");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("youssef/many") && warnings[0].contains("make 10 port rules"),
            "{warnings:?}"
        );
        let tcp: Vec<String> = (0..8)
            .map(|n| format!("{{port: \"{}\", protocol: TCP}}", 8000 + n))
            .collect();
        assert!(warnings_of(&rule(&tcp.join(", ")), "many.yaml").is_empty());
        // Counted as the datapath makes them: the same rule twice is one, a port of all ports
        // makes the rule two (TCP and UDP), and a group with DNS rules opens none.
        let repeated = format!("{}, {}", any(4), any(4));
        assert!(warnings_of(&rule(&repeated), "many.yaml").is_empty());
        let all = format!("{}, {{port: \"0\"}}", any(5));
        assert!(warnings_of(&rule(&all), "many.yaml").is_empty());
        let dns = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: dns, \
                   namespace: youssef}\nspec:\n  endpointSelector: {}\n  egress:\n  - \
                   toCIDR: [10.96.0.10/32]\n    toPorts: [{ports: [{port: '53'}, {port: \
                   '5353'}, {port: '8053'}, {port: '9053'}, {port: '10053'}], rules: {dns: \
                   [{matchPattern: '*'}]}}]\n";
        let warnings = warnings_of(dns, "dns.yaml");
        assert!(
            warnings
                .iter()
                .all(|warning| !warning.contains("port rules")),
            "{warnings:?}"
        );
    }
}
