//! A hypercore shared between local handles and replication connections, with change notices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

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

/// Called on every [`SharedCore::notify_changed`]: how a store hears that one of its feeds
/// changed without holding a waiter per feed (a live replication watches the feeds whose
/// channels it closed this way).
pub type ChangeHook = Arc<dyn Fn() + Send + Sync>;

struct CoreCell {
    core: async_lock::Mutex<Hypercore>,
    version: AtomicU64,
    event: event_listener::Event,
    hook: Option<ChangeHook>,
}

impl std::fmt::Debug for CoreCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreCell")
            .field("version", &self.version)
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}

impl SharedCore {
    /// Wraps an open hypercore.
    pub fn new(core: Hypercore) -> Self {
        Self::build(core, None)
    }

    /// Wraps an open hypercore whose every change also calls `hook`.
    pub fn with_change_hook(core: Hypercore, hook: ChangeHook) -> Self {
        Self::build(core, Some(hook))
    }

    fn build(core: Hypercore, hook: Option<ChangeHook>) -> Self {
        Self {
            inner: Arc::new(CoreCell {
                core: async_lock::Mutex::new(core),
                version: AtomicU64::new(0),
                event: event_listener::Event::new(),
                hook,
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
        if let Some(hook) = &self.inner.hook {
            hook();
        }
    }

    /// A waiter for this core's changes that does not keep the core open.
    pub fn watch(&self) -> ChangeWatch {
        ChangeWatch {
            cell: Arc::downgrade(&self.inner),
        }
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

/// Waits for a core's changes without holding it ([`SharedCore::watch`]): once every
/// [`SharedCore`] handle is gone, the hypercore is dropped whatever watches it.
#[derive(Debug, Clone)]
pub struct ChangeWatch {
    cell: Weak<CoreCell>,
}

impl ChangeWatch {
    /// Waits until the change counter differs from `seen` and returns the new value; `None`
    /// if the core is gone when it looks. (A core dropped during the wait sends no notice: the
    /// owner ends the wait itself when it lets the core go.)
    pub async fn changed(&self, seen: u64) -> Option<u64> {
        loop {
            let listener = {
                let cell = self.cell.upgrade()?;
                let listener = cell.event.listen();
                let now = cell.version.load(Ordering::SeqCst);
                if now != seen {
                    return Some(now);
                }
                listener
            };
            listener.await;
        }
    }
}
