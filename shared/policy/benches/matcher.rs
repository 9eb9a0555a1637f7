//! One `NameMatcher` lookup against 10, 1,000 and 10,000 selectors, the target being at most
//! 1 µs at 10,000.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use warden_policy::{DnsName, FqdnSelector, NameMatcher};

/// `count` selectors under distinct domains, mixing the shapes policies use.
fn matcher(count: usize) -> NameMatcher<usize> {
    let mut matcher = NameMatcher::new();
    for i in 0..count {
        let selector = match i % 5 {
            0 => FqdnSelector::name(&format!("api.service{i}.example.com")),
            1 => FqdnSelector::pattern(&format!("*.service{i}.example.com")),
            2 => FqdnSelector::pattern(&format!("**.service{i}.example.net")),
            3 => FqdnSelector::pattern(&format!("special*service.api{i}.example.org")),
            _ => FqdnSelector::pattern(&format!("*.*.service{i}.example.io")),
        };
        matcher.insert(&selector.expect("generated selectors are valid"), i);
    }
    matcher
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("name_matcher_lookup");
    for count in [10, 1_000, 10_000] {
        let matcher = matcher(count);
        // Selector 7 (`**.service7.example.net`) exists at every size.
        let hit = DnsName::new("a.b.service7.example.net").expect("valid name");
        let miss = DnsName::new("www.unrelated.example.com").expect("valid name");
        let mut found = Vec::with_capacity(4);
        group.bench_with_input(BenchmarkId::new("hit", count), &hit, |b, name| {
            b.iter(|| {
                found.clear();
                matcher.matches_into(black_box(name), &mut found);
                found.len()
            })
        });
        group.bench_with_input(BenchmarkId::new("miss", count), &miss, |b, name| {
            b.iter(|| matcher.is_match(black_box(name)))
        });
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
