//! A bound on what a YAML text expands to. Aliases repeat the node they name, so a file of a
//! few hundred kilobytes can stand for billions of nodes or gigabytes of repeated strings
//! (yaml_serde bounds the jumps, not what each one copies), and building that `Value` would
//! take the agent's memory before any check ran. Counting each document first, without keeping
//! anything, against one budget for the whole text stops it: a real policy file is a few
//! hundred nodes and kilobytes, the bench's 10,000 selectors some 60,000 nodes and 600 kB.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

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

    /// Documents share the budget: a fresh one each would multiply it by their number.
    #[test]
    fn the_documents_of_a_text_share_one_budget() {
        let document = format!("l: [{}]\n", vec!["0"; 60].join(","));
        let text = vec![document; 20].join("---\n");
        let error = expand(&text, 1_000, usize::MAX).unwrap_err();
        assert!(error.contains("more than 1000 nodes"), "{error}");
    }
}
