//! The broker's snapshot on disk: `data_dir/broker.state`.
//!
//! Restored at start; saved every [`AUTOSAVE`] when something changed, and
//! at shutdown. Each save is a temp file, fsync, rename and a directory
//! fsync, so the file on disk is always a whole snapshot, old or new. A file
//! that cannot be read as a snapshot is moved aside, with a log line saying
//! where, and never overwritten.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqtt_engine::Broker;
use tokio_util::sync::CancellationToken;

/// How often the snapshot is saved when the broker state changed.
pub const AUTOSAVE: Duration = Duration::from_secs(5);

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("broker.state")
}

/// Restores the snapshot in `data_dir`, if there is one.
pub fn load(broker: &Broker, data_dir: &Path) {
    let file = path(data_dir);
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "cannot read the broker state; starting without it");
            return;
        }
    };
    match broker.restore(Bytes::from(bytes)) {
        Ok((retained, sessions)) => {
            tracing::info!(retained, sessions, file = %file.display(), "broker state restored")
        }
        Err(e) => {
            let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let aside = data_dir.join(format!("broker.state.unreadable-{stamp}"));
            match std::fs::rename(&file, &aside) {
                Ok(()) => {
                    tracing::error!(error = %e, moved_to = %aside.display(), "the broker state file is unreadable; moved aside, starting without it")
                }
                Err(mv) => {
                    tracing::error!(error = %e, rename_error = %mv, file = %file.display(), "the broker state file is unreadable and could not be moved aside; starting without it")
                }
            }
        }
    }
}

/// Writes the snapshot atomically.
pub fn save(broker: &Broker, data_dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let file = path(data_dir);
    let tmp = data_dir.join("broker.state.tmp");
    let mut out = std::fs::File::create(&tmp)?;
    out.write_all(&broker.snapshot())?;
    out.sync_all()?;
    std::fs::rename(&tmp, &file)?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Saves every [`AUTOSAVE`] while the state changes, until `stop`.
pub async fn autosave(broker: Broker, data_dir: PathBuf, stop: CancellationToken) {
    let mut saved = broker.changes();
    let mut ticker = tokio::time::interval(AUTOSAVE);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = broker.changes();
        if now == saved {
            continue;
        }
        let (b, dir) = (broker.clone(), data_dir.clone());
        match tokio::task::spawn_blocking(move || save(&b, &dir)).await {
            Ok(Ok(())) => saved = now,
            Ok(Err(e)) => tracing::warn!(error = %e, "could not save the broker state; will retry"),
            Err(e) => tracing::warn!(error = %e, "the broker state save failed"),
        }
    }
}
