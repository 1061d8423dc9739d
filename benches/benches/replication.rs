//! Full non-live replication between two multifeeds, per workload, in memory and on disk.
//!
//! `cargo bench -p multifeed-benches` (set `MULTIFEED_BENCH_DISK=1` to add the disk variants).

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use multifeed_benches::{check, prepare, replicate, StorageKind, WORKLOADS};

fn replication(c: &mut Criterion) {
    let mut kinds = vec![StorageKind::Memory];
    if std::env::var_os("MULTIFEED_BENCH_DISK").is_some() {
        kinds.push(StorageKind::Disk);
    }
    let mut group = c.benchmark_group("replicate");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    for kind in kinds {
        for workload in WORKLOADS {
            let id = BenchmarkId::new(format!("{kind:?}").to_lowercase(), workload.name);
            group.bench_function(id, |b| {
                b.iter_custom(|iterations| {
                    async_std::task::block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iterations {
                            let prepared = prepare(*workload, kind).await.expect("prepare");
                            total += replicate(&prepared).await.expect("replicate");
                            check(&prepared, *workload).await.expect("complete");
                        }
                        total
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, replication);
criterion_main!(benches);
