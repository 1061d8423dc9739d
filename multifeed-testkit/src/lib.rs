//! Test tools for multifeed and the apps built on it.
//!
//! * [`link`]: an in-memory duplex link (`AsyncRead + AsyncWrite` at both ends) whose faults —
//!   re-chunking, latency and jitter, bit flips, disconnects, half-closes, silent drops — all come
//!   from one [`Seed`], so a failing run replays from `MULTIFEED_SEED`; [`tcp_pair`] gives real
//!   TCP streams on 127.0.0.1 instead.
//! * Peers and checks: [`memory_peer`], [`disk_peer`], [`digest`], [`assert_converged`],
//!   [`wait_converged`], [`sync_over`], and live [`Topology`] wiring with [`connect_topology`].
//!
//! ```
//! # async_std::task::block_on(async {
//! use std::time::Duration;
//! use multifeed_testkit::{assert_converged, link, memory_peer, sync_over, LinkConfig, Seed};
//!
//! let a = memory_peer("a", 2, 10).await?;
//! let b = memory_peer("b", 1, 5).await?;
//! // Writes cut into pieces of 1..=7 bytes, the same pieces for the same seed.
//! let ends = link(LinkConfig::reliable().seed(Seed(42)).chunking(7));
//! let (ra, rb) = sync_over(&a, &b, ends, Duration::from_secs(30)).await?;
//! ra?;
//! rb?;
//! assert_converged(&[&a, &b]).await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod link;
mod peers;
mod seed;

pub use link::{link, tcp_pair, Direction, LinkConfig, LinkEnd, LinkStats};
pub use peers::{
    assert_converged, connect_live, connect_topology, converged, digest, disk_peer, edges, fill,
    memory_peer, sync_over, wait_converged, Digest, LiveLink, PairResult, Topology,
};
pub use seed::{Seed, SEED_ENV};
