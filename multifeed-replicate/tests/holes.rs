//! Feeds with holes (blocks missing below their length) are filled from a peer that has them.

mod common;

use std::time::Duration;

use common::{seeded_rng, within, TestHost};
use hypercore_schema::{RequestBlock, RequestUpgrade};
use multifeed_replicate::{replicate, FeedHost, ReplicateConfig};
use rand::Rng;

/// Copies blocks `wanted` of `key` from `from` into `to` (which gets the feed), the first with
/// the upgrade to the full length: a replica whose other blocks are holes.
async fn sparse_copy(from: &TestHost, to: &TestHost, key: &[u8; 32], wanted: &[u64]) {
    let source = from.core(key).expect("the author's core");
    let target = to.add_remote_feed(key).await.expect("a replica");
    let length = source.lock().await.info().length;
    for (n, &index) in wanted.iter().enumerate() {
        let nodes = target
            .lock()
            .await
            .missing_nodes(index)
            .await
            .expect("missing nodes");
        let upgrade = (n == 0).then_some(RequestUpgrade { start: 0, length });
        let proof = source
            .lock()
            .await
            .create_proof(Some(RequestBlock { index, nodes }), None, None, upgrade)
            .await
            .expect("a proof")
            .expect("held");
        target
            .lock()
            .await
            .verify_and_apply_proof(&proof)
            .await
            .expect("applies");
    }
    let info = target.lock().await.info();
    assert_eq!(info.length, length);
    assert!(info.contiguous_length < length, "the copy has holes");
}

#[async_std::test]
async fn holes_are_filled_from_a_peer_that_has_the_blocks() {
    let mut rng = seeded_rng();
    for round in 0..5 {
        let author = TestHost::new();
        let length = rng.gen_range(50..400u64);
        let key = author.writer(length).await;
        let replica = TestHost::new();
        // A few stored runs with holes between them, always block 0 (it carries the upgrade).
        let mut wanted = vec![0];
        wanted.extend((1..length).filter(|_| rng.gen_bool(0.4)));
        wanted.sort_unstable();
        wanted.dedup();
        sparse_copy(&author, &replica, &key, &wanted).await;
        let config =
            |initiator| ReplicateConfig::new(initiator).idle_timeout(Duration::from_secs(5));
        let (a, b) = async_std::os::unix::net::UnixStream::pair().expect("socket pair");
        let (ha, hr): (std::sync::Arc<dyn FeedHost>, std::sync::Arc<dyn FeedHost>) =
            (author.clone(), replica.clone());
        let (ra, rr) = within(
            "a sync that fills the holes",
            futures::future::join(
                replicate(a, ha, config(true)),
                replicate(b, hr, config(false)),
            ),
        )
        .await;
        ra.unwrap_or_else(|e| panic!("round {round}: author: {e}"));
        let summary = rr.unwrap_or_else(|e| panic!("round {round}: replica: {e}"));
        assert_eq!(
            summary.blocks_received,
            length - wanted.len() as u64,
            "round {round}: exactly the holes were fetched"
        );
        assert_eq!(
            replica.entries(&key).await,
            author.entries(&key).await,
            "round {round}"
        );
    }
}
