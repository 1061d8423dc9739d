//! What one connection holds in its queues, shared by the transport guard and the driver.
//!
//! `hypercore-protocol` 0.7.2 has two unbounded queues: it decodes everything the transport hands
//! it into per-channel queues, and it moves everything the driver sends into a write queue. A peer
//! that sends faster than we handle, or asks for much and never reads, grows them without bound.
//! The bounds live here:
//! - **input**: the guard stops handing frames to the protocol once [`MAX_UNREAD_MESSAGES`]
//!   messages or [`MAX_UNREAD_BYTES`] bytes were read that the driver has not yet taken; the
//!   driver says when it has taken everything ([`Backlog::input_taken`]), which wakes the guard;
//! - **output**: the driver adds the weight of what it hands to the protocol, the guard subtracts
//!   what the protocol hands to the transport; above [`OUTGOING_HIGH`] the driver stops serving
//!   requests (they wait, bounded) until the transport drained below [`OUTGOING_LOW`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Context;

use futures::task::AtomicWaker;

/// Messages read ahead of the driver before the guard stops reading.
pub(crate) const MAX_UNREAD_MESSAGES: usize = 4096;
/// Bytes read ahead of the driver before the guard stops reading (one frame may pass it).
pub(crate) const MAX_UNREAD_BYTES: usize = 8 << 20;
/// Weight waiting for the transport above which the driver stops answering requests.
pub(crate) const OUTGOING_HIGH: u64 = 8 << 20;
/// Weight waiting for the transport below which the driver answers requests again.
pub(crate) const OUTGOING_LOW: u64 = 2 << 20;

/// The shared state of one connection.
#[derive(Debug)]
pub(crate) struct Backlog {
    unread_messages: AtomicUsize,
    unread_bytes: AtomicUsize,
    read_waker: AtomicWaker,
    outgoing: AtomicU64,
    drained: event_listener::Event,
    noise_done: AtomicBool,
}

impl Default for Backlog {
    fn default() -> Self {
        Self {
            unread_messages: AtomicUsize::new(0),
            unread_bytes: AtomicUsize::new(0),
            read_waker: AtomicWaker::new(),
            outgoing: AtomicU64::new(0),
            drained: event_listener::Event::new(),
            noise_done: AtomicBool::new(false),
        }
    }
}

impl Backlog {
    /// Whether the guard may read more; if not, it is woken when the driver took its input.
    pub(crate) fn input_allowed(&self, cx: &Context<'_>) -> bool {
        if self.input_below_limits() {
            return true;
        }
        self.read_waker.register(cx.waker());
        // The driver may have taken everything between the check and the registration.
        self.input_below_limits()
    }

    fn input_below_limits(&self) -> bool {
        self.unread_messages.load(Ordering::Acquire) < MAX_UNREAD_MESSAGES
            && self.unread_bytes.load(Ordering::Acquire) < MAX_UNREAD_BYTES
    }

    /// The guard handed a frame of `messages` messages and `bytes` bytes to the protocol.
    pub(crate) fn on_input(&self, messages: usize, bytes: usize) {
        self.unread_messages.fetch_add(messages, Ordering::AcqRel);
        self.unread_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    /// The driver took every message the protocol decoded: the guard may read again.
    pub(crate) fn input_taken(&self) {
        self.unread_messages.store(0, Ordering::Release);
        self.unread_bytes.store(0, Ordering::Release);
        self.read_waker.wake();
    }

    /// The driver handed messages of this weight to the protocol.
    pub(crate) fn add_outgoing(&self, weight: u64) {
        self.outgoing.fetch_add(weight, Ordering::AcqRel);
    }

    /// The protocol handed a frame of this weight to the transport.
    pub(crate) fn take_outgoing(&self, weight: u64) {
        let mut current = self.outgoing.load(Ordering::Acquire);
        loop {
            let next = current.saturating_sub(weight);
            match self.outgoing.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        if current.saturating_sub(weight) <= OUTGOING_LOW {
            self.drained.notify(usize::MAX);
        }
    }

    /// Weight handed to the protocol that the transport has not taken yet.
    pub(crate) fn outgoing(&self) -> u64 {
        self.outgoing.load(Ordering::Acquire)
    }

    /// Resolves once the outgoing weight is at most [`OUTGOING_LOW`].
    pub(crate) async fn outgoing_drained(&self) {
        loop {
            let listener = self.drained.listen();
            if self.outgoing() <= OUTGOING_LOW {
                return;
            }
            listener.await;
        }
    }

    /// The Noise handshake completed.
    pub(crate) fn noise_done(&self) {
        self.noise_done.store(true, Ordering::Release);
    }

    pub(crate) fn is_noise_done(&self) -> bool {
        self.noise_done.load(Ordering::Acquire)
    }
}
