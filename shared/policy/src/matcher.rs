//! An index over many `matchName`/`matchPattern` selectors that answers "which selectors match
//! this name?" without trying them one by one.
//!
//! Selectors fall into three groups, each stored where a lookup finds it directly:
//!
//! - **Literal names**: every `matchName`, and every `matchPattern` without a star, sit in a hash
//!   map keyed by the canonical name. One probe.
//! - **Match-all patterns** (`*`, `**`, `*.`, ...) sit in a plain list that every lookup returns.
//! - **Wildcard patterns** sit in a trie of labels read from the right, the way DNS delegates:
//!   `*.api.cilium.io` is stored along the path `io` → `cilium` → `api` → `*`. A node has
//!   - *literal edges*, a hash map from an exact label to the child node;
//!   - *glob edges*, a short list of `(label-with-stars, child)` pairs (`*`, `sub*`, `a*b`),
//!     each tried against the name's label at that node only;
//!   - the selectors that *end* at the node (all labels consumed);
//!   - the selectors that began with `**.` and whose remaining labels end at the node: they
//!     match when one or more further labels, made only of wildcard characters, remain.
//!
//! A lookup splits the name into labels from the right and walks the trie: at each node it takes
//! the literal edge for the current label (one hash probe) and every glob edge whose glob matches
//! it, collects the `**.` selectors of the node when labels remain, and at the last label the
//! selectors ending there. The work is about *labels × glob edges on the visited nodes*: it does
//! not grow with the number of selectors under unrelated domains, so 10,000 selectors for 10,000
//! domains cost a lookup no more than ten do. Only many distinct globs under one common suffix
//! (say 1,000 patterns `x*.example.com`) make a node's glob list long, and then only lookups
//! under that suffix pay for it.
//!
//! Each inserted selector is reported at most once per lookup, in no particular order.

use std::collections::HashMap;

/// The matcher's maps are built from policy and only looked up per query: a fast hash of the
/// query's labels, not SipHash's resistance to chosen keys, which the policy's names are not.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use crate::name::DnsName;
use crate::pattern::{FqdnSelector, Glob, LabelPattern, PatternForm, covers_subdomains};

/// A set of DNS selectors, each carrying a value of type `T`, indexed for fast lookup.
#[derive(Clone, Debug)]
pub struct NameMatcher<T> {
    values: Vec<T>,
    exact: FastMap<DnsName, Vec<usize>>,
    match_all: Vec<usize>,
    root: Node,
}

#[derive(Clone, Debug, Default)]
struct Node {
    literal: FastMap<Box<str>, Node>,
    globs: Vec<(Glob, Node)>,
    ends: Vec<usize>,
    subdomains: Vec<usize>,
}

impl<T> Default for NameMatcher<T> {
    fn default() -> Self {
        NameMatcher {
            values: Vec::new(),
            exact: FastMap::default(),
            match_all: Vec::new(),
            root: Node::default(),
        }
    }
}

impl<T> NameMatcher<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a selector. Adding the same selector twice keeps both values.
    pub fn insert(&mut self, selector: &FqdnSelector, value: T) {
        let index = self.values.len();
        self.values.push(value);
        let pattern = match selector {
            FqdnSelector::MatchName(name) => {
                self.exact.entry(name.clone()).or_default().push(index);
                return;
            }
            FqdnSelector::MatchPattern(pattern) => pattern,
        };
        match pattern.form() {
            PatternForm::All => self.match_all.push(index),
            PatternForm::Literal(name) => self.exact.entry(name.clone()).or_default().push(index),
            PatternForm::Wildcard(wildcard) => {
                let mut node = &mut self.root;
                for label in &wildcard.labels {
                    node = node.child(label);
                }
                if wildcard.subdomains {
                    node.subdomains.push(index);
                } else {
                    node.ends.push(index);
                }
            }
        }
    }

    /// Number of selectors inserted.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Whether any selector matches `name`; stops at the first.
    pub fn is_match(&self, name: &DnsName) -> bool {
        self.visit(name, &mut |_| true)
    }

    /// Appends the value of every selector that matches `name` to `out`.
    pub fn matches_into<'a>(&'a self, name: &DnsName, out: &mut Vec<&'a T>) {
        self.for_each_match(name, |value| out.push(value));
    }

    /// Calls `found` with the value of every selector that matches `name`: what
    /// [`Self::matches_into`] collects, without a list (the proxy asks once per answer).
    pub fn for_each_match<'a>(&'a self, name: &DnsName, mut found: impl FnMut(&'a T)) {
        self.visit(name, &mut |index| {
            if let Some(value) = self.values.get(index) {
                found(value);
            }
            false
        });
    }

    /// The values of every selector that matches `name`.
    pub fn matches(&self, name: &DnsName) -> impl Iterator<Item = &T> {
        let mut out = Vec::new();
        self.matches_into(name, &mut out);
        out.into_iter()
    }

    /// Calls `found` with the index of each matching selector until it returns true; returns
    /// whether it did.
    fn visit(&self, name: &DnsName, found: &mut dyn FnMut(usize) -> bool) -> bool {
        if let Some(indices) = self.exact.get(name)
            && indices.iter().any(|&index| found(index))
        {
            return true;
        }
        if self.match_all.iter().any(|&index| found(index)) {
            return true;
        }
        self.root.walk(name.labels_rev(), found)
    }
}

impl Node {
    fn child(&mut self, label: &LabelPattern) -> &mut Node {
        match label {
            LabelPattern::Literal(text) => self.literal.entry(text.as_str().into()).or_default(),
            LabelPattern::Glob(glob) => {
                let at = match self.globs.iter().position(|(known, _)| known == glob) {
                    Some(at) => at,
                    None => {
                        self.globs.push((glob.clone(), Node::default()));
                        self.globs.len() - 1
                    }
                };
                &mut self.globs[at].1
            }
        }
    }

    /// `rest` holds the labels not consumed yet, rightmost first.
    fn walk<'a, I>(&self, rest: I, found: &mut dyn FnMut(usize) -> bool) -> bool
    where
        I: Iterator<Item = &'a str> + Clone,
    {
        let mut after = rest.clone();
        let Some(label) = after.next() else {
            return self.ends.iter().any(|&index| found(index));
        };
        if !self.subdomains.is_empty()
            && covers_subdomains(rest)
            && self.subdomains.iter().any(|&index| found(index))
        {
            return true;
        }
        if let Some(child) = self.literal.get(label)
            && child.walk(after.clone(), found)
        {
            return true;
        }
        self.globs
            .iter()
            .any(|(glob, child)| glob.matches(label) && child.walk(after.clone(), found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::NamePattern;

    fn name(text: &str) -> DnsName {
        DnsName::new(text).unwrap()
    }

    fn pattern(text: &str) -> FqdnSelector {
        FqdnSelector::pattern(text).unwrap()
    }

    fn matched(matcher: &NameMatcher<&'static str>, text: &str) -> Vec<&'static str> {
        let mut found: Vec<_> = matcher.matches(&name(text)).copied().collect();
        found.sort_unstable();
        found
    }

    #[test]
    fn each_kind_of_selector_is_found() {
        let mut matcher = NameMatcher::new();
        matcher.insert(&FqdnSelector::name("cilium.io").unwrap(), "name");
        matcher.insert(&pattern("*.cilium.io"), "star");
        matcher.insert(&pattern("**.cilium.io"), "subdomains");
        matcher.insert(&pattern("sub*.cilium.io"), "sub-glob");
        matcher.insert(&pattern("*.*.cilium.io"), "two-stars");
        matcher.insert(&pattern("api.cilium.io"), "literal-pattern");

        assert_eq!(matched(&matcher, "CILIUM.IO."), ["name"]);
        assert_eq!(matched(&matcher, "www.cilium.io"), ["star", "subdomains"]);
        assert_eq!(
            matched(&matcher, "subdomain.cilium.io"),
            ["star", "sub-glob", "subdomains"]
        );
        assert_eq!(
            matched(&matcher, "api.cilium.io"),
            ["literal-pattern", "star", "subdomains"]
        );
        assert_eq!(
            matched(&matcher, "a.b.cilium.io"),
            ["subdomains", "two-stars"]
        );
        assert_eq!(matched(&matcher, "a.b.c.cilium.io"), ["subdomains"]);
        assert!(matched(&matcher, "cilium.com").is_empty());
        assert!(matched(&matcher, "io").is_empty());
        assert!(!matcher.is_match(&name(".")));
        assert_eq!(matcher.len(), 6);
    }

    #[test]
    fn match_all_covers_every_name() {
        let mut matcher = NameMatcher::new();
        matcher.insert(&pattern("*"), "all");
        matcher.insert(&pattern("*.io"), "io");
        assert_eq!(matched(&matcher, "_foobar._tcp.cilium.io"), ["all"]);
        assert_eq!(matched(&matcher, "cilium.io"), ["all", "io"]);
        assert_eq!(matched(&matcher, "."), ["all"]);
    }

    #[test]
    fn duplicate_selectors_keep_both_values() {
        let mut matcher = NameMatcher::new();
        matcher.insert(&pattern("*.io"), "a");
        matcher.insert(&pattern("*.IO."), "b");
        matcher.insert(&FqdnSelector::name("x.io").unwrap(), "c");
        matcher.insert(&FqdnSelector::name("x.io").unwrap(), "d");
        assert_eq!(matched(&matcher, "x.io"), ["a", "b", "c", "d"]);
    }

    #[test]
    fn empty_matcher_matches_nothing() {
        let matcher: NameMatcher<()> = NameMatcher::new();
        assert!(matcher.is_empty());
        assert!(!matcher.is_match(&name("cilium.io")));
    }

    #[test]
    fn agrees_with_matching_each_pattern_alone() {
        let patterns = [
            "*",
            "cilium.io",
            "*.cilium.io",
            "**.cilium.io",
            "sub*.cilium.io",
            "*.*.cilium.io",
            "a**b.io",
            "*cilium.io",
            "*.ci*.io",
            "x.**.io",
            "**.*.io",
            "*-*.io",
            "_*._tcp.*.io",
            "**.a.b.c.io",
            "a*.b*.io",
        ];
        let names = [
            ".",
            "io",
            "cilium.io",
            "www.cilium.io",
            "sub.cilium.io",
            "subx.cilium.io",
            "a.b.cilium.io",
            "a.b.c.cilium.io",
            "ab.io",
            "axb.io",
            "a.b.io",
            "subcilium.io",
            "x.y.io",
            "x.y.z.io",
            "a-b.io",
            "_sip._tcp.example.io",
            "q.a.b.c.io",
            "a.b.c.io",
            "a1.b2.io",
            "a*b.io",
        ];
        let mut matcher = NameMatcher::new();
        for text in patterns {
            matcher.insert(&pattern(text), text);
        }
        for text in names {
            let mut expected: Vec<&str> = patterns
                .iter()
                .copied()
                .filter(|p| NamePattern::new(p).unwrap().matches(&name(text)))
                .collect();
            expected.sort_unstable();
            assert_eq!(matched(&matcher, text), expected, "for {text}");
        }
    }

    #[test]
    fn agrees_with_matching_each_pattern_alone_at_random() {
        let label_patterns = ["a", "b", "ab", "*", "a*", "*b", "a*b", "**", "-"];
        let labels = ["a", "b", "ab", "ba", "aab", "a-b", "_"];
        // A fixed xorshift sequence, so failures reproduce.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below as u64) as usize
        };
        let mut patterns = Vec::new();
        for _ in 0..300 {
            let mut pattern: Vec<&str> = (0..=next(3)).map(|_| label_patterns[next(9)]).collect();
            if next(4) == 0 {
                pattern.insert(0, "**");
            }
            patterns.push(NamePattern::new(&pattern.join(".")).unwrap());
        }
        let mut matcher = NameMatcher::new();
        for (index, pattern) in patterns.iter().enumerate() {
            matcher.insert(&FqdnSelector::MatchPattern(pattern.clone()), index);
        }
        for _ in 0..500 {
            let name: Vec<&str> = (0..=next(4)).map(|_| labels[next(7)]).collect();
            let name = DnsName::new(&name.join(".")).unwrap();
            let mut found: Vec<usize> = matcher.matches(&name).copied().collect();
            found.sort_unstable();
            let expected: Vec<usize> = (0..patterns.len())
                .filter(|&index| patterns[index].matches(&name))
                .collect();
            assert_eq!(found, expected, "for {name}");
            assert_eq!(matcher.is_match(&name), !expected.is_empty(), "for {name}");
        }
    }

    #[test]
    fn ten_thousand_selectors_under_distinct_domains() {
        let mut matcher = NameMatcher::new();
        for i in 0..10_000u32 {
            let selector = match i % 4 {
                0 => FqdnSelector::name(&format!("host.d{i}.com")).unwrap(),
                1 => pattern(&format!("*.d{i}.com")),
                2 => pattern(&format!("**.d{i}.net")),
                _ => pattern(&format!("api-*.d{i}.org")),
            };
            matcher.insert(&selector, i);
        }
        let lookup = |text: &str| -> Vec<u32> {
            let mut found: Vec<u32> = matcher.matches(&name(text)).copied().collect();
            found.sort_unstable();
            found
        };
        assert_eq!(lookup("host.d4000.com"), [4000]);
        assert_eq!(lookup("www.d4001.com"), [4001]);
        assert_eq!(lookup("a.b.c.d4002.net"), [4002]);
        assert_eq!(lookup("api-v2.d4003.org"), [4003]);
        assert!(lookup("host.d4001.com.evil").is_empty());
        assert!(lookup("d4002.net").is_empty());
        assert!(lookup("www.d4003.org").is_empty());
        assert!(lookup("www.d10001.com").is_empty());
        // Selectors of other domains are never visited: the root has one literal edge per TLD
        // and no globs.
        assert!(matcher.root.globs.is_empty());
        assert_eq!(matcher.root.literal.len(), 3);
    }
}
