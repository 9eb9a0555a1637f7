//! Small helpers on raw DNS packets: IDs and RCODE labels.

use hickory_proto::op::ResponseCode;

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

    #[test]
    fn ids_are_replaced_in_place() {
        let mut packet = vec![0u8; 12];
        set_id(&mut packet, 0xabcd);
        assert_eq!(packet_id(&packet), Some(0xabcd));
        assert_eq!(packet_id(&packet[..11]), None);
    }
}
