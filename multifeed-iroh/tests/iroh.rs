//! Replication over iroh, with relays and address lookup off, on 127.0.0.1 only.

use std::time::Duration;

use futures::StreamExt;
use multifeed::{Event, Multifeed, ReplicateOptions};
use multifeed_iroh::{Config, Node, Served, Ticket};

/// Bounds every wait of these tests.
const WAIT: Duration = Duration::from_secs(30);

async fn store(writer: &str, entries: usize) -> Multifeed {
    let multi = Multifeed::builder().open().await.expect("open a store");
    let feed = multi.writer(writer).await.expect("writer");
    let batch: Vec<Vec<u8>> = (0..entries)
        .map(|i| format!("{writer} {i}").into_bytes())
        .collect();
    feed.append_batch(batch).await.expect("append");
    multi
}

async fn lengths(multi: &Multifeed) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for feed in multi.feeds() {
        out.push((feed.key_hex(), feed.len().await.expect("len")));
    }
    out.sort();
    out
}

/// Serves `multi` live on a local node; what each served peer ended with goes to the channel.
async fn sharing(
    multi: &Multifeed,
    options: ReplicateOptions,
) -> (Node, futures::channel::mpsc::UnboundedReceiver<Served>) {
    sharing_with(multi, options, Config::local()).await
}

async fn sharing_with(
    multi: &Multifeed,
    options: ReplicateOptions,
    config: Config,
) -> (Node, futures::channel::mpsc::UnboundedReceiver<Served>) {
    let node = Node::bind(config).await.expect("bind");
    let (ends, ended) = futures::channel::mpsc::unbounded();
    let serving = node.serve(multi.clone(), options, move |served| {
        let _ = ends.unbounded_send(served);
    });
    async_std::task::spawn(serving);
    (node, ended)
}

#[async_std::test]
async fn a_sync_by_ticket_gives_both_the_union() {
    let alice = store("alice", 500).await;
    let bob = store("bob", 300).await;
    let (shared, mut ended) = sharing(&alice, ReplicateOptions::new(false).live(true)).await;
    let ticket: Ticket = shared.ticket().to_string().parse().expect("ticket");
    assert!(
        shared
            .bound_addrs()
            .iter()
            .all(|addr| addr.ip().is_loopback()),
        "bound only to loopback: {:?}",
        shared.bound_addrs()
    );

    let dialing = Node::bind(Config::local()).await.expect("bind");
    let summary = async_std::future::timeout(
        WAIT,
        dialing.replicate(&bob, &ticket, ReplicateOptions::new(true)),
    )
    .await
    .expect("the sync ends in time")
    .expect("the sync succeeds");
    assert_eq!(summary.blocks_received, 500);
    assert_eq!(summary.blocks_sent, 300);
    assert_eq!(lengths(&bob).await.len(), 2);

    // The live sharing side ends its replication when the dialer hangs up, with everything.
    let served = async_std::future::timeout(WAIT, ended.next())
        .await
        .expect("the sharing side hears the peer leave")
        .expect("a served peer");
    assert_eq!(served.peer, dialing.id());
    let summary = served.result.expect("served without error");
    assert_eq!(summary.blocks_received, 300);
    assert_eq!(lengths(&alice).await, lengths(&bob).await);
    dialing.close().await;
    shared.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_sync_inside_tokio_carries_new_entries() {
    let alice = store("alice", 1).await;
    let bob = store("bob", 1).await;
    let (shared, _ended) = sharing(&alice, ReplicateOptions::new(false).live(true)).await;
    let dialing = Node::bind(Config::local()).await.expect("bind");
    let ticket = shared.ticket();
    let mut events = bob.events();
    let live = {
        let (dialing, bob) = (dialing.clone(), bob.clone());
        tokio::spawn(async move {
            dialing
                .replicate(&bob, &ticket, ReplicateOptions::new(true).live(true))
                .await
        })
    };
    // Bob holds alice's first entry, then gets the one she appends after.
    let alice_feed = alice.writer("alice").await.expect("writer");
    let bob_copy = tokio::time::timeout(WAIT, async {
        loop {
            match events.next().await {
                Some(Event::Feed { key, .. }) if &key == alice_feed.key() => {
                    break bob.feed(key).expect("feed").expect("bob has it")
                }
                Some(_) => {}
                None => panic!("the event stream ended"),
            }
        }
    })
    .await
    .expect("bob hears of alice's feed");
    bob_copy
        .wait_for_len(1, WAIT)
        .await
        .expect("the first entry");
    alice_feed.append(b"later").await.expect("append");
    bob_copy
        .wait_for_len(2, WAIT)
        .await
        .expect("the entry appended while connected arrives");
    assert_eq!(
        bob_copy.get(1).await.expect("get").as_deref(),
        Some(&b"later"[..])
    );
    dialing.close().await;
    // A live sync ends when its connection does (as over TCP, that is not an error).
    tokio::time::timeout(WAIT, live)
        .await
        .expect("the live sync ends when its endpoint closes")
        .expect("the task ran")
        .expect("a live sync that was hung up on ends normally");
    shared.close().await;
}

#[async_std::test]
async fn a_wrong_shared_key_fails_both_sides_and_writes_nothing() {
    let alice = store("alice", 3).await;
    let bob = store("bob", 2).await;
    let options = ReplicateOptions::new(false)
        .live(true)
        .encryption_key([1; 32]);
    let (shared, mut ended) = sharing(&alice, options).await;
    let dialing = Node::bind(Config::local()).await.expect("bind");
    let err = async_std::future::timeout(
        WAIT,
        dialing.replicate(
            &bob,
            &shared.ticket(),
            ReplicateOptions::new(true).encryption_key([2; 32]),
        ),
    )
    .await
    .expect("ends in time")
    .expect_err("keys differ");
    assert_eq!(err.code(), "ERR_KEY_MISMATCH", "{err}");
    let served = async_std::future::timeout(WAIT, ended.next())
        .await
        .expect("the sharing side ends too")
        .expect("a served peer");
    let err = served.result.expect_err("keys differ");
    assert_eq!(err.code(), "ERR_KEY_MISMATCH", "{err}");
    assert_eq!(alice.feeds().len(), 1);
    assert_eq!(bob.feeds().len(), 1);
}

#[async_std::test]
async fn a_dead_ticket_is_a_connect_error() {
    let gone = Node::bind(Config::local()).await.expect("bind");
    let ticket = gone.ticket();
    gone.close().await;
    let bob = store("bob", 1).await;
    let patience = Duration::from_secs(2);
    let dialing = Node::bind(Config::local().connect_timeout(patience))
        .await
        .expect("bind");
    let err = async_std::future::timeout(
        WAIT,
        dialing.replicate(&bob, &ticket, ReplicateOptions::new(true)),
    )
    .await
    .expect("gives up in time")
    .expect_err("nobody answers");
    assert_eq!(err.code(), "ERR_CONNECT", "{err}");
    assert_eq!(bob.feeds().len(), 1);
}

#[async_std::test]
async fn peers_past_the_bound_are_refused_until_one_leaves() {
    let alice = store("alice", 2).await;
    let config = Config::local().max_peers(1);
    let (shared, mut ended) =
        sharing_with(&alice, ReplicateOptions::new(false).live(true), config).await;
    let ticket = shared.ticket();
    // The first peer stays, live, and holds alice's feed.
    let first = store("first", 1).await;
    let first_node = Node::bind(Config::local()).await.expect("bind");
    let live = {
        let (node, first, ticket) = (first_node.clone(), first.clone(), ticket.clone());
        async_std::task::spawn(async move {
            node.replicate(&first, &ticket, ReplicateOptions::new(true).live(true))
                .await
        })
    };
    let mut events = first.events();
    let key = *alice.writer("alice").await.expect("writer").key();
    async_std::future::timeout(WAIT, async {
        while first.feed(key).ok().flatten().is_none() {
            if events.next().await.is_none() {
                break;
            }
        }
    })
    .await
    .expect("the first peer connects and learns alice's feed");
    // A second peer is refused while the first is served.
    let second = store("second", 1).await;
    let patience = Duration::from_secs(5);
    let second_node = Node::bind(Config::local().connect_timeout(patience))
        .await
        .expect("bind");
    let err = async_std::future::timeout(
        WAIT,
        second_node.replicate(&second, &ticket, ReplicateOptions::new(true)),
    )
    .await
    .expect("refused in time")
    .expect_err("past the bound");
    assert_eq!(err.code(), "ERR_CONNECT", "{err}");
    // Once the first leaves, the second is served.
    first_node.close().await;
    let _ = async_std::future::timeout(WAIT, live)
        .await
        .expect("the live sync ends");
    async_std::future::timeout(WAIT, ended.next())
        .await
        .expect("the sharing side hears the first peer leave")
        .expect("a served peer");
    let summary = async_std::future::timeout(
        WAIT,
        second_node.replicate(&second, &ticket, ReplicateOptions::new(true)),
    )
    .await
    .expect("ends in time")
    .expect("served now");
    // Alice's two entries, and the first peer's one, which alice holds now.
    assert_eq!(summary.blocks_received, 3);
    shared.close().await;
}
