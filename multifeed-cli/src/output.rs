//! What the tool prints: a line for people, or one JSON object per line with `--json`.

use std::io::Write;

/// Where results and errors go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    json: bool,
    /// Results are not printed (errors still are).
    quiet: bool,
}

impl Output {
    pub(crate) fn new(json: bool) -> Self {
        Self { json, quiet: false }
    }

    /// Whether results are JSON lines.
    pub(crate) fn is_json(&self) -> bool {
        self.json
    }

    /// Prints errors only.
    pub(crate) fn quiet() -> Self {
        Self {
            json: false,
            quiet: true,
        }
    }

    /// One result: `text` for people, `value` with `--json`; flushed at once (a peer or a
    /// script may be waiting for it).
    pub(crate) fn line(&self, text: &str, value: serde_json::Value) {
        if self.quiet {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        let _ = if self.json {
            writeln!(stdout, "{value}")
        } else {
            writeln!(stdout, "{text}")
        };
        let _ = stdout.flush();
    }

    /// The error that ends the command: one line on stderr with its code (and, with `--json`,
    /// as a JSON object on stdout too).
    pub(crate) fn error(&self, message: &str, code: &str) {
        if self.json {
            self.line(
                "",
                serde_json::json!({ "event": "error", "code": code, "message": message }),
            );
        }
        eprintln!("error: {message} [{code}]");
    }
}
