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
mod network;
mod policy;
mod profile;
mod report;
mod stats;
mod verdict;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use warden_tests::{run_blocking, tool_path, unique_loopback_v4};

use crate::lab::{Daemon, Dnsdist};
use crate::load::LoadSpec;
use crate::network::{network, start_ebpf, start_pair};
use crate::report::{Machine, Results};
use crate::verdict::{sanity, targets};

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
        min_sockets: 1,
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
