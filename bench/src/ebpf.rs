//! Warden as deployed: an agent with `datapath.mode: ebpf` attached to a cgroup subtree of our
//! own (as the datapath tests do), optionally with `warden-dnsproxy` beside it on the same
//! port. The bench endpoint is enrolled through a workload cgroup and also identified by its
//! source address, so every allowed answer writes its allow entries into the pinned maps
//! before release, and with a dnsproxy the `sk_reuseport` program steers every query to it.
//! The bench's clients stay outside the subtree for (e) and (f), where the cgroup programs cost
//! them nothing, and run inside the workload cgroup for (g), redirected as a pod's are. Root
//! only; everything created (links, pins, the bpffs folder, the cgroups) is removed when the
//! lab is dropped, also on failure.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use warden_config::DatapathMode;
use warden_tests::lab::{BpffsDir, TestCgroup, cgroup2_mount};
use warden_tests::warden::{AgentDir, http_json, metric_value};
use warden_tests::{run_blocking, unique_loopback_v4};

use crate::lab::{self, Daemon};

/// Why the eBPF lab cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (cgroups and bpffs); run make bench as root".to_owned());
    }
    if let Err(error) = cgroup2_mount() {
        return Some(format!("no cgroup v2: {error:#}"));
    }
    None
}

/// The lab; dropping it stops the processes, detaches and unpins everything, removes the
/// cgroups.
pub struct EbpfLab {
    pub dns: SocketAddr,
    /// The endpoint's cgroup: a client started inside it and asking port 53 anywhere is
    /// redirected to the agent (or the preferred dnsproxy).
    pub workload: PathBuf,
    pub agent: Daemon,
    pub dnsproxy: Option<Daemon>,
    // Last: the folder (with the agent's config, which cleanup reads), the pins, then the
    // cgroups go after the processes and their links.
    dir: AgentDir,
    bpffs: BpffsDir,
    _cgroups: TestCgroup,
}

impl EbpfLab {
    /// The agent serving DNS on a fresh loopback address in front of `upstream`, `client` its
    /// enrolled endpoint; with `dnsproxy`, the standalone proxy beside it, preferred by the
    /// agent's steering before this returns.
    pub async fn start(upstream: SocketAddr, client: IpAddr, dnsproxy: bool) -> Result<EbpfLab> {
        let cgroups = TestCgroup::new()?;
        let workload = cgroups.child("workload")?;
        // Before the agent: what it pins goes with this even if it never comes up.
        let bpffs = BpffsDir::new("warden-bench");
        let dns = lab::addr_on(unique_loopback_v4())?;
        let (dir, mut config) = lab::agent_setup(dns, upstream, client)?;
        config.datapath.mode = DatapathMode::Ebpf;
        config.datapath.cgroup_root = Some(cgroups.root().to_path_buf());
        config.datapath.bpffs = bpffs.path().to_path_buf();
        config.endpoints[0].cgroup = Some(PathBuf::from("workload"));
        // Started before anything that can fail, so that Drop cleans up after it.
        let agent = Daemon::agent(&dir, &config).await?;
        let mut lab = EbpfLab {
            dns,
            workload,
            agent,
            dnsproxy: None,
            dir,
            bpffs,
            _cgroups: cgroups,
        };
        lab.wait_enrolled().await?;
        if dnsproxy {
            lab.dnsproxy = Some(
                Daemon::dnsproxy(lab.dir.path(), &config)
                    .await?
                    .context("no warden-dnsproxy binary")?,
            );
            lab.wait_preferred("dnsproxy").await?;
        }
        Ok(lab)
    }

    /// Every process's admin address, for their histograms.
    pub fn admins(&self) -> Vec<SocketAddr> {
        std::iter::once(&self.agent)
            .chain(&self.dnsproxy)
            .map(|daemon| daemon.admin)
            .collect()
    }

    /// The reconciler enrolls the endpoint within a second or so of start.
    async fn wait_enrolled(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let scrape = self.agent.metrics().await.unwrap_or_default();
            if metric_value(&scrape, "warden_datapath_enrolled_endpoints", &[]) >= 1.0 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "endpoint not enrolled; log:\n{}",
                self.agent.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Until the agent's status names `instance` as the one its steering prefers.
    async fn wait_preferred(&self, instance: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = http_json(self.agent.admin, "/v1/status").await?;
            if status["preferred"] == instance {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent never preferred the {instance}: {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EbpfLab {
    fn drop(&mut self) {
        for daemon in self
            .dnsproxy
            .iter_mut()
            .chain(std::iter::once(&mut self.agent))
        {
            let _ = daemon.terminate();
        }
        if let Ok(binary) = warden_tests::warden::binary("warden-agent") {
            let cleanup = run_blocking(
                Command::new(binary)
                    .arg("--config")
                    .arg(self.dir.path().join("agent.yaml"))
                    .arg("cleanup"),
                Duration::from_secs(20),
            );
            if let Err(error) = cleanup {
                eprintln!(
                    "warden-bench: cleanup of {}: {error:#}",
                    self.bpffs.path().display()
                );
            }
        }
        if self.bpffs.path().exists() {
            eprintln!(
                "warden-bench: {} still exists after cleanup; removing it",
                self.bpffs.path().display()
            );
        }
    }
}
