//! Runs the Rust workloads and the JavaScript baselines side by side, in one run, and prints
//! times, ratios and peak RSS.
//!
//! `cargo run --release -p multifeed-benches --bin compare -- [--disk] [WORKLOAD ...]`
//! `cargo run --release -p multifeed-benches --bin compare -- --appends` (10,000 single appends
//! and one 10,000-entry batch, on disk and in memory, against JS multifeed's `benches/js/appends.js`)
//!
//! Each measurement runs in its own child process (so its peak RSS is its own): the Rust side
//! re-invokes this binary with `--child`, the JS side runs `node bench.js` of
//! `../shared/baselines/js-multifeed` (installed with `npm install` on first use). In memory, the
//! JS figure is the better of its default and 4 KiB pages, as the baseline's README asks.

use std::path::PathBuf;
use std::process::Command;

use multifeed_benches::{check, peak_rss_mb, prepare, replicate, workload, StorageKind, WORKLOADS};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        return child(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("--child-appends") {
        return child_appends(&args[1..]);
    }
    if args.iter().any(|a| a == "--appends") {
        return appends();
    }
    let disk = args.iter().any(|a| a == "--disk");
    let names: Vec<String> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .collect();
    let selected: Vec<_> = if names.is_empty() {
        WORKLOADS.to_vec()
    } else {
        names.iter().filter_map(|n| workload(n)).collect()
    };
    let baseline = baseline_dir()?;
    let kind = if disk { "disk" } else { "memory" };
    // In memory, the same stack on hypercore's own 4 KiB-page storage runs too.
    let stock_header = if disk {
        ""
    } else {
        " stock 4 KiB ms | vs stock |"
    };
    println!("| workload | storage | rust ms | rust RSS MB | js ms | js RSS MB | js setting | speed-up | RSS ratio |{stock_header}");
    println!(
        "|---|---|---|---|---|---|---|---|---|{}",
        if disk { "" } else { "---|---|" }
    );
    for w in selected {
        let rust = run_rust(w.name, kind)?;
        let stock = if disk {
            String::new()
        } else {
            let stock = run_rust(w.name, "stock")?;
            format!(" {:.0} | {:.1}x |", stock.0, stock.0 / rust.0)
        };
        let js = if w.name == "feeds10000x1" {
            None
        } else if disk {
            run_js(&baseline, w.name, &[("MF_DISK", "1")])?.map(|r| (r, "disk"))
        } else {
            let default = run_js(&baseline, w.name, &[])?;
            let small = run_js(&baseline, w.name, &[("MF_RAM_PAGE", "4096")])?;
            match (default, small) {
                (Some(d), Some(s)) if s.0 < d.0 => Some((s, "4 KiB pages")),
                (Some(d), _) => Some((d, "1 MiB pages")),
                (None, Some(s)) => Some((s, "4 KiB pages")),
                (None, None) => None,
            }
        };
        match js {
            Some(((js_ms, js_rss), setting)) => println!(
                "| {} | {kind} | {:.0} | {:.0} | {:.0} | {:.0} | {setting} | {:.1}x | {:.2} |{stock}",
                w.name,
                rust.0,
                rust.1,
                js_ms,
                js_rss,
                js_ms / rust.0,
                rust.1 / js_rss
            ),
            None => println!(
                "| {} | {kind} | {:.0} | {:.0} | - | - | - | - | - |{stock}",
                w.name, rust.0, rust.1
            ),
        }
    }
    Ok(())
}

/// Measures one workload in this process and prints `ms rss_mb`.
fn child(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let name = args.first().ok_or("--child WORKLOAD [memory|disk]")?;
    let w = workload(name).ok_or("unknown workload")?;
    let kind = match args.get(1).map(String::as_str) {
        Some("disk") => StorageKind::Disk,
        Some("stock") => StorageKind::StockMemory,
        _ => StorageKind::Memory,
    };
    async_std::task::block_on(async {
        let prepared = prepare(w, kind).await?;
        if std::env::var_os("MULTIFEED_BENCH_PREPARE_ONLY").is_some() {
            println!("0 {}", peak_rss_mb());
            return Ok(());
        }
        let elapsed = replicate(&prepared).await?;
        check(&prepared, w).await?;
        println!("{} {}", elapsed.as_secs_f64() * 1e3, peak_rss_mb());
        Ok(())
    })
}

/// Times 10,000 appends (`single` or `batch`) to one writer; prints `ms rss_mb`.
fn child_appends(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let single = args.first().map(String::as_str) != Some("batch");
    let disk = args.get(1).map(String::as_str) == Some("disk");
    async_std::task::block_on(async {
        let dir = tempfile::tempdir()?;
        let builder =
            multifeed::Multifeed::builder().value_encoding(multifeed::ValueEncoding::Json);
        let multi = if disk {
            builder.disk(dir.path())
        } else {
            builder.memory()
        }
        .open()
        .await?;
        let feed = multi.writer("w").await?;
        let msg = "x".repeat(80);
        let entries: Vec<Vec<u8>> = (0..10_000)
            .map(|n| {
                serde_json::to_vec(&serde_json::json!({ "msg": msg, "n": n })).unwrap_or_default()
            })
            .collect();
        let started = std::time::Instant::now();
        if single {
            for entry in &entries {
                feed.append(entry).await?;
            }
        } else {
            feed.append_batch(&entries).await?;
        }
        let elapsed = started.elapsed();
        if feed.len().await? != 10_000 {
            return Err("not every entry was appended".into());
        }
        println!("{} {}", elapsed.as_secs_f64() * 1e3, peak_rss_mb());
        multi.close().await?;
        Ok(())
    })
}

/// Prints the appends table: Rust and JS, disk and memory, single and batch.
fn appends() -> Result<(), Box<dyn std::error::Error>> {
    let baseline = baseline_dir()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js/appends.js");
    println!("| appends | storage | rust ms | rust RSS MB | js ms | js RSS MB | speed-up |");
    println!("|---|---|---|---|---|---|---|");
    for mode in ["single", "batch"] {
        for storage in ["disk", "memory"] {
            let out = Command::new(std::env::current_exe()?)
                .args(["--child-appends", mode, storage])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let mut parts = text.split_whitespace().map(str::parse::<f64>);
            let (Some(Ok(ms)), Some(Ok(rss))) = (parts.next(), parts.next()) else {
                return Err(format!(
                    "rust appends failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            };
            let js = Command::new("node")
                .arg(&script)
                .args([mode, storage])
                .env("NODE_PATH", baseline.join("node_modules"))
                .output()?;
            let json: Option<serde_json::Value> = serde_json::from_slice(&js.stdout).ok();
            match json {
                Some(json) => {
                    let js_ms = json["ms"].as_f64().unwrap_or(f64::NAN);
                    let js_rss = json["rss_mb"].as_f64().unwrap_or(f64::NAN);
                    println!("| 10,000 {mode} | {storage} | {ms:.0} | {rss:.0} | {js_ms:.0} | {js_rss:.0} | {:.1}x |", js_ms / ms);
                }
                None => println!("| 10,000 {mode} | {storage} | {ms:.0} | {rss:.0} | - | - | - |"),
            }
        }
    }
    Ok(())
}

fn run_rust(name: &str, kind: &str) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--child", name, kind])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "rust {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace().map(str::parse::<f64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(ms)), Some(Ok(rss))) => Ok((ms, rss)),
        _ => Err(format!("rust {name}: unexpected output {text:?}").into()),
    }
}

fn baseline_dir() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("MULTIFEED_JS_BASELINE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/baselines/js-multifeed"));
    if !dir.join("node_modules").exists() {
        eprintln!("installing the JS baseline in {}", dir.display());
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()?;
        if !status.success() {
            return Err("npm install of the JS baseline failed".into());
        }
    }
    Ok(dir)
}

/// Runs `node bench.js WORKLOAD`; returns (ms, rss MB), or None if it failed.
fn run_js(
    dir: &PathBuf,
    name: &str,
    env: &[(&str, &str)],
) -> Result<Option<(f64, f64)>, Box<dyn std::error::Error>> {
    let out = Command::new("node")
        .arg("bench.js")
        .arg(name)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        eprintln!(
            "js {name} {env:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(line.trim())?;
    Ok(Some((
        json["ms"].as_f64().unwrap_or(f64::NAN),
        json["rss_mb"].as_f64().unwrap_or(f64::NAN),
    )))
}
