//! Thousands of disk feeds under a low open-file limit: `ulimit -n 256`.
//!
//! The outer test re-runs this test binary through `sh -c 'ulimit -n 256; …'` so the limit applies
//! to a fresh process; the inner test does the work and reports its peak of open descriptors.

use std::process::Command;

use multifeed::Multifeed;
use rand::{Rng, SeedableRng};

const INNER_ENV: &str = "MULTIFEED_FD_LIMIT_INNER";
const FEEDS: usize = 2_000;
const LIMIT: usize = 256;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

/// Runs the inner test `name` in a fresh process under `ulimit -n LIMIT`; its stderr.
fn under_the_limit(name: &str) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let script =
        format!("ulimit -n {LIMIT} && exec \"$0\" --exact {name} --nocapture --test-threads=1");
    let output = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(exe)
        .env(INNER_ENV, "1")
        .output()
        .expect("run the test binary under sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "inner test failed under ulimit -n {LIMIT}:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "the inner test did not run:\n{stdout}\n{stderr}"
    );
    stderr.into_owned()
}

#[test]
fn thousands_of_disk_feeds_under_ulimit_256() {
    let stderr = under_the_limit("inner_thousands_of_disk_feeds");
    let peak = stderr
        .lines()
        .find_map(|line| line.strip_prefix("peak open fds: "))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .expect("the inner test reports its peak");
    assert!(peak < LIMIT, "peak {peak} must stay under {LIMIT}");
}

#[test]
fn inner_thousands_of_disk_feeds() {
    if std::env::var_os(INNER_ENV).is_none() {
        return; // Only meaningful under the limit set by the outer test.
    }
    let seed = std::env::var("MULTIFEED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("MULTIFEED_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut peak = open_fds();
    async_std::task::block_on(async {
        let multi = Multifeed::builder()
            .disk(dir.path())
            .max_open_files(64)
            .open()
            .await
            .expect("open");
        for i in 0..FEEDS {
            let feed = multi.writer(&format!("w{i}")).await.expect("create writer");
            feed.append(format!("entry {i} 0").as_bytes())
                .await
                .expect("append");
            if i % 100 == 0 {
                peak = peak.max(open_fds());
            }
        }
        multi.close().await.expect("close");

        let multi = Multifeed::open_disk(dir.path()).await.expect("reopen");
        assert_eq!(multi.feeds().len(), FEEDS);
        let mut extra = vec![0u64; FEEDS];
        for _ in 0..100 {
            let i = rng.gen_range(0..FEEDS);
            let feed = multi
                .writer(&format!("w{i}"))
                .await
                .expect("writer after reopen");
            extra[i] += 1;
            feed.append(format!("entry {i} {}", extra[i]).as_bytes())
                .await
                .expect("append after reopen");
            peak = peak.max(open_fds());
        }
        for (i, feed) in multi.feeds().iter().enumerate() {
            assert_eq!(feed.name(), Some(format!("w{i}").as_str()));
            let len = feed.len().await.expect("len");
            assert_eq!(len, 1 + extra[i], "length of w{i}");
            for n in 0..len {
                let entry = feed.get(n).await.expect("get").expect("entry stored");
                assert_eq!(entry, format!("entry {i} {n}").into_bytes());
            }
            if i % 100 == 0 {
                peak = peak.max(open_fds());
            }
        }
        multi.close().await.expect("close");
    });
    eprintln!("peak open fds: {peak}");
}

/// Two disk multifeeds in one process whose pools together allow more files than the process
/// may open: running out of descriptors is an I/O condition the pools recover from (they give
/// files back), never corruption (a replica was reset for it, and the sync failed).
#[test]
fn two_disk_multifeeds_whose_pools_exceed_ulimit_256_still_sync() {
    under_the_limit("inner_two_disk_multifeeds_over_the_limit");
}

#[test]
fn inner_two_disk_multifeeds_over_the_limit() {
    if std::env::var_os(INNER_ENV).is_none() {
        return;
    }
    const WRITERS: usize = 400;
    let (da, db) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    async_std::task::block_on(async {
        let open =
            |dir: std::path::PathBuf| Multifeed::builder().disk(dir).max_open_files(200).open();
        let a = open(da.path().to_path_buf()).await.expect("open a");
        for i in 0..WRITERS {
            let feed = a.writer(&format!("w{i}")).await.expect("writer");
            feed.append(format!("entry {i}").as_bytes())
                .await
                .expect("append");
        }
        let b = open(db.path().to_path_buf()).await.expect("open b");
        let (left, right) = async_std::os::unix::net::UnixStream::pair().expect("socket pair");
        let (ra, rb) = futures::join!(
            a.replicate(left, multifeed::ReplicateOptions::new(true)),
            b.replicate(right, multifeed::ReplicateOptions::new(false)),
        );
        ra.expect("a syncs");
        let summary = rb.expect("b syncs");
        assert_eq!(summary.blocks_received, WRITERS as u64);
        for feed in a.feeds() {
            let copy = b.feed(feed.key()).expect("key").expect("b has the feed");
            assert_eq!(
                copy.get(0).await.expect("get"),
                feed.get(0).await.expect("get")
            );
        }
        a.close().await.expect("close a");
        b.close().await.expect("close b");
    });
}
