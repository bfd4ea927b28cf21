//! `fieldmq buffer stats`: what waits for each upstream, read from the file
//! while the gateway runs (a WAL reader never disturbs the writer).

use std::path::Path;

use rusqlite::params;

use super::store::{self, StoreError};

/// One upstream's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStats {
    /// The [[upstream]] name.
    pub name: String,
    /// Rows not yet acknowledged by it.
    pub waiting: u64,
    /// Age of the oldest of them, in seconds.
    pub oldest_age_s: Option<f64>,
    /// Rows dropped (drop-oldest) or refused (reject-new) before it took them.
    pub dropped: u64,
    /// When it last acknowledged a row (ms since the epoch).
    pub last_delivery_ms: Option<i64>,
}

/// The buffer's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferStats {
    /// Bytes on disk: the database and its write-ahead log.
    pub bytes: u64,
    /// Per upstream, by name.
    pub upstreams: Vec<UpstreamStats>,
}

/// Reads the figures of the buffer at `path`.
pub fn read(path: &Path) -> Result<BufferStats, StoreError> {
    if !path.exists() {
        return Err(StoreError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no buffer here yet (it is made when the gateway first runs with an [[upstream]])",
            ),
        });
    }
    let conn = store::open_for_reading(path)?;
    let wrap = |source| StoreError::Sqlite { path: path.to_owned(), source };
    let now = store::now_ms();
    let mut upstreams = Vec::new();
    for row in store::upstreams(&conn).map_err(wrap)? {
        let (waiting, oldest): (i64, Option<i64>) = conn
            .query_row(
                "SELECT count(*), min(ts) FROM messages WHERE id > ?1 AND (mask & ?2) != 0",
                params![row.acked, 1i64 << row.bit],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(wrap)?;
        upstreams.push(UpstreamStats {
            name: row.name,
            waiting: waiting as u64,
            oldest_age_s: oldest.map(|ts| (now - ts).max(0) as f64 / 1000.0),
            dropped: row.dropped as u64,
            last_delivery_ms: row.last_delivery,
        });
    }
    let mut bytes = 0;
    for side in ["", "-wal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(side);
        bytes += std::fs::metadata(&name).map(|m| m.len()).unwrap_or(0);
    }
    Ok(BufferStats { bytes, upstreams })
}
