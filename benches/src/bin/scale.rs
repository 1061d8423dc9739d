//! Replication cost at scale (issue 13): side A holds N feeds of one entry, side B none.
//!
//! `cargo run --release -p multifeed-benches --bin scale -- [--disk] [N ...]` (default 1000
//! 10000 30000). Each N runs in a child process of its own (peak RSS is the child's), and
//! prints one row: the first replication, a re-sync with nothing changed, a re-sync after one
//! append to each of 100 feeds, the bytes on the wire each way of each, and the peak RSS.

use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite};
use multifeed::{Multifeed, ReplicateOptions, ValueEncoding};
use multifeed_benches::peak_rss_mb;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--resync-child") {
        let (a, b) = (args.get(1).ok_or("DIR_A")?, args.get(2).ok_or("DIR_B")?);
        return async_std::task::block_on(resync_child(a, b));
    }
    if args.first().map(String::as_str) == Some("--child") {
        let n: usize = args.get(1).ok_or("--child N")?.parse()?;
        let disk = args.get(2).map(String::as_str) == Some("disk");
        return async_std::task::block_on(child(n, disk));
    }
    let disk = args.iter().any(|a| a == "--disk");
    let mut sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![1_000, 10_000, 30_000];
    }
    let storage = if disk { "disk" } else { "memory" };
    println!(
        "| feeds | storage | first replication ms | bytes A→B / B→A | re-sync unchanged ms | bytes | re-sync 100 changed ms | bytes | peak RSS MB | disk: equal re-sync in a fresh process, ms / peak RSS MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let out = Command::new(std::env::current_exe()?)
            .args(["--child", &n.to_string(), storage])
            .output()?;
        if !out.status.success() {
            return Err(
                format!("{n} feeds failed: {}", String::from_utf8_lossy(&out.stderr)).into(),
            );
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

async fn open(
    disk: bool,
    dirs: &mut Vec<tempfile::TempDir>,
) -> Result<Multifeed, Box<dyn std::error::Error>> {
    let builder = Multifeed::builder().value_encoding(ValueEncoding::Json);
    let builder = if disk {
        let dir = tempfile::tempdir()?;
        let builder = builder.disk(dir.path());
        dirs.push(dir);
        builder
    } else {
        builder.memory()
    };
    Ok(builder.open().await?)
}

async fn child(n: usize, disk: bool) -> Result<(), Box<dyn std::error::Error>> {
    let mut dirs = Vec::new();
    let a = open(disk, &mut dirs).await?;
    let b = open(disk, &mut dirs).await?;
    let mut writers = Vec::with_capacity(n);
    for w in 0..n {
        let feed = a.writer(&format!("w{w}")).await?;
        feed.append(br#"{"msg":"hello"}"#).await?;
        writers.push(feed);
    }
    let first = sync(&a, &b).await?;
    if b.feeds().len() != n {
        return Err(format!("B holds {} feeds of {n}", b.feeds().len()).into());
    }
    let mut unchanged = sync(&a, &b).await?;
    // For profiling and steadier figures: `SCALE_RESYNC_REPEAT=k` runs the re-sync of equal
    // stores k more times and reports the median of all.
    let repeat: usize = std::env::var("SCALE_RESYNC_REPEAT")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(0);
    if repeat > 0 {
        let mut times = vec![unchanged.time];
        for _ in 0..repeat {
            times.push(sync(&a, &b).await?.time);
        }
        times.sort();
        unchanged.time = times[times.len() / 2];
    }
    for feed in writers.iter().take(100) {
        feed.append(br#"{"msg":"again"}"#).await?;
    }
    let changed = sync(&a, &b).await?;
    for feed in writers.iter().take(100) {
        let copy = b
            .feed(feed.key())?
            .ok_or("a changed feed is missing on B")?;
        if copy.len().await? != 2 {
            return Err("a changed feed did not reach B".into());
        }
    }
    let storage = if disk { "disk" } else { "memory" };
    // Disk: the equal stores synced again by a process that only opens them, so its peak RSS
    // is what syncing with an equal peer costs (not the first replication's).
    let fresh = if disk {
        let closing = Instant::now();
        a.close().await?;
        let close_ms = closing.elapsed().as_secs_f64() * 1e3;
        b.close().await?;
        let out = Command::new(std::env::current_exe()?)
            .arg("--resync-child")
            .args(dirs.iter().map(|dir| dir.path()))
            .output()?;
        if !out.status.success() {
            return Err(format!("re-sync child: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        format!(
            "{} (A's close before it: {close_ms:.0} ms)",
            String::from_utf8_lossy(&out.stdout).trim()
        )
    } else {
        "-".to_owned()
    };
    let row = |r: &Run| {
        format!(
            "{:.0} | {} / {}",
            r.time.as_secs_f64() * 1e3,
            r.a_to_b,
            r.b_to_a
        )
    };
    println!(
        "| {n} | {storage} | {} | {} | {} | {:.0} | {fresh} |",
        row(&first),
        row(&unchanged),
        row(&changed),
        peak_rss_mb()
    );
    Ok(())
}

/// Opens two equal disk stores and syncs them once; prints `ms / peak RSS MB`.
async fn resync_child(a: &str, b: &str) -> Result<(), Box<dyn std::error::Error>> {
    let opening = Instant::now();
    let a = Multifeed::builder()
        .value_encoding(ValueEncoding::Json)
        .disk(a)
        .open()
        .await?;
    let b = Multifeed::builder()
        .value_encoding(ValueEncoding::Json)
        .disk(b)
        .open()
        .await?;
    let open_ms = opening.elapsed().as_secs_f64() * 1e3;
    let run = sync(&a, &b).await?;
    println!(
        "open both {open_ms:.0} + sync {:.0} ms / {:.0} MB",
        run.time.as_secs_f64() * 1e3,
        peak_rss_mb()
    );
    Ok(())
}

struct Run {
    time: Duration,
    a_to_b: u64,
    b_to_a: u64,
}

async fn sync(a: &Multifeed, b: &Multifeed) -> Result<Run, Box<dyn std::error::Error>> {
    let (left, right) = async_std::os::unix::net::UnixStream::pair()?;
    let (a_to_b, b_to_a) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let left = Counted {
        io: left,
        written: a_to_b.clone(),
    };
    let right = Counted {
        io: right,
        written: b_to_a.clone(),
    };
    let started = Instant::now();
    let (ra, rb) = futures::join!(
        a.replicate(left, ReplicateOptions::new(true)),
        b.replicate(right, ReplicateOptions::new(false)),
    );
    let time = started.elapsed();
    ra?;
    rb?;
    Ok(Run {
        time,
        a_to_b: a_to_b.load(Ordering::Relaxed),
        b_to_a: b_to_a.load(Ordering::Relaxed),
    })
}

/// A stream that counts the bytes written to it.
struct Counted<S> {
    io: S,
    written: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_close(cx)
    }
}
