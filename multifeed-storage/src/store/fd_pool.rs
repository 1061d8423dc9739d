//! A bounded, shared pool of open files.
//!
//! Files are known by a small id handed out once per path ([`FdPool::file_id`]), so the hot
//! paths (every read and write) hash a `u64`, not a path.

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

/// Writes longer than this do not fill the page cache.
const MAX_FILL: usize = 64 * 1024;

/// Bound on the remembered missing files.
const MAX_MISSING: usize = 65_536;

/// The order a feed's held writes reach the files in: a block's data before the oplog entry
/// that records it, entries before the tree nodes and bitfield pages hypercore writes after
/// them, and all of them before the header write or truncation that waits for them.
pub(crate) const FLUSH_ORDER: [&str; 4] = ["data", "oplog", "tree", "bitfield"];

/// Whether an open failed because the process (EMFILE) or the system (ENFILE) has no
/// descriptor left: an I/O condition that passes, never a sign of damage.
pub(crate) fn out_of_descriptors(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(23 | 24))
}

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
    /// Open files by id, with the tick of their last use.
    open: HashMap<u64, (Arc<File>, u64)>,
    /// Files written since the last [`FdPool::sync_all`].
    dirty: HashSet<u64>,
    /// Files found missing by a lookup and not created since (saves a failing `open` per
    /// lookup of a new feed's files; the pool's root belongs to one process).
    missing: HashSet<u64>,
    ids: HashMap<PathBuf, u64>,
    /// Path of each id.
    paths: Vec<Arc<Path>>,
    cache: PageCache,
    /// Writes held back (see [`DiskStore`](crate::DiskStore)), by file and offset.
    pending: HashMap<u64, BTreeMap<u64, Vec<u8>>>,
    /// Feed directories of replicas, whose oplog entries are held too.
    replicas: HashSet<PathBuf>,
    /// Each store's length, held writes included (for filling the page cache on write).
    lens: HashMap<u64, u64>,
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
                paths: Vec::new(),
                cache: PageCache::new(cache_pages),
                pending: HashMap::new(),
                replicas: HashSet::new(),
                lens: HashMap::new(),
            })),
        }
    }

    /// The id the pool knows `path` by (the same for the pool's whole life).
    pub(crate) fn file_id(&self, path: &Path) -> u64 {
        let mut inner = self.lock();
        if let Some(&id) = inner.ids.get(path) {
            return id;
        }
        let next = inner.paths.len() as u64;
        inner.ids.insert(path.to_path_buf(), next);
        inner.paths.push(Arc::from(path));
        next
    }

    /// The path of file `id`.
    pub(crate) fn path(&self, id: u64) -> Arc<Path> {
        self.lock().paths[id as usize].clone()
    }

    /// Runs `f` with the page cache locked.
    pub(crate) fn with_pages<T>(&self, f: impl FnOnce(&mut PageCache) -> T) -> T {
        f(&mut self.lock().cache)
    }

    /// How many files are open now.
    #[cfg(any(test, feature = "test-util"))]
    pub fn open_count(&self) -> usize {
        self.lock().open.len()
    }

    /// How many files were written since the last [`sync_all`](Self::sync_all).
    #[cfg(any(test, feature = "test-util"))]
    pub fn dirty_count(&self) -> usize {
        self.lock().dirty.len()
    }

    /// Closes every open file and empties the page cache (stores reopen files on next use).
    pub fn clear(&self) {
        // Held-back writes are only ever delayed, never dropped.
        let _ = self.write_held();
        let mut inner = self.lock();
        inner.open.clear();
        inner.missing.clear();
        inner.cache.clear();
    }

    /// Forgets every file under `dir` (a removed feed's folder, about to be deleted): their
    /// held writes are dropped, open descriptors closed, cached pages and lengths forgotten,
    /// and they count as missing.
    pub(crate) fn forget_dir(&self, dir: &Path) {
        let mut inner = self.lock();
        let ids: Vec<u64> = inner
            .ids
            .iter()
            .filter(|(path, _)| path.starts_with(dir))
            .map(|(_, &id)| id)
            .collect();
        for id in ids {
            inner.open.remove(&id);
            inner.dirty.remove(&id);
            inner.pending.remove(&id);
            inner.lens.remove(&id);
            inner.missing.insert(id);
        }
        inner.replicas.remove(dir);
        // The page cache keeps no per-file index: dropping it all is cheap next to a removal.
        inner.cache.clear();
    }

    /// The open file `id`; `None` if it does not exist and `create` is false.
    pub(crate) fn file(&self, id: u64, create: bool) -> io::Result<Option<Arc<File>>> {
        let path = {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            if let Some((file, used)) = inner.open.get_mut(&id) {
                *used = tick;
                return Ok(Some(file.clone()));
            }
            if !create && inner.missing.contains(&id) {
                return Ok(None);
            }
            inner.paths[id as usize].clone()
        };
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
        // Out of descriptors (other pools or code of the process hold them): give back half of
        // ours, keep the pool that much smaller from now on, and try again.
        let mut opened = open(&path);
        for _ in 0..8 {
            match &opened {
                Err(err) if out_of_descriptors(err) && self.shrink() => opened = open(&path),
                _ => break,
            }
        }
        let file = match opened {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound && create => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                open(&path)?
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let mut inner = self.lock();
                if inner.missing.len() >= MAX_MISSING {
                    inner.missing.clear();
                }
                inner.missing.insert(id);
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        let file = Arc::new(file);
        let mut inner = self.lock();
        if create {
            inner.missing.remove(&id);
        }
        while inner.open.len() >= inner.max_open {
            let oldest = inner
                .open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id);
            match oldest {
                Some(oldest) => {
                    inner.open.remove(&oldest);
                }
                None => break,
            }
        }
        let tick = inner.tick;
        let file = inner.open.entry(id).or_insert((file, tick)).0.clone();
        Ok(Some(file))
    }

    /// Closes the older half of the open files and lowers the pool's bound to what is left;
    /// false when nothing was open to give back.
    fn shrink(&self) -> bool {
        let mut inner = self.lock();
        if inner.open.is_empty() {
            return false;
        }
        let mut by_age: Vec<(u64, u64)> = inner
            .open
            .iter()
            .map(|(id, (_, used))| (*used, *id))
            .collect();
        by_age.sort_unstable();
        let close = by_age.len().div_ceil(2);
        for (_, id) in by_age.into_iter().take(close) {
            inner.open.remove(&id);
        }
        inner.max_open = inner.open.len().max(1);
        true
    }

    /// The most files this pool keeps open now (lowered when the process ran out of
    /// descriptors).
    pub fn max_open(&self) -> usize {
        self.lock().max_open
    }

    pub(crate) fn mark_dirty(&self, id: u64) {
        self.lock().dirty.insert(id);
    }

    /// Flushes every file written since the last call to stable storage (fsync).
    pub fn sync_all(&self) -> Result<(), RandomAccessError> {
        self.write_held()?;
        let dirty: Vec<u64> = self.lock().dirty.drain().collect();
        let mut result = Ok(());
        for id in dirty {
            let synced = self
                .file(id, false)
                .and_then(|file| file.map_or(Ok(()), |f| f.sync_data()));
            if let Err(err) = synced {
                // Keep it dirty so a later sync retries it.
                self.mark_dirty(id);
                result = Err(io_error(&self.path(id), err));
            }
        }
        result
    }

    /// Writes `data` at `offset` of file `id` now: `pwrite`, page cache, dirty mark.
    pub(crate) fn write_now(&self, id: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let file = self
            .file(id, true)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        file.write_all_at(data, offset)?;
        let mut inner = self.lock();
        inner.cache.write(id, offset, data);
        // Small writes only: a big one (an append batch) would push out what is being read.
        if data.len() <= MAX_FILL {
            if let Some(&len) = inner.lens.get(&id) {
                inner.cache.fill(id, offset, data, len);
            }
        }
        inner.dirty.insert(id);
        Ok(())
    }

    /// Records the length of file `id` as its store sees it (held writes included).
    pub(crate) fn set_len(&self, id: u64, len: u64) {
        self.lock().lens.insert(id, len);
    }

    /// Holds a write back; false if it overlaps one already held (flush, then retry).
    pub(crate) fn hold(&self, id: u64, offset: u64, data: &[u8]) -> bool {
        let mut inner = self.lock();
        let held = inner.pending.entry(id).or_default();
        let end = offset + data.len() as u64;
        // Held writes never overlap, so only the last one starting before `end` can.
        let overlaps = held
            .range(..end)
            .next_back()
            .is_some_and(|(start, bytes)| start + bytes.len() as u64 > offset);
        if overlaps {
            return false;
        }
        held.insert(offset, data.to_vec());
        true
    }

    /// Whether a write held back for file `id` overlaps `offset..end`.
    pub(crate) fn holds(&self, id: u64, offset: u64, end: u64) -> bool {
        let inner = self.lock();
        let Some(held) = inner.pending.get(&id) else {
            return false;
        };
        held.range(..end)
            .next_back()
            .is_some_and(|(start, bytes)| start + bytes.len() as u64 > offset)
    }

    /// Whether writes are held back for the file at `path` (without giving it an id).
    pub(crate) fn holds_writes_for(&self, path: &Path) -> bool {
        let inner = self.lock();
        inner
            .ids
            .get(path)
            .is_some_and(|id| inner.pending.contains_key(id))
    }

    /// Whether anything is held back for file `id`.
    pub(crate) fn holds_any(&self, id: u64) -> bool {
        self.lock().pending.contains_key(&id)
    }

    /// Writes what is held back for file `id`: runs in one `pwrite` each, where a run also
    /// spans gaps of up to [`MAX_GAP`] bytes whose current content the page cache holds
    /// (rewritten as they are; hypercore's tree writes land a few nodes apart).
    pub(crate) fn flush_pending(&self, id: u64) -> io::Result<()> {
        let Some(held) = self.lock().pending.remove(&id) else {
            return Ok(());
        };
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for (offset, bytes) in held {
            let joined = match runs.last_mut() {
                Some((start, buf)) => {
                    let end = *start + buf.len() as u64;
                    end == offset
                        || (offset - end <= MAX_GAP
                            && self.with_pages(|pages| pages.copy_into(id, end, offset - end, buf)))
                }
                None => false,
            };
            match runs.last_mut() {
                Some((_, buf)) if joined => buf.extend_from_slice(&bytes),
                _ => runs.push((offset, bytes)),
            }
        }
        let mut runs = runs.into_iter();
        while let Some((start, buf)) = runs.next() {
            if let Err(err) = self.write_now(id, start, &buf) {
                // Nothing held is dropped: what was not written stays held for a retry.
                let mut inner = self.lock();
                let held = inner.pending.entry(id).or_default();
                for (offset, bytes) in std::iter::once((start, buf)).chain(runs) {
                    held.entry(offset).or_insert(bytes);
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// Writes what is held back for the files `ids`, in that order.
    pub(crate) fn flush_files(&self, ids: &[u64]) -> io::Result<()> {
        for &id in ids {
            self.flush_pending(id)?;
        }
        Ok(())
    }

    /// The ids of the feed files in `dir`, in [`FLUSH_ORDER`].
    pub(crate) fn feed_ids(&self, dir: &Path) -> [u64; 4] {
        FLUSH_ORDER.map(|name| self.file_id(&dir.join(name)))
    }

    /// Creates a new feed's directory; if it did not exist, its files do not either, and the
    /// pool remembers them as missing (no lookup before each is created). Errors are left to
    /// the stores' own operations to report.
    pub(crate) fn prepare_feed_dir(&self, dir: &Path) {
        let created = match std::fs::create_dir(dir) {
            Ok(()) => true,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                dir.parent()
                    .is_some_and(|parent| std::fs::create_dir_all(parent).is_ok())
                    && std::fs::create_dir(dir).is_ok()
            }
            Err(_) => false,
        };
        if created {
            let ids = self.feed_ids(dir);
            let mut inner = self.lock();
            if inner.missing.len() + ids.len() > MAX_MISSING {
                inner.missing.clear();
            }
            for id in ids {
                if !inner.open.contains_key(&id) {
                    inner.missing.insert(id);
                }
            }
        }
    }

    /// Marks `dir` as a replica's feed directory (before its stores are opened).
    pub(crate) fn mark_replica(&self, dir: PathBuf) {
        self.lock().replicas.insert(dir);
    }

    /// Whether `dir` is a replica's feed directory.
    pub(crate) fn is_replica(&self, dir: &Path) -> bool {
        self.lock().replicas.contains(dir)
    }

    /// Writes everything held back, each feed's files in [`FLUSH_ORDER`] (no fsync).
    pub fn write_held(&self) -> Result<(), RandomAccessError> {
        loop {
            let (id, path) = {
                let inner = self.lock();
                let Some(&id) = inner.pending.keys().next() else {
                    return Ok(());
                };
                (id, inner.paths[id as usize].clone())
            };
            let is_feed_file = path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| FLUSH_ORDER.contains(&name));
            let flushed = match path.parent() {
                Some(dir) if is_feed_file => self.flush_files(&self.feed_ids(dir)),
                _ => self.flush_pending(id),
            };
            flushed.map_err(|e| io_error(&path, e))?;
        }
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
