//! A bound on what a policy file's YAML expands to, checked before yaml_serde decodes any of
//! it. Aliases repeat the node they name, so a file of a few hundred kilobytes can stand for
//! billions of nodes or gigabytes of repeated strings (yaml_serde bounds the jumps, not what each
//! one copies), and decoding it would take the agent's memory before any check ran. Measuring
//! what aliases expand to proved brittle: yaml_serde reads `0.000…1` as a small float for a
//! counting visitor but as all of its text for the typed model, and gives a second anchor of
//! the same name the number of a later one, so an alias measured cheap decoded huge. So
//! [`check_text`] reads the file's events with a second parser and refuses aliases outright
//! (CiliumNetworkPolicies have no use for them), anything that parser cannot read (rather than
//! let a disagreement through), and a file past [`MAX_NODES`] or [`MAX_SCALAR_BYTES`] as
//! written. [`NodeBudget`] then walks what yaml_serde itself produces, against the same
//! bounds, should the two parsers ever disagree on where an alias is. A real policy file is a
//! few hundred nodes and kilobytes, the bench's 10,000 selectors some 60,000 nodes and 600 kB.

use std::fmt;

use saphyr_parser::{Event, Marker, Parser};
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

use crate::error::Location;

/// Nodes (scalars, sequences, mappings, their keys and tags) a text may expand to.
pub(crate) const MAX_NODES: usize = 1_000_000;
/// Bytes of scalars a text may expand to.
pub(crate) const MAX_SCALAR_BYTES: usize = 16 << 20;

/// What the documents of one text have expanded to so far.
#[derive(Debug, Default)]
pub(crate) struct Expanded {
    nodes: usize,
    scalar_bytes: usize,
}

/// Reads `text`'s events and fails at an alias, at text the event parser cannot read, or
/// once the file holds more than `max_nodes` nodes or `max_scalar_bytes` bytes of scalars and
/// tags; the error has where, when known, and what.
pub(crate) fn check_text(
    text: &str,
    max_nodes: usize,
    max_scalar_bytes: usize,
) -> Result<(), (Option<Location>, String)> {
    let at = |marker: &Marker| {
        Some(Location {
            line: marker.line(),
            column: marker.col() + 1,
        })
    };
    // A tag is kept with every node it marks.
    let tag_len =
        |tag: Option<&saphyr_parser::Tag>| tag.map_or(0, |tag| tag.handle.len() + tag.suffix.len());
    let (mut nodes, mut bytes) = (0usize, 0usize);
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|error| (at(error.marker()), error.info().to_owned()))?;
        let written = match &event {
            Event::Scalar(value, _, _, tag) => value.len() + tag_len(tag.as_deref()),
            Event::SequenceStart(_, tag) | Event::MappingStart(_, tag) => tag_len(tag.as_deref()),
            Event::Alias(_) => {
                return Err((
                    at(&span.start),
                    "YAML aliases (*name) are not supported in policy files: write the node out"
                        .to_owned(),
                ));
            }
            _ => continue,
        };
        nodes += 1;
        bytes = bytes.saturating_add(written);
        if nodes > max_nodes {
            return Err((
                at(&span.start),
                format!("the file holds more than {max_nodes} nodes"),
            ));
        }
        if bytes > max_scalar_bytes {
            return Err((
                at(&span.start),
                format!("the file holds more than {max_scalar_bytes} bytes of text"),
            ));
        }
    }
    Ok(())
}

/// Walks a document and fails once the text's documents together pass a limit.
pub(crate) struct NodeBudget<'a> {
    pub(crate) spent: &'a mut Expanded,
    pub(crate) max_nodes: usize,
    pub(crate) max_scalar_bytes: usize,
}

impl NodeBudget<'_> {
    fn reborrow(&mut self) -> NodeBudget<'_> {
        NodeBudget {
            spent: self.spent,
            max_nodes: self.max_nodes,
            max_scalar_bytes: self.max_scalar_bytes,
        }
    }

    /// One node of `bytes` bytes of scalar text.
    fn count<E: de::Error>(&mut self, bytes: usize) -> Result<(), E> {
        self.spent.nodes += 1;
        self.spent.scalar_bytes = self.spent.scalar_bytes.saturating_add(bytes);
        if self.spent.nodes > self.max_nodes {
            return Err(E::custom(format!(
                "the file expands to more than {} nodes (aliases repeat what they name)",
                self.max_nodes
            )));
        }
        if self.spent.scalar_bytes > self.max_scalar_bytes {
            return Err(E::custom(format!(
                "the file expands to more than {} bytes of text (aliases repeat what they name)",
                self.max_scalar_bytes
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for NodeBudget<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeBudget<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(mut self, _: bool) -> Result<(), E> {
        self.count(0)
    }

    fn visit_i64<E: de::Error>(mut self, _: i64) -> Result<(), E> {
        self.count(0)
    }

    fn visit_i128<E: de::Error>(mut self, _: i128) -> Result<(), E> {
        self.count(0)
    }

    fn visit_u64<E: de::Error>(mut self, _: u64) -> Result<(), E> {
        self.count(0)
    }

    fn visit_u128<E: de::Error>(mut self, _: u128) -> Result<(), E> {
        self.count(0)
    }

    fn visit_f64<E: de::Error>(mut self, _: f64) -> Result<(), E> {
        self.count(0)
    }

    fn visit_str<E: de::Error>(mut self, text: &str) -> Result<(), E> {
        self.count(text.len())
    }

    fn visit_bytes<E: de::Error>(mut self, bytes: &[u8]) -> Result<(), E> {
        self.count(bytes.len())
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.count(0)
    }

    fn visit_none<E: de::Error>(mut self) -> Result<(), E> {
        self.count(0)
    }

    fn visit_some<D: Deserializer<'de>>(mut self, deserializer: D) -> Result<(), D::Error> {
        self.count(0)?;
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        mut self,
        deserializer: D,
    ) -> Result<(), D::Error> {
        self.count(0)?;
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.count(0)?;
        while seq.next_element_seed(self.reborrow())?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.count(0)?;
        while map.next_key_seed(self.reborrow())?.is_some() {
            map.next_value_seed(self.reborrow())?;
        }
        Ok(())
    }

    /// A tagged node (`!tag value`).
    fn visit_enum<A: EnumAccess<'de>>(mut self, data: A) -> Result<(), A::Error> {
        self.count(0)?;
        let ((), variant) = data.variant_seed(self.reborrow())?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts every document of `text` against one budget.
    fn expand(text: &str, max_nodes: usize, max_scalar_bytes: usize) -> Result<Expanded, String> {
        let mut spent = Expanded::default();
        for document in yaml_serde::Deserializer::from_str(text) {
            NodeBudget {
                spent: &mut spent,
                max_nodes,
                max_scalar_bytes,
            }
            .deserialize(document)
            .map_err(|error| error.to_string())?;
        }
        Ok(spent)
    }

    #[test]
    fn counts_every_node_aliases_expanded() {
        // The mapping, 2 keys, the sequence and its 3 scalars, then the alias's 4 nodes again.
        let spent = expand("a: &x [1, 2, 3]\nb: *x\n", 100, 100).unwrap();
        assert_eq!((spent.nodes, spent.scalar_bytes), (11, 2));
        // The tagged node, its tag, the mapping and its key and value.
        let spent = expand("!tag {k: v}", 100, 100).unwrap();
        assert_eq!((spent.nodes, spent.scalar_bytes), (5, 5));
    }

    #[test]
    fn a_document_of_repeated_aliases_stops_at_the_budget() {
        // 200 aliases of a 200-element sequence: 40,000 nodes from 2 kB of text.
        let anchored = vec!["0"; 200].join(",");
        let aliases = vec!["*a"; 200].join(",");
        let text = format!("a: &a [{anchored}]\nb: [{aliases}]\n");
        let error = expand(&text, 10_000, usize::MAX).unwrap_err();
        assert!(error.contains("more than 10000 nodes"), "{error}");
        assert!(expand(&text, 100_000, usize::MAX).is_ok());
    }

    /// A long string repeated by aliases is few nodes and many bytes.
    #[test]
    fn a_repeated_long_string_stops_at_the_byte_budget() {
        let long = "x".repeat(10_000);
        let aliases = vec!["*s"; 200].join(",");
        let text = format!("s: &s {long}\nl: [{aliases}]\n");
        let error = expand(&text, 1_000, 1_000_000).unwrap_err();
        assert!(error.contains("more than 1000000 bytes"), "{error}");
    }

    fn checked(text: &str, nodes: usize, bytes: usize) -> Result<(), String> {
        check_text(text, nodes, bytes).map_err(|(_, message)| message)
    }

    /// Measured, aliases could still decode huge: yaml_serde gives a second anchor of the same
    /// name the number of a later one, and reads `0.000…1` as a float for a counter but as all
    /// of its text for the typed model. No alias gets past now, wherever it points.
    #[test]
    fn an_alias_is_refused_where_it_stands() {
        let text = "labels: {p: &a 1, q: &a 2}\nvalues: [&n 0.0001, *a]\n";
        let (at, error) = check_text(text, 100, 100).unwrap_err();
        assert!(
            error.contains("aliases (*name) are not supported"),
            "{error}"
        );
        assert_eq!(at.map(|at| (at.line, at.column)), Some((2, 21)));
        // An anchor alone is harmless.
        assert!(checked("a: &x [1, 2]\n", 100, 100).is_ok());
    }

    /// libyaml takes `[-]` where the event parser does not: a disagreement is refused, not
    /// waved through to the parser that decodes.
    #[test]
    fn text_the_event_parser_cannot_read_is_refused() {
        let error = checked("labels: {k: [-]}\n", 100, 100).unwrap_err();
        assert!(!error.is_empty());
        assert!(checked("key: [unclosed\n", 100, 100).is_err());
    }

    #[test]
    fn the_files_nodes_and_text_are_bounded_across_documents() {
        let document = format!("l: [{}]\n", vec!["0"; 60].join(","));
        let text = vec![document; 20].join("---\n");
        let error = checked(&text, 1_000, usize::MAX).unwrap_err();
        assert!(error.contains("more than 1000 nodes"), "{error}");
        let tag = format!("!{}", "t".repeat(2_000));
        let error = checked(&format!("a: {tag} [1]\n"), 100, 1_000).unwrap_err();
        assert!(error.contains("more than 1000 bytes"), "{error}");
    }

    /// Documents share the budget: a fresh one each would multiply it by their number.
    #[test]
    fn the_documents_of_a_text_share_one_budget() {
        let document = format!("l: [{}]\n", vec!["0"; 60].join(","));
        let text = vec![document; 20].join("---\n");
        let error = expand(&text, 1_000, usize::MAX).unwrap_err();
        assert!(error.contains("more than 1000 nodes"), "{error}");
    }
}
