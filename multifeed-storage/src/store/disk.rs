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
#[derive(Debug)]
pub struct DiskStore {
    pool: FdPool,
    path: PathBuf,
    id: u64,
    len: Option<u64>,
    role: Role,
}

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
        Self {
            id: pool.file_id(&path),
            pool: pool.clone(),
            path,
            len: None,
            role,
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
        let len = match self.pool.file(&self.path, false).map_err(|e| self.err(e))? {
            Some(file) => file.metadata().map_err(|e| self.err(e))?.len(),
            None => 0,
        };
        self.len = Some(len);
        Ok(len)
    }

    /// Writes what this file holds back, before anything that must see it.
    fn settle(&mut self) -> Result<(), RandomAccessError> {
        if self.role == Role::Held {
            self.pool
                .flush_pending(&self.path)
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Before a change to the oplog: every held write of the feed goes first.
    fn barrier(&mut self) -> Result<(), RandomAccessError> {
        if self.role == Role::Barrier {
            if let Some(dir) = self.path.parent() {
                self.pool.flush_pending_in(dir).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        let len = self.current_len()?;
        self.barrier()?;
        let held = self.role == Role::Held
            && (self.pool.hold(&self.path, offset, data) || {
                self.settle()?;
                self.pool.hold(&self.path, offset, data)
            });
        if !held {
            self.pool
                .write_now(&self.path, offset, data)
                .map_err(|e| self.err(e))?;
        }
        self.len = Some(len.max(offset + data.len() as u64));
        Ok(())
    }

    fn read_direct(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), RandomAccessError> {
        // Held writes at or past `offset` are written first: they hold the bytes, or extend
        // the file past a hole this read would otherwise find short. A cached copy of the
        // page is updated when they are written.
        if self.role == Role::Held && self.pool.holds(&self.path, offset, u64::MAX) {
            self.settle()?;
        }
        let file = self
            .pool
            .file(&self.path, false)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err(std::io::ErrorKind::NotFound.into()))?;
        file.read_exact_at(buf, offset).map_err(|e| self.err(e))
    }

    fn set_len(&mut self, length: u64) -> Result<(), RandomAccessError> {
        self.settle()?;
        self.barrier()?;
        let file = self
            .pool
            .file(&self.path, true)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err(std::io::ErrorKind::NotFound.into()))?;
        file.set_len(length).map_err(|e| self.err(e))?;
        self.pool
            .with_pages(|pages| pages.truncate(self.id, length));
        self.pool.mark_dirty(&self.path);
        self.len = Some(length);
        Ok(())
    }
}

#[async_trait]
impl RandomAccess for DiskStore {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        if data.is_empty() {
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
        // Held writes stay held unless this read needs them.
        if self.role == Role::Held && self.pool.holds(&self.path, offset, offset + length) {
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
        if let Some(file) = self.pool.file(&self.path, false).map_err(|e| self.err(e))? {
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
