//! An encrypted, framed connection for `hypercore-protocol`: our own `CipherTrait`.
//!
//! It drives `hypercore_handshake`'s sans-IO cipher (Noise XX + secret-stream encryption) over
//! [`Framed`], so that: every read ends in `Pending` with a registered waker; end of stream and
//! I/O errors are reported as [`CipherEvent::ErrStuff`] (the protocol then fails instead of
//! hanging); input decrypted during a `Sink` call is queued and the task woken; and multi-channel
//! batch frames are split per channel before the protocol decodes them.

use std::collections::VecDeque;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite, Sink, Stream};
use hypercore_handshake::state_machine::hc_specific::generate_keypair;
use hypercore_handshake::state_machine::SecStream;
use hypercore_handshake::{Cipher, CipherEvent, CipherTrait};

use super::batch::split_channels;
use super::framing::{Framed, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use crate::close::CloseSignal;

/// Any byte stream the connection can run over.
pub(crate) trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ByteStream for T {}

/// Encrypted batches are cut to this size before encryption.
const MAX_PLAIN_FRAME: usize = 1 << 20;
/// Above this many unwritten bytes, the sink applies backpressure.
const HIGH_WATER: usize = 4 << 20;
/// Frames read into the cipher per poll: decrypted input waits in small steps, never the whole
/// socket buffer at once.
const FRAMES_PER_POLL: usize = 16;

/// The encrypted connection handed to `hypercore_protocol::Protocol::new`.
pub(crate) struct SecureChannel {
    framed: Mutex<Framed<Box<dyn ByteStream>>>,
    cipher: Cipher,
    plain_out: VecDeque<CipherEvent>,
    failure: Option<io::Error>,
    finished: bool,
    is_initiator: bool,
    close: CloseSignal,
    write_closed: bool,
}

impl std::fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureChannel")
            .field("is_initiator", &self.is_initiator)
            .field("failed", &self.failure.is_some())
            .finish()
    }
}

impl SecureChannel {
    /// A connection that runs the Noise XX handshake over `io`.
    pub(crate) fn new(
        io: Box<dyn ByteStream>,
        is_initiator: bool,
        close: CloseSignal,
    ) -> io::Result<Self> {
        let state = if is_initiator {
            SecStream::new_initiator_xx(&[]).map(Into::into)
        } else {
            let keypair = generate_keypair().map_err(io::Error::other)?;
            SecStream::new_responder_xx(&keypair, &[]).map(Into::into)
        }
        .map_err(io::Error::other)?;
        Ok(Self {
            framed: Mutex::new(Framed::new(io)),
            cipher: Cipher::new(None, state),
            plain_out: VecDeque::new(),
            failure: None,
            finished: false,
            is_initiator,
            close,
            write_closed: false,
        })
    }

    fn fail(&mut self, err: io::Error) {
        if self.failure.is_none() && !self.finished {
            self.failure = Some(err);
        }
    }

    /// Runs a cipher call, turning a panic inside it into an error.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Cipher) -> io::Result<T>) -> io::Result<T> {
        let cipher = &mut self.cipher;
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(cipher))) {
            Ok(result) => result,
            Err(_) => Err(io::Error::other("the cipher failed on its input")),
        }
    }

    /// Moves decrypted messages into `plain_out`; returns whether any arrived.
    fn drain_decrypted(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.guarded(|c| c.next_decrypted_message()) {
                // Batch frames are split per channel by the `Guard` every connection runs
                // through, not here (that was the same walk and copy twice per frame).
                Ok(Some(CipherEvent::Message(frame))) => {
                    any = true;
                    self.plain_out.push_back(CipherEvent::Message(frame));
                }
                Ok(Some(CipherEvent::ErrStuff(err))) | Err(err) => {
                    self.fail(err);
                    return any;
                }
                Ok(Some(event)) => {
                    any = true;
                    self.plain_out.push_back(event);
                }
                Ok(None) => return any,
            }
        }
    }

    /// Encrypts queued plaintext into frames and writes what the connection takes.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_with(cx, true)
    }

    /// `retry`: also write when the last write found the connection full (the read side
    /// always does; a flush after each queued frame does not, see
    /// [`Framed::poll_write_unless_blocked`]).
    fn poll_send_with(&mut self, cx: &mut Context<'_>, retry: bool) -> Poll<io::Result<()>> {
        loop {
            match self.guarded(|c| c.get_next_sendable_message()) {
                Ok(Some(frame)) => {
                    let queued = lock(&self.framed).queue(&frame);
                    if let Err(err) = queued {
                        return Poll::Ready(Err(err));
                    }
                }
                Ok(None) => break,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
        let mut framed = lock(&self.framed);
        if retry {
            framed.poll_write_all(cx)
        } else {
            framed.poll_write_unless_blocked(cx)
        }
    }

    /// Writes what is queued, retrying even after the connection was found full (for a user of
    /// the sink alone, which has no read side to retry for it).
    #[cfg(feature = "hostile-peer")]
    pub(crate) fn poll_write_retrying(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_with(cx, true)
    }

    /// Reads up to [`FRAMES_PER_POLL`] complete frames into the cipher; `Pending` once the
    /// source is. Until the Noise handshake completed, frames are limited to handshake size.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let handshake_done = CipherTrait::handshake_hash(&self.cipher).is_some();
        let mut framed = lock(&self.framed);
        framed.set_max_frame(if handshake_done {
            MAX_FRAME
        } else {
            MAX_HANDSHAKE_FRAME
        });
        // Before the handshake completes, one frame at a time: the cipher processes input only
        // when it is drained, so the next frame's limit depends on this one.
        let frames = if handshake_done { FRAMES_PER_POLL } else { 1 };
        for _ in 0..frames {
            match framed.poll_frame(cx) {
                Poll::Ready(Ok(frame)) => self.cipher.receive_next(frame),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Stream for SecureChannel {
    type Item = CipherEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<CipherEvent>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.plain_out.pop_front() {
                return Poll::Ready(Some(event));
            }
            if let Some(err) = this.failure.take() {
                this.finished = true;
                return Poll::Ready(Some(CipherEvent::ErrStuff(err)));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            // Handshake replies and queued plaintext go out first.
            if let Poll::Ready(Err(err)) = this.poll_send(cx) {
                this.fail(err);
                continue;
            }
            let received = this.poll_receive(cx);
            let decrypted = this.drain_decrypted();
            match received {
                Poll::Ready(Err(err)) => {
                    // Deliver what was decrypted before the error first.
                    this.fail(err);
                    continue;
                }
                Poll::Ready(Ok(())) => continue,
                Poll::Pending if decrypted || this.failure.is_some() => continue,
                Poll::Pending => {
                    // Decrypting may have produced handshake replies to send.
                    if let Poll::Ready(Err(err)) = this.poll_send(cx) {
                        this.fail(err);
                        continue;
                    }
                    // A graceful end: once everything queued is written, close our write side.
                    if !this.write_closed
                        && this.close.requested(cx.waker())
                        && lock(&this.framed).pending_write() == 0
                    {
                        let closed = lock(&this.framed).poll_close(cx);
                        if let Poll::Ready(result) = closed {
                            this.write_closed = true;
                            if let Err(err) = result {
                                this.fail(err);
                                continue;
                            }
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Sink<Vec<u8>> for SecureChannel {
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.failure.is_some() || this.finished {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection failed",
            )));
        }
        if lock(&this.framed).pending_write() < HIGH_WATER {
            return Poll::Ready(Ok(()));
        }
        match this.poll_send(cx) {
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            _ if lock(&this.framed).pending_write() < HIGH_WATER => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }

    fn start_send(mut self: Pin<&mut Self>, item: Vec<u8>) -> io::Result<()> {
        for part in split_channels(item, MAX_PLAIN_FRAME) {
            self.cipher.queue_msg(part);
        }
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = this.poll_send_with(cx, false);
        // Encrypting can also decrypt buffered input: hand it to the stream side and wake it.
        if this.drain_decrypted() {
            cx.waker().wake_by_ref();
        }
        result
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.as_mut().poll_flush(cx) {
            Poll::Ready(Ok(())) => lock(&self.framed).poll_close(cx),
            other => other,
        }
    }
}

impl CipherTrait for SecureChannel {
    fn remote_public_key(&self) -> Option<[u8; 32]> {
        CipherTrait::remote_public_key(&self.cipher)
    }

    fn local_public_key(&self) -> [u8; 32] {
        CipherTrait::local_public_key(&self.cipher)
    }

    fn handshake_hash(&self) -> Option<Vec<u8>> {
        CipherTrait::handshake_hash(&self.cipher)
    }

    fn is_initiator(&self) -> bool {
        self.is_initiator
    }
}
