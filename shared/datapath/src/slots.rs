//! The redirect records as the egress program publishes them in `redirect_slots`, read from
//! this process's memory instead of one `bpf()` lookup of `redirect_records` per query.
//!
//! Every query through the eBPF datapath needs its redirect record (which cgroup asked, which
//! server it meant); the kernel's lookup copies key and value in and out and cost about a tenth
//! of the proxy's CPU per query. The egress program also writes each record into a slot of a
//! memory-mapped array (the hash and the sequence lock are in `bpf/warden.h`), before the packet
//! leaves; a proxy that has received the packet reads that slot here, between two equal even
//! sequence numbers. Three outcomes: the slot holds this client's record (found); the slot was
//! never written, so no record can exist for any key that hashes there (absent, without asking
//! the kernel); anything else (another key, a writer inside, a record older than a second):
//! ask the LRU map, which stays the authority.
//!
//! "Never written" proves an absence only while the program attached at the pinned egress link
//! is one that writes the slots: after a rollback to a build that does not, the slots go quiet
//! while the LRU map keeps filling. So a thread of its own checks every [`TRUST_CHECK_EVERY`]
//! (a handful of system calls, 35 to 80 µs, kept off the queries' path) that the program the
//! link runs is the one pinned beside the maps and that it uses this slots map; the slots are
//! used after two checks in a row found so, and only while the last such check is younger than
//! [`TRUST_LEASE_NS`], so that a watcher the machine does not run cannot stretch the trust. A
//! record written by an older program and still in flight when the new one was attached is
//! answered long before that.
//!
//! Only on 64-bit targets, where a relaxed 64-bit atomic load is a plain load (the mapping is
//! read-only); elsewhere the LRU map answers every lookup.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::abi::{
    REDIRECT_GOLDEN, REDIRECT_SLOT_BITS, REDIRECT_SLOT_WORDS, RawClientKey, RawRedirectRecord,
    RawSockaddr,
};
use crate::clock;
use crate::sys::{self, MappedWords};

/// How often the attached egress program is checked for writing the slots.
pub(crate) const TRUST_CHECK_EVERY: Duration = Duration::from_millis(100);
/// How long one check that found it vouches for the slots: two and a half check periods.
const TRUST_LEASE_NS: u64 = 250_000_000;
/// How far a record may seem to come from the future (clock reads on two CPUs).
const FUTURE_SLACK_NS: u64 = 10_000_000;
/// A slot's record older than this is not taken: while a client's packets flow, its slot's
/// stamp trails the latest of them by less than `WARDEN_REDIRECT_REFRESH_NS` (100 ms:
/// warden.h), so an older one is for a packet the proxy should have read long ago, or was left
/// by a program that no longer writes the slots.
const FRESH_FOR_NS: u64 = 1_000_000_000;

/// What a slot says about one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotRead {
    /// The client's record.
    Found(RawRedirectRecord),
    /// No record exists for the client.
    Absent,
    /// The slot cannot tell: ask the LRU map.
    Ask,
}

/// Where the checks look for the egress program.
#[derive(Debug)]
pub(crate) struct EgressPins {
    /// The pinned link of the egress hook.
    pub link: PathBuf,
    /// The program the loader last attached there, pinned.
    pub program: PathBuf,
}

/// The mapped slots of one pinned datapath.
#[derive(Debug)]
pub(crate) struct RedirectSlots {
    memory: MappedWords,
    trust: Arc<Trust>,
}

impl RedirectSlots {
    /// The slots in `memory`, trusted once the egress program is seen using the map `map_id`
    /// (checked by a thread that ends with the returned value).
    pub(crate) fn new(
        memory: MappedWords,
        map_id: u32,
        egress: EgressPins,
    ) -> std::io::Result<RedirectSlots> {
        let trust = Arc::new(Trust::default());
        let watched = Arc::downgrade(&trust);
        std::thread::Builder::new()
            .name("warden-slots".to_owned())
            .spawn(move || watch_egress(&watched, map_id, &egress))?;
        Ok(RedirectSlots { memory, trust })
    }

    /// The record of `key` as its slot has it, if the slots can be trusted at `now_ns` (boot
    /// ns).
    pub(crate) fn read(&self, key: &RawClientKey, now_ns: u64) -> SlotRead {
        decide(self.memory.words(), &self.trust, key, now_ns)
    }
}

/// What `key`'s slot in `words` says at `now_ns`, given the trust in the slots.
fn decide(words: &[AtomicU64], trust: &Trust, key: &RawClientKey, now_ns: u64) -> SlotRead {
    if !trust.trusted(now_ns) {
        return SlotRead::Ask;
    }
    match read_slot(words, key) {
        // Younger than a second, and not from the future beyond a clock's step: the same
        // clock (CLOCK_BOOTTIME) on both sides, unless a time namespace offsets ours.
        Slot::Found(record)
            if record.time_ns <= now_ns.saturating_add(FUTURE_SLACK_NS)
                && now_ns.saturating_sub(record.time_ns) < FRESH_FOR_NS =>
        {
            SlotRead::Found(record)
        }
        Slot::Empty => SlotRead::Absent,
        Slot::Found(_) | Slot::Other => SlotRead::Ask,
    }
}

/// Checks in a row that found the egress program writing the slots, and when the last did.
#[derive(Debug, Default)]
struct Trust {
    confirmations: AtomicU32,
    /// Boot ns of the last check that found it.
    confirmed_at: AtomicU64,
}

impl Trust {
    fn record(&self, writes_slots: bool, now_ns: u64) {
        if writes_slots {
            self.confirmed_at.store(now_ns, Ordering::Relaxed);
            let _ = self
                .confirmations
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add(1))
                });
        } else {
            self.confirmations.store(0, Ordering::Relaxed);
        }
    }

    fn trusted(&self, now_ns: u64) -> bool {
        self.confirmations.load(Ordering::Relaxed) >= 2
            && now_ns.saturating_sub(self.confirmed_at.load(Ordering::Relaxed)) < TRUST_LEASE_NS
    }
}

/// Checks the egress program every [`TRUST_CHECK_EVERY`] until the slots are dropped; says so
/// in the log when the answer changes.
fn watch_egress(trust: &Weak<Trust>, map_id: u32, egress: &EgressPins) {
    let mut last: Option<Result<(), String>> = None;
    loop {
        let check = egress_writes_slots(map_id, egress);
        let Some(trust) = trust.upgrade() else {
            return;
        };
        trust.record(check.is_ok(), clock::boot_now_ns());
        drop(trust);
        if last.as_ref() != Some(&check) {
            match &check {
                Ok(()) => tracing::debug!(
                    "the egress program writes the redirect slots: read from memory"
                ),
                Err(reason) => tracing::info!(
                    %reason,
                    "redirect records are looked up in the map, not read from the memory-mapped slots"
                ),
            }
            last = Some(check);
        }
        std::thread::sleep(TRUST_CHECK_EVERY);
    }
}

/// Whether the program attached at the pinned egress link is the pinned egress program and
/// uses the slots map; if not, why (the LRU map answers then).
fn egress_writes_slots(map_id: u32, egress: &EgressPins) -> Result<(), String> {
    let link = sys::obj_get(&egress.link)
        .map_err(|error| format!("egress link {}: {error}", egress.link.display()))?;
    let attached = match sys::cgroup_link_info(&link) {
        Ok(Some(info)) if info.cgroup_id != 0 => info.prog_id,
        Ok(_) => return Err(format!("egress link {} is defunct", egress.link.display())),
        Err(error) => return Err(format!("egress link {}: {error}", egress.link.display())),
    };
    let program = sys::obj_get(&egress.program)
        .map_err(|error| format!("egress program {}: {error}", egress.program.display()))?;
    let (pinned, maps) = sys::program_maps(&program)
        .map_err(|error| format!("egress program {}: {error}", egress.program.display()))?;
    if pinned != attached {
        return Err(format!(
            "the egress link runs program {attached}, not the one pinned at {} ({pinned}): \
             an older build's",
            egress.program.display()
        ));
    }
    if !maps.contains(&map_id) {
        return Err(format!(
            "the egress program {attached} does not write the redirect slots"
        ));
    }
    Ok(())
}

/// One slot as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Never written.
    Empty,
    /// Holds the key's record.
    Found(RawRedirectRecord),
    /// Holds another key, or was being written.
    Other,
}

/// The slot of `key` (`bpf/warden.h` has the same hash).
fn slot_of(key: &RawClientKey) -> usize {
    let mix = |h: u32, word: u32| (h ^ word).wrapping_mul(REDIRECT_GOLDEN);
    let h = key
        .addr
        .chunks_exact(4)
        .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
        .fold(0, mix);
    let h = mix(h, u32::from(key.port) | (u32::from(key.proto) << 16));
    (h >> (32 - REDIRECT_SLOT_BITS)) as usize
}

/// Copies `key`'s slot between two equal even sequence numbers (a sequence lock's reader).
fn read_slot(words: &[AtomicU64], key: &RawClientKey) -> Slot {
    let first = slot_of(key) * REDIRECT_SLOT_WORDS;
    let Some(slot) = words.get(first..first + REDIRECT_SLOT_WORDS) else {
        return Slot::Other;
    };
    // Relaxed, then a fence: the same as an acquiring load, and a plain load of read-only
    // memory, which is what Rust promises for atomics there.
    let seq = slot[0].load(Ordering::Relaxed);
    fence(Ordering::Acquire);
    if seq == 0 {
        return Slot::Empty;
    }
    if seq & 1 == 1 {
        return Slot::Other;
    }
    let mut copy = [0_u64; REDIRECT_SLOT_WORDS];
    for (word, value) in slot.iter().zip(copy.iter_mut()).skip(1) {
        *value = word.load(Ordering::Relaxed);
    }
    // The copy happened before the second look at the sequence number: if the number is
    // unchanged, no writer was inside meanwhile.
    fence(Ordering::Acquire);
    if slot[0].load(Ordering::Relaxed) != seq {
        return Slot::Other;
    }
    let addr = bytes16(copy[1], copy[2]);
    let ports = copy[3].to_ne_bytes();
    let port = u16::from_ne_bytes([ports[0], ports[1]]);
    if addr != key.addr || port != key.port || ports[2] != key.proto {
        return Slot::Other;
    }
    Slot::Found(RawRedirectRecord {
        cgroup_id: copy[4],
        time_ns: copy[5],
        orig: RawSockaddr {
            addr: bytes16(copy[6], copy[7]),
            port: u16::from_ne_bytes([ports[4], ports[5]]),
            family: ports[6],
            pad: 0,
        },
        pad: 0,
    })
}

fn bytes16(first: u64, second: u64) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&first.to_ne_bytes());
    bytes[8..].copy_from_slice(&second.to_ne_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::REDIRECT_SLOTS;

    /// The egress program's writer, word for word.
    fn publish(words: &[AtomicU64], key: &RawClientKey, record: &RawRedirectRecord) {
        publish_at(words, slot_of(key), key, record);
    }

    fn publish_at(
        words: &[AtomicU64],
        index: usize,
        key: &RawClientKey,
        record: &RawRedirectRecord,
    ) {
        let slot = &words[index * REDIRECT_SLOT_WORDS..][..REDIRECT_SLOT_WORDS];
        let seq = slot[0].load(Ordering::Relaxed);
        slot[0].store(seq + 1, Ordering::SeqCst);
        let split = |b: [u8; 16]| {
            let (first, second) = b.split_at(8);
            (
                u64::from_ne_bytes(first.try_into().unwrap()),
                u64::from_ne_bytes(second.try_into().unwrap()),
            )
        };
        let (a0, a1) = split(key.addr);
        let (o0, o1) = split(record.orig.addr);
        let mut ports = [0_u8; 8];
        ports[..2].copy_from_slice(&key.port.to_ne_bytes());
        ports[2] = key.proto;
        ports[4..6].copy_from_slice(&record.orig.port.to_ne_bytes());
        ports[6] = record.orig.family;
        for (index, value) in [
            a0,
            a1,
            u64::from_ne_bytes(ports),
            record.cgroup_id,
            record.time_ns,
            o0,
            o1,
        ]
        .into_iter()
        .enumerate()
        {
            slot[index + 1].store(value, Ordering::Relaxed);
        }
        slot[0].store(seq + 2, Ordering::SeqCst);
    }

    fn slots() -> Vec<AtomicU64> {
        (0..REDIRECT_SLOTS * REDIRECT_SLOT_WORDS)
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    fn key(last: u8, port: u16) -> RawClientKey {
        RawClientKey {
            addr: crate::abi::addr16([10, 0, 0, last].into()),
            port,
            proto: 17,
            pad: 0,
        }
    }

    fn record(cgroup_id: u64) -> RawRedirectRecord {
        RawRedirectRecord {
            cgroup_id,
            time_ns: 5,
            orig: RawSockaddr {
                addr: crate::abi::addr16([10, 96, 0, 10].into()),
                port: 53,
                family: 2,
                pad: 0,
            },
            pad: 0,
        }
    }

    #[test]
    fn a_published_record_reads_back_whole() {
        let words = slots();
        let client = key(7, 40_000);
        assert_eq!(read_slot(&words, &client), Slot::Empty);
        publish(&words, &client, &record(42));
        assert_eq!(read_slot(&words, &client), Slot::Found(record(42)));
        // Replaced by the next record for the same key.
        publish(&words, &client, &record(43));
        assert_eq!(read_slot(&words, &client), Slot::Found(record(43)));
    }

    #[test]
    fn another_key_in_the_slot_is_no_answer() {
        let words = slots();
        let client = key(7, 40_000);
        // Find a different key that hashes to the same slot.
        let other = (1..=u16::MAX)
            .map(|port| key(8, port))
            .find(|k| slot_of(k) == slot_of(&client))
            .expect("some port collides among 65,535");
        publish(&words, &other, &record(1));
        assert_eq!(read_slot(&words, &client), Slot::Other);
        // The same address and port over TCP is another key. (The hash never puts the two in
        // one slot, so the TCP record is written where the UDP key looks.)
        let tcp = RawClientKey { proto: 6, ..client };
        publish_at(&words, slot_of(&client), &tcp, &record(2));
        assert_eq!(read_slot(&words, &client), Slot::Other);
    }

    #[test]
    fn a_slot_being_written_is_no_answer() {
        let words = slots();
        let client = key(7, 40_000);
        publish(&words, &client, &record(42));
        let seq = &words[slot_of(&client) * REDIRECT_SLOT_WORDS];
        seq.fetch_add(1, Ordering::SeqCst);
        assert_eq!(read_slot(&words, &client), Slot::Other);
    }

    #[test]
    fn trusted_after_two_checks_in_a_row_until_one_fails_or_the_lease_ends() {
        let trust = Trust::default();
        let ms = |n: u64| n * 1_000_000;
        assert!(!trust.trusted(0));
        trust.record(true, ms(1_000));
        assert!(!trust.trusted(ms(1_000)), "one check is not enough");
        trust.record(true, ms(1_100));
        assert!(trust.trusted(ms(1_100)));
        trust.record(true, ms(1_200));
        assert!(trust.trusted(ms(1_449)));
        assert!(
            !trust.trusted(ms(1_450)),
            "a watcher not run for 250 ms ends the trust"
        );
        trust.record(false, ms(1_300));
        assert!(
            !trust.trusted(ms(1_300)),
            "a failed check ends the trust at once"
        );
        trust.record(true, ms(1_400));
        assert!(!trust.trusted(ms(1_400)));
        trust.record(true, ms(1_500));
        assert!(trust.trusted(ms(1_500)));
    }

    /// Trust as two checks at `now_ns` left it.
    fn trusted_at(now_ns: u64) -> Trust {
        let trust = Trust::default();
        trust.record(true, now_ns);
        trust.record(true, now_ns);
        trust
    }

    #[test]
    fn only_a_fresh_record_is_taken_and_nothing_without_trust() {
        let words = slots();
        let client = key(7, 40_000);
        let ns = |ms: u64| ms * 1_000_000;
        let mut young = record(42);
        young.time_ns = ns(100);
        publish(&words, &client, &young);
        let at = |now: u64| decide(&words, &trusted_at(now), &client, now);
        assert_eq!(at(ns(150)), SlotRead::Found(young));
        assert_eq!(at(ns(1_099)), SlotRead::Found(young));
        assert_eq!(at(ns(1_100)), SlotRead::Ask, "a second old");
        assert_eq!(at(ns(95)), SlotRead::Found(young), "within a clock step");
        assert_eq!(at(ns(50)), SlotRead::Ask, "from the future");
        let absent = key(7, 40_001);
        assert_eq!(
            decide(&words, &trusted_at(ns(150)), &absent, ns(150)),
            SlotRead::Absent
        );
        let untrusted = Trust::default();
        assert_eq!(decide(&words, &untrusted, &client, ns(150)), SlotRead::Ask);
        assert_eq!(
            decide(&words, &untrusted, &key(7, 40_001), ns(150)),
            SlotRead::Ask
        );
    }

    #[test]
    fn the_hash_spreads_ports_and_addresses() {
        // Ephemeral ports of one client, and one port of many clients, land in many slots.
        let by_port: std::collections::HashSet<usize> = (32_768..33_792)
            .map(|port| slot_of(&key(7, port)))
            .collect();
        assert!(
            by_port.len() > 900,
            "{} slots for 1,024 ports",
            by_port.len()
        );
        let by_address: std::collections::HashSet<usize> =
            (0..=255).map(|last| slot_of(&key(last, 53))).collect();
        assert!(
            by_address.len() > 200,
            "{} slots for 256 addresses",
            by_address.len()
        );
    }
}
