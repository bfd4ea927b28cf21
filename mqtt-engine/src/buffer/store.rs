//! The buffer's file: schema, opening (and moving aside what is not ours),
//! and the few statements the writer, the readers and `buffer stats` share.
//!
//! One row per message, stored once whatever the number of upstreams that
//! take it: `mask` has a bit per upstream. Topics are interned in their own
//! table, so a row costs its payload and a few integers, not its topic
//! string again (bytes written per reading matter on an SD card).
//! Row ids are assigned by the writer, never reused: cursors compare them.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

/// `PRAGMA application_id`: "FMQB". A file with another id is not ours.
const APPLICATION_ID: i32 = 0x464D_5142;
/// Bumped when the schema changes incompatibly.
const SCHEMA_VERSION: i32 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS topics (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    topic INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    mask INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS upstreams (
    name TEXT PRIMARY KEY,
    bit INTEGER NOT NULL UNIQUE,
    acked INTEGER NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    last_delivery INTEGER
);
";

/// Why the buffer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("{path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// More upstreams than bits in a row's mask.
    #[error("at most 63 upstreams can share one buffer")]
    TooManyUpstreams,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Opens (or creates) the buffer for writing. A file that is not a SQLite
/// database, is damaged, or belongs to something else is renamed to
/// `buffer.db.corrupt-<ms>` (or `.foreign-<ms>`) with a log line, and a
/// fresh buffer takes its place: never overwritten, never silently.
/// `check` runs `PRAGMA quick_check`, which reads the whole file: at start,
/// not again when a reload reopens a file this process was just writing.
pub fn open_for_writing(path: &Path, check: bool) -> Result<Connection, StoreError> {
    match try_open(path, check) {
        Ok(conn) => Ok(conn),
        Err(Problem::Unusable(why, suffix)) => {
            let aside = path.with_extension(format!("db.{suffix}-{}", now_ms()));
            tracing::error!(
                buffer = %path.display(),
                moved_to = %aside.display(),
                "the buffer file is {why}: moved aside, starting an empty buffer"
            );
            std::fs::rename(path, &aside)
                .map_err(|source| StoreError::Io { path: path.to_owned(), source })?;
            for side in ["-wal", "-shm"] {
                let file = side_file(path, side);
                if file.exists() {
                    let target = side_file(&aside, side);
                    let _ = std::fs::rename(&file, target);
                }
            }
            try_open(path, check).map_err(|p| p.into_error(path))
        }
        Err(other) => Err(other.into_error(path)),
    }
}

fn side_file(path: &Path, side: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(side);
    PathBuf::from(name)
}

enum Problem {
    Unusable(&'static str, &'static str),
    Failed(rusqlite::Error),
}

impl Problem {
    fn into_error(self, path: &Path) -> StoreError {
        match self {
            Problem::Failed(source) => StoreError::Sqlite { path: path.to_owned(), source },
            Problem::Unusable(why, _) => StoreError::Sqlite {
                path: path.to_owned(),
                source: rusqlite::Error::InvalidParameterName(format!("still {why} after moving it aside")),
            },
        }
    }
}

impl From<rusqlite::Error> for Problem {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => Problem::Unusable("not a SQLite database", "corrupt"),
            Some(ErrorCode::DatabaseCorrupt) => Problem::Unusable("damaged", "corrupt"),
            _ => Problem::Failed(e),
        }
    }
}

fn try_open(path: &Path, check: bool) -> Result<Connection, Problem> {
    let conn = Connection::open(path)?;
    // WAL: readers (the bridges, `buffer stats`) never block the writer.
    // synchronous=FULL: a commit is on disk when it returns; the writer
    // commits at most once per commit interval, so that is the only fsync.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
    let app: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let version: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    if app == 0 && tables == 0 {
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    } else if app != APPLICATION_ID {
        return Err(Problem::Unusable("not a fieldmq buffer", "foreign"));
    } else if version != SCHEMA_VERSION {
        return Err(Problem::Unusable("from an incompatible fieldmq version", "foreign"));
    }
    // A damaged page shows up here rather than in the middle of a drain.
    if check {
        let verdict: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
        if verdict != "ok" {
            return Err(Problem::Unusable("damaged", "corrupt"));
        }
    }
    Ok(conn)
}

/// Opens the buffer read-only, for a bridge's reader or `buffer stats`.
pub fn open_for_reading(path: &Path) -> Result<Connection, StoreError> {
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|source| StoreError::Sqlite { path: path.to_owned(), source })?;
    Ok(conn)
}

/// An upstream's row in the `upstreams` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRow {
    /// The [[upstream]] name.
    pub name: String,
    /// Its bit in a message's mask.
    pub bit: u32,
    /// Every row with an id up to this one is done for it.
    pub acked: i64,
    /// Rows dropped (or refused) before it could take them.
    pub dropped: i64,
    /// When it last acknowledged a row (ms since the epoch).
    pub last_delivery: Option<i64>,
}

/// Every upstream known to the file.
pub fn upstreams(conn: &Connection) -> rusqlite::Result<Vec<UpstreamRow>> {
    let mut stmt =
        conn.prepare("SELECT name, bit, acked, dropped, last_delivery FROM upstreams ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok(UpstreamRow {
            name: r.get(0)?,
            bit: r.get(1)?,
            acked: r.get(2)?,
            dropped: r.get(3)?,
            last_delivery: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Makes the `upstreams` table hold exactly `names`, keeping the cursor of
/// those already there. A new upstream starts at the newest row (it takes
/// what arrives from now on); a removed one's row goes, and with it its
/// claim on rows nobody else waits for.
pub fn sync_upstreams(conn: &Connection, names: &[String]) -> Result<Vec<UpstreamRow>, rusqlite::Error> {
    let known = upstreams(conn)?;
    for gone in known.iter().filter(|u| !names.contains(&u.name)) {
        tracing::warn!(upstream = %gone.name, "upstream no longer configured: its waiting rows are abandoned");
        conn.execute("DELETE FROM upstreams WHERE name = ?1", [&gone.name])?;
    }
    let newest = max_id(conn)?;
    for name in names {
        if known.iter().any(|u| &u.name == name) {
            continue;
        }
        let used: Vec<u32> = upstreams(conn)?.iter().map(|u| u.bit).collect();
        let Some(bit) = (0..63).find(|b| !used.contains(b)) else {
            return Err(rusqlite::Error::InvalidParameterName("at most 63 upstreams".into()));
        };
        conn.execute(
            "INSERT INTO upstreams (name, bit, acked) VALUES (?1, ?2, ?3)",
            rusqlite::params![name, bit, newest],
        )?;
    }
    upstreams(conn)
}

/// The newest row id ever handed out that the file still remembers.
pub fn max_id(conn: &Connection) -> rusqlite::Result<i64> {
    let rows: Option<i64> = conn.query_row("SELECT max(id) FROM messages", [], |r| r.get(0))?;
    let acked: Option<i64> = conn.query_row("SELECT max(acked) FROM upstreams", [], |r| r.get(0))?;
    Ok(rows.unwrap_or(0).max(acked.unwrap_or(0)))
}

/// Bytes the file occupies with live pages (free pages do not count: the
/// file does not shrink, SQLite reuses them).
pub fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    let size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    Ok(((pages - free).max(0) * size) as u64)
}

/// The name of an interned topic.
pub fn topic_name(conn: &Connection, id: i64) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT name FROM topics WHERE id = ?1", [id], |r| r.get(0)).optional()
}
