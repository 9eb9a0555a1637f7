//! Small helpers on raw DNS packets: IDs and RCODE labels.

use hickory_proto::op::ResponseCode;

/// The mnemonics `dig` prints (`NOERROR`, `REFUSED`, ...), for metric labels and flow events;
/// rare codes share the last label so that a hostile upstream cannot blow up label cardinality.
pub const RCODE_NAMES: [&str; 11] = [
    "NOERROR",
    "FORMERR",
    "SERVFAIL",
    "NXDOMAIN",
    "NOTIMP",
    "REFUSED",
    "YXDOMAIN",
    "NOTAUTH",
    "BADVERS",
    "BADCOOKIE",
    "OTHER",
];

/// The position of `rcode`'s label in [`RCODE_NAMES`].
pub fn rcode_index(rcode: ResponseCode) -> usize {
    match rcode {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        ResponseCode::YXDomain => 6,
        ResponseCode::NotAuth => 7,
        ResponseCode::BADVERS => 8,
        ResponseCode::BADCOOKIE => 9,
        _ => 10,
    }
}

/// `rcode`'s label (see [`RCODE_NAMES`]).
pub fn rcode_name(rcode: ResponseCode) -> &'static str {
    RCODE_NAMES[rcode_index(rcode)]
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

    #[test]
    fn rcode_labels_are_digs_mnemonics() {
        assert_eq!(rcode_name(ResponseCode::NXDomain), "NXDOMAIN");
        assert_eq!(rcode_name(ResponseCode::BADCOOKIE), "BADCOOKIE");
        assert_eq!(rcode_name(ResponseCode::Unknown(3841)), "OTHER");
    }

    #[test]
    fn ids_are_replaced_in_place() {
        let mut packet = vec![0u8; 12];
        set_id(&mut packet, 0xabcd);
        assert_eq!(packet_id(&packet), Some(0xabcd));
        assert_eq!(packet_id(&packet[..11]), None);
    }
}
