//! Read streams over the facade only: snapshots, live reads of local appends and of downloads,
//! ranges, decoded values, and the end at close.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use multifeed::{Error, Multifeed, ReadMode, ReplicateOptions, Value, ValueEncoding};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The stream's next item, bounded in time; says what it waited for.
async fn next<S, T>(stream: &mut S, what: &str) -> Option<Result<T, Error>>
where
    S: futures::Stream<Item = Result<T, Error>> + Unpin,
{
    async_std::future::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap_or_else(|_| panic!("timed out after 20 s waiting for {what}"))
}

#[async_std::test]
async fn a_snapshot_yields_the_range_held_now_and_ends() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let feed = multi.writer("me").await?;
    for i in 0..6u8 {
        feed.append(&[i]).await?;
    }
    let all: Vec<(u64, Vec<u8>)> = feed
        .read_stream(.., ReadMode::Snapshot)
        .try_collect()
        .await?;
    assert_eq!(
        all,
        (0..6u8)
            .map(|i| (u64::from(i), vec![i]))
            .collect::<Vec<_>>()
    );
    let some: Vec<u64> = feed
        .read_stream(2..=4, ReadMode::Snapshot)
        .map_ok(|(index, _)| index)
        .try_collect()
        .await?;
    assert_eq!(some, vec![2, 3, 4]);
    let past: Vec<_> = feed.read_stream(9.., ReadMode::Snapshot).collect().await;
    assert!(past.is_empty(), "nothing past the length");
    Ok(())
}

#[async_std::test]
async fn a_live_stream_yields_local_appends_as_they_happen_and_stops_at_its_end() -> TestResult {
    let multi = Multifeed::open_memory().await?;
    let feed = multi.writer("me").await?;
    feed.append(b"before").await?;
    let mut live = feed.read_stream(..4, ReadMode::Live);
    assert_eq!(
        next(&mut live, "entry 0").await.transpose()?,
        Some((0, b"before".to_vec()))
    );
    let appender = {
        let feed = feed.clone();
        async_std::task::spawn(async move {
            for i in 1..6u8 {
                feed.append(&[i]).await?;
            }
            Ok::<_, Error>(())
        })
    };
    for i in 1..4u8 {
        let item = next(&mut live, &format!("entry {i}")).await.transpose()?;
        assert_eq!(item, Some((u64::from(i), vec![i])));
    }
    assert!(
        next(&mut live, "the end of 0..4").await.is_none(),
        "the range ends"
    );
    appender.await?;
    Ok(())
}

#[async_std::test]
async fn a_live_stream_of_a_replica_yields_entries_as_they_are_downloaded() -> TestResult {
    let author = Multifeed::open_memory().await?;
    let writer = author.writer("author").await?;
    writer.append(b"0").await?;
    let reader = Multifeed::open_memory().await?;
    let (left, right) = async_std::os::unix::net::UnixStream::pair()?;
    let (oa, ob) = (
        ReplicateOptions::new(true).live(true),
        ReplicateOptions::new(false).live(true),
    );
    let stops = (oa.stop_handle(), ob.stop_handle());
    let sync = {
        let (author, reader) = (author.clone(), reader.clone());
        async_std::task::spawn(async move {
            futures::join!(author.replicate(left, oa), reader.replicate(right, ob))
        })
    };
    // The feed reaches the reader through the replication.
    let mut events = reader.events();
    let copy = loop {
        if let Some(copy) = reader.feed(*writer.key())? {
            break copy;
        }
        async_std::future::timeout(Duration::from_secs(20), events.next())
            .await
            .map_err(|_| "timed out waiting for the feed to reach the reader")?;
    };
    let mut live = copy.read_stream(.., ReadMode::Live);
    for i in 1..20u32 {
        writer.append(i.to_string().as_bytes()).await?;
    }
    for i in 0..20u32 {
        let item = next(&mut live, &format!("downloaded entry {i}"))
            .await
            .transpose()?;
        assert_eq!(item, Some((u64::from(i), i.to_string().into_bytes())));
    }
    stops.0.stop();
    stops.1.stop();
    let (ra, rb) = sync.await;
    ra?;
    rb?;
    // Close ends a live stream that waits for more.
    reader.close().await?;
    assert!(matches!(
        next(&mut live, "the end at close").await,
        Some(Err(Error::Closed))
    ));
    assert!(next(&mut live, "nothing after the end").await.is_none());
    Ok(())
}

#[async_std::test]
async fn a_value_stream_decodes_with_the_multifeeds_encoding() -> TestResult {
    let multi = Multifeed::builder()
        .value_encoding(ValueEncoding::Json)
        .open()
        .await?;
    let feed = multi.writer("me").await?;
    for n in 0..3 {
        feed.append_json(&serde_json::json!({ "n": n })).await?;
    }
    let values: Vec<(u64, Value)> = feed
        .value_stream(1.., ReadMode::Snapshot)
        .try_collect()
        .await?;
    assert_eq!(values.len(), 2);
    assert_eq!(values[1].0, 2);
    assert_eq!(
        values[1].1.to_json::<serde_json::Value>()?,
        serde_json::json!({ "n": 2 })
    );
    Ok(())
}
