//! The local MQTT broker: the engine behind the LAN listener and the
//! in-process entry point for readings.
//!
//! [`Broker`] is a cheap handle shared by the gateway (which publishes
//! readings and subscribes in-process, no TCP hop) and by every client
//! connection. Its parts:
//!
//! - `router.rs`: sessions, subscriptions, retained messages; routing.
//! - `subscriptions.rs`: the topic trie.
//! - `session.rs`: per-client mailbox and session state.
//! - `client.rs`: one network client's protocol.
//! - `serve.rs`: the task of one connection, from CONNECT to close.
//! - `claims.rs`: a session's life: claim, release, will, expiry.
//! - `stats.rs`: the `$SYS` counters and topics.
//!
//! Session life cycle: a connection *claims* its client id's session
//! (kicking a connection that holds it, MQTT-3.1.4-3), owns it while
//! connected, and *releases* it when it ends. A released session lives on
//! for its expiry interval (MQTT 5) or forever (3.1.1 without clean
//! session), collecting QoS 1/2 messages in its bounded mailbox; its will
//! is published after the will delay unless the client comes back first.

mod claims;
mod client;
mod connect;
mod keepalive;
mod mailbox;
mod parking;
mod persist;
mod router;
mod serve;
mod session;
#[cfg(test)]
mod socket_tests;
mod stats;
mod subscriptions;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

pub use claims::ClaimRefused;
use keepalive::KeepAlives;
pub use mailbox::{Mailbox, QueueLimits};
pub use parking::Parkable;
use parking::ParkingLot;
use router::Router;
pub use serve::{serve_client, Origin};
pub use session::{Delivery, Envelope, SessionState};
pub use stats::{publish_sys, sys_values};

use crate::access::{Access, LoginGuard};
use crate::buffer::{Buffer, Offer};
use crate::packet::{Properties, Will};
use crate::{Message, Subscription, TopicFilter, TopicName};

/// Limits and advertised capabilities of the broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// The largest packet accepted (and advertised in MQTT 5), in bytes.
    pub max_packet_size: usize,
    /// How many QoS 1/2 messages a client may have in flight to us.
    pub receive_maximum: u16,
    /// How many QoS 1/2 messages we keep in flight to a 3.1.1 client.
    pub max_inflight: u16,
    /// How many messages wait per client before new ones are dropped.
    pub max_queued: usize,
    /// How many topic and payload bytes wait per client, likewise.
    pub max_queued_bytes: usize,
    /// How many topic aliases a client may use towards us.
    pub topic_alias_maximum: u16,
    /// How long a new connection may take to send CONNECT.
    pub connect_timeout: Duration,
    /// Browser origins WebSocket listeners accept (`Origin` header); empty:
    /// any.
    pub ws_origins: Vec<String>,
    /// Clients asking for a longer keep alive (or none) get this one
    /// (MQTT 5 Server Keep Alive); 0: accept what the client asks.
    pub max_keep_alive: u16,
}

impl BrokerSettings {
    /// What may wait for one client.
    pub fn queue_limits(&self) -> QueueLimits {
        QueueLimits { messages: self.max_queued, bytes: self.max_queued_bytes }
    }
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            max_packet_size: 1 << 20,
            receive_maximum: 1024,
            max_inflight: 64,
            max_queued: 10_000,
            max_queued_bytes: 16 << 20,
            topic_alias_maximum: 64,
            connect_timeout: Duration::from_secs(10),
            max_keep_alive: 0,
            ws_origins: Vec::new(),
        }
    }
}

/// A handle on the broker; clones share it.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

struct Shared {
    router: Mutex<Router>,
    settings: BrokerSettings,
    shutdown: CancellationToken,
    /// Bumped by every change worth a snapshot.
    changes: AtomicU64,
    /// Where messages bound upstream become durable, when there is an upstream.
    buffer: RwLock<Option<Buffer>>,
    /// The keep-alive deadlines of the connections.
    keepalives: Arc<KeepAlives>,
    /// Who may connect and do what; replaced whole on reload.
    access: RwLock<Arc<Access>>,
    /// Whether `access` has an ACL: without one, publishes and deliveries
    /// skip the lock and the check.
    restricted: std::sync::atomic::AtomicBool,
    /// Bumped by every change of `access`.
    access_epoch: AtomicU64,
    /// Failed logins per address.
    guard: LoginGuard,
    /// Counters for `$SYS`.
    stats: stats::BrokerStats,
    /// Where idle connections wait (made at the first; `None` when it
    /// could not be).
    parking: OnceLock<Option<Arc<ParkingLot>>>,
    /// Signalled when a connection that was taken over hands its session
    /// state back.
    released: Notify,
}

/// A claimed session, owned by one connection until released. It lives in
/// every connected client: kept to 40 bytes.
pub struct Claim {
    /// The client id.
    pub client: Arc<str>,
    /// The session state, this connection's until it releases the claim.
    pub state: Box<SessionState>,
    /// Its mailbox, which also says when another connection takes the
    /// session over (see [`Claim::taken_over`]).
    pub mailbox: Arc<Mailbox>,
    generation: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // The state goes back to the session when the claim ends: at
        // `release`, or when a task that panicked drops it (the session
        // could never be claimed again otherwise).
        self.mailbox.hand_back_state(std::mem::take(&mut self.state));
    }
}

impl Claim {
    /// Whether another connection claimed the session since this claim.
    pub fn taken_over(&self) -> bool {
        self.mailbox.taken_over(self.generation)
    }
}

/// How a connection ended, for its will and its session.
pub struct Ending {
    /// The will to publish, unless the client said DISCONNECT 0x00.
    pub will: Option<Box<Will>>,
    /// Session expiry in seconds (`u32::MAX`: never).
    pub session_expiry: u32,
}

impl Default for Broker {
    fn default() -> Self {
        Broker::new(BrokerSettings::default())
    }
}

impl Broker {
    /// A broker with these settings.
    pub fn new(settings: BrokerSettings) -> Self {
        Broker {
            shared: Arc::new(Shared {
                router: Mutex::new(Router::with_limits(settings.queue_limits())),
                settings,
                shutdown: CancellationToken::new(),
                changes: AtomicU64::new(0),
                buffer: RwLock::new(None),
                keepalives: Arc::new(KeepAlives::new()),
                access: RwLock::new(Arc::new(Access::default())),
                restricted: std::sync::atomic::AtomicBool::new(false),
                access_epoch: AtomicU64::new(0),
                guard: LoginGuard::default(),
                stats: stats::BrokerStats::default(),
                parking: OnceLock::new(),
                released: Notify::new(),
            }),
        }
    }

    /// Its settings.
    pub fn settings(&self) -> &BrokerSettings {
        &self.shared.settings
    }

    /// Who may connect and do what, now.
    pub fn access(&self) -> Arc<Access> {
        self.shared.access.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the access rules (a reload): connected clients keep their
    /// session and meet the new rules at their next packet.
    /// Users whose password the new file removes or changes are
    /// disconnected (DISCONNECT 0x87 in MQTT 5); their sessions stay.
    /// Anonymous clients are disconnected likewise when anonymity is no
    /// longer allowed.
    pub fn set_access(&self, access: Access) {
        let restricted = access.acl().is_some();
        let old = self.access();
        let revoked = old.passwords().map(|old| old.revoked_by(access.passwords())).unwrap_or_default();
        let anonymous_revoked = old.allow_anonymous() && !access.allow_anonymous();
        // Under the router lock, with the epoch: a login checked against
        // the old rules cannot claim its session unseen by the pass below
        // (`claim` compares the epoch under the same lock).
        let router = self.router();
        *self.shared.access.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(access);
        self.shared.access_epoch.fetch_add(1, Ordering::AcqRel);
        self.shared.restricted.store(restricted, Ordering::Release);
        for entry in router.sessions.values().filter(|e| e.held) {
            let gone = match entry.owner.as_deref() {
                Some(owner) => revoked.iter().any(|r| r == owner),
                None => anonymous_revoked,
            };
            if gone {
                entry.mailbox.revoke();
            }
        }
    }

    /// Changes with every [`set_access`](Self::set_access).
    pub(crate) fn access_epoch(&self) -> u64 {
        self.shared.access_epoch.load(Ordering::Acquire)
    }

    /// The access rules when an ACL restricts clients; `None` when every
    /// client may read and write everything (but `$SYS`).
    pub(crate) fn acl_access(&self) -> Option<Arc<Access>> {
        self.shared.restricted.load(Ordering::Acquire).then(|| self.access())
    }

    /// Cancelled when the broker stops: connections close.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Closes every connection (DISCONNECT 0x8B in MQTT 5).
    pub fn shut_down(&self) {
        // Cancelled first: a connection that claims its session after the
        // wake-up below finds the token cancelled when it first looks.
        self.shared.shutdown.cancel();
        // Connections wait on their mailbox, not on the token (a future
        // per connection for an event that happens once).
        for entry in self.router().sessions.values() {
            entry.mailbox.wake();
        }
    }

    /// The parking lot of idle connections; made on first use, from a task.
    fn parking(&self) -> Option<&Arc<ParkingLot>> {
        let lot = self.shared.parking.get_or_init(|| match ParkingLot::start(self) {
            Ok(lot) => Some(lot),
            Err(e) => {
                tracing::warn!(error = %e, "cannot park idle connections: each stays a task");
                None
            }
        });
        lot.as_ref()
    }

    /// How many idle connections are parked.
    pub fn parked_connections(&self) -> usize {
        self.shared.parking.get().and_then(Option::as_ref).map_or(0, |lot| lot.parked())
    }

    /// Waits, once the broker is shutting down, until every parked
    /// connection was resumed and ended.
    pub async fn parked_connections_ended(&self) {
        if let Some(Some(lot)) = self.shared.parking.get() {
            lot.drained().await;
        }
    }

    /// Whether [`shut_down`](Self::shut_down) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    fn router(&self) -> MutexGuard<'_, Router> {
        // Router updates are single map operations between awaits; a panic
        // elsewhere leaves them whole, so poisoning is ignored.
        self.shared.router.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes in-process (a reading): routed like a client's publish.
    pub fn publish(&self, message: Message) {
        self.route(Envelope {
            topic: message.topic,
            payload: message.payload,
            qos: message.qos,
            retain: message.retain,
            properties: Properties::default(),
            expires_at: None,
            publisher: None,
        });
    }

    /// Routes an envelope (and offers it to the buffer when an upstream
    /// takes its topic); how many clients it was queued for.
    pub fn route(&self, envelope: Envelope) -> usize {
        self.route_forwarded(envelope).0
    }

    /// Routes an envelope and offers it to the buffer; also says what the
    /// buffer did with it, so a publisher's acknowledgement can wait for
    /// the commit.
    pub fn route_forwarded(&self, envelope: Envelope) -> (usize, Offer) {
        let offer = match &*self.shared.buffer.read().unwrap_or_else(|p| p.into_inner()) {
            Some(buffer) => buffer.offer(&envelope.topic, &envelope.payload, envelope.retain),
            None => Offer::NotForwarded,
        };
        (self.route_from_upstream(envelope), offer)
    }

    /// Routes an envelope to local subscribers only: for what an upstream
    /// sent down, which must not be forwarded back up.
    pub fn route_from_upstream(&self, envelope: Envelope) -> usize {
        // `$SYS` is not saved: publishing it must not make a snapshot due.
        let worth_saving = !envelope.topic.is_sys();
        let retain = envelope.retain;
        let delivered = self.router().route(Arc::new(envelope));
        if worth_saving && (retain || delivered > 0) {
            self.touch();
        }
        delivered
    }

    /// Sets (or removes) the buffer messages bound upstream go to.
    pub fn set_buffer(&self, buffer: Option<Buffer>) {
        *self.shared.buffer.write().unwrap_or_else(|p| p.into_inner()) = buffer;
    }

    /// The buffer messages bound upstream go to, if any.
    pub fn buffer(&self) -> Option<Buffer> {
        self.shared.buffer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Notes a change worth saving.
    pub(crate) fn touch(&self) {
        self.shared.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// A number that changes whenever the state worth saving changes.
    pub fn changes(&self) -> u64 {
        self.shared.changes.load(Ordering::Relaxed)
    }

    /// Subscribes in-process with a queue of `capacity` messages; the
    /// retained messages it matches come first.
    pub fn subscribe(&self, filter: TopicFilter, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.router().subscribe_internal(filter, tx, true);
        Subscription::new(rx)
    }

    /// Subscribes in-process to what is published from now on, without the
    /// retained messages: for commands, where an old retained value must not
    /// be acted on again at every start.
    pub fn subscribe_live(&self, filter: TopicFilter, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.router().subscribe_internal(filter, tx, false);
        Subscription::new(rx)
    }

    /// The retained message on `topic`, if any.
    pub fn retained(&self, topic: &TopicName) -> Option<Message> {
        self.router().retained(topic).map(|e| Message {
            topic: e.topic.clone(),
            payload: e.payload.clone(),
            qos: e.qos,
            retain: true,
        })
    }

    /// How many sessions, connected clients, retained messages and subscriptions exist.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let router = self.router();
        let online = router.sessions.values().filter(|e| e.mailbox.is_online()).count();
        let (retained, subscriptions) = router.counts();
        (router.sessions.len(), online, retained, subscriptions)
    }
}

/// The properties a publish carries on to subscribers (MQTT-3.3.2-*):
/// payload format, content type, response topic, correlation data and user
/// properties; not the alias, the expiry (recomputed) or subscription ids.
pub fn forwarded(p: Properties) -> Properties {
    Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        ..Properties::default()
    }
}
