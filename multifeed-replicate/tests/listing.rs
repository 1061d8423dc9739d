//! What a connection asks of its host: listing every feed is the one cost of a re-sync that
//! grows with the store, so it happens once per connection.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{within, TestHost};
use multifeed_replicate::{replicate, FeedHost, ReplicateConfig};

async fn sync(a: &Arc<TestHost>, b: &Arc<TestHost>) {
    let config = |initiator| ReplicateConfig::new(initiator).idle_timeout(Duration::from_secs(5));
    let (sa, sb) = async_std::os::unix::net::UnixStream::pair().expect("socket pair");
    let (ha, hb): (Arc<dyn FeedHost>, Arc<dyn FeedHost>) = (a.clone(), b.clone());
    let (ra, rb) = within(
        "a sync of two hosts",
        futures::future::join(
            replicate(sa, ha, config(true)),
            replicate(sb, hb, config(false)),
        ),
    )
    .await;
    ra.expect("the initiator's sync");
    rb.expect("the responder's sync");
}

#[async_std::test]
async fn each_side_lists_its_feeds_once_per_connection() {
    let (a, b) = (TestHost::new(), TestHost::new());
    let first = a.writer(2).await;
    for _ in 0..2 {
        a.writer(2).await;
    }
    b.writer(1).await;
    // A first sync moves feeds both ways; a second finds the sets equal.
    for round in 1..=2 {
        sync(&a, &b).await;
        assert_eq!(
            (a.listings(), b.listings()),
            (round, round),
            "feed listings (initiator, responder) after {round} syncs"
        );
    }
    assert!(
        b.core(&first).is_some(),
        "the responder got the initiator's feeds"
    );
}
