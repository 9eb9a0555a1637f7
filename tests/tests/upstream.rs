//! The test support checked against knotd directly: the lab zones answer as documented, the
//! clients parse what they get, and zone changes become visible.

use std::net::{IpAddr, Ipv4Addr};

use warden_tests::zones::{self, *};
use warden_tests::{
    DigOpts, KnotUpstream, dig, dnsperf, init_tracing, kdig, kdig_tcp_multi, require_tools,
    unique_loopback_v4, write_queries_file,
};

const TOOLS: &[&str] = &["knotd", "knotc", "dig", "kdig"];

fn start() -> Option<KnotUpstream> {
    init_tracing();
    if !require_tools(TOOLS) {
        return None;
    }
    Some(KnotUpstream::start(unique_loopback_v4()).expect("knotd starts"))
}

fn v4(ips: &[Ipv4Addr]) -> Vec<IpAddr> {
    ips.iter().copied().map(IpAddr::V4).collect()
}

#[tokio::test]
async fn every_zone_answers_a_and_aaaa() {
    let Some(knot) = start() else { return };
    let s = knot.addr();
    let cases: &[(&str, &str, IpAddr)] = &[
        ("cilium.io", "A", CILIUM_IO_V4.into()),
        ("cilium.io", "AAAA", CILIUM_IO_V6.into()),
        ("google.com", "A", GOOGLE_COM_V4.into()),
        ("google.com", "AAAA", GOOGLE_COM_V6.into()),
        ("www.google.com", "A", WWW_GOOGLE_COM_V4.into()),
        ("bbc.co.uk", "A", BBC_CO_UK_V4.into()),
        ("bbc.co.uk", "AAAA", BBC_CO_UK_V6.into()),
        ("example.org", "A", EXAMPLE_ORG_V4.into()),
        ("short.example.org", "A", SHORT_EXAMPLE_ORG_V4.into()),
        ("anysub.cilium.io", "A", ANYSUB_CILIUM_IO_V4.into()),
        ("sub.cilium.io", "A", SUB_CILIUM_IO_V4.into()),
        ("subdomain.cilium.io", "A", SUBDOMAIN_CILIUM_IO_V4.into()),
        ("a.b.cilium.io", "A", A_B_CILIUM_IO_V4.into()),
        (
            "_foobar._tcp.cilium.io",
            "A",
            FOOBAR_TCP_CILIUM_IO_V4.into(),
        ),
        ("www2.cilium.io", "A", WWW2_CILIUM_IO_V4.into()),
        // DNS names are case-insensitive; tests may query mixed case.
        ("WwW2.CiLiUm.Io", "A", WWW2_CILIUM_IO_V4.into()),
    ];
    for (name, qtype, want) in cases {
        let r = dig(s, name, qtype, DigOpts::default()).await.unwrap();
        assert_eq!(r.status, "NOERROR", "{name} {qtype}\n{}", r.raw);
        assert!(r.has_flag("aa"), "{}", r.raw);
        assert_eq!(r.ips(), [*want], "{name} {qtype}\n{}", r.raw);
    }
    let r = dig(s, "google.com", "A", DigOpts::default()).await.unwrap();
    assert_eq!(r.min_ttl(), Some(GOOGLE_COM_TTL));
    let r = dig(s, "short.example.org", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.min_ttl(), Some(SHORT_EXAMPLE_ORG_TTL));

    let r = kdig(s, "bbc.co.uk", "AAAA", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.ips(), [IpAddr::from(BBC_CO_UK_V6)], "{}", r.raw);

    let r = dig(s, "nope.cilium.io", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.status, "NXDOMAIN", "{}", r.raw);
    assert_eq!(r.authority[0].rtype, "SOA", "{}", r.raw);
    // Not a lab zone: an authoritative-only server refuses it.
    let r = kdig(s, "example.com", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.status, "REFUSED", "{}", r.raw);
}

#[tokio::test]
async fn cname_chain_has_documented_ttls() {
    let Some(knot) = start() else { return };
    for tcp in [false, true] {
        let opts = DigOpts {
            tcp,
            ..DigOpts::default()
        };
        let r = dig(knot.addr(), "www.cilium.io", "A", opts).await.unwrap();
        let chain: Vec<(&str, u32, &str, &str)> = r
            .answers
            .iter()
            .map(|a| (a.name.as_str(), a.ttl, a.rtype.as_str(), a.data.as_str()))
            .take(2)
            .collect();
        assert_eq!(
            chain,
            [
                (
                    "www.cilium.io.",
                    WWW_CILIUM_IO_TTL,
                    "CNAME",
                    "web.cilium.io."
                ),
                (
                    "web.cilium.io.",
                    WEB_CILIUM_IO_TTL,
                    "CNAME",
                    "edge.cilium.io."
                ),
            ],
            "{}",
            r.raw
        );
        let mut ips = r.ips();
        ips.sort();
        assert_eq!(ips, v4(&EDGE_CILIUM_IO_V4), "{}", r.raw);
        assert!(r.answers_of("A").all(|a| a.ttl == EDGE_CILIUM_IO_TTL));
        assert_eq!(r.min_ttl(), Some(EDGE_CILIUM_IO_TTL));
        assert_eq!(
            r.transport.as_deref(),
            Some(if tcp { "TCP" } else { "UDP" })
        );
    }
}

#[tokio::test]
async fn big_answers_truncate_over_udp_and_arrive_over_tcp() {
    let Some(knot) = start() else { return };
    let s = knot.addr();
    let no_edns = DigOpts {
        edns: false,
        ignore_tc: true,
        ..DigOpts::default()
    };
    for (name, qtype) in [("big.cilium.io", "A"), ("big-txt.cilium.io", "TXT")] {
        let udp = dig(s, name, qtype, no_edns).await.unwrap();
        assert!(udp.truncated(), "{name}\n{}", udp.raw);
        assert!(udp.size.unwrap() <= 512, "{}", udp.raw);
        let udp = kdig(s, name, qtype, no_edns).await.unwrap();
        assert!(udp.truncated(), "{name}\n{}", udp.raw);

        // Without +ignore dig falls back to TCP by itself.
        let fallback = dig(
            s,
            name,
            qtype,
            DigOpts {
                edns: false,
                ..DigOpts::default()
            },
        )
        .await
        .unwrap();
        assert!(!fallback.truncated(), "{}", fallback.raw);
        assert_eq!(
            fallback.transport.as_deref(),
            Some("TCP"),
            "{}",
            fallback.raw
        );

        let tcp = kdig(s, name, qtype, DigOpts::tcp()).await.unwrap();
        assert!(!tcp.truncated(), "{}", tcp.raw);
        assert!(tcp.size.unwrap() > 512, "{}", tcp.raw);
        if qtype == "A" {
            let mut ips = tcp.ips();
            ips.sort();
            assert_eq!(ips, v4(&big_cilium_io_v4()), "{}", tcp.raw);
        } else {
            let mut got: Vec<String> = tcp
                .answers_of("TXT")
                .map(|a| a.data.trim_matches('"').to_owned())
                .collect();
            got.sort();
            assert_eq!(got, big_txt_strings(), "{}", tcp.raw);
        }
    }
}

#[tokio::test]
async fn zone_change_is_served_after_reload() {
    let Some(mut knot) = start() else { return };
    let s = knot.addr();
    let new: [IpAddr; 2] = [
        "198.18.1.99".parse().unwrap(),
        "fd00:77::99".parse().unwrap(),
    ];
    knot.set_addrs("edge.cilium.io", 30, &new).unwrap();
    let r = dig(s, "www.cilium.io", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.ips(), [new[0]], "{}", r.raw);
    assert_eq!(r.min_ttl(), Some(30), "{}", r.raw);
    let r = dig(s, "edge.cilium.io", "AAAA", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.ips(), [new[1]], "{}", r.raw);

    knot.set_zone_record("new.example.org", "TXT", 10, &["\"hello\""])
        .unwrap();
    let r = kdig(s, "NEW.example.org", "TXT", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.answers[0].data, "\"hello\"", "{}", r.raw);

    knot.set_zone_record("google.com", "A", 300, &[]).unwrap();
    let r = dig(s, "google.com", "A", DigOpts::default()).await.unwrap();
    assert_eq!(
        (r.status.as_str(), r.answers.len()),
        ("NOERROR", 0),
        "{}",
        r.raw
    );

    // Batch edits through zones_mut() and a full reload.
    let serial = knot.zones()[0].serial;
    knot.zones_mut()[0].set_rrset("www2", "A", 300, &["198.18.1.98".to_owned()]);
    knot.reload().unwrap();
    assert_eq!(knot.zones()[0].serial, serial + 1);
    let r = dig(s, "www2.cilium.io", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(
        r.ips(),
        ["198.18.1.98".parse::<IpAddr>().unwrap()],
        "{}",
        r.raw
    );

    assert!(knot.set_zone_record("not.a.lab.zone", "A", 1, &[]).is_err());
}

#[tokio::test]
async fn kdig_reuses_one_tcp_connection() {
    let Some(knot) = start() else { return };
    let replies = kdig_tcp_multi(knot.addr(), &["cilium.io", "google.com", "bbc.co.uk"])
        .await
        .unwrap();
    let ips: Vec<Vec<IpAddr>> = replies.iter().map(|r| r.ips()).collect();
    assert_eq!(
        ips,
        [
            vec![IpAddr::from(CILIUM_IO_V4)],
            vec![GOOGLE_COM_V4.into()],
            vec![BBC_CO_UK_V4.into()]
        ]
    );
    assert!(
        replies
            .iter()
            .all(|r| r.transport.as_deref() == Some("TCP"))
    );
}

#[tokio::test]
async fn no_reply_is_a_typed_error() {
    init_tracing();
    if !require_tools(&["dig", "kdig"]) {
        return;
    }
    // Nothing listens there: UDP gets ICMP port unreachable, TCP a reset.
    let ip = unique_loopback_v4();
    let port = warden_tests::free_port(ip).unwrap();
    let s = (ip, port).into();
    let opts = DigOpts {
        timeout_s: 1,
        ..DigOpts::default()
    };
    for err in [
        dig(s, "cilium.io", "A", opts).await.unwrap_err(),
        kdig(s, "cilium.io", "A", DigOpts::tcp()).await.unwrap_err(),
    ] {
        assert!(
            err.downcast_ref::<warden_tests::NoReply>().is_some(),
            "{err:#}"
        );
    }
}

#[tokio::test]
async fn ipv6_loopback_works() {
    init_tracing();
    if !require_tools(TOOLS) {
        return;
    }
    let knot = KnotUpstream::start("::1".parse().unwrap()).unwrap();
    let r = dig(knot.addr(), "cilium.io", "AAAA", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.ips(), [IpAddr::from(CILIUM_IO_V6)], "{}", r.raw);
}

#[tokio::test]
async fn dnsperf_at_200_qps_loses_nothing() {
    let Some(knot) = start() else { return };
    if !require_tools(&["dnsperf"]) {
        return;
    }
    let queries = write_queries_file(&[
        ("cilium.io", "A"),
        ("www.cilium.io", "A"),
        ("google.com", "AAAA"),
        ("bbc.co.uk", "A"),
        ("nope.example.org", "A"),
    ])
    .unwrap();
    let report = dnsperf(knot.addr(), queries.path(), 2, Some(200), 2)
        .await
        .unwrap();
    assert_eq!(report.lost, 0, "{report}\n{}", report.raw);
    assert_eq!(report.completed, report.sent, "{report}");
    // 2 s at 200 qps; allow for the rate limiter's edges.
    assert!((350..=450).contains(&report.sent), "{report}");
    assert!(report.rcodes["NXDOMAIN"] > 0, "{report}");
    assert!(report.qps > 150.0, "{report}");
}

#[test]
fn drop_stops_knotd_and_removes_its_files() {
    init_tracing();
    if !require_tools(TOOLS) {
        return;
    }
    let knot = KnotUpstream::start(unique_loopback_v4()).unwrap();
    let pid = knot.pid().unwrap();
    let dir = knot.dir().to_owned();
    let addr = knot.addr();
    assert!(dir.join(zones::lab_zones()[0].file_name()).exists());
    drop(knot);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "knotd {pid} still running"
    );
    // The port is free again for both protocols.
    std::net::UdpSocket::bind(addr).unwrap();
    std::net::TcpListener::bind(addr).unwrap();
}

#[tokio::test]
async fn bad_zone_data_fails_fast_and_is_rolled_back() {
    let Some(mut knot) = start() else { return };
    let s = knot.addr();
    let err = knot
        .set_zone_record("bad.cilium.io", "A", 5, &["not-an-address"])
        .unwrap_err();
    assert!(format!("{err:#}").contains("invalid address"), "{err:#}");
    // The next change must not drag the rejected record along.
    knot.set_zone_record("good.cilium.io", "A", 5, &["198.18.1.97"])
        .unwrap();
    let r = dig(s, "good.cilium.io", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(
        r.ips(),
        ["198.18.1.97".parse::<IpAddr>().unwrap()],
        "{}",
        r.raw
    );
    let r = dig(s, "bad.cilium.io", "A", DigOpts::default())
        .await
        .unwrap();
    assert_eq!(r.status, "NXDOMAIN", "{}", r.raw);

    let mut zones = lab_zones();
    zones[1]
        .records
        .push(ZoneRecord::new("bad", 5, "A", "not-an-address"));
    let started = std::time::Instant::now();
    let err = KnotUpstream::start_with_zones(unique_loopback_v4(), zones).unwrap_err();
    assert!(
        format!("{err:#}").contains("could not load google.com."),
        "{err:#}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
