//! What the peers of L3 rules stand for in addresses. The DNS check asks whether a server's
//! address is in a peer ([`PeerAddresses::contains`]); the datapath writes each peer as prefixes
//! ([`PeerAddresses::prefixes`]). Both read this one description, built from the endpoints the
//! policy was compiled for, so an address the proxy lets a query reach is an address the
//! datapath lets a packet reach, and the other way round.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::model::{CidrRule, canonical_net};
use crate::repository::{EndpointId, EndpointInfo, Peer};

/// The node's addresses by what they are to policy.
///
/// - `host` is loopback (127.0.0.0/8 and `::1`): Warden is not told the node's other addresses,
///   and a resolver on the node (systemd-resolved on 127.0.0.53) is reached over loopback.
/// - An endpoint's addresses are in `cluster` and out of `world`. CIDR rules reach them: Cilium
///   leaves the endpoints it manages out of CIDR rules, but Warden knows only this node's, so
///   carving them out would make a verdict depend on the node a pod runs on (pods elsewhere
///   are `world`), and every CIDR rule over the pod range would cost the LPM map an entry per
///   piece around every endpoint, for every enforced endpoint.
/// - A Service synced as a peer (`peer_only`) is in `cluster`, as the pods it stands for are,
///   and is carved out of neither `world` nor CIDR rules: one by one, a cluster's scattered
///   ClusterIPs made thousands of prefixes per enforced endpoint.
#[derive(Clone, Debug, Default)]
pub struct PeerAddresses {
    by_endpoint: HashMap<EndpointId, Vec<IpAddr>>,
    /// Addresses of endpoints that are not peers only: the holes in `world`.
    endpoint_set: HashSet<IpAddr>,
    peers: HashSet<IpAddr>,
}

impl PeerAddresses {
    /// Every address is taken as the datapath keys it (an IPv4-mapped address as IPv4).
    pub fn new(endpoints: &[EndpointInfo]) -> PeerAddresses {
        let mut addresses = PeerAddresses::default();
        for endpoint in endpoints {
            let ips: Vec<IpAddr> = endpoint.ips.iter().map(IpAddr::to_canonical).collect();
            if endpoint.peer_only {
                addresses.peers.extend(ips.iter().copied());
            } else {
                addresses.endpoint_set.extend(ips.iter().copied());
            }
            addresses
                .by_endpoint
                .entry(endpoint.id)
                .or_default()
                .extend(ips);
        }
        addresses
    }

    /// Whether `ip` is one of `peer`'s addresses.
    pub fn contains(&self, peer: &Peer, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match peer {
            Peer::Cidr { cidr, except } => CidrRule {
                cidr: *cidr,
                except: except.clone(),
            }
            .canonical()
            .contains(&ip),
            Peer::World => self.in_world(ip),
            Peer::Host => is_host(ip),
            Peer::Cluster => self.in_cluster(ip),
            Peer::All => true,
            Peer::Endpoint(id) => self
                .by_endpoint
                .get(id)
                .is_some_and(|ips| ips.contains(&ip)),
        }
    }

    /// Whether `ip`, canonical, is in `world`.
    pub(crate) fn in_world(&self, ip: IpAddr) -> bool {
        !is_host(ip) && !self.endpoint_set.contains(&ip)
    }

    /// Whether `ip`, canonical, is in `cluster`.
    pub(crate) fn in_cluster(&self, ip: IpAddr) -> bool {
        is_host(ip) || self.endpoint_set.contains(&ip) || self.peers.contains(&ip)
    }

    /// The prefixes `peer` stands for, canonical ([`canonical_net`]), sorted and without
    /// repeats, as the datapath lists them: written otherwise, an entry never compares equal
    /// with what is wanted, and each pass removes and adds it again. The maps cannot say "all
    /// but", so holes are carved out as the prefixes around them.
    pub fn prefixes(&self, peer: &Peer) -> Vec<IpNet> {
        let endpoint_holes = || self.endpoint_set.iter().map(|&ip| IpNet::from(ip));
        let mut nets = match peer {
            // Holes written in the other form of the same family still apply.
            Peer::Cidr { cidr, except } => {
                let holes: Vec<IpNet> = except.iter().copied().map(canonical_net).collect();
                subtract(canonical_net(*cidr), &holes)
            }
            Peer::World => {
                let holes: Vec<IpNet> = endpoint_holes().chain(host()).collect();
                everything()
                    .into_iter()
                    .flat_map(|net| subtract(net, &holes))
                    .collect()
            }
            Peer::All => everything().to_vec(),
            Peer::Host => host().to_vec(),
            Peer::Cluster => {
                let mut nets: Vec<IpNet> = endpoint_holes()
                    .chain(self.peers.iter().map(|&ip| IpNet::from(ip)))
                    .collect();
                nets.extend(host());
                nets
            }
            Peer::Endpoint(id) => self
                .by_endpoint
                .get(id)
                .into_iter()
                .flatten()
                .map(|&ip| IpNet::from(ip))
                .collect(),
        };
        nets.sort_unstable();
        nets.dedup();
        nets
    }
}

/// The `host` entity: loopback (see [`PeerAddresses`]).
pub(crate) fn is_host(ip: IpAddr) -> bool {
    ip.is_loopback()
}

fn host() -> [IpNet; 2] {
    [
        IpNet::V4(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).unwrap_or_default()),
        IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]
}

fn everything() -> [IpNet; 2] {
    [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())]
}

/// `net` without the `except` prefixes, as a list of prefixes.
pub fn subtract(net: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    let overlapping: Vec<IpNet> = except
        .iter()
        .filter(|hole| std::mem::discriminant(*hole) == std::mem::discriminant(&net))
        .filter(|hole| hole.contains(&net.network()) || net.contains(&hole.network()))
        .copied()
        .collect();
    if overlapping.is_empty() {
        return vec![net];
    }
    if overlapping.iter().any(|hole| hole.contains(&net)) {
        return Vec::new();
    }
    match net.subnets(net.prefix_len() + 1) {
        Ok(halves) => halves
            .flat_map(|half| subtract(half, &overlapping))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Labels;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn endpoint(id: u32, ips: &[&str], peer_only: bool) -> EndpointInfo {
        EndpointInfo {
            id: EndpointId(id),
            name: format!("e{id}"),
            namespace: "default".into(),
            labels: Labels::default(),
            ips: ips.iter().map(|text| ip(text)).collect(),
            peer_only,
        }
    }

    fn lab() -> PeerAddresses {
        PeerAddresses::new(&[
            endpoint(1, &["10.244.0.5", "fd00::5"], false),
            endpoint(2, &["::ffff:10.244.0.6"], false),
            endpoint(3, &["10.96.0.10"], true),
            endpoint(4, &["127.0.0.1"], false),
        ])
    }

    fn peers() -> Vec<Peer> {
        vec![
            Peer::Cidr {
                cidr: net("10.0.0.0/8"),
                except: vec![net("10.96.0.0/12")],
            },
            Peer::Cidr {
                cidr: net("::ffff:10.244.0.0/112"),
                except: Vec::new(),
            },
            Peer::Cidr {
                cidr: net("127.0.0.0/8"),
                except: Vec::new(),
            },
            Peer::Cidr {
                cidr: net("fd00::/64"),
                except: Vec::new(),
            },
            Peer::World,
            Peer::Host,
            Peer::Cluster,
            Peer::All,
            Peer::Endpoint(EndpointId(1)),
            Peer::Endpoint(EndpointId(2)),
            Peer::Endpoint(EndpointId(3)),
            Peer::Endpoint(EndpointId(4)),
            Peer::Endpoint(EndpointId(9)),
        ]
    }

    /// Addresses at every edge the lab and the peers have: each endpoint's and its neighbours,
    /// loopback's, the prefixes' and holes' ends, in both families and v4-mapped.
    fn probes() -> Vec<IpAddr> {
        let mut probes = Vec::new();
        for text in [
            "10.244.0.4",
            "10.244.0.5",
            "10.244.0.6",
            "10.244.0.7",
            "10.96.0.9",
            "10.96.0.10",
            "10.96.0.11",
            "10.95.255.255",
            "10.96.0.0",
            "10.111.255.255",
            "10.112.0.0",
            "10.0.0.0",
            "10.255.255.255",
            "9.255.255.255",
            "11.0.0.0",
            "127.0.0.0",
            "127.0.0.1",
            "127.0.0.2",
            "127.0.0.53",
            "127.255.255.255",
            "128.0.0.0",
            "126.255.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "8.8.8.8",
        ] {
            let v4: Ipv4Addr = text.parse().unwrap();
            probes.push(IpAddr::V4(v4));
            probes.push(IpAddr::V6(v4.to_ipv6_mapped()));
        }
        for text in [
            "fd00::4",
            "fd00::5",
            "fd00::6",
            "fd00::1:0",
            "::1",
            "::2",
            "::",
            "2001:db8::1",
        ] {
            probes.push(ip(text));
        }
        probes
    }

    /// The DNS check and the datapath read one description: for every peer, an address is in
    /// the peer exactly when one of its prefixes holds it (as the datapath's longest-prefix
    /// lookup takes it, IPv4-mapped as IPv4).
    #[test]
    fn the_check_and_the_prefixes_agree() {
        let addresses = lab();
        for peer in peers() {
            let prefixes = addresses.prefixes(&peer);
            for probe in probes() {
                let in_prefixes = prefixes
                    .iter()
                    .any(|net| net.contains(&probe.to_canonical()));
                assert_eq!(
                    addresses.contains(&peer, probe),
                    in_prefixes,
                    "{peer:?} and {probe}: prefixes {prefixes:?}"
                );
            }
        }
    }

    /// CIDR rules reach the node's endpoints (Warden cannot leave out those of other nodes, as
    /// Cilium does), loopback and the Services synced as peers, and cost the map one entry
    /// each, however many endpoints fall inside.
    #[test]
    fn cidr_rules_reach_every_address_they_cover() {
        let addresses = lab();
        let cidr = |text: &str| Peer::Cidr {
            cidr: net(text),
            except: Vec::new(),
        };
        for (rule, address) in [
            ("10.0.0.0/8", "10.244.0.5"),
            ("10.244.0.6/32", "::ffff:10.244.0.6"),
            ("fd00::/64", "fd00::5"),
            ("10.0.0.0/8", "10.96.0.10"),
            ("127.0.0.1/32", "127.0.0.1"),
        ] {
            assert!(
                addresses.contains(&cidr(rule), ip(address)),
                "{rule} {address}"
            );
        }
        assert_eq!(addresses.prefixes(&cidr("10.0.0.0/8")), [net("10.0.0.0/8")]);
    }

    /// Every ClusterIP synced as a peer was carved out of `world`: with a cluster's Services
    /// scattered over 10.96.0.0/12, thousands of prefixes per enforced endpoint. In `cluster`
    /// a peer is, as the pods it stands for are.
    #[test]
    fn peers_are_not_carved_out_of_world() {
        let pods = [endpoint(1, &["10.244.0.5"], false)];
        let mut with_services = pods.to_vec();
        for n in 0..50u8 {
            let ip = format!("10.{}.{n}.{}", 96 + n % 16, n.wrapping_mul(37));
            with_services.push(endpoint(100 + u32::from(n), &[&ip], true));
        }
        let world =
            |endpoints: &[EndpointInfo]| PeerAddresses::new(endpoints).prefixes(&Peer::World);
        assert_eq!(world(&with_services), world(&pods));
        let cluster = PeerAddresses::new(&with_services).prefixes(&Peer::Cluster);
        assert!(cluster.contains(&net("10.96.0.0/32")), "{cluster:?}");
    }

    /// Written v4-mapped, a prefix was removed and added again at every pass (the maps list it
    /// as IPv4), and an IPv4 hole left it whole.
    #[test]
    fn v4_mapped_prefixes_are_taken_as_ipv4() {
        let peer = Peer::Cidr {
            cidr: net("::ffff:10.0.0.0/104"),
            except: vec![net("10.128.0.0/9")],
        };
        assert_eq!(
            PeerAddresses::default().prefixes(&peer),
            [net("10.0.0.0/9")]
        );
    }

    #[test]
    fn except_prefixes_are_carved_out() {
        let mut parts = subtract(net("10.0.0.0/8"), &[net("10.96.0.0/12")]);
        parts.sort();
        assert_eq!(parts.len(), 4);
        assert!(
            parts
                .iter()
                .all(|part| !part.contains(&net("10.96.0.1/32").network()))
        );
        assert!(
            parts
                .iter()
                .any(|part| part.contains(&net("10.95.0.1/32").network()))
        );
        assert!(
            parts
                .iter()
                .any(|part| part.contains(&net("10.112.0.1/32").network()))
        );
        assert_eq!(subtract(net("10.1.0.0/16"), &[net("10.0.0.0/8")]), vec![]);
        assert_eq!(
            subtract(net("10.1.0.0/16"), &[net("::/0")]),
            vec![net("10.1.0.0/16")]
        );
    }
}
