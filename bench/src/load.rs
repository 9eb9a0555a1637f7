//! An open-loop UDP load client: sends queries at a fixed rate whatever the server does, and
//! records each query's latency. dnsperf reports only the mean and standard deviation of its
//! latencies and stops sending when too many queries are outstanding (which would hide the
//! losses of a restart), so percentiles and restart losses come from here.
//!
//! Plain threads and blocking sockets, as few as possible because the client shares the
//! machine with the servers it measures: one sender paced by the clock (waking at most every
//! [`TICK`] and sending every query due), one receiver per socket. Query `i` goes out on
//! socket `i % S` with ID `(i / S) mod 65536`; `S` is chosen so an ID comes back round only
//! after twice the timeout, so an answer in time always maps back to the latest query sent
//! with its (socket, ID). Everything is bounded: at most [`MAX_QUERIES`] queries, and the run
//! ends `timeout` after the last send.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use serde::{Deserialize, Serialize};

use crate::lab;
use crate::stats::{Percentiles, percentiles};

/// Upper bound on the queries of one run (memory: 17 bytes each).
pub const MAX_QUERIES: u64 = 4_000_000;
/// An answer later than this after its query counts as lost (clients retry about then).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The sender sleeps at least this long between bursts: waking for every query at tens of
/// thousands per second would cost the machine more than the sending.
const TICK: Duration = Duration::from_micros(100);
const IDS: u64 = 1 << 16;
const NO_ANSWER: u8 = u8::MAX;
const RCODE_NOERROR: u8 = 0;
const RCODE_REFUSED: u8 = 5;
const RCODE_NAMES: [&str; 11] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE",
];

/// One query of the mix, encoded once; its ID is patched per send.
#[derive(Debug, Clone)]
pub struct QueryTemplate {
    wire: Vec<u8>,
    /// Whether the policy allows the name; only meaningful through a policing proxy.
    pub allowed: bool,
}

impl QueryTemplate {
    pub fn new(name: &str, rtype: RecordType, allowed: bool) -> Result<QueryTemplate> {
        let qname = Name::from_ascii(name).with_context(|| format!("bad name {name:?}"))?;
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(qname, rtype));
        let wire = message.to_vec().context("encoding a query")?;
        Ok(QueryTemplate { wire, allowed })
    }

    /// The encoded query (ID as encoded).
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// Every socket binds here: the endpoint's address, for a policing proxy.
    pub source: IpAddr,
    pub rate: u32,
    /// Sent, but left out of the latency figures (caches and sockets warming up).
    pub warmup: Duration,
    pub duration: Duration,
    pub timeout: Duration,
    pub queries: Arc<Vec<QueryTemplate>>,
    /// Check answers against each template's `allowed` (REFUSED for denied names).
    pub check_verdicts: bool,
    /// Source ports (sockets) to spread the queries over at least. The kernel hashes a port
    /// shared by several sockets (SO_REUSEPORT) by the client's address and port: from one
    /// port the whole load lands on one socket, so on one of two processes sharing it.
    pub min_sockets: u64,
}

/// What happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub rate: u32,
    /// Queries sent after the warm-up.
    pub sent: u64,
    pub answered: u64,
    /// Sent − answered in time (no answer, a late one, or a failed send).
    pub lost: u64,
    pub send_errors: u64,
    /// The rate actually achieved by the sender over the whole run.
    pub achieved_rate: f64,
    pub latency: Percentiles,
    /// The same latencies up to the kernel's arrival timestamp of each answer (SO_TIMESTAMPNS)
    /// instead of the moment the client's thread read it: without the client's own wake-up.
    pub latency_at_arrival: Percentiles,
    /// The same latencies from when each query was due (`i / rate` after the start) rather
    /// than when the sender got it out: a sender descheduled on the shared cores sends the
    /// queries due meanwhile in a burst, and the wait they had before leaving counts here.
    #[serde(default)]
    pub latency_from_schedule: Percentiles,
    /// How late the sender got each query out after it was due.
    #[serde(default)]
    pub sender_lag: Percentiles,
    pub rcodes: BTreeMap<String, u64>,
    /// Answers contradicting the policy: an allowed name REFUSED, a denied name NOERROR.
    pub wrong_verdicts: u64,
    /// Send times (ms from the start) of the first and last lost query, over the whole run.
    pub first_loss_ms: Option<u64>,
    pub last_loss_ms: Option<u64>,
    /// The machine's UDP receive-buffer drops (`RcvbufErrors` in /proc/net/snmp) during the
    /// run: a loss with none of these happened elsewhere (no listener, a server that dropped
    /// it).
    pub udp_rcvbuf_errors: u64,
    /// Whose: the drops of each UDP socket of this network namespace during the run, by local
    /// address (the last column of /proc/net/udp and udp6), those with any.
    #[serde(default)]
    pub socket_drops: BTreeMap<String, u64>,
    /// The machine's CPU time while the queries went out (/proc/stat, every process's, the
    /// client's too): what the scenario asks of the shared cores at this rate.
    pub machine_cpu: MachineCpu,
    /// Every latency in µs, sorted (for pooling rounds; not written out).
    #[serde(skip)]
    pub samples: Vec<u32>,
    #[serde(skip)]
    pub arrival_samples: Vec<u32>,
    #[serde(skip)]
    pub schedule_samples: Vec<u32>,
    #[serde(skip)]
    pub lag_samples: Vec<u32>,
}

/// The machine's CPU time over the sends of a run (warm-up included), from /proc/stat. Busy
/// time is wall time less idle, iowait and steal time: a kernel with NO_HZ and tick-based
/// accounting, as the bench's machine runs, measures idle time exactly but samples user and
/// system time at its ticks, which work paced by a timer can dodge (summed from the sampled
/// fields, a run at 5,000 QPS read 0.04 cores busy); steal is time a virtual machine's core
/// did not run at all.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct MachineCpu {
    /// Seconds of all cores busy, added up.
    pub busy_core_seconds: f64,
    /// Seconds of all cores, busy or not (wall time × cores).
    pub core_seconds: f64,
    pub cores: u32,
}

/// /proc/stat's clock ticks per second (USER_HZ): 100 on x86 and arm64 Linux, where the bench
/// runs.
const USER_HZ: f64 = 100.0;

/// One reading of the machine's idle time.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    /// Idle, iowait and steal ticks so far, over all cores.
    idle_ticks: u64,
    cores: u32,
    at: Instant,
}

impl CpuSample {
    /// `None` when /proc/stat cannot be read.
    fn now() -> Option<CpuSample> {
        CpuSample::parse(&std::fs::read_to_string("/proc/stat").ok()?, Instant::now())
    }

    /// The `cpu` line of /proc/stat's `text`, and the number of `cpuN` lines.
    fn parse(text: &str, at: Instant) -> Option<CpuSample> {
        let ticks: Vec<u64> = text
            .lines()
            .find_map(|line| line.strip_prefix("cpu "))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|t| t.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal ...
        if ticks.len() < 8 {
            return None;
        }
        let tick = |index: usize| ticks.get(index).copied().unwrap_or(0);
        let cores = text
            .lines()
            .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
            .count();
        Some(CpuSample {
            idle_ticks: tick(3) + tick(4) + tick(7),
            cores: u32::try_from(cores).unwrap_or(0),
            at,
        })
    }
}

impl MachineCpu {
    /// Zero (no reading) unless both samples were taken.
    fn between(start: Option<CpuSample>, end: Option<CpuSample>) -> MachineCpu {
        let (Some(start), Some(end)) = (start, end) else {
            return MachineCpu::default();
        };
        let core_seconds =
            end.at.saturating_duration_since(start.at).as_secs_f64() * f64::from(end.cores);
        let idle_seconds = end.idle_ticks.saturating_sub(start.idle_ticks) as f64 / USER_HZ;
        MachineCpu {
            busy_core_seconds: (core_seconds - idle_seconds).max(0.0),
            core_seconds,
            cores: end.cores,
        }
    }

    /// Pools another run's.
    fn add(&mut self, other: MachineCpu) {
        self.busy_core_seconds += other.busy_core_seconds;
        self.core_seconds += other.core_seconds;
        self.cores = self.cores.max(other.cores);
    }

    /// Cores kept busy on average (`None` without a reading).
    pub fn busy_cores(&self) -> Option<f64> {
        (self.core_seconds > 0.0)
            .then(|| self.busy_core_seconds / self.core_seconds * f64::from(self.cores))
    }
}

/// `Udp: ... RcvbufErrors` from /proc/net/snmp (0 if unreadable).
fn udp_rcvbuf_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut rows = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// The receive drops of every UDP socket by inode, with its local address: the last column of
/// /proc/net/udp and /proc/net/udp6 (the inode is the tenth), whose addresses are the kernel's
/// words in host order.
fn socket_drops() -> BTreeMap<u64, (String, u64)> {
    let mut drops = BTreeMap::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for row in text.lines().skip(1) {
            let fields: Vec<&str> = row.split_whitespace().collect();
            let (Some(local), Some(inode), Some(count)) =
                (fields.get(1), fields.get(9), fields.last())
            else {
                continue;
            };
            let (Some(address), Ok(inode), Ok(count)) = (
                proc_net_address(local),
                inode.parse::<u64>(),
                count.parse::<u64>(),
            ) else {
                continue;
            };
            drops.insert(inode, (address.to_string(), count));
        }
    }
    drops
}

/// `0100007F:0035` or a 32-digit IPv6 form: each 8 hex digits are a 32-bit word of the
/// address as the kernel stores it, printed in host byte order.
fn proc_net_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if address.len() != 8 && address.len() != 32 {
        return None;
    }
    let mut bytes = Vec::with_capacity(16);
    for word in address.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    // A dual-stack socket bound to an IPv4 address is listed in udp6 as ::ffff:a.b.c.d.
    Some(SocketAddr::new(ip.to_canonical(), port))
}

/// What rose from `before` to `after`, socket by socket, summed by address, those that did (a
/// socket opened during the run counts from zero, one closed takes its drops with it).
fn drops_between(
    before: &BTreeMap<u64, (String, u64)>,
    after: BTreeMap<u64, (String, u64)>,
) -> BTreeMap<String, u64> {
    let mut rose: BTreeMap<String, u64> = BTreeMap::new();
    for (inode, (address, count)) in after {
        let was = before.get(&inode).map_or(0, |(_, count)| *count);
        let by = count.saturating_sub(was);
        if by > 0 {
            *rose.entry(address).or_default() += by;
        }
    }
    rose
}

/// Runs the load to the end; blocking (call from a plain thread or `spawn_blocking`).
pub fn run(spec: &LoadSpec) -> Result<LoadReport> {
    if spec.queries.is_empty() || spec.rate == 0 {
        bail!("a load needs queries and a rate");
    }
    let total = (spec.warmup + spec.duration).as_secs_f64() * f64::from(spec.rate);
    let total = total.ceil() as u64;
    if total > MAX_QUERIES {
        bail!("{total} queries is more than the bound of {MAX_QUERIES}");
    }
    // IDs of a socket come round after S * 65536 queries: at least twice the timeout.
    let in_two_timeouts = (2.0 * spec.timeout.as_secs_f64() * f64::from(spec.rate)).ceil() as u64;
    let socket_count = in_two_timeouts
        .div_ceil(IDS)
        .clamp(1, total.div_ceil(IDS).max(1))
        .max(spec.min_sockets);
    let sockets = (0..socket_count)
        .map(|_| bind(spec.source))
        .collect::<Result<Vec<_>>>()?;
    let state = Arc::new(State {
        sent_ns: (0..total).map(|_| AtomicU64::new(0)).collect(),
        sent_count: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        recv_ns: (0..total).map(|_| AtomicU64::new(0)).collect(),
        arrival_ns: (0..total).map(|_| AtomicU64::new(0)).collect(),
        rcode: (0..total).map(|_| AtomicU8::new(NO_ANSWER)).collect(),
        send_failed: (0..total).map(|_| AtomicBool::new(false)).collect(),
        stop: AtomicBool::new(false),
        start: Instant::now(),
        start_unix_ns: unix_ns(SystemTime::now()),
    });

    let mut receivers = Vec::new();
    for (index, socket) in sockets.iter().enumerate() {
        let socket = socket.try_clone().context("cloning a socket")?;
        let state = state.clone();
        let target = spec.target;
        receivers.push(thread::spawn(move || {
            receive(&socket, index as u64, socket_count, target, &state);
        }));
    }

    let drops_before = udp_rcvbuf_errors();
    let socket_drops_before = socket_drops();
    let cpu_before = CpuSample::now();
    let sending = send(spec, &sockets, socket_count, total, &state);
    let machine_cpu = MachineCpu::between(cpu_before, CpuSample::now());
    // Answers may still arrive for the last queries: wait for them, or for the timeout.
    let waiting = Instant::now();
    while waiting.elapsed() < spec.timeout && state.answered.load(Ordering::Relaxed) < total {
        thread::sleep(Duration::from_millis(10));
    }
    state.stop.store(true, Ordering::Relaxed);
    for receiver in receivers {
        let _ = receiver.join();
    }
    let send_elapsed = sending?;
    let mut out = report(spec, total, send_elapsed, &state);
    out.udp_rcvbuf_errors = udp_rcvbuf_errors().saturating_sub(drops_before);
    out.socket_drops = drops_between(&socket_drops_before, socket_drops());
    out.machine_cpu = machine_cpu;
    Ok(out)
}

/// The flag that makes the bench's binary a load child (see [`run_in_cgroup`]).
pub const CHILD_FLAG: &str = "--load-child";

/// [`run`] in a child process of the bench's own binary started inside `cgroup`: for a client
/// that must live where the bench does not, in a workload's cgroup whose programs redirect its
/// queries (a socket belongs to the cgroup of the process that opened it, and a process of
/// cgroup v2 moves with all its threads). The child sends the bench's mix
/// ([`lab::templates`]), and nothing else: a spec with other queries is refused.
pub fn run_in_cgroup(spec: &LoadSpec, cgroup: &Path) -> Result<LoadReport> {
    let mix = lab::templates()?;
    let same_mix = spec.queries.len() == mix.len()
        && spec
            .queries
            .iter()
            .zip(mix.iter())
            // The ID (the first two bytes) is patched per send.
            .all(|(ours, child)| {
                ours.wire.get(2..) == child.wire.get(2..) && ours.allowed == child.allowed
            });
    ensure!(
        same_mix,
        "a load client in a cgroup sends the bench's mix only"
    );
    let binary = std::env::current_exe().context("finding the bench's own binary")?;
    let mut command = Command::new(binary);
    command.arg(CHILD_FLAG).args([
        spec.target.to_string(),
        spec.source.to_string(),
        spec.rate.to_string(),
        spec.warmup.as_micros().to_string(),
        spec.duration.as_micros().to_string(),
        spec.timeout.as_micros().to_string(),
        spec.check_verdicts.to_string(),
        spec.min_sockets.to_string(),
    ]);
    let limit = spec.warmup + spec.duration + spec.timeout + Duration::from_secs(30);
    let output = warden_tests::lab::run_in_cgroup(cgroup, &mut command, limit)
        .with_context(|| format!("the load client in {}", cgroup.display()))?;
    ensure!(
        output.status.success(),
        "the load client in {} failed ({}): {}",
        cgroup.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let child: ChildReport =
        serde_json::from_slice(&output.stdout).context("reading the load client's report")?;
    Ok(child.into_report())
}

/// The child's side of [`run_in_cgroup`]: runs the load its arguments describe and prints the
/// report, samples included, as JSON.
pub fn child_main(args: &[String]) -> Result<()> {
    let [
        target,
        source,
        rate,
        warmup,
        duration,
        timeout,
        check_verdicts,
        min_sockets,
    ] = args
    else {
        bail!("{CHILD_FLAG} needs 8 arguments, got {}", args.len());
    };
    let micros = |field: &str, value: &str| -> Result<Duration> {
        let value: u64 = value
            .parse()
            .with_context(|| format!("{CHILD_FLAG}: {field} {value:?}"))?;
        Ok(Duration::from_micros(value))
    };
    let spec = LoadSpec {
        target: target.parse().context("target")?,
        source: source.parse().context("source")?,
        rate: rate.parse().context("rate")?,
        warmup: micros("warmup", warmup)?,
        duration: micros("duration", duration)?,
        timeout: micros("timeout", timeout)?,
        queries: lab::templates()?,
        check_verdicts: check_verdicts.parse().context("check_verdicts")?,
        min_sockets: min_sockets.parse().context("min_sockets")?,
    };
    let mut report = run(&spec)?;
    let child = ChildReport {
        samples: std::mem::take(&mut report.samples),
        arrival_samples: std::mem::take(&mut report.arrival_samples),
        schedule_samples: std::mem::take(&mut report.schedule_samples),
        lag_samples: std::mem::take(&mut report.lag_samples),
        report,
    };
    println!("{}", serde_json::to_string(&child)?);
    Ok(())
}

/// A report with the samples it leaves out of the results' JSON, which pooling needs.
#[derive(Serialize, Deserialize)]
struct ChildReport {
    report: LoadReport,
    samples: Vec<u32>,
    arrival_samples: Vec<u32>,
    schedule_samples: Vec<u32>,
    lag_samples: Vec<u32>,
}

impl ChildReport {
    fn into_report(self) -> LoadReport {
        LoadReport {
            samples: self.samples,
            arrival_samples: self.arrival_samples,
            schedule_samples: self.schedule_samples,
            lag_samples: self.lag_samples,
            ..self.report
        }
    }
}

struct State {
    /// Nanoseconds from `start` to the send, +1 so 0 means "not sent".
    sent_ns: Vec<AtomicU64>,
    /// Queries sent so far (their `sent_ns` are set).
    sent_count: AtomicU64,
    /// Queries with an answer (in time or not), to end the run early.
    answered: AtomicU64,
    recv_ns: Vec<AtomicU64>,
    /// The kernel's receive timestamp of the answer, on the same scale as `sent_ns` (0: none).
    arrival_ns: Vec<AtomicU64>,
    rcode: Vec<AtomicU8>,
    send_failed: Vec<AtomicBool>,
    stop: AtomicBool,
    start: Instant,
    /// The wall clock at `start`: kernel timestamps are wall-clock times.
    start_unix_ns: u64,
}

impl State {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1
    }

    /// A kernel timestamp on the scale of `now_ns` (0 when it predates the start).
    fn since_start_ns(&self, unix_ns: u64) -> u64 {
        unix_ns
            .checked_sub(self.start_unix_ns)
            .map_or(0, |since| since.saturating_add(1))
    }
}

fn unix_ns(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

fn bind(source: IpAddr) -> Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(SocketAddr::new(source, 0)),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Answers must not be dropped here and blamed on the server; the kernel caps this at
    // net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(8 << 20);
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .with_context(|| format!("binding a UDP socket on {source}"))?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    // Each answer's arrival time, stamped by the kernel before any thread of ours runs.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimestampns,
        &true,
    )
    .context("enabling SO_TIMESTAMPNS")?;
    Ok(socket)
}

/// Paces the queries by the clock; returns how long sending took.
fn send(
    spec: &LoadSpec,
    sockets: &[UdpSocket],
    socket_count: u64,
    total: u64,
    state: &State,
) -> Result<Duration> {
    // The default 50 µs timer slack would batch queries at the higher rates.
    let _ = nix::sys::prctl::set_timerslack(1_000);
    let rate = u128::from(spec.rate);
    let mut buffer = Vec::with_capacity(512);
    let mut next = 0u64;
    while next < total {
        let elapsed = state.start.elapsed().as_nanos();
        // Every query whose slot has come, at once: a late sender catches up.
        let due = u64::try_from(elapsed * rate / 1_000_000_000 + 1)
            .unwrap_or(u64::MAX)
            .min(total);
        while next < due {
            let template = &spec.queries[(next as usize) % spec.queries.len()];
            let socket = &sockets[(next % socket_count) as usize];
            let id = u16::try_from((next / socket_count) % IDS).context("query ID")?;
            buffer.clear();
            buffer.extend_from_slice(&template.wire);
            buffer[..2].copy_from_slice(&id.to_be_bytes());
            let index = next as usize;
            state.sent_ns[index].store(state.now_ns(), Ordering::Relaxed);
            // Published before the send, so a receiver never sees an answer to an unsent query.
            state.sent_count.store(next + 1, Ordering::Release);
            if socket.send_to(&buffer, spec.target).is_err() {
                state.send_failed[index].store(true, Ordering::Relaxed);
            }
            next += 1;
        }
        if next < total {
            let slot = Duration::from_nanos(
                u64::try_from(u128::from(next) * 1_000_000_000 / rate).unwrap_or(u64::MAX),
            );
            if let Some(wait) = slot.checked_sub(state.start.elapsed()) {
                thread::sleep(wait.max(TICK));
            }
        }
    }
    Ok(state.start.elapsed())
}

fn receive(socket: &UdpSocket, index: u64, socket_count: u64, target: SocketAddr, state: &State) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    let mut buffer = [0u8; 4096];
    let mut control = nix::cmsg_space!(nix::sys::time::TimeSpec);
    while !state.stop.load(Ordering::Relaxed) {
        let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
        let received = recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::empty(),
        );
        // Timeout (so `stop` is seen) or an ICMP error: nothing to record.
        let Ok(message) = received else {
            continue;
        };
        let now = state.now_ns();
        let length = message.bytes;
        let from = message.address.and_then(|address| {
            address
                .as_sockaddr_in()
                .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                .or_else(|| {
                    address
                        .as_sockaddr_in6()
                        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                })
        });
        let arrival = message
            .cmsgs()
            .ok()
            .into_iter()
            .flatten()
            .find_map(|cmsg| match cmsg {
                ControlMessageOwned::ScmTimestampns(stamp) => {
                    let ns =
                        i128::from(stamp.tv_sec()) * 1_000_000_000 + i128::from(stamp.tv_nsec());
                    u64::try_from(ns).ok()
                }
                _ => None,
            })
            .map_or(0, |unix| state.since_start_ns(unix));
        let Some(from) = from else {
            continue;
        };
        let buffer = &buffer[..length.min(buffer.len())];
        // Only answers (QR set) from the server asked.
        if from != target || buffer.len() < 12 || buffer[2] & 0x80 == 0 {
            continue;
        }
        let id = u64::from(u16::from_be_bytes([buffer[0], buffer[1]]));
        // The latest query sent with this (socket, ID).
        let first = id * socket_count + index;
        let period = socket_count * IDS;
        let sent = state.sent_count.load(Ordering::Acquire);
        if sent <= first {
            continue;
        }
        let query = first + (sent - 1 - first) / period * period;
        let Some(slot) = state.recv_ns.get(query as usize) else {
            continue;
        };
        // The first answer counts; a duplicate does not move it.
        if slot
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            state.rcode[query as usize].store(buffer[3] & 0x0f, Ordering::Relaxed);
            // Not after the read (the wall clock and the monotonic one are read apart); 0 when
            // the kernel gave no stamp.
            if let Some(arrival_slot) = state.arrival_ns.get(query as usize) {
                arrival_slot.store(arrival.min(now), Ordering::Relaxed);
            }
            state.answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn report(spec: &LoadSpec, total: u64, send_elapsed: Duration, state: &State) -> LoadReport {
    let warmup_ns = u64::try_from(spec.warmup.as_nanos()).unwrap_or(u64::MAX);
    let timeout_ns = u64::try_from(spec.timeout.as_nanos()).unwrap_or(u64::MAX);
    let mut out = LoadReport {
        rate: spec.rate,
        achieved_rate: total as f64 / send_elapsed.as_secs_f64().max(1e-9),
        ..LoadReport::default()
    };
    let mut latencies: Vec<u32> = Vec::with_capacity(total as usize);
    let mut at_arrival: Vec<u32> = Vec::with_capacity(total as usize);
    let mut from_schedule: Vec<u32> = Vec::with_capacity(total as usize);
    let mut lags: Vec<u32> = Vec::with_capacity(total as usize);
    let micros = |ns: u64| u32::try_from(ns / 1_000).unwrap_or(u32::MAX);
    for i in 0..total as usize {
        let sent = state.sent_ns[i].load(Ordering::Relaxed);
        let due = u64::try_from(i as u128 * 1_000_000_000 / u128::from(spec.rate.max(1)))
            .unwrap_or(u64::MAX);
        let received = state.recv_ns[i].load(Ordering::Relaxed);
        let failed = state.send_failed[i].load(Ordering::Relaxed);
        let in_time = !failed && received != 0 && received - sent <= timeout_ns;
        if !in_time {
            let at = sent / 1_000_000;
            out.first_loss_ms.get_or_insert(at);
            out.last_loss_ms = Some(at);
        }
        if sent < warmup_ns {
            continue;
        }
        out.sent += 1;
        lags.push(micros(sent.saturating_sub(due)));
        if failed {
            out.send_errors += 1;
        }
        if !in_time {
            out.lost += 1;
            continue;
        }
        out.answered += 1;
        latencies.push(micros(received - sent));
        from_schedule.push(micros(received.saturating_sub(due)));
        let arrival = state.arrival_ns[i].load(Ordering::Relaxed);
        if arrival != 0 {
            at_arrival
                .push(u32::try_from(arrival.saturating_sub(sent) / 1_000).unwrap_or(u32::MAX));
        }
        let rcode = state.rcode[i].load(Ordering::Relaxed);
        let name = RCODE_NAMES
            .get(usize::from(rcode))
            .map_or_else(|| format!("RCODE{rcode}"), |n| (*n).to_owned());
        if spec.check_verdicts {
            let template = &spec.queries[i % spec.queries.len()];
            // An allowed name refused, or a denied name answered: SERVFAIL and the like are
            // failures, not verdicts, and show in `rcodes`.
            let wrong = if template.allowed {
                rcode == RCODE_REFUSED
            } else {
                rcode == RCODE_NOERROR
            };
            if wrong {
                out.wrong_verdicts += 1;
            }
        }
        *out.rcodes.entry(name).or_default() += 1;
    }
    out.latency = percentiles(&mut latencies);
    out.samples = latencies;
    out.latency_at_arrival = percentiles(&mut at_arrival);
    out.arrival_samples = at_arrival;
    out.latency_from_schedule = percentiles(&mut from_schedule);
    out.schedule_samples = from_schedule;
    out.sender_lag = percentiles(&mut lags);
    out.lag_samples = lags;
    out
}

impl LoadReport {
    /// Pools another run of the same load into this one (interleaved rounds).
    pub fn merge(&mut self, other: LoadReport) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.lost += other.lost;
        self.send_errors += other.send_errors;
        self.wrong_verdicts += other.wrong_verdicts;
        self.udp_rcvbuf_errors += other.udp_rcvbuf_errors;
        for (address, count) in other.socket_drops {
            *self.socket_drops.entry(address).or_default() += count;
        }
        self.machine_cpu.add(other.machine_cpu);
        self.achieved_rate = self.achieved_rate.min(other.achieved_rate);
        for (rcode, count) in other.rcodes {
            *self.rcodes.entry(rcode).or_default() += count;
        }
        // Loss times are per run; keep the first run's.
        self.samples.extend(other.samples);
        self.latency = percentiles(&mut self.samples);
        self.arrival_samples.extend(other.arrival_samples);
        self.latency_at_arrival = percentiles(&mut self.arrival_samples);
        self.schedule_samples.extend(other.schedule_samples);
        self.latency_from_schedule = percentiles(&mut self.schedule_samples);
        self.lag_samples.extend(other.lag_samples);
        self.sender_lag = percentiles(&mut self.lag_samples);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn proc_net_addresses_read_as_the_kernel_prints_them() {
        let v4 = proc_net_address("0200197F:0035").unwrap();
        assert_eq!(v4, "127.25.0.2:53".parse().unwrap());
        let v6 = proc_net_address("00000000000000000000000001000000:1F90").unwrap();
        assert_eq!(v6, "[::1]:8080".parse().unwrap());
        let mapped = proc_net_address("0000000000000000FFFF00000200197F:0035").unwrap();
        assert_eq!(mapped, "127.25.0.2:53".parse().unwrap());
        for odd in [
            "",
            "0100007F",
            "0100007F:zz",
            "01007F:0035",
            "XX00007F:0035",
        ] {
            assert_eq!(proc_net_address(odd), None, "{odd}");
        }
    }

    /// A socket that overflows while the load runs is found by the drops column.
    #[test]
    fn a_socket_that_overflows_is_named_by_its_drops() {
        let before = socket_drops();
        let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        // The kernel's least, a few packets.
        full.set_recv_buffer_size(1).unwrap();
        full.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let full = UdpSocket::from(full);
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..200 {
            let _ = sender.send_to(&[0; 512], full.local_addr().unwrap());
        }
        let dropped = drops_between(&before, socket_drops());
        let count = dropped.get(&full.local_addr().unwrap().to_string());
        assert!(count.is_some_and(|count| *count > 0), "{dropped:?}");
    }

    /// By socket, not address: a socket reopened on its address (a restarted server) counts
    /// from zero, and two on one address (SO_REUSEPORT) add up.
    #[test]
    fn drops_between_keeps_what_rose_socket_by_socket() {
        let on = |address: &str, count: u64| (address.to_owned(), count);
        let before = BTreeMap::from([(1, on("a", 5)), (2, on("b", 7)), (3, on("c", 40))]);
        let after = BTreeMap::from([
            (1, on("a", 5)),
            (2, on("b", 9)),
            // c's socket closed, another opened on its address.
            (4, on("c", 3)),
            (5, on("b", 1)),
        ]);
        let rose = drops_between(&before, after);
        assert_eq!(
            rose,
            BTreeMap::from([("b".to_owned(), 3), ("c".to_owned(), 3)])
        );
    }

    /// A tiny echo "server" answering every query with its RCODE set, on loopback.
    #[test]
    fn paces_counts_and_maps_answers_back() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let target = server.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let serving = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut buffer = [0u8; 512];
                let mut seen = 0u64;
                let mut ports = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = server.recv_from(&mut buffer) {
                        seen += 1;
                        ports.insert(from.port());
                        // Drop every tenth query; answer the rest REFUSED.
                        if seen.is_multiple_of(10) {
                            continue;
                        }
                        buffer[2] |= 0x80;
                        buffer[3] = (buffer[3] & 0xf0) | 5;
                        let _ = server.send_to(&buffer[..n], from);
                    }
                }
                ports.len()
            })
        };
        let spec = LoadSpec {
            target,
            source: "127.0.0.1".parse().unwrap(),
            rate: 2_000,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(500),
            // Far past a loaded machine's late answer (hundreds of ms), which would count as
            // lost. The run waits it out after the last send: every tenth query goes unanswered.
            timeout: Duration::from_secs(2),
            queries: Arc::new(vec![
                QueryTemplate::new("a.example.", RecordType::A, false).unwrap(),
            ]),
            check_verdicts: true,
            // Spread over three source ports, each answer still mapped back to its query.
            min_sockets: 3,
        };
        let report = run(&spec).unwrap();
        stop.store(true, Ordering::Relaxed);
        assert_eq!(serving.join().unwrap(), 3, "source ports");
        assert_eq!(report.sent, 1_000);
        assert_eq!(report.lost, 100, "{report:?}");
        assert_eq!(report.answered, 900);
        assert_eq!(report.rcodes["REFUSED"], 900);
        assert_eq!(report.wrong_verdicts, 0);
        assert!(report.latency.p50_us > 0.0);
        // Every answer has its kernel arrival time, and it is never after the thread read it.
        assert_eq!(report.latency_at_arrival.samples, 900);
        assert!(report.latency_at_arrival.p50_us <= report.latency.p50_us);
        assert!(report.latency_at_arrival.max_us <= report.latency.max_us);
        // Sent when due or later: from the schedule is never shorter.
        assert_eq!(report.latency_from_schedule.samples, 900);
        assert!(report.latency_from_schedule.p50_us >= report.latency.p50_us);
        assert_eq!(report.sender_lag.samples, report.sent);
        // 1,000 queries due over 0.5 s: a sender stalled 400 ms before the last still makes
        // this, one pacing at half the rate (about 1,000 per second) does not.
        assert!(report.achieved_rate > 1_100.0, "{report:?}");
    }

    /// The results' JSON leaves the samples out; the child's report must carry them, or
    /// pooling the rounds of a redirected client would pool nothing.
    #[test]
    fn a_child_report_keeps_its_samples() {
        let mut samples = vec![30, 10, 20];
        let report = LoadReport {
            rate: 1_000,
            sent: 3,
            answered: 3,
            latency: percentiles(&mut samples),
            rcodes: [("NOERROR".to_owned(), 3)].into(),
            ..LoadReport::default()
        };
        let child = ChildReport {
            report: report.clone(),
            samples: samples.clone(),
            arrival_samples: vec![5, 6, 7],
            schedule_samples: vec![40, 50, 60],
            lag_samples: vec![1, 2, 3],
        };
        let back: ChildReport =
            serde_json::from_str(&serde_json::to_string(&child).unwrap()).unwrap();
        let mut pooled = report.clone();
        pooled.samples = samples;
        pooled.merge(back.into_report());
        assert_eq!(pooled.sent, 6);
        assert_eq!(pooled.samples.len(), 6);
        assert_eq!(pooled.arrival_samples, [5, 6, 7]);
        // Those of the schedule too: (g)'s rounds once pooled none.
        assert_eq!(pooled.latency_from_schedule.samples, 3);
        assert_eq!(pooled.sender_lag.samples, 3);
        assert_eq!(pooled.latency.samples, 6);
        assert_eq!(pooled.rcodes["NOERROR"], 6);
    }

    #[test]
    fn machine_cpu_is_wall_time_less_idle_time_over_every_core() {
        let start = Instant::now();
        let before = CpuSample::parse(
            "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n\
             cpu1 50 0 25 400 25 0 0 0 0 0\nintr 1 2 3\n",
            start,
        );
        assert_eq!(before.map(|b| (b.idle_ticks, b.cores)), Some((850, 2)));
        // 2 s later (4 core-seconds): 1.5 s idle, iowait and steal, whatever the sampled
        // fields say.
        let after = CpuSample::parse(
            "cpu  100 0 50 960 20 0 0 20 0 0\ncpu0 1\ncpu1 1\n",
            start + Duration::from_secs(2),
        );
        let mut run = MachineCpu::between(before, after);
        assert!((run.busy_core_seconds - 2.5).abs() < 1e-9, "{run:?}");
        assert!(
            run.busy_cores()
                .is_some_and(|busy| (busy - 1.25).abs() < 1e-9)
        );
        // Pooled with a run that kept one core busy for 4 s of 8 core-seconds.
        run.add(MachineCpu {
            busy_core_seconds: 4.0,
            core_seconds: 8.0,
            cores: 2,
        });
        assert!(
            run.busy_cores()
                .is_some_and(|busy| (busy - 6.5 / 12.0 * 2.0).abs() < 1e-9)
        );
        assert_eq!(MachineCpu::default().busy_cores(), None);
        // An unreadable start leaves no reading rather than one counted from boot.
        assert_eq!(MachineCpu::between(None, after).busy_cores(), None);
        assert!(CpuSample::parse("intr 1 2 3\n", start).is_none());
    }

    #[test]
    fn a_child_refuses_a_malformed_spec() {
        let args: Vec<String> = [
            "127.0.0.1:53",
            "127.0.0.1",
            "100",
            "0",
            "x",
            "0",
            "true",
            "1",
        ]
        .map(str::to_owned)
        .to_vec();
        let error = child_main(&args).unwrap_err();
        assert!(format!("{error:#}").contains("duration"), "{error:#}");
        assert!(child_main(&args[..3]).is_err());
    }
}
