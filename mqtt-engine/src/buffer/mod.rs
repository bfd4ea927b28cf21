//! The store-and-forward buffer: where a message bound upstream becomes
//! durable.
//!
//! Every message whose topic matches an upstream's `forward` filters is
//! offered to the buffer ([`Buffer::offer`]), which hands it to the
//! [`writer`] thread. The writer appends to `buffer.db` (SQLite, WAL) and
//! commits at most once per `commit_interval`, whatever the rate: one fsync
//! per interval, not per message (SD cards wear out). A message is stored
//! once, with a bit per upstream that takes it; each upstream's bridge
//! reads rows after its own cursor ([`reader`]) and moves the cursor when
//! the upstream acknowledges them, so a dead upstream never stalls a live
//! one. Rows every upstream is done with are deleted by the writer.
//!
//! A LAN client's QoS 1/2 publish is acknowledged only once its row is
//! committed: [`Buffer::committed`] tells a connection when that is.
//!
//! The file is bounded by `max_size`; when it is full (or the filesystem
//! is: ENOSPC is the same case), `when_full` decides: drop the oldest rows
//! (counted and logged per upstream) or refuse new ones.

mod reader;
pub mod stats;
mod store;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

pub use reader::{Batch, Row, RowReader};
pub use store::StoreError;

use crate::{TopicFilter, TopicName};

/// What to do when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Delete the oldest undelivered rows to make room (counted, logged).
    DropOldest,
    /// Refuse new messages until there is room again (counted, logged).
    RejectNew,
}

/// The [buffer] settings.
#[derive(Debug, Clone)]
pub struct BufferSettings {
    /// The database file (`<data_dir>/buffer.db`).
    pub path: PathBuf,
    /// The most the database may hold, in bytes.
    pub max_size: u64,
    /// The policy at `max_size`.
    pub when_full: WhenFull,
    /// At most one commit (one fsync) per this interval.
    pub commit_interval: Duration,
}

/// One upstream as the buffer sees it: a name and what it takes.
#[derive(Debug, Clone)]
pub struct Route {
    /// The [[upstream]] name.
    pub name: String,
    /// Local topics it takes.
    pub forward: Vec<TopicFilter>,
}

/// What became of an offered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// No upstream takes this topic.
    NotForwarded,
    /// Taken; durable once [`Buffer::committed`] reaches this ticket.
    Taken(u64),
    /// Refused: the buffer is full and refuses new messages.
    Refused,
}

/// An upstream's progress, shared by its bridge (which moves it) and the
/// writer (which persists it).
#[derive(Debug)]
pub struct Cursor {
    /// The upstream's name.
    pub name: String,
    /// Its bit in a row's mask.
    pub bit: u32,
    /// Every row with an id up to this one is done for this upstream.
    acked: AtomicI64,
    /// When it last acknowledged a row (ms since the epoch; 0: never).
    last_delivery: AtomicI64,
    /// Rows dropped or refused that it would have taken, in this run and
    /// before (loaded from the file).
    dropped: AtomicI64,
}

impl Cursor {
    /// Every row up to `id` is done for this upstream.
    pub fn advance(&self, id: i64, delivered_now: bool) {
        self.acked.fetch_max(id, Ordering::AcqRel);
        if delivered_now {
            self.last_delivery.store(store::now_ms(), Ordering::Relaxed);
        }
    }

    /// The id up to which rows are done.
    pub fn acked(&self) -> i64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Rows dropped or refused so far.
    pub fn dropped(&self) -> i64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

enum Command {
    Append(Pending),
    /// A cursor moved: worth a commit even with nothing to append.
    Nudge,
}

/// A message on its way to the file.
struct Pending {
    seq: u64,
    topic: TopicName,
    payload: Bytes,
    retain: bool,
    ts: i64,
    mask: u64,
}

/// What one writer thread serves: the settings and the upstreams.
struct Routing {
    settings: BufferSettings,
    routes: Vec<(u64, Vec<TopicFilter>)>,
    cursors: Vec<Arc<Cursor>>,
}

/// Stays the same across reconfigurations, so tickets and the commit
/// progress a LAN connection follows survive a reload.
struct Shared {
    routing: RwLock<Arc<Routing>>,
    /// Tickets are handed out under this lock, in the order the writer
    /// receives them, so "committed up to N" means every ticket up to N.
    intake: Mutex<(u64, Option<mpsc::Sender<Command>>)>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The newest ticket committed (or refused at commit): LAN acks wait on it.
    committed_seq: watch::Sender<u64>,
    /// The newest row id committed: bridges read up to it.
    committed_id: watch::Sender<i64>,
    /// Set under reject-new while the buffer is full.
    refusing: AtomicBool,
    nudged: AtomicBool,
    refused: AtomicU64,
    /// Commits made (each one fsync of the log), for benchmarks and $SYS.
    commits: AtomicU64,
}

/// A handle on the buffer; clones share it.
#[derive(Clone)]
pub struct Buffer {
    shared: Arc<Shared>,
}

impl Buffer {
    /// Opens the buffer for these upstreams and starts its writer thread.
    pub fn open(settings: BufferSettings, routes: &[Route]) -> Result<Buffer, StoreError> {
        let shared = Arc::new(Shared {
            routing: RwLock::new(Arc::new(Routing {
                settings: settings.clone(),
                routes: Vec::new(),
                cursors: Vec::new(),
            })),
            intake: Mutex::new((0, None)),
            writer: Mutex::new(None),
            committed_seq: watch::Sender::new(0),
            committed_id: watch::Sender::new(0),
            refusing: AtomicBool::new(false),
            nudged: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        });
        let buffer = Buffer { shared };
        let mut intake = buffer.shared.intake.lock().unwrap_or_else(|p| p.into_inner());
        buffer.start(settings, routes, true, &mut intake)?;
        drop(intake);
        Ok(buffer)
    }

    /// Starts a writer for these settings and upstreams; the caller holds
    /// the intake lock, so no message slips between two writers.
    fn start(
        &self,
        settings: BufferSettings,
        routes: &[Route],
        check: bool,
        intake: &mut (u64, Option<mpsc::Sender<Command>>),
    ) -> Result<(), StoreError> {
        if let Some(dir) = settings.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io { path: dir.to_owned(), source })?;
        }
        let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
        let (conn, rows) = writer::prepare(&settings, &names, check)?;
        let mut cursors = Vec::new();
        let mut masks = Vec::new();
        for route in routes {
            let Some(row) = rows.iter().find(|r| r.name == route.name) else { continue };
            cursors.push(Arc::new(Cursor {
                name: row.name.clone(),
                bit: row.bit,
                acked: AtomicI64::new(row.acked),
                last_delivery: AtomicI64::new(row.last_delivery.unwrap_or(0)),
                dropped: AtomicI64::new(row.dropped),
            }));
            masks.push((1u64 << row.bit, route.forward.clone()));
        }
        let newest = store::max_id(&conn)
            .map_err(|source| StoreError::Sqlite { path: settings.path.clone(), source })?;
        let routing = Arc::new(Routing { settings, routes: masks, cursors });
        *self.shared.routing.write().unwrap_or_else(|p| p.into_inner()) = routing.clone();
        self.shared.committed_id.send_replace(newest);
        self.shared.refusing.store(false, Ordering::Release);
        let (tx, rx) = mpsc::channel();
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || writer::BufferWriter::new(conn, shared, routing, newest).run(rx))
            .map_err(|source| StoreError::Io { path: PathBuf::from("buffer-writer"), source })?;
        intake.1 = Some(tx);
        *self.shared.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    /// Applies new settings or upstreams (a reload): the writer commits
    /// what it holds and a new one takes over. Messages offered meanwhile
    /// wait (a commit's time), none is lost. Blocks: call from a blocking
    /// context. On error the buffer is closed.
    pub fn reconfigure(&self, settings: BufferSettings, routes: &[Route]) -> Result<(), StoreError> {
        let mut intake = self.shared.intake.lock().unwrap_or_else(|p| p.into_inner());
        intake.1 = None;
        self.join_writer();
        // A file this process was writing a moment ago needs no new check.
        let moved = self.routing().settings.path != settings.path;
        self.start(settings, routes, moved, &mut intake)
    }

    fn routing(&self) -> Arc<Routing> {
        self.shared.routing.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Offers a message bound upstream.
    pub fn offer(&self, topic: &TopicName, payload: &Bytes, retain: bool) -> Offer {
        let routing = self.routing();
        let mut mask = 0;
        for (bit, filters) in &routing.routes {
            if filters.iter().any(|f| f.matches(topic)) {
                mask |= bit;
            }
        }
        if mask == 0 {
            return Offer::NotForwarded;
        }
        if self.shared.refusing.load(Ordering::Relaxed) {
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            for cursor in &routing.cursors {
                if mask & (1 << cursor.bit) != 0 {
                    cursor.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            // So `buffer stats` shows the count soon.
            self.nudge();
            return Offer::Refused;
        }
        let mut intake = self.shared.intake.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = intake.1.clone() else {
            return Offer::Refused;
        };
        intake.0 += 1;
        let seq = intake.0;
        let pending = Pending {
            seq,
            topic: topic.clone(),
            payload: payload.clone(),
            retain,
            ts: store::now_ms(),
            mask,
        };
        if tx.send(Command::Append(pending)).is_err() {
            return Offer::Refused;
        }
        Offer::Taken(seq)
    }

    /// How many commits the buffer made since it was opened.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Follows the newest committed ticket.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.shared.committed_seq.subscribe()
    }

    /// Follows the newest committed row id.
    pub fn committed_rows(&self) -> watch::Receiver<i64> {
        self.shared.committed_id.subscribe()
    }

    /// The cursor of the upstream called `name`.
    pub fn cursor(&self, name: &str) -> Option<Arc<Cursor>> {
        self.routing().cursors.iter().find(|c| c.name == name).cloned()
    }

    /// A reader of the rows waiting for the upstream called `name`.
    pub fn reader(&self, name: &str) -> Result<RowReader, StoreError> {
        let routing = self.routing();
        let bit = routing.cursors.iter().find(|c| c.name == name).map(|c| c.bit).unwrap_or(63);
        RowReader::open(&routing.settings.path, 1u64 << bit)
    }

    /// Each upstream's live figures, for `$SYS`: (name, rows committed
    /// and not yet acknowledged by it, rows dropped or refused, last
    /// delivery in ms since the epoch or 0). Rows are counted from its
    /// cursor, so an upstream whose filter takes only some topics is
    /// given an upper bound.
    pub fn upstream_figures(&self) -> Vec<(String, u64, u64, i64)> {
        let committed = *self.shared.committed_id.borrow();
        self.routing()
            .cursors
            .iter()
            .map(|c| {
                let waiting = (committed - c.acked()).max(0) as u64;
                (c.name.clone(), waiting, c.dropped().max(0) as u64, c.last_delivery.load(Ordering::Relaxed))
            })
            .collect()
    }

    /// Asks the writer to persist cursors soon (at most once per interval).
    pub fn nudge(&self) {
        if !self.shared.nudged.swap(true, Ordering::AcqRel) {
            let intake = self.shared.intake.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(tx) = &intake.1 {
                let _ = tx.send(Command::Nudge);
            }
        }
    }

    /// Stops taking messages, commits what was taken and every cursor, and
    /// waits for the writer to finish. Blocks: call from a blocking context.
    pub fn close(&self) {
        let mut intake = self.shared.intake.lock().unwrap_or_else(|p| p.into_inner());
        intake.1 = None;
        self.join_writer();
    }

    fn join_writer(&self) {
        let handle = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the buffer writer panicked");
            }
        }
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer").field("path", &self.routing().settings.path).finish()
    }
}

#[cfg(test)]
mod tests;
