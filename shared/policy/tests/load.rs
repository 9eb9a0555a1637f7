//! Reading policy files: documents, directories, and the errors an operator sees.

use std::fs;
use std::path::{Path, PathBuf};

use warden_policy::{PolicyError, PolicyKind, Protocol, load_path, load_paths, parse_str};

const FILE: &str = "policies/test.yaml";

fn parse(text: &str) -> Result<Vec<warden_policy::Policy>, PolicyError> {
    parse_str(text, Path::new(FILE))
}

/// The parts of an `Invalid` error: (policy, field, message, line).
fn invalid(text: &str) -> (Option<String>, String, String, Option<usize>) {
    match parse(text) {
        Err(PolicyError::Invalid(error)) => {
            assert_eq!(error.file, Path::new(FILE));
            let line = error.location.map(|at| at.line);
            (error.policy, error.field, error.message, line)
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

const MINIMAL: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: minimal
spec:
  endpointSelector: {}
  egress:
  - toPorts:
    - ports:
      - port: '53'
";

#[test]
fn minimal_policy() {
    let policies = parse(MINIMAL).unwrap();
    assert_eq!(policies.len(), 1);
    let policy = &policies[0];
    assert_eq!(policy.name, "minimal");
    assert_eq!(policy.kind, PolicyKind::CiliumNetworkPolicy);
    assert_eq!(
        policy.namespace.as_deref(),
        Some("default"),
        "kubectl's default"
    );
    assert_eq!(policy.origin, Path::new(FILE));
    assert_eq!(
        policy.rules[0].egress[0].to_ports[0].ports[0].protocol,
        Protocol::Any
    );
}

#[test]
fn multi_document_streams_skip_empty_documents() {
    let second = MINIMAL.replace("name: minimal", "name: second");
    let text = format!("---\n---\n# only a comment\n---\n{MINIMAL}---\n\n...\n---\n{second}");
    let names: Vec<String> = parse(&text).unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["minimal", "second"]);
    assert!(parse("").unwrap().is_empty());
    assert!(parse("# nothing\n").unwrap().is_empty());
}

#[test]
fn byte_order_mark_is_ignored() {
    assert_eq!(
        parse(&format!("\u{feff}{MINIMAL}")).unwrap()[0].name,
        "minimal"
    );
}

#[test]
fn spec_and_specs() {
    let text = "apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: both, labels: {team: a}, annotations: {note: b}}
spec:
  description: metadata, ignored
  labels: [{key: a, value: b, source: c}]
  endpointSelector: {}
specs:
- endpointSelector: {matchLabels: {app: a}}
- endpointSelector: {matchLabels: {app: b}}
";
    let policy = &parse(text).unwrap()[0];
    assert_eq!(policy.kind, PolicyKind::CiliumClusterwideNetworkPolicy);
    assert_eq!(policy.namespace, None);
    assert_eq!(policy.rules.len(), 3);

    let (policy, field, message, _) =
        invalid("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: empty}\n");
    assert_eq!(policy.as_deref(), Some("empty"));
    assert_eq!(field, "spec");
    assert!(message.contains("`spec` or `specs`"), "{message}");
}

/// Cilium's examples carry no namespace, for `kubectl apply -n shop`; dropped into the folder
/// such a policy left shop's pods unenforced without a word.
#[test]
fn a_policy_without_a_namespace_is_confined_to_default_and_says_so() {
    let policy = &parse(MINIMAL).unwrap()[0];
    assert_eq!(policy.namespace.as_deref(), Some("default"));
    assert_eq!(policy.warnings.len(), 1, "{:?}", policy.warnings);
    assert!(
        policy.warnings[0].contains("no metadata.namespace")
            && policy.warnings[0].contains("\"default\""),
        "{:?}",
        policy.warnings
    );
    let placed = MINIMAL.replace("  name: minimal\n", "  name: minimal\n  namespace: shop\n");
    assert!(parse(&placed).unwrap()[0].warnings.is_empty());
    let clusterwide = MINIMAL.replace(
        "kind: CiliumNetworkPolicy",
        "kind: CiliumClusterwideNetworkPolicy",
    );
    assert!(parse(&clusterwide).unwrap()[0].warnings.is_empty());
}

#[test]
fn clusterwide_policies_have_no_namespace() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\n\
                metadata: {name: cw, namespace: team}\nspec: {endpointSelector: {}}\n";
    let (_, field, _, _) = invalid(text);
    assert_eq!(field, "metadata.namespace");
}

#[test]
fn other_kinds_are_named() {
    let text = format!("{MINIMAL}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n");
    let error = parse(&text).unwrap_err();
    let PolicyError::UnsupportedKind { document, kind, .. } = &error else {
        panic!("expected UnsupportedKind, got {error:?}");
    };
    assert_eq!((*document, kind.as_str()), (2, "ConfigMap"));
    assert!(
        error.to_string().contains("document 2: kind \"ConfigMap\""),
        "{error}"
    );
}

#[test]
fn header_errors() {
    let (_, field, message, _) = invalid(&MINIMAL.replace("cilium.io/v2", "cilium.io/v1"));
    assert_eq!(field, "apiVersion");
    assert!(
        message.contains("\"cilium.io/v1\" is not supported"),
        "{message}"
    );

    let (_, field, message, _) = invalid("apiVersion: cilium.io/v2\nmetadata: {name: x}\n");
    assert_eq!((field.as_str(), message.as_str()), ("kind", "missing"));

    let (policy, field, message, _) = invalid("- a\n- b\n");
    assert_eq!((policy, field.as_str()), (None, ""));
    assert!(message.contains("found a list"), "{message}");
}

#[test]
fn unsupported_fields_name_file_policy_field_and_line() {
    let text = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: with-deny
  namespace: team
spec:
  endpointSelector: {}
  egressDeny:
  - toEntities: [world]
";
    let (policy, field, message, line) = invalid(text);
    assert_eq!(policy.as_deref(), Some("with-deny"));
    assert_eq!(field, "spec.egressDeny");
    assert!(message.contains("not supported by Warden"), "{message}");
    assert_eq!(line, Some(9), "the line of the value");

    let error = parse(text).unwrap_err().to_string();
    assert_eq!(
        error,
        "policies/test.yaml:9:3: policy \"with-deny\": spec.egressDeny: \
         this Cilium field is not supported by Warden"
    );
}

#[test]
fn every_unsupported_feature_is_refused_at_its_path() {
    let cases = [
        ("  egressDeny: [{}]\n", "spec.egressDeny"),
        ("  nodeSelector: {}\n", "spec.nodeSelector"),
        (
            "  enableDefaultDeny: {egress: false}\n",
            "spec.enableDefaultDeny",
        ),
        (
            "  egress: [{toServices: [{k8sService: {serviceName: a}}]}]\n",
            "spec.egress[0].toServices",
        ),
        (
            "  egress: [{toGroups: [{aws: {}}]}]\n",
            "spec.egress[0].toGroups",
        ),
        (
            "  egress: [{toRequires: [{}]}]\n",
            "spec.egress[0].toRequires",
        ),
        ("  egress: [{toNodes: [{}]}]\n", "spec.egress[0].toNodes"),
        (
            "  egress: [{icmps: [{fields: [{type: 8}]}]}]\n",
            "spec.egress[0].icmps",
        ),
        (
            "  egress: [{authentication: {mode: required}}]\n",
            "spec.egress[0].authentication",
        ),
        (
            "  egress: [{toPorts: [{ports: [{port: '80'}], rules: {http: [{method: GET}]}}]}]\n",
            "spec.egress[0].toPorts[0].rules.http",
        ),
        (
            "  egress: [{toPorts: [{ports: [{port: '9092'}], rules: {kafka: [{}]}}]}]\n",
            "spec.egress[0].toPorts[0].rules.kafka",
        ),
        (
            "  egress: [{toCIDRSet: [{cidrGroupRef: office}]}]\n",
            "spec.egress[0].toCIDRSet[0].cidrGroupRef",
        ),
    ];
    for (spec_line, expected_field) in cases {
        let text = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\n\
             spec:\n  endpointSelector: {{}}\n{spec_line}"
        );
        let (policy, field, message, line) = invalid(&text);
        assert_eq!(policy.as_deref(), Some("p"));
        assert_eq!(field, expected_field);
        assert!(
            message.contains("not supported by Warden"),
            "{field}: {message}"
        );
        assert_eq!(line, Some(6), "{field}");
    }
}

/// A policy `p` whose egress section is `egress` (lines indented by two).
fn with_egress(egress: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\n\
         spec:\n  endpointSelector: {{}}\n  egress:\n{egress}"
    )
}

#[test]
fn validation_errors_point_at_the_field() {
    let cases = [
        (
            "  - toPorts:\n    - ports:\n      - port: '53'\n        protocol: SCTP\n",
            "spec.egress[0].toPorts[0].ports[0].protocol",
            "not supported",
            Some(10),
        ),
        (
            "  - toPorts:\n    - ports:\n      - port: '99999'\n",
            "spec.egress[0].toPorts[0].ports[0].port",
            "out of range",
            Some(9),
        ),
        (
            "  - toFQDNs:\n    - matchPattern: 'cilium.io/x'\n",
            "spec.egress[0].toFQDNs[0]",
            "not allowed",
            Some(8),
        ),
        (
            "  - toFQDNs:\n    - {matchName: a.io, matchPattern: '*.a.io'}\n",
            "spec.egress[0].toFQDNs[0]",
            "only one of matchName and matchPattern",
            Some(8),
        ),
        (
            "  - toEntities: [kube-apiserver]\n",
            "spec.egress[0].toEntities[0]",
            "unknown variant `kube-apiserver`",
            Some(7),
        ),
        (
            "  - toCIDR: [10.0.0.0/33]\n",
            "spec.egress[0].toCIDR[0]",
            "not a CIDR",
            Some(7),
        ),
        (
            "  - toEndpoints:\n    - matchExpressions: [{key: app, operator: Gt, values: ['1']}]\n",
            "spec.egress[0].toEndpoints[0].matchExpressions[0].operator",
            "unknown variant `Gt`",
            None,
        ),
        (
            "  - toPortz: []\n",
            "spec.egress[0].toPortz",
            "unknown field `toPortz`",
            Some(7),
        ),
    ];
    for (egress, expected_field, expected_message, expected_line) in cases {
        let (policy, field, message, line) = invalid(&with_egress(egress));
        assert_eq!(policy.as_deref(), Some("p"));
        assert_eq!(field, expected_field, "{message}");
        assert!(message.contains(expected_message), "{field}: {message}");
        if expected_line.is_some() {
            assert_eq!(line, expected_line, "{field}");
        }
    }

    let (_, field, message, _) = invalid(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {egress: []}\n",
    );
    assert_eq!(field, "spec");
    assert!(
        message.contains("missing field `endpointSelector`"),
        "{message}"
    );
}

/// A syntax error that says aliases are not supported, and its text.
fn refused_for_its_aliases(text: &str) -> String {
    let error = parse(text).expect_err("a policy with aliases loaded");
    assert!(matches!(error, PolicyError::Syntax { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("aliases (*name) are not supported"),
        "{message}"
    );
    message
}

/// 2,000 aliases of a 2,000-element sequence: 4 million nodes from 16 kB, which were built as
/// a `Value` before any check (quadratic in the file's size: a 250 kB file took the agent's
/// memory on every start).
#[test]
fn a_document_whose_aliases_expand_past_the_budget_is_refused() {
    let anchored = vec!["0"; 2_000].join(",");
    let aliases = vec!["*a"; 2_000].join(",");
    let text = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\
         metadata: {{name: x, labels: {{a: &a [{anchored}], b: [{aliases}]}}}}\n"
    );
    refused_for_its_aliases(&text);
    // Aliases are refused at any size, with where; an anchor alone still loads.
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: anchored}\n\
                spec:\n  endpointSelector: {}\n  egress:\n  - toPorts: &dns\n    - ports:\n      \
                - port: '53'\n  - toPorts: *dns\n";
    let message = refused_for_its_aliases(text);
    assert!(message.starts_with("policies/test.yaml:10:"), "{message}");
    let text = text.replace("  - toPorts: *dns\n", "");
    assert_eq!(parse(&text).unwrap().len(), 1);
}

/// A long number repeated by aliases: yaml_serde reads it as a small float for any counting
/// visitor, but the typed model asks for strings and got all of its text per alias.
#[test]
fn a_long_number_repeated_by_aliases_is_refused() {
    let number = format!("0.{}1", "0".repeat(10_000));
    let aliases = vec!["*n"; 2_000].join(", ");
    let text = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: x}}\n\
         spec:\n  endpointSelector:\n    matchExpressions:\n    - key: a\n      \
         operator: In\n      values: [&n {number}, {aliases}]\n"
    );
    refused_for_its_aliases(&text);
}

#[test]
fn broken_yaml_reports_the_line() {
    let text =
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: x\n   bad: [\n";
    let error = parse(text).unwrap_err();
    let PolicyError::Syntax { location, .. } = &error else {
        panic!("expected a syntax error, got {error:?}");
    };
    assert!(location.is_some_and(|at| at.line >= 4), "{location:?}");
    assert!(
        error.to_string().starts_with("policies/test.yaml:"),
        "{error}"
    );
    // A broken second document still fails the file.
    let text = format!("{MINIMAL}---\nkey: [unclosed\n");
    assert!(matches!(parse(&text), Err(PolicyError::Syntax { .. })));
}

#[test]
fn json_is_yaml() {
    let json = r#"{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "j", "namespace": "ns"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "x"}},
                 "egress": [{"toFQDNs": [{"matchName": "cilium.io"}]}]}}"#;
    let policy = &parse(json).unwrap()[0];
    assert_eq!(policy.namespace.as_deref(), Some("ns"));
}

#[test]
fn directories_load_sorted_policy_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
    write("b.yaml", &MINIMAL.replace("minimal", "b"));
    write("a.yml", &MINIMAL.replace("minimal", "a"));
    write("c.json", &MINIMAL.replace("minimal", "c"));
    write("notes.txt", "not a policy");
    write(".hidden.yaml", "garbage: [");
    fs::create_dir(dir.path().join("nested")).unwrap();
    fs::write(dir.path().join("nested/d.yaml"), "garbage: [").unwrap();

    let names: Vec<String> = load_path(dir.path())
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["a", "b", "c"]);

    // A policy file's name on a folder is an error, as the agent takes it, not a file less.
    fs::create_dir(dir.path().join("e.yaml")).unwrap();
    let error = load_path(dir.path()).unwrap_err();
    assert!(error.to_string().contains("e.yaml"), "{error}");

    let single = load_path(&dir.path().join("b.yaml")).unwrap();
    assert_eq!(single[0].origin, dir.path().join("b.yaml"));

    let empty = tempfile::tempdir().unwrap();
    assert!(load_path(empty.path()).unwrap().is_empty());
}

/// An old copy of a policy left beside its new version: both were enforced, as their union.
#[test]
fn a_policy_name_declared_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
    write("web.yaml", &MINIMAL.replace("minimal", "web"));
    // Another namespace, or the clusterwide kind, is another object.
    write(
        "web-prod.yaml",
        &MINIMAL.replace("name: minimal", "name: web\n  namespace: prod"),
    );
    write(
        "web-cluster.yaml",
        &MINIMAL.replace("minimal", "web").replace(
            "kind: CiliumNetworkPolicy",
            "kind: CiliumClusterwideNetworkPolicy",
        ),
    );
    assert_eq!(load_path(dir.path()).unwrap().len(), 3);

    write("web-v2.yaml", &MINIMAL.replace("minimal", "web"));
    let error = load_path(dir.path()).unwrap_err();
    assert!(matches!(error, PolicyError::Duplicate { .. }), "{error:?}");
    let said = error.to_string();
    assert!(
        said.contains("web-v2.yaml") && said.contains("web.yaml") && said.contains("default/web"),
        "{said}"
    );
    let errors = load_paths(&[dir.path().to_path_buf()]).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|error| matches!(error, PolicyError::Duplicate { .. })),
        "{errors:?}"
    );
}

/// `warden policy validate` says what the agent would refuse: files too large together for
/// the snapshot every dnsproxy gets.
#[test]
fn validate_refuses_a_folder_too_large_for_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("web.yaml"), MINIMAL).unwrap();
    let padding = format!("# {}\n", "x".repeat(1 << 20)).repeat(7);
    fs::write(dir.path().join("a.yaml"), &padding).unwrap();
    assert!(load_paths(&[dir.path().to_path_buf()]).is_ok());
    fs::write(dir.path().join("b.yaml"), &padding).unwrap();
    let errors = load_paths(&[dir.path().to_path_buf()]).unwrap_err();
    assert!(
        matches!(errors[..], [PolicyError::FolderTooLarge { .. }]),
        "{errors:?}"
    );
}

#[test]
fn missing_paths_are_io_errors() {
    let error = load_path(Path::new("/nonexistent/policies")).unwrap_err();
    assert!(matches!(error, PolicyError::Io { .. }), "{error:?}");
    assert!(
        error.to_string().starts_with("/nonexistent/policies: "),
        "{error}"
    );
}

#[test]
fn load_paths_reports_every_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    let bad_kind = dir.path().join("kind.yaml");
    let bad_field = dir.path().join("field.yaml");
    fs::write(&good, MINIMAL).unwrap();
    fs::write(&bad_kind, "apiVersion: v1\nkind: Secret\n").unwrap();
    fs::write(&bad_field, MINIMAL.replace("egress:", "egressDeny:")).unwrap();

    let paths: Vec<PathBuf> = vec![
        good.clone(),
        bad_kind.clone(),
        PathBuf::from("/nonexistent.yaml"),
        bad_field.clone(),
    ];
    let errors = load_paths(&paths).unwrap_err();
    assert_eq!(errors.len(), 3);
    assert!(matches!(&errors[0], PolicyError::UnsupportedKind { file, .. } if *file == bad_kind));
    assert!(matches!(&errors[1], PolicyError::Io { .. }));
    assert!(
        matches!(&errors[2], PolicyError::Invalid(error) if error.file == bad_field && error.field == "spec.egressDeny")
    );

    // The directory form finds the same two broken files.
    let errors = load_paths(&[dir.path().to_owned()]).unwrap_err();
    assert_eq!(errors.len(), 2);

    assert_eq!(load_paths(&[good]).unwrap().len(), 1);
}

/// A link that loops was left out like a dangling one, its policy silently gone: it is read,
/// and the read names it.
#[test]
fn a_policy_name_that_cannot_be_looked_at_is_an_error_not_an_absence() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("good.yaml"), MINIMAL).unwrap();
    let looping = dir.path().join("loop.yaml");
    std::os::unix::fs::symlink(&looping, &looping).unwrap();
    let errors = load_paths(&[dir.path().to_owned()]).unwrap_err();
    assert!(
        matches!(&errors[..], [PolicyError::Io { path, .. }] if *path == looping),
        "{errors:?}"
    );
    // A dangling link is a removal under way: left out.
    fs::remove_file(&looping).unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone.yaml"), &looping).unwrap();
    assert_eq!(load_paths(&[dir.path().to_owned()]).unwrap().len(), 1);
}

/// Loaded as earlier releases did (the agent must not lose its policy at an upgrade), and
/// refused by `warden policy validate`.
#[test]
fn what_is_not_enforced_as_written_loads_and_fails_validation() {
    let dir = tempfile::tempdir().unwrap();
    for (name, egress, expected) in [
        (
            "dns.yaml",
            "  - toFQDNs: [{matchName: a.io}]\n    toPorts:\n    - ports: [{port: '53'}]\n      rules: {dns: [{matchName: a.io}]}\n",
            "spec.egress[0].toPorts[0].rules.dns: DNS rules cannot be part of a toFQDNs rule",
        ),
        (
            "reserved.yaml",
            "  - toEndpoints: [{matchLabels: {'reserved:host': ''}}]\n",
            "spec.egress[0].toEndpoints[0]: \"reserved:host\": reserved labels",
        ),
        // Warden polices egress only: a policy with an ingress section (many of Cilium's
        // examples have one) refused the whole folder, leaving a fresh node unenforced.
        (
            "ingress.yaml",
            "  - toPorts: [{ports: [{port: '53'}]}]\n  ingress:\n  - fromEntities: [world]\n",
            "spec.ingress: Warden enforces egress only",
        ),
    ] {
        let file = dir.path().join(name);
        fs::write(&file, with_egress(egress)).unwrap();
        let loaded = parse(&with_egress(egress)).unwrap();
        assert!(
            loaded[0].refused_by_validate[0].contains(expected),
            "{loaded:?}"
        );
        assert_eq!(loaded[0].rules[0].egress.len(), 1, "the egress part holds");
        let errors = load_paths(std::slice::from_ref(&file)).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let message = errors[0].to_string();
        assert!(
            matches!(&errors[0], PolicyError::NotEnforcedAsWritten { file: f, .. } if *f == file)
                && message.contains("policy default/p")
                && message.contains(expected),
            "{message}"
        );
    }
}

#[test]
fn load_paths_reports_every_broken_document_of_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("three.yaml");
    let broken = MINIMAL.replace("egress:", "egressDeny:");
    fs::write(&file, format!("{broken}\n---\n{MINIMAL}\n---\n{broken}")).unwrap();
    let errors = load_paths(std::slice::from_ref(&file)).unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|error| matches!(error, PolicyError::Invalid(e) if e.file == file)),
        "{errors:?}"
    );
    // The agent's path still stops at the first.
    assert!(parse_str(&fs::read_to_string(&file).unwrap(), &file).is_err());
}

/// A small deterministic generator, so the garbage below is the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn garbage_never_panics() {
    let seed = include_str!("fixtures/cilium-dns/dns.yaml");
    let alphabet: Vec<char> = " \n\t:-[]{}'\"*&!|>%@#?,.0123456789abcXYZ\u{0}\u{feff}é"
        .chars()
        .collect();
    let mut rng = XorShift(0x5eed_1234_abcd_ef01);
    for _ in 0..3000 {
        let mut text: Vec<char> = seed.chars().collect();
        for _ in 0..=rng.below(8) {
            let at = rng.below(text.len() + 1);
            match rng.below(3) {
                0 if at < text.len() => {
                    text.remove(at);
                }
                1 if at < text.len() => text[at] = alphabet[rng.below(alphabet.len())],
                _ => text.insert(at, alphabet[rng.below(alphabet.len())]),
            }
        }
        let text: String = text.into_iter().collect();
        if let Err(error) = parse(&text) {
            assert!(!error.to_string().is_empty());
        }
    }
    for _ in 0..2000 {
        let len = rng.below(200);
        let text: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        let _ = parse(&text);
    }
    // Deep nesting and alias bombs are refused, not followed.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(parse(&deep).is_err());
    let bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n\
                g: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
    assert!(parse(bomb).is_err());
}

#[test]
fn policies_round_trip_through_serde() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut policies = load_path(&dir.join("cilium-dns")).unwrap();
    policies.extend(load_path(&dir.join("talk.yaml")).unwrap());
    let json = serde_json::to_string(&policies).unwrap();
    let back: Vec<warden_policy::Policy> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, policies);
}

#[test]
fn a_manifest_exported_from_a_cluster_loads() {
    // `kubectl get cnp -o yaml` adds server-side metadata and a status written by Cilium.
    let text = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: exported
  namespace: youssef
  uid: 3f0c2c9e-5a55-4a57-9b51-6a3c6d2e1f00
  resourceVersion: \"48213\"
  generation: 2
  creationTimestamp: \"2026-11-01T10:00:00Z\"
  managedFields: [{manager: kubectl, operation: Update}]
spec:
  endpointSelector: {matchLabels: {app: test}}
status:
  conditions: [{type: Valid, status: \"True\"}]
";
    let policy = &parse(text).unwrap()[0];
    assert_eq!(policy.name, "exported");
    assert_eq!(policy.namespace.as_deref(), Some("youssef"));
}

#[test]
fn a_list_exported_from_a_cluster_loads_every_item() {
    // `kubectl get cnp,ccnp -A -o yaml` writes one `List` document holding every object.
    let list = "apiVersion: v1
kind: List
metadata: {resourceVersion: \"\"}
items:
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: web, namespace: shop, uid: 3f0c2c9e-5a55-4a57-9b51-6a3c6d2e1f00}
  spec:
    endpointSelector: {matchLabels: {app: web}}
  status: {conditions: []}
- apiVersion: cilium.io/v2
  kind: CiliumClusterwideNetworkPolicy
  metadata: {name: all}
  spec:
    endpointSelector: {}
";
    let policies = parse(list).unwrap();
    let names: Vec<(&str, Option<&str>)> = policies
        .iter()
        .map(|policy| (policy.name.as_str(), policy.namespace.as_deref()))
        .collect();
    assert_eq!(names, [("web", Some("shop")), ("all", None)]);
    // The API server's own list of one kind, beside a policy of the stream's.
    let typed = format!(
        "{MINIMAL}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicyList\nitems: []\n"
    );
    assert_eq!(parse(&typed).unwrap().len(), 1);
    // A bad item names its place and its policy; a list of something else is not one.
    let bad = list.replace("{app: web}}\n", "{app: web}}\n    bogus: 1\n");
    let error = parse(&bad).unwrap_err().to_string();
    assert!(
        error.contains("policy \"web\": items[0].spec.bogus"),
        "{error}"
    );
    let stranger = list.replace("kind: CiliumClusterwideNetworkPolicy", "kind: ConfigMap");
    let error = parse(&stranger).unwrap_err().to_string();
    assert!(
        error.contains("items[1].kind: \"ConfigMap\" is not a policy"),
        "{error}"
    );
    let not_items = "apiVersion: v1\nkind: List\nitems: {a: 1}\n";
    let error = parse(not_items).unwrap_err().to_string();
    assert!(
        error.contains("items: expected a list, found a mapping"),
        "{error}"
    );
    // Plain scalars read as strings, as in a document of their own.
    let numbers = list.replace("{app: web}}", "{app: web, version: 2, canary: true}}");
    let policies = parse(&numbers).unwrap();
    assert_eq!(policies.len(), 2);
    let other_list = "apiVersion: v1\nkind: ConfigMapList\nitems: []\n";
    assert!(matches!(
        parse(other_list),
        Err(PolicyError::UnsupportedKind { .. })
    ));
}
