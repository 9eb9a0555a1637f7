//! Typed operations on the pinned maps.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, ReusePortSockArray, SkStorage};
use aya::programs::{SkReuseport, SkReuseportAttachType};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::sys::socket::{
    AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
};

use crate::abi::{
    self, EP_ENFORCED, EP_REDIRECT_DNS, RawCidrData, RawCidrValue, RawClientKey, RawDnsTarget,
    RawEndpoint, RawFqdnKey, RawFqdnValue, RawLastSeenKey, RawPortRule, RawRedirectRecord,
    RawReuseportConfig, RawSockOrig, map,
};
use crate::events::DropEvents;
use crate::slots::{EgressPins, RedirectSlots, SlotRead};
use crate::{
    Datapath, DatapathError, DnsTarget, EndpointEntry, FqdnKey, PortRule, RedirectLookup,
    RedirectRecord, RedirectSource, clock, loader, sys,
};

/// The open map handles of one process.
pub(crate) struct Maps {
    bpffs: PathBuf,
    dir: PathBuf,
    endpoints: Mutex<HashMap<MapData, u64, RawEndpoint>>,
    dns_targets: Mutex<HashMap<MapData, u32, RawDnsTarget>>,
    /// Read only here, once per query by every worker, so not behind a lock: lookups take
    /// `&self`, and the kernel serializes what needs it.
    redirect_records: HashMap<MapData, RawClientKey, RawRedirectRecord>,
    /// The same records where the egress program also publishes them, mapped into our memory;
    /// `None` when the pins predate them (the LRU map answers then).
    redirect_slots: Option<RedirectSlots>,
    fqdn_allow: Mutex<HashMap<MapData, RawFqdnKey, RawFqdnValue>>,
    /// The same map, for walks: a walk of a large map takes two system calls an entry, and the
    /// DNS path, which writes allow entries through the lock, must not wait for one.
    fqdn_allow_walker: HashMap<MapData, RawFqdnKey, RawFqdnValue>,
    cidr_allow: Mutex<LpmTrie<MapData, RawCidrData, RawCidrValue>>,
    last_seen: Mutex<HashMap<MapData, RawLastSeenKey, u64>>,
    reuseport_sockets: Mutex<ReusePortSockArray<MapData>>,
    reuseport_config: Mutex<Array<MapData, RawReuseportConfig>>,
    /// `None` when the pins predate it (an older agent's): a process's sockets then take the
    /// port's queries on the one each slot holds.
    reuseport_spread: Mutex<Option<Spread>>,
    /// Opened on first use: only processes serving DNS attach it.
    reuseport_program: Mutex<Option<SkReuseport>>,
    /// The kernel's ids of the maps this process opened: see [`Datapath::pins_replaced`].
    opened_ids: OpenedIds,
}

/// The kernel's id of the map pinned as `name` in `dir`: `Ok(None)` when nothing is pinned there.
fn pinned_id(dir: &Path, name: &'static str) -> Result<Option<u32>, MapError> {
    match MapData::from_pin(dir.join(name)) {
        Ok(data) => data.info().map(|info| Some(info.id())),
        Err(MapError::SyscallError(error)) if error.io_error.kind() == io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

impl fmt::Debug for Maps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maps")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The maps a process opened, by name, with the kernel's id of each (see
/// [`Datapath::pins_replaced`]).
type OpenedIds = Vec<(&'static str, u32)>;

/// Opens the map pinned as `name`, noting its id in `opened`: read from the map opened, so
/// that a replacement of the pin meanwhile shows at the first check.
fn open_map(dir: &Path, name: &'static str, opened: &mut OpenedIds) -> Result<Map, DatapathError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::NotPinned {
        map: name,
        path: path.clone(),
        source,
    })?;
    let id = data
        .info()
        .map_err(|e| DatapathError::map(name, "open", e))?
        .id();
    opened.push((name, id));
    Map::from_map_data(data).map_err(|e| DatapathError::map(name, "open", e))
}

/// An instance's sockets of each reuseport slot, over which the program spreads the slot's
/// clients (`reuseport_spread`), and how many each slot has (`reuseport_spread_count`).
struct Spread {
    sockets: ReusePortSockArray<MapData>,
    counts: Array<MapData, u32>,
}

/// The spread maps, if pinned: programs older than them pinned none.
fn open_spread(dir: &Path, opened: &mut OpenedIds) -> Result<Option<Spread>, DatapathError> {
    if !dir.join(map::REUSEPORT_SPREAD).exists() || !dir.join(map::REUSEPORT_SPREAD_COUNT).exists()
    {
        tracing::debug!(dir = %dir.display(), "no reuseport spread pinned: one DNS socket per process and slot");
        return Ok(None);
    }
    Ok(Some(Spread {
        sockets: typed_unlocked(dir, map::REUSEPORT_SPREAD, opened)?,
        counts: typed_unlocked(dir, map::REUSEPORT_SPREAD_COUNT, opened)?,
    }))
}

/// Converts a pinned map into its typed wrapper, which checks key and value sizes against
/// the kernel's view of the map.
fn typed<T: TryFrom<Map, Error = MapError>>(
    dir: &Path,
    name: &'static str,
    opened: &mut OpenedIds,
) -> Result<Mutex<T>, DatapathError> {
    typed_unlocked(dir, name, opened).map(Mutex::new)
}

fn typed_unlocked<T: TryFrom<Map, Error = MapError>>(
    dir: &Path,
    name: &'static str,
    opened: &mut OpenedIds,
) -> Result<T, DatapathError> {
    let map = open_map(dir, name, opened)?;
    T::try_from(map).map_err(|e| DatapathError::map(name, "open", e))
}

/// Maps the pinned redirect slots, if the programs that created the pins had them and they are
/// the slots this build reads. Anything else is no reason to go without the datapath: the LRU
/// map answers every lookup then, and the log says why.
fn open_slots(bpffs: &Path, dir: &Path) -> Result<Option<RedirectSlots>, DatapathError> {
    if !cfg!(target_pointer_width = "64") {
        return Ok(None);
    }
    let path = dir.join(map::REDIRECT_SLOTS);
    let data = match MapData::from_pin(&path) {
        Ok(data) => data,
        Err(MapError::SyscallError(error)) if error.io_error.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(path = %path.display(), "no redirect slots pinned: every redirect record is looked up");
            return Ok(None);
        }
        Err(source) => {
            return Err(DatapathError::NotPinned {
                map: map::REDIRECT_SLOTS,
                path,
                source,
            });
        }
    };
    match map_slots(&data, bpffs) {
        Ok(slots) => Ok(Some(slots)),
        Err(reason) => {
            tracing::warn!(path = %path.display(), %reason, "not reading the redirect slots: every redirect record is looked up");
            Ok(None)
        }
    }
}

/// Checks that the pinned map is the slots this build reads (an mmapable array of as many
/// slots of the same size) and maps it.
fn map_slots(data: &MapData, bpffs: &Path) -> Result<RedirectSlots, String> {
    let info = data.info().map_err(|error| error.to_string())?;
    let value_size = (abi::REDIRECT_SLOT_WORDS * 8) as u32;
    let is_array = matches!(info.map_type(), Ok(aya::maps::MapType::Array));
    if !is_array
        || info.key_size() != 4
        || info.value_size() != value_size
        || info.max_entries() as usize != abi::REDIRECT_SLOTS
        || info.map_flags() & abi::BPF_F_MMAPABLE == 0
    {
        return Err(format!(
            "another layout: {:?}, key {} B, value {} B, {} entries, flags {:#x} (expected an \
             mmapable array of {} entries of {value_size} B)",
            info.map_type(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
            abi::REDIRECT_SLOTS,
        ));
    }
    let memory = sys::MappedWords::map(
        data.fd(),
        abi::REDIRECT_SLOTS * abi::REDIRECT_SLOT_WORDS * 8,
    )
    .map_err(|error| format!("mmap: {error}"))?;
    RedirectSlots::new(
        memory,
        info.id(),
        EgressPins {
            link: loader::egress_link_path(bpffs),
            program: loader::egress_prog_path(bpffs),
        },
    )
    .map_err(|error| format!("starting its watcher thread: {error}"))
}

fn endpoint_entry_of(raw: RawEndpoint) -> EndpointEntry {
    EndpointEntry {
        endpoint_id: raw.endpoint_id,
        enforced: raw.flags & EP_ENFORCED != 0,
        redirect_dns: raw.flags & EP_REDIRECT_DNS != 0,
    }
}

/// The oldest a redirect record in the map is taken at: the program renews an unchanged one's
/// stamp once a second while its client sends, so an older one was left by a socket long gone,
/// and the sender now on that address and port is another (one of a cgroup not enrolled, which
/// writes no record).
const RECORD_MAX_AGE_NS: u64 = 5_000_000_000;

/// Whether a record stamped `time_ns` is recent at `now_ns` (both boot time).
fn recent(time_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(time_ns) <= RECORD_MAX_AGE_NS
}

fn redirect_record_of(r: RawRedirectRecord) -> RedirectRecord {
    RedirectRecord {
        cgroup_id: r.cgroup_id,
        // Family 0: the client sent to the target itself (see `record_redirect`).
        original: (r.orig.family != 0).then(|| abi::socket_addr_of(r.orig.addr, r.orig.port)),
    }
}

fn lock<'a, T>(m: &'a Mutex<T>, name: &'static str) -> Result<MutexGuard<'a, T>, DatapathError> {
    m.lock().map_err(|_| DatapathError::Poisoned { map: name })
}

/// ENOENT from a map syscall: the key is absent.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A lookup that maps "absent" to `None`.
fn found<V>(name: &'static str, r: Result<V, MapError>) -> Result<Option<V>, DatapathError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(DatapathError::map(name, "lookup", e)),
    }
}

/// A removal that accepts an absent key.
fn removed(name: &'static str, r: Result<(), MapError>) -> Result<(), DatapathError> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(DatapathError::map(name, "remove", e)),
    }
}

impl Maps {
    pub(crate) fn open(bpffs: &Path) -> Result<Self, DatapathError> {
        let dir = loader::maps_dir(bpffs);
        // The sockets' original servers are the programs' own; opening them typed only checks
        // their layout. Pins of an agent older than `sock_origins` have none: a dnsproxy
        // upgraded first opens them all the same.
        let mut opened = OpenedIds::new();
        if dir.join(map::SOCK_ORIGINS).exists() {
            typed::<SkStorage<MapData, RawSockOrig>>(&dir, map::SOCK_ORIGINS, &mut opened)?;
        }
        typed::<HashMap<MapData, u64, RawSockOrig>>(&dir, map::SOCK_ORIG, &mut opened)?;
        Ok(Self {
            endpoints: typed(&dir, map::ENDPOINTS, &mut opened)?,
            dns_targets: typed(&dir, map::DNS_TARGETS, &mut opened)?,
            redirect_records: typed_unlocked(&dir, map::REDIRECT_RECORDS, &mut opened)?,
            redirect_slots: open_slots(bpffs, &dir)?,
            fqdn_allow: typed(&dir, map::FQDN_ALLOW, &mut opened)?,
            fqdn_allow_walker: typed_unlocked(&dir, map::FQDN_ALLOW, &mut opened)?,
            cidr_allow: typed(&dir, map::CIDR_ALLOW, &mut opened)?,
            last_seen: typed(&dir, map::LAST_SEEN, &mut opened)?,
            reuseport_sockets: typed(&dir, map::REUSEPORT_SOCKETS, &mut opened)?,
            reuseport_config: typed(&dir, map::REUSEPORT_CONFIG, &mut opened)?,
            reuseport_spread: Mutex::new(open_spread(&dir, &mut opened)?),
            reuseport_program: Mutex::new(None),
            opened_ids: opened,
            bpffs: bpffs.to_path_buf(),
            dir,
        })
    }

    pub(crate) fn bpffs(&self) -> &Path {
        &self.bpffs
    }
}

fn fqdn_raw(key: &FqdnKey) -> RawFqdnKey {
    RawFqdnKey {
        endpoint_id: key.endpoint_id,
        proto: key.proto.unwrap_or(0),
        pad: 0,
        port: key.port.unwrap_or(0),
        addr: abi::addr16(key.ip),
    }
}

fn fqdn_typed(raw: &RawFqdnKey) -> FqdnKey {
    FqdnKey {
        endpoint_id: raw.endpoint_id,
        ip: abi::ip_of(raw.addr),
        proto: (raw.proto != 0).then_some(raw.proto),
        port: (raw.port != 0).then_some(raw.port),
    }
}

/// The trie key of (endpoint, net): the endpoint's 32 bits, then the address bits (IPv4 nets
/// count the 96 bits of the ::ffff: prefix).
fn cidr_key(endpoint_id: u32, net: IpNet) -> LpmKey<RawCidrData> {
    let net = net.trunc();
    let bits = match net {
        IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
        IpNet::V6(n) => u32::from(n.prefix_len()),
    };
    LpmKey::new(
        32 + bits,
        RawCidrData {
            endpoint_id,
            addr: abi::addr16(net.network()),
        },
    )
}

/// The keys matching `keep`, collected before any removal (removing while iterating would
/// restart or skip the kernel's key walk).
fn collect_keys<K>(
    name: &'static str,
    keys: impl Iterator<Item = Result<K, MapError>>,
    keep: impl Fn(&K) -> bool,
) -> Result<Vec<K>, DatapathError> {
    let mut out = Vec::new();
    for k in keys {
        let k = k.map_err(|e| DatapathError::map(name, "iterate", e))?;
        if keep(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// `BPF_NOEXIST`
const BPF_NOEXIST: u64 = 1;

/// The key of the IPv4 /0 of an endpoint: ::ffff:0:0/96.
fn v4_barrier(endpoint_id: u32) -> LpmKey<RawCidrData> {
    cidr_key(endpoint_id, IpNet::V4(Ipv4Net::default()))
}

fn is_v4_root(key: &LpmKey<RawCidrData>) -> bool {
    key.prefix_len() == 32 + 96 && abi::is_v4(key.data().addr)
}

/// What the program continues with after the entry at `key`: its own prefix length, or 0
/// (stop) at the IPv4 root, below which only IPv6 prefixes lie.
fn walk_on(key: &LpmKey<RawCidrData>) -> u32 {
    if is_v4_root(key) { 0 } else { key.prefix_len() }
}

/// Whether an IPv6 net contains the v4-mapped range ::ffff:0:0/96 (e.g. ::/0).
fn covers_v4_mapped(net: IpNet) -> bool {
    match net.trunc() {
        IpNet::V4(_) => false,
        IpNet::V6(n) => n.prefix_len() <= 96 && n.contains(&Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()),
    }
}

fn cidr_net(key: &LpmKey<RawCidrData>) -> Option<(u32, IpNet)> {
    let data = key.data();
    let bits = key.prefix_len().checked_sub(32)?;
    let net = if abi::is_v4(data.addr) && bits >= 96 {
        let ip = match abi::ip_of(data.addr) {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => return None,
        };
        IpNet::V4(Ipv4Net::new(ip, u8::try_from(bits - 96).ok()?).ok()?)
    } else {
        IpNet::V6(Ipv6Net::new(data.addr.into(), u8::try_from(bits).ok()?).ok()?)
    };
    Some((data.endpoint_id, net))
}

impl Datapath {
    /// Whether any map pinned at this datapath's folder is no longer the one it has open: the
    /// agent's `cleanup` and a new start (or anyone) pinned new ones in their place, and what
    /// this process writes would go into maps no program reads. A map no longer pinned counts
    /// as replaced too; one whose pin cannot be read, as not (the next write's error says it).
    pub fn pins_replaced(&self) -> bool {
        self.inner
            .opened_ids
            .iter()
            .any(|(name, opened)| match pinned_id(&self.inner.dir, name) {
                Ok(pinned) => pinned != Some(*opened),
                Err(_) => false,
            })
    }

    /// Enrolls (or re-enrolls with new flags) a cgroup as an endpoint. Sub-cgroups of an
    /// enrolled cgroup belong to it unless enrolled themselves.
    pub fn enroll(
        &self,
        cgroup_id: u64,
        endpoint_id: u32,
        enforced: bool,
        redirect_dns: bool,
    ) -> Result<(), DatapathError> {
        let mut flags = 0;
        if enforced {
            flags |= EP_ENFORCED;
        }
        if redirect_dns {
            flags |= EP_REDIRECT_DNS;
        }
        let value = RawEndpoint { endpoint_id, flags };
        lock(&self.inner.endpoints, map::ENDPOINTS)?
            .insert(cgroup_id, value, 0)
            .map_err(|e| DatapathError::map(map::ENDPOINTS, "insert", e))
    }

    /// Removes a cgroup from the endpoints (its traffic passes untouched afterwards).
    pub fn unenroll(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        removed(
            map::ENDPOINTS,
            lock(&self.inner.endpoints, map::ENDPOINTS)?.remove(&cgroup_id),
        )
    }

    /// Every enrolled cgroup.
    pub fn enrolled(&self) -> Result<Vec<(u64, EndpointEntry)>, DatapathError> {
        let endpoints = lock(&self.inner.endpoints, map::ENDPOINTS)?;
        endpoints
            .iter()
            .map(|r| {
                r.map(|(cgroup_id, raw)| (cgroup_id, endpoint_entry_of(raw)))
                    .map_err(|e| DatapathError::map(map::ENDPOINTS, "iterate", e))
            })
            .collect()
    }

    /// The enrollment of one cgroup, if it is enrolled.
    pub fn enrollment(&self, cgroup_id: u64) -> Result<Option<EndpointEntry>, DatapathError> {
        let endpoints = lock(&self.inner.endpoints, map::ENDPOINTS)?;
        found(map::ENDPOINTS, endpoints.get(&cgroup_id, 0)).map(|raw| raw.map(endpoint_entry_of))
    }

    /// Sets where the endpoint's port-53 traffic goes, per family (`None`: that family is not
    /// redirected). Both `None` removes the entry.
    pub fn set_dns_target(
        &self,
        endpoint_id: u32,
        v4: Option<SocketAddrV4>,
        v6: Option<SocketAddrV6>,
    ) -> Result<(), DatapathError> {
        let mut targets = lock(&self.inner.dns_targets, map::DNS_TARGETS)?;
        if v4.is_none() && v6.is_none() {
            return removed(map::DNS_TARGETS, targets.remove(&endpoint_id));
        }
        for port in [v4.map(|a| a.port()), v6.map(|a| a.port())]
            .into_iter()
            .flatten()
        {
            if port == 0 {
                return Err(DatapathError::Invalid {
                    map: map::DNS_TARGETS,
                    reason: "a DNS target needs a port (0 means no target)".into(),
                });
            }
        }
        let value = RawDnsTarget {
            addr4: v4.map(|a| a.ip().octets()).unwrap_or_default(),
            port4: v4.map(|a| a.port()).unwrap_or(0),
            pad0: 0,
            addr6: v6.map(|a| a.ip().octets()).unwrap_or_default(),
            port6: v6.map(|a| a.port()).unwrap_or(0),
            pad1: 0,
        };
        targets
            .insert(endpoint_id, value, 0)
            .map_err(|e| DatapathError::map(map::DNS_TARGETS, "insert", e))
    }

    /// The endpoint's DNS targets, if set.
    pub fn dns_target(&self, endpoint_id: u32) -> Result<Option<DnsTarget>, DatapathError> {
        let targets = lock(&self.inner.dns_targets, map::DNS_TARGETS)?;
        let raw = found(map::DNS_TARGETS, targets.get(&endpoint_id, 0))?;
        Ok(raw.map(|t| {
            let v4 = (t.port4 != 0).then(|| SocketAddrV4::new(abi::ipv4_of(t.addr4), t.port4));
            let v6 = (t.port6 != 0).then(|| SocketAddrV6::new(t.addr6.into(), t.port6, 0, 0));
            DnsTarget { v4, v6 }
        }))
    }

    /// Allows (endpoint, IP, proto, port) until `expires_at` (unix seconds; only garbage
    /// collection reads it, the kernel checks presence). An existing entry keeps the later of
    /// both expiries. Two writers extending the same key at once may leave the earlier of
    /// their two expiries (hash maps have no compare-and-swap from userspace); both are fresh,
    /// and the next lookup of the name extends it again.
    pub fn allow_fqdn(&self, key: FqdnKey, expires_at: u64) -> Result<(), DatapathError> {
        let raw = fqdn_raw(&key);
        let mut allow = lock(&self.inner.fqdn_allow, map::FQDN_ALLOW)?;
        if let Some(current) = found(map::FQDN_ALLOW, allow.get(&raw, 0))?
            && current.expires_at >= expires_at
        {
            return Ok(());
        }
        let value = RawFqdnValue {
            expires_at,
            flags: 0,
            pad: 0,
        };
        allow
            .insert(raw, value, 0)
            .map_err(|e| DatapathError::map(map::FQDN_ALLOW, "insert", e))
    }

    /// Removes one allow entry (absent is fine).
    pub fn revoke_fqdn(&self, key: &FqdnKey) -> Result<(), DatapathError> {
        let raw = fqdn_raw(key);
        removed(
            map::FQDN_ALLOW,
            lock(&self.inner.fqdn_allow, map::FQDN_ALLOW)?.remove(&raw),
        )
    }

    /// Removes an allow entry unless it was extended past `listed_expiry`, the expiry it had
    /// when listed: the reconciler decides on a walk of the map, and an answer for the name
    /// meanwhile (this process's or a peer's) extends it, fresh. Only the moment between
    /// this look and the removal is left to that race (hash maps have no compare-and-delete
    /// from userspace). Says whether it went.
    pub fn revoke_fqdn_unless_extended(
        &self,
        key: &FqdnKey,
        listed_expiry: u64,
    ) -> Result<bool, DatapathError> {
        let raw = fqdn_raw(key);
        let mut allow = lock(&self.inner.fqdn_allow, map::FQDN_ALLOW)?;
        match found(map::FQDN_ALLOW, allow.get(&raw, 0))? {
            Some(current) if current.expires_at <= listed_expiry => {
                removed(map::FQDN_ALLOW, allow.remove(&raw))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Every allow entry with its expiry (unix seconds). Walked without the lock the DNS path
    /// writes through: entries written meanwhile may or may not be listed.
    pub fn fqdn_entries(&self) -> Result<Vec<(FqdnKey, u64)>, DatapathError> {
        self.inner
            .fqdn_allow_walker
            .iter()
            .map(|r| {
                r.map(|(k, v)| (fqdn_typed(&k), v.expires_at))
                    .map_err(|e| DatapathError::map(map::FQDN_ALLOW, "iterate", e))
            })
            .collect()
    }

    /// Sets the L4 rules of an (endpoint, CIDR) entry, replacing earlier ones. An empty slice
    /// means every protocol and port (a CIDR rule without ports). At most 8 rules. A packet is
    /// allowed when any CIDR containing its destination allows its protocol and port (nested
    /// CIDRs are followed up to 8 deep by the program).
    pub fn set_cidr_rules(
        &self,
        endpoint_id: u32,
        net: IpNet,
        ports: &[PortRule],
    ) -> Result<(), DatapathError> {
        let ports: &[PortRule] = if ports.is_empty() {
            &[PortRule::ANY]
        } else {
            ports
        };
        if ports.len() > abi::CIDR_MAX_RULES {
            return Err(DatapathError::Invalid {
                map: map::CIDR_ALLOW,
                reason: format!(
                    "{} port rules for {net} of endpoint {endpoint_id}; at most {}",
                    ports.len(),
                    abi::CIDR_MAX_RULES
                ),
            });
        }
        let key = cidr_key(endpoint_id, net);
        let mut value = RawCidrValue {
            prefixlen: walk_on(&key),
            count: ports.len() as u32,
            ..RawCidrValue::default()
        };
        for (slot, rule) in value.rules.iter_mut().zip(ports) {
            if rule.first > rule.last {
                return Err(DatapathError::Invalid {
                    map: map::CIDR_ALLOW,
                    reason: format!("port range {}-{} is empty", rule.first, rule.last),
                });
            }
            *slot = RawPortRule {
                proto: rule.proto.unwrap_or(0),
                pad0: 0,
                first: rule.first,
                last: rule.last,
                pad1: 0,
            };
        }
        let mut trie = lock(&self.inner.cidr_allow, map::CIDR_ALLOW)?;
        if covers_v4_mapped(net) {
            // Keep IPv4 destinations out of this IPv6 prefix. NOEXIST: an IPv4 /0 entry
            // already at that key stops the walk by itself.
            let barrier = v4_barrier(endpoint_id);
            match trie.insert(&barrier, RawCidrValue::default(), BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(DatapathError::map(map::CIDR_ALLOW, "insert barrier", e)),
            }
        }
        trie.insert(&key, value, 0)
            .map_err(|e| DatapathError::map(map::CIDR_ALLOW, "insert", e))
    }

    /// Removes an (endpoint, CIDR) entry (absent is fine).
    pub fn remove_cidr(&self, endpoint_id: u32, net: IpNet) -> Result<(), DatapathError> {
        let key = cidr_key(endpoint_id, net);
        let mut trie = lock(&self.inner.cidr_allow, map::CIDR_ALLOW)?;
        if is_v4_root(&key) {
            // The IPv4 /0 entry doubles as the barrier; leave a rule-less one in its place
            // (harmless when no IPv6 prefix needs it).
            return trie
                .insert(&key, RawCidrValue::default(), 0)
                .map_err(|e| DatapathError::map(map::CIDR_ALLOW, "insert barrier", e));
        }
        removed(map::CIDR_ALLOW, trie.remove(&key))
    }

    /// Removes every CIDR entry of an endpoint not in `kept`, barriers ([`Self::cidr_entries`]
    /// leaves them out) included, in one walk of the map; returns how many.
    pub fn clear_cidrs_except(&self, kept: &HashSet<u32>) -> Result<usize, DatapathError> {
        let mut trie = lock(&self.inner.cidr_allow, map::CIDR_ALLOW)?;
        let keys = collect_keys(map::CIDR_ALLOW, trie.keys(), |k| {
            !kept.contains(&k.data().endpoint_id)
        })?;
        for k in &keys {
            removed(map::CIDR_ALLOW, trie.remove(k))?;
        }
        Ok(keys.len())
    }

    /// Removes everything keyed by an endpoint: its DNS target and every FQDN, CIDR (with the
    /// internal barrier entries `cidr_entries` does not show) and last-seen entry. Cgroups
    /// enrolled with it stay enrolled: `unenroll` them first.
    pub fn clear_endpoint(&self, endpoint_id: u32) -> Result<(), DatapathError> {
        self.clear_endpoints(&HashSet::from([endpoint_id]))
    }

    /// [`clear_endpoint`](Self::clear_endpoint) of every endpoint of `ids`, in one walk of
    /// each map: a rollout deleting tens of pods at once walked the FQDN map (up to 262,144
    /// entries), the CIDR trie and the last-seen map once per pod.
    pub fn clear_endpoints(&self, ids: &HashSet<u32>) -> Result<(), DatapathError> {
        if ids.is_empty() {
            return Ok(());
        }
        {
            let mut targets = lock(&self.inner.dns_targets, map::DNS_TARGETS)?;
            for endpoint_id in ids {
                removed(map::DNS_TARGETS, targets.remove(endpoint_id))?;
            }
        }
        {
            // Walked without the DNS path's lock, each removal under it.
            let keys = collect_keys(map::FQDN_ALLOW, self.inner.fqdn_allow_walker.keys(), |k| {
                ids.contains(&k.endpoint_id)
            })?;
            for k in keys {
                let mut allow = lock(&self.inner.fqdn_allow, map::FQDN_ALLOW)?;
                removed(map::FQDN_ALLOW, allow.remove(&k))?;
            }
        }
        {
            let mut trie = lock(&self.inner.cidr_allow, map::CIDR_ALLOW)?;
            let keys = collect_keys(map::CIDR_ALLOW, trie.keys(), |k| {
                ids.contains(&k.data().endpoint_id)
            })?;
            for k in keys {
                removed(map::CIDR_ALLOW, trie.remove(&k))?;
            }
        }
        let mut seen = lock(&self.inner.last_seen, map::LAST_SEEN)?;
        let keys = collect_keys(map::LAST_SEEN, seen.keys(), |k| {
            ids.contains(&k.endpoint_id)
        })?;
        for k in keys {
            removed(map::LAST_SEEN, seen.remove(&k))?;
        }
        Ok(())
    }

    /// Every (endpoint, CIDR, rules) entry.
    pub fn cidr_entries(&self) -> Result<Vec<(u32, IpNet, Vec<PortRule>)>, DatapathError> {
        let trie = lock(&self.inner.cidr_allow, map::CIDR_ALLOW)?;
        let mut out = Vec::new();
        for r in trie.iter() {
            let (key, value) = r.map_err(|e| DatapathError::map(map::CIDR_ALLOW, "iterate", e))?;
            // Barriers (no rules) are an implementation detail.
            if value.count == 0 {
                continue;
            }
            let Some((endpoint_id, net)) = cidr_net(&key) else {
                continue;
            };
            let count = (value.count as usize).min(abi::CIDR_MAX_RULES);
            let rules = value.rules[..count]
                .iter()
                .map(|r| PortRule {
                    proto: (r.proto != 0).then_some(r.proto),
                    first: r.first,
                    last: r.last,
                })
                .collect();
            out.push((endpoint_id, net, rules));
        }
        Ok(out)
    }

    /// When the endpoint last sent a packet to `ip` that an FQDN allow entry let through, in
    /// unix seconds (the map keeps kernel boot time; converted here). Refreshed at most once a
    /// second.
    pub fn last_seen(&self, endpoint_id: u32, ip: IpAddr) -> Result<Option<u64>, DatapathError> {
        let key = RawLastSeenKey {
            endpoint_id,
            pad: 0,
            addr: abi::addr16(ip),
        };
        let seen = lock(&self.inner.last_seen, map::LAST_SEEN)?;
        Ok(found(map::LAST_SEEN, seen.get(&key, 0))?.map(clock::boot_ns_to_unix_secs))
    }

    /// Every (endpoint, IP, last seen in unix seconds), for garbage collection in bulk.
    pub fn last_seen_entries(&self) -> Result<Vec<(u32, IpAddr, u64)>, DatapathError> {
        let seen = lock(&self.inner.last_seen, map::LAST_SEEN)?;
        seen.iter()
            .map(|r| {
                r.map(|(k, ns)| {
                    (
                        k.endpoint_id,
                        abi::ip_of(k.addr),
                        clock::boot_ns_to_unix_secs(ns),
                    )
                })
                .map_err(|e| DatapathError::map(map::LAST_SEEN, "iterate", e))
            })
            .collect()
    }

    /// Who sent a redirected query from `client` (its address as the proxy sees it; IPv4 may
    /// be given v4-mapped) over `proto` (17 UDP, 6 TCP), and which server it addressed; and
    /// whether the memory-mapped slots answered or the LRU map had to be asked.
    pub fn redirect_record(
        &self,
        client: SocketAddr,
        proto: u8,
    ) -> Result<RedirectLookup, DatapathError> {
        let key = RawClientKey {
            addr: abi::addr16(client.ip()),
            port: client.port(),
            proto,
            pad: 0,
        };
        let now = clock::boot_now_ns();
        let in_slot = match self.inner.redirect_slots.as_ref() {
            Some(slots) => slots.read(&key, now),
            None => SlotRead::Ask,
        };
        let (record, source) = match in_slot {
            SlotRead::Found(record) => (Some(record), RedirectSource::Slot),
            SlotRead::Absent => (None, RedirectSource::Slot),
            SlotRead::Ask => (
                found(
                    map::REDIRECT_RECORDS,
                    self.inner.redirect_records.get(&key, 0),
                )?
                .filter(|record| recent(record.time_ns, now)),
                RedirectSource::Map,
            ),
        };
        Ok(RedirectLookup {
            record: record.map(redirect_record_of),
            source,
        })
    }

    /// A reader of drop events. Call inside a tokio runtime; one reader per node at a time.
    pub fn events(&self) -> Result<DropEvents, DatapathError> {
        let path = self.inner.dir.join(map::EVENTS);
        let data = MapData::from_pin(&path).map_err(|source| DatapathError::NotPinned {
            map: map::EVENTS,
            path,
            source,
        })?;
        DropEvents::new(data)
    }

    /// Registers `socket` (bound with SO_REUSEPORT to the DNS port) as proxy instance
    /// `instance`'s own socket of its slot (family and protocol), leaving the spread as it is:
    /// [`Datapath::reuseport_register`] registers a process's sockets. A socket that closes
    /// leaves its slot by itself.
    pub fn reuseport_set(&self, instance: u32, socket: &impl AsFd) -> Result<(), DatapathError> {
        let slot = reuseport_slot(instance, socket, &bound_address(socket)?)?;
        self.reuseport_set_slot(slot, socket)
    }

    fn reuseport_set_slot(&self, slot: u32, socket: &impl AsFd) -> Result<(), DatapathError> {
        lock(&self.inner.reuseport_sockets, map::REUSEPORT_SOCKETS)?
            .set(slot, &socket.as_fd().as_raw_fd(), 0)
            .map_err(|e| DatapathError::map(map::REUSEPORT_SOCKETS, "insert", e))
    }

    /// Registers `sockets` (bound with SO_REUSEPORT to the DNS port) as proxy instance
    /// `instance`'s: the first of each slot (family and protocol) as the slot's own
    /// ([`Datapath::reuseport_set`]), the others on the same address (the `dns.listen_sockets`
    /// UDP sockets of an address beyond the first, at most [`abi::REUSEPORT_SPREAD`]) in its
    /// spread, over which the program spreads the slot's clients by the kernel's hash of their
    /// addresses. A further address of a family is another reuseport group, which the slot
    /// cannot select from: its sockets are left to the kernel's hash, as before the spread.
    /// Pins older than the spread take the first socket alone; a socket the spread refuses
    /// leaves its share to the others (logged). What `instance` had registered in these maps
    /// goes first: the kernel refuses a socket an array already holds (EBUSY), one left there
    /// by an earlier registration that failed part way too. A socket may be in one map at a
    /// time: one still in older maps is refused, see [`Datapath::reuseport_unregister`].
    pub fn reuseport_register(
        &self,
        instance: u32,
        sockets: &[impl AsFd],
    ) -> Result<(), DatapathError> {
        self.reuseport_unregister(instance)?;
        let mut spread = lock(&self.inner.reuseport_spread, map::REUSEPORT_SPREAD)?;
        // Per slot: the address of its own socket, and how many joined it in the spread.
        let mut slots: [(Option<SockaddrStorage>, u32); abi::REUSEPORT_SLOTS as usize] =
            [(None, 0); abi::REUSEPORT_SLOTS as usize];
        for socket in sockets {
            let address = bound_address(socket)?;
            let slot = reuseport_slot(instance, socket, &address)?;
            let Some((own, extra)) = slots.get_mut(slot as usize) else {
                continue;
            };
            match own {
                None => {
                    self.reuseport_set_slot(slot, socket)?;
                    *own = Some(address);
                    continue;
                }
                Some(own) if *own != address => continue,
                Some(_) => {}
            }
            let Some(spread) = spread.as_mut().filter(|_| *extra < abi::REUSEPORT_SPREAD) else {
                continue;
            };
            let index = slot * abi::REUSEPORT_SPREAD + *extra;
            match spread.sockets.set(index, &socket.as_fd().as_raw_fd(), 0) {
                Ok(()) => *extra += 1,
                Err(error) => {
                    tracing::warn!(%error, index, "cannot add a DNS socket to the reuseport spread; the others take its share");
                }
            }
        }
        let Some(spread) = spread.as_mut() else {
            return Ok(());
        };
        // The counts last: the program never picks beyond the sockets already in place.
        for slot in 4 * instance..4 * (instance + 1) {
            let extra = slots.get(slot as usize).map_or(0, |(_, extra)| *extra);
            spread
                .counts
                .set(slot, extra, 0)
                .map_err(|e| DatapathError::map(map::REUSEPORT_SPREAD_COUNT, "update", e))?;
        }
        Ok(())
    }

    /// Takes `instance`'s sockets out of these maps' reuseport selection. The kernel holds a
    /// socket in one array slot at most, and frees it from a map only when the map itself
    /// goes, which may be long after its pins were replaced: a process moving its sockets to
    /// newly pinned maps takes them out of the old ones first, or registering them anew fails
    /// (EBUSY).
    pub fn reuseport_unregister(&self, instance: u32) -> Result<(), DatapathError> {
        let mut spread = lock(&self.inner.reuseport_spread, map::REUSEPORT_SPREAD)?;
        let mut own = lock(&self.inner.reuseport_sockets, map::REUSEPORT_SOCKETS)?;
        for slot in 4 * instance..4 * (instance + 1) {
            removed(map::REUSEPORT_SOCKETS, own.clear_index(&slot))?;
            let Some(spread) = spread.as_mut() else {
                continue;
            };
            spread
                .counts
                .set(slot, 0, 0)
                .map_err(|e| DatapathError::map(map::REUSEPORT_SPREAD_COUNT, "update", e))?;
            for index in slot * abi::REUSEPORT_SPREAD..(slot + 1) * abi::REUSEPORT_SPREAD {
                removed(map::REUSEPORT_SPREAD, spread.sockets.clear_index(&index))?;
            }
        }
        Ok(())
    }

    /// Steers new queries and connections to `instance`'s sockets (falling back to any other
    /// live instance, then to the kernel's hash).
    pub fn reuseport_prefer(&self, instance: u32) -> Result<(), DatapathError> {
        if instance >= abi::REUSEPORT_INSTANCES {
            return Err(DatapathError::Invalid {
                map: map::REUSEPORT_CONFIG,
                reason: format!(
                    "instance {instance}; at most {} instances",
                    abi::REUSEPORT_INSTANCES
                ),
            });
        }
        let config = RawReuseportConfig {
            preferred: instance,
            enabled: 1,
        };
        lock(&self.inner.reuseport_config, map::REUSEPORT_CONFIG)?
            .set(0, config, 0)
            .map_err(|e| DatapathError::map(map::REUSEPORT_CONFIG, "update", e))
    }

    /// Lets the kernel's hash spread queries over every live instance (`dns.prefer: share`).
    pub fn reuseport_share(&self) -> Result<(), DatapathError> {
        let config = RawReuseportConfig {
            preferred: 0,
            enabled: 0,
        };
        lock(&self.inner.reuseport_config, map::REUSEPORT_CONFIG)?
            .set(0, config, 0)
            .map_err(|e| DatapathError::map(map::REUSEPORT_CONFIG, "update", e))
    }

    /// The instance new queries go to first, or `None` when the kernel's hash decides.
    pub fn reuseport_preferred(&self) -> Result<Option<u32>, DatapathError> {
        let config = lock(&self.inner.reuseport_config, map::REUSEPORT_CONFIG)?
            .get(&0, 0)
            .map_err(|e| DatapathError::map(map::REUSEPORT_CONFIG, "lookup", e))?;
        Ok((config.enabled != 0).then_some(config.preferred))
    }

    /// Attaches the `sk_reuseport` program to the SO_REUSEPORT group of `socket` (affects the
    /// whole group; attaching again replaces it).
    pub fn attach_reuseport(&self, socket: &impl AsFd) -> Result<(), DatapathError> {
        let mut program =
            self.inner
                .reuseport_program
                .lock()
                .map_err(|_| DatapathError::Poisoned {
                    map: map::REUSEPORT_SOCKETS,
                })?;
        if program.is_none() {
            let path = loader::reuseport_prog_path(&self.inner.bpffs);
            let opened =
                SkReuseport::from_pin(&path, SkReuseportAttachType::Select).map_err(|e| {
                    DatapathError::Program {
                        program: loader::REUSEPORT_PROGRAM,
                        source: Box::new(e),
                    }
                })?;
            *program = Some(opened);
        }
        let Some(prog) = program.as_ref() else {
            return Err(DatapathError::MissingProgram {
                program: loader::REUSEPORT_PROGRAM,
            });
        };
        prog.attach(socket.as_fd())
            .map_err(|e| DatapathError::Socket {
                op: "SO_ATTACH_REUSEPORT_EBPF",
                source: std::io::Error::other(e),
            })
    }
}

/// The address `socket` is bound to.
fn bound_address(socket: &impl AsFd) -> Result<SockaddrStorage, DatapathError> {
    getsockname::<SockaddrStorage>(socket.as_fd().as_raw_fd()).map_err(|errno| {
        DatapathError::Socket {
            op: "getsockname",
            source: errno.into(),
        }
    })
}

/// `instance`'s slot for `socket`, bound to `address`: its family and protocol.
fn reuseport_slot(
    instance: u32,
    socket: &impl AsFd,
    address: &SockaddrStorage,
) -> Result<u32, DatapathError> {
    if instance >= abi::REUSEPORT_INSTANCES {
        return Err(DatapathError::Invalid {
            map: map::REUSEPORT_SOCKETS,
            reason: format!(
                "instance {instance}; at most {} instances",
                abi::REUSEPORT_INSTANCES
            ),
        });
    }
    let ty = getsockopt(socket, sockopt::SockType).map_err(|errno| DatapathError::Socket {
        op: "getsockopt(SO_TYPE)",
        source: errno.into(),
    })?;
    let family_offset = match address.family() {
        Some(AddressFamily::Inet6) => 2,
        _ => 0,
    };
    let offset = family_offset
        + match ty {
            SockType::Datagram => 0,
            SockType::Stream => 1,
            other => {
                return Err(DatapathError::Invalid {
                    map: map::REUSEPORT_SOCKETS,
                    reason: format!("socket type {other:?}; expected UDP or TCP"),
                });
            }
        };
    Ok(instance * 4 + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_keys_round_trip() {
        for net in [
            "10.1.0.0/16",
            "0.0.0.0/0",
            "192.0.2.7/32",
            "fd00::/8",
            "::/0",
        ] {
            let net: IpNet = net.parse().unwrap();
            let key = cidr_key(9, net);
            assert_eq!(cidr_net(&key), Some((9, net)));
        }
        let key = cidr_key(1, "10.1.2.3/16".parse().unwrap());
        assert_eq!(key.prefix_len(), 32 + 96 + 16);
        assert_eq!(
            cidr_net(&key).unwrap().1,
            "10.1.0.0/16".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn fqdn_keys_round_trip() {
        let key = FqdnKey {
            endpoint_id: 3,
            ip: "192.0.2.1".parse().unwrap(),
            proto: Some(6),
            port: None,
        };
        assert_eq!(fqdn_typed(&fqdn_raw(&key)), key);
        let any = FqdnKey::any(3, "2001:db8::1".parse().unwrap());
        assert_eq!(fqdn_typed(&fqdn_raw(&any)), any);
    }
}
