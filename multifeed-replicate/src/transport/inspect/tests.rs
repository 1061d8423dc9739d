use compact_encoding::CompactEncoding;
use hypercore_protocol::schema::{
    Bitfield, Cancel, Data, Extension, NoData, Range, Request, Synchronize, Unwant, Want,
};
use hypercore_protocol::Message;
use hypercore_schema::{
    DataBlock, DataHash, DataSeek, DataUpgrade, Node, RequestBlock, RequestSeek, RequestUpgrade,
};
use rand::{Rng, RngCore, SeedableRng};

use super::*;

fn limits() -> FrameLimits {
    FrameLimits { max_channels: 1000 }
}

fn uint(out: &mut Vec<u8>, value: u64) {
    crate::transport::put_varint(out, value);
}

fn open_frame(channel: u64) -> Vec<u8> {
    let mut frame = vec![0, 1];
    uint(&mut frame, channel);
    let name = b"hypercore/alpha";
    uint(&mut frame, name.len() as u64);
    frame.extend_from_slice(name);
    uint(&mut frame, 32);
    frame.extend_from_slice(&[7; 32]);
    frame.push(0);
    frame.extend_from_slice(&[9; 32]);
    frame
}

fn close_frame(channel: u64) -> Vec<u8> {
    let mut frame = vec![0, 3];
    uint(&mut frame, channel);
    frame
}

fn encode(message: &Message) -> Vec<u8> {
    message.to_encoded_bytes().expect("encodes").to_vec()
}

fn single(channel: u64, message: &Message) -> Vec<u8> {
    let mut frame = Vec::new();
    uint(&mut frame, channel);
    frame.extend(encode(message));
    frame
}

fn batch(channel: u64, messages: &[Message]) -> Vec<u8> {
    let mut frame = vec![0, 0];
    uint(&mut frame, channel);
    for message in messages {
        let body = encode(message);
        uint(&mut frame, body.len() as u64);
        frame.extend(body);
    }
    frame
}

fn node(index: u64) -> Node {
    Node::new(index, vec![index as u8; 32], index * 10)
}

/// One of every message the driver sends or receives, with vectors of several lengths.
fn samples() -> Vec<Message> {
    vec![
        Message::Synchronize(Synchronize {
            fork: 0,
            length: 5,
            remote_length: 70_000,
            downloading: true,
            uploading: true,
            can_upgrade: true,
        }),
        Message::Request(Request {
            id: 1,
            fork: 1,
            block: Some(RequestBlock {
                index: 5,
                nodes: 10,
            }),
            hash: Some(RequestBlock {
                index: 20,
                nodes: 0,
            }),
            seek: Some(RequestSeek { bytes: 10 }),
            upgrade: Some(RequestUpgrade {
                start: 0,
                length: 10,
            }),
            manifest: false,
            priority: 3,
        }),
        Message::Cancel(Cancel { request: 1 }),
        Message::Data(Data {
            request: 1,
            fork: 5,
            block: Some(DataBlock {
                index: 5,
                nodes: vec![node(1), node(300)],
                value: vec![0xff; 1000],
            }),
            hash: Some(DataHash {
                index: 20,
                nodes: vec![node(2)],
            }),
            seek: Some(DataSeek {
                bytes: 10,
                nodes: vec![],
            }),
            upgrade: Some(DataUpgrade {
                start: 0,
                length: 10,
                nodes: vec![node(4), node(70_000)],
                additional_nodes: vec![node(5)],
                signature: vec![0xab; 64],
            }),
        }),
        Message::Data(Data {
            request: 2,
            fork: 0,
            block: Some(DataBlock {
                index: 0,
                nodes: vec![],
                value: b"x".to_vec(),
            }),
            hash: None,
            seek: None,
            upgrade: None,
        }),
        Message::NoData(NoData { request: 2 }),
        Message::Want(Want {
            start: 0,
            length: 100,
        }),
        Message::Unwant(Unwant {
            start: 10,
            length: 2,
        }),
        Message::Bitfield(Bitfield {
            start: 20,
            bitfield: vec![0x89ab_cdef, 0, u32::MAX],
        }),
        Message::Range(Range {
            drop: true,
            start: 12_345,
            length: 100_000,
        }),
        Message::Range(Range {
            drop: false,
            start: 3,
            length: 1,
        }),
        Message::Extension(Extension {
            name: "multifeed".to_string(),
            message: vec![0x44, 20],
        }),
    ]
}

#[test]
fn every_message_passes_and_weighs_what_the_driver_counts() {
    for message in samples() {
        let weight = weight_of_message(&message);
        for frame in [
            single(1, &message),
            batch(300, std::slice::from_ref(&message)),
        ] {
            let facts = Inspector::new(limits()).inbound(&frame).expect("accepted");
            assert_eq!(
                facts,
                FrameFacts {
                    messages: 1,
                    weight
                },
                "{message:?}"
            );
            assert_eq!(outbound_weight(&frame), weight, "{message:?}");
        }
    }
    let all = samples();
    let total: u64 = all.iter().map(weight_of_message).sum();
    let frame = batch(2, &all);
    let facts = Inspector::new(limits()).inbound(&frame).expect("accepted");
    assert_eq!(facts.messages, all.len());
    assert_eq!(facts.weight, total);
    // Our own frames may switch channels inside a batch; the peer's are split before.
    let mut switched = frame.clone();
    switched.push(0);
    uint(&mut switched, 9);
    let body = encode(&all[0]);
    uint(&mut switched, body.len() as u64);
    switched.extend(body);
    assert_eq!(
        outbound_weight(&switched),
        total + weight_of_message(&all[0])
    );
    assert!(Inspector::new(limits()).inbound(&switched).is_err());
}

#[test]
fn opens_with_huge_channel_ids_are_refused() {
    for id in [u64::MAX, 1 << 40, 1 << 32, 20_000_000, CHANNEL_ID_SLACK + 1] {
        let err = Inspector::new(limits())
            .inbound(&open_frame(id))
            .expect_err("refused");
        assert_eq!(
            err,
            PeerViolation::ChannelId {
                id,
                bound: CHANNEL_ID_SLACK
            }
        );
        assert_eq!(err.code(), "ERR_MALFORMED_MESSAGE");
    }
    // Ids grow with the channels the peer holds: opening 1..=600 in order is fine.
    let mut inspector = Inspector::new(limits());
    for id in 1..=600 {
        inspector.inbound(&open_frame(id)).expect("in order");
    }
    // After closing most, an id under the most it ever held is still fine (ids are reused).
    for id in 2..=600 {
        inspector.inbound(&close_frame(id)).expect("close");
    }
    inspector.inbound(&open_frame(599)).expect("a reused id");
    assert!(inspector
        .inbound(&open_frame(600 + CHANNEL_ID_SLACK + 1))
        .is_err());
}

#[test]
fn the_peer_holds_at_most_max_channels() {
    let mut inspector = Inspector::new(FrameLimits { max_channels: 10 });
    for id in 1..=10 {
        inspector.inbound(&open_frame(id)).expect("under the limit");
    }
    // The same id again is not another channel.
    inspector.inbound(&open_frame(10)).expect("a repeated open");
    let err = inspector.inbound(&open_frame(11)).expect_err("over");
    assert_eq!(err, PeerViolation::TooManyChannels { limit: 10 });
    assert_eq!(err.code(), "ERR_PEER_LIMIT");
    let mut inspector = Inspector::new(FrameLimits { max_channels: 10 });
    for id in 1..=10 {
        inspector.inbound(&open_frame(id)).expect("under the limit");
    }
    inspector.inbound(&close_frame(3)).expect("close");
    inspector
        .inbound(&open_frame(11))
        .expect("room after a close");
}

#[test]
fn vector_counts_past_the_frame_are_refused() {
    for count in [1u64 << 62, 1 << 40, 1 << 20, 2] {
        // Bitfield: start 0, `count` words, one word present.
        let mut bitfield = vec![1, 7, 0];
        uint(&mut bitfield, count);
        bitfield.extend_from_slice(&[0xff; 4]);
        // Data with a block: flags 1, request 1, fork 0, index 0, value "x", `count` nodes.
        let mut data = vec![1, 3, 1, 1, 0, 0, 1, b'x'];
        uint(&mut data, count);
        data.extend_from_slice(&[0; 34]);
        // Data with an upgrade whose additional nodes claim `count`.
        let mut upgrade = vec![1, 3, 8, 1, 0, 0, 1, 0];
        uint(&mut upgrade, count);
        for frame in [bitfield, data, upgrade] {
            let err = Inspector::new(limits())
                .inbound(&frame)
                .expect_err("refused");
            assert!(matches!(err, PeerViolation::Malformed { .. }), "{err}");
            // The protocol's own decoder would have allocated `count` elements first.
        }
    }
}

#[test]
fn short_and_unknown_frames_are_refused() {
    for frame in [
        vec![1],
        vec![0, 7, 1],
        vec![1, 42, 0],
        vec![0, 1, 1, 2, 3],
        vec![0, 0, 1, 0, 5],
        // A batched Cancel whose length prefix is shorter than the message.
        vec![0, 0, 1, 1, 2, 5],
    ] {
        assert!(
            Inspector::new(limits()).inbound(&frame).is_err(),
            "{frame:?}"
        );
    }
}

/// Random and mutated frames: the inspector never panics, and whatever it accepts the
/// protocol's decoder takes without panicking. `MULTIFEED_SEED` replays a run.
#[test]
fn random_frames_never_reach_the_decoder_unchecked() {
    let seed = std::env::var("MULTIFEED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("MULTIFEED_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let valid: Vec<Vec<u8>> = samples()
        .iter()
        .flat_map(|m| [single(1, m), batch(1, std::slice::from_ref(m))])
        .collect();
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut frame = if rng.gen_bool(0.2) {
            let mut bytes = vec![0; rng.gen_range(0..64)];
            rng.fill_bytes(&mut bytes);
            bytes
        } else {
            valid[rng.gen_range(0..valid.len())].clone()
        };
        for _ in 0..rng.gen_range(1..4) {
            if frame.is_empty() {
                break;
            }
            let at = rng.gen_range(0..frame.len());
            match rng.gen_range(0..4) {
                0 => frame[at] ^= 1 << rng.gen_range(0..8),
                1 => frame[at] = [0xfd, 0xfe, 0xff, 0][rng.gen_range(0..4)],
                2 => frame.truncate(at),
                _ => frame.insert(at, rng.gen()),
            }
        }
        if Inspector::new(limits()).inbound(&frame).is_ok() {
            accepted += 1;
            decode_as_the_protocol(&frame);
        }
    }
    assert!(accepted > 100, "only {accepted} frames were accepted");
}

/// Decodes an accepted frame's messages with the protocol's decoders (which panic or abort
/// on counts the inspector should have refused).
fn decode_as_the_protocol(frame: &[u8]) {
    let mut r = Reader::new(frame);
    while !r.is_empty() {
        let rest = r.rest();
        if rest.len() >= 3 && rest[0] == 0 {
            match rest[1] {
                0 => {
                    r.skip(2).unwrap();
                    r.uint().unwrap();
                    while !r.is_empty() {
                        let len = r.len_prefix().unwrap();
                        let body = r.take(len).unwrap();
                        Message::decode(body).expect("an accepted message decodes");
                    }
                }
                1 => {
                    hypercore_protocol::schema::Open::decode(&rest[2..]).expect("decodes");
                    return;
                }
                _ => return,
            }
        } else {
            r.uint().unwrap();
            let (_, after) = Message::decode(r.rest()).expect("an accepted message decodes");
            r = Reader::new(after);
        }
    }
}
