//! One bidirectional QUIC stream as the byte stream of a replication, and its orderly end.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::io::{AsyncRead, AsyncWrite};
use iroh::endpoint::{Connection, Incoming, RecvStream, SendStream, VarInt};
use iroh::{Endpoint, EndpointAddr};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::{Error, ALPN, CLOSE_LINGER};

/// How long an accepted connection may take to open its replication stream. A peer that
/// connects and never opens one would otherwise hold a task forever.
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// The byte stream of one replication: a bidirectional QUIC stream of an iroh connection, with
/// the `futures` I/O traits [`multifeed::Multifeed::replicate`] takes.
///
/// Take [`IrohStream::ending`] before handing the stream over: once the replication is done
/// and the stream dropped, it closes the connection without losing the last bytes.
#[derive(Debug)]
pub struct IrohStream {
    connection: Connection,
    send: Compat<SendStream>,
    recv: Compat<RecvStream>,
}

impl IrohStream {
    fn new(connection: Connection, send: SendStream, recv: RecvStream) -> Self {
        Self {
            connection,
            send: send.compat_write(),
            recv: recv.compat(),
        }
    }

    /// The peer's endpoint id.
    pub fn peer(&self) -> String {
        self.connection.remote_id().to_string()
    }

    /// The end of this stream's connection, to be awaited after the replication returned.
    pub fn ending(&self) -> Ending {
        let stopped = self.send.get_ref().stopped();
        Ending {
            connection: self.connection.clone(),
            acknowledged: Box::pin(async move {
                let _ = stopped.await;
            }),
        }
    }
}

/// Closes a replication's connection once what we sent is acknowledged; see
/// [`IrohStream::ending`].
pub struct Ending {
    connection: Connection,
    acknowledged: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ending").finish_non_exhaustive()
    }
}

impl Ending {
    /// Waits (bounded) until the peer acknowledged every byte we sent: closing the connection
    /// earlier would drop them. Then the dialer (`hang_up`) closes it; the accepting side waits
    /// (bounded) for the dialer to, so that the dialer reads to its end.
    pub async fn close(self, hang_up: bool) {
        let _ = tokio::time::timeout(CLOSE_LINGER, self.acknowledged).await;
        if !hang_up {
            let _ = tokio::time::timeout(CLOSE_LINGER, self.connection.closed()).await;
        }
        self.connection.close(VarInt::from_u32(0), b"done");
        let stats = self.connection.stats();
        tracing::info!(
            peer = %self.connection.remote_id().fmt_short(),
            udp_bytes_sent = stats.udp_tx.bytes,
            udp_bytes_received = stats.udp_rx.bytes,
            lost_packets = stats.lost_packets,
            "iroh connection closed"
        );
    }
}

/// Dials `addr` and opens the replication stream.
pub(crate) async fn dial(
    endpoint: &Endpoint,
    addr: EndpointAddr,
    limit: Duration,
) -> Result<IrohStream, Error> {
    let peer = addr.id.to_string();
    let connection = match tokio::time::timeout(limit, endpoint.connect(addr, ALPN)).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => {
            let reason = err.to_string();
            return Err(Error::Connect { peer, reason });
        }
        Err(_) => {
            let reason = format!("no answer within {limit:?}");
            return Err(Error::Connect { peer, reason });
        }
    };
    // The stream reaches the peer with our first bytes: the replication's Noise handshake.
    let (send, recv) = connection.open_bi().await.map_err(|err| Error::Stream {
        peer,
        reason: err.to_string(),
    })?;
    Ok(IrohStream::new(connection, send, recv))
}

/// Completes an incoming connection and accepts its replication stream; on failure, the peer
/// (its id, or its address if it never got that far) and why.
pub(crate) async fn accept(incoming: Incoming) -> Result<(String, IrohStream), (String, Error)> {
    let from = format!("{:?}", incoming.remote_addr());
    let connection = incoming.await.map_err(|err| {
        let reason = err.to_string();
        (from.clone(), Error::Connect { peer: from, reason })
    })?;
    let peer = connection.remote_id().to_string();
    let opened = tokio::time::timeout(OPEN_STREAM_TIMEOUT, connection.accept_bi()).await;
    let (send, recv) = match opened {
        Ok(Ok(pair)) => pair,
        Ok(Err(err)) => {
            let reason = err.to_string();
            return Err((peer.clone(), Error::Stream { peer, reason }));
        }
        Err(_) => {
            connection.close(VarInt::from_u32(1), b"no stream opened");
            let reason = format!("no stream opened within {OPEN_STREAM_TIMEOUT:?}");
            return Err((peer.clone(), Error::Stream { peer, reason }));
        }
    };
    Ok((peer, IrohStream::new(connection, send, recv)))
}

impl AsyncRead for IrohStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for IrohStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_close(cx)
    }
}
