//! A bound on how many nodes a YAML document expands to. Aliases repeat the node they name,
//! so a file of a few hundred kilobytes can stand for billions of nodes (yaml_serde bounds the
//! jumps, not what each one copies), and building that `Value` would take the agent's memory
//! before any check ran. Counting the document first, without keeping anything, stops it at the
//! budget: a real policy is a few hundred nodes, the bench's 10,000 selectors some 60,000.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// Nodes (scalars, sequences, mappings and their keys) one document may expand to: counted in
/// about 50 ms, and some 100 MB as a `Value` at worst.
pub(crate) const MAX_NODES: usize = 1_000_000;

/// Walks a document and fails once it has seen more than `limit` nodes.
pub(crate) struct NodeBudget<'a> {
    pub(crate) seen: &'a mut usize,
    pub(crate) limit: usize,
}

impl NodeBudget<'_> {
    fn reborrow(&mut self) -> NodeBudget<'_> {
        NodeBudget {
            seen: self.seen,
            limit: self.limit,
        }
    }

    fn count<E: de::Error>(&mut self) -> Result<(), E> {
        *self.seen += 1;
        if *self.seen > self.limit {
            return Err(E::custom(format!(
                "the document expands to more than {} nodes (aliases repeat what they name)",
                self.limit
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
        self.count()
    }

    fn visit_i64<E: de::Error>(mut self, _: i64) -> Result<(), E> {
        self.count()
    }

    fn visit_i128<E: de::Error>(mut self, _: i128) -> Result<(), E> {
        self.count()
    }

    fn visit_u64<E: de::Error>(mut self, _: u64) -> Result<(), E> {
        self.count()
    }

    fn visit_u128<E: de::Error>(mut self, _: u128) -> Result<(), E> {
        self.count()
    }

    fn visit_f64<E: de::Error>(mut self, _: f64) -> Result<(), E> {
        self.count()
    }

    fn visit_str<E: de::Error>(mut self, _: &str) -> Result<(), E> {
        self.count()
    }

    fn visit_bytes<E: de::Error>(mut self, _: &[u8]) -> Result<(), E> {
        self.count()
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.count()
    }

    fn visit_none<E: de::Error>(mut self) -> Result<(), E> {
        self.count()
    }

    fn visit_some<D: Deserializer<'de>>(mut self, deserializer: D) -> Result<(), D::Error> {
        self.count()?;
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        mut self,
        deserializer: D,
    ) -> Result<(), D::Error> {
        self.count()?;
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.count()?;
        while seq.next_element_seed(self.reborrow())?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.count()?;
        while map.next_key_seed(self.reborrow())?.is_some() {
            map.next_value_seed(self.reborrow())?;
        }
        Ok(())
    }

    /// A tagged node (`!tag value`).
    fn visit_enum<A: EnumAccess<'de>>(mut self, data: A) -> Result<(), A::Error> {
        self.count()?;
        let ((), variant) = data.variant_seed(self.reborrow())?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(text: &str, limit: usize) -> Result<usize, String> {
        let mut seen = 0;
        let document = yaml_serde::Deserializer::from_str(text)
            .next()
            .ok_or("no document")?;
        NodeBudget {
            seen: &mut seen,
            limit,
        }
        .deserialize(document)
        .map_err(|error| error.to_string())?;
        Ok(seen)
    }

    #[test]
    fn counts_every_node_aliases_expanded() {
        // The mapping, 2 keys, the sequence and its 3 scalars, then the alias's 4 nodes again.
        assert_eq!(nodes("a: &x [1, 2, 3]\nb: *x\n", 100), Ok(11));
        // The tagged node, its tag, the mapping and its key and value.
        assert_eq!(nodes("!tag {k: v}", 100), Ok(5));
    }

    #[test]
    fn a_document_of_repeated_aliases_stops_at_the_budget() {
        // 200 aliases of a 200-element sequence: 40,000 nodes from 2 kB of text.
        let anchored = vec!["0"; 200].join(",");
        let aliases = vec!["*a"; 200].join(",");
        let text = format!("a: &a [{anchored}]\nb: [{aliases}]\n");
        let error = nodes(&text, 10_000).unwrap_err();
        assert!(error.contains("more than 10000 nodes"), "{error}");
        assert!(nodes(&text, 100_000).is_ok());
    }
}
