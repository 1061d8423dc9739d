//! The `multifeed` binary, run as a user would: several processes, one store each, on
//! 127.0.0.1. Every wait is bounded and says what it waited for.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_multifeed");

fn multifeed(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env_remove("MULTIFEED_KEY")
        .env_remove("MULTIFEED_DIR");
    command
}

/// Runs to its end, waiting at most 60 s (the commands here end within seconds).
fn run(mut command: Command) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawned");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the command did not end within 60 s: {command:?}"))
        .expect("output")
}

fn ok(command: Command) -> String {
    let out = run(command);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `feeds --json` as (key, length) pairs, sorted.
fn feeds(dir: &Path) -> Vec<(String, u64)> {
    let mut feeds: Vec<(String, u64)> = ok(multifeed(dir, &["--json", "feeds"]))
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("json");
            (
                value["key"].as_str().expect("key").to_owned(),
                value["length"].as_u64().expect("length"),
            )
        })
        .collect();
    feeds.sort();
    feeds
}

/// The first line a process prints, waiting at most 60 s (read on a thread: the wait is
/// bounded even if the process prints nothing).
fn first_line(stdout: impl std::io::Read + Send + 'static, what: &str) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("printed {what} within 60 s"))
}

/// A `share` process and the address (TCP) or ticket (`--iroh`) it printed.
struct Sharing {
    child: Child,
    addr: String,
}

impl Sharing {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[], Stdio::null())
    }

    fn start_with(dir: &Path, args: &[&str], stdin: Stdio) -> Self {
        let mut child = multifeed(dir, &[&["--json", "share"], args].concat())
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("share started");
        let stdout = child.stdout.take().expect("stdout");
        let line = first_line(stdout, "share's address");
        let value: serde_json::Value = serde_json::from_str(&line).expect("json");
        let addr = value["addr"]
            .as_str()
            .or_else(|| value["ticket"].as_str())
            .expect("an address or a ticket")
            .to_owned();
        Self { child, addr }
    }
}

impl Drop for Sharing {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Alice's and Bob's stores in one temporary directory (kept while the test runs), Alice's with
/// the entry "hello" in her writer `notes`.
fn two_stores() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("dir");
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    ok(multifeed(&a, &["init"]));
    ok(multifeed(&b, &["init"]));
    ok(multifeed(&a, &["append", "notes", "hello"]));
    (dir, a, b)
}

#[test]
fn share_and_sync_give_both_stores_the_union() {
    let (_dir, a, b) = two_stores();
    let mut lines = multifeed(&a, &["append", "notes"]);
    lines.stdin(Stdio::piped());
    let mut child = lines
        .stdout(Stdio::null())
        .spawn()
        .expect("append from stdin");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"two\nthree\n")
        .expect("written");
    assert!(child.wait().expect("appended").success());
    ok(multifeed(&b, &["append", "todo", "milk"]));

    let sharing = Sharing::start(&a);
    let synced = ok(multifeed(
        &b,
        &["--json", "sync", "--connect", &sharing.addr],
    ));
    let event = last_event(&synced);
    assert_eq!(event["event"], "synced");
    assert_eq!(event["blocks_received"], 3);
    // The share process holds its store: stop it before reading the store.
    drop(sharing);
    let union = feeds(&b);
    assert_eq!(union.len(), 2);
    assert_eq!(feeds(&a), union, "both hold the union");
    assert!(union.iter().any(|(_, length)| *length == 3));
    let notes = ok(multifeed(&b, &["cat", &union_key(&a, "notes")]));
    assert_eq!(notes, "hello\ntwo\nthree\n");
}

#[test]
fn share_over_iroh_and_sync_by_ticket_give_both_stores_the_union() {
    let (_dir, a, b) = two_stores();
    ok(multifeed(&b, &["append", "todo", "milk"]));
    // Relays and address lookup off, bound to loopback: nothing leaves the machine.
    let local = ["--iroh", "--no-relay", "--listen", "127.0.0.1:0"];
    let sharing = Sharing::start_with(&a, &local, Stdio::null());
    assert!(sharing.addr.starts_with("endpoint"), "{}", sharing.addr);
    let synced = ok(multifeed(
        &b,
        &[
            "--json",
            "sync",
            "--ticket",
            &sharing.addr,
            "--no-relay",
            "--bind",
            "127.0.0.1:0",
        ],
    ));
    let event = last_event(&synced);
    assert_eq!(event["event"], "synced");
    assert_eq!(event["blocks_received"], 1);
    assert_eq!(event["blocks_sent"], 1);
    drop(sharing);
    let union = feeds(&b);
    assert_eq!(union.len(), 2);
    assert_eq!(feeds(&a), union, "both hold the union");
    let notes = ok(multifeed(&b, &["cat", &union_key(&a, "notes")]));
    assert_eq!(notes, "hello\n");
}

/// The last of the JSON lines a `--json` sync printed (the result; progress events before it).
fn last_event(out: &str) -> serde_json::Value {
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is one JSON object"))
        .collect();
    let (last, before) = events.split_last().expect("a result line");
    assert!(
        before.iter().all(|e| e["event"] == "progress"),
        "{events:?}"
    );
    last.clone()
}

/// The key of a local writer, from `feeds --json`.
fn union_key(dir: &Path, name: &str) -> String {
    ok(multifeed(dir, &["--json", "feeds"]))
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("json"))
        .find(|value| value["name"] == name)
        .and_then(|value| value["key"].as_str().map(str::to_owned))
        .expect("the writer's key")
}

#[test]
fn a_wrong_shared_key_fails_on_the_syncing_side_and_leaves_both_stores_as_they_were() {
    let (a, b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    ok(multifeed(a.path(), &["init"]));
    ok(multifeed(b.path(), &["init"]));
    ok(multifeed(a.path(), &["append", "w", "secret"]));
    let sharing = Sharing::start(a.path());
    let mut sync = multifeed(b.path(), &["sync", "--connect", &sharing.addr]);
    sync.env("MULTIFEED_KEY", "11".repeat(32));
    let out = run(sync);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ERR_KEY_MISMATCH"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    drop(sharing);
    assert!(feeds(b.path()).is_empty(), "nothing written");
}

#[test]
fn bad_input_is_one_clear_line_with_its_code_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("nowhere");
    // A missing store: not created by a typo.
    let out = run(multifeed(&missing, &["feeds"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERR_NO_STORE"));
    assert!(!missing.exists(), "nothing created");
    // A shared key that is not hex.
    let store = dir.path().join("store");
    ok(multifeed(&store, &["init"]));
    let mut bad_key = multifeed(&store, &["info"]);
    bad_key.env("MULTIFEED_KEY", "not-hex");
    let out = run(bad_key);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERR_BAD_KEY"));
    // A feed that is not there.
    let out = run(multifeed(&store, &["cat", "nobody"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERR_NO_FEED"));
    // A dead address: nothing listens on the port of a listener we closed.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
        listener.local_addr().expect("addr").to_string()
    };
    let out = run(multifeed(&store, &["sync", "--connect", &dead]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ERR_IO") && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(feeds(&store).is_empty());
    // A usage error is an error (1), not a timeout (2).
    let out = run(multifeed(&store, &["sync"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERR_USAGE"));
    let out = run(multifeed(
        &store,
        &["sync", "--connect", &dead, "--ticket", "x"],
    ));
    assert_eq!(out.status.code(), Some(1));
    // A ticket that is not one.
    let out = run(multifeed(
        &store,
        &["sync", "--ticket", "endpointnotaticket"],
    ));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ERR_BAD_TICKET") && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(feeds(&store).is_empty());
}

#[test]
fn a_peer_that_never_answers_ends_with_exit_code_2_after_the_timeout() {
    let dir = tempfile::tempdir().expect("dir");
    ok(multifeed(dir.path(), &["init"]));
    // Accepts the connection and says nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
    let addr = listener.local_addr().expect("addr").to_string();
    let silent = std::thread::spawn(move || listener.accept().map(|(socket, _)| socket));
    let started = Instant::now();
    let out = run(multifeed(
        dir.path(),
        &["sync", "--connect", &addr, "--timeout", "1"],
    ));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERR_TIMEOUT"));
    assert!(started.elapsed() < Duration::from_secs(20));
    drop(silent.join());
}

#[test]
fn cat_live_prints_what_a_sharing_process_appends_as_it_is_typed() {
    use std::io::Write;
    let (a, b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    ok(multifeed(a.path(), &["init"]));
    ok(multifeed(b.path(), &["init"]));
    ok(multifeed(a.path(), &["append", "chat", "first"]));
    let key = union_key(a.path(), "chat");
    let mut sharing = Sharing::start_with(a.path(), &["--append", "chat"], Stdio::piped());
    let mut typing = sharing.child.stdin.take().expect("stdin");
    let mut cat = multifeed(
        b.path(),
        &["cat", &key, "--live", "--connect", &sharing.addr],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("cat started");
    let stderr = cat.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    let stdout = cat.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| what.to_owned())
    };
    let seen = next("the entry already there").and_then(|first| {
        typing.write_all(b"typed later\n").expect("typed");
        typing.flush().expect("flushed");
        Ok((first, next("the entry typed in the other process")?))
    });
    let _ = cat.kill();
    let _ = cat.wait();
    let errors = errors.join().unwrap_or_default();
    match seen {
        Ok((first, later)) => {
            assert_eq!(first, "first");
            assert_eq!(later, "typed later");
        }
        Err(what) => panic!("cat did not print {what} within 30 s; its stderr: {errors}"),
    }
    drop(typing);
}

/// The JS interop peer (`interop/js`), its packages installed on first use.
fn js_peer(args: &[&str]) -> Child {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/js");
    if !dir.join("node_modules/hypercore").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm is needed for the JS interop test");
        assert!(status.success(), "npm ci in interop/js");
    }
    Command::new("node")
        .arg(dir.join("peer.js"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node is needed for the JS interop test")
}

#[test]
fn sync_hypercore_fetches_a_feed_from_a_plain_js_hypercore() {
    let mut js = js_peer(&["serve", "25"]);
    let line = first_line(
        js.stdout.take().expect("stdout"),
        "the JS peer's key and port",
    );
    let served: serde_json::Value = serde_json::from_str(&line).expect("json");
    let key = served["key"].as_str().expect("key").to_owned();
    let addr = format!("127.0.0.1:{}", served["port"]);
    let dir = tempfile::tempdir().expect("dir");
    ok(multifeed(dir.path(), &["init"]));
    let synced = ok(multifeed(
        dir.path(),
        &["--json", "sync", "--connect", &addr, "--hypercore", &key],
    ));
    let event = last_event(&synced);
    assert_eq!(event["blocks_received"], 25, "{event}");
    assert_eq!(feeds(dir.path()), vec![(key.clone(), 25)]);
    let last = ok(multifeed(dir.path(), &["cat", &key, "--start", "24"]));
    assert_eq!(last, "js entry 24\n");
    // Closing its stdin ends the JS peer.
    drop(js.stdin.take());
    let _ = js.wait();
}

#[test]
fn a_sync_killed_midway_completes_when_run_again() {
    use std::io::Write;
    let (a, b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    ok(multifeed(a.path(), &["init"]));
    ok(multifeed(b.path(), &["init"]));
    let mut append = multifeed(a.path(), &["append", "log"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("append started");
    let lines: String = (0..20_000).map(|i| format!("entry {i}\n")).collect();
    append
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("written");
    assert!(append.wait().expect("appended").success());
    let sharing = Sharing::start(a.path());
    // Killed once it reported its first progress: part of the feed is stored.
    let mut first = multifeed(b.path(), &["--json", "sync", "--connect", &sharing.addr])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sync started");
    let progress = first_line(
        first.stdout.take().expect("stdout"),
        "a first progress event",
    );
    let _ = first.kill();
    let _ = first.wait();
    let event: serde_json::Value = serde_json::from_str(&progress).expect("json");
    assert_eq!(event["event"], "progress", "{progress}");
    let held: Vec<serde_json::Value> = ok(multifeed(b.path(), &["--json", "feeds"]))
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    let contiguous = held
        .first()
        .map_or(0, |feed| feed["contiguous_length"].as_u64().unwrap_or(0));
    assert!(
        contiguous < 20_000,
        "the first sync was cut short ({contiguous} entries held)"
    );
    // Run again: it completes.
    let synced = last_event(&ok(multifeed(
        b.path(),
        &["--json", "sync", "--connect", &sharing.addr],
    )));
    assert_eq!(synced["event"], "synced");
    drop(sharing);
    let key = union_key(a.path(), "log");
    assert_eq!(feeds(b.path()), vec![(key.clone(), 20_000)]);
    let last = ok(multifeed(b.path(), &["cat", &key, "--start", "19999"]));
    assert_eq!(last, "entry 19999\n");
}

#[test]
fn a_writer_exported_from_one_store_and_imported_into_another_writes_the_same_feed() {
    use std::io::Write;
    let (a, b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    ok(multifeed(a.path(), &["init"]));
    ok(multifeed(b.path(), &["init"]));
    ok(multifeed(a.path(), &["append", "me", "from a"]));
    let secret_file = a.path().join("me.key");
    ok(multifeed(
        a.path(),
        &[
            "keys",
            "export",
            "me",
            "--out",
            secret_file.to_str().expect("utf-8"),
        ],
    ));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file)
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only its owner reads the secret");
    }
    // Imported from stdin: the same key, writable there.
    let mut import = multifeed(b.path(), &["--json", "keys", "import", "me"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("import started");
    let secret = std::fs::read(&secret_file).expect("secret");
    import
        .stdin
        .take()
        .expect("stdin")
        .write_all(&secret)
        .expect("written");
    let out = import.wait_with_output().expect("imported");
    assert!(out.status.success());
    let key = union_key(a.path(), "me");
    let imported: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(imported["key"], key.as_str());
    ok(multifeed(b.path(), &["append", "me", "from b"]));
    assert_eq!(union_key(b.path(), "me"), key);
    // A feed that is not a writer here has no secret to export; a bad secret is refused.
    let out = run(multifeed(a.path(), &["keys", "export", "nobody"]));
    assert_eq!(out.status.code(), Some(1));
    let mut bad = multifeed(b.path(), &["keys", "import", "other"]);
    bad.stdin(Stdio::piped());
    let mut child = bad
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawned");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"zz\n")
        .expect("written");
    let out = child.wait_with_output().expect("ended");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERR_BAD_KEY"));
}
