//! Workloads shared by the criterion benchmarks and the comparison run against the JS baselines.
//!
//! Each workload fills two multifeeds (writers x entries of about 100 bytes of JSON, as the JS
//! baseline does) and measures one full non-live replication between them, from the first byte
//! until both sides return, then checks that every entry arrived.

use std::time::{Duration, Instant};

use multifeed::{Multifeed, ReplicateOptions, ValueEncoding};

/// Where a workload keeps its feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    /// In memory.
    Memory,
    /// On disk, in a fresh temporary directory per side.
    Disk,
    /// In memory on hypercore 0.16's own storage, `random-access-memory` with 4 KiB pages
    /// (the reference the in-memory backend is measured against), through the same stack.
    StockMemory,
}

/// A replication workload: writers x entries on each side.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Name, as the JS baseline spells it.
    pub name: &'static str,
    /// Side A: (writers, entries per writer).
    pub a: (usize, usize),
    /// Side B: (writers, entries per writer).
    pub b: (usize, usize),
}

impl Workload {
    /// Total entries both sides hold after replication.
    pub fn entries(&self) -> usize {
        self.a.0 * self.a.1 + self.b.0 * self.b.1
    }

    /// Total feeds both sides hold after replication.
    pub fn feeds(&self) -> usize {
        self.a.0 + self.b.0
    }
}

/// The JS baseline's four workloads plus 10,000 feeds of one entry.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "one-feed-10k",
        a: (1, 10_000),
        b: (0, 0),
    },
    Workload {
        name: "feeds100x100",
        a: (100, 100),
        b: (0, 0),
    },
    Workload {
        name: "feeds1000x1",
        a: (1_000, 1),
        b: (0, 0),
    },
    Workload {
        name: "bidir10x1000",
        a: (10, 1_000),
        b: (10, 1_000),
    },
    Workload {
        name: "feeds10000x1",
        a: (10_000, 1),
        b: (0, 0),
    },
];

/// The workload called `name`.
pub fn workload(name: &str) -> Option<Workload> {
    WORKLOADS.iter().copied().find(|w| w.name == name)
}

/// Two filled multifeeds, ready to replicate; keeps their directories alive.
#[derive(Debug)]
pub struct Prepared {
    /// Side A.
    pub a: Multifeed,
    /// Side B.
    pub b: Multifeed,
    _dirs: Vec<tempfile::TempDir>,
}

async fn open(
    kind: StorageKind,
    dirs: &mut Vec<tempfile::TempDir>,
) -> Result<Multifeed, Box<dyn std::error::Error>> {
    let builder = Multifeed::builder().value_encoding(ValueEncoding::Json);
    let builder = match kind {
        StorageKind::Memory => builder.memory(),
        StorageKind::Disk => {
            let dir = tempfile::tempdir()?;
            let builder = builder.disk(dir.path());
            dirs.push(dir);
            builder
        }
        StorageKind::StockMemory => builder.storage(multifeed::FnFactory::new(|_path: &str| {
            Box::pin(async {
                Ok(
                    Box::new(random_access_memory::RandomAccessMemory::new(4096))
                        as multifeed_storage::BoxedStore,
                )
            })
        })),
    };
    Ok(builder.open().await?)
}

async fn fill(
    multi: &Multifeed,
    prefix: &str,
    (writers, entries): (usize, usize),
) -> Result<(), multifeed::Error> {
    let msg = "x".repeat(80);
    for w in 0..writers {
        let feed = multi.writer(&format!("{prefix}{w}")).await?;
        let batch: Vec<Vec<u8>> = (0..entries)
            .map(|n| {
                serde_json::to_vec(&serde_json::json!({ "msg": msg, "n": n })).unwrap_or_default()
            })
            .collect();
        if !batch.is_empty() {
            feed.append_batch(&batch).await?;
        }
    }
    Ok(())
}

/// Opens and fills both sides of `workload`.
pub async fn prepare(
    workload: Workload,
    kind: StorageKind,
) -> Result<Prepared, Box<dyn std::error::Error>> {
    let mut dirs = Vec::new();
    let a = open(kind, &mut dirs).await?;
    let b = open(kind, &mut dirs).await?;
    fill(&a, "a", workload.a).await?;
    fill(&b, "b", workload.b).await?;
    Ok(Prepared { a, b, _dirs: dirs })
}

/// Replicates both sides of `prepared` over a local socket pair; returns the wall time.
pub async fn replicate(prepared: &Prepared) -> Result<Duration, Box<dyn std::error::Error>> {
    let (left, right) = async_std::os::unix::net::UnixStream::pair()?;
    let started = Instant::now();
    let (ra, rb) = futures::join!(
        prepared.a.replicate(left, ReplicateOptions::new(true)),
        prepared.b.replicate(right, ReplicateOptions::new(false)),
    );
    let elapsed = started.elapsed();
    ra?;
    rb?;
    Ok(elapsed)
}

/// Checks that both sides hold every feed and the last entry of each.
pub async fn check(
    prepared: &Prepared,
    workload: Workload,
) -> Result<(), Box<dyn std::error::Error>> {
    for (side, multi) in [("a", &prepared.a), ("b", &prepared.b)] {
        let feeds = multi.feeds();
        if feeds.len() != workload.feeds() {
            return Err(format!(
                "side {side} has {} feeds, expected {}",
                feeds.len(),
                workload.feeds()
            )
            .into());
        }
        let mut entries = 0;
        for feed in feeds {
            let len = feed.len().await?;
            entries += len as usize;
            if len > 0 && feed.get(len - 1).await?.is_none() {
                return Err(
                    format!("side {side}: last entry of {} missing", feed.key_hex()).into(),
                );
            }
        }
        if entries != workload.entries() {
            return Err(format!(
                "side {side} has {entries} entries, expected {}",
                workload.entries()
            )
            .into());
        }
    }
    Ok(())
}

/// This process's peak resident memory so far, in MB (`VmHWM`; 0 where `/proc` has none).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb * 1024.0 / 1e6)
}
