//! Drop events: the `events` ring buffer read asynchronously (tokio `AsyncFd`) as typed values.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::SystemTime;

use aya::maps::{Map, MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::abi::{self, DROP_EVENT_SIZE};
use crate::clock;
use crate::{DatapathError, sys};

/// Why a socket call was refused or a packet dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// `connect()` to a destination the policy does not allow (the caller got EPERM).
    Connect,
    /// `sendmsg()` with such a destination (EPERM).
    Sendmsg,
    /// A packet to such a destination, dropped in `cgroup_skb/egress`.
    Egress,
    /// An IPv6 packet with extension headers, whose destination is not wholly allowed.
    Ipv6ExtensionHeaders,
    /// A non-first IPv4 fragment, whose destination is not wholly allowed.
    Fragment,
    /// ICMP or another port-less protocol, whose destination is not wholly allowed.
    NoPorts,
    /// Headers that could not be parsed.
    Malformed,
    /// A reason this crate does not know (newer programs).
    Other(u8),
}

impl DropReason {
    fn from_raw(raw: u8) -> Self {
        match raw {
            1 => Self::Connect,
            2 => Self::Sendmsg,
            3 => Self::Egress,
            4 => Self::Ipv6ExtensionHeaders,
            5 => Self::Fragment,
            6 => Self::NoPorts,
            7 => Self::Malformed,
            other => Self::Other(other),
        }
    }

    /// A short stable label (for logs and metric labels).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Sendmsg => "sendmsg",
            Self::Egress => "egress",
            Self::Ipv6ExtensionHeaders => "ipv6_ext_headers",
            Self::Fragment => "fragment",
            Self::NoPorts => "no_ports",
            Self::Malformed => "malformed",
            Self::Other(_) => "other",
        }
    }
}

/// One refused connection or dropped packet of an enforced endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// When the kernel refused it.
    pub time: SystemTime,
    /// The enrolled cgroup (the socket's own or its nearest enrolled ancestor).
    pub cgroup_id: u64,
    /// The endpoint of that cgroup.
    pub endpoint_id: u32,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6; 0 when hidden behind IPv6
    /// extension headers).
    pub proto: u8,
    /// Source address and port; unspecified (and port 0) for refusals in socket calls, where
    /// the kernel has not chosen them yet.
    pub src: SocketAddr,
    /// Destination address and port (port 0 for port-less packets).
    pub dst: SocketAddr,
    /// Why.
    pub reason: DropReason,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

fn addr_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    a
}

/// Parses `struct warden_drop_event` (offsets from bpf/warden.h).
pub(crate) fn parse_drop_event(b: &[u8]) -> Option<DropEvent> {
    if b.len() < DROP_EVENT_SIZE {
        return None;
    }
    let family = b[20];
    let endpoint = |addr: [u8; 16], port: u16| {
        if addr == [0; 16] {
            let ip = if family == abi::AF_INET {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            };
            SocketAddr::new(ip, port)
        } else {
            abi::socket_addr_of(addr, port)
        }
    };
    Some(DropEvent {
        time: clock::boot_ns_to_system(u64_at(b, 0)),
        cgroup_id: u64_at(b, 8),
        endpoint_id: u32_at(b, 16),
        proto: b[21],
        reason: DropReason::from_raw(b[22]),
        src: endpoint(addr_at(b, 24), u16_at(b, 56)),
        dst: endpoint(addr_at(b, 40), u16_at(b, 58)),
    })
}

/// The reader of the `events` ring buffer. A ring buffer has one consumer at a time: open one
/// reader per node (the agent's). Events written while no reader runs wait in the buffer (1 MiB,
/// about 16k events); past that the kernel drops new events, never the verdicts.
pub struct DropEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl std::fmt::Debug for DropEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropEvents").finish_non_exhaustive()
    }
}

impl DropEvents {
    /// Must be called inside a tokio runtime with IO enabled.
    pub(crate) fn new(map: MapData) -> Result<Self, DatapathError> {
        let ring = RingBuf::try_from(
            Map::from_map_data(map).map_err(|e| DatapathError::map(abi::map::EVENTS, "open", e))?,
        )
        .map_err(|e| DatapathError::map(abi::map::EVENTS, "open", e))?;
        let ring = sys::async_ring(ring).map_err(|source| DatapathError::Events { source })?;
        Ok(Self { ring })
    }

    /// The next event, waiting for one if the buffer is empty.
    pub async fn next(&mut self) -> Result<DropEvent, DatapathError> {
        loop {
            if let Some(event) = self.try_next() {
                return Ok(event);
            }
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .map_err(|source| DatapathError::Events { source })?;
            // Check again under the guard: clearing readiness is only correct once the buffer
            // has been seen empty after the wake-up.
            if let Some(event) = next_event(guard.get_inner_mut()) {
                return Ok(event);
            }
            guard.clear_ready();
        }
    }

    /// The next event if one is already buffered.
    pub fn try_next(&mut self) -> Option<DropEvent> {
        next_event(self.ring.get_mut())
    }
}

fn next_event(ring: &mut RingBuf<MapData>) -> Option<DropEvent> {
    // Records of an unexpected size (a newer program) are skipped rather than misread.
    loop {
        let item = ring.next()?;
        if let Some(event) = parse_drop_event(&item) {
            return Some(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_c_layout() {
        let mut b = vec![0u8; DROP_EVENT_SIZE];
        b[8..16].copy_from_slice(&42u64.to_ne_bytes());
        b[16..20].copy_from_slice(&7u32.to_ne_bytes());
        b[20] = abi::AF_INET;
        b[21] = 6;
        b[22] = 1;
        b[40..56].copy_from_slice(&Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets());
        b[58..60].copy_from_slice(&8080u16.to_ne_bytes());
        let ev = parse_drop_event(&b).unwrap();
        assert_eq!(ev.cgroup_id, 42);
        assert_eq!(ev.endpoint_id, 7);
        assert_eq!(ev.proto, 6);
        assert_eq!(ev.reason, DropReason::Connect);
        assert_eq!(ev.dst, "10.1.2.3:8080".parse().unwrap());
        assert_eq!(ev.src, "0.0.0.0:0".parse().unwrap());
        assert!(parse_drop_event(&b[..10]).is_none());
    }
}
