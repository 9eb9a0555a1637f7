//! Warden's DNS proxy engine, shared by the agent's embedded proxy and `warden-dnsproxy`.
//!
//! A query arrives on a [`listener`] socket (UDP or TCP, IPv4 or IPv6, each opened with
//! SO_REUSEPORT so that two processes can serve one port). [`wire`] reads its header and
//! question in place; the `engine` asks the [`context`] traits who sent it and where it was
//! going, checks the DNS rules, and either answers with the reject code or forwards the packet
//! untouched (only its ID is replaced) through the [`upstream`] socket pool. The answer's IPs
//! are read along the CNAME chain (rules in [`answer`]), recorded in the FQDN cache and handed
//! to the datapath hook; only then is the answer released to the client, with the client's own
//! ID restored (and TTLs past `max_ttl` lowered). The `udp` module drives UDP queries with a few long-lived loops and no task per
//! query (the hot path); `tcp` gives each connection and query a task; [`server`] binds,
//! serves and drains.
//!
//! The engine knows nothing of the agent: everything process-specific comes in through the
//! small traits of [`context`].

// Denied, not forbidden: `datagram` registers sockets with the reactor, and `allocator` makes
// one FFI call, which are unsafe.
#![deny(unsafe_code)]

pub mod allocator;
pub mod answer;
pub mod context;
mod datagram;
mod engine;
mod error;
pub mod listener;
pub mod response;
pub mod server;
mod tcp;
mod udp;
pub mod upstream;
pub mod wire;

pub use answer::AnswerSummary;
pub use context::{
    AllowRequest, COPY_CHUNK, ClientContext, DatapathHook, EndpointLookup, GC_CHUNK, HoldFuture,
    Mapping, MappingObserver, NoDatapath, PolicySource, ProxyContext, SharedCache, Transport,
    UNKNOWN_ENDPOINT, unix_now,
};
pub use error::ProxyError;
pub use hickory_proto::op::ResponseCode;
pub use server::{DnsProxy, ProxySettings};
