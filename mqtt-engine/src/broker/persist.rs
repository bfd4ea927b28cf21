//! Broker state that outlives the process: retained messages and persistent
//! sessions (subscriptions, queued and in-flight messages, QoS 2 receipts,
//! the expiry left), as one snapshot.
//!
//! The gateway writes the snapshot atomically (temp file, fsync, rename)
//! every few seconds when something changed and once more at shutdown, so
//! no message costs an fsync (SD cards wear out). The price: a crash (power
//! cut, SIGKILL) loses what changed since the last snapshot. A graceful stop
//! loses nothing: every connection releases its session before the final
//! snapshot. Readings never depend on this file: their durability is the
//! store-and-forward buffer's job.
//!
//! Format: `FMQB` and a version byte, then the retained messages and the
//! sessions, each a count followed by the items; integers big-endian,
//! strings and byte strings with a length. A file that does not decode is
//! refused whole (the caller moves it aside).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::time::Instant;

use super::mailbox::QueueLimits;
use super::router::SessionEntry;
use super::session::{Delivery, Envelope, Outgoing, SessionState};
use super::Broker;
use crate::packet::properties::Context;
use crate::packet::wire::Reader;
use crate::packet::{DecodeError, Properties, SubscriptionOptions};
use crate::{QoS, TopicName};

const MAGIC: &[u8; 5] = b"FMQB\x02";
/// Version 1 did not record a session's owner: its sessions are restored
/// with an unknown owner, which their first client becomes.
const MAGIC_V1: &[u8; 5] = b"FMQB\x01";
const NONE: u32 = u32::MAX;

fn put_str(buf: &mut BytesMut, s: &str) {
    put_bytes(buf, s.as_bytes());
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u32(b.len() as u32);
    buf.put_slice(b);
}

fn get_bytes(r: &mut Reader) -> Result<Bytes, DecodeError> {
    let len = r.u32("length")? as usize;
    let mut sub = r.sub(len, "bytes beyond the snapshot")?;
    Ok(sub.rest())
}

fn get_str(r: &mut Reader) -> Result<String, DecodeError> {
    let bytes = get_bytes(r)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| bad("a string that is not UTF-8"))
}

fn bad(what: &'static str) -> DecodeError {
    DecodeError::new(crate::packet::ReasonCode::MALFORMED_PACKET, what)
}

fn qos(bits: u8) -> Result<QoS, DecodeError> {
    QoS::from_bits(bits).ok_or_else(|| bad("a QoS beyond 2"))
}

fn put_envelope(buf: &mut BytesMut, e: &Envelope) {
    put_str(buf, e.topic.as_str());
    put_bytes(buf, &e.payload);
    buf.put_u8(e.qos as u8);
    buf.put_u8(u8::from(e.retain));
    e.properties.encode(buf);
    buf.put_u32(e.remaining_expiry().unwrap_or(NONE));
    put_str(buf, e.publisher.as_deref().unwrap_or(""));
}

fn get_envelope(r: &mut Reader) -> Result<Envelope, DecodeError> {
    let topic = TopicName::new(get_str(r)?).map_err(|_| bad("an invalid topic"))?;
    let payload = get_bytes(r)?;
    let qos = qos(r.u8("qos")?)?;
    let retain = r.u8("retain")? != 0;
    let properties = Properties::decode(r, Context::Publish)?;
    let expiry = r.u32("expiry")?;
    let publisher = get_str(r)?;
    Ok(Envelope {
        topic,
        payload,
        qos,
        retain,
        properties,
        expires_at: (expiry != NONE).then(|| Instant::now() + Duration::from_secs(u64::from(expiry))),
        publisher: (!publisher.is_empty()).then(|| Arc::from(publisher.as_str())),
    })
}

fn put_delivery(buf: &mut BytesMut, d: &Delivery) {
    put_envelope(buf, &d.envelope);
    buf.put_u8(d.qos as u8);
    buf.put_u8(u8::from(d.retain));
    buf.put_u32(d.subscription_ids.len() as u32);
    d.subscription_ids.iter().for_each(|id| buf.put_u32(*id));
}

fn get_delivery(r: &mut Reader) -> Result<Delivery, DecodeError> {
    let envelope = Arc::new(get_envelope(r)?);
    let qos = qos(r.u8("qos")?)?;
    let retain = r.u8("retain")? != 0;
    let n = r.u32("ids")?;
    let subscription_ids = (0..n).map(|_| r.u32("id")).collect::<Result<_, _>>()?;
    Ok(Delivery { envelope, qos, retain, subscription_ids })
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Broker {
    /// The state worth keeping across a restart, encoded. Sessions a
    /// connection owns right now are saved with their subscriptions only
    /// (their in-flight state is the connection's until it releases it).
    pub fn snapshot(&self) -> Bytes {
        let router = self.router();
        let mut buf = BytesMut::with_capacity(4096);
        buf.put_slice(MAGIC);
        // `$SYS` is the running broker's own and says nothing after a restart.
        let retained: Vec<&Arc<Envelope>> =
            router.all_retained().filter(|e| !e.expired() && !e.topic.is_sys()).collect();
        buf.put_u32(retained.len() as u32);
        for envelope in retained {
            put_envelope(&mut buf, envelope);
        }
        let now = unix_now();
        // Sessions that end with their connection are not worth keeping,
        // nor one a claim is about to discard (its client asked for that).
        let sessions: Vec<(&Arc<str>, &SessionEntry)> = router
            .sessions
            .iter()
            .filter(|(_, e)| e.expiry != 0 && !e.discard)
            .map(|(c, e)| (c, &**e))
            .collect();
        buf.put_u32(sessions.len() as u32);
        for (client, entry) in sessions {
            put_str(&mut buf, client);
            match (&entry.owner, entry.owner_unknown) {
                (_, true) => buf.put_u8(2),
                (Some(user), false) => {
                    buf.put_u8(1);
                    put_str(&mut buf, user);
                }
                (None, false) => buf.put_u8(0),
            }
            let left = match entry.offline_since {
                Some(since) if entry.expiry != u32::MAX => {
                    let gone = now.saturating_sub(since.get());
                    entry.expiry.saturating_sub(gone.min(u64::from(u32::MAX)) as u32)
                }
                _ => entry.expiry,
            };
            buf.put_u32(left);
            buf.put_u64(now);
            buf.put_u32(entry.subscriptions.len() as u32);
            for (filter, (options, id)) in &entry.subscriptions {
                put_str(&mut buf, filter);
                let o = options.qos as u8
                    | u8::from(options.no_local) << 2
                    | u8::from(options.retain_as_published) << 3
                    | options.retain_handling << 4;
                buf.put_u8(o);
                buf.put_u32(id.unwrap_or(NONE));
            }
            // Not there while a connection holds it.
            let (outgoing, incoming, last_id) = entry.mailbox.with_state(|state| match state {
                Some(s) => (
                    s.outgoing.iter().map(|(k, v)| (*k, v.clone())).collect(),
                    s.incoming_qos2.iter().copied().collect(),
                    s.last_id,
                ),
                None => (Vec::new(), Vec::new(), 0),
            });
            buf.put_u32(outgoing.len() as u32);
            for (id, o) in outgoing {
                buf.put_u16(id);
                match o {
                    Outgoing::Published(d) => {
                        buf.put_u8(0);
                        put_delivery(&mut buf, &d);
                    }
                    Outgoing::Released => buf.put_u8(1),
                }
            }
            buf.put_u32(incoming.len() as u32);
            incoming.iter().for_each(|id: &u16| buf.put_u16(*id));
            buf.put_u16(last_id);
            // QoS 0 is not kept for an absent client (it was only queued
            // because the client was online).
            let queued: Vec<Delivery> =
                entry.mailbox.snapshot().into_iter().filter(|d| d.qos != QoS::AtMostOnce).collect();
            buf.put_u32(queued.len() as u32);
            for d in &queued {
                put_delivery(&mut buf, d);
            }
        }
        buf.freeze()
    }

    /// Restores a snapshot into an empty broker; returns how many retained
    /// messages and sessions it held.
    pub fn restore(&self, bytes: Bytes) -> Result<(usize, usize), DecodeError> {
        let v1 = bytes.starts_with(MAGIC_V1);
        if !bytes.starts_with(MAGIC) && !v1 {
            return Err(bad("not a fieldmq broker snapshot (or another version)"));
        }
        let mut r = Reader::new(bytes.slice(MAGIC.len()..));
        let mut router = self.router();
        let retained = r.u32("count")? as usize;
        for _ in 0..retained {
            router.restore_retained(Arc::new(get_envelope(&mut r)?));
        }
        let sessions = r.u32("count")? as usize;
        let mut restored = Vec::new();
        for _ in 0..sessions {
            let client: Arc<str> = Arc::from(get_str(&mut r)?.as_str());
            let (owner, owner_unknown) = match v1 {
                true => (None, true),
                false => match r.u8("owner")? {
                    0 => (None, false),
                    1 => (Some(Arc::from(get_str(&mut r)?.as_str())), false),
                    _ => (None, true),
                },
            };
            let expiry = r.u32("expiry")?;
            let saved_at = r.u64("saved at")?;
            let mut state = SessionState::default();
            let mut entry = SessionEntry::new();
            for _ in 0..r.u32("count")? {
                let filter = get_str(&mut r)?;
                let o = r.u8("options")?;
                let id = r.u32("id")?;
                let options = SubscriptionOptions {
                    qos: qos(o & 3)?,
                    no_local: o & 4 != 0,
                    retain_as_published: o & 8 != 0,
                    retain_handling: (o >> 4) & 3,
                };
                let id = (id != NONE).then_some(id);
                state.subscriptions.insert(filter.clone(), (options, id));
                entry.subscriptions.insert(filter, (options, id));
            }
            for _ in 0..r.u32("count")? {
                let id = r.u16("packet id")?;
                let o = match r.u8("kind")? {
                    0 => Outgoing::Published(get_delivery(&mut r)?),
                    _ => Outgoing::Released,
                };
                state.outgoing.insert(id, o);
            }
            for _ in 0..r.u32("count")? {
                state.incoming_qos2.insert(r.u16("packet id")?);
            }
            state.last_id = r.u16("last id")?;
            for _ in 0..r.u32("count")? {
                // Saved within the bounds: all of it comes back.
                entry.mailbox.push(&client, get_delivery(&mut r)?, QueueLimits::NONE);
            }
            // The time the gateway was down counts against the expiry.
            let down = unix_now().saturating_sub(saved_at).min(u64::from(u32::MAX)) as u32;
            let left = if expiry == u32::MAX { expiry } else { expiry.saturating_sub(down) };
            if left == 0 {
                continue;
            }
            entry.expiry = left;
            (entry.owner, entry.owner_unknown) = (owner, owner_unknown);
            entry.went_offline();
            entry.generation = router.next_generation();
            entry.mailbox.hand_back_state(Box::new(state));
            restored.push((client, entry));
        }
        if !r.is_empty() {
            return Err(bad("bytes after the end of the snapshot"));
        }
        let count = restored.len();
        for (client, entry) in restored {
            let subscriptions: Vec<_> = entry.subscriptions.clone().into_iter().collect();
            let (expiry, generation) = (entry.expiry, entry.generation);
            router.sessions.insert(client.clone(), entry);
            for (filter, (options, id)) in subscriptions {
                router.subscribe(&client, &filter, options, id);
            }
            if expiry != u32::MAX {
                let broker = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(u64::from(expiry))).await;
                    broker.expire(&client, generation);
                });
            }
        }
        Ok((retained, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[tokio::test]
    async fn a_snapshot_restores_retained_messages_and_an_offline_session() {
        let broker = Broker::default();
        broker.publish(Message::new(TopicName::new("r/1").unwrap(), "kept").retained());
        // A persistent session with a subscription, released, then a QoS 1
        // message queued for it while it is away.
        let ops = Some(Arc::from("ops"));
        let mut claim = broker.claim(Arc::from("away"), false, 3600, ops.clone(), 0).await.unwrap().0;
        let options = SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() };
        broker.router().subscribe(&claim.client, "q/#", options, Some(4));
        claim.state.subscriptions.insert("q/#".into(), (options, Some(4)));
        claim.state.incoming_qos2.insert(77);
        broker.release(claim, super::super::Ending { will: None, session_expiry: 3600 });
        broker.publish(Message::new(TopicName::new("q/a").unwrap(), "queued"));

        let restored = Broker::default();
        assert_eq!(restored.restore(broker.snapshot()).unwrap(), (1, 1));
        let retained = restored.retained(&TopicName::new("r/1").unwrap()).unwrap();
        assert_eq!(retained.payload, "kept");
        let (claim, present) = restored.claim(Arc::from("away"), false, 3600, ops, 0).await.unwrap();
        assert!(present, "its owner resumes it after a restart");
        assert!(claim.state.incoming_qos2.contains(&77));
        let queued = claim.mailbox.pop().unwrap();
        assert_eq!(
            (queued.envelope.payload.as_ref(), queued.subscription_ids.as_slice()),
            (&b"queued"[..], &[4][..])
        );
        // The subscription is live again: new messages reach the session.
        restored.publish(Message::new(TopicName::new("q/b").unwrap(), "new"));
        assert_eq!(claim.mailbox.pop().unwrap().envelope.payload, "new");
    }

    #[tokio::test]
    async fn another_users_session_is_neither_taken_over_nor_resumed() {
        let broker = Broker::default();
        let (ops, eve) = (Some(Arc::from("ops")), Some(Arc::from("eve")));
        let mut held = broker.claim(Arc::from("dash"), false, 3600, ops.clone(), 0).await.unwrap().0;
        held.state.incoming_qos2.insert(9);
        // Held by ops's connection: eve (or an anonymous client) may not kick it.
        assert!(broker.claim(Arc::from("dash"), false, 3600, eve.clone(), 0).await.is_err());
        assert!(broker.claim(Arc::from("dash"), false, 3600, None, 0).await.is_err());
        assert!(!held.taken_over());
        broker.release(held, super::super::Ending { will: None, session_expiry: 3600 });
        // Left by ops: eve gets a fresh session, not ops's state.
        let (fresh, present) = broker.claim(Arc::from("dash"), false, 3600, eve, 0).await.unwrap();
        assert!(!present && fresh.state.incoming_qos2.is_empty());
    }

    #[tokio::test]
    async fn a_connected_clean_session_is_not_saved_and_a_takeover_of_it_starts_fresh() {
        let broker = Broker::default();
        let clean = broker.claim(Arc::from("clean"), true, 0, None, 0).await.unwrap().0;
        broker.router().subscribe(&clean.client, "t/#", SubscriptionOptions::default(), None);
        // Saved while connected: a session ending with its connection is not kept.
        assert_eq!(Broker::default().restore(broker.snapshot()).unwrap(), (0, 0));
        // A half-open clean connection taken over by a client asking to
        // resume: there is no session to resume (review finding).
        let takeover = broker.clone();
        let new =
            tokio::spawn(
                async move { takeover.claim(Arc::from("clean"), false, 3600, None, 0).await.unwrap() },
            );
        broker.release(clean, super::super::Ending { will: None, session_expiry: 0 });
        let (new, present) = new.await.unwrap();
        assert!(!present);
        assert!(new.state.subscriptions.is_empty());
    }

    #[test]
    fn a_foreign_or_truncated_file_is_refused() {
        let broker = Broker::default();
        assert!(broker.restore(Bytes::from_static(b"SQLite format 3")).is_err());
        let mut snapshot = Broker::default().snapshot().to_vec();
        snapshot.extend_from_slice(b"junk");
        assert!(broker.restore(Bytes::from(snapshot)).is_err());
    }
}
