//! Hostile peers that know no key: one message after the Noise handshake must end the
//! connection with a typed error, never a panic, an abort or a hang.

mod common;

use common::{against, seeded_rng, TestHost};
use hypercore_protocol::schema::{Bitfield, Data};
use hypercore_protocol::Message;
use hypercore_schema::{DataBlock, Node};
use multifeed_replicate::hostile::{message_frame, put_uint, HostilePeer};
use multifeed_replicate::{PeerViolation, ReplicateConfig, ReplicateError, ReplicateSummary};
use rand::{Rng, RngCore};

/// Sends `frames` right after the Noise handshake, as the initiator.
async fn frames_after_handshake(
    config: ReplicateConfig,
    frames: Vec<Vec<u8>>,
) -> Result<ReplicateSummary, ReplicateError> {
    let host = TestHost::new();
    host.writer(3).await;
    against(host, config, |socket| async move {
        let mut peer = HostilePeer::handshake(socket, true).await.ok()?;
        peer.send_frames(frames).await;
        Some(peer)
    })
    .await
}

#[async_std::test]
async fn an_open_with_a_huge_channel_id_is_refused_before_the_key_check() {
    // u64::MAX panicked in the protocol's channel table, 2^32 and 2^40 aborted the process,
    // 20,000,000 cost 474 MB.
    for id in [u64::MAX, 1 << 40, 1 << 32, 20_000_000] {
        let result = against(
            TestHost::new(),
            ReplicateConfig::new(false),
            |socket| async move {
                let mut peer = HostilePeer::handshake(socket, true).await.expect("noise");
                let open = peer.open_frame(id, &[7; 32]).expect("an open");
                assert!(open.len() <= 100, "one small message");
                peer.send_frame(open).await.expect("sent");
                peer
            },
        )
        .await;
        match result {
            Err(ReplicateError::Peer {
                violation: PeerViolation::ChannelId { id: got, .. },
                ..
            }) => assert_eq!(got, id),
            other => panic!("channel id {id}: expected a ChannelId violation, got {other:?}"),
        }
    }
}

fn node_vector_data(count: u64) -> Vec<u8> {
    // Channel 1, Data: flags (block), request 1, fork 0, index 0, value "x", `count` nodes.
    let mut frame = vec![1, 3, 1, 1, 0, 0, 1, b'x'];
    put_uint(&mut frame, count);
    frame.extend_from_slice(&[0; 40]);
    frame
}

fn bitfield_words(count: u64) -> Vec<u8> {
    // Channel 1, Bitfield: start 0, `count` words.
    let mut frame = vec![1, 7, 0];
    put_uint(&mut frame, count);
    frame.extend_from_slice(&[0xff; 8]);
    frame
}

#[async_std::test]
async fn huge_vector_counts_are_refused_before_decoding() {
    // 2^62 panicked ("capacity overflow") in the protocol's decoder, 2^40 aborted the process.
    for frame in [
        bitfield_words(1 << 62),
        bitfield_words(1 << 40),
        node_vector_data(1 << 62),
        node_vector_data(1 << 40),
    ] {
        let result = frames_after_handshake(ReplicateConfig::new(false), vec![frame]).await;
        let err = result.expect_err("the connection ends");
        assert_eq!(err.code(), "ERR_MALFORMED_MESSAGE", "{err}");
        assert!(
            matches!(
                err,
                ReplicateError::Peer {
                    violation: PeerViolation::Malformed { .. },
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[async_std::test]
async fn well_formed_messages_on_unopened_channels_are_harmless() {
    // The same messages with honest counts pass the guard; the protocol drops them (no channel),
    // and the replication then waits for the exchange like any other.
    let data = Message::Data(Data {
        request: 1,
        fork: 0,
        block: Some(DataBlock {
            index: 0,
            value: b"x".to_vec(),
            nodes: vec![Node::new(0, vec![0; 32], 1)],
        }),
        hash: None,
        seek: None,
        upgrade: None,
    });
    let bitfield = Message::Bitfield(Bitfield {
        start: 0,
        bitfield: vec![1, 2, 3],
    });
    let frames = vec![
        message_frame(9, &data).expect("frame"),
        message_frame(9, &bitfield).expect("frame"),
    ];
    let config =
        ReplicateConfig::new(false).handshake_timeout(std::time::Duration::from_millis(500));
    let err = frames_after_handshake(config, frames)
        .await
        .expect_err("no exchange");
    assert!(
        matches!(
            err,
            ReplicateError::Timeout {
                phase: multifeed_replicate::Phase::ExchangeHandshake
            }
        ),
        "{err}"
    );
}

/// Random post-handshake frames (mutated headers, counts and bodies): every connection ends in a
/// typed error or a timeout; none panics, aborts or hangs. `MULTIFEED_SEED` replays a run.
#[async_std::test]
async fn random_frames_after_the_handshake_end_in_typed_errors() {
    let mut rng = seeded_rng();
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let mut frames = Vec::new();
        for _ in 0..rng.gen_range(1..4) {
            let mut frame = match rng.gen_range(0..5) {
                0 => vec![0, 0, rng.gen_range(0..4)],
                1 => vec![0, 1],
                2 => vec![0, 3],
                3 => vec![rng.gen_range(0..4), rng.gen_range(0..10)],
                _ => Vec::new(),
            };
            let mut tail = vec![0u8; rng.gen_range(0..48)];
            rng.fill_bytes(&mut tail);
            // Large counts where the decoder would allocate by them.
            for byte in tail.iter_mut() {
                if rng.gen_bool(0.15) {
                    *byte = 0xff;
                }
            }
            frame.extend(tail);
            frames.push(frame);
        }
        let config =
            ReplicateConfig::new(false).handshake_timeout(std::time::Duration::from_millis(300));
        let result = frames_after_handshake(config, frames).await;
        let code = match &result {
            Ok(_) => "ok",
            Err(err) => err.code(),
        };
        *codes.entry(code).or_insert(0) += 1;
        assert!(
            matches!(
                code,
                "ERR_MALFORMED_MESSAGE" | "ERR_CONNECTION" | "ERR_TIMEOUT" | "ERR_KEY_MISMATCH"
            ),
            "unexpected result {result:?}"
        );
    }
    println!("results: {codes:?}");
}
