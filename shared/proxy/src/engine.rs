//! The steps every query goes through, whatever its transport: read it, find who sent it and
//! check the DNS rules, hold its place in the concurrency limit, record what its answer
//! allows, and account for it (metrics, flow event). [`crate::udp`] and [`crate::tcp`] drive
//! these steps; nothing here does I/O.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use smallvec::SmallVec;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use warden_policy::{DnsName, EndpointId, FqdnGrant, PolicyRepository};
use warden_telemetry::{DnsFlow, FlowEvent, LogBudget, Metrics, Scope, Verdict, unix_millis};

use crate::answer::AnswerSummary;
use crate::context::{
    AllowRequest, ClientContext, HoldFuture, Mapping, ProxyContext, Transport, UNKNOWN_ENDPOINT,
};
use crate::datagram::Datagram;
use crate::response::{RCODE_NAMES, rcode_index, rcode_name};
use crate::server::ProxySettings;
use crate::udp::Waiting;
use crate::upstream::{UpstreamFailure, UpstreamPool};
use crate::wire::{self, Query};

/// What every loop of the proxy shares: settings, context, the UDP listeners (answers go out
/// through the socket their query came in on) and the upstream pool with its waiting queries.
pub(crate) struct Engine {
    pub settings: ProxySettings,
    pub context: ProxyContext,
    pub udp_listeners: Vec<ListenerSlot>,
    pub upstream: UpstreamPool<Waiting>,
    pub in_flight: Arc<InFlightCount>,
    timings: Timings,
    queries: QueryCounters,
    limiter: Option<Arc<Semaphore>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A UDP listener socket that can be closed while loops still share the engine. Closing takes
/// the socket out of the port's SO_REUSEPORT group at once, so that the kernel stops handing
/// it queries nobody will read; the loops borrow the socket only for a batch at a time.
#[derive(Debug)]
pub(crate) struct ListenerSlot(RwLock<Option<Arc<Datagram>>>);

impl ListenerSlot {
    fn new(socket: Arc<Datagram>) -> ListenerSlot {
        ListenerSlot(RwLock::new(Some(socket)))
    }

    /// The socket, unless it is closed.
    pub fn get(&self) -> Option<Arc<Datagram>> {
        self.0
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Drops the engine's handle; the socket closes when the last batch using it is sent.
    pub fn close(&self) {
        self.0
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
    }
}

/// The histograms of each query's phases, looked up once rather than per query.
struct Timings {
    total: Histogram,
    policy_check: Histogram,
    upstream: Histogram,
    datapath_hold: Histogram,
}

/// `dns_queries_total` by (verdict, rcode, transport), each series resolved on first use:
/// looking labels up per query costs a hash and a lock.
struct QueryCounters {
    family: IntCounterVec,
    slots: Vec<OnceLock<IntCounter>>,
}

/// The longest TTL taken as given (see `crate::answer::usable_ttl`).
const LONGEST_USABLE_TTL: u32 = i32::MAX.unsigned_abs();
const VERDICTS: [Verdict; 3] = [Verdict::Allowed, Verdict::Denied, Verdict::Error];
const RCODE_LABELS: usize = RCODE_NAMES.len();
const TRANSPORTS: [Transport; 2] = [Transport::Udp, Transport::Tcp];

impl QueryCounters {
    fn new(family: IntCounterVec) -> QueryCounters {
        let slots = (0..VERDICTS.len() * RCODE_LABELS * TRANSPORTS.len())
            .map(|_| OnceLock::new())
            .collect();
        QueryCounters { family, slots }
    }

    fn inc(&self, verdict: Verdict, rcode: ResponseCode, transport: Transport) {
        let verdict_index = VERDICTS.iter().position(|v| *v == verdict).unwrap_or(0);
        let rcode_index = rcode_index(rcode);
        let transport_index = usize::from(transport == Transport::Tcp);
        let slot =
            (verdict_index * RCODE_LABELS + rcode_index) * TRANSPORTS.len() + transport_index;
        match self.slots.get(slot) {
            Some(cell) => cell
                .get_or_init(|| {
                    self.family.with_label_values(&[
                        verdict.as_str(),
                        rcode_name(rcode),
                        transport.as_str(),
                    ])
                })
                .inc(),
            None => self
                .family
                .with_label_values(&[verdict.as_str(), rcode_name(rcode), transport.as_str()])
                .inc(),
        }
    }
}

/// How many queries are between admission and answer, for the gauge and for the drain at
/// shutdown (which waits for zero).
#[derive(Debug)]
pub(crate) struct InFlightCount {
    count: AtomicUsize,
    gauge: IntGauge,
    idle: Notify,
    /// Raised when the first query comes in after none was in flight.
    busy: Notify,
}

impl InFlightCount {
    pub fn is_idle(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Returns once a query is in flight.
    pub async fn busy(&self) {
        loop {
            // A notification sent before this waits is kept for it (`notify_one`).
            let notified = self.busy.notified();
            if !self.is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// Returns once no query is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }
}

/// An admitted query's place: releases its concurrency slot and lowers the count however
/// the query ends.
#[derive(Debug)]
pub(crate) struct InFlight {
    count: Arc<InFlightCount>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.gauge.dec();
        if self.count.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.count.idle.notify_waiters();
        }
    }
}

/// A query read and checked against the policy: what the rest of its life needs.
#[derive(Debug)]
pub(crate) struct Checked {
    pub client: SocketAddr,
    pub transport: Transport,
    pub started: Instant,
    /// When the policy check ended (and forwarding began).
    pub checked_at: Instant,
    pub endpoint_key: Arc<str>,
    /// The sender's endpoint, if it is one.
    pub endpoint_id: Option<EndpointId>,
    /// Where the query goes: the client's original server, or the configured upstream.
    pub server: SocketAddr,
    /// The queried name as policy sees it, or as the client sent it when no rule can express
    /// it (an empty label, say).
    pub name: Result<DnsName, String>,
    pub qtype: u16,
    pub policy: Arc<PolicyRepository>,
    pub allowed: bool,
}

impl Checked {
    pub fn qname(&self) -> &str {
        match &self.name {
            Ok(name) => name.as_str(),
            Err(text) => text,
        }
    }
}

/// The outcome of one query, for metrics and the flow event.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub verdict: Verdict,
    pub rcode: ResponseCode,
    pub summary: AnswerSummary,
}

impl Outcome {
    pub fn failed() -> Outcome {
        Outcome {
            verdict: Verdict::Error,
            rcode: ResponseCode::ServFail,
            summary: AnswerSummary::default(),
        }
    }
}

/// Why a packet gets no forwarding: the answer to send instead, if any.
pub(crate) type Refusal = Option<Vec<u8>>;

impl Engine {
    pub fn new(
        settings: ProxySettings,
        context: ProxyContext,
        udp_listeners: Vec<Arc<Datagram>>,
        upstream: UpstreamPool<Waiting>,
    ) -> Engine {
        let metrics: &Metrics = &context.metrics;
        let timings = Timings {
            total: metrics.histogram(Scope::Total),
            policy_check: metrics.histogram(Scope::PolicyCheck),
            upstream: metrics.histogram(Scope::Upstream),
            datapath_hold: metrics.histogram(Scope::DatapathHold),
        };
        let queries = QueryCounters::new(metrics.dns.queries.clone());
        let in_flight = Arc::new(InFlightCount {
            count: AtomicUsize::new(0),
            gauge: metrics.dns.in_flight.clone(),
            idle: Notify::new(),
            busy: Notify::new(),
        });
        let limiter = (settings.concurrency_limit > 0)
            .then(|| Arc::new(Semaphore::new(settings.concurrency_limit)));
        Engine {
            settings,
            context,
            udp_listeners: udp_listeners.into_iter().map(ListenerSlot::new).collect(),
            upstream,
            in_flight,
            timings,
            queries,
            limiter,
        }
    }

    /// The longest a query can take once admitted: how long shutdown waits for stragglers.
    pub fn drain_timeout(&self) -> Duration {
        self.settings.upstream_timeout + self.settings.response_max_delay + Duration::from_secs(1)
    }

    /// A TCP connection closed at once: its client already holds its share.
    pub fn tcp_refused(&self) {
        self.context.metrics.dns.tcp_refused.inc();
    }

    /// A TCP connection closed because its client took no answer for the idle timeout.
    pub fn tcp_unread(&self) {
        self.context.metrics.dns.tcp_unread.inc();
    }

    /// `count` UDP answers the kernel would not send to their clients.
    pub fn answers_unsent(&self, count: usize) {
        self.unsent_answers()
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// The count of UDP answers the kernel would not send, for a task sending one later.
    pub fn unsent_answers(&self) -> &prometheus::IntCounter {
        &self.context.metrics.dns.answers_unsent
    }

    pub fn malformed(&self, transport: Transport) {
        self.context
            .metrics
            .dns
            .malformed
            .with_label_values(&[transport.as_str()])
            .inc();
    }

    /// Reads a client's packet; a packet that is no standard query with one question gets the
    /// answer the protocol asks for (FORMERR, NOTIMP), or none when it is not even that.
    pub fn read<'a>(&self, packet: &'a [u8], transport: Transport) -> Result<Query<'a>, Refusal> {
        let query = match wire::parse_query(packet) {
            Ok(query) => query,
            Err(_) => {
                self.malformed(transport);
                return Err(None);
            }
        };
        if query.opcode != 0 {
            // Counted with the malformed: not a standard query (NOTIFY, UPDATE, ...), which a
            // forwarding proxy does not serve.
            self.malformed(transport);
            return Err(Some(wire::error_response(
                &query,
                u16::from(ResponseCode::NotImp),
            )));
        }
        if query.question_count != 1 {
            self.malformed(transport);
            return Err(Some(wire::error_response(
                &query,
                u16::from(ResponseCode::FormErr),
            )));
        }
        Ok(query)
    }

    /// Who sent the query, where it was going, and whether the DNS rules let it through.
    pub fn check(
        &self,
        query: &mut Query<'_>,
        client: SocketAddr,
        transport: Transport,
        started: Instant,
    ) -> Checked {
        let ClientContext {
            endpoint,
            original_server,
            unresolved,
        } = self.context.endpoints.lookup(client, transport);
        let server = original_server.unwrap_or(self.settings.upstream);
        let policy = self.context.policy.current();
        // Taken, not copied: what follows needs only the packet and its question.
        let name = DnsName::try_from_string(std::mem::take(&mut query.qname));
        let allowed = match (&endpoint, &name) {
            // No policy can select a sender that is no endpoint: it is not enforced. One the
            // datapath enrolled is an endpoint all the same, only not known here yet.
            (None, _) => !unresolved,
            (Some((endpoint, _)), Ok(name)) => {
                policy.dns_allowed(*endpoint, server, transport.l4(), name)
            }
            // A name no rule can express is only for unenforced endpoints.
            (Some((endpoint, _)), Err(_)) => !policy.is_enforced(*endpoint),
        };
        let checked_at = Instant::now();
        self.timings
            .policy_check
            .observe(checked_at.duration_since(started).as_secs_f64());
        let endpoint_id = endpoint.as_ref().map(|(id, _)| *id);
        let endpoint_key = endpoint.map_or_else(|| Arc::from(UNKNOWN_ENDPOINT), |(_, key)| key);
        Checked {
            client,
            transport,
            started,
            checked_at,
            endpoint_key,
            endpoint_id,
            server,
            name,
            qtype: query.qtype,
            policy,
            allowed,
        }
    }

    /// The reject answer for a denied query, accounted for; SERVFAIL for a sender whose
    /// endpoint is not known yet, whose policy was not checked.
    pub fn deny(&self, query: &Query<'_>, checked: Checked) -> Vec<u8> {
        // Only a sender of no known endpoint that the datapath vouches for is refused without
        // an endpoint (see `ClientContext::unresolved`): its policy was never checked.
        if checked.endpoint_id.is_none() {
            static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
            if let Some(held_back) = BUDGET.allow() {
                tracing::warn!(client = %checked.client, held_back, "query from an enrolled cgroup of no known endpoint: SERVFAIL");
            }
            self.finish(checked, Outcome::failed());
            return wire::error_response(query, u16::from(ResponseCode::ServFail));
        }
        let reject = self.settings.reject;
        self.finish(
            checked,
            Outcome {
                verdict: Verdict::Denied,
                rcode: reject,
                summary: AnswerSummary::default(),
            },
        );
        wire::error_response(query, u16::from(reject))
    }

    /// A place among the queries in flight, or `None` at the concurrency limit (counted; the
    /// caller answers SERVFAIL).
    pub fn admit(&self) -> Option<InFlight> {
        let permit = match &self.limiter {
            None => None,
            Some(limiter) => match limiter.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    self.context.metrics.dns.concurrency_rejections.inc();
                    return None;
                }
            },
        };
        if self.in_flight.count.fetch_add(1, Ordering::AcqRel) == 0 {
            self.in_flight.busy.notify_one();
        }
        self.in_flight.gauge.inc();
        Some(InFlight {
            count: self.in_flight.clone(),
            _permit: permit,
        })
    }

    pub fn upstream_failed(&self, failure: UpstreamFailure, checked: &Checked) {
        tracing::debug!(server = %checked.server, qname = checked.qname(), reason = failure.as_str(), "upstream failed");
        self.context
            .metrics
            .dns
            .upstream_errors
            .with_label_values(&[failure.as_str()])
            .inc();
    }

    /// Times the wait for the upstream; returns now.
    pub fn upstream_waited(&self, asked: Instant) -> Instant {
        let now = Instant::now();
        self.upstream_answered(asked, now);
        now
    }

    /// Times the wait for an upstream answer read at `answered` (its batch's time).
    pub fn upstream_answered(&self, asked: Instant, answered: Instant) {
        self.timings
            .upstream
            .observe(answered.saturating_duration_since(asked).as_secs_f64());
    }

    /// Counts queries sent upstream a second time, their first copy unanswered.
    pub fn upstream_retransmitted(&self, copies: usize) {
        self.context
            .metrics
            .dns
            .upstream_retransmits
            .inc_by(u64::try_from(copies).unwrap_or(u64::MAX));
    }

    pub fn upstream_unexpected(&self, reason: &str) {
        self.context
            .metrics
            .dns
            .upstream_unexpected
            .with_label_values(&[reason])
            .inc();
    }

    /// What an upstream answer means for the query, and what it must wait for before it is
    /// released: caches the answer and writes its allow entries (synchronously, or through
    /// the returned future, which the caller awaits for at most `response_max_delay`). The
    /// hold is timed from `held`, when the answer came. An outcome of [`Verdict::Error`] means
    /// the answer must not be released: the cache refused a new name of an endpoint at
    /// `max_names_per_endpoint` whose own toFQDNs rules match it, so nothing would allow the
    /// IPs the client is about to use; it gets SERVFAIL. (An answer no rule of the sender's
    /// needs is released uncached.) TTLs past `max_ttl` are lowered first, in `packet` (the
    /// answer as it will go to the client) and in what the cache records.
    pub fn record(
        &self,
        checked: &Checked,
        mut answer: wire::Answer,
        packet: &mut [u8],
        held: Instant,
    ) -> (Outcome, Option<Hold>) {
        // Without a cap, TTLs of 2^31 or more are still rewritten: the cache reads them as 0
        // (RFC 2181 §8), and a client told otherwise would use the address past its allow
        // entries.
        let max_ttl = match self.settings.max_ttl {
            0 => u32::MAX,
            cap => cap,
        };
        if answer.longest_ttl > max_ttl.min(LONGEST_USABLE_TTL) {
            // `parse_answer` accepted the packet, so this cannot fail; were it to, the answer
            // could be half rewritten, and it is not released.
            if wire::cap_ttls(packet, max_ttl).is_err() {
                return (Outcome::failed(), None);
            }
            answer.summary.ttl = answer.summary.ttl.min(max_ttl);
        }
        let mut outcome = Outcome {
            verdict: Verdict::Allowed,
            rcode: ResponseCode::from(
                u8::try_from(answer.rcode >> 4).unwrap_or(u8::MAX),
                u8::try_from(answer.rcode & 0x0f).unwrap_or(0),
            ),
            summary: answer.summary,
        };
        let Ok(name) = &checked.name else {
            return (outcome, None);
        };
        if outcome.rcode != ResponseCode::NoError || outcome.summary.ips.is_empty() {
            return (outcome, None);
        }
        // Only answers to queries under DNS rules teach the cache, whose names open every
        // endpoint's toFQDNs rules (`PolicyRepository::dns_visible`). An unenforced or unknown
        // sender, or one allowed the server without DNS rules, may ask any server anything
        // (one it runs itself), and what it is told must not open the names for others. (As
        // in Cilium, whose proxy sees only the queries of DNS rules.)
        if !checked.endpoint_id.is_some_and(|id| {
            checked
                .policy
                .dns_visible(id, checked.server, checked.transport.l4())
        }) {
            return (outcome, None);
        }
        // On the stack: a name's grants are a few (one per endpoint of each matching rule).
        let mut grants: SmallVec<[FqdnGrant; 4]> = SmallVec::new();
        checked.policy.fqdn_grants(name, &mut grants);
        let (inserted, max_ips, answered_ms) = {
            let mut cache = self.context.cache.lock();
            // Read under the lock, where the agent remembers a cache clean before walking the
            // cache: an answer timed before a clean is in the cache before the walk.
            let answered_ms = unix_millis();
            let inserted = cache.insert_answered(
                answered_ms,
                &checked.endpoint_key,
                name.as_str(),
                &outcome.summary.ips,
                outcome.summary.ttl,
            );
            let metrics = &self.context.metrics.cache;
            metrics.names.set(gauge(cache.name_count()));
            metrics.ips.set(gauge(cache.ip_count()));
            (inserted, cache.limits().max_ips_per_name, answered_ms)
        };
        if inserted.refused {
            if max_ips != 0 {
                outcome.summary.ips.truncate(max_ips);
            }
            self.context.metrics.cache.names_refused.inc();
            let needed = checked
                .endpoint_id
                .is_some_and(|id| grants.iter().any(|grant| grant.endpoint == id));
            if needed {
                return (Outcome::failed(), None);
            }
            // Nothing of the sender's depends on the entry (a name none of its toFQDNs rules
            // match): the answer goes out as it is.
            self.released(held, None);
            return (outcome, None);
        }
        // Past `max_ips_per_name` only what the cache kept of the answer gets allow entries,
        // crosses to the peer and shows in the flow event: an answer of thousands of
        // addresses costs no more than the cap (it once cost a map update per address, grant
        // and port, and a mapping the agent refused to decode).
        inserted.retain_kept(&mut outcome.summary.ips);
        let (expires_at, changed) = (inserted.expires_at, inserted.changed());
        let summary = &outcome.summary;
        let wait = if grants.is_empty() {
            None
        } else {
            self.context.datapath.allow(&AllowRequest {
                name,
                ips: &summary.ips,
                expires_at,
                grants: &grants,
            })
        };
        // Only news crosses to the peer: an answer repeating the cache (the same second's
        // answers, a caching resolver's counted-down TTLs) would tell it nothing, and a
        // mapping per answer was much of what the agent + dnsproxy session cost under load.
        let mapping = changed.then(|| Mapping {
            endpoint: checked.endpoint_key.clone(),
            name: name.clone(),
            ips: summary.ips.clone(),
            ttl: summary.ttl,
            expires_at,
            learned_at_ms: answered_ms,
            server: checked.server,
        });
        match wait {
            // Nothing to wait for: released now.
            None => {
                self.released(held, mapping);
                (outcome, None)
            }
            Some(wait) => {
                let hold = Hold {
                    held,
                    wait,
                    name: name.clone(),
                    mapping,
                };
                (outcome, Some(hold))
            }
        }
    }

    /// Waits (at most `response_max_delay`) for what the datapath asked the answer to wait for.
    pub async fn hold(&self, hold: Hold) {
        if tokio::time::timeout(self.settings.response_max_delay, hold.wait)
            .await
            .is_err()
        {
            // A stalled datapath delays every answer alike: one line per interval.
            static BUDGET: LogBudget = LogBudget::new(LogBudget::INTERVAL);
            if let Some(held_back) = BUDGET.allow() {
                tracing::warn!(
                    name = hold.name.as_str(),
                    held_back,
                    "answer released before its allow entries were written"
                );
            }
        }
        self.released(hold.held, hold.mapping);
    }

    fn released(&self, held: Instant, mapping: Option<Mapping>) {
        self.timings
            .datapath_hold
            .observe(held.elapsed().as_secs_f64());
        if let Some(mapping) = mapping {
            self.context.mappings.on_mapping(mapping);
        }
    }

    /// Accounts for a query that got its answer (or its refusal): metrics and flow event.
    pub fn finish(&self, checked: Checked, outcome: Outcome) {
        let elapsed = checked.started.elapsed();
        self.timings.total.observe(elapsed.as_secs_f64());
        self.queries
            .inc(outcome.verdict, outcome.rcode, checked.transport);
        self.context.flows.record(FlowEvent::Dns(DnsFlow {
            time_ms: unix_millis(),
            instance: self.context.instance.clone(),
            endpoint: checked.endpoint_key,
            client: checked.client,
            server: checked.server,
            protocol: Cow::Borrowed(checked.transport.as_str()),
            qname: match checked.name {
                Ok(name) => name.into(),
                Err(text) => text,
            },
            qtype: type_name(checked.qtype),
            rcode: Cow::Borrowed(rcode_name(outcome.rcode)),
            verdict: outcome.verdict,
            ips: outcome.summary.ips,
            ttl: outcome.summary.ttl,
            cnames: outcome.summary.cnames,
            latency_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        }));
    }
}

/// The mnemonic of a record type (`A`, `AAAA`, ...), or `TYPE<n>` (RFC 3597) for one without.
fn type_name(qtype: u16) -> Cow<'static, str> {
    match RecordType::from(qtype) {
        RecordType::Unknown(_) | RecordType::ZERO => Cow::Owned(format!("TYPE{qtype}")),
        known => Cow::Borrowed(<&'static str>::from(known)),
    }
}

/// An answer held back until the datapath has what it allows.
pub(crate) struct Hold {
    held: Instant,
    wait: HoldFuture,
    name: DnsName,
    /// What the answer changed in the cache, for the mapping observer; `None` if nothing.
    mapping: Option<Mapping>,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("name", &self.name)
            .field("mapping", &self.mapping)
            .finish_non_exhaustive()
    }
}

/// A count as a Prometheus gauge's value.
pub(crate) fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
