//! Mappings the agent has not received yet: bounded, oldest dropped first (and counted), and
//! kept in `state_dir` so that a proxy killed while the agent is away still hands them over.
//! Those a session's resync replays stay in the file until the agent's `ResyncDone` says it
//! has them (it sends it after reading everything the proxy sent before its own), and those a
//! live session sends until the agent's `Received`: a proxy killed meanwhile hands them over
//! again next time, rather than losing them. [`disk`] keeps the file: each save appends what
//! changed since the last.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message;
use tokio::sync::Notify;
use warden_api::proto::{Mapping, Mappings};
use warden_proxy::SharedCache;
use warden_telemetry::PeerMetrics;

mod disk;
use disk::FileLog;

/// The number in flight of what a resync's replay took (confirmed by the agent's `ResyncDone`);
/// what a live session sends is numbered from 1.
const REPLAYED: u64 = 0;

/// The most the journal holds, in the bytes its mappings take on the wire (about what they take
/// in memory and in its file), whatever `journal_max` allows: a mapping may carry a thousand
/// addresses, and 100,000 such would be gigabytes. The oldest go first, counted as dropped.
pub const JOURNAL_MAX_BYTES: usize = 64 << 20;

/// A mapping held, under the number its record in the file has.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    mapping: Arc<Mapping>,
}

impl Entry {
    /// Its number and weight, for the file to forget it by.
    fn gone(&self) -> (u64, usize) {
        (self.seq, warden_api::mapping_bytes(&self.mapping))
    }
}

/// The journal's mappings and the bytes they take, kept together. Shared (`Arc`), so that a
/// save copies pointers under the lock the answer path pushes through.
#[derive(Debug)]
struct Queue {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// The number the next mapping pushed is given: they only grow, so the oldest has the
    /// lowest, and the file restores them in order.
    next_seq: u64,
}

impl Queue {
    fn new(next_seq: u64) -> Queue {
        Queue {
            entries: VecDeque::new(),
            bytes: 0,
            next_seq,
        }
    }

    /// Returns the number given and what the mapping weighs.
    fn push_back(&mut self, mapping: Arc<Mapping>) -> (u64, usize) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        let bytes = warden_api::mapping_bytes(&mapping);
        self.bytes += bytes;
        self.entries.push_back(Entry { seq, mapping });
        (seq, bytes)
    }

    /// A mapping read from the file, under the number it had there (given in order).
    fn push_held(&mut self, seq: u64, mapping: Arc<Mapping>) {
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
        self.bytes += warden_api::mapping_bytes(&mapping);
        self.entries.push_back(Entry { seq, mapping });
    }

    fn push_front(&mut self, entry: Entry) {
        self.bytes += warden_api::mapping_bytes(&entry.mapping);
        self.entries.push_front(entry);
    }

    /// The oldest `count`, taken out.
    fn take_front(&mut self, count: usize) -> Vec<Entry> {
        let taken: Vec<Entry> = self
            .entries
            .drain(..count.min(self.entries.len()))
            .collect();
        let bytes: usize = taken
            .iter()
            .map(|entry| warden_api::mapping_bytes(&entry.mapping))
            .sum();
        self.bytes = self.bytes.saturating_sub(bytes);
        taken
    }

    /// Drops what `matches` holds for; returns what went ([`Entry::gone`]).
    fn remove_matching(&mut self, mut matches: impl FnMut(&Mapping) -> bool) -> Vec<(u64, usize)> {
        let mut removed = Vec::new();
        self.entries.retain(|entry| {
            let remove = matches(&entry.mapping);
            if remove {
                removed.push(entry.gone());
            }
            !remove
        });
        if !removed.is_empty() {
            self.bytes = self
                .entries
                .iter()
                .map(|entry| warden_api::mapping_bytes(&entry.mapping))
                .sum();
        }
        removed
    }

    /// Drops the oldest until at most `capacity` mappings and [`JOURNAL_MAX_BYTES`] are held;
    /// returns what went ([`Entry::gone`]).
    fn bound(&mut self, capacity: usize) -> Vec<(u64, usize)> {
        let mut dropped = Vec::new();
        while self.entries.len() > capacity || self.bytes > JOURNAL_MAX_BYTES {
            let Some(entry) = self.entries.pop_front() else {
                break;
            };
            let gone = entry.gone();
            self.bytes = self.bytes.saturating_sub(gone.1);
            dropped.push(gone);
        }
        dropped
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Taken for a resync's replay ([`REPLAYED`]) or sent by a live session under `number`, and
/// not yet confirmed by the agent.
#[derive(Debug)]
struct InFlight {
    number: u64,
    entry: Entry,
}

/// What is in flight, with the count and weight of what live sessions sent (numbered) kept as
/// it changes: a session checks them at every batch, and with an agent of an older build, which
/// confirms nothing, they reach the journal's bounds (a walk of 100,000 entries per batch).
#[derive(Debug, Default)]
struct InFlightTable {
    entries: Vec<InFlight>,
    numbered: usize,
    numbered_bytes: usize,
}

impl InFlightTable {
    fn iter(&self) -> std::slice::Iter<'_, InFlight> {
        self.entries.iter()
    }

    fn push(&mut self, sent: InFlight) {
        if sent.number != REPLAYED {
            self.numbered += 1;
            self.numbered_bytes += warden_api::mapping_bytes(&sent.entry.mapping);
        }
        self.entries.push(sent);
    }

    /// Takes out what `remove` holds for; their numbers and weights, for the file.
    fn remove_where(&mut self, mut remove: impl FnMut(&InFlight) -> bool) -> Vec<(u64, usize)> {
        let mut gone = Vec::new();
        let (numbered, numbered_bytes) = (&mut self.numbered, &mut self.numbered_bytes);
        self.entries.retain(|sent| {
            if !remove(sent) {
                return true;
            }
            let (seq, bytes) = sent.entry.gone();
            if sent.number != REPLAYED {
                *numbered -= 1;
                *numbered_bytes = numbered_bytes.saturating_sub(bytes);
            }
            gone.push((seq, bytes));
            false
        });
        gone
    }

    /// The oldest sent entries past `capacity` entries or `max_bytes`, out.
    fn forget_oldest_sent(&mut self, capacity: usize, max_bytes: usize) -> Vec<(u64, usize)> {
        let (mut count, mut bytes) = (self.numbered, self.numbered_bytes);
        if count <= capacity && bytes <= max_bytes {
            return Vec::new();
        }
        self.remove_where(|sent| {
            let forget = sent.number != REPLAYED && (count > capacity || bytes > max_bytes);
            if forget {
                count -= 1;
                bytes = bytes.saturating_sub(warden_api::mapping_bytes(&sent.entry.mapping));
            }
            forget
        })
    }

    fn take_all(&mut self) -> Vec<InFlight> {
        self.numbered = 0;
        self.numbered_bytes = 0;
        std::mem::take(&mut self.entries)
    }
}

#[derive(Debug)]
pub struct Journal {
    queue: Mutex<Queue>,
    /// Kept in the file with the queue, and put back when the session ends.
    /// Locked before `queue` wherever both are, and `file` after both: a save between taking
    /// entries and marking them in flight would write a file without them.
    in_flight: Mutex<InFlightTable>,
    /// The changes the file has not had yet.
    file: Mutex<FileLog>,
    /// One save at a time: each appends to what the one before wrote.
    saving: Mutex<()>,
    capacity: usize,
    metrics: PeerMetrics,
    /// Bumped on every change; the persister writes when it moved.
    changes: AtomicU64,
    /// Woken by every push: a live session hands what it journaled to the agent.
    pushed: Notify,
    /// Whether the agent confirms what it takes: an agent of a build before confirmations
    /// never does, and what it was sent past the bounds is no loss to count.
    agent_confirms: AtomicBool,
}

impl Journal {
    pub fn new(capacity: usize, metrics: PeerMetrics) -> Journal {
        Journal::holding(Vec::new(), false, false, capacity, metrics)
    }

    /// `held` (by number, oldest first), its file to be written whole at the first save; at
    /// the persister's first round if `rewrite` (it moves [`Self::changes`]).
    fn holding(
        held: Vec<(u64, Mapping)>,
        legacy_present: bool,
        rewrite: bool,
        capacity: usize,
        metrics: PeerMetrics,
    ) -> Journal {
        let mut queue = Queue::new(1);
        for (seq, mapping) in held {
            queue.push_held(seq, Arc::new(mapping));
        }
        let capacity = capacity.max(1);
        // The file is written whole at the first save: what goes now needs no record.
        let dropped = queue.bound(capacity);
        if !dropped.is_empty() {
            metrics.journal_dropped.inc_by(dropped.len() as u64);
        }
        metrics.journal_entries.set(gauge(queue.len()));
        Journal {
            queue: Mutex::new(queue),
            in_flight: Mutex::new(InFlightTable::default()),
            file: Mutex::new(FileLog::new(legacy_present)),
            saving: Mutex::new(()),
            capacity,
            metrics,
            changes: AtomicU64::new(u64::from(rewrite)),
            pushed: Notify::new(),
            agent_confirms: AtomicBool::new(false),
        }
    }

    /// The journal a previous run left in `state_dir`, if any: its log, or the file of a build
    /// before the log if that is the newer of the two (a downgrade since left the log stale;
    /// the other way round, the older file is one that could not be removed; equal times read
    /// the log). A damaged log is copied aside and left in place; what it held before the
    /// damage is written whole over it at the persister's first round, as is a journal in the
    /// older format, whether or not anything changes (a proxy killed before then reads the
    /// same again).
    pub fn open(state_dir: &Path, capacity: usize, metrics: PeerMetrics) -> Journal {
        let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let legacy_time = modified(&state_dir.join(disk::LEGACY_FILE));
        let log_time = modified(&disk::log_file(state_dir));
        let legacy_newer = match (legacy_time, log_time) {
            (Some(legacy), Some(log)) => legacy > log,
            (legacy, _) => legacy.is_some(),
        };
        let (held, damaged) = if legacy_newer {
            let held = (1..)
                .zip(read_legacy(state_dir).unwrap_or_default())
                .collect();
            (held, false)
        } else {
            read_log(state_dir)
        };
        let legacy_present = legacy_time.is_some();
        Journal::holding(
            held,
            legacy_present,
            damaged || legacy_present,
            capacity,
            metrics,
        )
    }

    /// A counter that moves whenever the journal changes.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Brings the journal's file in `state_dir` up to date: appends what changed since the last
    /// save (one write and one fsync), or writes it whole (temporary file, fsync, rename) at the
    /// first save, after a failed one, and once the file is past 1 MiB and what was removed
    /// weighs as much as what is left. Only
    /// pointers are copied under the locks the answer path pushes through; blocks.
    pub fn save(&self, state_dir: &Path) -> Result<(), warden_state::StateError> {
        let _one_at_a_time = self
            .saving
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let plan = {
            let in_flight = self.in_flight();
            let queue = self.queue();
            self.file().plan(queue.next_seq, || {
                let mut held: Vec<(u64, Arc<Mapping>)> = in_flight
                    .iter()
                    .map(|sent| (sent.entry.seq, Arc::clone(&sent.entry.mapping)))
                    .collect();
                held.extend(
                    queue
                        .entries
                        .iter()
                        .map(|entry| (entry.seq, Arc::clone(&entry.mapping))),
                );
                held
            })
        };
        let written = plan.write(state_dir);
        let mut file = self.file();
        file.settle(&written);
        self.metrics
            .journal_file_bytes
            .set(i64::try_from(file.file_bytes()).unwrap_or(i64::MAX));
        drop(file);
        written.map(|_| ())
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn in_flight(&self) -> MutexGuard<'_, InFlightTable> {
        self.in_flight
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn file(&self) -> MutexGuard<'_, FileLog> {
        self.file
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// `gone` (numbers and weights) left the journal (dropped, confirmed, cleaned): the file
    /// forgets them at the next save. Called with the lock of what they left held.
    fn forget_in_file(&self, gone: &[(u64, usize)]) {
        if gone.is_empty() {
            return;
        }
        let mut file = self.file();
        for (seq, bytes) in gone {
            file.removed(*seq, *bytes);
        }
        drop(file);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Everything journaled, oldest first, for a resync's replay: out of the journal, but kept
    /// in its file until [`Self::replay_confirmed`] (or back in it at [`Self::session_ended`]).
    pub fn take_for_replay(&self) -> Vec<Mapping> {
        let mut in_flight = self.in_flight();
        self.move_in_flight(&mut in_flight, self.queue(), usize::MAX, REPLAYED)
    }

    /// The oldest `count` of `queue`, out of it and into `in_flight` under `number`: their
    /// copies, to send. With both locks held (`in_flight`'s first), so that no save sees them
    /// in neither.
    fn move_in_flight(
        &self,
        in_flight: &mut InFlightTable,
        mut queue: MutexGuard<'_, Queue>,
        count: usize,
        number: u64,
    ) -> Vec<Mapping> {
        let taken = queue.take_front(count);
        self.metrics.journal_entries.set(gauge(queue.len()));
        drop(queue);
        let copies = taken
            .iter()
            .map(|entry| Mapping::clone(&entry.mapping))
            .collect();
        for entry in taken {
            in_flight.push(InFlight { number, entry });
        }
        copies
    }

    /// The agent has what the replay sent (its `ResyncDone`): the file may forget it.
    pub fn replay_confirmed(&self) {
        self.confirmed(|number| number == REPLAYED);
    }

    /// The oldest entries for a live session to send, out of the journal but kept in its file
    /// until the agent confirms `number` ([`Self::sent_confirmed`]): at most `limit` of them and
    /// about `bytes` (at least one). A proxy killed before the agent took them hands them over
    /// at the next session rather than losing them.
    pub fn take_to_send(&self, limit: usize, bytes: usize, number: u64) -> Vec<Mapping> {
        let mut in_flight = self.in_flight();
        let queue = self.queue();
        let mut count = 0;
        let mut taken_bytes = 0;
        for entry in queue.entries.iter().take(limit) {
            let size = warden_api::mapping_bytes(&entry.mapping);
            if count > 0 && taken_bytes + size > bytes {
                break;
            }
            count += 1;
            taken_bytes += size;
        }
        let copies = self.move_in_flight(&mut in_flight, queue, count, number);
        // What waits for the agent's word stays within the journal's bounds, the oldest
        // forgotten: an agent of an older build confirms nothing (they were sent, as before
        // confirmations); from one that confirms, they are dropped unconfirmed, as a full
        // journal drops, and counted so (the agent stopped reading them for long).
        let forgotten = in_flight.forget_oldest_sent(self.capacity, JOURNAL_MAX_BYTES);
        if !forgotten.is_empty() {
            self.forget_in_file(&forgotten);
            if self.agent_confirms.load(Ordering::Relaxed) {
                self.metrics.journal_dropped.inc_by(forgotten.len() as u64);
                tracing::warn!(
                    dropped = forgotten.len(),
                    "journal mappings sent to the agent and never confirmed dropped: the journal is full"
                );
            } else {
                tracing::debug!(
                    forgotten = forgotten.len(),
                    "sent journal mappings an agent that confirms nothing took forgotten"
                );
            }
        }
        copies
    }

    /// The agent has taken what a live session sent numbered up to `number`.
    pub fn sent_confirmed(&self, number: u64) {
        self.agent_confirms.store(true, Ordering::Relaxed);
        self.confirmed(|sent| sent != REPLAYED && sent <= number);
    }

    fn confirmed(&self, done: impl Fn(u64) -> bool) {
        // Held until the file has forgotten them too (see `forget_in_file`).
        let mut in_flight = self.in_flight();
        let confirmed = in_flight.remove_where(|sent| done(sent.number));
        self.forget_in_file(&confirmed);
        drop(in_flight);
    }

    /// The session ended: what its replay took and what it sent unconfirmed goes back, ahead
    /// of anything journaled meanwhile (the agent may have some of it; taken twice, a mapping
    /// changes nothing).
    pub fn session_ended(&self) {
        // The next session's agent may be another build (a rollback): it says anew whether
        // it confirms.
        self.agent_confirms.store(false, Ordering::Relaxed);
        let mut in_flight = self.in_flight();
        let unconfirmed = in_flight.take_all();
        if unconfirmed.is_empty() {
            return;
        }
        let mut queue = self.queue();
        // Only what goes back is measured: a live session puts back most of each batch it
        // takes (past its 1 MiB), and the journal may hold 64 MiB.
        for sent in unconfirmed.into_iter().rev() {
            queue.push_front(sent.entry);
        }
        self.bounded(&mut queue);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Holds `queue` to its bounds, the oldest dropped and counted; with its lock held.
    fn bounded(&self, queue: &mut Queue) {
        let dropped = queue.bound(self.capacity);
        if !dropped.is_empty() {
            self.metrics.journal_dropped.inc_by(dropped.len() as u64);
            self.forget_in_file(&dropped);
        }
        self.metrics.journal_entries.set(gauge(queue.len()));
    }

    pub fn push(&self, mapping: Mapping) {
        let mut queue = self.queue();
        let mapping = Arc::new(mapping);
        let (seq, bytes) = queue.push_back(Arc::clone(&mapping));
        self.file().added(seq, &mapping, bytes);
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.bounded(&mut queue);
        drop(queue);
        self.pushed.notify_one();
    }

    /// Ready once something was pushed since the last wait (at once if it was meanwhile).
    pub async fn pushed(&self) {
        self.pushed.notified().await;
    }

    /// Puts what an earlier run journaled into `cache`: it is this run's knowledge too, and
    /// the cache dump of every session carries it, so a session that breaks during the
    /// journal's replay (taken, queued, never read) loses nothing.
    pub fn fill(&self, cache: &SharedCache) {
        let journaled: Vec<Mapping> = self
            .queue()
            .entries
            .iter()
            .map(|entry| Mapping::clone(&entry.mapping))
            .collect();
        if !journaled.is_empty() {
            warden_api::merge_mappings(cache, &journaled, &self.metrics);
        }
    }

    /// Drops the entries `matches` holds for, those in flight too (a clean during a resync
    /// must not come back with a failed replay); returns how many.
    pub fn remove_matching(&self, mut matches: impl FnMut(&Mapping) -> bool) -> usize {
        let mut in_flight = self.in_flight();
        let mut queue = self.queue();
        let mut removed = queue.remove_matching(&mut matches);
        removed.extend(in_flight.remove_where(|sent| matches(&sent.entry.mapping)));
        self.forget_in_file(&removed);
        self.metrics.journal_entries.set(gauge(queue.len()));
        removed.len()
    }

    pub fn len(&self) -> usize {
        self.queue().len()
    }

    /// Everything journaled, oldest first, out of the journal and its file.
    #[cfg(test)]
    pub(crate) fn take(&self) -> Vec<Mapping> {
        let mut queue = self.queue();
        let taken = queue.take_front(usize::MAX);
        let gone: Vec<(u64, usize)> = taken.iter().map(Entry::gone).collect();
        self.forget_in_file(&gone);
        self.metrics.journal_entries.set(0);
        taken
            .into_iter()
            .map(|entry| Arc::unwrap_or_clone(entry.mapping))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.queue().entries.is_empty()
    }
}

fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// What the log in `state_dir` holds, by number (oldest first), and whether it was set aside:
/// a log that cannot be read or is not one, or is damaged (what came before the damage is
/// kept, to be written whole again).
fn read_log(state_dir: &Path) -> (Vec<(u64, Mapping)>, bool) {
    let path = disk::log_file(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return (Vec::new(), false),
        // Set aside, not overwritten by the next save: what it holds may still be read.
        Err(error) => {
            let set_aside = warden_state::set_aside(&path);
            tracing::error!(%error, set_aside, "cannot read the journal in state_dir; starting without it");
            return (Vec::new(), true);
        }
    };
    let Some(read) = disk::read(&bytes) else {
        let set_aside = warden_state::set_aside(&path);
        tracing::error!(
            set_aside,
            "the journal in state_dir is not a journal; starting without it"
        );
        return (Vec::new(), true);
    };
    let kept = read.held.len();
    match &read.damage {
        None => {}
        // Likely a crash or power loss during an append.
        Some(damage @ disk::Damage::TornTail { .. }) => {
            let set_aside = copy_aside(&path);
            tracing::warn!(%damage, kept, set_aside, "the journal in state_dir was cut short; what came before is kept");
        }
        Some(damage @ disk::Damage::BadRecord { .. }) => {
            let set_aside = copy_aside(&path);
            tracing::error!(%damage, kept, set_aside, "the journal in state_dir is damaged; what came before is kept");
        }
    }
    (read.held.into_iter().collect(), read.damage.is_some())
}

/// Copies a damaged `path` to `<path>.corrupt`, for a look, leaving it in place until what it
/// held before the damage is written whole over it. Says how that went, for the log.
fn copy_aside(path: &Path) -> String {
    let aside = warden_state::beside(path, ".corrupt");
    match std::fs::copy(path, &aside) {
        Ok(_) => format!("copied aside as {}", aside.display()),
        Err(error) => format!("could not be copied aside: {error}"),
    }
}

/// The journal a build before the log left in `state_dir`, if any.
fn read_legacy(state_dir: &Path) -> Option<Vec<Mapping>> {
    let path = state_dir.join(disk::LEGACY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match Mappings::decode(bytes.as_slice()) {
            Ok(saved) => Some(saved.mappings),
            Err(error) => {
                let set_aside = warden_state::set_aside(&path);
                tracing::error!(%error, set_aside, "the older journal in state_dir does not decode; starting without it");
                None
            }
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            let set_aside = warden_state::set_aside(&path);
            tracing::error!(%error, set_aside, "cannot read the older journal in state_dir; starting without it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(name: &str) -> Mapping {
        Mapping {
            endpoint: "youssef/test".into(),
            name: name.into(),
            ..Mapping::default()
        }
    }

    /// Mappings sent to an agent that confirms what it takes, then forgotten unconfirmed at
    /// the journal's bounds (the agent stopped reading), were lost without a count: they are
    /// drops, as a full journal's are. An agent that confirms nothing (an older build) was
    /// simply sent them: not counted.
    #[test]
    fn unconfirmed_mappings_past_the_bounds_are_counted_dropped() {
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(10, metrics.peer.clone());
        let send = |first: usize, number: u64| {
            for n in first..first + 10 {
                journal.push(mapping(&format!("n{n}.io.")));
            }
            journal.take_to_send(10, usize::MAX, number).len()
        };
        // An older agent: nothing confirmed, nothing counted.
        assert_eq!(send(0, 1), 10);
        assert_eq!(send(10, 2), 10);
        assert_eq!(metrics.peer.journal_dropped.get(), 0);
        // An agent that confirms: it took batch 2, then stopped reading.
        journal.sent_confirmed(2);
        assert_eq!(send(20, 3), 10);
        assert_eq!(send(30, 4), 10);
        assert_eq!(metrics.peer.journal_dropped.get(), 10);
    }

    /// Whether the agent confirms is said anew by each session's: after one that did, a
    /// rolled-back agent that confirms nothing set off the journal-full alert for mappings
    /// it was sent.
    #[test]
    fn each_session_says_anew_whether_its_agent_confirms() {
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(10, metrics.peer.clone());
        journal.sent_confirmed(0);
        journal.session_ended();
        for (first, number) in [(0, 1), (10, 2)] {
            for n in first..first + 10 {
                journal.push(mapping(&format!("n{n}.io.")));
            }
            assert_eq!(journal.take_to_send(10, usize::MAX, number).len(), 10);
        }
        assert_eq!(metrics.peer.journal_dropped.get(), 0);
    }

    /// The sent part's count and weight are kept as it changes rather than walked at every
    /// batch (100,000 entries, with an agent that confirms nothing): after any change they
    /// equal a walk, and what goes past the bounds is the oldest sent, never the replay's.
    #[test]
    fn the_in_flight_totals_are_those_of_a_walk() {
        let walk = |table: &InFlightTable| {
            let sent = table.iter().filter(|sent| sent.number != REPLAYED);
            sent.fold((0, 0), |(count, bytes), sent| {
                (
                    count + 1,
                    bytes + warden_api::mapping_bytes(&sent.entry.mapping),
                )
            })
        };
        let mut table = InFlightTable::default();
        for (seq, number) in [(1, REPLAYED), (2, 1), (3, 1), (4, 2), (5, REPLAYED), (6, 3)] {
            table.push(InFlight {
                number,
                entry: Entry {
                    seq,
                    mapping: Arc::new(mapping(&format!("n{seq}.io."))),
                },
            });
            assert_eq!((table.numbered, table.numbered_bytes), walk(&table));
        }
        let confirmed = table.remove_where(|sent| sent.number != REPLAYED && sent.number <= 1);
        assert_eq!(
            confirmed.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!((table.numbered, table.numbered_bytes), walk(&table));
        let forgotten = table.forget_oldest_sent(1, usize::MAX);
        assert_eq!(
            forgotten.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [4]
        );
        assert_eq!((table.numbered, table.numbered_bytes), walk(&table));
        assert!(
            table.forget_oldest_sent(1, usize::MAX).is_empty(),
            "within bounds"
        );
        assert_eq!(table.take_all().len(), 3);
        assert_eq!((table.numbered, table.numbered_bytes), (0, 0));
    }

    #[test]
    fn a_full_journal_drops_the_oldest_and_counts_it() {
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(2, metrics.peer.clone());
        for name in ["a.", "b.", "c."] {
            journal.push(mapping(name));
        }
        assert_eq!(metrics.peer.journal_dropped.get(), 1);
        let names = names_of(journal.take());
        assert_eq!(names, ["b.", "c."]);
        assert!(journal.is_empty());
    }

    /// The journal was bounded by count only: 100,000 mappings of a thousand addresses each,
    /// which an answer may carry, held gigabytes while the agent was away.
    #[test]
    fn a_journal_of_wide_mappings_is_bounded_in_bytes_too() {
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(100_000, metrics.peer.clone());
        let wide = |name: &str| Mapping {
            ips: (0..1000)
                .map(|i| format!("2001:db8::{:x}:{:x}", i / 256, i % 256))
                .collect(),
            ..mapping(name)
        };
        // Names of one length, so that every mapping takes the same bytes.
        let each = warden_api::mapping_bytes(&wide("n00000."));
        let fits = JOURNAL_MAX_BYTES / each;
        for n in 0..fits + 10 {
            journal.push(wide(&format!("n{n:05}.")));
        }
        assert_eq!(journal.len(), fits);
        assert_eq!(metrics.peer.journal_dropped.get(), 10);
        let kept = journal.take_for_replay();
        assert_eq!(kept[0].name, "n00010.", "the oldest went first");
        // Put back (a session that broke), the bound holds too, dropping the oldest.
        journal.push(wide("n99999."));
        journal.session_ended();
        assert_eq!(journal.len(), fits);
        assert_eq!(metrics.peer.journal_dropped.get(), 11);
        let names = names_of(journal.take());
        assert_eq!(names[0], "n00011.");
        assert_eq!(names.last().map(String::as_str), Some("n99999."));
    }

    fn names_of(mappings: Vec<Mapping>) -> Vec<String> {
        mappings.into_iter().map(|m| m.name).collect()
    }

    /// The names a journal opened from `dir` holds, sorted: what a proxy killed now hands over.
    fn saved_names(dir: &Path, metrics: &warden_telemetry::Metrics) -> Vec<String> {
        let reopened = Journal::open(dir, 10, metrics.peer.clone());
        let mut names = names_of(reopened.take());
        names.sort();
        names
    }

    /// A resync's replay took the journal and the next save wrote it empty: a proxy killed
    /// before the agent had it all lost it for good.
    #[test]
    fn what_a_replay_takes_stays_in_the_file_until_the_agent_confirms_it() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let saved_names = || saved_names(dir.path(), &metrics);
        let journal = Journal::new(10, metrics.peer.clone());
        journal.push(mapping("a."));
        journal.push(mapping("b."));
        let taken = journal.take_for_replay();
        assert_eq!(taken.len(), 2);
        assert!(journal.is_empty(), "not sent again in this session");
        journal.push(mapping("c."));
        journal.save(dir.path()).unwrap();
        assert_eq!(
            saved_names(),
            ["a.", "b.", "c."],
            "killed now, nothing is lost"
        );

        // The session ends before the agent's ResyncDone: back in the journal, oldest first.
        journal.session_ended();
        assert_eq!(names_of(journal.take_for_replay()), ["a.", "b.", "c."]);

        // A clean during the resync reaches what is in flight too: a failed replay would
        // bring it back.
        assert_eq!(journal.remove_matching(|mapping| mapping.name == "b."), 1);
        journal.session_ended();
        assert_eq!(names_of(journal.take_for_replay()), ["a.", "c."]);

        // The agent's ResyncDone: the file may forget them.
        journal.replay_confirmed();
        journal.save(dir.path()).unwrap();
        assert!(saved_names().is_empty());
    }

    /// What a live session sent from the journal left its file at once: a proxy killed
    /// before the agent took it lost it for good. It now stays until the agent confirms it.
    #[test]
    fn what_a_live_session_sends_stays_in_the_file_until_the_agent_confirms_it() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let saved_names = || saved_names(dir.path(), &metrics);
        let journal = Journal::new(10, metrics.peer.clone());
        for name in ["a.", "b.", "c."] {
            journal.push(mapping(name));
        }
        // A batch of at most two, then one of what is left; then the first is confirmed.
        assert_eq!(
            names_of(journal.take_to_send(2, usize::MAX, 1)),
            ["a.", "b."]
        );
        assert_eq!(names_of(journal.take_to_send(2, usize::MAX, 2)), ["c."]);
        assert!(journal.is_empty());
        journal.save(dir.path()).unwrap();
        assert_eq!(
            saved_names(),
            ["a.", "b.", "c."],
            "killed now, nothing is lost"
        );
        journal.sent_confirmed(1);
        journal.save(dir.path()).unwrap();
        assert_eq!(saved_names(), ["c."]);
        // The session ends: what was not confirmed goes back.
        journal.session_ended();
        assert_eq!(names_of(journal.take()), ["c."]);

        // A batch stops at its bytes, though it takes one however large.
        journal.push(mapping("d."));
        journal.push(mapping("e."));
        assert_eq!(names_of(journal.take_to_send(10, 1, 3)), ["d."]);
    }

    #[test]
    fn a_journal_that_does_not_decode_is_set_aside() {
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        for file in ["journal.log", "journal.pb"] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(file), b"\xff\xff\xff not a journal").unwrap();
            let journal = Journal::open(dir.path(), 16, metrics.peer.clone());
            assert!(journal.is_empty());
            assert!(dir.path().join(format!("{file}.corrupt")).exists());
            assert!(saved_names(dir.path(), &metrics).is_empty());
            assert!(!dir.path().join(format!("{file}.corrupt.corrupt")).exists());
        }
    }

    #[test]
    fn a_saved_journal_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(10, metrics.peer.clone());
        journal.push(mapping("anysub.cilium.io."));
        journal.save(dir.path()).unwrap();
        let reopened = Journal::open(dir.path(), 10, metrics.peer.clone());
        let names = names_of(reopened.take());
        assert_eq!(names, ["anysub.cilium.io."]);
    }

    #[test]
    fn the_oldest_entries_leave_first() {
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(10, metrics.peer.clone());
        for name in ["a.", "b.", "c."] {
            journal.push(mapping(name));
        }
        let names = names_of(journal.take_to_send(2, usize::MAX, 1));
        assert_eq!(names, ["a.", "b."]);
        assert_eq!(metrics.peer.journal_entries.get(), 1);
        let rest = names_of(journal.take_to_send(5, usize::MAX, 2));
        assert_eq!(rest, ["c."]);
        assert!(journal.take_to_send(5, usize::MAX, 3).is_empty());
    }

    #[test]
    fn a_restarted_proxy_knows_what_it_journaled() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(10, metrics.peer.clone());
        let now = warden_proxy::unix_now();
        journal.push(Mapping {
            ips: vec!["198.18.0.7".into()],
            ttl: 300,
            expires_at: now.0 + 300,
            ..mapping("anysub.cilium.io.")
        });
        journal.save(dir.path()).unwrap();
        let reopened = Journal::open(dir.path(), 10, metrics.peer.clone());
        let cache = SharedCache::new(warden_fqdn::DnsCache::default());
        reopened.fill(&cache);
        let found = cache
            .lock()
            .lookup(now, "youssef/test", "anysub.cilium.io.");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(reopened.len(), 1, "the journal keeps its entries");
    }

    fn inode_and_len(path: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = std::fs::metadata(path).unwrap();
        (metadata.ino(), metadata.len())
    }

    /// Every save wrote the whole journal (up to 64 MiB, four times a second while the agent
    /// was away); a save now appends what changed since the last.
    #[test]
    fn a_save_appends_what_changed_since_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = disk::log_file(dir.path());
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(1000, metrics.peer.clone());
        for n in 0..100 {
            journal.push(mapping(&format!("n{n:03}.")));
        }
        journal.save(dir.path()).unwrap();
        let (inode, whole) = inode_and_len(&path);
        let record = whole / 100;

        journal.push(mapping("n100."));
        journal.save(dir.path()).unwrap();
        let (same_inode, appended) = inode_and_len(&path);
        assert_eq!(same_inode, inode, "appended to, not replaced");
        assert_eq!(metrics.peer.journal_file_bytes.get() as u64, appended);
        assert!(
            appended - whole <= record + 1,
            "one record: {whole} -> {appended}"
        );

        // Ten sent and confirmed: one record of their numbers.
        journal.take_to_send(10, usize::MAX, 1);
        journal.sent_confirmed(1);
        journal.save(dir.path()).unwrap();
        let (same_inode, removed) = inode_and_len(&path);
        assert_eq!(same_inode, inode);
        assert!(removed - appended < record, "{appended} -> {removed}");
        let reopened = Journal::open(dir.path(), 1000, metrics.peer.clone());
        assert_eq!(reopened.len(), 91);
        assert_eq!(names_of(reopened.take())[0], "n010.");

        // Past 1 MiB, once as much is removed as is left, the file is written whole again.
        let wide = |n: usize| Mapping {
            ips: (0..200).map(|i| format!("2001:db8::{n:x}:{i:x}")).collect(),
            ..mapping(&format!("w{n:03}."))
        };
        for n in 0..400 {
            journal.push(wide(n));
        }
        journal.save(dir.path()).unwrap();
        let (same_inode, grown) = inode_and_len(&path);
        assert_eq!(same_inode, inode);
        assert!(grown > 1 << 20, "{grown}");
        journal.take_to_send(usize::MAX, usize::MAX, 2);
        journal.sent_confirmed(2);
        journal.push(mapping("last."));
        journal.save(dir.path()).unwrap();
        let (new_inode, compacted) = inode_and_len(&path);
        assert_ne!(new_inode, inode, "written whole");
        assert!(compacted < record * 2, "{compacted}");
        assert_eq!(saved_names(dir.path(), &metrics), ["last."]);
    }

    /// A crash during an append leaves half a record at the end: what came before is kept,
    /// and the next save writes the file whole (appended after half a record, it would be lost).
    #[test]
    fn a_torn_append_keeps_what_came_before_and_the_next_save_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = disk::log_file(dir.path());
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let saved_names = || saved_names(dir.path(), &metrics);
        let journal = Journal::new(10, metrics.peer.clone());
        journal.push(mapping("a."));
        journal.save(dir.path()).unwrap();
        journal.push(mapping("b."));
        journal.save(dir.path()).unwrap();
        let (_, len) = inode_and_len(&path);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();

        // Copied aside and left in place until what came before is written whole over it, at
        // the persister's first round: a proxy killed before then reads the same again (moved
        // aside at once, it was lost).
        let restarted = Journal::open(dir.path(), 10, metrics.peer.clone());
        assert!(beside_corrupt(&path).exists());
        assert_eq!(saved_names(), ["a."]);
        assert_ne!(restarted.changes(), 0, "to be saved at the first round");
        restarted.save(dir.path()).unwrap();
        assert_eq!(saved_names(), ["a."]);
        restarted.push(mapping("c."));
        restarted.save(dir.path()).unwrap();
        restarted.push(mapping("d."));
        restarted.save(dir.path()).unwrap();
        assert_eq!(saved_names(), ["a.", "c.", "d."]);
        std::fs::remove_file(beside_corrupt(&path)).unwrap();

        // A record damaged in the middle: the file is set aside, what came before is kept.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(saved_names(), ["a.", "c."]);
        assert!(beside_corrupt(&path).exists());
    }

    fn beside_corrupt(path: &Path) -> std::path::PathBuf {
        warden_state::beside(path, ".corrupt")
    }

    /// An upgrade from a build that wrote the journal whole (`journal.pb`) keeps what it
    /// held; the older file goes once the log is written, at the persister's first round.
    /// Of the two, only the newer is read: a downgrade leaves a stale log, and an older file
    /// that could not be removed would bring back, at every start, what was since delivered.
    #[test]
    fn of_an_older_builds_journal_and_the_log_the_newer_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join(disk::LEGACY_FILE);
        let write_legacy = |names: &[&str]| {
            let older = Mappings {
                mappings: names.iter().map(|name| mapping(name)).collect(),
                resync: true,
                confirm: 0,
            };
            std::fs::write(&legacy, older.encode_to_vec()).unwrap();
        };
        let age = |path: &Path, seconds: u64| {
            let file = std::fs::File::options().write(true).open(path).unwrap();
            let then = std::time::SystemTime::now() - std::time::Duration::from_secs(seconds);
            file.set_modified(then).unwrap();
        };
        write_legacy(&["old1.", "old2."]);
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::open(dir.path(), 10, metrics.peer.clone());
        assert_eq!(journal.len(), 2);
        assert_ne!(journal.changes(), 0, "to be saved at once");
        journal.push(mapping("new."));
        journal.save(dir.path()).unwrap();
        assert!(!legacy.exists());
        assert_eq!(
            saved_names(dir.path(), &metrics),
            ["new.", "old1.", "old2."]
        );

        // An older file left beside a newer log (it could not be removed) is not read.
        write_legacy(&["stale."]);
        age(&legacy, 60);
        assert_eq!(
            saved_names(dir.path(), &metrics),
            ["new.", "old1.", "old2."]
        );
        // A newer one (a downgrade wrote it) is, and the stale log is not.
        write_legacy(&["downgraded."]);
        age(&disk::log_file(dir.path()), 60);
        let reopened = Journal::open(dir.path(), 10, metrics.peer.clone());
        reopened.save(dir.path()).unwrap();
        assert!(!legacy.exists());
        assert_eq!(saved_names(dir.path(), &metrics), ["downgraded."]);
    }

    /// What the journal holds (in flight too), oldest first.
    fn held_names(journal: &Journal) -> Vec<String> {
        let in_flight = journal.in_flight();
        let queue = journal.queue();
        let mut held: Vec<(u64, String)> = in_flight
            .iter()
            .map(|sent| &sent.entry)
            .chain(queue.entries.iter())
            .map(|entry| (entry.seq, entry.mapping.name.clone()))
            .collect();
        held.sort();
        held.into_iter().map(|(_, name)| name).collect()
    }

    /// Random sessions, confirmations, cleans, failed saves and restarts: after every save
    /// the file holds what the journal holds, in order.
    #[test]
    fn the_file_holds_what_the_journal_holds_after_every_save() {
        use rand::{Rng as _, SeedableRng as _};
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        for seed in 0..40 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let dir = tempfile::tempdir().unwrap();
            let missing = dir.path().join("missing");
            let mut journal = Journal::new(12, metrics.peer.clone());
            let mut number = 0;
            for step in 0..400 {
                match rng.random_range(0..100) {
                    0..40 => journal.push(mapping(&format!("n{step}.s{}.", step % 7))),
                    40..46 => drop(journal.take_for_replay()),
                    46..56 => {
                        number += 1;
                        journal.take_to_send(rng.random_range(1..5), usize::MAX, number);
                    }
                    56..64 => journal.sent_confirmed(rng.random_range(0..=number)),
                    64..67 => journal.replay_confirmed(),
                    67..72 => journal.session_ended(),
                    72..76 => {
                        let suffix = format!(".s{}.", rng.random_range(0..7));
                        journal.remove_matching(|mapping| mapping.name.ends_with(&suffix));
                    }
                    // Fails unless there is nothing to write.
                    76..80 => drop(journal.save(&missing)),
                    80..83 => {
                        journal.save(dir.path()).unwrap();
                        journal = Journal::open(dir.path(), 12, metrics.peer.clone());
                    }
                    _ => {
                        journal.save(dir.path()).unwrap();
                        let reopened = Journal::open(dir.path(), 100, metrics.peer.clone());
                        assert_eq!(
                            names_of(reopened.take()),
                            held_names(&journal),
                            "seed {seed}, step {step}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_clean_removes_the_matching_entries() {
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(10, metrics.peer.clone());
        for name in ["www.cilium.io.", "cilium.io.", "www.cilium.io."] {
            journal.push(mapping(name));
        }
        assert_eq!(
            journal.remove_matching(|mapping| mapping.name == "www.cilium.io."),
            2
        );
        let names = names_of(journal.take());
        assert_eq!(names, ["cilium.io."]);
    }

    #[test]
    fn unsent_mappings_go_back_in_front() {
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::new(10, metrics.peer.clone());
        journal.push(mapping("old."));
        journal.take_to_send(1, usize::MAX, 1);
        journal.push(mapping("new."));
        journal.session_ended();
        let names = names_of(journal.take());
        assert_eq!(names, ["old.", "new."]);
    }
}
