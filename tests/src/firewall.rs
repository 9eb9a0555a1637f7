//! The whole product on the lab: the "internet" namespace, a workload cgroup of our own, knotd
//! on port 53 of a loopback address, `warden-agent` with `datapath.mode: ebpf` attached at the
//! test's cgroup root (and, when asked, `warden-dnsproxy` beside it), torn down in reverse.
//! Every [`Firewall`] holds the lab's lock: tests using one run one at a time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use warden_config::{AgentConfig, DatapathMode, EndpointConfig};

use crate::lab::{
    BpffsDir, CurlResult, Internet, ResolvConf, TestCgroup, curl_resolving, dig_in_cgroup,
};
use crate::warden::{
    AgentDir, AgentProcess, ProxyProcess, TalkPolicy, binary, http_get, http_json, metric_value,
};
use crate::{DigOpts, DnsReply, KnotUpstream, run_blocking, unique_loopback_v4};

/// How long a curl may take in the lab before it counts as hung.
pub const CURL_TIMEOUT: Duration = Duration::from_secs(3);

/// What to start.
#[derive(Debug, Clone)]
pub struct FirewallOptions {
    pub policy: String,
    pub idle_grace_s: u64,
    pub with_dnsproxy: bool,
    /// A second endpoint, `youssef/late` (labels `app=test`), whose cgroup `late` does not
    /// exist yet: a test creates it ([`TestCgroup::child`]) as a pod would start.
    pub late_workload: bool,
    /// An `endpoints_dir` (`dir/endpoints`, empty at start) for endpoints a test adds live.
    pub endpoints_dir: bool,
    /// The agent's DNS (the workload's DNS target) on port 53 of its address, as a node-local
    /// resolver address is, instead of a free port.
    pub dns_on_port_53: bool,
}

impl Default for FirewallOptions {
    fn default() -> Self {
        FirewallOptions {
            policy: TalkPolicy::default().yaml(),
            idle_grace_s: 60,
            with_dnsproxy: false,
            late_workload: false,
            endpoints_dir: false,
            dns_on_port_53: false,
        }
    }
}

/// Field order is teardown order after [`Drop`] stopped the processes and removed the pins.
#[derive(Debug)]
pub struct Firewall {
    pub agent: AgentProcess,
    pub dnsproxy: Option<ProxyProcess>,
    pub config: AgentConfig,
    pub dir: AgentDir,
    pub bpffs: PathBuf,
    pub workload: PathBuf,
    pub resolv: ResolvConf,
    pub upstream: KnotUpstream,
    pub internet: Internet,
    pub cgroups: TestCgroup,
    /// Last: whatever `cleanup` left goes once the processes are gone.
    _pins: BpffsDir,
}

impl Firewall {
    pub async fn start(options: FirewallOptions) -> Result<Firewall> {
        let internet = Internet::start()?;
        let cgroups = TestCgroup::new()?;
        let workload = cgroups.child("workload")?;
        let upstream = KnotUpstream::start_on(SocketAddr::new(unique_loopback_v4(), 53))?;
        let resolv = ResolvConf::new(&format!(
            "nameserver {}\noptions timeout:2 attempts:1\n",
            upstream.addr().ip()
        ))?;
        // Before the agent: what it pins goes with this even if it never comes up.
        let pins = BpffsDir::new("warden-e2e");
        let bpffs = pins.path().to_path_buf();
        let dir = AgentDir::new()?;
        dir.write_policy("talk.yaml", &options.policy)?;
        let mut config = dir.config(unique_loopback_v4(), upstream.addr());
        config.dns.idle_grace_s = options.idle_grace_s;
        if options.dns_on_port_53 {
            config.dns.listen[0].set_port(53);
        }
        config.datapath.mode = DatapathMode::Ebpf;
        config.datapath.cgroup_root = Some(cgroups.root().to_path_buf());
        config.datapath.bpffs = bpffs.clone();
        let workload_endpoint = |name: &str, cgroup: &str| EndpointConfig {
            name: name.into(),
            namespace: "youssef".into(),
            labels: [("app".to_owned(), "test".to_owned())].into(),
            ips: vec![],
            cgroup: Some(PathBuf::from(cgroup)),
            dns_target: vec![],
            peer_only: false,
        };
        config.endpoints = vec![workload_endpoint("test", "workload")];
        if options.late_workload {
            config.endpoints.push(workload_endpoint("late", "late"));
        }
        if options.endpoints_dir {
            let endpoints_dir = dir.path().join("endpoints");
            std::fs::create_dir_all(&endpoints_dir)?;
            config.endpoints_dir = Some(endpoints_dir);
        }
        let agent = AgentProcess::start(&dir, config.clone()).await?;
        let mut firewall = Firewall {
            agent,
            dnsproxy: None,
            config,
            dir,
            bpffs,
            workload,
            resolv,
            upstream,
            internet,
            cgroups,
            _pins: pins,
        };
        firewall.wait_enrolled().await?;
        if options.with_dnsproxy {
            firewall.start_dnsproxy().await?;
        }
        Ok(firewall)
    }

    /// Starts (or restarts) `warden-dnsproxy` on the agent's DNS address; returns once it is
    /// ready.
    pub async fn start_dnsproxy(&mut self) -> Result<()> {
        let proxy =
            ProxyProcess::start_dnsproxy(&self.dir, &self.config, self.agent.dns, true).await?;
        self.dnsproxy = Some(proxy);
        Ok(())
    }

    /// [`Self::start_dnsproxy`] for a proxy that will not be ready (no policy): returns once it
    /// is alive.
    pub async fn start_unready_dnsproxy(&mut self) -> Result<()> {
        let proxy =
            ProxyProcess::start_dnsproxy(&self.dir, &self.config, self.agent.dns, false).await?;
        self.dnsproxy = Some(proxy);
        Ok(())
    }

    pub fn dnsproxy(&mut self) -> &mut ProxyProcess {
        self.dnsproxy.as_mut().expect("the dnsproxy was started")
    }

    /// The reconciler enrolls the workload within a second of the agent's start.
    pub async fn wait_enrolled(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let scrape = http_get(self.agent.admin, "/metrics")
                .await
                .unwrap_or_default();
            if metric_value(&scrape, "warden_datapath_enrolled_endpoints", &[]) >= 1.0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("endpoint not enrolled:\n{}", self.agent.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// curl from the workload, resolving through knotd via its private resolv.conf.
    pub fn curl(&self, url: &str, extra: &[&str]) -> Result<CurlResult> {
        curl_resolving(&self.workload, &self.resolv, url, extra, CURL_TIMEOUT)
    }

    /// dig from the workload to knotd's address (redirected to the proxies).
    pub async fn dig(&self, name: &str, qtype: &str, opts: DigOpts) -> Result<DnsReply> {
        dig_in_cgroup(&self.workload, self.upstream.addr(), name, qtype, opts).await
    }

    pub async fn flows(&self, admin: SocketAddr) -> Result<Vec<serde_json::Value>> {
        let flows = http_json(admin, "/v1/flows").await?;
        Ok(flows.as_array().cloned().unwrap_or_default())
    }

    /// Programs attached at the test's cgroup root, as bpftool sees them.
    pub fn attached_programs(&self) -> Result<usize> {
        let out = run_blocking(
            Command::new("bpftool")
                .args(["cgroup", "show"])
                .arg(self.cgroups.root()),
            Duration::from_secs(10),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.contains("warden_"))
            .count())
    }

    /// `warden-agent cleanup` with this lab's config.
    pub fn cleanup(&self) -> Result<Output> {
        run_blocking(
            Command::new(binary("warden-agent")?)
                .arg("--config")
                .arg(self.dir.path().join("config.yaml"))
                .arg("cleanup"),
            Duration::from_secs(20),
        )
        .context("warden-agent cleanup")
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        // Stop the processes first so nothing re-attaches, then remove every link and pin.
        if let Some(proxy) = self.dnsproxy.as_mut() {
            let _ = proxy.kill();
        }
        let _ = self.agent.kill();
        let _ = self.cleanup();
    }
}

/// Refused at once (EPERM from the connect hook), not timed out.
pub fn quick_refusal(result: &CurlResult) -> bool {
    !result.ok() && result.connect_failed() && result.elapsed < Duration::from_secs(1)
}
