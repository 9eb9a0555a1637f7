use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// What happened to a DNS query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Forwarded upstream and answered.
    Allowed,
    /// Refused by policy.
    Denied,
    /// Allowed, but no usable answer (timeout, upstream error, overload): SERVFAIL.
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Error => "error",
        }
    }
}

/// One DNS query as the proxy handled it. One is made per query on the hot path, so the
/// text that repeats (instance, endpoint, protocol, type, rcode) is shared or static rather
/// than allocated each time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsFlow {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub instance: Arc<str>,
    /// `namespace/name`, or `reserved:unknown` for a client that is no known endpoint.
    pub endpoint: Arc<str>,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub protocol: Cow<'static, str>,
    pub qname: String,
    pub qtype: Cow<'static, str>,
    pub rcode: Cow<'static, str>,
    pub verdict: Verdict,
    pub ips: Vec<IpAddr>,
    pub ttl: u32,
    pub cnames: Vec<String>,
    pub latency_us: u64,
}

/// One packet the datapath dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DropFlow {
    pub time_ms: u64,
    /// When the kernel refused it, nanoseconds since the Unix epoch: two drops alike within a
    /// millisecond (a UDP sender's datagrams, a retried connect) are two events, and readers
    /// that drop what they read twice (`warden observe`) tell them apart by it. 0 when unknown.
    #[serde(default)]
    pub time_ns: u64,
    pub instance: String,
    pub endpoint: String,
    pub destination: IpAddr,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FlowEvent {
    Dns(DnsFlow),
    Drop(DropFlow),
}

impl FlowEvent {
    /// Milliseconds since the Unix epoch.
    pub fn time_ms(&self) -> u64 {
        match self {
            FlowEvent::Dns(flow) => flow.time_ms,
            FlowEvent::Drop(flow) => flow.time_ms,
        }
    }

    /// `agent` or `dnsproxy`: the process that saw the event.
    pub fn instance(&self) -> &str {
        match self {
            FlowEvent::Dns(flow) => &flow.instance,
            FlowEvent::Drop(flow) => &flow.instance,
        }
    }
}

/// A follower fell behind and `count` events were not sent to it (Hubble's "events lost").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostEvents {
    /// When the loss was noticed, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The [`FlowLog`] does not know whose it is: empty from the server, filled in by readers
    /// that know which process they follow.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    pub count: u64,
}

/// One line of the flow stream (`GET /v1/flows?follow=true`): an event, or the marker of events
/// a slow follower missed. The same `type` tag as [`FlowEvent`], so an event line parses as
/// either.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FlowLine {
    Dns(DnsFlow),
    Drop(DropFlow),
    Lost(LostEvents),
}

impl From<FlowEvent> for FlowLine {
    fn from(event: FlowEvent) -> FlowLine {
        match event {
            FlowEvent::Dns(flow) => FlowLine::Dns(flow),
            FlowEvent::Drop(flow) => FlowLine::Drop(flow),
        }
    }
}

impl FlowLine {
    pub fn time_ms(&self) -> u64 {
        match self {
            FlowLine::Dns(flow) => flow.time_ms,
            FlowLine::Drop(flow) => flow.time_ms,
            FlowLine::Lost(lost) => lost.time_ms,
        }
    }

    pub fn instance(&self) -> &str {
        match self {
            FlowLine::Dns(flow) => &flow.instance,
            FlowLine::Drop(flow) => &flow.instance,
            FlowLine::Lost(lost) => &lost.instance,
        }
    }
}

/// Live events for one follower.
pub type FlowFollower = broadcast::Receiver<FlowEvent>;

/// How many live events a follower may fall behind before it loses some (and is told so).
pub(crate) const FOLLOW_BACKLOG: usize = 4096;

/// Events copied per hold of the ring's lock by a listing: the lock every answer's event takes
/// is held for microseconds at a time, where copying a ring of 10,000 events (each a name and
/// its addresses) held it for milliseconds.
const LISTING_CHUNK: usize = 256;

/// The last `capacity` flow events, plus a live feed for followers. Recording never blocks and
/// never waits for a slow follower: a follower that falls behind loses events, not the proxy.
#[derive(Debug)]
pub struct FlowLog {
    recent: Mutex<Ring>,
    capacity: usize,
    live: broadcast::Sender<FlowEvent>,
}

/// The retained events, each known by its number in the order of recording, so that a listing
/// copied a chunk at a time finds its place again after the ring has moved on.
#[derive(Debug)]
struct Ring {
    events: VecDeque<FlowEvent>,
    /// The number the next event recorded gets.
    next: u64,
}

impl Ring {
    /// The number of the oldest event retained.
    fn first(&self) -> u64 {
        self.next - self.events.len() as u64
    }
}

impl FlowLog {
    pub fn new(capacity: usize) -> FlowLog {
        let (live, _) = broadcast::channel(FOLLOW_BACKLOG);
        FlowLog {
            recent: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.min(4096)),
                next: 0,
            }),
            capacity: capacity.max(1),
            live,
        }
    }

    pub fn record(&self, event: FlowEvent) {
        let mut recent = self.lock();
        // Sent under the ring's lock so that `follow_since` splits events exactly into "already
        // retained" and "live": none twice, none missed. A broadcast send never waits.
        if self.live.receiver_count() > 0 {
            // An error only means no follower is listening any more.
            let _ = self.live.send(event.clone());
        }
        let evicted = (recent.events.len() == self.capacity)
            .then(|| recent.events.pop_front())
            .flatten();
        recent.events.push_back(event);
        recent.next += 1;
        drop(recent);
        // Freed after the lock: every answer records an event, and the evicted one's name and
        // addresses sit in memory long out of cache.
        drop(evicted);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.recent
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The retained events, oldest first.
    pub fn recent(&self) -> Vec<FlowEvent> {
        self.recent_since(None)
    }

    /// The retained events at or after `since_ms` (all of them for `None`), oldest first.
    pub fn recent_since(&self, since_ms: Option<u64>) -> Vec<FlowEvent> {
        let (first, end) = {
            let ring = self.lock();
            (ring.first(), ring.next)
        };
        self.copy(first..end, since_ms.unwrap_or(0), || {})
    }

    /// The events numbered `range` still retained, at or after `since_ms`, oldest first, copied
    /// a chunk per hold of the lock (`between_chunks` runs without it). Should the ring evict
    /// events not yet copied meanwhile, what was copied before them goes too: the listing is
    /// always an unbroken run up to `range.end`, as a listing made a little later would be,
    /// never one with a hole in the middle.
    fn copy(
        &self,
        range: std::ops::Range<u64>,
        since_ms: u64,
        mut between_chunks: impl FnMut(),
    ) -> Vec<FlowEvent> {
        let mut listed = Vec::new();
        let mut from = range.start;
        while from < range.end {
            // Room for the chunk made before the lock is taken: growing under it would hold
            // the lock for the allocation and the copy.
            listed.reserve(LISTING_CHUNK);
            // What was copied before a run the ring evicted meanwhile: dropped after the lock
            // is let go, as freeing events (their names and addresses) under it would hold it.
            let mut overtaken = 0;
            {
                let ring = self.lock();
                let first = ring.first();
                if first > from {
                    overtaken = listed.len();
                    from = first;
                }
                let start = usize::try_from(from - first).unwrap_or(usize::MAX);
                let count = usize::try_from(range.end.saturating_sub(from))
                    .unwrap_or(usize::MAX)
                    .min(LISTING_CHUNK);
                listed.extend(
                    ring.events
                        .iter()
                        .skip(start)
                        .take(count)
                        .filter(|event| event.time_ms() >= since_ms)
                        .cloned(),
                );
                from = from.saturating_add(count as u64);
            }
            listed.drain(..overtaken);
            if from < range.end {
                between_chunks();
            }
        }
        listed
    }

    pub fn follow(&self) -> FlowFollower {
        self.live.subscribe()
    }

    /// The retained events at or after `since_ms`, and a follower that gets every event
    /// recorded after them: the two together repeat nothing and leave no gap between them
    /// (should the ring evict events while they are copied, the oldest go, see `copy`).
    pub fn follow_since(&self, since_ms: Option<u64>) -> (Vec<FlowEvent>, FlowFollower) {
        // Subscribed under the ring's lock, which `record` sends under: the events numbered
        // before `end` are the retained ones, every later one goes to the follower.
        let (first, end, follower) = {
            let ring = self.lock();
            (ring.first(), ring.next, self.live.subscribe())
        };
        let retained = self.copy(first..end, since_ms.unwrap_or(0), || {});
        (retained, follower)
    }
}

/// A moment read on the wall clock and on the monotonic one together, to be compared with wall
/// times read later (in another process, too): it reads as its wall time, or earlier should the
/// wall clock have stepped back since, never later than the wall clock reads now. Without that,
/// what happens after a step back would read as older than the moment.
#[derive(Debug, Clone, Copy)]
pub struct WallMoment {
    at_ms: u64,
    at: std::time::Instant,
}

impl WallMoment {
    pub fn now() -> WallMoment {
        WallMoment::at(unix_millis())
    }

    /// A moment read earlier, at `at_ms` (a saved one, whose age is not known): placed by its
    /// wall time, never later than now.
    pub fn at(at_ms: u64) -> WallMoment {
        WallMoment {
            at_ms,
            at: std::time::Instant::now(),
        }
    }

    /// Its wall time as first read, Unix milliseconds (what is saved).
    pub fn recorded_ms(&self) -> u64 {
        self.at_ms
    }

    /// Its wall time as the wall clock reads now, Unix milliseconds.
    pub fn unix_millis(&self) -> u64 {
        let elapsed = u64::try_from(self.at.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.at_ms.min(unix_millis().saturating_sub(elapsed))
    }
}

/// Milliseconds since the Unix epoch, the clock of every flow event.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_event(port: u16) -> FlowEvent {
        FlowEvent::Drop(DropFlow {
            time_ms: 1,
            time_ns: 1_000_000,
            instance: "agent".into(),
            endpoint: "youssef/test".into(),
            destination: "198.18.1.30".parse().unwrap(),
            port,
            protocol: "tcp".into(),
        })
    }

    #[test]
    fn the_ring_keeps_the_newest_events() {
        let log = FlowLog::new(2);
        for port in 1..=3 {
            log.record(drop_event(port));
        }
        assert_eq!(log.recent(), vec![drop_event(2), drop_event(3)]);
    }

    #[tokio::test]
    async fn followers_see_events_recorded_after_they_subscribe() {
        let log = FlowLog::new(4);
        log.record(drop_event(1));
        let mut follower = log.follow();
        log.record(drop_event(2));
        assert_eq!(follower.recv().await.unwrap(), drop_event(2));
    }

    #[test]
    fn retained_events_can_be_filtered_by_time() {
        let log = FlowLog::new(8);
        for (time_ms, port) in [(10, 1), (20, 2), (30, 3)] {
            let mut event = drop_event(port);
            if let FlowEvent::Drop(flow) = &mut event {
                flow.time_ms = time_ms;
            }
            log.record(event);
        }
        let ports = |events: Vec<FlowEvent>| -> Vec<u16> {
            events
                .into_iter()
                .map(|event| match event {
                    FlowEvent::Drop(flow) => flow.port,
                    FlowEvent::Dns(_) => 0,
                })
                .collect()
        };
        assert_eq!(ports(log.recent_since(Some(20))), [2, 3]);
        assert_eq!(ports(log.recent_since(None)), [1, 2, 3]);
        assert_eq!(ports(log.follow_since(Some(31)).0), Vec::<u16>::new());
    }

    #[tokio::test]
    async fn follow_since_neither_repeats_nor_misses_an_event() {
        let log = FlowLog::new(4);
        log.record(drop_event(1));
        let (retained, mut follower) = log.follow_since(None);
        log.record(drop_event(2));
        assert_eq!(retained, vec![drop_event(1)]);
        assert_eq!(follower.recv().await.unwrap(), drop_event(2));
        assert!(follower.try_recv().is_err());
    }

    /// A listing lets go of the lock between chunks (recording there would deadlock
    /// otherwise), and neither repeats nor reorders events while the ring moves on: what came
    /// after the listing began is not in it, and should the ring evict events not yet copied,
    /// the listing is the unbroken run that is left, not one with a hole in the middle.
    #[test]
    fn a_listing_copies_a_chunk_per_hold_of_the_lock() {
        let capacity = LISTING_CHUNK * 3;
        let port = |n: usize| u16::try_from(n).unwrap();
        let ports = |events: Vec<FlowEvent>| -> Vec<u16> {
            events
                .iter()
                .map(|event| match event {
                    FlowEvent::Drop(flow) => flow.port,
                    FlowEvent::Dns(_) => u16::MAX,
                })
                .collect()
        };
        // `recorded_in_pause(n)`: events recorded during the nth pause between chunks.
        let list = |recorded_in_pause: &dyn Fn(usize) -> usize| {
            let log = FlowLog::new(capacity);
            for n in 0..capacity {
                log.record(drop_event(port(n)));
            }
            let mut next = capacity;
            let mut pauses = 0;
            let listed = log.copy(0..u64::try_from(capacity).unwrap(), 0, || {
                for _ in 0..recorded_in_pause(pauses) {
                    log.record(drop_event(port(next)));
                    next += 1;
                }
                pauses += 1;
            });
            assert_eq!(pauses, 2);
            assert_eq!(log.recent().len(), capacity);
            ports(listed)
        };
        let half = LISTING_CHUNK / 2;
        // Only copied events evicted meanwhile: the listing is whole.
        let whole: Vec<u16> = (0..capacity).map(port).collect();
        assert_eq!(list(&|_| half), whole);
        // The first pause evicts the first chunk and half the second: the listing is what is
        // left, unbroken, without the first chunk it had copied.
        let left: Vec<u16> = (LISTING_CHUNK + half..capacity).map(port).collect();
        assert_eq!(
            list(&|pause| if pause == 0 { LISTING_CHUNK + half } else { 0 }),
            left
        );
    }

    #[test]
    fn a_slow_follower_loses_events_and_recording_goes_on() {
        let log = FlowLog::new(2);
        let mut follower = log.follow();
        for port in 0..(FOLLOW_BACKLOG + 10) {
            log.record(drop_event(u16::try_from(port % 60_000).unwrap()));
        }
        assert!(matches!(
            follower.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
        assert_eq!(log.recent().len(), 2);
    }

    #[test]
    fn stream_lines_parse_events_and_loss_markers() {
        let event: FlowLine =
            serde_json::from_str(&serde_json::to_string(&drop_event(80)).unwrap()).unwrap();
        assert_eq!(event, FlowLine::from(drop_event(80)));
        let lost: FlowLine =
            serde_json::from_str(r#"{"type":"lost","time_ms":5,"count":3}"#).unwrap();
        assert_eq!(
            lost,
            FlowLine::Lost(LostEvents {
                time_ms: 5,
                instance: String::new(),
                count: 3
            })
        );
    }

    #[test]
    fn events_serialize_with_a_type_tag() {
        let json = serde_json::to_string(&drop_event(80)).unwrap();
        assert!(json.starts_with(r#"{"type":"drop""#), "{json}");
    }
}
