//! Test lab: a cgroup subtree, a bpffs pin directory and a network namespace of the test's
//! own, all removed on drop (even when the test fails); servers running in the namespace on
//! threads of this process; and probes: this test binary re-executed as a child that moves
//! itself into a test cgroup and namespace, does one network operation and prints the result.
//!
//! Nothing here touches a cgroup, namespace or process the test did not create: programs are
//! attached only at the lab's own cgroup, and traffic only goes to the lab's namespace.

// Test support: a failing setup step should fail the test on the spot, like in the tests.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use warden_datapath::{Datapath, DatapathOptions, RedirectRecord, RedirectSource};

/// Addresses inside every lab namespace (on its `lo`; not 127/8, so policy applies).
pub const NS_V4: &str = "10.213.0.1";
pub const NS_V6: &str = "fd00:213::1";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why privileged tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (the datapath tests need CAP_BPF, CAP_NET_ADMIN, cgroups)".into());
    }
    if Datapath::detect_cgroup_root().is_err() {
        return Some("no cgroup v2 hierarchy on this host".into());
    }
    if Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        return Some("`ip` (iproute2) is missing".into());
    }
    None
}

/// Prints why the test is skipped and returns true when it must be.
#[macro_export]
macro_rules! skip_unless_privileged {
    () => {
        if let Some(reason) = support::skip_reason() {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A cgroup subtree, bpffs directory and network namespace owned by one test.
pub struct Lab {
    pub name: String,
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
    pub netns: String,
    cgroups: Mutex<Vec<PathBuf>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Lab {
    pub fn new() -> Lab {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("warden-test-{}-{n}", std::process::id());
        let mount = Datapath::detect_cgroup_root().expect("cgroup2 mount");
        let lab = Lab {
            cgroup_root: mount.join(&name),
            bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
            netns: name.clone(),
            name,
            cgroups: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        };
        fs::create_dir(&lab.cgroup_root).expect("create the lab cgroup");
        lab.cgroups.lock().unwrap().push(lab.cgroup_root.clone());
        run("ip", &["netns", "add", &lab.netns]).expect("ip netns add");
        run("ip", &["-n", &lab.netns, "link", "set", "lo", "up"]).expect("lo up");
        run(
            "ip",
            &[
                "-n",
                &lab.netns,
                "addr",
                "add",
                &format!("{NS_V4}/32"),
                "dev",
                "lo",
            ],
        )
        .expect("add v4");
        run(
            "ip",
            &[
                "-n",
                &lab.netns,
                "addr",
                "add",
                &format!("{NS_V6}/128"),
                "dev",
                "lo",
            ],
        )
        .expect("add v6");
        lab
    }

    /// A path in a scratch folder of the lab's own (removed on drop).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(&self.name);
        fs::create_dir_all(&dir).expect("scratch dir");
        dir.join(name)
    }

    pub fn options(&self) -> DatapathOptions {
        DatapathOptions {
            cgroup_root: Some(self.cgroup_root.clone()),
            bpffs: self.bpffs.clone(),
        }
    }

    /// Creates `rel` (may be nested, e.g. "a/b") under the lab's cgroup.
    pub fn cgroup(&self, rel: &str) -> PathBuf {
        let mut path = self.cgroup_root.clone();
        for part in rel.split('/') {
            path = path.join(part);
            if !path.exists() {
                fs::create_dir(&path).expect("create a test cgroup");
                self.cgroups.lock().unwrap().push(path.clone());
            }
        }
        path
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// Runs `body` on a thread inside the lab's namespace; `body` binds, signals readiness
    /// through its return value, and the returned closure serves until the lab stops.
    fn spawn_in_netns<F, S>(&self, setup: F)
    where
        F: FnOnce(Arc<AtomicBool>) -> std::io::Result<S> + Send + 'static,
        S: FnOnce() + Send + 'static,
    {
        let netns = self.netns_path();
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = channel();
        let handle = std::thread::spawn(move || {
            let ns = File::open(&netns).expect("open the lab netns");
            // setns changes this thread only: the rest of the test process stays put.
            setns(ns, CloneFlags::CLONE_NEWNET).expect("setns");
            match setup(stop) {
                Ok(serve) => {
                    ready_tx.send(Ok(())).ok();
                    serve();
                }
                Err(e) => {
                    ready_tx.send(Err(e.to_string())).ok();
                }
            }
        });
        ready_rx
            .recv()
            .expect("server thread")
            .expect("server setup");
        self.threads.lock().unwrap().push(handle);
    }

    /// A TCP server in the namespace that accepts and closes connections.
    pub fn tcp_server(&self, addr: SocketAddr) {
        self.spawn_in_netns(move |stop| {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => drop(stream),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        });
    }

    /// A UDP sink in the namespace: every datagram's payload goes to the returned channel.
    pub fn udp_sink(&self, addr: SocketAddr) -> Receiver<Vec<u8>> {
        let (tx, rx) = channel();
        self.spawn_in_netns(move |stop| {
            let socket = UdpSocket::bind(addr)?;
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
            Ok(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, _)) = socket.recv_from(&mut buf) {
                        tx.send(buf[..n].to_vec()).ok();
                    }
                }
            })
        });
        rx
    }

    /// A TCP server in the namespace that reads every connection to its end: each read's bytes
    /// go to the returned channel.
    pub fn tcp_sink(&self, addr: SocketAddr) -> Receiver<Vec<u8>> {
        let (tx, rx) = channel();
        self.spawn_in_netns(move |stop| {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(move || {
                let mut streams: Vec<TcpStream> = Vec::new();
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((stream, _)) = listener.accept() {
                        stream.set_nonblocking(true).ok();
                        streams.push(stream);
                    }
                    for stream in &mut streams {
                        if let Ok(n) = stream.read(&mut buf)
                            && n > 0
                        {
                            tx.send(buf[..n].to_vec()).ok();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        });
        rx
    }

    /// A tiny DNS responder in the namespace on UDP and TCP `addr`: answers every query with
    /// A 192.0.2.99 and reports (proto, client address, redirect record found on arrival).
    pub fn dns_responder(&self, addr: SocketAddr, dp: Datapath) -> Receiver<DnsSeen> {
        let (tx, rx) = channel();
        let dp_udp = dp.clone();
        let tx_udp = tx.clone();
        self.spawn_in_netns(move |stop| {
            let socket = UdpSocket::bind(addr)?;
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
            Ok(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, client)) = socket.recv_from(&mut buf) {
                        let lookup = dp_udp.redirect_record(client, 17).ok();
                        tx_udp
                            .send(DnsSeen {
                                proto: 17,
                                client,
                                record: lookup.and_then(|l| l.record),
                                source: lookup.map(|l| l.source),
                            })
                            .ok();
                        if let Some(reply) = dns_reply(&buf[..n]) {
                            socket.send_to(&reply, client).ok();
                        }
                    }
                }
            })
        });
        self.spawn_in_netns(move |stop| {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, client)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    stream.set_nonblocking(false).ok();
                    stream.set_read_timeout(Some(Duration::from_secs(3))).ok();
                    let lookup = dp.redirect_record(client, 6).ok();
                    tx.send(DnsSeen {
                        proto: 6,
                        client,
                        record: lookup.and_then(|l| l.record),
                        source: lookup.map(|l| l.source),
                    })
                    .ok();
                    let mut len = [0u8; 2];
                    if stream.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if stream.read_exact(&mut query).is_err() {
                        continue;
                    }
                    if let Some(reply) = dns_reply(&query) {
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&reply);
                        stream.write_all(&framed).ok();
                    }
                }
            })
        });
        rx
    }

    /// Runs this test binary as a probe inside `cgroup` and the lab namespace.
    pub fn probe(&self, cgroup: &Path, command: &str) -> Probe {
        self.probe_with(cgroup, command, true)
    }

    /// A probe in `cgroup`, in the host namespace when `netns` is false.
    pub fn probe_with(&self, cgroup: &Path, command: &str, netns: bool) -> Probe {
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", "probe_child", "--nocapture", "--test-threads=1"])
            .env("WARDEN_PROBE", command)
            .env("WARDEN_PROBE_CGROUP", cgroup)
            .stdin(Stdio::null());
        if netns {
            cmd.env("WARDEN_PROBE_NETNS", self.netns_path());
        }
        let out = output_within(cmd, PROBE_DEADLINE, command);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut values = BTreeMap::new();
        for line in stdout.lines() {
            // libtest prints "test probe_child ... " before the first line of output.
            if let Some(at) = line.find("PROBE ")
                && let Some((k, v)) = line[at + 6..].split_once('=')
            {
                values.insert(k.to_string(), v.to_string());
            }
        }
        Probe {
            values,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `program args...` inside `cgroup` and the lab namespace (through nsenter).
    pub fn run_in(&self, cgroup: &Path, program: &str, args: &[&str]) -> std::process::Output {
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec nsenter --net='{}' \"$@\"",
            cgroup.display(),
            self.netns_path().display()
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn sh")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.lock().unwrap().drain(..) {
            t.join().ok();
        }
        // Links first (detaching the programs from our cgroups), then pins.
        if let Err(e) = Datapath::cleanup(&self.options()) {
            eprintln!("lab cleanup: datapath: {e}");
        }
        let _ = fs::remove_dir_all(&self.bpffs);
        let mut cgroups = self.cgroups.lock().unwrap();
        // Deepest first; probes have exited (they are waited for), so the cgroups are empty.
        cgroups.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for cg in cgroups.drain(..) {
            let deadline = Instant::now() + Duration::from_secs(2);
            while fs::remove_dir(&cg).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = run("ip", &["netns", "del", &self.netns]);
        let _ = fs::remove_dir_all(std::env::temp_dir().join(&self.name));
    }
}

/// What the DNS responder saw.
#[derive(Debug, Clone)]
pub struct DnsSeen {
    pub proto: u8,
    pub client: SocketAddr,
    pub record: Option<RedirectRecord>,
    /// Where the record was looked up (`None` if the lookup failed).
    pub source: Option<RedirectSource>,
}

/// A probe's output: `PROBE key=value` lines.
#[derive(Debug)]
pub struct Probe {
    pub values: BTreeMap<String, String>,
    pub stdout: String,
    pub stderr: String,
}

impl Probe {
    pub fn get(&self, key: &str) -> &str {
        self.values.get(key).map(String::as_str).unwrap_or_else(|| {
            panic!(
                "probe printed no {key}\nstdout:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// A DNS query for example.test. A.
pub fn dns_query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
    q
}

/// Answers `query` with its question and A 192.0.2.99 (additional records dropped).
pub fn dns_reply(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += usize::from(query[end]) + 1;
    }
    end += 5; // root label, type, class
    let mut reply = query.get(..end)?.to_vec();
    reply[2] = 0x81; // QR, RD
    reply[3] = 0x80; // RA
    reply[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 99]);
    Some(reply)
}

/// An unconnected UDP socket of `server`'s family on an ephemeral port, reads timing out
/// after 3 s.
fn udp_socket_for(server: SocketAddr) -> UdpSocket {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(bind).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket
}

/// The probe side: runs when this binary is started by [`Lab::probe`].
pub fn run_probe() {
    let Ok(command) = std::env::var("WARDEN_PROBE") else {
        return;
    };
    let cgroup = std::env::var("WARDEN_PROBE_CGROUP").expect("probe cgroup");
    fs::write(
        Path::new(&cgroup).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("join the probe cgroup");
    if let Ok(netns) = std::env::var("WARDEN_PROBE_NETNS") {
        let ns = File::open(&netns).expect("open netns");
        setns(ns, CloneFlags::CLONE_NEWNET).expect("setns");
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    let addr = |i: usize| -> SocketAddr { words[i].parse().expect("probe address") };
    match words[0] {
        // TCP connect; result=ok | result=err<errno>, and how long it took.
        "tcp" => {
            let start = Instant::now();
            let r = TcpStream::connect_timeout(&addr(1), Duration::from_secs(3)).map(drop);
            report("result", r);
            println!("PROBE ms={}", start.elapsed().as_millis());
        }
        // One unconnected UDP socket asks the first address (redirected), then the second (its
        // DNS target itself): answered=<both answered>.
        "udp-dns-then-target" => {
            let socket = udp_socket_for(addr(1));
            let mut buf = [0u8; 512];
            let mut answered = true;
            for server in [addr(1), addr(2)] {
                answered &= socket.send_to(&dns_query(), server).is_ok()
                    && socket.recv_from(&mut buf).is_ok();
            }
            println!("PROBE answered={answered}");
        }
        // One IPv4 UDP socket connected to the first address (redirected) asks it, then sends
        // to the second (its DNS target itself), naming it: answered=<both answered>.
        "udp-dns-connected-then-target" => {
            let socket = udp_socket_for(addr(1));
            let mut buf = [0u8; 512];
            let answered = socket.connect(addr(1)).is_ok()
                && socket.send(&dns_query()).is_ok()
                && socket.recv(&mut buf).is_ok()
                && socket.send_to(&dns_query(), addr(2)).is_ok()
                && socket.recv(&mut buf).is_ok();
            println!("PROBE answered={answered}");
        }
        // DNS over an unconnected UDP socket: who the answer seems to come from.
        "udp-dns" => {
            let server = addr(1);
            let socket = udp_socket_for(server);
            report("send", socket.send_to(&dns_query(), server).map(drop));
            let mut buf = [0u8; 512];
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    println!("PROBE from={from}");
                    println!("PROBE answer={}", n > 12 && buf[7] == 1);
                }
                Err(e) => println!("PROBE from=err{}", e.raw_os_error().unwrap_or(-1)),
            }
        }
        // DNS over one unconnected UDP socket to each server in turn (all of one family):
        // who answer i seems to come from, as from<i>.
        "udp-dns-each" => {
            let socket = udp_socket_for(addr(1));
            for i in 1..words.len() {
                report(
                    &format!("send{i}"),
                    socket.send_to(&dns_query(), addr(i)).map(drop),
                );
                let mut buf = [0u8; 512];
                match socket.recv_from(&mut buf) {
                    Ok((_, from)) => println!("PROBE from{i}={from}"),
                    Err(e) => println!("PROBE from{i}=err{}", e.raw_os_error().unwrap_or(-1)),
                }
            }
        }
        // DNS over one unconnected UDP socket, COUNT queries to SERVER, MS milliseconds apart
        // (`udp-dns-every MS COUNT SERVER`): how many were answered.
        "udp-dns-every" => {
            let pause = Duration::from_millis(words[1].parse().expect("MS"));
            let count: u32 = words[2].parse().expect("COUNT");
            let server = addr(3);
            let socket = udp_socket_for(server);
            let mut answered = 0;
            for _ in 0..count {
                let mut buf = [0u8; 512];
                if socket.send_to(&dns_query(), server).is_ok()
                    && socket.recv_from(&mut buf).is_ok()
                {
                    answered += 1;
                }
                std::thread::sleep(pause);
            }
            println!("PROBE answered={answered}");
        }
        // DNS over a connected UDP socket: getpeername and recvfrom both show the server.
        "udp-dns-connected" => {
            let server = addr(1);
            let socket = udp_socket_for(server);
            report("connect", socket.connect(server));
            connected_query(&socket);
        }
        // `udp-dns-connected` on a socket connected before COUNT other sockets of the
        // process connect to SERVER and close (`udp-dns-connected-churn COUNT SERVER`): what
        // a socket redirected long ago still shows while others come and go.
        "udp-dns-connected-churn" => {
            let count: u32 = words[1].parse().expect("COUNT");
            let server = addr(2);
            let socket = udp_socket_for(server);
            report("connect", socket.connect(server));
            for _ in 0..count {
                let other = udp_socket_for(server);
                other.connect(server).expect("connect of a churned socket");
            }
            connected_query(&socket);
        }
        // `udp-dns-connected` to SERVER, paused after the connect: the socket's cookie is
        // written to COOKIE_FILE (for the test to record an original under, as a release
        // before socket storage did), and the rest waits for FLAG_FILE
        // (`udp-dns-connected-paused COOKIE_FILE FLAG_FILE SERVER`).
        "udp-dns-connected-paused" => {
            let (cookie_file, flag) = (PathBuf::from(words[1]), PathBuf::from(words[2]));
            let target = addr(3);
            let socket = udp_socket_for(target);
            report("connect", socket.connect(target));
            fs::write(&cookie_file, socket_cookie(&socket).to_string()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !flag.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            connected_query(&socket);
        }
        // DNS over TCP.
        "tcp-dns" => {
            let server = addr(1);
            match TcpStream::connect_timeout(&server, Duration::from_secs(3)) {
                Ok(mut stream) => {
                    println!("PROBE peer={}", stream.peer_addr().unwrap());
                    stream
                        .set_read_timeout(Some(Duration::from_secs(3)))
                        .unwrap();
                    let q = dns_query();
                    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&q);
                    stream.write_all(&framed).unwrap();
                    let mut len = [0u8; 2];
                    let ok = stream.read_exact(&mut len).is_ok();
                    println!("PROBE answer={ok}");
                }
                Err(e) => println!("PROBE peer=err{}", e.raw_os_error().unwrap_or(-1)),
            }
        }
        // Connected UDP: send, wait for the flag file, send again.
        "udp-twice" => {
            let server = addr(1);
            let flag = PathBuf::from(words[2]);
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            report("connect", socket.connect(server));
            report("send1", socket.send(b"first").map(drop));
            let deadline = Instant::now() + Duration::from_secs(5);
            while !flag.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            report("send2", socket.send(b"second").map(drop));
        }
        // One UDP datagram to ADDR (IPv6) with a hop-by-hop header holding a jumbo payload
        // option (`jumbo`), as BIG TCP writes, or a padding option (`other`): send=ok|err<errno>.
        "udp-hopopts" => {
            let option: u8 = if words[1] == "jumbo" { 0xC2 } else { 1 };
            let header = [0, 0, option, 4, 0, 0, 0, 0];
            let socket = UdpSocket::bind("[::]:0").unwrap();
            set_hop_options(&socket, &header);
            report("send", socket.send_to(b"x", addr(2)).map(drop));
        }
        // One ICMP echo request over a raw socket (no socket hook sees it: only egress).
        "icmp" => {
            let target: IpAddr = words[1].parse().expect("probe address");
            let (domain, proto, kind) = match target {
                IpAddr::V4(_) => (socket2::Domain::IPV4, socket2::Protocol::ICMPV4, 8u8),
                IpAddr::V6(_) => (socket2::Domain::IPV6, socket2::Protocol::ICMPV6, 128u8),
            };
            let socket = socket2::Socket::new(domain, socket2::Type::RAW, Some(proto)).unwrap();
            // type, code, checksum (the kernel fills it for ICMPv6; ours is right for v4),
            // id, sequence.
            let mut echo = [kind, 0, 0, 0, 0x12, 0x34, 0, 1];
            if kind == 8 {
                let sum = echo
                    .chunks(2)
                    .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                    .sum::<u32>();
                let sum = (sum & 0xffff) + (sum >> 16);
                echo[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
            }
            let dst = SocketAddr::new(target, 0);
            report("send", socket.send_to(&echo, &dst.into()).map(drop));
        }
        // Serves one TCP connection a peer opens at the first address (served=ok once a ping
        // came in and 64 KiB went back), then connects out to the second (outbound=...).
        "tcp-serve" => {
            let listener = TcpListener::bind(addr(1)).expect("listen");
            println!("PROBE listening=ok");
            let served = (|| {
                let mut stream = accept_within(&listener, Duration::from_secs(5))?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                stream.set_write_timeout(Some(Duration::from_secs(3)))?;
                let mut ping = [0u8; 5];
                stream.read_exact(&mut ping)?;
                stream.write_all(&[b'w'; 64 << 10])?;
                stream.shutdown(std::net::Shutdown::Write)?;
                // Until the peer has it all and closes: the last ACKs are replies too.
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).map(drop)
            })();
            report("served", served);
            let outbound = TcpStream::connect_timeout(&addr(2), Duration::from_secs(3)).map(drop);
            report("outbound", outbound);
        }
        // A UDP service bound at the first address: answers the first datagram it gets
        // (served=ok), then writes to the second address itself (unasked=...), then from a
        // socket it did not bind to the peer it answered (client=...).
        "udp-serve" => {
            let socket = UdpSocket::bind(addr(1)).expect("bind");
            println!("PROBE listening=ok");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 64];
            let served = socket
                .recv_from(&mut buf)
                .and_then(|(_, peer)| socket.send_to(b"pong", peer).map(|_| peer));
            report(
                "served",
                served
                    .as_ref()
                    .map(drop)
                    .map_err(|e| std::io::Error::from(e.kind())),
            );
            report("unasked", socket.send_to(b"leak", addr(2)).map(drop));
            if let Ok(peer) = served {
                let other = udp_socket_for(peer);
                report("client", other.send_to(b"leak", peer).map(drop));
            }
        }
        // A UDP service on 0.0.0.0 at the port of the first address, written to over loopback
        // by this very process with a forged source (the second address) from a raw socket;
        // then answers that source (answered=...).
        "udp-spoofed-service" => {
            let port = addr(1).port();
            let forged = match addr(2) {
                SocketAddr::V4(v4) => v4,
                SocketAddr::V6(_) => panic!("an IPv4 source"),
            };
            let service = UdpSocket::bind(("0.0.0.0", port)).expect("bind");
            service
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let raw = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::UDP),
            )
            .unwrap();
            raw.set_header_included_v4(true).unwrap();
            let payload = b"spoof";
            let udp_len = 8 + payload.len();
            let total = 20 + udp_len;
            let mut packet = vec![0x45, 0];
            packet.extend_from_slice(&(total as u16).to_be_bytes());
            packet.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
            packet.extend_from_slice(&forged.ip().octets());
            packet.extend_from_slice(&[127, 0, 0, 1]);
            packet.extend_from_slice(&forged.port().to_be_bytes());
            packet.extend_from_slice(&port.to_be_bytes());
            packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
            packet.extend_from_slice(&[0, 0]);
            packet.extend_from_slice(payload);
            let to: SocketAddr = ([127, 0, 0, 1], port).into();
            report("forged", raw.send_to(&packet, &to.into()).map(drop));
            let mut buf = [0u8; 64];
            let heard = service.recv_from(&mut buf);
            println!(
                "PROBE heard={}",
                heard
                    .as_ref()
                    .map_or_else(|e| e.to_string(), |(_, from)| from.to_string())
            );
            report(
                "answered",
                service.send_to(b"pong", SocketAddr::V4(forged)).map(drop),
            );
        }
        // Accepts one connection at the first address, disconnects it (connect AF_UNSPEC) and
        // connects the same socket to the second, sends "first", waits for the flag file,
        // sends "second".
        "tcp-reuse" => {
            let listener = TcpListener::bind(addr(1)).expect("listen");
            let flag = PathBuf::from(words[3]);
            let stream = accept_within(&listener, Duration::from_secs(5)).expect("accept");
            let socket = socket2::Socket::from(stream);
            // SAFETY: an all-zero sockaddr_storage is a valid AF_UNSPEC address, and its size
            // is what the kernel reads for one.
            #[allow(unsafe_code)]
            let unspec = unsafe {
                socket2::SockAddr::new(
                    socket2::SockAddrStorage::zeroed(),
                    std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
                )
            };
            report("disconnect", socket.connect(&unspec));
            report("connect", socket.connect(&addr(2).into()));
            report("send1", socket.send(b"first").map(drop));
            let deadline = Instant::now() + Duration::from_secs(5);
            while !flag.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            report("send2", socket.send(b"second").map(drop));
            std::thread::sleep(Duration::from_millis(500));
        }
        other => panic!("unknown probe {other}"),
    }
}

/// From a thread in `netns`: sends "ping" to `server` from an unbound socket until an answer
/// comes (or `within` passes); returns it.
pub fn udp_ask(netns: &Path, server: SocketAddr, within: Duration) -> Option<Vec<u8>> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let ns = File::open(&netns).unwrap();
        setns(ns, CloneFlags::CLONE_NEWNET).unwrap();
        let socket = udp_socket_for(server);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            let _ = socket.send_to(b"ping", server);
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    })
    .join()
    .unwrap()
}

/// From a thread in `netns`: connects to `server` (retrying until `within` passes) and keeps
/// the connection for a moment, for a workload to do what it will with it.
pub fn tcp_connect_and_hold(netns: &Path, server: SocketAddr, within: Duration) {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let ns = File::open(&netns).unwrap();
        setns(ns, CloneFlags::CLONE_NEWNET).unwrap();
        let deadline = Instant::now() + within;
        loop {
            match TcpStream::connect_timeout(&server, Duration::from_millis(500)) {
                Ok(stream) => {
                    std::thread::sleep(Duration::from_millis(300));
                    drop(stream);
                    return;
                }
                Err(e) if Instant::now() > deadline => panic!("connecting to {server}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
    .join()
    .unwrap();
}

/// From a thread in `netns` (this process, so outside every lab cgroup): connects to
/// `server`, retrying until `within` passes, sends a ping and reads until the server closes;
/// returns the bytes read.
pub fn tcp_exchange(netns: &Path, server: SocketAddr, within: Duration) -> std::io::Result<usize> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let ns = File::open(&netns)?;
        setns(ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let deadline = Instant::now() + within;
        let mut stream = loop {
            match TcpStream::connect_timeout(&server, Duration::from_millis(500)) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"ping\n")?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(answer.len())
    })
    .join()
    .map_err(|_| std::io::Error::other("the client thread panicked"))?
}

/// Waits up to `timeout` for a message.
pub fn recv_within<T>(rx: &Receiver<T>, timeout: Duration) -> Option<T> {
    rx.recv_timeout(timeout).ok()
}

/// `bpftool cgroup show PATH`: the names of the programs attached there (None without bpftool).
pub fn attached_programs(cgroup: &Path) -> Option<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .filter(|name| name.starts_with("warden_"))
            .map(str::to_string)
            .collect(),
    )
}

/// A probe's outcome, as key=ok or key=err<errno>.
fn report(key: &str, r: std::io::Result<()>) {
    match r {
        Ok(()) => println!("PROBE {key}=ok"),
        Err(e) => println!("PROBE {key}=err{}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// A DNS query over `socket`, connected: who getpeername says it is connected to, as peer=,
/// and who the answer seems to come from, as from=.
fn connected_query(socket: &UdpSocket) {
    println!("PROBE peer={}", socket.peer_addr().unwrap());
    report("send", socket.send(&dns_query()).map(drop));
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((_, from)) => println!("PROBE from={from}"),
        Err(e) => println!("PROBE from=err{}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// The socket's cookie (SO_COOKIE, which no socket crate wraps): the key the programs know
/// it by.
#[allow(unsafe_code)]
fn socket_cookie(socket: &UdpSocket) -> u64 {
    use std::os::fd::AsRawFd;
    let mut cookie = 0u64;
    let mut length = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap();
    // SAFETY: the descriptor is the socket's own and open for the call; the kernel writes at
    // most `length` bytes to `cookie`, which holds that many, and the new length to `length`.
    let got = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut length,
        )
    };
    assert_eq!(got, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    cookie
}

/// Sets IPV6_HOPOPTS, which no socket crate wraps: the hop-by-hop header the kernel puts on
/// the socket's packets.
#[allow(unsafe_code)]
fn set_hop_options(socket: &UdpSocket, header: &[u8]) {
    use std::os::fd::AsRawFd;
    let length = libc::socklen_t::try_from(header.len()).unwrap();
    // SAFETY: the descriptor is the socket's own and open for the call; the kernel reads
    // `length` bytes from `header`, which holds that many.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_HOPOPTS,
            header.as_ptr().cast(),
            length,
        )
    };
    assert_eq!(set, 0, "IPV6_HOPOPTS: {}", std::io::Error::last_os_error());
}

/// How long a probe may take: every probe waits a few seconds at most for what it is waiting
/// for, so one past this is stuck (a test's panic left it waiting for a peer that never came),
/// and is killed rather than left to hang the suite.
const PROBE_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `cmd` to the end and returns its output, or kills it (by its PID) and panics once
/// `deadline` has passed.
fn output_within(mut cmd: Command, deadline: Duration, what: &str) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn probe");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for probe") {
            break Some(status);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let Some(status) = status else {
        panic!(
            "probe `{what}` still running after {deadline:?}: killed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    std::process::Output {
        status,
        stdout,
        stderr,
    }
}

/// Accepts one connection on `listener` within `deadline`, blocking again once accepted.
fn accept_within(listener: &TcpListener, deadline: Duration) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let until = Instant::now() + deadline;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}
