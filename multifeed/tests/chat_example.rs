//! The chat example (`examples/chat.rs`) run as two processes on 127.0.0.1: each prints the
//! other's messages as they arrive.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The example binary that `cargo test` builds next to this test.
fn chat_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir");
    debug.join("examples").join("chat")
}

struct Chatter {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Chatter {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(chat_binary())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the chat example (cargo test builds it; or cargo build --example chat)");
        let stdout = child.stdout.take().expect("stdout");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The first line that satisfies `wanted`, within 30 s.
    fn wait_for(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => continue,
                Err(_) => panic!("timed out after 30 s waiting for {what}"),
            }
        }
    }

    fn say(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{text}").expect("write a message");
        stdin.flush().expect("flush");
    }

    /// Ends input; the example closes and exits (waited for on a thread, bounded).
    fn leave(mut self) {
        drop(self.child.stdin.take());
        let mut child = self.child;
        let pid = child.id();
        let (send, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = send.send(child.wait());
        });
        match exited.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(status)) => assert!(status.success(), "the chat exited with {status}"),
            Ok(Err(err)) => panic!("waiting for the chat failed: {err}"),
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("the chat did not exit within 30 s of its input ending");
            }
        }
    }
}

#[test]
fn two_chat_processes_print_each_others_messages_as_they_arrive() {
    let mut alice = Chatter::start(&["listen", "127.0.0.1:0", "alice"]);
    let listening = alice.wait_for("alice to listen", |line| line.starts_with("listening on "));
    let addr = listening.trim_start_matches("listening on ").to_owned();
    let mut bob = Chatter::start(&["connect", &addr, "bob"]);
    bob.wait_for("bob to connect", |line| line.starts_with("connected"));
    alice.wait_for("alice to be connected", |line| {
        line.starts_with("connected")
    });
    bob.say("hello from bob");
    alice.wait_for("bob's message at alice", |line| {
        line == "bob: hello from bob"
    });
    alice.say("hi bob");
    alice.say("how are you?");
    bob.wait_for("alice's first message at bob", |line| {
        line == "alice: hi bob"
    });
    bob.wait_for("alice's second message at bob", |line| {
        line == "alice: how are you?"
    });
    bob.leave();
    alice.leave();
}
