use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::TelemetryError;

/// Buckets for DNS processing time, in seconds: 25 µs to 5 s, dense below a millisecond where
/// the proxy's own cost lives.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Phases of a query's processing time, as Cilium splits its proxy histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// From the query's arrival to the answer's release.
    Total,
    /// Endpoint lookup and DNS rule check.
    PolicyCheck,
    /// Waiting for the upstream server.
    Upstream,
    /// Answer held back while its allow entries are recorded and written.
    DatapathHold,
}

impl Scope {
    pub const ALL: [Scope; 4] = [
        Scope::Total,
        Scope::PolicyCheck,
        Scope::Upstream,
        Scope::DatapathHold,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Total => "total",
            Scope::PolicyCheck => "policy_check",
            Scope::Upstream => "upstream",
            Scope::DatapathHold => "datapath_hold",
        }
    }
}

/// The process-wide registry. Cheap to clone; every clone shares the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub dns: DnsMetrics,
    pub cache: CacheMetrics,
    pub policy: PolicyMetrics,
    pub datapath: DatapathMetrics,
    pub peer: PeerMetrics,
}

/// The agent ⇄ dnsproxy link's series. Each process emits them from its own side.
#[derive(Debug, Clone)]
pub struct PeerMetrics {
    /// 1 while the peer is connected over the agent's Unix socket.
    pub connected: IntGauge,
    /// dnsproxy: 1 while it serves without the agent (from its persisted snapshot).
    pub offline: IntGauge,
    /// dnsproxy: mappings waiting to be delivered to the agent.
    pub journal_entries: IntGauge,
    /// dnsproxy: mappings dropped because the journal was full.
    pub journal_dropped: IntCounter,
    /// dnsproxy: the length of the journal's file in `state_dir`, as last written.
    pub journal_file_bytes: IntGauge,
    /// dnsproxy: flow events not forwarded to the agent; label: reason (budget: over the
    /// forwarding rate; lagged: the forwarder fell behind; queue_full: the session's queue).
    pub flows_dropped: IntCounterVec,
    /// Completed resyncs (journal replayed and caches exchanged).
    pub resyncs: IntCounter,
    pub resync_seconds: Histogram,
    /// Unix time the last resync completed (0 before the first); see
    /// [`PeerMetrics::resync_completed`].
    pub last_resync: Gauge,
    /// Policy revision the peer acknowledged (agent) or received (dnsproxy).
    pub acked_revision: IntGauge,
    /// Mappings received from the peer.
    pub mappings_received: IntCounter,
    /// agent: its own mappings a session skipped after falling behind them; the session then
    /// sends the whole cache again.
    pub mappings_skipped: IntCounter,
    /// agent: mappings from the peer answered before a cache clean made on the agent that
    /// removes them (the peer was away when it was made, or they crossed it), dropped.
    pub mappings_cleaned: IntCounter,
    /// Connections or messages refused on the agent socket; label: reason (credentials,
    /// oversized, malformed, protocol, stalled).
    pub rejected: IntCounterVec,
    /// Failed writes of state to `state_dir`; label: file (the dnsproxy's journal and
    /// policy_snapshot, the agent's cache_cleans).
    pub state_persist_errors: IntCounterVec,
}

impl PeerMetrics {
    /// Records a completed resync: counts it, observes how long it took and when it ended
    /// (what `warden status` shows as the last resync).
    pub fn resync_completed(&self, took: Duration) {
        self.resyncs.inc();
        self.resync_seconds.observe(took.as_secs_f64());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |elapsed| elapsed.as_secs_f64());
        self.last_resync.set(now);
    }
}

/// The eBPF datapath's series (all zero with `datapath.mode: none`).
#[derive(Debug, Clone)]
pub struct DatapathMetrics {
    /// label: reason (connect, sendmsg, egress, ...)
    pub drops: IntCounterVec,
    /// FQDN allow entries (endpoint, IP, protocol, port) in the pinned map.
    pub fqdn_entries: IntGauge,
    /// CIDR allow entries (endpoint, prefix) in the pinned map.
    pub cidr_entries: IntGauge,
    /// Cgroups enrolled as endpoints.
    pub enrolled: IntGauge,
    /// Allow entries kept past their TTL because connections still use them.
    pub idle_grace_entries: IntGauge,
    /// label: op (allow, revoke, cidr_set, cidr_remove, enroll, unenroll)
    pub updates: IntCounterVec,
    /// label: op
    pub errors: IntCounterVec,
    /// Redirect-record lookups of queries; labels: source (slot|map), result (found|absent).
    pub redirect_lookups: IntCounterVec,
    /// Answers whose allow entries, too many for the answer loop, went to the writer thread.
    pub allow_batches_deferred: IntCounter,
}

/// The DNS proxy engine's series.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    /// labels: verdict (allowed|denied|error), rcode, protocol (udp|tcp)
    pub queries: IntCounterVec,
    /// label: scope (see [`Scope`])
    pub processing_seconds: HistogramVec,
    /// label: reason (timeout|io|malformed)
    pub upstream_errors: IntCounterVec,
    /// Answers dropped because they did not match a query we sent; label: reason.
    pub upstream_unexpected: IntCounterVec,
    /// Queries sent upstream a second time, their first copy unanswered.
    pub upstream_retransmits: IntCounter,
    /// label: protocol
    pub malformed: IntCounterVec,
    pub concurrency_rejections: IntCounter,
    /// TCP connections closed at once: their client already held its share.
    pub tcp_refused: IntCounter,
    /// TCP connections closed because their client took no answer for the idle timeout.
    pub tcp_unread: IntCounter,
    /// UDP answers the kernel would not send to their client.
    pub answers_unsent: IntCounter,
    pub in_flight: IntGauge,
    /// Whether this process holds sockets in the DNS port's serving group.
    pub serving: IntGauge,
}

/// The FQDN cache's series.
#[derive(Debug, Clone)]
pub struct CacheMetrics {
    pub names: IntGauge,
    pub ips: IntGauge,
    pub gc_deletions: IntCounter,
    pub persist_errors: IntCounter,
    pub names_refused: IntCounter,
}

/// The policy source's series.
#[derive(Debug, Clone)]
pub struct PolicyMetrics {
    pub revision: IntGauge,
    pub policies: IntGauge,
    pub selectors: IntGauge,
    pub reload_errors: IntCounter,
    /// 1 while the files on disk do not load and an older policy is in force.
    pub reload_failing: IntGauge,
    /// Endpoints known (the config's and `endpoints_dir`'s).
    pub endpoints: IntGauge,
    /// Endpoint files of `endpoints_dir` refused (each new error once).
    pub endpoint_file_errors: IntCounter,
}

impl Metrics {
    /// A registry whose series all carry `instance="<instance>"`.
    pub fn new(instance: &str) -> Result<Metrics, TelemetryError> {
        let labels = [("instance".to_owned(), instance.to_owned())].into();
        let registry = Registry::new_custom(Some("warden".to_owned()), Some(labels))?;
        let dns = DnsMetrics {
            queries: counter_vec(
                &registry,
                "dns_queries_total",
                "DNS queries answered, by verdict, response code and protocol.",
                &["verdict", "rcode", "protocol"],
            )?,
            processing_seconds: {
                let opts = HistogramOpts::new(
                    "dns_processing_seconds",
                    "Time spent on a DNS query, split by scope.",
                )
                .buckets(LATENCY_BUCKETS.to_vec());
                let histogram = HistogramVec::new(opts, &["scope"])?;
                registry.register(Box::new(histogram.clone()))?;
                histogram
            },
            upstream_errors: counter_vec(
                &registry,
                "dns_upstream_errors_total",
                "Queries that got no usable answer from upstream, by reason.",
                &["reason"],
            )?,
            upstream_unexpected: counter_vec(
                &registry,
                "dns_upstream_unexpected_total",
                "Packets on upstream sockets that matched no query sent (wrong source, id or question).",
                &["reason"],
            )?,
            upstream_retransmits: counter(
                &registry,
                "dns_upstream_retransmits_total",
                "UDP queries sent to the upstream a second time because the first copy went \
                 unanswered for a few round trips.",
            )?,
            malformed: counter_vec(
                &registry,
                "dns_malformed_total",
                "Packets from clients that are not DNS queries, dropped.",
                &["protocol"],
            )?,
            concurrency_rejections: counter(
                &registry,
                "dns_concurrency_rejections_total",
                "Queries answered SERVFAIL because concurrency_limit was reached.",
            )?,
            tcp_refused: counter(
                &registry,
                "dns_tcp_refused_total",
                "DNS TCP connections closed at once because their client already held its \
                 share of the proxy's connections.",
            )?,
            tcp_unread: counter(
                &registry,
                "dns_tcp_unread_total",
                "DNS TCP connections closed because their client took no whole answer within \
                 the idle timeout; the answers still waiting for it are lost.",
            )?,
            answers_unsent: counter(
                &registry,
                "dns_answers_unsent_total",
                "DNS answers over UDP the kernel would not send to their client (the listener's \
                 send buffer full for 50 ms, or an error): the client asks again.",
            )?,
            in_flight: gauge(&registry, "dns_in_flight", "Queries being processed now.")?,
            serving: gauge(
                &registry,
                "dns_serving",
                "1 while this process has sockets in the DNS port's serving group.",
            )?,
        };
        let cache = CacheMetrics {
            names: gauge(
                &registry,
                "fqdn_cache_names",
                "(endpoint, name) pairs in the FQDN cache.",
            )?,
            ips: gauge(
                &registry,
                "fqdn_cache_ips",
                "(endpoint, name, IP) entries in the FQDN cache.",
            )?,
            gc_deletions: counter(
                &registry,
                "fqdn_cache_gc_deletions_total",
                "IPs removed from the FQDN cache because they expired.",
            )?,
            persist_errors: counter(
                &registry,
                "fqdn_cache_persist_errors_total",
                "Failed attempts to write the FQDN cache to state_dir.",
            )?,
            names_refused: counter(
                &registry,
                "fqdn_cache_names_refused_total",
                "Answers for a new name not cached because their endpoint held \
                 dns.max_names_per_endpoint names (SERVFAIL where its toFQDNs rules match).",
            )?,
        };
        let policy = PolicyMetrics {
            revision: gauge(
                &registry,
                "policy_revision",
                "Revision of the policy in force.",
            )?,
            policies: gauge(&registry, "policies", "Policies in force.")?,
            selectors: gauge(
                &registry,
                "policy_selectors",
                "toFQDNs selectors and DNS rules in force.",
            )?,
            reload_errors: counter(
                &registry,
                "policy_reload_errors_total",
                "Policy reloads rejected because a file did not load.",
            )?,
            reload_failing: gauge(
                &registry,
                "policy_reload_failing",
                "1 while the policy files on disk do not load and the last good policy stays in force.",
            )?,
            endpoints: gauge(
                &registry,
                "endpoints",
                "Endpoints known: the config's and those of endpoints_dir.",
            )?,
            endpoint_file_errors: counter(
                &registry,
                "endpoint_file_errors_total",
                "Endpoint files refused (unreadable, invalid, or clashing with others); what they last held stays.",
            )?,
        };
        let datapath = DatapathMetrics {
            drops: counter_vec(
                &registry,
                "datapath_drops_total",
                "Packets and connects the datapath refused, by reason.",
                &["reason"],
            )?,
            fqdn_entries: gauge(
                &registry,
                "datapath_fqdn_entries",
                "FQDN allow entries (endpoint, IP, protocol, port) in the datapath.",
            )?,
            cidr_entries: gauge(
                &registry,
                "datapath_cidr_entries",
                "CIDR allow entries (endpoint, prefix) in the datapath.",
            )?,
            enrolled: gauge(
                &registry,
                "datapath_enrolled_endpoints",
                "Cgroups enrolled as endpoints in the datapath.",
            )?,
            idle_grace_entries: gauge(
                &registry,
                "datapath_idle_grace_entries",
                "Allow entries kept past their TTL because connections still use them.",
            )?,
            updates: counter_vec(
                &registry,
                "datapath_updates_total",
                "Datapath map updates, by operation.",
                &["op"],
            )?,
            errors: counter_vec(
                &registry,
                "datapath_errors_total",
                "Failed datapath map updates, by operation.",
                &["op"],
            )?,
            redirect_lookups: counter_vec(
                &registry,
                "datapath_redirect_lookups_total",
                "Redirect records looked up for queries (who asked, which server it meant): in the memory-mapped slots or, when they cannot tell, with a bpf() lookup of the map; found or absent.",
                &["source", "result"],
            )?,
            allow_batches_deferred: counter(
                &registry,
                "datapath_allow_batches_deferred_total",
                "Answers whose allow entries (more than 32 to write) were handed to the allow writer's thread instead of written on the answer loop.",
            )?,
        };
        let peer = PeerMetrics {
            connected: gauge(
                &registry,
                "peer_connected",
                "1 while the agent and warden-dnsproxy are connected.",
            )?,
            offline: gauge(
                &registry,
                "offline_mode",
                "1 while warden-dnsproxy serves without the agent, from its persisted snapshot.",
            )?,
            journal_entries: gauge(
                &registry,
                "journal_entries",
                "Mappings warden-dnsproxy holds for the agent until it is back.",
            )?,
            journal_dropped: counter(
                &registry,
                "journal_dropped_total",
                "Mappings dropped because the offline journal was full.",
            )?,
            journal_file_bytes: gauge(
                &registry,
                "journal_file_bytes",
                "Length of warden-dnsproxy's journal file in state_dir, as last written.",
            )?,
            flows_dropped: counter_vec(
                &registry,
                "peer_flows_dropped_total",
                "Flow events warden-dnsproxy did not forward to the agent's flow log, by reason.",
                &["reason"],
            )?,
            resyncs: counter(
                &registry,
                "resyncs_total",
                "Completed resyncs between agent and warden-dnsproxy.",
            )?,
            resync_seconds: {
                let opts = HistogramOpts::new(
                    "resync_duration_seconds",
                    "Time from connection to both caches exchanged.",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
                let histogram = Histogram::with_opts(opts)?;
                registry.register(Box::new(histogram.clone()))?;
                histogram
            },
            last_resync: {
                let metric = Gauge::new(
                    "last_resync_timestamp_seconds",
                    "Unix time the last resync between agent and warden-dnsproxy completed; 0 before the first.",
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            acked_revision: gauge(
                &registry,
                "peer_policy_revision",
                "Policy revision acknowledged by (agent) or received from (dnsproxy) the peer.",
            )?,
            mappings_received: counter(
                &registry,
                "peer_mappings_received_total",
                "Mappings (name, IPs, TTL, endpoint) received from the peer.",
            )?,
            mappings_skipped: counter(
                &registry,
                "peer_mappings_skipped_total",
                "Agent: its own mappings a warden-dnsproxy session fell too far behind to forward; the session then sends the whole cache again.",
            )?,
            mappings_cleaned: counter(
                &registry,
                "peer_mappings_cleaned_total",
                "Agent: mappings from warden-dnsproxy dropped because a cache clean made on the agent after they were answered removes them.",
            )?,
            state_persist_errors: counter_vec(
                &registry,
                "state_persist_errors_total",
                "Failed writes of warden-dnsproxy's journal or policy snapshot to state_dir, by file.",
                &["file"],
            )?,
            rejected: counter_vec(
                &registry,
                "api_rejected_total",
                "Connections, messages or mappings and flow events refused on the agent socket, by reason.",
                &["reason"],
            )?,
        };
        let metrics = Metrics {
            registry,
            dns,
            cache,
            policy,
            datapath,
            peer,
        };
        metrics.initialize_known_series();
        Ok(metrics)
    }

    /// Creates, at zero, every series whose label values are known in advance. A labelled
    /// family without series is left out of the exposition entirely (no HELP, no TYPE), so
    /// dashboards and alerts would find nothing to show until the first event, and `rate()`
    /// would miss that first increment.
    fn initialize_known_series(&self) {
        // The `op` label of the datapath's map updates, counted and failed alike.
        const DATAPATH_OPS: [&str; 6] = [
            "allow",
            "revoke",
            "cidr_set",
            "cidr_remove",
            "enroll",
            "unenroll",
        ];
        for scope in Scope::ALL {
            self.histogram(scope);
        }
        let known: [(&IntCounterVec, &[&str]); 9] = [
            (
                &self.dns.upstream_errors,
                &["timeout", "io", "malformed", "exhausted"],
            ),
            (
                &self.dns.upstream_unexpected,
                &[
                    "id",
                    "source",
                    "question",
                    "short",
                    "malformed",
                    "oversized",
                    "cut_short",
                    "late",
                ],
            ),
            (&self.dns.malformed, &["udp", "tcp"]),
            (
                &self.datapath.drops,
                &[
                    "connect",
                    "sendmsg",
                    "egress",
                    "ipv6_ext_headers",
                    "fragment",
                    "no_ports",
                    "malformed",
                ],
            ),
            (&self.datapath.updates, &DATAPATH_OPS),
            (&self.datapath.errors, &DATAPATH_OPS),
            (
                &self.peer.rejected,
                &[
                    "credentials",
                    "oversized",
                    "malformed",
                    "protocol",
                    "stalled",
                    "over_cap",
                    "connections",
                ],
            ),
            (
                &self.peer.flows_dropped,
                &["budget", "lagged", "queue_full"],
            ),
            (
                &self.peer.state_persist_errors,
                &["journal", "policy_snapshot", "cache_cleans"],
            ),
        ];
        for (family, values) in known {
            for value in values {
                family.with_label_values(&[value]);
            }
        }
    }

    /// The registry, for processes that add series of their own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for I/O; a failure would be a metric with invalid
        // content, which the exposition then simply leaves out.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }

    pub fn observe(&self, scope: Scope, seconds: f64) {
        self.dns
            .processing_seconds
            .with_label_values(&[scope.as_str()])
            .observe(seconds);
    }

    pub fn histogram(&self, scope: Scope) -> Histogram {
        self.dns
            .processing_seconds
            .with_label_values(&[scope.as_str()])
    }
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, TelemetryError> {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, TelemetryError> {
    let metric = IntCounter::new(name, help)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, TelemetryError> {
    let metric = IntGauge::new(name, help)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_prefixed_and_labelled_with_the_instance() {
        let metrics = Metrics::new("agent").unwrap();
        metrics
            .dns
            .queries
            .with_label_values(&["allowed", "NOERROR", "udp"])
            .inc();
        metrics.observe(Scope::Upstream, 0.001);
        metrics.cache.names.set(3);
        let text = metrics.render();
        let queries = text
            .lines()
            .find(|line| line.starts_with("warden_dns_queries_total{"))
            .unwrap();
        // Families with known label values are there before the first event.
        for (name, label) in [
            ("warden_dns_upstream_errors_total{", r#"reason="timeout""#),
            ("warden_datapath_drops_total{", r#"reason="egress""#),
            (
                "warden_dns_processing_seconds_count{",
                r#"scope="datapath_hold""#,
            ),
        ] {
            assert!(
                text.lines().any(|line| line.starts_with(name)
                    && line.contains(label)
                    && line.contains(r#"instance="agent""#)
                    && line.ends_with(" 0")),
                "{name}{label} missing:\n{text}"
            );
        }
        for label in [
            r#"instance="agent""#,
            r#"protocol="udp""#,
            r#"rcode="NOERROR""#,
            r#"verdict="allowed""#,
        ] {
            assert!(queries.contains(label), "{queries}");
        }
        assert!(queries.ends_with(" 1"), "{queries}");
        assert!(text.contains(r#"warden_fqdn_cache_names{instance="agent"} 3"#));
        assert!(text.contains("warden_dns_processing_seconds_bucket"));
    }

    #[test]
    fn a_completed_resync_is_counted_timed_and_dated() {
        let metrics = Metrics::new("dnsproxy").unwrap();
        metrics.peer.resync_completed(Duration::from_millis(20));
        assert_eq!(metrics.peer.resyncs.get(), 1);
        assert_eq!(metrics.peer.resync_seconds.get_sample_count(), 1);
        assert!(metrics.peer.last_resync.get() > 1.0e9);
    }
}
