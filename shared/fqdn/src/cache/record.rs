//! The per-IP record and the small list of them kept per (endpoint, name).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::Source;

/// `dns_gap` value meaning "no DNS answer vouches for this IP any more (or ever did)".
const NO_DNS: u32 = u32::MAX;

/// 32 bytes: one IP with its two deadlines.
///
/// Only the later deadline is stored in full because it alone drives expiry; the DNS deadline
/// is kept as its distance below it, which is only needed to tell whether the IP is still
/// backed by an answer or merely kept for connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IpRec {
    /// Effective expiry: the later of the DNS expiry and the connection grace.
    expires: u64,
    /// `expires - dns expiry`, or [`NO_DNS`] (also used when the gap would not fit).
    dns_gap: u32,
    addr: [u8; 16],
    v6: bool,
    /// Lookup or Restored: who set the DNS expiry. Connection is derived, not stored.
    origin: Source,
}

/// Precedence on equal DNS expiries, so that merging is order-independent.
const fn rank(source: Source) -> u8 {
    match source {
        Source::Connection => 0,
        Source::Restored => 1,
        Source::Lookup => 2,
    }
}

fn gap(expires: u64, dns: u64) -> u32 {
    u32::try_from(expires.saturating_sub(dns))
        .ok()
        .filter(|&g| g != NO_DNS)
        .unwrap_or(NO_DNS)
}

impl IpRec {
    /// A record backed by a DNS answer (or a restored one) until `expires`.
    pub(crate) fn from_dns(ip: IpAddr, expires: u64, origin: Source) -> IpRec {
        let (addr, v6) = encode(ip);
        if origin == Source::Connection {
            return IpRec {
                expires,
                dns_gap: NO_DNS,
                addr,
                v6,
                origin: Source::Restored,
            };
        }
        IpRec {
            expires,
            dns_gap: 0,
            addr,
            v6,
            origin,
        }
    }

    pub(crate) fn ip(&self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.addr))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            ))
        }
    }

    pub(crate) fn is(&self, ip: IpAddr) -> bool {
        encode(ip) == (self.addr, self.v6)
    }

    pub(crate) fn expires(&self) -> u64 {
        self.expires
    }

    pub(crate) fn is_live(&self, now: u64) -> bool {
        now < self.expires
    }

    /// 0 when no answer backs the record (every `now` is past it).
    pub(crate) fn dns_expires(&self) -> u64 {
        if self.dns_gap == NO_DNS {
            0
        } else {
            self.expires.saturating_sub(u64::from(self.dns_gap))
        }
    }

    /// What the record is at `now` and until when it stays that: backed by its answer until
    /// the DNS expiry, then (if connections hold it) by them until the effective expiry.
    ///
    /// Reporting the DNS expiry rather than the later effective one while the answer is valid
    /// keeps the reported view free of hidden state: merging views is then commutative and
    /// idempotent. Connection grace is local knowledge that the owner of the connections
    /// re-asserts anyway.
    pub(crate) fn view(&self, now: u64) -> (u64, Source) {
        let dns = self.dns_expires();
        if now < dns {
            (dns, self.origin)
        } else {
            (self.expires, Source::Connection)
        }
    }

    /// Folds in an answer (or a peer's record) valid until `until`; later expiry wins, and on
    /// a tie the stronger source, so the result does not depend on arrival order.
    pub(crate) fn extend_dns(&mut self, until: u64, origin: Source) -> bool {
        if origin == Source::Connection {
            return self.extend_alive(until);
        }
        let dns = self.dns_expires();
        let takes_over = until > dns
            || (until == dns && self.dns_gap != NO_DNS && rank(origin) > rank(self.origin));
        if !takes_over {
            return false;
        }
        self.expires = self.expires.max(until);
        self.dns_gap = gap(self.expires, until);
        self.origin = origin;
        true
    }

    /// Keeps the record until at least `until` without claiming DNS backs it.
    pub(crate) fn extend_alive(&mut self, until: u64) -> bool {
        if until <= self.expires {
            return false;
        }
        let dns = self.dns_expires();
        self.expires = until;
        self.dns_gap = if dns == 0 { NO_DNS } else { gap(until, dns) };
        true
    }
}

fn encode(ip: IpAddr) -> ([u8; 16], bool) {
    match ip {
        IpAddr::V4(v4) => {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&v4.octets());
            (addr, false)
        }
        IpAddr::V6(v6) => (v6.octets(), true),
    }
}

/// Most names resolve to one IP, so a single record is kept inline (same 32 bytes as the
/// record: the `Many` tag hides in the record's spare bit patterns) and a heap vector is used
/// only beyond that.
#[derive(Clone, Debug)]
pub(crate) enum IpList {
    One(IpRec),
    /// Also the empty state, transiently, while a pair is being emptied.
    Many(Vec<IpRec>),
}

impl IpList {
    pub(crate) fn as_slice(&self) -> &[IpRec] {
        match self {
            IpList::One(rec) => std::slice::from_ref(rec),
            IpList::Many(recs) => recs,
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [IpRec] {
        match self {
            IpList::One(rec) => std::slice::from_mut(rec),
            IpList::Many(recs) => recs,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    pub(crate) fn find(&self, ip: IpAddr) -> Option<&IpRec> {
        self.as_slice().iter().find(|r| r.is(ip))
    }

    pub(crate) fn find_mut(&mut self, ip: IpAddr) -> Option<&mut IpRec> {
        self.as_mut_slice().iter_mut().find(|r| r.is(ip))
    }

    pub(crate) fn push(&mut self, rec: IpRec) {
        match self {
            IpList::One(first) => {
                let first = *first;
                *self = IpList::Many(vec![first, rec]);
            }
            IpList::Many(recs) if recs.is_empty() => *self = IpList::One(rec),
            IpList::Many(recs) => recs.push(rec),
        }
    }

    /// Removes and returns the records `remove` selects, then gives back spare capacity.
    pub(crate) fn extract(&mut self, mut remove: impl FnMut(&IpRec) -> bool) -> Vec<IpRec> {
        let mut out = Vec::new();
        match self {
            IpList::One(rec) => {
                if remove(rec) {
                    out.push(*rec);
                    *self = IpList::Many(Vec::new());
                }
            }
            IpList::Many(recs) => {
                recs.retain(|r| {
                    let gone = remove(r);
                    if gone {
                        out.push(*r);
                    }
                    !gone
                });
                self.compact();
            }
        }
        out
    }

    fn compact(&mut self) {
        if let IpList::Many(recs) = self {
            if let [only] = recs.as_slice() {
                *self = IpList::One(*only);
            } else if recs.capacity() > 4 && recs.len() * 2 < recs.capacity() {
                recs.shrink_to_fit();
            }
        }
    }

    /// The records in IP order, to compare lists whose order differs.
    #[cfg(test)]
    pub(crate) fn sorted(&self) -> Vec<IpRec> {
        let mut recs = self.as_slice().to_vec();
        recs.sort_unstable_by_key(IpRec::ip);
        recs
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            IpList::One(_) => 0,
            IpList::Many(recs) => super::malloc_size(recs.capacity() * size_of::<IpRec>()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn compact_layout() {
        assert_eq!(size_of::<IpRec>(), 32);
        assert_eq!(size_of::<IpList>(), 32);
    }

    #[test]
    fn round_trips_both_families() {
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        for ip in [v4(1), v6, mapped] {
            let r = IpRec::from_dns(ip, 10, Source::Lookup);
            assert_eq!(r.ip(), ip);
            assert!(r.is(ip));
        }
        assert!(!IpRec::from_dns(mapped, 1, Source::Lookup).is(v4(1)));
    }

    #[test]
    fn dns_and_connection_deadlines() {
        let mut r = IpRec::from_dns(v4(1), 100, Source::Lookup);
        assert_eq!(r.dns_expires(), 100);
        assert!(!r.extend_dns(90, Source::Lookup));
        assert!(r.extend_alive(150));
        assert_eq!((r.expires(), r.dns_expires()), (150, 100));
        assert_eq!(r.view(99), (100, Source::Lookup));
        assert_eq!(r.view(100), (150, Source::Connection));
        assert!(r.extend_dns(120, Source::Restored));
        assert_eq!((r.expires(), r.dns_expires()), (150, 120));
        assert_eq!(r.view(110), (120, Source::Restored));
        assert!(r.extend_dns(120, Source::Lookup));
        assert!(!r.extend_dns(120, Source::Restored));
        assert_eq!(r.view(110), (120, Source::Lookup));
        assert!(r.extend_dns(200, Source::Lookup));
        assert_eq!((r.expires(), r.dns_expires()), (200, 200));

        let mut c = IpRec::from_dns(v4(2), 50, Source::Connection);
        assert_eq!((c.expires(), c.dns_expires()), (50, 0));
        assert_eq!(c.view(0), (50, Source::Connection));
        assert!(c.extend_alive(60));
        assert_eq!(c.dns_expires(), 0);
        assert!(c.extend_dns(40, Source::Lookup));
        assert_eq!((c.expires(), c.dns_expires()), (60, 40));
    }

    #[test]
    fn absurd_gaps_degrade_to_no_dns() {
        let mut r = IpRec::from_dns(v4(1), 10, Source::Lookup);
        assert!(r.extend_alive(u64::MAX));
        assert_eq!(r.expires(), u64::MAX);
        assert_eq!(r.dns_expires(), 0);
    }

    #[test]
    fn list_goes_inline_and_back() {
        let mut l = IpList::One(IpRec::from_dns(v4(1), 10, Source::Lookup));
        l.push(IpRec::from_dns(v4(2), 20, Source::Lookup));
        l.push(IpRec::from_dns(v4(3), 30, Source::Lookup));
        assert_eq!(l.len(), 3);
        assert!(l.heap_bytes() > 0);
        let gone = l.extract(|r| r.expires() <= 20);
        assert_eq!(gone.len(), 2);
        assert!(matches!(l, IpList::One(_)));
        assert_eq!(l.heap_bytes(), 0);
        assert!(l.find(v4(3)).is_some());
        assert!(l.find_mut(v4(1)).is_none());
        let gone = l.extract(|_| true);
        assert_eq!(gone.len(), 1);
        assert!(l.is_empty());
        l.push(IpRec::from_dns(v4(4), 5, Source::Lookup));
        assert!(matches!(l, IpList::One(_)));
    }
}
