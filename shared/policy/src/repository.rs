//! Policy compiled against the node's endpoints: the questions the DNS proxy and the datapath
//! ask, answered without walking the policies.
//!
//! [`PolicyRepository::build`] resolves every selector once. For each enforced endpoint it keeps
//! the egress rules that apply, each compiled to a peer predicate plus one group per `toPorts`
//! entry (a port set and, for `rules.dns`, a [`NameMatcher`]). Rules are shared between the
//! endpoints they select, and an endpoint has few of them, so [`PolicyRepository::dns_allowed`]
//! looks at a handful of groups and one indexed lookup each. All `toFQDNs` selectors of all
//! policies go into a single [`NameMatcher`] for [`PolicyRepository::fqdn_grants`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::addresses::{PeerAddresses, is_host};
use crate::labels::Labels;
use crate::matcher::NameMatcher;
use crate::model::{CidrRule, EgressRule, Entity, Policy, PortProtocol, Protocol};
use crate::name::DnsName;
use crate::selector::ScopedSelector;

/// An endpoint (workload) on this node, as the agent numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointId(pub u32);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What policy needs to know about an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub id: EndpointId,
    pub name: String,
    /// Decides which namespaced policies may select the endpoint.
    pub namespace: String,
    /// Normally [`Labels::from_k8s`], which also carries the namespace label that selectors
    /// naming a namespace look for.
    pub labels: Labels,
    /// The endpoint's addresses, which `toEndpoints` peers resolve to.
    pub ips: Vec<IpAddr>,
    /// Only a peer of others' rules (a Service's ClusterIP): no `endpointSelector` selects it.
    pub peer_only: bool,
}

/// Whether a `toEndpoints` selector takes in `endpoint`. A peer-only endpoint (a Service's
/// cluster address) carries only the labels every pod it stands for shares, its selector's: a
/// requirement on another key (`tier DoesNotExist`, `tier NotIn [db]`) says nothing about those
/// pods, which may all carry it, and selects none of them rather than all.
fn selects_peer(selector: &ScopedSelector<'_>, endpoint: &EndpointInfo) -> bool {
    selector.matches(&endpoint.namespace, &endpoint.labels)
        && (!endpoint.peer_only || selector.decided_by(&endpoint.labels))
}

/// The transport a packet or query uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4Proto {
    Tcp,
    Udp,
}

/// A range of destination ports for one transport, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
    /// `None` for both TCP and UDP (Cilium's `ANY`).
    pub proto: Option<L4Proto>,
}

impl PortRange {
    /// Every port over both transports.
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
        proto: None,
    };

    pub fn contains(&self, port: u16, proto: L4Proto) -> bool {
        (self.first..=self.last).contains(&port) && self.proto.is_none_or(|own| own == proto)
    }
}

impl From<&PortProtocol> for PortRange {
    fn from(port: &PortProtocol) -> Self {
        let proto = match port.protocol {
            Protocol::Tcp => Some(L4Proto::Tcp),
            Protocol::Udp => Some(L4Proto::Udp),
            Protocol::Any => None,
        };
        // Port 0 is Cilium's "all ports".
        let (first, last) = match port.port {
            0 => (0, u16::MAX),
            first => (first, port.end_port.unwrap_or(first)),
        };
        PortRange { first, last, proto }
    }
}

/// A `toFQDNs` selector that matched a name: the name's addresses may be reached by `endpoint`
/// on `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnGrant {
    pub endpoint: EndpointId,
    /// Empty means every port. Shared with the rule: the proxy makes grants per answer.
    pub ports: Arc<[PortRange]>,
    /// The `matchName` or `matchPattern` that matched, for observability.
    pub selector: Arc<str>,
}

/// A peer an egress rule allows without DNS being involved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    Cidr {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
    /// Anything that is neither a known endpoint nor the host.
    World,
    /// The node, which Warden knows as its loopback addresses.
    Host,
    /// Known endpoints and the host.
    Cluster,
    /// Any address.
    All,
    Endpoint(EndpointId),
}

/// An L3/L4 allow that does not depend on DNS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticAllow {
    pub peer: Peer,
    /// Empty means every port.
    pub ports: Vec<PortRange>,
}

/// Compiled policy for a set of endpoints. Cheap to share behind an `Arc`; rebuilt, not
/// updated, when policies or endpoints change.
#[derive(Clone, Debug, Default)]
pub struct PolicyRepository {
    /// Every endpoint in default-deny for egress, with the rules that allow something for it.
    /// Looked up for every query (by the asking endpoint), with a fast hash: its keys are the
    /// agent's endpoint IDs.
    enforced: HashMap<EndpointId, Vec<Arc<CompiledRule>>, foldhash::fast::RandomState>,
    fqdn: NameMatcher<FqdnTarget>,
    /// What the entities and CIDR rules stand for on this node, shared with the datapath.
    addresses: PeerAddresses,
    selector_count: usize,
    policy_count: usize,
}

/// One egress rule, resolved against the endpoints.
#[derive(Debug)]
struct CompiledRule {
    peer: PeerMatch,
    /// One group per `toPorts` entry that lists ports; none means every port with no L7 rule
    /// (the rule has no `toPorts`).
    port_groups: Vec<PortGroup>,
}

#[derive(Debug)]
enum PeerMatch {
    /// The rule has only `toPorts`: any peer.
    Any,
    Endpoints {
        ids: Vec<EndpointId>,
        ips: HashSet<IpAddr>,
    },
    Cidrs(Vec<CidrRule>),
    Entities(Vec<Entity>),
    /// `toFQDNs`: the peers are whatever the names resolve to, granted through
    /// [`PolicyRepository::fqdn_grants`].
    Fqdns,
    /// An empty peer list (`toEndpoints: []`, `toCIDR: []`, `toCIDRSet: []` or
    /// `toEntities: []`) in a rule without `toFQDNs`: as in Cilium, no peer at all, whatever
    /// other peer list the rule has.
    Nothing,
}

#[derive(Debug)]
struct PortGroup {
    /// Never empty (`port: 0` is every port).
    ports: Vec<PortRange>,
    /// `rules.dns`; `None` when the entry has no L7 rule, which allows every name.
    dns: Option<NameMatcher<()>>,
}

#[derive(Clone, Debug)]
struct FqdnTarget {
    scope: Arc<GrantScope>,
    selector: Arc<str>,
}

/// Who a `toFQDNs` rule grants, and on which ports; shared by the rule's selectors.
#[derive(Debug)]
struct GrantScope {
    endpoints: Vec<EndpointId>,
    ports: Arc<[PortRange]>,
}

impl PolicyRepository {
    pub fn build(policies: &[Policy], endpoints: &[EndpointInfo]) -> PolicyRepository {
        let mut repository = PolicyRepository {
            addresses: PeerAddresses::new(endpoints),
            policy_count: policies.len(),
            ..PolicyRepository::default()
        };
        for policy in policies {
            let namespace = policy.namespace.as_deref();
            for rule in &policy.rules {
                repository.selector_count += rule.egress.iter().map(count_selectors).sum::<usize>();
                if rule.egress.is_empty() {
                    continue;
                }
                let subject = ScopedSelector::subject(&rule.endpoint_selector, namespace);
                let selected: Vec<EndpointId> = endpoints
                    .iter()
                    .filter(|endpoint| {
                        !endpoint.peer_only
                            && subject.matches(&endpoint.namespace, &endpoint.labels)
                    })
                    .map(|endpoint| endpoint.id)
                    .collect();
                if selected.is_empty() {
                    continue;
                }
                // Enforced even if no egress rule turns out to allow anything.
                for id in &selected {
                    repository.enforced.entry(*id).or_default();
                }
                for egress in &rule.egress {
                    repository.add_rule(egress, namespace, endpoints, &selected);
                }
            }
        }
        repository
    }

    fn add_rule(
        &mut self,
        egress: &EgressRule,
        namespace: Option<&str>,
        endpoints: &[EndpointInfo],
        selected: &[EndpointId],
    ) {
        // `egress: [{}]` and the like: the endpoint is enforced and this rule allows nothing.
        if !egress.has_l3() && egress.to_ports.is_empty() {
            return;
        }
        // Nor does a rule whose every `toPorts` entry lists no port: Cilium opens the ports an
        // entry lists, and every port only for a rule without `toPorts` (an entry `{}` or
        // `{ports: []}`, which a template can leave, once opened every port here).
        if !egress.to_ports.is_empty() && egress.to_ports.iter().all(|entry| entry.ports.is_empty())
        {
            return;
        }
        let rule = Arc::new(CompiledRule::new(egress, namespace, endpoints));
        // The names' addresses get the rule's ports but those of entries with DNS rules, which
        // open none (see `static_ports`); with only those, the names get nothing.
        if !egress.to_fqdns.is_empty()
            && let Some(ports) = rule.static_ports()
        {
            let scope = Arc::new(GrantScope {
                endpoints: selected.to_vec(),
                ports: ports.into(),
            });
            for selector in &egress.to_fqdns {
                let target = FqdnTarget {
                    scope: Arc::clone(&scope),
                    selector: selector.as_str().into(),
                };
                self.fqdn.insert(selector, target);
            }
        }
        for id in selected {
            self.enforced
                .entry(*id)
                .or_default()
                .push(Arc::clone(&rule));
        }
    }

    pub fn empty() -> PolicyRepository {
        PolicyRepository::default()
    }

    /// Whether `endpoint` is selected by a rule with egress rules, which puts it in default-deny
    /// for egress.
    pub fn is_enforced(&self, endpoint: EndpointId) -> bool {
        self.enforced.contains_key(&endpoint)
    }

    /// Whether `endpoint`'s queries to `server` over `proto` are under DNS rules: an enforced
    /// endpoint with a rule whose peer is the server and whose `toPorts` entry for the port has
    /// `rules.dns` (whatever the names, and even where another rule widens them). Only such
    /// queries' answers may teach the cache, whose names open every endpoint's toFQDNs rules:
    /// as in Cilium, whose proxy sees only the queries of a DNS rule, an endpoint allowed the
    /// server without one (an L4 allow, `toEntities: world`) may ask a server it runs itself,
    /// and what it is told must not open the names for others.
    pub fn dns_visible(&self, endpoint: EndpointId, server: SocketAddr, proto: L4Proto) -> bool {
        let Some(rules) = self.enforced.get(&endpoint) else {
            return false;
        };
        let ip = server.ip().to_canonical();
        rules.iter().any(|rule| {
            rule.peer.matches(ip, &self.addresses)
                && rule
                    .port_groups
                    .iter()
                    .any(|group| group.dns.is_some() && group.covers(server.port(), proto))
        })
    }

    /// Whether a DNS query from `endpoint` for `qname`, sent over `proto` to `server`, is allowed.
    ///
    /// Unenforced endpoints may ask anything. Otherwise a rule must allow the server (its peer
    /// part, or any server when it only has `toPorts`) on the server's port and transport, and
    /// either list a `rules.dns` selector matching `qname` or have no L7 rule on that port: as in
    /// Cilium, an L4-only allow to the DNS server widens any DNS rule to every name.
    pub fn dns_allowed(
        &self,
        endpoint: EndpointId,
        server: SocketAddr,
        proto: L4Proto,
        qname: &DnsName,
    ) -> bool {
        let Some(rules) = self.enforced.get(&endpoint) else {
            return true;
        };
        // A dual-stack socket reports IPv4 servers as ::ffff:a.b.c.d.
        let ip = server.ip().to_canonical();
        rules.iter().any(|rule| {
            rule.peer.matches(ip, &self.addresses)
                && (rule.port_groups.is_empty()
                    || rule
                        .port_groups
                        .iter()
                        .any(|group| group.allows(server.port(), proto, qname)))
        })
    }

    /// Appends a grant for every `toFQDNs` selector matching `qname` and every endpoint its rule
    /// selects, whichever endpoint asked: once a name is resolved, each of those endpoints may
    /// reach its addresses.
    pub fn fqdn_grants(&self, qname: &DnsName, out: &mut impl Extend<FqdnGrant>) {
        self.fqdn.for_each_match(qname, |target| {
            out.extend(target.scope.endpoints.iter().map(|&endpoint| FqdnGrant {
                endpoint,
                ports: Arc::clone(&target.scope.ports),
                selector: Arc::clone(&target.selector),
            }));
        });
    }

    /// The grants `endpoint`'s `toFQDNs` rules give whatever the name (`selector` left
    /// empty): what an allow entry of its that no name is known for may still stand for.
    pub fn fqdn_grants_of_any_name(&self, endpoint: EndpointId) -> Vec<FqdnGrant> {
        self.enforced
            .get(&endpoint)
            .into_iter()
            .flatten()
            .filter(|rule| matches!(rule.peer, PeerMatch::Fqdns))
            .filter_map(|rule| rule.static_ports())
            .map(|ports| FqdnGrant {
                endpoint,
                ports: ports.into(),
                selector: "".into(),
            })
            .collect()
    }

    /// What the peers of [`Self::static_allows`] stand for in addresses: the same description
    /// the DNS check reads.
    pub fn addresses(&self) -> &PeerAddresses {
        &self.addresses
    }

    /// The allows of `endpoint` that do not depend on DNS: its `toEndpoints`, `toCIDR`,
    /// `toCIDRSet`, `toEntities` and `toPorts`-only rules, with their ports.
    pub fn static_allows(&self, endpoint: EndpointId) -> Vec<StaticAllow> {
        let mut allows = Vec::new();
        for rule in self.enforced.get(&endpoint).into_iter().flatten() {
            let Some(ports) = rule.static_ports() else {
                continue;
            };
            for peer in rule.peer.static_peers() {
                let allow = StaticAllow {
                    peer,
                    ports: ports.clone(),
                };
                if !allows.contains(&allow) {
                    allows.push(allow);
                }
            }
        }
        allows
    }

    /// Number of `toFQDNs` selectors and `rules.dns` entries in all policies.
    pub fn selector_count(&self) -> usize {
        self.selector_count
    }

    pub fn policy_count(&self) -> usize {
        self.policy_count
    }
}

fn count_selectors(egress: &EgressRule) -> usize {
    egress.to_fqdns.len()
        + egress
            .to_ports
            .iter()
            .map(|port_rule| port_rule.dns_rules().len())
            .sum::<usize>()
}

impl CompiledRule {
    fn new(egress: &EgressRule, namespace: Option<&str>, endpoints: &[EndpointInfo]) -> Self {
        let peer = if !egress.to_fqdns.is_empty() {
            PeerMatch::Fqdns
        } else if egress.selects_no_peer() {
            PeerMatch::Nothing
        } else if let Some(selectors) = &egress.to_endpoints {
            let scoped: Vec<ScopedSelector<'_>> = selectors
                .iter()
                .map(|selector| ScopedSelector::peer(selector, namespace))
                .collect();
            let peers: Vec<&EndpointInfo> = endpoints
                .iter()
                .filter(|endpoint| {
                    scoped
                        .iter()
                        .any(|selector| selects_peer(selector, endpoint))
                })
                .collect();
            PeerMatch::Endpoints {
                ids: peers.iter().map(|endpoint| endpoint.id).collect(),
                ips: peers
                    .iter()
                    .flat_map(|endpoint| endpoint.ips.iter().map(IpAddr::to_canonical))
                    .collect(),
            }
        } else if egress.to_cidr.is_some() || egress.to_cidr_set.is_some() {
            let plain = egress.to_cidr.iter().flatten().map(|&cidr| CidrRule {
                cidr,
                except: Vec::new(),
            });
            let sets = egress.to_cidr_set.iter().flatten().cloned();
            // Compared per query as the datapath keys them.
            PeerMatch::Cidrs(plain.chain(sets).map(|rule| rule.canonical()).collect())
        } else if let Some(entities) = &egress.to_entities {
            PeerMatch::Entities(entities.clone())
        } else {
            PeerMatch::Any
        };
        let port_groups = egress
            .to_ports
            .iter()
            // An entry without ports opens nothing (see `PolicyRepository::add_rule`).
            .filter(|port_rule| !port_rule.ports.is_empty())
            .map(|port_rule| PortGroup {
                ports: port_rule.ports.iter().map(PortRange::from).collect(),
                dns: (!port_rule.dns_rules().is_empty()).then(|| {
                    let mut matcher = NameMatcher::new();
                    for selector in port_rule.dns_rules() {
                        matcher.insert(selector, ());
                    }
                    matcher
                }),
            })
            .collect();
        CompiledRule { peer, port_groups }
    }

    /// The ports the rule opens as an L3/L4 allow, `None` for none; empty means all of them.
    ///
    /// An entry with `rules.dns` adds none: the datapath sends port 53 (and nothing else) to
    /// the DNS proxy, which applies the DNS rules, and what goes there passes as sent to the
    /// endpoint's DNS target. Opened as a plain allow, a port would let any name be resolved
    /// there by what the redirect does not see: port 53 by a socket connected before its
    /// cgroup was enrolled (a connected socket's sends run no hook), or over a family the
    /// endpoint has no DNS target in. Without a datapath the proxy still applies such an entry
    /// on `dns.upstream`'s port.
    fn static_ports(&self) -> Option<Vec<PortRange>> {
        if self.port_groups.is_empty() {
            return Some(Vec::new());
        }
        let ports: Vec<PortRange> = self
            .port_groups
            .iter()
            .filter(|group| group.dns.is_none())
            .flat_map(|group| group.ports.iter().copied())
            .collect();
        (!ports.is_empty()).then_some(ports)
    }
}

impl PeerMatch {
    /// `ip` canonical.
    fn matches(&self, ip: IpAddr, addresses: &PeerAddresses) -> bool {
        match self {
            PeerMatch::Any => true,
            PeerMatch::Endpoints { ips, .. } => ips.contains(&ip),
            PeerMatch::Cidrs(rules) => rules.iter().any(|rule| rule.contains(&ip)),
            PeerMatch::Entities(entities) => entities.iter().any(|entity| match entity {
                Entity::All => true,
                Entity::Host => is_host(ip),
                Entity::World => addresses.in_world(ip),
                Entity::Cluster => addresses.in_cluster(ip),
            }),
            PeerMatch::Fqdns | PeerMatch::Nothing => false,
        }
    }

    fn static_peers(&self) -> Vec<Peer> {
        match self {
            PeerMatch::Any => vec![Peer::All],
            PeerMatch::Endpoints { ids, .. } => ids.iter().map(|&id| Peer::Endpoint(id)).collect(),
            PeerMatch::Cidrs(rules) => rules
                .iter()
                .map(|rule| Peer::Cidr {
                    cidr: rule.cidr,
                    except: rule.except.clone(),
                })
                .collect(),
            PeerMatch::Entities(entities) => entities
                .iter()
                .map(|entity| match entity {
                    Entity::All => Peer::All,
                    Entity::World => Peer::World,
                    Entity::Host => Peer::Host,
                    Entity::Cluster => Peer::Cluster,
                })
                .collect(),
            PeerMatch::Fqdns | PeerMatch::Nothing => Vec::new(),
        }
    }
}

impl PortGroup {
    fn allows(&self, port: u16, proto: L4Proto, qname: &DnsName) -> bool {
        self.covers(port, proto) && self.dns.as_ref().is_none_or(|names| names.is_match(qname))
    }

    /// Whether the entry's ports include `port` over `proto`.
    fn covers(&self, port: u16, proto: L4Proto) -> bool {
        self.ports.iter().any(|range| range.contains(port, proto))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::parse_str;

    const CLIENT: EndpointId = EndpointId(1);
    const KUBE_DNS: EndpointId = EndpointId(2);
    const OTHER: EndpointId = EndpointId(3);
    const KUBE_DNS_IP: &str = "10.96.0.10";

    fn endpoint(
        id: EndpointId,
        namespace: &str,
        labels: &[(&str, &str)],
        ip: &str,
    ) -> EndpointInfo {
        let k8s: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        EndpointInfo {
            id,
            name: format!("pod-{id}"),
            namespace: namespace.to_owned(),
            labels: Labels::from_k8s(&k8s, namespace),
            ips: vec![ip.parse().unwrap()],
            peer_only: false,
        }
    }

    fn endpoints() -> Vec<EndpointInfo> {
        vec![
            endpoint(CLIENT, "default", &[("app", "client")], "10.0.0.1"),
            endpoint(
                KUBE_DNS,
                "kube-system",
                &[("k8s-app", "kube-dns")],
                KUBE_DNS_IP,
            ),
            endpoint(OTHER, "other", &[("app", "client")], "10.0.0.3"),
        ]
    }

    fn build(yaml: &str) -> PolicyRepository {
        let policies = parse_str(yaml, Path::new("test.yaml")).unwrap();
        PolicyRepository::build(&policies, &endpoints())
    }

    fn name(text: &str) -> DnsName {
        DnsName::new(text).unwrap()
    }

    fn server(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    /// A CiliumNetworkPolicy in `default` selecting app=client, with `egress` as given.
    fn policy(egress: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\n\
             spec:\n  endpointSelector: {{matchLabels: {{app: client}}}}\n  egress: {egress}\n"
        )
    }

    /// A CiliumClusterwideNetworkPolicy with the given subject selector and `egress`.
    fn clusterwide(selector: &str, egress: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: p}}\n\
             spec:\n  endpointSelector: {selector}\n  egress: {egress}\n"
        )
    }

    fn dns_ok(
        repo: &PolicyRepository,
        id: EndpointId,
        to: &str,
        proto: L4Proto,
        qname: &str,
    ) -> bool {
        repo.dns_allowed(id, server(to), proto, &name(qname))
    }

    const TO_KUBE_DNS: &str =
        "{matchLabels: {'k8s:io.kubernetes.pod.namespace': kube-system, 'k8s:k8s-app': kube-dns}}";

    /// A pod's queries go to the kube-dns Service, not to a kube-dns pod: the Service's
    /// address, labelled as the pods it picks, stands for them to `toEndpoints`, and no
    /// `endpointSelector` makes it a subject (a namespace-wide policy would otherwise give it
    /// allow entries of its own for every name its rules grant).
    #[test]
    fn a_peer_only_address_is_a_peer_and_never_a_subject() {
        let mut endpoints = endpoints();
        endpoints[1].peer_only = true;
        let yaml = clusterwide(
            "{}",
            &format!(
                "[{{toEndpoints: [{TO_KUBE_DNS}], toPorts: [{{ports: [{{port: '53', protocol: \
                 UDP}}], rules: {{dns: [{{matchPattern: '*'}}]}}}}]}}, {{toFQDNs: [{{matchName: \
                 cilium.io}}]}}]"
            ),
        );
        let policies = parse_str(&yaml, Path::new("test.yaml")).unwrap();
        let repo = PolicyRepository::build(&policies, &endpoints);
        assert!(repo.is_enforced(CLIENT));
        assert!(dns_ok(
            &repo,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Udp,
            "cilium.io"
        ));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "10.0.0.3:53",
            L4Proto::Udp,
            "cilium.io"
        ));
        assert!(!repo.is_enforced(KUBE_DNS));
        let mut grants = Vec::new();
        repo.fqdn_grants(&name("cilium.io"), &mut grants);
        assert!(
            grants.iter().all(|grant| grant.endpoint != KUBE_DNS),
            "{grants:?}"
        );
        assert!(!grants.is_empty());

        // In `cluster`, as the pods it stands for are, and not carved out of `world`.
        let entities = |entity: &str| {
            let yaml = policy(&format!(
                "[{{toEntities: [{entity}], toPorts: [{{ports: [{{port: '53', protocol: UDP}}]}}]}}]"
            ));
            let policies = parse_str(&yaml, Path::new("test.yaml")).unwrap();
            PolicyRepository::build(&policies, &endpoints)
        };
        for (entity, server) in [
            ("world", "10.96.0.10:53"),
            ("cluster", "10.96.0.10:53"),
            ("cluster", "10.0.0.3:53"),
        ] {
            assert!(
                dns_ok(&entities(entity), CLIENT, server, L4Proto::Udp, "a.io"),
                "{entity} {server}"
            );
        }
    }

    /// Written v4-mapped, a CIDR rule (or its hole) is the IPv4 one it stands for, as in the
    /// datapath; the proxy compared it as written, and refused what the datapath allowed.
    #[test]
    fn cidr_rules_written_v4_mapped_are_their_ipv4_prefixes() {
        let repo = build(&policy(
            "[{toCIDRSet: [{cidr: '::ffff:10.96.0.0/108', except: ['::ffff:10.96.0.128/121']}], \
             toPorts: [{ports: [{port: '53', protocol: UDP}], rules: {dns: [{matchPattern: '*'}]}}]}]",
        ));
        assert!(dns_ok(&repo, CLIENT, "10.96.0.20:53", L4Proto::Udp, "a.io"));
        assert!(dns_ok(
            &repo,
            CLIENT,
            "[::ffff:10.96.0.20]:53",
            L4Proto::Udp,
            "a.io"
        ));
        assert!(
            !dns_ok(&repo, CLIENT, "10.96.0.130:53", L4Proto::Udp, "a.io"),
            "the hole"
        );
        let all_v6 = build(&policy(
            "[{toCIDR: ['::/0'], toPorts: [{ports: [{port: '53', protocol: UDP}]}]}]",
        ));
        assert!(
            !dns_ok(&all_v6, CLIENT, "10.96.0.20:53", L4Proto::Udp, "a.io"),
            "IPv6 only"
        );
    }

    #[test]
    fn unenforced_endpoints_may_ask_anything() {
        let repo = PolicyRepository::empty();
        assert!(!repo.is_enforced(CLIENT));
        assert!(dns_ok(
            &repo,
            CLIENT,
            "192.0.2.1:53",
            L4Proto::Udp,
            "anything.example"
        ));
        assert_eq!(repo.policy_count(), 0);
    }

    #[test]
    fn dns_rules_restrict_names_server_port_and_protocol() {
        let repo = build(&policy(&format!(
            "[{{toEndpoints: [{TO_KUBE_DNS}], toPorts: [{{ports: [{{port: '53', protocol: UDP}}], \
             rules: {{dns: [{{matchName: cilium.io}}, {{matchPattern: '*.cilium.io'}}]}}}}]}}]"
        )));
        assert!(repo.is_enforced(CLIENT));
        let dns = "10.96.0.10:53";
        assert!(dns_ok(&repo, CLIENT, dns, L4Proto::Udp, "cilium.io"));
        assert!(dns_ok(&repo, CLIENT, dns, L4Proto::Udp, "WWW.cilium.io."));
        assert!(!dns_ok(&repo, CLIENT, dns, L4Proto::Udp, "a.b.cilium.io"));
        assert!(!dns_ok(&repo, CLIENT, dns, L4Proto::Udp, "example.com"));
        assert!(
            !dns_ok(&repo, CLIENT, dns, L4Proto::Tcp, "cilium.io"),
            "UDP only"
        );
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "10.96.0.10:5353",
            L4Proto::Udp,
            "cilium.io"
        ));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "8.8.8.8:53",
            L4Proto::Udp,
            "cilium.io"
        ));
        assert!(
            dns_ok(
                &repo,
                CLIENT,
                "[::ffff:10.96.0.10]:53",
                L4Proto::Udp,
                "cilium.io"
            ),
            "IPv4-mapped server address"
        );
        assert_eq!(repo.selector_count(), 2);
    }

    #[test]
    fn l4_only_allow_widens_dns_rules() {
        let narrow = format!(
            "{{toEndpoints: [{TO_KUBE_DNS}], toPorts: [{{ports: [{{port: '53'}}], \
             rules: {{dns: [{{matchName: cilium.io}}]}}}}]}}"
        );
        let repo = build(&policy(&format!("[{narrow}]")));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Udp,
            "example.com"
        ));

        // Another rule allowing port 53 to the same server without L7 rules lets every name
        // through, in the same policy or another.
        let l4_only =
            format!("{{toEndpoints: [{TO_KUBE_DNS}], toPorts: [{{ports: [{{port: '53'}}]}}]}}");
        let repo = build(&policy(&format!("[{narrow}, {l4_only}]")));
        assert!(dns_ok(
            &repo,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Udp,
            "example.com"
        ));

        // So does an L3-only allow (every port), and `rules: {dns: []}` is no L7 rule.
        let repo = build(&policy(&format!(
            "[{narrow}, {{toEndpoints: [{TO_KUBE_DNS}]}}]"
        )));
        assert!(dns_ok(
            &repo,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Tcp,
            "example.com"
        ));
        let repo = build(&policy(
            "[{toPorts: [{ports: [{port: '53'}], rules: {dns: []}}]}]",
        ));
        assert!(dns_ok(
            &repo,
            CLIENT,
            "192.0.2.1:53",
            L4Proto::Tcp,
            "example.com"
        ));

        // But an L4-only allow to a different server does not widen kube-dns's rules.
        let elsewhere = "{toCIDR: [192.0.2.0/24], toPorts: [{ports: [{port: '53'}]}]}";
        let repo = build(&policy(&format!("[{narrow}, {elsewhere}]")));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Udp,
            "example.com"
        ));
        assert!(dns_ok(
            &repo,
            CLIENT,
            "192.0.2.53:53",
            L4Proto::Udp,
            "example.com"
        ));
    }

    /// Only queries under DNS rules may teach the cache: an enforced endpoint allowed the
    /// server without them (an L4 allow, an entity) could ask a server of its own and open
    /// every endpoint's toFQDNs rules for the names it is told.
    #[test]
    fn only_queries_under_dns_rules_are_visible() {
        let visible = |egress: &str, to: &str| {
            build(&policy(egress)).dns_visible(CLIENT, server(to), L4Proto::Udp)
        };
        let dns = format!(
            "[{{toEndpoints: [{TO_KUBE_DNS}], toPorts: [{{ports: [{{port: '53', protocol: ANY}}], \
             rules: {{dns: [{{matchName: a.io}}]}}}}]}}]"
        );
        assert!(visible(&dns, "10.96.0.10:53"), "whatever the name");
        assert!(!visible(&dns, "10.96.0.10:5353"), "another port");
        assert!(!visible(&dns, "192.0.2.1:53"), "another server");
        let widened = format!(
            "[{{toEndpoints: [{TO_KUBE_DNS}], toPorts: [{{ports: [{{port: '53'}}], rules: {{dns: \
             [{{matchName: a.io}}]}}}}]}}, {{toEndpoints: [{TO_KUBE_DNS}], toPorts: [{{ports: \
             [{{port: '53'}}]}}]}}]"
        );
        assert!(
            visible(&widened, "10.96.0.10:53"),
            "widened, still under DNS rules"
        );
        let l4 = "[{toPorts: [{ports: [{port: '53'}]}]}]";
        assert!(dns_ok(
            &build(&policy(l4)),
            CLIENT,
            "192.0.2.1:53",
            L4Proto::Udp,
            "a.io"
        ));
        assert!(
            !visible(l4, "192.0.2.1:53"),
            "allowed, but under no DNS rule"
        );
        assert!(!visible("[{toEntities: [world]}]", "192.0.2.1:53"));
        let repo = build(&policy(&dns));
        assert!(
            !repo.dns_visible(OTHER, server("10.96.0.10:53"), L4Proto::Udp),
            "unenforced"
        );
    }

    #[test]
    fn to_ports_alone_allows_any_server() {
        let repo = build(&policy(
            "[{toPorts: [{ports: [{port: '53', protocol: ANY}], rules: {dns: [{matchPattern: '*'}]}}]}]",
        ));
        assert!(dns_ok(
            &repo,
            CLIENT,
            "192.0.2.1:53",
            L4Proto::Tcp,
            "x.example"
        ));
        assert!(dns_ok(&repo, CLIENT, "[2001:db8::1]:53", L4Proto::Udp, "."));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "192.0.2.1:54",
            L4Proto::Udp,
            "x.example"
        ));
        // Through the proxy only: the datapath sends port 53 there.
        assert!(repo.static_allows(CLIENT).is_empty());
    }

    #[test]
    fn empty_egress_rule_enforces_and_allows_nothing() {
        let repo = build(&policy("[{}]"));
        assert!(repo.is_enforced(CLIENT));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Udp,
            "cilium.io"
        ));
        assert!(repo.static_allows(CLIENT).is_empty());
        assert!(!repo.is_enforced(KUBE_DNS));
    }

    #[test]
    fn no_egress_section_does_not_enforce() {
        let without = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n\
                       spec: {endpointSelector: {}}\n";
        assert!(!build(without).is_enforced(CLIENT));
        assert!(
            !build(&policy("[]")).is_enforced(CLIENT),
            "egress: [] is no egress section"
        );
    }

    #[test]
    fn namespaced_policy_selects_its_own_namespace_only() {
        // `app: client` exists in `default` and in `other`; the policy lives in `default`.
        let repo = build(&policy("[{}]"));
        assert!(repo.is_enforced(CLIENT));
        assert!(!repo.is_enforced(OTHER));

        let repo = build(&clusterwide("{matchLabels: {app: client}}", "[{}]"));
        assert!(repo.is_enforced(CLIENT));
        assert!(repo.is_enforced(OTHER));
    }

    #[test]
    fn to_endpoints_is_confined_unless_it_names_a_namespace() {
        let to = |selector: &str| {
            build(&policy(&format!(
                "[{{toEndpoints: [{selector}], toPorts: [{{ports: [{{port: '53'}}]}}]}}]"
            )))
        };
        // kube-dns lives in kube-system, outside the policy's namespace.
        let unnamed = to("{matchLabels: {k8s-app: kube-dns}}");
        assert!(!dns_ok(
            &unnamed,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Udp,
            "a.io"
        ));
        for named in [
            "{matchLabels: {'k8s:io.kubernetes.pod.namespace': kube-system, k8s-app: kube-dns}}",
            "{matchLabels: {io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}",
            "{matchLabels: {k8s-app: kube-dns}, matchExpressions: [{key: io.kubernetes.pod.namespace, operator: Exists}]}",
        ] {
            assert!(
                dns_ok(&to(named), CLIENT, "10.96.0.10:53", L4Proto::Udp, "a.io"),
                "{named}"
            );
        }
        // `{}` selects every endpoint of the policy's namespace, not kube-dns.
        let all_local = to("{}");
        assert!(!dns_ok(
            &all_local,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Udp,
            "a.io"
        ));
        assert_eq!(
            all_local.static_allows(CLIENT)[0].peer,
            Peer::Endpoint(CLIENT)
        );
        // `toEndpoints: []` selects nothing at all.
        let nothing = to("");
        assert!(!dns_ok(
            &nothing,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Udp,
            "a.io"
        ));
        assert!(nothing.static_allows(CLIENT).is_empty());
    }

    /// A Service is labelled as its selector only: an expression on a label its pods may carry
    /// beyond it matched the Service as if none of them did.
    #[test]
    fn a_service_is_taken_in_only_by_what_its_selector_decides() {
        let mut endpoints = endpoints();
        endpoints[1].peer_only = true;
        let reaches = |endpoints: &[EndpointInfo], selector: &str| {
            let yaml = clusterwide(
                "{matchLabels: {app: client}}",
                &format!("[{{toEndpoints: [{selector}], toPorts: [{{ports: [{{port: '53'}}]}}]}}]"),
            );
            let policies = parse_str(&yaml, Path::new("test.yaml")).unwrap();
            let repo = PolicyRepository::build(&policies, endpoints);
            dns_ok(&repo, CLIENT, "10.96.0.10:53", L4Proto::Udp, "a.io")
        };
        let decided = [
            "{matchLabels: {k8s-app: kube-dns}}",
            "{matchExpressions: [{key: k8s-app, operator: NotIn, values: [web]}]}",
            "{matchExpressions: [{key: k8s-app, operator: Exists}]}",
            // No pod carries a label of another source than `k8s`.
            "{matchExpressions: [{key: 'container:tier', operator: DoesNotExist}]}",
        ];
        for selector in decided {
            assert!(reaches(&endpoints, selector), "{selector}");
        }
        let undecided = [
            "{matchExpressions: [{key: tier, operator: DoesNotExist}]}",
            "{matchExpressions: [{key: tier, operator: NotIn, values: [db]}]}",
            "{matchLabels: {k8s-app: kube-dns}, matchExpressions: [{key: tier, operator: DoesNotExist}]}",
        ];
        for selector in undecided {
            assert!(!reaches(&endpoints, selector), "a Service: {selector}");
            // A pod's labels are all there is: the same selectors take it in.
            assert!(reaches(&self::endpoints(), selector), "a pod: {selector}");
        }
    }

    #[test]
    fn label_sources_and_expressions_in_subject_selectors() {
        let enforced = |selector: &str| {
            let repo = build(&clusterwide(selector, "[{}]"));
            [CLIENT, KUBE_DNS, OTHER].map(|id| repo.is_enforced(id))
        };
        assert_eq!(
            enforced("{matchLabels: {'k8s:app': client}}"),
            [true, false, true]
        );
        assert_eq!(
            enforced("{matchLabels: {'any:app': client}}"),
            [true, false, true]
        );
        assert_eq!(
            enforced("{matchLabels: {'container:app': client}}"),
            [false, false, false]
        );
        assert_eq!(
            enforced(
                "{matchExpressions: [{key: 'k8s:io.kubernetes.pod.namespace', operator: NotIn, values: [other]}]}"
            ),
            [true, true, false]
        );
        assert_eq!(
            enforced("{matchExpressions: [{key: app, operator: DoesNotExist}]}"),
            [false, true, false]
        );
        assert_eq!(enforced("{}"), [true, true, true]);
    }

    #[test]
    fn cidr_rules_and_exceptions() {
        let repo = build(&policy(
            "[{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}], toPorts: [{ports: [{port: '53'}]}]},\
              {toCIDR: [192.0.2.53], toPorts: [{ports: [{port: '53', protocol: TCP}]}]}]",
        ));
        assert!(dns_ok(&repo, CLIENT, "10.1.1.1:53", L4Proto::Udp, "a.io"));
        assert!(
            !dns_ok(&repo, CLIENT, "10.96.0.10:53", L4Proto::Udp, "a.io"),
            "excepted"
        );
        assert!(dns_ok(&repo, CLIENT, "192.0.2.53:53", L4Proto::Tcp, "a.io"));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "192.0.2.53:53",
            L4Proto::Udp,
            "a.io"
        ));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "192.0.2.54:53",
            L4Proto::Tcp,
            "a.io"
        ));
        let allows = repo.static_allows(CLIENT);
        assert_eq!(allows.len(), 2);
        assert_eq!(
            allows[0].peer,
            Peer::Cidr {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec!["10.96.0.0/12".parse().unwrap()],
            }
        );
    }

    #[test]
    fn entities() {
        let with = |entity: &str| {
            build(&policy(&format!(
                "[{{toEntities: [{entity}], toPorts: [{{ports: [{{port: '53'}}]}}]}}]"
            )))
        };
        let servers = ["127.0.0.53:53", "[::1]:53", "10.96.0.10:53", "8.8.8.8:53"];
        let check = |entity: &str, expected: [bool; 4]| {
            let repo = with(entity);
            let got = servers.map(|s| dns_ok(&repo, CLIENT, s, L4Proto::Udp, "a.io"));
            assert_eq!(got, expected, "{entity}");
        };
        check("host", [true, true, false, false]);
        check("cluster", [true, true, true, false]);
        check("world", [false, false, false, true]);
        check("all", [true, true, true, true]);
        assert_eq!(with("world").static_allows(CLIENT)[0].peer, Peer::World);
    }

    #[test]
    fn fqdn_rules_never_match_a_dns_server() {
        let repo = build(&policy(
            "[{toFQDNs: [{matchPattern: '*'}], toPorts: [{ports: [{port: '53'}]}]}]",
        ));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "10.96.0.10:53",
            L4Proto::Udp,
            "a.io"
        ));
        assert!(repo.static_allows(CLIENT).is_empty());
    }

    #[test]
    fn empty_peer_lists_allow_nothing() {
        for peer in [
            "toEndpoints: []",
            "toCIDR: []",
            "toCIDRSet: []",
            "toEntities: []",
            "toCIDR: [10.96.0.0/16], toEntities: []",
            "toEntities: [all], toCIDRSet: []",
        ] {
            let repo = build(&policy(&format!(
                "[{{{peer}, toPorts: [{{ports: [{{port: '53'}}]}}]}}, {{{peer}}}]"
            )));
            assert!(repo.is_enforced(CLIENT), "{peer}");
            for server in ["10.96.0.10:53", "8.8.8.8:53", "127.0.0.1:53"] {
                assert!(
                    !dns_ok(&repo, CLIENT, server, L4Proto::Udp, "a.io"),
                    "{peer} to {server}"
                );
            }
            assert!(repo.static_allows(CLIENT).is_empty(), "{peer}");
        }
        // `toFQDNs: []` is no L3 part, as in Cilium: the rule's ports are open to any peer.
        let repo = build(&policy(
            "[{toFQDNs: [], toPorts: [{ports: [{port: '53'}]}]}]",
        ));
        assert!(dns_ok(&repo, CLIENT, "8.8.8.8:53", L4Proto::Udp, "a.io"));
    }

    /// `toPorts: [{}]` opened every port, to any peer and for every name, where Cilium, which
    /// opens the ports an entry lists, opens none: only a rule without `toPorts` is every port.
    #[test]
    fn a_to_ports_entry_without_ports_opens_nothing() {
        for to_ports in ["[{}]", "[{ports: []}]", "[{}, {ports: []}]"] {
            for peer in [
                "",
                "toEntities: [all], ",
                "toEndpoints: [{}], ",
                "toFQDNs: [{matchPattern: '*'}], ",
            ] {
                let repo = build(&policy(&format!("[{{{peer}toPorts: {to_ports}}}]")));
                let case = format!("{peer}toPorts: {to_ports}");
                assert!(repo.is_enforced(CLIENT), "{case}");
                assert!(repo.static_allows(CLIENT).is_empty(), "{case}");
                assert!(
                    !dns_ok(&repo, CLIENT, "8.8.8.8:53", L4Proto::Udp, "a.io"),
                    "{case}"
                );
                let mut grants = Vec::new();
                repo.fqdn_grants(&name("a.io"), &mut grants);
                assert!(grants.is_empty(), "{case}: {grants:?}");
            }
        }
        // Beside an entry with ports, it adds nothing to them.
        let https = [PortRange {
            first: 443,
            last: 443,
            proto: Some(L4Proto::Tcp),
        }];
        let repo = build(&policy(
            "[{toEntities: [all], toPorts: [{ports: [{port: '443', protocol: TCP}]}, {}]}, \
              {toFQDNs: [{matchName: a.io}], toPorts: [{}, {ports: [{port: '443', protocol: TCP}]}]}]",
        ));
        assert_eq!(repo.static_allows(CLIENT)[0].ports, https);
        assert!(!dns_ok(&repo, CLIENT, "8.8.8.8:53", L4Proto::Udp, "a.io"));
        let mut grants = Vec::new();
        repo.fqdn_grants(&name("a.io"), &mut grants);
        assert_eq!(*grants[0].ports, https);
        // `port: 0` is every port, as before.
        let repo = build(&policy(
            "[{toEntities: [all], toPorts: [{ports: [{port: '0'}]}]}]",
        ));
        assert!(dns_ok(&repo, CLIENT, "8.8.8.8:53", L4Proto::Udp, "a.io"));
    }

    /// An entry with DNS rules opens no port in the datapath; in a toFQDNs rule (where its
    /// rules apply to nothing) it made the names' addresses reachable on its port all the same,
    /// port 53 to a name's servers past the proxy.
    #[test]
    fn dns_rules_in_a_fqdn_rule_grant_no_port() {
        let repo = build(&policy(
            "[{toFQDNs: [{matchName: dns.google}], \
               toPorts: [{ports: [{port: '53'}], rules: {dns: [{matchName: ok.io}]}}]}, \
              {toFQDNs: [{matchName: both.io}], \
               toPorts: [{ports: [{port: '53'}], rules: {dns: [{matchName: ok.io}]}}, \
                         {ports: [{port: '443', protocol: TCP}]}]}]",
        ));
        let mut grants = Vec::new();
        repo.fqdn_grants(&name("dns.google"), &mut grants);
        assert!(grants.is_empty(), "{grants:?}");
        repo.fqdn_grants(&name("both.io"), &mut grants);
        assert_eq!(
            *grants[0].ports,
            [PortRange {
                first: 443,
                last: 443,
                proto: Some(L4Proto::Tcp)
            }]
        );
    }

    /// The datapath proxies port 53 only, so DNS rules on 5353 must not open 5353 to every
    /// name, nor (with no peer) to every address. Nor port 53 itself: opened as a plain allow,
    /// it let a socket connected before its cgroup was enrolled (a connected socket's sends run
    /// no hook), or a query over a family the endpoint has no DNS target in, resolve any name
    /// at the server, past the proxy.
    #[test]
    fn dns_rules_never_become_static_allows() {
        let repo = build(&policy(
            "[{toPorts: [{ports: [{port: '53', protocol: UDP}, {port: '5353'}], \
               rules: {dns: [{matchName: a.io}]}}]}, \
              {toCIDR: [192.0.2.0/24], toPorts: [{ports: [{port: '8053'}], \
               rules: {dns: [{matchName: a.io}]}}]}]",
        ));
        assert!(repo.static_allows(CLIENT).is_empty());
        // The proxy still applies them where it sees the query (without a datapath, on
        // `dns.upstream`'s port).
        assert!(dns_ok(
            &repo,
            CLIENT,
            "192.0.2.1:5353",
            L4Proto::Udp,
            "a.io"
        ));
        assert!(!dns_ok(
            &repo,
            CLIENT,
            "192.0.2.1:5353",
            L4Proto::Udp,
            "b.io"
        ));
        assert!(dns_ok(
            &repo,
            CLIENT,
            "192.0.2.1:8053",
            L4Proto::Tcp,
            "a.io"
        ));
        // Beside an L4-only entry, that entry's ports are opened as written.
        let repo = build(&policy(
            "[{toPorts: [{ports: [{port: '5353'}], rules: {dns: [{matchName: a.io}]}}, \
                         {ports: [{port: '443', protocol: TCP}]}]}]",
        ));
        assert_eq!(
            repo.static_allows(CLIENT)[0].ports,
            [PortRange {
                first: 443,
                last: 443,
                proto: Some(L4Proto::Tcp)
            }]
        );
    }

    #[test]
    fn subject_naming_another_namespace_gets_the_policy_namespace() {
        // As in Cilium, a CiliumNetworkPolicy in `default` applies to app=client in `default`,
        // whatever namespace its endpointSelector names with `k8s:`; the key without a source,
        // or `any:`, which Cilium keeps beside the namespace it sets, selects nothing.
        for (key, selects_client) in [
            ("'k8s:io.kubernetes.pod.namespace'", true),
            ("io.kubernetes.pod.namespace", false),
            ("'any:io.kubernetes.pod.namespace'", false),
        ] {
            let text = policy("[{}]").replace(
                "{matchLabels: {app: client}}",
                &format!("{{matchLabels: {{{key}: other, app: client}}}}"),
            );
            let repo = build(&text);
            assert_eq!(repo.is_enforced(CLIENT), selects_client, "{key}");
            assert!(!repo.is_enforced(OTHER), "{key}");
        }
        // A clusterwide policy may select any namespace.
        let repo = build(&clusterwide(
            "{matchLabels: {'k8s:io.kubernetes.pod.namespace': other, app: client}}",
            "[{}]",
        ));
        assert!(!repo.is_enforced(CLIENT));
        assert!(repo.is_enforced(OTHER));
    }

    #[test]
    fn fqdn_grants_go_to_every_selected_endpoint() {
        let repo = build(&clusterwide(
            "{matchLabels: {app: client}}",
            "[{toFQDNs: [{matchPattern: '*.cilium.io'}, {matchName: cilium.io}], \
               toPorts: [{ports: [{port: '443', protocol: TCP}, {port: '8000', endPort: 8080}]}]}, \
              {toFQDNs: [{matchPattern: '**.example.com'}]}]",
        ));
        let mut grants = Vec::new();
        repo.fqdn_grants(&name("www.cilium.io"), &mut grants);
        let ports = vec![
            PortRange {
                first: 443,
                last: 443,
                proto: Some(L4Proto::Tcp),
            },
            PortRange {
                first: 8000,
                last: 8080,
                proto: None,
            },
        ];
        assert_eq!(
            grants,
            [
                FqdnGrant {
                    endpoint: CLIENT,
                    ports: ports.clone().into(),
                    selector: "*.cilium.io.".into()
                },
                FqdnGrant {
                    endpoint: OTHER,
                    ports: ports.into(),
                    selector: "*.cilium.io.".into()
                },
            ]
        );

        grants.clear();
        repo.fqdn_grants(&name("a.b.example.com"), &mut grants);
        assert_eq!(grants.len(), 2);
        assert!(
            grants
                .iter()
                .all(|grant| grant.ports.is_empty() && &*grant.selector == "**.example.com.")
        );

        grants.clear();
        repo.fqdn_grants(&name("example.com"), &mut grants);
        assert!(grants.is_empty());
        assert_eq!(repo.selector_count(), 3);
    }

    #[test]
    fn the_grants_of_any_name_are_the_fqdn_rules_ports() {
        let repo = build(&policy(
            "[{toFQDNs: [{matchName: a.io}], toPorts: [{ports: [{port: '443', protocol: TCP}]}]}, \
              {toFQDNs: [{matchPattern: '*.b.io'}]}, \
              {toEntities: [world], toPorts: [{ports: [{port: '80'}]}]}, \
              {toFQDNs: [{matchName: c.io}], toPorts: [{}]}]",
        ));
        let grants = repo.fqdn_grants_of_any_name(CLIENT);
        let ports: Vec<&[PortRange]> = grants.iter().map(|grant| &grant.ports[..]).collect();
        assert_eq!(
            ports,
            [
                &[PortRange {
                    first: 443,
                    last: 443,
                    proto: Some(L4Proto::Tcp)
                }][..],
                &[][..],
            ]
        );
        assert!(grants.iter().all(|grant| grant.endpoint == CLIENT));
        assert!(repo.fqdn_grants_of_any_name(KUBE_DNS).is_empty());
    }

    #[test]
    fn port_ranges() {
        let all = PortRange::from(&PortProtocol {
            port: 0,
            end_port: None,
            protocol: Protocol::Tcp,
        });
        assert_eq!(
            all,
            PortRange {
                first: 0,
                last: 65535,
                proto: Some(L4Proto::Tcp)
            }
        );
        assert!(all.contains(53, L4Proto::Tcp));
        assert!(!all.contains(53, L4Proto::Udp));
        assert!(PortRange::ALL.contains(0, L4Proto::Udp));
        let range = PortRange::from(&PortProtocol {
            port: 10,
            end_port: Some(20),
            protocol: Protocol::Any,
        });
        assert!(range.contains(10, L4Proto::Udp) && range.contains(20, L4Proto::Tcp));
        assert!(!range.contains(21, L4Proto::Tcp));
    }

    #[test]
    fn repository_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<PolicyRepository>();
    }
}
