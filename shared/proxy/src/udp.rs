//! The UDP hot path, as three kinds of loop and no task per query.
//!
//! A listener loop reads every query queued on its socket in one call, checks each and either
//! answers it at once (denied, malformed, over the concurrency limit) or files it in the
//! upstream pool; then the batch's forwards leave in one call per pool socket and its
//! immediate answers in one more. The pool socket's answer loop reads a batch of answers,
//! claims each for its query, records what it allows and sends the batch back to the clients
//! from the listener sockets their queries came in on. A sweep loop sends again the queries
//! the upstream is late to answer and answers SERVFAIL to those it left unanswered for good.
//! A query thus costs a share of two wake-ups of
//! long-lived loops and no spawn, channel or task hop; only an answer the datapath asks to
//! hold for something asynchronous gets a task of its own.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warden_telemetry::Verdict;

use crate::answer::AnswerSummary;
use crate::context::Transport;
use crate::datagram::{Datagram, Inbox, Outbox, Outboxes};
use crate::engine::{Checked, Engine, InFlight, ListenerSlot, Outcome};
use crate::response::{packet_id, set_id};
use crate::upstream::{MAX_MESSAGE, PoolSocket, UpstreamFailure, Waiter};
use crate::wire;

/// How often silent upstreams are looked for: a timed-out query is answered at most this late.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_millis(20);
/// Sweeps that found no query in flight before the sweep loop sleeps until one comes in: an
/// idle proxy should not wake 50 times a second, and a busy one should not pay a wake-up of
/// the sweep loop each time its queries in flight drop to none and pick up again.
pub(crate) const SWEEPS_BEFORE_SLEEP: u32 = 50;
/// How long a stopped listener waits before its last look at the queue.
const DRAIN_GRACE: Duration = Duration::from_millis(1);
/// The longest a stopped listener still in the port's group goes on reading. One bound to the
/// wildcard stays in it (see [`Datagram::stop_receiving`]) and keeps getting its share of a
/// steady stream, so waiting for it to fall quiet would hold the shutdown, and the state saved
/// after it, until killed. A socket that left the group is read until empty: nothing new comes
/// in, and what it holds (up to its receive buffer's worth) is answered.
const DRAIN_LIMIT: Duration = Duration::from_millis(100);
/// Datagrams read or written per system call at most.
const BATCH: usize = 32;
/// Batches a listener loop forwards from one pool socket before it takes the pool's next turn.
/// The answers to queries sent from one socket come back on it, to the same answer loop, which
/// can read them together. With the turn passed on at every batch, a proxy below its full rate
/// (a batch of one or two queries) woke a different answer loop for nearly every answer, and
/// its tail was longer: by hand at 42,000 to 45,000 QPS the p99 was shorter with the run in ten
/// alternating rounds of eleven (their mean 372 µs against 634 µs), CPU per query and max QPS
/// within the noise. A run is short enough, at most 64 × 32 queries, that every socket's port
/// and IDs stay in use, and long enough that a switch comes once in 64 batches.
pub(crate) const BATCHES_PER_TURN: u32 = 64;
/// Room for one query: far more than any real one needs (a question and an OPT record), and
/// anything longer is counted malformed, over TCP too.
pub(crate) const QUERY_SLOT: usize = 4096;

/// A forwarded query waiting in the pool for its answer.
#[derive(Debug)]
pub(crate) struct Waiting {
    /// Index of the listener socket the query came in on.
    listener: usize,
    /// The client's packet as received: the answer gets its ID back, a SERVFAIL its question.
    query: Vec<u8>,
    question: Range<usize>,
    checked: Checked,
    asked: Instant,
    _in_flight: InFlight,
}

impl Waiter for Waiting {
    fn question(&self) -> &[u8] {
        self.query.get(self.question.clone()).unwrap_or_default()
    }

    fn packet(&self) -> &[u8] {
        &self.query
    }
}

/// Serves one listener socket until `stop`; then takes it out of the port's SO_REUSEPORT group
/// and serves what it already holds. The kernel keeps handing an open socket its share of the
/// port's queries, so a socket must neither sit open unread nor close with a queue: with a
/// peer on the port, a graceful restart then loses nothing even without the datapath to steer
/// queries away.
pub(crate) async fn listener_loop(engine: Arc<Engine>, listener: usize, stop: CancellationToken) {
    let Some(slot) = engine.udp_listeners.get(listener) else {
        return;
    };
    let Some(socket) = slot.get() else {
        return;
    };
    let mut batch = Batch::new(&engine);
    // One wait for the token for the whole loop: a new one per batch would register with the
    // token's waiters and leave them again each time; pinned, a poll only checks it.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let received = tokio::select! {
            biased;
            _ = &mut stopped => break,
            received = socket.recv_batch(&mut batch.inbox) => received,
        };
        match received {
            Ok(count) => batch.serve(&engine, listener, &socket, count).await,
            Err(error) => tracing::debug!(%error, "DNS UDP receive error"),
        }
    }
    // Leave the port's group without losing what the socket already holds: connected to its
    // own address it matches no client's datagram any more, so the kernel hands each new one
    // to another socket of the port (or, with none left, refuses it), while the queue stays
    // readable. Closing would drop the queue; reading it empty and then closing would race the
    // next arrival.
    let left = match socket.stop_receiving() {
        Ok(true) => true,
        // Drained in the group: a datagram arriving after the last read is lost at close.
        Ok(false) => {
            tracing::debug!("a wildcard DNS socket is drained without leaving the port's group");
            false
        }
        Err(error) => {
            tracing::warn!(%error, "cannot take the DNS socket out of the port's group");
            false
        }
    };
    // Drained when a read finds nothing twice, a moment apart: a datagram already past the
    // kernel's socket lookup when the socket connected may still land. Out of the group, the
    // queue only shrinks and is read to its end however long that takes; in it, for
    // `DRAIN_LIMIT`.
    let mut quiet_reads = 0;
    let drain_until = drain_deadline(left, Instant::now());
    while quiet_reads < 2 && drain_until.is_none_or(|until| Instant::now() < until) {
        match socket.recv_batch_now(&mut batch.inbox) {
            Ok(count) => {
                quiet_reads = 0;
                batch.serve(&engine, listener, &socket, count).await;
            }
            Err(error) => {
                if error.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::debug!(%error, "DNS UDP receive error");
                }
                quiet_reads += 1;
                tokio::time::sleep(DRAIN_GRACE).await;
            }
        }
    }
    // The socket closes when the queries in flight are answered (`serve_and_leave`).
}

/// Until when a stopped listener reads: a socket that left the port's group until its queue
/// is empty, one still in it for [`DRAIN_LIMIT`].
fn drain_deadline(left_the_group: bool, now: Instant) -> Option<Instant> {
    (!left_the_group).then(|| now + DRAIN_LIMIT)
}

/// A listener loop's buffers, reused batch after batch.
struct Batch {
    inbox: Inbox,
    replies: Outbox,
    /// One outbox per pool socket, and the IDs its queries were filed under.
    forwards: Outboxes,
    forwarded_ids: Vec<Vec<u16>>,
    /// The batch's queries to forward, by their index in the inbox, until they are filed
    /// together.
    filing: Vec<(usize, SocketAddr, Instant, Waiting)>,
    /// The pool's turn this loop forwards on (see [`BATCHES_PER_TURN`]).
    turn: usize,
    /// Batches this loop still forwards on `turn` before it takes the next.
    batches_left_on_turn: u32,
}

impl Batch {
    fn new(engine: &Engine) -> Batch {
        Batch {
            inbox: Inbox::new(BATCH, QUERY_SLOT),
            replies: Outbox::new(BATCH),
            forwards: Outboxes::new(engine.upstream.sockets().len(), BATCH),
            forwarded_ids: engine
                .upstream
                .sockets()
                .iter()
                .map(|_| Vec::new())
                .collect(),
            filing: Vec::with_capacity(BATCH),
            turn: 0,
            batches_left_on_turn: 0,
        }
    }

    /// The pool's turn for this batch's forwards: the run's, counted down, or the pool's next
    /// once the run is over (see [`BATCHES_PER_TURN`]).
    fn take_turn(&mut self, engine: &Engine) -> usize {
        if self.batches_left_on_turn == 0 {
            self.turn = engine.upstream.next_socket();
            self.batches_left_on_turn = BATCHES_PER_TURN;
        }
        self.batches_left_on_turn -= 1;
        self.turn
    }

    /// Handles the `count` queries just read: each is answered or filed, then the forwards
    /// leave, then the answers.
    async fn serve(&mut self, engine: &Engine, listener: usize, socket: &Datagram, count: usize) {
        let started = Instant::now();
        let turn = self.take_turn(engine);
        for index in 0..count {
            let (packet, client) = match self.inbox.get_mut(index) {
                Some(Ok(received)) => received,
                Some(Err(())) => {
                    engine.malformed(Transport::Udp);
                    continue;
                }
                None => break,
            };
            let to_file = Filing {
                queue: &mut self.filing,
                index,
            };
            match query(engine, listener, client, packet, started, to_file) {
                Step::Reply(reply) => {
                    self.replies.push(&reply, client);
                }
                Step::Forward | Step::Drop => {}
            }
        }
        let Batch {
            inbox,
            replies,
            forwards,
            forwarded_ids,
            filing,
            ..
        } = self;
        // Filed but with nowhere to go (never, as the inbox and outboxes are built): taken
        // back once the pool's lock is released, not left to time out.
        let mut unsent = Vec::new();
        engine
            .upstream
            .register_batch(turn, filing.drain(..), |index, filed| match filed {
                Ok((pool_index, id, target)) => {
                    if let (Some(outbox), Some(ids), Some(Ok((packet, _)))) = (
                        forwards.get_mut(pool_index),
                        forwarded_ids.get_mut(pool_index),
                        inbox.get_mut(index),
                    ) {
                        set_id(outbox.push(packet, target), id);
                        ids.push(id);
                    } else {
                        unsent.push((pool_index, id));
                    }
                }
                Err(waiting) => {
                    let client = waiting.checked.client;
                    if let Some(reply) = fail(engine, waiting, UpstreamFailure::Exhausted) {
                        replies.push(&reply, client);
                    }
                }
            });
        for (pool_index, id) in unsent {
            let Some(waiting) = engine
                .upstream
                .sockets()
                .get(pool_index)
                .and_then(|socket| socket.cancel(id))
            else {
                continue;
            };
            let client = waiting.checked.client;
            if let Some(reply) = fail(engine, waiting, UpstreamFailure::Io) {
                self.replies.push(&reply, client);
            }
        }
        // Forwards first: their answers take the longest.
        for (pool_index, outbox) in self.forwards.filled() {
            let (Some(pool_socket), Some(ids)) = (
                engine.upstream.sockets().get(pool_index),
                self.forwarded_ids.get_mut(pool_index),
            ) else {
                outbox.clear();
                continue;
            };
            for failed in pool_socket.datagram().send_batch(outbox).await {
                // Claimed in between, in theory: then it is answered there.
                let Some(waiting) = ids.get(failed).and_then(|id| pool_socket.cancel(*id)) else {
                    continue;
                };
                let client = waiting.checked.client;
                if let Some(reply) = fail(engine, waiting, UpstreamFailure::Io) {
                    self.replies.push(&reply, client);
                }
            }
            ids.clear();
        }
        if !self.replies.is_empty() {
            let unsent = socket.send_batch(&mut self.replies).await;
            engine.answers_unsent(unsent.len());
        }
    }
}

/// What became of one client query.
enum Step {
    /// Answered here and now (denied, refused, failed).
    Reply(Vec<u8>),
    /// Queued for filing in the pool with the batch's others, and forwarding.
    Forward,
    /// Not worth an answer.
    Drop,
}

/// Where a query to forward waits for the batch's filing: its inbox index goes with it.
struct Filing<'a> {
    queue: &'a mut Vec<(usize, SocketAddr, Instant, Waiting)>,
    index: usize,
}

/// One client query: checked, then answered at once or queued in `to_file` for forwarding.
fn query(
    engine: &Engine,
    listener: usize,
    client: SocketAddr,
    packet: &[u8],
    started: Instant,
    to_file: Filing<'_>,
) -> Step {
    let reply = |reply: Option<Vec<u8>>| reply.map_or(Step::Drop, Step::Reply);
    let mut query = match engine.read(packet, Transport::Udp) {
        Ok(query) => query,
        Err(refusal) => return reply(refusal),
    };
    let checked = engine.check(&mut query, client, Transport::Udp, started);
    if !checked.allowed {
        return Step::Reply(engine.deny(&query, checked));
    }
    let Some(in_flight) = engine.admit() else {
        engine.finish(checked, Outcome::failed());
        return Step::Reply(wire::error_response(
            &query,
            u16::from(ResponseCode::ServFail),
        ));
    };
    let server = checked.server;
    let asked = checked.checked_at;
    let waiting = Waiting {
        listener,
        query: packet.to_vec(),
        question: query.question.clone(),
        checked,
        asked,
        _in_flight: in_flight,
    };
    let deadline = asked + engine.settings.upstream_timeout;
    to_file
        .queue
        .push((to_file.index, server, deadline, waiting));
    Step::Forward
}

/// SERVFAIL for a forwarded query that got no usable answer, accounted for.
fn fail(engine: &Engine, waiting: Waiting, failure: UpstreamFailure) -> Option<Vec<u8>> {
    // Only a query that went out waited for the upstream: one that could not be filed or sent
    // would pull its histogram towards zero.
    if matches!(failure, UpstreamFailure::Timeout) {
        engine.upstream_waited(waiting.asked);
    }
    engine.upstream_failed(failure, &waiting.checked);
    let reply = servfail(&waiting);
    engine.finish(waiting.checked, Outcome::failed());
    reply
}

/// SERVFAIL to the query `waiting` forwarded.
fn servfail(waiting: &Waiting) -> Option<Vec<u8>> {
    wire::parse_query(&waiting.query)
        .ok()
        .map(|query| wire::error_response(&query, u16::from(ResponseCode::ServFail)))
}

/// Reads one pool socket's answers until `shutdown`.
pub(crate) async fn answer_loop(
    engine: Arc<Engine>,
    socket: Arc<PoolSocket<Waiting>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut inbox = Inbox::new(BATCH, MAX_MESSAGE);
    // One outbox per listener socket: answers leave from where their query came in.
    let mut answers = Outboxes::new(engine.udp_listeners.len(), BATCH);
    // As in `listener_loop`: one wait for the token, not one per batch.
    let stopped = shutdown.cancelled();
    tokio::pin!(stopped);
    loop {
        let received = tokio::select! {
            _ = &mut stopped => return,
            received = socket.datagram().recv_batch(&mut inbox) => received,
        };
        let count = match received {
            Ok(count) => count,
            Err(error) => {
                // ICMP errors from earlier sends surface here; they concern no one query.
                tracing::trace!(%error, "upstream socket receive error");
                continue;
            }
        };
        // One time for the batch: its answers all came before it, and it serves both their
        // wait for the upstream and the round-trip estimate without a clock read each.
        let received_at = Instant::now();
        for index in 0..count {
            let (packet, from) = match inbox.get_mut(index) {
                Some(Ok(received)) => received,
                Some(Err(())) => {
                    engine.upstream_unexpected("malformed");
                    continue;
                }
                None => break,
            };
            let (waiting, answer) = match socket.claim(from, packet, received_at) {
                Ok(claimed) => claimed,
                Err(reason) => {
                    engine.upstream_unexpected(reason);
                    continue;
                }
            };
            engine.upstream_answered(waiting.asked, received_at);
            set_id(packet, packet_id(&waiting.query).unwrap_or(0));
            let cut_short = answer.cut_short;
            // The hold is timed from here, not from the batch's time: it measures the
            // datapath, not the answers ahead of this one.
            let held = Instant::now();
            let (outcome, hold) = engine.record(&waiting.checked, answer, packet, held);
            match hold {
                None if outcome.verdict == Verdict::Error => {
                    if let (Some(outbox), Some(refusal)) =
                        (answers.get_mut(waiting.listener), servfail(&waiting))
                    {
                        outbox.push(&refusal, waiting.checked.client);
                    }
                    engine.finish(waiting.checked, outcome);
                }
                None => {
                    let mut outcome = outcome;
                    if let Some(outbox) = answers.get_mut(waiting.listener) {
                        let truncated = instead(&engine, &waiting, packet, cut_short);
                        if truncated.is_some() {
                            outcome.summary = AnswerSummary::default();
                        }
                        outbox.push(
                            truncated.as_deref().unwrap_or(packet),
                            waiting.checked.client,
                        );
                    }
                    engine.finish(waiting.checked, outcome);
                }
                Some(hold) => {
                    // The datapath must finish something first: only this answer waits for it.
                    let engine = engine.clone();
                    let packet = packet.to_vec();
                    let tracker_inner = tracker.clone();
                    tracker.spawn(async move {
                        engine.hold(hold).await;
                        let mut outcome = outcome;
                        if answer_client(&engine, &waiting, &packet, cut_short, &tracker_inner) {
                            outcome.summary = AnswerSummary::default();
                        }
                        engine.finish(waiting.checked, outcome);
                    });
                }
            }
        }
        for (listener, outbox) in answers.filled() {
            match engine
                .udp_listeners
                .get(listener)
                .and_then(ListenerSlot::get)
            {
                Some(listener_socket) => {
                    let unsent = listener_socket.send_batch(outbox).await;
                    engine.answers_unsent(unsent.len());
                }
                // Closed: no query of its can be in flight, so this cannot happen; if it did,
                // there is no way left to answer from the port.
                None => outbox.clear(),
            }
        }
    }
}

/// Sends the answer (or the TC answer that goes instead: then returns true, the client having
/// got none of its records, which the flow event must not show).
fn answer_client(
    engine: &Engine,
    waiting: &Waiting,
    packet: &[u8],
    cut_short: bool,
    tracker: &TaskTracker,
) -> bool {
    let Some(socket) = engine
        .udp_listeners
        .get(waiting.listener)
        .and_then(ListenerSlot::get)
    else {
        return false;
    };
    let truncated = instead(engine, waiting, packet, cut_short);
    let reply = truncated.as_deref().unwrap_or(packet);
    send_reply(engine, &socket, reply, waiting.checked.client, tracker);
    truncated.is_some()
}

/// The TC answer that goes instead of `packet`, if one must: when the answer is larger than
/// the client said it can take (an upstream that ignored the client's OPT record, which went
/// to it untouched; counted as `oversized`), or is a TC answer cut short inside a record
/// (`cut_short`, counted so). Either way the client asks again over TCP rather than getting a
/// datagram it cannot read whole. The client's query is read again only for those, and for
/// answers past 512 bytes.
fn instead(engine: &Engine, waiting: &Waiting, packet: &[u8], cut_short: bool) -> Option<Vec<u8>> {
    if packet.len() <= usize::from(wire::MIN_UDP_PAYLOAD) && !cut_short {
        return None;
    }
    let query = wire::parse_query(&waiting.query).ok()?;
    if cut_short {
        engine.upstream_unexpected("cut_short");
    } else if packet.len() > wire::udp_limit(&query) {
        engine.upstream_unexpected("oversized");
    } else {
        return None;
    }
    Some(wire::truncated_response(&query))
}

/// Sends again the queries the upstream is late to answer, and answers SERVFAIL to those whose
/// upstream stayed silent past `upstream_timeout`, until `shutdown`.
pub(crate) async fn sweep_loop(
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let period = SWEEP_EVERY
        .min(engine.settings.upstream_timeout)
        .max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle_sweeps = 0;
    // Copies are rare: most pool sockets never make their outbox.
    let mut resends = Outboxes::new(engine.upstream.sockets().len(), BATCH);
    loop {
        if idle_sweeps >= SWEEPS_BEFORE_SLEEP {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = engine.in_flight.busy() => {}
            }
            idle_sweeps = 0;
            // The first look one period after the query came, not at once.
            ticks.reset();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let expired = engine
            .upstream
            .sweep(Instant::now(), |pool_index, id, target, waiting| {
                if let Some(outbox) = resends.get_mut(pool_index) {
                    set_id(outbox.push(waiting.packet(), target), id);
                }
            });
        for waiting in expired {
            time_out(&engine, waiting, &tracker);
        }
        for (pool_index, outbox) in resends.filled() {
            let Some(pool_socket) = engine.upstream.sockets().get(pool_index) else {
                outbox.clear();
                continue;
            };
            let copies = outbox.len();
            // Without waiting for room: a sweep held up by a full send buffer would answer the
            // timed-out queries late. A copy that cannot leave only costs its query the
            // round-trip sample of its answer (it counts as sent twice); it waits for the
            // first copy's answer, or its deadline.
            let failed = pool_socket.datagram().send_batch_now(outbox).await;
            engine.upstream_retransmitted(copies.saturating_sub(failed.len()));
        }
        if engine.in_flight.is_idle() {
            idle_sweeps += 1;
        } else {
            idle_sweeps = 0;
        }
    }
}

/// SERVFAIL to the client of a query whose upstream did not answer in time.
pub(crate) fn time_out(engine: &Engine, waiting: Waiting, tracker: &TaskTracker) {
    let client = waiting.checked.client;
    let listener = waiting.listener;
    if let Some(reply) = fail(engine, waiting, UpstreamFailure::Timeout)
        && let Some(socket) = engine
            .udp_listeners
            .get(listener)
            .and_then(ListenerSlot::get)
    {
        send_reply(engine, &socket, &reply, client, tracker);
    }
}

/// Sends an answer; a full send buffer hands it to a task of its own rather than holding up
/// the loop for every query behind it.
fn send_reply(
    engine: &Engine,
    socket: &Arc<Datagram>,
    reply: &[u8],
    client: SocketAddr,
    tracker: &TaskTracker,
) {
    match socket.try_send_to(reply, client) {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
            let socket = socket.clone();
            let reply = reply.to_vec();
            let unsent = engine.unsent_answers().clone();
            tracker.spawn(async move {
                if let Err(error) = socket.send_to(&reply, client).await {
                    unsent.inc();
                    tracing::debug!(%client, %error, "cannot send DNS answer");
                }
            });
        }
        Err(error) => {
            engine.answers_unsent(1);
            tracing::debug!(%client, %error, "cannot send DNS answer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drain limit, there for a wildcard socket that stays in the port's group, cut the
    /// queue of a socket that had left it, which the proxy answers whole however long it takes.
    #[test]
    fn only_a_socket_still_in_the_group_drains_for_a_limited_time() {
        let now = Instant::now();
        assert_eq!(drain_deadline(true, now), None);
        assert_eq!(drain_deadline(false, now), Some(now + DRAIN_LIMIT));
    }
}
