use std::net::SocketAddr;

/// What can stop the proxy from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot bind DNS {transport} listener on {address}: {source}")]
    Bind {
        transport: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot find a port free for both UDP and TCP on {address} after {attempts} attempts")]
    NoSharedPort { address: SocketAddr, attempts: u32 },
    #[error("cannot open upstream socket: {0}")]
    UpstreamSocket(std::io::Error),
}
