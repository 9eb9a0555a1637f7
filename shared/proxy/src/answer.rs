//! What an answer allows: the IPs at the end of the CNAME chain and how long for.
//!
//! [`crate::wire`] reads it from the packet on the hot path. The hickory-based [`summarize`]
//! and [`normalized`] here are the reference it is tested against: the same rules, written
//! over a fully decoded message where they are easy to check by eye.

use std::net::IpAddr;

#[cfg(test)]
use hickory_proto::op::Message;
#[cfg(test)]
use hickory_proto::rr::{Name, RData};

/// Longest CNAME chain followed; longer chains are loops or abuse, and what was found is used.
pub(crate) const MAX_CHAIN: usize = 16;

/// A record's TTL as a cache must take it: RFC 2181 §8 has values with the top bit set read as
/// 0 (a crafted 0xFFFFFFFE once kept an entry and its allow entries for 136 years). Values up
/// to 2^31 − 1 s are taken as given: a lower cap would also need the answer's TTLs rewritten,
/// or clients would use addresses past their allow entries.
pub(crate) fn usable_ttl(wire: u32) -> u32 {
    if wire > i32::MAX.unsigned_abs() {
        0
    } else {
        wire
    }
}

/// The smallest of `ttl` so far (`None` before the first record) and `record`'s.
pub(crate) fn lowest_ttl(ttl: Option<u32>, record: u32) -> Option<u32> {
    let record = usable_ttl(record);
    Some(ttl.map_or(record, |ttl| ttl.min(record)))
}

/// The addresses an answer gives for the queried name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerSummary {
    /// A and AAAA records of the last name in the CNAME chain, in answer order, deduplicated.
    pub ips: Vec<IpAddr>,
    /// The smallest TTL along the chain, CNAMEs and addresses alike (one of 2^31 or more counts
    /// as 0); 0 when nothing was found.
    pub ttl: u32,
    /// The chain's targets, in order, lowercased with a trailing dot.
    pub cnames: Vec<String>,
}

/// Follows `qname` through the answer section's CNAMEs and collects the addresses of the last
/// name. Records for other names (out-of-chain data a server should not have sent) are ignored,
/// so an upstream cannot make the proxy allow IPs for a name nobody asked about.
#[cfg(test)]
pub fn summarize(message: &Message, qname: &Name) -> AnswerSummary {
    let mut summary = AnswerSummary::default();
    let mut current = qname.clone();
    let mut ttl = None;
    for _ in 0..MAX_CHAIN {
        let next = message
            .answers
            .iter()
            .find_map(|record| match &record.data {
                RData::CNAME(target) if record.name == current => {
                    Some((target.0.clone(), record.ttl))
                }
                _ => None,
            });
        let Some((target, record_ttl)) = next else {
            break;
        };
        ttl = lowest_ttl(ttl, record_ttl);
        summary.cnames.push(normalized(&target));
        current = target;
    }
    for record in message
        .answers
        .iter()
        .filter(|record| record.name == current)
    {
        let ip = match &record.data {
            RData::A(address) => IpAddr::V4(address.0),
            RData::AAAA(address) => IpAddr::V6(address.0),
            _ => continue,
        };
        ttl = lowest_ttl(ttl, record.ttl);
        if !summary.ips.contains(&ip) {
            summary.ips.push(ip);
        }
    }
    summary.ttl = ttl.unwrap_or(0);
    summary
}

/// A name as policy and cache see it: lowercase, fully qualified.
#[cfg(test)]
pub fn normalized(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    if !text.ends_with('.') {
        text.push('.');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
    use std::str::FromStr;

    fn name(text: &str) -> Name {
        Name::from_str(text).unwrap()
    }

    fn answer(records: Vec<Record>) -> Message {
        let mut message = Message::response(1, hickory_proto::op::OpCode::Query);
        message.add_answers(records);
        message
    }

    #[test]
    fn follows_the_chain_and_keeps_its_smallest_ttl() {
        let message = answer(vec![
            Record::from_rdata(
                name("edge.cilium.io."),
                60,
                RData::A(A::new(198, 18, 1, 11)),
            ),
            Record::from_rdata(
                name("www.cilium.io."),
                300,
                RData::CNAME(CNAME(name("web.cilium.io."))),
            ),
            Record::from_rdata(
                name("web.cilium.io."),
                120,
                RData::CNAME(CNAME(name("edge.cilium.io."))),
            ),
            Record::from_rdata(
                name("edge.cilium.io."),
                90,
                RData::A(A::new(198, 18, 1, 12)),
            ),
        ]);
        let summary = summarize(&message, &name("WWW.Cilium.IO."));
        assert_eq!(
            summary.ips,
            vec![
                "198.18.1.11".parse::<IpAddr>().unwrap(),
                "198.18.1.12".parse().unwrap()
            ]
        );
        assert_eq!(summary.ttl, 60);
        assert_eq!(summary.cnames, vec!["web.cilium.io.", "edge.cilium.io."]);
    }

    #[test]
    fn ignores_records_outside_the_chain() {
        let message = answer(vec![
            Record::from_rdata(name("evil.example."), 5, RData::A(A::new(6, 6, 6, 6))),
            Record::from_rdata(
                name("cilium.io."),
                300,
                RData::AAAA(AAAA::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x10)),
            ),
            Record::from_rdata(
                name("cilium.io."),
                300,
                RData::TXT(TXT::new(vec!["x".into()])),
            ),
        ]);
        let summary = summarize(&message, &name("cilium.io."));
        assert_eq!(summary.ips, vec!["fd00:77::10".parse::<IpAddr>().unwrap()]);
        assert_eq!(summary.ttl, 300);
    }

    #[test]
    fn a_cname_loop_ends() {
        let message = answer(vec![
            Record::from_rdata(name("a.io."), 10, RData::CNAME(CNAME(name("b.io.")))),
            Record::from_rdata(name("b.io."), 10, RData::CNAME(CNAME(name("a.io.")))),
        ]);
        let summary = summarize(&message, &name("a.io."));
        assert!(summary.ips.is_empty());
        assert_eq!(summary.cnames.len(), MAX_CHAIN);
    }

    #[test]
    fn an_empty_answer_has_no_ttl() {
        let summary = summarize(&answer(vec![]), &name("cilium.io."));
        assert_eq!(summary, AnswerSummary::default());
    }
}
