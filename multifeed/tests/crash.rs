//! Crash safety: a child process appending on disk is killed with SIGKILL at random points;
//! reopening always succeeds and every acknowledged append is there, intact.
//!
//! The child is this test binary, re-run with `MULTIFEED_CRASH_CHILD=<dir>`: it appends to several
//! writers (single appends and batches, new writers now and then) and prints `ack <writer> <len>`
//! after each append returns. `MULTIFEED_CRASH_SEEDS=<n>` sets the number of kills (default 50).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use multifeed::Multifeed;
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "MULTIFEED_CRASH_CHILD";

fn entry(writer: usize, index: u64) -> Vec<u8> {
    format!(
        "writer {writer} entry {index} {}",
        "x".repeat((index % 7) as usize * 20)
    )
    .into_bytes()
}

#[test]
fn killed_appenders_lose_no_acknowledged_entry() {
    let seeds: u64 = std::env::var("MULTIFEED_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let master = std::env::var("MULTIFEED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("MULTIFEED_SEED={master}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(master);
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("test binary path");
    // Acknowledged lengths survive across every crash: the same root is reused each round.
    let mut acked: HashMap<usize, u64> = HashMap::new();
    for round in 0..seeds {
        let kill_after = rng.gen_range(1..40u32);
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env("MULTIFEED_SEED", rng.gen::<u64>().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut acks = 0;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ack ") {
                let mut parts = rest.split_whitespace().map(str::parse::<u64>);
                if let (Some(Ok(writer)), Some(Ok(len))) = (parts.next(), parts.next()) {
                    let slot = acked.entry(writer as usize).or_default();
                    *slot = (*slot).max(len);
                }
                acks += 1;
                if acks >= kill_after {
                    break;
                }
            }
        }
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");

        async_std::task::block_on(async {
            let multi = Multifeed::open_disk(dir.path())
                .await
                .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
            for (&writer, &len) in &acked {
                let feed = multi
                    .writer(&format!("w{writer}"))
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: writer w{writer}: {e}"));
                let stored = feed.len().await.expect("len");
                assert!(
                    stored >= len,
                    "round {round}: w{writer} has {stored} < acked {len}"
                );
                for i in 0..stored {
                    let got = feed.get(i).await.expect("get").expect("entry present");
                    assert_eq!(got, entry(writer, i), "round {round}: w{writer} entry {i}");
                }
            }
            multi.close().await.expect("close");
        });
    }
    assert!(!acked.is_empty(), "children acknowledged nothing");
}

#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return; // Only runs as the child of the test above.
    };
    let seed: u64 = std::env::var("MULTIFEED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    async_std::task::block_on(async {
        let multi = Multifeed::open_disk(dir).await.expect("child open");
        let mut writers = multi.feeds().len().max(1);
        loop {
            if rng.gen_ratio(1, 10) {
                writers += 1;
            }
            let w = rng.gen_range(0..writers);
            let feed = multi.writer(&format!("w{w}")).await.expect("child writer");
            let start = feed.len().await.expect("child len");
            let count = if rng.gen_bool(0.5) {
                1
            } else {
                rng.gen_range(2..20)
            };
            let batch: Vec<Vec<u8>> = (start..start + count).map(|i| entry(w, i)).collect();
            let range = feed.append_batch(&batch).await.expect("child append");
            println!("ack {w} {}", range.end);
        }
    });
}
