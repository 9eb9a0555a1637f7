//! The typed view of the maps that callers use: options, endpoints, allow keys, port rules,
//! redirect records and the cleanup report.

use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;

/// Where the datapath attaches and pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathOptions {
    /// The cgroup v2 directory whose whole subtree the programs act on. `None`: detected
    /// (`/sys/fs/cgroup` if it is cgroup2, else `/sys/fs/cgroup/unified`).
    pub cgroup_root: Option<PathBuf>,
    /// The bpffs directory that holds Warden's pins (maps under `v<N>/`, links under `links/`).
    pub bpffs: PathBuf,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            cgroup_root: None,
            bpffs: PathBuf::from(crate::DEFAULT_BPFFS),
        }
    }
}

/// An enrolled cgroup's entry in the `endpoints` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointEntry {
    /// The endpoint the cgroup belongs to (keys the allow maps and DNS targets).
    pub endpoint_id: u32,
    /// Default-deny egress: only what the allow maps allow passes.
    pub enforced: bool,
    /// Port-53 traffic goes to the endpoint's DNS target.
    pub redirect_dns: bool,
}

/// Where an endpoint's port-53 traffic is redirected, per family (`None`: not redirected).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsTarget {
    /// Target of IPv4 (and v4-mapped) destinations.
    pub v4: Option<SocketAddrV4>,
    /// Target of IPv6 destinations.
    pub v6: Option<SocketAddrV6>,
}

/// One exact entry of `fqdn_allow`: (endpoint, IP, protocol or any, port or any).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnKey {
    /// The endpoint allowed to reach `ip`.
    pub endpoint_id: u32,
    /// The destination address.
    pub ip: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, ...); `None` = any protocol.
    pub proto: Option<u8>,
    /// Destination port; `None` = any port.
    pub port: Option<u16>,
}

impl FqdnKey {
    /// A key for `ip` with any protocol and any port.
    pub fn any(endpoint_id: u32, ip: IpAddr) -> Self {
        Self {
            endpoint_id,
            ip,
            proto: None,
            port: None,
        }
    }
}

/// An L4 rule of a CIDR entry: a protocol (or any) and an inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    /// IP protocol number; `None` = any.
    pub proto: Option<u8>,
    /// First port, inclusive.
    pub first: u16,
    /// Last port, inclusive.
    pub last: u16,
}

impl PortRule {
    /// Every protocol and port. Packets without ports (ICMP, fragments, IPv6 packets with
    /// extension headers) are only allowed by a rule covering every port.
    pub const ANY: PortRule = PortRule {
        proto: None,
        first: 0,
        last: u16::MAX,
    };

    /// One port of one protocol.
    pub fn port(proto: u8, port: u16) -> Self {
        Self {
            proto: Some(proto),
            first: port,
            last: port,
        }
    }

    /// A port range (inclusive) of a protocol, or of any protocol.
    pub fn range(proto: Option<u8>, first: u16, last: u16) -> Self {
        Self { proto, first, last }
    }

    /// Whether every packet `other` allows, this rule allows too.
    pub fn covers(&self, other: &PortRule) -> bool {
        self.proto.is_none_or(|own| other.proto == Some(own))
            && self.first <= other.first
            && other.last <= self.last
    }
}

/// Who asked a redirected DNS query, and which server it was meant for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectRecord {
    /// The enrolled cgroup the client socket belongs to (its own or nearest enrolled ancestor).
    pub cgroup_id: u64,
    /// The destination the client addressed (IPv4 given as V4 even for dual-stack sockets);
    /// `None` when it addressed its DNS target (the proxy) itself.
    pub original: Option<SocketAddr>,
}

/// A redirect record looked up, and where it was looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectLookup {
    pub record: Option<RedirectRecord>,
    pub source: RedirectSource,
}

/// Where a redirect record was looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectSource {
    /// The memory-mapped slots answered (found, or never written): no system call.
    Slot,
    /// The slots could not tell (another key there, a writer inside, not trusted yet, none
    /// pinned): one `bpf()` lookup of the LRU map.
    Map,
}

impl RedirectSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectSource::Slot => "slot",
            RedirectSource::Map => "map",
        }
    }
}

/// What [`crate::Datapath::cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Links detached and unpinned (program name per link pin).
    pub links_detached: Vec<String>,
    /// Map and program pins removed.
    pub pins_removed: Vec<PathBuf>,
    /// Whether the bpffs directory itself was removed (it is kept if it holds foreign files).
    pub dir_removed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_rule_covers_what_its_protocol_and_range_take_in() {
        let tcp_all = PortRule::range(Some(6), 0, u16::MAX);
        let web = PortRule::range(Some(6), 80, 443);
        assert!(PortRule::ANY.covers(&tcp_all) && PortRule::ANY.covers(&PortRule::port(1, 0)));
        assert!(tcp_all.covers(&web) && web.covers(&PortRule::port(6, 443)));
        assert!(web.covers(&web), "a rule covers itself");
        assert!(!web.covers(&tcp_all) && !web.covers(&PortRule::port(6, 444)));
        assert!(!tcp_all.covers(&PortRule::port(17, 53)), "another protocol");
        assert!(
            !tcp_all.covers(&PortRule::ANY),
            "any protocol is more than TCP's"
        );
    }
}
