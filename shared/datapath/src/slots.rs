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
//! while the LRU map keeps filling. So a thread of its own checks that link's program every
//! [`TRUST_CHECK_EVERY`] (a handful of system calls, 35 to 80 µs, kept off the queries' path),
//! and the slots are used only after two checks in a row found it writing them; a record written
//! by the old program and still in flight when the new one was attached is then long answered.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::abi::{
    REDIRECT_GOLDEN, REDIRECT_SLOT_BITS, REDIRECT_SLOT_WORDS, RawClientKey, RawRedirectRecord,
    RawSockaddr,
};
use crate::sys::{self, MappedWords};

/// How often the attached egress program is checked for writing the slots.
pub(crate) const TRUST_CHECK_EVERY: Duration = Duration::from_millis(100);
/// A slot's record older than this is not taken: every redirected packet refreshes its slot on
/// its way out, so an older one is for a packet the proxy should have read long ago, or was
/// left by a program that no longer writes the slots.
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

/// The mapped slots of one pinned datapath.
#[derive(Debug)]
pub(crate) struct RedirectSlots {
    memory: MappedWords,
    trust: Arc<Trust>,
}

impl RedirectSlots {
    /// The slots in `memory`, trusted once the program at `egress_link` is seen using the map
    /// `map_id` (checked by a thread that ends with the returned value).
    pub(crate) fn new(
        memory: MappedWords,
        map_id: u32,
        egress_link: PathBuf,
    ) -> std::io::Result<RedirectSlots> {
        let trust = Arc::new(Trust::default());
        let watched = Arc::downgrade(&trust);
        std::thread::Builder::new()
            .name("warden-slots".to_owned())
            .spawn(move || watch_egress(&watched, map_id, &egress_link))?;
        Ok(RedirectSlots { memory, trust })
    }

    /// The record of `key` as its slot has it, if the slots can be trusted now.
    pub(crate) fn read(&self, key: &RawClientKey, now_ns: u64) -> SlotRead {
        if !self.trust.trusted() {
            return SlotRead::Ask;
        }
        match read_slot(self.memory.words(), key) {
            Slot::Found(record) if now_ns.saturating_sub(record.time_ns) < FRESH_FOR_NS => {
                SlotRead::Found(record)
            }
            Slot::Empty => SlotRead::Absent,
            Slot::Found(_) | Slot::Other => SlotRead::Ask,
        }
    }
}

/// Checks in a row that found the egress program writing the slots.
#[derive(Debug, Default)]
struct Trust {
    confirmations: AtomicU32,
}

impl Trust {
    fn record(&self, writes_slots: bool) {
        if writes_slots {
            let _ = self
                .confirmations
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add(1))
                });
        } else {
            self.confirmations.store(0, Ordering::Relaxed);
        }
    }

    fn trusted(&self) -> bool {
        self.confirmations.load(Ordering::Relaxed) >= 2
    }
}

/// Checks the egress program every [`TRUST_CHECK_EVERY`] until the slots are dropped.
fn watch_egress(trust: &Weak<Trust>, map_id: u32, egress_link: &std::path::Path) {
    loop {
        let writes = egress_writes_slots(map_id, egress_link);
        match trust.upgrade() {
            Some(trust) => trust.record(writes),
            None => return,
        }
        std::thread::sleep(TRUST_CHECK_EVERY);
    }
}

/// Whether the program attached at the pinned egress link uses the slots map. Any failure (no
/// link, a defunct one, an unreadable program) says no: the LRU map answers then.
fn egress_writes_slots(map_id: u32, egress_link: &std::path::Path) -> bool {
    let Ok(link) = sys::obj_get(egress_link) else {
        return false;
    };
    match sys::cgroup_link_info(&link) {
        Ok(Some(info)) if info.cgroup_id != 0 => {
            sys::program_map_ids(info.prog_id).is_ok_and(|ids| ids.contains(&map_id))
        }
        _ => false,
    }
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
    let seq = slot[0].load(Ordering::Acquire);
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
        let slot = &words[slot_of(key) * REDIRECT_SLOT_WORDS..][..REDIRECT_SLOT_WORDS];
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
        // Same address and port over TCP is another key too.
        let tcp = RawClientKey { proto: 6, ..other };
        assert_ne!(read_slot(&words, &tcp), Slot::Found(record(1)));
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
    fn trusted_after_two_checks_in_a_row_until_one_fails() {
        let trust = Trust::default();
        assert!(!trust.trusted());
        trust.record(true);
        assert!(!trust.trusted(), "one check is not enough");
        trust.record(true);
        assert!(trust.trusted());
        trust.record(true);
        assert!(trust.trusted());
        trust.record(false);
        assert!(!trust.trusted(), "a failed check ends the trust at once");
        trust.record(true);
        assert!(!trust.trusted());
        trust.record(true);
        assert!(trust.trusted());
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
