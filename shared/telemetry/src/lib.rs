//! Warden's observability plumbing, shared by `warden-agent` and `warden-dnsproxy`.
//!
//! [`Metrics`] owns one Prometheus registry per process whose every series carries the
//! `instance` label (`agent` or `dnsproxy`), and defines every `warden_*` metric in one place so
//! that docs and dashboards have a single list to follow. [`FlowLog`] keeps the recent flow
//! events (one per DNS query, one per datapath drop) in a bounded ring and fans them out to
//! followers. [`LogBudget`] keeps a warning that repeats on a hot path to one line per
//! interval. [`admin`] holds the HTTP pieces both processes mount on their admin API.

#![forbid(unsafe_code)]

pub mod admin;
mod error;
mod flows;
mod log_budget;
mod metrics;
pub mod process;
mod status;

pub use error::TelemetryError;
pub use flows::{
    DnsFlow, DropFlow, FlowEvent, FlowFollower, FlowLine, FlowLog, LostEvents, Verdict, WallMoment,
    unix_millis,
};
pub use log_budget::LogBudget;
pub use metrics::{
    CacheMetrics, DatapathMetrics, DnsMetrics, Metrics, PeerMetrics, PolicyMetrics, Scope,
};
pub use status::{
    CacheFilter, CacheRow, CacheRowIp, CompiledCacheFilter, InstanceStatus, PolicyStatusView,
};
