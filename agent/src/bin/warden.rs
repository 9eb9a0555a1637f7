//! `warden`: the operator's CLI.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = warden_agent::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("warden: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(warden_agent::cli::run(cli))
}
