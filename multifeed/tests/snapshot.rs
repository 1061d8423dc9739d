//! The lengths snapshot of a clean close: a store reopened lists its feeds without opening
//! them, and a feed whose files changed since is opened (and found damaged or lost) as before.

use std::time::{Duration, Instant};

use multifeed::{FeedKey, Multifeed, ReplicateOptions, ReplicateSummary};

type TestResult = Result<(), Box<dyn std::error::Error>>;
const BOUND: Duration = Duration::from_secs(60);

async fn sync_ok(
    a: &Multifeed,
    b: &Multifeed,
) -> Result<(ReplicateSummary, ReplicateSummary), Box<dyn std::error::Error>> {
    let (left, right) = async_std::os::unix::net::UnixStream::pair()?;
    let (ra, rb) = async_std::future::timeout(BOUND, async {
        futures::join!(
            a.replicate(left, ReplicateOptions::new(true)),
            b.replicate(right, ReplicateOptions::new(false))
        )
    })
    .await
    .map_err(|_| format!("timed out after {BOUND:?} waiting for both sides of a replication"))?;
    Ok((ra?, rb?))
}

fn feed_dir(root: &std::path::Path, key: &FeedKey) -> std::path::PathBuf {
    root.join(multifeed::namespace_for(key))
}

/// The newest change time (`ctime`) of any file under `dir`, in nanoseconds.
fn newest_change(dir: &std::path::Path) -> std::io::Result<i128> {
    use std::os::unix::fs::MetadataExt;
    let mut newest = i128::MIN;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            newest = newest.max(newest_change(&entry.path())?);
        } else {
            newest = newest
                .max(i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()));
        }
    }
    Ok(newest)
}

/// Waits (bounded) until the file system's clock has moved past every change under `dir`, so a
/// snapshot written now is not "racily clean" for them (written within the same clock tick,
/// which the snapshot rightly does not trust).
fn wait_for_fs_clock_past(dir: &std::path::Path) -> TestResult {
    use std::os::unix::fs::MetadataExt;
    let newest = newest_change(dir)?;
    let probe = dir.join("clock-probe");
    let start = Instant::now();
    loop {
        std::fs::write(&probe, b"tick")?;
        let meta = std::fs::metadata(&probe)?;
        let now = i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec());
        std::fs::remove_file(&probe)?;
        if now > newest {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err("the file system's clock did not move within 10 s".into());
        }
        std::thread::yield_now();
    }
}

/// A disk store with `n` writers of two entries each, all synced to `peer`; closed cleanly.
async fn store_of(
    dir: &std::path::Path,
    n: usize,
    peer: &Multifeed,
) -> Result<Vec<FeedKey>, Box<dyn std::error::Error>> {
    let a = Multifeed::open_disk(dir).await?;
    let mut keys = Vec::new();
    for i in 0..n {
        let feed = a.writer(&format!("w{i}")).await?;
        feed.append_batch([b"one".as_slice(), b"two"]).await?;
        keys.push(*feed.key());
    }
    sync_ok(&a, peer).await?;
    a.flush().await?;
    wait_for_fs_clock_past(dir)?;
    a.close().await?;
    Ok(keys)
}

#[async_std::test]
async fn a_store_reopened_after_a_clean_close_syncs_an_equal_peer_without_opening_a_feed(
) -> TestResult {
    let dir = tempfile::tempdir()?;
    let b = Multifeed::open_memory().await?;
    let keys = store_of(dir.path(), 20, &b).await?;
    let a = Multifeed::open_disk(dir.path()).await?;
    let (sa, sb) = sync_ok(&a, &b).await?;
    assert_eq!((sa.blocks_received, sb.blocks_received), (0, 0));
    // Was: every feed's hypercore opened to learn its lengths (all 20 open here).
    assert_eq!(a.open_feeds(), 0, "no core opened to list the feeds");
    // The lengths listed are the feeds' own: reading opens them and agrees.
    for key in &keys {
        let feed = a.feed(key)?.ok_or("feed")?;
        assert_eq!(feed.len().await?, 2);
        assert_eq!(feed.get(1).await?, Some(b"two".to_vec()));
    }
    // Appends after a reopen from a snapshot: signed on from the right length.
    let writer = a.writer("w0").await?;
    writer.append(b"three").await?;
    let (_, sb) = sync_ok(&a, &b).await?;
    assert_eq!(sb.blocks_received, 1);
    assert_eq!(b.feed(keys[0])?.ok_or("on b")?.len().await?, 3);
    a.close().await?;
    Ok(())
}

#[async_std::test]
async fn a_feed_deleted_after_a_clean_close_is_not_listed_from_the_snapshot() -> TestResult {
    let dir = tempfile::tempdir()?;
    let b = Multifeed::open_memory().await?;
    let keys = store_of(dir.path(), 3, &b).await?;
    // Every file of one feed is deleted behind the store's back, after the snapshot.
    for file in ["tree", "data", "bitfield", "oplog"] {
        std::fs::remove_file(feed_dir(dir.path(), &keys[1]).join(file))?;
    }
    let a = Multifeed::open_disk(dir.path()).await?;
    // Trusting the snapshot, the store would claim both entries and the peer would send none.
    let (sa, _) = sync_ok(&a, &b).await?;
    assert_eq!(
        sa.blocks_received, 2,
        "the lost feed came back from the peer"
    );
    assert_eq!(
        a.feed(keys[1])?.ok_or("feed")?.get(1).await?,
        Some(b"two".to_vec())
    );
    assert_eq!(a.open_feeds(), 1, "only the changed feed was opened");
    a.close().await?;
    Ok(())
}

#[async_std::test]
async fn a_feed_put_back_from_an_older_copy_after_a_clean_close_is_filled_again() -> TestResult {
    let b = Multifeed::open_memory().await?;
    let writer = b.writer("bw").await?;
    writer.append(b"one").await?;
    let key = *writer.key();
    let dir = tempfile::tempdir()?;
    let backup = tempfile::tempdir()?;
    let c = Multifeed::open_disk(dir.path()).await?;
    sync_ok(&c, &b).await?;
    c.close().await?;
    for file in ["tree", "data", "bitfield", "oplog"] {
        std::fs::copy(
            feed_dir(dir.path(), &key).join(file),
            backup.path().join(file),
        )?;
    }
    writer.append(b"two").await?;
    let c = Multifeed::open_disk(dir.path()).await?;
    sync_ok(&c, &b).await?;
    wait_for_fs_clock_past(dir.path())?;
    c.close().await?;
    // The replica's files are put back as they were at one entry (a backup restored): the
    // snapshot says two.
    for file in ["tree", "data", "bitfield", "oplog"] {
        std::fs::copy(
            backup.path().join(file),
            feed_dir(dir.path(), &key).join(file),
        )?;
    }
    let c = Multifeed::open_disk(dir.path()).await?;
    let (sc, _) = sync_ok(&c, &b).await?;
    assert_eq!(
        sc.blocks_received, 1,
        "the entry the old copy lacks came again"
    );
    assert_eq!(
        c.feed(key)?.ok_or("feed")?.get(1).await?,
        Some(b"two".to_vec())
    );
    c.close().await?;
    Ok(())
}

#[async_std::test]
async fn a_snapshot_is_used_once_and_a_session_that_ends_unclean_leaves_none() -> TestResult {
    let dir = tempfile::tempdir()?;
    let b = Multifeed::open_memory().await?;
    let keys = store_of(dir.path(), 2, &b).await?;
    {
        let a = Multifeed::open_disk(dir.path()).await?;
        a.writer("w1").await?.append(b"three").await?;
        // Dropped without close: no new snapshot, and the old one was used up.
    }
    assert_eq!(std::fs::metadata(dir.path().join("lengths"))?.len(), 0);
    let a = Multifeed::open_disk(dir.path()).await?;
    let (_, sb) = sync_ok(&a, &b).await?;
    assert_eq!(
        sb.blocks_received, 1,
        "the append after the snapshot is offered"
    );
    assert_eq!(b.feed(keys[1])?.ok_or("on b")?.len().await?, 3);
    assert_eq!(b.feed(keys[0])?.ok_or("on b")?.len().await?, 2);
    a.close().await?;
    Ok(())
}

#[async_std::test]
async fn a_session_that_does_not_replicate_carries_the_snapshot_on() -> TestResult {
    let dir = tempfile::tempdir()?;
    let b = Multifeed::open_memory().await?;
    let keys = store_of(dir.path(), 20, &b).await?;
    {
        // Opened, one feed appended to, closed: no listing checked the snapshot.
        let a = Multifeed::open_disk(dir.path()).await?;
        a.writer("w0").await?.append(b"three").await?;
        // Writes the disk store holds back reach the files now, not at close.
        a.flush().await?;
        wait_for_fs_clock_past(dir.path())?;
        a.close().await?;
    }
    let a = Multifeed::open_disk(dir.path()).await?;
    let (_, sb) = sync_ok(&a, &b).await?;
    assert_eq!(sb.blocks_received, 1, "the append reached the peer");
    // Only the appended feed opened, to serve its new entry. Was: the 19 feeds the session
    // did not open were left out of its snapshot, and opened to be listed.
    assert_eq!(a.open_feeds(), 1, "no core opened to list the feeds");
    assert_eq!(b.feed(keys[0])?.ok_or("on b")?.len().await?, 3);
    a.close().await?;
    Ok(())
}

#[async_std::test]
async fn feeds_created_here_and_closed_to_free_memory_are_in_the_snapshot_too() -> TestResult {
    let b = Multifeed::open_memory().await?;
    for i in 0..10 {
        b.writer(&format!("w{i}")).await?.append(b"one").await?;
    }
    let dir = tempfile::tempdir()?;
    {
        // A replica with at most 2 cores open: the 10 feeds it learns are created open and
        // 8 of them closed to free memory, never to be opened again in this session.
        let c = Multifeed::builder()
            .disk(dir.path())
            .max_open_feeds(2)
            .open()
            .await?;
        sync_ok(&c, &b).await?;
        c.flush().await?;
        wait_for_fs_clock_past(dir.path())?;
        c.close().await?;
    }
    let c = Multifeed::open_disk(dir.path()).await?;
    let (sc, sb) = sync_ok(&c, &b).await?;
    assert_eq!((sc.blocks_received, sb.blocks_received), (0, 0));
    // Was: only the 2 open at close were recorded; the other 8 opened to be listed.
    assert_eq!(c.open_feeds(), 0, "no core opened to list the feeds");
    c.close().await?;
    Ok(())
}
