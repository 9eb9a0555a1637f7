//! The bench's lab: knotd serving a zone of its own, the policy of 100 selectors and the query
//! mix, and the servers under test as processes (`warden-agent`, `warden-dnsproxy` when it is
//! built, dnsdist), each on its own loopback address.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hickory_proto::rr::RecordType;
use tempfile::TempDir;
use warden_config::{AgentConfig, EndpointConfig, ProxyConfig};
use warden_tests::warden::{AgentDir, http_get};
use warden_tests::zones::{Zone, ZoneRecord};
use warden_tests::{KnotUpstream, ProcessGuard, free_port, lab_zones, tool_path};

use crate::load::QueryTemplate;

/// The zone every query of the mix is in; `.example` is reserved, nothing real answers it.
pub const ZONE: &str = "bench.example.";
pub const NAMESPACE: &str = "bench";
pub const ENDPOINT: &str = "client";
/// The only destination port the datapath redirects to the proxy.
pub const DNS_PORT: u16 = 53;
/// The `toFQDNs` grant's port: any port will do, the datapath only keys allow entries by it.
const GRANT_PORT: u16 = 443;

/// One selector of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Name(String),
    Pattern(String),
}

impl Selector {
    fn yaml(&self) -> String {
        match self {
            Selector::Name(name) => format!("matchName: \"{name}\""),
            Selector::Pattern(pattern) => format!("matchPattern: \"{pattern}\""),
        }
    }
}

/// The 100 selectors of the realistic policy: literal names and the pattern shapes policies
/// use (`*.x`, `**.x`, `prefix*.x`, `*-suffix.x`), under distinct subdomains.
pub fn selectors() -> Vec<Selector> {
    let z = ZONE.trim_end_matches('.');
    let mut out = Vec::with_capacity(100);
    out.extend((0..40).map(|i| Selector::Name(format!("api{i}.svc.{z}"))));
    out.extend((0..30).map(|i| Selector::Pattern(format!("*.app{i}.{z}"))));
    out.extend((0..15).map(|i| Selector::Pattern(format!("**.team{i}.{z}"))));
    out.extend((0..10).map(|i| Selector::Pattern(format!("cdn*.edge{i}.{z}"))));
    out.push(Selector::Name(format!("login.{z}")));
    out.push(Selector::Name(format!("mail.{z}")));
    out.push(Selector::Name(format!("status.{z}")));
    out.push(Selector::Pattern(format!("img-*.media.{z}")));
    out.push(Selector::Pattern(format!("*-prod.db.{z}")));
    out
}

/// The query mix, in sending order: 70 names the policy allows and 30 it denies, the denied
/// ones spread evenly (every name exists in the zone, so direct and dnsdist answer NOERROR).
pub fn query_mix() -> Vec<(String, bool)> {
    let z = ZONE.trim_end_matches('.');
    let mut allowed: Vec<String> = Vec::with_capacity(70);
    allowed.extend((0..30).map(|i| format!("api{i}.svc.{z}")));
    allowed.extend((0..20).map(|i| format!("www.app{i}.{z}")));
    allowed.extend((0..10).map(|i| format!("x.y.team{i}.{z}")));
    allowed.extend((0..5).map(|i| format!("cdn{i}.edge{i}.{z}")));
    for name in ["login", "mail", "status", "img-1.media", "web-prod.db"] {
        allowed.push(format!("{name}.{z}"));
    }
    let mut denied: Vec<String> = Vec::with_capacity(30);
    // Near misses of every selector shape.
    denied.extend((0..10).map(|i| format!("api{i}.svc2.{z}")));
    denied.extend((0..10).map(|i| format!("app{i}.{z}")));
    denied.extend((0..5).map(|i| format!("team{i}.{z}")));
    denied.extend((0..5).map(|i| format!("www.edge{i}.{z}")));
    let mut allowed = allowed.into_iter();
    let mut denied = denied.into_iter();
    let mut mix = Vec::with_capacity(100);
    for k in 0..100 {
        let next = if matches!(k % 10, 2 | 5 | 8) {
            denied.next().map(|n| (n, false))
        } else {
            allowed.next().map(|n| (n, true))
        };
        mix.extend(next);
    }
    mix
}

/// The mix as load-client templates (A queries).
pub fn templates() -> Result<Arc<Vec<QueryTemplate>>> {
    let templates = query_mix()
        .iter()
        .map(|(name, allowed)| QueryTemplate::new(&format!("{name}."), RecordType::A, *allowed))
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(templates))
}

/// The zone holding every name of the mix, one A record each (TTL 300: after the first pass
/// the cache only refreshes, as with a steady workload).
pub fn bench_zone() -> Zone {
    let mut zone = Zone::new(ZONE);
    let z = format!(".{}", ZONE.trim_end_matches('.'));
    for (index, (name, _)) in query_mix().iter().enumerate() {
        let owner = name.strip_suffix(&z).unwrap_or(name);
        let ip = format!("198.18.{}.{}", 100 + index / 250, index % 250 + 1);
        zone.records.push(ZoneRecord::new(owner, 300, "A", ip));
    }
    zone
}

/// knotd serving the lab zones and the bench zone on `ip`: as root on port 53, so that a client
/// in an enrolled cgroup asking it is redirected to the proxy (the datapath redirects port 53
/// only), else, or when something holds port 53 on every address, on a free port (and (g)
/// says it cannot run).
pub fn start_knot(ip: IpAddr) -> Result<KnotUpstream> {
    let mut zones = lab_zones();
    zones.push(bench_zone());
    if nix::unistd::geteuid().is_root() {
        match KnotUpstream::start_on_with_zones(SocketAddr::new(ip, DNS_PORT), zones.clone()) {
            Ok(knot) => return Ok(knot),
            Err(error) => {
                eprintln!("warden-bench: knotd on {ip}:{DNS_PORT}: {error:#}; on a free port");
            }
        }
    }
    KnotUpstream::start_with_zones(ip, zones)
}

/// The dnsperf query file of the mix.
pub fn dnsperf_queries() -> Result<tempfile::NamedTempFile> {
    let mix = query_mix();
    let lines: Vec<(&str, &str)> = mix.iter().map(|(name, _)| (name.as_str(), "A")).collect();
    warden_tests::write_queries_file(&lines)
}

/// The dnsperf query file of the mix's allowed names only: through the agent every query is
/// forwarded, as through dnsdist, which the mix's denied names (answered by the agent itself)
/// spare it.
pub fn dnsperf_allowed_queries() -> Result<tempfile::NamedTempFile> {
    let mix = query_mix();
    let lines: Vec<(&str, &str)> = mix
        .iter()
        .filter(|(_, allowed)| *allowed)
        .map(|(name, _)| (name.as_str(), "A"))
        .collect();
    warden_tests::write_queries_file(&lines)
}

/// The policy: `app=bench` may ask the upstream (and only it) for the 100 selectors, and
/// reach what they resolve to on 443/TCP.
pub fn policy_yaml(upstream: SocketAddr) -> String {
    let selectors: Vec<String> = selectors().iter().map(Selector::yaml).collect();
    policy_listing(&selectors, upstream)
}

/// A policy for `app=bench` whose `rules.dns` (toward `upstream` only) and `toFQDNs` (443/TCP)
/// both list `selectors` (YAML such as `matchName: "a.io"`), as a Cilium policy pairing the
/// two does. The policy-cost bench uses it at every size.
pub fn policy_listing(selectors: &[String], upstream: SocketAddr) -> String {
    let mut dns = String::new();
    let mut fqdns = String::new();
    for selector in selectors {
        let _ = writeln!(dns, "        - {selector}");
        let _ = writeln!(fqdns, "    - {selector}");
    }
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench
  namespace: {NAMESPACE}
spec:
  endpointSelector:
    matchLabels:
      app: bench
  egress:
  - toCIDR: ["{ip}/32"]
    toPorts:
    - ports:
      - port: "{port}"
        protocol: ANY
      rules:
        dns:
{dns}  - toFQDNs:
{fqdns}    toPorts:
    - ports:
      - port: "{GRANT_PORT}"
        protocol: TCP
"#,
        ip = upstream.ip(),
        port = upstream.port(),
    )
}

/// The endpoint the load comes from: it owns the client's source address.
pub fn endpoint(client: IpAddr) -> EndpointConfig {
    EndpointConfig {
        name: ENDPOINT.to_owned(),
        namespace: NAMESPACE.to_owned(),
        labels: [("app".to_owned(), "bench".to_owned())].into(),
        ips: vec![client],
        cgroup: None,
        dns_target: Vec::new(),
        peer_only: false,
    }
}

/// A folder with the policy and an agent config serving DNS on exactly `dns`, admin on a free
/// port of 127.0.0.1, `client` as the policed endpoint.
pub fn agent_setup(
    dns: SocketAddr,
    upstream: SocketAddr,
    client: IpAddr,
) -> Result<(AgentDir, AgentConfig)> {
    let dir = AgentDir::new()?;
    dir.write_policy("bench.yaml", &policy_yaml(upstream))?;
    let mut config = dir.config(dns.ip(), upstream);
    config.dns.listen = vec![dns];
    config.dns.upstream_timeout_ms = 2000;
    let admin_ip: IpAddr = [127, 0, 0, 1].into();
    config.admin.listen = SocketAddr::new(admin_ip, free_port(admin_ip)?);
    config.endpoints = vec![endpoint(client)];
    Ok((dir, config))
}

/// The agent's API socket, in its folder (the default is machine-wide).
fn agent_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

/// A free port on `ip` for a server in another process.
pub fn addr_on(ip: IpAddr) -> Result<SocketAddr> {
    Ok(SocketAddr::new(ip, free_port(ip)?))
}

/// A Warden process (`warden-agent` or `warden-dnsproxy`) run from its binary with a config
/// file, restartable on the same ports.
#[derive(Debug)]
pub struct Daemon {
    pub name: &'static str,
    binary: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    pub admin: SocketAddr,
    guard: Option<ProcessGuard>,
}

impl Daemon {
    /// The agent of `dir` with `config`, started and ready; its API socket (for a
    /// `warden-dnsproxy` beside it) goes into the folder.
    pub async fn agent(dir: &AgentDir, config: &AgentConfig) -> Result<Daemon> {
        let mut config = config.clone();
        config.socket = agent_socket(dir.path());
        let config_path = dir.path().join("agent.yaml");
        // JSON is YAML.
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
        let mut daemon = Daemon {
            name: "warden-agent",
            binary: warden_tests::warden::binary("warden-agent")?,
            config_path,
            log_path: dir.path().join("agent.log"),
            admin: config.admin.listen,
            guard: None,
        };
        daemon.spawn()?;
        daemon.wait_ready(Duration::from_secs(15)).await?;
        Ok(daemon)
    }

    /// `warden-dnsproxy` beside the agent of `dir`: the agent's `dns` section (so the same DNS
    /// address, shared with SO_REUSEPORT), its socket, a state folder and an admin address of
    /// its own. `None` when the binary is not built.
    pub async fn dnsproxy(dir: &Path, agent: &AgentConfig) -> Result<Option<Daemon>> {
        let Ok(binary) = warden_tests::warden::binary("warden-dnsproxy") else {
            return Ok(None);
        };
        let state_dir = dir.join("dnsproxy-state");
        std::fs::create_dir_all(&state_dir)?;
        let admin_ip: IpAddr = [127, 0, 0, 1].into();
        let mut config = ProxyConfig {
            dns: agent.dns.clone(),
            socket: agent_socket(dir),
            state_dir,
            ..ProxyConfig::default()
        };
        config.admin.listen = SocketAddr::new(admin_ip, free_port(admin_ip)?);
        // The agent's pins with the eBPF datapath; without, a folder of the bench's own
        // (`agent_setup`), never the machine's: a dnsproxy without a snapshot opens them.
        config.datapath.bpffs = agent.datapath.bpffs.clone();
        let config_path = dir.join("dnsproxy.yaml");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
        let mut daemon = Daemon {
            name: "warden-dnsproxy",
            binary,
            config_path,
            log_path: dir.join("dnsproxy.log"),
            admin: config.admin.listen,
            guard: None,
        };
        daemon.spawn()?;
        daemon.wait_ready(Duration::from_secs(15)).await?;
        Ok(Some(daemon))
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--config")
            .arg(&self.config_path)
            // Per-query logging would be measured too; warnings still show what went wrong.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // A drain on SIGTERM may take a moment; the guard must not SIGKILL it early.
        self.guard =
            Some(ProcessGuard::spawn(&mut command, self.name)?.with_grace(Duration::from_secs(10)));
        Ok(())
    }

    /// Waits until `/readyz` answers 2xx; returns how long that took.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            if http_get(self.admin, "/readyz").await.is_ok() {
                return Ok(started.elapsed());
            }
            if let Some(guard) = self.guard.as_mut()
                && let Some(status) = guard.try_exited()?
            {
                self.guard = None;
                bail!(
                    "{} exited ({status}) before it was ready; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if started.elapsed() > limit {
                bail!(
                    "{} not ready within {limit:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.guard.as_ref().and_then(ProcessGuard::pid)
    }

    /// SIGTERM and wait for the exit (SIGKILL after the grace period).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.guard.take().context("not running")?.stop()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) -> Result<()> {
        let guard = self.guard.take().context("not running")?;
        guard.signal(nix::sys::signal::Signal::SIGKILL)?;
        // Dropping the guard reaps the (now dead) process.
        drop(guard);
        Ok(())
    }

    pub async fn metrics(&self) -> Result<String> {
        http_get(self.admin, "/metrics").await
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// dnsdist as a plain forwarder to knotd: no packet cache, no console, no web server, and no
/// security polling (which would ask the system resolver at start).
#[derive(Debug)]
pub struct Dnsdist {
    // Before `dir`: the process goes before its folder.
    guard: ProcessGuard,
    pub addr: SocketAddr,
    dir: TempDir,
}

impl Dnsdist {
    pub fn available() -> bool {
        tool_path("dnsdist").is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.guard.pid()
    }

    pub async fn start(ip: IpAddr, upstream: SocketAddr, client: IpAddr) -> Result<Dnsdist> {
        let binary = tool_path("dnsdist").context("dnsdist not found (Debian package dnsdist)")?;
        let dir = tempfile::Builder::new()
            .prefix("warden-bench-dnsdist-")
            .tempdir()?;
        let addr = addr_on(ip)?;
        let conf = dir.path().join("dnsdist.conf");
        std::fs::write(
            &conf,
            format!(
                r#"-- Written by warden-bench: a plain forwarder, nothing beyond loopback.
setSecurityPollSuffix("")
setLocal("{addr}")
-- Health checks ask knotd for a name it serves.
newServer({{address="{upstream}", checkName="{ZONE}", checkType="SOA"}})
"#
            ),
        )?;
        let check = warden_tests::run_blocking(
            Command::new(&binary)
                .arg("--check-config")
                .arg("-C")
                .arg(&conf),
            Duration::from_secs(10),
        )?;
        if !check.status.success() {
            bail!(
                "dnsdist rejects its config: {}",
                String::from_utf8_lossy(&check.stdout)
            );
        }
        let log = std::fs::File::create(dir.path().join("dnsdist.log"))?;
        let guard = ProcessGuard::spawn(
            Command::new(&binary)
                .args(["--supervised", "--disable-syslog", "-C"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
            "dnsdist",
        )?;
        let dnsdist = Dnsdist { guard, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers(addr, client) {
            if Instant::now() > deadline {
                bail!(
                    "dnsdist did not answer on {addr}; log:\n{}",
                    std::fs::read_to_string(dnsdist.dir.path().join("dnsdist.log"))
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(dnsdist)
    }
}

/// Whether `server` answers a query for the bench zone's SOA sent from `source`.
pub fn answers(server: SocketAddr, source: IpAddr) -> bool {
    let probe = || -> Result<bool> {
        let template = QueryTemplate::new(ZONE, RecordType::SOA, true)?;
        let socket = UdpSocket::bind(SocketAddr::new(source, 0))?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        socket.send_to(template.wire(), server)?;
        let mut buffer = [0u8; 1500];
        let (length, from) = socket.recv_from(&mut buffer)?;
        Ok(from == server && length >= 12 && buffer[..2] == template.wire()[..2])
    };
    probe().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use warden_policy::{DnsName, EndpointId, EndpointInfo, L4Proto, Labels, PolicyRepository};

    use super::*;

    #[test]
    fn the_mix_is_seventy_allowed_thirty_denied_and_the_policy_agrees() {
        let selectors = selectors();
        assert_eq!(selectors.len(), 100);
        let mix = query_mix();
        assert_eq!(mix.len(), 100);
        assert_eq!(mix.iter().filter(|(_, allowed)| *allowed).count(), 70);

        let upstream: SocketAddr = "127.0.0.153:5353".parse().unwrap();
        let policies =
            warden_policy::parse_str(&policy_yaml(upstream), Path::new("bench.yaml")).unwrap();
        let labels = [("app".to_owned(), "bench".to_owned())].into();
        let endpoint = EndpointInfo {
            id: EndpointId(1),
            name: ENDPOINT.into(),
            namespace: NAMESPACE.into(),
            labels: Labels::from_k8s(&labels, NAMESPACE),
            ips: vec!["127.9.0.1".parse().unwrap()],
            peer_only: false,
        };
        let repository = PolicyRepository::build(&policies, &[endpoint]);
        assert_eq!(repository.selector_count(), 200);
        for (name, allowed) in &mix {
            let qname = DnsName::new(name).unwrap();
            let verdict = repository.dns_allowed(EndpointId(1), upstream, L4Proto::Udp, &qname);
            assert_eq!(verdict, *allowed, "{name}");
            let mut grants = Vec::new();
            repository.fqdn_grants(&qname, &mut grants);
            assert_eq!(!grants.is_empty(), *allowed, "{name}");
        }
        // Every name of the mix has its record.
        let zone = bench_zone();
        assert_eq!(zone.records.len(), 100);
        assert!(zone.render().contains("x.y.team3\t300\tIN\tA\t"));
    }
}
