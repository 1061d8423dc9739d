//! Feeds reopen with exactly what they held: long feeds (more than one bitfield page, where
//! hypercore 0.16 alone panics), and sparse replicas whose oplog holds replicated blocks (which
//! hypercore 0.16 alone cannot decode), reopened at many points.

use std::collections::BTreeSet;
use std::sync::Arc;

use hypercore::{Hypercore, PartialKeypair};
use hypercore_schema::{RequestBlock, RequestUpgrade};
use multifeed_storage::{
    CoreOptions, Durability, FeedOrigin, FeedRecord, MemoryFactory, RootStorage,
};
use rand::{Rng, SeedableRng};

fn value(i: u64) -> Vec<u8> {
    format!("entry {i}").into_bytes()
}

async fn root_of(files: &MemoryFactory) -> RootStorage {
    let (root, _, _) = RootStorage::open(
        Arc::new(files.clone()),
        CoreOptions::default(),
        Durability::Process,
    )
    .await
    .expect("open root");
    root
}

async fn writer(root: &mut RootStorage, entries: u64) -> (FeedRecord, Hypercore) {
    let signing_key = hypercore::generate_signing_key();
    let key_pair = PartialKeypair {
        public: signing_key.verifying_key(),
        secret: Some(signing_key),
    };
    let (record, mut core) = root
        .create_feed(key_pair, None, FeedOrigin::Local)
        .await
        .expect("create writer");
    let batch: Vec<Vec<u8>> = (0..entries).map(value).collect();
    core.append_batch(&batch).await.expect("append batch");
    (record, core)
}

#[test]
fn a_feed_longer_than_one_bitfield_page_reopens() {
    async_std::task::block_on(async {
        let files = MemoryFactory::new();
        let mut root = root_of(&files).await;
        // 70,000 entries span three bitfield pages of 32,768 bits.
        let (record, mut core) = writer(&mut root, 70_000).await;
        // A single append after the batch leaves an entry pending in the oplog.
        core.append(&value(70_000)).await.expect("append");
        drop(core);
        for round in 0..3u64 {
            let mut core = root.open_feed(&record).await.expect("reopen a long feed");
            let len = core.info().length;
            assert_eq!(len, 70_001 + round, "round {round}: length");
            assert_eq!(
                core.info().contiguous_length,
                len,
                "round {round}: contiguous"
            );
            assert!(
                (0..len).all(|i| core.has(i)),
                "round {round}: every entry present"
            );
            assert!(
                !core.has(len) && !core.has(len + 40_000),
                "round {round}: nothing beyond"
            );
            for i in (0..len)
                .step_by(997)
                .chain([32_767, 32_768, 65_536, len - 1])
            {
                assert_eq!(core.get(i).await.expect("get"), Some(value(i)), "entry {i}");
            }
            core.append(&value(len)).await.expect("append after reopen");
        }
    });
}

#[test]
fn a_sparse_replica_reopens_with_exactly_its_blocks() {
    let seed: u64 = std::env::var("MULTIFEED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("MULTIFEED_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    async_std::task::block_on(async {
        let files = MemoryFactory::new();
        let mut root = root_of(&files).await;
        let entries = 70_000u64;
        let (_, mut source) = writer(&mut root, entries).await;
        let public = source.key_pair().public;
        // The replica lives in another root, as on another machine.
        let mut root = root_of(&MemoryFactory::new()).await;
        let (record, mut replica) = root
            .create_feed(
                PartialKeypair {
                    public,
                    secret: None,
                },
                None,
                FeedOrigin::Remote,
            )
            .await
            .expect("create replica");

        // The tree first (an upgrade without a block), then blocks in random order, spread
        // over every bitfield page, with a few contiguous runs.
        let proof = source
            .create_proof(
                None,
                None,
                None,
                Some(RequestUpgrade {
                    start: 0,
                    length: entries,
                }),
            )
            .await
            .expect("upgrade proof")
            .expect("a proof");
        assert!(replica.verify_and_apply_proof(&proof).await.expect("apply"));
        let mut wanted: Vec<u64> = (0..150).map(|_| rng.gen_range(0..entries)).collect();
        wanted.extend(0..40);
        wanted.extend(32_760..32_800);
        let mut held = BTreeSet::new();
        for (n, index) in wanted.into_iter().enumerate() {
            let nodes = replica.missing_nodes(index).await.expect("missing nodes");
            let proof = source
                .create_proof(Some(RequestBlock { index, nodes }), None, None, None)
                .await
                .expect("block proof")
                .expect("a proof");
            assert!(replica.verify_and_apply_proof(&proof).await.expect("apply"));
            held.insert(index);
            if n % 37 == 5 {
                drop(replica);
                replica = root.open_feed(&record).await.unwrap_or_else(|e| {
                    panic!(
                        "MULTIFEED_SEED={seed}: reopen after {} blocks: {e}",
                        held.len()
                    )
                });
                check(&mut replica, &held, entries, seed).await;
            }
        }
        drop(replica);
        let mut replica = root.open_feed(&record).await.expect("final reopen");
        check(&mut replica, &held, entries, seed).await;
    });
}

async fn check(replica: &mut Hypercore, held: &BTreeSet<u64>, entries: u64, seed: u64) {
    assert_eq!(
        replica.info().length,
        entries,
        "MULTIFEED_SEED={seed}: length"
    );
    let contiguous = (0..).take_while(|i| held.contains(i)).count() as u64;
    assert_eq!(
        replica.info().contiguous_length,
        contiguous,
        "MULTIFEED_SEED={seed}: contiguous length"
    );
    for i in 0..entries + 10 {
        assert_eq!(
            replica.has(i),
            held.contains(&i),
            "MULTIFEED_SEED={seed}: has({i})"
        );
    }
    for &i in held {
        assert_eq!(
            replica.get(i).await.expect("get"),
            Some(value(i)),
            "MULTIFEED_SEED={seed}: entry {i}"
        );
    }
}
