//! The reconciliation of offered sets: equal sets, differences, gaps, hostile rounds.

use std::collections::HashSet;

use proptest::prelude::*;

use crate::tests::{
    encoded_len, first_round, handshake, initiator, past_first_round, sends, FirstRound,
};
use crate::*;

/// A distinct, well-spread key per number.
fn key(n: u32) -> FeedKey {
    let mut key = [0u8; 32];
    let mut x = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555;
    for chunk in key.chunks_mut(8) {
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    key
}

fn feeds(range: std::ops::Range<u32>, length: u64) -> Vec<FeedOffer> {
    range
        .map(|n| FeedOffer {
            key: key(n),
            length,
        })
        .collect()
}

fn live() -> ExchangeConfig {
    ExchangeConfig {
        live: true,
        ..ExchangeConfig::default()
    }
}

/// Every feed one exchange offered the other, from the messages it would send.
fn offered_in(messages: &[Message]) -> HashSet<FeedKey> {
    messages
        .iter()
        .filter_map(|m| match m {
            Message::Manifest { feeds, .. } => Some(feeds.iter().map(|f| f.key)),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn equal_sets_of_ten_thousand_agree_in_one_round_trip_of_a_few_hundred_bytes() {
    let set = feeds(0..10_000, 7);
    let (a, b, sent_a, sent_b) = past_first_round(ExchangeConfig::default(), set.clone(), set);
    assert!(a.settled() && b.settled(), "both know the peer's set");
    assert!(
        a.wanted().is_empty() && b.wanted().is_empty(),
        "nothing to fetch"
    );
    // HANDSHAKE + RECONCILE + MANIFEST + NEED one way, HANDSHAKE + RECONCILE + MANIFEST back.
    assert!(sent_a < 1_024, "initiator sent {sent_a} bytes");
    assert!(sent_b < 256, "responder sent {sent_b} bytes");
}

#[test]
fn live_the_feeds_held_the_same_are_agreed_without_offers() {
    let set = feeds(0..2_000, 3);
    let (a, b, sent_a, _) = past_first_round(live(), set.clone(), set);
    assert_eq!(a.wanted().len(), 2_000);
    assert_eq!(b.wanted().len(), 2_000);
    assert!(a.is_agreed(&key(1_999)) && b.is_agreed(&key(0)));
    assert!(sent_a < 1_024, "{sent_a} bytes");
}

#[test]
fn differences_cost_what_differs_and_the_union_is_offered() {
    // 10,000 in common; 50 only ours, 30 only theirs, 20 at other lengths.
    let mut ours = feeds(0..10_000, 1);
    ours.extend(feeds(10_000..10_050, 1));
    ours.extend(feeds(20_000..20_020, 5));
    let mut theirs = feeds(0..10_000, 1);
    theirs.extend(feeds(30_000..30_030, 1));
    theirs.extend(feeds(20_000..20_020, 9));

    let (from_a, from_b) = reconcile(ours, theirs);
    let (bytes_a, bytes_b) = (encoded_len(&from_a), encoded_len(&from_b));
    let expect_a: HashSet<FeedKey> = (10_000..10_050).chain(20_000..20_020).map(key).collect();
    let expect_b: HashSet<FeedKey> = (30_000..30_030).chain(20_000..20_020).map(key).collect();
    assert_eq!(offered_in(&from_a), expect_a);
    assert_eq!(offered_in(&from_b), expect_b);
    // Three levels of 16 fingerprints down to the 120 differing items (about 400 bytes per
    // difference, here 47 KB): a seventh of offering all 10,000 feeds (330 KB).
    assert!(bytes_a + bytes_b < 64 * 1024, "{bytes_a} + {bytes_b} bytes");
}

/// The messages an initiator offering `ours` and a responder offering `theirs` sent in their
/// first round.
fn reconcile(ours: Vec<FeedOffer>, theirs: Vec<FeedOffer>) -> (Vec<Message>, Vec<Message>) {
    let round = first_round(
        ExchangeConfig::default(),
        ExchangeConfig::default(),
        ours,
        theirs,
    );
    (round.from_a, round.from_b)
}

#[test]
fn two_feeds_that_each_grew_by_one_on_either_side_are_both_found() {
    // Negentropy's fingerprint of a range is the sum of its ids: with the length in the id as
    // it is, p at 2 and q at 1 on one side sum to the same as p at 1 and q at 2 on the other,
    // and a range holding both and no other difference looked equal. Neighbours in id order
    // share every range; pairs from all over the set.
    let count = 2_000u32;
    let mut order: Vec<u32> = (0..count).collect();
    // Ids sort by the key's first 24 bytes.
    order.sort_by_key(|&n| key(n)[..24].to_vec());
    for at in (0..count as usize - 1).step_by(97) {
        let (p, q) = (order[at], order[at + 1]);
        let at_lengths = |lp: u64, lq: u64| -> Vec<FeedOffer> {
            let mut set = feeds(0..count, 1);
            set[p as usize].length = lp;
            set[q as usize].length = lq;
            set
        };
        let (from_a, from_b) = reconcile(at_lengths(2, 1), at_lengths(1, 2));
        let both = HashSet::from([key(p), key(q)]);
        assert_eq!(
            offered_in(&from_a),
            both,
            "initiator's offers, pair at {at}"
        );
        assert_eq!(
            offered_in(&from_b),
            both,
            "responder's offers, pair at {at}"
        );
    }
}

#[test]
fn item_ids_are_keyed_per_connection_by_both_nonces() {
    // Ids a third party can predict could be planted to collide with an honest feed's: they
    // depend on the id key, and the id key on both sides' nonces.
    let feed = key(1);
    assert_ne!(item_id(&[1; 16], &feed, 3), item_id(&[2; 16], &feed, 3));
    assert_ne!(item_id(&[1; 16], &feed, 3), item_id(&[1; 16], &feed, 4));
    assert_eq!(item_id(&[1; 16], &feed, 3)[..24], feed[..24]);
    let set = feeds(0..1_000, 2);
    for (na, nb) in [([1; 16], [2; 16]), ([1; 16], [3; 16]), ([9; 16], [9; 16])] {
        let config = |nonce| ExchangeConfig {
            nonce,
            ..ExchangeConfig::default()
        };
        let FirstRound { a, b, .. } = first_round(config(na), config(nb), set.clone(), set.clone());
        assert!(a.settled() && b.settled());
        assert!(
            a.wanted().is_empty() && b.wanted().is_empty(),
            "equal sets agree"
        );
    }
}

#[test]
fn a_feed_held_with_gaps_is_offered_by_both_even_at_equal_lengths() {
    let set = feeds(0..100, 4);
    let mut a = Exchange::new(initiator());
    let mut b = Exchange::new(ExchangeConfig::default());
    let mut to_b = sends(&a.start());
    a.mark_incomplete([(key(42), 2)]);
    to_b.extend(sends(&a.offer(set.clone())));
    let mut to_a = sends(&b.start());
    to_a.extend(sends(&b.offer(set)));
    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        for message in std::mem::take(&mut to_b) {
            from_a.push(message.clone());
            to_a.extend(sends(&b.handle_message(message).expect("valid")));
        }
        for message in std::mem::take(&mut to_a) {
            from_b.push(message.clone());
            to_b.extend(sends(&a.handle_message(message).expect("valid")));
        }
    }
    let only = HashSet::from([key(42)]);
    assert_eq!(offered_in(&from_a), only);
    assert_eq!(
        offered_in(&from_b),
        only,
        "the peer offers its copy to fill the gaps"
    );
}

/// A responder whose round is under way (its set: 100 feeds).
fn responder() -> Exchange {
    let mut ex = Exchange::new(ExchangeConfig::default());
    ex.start();
    ex.offer(feeds(0..100, 1));
    ex.handle_message(handshake()).expect("handshake");
    ex
}

#[test]
fn malformed_rounds_are_typed_errors() {
    // No version; an unknown version; a bound id longer than an id; an unknown mode; a
    // fingerprint cut short.
    let cut = vec![0x61, 0, 0, 1, 0xaa, 0xaa];
    for data in [
        vec![],
        vec![0x10],
        vec![0x61, 0, 40],
        vec![0x61, 0, 0, 9],
        cut,
    ] {
        let err = responder()
            .handle_message(Message::Reconcile { data: data.clone() })
            .expect_err("malformed");
        assert_eq!(err.code(), "ERR_MALFORMED_MESSAGE", "{data:?}: {err}");
    }
    // The initiator drives: a RECONCILE it did not ask for, or NEED, is a violation.
    let mut a = Exchange::new(initiator());
    a.start();
    a.offer(vec![]);
    a.handle_message(handshake()).expect("handshake");
    let err = a
        .handle_message(Message::Need {
            ids: vec![],
            complete: true,
        })
        .expect_err("not for the initiator");
    assert!(matches!(err, MetaError::UnexpectedMessage { .. }), "{err}");
}

#[test]
fn a_responder_that_never_agrees_is_cut_off_after_the_round_limit() {
    let mut a = Exchange::new(initiator());
    a.start();
    a.offer(feeds(0..1_000, 1));
    a.handle_message(handshake()).expect("handshake");
    // "The whole range differs", with a fingerprint that matches nothing, every time.
    let mut lie = vec![0x61, 0, 0, 1];
    lie.extend_from_slice(&[0xaa; 16]);
    let mut rounds = 0;
    let err = loop {
        rounds += 1;
        assert!(rounds <= 2 * MAX_RECONCILE_ROUNDS, "never cut off");
        match a.handle_message(Message::Reconcile { data: lie.clone() }) {
            Ok(_) => continue,
            Err(err) => break err,
        }
    };
    assert_eq!(err.code(), "ERR_MALFORMED_MESSAGE", "{err}");
    assert!(
        rounds <= MAX_RECONCILE_ROUNDS,
        "cut off after {rounds} rounds"
    );
}

#[test]
fn a_need_list_of_unknown_ids_names_nothing() {
    let mut ex = responder();
    let unknown: Vec<ItemId> = (5_000..6_000)
        .map(|n| item_id(&[7; 16], &key(n), 1))
        .collect();
    let mut sent = Vec::new();
    for (i, chunk) in unknown.chunks(500).enumerate() {
        sent.extend(sends(
            &ex.handle_message(Message::Need {
                ids: chunk.to_vec(),
                complete: i == 1,
            })
            .expect("valid"),
        ));
    }
    assert_eq!(
        sent,
        vec![Message::Manifest {
            feeds: vec![],
            complete: true
        }]
    );
}

proptest! {
    #[test]
    fn arbitrary_rounds_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600), prefix in any::<bool>()) {
        let mut data = data;
        if prefix {
            data.insert(0, 0x61);
        }
        let _ = responder().handle_message(Message::Reconcile { data: data.clone() });
        let mut a = Exchange::new(initiator());
        a.start();
        a.offer(feeds(0..300, 1));
        a.handle_message(handshake()).expect("handshake");
        let _ = a.handle_message(Message::Reconcile { data });
    }
}

proptest! {
    /// The bucketed sort orders (head, place) pairs exactly as a comparison sort does: spread
    /// heads, heads sharing their top bits (keys made to), and repeated heads.
    #[test]
    fn the_bucketed_sort_orders_as_a_comparison_sort(
        heads in prop::collection::vec(any::<u64>(), 0..5000),
        shared_top in any::<bool>(),
        repeat_every in 1usize..50,
    ) {
        let mut order: Vec<(u64, u32)> = heads
            .iter()
            .enumerate()
            .map(|(place, &head)| {
                let head = if shared_top { head >> 20 } else { head };
                let head = if place % repeat_every == 0 { 7 } else { head };
                (head, place as u32)
            })
            .collect();
        let mut expected = order.clone();
        expected.sort_unstable();
        crate::reconcile::sort_by_head(&mut order, |pair| pair.0);
        prop_assert_eq!(order, expected);
    }
}
