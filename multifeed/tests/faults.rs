//! Replication under seeded network faults, disconnects at every phase, topologies and TCP.
//!
//! Every run either converges or fails with a typed error within its bound; no stored entry is
//! lost or altered; a clean reconnect afterwards converges. `MULTIFEED_SEED` replays a sweep;
//! `MULTIFEED_FAULT_SEEDS=<n>` sets how many fault schedules run (default 200).

use std::time::Duration;

use multifeed::{Multifeed, ReplicateOptions};
use multifeed_testkit::{
    assert_converged, connect_live, connect_topology, digest, link, memory_peer, sync_over,
    tcp_pair, wait_converged, Direction, LinkConfig, Seed, Topology,
};
use rand::Rng;

const BOUND: Duration = Duration::from_secs(30);

/// Every entry `peer` stores of `source`'s feeds equals the source's entry.
async fn entries_match_sources(peer: &Multifeed, sources: &[&Multifeed]) -> Result<(), String> {
    for feed in peer.feeds() {
        let Some(original) = sources.iter().find_map(|s| {
            s.feed(feed.key())
                .ok()
                .flatten()
                .filter(|f| f.is_writable())
        }) else {
            continue;
        };
        let len = feed.len().await.map_err(|e| e.to_string())?;
        for i in 0..len {
            if let Some(entry) = feed.get(i).await.map_err(|e| e.to_string())? {
                let expected = original.get(i).await.map_err(|e| e.to_string())?;
                if expected.as_ref() != Some(&entry) {
                    return Err(format!(
                        "entry {i} of {} differs from its author's",
                        feed.key_hex()
                    ));
                }
            }
        }
    }
    Ok(())
}

#[async_std::test]
async fn seeded_fault_schedules_converge_or_fail_cleanly() {
    let runs: u64 = std::env::var("MULTIFEED_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let master = Seed::from_env_or_random();
    let mut outcomes = [0usize; 2];
    let mut kinds = std::collections::BTreeMap::new();
    for run in 0..runs {
        let seed = master.derive(run);
        let mut rng = seed.rng(99);
        let a = memory_peer("a", 2, 30).await.expect("peer a");
        let b = memory_peer("b", 1, 20).await.expect("peer b");
        let (own_a, own_b) = (
            digest(&a).await.expect("digest"),
            digest(&b).await.expect("digest"),
        );
        let direction = if rng.gen_bool(0.5) {
            Direction::AtoB
        } else {
            Direction::BtoA
        };
        let base = LinkConfig::reliable()
            .seed(seed)
            .chunking(rng.gen_range(1..4096));
        let (kind, config) = match rng.gen_range(0..7) {
            0 => (
                "latency",
                base.latency(
                    Duration::from_micros(rng.gen_range(0..300)),
                    Duration::from_micros(500),
                ),
            ),
            1 => ("corruption", base.corrupt(rng.gen_range(0.00001..0.001))),
            2 | 3 => (
                "disconnect",
                base.disconnect_after(direction, rng.gen_range(0..12_000)),
            ),
            6 => (
                "bandwidth+stalls",
                base.bandwidth(rng.gen_range(200_000..4_000_000)).stalls(
                    rng.gen_range(0.0..0.05),
                    Duration::from_millis(rng.gen_range(1..300)),
                ),
            ),
            4 => (
                "half-close",
                base.half_close_after(direction, rng.gen_range(0..12_000)),
            ),
            _ => (
                "silent",
                base.silent_after(direction, rng.gen_range(0..12_000)),
            ),
        };
        *kinds.entry(kind).or_insert(0) += 1;
        let (ea, eb) = link(config);
        let short = Duration::from_millis(400);
        let both = futures::future::join(
            a.replicate(ea, ReplicateOptions::new(true).timeouts(short * 3, short)),
            b.replicate(eb, ReplicateOptions::new(false).timeouts(short * 3, short)),
        );
        let (ra, rb) = async_std::future::timeout(BOUND, both)
            .await
            .unwrap_or_else(|_| panic!("run {run} ({kind}, MULTIFEED_SEED={}) hung", master.0));
        let ok = ra.is_ok() && rb.is_ok();
        outcomes[usize::from(ok)] += 1;
        for result in [&ra, &rb] {
            if let Err(err) = result {
                assert!(!err.to_string().is_empty(), "errors say what happened");
            }
        }
        if ok {
            assert_converged(&[&a, &b])
                .await
                .unwrap_or_else(|e| panic!("run {run} ({kind}): {e}"));
        }
        // Nothing stored was lost or altered: own feeds are as they were, copies are faithful.
        for (peer, own) in [(&a, &own_a), (&b, &own_b)] {
            let now = digest(peer).await.expect("digest");
            for (key, value) in own {
                assert_eq!(
                    now.get(key),
                    Some(value),
                    "run {run} ({kind}): own feed changed"
                );
            }
            entries_match_sources(peer, &[&a, &b])
                .await
                .unwrap_or_else(|e| panic!("run {run} ({kind}): {e}"));
        }
        // A clean reconnect finishes the job.
        let (ra, rb) = sync_over(&a, &b, link(LinkConfig::reliable()), BOUND)
            .await
            .unwrap_or_else(|e| panic!("run {run}: reconnect: {e}"));
        ra.unwrap_or_else(|e| panic!("run {run} ({kind}): reconnect failed: {e}"));
        rb.unwrap_or_else(|e| panic!("run {run} ({kind}): reconnect failed: {e}"));
        assert_converged(&[&a, &b])
            .await
            .unwrap_or_else(|e| panic!("run {run} ({kind}): after reconnect: {e}"));
    }
    eprintln!(
        "{runs} fault schedules: {} converged, {} failed cleanly; kinds {kinds:?}",
        outcomes[1], outcomes[0]
    );
}

#[async_std::test]
async fn disconnects_at_every_phase_resume_without_resending_blocks() {
    const ENTRIES: u64 = 400;
    // From inside the Noise handshake to the end of the feed transfer.
    for cut in [
        1, 30, 80, 150, 300, 600, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000,
    ] {
        let a = memory_peer("a", 1, ENTRIES as usize).await.expect("peer a");
        let b = Multifeed::open_memory().await.expect("peer b");
        let config = LinkConfig::reliable().disconnect_after(Direction::AtoB, cut);
        let (ra, rb) = sync_over(&a, &b, link(config), BOUND)
            .await
            .expect("bounded");
        assert!(
            ra.is_err() || rb.is_err() || cut > 20_000,
            "cut at {cut} must fail the run"
        );
        let key = *a.feeds()[0].key();
        let stored = match b.feed(key).expect("key") {
            Some(feed) => feed.info().await.expect("info").contiguous_length,
            None => 0,
        };
        let (ra, rb) = sync_over(&a, &b, link(LinkConfig::reliable()), BOUND)
            .await
            .expect("bounded");
        ra.expect("reconnect a");
        let received = rb.expect("reconnect b").blocks_received;
        assert_eq!(
            received,
            ENTRIES - stored,
            "cut at {cut}: resume sends only the missing blocks"
        );
        assert_converged(&[&a, &b]).await.expect("converged");
    }
}

async fn topology_converges(topology: Topology) {
    let mut peers = Vec::new();
    for i in 0..8 {
        peers.push(memory_peer(&format!("p{i}-"), 1, 5).await.expect("peer"));
    }
    let links = connect_topology(&peers, topology);
    let refs: Vec<&Multifeed> = peers.iter().collect();
    wait_converged(&refs, Duration::from_secs(60))
        .await
        .expect("all 8 converge");
    assert_eq!(peers[0].feeds().len(), 8);
    // A peer that joins late catches up, and its feed reaches everyone.
    let late = memory_peer("late-", 1, 3).await.expect("late peer");
    let late_link = connect_live(&late, &peers[3]);
    let mut all: Vec<&Multifeed> = peers.iter().collect();
    all.push(&late);
    wait_converged(&all, Duration::from_secs(60))
        .await
        .expect("the late peer converges");
    assert_eq!(peers[7].feeds().len(), 9);
    for link in links.into_iter().chain([late_link]) {
        for result in link.stop().await {
            result.expect("live replication ends cleanly");
        }
    }
}

#[async_std::test]
async fn eight_peers_in_a_line_converge_and_a_late_peer_catches_up() {
    topology_converges(Topology::Line).await;
}

#[async_std::test]
async fn eight_peers_in_a_ring_converge_and_a_late_peer_catches_up() {
    topology_converges(Topology::Ring).await;
}

#[async_std::test]
async fn peers_replicate_over_real_tcp_on_loopback() {
    let a = memory_peer("a", 3, 50).await.expect("a");
    let b = memory_peer("b", 2, 50).await.expect("b");
    let c = memory_peer("c", 1, 10).await.expect("c");
    let (ra, rb) = sync_over(&a, &b, tcp_pair().await.expect("tcp"), BOUND)
        .await
        .expect("bounded");
    ra.expect("a");
    rb.expect("b");
    let (rb, rc) = sync_over(&b, &c, tcp_pair().await.expect("tcp"), BOUND)
        .await
        .expect("bounded");
    rb.expect("b");
    rc.expect("c");
    assert_converged(&[&b, &c])
        .await
        .expect("b and c converged");
    assert_eq!(c.feeds().len(), 6);
}
