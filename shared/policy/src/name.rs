use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PolicyError;

/// Longest name in presentation form, trailing dot excluded (RFC 1035 §2.3.4 gives 255 octets on
/// the wire, which is 253 characters of text).
const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

/// A DNS name as policy sees it: ASCII-lowercased and fully qualified (with a trailing dot), so
/// that `CILIUM.io` and `cilium.io.` are the same key everywhere.
///
/// Validation is deliberately light, because the proxy must be able to name whatever a client
/// asks for: labels must be non-empty and at most 63 characters, and the whole name at most 253.
/// The root is `.`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DnsName(String);

impl DnsName {
    pub fn new(name: &str) -> Result<DnsName, PolicyError> {
        if name == "." {
            return Ok(DnsName(".".into()));
        }
        let body = name.strip_suffix('.').unwrap_or(name);
        check_body(body).map_err(|reason| PolicyError::InvalidName {
            name: name.to_owned(),
            reason,
        })?;
        let mut canonical = body.to_ascii_lowercase();
        canonical.push('.');
        Ok(DnsName(canonical))
    }

    /// Like [`DnsName::new`], but reusing `name`'s buffer (the proxy makes one per query);
    /// `name` comes back unchanged when it is no valid name.
    pub fn try_from_string(mut name: String) -> Result<DnsName, String> {
        if name == "." {
            return Ok(DnsName(name));
        }
        let body_len = name.strip_suffix('.').map_or(name.len(), str::len);
        if check_body(&name[..body_len]).is_err() {
            return Err(name);
        }
        name.truncate(body_len);
        name.make_ascii_lowercase();
        name.push('.');
        Ok(DnsName(name))
    }

    /// The canonical text, with its trailing dot.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "."
    }

    /// The labels from the rightmost (top-level domain) to the leftmost; none for the root.
    pub fn labels_rev(&self) -> impl Iterator<Item = &str> + Clone {
        let body = self.0.strip_suffix('.').unwrap_or(&self.0);
        // The root's body is empty, which `rsplit` would turn into one empty label.
        body.rsplit('.').filter(|label| !label.is_empty())
    }
}

/// Checks a name without its trailing dot, saying what is wrong.
pub(crate) fn check_body(body: &str) -> Result<(), String> {
    if body.is_empty() {
        return Err("empty name".into());
    }
    if body.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} characters"));
    }
    for label in body.split('.') {
        if label.is_empty() {
            return Err("empty label".into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "label {label:?} is longer than {MAX_LABEL_LEN} characters"
            ));
        }
    }
    Ok(())
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DnsName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for DnsName {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DnsName::new(s)
    }
}

impl TryFrom<String> for DnsName {
    type Error = PolicyError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        DnsName::new(&value)
    }
}

impl From<DnsName> for String {
    fn from(name: DnsName) -> String {
        name.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_from_a_string_is_the_same_name() {
        for text in ["CILIUM.io", "cilium.io.", ".", "a.b-c.io"] {
            assert_eq!(
                DnsName::try_from_string(text.to_owned()).unwrap(),
                DnsName::new(text).unwrap()
            );
        }
        for bad in ["", "a..io", "..", &"x".repeat(64)] {
            assert!(DnsName::new(bad).is_err());
            assert_eq!(
                DnsName::try_from_string(bad.to_owned()),
                Err(bad.to_owned())
            );
        }
    }

    #[test]
    fn lowercases_and_qualifies() {
        let name = DnsName::new("WWW.Cilium.IO").unwrap();
        assert_eq!(name.as_str(), "www.cilium.io.");
        assert_eq!(name, DnsName::new("www.cilium.io.").unwrap());
        assert_eq!(name.to_string(), "www.cilium.io.");
    }

    #[test]
    fn root_is_a_name() {
        let root = DnsName::new(".").unwrap();
        assert!(root.is_root());
        assert_eq!(root.labels_rev().count(), 0);
    }

    #[test]
    fn labels_come_right_to_left() {
        let name = DnsName::new("a.b.cilium.io").unwrap();
        assert_eq!(
            name.labels_rev().collect::<Vec<_>>(),
            ["io", "cilium", "b", "a"]
        );
    }

    #[test]
    fn rejects_malformed_names() {
        for bad in [
            "",
            "..",
            "a..b",
            ".a",
            "a.b..",
            &"x".repeat(64),
            &"a.".repeat(128),
        ] {
            assert!(
                matches!(DnsName::new(bad), Err(PolicyError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn accepts_the_longest_names() {
        let label = "x".repeat(63);
        assert!(DnsName::new(&label).is_ok());
        // 126 two-character labels and a final one: 253 characters.
        let long = format!("{}a", "a.".repeat(126));
        assert_eq!(long.len(), 253);
        assert!(DnsName::new(&long).is_ok());
    }

    #[test]
    fn keeps_characters_a_client_may_send() {
        // Wildcard queries and service labels are legitimate questions.
        assert_eq!(
            DnsName::new("*._tcp.Example.com").unwrap().as_str(),
            "*._tcp.example.com."
        );
    }

    #[test]
    fn serde_round_trip_validates() {
        let name: DnsName = serde_json::from_str("\"Cilium.io\"").unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"cilium.io.\"");
        assert!(serde_json::from_str::<DnsName>("\"a..b\"").is_err());
    }
}
