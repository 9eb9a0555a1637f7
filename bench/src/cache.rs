//! Cache cost, on the real `warden_fqdn::DnsCache`: memory per (name, IP) at 1,000,000
//! entries as the allocator sees it (and as the cache estimates it), insert and lookup times,
//! and an hour of name churn simulated in fast-forward (the cache takes time as an argument).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use serde::Serialize;
use warden_config::DnsConfig;
use warden_fqdn::{CacheLimits, DnsCache, UnixTime};
use warden_proxy::SharedCache;

use crate::alloc::Usage;

const NOW: UnixTime = UnixTime(1_700_000_000);
const ENDPOINTS: u32 = 100;

/// Memory and time at `entries` entries.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CacheCost {
    pub entries: u64,
    /// Allocator bytes held per entry (usable size + chunk header, counted by the global
    /// allocator): the figure the target is about.
    pub bytes_per_entry: f64,
    /// Bytes the cache asked for, per entry.
    pub requested_bytes_per_entry: f64,
    /// The cache's own estimate (`approx_heap_bytes`), per entry.
    pub estimated_bytes_per_entry: f64,
    /// Mean time of one insert of a new (endpoint, name, IP) while growing to `entries`.
    pub insert_new_ns: f64,
    /// Mean time of one insert refreshing an existing entry in the full cache.
    pub insert_refresh_ns: f64,
    /// Mean time of one `lookup(endpoint, name)` in the full cache, keys scattered.
    pub lookup_ns: f64,
    /// Mean time of one `names_for_ip` (reverse lookup) in the full cache.
    pub reverse_lookup_ns: f64,
    /// A copy of the full cache in one hold of its lock, in ms.
    pub copy_ms: f64,
    /// The same copy a chunk of `warden_proxy::COPY_CHUNK` pairs per hold, as the agent takes
    /// it twice a second (to persist the cache, for its reconciler): the median hold and the
    /// 99th percentile of the holds, in ms (the longest alone measures the machine's worst
    /// moment: a wall-clock hold includes any time the bench itself was descheduled).
    pub copy_chunk_p50_ms: f64,
    pub copy_chunk_p99_ms: f64,
    /// IPs due in the expiry sweep below: every hundredth entry has a short TTL.
    pub gc_expired: u64,
    /// That sweep in one hold (`DnsCache::gc`, as the agent took it before), in ms.
    pub gc_whole_ms: f64,
    /// The same sweep `warden_proxy::GC_CHUNK` pairs per hold, as the agent takes it now:
    /// median and 99th percentile of the holds, in ms.
    pub gc_step_p50_ms: f64,
    pub gc_step_p99_ms: f64,
    /// What a DNS answer waits for: another thread takes the cache's lock every 20 µs while
    /// `SharedCache::gc` sweeps, and while `SharedCache::entries_unordered` copies; the
    /// longest of its waits for the lock, in ms.
    pub gc_wait_max_ms: f64,
    pub copy_wait_max_ms: f64,
    /// Names in the shared-IP sweep below.
    pub shared_ip_names: u32,
    /// One `gc` removing that many names at once, all resolving to the same IP (random names
    /// under a wildcard answered by one address: the reverse index's worst case), in ms.
    pub shared_ip_sweep_ms: f64,
    /// The same sweep in chunks: the 99th percentile of its holds, in ms.
    pub shared_ip_step_p99_ms: f64,
    /// Percent of the entries expiring together in the mass-expiry sweep below, which leaves
    /// the cache mostly vacant and so goes on into a compaction (a rebuild of what is left).
    pub mass_expiry_percent: u32,
    /// That sweep and compaction in one `gc`, in ms.
    pub mass_expiry_whole_ms: f64,
    /// The same in chunks, as the agent takes them: the 99th percentile and the longest of
    /// the holds, in ms.
    pub mass_expiry_step_p99_ms: f64,
    pub mass_expiry_step_max_ms: f64,
    /// The chunked sweep beside a thread taking the lock every 20 µs: its longest wait, in ms.
    pub mass_expiry_wait_max_ms: f64,
}

/// Churn: new names at a fixed rate, short TTL, `gc` every simulated second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnCost {
    pub simulated_minutes: u32,
    pub names_per_minute: u32,
    pub ttl_s: u32,
    pub names_inserted: u64,
    /// Live (endpoint, name, IP) entries at the end.
    pub live_entries_end: u64,
    /// Mean allocator bytes held over simulated minute 2 (the steady live set, warmed up).
    pub steady_bytes: f64,
    /// Mean over the last simulated minute.
    pub end_bytes: f64,
    /// Highest after minute 1.
    pub peak_bytes: f64,
    /// A fresh cache holding exactly the live set at the end, for reference.
    pub fresh_bytes: f64,
    /// end / steady: the target is ≤ 1.10.
    pub end_over_steady: f64,
    pub end_over_fresh: f64,
    pub wall_seconds: f64,
}

fn endpoint(i: u32) -> String {
    format!("tenant-{}/client", i % ENDPOINTS)
}

fn name(i: u32) -> String {
    format!("svc-{i:07}.prod.example.com.")
}

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

/// Deterministic spread over the keys so lookups do not walk memory in insertion order.
fn scatter(i: u32, entries: u32) -> u32 {
    i.wrapping_mul(2_654_435_761) % entries
}

fn limits() -> CacheLimits {
    // The agent's defaults, but for the name cap: the bench sizes the cache itself (a million
    // names on 100 endpoints would sit at the default cap exactly, and refuse past it).
    let dns = DnsConfig::default();
    CacheLimits {
        min_ttl: dns.min_ttl,
        max_ttl: dns.max_ttl,
        max_ips_per_name: dns.max_ips_per_name,
        max_names_per_endpoint: 0,
    }
}

/// Entry `i`'s TTL when `due_percent` of the entries expire within the minute (spread evenly),
/// the rest within the hour.
fn ttl(i: u32, due_percent: u32) -> u32 {
    if i % 100 < due_percent { 60 } else { 3_600 }
}

fn ns_per(started: Instant, count: u32) -> f64 {
    started.elapsed().as_secs_f64() * 1e9 / f64::from(count.max(1))
}

/// Times each call of `step` until it says it is done: the holds of a lock, in ms, sorted.
fn holds_ms(mut step: impl FnMut() -> bool) -> Vec<f64> {
    let mut holds = Vec::new();
    loop {
        let started = Instant::now();
        let done = step();
        holds.push(started.elapsed().as_secs_f64() * 1e3);
        if done {
            holds.sort_unstable_by(f64::total_cmp);
            return holds;
        }
    }
}

/// One `gc` of `cache` at `due`, as the agent took it before it swept in chunks: how many IPs
/// went, and how long it took in ms.
fn whole_sweep(mut cache: DnsCache, due: UnixTime) -> (usize, f64) {
    let started = Instant::now();
    let removed = black_box(cache.gc(due)).len();
    (removed, started.elapsed().as_secs_f64() * 1e3)
}

/// The holds, in ms and sorted, of the same sweep taken [`warden_proxy::GC_CHUNK`] pairs per
/// step, as `SharedCache::gc` takes it; what a finished compaction replaced is freed after
/// the timing, as `SharedCache` frees it after the lock.
fn sweep_holds_ms(mut cache: DnsCache, due: UnixTime) -> Vec<f64> {
    let mut retired = Vec::new();
    holds_ms(|| {
        let step = cache.gc_step(due, warden_proxy::GC_CHUNK);
        retired.extend(step.retired);
        step.done
    })
}

/// Runs `walk` while another thread takes `shared`'s lock every 20 µs, as DNS answers do;
/// returns the longest time that thread waited for the lock, in ms.
fn longest_wait_ms(shared: &SharedCache, walk: impl FnOnce()) -> f64 {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let answers = scope.spawn(|| {
            let mut longest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let cache = shared.lock();
                longest = longest.max(asked.elapsed());
                drop(cache);
                std::thread::sleep(Duration::from_micros(20));
            }
            longest
        });
        // Let the answering thread get going first.
        std::thread::sleep(Duration::from_millis(20));
        walk();
        stop.store(true, Ordering::Relaxed);
        answers.join().unwrap_or_default().as_secs_f64() * 1e3
    })
}

/// The `quantile` of sorted `values` (nearest rank).
fn rank(values: &[f64], quantile: f64) -> f64 {
    let index = (quantile * values.len() as f64).ceil() as usize;
    values
        .get(index.saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

/// Builds a cache of `entries` distinct names (one IP each, 100 endpoints) and measures it.
/// Single-threaded and with nothing else running: the allocator counts the whole process.
pub fn measure(entries: u32) -> CacheCost {
    // Keys are built before the measurement; the cache copies what it keeps.
    let endpoints: Vec<String> = (0..ENDPOINTS).map(endpoint).collect();
    let names: Vec<String> = (0..entries).map(name).collect();
    let before = Usage::now();
    let mut cache = DnsCache::new(limits());
    let started = Instant::now();
    for i in 0..entries {
        let k = i as usize;
        cache.insert(
            NOW,
            &endpoints[k % endpoints.len()],
            &names[k],
            &[ip(i)],
            ttl(i, 1),
        );
    }
    let insert_new_ns = ns_per(started, entries);
    let used = Usage::now().since(before);
    let estimated = cache.approx_heap_bytes();
    let count = cache.ip_count() as f64;

    let probes = entries.min(1_000_000);
    let started = Instant::now();
    for i in 0..probes {
        let k = scatter(i, entries) as usize;
        black_box(cache.lookup(NOW, &endpoints[k % endpoints.len()], &names[k]));
    }
    let lookup_ns = ns_per(started, probes);
    let started = Instant::now();
    for i in 0..probes {
        black_box(cache.names_for_ip(NOW, ip(scatter(i, entries))));
    }
    let reverse_lookup_ns = ns_per(started, probes);
    let started = Instant::now();
    for i in 0..probes {
        let k = scatter(i, entries);
        let (e, n) = (&endpoints[k as usize % endpoints.len()], &names[k as usize]);
        black_box(cache.insert(NOW, e, n, &[ip(k)], ttl(k, 1)));
    }
    let insert_refresh_ns = ns_per(started, probes);
    let started = Instant::now();
    black_box(cache.entries_unordered(NOW));
    let copy_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut from = 0;
    let copy_holds = holds_ms(|| {
        let (chunk, next) = cache.entries_chunk(NOW, from, warden_proxy::COPY_CHUNK);
        black_box(chunk);
        from = next;
        from >= cache.pair_id_bound()
    });
    let entries_held = cache.ip_count();

    // The sweep once the short TTLs ran out, on copies of the full cache.
    let due = NOW.plus_secs(60);
    let (gc_expired, gc_whole_ms) = whole_sweep(cache.clone(), due);
    let gc_holds = sweep_holds_ms(cache.clone(), due);
    // The same sweep, and a copy, as the agent takes them, beside a thread that needs the lock.
    let shared = SharedCache::new(cache);
    let copy_wait_max_ms = longest_wait_ms(&shared, || {
        black_box(shared.entries_unordered(NOW));
    });
    let gc_wait_max_ms = longest_wait_ms(&shared, || {
        black_box(shared.gc(due));
    });

    CacheCost {
        entries: entries_held as u64,
        bytes_per_entry: used.held as f64 / count,
        requested_bytes_per_entry: used.requested as f64 / count,
        estimated_bytes_per_entry: estimated as f64 / count,
        insert_new_ns,
        insert_refresh_ns,
        lookup_ns,
        reverse_lookup_ns,
        copy_ms,
        copy_chunk_p50_ms: rank(&copy_holds, 0.5),
        copy_chunk_p99_ms: rank(&copy_holds, 0.99),
        gc_expired: gc_expired as u64,
        gc_whole_ms,
        gc_step_p50_ms: rank(&gc_holds, 0.5),
        gc_step_p99_ms: rank(&gc_holds, 0.99),
        gc_wait_max_ms,
        copy_wait_max_ms,
        ..CacheCost::default()
    }
}

/// Times the expiry sweep of `names` names that all resolve to one IP, expiring together.
pub fn shared_ip_sweep(cost: &mut CacheCost, names: u32) {
    use std::fmt::Write as _;
    // The reverse index's worst case, whoever asked: one client alone now stops at
    // `max_names_per_endpoint`, but many clients can still share one IP.
    let mut cache = DnsCache::new(limits());
    let shared = [ip(0)];
    let mut qname = String::with_capacity(64);
    for n in 0..names {
        qname.clear();
        let _ = write!(qname, "r{n:09}.wild.example.net.");
        cache.insert(NOW, "tenant-0/client", &qname, &shared, 5);
    }
    let due = NOW.plus_secs(3600);
    let holds = sweep_holds_ms(cache.clone(), due);
    let (removed, whole_ms) = whole_sweep(cache, due);
    cost.shared_ip_sweep_ms = whole_ms;
    cost.shared_ip_names = u32::try_from(removed).unwrap_or(u32::MAX);
    cost.shared_ip_step_p99_ms = rank(&holds, 0.99);
}

/// Times the sweep of `entries` entries, `percent` of them expiring together, and the
/// compaction that follows: in one `gc`, in chunks, and what an answer waits meanwhile.
pub fn mass_expiry(cost: &mut CacheCost, entries: u32, percent: u32) {
    let mut cache = DnsCache::new(limits());
    for i in 0..entries {
        cache.insert(NOW, &endpoint(i), &name(i), &[ip(i)], ttl(i, percent));
    }
    let due = NOW.plus_secs(60);
    cost.mass_expiry_percent = percent;
    cost.mass_expiry_whole_ms = whole_sweep(cache.clone(), due).1;
    let holds = sweep_holds_ms(cache.clone(), due);
    cost.mass_expiry_step_p99_ms = rank(&holds, 0.99);
    cost.mass_expiry_step_max_ms = holds.last().copied().unwrap_or_default();
    let shared = SharedCache::new(cache);
    cost.mass_expiry_wait_max_ms = longest_wait_ms(&shared, || {
        black_box(shared.gc(due));
    });
}

/// `minutes` simulated minutes of `per_minute` new names with `ttl`, `gc` each second.
pub fn churn(minutes: u32, per_minute: u32, ttl: u32) -> ChurnCost {
    let started = Instant::now();
    let endpoints: Vec<String> = (0..10).map(|i| format!("tenant-{i}/client")).collect();
    // One name buffer, grown once, so the loop allocates nothing but what the cache keeps.
    let mut qname = String::with_capacity(64);
    let before = Usage::now();
    let mut cache = DnsCache::new(limits());
    let mut inserted: u64 = 0;
    let mut minute_means = Vec::with_capacity(minutes as usize);
    let mut peak: isize = 0;
    for minute in 0..minutes {
        let mut sum: f64 = 0.0;
        for second in 0..60u64 {
            let now = NOW.plus_secs(u64::from(minute) * 60 + second);
            // Spread evenly: the total after each second follows the rate exactly.
            let elapsed_s = u64::from(minute) * 60 + second + 1;
            let due = elapsed_s * u64::from(per_minute) / 60;
            while inserted < due {
                let n = u32::try_from(inserted).unwrap_or(u32::MAX);
                qname.clear();
                use std::fmt::Write as _;
                let _ = write!(qname, "churn-{n:09}.cdn.example.net.");
                let ep = &endpoints[(n % 10) as usize];
                cache.insert(now, ep, &qname, &[ip(n)], ttl);
                inserted += 1;
            }
            drop(cache.gc(now));
            let held = Usage::now().since(before).held;
            if minute >= 1 {
                peak = peak.max(held);
            }
            sum += held as f64;
        }
        minute_means.push(sum / 60.0);
    }
    let end = NOW.plus_secs(u64::from(minutes) * 60);
    let live = cache.entries(end);
    let live_entries_end = cache.ip_count() as u64;
    let steady = minute_means.get(1).copied().unwrap_or_default();
    let end_bytes = minute_means.last().copied().unwrap_or_default();

    // The same live set, inserted into a cache that never saw churn.
    let fresh_before = Usage::now();
    let mut fresh = DnsCache::new(limits());
    for entry in &live {
        for cached in &entry.ips {
            fresh.insert_entry(
                &entry.endpoint,
                &entry.name,
                cached.ip,
                cached.expires_at,
                warden_fqdn::Source::Lookup,
                entry.learned_at_ms,
            );
        }
    }
    let fresh_bytes = Usage::now().since(fresh_before).held as f64;
    drop(fresh);
    drop(live);

    ChurnCost {
        simulated_minutes: minutes,
        names_per_minute: per_minute,
        ttl_s: ttl,
        names_inserted: inserted,
        live_entries_end,
        steady_bytes: steady,
        end_bytes,
        peak_bytes: peak as f64,
        fresh_bytes,
        end_over_steady: end_bytes / steady.max(1.0),
        end_over_fresh: end_bytes / fresh_bytes.max(1.0),
        wall_seconds: started.elapsed().as_secs_f64(),
    }
}
