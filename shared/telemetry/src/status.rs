//! The JSON documents of the admin API that both processes serve and the `warden` CLI reads.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// `GET /v1/status` of either process; `warden status` reads both.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub instance: String,
    pub version: String,
    pub serving: bool,
    pub ready: bool,
    /// Whether the peer process is connected over the agent's socket.
    pub peer_connected: bool,
    /// `online`, or `offline` for the standalone proxy while the agent is away.
    pub mode: String,
    pub policy_revision: u64,
    pub policy: PolicyStatusView,
    pub cache_names: usize,
    pub cache_ips: usize,
    pub endpoints: usize,
    pub dns_listen: Vec<SocketAddr>,
    /// Instances holding the DNS port now, as this process knows them.
    pub dns_port_holders: Vec<String>,
    pub datapath: String,
    pub uptime_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyStatusView {
    pub revision: u64,
    pub policies: usize,
    pub selectors: usize,
    pub source: String,
    pub last_error: Option<String>,
}

/// One row of `GET /v1/fqdn/cache`: a name an endpoint resolved, with its IPs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheRow {
    pub endpoint: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// Seconds until the last of these IPs expires.
    pub ttl: u64,
    /// Unix seconds when the last of these IPs expires.
    pub expires_at: u64,
    /// `lookup`, `connection` (kept alive by traffic past its TTL) or `restored`.
    pub source: String,
    pub entries: Vec<CacheRowIp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheRowIp {
    pub ip: IpAddr,
    pub ttl: u64,
    pub expires_at: u64,
    pub source: String,
}
