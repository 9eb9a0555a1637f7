//! The lab's DNS data. Addresses are in 198.18.0.0/15 and fd00:77::/64 because those ranges
//! will later be lab hosts inside namespaces; nothing routes to them outside a test.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};

/// TTL of every record that does not name its own.
pub const DEFAULT_TTL: u32 = 300;
/// SOA minimum, i.e. how long resolvers may cache NXDOMAIN/NODATA answers from the lab zones.
pub const NEGATIVE_TTL: u32 = 60;
/// Serial every zone starts with; each change bumps it by one.
pub const INITIAL_SERIAL: u32 = 1;
/// Address of the in-zone name servers (`ns1.<zone>`), only there to make the zones proper.
pub const NS_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);

pub const CILIUM_IO_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const CILIUM_IO_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x10);
/// `www.cilium.io` → `web.cilium.io` (CNAME, TTL 300) → `edge.cilium.io` (CNAME, TTL 120)
/// → two A records (TTL 60): the chain's minimum TTL is [`EDGE_CILIUM_IO_TTL`].
pub const WWW_CILIUM_IO_TTL: u32 = 300;
pub const WEB_CILIUM_IO_TTL: u32 = 120;
pub const EDGE_CILIUM_IO_TTL: u32 = 60;
pub const EDGE_CILIUM_IO_V4: [Ipv4Addr; 2] =
    [Ipv4Addr::new(198, 18, 1, 11), Ipv4Addr::new(198, 18, 1, 12)];
pub const ANYSUB_CILIUM_IO_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 13);
pub const SUB_CILIUM_IO_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 14);
pub const SUBDOMAIN_CILIUM_IO_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 15);
pub const A_B_CILIUM_IO_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 16);
pub const FOOBAR_TCP_CILIUM_IO_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 17);
pub const WWW2_CILIUM_IO_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 18);
/// `big.cilium.io` has this many A records, 198.18.2.1 upwards: too many for 512 bytes.
pub const BIG_CILIUM_IO_COUNT: u8 = 40;
/// `big-txt.cilium.io` has this many TXT records of [`BIG_TXT_LEN`] characters each.
pub const BIG_TXT_COUNT: usize = 6;
pub const BIG_TXT_LEN: usize = 120;

pub const GOOGLE_COM_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
pub const GOOGLE_COM_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x20);
pub const GOOGLE_COM_TTL: u32 = 300;
pub const WWW_GOOGLE_COM_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 21);

pub const BBC_CO_UK_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 30);
pub const BBC_CO_UK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x30);

/// `example.org` is the name tests leave out of their policies, to see it denied.
pub const EXAMPLE_ORG_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 40);
pub const SHORT_EXAMPLE_ORG_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 41);
/// Short enough that expiry tests need not wait long.
pub const SHORT_EXAMPLE_ORG_TTL: u32 = 2;

/// The A records of `big.cilium.io`, in zone order.
pub fn big_cilium_io_v4() -> Vec<Ipv4Addr> {
    (1..=BIG_CILIUM_IO_COUNT)
        .map(|i| Ipv4Addr::new(198, 18, 2, i))
        .collect()
}

/// The character strings of `big-txt.cilium.io`, one per TXT record, without quotes.
pub fn big_txt_strings() -> Vec<String> {
    (0..BIG_TXT_COUNT)
        .map(|i| {
            let head = format!("warden-lab-big-txt-{i}-");
            let pad = BIG_TXT_LEN.saturating_sub(head.len());
            format!("{head}{}", "x".repeat(pad))
        })
        .collect()
}

/// One resource record as it stands in a zone file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneRecord {
    /// Owner relative to the zone origin, `@` for the apex.
    pub owner: String,
    pub ttl: u32,
    /// Type mnemonic as in a zone file: `A`, `AAAA`, `CNAME`, `TXT`, ...
    pub rtype: String,
    /// RDATA in zone-file syntax (TXT strings quoted).
    pub data: String,
}

impl ZoneRecord {
    pub fn new(owner: &str, ttl: u32, rtype: &str, data: impl Into<String>) -> Self {
        Self {
            owner: owner.to_owned(),
            ttl,
            rtype: rtype.to_ascii_uppercase(),
            data: data.into(),
        }
    }
}

/// One zone: origin, serial and records (SOA and NS are generated from the origin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// Absolute, lower case, with the trailing dot: `cilium.io.`.
    pub origin: String,
    pub serial: u32,
    pub records: Vec<ZoneRecord>,
}

impl Zone {
    pub fn new(origin: &str) -> Self {
        Self {
            origin: normalize_fqdn(origin),
            serial: INITIAL_SERIAL,
            records: Vec::new(),
        }
    }

    fn with(mut self, owner: &str, ttl: u32, rtype: &str, data: impl Into<String>) -> Self {
        self.records.push(ZoneRecord::new(owner, ttl, rtype, data));
        self
    }

    /// File name knotd is told to load this zone from.
    pub fn file_name(&self) -> String {
        format!("{}zone", self.origin)
    }

    /// Whether `fqdn` (any case, trailing dot optional) is the origin or below it.
    pub fn contains(&self, fqdn: &str) -> bool {
        let name = normalize_fqdn(fqdn);
        name == self.origin || name.ends_with(&format!(".{}", self.origin))
    }

    /// Owner of `fqdn` relative to this zone (`@` for the apex), if the zone contains it.
    pub fn relative_owner(&self, fqdn: &str) -> Option<String> {
        let name = normalize_fqdn(fqdn);
        if name == self.origin {
            return Some("@".to_owned());
        }
        name.strip_suffix(&format!(".{}", self.origin))
            .map(str::to_owned)
    }

    /// Replaces the RRset (`owner`, `rtype`) with `values`; an empty `values` removes it.
    /// Does not touch the serial: the caller bumps it once per batch of changes.
    pub fn set_rrset(&mut self, owner: &str, rtype: &str, ttl: u32, values: &[String]) {
        let owner = owner.to_ascii_lowercase();
        let rtype = rtype.to_ascii_uppercase();
        // Keep the RRset where it was so the rendered file stays readable and diffable.
        let at = self
            .records
            .iter()
            .position(|r| r.owner.eq_ignore_ascii_case(&owner) && r.rtype == rtype)
            .unwrap_or(self.records.len());
        self.records
            .retain(|r| !(r.owner.eq_ignore_ascii_case(&owner) && r.rtype == rtype));
        let at = at.min(self.records.len());
        let new = values
            .iter()
            .map(|v| ZoneRecord::new(&owner, ttl, &rtype, v.clone()));
        self.records.splice(at..at, new);
    }

    /// The zone file text, with SOA and NS first.
    pub fn render(&self) -> String {
        let o = &self.origin;
        let mut s = String::new();
        // Writing to a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(s, "$ORIGIN {o}\n$TTL {DEFAULT_TTL}");
        let _ = writeln!(
            s,
            "@\t{DEFAULT_TTL}\tIN\tSOA\tns1.{o} hostmaster.{o} {} 3600 600 86400 {NEGATIVE_TTL}",
            self.serial
        );
        let _ = writeln!(s, "@\t{DEFAULT_TTL}\tIN\tNS\tns1.{o}");
        let _ = writeln!(s, "ns1\t{DEFAULT_TTL}\tIN\tA\t{NS_V4}");
        for r in &self.records {
            let _ = writeln!(s, "{}\t{}\tIN\t{}\t{}", r.owner, r.ttl, r.rtype, r.data);
        }
        s
    }
}

/// Lower case, trailing dot: the form zone origins and comparisons use.
pub fn normalize_fqdn(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    if lower.ends_with('.') {
        lower
    } else {
        format!("{lower}.")
    }
}

/// Zone-file values for an address list, split by family: (A values, AAAA values).
pub fn addr_values(addrs: &[IpAddr]) -> (Vec<String>, Vec<String>) {
    let v4 = addrs
        .iter()
        .filter(|a| a.is_ipv4())
        .map(ToString::to_string)
        .collect();
    let v6 = addrs
        .iter()
        .filter(|a| a.is_ipv6())
        .map(ToString::to_string)
        .collect();
    (v4, v6)
}

/// The zone in `zones` that holds `fqdn` (longest origin wins), with the relative owner.
pub fn find_zone_mut<'a>(zones: &'a mut [Zone], fqdn: &str) -> Result<(&'a mut Zone, String)> {
    let zone = zones
        .iter_mut()
        .filter(|z| z.contains(fqdn))
        .max_by_key(|z| z.origin.len())
        .with_context(|| format!("no lab zone contains {fqdn}"))?;
    let Some(owner) = zone.relative_owner(fqdn) else {
        bail!("{fqdn} is not below {}", zone.origin);
    };
    Ok((zone, owner))
}

/// The lab zones: `cilium.io.`, `google.com.`, `bbc.co.uk.` and `example.org.`.
pub fn lab_zones() -> Vec<Zone> {
    let mut cilium = Zone::new("cilium.io.")
        .with("@", DEFAULT_TTL, "A", CILIUM_IO_V4.to_string())
        .with("@", DEFAULT_TTL, "AAAA", CILIUM_IO_V6.to_string())
        .with("www", WWW_CILIUM_IO_TTL, "CNAME", "web.cilium.io.")
        .with("web", WEB_CILIUM_IO_TTL, "CNAME", "edge.cilium.io.");
    for ip in EDGE_CILIUM_IO_V4 {
        cilium = cilium.with("edge", EDGE_CILIUM_IO_TTL, "A", ip.to_string());
    }
    cilium = cilium
        .with("anysub", DEFAULT_TTL, "A", ANYSUB_CILIUM_IO_V4.to_string())
        .with("sub", DEFAULT_TTL, "A", SUB_CILIUM_IO_V4.to_string())
        .with(
            "subdomain",
            DEFAULT_TTL,
            "A",
            SUBDOMAIN_CILIUM_IO_V4.to_string(),
        )
        .with("a.b", DEFAULT_TTL, "A", A_B_CILIUM_IO_V4.to_string())
        .with(
            "_foobar._tcp",
            DEFAULT_TTL,
            "A",
            FOOBAR_TCP_CILIUM_IO_V4.to_string(),
        )
        .with("www2", DEFAULT_TTL, "A", WWW2_CILIUM_IO_V4.to_string());
    for ip in big_cilium_io_v4() {
        cilium = cilium.with("big", DEFAULT_TTL, "A", ip.to_string());
    }
    for txt in big_txt_strings() {
        cilium = cilium.with("big-txt", DEFAULT_TTL, "TXT", format!("\"{txt}\""));
    }

    let google = Zone::new("google.com.")
        .with("@", GOOGLE_COM_TTL, "A", GOOGLE_COM_V4.to_string())
        .with("@", GOOGLE_COM_TTL, "AAAA", GOOGLE_COM_V6.to_string())
        .with("www", DEFAULT_TTL, "A", WWW_GOOGLE_COM_V4.to_string());

    let bbc = Zone::new("bbc.co.uk.")
        .with("@", DEFAULT_TTL, "A", BBC_CO_UK_V4.to_string())
        .with("@", DEFAULT_TTL, "AAAA", BBC_CO_UK_V6.to_string());

    let example = Zone::new("example.org.")
        .with("@", DEFAULT_TTL, "A", EXAMPLE_ORG_V4.to_string())
        .with(
            "short",
            SHORT_EXAMPLE_ORG_TTL,
            "A",
            SHORT_EXAMPLE_ORG_V4.to_string(),
        );

    vec![cilium, google, bbc, example]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_zone_picks_owner_relative_to_origin() {
        let mut zones = lab_zones();
        let (zone, owner) = find_zone_mut(&mut zones, "A.B.Cilium.IO").unwrap();
        assert_eq!(zone.origin, "cilium.io.");
        assert_eq!(owner, "a.b");
        let (zone, owner) = find_zone_mut(&mut zones, "bbc.co.uk.").unwrap();
        assert_eq!((zone.origin.as_str(), owner.as_str()), ("bbc.co.uk.", "@"));
        assert!(find_zone_mut(&mut zones, "notcilium.io").is_err());
    }

    #[test]
    fn set_rrset_replaces_and_removes() {
        let mut zone = lab_zones().remove(0);
        zone.set_rrset("edge", "a", 30, &["198.18.1.99".to_owned()]);
        let edge: Vec<_> = zone.records.iter().filter(|r| r.owner == "edge").collect();
        assert_eq!(edge.len(), 1);
        assert_eq!((edge[0].ttl, edge[0].data.as_str()), (30, "198.18.1.99"));
        zone.set_rrset("edge", "A", 30, &[]);
        assert!(zone.records.iter().all(|r| r.owner != "edge"));
    }

    #[test]
    fn big_txt_exceeds_512_bytes() {
        let total: usize = big_txt_strings().iter().map(|s| s.len() + 1).sum();
        assert!(total > 512, "{total}");
        assert!(big_txt_strings().iter().all(|s| s.len() == BIG_TXT_LEN));
    }
}
