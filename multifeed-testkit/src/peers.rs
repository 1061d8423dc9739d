//! Peers, digests, convergence checks, bounded replication runs and topologies.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, StreamExt};
use multifeed::{Error, FeedKey, Multifeed, ReplicateOptions, ReplicateSummary, StopHandle};

/// What a multifeed holds: per feed, its length and a hash of every entry it stores.
pub type Digest = BTreeMap<FeedKey, (u64, u64)>;

/// A memory multifeed with `writers` named `w0`, `w1`, … of `entries` entries each.
pub async fn memory_peer(prefix: &str, writers: usize, entries: usize) -> Result<Multifeed, Error> {
    let multi = Multifeed::open_memory().await?;
    fill(&multi, prefix, writers, entries).await?;
    Ok(multi)
}

/// A disk multifeed in `dir`, filled like [`memory_peer`].
pub async fn disk_peer(
    dir: &std::path::Path,
    prefix: &str,
    writers: usize,
    entries: usize,
) -> Result<Multifeed, Error> {
    let multi = Multifeed::open_disk(dir).await?;
    fill(&multi, prefix, writers, entries).await?;
    Ok(multi)
}

/// Adds `writers` writers named `{prefix}{i}` with `entries` entries each.
pub async fn fill(
    multi: &Multifeed,
    prefix: &str,
    writers: usize,
    entries: usize,
) -> Result<(), Error> {
    for w in 0..writers {
        let feed = multi.writer(&format!("{prefix}{w}")).await?;
        let batch: Vec<Vec<u8>> = (0..entries)
            .map(|i| format!("{prefix}{w} entry {i}").into_bytes())
            .collect();
        if !batch.is_empty() {
            feed.append_batch(&batch).await?;
        }
    }
    Ok(())
}

/// Every non-empty feed's length and a hash of its stored entries (missing entries hash as
/// absent). Empty feeds are left out: a peer records a feed it learns of only once a signed
/// root of it verified, and an empty feed has none yet.
pub async fn digest(multi: &Multifeed) -> Result<Digest, Error> {
    let mut out = Digest::new();
    for feed in multi.feeds() {
        let len = feed.len().await?;
        if len == 0 {
            continue;
        }
        let mut hasher = DefaultHasher::new();
        for i in 0..len {
            feed.get(i).await?.hash(&mut hasher);
        }
        out.insert(*feed.key(), (len, hasher.finish()));
    }
    Ok(out)
}

/// Whether all peers hold the same non-empty feeds with the same, complete entries.
pub async fn converged(peers: &[&Multifeed]) -> Result<bool, Error> {
    let mut first: Option<Digest> = None;
    for peer in peers {
        for feed in peer.feeds() {
            let len = feed.len().await?;
            if len > 0 && feed.get(len - 1).await?.is_none() {
                return Ok(false);
            }
        }
        let digest = digest(peer).await?;
        match &first {
            None => first = Some(digest),
            Some(expected) if *expected != digest => return Ok(false),
            Some(_) => {}
        }
    }
    Ok(true)
}

/// Fails with a description unless all peers converged.
pub async fn assert_converged(peers: &[&Multifeed]) -> Result<(), String> {
    if converged(peers).await.map_err(|e| e.to_string())? {
        return Ok(());
    }
    let mut report = String::from("peers did not converge:");
    for (i, peer) in peers.iter().enumerate() {
        let digest = digest(peer).await.map_err(|e| e.to_string())?;
        report.push_str(&format!(
            "\n  peer {i}: {} feeds, lengths {:?}",
            digest.len(),
            digest.values().map(|v| v.0).collect::<Vec<_>>()
        ));
    }
    Err(report)
}

/// Waits until the peers converge, re-checking on every event of theirs; fails after `bound`.
pub async fn wait_converged(peers: &[&Multifeed], bound: Duration) -> Result<(), String> {
    let mut events = futures::stream::select_all(peers.iter().map(|p| p.events()));
    let wait = async {
        loop {
            if converged(peers).await.map_err(|e| e.to_string())? {
                return Ok(());
            }
            if events.next().await.is_none() {
                return assert_converged(peers).await;
            }
        }
    };
    match async_std::future::timeout(bound, wait).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "timed out after {bound:?} waiting for convergence; {}",
            assert_converged(peers).await.err().unwrap_or_default()
        )),
    }
}

/// The result of both sides of one replication.
pub type PairResult = (
    Result<ReplicateSummary, Error>,
    Result<ReplicateSummary, Error>,
);

/// Replicates `a` (initiator) with `b` over the two ends, non-live; fails after `bound`.
pub async fn sync_over<IA, IB>(
    a: &Multifeed,
    b: &Multifeed,
    ends: (IA, IB),
    bound: Duration,
) -> Result<PairResult, String>
where
    IA: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    IB: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let both = futures::future::join(
        a.replicate(ends.0, ReplicateOptions::new(true)),
        b.replicate(ends.1, ReplicateOptions::new(false)),
    );
    async_std::future::timeout(bound, both)
        .await
        .map_err(|_| format!("replication did not end within {bound:?}"))
}

/// A live replication between two peers, running in the background until stopped.
#[derive(Debug)]
pub struct LiveLink {
    stops: [StopHandle; 2],
    tasks: Vec<async_std::task::JoinHandle<Result<ReplicateSummary, Error>>>,
}

impl LiveLink {
    /// Stops both sides and returns their results.
    pub async fn stop(self) -> Vec<Result<ReplicateSummary, Error>> {
        for stop in &self.stops {
            stop.stop();
        }
        futures::future::join_all(self.tasks).await
    }
}

/// Connects `a` and `b` live over an in-memory reliable link.
pub fn connect_live(a: &Multifeed, b: &Multifeed) -> LiveLink {
    let (left, right) = crate::link(crate::LinkConfig::reliable());
    let (oa, ob) = (
        ReplicateOptions::new(true).live(true),
        ReplicateOptions::new(false).live(true),
    );
    let stops = [oa.stop_handle(), ob.stop_handle()];
    let (a, b) = (a.clone(), b.clone());
    let tasks = vec![
        async_std::task::spawn(async move { a.replicate(left, oa).await }),
        async_std::task::spawn(async move { b.replicate(right, ob).await }),
    ];
    LiveLink { stops, tasks }
}

/// How peers are wired together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// 0-1, 1-2, …
    Line,
    /// A line closed into a circle.
    Ring,
    /// Peer 0 with every other.
    Star,
    /// Every pair.
    Mesh,
}

/// The pairs of peer indexes a topology connects.
pub fn edges(topology: Topology, peers: usize) -> Vec<(usize, usize)> {
    match topology {
        Topology::Line => (1..peers).map(|i| (i - 1, i)).collect(),
        Topology::Ring if peers > 2 => (0..peers).map(|i| (i, (i + 1) % peers)).collect(),
        Topology::Ring => edges(Topology::Line, peers),
        Topology::Star => (1..peers).map(|i| (0, i)).collect(),
        Topology::Mesh => (0..peers)
            .flat_map(|i| (i + 1..peers).map(move |j| (i, j)))
            .collect(),
    }
}

/// Connects the peers live in `topology`.
pub fn connect_topology(peers: &[Multifeed], topology: Topology) -> Vec<LiveLink> {
    edges(topology, peers.len())
        .into_iter()
        .map(|(i, j)| connect_live(&peers[i], &peers[j]))
        .collect()
}
