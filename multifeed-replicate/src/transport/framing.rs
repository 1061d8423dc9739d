//! uint24le length-prefixed framing over any `AsyncRead + AsyncWrite`.
//!
//! Written for this crate because the stock framing can hang on frames over 64 KiB and can return
//! `Pending` without a registered waker. Here a read keeps going until the source is `Pending`
//! (which registers the waker), the buffer grows to any frame up to the uint24 limit, and the
//! end of the stream is reported as an error instead of silence.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};

/// The largest frame uint24 framing can carry.
pub(crate) const MAX_FRAME: usize = (1 << 24) - 1;
/// The largest frame a peer may send before the Noise handshake completed (its messages are
/// under 200 bytes): an unauthenticated peer cannot make us buffer megabytes.
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;

/// Frames in both directions over one byte stream.
#[derive(Debug)]
pub(crate) struct Framed<IO> {
    io: IO,
    read_buf: Vec<u8>,
    read_start: usize,
    write_buf: VecDeque<u8>,
    eof: bool,
    /// Frames longer than this are refused as soon as their header arrives.
    max_frame: usize,
    /// The last write found the connection full; a waker is registered for when it drains.
    write_blocked: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Framed<IO> {
    pub(crate) fn new(io: IO) -> Self {
        Self {
            io,
            read_buf: Vec::with_capacity(READ_CHUNK),
            read_start: 0,
            write_buf: VecDeque::new(),
            eof: false,
            max_frame: MAX_FRAME,
            write_blocked: false,
        }
    }

    /// Refuses incoming frames longer than `max` (at most [`MAX_FRAME`]).
    pub(crate) fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max.min(MAX_FRAME);
    }

    /// The next complete frame already buffered, if any.
    fn take_frame(&mut self) -> io::Result<Option<Vec<u8>>> {
        let available = &self.read_buf[self.read_start..];
        if available.len() < 3 {
            return Ok(None);
        }
        let len = usize::from(available[0])
            | usize::from(available[1]) << 8
            | usize::from(available[2]) << 16;
        if len > self.max_frame {
            return Err(crate::error::PeerViolation::HandshakeFrame {
                len,
                limit: self.max_frame,
            }
            .into_io());
        }
        if available.len() < 3 + len {
            return Ok(None);
        }
        let frame = available[3..3 + len].to_vec();
        self.read_start += 3 + len;
        if self.read_start == self.read_buf.len() {
            self.read_buf.clear();
            self.read_start = 0;
        }
        Ok(Some(frame))
    }

    /// Reads until a frame is complete or the source is `Pending`.
    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Vec<u8>>> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Poll::Ready(Ok(frame));
            }
            if self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                )));
            }
            if self.read_start > 0 {
                self.read_buf.drain(..self.read_start);
                self.read_start = 0;
            }
            let filled = self.read_buf.len();
            self.read_buf.resize(filled + READ_CHUNK, 0);
            let read = Pin::new(&mut self.io).poll_read(cx, &mut self.read_buf[filled..]);
            match read {
                Poll::Ready(Ok(0)) => {
                    self.read_buf.truncate(filled);
                    self.eof = true;
                }
                Poll::Ready(Ok(n)) => self.read_buf.truncate(filled + n),
                Poll::Ready(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {
                    self.read_buf.truncate(filled);
                }
                Poll::Ready(Err(err)) => {
                    self.read_buf.truncate(filled);
                    return Poll::Ready(Err(err));
                }
                Poll::Pending => {
                    self.read_buf.truncate(filled);
                    return Poll::Pending;
                }
            }
        }
    }

    /// Queues a frame for writing.
    pub(crate) fn queue(&mut self, frame: &[u8]) -> io::Result<()> {
        if frame.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {} bytes exceeds the uint24 limit", frame.len()),
            ));
        }
        let len = frame.len() as u32;
        self.write_buf.extend(&len.to_le_bytes()[..3]);
        self.write_buf.extend(frame);
        Ok(())
    }

    /// Bytes queued but not yet written.
    pub(crate) fn pending_write(&self) -> usize {
        self.write_buf.len()
    }

    /// Like [`poll_write_all`](Self::poll_write_all), but while the last write found the
    /// connection full it returns `Pending` without trying again: the waker registered then
    /// wakes the task, whose next read-side poll retries. Saves a failing syscall per frame
    /// queued while the peer is slow to read.
    pub(crate) fn poll_write_unless_blocked(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if self.write_blocked && !self.write_buf.is_empty() {
            return Poll::Pending;
        }
        self.poll_write_all(cx)
    }

    /// Writes queued bytes until done or `Pending`, then flushes.
    pub(crate) fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write_blocked = false;
        while !self.write_buf.is_empty() {
            let (front, _) = self.write_buf.as_slices();
            match Pin::new(&mut self.io).poll_write(cx, front) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the connection accepts no more bytes",
                    )))
                }
                Poll::Ready(Ok(n)) => {
                    self.write_buf.drain(..n);
                }
                Poll::Ready(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    self.write_blocked = true;
                    return Poll::Pending;
                }
            }
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Closes the write side.
    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_write_all(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.io).poll_close(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    /// A reader that hands out one byte per poll, and is `Pending` every other poll.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        pend: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            self.pend = !self.pend;
            if self.pend {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.at >= self.bytes.len() {
                return Poll::Ready(Ok(0));
            }
            buf[0] = self.bytes[self.at];
            self.at += 1;
            Poll::Ready(Ok(1))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn encode(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut framed = Framed::new(Cursor::new(Vec::new()));
        for frame in frames {
            framed.queue(frame).expect("frame fits");
        }
        framed.write_buf.iter().copied().collect()
    }

    async fn read_all<IO: AsyncRead + AsyncWrite + Unpin>(
        framed: &mut Framed<IO>,
    ) -> (Vec<Vec<u8>>, io::Error) {
        let mut frames = Vec::new();
        loop {
            match futures::future::poll_fn(|cx| framed.poll_frame(cx)).await {
                Ok(frame) => frames.push(frame),
                Err(err) => return (frames, err),
            }
        }
    }

    #[test]
    fn large_frames_and_one_byte_reads_then_eof() {
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let frames = vec![b"small".to_vec(), big, Vec::new(), vec![7; 70_000]];
        let bytes = encode(&frames);
        futures::executor::block_on(async {
            let mut framed = Framed::new(Cursor::new(bytes.clone()));
            let (got, err) = read_all(&mut framed).await;
            assert_eq!(got, frames);
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

            let mut trickle = Framed::new(Trickle {
                bytes: bytes[..2000].to_vec(),
                at: 0,
                pend: false,
            });
            let (got, err) = read_all(&mut trickle).await;
            assert_eq!(
                got,
                frames[..1].to_vec(),
                "only the first frame is complete"
            );
            assert_eq!(
                err.kind(),
                io::ErrorKind::UnexpectedEof,
                "EOF mid-frame is an error"
            );
        });
    }

    #[test]
    fn frames_past_the_set_limit_fail_at_their_header() {
        // A header announcing 1 MiB, and only 10 bytes of it: refused before buffering more.
        let mut bytes = vec![0x00, 0x00, 0x10];
        bytes.extend_from_slice(&[0; 10]);
        futures::executor::block_on(async {
            let mut framed = Framed::new(Cursor::new(bytes));
            framed.set_max_frame(MAX_HANDSHAKE_FRAME);
            let (got, err) = read_all(&mut framed).await;
            assert!(got.is_empty());
            let violation = crate::error::PeerViolation::from_io(&err).expect("a violation");
            assert_eq!(violation.code(), "ERR_PEER_LIMIT", "{violation}");
        });
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut framed = Framed::new(Cursor::new(Vec::new()));
        assert!(framed.queue(&vec![0; MAX_FRAME + 1]).is_err());
    }
}
