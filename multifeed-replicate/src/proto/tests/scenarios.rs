//! Scenarios of two cores on a fake link, each a deterministic run (seeds print on failure).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use multifeed_storage::FeedKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::proto::sim::{key, FakeFeed, Link, Pair};
use crate::proto::Connection;
use crate::{Phase, ReplicateConfig, ReplicateError, ReplicationEvent};

const MAX_STEPS: usize = 200_000;

fn config(initiator: bool) -> ReplicateConfig {
    ReplicateConfig::new(initiator).max_in_flight(16)
}

/// How many times `side` reported `Synced`.
fn synced_reports(pair: &Pair, side: usize) -> usize {
    pair.peers[side]
        .events
        .iter()
        .filter(|e| matches!(e, ReplicationEvent::Synced))
        .count()
}

fn feeds(list: &[(FeedKey, FakeFeed)]) -> BTreeMap<FeedKey, FakeFeed> {
    list.iter().cloned().collect()
}

/// How many seeds the seeded scenarios run (`MULTIFEED_PAIR_SEEDS`, default 200).
fn seeds() -> u64 {
    std::env::var("MULTIFEED_PAIR_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

/// Random stores for two peers: some feeds each, one maybe shared at another length, some
/// sparse (holes), some empty.
fn random_stores(rng: &mut StdRng) -> [BTreeMap<FeedKey, FakeFeed>; 2] {
    let mut stores = [BTreeMap::new(), BTreeMap::new()];
    for (side, store) in stores.iter_mut().enumerate() {
        for n in 0..rng.gen_range(0..4u8) {
            let length = rng.gen_range(0..60);
            store.insert(key(side as u8 * 16 + n + 1), FakeFeed::full(length));
        }
    }
    if rng.gen_bool(0.5) {
        let shared = key(100);
        let long = rng.gen_range(1..80);
        let short = rng.gen_range(0..=long);
        stores[0].insert(shared, FakeFeed::full(long));
        stores[1].insert(shared, FakeFeed::full(short));
    }
    stores
}

fn random_link(rng: &mut StdRng) -> Link {
    Link {
        latency: Duration::from_millis(rng.gen_range(0..80)),
        jitter: Duration::from_millis(rng.gen_range(0..20)),
        reorder: rng.gen_range(0.0..0.5),
        cut_after: None,
    }
}

/// Every feed either side has with entries, at its longest: what both must end with.
fn union(stores: &[BTreeMap<FeedKey, FakeFeed>; 2]) -> BTreeMap<FeedKey, u64> {
    let mut union = BTreeMap::new();
    for (key, feed) in stores.iter().flatten() {
        if feed.length > 0 {
            let length = union.entry(*key).or_insert(0);
            *length = feed.length.max(*length);
        }
    }
    union
}

fn assert_holds_union(pair: &Pair, union: &BTreeMap<FeedKey, u64>, seed: u64) {
    for (side, peer) in pair.peers.iter().enumerate() {
        assert!(
            peer.error.is_none(),
            "seed {seed}: side {side}: {:?}",
            peer.error
        );
        assert!(
            peer.conn.is_done(),
            "seed {seed}: side {side} did not finish"
        );
        for (key, length) in union {
            let feed = peer.feeds.get(key);
            assert!(
                feed.is_some_and(|f| f.length == *length && f.complete()),
                "seed {seed}: side {side} holds {feed:?} of {:02x}, wants {length} blocks",
                key[0]
            );
        }
    }
}

#[test]
fn two_cores_end_with_the_union_of_their_feeds_for_every_seed() {
    for seed in 0..seeds() {
        let mut rng = StdRng::seed_from_u64(seed);
        let stores = random_stores(&mut rng);
        let want = union(&stores);
        let stores_before = stores.clone();
        let link = random_link(&mut rng);
        let mut pair = Pair::new([config(true), config(false)], stores, link, seed);
        pair.connect();
        pair.run(MAX_STEPS);
        assert_holds_union(&pair, &want, seed);
        // Every block one side lacked was stored once (answers that overtook their anchor
        // are dropped and asked for again: sent counts those twice).
        let lacked: u64 = (0..2)
            .map(|side| {
                want.iter()
                    .map(|(key, length)| {
                        length
                            - stores_before[side]
                                .get(key)
                                .map_or(0, |f| f.blocks.len() as u64)
                    })
                    .sum::<u64>()
            })
            .sum();
        let received: u64 = pair.peers.iter().map(|p| p.summary().blocks_received).sum();
        let sent: u64 = pair.peers.iter().map(|p| p.summary().blocks_sent).sum();
        assert_eq!(received, lacked, "seed {seed}");
        assert!(sent >= received, "seed {seed}");
        // Empty feeds are offered but leave nothing behind on the other side.
        for peer in &pair.peers {
            assert!(peer
                .feeds
                .values()
                .all(|f| f.length > 0 || f.blocks.is_empty()));
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let run = |seed: u64| {
        let mut rng = StdRng::seed_from_u64(seed);
        let stores = random_stores(&mut rng);
        let mut link = random_link(&mut rng);
        link.reorder = 0.3;
        let mut pair = Pair::new([config(true), config(false)], stores, link, seed);
        pair.connect();
        pair.run(MAX_STEPS);
        (pair.trace.clone(), pair.elapsed())
    };
    let (first, elapsed) = run(17);
    assert!(
        first.len() > 10,
        "a run of a few steps proves little: {first:?}"
    );
    assert_eq!(run(17), (first.clone(), elapsed));
    assert_ne!(run(18).0, first);
}

#[test]
fn answers_out_of_order_and_pipelined_requests_still_bring_every_block() {
    for seed in 0..20 {
        let writer = key(1);
        let stores = [feeds(&[(writer, FakeFeed::full(300))]), BTreeMap::new()];
        let link = Link {
            reorder: 0.8,
            ..Link::default()
        };
        let mut pair = Pair::new([config(true), config(false)], stores, link, seed);
        pair.connect();
        pair.run(MAX_STEPS);
        let want = BTreeMap::from([(writer, 300)]);
        assert_holds_union(&pair, &want, seed);
        let b = pair.peers[1].summary();
        assert_eq!(
            b.blocks_received, 300,
            "seed {seed}: no block fetched twice"
        );
        // Pipelined: far fewer round trips than blocks.
        assert!(
            pair.elapsed() < Duration::from_millis(20) * 300 / 4,
            "seed {seed}: took {:?}",
            pair.elapsed()
        );
    }
}

#[test]
fn a_feed_with_holes_ends_incomplete_without_a_stall() {
    let writer = key(1);
    let holes = FakeFeed::sparse(40, |i| i % 3 != 1);
    let stores = [feeds(&[(writer, holes.clone())]), BTreeMap::new()];
    let mut pair = Pair::new([config(true), config(false)], stores, Link::default(), 1);
    pair.connect();
    pair.run(MAX_STEPS);
    for peer in &pair.peers {
        assert!(peer.error.is_none(), "{:?}", peer.error);
        assert!(peer.conn.is_done());
    }
    let b = &pair.peers[1];
    assert_eq!(
        b.feeds[&writer], holes,
        "every block the peer holds, nothing else"
    );
    assert_eq!(b.summary().feeds_incomplete, 1);
    // Ended by the exchange, long before any timeout.
    assert!(
        pair.elapsed() < Duration::from_secs(5),
        "{:?}",
        pair.elapsed()
    );
}

#[test]
fn a_sync_cut_midway_resumes_on_the_next_connection() {
    let writer = key(1);
    let mut stores = [feeds(&[(writer, FakeFeed::full(200))]), BTreeMap::new()];
    for attempt in 0.. {
        assert!(attempt < 20, "no convergence after 20 connections");
        let link = Link {
            cut_after: Some(80),
            ..Link::default()
        };
        let mut pair = Pair::new([config(true), config(false)], stores.clone(), link, attempt);
        pair.connect();
        pair.run(MAX_STEPS);
        let [a, b] = &pair.peers;
        stores = [a.feeds.clone(), b.feeds.clone()];
        if !pair.cut {
            assert!(attempt > 0, "the first connection was cut");
            assert!(b.conn.is_done() && b.feeds[&writer].complete());
            break;
        }
        let held = b.feeds.get(&writer).map_or(0, |f| f.blocks.len());
        assert!(held < 200, "a cut connection left {held} blocks");
    }
}

#[test]
fn a_key_mismatch_shows_on_both_sides() {
    let stores = [BTreeMap::new(), BTreeMap::new()];
    let other = config(false).encryption_key([9; 32]);
    let mut pair = Pair::new([config(true), other], stores, Link::default(), 1);
    pair.connect();
    pair.run(MAX_STEPS);
    for peer in &pair.peers {
        let err = peer.error.as_ref().expect("an error on both sides");
        assert!(matches!(err, ReplicateError::KeyMismatch), "{err}");
    }
}

#[test]
fn version_and_client_mismatches_end_both_sides_with_their_codes() {
    let newer = config(false).protocol_version(multifeed_meta::semver::Version::new(9, 0, 0));
    let other_client = config(false).client_name("someone-else".to_owned());
    for (theirs, code) in [
        (newer, "ERR_VERSION_MISMATCH"),
        (other_client, "ERR_CLIENT_MISMATCH"),
    ] {
        let stores = [feeds(&[(key(1), FakeFeed::full(3))]), BTreeMap::new()];
        let mut pair = Pair::new([config(true), theirs], stores, Link::default(), 1);
        pair.connect();
        pair.run(MAX_STEPS);
        for peer in &pair.peers {
            let err = peer.error.as_ref().expect("an error on both sides");
            assert_eq!(err.code(), code, "{err}");
            assert!(peer.feeds.get(&key(1)).is_none_or(|f| f.length == 3));
        }
    }
}

#[test]
fn the_handshake_timeout_names_the_phase_it_passed_in() {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(10);
    let mut conn = Connection::new(config(true).handshake_timeout(timeout), t0);
    assert_eq!(conn.poll_timeout(), Some(t0 + timeout));
    assert!(conn.handle_timeout(t0 + timeout / 2).is_ok());
    let err = conn.handle_timeout(t0 + timeout).expect_err("timed out");
    assert!(
        matches!(
            err,
            ReplicateError::Timeout {
                phase: Phase::NoiseHandshake
            }
        ),
        "{err}"
    );
    // After the Noise handshake, the same deadline is the exchange's.
    let mut conn = Connection::new(config(true).handshake_timeout(timeout), t0);
    conn.handle_handshake(t0, [1; 32]).expect("handshake");
    while conn.poll_output().is_some() {}
    let err = conn.handle_timeout(t0 + timeout).expect_err("timed out");
    assert!(
        matches!(
            err,
            ReplicateError::Timeout {
                phase: Phase::ExchangeHandshake
            }
        ),
        "{err}"
    );
}

#[test]
fn a_peer_that_stops_answering_times_out_after_exactly_the_idle_timeout() {
    let writer = key(1);
    let idle = Duration::from_secs(30);
    let stores = [feeds(&[(writer, FakeFeed::full(500))]), BTreeMap::new()];
    let configs = [
        config(true).idle_timeout(idle),
        config(false).idle_timeout(idle),
    ];
    let mut pair = Pair::new(configs, stores, Link::default(), 3);
    pair.connect();
    for _ in 0..MAX_STEPS {
        if pair.peers[1].summary().blocks_received >= 50 {
            break;
        }
        assert!(pair.step(), "ended before 50 blocks");
    }
    pair.mute(0);
    let muted_at = pair.elapsed();
    pair.run(MAX_STEPS);
    let err = pair.peers[1].error.as_ref().expect("timed out");
    assert!(
        matches!(
            err,
            ReplicateError::Timeout {
                phase: Phase::Replication
            }
        ),
        "{err}"
    );
    let waited = pair.elapsed() - muted_at;
    // The last progress was at most one round trip before the mute.
    assert!(
        waited <= idle && waited >= idle - Duration::from_millis(200),
        "{waited:?}"
    );
}

#[test]
fn live_peers_keep_each_other_alive_and_a_silent_one_times_out() {
    let live = |initiator| {
        config(initiator)
            .live(true)
            .keepalive_interval(Duration::from_secs(5))
            .live_timeout(Duration::from_secs(20))
    };
    let writer = key(1);
    let stores = [feeds(&[(writer, FakeFeed::full(3))]), BTreeMap::new()];
    let mut pair = Pair::new([live(true), live(false)], stores, Link::default(), 5);
    pair.connect();
    pair.run_for(Duration::from_secs(600), MAX_STEPS);
    for peer in &pair.peers {
        assert!(peer.error.is_none(), "{:?}", peer.error);
        assert!(!peer.conn.is_done(), "live replications go on");
    }
    assert_eq!(pair.peers[1].feeds[&writer].length, 3);
    let keepalives = pair
        .trace
        .iter()
        .filter(|t| t.contains("multifeed/keepalive"))
        .count();
    // A keep-alive counts as sent: a quiet side sends one every other interval (10 s).
    assert!(
        (110..=122).contains(&keepalives),
        "{keepalives} keep-alives in 10 minutes"
    );
    // News still flows after ten quiet minutes.
    pair.append(0, writer, 4);
    pair.run_for(Duration::from_secs(1), MAX_STEPS);
    assert_eq!(pair.peers[1].feeds[&writer], FakeFeed::full(7));
    // Every block stored is reported once the download goes quiet, not at the next burst.
    let reported: u64 = pair.peers[1]
        .events
        .iter()
        .map(|e| match e {
            ReplicationEvent::Downloaded { key, blocks, .. } if *key == writer => *blocks,
            _ => 0,
        })
        .sum();
    assert_eq!(reported, 7, "the live download is reported");
    pair.mute(0);
    pair.run_for(Duration::from_secs(19), MAX_STEPS);
    assert!(pair.peers[1].error.is_none(), "{:?}", pair.peers[1].error);
    pair.run_for(Duration::from_secs(2), MAX_STEPS);
    let err = pair.peers[1]
        .error
        .as_ref()
        .expect("the silent peer timed out");
    assert!(
        matches!(
            err,
            ReplicateError::Timeout {
                phase: Phase::LiveKeepAlive
            }
        ),
        "{err}"
    );
}

#[test]
fn a_plain_hypercore_download_ends_at_the_peers_length() {
    let writer = key(1);
    let stores = [feeds(&[(writer, FakeFeed::full(25))]), BTreeMap::new()];
    let serving = config(true).plain_hypercore(Vec::new());
    let fetching = config(false).plain_hypercore(vec![writer]);
    let mut pair = Pair::new([serving, fetching], stores, Link::default(), 2);
    pair.connect();
    // The serving side never ends by itself (the fetching side closes the connection).
    for _ in 0..MAX_STEPS {
        if pair.peers[1].ended() || !pair.step() {
            break;
        }
    }
    let b = &pair.peers[1];
    assert!(b.error.is_none() && b.conn.is_done(), "{:?}", b.error);
    assert_eq!(b.feeds[&writer], FakeFeed::full(25));
    assert!(pair.peers[0].error.is_none());
}

#[test]
fn a_resync_of_equal_stores_opens_no_feed_channel() {
    let stores: BTreeMap<FeedKey, FakeFeed> =
        (1..=50).map(|n| (key(n), FakeFeed::full(9))).collect();
    let mut pair = Pair::new(
        [config(true), config(false)],
        [stores.clone(), stores],
        Link::default(),
        4,
    );
    pair.connect();
    pair.run(MAX_STEPS);
    for peer in &pair.peers {
        assert!(
            peer.error.is_none() && peer.conn.is_done(),
            "{:?}",
            peer.error
        );
        assert_eq!(peer.summary().feeds_received, 0);
    }
    let opens = pair.trace.iter().filter(|t| t.contains(": open")).count();
    assert_eq!(opens, 2, "only the root channel opens: {:?}", pair.trace);
}

#[test]
fn a_feed_as_long_but_with_holes_is_still_fetched() {
    let writer = key(1);
    let stores = [
        feeds(&[(writer, FakeFeed::full(20))]),
        feeds(&[(writer, FakeFeed::sparse(20, |i| i % 4 != 0))]),
    ];
    let mut pair = Pair::new([config(true), config(false)], stores, Link::default(), 6);
    pair.connect();
    pair.run(MAX_STEPS);
    assert_holds_union(&pair, &BTreeMap::from([(writer, 20)]), 6);
    assert_eq!(pair.peers[1].summary().blocks_received, 5);
}

#[test]
fn at_most_the_scheduled_feeds_sync_at_once_and_every_feed_arrives() {
    let stores: BTreeMap<FeedKey, FakeFeed> = (1..=200)
        .map(|n| (key(n), FakeFeed::full(u64::from(n % 5) + 1)))
        .collect();
    let want = union(&[stores.clone(), BTreeMap::new()]);
    let configs = [
        config(true).max_syncing_feeds(8),
        config(false).max_syncing_feeds(8),
    ];
    let mut pair = Pair::new(configs, [stores, BTreeMap::new()], Link::default(), 8);
    pair.connect();
    pair.run(MAX_STEPS);
    assert_holds_union(&pair, &want, 8);
    for peer in &pair.peers {
        // The root, the eight scheduled and a few closing.
        assert!(
            peer.max_open_channels <= 8 + 1 + 4,
            "{} channels open at once",
            peer.max_open_channels
        );
        // Feeds in sync were let go (the last few may end with the connection).
        let tracked = peer.conn.tracked_feeds();
        assert!(tracked <= 8, "{tracked} feeds tracked at the end");
    }
    // Only the initiator closes feed channels (see `close_if_in_sync`).
    let by_responder = pair
        .trace
        .iter()
        .filter(|t| t.contains("-> 0: close"))
        .count();
    assert_eq!(by_responder, 0);
    let by_initiator = pair
        .trace
        .iter()
        .filter(|t| t.contains("-> 1: close"))
        .count();
    assert!(by_initiator >= 190, "{by_initiator} closes");
}

#[test]
fn live_a_side_that_only_serves_opens_each_channel_after_the_downloader_does() {
    let stores: BTreeMap<FeedKey, FakeFeed> =
        (1..=200).map(|n| (key(n), FakeFeed::full(2))).collect();
    let live = |initiator| config(initiator).live(true).max_syncing_feeds(8);
    let mut pair = Pair::new(
        [live(true), live(false)],
        [stores.clone(), BTreeMap::new()],
        Link::default(),
        10,
    );
    pair.connect();
    pair.run_for(Duration::from_secs(30), MAX_STEPS);
    assert_eq!(pair.peers[1].feeds, stores, "side 1 holds every feed");
    // Past the root channel (the first open each way), the serving side 0 never has opened
    // more feed channels than the downloading side 1: it answers opens, in 1's turns. It used
    // to open all 200 at once, past 1's bound (and, over a real protocol, past its limit of
    // channels it had not agreed to yet).
    let (mut by_server, mut by_downloader) = (0i64, 0i64);
    for line in &pair.trace {
        if line.contains("-> 1: open") {
            by_server += 1;
        } else if line.contains("-> 0: open") {
            by_downloader += 1;
        }
        assert!(
            by_server - 1 <= (by_downloader - 1).max(0),
            "side 0 opened {by_server} channels before side 1 opened {by_downloader}"
        );
    }
    assert!(by_downloader >= 200, "{by_downloader} opens");
}

#[test]
fn live_peers_report_synced_each_time_they_catch_up() {
    let live = |initiator| config(initiator).live(true);
    let (a, b) = (key(1), key(2));
    let stores = [
        feeds(&[(a, FakeFeed::full(30))]),
        feeds(&[(b, FakeFeed::full(4))]),
    ];
    let mut pair = Pair::new([live(true), live(false)], stores, Link::default(), 9);
    pair.connect();
    pair.run_for(Duration::from_secs(5), MAX_STEPS);
    for side in 0..2 {
        assert_eq!(
            synced_reports(&pair, side),
            1,
            "side {side}: {:?}",
            pair.peers[side].events
        );
        assert_eq!(pair.peers[side].feeds[&a], FakeFeed::full(30));
        assert_eq!(pair.peers[side].feeds[&b], FakeFeed::full(4));
    }
    // Nothing changes: no new report.
    pair.run_for(Duration::from_secs(60), MAX_STEPS);
    assert_eq!(synced_reports(&pair, 0), 1);
    // An append: both catch up again and say so once more.
    pair.append(1, b, 3);
    pair.run_for(Duration::from_secs(5), MAX_STEPS);
    for side in 0..2 {
        assert_eq!(synced_reports(&pair, side), 2, "side {side}");
        assert_eq!(pair.peers[side].feeds[&b], FakeFeed::full(7));
    }
}

#[test]
fn a_non_live_peer_finishes_against_a_live_one_once_both_hold_the_union() {
    let (a, b) = (key(1), key(2));
    let stores = [
        feeds(&[(a, FakeFeed::full(12))]),
        feeds(&[(b, FakeFeed::full(5))]),
    ];
    let configs = [config(true), config(false).live(true)];
    let mut pair = Pair::new(configs, stores, Link::default(), 10);
    pair.connect();
    // Ends by itself (the non-live side finishes), long before any timeout.
    for _ in 0..MAX_STEPS {
        if pair.peers[0].ended() || !pair.step() {
            break;
        }
    }
    assert!(pair.peers[0].conn.is_done(), "{:?}", pair.peers[0].error);
    assert!(
        pair.elapsed() < Duration::from_secs(5),
        "{:?}",
        pair.elapsed()
    );
    for peer in &pair.peers {
        assert!(peer.error.is_none(), "{:?}", peer.error);
        assert_eq!(peer.feeds[&a], FakeFeed::full(12));
        assert_eq!(peer.feeds[&b], FakeFeed::full(5));
    }
}

#[test]
fn a_peer_open_reported_before_the_handshake_still_shows_a_key_mismatch_on_both_sides() {
    let stores = [BTreeMap::new(), BTreeMap::new()];
    let other = config(false).encryption_key([9; 32]);
    let mut pair = Pair::new([config(true), other], stores, Link::default(), 1);
    // The protocol reports the first side's root open to the second before the handshake.
    let root = hypercore_protocol::discovery_key(&crate::DEFAULT_ENCRYPTION_KEY);
    pair.inject(1, crate::proto::sim::Wire::Open(root));
    pair.connect();
    pair.run(MAX_STEPS);
    for (side, peer) in pair.peers.iter().enumerate() {
        let err = peer.error.as_ref().expect("an error on both sides");
        assert!(
            matches!(err, ReplicateError::KeyMismatch),
            "side {side}: {err}"
        );
    }
}

#[test]
fn many_small_offers_get_the_map_of_our_feeds_not_a_pass_over_them_each() {
    let mut conn = Connection::new(config(false), Instant::now());
    // 10,000 feeds of ours; feed i holds i entries, all of them.
    conn.local_lengths = (0..10_000u64)
        .map(|i| {
            let mut feed = [0u8; 32];
            feed[..8].copy_from_slice(&i.to_le_bytes());
            crate::LocalFeed {
                key: feed,
                length: i,
                contiguous_length: i,
                discovery_key: None,
            }
        })
        .collect();
    let offer = |i: u64, length: u64| {
        let mut feed = [0u8; 32];
        feed[..8].copy_from_slice(&i.to_le_bytes());
        multifeed_meta::FeedOffer { key: feed, length }
    };
    // A hostile peer offers one feed per message: each answer is right, and after a few
    // passes over our list the map answers (was: a pass over all 10,000 per message).
    for round in 0..100u64 {
        let offers = [
            offer(round, round + 1),
            offer(round + 1, round),
            offer(20_000 + round, 1),
        ];
        assert_eq!(conn.lacking(&offers), [true, false, true], "round {round}");
    }
    assert!(conn.local_index.is_some(), "the map was built");
    assert!(
        conn.local_scans <= 4,
        "{} passes over our feeds",
        conn.local_scans
    );
}

/// Live peers of meta protocol 2.1: once the first sync settled, every feed's channel closes
/// after staying idle, and both sides let the feeds go. An append on either side opens the
/// feed's channel again, the peer gets the entries, and the channel closes again.
#[test]
fn live_idle_channels_close_and_open_again_on_news_from_either_side() {
    let idle = Duration::from_secs(10);
    let live = |initiator| {
        config(initiator)
            .live(true)
            .max_syncing_feeds(16)
            .close_idle_channels_after(Some(idle))
    };
    let keys: Vec<FeedKey> = (1..=60).map(key).collect();
    let stores = [
        keys[..40].iter().map(|k| (*k, FakeFeed::full(3))).collect(),
        keys[40..].iter().map(|k| (*k, FakeFeed::full(2))).collect(),
    ];
    let mut pair = Pair::new([live(true), live(false)], stores, Link::default(), 21);
    pair.connect();
    pair.run_for(Duration::from_secs(60), MAX_STEPS);
    for side in 0..2 {
        let peer = &pair.peers[side];
        assert_eq!(peer.feeds.len(), 60, "side {side} holds every feed");
        assert!(peer.error.is_none(), "side {side}: {:?}", peer.error);
        assert_eq!(
            peer.conn.tracked_feeds(),
            0,
            "side {side} tracks no idle feed"
        );
        assert_eq!(
            peer.conn.parked_feeds(),
            60,
            "side {side} parked every feed"
        );
        assert_eq!(synced_reports(&pair, side), 1, "side {side}");
    }
    let closes = pair.trace.iter().filter(|t| t.contains(": close")).count();
    assert_eq!(closes, 60, "one close per feed, by the initiator");

    // News on the side that does not close, then on the one that does.
    for (side, feed) in [(1, keys[5]), (0, keys[50]), (1, keys[50])] {
        let before = pair.peers[side].feeds[&feed].length;
        pair.append(side, feed, 2);
        pair.run_for(Duration::from_secs(3), MAX_STEPS);
        let other = &pair.peers[1 - side];
        assert_eq!(
            other.feeds[&feed],
            FakeFeed::full(before + 2),
            "side {} got the append of side {side}",
            1 - side
        );
        assert_eq!(
            other.conn.tracked_feeds(),
            1,
            "only the feed with news opened"
        );
        pair.run_for(idle * 2, MAX_STEPS);
        for peer in &pair.peers {
            assert!(peer.error.is_none(), "{:?}", peer.error);
            assert_eq!(peer.conn.tracked_feeds(), 0, "closed again once idle");
            assert_eq!(peer.conn.parked_feeds(), 60);
        }
    }
    for side in 0..2 {
        assert_eq!(
            synced_reports(&pair, side),
            4,
            "side {side}: in sync again after each append"
        );
    }
}

/// Towards a peer of meta protocol 2.0 (which would not reopen on news), live channels stay
/// open, and its appends still arrive.
#[test]
fn live_channels_stay_open_towards_a_peer_that_does_not_reopen() {
    let live = |initiator| {
        config(initiator)
            .live(true)
            .close_idle_channels_after(Some(Duration::from_secs(5)))
    };
    let mut old = live(false);
    old.protocol_version = Some(multifeed_meta::semver::Version::new(2, 0, 0));
    let (a, b) = (key(1), key(2));
    let stores = [
        feeds(&[(a, FakeFeed::full(3))]),
        feeds(&[(b, FakeFeed::full(4))]),
    ];
    let mut pair = Pair::new([live(true), old], stores, Link::default(), 22);
    pair.connect();
    pair.run_for(Duration::from_secs(60), MAX_STEPS);
    assert_eq!(pair.peers[0].conn.tracked_feeds(), 2, "nothing closed");
    pair.append(1, b, 1);
    pair.run_for(Duration::from_secs(3), MAX_STEPS);
    assert_eq!(pair.peers[0].feeds[&b], FakeFeed::full(5));
}

/// The host's change stream lost a change to a parked feed and says it lagged: the feeds are
/// listed and compared with what was parked, and only the one with news opens again.
#[test]
fn a_lagged_change_stream_still_opens_the_parked_feed_with_news() {
    let live = |initiator| {
        config(initiator)
            .live(true)
            .close_idle_channels_after(Some(Duration::from_secs(5)))
    };
    let keys: Vec<FeedKey> = (1..=8).map(key).collect();
    let stores = [
        keys.iter().map(|k| (*k, FakeFeed::full(2))).collect(),
        BTreeMap::new(),
    ];
    let mut pair = Pair::new([live(true), live(false)], stores, Link::default(), 23);
    pair.connect();
    pair.run_for(Duration::from_secs(30), MAX_STEPS);
    assert_eq!(pair.peers[1].conn.parked_feeds(), 8);
    pair.append_lagged(1, keys[3], 1);
    pair.run_for(Duration::from_secs(3), MAX_STEPS);
    assert_eq!(pair.peers[0].feeds[&keys[3]], FakeFeed::full(3));
    assert_eq!(
        pair.peers[1].conn.tracked_feeds(),
        1,
        "only the feed with news"
    );
}
