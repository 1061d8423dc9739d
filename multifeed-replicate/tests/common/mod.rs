//! A small in-memory feed host for the crate's tests.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use hypercore::{HypercoreBuilder, PartialKeypair, Storage, VerifyingKey};
use multifeed_replicate::{
    replicate, FeedHost, HostError, LocalChange, LocalFeed, ReplicateConfig, ReplicateError,
    ReplicateSummary,
};
use multifeed_storage::{FeedKey, SharedCore};

/// Feeds in memory; `serve_as` makes it lie: it serves another core under a key; `phantom`
/// keys are offered but never served.
#[derive(Default)]
pub struct TestHost {
    feeds: Mutex<Vec<(FeedKey, SharedCore)>>,
    serve_as: Mutex<HashMap<FeedKey, SharedCore>>,
    phantom: Mutex<Vec<FeedKey>>,
    /// How long listing the feeds takes (a large store on a slow disk).
    listing_takes: Mutex<Option<std::time::Duration>>,
    /// How many times the feeds were listed.
    listings: std::sync::atomic::AtomicUsize,
}

impl TestHost {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A new writable feed with `entries` entries.
    pub async fn writer(&self, entries: u64) -> FeedKey {
        self.writer_sized(entries, 0).await
    }

    /// A new writable feed with `entries` entries of at least `bytes` bytes each.
    pub async fn writer_sized(&self, entries: u64, bytes: usize) -> FeedKey {
        let storage = Storage::new_memory().await.expect("memory storage");
        let mut core = HypercoreBuilder::new(storage).build().await.expect("core");
        for i in 0..entries {
            let mut entry = format!("entry {i}").into_bytes();
            entry.resize(entry.len().max(bytes), b'.');
            core.append(&entry).await.expect("append");
        }
        let key = core.key_pair().public.to_bytes();
        self.feeds
            .lock()
            .unwrap()
            .push((key, SharedCore::new(core)));
        key
    }

    /// A writer of `key` (held by `original`, with its secret key) restarted with only its first
    /// `kept` entries, as after a crash that lost a signed tail, then `extra` entries of its own.
    pub async fn restarted_writer(
        &self,
        original: &TestHost,
        key: &FeedKey,
        kept: u64,
        extra: u64,
    ) {
        let source = original.core(key).expect("the original writer");
        let key_pair = source.lock().await.key_pair().clone();
        let entries = original.entries(key).await;
        let storage = Storage::new_memory().await.expect("memory storage");
        let mut core = HypercoreBuilder::new(storage)
            .key_pair(key_pair)
            .build()
            .await
            .expect("core");
        for entry in &entries[..kept as usize] {
            core.append(entry).await.expect("append");
        }
        for i in 0..extra {
            core.append(format!("after the restart {i}").as_bytes())
                .await
                .expect("append");
        }
        self.feeds
            .lock()
            .unwrap()
            .push((*key, SharedCore::new(core)));
    }

    /// Claims to hold `key`, but serves `impostor`'s core (signed by another key).
    pub async fn lie_about(&self, key: FeedKey, impostor_entries: u64) {
        let storage = Storage::new_memory().await.expect("memory storage");
        let mut core = HypercoreBuilder::new(storage).build().await.expect("core");
        for i in 0..impostor_entries {
            core.append(format!("forged {i}").as_bytes())
                .await
                .expect("append");
        }
        let shared = SharedCore::new(core);
        self.serve_as.lock().unwrap().insert(key, shared.clone());
        self.feeds.lock().unwrap().push((key, shared));
    }

    /// Makes listing the feeds take `time`.
    pub fn slow_listing(&self, time: std::time::Duration) {
        *self.listing_takes.lock().unwrap() = Some(time);
    }

    /// How many times a replication listed the feeds so far.
    pub fn listings(&self) -> usize {
        self.listings.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Offers `keys` (with length 1) without holding them.
    pub fn offer_phantoms(&self, keys: Vec<FeedKey>) {
        self.phantom.lock().unwrap().extend(keys);
    }

    pub fn core(&self, key: &FeedKey) -> Option<SharedCore> {
        self.feeds
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, c)| c.clone())
    }

    pub async fn entries(&self, key: &FeedKey) -> Vec<Vec<u8>> {
        let core = self.core(key).expect("feed held");
        let mut core = core.lock().await;
        let len = core.info().length;
        let mut out = Vec::new();
        for i in 0..len {
            out.push(core.get(i).await.expect("get").expect("entry present"));
        }
        out
    }
}

#[async_trait]
impl FeedHost for TestHost {
    async fn local_feeds(&self) -> Result<Vec<LocalFeed>, HostError> {
        self.listings
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let takes = *self.listing_takes.lock().unwrap();
        if let Some(time) = takes {
            async_io::Timer::after(time).await;
        }
        let feeds = self.feeds.lock().unwrap().clone();
        let mut out = Vec::new();
        for (key, core) in feeds {
            let info = core.lock().await.info();
            out.push(LocalFeed {
                key,
                length: info.length,
                contiguous_length: info.contiguous_length,
                discovery_key: None,
            });
        }
        out.extend(self.phantom.lock().unwrap().iter().map(|key| LocalFeed {
            key: *key,
            length: 1,
            contiguous_length: 1,
            discovery_key: None,
        }));
        Ok(out)
    }

    async fn open_feed(&self, key: &FeedKey) -> Result<Option<SharedCore>, HostError> {
        if let Some(core) = self.serve_as.lock().unwrap().get(key) {
            return Ok(Some(core.clone()));
        }
        Ok(self.core(key))
    }

    async fn add_remote_feed(&self, key: &FeedKey) -> Result<SharedCore, HostError> {
        if let Some(core) = self.core(key) {
            return Ok(core);
        }
        let public = VerifyingKey::from_bytes(key)?;
        let storage = Storage::new_memory().await?;
        let core = HypercoreBuilder::new(storage)
            .key_pair(PartialKeypair {
                public,
                secret: None,
            })
            .build()
            .await?;
        let shared = SharedCore::new(core);
        self.feeds.lock().unwrap().push((*key, shared.clone()));
        Ok(shared)
    }

    fn subscribe_new_feeds(&self) -> BoxStream<'static, FeedKey> {
        Box::pin(futures::stream::pending())
    }

    /// The changes of the feeds held when subscribed (this host adds no feeds in live tests).
    fn subscribe_changes(&self) -> BoxStream<'static, LocalChange> {
        let feeds = self.feeds.lock().unwrap().clone();
        let streams = feeds.into_iter().map(|(key, core)| {
            let seen = core.version();
            futures::stream::unfold((core, seen), move |(core, seen)| async move {
                let now = core.changed(seen).await;
                Some((LocalChange::Feed(key), (core, now)))
            })
            .boxed()
        });
        futures::stream::select_all(streams).boxed()
    }
}

pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    let bound = Duration::from_secs(30);
    async_std::future::timeout(bound, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {bound:?} waiting for {what}"))
}

/// The peak resident memory of this process so far, in bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Runs an honest replication of `host` against `attack`, which gets the other end of a socket
/// pair; whatever the attack returns (its connection) is kept until the honest side ended.
pub async fn against<T, Fut>(
    host: Arc<dyn FeedHost>,
    config: ReplicateConfig,
    attack: impl FnOnce(async_std::os::unix::net::UnixStream) -> Fut,
) -> Result<ReplicateSummary, ReplicateError>
where
    Fut: std::future::Future<Output = T>,
{
    let (ours, theirs) = async_std::os::unix::net::UnixStream::pair().expect("socket pair");
    let (result, _kept) = within(
        "the honest side to end",
        futures::future::join(replicate(ours, host, config), attack(theirs)),
    )
    .await;
    result
}

/// A random generator from `MULTIFEED_SEED`, or a fresh seed, printed for replay.
pub fn seeded_rng() -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("MULTIFEED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("MULTIFEED_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}
