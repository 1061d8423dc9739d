//! The two futures that run beside the driver: the pump, which always polls the protocol (so
//! no send of the driver can deadlock) and contains a panic of it, and the watchdog, which ends
//! the replication when a timeout passes, whatever the driver is waiting for.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::{FutureExt, StreamExt};
use hypercore_protocol::{Event, Protocol};

use super::TICK;
use crate::backlog::Backlog;
use crate::error::PeerViolation;
use crate::{ReplicateConfig, ReplicateError};

/// How long the driver may stay stuck after the connection failed before the failure is
/// returned anyway.
const END_GRACE: Duration = Duration::from_secs(2);

/// Polls the protocol for as long as it runs, handing its events to the driver; resolves (after
/// [`END_GRACE`]) with the error that ended the connection.
pub(super) async fn pump(
    mut protocol: Protocol,
    events_tx: mpsc::UnboundedSender<io::Result<Event>>,
    backlog: Arc<Backlog>,
) -> ReplicateError {
    loop {
        let next = AssertUnwindSafe(protocol.next()).catch_unwind().await;
        let err = match next {
            Ok(Some(Ok(event))) => {
                if events_tx.unbounded_send(Ok(event)).is_err() {
                    futures::future::pending::<()>().await;
                }
                continue;
            }
            Ok(Some(Err(err))) => err,
            Ok(None) => io::ErrorKind::UnexpectedEof.into(),
            Err(_panic) => PeerViolation::ProtocolPanic.into_io(),
        };
        // The driver hears of the end first; if it is stuck in a wait that only the
        // protocol could end, the end is returned from here.
        let kind = err.kind();
        let text = err.to_string();
        let violation = PeerViolation::from_io(&err).cloned();
        let _ = events_tx.unbounded_send(Err(err));
        async_io::Timer::after(END_GRACE).await;
        let phase = if backlog.is_noise_done() {
            crate::Phase::Replication
        } else {
            crate::Phase::NoiseHandshake
        };
        let source = match violation {
            Some(violation) => violation.into_io(),
            None => io::Error::new(kind, text),
        };
        return ReplicateError::io(phase, source);
    }
}

/// The timeouts the watchdog enforces.
pub(super) struct Timeouts {
    handshake: Duration,
    idle: Duration,
    live: bool,
    /// Live multifeed peers only: plain Hypercore peers send no keep-alive.
    keepalive: Option<Duration>,
}

impl Timeouts {
    pub(super) fn of(config: &ReplicateConfig) -> Self {
        Self {
            handshake: config.handshake_timeout,
            idle: config.idle_timeout,
            live: config.live,
            keepalive: (config.live && config.plain_feeds.is_none()).then_some(config.live_timeout),
        }
    }
}

/// Resolves with the timeout that passed first: the handshakes, a non-live replication that
/// made no progress, or a live peer that sent nothing (not even a keep-alive).
pub(super) async fn watch(backlog: Arc<Backlog>, timeouts: Timeouts) -> ReplicateError {
    let Timeouts {
        handshake: handshake_timeout,
        idle: idle_timeout,
        live,
        keepalive: live_timeout,
    } = timeouts;
    loop {
        async_io::Timer::after(TICK).await;
        if !backlog.is_exchange_done() {
            if backlog.age() > handshake_timeout {
                return ReplicateError::Timeout {
                    phase: if backlog.is_noise_done() {
                        crate::Phase::ExchangeHandshake
                    } else {
                        crate::Phase::NoiseHandshake
                    },
                };
            }
            continue;
        }
        if !live && backlog.since_progress() > idle_timeout {
            return ReplicateError::Timeout {
                phase: crate::Phase::Replication,
            };
        }
        if let Some(timeout) = live_timeout {
            if backlog.since_received() > timeout {
                return ReplicateError::Timeout {
                    phase: crate::Phase::LiveKeepAlive,
                };
            }
        }
    }
}
