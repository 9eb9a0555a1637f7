use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// The whole configuration file of `warden-agent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub dns: DnsConfig,
    pub policy: PolicyConfig,
    /// Workloads and known servers. A workload is identified by its IPs (and, with the eBPF
    /// datapath, by its cgroup); servers listed here can be selected by `toEndpoints`.
    pub endpoints: Vec<EndpointConfig>,
    /// A folder of endpoint files (`*.yaml`, `*.yml`, `*.json`, each a list like `endpoints`),
    /// watched: workloads come and go without a restart (a CNI plugin or a pod watcher writes
    /// one file per pod). Added to `endpoints`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints_dir: Option<PathBuf>,
    pub admin: AdminConfig,
    /// Where the FQDN cache (and later the policy snapshot) is persisted across restarts.
    pub state_dir: PathBuf,
    pub datapath: DatapathConfig,
    /// The Unix socket `warden-dnsproxy` connects to.
    pub socket: PathBuf,
    /// Group allowed on the socket (mode 0660); none: root and the agent's user only (0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
}

/// Where `warden-dnsproxy` finds the agent by default.
pub const DEFAULT_SOCKET: &str = "/run/warden/agent.sock";

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            dns: DnsConfig::default(),
            policy: PolicyConfig::default(),
            endpoints: Vec::new(),
            endpoints_dir: None,
            admin: AdminConfig::default(),
            state_dir: PathBuf::from("/var/lib/warden"),
            datapath: DatapathConfig::default(),
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_group: None,
        }
    }
}

/// The whole configuration file of `warden-dnsproxy`: the `dns` section is the agent's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub dns: DnsConfig,
    /// The agent's Unix socket.
    pub socket: PathBuf,
    /// Where the last policy snapshot is kept, so a start without the agent enforces at once.
    pub state_dir: PathBuf,
    pub admin: AdminConfig,
    pub datapath: ProxyDatapathConfig,
    /// Mappings kept for the agent while it is away; past this the oldest are dropped (counted).
    pub journal_max: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            dns: DnsConfig::default(),
            socket: PathBuf::from(DEFAULT_SOCKET),
            state_dir: PathBuf::from("/var/lib/warden-dnsproxy"),
            admin: AdminConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 9891)),
            },
            datapath: ProxyDatapathConfig::default(),
            journal_max: 100_000,
        }
    }
}

/// The standalone proxy writes allow entries into the agent's pinned maps; it never loads or
/// attaches programs. Whether the datapath is on comes from the agent's snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyDatapathConfig {
    pub bpffs: PathBuf,
}

impl Default for ProxyDatapathConfig {
    fn default() -> Self {
        ProxyDatapathConfig {
            bpffs: PathBuf::from("/sys/fs/bpf/warden"),
        }
    }
}

impl ProxyConfig {
    pub fn from_yaml(text: &str, origin: &Path) -> Result<ProxyConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(ProxyConfig::default());
        }
        yaml_serde::from_str(text).map_err(|error| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: error.to_string(),
        })
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        for path in [&mut self.state_dir, &mut self.socket] {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.dns.validate()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Addresses the proxy answers on; each socket is opened with SO_REUSEPORT.
    pub listen: Vec<SocketAddr>,
    /// Where queries go when the client's original destination is not known.
    pub upstream: SocketAddr,
    pub reject: RejectCode,
    /// Floor for the TTL recorded in the cache, in seconds (the answer itself is not changed).
    pub min_ttl: u32,
    /// Ceiling on the TTLs of answers, in seconds: longer ones are lowered in the answer the
    /// client gets and in the cache alike, so that no answer keeps its allow entries for longer
    /// than this (before `min_ttl` raises the cache's copy). 0 = as the upstream gave them.
    pub max_ttl: u32,
    /// Cap on IPs kept per name and endpoint; the soonest-expiring go first. 0 = unlimited.
    pub max_ips_per_name: usize,
    /// Cap on names cached per endpoint, so one client cannot grow the node's memory without
    /// bound: an answer for a further name is not cached (SERVFAIL if the endpoint's own
    /// toFQDNs rules match it, else released as it is) until some are swept. 0 = unlimited.
    pub max_names_per_endpoint: usize,
    /// Longest time an answer is held back while its allow entries are being written.
    pub response_max_delay_ms: u64,
    pub upstream_timeout_ms: u64,
    /// Queries in flight at once; past it the proxy answers SERVFAIL. 0 = unlimited.
    pub concurrency_limit: usize,
    /// An IP with traffic in the last this-many seconds stays allowed after its TTL.
    pub idle_grace_s: u64,
    /// UDP sockets shared by all queries toward upstream servers.
    pub upstream_sockets: usize,
    /// UDP sockets per listen address (SO_REUSEPORT), each read by a loop of its own, so that
    /// a node's queries are checked on several cores at once. 0 = one per CPU the process may
    /// use (see [`method@DnsConfig::listen_sockets`]).
    pub listen_sockets: usize,
    /// Which process gets the DNS port's queries when both hold it (eBPF datapath only).
    pub prefer: Prefer,
}

/// Who serves when the agent and `warden-dnsproxy` both hold the DNS port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    Agent,
    /// The default: agent upgrades, which are the frequent ones, then never touch DNS.
    #[default]
    Dnsproxy,
    /// The kernel's hash spreads queries over both.
    Share,
}

impl std::str::FromStr for Prefer {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "agent" => Ok(Prefer::Agent),
            "dnsproxy" => Ok(Prefer::Dnsproxy),
            "share" => Ok(Prefer::Share),
            other => Err(format!(
                "unknown prefer {other:?} (agent | dnsproxy | share)"
            )),
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 10053)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 10053)),
            ],
            upstream: SocketAddr::from(([127, 0, 0, 153], 53)),
            reject: RejectCode::Refused,
            min_ttl: 0,
            max_ttl: 0,
            max_ips_per_name: 1000,
            max_names_per_endpoint: 10_000,
            response_max_delay_ms: 100,
            upstream_timeout_ms: 2000,
            concurrency_limit: 0,
            idle_grace_s: 60,
            upstream_sockets: 8,
            listen_sockets: 0,
            prefer: Prefer::default(),
        }
    }
}

impl DnsConfig {
    pub fn response_max_delay(&self) -> Duration {
        Duration::from_millis(self.response_max_delay_ms)
    }

    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_timeout_ms)
    }

    /// UDP sockets per listen address: `listen_sockets`, or when 0 one per CPU this process may
    /// use (its affinity and cgroup quota count), at most `AUTO_LISTEN_SOCKETS`.
    pub fn listen_sockets(&self) -> usize {
        if self.listen_sockets > 0 {
            return self.listen_sockets;
        }
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .min(AUTO_LISTEN_SOCKETS)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::invalid(
                "dns.listen",
                "needs at least one address",
            ));
        }
        if self.upstream.port() == 0 {
            return Err(ConfigError::invalid(
                "dns.upstream",
                "port 0 is not a server",
            ));
        }
        if self.upstream_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "dns.upstream_timeout_ms",
                "must be greater than 0",
            ));
        }
        if !(1..=MAX_UPSTREAM_SOCKETS).contains(&self.upstream_sockets) {
            return Err(ConfigError::invalid(
                "dns.upstream_sockets",
                format!("must be 1 to {MAX_UPSTREAM_SOCKETS}"),
            ));
        }
        if self.listen_sockets > MAX_LISTEN_SOCKETS {
            return Err(ConfigError::invalid(
                "dns.listen_sockets",
                format!("at most {MAX_LISTEN_SOCKETS} (0 is one per CPU)"),
            ));
        }
        // A TTL of 2^31 s or more reads as 0 (RFC 2181 §8): a ceiling up there would leave such
        // TTLs in answers while the cache takes them for 0.
        if self.max_ttl > i32::MAX.unsigned_abs() {
            return Err(ConfigError::invalid(
                "dns.max_ttl",
                format!("at most {} s (0 is no ceiling)", i32::MAX),
            ));
        }
        // The peer refuses a mapping expiring further out than any DNS TTL can (RFC 2181), so
        // neither floor may take an entry there.
        if self.min_ttl > i32::MAX.unsigned_abs() {
            return Err(ConfigError::invalid(
                "dns.min_ttl",
                format!("at most {} s", i32::MAX),
            ));
        }
        if self.idle_grace_s > u64::from(i32::MAX.unsigned_abs()) {
            return Err(ConfigError::invalid(
                "dns.idle_grace_s",
                format!("at most {} s", i32::MAX),
            ));
        }
        if self.concurrency_limit > MAX_CONCURRENCY_LIMIT {
            return Err(ConfigError::invalid(
                "dns.concurrency_limit",
                format!("at most {MAX_CONCURRENCY_LIMIT} (0 is unlimited)"),
            ));
        }
        Ok(())
    }
}

/// More upstream sockets than this buys nothing but file descriptors.
const MAX_UPSTREAM_SOCKETS: usize = 1024;
/// More listener sockets per address than cores only add wake-ups (the address's 8 MiB of
/// receive buffers are shared out among them). The datapath's spread (`WARDEN_REUSEPORT_SPREAD`) holds this many
/// beside a process's first: raised here, the further sockets would get no queries the
/// datapath steers.
const MAX_LISTEN_SOCKETS: usize = 64;
/// The most listener sockets per address `listen_sockets: 0` opens, however many CPUs: past a
/// few, a DNS proxy's queries are not what keeps a node's cores busy.
const AUTO_LISTEN_SOCKETS: usize = 8;
/// Far above any real need, and within what the proxy's semaphore can count.
const MAX_CONCURRENCY_LIMIT: usize = 1_000_000;

/// The answer a denied query gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectCode {
    #[default]
    Refused,
    Nxdomain,
}

impl std::str::FromStr for RejectCode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "refused" => Ok(RejectCode::Refused),
            "nxdomain" => Ok(RejectCode::Nxdomain),
            other => Err(format!(
                "unknown reject code {other:?} (refused | nxdomain)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// A folder of CiliumNetworkPolicy YAML files, watched for changes.
    pub dir: PathBuf,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: PathBuf::from("/etc/warden/policies"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The workload's cgroup (eBPF datapath); relative paths are under `datapath.cgroup_root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Where the datapath redirects this endpoint's DNS (one IPv4 and/or one IPv6 address).
    /// Empty: the first IPv4 and IPv6 addresses of `dns.listen`, which suits workloads in the
    /// host's network namespace; pods in their own namespace need an address they can reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_target: Vec<SocketAddr>,
    /// Only a peer of other endpoints' rules, never their subject: an address standing for
    /// what is behind it, as a Kubernetes Service's ClusterIP, labelled as the pods its
    /// selector picks, stands for them to `toEndpoints` (a pod's queries go to the kube-dns
    /// Service, not to a kube-dns pod). No `endpointSelector` selects it; it has no cgroup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peer_only: bool,
}

fn default_namespace() -> String {
    "default".to_owned()
}

impl EndpointConfig {
    /// `namespace/name`, the endpoint's stable key in caches and listings.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin HTTP API: health, status, metrics, FQDN cache.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9890)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatapathConfig {
    pub mode: DatapathMode,
    /// cgroup v2 folder the programs attach to; detected when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs folder for pinned maps and links.
    pub bpffs: PathBuf,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            mode: DatapathMode::None,
            cgroup_root: None,
            bpffs: PathBuf::from("/sys/fs/bpf/warden"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// DNS only: answers are policed, connections are not.
    #[default]
    None,
    /// Transparent DNS redirect and egress enforcement in pinned eBPF programs.
    Ebpf,
}

impl std::str::FromStr for DatapathMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "none" => Ok(DatapathMode::None),
            "ebpf" => Ok(DatapathMode::Ebpf),
            other => Err(format!("unknown datapath mode {other:?} (none | ebpf)")),
        }
    }
}

impl AgentConfig {
    /// Parses YAML text; `origin` only names the file in errors.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<AgentConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(AgentConfig::default());
        }
        yaml_serde::from_str(text).map_err(|error| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: error.to_string(),
        })
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let absolute = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        absolute(&mut self.policy.dir);
        if let Some(dir) = &mut self.endpoints_dir {
            absolute(dir);
        }
        absolute(&mut self.state_dir);
        absolute(&mut self.socket);
    }

    /// Checks what serde cannot: ranges, duplicates, and fields that must not be empty.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.dns.validate()?;
        validate_endpoints(&self.endpoints)
    }
}

/// Reads an endpoint file of `endpoints_dir`: a list of entries like the config's `endpoints`
/// (empty text: none).
pub fn endpoints_from_yaml(text: &str, origin: &Path) -> Result<Vec<EndpointConfig>, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    yaml_serde::from_str(text).map_err(|error| ConfigError::Parse {
        path: origin.to_path_buf(),
        message: error.to_string(),
    })
}

/// What serde cannot check in a list of endpoints: names, duplicate keys, addresses with two
/// owners, DNS targets.
pub fn validate_endpoints(endpoints: &[EndpointConfig]) -> Result<(), ConfigError> {
    let mut keys = HashSet::new();
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (index, endpoint) in endpoints.iter().enumerate() {
        let field = format!("endpoints[{index}]");
        if endpoint.name.is_empty() {
            return Err(ConfigError::invalid(
                format!("{field}.name"),
                "must not be empty",
            ));
        }
        if !keys.insert(endpoint.key()) {
            return Err(ConfigError::invalid(
                format!("{field}.name"),
                format!("endpoint {} is declared twice", endpoint.key()),
            ));
        }
        if endpoint.peer_only && endpoint.cgroup.is_some() {
            return Err(ConfigError::invalid(
                format!("{field}.cgroup"),
                "a peer_only endpoint sends nothing of its own: it has no cgroup",
            ));
        }
        let v4_targets = endpoint.dns_target.iter().filter(|t| t.is_ipv4()).count();
        if v4_targets > 1 || endpoint.dns_target.len() - v4_targets > 1 {
            return Err(ConfigError::invalid(
                format!("{field}.dns_target"),
                "at most one IPv4 and one IPv6 address",
            ));
        }
        // Compared as the endpoint tables key them: `::ffff:10.0.0.5` is 10.0.0.5 there,
        // and a second owner would silently take the address over.
        for ip in &endpoint.ips {
            let canonical = ip.to_canonical();
            if let Some(previous) = owners.insert(canonical, endpoint.key()) {
                let same = if canonical == *ip {
                    String::new()
                } else {
                    format!(" (as {canonical})")
                };
                let message = if previous == endpoint.key() {
                    format!("{ip}{same} is listed twice")
                } else {
                    format!("{ip}{same} already belongs to endpoint {previous}")
                };
                return Err(ConfigError::invalid(format!("{field}.ips"), message));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `config.yaml` of the ConfigMap `name` in one of the repository's Kubernetes manifests.
    fn deployed_config(manifest: &str, name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/kubernetes")
            .join(manifest);
        let text = std::fs::read_to_string(&path).expect("the manifest");
        for document in yaml_serde::Deserializer::from_str(&text) {
            let value = yaml_serde::Value::deserialize(document).expect("manifest YAML");
            if value["kind"] == "ConfigMap" && value["metadata"]["name"] == name {
                return value["data"]["config.yaml"]
                    .as_str()
                    .expect("a config.yaml")
                    .to_owned();
            }
        }
        panic!("no ConfigMap {name} in {manifest}");
    }

    /// A field renamed or mistyped in the shipped manifests would stop the DaemonSet's pods
    /// at start (unknown fields are errors).
    #[test]
    fn the_shipped_configs_load_and_validate() {
        let origin = Path::new("config.yaml");
        let agent = deployed_config("warden-agent.yaml", "warden-agent-config");
        let agent = AgentConfig::from_yaml(&agent, origin).expect("the agent's config");
        agent.validate().expect("the agent's config validates");
        let proxy = deployed_config("warden-dnsproxy.yaml", "warden-dnsproxy-config");
        let proxy = ProxyConfig::from_yaml(&proxy, origin).expect("the dnsproxy's config");
        proxy.validate().expect("the dnsproxy's config validates");
        assert_eq!(agent.dns.listen, proxy.dns.listen, "both hold one port");
        assert_eq!(
            agent.dns.max_ttl, proxy.dns.max_ttl,
            "answers alike from both"
        );
    }

    const CONTRACT: &str = r#"
dns:
  listen: ["127.0.0.1:10053", "[::1]:10053"]
  upstream: "127.0.0.153:53"
  reject: refused
  min_ttl: 0
  max_ips_per_name: 1000
  response_max_delay_ms: 100
  upstream_timeout_ms: 2000
  concurrency_limit: 0
policy:
  dir: ./policies
endpoints:
  - name: test
    namespace: youssef
    labels: {app: test}
    ips: ["127.0.0.2"]
admin:
  listen: "127.0.0.1:9890"
state_dir: ./state
datapath:
  mode: none
"#;

    #[test]
    fn the_documented_contract_parses() {
        let config = AgentConfig::from_yaml(CONTRACT, Path::new("c.yaml")).unwrap();
        assert_eq!(config.dns.listen.len(), 2);
        assert_eq!(config.dns.upstream, "127.0.0.153:53".parse().unwrap());
        assert_eq!(config.dns.reject, RejectCode::Refused);
        assert_eq!(config.endpoints[0].key(), "youssef/test");
        assert_eq!(config.endpoints[0].labels["app"], "test");
        assert_eq!(config.datapath.mode, DatapathMode::None);
        config.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_errors_naming_the_field() {
        let error = AgentConfig::from_yaml("dns:\n  upstrem: 1.2.3.4:53\n", Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("c.yaml"), "{error}");
        assert!(error.contains("upstrem"), "{error}");
    }

    #[test]
    fn bad_values_are_errors() {
        let error = AgentConfig::from_yaml("dns:\n  reject: maybe\n", Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("maybe"), "{error}");
        let error = AgentConfig::from_yaml("dns:\n  listen: [nowhere]\n", Path::new("c.yaml"));
        assert!(error.is_err());
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = AgentConfig::from_yaml("", Path::new("c.yaml")).unwrap();
        assert_eq!(config, AgentConfig::default());
        assert_eq!(config.dns.idle_grace_s, 60);
    }

    #[test]
    fn duplicate_endpoints_and_shared_ips_are_rejected() {
        let mut config = AgentConfig::from_yaml(CONTRACT, Path::new("c.yaml")).unwrap();
        let mut twin = config.endpoints[0].clone();
        config.endpoints.push(twin.clone());
        assert!(config.validate().unwrap_err().to_string().contains("twice"));
        config.endpoints.pop();
        twin.name = "other".into();
        config.endpoints.push(twin);
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("127.0.0.2 already belongs"), "{error}");

        // The same address as an IPv4-mapped IPv6 one once passed, and the second endpoint
        // silently took it over in the endpoint tables.
        config.endpoints.pop();
        let mut mapped = config.endpoints[0].clone();
        mapped.name = "mapped".into();
        mapped.ips = vec!["::ffff:127.0.0.2".parse().unwrap()];
        config.endpoints.push(mapped);
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("::ffff:127.0.0.2 (as 127.0.0.2) already belongs"),
            "{error}"
        );
        // Both forms in one endpoint say so, not that it owns the address already.
        config.endpoints.pop();
        config.endpoints[0]
            .ips
            .push("::ffff:127.0.0.2".parse().unwrap());
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("(as 127.0.0.2) is listed twice"), "{error}");
    }

    #[test]
    fn a_peer_only_endpoint_has_no_cgroup() {
        let yaml = "- {name: 'service:kube-dns', namespace: kube-system, ips: [10.96.0.10], \
                    labels: {k8s-app: kube-dns}, peer_only: true}";
        let endpoints = endpoints_from_yaml(yaml, Path::new("s.yaml")).unwrap();
        validate_endpoints(&endpoints).unwrap();
        assert!(endpoints[0].peer_only);
        let mut with_cgroup = endpoints.clone();
        with_cgroup[0].cgroup = Some(PathBuf::from("kubepods.slice"));
        let error = validate_endpoints(&with_cgroup).unwrap_err().to_string();
        assert!(error.contains("endpoints[0].cgroup"), "{error}");
    }

    #[test]
    fn limits_past_what_the_proxy_can_use_are_rejected() {
        let mut config = AgentConfig::from_yaml(CONTRACT, Path::new("c.yaml")).unwrap();
        config.dns.concurrency_limit = usize::MAX;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("dns.concurrency_limit"), "{error}");
        config.dns.concurrency_limit = 0;
        config.dns.upstream_sockets = 1 << 40;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("dns.upstream_sockets"), "{error}");
        config.dns.upstream_sockets = 8;
        config.dns.listen_sockets = 65;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("dns.listen_sockets"), "{error}");
        config.dns.listen_sockets = 0;
        assert!((1..=AUTO_LISTEN_SOCKETS).contains(&config.dns.listen_sockets()));
        config.dns.listen_sockets = 3;
        assert_eq!(config.dns.listen_sockets(), 3);
        config.dns.max_ttl = 1 << 31;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("dns.max_ttl"), "{error}");
        config.dns.max_ttl = (1 << 31) - 1;
        config.validate().expect("the longest TTL there is");
        // The floors too: the peer would refuse every mapping kept past any TTL.
        config.dns.min_ttl = 1 << 31;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("dns.min_ttl"), "{error}");
        config.dns.min_ttl = (1 << 31) - 1;
        config.dns.idle_grace_s = 1 << 31;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("dns.idle_grace_s"), "{error}");
        config.dns.idle_grace_s = (1 << 31) - 1;
        config.validate().expect("the longest floors there are");
        config.dns.max_ttl = 1 << 31;
        // The standalone proxy's config shares the section and its checks.
        let proxy = ProxyConfig {
            dns: config.dns.clone(),
            ..ProxyConfig::default()
        };
        assert!(proxy.validate().is_err());
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut config = AgentConfig::from_yaml(CONTRACT, Path::new("c.yaml")).unwrap();
        config.resolve_paths(Path::new("/lab"));
        assert_eq!(config.policy.dir, PathBuf::from("/lab/./policies"));
        assert_eq!(config.state_dir, PathBuf::from("/lab/./state"));
    }
}
