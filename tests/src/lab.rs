//! The network lab for datapath tests: a fake "internet" in a network namespace serving HTTP on
//! every lab address, cgroups of our own for workloads, and ways to run real clients (curl,
//! dig, getent, a connect loop) inside such a cgroup from their very first instruction.
//!
//! Everything here is created with names unique to the test process and removed on `Drop`,
//! also when the test panics. Nothing is ever attached to, moved into or out of a cgroup this
//! process did not create, the host's `/etc/resolv.conf` is never touched (a private mount
//! namespace gets its own), and traffic only goes to loopback or to the namespace created here.
//!
//! The HTTP responder and the connect loop are small Python scripts (python3 is part of the
//! lab requirements): one process each, no children, so killing the PID we spawned is enough.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::clients::{DigOpts, DnsReply, dig_with};
use crate::process::{ProcessGuard, run_blocking};
use crate::zones::{CILIUM_IO_V4, CILIUM_IO_V6, lab_zones};
use crate::{require_root, require_tools, test_name, tool_path};

/// Ports the lab hosts serve HTTP on (443 is plain HTTP too: only the port matters to policy).
pub const HTTP_PORTS: [u16; 3] = [80, 443, 8080];
/// The lab's IPv4 range, routed from the host into the [`Internet`] namespace.
pub const LAB_NET_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// The lab's IPv6 range, routed from the host into the [`Internet`] namespace.
pub const LAB_NET_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0), 64);
/// The host's end of the veth pair. Inside [`LAB_NET_V4`]: the /30 is more specific, so the
/// connected route wins over the lab route for these four addresses.
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// The namespace's end of the veth pair: the next hop of the host's lab route.
pub const INTERNET_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
const TRANSFER_PREFIX_V4: u8 = 30;
/// The host's end of the veth pair (a /64 of its own, outside [`LAB_NET_V6`]).
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0xffff, 0, 0, 0, 0, 1);
/// The namespace's end of the veth pair.
pub const INTERNET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0xffff, 0, 0, 0, 0, 2);
const TRANSFER_PREFIX_V6: u8 = 64;
/// Held (`flock`, exclusive) for the lifetime of an [`Internet`]: the lab routes are
/// machine-wide, so tests in every test binary take turns.
pub const INTERNET_LOCK: &str = "/run/warden-tests-internet.lock";

/// Every `ip` invocation is a local netlink round trip; this only catches a hang.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leftover of a killed test run may take to disappear (its responder notices
/// the death of its parent within a fraction of a second).
const STALE_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// Slack on top of a client's own timeout before the process is killed.
const KILL_SLACK: Duration = Duration::from_secs(5);
/// How long one [`ConnectLoop`] attempt may take (connect plus exchange).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
const NETNS_PREFIX: &str = "wi-";
const CGROUP_PREFIX: &str = "warden-test-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// True when the lab can run here: root, `ip`, `unshare`, `mount`, `curl`, `python3`,
/// `getent`, and a cgroup v2 mount; otherwise prints why the calling test is skipped.
pub fn require_lab() -> bool {
    if !require_root() {
        return false;
    }
    if !require_tools(&["ip", "unshare", "mount", "curl", "python3", "getent"]) {
        return false;
    }
    if let Err(e) = cgroup2_mount() {
        eprintln!("skipping {}: {e:#}", test_name());
        return false;
    }
    true
}

/// Every address the lab zones publish (A and AAAA records of [`lab_zones`]), sorted: the
/// hosts an [`Internet`] serves.
pub fn lab_host_addrs() -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = lab_zones()
        .iter()
        .flat_map(|z| &z.records)
        .filter(|r| r.rtype == "A" || r.rtype == "AAAA")
        .filter_map(|r| r.data.parse().ok())
        .collect();
    set.into_iter().collect()
}

/// Whether `ip` is in [`LAB_NET_V4`] or [`LAB_NET_V6`].
pub fn in_lab_net(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX << (32 - LAB_NET_V4.1);
            u32::from(v4) & mask == u32::from(LAB_NET_V4.0)
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX << (128 - LAB_NET_V6.1);
            u128::from(v6) & mask == u128::from(LAB_NET_V6.0)
        }
    }
}

/// `http://198.18.1.10:80/`, `http://[fd00:77::10]:8080/`: a URL curl accepts (with `-g`).
pub fn http_url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

/// The body a lab host answers with when reached at `addr`.
pub fn http_body(addr: SocketAddr) -> String {
    format!("warden-lab host {addr}\n")
}

// ---------------------------------------------------------------------------------------
// The internet
// ---------------------------------------------------------------------------------------

/// A fake internet: a network namespace holding every lab host address, joined to the host
/// by a veth pair, with the lab ranges routed into it and an HTTP responder answering on
/// [`HTTP_PORTS`] of every address. Only one exists per machine at a time (see
/// [`INTERNET_LOCK`]); `start` waits for its turn.
///
/// Dropping it kills the responder, deletes the routes, the veth pair and the namespace,
/// then releases the lock.
pub struct Internet {
    netns: String,
    veth: String,
    hosts: Vec<IpAddr>,
    responder: Option<ProcessGuard>,
    created_netns: bool,
    created_veth: bool,
    routed: bool,
    dir: TempDir,
    // Last: released only once everything above is gone.
    _lock: Flock<File>,
}

impl fmt::Debug for Internet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Internet")
            .field("netns", &self.netns)
            .field("veth", &self.veth)
            .field("hosts", &self.hosts.len())
            .field("responder", &self.responder_pid())
            .finish()
    }
}

impl Internet {
    /// Takes the machine-wide lock (waiting for another `Internet` to go away), clears what
    /// a killed earlier run may have left, builds the namespace and returns once the first
    /// IPv4 and IPv6 lab hosts answer HTTP from the host.
    pub fn start() -> Result<Internet> {
        let lock = lock_internet()?;
        clear_stale_internets()?;
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // IFNAMSIZ is 16 with the NUL: "wh" + 7-digit pid + "-" + 4 digits fits. Only one
        // Internet exists at a time, so the modulo cannot make two live names collide.
        let veth = format!("wh{pid}-{}", n % 10_000);
        let mut net = Internet {
            netns: format!("{NETNS_PREFIX}{pid}-{n}"),
            veth,
            hosts: lab_host_addrs(),
            responder: None,
            created_netns: false,
            created_veth: false,
            routed: false,
            dir: tempfile::Builder::new()
                .prefix("warden-internet-")
                .tempdir()
                .context("creating the lab's directory")?,
            _lock: lock,
        };
        // Any error from here on drops `net`, which removes whatever was built.
        net.build()
            .with_context(|| format!("building the lab namespace {}", net.netns))?;
        Ok(net)
    }

    fn build(&mut self) -> Result<()> {
        let (ns, veth) = (self.netns.clone(), self.veth.clone());
        ip(&["netns", "add", &ns])?;
        self.created_netns = true;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        self.created_veth = true;

        // `nodad`: without it IPv6 addresses stay tentative (unusable) for about a second.
        let mut inside = vec![
            "link set lo up".to_owned(),
            "link set eth0 up".to_owned(),
            format!("addr add {INTERNET_V4}/{TRANSFER_PREFIX_V4} dev eth0"),
            format!("addr add {INTERNET_V6}/{TRANSFER_PREFIX_V6} dev eth0 nodad"),
        ];
        inside.extend(self.hosts.iter().map(|h| host_addr_line("add", *h)));
        inside.push(format!("route add 0.0.0.0/0 via {HOST_V4}"));
        inside.push(format!("route add ::/0 via {HOST_V6}"));
        self.ip_batch("inside", Some(&ns), &inside)?;

        let (v4net, v4len) = LAB_NET_V4;
        let (v6net, v6len) = LAB_NET_V6;
        let outside = [
            format!("link set {veth} up"),
            format!("addr add {HOST_V4}/{TRANSFER_PREFIX_V4} dev {veth}"),
            format!("addr add {HOST_V6}/{TRANSFER_PREFIX_V6} dev {veth} nodad"),
        ];
        self.ip_batch("outside", None, &outside)?;
        // From here the routes may exist (a batch can fail half-way): Drop deletes them.
        self.routed = true;
        let routes = [
            format!("route add {v4net}/{v4len} via {INTERNET_V4} dev {veth}"),
            format!("route add {v6net}/{v6len} via {INTERNET_V6} dev {veth}"),
        ];
        self.ip_batch("routes", None, &routes)?;

        self.start_responder()?;
        for ip in [IpAddr::V4(CILIUM_IO_V4), IpAddr::V6(CILIUM_IO_V6)] {
            wait_http(SocketAddr::new(ip, HTTP_PORTS[0]), START_TIMEOUT)?;
        }
        tracing::info!(netns = %ns, veth = %veth, pid = ?self.responder_pid(), "internet up");
        Ok(())
    }

    /// One `ip -batch` per step: ~70 addresses in one process instead of 70 processes.
    fn ip_batch(&self, name: &str, netns: Option<&str>, lines: &[String]) -> Result<()> {
        let file = self.dir.path().join(format!("{name}.ip"));
        fs::write(&file, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", file.display()))?;
        let file = file.to_string_lossy().into_owned();
        match netns {
            Some(ns) => ip(&["-n", ns, "-batch", &file]),
            None => ip(&["-batch", &file]),
        }
        .map(drop)
    }

    fn start_responder(&mut self) -> Result<()> {
        let log = self.log_path();
        let out = File::create(&log).context("creating the responder log")?;
        let err = out.try_clone().context("cloning the responder log")?;
        let ports: Vec<String> = HTTP_PORTS.iter().map(u16::to_string).collect();
        // `ip netns exec` execs (no fork): the PID we get is python's, and its parent is us.
        let mut cmd = Command::new(ip_path()?);
        cmd.args(["netns", "exec", &self.netns])
            .arg(python3()?)
            .args(["-c", RESPONDER_PY, &ports.join(",")])
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let guard = ProcessGuard::spawn(&mut cmd, "lab http responder")?;
        self.responder = Some(guard);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.responder_log().lines().any(|l| l == "ready") {
                return Ok(());
            }
            if let Some(guard) = self.responder.as_mut()
                && let Some(status) = guard.try_exited()?
            {
                bail!(
                    "the HTTP responder exited ({status}):\n{}",
                    self.responder_log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the HTTP responder was not ready within {START_TIMEOUT:?}:\n{}",
                    self.responder_log()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The namespace's name (`wi-<pid>-<n>`), for `ip netns exec`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host side of the veth pair (`wh<pid>-<n>`).
    pub fn host_veth(&self) -> &str {
        &self.veth
    }

    /// The lab host addresses currently served (initially [`lab_host_addrs`]).
    pub fn hosts(&self) -> &[IpAddr] {
        &self.hosts
    }

    /// PID of the HTTP responder, while it runs.
    pub fn responder_pid(&self) -> Option<u32> {
        self.responder.as_ref().and_then(ProcessGuard::pid)
    }

    /// Makes `ip` a lab host too (e.g. a name's new address after a zone change). The
    /// responder listens on the wildcard address, so it serves `ip` at once.
    pub fn add_host(&mut self, ip: IpAddr) -> Result<()> {
        if !in_lab_net(ip) {
            bail!("{ip} is outside the lab ranges");
        }
        if self.hosts.contains(&ip) {
            return Ok(());
        }
        self.ip_batch("add-host", Some(&self.netns), &[host_addr_line("add", ip)])?;
        self.hosts.push(ip);
        Ok(())
    }

    /// Takes `ip` away: connections to it then time out (nothing answers, nothing rejects).
    pub fn remove_host(&mut self, ip: IpAddr) -> Result<()> {
        if let Some(at) = self.hosts.iter().position(|h| *h == ip) {
            self.ip_batch("del-host", Some(&self.netns), &[host_addr_line("del", ip)])?;
            self.hosts.remove(at);
        }
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("responder.log")
    }

    /// What the responder logged: `accept <local> from <peer>` per connection and
    /// `request <local> from <peer> <request line>` per request.
    pub fn responder_log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// curl from inside the namespace: a client of the internet's, reaching the host's side of
    /// the link ([`HOST_V4`], [`HOST_V6`]) from [`INTERNET_V4`], [`INTERNET_V6`].
    pub fn curl(&self, url: &str, timeout: Duration) -> Result<CurlResult> {
        run_curl_with(None, None, Some(&self.netns), url, &[], timeout)
    }

    /// How many connections reached `addr` so far: proof that a denied connection never
    /// arrived, or that an allowed one did.
    pub fn connections_to(&self, addr: SocketAddr) -> usize {
        let prefix = format!("accept {addr} from ");
        self.responder_log()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .count()
    }

    fn teardown(&mut self) {
        if let Some(responder) = self.responder.take()
            && let Err(e) = responder.stop()
        {
            tracing::warn!("stopping the lab responder: {e:#}");
        }
        let veth = self.veth.clone();
        if self.routed {
            let (v4net, v4len) = LAB_NET_V4;
            let (v6net, v6len) = LAB_NET_V6;
            cleanup_ip(&["route", "del", &format!("{v4net}/{v4len}"), "dev", &veth]);
            cleanup_ip(&["route", "del", &format!("{v6net}/{v6len}"), "dev", &veth]);
        }
        if self.created_veth {
            cleanup_ip(&["link", "del", &veth]);
        }
        if self.created_netns {
            cleanup_ip(&["netns", "del", &self.netns]);
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn host_addr_line(verb: &str, ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("addr {verb} {v4}/32 dev lo"),
        IpAddr::V6(v6) => format!("addr {verb} {v6}/128 dev lo nodad"),
    }
}

/// Blocks until no other `Internet` exists on this machine (in any process).
fn lock_internet() -> Result<Flock<File>> {
    let open = || {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(INTERNET_LOCK)
            .with_context(|| format!("opening {INTERNET_LOCK}"))
    };
    match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => return Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            tracing::info!("another lab internet is up; waiting for {INTERNET_LOCK}");
        }
        Err((_, e)) => return Err(e).with_context(|| format!("locking {INTERNET_LOCK}")),
    }
    let mut file = open()?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(e).with_context(|| format!("locking {INTERNET_LOCK}")),
        }
    }
}

/// Under the lock no other `Internet` is alive, so a lab namespace of a dead process is a
/// leftover of a killed run: delete it (its responder exits by itself once orphaned, which
/// frees the veth pair and its routes). Then make sure the lab ranges are free.
fn clear_stale_internets() -> Result<()> {
    let list = ip(&["netns", "list"])?;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !pid_alive(pid) {
            tracing::warn!(
                netns = name,
                "deleting a lab namespace left by a killed run"
            );
            cleanup_ip(&["netns", "del", name]);
        }
    }
    let (v4net, v4len) = LAB_NET_V4;
    let (v6net, v6len) = LAB_NET_V6;
    let v4 = format!("{v4net}/{v4len}");
    let v6 = format!("{v6net}/{v6len}");
    let deadline = Instant::now() + STALE_WAIT;
    loop {
        let routes = ip(&["-4", "route", "show", "exact", &v4])?
            + &ip(&["-6", "route", "show", "exact", &v6])?;
        if routes.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the lab ranges are already routed on this machine, by something other than a \
                 live lab (a leftover, or another user of {v4} / {v6}):\n{routes}"
            );
        }
        thread::sleep(POLL * 5);
    }
}

/// Connects from the host and expects a lab host's HTTP answer, retrying until `timeout`.
fn wait_http(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let err = match http_get(addr, Duration::from_secs(1)) {
            Ok(text) if text.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(text) => anyhow::anyhow!("unexpected answer: {text}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(err.context(format!("{addr} did not answer within {timeout:?}")));
        }
        thread::sleep(POLL * 5);
    }
}

/// One HTTP/1.1 GET from the test process itself (not in any test cgroup), whole answer.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("sending to {addr}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("reading from {addr}"))?;
    Ok(text)
}

/// One process, one selector, wildcard listeners (so addresses added later are served too);
/// the body names the local address the connection reached. HTTP/1.1 keep-alive is honoured
/// so a test can keep one connection busy. Exits when its parent (the test) is gone.
const RESPONDER_PY: &str = r#"
import os, selectors, socket, sys, time

# The test's PID comes as an argument: read from getppid() at start-up it would already be 1
# if the test died while python was starting, and the watchdog would never fire.
PORTS = [int(p) for p in sys.argv[1].split(",")]
PARENT = int(sys.argv[2])
IDLE_S = 600.0
sel = selectors.DefaultSelector()
conns = {}

def name(sa):
    return ("[%s]:%d" if ":" in sa[0] else "%s:%d") % (sa[0], sa[1])

def log(*parts):
    print(*parts, flush=True)

for port in PORTS:
    for fam, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((wildcard, port))
        s.listen(1024)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, None)

def close(c):
    conns.pop(c, None)
    try:
        sel.unregister(c)
    except Exception:
        pass
    c.close()

def serve(c):
    state = conns[c]
    try:
        data = c.recv(65536)
    except (BlockingIOError, InterruptedError):
        return
    if not data:
        close(c)
        return
    state[1] = time.monotonic()
    state[0] += data
    while b"\r\n\r\n" in state[0]:
        head, state[0] = state[0].split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = [h.lower().replace(" ", "") for h in lines[1:]]
        keep = lines[0].endswith("HTTP/1.1") and "connection:close" not in headers
        local = name(c.getsockname())
        body = ("warden-lab host %s\n" % local).encode()
        reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n" % (
            len(body), b"keep-alive" if keep else b"close") + body
        log("request", local, "from", name(c.getpeername()), lines[0])
        c.settimeout(5)
        c.sendall(reply)
        c.setblocking(False)
        if not keep:
            close(c)
            return

log("ready")
while True:
    for key, _ in sel.select(0.2):
        if key.data is None:
            try:
                c, peer = key.fileobj.accept()
            except OSError:
                continue
            c.setblocking(False)
            conns[c] = [b"", time.monotonic()]
            sel.register(c, selectors.EVENT_READ, "conn")
            log("accept", name(c.getsockname()), "from", name(peer))
        else:
            try:
                serve(key.fileobj)
            except Exception:
                close(key.fileobj)
    if os.getppid() != PARENT:
        sys.exit(0)
    now = time.monotonic()
    for c, state in list(conns.items()):
        if now - state[1] > IDLE_S:
            close(c)
"#;

// ---------------------------------------------------------------------------------------
// Cgroups
// ---------------------------------------------------------------------------------------

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` when that is cgroup2, else
/// `/sys/fs/cgroup/unified` (hybrid hosts, like this platform's).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let cgroup2: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then_some(point)
        })
        .collect();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|p| cgroup2.contains(p))
        .map(PathBuf::from)
        .with_context(|| {
            format!(
                "cgroup v2 is mounted neither at /sys/fs/cgroup nor at /sys/fs/cgroup/unified \
                 (cgroup2 mounts: {cgroup2:?})"
            )
        })
}

/// The id the kernel uses for a cgroup (`bpf_skb_cgroup_id`): its directory's inode number.
pub fn cgroup_id(cgroup: &Path) -> Result<u64> {
    Ok(fs::metadata(cgroup)
        .with_context(|| format!("reading {}", cgroup.display()))?
        .ino())
}

/// PIDs of the processes directly in `cgroup`.
pub fn cgroup_procs(cgroup: &Path) -> Result<Vec<u32>> {
    let path = cgroup.join("cgroup.procs");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// A cgroup v2 subtree of our own, `<mount>/warden-test-<pid>-<n>/`: the root a datapath
/// under test attaches to, with children for workloads.
///
/// Dropping it SIGKILLs the processes in it that this process spawned (its direct children),
/// then what they started and left there, and removes the children, then the root.
pub struct TestCgroup {
    mount: PathBuf,
    root: PathBuf,
}

impl fmt::Debug for TestCgroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCgroup")
            .field("root", &self.root)
            .finish()
    }
}

impl TestCgroup {
    pub fn new() -> Result<TestCgroup> {
        let mount = cgroup2_mount()?;
        clear_stale_cgroups(&mount);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root = mount.join(format!("{CGROUP_PREFIX}{}-{n}", std::process::id()));
        fs::create_dir(&root).with_context(|| format!("creating cgroup {}", root.display()))?;
        tracing::debug!(root = %root.display(), "test cgroup created");
        Ok(TestCgroup { mount, root })
    }

    /// The subtree's root: where the datapath attaches (`datapath.cgroup_root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cgroup v2 mount point this subtree lives in.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Creates (if needed) the child cgroup `name` (`a` or nested `a/b`) and returns its path.
    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let rel = Path::new(name);
        // No dots: every interface file of cgroupfs (cgroup.procs, memory.max) has one.
        let valid = !name.is_empty()
            && name.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !valid {
            bail!("{name:?} is not a valid child cgroup name ([A-Za-z0-9_-], '/' to nest)");
        }
        let path = self.root.join(rel);
        fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(path)
    }

    fn teardown(&self) -> Result<()> {
        let dirs = subtree_post_order(&self.root)?;
        let me = std::process::id();
        let mut ours = Vec::new();
        for dir in &dirs {
            for pid in cgroup_procs(dir).unwrap_or_default() {
                if parent_pid(pid) == Some(me) {
                    // Only our own children: a PID is ours to kill while it is our child.
                    if let Ok(p) = i32::try_from(pid) {
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                        ours.push(pid);
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let remaining = loop {
            let remaining: Vec<u32> = dirs
                .iter()
                .flat_map(|d| cgroup_procs(d).unwrap_or_default())
                .collect();
            if remaining.iter().all(|p| !ours.contains(p)) || Instant::now() >= deadline {
                break remaining;
            }
            thread::sleep(POLL);
        };
        if !remaining.is_empty() {
            // Descendants of our children (a shell's background job): nothing enters a cgroup
            // of this subtree but what the test put there and what that started, so they are
            // the test's to end too, and left running they would outlive it. cgroup.kill
            // (Linux 5.14) ends the subtree's processes at once, forks included, and cannot
            // hit a PID reused meanwhile; before it, they are killed by PID.
            tracing::warn!(
                pids = ?remaining,
                "killing processes our children left in {}",
                self.root.display()
            );
            if fs::write(self.root.join("cgroup.kill"), "1").is_err() {
                for &pid in &remaining {
                    if let Ok(p) = i32::try_from(pid) {
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while dirs
                .iter()
                .any(|d| !cgroup_procs(d).unwrap_or_default().is_empty())
                && Instant::now() < deadline
            {
                thread::sleep(POLL);
            }
        }
        for dir in &dirs {
            rmdir_retrying(dir)?;
        }
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(root = %self.root.display(), "removing test cgroup: {e:#}");
        }
    }
}

/// Every cgroup of the subtree, children before their parents, `root` last.
fn subtree_post_order(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for entry in fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(subtree_post_order(&entry.path())?);
        }
    }
    out.push(root.to_owned());
    Ok(out)
}

/// A cgroup may stay busy for a moment after its last process died.
fn rmdir_retrying(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()));
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Removes empty test cgroups of dead processes (a killed run's). `rmdir` only succeeds on a
/// cgroup without processes or children, so nothing running is disturbed.
fn clear_stale_cgroups(mount: &Path) {
    let Ok(entries) = fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten() {
        if !left_by_a_dead_run(&entry.file_name().to_string_lossy(), CGROUP_PREFIX) {
            continue;
        }
        if let Ok(dirs) = subtree_post_order(&entry.path()) {
            for dir in dirs {
                let _ = fs::remove_dir(dir);
            }
        }
    }
}

/// Refuses any cgroup outside a test subtree of this process: our children are only ever
/// placed in cgroups we created.
fn check_ours(cgroup: &Path) -> Result<()> {
    let mount = cgroup2_mount()?;
    let rel = cgroup.strip_prefix(&mount).unwrap_or(Path::new(""));
    let mut parts = rel.components();
    let ours = format!("{CGROUP_PREFIX}{}-", std::process::id());
    let first_ok = matches!(parts.next(), Some(Component::Normal(s)) if s.to_string_lossy().starts_with(&ours));
    let rest_ok = parts.all(|c| matches!(c, Component::Normal(_)));
    if !first_ok || !rest_ok {
        bail!(
            "refusing to use cgroup {}: not in a TestCgroup of this process",
            cgroup.display()
        );
    }
    if !cgroup.join("cgroup.procs").exists() {
        bail!("{} is not a cgroup (no cgroup.procs)", cgroup.display());
    }
    Ok(())
}

/// Makes the child of `cmd` join `cgroup` between fork and exec, so the program runs inside
/// it from its first instruction (and everything it forks is inside too).
#[allow(unsafe_code)]
fn join_cgroup_before_exec(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    check_ours(cgroup)?;
    let procs = cgroup.join("cgroup.procs");
    // Opened here, in the parent: the child must not allocate or open files after fork.
    // Rust opens with O_CLOEXEC, so the descriptor is gone once the program is exec'ed.
    let fd: OwnedFd = OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("opening {}", procs.display()))?
        .into();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // operations are allowed. It makes a single write(2) on a descriptor that is already open
    // and allocates nothing (the error conversion builds an `io::Error` from the raw errno).
    // Writing "0" to cgroup.procs moves the writing process itself.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::write(&fd, b"0")
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

/// Runs `cmd` to completion inside `cgroup` (a [`TestCgroup`] or one of its children), output
/// captured, killed (and an error) after `timeout`.
pub fn run_in_cgroup(cgroup: &Path, cmd: &mut Command, timeout: Duration) -> Result<Output> {
    join_cgroup_before_exec(cmd, cgroup)?;
    run_blocking(cmd, timeout)
}

/// Spawns `cmd` inside `cgroup`; the guard stops it (SIGTERM, then SIGKILL) when dropped.
pub fn spawn_in_cgroup(cgroup: &Path, cmd: &mut Command) -> Result<ProcessGuard> {
    join_cgroup_before_exec(cmd, cgroup)?;
    let name = cmd.get_program().to_string_lossy().into_owned();
    ProcessGuard::spawn(cmd, &name)
}

// ---------------------------------------------------------------------------------------
// Clients in a cgroup
// ---------------------------------------------------------------------------------------

/// What one curl run gave. Failing to connect (exit 7, "Couldn't connect", "Operation not
/// permitted") or timing out (exit 28) are results, not errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurlResult {
    /// curl's exit code: 0 ok, 7 could not connect, 28 timed out, ...
    pub exit_code: i32,
    /// The HTTP status, if a response came (curl's `000` is `None`).
    pub http_code: Option<u16>,
    pub body: String,
    /// curl's verbose log (`-v`): it holds the connect error text (errno), which the final
    /// error line of this curl version leaves out.
    pub stderr: String,
    pub elapsed: Duration,
}

impl CurlResult {
    /// Exit 0 and HTTP 200.
    pub fn ok(&self) -> bool {
        self.exit_code == 0 && self.http_code == Some(200)
    }

    /// The connection could not be made (exit 7), whatever the reason.
    pub fn connect_failed(&self) -> bool {
        self.exit_code == 7
    }

    /// curl gave up after its `--max-time` (exit 28).
    pub fn timed_out(&self) -> bool {
        self.exit_code == 28
    }

    /// `connect()` itself failed with EPERM: what a deny in a connect hook looks like.
    pub fn not_permitted(&self) -> bool {
        self.stderr.contains("Operation not permitted")
    }

    /// The reason the kernel gave for the failed connect (`Connection refused`,
    /// `Operation not permitted`, ...), from the verbose log.
    pub fn connect_error(&self) -> Option<&str> {
        self.stderr.lines().find_map(|l| {
            let l = l.trim_start_matches("* ");
            if l.starts_with("connect to ") {
                l.split_once(" failed: ").map(|(_, why)| why.trim())
            } else if l.starts_with("Immediate connect fail for ") {
                l.rsplit_once(": ").map(|(_, why)| why.trim())
            } else {
                None
            }
        })
    }
}

/// `curl url` inside `cgroup`, giving up after `timeout`.
pub fn curl(cgroup: &Path, url: &str, timeout: Duration) -> Result<CurlResult> {
    curl_with(cgroup, url, &[], timeout)
}

/// [`curl`] with extra arguments before the URL (`--resolve`, `-6`, `-H`, ...).
pub fn curl_with(
    cgroup: &Path,
    url: &str,
    extra: &[&str],
    timeout: Duration,
) -> Result<CurlResult> {
    run_curl(Some(cgroup), url, extra, timeout)
}

/// [`curl_with`] resolving names through a private resolv.conf (see [`ResolvConf`]).
pub fn curl_resolving(
    cgroup: &Path,
    resolv: &ResolvConf,
    url: &str,
    extra: &[&str],
    timeout: Duration,
) -> Result<CurlResult> {
    run_curl_with(Some(cgroup), Some(resolv), None, url, extra, timeout)
}

/// [`curl`] from the test process's own cgroup, outside any test subtree.
pub fn curl_from_host(url: &str, timeout: Duration) -> Result<CurlResult> {
    run_curl(None, url, &[], timeout)
}

fn run_curl(
    cgroup: Option<&Path>,
    url: &str,
    extra: &[&str],
    timeout: Duration,
) -> Result<CurlResult> {
    run_curl_with(cgroup, None, None, url, extra, timeout)
}

/// With `netns`, curl runs inside that namespace (and without `resolv`).
fn run_curl_with(
    cgroup: Option<&Path>,
    resolv: Option<&ResolvConf>,
    netns: Option<&str>,
    url: &str,
    extra: &[&str],
    timeout: Duration,
) -> Result<CurlResult> {
    let dir = tempfile::Builder::new()
        .prefix("warden-curl-")
        .tempdir()
        .context("creating curl's directory")?;
    let body_path = dir.path().join("body");
    let curl = tool_path("curl").context("curl not found")?;
    let mut cmd = match resolv {
        Some(resolv) => resolv.command(&curl)?,
        None => Command::new(&curl),
    };
    if let Some(netns) = netns {
        let mut inside = Command::new(ip_path()?);
        inside.args(["netns", "exec", netns]).arg(&curl);
        cmd = inside;
    }
    // -q first: no ~/.curlrc. --noproxy: a proxy from the environment must not carry lab
    // traffic. -g: no globbing, so IPv6 literals in brackets work.
    cmd.args(["-q", "-v", "-sS", "-g", "--noproxy", "*"])
        .arg("--max-time")
        .arg(format!("{:.3}", timeout.as_secs_f64()))
        .arg("-o")
        .arg(&body_path)
        .args(["-w", "%{http_code}"])
        .args(extra)
        .arg(url);
    let started = Instant::now();
    let out = match cgroup {
        Some(cg) => run_in_cgroup(cg, &mut cmd, timeout + KILL_SLACK)?,
        None => run_blocking(&mut cmd, timeout + KILL_SLACK)?,
    };
    let out = match resolv {
        Some(resolv) => resolv.check(out)?,
        None => out,
    };
    let elapsed = started.elapsed();
    let exit_code = out
        .status
        .code()
        .with_context(|| format!("curl {url} was killed ({})", out.status))?;
    let code = String::from_utf8_lossy(&out.stdout);
    let http_code = code.trim().parse::<u16>().ok().filter(|c| *c != 0);
    let body = fs::read(&body_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Ok(CurlResult {
        exit_code,
        http_code,
        body,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed,
    })
}

/// [`crate::dig`] run inside `cgroup`: same command line, same parser.
pub async fn dig_in_cgroup(
    cgroup: &Path,
    server: SocketAddr,
    name: &str,
    qtype: &str,
    opts: DigOpts,
) -> Result<DnsReply> {
    dig_with(server, name, qtype, opts, |cmd| {
        join_cgroup_before_exec(cmd.as_std_mut(), cgroup)
    })
    .await
}

/// [`crate::dnsperf_with`] run inside `cgroup`: same command line, same parser.
pub async fn dnsperf_in_cgroup(
    cgroup: &Path,
    server: SocketAddr,
    opts: &crate::DnsperfOpts,
) -> Result<crate::DnsperfReport> {
    crate::clients::dnsperf_prepared(server, opts, |cmd| {
        join_cgroup_before_exec(cmd.as_std_mut(), cgroup)
    })
    .await
}

/// `getent hosts name` inside `cgroup`, with `resolv_conf` as `/etc/resolv.conf`: bind-mounted
/// in a private mount namespace (`unshare -m`) that dies with getent, so the host's file and
/// mount table never change. Returns getent's output (exit 2: name not found).
pub fn getent_hosts(cgroup: &Path, resolv_conf: &str, name: &str) -> Result<Output> {
    let resolv = ResolvConf::new(resolv_conf)?;
    let mut cmd = resolv.command(&tool_path("getent").context("getent not found")?)?;
    cmd.args(["hosts", name]);
    // Resolver timeouts in resolv.conf are at most 30 s per try; keep a generous ceiling.
    let out = run_in_cgroup(cgroup, &mut cmd, Duration::from_secs(30))?;
    resolv.check(out)
}

/// A private `/etc/resolv.conf` for commands run in a mount namespace of their own: the host's
/// file (and its nameserver, which lies outside the lab) is never used or changed.
#[derive(Debug)]
pub struct ResolvConf {
    file: tempfile::NamedTempFile,
}

impl ResolvConf {
    pub fn new(text: &str) -> Result<ResolvConf> {
        let mut file = tempfile::Builder::new()
            .prefix("warden-resolv-")
            .suffix(".conf")
            .tempfile()
            .context("creating the private resolv.conf")?;
        file.write_all(text.as_bytes())
            .context("writing the private resolv.conf")?;
        file.flush()?;
        Ok(ResolvConf { file })
    }

    /// `program`, run with this file bind-mounted over /etc/resolv.conf in a private mount
    /// namespace; add the program's arguments to the returned command.
    pub fn command(&self, program: &Path) -> Result<Command> {
        // Exit 125 tells a failed bind mount from the program's own codes.
        const SCRIPT: &str = r#"mount --bind "$1" /etc/resolv.conf || exit 125; shift; exec "$@""#;
        let mut cmd = Command::new(tool_path("unshare").context("unshare not found")?);
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            SCRIPT,
            "sh",
        ])
        .arg(self.file.path())
        .arg(program);
        Ok(cmd)
    }

    /// The output, or an error if the bind mount itself failed.
    pub fn check(&self, out: Output) -> Result<Output> {
        if out.status.code() == Some(125) {
            bail!(
                "bind-mounting the private resolv.conf failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }
}

/// The addresses in `getent hosts` output, in order.
pub fn getent_addrs(out: &Output) -> Vec<IpAddr> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Connect loop
// ---------------------------------------------------------------------------------------

/// One attempt of a [`ConnectLoop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Wall-clock start, comparable with `SystemTime::now()` taken around an agent restart.
    pub at: SystemTime,
    pub elapsed: Duration,
    /// The errno of a failed `connect`/exchange, when there was one (not for timeouts).
    pub errno: Option<i32>,
    /// `None` on success; else `<stage>: <reason>`, stage `connect` or `exchange`.
    pub error: Option<String>,
}

impl Attempt {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// A process in a cgroup connecting to `target` every `interval`, each time sending a GET and
/// expecting `HTTP/1.1 200` (a lab host), with [`ATTEMPT_TIMEOUT`]; every attempt's outcome
/// is recorded with its time. For "no gap" tests around restarts and program replacement.
pub struct ConnectLoop {
    target: SocketAddr,
    guard: Option<ProcessGuard>,
    dir: TempDir,
}

impl fmt::Debug for ConnectLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectLoop")
            .field("target", &self.target)
            .field("pid", &self.pid())
            .finish()
    }
}

impl ConnectLoop {
    pub fn start(cgroup: &Path, target: SocketAddr, interval: Duration) -> Result<ConnectLoop> {
        let dir = tempfile::Builder::new()
            .prefix("warden-connect-loop-")
            .tempdir()
            .context("creating the connect loop's directory")?;
        let log = dir.path().join("attempts");
        let out = File::create(&log).context("creating the attempts log")?;
        let mut cmd = Command::new(python3()?);
        cmd.args(["-c", CONNECT_LOOP_PY])
            .arg(target.ip().to_string())
            .arg(target.port().to_string())
            .arg(format!("{:.6}", interval.as_secs_f64()))
            .arg(format!("{:.6}", ATTEMPT_TIMEOUT.as_secs_f64()))
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::inherit());
        let guard = spawn_in_cgroup(cgroup, &mut cmd)?.with_grace(Duration::from_millis(500));
        Ok(ConnectLoop {
            target,
            guard: Some(guard),
            dir,
        })
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn pid(&self) -> Option<u32> {
        self.guard.as_ref().and_then(ProcessGuard::pid)
    }

    /// The attempts completed so far (the loop keeps running).
    pub fn attempts(&self) -> Result<Vec<Attempt>> {
        let path = self.dir.path().join("attempts");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        parse_attempts(&text)
    }

    /// Waits until at least `n` attempts completed: the loop is running before the test
    /// does what it wants to observe.
    pub fn wait_for_attempts(&self, n: usize, timeout: Duration) -> Result<Vec<Attempt>> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempts = self.attempts()?;
            if attempts.len() >= n {
                return Ok(attempts);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the connect loop to {} made {} of {n} attempts within {timeout:?}",
                    self.target,
                    attempts.len()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Stops the loop and returns every attempt it completed.
    pub fn stop(mut self) -> Result<Vec<Attempt>> {
        if let Some(guard) = self.guard.take() {
            guard.stop()?;
        }
        self.attempts()
    }
}

/// Lines `<start ns since epoch> <elapsed ns> ok` or
/// `<start> <elapsed> err <errno|-> <stage> <reason...>`; an unfinished last line is ignored.
fn parse_attempts(text: &str) -> Result<Vec<Attempt>> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut f = line.splitn(4, ' ');
            let (Some(at), Some(took), Some(kind)) = (f.next(), f.next(), f.next()) else {
                bail!("bad connect loop line {line:?}");
            };
            let at: u64 = at
                .parse()
                .with_context(|| format!("bad time in {line:?}"))?;
            let took: u64 = took
                .parse()
                .with_context(|| format!("bad time in {line:?}"))?;
            let (errno, error) = match kind {
                "ok" => (None, None),
                "err" => {
                    let rest = f.next().unwrap_or_default();
                    let mut g = rest.splitn(3, ' ');
                    let errno = g.next().and_then(|e| e.parse().ok());
                    let stage = g.next().unwrap_or("?");
                    let why = g.next().unwrap_or("").trim();
                    (errno, Some(format!("{stage}: {why}")))
                }
                other => bail!("bad outcome {other:?} in {line:?}"),
            };
            Ok(Attempt {
                at: UNIX_EPOCH + Duration::from_nanos(at),
                elapsed: Duration::from_nanos(took),
                errno,
                error,
            })
        })
        .collect()
}

/// One process, no children; exits when its parent (the test) is gone.
const CONNECT_LOOP_PY: &str = r#"
import os, socket, sys, time

host, port = sys.argv[1], int(sys.argv[2])
interval, timeout = float(sys.argv[3]), float(sys.argv[4])
# The test's PID (see the responder for why it is not read from getppid() here).
PARENT = int(sys.argv[5])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
request = b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"

while os.getppid() == PARENT:
    wall = time.time_ns()
    t0 = time.monotonic_ns()
    stage = "connect"
    err = None
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        stage = "exchange"
        s.sendall(request)
        data = b""
        while b"\r\n" not in data and len(data) < 4096:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        status = data.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 200"):
            err = "- exchange unexpected reply %r" % status[:80]
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        err = "%s %s %s" % (e.errno if e.errno is not None else "-", stage, why)
    finally:
        s.close()
    took = time.monotonic_ns() - t0
    print(wall, took, "ok" if err is None else "err " + err, flush=True)
    rest = interval - took / 1e9
    if rest > 0:
        time.sleep(rest)
"#;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn ip_path() -> Result<PathBuf> {
    tool_path("ip").context("ip not found (package iproute2)")
}

/// The system's python3 when there is one: a version manager's shim on `PATH` (pyenv here)
/// adds a wrapper and start-up time, and may pick another interpreter per directory.
pub fn python3() -> Result<PathBuf> {
    let system = Path::new("/usr/bin/python3");
    if system.exists() {
        return Ok(system.to_owned());
    }
    tool_path("python3").context("python3 not found")
}

/// Runs `ip args`, failing with its stderr when it fails; returns stdout.
fn ip(args: &[&str]) -> Result<String> {
    let out = run_blocking(Command::new(ip_path()?).args(args), IP_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`ip`] for teardown: failures are logged, never raised (Drop must go on).
fn cleanup_ip(args: &[&str]) {
    if let Err(e) = ip(args) {
        tracing::warn!("lab cleanup: {e:#}");
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A bpffs folder of a test's own, `/sys/fs/bpf/<prefix>-<pid>-<n>`, removed with everything
/// pinned in it when dropped. A cgroup link whose last pin goes is detached, so the programs a
/// test's agent attached are gone even when that agent never came up or `cleanup` failed. The
/// folders of dead processes (a killed run's) are removed when the next one is made.
#[derive(Debug)]
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    const ROOT: &str = "/sys/fs/bpf";

    /// A path for `prefix` nothing uses (created by whoever pins there first).
    pub fn new(prefix: &str) -> BpffsDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        clear_stale_bpffs(Path::new(Self::ROOT), prefix);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(Self::ROOT).join(format!("{prefix}-{}-{n}", std::process::id()));
        // A dead run whose PID this process has now left it (this process has not made it:
        // `n` is new): its maps must not be taken for a fresh start's.
        let _ = fs::remove_dir_all(&path);
        BpffsDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), "removing test pins: {e}");
        }
    }
}

/// Removes the `<prefix>-<pid>-<n>` folders under `root` of processes no longer running.
fn clear_stale_bpffs(root: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let prefix = format!("{prefix}-");
    for entry in entries.flatten() {
        if left_by_a_dead_run(&entry.file_name().to_string_lossy(), &prefix) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether `name`, `<prefix><pid>-<n>`, is a folder of a process no longer running (not one
/// of another shape).
fn left_by_a_dead_run(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.split('-').next())
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| !pid_alive(pid))
}

/// Whether `pid` is a process that has not exited (a zombie has: it only waits to be reaped).
pub fn process_running(pid: u32) -> bool {
    let state = stat_field(pid, 0);
    !matches!(state.as_deref(), None | Some("Z" | "X"))
}

/// Parent PID from `/proc/<pid>/stat` (field 4).
fn parent_pid(pid: u32) -> Option<u32> {
    stat_field(pid, 1)?.parse().ok()
}

/// Field `n` after the parenthesised command name of `/proc/<pid>/stat` (0: the state, field
/// 3), which may hold spaces and parentheses itself.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(n).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_hosts_come_from_the_zones_and_stay_in_the_lab_ranges() {
        let hosts = lab_host_addrs();
        for want in [
            IpAddr::V4(CILIUM_IO_V4),
            IpAddr::V6(CILIUM_IO_V6),
            crate::zones::GOOGLE_COM_V4.into(),
            crate::zones::GOOGLE_COM_V6.into(),
            crate::zones::BBC_CO_UK_V4.into(),
            crate::zones::BBC_CO_UK_V6.into(),
            crate::zones::EXAMPLE_ORG_V4.into(),
            crate::zones::EDGE_CILIUM_IO_V4[0].into(),
            crate::zones::EDGE_CILIUM_IO_V4[1].into(),
            crate::zones::WWW_GOOGLE_COM_V4.into(),
        ] {
            assert!(hosts.contains(&want), "{want} missing from {hosts:?}");
        }
        assert!(hosts.iter().all(|h| in_lab_net(*h)), "{hosts:?}");
        for transfer in [HOST_V4, INTERNET_V4] {
            assert!(!hosts.contains(&IpAddr::V4(transfer)));
        }
        assert!(!in_lab_net(HOST_V6.into()));
        assert!(!in_lab_net("198.20.0.1".parse().unwrap()));
        assert!(in_lab_net("198.19.0.1".parse().unwrap()));
    }

    #[test]
    fn urls_and_bodies_bracket_ipv6() {
        let v6 = SocketAddr::new(CILIUM_IO_V6.into(), 8080);
        assert_eq!(http_url(v6), "http://[fd00:77::10]:8080/");
        assert_eq!(http_body(v6), "warden-lab host [fd00:77::10]:8080\n");
        let v4 = SocketAddr::new(CILIUM_IO_V4.into(), 80);
        assert_eq!(http_url(v4), "http://198.18.1.10:80/");
    }

    #[test]
    fn attempts_parse_and_ignore_a_torn_last_line() {
        let text = "1700000000000000000 1500000 ok\n\
                    1700000000100000000 20000 err 1 connect Operation not permitted\n\
                    1700000000200000000 1000000000 err - connect timed out\n\
                    1700000000300000000 12";
        let a = parse_attempts(text).unwrap();
        assert_eq!(a.len(), 3);
        assert!(a[0].ok());
        assert_eq!(a[0].elapsed, Duration::from_micros(1500));
        assert_eq!(a[1].errno, Some(1));
        assert_eq!(
            a[1].error.as_deref(),
            Some("connect: Operation not permitted")
        );
        assert_eq!(
            (a[2].errno, a[2].error.as_deref()),
            (None, Some("connect: timed out"))
        );
        assert!(a[1].at > a[0].at);
    }

    #[test]
    fn curl_connect_errors_are_read_from_the_verbose_log() {
        let r = CurlResult {
            exit_code: 7,
            http_code: None,
            body: String::new(),
            stderr: "*   Trying 198.18.1.30:80...\n\
                     * Immediate connect fail for 198.18.1.30: Operation not permitted\n\
                     * Failed to connect to 198.18.1.30 port 80 after 0 ms: Couldn't connect\n"
                .to_owned(),
            elapsed: Duration::ZERO,
        };
        assert!(r.connect_failed() && r.not_permitted() && !r.ok());
        assert_eq!(r.connect_error(), Some("Operation not permitted"));
        let refused = CurlResult {
            stderr: "* connect to ::1 port 82 failed: Connection refused\n".to_owned(),
            ..r
        };
        assert_eq!(refused.connect_error(), Some("Connection refused"));
    }

    #[test]
    fn only_our_own_test_cgroups_are_accepted() {
        let Ok(mount) = cgroup2_mount() else { return };
        assert!(check_ours(&mount).is_err());
        assert!(check_ours(&mount.join("warden-test-1-0")).is_err());
        let other = mount.join(format!("{CGROUP_PREFIX}{}-0/../x", std::process::id()));
        assert!(check_ours(&other).is_err());
    }
}
