use std::fmt;
use std::path::{Path, PathBuf};

/// Everything that can go wrong when reading, validating or matching policy.
///
/// Errors from a policy file carry the file, the document (1-based, counting empty documents) or
/// the policy name once it is known, the field path in Cilium's spelling (for example
/// `spec.egress[0].toPorts[0].ports[0].protocol`) and, when the YAML parser knows it, the line
/// and column.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A DNS name that cannot be a fully qualified name.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },

    /// A `matchName` or `matchPattern` that breaks Cilium's syntax.
    #[error("invalid name pattern {pattern:?}: {reason}")]
    InvalidPattern { pattern: String, reason: String },

    /// A policy file or directory that cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Text that is not YAML (or JSON) at all.
    #[error("{}: invalid YAML: {message}", position(file, *location))]
    Syntax {
        file: PathBuf,
        location: Option<Location>,
        message: String,
    },

    /// A well-formed Kubernetes object that is not a Cilium policy, such as a `ConfigMap`.
    #[error(
        "{}: document {document}: kind {kind:?} is not a policy Warden reads \
         (expected CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy)",
        file.display()
    )]
    UnsupportedKind {
        file: PathBuf,
        document: usize,
        kind: String,
    },

    /// What `warden policy validate` refuses and the agent loads as earlier releases did (see
    /// `Policy::refused_by_validate`); `problem` names the file, the policy and the field.
    #[error("{problem}")]
    NotEnforcedAsWritten { file: PathBuf, problem: String },

    /// A policy folder holding more text than a dnsproxy session carries in one snapshot.
    #[error(
        "the policy files hold {bytes} bytes, more than {limit}: the whole policy goes to every \
         warden-dnsproxy in one message"
    )]
    FolderTooLarge { bytes: usize, limit: usize },

    /// Two policies of one kind, namespace and name: Kubernetes holds one object per name, and
    /// both would be enforced, as their union.
    #[error(
        "{}: {kind:?} {name:?} is declared again (first in {}): a policy name is one object",
        second.display(),
        first.display()
    )]
    Duplicate {
        kind: crate::PolicyKind,
        /// `namespace/name`, or the name of a clusterwide policy.
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    /// A policy that is malformed, invalid, or uses a Cilium feature Warden does not implement.
    /// Boxed because it is by far the largest variant and errors travel in every `Result`.
    #[error("{0}")]
    Invalid(Box<InvalidPolicy>),
}

/// A position in a file, both 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// What is wrong with a policy, and where.
#[derive(Debug)]
pub struct InvalidPolicy {
    pub file: PathBuf,
    pub document: usize,
    /// `metadata.name`, when the document got far enough to have one.
    pub policy: Option<String>,
    /// Path of the offending field; empty when the whole document is at fault.
    pub field: String,
    pub message: String,
    pub location: Option<Location>,
}

impl fmt::Display for InvalidPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", position(&self.file, self.location))?;
        match &self.policy {
            Some(name) => write!(f, "policy {name:?}: ")?,
            None => write!(f, "document {}: ", self.document)?,
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// `file:line:column`, the form editors and terminals turn into links.
fn position(file: &Path, location: Option<Location>) -> String {
    match location {
        Some(Location { line, column }) => format!("{}:{line}:{column}", file.display()),
        None => file.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_file_line_policy_and_field() {
        let error = PolicyError::Invalid(Box::new(InvalidPolicy {
            file: PathBuf::from("policies/dns.yaml"),
            document: 2,
            policy: Some("fqdn".into()),
            field: "spec.egress[0].toPorts[0].ports[0].protocol".into(),
            message: "unknown variant `SCTP`".into(),
            location: Some(Location {
                line: 12,
                column: 21,
            }),
        }));
        assert_eq!(
            error.to_string(),
            "policies/dns.yaml:12:21: policy \"fqdn\": \
             spec.egress[0].toPorts[0].ports[0].protocol: unknown variant `SCTP`"
        );
    }

    #[test]
    fn invalid_without_name_or_location_falls_back_to_document() {
        let error = PolicyError::Invalid(Box::new(InvalidPolicy {
            file: PathBuf::from("p.yaml"),
            document: 3,
            policy: None,
            field: String::new(),
            message: "expected a mapping".into(),
            location: None,
        }));
        assert_eq!(error.to_string(), "p.yaml: document 3: expected a mapping");
    }

    #[test]
    fn errors_stay_small() {
        assert!(std::mem::size_of::<PolicyError>() <= 80);
    }
}
