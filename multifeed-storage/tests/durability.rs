//! The durability contract: no fsync per write; `sync_all` flushes exactly what was written.

use std::sync::Arc;

use multifeed_storage::{
    CoreOptions, DiskFactory, Durability, FeedOrigin, RootStorage, StorageFactory,
};

fn key_pair() -> hypercore::PartialKeypair {
    let signing_key = hypercore::generate_signing_key();
    hypercore::PartialKeypair {
        public: signing_key.verifying_key(),
        secret: Some(signing_key),
    }
}

#[async_std::test]
async fn writes_wait_in_the_page_cache_until_a_sync() {
    let dir = tempfile::tempdir().expect("temp dir");
    let factory = Arc::new(DiskFactory::new(dir.path(), 16));
    let (mut root, _, _) =
        RootStorage::open(factory.clone(), CoreOptions::default(), Durability::Process)
            .await
            .expect("open");
    let (_, mut core) = root
        .create_feed(key_pair(), Some("w".into()), FeedOrigin::Local)
        .await
        .expect("create");
    for i in 0..100u32 {
        core.append(&i.to_le_bytes()).await.expect("append");
    }
    let dirty = factory.pool().dirty_count();
    assert!(
        dirty >= 4,
        "index and feed files are written but not yet synced ({dirty})"
    );
    factory.sync_all().await.expect("sync");
    assert_eq!(
        factory.pool().dirty_count(),
        0,
        "a sync flushes every written file"
    );
    core.append(b"one more").await.expect("append");
    assert!(factory.pool().dirty_count() > 0);
    drop(core);

    // What was written is readable from a fresh process view of the files.
    let fresh = Arc::new(DiskFactory::new(dir.path(), 16));
    let (root, records, recovery) =
        RootStorage::open(fresh, CoreOptions::default(), Durability::Process)
            .await
            .expect("reopen");
    assert!(recovery.is_clean());
    let mut core = root.open_feed(&records[0]).await.expect("open feed");
    assert_eq!(core.info().length, 101);
    assert_eq!(
        core.get(100).await.expect("get"),
        Some(b"one more".to_vec())
    );
}

/// A memory store that counts its `sync_all` calls.
#[derive(Debug)]
struct CountingStore {
    inner: multifeed_storage::MemoryStore,
    syncs: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl random_access_storage::RandomAccess for CountingStore {
    async fn write(
        &mut self,
        offset: u64,
        data: &[u8],
    ) -> Result<(), random_access_storage::RandomAccessError> {
        self.inner.write(offset, data).await
    }
    async fn read(
        &mut self,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, random_access_storage::RandomAccessError> {
        self.inner.read(offset, length).await
    }
    async fn del(
        &mut self,
        offset: u64,
        length: u64,
    ) -> Result<(), random_access_storage::RandomAccessError> {
        self.inner.del(offset, length).await
    }
    async fn truncate(
        &mut self,
        length: u64,
    ) -> Result<(), random_access_storage::RandomAccessError> {
        self.inner.truncate(length).await
    }
    async fn len(&mut self) -> Result<u64, random_access_storage::RandomAccessError> {
        self.inner.len().await
    }
    async fn is_empty(&mut self) -> Result<bool, random_access_storage::RandomAccessError> {
        self.inner.is_empty().await
    }
    async fn sync_all(&mut self) -> Result<(), random_access_storage::RandomAccessError> {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// A custom backend gets its `sync_all` called on every store written since the last sync, and
/// only on those.
#[async_std::test]
async fn custom_backends_are_synced_where_written() {
    use std::sync::atomic::Ordering;
    let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = syncs.clone();
    let factory = Arc::new(multifeed_storage::FnFactory::new(move |_path: &str| {
        let store = CountingStore {
            inner: multifeed_storage::MemoryStore::new(),
            syncs: counter.clone(),
        };
        Box::pin(async move { Ok(Box::new(store) as multifeed_storage::BoxedStore) })
    }));
    let (mut root, _, _) =
        RootStorage::open(factory.clone(), CoreOptions::default(), Durability::Process)
            .await
            .expect("open");
    let (_, mut core) = root
        .create_feed(key_pair(), None, FeedOrigin::Local)
        .await
        .expect("create");
    core.append(b"one").await.expect("append");
    assert_eq!(syncs.load(Ordering::SeqCst), 0, "no sync on its own");
    factory.sync_all().await.expect("sync");
    let first = syncs.load(Ordering::SeqCst);
    // The index, and the feed's data, tree, bitfield and oplog were written.
    assert!(first >= 5, "{first} stores synced");
    factory.sync_all().await.expect("sync");
    assert_eq!(
        syncs.load(Ordering::SeqCst),
        first,
        "nothing written, nothing synced"
    );
    core.append(b"two").await.expect("append");
    factory.sync_all().await.expect("sync");
    let second = syncs.load(Ordering::SeqCst) - first;
    assert!(
        (1..first).contains(&second),
        "only the written stores: {second}"
    );
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// A replica's oplog entries wait in the process until a header write, a block read or
/// `write_held`; a local feed's go out at once; held writes reach the files data first.
#[async_std::test]
async fn replica_entries_are_held_until_a_barrier() {
    let dir = tempfile::tempdir().expect("temp dir");
    let factory = DiskFactory::new(dir.path(), 16);
    let replica = "feeds/aa/replica";
    let local = "feeds/bb/local";
    factory.new_feed(replica);
    factory.replica(replica);
    factory.new_feed(local);
    let open = |path: String| {
        let factory = factory.clone();
        async move { factory.open(&path).await.expect("open") }
    };
    let mut data = open(format!("{replica}/data")).await;
    let mut oplog = open(format!("{replica}/oplog")).await;
    let mut local_oplog = open(format!("{local}/oplog")).await;
    let on_disk = |path: &str| file_len(&dir.path().join(path));

    // A local feed's entry is written at once.
    local_oplog.write(8192, b"entry").await.expect("write");
    assert_eq!(on_disk(&format!("{local}/oplog")), 8197);

    // A replica's block and entry are held...
    data.write(0, b"block").await.expect("write");
    oplog.write(8192, b"entry 1").await.expect("write");
    assert_eq!(on_disk(&format!("{replica}/data")), 0);
    assert_eq!(on_disk(&format!("{replica}/oplog")), 0);
    // ...and still read back.
    assert_eq!(oplog.read(8192, 7).await.expect("read"), b"entry 1");
    assert_eq!(
        on_disk(&format!("{replica}/oplog")),
        8199,
        "a read that needs them writes them"
    );

    // A header write goes after everything held.
    data.write(5, b"block 2").await.expect("write");
    oplog.write(8199, b"entry 2").await.expect("write");
    assert_eq!(on_disk(&format!("{replica}/data")), 5);
    oplog.write(0, b"header").await.expect("write");
    assert_eq!(on_disk(&format!("{replica}/data")), 12);
    assert_eq!(on_disk(&format!("{replica}/oplog")), 8206);

    // Reading block data writes the entries that record it.
    data.write(12, b"block 3").await.expect("write");
    oplog.write(8206, b"entry 3").await.expect("write");
    assert_eq!(data.read(0, 5).await.expect("read"), b"block");
    assert_eq!(on_disk(&format!("{replica}/oplog")), 8213);

    // write_held writes the rest.
    data.write(19, b"block 4").await.expect("write");
    oplog.write(8213, b"entry 4").await.expect("write");
    factory.write_held().expect("write held");
    assert_eq!(on_disk(&format!("{replica}/data")), 26);
    assert_eq!(on_disk(&format!("{replica}/oplog")), 8220);
    let bytes = std::fs::read(dir.path().join(format!("{replica}/oplog"))).expect("read");
    assert_eq!(&bytes[8192..], b"entry 1entry 2entry 3entry 4");
}

/// A held write whose flush fails stays held, and a later flush writes it.
#[async_std::test]
async fn held_writes_survive_a_failed_flush() {
    use multifeed_storage::{DiskStore, FdPool};
    use random_access_storage::RandomAccess;
    let dir = tempfile::tempdir().expect("temp dir");
    let feed = dir.path().join("feed");
    std::fs::create_dir(&feed).expect("dir");
    let pool = FdPool::new(8);
    let mut tree = DiskStore::open(&pool, feed.join("tree"));
    tree.write(0, b"node one").await.expect("held");
    tree.write(100, b"node two").await.expect("held");
    // The directory turns into a file: the flush cannot create `tree`.
    std::fs::remove_dir(&feed).expect("remove dir");
    std::fs::write(&feed, b"in the way").expect("file");
    assert!(pool.write_held().is_err(), "the flush fails");
    std::fs::remove_file(&feed).expect("remove file");
    std::fs::create_dir(&feed).expect("dir again");
    pool.write_held().expect("the retry writes");
    let bytes = std::fs::read(feed.join("tree")).expect("tree");
    assert_eq!(&bytes[..8], b"node one");
    assert_eq!(&bytes[100..108], b"node two");
}
