use std::net::IpAddr;
use std::time::Duration;

use warden_datapath::FqdnKey;
use warden_policy::{FqdnGrant, L4Proto, PortRange};
use warden_telemetry::LogBudget;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// Widest `endPort` range written as one FQDN entry per port. The FQDN map holds exact ports
/// (so two processes can write entries without merging values); a wider range is refused
/// rather than widened to "any port".
const MAX_EXPANDED_PORTS: usize = 1024;

/// The map keys a grant gives one IP: one per protocol and port (or "any").
pub fn fqdn_keys(grant: &FqdnGrant, ip: IpAddr) -> Vec<FqdnKey> {
    let endpoint_id = grant.endpoint.0;
    if grant.ports.is_empty() {
        return vec![FqdnKey::any(endpoint_id, ip)];
    }
    let mut keys = Vec::new();
    for range in &grant.ports {
        let protos: &[Option<u8>] = match range.proto {
            Some(L4Proto::Tcp) => &[Some(TCP)],
            Some(L4Proto::Udp) => &[Some(UDP)],
            None if *range == PortRange::ALL => &[None],
            None => &[Some(TCP), Some(UDP)],
        };
        let ports: Vec<Option<u16>> = if range.first == 0 && range.last == u16::MAX {
            vec![None]
        } else if usize::from(range.last - range.first) < MAX_EXPANDED_PORTS {
            (range.first..=range.last).map(Some).collect()
        } else {
            // A policy's property, met again by every answer it grants: one line per interval.
            static BUDGET: LogBudget = LogBudget::new(Duration::from_secs(10));
            if let Some(held_back) = BUDGET.allow() {
                tracing::error!(
                    first = range.first,
                    last = range.last,
                    selector = grant.selector,
                    held_back,
                    "toFQDNs port range too wide for the datapath; not allowed"
                );
            }
            continue;
        };
        for proto in protos {
            for port in &ports {
                keys.push(FqdnKey {
                    endpoint_id,
                    ip,
                    proto: *proto,
                    port: *port,
                });
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_policy::EndpointId;

    #[test]
    fn grants_become_exact_keys() {
        let ip: IpAddr = "198.18.1.10".parse().unwrap();
        let grant = |ports: Vec<PortRange>| FqdnGrant {
            endpoint: EndpointId(3),
            ports,
            selector: "cilium.io".into(),
        };
        assert_eq!(fqdn_keys(&grant(vec![]), ip), vec![FqdnKey::any(3, ip)]);
        let web = grant(vec![
            PortRange {
                first: 80,
                last: 80,
                proto: Some(L4Proto::Tcp),
            },
            PortRange {
                first: 443,
                last: 443,
                proto: Some(L4Proto::Tcp),
            },
        ]);
        let keys = fqdn_keys(&web, ip);
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().all(|key| key.proto == Some(TCP)));
        let both = grant(vec![PortRange {
            first: 53,
            last: 53,
            proto: None,
        }]);
        assert_eq!(fqdn_keys(&both, ip).len(), 2, "ANY is TCP and UDP");
        let wide = grant(vec![PortRange {
            first: 1,
            last: 60_000,
            proto: Some(L4Proto::Tcp),
        }]);
        assert!(
            fqdn_keys(&wide, ip).is_empty(),
            "too wide: refused, never widened"
        );
    }
}
