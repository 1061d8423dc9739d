//! Removing feeds and denying keys, over the facade only: tombstones and deny marks hold
//! against peers that keep offering the feeds, on disk, across reopens.

use futures::StreamExt;
use multifeed::{Error, Event, FeedKey, Multifeed, ReplicateOptions, ReplicateSummary};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn sync(
    a: &Multifeed,
    b: &Multifeed,
) -> Result<(ReplicateSummary, ReplicateSummary), Box<dyn std::error::Error>> {
    let (left, right) = async_std::os::unix::net::UnixStream::pair()?;
    let bound = std::time::Duration::from_secs(30);
    let (ra, rb) = async_std::future::timeout(bound, async {
        futures::join!(
            a.replicate(left, ReplicateOptions::new(true)),
            b.replicate(right, ReplicateOptions::new(false)),
        )
    })
    .await
    .map_err(|_| "timed out after 30 s waiting for a sync")?;
    Ok((ra?, rb?))
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

fn feed_dir(root: &std::path::Path, key: &FeedKey) -> std::path::PathBuf {
    root.join(multifeed::namespace_for(key))
}

/// A peer with a feed `spam` (3 entries) and a feed `good` (1 entry).
async fn peer() -> Result<(Multifeed, FeedKey, FeedKey), Error> {
    let peer = Multifeed::open_memory().await?;
    let spam = peer.writer("spam").await?;
    spam.append_batch([b"buy".as_slice(), b"now", b"!"]).await?;
    let good = peer.writer("good").await?;
    good.append(b"hello").await?;
    Ok((peer, *spam.key(), *good.key()))
}

#[async_std::test]
async fn a_removed_feed_stays_gone_while_a_peer_keeps_offering_it_across_reopens() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (peer, spam, good) = peer().await?;
    {
        let a = Multifeed::open_disk(dir.path()).await?;
        sync(&a, &peer).await?;
        assert_eq!(a.feed(spam)?.ok_or("spam arrived")?.len().await?, 3);
        let saved = tempfile::tempdir()?;
        copy_dir(&feed_dir(dir.path(), &spam), saved.path())?;
        let mut events = a.events();
        a.remove_feed(&spam).await?;
        assert!(matches!(events.next().await, Some(Event::FeedRemoved { key }) if key == spam));
        assert!(a.feed(spam)?.is_none(), "no longer listed");
        assert!(
            !feed_dir(dir.path(), &spam).exists(),
            "its files are deleted"
        );
        assert_eq!(a.removed(), vec![spam]);
        // The peer offers it again: it is not requested, nor re-created.
        peer.writer("good").await?.append(b"again").await?;
        let (got, _) = sync(&a, &peer).await?;
        assert_eq!(got.blocks_received, 1, "only the other feed's new entry");
        assert!(a.feed(spam)?.is_none());
        assert!(!feed_dir(dir.path(), &spam).exists());
        a.close().await?;
        // Its files come back behind the store's back (as if a kill had cut the removal
        // short, or a replication had still written them): the next open deletes them.
        copy_dir(saved.path(), &feed_dir(dir.path(), &spam))?;
    }
    let a = Multifeed::open_disk(dir.path()).await?;
    assert!(a.feed(spam)?.is_none(), "the tombstone survives a reopen");
    assert!(
        a.index_recovery().restored.is_empty(),
        "its folder is not listed again"
    );
    assert!(
        !feed_dir(dir.path(), &spam).exists(),
        "leftover files are deleted"
    );
    assert!(a.is_denied(&spam));
    sync(&a, &peer).await?;
    assert!(a.feed(spam)?.is_none(), "still not taken from the peer");
    assert_eq!(a.feed(good)?.ok_or("good")?.len().await?, 2);
    // Allowed again, it comes back.
    a.allow(&spam).await?;
    sync(&a, &peer).await?;
    assert_eq!(a.feed(spam)?.ok_or("spam is back")?.len().await?, 3);
    a.close().await?;
    Ok(())
}

#[async_std::test]
async fn a_denied_key_is_never_requested_nor_offered_across_reopens() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (peer, spam, good) = peer().await?;
    {
        let a = Multifeed::open_disk(dir.path()).await?;
        a.deny(&spam).await?;
        sync(&a, &peer).await?;
        assert!(a.feed(spam)?.is_none(), "a denied feed is not requested");
        assert!(a.feed(good)?.is_some());
        assert!(matches!(
            a.add_remote_feed(&spam).await,
            Err(Error::Denied { .. })
        ));
        a.close().await?;
    }
    let a = Multifeed::open_disk(dir.path()).await?;
    assert_eq!(a.denied(), vec![spam], "the deny survives a reopen");
    sync(&a, &peer).await?;
    assert!(a.feed(spam)?.is_none());
    // A feed we hold and then deny stays readable here but is no longer offered.
    a.deny(&good).await?;
    let fresh = Multifeed::open_memory().await?;
    sync(&a, &fresh).await?;
    assert!(fresh.feed(good)?.is_none(), "a denied feed is not offered");
    assert_eq!(
        a.feed(good)?.ok_or("still here")?.get(0).await?,
        Some(b"hello".to_vec())
    );
    a.close().await?;
    Ok(())
}

#[async_std::test]
async fn removing_ones_own_writer_takes_remove_writer_and_frees_its_name() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a = Multifeed::open_disk(dir.path()).await?;
    let me = a.writer("me").await?;
    me.append(b"mine").await?;
    let old = *me.key();
    assert!(matches!(
        a.remove_feed(&old).await,
        Err(Error::LocalWriter { .. })
    ));
    assert_eq!(
        me.get(0).await?,
        Some(b"mine".to_vec()),
        "refused: nothing removed"
    );
    a.remove_writer(&old).await?;
    assert!(
        matches!(me.get(0).await, Err(Error::Closed)),
        "old handles are closed"
    );
    let new = a.writer("me").await?;
    assert_ne!(*new.key(), old, "the name is free: a new writer");
    assert!(new.is_empty().await?);
    a.close().await?;
    let a = Multifeed::open_disk(dir.path()).await?;
    assert!(a.feed(old)?.is_none());
    assert_eq!(a.writer("me").await?.key(), new.key());
    a.close().await?;
    Ok(())
}

#[async_std::test]
async fn every_error_names_a_stable_code() -> TestResult {
    let a = Multifeed::open_memory().await?;
    let me = a.writer("me").await?;
    let refused = a.remove_feed(me.key()).await.expect_err("a local writer");
    assert_eq!(refused.code(), "ERR_LOCAL_WRITER");
    match &refused {
        // Keys are keys, shown as hex.
        Error::LocalWriter { key } => {
            assert_eq!(key, me.key());
            assert!(refused.to_string().contains(&me.key_hex()));
        }
        other => return Err(format!("expected LocalWriter, got {other:?}").into()),
    }
    let b = Multifeed::open_memory().await?;
    let (left, right) = async_std::os::unix::net::UnixStream::pair()?;
    let (ra, _) = futures::join!(
        a.replicate(left, ReplicateOptions::new(true).encryption_key([1; 32])),
        b.replicate(right, ReplicateOptions::new(false).encryption_key([2; 32])),
    );
    assert_eq!(ra.expect_err("another key").code(), "ERR_KEY_MISMATCH");
    a.close().await?;
    assert_eq!(me.len().await.expect_err("closed").code(), "ERR_CLOSED");
    Ok(())
}
