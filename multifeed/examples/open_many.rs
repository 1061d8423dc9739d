//! Measures how long a disk root with many feeds takes to open.
//!
//! `cargo run --release --example open_many -- [FEEDS=10000]`: creates FEEDS writers with one
//! entry each in a temporary directory, closes, then times reopening the root, listing the feeds,
//! and reading one entry of every feed.

use std::time::Instant;

use multifeed::Multifeed;

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(10_000);
    let dir = tempfile::tempdir()?;

    let started = Instant::now();
    let multi = Multifeed::open_disk(dir.path()).await?;
    for i in 0..count {
        multi
            .writer(&format!("w{i}"))
            .await?
            .append(format!("entry of w{i}").as_bytes())
            .await?;
    }
    multi.close().await?;
    println!(
        "created {count} feeds with one entry each in {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let multi = Multifeed::open_disk(dir.path()).await?;
    let feeds = multi.feeds();
    let opened = started.elapsed();
    println!(
        "reopened the root and listed {} feeds in {opened:?}",
        feeds.len()
    );

    let started = Instant::now();
    let first = feeds.first().ok_or("no feeds")?;
    let entry = first.get(0).await?;
    println!(
        "opened one feed and read its entry in {:?} ({:?})",
        started.elapsed(),
        entry.map(String::from_utf8)
    );

    let started = Instant::now();
    for feed in &feeds {
        feed.get(0).await?;
    }
    println!(
        "opened every feed and read its entry in {:?}",
        started.elapsed()
    );
    multi.close().await?;
    Ok(())
}
