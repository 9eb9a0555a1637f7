//! `warden-bench`: the whole benchmark of issue 6 in one run, written to
//! `bench/results/latest.md` and `latest.json` (see docs/benchmarks.md for the method).
//!
//! `warden-bench --smoke` runs every part for a few seconds (no dnsdist needed) so `make test`
//! proves the machinery works; its figures mean nothing and go under `target/bench-smoke/`.
//!
//! Order matters: the in-memory parts (cache, policy) run first, single-threaded, because the
//! counting allocator sees the whole process; the network parts start processes afterwards.

mod alloc;
mod cache;
mod ebpf;
mod hold;
mod lab;
mod load;
mod policy;
mod profile;
mod report;
mod stats;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use warden_tests::lab::dnsperf_in_cgroup;
use warden_tests::{DnsperfOpts, dnsperf_with, run_blocking, tool_path, unique_loopback_v4};

use crate::ebpf::EbpfLab;
use crate::lab::{Daemon, Dnsdist};
use crate::load::{LoadReport, LoadSpec};
use crate::report::{
    Hold, Latency, Machine, Ratios, RedirectLookups, Restart, Results, ServerScopes, Target,
    Throughput,
};
use crate::stats::Histogram;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// How long and how big each part runs.
#[derive(Debug, Clone)]
struct Plan {
    smoke: bool,
    /// Throughput, latency and profiles only: for iterating on the proxy's speed.
    quick: bool,
    rounds: u32,
    throughput_s: u32,
    latency_warmup: Duration,
    latency_run: Duration,
    /// A second fixed rate every scenario sustains with room to spare on a small machine, so
    /// the proxy's own cost shows without queueing.
    light_rate: u32,
    light_run: Duration,
    cache_entries: u32,
    churn_minutes: u32,
    policy_iterations: u32,
    restart_rate: u32,
    restart_run: Duration,
    restart_at: Duration,
    profile_s: u32,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            smoke: false,
            quick: false,
            rounds: 3,
            throughput_s: 10,
            latency_warmup: Duration::from_secs(1),
            latency_run: Duration::from_secs(12),
            light_rate: 5_000,
            light_run: Duration::from_secs(6),
            cache_entries: 1_000_000,
            churn_minutes: 60,
            policy_iterations: 200_000,
            restart_rate: 5_000,
            restart_run: Duration::from_secs(7),
            restart_at: Duration::from_secs(2),
            profile_s: 10,
        }
    }

    fn quick() -> Plan {
        Plan {
            quick: true,
            rounds: 2,
            ..Plan::full()
        }
    }

    fn smoke() -> Plan {
        Plan {
            smoke: true,
            quick: false,
            rounds: 1,
            throughput_s: 1,
            latency_warmup: Duration::from_millis(300),
            latency_run: Duration::from_secs(1),
            light_rate: 500,
            light_run: Duration::from_millis(500),
            cache_entries: 100_000,
            churn_minutes: 3,
            policy_iterations: 5_000,
            restart_rate: 500,
            restart_run: Duration::from_secs(2),
            restart_at: Duration::from_millis(700),
            profile_s: 0,
        }
    }
}

const USAGE: &str = "usage: warden-bench [--smoke | --quick] [--out DIR] [--no-profile]
       warden-bench --load SERVER:PORT RATE SECONDS [SOURCE_IP]
       warden-bench --lab SECONDS

Runs Warden's benchmark (docs/benchmarks.md) and writes DIR/latest.md and DIR/latest.json
(default: bench/results, or target/bench-smoke with --smoke). Use release binaries: make bench.
--quick runs only throughput, latency and profiles, 2 rounds, into target/bench-quick: for
iterating on the proxy's speed.
--load runs only the open-loop client (the bench's query mix, A queries) and prints its report.
--load-child is the bench's own: that client as a child process, which (g) starts in a cgroup.
--lab starts knotd, the agent, dnsdist, the agent + warden-dnsproxy pair and (as root) both again
with the eBPF datapath, as the bench does, prints their addresses, PIDs, the eBPF labs' workload
cgroups (a client started inside one and asking knotd is redirected, as in (g)) and a dnsperf
query file, and keeps them up for SECONDS (or until SIGTERM or SIGINT): for profiling by hand.";

/// `--load`: the fixed-rate client alone, against any server.
fn load_only(args: &[String]) -> Result<()> {
    let [target, rate, seconds, rest @ ..] = args else {
        bail!("--load needs SERVER:PORT RATE SECONDS [SOURCE_IP]");
    };
    let target: SocketAddr = target.parse().context("SERVER:PORT")?;
    let source: IpAddr = match rest.first() {
        Some(ip) => ip.parse().context("SOURCE_IP")?,
        None if target.is_ipv4() => [127, 0, 0, 1].into(),
        None => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    let spec = LoadSpec {
        target,
        source,
        rate: rate.parse().context("RATE")?,
        warmup: Duration::from_millis(500),
        duration: Duration::from_secs_f64(seconds.parse().context("SECONDS")?),
        timeout: load::DEFAULT_TIMEOUT,
        queries: lab::templates()?,
        check_verdicts: false,
    };
    let report = load::run(&spec)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The runtime the network parts and `--lab` start their processes from.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// `--lab`: the bench's servers, up for a while, for `perf` and `dnsperf` by hand.
fn lab_only(seconds: &str) -> Result<()> {
    let seconds: u64 = seconds.parse().context("--lab needs SECONDS")?;
    runtime()?.block_on(async {
        let client = unique_loopback_v4();
        let knot = lab::start_knot(unique_loopback_v4())?;
        let upstream = knot.addr();
        let queries = lab::dnsperf_queries()?;
        let (dir, config) =
            lab::agent_setup(lab::addr_on(unique_loopback_v4())?, upstream, client)?;
        let agent = Daemon::agent(&dir, &config).await?;
        let dnsdist = Dnsdist::start(unique_loopback_v4(), upstream, client).await?;
        let pair = start_pair(upstream, client).await?;
        let mut problems = Vec::new();
        let (agent_ebpf, agent_ebpf_note) = start_ebpf(upstream, client, false, &mut problems).await;
        let (pair_ebpf, pair_ebpf_note) = start_ebpf(upstream, client, true, &mut problems).await;
        for problem in problems {
            eprintln!("warden-bench: {problem}");
        }
        println!("client address  {client}");
        println!("queries         {}", queries.path().display());
        println!("knotd           {upstream}");
        let agent_pid = agent.pid().unwrap_or_default();
        println!(
            "warden-agent    {} pid {agent_pid} admin {}",
            config.dns.listen[0], agent.admin
        );
        let dnsdist_pid = dnsdist.pid().unwrap_or_default();
        println!("dnsdist         {} pid {dnsdist_pid}", dnsdist.addr);
        if let Some(pair) = &pair {
            let (agent_pid, proxy_pid) = (
                pair.agent.pid().unwrap_or_default(),
                pair.dnsproxy.pid().unwrap_or_default(),
            );
            println!(
                "pair            {} agent pid {agent_pid} admin {}, warden-dnsproxy pid {proxy_pid} admin {}",
                pair.dns, pair.agent.admin, pair.dnsproxy.admin
            );
        }
        for (name, lab, note) in [
            ("agent ebpf", &agent_ebpf, agent_ebpf_note),
            ("pair ebpf", &pair_ebpf, pair_ebpf_note),
        ] {
            match lab {
                Some(lab) => {
                    let pid = |daemon: Option<&Daemon>| {
                        daemon.and_then(Daemon::pid).unwrap_or_default()
                    };
                    println!(
                        "{name:<16}{} agent pid {} admin {}, warden-dnsproxy pid {}, workload cgroup {}",
                        lab.dns,
                        pid(Some(&lab.agent)),
                        lab.agent.admin,
                        pid(lab.dnsproxy.as_ref()),
                        lab.workload.display()
                    );
                }
                None => println!("{name:<16}{}", note.unwrap_or_default()),
            }
        }
        println!("up for {seconds} s (or until SIGTERM or SIGINT)");
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        drop((pair_ebpf, agent_ebpf, pair, agent, dnsdist, dir, knot, queries));
        Ok(())
    })
}

fn main() -> ExitCode {
    // As the agent and warden-dnsproxy do, so that part 3 times the cache as they run it.
    warden_proxy::allocator::merge_freed_blocks_at_once();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let mut plan = Plan::full();
    let mut out = None;
    let mut profile = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => plan = Plan::smoke(),
            "--quick" => plan = Plan::quick(),
            "--out" => out = args.next().map(PathBuf::from),
            "--no-profile" => profile = false,
            "--load" => {
                let rest: Vec<String> = args.by_ref().collect();
                return match load_only(&rest) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("warden-bench: {error:#}");
                        ExitCode::FAILURE
                    }
                };
            }
            load::CHILD_FLAG => {
                let rest: Vec<String> = args.by_ref().collect();
                return match load::child_main(&rest) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("warden-bench: {error:#}");
                        ExitCode::FAILURE
                    }
                };
            }
            "--lab" => {
                let seconds = args.next().unwrap_or_default();
                return match lab_only(&seconds) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("warden-bench: {error:#}");
                        ExitCode::FAILURE
                    }
                };
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("warden-bench: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if !profile {
        plan.profile_s = 0;
    }
    let out = out.unwrap_or_else(|| default_out(&plan));
    match run(&plan, &out) {
        Ok(problems) if problems.is_empty() => ExitCode::SUCCESS,
        Ok(problems) => {
            for problem in problems {
                eprintln!("warden-bench: {problem}");
            }
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("warden-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `bench/results` for the real run; partial runs' figures are not worth keeping there.
fn default_out(plan: &Plan) -> PathBuf {
    if plan.smoke {
        target_dir().join("bench-smoke")
    } else if plan.quick {
        target_dir().join("bench-quick")
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
    }
}

/// Cargo's target folder (this binary is in `target/<profile>/`): for scratch files kept for
/// a look afterwards.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(std::env::temp_dir)
}

/// Everything; returns the problems that make the run a failure (the results are written
/// anyway).
fn run(plan: &Plan, out: &Path) -> Result<Vec<String>> {
    let started = Instant::now();
    let mut results = Results {
        mode: if plan.smoke { "smoke" } else { "full" }.to_owned(),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        throughput_seconds: plan.throughput_s,
        ..Results::default()
    };
    if plan.smoke {
        results
            .notes
            .push("Smoke run: every part for a few seconds; the figures mean nothing.".to_owned());
    }
    if cfg!(debug_assertions) {
        results.notes.push(
            "Debug build of warden-bench (and, next to it, of the agent): use make bench for figures."
                .to_owned(),
        );
    }

    if plan.quick {
        results
            .notes
            .push("Quick run: throughput, latency and profiles only.".to_owned());
    } else {
        eprintln!("warden-bench: cache cost at {} entries", plan.cache_entries);
        let mut cost = cache::measure(plan.cache_entries);
        cache::shared_ip_sweep(&mut cost, plan.cache_entries / 10);
        cache::mass_expiry(&mut cost, plan.cache_entries, 80);
        results.cache = Some(cost);
        eprintln!(
            "warden-bench: churn, {} simulated minutes",
            plan.churn_minutes
        );
        results.churn = Some(cache::churn(plan.churn_minutes, 10_000, 5));
        eprintln!("warden-bench: policy check cost");
        results.policy = policy::measure(&[10, 1_000, 10_000], plan.policy_iterations)?;
    }

    let runtime = runtime()?;
    let mut problems = runtime.block_on(network(plan, out, &mut results))?;
    drop(runtime);

    results.machine.loadavg_end = read_trimmed("/proc/loadavg");
    results.wall_seconds = started.elapsed().as_secs_f64();
    results.targets = targets(&results);
    if plan.smoke {
        // Debug binaries and a second per part: nothing to judge.
        for target in &mut results.targets {
            target.met = None;
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let markdown = results.markdown();
    std::fs::write(out.join("latest.md"), &markdown)?;
    std::fs::write(
        out.join("latest.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("{markdown}");
    eprintln!(
        "warden-bench: wrote {}/latest.md and latest.json",
        out.display()
    );
    problems.extend(sanity(&results));
    Ok(problems)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let mut tools = std::collections::BTreeMap::new();
    for (tool, args, needle) in [
        ("dnsperf", &["-h"][..], "Version"),
        ("dnsdist", &["--version"][..], "dnsdist"),
        ("knotd", &["-V"][..], "knotd"),
    ] {
        if let Some(version) = tool_version(tool, args, needle) {
            tools.insert(tool.to_owned(), version);
        }
    }
    Machine {
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        cpu,
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        loadavg_start: read_trimmed("/proc/loadavg"),
        loadavg_end: String::new(),
        tools,
    }
}

/// The version word of the first line containing `needle` in a tool's output.
fn tool_version(tool: &str, args: &[&str], needle: &str) -> Option<String> {
    let path = tool_path(tool)?;
    let out = run_blocking(Command::new(path).args(args), Duration::from_secs(10)).ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text.lines().find(|l| l.contains(needle))?;
    line.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_owned)
}

/// One way of reaching knotd.
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
struct Pair {
    agent: Daemon,
    dnsproxy: Daemon,
    dns: SocketAddr,
    // Last: the processes go before their folder.
    _dir: warden_tests::warden::AgentDir,
}

async fn start_pair(upstream: SocketAddr, client: IpAddr) -> Result<Option<Pair>> {
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
async fn network(plan: &Plan, out: &Path, results: &mut Results) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let client = unique_loopback_v4();
    let knot = lab::start_knot(unique_loopback_v4())?;
    let upstream = knot.addr();
    let queries = lab::dnsperf_queries()?;
    let templates = lab::templates()?;
    eprintln!("warden-bench: knotd on {upstream}, client address {client}");

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
async fn start_ebpf(
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
        for (index, scenario) in scenarios.iter().enumerate() {
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
        for (index, scenario) in scenarios.iter().enumerate() {
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

fn ratios(results: &Results) -> Ratios {
    let qps = |key: &str| {
        results
            .throughput
            .iter()
            .find(|t| t.key == key && t.available && t.mean_qps > 0.0)
            .map(|t| t.mean_qps)
    };
    let load = |rows: &'_ [Latency], key: &str| -> Option<LoadReport> {
        rows.iter()
            .find(|l| l.key == key)
            .and_then(|l| l.load.clone())
    };
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let rounds = |key: &str| {
        results
            .throughput
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.rounds_qps.clone())
            .unwrap_or_default()
    };
    let per_round = |a: &str, b: &str| each_round(&rounds(a), &rounds(b), |x, y| x / y);
    let at = |rows: &[Latency], key: &str, pick: fn(&LoadReport) -> f64| {
        Some(pick(&load(rows, key)?) - pick(&load(rows, "a")?))
    };
    let added = |key: &str, pick: fn(&LoadReport) -> f64| at(&results.latency, key, pick);
    let rounds_p99 = |key: &str| {
        results
            .latency
            .iter()
            .find(|l| l.key == key)
            .map(|l| l.rounds_p99_us.clone())
            .unwrap_or_default()
    };
    let added_per_round =
        |key: &str| each_round(&rounds_p99(key), &rounds_p99("a"), |x, direct| x - direct);
    let light = |key: &str, pick: fn(&LoadReport) -> f64| at(&results.latency_light, key, pick);
    Ratios {
        agent_over_dnsdist_qps: ratio(qps("b"), qps("d")),
        agent_over_dnsdist_per_round: per_round("b", "d"),
        agent_over_direct_per_round: per_round("b", "a"),
        agent_over_direct_qps: ratio(qps("b"), qps("a")),
        pair_over_dnsdist_qps: ratio(qps("c"), qps("d")),
        dnsdist_over_direct_qps: ratio(qps("d"), qps("a")),
        agent_added_p99_us: added("b", |l| l.latency.p99_us),
        agent_added_p50_us: added("b", |l| l.latency.p50_us),
        dnsdist_added_p99_us: added("d", |l| l.latency.p99_us),
        dnsdist_added_p50_us: added("d", |l| l.latency.p50_us),
        pair_added_p99_us: added("c", |l| l.latency.p99_us),
        agent_added_p99_at_arrival_us: added("b", |l| l.latency_at_arrival.p99_us),
        dnsdist_added_p99_at_arrival_us: added("d", |l| l.latency_at_arrival.p99_us),
        agent_added_p99_us_per_round: added_per_round("b"),
        dnsdist_added_p99_us_per_round: added_per_round("d"),
        agent_added_p50_us_light: light("b", |l| l.latency.p50_us),
        agent_added_p99_us_light: light("b", |l| l.latency.p99_us),
        dnsdist_added_p50_us_light: light("d", |l| l.latency.p50_us),
        dnsdist_added_p99_us_light: light("d", |l| l.latency.p99_us),
        pair_added_p99_us_light: light("c", |l| l.latency.p99_us),
        agent_ebpf_over_dnsdist_qps: ratio(qps("e"), qps("d")),
        pair_ebpf_over_dnsdist_qps: ratio(qps("f"), qps("d")),
        agent_ebpf_added_p99_us: added("e", |l| l.latency.p99_us),
        pair_ebpf_added_p99_us: added("f", |l| l.latency.p99_us),
        agent_ebpf_added_p99_us_light: light("e", |l| l.latency.p99_us),
        pair_ebpf_added_p99_us_light: light("f", |l| l.latency.p99_us),
        redirected_over_dnsdist_qps: ratio(qps("g"), qps("d")),
        redirected_over_agent_ebpf_qps: ratio(qps("g"), qps("e")),
        redirected_added_p99_us: added("g", |l| l.latency.p99_us),
        redirected_added_p99_us_light: light("g", |l| l.latency.p99_us),
    }
}

/// `op` of two scenarios' figures round by round (rounds are interleaved, so round `i` of one
/// ran next to round `i` of the other).
fn each_round(a: &[f64], b: &[f64], op: fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| op(*x, *y)).collect()
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
    let running = tokio::task::spawn_blocking(move || load::run(&spec));
    tokio::time::sleep(at).await;
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

/// The targets against what was measured.
fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let ratio = r.ratios.agent_over_dnsdist_qps;
    out.push(Target {
        what: "(b) agent max QPS vs (d) dnsdist".to_owned(),
        bar: "≥ 1.0×".to_owned(),
        measured: ratio.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}×")),
        met: ratio.map(|v| v >= 1.0),
    });
    let light = r.ratios.agent_added_p99_us_light;
    let added = r.ratios.agent_added_p99_us;
    out.push(Target {
        what: format!("(b) added p99 latency vs direct at {} QPS", r.latency_rate),
        bar: "≤ 200 µs".to_owned(),
        measured: added.map_or_else(
            || "–".to_owned(),
            |v| {
                format!(
                    "{v:+.0} µs (per round {})",
                    report::signed_list(&r.ratios.agent_added_p99_us_per_round)
                )
            },
        ),
        met: added.map(|v| v <= 200.0),
    });
    out.push(Target {
        what: format!(
            "(b) added p99 latency vs direct at {} QPS (below every scenario's max: the proxy's own cost)",
            r.light_rate
        ),
        bar: "≤ 200 µs".to_owned(),
        measured: light.map_or_else(|| "–".to_owned(), |v| format!("{v:+.0} µs")),
        met: light.map(|v| v <= 200.0),
    });
    let at_10k = r.policy.iter().find(|p| p.selectors == 10_000);
    out.push(Target {
        what: "policy check at 10,000 selectors (worst of matcher / dns_allowed, hit / miss)"
            .to_owned(),
        bar: "≤ 1 µs".to_owned(),
        measured: at_10k.map_or_else(
            || "–".to_owned(),
            |p| format!("{:.0} ns", p.worst_check_ns()),
        ),
        met: at_10k.map(|p| p.worst_check_ns() <= 1_000.0),
    });
    if let Some(c) = &r.cache {
        out.push(Target {
            what: format!("bytes per cached (name, IP) at {} entries", c.entries),
            bar: "≤ 250 at 1,000,000".to_owned(),
            measured: format!("{:.0}", c.bytes_per_entry),
            met: (c.entries >= 1_000_000).then_some(c.bytes_per_entry <= 250.0),
        });
    }
    if let Some(c) = &r.churn {
        out.push(Target {
            what: format!(
                "memory after {} min of churn vs the steady live set",
                c.simulated_minutes
            ),
            bar: "within 10% (after 60 min)".to_owned(),
            measured: format!("{:.2}×", c.end_over_steady),
            met: (c.simulated_minutes >= 60).then_some(c.end_over_steady <= 1.10),
        });
    }
    let hold = r
        .hold
        .iter()
        .find(|h| h.datapath == "ebpf" && h.available)
        .or_else(|| r.hold.iter().find(|h| h.available));
    out.push(Target {
        what: format!(
            "datapath hold p99 ({})",
            hold.map_or("–", |h| h.datapath.as_str())
        ),
        bar: "≤ 100 µs".to_owned(),
        measured: hold.map_or_else(|| "–".to_owned(), |h| format!("{} µs", h.hold.show(true))),
        met: hold.and_then(|h| h.hold.p99_us).map(|v| v <= 100.0),
    });
    let pair_sigterm: Vec<&Restart> = r
        .restart
        .iter()
        .filter(|x| x.available && x.signal == "SIGTERM" && !x.peers.starts_with("none"))
        .collect();
    let alone = r
        .restart
        .iter()
        .find(|x| x.available && x.signal == "SIGTERM" && x.peers.starts_with("none"));
    let (measured, met) = if pair_sigterm.is_empty() {
        (
            alone.map_or_else(
                || "–".to_owned(),
                |a| {
                    format!(
                        "agent alone on the port: {} lost; with warden-dnsproxy: not available yet",
                        a.lost
                    )
                },
            ),
            None,
        )
    } else {
        let lost: Vec<String> = pair_sigterm
            .iter()
            .map(|x| format!("{}: {}", x.process, x.lost))
            .collect();
        (
            lost.join(", "),
            Some(pair_sigterm.iter().all(|x| x.lost == 0)),
        )
    };
    out.push(Target {
        what: "queries lost per SIGTERM restart (agent and dnsproxy sharing the port)".to_owned(),
        bar: "0".to_owned(),
        measured,
        met,
    });
    out
}

/// What makes the run itself a failure, whatever the figures: nothing answered, or a wrong
/// verdict (a denied name answered or an allowed one refused).
fn sanity(r: &Results) -> Vec<String> {
    let mut problems = Vec::new();
    for t in r.throughput.iter().filter(|t| t.available) {
        if t.mean_qps <= 0.0 {
            problems.push(format!("({}) {}: no queries answered", t.key, t.label));
        }
    }
    for l in r.latency.iter().chain(&r.latency_light) {
        if let Some(load) = &l.load {
            if load.answered == 0 {
                problems.push(format!(
                    "({}) {}: nothing answered at the fixed rate",
                    l.key, l.label
                ));
            }
            if load.wrong_verdicts > 0 {
                problems.push(format!(
                    "({}) {}: {} wrong verdicts",
                    l.key, l.label, load.wrong_verdicts
                ));
            }
        }
    }
    // A redirected client whose records the proxy never found was not redirected, or was
    // served without its redirect record: either way (g) measured something else. (The
    // fixed-rate rounds are checked, where the agent's counters are scraped around each.)
    for l in r.latency.iter().chain(&r.latency_light) {
        if l.key == "g"
            && let Some(load) = &l.load
        {
            let lookups = l
                .server
                .as_ref()
                .map(|s| s.redirect_lookups)
                .unwrap_or_default();
            let expected = lookups.total().max(load.answered as f64);
            if expected == 0.0 || lookups.found < expected * 0.99 {
                problems.push(format!(
                    "({}) {}: {:.0} redirect records found for {:.0} lookups and {} answers",
                    l.key,
                    l.label,
                    lookups.found,
                    lookups.total(),
                    load.answered
                ));
            }
        }
    }
    for x in r
        .restart
        .iter()
        .filter(|x| x.available && x.wrong_verdicts > 0)
    {
        problems.push(format!(
            "restart of {} ({}): {} wrong verdicts",
            x.process, x.signal, x.wrong_verdicts
        ));
    }
    problems
}
