//! Where the agent's time goes at its maximum rate: `perf record` with the `cpu-clock`
//! software event (hardware counters are often missing in VMs) on the agent's PID while
//! dnsperf drives it, then `perf report` by object and by symbol.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use warden_tests::{run_blocking, tool_path};

use crate::report::Profile;

/// Whether `perf` can sample here.
pub fn available() -> bool {
    let Some(perf) = tool_path("perf") else {
        return false;
    };
    run_blocking(
        Command::new(perf).args(["stat", "-e", "cpu-clock", "true"]),
        Duration::from_secs(10),
    )
    .is_ok_and(|out| out.status.success())
}

/// Samples `pid` for `seconds` into `data`; blocking (run it beside the load).
pub fn record(pid: u32, seconds: u32, data: &Path) -> Result<()> {
    let perf = tool_path("perf").context("perf not found")?;
    let out = run_blocking(
        Command::new(perf)
            .args([
                "record",
                // Kernel call chains say who takes the locks and switches tasks.
                "-g",
                "-e",
                "cpu-clock",
                "-F",
                "999",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(data)
            .args(["--", "sleep", &seconds.to_string()]),
        Duration::from_secs(u64::from(seconds) + 30),
    )?;
    if !out.status.success() {
        bail!(
            "perf record failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Reads `data` back: shares by object and the hottest symbols; the whole symbol report goes
/// to `text_out`.
pub fn summarize(data: &Path, text_out: &Path) -> Result<Profile> {
    let perf = tool_path("perf").context("perf not found")?;
    let report = |sort: &str| -> Result<String> {
        let out = run_blocking(
            Command::new(&perf)
                .args(["report", "--stdio", "--no-children", "-g", "none"])
                .args(["--sort", sort, "-i"])
                .arg(data),
            Duration::from_secs(120),
        )?;
        if !out.status.success() {
            bail!(
                "perf report failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let by_dso_text = report("dso")?;
    let by_symbol_text = report("dso,sym")?;
    // Who calls the hottest symbols (kernel stacks are complete; user stacks are not, the
    // release build has no frame pointers).
    let callers = run_blocking(
        Command::new(&perf)
            .args(["report", "--stdio", "--no-children", "--sort", "sym"])
            .args([
                "--percent-limit",
                "3",
                "-g",
                "caller,0.5,callee,function,percent",
                "-i",
            ])
            .arg(data),
        Duration::from_secs(120),
    )
    .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    .unwrap_or_default();
    std::fs::write(
        text_out,
        format!("{by_dso_text}\n{by_symbol_text}\n# Callers of the hottest symbols\n{callers}"),
    )?;

    let by_dso = by_dso_text
        .lines()
        .filter_map(|line| {
            let (share, rest) = share_of(line)?;
            Some((share, rest.trim().to_owned()))
        })
        .collect();
    let top_symbols = by_symbol_text
        .lines()
        .filter_map(|line| {
            let (share, rest) = share_of(line)?;
            // "warden-agent  [.] symbol" or "[kernel.kallsyms]  [k] symbol"
            let rest = rest.trim();
            let (dso, symbol) = rest.split_once(char::is_whitespace)?;
            let symbol = symbol.trim();
            let symbol = symbol
                .strip_prefix("[.]")
                .or_else(|| symbol.strip_prefix("[k]"))
                .unwrap_or(symbol)
                .trim();
            Some((share, dso.to_owned(), symbol.to_owned()))
        })
        .take(40)
        .collect();
    // "# Event count (approx.): 8442442434": cpu-clock counts nanoseconds.
    let cpu_ns = by_dso_text
        .lines()
        .find_map(|line| line.strip_prefix("# Event count (approx.):"))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok(Profile {
        cpu_ms: cpu_ns / 1e6,
        by_dso,
        top_symbols,
        // Named relative to the results, which sit beside it.
        file: text_out
            .file_name()
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned()),
        ..Profile::default()
    })
}

/// `  12.34%  rest` → (12.34, "rest").
fn share_of(line: &str) -> Option<(f64, &str)> {
    let line = line.trim_start();
    if line.starts_with('#') {
        return None;
    }
    let (share, rest) = line.split_once('%')?;
    Some((share.trim().parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn report_lines_parse() {
        assert_eq!(
            share_of("    12.34%  warden-agent  [.] tokio::runtime::park"),
            Some((12.34, "  warden-agent  [.] tokio::runtime::park"))
        );
        assert_eq!(share_of("# Overhead  Shared Object"), None);
        assert_eq!(share_of(""), None);
    }
}
