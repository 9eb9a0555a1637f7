//! Mappings the agent has not received yet: bounded, oldest dropped first (and counted), and
//! kept in `state_dir` so that a proxy killed while the agent is away still hands them over.
//! Those a session's resync replays stay in the file until the agent's `ResyncDone` says it
//! has them (it sends it after reading everything the proxy sent before its own), and those a
//! live session sends until the agent's `Received`: a proxy killed meanwhile hands them over
//! again next time, rather than losing them.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::sync::Notify;
use warden_api::proto::{Mapping, Mappings};
use warden_proxy::SharedCache;
use warden_telemetry::PeerMetrics;

const JOURNAL_FILE: &str = "journal.pb";

/// The number in flight of what a resync's replay took (confirmed by the agent's `ResyncDone`);
/// what a live session sends is numbered from 1.
const REPLAYED: u64 = 0;

/// The most the journal holds, in the bytes its mappings take on the wire (about what they take
/// in memory and in its file), whatever `journal_max` allows: a mapping may carry a thousand
/// addresses, and 100,000 such would be gigabytes. The oldest go first, counted as dropped.
pub const JOURNAL_MAX_BYTES: usize = 64 << 20;

/// The journal's mappings and the bytes they take, kept together. Shared (`Arc`), so that a
/// save copies pointers under the lock the answer path pushes through, and the mappings after.
#[derive(Debug, Default)]
struct Queue {
    mappings: VecDeque<Arc<Mapping>>,
    bytes: usize,
}

impl Queue {
    fn push_back(&mut self, mapping: Arc<Mapping>) {
        self.bytes += warden_api::mapping_bytes(&mapping);
        self.mappings.push_back(mapping);
    }

    fn push_front(&mut self, mapping: Arc<Mapping>) {
        self.bytes += warden_api::mapping_bytes(&mapping);
        self.mappings.push_front(mapping);
    }

    fn pop_front(&mut self) -> Option<Arc<Mapping>> {
        let mapping = self.mappings.pop_front()?;
        self.bytes = self
            .bytes
            .saturating_sub(warden_api::mapping_bytes(&mapping));
        Some(mapping)
    }

    /// The oldest `count`, taken out.
    fn take_front(&mut self, count: usize) -> Vec<Arc<Mapping>> {
        let taken: Vec<Arc<Mapping>> = self
            .mappings
            .drain(..count.min(self.mappings.len()))
            .collect();
        let bytes: usize = taken
            .iter()
            .map(|mapping| warden_api::mapping_bytes(mapping))
            .sum();
        self.bytes = self.bytes.saturating_sub(bytes);
        taken
    }

    fn retain(&mut self, mut keep: impl FnMut(&Mapping) -> bool) {
        self.mappings.retain(|mapping| keep(mapping));
        self.bytes = self
            .mappings
            .iter()
            .map(|mapping| warden_api::mapping_bytes(mapping))
            .sum();
    }

    /// Drops the oldest until at most `capacity` mappings and [`JOURNAL_MAX_BYTES`] are held;
    /// returns how many went.
    fn bound(&mut self, capacity: usize) -> usize {
        let mut dropped = 0;
        while self.mappings.len() > capacity || self.bytes > JOURNAL_MAX_BYTES {
            if self.pop_front().is_none() {
                break;
            }
            dropped += 1;
        }
        dropped
    }

    fn len(&self) -> usize {
        self.mappings.len()
    }
}

#[derive(Debug)]
pub struct Journal {
    entries: Mutex<Queue>,
    /// Taken for a resync's replay, or sent by a live session, and not yet confirmed by the
    /// agent: saved with the entries, and put back when the session ends.
    /// Locked before `entries` wherever both are: a save between taking entries and marking
    /// them in flight would write a file without them.
    in_flight: Mutex<Vec<(u64, Arc<Mapping>)>>,
    capacity: usize,
    metrics: PeerMetrics,
    /// Bumped on every change; the persister writes when it moved.
    changes: AtomicU64,
    /// Woken by every push: a live session hands what it journaled to the agent.
    pushed: Notify,
}

impl Journal {
    pub fn new(capacity: usize, metrics: PeerMetrics) -> Journal {
        Journal {
            entries: Mutex::new(Queue::default()),
            in_flight: Mutex::new(Vec::new()),
            capacity: capacity.max(1),
            metrics,
            changes: AtomicU64::new(0),
            pushed: Notify::new(),
        }
    }

    /// The journal a previous run left in `state_dir`, if any.
    pub fn open(state_dir: &Path, capacity: usize, metrics: PeerMetrics) -> Journal {
        let journal = Journal::new(capacity, metrics);
        match std::fs::read(journal_file(state_dir)) {
            Ok(bytes) => match Mappings::decode(bytes.as_slice()) {
                Ok(saved) => journal.restore(saved.mappings),
                Err(error) => {
                    let set_aside = warden_state::set_aside(&journal_file(state_dir));
                    tracing::error!(%error, set_aside, "journal in state_dir does not decode; starting empty");
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            // Set aside, not overwritten by the next save: what it holds may still be read.
            Err(error) => {
                let set_aside = warden_state::set_aside(&journal_file(state_dir));
                tracing::error!(%error, set_aside, "cannot read the journal in state_dir; starting empty");
            }
        }
        journal
    }

    /// A counter that moves whenever the journal changes.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Writes the journal to `state_dir` (temporary file, fsync, rename). Only pointers are
    /// copied under the locks (the answer path pushes through them; a copy of 64 MiB of
    /// mappings held them for tens of ms, four times a second while the agent was away).
    pub fn save(&self, state_dir: &Path) -> Result<(), warden_state::StateError> {
        let in_flight = self.in_flight();
        let mut shared: Vec<Arc<Mapping>> = in_flight
            .iter()
            .map(|(_, mapping)| Arc::clone(mapping))
            .collect();
        shared.extend(self.entries().mappings.iter().cloned());
        drop(in_flight);
        let snapshot = Mappings {
            mappings: shared
                .iter()
                .map(|mapping| Mapping::clone(mapping))
                .collect(),
            resync: true,
            confirm: 0,
        };
        warden_state::write_atomically(&journal_file(state_dir), &snapshot.encode_to_vec())
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.entries
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Each with the number the agent confirms it by: [`REPLAYED`] for a resync's replay.
    fn in_flight(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Arc<Mapping>)>> {
        self.in_flight
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Everything journaled, oldest first, for a resync's replay: out of the journal, but kept
    /// in its file until [`Self::replay_confirmed`] (or back in it at [`Self::session_ended`]).
    pub fn take_for_replay(&self) -> Vec<Mapping> {
        let mut in_flight = self.in_flight();
        let taken = self.take_shared(usize::MAX);
        let copies = taken
            .iter()
            .map(|mapping| Mapping::clone(mapping))
            .collect();
        in_flight.extend(taken.into_iter().map(|mapping| (REPLAYED, mapping)));
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
        let mut entries = self.entries();
        let mut count = 0;
        let mut taken_bytes = 0;
        for mapping in entries.mappings.iter().take(limit) {
            let size = warden_api::mapping_bytes(mapping);
            if count > 0 && taken_bytes + size > bytes {
                break;
            }
            count += 1;
            taken_bytes += size;
        }
        let taken = entries.take_front(count);
        self.metrics
            .journal_entries
            .set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
        drop(entries);
        let copies = taken
            .iter()
            .map(|mapping| Mapping::clone(mapping))
            .collect();
        in_flight.extend(taken.into_iter().map(|mapping| (number, mapping)));
        // An agent of an older build confirms nothing: what waits stays within the journal's
        // bounds, the oldest forgotten (sent, as before confirmations).
        let (mut count, mut bytes) = (0, 0);
        for (sent, mapping) in in_flight.iter() {
            if *sent != REPLAYED {
                count += 1;
                bytes += warden_api::mapping_bytes(mapping);
            }
        }
        let mut forgotten = 0;
        in_flight.retain(|(sent, mapping)| {
            let over = count > self.capacity || bytes > JOURNAL_MAX_BYTES;
            let forget = *sent != REPLAYED && over;
            if forget {
                count -= 1;
                bytes = bytes.saturating_sub(warden_api::mapping_bytes(mapping));
                forgotten += 1;
            }
            !forget
        });
        if forgotten > 0 {
            self.changes.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                forgotten,
                "sent journal mappings the agent never confirmed forgotten"
            );
        }
        copies
    }

    /// The agent has taken what a live session sent numbered up to `number`.
    pub fn sent_confirmed(&self, number: u64) {
        self.confirmed(|sent| sent != REPLAYED && sent <= number);
    }

    fn confirmed(&self, done: impl Fn(u64) -> bool) {
        let mut in_flight = self.in_flight();
        let before = in_flight.len();
        in_flight.retain(|(number, _)| !done(*number));
        if in_flight.len() != before {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The session ended: what its replay took and what it sent unconfirmed goes back, ahead
    /// of anything journaled meanwhile (the agent may have some of it; taken twice, a mapping
    /// changes nothing).
    pub fn session_ended(&self) {
        let mut in_flight = self.in_flight();
        let unconfirmed = std::mem::take(&mut *in_flight);
        if !unconfirmed.is_empty() {
            self.put_back(
                unconfirmed
                    .into_iter()
                    .map(|(_, mapping)| mapping)
                    .collect(),
            );
        }
    }

    pub fn push(&self, mapping: Mapping) {
        let mut entries = self.entries();
        entries.push_back(Arc::new(mapping));
        let dropped = entries.bound(self.capacity);
        if dropped > 0 {
            self.metrics.journal_dropped.inc_by(dropped as u64);
        }
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .journal_entries
            .set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
        drop(entries);
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
            .entries()
            .mappings
            .iter()
            .map(|mapping| Mapping::clone(mapping))
            .collect();
        if !journaled.is_empty() {
            warden_api::merge_mappings(cache, &journaled, &self.metrics);
        }
    }

    /// Drops the entries `matches` holds for, those in flight too (a clean during a resync
    /// must not come back with a failed replay); returns how many.
    pub fn remove_matching(&self, mut matches: impl FnMut(&Mapping) -> bool) -> usize {
        let mut in_flight = self.in_flight();
        let mut entries = self.entries();
        let before = entries.len() + in_flight.len();
        entries.retain(|mapping| !matches(mapping));
        in_flight.retain(|(_, mapping)| !matches(mapping));
        let removed = before - entries.len() - in_flight.len();
        if removed > 0 {
            self.changes.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .journal_entries
                .set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
        }
        removed
    }

    /// At most `limit` of the oldest entries, taken out of the journal.
    pub fn take_oldest(&self, limit: usize) -> Vec<Mapping> {
        self.take_shared(limit)
            .into_iter()
            .map(Arc::unwrap_or_clone)
            .collect()
    }

    /// [`Self::take_oldest`], as held.
    fn take_shared(&self, limit: usize) -> Vec<Arc<Mapping>> {
        let mut entries = self.entries();
        let taken = entries.take_front(limit);
        if !taken.is_empty() {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics
            .journal_entries
            .set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
        taken
    }

    /// Everything journaled, oldest first; the journal is empty afterwards.
    pub fn take(&self) -> Vec<Mapping> {
        self.take_oldest(usize::MAX)
    }

    /// Puts back what could not be sent, ahead of anything journaled meanwhile.
    pub fn restore(&self, unsent: Vec<Mapping>) {
        self.put_back(unsent.into_iter().map(Arc::new).collect());
    }

    /// [`Self::restore`], as held.
    fn put_back(&self, unsent: Vec<Arc<Mapping>>) {
        let mut entries = self.entries();
        // Only what goes back is measured: a live session puts back most of each batch it
        // takes (past its 1 MiB), and the journal may hold 64 MiB.
        for mapping in unsent.into_iter().rev() {
            entries.push_front(mapping);
        }
        let dropped = entries.bound(self.capacity);
        if dropped > 0 {
            self.metrics.journal_dropped.inc_by(dropped as u64);
        }
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .journal_entries
            .set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries().mappings.is_empty()
    }
}

fn journal_file(state_dir: &Path) -> PathBuf {
    state_dir.join(JOURNAL_FILE)
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
        let kept = journal.take();
        assert_eq!(kept[0].name, "n00010.", "the oldest went first");
        // Put back (a session that broke), the bound holds too, dropping the oldest.
        journal.push(wide("n99999."));
        journal.restore(kept);
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
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOURNAL_FILE), b"\xff\xff\xff not protobuf").unwrap();
        let metrics = warden_telemetry::Metrics::new("dnsproxy").unwrap();
        let journal = Journal::open(dir.path(), 16, metrics.peer.clone());
        assert!(journal.is_empty());
        assert!(dir.path().join("journal.pb.corrupt").exists());
        assert!(!dir.path().join(JOURNAL_FILE).exists());
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
        let names = names_of(journal.take_oldest(2));
        assert_eq!(names, ["a.", "b."]);
        assert_eq!(metrics.peer.journal_entries.get(), 1);
        let rest = names_of(journal.take_oldest(5));
        assert_eq!(rest, ["c."]);
        assert!(journal.take_oldest(5).is_empty());
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
        journal.push(mapping("new."));
        journal.restore(vec![mapping("old.")]);
        let names = names_of(journal.take());
        assert_eq!(names, ["old.", "new."]);
    }
}
