//! A bound on what a YAML text expands to. Aliases repeat the node they name, so a file of a
//! few hundred kilobytes can stand for billions of nodes or gigabytes of repeated strings
//! (yaml_serde bounds the jumps, not what each one copies), and decoding it would take the
//! agent's memory before any check ran. Two measures run first, keeping nothing:
//! [`measure_text`] adds up the file's events, each alias costing what its anchor holds, with
//! every scalar's length as written (yaml_serde reads `0.000…1` as a small float when asked for
//! anything, but the typed model asks for a string, and gets all of it); [`NodeBudget`] then
//! walks what yaml_serde itself produces, for text the event parser does not take. A real
//! policy file is a few hundred nodes and kilobytes, the bench's 10,000 selectors some 60,000
//! nodes and 600 kB.

use std::fmt;

use saphyr_parser::{Event, Parser};
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

/// What a node expands to, aliases included.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    nodes: u64,
    bytes: u64,
}

impl Cost {
    fn add(&mut self, other: Cost) {
        self.nodes = self.nodes.saturating_add(other.nodes);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

/// Adds up what every document of `text` expands to, and fails at the first event that takes
/// the whole past [`MAX_NODES`] or [`MAX_SCALAR_BYTES`]. Text the event parser cannot read is
/// left to yaml_serde (`Ok`): its own error, or [`NodeBudget`], decides.
pub(crate) fn measure_text(text: &str) -> Result<(), (Option<Location>, String)> {
    let limit = Cost {
        nodes: MAX_NODES as u64,
        bytes: MAX_SCALAR_BYTES as u64,
    };
    measure(text, limit)
}

fn measure(text: &str, limit: Cost) -> Result<(), (Option<Location>, String)> {
    // What each anchor holds, by the parser's anchor id; and the collections open around the
    // current event, each with what it holds so far and its anchor (0: none).
    let mut anchors: Vec<Cost> = Vec::new();
    let mut open: Vec<(usize, Cost)> = Vec::new();
    let mut total = Cost::default();
    for event in Parser::new_from_str(text) {
        let Ok((event, span)) = event else {
            return Ok(());
        };
        let (cost, anchor) = match event {
            Event::Scalar(value, _, anchor, tag) => (
                Cost {
                    nodes: 1,
                    bytes: (value.len() + tag_len(tag.as_deref())) as u64,
                },
                anchor,
            ),
            Event::Alias(anchor) => (anchors.get(anchor).copied().unwrap_or_default(), 0),
            Event::SequenceStart(anchor, tag) | Event::MappingStart(anchor, tag) => {
                // A tag is copied with its node, alias or not.
                let cost = Cost {
                    nodes: 1,
                    bytes: tag_len(tag.as_deref()) as u64,
                };
                open.push((anchor, cost));
                total.add(cost);
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some((anchor, held)) = open.pop() else {
                    continue;
                };
                remember(&mut anchors, anchor, held);
                if let Some((_, parent)) = open.last_mut() {
                    parent.add(held);
                }
                continue;
            }
            _ => continue,
        };
        remember(&mut anchors, anchor, cost);
        if let Some((_, parent)) = open.last_mut() {
            parent.add(cost);
        }
        total.add(cost);
        if total.nodes > limit.nodes || total.bytes > limit.bytes {
            let at = Location {
                line: span.start.line(),
                column: span.start.col() + 1,
            };
            let what = if total.nodes > limit.nodes {
                format!("{} nodes", limit.nodes)
            } else {
                format!("{} bytes of text", limit.bytes)
            };
            return Err((
                Some(at),
                format!("the file expands to more than {what} (aliases repeat what they name)"),
            ));
        }
    }
    Ok(())
}

fn tag_len(tag: Option<&saphyr_parser::Tag>) -> usize {
    tag.map_or(0, |tag| tag.handle.len() + tag.suffix.len())
}

fn remember(anchors: &mut Vec<Cost>, anchor: usize, cost: Cost) {
    if anchor == 0 {
        return;
    }
    if anchors.len() <= anchor {
        anchors.resize(anchor + 1, Cost::default());
    }
    anchors[anchor] = cost;
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

    fn measured(text: &str, nodes: u64, bytes: u64) -> Result<(), String> {
        measure(text, Cost { nodes, bytes }).map_err(|(_, message)| message)
    }

    /// yaml_serde hands `0.000…1` to a counting visitor as a float (no length), but to the
    /// typed model, which asks for a string, as all of its text: the events count its length.
    #[test]
    fn a_repeated_long_number_counts_its_text() {
        let number = format!("0.{}1", "0".repeat(10_000));
        let aliases = vec!["*n"; 200].join(",");
        let text = format!("n: &n {number}\nl: [{aliases}]\n");
        let error = measured(&text, 1_000_000, 1_000_000).unwrap_err();
        assert!(error.contains("more than 1000000 bytes"), "{error}");
        // The serde walk alone let it through.
        assert!(expand(&text, 1_000_000, 1_000_000).is_ok());
    }

    #[test]
    fn nested_aliases_multiply_and_documents_add_up() {
        // b holds 1 + 10 × 4 nodes (a: the sequence and its 3 scalars); c 1 + 10 × 41.
        let a = "a: &a [1, 2, 3]\n";
        let b = format!("b: &b [{}]\n", ["*a"; 10].join(","));
        let c = format!("c: [{}]\n", ["*b"; 10].join(","));
        let text = format!("{a}{b}{c}");
        // 1 mapping + 3 keys + 4 + 41 + 411 nodes.
        assert!(measured(&text, 460, u64::MAX).is_ok());
        assert!(measured(&text, 459, u64::MAX).is_err());
        let twice = format!("{text}---\n{text}");
        assert!(measured(&twice, 919, u64::MAX).is_err());
        assert!(measured(&twice, 920, u64::MAX).is_ok());
    }

    /// yaml_serde keeps a tagged node's tag with every copy of it.
    #[test]
    fn a_repeated_long_tag_counts() {
        let tag = format!("!{}", "t".repeat(10_000));
        let aliases = vec!["*t"; 200].join(",");
        let text = format!("t: &t {tag} [1]\nl: [{aliases}]\n");
        let error = measured(&text, 1_000_000, 1_000_000).unwrap_err();
        assert!(error.contains("more than 1000000 bytes"), "{error}");
    }

    #[test]
    fn text_the_event_parser_cannot_read_is_left_to_yaml_serde() {
        assert!(measured("key: [unclosed\n", 100, 100).is_ok());
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
