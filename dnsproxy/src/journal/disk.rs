//! The journal's file: a log of mappings added (each under its number) and removed (by
//! number) since the file was last written whole. A save appends what changed since the
//! previous one, one write and one fsync the size of the change: the journal holds up to 64
//! MiB while the agent is away, and was written whole four times a second. The file is
//! written whole again (temporary file, rename) once as many of its mappings are removed as
//! are left, so it stays within about twice what is held. Each record carries its length and
//! a CRC-32: a tail torn by a crash during an append is told from what came before it, which
//! is kept.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use warden_api::proto::Mapping;
use warden_state::StateError;

/// The file, in `state_dir`.
pub(super) const LOG_FILE: &str = "journal.log";

/// What builds before the log wrote: the journal whole, as one `Mappings` message. Read once
/// at start (an upgrade keeps what the previous build journaled), removed after the first
/// whole write.
pub(super) const LEGACY_FILE: &str = "journal.pb";

const MAGIC: &[u8; 8] = b"WJOURNL1";

/// Each record's length and CRC-32 (little-endian), ahead of its payload.
const RECORD_HEADER: usize = 8;

/// Below this a file is not written whole again for what it holds that was removed (unless
/// nothing is left in it): appending is cheaper than rewriting small files often.
const COMPACT_FROM_BYTES: u64 = 1 << 20;

/// Removals per record: a record stays well within what a read allocates at once.
const REMOVALS_PER_RECORD: usize = 8192;

/// A record's payload: a mapping added under `seq`, or the numbers of mappings removed.
#[derive(Clone, PartialEq, Message)]
struct Record {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(message, optional, tag = "2")]
    mapping: Option<Mapping>,
    #[prost(uint64, repeated, tag = "3")]
    removed: Vec<u64>,
}

/// A change to what the journal holds (waiting or sent and unconfirmed), to be written.
#[derive(Debug)]
pub(super) enum Change {
    Added(u64, Arc<Mapping>),
    Removed(u64),
}

/// What the file holds against what the journal holds: the changes since the last save, and
/// the sizes that say when to write it whole again (each mapping weighed as
/// [`warden_api::mapping_bytes`]). Locked after the journal's own locks, so that each change
/// is recorded in the order it was made.
#[derive(Debug)]
pub(super) struct FileLog {
    /// Oldest first. Not kept while a whole write is due: it writes everything.
    pending: Vec<Change>,
    /// Numbers from here on were given since the last save: removing one of them undoes an
    /// add still in `pending` (both are left out of the file).
    fresh_from: u64,
    /// What `pending` adds to the file and removes from it, those that undo each other left out.
    pending_added_bytes: u64,
    pending_removed_bytes: u64,
    /// Set at start (the file may be torn, or in the older format) and after a failed write
    /// (the file may now end in half a record).
    whole_due: bool,
    /// The file as written: the mappings it holds that the journal holds too, those it holds
    /// records of that were removed since, and its length.
    file_live_bytes: u64,
    file_dead_bytes: u64,
    file_bytes: u64,
    /// A file in the older format is in `state_dir`: removed at the next whole write.
    legacy_present: bool,
}

/// What a save writes, decided under the journal's locks and written outside them.
#[derive(Debug)]
pub(super) enum Plan {
    Nothing,
    /// Everything held, by number.
    Whole {
        held: Vec<(u64, Arc<Mapping>)>,
        remove_legacy: bool,
    },
    Append {
        changes: Vec<Change>,
        fresh_from: u64,
        added_bytes: u64,
        removed_bytes: u64,
    },
}

/// What a save wrote, for [`FileLog::settle`].
#[derive(Debug)]
pub(super) enum Written {
    Nothing,
    Whole {
        live_bytes: u64,
        bytes: u64,
        /// The older format's file is still there (it could not be removed).
        legacy_present: bool,
    },
    Appended {
        added_bytes: u64,
        removed_bytes: u64,
        bytes: u64,
    },
}

impl FileLog {
    /// The log of a journal whose next save writes the file whole; `legacy_present` says
    /// whether a file in the older format is to be removed then.
    pub(super) fn new(legacy_present: bool) -> FileLog {
        FileLog {
            pending: Vec::new(),
            fresh_from: 0,
            pending_added_bytes: 0,
            pending_removed_bytes: 0,
            whole_due: true,
            file_live_bytes: 0,
            file_dead_bytes: 0,
            file_bytes: 0,
            legacy_present,
        }
    }

    /// `mapping`, weighing `bytes`, joined the journal under `seq`.
    pub(super) fn added(&mut self, seq: u64, mapping: &Arc<Mapping>, bytes: usize) {
        if !self.whole_due {
            self.pending.push(Change::Added(seq, Arc::clone(mapping)));
            self.pending_added_bytes += bytes as u64;
        }
    }

    /// The mapping under `seq`, weighing `bytes`, left the journal.
    pub(super) fn removed(&mut self, seq: u64, bytes: usize) {
        if self.whole_due {
            return;
        }
        self.pending.push(Change::Removed(seq));
        if seq >= self.fresh_from {
            self.pending_added_bytes = self.pending_added_bytes.saturating_sub(bytes as u64);
        } else {
            self.pending_removed_bytes += bytes as u64;
        }
    }

    /// What the next save writes; `next_seq` is the number the journal gives next, `held`
    /// everything it holds (asked for only when the file is to be written whole).
    pub(super) fn plan(
        &mut self,
        next_seq: u64,
        held: impl FnOnce() -> Vec<(u64, Arc<Mapping>)>,
    ) -> Plan {
        let fresh_from = std::mem::replace(&mut self.fresh_from, next_seq);
        let (added_bytes, removed_bytes) = (
            std::mem::take(&mut self.pending_added_bytes),
            std::mem::take(&mut self.pending_removed_bytes),
        );
        let changes = std::mem::take(&mut self.pending);
        if self.whole_due || self.compaction_due(added_bytes, removed_bytes) {
            self.whole_due = false;
            return Plan::Whole {
                held: held(),
                remove_legacy: self.legacy_present,
            };
        }
        if changes.is_empty() {
            return Plan::Nothing;
        }
        Plan::Append {
            changes,
            fresh_from,
            added_bytes,
            removed_bytes,
        }
    }

    /// Whether, with what is pending appended, the file would hold records of removed
    /// mappings weighing as much as the live ones, and be large enough for that to matter (a
    /// small file costs less appended to than renamed over).
    fn compaction_due(&self, added_bytes: u64, removed_bytes: u64) -> bool {
        let dead = self.file_dead_bytes + removed_bytes;
        let live = (self.file_live_bytes + added_bytes).saturating_sub(removed_bytes);
        dead > 0 && dead >= live && self.file_bytes >= COMPACT_FROM_BYTES
    }

    /// The length of the file as last written.
    pub(super) fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Takes in what a save wrote; after a failure the next save writes the file whole (it may
    /// end in half a record, and what this one was to write is not in it).
    pub(super) fn settle(&mut self, written: &Result<Written, StateError>) {
        match written {
            Ok(Written::Nothing) => {}
            Ok(Written::Whole {
                live_bytes,
                bytes,
                legacy_present,
            }) => {
                self.file_live_bytes = *live_bytes;
                self.file_dead_bytes = 0;
                self.file_bytes = *bytes;
                self.legacy_present = *legacy_present;
            }
            Ok(Written::Appended {
                added_bytes,
                removed_bytes,
                bytes,
            }) => {
                self.file_live_bytes =
                    (self.file_live_bytes + added_bytes).saturating_sub(*removed_bytes);
                self.file_dead_bytes += removed_bytes;
                self.file_bytes += bytes;
            }
            Err(_) => {
                self.whole_due = true;
                self.pending.clear();
                self.pending_added_bytes = 0;
                self.pending_removed_bytes = 0;
            }
        }
    }
}

impl Plan {
    /// Writes what was planned into `state_dir`: blocks (fsync).
    pub(super) fn write(self, state_dir: &Path) -> Result<Written, StateError> {
        let path = log_file(state_dir);
        match self {
            Plan::Nothing => Ok(Written::Nothing),
            Plan::Whole {
                held,
                remove_legacy,
            } => {
                let mut bytes = Vec::with_capacity(
                    MAGIC.len()
                        + held
                            .iter()
                            .map(|(_, mapping)| mapping.encoded_len() + 24)
                            .sum::<usize>(),
                );
                bytes.extend_from_slice(MAGIC);
                for (seq, mapping) in &held {
                    put_added(&mut bytes, *seq, mapping);
                }
                warden_state::write_atomically(&path, &bytes)?;
                let live_bytes = held
                    .iter()
                    .map(|(_, mapping)| warden_api::mapping_bytes(mapping) as u64)
                    .sum();
                Ok(Written::Whole {
                    live_bytes,
                    bytes: bytes.len() as u64,
                    legacy_present: remove_legacy && !remove_legacy_file(state_dir),
                })
            }
            Plan::Append {
                changes,
                fresh_from,
                added_bytes,
                removed_bytes,
            } => {
                let undone: HashSet<u64> = changes
                    .iter()
                    .filter_map(|change| match change {
                        Change::Removed(seq) if *seq >= fresh_from => Some(*seq),
                        _ => None,
                    })
                    .collect();
                let mut bytes = Vec::new();
                let mut gone = Vec::new();
                for change in &changes {
                    match change {
                        Change::Added(seq, mapping) if !undone.contains(seq) => {
                            put_added(&mut bytes, *seq, mapping);
                        }
                        Change::Removed(seq) if *seq < fresh_from => gone.push(*seq),
                        _ => {}
                    }
                }
                for run in gone.chunks(REMOVALS_PER_RECORD) {
                    put_removed(&mut bytes, run);
                }
                if !bytes.is_empty() {
                    append(&path, &bytes)?;
                }
                Ok(Written::Appended {
                    added_bytes,
                    removed_bytes,
                    bytes: bytes.len() as u64,
                })
            }
        }
    }
}

fn append(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_data()
        })
        .map_err(|source| StateError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Removes the older format's file, now that the log holds what it held; says whether it is
/// gone (if not, the next whole write tries again, and a start reads only the newer of the
/// two).
fn remove_legacy_file(state_dir: &Path) -> bool {
    let legacy = state_dir.join(LEGACY_FILE);
    match std::fs::remove_file(&legacy) {
        Ok(()) => {
            tracing::info!(file = %legacy.display(), "journal now kept as a log; the older file is removed");
            true
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => true,
        Err(error) => {
            tracing::warn!(file = %legacy.display(), %error, "cannot remove the older journal file");
            false
        }
    }
}

fn put_added(bytes: &mut Vec<u8>, seq: u64, mapping: &Mapping) {
    put_record(bytes, |payload| {
        prost::encoding::uint64::encode(1, &seq, payload);
        prost::encoding::message::encode(2, mapping, payload);
    });
}

fn put_removed(bytes: &mut Vec<u8>, seqs: &[u64]) {
    put_record(bytes, |payload| {
        prost::encoding::uint64::encode_packed(3, seqs, payload);
    });
}

fn put_record(bytes: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = bytes.len();
    bytes.extend_from_slice(&[0; RECORD_HEADER]);
    payload(bytes);
    let body = &bytes[start + RECORD_HEADER..];
    let Ok(length) = u32::try_from(body.len()) else {
        // A mapping of 4 GiB: never sent by an upstream, and beyond what the journal holds.
        tracing::warn!(
            bytes = body.len(),
            "a journal record too large for its file left out"
        );
        bytes.truncate(start);
        return;
    };
    let crc = crc32fast::hash(body);
    bytes[start..start + 4].copy_from_slice(&length.to_le_bytes());
    bytes[start + 4..start + RECORD_HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// What a journal file held, by number, and whether it ended cleanly.
#[derive(Debug, Default)]
pub(super) struct Read {
    pub held: BTreeMap<u64, Mapping>,
    pub damage: Option<Damage>,
}

/// Where a file stopped making sense; what came before is kept. Which of the two it is, is a
/// guess (a length damaged in the middle of the file also runs past its end): either way the
/// file is set aside, and what came before written whole.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Damage {
    /// It ends inside a record, or in zeros: likely a crash or power loss during an append.
    TornTail { at: usize },
    /// A record whose checksum or content is wrong: the disk, or someone else's writes.
    BadRecord { at: usize },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::TornTail { at } => write!(formatter, "ends inside a record at byte {at}"),
            Damage::BadRecord { at } => write!(formatter, "holds a bad record at byte {at}"),
        }
    }
}

/// Reads a journal file; `None` when it is not one (no header).
pub(super) fn read(bytes: &[u8]) -> Option<Read> {
    let mut rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let mut read = Read::default();
    while !rest.is_empty() {
        let at = bytes.len() - rest.len();
        let Some((header, after)) = rest.split_first_chunk::<RECORD_HEADER>() else {
            read.damage = Some(Damage::TornTail { at });
            break;
        };
        let [l0, l1, l2, l3, c0, c1, c2, c3] = *header;
        let length = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        // No record is empty; zeros (whose CRC-32 is zero) are what a power loss can leave
        // where an append had room made for it.
        if length == 0 {
            read.damage = Some(if rest.iter().all(|byte| *byte == 0) {
                Damage::TornTail { at }
            } else {
                Damage::BadRecord { at }
            });
            break;
        }
        let Some((body, after)) = after.split_at_checked(length) else {
            read.damage = Some(Damage::TornTail { at });
            break;
        };
        let record = match Record::decode(body) {
            Ok(record) if crc32fast::hash(body) == crc => record,
            _ => {
                read.damage = Some(Damage::BadRecord { at });
                break;
            }
        };
        match record.mapping {
            Some(mapping) => {
                read.held.insert(record.seq, mapping);
            }
            None => {
                for seq in record.removed {
                    read.held.remove(&seq);
                }
            }
        }
        rest = after;
    }
    Some(read)
}

/// The path of the log in `state_dir`.
pub(super) fn log_file(state_dir: &Path) -> PathBuf {
    state_dir.join(LOG_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(name: &str) -> Arc<Mapping> {
        Arc::new(Mapping {
            endpoint: "youssef/test".into(),
            name: name.into(),
            ips: vec!["198.18.0.7".into()],
            ..Mapping::default()
        })
    }

    fn names(read: &Read) -> Vec<&str> {
        read.held.values().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn records_read_back_as_written() {
        let mut bytes = MAGIC.to_vec();
        put_added(&mut bytes, 1, &mapping("a."));
        put_added(&mut bytes, 2, &mapping("b."));
        put_added(&mut bytes, 3, &mapping("c."));
        put_removed(&mut bytes, &[1, 3, 99]);
        let read = read(&bytes).unwrap();
        assert_eq!(names(&read), ["b."]);
        assert_eq!(read.held[&2], *mapping("b."));
        assert_eq!(read.damage, None);
    }

    #[test]
    fn a_torn_tail_keeps_what_came_before() {
        let mut bytes = MAGIC.to_vec();
        put_added(&mut bytes, 1, &mapping("a."));
        let whole = bytes.len();
        put_added(&mut bytes, 2, &mapping("b."));
        for cut in [whole + 3, whole + RECORD_HEADER + 2, bytes.len() - 1] {
            let read = read(&bytes[..cut]).unwrap();
            assert_eq!(names(&read), ["a."], "cut at {cut}");
            assert_eq!(read.damage, Some(Damage::TornTail { at: whole }));
        }
    }

    #[test]
    fn a_bad_record_stops_the_read_there() {
        let mut bytes = MAGIC.to_vec();
        put_added(&mut bytes, 1, &mapping("a."));
        let whole = bytes.len();
        put_added(&mut bytes, 2, &mapping("b."));
        put_added(&mut bytes, 3, &mapping("c."));
        let last = bytes.len() - 1;
        bytes[whole + RECORD_HEADER + 4] ^= 0x20;
        bytes[last] ^= 0x01;
        let read = read(&bytes).unwrap();
        assert_eq!(names(&read), ["a."]);
        assert_eq!(read.damage, Some(Damage::BadRecord { at: whole }));
        assert!(super::read(b"not a journal").is_none());

        // Zeros where a record should be: a tail a power loss left, or damage before more.
        let mut zeros = bytes[..whole].to_vec();
        zeros.extend_from_slice(&[0; 40]);
        let read = super::read(&zeros).unwrap();
        assert_eq!(names(&read), ["a."]);
        assert_eq!(read.damage, Some(Damage::TornTail { at: whole }));
        zeros.push(1);
        assert_eq!(
            super::read(&zeros).unwrap().damage,
            Some(Damage::BadRecord { at: whole })
        );
    }

    /// A log whose file was just written whole: `live_bytes` of mappings numbered up to
    /// `held`, in a file of `bytes`.
    fn log_after_whole_write(held: u64, live_bytes: u64, bytes: u64) -> FileLog {
        let mut log = FileLog::new(false);
        assert!(matches!(log.plan(held + 1, Vec::new), Plan::Whole { .. }));
        log.settle(&Ok(Written::Whole {
            live_bytes,
            bytes,
            legacy_present: false,
        }));
        log
    }

    #[test]
    fn an_add_undone_before_the_save_is_not_written() {
        let mut log = log_after_whole_write(1, 10, 100);
        log.added(2, &mapping("b."), 10);
        log.added(3, &mapping("c."), 10);
        log.removed(2, 10);
        log.removed(1, 10);
        let plan = log.plan(4, Vec::new);
        let Plan::Append {
            fresh_from,
            added_bytes,
            removed_bytes,
            ..
        } = &plan
        else {
            panic!("an append was due");
        };
        assert_eq!((*fresh_from, *added_bytes, *removed_bytes), (2, 10, 10));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            log_file(dir.path()),
            [MAGIC.as_slice(), &record_of(1, "a.")].concat(),
        )
        .unwrap();
        let Ok(Written::Appended { bytes, .. }) = plan.write(dir.path()) else {
            panic!("the append failed");
        };
        let on_disk = std::fs::read(log_file(dir.path())).unwrap();
        let read = read(&on_disk).unwrap();
        assert_eq!(names(&read), ["c."]);
        let one_add = record_of(3, "c.").len() as u64;
        assert!(bytes < one_add + 16, "only c. and one removal: {bytes}");
    }

    fn record_of(seq: u64, name: &str) -> Vec<u8> {
        let mut bytes = Vec::new();
        put_added(&mut bytes, seq, &mapping(name));
        bytes
    }

    /// Weighed in bytes, not counted: a few wide mappings removed outweigh many narrow ones
    /// left, and a file of them is mostly dead.
    #[test]
    fn the_file_is_written_whole_once_it_holds_as_much_removed_as_live() {
        let mut log = log_after_whole_write(10, 1000, 2 * COMPACT_FROM_BYTES);
        for seq in 1..=4 {
            log.removed(seq, 100);
        }
        assert!(matches!(log.plan(11, Vec::new), Plan::Append { .. }));
        log.settle(&Ok(Written::Appended {
            added_bytes: 0,
            removed_bytes: 400,
            bytes: 20,
        }));
        log.removed(5, 100);
        assert!(
            matches!(log.plan(11, Vec::new), Plan::Whole { .. }),
            "500 of 1000 bytes removed"
        );
        // One wide mapping of 5,000 bytes among 500 narrow ones of 10: removed, it is half
        // the file, though one mapping in 501.
        log.settle(&Ok(Written::Whole {
            live_bytes: 10_000,
            bytes: 2 * COMPACT_FROM_BYTES,
            legacy_present: false,
        }));
        log.removed(6, 10);
        assert!(matches!(log.plan(11, Vec::new), Plan::Append { .. }));
        log.settle(&Ok(Written::Appended {
            added_bytes: 0,
            removed_bytes: 10,
            bytes: 10,
        }));
        log.removed(7, 5_000);
        assert!(
            matches!(log.plan(11, Vec::new), Plan::Whole { .. }),
            "one wide mapping outweighs the rest"
        );

        // A small file is appended to, even with nothing live left in it.
        let mut small = log_after_whole_write(2, 20, 200);
        small.removed(1, 10);
        small.removed(2, 10);
        assert!(matches!(small.plan(3, Vec::new), Plan::Append { .. }));
    }

    #[test]
    fn a_failed_write_makes_the_next_save_whole() {
        let mut log = log_after_whole_write(1, 10, 100);
        log.added(2, &mapping("b."), 10);
        let plan = log.plan(3, Vec::new);
        let written = plan.write(Path::new("/nonexistent/warden-journal-test"));
        assert!(written.is_err());
        log.settle(&written);
        log.added(3, &mapping("c."), 10);
        assert!(
            log.pending.is_empty(),
            "not kept: everything is written next"
        );
        assert!(matches!(log.plan(4, Vec::new), Plan::Whole { .. }));
    }
}
