//! Logs go to stderr, where journald picks them up under systemd.
//!
//! The level comes from `RUST_LOG` when set, else from `[gateway] log`, else
//! `info`. Filters use `tracing_subscriber`'s `Targets` syntax
//! (`info`, `adapters=debug,info`; the targets are the crates `fieldmq`,
//! `adapters` and `mqtt_engine`), which needs no regex engine and keeps
//! the binary small. Under journald (JOURNAL_STREAM set) timestamps are left
//! out: the journal adds its own.

use std::str::FromStr;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::time::SystemTime;
use tracing_subscriber::prelude::*;

use crate::config::is_log_filter;

/// Installs the global subscriber; `config_level` is `[gateway] log`.
pub fn init(config_level: Option<&str>) {
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    let parsed = from_env.as_deref().filter(|f| is_log_filter(f)).and_then(|f| Targets::from_str(f).ok());
    let (filter, bad_env) = match (parsed, from_env) {
        (Some(targets), _) => (targets, None),
        (None, bad) => (default_filter(config_level), bad),
    };
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    let fmt = fmt.with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    if under_journald {
        registry.with(fmt.without_time()).init();
    } else {
        registry.with(fmt.with_timer(SystemTime)).init();
    }
    if let Some(bad) = bad_env {
        tracing::warn!(rust_log = %bad, "RUST_LOG is not a valid filter; using the config's level");
    }
}

fn default_filter(config_level: Option<&str>) -> Targets {
    config_level
        .and_then(|level| Targets::from_str(level).ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO))
}
