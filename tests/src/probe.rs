//! In-process UDP queries for watching knotd itself. Sync and dependency-free on purpose:
//! `KnotUpstream` must work in plain `#[test]`s and in `Drop`-adjacent code, without a runtime
//! and without relying on the client tools the tests exercise.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};

/// Sends one query for (`name`, `rtype`) to `server` over UDP and returns the parsed reply.
pub(crate) fn udp_query(
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
    timeout: Duration,
) -> Result<Message> {
    let qname = Name::from_ascii(name).with_context(|| format!("bad query name {name:?}"))?;
    let mut msg = Message::query();
    msg.add_query(Query::query(qname, rtype));
    let id = msg.metadata.id;
    let wire = msg.to_vec().context("encoding probe query")?;

    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).context("binding probe socket")?;
    sock.connect(server)
        .with_context(|| format!("connecting probe socket to {server}"))?;
    sock.send(&wire)
        .with_context(|| format!("sending probe to {server}"))?;

    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65535];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no reply from {server} for {name} {rtype} within {timeout:?}");
        }
        sock.set_read_timeout(Some(left))
            .context("setting probe timeout")?;
        // A connected socket only sees the server's datagrams, but a refused port shows up
        // as an error here, which is what callers want to retry on.
        let n = sock
            .recv(&mut buf)
            .with_context(|| format!("waiting for {server} to answer {name} {rtype}"))?;
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if reply.metadata.id == id {
            return Ok(reply);
        }
    }
}

/// The SOA serial `server` serves for `zone`, or an error if it does not answer with one.
pub(crate) fn soa_serial(server: SocketAddr, zone: &str, timeout: Duration) -> Result<u32> {
    let reply = udp_query(server, zone, RecordType::SOA, timeout)?;
    reply
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(soa.serial),
            _ => None,
        })
        .with_context(|| {
            format!(
                "{server} has no SOA for {zone} (rcode {})",
                reply.metadata.response_code
            )
        })
}
