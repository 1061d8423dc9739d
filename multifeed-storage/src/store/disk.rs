//! A disk store: synchronous positioned I/O through a shared descriptor pool.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use async_trait::async_trait;
use random_access_storage::{RandomAccess, RandomAccessError};

use super::fd_pool::{io_error, FdPool};
use super::page_cache::PAGE;

/// Reads longer than this many pages bypass the page cache.
const MAX_CACHED_READ_PAGES: u64 = 4;

/// A file on disk, opened on demand through an [`FdPool`].
///
/// Every operation is one or two syscalls done in place (`pwrite`, `pread`, `ftruncate`), with no
/// hand-off to a thread and no fsync; see the [module docs](crate#durability) for what survives
/// what. One store per path: the length is cached in the store.
///
/// Writes to a feed's `tree`, `data` and `bitfield` files are held back until the next write to
/// the same feed's `oplog` (or a read, truncate, sync or drop of the file), then written in one
/// `pwrite` per contiguous run. Hypercore ends every operation with an oplog write, so nothing it
/// acknowledged is held, and the order it relies on (tree and bitfield before the header that
/// covers them) is kept; an append batch's 20,000 tree-node writes become one `pwrite`.
///
/// In a replica's directory (see [`StorageFactory::replica`](crate::StorageFactory::replica)),
/// the oplog's entries are held too, until the next header write or truncation of the oplog
/// (hypercore writes a header every fourth operation), a read that needs them, a read of the
/// block data, or [`FdPool::write_held`] (called after each batch of replicated blocks). They
/// are then written data first, entries next, tree and bitfield after, then the header: the
/// order hypercore wrote them in, except that block data may land before the entries of the
/// blocks before it, which a kill leaves as unused bytes past the feed's end. A replica takes
/// no local appends, so nothing a caller was told is stored is held; a kill may lose the last
/// few blocks received, which the next replication fetches again.
#[derive(Debug)]
pub struct DiskStore {
    pool: FdPool,
    path: PathBuf,
    id: u64,
    len: Option<u64>,
    role: Role,
    /// The file is in a replica's feed directory.
    replica: bool,
    /// For a feed file, the ids of the feed's files in flush order (data, oplog, tree,
    /// bitfield).
    feed: Option<[u64; 4]>,
}

/// Where an oplog's entries start: two 4 KiB header slots come first.
const OPLOG_ENTRIES_START: u64 = 8192;

/// How a file's writes are ordered with its feed's other files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `tree`, `data`, `bitfield`: writes are held until the feed's next oplog write.
    Held,
    /// `oplog`: writes the feed's held writes first.
    Barrier,
    /// Anything else: written at once.
    Direct,
}

impl DiskStore {
    /// A store for the file at `path`; touches the disk only when used.
    pub fn open(pool: &FdPool, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let role = match path.file_name().and_then(|name| name.to_str()) {
            Some("tree" | "data" | "bitfield") => Role::Held,
            Some("oplog") => Role::Barrier,
            _ => Role::Direct,
        };
        let dir = path.parent().filter(|_| role != Role::Direct);
        let replica = dir.is_some_and(|dir| pool.is_replica(dir));
        let feed = dir.map(|dir| pool.feed_ids(dir));
        Self {
            id: pool.file_id(&path),
            pool: pool.clone(),
            path,
            len: None,
            role,
            replica,
            feed,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn err(&self, source: std::io::Error) -> RandomAccessError {
        io_error(&self.path, source)
    }

    fn current_len(&mut self) -> Result<u64, RandomAccessError> {
        if let Some(len) = self.len {
            return Ok(len);
        }
        let len = match self.pool.file(self.id, false).map_err(|e| self.err(e))? {
            Some(file) => file.metadata().map_err(|e| self.err(e))?.len(),
            None => 0,
        };
        self.len = Some(len);
        Ok(len)
    }

    /// Writes what this file holds back, before anything that must see it; in a replica's
    /// directory, everything the feed holds (the order between its files matters there).
    fn settle(&mut self) -> Result<(), RandomAccessError> {
        if self.replica {
            return self.flush_feed();
        }
        if self.role == Role::Held {
            self.pool.flush_pending(self.id).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Writes everything the feed holds back, in order.
    fn flush_feed(&mut self) -> Result<(), RandomAccessError> {
        if let Some(feed) = &self.feed {
            self.pool.flush_files(feed).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Before a change to the oplog: every held write of the feed goes first.
    fn barrier(&mut self) -> Result<(), RandomAccessError> {
        if self.role == Role::Barrier {
            self.flush_feed()?;
        }
        Ok(())
    }

    /// Whether a write at `offset` is held back: always for `Held` files, and for a replica's
    /// oplog entries (not its headers).
    fn holds_writes_at(&self, offset: u64) -> bool {
        match self.role {
            Role::Held => true,
            Role::Barrier => self.replica && offset >= OPLOG_ENTRIES_START,
            Role::Direct => false,
        }
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        let before = self.current_len()?;
        let len = before.max(offset + data.len() as u64);
        // The pool fills its page cache from writes that cover whole pages up to this length
        // (it only fills once it knows the length: every change is told to it).
        if len != before {
            self.pool.set_len(self.id, len);
        }
        let hold = self.holds_writes_at(offset);
        if !hold {
            self.barrier()?;
        }
        let held = hold
            && (self.pool.hold(self.id, offset, data) || {
                self.settle()?;
                self.pool.hold(self.id, offset, data)
            });
        if !held {
            self.pool
                .write_now(self.id, offset, data)
                .map_err(|e| self.err(e))?;
        }
        self.len = Some(len);
        Ok(())
    }

    fn read_direct(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), RandomAccessError> {
        // Held writes at or past `offset` are written first: they hold the bytes, or extend
        // the file past a hole this read would otherwise find short. A cached copy of the
        // page is updated when they are written.
        if self.pool.holds(self.id, offset, u64::MAX) {
            self.settle()?;
        }
        let file = self
            .pool
            .file(self.id, false)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err(std::io::ErrorKind::NotFound.into()))?;
        file.read_exact_at(buf, offset).map_err(|e| self.err(e))
    }

    fn set_len(&mut self, length: u64) -> Result<(), RandomAccessError> {
        self.settle()?;
        self.barrier()?;
        let file = self
            .pool
            .file(self.id, true)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err(std::io::ErrorKind::NotFound.into()))?;
        file.set_len(length).map_err(|e| self.err(e))?;
        self.pool
            .with_pages(|pages| pages.truncate(self.id, length));
        self.pool.set_len(self.id, length);
        self.pool.mark_dirty(self.id);
        self.len = Some(length);
        Ok(())
    }
}

#[async_trait]
impl RandomAccess for DiskStore {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        if data.is_empty() {
            // Like `random-access-memory`: an empty write past the end still extends the file.
            if offset > self.current_len()? {
                self.set_len(offset)?;
            }
            return Ok(());
        }
        self.write_at(offset, data)
    }

    async fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, RandomAccessError> {
        let len = self.current_len()?;
        let end = offset.checked_add(length);
        if end.is_none_or(|end| end > len) {
            return Err(RandomAccessError::OutOfBounds {
                offset,
                end,
                length: len,
            });
        }
        if length == 0 {
            return Ok(Vec::new());
        }
        // Held writes stay held unless this read needs them. Reading a replica's blocks first
        // writes the entries that record them: what anyone read survives a kill.
        let block_read = self.replica
            && self
                .feed
                .is_some_and(|[data, oplog, ..]| data == self.id && self.pool.holds_any(oplog));
        if block_read || self.pool.holds(self.id, offset, offset + length) {
            self.settle()?;
        }
        let mut buf = vec![0; length as usize];
        let first = offset / PAGE;
        let last = (offset + length - 1) / PAGE;
        if last - first >= MAX_CACHED_READ_PAGES {
            self.read_direct(offset, &mut buf)?;
            return Ok(buf);
        }
        for page in first..=last {
            let page_start = page * PAGE;
            let from = offset.max(page_start);
            let to = (offset + length).min(page_start + PAGE);
            let (lo, hi) = ((from - page_start) as usize, (to - page_start) as usize);
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let hit = self
                .pool
                .with_pages(|pages| match pages.get(self.id, page) {
                    Some(bytes) if bytes.len() >= hi => {
                        out.copy_from_slice(&bytes[lo..hi]);
                        true
                    }
                    _ => false,
                });
            if !hit {
                let page_len = (len - page_start).min(PAGE) as usize;
                let mut bytes = vec![0; page_len];
                self.read_direct(page_start, &mut bytes)?;
                out.copy_from_slice(&bytes[lo..hi]);
                self.pool
                    .with_pages(|pages| pages.insert(self.id, page, bytes));
            }
        }
        Ok(buf)
    }

    async fn del(&mut self, offset: u64, length: u64) -> Result<(), RandomAccessError> {
        let len = self.current_len()?;
        if offset > len {
            return Err(RandomAccessError::OutOfBounds {
                offset,
                end: None,
                length: len,
            });
        }
        if length == 0 {
            return Ok(());
        }
        if offset.saturating_add(length) >= len {
            return self.set_len(offset);
        }
        const CHUNK: u64 = 64 * 1024;
        let zeros = vec![0u8; length.min(CHUNK) as usize];
        let mut at = offset;
        while at < offset + length {
            let n = (offset + length - at).min(CHUNK) as usize;
            self.write_at(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    async fn truncate(&mut self, length: u64) -> Result<(), RandomAccessError> {
        self.set_len(length)
    }

    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        self.current_len()
    }

    async fn is_empty(&mut self) -> Result<bool, RandomAccessError> {
        Ok(self.current_len()? == 0)
    }

    async fn sync_all(&mut self) -> Result<(), RandomAccessError> {
        self.settle()?;
        if let Some(file) = self.pool.file(self.id, false).map_err(|e| self.err(e))? {
            file.sync_data().map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        // Held writes are delayed, never dropped (an error here has no one to go to).
        let _ = self.settle();
    }
}
