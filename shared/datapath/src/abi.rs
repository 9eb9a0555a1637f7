//! Byte-for-byte mirrors of `bpf/warden.h`, the map names, and address conversions.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields (so no byte is left
//! uninitialised and hash keys compare equal when they should) and a compile-time size check
//! against the C layout. `Pod` impls live in [`crate::sys`], the crate's only unsafe module.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// `WARDEN_LAYOUT_VERSION`: maps are pinned under `<bpffs>/v<N>/`.
pub(crate) const LAYOUT_VERSION: u32 = 1;

pub(crate) const EP_ENFORCED: u32 = 1;
pub(crate) const EP_REDIRECT_DNS: u32 = 2;

pub(crate) const AF_INET: u8 = 2;

pub(crate) const CIDR_MAX_RULES: usize = 8;
pub(crate) const REUSEPORT_INSTANCES: u32 = 2;
/// `WARDEN_REUSEPORT_SLOTS`, `WARDEN_REUSEPORT_SPREAD`: an instance's sockets of one slot.
pub(crate) const REUSEPORT_SLOTS: u32 = 4 * REUSEPORT_INSTANCES;
pub(crate) const REUSEPORT_SPREAD: u32 = 64;

/// `WARDEN_REDIRECT_SLOT_BITS`, `WARDEN_REDIRECT_GOLDEN`: the redirect slots' size and hash.
pub(crate) const REDIRECT_SLOT_BITS: u32 = 14;
pub(crate) const REDIRECT_SLOTS: usize = 1 << REDIRECT_SLOT_BITS;
pub(crate) const REDIRECT_GOLDEN: u32 = 0x9E37_79B1;
/// `sizeof(struct warden_redirect_slot)`, read word by word in [`crate::slots`].
pub(crate) const REDIRECT_SLOT_WORDS: usize = 8;
/// `BPF_F_MMAPABLE`, which the slots map must have been created with.
pub(crate) const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Map names: the ABI between this crate and the programs.
pub(crate) mod map {
    pub(crate) const ENDPOINTS: &str = "endpoints";
    pub(crate) const DNS_TARGETS: &str = "dns_targets";
    pub(crate) const SOCK_ORIGINS: &str = "sock_origins";
    /// Read only, for sockets a release before `sock_origins` redirected.
    pub(crate) const SOCK_ORIG: &str = "sock_orig";
    pub(crate) const REDIRECT_RECORDS: &str = "redirect_records";
    pub(crate) const REDIRECT_SLOTS: &str = "redirect_slots";
    pub(crate) const FQDN_ALLOW: &str = "fqdn_allow";
    pub(crate) const CIDR_ALLOW: &str = "cidr_allow";
    pub(crate) const LAST_SEEN: &str = "last_seen";
    pub(crate) const EVENTS: &str = "events";
    pub(crate) const REUSEPORT_SOCKETS: &str = "reuseport_sockets";
    pub(crate) const REUSEPORT_CONFIG: &str = "reuseport_config";
    pub(crate) const INBOUND_CONNS: &str = "inbound_conns";
    pub(crate) const UDP_SERVICES: &str = "udp_services";
    pub(crate) const UDP_PEERS: &str = "udp_peers";
    pub(crate) const NODE_CONFIG: &str = "node_config";
    pub(crate) const REUSEPORT_SPREAD: &str = "reuseport_spread";
    pub(crate) const REUSEPORT_SPREAD_COUNT: &str = "reuseport_spread_count";
}

/// `struct warden_endpoint`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawEndpoint {
    pub endpoint_id: u32,
    pub flags: u32,
}

/// `struct warden_dns_target`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawDnsTarget {
    pub addr4: [u8; 4],
    pub port4: u16,
    pub pad0: u16,
    pub addr6: [u8; 16],
    pub port6: u16,
    pub pad1: u16,
}

/// `struct warden_sockaddr`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawSockaddr {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub pad: u8,
}

/// `struct warden_sock_orig` (private to the programs; mirrored for the layout check).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawSockOrig {
    pub orig: RawSockaddr,
    pub target: RawSockaddr,
}

/// `struct warden_client_key`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawClientKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// `struct warden_redirect_record`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawRedirectRecord {
    pub cgroup_id: u64,
    pub time_ns: u64,
    pub orig: RawSockaddr,
    pub pad: u32,
}

/// `struct warden_fqdn_key`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct RawFqdnKey {
    pub endpoint_id: u32,
    pub proto: u8,
    pub pad: u8,
    pub port: u16,
    pub addr: [u8; 16],
}

/// `struct warden_fqdn_value`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawFqdnValue {
    pub expires_at: u64,
    pub flags: u32,
    pub pad: u32,
}

/// The data part of `struct warden_cidr_key` (aya's `lpm_trie::Key` adds the prefixlen).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawCidrData {
    pub endpoint_id: u32,
    pub addr: [u8; 16],
}

/// `struct warden_port_rule`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawPortRule {
    pub proto: u8,
    pub pad0: u8,
    pub first: u16,
    pub last: u16,
    pub pad1: u16,
}

/// `struct warden_cidr_value`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawCidrValue {
    pub prefixlen: u32,
    pub count: u32,
    pub rules: [RawPortRule; CIDR_MAX_RULES],
}

/// `struct warden_last_seen_key`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawLastSeenKey {
    pub endpoint_id: u32,
    pub pad: u32,
    pub addr: [u8; 16],
}

/// `struct warden_reuseport_config`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawReuseportConfig {
    pub preferred: u32,
    pub enabled: u32,
}

/// `struct warden_node_config`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawNodeConfig {
    pub proxy_netns_cookie: u64,
}

/// `sizeof(struct warden_drop_event)`; parsed field by field in [`crate::events`].
pub(crate) const DROP_EVENT_SIZE: usize = 64;

const _: () = assert!(size_of::<RawEndpoint>() == 8);
const _: () = assert!(size_of::<RawDnsTarget>() == 28);
const _: () = assert!(size_of::<RawSockaddr>() == 20);
const _: () = assert!(size_of::<RawSockOrig>() == 40);
const _: () = assert!(size_of::<RawClientKey>() == 20);
const _: () = assert!(size_of::<RawRedirectRecord>() == 40);
const _: () = assert!(size_of::<RawFqdnKey>() == 24);
const _: () = assert!(size_of::<RawFqdnValue>() == 16);
const _: () = assert!(size_of::<aya::maps::lpm_trie::Key<RawCidrData>>() == 24);
const _: () = assert!(size_of::<RawPortRule>() == 8);
const _: () = assert!(size_of::<RawCidrValue>() == 72);
const _: () = assert!(size_of::<RawLastSeenKey>() == 24);
const _: () = assert!(size_of::<RawReuseportConfig>() == 8);
const _: () = assert!(size_of::<RawNodeConfig>() == 8);

/// An address as the maps store it: 16 bytes, IPv4 v4-mapped.
pub(crate) fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`addr16`]: v4-mapped addresses come back as IPv4 (a real IPv6 server or
/// client never has a v4-mapped address, and callers want to connect to what they get).
pub(crate) fn ip_of(addr: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(addr).to_canonical()
}

pub(crate) fn socket_addr_of(addr: [u8; 16], port: u16) -> SocketAddr {
    match ip_of(addr) {
        IpAddr::V4(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
        IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
    }
}

/// Whether a 16-byte map address is an IPv4 one.
pub(crate) fn is_v4(addr: [u8; 16]) -> bool {
    Ipv6Addr::from(addr).to_ipv4_mapped().is_some()
}

pub(crate) fn ipv4_of(addr: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(addr)
}

/// (map, key size, value size) as the kernel reports them for each pinned map; checked before
/// reusing pins, since the loader would otherwise reuse a map of another layout silently.
pub(crate) const MAP_SIZES: [(&str, u32, u32); 18] = [
    (map::ENDPOINTS, 8, size_of::<RawEndpoint>() as u32),
    (map::DNS_TARGETS, 4, size_of::<RawDnsTarget>() as u32),
    // Socket storage: an int key (the socket).
    (map::SOCK_ORIGINS, 4, size_of::<RawSockOrig>() as u32),
    (map::SOCK_ORIG, 8, size_of::<RawSockOrig>() as u32),
    (
        map::REDIRECT_RECORDS,
        size_of::<RawClientKey>() as u32,
        size_of::<RawRedirectRecord>() as u32,
    ),
    (map::REDIRECT_SLOTS, 4, (REDIRECT_SLOT_WORDS * 8) as u32),
    (
        map::FQDN_ALLOW,
        size_of::<RawFqdnKey>() as u32,
        size_of::<RawFqdnValue>() as u32,
    ),
    (map::CIDR_ALLOW, 24, size_of::<RawCidrValue>() as u32),
    (map::LAST_SEEN, size_of::<RawLastSeenKey>() as u32, 8),
    (map::EVENTS, 0, 0),
    (map::REUSEPORT_SOCKETS, 4, 4),
    // Socket storage: an int key (the socket), `struct warden_inbound` (peer, port).
    (map::INBOUND_CONNS, 4, 20),
    (map::UDP_SERVICES, 4, 4),
    // `struct warden_udp_peer` (socket cookie, peer, peer port) → boot-time ns.
    (map::UDP_PEERS, 32, 8),
    (
        map::REUSEPORT_CONFIG,
        4,
        size_of::<RawReuseportConfig>() as u32,
    ),
    (map::NODE_CONFIG, 4, size_of::<RawNodeConfig>() as u32),
    (map::REUSEPORT_SPREAD, 4, 4),
    (map::REUSEPORT_SPREAD_COUNT, 4, 4),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The loader checks a pinned map's sizes before reusing it only for the maps this table
    /// names: a map added to the programs and not here would be reused whatever its layout.
    #[test]
    fn every_map_of_the_programs_has_its_sizes_checked() {
        let object = aya_obj::Object::parse(crate::OBJECT).expect("the embedded object parses");
        let mut in_object: Vec<(String, u32, u32)> = object
            .maps
            .iter()
            // `.rodata`, `.bss` and the like: the programs' own data, never pinned.
            .filter(|(name, _)| !name.starts_with('.'))
            .map(|(name, map)| (name.clone(), map.key_size(), map.value_size()))
            .collect();
        in_object.sort();
        let mut listed: Vec<(String, u32, u32)> = MAP_SIZES
            .iter()
            .map(|(name, key, value)| ((*name).to_owned(), *key, *value))
            .collect();
        listed.sort();
        assert_eq!(in_object, listed);
    }
}
