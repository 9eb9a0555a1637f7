//! Percentiles from raw samples and from Prometheus histograms.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Percentiles of `samples` (microseconds); sorts them in place.
pub fn percentiles(samples: &mut [u32]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let sum: f64 = samples.iter().map(|&s| f64::from(s)).sum();
    let count = samples.len();
    Percentiles {
        samples: count as u64,
        mean_us: sum / count as f64,
        p50_us: rank(samples, 0.50),
        p90_us: rank(samples, 0.90),
        p99_us: rank(samples, 0.99),
        p999_us: rank(samples, 0.999),
        max_us: f64::from(samples[count - 1]),
    }
}

/// Nearest-rank percentile of sorted samples.
fn rank(sorted: &[u32], q: f64) -> f64 {
    let n = sorted.len();
    // ceil(q * n) as a 1-based rank; the cast is exact for any realistic sample count.
    let at = ((q * n as f64).ceil() as usize).clamp(1, n);
    f64::from(sorted[at - 1])
}

/// One histogram as scraped: cumulative counts per upper bound (seconds), `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// The histogram `name` from a Prometheus text scrape, summed over every series whose
    /// labels include all of `labels` (both processes of a pair, say).
    pub fn from_scrape(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Histogram {
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        let mut sum = 0.0;
        let mut count = 0.0;
        let bucket_name = format!("{name}_bucket");
        let sum_name = format!("{name}_sum");
        let count_name = format!("{name}_count");
        for line in scrape.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = labels
                .iter()
                .all(|(key, want)| rest.contains(&format!("{key}=\"{want}\"")));
            if !wanted {
                continue;
            }
            if metric == bucket_name {
                let Some(le) = label(rest, "le") else {
                    continue;
                };
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    match le.parse::<f64>() {
                        Ok(bound) => bound,
                        Err(_) => continue,
                    }
                };
                // Keyed by the bound's bits so equal bounds of different series add up;
                // positive floats sort like their bit patterns.
                let entry = buckets.entry(bound.to_bits()).or_insert((bound, 0.0));
                entry.1 += value;
            } else if metric == sum_name {
                sum += value;
            } else if metric == count_name {
                count += value;
            }
        }
        Histogram {
            buckets: buckets.into_values().collect(),
            sum,
            count,
        }
    }

    /// Adds `other`'s observations (same buckets) to these.
    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.is_empty() {
            *self = other.clone();
            return;
        }
        for (bound, count) in &mut self.buckets {
            if let Some((_, more)) = other.buckets.iter().find(|(b, _)| b == bound) {
                *count += more;
            }
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    /// What was observed between two scrapes (`self` later than `earlier`).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|&(bound, count)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(b, _)| *b == bound)
                    .map_or(0.0, |(_, c)| *c);
                (bound, (count - before).max(0.0))
            })
            .collect();
        Histogram {
            buckets,
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The `q` quantile in seconds, interpolated linearly inside its bucket as Prometheus'
    /// `histogram_quantile` does (the first bucket starts at 0; a quantile in `+Inf` reports
    /// the largest finite bound). `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map(|&(_, c)| c)?;
        if total <= 0.0 {
            return None;
        }
        let target = q * total;
        let mut lower_bound = 0.0;
        let mut lower_count = 0.0;
        for &(bound, count) in &self.buckets {
            if count >= target {
                if bound.is_infinite() {
                    return Some(lower_bound);
                }
                let in_bucket = count - lower_count;
                if in_bucket <= 0.0 {
                    return Some(bound);
                }
                return Some(
                    lower_bound + (bound - lower_bound) * (target - lower_count) / in_bucket,
                );
            }
            lower_bound = bound;
            lower_count = count;
        }
        Some(lower_bound)
    }

    /// Upper bound (seconds) of the bucket holding the `q` quantile.
    pub fn quantile_bucket(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map(|&(_, c)| c)?;
        if total <= 0.0 {
            return None;
        }
        self.buckets
            .iter()
            .find(|&&(_, count)| count >= q * total)
            .map(|&(bound, _)| bound)
    }

    /// p50 and p99 in microseconds, with the observation count and the mean.
    pub fn summary_us(&self) -> HistogramSummary {
        let first = self.buckets.first().map(|&(bound, _)| bound);
        // Inside the first bucket, interpolation only halves its bound: say "≤ bound".
        let in_first = |q: f64| first.is_some() && self.quantile_bucket(q) == first;
        HistogramSummary {
            observations: self.count.max(0.0) as u64,
            mean_us: if self.count > 0.0 {
                self.sum / self.count * 1e6
            } else {
                0.0
            },
            p50_us: self.quantile(0.50).map(|s| s * 1e6),
            p99_us: self.quantile(0.99).map(|s| s * 1e6),
            p50_in_first_bucket: in_first(0.50),
            p99_in_first_bucket: in_first(0.99),
            first_bucket_us: first.map(|s| s * 1e6),
        }
    }
}

/// Percentiles estimated from a histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct HistogramSummary {
    pub observations: u64,
    pub mean_us: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// The quantile lies in the first bucket: below `first_bucket_us`, nothing finer known.
    pub p50_in_first_bucket: bool,
    pub p99_in_first_bucket: bool,
    pub first_bucket_us: Option<f64>,
}

impl HistogramSummary {
    /// `p` (0.5 or 0.99) for a table: "≤ 25" inside the first bucket, else the interpolation.
    pub fn show(&self, p99: bool) -> String {
        let (value, in_first) = if p99 {
            (self.p99_us, self.p99_in_first_bucket)
        } else {
            (self.p50_us, self.p50_in_first_bucket)
        };
        match (value, in_first, self.first_bucket_us) {
            (None, _, _) => "–".to_owned(),
            (Some(_), true, Some(bound)) => format!("≤ {bound:.0}"),
            (Some(v), _, _) => format!("{v:.0}"),
        }
    }
}

/// The value of `key` in a Prometheus label set `a="x",b="y"}`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("{key}=\"");
    let at = labels.find(&needle)? + needle.len();
    labels[at..].split('"').next()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<u32> = (1..=1000).rev().collect();
        let p = percentiles(&mut samples);
        assert_eq!(p.samples, 1000);
        assert_eq!(p.p50_us, 500.0);
        assert_eq!(p.p99_us, 990.0);
        assert_eq!(p.p999_us, 999.0);
        assert_eq!(p.max_us, 1000.0);
        assert!((p.mean_us - 500.5).abs() < 1e-9);
        assert_eq!(percentiles(&mut []), Percentiles::default());
    }

    const SCRAPE: &str = r#"# HELP warden_dns_processing_seconds Time spent on a DNS query, split by scope.
# TYPE warden_dns_processing_seconds histogram
warden_dns_processing_seconds_bucket{instance="agent",scope="datapath_hold",le="0.000025"} 50
warden_dns_processing_seconds_bucket{instance="agent",scope="datapath_hold",le="0.00005"} 90
warden_dns_processing_seconds_bucket{instance="agent",scope="datapath_hold",le="0.0001"} 100
warden_dns_processing_seconds_bucket{instance="agent",scope="datapath_hold",le="+Inf"} 100
warden_dns_processing_seconds_sum{instance="agent",scope="datapath_hold"} 0.003
warden_dns_processing_seconds_count{instance="agent",scope="datapath_hold"} 100
warden_dns_processing_seconds_bucket{instance="agent",scope="total",le="0.000025"} 7
"#;

    #[test]
    fn histogram_quantiles_interpolate_like_prometheus() {
        let h = Histogram::from_scrape(
            SCRAPE,
            "warden_dns_processing_seconds",
            &[("scope", "datapath_hold")],
        );
        assert_eq!(h.buckets.len(), 4);
        assert_eq!(h.count, 100.0);
        // 50th of 100 is the last of the first bucket: its upper bound.
        assert!((h.quantile(0.5).unwrap() - 0.000025).abs() < 1e-12);
        // 99th: 9 of the 10 in (50 µs, 100 µs].
        assert!((h.quantile(0.99).unwrap() - 0.000095).abs() < 1e-12);
        let s = h.summary_us();
        assert_eq!(s.observations, 100);
        assert_eq!(s.show(false), "≤ 25");
        assert_eq!(s.show(true), "95");
        assert!((s.mean_us - 30.0).abs() < 1e-9);
    }

    #[test]
    fn histogram_differences_and_empty() {
        let later = Histogram::from_scrape(
            SCRAPE,
            "warden_dns_processing_seconds",
            &[("scope", "datapath_hold")],
        );
        let earlier = Histogram::from_scrape(
            &SCRAPE
                .replace("} 50\n", "} 40\n")
                .replace("} 100\n", "} 90\n"),
            "warden_dns_processing_seconds",
            &[("scope", "datapath_hold")],
        );
        let d = later.since(&earlier);
        assert_eq!(d.buckets[0].1, 10.0);
        assert_eq!(d.buckets[3].1, 10.0);
        assert_eq!(Histogram::default().quantile(0.5), None);
        let inf_only = Histogram {
            buckets: vec![(0.001, 0.0), (f64::INFINITY, 5.0)],
            sum: 1.0,
            count: 5.0,
        };
        assert_eq!(inf_only.quantile(0.5), Some(0.001));
    }
}
