//! Unit tests: encoding, limits, every state x message pair, two exchanges end to end.

use proptest::prelude::*;

use crate::*;

fn key(n: u8) -> FeedKey {
    [n; 32]
}

fn offer(n: u8, length: u64) -> FeedOffer {
    FeedOffer {
        key: key(n),
        length,
    }
}

pub(crate) fn handshake() -> Message {
    Message::Handshake {
        client: CLIENT.into(),
        version: PROTOCOL_VERSION,
        user_data: b"hi".to_vec(),
        nonce: [7; 16],
    }
}

pub(crate) fn sends(actions: &[Action]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

pub(crate) fn initiator() -> ExchangeConfig {
    ExchangeConfig {
        initiator: true,
        ..ExchangeConfig::default()
    }
}

/// An initiator (`a`) and a responder (`b`) past their first round, and every message each
/// sent, through its encoding.
pub(crate) struct FirstRound {
    pub(crate) a: Exchange,
    pub(crate) b: Exchange,
    pub(crate) from_a: Vec<Message>,
    pub(crate) from_b: Vec<Message>,
}

/// Runs the first round of an initiator configured `a` offering `ours` and a responder
/// configured `b` offering `theirs`.
pub(crate) fn first_round(
    a: ExchangeConfig,
    b: ExchangeConfig,
    ours: Vec<FeedOffer>,
    theirs: Vec<FeedOffer>,
) -> FirstRound {
    let mut a = Exchange::new(ExchangeConfig {
        initiator: true,
        ..a
    });
    let mut b = Exchange::new(ExchangeConfig {
        initiator: false,
        ..b
    });
    let mut to_b = sends(&a.start());
    to_b.extend(sends(&a.offer(ours)));
    let mut to_a = sends(&b.start());
    to_a.extend(sends(&b.offer(theirs)));
    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        if to_a.is_empty() && to_b.is_empty() {
            return FirstRound {
                a,
                b,
                from_a,
                from_b,
            };
        }
        for message in std::mem::take(&mut to_b) {
            to_a.extend(sends(
                &b.handle(&message.encode())
                    .expect("valid for the responder"),
            ));
            from_a.push(message);
        }
        for message in std::mem::take(&mut to_a) {
            to_b.extend(sends(
                &a.handle(&message.encode())
                    .expect("valid for the initiator"),
            ));
            from_b.push(message);
        }
    }
    panic!("the first round did not end in 100 steps");
}

/// The bytes of these messages, encoded.
pub(crate) fn encoded_len(messages: &[Message]) -> usize {
    messages.iter().map(|m| m.encode().len()).sum()
}

/// [`first_round`] with one config for both sides: the exchanges and the bytes each sent.
pub(crate) fn past_first_round(
    config: ExchangeConfig,
    ours: Vec<FeedOffer>,
    theirs: Vec<FeedOffer>,
) -> (Exchange, Exchange, usize, usize) {
    let round = first_round(config.clone(), config, ours, theirs);
    let (sent_a, sent_b) = (encoded_len(&round.from_a), encoded_len(&round.from_b));
    (round.a, round.b, sent_a, sent_b)
}

/// An initiator past its first round, with nothing offered either way.
fn ready() -> Exchange {
    past_first_round(ExchangeConfig::default(), vec![], vec![]).0
}

#[test]
fn every_message_round_trips() {
    let messages = [
        handshake(),
        Message::Manifest {
            feeds: vec![offer(1, 0), offer(2, u64::MAX)],
            complete: true,
        },
        Message::Manifest {
            feeds: vec![],
            complete: false,
        },
        Message::RequestFeeds {
            keys: vec![key(1), key(2)],
        },
        Message::ReplicateFeeds { keys: vec![] },
        Message::Synced,
        Message::Reconcile {
            data: vec![0x61, 0, 0],
        },
        Message::Need {
            ids: vec![key(3), key(4)],
            complete: true,
        },
        Message::Need {
            ids: vec![],
            complete: false,
        },
    ];
    for message in messages {
        assert_eq!(Message::decode(&message.encode()), Ok(message));
    }
}

#[test]
fn decoding_rejects_malformed_input() {
    use DecodeError::*;
    assert_eq!(Message::decode(&[]), Err(Empty));
    assert_eq!(Message::decode(&[99]), Err(UnknownType(99)));
    assert_eq!(Message::decode(&[5, 0]), Err(TrailingBytes(1)));
    assert_eq!(Message::decode(&[3, 1]), Err(Truncated("keys")));
    assert_eq!(Message::decode(&[2, 7, 0]), Err(InvalidFlag("complete")));
    let mut dup = vec![3, 2];
    dup.extend_from_slice(&[1; 64]);
    assert_eq!(Message::decode(&dup), Err(DuplicateKey));
    let mut many = vec![3];
    many.extend_from_slice(&[0x81, 0x10]); // 2049 keys
    assert!(matches!(Message::decode(&many), Err(TooManyKeys { .. })));
    let overflow = [
        3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
    ];
    assert!(matches!(Message::decode(&overflow), Err(VarintOverflow(_))));
    let long_client = [1, 200, 1];
    assert!(matches!(
        Message::decode(&long_client),
        Err(FieldTooLong { .. })
    ));
    let bad_utf8 = [1, 1, 0xff, 1, b'1', 0];
    assert_eq!(Message::decode(&bad_utf8), Err(InvalidUtf8("client")));
    let bad_version = [1, 1, b'M', 3, b'1', b'.', b'x', 0];
    assert!(matches!(
        Message::decode(&bad_version),
        Err(InvalidVersion(_))
    ));
    // A handshake of the nonce-less format: client, version, user data, and no nonce.
    let no_nonce = [1, 1, b'M', 5, b'2', b'.', b'0', b'.', b'0', 0];
    assert_eq!(Message::decode(&no_nonce), Err(Truncated("nonce")));
    let huge = vec![5; MAX_MESSAGE_BYTES + 1];
    assert!(matches!(
        Message::decode(&huge),
        Err(MessageTooLarge { .. })
    ));
}

#[test]
fn a_full_manifest_fits_one_message() {
    let feeds: Vec<FeedOffer> = (0..MAX_KEYS_PER_MESSAGE)
        .map(|i| FeedOffer {
            key: {
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&(i as u64).to_le_bytes());
                k
            },
            length: u64::MAX,
        })
        .collect();
    let bytes = Message::Manifest {
        feeds,
        complete: true,
    }
    .encode();
    assert!(bytes.len() <= MAX_MESSAGE_BYTES, "{} bytes", bytes.len());
    assert!(Message::decode(&bytes).is_ok());
}

#[test]
fn handshake_checks_client_and_version() {
    let mut ex = Exchange::new(ExchangeConfig::default());
    ex.start();
    let err = ex
        .handle_message(Message::Handshake {
            client: "OTHER".into(),
            version: PROTOCOL_VERSION,
            user_data: vec![],
            nonce: [0; 16],
        })
        .unwrap_err();
    assert_eq!(err.code(), "ERR_CLIENT_MISMATCH");

    let mut ex = Exchange::new(ExchangeConfig::default());
    ex.start();
    let err = ex
        .handle_message(Message::Handshake {
            client: CLIENT.into(),
            version: semver::Version::new(1, 0, 0),
            user_data: vec![],
            nonce: [0; 16],
        })
        .unwrap_err();
    // A 1.x peer offers every feed on every connection: refused.
    assert_eq!(
        err,
        MetaError::VersionMismatch {
            ours: semver::Version::new(2, 1, 0),
            theirs: semver::Version::new(1, 0, 0)
        }
    );
    assert_eq!(err.code(), "ERR_VERSION_MISMATCH");

    // A newer minor version of the same major is compatible; 0.x minors are not.
    let mut ex = Exchange::new(ExchangeConfig::default());
    ex.start();
    assert!(ex
        .handle_message(Message::Handshake {
            client: CLIENT.into(),
            version: semver::Version::new(2, 7, 3),
            user_data: vec![],
            nonce: [0; 16],
        })
        .is_ok());
    let mut ex = Exchange::new(ExchangeConfig {
        version: semver::Version::new(0, 3, 0),
        ..ExchangeConfig::default()
    });
    ex.start();
    let err = ex
        .handle_message(Message::Handshake {
            client: CLIENT.into(),
            version: semver::Version::new(0, 4, 0),
            user_data: vec![],
            nonce: [0; 16],
        })
        .unwrap_err();
    assert_eq!(err.code(), "ERR_VERSION_MISMATCH");
}

/// Every message in every state: which are accepted and which are protocol violations.
#[test]
fn every_state_and_message_pair() {
    let messages = || {
        vec![
            handshake(),
            Message::Manifest {
                feeds: vec![offer(1, 1)],
                complete: true,
            },
            Message::RequestFeeds { keys: vec![key(9)] },
            Message::ReplicateFeeds { keys: vec![] },
            Message::Synced,
            Message::Reconcile { data: vec![0x61] },
            Message::Need {
                ids: vec![],
                complete: true,
            },
        ]
    };
    // (state builder, name, expected Ok per message in the order above)
    fn new() -> Exchange {
        Exchange::new(ExchangeConfig::default())
    }
    let awaiting = || {
        let mut ex = new();
        ex.start();
        ex
    };
    let finished = || {
        let mut ex = ready();
        ex.local_synced();
        ex.handle_message(Message::Synced).expect("synced");
        assert!(ex.is_finished());
        ex
    };
    type Builder = Box<dyn Fn() -> Exchange>;
    // The responder of a round under way takes RECONCILE and NEED.
    let reconciling = || {
        let mut ex = new();
        ex.start();
        ex.offer(vec![]);
        ex.handle_message(handshake()).expect("handshake");
        ex
    };
    let table: Vec<(&str, Builder, [bool; 7])> = vec![
        ("new", Box::new(new), [false; 7]),
        (
            "awaiting",
            Box::new(awaiting),
            [true, false, false, false, false, false, false],
        ),
        (
            "reconciling",
            Box::new(reconciling),
            [false, true, true, false, true, true, true],
        ),
        // ReplicateFeeds with no outstanding request is a violation; so is reconciling again.
        (
            "ready",
            Box::new(ready),
            [false, true, true, false, true, false, false],
        ),
        (
            "finished",
            Box::new(finished),
            [false, true, true, false, true, false, false],
        ),
    ];
    for (name, build, expected) in table {
        for (message, ok) in messages().into_iter().zip(expected) {
            let label = message.name();
            let result = build().handle_message(message);
            assert_eq!(
                result.is_ok(),
                ok,
                "state {name}, message {label}: {result:?}"
            );
            if let Err(err) = result {
                assert!(
                    matches!(err, MetaError::UnexpectedMessage { .. }),
                    "state {name}, message {label}: {err:?}"
                );
            }
        }
    }
}

#[test]
fn offers_before_the_handshake_are_reconciled_and_later_ones_sent_once_per_length() {
    let mut ex = Exchange::new(initiator());
    ex.start();
    assert!(ex.offer(vec![offer(1, 5), offer(1, 5)]).is_empty());
    let sent = sends(&ex.handle_message(handshake()).expect("handshake"));
    assert!(
        matches!(sent.as_slice(), [Message::Reconcile { .. }]),
        "the set is reconciled first, not offered: {sent:?}"
    );

    let mut ex = ready();
    assert_eq!(sends(&ex.offer(vec![offer(2, 1)])).len(), 1);
    assert!(ex.offer(vec![offer(2, 1)]).is_empty(), "no repeat");
    assert_eq!(
        sends(&ex.offer(vec![offer(2, 4)])),
        vec![Message::Manifest {
            feeds: vec![offer(2, 4)],
            complete: true
        }],
        "offered again when longer (and not agreed)"
    );
}

#[test]
fn large_offers_are_split_and_the_last_chunk_completes_the_round() {
    let mut ex = ready();
    let feeds: Vec<FeedOffer> = (0..2500u32)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            FeedOffer { key: k, length: 1 }
        })
        .collect();
    let sent = sends(&ex.offer(feeds));
    assert_eq!(sent.len(), 3);
    let completes: Vec<bool> = sent
        .iter()
        .map(|m| matches!(m, Message::Manifest { complete: true, .. }))
        .collect();
    assert_eq!(completes, vec![false, false, true]);
}

#[test]
fn requests_are_answered_with_what_we_offered() {
    let mut ex = ready();
    ex.offer(vec![offer(1, 3)]);
    let actions = ex
        .handle_message(Message::RequestFeeds {
            keys: vec![key(1), key(2)],
        })
        .expect("request");
    assert_eq!(
        actions,
        vec![
            Action::Send(Message::ReplicateFeeds { keys: vec![key(1)] }),
            Action::Replicate(vec![key(1)])
        ]
    );
}

#[test]
fn replicate_feeds_must_match_a_request() {
    let mut ex = ready();
    ex.handle_message(Message::Manifest {
        feeds: vec![offer(1, 4), offer(2, 8)],
        complete: true,
    })
    .expect("manifest");
    assert!(!ex.settled(), "offers are undecided");
    ex.request(vec![key(1)]);
    assert!(!ex.settled(), "request outstanding");
    let err = ex
        .handle_message(Message::ReplicateFeeds { keys: vec![key(2)] })
        .unwrap_err();
    assert!(matches!(err, MetaError::UnexpectedMessage { .. }));

    let mut ex = ready();
    ex.handle_message(Message::Manifest {
        feeds: vec![offer(1, 4), offer(2, 8)],
        complete: true,
    })
    .expect("manifest");
    ex.request(vec![key(1), key(2)]);
    let actions = ex
        .handle_message(Message::ReplicateFeeds { keys: vec![key(2)] })
        .expect("answer");
    assert_eq!(actions, vec![Action::Replicate(vec![key(2)])]);
    assert!(ex.settled());
    assert_eq!(ex.wanted().len(), 1);
    assert_eq!(ex.wanted().get(&key(2)), Some(&8));
}

#[test]
fn too_many_remote_feeds_is_an_error() {
    let mut ex = Exchange::new(ExchangeConfig {
        max_remote_feeds: 3,
        ..ExchangeConfig::default()
    });
    ex.start();
    ex.handle_message(handshake()).expect("handshake");
    let err = ex
        .handle_message(Message::Manifest {
            feeds: (1..=4).map(|n| offer(n, 1)).collect(),
            complete: true,
        })
        .unwrap_err();
    assert_eq!(err, MetaError::TooManyFeeds { limit: 3 });
}

/// Delivers `inbox` to `ex`; returns what it sends, the keys to replicate, and whether it finished.
fn deliver(ex: &mut Exchange, inbox: Vec<Message>) -> (Vec<Message>, Vec<FeedKey>, bool) {
    let (mut out, mut keys, mut done) = (Vec::new(), Vec::new(), false);
    for message in inbox {
        let actions = ex.handle(&message.encode()).expect("valid exchange");
        for action in actions {
            match action {
                Action::Send(m) => out.push(m),
                Action::RemoteOffered(offers) => {
                    let wanted = offers.iter().map(|o| o.key).collect();
                    out.extend(sends(&ex.request(wanted)));
                }
                Action::Replicate(k) => keys.extend(k),
                Action::Finished => done = true,
                Action::RemoteHandshake { .. } => {}
            }
        }
        if ex.settled() {
            for action in ex.local_synced() {
                match action {
                    Action::Send(m) => out.push(m),
                    Action::Finished => done = true,
                    _ => {}
                }
            }
        }
    }
    (out, keys, done)
}

/// Drives two exchanges against each other; returns the keys each was told to replicate.
fn drive(
    a: &mut Exchange,
    b: &mut Exchange,
    mut to_a: Vec<Message>,
    mut to_b: Vec<Message>,
) -> (Vec<FeedKey>, Vec<FeedKey>, bool) {
    let (mut ka, mut kb, mut fa, mut fb) = (Vec::new(), Vec::new(), false, false);
    for _ in 0..100 {
        if to_a.is_empty() && to_b.is_empty() {
            break;
        }
        let (out, keys, done) = deliver(a, std::mem::take(&mut to_a));
        to_b.extend(out);
        ka.extend(keys);
        fa |= done;
        let (out, keys, done) = deliver(b, std::mem::take(&mut to_b));
        to_a.extend(out);
        kb.extend(keys);
        fb |= done;
    }
    (ka, kb, fa && fb)
}

#[test]
fn two_exchanges_agree_on_the_union_and_finish() {
    let mut a = Exchange::new(initiator());
    let mut b = Exchange::new(ExchangeConfig::default());
    let mut to_b = sends(&a.start());
    let mut to_a = sends(&b.start());
    to_b.extend(sends(&a.offer(vec![offer(1, 3), offer(2, 0)])));
    to_a.extend(sends(&b.offer(vec![offer(3, 9)])));
    let (mut ka, mut kb, finished) = drive(&mut a, &mut b, to_a, to_b);
    ka.sort();
    kb.sort();
    assert_eq!(ka, vec![key(1), key(2), key(3)]);
    assert_eq!(kb, ka);
    assert!(finished);
}

#[test]
fn empty_exchanges_finish() {
    let mut a = Exchange::new(initiator());
    let mut b = Exchange::new(ExchangeConfig::default());
    let mut to_b = sends(&a.start());
    let mut to_a = sends(&b.start());
    to_b.extend(sends(&a.offer(vec![])));
    to_a.extend(sends(&b.offer(vec![])));
    let (ka, kb, finished) = drive(&mut a, &mut b, to_a, to_b);
    assert!(ka.is_empty() && kb.is_empty());
    assert!(finished);
}

#[test]
fn live_exchanges_take_later_offers_and_never_finish() {
    let live = ExchangeConfig {
        live: true,
        ..ExchangeConfig::default()
    };
    let mut a = Exchange::new(ExchangeConfig {
        initiator: true,
        ..live.clone()
    });
    let mut b = Exchange::new(live);
    let mut to_b = sends(&a.start());
    let mut to_a = sends(&b.start());
    to_b.extend(sends(&a.offer(vec![offer(1, 1)])));
    to_a.extend(sends(&b.offer(vec![])));
    let (_, kb, finished) = drive(&mut a, &mut b, to_a, to_b);
    assert_eq!(kb, vec![key(1)]);
    assert!(!finished);
    let later = sends(&a.offer(vec![offer(2, 1)]));
    let (_, kb, _) = drive(&mut a, &mut b, vec![], later);
    assert_eq!(kb, vec![key(2)]);
}

fn arb_key() -> impl Strategy<Value = FeedKey> {
    any::<[u8; 32]>()
}

fn arb_message() -> impl Strategy<Value = Message> {
    let keys = || {
        proptest::collection::hash_set(arb_key(), 0..20)
            .prop_map(|s| s.into_iter().collect::<Vec<_>>())
    };
    prop_oneof![
        (
            "[A-Z]{0,64}",
            any::<(u16, u16, u16)>(),
            proptest::collection::vec(any::<u8>(), 0..100),
            any::<[u8; 16]>()
        )
            .prop_map(
                |(client, (ma, mi, pa), user_data, nonce)| Message::Handshake {
                    client,
                    version: semver::Version::new(ma.into(), mi.into(), pa.into()),
                    user_data,
                    nonce
                }
            ),
        (
            proptest::collection::hash_map(arb_key(), any::<u64>(), 0..20),
            any::<bool>()
        )
            .prop_map(|(m, complete)| Message::Manifest {
                feeds: m
                    .into_iter()
                    .map(|(key, length)| FeedOffer { key, length })
                    .collect(),
                complete
            }),
        keys().prop_map(|keys| Message::RequestFeeds { keys }),
        keys().prop_map(|keys| Message::ReplicateFeeds { keys }),
        Just(Message::Synced),
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(|data| Message::Reconcile { data }),
        (keys(), any::<bool>()).prop_map(|(ids, complete)| Message::Need { ids, complete }),
    ]
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Message::decode(&bytes);
        let mut ex = ready();
        let _ = ex.handle(&bytes);
    }

    #[test]
    fn valid_messages_round_trip(message in arb_message()) {
        prop_assert_eq!(Message::decode(&message.encode()), Ok(message));
    }

    #[test]
    fn mutated_messages_never_panic(message in arb_message(), at in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = message.encode();
        let i = at % bytes.len();
        bytes[i] = byte;
        let _ = Message::decode(&bytes);
    }
}

#[test]
fn undecodable_bytes_have_the_malformed_message_code() {
    let err = Message::decode(&[]).expect_err("empty");
    assert_eq!(err, crate::DecodeError::Empty);
    assert_eq!(err.code(), "ERR_MALFORMED_MESSAGE");
    assert_eq!(MetaError::Decode(err).code(), "ERR_MALFORMED_MESSAGE");
}
