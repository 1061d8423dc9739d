//! Factories that give a random-access store for a path inside the root.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures::future::BoxFuture;
use hypercore::StorageTraits;
use random_access_storage::{RandomAccess, RandomAccessError};

use crate::{DiskStore, FdPool, MemoryStore};

/// A boxed random-access store, as hypercore takes it.
pub type BoxedStore = Box<dyn StorageTraits + Send>;

/// Gives the store for a path inside a multifeed root: the Rust form of the JS `storage` function.
///
/// Paths are relative and `/`-separated, for example `index` or `feeds/ab/ab12…/oplog`.
/// Opening the same path twice must give a store over the same bytes.
pub trait StorageFactory: Send + Sync + fmt::Debug + 'static {
    /// Opens (creating if needed) the store at `path`.
    fn open(&self, path: &str) -> BoxFuture<'static, Result<BoxedStore, RandomAccessError>>;

    /// Releases cached resources such as open file descriptors; stores stay usable.
    fn release(&self) {}

    /// The feed namespaces (`feeds/ab/ab12…`) that hold stores, for finding feeds a damaged
    /// index no longer names. The default knows none.
    fn feed_namespaces(&self) -> Vec<String> {
        Vec::new()
    }

    /// Deletes the stores of a removed feed's namespace (`feeds/ab/ab12…`), its `damaged/`
    /// copy included. The default empties the ones it knows (the feed's four files and their
    /// copies); the disk and memory factories delete them.
    fn remove_namespace(
        &self,
        namespace: &str,
    ) -> BoxFuture<'static, Result<(), crate::StorageError>> {
        let paths: Vec<String> = ["", "damaged/"]
            .iter()
            .flat_map(|dir| {
                ["tree", "data", "bitfield", "oplog"].map(|file| format!("{namespace}/{dir}{file}"))
            })
            .collect();
        let opens: Vec<_> = paths
            .iter()
            .map(|path| (path.clone(), self.open(path)))
            .collect();
        Box::pin(async move {
            for (path, open) in opens {
                let mut store = open.await.map_err(|e| crate::StorageError::io(&path, e))?;
                store
                    .truncate(0)
                    .await
                    .map_err(|e| crate::StorageError::io(&path, e))?;
            }
            Ok(())
        })
    }

    /// Whether a store at `path` holds bytes, without creating it: for rare markers such as a
    /// restored feed's copy of its damaged files. The default knows none (false).
    fn holds(&self, path: &str) -> bool {
        let _ = path;
        false
    }

    /// Whether opening a path again gives another handle on the same bytes (so a feed's tree
    /// can be read beside its hypercore, to check blocks against it). False unless the factory
    /// says so: a closure that makes a new store on every call would give an empty one.
    fn reopens_same_store(&self) -> bool {
        false
    }

    /// Flushes every store written since the last call to stable storage (fsync on disk).
    fn sync_all(&self) -> BoxFuture<'static, Result<(), crate::StorageError>> {
        Box::pin(async { Ok(()) })
    }

    /// Called before the stores of a feed the index does not list yet are opened, with its
    /// namespace (`feeds/ab/ab12…`). A factory may prepare for it; the disk factory creates the
    /// directory, and when it did not exist, knows the feed's files do not either (saving a
    /// failing lookup per file). The default does nothing.
    fn new_feed(&self, namespace: &str) {
        let _ = namespace;
    }

    /// Tells the factory, before the feed's stores are opened, that the feed under `namespace`
    /// (`feeds/ab/ab12…`) is a replica: it only ever stores blocks received from peers. A
    /// factory may then hold back more of its writes (see [`DiskStore`](crate::DiskStore)),
    /// until [`write_held`](Self::write_held) at the latest. The default does nothing.
    fn replica(&self, namespace: &str) {
        let _ = namespace;
    }

    /// What the file at `path` looks like now (existence, size, identity, change time),
    /// without opening or creating it, or `None` when the backend cannot tell (the default).
    /// A factory that stamps files lets a root keep a lengths snapshot across a clean close
    /// (see [`LengthsSnapshot`](crate::LengthsSnapshot)): any write to a file must
    /// change its stamp. The disk factory stamps them.
    fn file_stamp(&self, path: &str) -> Option<crate::FileStamp> {
        let _ = path;
        None
    }

    /// Hands every write held back so far to the operating system (no fsync): called when a
    /// batch of replicated blocks is stored. The default does nothing.
    fn write_held(&self) -> Result<(), crate::StorageError> {
        Ok(())
    }
}

/// Stores files under a directory on disk, with a bounded pool of open file descriptors.
#[derive(Debug, Clone)]
pub struct DiskFactory {
    root: PathBuf,
    pool: FdPool,
}

impl DiskFactory {
    /// Default bound on open file descriptors.
    pub const DEFAULT_MAX_OPEN_FILES: usize = 128;

    /// A factory rooted at `root`, keeping at most `max_open_files` files open at once.
    pub fn new(root: impl Into<PathBuf>, max_open_files: usize) -> Self {
        Self {
            root: root.into(),
            pool: FdPool::new(max_open_files.max(1)),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// The descriptor pool shared by every store of this factory.
    pub fn pool(&self) -> &FdPool {
        &self.pool
    }
}

impl StorageFactory for DiskFactory {
    fn reopens_same_store(&self) -> bool {
        true
    }

    fn holds(&self, path: &str) -> bool {
        std::fs::metadata(self.root.join(path)).is_ok_and(|meta| meta.len() > 0)
    }

    fn remove_namespace(
        &self,
        namespace: &str,
    ) -> BoxFuture<'static, Result<(), crate::StorageError>> {
        let mut dir = self.root.clone();
        dir.extend(namespace.split('/').filter(|part| !part.is_empty()));
        // Held writes, open files, cached pages and lengths of its files go first, so nothing
        // of it is written after the directory is gone or read if the feed comes back.
        self.pool.forget_dir(&dir);
        let namespace = namespace.to_owned();
        Box::pin(async move {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(crate::StorageError::io(
                    &namespace,
                    RandomAccessError::from(err),
                )),
            }
        })
    }

    fn file_stamp(&self, path: &str) -> Option<crate::FileStamp> {
        let mut full = self.root.clone();
        full.extend(path.split('/').filter(|part| !part.is_empty()));
        // Writes held back for this file would change it: only a settled file is stamped.
        if self.pool.holds_writes_for(&full) {
            return None;
        }
        match std::fs::symlink_metadata(&full) {
            Ok(meta) => Some(disk_stamp(&meta)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Some(crate::FileStamp::ABSENT)
            }
            Err(_) => None,
        }
    }

    fn feed_namespaces(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(prefixes) = std::fs::read_dir(self.root.join("feeds")) else {
            return out;
        };
        for prefix in prefixes.flatten() {
            let prefix_name = prefix.file_name().to_string_lossy().into_owned();
            let Ok(feeds) = std::fs::read_dir(prefix.path()) else {
                continue;
            };
            for feed in feeds.flatten() {
                let name = feed.file_name().to_string_lossy().into_owned();
                if is_feed_dir(&prefix_name, &name) {
                    out.push(format!("feeds/{prefix_name}/{name}"));
                }
            }
        }
        out.sort();
        out
    }

    fn open(&self, path: &str) -> BoxFuture<'static, Result<BoxedStore, RandomAccessError>> {
        let mut full = self.root.clone();
        full.extend(path.split('/').filter(|part| !part.is_empty()));
        let store = DiskStore::open(&self.pool, full);
        Box::pin(async move { Ok(Box::new(store) as BoxedStore) })
    }

    fn release(&self) {
        self.pool.clear();
    }

    fn new_feed(&self, namespace: &str) {
        let mut dir = self.root.clone();
        dir.extend(namespace.split('/').filter(|part| !part.is_empty()));
        self.pool.prepare_feed_dir(&dir);
    }

    fn replica(&self, namespace: &str) {
        let mut dir = self.root.clone();
        dir.extend(namespace.split('/').filter(|part| !part.is_empty()));
        self.pool.mark_replica(dir);
    }

    fn write_held(&self) -> Result<(), crate::StorageError> {
        self.pool
            .write_held()
            .map_err(|source| crate::StorageError::Io {
                path: self.root.display().to_string(),
                source,
            })
    }

    fn sync_all(&self) -> BoxFuture<'static, Result<(), crate::StorageError>> {
        let result = self
            .pool
            .sync_all()
            .map_err(|source| crate::StorageError::Io {
                path: self.root.display().to_string(),
                source,
            });
        Box::pin(async move { result })
    }
}

/// A disk file's stamp: its size, inode and device, and its change time (`ctime`, which every
/// write sets and `touch` cannot set back).
#[cfg(unix)]
fn disk_stamp(meta: &std::fs::Metadata) -> crate::FileStamp {
    use std::os::unix::fs::MetadataExt;
    crate::FileStamp {
        exists: true,
        len: meta.len(),
        id: meta.ino() ^ meta.dev().rotate_left(32),
        changed: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
    }
}

/// A disk file's stamp: its size and modification time (no change time or inode here).
#[cfg(not(unix))]
fn disk_stamp(meta: &std::fs::Metadata) -> crate::FileStamp {
    let changed = meta
        .modified()
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(i128::MIN, |since| since.as_nanos() as i128);
    crate::FileStamp {
        exists: true,
        len: meta.len(),
        id: 0,
        changed,
    }
}

/// Keeps every file in memory; opening a path again gives the same bytes.
#[derive(Debug, Clone, Default)]
pub struct MemoryFactory {
    files: Arc<Mutex<HashMap<String, MemoryStore>>>,
}

impl MemoryFactory {
    /// An empty in-memory root.
    pub fn new() -> Self {
        Self::default()
    }

    /// The store at `path`, if it was ever opened (for tests that inspect or damage bytes).
    #[cfg(any(test, feature = "test-util"))]
    pub fn file(&self, path: &str) -> Option<MemoryStore> {
        self.lock().get(path).cloned()
    }

    /// Every path opened so far, sorted.
    #[cfg(any(test, feature = "test-util"))]
    pub fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.lock().keys().cloned().collect();
        paths.sort();
        paths
    }

    /// Forgets the store at `path`, as if its file had been deleted.
    #[cfg(any(test, feature = "test-util"))]
    pub fn remove(&self, path: &str) -> Option<MemoryStore> {
        self.lock().remove(path)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MemoryStore>> {
        // A poisoned map is still consistent: every operation on it is a single insert or read.
        self.files
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl StorageFactory for MemoryFactory {
    fn reopens_same_store(&self) -> bool {
        true
    }

    fn remove_namespace(
        &self,
        namespace: &str,
    ) -> BoxFuture<'static, Result<(), crate::StorageError>> {
        let prefix = format!("{namespace}/");
        self.lock().retain(|path, _| !path.starts_with(&prefix));
        Box::pin(async { Ok(()) })
    }

    fn holds(&self, path: &str) -> bool {
        self.lock()
            .get(path)
            .is_some_and(|store| !store.is_empty_now())
    }

    fn feed_namespaces(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .lock()
            .keys()
            .filter_map(|path| {
                let mut parts = path.split('/');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some("feeds"), Some(prefix), Some(name)) if is_feed_dir(prefix, name) => {
                        Some(format!("feeds/{prefix}/{name}"))
                    }
                    _ => None,
                }
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn open(&self, path: &str) -> BoxFuture<'static, Result<BoxedStore, RandomAccessError>> {
        let store = self.lock().entry(path.to_owned()).or_default().clone();
        Box::pin(async move { Ok(Box::new(store) as BoxedStore) })
    }
}

/// A factory from a closure, for any `random-access-storage` backend.
///
/// [`sync_all`](StorageFactory::sync_all) calls `sync_all` on every store opened through it that
/// was written since the last call, so `Durability::Sync` and `Multifeed::flush` hold for custom
/// backends too.
pub struct FnFactory<F> {
    open: F,
    opened: Arc<Mutex<Vec<Weak<TrackedInner>>>>,
}

impl<F> FnFactory<F>
where
    F: Fn(&str) -> BoxFuture<'static, Result<BoxedStore, RandomAccessError>>
        + Send
        + Sync
        + 'static,
{
    /// Wraps `open`, called with each path inside the root.
    pub fn new(open: F) -> Self {
        Self {
            open,
            opened: Arc::default(),
        }
    }
}

impl<F> fmt::Debug for FnFactory<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnFactory").finish_non_exhaustive()
    }
}

impl<F> StorageFactory for FnFactory<F>
where
    F: Fn(&str) -> BoxFuture<'static, Result<BoxedStore, RandomAccessError>>
        + Send
        + Sync
        + 'static,
{
    fn open(&self, path: &str) -> BoxFuture<'static, Result<BoxedStore, RandomAccessError>> {
        let opening = (self.open)(path);
        let opened = self.opened.clone();
        let path = path.to_owned();
        Box::pin(async move {
            let inner = Arc::new(TrackedInner {
                path,
                store: async_lock::Mutex::new(opening.await?),
                dirty: AtomicBool::new(false),
            });
            let mut list = opened.lock().unwrap_or_else(|p| p.into_inner());
            list.retain(|weak| weak.strong_count() > 0);
            list.push(Arc::downgrade(&inner));
            Ok(Box::new(Tracked { inner }) as BoxedStore)
        })
    }

    fn sync_all(&self) -> BoxFuture<'static, Result<(), crate::StorageError>> {
        let stores: Vec<Arc<TrackedInner>> = self
            .opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        Box::pin(async move {
            for store in stores {
                if store.dirty.swap(false, Ordering::SeqCst) {
                    let result = store.store.lock().await.sync_all().await;
                    if let Err(source) = result {
                        store.dirty.store(true, Ordering::SeqCst);
                        return Err(crate::StorageError::io(&store.path, source));
                    }
                }
            }
            Ok(())
        })
    }
}

#[derive(Debug)]
struct TrackedInner {
    path: String,
    store: async_lock::Mutex<BoxedStore>,
    /// Written since its last `sync_all`.
    dirty: AtomicBool,
}

/// A store of an [`FnFactory`]: the user's store, which the factory can still reach to sync.
#[derive(Debug)]
struct Tracked {
    inner: Arc<TrackedInner>,
}

impl Tracked {
    fn written(&self) {
        self.inner.dirty.store(true, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl RandomAccess for Tracked {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        self.written();
        self.inner.store.lock().await.write(offset, data).await
    }
    async fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, RandomAccessError> {
        self.inner.store.lock().await.read(offset, length).await
    }
    async fn del(&mut self, offset: u64, length: u64) -> Result<(), RandomAccessError> {
        self.written();
        self.inner.store.lock().await.del(offset, length).await
    }
    async fn truncate(&mut self, length: u64) -> Result<(), RandomAccessError> {
        self.written();
        self.inner.store.lock().await.truncate(length).await
    }
    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        self.inner.store.lock().await.len().await
    }
    async fn is_empty(&mut self) -> Result<bool, RandomAccessError> {
        self.inner.store.lock().await.is_empty().await
    }
    async fn sync_all(&mut self) -> Result<(), RandomAccessError> {
        self.inner.dirty.store(false, Ordering::SeqCst);
        self.inner.store.lock().await.sync_all().await
    }
}

/// Whether `prefix/name` is a feed folder: 64 hex digits under their first two.
fn is_feed_dir(prefix: &str, name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) && name.starts_with(prefix)
}
