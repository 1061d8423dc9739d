//! Options for opening a multifeed.

use std::path::PathBuf;
use std::sync::Arc;

use multifeed_storage::{CoreOptions, DiskFactory, Durability, MemoryFactory, StorageFactory};

use crate::{Error, Multifeed, ValueEncoding};

/// Where a multifeed keeps its feeds.
#[derive(Debug, Clone, Default)]
enum StorageChoice {
    #[default]
    Memory,
    Disk(PathBuf),
    Custom(Arc<dyn StorageFactory>),
}

/// Settings shared by the whole multifeed.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) encoding: ValueEncoding,
    pub(crate) durability: Durability,
    pub(crate) core_options: CoreOptions,
    pub(crate) event_capacity: usize,
    pub(crate) encryption_key: Option<[u8; 32]>,
    pub(crate) max_remote_feeds: usize,
    pub(crate) max_open_feeds: usize,
}

/// Builds a [`Multifeed`] with options; from [`Multifeed::builder`].
#[derive(Debug, Clone)]
pub struct MultifeedBuilder {
    storage: StorageChoice,
    max_open_files: usize,
    config: Config,
}

impl Default for MultifeedBuilder {
    fn default() -> Self {
        Self {
            storage: StorageChoice::Memory,
            max_open_files: DiskFactory::DEFAULT_MAX_OPEN_FILES,
            config: Config {
                encoding: ValueEncoding::default(),
                durability: Durability::default(),
                core_options: CoreOptions::default(),
                event_capacity: 1024,
                encryption_key: None,
                max_remote_feeds: 1_000_000,
                max_open_feeds: 1024,
            },
        }
    }
}

impl MultifeedBuilder {
    /// The most feeds learned from peers this store keeps (default 1,000,000), over all
    /// replications and restarts; a replication that would add one more fails with
    /// [`Error::TooManyFeeds`](crate::Error::TooManyFeeds). Local writers do not count.
    pub fn max_remote_feeds(mut self, max: usize) -> Self {
        self.config.max_remote_feeds = max;
        self
    }

    /// The most hypercores kept open at once (default 1,024). Past it, the feeds used least
    /// recently that nobody is using are closed and opened again on their next use, so memory
    /// follows the feeds in use, not the size of the store: an open feed of a few entries
    /// costs about 25 KB (hypercore's bitfield page, tree and oplog state), a closed one about
    /// 1 KB (its record). Feeds a replication is syncing, or a stream waits on, stay open.
    pub fn max_open_feeds(mut self, max: usize) -> Self {
        self.config.max_open_feeds = max.max(1);
        self
    }

    /// Keep every feed in memory (the default).
    pub fn memory(mut self) -> Self {
        self.storage = StorageChoice::Memory;
        self
    }

    /// Keep feeds in the directory `path` (created when the multifeed opens).
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.storage = StorageChoice::Disk(path.into());
        self
    }

    /// Keep feeds in any storage: a factory from paths inside the root to `random-access-storage` stores.
    pub fn storage(mut self, factory: impl StorageFactory) -> Self {
        self.storage = StorageChoice::Custom(Arc::new(factory));
        self
    }

    /// How typed values are encoded: binary (default), utf-8 or JSON.
    pub fn value_encoding(mut self, encoding: ValueEncoding) -> Self {
        self.config.encoding = encoding;
        self
    }

    /// When writes reach stable storage (see [`Durability`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.config.durability = durability;
        self
    }

    /// Capacity of each hypercore's merkle-tree node cache (passed to hypercore).
    pub fn node_cache_capacity(mut self, nodes: u64) -> Self {
        self.config.core_options.node_cache_capacity = Some(nodes);
        self
    }

    /// The most files kept open at once on disk (default 128).
    pub fn max_open_files(mut self, max: usize) -> Self {
        self.max_open_files = max.max(1);
        self
    }

    /// How many events each [`events`](Multifeed::events) subscriber may lag behind (default 1024).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.config.event_capacity = capacity.max(1);
        self
    }

    /// The shared key that peers must know to replicate with this multifeed.
    ///
    /// It is kept in memory only and never written to storage. Without it, replication uses the
    /// public default key of JS multifeed (anyone can then replicate).
    pub fn encryption_key(mut self, key: [u8; 32]) -> Self {
        self.config.encryption_key = Some(key);
        self
    }

    /// Opens the multifeed, reading its index.
    ///
    /// A disk root is locked (an advisory lock on `<dir>/LOCK`) until [`Multifeed::close`] or
    /// the last handle is dropped: a second open, in this process or another, fails with
    /// [`Error::Locked`] instead of putting two writers on the same files.
    pub async fn open(self) -> Result<Multifeed, Error> {
        let mut lock = None;
        let factory: Arc<dyn StorageFactory> = match self.storage {
            StorageChoice::Memory => Arc::new(MemoryFactory::new()),
            StorageChoice::Disk(path) => {
                lock = Some(lock_root(&path)?);
                Arc::new(DiskFactory::new(path, self.max_open_files))
            }
            StorageChoice::Custom(factory) => factory,
        };
        Multifeed::from_config(factory, self.config, lock).await
    }
}

/// Takes the advisory lock of a disk root, creating the directory if needed.
fn lock_root(path: &std::path::Path) -> Result<std::fs::File, Error> {
    let io = |source| Error::LockFailed {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join("LOCK"))
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(io(source)),
    }
}
