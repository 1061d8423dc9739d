//! The last stop before `hypercore-protocol`: any encrypted connection (ours or a caller's) is
//! wrapped in a [`Guard`] that splits batch frames per channel, refuses frames the protocol would
//! crash or over-allocate on ([`Inspector`]), stops reading while the driver is behind, and weighs
//! what the protocol writes ([`Backlog`]).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Sink, Stream};
use hypercore_handshake::{CipherEvent, CipherTrait};

use super::batch::split_channels;
use super::inspect::{outbound_weight, FrameLimits, Inspector};
use crate::backlog::Backlog;

/// A checked connection for `hypercore_protocol::Protocol::new`.
pub(crate) struct Guard {
    inner: Box<dyn CipherTrait>,
    inspector: Inspector,
    backlog: Arc<Backlog>,
    /// Parts of an accepted frame not yet handed on.
    ready: VecDeque<Vec<u8>>,
    failed: bool,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("inspector", &self.inspector)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Guard {
    pub(crate) fn new(
        inner: Box<dyn CipherTrait>,
        limits: FrameLimits,
        backlog: Arc<Backlog>,
    ) -> Self {
        Self {
            inner,
            inspector: Inspector::new(limits),
            backlog,
            ready: VecDeque::new(),
            failed: false,
        }
    }

    /// Checks every part of a frame before any of it is handed on.
    fn accept(&mut self, frame: Vec<u8>) -> io::Result<()> {
        let parts = split_channels(frame, usize::MAX);
        let mut messages = 0;
        let mut bytes = 0;
        for part in &parts {
            let facts = self
                .inspector
                .inbound(part)
                .map_err(|violation| violation.into_io())?;
            messages += facts.messages;
            bytes += part.len();
        }
        self.backlog.on_input(messages, bytes);
        self.ready.extend(parts);
        Ok(())
    }
}

impl Stream for Guard {
    type Item = CipherEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<CipherEvent>> {
        let this = &mut *self;
        loop {
            if this.failed {
                return Poll::Ready(None);
            }
            if let Some(part) = this.ready.pop_front() {
                return Poll::Ready(Some(CipherEvent::Message(part)));
            }
            if !this.backlog.input_allowed(cx) {
                return Poll::Pending;
            }
            let next = Pin::new(&mut this.inner).poll_next(cx);
            if !this.backlog.is_noise_done() && this.inner.handshake_hash().is_some() {
                // Errors from here on happened after the Noise handshake, whether or not the
                // protocol reported the handshake yet.
                this.backlog.noise_done();
            }
            match next {
                Poll::Ready(Some(CipherEvent::Message(frame))) => {
                    if let Err(err) = this.accept(frame) {
                        this.failed = true;
                        return Poll::Ready(Some(CipherEvent::ErrStuff(err)));
                    }
                }
                Poll::Ready(Some(other)) => {
                    return Poll::Ready(Some(other));
                }
                other => return other,
            }
        }
    }
}

impl Sink<Vec<u8>> for Guard {
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Vec<u8>) -> io::Result<()> {
        self.backlog.take_outgoing(outbound_weight(&item));
        Pin::new(&mut self.inner).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

impl CipherTrait for Guard {
    fn remote_public_key(&self) -> Option<[u8; 32]> {
        self.inner.remote_public_key()
    }

    fn local_public_key(&self) -> [u8; 32] {
        self.inner.local_public_key()
    }

    fn handshake_hash(&self) -> Option<Vec<u8>> {
        self.inner.handshake_hash()
    }

    fn is_initiator(&self) -> bool {
        self.inner.is_initiator()
    }
}
