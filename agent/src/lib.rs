//! `warden-agent`: the node agent. It loads the config and the CiliumNetworkPolicy files, knows
//! the node's endpoints, runs the embedded DNS proxy, keeps the FQDN cache (persisted across
//! restarts), and serves the admin API that the `warden` CLI and Prometheus read.
//!
//! [`endpoints`] maps senders to endpoints, [`endpoint_files`] reads `endpoints_dir` (it and
//! the policy folder are settled alike by `folder`; [`pod_endpoints`] writes a
//! Kubernetes node's pods into it for `warden endpoint sync`), [`policy_store`] loads,
//! watches and swaps the policy for the endpoints in force, [`state`] persists the cache,
//! [`datapath`] drives the eBPF datapath (`datapath.mode: ebpf`), [`admin`] is the HTTP API,
//! [`api`] the Unix-socket protocol with `warden-dnsproxy`, and [`agent`] wires them together
//! around the proxy engine of `warden-proxy`. [`cli`] is the `warden` command.

#![forbid(unsafe_code)]

pub mod admin;
mod agent;
pub mod api;
pub mod cli;
pub mod datapath;
pub mod endpoint_files;
pub mod endpoints;
mod folder;
pub mod pod_endpoints;
pub mod policy_store;
pub mod state;

pub use agent::{RunningAgent, run, start};
