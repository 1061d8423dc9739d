//! A small chat over TCP: each person writes their own feed; each prints the others' messages
//! as they arrive, from live read streams.
//!
//! In one terminal:   `cargo run --example chat -- listen 127.0.0.1:7000 alice`
//! In another:        `cargo run --example chat -- connect 127.0.0.1:7000 bob`
//!
//! Type lines and press enter; end with Ctrl-D. Both sides must share the key (here a fixed one;
//! a real app would share a secret out of band).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_std::io::BufReadExt;
use async_std::net::{TcpListener, TcpStream};
use futures::StreamExt;
use multifeed::{Event, Feed, Multifeed, ReadMode, ReplicateOptions, ValueEncoding};

const ROOM_KEY: [u8; 32] = *b"the multifeed chat example room!";

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, addr, name) = match args.as_slice() {
        [mode, addr, name] if mode == "listen" || mode == "connect" => (mode, addr, name),
        _ => {
            eprintln!("usage: chat listen|connect ADDR NAME");
            std::process::exit(2);
        }
    };
    let multi = Multifeed::builder()
        .value_encoding(ValueEncoding::Json)
        .open()
        .await?;
    let me = multi.writer("me").await?;

    // Print every other feed's messages as they arrive: the feeds there now, and each new one.
    let mut events = multi.events();
    let reading = Arc::new(Mutex::new(HashSet::from([*me.key()])));
    for feed in multi.feeds() {
        print_messages(feed, &reading);
    }
    {
        let (multi, reading) = (multi.clone(), reading.clone());
        async_std::task::spawn(async move {
            while let Some(event) = events.next().await {
                if let Event::Feed { key, .. } = event {
                    if let Ok(Some(feed)) = multi.feed(key) {
                        print_messages(feed, &reading);
                    }
                }
            }
        });
    }

    let stream = if mode == "listen" {
        let listener = TcpListener::bind(addr.as_str()).await?;
        println!("listening on {}", listener.local_addr()?);
        listener.accept().await?.0
    } else {
        TcpStream::connect(addr.as_str()).await?
    };
    println!("connected; type messages, Ctrl-D to leave");
    let options = ReplicateOptions::new(mode == "connect")
        .live(true)
        .encryption_key(ROOM_KEY);
    let replication = {
        let multi = multi.clone();
        async_std::task::spawn(async move { multi.replicate(stream, options).await })
    };

    let mut lines = async_std::io::BufReader::new(async_std::io::stdin()).lines();
    while let Some(line) = lines.next().await {
        let text = line?;
        me.append_json(&serde_json::json!({ "from": name, "text": text }))
            .await?;
    }
    // Closing ends the replication (it returns Error::Closed) and every live stream.
    multi.close().await?;
    let _ = replication.await;
    Ok(())
}

/// Prints `feed`'s messages as `from: text`, once per feed.
fn print_messages(feed: Feed, reading: &Arc<Mutex<HashSet<multifeed::FeedKey>>>) {
    if !reading.lock().unwrap().insert(*feed.key()) {
        return;
    }
    async_std::task::spawn(async move {
        let mut messages = feed.value_stream(0.., ReadMode::Live);
        while let Some(Ok((_, value))) = messages.next().await {
            if let Ok(message) = value.to_json::<serde_json::Value>() {
                println!(
                    "{}: {}",
                    message["from"].as_str().unwrap_or("?"),
                    message["text"].as_str().unwrap_or("")
                );
            }
        }
    });
}
