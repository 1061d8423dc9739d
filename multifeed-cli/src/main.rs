//! `multifeed`: a store of many hypercores from the terminal, synced with peers over TCP.
//!
//! ```text
//! multifeed --dir alice init
//! multifeed --dir alice append notes "hello"
//! multifeed --dir alice share --listen 127.0.0.1:7000     # serves live until stopped
//! multifeed --dir bob sync --connect 127.0.0.1:7000       # the union, both ways
//! multifeed --dir bob cat notes
//!
//! multifeed --dir alice share --iroh                      # prints a ticket: endpoint…
//! multifeed --dir bob sync --ticket endpoint…             # from anywhere, through NATs
//! ```
//!
//! Every command takes `--dir DIR` (or `MULTIFEED_DIR`; default `./.multifeed`) or `--temp`
//! (a store in memory), and `--json` (one JSON object per line on stdout). The shared key comes
//! from `MULTIFEED_KEY` (64 hex digits) or `--key-file`, never from the command line. Exit
//! codes: 0 done, 1 error (one line on stderr, with its code), 2 timeout.

mod output;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use multifeed::{Feed, Multifeed, ReadMode};

use output::Output;

/// A store of many hypercores by many authors, synced with peers.
#[derive(Debug, Parser)]
#[command(name = "multifeed", version, about)]
struct Cli {
    /// The store's directory.
    #[arg(
        long,
        global = true,
        env = "MULTIFEED_DIR",
        default_value = ".multifeed"
    )]
    dir: PathBuf,
    /// A store in memory, gone when the command ends (for trying things out).
    #[arg(long, global = true, conflicts_with = "dir")]
    temp: bool,
    /// One JSON object per line on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More log lines on stderr (`-v`: connections, `-vv`: feeds, `-vvv`: everything);
    /// `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Errors only on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// A file holding the shared key (64 hex digits); else `MULTIFEED_KEY`; else the public
    /// default key of JS multifeed.
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates the store (its directory and index).
    Init,
    /// Feeds, writers, entries and bytes in the store.
    Info,
    /// Every feed: key, length, and the writer name of local ones.
    Feeds {
        /// Also its contiguous length, bytes and whether it is writable here.
        #[arg(short, long)]
        long: bool,
    },
    /// Appends to the local writer NAME (created on first use): VALUE, or each line of stdin
    /// as one batch when VALUE is `-` or left out.
    Append {
        /// The writer's local name.
        name: String,
        /// The entry (`-` or nothing: the lines of stdin).
        value: Option<String>,
    },
    /// Prints the entries of a feed (its key in hex, or a local writer's name).
    Cat {
        /// A feed key (64 hex digits) or a local writer name.
        feed: String,
        /// The first index.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Past the last index.
        #[arg(long)]
        end: Option<u64>,
        /// Keep printing entries as they arrive.
        #[arg(long)]
        live: bool,
        /// Sync live with this peer meanwhile (`--connect ADDR` or `--ticket T`): entries it
        /// gets print as they arrive; a feed not here yet is waited for.
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Listens and serves live replications to every peer that connects, until stopped.
    /// Prints the address (TCP) or the ticket (`--iroh`) first.
    Share {
        /// Where to listen (TCP default `127.0.0.1:0`; with `--iroh`, the UDP address to bind,
        /// default all interfaces).
        #[arg(long)]
        listen: Option<String>,
        /// Also append each line typed on stdin to the local writer NAME (peers get it live).
        #[arg(long, value_name = "NAME")]
        append: Option<String>,
        #[command(flatten)]
        iroh: IrohArgs,
    },
    /// Connects to a peer and syncs: both end with the union of their feeds.
    Sync {
        /// The peer (`--connect ADDR` or `--ticket T`; one is needed).
        #[command(flatten)]
        peer: PeerArgs,
        /// Stay connected and keep syncing new entries.
        #[arg(long)]
        live: bool,
        /// Give up after this many seconds (exit code 2).
        #[arg(long)]
        timeout: Option<f64>,
        /// The peer is a plain Hypercore 10 peer (a JS `hypercore`), not a multifeed: download
        /// this feed (its key in hex) from it. May be given several times.
        #[arg(long = "hypercore", value_name = "KEY", conflicts_with = "ticket")]
        hypercore: Vec<String>,
    },
    /// A local writer's key pair: export it, or import one (to write as the same feed from
    /// another store). Secrets go to stdout or a file, and come from stdin or a file, never
    /// the command line.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Serves live replications headless, like `share`, printing nothing but errors.
    Seed {
        /// Where to listen (as for `share`).
        #[arg(long)]
        listen: Option<String>,
        #[command(flatten)]
        iroh: IrohArgs,
    },
}

/// The peer to dial, for `sync` and `cat`: a TCP address or an iroh ticket.
#[derive(Debug, clap::Args)]
struct PeerArgs {
    /// The peer's TCP address (`host:port`).
    #[arg(long, conflicts_with = "ticket")]
    connect: Option<String>,
    /// The peer's iroh ticket (`endpoint…`, printed by `share --iroh`).
    #[arg(long)]
    ticket: Option<String>,
    /// With `--ticket`: no relay and no address lookup, only the ticket's direct addresses.
    #[arg(long, requires = "ticket")]
    no_relay: bool,
    /// With `--ticket`: the local UDP address to bind (default all interfaces).
    #[arg(long, requires = "ticket")]
    bind: Option<String>,
}

impl PeerArgs {
    /// The peer given, if any.
    fn peer(&self) -> Result<Option<sync::Peer>, CliError> {
        if let Some(ticket) = &self.ticket {
            return Ok(Some(sync::Peer::Iroh {
                ticket: ticket.parse()?,
                config: iroh_config(self.no_relay, self.bind.as_deref())?,
            }));
        }
        Ok(self.connect.clone().map(sync::Peer::Tcp))
    }
}

/// iroh instead of TCP, for `share` and `seed`.
#[derive(Debug, clap::Args)]
struct IrohArgs {
    /// Serve over iroh (QUIC, relays, hole punching): print a ticket instead of an address.
    #[arg(long)]
    iroh: bool,
    /// With `--iroh`: no relay and no address lookup; the ticket holds direct addresses only.
    #[arg(long, requires = "iroh")]
    no_relay: bool,
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Prints the writer's secret key (64 hex digits), or writes it to `--out` (mode 0600).
    Export {
        /// The writer's local name.
        name: String,
        /// A file to write it to instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Creates the writer NAME from a secret key read from stdin or `--file`.
    Import {
        /// The local name to give it.
        name: String,
        /// A file holding the secret key (64 hex digits); else stdin.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// What can go wrong, as one line with a code.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Multifeed(#[from] multifeed::Error),
    #[error("no store at {0} (run `multifeed --dir {0} init` first)")]
    NoStore(String),
    #[error("no feed {0} in this store")]
    NoFeed(String),
    #[error("the shared key must be 64 hex digits ({0})")]
    BadKey(String),
    #[error("a feed key is 64 hex digits, not {0:?}")]
    BadFeedKey(String),
    #[error("{0} is not a writer of this store (its secret key is not here)")]
    NotAWriter(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("timed out after {0} s")]
    Timeout(f64),
    #[error("{0}")]
    Iroh(#[from] multifeed_iroh::Error),
    #[error("not a socket address: {0:?}")]
    BadAddr(String),
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    fn code(&self) -> &'static str {
        match self {
            Self::Multifeed(err) => err.code(),
            Self::NoStore(_) => "ERR_NO_STORE",
            Self::NoFeed(_) => "ERR_NO_FEED",
            Self::NotAWriter(_) => "ERR_NOT_WRITABLE",
            Self::BadKey(_) | Self::BadFeedKey(_) => "ERR_BAD_KEY",
            Self::Io { .. } => "ERR_IO",
            Self::Timeout(_) => "ERR_TIMEOUT",
            Self::Iroh(err) => err.code(),
            Self::BadAddr(_) => "ERR_BAD_ADDR",
            Self::Usage(_) => "ERR_USAGE",
        }
    }

    fn exit_code(&self) -> u8 {
        if self.code() == "ERR_TIMEOUT" {
            2
        } else {
            1
        }
    }
}

fn main() -> ExitCode {
    // Usage errors exit with 1 like every other error (clap's own default, 2, means timeout
    // here); `--help` and `--version` print to stdout and exit with 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(u8::from(err.use_stderr()));
        }
    };
    logging(cli.verbose, cli.quiet);
    let out = Output::new(cli.json);
    match async_std::task::block_on(run(cli, &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            out.error(&err.to_string(), err.code());
            ExitCode::from(err.exit_code())
        }
    }
}

/// Log lines of the library on stderr: warnings by default, more with `-v`, none but errors with
/// `-q`; `RUST_LOG` decides when it is set.
fn logging(verbose: u8, quiet: bool) {
    let ours = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    // The protocol and hypercore crates log every frame, and each error they return (which
    // reaches the user as our own error line): theirs only with `-vvv`.
    let others = if !quiet && verbose >= 3 {
        "trace"
    } else {
        "off"
    };
    let directives = [
        "multifeed",
        "multifeed_replicate",
        "multifeed_storage",
        "multifeed_meta",
        "multifeed_iroh",
    ]
    .iter()
    .fold(others.to_owned(), |all, krate| {
        format!("{all},{krate}={ours}")
    });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directives));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

async fn run(cli: Cli, out: &Output) -> Result<(), CliError> {
    let key = shared_key(cli.key_file.as_deref())?;
    let multi = open(&cli, key).await?;
    let result = command(&cli, &multi, key, out).await;
    // Everything written reaches the files before the process ends.
    let closed = multi.close().await;
    result?;
    Ok(closed?)
}

async fn command(
    cli: &Cli,
    multi: &Multifeed,
    key: Option<[u8; 32]>,
    out: &Output,
) -> Result<(), CliError> {
    match &cli.command {
        Command::Init => {
            out.line(
                &format!("store ready at {}", cli.dir.display()),
                serde_json::json!({ "event": "init", "dir": cli.dir.display().to_string() }),
            );
            Ok(())
        }
        Command::Info => info(cli, multi, out).await,
        Command::Feeds { long } => feeds(multi, *long, out).await,
        Command::Append { name, value } => append(multi, name, value.as_deref(), out).await,
        Command::Cat {
            feed,
            start,
            end,
            live,
            peer,
        } => {
            let peer = peer.peer()?;
            let wait = peer.is_some();
            if let Some(peer) = peer {
                sync::in_background(multi, peer, key);
            }
            cat(multi, feed, *start, *end, *live || wait, wait, out).await
        }
        Command::Share {
            listen,
            append,
            iroh,
        } => {
            if let Some(name) = append {
                appending_lines(multi, name, *out).await?;
            }
            serve(multi, listen.as_deref(), iroh, key, out).await
        }
        Command::Sync {
            peer,
            live,
            timeout,
            hypercore,
        } => {
            let plain = hypercore
                .iter()
                .map(|key| parse_feed_key(key))
                .collect::<Result<Vec<_>, _>>()?;
            let Some(peer) = peer.peer()? else {
                return Err(CliError::Usage(
                    "sync needs a peer: --connect ADDR or --ticket T".to_owned(),
                ));
            };
            let progress = sync::Progress::new(multi, out, cli.quiet);
            let options = sync::sync_options(*live, key, plain);
            sync::sync(multi, peer, *timeout, options, progress, out).await
        }
        Command::Keys { action } => keys(multi, action, out).await,
        Command::Seed { listen, iroh } => {
            serve(multi, listen.as_deref(), iroh, key, &Output::quiet()).await
        }
    }
}

/// `share` and `seed`: over TCP, or over iroh.
async fn serve(
    multi: &Multifeed,
    listen: Option<&str>,
    iroh: &IrohArgs,
    key: Option<[u8; 32]>,
    out: &Output,
) -> Result<(), CliError> {
    if iroh.iroh {
        let config = iroh_config(iroh.no_relay, listen)?;
        sync::share_iroh(multi, config, !iroh.no_relay, key, out).await
    } else {
        sync::share(multi, listen.unwrap_or("127.0.0.1:0"), key, out).await
    }
}

/// iroh's defaults, or direct addresses only (`--no-relay`); bound where asked.
fn iroh_config(no_relay: bool, bind: Option<&str>) -> Result<multifeed_iroh::Config, CliError> {
    let mut config = multifeed_iroh::Config::new();
    if no_relay {
        config = config.relays(false).address_lookup(false);
    }
    if let Some(addr) = bind {
        let addr = addr
            .parse()
            .map_err(|_| CliError::BadAddr(addr.to_owned()))?;
        config = config.bind_addr(addr);
    }
    Ok(config)
}

/// The shared key from `--key-file` or `MULTIFEED_KEY`, if either is given.
fn shared_key(file: Option<&std::path::Path>) -> Result<Option<[u8; 32]>, CliError> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|source| CliError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?,
        None => match std::env::var("MULTIFEED_KEY") {
            Ok(text) => text,
            Err(_) => return Ok(None),
        },
    };
    let bytes = hex::decode(text.trim()).map_err(|err| CliError::BadKey(err.to_string()))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| CliError::BadKey(format!("{} bytes", bytes.len())))?;
    Ok(Some(key))
}

async fn open(cli: &Cli, key: Option<[u8; 32]>) -> Result<Multifeed, CliError> {
    let mut builder = Multifeed::builder();
    if let Some(key) = key {
        builder = builder.encryption_key(key);
    }
    if cli.temp {
        return Ok(builder.memory().open().await?);
    }
    // Every command but `init` needs a store that exists: a typo must not create one.
    let exists = std::fs::read_dir(&cli.dir).is_ok_and(|mut entries| entries.next().is_some());
    if !exists && !matches!(cli.command, Command::Init) {
        return Err(CliError::NoStore(cli.dir.display().to_string()));
    }
    Ok(builder.disk(&cli.dir).open().await?)
}

async fn info(cli: &Cli, multi: &Multifeed, out: &Output) -> Result<(), CliError> {
    let feeds = multi.feeds();
    let (mut entries, mut bytes, mut writers) = (0u64, 0u64, 0usize);
    for feed in &feeds {
        let info = feed.info().await?;
        entries += info.length;
        bytes += info.byte_length;
        writers += usize::from(feed.name().is_some());
    }
    let disk = if cli.temp { 0 } else { dir_size(&cli.dir) };
    out.line(
        &format!(
            "{} feeds ({writers} writers here), {entries} entries, {bytes} bytes of entries, {disk} bytes on disk",
            feeds.len()
        ),
        serde_json::json!({
            "feeds": feeds.len(),
            "writers": writers,
            "entries": entries,
            "bytes": bytes,
            "disk_bytes": disk,
        }),
    );
    Ok(())
}

fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn feeds(multi: &Multifeed, long: bool, out: &Output) -> Result<(), CliError> {
    for feed in multi.feeds() {
        let info = feed.info().await?;
        let name = feed.name().unwrap_or("");
        let text = if long {
            format!(
                "{} {:>8} {:>8} {:>10} {} {name}",
                feed.key_hex(),
                info.length,
                info.contiguous_length,
                info.byte_length,
                if info.writable { "w" } else { "-" },
            )
        } else {
            format!("{} {:>8} {name}", feed.key_hex(), info.length)
        };
        out.line(
            &text,
            serde_json::json!({
                "key": feed.key_hex(),
                "name": feed.name(),
                "length": info.length,
                "contiguous_length": info.contiguous_length,
                "bytes": info.byte_length,
                "writable": info.writable,
            }),
        );
    }
    Ok(())
}

async fn append(
    multi: &Multifeed,
    name: &str,
    value: Option<&str>,
    out: &Output,
) -> Result<(), CliError> {
    let entries: Vec<Vec<u8>> = match value {
        Some(value) if value != "-" => vec![value.as_bytes().to_vec()],
        _ => {
            let mut lines = Vec::new();
            for line in std::io::stdin().lines() {
                let line = line.map_err(|source| CliError::Io {
                    what: "reading stdin".to_owned(),
                    source,
                })?;
                lines.push(line.into_bytes());
            }
            lines
        }
    };
    let feed = multi.writer(name).await?;
    let range = feed.append_batch(&entries).await?;
    out.line(
        &format!(
            "appended {} entries to {name} ({}): {}..{}",
            entries.len(),
            feed.key_hex(),
            range.start,
            range.end
        ),
        serde_json::json!({
            "event": "appended",
            "key": feed.key_hex(),
            "name": name,
            "start": range.start,
            "end": range.end,
        }),
    );
    Ok(())
}

/// Appends each line of stdin to the writer `name`, on a task of its own, until stdin ends.
async fn appending_lines(multi: &Multifeed, name: &str, out: Output) -> Result<(), CliError> {
    let feed = multi.writer(name).await?;
    async_std::task::spawn(async move {
        use futures::AsyncBufReadExt;
        let mut lines = async_std::io::BufReader::new(async_std::io::stdin()).lines();
        while let Some(Ok(line)) = lines.next().await {
            match feed.append(line.as_bytes()).await {
                Ok(index) => out.line(
                    &format!("appended {index}"),
                    serde_json::json!({ "event": "appended", "key": feed.key_hex(), "index": index }),
                ),
                Err(err) => out.line(
                    &format!("append failed: {err} [{}]", err.code()),
                    serde_json::json!({ "event": "error", "code": err.code(), "message": err.to_string() }),
                ),
            }
        }
    });
    Ok(())
}

async fn keys(multi: &Multifeed, action: &KeysAction, out: &Output) -> Result<(), CliError> {
    match action {
        KeysAction::Export { name, out: file } => {
            let feed = multi
                .feeds()
                .into_iter()
                .find(|f| f.name() == Some(name.as_str()))
                .ok_or_else(|| CliError::NoFeed(name.clone()))?;
            let secret = feed
                .signing_key()
                .await?
                .ok_or_else(|| CliError::NotAWriter(name.clone()))?;
            let secret = hex::encode(secret.to_bytes());
            match file {
                Some(path) => {
                    write_secret(path, &secret)?;
                    out.line(
                        &format!("wrote the secret key of {name} to {}", path.display()),
                        serde_json::json!({ "event": "exported", "name": name, "key": feed.key_hex() }),
                    );
                }
                None => out.line(
                    &secret,
                    serde_json::json!({ "name": name, "key": feed.key_hex(), "secret": secret }),
                ),
            }
            Ok(())
        }
        KeysAction::Import { name, file } => {
            let text = match file {
                Some(path) => std::fs::read_to_string(path).map_err(|source| CliError::Io {
                    what: format!("reading {}", path.display()),
                    source,
                })?,
                None => {
                    std::io::read_to_string(std::io::stdin()).map_err(|source| CliError::Io {
                        what: "reading stdin".to_owned(),
                        source,
                    })?
                }
            };
            let bytes =
                hex::decode(text.trim()).map_err(|err| CliError::BadKey(err.to_string()))?;
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|bytes: Vec<u8>| CliError::BadKey(format!("{} bytes", bytes.len())))?;
            let feed = multi
                .writer_with_keypair(name, multifeed::SigningKey::from_bytes(&bytes))
                .await?;
            out.line(
                &format!("imported {name} ({})", feed.key_hex()),
                serde_json::json!({ "event": "imported", "name": name, "key": feed.key_hex() }),
            );
            Ok(())
        }
    }
}

/// Writes a secret to a new file only its owner can read.
fn write_secret(path: &std::path::Path, secret: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|source| CliError::Io {
        what: format!("creating {}", path.display()),
        source,
    })?;
    writeln!(file, "{secret}").map_err(|source| CliError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// A feed key given in hex.
fn parse_feed_key(text: &str) -> Result<[u8; 32], CliError> {
    hex::decode(text)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| CliError::BadFeedKey(text.to_owned()))
}

/// A feed by its hex key or a local writer's name.
fn find_feed(multi: &Multifeed, feed: &str) -> Result<Feed, CliError> {
    if let Some(found) = multi.feeds().into_iter().find(|f| f.name() == Some(feed)) {
        return Ok(found);
    }
    let by_key = match hex::decode(feed) {
        Ok(bytes) if bytes.len() == 32 => multi.feed(&bytes)?,
        _ => None,
    };
    by_key.ok_or_else(|| CliError::NoFeed(feed.to_owned()))
}

async fn cat(
    multi: &Multifeed,
    feed: &str,
    start: u64,
    end: Option<u64>,
    live: bool,
    wait_for_feed: bool,
    out: &Output,
) -> Result<(), CliError> {
    let mut events = multi.events();
    let feed = loop {
        match find_feed(multi, feed) {
            Ok(found) => break found,
            // Syncing: the feed may come from the peer.
            Err(CliError::NoFeed(_)) if wait_for_feed => {
                if events.next().await.is_none() {
                    return Err(CliError::NoFeed(feed.to_owned()));
                }
            }
            Err(err) => return Err(err),
        }
    };
    let mode = if live {
        ReadMode::Live
    } else {
        ReadMode::Snapshot
    };
    let mut entries = match end {
        Some(end) => feed.read_stream(start..end, mode),
        None => feed.read_stream(start.., mode),
    };
    while let Some(entry) = entries.next().await {
        let (index, bytes) = entry?;
        let (text, encoding) = match String::from_utf8(bytes) {
            Ok(text) => (text, "utf8"),
            Err(err) => (hex::encode(err.into_bytes()), "hex"),
        };
        out.line(
            &text,
            serde_json::json!({ "index": index, "value": text, "encoding": encoding }),
        );
    }
    Ok(())
}
