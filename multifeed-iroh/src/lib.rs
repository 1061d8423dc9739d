//! iroh as a transport for [`multifeed`]: peers dial each other by a ticket, through NATs.
//!
//! An [`Node`] is an [iroh](https://docs.rs/iroh) endpoint: QUIC with relays, hole punching and
//! address lookup, dialed by public key. Each peer connection carries one unchanged
//! [`Multifeed::replicate`] over one bidirectional QUIC stream (ALPN [`ALPN`]); the replication's
//! own Noise handshake and shared-key check run inside it, as over TCP.
//!
//! ```no_run
//! # async fn demo(alice: multifeed::Multifeed, bob: multifeed::Multifeed)
//! #     -> Result<(), multifeed_iroh::Error> {
//! use multifeed::ReplicateOptions;
//! use multifeed_iroh::{Config, Node};
//!
//! // Alice serves live replications to whoever holds her ticket.
//! let sharing = Node::bind(Config::new()).await?;
//! let ticket = sharing.ticket();
//! let serving = sharing.serve(alice, ReplicateOptions::new(false).live(true), |_peer| {});
//!
//! // Bob, anywhere, syncs once with her.
//! let dialing = Node::bind(Config::new()).await?;
//! let summary = dialing.replicate(&bob, &ticket, ReplicateOptions::new(true)).await?;
//! println!("{} blocks received", summary.blocks_received);
//! # drop(serving); Ok(()) }
//! ```
//!
//! # Runtime
//!
//! iroh runs on tokio; the multifeed crates do not. A `Node` bound inside a tokio runtime uses
//! it; bound anywhere else (async-std, a plain `block_on`), it starts a tokio runtime of its own
//! with one worker thread, and every method may be awaited from any executor.
//!
//! # Why these dependencies
//!
//! - **iroh**: the maintained Rust stack for dial-by-key QUIC with relays and hole punching
//!   (sendme and dumbpipe are built on it). Without default features but `tls-ring`: no metrics,
//!   no port mapping daemon client.
//! - **iroh-tickets**: iroh's own ticket format (`endpoint…`, base32 of the endpoint's id and
//!   addresses), so tickets read the same in every iroh tool.
//! - **tokio-util** (`compat`): turns iroh's tokio streams into the `futures` I/O traits that
//!   [`Multifeed::replicate`] takes.
//!
//! Hyperswarm is not used: the Rust `hyperdht`/`hyperswarm` 0.1 crates were seen to stall or
//! corrupt replication past a few tens of KB and have `todo!()` panics a remote peer can reach.

mod stream;
mod ticket;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::presets;
use iroh::{Endpoint, RelayMode};
use multifeed::{Multifeed, ReplicateOptions, ReplicateSummary};

pub use stream::IrohStream;
pub use ticket::Ticket;

/// The application protocol of a multifeed replication on an iroh connection.
pub const ALPN: &[u8] = b"multifeed/replicate/1";

/// How long a finished side waits for its last bytes to be acknowledged, and the accepting side
/// for the dialer to hang up, before closing the connection itself.
const CLOSE_LINGER: Duration = Duration::from_secs(3);

/// How long dialing may take by default; see [`Config::connect_timeout`].
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How many peers are served at once by default; see [`Config::max_peers`].
const DEFAULT_MAX_PEERS: usize = 64;

/// How an iroh [`Node`] reaches and is reached by peers.
#[derive(Debug, Clone)]
pub struct Config {
    relays: bool,
    address_lookup: bool,
    bind: Option<SocketAddr>,
    secret_key: Option<[u8; 32]>,
    connect_timeout: Duration,
    max_peers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    /// iroh's defaults: number 0's public relays and DNS address lookup, all interfaces, a new
    /// random identity.
    pub fn new() -> Self {
        Self {
            relays: true,
            address_lookup: true,
            bind: None,
            secret_key: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_peers: DEFAULT_MAX_PEERS,
        }
    }

    /// Direct addresses only, on 127.0.0.1: no relay, no address lookup (tests, one machine).
    pub fn local() -> Self {
        Self::new()
            .relays(false)
            .address_lookup(false)
            .bind_addr(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Use relay servers (number 0's public ones) to reach peers behind NATs; default on.
    pub fn relays(mut self, on: bool) -> Self {
        self.relays = on;
        self
    }

    /// Publish and look up endpoint addresses by id (number 0's DNS); default on.
    pub fn address_lookup(mut self, on: bool) -> Self {
        self.address_lookup = on;
        self
    }

    /// Bind the UDP socket to this address only (port 0: any free port); default: all
    /// interfaces, IPv4 and IPv6.
    pub fn bind_addr(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// How long dialing a peer may take before it fails with [`Error::Connect`]; default 15 s
    /// (iroh's own limit is 30 s). A dead ticket cannot be told from a slow path sooner.
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// The most peers [`Node::serve`] replicates with at once (default 64); a connection past
    /// the bound is refused, so a peer that opens connections cannot grow our tasks and memory
    /// without bound.
    pub fn max_peers(mut self, peers: usize) -> Self {
        self.max_peers = peers.max(1);
        self
    }

    /// The endpoint's identity (an ed25519 secret key); default: a new one each bind, so the
    /// ticket changes each time.
    pub fn secret_key(mut self, secret: [u8; 32]) -> Self {
        self.secret_key = Some(secret);
        self
    }
}

/// What can go wrong on an iroh transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint could not be created or bound.
    #[error("binding the iroh endpoint: {reason}")]
    Bind {
        /// iroh's reason.
        reason: String,
    },
    /// A ticket that does not parse.
    #[error("not an iroh ticket ({reason})")]
    BadTicket {
        /// Why it does not parse.
        reason: String,
    },
    /// The peer could not be reached, or refused the connection.
    #[error("connecting to {peer}: {reason}")]
    Connect {
        /// The peer's endpoint id.
        peer: String,
        /// iroh's reason.
        reason: String,
    },
    /// The connection was up but its replication stream could not be opened or accepted.
    #[error("opening the replication stream with {peer}: {reason}")]
    Stream {
        /// The peer's endpoint id.
        peer: String,
        /// iroh's reason.
        reason: String,
    },
    /// The replication itself failed (a key mismatch, a timeout, a misbehaving peer…).
    #[error(transparent)]
    Replicate(#[from] multifeed::Error),
    /// The endpoint was closed.
    #[error("the iroh endpoint is closed")]
    Closed,
}

impl Error {
    /// A stable code for programs and logs (`ERR_…`); a replication error keeps its own code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Bind { .. } => "ERR_IROH_BIND",
            Self::BadTicket { .. } => "ERR_BAD_TICKET",
            Self::Connect { .. } => "ERR_CONNECT",
            Self::Stream { .. } => "ERR_IROH_STREAM",
            Self::Replicate(err) => err.code(),
            Self::Closed => "ERR_CLOSED",
        }
    }
}

/// How one served peer's replication ended.
#[derive(Debug)]
pub struct Served {
    /// The peer's endpoint id.
    pub peer: String,
    /// The replication's summary, or why the peer could not be served.
    pub result: Result<ReplicateSummary, Error>,
}

/// An iroh endpoint that replicates multifeeds with peers; see the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct Node {
    endpoint: Endpoint,
    runtime: Runtime,
    connect_timeout: Duration,
    max_peers: usize,
}

impl Node {
    /// Binds an endpoint as `config` says.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let runtime = Runtime::current_or_own()?;
        let (connect_timeout, max_peers) = (config.connect_timeout, config.max_peers);
        let endpoint = runtime
            .run(async move { build(config).await })
            .await
            .ok_or(Error::Closed)??;
        tracing::debug!(id = %endpoint.id().fmt_short(), "iroh endpoint bound");
        Ok(Self {
            endpoint,
            runtime,
            connect_timeout,
            max_peers,
        })
    }

    /// This endpoint's id (its public key), as iroh prints it.
    pub fn id(&self) -> String {
        self.endpoint.id().to_string()
    }

    /// A ticket that dials this endpoint: its id, relay and the direct addresses known now.
    ///
    /// With relays on, [`Node::online`] first gives a ticket that also works from behind a NAT.
    pub fn ticket(&self) -> Ticket {
        Ticket::from(self.endpoint.addr())
    }

    /// The local UDP addresses the endpoint is bound to.
    pub fn bound_addrs(&self) -> Vec<SocketAddr> {
        self.endpoint.bound_sockets()
    }

    /// Waits (at most `within`) until the endpoint has a home relay; `false` if it has none by
    /// then (no relays configured, or none reachable).
    pub async fn online(&self, within: Duration) -> bool {
        let endpoint = self.endpoint.clone();
        self.runtime
            .run(async move {
                tokio::time::timeout(within, endpoint.online())
                    .await
                    .is_ok()
            })
            .await
            .unwrap_or(false)
    }

    /// Dials the peer of `ticket` and opens the replication stream, for a caller that runs
    /// [`Multifeed::replicate`] itself (see [`IrohStream`]).
    pub async fn connect(&self, ticket: &Ticket) -> Result<IrohStream, Error> {
        let endpoint = self.endpoint.clone();
        let addr = ticket.endpoint_addr().clone();
        let limit = self.connect_timeout;
        self.runtime
            .run(async move { stream::dial(&endpoint, addr, limit).await })
            .await
            .ok_or(Error::Closed)?
    }

    /// Dials the peer of `ticket` and replicates with it (`options.initiator` should be true),
    /// then closes the connection without losing its last bytes.
    pub async fn replicate(
        &self,
        multi: &Multifeed,
        ticket: &Ticket,
        options: ReplicateOptions,
    ) -> Result<ReplicateSummary, Error> {
        let endpoint = self.endpoint.clone();
        let addr = ticket.endpoint_addr().clone();
        let limit = self.connect_timeout;
        let multi = multi.clone();
        self.runtime
            .run(async move {
                let stream = stream::dial(&endpoint, addr, limit).await?;
                let ending = stream.ending();
                let result = multi.replicate(stream, options).await;
                // We dialed, so we hang up, once the peer holds all we sent.
                ending.close(true).await;
                Ok(result?)
            })
            .await
            .ok_or(Error::Closed)?
    }

    /// Accepts peers until the endpoint closes and replicates with each (`options.initiator`
    /// should be false), each on a task of its own; `on_end` hears how each one ended.
    ///
    /// The returned future ends when [`Node::close`] is called; dropping it stops accepting.
    pub fn serve(
        &self,
        multi: Multifeed,
        options: ReplicateOptions,
        on_end: impl Fn(Served) + Send + Sync + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let endpoint = self.endpoint.clone();
        let runtime = self.runtime.clone();
        let on_end = Arc::new(on_end);
        let max_peers = self.max_peers;
        async move {
            let serving = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let accepting = async move {
                while let Some(incoming) = endpoint.accept().await {
                    use std::sync::atomic::Ordering;
                    if serving.fetch_add(1, Ordering::AcqRel) >= max_peers {
                        serving.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!(max_peers, "an iroh connection refused: peers at the bound");
                        incoming.refuse();
                        continue;
                    }
                    let slot = PeerSlot(serving.clone());
                    let (multi, options, on_end) = (multi.clone(), options.clone(), on_end.clone());
                    tokio::spawn(async move {
                        let served = serve_one(incoming, &multi, options).await;
                        drop(slot);
                        on_end(served);
                    });
                }
            };
            // Dropping this future aborts the accept loop (the peers already served go on).
            let mut task = AbortOnDrop(runtime.handle.spawn(accepting));
            let _ = (&mut task.0).await;
        }
    }

    /// Closes the endpoint: connections end, [`Node::serve`] returns.
    pub async fn close(&self) {
        let endpoint = self.endpoint.clone();
        self.runtime
            .run(async move { endpoint.close().await })
            .await;
    }
}

/// Completes one incoming connection and replicates over it; how it ended.
async fn serve_one(
    incoming: iroh::endpoint::Incoming,
    multi: &Multifeed,
    options: ReplicateOptions,
) -> Served {
    let (peer, stream) = match stream::accept(incoming).await {
        Ok(accepted) => accepted,
        Err((peer, err)) => {
            return Served {
                peer,
                result: Err(err),
            }
        }
    };
    tracing::debug!(%peer, "iroh peer connected");
    let ending = stream.ending();
    let result = multi.replicate(stream, options).await;
    // The dialer hangs up; we close only if it does not.
    ending.close(false).await;
    Served {
        peer,
        result: result.map_err(Error::from),
    }
}

async fn build(config: Config) -> Result<Endpoint, Error> {
    let mut builder = if config.address_lookup {
        Endpoint::builder(presets::N0)
    } else {
        Endpoint::builder(presets::Minimal)
    };
    builder = builder.relay_mode(if config.relays {
        RelayMode::Default
    } else {
        RelayMode::Disabled
    });
    if let Some(addr) = config.bind {
        builder = builder
            .clear_ip_transports()
            .bind_addr(addr)
            .map_err(|err| Error::Bind {
                reason: err.to_string(),
            })?;
    }
    if let Some(secret) = config.secret_key {
        builder = builder.secret_key(iroh::SecretKey::from_bytes(&secret));
    }
    builder
        .alpns(vec![ALPN.to_vec()])
        .bind()
        .await
        .map_err(|err| Error::Bind {
            reason: err.to_string(),
        })
}

/// One served peer, counted until its task ends.
struct PeerSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The tokio runtime iroh runs on: the caller's, or one of our own.
#[derive(Debug, Clone)]
struct Runtime {
    handle: tokio::runtime::Handle,
    _own: Option<Arc<OwnRuntime>>,
}

#[derive(Debug)]
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime's task.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Runtime {
    fn current_or_own() -> Result<Self, Error> {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            return Ok(Self { handle, _own: None });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("multifeed-iroh")
            .enable_all()
            .build()
            .map_err(|err| Error::Bind {
                reason: format!("starting a tokio runtime: {err}"),
            })?;
        Ok(Self {
            handle: runtime.handle().clone(),
            _own: Some(Arc::new(OwnRuntime(Some(runtime)))),
        })
    }

    /// Runs `work` on the runtime and waits for it from any executor; `None` if the runtime
    /// shut down first.
    async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        self.handle.spawn(work).await.ok()
    }
}
