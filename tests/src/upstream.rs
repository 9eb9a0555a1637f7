//! A real authoritative server (`knotd`) on loopback serving the lab zones: the "internet"
//! DNS that Warden's proxy forwards to.

use std::fmt;
use std::fs::{self, File};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::net::free_port;
use crate::probe::soa_serial;
use crate::process::{ProcessGuard, run_blocking};
use crate::tool_path;
use crate::zones::{Zone, addr_values, find_zone_mut, lab_zones};

const START_TIMEOUT: Duration = Duration::from_secs(10);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// Attempts at finding a port knotd can bind; another process may take ours in between.
const BIND_ATTEMPTS: usize = 5;
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A running `knotd` serving [`lab_zones`] (or given zones) on one loopback address and port,
/// UDP and TCP. Dropping it stops knotd (SIGTERM, SIGKILL after 2 s) and removes its files.
///
/// The API is sync so plain `#[test]`s can use it; it only ever talks to knotd, never to the
/// code under test, so calling it from inside a tokio test cannot deadlock.
pub struct KnotUpstream {
    // Declared before `dir`: fields drop in order, and knotd must be gone before its
    // directory is removed.
    knotd: ProcessGuard,
    addr: SocketAddr,
    zones: Vec<Zone>,
    /// What knotd last confirmed serving; a failed reload falls back to it.
    served: Vec<Zone>,
    dir: TempDir,
}

impl fmt::Debug for KnotUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KnotUpstream")
            .field("addr", &self.addr)
            .field("pid", &self.knotd.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl KnotUpstream {
    /// Starts knotd on a free port of `ip` serving the lab zones and waits until every zone
    /// answers. `ip` must be a local address: any 127/8 address, or `::1`.
    pub fn start(ip: IpAddr) -> Result<Self> {
        Self::start_with_zones(ip, lab_zones())
    }

    /// Starts knotd on exactly `addr` (port 53 of a unique loopback address, say: the datapath
    /// only redirects queries to port 53).
    pub fn start_on(addr: SocketAddr) -> Result<Self> {
        Self::launch(addr.ip(), Some(addr.port()), lab_zones())
    }

    /// Like [`Self::start`] with other zone data.
    pub fn start_with_zones(ip: IpAddr, zones: Vec<Zone>) -> Result<Self> {
        Self::launch(ip, None, zones)
    }

    /// Like [`Self::start_on`] with other zone data.
    pub fn start_on_with_zones(addr: SocketAddr, zones: Vec<Zone>) -> Result<Self> {
        Self::launch(addr.ip(), Some(addr.port()), zones)
    }

    fn launch(ip: IpAddr, fixed_port: Option<u16>, mut zones: Vec<Zone>) -> Result<Self> {
        let knotd = tool_path("knotd").context("knotd not found (Debian package `knot`)")?;
        let mut dir = tempfile::Builder::new()
            .prefix("warden-knot-")
            .tempdir()
            .context("creating knotd directory")?;
        let socket = dir.path().join("knot.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "knotd control socket path {} is too long for a Unix socket; set TMPDIR shorter",
                socket.display()
            );
        }
        for zone in &zones {
            write_zone(dir.path(), zone)?;
        }

        let mut last_err = None;
        let attempts = if fixed_port.is_some() {
            1
        } else {
            BIND_ATTEMPTS
        };
        for attempt in 1..=attempts {
            let port = match fixed_port {
                Some(port) => port,
                None => free_port(ip).with_context(|| format!("finding a free port on {ip}"))?,
            };
            let addr = SocketAddr::new(ip, port);
            let conf = dir.path().join("knot.conf");
            // A stale log would make a later, unrelated failure look like a lost bind race.
            let _ = fs::remove_file(dir.path().join("knot.log"));
            fs::write(&conf, knot_conf(dir.path(), addr, &zones)).context("writing knot.conf")?;
            let out = File::create(dir.path().join("knotd.out")).context("creating knotd.out")?;
            let err = out.try_clone().context("cloning knotd.out")?;
            let guard = ProcessGuard::spawn(
                Command::new(&knotd)
                    .arg("-c")
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err),
                "knotd",
            )?;
            // Built before it is ready so that any failure below still stops knotd.
            let mut up = Self {
                knotd: guard,
                addr,
                served: zones.clone(),
                zones,
                dir,
            };
            match up.wait_ready() {
                Ok(()) => {
                    tracing::info!(%addr, pid = up.knotd.pid(), "knotd ready");
                    return Ok(up);
                }
                Err(e) if up.lost_bind_race() && attempt < attempts => {
                    tracing::debug!(%addr, "knotd could not bind, retrying: {e:#}");
                    let Self {
                        knotd,
                        zones: z,
                        dir: d,
                        ..
                    } = up;
                    drop(knotd);
                    (zones, dir) = (z, d);
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("knotd did not start")))
    }

    /// Where knotd listens, UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> Option<u32> {
        self.knotd.pid()
    }

    /// Directory holding knot.conf, the zone files, knot.log and knotd's storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// knotd's log file (everything at `info` and above).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("knot.log")
    }

    /// The last lines of knotd's log and its stdout/stderr, for error messages.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        for file in ["knot.log", "knotd.out"] {
            let text = fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            s.push_str(&format!("--- {file} ---\n{}\n", lines[from..].join("\n")));
        }
        s
    }

    /// The zones as currently served.
    pub fn zones(&self) -> &[Zone] {
        &self.zones
    }

    /// For batch edits: change zones here, then call [`Self::reload`].
    pub fn zones_mut(&mut self) -> &mut [Zone] {
        &mut self.zones
    }

    /// Replaces the RRset (`name`, `rtype`) with `values` (zone-file syntax, e.g. an address,
    /// a CNAME target, a quoted TXT string), or removes it if `values` is empty; then reloads
    /// the zone and returns once knotd serves the new data.
    pub fn set_zone_record(
        &mut self,
        name: &str,
        rtype: &str,
        ttl: u32,
        values: &[&str],
    ) -> Result<()> {
        let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let (zone, owner) = find_zone_mut(&mut self.zones, name)?;
        zone.set_rrset(&owner, rtype, ttl, &values);
        let origin = zone.origin.clone();
        self.reload_zones(&[origin])
    }

    /// Makes `name` resolve to exactly `addrs` (A and AAAA sets replaced together, in one
    /// serial bump), then waits until knotd serves it.
    pub fn set_addrs(&mut self, name: &str, ttl: u32, addrs: &[IpAddr]) -> Result<()> {
        let (v4, v6) = addr_values(addrs);
        let (zone, owner) = find_zone_mut(&mut self.zones, name)?;
        zone.set_rrset(&owner, "A", ttl, &v4);
        zone.set_rrset(&owner, "AAAA", ttl, &v6);
        let origin = zone.origin.clone();
        self.reload_zones(&[origin])
    }

    /// Rewrites every zone with a bumped serial and waits until knotd serves all of them.
    pub fn reload(&mut self) -> Result<()> {
        let origins: Vec<String> = self.zones.iter().map(|z| z.origin.clone()).collect();
        self.reload_zones(&origins)
    }

    fn reload_zones(&mut self, origins: &[String]) -> Result<()> {
        let result = self.try_reload_zones(origins);
        match &result {
            Ok(()) => self.served = self.zones.clone(),
            Err(_) => {
                // knotd keeps serving the old data after a bad file; make ours match it so a
                // later change does not carry the bad record along.
                self.zones = self.served.clone();
                for zone in &self.zones {
                    let _ = write_zone(self.dir.path(), zone);
                }
            }
        }
        result
    }

    fn try_reload_zones(&mut self, origins: &[String]) -> Result<()> {
        for zone in self
            .zones
            .iter_mut()
            .filter(|z| origins.contains(&z.origin))
        {
            zone.serial += 1;
            write_zone(self.dir.path(), zone)?;
        }
        let knotc = tool_path("knotc").context("knotc not found (Debian package `knot`)")?;
        let mut cmd = Command::new(knotc);
        // -b: return only once the reload event ran; -t bounds knotc's own wait.
        cmd.arg("-s")
            .arg(self.dir.path().join("knot.sock"))
            .args(["-b", "-t", "5", "zone-reload"])
            .args(origins);
        let out = run_blocking(&mut cmd, RELOAD_TIMEOUT + Duration::from_secs(1))?;
        if !out.status.success() {
            bail!(
                "knotc zone-reload failed ({}): {}{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        for zone in self.zones.iter().filter(|z| origins.contains(&z.origin)) {
            self.wait_serial(zone, deadline)?;
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        for zone in &self.zones {
            loop {
                if let Some(status) = self.knotd.try_exited()? {
                    bail!(
                        "knotd on {} exited during startup ({status})\n{}",
                        self.addr,
                        self.log_tail()
                    );
                }
                match soa_serial(self.addr, &zone.origin, PROBE_TIMEOUT) {
                    Ok(serial) if serial == zone.serial => break,
                    _ if self.log_has_load_error() => bail!(
                        "knotd on {} could not load {}\n{}",
                        self.addr,
                        zone.origin,
                        self.log_tail()
                    ),
                    _ if Instant::now() >= deadline => bail!(
                        "knotd on {} did not serve {} (serial {}) within {START_TIMEOUT:?}\n{}",
                        self.addr,
                        zone.origin,
                        zone.serial,
                        self.log_tail()
                    ),
                    _ => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        Ok(())
    }

    fn wait_serial(&self, zone: &Zone, deadline: Instant) -> Result<()> {
        loop {
            let got = soa_serial(self.addr, &zone.origin, PROBE_TIMEOUT);
            match got {
                Ok(serial) if serial == zone.serial => return Ok(()),
                _ if Instant::now() >= deadline => bail!(
                    "knotd did not serve {} serial {} in time (last: {got:?})\n{}",
                    zone.origin,
                    zone.serial,
                    self.log_tail()
                ),
                _ => thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn log_has_load_error(&self) -> bool {
        fs::read_to_string(self.log_path())
            .map(|log| log.contains("zone event 'load' failed"))
            .unwrap_or(false)
    }

    fn lost_bind_race(&self) -> bool {
        fs::read_to_string(self.log_path())
            .map(|log| log.contains("cannot bind") || log.contains("address already in use"))
            .unwrap_or(false)
    }
}

fn write_zone(dir: &Path, zone: &Zone) -> Result<()> {
    let path = dir.join(zone.file_name());
    // Written aside and renamed so knotd never parses a half-written file.
    let tmp = dir.join(format!("{}.tmp", zone.file_name()));
    fs::write(&tmp, zone.render()).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}

fn knot_conf(dir: &Path, addr: SocketAddr, zones: &[Zone]) -> String {
    let d = dir.display();
    let listen = format!("{}@{}", addr.ip(), addr.port());
    let mut conf = format!(
        r#"# Written by warden-tests; one knotd per test, all state in this directory.
server:
    rundir: "{d}"
    pidfile: "{d}/knotd.pid"
    listen: {listen}
    # Small: tests run several knotd at once on 2 cores.
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1

control:
    listen: "{d}/knot.sock"

database:
    storage: "{d}"

log:
  - target: "{d}/knot.log"
    any: info

template:
  - id: default
    storage: "{d}"
    # Only the files are the truth: no journal, never written back, reloaded whole.
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none

zone:
"#
    );
    for zone in zones {
        conf.push_str(&format!(
            "  - domain: {}\n    file: \"{d}/{}\"\n",
            zone.origin,
            zone.file_name()
        ));
    }
    conf
}
