//! A community hub at scale (issue 13): one live hub on disk, in a process of its own, and P
//! live peers of F one-entry feeds each, connected to it over TCP on 127.0.0.1. Every peer
//! must end up with all P x F feeds, each learned through the hub. Prints the time until all
//! converged, and the hub's peak RSS and open descriptors (read from `/proc` of its process).
//!
//! `cargo run --release -p multifeed-benches --bin hub -- [PEERS FEEDS]` (default 20 500).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_std::net::{TcpListener, TcpStream};
use futures::StreamExt;
use multifeed::{Multifeed, ReplicateOptions};

/// Bounds the whole run.
const LIMIT: Duration = Duration::from_secs(900);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--hub-child") {
        let dir = args.get(1).ok_or("--hub-child DIR")?;
        return async_std::task::block_on(hub(dir));
    }
    let peers: usize = args.first().map_or(Ok(20), |a| a.parse())?;
    let feeds: usize = args.get(1).map_or(Ok(500), |a| a.parse())?;
    async_std::task::block_on(run(peers, feeds))
}

/// The hub: a store on disk serving live replications until killed; prints its port first.
async fn hub(dir: &str) -> Result<(), Box<dyn std::error::Error>> {
    let multi = Multifeed::open_disk(dir).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    let mut incoming = listener.incoming();
    while let Some(stream) = incoming.next().await {
        let Ok(stream) = stream else { continue };
        let multi = multi.clone();
        async_std::task::spawn(async move {
            if let Err(err) = multi
                .replicate(stream, ReplicateOptions::new(false).live(true))
                .await
            {
                eprintln!("hub: a peer ended: {err} [{}]", err.code());
            }
        });
    }
    Ok(())
}

async fn run(peers: usize, feeds: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--hub-child", &dir.path().display().to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("hub stdout")?).read_line(&mut line)?;
    let port: u16 = line.trim().parse()?;

    let mut stores = Vec::with_capacity(peers);
    for p in 0..peers {
        let multi = Multifeed::open_memory().await?;
        for f in 0..feeds {
            multi
                .writer(&format!("p{p}f{f}"))
                .await?
                .append(b"hello")
                .await?;
        }
        stores.push(multi);
    }
    let total = peers * feeds;
    let started = Instant::now();
    for multi in &stores {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let multi = multi.clone();
        async_std::task::spawn(async move {
            if let Err(err) = multi
                .replicate(stream, ReplicateOptions::new(true).live(true))
                .await
            {
                eprintln!("peer ended: {err} [{}]", err.code());
            }
        });
    }
    // A bench, not a test: it looks every 100 ms until every peer holds every feed at length 1.
    let mut peak_fds = 0;
    loop {
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            return Err(format!("not converged within {LIMIT:?}").into());
        }
        peak_fds = peak_fds.max(open_fds(pid));
        let mut done = true;
        for multi in &stores {
            if multi.feeds().len() < total {
                done = false;
                break;
            }
        }
        if done {
            let mut complete = 0;
            for multi in &stores {
                for feed in multi.feeds() {
                    if feed.len().await? >= 1 && feed.get(0).await?.is_some() {
                        complete += 1;
                    }
                }
            }
            if complete == peers * total {
                break;
            }
        }
        async_std::task::sleep(Duration::from_millis(100)).await;
    }
    let converged = started.elapsed();
    let fds_now = open_fds(pid);
    let rss = peak_rss_of(pid);
    let _ = child.kill();
    let _ = child.wait();
    println!("| peers | feeds each | all feeds | converged s | hub peak RSS MB | hub open fds (peak / end) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {peers} | {feeds} | {total} | {:.1} | {rss:.0} | {peak_fds} / {fds_now} |",
        converged.as_secs_f64()
    );
    Ok(())
}

/// How many descriptors process `pid` holds open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Peak resident memory of process `pid`, in MB (`VmHWM`).
fn peak_rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
