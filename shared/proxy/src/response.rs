//! The few messages the proxy writes itself; everything else is the upstream's answer, untouched.

use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};

/// An answer to `query` carrying only `rcode`: the question echoed, the client's ID and RD
/// flag kept, and an OPT record when the client sent one (RFC 6891 §7).
pub fn error_response(query: &Message, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut response = Message::error_msg(query.metadata.id, query.metadata.op_code, rcode);
    response.metadata.message_type = MessageType::Response;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = query.metadata.checking_disabled;
    response.add_queries(query.queries.iter().cloned());
    if let Some(edns) = &query.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().max(512));
        ours.flags_mut().dnssec_ok = edns.flags().dnssec_ok;
        response.set_edns(ours);
    }
    response.to_vec().ok()
}

/// The mnemonic `dig` prints (`NOERROR`, `REFUSED`, ...), for metric labels and flow events;
/// rare codes share one label so that a hostile upstream cannot blow up label cardinality.
pub fn rcode_name(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::YXDomain => "YXDOMAIN",
        ResponseCode::NotAuth => "NOTAUTH",
        ResponseCode::BADVERS => "BADVERS",
        ResponseCode::BADCOOKIE => "BADCOOKIE",
        _ => "OTHER",
    }
}

/// Replaces a message's ID in place; the rest of the packet is not touched.
pub fn set_id(packet: &mut [u8], id: u16) {
    if let Some(header) = packet.get_mut(0..2) {
        header.copy_from_slice(&id.to_be_bytes());
    }
}

/// A packet's ID, if it is long enough to have a DNS header.
pub fn packet_id(packet: &[u8]) -> Option<u16> {
    (packet.len() >= 12).then(|| u16::from_be_bytes([packet[0], packet[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};
    use std::str::FromStr;

    #[test]
    fn an_error_response_echoes_the_question_and_the_id() {
        let mut query = Message::query();
        query.metadata.id = 4242;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(
            Name::from_str("bbc.co.uk.").unwrap(),
            RecordType::A,
        ));
        query.set_edns(Edns::new());
        let bytes = error_response(&query, ResponseCode::Refused).unwrap();
        let response = Message::from_vec(&bytes).unwrap();
        assert_eq!(response.metadata.id, 4242);
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert_eq!(response.metadata.response_code, ResponseCode::Refused);
        assert!(response.metadata.recursion_desired);
        assert_eq!(response.queries, query.queries);
        assert!(response.edns.is_some());
    }

    #[test]
    fn ids_are_replaced_in_place() {
        let mut packet = vec![0u8; 12];
        set_id(&mut packet, 0xabcd);
        assert_eq!(packet_id(&packet), Some(0xabcd));
        assert_eq!(packet_id(&packet[..11]), None);
    }
}
