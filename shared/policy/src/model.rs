//! The policy language: the subset of CiliumNetworkPolicy that Warden enforces.
//!
//! Public types hold validated policy and serialize in Cilium's shape. Each is deserialized
//! through a private `Raw*` twin that lists every field Cilium knows: the supported ones, the
//! metadata ones that are accepted and dropped (`description`, `labels`), and the unsupported
//! ones as `Unsupported`, which fails whenever the field is present. Together with
//! `deny_unknown_fields` this means a policy can never say more than Warden enforces without an
//! error naming the field.

use std::fmt;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::Location;
use crate::pattern::FqdnSelector;
use crate::selector::EndpointSelector;

/// The only `apiVersion` Warden reads.
pub const API_VERSION: &str = "cilium.io/v2";

/// The namespace of a CiliumNetworkPolicy whose metadata has none, as kubectl would choose.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    /// Namespaced: selects endpoints of its own namespace only.
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
}

impl PolicyKind {
    pub fn from_kind(kind: &str) -> Option<PolicyKind> {
        match kind {
            "CiliumNetworkPolicy" => Some(PolicyKind::CiliumNetworkPolicy),
            "CiliumClusterwideNetworkPolicy" => Some(PolicyKind::CiliumClusterwideNetworkPolicy),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One policy document, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub kind: PolicyKind,
    pub name: String,
    /// The namespace a CiliumNetworkPolicy lives in and is confined to; `None` for a
    /// CiliumClusterwideNetworkPolicy.
    pub namespace: Option<String>,
    /// `spec` followed by the entries of `specs`.
    pub rules: Vec<Rule>,
    /// The file the policy came from, for messages.
    pub origin: PathBuf,
    /// What loading changed or could not take as written, said but not an error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// What is not enforced as written and that earlier releases loaded without a word (DNS
    /// rules inside a toFQDNs rule, `reserved:` labels in toEndpoints, a namespace expression
    /// that rules out the policy's own namespace): `warden policy validate` refuses it, the
    /// agent and warden-dnsproxy load it as those releases did and say so. Refusing it there
    /// would refuse, after an upgrade, both the folder and its last good copy, leaving no
    /// policy at all in force.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_by_validate: Vec<String>,
}

impl Policy {
    /// `namespace/name`, or the name of a clusterwide policy, for messages.
    pub fn qualified_name(&self) -> String {
        match &self.namespace {
            Some(namespace) => format!("{namespace}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// One entry of `spec`/`specs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawRule")]
pub struct Rule {
    pub endpoint_selector: EndpointSelector,
    /// As in Cilium, a non-empty list puts the selected endpoints in default-deny for egress;
    /// `egress: []` or no `egress` leaves them alone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
    /// What of the rule is not enforced (see [`Policy::refused_by_validate`]): its `ingress`
    /// and `ingressDeny`. Warden polices egress only, and in Cilium they never change what
    /// egress allows, so the egress part holds as written; refusing the policy refused the
    /// whole folder, and left a fresh node with nothing enforced at all.
    #[serde(skip)]
    pub refused_by_validate: Vec<String>,
}

/// One egress rule: an optional L3 part (at most one of the `to*` peer fields, as Cilium
/// requires) and an optional L4/L7 part (`toPorts`). With neither it allows nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawEgressRule")]
pub struct EgressRule {
    #[serde(rename = "toFQDNs", skip_serializing_if = "Vec::is_empty")]
    pub to_fqdns: Vec<FqdnSelector>,
    /// Cilium tells `toEndpoints: []` (selects no peer) from no `toEndpoints` (no L3 part), and
    /// so for `toCIDR`, `toCIDRSet` and `toEntities`: an empty list allows nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(rename = "toCIDR", skip_serializing_if = "Option::is_none")]
    pub to_cidr: Option<Vec<IpNet>>,
    #[serde(rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<Entity>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRule>,
    /// What in this rule was not enforced as written by earlier releases either, which
    /// loaded it without a word (see [`Policy::refused_by_validate`]).
    #[serde(skip)]
    pub refused_by_validate: Vec<String>,
}

impl EgressRule {
    /// Whether any of the peer fields is present.
    pub fn has_l3(&self) -> bool {
        !self.to_fqdns.is_empty()
            || self.to_endpoints.is_some()
            || self.to_cidr.is_some()
            || self.to_cidr_set.is_some()
            || self.to_entities.is_some()
    }

    /// Whether a peer list is present but empty (`toEndpoints: []`, `toCIDR: []`, ...). As in
    /// Cilium, such a list selects no peer, whatever other peer list the rule has (a rule with
    /// `toFQDNs` still grants its names).
    pub fn selects_no_peer(&self) -> bool {
        self.to_endpoints.as_ref().is_some_and(Vec::is_empty)
            || self.to_cidr.as_ref().is_some_and(Vec::is_empty)
            || self.to_cidr_set.as_ref().is_some_and(Vec::is_empty)
            || self.to_entities.as_ref().is_some_and(Vec::is_empty)
    }
}

/// A `toCIDRSet` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawCidrRule")]
pub struct CidrRule {
    pub cidr: IpNet,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<IpNet>,
}

impl CidrRule {
    /// The rule as the datapath keys it ([`canonical_net`]): written v4-mapped, a prefix or a
    /// hole is the IPv4 one it stands for. Made once, when a policy is compiled.
    pub fn canonical(&self) -> CidrRule {
        CidrRule {
            cidr: canonical_net(self.cidr),
            except: self.except.iter().copied().map(canonical_net).collect(),
        }
    }

    /// Whether the rule, in [`Self::canonical`] form, allows `ip` (taken as the datapath
    /// takes it, an IPv4-mapped address as IPv4).
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.cidr.contains(&ip) && !self.except.iter().any(|except| except.contains(&ip))
    }
}

/// `net` as the datapath keys it: without host bits, and a prefix of the v4-mapped range
/// (`::ffff:10.0.0.0/104`) as the IPv4 prefix it is (`10.0.0.0/8`). A wider IPv6 prefix
/// (`::/0`) stays IPv6, and holds no IPv4 address.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net.trunc() {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => {
                ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(IpNet::V6(v6), IpNet::V4)
            }
            None => IpNet::V6(v6),
        },
        other => other,
    }
}

/// The `toEntities` Warden implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    /// Any peer.
    All,
    /// Any address that is neither a known endpoint nor the host.
    World,
    /// The node itself.
    Host,
    /// Known endpoints and the host.
    Cluster,
}

/// A `toPorts` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPortRule")]
pub struct PortRule {
    /// Empty opens nothing, as in Cilium (only a rule without `toPorts` opens every port;
    /// `port: 0` is every port).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortProtocol>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

impl PortRule {
    /// The `rules.dns` selectors; empty when the entry has no L7 rules, which Cilium treats as
    /// an L4-only allow (every name passes).
    pub fn dns_rules(&self) -> &[FqdnSelector] {
        self.rules.as_ref().map_or(&[], |rules| &rules.dns)
    }
}

/// The `rules` of a `toPorts` entry; only `dns` is supported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawL7Rules")]
pub struct L7Rules {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<FqdnSelector>,
}

/// One `ports` entry: a port, or a range up to `endPort`; port 0 means every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawPortProtocol")]
pub struct PortProtocol {
    #[serde(serialize_with = "port_as_string")]
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    /// TCP or UDP, the default.
    #[default]
    Any,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Any => "ANY",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        parse_str_value(deserializer, "TCP, UDP or ANY", |text| {
            // Cilium upper-cases the protocol while sanitizing, so `tcp` is accepted there too.
            match text.to_ascii_uppercase().as_str() {
                "TCP" => Ok(Protocol::Tcp),
                "UDP" => Ok(Protocol::Udp),
                "ANY" => Ok(Protocol::Any),
                _ => Err(format!(
                    "protocol {text:?} is not supported (expected TCP, UDP or ANY)"
                )),
            }
        })
    }
}

/// Deserializes a string through `parse`. The check runs inside the deserializer, so that an
/// error carries the line and column of the string itself rather than of the enclosing object.
fn parse_str_value<'de, D, T>(
    deserializer: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct ParseVisitor<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, String>,
    }

    impl<T> Visitor<'_> for ParseVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
            (self.parse)(text).map_err(E::custom)
        }
    }

    deserializer.deserialize_str(ParseVisitor { expecting, parse })
}

fn port_as_string<S: Serializer>(port: &u16, serializer: S) -> Result<S::Ok, S::Error> {
    // Cilium's schema types ports as strings.
    serializer.collect_str(port)
}

/// A port written as Cilium allows: a string (`"53"`) or a bare number.
struct PortNumber(u16);

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor;

        impl Visitor<'_> for PortVisitor {
            type Value = PortNumber;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number from 0 to 65535")
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<PortNumber, E> {
                u16::try_from(value)
                    .map(PortNumber)
                    .map_err(|_| E::custom(format!("port {value} is out of range (0-65535)")))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<PortNumber, E> {
                u16::try_from(value)
                    .map(PortNumber)
                    .map_err(|_| E::custom(format!("port {value} is out of range (0-65535)")))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<PortNumber, E> {
                if text.is_empty() {
                    return Err(E::custom("port must be specified"));
                }
                if !text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::custom(format!(
                        "port {text:?} is not a number (named ports are not supported)"
                    )));
                }
                // Cilium reads the string as Go's `ParseUint(port, 0, 16)` does: a leading zero
                // makes it octal ("053" is 43, "08" no number at all).
                let (digits, radix) = match text.strip_prefix('0') {
                    Some(octal) if !octal.is_empty() => (octal, 8),
                    _ => (text, 10),
                };
                match u64::from_str_radix(digits, radix) {
                    Ok(value) => self.visit_u64(value),
                    Err(_) if radix == 8 => Err(E::custom(format!(
                        "port {text:?} is not a number (a leading zero makes it octal, as in Cilium)"
                    ))),
                    Err(_) => Err(E::custom(format!("port {text} is out of range (0-65535)"))),
                }
            }
        }

        deserializer.deserialize_any(PortVisitor)
    }
}

const UNSUPPORTED: &str = "this Cilium field is not supported by Warden";

/// Stands for a Cilium field that Warden does not implement: it fails whenever the field is
/// present, whatever its value.
#[derive(Default)]
struct Unsupported;

impl<'de> Deserialize<'de> for Unsupported {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Failing from inside the visitor, rather than before reading anything, makes the error
        // carry the position of the field's value.
        deserializer.deserialize_any(RefuseVisitor)
    }
}

struct RefuseVisitor;

macro_rules! refuse_scalars {
    ($($method:ident: $type:ty),*) => {$(
        fn $method<E: de::Error>(self, _: $type) -> Result<Unsupported, E> {
            Err(E::custom(UNSUPPORTED))
        }
    )*};
}

impl<'de> Visitor<'de> for RefuseVisitor {
    type Value = Unsupported;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(UNSUPPORTED)
    }

    refuse_scalars!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_unit<E: de::Error>(self) -> Result<Unsupported, E> {
        Err(E::custom(UNSUPPORTED))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Unsupported, A::Error> {
        Err(de::Error::custom(UNSUPPORTED))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Unsupported, A::Error> {
        Err(de::Error::custom(UNSUPPORTED))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<Unsupported, A::Error> {
        Err(de::Error::custom(UNSUPPORTED))
    }
}

/// A whole policy document, as written.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PolicyDocument {
    // Checked, with `kind`, before the document is decoded.
    #[serde(rename = "apiVersion")]
    _api_version: String,
    kind: PolicyKind,
    metadata: Metadata,
    spec: Option<Rule>,
    specs: Option<Vec<Rule>>,
    /// Written by the cluster, not by the policy's author; `kubectl get -o yaml` includes it.
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

/// Object metadata. Fields beyond these (uid, resourceVersion, generation, creationTimestamp,
/// managedFields, ...) are the API server's bookkeeping and carry no policy, so a manifest
/// exported from a cluster loads as it is.
#[derive(Deserialize)]
struct Metadata {
    name: String,
    namespace: Option<String>,
    #[serde(default, rename = "labels")]
    _labels: Option<IgnoredAny>,
    #[serde(default, rename = "annotations")]
    _annotations: Option<IgnoredAny>,
}

/// What is wrong in a document, before the file and the policy name are attached.
pub(crate) struct FieldProblem {
    /// Empty when the whole document is at fault.
    pub(crate) field: String,
    pub(crate) message: String,
    pub(crate) location: Option<Location>,
}

impl PolicyDocument {
    pub(crate) fn into_policy(self, origin: PathBuf) -> Result<Policy, FieldProblem> {
        let namespace = self.metadata.namespace.filter(|ns| !ns.is_empty());
        // Cilium's examples carry none, for `kubectl apply -n`; a file has no `-n`.
        let defaulted = self.kind == PolicyKind::CiliumNetworkPolicy && namespace.is_none();
        let namespace = match (self.kind, namespace) {
            (PolicyKind::CiliumNetworkPolicy, namespace) => {
                Some(namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()))
            }
            (PolicyKind::CiliumClusterwideNetworkPolicy, None) => None,
            // Kubernetes would drop it; refusing it saves a reader from believing the policy is
            // confined to that namespace.
            (PolicyKind::CiliumClusterwideNetworkPolicy, Some(_)) => {
                return Err(FieldProblem {
                    field: "metadata.namespace".into(),
                    message: "a CiliumClusterwideNetworkPolicy has no namespace".into(),
                    location: None,
                });
            }
        };
        if self.spec.is_none() && self.specs.is_none() {
            return Err(FieldProblem {
                field: "spec".into(),
                message: "a policy needs `spec` or `specs`".into(),
                location: None,
            });
        }
        // Each rule with the field it came from, for messages.
        let fields: Vec<String> = self
            .spec
            .iter()
            .map(|_| "spec".to_owned())
            .chain((0..self.specs.as_ref().map_or(0, Vec::len)).map(|i| format!("specs[{i}]")))
            .collect();
        let mut rules: Vec<Rule> = self
            .spec
            .into_iter()
            .chain(self.specs.into_iter().flatten())
            .collect();
        let mut warnings = Vec::new();
        let mut refused_by_validate = Vec::new();
        let name = &self.metadata.name;
        let policy_name = match &namespace {
            Some(namespace) => format!("{namespace}/{name}"),
            None => name.clone(),
        };
        if defaulted {
            warnings.push(format!(
                "{}: policy {policy_name}: no metadata.namespace: it selects endpoints of \
                 namespace {DEFAULT_NAMESPACE:?} only (kubectl would use its -n or context)",
                origin.display()
            ));
        }
        for (rule, field) in rules.iter().zip(&fields) {
            for problem in &rule.refused_by_validate {
                refused_by_validate.push(format!(
                    "{}: policy {policy_name}: {field}.{problem}",
                    origin.display()
                ));
            }
            for (index, egress) in rule.egress.iter().enumerate() {
                for problem in &egress.refused_by_validate {
                    refused_by_validate.push(format!(
                        "{}: policy {policy_name}: {field}.egress[{index}].{problem}",
                        origin.display()
                    ));
                }
            }
        }
        if let Some(namespace) = &namespace {
            for (rule, field) in rules.iter_mut().zip(fields) {
                let overwritten = match rule.endpoint_selector.confine_to_namespace(namespace) {
                    Ok(overwritten) => overwritten,
                    // It selects nothing (as Cilium's does).
                    Err((inner, message)) => {
                        refused_by_validate.push(format!(
                            "{}: policy {policy_name}: {field}.endpointSelector.{inner}: {message}",
                            origin.display()
                        ));
                        Vec::new()
                    }
                };
                for other in overwritten {
                    warnings.push(format!(
                        "{}: policy {namespace}/{}: {field}.endpointSelector names namespace \
                         {other:?}, but a CiliumNetworkPolicy selects endpoints of its own \
                         namespace only: it selects them in {namespace:?}, as Cilium does",
                        origin.display(),
                        self.metadata.name,
                    ));
                }
            }
        }
        Ok(Policy {
            kind: self.kind,
            name: self.metadata.name,
            namespace,
            rules,
            origin,
            warnings,
            refused_by_validate,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRule {
    endpoint_selector: EndpointSelector,
    #[serde(default)]
    egress: Vec<EgressRule>,
    // Free-form metadata in Cilium too.
    #[serde(default, rename = "description")]
    _description: Option<IgnoredAny>,
    #[serde(default, rename = "labels")]
    _labels: Option<IgnoredAny>,
    #[serde(default, rename = "nodeSelector")]
    _node_selector: Unsupported,
    #[serde(default)]
    ingress: Option<IgnoredAny>,
    #[serde(default)]
    ingress_deny: Option<IgnoredAny>,
    #[serde(default, rename = "egressDeny")]
    _egress_deny: Unsupported,
    #[serde(default, rename = "enableDefaultDeny")]
    _enable_default_deny: Unsupported,
    #[serde(default, rename = "log")]
    _log: Unsupported,
}

impl TryFrom<RawRule> for Rule {
    type Error = String;

    fn try_from(raw: RawRule) -> Result<Self, Self::Error> {
        let ignored = [
            ("ingress", raw.ingress.is_some()),
            ("ingressDeny", raw.ingress_deny.is_some()),
        ];
        let refused_by_validate = ignored
            .into_iter()
            .filter(|(_, present)| *present)
            .map(|(field, _)| {
                format!(
                    "{field}: Warden enforces egress only; this section is not enforced (the \
                     egress rules beside it are)"
                )
            })
            .collect();
        Ok(Rule {
            endpoint_selector: raw.endpoint_selector,
            egress: raw.egress,
            refused_by_validate,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEgressRule {
    #[serde(default, rename = "toFQDNs")]
    to_fqdns: Vec<FqdnSelector>,
    to_endpoints: Option<Vec<EndpointSelector>>,
    // Options, like `toEndpoints`: an empty list is not the same as none (see `EgressRule`).
    #[serde(rename = "toCIDR")]
    to_cidr: Option<Vec<CidrOrIp>>,
    #[serde(rename = "toCIDRSet")]
    to_cidr_set: Option<Vec<CidrRule>>,
    to_entities: Option<Vec<Entity>>,
    #[serde(default)]
    to_ports: Vec<PortRule>,
    #[serde(default, rename = "toRequires")]
    _to_requires: Unsupported,
    #[serde(default, rename = "toServices")]
    _to_services: Unsupported,
    #[serde(default, rename = "toGroups")]
    _to_groups: Unsupported,
    #[serde(default, rename = "toNodes")]
    _to_nodes: Unsupported,
    #[serde(default, rename = "icmps")]
    _icmps: Unsupported,
    #[serde(default, rename = "authentication")]
    _authentication: Unsupported,
}

impl TryFrom<RawEgressRule> for EgressRule {
    type Error = String;

    fn try_from(raw: RawEgressRule) -> Result<Self, Self::Error> {
        fn listed<T>(list: &Option<Vec<T>>) -> bool {
            list.as_ref().is_some_and(|list| !list.is_empty())
        }
        // An empty list is no peer of that kind here, as in Cilium's check.
        let peers = [
            ("toFQDNs", !raw.to_fqdns.is_empty()),
            ("toEndpoints", listed(&raw.to_endpoints)),
            ("toCIDR", listed(&raw.to_cidr)),
            ("toCIDRSet", listed(&raw.to_cidr_set)),
            ("toEntities", listed(&raw.to_entities)),
        ];
        let mut present = peers
            .iter()
            .filter(|(_, present)| *present)
            .map(|(name, _)| name);
        if let (Some(first), Some(second)) = (present.next(), present.next()) {
            return Err(format!(
                "{first} and {second} cannot be combined in one rule (Cilium refuses this too); \
                 write them as separate rules"
            ));
        }
        // Not enforced as written, and never were: loaded as before (the DNS rules apply to no
        // server, the selector selects nothing), said by the agent, refused by validate.
        let mut refused_by_validate = Vec::new();
        if !raw.to_fqdns.is_empty()
            && let Some(i) = raw
                .to_ports
                .iter()
                .position(|port_rule| !port_rule.dns_rules().is_empty())
        {
            // The peers of a toFQDNs rule are the addresses its names resolve to, never a DNS
            // server, so its DNS rules could never apply.
            refused_by_validate.push(format!(
                "toPorts[{i}].rules.dns: DNS rules cannot be part of a toFQDNs rule, which \
                 allows connections to the names' addresses and never a DNS server, so they \
                 apply to nothing; allow the DNS server in a separate rule (toEndpoints, toCIDR, \
                 toCIDRSet or toEntities) with its own rules.dns"
            ));
        }
        for (i, _) in raw
            .to_ports
            .iter()
            .enumerate()
            .filter(|(_, port_rule)| port_rule.ports.is_empty())
        {
            refused_by_validate.push(format!(
                "toPorts[{i}]: an entry without `ports` opens no port (as in Cilium, where only \
                 a rule without `toPorts` allows every port); list its ports (`port: \"0\"` is \
                 every port), or leave `toPorts` out"
            ));
        }
        for (i, selector) in raw.to_endpoints.iter().flatten().enumerate() {
            if let Some(key) = selector.reserved_key() {
                refused_by_validate.push(format!(
                    "toEndpoints[{i}]: {key:?}: reserved labels (Cilium's special identities) \
                     are not supported in toEndpoints, where they select nothing; use \
                     toEntities (host, world, all or cluster) instead"
                ));
            }
        }
        Ok(EgressRule {
            to_fqdns: raw.to_fqdns,
            to_endpoints: raw.to_endpoints,
            to_cidr: raw
                .to_cidr
                .map(|list| list.into_iter().map(|CidrOrIp(net)| net).collect()),
            to_cidr_set: raw.to_cidr_set,
            to_entities: raw.to_entities,
            refused_by_validate,
            to_ports: raw.to_ports,
        })
    }
}

/// A `toCIDR` entry: a CIDR, or a bare address meaning just that address.
struct CidrOrIp(IpNet);

impl<'de> Deserialize<'de> for CidrOrIp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        parse_str_value(deserializer, "a CIDR or an IP address", |text| {
            match text.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(CidrOrIp(IpNet::from(ip))),
                Err(_) => parse_cidr(text).map(CidrOrIp),
            }
        })
    }
}

/// A `toCIDRSet` prefix, where Cilium insists on the `address/length` form.
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        parse_str_value(deserializer, "a CIDR", |text| parse_cidr(text).map(Cidr))
    }
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    // Host bits are dropped so that 10.1.2.3/8 means the network it names, 10.0.0.0/8.
    text.parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| format!("{text:?} is not a CIDR"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCidrRule {
    cidr: Cidr,
    #[serde(default)]
    except: Vec<Cidr>,
    #[serde(default, rename = "cidrGroupRef")]
    _cidr_group_ref: Unsupported,
    #[serde(default, rename = "cidrGroupSelector")]
    _cidr_group_selector: Unsupported,
}

impl TryFrom<RawCidrRule> for CidrRule {
    type Error = String;

    fn try_from(raw: RawCidrRule) -> Result<Self, Self::Error> {
        let Cidr(cidr) = raw.cidr;
        let except: Vec<IpNet> = raw.except.into_iter().map(|Cidr(net)| net).collect();
        // Cilium's check: each exception must start inside the allowed CIDR.
        if let Some((i, net)) = except
            .iter()
            .enumerate()
            .find(|(_, net)| !cidr.contains(&net.network()))
        {
            return Err(format!("except[{i}]: {net} is not inside {cidr}"));
        }
        Ok(CidrRule { cidr, except })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPortRule {
    #[serde(default)]
    ports: Vec<PortProtocol>,
    rules: Option<L7Rules>,
    #[serde(default, rename = "terminatingTLS")]
    _terminating_tls: Unsupported,
    #[serde(default, rename = "originatingTLS")]
    _originating_tls: Unsupported,
    #[serde(default, rename = "serverNames")]
    _server_names: Unsupported,
    #[serde(default, rename = "listener")]
    _listener: Unsupported,
}

impl TryFrom<RawPortRule> for PortRule {
    type Error = String;

    fn try_from(raw: RawPortRule) -> Result<Self, Self::Error> {
        let rule = PortRule {
            ports: raw.ports,
            rules: raw.rules,
        };
        // The same constraints Cilium puts on DNS rules: they need explicit single ports.
        if !rule.dns_rules().is_empty() {
            if rule.ports.is_empty() {
                return Err("rules.dns needs `ports` (normally port 53)".into());
            }
            for (i, port) in rule.ports.iter().enumerate() {
                if port.port == 0 {
                    return Err(format!("ports[{i}]: rules.dns cannot apply to port 0"));
                }
                if port.end_port.is_some_and(|end| end > port.port) {
                    return Err(format!(
                        "ports[{i}]: rules.dns does not support port ranges"
                    ));
                }
            }
        }
        Ok(rule)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawL7Rules {
    #[serde(default)]
    dns: Vec<FqdnSelector>,
    #[serde(default, rename = "http")]
    _http: Unsupported,
    #[serde(default, rename = "kafka")]
    _kafka: Unsupported,
    #[serde(default, rename = "l7proto")]
    _l7proto: Unsupported,
    #[serde(default, rename = "l7")]
    _l7: Unsupported,
}

impl TryFrom<RawL7Rules> for L7Rules {
    type Error = String;

    fn try_from(raw: RawL7Rules) -> Result<Self, Self::Error> {
        Ok(L7Rules { dns: raw.dns })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPortProtocol {
    port: PortNumber,
    end_port: Option<PortNumber>,
    #[serde(default)]
    protocol: Protocol,
}

impl TryFrom<RawPortProtocol> for PortProtocol {
    type Error = String;

    fn try_from(raw: RawPortProtocol) -> Result<Self, Self::Error> {
        let port = raw.port.0;
        // Cilium reads `endPort: 0` as "no range".
        let end_port = raw.end_port.map(|end| end.0).filter(|&end| end != 0);
        if let Some(end) = end_port
            && end < port
        {
            return Err(format!("endPort {end} is below port {port}"));
        }
        Ok(PortProtocol {
            port,
            end_port,
            protocol: raw.protocol,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(yaml: &str) -> Result<EgressRule, String> {
        yaml_serde::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn ports_as_strings_or_numbers() {
        let rule =
            egress("toPorts: [{ports: [{port: '53'}, {port: 443, protocol: tcp}]}]").unwrap();
        let ports = &rule.to_ports[0].ports;
        assert_eq!(ports[0].port, 53);
        assert_eq!(ports[0].protocol, Protocol::Any);
        assert_eq!(ports[1].port, 443);
        assert_eq!(ports[1].protocol, Protocol::Tcp);
    }

    /// As Cilium's `ParseUint(port, 0, 16)`: a leading zero is octal, and a lone zero zero.
    #[test]
    fn a_leading_zero_makes_a_port_octal() {
        let rule =
            egress("toPorts: [{ports: [{port: '053'}, {port: '0'}, {port: '00443'}]}]").unwrap();
        let ports: Vec<u16> = rule.to_ports[0].ports.iter().map(|p| p.port).collect();
        assert_eq!(ports, vec![0o53, 0, 0o443]);
        for port in ["08", "0199999"] {
            let error = egress(&format!("toPorts: [{{ports: [{{port: '{port}'}}]}}]")).unwrap_err();
            assert!(
                error.contains("octal") || error.contains("out of range"),
                "{port}: {error}"
            );
        }
    }

    #[test]
    fn port_errors() {
        for (yaml, expected) in [
            ("{port: '70000'}", "out of range"),
            ("{port: -1}", "out of range"),
            ("{port: dns}", "named ports"),
            ("{port: ''}", "must be specified"),
            ("{port: '443', endPort: 80}", "endPort 80 is below port 443"),
            ("{port: '53', protocol: SCTP}", "not supported"),
            ("{protocol: TCP}", "missing field `port`"),
        ] {
            let error = egress(&format!("toPorts: [{{ports: [{yaml}]}}]")).unwrap_err();
            assert!(error.contains(expected), "{yaml}: {error}");
        }
    }

    #[test]
    fn port_ranges() {
        let rule =
            egress("toPorts: [{ports: [{port: '8000', endPort: 8080}, {port: '80', endPort: 0}]}]")
                .unwrap();
        assert_eq!(rule.to_ports[0].ports[0].end_port, Some(8080));
        assert_eq!(rule.to_ports[0].ports[1].end_port, None);
    }

    #[test]
    fn dns_rules_need_single_explicit_ports() {
        for (ports, expected) in [
            ("[]", "needs `ports`"),
            ("[{port: '0'}]", "port 0"),
            ("[{port: '53', endPort: 54}]", "port ranges"),
        ] {
            let yaml =
                format!("toPorts: [{{ports: {ports}, rules: {{dns: [{{matchPattern: '*'}}]}}}}]");
            let error = egress(&yaml).unwrap_err();
            assert!(error.contains(expected), "{ports}: {error}");
        }
        // Without DNS rules a range is fine, and `dns: []` is no L7 rule at all.
        assert!(
            egress("toPorts: [{ports: [{port: '53', endPort: 54}], rules: {dns: []}}]").is_ok()
        );
    }

    /// The one problem `refused_by_validate` holds for `rule`.
    fn refused(rule: &EgressRule) -> String {
        assert_eq!(rule.refused_by_validate.len(), 1, "{rule:?}");
        rule.refused_by_validate[0].clone()
    }

    #[test]
    fn dns_rules_in_a_fqdn_rule_are_refused_by_validate() {
        let error = refused(
            &egress(
                "{toFQDNs: [{matchName: a.io}], toPorts: [{ports: [{port: '443', protocol: TCP}]}, \
                  {ports: [{port: '53'}], rules: {dns: [{matchPattern: '*'}]}}]}",
            )
            .unwrap(),
        );
        assert!(error.contains("toPorts[1].rules.dns"), "{error}");
        assert!(
            error.contains("cannot be part of a toFQDNs rule"),
            "{error}"
        );
        assert!(error.contains("toEndpoints, toCIDR"), "{error}");
        // `dns: []` is no DNS rule, and a toFQDNs rule may allow port 53 (to the names' IPs).
        assert!(
            egress("{toFQDNs: [{matchName: a.io}], toPorts: [{ports: [{port: '53'}], rules: {dns: []}}]}")
                .unwrap()
                .refused_by_validate
                .is_empty()
        );
    }

    #[test]
    fn a_to_ports_entry_without_ports_is_refused_by_validate() {
        for to_ports in ["[{}]", "[{ports: []}]", "[{ports: [{port: '443'}]}, {}]"] {
            let rule = egress(&format!("{{toEntities: [all], toPorts: {to_ports}}}")).unwrap();
            let error = refused(&rule);
            assert!(error.contains("without `ports` opens no port"), "{error}");
        }
        let error = refused(&egress("{toPorts: [{ports: [{port: '53'}]}, {}]}").unwrap());
        assert!(error.starts_with("toPorts[1]: "), "{error}");
    }

    #[test]
    fn reserved_labels_in_to_endpoints_are_refused_by_validate() {
        for (selectors, expected) in [
            (
                "[{matchLabels: {'reserved:host': ''}}]",
                "toEndpoints[0]: \"reserved:host\"",
            ),
            ("[{matchLabels: {'$world': ''}}]", "\"$world\""),
            ("[{matchLabels: {reserved.host: ''}}]", "\"reserved.host\""),
            (
                "[{matchLabels: {app: x}}, {matchExpressions: [{key: 'reserved:world', operator: Exists}]}]",
                "toEndpoints[1]: \"reserved:world\"",
            ),
        ] {
            let error = refused(&egress(&format!("toEndpoints: {selectors}")).unwrap());
            assert!(error.contains(expected), "{selectors}: {error}");
            assert!(
                error.contains("use toEntities (host, world, all or cluster)"),
                "{error}"
            );
        }
        // Another source, or `reserved` as a plain key, is just a label.
        assert!(
            egress("toEndpoints: [{matchLabels: {'k8s:reserved': x, 'k8s:app': y}}]")
                .unwrap()
                .refused_by_validate
                .is_empty()
        );
    }

    #[test]
    fn empty_peer_lists_are_peers_that_select_nothing() {
        for field in ["toEndpoints", "toCIDR", "toCIDRSet", "toEntities"] {
            let rule = egress(&format!("{field}: []")).unwrap();
            assert!(rule.has_l3(), "{field}");
            assert!(rule.selects_no_peer(), "{field}");
            // Kept as written, so that it serializes back the same.
            let json = serde_json::to_value(&rule).unwrap();
            assert_eq!(json, serde_json::json!({ field: [] }), "{field}");
            assert_eq!(serde_json::from_value::<EgressRule>(json).unwrap(), rule);
            // Like `toEndpoints: []`, no peer of that kind for the one-kind-per-rule check.
            assert!(
                egress(&format!("{{toFQDNs: [{{matchName: a.io}}], {field}: []}}")).is_ok(),
                "{field}"
            );
        }
        let absent = egress("toPorts: [{ports: [{port: '53'}]}]").unwrap();
        assert!(!absent.has_l3() && !absent.selects_no_peer());
        // As in Cilium, `toFQDNs: []` is no L3 part at all.
        assert!(!egress("toFQDNs: []").unwrap().has_l3());
        assert!(
            egress("{toCIDR: [10.0.0.0/8], toEntities: []}")
                .unwrap()
                .selects_no_peer()
        );
    }

    #[test]
    fn namespaced_subjects_are_confined_to_the_policy_namespace() {
        let parse = |selector: &str| {
            let yaml = format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\
                 metadata: {{name: p, namespace: youssef}}\n\
                 specs:\n- endpointSelector: {{}}\n- endpointSelector: {selector}\n"
            );
            crate::parse_str(&yaml, std::path::Path::new("p.yaml"))
        };
        // Cilium overwrites a namespace in matchLabels with the policy's.
        let policies =
            parse("{matchLabels: {'k8s:io.kubernetes.pod.namespace': other, app: client}}")
                .unwrap();
        let labels = &policies[0].rules[1].endpoint_selector.match_labels;
        assert_eq!(labels["k8s:io.kubernetes.pod.namespace"], "youssef");
        assert_eq!(labels["app"], "client");

        // A matchExpression that rules the policy's namespace out selects nothing, as it
        // always did: loaded, and refused by validate.
        let policies = parse(
            "{matchExpressions: [{key: 'k8s:io.kubernetes.pod.namespace', operator: In, values: [other]}]}",
        )
        .unwrap();
        let refused = &policies[0].refused_by_validate;
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains(
                "p.yaml: policy youssef/p: specs[1].endpointSelector.matchExpressions[0]"
            ),
            "{refused:?}"
        );
        assert!(refused[0].contains("(\"youssef\") only"), "{refused:?}");
        assert!(
            refused[0].contains("CiliumClusterwideNetworkPolicy"),
            "{refused:?}"
        );
        assert!(
            parse("{matchExpressions: [{key: io.kubernetes.pod.namespace, operator: NotIn, values: [other]}]}")
                .unwrap()[0]
                .refused_by_validate
                .is_empty()
        );
    }

    #[test]
    fn cidrs() {
        let rule = egress("toCIDR: ['10.1.2.3/8', '192.0.2.1', '2001:db8::/32']").unwrap();
        assert_eq!(
            rule.to_cidr.unwrap(),
            [
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "192.0.2.1/32".parse().unwrap(),
                "2001:db8::/32".parse().unwrap()
            ]
        );
        let set = egress("toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]").unwrap();
        let rule = &set.to_cidr_set.unwrap()[0];
        assert!(rule.contains(&"10.1.0.1".parse().unwrap()));
        assert!(!rule.contains(&"10.96.0.10".parse().unwrap()));
        assert!(!rule.contains(&"192.0.2.1".parse().unwrap()));

        for (yaml, expected) in [
            ("toCIDR: [nope]", "\"nope\" is not a CIDR"),
            ("toCIDRSet: [{cidr: 10.0.0.1}]", "not a CIDR"),
            (
                "toCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]",
                "not inside",
            ),
            ("toCIDRSet: [{cidrGroupRef: x}]", "not supported by Warden"),
        ] {
            let error = egress(yaml).unwrap_err();
            assert!(error.contains(expected), "{yaml}: {error}");
        }
    }

    #[test]
    fn entities() {
        let rule = egress("toEntities: [all, world, host, cluster]").unwrap();
        assert_eq!(
            rule.to_entities.unwrap(),
            [Entity::All, Entity::World, Entity::Host, Entity::Cluster]
        );
        let error = egress("toEntities: [remote-node]").unwrap_err();
        assert!(error.contains("unknown variant `remote-node`"), "{error}");
    }

    #[test]
    fn one_kind_of_peer_per_rule() {
        let error = egress("{toFQDNs: [{matchName: a.io}], toEndpoints: [{}]}").unwrap_err();
        assert!(
            error.contains("toFQDNs and toEndpoints cannot be combined"),
            "{error}"
        );
        // An empty list is no peer of that kind.
        assert!(egress("{toFQDNs: [{matchName: a.io}], toEndpoints: []}").is_ok());
    }

    #[test]
    fn unsupported_fields_fail_whatever_their_value() {
        for yaml in [
            "toServices: []",
            "toGroups: null",
            "icmps: [{fields: [{type: 8}]}]",
            "toPorts: [{ports: [{port: '80'}], rules: {http: [{}]}}]",
            "toPorts: [{ports: [{port: '443'}], serverNames: [a.io]}]",
        ] {
            let error = egress(yaml).unwrap_err();
            assert!(error.contains("not supported by Warden"), "{yaml}: {error}");
        }
        let error = egress("toFoo: []").unwrap_err();
        assert!(error.contains("unknown field `toFoo`"), "{error}");
    }

    #[test]
    fn empty_egress_rule_has_no_l3() {
        let rule = egress("{}").unwrap();
        assert!(!rule.has_l3());
        assert!(rule.to_ports.is_empty());
        assert!(egress("toEndpoints: []").unwrap().has_l3());
    }

    #[test]
    fn serializes_in_cilium_shape_and_back() {
        let yaml = "toFQDNs: [{matchPattern: '*.cilium.io'}]\n\
                    toPorts: [{ports: [{port: '443', protocol: TCP}]}]";
        let rule = egress(yaml).unwrap();
        let json = serde_json::to_value(&rule).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "toFQDNs": [{"matchPattern": "*.cilium.io."}],
                "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}],
            })
        );
        assert_eq!(serde_json::from_value::<EgressRule>(json).unwrap(), rule);
    }
}
