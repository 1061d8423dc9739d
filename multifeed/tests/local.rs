//! The local multifeed: writers, feeds, encodings, close, persistence and crash safety.

use std::sync::Arc;

use futures::StreamExt;
use multifeed::{Error, Event, FeedOrigin, MemoryFactory, Multifeed, Value, ValueEncoding};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// One non-live replication of `a` (initiator) with `b` over a socket pair; both summaries.
async fn sync_pair(
    a: &Multifeed,
    b: &Multifeed,
) -> Result<(multifeed::ReplicateSummary, multifeed::ReplicateSummary), Box<dyn std::error::Error>>
{
    let (left, right) = async_std::os::unix::net::UnixStream::pair()?;
    let (ra, rb) = futures::join!(
        a.replicate(left, multifeed::ReplicateOptions::new(true)),
        b.replicate(right, multifeed::ReplicateOptions::new(false)),
    );
    Ok((ra?, rb?))
}

async fn memory_multifeed(factory: &MemoryFactory) -> Result<Multifeed, Error> {
    Multifeed::builder().storage(factory.clone()).open().await
}

#[async_std::test]
async fn starts_with_no_feeds() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    assert!(multi.feeds().is_empty());
    assert!(multi.index_recovery().is_clean());
    Ok(())
}

#[async_std::test]
async fn writer_creates_a_writable_feed_once_per_name() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let a = multi.writer("a").await?;
    assert!(a.is_writable());
    assert_eq!(a.name(), Some("a"));
    assert_eq!(a.origin(), FeedOrigin::Local);
    assert_eq!(a.len().await?, 0);
    assert_eq!(a.append(b"one").await?, 0);
    assert_eq!(a.append_batch([b"two".as_slice(), b"three"]).await?, 1..3);
    assert_eq!(a.len().await?, 3);
    assert_eq!(a.get(2).await?, Some(b"three".to_vec()));
    assert_eq!(a.get(3).await?, None);

    let again = multi.writer("a").await?;
    assert_eq!(again.key(), a.key());
    let b = multi.writer("b").await?;
    assert_ne!(b.key(), a.key());
    let keys: Vec<_> = multi.feeds().iter().map(|f| *f.key()).collect();
    assert_eq!(keys, vec![*a.key(), *b.key()]);
    Ok(())
}

#[async_std::test]
async fn anonymous_writers_are_new_feeds_each_time() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let one = multi.anonymous_writer().await?;
    let two = multi.anonymous_writer().await?;
    assert_ne!(one.key(), two.key());
    assert_eq!(one.name(), None);
    assert_eq!(multi.feeds().len(), 2);
    Ok(())
}

#[async_std::test]
async fn finds_feeds_by_key_and_hex_and_rejects_bad_input() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let a = multi.writer("a").await?;
    assert_eq!(multi.feed(a.key())?.map(|f| *f.key()), Some(*a.key()));
    assert_eq!(multi.feed(a.key_hex())?.map(|f| *f.key()), Some(*a.key()));
    assert_eq!(
        multi.feed(a.key_hex().to_uppercase())?.map(|f| *f.key()),
        Some(*a.key())
    );
    assert!(multi.feed([7u8; 32])?.is_none());
    let bad_hex = "zz".repeat(32);
    assert!(matches!(
        multi.feed(&bad_hex),
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(multi.feed("abc"), Err(Error::InvalidKey { .. })));
    assert!(matches!(multi.feed(""), Err(Error::InvalidKey { .. })));
    Ok(())
}

#[async_std::test]
async fn custom_key_pair_gives_that_key() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let signing_key = hypercore::generate_signing_key();
    let public = signing_key.verifying_key().to_bytes();
    let feed = multi
        .writer_with_keypair("mine", signing_key.clone())
        .await?;
    assert_eq!(feed.key(), &public);
    feed.append(b"signed by me").await?;
    // Same name and key again: the same feed. Another key under the same name: an error.
    assert_eq!(
        multi.writer_with_keypair("mine", signing_key).await?.key(),
        &public
    );
    let other = hypercore::generate_signing_key();
    assert!(matches!(
        multi.writer_with_keypair("mine", other).await,
        Err(Error::AlreadyExists { .. })
    ));
    Ok(())
}

#[async_std::test]
async fn concurrent_writer_calls_create_one_feed() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let calls = (0..16).map(|_| {
        let multi = multi.clone();
        async_std::task::spawn(async move { multi.writer("shared").await })
    });
    let feeds = futures::future::join_all(calls).await;
    let first = *feeds[0].as_ref().map_err(|e| e.to_string())?.key();
    for feed in &feeds {
        assert_eq!(feed.as_ref().map_err(|e| e.to_string())?.key(), &first);
    }
    assert_eq!(multi.feeds().len(), 1);
    Ok(())
}

#[async_std::test]
async fn remote_feeds_are_read_only() -> TestResult {
    let source = Multifeed::open_memory().await?;
    let key = *source.writer("a").await?.key();
    let multi = Multifeed::open_memory().await?;
    let remote = multi.add_remote_feed(&key).await?;
    assert!(!remote.is_writable());
    assert_eq!(remote.origin(), FeedOrigin::Remote);
    assert!(matches!(
        remote.append(b"nope").await,
        Err(Error::NotWritable { .. })
    ));
    assert_eq!(remote.len().await?, 0);
    assert_eq!(multi.add_remote_feed(&key).await?.key(), &key);
    assert_eq!(multi.feeds().len(), 1);
    Ok(())
}

#[async_std::test]
async fn value_encodings_round_trip_and_reject_mismatches() -> TestResult {
    let json = Multifeed::builder()
        .value_encoding(ValueEncoding::Json)
        .open()
        .await?;
    let feed = json.writer("j").await?;
    feed.append_json(&serde_json::json!({"n": 1, "msg": "hi"}))
        .await?;
    let back: serde_json::Value = feed.get_json(0).await?.ok_or("entry 0 missing")?;
    assert_eq!(back["msg"], "hi");
    assert!(matches!(
        feed.append_value("text").await,
        Err(Error::EncodingMismatch { .. })
    ));
    feed.append(b"{not json").await?;
    assert!(matches!(feed.get_value(1).await, Err(Error::Decode { .. })));

    let text = Multifeed::builder()
        .value_encoding(ValueEncoding::Utf8)
        .open()
        .await?;
    let feed = text.writer("t").await?;
    feed.append_value("héllo").await?;
    assert_eq!(feed.get_value(0).await?, Some(Value::Text("héllo".into())));
    feed.append(&[0xff, 0xfe]).await?;
    assert!(matches!(feed.get_value(1).await, Err(Error::Decode { .. })));

    let binary = Multifeed::open_memory().await?;
    let feed = binary.writer("b").await?;
    feed.append_value(vec![0u8, 1, 2]).await?;
    assert_eq!(feed.get_value(0).await?, Some(Value::Binary(vec![0, 1, 2])));
    Ok(())
}

#[async_std::test]
async fn events_report_every_new_feed() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let mut events = multi.events();
    let a = multi.writer("a").await?;
    let anon = multi.anonymous_writer().await?;
    match next_event(&mut events).await? {
        Some(Event::Feed { key, name, origin }) => {
            assert_eq!(&key, a.key());
            assert_eq!(name.as_deref(), Some("a"));
            assert_eq!(origin, FeedOrigin::Local);
        }
        other => return Err(format!("expected a Feed event, got {other:?}").into()),
    }
    match next_event(&mut events).await? {
        Some(Event::Feed {
            key, name: None, ..
        }) => assert_eq!(&key, anon.key()),
        other => return Err(format!("expected a Feed event, got {other:?}").into()),
    }
    multi.close().await?;
    assert_eq!(next_event(&mut events).await?, None, "stream ends on close");
    Ok(())
}

async fn next_event(events: &mut multifeed::Events) -> Result<Option<Event>, &'static str> {
    async_std::future::timeout(std::time::Duration::from_secs(10), events.next())
        .await
        .map_err(|_| "timed out waiting for an event")
}

#[async_std::test]
async fn close_twice_concurrently_and_use_after_close() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let feed = multi.writer("a").await?;
    feed.append(b"x").await?;
    assert!(!multi.is_closed());
    let other = multi.clone();
    let (one, two) = futures::join!(multi.close(), other.close());
    one?;
    two?;
    multi.close().await?;
    assert!(multi.is_closed());
    assert!(matches!(multi.writer("a").await, Err(Error::Closed)));
    assert!(matches!(multi.writer("new").await, Err(Error::Closed)));
    assert!(matches!(multi.anonymous_writer().await, Err(Error::Closed)));
    assert!(matches!(feed.append(b"y").await, Err(Error::Closed)));
    assert!(matches!(feed.get(0).await, Err(Error::Closed)));
    assert!(matches!(feed.len().await, Err(Error::Closed)));
    Ok(())
}

#[async_std::test]
async fn names_keys_and_entries_survive_reopen_on_disk() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a_key, b_key, anon_key) = {
        let multi = Multifeed::open_disk(dir.path()).await?;
        let a = multi.writer("a").await?;
        a.append_batch([b"a0".as_slice(), b"a1"]).await?;
        let b = multi.writer("b").await?;
        b.append(b"b0").await?;
        let anon = multi.anonymous_writer().await?;
        multi.close().await?;
        (*a.key(), *b.key(), *anon.key())
    };
    let multi = Multifeed::open_disk(dir.path()).await?;
    let keys: Vec<_> = multi.feeds().iter().map(|f| *f.key()).collect();
    assert_eq!(keys, vec![a_key, b_key, anon_key]);
    let a = multi.writer("a").await?;
    assert_eq!(a.key(), &a_key);
    assert_eq!(a.get(1).await?, Some(b"a1".to_vec()));
    assert_eq!(a.append(b"a2").await?, 2, "still writable after reopen");
    assert_eq!(multi.writer("b").await?.get(0).await?, Some(b"b0".to_vec()));
    assert_eq!(multi.feeds().len(), 3);
    Ok(())
}

#[async_std::test]
async fn the_shared_secret_never_lands_in_storage() -> TestResult {
    let secret = [0x5au8; 32];
    let factory = MemoryFactory::new();
    let dir = tempfile::tempdir()?;
    for multi in [
        Multifeed::builder()
            .storage(factory.clone())
            .encryption_key(secret)
            .open()
            .await?,
        Multifeed::builder()
            .disk(dir.path())
            .encryption_key(secret)
            .open()
            .await?,
    ] {
        let feed = multi.writer("a").await?;
        feed.append_batch((0..100u32).map(|i| i.to_le_bytes()))
            .await?;
        multi.add_remote_feed(&[9; 32]).await.ok();
        multi.close().await?;
    }
    let contains = |haystack: &[u8]| haystack.windows(32).any(|w| w == secret);
    for path in factory.paths() {
        let bytes = factory
            .file(&path)
            .ok_or("listed file vanished")?
            .snapshot();
        assert!(!contains(&bytes), "secret found in memory file {path}");
    }
    let mut checked = 0;
    for entry in walk(dir.path())? {
        assert!(
            !contains(&std::fs::read(&entry)?),
            "secret found in {entry:?}"
        );
        checked += 1;
    }
    assert!(
        checked >= 5,
        "expected the index and feed files, found {checked}"
    );
    Ok(())
}

fn walk(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// Builds a root with three named writers and returns the index bytes and where the last record starts.
async fn three_writer_index(
    factory: &MemoryFactory,
) -> Result<(Vec<u8>, usize), Box<dyn std::error::Error>> {
    let multi = memory_multifeed(factory).await?;
    multi.writer("first").await?.append(b"1").await?;
    multi.writer("second").await?.append(b"2").await?;
    let index = factory.file("index").ok_or("no index file")?;
    let before_last = index.snapshot().len();
    multi.writer("third").await?.append(b"3").await?;
    multi.close().await?;
    Ok((index.snapshot(), before_last))
}

#[async_std::test]
async fn index_survives_truncation_or_corruption_at_every_byte_of_its_last_record() -> TestResult {
    let factory = MemoryFactory::new();
    let (full, last_start) = three_writer_index(&factory).await?;
    let reference = memory_multifeed(&factory).await?;
    let expected: Vec<_> = reference
        .feeds()
        .iter()
        .take(2)
        .map(|f| (*f.key(), f.name().map(str::to_owned)))
        .collect();
    let third_key = *reference.feeds()[2].key();
    reference.close().await?;
    let index = factory.file("index").ok_or("no index file")?;
    let mut damaged_variants = Vec::new();
    for cut in last_start..full.len() {
        damaged_variants.push(full[..cut].to_vec());
    }
    for at in last_start..full.len() {
        let mut bytes = full.clone();
        bytes[at] ^= 0x41;
        damaged_variants.push(bytes);
    }
    for bytes in damaged_variants {
        index.replace(bytes.clone());
        let multi = memory_multifeed(&factory).await?;
        let got: Vec<_> = multi
            .feeds()
            .iter()
            .take(2)
            .map(|f| (*f.key(), f.name().map(str::to_owned)))
            .collect();
        assert_eq!(got, expected, "damaged index of {} bytes", bytes.len());
        // The damaged record's feed is found by its folder and listed again: still ours and
        // writable, only its name is lost (was: dropped, its secret key orphaned).
        assert_eq!(multi.feeds().len(), 3, "the third feed is restored");
        assert_eq!(multi.index_recovery().restored.len(), 1);
        let third = &multi.feeds()[2];
        assert_eq!(third.key(), &third_key);
        assert_eq!(third.name(), None);
        assert!(third.is_writable());
        for (i, feed) in multi.feeds().iter().enumerate() {
            assert_eq!(feed.get(0).await?, Some(vec![b'1' + i as u8]));
        }
        // The next writer lands cleanly after the good records.
        multi.writer("after").await?;
        multi.close().await?;
        let reopened = memory_multifeed(&factory).await?;
        assert_eq!(reopened.feeds().len(), 4);
        assert!(reopened.index_recovery().is_clean());
        for (i, feed) in reopened.feeds().iter().take(3).enumerate() {
            assert_eq!(feed.get(0).await?, Some(vec![b'1' + i as u8]));
        }
        // The "after" feed's folder goes again, for the next variant of the index.
        let after = hex::encode(reopened.writer("after").await?.key());
        reopened.close().await?;
        let folder = format!("feeds/{}/{}/", &after[..2], after);
        for path in factory.paths() {
            if path.starts_with(&folder) {
                factory.remove(&path);
            }
        }
    }
    Ok(())
}

#[async_std::test]
async fn a_missing_or_corrupt_namespace_names_the_feed_and_hides_no_other() -> TestResult {
    let factory = MemoryFactory::new();
    let multi = memory_multifeed(&factory).await?;
    let keys: Vec<_> = futures::future::try_join_all(["a", "b", "c"].map(|name| {
        let multi = multi.clone();
        async move {
            let feed = multi.writer(name).await?;
            feed.append(name.as_bytes()).await?;
            Ok::<_, Error>(*feed.key())
        }
    }))
    .await?;
    multi.close().await?;

    let ns = |key: &[u8; 32]| multifeed_storage::namespace_for(key);
    factory.remove(&format!("{}/oplog", ns(&keys[0])));
    let oplog_b = factory
        .file(&format!("{}/oplog", ns(&keys[1])))
        .ok_or("no oplog for b")?;
    oplog_b.replace(vec![0xAB; oplog_b.snapshot().len()]);

    let multi = memory_multifeed(&factory).await?;
    let mut events = multi.events();
    assert_eq!(multi.feeds().len(), 3, "every listed feed is still listed");
    // Was: FeedMissing and FeedCorrupt errors on every use. Now each is started again under
    // its key (read-only: the secret key was in the lost oplog), to be filled by peers.
    let a = multi.feed(keys[0])?.ok_or("a not listed")?;
    assert_eq!(a.len().await?, 0);
    let b = multi.feed(keys[1])?.ok_or("b not listed")?;
    assert_eq!(b.get(0).await?, None);
    for (feed, why) in [(&a, "is missing"), (&b, "corrupt")] {
        match events.next().await {
            Some(Event::FeedRestored {
                key,
                reason,
                writable: false,
                signed_length: None,
            }) => {
                assert_eq!(&key, feed.key());
                assert!(reason.contains(why), "{reason}");
                assert!(
                    reason.contains(&feed.key_hex()),
                    "the reason names the feed"
                );
            }
            other => return Err(format!("expected FeedRestored, got {other:?}").into()),
        }
        assert!(!feed.is_writable());
    }
    let c = multi.feed(keys[2])?.ok_or("c not listed")?;
    assert_eq!(c.get(0).await?, Some(b"c".to_vec()));
    Ok(())
}

#[async_std::test]
async fn custom_storage_from_a_closure() -> TestResult {
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = opened.clone();
    let factory = multifeed::FnFactory::new(move |_path: &str| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async {
            Ok(
                Box::new(random_access_memory::RandomAccessMemory::new(4096))
                    as multifeed_storage::BoxedStore,
            )
        })
    });
    let multi = Multifeed::builder().storage(factory).open().await?;
    let feed = multi.writer("a").await?;
    feed.append(b"custom").await?;
    assert_eq!(feed.get(0).await?, Some(b"custom".to_vec()));
    assert_eq!(
        opened.load(std::sync::atomic::Ordering::SeqCst),
        5,
        "index + 4 feed files"
    );
    Ok(())
}

#[async_std::test]
async fn an_unreadable_replica_is_reset_and_reported_but_a_local_feed_never_is() -> TestResult {
    let author = Multifeed::open_memory().await?;
    let key = *author.writer("a").await?.key();
    let factory = MemoryFactory::new();
    let multi = memory_multifeed(&factory).await?;
    multi.add_remote_feed(&key).await?;
    multi.close().await?;
    let oplog = factory
        .file(&format!("{}/oplog", multifeed_storage::namespace_for(&key)))
        .ok_or("no oplog")?;
    oplog.replace(vec![0xEE; 300]);

    let multi = memory_multifeed(&factory).await?;
    let mut events = multi.events();
    let replica = multi.feed(key)?.ok_or("replica listed")?;
    assert_eq!(replica.len().await?, 0, "the replica starts again, empty");
    assert_eq!(replica.key(), &key);
    match next_event(&mut events).await? {
        Some(Event::FeedReset { key: k, .. }) => assert_eq!(k, key),
        other => return Err(format!("expected FeedReset, got {other:?}").into()),
    }
    Ok(())
}

#[async_std::test]
async fn a_disk_root_is_open_in_one_place_at_a_time() -> TestResult {
    let dir = tempfile::tempdir()?;
    let first = Multifeed::open_disk(dir.path()).await?;
    first.writer("me").await?.append(b"hello").await?;
    // Two writers on the same files would lose data: the second open is refused.
    match Multifeed::open_disk(dir.path()).await {
        Err(Error::Locked { path }) => assert_eq!(path, dir.path()),
        other => return Err(format!("expected Locked, got {other:?}").into()),
    }
    first.close().await?;
    let second = Multifeed::open_disk(dir.path()).await?;
    assert_eq!(second.writer("me").await?.len().await?, 1);
    // Dropping the last handle releases the lock too.
    drop(second);
    let third = Multifeed::open_disk(dir.path()).await?;
    third.close().await?;
    Ok(())
}

#[async_std::test]
async fn damaged_block_bytes_are_an_error_and_a_peer_restores_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let entry = |i: u64| format!("entry {i:03} {}", ".".repeat(88)).into_bytes();
    let peer = Multifeed::open_memory().await?;
    let key = {
        let multi = Multifeed::open_disk(dir.path()).await?;
        let writer = multi.writer("me").await?;
        for i in 0..10 {
            writer.append(&entry(i)).await?;
        }
        sync_pair(&multi, &peer).await?;
        multi.close().await?;
        *writer.key()
    };
    // Flip bits inside blocks 3 and 6 of the data file (every entry is 100 bytes).
    let hex = hex::encode(key);
    let data = dir
        .path()
        .join("feeds")
        .join(&hex[..2])
        .join(&hex)
        .join("data");
    let mut bytes = std::fs::read(&data)?;
    bytes[3 * 100 + 5] ^= 0x40;
    bytes[6 * 100 + 50] ^= 0x01;
    std::fs::write(&data, bytes)?;

    let multi = Multifeed::open_disk(dir.path()).await?;
    let writer = multi.writer("me").await?;
    // Was: the damaged bytes came back as valid.
    match writer.get(3).await {
        Err(Error::DamagedBlock { index: 3, .. }) => {}
        other => return Err(format!("expected DamagedBlock, got {other:?}").into()),
    }
    assert!(
        matches!(
            writer.get(3).await,
            Err(Error::MissingBlock { index: 3, .. })
        ),
        "the damaged block was dropped, and its absence is no silent None"
    );
    for i in [0, 2, 4, 9] {
        assert_eq!(writer.get(i).await?, Some(entry(i)), "block {i} is fine");
    }
    // A new peer syncing from us: was rejected us with ERR_INVALID_PROOF for block 6; now it
    // gets every block but the damaged ones, and we drop block 6 when we find it damaged.
    let fresh = Multifeed::open_memory().await?;
    // Was: the new peer waited for blocks 3 and 6 until its idle timeout. Now the sync ends
    // once we answered every request, the download reported incomplete.
    let (_, got) = sync_pair(&multi, &fresh).await?;
    assert_eq!(got.blocks_received, 8, "every block but the damaged ones");
    assert_eq!(got.feeds_incomplete, 1, "the feed is reported incomplete");
    let copy = fresh.feed(key)?.ok_or("the new peer has the feed")?;
    assert_eq!(copy.get(5).await?, Some(entry(5)));
    assert_eq!(copy.get(6).await?, None, "no damaged bytes were served");
    assert!(
        matches!(
            writer.get(6).await,
            Err(Error::MissingBlock { index: 6, .. })
        ),
        "block 6 was dropped when found damaged"
    );
    // A sync with the peer that holds the feed brings the blocks back.
    sync_pair(&multi, &peer).await?;
    assert_eq!(
        writer.get(3).await?,
        Some(entry(3)),
        "restored from the peer"
    );
    assert_eq!(
        writer.get(6).await?,
        Some(entry(6)),
        "restored from the peer"
    );
    assert_eq!(writer.append(b"still writable").await?, 10);
    multi.close().await?;
    Ok(())
}

#[async_std::test]
async fn a_damaged_leaf_of_a_right_block_is_repaired_from_its_sibling_and_parent() -> TestResult {
    let dir = tempfile::tempdir()?;
    let entry = |i: u64| format!("entry {i:03}").into_bytes();
    let key = {
        let multi = Multifeed::open_disk(dir.path()).await?;
        let writer = multi.writer("me").await?;
        for i in 0..8 {
            writer.append(&entry(i)).await?;
        }
        multi.close().await?;
        *writer.key()
    };
    // Flip a bit in the hash of leaf 3 (tree node 6: 40 bytes each, the hash after 8 bytes).
    let tree = dir
        .path()
        .join(multifeed_storage::namespace_for(&key))
        .join("tree");
    let mut bytes = std::fs::read(&tree)?;
    let healthy = bytes.clone();
    bytes[6 * 40 + 8 + 17] ^= 0x10;
    std::fs::write(&tree, &bytes)?;
    let multi = Multifeed::open_disk(dir.path()).await?;
    let writer = multi.writer("me").await?;
    // Was: DamagedBlock, the right block dropped, and after a refetch damaged again.
    assert_eq!(writer.get(3).await?, Some(entry(3)));
    multi.close().await?;
    assert_eq!(std::fs::read(&tree)?, healthy, "the leaf was written again");
    Ok(())
}

#[async_std::test]
async fn feeds_the_index_no_longer_names_are_restored_from_their_folders() -> TestResult {
    let dir = tempfile::tempdir()?;
    let peer = Multifeed::open_memory().await?;
    peer.writer("theirs").await?.append(b"from a peer").await?;
    let (mine, theirs) = {
        let multi = Multifeed::open_disk(dir.path()).await?;
        let mine = multi.writer("mine").await?;
        mine.append_batch([b"a".as_slice(), b"b"]).await?;
        sync_pair(&multi, &peer).await?;
        multi.close().await?;
        (*mine.key(), *peer.feeds()[0].key())
    };
    // The index is lost entirely (was: every feed dropped, the writer's secret key orphaned).
    std::fs::remove_file(dir.path().join("index"))?;
    let multi = Multifeed::open_disk(dir.path()).await?;
    let restored: Vec<_> = multi
        .index_recovery()
        .restored
        .iter()
        .map(|record| record.key)
        .collect();
    assert_eq!(restored.len(), 2, "both feeds are reported as restored");
    let own = multi.feed(mine)?.ok_or("our writer is back")?;
    assert!(own.is_writable(), "its secret key was found in its folder");
    assert_eq!(own.get(1).await?, Some(b"b".to_vec()));
    assert_eq!(own.append(b"c").await?, 2);
    let replica = multi.feed(theirs)?.ok_or("the replica is back")?;
    assert!(!replica.is_writable());
    assert_eq!(replica.get(0).await?, Some(b"from a peer".to_vec()));
    multi.close().await?;
    // Listed again for good: the next open is clean.
    let multi = Multifeed::open_disk(dir.path()).await?;
    assert!(multi.index_recovery().is_clean());
    assert_eq!(multi.feeds().len(), 2);
    multi.close().await?;
    Ok(())
}

#[async_std::test]
async fn a_lost_bitfield_hides_nothing_after_a_sync_with_a_peer() -> TestResult {
    let dir = tempfile::tempdir()?;
    let peer = Multifeed::open_memory().await?;
    let key = {
        let multi = Multifeed::open_disk(dir.path()).await?;
        let writer = multi.writer("me").await?;
        for i in 0..300u32 {
            writer.append(&i.to_le_bytes()).await?;
        }
        sync_pair(&multi, &peer).await?;
        multi.close().await?;
        *writer.key()
    };
    let hex = hex::encode(key);
    let folder = dir.path().join("feeds").join(&hex[..2]).join(&hex);
    std::fs::remove_file(folder.join("bitfield"))?;
    let multi = Multifeed::open_disk(dir.path()).await?;
    let writer = multi.writer("me").await?;
    assert_eq!(writer.len().await?, 300);
    // Was: `get` gave None for acknowledged entries, silently.
    assert!(matches!(
        writer.get(0).await,
        Err(Error::MissingBlock { index: 0, .. })
    ));
    // Was: the sync reported OK and fetched nothing (hypercore still claimed 300 contiguous
    // blocks), leaving the entries unreadable.
    let (ours, _) = sync_pair(&multi, &peer).await?;
    assert!(ours.blocks_received > 0, "the hidden blocks were fetched");
    for i in 0..300u32 {
        assert_eq!(
            writer.get(i as u64).await?,
            Some(i.to_le_bytes().to_vec()),
            "entry {i}"
        );
    }
    assert_eq!(writer.append(b"more").await?, 300, "still writable");
    multi.close().await?;
    Ok(())
}

#[async_std::test]
async fn info_reports_lengths_without_handing_out_the_hypercore() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let feed = multi.writer("me").await?;
    feed.append_batch([b"a".as_slice(), b"bb", b"ccc"]).await?;
    let info = feed.info().await?;
    assert_eq!(
        (info.length, info.contiguous_length, info.byte_length),
        (3, 3, 6)
    );
    assert!(info.writable);
    assert!(feed.has(2).await?);
    assert!(!feed.has(3).await?);
    Ok(())
}

#[async_std::test]
async fn damage_to_either_oplog_header_slot_hides_no_entry_before_the_last_batch() -> TestResult {
    let dir = tempfile::tempdir()?;
    let entry = |i: u64| format!("entry {i}").into_bytes();
    let key = {
        let multi = Multifeed::open_disk(dir.path()).await?;
        let writer = multi.writer("me").await?;
        for chunk in 0..6u64 {
            let batch: Vec<Vec<u8>> = (chunk * 5..chunk * 5 + 5).map(entry).collect();
            writer.append_batch(&batch).await?;
        }
        multi.close().await?;
        *writer.key()
    };
    for slot in 0..2usize {
        let copy = tempfile::tempdir()?;
        let feed_dir = multifeed::namespace_for(&key);
        for file in ["tree", "data", "bitfield", "oplog"] {
            let from = dir.path().join(&feed_dir).join(file);
            let to = copy.path().join(&feed_dir).join(file);
            std::fs::create_dir_all(to.parent().ok_or("parent")?)?;
            if from.exists() {
                std::fs::copy(&from, &to)?;
            }
        }
        std::fs::copy(dir.path().join("index"), copy.path().join("index"))?;
        // Flip bits inside the header stored in this slot (its checksum then fails).
        let oplog = copy.path().join(&feed_dir).join("oplog");
        let mut bytes = std::fs::read(&oplog)?;
        bytes[slot * 4096 + 20] ^= 0x55;
        std::fs::write(&oplog, bytes)?;
        let multi = Multifeed::open_disk(copy.path()).await?;
        let writer = multi.writer("me").await?;
        // Was: an older header's shorter length, and None for the entries past it. The last
        // batch (25..30) can still be hidden: its tree nodes were only in the damaged header's
        // oplog entries (see the README).
        for i in 0..25 {
            match writer.get(i).await {
                Ok(Some(got)) => assert_eq!(got, entry(i), "slot {slot}: entry {i}"),
                Ok(None) => return Err(format!("slot {slot}: entry {i} hidden").into()),
                Err(_) => {}
            }
        }
        multi.close().await?;
    }
    Ok(())
}

#[async_std::test]
async fn at_most_max_open_feeds_stay_open_and_closed_feeds_open_again_on_use() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a = Multifeed::builder()
        .disk(dir.path())
        .max_open_feeds(8)
        .open()
        .await?;
    let mut writers = Vec::new();
    for i in 0..40u32 {
        let feed = a.writer(&format!("w{i}")).await?;
        feed.append(&i.to_le_bytes()).await?;
        writers.push(feed);
    }
    assert!(a.open_feeds() <= 8, "{} open", a.open_feeds());
    // Every feed still reads and appends: a closed one opens again.
    for (i, feed) in writers.iter().enumerate() {
        assert_eq!(feed.get(0).await?, Some((i as u32).to_le_bytes().to_vec()));
        feed.append(b"more").await?;
        assert_eq!(feed.len().await?, 2);
    }
    assert!(a.open_feeds() <= 8, "{} open", a.open_feeds());
    // A replica gets all of it, with the bound on both sides.
    let b = Multifeed::builder()
        .memory()
        .max_open_feeds(8)
        .open()
        .await?;
    let (left, right) = async_std::os::unix::net::UnixStream::pair()?;
    let (ra, rb) = futures::join!(
        a.replicate(left, multifeed::ReplicateOptions::new(true)),
        b.replicate(right, multifeed::ReplicateOptions::new(false)),
    );
    ra?;
    rb?;
    for feed in &writers {
        let copy = b.feed(feed.key())?.ok_or("a feed reached b")?;
        assert_eq!(copy.len().await?, 2);
        assert_eq!(copy.get(1).await?, Some(b"more".to_vec()));
    }
    assert!(b.open_feeds() <= 8, "{} open on b", b.open_feeds());
    a.close().await?;
    // Nothing was lost by closing cores: everything reads back after a reopen.
    let reopened = Multifeed::open_disk(dir.path()).await?;
    for feed in &writers {
        assert_eq!(
            reopened.feed(feed.key())?.ok_or("the feed")?.len().await?,
            2
        );
    }
    Ok(())
}

#[async_std::test]
async fn a_factory_that_makes_new_stores_per_open_keeps_every_core_open() -> TestResult {
    // Every open of a path gives a fresh, empty store: a closed core would come back empty.
    let factory = multifeed::FnFactory::new(|_path: &str| {
        Box::pin(async {
            Ok(
                Box::new(random_access_memory::RandomAccessMemory::new(4096))
                    as multifeed_storage::BoxedStore,
            )
        })
    });
    let multi = Multifeed::builder()
        .storage(factory)
        .max_open_feeds(4)
        .open()
        .await?;
    let mut writers = Vec::new();
    for i in 0..20u32 {
        let feed = multi.writer(&format!("w{i}")).await?;
        feed.append(&i.to_le_bytes()).await?;
        writers.push(feed);
    }
    for (i, feed) in writers.iter().enumerate() {
        assert_eq!(feed.get(0).await?, Some((i as u32).to_le_bytes().to_vec()));
    }
    assert_eq!(multi.open_feeds(), 20);
    Ok(())
}
