//! Errors on both sides, and hostile or broken peers: typed errors, no panics, no hangs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{within, TestHost};
use futures::AsyncWriteExt;
use multifeed_replicate::{replicate, FeedHost, ReplicateConfig, ReplicateError};

fn pair() -> (
    async_std::os::unix::net::UnixStream,
    async_std::os::unix::net::UnixStream,
) {
    async_std::os::unix::net::UnixStream::pair().expect("socket pair")
}

async fn both(
    a: Arc<TestHost>,
    b: Arc<TestHost>,
    ca: ReplicateConfig,
    cb: ReplicateConfig,
) -> (
    Result<multifeed_replicate::ReplicateSummary, ReplicateError>,
    Result<multifeed_replicate::ReplicateSummary, ReplicateError>,
) {
    let (x, y) = pair();
    let (ha, hb): (Arc<dyn FeedHost>, Arc<dyn FeedHost>) = (a, b);
    within("both sides", async {
        futures::join!(replicate(x, ha, ca), replicate(y, hb, cb))
    })
    .await
}

#[async_std::test]
async fn version_mismatch_fails_on_both_sides() {
    let (a, b) = (TestHost::new(), TestHost::new());
    let (ra, rb) = both(
        a,
        b,
        ReplicateConfig::new(true).protocol_version(multifeed_meta::semver::Version::new(1, 0, 0)),
        ReplicateConfig::new(false),
    )
    .await;
    for result in [ra, rb] {
        let err = result.expect_err("a version mismatch");
        assert_eq!(err.code(), "ERR_VERSION_MISMATCH", "{err}");
    }
}

/// Listing a large store can take longer than the handshake timeout: our HANDSHAKE goes out
/// first, so neither side times out (the peer's HANDSHAKE waited for our listing before).
#[async_std::test]
async fn a_slow_feed_listing_does_not_time_out_the_handshake() {
    let (a, b) = (TestHost::new(), TestHost::new());
    let key = a.writer(3).await;
    a.slow_listing(Duration::from_millis(900));
    let quick =
        |initiator| ReplicateConfig::new(initiator).handshake_timeout(Duration::from_millis(300));
    let (ra, rb) = both(a, b.clone(), quick(true), quick(false)).await;
    ra.expect("the slow side syncs");
    rb.expect("its peer does not time out");
    assert_eq!(b.entries(&key).await.len(), 3);
}

#[async_std::test]
async fn client_mismatch_fails_on_both_sides() {
    let (a, b) = (TestHost::new(), TestHost::new());
    let (ra, rb) = both(
        a,
        b,
        ReplicateConfig::new(true),
        ReplicateConfig::new(false).client_name("NOT-MULTIFEED".into()),
    )
    .await;
    for result in [ra, rb] {
        let err = result.expect_err("a client mismatch");
        assert_eq!(err.code(), "ERR_CLIENT_MISMATCH", "{err}");
    }
}

#[async_std::test]
async fn a_peer_serving_forged_data_is_dropped_and_our_data_is_untouched() {
    let honest_author = TestHost::new();
    let key = honest_author.writer(5).await;
    // The liar claims the honest author's feed but signs with its own key.
    let liar = TestHost::new();
    liar.lie_about(key, 5).await;
    let victim = TestHost::new();
    let own = victim.writer(3).await;
    let before = victim.entries(&own).await;
    let (rl, rv) = both(
        liar,
        victim.clone(),
        ReplicateConfig::new(true),
        ReplicateConfig::new(false),
    )
    .await;
    let err = rv.expect_err("the victim rejects the forged proof");
    assert!(matches!(err, ReplicateError::InvalidProof { .. }), "{err}");
    assert_eq!(err.code(), "ERR_INVALID_PROOF");
    assert!(rl.is_err(), "the liar's connection ends too");
    assert_eq!(
        victim.entries(&own).await,
        before,
        "our own feed is untouched"
    );
    // Its root never verified, so the feed was never even recorded.
    assert!(victim.core(&key).is_none(), "nothing forged was stored");
}

#[async_std::test]
async fn garbage_bytes_give_a_typed_error() {
    let host: Arc<dyn FeedHost> = TestHost::new();
    let (x, mut y) = pair();
    let task = async_std::task::spawn(replicate(x, host, ReplicateConfig::new(false)));
    // A uint24 frame of random bytes instead of a Noise handshake, then more junk, then EOF.
    // The driver may hang up before all of it is written: that is fine.
    let _ = y.write_all(&[40, 0, 0]).await;
    let _ = y.write_all(&[0xA5; 40]).await;
    let _ = y.write_all(&[0xff; 1000]).await;
    drop(y);
    let err = within("the garbage to be rejected", task)
        .await
        .expect_err("garbage is an error");
    assert!(matches!(err, ReplicateError::Io { .. }), "{err}");
}

#[async_std::test]
async fn a_silent_peer_times_out_in_the_handshake() {
    let host: Arc<dyn FeedHost> = TestHost::new();
    let (x, _silent) = pair();
    let config = ReplicateConfig::new(true).handshake_timeout(Duration::from_millis(500));
    let err = within("the handshake timeout", replicate(x, host, config))
        .await
        .expect_err("a silent peer is a timeout");
    assert!(matches!(err, ReplicateError::Timeout { .. }), "{err}");
}

#[async_std::test]
async fn a_peer_that_disconnects_mid_handshake_is_an_error_not_a_hang() {
    let host: Arc<dyn FeedHost> = TestHost::new();
    let (x, y) = pair();
    let task = async_std::task::spawn(replicate(x, host, ReplicateConfig::new(true)));
    drop(y);
    let err = within("the disconnect to be noticed", task)
        .await
        .expect_err("a disconnect is an error");
    assert!(matches!(err, ReplicateError::Io { .. }), "{err}");
}

#[async_std::test]
async fn feeds_replicate_between_two_hosts() {
    let (a, b) = (TestHost::new(), TestHost::new());
    let ka = a.writer(1000).await;
    let kb = b.writer(10).await;
    let (ra, rb) = both(
        a.clone(),
        b.clone(),
        ReplicateConfig::new(true),
        ReplicateConfig::new(false),
    )
    .await;
    let (sa, sb) = (ra.expect("a"), rb.expect("b"));
    assert_eq!((sa.blocks_received, sb.blocks_received), (10, 1000));
    assert_eq!(a.entries(&kb).await, b.entries(&kb).await);
    assert_eq!(a.entries(&ka).await, b.entries(&ka).await);
}

#[async_std::test]
async fn ten_feeds_each_way_replicate_in_both_directions() {
    let (a, b) = (TestHost::new(), TestHost::new());
    for _ in 0..10 {
        a.writer(1000).await;
        b.writer(1000).await;
    }
    let (ra, rb) = both(
        a.clone(),
        b.clone(),
        ReplicateConfig::new(true).idle_timeout(Duration::from_secs(5)),
        ReplicateConfig::new(false).idle_timeout(Duration::from_secs(5)),
    )
    .await;
    let (sa, sb) = (ra.expect("a"), rb.expect("b"));
    assert_eq!((sa.blocks_received, sb.blocks_received), (10_000, 10_000));
}

fn fake_keys(count: u32) -> Vec<[u8; 32]> {
    (0..count)
        .map(|i| {
            let mut key = [7u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            key
        })
        .collect()
}

#[async_std::test]
async fn a_manifest_of_a_million_keys_is_refused_with_bounded_work() {
    let flood = TestHost::new();
    flood.offer_phantoms(fake_keys(1_000_000));
    let honest = TestHost::new();
    let own = honest.writer(2).await;
    // The flooding side needs a while to build its manifest in a debug build on a loaded
    // machine: the honest side's handshake wait must not end first (this is about work, not
    // time; was flaky as ERR_TIMEOUT under load).
    let patient =
        |initiator| ReplicateConfig::new(initiator).handshake_timeout(Duration::from_secs(120));
    let (rf, rh) = both(flood, honest.clone(), patient(true), patient(false)).await;
    assert!(rf.is_err(), "the flooding side is dropped");
    let err = rh.expect_err("too many feeds");
    assert_eq!(err.code(), "ERR_TOO_MANY_FEEDS", "{err}");
    assert_eq!(honest.entries(&own).await.len(), 2, "our data is untouched");
    assert!(
        honest.core(&fake_keys(1)[0]).is_none(),
        "no feed was created for a refused offer"
    );
}

#[async_std::test]
async fn offers_of_invalid_keys_are_ignored() {
    let odd = TestHost::new();
    let invalid: Vec<[u8; 32]> = fake_keys(200)
        .into_iter()
        .filter(|key| hypercore::VerifyingKey::from_bytes(key).is_err())
        .take(5)
        .collect();
    assert_eq!(
        invalid.len(),
        5,
        "enough byte strings that are not curve points"
    );
    odd.offer_phantoms(invalid);
    let own = odd.writer(4).await;
    let honest = TestHost::new();
    let (ro, rh) = both(
        odd,
        honest.clone(),
        ReplicateConfig::new(true),
        ReplicateConfig::new(false),
    )
    .await;
    ro.expect("the odd side finishes");
    assert_eq!(rh.expect("the honest side finishes").blocks_received, 4);
    assert_eq!(honest.entries(&own).await.len(), 4);
}

#[async_std::test]
async fn offered_feeds_that_are_never_served_end_in_a_timeout() {
    let teaser = TestHost::new();
    let valid: Vec<[u8; 32]> = (0..3)
        .map(|_| hypercore::generate_signing_key().verifying_key().to_bytes())
        .collect();
    teaser.offer_phantoms(valid.clone());
    let honest = TestHost::new();
    let config = ReplicateConfig::new(false).idle_timeout(Duration::from_millis(500));
    let (_, rh) = both(teaser, honest.clone(), ReplicateConfig::new(true), config).await;
    let err = rh.expect_err("the wait is bounded");
    assert!(matches!(err, ReplicateError::Timeout { .. }), "{err}");
    // Nothing of them was verified, so nothing of them was recorded (was: a permanent feed
    // per offered key, which we then offered to every later peer).
    for key in &valid {
        assert!(
            honest.core(key).is_none(),
            "an unverified feed was recorded"
        );
    }
}

#[async_std::test]
async fn thousands_of_junk_offers_record_nothing_and_real_feeds_still_sync() {
    let junk = TestHost::new();
    let keys: Vec<[u8; 32]> = (0..3_000)
        .map(|_| hypercore::generate_signing_key().verifying_key().to_bytes())
        .collect();
    junk.offer_phantoms(keys.clone());
    let real = junk.writer(4).await;
    // A small-order point is a valid curve point anyone can sign for: never a feed.
    let mut small_order = [0u8; 32];
    small_order[0] = 1;
    junk.offer_phantoms(vec![small_order]);
    let honest = TestHost::new();
    let config = ReplicateConfig::new(false).idle_timeout(Duration::from_millis(800));
    let (_, rh) = both(junk, honest.clone(), ReplicateConfig::new(true), config).await;
    assert!(rh.is_err(), "the junk is never served: the wait ends");
    // The real feed was verified and recorded even though it waited behind junk for a slot.
    assert_eq!(honest.entries(&real).await.len(), 4);
    assert!(honest.core(&small_order).is_none());
    let recorded = keys.iter().filter(|key| honest.core(key).is_some()).count();
    assert_eq!(recorded, 0, "junk feeds recorded");
}

#[async_std::test]
async fn a_replication_adds_at_most_max_new_feeds() {
    let author = TestHost::new();
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(author.writer(2).await);
    }
    let honest = TestHost::new();
    let (ra, rh) = both(
        author,
        honest.clone(),
        ReplicateConfig::new(true),
        ReplicateConfig::new(false)
            .max_new_feeds(2)
            .idle_timeout(Duration::from_millis(800)),
    )
    .await;
    let _ = (ra, rh);
    let recorded = keys.iter().filter(|key| honest.core(key).is_some()).count();
    assert_eq!(recorded, 2);
}
