//! Who gets the DNS port's queries: both processes hold it (SO_REUSEPORT) and the datapath's
//! `sk_reuseport` program picks the preferred one, falling back to the other, and one of its
//! sockets by the client's hash.

use std::os::fd::AsFd;

use warden_config::Prefer;
use warden_datapath::{Datapath, DatapathError};

/// The agent's number in the reuseport selection.
pub const AGENT_INSTANCE: u32 = 0;
/// `warden-dnsproxy`'s number in the reuseport selection.
pub const DNSPROXY_INSTANCE: u32 = 1;

/// The instance's name in status documents.
pub fn instance_name(instance: u32) -> &'static str {
    if instance == AGENT_INSTANCE {
        "agent"
    } else {
        "dnsproxy"
    }
}

/// Puts `sockets` (the process's DNS listeners) into the selection as `instance`'s.
pub fn join<S: AsFd>(
    datapath: &Datapath,
    instance: u32,
    sockets: &[S],
) -> Result<(), DatapathError> {
    for socket in sockets {
        datapath.attach_reuseport(socket)?;
    }
    datapath.reuseport_register(instance, sockets)
}

/// The instance `dns.prefer` names (`None`: the kernel's hash shares the port).
pub fn preferred_instance(prefer: Prefer) -> Option<u32> {
    match prefer {
        Prefer::Agent => Some(AGENT_INSTANCE),
        Prefer::Dnsproxy => Some(DNSPROXY_INSTANCE),
        Prefer::Share => None,
    }
}

/// Applies a preference: an instance, or `None` for the kernel's hash over both.
pub fn prefer(datapath: &Datapath, preferred: Option<u32>) -> Result<(), DatapathError> {
    match preferred {
        Some(instance) => datapath.reuseport_prefer(instance),
        None => datapath.reuseport_share(),
    }
}

/// At a graceful stop, before the sockets close: new queries go to `peer` from now on.
pub fn steer_to(datapath: &Datapath, peer: u32) -> bool {
    match datapath.reuseport_prefer(peer) {
        Ok(()) => {
            tracing::info!(to = instance_name(peer), "DNS traffic steered to the peer");
            true
        }
        Err(error) => {
            tracing::warn!(%error, "cannot steer DNS traffic away");
            false
        }
    }
}

/// Who the datapath steers to now: `agent`, `dnsproxy`, or `share`.
pub fn preferred_name(datapath: &Datapath) -> Option<String> {
    match datapath.reuseport_preferred().ok()? {
        Some(instance) => Some(instance_name(instance).to_owned()),
        None => Some("share".to_owned()),
    }
}
