//! RowReader: an upstream's view of the buffer, the rows after its cursor.
//!
//! Each bridge has its own read-only connection (WAL: it never blocks the
//! writer) and reads committed rows in id order, in batches, skipping rows
//! meant for other upstreams.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rusqlite::{params, Connection};

use super::store::{self, StoreError};

/// One buffered message, as an upstream sends it.
#[derive(Debug, Clone)]
pub struct Row {
    /// Its id: rows are sent in this order.
    pub id: i64,
    /// The local topic.
    pub topic: Arc<str>,
    /// The payload.
    pub payload: Bytes,
    /// Its retain flag.
    pub retain: bool,
}

/// Reads one upstream's rows.
pub struct RowReader {
    conn: Connection,
    bit: u64,
    topics: HashMap<i64, Arc<str>>,
}

/// A batch of rows and how far it looked.
#[derive(Debug, Default)]
pub struct Batch {
    /// The rows, in id order.
    pub rows: Vec<Row>,
    /// Every row up to this id was looked at: rows after `after` and up to
    /// here that are not in `rows` are not for this upstream.
    pub scanned_to: i64,
}

impl RowReader {
    pub(super) fn open(path: &Path, bit: u64) -> Result<RowReader, StoreError> {
        Ok(RowReader { conn: store::open_for_reading(path)?, bit, topics: HashMap::new() })
    }

    /// Up to `limit` rows with ids in `(after, upto]`.
    pub fn batch(&mut self, after: i64, upto: i64, limit: usize) -> rusqlite::Result<Batch> {
        let mut rows = Vec::with_capacity(limit.min(4096));
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, topic, flags, payload FROM messages \
                 WHERE id > ?1 AND id <= ?2 AND (mask & ?3) != 0 ORDER BY id LIMIT ?4",
            )?;
            let mut found = stmt.query(params![after, upto, self.bit as i64, limit as i64])?;
            while let Some(r) = found.next()? {
                let topic_id: i64 = r.get(1)?;
                let flags: i64 = r.get(2)?;
                let payload = Bytes::copy_from_slice(r.get_ref(3)?.as_blob()?);
                rows.push((r.get::<_, i64>(0)?, topic_id, flags & 1 != 0, payload));
            }
        }
        let fetched = rows.len();
        let last_fetched = rows.last().map(|r| r.0).unwrap_or(upto);
        let mut out = Vec::with_capacity(rows.len());
        for (id, topic_id, retain, payload) in rows {
            let topic = match self.topics.get(&topic_id) {
                Some(t) => t.clone(),
                None => {
                    let Some(name) = store::topic_name(&self.conn, topic_id)? else {
                        tracing::error!(row = id, topic_id, "buffer row without its topic: skipped");
                        continue;
                    };
                    let name: Arc<str> = name.into();
                    self.topics.insert(topic_id, name.clone());
                    name
                }
            };
            out.push(Row { id, topic, payload, retain });
        }
        let scanned_to = if fetched >= limit { last_fetched } else { upto };
        Ok(Batch { rows: out, scanned_to })
    }
}
