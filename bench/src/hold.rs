//! Datapath hold with the real eBPF datapath: the fixed-rate load through the eBPF lab's agent,
//! whose every allowed answer writes its allow entries into the pinned maps before release.

use anyhow::Result;
use warden_tests::warden::metric_value;

use crate::ebpf::EbpfLab;
use crate::load::{self, LoadSpec};
use crate::report::Hold;
use crate::stats::Histogram;

/// Runs the fixed-rate load through the lab's agent and reads its hold histogram.
pub async fn ebpf(lab: &EbpfLab, spec: &LoadSpec) -> Result<Hold> {
    let agent = &lab.agent;
    let spec = LoadSpec {
        target: lab.dns,
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
