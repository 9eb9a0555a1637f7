//! What the agent and `warden-dnsproxy` both need to run the proxy engine on the eBPF datapath.
//!
//! [`Enforcement`] implements the engine's `EndpointLookup` (who sent a query: the redirect
//! record's cgroup, else the source address; and which server it was meant for) and its
//! `DatapathHook` (write an answer's allow entries, one exact key per protocol and port, before
//! the answer is released). Its [`EndpointDirectory`] and datapath handle can be replaced at any
//! time: the agent refreshes the cgroup index as it enrolls endpoints, the standalone proxy
//! installs both when a policy snapshot arrives. [`fqdn_keys`] is the one place that turns a
//! toFQDNs grant into map keys, used on the hot path and by the agent's reconciler alike, and
//! [`datapath_warnings`] says which rules it cannot turn into keys.
//! [`serving`] registers each process's DNS sockets with the datapath's reuseport selection
//! and steers the port's queries between them; [`proxy_settings`] and [`cache_limits`] read
//! the shared `dns` section into the engine's settings and the cache's bounds.

#![forbid(unsafe_code)]

mod directory;
mod keys;
pub mod serving;
mod settings;

pub use directory::{EndpointDirectory, Enforcement};
pub use keys::{TCP, UDP, datapath_warnings, fqdn_keys, grants_key, merge_port_rules, port_rules};
pub use settings::{LEAVE_LINGER, cache_limits, proxy_settings};
