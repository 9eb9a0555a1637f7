//! Starting Warden itself in tests: the agent in-process (port 0, fast, many side by side) or
//! as the real `warden-agent` binary (for restarts and signals), and the `warden` CLI.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use warden_agent::RunningAgent;
use warden_config::{AgentConfig, DatapathMode, ProxyConfig};

use crate::{ProcessGuard, free_port, run_blocking};

/// How long a process under test may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A built binary of the workspace (`make test` builds them before the tests run).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    // Tests run from target/<profile>/deps/, the demo from target/<profile>/.
    let mut profile_dir = exe.parent().context("unexpected executable location")?;
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir
            .parent()
            .context("unexpected test executable location")?;
    }
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built; run `cargo build --workspace --bins` (make test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A folder holding one agent's config, policies and state.
#[derive(Debug)]
pub struct AgentDir {
    dir: TempDir,
}

impl AgentDir {
    pub fn new() -> Result<AgentDir> {
        let dir = tempfile::Builder::new().prefix("warden-agent-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("policies"))?;
        std::fs::create_dir_all(dir.path().join("state"))?;
        Ok(AgentDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Writes (or replaces, atomically) a policy file.
    pub fn write_policy(&self, file: &str, yaml: &str) -> Result<()> {
        let staging = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&staging, yaml)?;
        std::fs::rename(&staging, self.policy_dir().join(file))?;
        Ok(())
    }

    /// A config for this folder: DNS on `dns_ip` (port 0 unless given) and on `[::1]`,
    /// admin on 127.0.0.1, `upstream` as the default server.
    pub fn config(&self, dns_ip: IpAddr, upstream: SocketAddr) -> AgentConfig {
        let mut config = AgentConfig::default();
        config.dns.listen = vec![
            SocketAddr::new(dns_ip, 0),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
        ];
        config.dns.upstream = upstream;
        config.dns.upstream_timeout_ms = 1000;
        config.policy.dir = self.policy_dir();
        config.state_dir = self.state_dir();
        config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.socket = self.socket();
        // Never the machine's own pins (`/sys/fs/bpf/warden` by default): a dnsproxy without a
        // snapshot opens the pins its config names, and a datapath test names its own.
        config.datapath.bpffs = self.dir.path().join("no-datapath");
        config
    }

    /// Waits until the agent's saved cache (`fqdn-cache.json` in its state folder) names
    /// `name`: what a SIGKILL from then on cannot take away.
    pub async fn wait_cache_saved(&self, name: &str, limit: Duration) -> Result<()> {
        let file = self.state_dir().join("fqdn-cache.json");
        let deadline = Instant::now() + limit;
        loop {
            let saved = std::fs::read_to_string(&file).unwrap_or_default();
            if saved.contains(name) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{name} not in {} within {limit:?}", file.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The agent's Unix socket for warden-dnsproxy, private to this folder.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
}

/// An agent running inside the test process.
#[derive(Debug)]
pub struct InProcessAgent {
    pub agent: RunningAgent,
}

impl InProcessAgent {
    pub async fn start(config: AgentConfig) -> Result<InProcessAgent> {
        let agent = warden_agent::start(config).await?;
        Ok(InProcessAgent { agent })
    }

    pub fn dns_v4(&self) -> SocketAddr {
        self.agent.dns_addrs()[0]
    }

    pub fn dns_v6(&self) -> SocketAddr {
        self.agent.dns_addrs()[1]
    }

    pub fn admin(&self) -> SocketAddr {
        self.agent.admin_addr()
    }

    pub async fn stop(self) -> Result<()> {
        self.agent.shutdown().await
    }
}

/// The real `warden-agent` or `warden-dnsproxy` binary, with fixed ports so that a restart
/// serves the same ones.
#[derive(Debug)]
pub struct AgentProcess {
    binary: &'static str,
    guard: Option<ProcessGuard>,
    config_path: PathBuf,
    log_path: PathBuf,
    pub dns: SocketAddr,
    pub admin: SocketAddr,
}

/// `warden-dnsproxy` runs the same way as the agent.
pub type ProxyProcess = AgentProcess;

impl AgentProcess {
    /// Starts `warden-dnsproxy` beside `agent`: the same DNS address (SO_REUSEPORT), the
    /// agent's socket and bpffs, a state folder and admin port of its own under `dir`; returns
    /// once it is ready, or only alive (`/healthz`) when `until_ready` is false (a proxy with
    /// no policy is never ready).
    pub async fn start_dnsproxy(
        dir: &AgentDir,
        agent: &AgentConfig,
        agent_dns: SocketAddr,
        until_ready: bool,
    ) -> Result<ProxyProcess> {
        let mut config = ProxyConfig {
            dns: agent.dns.clone(),
            socket: agent.socket.clone(),
            state_dir: dir.path().join("dnsproxy-state"),
            ..ProxyConfig::default()
        };
        config.dns.listen = vec![agent_dns];
        // A proxy without a snapshot opens the pins of its config: never the machine's own
        // (`/sys/fs/bpf/warden` by default) beside an agent that has none.
        config.datapath.bpffs = match agent.datapath.mode {
            DatapathMode::Ebpf => agent.datapath.bpffs.clone(),
            DatapathMode::None => dir.path().join("no-datapath"),
        };
        let admin_ip = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let admin = SocketAddr::new(admin_ip, free_port(admin_ip)?);
        config.admin.listen = admin;
        let config_path = dir.path().join("dnsproxy.yaml");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
        let mut process = AgentProcess {
            binary: "warden-dnsproxy",
            guard: None,
            config_path,
            log_path: dir.path().join("dnsproxy.log"),
            dns: agent_dns,
            admin,
        };
        if until_ready {
            process.spawn().await?;
        } else {
            process.launch()?;
            process.wait_alive(Duration::from_secs(10)).await?;
        }
        Ok(process)
    }

    /// Writes `config` (with fixed free ports where it has port 0) into `dir` and starts the
    /// binary on it.
    pub async fn start(dir: &AgentDir, mut config: AgentConfig) -> Result<AgentProcess> {
        let dns = match config.dns.listen[0] {
            listen if listen.port() == 0 => SocketAddr::new(listen.ip(), free_port(listen.ip())?),
            listen => listen,
        };
        let admin_ip = config.admin.listen.ip();
        let admin = SocketAddr::new(admin_ip, free_port(admin_ip)?);
        config.dns.listen = vec![dns];
        config.admin.listen = admin;
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, yaml_of(&config)?)?;
        let mut process = AgentProcess {
            binary: "warden-agent",
            guard: None,
            config_path,
            log_path: dir.path().join("agent.log"),
            dns,
            admin,
        };
        process.spawn().await?;
        Ok(process)
    }

    async fn spawn(&mut self) -> Result<()> {
        self.launch()?;
        self.wait_ready(Duration::from_secs(10)).await
    }

    fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut command = Command::new(binary(self.binary)?);
        command
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log);
        // Past the longest drain (in-flight queries wait up to upstream_timeout plus
        // response_max_delay, then the cache is saved): a graceful stop is never cut short.
        self.guard = Some(ProcessGuard::spawn(&mut command, self.binary)?.with_grace(STOP_GRACE));
        Ok(())
    }

    /// Waits until `/healthz` answers.
    async fn wait_alive(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while http_get(self.admin, "/healthz").await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "{} not alive within {limit:?}; log:\n{}",
                    self.binary,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(body) = http_get(self.admin, "/readyz").await
                && body.starts_with("ready")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within {limit:?}; log:\n{}",
                    self.binary,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.guard.as_ref().and_then(ProcessGuard::pid)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, and wait for a clean exit: an error if it had to be killed.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt as _;
        let guard = self.guard.take().context("agent not running")?;
        let status = guard.stop()?;
        if status.signal() == Some(nix::sys::signal::Signal::SIGKILL as i32) {
            bail!(
                "{} did not exit within {STOP_GRACE:?} of SIGTERM and was killed; log:\n{}",
                self.binary,
                self.log()
            );
        }
        Ok(status)
    }

    /// SIGTERM without waiting: the process drains and exits by itself; `stop` reaps it.
    pub fn terminate(&self) -> Result<()> {
        let guard = self.guard.as_ref().context("agent not running")?;
        guard.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// SIGKILL: no chance to persist or drain.
    pub fn kill(&mut self) -> Result<()> {
        let guard = self.guard.take().context("agent not running")?;
        guard.signal(nix::sys::signal::Signal::SIGKILL)?;
        drop(guard);
        Ok(())
    }

    pub async fn restart(&mut self) -> Result<()> {
        if self.guard.is_some() {
            self.stop()?;
        }
        self.spawn().await
    }

    /// `warden --agent http://ADMIN args...`
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        warden_cli(self.admin, args)
    }
}

/// Runs the `warden` CLI against an agent's admin address.
pub fn warden_cli(admin: SocketAddr, args: &[&str]) -> Result<Output> {
    let mut command = Command::new(binary("warden")?);
    command
        .arg("--agent")
        .arg(format!("http://{admin}"))
        .args(args);
    run_blocking(&mut command, Duration::from_secs(15))
}

/// GET on an admin API; the body, or an error for a non-2xx status.
pub async fn http_get(admin: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(admin).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .context("admin API timed out")??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status_ok = head.lines().next().is_some_and(|line| {
        line.split_whitespace()
            .nth(1)
            .is_some_and(|code| code.starts_with('2'))
    });
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    if !status_ok {
        bail!(
            "GET {path}: {}: {body}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// GET and parse JSON.
pub async fn http_json(admin: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let body = http_get(admin, path).await?;
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
}

/// A metric's value in a Prometheus text scrape (the sum over series matching every label).
/// The `ips` of a `GET /v1/fqdn/cache` row, sorted: answers may list them in any order.
pub fn sorted_ips(row: &serde_json::Value) -> Vec<String> {
    let mut ips: Vec<String> = row["ips"]
        .as_array()
        .expect("a cache row has ips")
        .iter()
        .map(|ip| ip.as_str().expect("an IP is text").to_owned())
        .collect();
    ips.sort();
    ips
}

pub fn metric_value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(key, wanted)| rest.contains(&format!("{key}=\"{wanted}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn yaml_of(config: &AgentConfig) -> Result<String> {
    // JSON is YAML; serde_json keeps this crate free of a YAML writer.
    Ok(serde_json::to_string_pretty(config)?)
}

/// The talk's policy, for `app=test` in `youssef`, in the variants tests need: DNS to
/// `dns_server` (a `toCIDR`; any server when `None`) on `dns_port` with the `dns_rules`
/// selectors, and the `fqdns` selectors on TCP 80 and 443. Selectors are YAML, e.g.
/// `matchName: cilium.io` or `matchPattern: "*.cilium.io"`.
#[derive(Debug, Clone)]
pub struct TalkPolicy<'a> {
    pub dns_server: Option<IpAddr>,
    pub dns_port: u16,
    pub dns_rules: &'a [&'a str],
    pub fqdns: &'a [&'a str],
}

impl Default for TalkPolicy<'_> {
    /// The talk as given: any name may be resolved; google.com and cilium.io reached.
    fn default() -> Self {
        TalkPolicy {
            dns_server: None,
            dns_port: 53,
            dns_rules: &[r#"matchPattern: "*""#],
            fqdns: &["matchName: google.com", "matchName: cilium.io"],
        }
    }
}

impl TalkPolicy<'_> {
    /// DNS only through `server` (address and port).
    pub fn through(server: SocketAddr) -> Self {
        TalkPolicy {
            dns_server: Some(server.ip()),
            dns_port: server.port(),
            ..TalkPolicy::default()
        }
    }

    pub fn yaml(&self) -> String {
        let peer = self
            .dns_server
            .map(|ip| {
                format!(
                    "  - toCIDR: [\"{ip}/{}\"]\n    toPorts:\n",
                    if ip.is_ipv4() { 32 } else { 128 }
                )
            })
            .unwrap_or_else(|| "  - toPorts:\n".to_owned());
        let list = |selectors: &[&str], indent: &str| {
            selectors
                .iter()
                .map(|selector| format!("{indent}- {selector}\n"))
                .collect::<String>()
        };
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: talk\n  namespace: youssef\nspec:\n  endpointSelector:\n    matchLabels:\n      app: test\n  egress:\n{peer}    - ports:\n      - port: \"{port}\"\n        protocol: ANY\n      rules:\n        dns:\n{dns}  - toFQDNs:\n{fqdns}    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n      - port: \"443\"\n        protocol: TCP\n",
            port = self.dns_port,
            dns = list(self.dns_rules, "        "),
            fqdns = list(self.fqdns, "    "),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_talk_policy_validates() {
        for policy in [
            TalkPolicy::default(),
            TalkPolicy::through("127.0.0.153:53".parse().unwrap()),
        ] {
            let text = policy.yaml();
            let parsed = warden_policy::parse_str(&text, Path::new("talk.yaml"));
            assert!(parsed.is_ok(), "{text}\n{parsed:?}");
        }
    }
}
