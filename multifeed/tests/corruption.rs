//! Seeded damage to each file of a disk store's feeds and to its index (bit flips, truncation,
//! zeroing, deletion), then a reopen, reads of every acknowledged entry, and a sync with a
//! healthy peer. Prints the outcome table; asserts, for every case, what must always hold.
//!
//! `MULTIFEED_CORRUPTION_CASES=<n>` runs more cases (default 60); `MULTIFEED_SEED` replays.

use std::collections::BTreeMap;
use std::path::Path;

use futures::StreamExt;
use multifeed::{Error, FeedKey, Multifeed, ReplicateOptions};
use multifeed_testkit::Seed;
use rand::Rng;

const WRITERS: usize = 3;
const REPLICAS: usize = 2;
const ENTRIES: u64 = 40;
/// Blocks from here on were written last (one batch of 7 and a part): their leaves may still be
/// only in hypercore's oplog.
const UNCHECKED_TAIL: u64 = 33;

fn entry(feed: usize, i: u64) -> Vec<u8> {
    // Varying sizes, so offsets into the data file differ between blocks.
    format!(
        "feed {feed} entry {i} {}",
        "x".repeat((i as usize * 7) % 50)
    )
    .into_bytes()
}

async fn sync(a: &Multifeed, b: &Multifeed) -> Result<(), Error> {
    let (left, right) = async_std::os::unix::net::UnixStream::pair().expect("socket pair");
    let quick = |initiator| {
        ReplicateOptions::new(initiator).timeouts(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(2),
        )
    };
    let (ra, rb) = futures::join!(
        a.replicate(left, quick(true)),
        b.replicate(right, quick(false))
    );
    ra?;
    rb?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// What one case did to one file.
fn damage(path: &Path, rng: &mut impl Rng) -> &'static str {
    let Ok(mut bytes) = std::fs::read(path) else {
        return "absent";
    };
    match rng.gen_range(0..4) {
        0 if !bytes.is_empty() => {
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] ^= 1 << rng.gen_range(0..8);
            }
            std::fs::write(path, bytes).expect("write");
            "bit flips"
        }
        1 if !bytes.is_empty() => {
            bytes.truncate(rng.gen_range(0..bytes.len()));
            std::fs::write(path, bytes).expect("write");
            "truncation"
        }
        2 if !bytes.is_empty() => {
            let start = rng.gen_range(0..bytes.len());
            let end = rng.gen_range(start..=bytes.len().min(start + 64));
            bytes[start..end].fill(0);
            std::fs::write(path, bytes).expect("write");
            "zeroing"
        }
        _ => {
            std::fs::remove_file(path).expect("delete");
            "deletion"
        }
    }
}

#[derive(Default)]
struct Tally {
    cases: BTreeMap<(String, &'static str), BTreeMap<&'static str, u32>>,
}

impl Tally {
    fn add(&mut self, file: &str, kind: &'static str, outcome: &'static str) {
        *self
            .cases
            .entry((file.to_owned(), kind))
            .or_default()
            .entry(outcome)
            .or_default() += 1;
    }
}

#[test]
fn damaged_files_never_give_wrong_bytes_or_silent_gaps_and_a_peer_restores_them() {
    let cases: u64 = std::env::var("MULTIFEED_CORRUPTION_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = Seed::from_env_or_random();
    let mut rng = seed.rng(0);
    let base = tempfile::tempdir().expect("dir");
    let mut tally = Tally::default();
    async_std::task::block_on(async {
        // The peer holds its own two feeds (our replicas) and, after one sync, copies of ours.
        let peer = Multifeed::open_memory().await.expect("peer");
        let mut expected: Vec<(FeedKey, bool, Vec<Vec<u8>>)> = Vec::new();
        for r in 0..REPLICAS {
            let feed = peer.writer(&format!("p{r}")).await.expect("writer");
            let entries: Vec<_> = (0..ENTRIES).map(|i| entry(100 + r, i)).collect();
            feed.append_batch(&entries).await.expect("append");
            expected.push((*feed.key(), false, entries));
        }
        let store = Multifeed::open_disk(base.path()).await.expect("store");
        for w in 0..WRITERS {
            let feed = store.writer(&format!("w{w}")).await.expect("writer");
            let entries: Vec<_> = (0..ENTRIES).map(|i| entry(w, i)).collect();
            for chunk in entries.chunks(7) {
                feed.append_batch(chunk).await.expect("append");
            }
            expected.push((*feed.key(), true, entries));
        }
        sync(&store, &peer).await.expect("the first sync");
        store.close().await.expect("close");

        for case in 0..cases {
            let dir = tempfile::tempdir().expect("dir");
            copy_dir(base.path(), dir.path()).expect("copy");
            let (target, file) = if rng.gen_bool(0.15) {
                (None, "index".to_owned())
            } else {
                let feed = rng.gen_range(0..expected.len());
                let file = ["tree", "data", "bitfield", "oplog"][rng.gen_range(0..4)];
                (Some(feed), file.to_owned())
            };
            let path = match target {
                None => dir.path().join("index"),
                Some(feed) => {
                    let hex = hex::encode(expected[feed].0);
                    dir.path()
                        .join("feeds")
                        .join(&hex[..2])
                        .join(&hex)
                        .join(&file)
                }
            };
            let kind = damage(&path, &mut rng);
            let label = match target {
                Some(feed) if expected[feed].1 => format!("local {file}"),
                Some(_) => format!("replica {file}"),
                None => file.clone(),
            };
            let outcome = check_case(dir.path(), &peer, &expected, target, case).await;
            tally.add(&label, kind, outcome);
        }
    });
    println!("| file | damage | outcomes |");
    println!("|---|---|---|");
    for ((file, kind), outcomes) in &tally.cases {
        let list: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o}: {n}")).collect();
        println!("| {file} | {kind} | {} |", list.join(", "));
    }
}

/// Reopens a damaged copy, reads every acknowledged entry, syncs with the healthy peer and
/// reads again. Panics on what must never happen (wrong bytes as valid, an undamaged feed
/// touched); returns the outcome, a `hidden` one when an acknowledged entry of a local writer
/// was missing without an error.
async fn check_case(
    dir: &Path,
    peer: &Multifeed,
    expected: &[(FeedKey, bool, Vec<Vec<u8>>)],
    target: Option<usize>,
    case: u64,
) -> &'static str {
    let store = match Multifeed::open_disk(dir).await {
        Ok(store) => store,
        Err(_) => return "open refused (typed error)",
    };
    let mut events = store.events();
    let mut reported = !store.index_recovery().is_clean();
    let mut hidden = false;
    let mut unchecked = false;
    for (n, (key, local, entries)) in expected.iter().enumerate() {
        let damaged = target == Some(n) || target.is_none();
        let Some(feed) = store.feed(key).expect("key") else {
            assert!(damaged, "case {case}: an undamaged feed disappeared");
            hidden |= *local;
            continue;
        };
        for (i, want) in entries.iter().enumerate() {
            match feed.get(i as u64).await {
                // The last blocks written have their leaves in hypercore's oplog or memory until
                // it next writes its tree; when the block's sibling or tree node is damaged too,
                // nothing readable is left to judge it by (counted, not failed; see the README).
                Ok(Some(got)) if got != *want && i as u64 >= UNCHECKED_TAIL => unchecked = true,
                Ok(Some(got)) => assert_eq!(&got, want, "case {case}: wrong bytes as valid"),
                Ok(None) => {
                    assert!(damaged, "case {case}: an undamaged feed lost entry {i}");
                    hidden |= *local;
                }
                Err(_) => {
                    assert!(damaged, "case {case}: an undamaged feed fails to read");
                    reported = true;
                }
            }
        }
    }
    // A feed started again under its key is reported by an event (its old length may be
    // unknown: a lost oplog held it).
    while let Some(Some(event)) = futures::FutureExt::now_or_never(events.next()) {
        reported |= matches!(
            event,
            multifeed::Event::FeedRestored { .. } | multifeed::Event::FeedReset { .. }
        );
        hidden &= !reported;
    }
    if unchecked {
        let _ = store.close().await;
        return "wrong bytes in the unchecked tail";
    }
    let synced = sync(&store, peer).await.is_ok();
    let mut restored = true;
    for (key, _, entries) in expected {
        let Some(feed) = store.feed(key).expect("key") else {
            restored = false;
            continue;
        };
        for (i, want) in entries.iter().enumerate() {
            match feed.get(i as u64).await {
                Ok(Some(got)) => assert_eq!(&got, want, "case {case}: wrong bytes after sync"),
                _ => restored = false,
            }
        }
    }
    let _ = store.close().await;
    match (restored, hidden, reported, synced) {
        (true, false, false, _) => "intact",
        (true, false, true, _) => "reported, restored by the sync",
        (true, true, _, _) => "hidden, restored by the sync",
        (false, true, _, _) => "hidden, not restored",
        (false, false, _, true) => "reported, not restored (sync ok)",
        (false, false, _, false) => "reported, not restored (sync failed)",
    }
}
