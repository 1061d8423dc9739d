//! A hypercore shared between local handles and replication connections, with change notices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hypercore::Hypercore;

/// A hypercore shared by the local feed handle and every replication connection.
///
/// Besides the lock, it carries a change counter: whoever appends or stores downloaded blocks
/// calls [`notify_changed`](Self::notify_changed), and live connections wait on
/// [`changed`](Self::changed) to tell their peers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SharedCore {
    inner: Arc<CoreCell>,
}

#[derive(Debug)]
struct CoreCell {
    core: async_lock::Mutex<Hypercore>,
    version: AtomicU64,
    event: event_listener::Event,
}

impl SharedCore {
    /// Wraps an open hypercore.
    pub fn new(core: Hypercore) -> Self {
        Self {
            inner: Arc::new(CoreCell {
                core: async_lock::Mutex::new(core),
                version: AtomicU64::new(0),
                event: event_listener::Event::new(),
            }),
        }
    }

    /// How many handles on this core exist (clones of it): 1 means only the caller's.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Locks the hypercore.
    pub async fn lock(&self) -> async_lock::MutexGuard<'_, Hypercore> {
        self.inner.core.lock().await
    }

    /// Locks the hypercore if nobody holds its lock now.
    pub fn try_lock(&self) -> Option<async_lock::MutexGuard<'_, Hypercore>> {
        self.inner.core.try_lock()
    }

    /// The change counter: it grows on every [`notify_changed`](Self::notify_changed).
    pub fn version(&self) -> u64 {
        self.inner.version.load(Ordering::SeqCst)
    }

    /// Tells every waiter that the core has new entries or blocks.
    pub fn notify_changed(&self) {
        self.inner.version.fetch_add(1, Ordering::SeqCst);
        self.inner.event.notify(usize::MAX);
    }

    /// Waits until the change counter differs from `seen`; returns the new value.
    pub async fn changed(&self, seen: u64) -> u64 {
        loop {
            let listener = self.inner.event.listen();
            let now = self.version();
            if now != seen {
                return now;
            }
            listener.await;
        }
    }
}
