//! A signal from the driver to the transport: flush what is queued, then close the write side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::task::AtomicWaker;

/// Shared by the driver (which asks) and the secure channel (which closes).
#[derive(Debug, Clone, Default)]
pub(crate) struct CloseSignal {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    requested: AtomicBool,
    waker: AtomicWaker,
}

impl CloseSignal {
    /// Asks the transport to close once everything queued is written.
    pub(crate) fn close(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        self.inner.waker.wake();
    }

    /// Whether a close was asked for; registers the waker for a later ask.
    pub(crate) fn requested(&self, waker: &std::task::Waker) -> bool {
        self.inner.waker.register(waker);
        self.inner.requested.load(Ordering::SeqCst)
    }
}
