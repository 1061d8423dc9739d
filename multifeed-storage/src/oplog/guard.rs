//! The guards: random-access stores over a feed's oplog and bitfield that show hypercore the
//! planned view, and shift its new entries past the stored ones.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use random_access_storage::{RandomAccess, RandomAccessError};

use super::codec::*;
use super::plan::*;
use crate::factory::BoxedStore;

/// Guards a feed's `bitfield` and `oplog` stores; see the module docs.
pub(crate) async fn guard(
    bitfield: BoxedStore,
    mut oplog: BoxedStore,
) -> Result<(BitfieldGuard, OplogGuard), RandomAccessError> {
    let len = oplog.len().await?;
    if len == 0 {
        let bitfield = BitfieldGuard {
            inner: bitfield,
            hidden: Arc::new(AtomicBool::new(false)),
        };
        return Ok((bitfield, OplogGuard::plain(oplog)));
    }
    let content = oplog.read(0, len).await?;
    let mut bitfield = bitfield;
    let bitfield_len = bitfield.len().await?;
    let bits = if bitfield_len == 0 {
        Vec::new()
    } else {
        bitfield.read(0, bitfield_len).await?
    };
    let found = plan(&content, &bits);
    for slot in &found.torn_slots {
        oplog.write(slot * SLOT_SIZE, &[0u8; LEADER_SIZE]).await?;
    }
    if found.cut {
        oplog.truncate(ENTRIES_START + found.entries_len).await?;
    }
    let hidden = Arc::new(AtomicBool::new(found.view.is_some()));
    let bitfield = BitfieldGuard {
        inner: bitfield,
        hidden: hidden.clone(),
    };
    let oplog = OplogGuard {
        inner: oplog,
        pending: found.entries_len,
        view: found.view,
        shifted: false,
    };
    Ok((bitfield, oplog))
}

/// The bitfield store of one feed: shown empty to hypercore's open when the oplog guard carries
/// its bits in entries, stored bytes otherwise and after the first write.
#[derive(Debug)]
pub(crate) struct BitfieldGuard {
    inner: BoxedStore,
    hidden: Arc<AtomicBool>,
}

impl BitfieldGuard {
    fn hidden(&self) -> bool {
        self.hidden.load(Ordering::Relaxed)
    }

    fn reveal(&self) {
        self.hidden.store(false, Ordering::Relaxed);
    }
}

#[async_trait]
impl RandomAccess for BitfieldGuard {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        self.reveal();
        self.inner.write(offset, data).await
    }

    async fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, RandomAccessError> {
        if self.hidden() {
            return if offset == 0 && length == 0 {
                Ok(Vec::new())
            } else {
                Err(RandomAccessError::OutOfBounds {
                    offset,
                    end: offset.checked_add(length),
                    length: 0,
                })
            };
        }
        self.inner.read(offset, length).await
    }

    async fn del(&mut self, offset: u64, length: u64) -> Result<(), RandomAccessError> {
        self.reveal();
        self.inner.del(offset, length).await
    }

    async fn truncate(&mut self, length: u64) -> Result<(), RandomAccessError> {
        self.reveal();
        self.inner.truncate(length).await
    }

    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        if self.hidden() {
            return Ok(0);
        }
        self.inner.len().await
    }

    async fn is_empty(&mut self) -> Result<bool, RandomAccessError> {
        Ok(self.len().await? == 0)
    }

    async fn sync_all(&mut self) -> Result<(), RandomAccessError> {
        self.inner.sync_all().await
    }
}

/// The oplog store of one feed, guarded as described in the module docs.
#[derive(Debug)]
pub(crate) struct OplogGuard {
    inner: BoxedStore,
    /// Length of the stored entries that were pending when the feed was opened.
    pending: u64,
    /// The entries shown to hypercore's open instead of the stored ones.
    view: Option<Vec<u8>>,
    /// Whether entry-area offsets are shifted past the pending entries (after the first write).
    shifted: bool,
}

impl OplogGuard {
    fn plain(inner: BoxedStore) -> Self {
        Self {
            inner,
            pending: 0,
            view: None,
            shifted: false,
        }
    }

    /// Physical offset of a logical entry-area offset.
    fn map(&self, offset: u64) -> u64 {
        if offset >= ENTRIES_START && self.shifted {
            offset + self.pending
        } else {
            offset
        }
    }

    /// The first write into the entry area ends the view and starts the shift.
    fn enter_entries(&mut self) {
        self.view = None;
        if self.pending > 0 {
            self.shifted = true;
        }
    }
}

#[async_trait]
impl RandomAccess for OplogGuard {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > ENTRIES_START {
            self.enter_entries();
        }
        if offset < ENTRIES_START && end > ENTRIES_START {
            // Never done by hypercore (headers fit their slots), but keep the mapping exact.
            let (head, tail) = data.split_at((ENTRIES_START - offset) as usize);
            self.inner.write(offset, head).await?;
            let at = self.map(ENTRIES_START);
            return self.inner.write(at, tail).await;
        }
        let at = self.map(offset);
        self.inner.write(at, data).await
    }

    async fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, RandomAccessError> {
        let end = offset.saturating_add(length);
        if let Some(view) = &self.view {
            if end > ENTRIES_START {
                let view_end = ENTRIES_START + view.len() as u64;
                if end > view_end {
                    return Err(RandomAccessError::OutOfBounds {
                        offset,
                        end: Some(end),
                        length: view_end,
                    });
                }
                let mut out = if offset < ENTRIES_START {
                    self.inner.read(offset, ENTRIES_START - offset).await?
                } else {
                    Vec::new()
                };
                let from = (offset.max(ENTRIES_START) - ENTRIES_START) as usize;
                out.extend_from_slice(&view[from..(end - ENTRIES_START) as usize]);
                return Ok(out);
            }
            return self.inner.read(offset, length).await;
        }
        if self.shifted && offset < ENTRIES_START && end > ENTRIES_START {
            let mut head = self.inner.read(offset, ENTRIES_START - offset).await?;
            let tail = self
                .inner
                .read(self.map(ENTRIES_START), end - ENTRIES_START)
                .await?;
            head.extend_from_slice(&tail);
            return Ok(head);
        }
        let at = self.map(offset);
        self.inner.read(at, length).await
    }

    async fn del(&mut self, offset: u64, length: u64) -> Result<(), RandomAccessError> {
        let end = offset.saturating_add(length);
        if end > ENTRIES_START {
            self.enter_entries();
        }
        if self.shifted && offset < ENTRIES_START && end > ENTRIES_START {
            self.inner.del(offset, ENTRIES_START - offset).await?;
            let at = self.map(ENTRIES_START);
            return self.inner.del(at, end - ENTRIES_START).await;
        }
        let at = self.map(offset);
        self.inner.del(at, length).await
    }

    async fn truncate(&mut self, length: u64) -> Result<(), RandomAccessError> {
        if length <= ENTRIES_START {
            // Hypercore truncates to the entry start right after writing a header that covers
            // every entry, pending ones included: nothing is pending any more.
            self.pending = 0;
            self.shifted = false;
            self.view = None;
            return self.inner.truncate(length).await;
        }
        self.enter_entries();
        let at = self.map(length);
        self.inner.truncate(at).await
    }

    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        if let Some(view) = &self.view {
            let stored = self.inner.len().await?;
            return Ok(if stored >= ENTRIES_START {
                ENTRIES_START + view.len() as u64
            } else {
                stored
            });
        }
        let len = self.inner.len().await?;
        if self.shifted && len >= ENTRIES_START + self.pending {
            Ok(len - self.pending)
        } else {
            Ok(len)
        }
    }

    async fn is_empty(&mut self) -> Result<bool, RandomAccessError> {
        Ok(self.len().await? == 0)
    }

    async fn sync_all(&mut self) -> Result<(), RandomAccessError> {
        self.inner.sync_all().await
    }
}
