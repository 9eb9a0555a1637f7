//! Reading policy files: YAML (or JSON) streams of CiliumNetworkPolicy documents, or of lists
//! of them (`kind: List`, as `kubectl get -o yaml` writes several).

mod node_budget;

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeSeed;
use yaml_serde::Value;

use node_budget::{Expanded, MAX_NODES, MAX_SCALAR_BYTES, NodeBudget};

use crate::PolicyError;
use crate::error::{InvalidPolicy, Location};
use crate::model::{API_VERSION, FieldProblem, Policy, PolicyDocument, PolicyKind};

/// Extensions of the files [`load_path`] reads from a directory.
const POLICY_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// The bound policy files are held to before anything decodes them (no aliases, at most a
/// million nodes and 16 MiB of scalars; see `node_budget`), for other YAML the agent reads
/// from outside: endpoint files. The error says where and what.
pub fn check_yaml_text(text: &str) -> Result<(), String> {
    node_budget::check_text(text, MAX_NODES, MAX_SCALAR_BYTES).map_err(|(location, message)| {
        match location {
            Some(location) => format!("{}:{}: {message}", location.line, location.column),
            None => message,
        }
    })
}

/// Parses every policy in `text`, a stream of YAML documents separated by `---`. Empty documents
/// are skipped; anything else must be a CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy.
/// `origin` names the text in errors and in [`Policy::origin`].
pub fn parse_str(text: &str, origin: &Path) -> Result<Vec<Policy>, PolicyError> {
    let mut errors = Vec::new();
    let policies = parse_documents(text, origin, &mut errors);
    match errors.into_iter().next() {
        Some(first) => Err(first),
        None => Ok(policies),
    }
}

/// [`parse_str`]'s work: every good policy of `text`, and in `errors` every document that is
/// not one. A document that does not decode as a policy leaves the others to be read; a
/// syntax error or a text past the bounds ends the reading (the parser cannot find the next
/// document after it).
fn parse_documents(text: &str, origin: &Path, errors: &mut Vec<PolicyError>) -> Vec<Policy> {
    // Editors on Windows start files with a byte-order mark, which yaml_serde mistakes for a
    // document of its own.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut policies = Vec::new();
    // The file is checked first (see `node_budget`); then each document is read three times:
    // counted, into a `Value`, which catches syntax errors and gives the header and the name for
    // messages, and into the typed model, straight from the text so that errors keep their line
    // and column.
    if let Err((location, message)) = node_budget::check_text(text, MAX_NODES, MAX_SCALAR_BYTES) {
        errors.push(PolicyError::Syntax {
            file: origin.to_owned(),
            location,
            message,
        });
        return policies;
    }
    let counted_documents = yaml_serde::Deserializer::from_str(text);
    let mut expanded = Expanded::default();
    let typed_documents = yaml_serde::Deserializer::from_str(text);
    for (index, ((counted, untyped), typed)) in counted_documents
        .zip(yaml_serde::Deserializer::from_str(text))
        .zip(typed_documents)
        .enumerate()
    {
        let document = index + 1;
        let syntax = |error: yaml_serde::Error| PolicyError::Syntax {
            file: origin.to_owned(),
            location: location(&error),
            message: without_location(&error),
        };
        let counted = NodeBudget {
            spent: &mut expanded,
            max_nodes: MAX_NODES,
            max_scalar_bytes: MAX_SCALAR_BYTES,
        }
        .deserialize(counted);
        // A syntax error ends the stream: the parser cannot find the next document after it.
        let value = match counted.and_then(|()| Value::deserialize(untyped)) {
            Ok(value) => value,
            Err(error) => {
                errors.push(syntax(error));
                return policies;
            }
        };
        if value.is_null() {
            continue;
        }
        match list_items(&value) {
            ListItems::NotAList => {}
            ListItems::Items(items) => {
                for (index, item) in items.iter().enumerate() {
                    match parse_item(item, origin, document, index) {
                        Ok(policy) => policies.push(policy),
                        Err(error) => errors.push(error),
                    }
                }
                continue;
            }
            ListItems::Invalid(message) => {
                errors.push(PolicyError::Invalid(Box::new(InvalidPolicy {
                    file: origin.to_owned(),
                    document,
                    policy: None,
                    field: "items".to_owned(),
                    message,
                    location: None,
                })));
                continue;
            }
        }
        match parse_object(&value, typed, origin, document) {
            Ok(policy) => policies.push(policy),
            Err(error) => errors.push(error),
        }
    }
    policies
}

/// One object of document `document`, as parsed (`value`) and as `typed` reads its text: its
/// header checked, then decoded into a policy. A document of its own, or a list's item.
fn parse_object(
    value: &Value,
    typed: yaml_serde::Deserializer<'_>,
    origin: &Path,
    document: usize,
) -> Result<Policy, PolicyError> {
    let name = check_header(value, origin, document)?;
    decode(typed, value)
        .and_then(|decoded| decoded.into_policy(origin.to_owned()))
        .map_err(|problem| {
            PolicyError::Invalid(Box::new(InvalidPolicy {
                file: origin.to_owned(),
                document,
                policy: name,
                field: problem.field,
                message: problem.message,
                location: problem.location,
            }))
        })
}

/// Loads one policy file, or every `*.yaml`, `*.yml` and `*.json` file directly inside a
/// directory (in name order, hidden files skipped, subdirectories ignored). Stops at the first
/// error.
pub fn load_path(path: &Path) -> Result<Vec<Policy>, PolicyError> {
    let mut policies = Vec::new();
    for file in policy_files(path)? {
        policies.extend(load_file(&file)?);
    }
    check_unique(&policies)?;
    Ok(policies)
}

/// The most text the policy files may hold together. The agent sends them whole to every
/// `warden-dnsproxy` in one snapshot message (beside the endpoints), and a message past the
/// socket's limit breaks every session, for as long as the folder stays so.
pub const MAX_FOLDER_TEXT_BYTES: usize = 12 << 20;

/// Refuses policy files holding more than [`MAX_FOLDER_TEXT_BYTES`] together, given the length
/// of each file's text.
pub fn check_folder_size(lengths: impl IntoIterator<Item = usize>) -> Result<(), PolicyError> {
    let bytes = lengths.into_iter().sum();
    if bytes > MAX_FOLDER_TEXT_BYTES {
        return Err(PolicyError::FolderTooLarge {
            bytes,
            limit: MAX_FOLDER_TEXT_BYTES,
        });
    }
    Ok(())
}

/// Refuses a second policy of one kind, namespace and name. An old copy left beside its new
/// version (`web.yaml` and `web-v2.yaml`) would otherwise be enforced with it, as a union
/// that allows what either allows, where Kubernetes would hold the later one alone.
pub fn check_unique(policies: &[Policy]) -> Result<(), PolicyError> {
    let mut seen: std::collections::HashMap<(PolicyKind, Option<&str>, &str), &Path> =
        std::collections::HashMap::new();
    for policy in policies {
        let key = (
            policy.kind,
            policy.namespace.as_deref(),
            policy.name.as_str(),
        );
        if let Some(first) = seen.insert(key, &policy.origin) {
            return Err(PolicyError::Duplicate {
                kind: policy.kind,
                name: policy.qualified_name(),
                first: first.to_path_buf(),
                second: policy.origin.clone(),
            });
        }
    }
    Ok(())
}

/// Loads every path like [`load_path`], but reports every broken file instead of stopping at the
/// first, and what is not enforced as written as errors too, as `warden policy validate` needs.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Policy>, Vec<PolicyError>> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    let mut lengths = Vec::new();
    for path in paths {
        let files = match policy_files(path) {
            Ok(files) => files,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        for file in files {
            match fs::read_to_string(&file) {
                Ok(text) => {
                    lengths.push(text.len());
                    for policy in parse_documents(&text, &file, &mut errors) {
                        errors.extend(policy.refused_by_validate.iter().map(|problem| {
                            PolicyError::NotEnforcedAsWritten {
                                file: file.clone(),
                                problem: problem.clone(),
                            }
                        }));
                        policies.push(policy);
                    }
                }
                Err(source) => errors.push(PolicyError::Io { path: file, source }),
            }
        }
    }
    if let Err(error) = check_unique(&policies) {
        errors.push(error);
    }
    if let Err(error) = check_folder_size(lengths) {
        errors.push(error);
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

fn load_file(path: &Path) -> Result<Vec<Policy>, PolicyError> {
    let text = fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_str(&text, path)
}

/// `path` itself when it is not a directory, else the policy files in it.
fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io_error = |source| PolicyError::Io {
        path: path.to_owned(),
        source,
    };
    if !fs::metadata(path).map_err(io_error)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let (files, not_files) = folder_files(path).map_err(io_error)?;
    // A policy file's name on something else (a folder) is an error, as the agent takes it:
    // the other files would otherwise validate as a whole they are not.
    if let Some(file) = not_files.into_iter().next() {
        return Err(PolicyError::Io {
            path: file,
            source: std::io::Error::other("not a regular file"),
        });
    }
    Ok(files)
}

/// The `*.yaml`, `*.yml` and `*.json` files directly inside `dir`, sorted by name, and apart
/// such names that are something else (a folder put in a file's place); hidden names are
/// skipped, links followed (a linked file counts, as with ConfigMap mounts), and a dangling
/// link is left out (a removal under way: a ConfigMap key deleted, the kubelet swaps the data,
/// then removes the link; any other failure to look at a name lists it, for its read to
/// fail). The agent's watched folders are listed the same way.
pub fn folder_files(dir: &Path) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut files, mut not_files) = (Vec::new(), Vec::new());
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let wanted = file
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| POLICY_EXTENSIONS.contains(&ext));
        if hidden || !wanted {
            continue;
        }
        match fs::metadata(&file) {
            Ok(metadata) if metadata.is_file() => files.push(file),
            Ok(_) => not_files.push(file),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            // A loop of links, a target it may not look at, an I/O error: listed as a file,
            // whose read then says what is wrong. Left out, its policy was silently gone.
            Err(_) => files.push(file),
        }
    }
    files.sort();
    not_files.sort();
    Ok((files, not_files))
}

/// What a document holds when it is a list of objects, as `kubectl get ... -o yaml` writes
/// several (`kind: List`), or the API server lists one kind (`CiliumNetworkPolicyList`).
enum ListItems<'a> {
    NotAList,
    Items(&'a [Value]),
    Invalid(String),
}

fn list_items(value: &Value) -> ListItems<'_> {
    let Some(kind) = value.get("kind").and_then(Value::as_str) else {
        return ListItems::NotAList;
    };
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let is_list = match kind.strip_suffix("List") {
        Some("") => api_version == Some("v1"),
        Some(item_kind) => {
            PolicyKind::from_kind(item_kind).is_some() && api_version == Some(API_VERSION)
        }
        None => false,
    };
    if !is_list {
        return ListItems::NotAList;
    }
    match value.get("items") {
        // `kubectl` writes `items: []` for an empty list; some tools leave it out.
        None | Some(Value::Null) => ListItems::Items(&[]),
        Some(Value::Sequence(items)) => ListItems::Items(items),
        Some(other) => ListItems::Invalid(format!("expected a list, found {}", describe(other))),
    }
}

/// Item `index` of a list in document `document`: read as a document of its own, its errors
/// pointing at `items[index]` (without a line: the list was read as a whole).
fn parse_item(
    item: &Value,
    origin: &Path,
    document: usize,
    index: usize,
) -> Result<Policy, PolicyError> {
    let at = |field: &str| {
        if field.is_empty() {
            format!("items[{index}]")
        } else {
            format!("items[{index}].{field}")
        }
    };
    // Through text, as a document is read: decoded from the parsed value, a plain scalar
    // label such as `version: 2` was refused (the value holds a number; the text reader takes
    // a scalar as the string the model asks for).
    let text = yaml_serde::to_string(item).map_err(|error| {
        PolicyError::Invalid(Box::new(InvalidPolicy {
            file: origin.to_owned(),
            document,
            policy: metadata_name(item),
            field: at(""),
            message: error.to_string(),
            location: None,
        }))
    })?;
    // Its errors point at the item; lines would be the copy's, so left out.
    parse_object(
        item,
        yaml_serde::Deserializer::from_str(&text),
        origin,
        document,
    )
    .map_err(|error| match error {
        PolicyError::Invalid(mut invalid) => {
            invalid.field = at(&invalid.field);
            invalid.location = None;
            PolicyError::Invalid(invalid)
        }
        PolicyError::UnsupportedKind { kind, .. } => {
            PolicyError::Invalid(Box::new(InvalidPolicy {
                file: origin.to_owned(),
                document,
                policy: None,
                field: at("kind"),
                message: format!(
                    "{kind:?} is not a policy Warden reads \
                     (expected CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy)"
                ),
                location: None,
            }))
        }
        other => other,
    })
}

/// Checks `kind` and `apiVersion` before anything else, so that a stray `ConfigMap` is reported
/// as such rather than as a pile of unknown fields. Returns `metadata.name` when there is one.
fn check_header(
    value: &Value,
    origin: &Path,
    document: usize,
) -> Result<Option<String>, PolicyError> {
    let name = metadata_name(value);
    let invalid = |field: &str, message: String| {
        PolicyError::Invalid(Box::new(InvalidPolicy {
            file: origin.to_owned(),
            document,
            policy: name.clone(),
            field: field.to_owned(),
            message,
            location: None,
        }))
    };
    if !value.is_mapping() {
        return Err(invalid(
            "",
            format!("expected a Kubernetes object, found {}", describe(value)),
        ));
    }
    let kind = value
        .get("kind")
        .ok_or_else(|| invalid("kind", "missing".into()))?;
    let kind = kind.as_str().ok_or_else(|| {
        invalid(
            "kind",
            format!("expected a string, found {}", describe(kind)),
        )
    })?;
    if PolicyKind::from_kind(kind).is_none() {
        return Err(PolicyError::UnsupportedKind {
            file: origin.to_owned(),
            document,
            kind: kind.to_owned(),
        });
    }
    match value.get("apiVersion").map(Value::as_str) {
        Some(Some(API_VERSION)) => Ok(name),
        Some(Some(other)) => Err(invalid(
            "apiVersion",
            format!("{other:?} is not supported (expected {API_VERSION})"),
        )),
        Some(None) => Err(invalid("apiVersion", "expected a string".into())),
        None => Err(invalid("apiVersion", "missing".into())),
    }
}

/// `metadata.name`, when there is one.
fn metadata_name(value: &Value) -> Option<String> {
    value
        .get("metadata")
        .and_then(|metadata| metadata.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn decode(
    typed: yaml_serde::Deserializer<'_>,
    value: &Value,
) -> Result<PolicyDocument, FieldProblem> {
    PolicyDocument::deserialize(typed).map_err(|located| {
        let location = location(&located);
        // yaml_serde knows the line but folds the field path into its message. Decoding the
        // already-parsed value again through serde_path_to_error reaches the same failure and
        // gives the path as data and the message bare.
        match serde_path_to_error::deserialize::<_, PolicyDocument>(value) {
            Err(error) => path_problem(error, location),
            // Both decoders read the same data; should they ever disagree, the located error is
            // still the truth.
            Ok(_) => FieldProblem {
                field: String::new(),
                message: without_location(&located),
                location,
            },
        }
    })
}

/// A decoding error with its field path as data, at `location`.
fn path_problem(
    error: serde_path_to_error::Error<yaml_serde::Error>,
    location: Option<Location>,
) -> FieldProblem {
    let path = error.path().to_string();
    FieldProblem {
        field: if path == "." { String::new() } else { path },
        message: error.into_inner().to_string(),
        location,
    }
}

fn location(error: &yaml_serde::Error) -> Option<Location> {
    error.location().map(|at| Location {
        line: at.line(),
        column: at.column(),
    })
}

/// The error text without yaml_serde's "at line L column C" (at the end of a message, or before
/// the context of a syntax error), which the error variants carry as fields.
fn without_location(error: &yaml_serde::Error) -> String {
    let text = error.to_string();
    match error.location() {
        Some(at) => text.replacen(
            &format!(" at line {} column {}", at.line(), at.column()),
            "",
            1,
        ),
        None => text,
    }
}
