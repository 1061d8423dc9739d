//! Many hypercores by many authors, stored together, replicated union-style over one connection.
//!
//! A [`Multifeed`] holds any number of feeds (signed append-only logs, [hypercores](hypercore)):
//! local ones that it can write, each created by [`Multifeed::writer`] under a local name, and
//! remote ones learned from peers. Replication swaps the feeds both sides know, so each ends with
//! the union: every author writes their own feed, and everyone gets every feed.
//!
//! Nothing is served or returned that the feed's own tree contradicts: a damaged block is an
//! error ([`Error::DamagedBlock`], [`Error::MissingBlock`]), not wrong bytes or a silent gap, and
//! the next sync with a peer that holds it restores it. Peers are never trusted with memory or
//! time (see [`ReplicateOptions`] and the README's "Reliability" section).
//!
//! ```
//! # async_std::task::block_on(async {
//! use multifeed::{Multifeed, ValueEncoding};
//!
//! let multi = Multifeed::builder().value_encoding(ValueEncoding::Json).open().await?;
//! let notes = multi.writer("notes").await?;
//! notes.append_json(&serde_json::json!({ "text": "hello" })).await?;
//!
//! // The same name gives the same feed; feeds are found by key or hex key.
//! assert_eq!(multi.writer("notes").await?.key(), notes.key());
//! let found = multi.feed(notes.key_hex())?.expect("the feed is here");
//! let value: serde_json::Value = found.get_json(0).await?.expect("entry 0 is stored");
//! assert_eq!(value["text"], "hello");
//! multi.close().await?;
//! # Ok::<(), multifeed::Error>(())
//! # }).unwrap();
//! ```
//!
//! Apps index feeds as entries arrive: [`Feed::read_stream`] and [`Feed::value_stream`] yield a
//! feed's entries in order and, in [`ReadMode::Live`], go on with each entry appended here or
//! downloaded by a replication, without polling.
//!
//! ```
//! # async_std::task::block_on(async {
//! use futures::StreamExt;
//! use multifeed::{Multifeed, ReadMode};
//!
//! let multi = Multifeed::open_memory().await?;
//! let chat = multi.writer("chat").await?;
//! let mut live = chat.read_stream(0.., ReadMode::Live);
//! chat.append(b"hello").await?;
//! assert_eq!(live.next().await.transpose()?, Some((0, b"hello".to_vec())));
//! multi.close().await?;
//! assert!(matches!(live.next().await, Some(Err(multifeed::Error::Closed))));
//! # Ok::<(), multifeed::Error>(())
//! # }).unwrap();
//! ```

mod builder;
mod encoding;
mod error;
mod events;
mod feed;
mod multifeed;
mod registry;
mod removal;
mod replicate;
mod running;
mod stream;

pub use builder::MultifeedBuilder;
pub use encoding::{Value, ValueEncoding};
pub use error::Error;
pub use events::{Event, Events};
pub use feed::{Feed, FeedInfo};
pub use hypercore::SigningKey;
pub use multifeed::Multifeed;
pub use multifeed_replicate::semver;
pub use multifeed_replicate::{
    secure_channel, CipherTrait, MetaError, PeerViolation, Phase, ReplicateError,
};
pub use multifeed_storage::{
    namespace_for, BoxedStore, DiskFactory, Durability, FeedKey, FeedOrigin, FeedRecord, FnFactory,
    IndexRecovery, MemoryFactory, MemoryStore, SharedCore, StorageError, StorageFactory,
};
pub use random_access_storage::RandomAccessError;
pub use replicate::{ReplicateOptions, ReplicateSummary, StopHandle, DEFAULT_ENCRYPTION_KEY};
pub use stream::{EntryStream, ReadMode, ValueStream};

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
