//! Factories that give a random-access store for a path inside the root.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use hypercore::StorageTraits;
use random_access_storage::RandomAccessError;

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

    /// Flushes every store written since the last call to stable storage (fsync on disk).
    fn sync_all(&self) -> BoxFuture<'static, Result<(), crate::StorageError>> {
        Box::pin(async { Ok(()) })
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
    fn open(&self, path: &str) -> BoxFuture<'static, Result<BoxedStore, RandomAccessError>> {
        let mut full = self.root.clone();
        full.extend(path.split('/').filter(|part| !part.is_empty()));
        let store = DiskStore::open(&self.pool, full);
        Box::pin(async move { Ok(Box::new(store) as BoxedStore) })
    }

    fn release(&self) {
        self.pool.clear();
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
    pub fn file(&self, path: &str) -> Option<MemoryStore> {
        self.lock().get(path).cloned()
    }

    /// Every path opened so far, sorted.
    pub fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.lock().keys().cloned().collect();
        paths.sort();
        paths
    }

    /// Forgets the store at `path`, as if its file had been deleted.
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
    fn open(&self, path: &str) -> BoxFuture<'static, Result<BoxedStore, RandomAccessError>> {
        let store = self.lock().entry(path.to_owned()).or_default().clone();
        Box::pin(async move { Ok(Box::new(store) as BoxedStore) })
    }
}

/// A factory from a closure, for any `random-access-storage` backend.
pub struct FnFactory<F> {
    open: F,
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
        Self { open }
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
        (self.open)(path)
    }
}
