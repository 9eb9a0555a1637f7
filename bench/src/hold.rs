//! Datapath hold with the real eBPF datapath: an agent with `datapath.mode: ebpf` attached to a
//! cgroup subtree of our own (as the datapath tests do), its bench endpoint enrolled through an
//! empty workload cgroup and still identified by its source address, so every allowed answer
//! writes its allow entries into the pinned maps before release. Root only; everything created
//! (links, pins, the bpffs folder, the cgroups) is removed at the end, also on failure.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use warden_config::DatapathMode;
use warden_tests::lab::{TestCgroup, cgroup2_mount};
use warden_tests::warden::{AgentDir, metric_value};
use warden_tests::{run_blocking, unique_loopback_v4};

use crate::lab::{self, Daemon};
use crate::load::{self, LoadSpec};
use crate::report::Hold;
use crate::stats::Histogram;

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

/// The lab; dropping it stops the agent, detaches and unpins everything, removes the cgroups.
struct EbpfLab {
    agent: Option<Daemon>,
    dir: AgentDir,
    bpffs: PathBuf,
    // Last: the cgroups go after the agent and its links.
    _cgroups: TestCgroup,
}

impl Drop for EbpfLab {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.terminate();
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
                    self.bpffs.display()
                );
            }
        }
        if self.bpffs.exists() {
            eprintln!(
                "warden-bench: {} still exists after cleanup",
                self.bpffs.display()
            );
        }
    }
}

/// Runs the fixed-rate load through an eBPF-mode agent and reads its hold histogram.
pub async fn ebpf(upstream: SocketAddr, client: IpAddr, spec: &LoadSpec) -> Result<Hold> {
    let cgroups = TestCgroup::new()?;
    cgroups.child("workload")?;
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/warden-bench-{}", std::process::id()));
    let dns = lab::addr_on(unique_loopback_v4())?;
    let (dir, mut config) = lab::agent_setup(dns, upstream, client)?;
    config.datapath.mode = DatapathMode::Ebpf;
    config.datapath.cgroup_root = Some(cgroups.root().to_path_buf());
    config.datapath.bpffs = bpffs.clone();
    config.endpoints[0].cgroup = Some(PathBuf::from("workload"));
    let mut lab = EbpfLab {
        agent: None,
        dir,
        bpffs,
        _cgroups: cgroups,
    };
    lab.agent = Some(Daemon::agent(&lab.dir, &config).await?);
    let agent = lab.agent.as_ref().context("agent")?;

    // The reconciler enrolls the endpoint within a second or so of start.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = agent.metrics().await.unwrap_or_default();
        if metric_value(&scrape, "warden_datapath_enrolled_endpoints", &[]) >= 1.0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "endpoint not enrolled; log:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let spec = LoadSpec {
        target: dns,
        ..spec.clone()
    };
    let before = agent.metrics().await?;
    let client_report = tokio::task::spawn_blocking(move || load::run(&spec)).await??;
    let after = agent.metrics().await?;
    let name = "warden_dns_processing_seconds";
    let hold = Histogram::from_scrape(&after, name, &[("scope", "datapath_hold")]).since(
        &Histogram::from_scrape(&before, name, &[("scope", "datapath_hold")]),
    );
    let updates =
        |scrape: &str| metric_value(scrape, "warden_datapath_updates_total", &[("op", "allow")]);
    let errors = |scrape: &str| metric_value(scrape, "warden_datapath_errors_total", &[]);
    Ok(Hold {
        datapath: "ebpf".to_owned(),
        available: true,
        note: Some("allow entries written to the pinned maps".to_owned()),
        rate: client_report.rate,
        hold: hold.summary_us(),
        allow_updates: updates(&after) - updates(&before),
        datapath_errors: errors(&after) - errors(&before),
        client: Some(client_report),
    })
}
