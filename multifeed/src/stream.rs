//! Read streams: a feed's entries over a range, in order, as a `futures::Stream`.

use std::ops::{Bound, RangeBounds};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{BoxStream, Stream, StreamExt};

use crate::{Error, Feed, Value};

/// How a read stream treats entries that are not here yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// Yield the entries held now, in order, skipping blocks not downloaded (a sparse replica),
    /// and end at the feed's length when the stream reaches it (or at the range's end).
    #[default]
    Snapshot,
    /// Yield every entry in order, waiting for each one still missing to be appended or
    /// downloaded, and go on as the feed grows, until the range's end (with an open range,
    /// until the multifeed closes). Waiting is on change notices, never polling.
    Live,
}

/// A stream of a feed's entries as `(index, bytes)`, from [`Feed::read_stream`].
///
/// Pull-based: nothing is read ahead of what the consumer asks for (backpressure). A damaged
/// or missing entry is yielded as its error and the stream goes on with the next one; once
/// the multifeed is closed it yields [`Error::Closed`] and ends.
pub struct EntryStream {
    inner: BoxStream<'static, Result<(u64, Vec<u8>), Error>>,
}

impl std::fmt::Debug for EntryStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntryStream")
    }
}

impl Stream for EntryStream {
    type Item = Result<(u64, Vec<u8>), Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// A stream of a feed's entries decoded with the multifeed's value encoding, from
/// [`Feed::value_stream`].
pub struct ValueStream {
    inner: BoxStream<'static, Result<(u64, Value), Error>>,
}

impl std::fmt::Debug for ValueStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ValueStream")
    }
}

impl Stream for ValueStream {
    type Item = Result<(u64, Value), Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

struct Cursor {
    feed: Feed,
    next: u64,
    /// Exclusive end.
    end: Option<u64>,
    mode: ReadMode,
    done: bool,
}

pub(crate) fn entries(feed: Feed, range: impl RangeBounds<u64>, mode: ReadMode) -> EntryStream {
    let next = match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&end) => Some(end.saturating_add(1)),
        Bound::Excluded(&end) => Some(end),
        Bound::Unbounded => None,
    };
    let cursor = Cursor {
        feed,
        next,
        end,
        mode,
        done: false,
    };
    EntryStream {
        inner: futures::stream::unfold(cursor, step).boxed(),
    }
}

pub(crate) fn values(feed: Feed, range: impl RangeBounds<u64>, mode: ReadMode) -> ValueStream {
    let decoder = feed.clone();
    let inner = entries(feed, range, mode)
        .map(move |item| {
            let (index, bytes) = item?;
            let value = decoder.decode(bytes, index)?;
            Ok((index, value))
        })
        .boxed();
    ValueStream { inner }
}

/// The next item: an entry, an error, or the end.
async fn step(mut cursor: Cursor) -> Option<(Result<(u64, Vec<u8>), Error>, Cursor)> {
    // Bounded by the range and the feed's length: each turn either yields, skips one block
    // (snapshot), or waits for a change notice (live).
    loop {
        if cursor.done || cursor.end.is_some_and(|end| cursor.next >= end) {
            return None;
        }
        let core = match cursor.feed.core().await {
            Ok(core) => core,
            Err(err) => {
                cursor.done = true;
                return Some((Err(err), cursor));
            }
        };
        // Seen before the read: a change after it wakes the wait below.
        let seen = core.version();
        let index = cursor.next;
        match cursor.feed.get(index).await {
            Ok(Some(bytes)) => {
                cursor.next += 1;
                return Some((Ok((index, bytes)), cursor));
            }
            Ok(None) => {}
            Err(err) => {
                // Closed ends the stream; a damaged or missing entry is reported and passed.
                cursor.done = matches!(err, Error::Closed);
                cursor.next += 1;
                return Some((Err(err), cursor));
            }
        }
        // Not here: a replica's block not downloaded yet, or past the feed's length.
        match cursor.mode {
            ReadMode::Snapshot => {
                if index >= core.lock().await.info().length {
                    return None;
                }
                cursor.next += 1;
            }
            ReadMode::Live => {
                core.changed(seen).await;
            }
        }
    }
}
