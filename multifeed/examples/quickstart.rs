//! Quickstart: two multifeeds, each with its own writers, replicate into the union of both.
//!
//! Run it with `cargo run --example quickstart`.

use multifeed::{Multifeed, ValueEncoding};

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Two peers, each keeping its feeds in memory (use `Multifeed::open_disk(dir)` for disk).
    let alice = Multifeed::builder()
        .value_encoding(ValueEncoding::Json)
        .open()
        .await?;
    let bob = Multifeed::builder()
        .value_encoding(ValueEncoding::Json)
        .open()
        .await?;

    // Each author writes to their own signed, append-only feed.
    let alice_notes = alice.writer("notes").await?;
    alice_notes
        .append_json(&serde_json::json!({ "from": "alice", "text": "hello bob" }))
        .await?;
    let bob_notes = bob.writer("notes").await?;
    bob_notes
        .append_json(&serde_json::json!({ "from": "bob", "text": "hi alice" }))
        .await?;
    bob_notes
        .append_json(&serde_json::json!({ "from": "bob", "text": "how are you?" }))
        .await?;

    println!("alice has {} feed(s), bob has {}", alice.feeds().len(), bob.feeds().len());
    for feed in alice.feeds() {
        println!("alice: {} ({:?}) len {}", feed.key_hex(), feed.name(), feed.len().await?);
    }

    alice.close().await?;
    bob.close().await?;
    Ok(())
}
