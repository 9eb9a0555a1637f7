//! Privileged tests of the real datapath: programs attached at a cgroup of the test's own,
//! probes (this binary re-executed) moved into enrolled cgroups and a network namespace of the
//! test's own, servers in that namespace. They skip with a message when not root.

// Helpers outside #[test] functions unwrap too: a failing step fails the test on the spot.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aya::programs::{CgroupSkb, CgroupSkbAttachType, SkReuseport, SkReuseportAttachType};
use ipnet::IpNet;
use warden_datapath::{
    Datapath, DatapathOptions, DropEvent, DropEvents, DropReason, FqdnKey, LinkAction, PortRule,
    RedirectSource,
};

use support::{Lab, NS_V4, NS_V6};

const TCP: u8 = 6;
const UDP: u8 = 17;
const EPERM: &str = "err1";
/// Programs the datapath attaches at its cgroup root.
const PROGRAMS: usize = 13;

/// Entry point of the probes (no-op in a normal run).
#[test]
fn probe_child() {
    support::run_probe();
}

/// Entry point of a process that opens the pinned datapath as the dnsproxy does, without
/// CAP_SYS_ADMIN (no-op in a normal run): whether it has the capability, and where an absent
/// redirect record was looked up once the slots had time to be trusted.
#[test]
fn slots_child() {
    let Ok(bpffs) = std::env::var("WARDEN_SLOTS_BPFFS") else {
        return;
    };
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    const CAP_SYS_ADMIN: u32 = 21;
    println!("PROBE sys_admin={}", effective & (1 << CAP_SYS_ADMIN) != 0);
    let dp = Datapath::open_pinned(std::path::Path::new(&bpffs)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut source = RedirectSource::Map;
    while source != RedirectSource::Slot && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        source = dp
            .redirect_record(sa("192.0.2.1:6000"), UDP)
            .unwrap()
            .source;
    }
    println!("PROBE source={}", source.as_str());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn events(rt: &tokio::runtime::Runtime, dp: &Datapath) -> DropEvents {
    let _guard = rt.enter();
    dp.events().unwrap()
}

fn next_event(rt: &tokio::runtime::Runtime, events: &mut DropEvents) -> Option<DropEvent> {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(2), events.next())
            .await
            .ok()
            .map(|r| r.unwrap())
    })
}

/// The next drop event for `reason`, skipping egress drops met on the way: a TCP flow allowed
/// a step before may still send its last packets (the ACK of the server's FIN, when the server
/// closes late) after its entry was revoked, and those are rightly dropped a moment later.
fn next_drop(
    rt: &tokio::runtime::Runtime,
    events: &mut DropEvents,
    reason: DropReason,
) -> Option<DropEvent> {
    loop {
        let event = next_event(rt, events)?;
        if event.reason == reason {
            return Some(event);
        }
        assert_eq!(event.reason, DropReason::Egress, "{event:?}");
    }
}

/// Drops the events already buffered (they are written synchronously with the verdict).
fn drain(events: &mut DropEvents) {
    while events.try_next().is_some() {}
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v4_at(port: u16) -> SocketAddr {
    SocketAddr::new(NS_V4.parse().unwrap(), port)
}

fn v6_at(port: u16) -> SocketAddr {
    SocketAddr::new(NS_V6.parse().unwrap(), port)
}

/// The lab's cgroup `app`, enrolled (enforced, DNS redirected) as `endpoint_id` with its IPv4
/// DNS target at `target`; its path and cgroup id.
fn redirected_app(
    lab: &Lab,
    dp: &Datapath,
    endpoint_id: u32,
    target: SocketAddr,
) -> (std::path::PathBuf, u64) {
    let app = lab.cgroup("app");
    let app_id = Datapath::cgroup_id(&app).unwrap();
    dp.enroll(app_id, endpoint_id, true, true).unwrap();
    let SocketAddr::V4(t4) = target else {
        unreachable!("an IPv4 target")
    };
    dp.set_dns_target(endpoint_id, Some(t4), None).unwrap();
    (app, app_id)
}

#[test]
fn connect_enforcement_with_fqdn_entries_and_drop_events() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let rt = runtime();
    let mut events = events(&rt, &dp);
    let app = lab.cgroup("app");
    let app_id = Datapath::cgroup_id(&app).unwrap();
    dp.enroll(app_id, 7, true, false).unwrap();

    for server in [v4_at(8080), v6_at(8080)] {
        lab.tcp_server(server);
        let ip = server.ip();
        let connect = format!("tcp {server}");

        // Not allowed: refused at once with EPERM, and a drop event says why.
        let p = lab.probe(&app, &connect);
        assert_eq!(p.get("result"), EPERM, "{server}: {p:?}");
        assert!(p.get("ms").parse::<u64>().unwrap() < 1000, "{p:?}");
        let ev = next_drop(&rt, &mut events, DropReason::Connect).expect("a connect drop event");
        assert_eq!((ev.cgroup_id, ev.endpoint_id, ev.proto), (app_id, 7, TCP));
        assert_eq!(ev.dst, server);

        // Allowed for exactly (TCP, 8080).
        let exact = FqdnKey {
            endpoint_id: 7,
            ip,
            proto: Some(TCP),
            port: Some(8080),
        };
        dp.allow_fqdn(exact, now() + 60).unwrap();
        assert_eq!(lab.probe(&app, &connect).get("result"), "ok");
        // The egress program saw the allowed packets.
        let seen = dp.last_seen(7, ip).unwrap().expect("last_seen entry");
        // Stamped now (a few seconds' slack for a slow probe), not left at 0 or stale.
        assert!(
            seen.abs_diff(now()) <= 10,
            "last_seen {seen} vs now {}",
            now()
        );

        // Revoked: refused again.
        dp.revoke_fqdn(&exact).unwrap();
        assert_eq!(lab.probe(&app, &connect).get("result"), EPERM);

        // Another port only: still refused. Any protocol, any port: allowed.
        let other_port = FqdnKey {
            port: Some(9090),
            ..exact
        };
        dp.allow_fqdn(other_port, now() + 60).unwrap();
        assert_eq!(lab.probe(&app, &connect).get("result"), EPERM);
        let any = FqdnKey::any(7, ip);
        dp.allow_fqdn(any, now() + 60).unwrap();
        assert_eq!(lab.probe(&app, &connect).get("result"), "ok");
        let entries = dp.fqdn_entries().unwrap();
        assert!(entries.iter().any(|(k, _)| *k == any));
        assert!(entries.iter().any(|(k, _)| *k == other_port));
        dp.revoke_fqdn(&any).unwrap();
        dp.revoke_fqdn(&other_port).unwrap();
        assert_eq!(lab.probe(&app, &connect).get("result"), EPERM);
        drain(&mut events);
    }

    // Sub-cgroups of an enrolled cgroup are its endpoint too.
    let child = lab.cgroup("app/worker");
    let p = lab.probe(&child, &format!("tcp {}", v4_at(8080)));
    assert_eq!(p.get("result"), EPERM);
    let ev = next_drop(&rt, &mut events, DropReason::Connect).expect("a connect drop event");
    assert_eq!((ev.cgroup_id, ev.endpoint_id), (app_id, 7));

    // Enrolled but not enforced, and not enrolled at all: everything passes.
    dp.enroll(app_id, 7, false, false).unwrap();
    assert_eq!(
        lab.probe(&app, &format!("tcp {}", v4_at(8080)))
            .get("result"),
        "ok"
    );
    let stranger = lab.cgroup("stranger");
    assert_eq!(
        lab.probe(&stranger, &format!("tcp {}", v6_at(8080)))
            .get("result"),
        "ok"
    );
}

#[test]
fn cidr_rules_with_ports_and_nested_prefixes() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    for port in [8080, 9090] {
        lab.tcp_server(v4_at(port));
        lab.tcp_server(v6_at(port));
    }
    let app = lab.cgroup("app");
    dp.enroll(Datapath::cgroup_id(&app).unwrap(), 9, true, false)
        .unwrap();
    let result =
        |addr: SocketAddr| lab.probe(&app, &format!("tcp {addr}")).values["result"].clone();
    let net = |s: &str| s.parse::<IpNet>().unwrap();

    dp.set_cidr_rules(9, net("10.213.0.0/16"), &[PortRule::port(TCP, 8080)])
        .unwrap();
    assert_eq!(result(v4_at(8080)), "ok");
    assert_eq!(result(v4_at(9090)), EPERM);

    // A longer prefix with other ports does not hide the shorter one's rules.
    dp.set_cidr_rules(9, net("10.213.0.0/24"), &[PortRule::port(TCP, 9090)])
        .unwrap();
    assert_eq!(result(v4_at(9090)), "ok");
    assert_eq!(result(v4_at(8080)), "ok");
    dp.remove_cidr(9, net("10.213.0.0/16")).unwrap();
    assert_eq!(result(v4_at(8080)), EPERM);
    assert_eq!(result(v4_at(9090)), "ok");
    dp.remove_cidr(9, net("10.213.0.0/24")).unwrap();
    assert_eq!(result(v4_at(9090)), EPERM);

    // Port ranges, and protocols.
    dp.set_cidr_rules(
        9,
        net("10.213.0.1/32"),
        &[PortRule::range(Some(TCP), 8000, 8100)],
    )
    .unwrap();
    assert_eq!(result(v4_at(8080)), "ok");
    assert_eq!(result(v4_at(9090)), EPERM);
    dp.set_cidr_rules(9, net("10.213.0.1/32"), &[PortRule::port(UDP, 8080)])
        .unwrap();
    assert_eq!(result(v4_at(8080)), EPERM);

    // IPv6, every port (no rules = everything), for this endpoint only.
    dp.set_cidr_rules(9, net("fd00:213::/64"), &[]).unwrap();
    assert_eq!(result(v6_at(8080)), "ok");
    assert_eq!(result(v6_at(9090)), "ok");
    let other = lab.cgroup("other");
    dp.enroll(Datapath::cgroup_id(&other).unwrap(), 10, true, false)
        .unwrap();
    assert_eq!(
        lab.probe(&other, &format!("tcp {}", v6_at(8080)))
            .get("result"),
        EPERM
    );

    // ::/0 contains the v4-mapped range the maps store IPv4 in, yet allows no IPv4.
    dp.set_cidr_rules(9, net("::/0"), &[]).unwrap();
    assert_eq!(result(v4_at(9090)), EPERM);
    dp.set_cidr_rules(9, net("0.0.0.0/0"), &[PortRule::port(TCP, 9090)])
        .unwrap();
    assert_eq!(result(v4_at(9090)), "ok");
    assert_eq!(result(v4_at(8080)), EPERM);
    dp.remove_cidr(9, net("0.0.0.0/0")).unwrap();
    assert_eq!(result(v4_at(9090)), EPERM);
    dp.remove_cidr(9, net("::/0")).unwrap();

    let entries = dp.cidr_entries().unwrap();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(entries.contains(&(9, net("fd00:213::/64"), vec![PortRule::ANY])));
    assert!(entries.contains(&(9, net("10.213.0.1/32"), vec![PortRule::port(UDP, 8080)])));
    let too_many = vec![PortRule::ANY; 9];
    assert!(dp.set_cidr_rules(9, net("10.0.0.0/8"), &too_many).is_err());
    dp.clear_endpoint(9).unwrap();
    assert!(dp.cidr_entries().unwrap().is_empty());
    assert_eq!(result(v6_at(8080)), EPERM);
}

/// Several endpoints cleared in one call lose every entry of theirs, and only theirs.
#[test]
fn clearing_endpoints_together_leaves_the_others_alone() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let ip: std::net::IpAddr = NS_V4.parse().unwrap();
    for endpoint_id in [20, 21, 22] {
        dp.set_cidr_rules(
            endpoint_id,
            "10.214.0.0/16".parse::<IpNet>().unwrap(),
            &[PortRule::port(TCP, 443)],
        )
        .unwrap();
        dp.allow_fqdn(FqdnKey::any(endpoint_id, ip), now() + 60)
            .unwrap();
        dp.set_dns_target(endpoint_id, Some("127.0.0.53:53".parse().unwrap()), None)
            .unwrap();
    }
    dp.clear_endpoints(&std::collections::HashSet::from([20, 22]))
        .unwrap();
    let cidr_owners: Vec<u32> = dp.cidr_entries().unwrap().iter().map(|e| e.0).collect();
    assert_eq!(cidr_owners, [21]);
    let fqdn_owners: Vec<u32> = dp
        .fqdn_entries()
        .unwrap()
        .iter()
        .map(|(key, _)| key.endpoint_id)
        .collect();
    assert_eq!(fqdn_owners, [21]);
    for (endpoint_id, kept) in [(20, false), (21, true), (22, false)] {
        assert_eq!(
            dp.dns_target(endpoint_id).unwrap().is_some(),
            kept,
            "{endpoint_id}"
        );
    }
    // Nothing to clear is no error, and clears nothing.
    dp.clear_endpoints(&std::collections::HashSet::new())
        .unwrap();
    assert_eq!(dp.fqdn_entries().unwrap().len(), 1);
}

#[test]
fn egress_cuts_an_established_flow_when_its_entry_is_revoked() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let rt = runtime();
    let mut events = events(&rt, &dp);
    let sink = lab.udp_sink(v4_at(7000));
    let app = lab.cgroup("app");
    let app_id = Datapath::cgroup_id(&app).unwrap();
    dp.enroll(app_id, 11, true, false).unwrap();
    let key = FqdnKey {
        endpoint_id: 11,
        ip: NS_V4.parse().unwrap(),
        proto: Some(UDP),
        port: Some(7000),
    };
    dp.allow_fqdn(key, now() + 60).unwrap();
    let flag = lab.scratch("flag");

    std::thread::scope(|s| {
        let probe = s.spawn(|| {
            lab.probe(
                &app,
                &format!("udp-twice {} {}", v4_at(7000), flag.display()),
            )
        });
        assert_eq!(
            support::recv_within(&sink, Duration::from_secs(5)).as_deref(),
            Some(&b"first"[..])
        );
        dp.revoke_fqdn(&key).unwrap();
        std::fs::write(&flag, b"go").unwrap();
        let p = probe.join().unwrap();
        assert_eq!(p.get("connect"), "ok");
        assert_eq!(p.get("send1"), "ok");
        // The packet of the connected socket is dropped by cgroup_skb/egress.
        assert_eq!(p.get("send2"), EPERM, "{p:?}");
    });
    assert!(support::recv_within(&sink, Duration::from_millis(300)).is_none());
    let ev = next_event(&rt, &mut events).expect("a drop event");
    assert_eq!(ev.reason, DropReason::Egress);
    assert_eq!((ev.endpoint_id, ev.proto), (11, UDP));
    assert_eq!(ev.dst, v4_at(7000));
    assert_eq!(ev.src.ip(), NS_V4.parse::<IpAddr>().unwrap());
    assert_ne!(ev.src.port(), 0);
}

/// Replies on connections a peer opened to an enforced workload (a server, a health probe's
/// target) were dropped: no allow entry names the peer. Egress policy limits what the workload
/// opens, as Cilium's stateful one does, not whom it answers; and the peer stays out of reach
/// of the workload's own connections.
#[test]
fn an_enforced_workload_answers_connections_it_accepted_and_only_those() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let rt = runtime();
    let mut events = events(&rt, &dp);
    let app = lab.cgroup("app");
    dp.enroll(Datapath::cgroup_id(&app).unwrap(), 15, true, false)
        .unwrap();
    // The client's own listener, which the workload may not reach.
    lab.tcp_server(v4_at(7100));
    lab.tcp_server(v6_at(7100));
    for (server, peer_listener) in [(v4_at(7200), v4_at(7100)), (v6_at(7200), v6_at(7100))] {
        drain(&mut events);
        std::thread::scope(|s| {
            let probe = s.spawn(|| lab.probe(&app, &format!("tcp-serve {server} {peer_listener}")));
            let read = support::tcp_exchange(&lab.netns_path(), server, Duration::from_secs(4));
            let p = probe.join().unwrap();
            assert_eq!(read.ok(), Some(64 << 10), "{server}: {p:?}");
            assert_eq!(p.get("served"), "ok", "{p:?}");
            assert_eq!(p.get("outbound"), EPERM, "{p:?}");
        });
        // The only drop: the workload's own connect; no reply was dropped.
        let ev = next_event(&rt, &mut events).expect("the outbound connect's drop event");
        assert_eq!(
            (ev.reason, ev.endpoint_id, ev.dst),
            (DropReason::Connect, 15, peer_listener)
        );
        assert!(next_event(&rt, &mut events).is_none());
    }
}

/// The mark of an accepted connection stayed with its socket whatever it did next: a workload
/// could disconnect it (TCP allows connecting again) and connect it to a destination allowed
/// for the moment, and egress never checked that connection again, revocation or not. The mark
/// names the peer and an active connect removes it.
#[test]
fn an_accepted_socket_reconnected_elsewhere_is_checked_like_any_other() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let app = lab.cgroup("app");
    dp.enroll(Datapath::cgroup_id(&app).unwrap(), 18, true, false)
        .unwrap();
    let allowed = v4_at(7400);
    let sink = lab.tcp_sink(allowed);
    let key = FqdnKey {
        endpoint_id: 18,
        ip: NS_V4.parse().unwrap(),
        proto: Some(TCP),
        port: Some(7400),
    };
    dp.allow_fqdn(key, now() + 60).unwrap();
    let flag = lab.scratch("flag");
    let served = v4_at(7500);
    std::thread::scope(|s| {
        let probe = s.spawn(|| {
            lab.probe(
                &app,
                &format!("tcp-reuse {served} {allowed} {}", flag.display()),
            )
        });
        // A client that connects and leaves the connection to the workload.
        support::tcp_connect_and_hold(&lab.netns_path(), served, Duration::from_secs(4));
        let first = support::recv_within(&sink, Duration::from_secs(5));
        assert_eq!(first.as_deref(), Some(&b"first"[..]));
        dp.revoke_fqdn(&key).unwrap();
        std::fs::write(&flag, b"go").unwrap();
        let p = probe.join().unwrap();
        assert_eq!(
            (p.get("disconnect"), p.get("connect")),
            ("ok", "ok"),
            "{p:?}"
        );
    });
    assert!(
        support::recv_within(&sink, Duration::from_millis(500)).is_none(),
        "the revoked destination got data"
    );
}

/// A UDP service in an enforced workload (a DNS or QUIC server) could not answer anyone no
/// rule allowed: its replies were refused (EPERM) or dropped. A peer's datagram now lets the
/// socket that bound the port answer that peer, and only that socket and that peer.
#[test]
fn an_enforced_udp_service_answers_its_clients_and_only_them() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let rt = runtime();
    let mut events = events(&rt, &dp);
    let app = lab.cgroup("app");
    dp.enroll(Datapath::cgroup_id(&app).unwrap(), 19, true, false)
        .unwrap();
    let elsewhere = lab.udp_sink(v4_at(7700));
    for (service, other) in [(v4_at(7600), v4_at(7700)), (v6_at(7600), v6_at(7700))] {
        drain(&mut events);
        std::thread::scope(|s| {
            let probe = s.spawn(|| lab.probe(&app, &format!("udp-serve {service} {other}")));
            let answer = support::udp_ask(&lab.netns_path(), service, Duration::from_secs(4));
            let p = probe.join().unwrap();
            assert_eq!(answer.as_deref(), Some(&b"pong"[..]), "{service}: {p:?}");
            assert_eq!(p.get("served"), "ok", "{p:?}");
            // Nobody wrote to it from there; and a socket it did not bind is no service.
            assert_eq!(p.get("unasked"), EPERM, "{p:?}");
            assert_eq!(p.get("client"), EPERM, "{p:?}");
        });
    }
    assert!(support::recv_within(&elsewhere, Duration::from_millis(200)).is_none());

    // A datagram the workload forged to its own service over loopback (a raw socket, its
    // source any address it likes) opens nothing: else it would open a window to anywhere.
    let forged = sa("10.213.0.77:443");
    let p = lab.probe(
        &app,
        &format!("udp-spoofed-service {} {forged}", v4_at(7800)),
    );
    assert_eq!(
        p.get("heard"),
        forged.to_string(),
        "the forgery arrived: {p:?}"
    );
    assert_eq!(p.get("answered"), EPERM, "{p:?}");
}

/// The kernel connects the unspecified address to the local host, as it does loopback; the
/// connect hook refused it to enforced workloads all the same.
#[test]
fn an_enforced_workload_may_connect_to_the_unspecified_address() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let app = lab.cgroup("app");
    dp.enroll(Datapath::cgroup_id(&app).unwrap(), 17, true, false)
        .unwrap();
    lab.tcp_server(sa("[::]:7300"));
    for target in ["0.0.0.0:7300", "[::]:7300", "127.0.0.1:7300"] {
        let p = lab.probe(&app, &format!("tcp {target}"));
        assert_eq!(p.get("result"), "ok", "{target}: {p:?}");
    }
    let p = lab.probe(&app, &format!("tcp {}", v4_at(7300)));
    assert_eq!(p.get("result"), EPERM, "elsewhere stays refused: {p:?}");
}

#[test]
fn portless_packets_need_a_rule_for_every_port() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let rt = runtime();
    let mut events = events(&rt, &dp);
    let app = lab.cgroup("app");
    dp.enroll(Datapath::cgroup_id(&app).unwrap(), 15, true, false)
        .unwrap();
    for ip in [NS_V4, NS_V6] {
        let ip: IpAddr = ip.parse().unwrap();
        let ping = format!("icmp {ip}");
        assert_eq!(lab.probe(&app, &ping).get("send"), EPERM);
        let ev = next_event(&rt, &mut events).expect("a drop event");
        assert_eq!((ev.reason, ev.dst.ip()), (DropReason::NoPorts, ip));
        // A port-specific entry does not cover ICMP, nor do every port of TCP and of UDP
        // (what `port: "0"` of protocol ANY makes); a CIDR rule for every port and protocol
        // does.
        let tcp = FqdnKey {
            endpoint_id: 15,
            ip,
            proto: Some(TCP),
            port: Some(80),
        };
        dp.allow_fqdn(tcp, now() + 60).unwrap();
        assert_eq!(lab.probe(&app, &ping).get("send"), EPERM);
        for proto in [TCP, UDP] {
            let every_port = FqdnKey {
                endpoint_id: 15,
                ip,
                proto: Some(proto),
                port: None,
            };
            dp.allow_fqdn(every_port, now() + 60).unwrap();
        }
        assert_eq!(lab.probe(&app, &ping).get("send"), EPERM);
        let host = IpNet::from(ip);
        let every_port = [
            PortRule::range(Some(TCP), 0, u16::MAX),
            PortRule::range(Some(UDP), 0, u16::MAX),
        ];
        dp.set_cidr_rules(15, host, &every_port).unwrap();
        assert_eq!(lab.probe(&app, &ping).get("send"), EPERM);
        dp.set_cidr_rules(15, host, &[PortRule::ANY]).unwrap();
        assert_eq!(lab.probe(&app, &ping).get("send"), "ok");
        dp.remove_cidr(15, host).unwrap();
        // So does an FQDN entry for any protocol and port.
        dp.allow_fqdn(FqdnKey::any(15, ip), now() + 60).unwrap();
        assert_eq!(lab.probe(&app, &ping).get("send"), "ok");
        drain(&mut events);
    }
}

/// The proxy reads redirect records from the memory-mapped slots once it has seen the egress
/// program writing them twice in a row, gets the same records the LRU map has, and trusts an
/// empty slot as "no record"; once the link runs another program than the one pinned beside the
/// maps (in life: a rollback to a build without the slots), or none, it asks the LRU map again.
#[test]
fn redirect_records_come_from_the_slots_while_the_program_writes_them() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let target = v4_at(5354);
    let seen = lab.dns_responder(target, dp.clone());
    let (app, app_id) = redirected_app(&lab, &dp, 12, target);
    let orig = sa("10.213.0.98:53");

    // The first lookups ask the map (until two checks of the program, 100 ms apart, found it
    // writing the slots); every record, from either source, is the same.
    let mut sources = Vec::new();
    for _ in 0..40 {
        let p = lab.probe(&app, &format!("udp-dns {orig}"));
        assert_eq!(p.get("answer"), "true", "{p:?}");
        let s = support::recv_within(&seen, Duration::from_secs(2)).expect("query at target");
        let record = s.record.expect("redirect record keyed by the client");
        assert_eq!((record.cgroup_id, record.original), (app_id, Some(orig)));
        sources.push(s.source.expect("lookup failed"));
        if sources.last() == Some(&RedirectSource::Slot) {
            break;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(sources.last(), Some(&RedirectSource::Slot), "{sources:?}");

    // One socket asking one server, another, then the first again: the programs skip the
    // writes of a record that has not changed, never those of one that has, so each query's
    // record (from the slot) and each answer's apparent source follow the socket.
    let other = sa("10.213.0.97:53");
    let servers = [orig, other, orig, orig, other];
    let words: Vec<String> = servers.iter().map(ToString::to_string).collect();
    let p = lab.probe(&app, &format!("udp-dns-each {}", words.join(" ")));
    let mut each_client: Option<SocketAddr> = None;
    let mut from_slot = 0;
    for (i, server) in servers.iter().enumerate() {
        assert_eq!(
            p.get(&format!("from{}", i + 1)),
            server.to_string(),
            "{p:?}"
        );
        let s = support::recv_within(&seen, Duration::from_secs(2)).expect("query at target");
        let record = s.record.expect("redirect record keyed by the client");
        assert_eq!(
            (record.cgroup_id, record.original),
            (app_id, Some(*server)),
            "query {} ({:?})",
            i + 1,
            s.source
        );
        from_slot += usize::from(s.source == Some(RedirectSource::Slot));
        // One socket throughout, or the skips were not exercised.
        assert_eq!(*each_client.get_or_insert(s.client), s.client);
    }
    // From the slots, but for a lapse of the trust lease on a busy machine.
    assert!(from_slot >= 3, "{from_slot} of 5 from the slot");

    // One socket asking one server every 50 ms for 1.5 s: an unchanged record's slot is left
    // alone only while its stamp is under 100 ms old, so it never ages past the readers' 1 s
    // and every query's record still comes from the slot (a third of them would ask the map
    // were the stamp never refreshed; a few may if the trust lease lapses on a busy machine).
    let p = lab.probe(&app, &format!("udp-dns-every 50 30 {orig}"));
    assert_eq!(p.get("answered"), "30", "{p:?}");
    let mut from_slot = 0;
    for _ in 0..30 {
        let s = support::recv_within(&seen, Duration::from_secs(2)).expect("query at target");
        assert_eq!(
            s.record.map(|r| (r.cgroup_id, r.original)),
            Some((app_id, Some(orig)))
        );
        from_slot += usize::from(s.source == Some(RedirectSource::Slot));
    }
    assert!(from_slot >= 27, "{from_slot} of 30 from the slot");

    // Clients that never sent through the redirect: no record, and (but for a key whose slot
    // another client wrote) known without asking the map. Asked again while the trust lease
    // has lapsed (its renewing thread held up on a loaded machine): every lookup then asks
    // the map, which a second look a little later does not.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let never: Vec<_> = (0..16)
            .map(|port| {
                dp.redirect_record(sa(&format!("192.0.2.1:{}", 6000 + port)), UDP)
                    .unwrap()
            })
            .collect();
        assert!(never.iter().all(|l| l.record.is_none()), "{never:?}");
        let from_slot = never
            .iter()
            .filter(|l| l.source == RedirectSource::Slot)
            .count();
        if from_slot >= 14 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{never:?}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A process without CAP_SYS_ADMIN (the dnsproxy's deployment gives it CAP_BPF and
    // CAP_NET_ADMIN) trusts the slots too.
    let child = std::process::Command::new("setpriv")
        .args(["--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "slots_child", "--nocapture", "--test-threads=1"])
        .env("WARDEN_SLOTS_BPFFS", &lab.bpffs)
        .output()
        .expect("setpriv (util-linux)");
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(stdout.contains("PROBE sys_admin=false"), "{stdout}");
    assert!(
        stdout.contains("PROBE source=slot"),
        "{stdout}{}",
        String::from_utf8_lossy(&child.stderr)
    );

    // Within a few check periods, an absent record is answered by `source`.
    let answered_by = |source: RedirectSource, why: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while dp
            .redirect_record(sa("192.0.2.1:6000"), UDP)
            .unwrap()
            .source
            != source
        {
            assert!(
                std::time::Instant::now() < deadline,
                "not {source:?}: {why}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // Another program pinned where the egress program was (as after a rollback to a loader
    // that does not pin it, or attaches another): the link's program is not the pinned one.
    let progs = lab.bpffs.join("v1").join("progs");
    let egress_pin = progs.join("warden_egress");
    let mut egress = CgroupSkb::from_pin(&egress_pin, CgroupSkbAttachType::Egress).unwrap();
    fs::remove_file(&egress_pin).unwrap();
    SkReuseport::from_pin(progs.join("warden_reuse"), SkReuseportAttachType::Select)
        .unwrap()
        .pin(&egress_pin)
        .unwrap();
    answered_by(RedirectSource::Map, "another program pinned");
    fs::remove_file(&egress_pin).unwrap();
    egress.pin(&egress_pin).unwrap();
    answered_by(RedirectSource::Slot, "the egress program pinned again");

    // The egress program leaves (its link's pin removed, which detaches it).
    fs::remove_file(lab.bpffs.join("links").join("warden_egress")).unwrap();
    answered_by(RedirectSource::Map, "no egress link");

    // The LRU map, asked now, holds the last of the socket's records too.
    let from_map = dp.redirect_record(each_client.unwrap(), UDP).unwrap();
    assert_eq!(from_map.source, RedirectSource::Map);
    assert_eq!(
        from_map.record.map(|r| (r.cgroup_id, r.original)),
        Some((app_id, Some(servers[servers.len() - 1])))
    );
}

/// IPv6 BIG TCP puts a hop-by-hop header holding a jumbo payload option before TCP in GSO
/// packets past 64 KiB; egress took every extension header for an unknown protocol and dropped
/// the allowed flows' large segments. A socket can write the same header (IPV6_HOPOPTS): its
/// packets are judged by their ports now, and a hop-by-hop header of another option still is
/// an unknown protocol.
#[test]
fn a_jumbo_hop_by_hop_header_is_read_past_and_no_other() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let app = lab.cgroup("app");
    let app_id = Datapath::cgroup_id(&app).unwrap();
    dp.enroll(app_id, 16, true, false).unwrap();
    dp.set_cidr_rules(
        16,
        format!("{NS_V6}/128").parse::<IpNet>().unwrap(),
        &[PortRule::port(UDP, 8081)],
    )
    .unwrap();
    let send = |kind: &str, port: u16| {
        lab.probe(&app, &format!("udp-hopopts {kind} {}", v6_at(port)))
            .get("send")
            .to_owned()
    };
    assert_eq!(send("jumbo", 8081), "ok");
    assert_eq!(send("jumbo", 8082), EPERM, "its port is read, and judged");
    assert_eq!(send("other", 8081), EPERM);
}

/// (client port, stamp) of each record in the pinned `redirect_records`, as bpftool dumps it.
fn record_stamps(bpffs: &Path) -> Vec<(u16, u64)> {
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pinned_map(bpffs, "redirect_records"))
        .output()
        .expect("bpftool");
    assert!(dump.status.success(), "{dump:?}");
    let text = String::from_utf8(dump.stdout).unwrap();
    // [{"key":["0x00",...],"value":["0x..",...],...},...]: the bytes as hex strings.
    let bytes = |list: &str| -> Vec<u8> {
        list.split(',')
            .map(|b| b.trim().trim_matches('"').trim_start_matches("0x"))
            .filter(|b| !b.is_empty())
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    };
    let mut stamps = Vec::new();
    for entry in text.split("\"key\":[").skip(1) {
        let key = bytes(entry.split(']').next().unwrap());
        let value_list = entry.split("\"value\":[").nth(1).unwrap();
        let value = bytes(value_list.split(']').next().unwrap());
        let port = u16::from_le_bytes([key[16], key[17]]);
        let stamp = u64::from_le_bytes(value[8..16].try_into().unwrap());
        stamps.push((port, stamp));
    }
    stamps
}

/// A record whose client keeps sending is renewed (once a second), and one left by a socket
/// long gone is not taken: its stamp was never renewed, and the proxy took it, for ever, for
/// whoever sent from that address and port next (one of a cgroup not enrolled writes none).
#[test]
fn a_redirect_record_is_renewed_while_used_and_not_taken_once_old() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let target = v4_at(5355);
    let seen = lab.dns_responder(target, dp.clone());
    let (app, app_id) = redirected_app(&lab, &dp, 13, target);
    let orig = sa("10.213.0.98:53");
    // One socket asking one server every 300 ms for some 3.6 s: an unchanged record.
    let p = lab.probe(&app, &format!("udp-dns-every 300 12 {orig}"));
    // The programs' clock (boot time), read as soon as the probe is gone.
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).unwrap();
    let now = u64::try_from(now.tv_sec()).unwrap() * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap();
    assert_eq!(p.get("answered"), "12", "{p:?}");
    let mut client = None;
    for _ in 0..12 {
        let s = support::recv_within(&seen, Duration::from_secs(2)).expect("query at target");
        client = Some(s.client);
    }
    let client = client.unwrap();
    let stamps = record_stamps(&lab.bpffs);
    let stamp = stamps.iter().find(|(p, _)| *p == client.port()).unwrap().1;
    let age = now - stamp;
    assert!(
        // Renewed once a second (up to a query's interval late): at most 1.3 s before the
        // client's last query, which the probe followed with a 300 ms pause and its exit (a
        // slow one on a loaded machine); unrenewed, 3.3 s before it.
        age < 3_100_000_000,
        "the record was not renewed: {age} ns old when its client was gone"
    );

    // Its client gone quiet: past the age limit, no record.
    let record = dp.redirect_record(client, UDP).unwrap().record;
    assert_eq!(record.map(|r| r.cgroup_id), Some(app_id));
    std::thread::sleep(Duration::from_millis(6_500));
    assert_eq!(dp.redirect_record(client, UDP).unwrap().record, None);
}

/// A workload asking its DNS target itself (here a target on port 53, as a node-local
/// resolver address would be) was taken for a redirect to the target: the record named the
/// proxy as the original server, and the proxy forwarded the query to itself. And a query sent
/// to the target directly left no record at all, so the proxy knew a host-network sender by
/// address only, which it has none of. Now the record names the cgroup and no original server.
#[test]
fn a_query_to_the_target_itself_names_its_cgroup_and_no_original_server() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let target = v4_at(53);
    let seen = lab.dns_responder(target, dp.clone());
    let (app, app_id) = redirected_app(&lab, &dp, 16, target);

    let elsewhere = sa("10.213.0.99:53");
    let p = lab.probe(&app, &format!("udp-dns {elsewhere}"));
    assert_eq!(p.get("from"), elsewhere.to_string(), "{p:?}");
    let s = support::recv_within(&seen, Duration::from_secs(2)).expect("query at target");
    let record = s.record.expect("a redirect record");
    assert_eq!(
        (record.cgroup_id, record.original),
        (app_id, Some(elsewhere))
    );

    // A socket redirected once and then asking its target itself: the second query has no
    // original server (it kept the first's, and was forwarded there).
    let elsewhere_target = v4_at(5355);
    let seen_elsewhere = lab.dns_responder(elsewhere_target, dp.clone());
    let SocketAddr::V4(t4) = elsewhere_target else {
        unreachable!()
    };
    dp.set_dns_target(16, Some(t4), None).unwrap();
    // The same with the socket connected first (redirected at its connect, so connected to
    // the target): an IPv4 socket's send naming the target is a query to it, whatever the
    // socket is connected to (only a dual-stack socket's sends to its peer keep the original).
    for probe in ["udp-dns-then-target", "udp-dns-connected-then-target"] {
        let p = lab.probe(&app, &format!("{probe} {elsewhere} {elsewhere_target}"));
        assert_eq!(p.get("answered"), "true", "{probe}: {p:?}");
        let records: Vec<_> = (0..2)
            .map(|_| {
                support::recv_within(&seen_elsewhere, Duration::from_secs(2))
                    .and_then(|s| s.record)
                    .map(|r| r.original)
            })
            .collect();
        assert_eq!(records, [Some(Some(elsewhere)), Some(None)], "{probe}");
    }
    dp.set_dns_target(
        16,
        Some(match target {
            SocketAddr::V4(t) => t,
            SocketAddr::V6(_) => unreachable!(),
        }),
        None,
    )
    .unwrap();

    for probe in ["udp-dns", "udp-dns-connected", "tcp-dns"] {
        let p = lab.probe(&app, &format!("{probe} {target}"));
        if probe == "tcp-dns" {
            assert_eq!(p.get("answer"), "true", "{probe}: {p:?}");
        } else {
            assert_eq!(p.get("from"), target.to_string(), "{probe}: {p:?}");
        }
        let s = support::recv_within(&seen, Duration::from_secs(2)).expect("query at target");
        let record = s.record.expect("a record naming the cgroup");
        assert_eq!(
            (record.cgroup_id, record.original),
            (app_id, None),
            "{probe}"
        );
    }
}

#[test]
fn dns_is_redirected_recorded_and_restored() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let rt = runtime();
    let mut events = events(&rt, &dp);
    let (target4, target6) = (v4_at(5353), v6_at(5353));
    let seen4 = lab.dns_responder(target4, dp.clone());
    let seen6 = lab.dns_responder(target6, dp.clone());
    let app = lab.cgroup("app");
    let app_id = Datapath::cgroup_id(&app).unwrap();
    dp.enroll(app_id, 12, true, true).unwrap();
    let (SocketAddr::V4(t4), SocketAddr::V6(t6)) = (target4, target6) else {
        unreachable!()
    };
    dp.set_dns_target(12, Some(t4), Some(t6)).unwrap();
    assert_eq!(dp.dns_target(12).unwrap().unwrap().v4, Some(t4));

    for (orig, seen) in [
        (sa("10.213.0.99:53"), &seen4),
        (sa("[fd00:213::99]:53"), &seen6),
    ] {
        // Unconnected UDP: the answer seems to come from the server the client addressed.
        let p = lab.probe(&app, &format!("udp-dns {orig}"));
        assert_eq!(p.get("from"), orig.to_string(), "{p:?}");
        assert_eq!(p.get("answer"), "true");
        let s = support::recv_within(seen, Duration::from_secs(2)).expect("query at target");
        assert_eq!(s.proto, UDP);
        let record = s.record.expect("redirect record keyed by the client");
        assert_eq!((record.cgroup_id, record.original), (app_id, Some(orig)));

        // Connected UDP: getpeername and recvfrom show the server too.
        let p = lab.probe(&app, &format!("udp-dns-connected {orig}"));
        assert_eq!(p.get("peer"), orig.to_string(), "{p:?}");
        assert_eq!(p.get("from"), orig.to_string());
        let s = support::recv_within(seen, Duration::from_secs(2)).expect("query at target");
        assert_eq!(s.record.and_then(|r| r.original), Some(orig));

        // TCP.
        let p = lab.probe(&app, &format!("tcp-dns {orig}"));
        assert_eq!(p.get("peer"), orig.to_string(), "{p:?}");
        assert_eq!(p.get("answer"), "true");
        let s = support::recv_within(seen, Duration::from_secs(2)).expect("query at target");
        assert_eq!(s.proto, TCP);
        let record = s.record.expect("redirect record for TCP");
        assert_eq!((record.cgroup_id, record.original), (app_id, Some(orig)));
        assert_eq!(
            dp.redirect_record(s.client, TCP)
                .unwrap()
                .record
                .and_then(|r| r.original),
            Some(orig)
        );
    }

    // A real client: dig, if installed.
    let dig = lab.run_in(
        &app,
        "dig",
        &[
            "@10.213.0.99",
            "-p",
            "53",
            "+time=2",
            "+tries=1",
            "example.test",
            "A",
        ],
    );
    if dig.status.code() == Some(127) || String::from_utf8_lossy(&dig.stderr).contains("not found")
    {
        eprintln!("dig or nsenter not installed: skipping the dig check");
    } else {
        let out = String::from_utf8_lossy(&dig.stdout);
        assert!(out.contains("192.0.2.99"), "dig output:\n{out}");
        assert!(out.contains("SERVER: 10.213.0.99#53"), "dig output:\n{out}");
        eprintln!("dig was answered through the redirect and shows the original server");
    }

    // An enforced endpoint without redirect: port 53 elsewhere is refused in sendmsg.
    let plain = lab.cgroup("plain");
    dp.enroll(Datapath::cgroup_id(&plain).unwrap(), 13, true, false)
        .unwrap();
    drain(&mut events);
    let p = lab.probe(&plain, "udp-dns 10.213.0.99:53");
    assert_eq!(p.get("send"), EPERM, "{p:?}");
    let ev = next_event(&rt, &mut events).expect("a drop event");
    assert_eq!((ev.reason, ev.endpoint_id), (DropReason::Sendmsg, 13));
}

/// A socket's original server is its own: no number of other sockets connecting to port 53
/// (three times what the shared LRU of earlier releases held) takes it away, and its answers
/// still come from the server it addressed, with the query recorded as meant for it.
#[test]
fn redirected_socket_keeps_its_server_through_socket_churn() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let target = v4_at(5353);
    let seen = lab.dns_responder(target, dp.clone());
    let (app, app_id) = redirected_app(&lab, &dp, 12, target);

    let orig = sa("10.213.0.99:53");
    let p = lab.probe(&app, &format!("udp-dns-connected-churn 200000 {orig}"));
    assert_seen_as(&p, &seen, app_id, orig);
}

/// A socket redirected by a release that kept originals in the `sock_orig` LRU, by cookie,
/// outlives the upgrade: the programs that keep them in socket storage still find its
/// original there, for getpeername, recvfrom and the redirect record.
#[test]
fn socket_redirected_before_socket_storage_keeps_its_server() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let target = v4_at(5353);
    let seen = lab.dns_responder(target, dp.clone());
    let (_, app_id) = redirected_app(&lab, &dp, 12, target);
    let orig = sa("10.213.0.99:53");
    // Connected to the target itself: this release keeps nothing for it.
    let (p, _) = with_original_by_cookie(&lab, target, orig, target);
    assert_seen_as(&p, &seen, app_id, orig);
}

/// Rolled back to a release that reads originals by cookie only, and upgraded again: this
/// release writes them by cookie too, for the rollback, and a socket the older release
/// redirected anew meanwhile (its storage still holding what this release wrote before) is
/// restored as the older release left it.
#[test]
fn originals_survive_a_rollback_and_the_upgrade_after() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let target = v4_at(5353);
    let seen = lab.dns_responder(target, dp.clone());
    let (_, app_id) = redirected_app(&lab, &dp, 12, target);
    let (first, then) = (sa("10.213.0.99:53"), sa("10.213.0.98:53"));
    let (p, written) = with_original_by_cookie(&lab, first, then, target);
    assert_eq!(
        written,
        Some(raw_sock_orig(first, target)),
        "what a rolled-back release reads"
    );
    assert_seen_as(&p, &seen, app_id, then);
}

/// `p`, a connected query, saw `server` as its peer and as its answer's source, and the query
/// reached the target recorded as the cgroup's, meant for `server`.
fn assert_seen_as(
    p: &support::Probe,
    seen: &std::sync::mpsc::Receiver<support::DnsSeen>,
    cgroup_id: u64,
    server: SocketAddr,
) {
    assert_eq!(p.get("peer"), server.to_string(), "{p:?}");
    assert_eq!(p.get("from"), server.to_string(), "{p:?}");
    let s = support::recv_within(seen, Duration::from_secs(2)).expect("query at target");
    let record = s.record.expect("a redirect record");
    assert_eq!(
        (record.cgroup_id, record.original),
        (cgroup_id, Some(server))
    );
}

/// `struct warden_sock_orig` as the programs write it: two v4-mapped `struct warden_sockaddr`s
/// (address, port in host order, family).
fn raw_sock_orig(orig: SocketAddr, target: SocketAddr) -> [u8; 40] {
    let sockaddr = |addr: SocketAddr| {
        let SocketAddr::V4(v4) = addr else {
            unreachable!()
        };
        let mut raw = [0u8; 20];
        raw[..16].copy_from_slice(&v4.ip().to_ipv6_mapped().octets());
        raw[16..18].copy_from_slice(&v4.port().to_ne_bytes());
        raw[18] = 2; // AF_INET
        raw
    };
    let mut value = [0u8; 40];
    value[..20].copy_from_slice(&sockaddr(orig));
    value[20..].copy_from_slice(&sockaddr(target));
    value
}

/// A connected DNS query from the lab's `app` cgroup to `server`, during which `orig` is
/// recorded by the socket's cookie in `sock_orig` (as a release before socket storage
/// does); returns the probe and what the entry held before.
fn with_original_by_cookie(
    lab: &Lab,
    server: SocketAddr,
    orig: SocketAddr,
    target: SocketAddr,
) -> (support::Probe, Option<[u8; 40]>) {
    let app = lab.cgroup("app");
    let (cookie_file, flag) = (lab.scratch("cookie"), lab.scratch("flag"));
    std::thread::scope(|s| {
        let probe = s.spawn(|| {
            lab.probe(
                &app,
                &format!(
                    "udp-dns-connected-paused {} {} {server}",
                    cookie_file.display(),
                    flag.display()
                ),
            )
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let cookie: u64 = loop {
            if let Some(cookie) = fs::read_to_string(&cookie_file)
                .ok()
                .and_then(|text| text.parse().ok())
            {
                break cookie;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no cookie from the probe"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let pinned = aya::maps::MapData::from_pin(pinned_map(&lab.bpffs, "sock_orig")).unwrap();
        let mut by_cookie: aya::maps::HashMap<_, u64, [u8; 40]> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(pinned)).unwrap();
        let before = by_cookie.get(&cookie, 0).ok();
        by_cookie
            .insert(cookie, raw_sock_orig(orig, target), 0)
            .unwrap();
        fs::write(&flag, b"go").unwrap();
        (probe.join().unwrap(), before)
    })
}

#[test]
fn reopen_replaces_programs_in_place_and_cleanup_removes_everything() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let options = lab.options();
    let first = Datapath::open(&options).unwrap();
    assert_eq!(first.link_actions().len(), PROGRAMS);
    assert!(
        first
            .link_actions()
            .iter()
            .all(|(_, a)| *a == LinkAction::Attached)
    );
    let bpftool = support::attached_programs(&lab.cgroup_root);
    if let Some(attached) = &bpftool {
        assert_eq!(attached.len(), PROGRAMS, "{attached:?}");
    } else {
        eprintln!("bpftool not installed: attachment counts checked through link actions only");
    }

    lab.tcp_server(v4_at(8080));
    let app = lab.cgroup("app");
    let app_id = Datapath::cgroup_id(&app).unwrap();
    first.enroll(app_id, 14, true, false).unwrap();
    let any = FqdnKey::any(14, NS_V4.parse().unwrap());
    first.allow_fqdn(any, now() + 60).unwrap();
    let connect = format!("tcp {}", v4_at(8080));

    // Another release's layout (an upgrade's or a rollback's): its pins go once the links run
    // this build, so that a dnsproxy of that release stops writing into them.
    let other_layout = options.bpffs.join("v0");
    fs::create_dir_all(other_layout.join("progs")).unwrap();
    let not_a_layout = options.bpffs.join("v0-notes");
    fs::create_dir_all(&not_a_layout).unwrap();
    // A link named like a layout: only a folder is one, what a link points to is left alone.
    let elsewhere_files = tempfile::tempdir().unwrap();
    fs::write(elsewhere_files.path().join("keep"), "keep me").unwrap();
    let linked = options.bpffs.join("v7");
    std::os::unix::fs::symlink(elsewhere_files.path(), &linked).unwrap();

    // Second open (an agent restart): same pins, programs replaced through the links.
    let second = Datapath::open(&options).unwrap();
    assert!(!other_layout.exists());
    assert!(not_a_layout.exists());
    fs::remove_dir(&not_a_layout).unwrap();
    assert!(elsewhere_files.path().join("keep").exists());
    fs::remove_file(&linked).unwrap();
    assert!(
        second
            .link_actions()
            .iter()
            .all(|(_, a)| *a == LinkAction::Updated),
        "{:?}",
        second.link_actions()
    );
    if bpftool.is_some() {
        assert_eq!(
            support::attached_programs(&lab.cgroup_root).unwrap().len(),
            PROGRAMS
        );
    }
    assert!(
        second
            .enrolled()
            .unwrap()
            .iter()
            .any(|(id, e)| *id == app_id && e.endpoint_id == 14 && e.enforced)
    );
    assert_eq!(lab.probe(&app, &connect).get("result"), "ok");
    // The first handle writes into the same maps.
    first.revoke_fqdn(&any).unwrap();
    assert_eq!(lab.probe(&app, &connect).get("result"), EPERM);
    // A second process opening the pins only (the standalone proxy).
    let proxy = Datapath::open_pinned(&options.bpffs).unwrap();
    proxy.allow_fqdn(any, now() + 60).unwrap();
    assert_eq!(lab.probe(&app, &connect).get("result"), "ok");

    // A new cgroup root: links move there (attached first, then the old ones detached).
    let elsewhere = lab.cgroup("elsewhere");
    let moved = Datapath::open(&DatapathOptions {
        cgroup_root: Some(elsewhere.clone()),
        bpffs: options.bpffs.clone(),
    })
    .unwrap();
    assert!(
        moved
            .link_actions()
            .iter()
            .all(|(_, a)| *a == LinkAction::Moved)
    );
    if bpftool.is_some() {
        assert_eq!(
            support::attached_programs(&elsewhere).unwrap().len(),
            PROGRAMS
        );
        assert_eq!(
            support::attached_programs(&lab.cgroup_root).unwrap().len(),
            0
        );
    }

    assert!(!proxy.pins_replaced());
    drop((first, second, moved));
    let report = Datapath::cleanup(&options).unwrap();
    assert_eq!(report.links_detached.len(), PROGRAMS, "{report:?}");
    assert!(report.pins_removed.len() >= 11, "{report:?}");
    assert!(report.dir_removed);
    assert!(!options.bpffs.exists());
    if bpftool.is_some() {
        assert_eq!(support::attached_programs(&elsewhere).unwrap().len(), 0);
        assert_eq!(
            support::attached_programs(&lab.cgroup_root).unwrap().len(),
            0
        );
    }
    // A process that kept the maps open (the standalone proxy) sees them replaced: unpinned,
    // then pinned anew by an agent's next start; what it wrote there no program would read.
    assert!(proxy.pins_replaced());
    let again = Datapath::open(&options).unwrap();
    assert!(proxy.pins_replaced());
    let fresh = Datapath::open_pinned(&options.bpffs).unwrap();
    assert!(!fresh.pins_replaced());
    // Any map it uses, not only the allow map: one unpinned (by a cleanup that stopped part
    // way, say) is one replaced.
    fs::remove_file(pinned_map(&options.bpffs, "last_seen")).unwrap();
    assert!(fresh.pins_replaced());
    drop((again, proxy, fresh));
    Datapath::cleanup(&options).unwrap();
    // Cleaning up twice is harmless.
    assert_eq!(Datapath::cleanup(&options).unwrap().links_detached.len(), 0);
}

/// Where the map `name` is pinned under `bpffs`, in whichever layout's folder holds it.
fn pinned_map(bpffs: &Path, name: &str) -> PathBuf {
    fs::read_dir(bpffs)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.path().join(name))
        .find(|path| path.exists())
        .unwrap()
}

/// A UDP socket on `addr` with SO_REUSEPORT, reading with a short timeout.
fn reuseport_socket(addr: SocketAddr) -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    s.into()
}

/// `N` sockets of [`reuseport_socket`] on one kernel-chosen port of `ip`, and that address.
fn sockets_on_one_port<const N: usize>(ip: &str) -> (SocketAddr, [UdpSocket; N]) {
    let mut address = sa(&format!("{ip}:0"));
    let sockets = std::array::from_fn(|_| {
        let socket = reuseport_socket(address);
        address = socket.local_addr().unwrap();
        socket
    });
    (address, sockets)
}

/// How many of `clients` datagrams to `port`, each from a source port of its own (so that
/// the kernel's hash alone would spread them), each of `sockets` got. A client not heard from
/// is sent again from its port every pass (about 20 ms per socket): the selection depends
/// on the addresses alone, so a resend goes where the first would have, and a datagram a loaded
/// machine drops or holds up on loopback (CI once: 9 of 64 missing after 300 ms) does not read
/// as a wrong selection, where one the program drops stays missing. (A selection wrong only
/// now and then, which a resend would correct, goes unseen.)
fn deliveries(port: SocketAddr, sockets: &[&UdpSocket], clients: usize) -> Vec<usize> {
    // Each call's own tag: a late copy of an earlier call's datagram is not counted here.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let senders: Vec<UdpSocket> = (0..clients)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut heard_on: Vec<Option<usize>> = vec![None; clients];
    let mut counts = vec![0; sockets.len()];
    let mut buf = [0u8; 16];
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline && heard_on.contains(&None) {
        for (client, sender) in senders.iter().enumerate() {
            if heard_on[client].is_none() {
                let mut datagram = [0u8; 8];
                datagram[..4].copy_from_slice(&call.to_be_bytes());
                datagram[4..].copy_from_slice(&(client as u32).to_be_bytes());
                sender.send_to(&datagram, port).unwrap();
            }
        }
        for (i, s) in sockets.iter().enumerate() {
            while let Ok(len) = s.recv(&mut buf) {
                let tag = |range: std::ops::Range<usize>| {
                    u32::from_be_bytes(buf[range].try_into().unwrap()) as usize
                };
                if len != 8 || tag(0..4) != call as usize {
                    continue;
                }
                let client = tag(4..8);
                if heard_on.get(client) == Some(&None) {
                    heard_on[client] = Some(i);
                    counts[i] += 1;
                }
            }
        }
    }
    counts
}

#[test]
fn reuseport_prefers_the_chosen_instance_and_falls_back() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let (port, [s0, s1]) = sockets_on_one_port("127.0.0.1");
    dp.reuseport_set(0, &s0).unwrap();
    dp.reuseport_set(1, &s1).unwrap();
    dp.attach_reuseport(&s0).unwrap();
    let deliveries = |sockets: &[&UdpSocket]| deliveries(port, sockets, 16);

    dp.reuseport_prefer(1).unwrap();
    assert_eq!(deliveries(&[&s0, &s1]), vec![0, 16]);
    dp.reuseport_prefer(0).unwrap();
    assert_eq!(deliveries(&[&s0, &s1]), vec![16, 0]);
    // The preferred socket closes: it leaves the array and the other one gets everything.
    drop(s0);
    assert_eq!(deliveries(&[&s1]), vec![16]);
    assert!(dp.reuseport_prefer(2).is_err());
}

/// A process stopping gracefully connects its sockets to themselves and steers to its peer;
/// with the peer not in the selection (a dnsproxy before its first policy) the program falls
/// back to the stopping process's sockets. The kernel's UDP lookup passes over a connected
/// socket the program picked when its group has another (scoring goes on once a group holds
/// connected sockets): the graceful stop relies on it, and this checks it. (Taking the
/// stopping instance out of the selection instead clears it by instance number, which a
/// replacement of the same instance may already hold.)
#[test]
fn the_kernel_passes_over_a_stopping_socket_the_program_picked() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let (port, [stopping, peer]) = sockets_on_one_port("127.0.0.1");
    dp.reuseport_register(0, &[&stopping]).unwrap();
    dp.attach_reuseport(&stopping).unwrap();
    dp.reuseport_prefer(0).unwrap();
    assert_eq!(deliveries(port, &[&stopping, &peer], 16), vec![16, 0]);

    // As the UDP listener stops receiving: connected to its own address; then steered away.
    stopping.connect(port).unwrap();
    dp.reuseport_prefer(1).unwrap();
    assert_eq!(deliveries(port, &[&stopping, &peer], 16), vec![0, 16]);
}

/// A process's `dns.listen_sockets` sockets of an address share the queries the selection
/// sends it: with one socket per instance and slot, the preferred process read every query on
/// one socket, one loop, whatever its other sockets.
#[test]
fn reuseport_spreads_an_instances_clients_over_its_sockets() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    let (port, [first, second, peer]) = sockets_on_one_port("127.0.0.1");
    dp.reuseport_register(0, &[&first, &second]).unwrap();
    dp.reuseport_register(1, &[&peer]).unwrap();
    dp.attach_reuseport(&first).unwrap();

    dp.reuseport_prefer(0).unwrap();
    let shares = deliveries(port, &[&first, &second, &peer], 64);
    assert_eq!(shares.iter().sum::<usize>(), 64, "{shares:?}");
    assert!(
        shares[0] > 0 && shares[1] > 0,
        "both of instance 0's: {shares:?}"
    );
    assert_eq!(shares[2], 0, "none to the peer: {shares:?}");
    dp.reuseport_prefer(1).unwrap();
    assert_eq!(
        deliveries(port, &[&first, &second, &peer], 64),
        vec![0, 0, 64]
    );

    // A socket of the spread closes: the clients it had go to the slot's own socket.
    dp.reuseport_prefer(0).unwrap();
    drop(second);
    assert_eq!(deliveries(port, &[&first, &peer], 64), vec![64, 0]);

    // A second address of the family is another reuseport group: the slot cannot select
    // from it, and the kernel's hash spreads its clients over its sockets, as before.
    let (elsewhere_port, [elsewhere, elsewhere_too]) = sockets_on_one_port("127.0.0.2");
    let (fresh_port, [fresh, fresh_too]) = sockets_on_one_port("127.0.0.1");
    dp.attach_reuseport(&elsewhere).unwrap();
    dp.attach_reuseport(&fresh).unwrap();
    dp.reuseport_unregister(0).unwrap();
    dp.reuseport_register(0, &[&fresh, &fresh_too, &elsewhere, &elsewhere_too])
        .unwrap();
    for (port, sockets) in [
        (fresh_port, [&fresh, &fresh_too]),
        (elsewhere_port, [&elsewhere, &elsewhere_too]),
    ] {
        let shares = deliveries(port, &sockets, 64);
        assert_eq!(shares.iter().sum::<usize>(), 64, "{port}: {shares:?}");
        assert!(shares.iter().all(|share| *share > 0), "{port}: {shares:?}");
    }

    // Pins older than the spread and the sockets' own storage (an older agent's): a newer
    // process opens them (a dnsproxy upgraded first), registers the first socket of each slot
    // alone, and says nothing is wrong.
    fs::remove_file(pinned_map(&lab.bpffs, "reuseport_spread")).unwrap();
    fs::remove_file(pinned_map(&lab.bpffs, "sock_origins")).unwrap();
    let older = Datapath::open_pinned(&lab.bpffs).unwrap();
    let (_, [other, beside]) = sockets_on_one_port("127.0.0.1");
    older.reuseport_register(1, &[&other, &beside]).unwrap();
}

/// The agent's pins replaced (its cleanup and a new start), warden-dnsproxy moves its sockets
/// to the new maps; the kernel held them in the old ones, which live on while the process
/// still has them open, and refused them anew (EBUSY): the proxy stayed out of the selection.
#[test]
fn reuseport_sockets_move_to_replaced_pins() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let options = lab.options();
    let old = Datapath::open(&options).unwrap();
    let (port, [first, second]) = sockets_on_one_port("127.0.0.1");
    old.reuseport_register(1, &[&first, &second]).unwrap();

    Datapath::cleanup(&options).unwrap();
    let new = Datapath::open(&options).unwrap();
    assert!(
        new.reuseport_register(1, &[&first, &second]).is_err(),
        "still held by the old maps"
    );
    old.reuseport_unregister(1).unwrap();
    new.reuseport_register(1, &[&first, &second]).unwrap();
    // Registering again (warden-dnsproxy at its next snapshot, after a failure) replaces what
    // the instance had: the maps' own hold of the sockets is no refusal.
    new.reuseport_register(1, &[&first, &second]).unwrap();
    new.attach_reuseport(&first).unwrap();
    new.reuseport_prefer(1).unwrap();
    let shares = deliveries(port, &[&first, &second], 64);
    assert!(shares.iter().all(|share| *share > 0), "{shares:?}");
    drop((old, new));
    Datapath::cleanup(&options).unwrap();
}

#[test]
fn map_api_round_trips() {
    skip_unless_privileged!();
    let lab = Lab::new();
    let dp = Datapath::open(&lab.options()).unwrap();
    dp.enroll(1, 100, true, true).unwrap();
    dp.enroll(2, 200, false, false).unwrap();
    let mut enrolled = dp.enrolled().unwrap();
    enrolled.sort_by_key(|(id, _)| *id);
    assert_eq!(enrolled.len(), 2);
    assert!(enrolled[0].1.enforced && enrolled[0].1.redirect_dns);
    assert!(!enrolled[1].1.enforced);
    dp.unenroll(2).unwrap();
    dp.unenroll(2).unwrap(); // absent is fine
    assert_eq!(dp.enrolled().unwrap().len(), 1);

    dp.set_dns_target(100, None, Some("[fd00::1]:53".parse().unwrap()))
        .unwrap();
    let target = dp.dns_target(100).unwrap().unwrap();
    assert_eq!(
        (target.v4, target.v6),
        (None, Some("[fd00::1]:53".parse().unwrap()))
    );
    dp.set_dns_target(100, None, None).unwrap();
    assert_eq!(dp.dns_target(100).unwrap(), None);

    // The later expiry wins, whoever writes.
    let key = FqdnKey {
        endpoint_id: 100,
        ip: "192.0.2.1".parse().unwrap(),
        proto: Some(TCP),
        port: Some(443),
    };
    dp.allow_fqdn(key, 1_000).unwrap();
    dp.allow_fqdn(key, 500).unwrap();
    assert_eq!(dp.fqdn_entries().unwrap(), vec![(key, 1_000)]);
    let other = Datapath::open_pinned(&lab.bpffs).unwrap();
    other.allow_fqdn(key, 2_000).unwrap();
    assert_eq!(dp.fqdn_entries().unwrap(), vec![(key, 2_000)]);
    // The reconciler revokes by what it listed: an entry extended since (an answer for the
    // name meanwhile, here another process's) stays.
    let (_, listed) = dp.fqdn_entries().unwrap()[0];
    other.allow_fqdn(key, 3_000).unwrap();
    assert!(!dp.revoke_fqdn_unless_extended(&key, listed).unwrap());
    assert_eq!(dp.fqdn_entries().unwrap(), vec![(key, 3_000)]);
    assert!(dp.revoke_fqdn_unless_extended(&key, 3_000).unwrap());
    assert!(
        !dp.revoke_fqdn_unless_extended(&key, 3_000).unwrap(),
        "gone"
    );
    dp.allow_fqdn(key, 1_000).unwrap();
    dp.revoke_fqdn(&key).unwrap();
    dp.revoke_fqdn(&key).unwrap();
    assert!(dp.fqdn_entries().unwrap().is_empty());

    assert_eq!(
        dp.last_seen(100, "192.0.2.1".parse().unwrap()).unwrap(),
        None
    );
    assert_eq!(
        dp.redirect_record(sa("192.0.2.1:5000"), UDP)
            .unwrap()
            .record,
        None
    );
    assert!(
        Datapath::open_pinned(&lab.bpffs.join("nowhere")).is_err(),
        "open_pinned without pins must fail"
    );
}
