//! Kills at every write: a process killed with SIGKILL keeps every write it finished (the kernel
//! holds them) and loses every later one. These tests model exactly that, deterministically: a
//! store that stops applying writes, truncates and deletes after the N-th one. After each
//! simulated kill, the root must reopen, every feed must open, and every acknowledged append must
//! be there, intact.
//!
//! `kill_at_every_write_after_a_reopen` enumerates every kill point of a history that reopens a
//! feed with entries pending in its oplog (hypercore 0.16 lost entries there before
//! `OplogGuard`). `random_kill_generations` runs seeded generations of appends and batches, each
//! killed at a random write; `MULTIFEED_SEED` replays one, `MULTIFEED_CRASH_GENERATIONS` sets how
//! many (default 300).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use hypercore::{Hypercore, PartialKeypair};
use multifeed_storage::{
    BoxedStore, CoreOptions, Durability, FeedOrigin, FeedRecord, FnFactory, MemoryFactory,
    MemoryStore, RootStorage, StorageFactory,
};
use rand::{Rng, SeedableRng};
use random_access_storage::{RandomAccess, RandomAccessError};

/// Writes left before the simulated kill; negative once it has happened.
type Budget = Arc<AtomicI64>;

#[derive(Debug)]
struct KillableStore {
    inner: MemoryStore,
    budget: Budget,
}

impl KillableStore {
    /// Whether a mutation may still reach the store; the call that exhausts the budget is the
    /// first one lost.
    fn alive(&self) -> bool {
        self.budget.fetch_sub(1, Ordering::SeqCst) > 0
    }
}

#[async_trait::async_trait]
impl RandomAccess for KillableStore {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        if self.alive() {
            self.inner.write(offset, data).await
        } else {
            Ok(())
        }
    }
    async fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, RandomAccessError> {
        self.inner.read(offset, length).await
    }
    async fn del(&mut self, offset: u64, length: u64) -> Result<(), RandomAccessError> {
        if self.alive() {
            self.inner.del(offset, length).await
        } else {
            Ok(())
        }
    }
    async fn truncate(&mut self, length: u64) -> Result<(), RandomAccessError> {
        if self.alive() {
            self.inner.truncate(length).await
        } else {
            Ok(())
        }
    }
    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        self.inner.len().await
    }
    async fn is_empty(&mut self) -> Result<bool, RandomAccessError> {
        self.inner.is_empty().await
    }
    async fn sync_all(&mut self) -> Result<(), RandomAccessError> {
        Ok(())
    }
}

/// The files of one simulated machine, and the kill switch of the process using them.
struct Machine {
    files: MemoryFactory,
    budget: Budget,
}

impl Machine {
    fn new() -> Self {
        Self {
            files: MemoryFactory::new(),
            budget: Arc::new(AtomicI64::new(i64::MAX)),
        }
    }

    fn killed(&self) -> bool {
        self.budget.load(Ordering::SeqCst) < 0
    }

    /// A factory whose stores stop applying mutations once the budget is spent.
    fn factory(&self) -> Arc<dyn StorageFactory> {
        let (files, budget) = (self.files.clone(), self.budget.clone());
        Arc::new(FnFactory::new(move |path: &str| {
            let (files, budget, path) = (files.clone(), budget.clone(), path.to_owned());
            Box::pin(async move {
                files.open(&path).await?;
                let inner = files.file(&path).expect("just opened");
                Ok(Box::new(KillableStore { inner, budget }) as BoxedStore)
            })
        }))
    }

    /// A copy of every file as the kill left it, so checking it changes nothing.
    fn snapshot(&self) -> MemoryFactory {
        let copy = MemoryFactory::new();
        for path in self.files.paths() {
            let bytes = self.files.file(&path).expect("listed").snapshot();
            futures::executor::block_on(copy.open(&path)).expect("memory open");
            copy.file(&path).expect("opened").replace(bytes);
        }
        copy
    }
}

fn entry(feed: usize, index: u64) -> Vec<u8> {
    format!(
        "feed {feed} entry {index} {}",
        "x".repeat((index % 9) as usize * 17)
    )
    .into_bytes()
}

fn key_pair() -> PartialKeypair {
    let signing_key = hypercore::generate_signing_key();
    PartialKeypair {
        public: signing_key.verifying_key(),
        secret: Some(signing_key),
    }
}

async fn open_root(factory: Arc<dyn StorageFactory>) -> (RootStorage, Vec<FeedRecord>) {
    let (root, feeds, _) = RootStorage::open(factory, CoreOptions::default(), Durability::Process)
        .await
        .expect("open root");
    (root, feeds)
}

/// Creates `feeds` writers with a few entries each, without any kill.
async fn setup(machine: &Machine, feeds: usize, rng: &mut impl Rng) -> Vec<u64> {
    let (mut root, _) = open_root(machine.factory()).await;
    let mut acked = Vec::new();
    for f in 0..feeds {
        let (_, mut core) = root
            .create_feed(key_pair(), Some(format!("w{f}")), FeedOrigin::Local)
            .await
            .expect("create feed");
        let n = rng.gen_range(0..6u64);
        for i in 0..n {
            core.append(&entry(f, i)).await.expect("append");
        }
        acked.push(n);
    }
    acked
}

/// Checks a copy of the files: every feed opens, holds at least its acknowledged entries, and
/// every entry it holds is the one appended there. Returns the stored lengths.
async fn check(machine: &Machine, acked: &[u64], context: &str) -> Vec<u64> {
    let copy: Arc<dyn StorageFactory> = Arc::new(machine.snapshot());
    let (root, feeds) = open_root(copy).await;
    assert_eq!(feeds.len(), acked.len(), "{context}: feeds listed");
    let mut lengths = Vec::new();
    for (f, record) in feeds.iter().enumerate() {
        let mut core = root
            .open_feed(record)
            .await
            .unwrap_or_else(|e| panic!("{context}: feed {f} does not open: {e}"));
        let len = core.info().length;
        assert!(
            len >= acked[f],
            "{context}: feed {f} has {len} entries, {} acknowledged",
            acked[f]
        );
        for i in 0..len {
            let got = core
                .get(i)
                .await
                .unwrap_or_else(|e| panic!("{context}: feed {f} entry {i}: {e}"));
            assert_eq!(got, Some(entry(f, i)), "{context}: feed {f} entry {i}");
        }
        lengths.push(len);
    }
    lengths
}

/// Opens every feed and runs `ops` appends (single or batches) until the kill; returns the lengths
/// acknowledged before it.
async fn generation(machine: &Machine, acked: &[u64], ops: usize, rng: &mut impl Rng) -> Vec<u64> {
    let mut acked = acked.to_vec();
    let (root, feeds) = match RootStorage::open(
        machine.factory(),
        CoreOptions::default(),
        Durability::Process,
    )
    .await
    {
        Ok((root, feeds, _)) => (root, feeds),
        Err(e) if machine.killed() => panic!("opening the root failed after the kill: {e}"),
        Err(e) => panic!("opening the root: {e}"),
    };
    let mut cores: Vec<Hypercore> = Vec::new();
    for record in &feeds {
        match root.open_feed(record).await {
            Ok(core) => cores.push(core),
            // Killed while repairing an oplog at open: nothing more is acknowledged.
            Err(_) if machine.killed() => return acked,
            Err(e) => panic!("open feed: {e}"),
        }
    }
    for _ in 0..ops {
        let f = rng.gen_range(0..cores.len());
        let start = acked[f];
        let n = if rng.gen_bool(0.6) {
            1
        } else {
            rng.gen_range(2..25u64)
        };
        let batch: Vec<Vec<u8>> = (start..start + n).map(|i| entry(f, i)).collect();
        let result = cores[f].append_batch(&batch).await;
        if machine.killed() {
            return acked;
        }
        result.expect("append before the kill");
        acked[f] += n;
    }
    acked
}

/// Writes three entries (the first flushed, the others pending in the oplog), reopens the feed,
/// allows `kill_after` more mutations (none lost when `None`) and appends six more. Returns the
/// machine, the record and the acknowledged length.
async fn reopen_history(kill_after: Option<i64>) -> (Machine, FeedRecord, u64, i64) {
    let machine = Machine::new();
    let (mut root, _) = open_root(machine.factory()).await;
    let (record, mut core) = root
        .create_feed(key_pair(), None, FeedOrigin::Local)
        .await
        .expect("create");
    for i in 0..3 {
        core.append(&entry(0, i)).await.expect("append");
    }
    drop(core);
    if let Some(budget) = kill_after {
        machine.budget.store(budget, Ordering::SeqCst);
    }
    let start = machine.budget.load(Ordering::SeqCst);
    let mut acked = 3;
    let mut core = match root.open_feed(&record).await {
        Ok(core) => core,
        Err(_) if machine.killed() => return (machine, record, acked, start),
        Err(e) => panic!("reopen: {e}"),
    };
    for i in 3..9 {
        let result = core.append(&entry(0, i)).await;
        if machine.killed() {
            break;
        }
        result.expect("append");
        acked = i + 1;
    }
    (machine, record, acked, start)
}

#[test]
fn kill_at_every_write_after_a_reopen() {
    async_std::task::block_on(async {
        let (machine, _, acked, start) = reopen_history(None).await;
        assert_eq!(acked, 9);
        let writes = start - machine.budget.load(Ordering::SeqCst);
        assert!(writes > 20, "the history makes {writes} writes");
        for kill_after in 0..=writes {
            let (machine, _, acked, _) = reopen_history(Some(kill_after)).await;
            check(
                &machine,
                &[acked],
                &format!("killed after {kill_after} of {writes} writes"),
            )
            .await;
        }
    });
}

#[test]
fn random_kill_generations() {
    let seed: u64 = std::env::var("MULTIFEED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let generations: usize = std::env::var("MULTIFEED_CRASH_GENERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    println!("MULTIFEED_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    async_std::task::block_on(async {
        let machine = Machine::new();
        let mut acked = setup(&machine, 3, &mut rng).await;
        let mut kills = 0;
        for gen in 0..generations {
            let ops = rng.gen_range(1..12);
            // Roughly 4-12 mutations per append: kill anywhere in the generation, or not at all.
            let budget = rng.gen_range(0..(ops as i64 * 10));
            machine.budget.store(budget, Ordering::SeqCst);
            acked = generation(&machine, &acked, ops, &mut rng).await;
            kills += usize::from(machine.killed());
            let context = format!("MULTIFEED_SEED={seed} generation {gen}");
            // Entries of the append cut by the kill may be there; later ones build on them.
            acked = check(&machine, &acked, &context).await;
            machine.budget.store(i64::MAX, Ordering::SeqCst);
        }
        assert!(
            kills > generations / 3,
            "only {kills} generations were killed"
        );
    });
}
