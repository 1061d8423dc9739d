//! An in-memory duplex link whose faults all come from one seed.
//!
//! Each direction is a bounded pipe that applies, in order: re-chunking (partial writes, short
//! reads), bit flips, a bandwidth cap, stalls, latency with jitter that keeps bytes in order, an
//! abrupt disconnect or a half-close or a silent drop after a number of bytes. A full buffer makes the writer wait
//! (backpressure); nothing busy-waits.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, Future};
use rand::rngs::StdRng;
use rand::Rng;

use crate::Seed;

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the first end to the second.
    AtoB,
    /// From the second end to the first.
    BtoA,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Self::AtoB => 0,
            Self::BtoA => 1,
        }
    }
}

/// What a link does to the bytes it carries. The default is a reliable link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    seed: Seed,
    max_chunk: Option<usize>,
    latency: Option<(Duration, Duration)>,
    bandwidth: Option<u64>,
    stall: Option<(f64, Duration)>,
    corrupt_per_byte: f64,
    disconnect_after: Option<(Direction, u64)>,
    half_close_after: Option<(Direction, u64)>,
    silent_after: Option<(Direction, u64)>,
    buffer: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            seed: Seed(0),
            max_chunk: None,
            latency: None,
            bandwidth: None,
            stall: None,
            corrupt_per_byte: 0.0,
            disconnect_after: None,
            half_close_after: None,
            silent_after: None,
            buffer: 256 * 1024,
        }
    }
}

impl LinkConfig {
    /// A reliable link: bytes arrive intact, in order, at once.
    pub fn reliable() -> Self {
        Self::default()
    }

    /// The seed of every fault decision.
    pub fn seed(mut self, seed: Seed) -> Self {
        self.seed = seed;
        self
    }

    /// Cuts writes and reads into random pieces of 1 to `max` bytes.
    pub fn chunking(mut self, max: usize) -> Self {
        self.max_chunk = Some(max.max(1));
        self
    }

    /// Delivers each write `base` plus up to `jitter` later, keeping order.
    pub fn latency(mut self, base: Duration, jitter: Duration) -> Self {
        self.latency = Some((base, jitter));
        self
    }

    /// Caps each direction at `bytes_per_second`: a write occupies the wire for its size over the
    /// rate, and later writes queue behind it.
    pub fn bandwidth(mut self, bytes_per_second: u64) -> Self {
        self.bandwidth = Some(bytes_per_second.max(1));
        self
    }

    /// Before each write, with `probability`, stalls the direction for a random time up to
    /// `max`: that write and every later one wait.
    pub fn stalls(mut self, probability: f64, max: Duration) -> Self {
        self.stall = Some((probability.clamp(0.0, 1.0), max));
        self
    }

    /// Flips one bit of each byte with this probability.
    pub fn corrupt(mut self, probability_per_byte: f64) -> Self {
        self.corrupt_per_byte = probability_per_byte.clamp(0.0, 1.0);
        self
    }

    /// Breaks the whole link once `bytes` have gone in `direction`: readers then see
    /// `ConnectionReset` (after the bytes before the cut), writers `BrokenPipe`.
    pub fn disconnect_after(mut self, direction: Direction, bytes: u64) -> Self {
        self.disconnect_after = Some((direction, bytes));
        self
    }

    /// Closes `direction` after `bytes`: its reader sees end of stream, the other way still works.
    pub fn half_close_after(mut self, direction: Direction, bytes: u64) -> Self {
        self.half_close_after = Some((direction, bytes));
        self
    }

    /// After `bytes` in `direction`, drops everything silently: a peer that vanished.
    pub fn silent_after(mut self, direction: Direction, bytes: u64) -> Self {
        self.silent_after = Some((direction, bytes));
        self
    }

    /// Bytes a direction buffers before the writer must wait (default 256 KiB).
    pub fn buffer(mut self, bytes: usize) -> Self {
        self.buffer = bytes.max(1);
        self
    }
}

/// Counters of one link, readable from either end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes written into each direction (A→B, B→A).
    pub bytes: [u64; 2],
    /// Bytes corrupted in each direction.
    pub corrupted: [u64; 2],
    /// Stalls in each direction.
    pub stalls: [u64; 2],
    /// Whether the link was broken by `disconnect_after`.
    pub disconnected: bool,
}

struct Pipe {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    buffered: usize,
    closed: bool,
    reader_gone: bool,
    written: u64,
    rng: StdRng,
    reader: Option<Waker>,
    writer: Option<Waker>,
    last_delivery: Instant,
    /// When the wire is free again (bandwidth cap and stalls).
    wire_free: Instant,
    timer: Option<async_io::Timer>,
    cut_at: Option<u64>,
    close_at: Option<u64>,
    silent_at: Option<u64>,
}

struct State {
    config: LinkConfig,
    pipes: [Pipe; 2],
    broken: bool,
    stats: LinkStats,
}

/// One end of a [`link`]: `AsyncRead + AsyncWrite`.
pub struct LinkEnd {
    state: Arc<Mutex<State>>,
    side: usize,
}

impl std::fmt::Debug for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkEnd").field("side", &self.side).finish()
    }
}

/// A duplex in-memory link with the faults of `config`.
pub fn link(config: LinkConfig) -> (LinkEnd, LinkEnd) {
    let pipe = |direction: Direction| {
        let at = |option: Option<(Direction, u64)>| {
            option.and_then(|(d, bytes)| (d == direction).then_some(bytes))
        };
        Pipe {
            chunks: VecDeque::new(),
            buffered: 0,
            closed: false,
            reader_gone: false,
            written: 0,
            rng: config.seed.rng(direction.index() as u64),
            reader: None,
            writer: None,
            last_delivery: Instant::now(),
            wire_free: Instant::now(),
            timer: None,
            cut_at: at(config.disconnect_after),
            close_at: at(config.half_close_after),
            silent_at: at(config.silent_after),
        }
    };
    let state = State {
        pipes: [pipe(Direction::AtoB), pipe(Direction::BtoA)],
        config,
        broken: false,
        stats: LinkStats::default(),
    };
    let state = Arc::new(Mutex::new(state));
    (
        LinkEnd {
            state: state.clone(),
            side: 0,
        },
        LinkEnd { state, side: 1 },
    )
}

impl LinkEnd {
    /// The link's counters.
    pub fn stats(&self) -> LinkStats {
        self.lock().stats.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(waker) = waker.take() {
        waker.wake();
    }
}

fn chunk(rng: &mut StdRng, max: Option<usize>, len: usize) -> usize {
    match max {
        Some(max) => len.min(rng.gen_range(1..=max)),
        None => len,
    }
}

impl AsyncWrite for LinkEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let side = self.side;
        let mut guard = self.lock();
        let state = &mut *guard;
        let pipe = &mut state.pipes[side];
        if state.broken || pipe.closed || pipe.reader_gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if pipe.buffered >= state.config.buffer {
            pipe.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let room = state.config.buffer - pipe.buffered;
        let mut n = chunk(&mut pipe.rng, state.config.max_chunk, buf.len().min(room));
        let mut cut = false;
        if let Some(at) = pipe.cut_at {
            if pipe.written + n as u64 >= at {
                n = (at - pipe.written) as usize;
                cut = true;
            }
        }
        let mut close = false;
        if let Some(at) = pipe.close_at {
            if pipe.written + n as u64 >= at {
                n = (at - pipe.written) as usize;
                close = true;
            }
        }
        let silent_from = pipe
            .silent_at
            .map(|at| at.saturating_sub(pipe.written) as usize);
        let mut bytes = buf[..n].to_vec();
        if let Some(from) = silent_from {
            bytes.truncate(from.min(n));
        }
        for byte in &mut bytes {
            if state.config.corrupt_per_byte > 0.0
                && pipe.rng.gen_bool(state.config.corrupt_per_byte)
            {
                *byte ^= 1 << pipe.rng.gen_range(0..8);
                state.stats.corrupted[side] += 1;
            }
        }
        let mut now = Instant::now();
        if let Some((probability, max)) = state.config.stall {
            if probability > 0.0 && !max.is_zero() && pipe.rng.gen_bool(probability) {
                let pause = pipe.rng.gen_range(Duration::ZERO..max);
                pipe.wire_free = pipe.wire_free.max(now) + pause;
                state.stats.stalls[side] += 1;
            }
        }
        if state.config.bandwidth.is_some() || state.config.stall.is_some() {
            let start = pipe.wire_free.max(now);
            let on_wire = state.config.bandwidth.map_or(Duration::ZERO, |rate| {
                Duration::from_secs_f64(n as f64 / rate as f64)
            });
            pipe.wire_free = start + on_wire;
            now = pipe.wire_free;
        }
        let deliver_at = match state.config.latency {
            Some((base, jitter)) => {
                let jitter = if jitter.is_zero() {
                    Duration::ZERO
                } else {
                    pipe.rng.gen_range(Duration::ZERO..jitter)
                };
                (now + base + jitter).max(pipe.last_delivery)
            }
            None => now,
        };
        pipe.last_delivery = deliver_at;
        pipe.written += n as u64;
        state.stats.bytes[side] += n as u64;
        if !bytes.is_empty() {
            pipe.buffered += bytes.len();
            pipe.chunks.push_back((deliver_at, bytes));
        }
        wake(&mut pipe.reader);
        if close {
            pipe.closed = true;
        }
        if cut {
            state.broken = true;
            state.stats.disconnected = true;
            for pipe in &mut state.pipes {
                wake(&mut pipe.reader);
                wake(&mut pipe.writer);
            }
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
        }
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let side = self.side;
        let mut state = self.lock();
        let pipe = &mut state.pipes[side];
        pipe.closed = true;
        wake(&mut pipe.reader);
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for LinkEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let side = 1 - self.side;
        let mut guard = self.lock();
        let state = &mut *guard;
        let broken = state.broken;
        let max_chunk = state.config.max_chunk;
        let pipe = &mut state.pipes[side];
        if let Some((deliver_at, _)) = pipe.chunks.front() {
            let deliver_at = *deliver_at;
            if deliver_at > Instant::now() {
                let timer = pipe
                    .timer
                    .get_or_insert_with(|| async_io::Timer::at(deliver_at));
                timer.set_at(deliver_at);
                if Pin::new(timer).poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            pipe.timer = None;
            let Some((_, front)) = pipe.chunks.front_mut() else {
                return Poll::Pending;
            };
            let n = chunk(&mut pipe.rng, max_chunk, front.len().min(buf.len()));
            buf[..n].copy_from_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                pipe.chunks.pop_front();
            }
            pipe.buffered -= n;
            wake(&mut pipe.writer);
            return Poll::Ready(Ok(n));
        }
        if broken {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if pipe.closed {
            return Poll::Ready(Ok(0));
        }
        pipe.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for LinkEnd {
    fn drop(&mut self) {
        let side = self.side;
        let mut state = self.lock();
        // Our writes end; nobody reads what the other side writes any more.
        state.pipes[side].closed = true;
        wake(&mut state.pipes[side].reader);
        state.pipes[1 - side].reader_gone = true;
        wake(&mut state.pipes[1 - side].writer);
    }
}

/// A connected pair of TCP streams on 127.0.0.1, with `TCP_NODELAY` set.
pub async fn tcp_pair() -> io::Result<(async_std::net::TcpStream, async_std::net::TcpStream)> {
    let listener = async_std::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (client, accepted) = futures::join!(
        async_std::net::TcpStream::connect(address),
        listener.accept()
    );
    let (client, (server, _)) = (client?, accepted?);
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}
