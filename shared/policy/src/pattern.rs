use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PolicyError;
use crate::name::{DnsName, check_body};

/// Cilium's `MaxFQDNLength`: the longest `matchName` or `matchPattern` it accepts.
const MAX_SELECTOR_LEN: usize = 255;

/// What a `*` may stand for: Cilium's `[-a-zA-Z0-9_]` (names are lowercase by the time they are
/// matched, so the upper-case half of the class never comes up).
pub(crate) fn is_wildcard_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

/// A label that a wildcard (`*` or a leading `**.`) may cover entirely.
pub(crate) fn is_wildcard_label(label: &str) -> bool {
    !label.is_empty() && label.bytes().all(is_wildcard_char)
}

/// A Cilium `matchPattern`.
///
/// - `*` matches zero or more characters of `[-a-zA-Z0-9_]` within one label, so `sub*.cilium.io`
///   matches `subdomain.cilium.io` and `sub.cilium.io` but never crosses a dot;
/// - a pattern made only of stars, with or without a trailing dot (`*`, `**`, `*.`), matches
///   every name;
/// - a leading label of two or more stars followed by a dot (`**.cilium.io`) matches one or more
///   whole labels, so `a.cilium.io` and `a.b.cilium.io` but not `cilium.io`;
/// - a run of stars anywhere else behaves like a single `*` (`a**b.io` is `a*b.io`);
/// - a pattern without a star is a literal name.
///
/// Matching is case-insensitive and the trailing dot is optional, as for names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NamePattern {
    /// Lowercased and fully qualified, as Cilium's `Sanitize` writes it; all-star patterns keep
    /// their written form.
    text: String,
    form: PatternForm,
}

/// A pattern taken apart for matching.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PatternForm {
    /// Only stars: every name.
    All,
    /// No star at all.
    Literal(DnsName),
    Wildcard(WildcardPattern),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WildcardPattern {
    /// One pattern per label, rightmost label first, the order a lookup walks a name in.
    pub(crate) labels: Vec<LabelPattern>,
    /// The pattern began with `**.`: one or more whole labels precede `labels`.
    pub(crate) subdomains: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LabelPattern {
    Literal(String),
    Glob(Glob),
}

/// One label with stars in it, split at the stars.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Glob {
    prefix: String,
    middles: Vec<String>,
    suffix: String,
}

impl NamePattern {
    pub fn new(pattern: &str) -> Result<NamePattern, PolicyError> {
        let invalid = |reason: String| PolicyError::InvalidPattern {
            pattern: pattern.to_owned(),
            reason,
        };
        if pattern.is_empty() {
            return Err(invalid("empty pattern".into()));
        }
        if pattern.len() > MAX_SELECTOR_LEN {
            return Err(invalid(format!(
                "longer than {MAX_SELECTOR_LEN} characters"
            )));
        }
        if let Some(c) = pattern
            .chars()
            .find(|&c| !(c.is_ascii() && (is_wildcard_char(c as u8) || c == '.' || c == '*')))
        {
            return Err(invalid(format!(
                "character {c:?} is not allowed (only letters, digits, '-', '_', '.' and '*')"
            )));
        }
        let lower = pattern.to_ascii_lowercase();
        if lower == "." {
            return Ok(NamePattern {
                form: PatternForm::Literal(DnsName::new(".")?),
                text: lower,
            });
        }
        let body = lower.strip_suffix('.').unwrap_or(&lower);
        if !body.is_empty() && body.bytes().all(|b| b == b'*') {
            return Ok(NamePattern {
                form: PatternForm::All,
                text: lower,
            });
        }
        if !body.contains('*') {
            check_body(body).map_err(invalid)?;
            return Ok(NamePattern {
                form: PatternForm::Literal(DnsName::new(body)?),
                text: format!("{body}."),
            });
        }
        if body.split('.').any(str::is_empty) {
            return Err(invalid("empty label".into()));
        }
        let mut labels: Vec<&str> = body.split('.').collect();
        let subdomains =
            labels.len() > 1 && labels[0].len() >= 2 && labels[0].bytes().all(|b| b == b'*');
        if subdomains {
            labels.remove(0);
        }
        let labels = labels
            .into_iter()
            .rev()
            .map(|label| {
                if label.contains('*') {
                    LabelPattern::Glob(Glob::new(label))
                } else {
                    LabelPattern::Literal(label.to_owned())
                }
            })
            .collect();
        Ok(NamePattern {
            text: format!("{body}."),
            form: PatternForm::Wildcard(WildcardPattern { labels, subdomains }),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Matches one name directly. [`crate::NameMatcher`] answers the same question for many
    /// patterns at once.
    pub fn matches(&self, name: &DnsName) -> bool {
        match &self.form {
            PatternForm::All => true,
            PatternForm::Literal(literal) => literal == name,
            PatternForm::Wildcard(wildcard) => wildcard.matches(name.labels_rev()),
        }
    }

    pub(crate) fn form(&self) -> &PatternForm {
        &self.form
    }
}

impl WildcardPattern {
    fn matches<'a>(&self, mut labels: impl Iterator<Item = &'a str>) -> bool {
        for pattern in &self.labels {
            match labels.next() {
                Some(label) if pattern.matches(label) => {}
                _ => return false,
            }
        }
        if self.subdomains {
            covers_subdomains(labels)
        } else {
            labels.next().is_none()
        }
    }
}

/// Whether the labels left over are what a leading `**.` can stand for: at least one, each made
/// only of wildcard characters.
pub(crate) fn covers_subdomains<'a>(mut labels: impl Iterator<Item = &'a str>) -> bool {
    let mut any = false;
    labels.all(|label| {
        any = true;
        is_wildcard_label(label)
    }) && any
}

impl LabelPattern {
    fn matches(&self, label: &str) -> bool {
        match self {
            LabelPattern::Literal(literal) => literal == label,
            LabelPattern::Glob(glob) => glob.matches(label),
        }
    }
}

impl Glob {
    fn new(label: &str) -> Glob {
        let mut parts: Vec<String> = label
            .split('*')
            .filter(|part| !part.is_empty())
            .map(str::to_owned)
            .collect();
        // Empty parts are what runs of stars (and stars at either end) leave behind; only the
        // ends need to be remembered, as an empty prefix or suffix.
        let suffix = if label.ends_with('*') {
            String::new()
        } else {
            parts.pop().unwrap_or_default()
        };
        let prefix = if label.starts_with('*') || parts.is_empty() {
            String::new()
        } else {
            parts.remove(0)
        };
        Glob {
            prefix,
            middles: parts,
            suffix,
        }
    }

    pub(crate) fn matches(&self, label: &str) -> bool {
        // Literal parts only hold wildcard characters, so a label with any other character
        // cannot match; checking that first lets the stars match greedily without looking back.
        if !label.bytes().all(is_wildcard_char) {
            return false;
        }
        let Some(rest) = label.strip_prefix(self.prefix.as_str()) else {
            return false;
        };
        let Some(mut rest) = rest.strip_suffix(self.suffix.as_str()) else {
            return false;
        };
        for middle in &self.middles {
            match rest.find(middle.as_str()) {
                Some(at) => rest = &rest[at + middle.len()..],
                None => return false,
            }
        }
        true
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for NamePattern {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NamePattern::new(s)
    }
}

impl TryFrom<String> for NamePattern {
    type Error = PolicyError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        NamePattern::new(&value)
    }
}

impl From<NamePattern> for String {
    fn from(pattern: NamePattern) -> String {
        pattern.text
    }
}

/// One entry of `toFQDNs` or `rules.dns`: exactly one of `matchName` and `matchPattern`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawFqdnSelector")]
pub enum FqdnSelector {
    MatchName(DnsName),
    MatchPattern(NamePattern),
}

impl FqdnSelector {
    /// A `matchName`: a literal name, restricted to the characters Cilium allows there.
    pub fn name(name: &str) -> Result<FqdnSelector, PolicyError> {
        if let Some(c) = name
            .chars()
            .find(|&c| !(c.is_ascii() && (is_wildcard_char(c as u8) || c == '.')))
        {
            return Err(PolicyError::InvalidName {
                name: name.to_owned(),
                reason: format!(
                    "character {c:?} is not allowed in matchName \
                     (only letters, digits, '-', '_' and '.')"
                ),
            });
        }
        DnsName::new(name).map(FqdnSelector::MatchName)
    }

    pub fn pattern(pattern: &str) -> Result<FqdnSelector, PolicyError> {
        NamePattern::new(pattern).map(FqdnSelector::MatchPattern)
    }

    pub fn matches(&self, name: &DnsName) -> bool {
        match self {
            FqdnSelector::MatchName(literal) => literal == name,
            FqdnSelector::MatchPattern(pattern) => pattern.matches(name),
        }
    }

    /// The name or pattern in canonical form, as shown to operators.
    pub fn as_str(&self) -> &str {
        match self {
            FqdnSelector::MatchName(name) => name.as_str(),
            FqdnSelector::MatchPattern(pattern) => pattern.as_str(),
        }
    }
}

impl fmt::Display for FqdnSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFqdnSelector {
    match_name: Option<String>,
    match_pattern: Option<String>,
}

impl TryFrom<RawFqdnSelector> for FqdnSelector {
    type Error = String;

    fn try_from(raw: RawFqdnSelector) -> Result<Self, Self::Error> {
        match (raw.match_name, raw.match_pattern) {
            (Some(name), None) => FqdnSelector::name(&name).map_err(|e| e.to_string()),
            (None, Some(pattern)) => FqdnSelector::pattern(&pattern).map_err(|e| e.to_string()),
            (Some(_), Some(_)) => Err("set only one of matchName and matchPattern".into()),
            (None, None) => Err("needs matchName or matchPattern".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> DnsName {
        DnsName::new(text).unwrap()
    }

    fn check(pattern: &str, accept: &[&str], reject: &[&str]) {
        let compiled = NamePattern::new(pattern).unwrap();
        for text in accept {
            assert!(compiled.matches(&name(text)), "{pattern} rejected {text}");
        }
        for text in reject {
            assert!(!compiled.matches(&name(text)), "{pattern} accepted {text}");
        }
    }

    #[test]
    fn single_label_star() {
        check(
            "*.cilium.io",
            &["anysub.cilium.io", "ANYSUB.cilium.io.", "_x-1.cilium.io"],
            &[
                "cilium.io",
                "a.b.cilium.io",
                "anysub.ci.io",
                "cilium.io.evil.com",
            ],
        );
    }

    #[test]
    fn leading_double_star_is_one_or_more_labels() {
        check(
            "**.cilium.io",
            &[
                "a.cilium.io",
                "sub.cilium.io",
                "a.b.cilium.io",
                "x.y.z.cilium.io",
            ],
            &["cilium.io", "notcilium.io", "a.cilium.io.com"],
        );
        // More than two stars still means "whole labels", as in Cilium.
        check("***.cilium.io.", &["a.b.cilium.io"], &["cilium.io"]);
    }

    #[test]
    fn star_inside_a_label() {
        check(
            "sub*.cilium.io",
            &["sub.cilium.io", "subdomain.cilium.io"],
            &["www.cilium.io", "cilium.io", "a.sub.cilium.io"],
        );
        check(
            "*.ci*.io",
            &[
                "anysub.cilium.io",
                "anysub.ci.io",
                "anysub.ciliumandmore.io",
            ],
            &["cilium.io"],
        );
        check(
            "*cilium.io",
            &["cilium.io", "subcilium.io", "sub-cilium.io"],
            &["www.cilium.io", "blog.cilium.io"],
        );
        check(
            "special*service.api.cilium.io",
            &[
                "specialservice.api.cilium.io",
                "special-db-service.api.cilium.io",
            ],
            &[
                "special.service.api.cilium.io",
                "specialservic.api.cilium.io",
            ],
        );
        check(
            "a*b*c.io",
            &["abc.io", "axxbyyc.io", "abbc.io"],
            &["ab.io", "acb.io"],
        );
        // From Cilium's documentation.
        check(
            "part*ial.com",
            &["partial.com", "part-extra-ial.com"],
            &["part.ial.com"],
        );
    }

    #[test]
    fn double_star_elsewhere_is_a_single_star() {
        check("a**b.io", &["ab.io", "axyzb.io"], &["a.b.io", "a.x.b.io"]);
        check("x.**.io", &["x.y.io"], &["x.io", "x.y.z.io"]);
        check("**foo.io", &["foo.io", "barfoo.io"], &["bar.foo.io"]);
    }

    #[test]
    fn all_star_patterns_match_every_name() {
        for pattern in ["*", "**", "*.", "**.", "***"] {
            check(
                pattern,
                &[
                    ".",
                    "io",
                    "cilium.io",
                    "_foobar._tcp.cilium.io",
                    "a.b.c.d.e",
                ],
                &[],
            );
        }
    }

    #[test]
    fn two_single_stars() {
        check(
            "*.*.cilium.io",
            &["_foobar._tcp.cilium.io", "a.b.cilium.io"],
            &["a.cilium.io", "a.b.c.cilium.io"],
        );
    }

    #[test]
    fn stars_cover_only_name_characters() {
        // Cilium's `*` is `[-a-zA-Z0-9_]*`: names with other characters are not covered, even if
        // a client may ask for them.
        check("*.cilium.io", &[], &["a*b.cilium.io"]);
        check("**.cilium.io", &[], &["x.a*b.cilium.io"]);
    }

    #[test]
    fn literal_patterns_are_names() {
        check(
            "Cilium.IO",
            &["cilium.io", "CILIUM.IO."],
            &["www.cilium.io"],
        );
        check(".", &["."], &["io"]);
        assert_eq!(
            NamePattern::new("Cilium.IO").unwrap().as_str(),
            "cilium.io."
        );
    }

    #[test]
    fn canonical_text() {
        assert_eq!(
            NamePattern::new("*.Cilium.io").unwrap().as_str(),
            "*.cilium.io."
        );
        assert_eq!(NamePattern::new("*").unwrap().as_str(), "*");
        assert_eq!(NamePattern::new("**.").unwrap().as_str(), "**.");
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in [
            "",
            "cilium.io/x",
            "a b.io",
            "[a-z].io",
            "a+.io",
            "*..io",
            ".*.io",
            "é.io",
            &"a".repeat(256),
        ] {
            assert!(
                matches!(
                    NamePattern::new(bad),
                    Err(PolicyError::InvalidPattern { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    /// Cilium's regular expression for a pattern, evaluated by brute force: an implementation
    /// independent of `Glob` to check it against.
    fn reference(pattern: &str, name: &str) -> bool {
        fn glob(pattern: &[u8], name: &[u8]) -> bool {
            match pattern.split_first() {
                None => name.is_empty(),
                Some((b'*', rest)) => {
                    glob(rest, name)
                        || name.first().is_some_and(|&c| is_wildcard_char(c))
                            && glob(pattern, &name[1..])
                }
                Some((c, rest)) => name.first() == Some(c) && glob(rest, &name[1..]),
            }
        }
        let pattern = pattern.to_ascii_lowercase();
        let body = pattern.strip_suffix('.').unwrap_or(&pattern);
        if body.bytes().all(|b| b == b'*') {
            return true;
        }
        let pattern = format!("{body}.");
        let stars = pattern.bytes().take_while(|&b| b == b'*').count();
        if stars >= 2 && pattern.as_bytes()[stars] == b'.' {
            // `([-a-zA-Z0-9_]+[.])+` and then the rest of the pattern.
            let rest = &pattern.as_bytes()[stars + 1..];
            return (1..name.len()).any(|split| {
                let (head, tail) = name.as_bytes().split_at(split);
                head.ends_with(b".")
                    && head[..head.len() - 1].split(|&b| b == b'.').all(|label| {
                        !label.is_empty() && label.iter().all(|&b| is_wildcard_char(b))
                    })
                    && glob(rest, tail)
            });
        }
        glob(pattern.as_bytes(), name.as_bytes())
    }

    #[test]
    fn agrees_with_ciliums_regular_expression() {
        let label_patterns = [
            "a", "b", "ab", "*", "a*", "*b", "a*b", "**", "*a*", "b**a", "-",
        ];
        let labels = ["a", "b", "ab", "ba", "aab", "abb", "a-b", "_", "bab"];
        // A fixed xorshift sequence, so failures reproduce.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below as u64) as usize
        };
        let mut matched = 0;
        for _ in 0..3000 {
            let mut pattern: Vec<&str> = (0..=next(3)).map(|_| label_patterns[next(11)]).collect();
            if next(4) == 0 {
                pattern.insert(0, "**");
            }
            let pattern = pattern.join(".");
            let name: Vec<&str> = (0..=next(4)).map(|_| labels[next(9)]).collect();
            let name = DnsName::new(&name.join(".")).unwrap();
            let expected = reference(&pattern, name.as_str());
            assert_eq!(
                NamePattern::new(&pattern).unwrap().matches(&name),
                expected,
                "{pattern} on {name}"
            );
            matched += usize::from(expected);
        }
        // Both outcomes must be well represented for the comparison to mean something.
        assert!((300..2700).contains(&matched), "{matched} of 3000 matched");
    }

    #[test]
    fn match_name_is_literal() {
        let selector = FqdnSelector::name("cilium.io").unwrap();
        assert!(selector.matches(&name("CILIUM.IO.")));
        assert!(!selector.matches(&name("www.cilium.io")));
        assert!(FqdnSelector::name("*.cilium.io").is_err());
        assert!(FqdnSelector::name("a..io").is_err());
    }

    #[test]
    fn selector_serde_uses_cilium_field_names() {
        let selector: FqdnSelector = serde_json::from_str(r#"{"matchPattern":"*.IO"}"#).unwrap();
        assert_eq!(selector, FqdnSelector::pattern("*.io").unwrap());
        assert_eq!(
            serde_json::to_string(&selector).unwrap(),
            r#"{"matchPattern":"*.io."}"#
        );
        let both = serde_json::from_str::<FqdnSelector>(r#"{"matchName":"a","matchPattern":"b"}"#);
        assert!(both.unwrap_err().to_string().contains("only one"));
        let neither = serde_json::from_str::<FqdnSelector>("{}");
        assert!(neither.unwrap_err().to_string().contains("needs matchName"));
    }
}
