//! The node's endpoints, from the config file, and the proxy's view of who sent a query.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use warden_config::EndpointConfig;
use warden_enforce::EndpointDirectory;
use warden_policy::{EndpointId, EndpointInfo, Labels};
use warden_proxy::{ClientContext, EndpointLookup, Transport};

/// Endpoints by ID and by IP. IDs follow the config's order, starting at 1.
#[derive(Debug, Clone)]
pub struct EndpointTable {
    infos: Vec<EndpointInfo>,
    keys: Vec<Arc<str>>,
    by_ip: HashMap<IpAddr, usize>,
}

impl EndpointTable {
    pub fn from_config(endpoints: &[EndpointConfig]) -> EndpointTable {
        let mut infos = Vec::with_capacity(endpoints.len());
        let mut keys = Vec::with_capacity(endpoints.len());
        let mut by_ip = HashMap::new();
        for (index, endpoint) in endpoints.iter().enumerate() {
            let id = EndpointId(u32::try_from(index + 1).unwrap_or(u32::MAX));
            infos.push(EndpointInfo {
                id,
                name: endpoint.name.clone(),
                namespace: endpoint.namespace.clone(),
                labels: Labels::from_k8s(&endpoint.labels, &endpoint.namespace),
                ips: endpoint.ips.clone(),
            });
            keys.push(Arc::from(endpoint.key()));
            for ip in &endpoint.ips {
                by_ip.insert(ip.to_canonical(), index);
            }
        }
        EndpointTable { infos, keys, by_ip }
    }

    pub fn infos(&self) -> &[EndpointInfo] {
        &self.infos
    }

    /// `namespace/name` of every endpoint, in ID order.
    pub fn keys(&self) -> impl Iterator<Item = (&EndpointInfo, &Arc<str>)> {
        self.infos.iter().zip(&self.keys)
    }

    /// The `namespace/name` of an endpoint ID.
    pub fn key_of(&self, id: EndpointId) -> Option<&Arc<str>> {
        let index = usize::try_from(id.0).ok()?.checked_sub(1)?;
        self.keys.get(index)
    }

    /// The proxy's lookup view (source addresses only; the reconciler adds cgroups).
    pub fn directory(&self) -> EndpointDirectory {
        let mut directory = EndpointDirectory::default();
        for (ip, index) in &self.by_ip {
            directory
                .by_ip
                .insert(*ip, (self.infos[*index].id, self.keys[*index].clone()));
        }
        for (info, key) in self.keys() {
            directory.by_id.insert(info.id, key.clone());
        }
        directory
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<(EndpointId, Arc<str>)> {
        let index = *self.by_ip.get(&ip.to_canonical())?;
        Some((self.infos[index].id, self.keys[index].clone()))
    }
}

impl EndpointLookup for EndpointTable {
    /// Without a datapath the sender is known by its source address only, and the original
    /// destination is unknown (the query was sent to the proxy itself).
    fn lookup(&self, client: SocketAddr, _transport: Transport) -> ClientContext {
        ClientContext {
            endpoint: self.by_ip(client.ip()),
            original_server: None,
            unresolved: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_are_found_by_ip_including_ipv4_mapped() {
        let config = vec![EndpointConfig {
            name: "test".into(),
            namespace: "youssef".into(),
            labels: [("app".to_owned(), "test".to_owned())].into(),
            ips: vec!["127.0.0.2".parse().unwrap()],
            cgroup: None,
            dns_target: Vec::new(),
        }];
        let table = EndpointTable::from_config(&config);
        let found = table.lookup("[::ffff:127.0.0.2]:5353".parse().unwrap(), Transport::Udp);
        let (id, key) = found.endpoint.unwrap();
        assert_eq!(id, EndpointId(1));
        assert_eq!(&*key, "youssef/test");
        assert!(table.by_ip("127.0.0.3".parse().unwrap()).is_none());
    }
}
