//! An in-memory store over one contiguous buffer.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use random_access_storage::{RandomAccess, RandomAccessError};

/// An in-memory store; clones share the same bytes.
///
/// Unlike `random-access-memory`, it keeps one contiguous buffer and only zero-fills bytes that a
/// write or truncate actually adds, so no operation touches a whole page.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the stored bytes.
    #[cfg(any(test, feature = "test-util"))]
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Replaces the stored bytes (tests use it to damage files).
    #[cfg(any(test, feature = "test-util"))]
    pub fn replace(&self, bytes: Vec<u8>) {
        *self.lock() = bytes;
    }

    /// Whether it holds no bytes now.
    pub(crate) fn is_empty_now(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // Every operation leaves the buffer consistent, so a poisoned lock is still usable.
        self.bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn out_of_bounds(offset: u64, end: Option<u64>, length: usize) -> RandomAccessError {
    RandomAccessError::OutOfBounds {
        offset,
        end,
        length: length as u64,
    }
}

fn to_usize(value: u64, len: usize) -> Result<usize, RandomAccessError> {
    usize::try_from(value).map_err(|_| out_of_bounds(value, None, len))
}

#[async_trait]
impl RandomAccess for MemoryStore {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        let mut bytes = self.lock();
        let start = to_usize(offset, bytes.len())?;
        let end = start
            .checked_add(data.len())
            .ok_or_else(|| out_of_bounds(offset, None, bytes.len()))?;
        if end > bytes.len() {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }

    async fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, RandomAccessError> {
        let bytes = self.lock();
        let end = offset.checked_add(length);
        match end {
            Some(end) if end <= bytes.len() as u64 => {
                Ok(bytes[offset as usize..end as usize].to_vec())
            }
            _ => Err(out_of_bounds(offset, end, bytes.len())),
        }
    }

    async fn del(&mut self, offset: u64, length: u64) -> Result<(), RandomAccessError> {
        let mut bytes = self.lock();
        let len = bytes.len() as u64;
        if offset > len {
            return Err(out_of_bounds(offset, None, bytes.len()));
        }
        if length == 0 {
            return Ok(());
        }
        if offset.saturating_add(length) >= len {
            bytes.truncate(offset as usize);
        } else {
            bytes[offset as usize..(offset + length) as usize].fill(0);
        }
        Ok(())
    }

    async fn truncate(&mut self, length: u64) -> Result<(), RandomAccessError> {
        let mut bytes = self.lock();
        let length = to_usize(length, bytes.len())?;
        bytes.resize(length, 0);
        Ok(())
    }

    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        Ok(self.lock().len() as u64)
    }

    async fn is_empty(&mut self) -> Result<bool, RandomAccessError> {
        Ok(self.lock().is_empty())
    }

    async fn sync_all(&mut self) -> Result<(), RandomAccessError> {
        Ok(())
    }
}
