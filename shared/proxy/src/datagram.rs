//! UDP sockets registered with the runtime for readability only.
//!
//! tokio's `UdpSocket` asks epoll for writability too, and the kernel reports a UDP socket
//! writable again each time one of its sent packets is freed: at tens of thousands of
//! answers a second that is a wake-up of the runtime per packet, for nothing, since a UDP
//! send almost never finds the buffer full. Here sends go straight to the socket, and the
//! rare full buffer is retried briefly from a task of its own.
//!
//! The one `unsafe` block of the crate is here: registering a file descriptor with the
//! runtime's reactor.

#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How long a send that finds the buffer full keeps trying before the packet is dropped (a
/// DNS client retries; a UDP server under overload drops).
const FULL_BUFFER_RETRY: Duration = Duration::from_millis(1);
const FULL_BUFFER_ATTEMPTS: u32 = 50;

#[derive(Debug)]
pub struct Datagram {
    io: AsyncFd<UdpSocket>,
}

impl Datagram {
    /// Takes a bound socket; must run inside a tokio runtime.
    pub fn new(socket: UdpSocket) -> io::Result<Datagram> {
        socket.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the std socket, which owns its descriptor: it stays open
        // and the same for as long as the AsyncFd lives, and `as_raw_fd` always returns it.
        let io = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|error| error.into_parts().1)?;
        Ok(Datagram { io })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    /// The next datagram and its sender.
    pub async fn recv_from(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let mut ready = self.io.readable().await?;
            match ready.try_io(|socket| socket.get_ref().recv_from(buffer)) {
                Ok(received) => return received,
                // Readiness was stale; it is cleared, wait for the next.
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends now, or fails with `WouldBlock` when the socket's buffer is full.
    pub fn try_send_to(&self, packet: &[u8], target: SocketAddr) -> io::Result<usize> {
        self.io.get_ref().send_to(packet, target)
    }

    /// Sends, retrying a full buffer for a moment before giving up.
    pub async fn send_to(&self, packet: &[u8], target: SocketAddr) -> io::Result<usize> {
        let mut attempts = 0;
        loop {
            match self.try_send_to(packet, target) {
                Err(error)
                    if error.kind() == io::ErrorKind::WouldBlock
                        && attempts < FULL_BUFFER_ATTEMPTS =>
                {
                    attempts += 1;
                    tokio::time::sleep(FULL_BUFFER_RETRY).await;
                }
                sent => return sent,
            }
        }
    }
}

impl AsFd for Datagram {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.io.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sends_and_receives() {
        let one = Datagram::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let two = Datagram::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let target = two.local_addr().unwrap();
        one.send_to(b"first", target).await.unwrap();
        one.try_send_to(b"second", target).unwrap();
        let mut buffer = [0u8; 16];
        for expected in [&b"first"[..], b"second"] {
            let (length, from) = two.recv_from(&mut buffer).await.unwrap();
            assert_eq!(&buffer[..length], expected);
            assert_eq!(from, one.local_addr().unwrap());
        }
    }
}
