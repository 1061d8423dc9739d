//! Hostile peers that try to grow our memory: what one connection may queue is bounded, and a
//! peer that pushes past a bound is disconnected with a typed error.
//!
//! One test runs the scenarios in turn, alone in its test binary, so the growth of the
//! process's peak resident memory during a scenario is that scenario's.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{against, peak_rss_bytes, seeded_rng, within, TestHost};
use futures::AsyncWriteExt;
use hypercore_protocol::schema::{
    Bitfield, Data, Extension, NoData, Range, Request, Synchronize, Want,
};
use hypercore_protocol::Message;
use hypercore_schema::{DataBlock, Node, RequestBlock, RequestUpgrade};
use multifeed_replicate::hostile::{batch_frame, HostilePeer};
use multifeed_replicate::{
    replicate, FeedHost, PeerViolation, ReplicateConfig, ReplicateError, DEFAULT_ENCRYPTION_KEY,
};
use rand::Rng;

type Socket = async_std::os::unix::net::UnixStream;

const MIB: u64 = 1 << 20;

/// A hostile initiator that opened the root channel (it knows the key) and the channel of
/// `feed`, as channel ids 1 and 2.
async fn opened(socket: Socket, feed: &[u8; 32]) -> HostilePeer {
    let mut peer = HostilePeer::handshake(socket, true).await.expect("noise");
    let root = peer.open_frame(1, &DEFAULT_ENCRYPTION_KEY).expect("open");
    peer.send_frame(root).await.expect("sent");
    peer.wait_open(&DEFAULT_ENCRYPTION_KEY)
        .await
        .expect("root opened");
    let open = peer.open_frame(2, feed).expect("open");
    peer.send_frame(open).await.expect("sent");
    peer.wait_open(feed).await.expect("feed opened");
    peer
}

fn request(id: u64, index: u64) -> Message {
    Message::Request(Request {
        id,
        fork: 0,
        block: Some(RequestBlock { index, nodes: 0 }),
        hash: None,
        seek: None,
        upgrade: None,
        manifest: false,
        priority: 0,
    })
}

/// Asks for 20,000 blocks of 64 KiB and never reads an answer (was: ~72 KB kept per request,
/// 868 MB, until the idle timeout).
async fn requests_without_reading() -> u64 {
    let host = TestHost::new();
    let feed = host.writer_sized(200, 64 * 1024).await;
    let before = peak_rss_bytes();
    let config = ReplicateConfig::new(false).max_queued_requests(2_000);
    let result = against(host, config, |socket| async move {
        let mut peer = opened(socket, &feed).await;
        let frames = (0..40u64).map(|batch| {
            let messages: Vec<Message> = (0..500)
                .map(|i| {
                    let id = batch * 500 + i;
                    request(id + 1, id % 200)
                })
                .collect();
            batch_frame(2, &messages).expect("frame")
        });
        peer.send_frames(frames).await;
        peer
    })
    .await;
    let err = result.expect_err("the peer is dropped");
    assert!(
        matches!(
            err,
            ReplicateError::Peer {
                violation: PeerViolation::TooManyRequests { limit: 2_000 },
                ..
            }
        ),
        "{err}"
    );
    peak_rss_bytes().saturating_sub(before)
}

/// 500,000 small messages as fast as the peer can send them (was: 4 million took 1.04 GB).
async fn a_flood_of_small_messages() -> u64 {
    let host = TestHost::new();
    let feed = host.writer(3).await;
    let before = peak_rss_bytes();
    // The peer never completes the multifeed handshake: the handshake timeout ends it.
    let config = ReplicateConfig::new(false).handshake_timeout(Duration::from_secs(3));
    let result = against(host, config, |socket| async move {
        let mut peer = opened(socket, &feed).await;
        let sync = Message::Synchronize(Synchronize {
            fork: 0,
            length: 3,
            remote_length: 3,
            downloading: true,
            uploading: true,
            can_upgrade: false,
        });
        let frame = batch_frame(2, &vec![sync; 10_000]).expect("frame");
        peer.send_frames(std::iter::repeat_n(frame, 50)).await;
        peer
    })
    .await;
    let err = result.expect_err("no progress");
    assert!(
        matches!(
            err,
            ReplicateError::Timeout {
                phase: multifeed_replicate::Phase::ExchangeHandshake
            }
        ),
        "{err}"
    );
    peak_rss_bytes().saturating_sub(before)
}

/// 30 unauthenticated connections, each announcing a 16 MiB frame before the Noise handshake
/// (was: 502 MB held until the handshake timeout).
async fn large_frames_before_the_handshake() -> u64 {
    let before = peak_rss_bytes();
    let mut runs = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..30 {
        let (ours, mut theirs) = Socket::pair().expect("socket pair");
        let host: Arc<dyn FeedHost> = TestHost::new();
        runs.push(replicate(ours, host, ReplicateConfig::new(false)));
        let send = async move {
            let mut bytes = vec![0xff, 0xff, 0xff];
            bytes.extend(vec![0x55; 1 << 20]);
            for _ in 0..16 {
                if theirs.write_all(&bytes).await.is_err() {
                    break;
                }
                bytes.truncate(1 << 20);
            }
            theirs
        };
        sockets.push(send);
    }
    let (results, _sockets) = within(
        "every connection to end",
        futures::future::join(
            futures::future::join_all(runs),
            futures::future::join_all(sockets),
        ),
    )
    .await;
    for result in results {
        let err = result.expect_err("refused");
        assert!(
            matches!(
                err,
                ReplicateError::Peer {
                    phase: multifeed_replicate::Phase::NoiseHandshake,
                    violation: PeerViolation::HandshakeFrame { .. },
                }
            ),
            "{err}"
        );
    }
    peak_rss_bytes().saturating_sub(before)
}

/// Opens for 5,000 random discovery keys after the key check (was: 300,000 kept 122 MB while
/// connected).
async fn opens_of_unknown_feeds() -> u64 {
    let host = TestHost::new();
    host.writer(1).await;
    let before = peak_rss_bytes();
    let result = against(host, ReplicateConfig::new(false), |socket| async move {
        let mut peer = HostilePeer::handshake(socket, true).await.expect("noise");
        let root = peer.open_frame(1, &DEFAULT_ENCRYPTION_KEY).expect("open");
        peer.send_frame(root).await.expect("sent");
        peer.wait_open(&DEFAULT_ENCRYPTION_KEY)
            .await
            .expect("root opened");
        let opens: Vec<Vec<u8>> = (2..5_002u64)
            .map(|id| peer.open_frame(id, &rand::random()).expect("open"))
            .collect();
        peer.send_frames(opens).await;
        peer
    })
    .await;
    let err = result.expect_err("the peer is dropped");
    assert!(
        matches!(
            err,
            ReplicateError::Peer {
                violation: PeerViolation::UnknownChannels { .. },
                ..
            }
        ),
        "{err}"
    );
    peak_rss_bytes().saturating_sub(before)
}

/// One random message with random field values (the kinds the protocol decodes).
fn random_message(rng: &mut impl Rng) -> Message {
    let mut number = || match rng.gen_range(0..4) {
        0 => rng.gen_range(0..4),
        1 => rng.gen_range(0..100_000),
        2 => u64::MAX - rng.gen_range(0..2),
        _ => rng.gen(),
    };
    let (a, b, c) = (number(), number(), number());
    let nodes = |n: usize| -> Vec<Node> {
        (0..n)
            .map(|i| Node::new(i as u64, vec![7; 32], 1))
            .collect()
    };
    match rng.gen_range(0..8) {
        0 => Message::Synchronize(Synchronize {
            fork: a,
            length: b,
            remote_length: c,
            downloading: true,
            uploading: true,
            can_upgrade: true,
        }),
        1 => Message::Request(Request {
            id: a,
            fork: 0,
            block: Some(RequestBlock { index: b, nodes: c }),
            hash: None,
            seek: None,
            upgrade: rng.gen_bool(0.5).then_some(RequestUpgrade {
                start: c,
                length: a,
            }),
            manifest: false,
            priority: 0,
        }),
        2 => Message::Data(Data {
            request: a,
            fork: 0,
            block: Some(DataBlock {
                index: b,
                value: vec![1; rng.gen_range(0..100)],
                nodes: nodes(rng.gen_range(0..4)),
            }),
            hash: None,
            seek: None,
            upgrade: None,
        }),
        3 => Message::Bitfield(Bitfield {
            start: a,
            bitfield: vec![rng.gen(); rng.gen_range(0..8)],
        }),
        4 => Message::Range(Range {
            drop: rng.gen(),
            start: a,
            length: b,
        }),
        5 => Message::Want(Want {
            start: a,
            length: b,
        }),
        6 => Message::NoData(NoData { request: a }),
        _ => Message::Extension(Extension {
            name: if rng.gen() { "multifeed" } else { "other" }.to_owned(),
            message: (0..rng.gen_range(0..40)).map(|_| rng.gen()).collect(),
        }),
    }
}

/// 100 connections with the key, each sending random well-formed and mutated messages on its
/// open root and feed channels (they reach the driver, the meta exchange and the feed's sync,
/// not just the guard).
async fn random_messages_on_an_open_channel() -> u64 {
    let host = TestHost::new();
    let feed = host.writer(20).await;
    let host: Arc<dyn FeedHost> = host;
    let before = peak_rss_bytes();
    let mut rng = seeded_rng();
    let mut runs = Vec::new();
    for _ in 0..100 {
        let frames: Vec<Vec<u8>> = (0..rng.gen_range(1..6))
            .map(|_| {
                let messages: Vec<Message> = (0..rng.gen_range(1..4))
                    .map(|_| random_message(&mut rng))
                    .collect();
                // The root channel (the exchange) or the feed's channel (its sync).
                let mut frame = batch_frame(rng.gen_range(1..3), &messages).expect("frame");
                if rng.gen_bool(0.3) {
                    let at = rng.gen_range(0..frame.len());
                    frame[at] = rng.gen();
                }
                frame
            })
            .collect();
        let config = ReplicateConfig::new(false)
            .handshake_timeout(Duration::from_secs(2))
            .idle_timeout(Duration::from_secs(2));
        runs.push(against(host.clone(), config, |socket| async move {
            let mut peer = opened(socket, &feed).await;
            peer.send_frames(frames).await;
            peer
        }));
    }
    let mut codes = std::collections::BTreeMap::new();
    for result in futures::future::join_all(runs).await {
        let code = match &result {
            Ok(_) => "ok",
            Err(err) => err.code(),
        };
        *codes.entry(code).or_insert(0) += 1;
        assert!(
            matches!(
                code,
                "ERR_MALFORMED_MESSAGE"
                    | "ERR_CONNECTION"
                    | "ERR_TIMEOUT"
                    | "ERR_INVALID_PROOF"
                    | "ERR_UNEXPECTED_MESSAGE"
                    | "ERR_PEER_LIMIT"
            ),
            "unexpected result {result:?}"
        );
    }
    println!("random messages: {codes:?}");
    peak_rss_bytes().saturating_sub(before)
}

#[async_std::test]
async fn what_a_hostile_peer_can_make_us_hold_is_bounded() {
    let mut report = Vec::new();
    let growth = requests_without_reading().await;
    report.push(("20,000 requests for 64 KiB blocks, never read", growth));
    assert!(growth < 120 * MIB, "{report:?}");
    let growth = a_flood_of_small_messages().await;
    report.push(("500,000 small messages", growth));
    assert!(growth < 120 * MIB, "{report:?}");
    let growth = large_frames_before_the_handshake().await;
    report.push(("30 x 16 MiB frames before the handshake", growth));
    assert!(growth < 60 * MIB, "{report:?}");
    let growth = opens_of_unknown_feeds().await;
    report.push(("5,000 opens of unknown feeds", growth));
    assert!(growth < 60 * MIB, "{report:?}");
    let growth = random_messages_on_an_open_channel().await;
    report.push(("100 connections of random messages", growth));
    assert!(growth < 120 * MIB, "{report:?}");
    for (what, growth) in report {
        println!("{what}: peak resident memory grew {} MB", growth / MIB);
    }
}
