//! `warden-dnsproxy --config FILE`: the standalone DNS proxy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use warden_config::ProxyOverrides;

#[derive(Debug, Parser)]
#[command(
    name = "warden-dnsproxy",
    version,
    about = "Warden's standalone DNS proxy"
)]
struct Args {
    /// YAML config file; every field can also be set by the flags below.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: ProxyOverrides,
}

fn main() -> ExitCode {
    // Before any thread exists; see the module's doc for why.
    let allocator_tuned = warden_proxy::allocator::merge_freed_blocks_at_once();
    warden_telemetry::process::init_tracing();
    tracing::debug!(allocator_tuned, "glibc fastbins off");
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => warden_config::load_proxy(path, &args.overrides),
        None => {
            let mut config = warden_config::ProxyConfig::default();
            args.overrides.apply(&mut config);
            config.validate().map(|()| config)
        }
    };
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            eprintln!("warden-dnsproxy: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("warden-dnsproxy: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The signals are caught before anything starts (see shutdown_signal).
    match runtime.block_on(async {
        let stop = warden_telemetry::process::shutdown_signal();
        warden_dnsproxy::run(config, stop).await
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("warden-dnsproxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}
