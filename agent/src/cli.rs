//! The `warden` command: status of both processes, flow events, the FQDN cache, endpoints and
//! policy validation, over the admin APIs of `warden-agent` (`--agent URL`) and
//! `warden-dnsproxy` (`--dnsproxy URL`).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use warden_policy::{DnsName, NamePattern};
use warden_telemetry::{CacheRow, DnsFlow, DropFlow, FlowLine, InstanceStatus, LostEvents};

use crate::admin::{CleanReport, EndpointRow};
use crate::pod_endpoints::CgroupDriver;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A flow event is a few hundred bytes; a "line" longer than this is not one.
const MAX_FLOW_LINE: usize = 1 << 20;
/// How often `observe --follow` tries an instance that is down again.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(
    name = "warden",
    version,
    about = "Operate Warden: status, flow events, FQDN cache, endpoints, policies"
)]
pub struct Cli {
    /// The agent's admin API.
    #[arg(
        long,
        global = true,
        env = "WARDEN_AGENT",
        default_value = "http://127.0.0.1:9890"
    )]
    pub agent: String,
    /// The standalone DNS proxy's admin API.
    #[arg(
        long,
        global = true,
        env = "WARDEN_DNSPROXY",
        default_value = "http://127.0.0.1:9891"
    )]
    pub dnsproxy: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Both processes: who serves DNS, mode, policy revision, cache size, last resync. An
    /// instance that does not answer is shown as down; it is an error only when both are.
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Flow events (one per DNS query, one per datapath drop), one line each, oldest first.
    Observe {
        /// Keep printing new events as they happen, from whichever process is up.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only this process's events (both processes are read either way: the agent also
        /// holds the events warden-dnsproxy forwards to it).
        #[arg(long, value_enum)]
        instance: Option<Instance>,
        /// Only the last N retained events (before following, with --follow).
        #[arg(long, value_name = "N")]
        last: Option<usize>,
        /// Only events of the last SECONDS seconds.
        #[arg(long, value_name = "SECONDS")]
        since: Option<u64>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The FQDN cache.
    Fqdn {
        #[command(subcommand)]
        command: FqdnCommand,
    },
    /// The node's endpoints.
    Endpoint {
        #[command(subcommand)]
        command: EndpointCommand,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum FqdnCommand {
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Names resolved by endpoints, with their IPs and remaining TTL.
    List {
        /// Only this endpoint (`namespace/name`).
        #[arg(short = 'e', long)]
        endpoint: Option<String>,
        /// Only names matching this pattern (Cilium's matchPattern: `*.cilium.io`,
        /// `**.cilium.io`; a plain name matches itself).
        #[arg(short = 'n', long = "name", value_name = "PATTERN")]
        name: Option<String>,
        /// Whose cache to read.
        #[arg(long, value_enum, default_value_t = Instance::Agent)]
        instance: Instance,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Removes entries from the agent's cache; their datapath allow entries go with them.
    Clean {
        /// Only this endpoint (`namespace/name`).
        #[arg(short = 'e', long)]
        endpoint: Option<String>,
        /// Only names matching this pattern (as for `list`).
        #[arg(short = 'n', long = "name", value_name = "PATTERN")]
        name: Option<String>,
        /// Needed to flush the whole cache (no --name and no --endpoint).
        #[arg(short = 'f', long)]
        force: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Every endpoint with its labels, IPs, cgroup and whether its egress is enforced.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Write the pods of a Kubernetes node into an endpoints_dir, from a PodList
    /// (`kubectl get pods -A -o json`), one `pod-<uid>.yaml` each; removes those of pods gone.
    /// With --watch, from a stream: a PodList, then a watch's events
    /// (`kubectl get pods -A -o json --watch --output-watch-events`), each change as it comes.
    /// With --services, the Services of a ServiceList instead, one `service-<uid>.yaml` each.
    Sync {
        /// The node whose pods are the agent's.
        #[arg(long, required_unless_present = "services")]
        node: Option<String>,
        /// Write the Services of this ServiceList (`kubectl get services -A -o json`, `-` for
        /// standard input) instead of pods: each with a selector and a cluster address, as an
        /// endpoint only others' rules name, labelled as the pods it picks (pods query the
        /// kube-dns Service, which `toEndpoints` naming kube-dns must reach).
        #[arg(long, value_name = "FILE")]
        services: Option<PathBuf>,
        /// The agent's endpoints_dir.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The PodList, `-` for standard input.
        #[arg(long, value_name = "FILE", default_value = "-")]
        pods: PathBuf,
        /// How the kubelet names pod cgroups.
        #[arg(long, value_enum, default_value_t = CgroupDriver::Systemd)]
        cgroup_driver: CgroupDriver,
        /// The kubelet's --cgroup-root below the cgroup mount, if it is not the mount itself.
        #[arg(long, value_name = "PATH")]
        cgroup_root: Option<PathBuf>,
        /// Where pods (in their own network namespace) reach the DNS proxy; repeat for IPv6.
        #[arg(long, value_name = "ADDR")]
        dns_target: Vec<std::net::SocketAddr>,
        /// Read a stream of JSON values (PodList, Pod, watch event; or ServiceList, Service,
        /// watch event with --services) until its end or a watch ERROR event, writing after
        /// each; exits non-zero on an error, so that a loop lists again.
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check CiliumNetworkPolicy files; exits non-zero with every error found.
    Validate {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// One of Warden's two processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Instance {
    Agent,
    Dnsproxy,
}

impl Instance {
    pub fn name(self) -> &'static str {
        match self {
            Instance::Agent => "agent",
            Instance::Dnsproxy => "dnsproxy",
        }
    }
}

/// Where each process's admin API is.
#[derive(Debug, Clone)]
struct Targets {
    agent: String,
    dnsproxy: String,
}

impl Targets {
    fn url(&self, instance: Instance) -> &str {
        match instance {
            Instance::Agent => &self.agent,
            Instance::Dnsproxy => &self.dnsproxy,
        }
    }
}

pub async fn run(cli: Cli) -> ExitCode {
    let targets = Targets {
        agent: cli.agent,
        dnsproxy: cli.dnsproxy,
    };
    let result = match cli.command {
        Command::Status { output } => status(&targets, output).await,
        Command::Observe {
            follow,
            instance,
            last,
            since,
            output,
        } => {
            let options = ObserveOptions {
                only: instance,
                last,
                since_ms: since.map(|seconds| since_ms(now_ms(), seconds)),
                output,
            };
            if follow {
                observe_follow(&targets, &options).await
            } else {
                observe(&targets, &options).await
            }
        }
        Command::Fqdn {
            command: FqdnCommand::Cache { command },
        } => match command {
            CacheCommand::List {
                endpoint,
                name,
                instance,
                output,
            } => cache_list(targets.url(instance), endpoint, name, output).await,
            CacheCommand::Clean {
                endpoint,
                name,
                force,
                output,
            } => cache_clean(&targets.agent, endpoint, name, force, output).await,
        },
        Command::Endpoint {
            command: EndpointCommand::List { output },
        } => endpoint_list(&targets.agent, output).await,
        Command::Endpoint {
            command:
                EndpointCommand::Sync {
                    node,
                    services,
                    dir,
                    pods,
                    cgroup_driver,
                    cgroup_root,
                    dns_target,
                    watch,
                },
        } => {
            let kubelet = crate::pod_endpoints::Kubelet {
                driver: cgroup_driver,
                cgroup_root: cgroup_root
                    .map(|root| root.strip_prefix("/").unwrap_or(&root).to_owned())
                    .unwrap_or_default(),
            };
            match (services, node) {
                (Some(services), _) => service_sync(&dir, &services, watch),
                // `--node "$NODE_NAME"` with the variable unset: no pod is on it, and every
                // file would go.
                (None, Some(node)) if node.trim().is_empty() => {
                    Err(anyhow::anyhow!("--node is empty"))
                }
                (None, Some(node)) => {
                    endpoint_sync(&node, &dir, &pods, &kubelet, &dns_target, watch)
                }
                (None, None) => Err(anyhow::anyhow!("--node is needed to sync pods")),
            }
        }
        Command::Policy {
            command: PolicyCommand::Validate { files },
        } => return validate(&files),
    };
    match result {
        Ok(text) => match reader_gone(emit(&text)) {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("warden: {error}");
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            eprintln!("warden: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Standard input for `-`, else the file.
fn input_of(path: &std::path::Path) -> anyhow::Result<Box<dyn std::io::Read>> {
    Ok(if path == std::path::Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
        )
    })
}

/// `warden endpoint sync --services`: see [`crate::pod_endpoints::services`]; with `watch`, a
/// stream as for pods ([`watch_stream`]).
fn service_sync(
    dir: &std::path::Path,
    services: &std::path::Path,
    watch: bool,
) -> anyhow::Result<String> {
    if watch {
        return watch_stream(
            dir,
            input_of(services)?,
            "Service",
            crate::pod_endpoints::SERVICE_FILES,
            crate::pod_endpoints::services,
            service_line,
        );
    }
    let text =
        std::io::read_to_string(input_of(services)?).context("cannot read the ServiceList")?;
    let list: serde_json::Value =
        serde_json::from_str(&text).context("the ServiceList is not JSON")?;
    let mut skipped = Vec::new();
    let endpoints = crate::pod_endpoints::services(&list, &mut skipped)?;
    for reason in &skipped {
        eprintln!("warden: skipped {reason}");
    }
    let report =
        crate::pod_endpoints::sync(dir, crate::pod_endpoints::SERVICE_FILES, &endpoints, true)?;
    Ok(service_line(endpoints.len(), &report))
}

fn service_line(services: usize, report: &crate::pod_endpoints::SyncReport) -> String {
    format!(
        "{services} services: {} written, {} unchanged, {} removed\n",
        report.written, report.unchanged, report.removed
    )
}

/// `warden endpoint sync`: see [`crate::pod_endpoints`]; with `watch`, [`endpoint_watch`].
fn endpoint_sync(
    node: &str,
    dir: &std::path::Path,
    pods: &std::path::Path,
    kubelet: &crate::pod_endpoints::Kubelet,
    dns_target: &[std::net::SocketAddr],
    watch: bool,
) -> anyhow::Result<String> {
    let input = input_of(pods)?;
    if watch {
        return endpoint_watch(node, dir, input, kubelet, dns_target);
    }
    let text = std::io::read_to_string(input).context("cannot read the PodList")?;
    let list: serde_json::Value = serde_json::from_str(&text).context("the PodList is not JSON")?;
    let mut skipped = Vec::new();
    let endpoints =
        crate::pod_endpoints::endpoints(&list, node, kubelet, dns_target, &mut skipped)?;
    for reason in &skipped {
        eprintln!("warden: skipped {reason}");
    }
    // One Pod (`kubectl get pod NAME -o json`) is written, and says nothing of the others.
    let whole_node = list.get("items").is_some();
    let report =
        crate::pod_endpoints::sync(dir, crate::pod_endpoints::POD_FILES, &endpoints, whole_node)?;
    Ok(sync_line(node, endpoints.len(), &report))
}

fn sync_line(node: &str, pods: usize, report: &crate::pod_endpoints::SyncReport) -> String {
    format!(
        "{pods} pods of {node}: {} written, {} unchanged, {} removed\n",
        report.written, report.unchanged, report.removed
    )
}

/// `warden endpoint sync --watch`: see [`crate::pod_endpoints::Watch`], with [`watch_stream`].
fn endpoint_watch(
    node: &str,
    dir: &std::path::Path,
    input: Box<dyn std::io::Read>,
    kubelet: &crate::pod_endpoints::Kubelet,
    dns_target: &[std::net::SocketAddr],
) -> anyhow::Result<String> {
    watch_stream(
        dir,
        input,
        "Pod",
        crate::pod_endpoints::POD_FILES,
        |list, skipped| crate::pod_endpoints::endpoints(list, node, kubelet, dns_target, skipped),
        |count, report| sync_line(node, count, report),
    )
}

/// A stream of `kind` objects (a list, then a watch's events) into the `prefix` files of `dir`,
/// each value as it comes: a line for each that changed a file; what is left out is said again
/// only when it changes. Objects that would not load end it with a failure, the files as they
/// were, as an ERROR event does: the loop around it lists again, rather than the files staying
/// as they were until its next list.
fn watch_stream(
    dir: &std::path::Path,
    input: Box<dyn std::io::Read>,
    kind: &'static str,
    prefix: &str,
    endpoints_of: impl Fn(
        &serde_json::Value,
        &mut Vec<String>,
    ) -> anyhow::Result<
        std::collections::BTreeMap<String, warden_config::EndpointConfig>,
    >,
    line: impl Fn(usize, &crate::pod_endpoints::SyncReport) -> String,
) -> anyhow::Result<String> {
    let stream = serde_json::Deserializer::from_reader(std::io::BufReader::new(input))
        .into_iter::<serde_json::Value>();
    let mut watch = crate::pod_endpoints::Watch::of(kind);
    let mut said_skipped = Vec::new();
    for value in stream {
        let value = value.with_context(|| format!("the {kind} stream is not JSON"))?;
        watch.apply(value)?;
        let mut skipped = Vec::new();
        let endpoints = endpoints_of(&watch.list(), &mut skipped)?;
        if skipped != said_skipped {
            for reason in &skipped {
                eprintln!("warden: skipped {reason}");
            }
            said_skipped = skipped;
        }
        let report = crate::pod_endpoints::sync(dir, prefix, &endpoints, watch.complete())?;
        if report.written + report.removed > 0 {
            reader_gone(emit(&line(endpoints.len(), &report)))?;
        }
    }
    Ok(String::new())
}

fn validate(files: &[PathBuf]) -> ExitCode {
    match warden_policy::load_paths(files) {
        Ok(policies) => {
            // Valid policy the datapath cannot enforce as written: said, not an error.
            for warning in policies.iter().flat_map(warden_enforce::datapath_warnings) {
                eprintln!("warning: {warning}");
            }
            let summary = format!(
                "{} policies in {} files: valid\n",
                policies.len(),
                files.len()
            );
            match reader_gone(emit(&summary)) {
                Ok(_) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("warden: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("error: {error}");
            }
            eprintln!("{} error(s)", errors.len());
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------

/// What `warden status` learned about one process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceReport {
    pub instance: String,
    pub url: String,
    pub up: bool,
    /// Why the instance counts as down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<InstanceStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncSummary>,
}

/// From the instance's `/metrics`: `warden_resyncs_total` and
/// `warden_last_resync_timestamp_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ResyncSummary {
    pub count: u64,
    /// Unix seconds; `None` before the first resync.
    pub last_at: Option<f64>,
}

async fn status(targets: &Targets, output: Output) -> anyhow::Result<String> {
    let (agent, dnsproxy) = tokio::join!(
        instance_report(Instance::Agent, &targets.agent),
        instance_report(Instance::Dnsproxy, &targets.dnsproxy),
    );
    let reports = [agent, dnsproxy];
    if reports.iter().all(|report| !report.up) {
        let reasons: Vec<String> = reports
            .iter()
            .map(|report| {
                format!(
                    "{} at {}: {}",
                    report.instance,
                    report.url,
                    report.error.as_deref().unwrap_or("down")
                )
            })
            .collect();
        bail!("neither instance answers ({})", reasons.join("; "));
    }
    if output == Output::Json {
        return Ok(with_newline(serde_json::to_string_pretty(&reports)?));
    }
    Ok(render_reports(&reports, now_ms()))
}

async fn instance_report(instance: Instance, url: &str) -> InstanceReport {
    let mut report = InstanceReport {
        instance: instance.name().to_owned(),
        url: url.to_owned(),
        up: false,
        error: None,
        status: None,
        resync: None,
    };
    let (status, metrics) = tokio::join!(get(url, "/v1/status"), get(url, "/metrics"));
    match status.and_then(|body| {
        serde_json::from_str::<InstanceStatus>(&body)
            .context("its status is not what this CLI expects")
    }) {
        Ok(status) => {
            report.up = true;
            report.status = Some(status);
        }
        Err(error) => report.error = Some(format!("{error:#}")),
    }
    if let Ok(scrape) = metrics {
        report.resync = Some(resync_summary(&scrape));
    }
    report
}

/// The resync facts in a Prometheus text scrape.
pub fn resync_summary(scrape: &str) -> ResyncSummary {
    let count = scrape_value(scrape, "warden_resyncs_total").unwrap_or(0.0);
    let last = scrape_value(scrape, "warden_last_resync_timestamp_seconds").unwrap_or(0.0);
    ResyncSummary {
        // Counter values are whole numbers; the cast only drops a fraction there is none of.
        count: if count.is_finite() && count > 0.0 {
            count as u64
        } else {
            0
        },
        last_at: (last > 0.0).then_some(last),
    }
}

/// The first sample of an unlabelled (apart from `instance`) series.
fn scrape_value(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let metric = series.split_once('{').map_or(series, |(metric, _)| metric);
        (metric == name).then(|| value.parse().ok()).flatten()
    })
}

/// Who serves first, then one block per instance.
pub fn render_reports(reports: &[InstanceReport], now_ms: u64) -> String {
    let mut text = String::new();
    let serving: Vec<&str> = reports
        .iter()
        .filter(|report| report.status.as_ref().is_some_and(|status| status.serving))
        .map(|report| report.instance.as_str())
        .collect();
    // With the eBPF datapath the port's queries go to the preferred process: the other one,
    // serving too, waits as a standby. Named both as serving, an operator could not tell who
    // answers.
    let preferred = reports
        .iter()
        .find_map(|report| report.status.as_ref()?.preferred.as_deref())
        .filter(|preferred| serving.contains(preferred));
    let named: Vec<String> = serving
        .iter()
        .map(|instance| match preferred {
            Some(preferred) if *instance != preferred => format!("{instance} (standby)"),
            _ => (*instance).to_owned(),
        })
        .collect();
    let _ = writeln!(
        text,
        "DNS served by:   {}",
        if named.is_empty() {
            "nobody".to_owned()
        } else {
            named.join(", ")
        }
    );
    for report in reports {
        text.push('\n');
        match (&report.status, &report.error) {
            (Some(status), _) => {
                let _ = writeln!(text, "== {} ({}): up", report.instance, report.url);
                text.push_str(&render_status(status));
                if let Some(preferred) = &status.preferred {
                    let _ = writeln!(text, "Preferred:       {preferred}");
                }
                let _ = writeln!(
                    text,
                    "Last resync:     {}",
                    render_resync(status, report.resync, now_ms)
                );
            }
            (None, error) => {
                let _ = writeln!(
                    text,
                    "== {} ({}): down ({})",
                    report.instance,
                    report.url,
                    error.as_deref().unwrap_or("no answer")
                );
            }
        }
    }
    text
}

/// When the last resync completed and how long it took (from the status document), with the
/// number of resyncs (from the metrics); the metrics alone for an instance whose status does
/// not say.
fn render_resync(status: &InstanceStatus, resync: Option<ResyncSummary>, now_ms: u64) -> String {
    let total = resync.map(|resync| format!(" ({} in total)", resync.count));
    if let Some(at_ms) = status.last_resync_at_ms {
        let ago = now_ms.saturating_sub(at_ms) / 1000;
        let took = status
            .last_resync_ms
            .map(|took| format!(", took {took}ms"))
            .unwrap_or_default();
        return format!("{ago}s ago{took}{}", total.unwrap_or_default());
    }
    let Some(resync) = resync else {
        return "unknown".to_owned();
    };
    match (resync.count, resync.last_at) {
        (0, _) => "never".to_owned(),
        (count, Some(at)) => {
            // Seconds since the Unix epoch fit an f64 exactly for millennia.
            let ago = (now_ms as f64 / 1000.0 - at).max(0.0);
            format!("{ago:.0}s ago ({count} in total)")
        }
        (count, None) => format!("{count} in total"),
    }
}

/// The human-readable status of one instance, one fact per line.
pub fn render_status(status: &InstanceStatus) -> String {
    let mut text = String::new();
    let yes_no = |flag: bool| if flag { "yes" } else { "no" };
    let _ = writeln!(
        text,
        "Instance:        {} ({})",
        status.instance, status.version
    );
    let _ = writeln!(
        text,
        "Serving DNS:     {} on {}",
        yes_no(status.serving),
        join(&status.dns_listen)
    );
    let _ = writeln!(text, "Ready:           {}", yes_no(status.ready));
    let _ = writeln!(text, "Mode:            {}", status.mode);
    let _ = writeln!(text, "Peer connected:  {}", yes_no(status.peer_connected));
    let _ = writeln!(
        text,
        "DNS port held by: {}",
        status.dns_port_holders.join(", ")
    );
    let _ = writeln!(
        text,
        "Policy:          revision {}, {} policies, {} selectors (from {})",
        status.policy.revision,
        status.policy.policies,
        status.policy.selectors,
        status.policy.source
    );
    if let Some(error) = &status.policy.last_error {
        let _ = writeln!(text, "Policy error:    {error}");
    }
    let _ = writeln!(
        text,
        "FQDN cache:      {} names, {} IPs",
        status.cache_names, status.cache_ips
    );
    let _ = writeln!(text, "Endpoints:       {}", status.endpoints);
    let _ = writeln!(text, "Datapath:        {}", status.datapath);
    let _ = writeln!(text, "Uptime:          {}s", status.uptime_s);
    text
}

// ---------------------------------------------------------------------------------------
// observe
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ObserveOptions {
    /// Only the events of this process (`instance` field), wherever they are read.
    only: Option<Instance>,
    last: Option<usize>,
    since_ms: Option<u64>,
    output: Output,
}

impl ObserveOptions {
    fn wanted(&self, line: &FlowLine) -> bool {
        match (self.only, line) {
            (None, _) | (_, FlowLine::Lost(_)) => true,
            (Some(only), line) => line.instance() == only.name(),
        }
    }
}

/// Both processes are always read: the agent also holds the events warden-dnsproxy forwards to
/// it, and either may be down.
const SOURCES: [Instance; 2] = [Instance::Agent, Instance::Dnsproxy];

fn flows_path(since_ms: Option<u64>, follow: bool) -> String {
    let mut query = Vec::new();
    if follow {
        query.push("follow=true".to_owned());
    }
    if let Some(since) = since_ms {
        query.push(format!("since_ms={since}"));
    }
    if query.is_empty() {
        "/v1/flows".to_owned()
    } else {
        format!("/v1/flows?{}", query.join("&"))
    }
}

/// Events already printed (or deliberately skipped), so that one read twice prints once: from
/// both processes (the agent holds the events warden-dnsproxy forwards to it), or again when a
/// reconnection replays from the last millisecond seen. Bounded: the oldest are forgotten.
#[derive(Debug, Default)]
struct Seen {
    keys: HashSet<u64>,
    order: VecDeque<u64>,
}

/// Events remembered by [`Seen`]; a duplicate comes within moments, or after an outage's
/// journal replay, far less than this many events later.
const SEEN_CAPACITY: usize = 100_000;

impl Seen {
    /// Whether `line` is new; remembers it. Loss markers are always new.
    fn admit(&mut self, line: &FlowLine) -> bool {
        if matches!(line, FlowLine::Lost(_)) {
            return true;
        }
        let mut hasher = DefaultHasher::new();
        serde_json::to_string(line)
            .unwrap_or_default()
            .hash(&mut hasher);
        let key = hasher.finish();
        if !self.keys.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > SEEN_CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.keys.remove(&oldest);
        }
        true
    }
}

/// What `warden observe` read from both processes' `/v1/flows`.
struct Retained {
    /// The wanted events, deduplicated, oldest first, each with the process it was read from.
    lines: Vec<(Instance, FlowLine)>,
    /// `--last`: the index of the first line to print.
    first: usize,
    /// Every event read, wanted or not.
    seen: Seen,
    /// The newest event time read from each process that answered.
    newest: Vec<(Instance, u64)>,
    /// The processes that did not answer.
    down: Vec<Instance>,
}

/// The retained events of both processes, merged by time. One that does not answer is skipped
/// with a note; it is an error only when neither answers.
async fn retained_flows(targets: &Targets, options: &ObserveOptions) -> anyhow::Result<Retained> {
    let path = flows_path(options.since_ms, false);
    let mut merged = Vec::new();
    let mut failures = Vec::new();
    let mut newest = Vec::new();
    let mut down = Vec::new();
    for source in SOURCES {
        let url = targets.url(source);
        let fetched = get(url, &path).await.and_then(|body| {
            serde_json::from_str::<Vec<FlowLine>>(&body)
                .context("its flow events are not what this CLI expects")
        });
        match fetched {
            Ok(lines) => {
                let time = lines.iter().map(FlowLine::time_ms).max().unwrap_or(0);
                newest.push((source, time));
                merged.extend(lines.into_iter().map(|line| (source, line)));
            }
            Err(error) => {
                down.push(source);
                failures.push(format!("{} at {url}: {error:#}", source.name()));
            }
        }
    }
    if down.len() == SOURCES.len() {
        bail!("{}", failures.join("; "));
    }
    for failure in &failures {
        eprintln!("warden: skipping {failure}");
    }
    // Stable: each process's own order is kept for events of the same millisecond.
    merged.sort_by_key(|(_, line)| line.time_ms());
    let mut seen = Seen::default();
    let lines: Vec<(Instance, FlowLine)> = merged
        .into_iter()
        .filter(|(_, line)| seen.admit(line))
        .filter(|(_, line)| options.wanted(line))
        .collect();
    let first = options
        .last
        .map_or(0, |last| lines.len().saturating_sub(last));
    Ok(Retained {
        lines,
        first,
        seen,
        newest,
        down,
    })
}

async fn observe(targets: &Targets, options: &ObserveOptions) -> anyhow::Result<String> {
    let retained = retained_flows(targets, options).await?;
    let mut text = String::new();
    for (source, line) in retained.lines.into_iter().skip(retained.first) {
        text.push_str(&render_line(source, line, options.output));
    }
    Ok(text)
}

/// What a follower task tells the printer.
enum Followed {
    Line(Instance, Box<FlowLine>),
    Up(Instance),
    Down(Instance, String),
}

/// Prints the retained events, then follows both processes at once, reconnecting to one that
/// goes away: with both on the node, events come from whichever answers. Runs until
/// interrupted (or fails at once when neither answers).
async fn observe_follow(targets: &Targets, options: &ObserveOptions) -> anyhow::Result<String> {
    let started_ms = now_ms();
    let retained = retained_flows(targets, options).await?;
    let mut out = String::new();
    for (source, line) in retained.lines.into_iter().skip(retained.first) {
        out.push_str(&render_line(source, line, options.output));
    }
    if reader_gone(emit(&out))? {
        return Ok(String::new());
    }
    let mut seen = retained.seen;
    let (sender, mut receiver) = mpsc::channel::<Followed>(1024);
    for source in SOURCES {
        // From the newest event read (replayed events are recognized as seen); a process that
        // was down starts from now, not from its whole history.
        let since = match retained.newest.iter().find(|(s, _)| *s == source) {
            Some((_, newest)) if *newest > 0 => Some(*newest),
            Some(_) => options.since_ms,
            None => Some(options.since_ms.unwrap_or(started_ms).max(started_ms)),
        };
        let url = targets.url(source).to_owned();
        tokio::spawn(follow_instance(source, url, since, sender.clone()));
    }
    drop(sender);
    let mut up: HashSet<Instance> = SOURCES
        .into_iter()
        .filter(|source| !retained.down.contains(source))
        .collect();
    let mut reported_down: HashSet<Instance> = retained.down.iter().copied().collect();
    while let Some(message) = receiver.recv().await {
        match message {
            Followed::Line(source, line) => {
                let line = *line;
                if seen.admit(&line)
                    && options.wanted(&line)
                    && reader_gone(emit(&render_line(source, line, options.output)))?
                {
                    // Nobody reads any more (`| head`, a closed pipe): stop following.
                    return Ok(String::new());
                }
            }
            Followed::Up(source) => {
                up.insert(source);
                if reported_down.remove(&source) {
                    eprintln!("warden: {} answers; following it", source.name());
                }
            }
            Followed::Down(source, reason) => {
                up.remove(&source);
                if reported_down.insert(source) {
                    let others: Vec<&str> = up.iter().map(|i| i.name()).collect();
                    if others.is_empty() {
                        eprintln!(
                            "warden: {} is not answering ({reason}); waiting for an instance",
                            source.name()
                        );
                    } else {
                        eprintln!(
                            "warden: {} is not answering ({reason}); following {}",
                            source.name(),
                            others.join(", ")
                        );
                    }
                }
            }
        }
    }
    Ok(String::new())
}

/// Follows one instance's stream forever, reconnecting after it ends; each reconnection asks
/// for the events since the last one received, so restarts and hiccups lose nothing the
/// instance still retains.
async fn follow_instance(
    instance: Instance,
    url: String,
    mut since: Option<u64>,
    sender: mpsc::Sender<Followed>,
) {
    loop {
        let result = follow_once(instance, &url, &mut since, &sender).await;
        if sender.is_closed() {
            return;
        }
        let reason = match result {
            Ok(()) => "stream ended".to_owned(),
            Err(error) => format!("{error:#}"),
        };
        if sender.send(Followed::Down(instance, reason)).await.is_err() {
            return;
        }
        tokio::time::sleep(RECONNECT_INTERVAL).await;
    }
}

async fn follow_once(
    instance: Instance,
    url: &str,
    since: &mut Option<u64>,
    sender: &mpsc::Sender<Followed>,
) -> anyhow::Result<()> {
    let uri = admin_uri(url, &flows_path(*since, true))?;
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client().get(uri.clone()))
        .await
        .with_context(|| format!("no answer within {REQUEST_TIMEOUT:?}"))?
        .context("cannot connect")?;
    if !response.status().is_success() {
        bail!("{uri}: {}", response.status());
    }
    if sender.send(Followed::Up(instance)).await.is_err() {
        return Ok(());
    }
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the stream broke")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        if pending.len() > MAX_FLOW_LINE && !pending.contains(&b'\n') {
            bail!("a flow line longer than {MAX_FLOW_LINE} bytes: not a flow stream");
        }
        while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str::<FlowLine>(line) {
                Ok(flow) => {
                    if !matches!(flow, FlowLine::Lost(_)) {
                        *since = Some(since.unwrap_or(0).max(flow.time_ms()));
                    }
                    if sender
                        .send(Followed::Line(instance, Box::new(flow)))
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                // A newer server's line this CLI does not know: skip it, keep following.
                Err(error) => eprintln!("warden: unreadable flow line ({error}): {line}"),
            }
        }
    }
    Ok(())
}

/// One event as printed: a JSON line, or a Hubble-style line (see [`render_flow`]).
fn render_line(instance: Instance, mut line: FlowLine, output: Output) -> String {
    if let FlowLine::Lost(lost) = &mut line
        && lost.instance.is_empty()
    {
        lost.instance = instance.name().to_owned();
    }
    match output {
        Output::Json => with_newline(serde_json::to_string(&line).unwrap_or_default()),
        Output::Table => with_newline(render_flow(&line)),
    }
}

/// One flow event on one line, Hubble-style: time, instance, source -> destination, kind,
/// verdict, then the details in parentheses.
///
/// ```text
/// 2026-06-04T12:34:56.789Z [agent]: youssef/test (127.0.0.2:53211) -> 127.105.0.1:53 dns/udp ALLOWED (cilium.io. A NOERROR, 198.18.1.10, TTL 300, 0.412ms)
/// 2026-06-04T12:34:57.001Z [agent]: youssef/test -> 198.18.2.30:80 tcp DROPPED
/// ```
pub fn render_flow(line: &FlowLine) -> String {
    match line {
        FlowLine::Dns(flow) => render_dns(flow),
        FlowLine::Drop(flow) => render_drop(flow),
        FlowLine::Lost(lost) => render_lost(lost),
    }
}

fn render_dns(flow: &DnsFlow) -> String {
    let mut details = vec![format!("{} {} {}", flow.qname, flow.qtype, flow.rcode)];
    if !flow.cnames.is_empty() {
        details.push(format!("CNAME {}", flow.cnames.join(",")));
    }
    if !flow.ips.is_empty() {
        details.push(join(&flow.ips));
        details.push(format!("TTL {}", flow.ttl));
    }
    details.push(format_latency(flow.latency_us));
    format!(
        "{} [{}]: {} ({}) -> {} dns/{} {} ({})",
        format_time(flow.time_ms),
        flow.instance,
        flow.endpoint,
        flow.client,
        flow.server,
        flow.protocol,
        flow.verdict.as_str().to_ascii_uppercase(),
        details.join(", ")
    )
}

fn render_drop(flow: &DropFlow) -> String {
    format!(
        "{} [{}]: {} -> {} {} DROPPED",
        format_time(flow.time_ms),
        flow.instance,
        flow.endpoint,
        std::net::SocketAddr::new(flow.destination, flow.port),
        flow.protocol,
    )
}

fn render_lost(lost: &LostEvents) -> String {
    format!(
        "{} [{}]: EVENTS LOST ({} events not delivered: this follower fell behind)",
        format_time(lost.time_ms),
        lost.instance,
        lost.count
    )
}

/// Microseconds as milliseconds with three decimals: `0.412ms`.
fn format_latency(micros: u64) -> String {
    format!("{}.{:03}ms", micros / 1000, micros % 1000)
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC: `2026-06-04T12:34:56.789Z`.
pub fn format_time(time_ms: u64) -> String {
    let millis = time_ms % 1000;
    let seconds = time_ms / 1000;
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The Unix time in ms `seconds` before `now_ms`; the epoch for any longer span.
fn since_ms(now_ms: u64, seconds: u64) -> u64 {
    now_ms.saturating_sub(seconds.saturating_mul(1000))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// fqdn cache, endpoints
// ---------------------------------------------------------------------------------------

/// Checks a name pattern before anything is sent, so that a typo is reported as such.
fn parse_pattern(name: Option<&str>) -> anyhow::Result<Option<NamePattern>> {
    name.map(|name| NamePattern::new(name).with_context(|| format!("bad name pattern {name:?}")))
        .transpose()
}

fn cache_query(endpoint: Option<&str>, name: Option<&str>) -> String {
    let mut query = Vec::new();
    if let Some(endpoint) = endpoint {
        query.push(format!("endpoint={}", encode(endpoint)));
    }
    if let Some(name) = name {
        query.push(format!("name={}", encode(name)));
    }
    if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    }
}

async fn cache_list(
    url: &str,
    endpoint: Option<String>,
    name: Option<String>,
    output: Output,
) -> anyhow::Result<String> {
    let pattern = parse_pattern(name.as_deref())?;
    let path = format!(
        "/v1/fqdn/cache{}",
        cache_query(endpoint.as_deref(), name.as_deref())
    );
    let body = get(url, &path).await?;
    let rows: Vec<CacheRow> =
        serde_json::from_str(&body).context("the cache listing is not what this CLI expects")?;
    // Filtered here too, so the pattern means the same whichever process answered.
    let rows: Vec<CacheRow> = rows
        .into_iter()
        .filter(|row| {
            endpoint
                .as_deref()
                .is_none_or(|wanted| wanted == row.endpoint)
        })
        .filter(|row| {
            pattern.as_ref().is_none_or(|pattern| {
                DnsName::new(&row.name).is_ok_and(|name| pattern.matches(&name))
            })
        })
        .collect();
    if output == Output::Json {
        return Ok(with_newline(serde_json::to_string_pretty(&rows)?));
    }
    Ok(render_cache(&rows))
}

/// Columns: endpoint, name, IPs, TTL remaining, source.
pub fn render_cache(rows: &[CacheRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                row.endpoint.clone(),
                row.name.clone(),
                join(&row.ips),
                format!("{}s", row.ttl),
                row.source.clone(),
            ]
        })
        .collect();
    render_table(&["ENDPOINT", "NAME", "IPS", "TTL", "SOURCE"], &cells)
}

async fn cache_clean(
    agent: &str,
    endpoint: Option<String>,
    name: Option<String>,
    force: bool,
    output: Output,
) -> anyhow::Result<String> {
    parse_pattern(name.as_deref())?;
    if endpoint.is_none() && name.is_none() && !force {
        bail!(
            "this would flush the whole FQDN cache (connections to the IPs it held are cut once \
             their allow entries go); pass -n PATTERN or -e ENDPOINT, or -f to flush everything"
        );
    }
    let path = format!(
        "/v1/fqdn/cache/clean{}",
        cache_query(endpoint.as_deref(), name.as_deref())
    );
    let body = request(hyper::Method::POST, agent, &path).await?;
    let report: CleanReport =
        serde_json::from_str(&body).context("the agent's answer is not what this CLI expects")?;
    if output == Output::Json {
        return Ok(with_newline(serde_json::to_string_pretty(&report)?));
    }
    Ok(render_clean(&report))
}

/// How much went, then the removed entries grouped by (endpoint, name).
pub fn render_clean(report: &CleanReport) -> String {
    let mut text = format!(
        "Removed {} names ({} IPs) from the agent's FQDN cache\n",
        report.names, report.ips
    );
    if report.removed.is_empty() {
        return text;
    }
    let mut cells: Vec<Vec<String>> = Vec::new();
    for entry in &report.removed {
        match cells.last_mut() {
            Some(row) if row[0] == entry.endpoint && row[1] == entry.name => {
                row[2] = format!("{},{}", row[2], entry.ip);
            }
            _ => cells.push(vec![
                entry.endpoint.clone(),
                entry.name.clone(),
                entry.ip.to_string(),
            ]),
        }
    }
    text.push_str(&render_table(&["ENDPOINT", "NAME", "IPS"], &cells));
    text
}

async fn endpoint_list(agent: &str, output: Output) -> anyhow::Result<String> {
    let body = get(agent, "/v1/endpoints").await?;
    let rows: Vec<EndpointRow> = serde_json::from_str(&body)
        .context("the agent's endpoint list is not what this CLI expects")?;
    if output == Output::Json {
        return Ok(with_newline(serde_json::to_string_pretty(&rows)?));
    }
    Ok(render_endpoints(&rows))
}

/// Columns: ID, endpoint, enforced (`peer` for a peer only), IPs, cgroup, labels.
pub fn render_endpoints(rows: &[EndpointRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                row.id.to_string(),
                row.endpoint.clone(),
                match (row.peer_only, row.enforced) {
                    (true, _) => "peer",
                    (false, true) => "yes",
                    (false, false) => "no",
                }
                .to_owned(),
                if row.ips.is_empty() {
                    "-".to_owned()
                } else {
                    join(&row.ips)
                },
                row.cgroup
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |cgroup| cgroup.display().to_string()),
                row.labels.join(","),
            ]
        })
        .collect();
    render_table(
        &["ID", "ENDPOINT", "ENFORCED", "IPS", "CGROUP", "LABELS"],
        &cells,
    )
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (index, (cell, width)) in cells.zip(&widths).enumerate() {
            if index + 1 == widths.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ");
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    text
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>()
}

fn admin_uri(base: &str, path: &str) -> anyhow::Result<hyper::Uri> {
    let trimmed = bracket_ipv6(base.trim_end_matches('/'));
    let uri: hyper::Uri = format!("{trimmed}{path}")
        .parse()
        .with_context(|| format!("bad admin URL {base:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("an admin URL must be http://HOST:PORT, got {base:?}");
    }
    Ok(uri)
}

/// `http://IPV6:PORT` as Kubernetes writes `http://$(HOST_IP):9890` for an IPv6 node, with the
/// brackets a URL needs; anything else as given.
fn bracket_ipv6(base: &str) -> String {
    if let Some(authority) = base.strip_prefix("http://")
        && let Some((host, port)) = authority.rsplit_once(':')
        && host.parse::<std::net::Ipv6Addr>().is_ok()
        && port.parse::<u16>().is_ok()
    {
        return format!("http://[{host}]:{port}");
    }
    base.to_owned()
}

async fn get(base: &str, path: &str) -> anyhow::Result<String> {
    request(hyper::Method::GET, base, path).await
}

async fn request(method: hyper::Method, base: &str, path: &str) -> anyhow::Result<String> {
    let uri = admin_uri(base, path)?;
    let request = hyper::Request::builder()
        .method(method)
        .uri(uri.clone())
        .body(Empty::<Bytes>::new())
        .context("cannot build the request")?;
    let base = base.trim_end_matches('/');
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client().request(request))
        .await
        .with_context(|| format!("no answer from {base} within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("cannot reach {base}"))?;
    let status = response.status();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
        .await
        .context("the answer did not complete")?
        .context("cannot read the answer")?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("{uri}: {status}: {}", body.trim());
    }
    Ok(body)
}

/// Writes to stdout and flushes, so that each followed event is seen as it happens.
/// Whether a write found its reader gone (a broken pipe: `| head`), which ends a command
/// quietly; any other failure (a full disk behind `>`) is an error.
fn reader_gone(written: std::io::Result<()>) -> anyhow::Result<bool> {
    match written {
        Ok(()) => Ok(false),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(true),
        Err(error) => Err(anyhow::anyhow!("cannot write the output: {error}")),
    }
}

fn emit(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

fn with_newline(mut text: String) -> String {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Percent-encodes a query parameter value.
fn encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~*".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbracketed_ipv6_admin_url_is_bracketed() {
        assert_eq!(
            admin_uri("http://fd00::1:9890", "/v1/status").unwrap(),
            "http://[fd00::1]:9890/v1/status"
        );
        assert_eq!(
            admin_uri("http://[fd00::1]:9890/", "/metrics").unwrap(),
            "http://[fd00::1]:9890/metrics"
        );
        assert_eq!(
            admin_uri("http://10.0.0.1:9890", "/readyz").unwrap(),
            "http://10.0.0.1:9890/readyz"
        );
    }
    use warden_telemetry::Verdict;

    /// `kubectl get pod NAME -o json | warden endpoint sync ...` wrote the one pod and removed
    /// every other pod's file: a single Pod says nothing of the others.
    #[test]
    fn one_pod_is_written_without_removing_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = crate::pod_endpoints::Kubelet {
            driver: crate::pod_endpoints::CgroupDriver::Systemd,
            cgroup_root: std::path::PathBuf::new(),
        };
        let pod = |uid: &str, ip: &str| {
            serde_json::json!({"kind": "Pod",
                "metadata": {"name": format!("p{uid}"), "namespace": "shop", "uid": uid},
                "spec": {"nodeName": "n1"},
                "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": ip}})
        };
        let list = dir.path().join("list.json");
        let list_value =
            serde_json::json!({"kind": "PodList", "items": [pod("aaaa-0001", "10.0.0.1")]});
        std::fs::write(&list, list_value.to_string()).unwrap();
        let one = dir.path().join("one.json");
        std::fs::write(&one, pod("aaaa-0002", "10.0.0.2").to_string()).unwrap();
        let endpoints = dir.path().join("endpoints");
        endpoint_sync("n1", &endpoints, &list, &kubelet, &[], false).unwrap();
        let line = endpoint_sync("n1", &endpoints, &one, &kubelet, &[], false).unwrap();
        assert!(line.contains("0 removed"), "{line}");
        assert!(endpoints.join("pod-aaaa-0001.yaml").exists());
        assert!(endpoints.join("pod-aaaa-0002.yaml").exists());
        // The whole node's list still removes what it does not hold.
        let line = endpoint_sync("n1", &endpoints, &list, &kubelet, &[], false).unwrap();
        assert!(line.contains("1 removed"), "{line}");
    }

    /// `--since 18446744073709552` wrapped in release builds (no overflow checks) to a moment
    /// 384 ms ago, and filtered out nearly everything.
    #[test]
    fn a_since_longer_than_time_itself_means_everything() {
        assert_eq!(since_ms(10_000, 3), 7_000);
        assert_eq!(since_ms(10_000, 18_446_744_073_709_552), 0);
        assert_eq!(since_ms(10_000, u64::MAX), 0);
    }

    #[test]
    fn the_cache_table_has_the_documented_columns() {
        let rows = vec![CacheRow {
            endpoint: "youssef/test".into(),
            name: "cilium.io.".into(),
            ips: vec!["198.18.1.10".parse().unwrap()],
            ttl: 299,
            expires_at: 1,
            source: "lookup".into(),
            entries: vec![],
        }];
        let text = render_cache(&rows);
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["ENDPOINT", "NAME", "IPS", "TTL", "SOURCE"]
        );
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            [
                "youssef/test",
                "cilium.io.",
                "198.18.1.10",
                "299s",
                "lookup"
            ]
        );
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("youssef/test"), "youssef%2Ftest");
        assert_eq!(encode("*.cilium.io"), "*.cilium.io");
    }

    fn dns_flow() -> DnsFlow {
        DnsFlow {
            time_ms: 1_780_576_496_789,
            instance: "agent".into(),
            endpoint: "youssef/test".into(),
            client: "127.0.0.2:53211".parse().unwrap(),
            server: "127.105.0.1:53".parse().unwrap(),
            protocol: "udp".into(),
            qname: "www.cilium.io.".into(),
            qtype: "A".into(),
            rcode: "NOERROR".into(),
            verdict: Verdict::Allowed,
            ips: vec![
                "198.18.1.11".parse().unwrap(),
                "198.18.1.12".parse().unwrap(),
            ],
            ttl: 60,
            cnames: vec!["web.cilium.io.".into(), "edge.cilium.io.".into()],
            latency_us: 1204,
        }
    }

    #[test]
    fn flow_lines_are_hubble_style() {
        assert_eq!(
            render_flow(&FlowLine::Dns(dns_flow())),
            "2026-06-04T12:34:56.789Z [agent]: youssef/test (127.0.0.2:53211) -> 127.105.0.1:53 \
             dns/udp ALLOWED (www.cilium.io. A NOERROR, CNAME web.cilium.io.,edge.cilium.io., \
             198.18.1.11,198.18.1.12, TTL 60, 1.204ms)"
        );
        let denied = DnsFlow {
            qname: "bbc.co.uk.".into(),
            rcode: "REFUSED".into(),
            verdict: Verdict::Denied,
            ips: vec![],
            ttl: 0,
            cnames: vec![],
            latency_us: 51,
            ..dns_flow()
        };
        assert_eq!(
            render_flow(&FlowLine::Dns(denied)),
            "2026-06-04T12:34:56.789Z [agent]: youssef/test (127.0.0.2:53211) -> 127.105.0.1:53 \
             dns/udp DENIED (bbc.co.uk. A REFUSED, 0.051ms)"
        );
        let dropped = DropFlow {
            time_ms: 1_780_576_497_001,
            time_ns: 1_780_576_497_001_234_567,
            instance: "agent".into(),
            endpoint: "youssef/test".into(),
            destination: "fd00:77::30".parse().unwrap(),
            port: 80,
            protocol: "tcp".into(),
        };
        assert_eq!(
            render_flow(&FlowLine::Drop(dropped)),
            "2026-06-04T12:34:57.001Z [agent]: youssef/test -> [fd00:77::30]:80 tcp DROPPED"
        );
        let lost = render_line(
            Instance::Dnsproxy,
            FlowLine::Lost(LostEvents {
                time_ms: 0,
                instance: String::new(),
                count: 7,
            }),
            Output::Table,
        );
        assert_eq!(
            lost,
            "1970-01-01T00:00:00.000Z [dnsproxy]: EVENTS LOST (7 events not delivered: this \
             follower fell behind)\n"
        );
    }

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_time(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
    }

    #[test]
    fn an_event_read_twice_prints_once() {
        let mut seen = Seen::default();
        let at = |time_ms: u64, port: u16, instance: &str| {
            FlowLine::Drop(DropFlow {
                time_ms,
                time_ns: time_ms * 1_000_000,
                instance: instance.into(),
                endpoint: "e".into(),
                destination: "198.18.1.1".parse().unwrap(),
                port,
                protocol: "tcp".into(),
            })
        };
        assert!(seen.admit(&at(10, 1, "agent")));
        assert!(seen.admit(&at(10, 2, "agent")));
        // From the other process, or replayed by a reconnection.
        assert!(!seen.admit(&at(10, 1, "agent")));
        assert!(seen.admit(&at(10, 1, "dnsproxy")));
        // Recorded late with an older time (a drop read after a restart): still new.
        assert!(seen.admit(&at(5, 9, "agent")));
        // Drops alike within one millisecond (a UDP sender's datagrams) are each printed.
        let again = |time_ns: u64| match at(30, 9, "agent") {
            FlowLine::Drop(drop) => FlowLine::Drop(DropFlow { time_ns, ..drop }),
            other => other,
        };
        assert!(seen.admit(&again(30_000_001)));
        assert!(seen.admit(&again(30_000_002)));
        assert!(!seen.admit(&again(30_000_002)));
        let lost = FlowLine::Lost(LostEvents {
            time_ms: 10,
            instance: "agent".into(),
            count: 1,
        });
        assert!(seen.admit(&lost) && seen.admit(&lost), "always shown");
        for port in 0..=u16::try_from(SEEN_CAPACITY / 2).unwrap() {
            seen.admit(&at(20, port, "agent"));
            seen.admit(&at(21, port, "agent"));
        }
        assert!(seen.keys.len() <= SEEN_CAPACITY && seen.order.len() <= SEEN_CAPACITY);
        assert!(seen.admit(&at(10, 2, "agent")), "the oldest are forgotten");
    }

    #[test]
    fn instance_filters_by_the_event_not_the_source() {
        let options = ObserveOptions {
            only: Some(Instance::Dnsproxy),
            last: None,
            since_ms: None,
            output: Output::Json,
        };
        let event = |instance: &str| {
            FlowLine::Drop(DropFlow {
                time_ms: 1,
                time_ns: 1_000_000,
                instance: instance.into(),
                endpoint: "e".into(),
                destination: "198.18.1.1".parse().unwrap(),
                port: 80,
                protocol: "tcp".into(),
            })
        };
        assert!(options.wanted(&event("dnsproxy")));
        assert!(!options.wanted(&event("agent")));
    }

    #[test]
    fn resync_facts_come_from_the_scrape() {
        let scrape = "# HELP warden_resyncs_total x\n# TYPE warden_resyncs_total counter\n\
                      warden_resyncs_total{instance=\"dnsproxy\"} 3\n\
                      warden_last_resync_timestamp_seconds{instance=\"dnsproxy\"} 1000\n";
        let summary = resync_summary(scrape);
        assert_eq!(
            summary,
            ResyncSummary {
                count: 3,
                last_at: Some(1000.0)
            }
        );
        let mut status = status_of("dnsproxy");
        assert_eq!(
            render_resync(&status, Some(summary), 1_012_000),
            "12s ago (3 in total)"
        );
        assert_eq!(
            render_resync(&status, Some(resync_summary("")), 1_012_000),
            "never"
        );
        status.last_resync_at_ms = Some(1_002_000);
        status.last_resync_ms = Some(4);
        assert_eq!(
            render_resync(&status, Some(summary), 1_012_000),
            "10s ago, took 4ms (3 in total)"
        );
    }

    fn status_of(instance: &str) -> InstanceStatus {
        InstanceStatus {
            instance: instance.into(),
            version: "0.1.0".into(),
            serving: true,
            ready: true,
            peer_connected: false,
            mode: "offline".into(),
            policy_revision: 4,
            policy: warden_telemetry::PolicyStatusView {
                revision: 4,
                policies: 1,
                selectors: 2,
                source: "snapshot".into(),
                last_error: None,
            },
            cache_names: 3,
            cache_ips: 4,
            endpoints: 1,
            dns_listen: vec!["127.0.0.1:10053".parse().unwrap()],
            dns_port_holders: vec![instance.into()],
            datapath: "ebpf".into(),
            uptime_s: 5,
            preferred: None,
            last_resync_at_ms: None,
            last_resync_ms: None,
        }
    }

    /// With the eBPF datapath both processes serve and the program steers the port's queries
    /// to one: the headline named both, who answers showing only further down.
    #[test]
    fn the_headline_marks_the_process_not_steered_to_as_standby() {
        let report = |instance: &str, preferred: Option<&str>| InstanceReport {
            instance: instance.into(),
            url: format!("http://{instance}"),
            up: true,
            error: None,
            status: Some(InstanceStatus {
                preferred: preferred.map(str::to_owned),
                ..status_of(instance)
            }),
            resync: None,
        };
        for (preferred, headline) in [
            (Some("dnsproxy"), "agent (standby), dnsproxy"),
            // Shared by the kernel's hash, or no datapath: both answer.
            (Some("share"), "agent, dnsproxy"),
            (None, "agent, dnsproxy"),
        ] {
            let reports = [report("agent", preferred), report("dnsproxy", preferred)];
            let text = render_reports(&reports, 0);
            assert!(
                text.starts_with(&format!("DNS served by:   {headline}\n")),
                "{text}"
            );
        }
    }

    #[test]
    fn a_down_instance_is_shown_as_down() {
        let reports = [
            InstanceReport {
                instance: "agent".into(),
                url: "http://127.0.0.1:9890".into(),
                up: false,
                error: Some("cannot reach http://127.0.0.1:9890".into()),
                status: None,
                resync: None,
            },
            InstanceReport {
                instance: "dnsproxy".into(),
                url: "http://127.0.0.1:9891".into(),
                up: true,
                error: None,
                status: Some(status_of("dnsproxy")),
                resync: Some(ResyncSummary {
                    count: 0,
                    last_at: None,
                }),
            },
        ];
        let text = render_reports(&reports, 0);
        assert!(text.starts_with("DNS served by:   dnsproxy\n"), "{text}");
        assert!(
            text.contains("== agent (http://127.0.0.1:9890): down (cannot reach"),
            "{text}"
        );
        assert!(text.contains("Mode:            offline"), "{text}");
        assert!(text.contains("Last resync:     never"), "{text}");
    }

    #[test]
    fn the_endpoint_table_says_what_is_enforced() {
        let test = EndpointRow {
            id: 1,
            endpoint: "youssef/test".into(),
            labels: vec!["k8s:app=test".into()],
            ips: vec![],
            cgroup: Some("workload".into()),
            enforced: true,
            peer_only: false,
        };
        let dns = EndpointRow {
            id: 2,
            endpoint: "kube-system/service:kube-dns".into(),
            labels: vec!["k8s:k8s-app=kube-dns".into()],
            ips: vec!["10.96.0.10".parse().unwrap()],
            cgroup: None,
            enforced: false,
            peer_only: true,
        };
        let text = render_endpoints(&[test, dns]);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines,
            [
                vec!["ID", "ENDPOINT", "ENFORCED", "IPS", "CGROUP", "LABELS"],
                vec!["1", "youssef/test", "yes", "-", "workload", "k8s:app=test"],
                vec![
                    "2",
                    "kube-system/service:kube-dns",
                    "peer",
                    "10.96.0.10",
                    "-",
                    "k8s:k8s-app=kube-dns"
                ],
            ]
        );
    }
}
