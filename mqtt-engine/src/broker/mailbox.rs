//! Where routing leaves a client's deliveries, and how its connection is
//! woken: the [`Mailbox`].
//!
//! It is a short lock, never held across an await, so publishing never
//! waits on a client. Besides mail it carries what the connection must
//! notice while it waits: a takeover, the broker stopping, a revocation,
//! its keep alive expiring. And it keeps the session's state while no
//! connection holds it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::parking::ParkingLot;
use super::session::{Delivery, SessionState};
use crate::QoS;

/// Where routing leaves deliveries for a client, bounded.
///
/// It also wakes the connection that owns the session: for new mail, a
/// takeover, and when the broker stops. The connection polls it (no future
/// per wait), so an idle connection's task stays small.
#[derive(Debug)]
pub struct Mailbox {
    inner: Mutex<Inner>,
    /// Every session has one: 32-bit counters keep it a size class smaller.
    dropped: AtomicU32,
    online: AtomicBool,
    /// The connection's user lost its password (a reload): it must go.
    revoked: AtomicBool,
    /// The parking lot asks whether the connection did anything since it
    /// last looked (see `parking.rs`).
    park_requested: AtomicBool,
    /// The generation of the latest claim of the session: a connection
    /// with an older one was taken over.
    holder: AtomicU64,
    /// The keep-alive deadline of the connection that owns the session, in
    /// `KeepAlives`' milliseconds, or `GONE` or `EXPIRED`.
    keepalive: AtomicU64,
}

/// No deadline: no connection, or one without keep alive.
const GONE: u64 = u64::MAX;
/// The deadline passed before the connection moved it.
const EXPIRED: u64 = 0;

/// What the keep-alive watcher finds in a mailbox.
pub(crate) enum KeepAliveCheck {
    /// The deadline moved on to this one.
    Later(u64),
    /// It passed: now marked expired; the connection is to be woken.
    Expired,
    /// No connection to watch any more.
    Gone,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Delivery>,
    /// The owning connection, while it waits.
    waiter: Waiter,
    /// Something happened since the connection last looked: like
    /// `Notify::notify_one`, a signal without a waiter is kept for it.
    signalled: bool,
    /// Topic and payload bytes of what waits (saturating).
    bytes: u32,
    /// The session state, while no connection holds it: a claim takes it
    /// and hands it back when released, or when dropped unreleased.
    state: Option<Box<SessionState>>,
}

/// How much may wait in one client's mailbox; the broker's settings,
/// passed at each push rather than kept in every mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Deliveries.
    pub messages: usize,
    /// Topic and payload bytes.
    pub bytes: usize,
}

impl QueueLimits {
    /// No bound: for restoring what was saved within the bounds.
    pub const NONE: QueueLimits = QueueLimits { messages: usize::MAX, bytes: usize::MAX };
}

/// What a delivery counts against [`QueueLimits::bytes`]: topic, payload,
/// and the MQTT 5 properties it carries on (user properties can make a
/// one-byte message a megabyte).
fn weight(delivery: &Delivery) -> u32 {
    let envelope = &delivery.envelope;
    let p = &envelope.properties;
    let properties = p.user_properties.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + p.correlation_data.as_ref().map_or(0, |d| d.len())
        + p.response_topic.as_ref().map_or(0, String::len)
        + p.content_type.as_ref().map_or(0, String::len);
    u32::try_from(envelope.payload.len() + envelope.topic.as_str().len() + properties).unwrap_or(u32::MAX)
}

/// Who waits on a mailbox.
#[derive(Default)]
enum Waiter {
    #[default]
    Nobody,
    /// The connection's task.
    Task(Waker),
    /// The connection, parked in a lot under a token.
    Parked(Arc<ParkingLot>, u64),
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waiter::Nobody => f.write_str("Nobody"),
            Waiter::Task(_) => f.write_str("Task"),
            Waiter::Parked(_, token) => write!(f, "Parked({token:#x})"),
        }
    }
}

impl Waiter {
    /// Wakes the connection; called once the mailbox's lock is gone (a
    /// parked connection's lot takes its own lock).
    fn wake(self) {
        match self {
            Waiter::Nobody => {}
            Waiter::Task(waker) => waker.wake(),
            Waiter::Parked(lot, token) => lot.unpark(token),
        }
    }
}

impl Inner {
    /// Marks the mailbox signalled; the waiter to wake once the lock is gone.
    fn signal(&mut self) -> Waiter {
        self.signalled = true;
        std::mem::take(&mut self.waiter)
    }
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox::new()
    }
}

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> Self {
        Mailbox {
            inner: Mutex::new(Inner { state: Some(Box::default()), ..Inner::default() }),
            dropped: AtomicU32::new(0),
            online: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            park_requested: AtomicBool::new(false),
            holder: AtomicU64::new(0),
            keepalive: AtomicU64::new(GONE),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is one push or pop: a poisoned queue is still whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a delivery. A full mailbox (by count or by bytes) drops it,
    /// counted and logged (first drop, then every thousandth), and returns
    /// false.
    pub fn push(&self, client: &str, delivery: Delivery, limits: QueueLimits) -> bool {
        let mut inner = self.lock();
        let size = weight(&delivery);
        let bytes = inner.bytes as usize + size as usize;
        if inner.queue.len() >= limits.messages || (bytes > limits.bytes && !inner.queue.is_empty()) {
            let (queued, queued_bytes) = (inner.queue.len(), inner.bytes);
            drop(inner);
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if dropped == 1 || dropped % 1000 == 0 {
                tracing::warn!(client, dropped, queued, queued_bytes, "client queue full: message dropped");
            }
            return false;
        }
        inner.bytes = inner.bytes.saturating_add(size);
        inner.queue.push_back(delivery);
        let waiter = inner.signal();
        drop(inner);
        waiter.wake();
        true
    }

    /// Wakes the owning connection without mail: it then looks at what
    /// else may have changed (a takeover, the broker stopping).
    pub fn wake(&self) {
        let waiter = self.lock().signal();
        waiter.wake();
    }

    /// Makes the claim `generation` the session's holder, and wakes the
    /// connection it takes the session from.
    pub fn take_over(&self, generation: u64) {
        // The parking lot's question was for the connection before.
        self.park_requested.store(false, Ordering::Release);
        // Stored before the wake-up: a woken connection sees it.
        self.holder.store(generation, Ordering::Release);
        self.wake();
    }

    /// Whether a claim later than `generation` took the session over.
    pub fn taken_over(&self, generation: u64) -> bool {
        self.holder.load(Ordering::Acquire) > generation
    }

    /// Takes the session state, unless a connection holds it.
    pub fn take_state(&self) -> Option<Box<SessionState>> {
        self.lock().state.take()
    }

    /// Gives the session state back (a connection's claim ends).
    pub fn hand_back_state(&self, state: Box<SessionState>) {
        self.lock().state = Some(state);
    }

    /// Looks at the session state; `None` while a connection holds it.
    pub fn with_state<R>(&self, look: impl FnOnce(Option<&SessionState>) -> R) -> R {
        look(self.lock().state.as_deref())
    }

    /// Puts a delivery back at the front (it could not be sent yet).
    pub fn unpop(&self, delivery: Delivery) {
        let mut inner = self.lock();
        inner.bytes = inner.bytes.saturating_add(weight(&delivery));
        inner.queue.push_front(delivery);
    }

    /// The next delivery.
    pub fn pop(&self) -> Option<Delivery> {
        let mut inner = self.lock();
        let delivery = inner.queue.pop_front()?;
        inner.bytes = inner.bytes.saturating_sub(weight(&delivery));
        Some(delivery)
    }

    /// A copy of what waits, for a snapshot.
    pub fn snapshot(&self) -> Vec<Delivery> {
        self.lock().queue.iter().cloned().collect()
    }

    /// Drops the QoS 0 deliveries still waiting: they were for a connection
    /// that is gone, and QoS 0 is not kept for an absent client.
    pub fn drop_qos0(&self) {
        let mut inner = self.lock();
        inner.queue.retain(|d| d.qos != QoS::AtMostOnce);
        inner.bytes = inner.queue.iter().fold(0u32, |sum, d| sum.saturating_add(weight(d)));
    }

    /// Empties the mailbox.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.queue.clear();
        inner.bytes = 0;
    }

    /// Ready once something was pushed (or [`wake`](Self::wake) was
    /// called) since the last time it was ready; otherwise `cx` is woken
    /// then. One waiter at a time: the connection that owns the session.
    pub fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.lock();
        if std::mem::take(&mut inner.signalled) {
            return Poll::Ready(());
        }
        match &mut inner.waiter {
            Waiter::Task(waker) => waker.clone_from(cx.waker()),
            waiter => *waiter = Waiter::Task(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Makes the parked connection `token` of `lot` the one to wake; false
    /// (nothing changed) when a signal came since the connection last
    /// looked: it must run, not park.
    pub(super) fn park(&self, lot: &Arc<ParkingLot>, token: u64) -> bool {
        let mut inner = self.lock();
        if inner.signalled {
            return false;
        }
        inner.waiter = Waiter::Parked(lot.clone(), token);
        true
    }

    /// The connection parked as `token` runs again (woken by its socket):
    /// it waits as a task from now on.
    pub(super) fn unparked(&self, token: u64) {
        let mut inner = self.lock();
        if matches!(inner.waiter, Waiter::Parked(_, t) if t == token) {
            inner.waiter = Waiter::Nobody;
        }
    }

    /// Asks the connection whether it did anything since it was last asked
    /// (it parks if not), and wakes it to answer.
    pub(super) fn request_park(&self) {
        self.park_requested.store(true, Ordering::Release);
        self.wake();
    }

    /// Whether [`request_park`](Self::request_park) was called since the
    /// last time this said so.
    pub(super) fn take_park_request(&self) -> bool {
        self.park_requested.swap(false, Ordering::AcqRel)
    }

    /// The connection that owned the session ends: its waker goes (a stale
    /// one would keep the finished task's memory as long as the session
    /// lives), and so does its keep-alive deadline.
    pub fn disconnected(&self) {
        self.keepalive.store(GONE, Ordering::Release);
        let waiter = std::mem::take(&mut self.lock().waiter);
        drop(waiter);
    }

    /// Sets the first keep-alive deadline of a new connection.
    pub(crate) fn start_keepalive(&self, deadline: u64) {
        self.keepalive.store(deadline, Ordering::Release);
    }

    /// Moves the keep-alive deadline on, at a packet; false when it had
    /// expired already (the connection is closing for it).
    pub(crate) fn set_keepalive_deadline(&self, deadline: u64) -> bool {
        let moved = |d| (d != EXPIRED).then_some(deadline);
        self.keepalive.fetch_update(Ordering::AcqRel, Ordering::Acquire, moved).is_ok()
    }

    /// Whether the keep-alive deadline passed.
    pub(crate) fn keepalive_expired(&self) -> bool {
        self.keepalive.load(Ordering::Acquire) == EXPIRED
    }

    /// The keep-alive deadline, while there is one.
    pub(crate) fn keepalive_deadline(&self) -> Option<u64> {
        let deadline = self.keepalive.load(Ordering::Acquire);
        (deadline != GONE && deadline != EXPIRED).then_some(deadline)
    }

    /// For the keep-alive watcher at `now`: marks the deadline expired if it
    /// passed, unless the connection moves it at the same moment.
    pub(crate) fn check_keepalive(&self, now: u64) -> KeepAliveCheck {
        let mut deadline = self.keepalive.load(Ordering::Acquire);
        loop {
            if deadline == GONE || deadline == EXPIRED {
                return KeepAliveCheck::Gone;
            }
            if deadline > now {
                return KeepAliveCheck::Later(deadline);
            }
            match self.keepalive.compare_exchange(deadline, EXPIRED, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return KeepAliveCheck::Expired,
                Err(moved) => deadline = moved,
            }
        }
    }

    /// Waits until something is pushed.
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| self.poll_notified(cx)).await
    }

    /// How many messages were dropped because the mailbox was full.
    pub fn dropped(&self) -> u64 {
        u64::from(self.dropped.load(Ordering::Relaxed))
    }

    /// How many deliveries wait.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether no delivery waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a connection currently owns the session: QoS 0 messages are
    /// only queued for online clients.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Marks the session online or offline.
    pub fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Release)
    }

    /// A new connection claimed the session with fresh credentials.
    pub(crate) fn clear_revoked(&self) {
        self.revoked.store(false, Ordering::Release);
    }

    /// Tells the owning connection its credentials are no longer valid.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        self.wake();
    }

    /// Whether [`revoke`](Self::revoke) was called since the claim.
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::broker::session::Envelope;
    use crate::packet::Properties;
    use crate::TopicName;

    fn delivery() -> Delivery {
        Delivery {
            envelope: Arc::new(Envelope {
                topic: TopicName::new("t").unwrap(),
                payload: Bytes::from_static(b"x"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
                expires_at: None,
                publisher: None,
            }),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![],
        }
    }

    const ROOMY: QueueLimits = QueueLimits { messages: 10, bytes: 1 << 20 };

    #[test]
    fn a_full_mailbox_drops_and_counts() {
        let two = QueueLimits { messages: 2, ..ROOMY };
        let m = Mailbox::new();
        assert!(m.push("c", delivery(), two));
        assert!(m.push("c", delivery(), two));
        assert!(!m.push("c", delivery(), two));
        assert_eq!((m.len(), m.dropped()), (2, 1));
    }

    #[test]
    fn a_mailbox_is_full_by_bytes_too_but_takes_one_message_however_large() {
        let size = weight(&delivery()) as usize;
        let small = QueueLimits { messages: 100, bytes: size * 2 };
        let m = Mailbox::new();
        assert!(m.push("c", delivery(), small));
        assert!(m.push("c", delivery(), small));
        assert!(!m.push("c", delivery(), small), "a third would pass the byte bound");
        assert!(m.pop().is_some());
        assert!(m.push("c", delivery(), small), "popping gave the bytes back");
        m.clear();
        let tiny = QueueLimits { messages: 100, bytes: 1 };
        assert!(m.push("c", delivery(), tiny), "an empty mailbox takes any one message");
        assert!(!m.push("c", delivery(), tiny));
    }

    #[test]
    fn going_away_drops_waiting_qos0_but_keeps_qos1() {
        let m = Mailbox::new();
        m.push("c", delivery(), ROOMY);
        m.push("c", Delivery { qos: QoS::AtMostOnce, ..delivery() }, ROOMY);
        m.drop_qos0();
        assert_eq!(m.len(), 1);
        assert_eq!(m.pop().unwrap().qos, QoS::AtLeastOnce);
    }

    #[test]
    fn a_signal_without_a_waiting_connection_is_kept_for_it_once() {
        let m = Mailbox::new();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(m.poll_notified(&mut cx).is_pending());
        m.push("c", delivery(), ROOMY);
        m.push("c", delivery(), ROOMY);
        assert!(m.poll_notified(&mut cx).is_ready());
        assert!(m.poll_notified(&mut cx).is_pending(), "one permit, as with Notify");
        m.wake();
        assert!(m.poll_notified(&mut cx).is_ready());
    }

    #[test]
    fn a_takeover_concerns_older_claims_only() {
        let m = Mailbox::new();
        m.take_over(5);
        assert!(m.taken_over(4));
        assert!(!m.taken_over(5));
    }
}
