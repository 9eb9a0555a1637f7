//! The network lab checked on its own, without any Warden datapath: the fake internet answers
//! HTTP on every lab address from the host and from test cgroups, commands start inside their
//! cgroup, getent reads a private resolv.conf, the connect loop records what happens, two
//! internets take turns, and nothing is left behind, even after a panic.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use warden_tests::lab::{
    self, ConnectLoop, HTTP_PORTS, Internet, TestCgroup, curl, curl_from_host, dig_in_cgroup,
    getent_addrs, getent_hosts, http_body, http_get, http_url, run_in_cgroup, spawn_in_cgroup,
};
use warden_tests::zones::{CILIUM_IO_V4, CILIUM_IO_V6, EXAMPLE_ORG_V4, GOOGLE_COM_V6};
use warden_tests::{DigOpts, KnotUpstream, init_tracing, require_tools, unique_loopback_v4};

const CURL_TIMEOUT: Duration = Duration::from_secs(5);

fn lab_ready() -> bool {
    init_tracing();
    lab::require_lab()
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn assert_served(r: &lab::CurlResult, addr: SocketAddr) {
    assert!(r.ok(), "{addr}: {r:#?}");
    assert_eq!(r.body, http_body(addr), "{r:#?}");
}

/// The cgroup path as the kernel reports it in /proc/<pid>/cgroup (`0::/warden-test-...`).
fn cgroup_line(cg: &TestCgroup, path: &Path) -> String {
    format!("0::/{}", path.strip_prefix(cg.mount()).unwrap().display())
}

#[test]
fn every_lab_host_answers_on_every_port_from_the_host() {
    if !lab_ready() {
        return;
    }
    let net = Internet::start().unwrap();
    assert!(net.hosts().len() > 10, "{:?}", net.hosts());
    for host in net.hosts() {
        for port in HTTP_PORTS {
            let addr = SocketAddr::new(*host, port);
            let text = http_get(addr, Duration::from_secs(2)).unwrap();
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{addr}: {text}");
            assert!(text.ends_with(&http_body(addr)), "{addr}: {text}");
        }
    }
    for url_addr in [
        v4(CILIUM_IO_V4, 80),
        SocketAddr::new(CILIUM_IO_V6.into(), 8080),
    ] {
        let r = curl_from_host(&http_url(url_addr), CURL_TIMEOUT).unwrap();
        assert_served(&r, url_addr);
    }
    assert!(net.connections_to(v4(CILIUM_IO_V4, 80)) >= 2);
}

#[test]
fn curl_from_a_test_cgroup_reaches_the_lab() {
    if !lab_ready() {
        return;
    }
    let net = Internet::start().unwrap();
    let cg = TestCgroup::new().unwrap();
    let workload = cg.child("workload").unwrap();
    let cases = [
        v4(CILIUM_IO_V4, 80),
        SocketAddr::new(CILIUM_IO_V6.into(), 8080),
        SocketAddr::new(GOOGLE_COM_V6.into(), 443),
        v4(EXAMPLE_ORG_V4, 443),
    ];
    for addr in cases {
        let r = curl(&workload, &http_url(addr), CURL_TIMEOUT).unwrap();
        assert_served(&r, addr);
    }
    // A port nothing listens on: a result (exit 7, connection refused), not an error.
    let r = curl(&workload, "http://198.18.1.10:81/", CURL_TIMEOUT).unwrap();
    assert!(r.connect_failed(), "{r:#?}");
    assert_eq!(r.connect_error(), Some("Connection refused"), "{r:#?}");
    assert!(!r.not_permitted());
    // An address served after the start: a name's new IP after a zone change.
    let mut net = net;
    let new = v4(Ipv4Addr::new(198, 18, 1, 99), 80);
    net.add_host(new.ip()).unwrap();
    assert_served(&curl(&workload, &http_url(new), CURL_TIMEOUT).unwrap(), new);
    net.remove_host(new.ip()).unwrap();
    let gone = curl(&workload, &http_url(new), Duration::from_millis(500)).unwrap();
    assert!(gone.timed_out(), "{gone:#?}");
}

#[test]
fn commands_run_inside_their_cgroup_from_the_start() {
    if !lab_ready() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let a = cg.child("a").unwrap();
    let nested = cg.child("pods/b").unwrap();
    for path in [&a, &nested] {
        let out = run_in_cgroup(
            path,
            Command::new("cat").arg("/proc/self/cgroup"),
            Duration::from_secs(5),
        )
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines().any(|l| l == cgroup_line(&cg, path)),
            "{}: {text}",
            path.display()
        );
    }
    let mut sleeper = spawn_in_cgroup(&a, Command::new("sleep").arg("30")).unwrap();
    let pid = sleeper.pid().unwrap();
    assert_eq!(lab::cgroup_procs(&a).unwrap(), [pid]);
    assert_eq!(
        lab::cgroup_id(&a).unwrap(),
        std::fs::metadata(&a)
            .map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.ino()
            })
            .unwrap()
    );
    // The cgroup goes first: it kills our child still inside and removes every directory.
    let root = cg.root().to_owned();
    drop(cg);
    assert!(!root.exists(), "{}", root.display());
    let status = sleeper
        .try_exited()
        .unwrap()
        .expect("the sleeper was killed");
    assert!(!status.success());
}

#[test]
fn teardown_ends_what_its_processes_started() {
    if !lab_ready() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let w = cg.child("w").unwrap();
    // sh is our child; the sleep it starts is not (its parent is sh).
    let sh = spawn_in_cgroup(&w, Command::new("sh").args(["-c", "sleep 30 & wait"])).unwrap();
    let sh_pid = sh.pid().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let stray = loop {
        let procs = lab::cgroup_procs(&w).unwrap();
        if let Some(p) = procs.iter().find(|p| **p != sh_pid) {
            break *p;
        }
        assert!(Instant::now() < deadline, "sleep never started: {procs:?}");
        thread::sleep(Duration::from_millis(10));
    };
    let root = cg.root().to_owned();
    drop(cg);
    assert!(!root.exists());
    // The test started that sleep (through sh): the teardown ended it, rather than leave it
    // running outside any test cgroup.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab::process_running(stray) {
        assert!(
            Instant::now() < deadline,
            "the stray sleep {stray} outlived its cgroup"
        );
        thread::sleep(Duration::from_millis(10));
    }
    drop(sh);
}

#[test]
fn foreign_cgroups_are_refused() {
    if !lab_ready() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    for foreign in [cg.mount().to_owned(), cg.mount().join("init.scope")] {
        let err =
            run_in_cgroup(&foreign, &mut Command::new("true"), Duration::from_secs(5)).unwrap_err();
        assert!(format!("{err:#}").contains("refusing"), "{err:#}");
    }
    assert!(cg.child("../escape").is_err());
    assert!(cg.child("cgroup.procs").is_err());
}

#[tokio::test]
async fn dig_runs_in_a_cgroup_with_the_shared_parser() {
    if !lab_ready() || !require_tools(&["knotd", "dig"]) {
        return;
    }
    let knot = KnotUpstream::start(unique_loopback_v4()).unwrap();
    let cg = TestCgroup::new().unwrap();
    let w = cg.child("dig").unwrap();
    let r = dig_in_cgroup(&w, knot.addr(), "cilium.io", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.status, "NOERROR", "{}", r.raw);
    assert_eq!(r.ips(), [IpAddr::V4(CILIUM_IO_V4)]);
    let r = dig_in_cgroup(&w, knot.addr(), "cilium.io", "AAAA", DigOpts::tcp())
        .await
        .unwrap();
    assert_eq!(r.ips(), [IpAddr::V6(CILIUM_IO_V6)]);
    assert_eq!(r.transport.as_deref(), Some("TCP"), "{}", r.raw);
    let err = dig_in_cgroup(
        cg.mount(),
        knot.addr(),
        "cilium.io",
        "A",
        DigOpts::default(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("refusing"), "{err:#}");
}

/// Relays UDP DNS from `listen` (port 53, which resolv.conf implies) to knotd's random port.
struct UdpRelay {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpRelay {
    fn start(listen: SocketAddr, upstream: SocketAddr) -> UdpRelay {
        let sock = UdpSocket::bind(listen).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 65535];
            while !stopping.load(Ordering::Relaxed) {
                let Ok((n, client)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let up = UdpSocket::bind((listen.ip(), 0)).unwrap();
                up.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                up.connect(upstream).unwrap();
                up.send(&buf[..n]).unwrap();
                let mut reply = [0u8; 65535];
                if let Ok(m) = up.recv(&mut reply) {
                    let _ = sock.send_to(&reply[..m], client);
                }
            }
        });
        UdpRelay {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn resolv_conf_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("/etc/resolv.conf"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn getent_uses_a_private_resolv_conf_and_the_host_keeps_its_own() {
    if !lab_ready() || !require_tools(&["knotd"]) {
        return;
    }
    let host_before = std::fs::read("/etc/resolv.conf").unwrap();
    let mounts_before = resolv_conf_mounts();
    let knot = KnotUpstream::start(unique_loopback_v4()).unwrap();
    let dns = SocketAddr::new(unique_loopback_v4(), 53);
    let _relay = UdpRelay::start(dns, knot.addr());
    let cg = TestCgroup::new().unwrap();
    let w = cg.child("getent").unwrap();
    let conf = format!("nameserver {}\noptions timeout:1 attempts:2\n", dns.ip());

    // getent hosts asks for AAAA first, so cilium.io (which has both) shows its IPv6 address
    // and example.org (A only) its IPv4 one: both come from knotd through our resolv.conf.
    let out = getent_hosts(&w, &conf, "cilium.io").unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(getent_addrs(&out), [IpAddr::V6(CILIUM_IO_V6)], "{out:?}");
    let out = getent_hosts(&w, &conf, "example.org").unwrap();
    assert_eq!(getent_addrs(&out), [IpAddr::V4(EXAMPLE_ORG_V4)], "{out:?}");
    // /etc/hosts still applies, and a name the lab does not have is not found (exit 2).
    let out = getent_hosts(&w, &conf, "localhost").unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = getent_hosts(&w, &conf, "nowhere.example.org").unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    assert_eq!(std::fs::read("/etc/resolv.conf").unwrap(), host_before);
    assert_eq!(resolv_conf_mounts(), mounts_before);
}

#[test]
fn connect_loop_records_successes_and_failures() {
    if !lab_ready() {
        return;
    }
    let _net = Internet::start().unwrap();
    let cg = TestCgroup::new().unwrap();
    let w = cg.child("loop").unwrap();
    let interval = Duration::from_millis(50);
    let v4_loop = ConnectLoop::start(&w, v4(CILIUM_IO_V4, 80), interval).unwrap();
    let v6_loop =
        ConnectLoop::start(&w, SocketAddr::new(CILIUM_IO_V6.into(), 8080), interval).unwrap();
    let refused = ConnectLoop::start(&w, v4(CILIUM_IO_V4, 81), interval).unwrap();
    let mut procs = lab::cgroup_procs(&w).unwrap();
    procs.sort_unstable();
    let mut want: Vec<u32> = [&v4_loop, &v6_loop, &refused]
        .iter()
        .map(|l| l.pid().unwrap())
        .collect();
    want.sort_unstable();
    assert_eq!(procs, want);
    v4_loop
        .wait_for_attempts(10, Duration::from_secs(10))
        .unwrap();
    v6_loop
        .wait_for_attempts(10, Duration::from_secs(10))
        .unwrap();
    refused
        .wait_for_attempts(5, Duration::from_secs(10))
        .unwrap();
    for lp in [v4_loop, v6_loop] {
        let target = lp.target();
        let attempts = lp.stop().unwrap();
        assert!(attempts.len() >= 10, "{target}: {attempts:?}");
        assert!(attempts.iter().all(|a| a.ok()), "{target}: {attempts:?}");
        assert!(attempts.windows(2).all(|w| w[0].at < w[1].at));
        // Spaced by the interval, not bunched, nor each waiting out a timeout (a stall or
        // two on a loaded machine is no fault of the loop's).
        let span = attempts
            .last()
            .unwrap()
            .at
            .duration_since(attempts[0].at)
            .unwrap();
        let per = span / u32::try_from(attempts.len() - 1).unwrap();
        assert!(per >= interval && per < interval * 10, "{per:?}");
    }
    let attempts = refused.stop().unwrap();
    assert!(attempts.len() >= 5);
    for a in &attempts {
        assert_eq!(a.errno, Some(111), "{a:?}");
        assert_eq!(a.error.as_deref(), Some("connect: Connection refused"));
    }
}

#[test]
fn two_internets_take_turns() {
    if !lab_ready() {
        return;
    }
    let spans: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let spans = Arc::clone(&spans);
            thread::spawn(move || {
                let net = Internet::start().unwrap();
                let up = Instant::now();
                let addr = v4(CILIUM_IO_V4, 80);
                assert!(
                    http_get(addr, Duration::from_secs(2))
                        .unwrap()
                        .ends_with(&http_body(addr))
                );
                // Another process sees the lock taken while we hold it.
                if warden_tests::tool_path("flock").is_some() {
                    let st = Command::new("flock")
                        .args(["-n", lab::INTERNET_LOCK, "true"])
                        .status()
                        .unwrap();
                    assert!(!st.success(), "the lock was free while an Internet was up");
                }
                thread::sleep(Duration::from_millis(300));
                let down = Instant::now();
                drop(net);
                spans.lock().unwrap().push((up, down));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut spans = spans.lock().unwrap().clone();
    spans.sort();
    assert_eq!(spans.len(), 2);
    assert!(
        spans[0].1 <= spans[1].0,
        "the internets overlapped: {spans:?}"
    );
}

fn ip_out(args: &[&str]) -> String {
    let out = Command::new(warden_tests::tool_path("ip").unwrap())
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn nothing_is_left_behind_even_after_a_panic() {
    if !lab_ready() {
        return;
    }
    #[derive(Default, Debug)]
    struct Seen {
        netns: String,
        veth: String,
        cgroup: Option<std::path::PathBuf>,
        pids: Vec<u32>,
    }
    let seen = Mutex::new(Seen::default());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = Internet::start().unwrap();
        let cg = TestCgroup::new().unwrap();
        let w = cg.child("w").unwrap();
        let lp = ConnectLoop::start(&w, v4(CILIUM_IO_V4, 80), Duration::from_millis(50)).unwrap();
        lp.wait_for_attempts(2, Duration::from_secs(10)).unwrap();
        let mut s = seen.lock().unwrap();
        s.netns = net.netns().to_owned();
        s.veth = net.host_veth().to_owned();
        s.cgroup = Some(cg.root().to_owned());
        s.pids = vec![net.responder_pid().unwrap(), lp.pid().unwrap()];
        drop(s);
        panic!("deliberate panic: the lab must clean up while unwinding");
    }));
    assert!(result.is_err());
    let seen = seen.into_inner().unwrap();
    assert!(!seen.netns.is_empty(), "{seen:?}");
    assert!(
        !ip_out(&["netns", "list"])
            .lines()
            .any(|l| l.split_whitespace().next() == Some(seen.netns.as_str())),
        "{seen:?}"
    );
    assert!(
        ip_out(&["link", "show", "dev", &seen.veth]).contains("does not exist"),
        "{seen:?}"
    );
    // Another test's Internet may be up by now: only routes through our veth must be gone.
    for family in ["-4", "-6"] {
        let routes = ip_out(&[family, "route", "show"]);
        assert!(!routes.contains(&seen.veth), "{routes}");
    }
    assert!(!seen.cgroup.as_ref().unwrap().exists(), "{seen:?}");
    for pid in &seen.pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still runs"
        );
    }
}
