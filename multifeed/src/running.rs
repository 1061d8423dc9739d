//! The replications running on one multifeed, so that `close` can end them and wait until none
//! runs: after `close` returns, no replication writes to the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures::future::{AbortHandle, AbortRegistration};

/// How long `close` waits for aborted replications to be dropped.
const END_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The registry; one per multifeed.
#[derive(Debug, Default)]
pub(crate) struct Running {
    next: AtomicU64,
    handles: Mutex<HashMap<u64, AbortHandle>>,
    ended: event_listener::Event,
}

/// A replication's place in the registry; dropping it (when the replication's future completes
/// or is dropped) removes it.
#[derive(Debug)]
pub(crate) struct Registration<'a> {
    running: &'a Running,
    id: u64,
}

impl Running {
    /// Registers a replication; it ends (as aborted) when [`end_all`](Self::end_all) runs.
    pub(crate) fn register(&self) -> (Registration<'_>, AbortRegistration) {
        let (handle, registration) = AbortHandle::new_pair();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(id, handle);
        (Registration { running: self, id }, registration)
    }

    /// Aborts every registered replication and waits until each of them is gone (at most
    /// [`END_WAIT`]: an aborted replication is never polled again, so one whose task is never
    /// woken cannot write either).
    pub(crate) async fn end_all(&self) {
        let wait = std::pin::pin!(self.wait_all_ended());
        let bound = std::pin::pin!(async_io::Timer::after(END_WAIT));
        futures::future::select(wait, bound).await;
    }

    async fn wait_all_ended(&self) {
        loop {
            let listener = self.ended.listen();
            {
                let handles = lock(&self.handles);
                if handles.is_empty() {
                    return;
                }
                for handle in handles.values() {
                    handle.abort();
                }
            }
            listener.await;
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        lock(&self.running.handles).remove(&self.id);
        self.running.ended.notify(usize::MAX);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
