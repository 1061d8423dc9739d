//! A bounded, shared pool of open files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use random_access_storage::RandomAccessError;

use super::page_cache::PageCache;

/// Pages of file data the pool caches by default (32 MiB).
const DEFAULT_CACHE_PAGES: usize = 8192;

/// Held writes at most this many bytes apart go out in one `pwrite` when the bytes between are
/// cached.
const MAX_GAP: u64 = 2 * super::page_cache::PAGE;

/// Bound on the remembered missing files.
const MAX_MISSING: usize = 65_536;

/// A bounded least-recently-used pool of open files, shared by every [`DiskStore`](crate::DiskStore)
/// of a root, so thousands of feeds never hold thousands of descriptors. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FdPool {
    inner: Arc<Mutex<PoolInner>>,
}

#[derive(Debug)]
struct PoolInner {
    max_open: usize,
    tick: u64,
    open: HashMap<PathBuf, (Arc<File>, u64)>,
    /// Files written since the last [`FdPool::sync_all`].
    dirty: HashSet<PathBuf>,
    /// Files found missing by a lookup and not created since (saves a failing `open` per
    /// lookup of a new feed's files; the pool's root belongs to one process).
    missing: HashSet<PathBuf>,
    ids: HashMap<PathBuf, u64>,
    cache: PageCache,
    /// Writes held back until their feed's next oplog write (see [`DiskStore`](crate::DiskStore)),
    /// by file and offset.
    pending: HashMap<PathBuf, BTreeMap<u64, Vec<u8>>>,
}

impl FdPool {
    /// A pool keeping at most `max_open` files open (at least one), with a 32 MiB page cache.
    pub fn new(max_open: usize) -> Self {
        Self::with_cache(max_open, DEFAULT_CACHE_PAGES)
    }

    /// A pool keeping at most `max_open` files open and `cache_pages` 4 KiB pages cached.
    pub fn with_cache(max_open: usize, cache_pages: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(PoolInner {
                max_open: max_open.max(1),
                tick: 0,
                open: HashMap::new(),
                dirty: HashSet::new(),
                missing: HashSet::new(),
                ids: HashMap::new(),
                cache: PageCache::new(cache_pages),
                pending: HashMap::new(),
            })),
        }
    }

    /// The id under which the pool caches pages of `path`.
    pub(crate) fn file_id(&self, path: &Path) -> u64 {
        let mut inner = self.lock();
        if let Some(&id) = inner.ids.get(path) {
            return id;
        }
        let next = inner.ids.len() as u64;
        inner.ids.insert(path.to_path_buf(), next);
        next
    }

    /// Runs `f` with the page cache locked.
    pub(crate) fn with_pages<T>(&self, f: impl FnOnce(&mut PageCache) -> T) -> T {
        f(&mut self.lock().cache)
    }

    /// How many files are open now.
    pub fn open_count(&self) -> usize {
        self.lock().open.len()
    }

    /// How many files were written since the last [`sync_all`](Self::sync_all).
    pub fn dirty_count(&self) -> usize {
        self.lock().dirty.len()
    }

    /// Closes every open file and empties the page cache (stores reopen files on next use).
    pub fn clear(&self) {
        // Held-back writes are only ever delayed, never dropped.
        let _ = self.flush_all_pending();
        let mut inner = self.lock();
        inner.open.clear();
        inner.missing.clear();
        inner.cache.clear();
    }

    /// The open file at `path`; `None` if it does not exist and `create` is false.
    pub(crate) fn file(&self, path: &Path, create: bool) -> io::Result<Option<Arc<File>>> {
        {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            if let Some((file, used)) = inner.open.get_mut(path) {
                *used = tick;
                return Ok(Some(file.clone()));
            }
            if !create && inner.missing.contains(path) {
                return Ok(None);
            }
        }
        // Open outside the lock: it is a syscall, and other stores may proceed meanwhile.
        // Creating opens with O_CREAT straight away; only a missing directory costs a retry.
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(path)
        };
        let file = match open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound && create => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                open(path)?
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let mut inner = self.lock();
                if inner.missing.len() >= MAX_MISSING {
                    inner.missing.clear();
                }
                inner.missing.insert(path.to_path_buf());
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        let file = Arc::new(file);
        let mut inner = self.lock();
        if create {
            inner.missing.remove(path);
        }
        while inner.open.len() >= inner.max_open {
            let oldest = inner
                .open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(path, _)| path.clone());
            match oldest {
                Some(oldest) => {
                    inner.open.remove(&oldest);
                }
                None => break,
            }
        }
        let tick = inner.tick;
        let file = inner
            .open
            .entry(path.to_path_buf())
            .or_insert((file, tick))
            .0
            .clone();
        Ok(Some(file))
    }

    pub(crate) fn mark_dirty(&self, path: &Path) {
        let mut inner = self.lock();
        if !inner.dirty.contains(path) {
            inner.dirty.insert(path.to_path_buf());
        }
    }

    /// Flushes every file written since the last call to stable storage (fsync).
    pub fn sync_all(&self) -> Result<(), RandomAccessError> {
        self.flush_all_pending()?;
        let dirty: Vec<PathBuf> = self.lock().dirty.drain().collect();
        let mut result = Ok(());
        for path in dirty {
            let synced = self
                .file(&path, false)
                .and_then(|file| file.map_or(Ok(()), |f| f.sync_data()));
            if let Err(err) = synced {
                // Keep it dirty so a later sync retries it.
                self.mark_dirty(&path);
                result = Err(io_error(&path, err));
            }
        }
        result
    }

    /// Writes `data` at `offset` of `path` now: `pwrite`, page cache, dirty mark.
    pub(crate) fn write_now(&self, path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
        let file = self
            .file(path, true)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        file.write_all_at(data, offset)?;
        let id = self.file_id(path);
        self.with_pages(|pages| pages.write(id, offset, data));
        self.mark_dirty(path);
        Ok(())
    }

    /// Holds a write back; false if it overlaps one already held (flush, then retry).
    pub(crate) fn hold(&self, path: &Path, offset: u64, data: &[u8]) -> bool {
        let mut inner = self.lock();
        if !inner.pending.contains_key(path) {
            inner.pending.insert(path.to_path_buf(), BTreeMap::new());
        }
        let Some(held) = inner.pending.get_mut(path) else {
            return false;
        };
        let end = offset + data.len() as u64;
        let before = held
            .range(..=offset)
            .next_back()
            .is_some_and(|(start, bytes)| start + bytes.len() as u64 > offset);
        let after = held.range(offset..end).next().is_some();
        if before || after {
            return false;
        }
        held.insert(offset, data.to_vec());
        true
    }

    /// Whether a write held back for `path` overlaps `offset..end`.
    pub(crate) fn holds(&self, path: &Path, offset: u64, end: u64) -> bool {
        let inner = self.lock();
        let Some(held) = inner.pending.get(path) else {
            return false;
        };
        held.range(..end)
            .next_back()
            .is_some_and(|(start, bytes)| start + bytes.len() as u64 > offset)
    }

    /// Writes what is held back for `path`: runs in one `pwrite` each, where a run also spans
    /// gaps of up to [`MAX_GAP`] bytes whose current content the page cache holds (rewritten
    /// as they are; hypercore's tree writes land a few nodes apart).
    pub(crate) fn flush_pending(&self, path: &Path) -> io::Result<()> {
        let Some(held) = self.lock().pending.remove(path) else {
            return Ok(());
        };
        let id = self.file_id(path);
        let mut run: Option<(u64, Vec<u8>)> = None;
        for (offset, bytes) in held {
            let joined = match &mut run {
                Some((start, buf)) => {
                    let end = *start + buf.len() as u64;
                    end == offset
                        || (offset - end <= MAX_GAP
                            && self.with_pages(|pages| pages.copy_into(id, end, offset - end, buf)))
                }
                None => false,
            };
            match &mut run {
                Some((_, buf)) if joined => buf.extend_from_slice(&bytes),
                _ => {
                    if let Some((start, buf)) = run.take() {
                        self.write_now(path, start, &buf)?;
                    }
                    run = Some((offset, bytes));
                }
            }
        }
        if let Some((start, buf)) = run {
            self.write_now(path, start, &buf)?;
        }
        Ok(())
    }

    /// Writes what is held back for every file in `dir`.
    pub(crate) fn flush_pending_in(&self, dir: &Path) -> io::Result<()> {
        let paths: Vec<PathBuf> = self
            .lock()
            .pending
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .cloned()
            .collect();
        for path in paths {
            self.flush_pending(&path)?;
        }
        Ok(())
    }

    fn flush_all_pending(&self) -> Result<(), RandomAccessError> {
        let paths: Vec<PathBuf> = self.lock().pending.keys().cloned().collect();
        for path in paths {
            self.flush_pending(&path).map_err(|e| io_error(&path, e))?;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, PoolInner> {
        // Every critical section leaves the maps consistent, so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub(crate) fn io_error(path: &Path, source: io::Error) -> RandomAccessError {
    RandomAccessError::IO {
        return_code: source.raw_os_error(),
        context: Some(path.display().to_string()),
        source,
    }
}
