//! Interop with a real JavaScript Hypercore 10 peer (npm `hypercore@10.38.2`), over TCP on
//! 127.0.0.1: it downloads a feed of ours by key, and we download one of its feeds.
//!
//! Needs Node.js; the JS dependencies are installed with `npm ci` in `interop/js` on first use.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use multifeed::{Multifeed, ReplicateOptions};

const BOUND: Duration = Duration::from_secs(60);
const ENTRIES: u64 = 300;

fn peer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../interop/js")
}

fn install_js_peer() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if peer_dir().join("node_modules/hypercore").exists() {
            return;
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(peer_dir())
            .status()
            .expect("npm is needed for the JS interop tests (install Node.js)");
        assert!(status.success(), "npm ci in interop/js failed");
    });
}

fn node(args: &[&str]) -> Child {
    install_js_peer();
    Command::new("node")
        .arg("peer.js")
        .args(args)
        .current_dir(peer_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node is needed for the JS interop tests")
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    async_std::future::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {BOUND:?} waiting for {what}"))
}

#[async_std::test]
async fn we_download_a_feed_from_a_js_hypercore() {
    let mut js = node(&["serve", &ENTRIES.to_string()]);
    let mut line = String::new();
    BufReader::new(js.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the JS peer prints its key and port");
    let info: serde_json::Value = serde_json::from_str(&line).expect("JSON from the JS peer");
    let key = hex::decode(info["key"].as_str().expect("key")).expect("hex key");
    let key: [u8; 32] = key.try_into().expect("32-byte key");
    let port = info["port"].as_u64().expect("port");

    let multi = Multifeed::open_memory().await.expect("open");
    let stream = async_std::net::TcpStream::connect(("127.0.0.1", port as u16))
        .await
        .expect("connect to the JS peer");
    stream.set_nodelay(true).expect("nodelay");
    let summary = within(
        "downloading the JS feed",
        multi.replicate(
            stream,
            ReplicateOptions::new(true).hypercore_peer(vec![key]),
        ),
    )
    .await
    .expect("replication with the JS peer");
    assert_eq!(summary.blocks_received, ENTRIES);
    assert_eq!(
        summary.feeds_received, 1,
        "plain mode counts the feed it fetched"
    );

    let feed = multi
        .feed(key)
        .expect("valid key")
        .expect("the JS feed was added");
    assert!(!feed.is_writable());
    assert_eq!(feed.len().await.expect("len"), ENTRIES);
    for i in 0..ENTRIES {
        let entry = feed.get(i).await.expect("get").expect("entry stored");
        assert_eq!(entry, format!("js entry {i}").into_bytes());
    }
    if let Some(stdin) = js.stdin.as_mut() {
        let _ = stdin.write_all(b"\n");
    }
    drop(js.stdin.take());
    let _ = js.kill();
    let _ = js.wait();
}

#[async_std::test]
async fn a_js_hypercore_downloads_a_feed_from_us() {
    let multi = Multifeed::open_memory().await.expect("open");
    let feed = multi.writer("shared").await.expect("writer");
    // Entries of varied sizes, one over 64 KiB.
    let entries: Vec<Vec<u8>> = (0..ENTRIES)
        .map(|i| {
            let size = if i == 7 {
                100_000
            } else {
                (i as usize % 50) * 7
            };
            format!("rust entry {i} {}", "y".repeat(size)).into_bytes()
        })
        .collect();
    feed.append_batch(&entries).await.expect("append");

    let listener = async_std::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let port = listener.local_addr().expect("addr").port();
    let js = node(&[
        "fetch",
        &feed.key_hex(),
        &port.to_string(),
        &ENTRIES.to_string(),
    ]);
    let (stream, _) = within("the JS peer to connect", listener.accept())
        .await
        .expect("accept");
    stream.set_nodelay(true).expect("nodelay");
    let summary = within(
        "serving the JS peer",
        multi.replicate(
            stream,
            ReplicateOptions::new(false).hypercore_peer(Vec::new()),
        ),
    )
    .await
    .expect("serving the JS peer ends cleanly when it disconnects");
    let output = js.wait_with_output().expect("JS peer output");
    assert!(
        output.status.success(),
        "JS peer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("JSON result from the JS peer");
    assert_eq!(result["length"].as_u64(), Some(ENTRIES));
    let got = result["entries"].as_array().expect("entries");
    assert_eq!(got.len() as u64, ENTRIES);
    for (i, entry) in got.iter().enumerate() {
        assert_eq!(
            entry.as_str().map(str::as_bytes),
            Some(entries[i].as_slice()),
            "entry {i}"
        );
    }
    assert!(summary.blocks_sent >= ENTRIES);
}
