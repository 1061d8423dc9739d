//! The connection's timeouts, on times handed in: the handshakes, a non-live replication that
//! makes no progress, a live peer that sends nothing (not even a keep-alive), and our own
//! keep-alive ticks.

use std::time::{Duration, Instant};

use crate::{Phase, ReplicateConfig};

/// When things last happened on a connection, and the deadlines that follow.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    handshake_timeout: Duration,
    idle_timeout: Duration,
    live: bool,
    /// Live multifeed peers only: plain Hypercore peers send no keep-alive.
    live_timeout: Option<Duration>,
    keepalive_interval: Duration,
    started: Instant,
    last_received: Instant,
    last_progress: Instant,
    next_keepalive: Instant,
    sent_since_tick: bool,
    noise_done: bool,
    exchange_done: bool,
}

impl Clock {
    pub(crate) fn new(now: Instant, config: &ReplicateConfig) -> Self {
        Self {
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.idle_timeout,
            live: config.live,
            live_timeout: (config.live && config.plain_feeds.is_none())
                .then_some(config.live_timeout),
            keepalive_interval: config.keepalive_interval,
            started: now,
            last_received: now,
            last_progress: now,
            next_keepalive: now + config.keepalive_interval,
            sent_since_tick: false,
            noise_done: false,
            exchange_done: false,
        }
    }

    /// Something arrived from the peer.
    pub(crate) fn received(&mut self, now: Instant) {
        self.last_received = self.last_received.max(now);
    }

    /// The replication moved forward.
    pub(crate) fn progress(&mut self, now: Instant) {
        self.last_progress = self.last_progress.max(now);
    }

    /// The latest time handed in with an input.
    pub(crate) fn latest(&self) -> Instant {
        self.last_received.max(self.last_progress)
    }

    /// We handed something to the peer.
    pub(crate) fn sent(&mut self) {
        self.sent_since_tick = true;
    }

    pub(crate) fn noise_done(&mut self) {
        self.noise_done = true;
    }

    /// Whether the Noise handshake was reported.
    pub(crate) fn is_noise_done(&self) -> bool {
        self.noise_done
    }

    /// Our own host took until `now` to list its feeds: the handshake deadline counts from here
    /// (a large store on disk can take longer to list than the whole timeout).
    pub(crate) fn host_ready(&mut self, now: Instant) {
        if !self.exchange_done {
            self.started = self.started.max(now);
        }
    }

    pub(crate) fn exchange_done(&mut self) {
        self.exchange_done = true;
    }

    /// The earliest deadline: a timeout, or (live multifeed) the next keep-alive tick.
    pub(crate) fn next_deadline(&self, keepalive: bool) -> Option<Instant> {
        let earliest = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = if !self.exchange_done {
            Some(self.started + self.handshake_timeout)
        } else {
            earliest(
                (!self.live).then(|| self.last_progress + self.idle_timeout),
                self.live_timeout
                    .map(|timeout| self.last_received + timeout),
            )
        };
        earliest(timeout, keepalive.then_some(self.next_keepalive))
    }

    /// The timeout that passed by `now`, if any (the phase it passed in).
    pub(crate) fn expired(&self, now: Instant) -> Option<Phase> {
        if !self.exchange_done {
            if now.saturating_duration_since(self.started) >= self.handshake_timeout {
                return Some(if self.noise_done {
                    Phase::ExchangeHandshake
                } else {
                    Phase::NoiseHandshake
                });
            }
            return None;
        }
        if !self.live && now.saturating_duration_since(self.last_progress) >= self.idle_timeout {
            return Some(Phase::Replication);
        }
        if let Some(timeout) = self.live_timeout {
            if now.saturating_duration_since(self.last_received) >= timeout {
                return Some(Phase::LiveKeepAlive);
            }
        }
        None
    }

    /// Whether a keep-alive tick passed by `now` and nothing was sent since the last one (the
    /// tick is consumed either way).
    pub(crate) fn keepalive_due(&mut self, now: Instant) -> bool {
        if now < self.next_keepalive {
            return false;
        }
        self.next_keepalive = now + self.keepalive_interval;
        !std::mem::take(&mut self.sent_since_tick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ReplicateConfig {
        ReplicateConfig::new(true)
            .handshake_timeout(Duration::from_secs(10))
            .idle_timeout(Duration::from_secs(30))
    }

    #[test]
    fn the_handshake_deadline_holds_until_the_exchange_is_done_and_names_its_phase() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0, &config());
        assert_eq!(
            clock.next_deadline(false),
            Some(t0 + Duration::from_secs(10))
        );
        assert_eq!(clock.expired(t0 + Duration::from_secs(9)), None);
        assert_eq!(
            clock.expired(t0 + Duration::from_secs(10)),
            Some(Phase::NoiseHandshake)
        );
        clock.noise_done();
        assert_eq!(
            clock.expired(t0 + Duration::from_secs(10)),
            Some(Phase::ExchangeHandshake)
        );
        clock.exchange_done();
        clock.progress(t0 + Duration::from_secs(5));
        assert_eq!(clock.expired(t0 + Duration::from_secs(10)), None);
        assert_eq!(
            clock.next_deadline(false),
            Some(t0 + Duration::from_secs(35))
        );
        assert_eq!(
            clock.expired(t0 + Duration::from_secs(35)),
            Some(Phase::Replication)
        );
    }

    #[test]
    fn live_peers_time_out_on_silence_and_tick_only_when_nothing_else_was_sent() {
        let t0 = Instant::now();
        let config = ReplicateConfig::new(true)
            .live(true)
            .live_timeout(Duration::from_secs(20))
            .keepalive_interval(Duration::from_secs(5));
        let mut clock = Clock::new(t0, &config);
        clock.exchange_done();
        assert_eq!(clock.next_deadline(true), Some(t0 + Duration::from_secs(5)));
        // No progress needed live: only silence counts.
        assert_eq!(clock.expired(t0 + Duration::from_secs(19)), None);
        clock.sent();
        assert!(
            !clock.keepalive_due(t0 + Duration::from_secs(5)),
            "we sent meanwhile"
        );
        assert!(clock.keepalive_due(t0 + Duration::from_secs(10)));
        clock.received(t0 + Duration::from_secs(15));
        assert_eq!(clock.expired(t0 + Duration::from_secs(34)), None);
        assert_eq!(
            clock.expired(t0 + Duration::from_secs(35)),
            Some(Phase::LiveKeepAlive)
        );
    }
}
