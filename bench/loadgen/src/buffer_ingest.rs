//! buffer-ingest: how fast readings become durable in the store-and-forward
//! buffer, against the disk's own limit measured in the same run.
//!
//! Two phases over the same rows (100 topics, a 110-byte JSON reading):
//! 1. bare: batched INSERTs into a plain SQLite table in WAL mode with
//!    synchronous=FULL, one transaction per 100 ms worth of rows, as fast
//!    as SQLite and the disk allow: the ceiling for any SQLite buffer;
//! 2. buffer: the real `Buffer` (its writer thread, group commit every
//!    commit interval), fed by one producer thread as fast as it commits.
//!
//! Reports rows/s for each, their ratio, commits (fsync groups) per second,
//! and bytes written to disk per reading (/proc/self/io write_bytes).
//! Usage: buffer-ingest [--seconds N] [--commit-ms N] [--dir DIR]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_engine::buffer::{Buffer, BufferSettings, Offer, Route, WhenFull};
use mqtt_engine::{TopicFilter, TopicName};

fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("write_bytes: ").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

fn reading(i: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"node\":\"meter-{:02}\",\"ts\":\"2026-11-24T10:15:00.123Z\",\"attributes\":{{\"voltage\":{}.{},\"power\":{}}},\"units\":{{\"voltage\":\"V\"}}}}",
        i % 100,
        220 + i % 20,
        i % 10,
        i % 5000
    ))
}

fn bare(dir: &Path, seconds: f64, commit: Duration) -> rusqlite::Result<(f64, f64)> {
    let path = dir.join("bare.db");
    let _ = std::fs::remove_file(&path);
    let mut conn = rusqlite::Connection::open(&path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE rows (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL)",
    )?;
    let topics: Vec<String> = (0..100).map(|i| format!("fieldmq/pi-01/meter-{i:02}")).collect();
    let payloads: Vec<Bytes> = (0..1000).map(reading).collect();
    let start = Instant::now();
    let before = written_bytes();
    let mut rows = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let batch_start = Instant::now();
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached("INSERT INTO rows (topic, payload) VALUES (?1, ?2)")?;
            // As many rows as fit in one commit interval.
            while batch_start.elapsed() < commit {
                for _ in 0..256 {
                    insert.execute(rusqlite::params![
                        topics[(rows % 100) as usize],
                        &payloads[(rows % 1000) as usize][..]
                    ])?;
                    rows += 1;
                }
            }
        }
        tx.commit()?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = (written_bytes() - before) as f64 / rows as f64;
    Ok((rows as f64 / elapsed, bytes))
}

fn buffered(dir: &Path, seconds: f64, commit: Duration) -> (f64, f64, u64) {
    let path = dir.join("buffer.db");
    for side in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", path.display()));
    }
    let settings =
        BufferSettings { path, max_size: 16 << 30, when_full: WhenFull::DropOldest, commit_interval: commit };
    let route = Route { name: "cloud".into(), forward: vec![TopicFilter::new("fieldmq/#").expect("filter")] };
    let buffer = match Buffer::open(settings, &[route]) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot open the buffer: {e}");
            std::process::exit(1);
        }
    };
    let topics: Vec<TopicName> =
        (0..100).map(|i| TopicName::new(format!("fieldmq/pi-01/meter-{i:02}")).expect("topic")).collect();
    let payloads: Vec<Bytes> = (0..1000).map(reading).collect();
    let committed = buffer.committed();
    let start = Instant::now();
    let before = written_bytes();
    let mut offered = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        // Keep at most ~two commits' worth waiting: durable rate, not
        // channel rate.
        if offered - *committed.borrow() > 200_000 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for _ in 0..256 {
            match buffer.offer(&topics[(offered % 100) as usize], &payloads[(offered % 1000) as usize], false)
            {
                Offer::Taken(_) => offered += 1,
                other => {
                    eprintln!("offer refused: {other:?}");
                    std::process::exit(1);
                }
            }
        }
    }
    // Only what is durable counts: wait for the last commit.
    while *committed.borrow() < offered {
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = (written_bytes() - before) as f64 / offered as f64;
    let commits = buffer.commits();
    buffer.close();
    (offered as f64 / elapsed, bytes, commits)
}

fn main() {
    let mut seconds = 5.0;
    let mut commit_ms = 100u64;
    let mut dir = std::env::temp_dir().join(format!("buffer-ingest-{}", std::process::id()));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match arg.as_str() {
            "--seconds" => seconds = value.parse().unwrap_or(seconds),
            "--commit-ms" => commit_ms = value.parse().unwrap_or(commit_ms),
            "--dir" => dir = PathBuf::from(value),
            _ => {
                eprintln!("usage: buffer-ingest [--seconds N] [--commit-ms N] [--dir DIR]");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("{}: {e}", dir.display());
        std::process::exit(1);
    }
    let commit = Duration::from_millis(commit_ms);
    let (bare_rate, bare_bytes) = match bare(&dir, seconds, commit) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bare SQLite insert failed: {e}");
            std::process::exit(1);
        }
    };
    let started = Instant::now();
    let (rate, bytes, commits) = buffered(&dir, seconds, commit);
    let elapsed = started.elapsed().as_secs_f64();
    println!("commit_interval: {commit_ms} ms");
    println!("bare_sqlite_rows_per_s: {bare_rate:.0}");
    println!("bare_sqlite_bytes_per_row: {bare_bytes:.1}");
    println!("buffer_durable_rows_per_s: {rate:.0}");
    println!("buffer_vs_bare: {:.2}", rate / bare_rate);
    println!("buffer_commits_per_s: {:.1}", commits as f64 / elapsed);
    println!("buffer_bytes_written_per_row: {bytes:.1}");
    let _ = std::fs::remove_dir_all(&dir);
}
