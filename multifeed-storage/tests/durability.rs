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
