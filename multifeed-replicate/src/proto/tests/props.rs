//! Property tests of the core: whatever a peer sends, in whatever order, the core neither
//! panics nor grows without bound, and over a fair link two cores always converge.
//! Failing cases are saved in `proptest-regressions/proto/tests/props.txt` (committed).

use std::collections::BTreeMap;
use std::time::Duration;

use hypercore_protocol::discovery_key;
use hypercore_protocol::schema::{Bitfield, Data, Extension, NoData, Range, Request, Synchronize};
use hypercore_protocol::Message;
use hypercore_schema::{DataBlock, DataUpgrade, Node, RequestBlock, RequestUpgrade};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::proto::sim::{key, value, FakeFeed, Link, Pair, Wire};
use crate::proto::{MAX_PROBES, MAX_UNKNOWN_CHANNELS};
use crate::{ReplicateConfig, DEFAULT_ENCRYPTION_KEY};

/// Which channel an injected item names.
#[derive(Debug, Clone, Copy)]
enum Target {
    Root,
    /// The feed both sides replicate.
    Shared,
    /// A feed nobody agreed to.
    Unknown(u8),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        2 => Just(Target::Root),
        5 => Just(Target::Shared),
        1 => any::<u8>().prop_map(Target::Unknown),
    ]
}

fn dk_of(target: Target) -> [u8; 32] {
    match target {
        Target::Root => discovery_key(&DEFAULT_ENCRYPTION_KEY),
        Target::Shared => discovery_key(&key(1)),
        Target::Unknown(n) => discovery_key(&key(n.wrapping_add(50))),
    }
}

fn small() -> impl Strategy<Value = u64> {
    prop_oneof![0..64u64, any::<u64>()]
}

fn node() -> impl Strategy<Value = Node> {
    (small(), prop_oneof![Just(32usize), 0..40usize], small())
        .prop_map(|(index, len, length)| Node::new(index, vec![7; len], length))
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (small(), small(), small()).prop_map(|(fork, length, remote_length)| {
            Message::Synchronize(Synchronize {
                fork,
                length,
                remote_length,
                can_upgrade: true,
                uploading: true,
                downloading: true,
            })
        }),
        (small(), small()).prop_map(|(start, length)| Message::Range(Range {
            drop: false,
            start,
            length
        })),
        (small(), proptest::collection::vec(any::<u32>(), 0..16))
            .prop_map(|(start, bitfield)| Message::Bitfield(Bitfield { start, bitfield })),
        (
            small(),
            small(),
            small(),
            proptest::option::of((small(), small()))
        )
            .prop_map(|(id, index, nodes, upgrade)| Message::Request(Request {
                id,
                fork: 0,
                hash: None,
                block: Some(RequestBlock { index, nodes }),
                seek: None,
                upgrade: upgrade.map(|(start, length)| RequestUpgrade { start, length }),
                manifest: false,
                priority: 0,
            })),
        (
            0..40u64,
            proptest::option::of((
                small(),
                any::<bool>(),
                proptest::collection::vec(node(), 0..3)
            )),
            proptest::option::of((small(), small()))
        )
            .prop_map(|(request, block, upgrade)| Message::Data(Data {
                request,
                fork: 0,
                hash: None,
                block: block.map(|(index, right, nodes)| DataBlock {
                    index,
                    value: if right {
                        value(&key(1), index)
                    } else {
                        vec![1, 2, 3]
                    },
                    nodes,
                }),
                seek: None,
                upgrade: upgrade.map(|(start, length)| DataUpgrade {
                    start,
                    length,
                    nodes: Vec::new(),
                    additional_nodes: Vec::new(),
                    signature: vec![0; 64],
                }),
            })),
        (0..40u64).prop_map(|request| Message::NoData(NoData { request })),
        (
            prop_oneof![Just("multifeed".to_owned()), Just("other".to_owned())],
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(name, message)| Message::Extension(Extension { name, message })),
    ]
}

/// Something a hostile or broken peer does.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum Hostile {
    Open(Target),
    Close(Target),
    Send(Target, Message),
    /// Time passes with nothing arriving (ms).
    Wait(u16),
}

fn hostile() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        1 => target().prop_map(Hostile::Open),
        1 => target().prop_map(Hostile::Close),
        8 => (target(), message()).prop_map(|(t, m)| Hostile::Send(t, m)),
        1 => any::<u16>().prop_map(Hostile::Wait),
    ]
}

fn config(initiator: bool) -> ReplicateConfig {
    ReplicateConfig::new(initiator).max_in_flight(8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// An honest run for `honest_steps`, then side 1 gets `inputs` no honest peer would send,
    /// then the honest run goes on: no panic; each input's outputs are bounded; what side 1
    /// tracks stays within its limits; a side that ends, ends with a typed error or done.
    #[test]
    fn whatever_a_peer_sends_the_core_neither_panics_nor_grows(
        seed in any::<u64>(),
        honest_steps in 0..300usize,
        inputs in proptest::collection::vec(hostile(), 1..60),
    ) {
        let stores = [
            [(key(1), FakeFeed::full(30))].into_iter().collect(),
            [(key(2), FakeFeed::full(5))].into_iter().collect(),
        ];
        let mut pair = Pair::new([config(true), config(false)], stores, Link::default(), seed);
        pair.connect();
        for _ in 0..honest_steps {
            if !pair.step() {
                break;
            }
        }
        for input in inputs {
            let before = pair.in_flight();
            match input {
                Hostile::Open(t) => pair.inject(1, Wire::Open(dk_of(t))),
                Hostile::Close(t) => pair.inject(1, Wire::Close(dk_of(t))),
                Hostile::Send(t, m) => pair.inject(1, Wire::Message(dk_of(t), m)),
                Hostile::Wait(ms) => pair.wait(1, Duration::from_millis(u64::from(ms))),
            }
            // One input yields a bounded answer: a window of requests, an announcement.
            prop_assert!(pair.in_flight() <= before + 64, "{} items from one input", pair.in_flight() - before);
            prop_assert!(pair.peers[1].conn.tracked_feeds() <= 2 + MAX_PROBES + MAX_UNKNOWN_CHANNELS);
        }
        pair.run(200_000);
        for peer in &pair.peers {
            if let Some(err) = &peer.error {
                // Typed, with a code: never a panic, never a stall.
                prop_assert!(err.code().starts_with("ERR_"), "{err}");
            }
        }
    }

    /// Over a fair link (any latency, jitter and answers out of order), two cores with any
    /// stores end with the union.
    #[test]
    fn over_a_fair_link_two_cores_always_converge(
        seed in any::<u64>(),
        lengths in proptest::collection::vec((0..3usize, 0..50u64), 0..6),
        latency in 0..100u64,
        reorder in 0.0..0.9f64,
    ) {
        let mut stores = [BTreeMap::new(), BTreeMap::new()];
        let mut want = BTreeMap::new();
        for (n, (owner, length)) in lengths.into_iter().enumerate() {
            let k = key(n as u8 + 1);
            // 0: the first side has it, 1: the second, 2: both (the second a prefix).
            match owner {
                0 => { stores[0].insert(k, FakeFeed::full(length)); }
                1 => { stores[1].insert(k, FakeFeed::full(length)); }
                _ => {
                    stores[0].insert(k, FakeFeed::full(length));
                    stores[1].insert(k, FakeFeed::full(length / 2));
                }
            }
            if length > 0 {
                want.insert(k, length);
            }
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let link = Link {
            latency: Duration::from_millis(latency),
            jitter: Duration::from_millis(rng.gen_range(0..30)),
            reorder,
            cut_after: None,
        };
        let mut pair = Pair::new([config(true), config(false)], stores, link, seed);
        pair.connect();
        pair.run(400_000);
        for peer in &pair.peers {
            prop_assert!(peer.error.is_none(), "{:?}", peer.error);
            prop_assert!(peer.conn.is_done());
            for (k, length) in &want {
                prop_assert_eq!(peer.feeds.get(k).cloned(), Some(FakeFeed::full(*length)));
            }
        }
    }
}
