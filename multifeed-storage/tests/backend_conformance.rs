//! Our stores behave exactly like `random-access-memory`, the reference, under random operations.

use multifeed_storage::{DiskStore, FdPool, MemoryStore};
use rand::{Rng, SeedableRng};
use random_access_memory::RandomAccessMemory;
use random_access_storage::{RandomAccess, RandomAccessError};

#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Bytes(Vec<u8>),
    Len(u64),
    OutOfBounds,
    Io,
}

fn outcome<T>(result: Result<T, RandomAccessError>, f: impl FnOnce(T) -> Outcome) -> Outcome {
    match result {
        Ok(value) => f(value),
        Err(RandomAccessError::OutOfBounds { .. }) => Outcome::OutOfBounds,
        Err(_) => Outcome::Io,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Read(u64, u64),
    Del(u64, u64),
    Truncate(u64),
    Len,
}

async fn apply(store: &mut (dyn RandomAccess + Send), op: &Op) -> Outcome {
    match op {
        Op::Write(offset, data) => outcome(store.write(*offset, data).await, |_| Outcome::Ok),
        Op::Read(offset, len) => outcome(store.read(*offset, *len).await, Outcome::Bytes),
        Op::Del(offset, len) => outcome(store.del(*offset, *len).await, |_| Outcome::Ok),
        Op::Truncate(len) => outcome(store.truncate(*len).await, |_| Outcome::Ok),
        Op::Len => outcome(store.len().await, Outcome::Len),
    }
}

fn random_op(rng: &mut impl Rng) -> Op {
    let offset = rng.gen_range(0..40_000u64);
    match rng.gen_range(0..10) {
        0..=2 => Op::Write(
            offset,
            (0..rng.gen_range(0..9000)).map(|_| rng.gen()).collect(),
        ),
        // Mostly zeros, as hypercore's bitfield pages and oplog header slots are.
        3 => Op::Write(offset, {
            let mut data = vec![0u8; rng.gen_range(0..9000)];
            for _ in 0..rng.gen_range(0..4) {
                if !data.is_empty() {
                    let at = rng.gen_range(0..data.len());
                    data[at] = rng.gen_range(1..=255);
                }
            }
            data
        }),
        4..=6 => Op::Read(offset, rng.gen_range(0..20_000)),
        7 => Op::Del(offset, rng.gen_range(0..10_000)),
        8 => Op::Truncate(rng.gen_range(0..45_000)),
        _ => Op::Len,
    }
}

#[async_std::test]
async fn random_operations_match_the_reference() {
    let seed: u64 = std::env::var("MULTIFEED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("MULTIFEED_SEED={seed}");
    let dir = tempfile::tempdir().expect("temp dir");
    for round in 0..16u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ round);
        let mut reference = RandomAccessMemory::new(1024);
        let mut memory = MemoryStore::new();
        // A tiny cache and descriptor pool force evictions and reopening.
        let pool = FdPool::with_cache(2, 3);
        // Odd rounds use a feed's file names: `tree` holds its writes back until the `oplog`
        // next to it is written, and must still read, truncate and report lengths exactly.
        let (name, twin) = if round % 2 == 1 {
            ("tree", "oplog")
        } else {
            ("file", "other")
        };
        let mut disk = DiskStore::open(&pool, dir.path().join(format!("r{round}/{name}")));
        let mut disk_twin = DiskStore::open(&pool, dir.path().join(format!("r{round}/{twin}")));
        for step in 0..400 {
            let op = random_op(&mut rng);
            let expected = apply(&mut reference, &op).await;
            assert_eq!(
                apply(&mut memory, &op).await,
                expected,
                "memory, round {round} step {step}: {op:?}"
            );
            assert_eq!(
                apply(&mut disk, &op).await,
                expected,
                "disk, round {round} step {step}: {op:?}"
            );
            // Another file in the same pool competes for descriptors and cache pages.
            let _ = apply(&mut disk_twin, &random_op(&mut rng)).await;
        }
        assert!(pool.open_count() <= 2);
    }
}

#[async_std::test]
async fn a_hypercore_round_trips_on_disk_stores_through_a_small_pool() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = FdPool::with_cache(3, 16);
    let open = |pool: &FdPool| {
        let pool = pool.clone();
        let root = dir.path().to_path_buf();
        move |store: hypercore::Store| {
            let name = format!("{store:?}").to_lowercase();
            let disk = DiskStore::open(&pool, root.join(name));
            Box::pin(async move { Ok(Box::new(disk) as Box<dyn hypercore::StorageTraits + Send>) })
                as std::pin::Pin<
                    Box<
                        dyn std::future::Future<
                                Output = Result<
                                    Box<dyn hypercore::StorageTraits + Send>,
                                    RandomAccessError,
                                >,
                            > + Send,
                    >,
                >
        }
    };
    let storage = hypercore::Storage::open(open(&pool), false)
        .await
        .expect("storage");
    let mut core = hypercore::HypercoreBuilder::new(storage)
        .build()
        .await
        .expect("core");
    for i in 0..1000u32 {
        core.append(format!("entry {i}").as_bytes())
            .await
            .expect("append");
    }
    drop(core);
    pool.clear();
    let storage = hypercore::Storage::open(open(&pool), false)
        .await
        .expect("storage");
    let mut core = hypercore::HypercoreBuilder::new(storage)
        .open(true)
        .build()
        .await
        .expect("reopen");
    assert_eq!(core.info().length, 1000);
    for i in (0..1000u32).step_by(37) {
        assert_eq!(
            core.get(u64::from(i)).await.expect("get"),
            Some(format!("entry {i}").into_bytes())
        );
    }
    assert!(pool.open_count() <= 3);
}
