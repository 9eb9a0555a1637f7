//! `warden-agent --config FILE`: the node agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use warden_config::ConfigOverrides;

#[derive(Debug, Parser)]
#[command(
    name = "warden-agent",
    version,
    about = "Warden node agent with embedded DNS proxy"
)]
struct Args {
    /// YAML config file; every field can also be set by the flags below.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: ConfigOverrides,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Detach every eBPF program and remove every pin under `datapath.bpffs`, then exit.
    /// Enforcement stops: workloads' egress is no longer policed.
    Cleanup,
}

fn main() -> ExitCode {
    // Before any thread exists; see the module's doc for why.
    let allocator_tuned = warden_proxy::allocator::merge_freed_blocks_at_once();
    warden_telemetry::process::init_tracing();
    tracing::debug!(allocator_tuned, "glibc fastbins off");
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => warden_config::load_with(path, &args.overrides),
        None => {
            let mut config = warden_config::AgentConfig::default();
            args.overrides.apply(&mut config);
            config.validate().map(|()| config)
        }
    };
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            eprintln!("warden-agent: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Cleanup) = args.command {
        return cleanup(&config);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("warden-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The signals are caught before anything starts (see shutdown_signal).
    match runtime.block_on(async {
        let stop = warden_telemetry::process::shutdown_signal();
        warden_agent::run(config, stop).await
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("warden-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn cleanup(config: &warden_config::AgentConfig) -> ExitCode {
    let options = warden_datapath::DatapathOptions {
        cgroup_root: config.datapath.cgroup_root.clone(),
        bpffs: config.datapath.bpffs.clone(),
    };
    match warden_datapath::Datapath::cleanup(&options) {
        Ok(report) => {
            println!(
                "detached {} programs, removed {} pins from {}{}",
                report.links_detached.len(),
                report.pins_removed.len(),
                options.bpffs.display(),
                if report.dir_removed {
                    " (folder removed)"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("warden-agent cleanup: {error}");
            ExitCode::FAILURE
        }
    }
}
