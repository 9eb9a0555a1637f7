//! The node's endpoints, from the config file and `endpoints_dir`, and the proxy's view of
//! who sent a query.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use warden_config::EndpointConfig;
use warden_enforce::EndpointDirectory;
use warden_policy::{EndpointId, EndpointInfo, Labels};
use warden_proxy::{ClientContext, EndpointLookup, Transport};

/// Endpoints by ID and by IP. An endpoint's ID comes from its key (`namespace/name`), not its
/// place in the file: the pinned datapath keys allow entries and enrollments by ID, and the
/// dnsproxy places a newly enrolled cgroup by it, so an ID must name the same endpoint across
/// configuration edits and restarts (were IDs positions, removing one endpoint would hand its
/// successors' IDs, and for a moment their allow entries, to their neighbours).
#[derive(Debug, Clone)]
pub struct EndpointTable {
    infos: Vec<EndpointInfo>,
    keys: Vec<Arc<str>>,
    configs: Vec<EndpointConfig>,
    by_ip: HashMap<IpAddr, usize>,
    by_id: HashMap<EndpointId, usize>,
}

/// The ID of the endpoint `key`: FNV-1a of the key, never 0. `taken` resolves the rare
/// collision by probing upwards, so only a colliding pair's later one depends on order.
fn stable_id(key: &str, taken: &HashMap<EndpointId, usize>) -> EndpointId {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let mut id = hash.max(1);
    while taken.contains_key(&EndpointId(id)) {
        id = id.wrapping_add(1).max(1);
    }
    EndpointId(id)
}

impl EndpointTable {
    pub fn from_config(endpoints: &[EndpointConfig]) -> EndpointTable {
        let mut infos = Vec::with_capacity(endpoints.len());
        let mut keys = Vec::with_capacity(endpoints.len());
        let mut by_ip = HashMap::new();
        let mut by_id = HashMap::new();
        for (index, endpoint) in endpoints.iter().enumerate() {
            let id = stable_id(&endpoint.key(), &by_id);
            by_id.insert(id, index);
            infos.push(EndpointInfo {
                id,
                name: endpoint.name.clone(),
                namespace: endpoint.namespace.clone(),
                labels: Labels::from_k8s(&endpoint.labels, &endpoint.namespace),
                ips: endpoint.ips.clone(),
                peer_only: endpoint.peer_only,
            });
            keys.push(Arc::from(endpoint.key()));
            // A peer sends nothing of its own: no query is taken for one of its.
            if !endpoint.peer_only {
                for ip in &endpoint.ips {
                    by_ip.insert(ip.to_canonical(), index);
                }
            }
        }
        EndpointTable {
            infos,
            keys,
            configs: endpoints.to_vec(),
            by_ip,
            by_id,
        }
    }

    /// Every endpoint as declared, in order.
    pub fn configs(&self) -> &[EndpointConfig] {
        &self.configs
    }

    /// Every endpoint with its key and declaration, in order.
    pub fn entries(&self) -> impl Iterator<Item = (&EndpointInfo, &Arc<str>, &EndpointConfig)> {
        self.infos
            .iter()
            .zip(&self.keys)
            .zip(&self.configs)
            .map(|((info, key), config)| (info, key, config))
    }

    pub fn infos(&self) -> &[EndpointInfo] {
        &self.infos
    }

    /// `namespace/name` of every endpoint, in the config's order.
    pub fn keys(&self) -> impl Iterator<Item = (&EndpointInfo, &Arc<str>)> {
        self.infos.iter().zip(&self.keys)
    }

    /// The `namespace/name` of an endpoint ID.
    pub fn key_of(&self, id: EndpointId) -> Option<&Arc<str>> {
        self.keys.get(*self.by_id.get(&id)?)
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

    fn endpoint(name: &str) -> EndpointConfig {
        EndpointConfig {
            name: name.into(),
            namespace: "youssef".into(),
            labels: [("app".to_owned(), name.to_owned())].into(),
            ips: Vec::new(),
            cgroup: None,
            dns_target: Vec::new(),
            peer_only: false,
        }
    }

    /// IDs were positions: removing the first endpoint gave the second its ID, under which the
    /// pinned datapath still held the first's enrollment and allow entries.
    #[test]
    fn an_endpoint_keeps_its_id_when_others_come_and_go() {
        let before = EndpointTable::from_config(&[endpoint("a"), endpoint("b"), endpoint("c")]);
        let after = EndpointTable::from_config(&[endpoint("c"), endpoint("b")]);
        let id_of = |table: &EndpointTable, key: &str| {
            table
                .keys()
                .find(|(_, k)| k.as_ref() == key)
                .map(|(info, _)| info.id)
        };
        for key in ["youssef/b", "youssef/c"] {
            assert_eq!(id_of(&before, key), id_of(&after, key), "{key}");
        }
        let a = id_of(&before, "youssef/a").unwrap();
        assert_eq!(after.key_of(a), None, "a's ID names no one now");
        assert!(before.keys().all(|(info, _)| info.id.0 != 0));
    }

    #[test]
    fn colliding_ids_are_told_apart() {
        let mut taken = HashMap::new();
        let first = stable_id("youssef/a", &taken);
        taken.insert(first, 0);
        let second = stable_id("youssef/a", &taken);
        assert_ne!(first, second);
    }

    #[test]
    fn senders_are_found_by_ip_including_ipv4_mapped() {
        let config = vec![EndpointConfig {
            name: "test".into(),
            namespace: "youssef".into(),
            labels: [("app".to_owned(), "test".to_owned())].into(),
            ips: vec!["127.0.0.2".parse().unwrap()],
            cgroup: None,
            dns_target: Vec::new(),
            peer_only: false,
        }];
        let table = EndpointTable::from_config(&config);
        let found = table.lookup("[::ffff:127.0.0.2]:5353".parse().unwrap(), Transport::Udp);
        let (id, key) = found.endpoint.unwrap();
        assert_eq!(table.key_of(id), Some(&key));
        assert_eq!(&*key, "youssef/test");
        assert!(table.by_ip("127.0.0.3".parse().unwrap()).is_none());

        // A peer sends nothing of its own: a query from its address is no endpoint's.
        let mut with_peer = config.clone();
        with_peer.push(EndpointConfig {
            name: "service:dns".into(),
            ips: vec!["127.0.0.3".parse().unwrap()],
            peer_only: true,
            ..config[0].clone()
        });
        let table = EndpointTable::from_config(&with_peer);
        assert!(table.by_ip("127.0.0.3".parse().unwrap()).is_none());
        let found = table.lookup("127.0.0.3:5353".parse().unwrap(), Transport::Udp);
        assert!(found.endpoint.is_none());
    }
}
