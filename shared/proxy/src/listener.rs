//! DNS listener sockets. Every socket is opened with SO_REUSEPORT so that the agent and
//! `warden-dnsproxy` can hold the same port at once and the kernel shares queries between them.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::ProxyError;
use crate::datagram::Datagram;

/// Attempts at finding one port free for both UDP and TCP when asked for port 0.
const SHARED_PORT_ATTEMPTS: u32 = 16;

/// The UDP and TCP sockets of one listen address, on the same port.
#[derive(Debug)]
pub struct ListenerPair {
    pub udp: Datagram,
    pub tcp: TcpListener,
}

impl ListenerPair {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.local_addr().ok()
    }
}

/// Binds UDP and TCP on `address`, the UDP socket with a receive buffer of `receive_buffer`
/// bytes. Port 0 means "any port", the same for both transports, which tests use to run many
/// proxies side by side.
pub fn bind_pair(address: SocketAddr, receive_buffer: usize) -> Result<ListenerPair, ProxyError> {
    if address.port() != 0 {
        let udp = bind_udp(address, receive_buffer)?;
        let tcp = bind_tcp(address)?;
        return Ok(ListenerPair { udp, tcp });
    }
    for _ in 0..SHARED_PORT_ATTEMPTS {
        let udp = bind_udp(address, receive_buffer)?;
        let bound = udp.local_addr().map_err(|source| ProxyError::Bind {
            transport: "udp",
            address,
            source,
        })?;
        // Another process may hold this port for TCP; try another one.
        if let Ok(tcp) = bind_tcp(bound) {
            return Ok(ListenerPair { udp, tcp });
        }
    }
    Err(ProxyError::NoSharedPort {
        address,
        attempts: SHARED_PORT_ATTEMPTS,
    })
}

fn new_socket(address: SocketAddr, kind: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), kind, Some(protocol))?;
    // SO_REUSEPORT alone lets the agent and warden-dnsproxy share the port, and only sockets
    // of the same user can join them. SO_REUSEADDR is for TCP only (a restart binds past the
    // old connections' TIME_WAIT): on UDP it lets any user's socket with it bind the same
    // address, outside the group and found before it, and take the node's queries.
    socket.set_reuse_port(true)?;
    if kind == Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    if address.is_ipv6() {
        // [::]:53 must not also claim IPv4: the IPv4 listener is configured separately.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// One more UDP socket on `address`, beside those [`bind_pair`] bound.
pub fn bind_udp(address: SocketAddr, receive_buffer: usize) -> Result<Datagram, ProxyError> {
    let error = |source| ProxyError::Bind {
        transport: "udp",
        address,
        source,
    };
    let socket = new_socket(address, Type::DGRAM, Protocol::UDP).map_err(error)?;
    crate::datagram::set_receive_buffer(&socket, receive_buffer);
    socket.bind(&address.into()).map_err(error)?;
    Datagram::new(socket.into()).map_err(error)
}

fn bind_tcp(address: SocketAddr) -> Result<TcpListener, ProxyError> {
    let error = |source| ProxyError::Bind {
        transport: "tcp",
        address,
        source,
    };
    let socket = new_socket(address, Type::STREAM, Protocol::TCP).map_err(error)?;
    socket.set_tcp_nodelay(true).map_err(error)?;
    socket.bind(&address.into()).map_err(error)?;
    socket.listen(1024).map_err(error)?;
    TcpListener::from_std(socket.into()).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_pairs_share_one_port() {
        let first = bind_pair("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let port = first.local_addr().unwrap();
        assert_eq!(first.tcp.local_addr().unwrap(), port);
        let second = bind_pair(port, 1 << 20).unwrap();
        assert_eq!(second.local_addr(), Some(port));
    }

    /// A socket outside the group (SO_REUSEADDR, which any user may set, without
    /// SO_REUSEPORT) cannot bind the DNS address beside the proxies and take their queries.
    #[tokio::test]
    async fn no_socket_outside_the_group_binds_the_dns_port() {
        let pair = bind_pair("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let port = pair.local_addr().unwrap();
        let intruder = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        intruder.set_reuse_address(true).unwrap();
        let bound = intruder.bind(&port.into());
        assert_eq!(
            bound.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::AddrInUse)
        );
    }
}
