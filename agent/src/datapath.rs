//! The agent's own jobs on the eBPF datapath (`datapath.mode: ebpf`); the hot-path pieces it
//! shares with `warden-dnsproxy` live in `warden-enforce`.
//!
//! [`Reconciler`] keeps the maps equal to what config, policy and cache say: enrollment, DNS
//! targets, CIDR rules, FQDN entries (kept while connections use them, for `idle_grace_s`),
//! once a second and on every policy change. [`watch_drops`] turns drop events into logs,
//! metrics and flows.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use warden_config::AgentConfig;
use warden_datapath::{Datapath, EndpointEntry, FqdnKey, PortRule};
use warden_enforce::{Enforcement, TCP, UDP, fqdn_keys, grants_key, merge_port_rules, port_rules};
use warden_fqdn::{CacheEntry, UnixTime};
use warden_policy::{DnsName, EndpointId, FqdnGrant, PolicyRepository};
use warden_proxy::{PolicySource, SharedCache, unix_now};
use warden_telemetry::{DropFlow, FlowEvent, FlowLog, LogBudget, Metrics};

use crate::api::Sessions;
use crate::endpoints::EndpointTable;
use crate::policy_store::PolicyStore;

/// An unexpired entry no policy wants any more goes after this long: long enough for a peer's
/// fresh entry to reach the agent's cache, short enough that a removed rule stops quickly.
const UNWANTED_GRACE: Duration = Duration::from_secs(2);

/// After the agent's start no unexpired entry is revoked for being unwanted: a dnsproxy that
/// served while the agent was away wrote entries whose mappings reach this cache only with
/// its resync, after its reconnect (backoff up to 1 s) and its replay (more than the grace
/// above for a large cache). The same holds while any proxy's resync is under way.
const STARTUP_GRACE: Duration = Duration::from_secs(10);

/// The most endpoint IDs whose clearing failed that are tried again: each try walks three maps.
const UNCLEARED_KEPT: usize = 32;

/// Keeps the pinned maps equal to what config, policy and cache say.
#[derive(Debug)]
pub struct Reconciler {
    pub datapath: Datapath,
    pub cgroup_root: PathBuf,
    pub config: AgentConfig,
    pub enforcement: Arc<Enforcement>,
    pub policy: Arc<PolicyStore>,
    pub cache: SharedCache,
    pub metrics: Metrics,
    /// When each unexpired entry no policy wants was first seen unwanted.
    pub unwanted_since: HashMap<FqdnKey, Instant>,
    /// The proxies' sessions: entries stay while one resyncs (see [`STARTUP_GRACE`]).
    pub sessions: Arc<Sessions>,
    pub started: Instant,
    /// Endpoints whose cgroup was missing at the last pass, said once until it appears (a pod
    /// written into endpoints_dir while still pending has none yet).
    pub missing_cgroups: HashSet<Arc<str>>,
    /// Endpoints naming a cgroup an endpoint declared before them has, said once.
    pub shared_cgroups: HashSet<Arc<str>>,
    /// Endpoint IDs whose clearing failed part way: tried again at the next pass (their
    /// enrollments, which named them stale, are gone by then).
    pub uncleared: HashSet<u32>,
    /// The names that last wanted each FQDN entry (a few, the latest): one that traffic keeps
    /// past its TTL stays only while the policy still grants it for one of them.
    pub wanted_by: HashMap<FqdnKey, Vec<Arc<str>>>,
    /// Entries a narrowed grant gave an address in use in place of another, by that grant's
    /// name: one still within its TTL stays while that name grants it, though no cache entry
    /// wants it (its own name's rule gone). Only these: an entry a cache clean took the name
    /// of goes within seconds, as the clean promises.
    pub adopted: HashMap<FqdnKey, Arc<str>>,
    /// The FQDN entries the map held at this agent's first pass and still holds: written
    /// before this agent ran (by the one before it, or a dnsproxy), possibly for names its
    /// cache no longer has (lost in a crash, or set aside unreadable). `None` until the
    /// first pass has listed the map.
    pub inherited: Option<HashSet<FqdnKey>>,
    /// When `last_seen` was last listed (the reconciler's start before that).
    pub traffic_listed_at: Instant,
}

impl Reconciler {
    /// One pass. Map errors are logged and counted; the next pass tries again.
    pub fn reconcile(&mut self) {
        // The endpoints before the policy: a change of endpoints installs a policy compiled
        // for them, so this policy knows at least every endpoint of this table.
        let table = self.policy.endpoints();
        let policy = self.policy.current();
        let enrollment = self.enroll(&table, &policy);
        let unwanted_cidrs = self.reconcile_cidrs(&table, &policy, &enrollment);
        self.reconcile_fqdn(&table, &policy, unix_now());
        // After every write of the pass, as the FQDN entries' revocations are: a prefix
        // split or merged by a changed rule (an `except` added to a toCIDRSet, a toCIDR become
        // a toFQDNs rule) is replaced before it goes, so traffic it allows never meets the
        // default deny in between.
        self.finish_cidrs(unwanted_cidrs);
        self.finish_enrollment(enrollment);
    }

    fn count<T>(&self, op: &str, result: Result<T, warden_datapath::DatapathError>) -> Option<T> {
        match result {
            Ok(value) => {
                self.metrics.datapath.updates.with_label_values(&[op]).inc();
                Some(value)
            }
            Err(error) => {
                self.metrics.datapath.errors.with_label_values(&[op]).inc();
                // The reconciler retries every wanted entry each second: a full map would
                // otherwise log a line per entry per second.
                static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
                if let Some(held_back) = BUDGET.allow() {
                    tracing::warn!(%error, op, held_back, "datapath update failed");
                }
                None
            }
        }
    }

    /// Enrolls every endpoint with a cgroup (enforced when a policy with egress rules selects
    /// it) and points its DNS at the proxy; removes cgroups no longer configured. An
    /// enrollment that enforces is only planned here, and written by [`Self::finish_enrollment`]
    /// once the pass has written the endpoint's allow entries, as is the clearing of endpoint
    /// IDs nothing is enrolled under any more.
    fn enroll(&mut self, table: &EndpointTable, policy: &PolicyRepository) -> Enrollment {
        let (default_v4, default_v6) = targets(&self.config.dns.listen);
        let mut index = HashMap::new();
        let mut pending = Vec::new();
        let mut held = HashSet::new();
        // One walk of the map, not one per endpoint.
        let listed = self.count("list", self.datapath.enrolled());
        // Without the listing every cgroup looks new: none gets the interim enrollment, which
        // would lift the enforcement of those already enforced.
        let listed_enrollments = listed.is_some();
        let enrolled: HashMap<u64, EndpointEntry> = listed
            .map(|entries| entries.into_iter().collect())
            .unwrap_or_default();
        for (info, key, endpoint) in table.entries() {
            let Some(cgroup) = &endpoint.cgroup else {
                continue;
            };
            let path = resolve_cgroup(&self.cgroup_root, cgroup);
            let cgroup_id = match Datapath::cgroup_id(&path) {
                Ok(id) => {
                    self.missing_cgroups.remove(key);
                    id
                }
                Err(error) => {
                    if self.missing_cgroups.insert(key.clone()) {
                        tracing::warn!(endpoint = %key, cgroup = %path.display(), %error, "endpoint cgroup not found; not enrolled");
                    }
                    continue;
                }
            };
            if let Some((_, owner)) = index.get(&cgroup_id) {
                // Enrolled under one endpoint at a time, or each pass would enroll the other
                // and clear the one before (its DNS target and entries). The first declared
                // keeps it.
                if self.shared_cgroups.insert(key.clone()) {
                    tracing::error!(endpoint = %key, owner = %owner, cgroup = %path.display(), "endpoint names the cgroup of another; not enrolled");
                }
                continue;
            }
            self.shared_cgroups.remove(key);
            index.insert(cgroup_id, (info.id, key.clone()));
            let enforced = policy.is_enforced(info.id);
            let wanted = EndpointEntry {
                endpoint_id: info.id.0,
                enforced,
                redirect_dns: true,
            };
            let current = enrolled.get(&cgroup_id).copied();
            match enrollment_write(current.as_ref(), &wanted) {
                EnrollmentWrite::Unchanged => {}
                EnrollmentWrite::BeforeEntries => {
                    // Refused, the cgroup stays as it was: an enforced one keeps its entries
                    // this pass rather than meet its default deny without them.
                    if !self.write_enrollment(cgroup_id, wanted, key)
                        && let Some(current) = current.filter(|current| current.enforced)
                    {
                        held.insert(current.endpoint_id);
                    }
                }
                EnrollmentWrite::AfterEntries { interim } => {
                    // Not under an enforced ancestor: a cgroup nested in an enforced endpoint's
                    // is enforced by that one's policy until its own enrollment, and the
                    // interim would lift it.
                    if let Some(interim) = interim
                        && listed_enrollments
                        && !self.under_an_enforced_cgroup(&path, &enrolled)
                    {
                        self.write_enrollment(cgroup_id, interim, key);
                    }
                    // An enforced cgroup stays under its former ID, with that ID's entries,
                    // until then.
                    let former = current
                        .filter(|current| current.enforced)
                        .map(|current| current.endpoint_id)
                        .filter(|former| *former != wanted.endpoint_id);
                    held.extend(former);
                    pending.push(PendingEnrollment {
                        cgroup_id,
                        wanted,
                        former,
                        key: key.clone(),
                    });
                }
            }
            // A target without a port cannot be redirected to (the map refuses it, at every
            // pass): its family's DNS goes where an endpoint without targets' does.
            let usable: Vec<SocketAddr> = endpoint
                .dns_target
                .iter()
                .copied()
                .filter(|target| target.port() != 0)
                .collect();
            if usable.len() < endpoint.dns_target.len() {
                static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
                if let Some(held_back) = BUDGET.allow() {
                    tracing::warn!(endpoint = %key, held_back, "dns_target without a port ignored");
                }
            }
            let (v4, v6) = if usable.is_empty() {
                (default_v4, default_v6)
            } else {
                // By the address the datapath sees: an IPv4-mapped target is an IPv4 one.
                let ignored = |v6: bool| {
                    endpoint.dns_target.iter().any(|target| {
                        target.port() == 0 && target.ip().to_canonical().is_ipv6() == v6
                    })
                };
                let (v4, v6) = targets(&usable);
                (
                    v4.or(default_v4.filter(|_| ignored(false))),
                    v6.or(default_v6.filter(|_| ignored(true))),
                )
            };
            let current = self.datapath.dns_target(info.id.0).ok().flatten();
            if current.is_none_or(|target| target.v4 != v4 || target.v6 != v6) {
                self.count(
                    "dns_target",
                    self.datapath.set_dns_target(info.id.0, v4, v6),
                );
            }
        }
        // This pass enrolls only cgroups of the index: what was enrolled outside it at the start
        // still is.
        for cgroup_id in enrolled.keys() {
            if !index.contains_key(cgroup_id) {
                self.count("unenroll", self.datapath.unenroll(*cgroup_id));
            }
        }
        // An endpoint ID nothing is enrolled under any more (its endpoint removed, or its cgroup
        // re-enrolled under another ID, as after the upgrade to IDs from keys) loses its DNS
        // target and entries.
        let in_use: HashSet<u32> = index.values().map(|(id, _)| id.0).collect();
        let stale: HashSet<u32> = enrolled
            .values()
            .map(|entry| entry.endpoint_id)
            .chain(self.uncleared.drain())
            .filter(|id| !in_use.contains(id))
            .collect();
        // An endpoint gone before its cgroup appeared is forgotten (and said again if it
        // comes back).
        self.missing_cgroups
            .retain(|key| table.entries().any(|(_, known, _)| known == key));
        self.shared_cgroups
            .retain(|key| table.entries().any(|(_, known, _)| known == key));
        self.metrics
            .datapath
            .enrolled
            .set(i64::try_from(index.len()).unwrap_or(i64::MAX));
        self.enforcement.set_cgroups(index);
        Enrollment {
            in_use,
            held,
            pending,
            stale,
        }
    }

    /// Writes the enrollments [`Self::enroll`] left for after the allow entries, then clears
    /// the endpoint IDs nothing is enrolled under any more.
    fn finish_enrollment(&mut self, enrollment: Enrollment) {
        // A held ID is cleared only once its cgroup has moved on: refused, the cgroup stays
        // under it, and its entries with it.
        let mut released = HashSet::new();
        for pending in enrollment.pending {
            if self.write_enrollment(pending.cgroup_id, pending.wanted, &pending.key) {
                released.extend(pending.former);
            }
        }
        let clear: HashSet<u32> = enrollment
            .stale
            .into_iter()
            .filter(|id| !enrollment.held.contains(id) || released.contains(id))
            .collect();
        // All in one walk of each map. Should that fail, one by one, so that one endpoint's
        // failure leaves only its own entries; those are tried again at the next pass,
        // bounded: were clearing to fail for good, each try walks the maps.
        if clear.is_empty()
            || self
                .count("clear", self.datapath.clear_endpoints(&clear))
                .is_some()
        {
            return;
        }
        for endpoint_id in clear {
            if self
                .count("clear", self.datapath.clear_endpoint(endpoint_id))
                .is_none()
            {
                if self.uncleared.len() < UNCLEARED_KEPT {
                    self.uncleared.insert(endpoint_id);
                } else {
                    static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
                    if let Some(held_back) = BUDGET.allow() {
                        tracing::warn!(
                            endpoint_id,
                            held_back,
                            "an endpoint's datapath entries could not be cleared and are left"
                        );
                    }
                }
            }
        }
    }

    /// Whether the nearest enrolled cgroup above `path`, up to the cgroup root, is enforced:
    /// the datapath takes a socket of `path` for that one's endpoint until `path` is enrolled.
    /// Walked by cgroup id, not by the path's text, which may name the root by another mount
    /// or link. Asked only of cgroups not enrolled yet; a folder that cannot be read, or a
    /// walk that never meets the root, counts as enforced.
    fn under_an_enforced_cgroup(
        &self,
        path: &Path,
        enrolled: &HashMap<u64, EndpointEntry>,
    ) -> bool {
        let Ok(root) = Datapath::cgroup_id(&self.cgroup_root) else {
            return true;
        };
        for ancestor in path.ancestors().skip(1) {
            let Ok(id) = Datapath::cgroup_id(ancestor) else {
                return true;
            };
            if let Some(entry) = enrolled.get(&id) {
                return entry.enforced;
            }
            if id == root {
                return false;
            }
        }
        true
    }

    /// Writes a cgroup's enrollment; returns whether the map took it.
    fn write_enrollment(&mut self, cgroup_id: u64, wanted: EndpointEntry, key: &str) -> bool {
        let EndpointEntry {
            endpoint_id,
            enforced,
            redirect_dns,
        } = wanted;
        let written = self
            .count(
                "enroll",
                self.datapath
                    .enroll(cgroup_id, endpoint_id, enforced, redirect_dns),
            )
            .is_some();
        if written {
            tracing::info!(endpoint = %key, cgroup_id, enforced, "endpoint enrolled");
        }
        written
    }

    /// The L3/L4 rules (toCIDR, toCIDRSet, toEntities, toEndpoints) of enforced endpoints
    /// that are enrolled. Only those: an endpoint loses its enrollment before it leaves the
    /// table (a pod's cgroup goes first), and clearing it then removes the barrier entries
    /// `cidr_entries` does not list; entries written after that would stay for good.
    fn reconcile_cidrs(
        &mut self,
        table: &EndpointTable,
        policy: &PolicyRepository,
        enrollment: &Enrollment,
    ) -> UnwantedCidrs {
        let mut wanted: HashMap<(u32, IpNet), Vec<PortRule>> = HashMap::new();
        for (info, _) in table.keys() {
            if !policy.is_enforced(info.id) || !enrollment.in_use.contains(&info.id.0) {
                continue;
            }
            for allow in policy.static_allows(info.id) {
                let rules = port_rules(&allow.ports);
                for net in policy.addresses().prefixes(&allow.peer) {
                    let entry = wanted.entry((info.id.0, net)).or_default();
                    merge_rules(entry, &rules);
                }
            }
        }
        // Entries of endpoints not enrolled are left by earlier releases, which wrote them for
        // endpoints whose cgroup had gone and leaked their barriers (one per deleted pod in the
        // pinned map): no pass writes any now.
        let in_force: HashSet<u32> = enrollment.in_use.union(&enrollment.held).copied().collect();
        match self.datapath.clear_cidrs_except(&in_force) {
            Ok(0) => {}
            swept => {
                self.count("cidr_remove", swept);
            }
        }
        let mut unwanted = UnwantedCidrs::default();
        let Some(current) = self.count("list", self.datapath.cidr_entries()) else {
            return unwanted;
        };
        let mut current_keys = HashSet::new();
        for (endpoint_id, net, mut rules) in current {
            current_keys.insert((endpoint_id, net));
            if enrollment.held.contains(&endpoint_id) {
                continue;
            }
            match wanted.get_mut(&(endpoint_id, net)) {
                None => unwanted.remove.push((endpoint_id, net)),
                Some(wanted_rules) => {
                    rules.sort();
                    wanted_rules.sort();
                    if rules != *wanted_rules {
                        self.count(
                            "cidr_set",
                            self.datapath.set_cidr_rules(endpoint_id, net, wanted_rules),
                        );
                    }
                }
            }
        }
        for ((endpoint_id, net), rules) in wanted.iter() {
            if !current_keys.contains(&(*endpoint_id, *net))
                && self
                    .count(
                        "cidr_set",
                        self.datapath.set_cidr_rules(*endpoint_id, *net, rules),
                    )
                    .is_none()
            {
                unwanted.refused.push((*endpoint_id, *net, rules.clone()));
            }
        }
        self.metrics
            .datapath
            .cidr_entries
            .set(i64::try_from(wanted.len()).unwrap_or(i64::MAX));
        unwanted
    }

    /// Removes the prefixes [`Self::reconcile_cidrs`] found unwanted, then tries again the
    /// writes a full map refused before they made room.
    fn finish_cidrs(&mut self, unwanted: UnwantedCidrs) {
        for (endpoint_id, net) in unwanted.remove {
            self.count("cidr_remove", self.datapath.remove_cidr(endpoint_id, net));
        }
        for (endpoint_id, net, rules) in unwanted.refused {
            self.count(
                "cidr_set",
                self.datapath.set_cidr_rules(endpoint_id, net, &rules),
            );
        }
    }

    /// FQDN entries: what the cache and the policy's toFQDNs grants want, plus entries kept
    /// alive by traffic for `idle_grace_s` after their TTL.
    fn reconcile_fqdn(&mut self, table: &EndpointTable, policy: &PolicyRepository, now: UnixTime) {
        let grace = self.config.dns.idle_grace_s;
        // Traffic in the grace window keeps an IP in the cache (source `connection`). When the
        // listing fails, nothing is known to be idle: for the idle grace after the last
        // listing that worked no entry is revoked for want of traffic (an empty list would
        // have cut every connection living on the grace); past it, a listing that keeps
        // failing counts as no traffic, so that no entry outlives its grace for good.
        let seen = self.count("list", self.datapath.last_seen_entries());
        if seen.is_some() {
            self.traffic_listed_at = Instant::now();
        }
        let traffic_known =
            seen.is_some() || self.traffic_listed_at.elapsed() >= Duration::from_secs(grace);
        let recent: Vec<(u32, IpAddr, u64)> = seen
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, _, seen)| now.0.saturating_sub(*seen) < grace)
            .collect();
        let alive: Vec<(&str, IpAddr, UnixTime)> = recent
            .iter()
            .filter_map(|(endpoint_id, ip, seen)| {
                let key = table.key_of(EndpointId(*endpoint_id))?;
                Some((&**key, *ip, UnixTime(seen.saturating_add(grace))))
            })
            .collect();
        self.cache.keep_alive_all(&alive);
        // A chunk per hold of the lock the DNS path needs; the order does not matter here.
        let entries = self.cache.entries_unordered(now);
        // A name's grants are the node's, whoever asked (as Cilium's selector cache), so the
        // replicas of a workload resolving the same names would each grant every replica the
        // same keys again: each name's addresses are gathered first, at their latest expiry,
        // and granted once. Per entry, twenty replicas made the pass twenty times the work.
        let mut by_name: HashMap<&str, HashMap<IpAddr, u64>> = HashMap::new();
        for entry in &entries {
            let addresses = by_name.entry(entry.name.as_str()).or_default();
            for cached in &entry.ips {
                let expiry = addresses.entry(cached.ip).or_insert(0);
                *expiry = (*expiry).max(cached.expires_at.0);
            }
        }
        let mut wanted: HashMap<FqdnKey, u64> = HashMap::new();
        let mut grants = Grants::new(policy);
        for (name, addresses) in &by_name {
            let (name, grants) = grants.of(name);
            for grant in grants {
                for (&ip, &expires_at) in addresses {
                    for key in fqdn_keys(grant, ip) {
                        let expiry = wanted.entry(key).or_insert(0);
                        *expiry = (*expiry).max(expires_at);
                        remember(&mut self.wanted_by, key, name);
                    }
                }
            }
        }
        // Built only if an entry lives on traffic alone: the names each endpoint's cache
        // entries give an address, for an entry wanted by no name this agent remembers (as
        // after its restart).
        let mut names_in_cache: Option<HashMap<(&str, IpAddr), Vec<&str>>> = None;
        // What each endpoint's toFQDNs rules grant whatever the name, for entries known by
        // none: asked once per endpoint and pass.
        let mut any_name_grants = HashMap::new();
        let Some(current) = self.count("list", self.datapath.fqdn_entries()) else {
            return;
        };
        // Taken out for the pass (and put back at its end), so that the pass may borrow
        // the rest of `self` meanwhile.
        let mut inherited = self
            .inherited
            .take()
            .unwrap_or_else(|| current.iter().map(|(key, _)| *key).collect());
        let recent: HashSet<(u32, IpAddr)> =
            recent.into_iter().map(|(id, ip, _)| (id, ip)).collect();
        let peers_catching_up =
            self.started.elapsed() < STARTUP_GRACE || self.sessions.any_resyncing();
        let mut idle_grace = 0;
        let mut present = HashSet::new();
        let mut revocations = Vec::new();
        // Keys a narrowed grant gives an address in use in place of one it no longer does
        // (any port, say, become 443), with the idle entry's expiry and the name behind it.
        let mut replacements: Vec<(FqdnKey, u64, Arc<str>)> = Vec::new();
        for (key, expires_at) in current {
            present.insert(key);
            if let Some(wanted_expiry) = wanted.get(&key) {
                self.unwanted_since.remove(&key);
                if *wanted_expiry > expires_at {
                    self.count("allow", self.datapath.allow_fqdn(key, *wanted_expiry));
                }
                continue;
            }
            let in_use = recent.contains(&(key.endpoint_id, key.ip));
            let revoke = if expires_at > now.0 {
                let still_granted = self.adopted.get(&key).is_some_and(|name| {
                    grants
                        .of(name)
                        .1
                        .iter()
                        .any(|grant| grants_key(grant, &key))
                });
                if still_granted {
                    // Within its TTL, given in place of another by a narrowed grant that still
                    // gives it (its own name's rule gone).
                    self.unwanted_since.remove(&key);
                    false
                } else if (in_use || !traffic_known)
                    && inherited.contains(&key)
                    && names_for(&key, &self.wanted_by, &mut names_in_cache, &entries, table)
                        .is_empty()
                    && some_name_could_grant(policy, &mut any_name_grants, &key)
                {
                    // In use, written before this agent ran, and no name known for it: the
                    // cache that held it lost in a crash (or set aside, unreadable). Kept as it
                    // would be past its TTL (below), while a toFQDNs rule of the endpoint's
                    // could grant it: a connection must not be cut for what this agent forgot.
                    // One written since is known by name once a pass has seen its cache entry
                    // (a clean made before that still takes it, as promised), and a rule
                    // removed leaves the name in `wanted_by`.
                    self.unwanted_since.remove(&key);
                    false
                } else {
                    // Still within its TTL but wanted by no policy: a removed rule, or a peer's
                    // entry whose mapping has not reached this cache yet. Give it a moment.
                    let since = *self.unwanted_since.entry(key).or_insert_with(Instant::now);
                    since.elapsed() >= UNWANTED_GRACE && !peers_catching_up
                }
            } else if !traffic_known {
                false
            } else if in_use {
                // In use past its TTL: kept for the idle grace, but only as the policy still
                // grants it. Traffic marks the address, not the port, so a port a changed
                // policy took away would otherwise stay open for as long as any is used.
                let names = names_for(&key, &self.wanted_by, &mut names_in_cache, &entries, table);
                // No name known for it (a peer's entry whose mapping has not come, or an
                // address another endpoint resolved before this agent started): kept while
                // a toFQDNs rule of the endpoint's could grant it, whatever the name.
                let granted = if names.is_empty() {
                    some_name_could_grant(policy, &mut any_name_grants, &key)
                } else {
                    names.iter().any(|name| {
                        grants
                            .of(name)
                            .1
                            .iter()
                            .any(|grant| grants_key(grant, &key))
                    })
                };
                if granted {
                    idle_grace += 1;
                } else {
                    for name in &names {
                        let (name, name_grants) = grants.of(name);
                        for grant in name_grants
                            .iter()
                            .filter(|grant| grant.endpoint.0 == key.endpoint_id)
                        {
                            replacements.extend(
                                fqdn_keys(grant, key.ip)
                                    .into_iter()
                                    .map(|replacement| (replacement, expires_at, name.clone())),
                            );
                        }
                    }
                }
                !granted
            } else {
                true
            };
            if revoke {
                revocations.push((key, expires_at));
            }
        }
        // Every write before any revocation: the connections using an address never meet a
        // moment without an entry for their port. What a full map refuses is tried again once
        // the revocations have made room.
        let mut refused = Vec::new();
        for (key, expires_at) in &wanted {
            if !present.contains(key) {
                if self
                    .count("allow", self.datapath.allow_fqdn(*key, *expires_at))
                    .is_some()
                {
                    present.insert(*key);
                } else {
                    refused.push((*key, *expires_at));
                }
            }
        }
        // A replacement may be an idle entry due for revocation itself (its own name's rule
        // gone, another name's narrowed to it): it stays.
        let replacing: HashSet<FqdnKey> = replacements.iter().map(|(key, ..)| *key).collect();
        for (key, expires_at, name) in replacements {
            remember(&mut self.wanted_by, key, &name);
            self.adopted.insert(key, name.clone());
            if present.contains(&key) || wanted.contains_key(&key) {
                continue;
            }
            if self
                .count("allow", self.datapath.allow_fqdn(key, expires_at))
                .is_some()
            {
                present.insert(key);
                idle_grace += 1;
            } else {
                refused.push((key, expires_at));
            }
        }
        for (key, expires_at) in revocations {
            if replacing.contains(&key) {
                if expires_at <= now.0 {
                    idle_grace += 1;
                }
                continue;
            }
            self.unwanted_since.remove(&key);
            present.remove(&key);
            // An answer since the listing extended it: fresh, and wanted by its proxy.
            self.count(
                "revoke",
                self.datapath.revoke_fqdn_unless_extended(&key, expires_at),
            );
        }
        for (key, expires_at) in refused {
            if self
                .count("allow", self.datapath.allow_fqdn(key, expires_at))
                .is_some()
            {
                present.insert(key);
            }
        }
        self.unwanted_since.retain(|key, _| present.contains(key));
        inherited.retain(|key| present.contains(key));
        self.inherited = Some(inherited);
        self.wanted_by
            .retain(|key, _| present.contains(key) || wanted.contains_key(key));
        self.adopted
            .retain(|key, _| present.contains(key) && !wanted.contains_key(key));
        self.metrics
            .datapath
            .fqdn_entries
            .set(i64::try_from(present.len()).unwrap_or(i64::MAX));
        self.metrics.datapath.idle_grace_entries.set(idle_grace);
    }
}

/// What [`Reconciler::enroll`] leaves to the rest of a pass.
#[derive(Debug)]
struct Enrollment {
    /// The endpoint IDs enrolled, or to be at the pass's end.
    in_use: HashSet<u32>,
    /// IDs whose CIDR entries the pass leaves as they are: an enforced cgroup's former ID
    /// while its enrollment under another waits for that one's entries, or its current ID
    /// when the map refused to lift its enforcement.
    held: HashSet<u32>,
    /// Enrollments that enforce, written once the endpoint's allow entries are.
    pending: Vec<PendingEnrollment>,
    /// Endpoint IDs nothing is enrolled under any more, cleared at the pass's end.
    stale: HashSet<u32>,
}

/// An enrollment that enforces, left for the end of the pass.
#[derive(Debug)]
struct PendingEnrollment {
    cgroup_id: u64,
    wanted: EndpointEntry,
    /// The ID the cgroup is enforced under until then, when another.
    former: Option<u32>,
    key: Arc<str>,
}

/// When a pass writes a cgroup's enrollment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EnrollmentWrite {
    Unchanged,
    /// First: what it changes needs no entry, and lifting enforcement lets nothing be cut.
    BeforeEntries,
    /// After the endpoint's allow entries: an enforced endpoint written first would meet a
    /// moment with its default deny and none of its allows (every connection of a pod a new
    /// policy selects cut for the length of the pass). `interim`, written first, redirects a
    /// cgroup's DNS to the proxy meanwhile without enforcing: a new pod's queries then teach
    /// the proxy its names from the start of the pass.
    AfterEntries {
        interim: Option<EndpointEntry>,
    },
}

fn enrollment_write(current: Option<&EndpointEntry>, wanted: &EndpointEntry) -> EnrollmentWrite {
    if current == Some(wanted) {
        return EnrollmentWrite::Unchanged;
    }
    if !wanted.enforced {
        return EnrollmentWrite::BeforeEntries;
    }
    let interim = EndpointEntry {
        enforced: false,
        ..*wanted
    };
    let interim = match current {
        None => Some(interim),
        // Not enforced yet: the interim changes what it enforces in nothing.
        Some(current) if !current.enforced && *current != interim => Some(interim),
        // Enforced (under another ID): it stays so, under that ID's entries, until the end.
        Some(_) => None,
    };
    EnrollmentWrite::AfterEntries { interim }
}

/// What a pass's CIDR reconcile leaves for after every write of the pass.
#[derive(Debug, Default)]
struct UnwantedCidrs {
    /// Prefixes no rule of their endpoint wants any more.
    remove: Vec<(u32, IpNet)>,
    /// Writes the map refused (full), to try again once `remove` has made room.
    refused: Vec<(u32, IpNet, Vec<PortRule>)>,
}

/// Reconciles once a second and right after every policy change, until `shutdown`.
pub async fn reconcile_loop(reconciler: Reconciler, shutdown: CancellationToken) {
    let reconciler = Arc::new(std::sync::Mutex::new(reconciler));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut revision = u64::MAX;
    let mut fast = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = fast.tick() => {
                let now = reconciler.lock().unwrap_or_else(|p| p.into_inner()).policy.status().revision;
                if now == revision {
                    continue;
                }
            }
        }
        let reconciler = reconciler.clone();
        // Map syscalls: quick, but off the proxy's worker threads all the same.
        let done = tokio::task::spawn_blocking(move || {
            let mut reconciler = reconciler.lock().unwrap_or_else(|p| p.into_inner());
            let revision = reconciler.policy.status().revision;
            reconciler.reconcile();
            revision
        })
        .await;
        if let Ok(done) = done {
            revision = done;
        }
    }
}

/// Reads drop events from the ring buffer (including those written while no agent ran) and
/// turns each into a log line, a metric and a flow event.
pub async fn watch_drops(
    datapath: Datapath,
    enforcement: Arc<Enforcement>,
    policy: Arc<PolicyStore>,
    metrics: Metrics,
    flows: Arc<FlowLog>,
    shutdown: CancellationToken,
) {
    let mut events = match datapath.events() {
        Ok(events) => events,
        Err(error) => {
            tracing::error!(%error, "cannot read datapath drop events");
            return;
        }
    };
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => event,
        };
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "datapath event read failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Events written while no agent ran are read before the first reconcile fills the
        // cgroup index; the endpoint ID the program recorded names them all the same.
        let endpoint = enforcement
            .directory()
            .by_cgroup
            .get(&event.cgroup_id)
            .map(|(_, key)| key.to_string())
            .or_else(|| {
                policy
                    .endpoints()
                    .key_of(EndpointId(event.endpoint_id))
                    .map(ToString::to_string)
            })
            .unwrap_or_else(|| format!("cgroup:{}", event.cgroup_id));
        let protocol = match event.proto {
            TCP => "tcp".to_owned(),
            UDP => "udp".to_owned(),
            1 => "icmp".to_owned(),
            58 => "icmpv6".to_owned(),
            other => other.to_string(),
        };
        metrics
            .datapath
            .drops
            .with_label_values(&[event.reason.as_str()])
            .inc();
        tracing::info!(
            endpoint,
            destination = %event.dst,
            protocol,
            reason = event.reason.as_str(),
            "datapath drop"
        );
        let since_epoch = event
            .time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        flows.record(FlowEvent::Drop(DropFlow {
            time_ms: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
            time_ns: u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX),
            instance: "agent".to_owned(),
            endpoint,
            destination: event.dst.ip(),
            port: event.dst.port(),
            protocol,
        }));
    }
}

/// The `toFQDNs` grants of each name, asked of the policy once per pass.
struct Grants<'a> {
    policy: &'a PolicyRepository,
    at: HashMap<Arc<str>, usize>,
    names: Vec<(Arc<str>, Vec<FqdnGrant>)>,
}

impl<'a> Grants<'a> {
    fn new(policy: &'a PolicyRepository) -> Self {
        Grants {
            policy,
            at: HashMap::new(),
            names: Vec::new(),
        }
    }

    /// The name, shared, and its grants (none for a name no rule can express).
    fn of(&mut self, name: &str) -> (&Arc<str>, &[FqdnGrant]) {
        let at = match self.at.get(name) {
            Some(&at) => at,
            None => {
                let mut grants = Vec::new();
                if let Ok(parsed) = DnsName::new(name) {
                    self.policy.fqdn_grants(&parsed, &mut grants);
                }
                let name: Arc<str> = Arc::from(name);
                self.names.push((name.clone(), grants));
                self.at.insert(name, self.names.len() - 1);
                self.names.len() - 1
            }
        };
        let (name, grants) = &self.names[at];
        (name, grants)
    }
}

/// The names remembered as wanting an entry: a few, the latest last.
const NAMES_PER_ENTRY: usize = 4;

/// Remembers that `name` wanted `key`.
fn remember(wanted_by: &mut HashMap<FqdnKey, Vec<Arc<str>>>, key: FqdnKey, name: &Arc<str>) {
    let names = wanted_by.entry(key).or_default();
    if names.iter().any(|known| known == name) {
        return;
    }
    if names.len() >= NAMES_PER_ENTRY {
        names.remove(0);
    }
    names.push(name.clone());
}

/// Whether a `toFQDNs` rule of the entry's endpoint could grant it, whatever the name: what
/// keeps an entry known by no name.
/// `memo` holds each endpoint's such grants for the pass.
fn some_name_could_grant(
    policy: &PolicyRepository,
    memo: &mut HashMap<u32, Vec<FqdnGrant>>,
    key: &FqdnKey,
) -> bool {
    memo.entry(key.endpoint_id)
        .or_insert_with(|| policy.fqdn_grants_of_any_name(EndpointId(key.endpoint_id)))
        .iter()
        .any(|grant| grants_key(grant, key))
}

/// The names an entry is known by: those this agent wanted it for, else those the endpoint's
/// cache entries give its address (`names_in_cache`, built on first need).
fn names_for<'a>(
    key: &FqdnKey,
    wanted_by: &'a HashMap<FqdnKey, Vec<Arc<str>>>,
    names_in_cache: &mut Option<HashMap<(&'a str, IpAddr), Vec<&'a str>>>,
    entries: &'a [CacheEntry],
    table: &EndpointTable,
) -> Vec<&'a str> {
    let mut names: Vec<&str> = wanted_by
        .get(key)
        .into_iter()
        .flatten()
        .map(|name| &**name)
        .collect();
    if names.is_empty() {
        let index = names_in_cache.get_or_insert_with(|| names_by_address(entries));
        if let Some(endpoint) = table.key_of(EndpointId(key.endpoint_id)) {
            names.extend(index.get(&(&**endpoint, key.ip)).into_iter().flatten());
        }
    }
    names
}

/// The names each (endpoint, address) of the cache's entries stands for.
fn names_by_address(entries: &[CacheEntry]) -> HashMap<(&str, IpAddr), Vec<&str>> {
    let mut names: HashMap<(&str, IpAddr), Vec<&str>> = HashMap::new();
    for entry in entries {
        for cached in &entry.ips {
            names
                .entry((&entry.endpoint, cached.ip.to_canonical()))
                .or_default()
                .push(&entry.name);
        }
    }
    names
}

/// The first IPv4 and IPv6 addresses among `addresses`.
fn targets(addresses: &[SocketAddr]) -> (Option<SocketAddrV4>, Option<SocketAddrV6>) {
    let v4 = addresses.iter().find_map(|address| match address {
        SocketAddr::V4(v4) => Some(*v4),
        SocketAddr::V6(_) => None,
    });
    let v6 = addresses.iter().find_map(|address| match address {
        SocketAddr::V6(v6) => Some(*v6),
        SocketAddr::V4(_) => None,
    });
    (v4, v6)
}

/// An endpoint's cgroup: absolute as given, or relative to the datapath's cgroup root.
pub fn resolve_cgroup(root: &Path, cgroup: &Path) -> PathBuf {
    if cgroup.is_absolute() {
        cgroup.to_path_buf()
    } else {
        root.join(cgroup)
    }
}

/// Adds `rules` to `into` ([`merge_port_rules`]: a rule another covers goes). The map holds 8
/// rules a prefix.
fn merge_rules(into: &mut Vec<PortRule>, rules: &[PortRule]) {
    merge_port_rules(into, rules);
    if into.len() > warden_datapath::PORT_RULES_PER_PREFIX {
        // Met again at every pass: one line per interval (`warden policy validate` warns of
        // a rule that makes too many by itself).
        static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
        if let Some(held_back) = BUDGET.allow() {
            tracing::error!(
                rules = into.len(),
                held_back,
                "more than {} port rules for one prefix; the rest are refused",
                warden_datapath::PORT_RULES_PER_PREFIX
            );
        }
        into.truncate(warden_datapath::PORT_RULES_PER_PREFIX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_port_absorbs_other_rules() {
        let mut rules = vec![PortRule::port(TCP, 80)];
        merge_rules(&mut rules, &[PortRule::ANY]);
        assert_eq!(rules, vec![PortRule::ANY]);
        merge_rules(&mut rules, &[PortRule::port(UDP, 53)]);
        assert_eq!(rules, vec![PortRule::ANY]);
    }

    /// An enrollment that enforces comes after the allow entries of its pass (a pod a new policy
    /// selects must not meet its default deny without its allows); one that lifts or does not
    /// enforce comes before them, so that entries the pass removes are no longer needed.
    #[test]
    fn an_enforcing_enrollment_waits_for_the_entries() {
        let entry = |endpoint_id, enforced| EndpointEntry {
            endpoint_id,
            enforced,
            redirect_dns: true,
        };
        let after = |interim| EnrollmentWrite::AfterEntries { interim };
        let cases = [
            // A new pod: its DNS redirected at once, enforced at the end.
            (None, entry(1, true), after(Some(entry(1, false)))),
            (None, entry(1, false), EnrollmentWrite::BeforeEntries),
            (Some(entry(1, false)), entry(1, true), after(None)),
            (
                Some(entry(1, true)),
                entry(1, false),
                EnrollmentWrite::BeforeEntries,
            ),
            // Enforced under another ID until the end, under that ID's entries.
            (Some(entry(1, true)), entry(2, true), after(None)),
            (
                Some(entry(1, false)),
                entry(2, true),
                after(Some(entry(2, false))),
            ),
            (
                Some(entry(1, true)),
                entry(1, true),
                EnrollmentWrite::Unchanged,
            ),
            (
                Some(entry(1, false)),
                entry(1, false),
                EnrollmentWrite::Unchanged,
            ),
        ];
        for (current, wanted, expected) in cases {
            assert_eq!(
                enrollment_write(current.as_ref(), &wanted),
                expected,
                "{current:?} -> {wanted:?}"
            );
        }
    }

    /// `port: 0` is every port of TCP and of UDP: it absorbs their single ports, whichever
    /// comes first, but not another protocol's.
    #[test]
    fn every_port_of_a_protocol_absorbs_its_ports() {
        let all_tcp = PortRule::range(Some(TCP), 0, u16::MAX);
        let mut rules = vec![PortRule::port(TCP, 80), PortRule::port(UDP, 53)];
        merge_rules(&mut rules, &[all_tcp]);
        assert_eq!(rules, vec![PortRule::port(UDP, 53), all_tcp]);
        merge_rules(
            &mut rules,
            &[
                PortRule::port(TCP, 443),
                PortRule::range(Some(TCP), 8000, 8080),
            ],
        );
        assert_eq!(rules, vec![PortRule::port(UDP, 53), all_tcp]);
        merge_rules(&mut rules, &[PortRule::port(132, 9)]);
        assert_eq!(rules.len(), 3, "SCTP is not TCP: {rules:?}");
    }
}
