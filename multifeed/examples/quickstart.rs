//! Quickstart: two multifeeds, each with its own writers, replicate into the union of both.
//!
//! Run it with `cargo run --example quickstart`.

use multifeed::{Multifeed, ReplicateOptions, ValueEncoding};

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

    println!(
        "before: alice has {} feed(s), bob has {}",
        alice.feeds().len(),
        bob.feeds().len()
    );

    // Replicate over any AsyncRead + AsyncWrite: a TCP stream, a Unix socket, an in-memory pipe.
    // Both sides must use the same shared key; peers without it cannot read the feeds.
    let shared_key = *b"a shared key for alice and bob!!";
    let (left, right) = async_std::os::unix::net::UnixStream::pair()?;
    let (sent, received) = futures::join!(
        alice.replicate(left, ReplicateOptions::new(true).encryption_key(shared_key)),
        bob.replicate(
            right,
            ReplicateOptions::new(false).encryption_key(shared_key)
        ),
    );
    let (sent, received) = (sent?, received?);
    println!(
        "replicated: alice got {} block(s), bob got {}",
        sent.blocks_received, received.blocks_received
    );

    println!(
        "after: alice has {} feed(s), bob has {}",
        alice.feeds().len(),
        bob.feeds().len()
    );
    for feed in alice.feeds() {
        let who = if feed.is_writable() { "mine" } else { "bob's" };
        for index in 0..feed.len().await? {
            let entry: serde_json::Value = feed.get_json(index).await?.ok_or("entry missing")?;
            println!(
                "alice reads {who} feed {}.. #{index}: {entry}",
                &feed.key_hex()[..8]
            );
        }
    }

    alice.close().await?;
    bob.close().await?;
    Ok(())
}
