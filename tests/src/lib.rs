//! Support for Warden's end-to-end tests: a real authoritative DNS server (`knotd`) on a
//! loopback address serving the lab zones, real clients (`dig`, `kdig`, `dnsperf`) run with
//! hard timeouts and parsed, and small guards so every process and file a test creates is
//! gone when the test ends, pass or fail. Only [`warden`] knows about Warden itself: it starts
//! the agent in-process or as its binary and runs the `warden` CLI; the rest serves tests of
//! the in-process proxy, of the binaries, and of the support itself alike. [`lab`] adds the
//! network: a namespace of "internet" hosts behind a veth, cgroups of our own, commands run
//! inside them. Traffic only ever goes to loopback and to the lab's own namespace.

mod clients;
pub mod firewall;
pub mod lab;
mod net;
mod probe;
mod process;
mod upstream;
pub mod warden;
pub mod zones;

use std::path::PathBuf;
use std::sync::Once;

pub use clients::{
    DigOpts, DnsReply, DnsperfOpts, DnsperfReport, NoReply, Record, dig, dnsperf, dnsperf_with,
    kdig, kdig_tcp_multi, parse_dnsperf, parse_replies, write_queries_file,
};
pub use net::{free_port, unique_loopback_v4};
pub use process::{ProcessGuard, run_blocking};
pub use upstream::KnotUpstream;
pub use zones::{Zone, ZoneRecord, lab_zones};

/// Where daemons like knotd live; not on a non-root user's PATH on Debian.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

/// True when running as root; otherwise prints why the calling test is skipped.
pub fn require_root() -> bool {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        return true;
    }
    eprintln!(
        "skipping {}: needs root (running as uid {euid})",
        test_name()
    );
    false
}

/// True when every tool in `tools` is installed; otherwise prints which are missing and
/// how to get them, so the calling test can return early.
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| tool_path(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "skipping {}: missing tool(s) {} (install with scripts/setup.sh)",
        test_name(),
        missing.join(", ")
    );
    false
}

/// Full path of an executable found on `PATH` or in the sbin directories.
pub fn tool_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The test harness names each test's thread after the test.
fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_owned()
}

/// Installs a tracing subscriber once per process: `RUST_LOG` if set, else `warn`; output
/// goes through the test harness's capture so it shows only for failing tests.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        // Another subscriber may already be set (a test installing its own); keep it.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
