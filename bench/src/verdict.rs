//! What the figures say: the ratios between scenarios, the targets against them, and
//! what makes a run a failure whatever its figures.

use crate::load::LoadReport;
use crate::report::{self, Latency, Ratios, Restart, Results, Target, Throughput};

pub fn ratios(results: &Results) -> Ratios {
    // Of the mix (`throughput`) or of the allowed names only.
    let qps_in = |rows: &[Throughput], key: &str| {
        rows.iter()
            .find(|t| t.key == key && t.available && t.mean_qps > 0.0)
            .map(|t| t.mean_qps)
    };
    let rounds_in = |rows: &[Throughput], key: &str| {
        rows.iter()
            .find(|t| t.key == key)
            .map(|t| t.rounds_qps.clone())
            .unwrap_or_default()
    };
    let per_round_in = |rows: &[Throughput], a: &str, b: &str| {
        each_round(&rounds_in(rows, a), &rounds_in(rows, b), |x, y| x / y)
    };
    let qps = |key: &str| qps_in(&results.throughput, key);
    let per_round = |a: &str, b: &str| per_round_in(&results.throughput, a, b);
    let allowed_only = &results.throughput_allowed_only[..];
    let (agent_allowed_only, dnsdist_allowed_only) =
        (qps_in(allowed_only, "b"), qps_in(allowed_only, "d"));
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let at = |rows: &[Latency], key: &str, pick: fn(&LoadReport) -> f64| {
        Some(pick(load(rows, key)?) - pick(load(rows, "a")?))
    };
    let added = |key: &str, pick: fn(&LoadReport) -> f64| at(&results.latency, key, pick);
    let at_fixed_rate =
        |key: &str, pick: fn(&LoadReport) -> f64| Some(pick(load(&results.latency, key)?));
    let rounds_p99 = |key: &str| {
        results
            .latency
            .iter()
            .find(|l| l.key == key)
            .map(|l| l.rounds_p99_us.clone())
            .unwrap_or_default()
    };
    let added_per_round =
        |key: &str| each_round(&rounds_p99(key), &rounds_p99("a"), |x, direct| x - direct);
    let light = |key: &str, pick: fn(&LoadReport) -> f64| at(&results.latency_light, key, pick);
    Ratios {
        agent_over_dnsdist_qps: ratio(qps("b"), qps("d")),
        agent_over_dnsdist_per_round: per_round("b", "d"),
        agent_over_dnsdist_qps_allowed_only: ratio(agent_allowed_only, dnsdist_allowed_only),
        agent_over_dnsdist_per_round_allowed_only: if agent_allowed_only.is_some()
            && dnsdist_allowed_only.is_some()
        {
            per_round_in(allowed_only, "b", "d")
        } else {
            Vec::new()
        },
        agent_over_direct_per_round: per_round("b", "a"),
        agent_over_direct_qps: ratio(qps("b"), qps("a")),
        pair_over_dnsdist_qps: ratio(qps("c"), qps("d")),
        dnsdist_over_direct_qps: ratio(qps("d"), qps("a")),
        agent_added_p99_us: added("b", |l| l.latency.p99_us),
        agent_added_p50_us: added("b", |l| l.latency.p50_us),
        dnsdist_added_p99_us: added("d", |l| l.latency.p99_us),
        dnsdist_added_p50_us: added("d", |l| l.latency.p50_us),
        pair_added_p99_us: added("c", |l| l.latency.p99_us),
        agent_added_p99_at_arrival_us: added("b", |l| l.latency_at_arrival.p99_us),
        dnsdist_added_p99_at_arrival_us: added("d", |l| l.latency_at_arrival.p99_us),
        agent_added_p99_from_schedule_us: added("b", |l| l.latency_from_schedule.p99_us),
        dnsdist_added_p99_from_schedule_us: added("d", |l| l.latency_from_schedule.p99_us),
        sender_lag_p99_us: ["a", "b", "d"].map(|key| at_fixed_rate(key, |l| l.sender_lag.p99_us)),
        agent_added_p99_us_per_round: added_per_round("b"),
        dnsdist_added_p99_us_per_round: added_per_round("d"),
        agent_added_p50_us_light: light("b", |l| l.latency.p50_us),
        agent_added_p99_us_light: light("b", |l| l.latency.p99_us),
        dnsdist_added_p50_us_light: light("d", |l| l.latency.p50_us),
        dnsdist_added_p99_us_light: light("d", |l| l.latency.p99_us),
        pair_added_p99_us_light: light("c", |l| l.latency.p99_us),
        agent_ebpf_over_dnsdist_qps: ratio(qps("e"), qps("d")),
        pair_ebpf_over_dnsdist_qps: ratio(qps("f"), qps("d")),
        agent_ebpf_added_p99_us: added("e", |l| l.latency.p99_us),
        pair_ebpf_added_p99_us: added("f", |l| l.latency.p99_us),
        agent_ebpf_added_p99_us_light: light("e", |l| l.latency.p99_us),
        pair_ebpf_added_p99_us_light: light("f", |l| l.latency.p99_us),
        redirected_over_dnsdist_qps: ratio(qps("g"), qps("d")),
        redirected_over_agent_ebpf_qps: ratio(qps("g"), qps("e")),
        redirected_added_p99_us: added("g", |l| l.latency.p99_us),
        redirected_added_p99_us_light: light("g", |l| l.latency.p99_us),
    }
}

/// The pooled fixed-rate report of scenario `key` (borrowed: it holds every latency sample).
pub fn load<'a>(rows: &'a [Latency], key: &str) -> Option<&'a LoadReport> {
    rows.iter()
        .find(|l| l.key == key)
        .and_then(|l| l.load.as_ref())
}

/// `op` of two scenarios' figures round by round (rounds are interleaved, so round `i` of one
/// ran next to round `i` of the other).
fn each_round(a: &[f64], b: &[f64], op: fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| op(*x, *y)).collect()
}

/// The targets against what was measured.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let ratio = r.ratios.agent_over_dnsdist_qps;
    out.push(Target {
        what: "(b) agent max QPS vs (d) dnsdist".to_owned(),
        bar: "≥ 1.0×".to_owned(),
        measured: ratio.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}×")),
        met: ratio.map(|v| v >= 1.0),
    });
    let like_for_like = r.ratios.agent_over_dnsdist_qps_allowed_only;
    out.push(Target {
        what: "(b) vs (d) like for like: allowed names only, both forwarding every query"
            .to_owned(),
        bar: "≥ 1.0×".to_owned(),
        measured: like_for_like.map_or_else(
            || "–".to_owned(),
            |v| {
                format!(
                    "{v:.2}× (per round {})",
                    report::list(&r.ratios.agent_over_dnsdist_per_round_allowed_only)
                )
            },
        ),
        met: like_for_like.map(|v| v >= 1.0),
    });
    let light = r.ratios.agent_added_p99_us_light;
    let added = r.ratios.agent_added_p99_us;
    out.push(Target {
        what: format!("(b) added p99 latency vs direct at {} QPS", r.latency_rate),
        bar: "≤ 200 µs".to_owned(),
        measured: added.map_or_else(
            || "–".to_owned(),
            |v| {
                format!(
                    "{v:+.0} µs (per round {})",
                    report::signed_list(&r.ratios.agent_added_p99_us_per_round)
                )
            },
        ),
        met: added.map(|v| v <= 200.0),
    });
    out.push(Target {
        what: format!(
            "(b) added p99 latency vs direct at {} QPS (below every scenario's max: the proxy's own cost)",
            r.light_rate
        ),
        bar: "≤ 200 µs".to_owned(),
        measured: light.map_or_else(|| "–".to_owned(), |v| format!("{v:+.0} µs")),
        met: light.map(|v| v <= 200.0),
    });
    let at_10k = r.policy.iter().find(|p| p.selectors == 10_000);
    out.push(Target {
        what: "policy check at 10,000 selectors (worst of matcher / dns_allowed, hit / miss)"
            .to_owned(),
        bar: "≤ 1 µs".to_owned(),
        measured: at_10k.map_or_else(
            || "–".to_owned(),
            |p| format!("{:.0} ns", p.worst_check_ns()),
        ),
        met: at_10k.map(|p| p.worst_check_ns() <= 1_000.0),
    });
    if let Some(c) = &r.cache {
        out.push(Target {
            what: format!("bytes per cached (name, IP) at {} entries", c.entries),
            bar: "≤ 250 at 1,000,000".to_owned(),
            measured: format!("{:.0}", c.bytes_per_entry),
            met: (c.entries >= 1_000_000).then_some(c.bytes_per_entry <= 250.0),
        });
    }
    if let Some(c) = &r.churn {
        out.push(Target {
            what: format!(
                "memory after {} min of churn vs the steady live set",
                c.simulated_minutes
            ),
            bar: "within 10% (after 60 min)".to_owned(),
            measured: format!("{:.2}×", c.end_over_steady),
            met: (c.simulated_minutes >= 60).then_some(c.end_over_steady <= 1.10),
        });
    }
    let hold = r
        .hold
        .iter()
        .find(|h| h.datapath == "ebpf" && h.available)
        .or_else(|| r.hold.iter().find(|h| h.available));
    out.push(Target {
        what: format!(
            "datapath hold p99 ({})",
            hold.map_or("–", |h| h.datapath.as_str())
        ),
        bar: "≤ 100 µs".to_owned(),
        measured: hold.map_or_else(|| "–".to_owned(), |h| format!("{} µs", h.hold.show(true))),
        met: hold.and_then(|h| h.hold.p99_us).map(|v| v <= 100.0),
    });
    let pair_sigterm: Vec<&Restart> = r
        .restart
        .iter()
        .filter(|x| x.available && x.signal == "SIGTERM" && !x.peers.starts_with("none"))
        .collect();
    let alone = r
        .restart
        .iter()
        .find(|x| x.available && x.signal == "SIGTERM" && x.peers.starts_with("none"));
    let (measured, met) = if pair_sigterm.is_empty() {
        (
            alone.map_or_else(
                || "–".to_owned(),
                |a| {
                    format!(
                        "agent alone on the port: {} lost; with warden-dnsproxy: not available yet",
                        a.lost
                    )
                },
            ),
            None,
        )
    } else {
        let lost: Vec<String> = pair_sigterm
            .iter()
            .map(|x| format!("{}: {}", x.process, x.lost))
            .collect();
        (
            lost.join(", "),
            Some(pair_sigterm.iter().all(|x| x.lost == 0)),
        )
    };
    out.push(Target {
        what: "queries lost per SIGTERM restart (agent and dnsproxy sharing the port)".to_owned(),
        bar: "0".to_owned(),
        measured,
        met,
    });
    out
}

/// What makes the run itself a failure, whatever the figures: nothing answered, or a wrong
/// verdict (a denied name answered or an allowed one refused).
pub fn sanity(r: &Results) -> Vec<String> {
    let mut problems = Vec::new();
    for t in r.throughput.iter().filter(|t| t.available) {
        if t.mean_qps <= 0.0 {
            problems.push(format!("({}) {}: no queries answered", t.key, t.label));
        }
    }
    for l in r.latency.iter().chain(&r.latency_light) {
        if let Some(load) = &l.load {
            if load.answered == 0 {
                problems.push(format!(
                    "({}) {}: nothing answered at the fixed rate",
                    l.key, l.label
                ));
            }
            if load.wrong_verdicts > 0 {
                problems.push(format!(
                    "({}) {}: {} wrong verdicts",
                    l.key, l.label, load.wrong_verdicts
                ));
            }
        }
    }
    // A redirected client whose records the proxy never found was not redirected, or was
    // served without its redirect record: either way (g) measured something else. (The
    // fixed-rate rounds are checked, where the agent's counters are scraped around each.)
    for l in r.latency.iter().chain(&r.latency_light) {
        if l.key == "g"
            && let Some(load) = &l.load
        {
            let lookups = l
                .server
                .as_ref()
                .map(|s| s.redirect_lookups)
                .unwrap_or_default();
            let expected = lookups.total().max(load.answered as f64);
            if expected == 0.0 || lookups.found < expected * 0.99 {
                problems.push(format!(
                    "({}) {}: {:.0} redirect records found for {:.0} lookups and {} answers",
                    l.key,
                    l.label,
                    lookups.found,
                    lookups.total(),
                    load.answered
                ));
            }
        }
    }
    for x in r
        .restart
        .iter()
        .filter(|x| x.available && x.wrong_verdicts > 0)
    {
        problems.push(format!(
            "restart of {} ({}): {} wrong verdicts",
            x.process, x.signal, x.wrong_verdicts
        ));
    }
    problems
}
