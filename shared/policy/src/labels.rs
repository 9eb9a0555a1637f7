use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Source of labels that come from Kubernetes, which is where every Warden endpoint's labels come
/// from.
pub const K8S_SOURCE: &str = "k8s";
/// The pseudo-source that a selector uses to mean "from any source".
pub const ANY_SOURCE: &str = "any";
/// The label Cilium gives every pod for its namespace, and that selectors use to pick one.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// One endpoint label, as Cilium models it: a key and value plus where the label came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(source: &str, key: &str, value: &str) -> Label {
        Label {
            source: source.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
        }
    }

    pub fn k8s(key: &str, value: &str) -> Label {
        Label::new(K8S_SOURCE, key, value)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.source, self.key, self.value)
    }
}

/// An endpoint's labels. As in Cilium, a key appears at most once whatever its source: inserting
/// a label replaces any label with the same key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<Label>", into = "Vec<Label>")]
pub struct Labels {
    by_key: BTreeMap<String, Label>,
}

impl Labels {
    pub fn new() -> Labels {
        Labels::default()
    }

    /// The labels of a pod: each Kubernetes label with the `k8s` source, plus
    /// `k8s:io.kubernetes.pod.namespace=<namespace>`, which Cilium adds and policies select on.
    pub fn from_k8s(labels: &BTreeMap<String, String>, namespace: &str) -> Labels {
        labels
            .iter()
            .map(|(key, value)| Label::k8s(key, value))
            .chain([Label::k8s(NAMESPACE_LABEL, namespace)])
            .collect()
    }

    /// Adds `label`, returning the label it replaced.
    pub fn insert(&mut self, label: Label) -> Option<Label> {
        self.by_key.insert(label.key.clone(), label)
    }

    pub fn get(&self, key: &str) -> Option<&Label> {
        self.by_key.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

impl FromIterator<Label> for Labels {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> Self {
        let mut labels = Labels::new();
        for label in iter {
            labels.insert(label);
        }
        labels
    }
}

impl From<Vec<Label>> for Labels {
    fn from(labels: Vec<Label>) -> Self {
        labels.into_iter().collect()
    }
}

impl From<Labels> for Vec<Label> {
    fn from(labels: Labels) -> Self {
        labels.by_key.into_values().collect()
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, label) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{label}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_k8s_adds_the_namespace_label() {
        let k8s = BTreeMap::from([("app".to_owned(), "test".to_owned())]);
        let labels = Labels::from_k8s(&k8s, "youssef");
        assert_eq!(labels.len(), 2);
        assert_eq!(labels.get("app"), Some(&Label::k8s("app", "test")));
        assert_eq!(
            labels.get(NAMESPACE_LABEL),
            Some(&Label::k8s(NAMESPACE_LABEL, "youssef"))
        );
        assert_eq!(
            labels.to_string(),
            "k8s:app=test,k8s:io.kubernetes.pod.namespace=youssef"
        );
    }

    #[test]
    fn one_label_per_key() {
        let mut labels = Labels::new();
        assert_eq!(labels.insert(Label::new("k8s", "app", "a")), None);
        let replaced = labels.insert(Label::new("container", "app", "b"));
        assert_eq!(replaced, Some(Label::new("k8s", "app", "a")));
        assert_eq!(labels.len(), 1);
    }

    #[test]
    fn serde_is_a_list_of_labels() {
        let labels: Labels = [Label::k8s("app", "x")].into_iter().collect();
        let json = serde_json::to_string(&labels).unwrap();
        assert_eq!(json, r#"[{"source":"k8s","key":"app","value":"x"}]"#);
        assert_eq!(serde_json::from_str::<Labels>(&json).unwrap(), labels);
    }
}
