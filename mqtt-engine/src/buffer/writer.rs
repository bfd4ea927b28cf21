//! The BufferWriter: the one thread that writes `buffer.db`.
//!
//! SQLite has one writer at a time anyway; a dedicated thread keeps its
//! blocking calls off the async runtime and makes group commit natural:
//! messages are taken from the channel as they come and written in one
//! transaction per `commit_interval`. The same transaction persists the
//! upstreams' cursors and deletes the rows every upstream is done with.
//!
//! Full is one case whether SQLite hits `max_size` (its `max_page_count`)
//! or the filesystem hits ENOSPC: both are SQLITE_FULL, and `when_full`
//! decides. The writer also keeps a margin below `max_size`, so under
//! drop-oldest the hard limit is rarely reached at all.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode};

use super::store::{self, StoreError, UpstreamRow};
use super::{Command, Pending, Routing, Shared, WhenFull};

/// How long the writer sleeps when nothing is pending.
const IDLE: Duration = Duration::from_secs(1);
/// Above this share of max_size the oldest rows go (drop-oldest) or new
/// ones are refused (reject-new); below LOW, new ones are taken again.
const HIGH: f64 = 0.95;
const LOW: f64 = 0.85;
/// Rows per multi-row INSERT.
const CHUNK: usize = 64;

fn insert_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT INTO messages (id, topic, ts, flags, mask, payload) VALUES ");
    for i in 0..rows {
        sql.push_str(if i == 0 { "(?,?,?,?,?,?)" } else { ",(?,?,?,?,?,?)" });
    }
    sql
}

/// Opens the file, brings its upstream table in line with the config and
/// bounds its size; returns the connection for the writer.
pub(super) fn prepare(
    settings: &super::BufferSettings,
    names: &[String],
    check: bool,
) -> Result<(Connection, Vec<UpstreamRow>), StoreError> {
    let path = &settings.path;
    let wrap = |source| StoreError::Sqlite { path: path.clone(), source };
    let conn = store::open_for_writing(path, check)?;
    if names.len() > 63 {
        return Err(StoreError::TooManyUpstreams);
    }
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0)).map_err(wrap)?;
    let max_pages = (settings.max_size as i64 / page_size).max(16);
    conn.pragma_update(None, "max_page_count", max_pages).map_err(wrap)?;
    // The write-ahead log counts on disk too: checkpoint it before it
    // grows past a quarter of max_size, and truncate it back after.
    let wal_limit = (settings.max_size as i64 / 4).min(16 << 20);
    conn.pragma_update(None, "journal_size_limit", wal_limit).map_err(wrap)?;
    conn.pragma_update(None, "wal_autocheckpoint", (wal_limit / page_size).clamp(16, 1000)).map_err(wrap)?;
    let rows = store::sync_upstreams(&conn, names).map_err(wrap)?;
    Ok((conn, rows))
}

pub(super) struct BufferWriter {
    conn: Connection,
    shared: Arc<Shared>,
    routing: Arc<Routing>,
    next_id: i64,
    topics: HashMap<String, i64>,
    pending: Vec<Pending>,
    /// What the file holds for each cursor: (acked, last_delivery, dropped).
    persisted: Vec<(i64, i64, i64)>,
    deleted_through: i64,
    rows: i64,
    last_commit: Instant,
    /// The newest ticket taken from the channel.
    taken_seq: u64,
}

impl BufferWriter {
    pub(super) fn new(conn: Connection, shared: Arc<Shared>, routing: Arc<Routing>, newest: i64) -> Self {
        let rows = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0)).unwrap_or(0);
        let deleted_through = conn
            .query_row("SELECT min(id) - 1 FROM messages", [], |r| r.get::<_, Option<i64>>(0))
            .ok()
            .flatten();
        let persisted = routing
            .cursors
            .iter()
            .map(|c| (c.acked(), c.last_delivery.load(Ordering::Relaxed), c.dropped()))
            .collect();
        BufferWriter {
            conn,
            next_id: newest + 1,
            topics: HashMap::new(),
            pending: Vec::new(),
            persisted,
            deleted_through: deleted_through.unwrap_or(newest),
            rows,
            last_commit: Instant::now() - routing.settings.commit_interval,
            taken_seq: 0,
            shared,
            routing,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Command>) {
        let interval = self.routing.settings.commit_interval;
        let mut open = true;
        while open {
            let due = self.last_commit + interval;
            let wait = if self.pending.is_empty() && !self.nudged() {
                IDLE
            } else {
                due.saturating_duration_since(Instant::now())
            };
            match rx.recv_timeout(wait) {
                Ok(command) => self.take(command),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
            }
            // Take what else is waiting, but never so much that the commit
            // slips far past its time.
            for _ in 0..65_536 {
                match rx.try_recv() {
                    Ok(command) => self.take(command),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let work = !self.pending.is_empty() || self.nudged() || self.cursors_moved();
            if work && (Instant::now() >= self.last_commit + interval || !open) {
                self.commit();
            }
        }
        // The senders are gone: everything taken is committed above; make
        // sure the cursors are too.
        if self.cursors_moved() || !self.pending.is_empty() {
            self.commit();
        }
        tracing::debug!(rows = self.rows, "buffer closed");
    }

    fn nudged(&self) -> bool {
        self.shared.nudged.load(Ordering::Acquire)
    }

    fn take(&mut self, command: Command) {
        match command {
            Command::Append(pending) => {
                self.taken_seq = pending.seq;
                self.pending.push(pending);
            }
            Command::Nudge => {}
        }
    }

    fn cursors_moved(&self) -> bool {
        self.routing.cursors.iter().zip(&self.persisted).any(|(c, p)| c.acked() != p.0 || c.dropped() != p.2)
    }

    /// Writes what is pending, the cursors and the deletions in one
    /// transaction; handles a full buffer or disk.
    fn commit(&mut self) {
        self.shared.nudged.store(false, Ordering::Release);
        self.last_commit = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = self.try_commit();
            if result.is_err() {
                // Topics interned by a transaction that did not commit do
                // not exist: forget them.
                self.topics.clear();
            }
            match result {
                Ok(()) => break,
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::DiskFull) && attempts < 40 => {
                    if !self.make_room_after_full() {
                        break;
                    }
                }
                Err(e) => {
                    // The rows stay pending; the next commit tries again.
                    tracing::error!(buffer = %self.routing.settings.path.display(), error = %e, "buffer commit failed");
                    return;
                }
            }
        }
        self.pending.clear();
        // Every ticket taken so far is now committed or counted as dropped.
        if self.taken_seq > *self.shared.committed_seq.borrow() {
            self.shared.committed_seq.send_replace(self.taken_seq);
        }
        self.shared.committed_id.send_replace(self.next_id - 1);
        self.keep_margin();
    }

    fn try_commit(&mut self) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        let mut id = self.next_id;
        {
            let mut insert_topic = tx.prepare_cached("INSERT OR IGNORE INTO topics (name) VALUES (?1)")?;
            let mut find_topic = tx.prepare_cached("SELECT id FROM topics WHERE name = ?1")?;
            let mut topic_ids = Vec::with_capacity(self.pending.len());
            for p in &self.pending {
                let topic = match self.topics.get(p.topic.as_str()) {
                    Some(t) => *t,
                    None => {
                        insert_topic.execute([p.topic.as_str()])?;
                        let t: i64 = find_topic.query_row([p.topic.as_str()], |r| r.get(0))?;
                        self.topics.insert(p.topic.as_str().to_owned(), t);
                        t
                    }
                };
                topic_ids.push(topic);
            }
            // Many rows per statement: SQLite's per-statement cost (bind,
            // step, reset) is paid once per chunk instead of once per row.
            let mut chunk_insert = tx.prepare_cached(&insert_sql(CHUNK))?;
            let mut one_insert = tx.prepare_cached(&insert_sql(1))?;
            let mut rows = self.pending.iter().zip(&topic_ids);
            let mut left = self.pending.len();
            while left > 0 {
                let (stmt, n) = if left >= CHUNK { (&mut chunk_insert, CHUNK) } else { (&mut one_insert, 1) };
                let mut index = 1;
                for (p, topic) in rows.by_ref().take(n) {
                    stmt.raw_bind_parameter(index, id)?;
                    stmt.raw_bind_parameter(index + 1, *topic)?;
                    stmt.raw_bind_parameter(index + 2, p.ts)?;
                    stmt.raw_bind_parameter(index + 3, i64::from(p.retain))?;
                    stmt.raw_bind_parameter(index + 4, p.mask as i64)?;
                    stmt.raw_bind_parameter(index + 5, &p.payload[..])?;
                    index += 6;
                    id += 1;
                }
                stmt.raw_execute()?;
                left -= n;
            }
        }
        let mut persisted = self.persisted.clone();
        {
            let mut update = tx.prepare_cached(
                "UPDATE upstreams SET acked = ?2, last_delivery = nullif(?3, 0), dropped = ?4 WHERE name = ?1",
            )?;
            for (cursor, saved) in self.routing.cursors.iter().zip(persisted.iter_mut()) {
                let now = (cursor.acked(), cursor.last_delivery.load(Ordering::Relaxed), cursor.dropped());
                if now != *saved {
                    update.execute(params![cursor.name, now.0, now.1, now.2])?;
                    *saved = now;
                }
            }
        }
        let done = self.routing.cursors.iter().map(|c| c.acked()).min().unwrap_or(id - 1);
        let mut deleted = 0;
        if done > self.deleted_through {
            deleted = tx.execute("DELETE FROM messages WHERE id <= ?1", [done])?;
        }
        tx.commit()?;
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        if done > self.deleted_through {
            self.deleted_through = done;
        }
        self.rows += self.pending.len() as i64 - deleted as i64;
        self.next_id = id;
        self.persisted = persisted;
        Ok(())
    }

    /// SQLITE_FULL: the buffer reached max_size or the disk is full.
    /// Returns whether to try the commit again.
    fn make_room_after_full(&mut self) -> bool {
        let _ = self.conn.execute_batch("ROLLBACK");
        match self.routing.settings.when_full {
            WhenFull::DropOldest => {
                // A tenth of the rows, and at least as many as are pending:
                // the newest rows are the ones worth keeping.
                let n = (self.rows / 10).max(self.pending.len() as i64).max(1);
                if self.rows == 0 {
                    // Even an empty buffer cannot take this batch (larger
                    // than max_size, or the disk is full): its oldest half
                    // goes, and the rest is tried again.
                    let keep = self.pending.len() / 2;
                    let gone: Vec<Pending> = self.pending.drain(..self.pending.len() - keep).collect();
                    self.count_dropped_pending(&gone, "drop-oldest");
                    return true;
                }
                self.drop_oldest(n, "disk or max_size full")
            }
            WhenFull::RejectNew => {
                // The newest half of the batch is refused, the rest tried
                // again: what fits is kept, oldest first.
                if self.pending.is_empty() {
                    return false;
                }
                let keep = self.pending.len() / 2;
                let gone = self.pending.split_off(keep);
                self.shared.refused.fetch_add(gone.len() as u64, Ordering::Relaxed);
                self.count_dropped_pending(&gone, "reject-new");
                self.set_refusing(true);
                true
            }
        }
    }

    fn count_dropped_pending(&self, gone: &[Pending], policy: &str) {
        for cursor in &self.routing.cursors {
            let n = gone.iter().filter(|p| p.mask & (1 << cursor.bit) != 0).count() as i64;
            cursor.dropped.fetch_add(n, Ordering::Relaxed);
        }
        let totals: Vec<String> =
            self.routing.cursors.iter().map(|c| format!("{}={}", c.name, c.dropped())).collect();
        tracing::warn!(
            dropped_total = %totals.join(","),
            "buffer full: {} new messages not stored (when_full = {policy})",
            gone.len()
        );
    }

    /// Deletes the `n` oldest rows, counting them against each upstream
    /// that had not taken them yet; returns whether anything went.
    fn drop_oldest(&mut self, n: i64, why: &str) -> bool {
        let result = (|| -> rusqlite::Result<(i64, usize)> {
            let cut: Option<i64> = self
                .conn
                .query_row("SELECT id FROM messages ORDER BY id LIMIT 1 OFFSET ?1", [n - 1], |r| r.get(0))
                .or_else(|_| self.conn.query_row("SELECT max(id) FROM messages", [], |r| r.get(0)))?;
            let Some(cut) = cut else { return Ok((0, 0)) };
            let tx = self.conn.transaction()?;
            for cursor in &self.routing.cursors {
                let lost: i64 = tx.query_row(
                    "SELECT count(*) FROM messages WHERE id <= ?1 AND id > ?2 AND (mask & ?3) != 0",
                    params![cut, cursor.acked(), 1i64 << cursor.bit],
                    |r| r.get(0),
                )?;
                cursor.dropped.fetch_add(lost, Ordering::Relaxed);
            }
            let deleted = tx.execute("DELETE FROM messages WHERE id <= ?1", [cut])?;
            tx.commit()?;
            Ok((cut, deleted))
        })();
        match result {
            Ok((_, 0)) => false,
            Ok((cut, deleted)) => {
                self.rows -= deleted as i64;
                self.deleted_through = self.deleted_through.max(cut);
                let totals: Vec<String> =
                    self.routing.cursors.iter().map(|c| format!("{}={}", c.name, c.dropped())).collect();
                tracing::warn!(
                    dropped = deleted,
                    dropped_total = %totals.join(","),
                    "buffer full ({why}): dropped the {deleted} oldest rows (when_full = drop-oldest)"
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "buffer full, and dropping the oldest rows failed");
                false
            }
        }
    }

    /// Keeps the file below max_size with a margin, so a burst rarely hits
    /// the hard limit in the middle of a commit.
    fn keep_margin(&mut self) {
        let Ok(used) = store::used_bytes(&self.conn) else { return };
        let max = self.routing.settings.max_size as f64;
        let used = used as f64;
        match self.routing.settings.when_full {
            WhenFull::DropOldest if used > max * HIGH && self.rows > 0 => {
                let per_row = used / self.rows as f64;
                let n = ((used - max * LOW) / per_row).ceil() as i64;
                self.drop_oldest(n.max(1), "max_size reached");
            }
            WhenFull::RejectNew if used > max * HIGH => self.set_refusing(true),
            WhenFull::RejectNew if used < max * LOW => self.set_refusing(false),
            _ => {}
        }
    }

    fn set_refusing(&mut self, refusing: bool) {
        let was = self.shared.refusing.swap(refusing, Ordering::AcqRel);
        if was != refusing {
            if refusing {
                tracing::warn!(
                    max_size = self.routing.settings.max_size,
                    "buffer full: refusing new messages until upstreams take some (when_full = reject-new)"
                );
            } else {
                let refused = self.shared.refused.load(Ordering::Relaxed);
                tracing::info!(refused_so_far = refused, "buffer has room again: taking new messages");
            }
        }
    }
}
