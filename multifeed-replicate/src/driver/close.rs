//! Ending a connection without losing what we queued last.

use std::io;
use std::time::Duration;

use futures::channel::mpsc;
use futures::select_biased;
use futures::StreamExt;
use hypercore_protocol::Event;

use super::Driver;

/// How long we wait for the peer to close the root channel after we closed ours.
const LINGER: Duration = Duration::from_secs(5);
/// After a key mismatch: how long we wait for the peer to hang up, so that our root channel's
/// open (which tells it why) leaves before we drop the connection.
const MISMATCH_LINGER: Duration = Duration::from_secs(1);
const BARRIER: &str = "multifeed-close-barrier";

impl Driver {
    /// Ends the connection without losing what we queued last.
    ///
    /// Local signals sent through the command queue and the root channel come back as events
    /// only after everything queued before them was handed to the transport: a barrier. After a
    /// normal end we then close the root channel and wait (bounded) for the peer to close it too,
    /// so neither side drops the connection while the other still reads.
    ///
    /// After an error, `until_peer_hangs_up` waits (bounded) for the connection to end: the
    /// barrier of the command queue only says our open was queued for the transport, not that
    /// it left, and a peer that never sees our root channel cannot tell a key mismatch from a
    /// dropped connection.
    pub(super) async fn close_gracefully(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<io::Result<Event>>,
        normal: bool,
        until_peer_hangs_up: bool,
    ) {
        if self.flush_outbox().await.is_err() {
            return;
        }
        let mut barriers = 0;
        if self
            .commands
            .signal_local(BARRIER, Vec::new())
            .await
            .is_ok()
        {
            barriers += 1;
        }
        let plain = self.conn.is_plain();
        let root_dk = self.root_dk;
        if let Some(root) = self.channels.get(&root_dk).filter(|_| !plain) {
            if root
                .signal_local_protocol(BARRIER, Vec::new())
                .await
                .is_ok()
            {
                barriers += 1;
            }
        }
        let mut root_closed_by_peer = self.conn.peer_closed_root();
        let mut linger = futures::FutureExt::fuse(async_io::Timer::after(LINGER));
        if until_peer_hangs_up {
            linger = futures::FutureExt::fuse(async_io::Timer::after(MISMATCH_LINGER));
        }
        loop {
            if barriers == 0 && !normal {
                if !until_peer_hangs_up {
                    return;
                }
                // We keep the connection until the peer hangs up (it will: our root open tells
                // it the key differs) or the linger ends. Shutting our write side here could
                // overtake the open, still in the protocol's queue.
            } else if barriers == 0 {
                if let Some(root) = self.channels.remove(&root_dk).filter(|_| !plain) {
                    if root.close().await.is_err() {
                        return;
                    }
                    if let Some(close) = &self.close {
                        close.close();
                    }
                }
                if root_closed_by_peer || plain {
                    return;
                }
            }
            select_biased! {
                event = events.next() => match event {
                    Some(Ok(Event::LocalSignal((name, _)))) if name == BARRIER => barriers -= 1,
                    Some(Ok(Event::Close(dk))) if dk == root_dk => {
                        root_closed_by_peer = true;
                        if barriers == 0 && normal {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
                // What the peer sends while we close no longer matters; taking it keeps the
                // transport reading, so the peer's close reaches us.
                _ = self.inbound.select_next_some() => self.backlog.input_taken(),
                _ = linger => return,
            }
        }
    }
}
