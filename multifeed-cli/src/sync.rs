//! `share` and `sync`: replication with peers over TCP or iroh.

use std::time::Duration;

use async_std::net::{TcpListener, TcpStream};
use futures::StreamExt;
use multifeed::{Multifeed, ReplicateOptions, ReplicateSummary};

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
            peer_ended(&out, &peer, result.map_err(CliError::from));
        });
    }
    Ok(())
}

/// Serves live replications over iroh until the process ends; prints the ticket first (with
/// relays, once the endpoint has a home relay, or after 10 s without one).
pub(crate) async fn share_iroh(
    multi: &Multifeed,
    config: multifeed_iroh::Config,
    relays: bool,
    key: Option<[u8; 32]>,
    out: &Output,
) -> Result<(), CliError> {
    let node = multifeed_iroh::Node::bind(config).await?;
    if relays && !node.online(Duration::from_secs(10)).await {
        tracing::warn!("no relay reached within 10 s: the ticket holds direct addresses only");
    }
    let ticket = node.ticket();
    out.line(
        &format!("sharing over iroh, ticket: {ticket}"),
        serde_json::json!({ "event": "listening", "ticket": ticket.to_string(), "id": node.id() }),
    );
    let out = *out;
    node.serve(multi.clone(), options(false, true, key), move |served| {
        peer_ended(&out, &served.peer, served.result.map_err(CliError::from));
    })
    .await;
    Ok(())
}

/// One line for a served peer's end.
fn peer_ended(out: &Output, peer: &str, result: Result<ReplicateSummary, CliError>) {
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
}

/// Whom a sync connects to.
pub(crate) enum Peer {
    /// A TCP address.
    Tcp(String),
    /// An iroh ticket, dialed from an endpoint configured so.
    Iroh {
        ticket: multifeed_iroh::Ticket,
        config: multifeed_iroh::Config,
    },
}

impl Peer {
    /// How the result lines name it.
    fn name(&self) -> String {
        match self {
            Self::Tcp(addr) => addr.clone(),
            Self::Iroh { ticket, .. } => ticket.peer(),
        }
    }

    async fn replicate(
        self,
        multi: &Multifeed,
        options: ReplicateOptions,
    ) -> Result<ReplicateSummary, CliError> {
        match self {
            Self::Tcp(addr) => {
                let stream = TcpStream::connect(&addr)
                    .await
                    .map_err(|source| CliError::Io {
                        what: format!("connecting to {addr}"),
                        source,
                    })?;
                Ok(multi.replicate(stream, options).await?)
            }
            Self::Iroh { ticket, config } => {
                let node = multifeed_iroh::Node::bind(config).await?;
                let result = node.replicate(multi, &ticket, options).await;
                node.close().await;
                Ok(result?)
            }
        }
    }
}

/// How a sync replicates: live or not, with a shared key, against a plain Hypercore peer.
pub(crate) fn sync_options(
    live: bool,
    key: Option<[u8; 32]>,
    plain: Vec<[u8; 32]>,
) -> ReplicateOptions {
    let options = options(true, live, key);
    if plain.is_empty() {
        options
    } else {
        options.hypercore_peer(plain)
    }
}

/// Connects to `peer` and syncs (until both hold the union, or until stopped when live).
pub(crate) async fn sync(
    multi: &Multifeed,
    peer: Peer,
    timeout: Option<f64>,
    options: ReplicateOptions,
    progress: Progress,
    out: &Output,
) -> Result<(), CliError> {
    let addr = peer.name();
    let run = peer.replicate(multi, options);
    let summary = match timeout {
        Some(seconds) => {
            let limit = Duration::from_secs_f64(seconds.max(0.0));
            async_std::future::timeout(limit, run)
                .await
                .map_err(|_| CliError::Timeout(seconds))
                .and_then(|result| result)
        }
        None => run.await,
    };
    // The bar (or the progress events) end before the result line.
    progress.finish().await;
    let summary = summary?;
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

/// Syncs live with `peer` on a task of its own (for `cat --connect` / `--ticket`); its end is
/// reported.
pub(crate) fn in_background(multi: &Multifeed, peer: Peer, key: Option<[u8; 32]>) {
    let multi = multi.clone();
    async_std::task::spawn(async move {
        let name = peer.name();
        if let Err(err) = peer.replicate(&multi, options(true, true, key)).await {
            eprintln!("sync with {name} ended: {err} [{}]", err.code());
        }
    });
}

/// Progress of a sync: a bar on stderr when it is a terminal (not with `--json` or `-q`), or
/// `progress` events with `--json` (at most ten a second).
pub(crate) struct Progress {
    task: Option<async_std::task::JoinHandle<()>>,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub(crate) fn new(multi: &Multifeed, out: &Output, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && !out.is_json() && std::io::stderr().is_terminal()).then(|| {
            // Drawn from the first progress on (the total is not known before).
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(0),
                indicatif::ProgressDrawTarget::hidden(),
            );
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} blocks ({per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style.progress_chars("=> "));
            bar.set_message("0 feeds");
            bar
        });
        if bar.is_none() && !out.is_json() {
            return Self { task: None, bar };
        }
        let mut events = multi.events();
        let shown = bar.clone();
        let out = *out;
        let task = async_std::task::spawn(async move {
            let (mut feeds, mut last_json) = (0u64, None::<std::time::Instant>);
            while let Some(event) = events.next().await {
                match event {
                    multifeed::Event::Feed { .. } => {
                        feeds += 1;
                        if let Some(bar) = &shown {
                            bar.set_message(format!("{feeds} feeds"));
                        }
                    }
                    multifeed::Event::Progress {
                        blocks_done,
                        blocks_known,
                    } => {
                        if let Some(bar) = &shown {
                            if bar.is_hidden() {
                                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                                bar.enable_steady_tick(Duration::from_millis(120));
                            }
                            bar.set_length(blocks_known);
                            bar.set_position(blocks_done);
                        } else if last_json
                            .is_none_or(|at| at.elapsed() >= Duration::from_millis(100))
                        {
                            last_json = Some(std::time::Instant::now());
                            out.line(
                                "",
                                serde_json::json!({
                                    "event": "progress",
                                    "blocks_done": blocks_done,
                                    "blocks_known": blocks_known,
                                    "feeds_added": feeds,
                                }),
                            );
                        }
                    }
                    _ => {}
                }
            }
        });
        Self {
            task: Some(task),
            bar,
        }
    }

    /// The sync ended: no more progress is shown.
    pub(crate) async fn finish(self) {
        if let Some(task) = self.task {
            task.cancel().await;
        }
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
