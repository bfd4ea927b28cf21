//! `fieldmq buffer stats`: what waits for each upstream, for a person at a
//! terminal (a table) or a script (`--json`). It reads the buffer file
//! read-only, so it works while the gateway runs.

use std::path::PathBuf;
use std::process::ExitCode;

use mqtt_engine::buffer::stats::{self, BufferStats};

use crate::commands;

/// `buffer stats` options.
#[derive(clap::Args)]
pub struct StatsArgs {
    /// The config file (its data_dir holds the buffer).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn stats(args: StatsArgs) -> ExitCode {
    let config = match commands::load_or_report(args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let path = config.data_dir.join("buffer.db");
    match stats::read(&path) {
        Ok(figures) => {
            if args.json {
                println!("{}", to_json(&figures));
            } else {
                print_table(&figures, &path);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn when(ms: Option<i64>) -> Option<String> {
    ms.map(|ms| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
        )
        .to_string()
    })
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn to_json(figures: &BufferStats) -> String {
    let upstreams: Vec<String> = figures
        .upstreams
        .iter()
        .map(|u| {
            format!(
                "{{\"name\":{},\"waiting\":{},\"oldest_age_s\":{},\"dropped\":{},\"last_delivery\":{}}}",
                json_string(&u.name),
                u.waiting,
                u.oldest_age_s.map_or("null".into(), |a| format!("{a:.3}")),
                u.dropped,
                when(u.last_delivery_ms).map_or("null".into(), |w| json_string(&w)),
            )
        })
        .collect();
    format!("{{\"bytes\":{},\"upstreams\":[{}]}}", figures.bytes, upstreams.join(","))
}

fn print_table(figures: &BufferStats, path: &std::path::Path) {
    println!("{:<16} {:>10} {:>12} {:>10}  last delivery", "upstream", "waiting", "oldest", "dropped");
    for u in &figures.upstreams {
        println!(
            "{:<16} {:>10} {:>12} {:>10}  {}",
            u.name,
            u.waiting,
            u.oldest_age_s.map_or("-".into(), |a| format!("{a:.1}s")),
            u.dropped,
            when(u.last_delivery_ms).unwrap_or_else(|| "never".into()),
        );
    }
    println!(
        "{}: {:.1} KiB on disk (database and write-ahead log)",
        path.display(),
        figures.bytes as f64 / 1024.0
    );
}
