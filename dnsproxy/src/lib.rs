//! `warden-dnsproxy`: the proxy engine of `warden-proxy` in a process of its own, holding the
//! DNS port beside the agent (SO_REUSEPORT) so that DNS keeps being answered and policed while
//! the agent is down, and the other way round.
//!
//! [`policy`] holds what the agent last sent: the compiled policy, the endpoints, the
//! datapath settings; it is persisted in `state_dir` so a proxy started without the agent
//! enforces at once. [`link`] keeps the session with the agent: hello, journal replay, the
//! snapshots and cache it receives, the mappings and flows it sends. [`journal`] holds the
//! mappings the agent could not receive, kept in `state_dir` as a log each save appends to;
//! the snapshot is written whole, by `warden-state`, as is the log now and then.
//! [`proxy`] wires them around the engine, the datapath (written directly on the hot path) and
//! the admin API.

#![forbid(unsafe_code)]

pub mod journal;
pub mod link;
pub mod policy;
mod proxy;

pub use proxy::{RunningProxy, run, start};
