//! The results: one serializable document (`latest.json`) and its Markdown rendering
//! (`latest.md`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cache::{CacheCost, ChurnCost};
use crate::load::{LoadReport, MachineCpu};
use crate::policy::PolicyCost;
use crate::stats::HistogramSummary;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Results {
    pub mode: String,
    pub started_unix: u64,
    pub wall_seconds: f64,
    pub machine: Machine,
    pub command: String,
    pub throughput_seconds: u32,
    pub throughput: Vec<Throughput>,
    /// (b) and (d) again with the mix's allowed names only: each forwards every query.
    pub throughput_allowed_only: Vec<Throughput>,
    pub latency_rate: u32,
    pub latency_rate_basis: String,
    /// knotd's address, to name its socket among those that dropped queries.
    pub upstream: String,
    pub latency: Vec<Latency>,
    pub light_rate: u32,
    pub latency_light: Vec<Latency>,
    pub ratios: Ratios,
    pub policy: Vec<PolicyCost>,
    pub cache: Option<CacheCost>,
    pub churn: Option<ChurnCost>,
    pub hold: Vec<Hold>,
    pub restart: Vec<Restart>,
    pub profiles: Vec<Profile>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub tools: BTreeMap<String, String>,
}

/// One scenario's maximum rate (dnsperf, unlimited, per round).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Throughput {
    pub key: String,
    pub label: String,
    pub available: bool,
    pub note: Option<String>,
    pub rounds_qps: Vec<f64>,
    pub mean_qps: f64,
    /// dnsperf's timeouts over all rounds.
    pub lost: u64,
    /// dnsperf's mean latency at full load (queueing, not the proxy's cost).
    pub avg_latency_us_at_max: f64,
    pub rcodes: BTreeMap<String, u64>,
}

/// One scenario at the fixed rate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub key: String,
    pub label: String,
    pub available: bool,
    pub note: Option<String>,
    pub load: Option<LoadReport>,
    /// Each round's own p99 (the pooled one in `load` is dominated by the worse round).
    pub rounds_p99_us: Vec<f64>,
    /// The proxy's own histograms over the same run (Warden scenarios only).
    pub server: Option<ServerScopes>,
}

/// `warden_dns_processing_seconds` by scope, for the run only.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerScopes {
    pub total: HistogramSummary,
    pub policy_check: HistogramSummary,
    pub upstream: HistogramSummary,
    pub datapath_hold: HistogramSummary,
    /// `warden_datapath_redirect_lookups_total` over the same run (eBPF scenarios only).
    pub redirect_lookups: RedirectLookups,
}

/// Redirect-record lookups of the proxy's queries, by where they were answered.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RedirectLookups {
    /// In the memory-mapped slots (found or known absent): no system call.
    pub slot: f64,
    /// With a `bpf()` lookup of the LRU map.
    pub map: f64,
    /// Either way, a record found: the client was redirected.
    pub found: f64,
}

impl RedirectLookups {
    /// Adds what the counters rose by between two scrapes.
    pub fn add_run(&mut self, before: &str, after: &str) {
        let rise = |label: (&str, &str)| {
            let count = |scrape| {
                warden_tests::warden::metric_value(
                    scrape,
                    "warden_datapath_redirect_lookups_total",
                    &[label],
                )
            };
            count(after) - count(before)
        };
        self.slot += rise(("source", "slot"));
        self.map += rise(("source", "map"));
        self.found += rise(("result", "found"));
    }

    pub fn total(&self) -> f64 {
        self.slot + self.map
    }

    /// The slots' share of the lookups and the found share, as a cell; "–" without any (no
    /// datapath).
    pub fn show(&self) -> String {
        let total = self.total();
        if total <= 0.0 {
            return "–".to_owned();
        }
        format!(
            "{:.1}% / {:.1}%",
            100.0 * self.slot / total,
            100.0 * self.found / total
        )
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// (b) / (d) max QPS.
    pub agent_over_dnsdist_qps: Option<f64>,
    /// (b) / (d) within each round (adjacent runs share the machine's mood).
    pub agent_over_dnsdist_per_round: Vec<f64>,
    /// (b) / (d) max QPS with allowed names only (both forward every query), overall and
    /// within each round.
    pub agent_over_dnsdist_qps_allowed_only: Option<f64>,
    pub agent_over_dnsdist_per_round_allowed_only: Vec<f64>,
    pub agent_over_direct_per_round: Vec<f64>,
    /// (b) / (a) max QPS.
    pub agent_over_direct_qps: Option<f64>,
    pub pair_over_dnsdist_qps: Option<f64>,
    /// (d) / (a) max QPS.
    pub dnsdist_over_direct_qps: Option<f64>,
    /// p99(b) − p99(a) at the fixed rate, µs.
    pub agent_added_p99_us: Option<f64>,
    pub agent_added_p50_us: Option<f64>,
    pub dnsdist_added_p99_us: Option<f64>,
    pub dnsdist_added_p50_us: Option<f64>,
    pub pair_added_p99_us: Option<f64>,
    /// The added p99 at the fixed rate with each answer timed at its kernel arrival.
    pub agent_added_p99_at_arrival_us: Option<f64>,
    pub dnsdist_added_p99_at_arrival_us: Option<f64>,
    /// The added p99 at the fixed rate with each query timed from when it was due, and the
    /// sender's own lag behind that schedule at p99 in (a), (b) and (d).
    pub agent_added_p99_from_schedule_us: Option<f64>,
    pub dnsdist_added_p99_from_schedule_us: Option<f64>,
    pub sender_lag_p99_us: [Option<f64>; 3],
    /// p99(b) − p99(a) and p99(d) − p99(a) within each round of the fixed rate.
    pub agent_added_p99_us_per_round: Vec<f64>,
    pub dnsdist_added_p99_us_per_round: Vec<f64>,
    /// The same at the light rate.
    pub agent_added_p50_us_light: Option<f64>,
    pub agent_added_p99_us_light: Option<f64>,
    pub dnsdist_added_p50_us_light: Option<f64>,
    pub dnsdist_added_p99_us_light: Option<f64>,
    pub pair_added_p99_us_light: Option<f64>,
    /// (e) / (d) and (f) / (d) max QPS: Warden with the eBPF datapath.
    pub agent_ebpf_over_dnsdist_qps: Option<f64>,
    pub pair_ebpf_over_dnsdist_qps: Option<f64>,
    /// p99(e) − p99(a) and p99(f) − p99(a), at the fixed and at the light rate.
    pub agent_ebpf_added_p99_us: Option<f64>,
    pub pair_ebpf_added_p99_us: Option<f64>,
    pub agent_ebpf_added_p99_us_light: Option<f64>,
    pub pair_ebpf_added_p99_us_light: Option<f64>,
    /// (g) / (d) and (g) / (e) max QPS: the redirected client, against dnsdist and against
    /// the same agent asked directly.
    pub redirected_over_dnsdist_qps: Option<f64>,
    pub redirected_over_agent_ebpf_qps: Option<f64>,
    pub redirected_added_p99_us: Option<f64>,
    pub redirected_added_p99_us_light: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Hold {
    /// `none` (cache + grants, no maps) or `ebpf` (allow entries written to pinned maps).
    pub datapath: String,
    pub available: bool,
    pub note: Option<String>,
    pub rate: u32,
    pub hold: HistogramSummary,
    pub client: Option<LoadReport>,
    /// `warden_datapath_updates_total{op="allow"}` during the run.
    pub allow_updates: f64,
    pub datapath_errors: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Restart {
    pub process: String,
    pub signal: String,
    /// Who else holds the DNS port while it restarts.
    pub peers: String,
    pub available: bool,
    pub note: Option<String>,
    pub rate: u32,
    pub sent: u64,
    /// Queries the signalled process answered from the start of the load to its signal: beside
    /// a peer, 0 means its loss figure says nothing.
    pub served_before_signal: Option<u64>,
    pub lost: u64,
    pub wrong_verdicts: u64,
    /// Signal to the process gone.
    pub exit_ms: Option<f64>,
    /// Signal to the new process ready (`/readyz`).
    pub back_ms: Option<f64>,
    /// From the first to the last lost query (send times).
    pub loss_window_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Profile {
    pub target: String,
    pub seconds: u32,
    pub qps_during: f64,
    /// CPU time sampled (`cpu-clock` event count), ms.
    pub cpu_ms: f64,
    /// Queries dnsperf completed meanwhile.
    pub queries: u64,
    /// CPU per query, µs (the process only: the client and knotd are not in it).
    pub cpu_us_per_query: f64,
    /// (share %, DSO) sorted.
    pub by_dso: Vec<(f64, String)>,
    /// (share %, DSO, symbol) of the hottest symbols.
    pub top_symbols: Vec<(f64, String, String)>,
    pub file: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Target {
    pub what: String,
    pub bar: String,
    pub measured: String,
    /// `None` when not measured in this run.
    pub met: Option<bool>,
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

/// A signed whole number (`+63`, `-12`), or a dash.
pub fn signed(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:+.0}"))
}

/// Signed whole numbers: `+63, +916`.
pub fn signed_list(values: &[f64]) -> String {
    let parts: Vec<String> = values.iter().map(|v| format!("{v:+.0}")).collect();
    if parts.is_empty() {
        "–".to_owned()
    } else {
        parts.join(", ")
    }
}

pub fn list(values: &[f64]) -> String {
    let parts: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
    if parts.is_empty() {
        "–".to_owned()
    } else {
        parts.join(", ")
    }
}

fn kilo(qps: f64) -> String {
    format!("{:.1}k", qps / 1000.0)
}

impl Results {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# Warden benchmark ({})\n", self.mode);
        let _ = writeln!(
            md,
            "Machine: **{} cores** ({}), kernel {}. Load average at start `{}`, at end `{}`. \
             Run took {:.0} s. Command: `{}`.\n",
            m.cores,
            m.cpu,
            m.kernel,
            m.loadavg_start,
            m.loadavg_end,
            self.wall_seconds,
            self.command
        );
        let tools: Vec<String> = m.tools.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(md, "Tools: {}.\n", tools.join(", "));

        let _ = writeln!(md, "## Targets\n");
        let _ = writeln!(md, "| what | bar | measured | met |\n|---|---|---|---|");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None if self.mode == "smoke" => "not judged (smoke)",
                None => "not measured",
            };
            let _ = writeln!(md, "| {} | {} | {} | {} |", t.what, t.bar, t.measured, met);
        }

        let _ = writeln!(
            md,
            "\n## 1. Throughput and latency\n\nMax QPS: dnsperf, unlimited rate, {} s per round, \
             rounds interleaved a, b, ..., g, a, b, ... ((b) and (c) run without the datapath, \
             `datapath.mode: none`; (e) and (f) with the eBPF datapath, as deployed, the clients \
             outside the enrolled cgroup and asking the proxy; (g) is (e)'s agent with the \
             clients inside the enrolled cgroup asking knotd, each query redirected by the cgroup \
             programs). Latency: the bench's open-loop client at \
             a fixed **{} QPS** ({}), per-query latency, warm-up excluded, rounds interleaved \
             the same way and pooled. Cores busy: the whole machine's CPU time while the \
             fixed-rate queries went out (warm-up included; /proc/stat, wall time less idle, so \
             the client's and knotd's too), in cores: the tail of the latency is queueing for \
             them, and grows with it.\n",
            self.throughput_seconds, self.latency_rate, self.latency_rate_basis
        );
        let _ = writeln!(
            md,
            "| scenario | max QPS per round | mean max QPS | p50 µs | p99 µs | p99.9 µs | lost at fixed rate | wrong verdicts | cores busy at fixed rate |\n|---|---|---|---|---|---|---|---|---|"
        );
        for t in &self.throughput {
            let load = crate::verdict::load(&self.latency, &t.key);
            if !t.available {
                let _ = writeln!(
                    md,
                    "| ({}) {} | {} | | | | | | | |",
                    t.key,
                    t.label,
                    t.note.as_deref().unwrap_or("not available")
                );
                continue;
            }
            let rounds: Vec<String> = t.rounds_qps.iter().map(|q| kilo(*q)).collect();
            let _ = writeln!(
                md,
                "| ({}) {} | {} | **{}** | {} | {} | {} | {} | {} | {} |",
                t.key,
                t.label,
                rounds.join(", "),
                kilo(t.mean_qps),
                opt(load.map(|l| l.latency.p50_us), 0),
                opt(load.map(|l| l.latency.p99_us), 0),
                opt(load.map(|l| l.latency.p999_us), 0),
                load.map_or_else(|| "–".to_owned(), |l| lost(l, &self.upstream)),
                load.map_or_else(|| "–".to_owned(), |l| l.wrong_verdicts.to_string()),
                load.map_or_else(|| "–".to_owned(), |l| busy_cores(&l.machine_cpu)),
            );
        }
        let r = &self.ratios;
        let allowed_qps = |key: &str| {
            self.throughput_allowed_only
                .iter()
                .find(|t| t.key == key && t.available)
                .map(|t| t.mean_qps)
        };
        let _ = writeln!(
            md,
            "\nLike for like, with the mix's allowed names only (the agent answers the denied \
             ones itself, where dnsdist forwards every query to knotd on the same cores; so \
             both forward everything): (b) {}, (d) {}, **(b)/(d) = {}** (per round: {}).",
            allowed_qps("b").map_or_else(|| "–".to_owned(), kilo),
            allowed_qps("d").map_or_else(|| "–".to_owned(), kilo),
            opt(r.agent_over_dnsdist_qps_allowed_only, 2),
            list(&r.agent_over_dnsdist_per_round_allowed_only),
        );
        let _ = writeln!(
            md,
            "\nRatios of the means: **(b)/(d) = {}** (per round: {}), (b)/(a) = {} (per round: \
             {}), (d)/(a) = {}, (c)/(d) = {}. Added latency vs direct at the fixed rate: (b) p50 \
             {} µs, **p99 {} µs** (per round: {}); (d) p50 {} µs, p99 {} µs (per round: \
             {}); (c) p99 {} µs. Timed at each answer's kernel arrival (SO_TIMESTAMPNS) instead, \
             which leaves out the client's own wake-up: added p99 (b) {} µs, (d) {} µs. Timed \
             from when each query was due instead, which counts the client's own lag in \
             sending too (a sender descheduled on the shared cores sends late, in a burst): \
             added p99 (b) {} µs, (d) {} µs; the sender's lag at p99 (a) {} µs, (b) {} µs, \
             (d) {} µs.\n\n\
             With the eBPF datapath: (e)/(d) = {}, (f)/(d) = {}, (g)/(d) = {} ((g)/(e) = {}); \
             added p99 at the fixed rate (e) {} µs, (f) {} µs, (g) {} µs.\n",
            opt(r.agent_over_dnsdist_qps, 2),
            list(&r.agent_over_dnsdist_per_round),
            opt(r.agent_over_direct_qps, 2),
            list(&r.agent_over_direct_per_round),
            opt(r.dnsdist_over_direct_qps, 2),
            opt(r.pair_over_dnsdist_qps, 2),
            signed(r.agent_added_p50_us),
            signed(r.agent_added_p99_us),
            signed_list(&r.agent_added_p99_us_per_round),
            signed(r.dnsdist_added_p50_us),
            signed(r.dnsdist_added_p99_us),
            signed_list(&r.dnsdist_added_p99_us_per_round),
            signed(r.pair_added_p99_us),
            signed(r.agent_added_p99_at_arrival_us),
            signed(r.dnsdist_added_p99_at_arrival_us),
            signed(r.agent_added_p99_from_schedule_us),
            signed(r.dnsdist_added_p99_from_schedule_us),
            opt(r.sender_lag_p99_us[0], 0),
            opt(r.sender_lag_p99_us[1], 0),
            opt(r.sender_lag_p99_us[2], 0),
            opt(r.agent_ebpf_over_dnsdist_qps, 2),
            opt(r.pair_ebpf_over_dnsdist_qps, 2),
            opt(r.redirected_over_dnsdist_qps, 2),
            opt(r.redirected_over_agent_ebpf_qps, 2),
            signed(r.agent_ebpf_added_p99_us),
            signed(r.pair_ebpf_added_p99_us),
            signed(r.redirected_added_p99_us),
        );
        let busy = |key: &str| {
            crate::verdict::load(&self.latency, key).and_then(|l| l.machine_cpu.busy_cores())
        };
        if let (Some(direct), Some(agent), Some(dnsdist)) = (busy("a"), busy("b"), busy("d")) {
            let per_query =
                |cores: f64| (cores - direct) / f64::from(self.latency_rate.max(1)) * 1e6;
            let _ = writeln!(
                md,
                "Cores busy at the fixed rate: (a) {direct:.2}, (b) {agent:.2}, (d) {dnsdist:.2}: \
                 each query through (b) costs the machine {} µs of CPU more than direct, through \
                 (d) {} µs (client and knotd included: their wake-ups and packets too).\n",
                signed(Some(per_query(agent))),
                signed(Some(per_query(dnsdist))),
            );
        }
        let _ = writeln!(
            md,
            "At **{} QPS**, a rate well below every scenario's max here (the proxy's own cost, \
             without queueing):\n",
            self.light_rate
        );
        let _ = writeln!(
            md,
            "| scenario | p50 µs | p99 µs | p99.9 µs | lost | wrong verdicts | cores busy |\n|---|---|---|---|---|---|---|"
        );
        for l in &self.latency_light {
            match &l.load {
                Some(load) => {
                    let _ = writeln!(
                        md,
                        "| ({}) {} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                        l.key,
                        l.label,
                        load.latency.p50_us,
                        load.latency.p99_us,
                        load.latency.p999_us,
                        lost(load, &self.upstream),
                        load.wrong_verdicts,
                        busy_cores(&load.machine_cpu),
                    );
                }
                None => {
                    let _ = writeln!(
                        md,
                        "| ({}) {} | {} | | | | | |",
                        l.key,
                        l.label,
                        l.note.as_deref().unwrap_or("not available")
                    );
                }
            }
        }
        let _ = writeln!(
            md,
            "\nAdded vs direct at {} QPS: (b) p50 {} µs, **p99 {} µs**; (d) p50 {} µs, p99 {} \
             µs; (c) p99 {} µs; (e) p99 {} µs; (f) p99 {} µs; (g) p99 {} µs.\n",
            self.light_rate,
            signed(r.agent_added_p50_us_light),
            signed(r.agent_added_p99_us_light),
            signed(r.dnsdist_added_p50_us_light),
            signed(r.dnsdist_added_p99_us_light),
            signed(r.pair_added_p99_us_light),
            signed(r.agent_ebpf_added_p99_us_light),
            signed(r.pair_ebpf_added_p99_us_light),
            signed(r.redirected_added_p99_us_light),
        );
        let scoped: Vec<&Latency> = self
            .latency
            .iter()
            .chain(&self.latency_light)
            .filter(|l| l.server.is_some())
            .collect();
        if !scoped.is_empty() {
            let _ = writeln!(
                md,
                "Inside the proxy during the fixed-rate runs (`warden_dns_processing_seconds`, \
                 p50 / p99 interpolated from the histogram buckets, µs; the first bucket is \
                 25 µs; redirect records: the share of the lookups answered by the \
                 memory-mapped slots without a system call, and the share that found a record, \
                 that is, of queries redirected by the cgroup programs):\n"
            );
            let _ = writeln!(
                md,
                "| scenario | rate | total | policy_check | upstream | datapath_hold | redirect records: from the slots / found |\n|---|---|---|---|---|---|---|"
            );
            for l in scoped {
                if let (Some(s), Some(load)) = (&l.server, &l.load) {
                    let cell =
                        |h: &HistogramSummary| format!("{} / {}", h.show(false), h.show(true));
                    let _ = writeln!(
                        md,
                        "| ({}) {} | {} | {} | {} | {} | {} | {} |",
                        l.key,
                        l.label,
                        load.rate,
                        cell(&s.total),
                        cell(&s.policy_check),
                        cell(&s.upstream),
                        cell(&s.datapath_hold),
                        s.redirect_lookups.show()
                    );
                }
            }
            let _ = writeln!(md);
        }

        let _ = writeln!(
            md,
            "## 2. Policy check\n\nns per call, median of 7 batches; the policy lists N selectors \
             in both `rules.dns` and `toFQDNs` (five shapes: names, `*.`, `**.`, `a*b`, `*.*.`).\n"
        );
        let _ = writeln!(
            md,
            "| selectors | matcher hit | matcher miss | dns_allowed hit | dns_allowed miss | fqdn_grants hit |\n|---|---|---|---|---|---|"
        );
        for p in &self.policy {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                p.selectors,
                p.matcher_hit_ns,
                p.matcher_miss_ns,
                p.dns_allowed_hit_ns,
                p.dns_allowed_miss_ns,
                p.fqdn_grants_hit_ns
            );
        }
        let _ = writeln!(
            md,
            "\nA change of policy, ms (median of 5 runs, one in a smoke run): the document parsed, then compiled for 1 \
             endpoint and for 1,000 (the agent at every change of policy or of endpoints, the \
             dnsproxy at every snapshot whose documents changed; off the DNS workers in both).\n\n\
             | selectors | parse | compile, 1 endpoint | compile, 1,000 endpoints |\n|---|---|---|---|"
        );
        for p in &self.policy {
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.2} | {:.2} |",
                p.selectors, p.parse_ms, p.compile_one_endpoint_ms, p.compile_thousand_endpoints_ms
            );
        }

        let _ = writeln!(md, "\n## 3. FQDN cache\n");
        if let Some(c) = &self.cache {
            let _ = writeln!(
                md,
                "At {} entries (distinct names, one IP each, 100 endpoints): **{:.0} bytes per \
                 (name, IP)** held from the allocator ({:.0} requested; the cache's own estimate \
                 {:.0}). Insert of a new entry {:.0} ns, refresh {:.0} ns, lookup {:.0} ns, \
                 reverse lookup (IP → names) {:.0} ns. A copy of the whole cache (the agent takes \
                 two a second, to persist it and for its reconciler): {:.0} ms in one hold of the \
                 lock every answer needs; taken {} pairs per hold, as the agent does, {:.2} ms per \
                 hold (p99 of the holds {:.2} ms). The expiry sweep once {} of them are due: \
                 {:.1} ms in one hold; taken {} pairs per hold, as the agent does, {:.2} ms per \
                 hold (p99 {:.2} ms). A thread taking the lock every 20 µs meanwhile, as answers \
                 do, waited at most {:.2} ms during the chunked sweep and {:.2} ms during the \
                 chunked copy. One `gc` removing {} names that all resolve to the same IP \
                 (random names under a wildcard): {:.1} ms in one hold, p99 {:.2} ms per hold \
                 in chunks. When {}% of the entries expire together, the sweep goes on into a \
                 compaction (a rebuild of what is left): {:.1} ms in one hold; taken {} pairs \
                 per hold, as the agent does, p99 {:.2} ms per hold, longest {:.2} ms; the \
                 thread taking the lock every 20 µs waited at most {:.2} ms.\n",
                c.entries,
                c.bytes_per_entry,
                c.requested_bytes_per_entry,
                c.estimated_bytes_per_entry,
                c.insert_new_ns,
                c.insert_refresh_ns,
                c.lookup_ns,
                c.reverse_lookup_ns,
                c.copy_ms,
                warden_proxy::COPY_CHUNK,
                c.copy_chunk_p50_ms,
                c.copy_chunk_p99_ms,
                c.gc_expired,
                c.gc_whole_ms,
                warden_proxy::GC_CHUNK,
                c.gc_step_p50_ms,
                c.gc_step_p99_ms,
                c.gc_wait_max_ms,
                c.copy_wait_max_ms,
                c.shared_ip_names,
                c.shared_ip_sweep_ms,
                c.shared_ip_step_p99_ms,
                c.mass_expiry_percent,
                c.mass_expiry_whole_ms,
                warden_proxy::GC_CHUNK,
                c.mass_expiry_step_p99_ms,
                c.mass_expiry_step_max_ms,
                c.mass_expiry_wait_max_ms
            );
        }
        if let Some(c) = &self.churn {
            let _ = writeln!(
                md,
                "Churn: {} simulated minutes of {} new names per minute, TTL {} s, `gc` every \
                 simulated second ({} names, {:.1} s of wall time). Held bytes: minute 2 (steady \
                 live set) {:.0}, last minute {:.0} (**{:.2}×**), peak after minute 1 {:.0}; a \
                 fresh cache holding the final live set ({} entries) {:.0} (last minute / fresh \
                 = {:.2}×).\n",
                c.simulated_minutes,
                c.names_per_minute,
                c.ttl_s,
                c.names_inserted,
                c.wall_seconds,
                c.steady_bytes,
                c.end_bytes,
                c.end_over_steady,
                c.peak_bytes,
                c.live_entries_end,
                c.fresh_bytes,
                c.end_over_fresh
            );
        }

        let _ = writeln!(
            md,
            "## 4. Datapath hold\n\nTime from the upstream answer to its release \
             (`warden_dns_processing_seconds{{scope=\"datapath_hold\"}}`: cache insert, grants, \
             allow entries written), p50 / p99 interpolated from the histogram buckets (25, \
             50, 100, 250 µs, ...).\n"
        );
        let _ = writeln!(
            md,
            "| datapath | rate | answers held | p50 µs | p99 µs | mean µs | allow map updates | client p99 µs | note |\n|---|---|---|---|---|---|---|---|---|"
        );
        for h in &self.hold {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                h.datapath,
                h.rate,
                h.hold.observations,
                h.hold.show(false),
                h.hold.show(true),
                if h.available {
                    format!("{:.1}", h.hold.mean_us)
                } else {
                    "–".to_owned()
                },
                h.allow_updates,
                opt(h.client.as_ref().map(|c| c.latency.p99_us), 0),
                h.note.as_deref().unwrap_or("")
            );
        }

        let _ = writeln!(
            md,
            "\n## 5. Restart loss\n\nThe open-loop client at a fixed rate (a query counts as \
             lost without an answer within 2 s), from 16 source ports so that both processes \
             of a pair hold some of it; the process is signalled mid-run and started again at \
             once. *Served* is what the signalled process answered of the load before its \
             signal.\n"
        );
        let _ = writeln!(
            md,
            "| process | signal | other server on the port | rate | sent | served | lost | loss window ms | exit ms | back (ready) ms | wrong verdicts |\n|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in &self.restart {
            if !r.available {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | | | | | | | |",
                    r.process,
                    r.signal,
                    r.peers,
                    r.note.as_deref().unwrap_or("not available")
                );
                continue;
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | {} |",
                r.process,
                r.signal,
                r.peers,
                r.rate,
                r.sent,
                r.served_before_signal
                    .map_or_else(|| "–".to_owned(), |served| served.to_string()),
                r.lost,
                r.loss_window_ms
                    .map_or_else(|| "–".to_owned(), |w| w.to_string()),
                opt(r.exit_ms, 0),
                opt(r.back_ms, 0),
                r.wrong_verdicts
            );
        }

        if !self.profiles.is_empty() {
            let _ = writeln!(
                md,
                "\n## Profiles under dnsperf at full rate\n\n`perf record -g -e cpu-clock` on the \
                 process only (full reports, with the callers of the hottest symbols, beside this \
                 file; the samples stay in `target/bench-perf/` for `perf report -i`).\n"
            );
            let _ = writeln!(
                md,
                "| process | QPS while sampled | CPU µs per query | kernel | own code | libc | report |\n|---|---|---|---|---|---|---|"
            );
            for p in &self.profiles {
                let share = |pred: &dyn Fn(&str) -> bool| -> f64 {
                    p.by_dso
                        .iter()
                        .filter(|(_, dso)| pred(dso))
                        .map(|(share, _)| share)
                        .sum()
                };
                let kernel = share(&|dso| dso.contains("kernel"));
                let libc = share(&|dso| dso.starts_with("libc"));
                let own = share(&|dso| p.target.starts_with(dso) || dso.starts_with("dnsdist"));
                let _ = writeln!(
                    md,
                    "| {} | {} | **{:.1}** | {kernel:.0}% | {own:.0}% | {libc:.0}% | `{}` |",
                    p.target,
                    kilo(p.qps_during),
                    p.cpu_us_per_query,
                    p.file
                );
            }
            for p in &self.profiles {
                let _ = writeln!(
                    md,
                    "\nHottest symbols of {}:\n\n| % | object | symbol |\n|---|---|---|",
                    p.target
                );
                for (share, dso, symbol) in p.top_symbols.iter().take(15) {
                    let _ = writeln!(
                        md,
                        "| {share:.1} | {dso} | `{}` |",
                        symbol.replace('|', "\\|")
                    );
                }
            }
        }

        if !self.notes.is_empty() {
            let _ = writeln!(md, "\n## Notes\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        md
    }
}

/// "243 of 548404 (dropped: 243 at knotd's socket)": a loss, and the sockets whose receive
/// queue overflowed meanwhile, if any did.
fn lost(load: &LoadReport, upstream: &str) -> String {
    let mut cell = format!("{} of {}", load.lost, load.sent);
    if load.lost > 0 && !load.socket_drops.is_empty() {
        let whose: Vec<String> = load
            .socket_drops
            .iter()
            .map(|(address, count)| {
                if address == upstream {
                    format!("{count} at knotd's socket")
                } else {
                    format!("{count} at {address}")
                }
            })
            .collect();
        let _ = write!(cell, " (dropped: {})", whose.join(", "));
    }
    cell
}

/// "1.42 of 2": the cores a run kept busy, of the machine's.
fn busy_cores(cpu: &MachineCpu) -> String {
    cpu.busy_cores().map_or_else(
        || "–".to_owned(),
        |busy| format!("{busy:.2} of {}", cpu.cores),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_names_the_sockets_that_dropped_queries_meanwhile() {
        let mut load = LoadReport {
            sent: 1000,
            lost: 12,
            ..LoadReport::default()
        };
        assert_eq!(lost(&load, "127.0.0.2:53"), "12 of 1000");
        load.socket_drops = BTreeMap::from([
            ("127.0.0.2:53".to_owned(), 10),
            ("127.0.0.3:5300".to_owned(), 2),
        ]);
        assert_eq!(
            lost(&load, "127.0.0.2:53"),
            "12 of 1000 (dropped: 10 at knotd's socket, 2 at 127.0.0.3:5300)"
        );
        load.lost = 0;
        assert_eq!(lost(&load, "127.0.0.2:53"), "0 of 1000");
    }
}
