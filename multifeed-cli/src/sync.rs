//! `share` and `sync`: replication with peers over TCP.

use std::time::Duration;

use async_std::net::{TcpListener, TcpStream};
use futures::StreamExt;
use multifeed::{Multifeed, ReplicateOptions};

use crate::output::Output;
use crate::CliError;

fn options(initiator: bool, live: bool, key: Option<[u8; 32]>) -> ReplicateOptions {
    let options = ReplicateOptions::new(initiator).live(live);
    match key {
        Some(key) => options.encryption_key(key),
        None => options,
    }
}

/// Listens on `addr` and serves a live replication to every peer, until the process ends.
pub(crate) async fn share(
    multi: &Multifeed,
    addr: &str,
    key: Option<[u8; 32]>,
    out: &Output,
) -> Result<(), CliError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| CliError::Io {
            what: format!("listening on {addr}"),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| CliError::Io {
        what: "reading the listening address".to_owned(),
        source,
    })?;
    out.line(
        &format!("sharing on {local}"),
        serde_json::json!({ "event": "listening", "addr": local.to_string() }),
    );
    let mut incoming = listener.incoming();
    while let Some(stream) = incoming.next().await {
        let Ok(stream) = stream else { continue };
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |addr| addr.to_string());
        let multi = multi.clone();
        let out = *out;
        async_std::task::spawn(async move {
            let result = multi.replicate(stream, options(false, true, key)).await;
            match result {
                Ok(summary) => out.line(
                    &format!(
                        "{peer}: done, {} blocks received, {} sent",
                        summary.blocks_received, summary.blocks_sent
                    ),
                    serde_json::json!({
                        "event": "peer-done",
                        "peer": peer,
                        "blocks_received": summary.blocks_received,
                        "blocks_sent": summary.blocks_sent,
                    }),
                ),
                Err(err) => out.line(
                    &format!("{peer}: {err} [{}]", err.code()),
                    serde_json::json!({
                        "event": "peer-error",
                        "peer": peer,
                        "code": err.code(),
                        "message": err.to_string(),
                    }),
                ),
            }
        });
    }
    Ok(())
}

/// Connects to `addr` and syncs (until both hold the union, or until stopped when `live`).
pub(crate) async fn sync(
    multi: &Multifeed,
    addr: &str,
    live: bool,
    timeout: Option<f64>,
    key: Option<[u8; 32]>,
    plain: Vec<[u8; 32]>,
    out: &Output,
) -> Result<(), CliError> {
    let mut options = options(true, live, key);
    if !plain.is_empty() {
        options = options.hypercore_peer(plain);
    }
    let run = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| CliError::Io {
                what: format!("connecting to {addr}"),
                source,
            })?;
        Ok::<_, CliError>(multi.replicate(stream, options).await?)
    };
    let summary = match timeout {
        Some(seconds) => {
            let limit = Duration::from_secs_f64(seconds.max(0.0));
            async_std::future::timeout(limit, run)
                .await
                .map_err(|_| CliError::Timeout(seconds))??
        }
        None => run.await?,
    };
    out.line(
        &format!(
            "synced with {addr}: {} feeds and {} blocks received, {} feeds and {} blocks sent",
            summary.feeds_received,
            summary.blocks_received,
            summary.feeds_sent,
            summary.blocks_sent
        ),
        serde_json::json!({
            "event": "synced",
            "peer": addr,
            "feeds_received": summary.feeds_received,
            "blocks_received": summary.blocks_received,
            "feeds_sent": summary.feeds_sent,
            "blocks_sent": summary.blocks_sent,
            "feeds_incomplete": summary.feeds_incomplete,
        }),
    );
    Ok(())
}

/// Syncs live with `addr` on a task of its own (for `cat --connect`); its end is reported.
pub(crate) fn in_background(multi: &Multifeed, addr: &str, key: Option<[u8; 32]>) {
    let multi = multi.clone();
    let addr = addr.to_owned();
    async_std::task::spawn(async move {
        let result = match TcpStream::connect(&addr).await {
            Ok(stream) => multi
                .replicate(stream, options(true, true, key))
                .await
                .map(|_| ())
                .map_err(|err| (err.to_string(), err.code())),
            Err(err) => Err((format!("connecting to {addr}: {err}"), "ERR_IO")),
        };
        if let Err((message, code)) = result {
            eprintln!("sync with {addr} ended: {message} [{code}]");
        }
    });
}
