//! DNS cache at 1,000,000 (endpoint, name, IP) entries: insert, lookup and reverse lookup.
//!
//! Run with `cargo bench -p warden-fqdn`. The setup also prints the heap estimate per entry,
//! which the memory budget (<= 250 bytes per cached name/IP at 1M entries) is checked against.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use warden_fqdn::{CacheLimits, DnsCache, UnixTime};

const ENTRIES: u32 = 1_000_000;
const ENDPOINTS: u32 = 100;
const NOW: UnixTime = UnixTime(1_700_000_000);

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
fn scatter(i: u32) -> u32 {
    i.wrapping_mul(2_654_435_761) % ENTRIES
}

struct Fixture {
    cache: DnsCache,
    endpoints: Vec<String>,
    names: Vec<String>,
}

fn fixture() -> Fixture {
    let limits = CacheLimits {
        min_ttl: 0,
        max_ttl: 0,
        max_ips_per_name: 1_000,
        max_names_per_endpoint: 0,
    };
    let mut cache = DnsCache::new(limits);
    let endpoints: Vec<String> = (0..ENTRIES).map(endpoint).collect();
    let names: Vec<String> = (0..ENTRIES).map(name).collect();
    let started = Instant::now();
    for i in 0..ENTRIES {
        let k = i as usize;
        cache.insert(NOW, &endpoints[k], &names[k], &[ip(i)], 3_600);
    }
    let built = started.elapsed();
    let heap = cache.approx_heap_bytes();
    eprintln!(
        "fixture: {} entries in {built:?}; approx heap {heap} bytes = {} bytes/entry",
        cache.ip_count(),
        heap / cache.ip_count().max(1)
    );
    Fixture {
        cache,
        endpoints,
        names,
    }
}

fn benches(c: &mut Criterion) {
    let mut fx = fixture();
    let mut group = c.benchmark_group("dns_cache_1m");

    let mut i = 0u32;
    group.bench_function("lookup", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let k = scatter(i) as usize;
            black_box(fx.cache.lookup(NOW, &fx.endpoints[k], &fx.names[k]))
        })
    });

    group.bench_function("lookup_any_endpoint", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let k = scatter(i) as usize;
            black_box(fx.cache.lookup_any_endpoint(NOW, &fx.names[k]))
        })
    });

    group.bench_function("names_for_ip", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(fx.cache.names_for_ip(NOW, ip(scatter(i))))
        })
    });

    group.bench_function(BenchmarkId::new("insert", "refresh_existing"), |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let k = scatter(i);
            let (ep, nm) = (&fx.endpoints[k as usize], &fx.names[k as usize]);
            black_box(fx.cache.insert(NOW, ep, nm, &[ip(k)], 3_600))
        })
    });

    let mut work = fx.cache.clone();
    let mut round = 0u64;
    group.bench_function(BenchmarkId::new("insert", "new_name"), |b| {
        // Names are built before the clock starts, and removed again after it stops so the
        // cache stays at 1M entries across samples (the slots they used are then reused,
        // as under churn).
        b.iter_custom(|iters| {
            round += 1;
            let fresh: Vec<String> = (0..iters)
                .map(|n| format!("new-{round}-{n:09}.example."))
                .collect();
            let started = Instant::now();
            for (n, nm) in fresh.iter().enumerate() {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                black_box(work.insert(NOW, "tenant-0/client", nm, &[ip(ENTRIES + n)], 60));
            }
            let took = started.elapsed();
            work.remove_matching(|_, name| name.starts_with("new-"));
            took
        })
    });

    group.finish();
    // The refresh benchmark must not have changed the shape of the fixture.
    assert_eq!(fx.cache.ip_count(), ENTRIES as usize);
    assert_eq!(work.ip_count(), ENTRIES as usize);
}

criterion_group! {
    name = cache;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(cache);
