use std::time::Duration;

use warden_config::{DnsConfig, RejectCode};
use warden_fqdn::CacheLimits;
use warden_proxy::{ProxySettings, ResponseCode};

/// A client TCP connection with no query for this long is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long DNS sockets keep reading after the port's traffic was steered to the peer.
pub const LEAVE_LINGER: Duration = Duration::from_millis(300);

/// The FQDN cache's bounds from the `dns` section both processes share.
pub fn cache_limits(dns: &DnsConfig) -> CacheLimits {
    CacheLimits {
        min_ttl: dns.min_ttl,
        max_ttl: dns.max_ttl,
        max_ips_per_name: dns.max_ips_per_name,
        max_names_per_endpoint: dns.max_names_per_endpoint,
    }
}

/// The engine's settings from the `dns` section both processes share.
pub fn proxy_settings(dns: &DnsConfig) -> ProxySettings {
    ProxySettings {
        listen: dns.listen.clone(),
        upstream: dns.upstream,
        reject: match dns.reject {
            RejectCode::Refused => ResponseCode::Refused,
            RejectCode::Nxdomain => ResponseCode::NXDomain,
        },
        response_max_delay: dns.response_max_delay(),
        upstream_timeout: dns.upstream_timeout(),
        max_ttl: dns.max_ttl,
        concurrency_limit: dns.concurrency_limit,
        upstream_sockets: dns.upstream_sockets,
        listen_sockets: dns.listen_sockets(),
        tcp_idle_timeout: TCP_IDLE_TIMEOUT,
        linger: LEAVE_LINGER,
    }
}
