use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use warden_datapath::{Datapath, DatapathError};
use warden_policy::EndpointId;
use warden_proxy::{
    AllowRequest, ClientContext, DatapathHook, EndpointLookup, HoldFuture, Transport,
};
use warden_telemetry::Metrics;

use crate::keys::{TCP, UDP, fqdn_keys};

/// The node's endpoints as the proxy looks them up: by source address and by enrolled cgroup.
#[derive(Debug, Clone, Default)]
pub struct EndpointDirectory {
    pub by_ip: HashMap<IpAddr, (EndpointId, Arc<str>)>,
    pub by_cgroup: HashMap<u64, (EndpointId, Arc<str>)>,
}

impl EndpointDirectory {
    pub fn by_ip(&self, ip: IpAddr) -> Option<(EndpointId, Arc<str>)> {
        self.by_ip.get(&ip.to_canonical()).cloned()
    }
}

/// The proxy engine's view of endpoints and datapath; both replaceable while serving.
#[derive(Debug)]
pub struct Enforcement {
    datapath: RwLock<Option<Datapath>>,
    directory: RwLock<Arc<EndpointDirectory>>,
    /// Bumped whenever the directory's content changes, so peers can be told.
    generation: AtomicU64,
    metrics: Metrics,
}

impl Enforcement {
    pub fn new(metrics: Metrics) -> Enforcement {
        Enforcement {
            datapath: RwLock::new(None),
            directory: RwLock::new(Arc::new(EndpointDirectory::default())),
            generation: AtomicU64::new(0),
            metrics,
        }
    }

    pub fn set_datapath(&self, datapath: Option<Datapath>) {
        *self
            .datapath
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = datapath;
    }

    pub fn datapath(&self) -> Option<Datapath> {
        self.datapath
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    pub fn set_directory(&self, directory: EndpointDirectory) {
        *self
            .directory
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(directory);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes whenever the directory does.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Replaces only the cgroup index (the agent's reconciler learns cgroup ids as it enrolls).
    pub fn set_cgroups(&self, by_cgroup: HashMap<u64, (EndpointId, Arc<str>)>) {
        let mut directory = self
            .directory
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        if directory.by_cgroup == by_cgroup {
            return;
        }
        let mut updated = EndpointDirectory::clone(&directory);
        updated.by_cgroup = by_cgroup;
        *directory = Arc::new(updated);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn directory(&self) -> Arc<EndpointDirectory> {
        self.directory
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    fn count(&self, op: &str, result: Result<(), DatapathError>) {
        match result {
            Ok(()) => self.metrics.datapath.updates.with_label_values(&[op]).inc(),
            Err(error) => {
                self.metrics.datapath.errors.with_label_values(&[op]).inc();
                tracing::warn!(%error, op, "datapath update failed");
            }
        }
    }
}

impl EndpointLookup for Enforcement {
    /// The redirect record says which cgroup asked and which server it meant; without one
    /// (no datapath, or a client that sent to the proxy directly) the source address decides.
    fn lookup(&self, client: SocketAddr, transport: Transport) -> ClientContext {
        let directory = self.directory();
        let by_ip = || ClientContext {
            endpoint: directory.by_ip(client.ip()),
            original_server: None,
        };
        let Some(datapath) = self.datapath() else {
            return by_ip();
        };
        let proto = match transport {
            Transport::Udp => UDP,
            Transport::Tcp => TCP,
        };
        match datapath.redirect_record(client, proto) {
            Ok(Some(record)) => ClientContext {
                endpoint: directory
                    .by_cgroup
                    .get(&record.cgroup_id)
                    .cloned()
                    .or_else(|| directory.by_ip(client.ip())),
                original_server: Some(record.original),
            },
            Ok(None) => by_ip(),
            Err(error) => {
                tracing::warn!(%client, %error, "cannot read the redirect record");
                by_ip()
            }
        }
    }
}

impl DatapathHook for Enforcement {
    /// A few map updates, no waiting: the answer is released right after.
    fn allow(&self, request: &AllowRequest<'_>) -> Option<HoldFuture> {
        let datapath = self.datapath()?;
        for grant in request.grants {
            for ip in request.ips {
                for key in fqdn_keys(grant, *ip) {
                    self.count("allow", datapath.allow_fqdn(key, request.expires_at.0));
                }
            }
        }
        None
    }
}
