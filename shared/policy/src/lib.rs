//! Warden's policy: the CiliumNetworkPolicy language it enforces, read from files, validated,
//! and compiled into the answers the DNS proxy and the datapath need. The crate is pure: apart
//! from [`load_path`] and [`load_paths`] reading files, it does no I/O.
//!
//! The modules build on each other:
//! - `name` and `pattern` define [`DnsName`] and Cilium's `matchName`/`matchPattern`
//!   ([`NamePattern`], [`FqdnSelector`]) with Cilium's exact matching rules;
//! - `matcher` indexes many selectors in a [`NameMatcher`] so that a lookup does not try them one
//!   by one;
//! - `labels` and `selector` model endpoint [`Labels`] and [`EndpointSelector`]s with Cilium's
//!   label sources and namespace scoping;
//! - `model` is the validated policy ([`Policy`], [`Rule`], [`EgressRule`], ...) and `load`
//!   parses it from YAML or JSON with errors that name the file, the policy and the field;
//! - `addresses` says what a rule's peers (entities, CIDRs, endpoints) stand for in addresses,
//!   as [`PeerAddresses`], which the DNS check and the datapath's prefixes both read;
//! - `repository` compiles policies against the node's endpoints into a [`PolicyRepository`],
//!   which answers whether a DNS query is allowed, which endpoints an answer's addresses are
//!   granted to, and which allows do not depend on DNS.

#![forbid(unsafe_code)]

mod error;
pub use error::{InvalidPolicy, Location, PolicyError};

mod name;
pub use name::DnsName;

mod pattern;
pub use pattern::{FqdnSelector, NamePattern};

mod matcher;
pub use matcher::NameMatcher;

mod labels;
pub use labels::{ANY_SOURCE, K8S_SOURCE, Label, Labels, NAMESPACE_LABEL};

mod selector;
pub use selector::{EndpointSelector, LabelRequirement, ScopedSelector, SelectorOperator};

mod model;
pub use model::{
    API_VERSION, CidrRule, DEFAULT_NAMESPACE, EgressRule, Entity, L7Rules, Policy, PolicyKind,
    PortProtocol, PortRule, Protocol, Rule, canonical_net,
};

mod load;
pub use load::{
    MAX_FOLDER_TEXT_BYTES, check_folder_size, check_unique, check_yaml_text, folder_files,
    load_path, load_paths, parse_str,
};

mod addresses;
pub use addresses::{PeerAddresses, subtract};

mod repository;
pub use repository::{
    EndpointId, EndpointInfo, FqdnGrant, L4Proto, Peer, PolicyRepository, PortRange, StaticAllow,
};
