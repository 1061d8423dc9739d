//! Feeds with holes (blocks missing below their length) are filled from a peer that has them.

mod common;

use std::sync::Arc;
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

/// An author with a feed of 50 to 400 entries and a replica holding block 0 (it carries the
/// upgrade) and each other block with probability `kept`: stored runs with holes between.
async fn sparse_replica(
    rng: &mut impl Rng,
    kept: f64,
) -> (Arc<TestHost>, Arc<TestHost>, [u8; 32], u64, Vec<u64>) {
    let author = TestHost::new();
    let length = rng.gen_range(50..400u64);
    let key = author.writer(length).await;
    let replica = TestHost::new();
    let mut wanted = vec![0];
    wanted.extend((1..length).filter(|_| rng.gen_bool(kept)));
    sparse_copy(&author, &replica, &key, &wanted).await;
    (author, replica, key, length, wanted)
}

#[async_std::test]
async fn holes_are_filled_from_a_peer_that_has_the_blocks() {
    let mut rng = seeded_rng();
    for round in 0..5 {
        let (author, replica, key, length, wanted) = sparse_replica(&mut rng, 0.4).await;
        let (ra, rr) = sync(&author, &replica).await;
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

/// Syncs `a` and `b` (non-live) and returns both results.
async fn sync(
    a: &Arc<TestHost>,
    b: &Arc<TestHost>,
) -> (
    Result<multifeed_replicate::ReplicateSummary, multifeed_replicate::ReplicateError>,
    Result<multifeed_replicate::ReplicateSummary, multifeed_replicate::ReplicateError>,
) {
    let config = |initiator| ReplicateConfig::new(initiator).idle_timeout(Duration::from_secs(5));
    let (sa, sb) = async_std::os::unix::net::UnixStream::pair().expect("socket pair");
    let (ha, hb): (std::sync::Arc<dyn FeedHost>, std::sync::Arc<dyn FeedHost>) =
        (a.clone(), b.clone());
    within(
        "a sync between a replica and a restarted writer",
        futures::future::join(
            replicate(sa, ha, config(true)),
            replicate(sb, hb, config(false)),
        ),
    )
    .await
}

/// Every block `host` holds of `key` is the author's entry (`entry {i}`); returns how many.
async fn held_blocks_are_the_authors(host: &TestHost, key: &[u8; 32], what: &str) -> u64 {
    let core = host.core(key).expect("feed held");
    let mut core = core.lock().await;
    let mut held = 0;
    for i in 0..core.info().length {
        if let Some(block) = core.get(i).await.expect("get") {
            assert_eq!(
                block,
                format!("entry {i}").into_bytes(),
                "{what}: block {i}"
            );
            held += 1;
        }
    }
    held
}

#[async_std::test]
async fn a_sync_with_a_writer_restarted_without_its_signed_tail_ends_with_what_it_could_give() {
    let mut rng = seeded_rng();
    for round in 0..8 {
        let (author, replica, key, length, _) = sparse_replica(&mut rng, 0.3).await;
        // The writer crashed and came back with fewer entries than the replica knows of.
        let kept = rng.gen_range(1..length);
        let restarted = TestHost::new();
        restarted.restarted_writer(&author, &key, kept, 0).await;
        for pass in 0..2 {
            let started = std::time::Instant::now();
            let (rw, rr) = sync(&restarted, &replica).await;
            let sw = rw.unwrap_or_else(|e| panic!("round {round}: writer: {e}"));
            let sr = rr.unwrap_or_else(|e| panic!("round {round}: replica: {e}"));
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "round {round}: the sync ended by its idle timeout (5 s), not because it was done"
            );
            if pass >= 1 {
                assert_eq!(
                    (sw.blocks_received, sr.blocks_received),
                    (0, 0),
                    "round {round}: the first sync took all either side could give"
                );
            }
        }
        let what = format!("round {round}");
        assert!(held_blocks_are_the_authors(&restarted, &key, &what).await >= kept);
        held_blocks_are_the_authors(&replica, &key, &what).await;
        // A peer with every block completes both.
        for host in [&restarted, &replica] {
            let (ra, rh) = sync(&author, host).await;
            ra.unwrap_or_else(|e| panic!("round {round}: author: {e}"));
            rh.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(
                host.entries(&key).await.len() as u64,
                length,
                "round {round}"
            );
        }
    }
}

/// A writer that lost a signed tail in a crash and then appended other entries signed two
/// histories of one feed. A replica holding the first refuses the second: the sync ends at once
/// with a typed error naming the feed (never a stall), and the replica keeps what it held.
#[async_std::test]
async fn a_writer_that_forked_after_a_restart_is_refused_at_once_and_the_replica_keeps_its_copy() {
    let mut rng = seeded_rng();
    for round in 0..4 {
        let author = TestHost::new();
        let length = rng.gen_range(50..400u64);
        let key = author.writer(length).await;
        let replica = TestHost::new();
        let wanted: Vec<u64> = (0..length - 1).collect();
        sparse_copy(&author, &replica, &key, &wanted).await;
        let kept = rng.gen_range(1..length);
        let restarted = TestHost::new();
        let appended = rng.gen_range(1..100);
        restarted
            .restarted_writer(&author, &key, kept, appended)
            .await;
        let started = std::time::Instant::now();
        let (rw, rr) = sync(&restarted, &replica).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "round {round}: the sync ended by its idle timeout (5 s)"
        );
        let refused = [&rw, &rr].into_iter().any(|result| {
            matches!(result, Err(multifeed_replicate::ReplicateError::InvalidProof { key: k, .. })
                if *k == key)
        });
        assert!(refused, "round {round}: {rw:?} / {rr:?}");
        let what = format!("round {round}");
        assert_eq!(
            held_blocks_are_the_authors(&replica, &key, &what).await,
            length - 1,
            "{what}: the replica lost nothing"
        );
    }
}

/// The block right after our length rides with the upgrade request; a peer lacking it answers
/// NoData for both, and the upgrade is then asked for alone (was: never asked again).
#[async_std::test]
async fn the_upgrade_is_asked_for_alone_when_the_peer_lacks_the_block_after_our_length() {
    let author = TestHost::new();
    let key = author.writer(100).await;
    let replica = TestHost::new();
    let wanted: Vec<u64> = (0..100).filter(|&i| i != 40).collect();
    sparse_copy(&author, &replica, &key, &wanted).await;
    let restarted = TestHost::new();
    restarted.restarted_writer(&author, &key, 40, 0).await;
    let (rw, rr) = sync(&restarted, &replica).await;
    let got = rw.expect("writer");
    rr.expect("replica");
    assert_eq!(got.blocks_received, 59, "blocks 41..100");
    assert_eq!(got.feeds_incomplete, 1, "block 40 is nowhere");
    let info = restarted.core(&key).expect("writer").lock().await.info();
    assert_eq!(
        info.length, 100,
        "the writer learned its signed length back"
    );
    assert_eq!(
        held_blocks_are_the_authors(&restarted, &key, "writer").await,
        99
    );
}
