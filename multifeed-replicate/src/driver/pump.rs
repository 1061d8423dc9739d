//! The pump runs beside the driver: it always polls the protocol (so no send of the driver can
//! deadlock) and contains a panic of it.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::{FutureExt, StreamExt};
use hypercore_protocol::{Event, Protocol};

use crate::backlog::Backlog;
use crate::error::PeerViolation;
use crate::ReplicateError;

/// How long the driver may stay stuck after the connection failed before the failure is
/// returned anyway.
const END_GRACE: Duration = Duration::from_secs(2);

/// How often the protocol is polled even when nothing woke it: a wake-up lost below it (seen
/// as a Noise handshake that stalled until its timeout, about one connection in a hundred,
/// when nothing else polled the task) costs at most this long. The 250 ms tick of the old
/// watchdog hid it; which layer loses the wake-up is not found yet.
const REPOLL: Duration = Duration::from_millis(250);

/// Polls the protocol for as long as it runs, handing its events to the driver; resolves (after
/// [`END_GRACE`]) with the error that ended the connection.
pub(super) async fn pump(
    mut protocol: Protocol,
    events_tx: mpsc::UnboundedSender<io::Result<Event>>,
    backlog: Arc<Backlog>,
) -> ReplicateError {
    loop {
        let next = {
            let next = AssertUnwindSafe(protocol.next()).catch_unwind();
            futures::pin_mut!(next);
            loop {
                let repoll = async_io::Timer::after(REPOLL);
                match futures::future::select(next.as_mut(), repoll).await {
                    futures::future::Either::Left((next, _)) => break next,
                    futures::future::Either::Right(_) => continue,
                }
            }
        };
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
