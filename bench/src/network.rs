//! The network parts: knotd, the servers under test and the clients as processes; max QPS and
//! latency over the scenarios (a) to (g), the datapath hold, the profiles and the restarts.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use warden_tests::lab::dnsperf_in_cgroup;
use warden_tests::{DnsperfOpts, dnsperf_with, unique_loopback_v4};

use crate::ebpf::{self, EbpfLab};
use crate::lab::{self, Daemon, Dnsdist};
use crate::load::{self, LoadSpec};
use crate::report::{
    self, Hold, Latency, RedirectLookups, Restart, Results, ServerScopes, Throughput,
};
use crate::stats::Histogram;
use crate::verdict::ratios;
use crate::{Plan, hold, profile, target_dir};

/// One way of reaching knotd.
#[derive(Clone)]
struct Scenario {
    key: &'static str,
    label: &'static str,
    /// Where queries go; `None` when the scenario cannot run here.
    addr: Option<SocketAddr>,
    note: Option<String>,
    /// Through a policing proxy: verdicts are checked, histograms read.
    admins: Vec<SocketAddr>,
    /// The cgroup the clients run in (a workload's, whose programs redirect them); `None`: the
    /// bench's own.
    cgroup: Option<PathBuf>,
    /// The clients' address, when not the endpoint's (`client`).
    source: Option<IpAddr>,
}

/// The agent and `warden-dnsproxy` on one DNS address, when the proxy is built.
pub struct Pair {
    pub agent: Daemon,
    pub dnsproxy: Daemon,
    pub dns: SocketAddr,
    // Last: the processes go before their folder.
    _dir: warden_tests::warden::AgentDir,
}

pub async fn start_pair(upstream: SocketAddr, client: IpAddr) -> Result<Option<Pair>> {
    if warden_tests::warden::binary("warden-dnsproxy").is_err() {
        return Ok(None);
    }
    let dns = lab::addr_on(unique_loopback_v4())?;
    let (dir, config) = lab::agent_setup(dns, upstream, client)?;
    let agent = Daemon::agent(&dir, &config).await?;
    let dnsproxy = Daemon::dnsproxy(dir.path(), &config)
        .await?
        .context("warden-dnsproxy vanished")?;
    Ok(Some(Pair {
        agent,
        dnsproxy,
        dns,
        _dir: dir,
    }))
}

/// The network parts: throughput, latency, hold, profile, restart loss.
pub async fn network(plan: &Plan, out: &Path, results: &mut Results) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let client = unique_loopback_v4();
    let knot = lab::start_knot(unique_loopback_v4())?;
    let upstream = knot.addr();
    let queries = lab::dnsperf_queries()?;
    let templates = lab::templates()?;
    eprintln!("warden-bench: knotd on {upstream}, client address {client}");
    results.upstream = upstream.to_string();

    let (agent_dir, agent_config) =
        lab::agent_setup(lab::addr_on(unique_loopback_v4())?, upstream, client)?;
    let mut agent = Daemon::agent(&agent_dir, &agent_config).await?;
    let agent_dns = agent_config.dns.listen[0];

    let (mut pair, pair_note) = match start_pair(upstream, client).await {
        Ok(Some(pair)) => (Some(pair), None),
        Ok(None) => (
            None,
            Some("not available yet: no warden-dnsproxy binary in the target dir".to_owned()),
        ),
        Err(error) => {
            problems.push(format!("agent + warden-dnsproxy did not start: {error:#}"));
            (
                None,
                Some(format!("failed to start: {}", first_line(&error))),
            )
        }
    };

    let dnsdist = if Dnsdist::available() {
        Some(Dnsdist::start(unique_loopback_v4(), upstream, client).await?)
    } else if plan.smoke {
        None
    } else {
        bail!("dnsdist is not installed: run scripts/setup.sh (make bench does)");
    };

    // Warden as deployed, with the eBPF datapath: allow entries written per answer, and with
    // the dnsproxy beside the agent, every query steered to the dnsproxy.
    let (agent_ebpf, agent_ebpf_note) = start_ebpf(upstream, client, false, &mut problems).await;
    let (pair_ebpf, pair_ebpf_note) = start_ebpf(upstream, client, true, &mut problems).await;
    let redirected_client = unique_loopback_v4();
    let ebpf_admins = |lab: &Option<EbpfLab>| lab.as_ref().map(EbpfLab::admins).unwrap_or_default();

    let scenarios = vec![
        Scenario {
            key: "a",
            label: "direct to knotd",
            addr: Some(upstream),
            note: None,
            admins: vec![],
            cgroup: None,
            source: None,
        },
        Scenario {
            key: "b",
            label: "warden-agent",
            addr: Some(agent_dns),
            note: None,
            admins: vec![agent.admin],
            cgroup: None,
            source: None,
        },
        Scenario {
            key: "c",
            label: "agent + warden-dnsproxy",
            addr: pair.as_ref().map(|p| p.dns),
            note: pair_note.clone(),
            admins: pair
                .as_ref()
                .map(|p| vec![p.agent.admin, p.dnsproxy.admin])
                .unwrap_or_default(),
            cgroup: None,
            source: None,
        },
        Scenario {
            key: "d",
            label: "dnsdist",
            addr: dnsdist.as_ref().map(|d| d.addr),
            note: dnsdist
                .is_none()
                .then(|| "dnsdist not installed (smoke run)".to_owned()),
            admins: vec![],
            cgroup: None,
            source: None,
        },
        Scenario {
            key: "e",
            label: "warden-agent, eBPF datapath",
            addr: agent_ebpf.as_ref().map(|lab| lab.dns),
            note: agent_ebpf_note.clone(),
            admins: ebpf_admins(&agent_ebpf),
            cgroup: None,
            source: None,
        },
        Scenario {
            key: "f",
            label: "agent + warden-dnsproxy, eBPF datapath",
            addr: pair_ebpf.as_ref().map(|lab| lab.dns),
            note: pair_ebpf_note,
            admins: ebpf_admins(&pair_ebpf),
            cgroup: None,
            source: None,
        },
        // (e)'s agent again, the clients in its workload cgroup asking knotd itself: every
        // query redirected by the cgroup programs, its redirect record found by the agent.
        Scenario {
            key: "g",
            label: "warden-agent, eBPF datapath, client redirected",
            addr: agent_ebpf
                .as_ref()
                .and((upstream.port() == lab::DNS_PORT).then_some(upstream)),
            note: agent_ebpf_note.clone().or_else(|| {
                (upstream.port() != lab::DNS_PORT)
                    .then(|| "knotd is not on port 53, the only one redirected".to_owned())
            }),
            admins: ebpf_admins(&agent_ebpf),
            cgroup: agent_ebpf.as_ref().map(|lab| lab.workload.clone()),
            // Known by its cgroup; an address of its own keeps its client keys (and redirect
            // slots) apart from (e)'s, whose lookups must stay those of a client never
            // redirected.
            source: Some(redirected_client),
        },
    ];

    results.throughput = throughput(plan, &scenarios, queries.path(), client).await?;
    // Like for like: the agent answers the mix's denied names itself, and dnsdist forwards
    // every query, which knotd, on the same cores, then answers. With allowed names only
    // both forward everything.
    let allowed_only = lab::dnsperf_allowed_queries()?;
    let forwarding_all: Vec<Scenario> = scenarios
        .iter()
        .filter(|scenario| matches!(scenario.key, "b" | "d"))
        .cloned()
        .collect();
    results.throughput_allowed_only =
        throughput(plan, &forwarding_all, allowed_only.path(), client).await?;

    // 50% of dnsdist's maximum: a rate all four sustain, so latency is not queueing.
    let mean = |key: &str| {
        results
            .throughput
            .iter()
            .find(|t| t.key == key && t.available)
            .map(|t| t.mean_qps)
    };
    let (rate, basis) = match mean("d") {
        Some(d) if !plan.smoke => (round_down(d * 0.5), "50% of dnsdist's max QPS".to_owned()),
        _ => {
            let lowest = results
                .throughput
                .iter()
                .filter(|t| t.available)
                .map(|t| t.mean_qps)
                .fold(f64::INFINITY, f64::min);
            let rate = round_down((lowest * 0.5).min(2_000.0));
            (
                rate,
                "smoke: half the slowest scenario's max, at most 2,000".to_owned(),
            )
        }
    };
    results.latency_rate = rate;
    results.latency_rate_basis = basis;
    let base_spec = LoadSpec {
        target: upstream,
        source: client,
        rate,
        warmup: plan.latency_warmup,
        duration: plan.latency_run,
        timeout: load::DEFAULT_TIMEOUT,
        queries: templates.clone(),
        check_verdicts: false,
        min_sockets: 1,
    };
    results.latency = latency(&scenarios, &base_spec, plan.rounds).await?;
    let light_spec = LoadSpec {
        rate: plan.light_rate,
        duration: plan.light_run,
        ..base_spec.clone()
    };
    results.light_rate = plan.light_rate;
    results.latency_light = latency(&scenarios, &light_spec, plan.rounds).await?;
    results.ratios = ratios(results);

    // Hold, mode none: the agent's own histogram over the fixed-rate runs.
    for rows in [&results.latency, &results.latency_light] {
        if let Some(b) = rows.iter().find(|l| l.key == "b")
            && let (Some(server), Some(load)) = (&b.server, &b.load)
        {
            results.hold.push(Hold {
                datapath: "none".to_owned(),
                available: true,
                note: Some("cache insert and grants only: no maps to write".to_owned()),
                rate: load.rate,
                hold: server.datapath_hold,
                client: Some(load.clone()),
                ..Hold::default()
            });
        }
    }
    let rate = light_spec.rate;
    let ebpf_lab = match (&agent_ebpf, plan.quick) {
        (_, true) => Err("skipped: quick run".to_owned()),
        (None, false) => Err(agent_ebpf_note.unwrap_or_else(|| "not available".to_owned())),
        (Some(lab), false) => Ok(lab),
    };
    match ebpf_lab {
        Err(why) => results.hold.push(Hold {
            datapath: "ebpf".to_owned(),
            note: Some(why),
            rate,
            ..Hold::default()
        }),
        Ok(lab) => {
            eprintln!("warden-bench: datapath hold with the eBPF datapath");
            let spec = LoadSpec {
                check_verdicts: true,
                ..light_spec.clone()
            };
            match hold::ebpf(lab, &spec).await {
                Ok(hold) => results.hold.push(hold),
                Err(error) => {
                    problems.push(format!("eBPF hold: {error:#}"));
                    results.hold.push(Hold {
                        datapath: "ebpf".to_owned(),
                        note: Some(format!("failed: {}", first_line(&error))),
                        rate,
                        ..Hold::default()
                    });
                }
            }
        }
    }

    if plan.profile_s > 0 {
        if profile::available() {
            let mut targets = vec![("warden-agent", agent.pid(), agent_dns)];
            if let Some(dnsdist) = &dnsdist {
                targets.push(("dnsdist", dnsdist.pid(), dnsdist.addr));
            }
            for (name, pid, addr) in targets {
                let Some(pid) = pid else { continue };
                match profile_process(plan, out, name, pid, addr, queries.path(), client).await {
                    Ok(profile) => results.profiles.push(profile),
                    Err(error) => results.notes.push(format!(
                        "perf profile of {name} failed: {}",
                        first_line(&error)
                    )),
                }
            }
        } else {
            results
                .notes
                .push("perf cannot sample here: no profile taken".to_owned());
        }
    }

    if plan.quick {
        return Ok(problems);
    }
    // Restart loss at 5,000 QPS, or less when the agent cannot sustain that comfortably.
    let agent_max = mean("b").unwrap_or(0.0);
    let restart_rate = if agent_max > 0.0 && f64::from(plan.restart_rate) > agent_max * 0.66 {
        let rate = round_down(agent_max * 0.66);
        results.notes.push(format!(
            "Restart loss measured at {rate} QPS: two thirds of the agent's max ({agent_max:.0}), \
             below the {} the issue asks for.",
            plan.restart_rate
        ));
        rate
    } else {
        plan.restart_rate
    };
    let restart_spec = LoadSpec {
        rate: restart_rate,
        warmup: Duration::ZERO,
        duration: plan.restart_run,
        check_verdicts: true,
        // Both processes of a pair hold some of the load (each flow hashes to one socket of
        // the port's four): from one port the signalled process might hold none of it.
        min_sockets: RESTART_SOURCE_PORTS,
        ..base_spec.clone()
    };
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        eprintln!("warden-bench: restart loss, warden-agent alone, {signal}");
        let spec = LoadSpec {
            target: agent_dns,
            ..restart_spec.clone()
        };
        let row = restart(
            &mut agent,
            signal,
            "none (the only server)",
            spec,
            plan.restart_at,
        )
        .await;
        results.restart.push(row.unwrap_or_else(|error| {
            problems.push(format!("restart of the agent ({signal}): {error:#}"));
            failed_restart("warden-agent", signal, "none", &error)
        }));
    }
    for (process, peer) in [
        ("warden-agent", "warden-dnsproxy"),
        ("warden-dnsproxy", "warden-agent"),
    ] {
        for signal in [Signal::SIGTERM, Signal::SIGKILL] {
            let Some(pair) = pair.as_mut() else {
                results.restart.push(Restart {
                    process: process.to_owned(),
                    signal: signal.as_str().to_owned(),
                    peers: peer.to_owned(),
                    note: pair_note.clone(),
                    ..Restart::default()
                });
                continue;
            };
            eprintln!("warden-bench: restart loss, {process} beside {peer}, {signal}");
            let spec = LoadSpec {
                target: pair.dns,
                ..restart_spec.clone()
            };
            let daemon = if process == "warden-agent" {
                &mut pair.agent
            } else {
                &mut pair.dnsproxy
            };
            let row = restart(daemon, signal, peer, spec, plan.restart_at).await;
            if let Ok(Restart {
                served_before_signal: Some(0),
                ..
            }) = &row
            {
                problems.push(format!(
                    "restart of {process} ({signal}): it answered none of the load before its \
                     signal, so its loss says nothing of its shutdown"
                ));
            }
            results.restart.push(row.unwrap_or_else(|error| {
                problems.push(format!("restart of {process} ({signal}): {error:#}"));
                failed_restart(process, signal, peer, &error)
            }));
        }
    }
    drop(pair);
    drop(pair_ebpf);
    drop(agent_ebpf);
    drop(dnsdist);
    drop(agent);
    drop(knot);
    Ok(problems)
}

/// An eBPF lab (with `dnsproxy`, the pair), or why there is none; a lab that failed to start
/// is one of the run's problems.
pub async fn start_ebpf(
    upstream: SocketAddr,
    client: IpAddr,
    dnsproxy: bool,
    problems: &mut Vec<String>,
) -> (Option<EbpfLab>, Option<String>) {
    if let Some(why) = ebpf::unavailable() {
        return (None, Some(format!("skipped: {why}")));
    }
    if dnsproxy && warden_tests::warden::binary("warden-dnsproxy").is_err() {
        return (
            None,
            Some("not available: no warden-dnsproxy binary in the target dir".to_owned()),
        );
    }
    match EbpfLab::start(upstream, client, dnsproxy).await {
        Ok(lab) => (Some(lab), None),
        Err(error) => {
            let what = if dnsproxy {
                "agent + warden-dnsproxy"
            } else {
                "warden-agent"
            };
            problems.push(format!(
                "{what} with the eBPF datapath did not start: {error:#}"
            ));
            (
                None,
                Some(format!("failed to start: {}", first_line(&error))),
            )
        }
    }
}

fn first_line(error: &anyhow::Error) -> String {
    format!("{error:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn round_down(rate: f64) -> u32 {
    let hundreds = (rate / 100.0).floor().max(1.0);
    // Rates here are far below u32::MAX.
    (hundreds as u32) * 100
}

/// The order the scenarios run in within `round`: forward, then backward, and so on, so that
/// a machine drifting over the run (it does: a third round slowest for every scenario) does
/// not always favour the scenarios that come first.
fn in_round_order(round: u32, scenarios: usize) -> Vec<usize> {
    if round.is_multiple_of(2) {
        (0..scenarios).collect()
    } else {
        (0..scenarios).rev().collect()
    }
}

/// Max QPS: dnsperf without a rate limit, rounds interleaved across the scenarios.
async fn throughput(
    plan: &Plan,
    scenarios: &[Scenario],
    queries: &Path,
    client: IpAddr,
) -> Result<Vec<Throughput>> {
    let mut rows: Vec<Throughput> = scenarios
        .iter()
        .map(|s| Throughput {
            key: s.key.to_owned(),
            label: s.label.to_owned(),
            available: s.addr.is_some(),
            note: s.note.clone(),
            ..Throughput::default()
        })
        .collect();
    let mut latency_sum = vec![0.0; scenarios.len()];
    for round in 0..plan.rounds {
        for index in in_round_order(round, scenarios.len()) {
            let scenario = &scenarios[index];
            let Some(addr) = scenario.addr else {
                continue;
            };
            eprintln!(
                "warden-bench: max QPS round {}, ({}) {}",
                round + 1,
                scenario.key,
                scenario.label
            );
            let opts = DnsperfOpts {
                clients: 8,
                source: Some(scenario.source.unwrap_or(client)),
                ..DnsperfOpts::new(queries, plan.throughput_s)
            };
            let report = match &scenario.cgroup {
                Some(cgroup) => dnsperf_in_cgroup(cgroup, addr, &opts).await,
                None => dnsperf_with(addr, &opts).await,
            }
            .with_context(|| format!("dnsperf against ({}) {}", scenario.key, scenario.label))?;
            let row = &mut rows[index];
            row.rounds_qps.push(report.qps);
            row.lost += report.lost;
            row.rcodes = report.rcodes.clone();
            latency_sum[index] += report.avg_latency_s * 1e6;
            // Let the server drain before the next one is measured.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for (row, latency) in rows.iter_mut().zip(latency_sum) {
        if !row.rounds_qps.is_empty() {
            let n = row.rounds_qps.len() as f64;
            row.mean_qps = row.rounds_qps.iter().sum::<f64>() / n;
            row.avg_latency_us_at_max = latency / n;
        }
    }
    Ok(rows)
}

async fn scrape_all(admins: &[SocketAddr]) -> Result<String> {
    let mut text = String::new();
    for admin in admins {
        text.push_str(&warden_tests::warden::http_get(*admin, "/metrics").await?);
        text.push('\n');
    }
    Ok(text)
}

/// Source ports of the restart-loss client (see [`LoadSpec::min_sockets`]): with 16, all of
/// them hashing to one process of a pair is a chance in 32,768.
const RESTART_SOURCE_PORTS: u64 = 16;

/// Queries a process has answered since it started, from its scrape.
fn answered_queries(scrape: &str) -> u64 {
    warden_tests::warden::metric_value(scrape, "warden_dns_queries_total", &[]) as u64
}

const SCOPES: [&str; 4] = ["total", "policy_check", "upstream", "datapath_hold"];

/// Each scope's histogram of what happened between two scrapes.
fn scope_histograms(before: &str, after: &str) -> Vec<Histogram> {
    let name = "warden_dns_processing_seconds";
    SCOPES
        .iter()
        .map(|scope| {
            Histogram::from_scrape(after, name, &[("scope", scope)]).since(&Histogram::from_scrape(
                before,
                name,
                &[("scope", scope)],
            ))
        })
        .collect()
}

fn scopes(histograms: &[Histogram]) -> ServerScopes {
    let summary = |i: usize| {
        histograms
            .get(i)
            .map(Histogram::summary_us)
            .unwrap_or_default()
    };
    ServerScopes {
        total: summary(0),
        policy_check: summary(1),
        upstream: summary(2),
        datapath_hold: summary(3),
        redirect_lookups: RedirectLookups::default(),
    }
}

/// Latency at a fixed rate: `rounds` interleaved rounds (a, b, c, d, a, b, ...) of
/// `base.duration / rounds` each, pooled per scenario, so a noisy moment of the machine does
/// not land on one scenario only.
async fn latency(scenarios: &[Scenario], base: &LoadSpec, rounds: u32) -> Result<Vec<Latency>> {
    let rounds = rounds.max(1);
    let mut rows: Vec<Latency> = scenarios
        .iter()
        .map(|scenario| Latency {
            key: scenario.key.to_owned(),
            label: scenario.label.to_owned(),
            available: scenario.addr.is_some(),
            note: scenario.note.clone(),
            ..Latency::default()
        })
        .collect();
    let mut histograms: Vec<Vec<Histogram>> = vec![Vec::new(); scenarios.len()];
    let mut redirects = vec![RedirectLookups::default(); scenarios.len()];
    for round in 0..rounds {
        for index in in_round_order(round, scenarios.len()) {
            let scenario = &scenarios[index];
            let Some(addr) = scenario.addr else {
                continue;
            };
            eprintln!(
                "warden-bench: latency at {} QPS round {}, ({}) {}",
                base.rate,
                round + 1,
                scenario.key,
                scenario.label
            );
            let policing = !scenario.admins.is_empty();
            let spec = LoadSpec {
                target: addr,
                source: scenario.source.unwrap_or(base.source),
                check_verdicts: policing,
                duration: base.duration / rounds,
                ..base.clone()
            };
            let before = scrape_all(&scenario.admins).await?;
            let cgroup = scenario.cgroup.clone();
            let report = tokio::task::spawn_blocking(move || match cgroup {
                Some(cgroup) => load::run_in_cgroup(&spec, &cgroup),
                None => load::run(&spec),
            })
            .await??;
            if policing {
                let after = scrape_all(&scenario.admins).await?;
                redirects[index].add_run(&before, &after);
                let run = scope_histograms(&before, &after);
                let pooled = &mut histograms[index];
                if pooled.is_empty() {
                    *pooled = run;
                } else {
                    for (sum, more) in pooled.iter_mut().zip(&run) {
                        sum.add(more);
                    }
                }
            }
            let row = &mut rows[index];
            row.rounds_p99_us.push(report.latency.p99_us);
            match row.load.as_mut() {
                Some(pooled) => pooled.merge(report),
                None => row.load = Some(report),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    for ((row, pooled), redirects) in rows.iter_mut().zip(&histograms).zip(redirects) {
        if !pooled.is_empty() {
            row.server = Some(ServerScopes {
                redirect_lookups: redirects,
                ..scopes(pooled)
            });
        }
    }
    Ok(rows)
}

/// A server sampled by perf while dnsperf drives it at full rate.
async fn profile_process(
    plan: &Plan,
    out: &Path,
    name: &str,
    pid: u32,
    dns: SocketAddr,
    queries: &Path,
    client: IpAddr,
) -> Result<report::Profile> {
    eprintln!("warden-bench: profiling {name} for {} s", plan.profile_s);
    // Kept for `perf report -i` afterwards; each run replaces it.
    let scratch = target_dir().join("bench-perf");
    std::fs::create_dir_all(&scratch)?;
    let data = scratch.join(format!("{name}.data"));
    let seconds = plan.profile_s;
    let recording = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || profile::record(pid, seconds, &data))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Inside the recording window, so every query's CPU is sampled.
    let opts = DnsperfOpts {
        clients: 8,
        source: Some(client),
        ..DnsperfOpts::new(queries, seconds.saturating_sub(1).max(1))
    };
    let load = dnsperf_with(dns, &opts).await?;
    recording.await??;
    std::fs::create_dir_all(out)?;
    let mut profile = profile::summarize(&data, &out.join(format!("profile-{name}.txt")))?;
    profile.target = name.to_owned();
    profile.seconds = seconds;
    profile.qps_during = load.qps;
    profile.queries = load.completed;
    profile.cpu_us_per_query = profile.cpu_ms * 1e3 / (load.completed.max(1) as f64);
    Ok(profile)
}

/// One restart under load: signal mid-run, start again at once, count what was lost.
async fn restart(
    daemon: &mut Daemon,
    signal: Signal,
    peers: &str,
    spec: LoadSpec,
    at: Duration,
) -> Result<Restart> {
    let rate = spec.rate;
    let answered_before = answered_queries(&daemon.metrics().await?);
    let running = tokio::task::spawn_blocking(move || load::run(&spec));
    tokio::time::sleep(at).await;
    // Whether the process signalled held any of the load: beside a peer, one holding none
    // loses nothing whatever its shutdown does.
    let served = answered_queries(&daemon.metrics().await?).saturating_sub(answered_before);
    let signalled = Instant::now();
    match signal {
        Signal::SIGKILL => daemon.kill()?,
        _ => {
            // Blocks until the process is gone (it drains first).
            tokio::task::block_in_place(|| daemon.terminate())?;
        }
    }
    let exit_ms = signalled.elapsed().as_secs_f64() * 1e3;
    daemon.spawn()?;
    daemon.wait_ready(Duration::from_secs(20)).await?;
    let back_ms = signalled.elapsed().as_secs_f64() * 1e3;
    let report = running.await??;
    Ok(Restart {
        process: daemon.name.to_owned(),
        signal: signal.as_str().to_owned(),
        peers: peers.to_owned(),
        available: true,
        note: None,
        rate,
        sent: report.sent,
        served_before_signal: Some(served),
        lost: report.lost,
        wrong_verdicts: report.wrong_verdicts,
        exit_ms: Some(exit_ms),
        back_ms: Some(back_ms),
        loss_window_ms: report
            .first_loss_ms
            .zip(report.last_loss_ms)
            .map(|(first, last)| last - first),
    })
}

fn failed_restart(process: &str, signal: Signal, peers: &str, error: &anyhow::Error) -> Restart {
    Restart {
        process: process.to_owned(),
        signal: signal.as_str().to_owned(),
        peers: peers.to_owned(),
        note: Some(format!("failed: {}", first_line(error))),
        ..Restart::default()
    }
}
