use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{AgentConfig, DatapathMode, DnsConfig, Prefer, ProxyConfig, RejectCode};

/// Flags for the `dns` section, shared by both processes; a flag given wins over the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DnsOverrides {
    /// DNS listen address (repeat for several); replaces `dns.listen`.
    #[arg(long = "dns-listen", value_name = "ADDR")]
    pub dns_listen: Vec<SocketAddr>,
    #[arg(long = "dns-upstream", value_name = "ADDR")]
    pub dns_upstream: Option<SocketAddr>,
    #[arg(long = "dns-reject", value_name = "refused|nxdomain")]
    pub dns_reject: Option<RejectCode>,
    #[arg(long = "dns-min-ttl", value_name = "SECONDS")]
    pub dns_min_ttl: Option<u32>,
    #[arg(long = "dns-max-ttl", value_name = "SECONDS")]
    pub dns_max_ttl: Option<u32>,
    #[arg(long = "dns-max-ips-per-name", value_name = "N")]
    pub dns_max_ips_per_name: Option<usize>,
    #[arg(long = "dns-max-names-per-endpoint", value_name = "N")]
    pub dns_max_names_per_endpoint: Option<usize>,
    #[arg(long = "dns-response-max-delay-ms", value_name = "MS")]
    pub dns_response_max_delay_ms: Option<u64>,
    #[arg(long = "dns-upstream-timeout-ms", value_name = "MS")]
    pub dns_upstream_timeout_ms: Option<u64>,
    #[arg(long = "dns-concurrency-limit", value_name = "N")]
    pub dns_concurrency_limit: Option<usize>,
    #[arg(long = "dns-idle-grace-s", value_name = "SECONDS")]
    pub dns_idle_grace_s: Option<u64>,
    #[arg(long = "dns-upstream-sockets", value_name = "N")]
    pub dns_upstream_sockets: Option<usize>,
    #[arg(long = "dns-listen-sockets", value_name = "N")]
    pub dns_listen_sockets: Option<usize>,
    #[arg(long = "dns-prefer", value_name = "agent|dnsproxy|share")]
    pub dns_prefer: Option<Prefer>,
}

impl DnsOverrides {
    pub fn apply(&self, dns: &mut DnsConfig) {
        if !self.dns_listen.is_empty() {
            dns.listen = self.dns_listen.clone();
        }
        set(&mut dns.upstream, &self.dns_upstream);
        set(&mut dns.reject, &self.dns_reject);
        set(&mut dns.min_ttl, &self.dns_min_ttl);
        set(&mut dns.max_ttl, &self.dns_max_ttl);
        set(&mut dns.max_ips_per_name, &self.dns_max_ips_per_name);
        set(
            &mut dns.max_names_per_endpoint,
            &self.dns_max_names_per_endpoint,
        );
        set(
            &mut dns.response_max_delay_ms,
            &self.dns_response_max_delay_ms,
        );
        set(&mut dns.upstream_timeout_ms, &self.dns_upstream_timeout_ms);
        set(&mut dns.concurrency_limit, &self.dns_concurrency_limit);
        set(&mut dns.idle_grace_s, &self.dns_idle_grace_s);
        set(&mut dns.upstream_sockets, &self.dns_upstream_sockets);
        set(&mut dns.listen_sockets, &self.dns_listen_sockets);
        set(&mut dns.prefer, &self.dns_prefer);
    }
}

fn set<T: Clone>(field: &mut T, value: &Option<T>) {
    if let Some(value) = value {
        *field = value.clone();
    }
}

/// `warden-agent`'s flags, one per config field; a flag given wins over the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigOverrides {
    #[command(flatten)]
    pub dns: DnsOverrides,
    #[arg(long = "policy-dir", value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,
    /// A folder of endpoint files, watched (added to the config's endpoints).
    #[arg(long = "endpoints-dir", value_name = "DIR")]
    pub endpoints_dir: Option<PathBuf>,
    #[arg(long = "admin-listen", value_name = "ADDR", value_parser = listen_address)]
    pub admin_listen: Option<SocketAddr>,
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The agent's Unix socket for warden-dnsproxy.
    #[arg(long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[arg(long = "socket-group", value_name = "GROUP")]
    pub socket_group: Option<String>,
    #[arg(long = "datapath-mode", value_name = "none|ebpf")]
    pub datapath_mode: Option<DatapathMode>,
    #[arg(long = "datapath-cgroup-root", value_name = "DIR")]
    pub datapath_cgroup_root: Option<PathBuf>,
    #[arg(long = "datapath-bpffs", value_name = "DIR")]
    pub datapath_bpffs: Option<PathBuf>,
}

impl ConfigOverrides {
    pub fn apply(&self, config: &mut AgentConfig) {
        self.dns.apply(&mut config.dns);
        set(&mut config.policy.dir, &self.policy_dir);
        if self.endpoints_dir.is_some() {
            config.endpoints_dir = self.endpoints_dir.clone();
        }
        set(&mut config.admin.listen, &self.admin_listen);
        set(&mut config.state_dir, &self.state_dir);
        set(&mut config.socket, &self.socket);
        if self.socket_group.is_some() {
            config.socket_group = self.socket_group.clone();
        }
        set(&mut config.datapath.mode, &self.datapath_mode);
        if self.datapath_cgroup_root.is_some() {
            config.datapath.cgroup_root = self.datapath_cgroup_root.clone();
        }
        set(&mut config.datapath.bpffs, &self.datapath_bpffs);
    }
}

/// `warden-dnsproxy`'s flags, one per config field.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProxyOverrides {
    #[command(flatten)]
    pub dns: DnsOverrides,
    /// The agent's Unix socket.
    #[arg(long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[arg(long = "admin-listen", value_name = "ADDR", value_parser = listen_address)]
    pub admin_listen: Option<SocketAddr>,
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[arg(long = "datapath-bpffs", value_name = "DIR")]
    pub datapath_bpffs: Option<PathBuf>,
    #[arg(long = "journal-max", value_name = "N")]
    pub journal_max: Option<usize>,
}

impl ProxyOverrides {
    pub fn apply(&self, config: &mut ProxyConfig) {
        self.dns.apply(&mut config.dns);
        set(&mut config.socket, &self.socket);
        set(&mut config.admin.listen, &self.admin_listen);
        set(&mut config.state_dir, &self.state_dir);
        set(&mut config.datapath.bpffs, &self.datapath_bpffs);
        set(&mut config.journal_max, &self.journal_max);
    }
}

/// `IP:PORT`, IPv6 in brackets or, as Kubernetes substitutes a node's address into
/// `--admin-listen=$(HOST_IP):9890`, without them: the port is what follows the last colon.
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    let bad = || format!("{text:?} is not IP:PORT (e.g. 10.0.0.1:9890, [fd00::1]:9890)");
    let (ip, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::from((ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        overrides: ConfigOverrides,
    }

    #[test]
    fn flags_win_over_the_file() {
        let cli = Cli::parse_from([
            "warden-agent",
            "--dns-listen",
            "127.0.0.9:5353",
            "--dns-reject",
            "nxdomain",
            "--dns-min-ttl",
            "30",
            "--dns-max-ttl",
            "3600",
            "--datapath-mode",
            "ebpf",
        ]);
        let mut config = AgentConfig::default();
        cli.overrides.apply(&mut config);
        assert_eq!(config.dns.listen, vec!["127.0.0.9:5353".parse().unwrap()]);
        assert_eq!(config.dns.reject, RejectCode::Nxdomain);
        assert_eq!(config.dns.min_ttl, 30);
        assert_eq!(config.dns.max_ttl, 3600);
        assert_eq!(config.datapath.mode, DatapathMode::Ebpf);
        assert_eq!(
            config.dns.upstream_timeout_ms, 2000,
            "untouched fields keep their value"
        );
    }

    #[test]
    fn a_listen_address_takes_ipv6_with_or_without_brackets() {
        assert_eq!(
            listen_address("10.0.0.1:9890"),
            Ok("10.0.0.1:9890".parse().unwrap())
        );
        let v6: SocketAddr = "[fd00::1]:9890".parse().unwrap();
        assert_eq!(listen_address("[fd00::1]:9890"), Ok(v6));
        assert_eq!(listen_address("fd00::1:9890"), Ok(v6));
        assert!(listen_address("fd00::1").is_err());
        assert!(listen_address("10.0.0.1").is_err());
        assert!(listen_address("host:9890").is_err());
    }
}
