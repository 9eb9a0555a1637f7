//! Loopback addresses and ports that concurrent tests (and test binaries) do not share.

use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A 127.x.y.z address no other call in this process returned, and unlikely to be used by
/// another test process: x and y come from the process id, z (and y on wrap) from a counter.
/// Never 127.0.0.1, nor 127.0.x.x / 127.1.x.x where system resolvers and `/etc/hosts` live.
pub fn unique_loopback_v4() -> IpAddr {
    let pid = std::process::id();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // 250 values of x (2..=251), 256 of y, 254 of z: distinct within a process for 64k calls.
    let x = 2 + (pid % 250);
    let y = (pid / 250 + n / 254) % 256;
    let z = 1 + n % 254;
    let octet = |v: u32| u8::try_from(v).unwrap_or(u8::MAX);
    IpAddr::V4(Ipv4Addr::new(127, octet(x), octet(y), octet(z)))
}

/// A port free for both UDP and TCP on `ip` right now, for servers that run in another
/// process and must be told a port. In-process servers should bind port 0 instead.
///
/// Picked at random below the kernel's ephemeral range: ports there are never handed out
/// to other processes' `bind(0)` or outgoing connections, so only an explicit bind can take
/// it before the caller does. Callers still retry on "address in use".
pub fn free_port(ip: IpAddr) -> Result<u16> {
    let (low, high) = non_ephemeral_range();
    if high > low {
        for _ in 0..64 {
            let port = low + u16::try_from(random_u64() % u64::from(high - low)).unwrap_or(0);
            if TcpListener::bind((ip, port)).is_ok() && UdpSocket::bind((ip, port)).is_ok() {
                return Ok(port);
            }
        }
    }
    // The ephemeral range covers almost everything here: let the kernel choose.
    for _ in 0..64 {
        let tcp = TcpListener::bind((ip, 0))?;
        let port = tcp.local_addr()?.port();
        if UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP on {ip}")
}

/// [10000, start of the ephemeral range): clear of well-known ports and of `bind(0)`.
fn non_ephemeral_range() -> (u16, u16) {
    const LOW: u16 = 10000;
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    (LOW, start.max(LOW))
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per instance; enough to spread concurrent callers.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(NEXT.load(Ordering::Relaxed));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_loopback_addresses_differ_and_avoid_localhost() {
        let a: Vec<IpAddr> = (0..600).map(|_| unique_loopback_v4()).collect();
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
        for ip in a {
            let IpAddr::V4(v4) = ip else { panic!("{ip}") };
            let o = v4.octets();
            assert_eq!(o[0], 127);
            assert!(o[1] >= 2, "{v4}");
            assert!(o[3] != 0 && o[3] != 255, "{v4}");
        }
    }

    #[test]
    fn free_port_is_bindable() {
        let ip = unique_loopback_v4();
        let port = free_port(ip).unwrap();
        UdpSocket::bind((ip, port)).unwrap();
        TcpListener::bind((ip, port)).unwrap();
    }
}
