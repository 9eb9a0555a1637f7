use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::labels::{ANY_SOURCE, K8S_SOURCE, Label, Labels, NAMESPACE_LABEL};

/// A Kubernetes label selector with Cilium's reading of keys: `k8s:app` matches only a label
/// `app` whose source is `k8s`, while `any:app` and plain `app` match `app` from any source.
///
/// All requirements must hold; an empty selector (`{}`) selects every endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRequirement")]
pub struct LabelRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl EndpointSelector {
    /// Whether an endpoint with `labels` is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| lookup(labels, key).is_some_and(|label| label.value == *value))
            && self
                .match_expressions
                .iter()
                .all(|requirement| requirement.matches(labels))
    }

    /// Whether every requirement's key is among `labels`: for labels that are only part of an
    /// endpoint's (a Service's, its selector's), a requirement on another key, `NotIn` or
    /// `DoesNotExist` there, cannot be decided. (`matchLabels` require their key anyway.)
    pub fn decided_by(&self, labels: &Labels) -> bool {
        self.match_expressions.iter().all(|requirement| {
            lookup(labels, &requirement.key).is_some()
                // A source no Warden label has (`container:tier`): absent from every pod alike.
                || split_key(&requirement.key)
                    .0
                    .is_some_and(|source| source != K8S_SOURCE)
        })
    }

    /// Whether the selector names a namespace itself (with the `k8s:` or `any:` prefix or
    /// none), which lifts the namespace restriction of a `toEndpoints` entry.
    pub fn names_namespace(&self) -> bool {
        self.match_labels.keys().any(|key| is_namespace_key(key))
            || self
                .match_expressions
                .iter()
                .any(|requirement| is_namespace_key(&requirement.key))
    }

    /// The first key that names one of Cilium's reserved labels (`reserved:host`, or its
    /// spellings `reserved.host` and `$host`), which no Warden endpoint carries.
    pub(crate) fn reserved_key(&self) -> Option<&str> {
        self.match_labels
            .keys()
            .chain(
                self.match_expressions
                    .iter()
                    .map(|requirement| &requirement.key),
            )
            .map(String::as_str)
            .find(|key| {
                key.starts_with('$')
                    || key.starts_with(RESERVED_PREFIX_DOT)
                    || split_key(key).0 == Some(RESERVED_SOURCE)
            })
    }

    /// Confines the `endpointSelector` of a policy living in `namespace` to it, as Cilium's
    /// `ParseToCiliumRule` does: a `matchLabels` entry `k8s:io.kubernetes.pod.namespace`
    /// naming another namespace is overwritten with the policy's (Cilium logs "illegal
    /// namespace match" and does the same). Cilium sets that one key only, leaving the key
    /// without a source (or `any:`) beside it, and `matchExpressions`: naming or requiring
    /// another namespace, they select nothing; that is an error, as `(field, message)`.
    /// Returns the namespaces overwritten.
    pub(crate) fn confine_to_namespace(
        &mut self,
        namespace: &str,
    ) -> Result<Vec<String>, (String, String)> {
        let nothing = |field: String, key: &str| {
            (
                field,
                format!(
                    "a CiliumNetworkPolicy selects endpoints of its own namespace \
                     ({namespace:?}) only, and this requirement on {key:?} rules that namespace \
                     out, so the rule would select nothing; remove it, or write a \
                     CiliumClusterwideNetworkPolicy to select endpoints of other namespaces"
                ),
            )
        };
        let mut overwritten = Vec::new();
        for (key, value) in &mut self.match_labels {
            if !is_namespace_key(key) || value == namespace {
                continue;
            }
            if split_key(key).0 != Some(K8S_SOURCE) {
                return Err(nothing(format!("matchLabels.{key}"), key));
            }
            overwritten.push(std::mem::replace(value, namespace.to_owned()));
        }
        for (i, requirement) in self.match_expressions.iter().enumerate() {
            if is_namespace_key(&requirement.key) && !requirement.matches_value(Some(namespace)) {
                return Err(nothing(format!("matchExpressions[{i}]"), &requirement.key));
            }
        }
        Ok(overwritten)
    }
}

impl LabelRequirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.matches_value(lookup(labels, &self.key).map(|label: &Label| label.value.as_str()))
    }

    /// Whether the requirement holds for an endpoint whose label has `value` (`None`: no
    /// such label).
    fn matches_value(&self, value: Option<&str>) -> bool {
        let listed = |value: &str| self.values.iter().any(|listed| listed == value);
        match self.operator {
            SelectorOperator::In => value.is_some_and(listed),
            SelectorOperator::NotIn => !value.is_some_and(listed),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// Cilium's source of its special identities' labels (`reserved:host`, `reserved:world`, ...).
const RESERVED_SOURCE: &str = "reserved";
/// Cilium also reads `reserved.host` as `reserved:host`.
const RESERVED_PREFIX_DOT: &str = "reserved.";

/// Whether a selector key names the namespace label (with the `k8s:` or `any:` prefix or none).
fn is_namespace_key(key: &str) -> bool {
    let (source, key) = split_key(key);
    key == NAMESPACE_LABEL && source.is_none_or(|source| source == K8S_SOURCE)
}

/// Splits a selector key into its source (`None` for any source) and the label key.
fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once(':') {
        Some((source, key)) if source.is_empty() || source == ANY_SOURCE => (None, key),
        Some((source, key)) => (Some(source), key),
        None => (None, key),
    }
}

fn lookup<'a>(labels: &'a Labels, selector_key: &str) -> Option<&'a Label> {
    let (source, key) = split_key(selector_key);
    labels
        .get(key)
        .filter(|label| source.is_none_or(|source| source == label.source))
}

/// A selector as its policy's namespace confines it. A namespaced policy (CiliumNetworkPolicy)
/// applies only to endpoints of its own namespace, and its `toEndpoints` entries only select
/// peers there too unless they name a namespace; a clusterwide policy has no such limit.
#[derive(Clone, Copy, Debug)]
pub struct ScopedSelector<'a> {
    pub selector: &'a EndpointSelector,
    /// Endpoints must be in this namespace, when set.
    pub namespace: Option<&'a str>,
}

impl<'a> ScopedSelector<'a> {
    /// A rule's `endpointSelector`.
    pub fn subject(selector: &'a EndpointSelector, policy_namespace: Option<&'a str>) -> Self {
        ScopedSelector {
            selector,
            namespace: policy_namespace,
        }
    }

    /// A `toEndpoints` entry.
    pub fn peer(selector: &'a EndpointSelector, policy_namespace: Option<&'a str>) -> Self {
        ScopedSelector {
            selector,
            namespace: policy_namespace.filter(|_| !selector.names_namespace()),
        }
    }

    /// Whether an endpoint of `namespace` with `labels` is selected.
    pub fn matches(&self, namespace: &str, labels: &Labels) -> bool {
        self.namespace.is_none_or(|scope| scope == namespace) && self.selector.matches(labels)
    }

    /// [`EndpointSelector::decided_by`].
    pub fn decided_by(&self, labels: &Labels) -> bool {
        self.selector.decided_by(labels)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequirement {
    key: String,
    operator: SelectorOperator,
    #[serde(default)]
    values: Vec<String>,
}

impl TryFrom<RawRequirement> for LabelRequirement {
    type Error = String;

    fn try_from(raw: RawRequirement) -> Result<Self, Self::Error> {
        let needs_values = matches!(raw.operator, SelectorOperator::In | SelectorOperator::NotIn);
        if needs_values && raw.values.is_empty() {
            return Err(format!(
                "operator {:?} needs at least one value",
                raw.operator
            ));
        }
        if !needs_values && !raw.values.is_empty() {
            return Err(format!("operator {:?} takes no values", raw.operator));
        }
        Ok(LabelRequirement {
            key: raw.key,
            operator: raw.operator,
            values: raw.values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(yaml: &str) -> EndpointSelector {
        yaml_serde::from_str(yaml).unwrap()
    }

    fn pod(labels: &[(&str, &str)], namespace: &str) -> Labels {
        let k8s = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Labels::from_k8s(&k8s, namespace)
    }

    #[test]
    fn empty_selects_everything() {
        assert!(selector("{}").matches(&Labels::new()));
        assert!(selector("{}").matches(&pod(&[("app", "x")], "default")));
    }

    #[test]
    fn source_prefixes() {
        let k8s_pod = pod(&[("app", "test")], "default");
        let mut other_pod = Labels::new();
        other_pod.insert(Label::new("container", "app", "test"));

        let k8s_only = selector("matchLabels: {'k8s:app': test}");
        assert!(k8s_only.matches(&k8s_pod));
        assert!(!k8s_only.matches(&other_pod));

        for any in ["matchLabels: {'any:app': test}", "matchLabels: {app: test}"] {
            assert!(selector(any).matches(&k8s_pod), "{any}");
            assert!(selector(any).matches(&other_pod), "{any}");
        }
        assert!(!selector("matchLabels: {app: other}").matches(&k8s_pod));
        assert!(!selector("matchLabels: {'container:app': test}").matches(&k8s_pod));
    }

    #[test]
    fn match_expressions() {
        let web = pod(&[("app", "web"), ("tier", "front")], "default");
        let db = pod(&[("app", "db")], "default");
        let cases = [
            ("{key: app, operator: In, values: [web, api]}", true, false),
            (
                "{key: 'k8s:app', operator: NotIn, values: [web]}",
                false,
                true,
            ),
            ("{key: tier, operator: Exists}", true, false),
            ("{key: tier, operator: DoesNotExist}", false, true),
            ("{key: nope, operator: NotIn, values: [x]}", true, true),
        ];
        for (expression, selects_web, selects_db) in cases {
            let s = selector(&format!("matchExpressions: [{expression}]"));
            assert_eq!(s.matches(&web), selects_web, "{expression} on web");
            assert_eq!(s.matches(&db), selects_db, "{expression} on db");
        }
    }

    #[test]
    fn labels_and_expressions_must_all_hold() {
        let s = selector(
            "matchLabels: {app: web}\nmatchExpressions: [{key: tier, operator: In, values: [front]}]",
        );
        assert!(s.matches(&pod(&[("app", "web"), ("tier", "front")], "ns")));
        assert!(!s.matches(&pod(&[("app", "web"), ("tier", "back")], "ns")));
        assert!(!s.matches(&pod(&[("tier", "front")], "ns")));
    }

    #[test]
    fn bad_expressions_are_rejected() {
        for bad in [
            "matchExpressions: [{key: a, operator: Gt, values: ['1']}]",
            "matchExpressions: [{key: a, operator: In}]",
            "matchExpressions: [{key: a, operator: Exists, values: [x]}]",
            "matchExpressions: [{key: a, operator: In, values: [x], extra: 1}]",
            "matchLabel: {a: b}",
        ] {
            assert!(
                yaml_serde::from_str::<EndpointSelector>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn namespace_scoping() {
        let app = selector("matchLabels: {app: test}");
        let in_youssef = pod(&[("app", "test")], "youssef");
        let in_other = pod(&[("app", "test")], "other");

        let subject = ScopedSelector::subject(&app, Some("youssef"));
        assert!(subject.matches("youssef", &in_youssef));
        assert!(!subject.matches("other", &in_other));
        assert!(ScopedSelector::subject(&app, None).matches("other", &in_other));

        let peer = ScopedSelector::peer(&app, Some("youssef"));
        assert!(!peer.matches("other", &in_other));

        for named in [
            "matchLabels: {'k8s:io.kubernetes.pod.namespace': other, app: test}",
            "matchLabels: {'io.kubernetes.pod.namespace': other}",
            "matchLabels: {'any:io.kubernetes.pod.namespace': other}",
            "matchExpressions: [{key: 'k8s:io.kubernetes.pod.namespace', operator: In, values: [other]}]",
        ] {
            let named = selector(named);
            assert!(named.names_namespace());
            let peer = ScopedSelector::peer(&named, Some("youssef"));
            assert!(peer.matches("other", &in_other));
            assert!(!peer.matches("youssef", &in_youssef));
        }
        // A typo in the prefix (Cilium's own dns-visibility example has one) is just another key.
        assert!(!selector("matchLabels: {'k8s.io.kubernetes.pod.namespace': x}").names_namespace());
    }

    #[test]
    fn confine_to_namespace_overwrites_labels_and_refuses_excluding_expressions() {
        let in_youssef = pod(&[("app", "test")], "youssef");
        // Only the `k8s:` key (see `a_namespace_key_without_source_is_not_overwritten`).
        let mut confined =
            selector("matchLabels: {'k8s:io.kubernetes.pod.namespace': other, app: test}");
        assert!(!confined.matches(&in_youssef));
        confined.confine_to_namespace("youssef").unwrap();
        assert!(confined.matches(&in_youssef));
        assert_eq!(confined.match_labels["app"], "test");
        // Another source, or a typo, is not the namespace label and stays as written.
        let mut other_source =
            selector("matchLabels: {'container:io.kubernetes.pod.namespace': x}");
        other_source.confine_to_namespace("youssef").unwrap();
        assert_eq!(
            other_source.match_labels["container:io.kubernetes.pod.namespace"],
            "x"
        );

        let key = "key: 'k8s:io.kubernetes.pod.namespace'";
        for (expression, allowed) in [
            ("operator: In, values: [other]", false),
            ("operator: In, values: [other, youssef]", true),
            ("operator: NotIn, values: [youssef]", false),
            ("operator: NotIn, values: [other]", true),
            ("operator: Exists", true),
            ("operator: DoesNotExist", false),
        ] {
            let mut s = selector(&format!(
                "matchExpressions: [{{key: app, operator: Exists}}, {{{key}, {expression}}}]"
            ));
            let result = s.confine_to_namespace("youssef");
            assert_eq!(result.is_ok(), allowed, "{expression}: {result:?}");
            if let Err((field, message)) = result {
                assert_eq!(field, "matchExpressions[1]");
                assert!(message.contains("select nothing"), "{message}");
            }
        }
    }

    /// Cilium sets `k8s:io.kubernetes.pod.namespace` to the policy's namespace and keeps a
    /// namespace key without a source beside it: naming another namespace, that one selects
    /// nothing (it was overwritten too, selecting the policy namespace's endpoints).
    #[test]
    fn a_namespace_key_without_source_is_not_overwritten() {
        for key in [
            "io.kubernetes.pod.namespace",
            "'any:io.kubernetes.pod.namespace'",
        ] {
            let mut s = selector(&format!("matchLabels: {{{key}: other, app: x}}"));
            let (field, message) = s.confine_to_namespace("youssef").unwrap_err();
            assert!(field.starts_with("matchLabels."), "{field}");
            assert!(message.contains("select nothing"), "{message}");
            assert!(
                s.match_labels.values().any(|value| value == "other"),
                "{key}"
            );
            let mut s = selector(&format!("matchLabels: {{{key}: youssef}}"));
            assert_eq!(s.confine_to_namespace("youssef"), Ok(Vec::new()), "{key}");
        }
        let mut s = selector("matchLabels: {'k8s:io.kubernetes.pod.namespace': other}");
        assert_eq!(
            s.confine_to_namespace("youssef"),
            Ok(vec!["other".to_owned()])
        );
    }

    #[test]
    fn reserved_keys() {
        for reserved in ["'reserved:host'", "'$host'", "reserved.world"] {
            let s = selector(&format!("matchLabels: {{{reserved}: ''}}"));
            assert!(s.reserved_key().is_some(), "{reserved}");
            let s = selector(&format!(
                "matchExpressions: [{{key: {reserved}, operator: Exists}}]"
            ));
            assert!(s.reserved_key().is_some(), "{reserved}");
        }
        for plain in ["reserved", "'k8s:reserved'", "'k8s:reserved.host'", "app"] {
            let s = selector(&format!("matchLabels: {{{plain}: x}}"));
            assert_eq!(s.reserved_key(), None, "{plain}");
        }
    }
}
