//! The broker's shared state and the routing of one message.
//!
//! One lock guards it, held only for in-memory work: matching a topic,
//! pushing into mailboxes, updating the retained store, and the session
//! table. A message is delivered once per client at the highest QoS of its
//! matching subscriptions (MQTT-3.3.5-1), carrying the identifiers of all
//! of them; each share group gets it once, at a member chosen in turn,
//! preferring members that are online.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::mailbox::{Mailbox, QueueLimits};
use super::session::{Delivery, Envelope, SessionState};
use super::subscriptions::{Subscriber, SubscriptionTree};
use crate::packet::SubscriptionOptions;
use crate::{Message, QoS, TopicError, TopicFilter, TopicName};

/// A session as the router knows it.
pub struct SessionEntry {
    /// Where deliveries wait; it keeps the session state too, while no
    /// connection holds it (see `claims.rs`).
    pub mailbox: Arc<Mailbox>,
    /// Whether a connection holds the session (claimed, not released).
    pub held: bool,
    /// Changes whenever a connection claims the session, so timers and a
    /// connection that was taken over know they are stale.
    pub generation: u64,
    /// A claim decided the session is not resumed (a clean start, a clean
    /// session taken over, another user's session): the claim that takes
    /// the state discards it, even when a newer claim superseded the one
    /// that decided. Meanwhile the holder's will goes at once.
    pub discard: bool,
    /// The session's subscriptions (as subscribed, `$share/...` included),
    /// kept here too so a snapshot can save them while a connection owns
    /// the session state. A B-tree: nothing allocated while empty, and
    /// half the size of a hash map in every session entry.
    pub subscriptions: BTreeMap<String, (SubscriptionOptions, Option<u32>)>,
    /// Session expiry in seconds (`u32::MAX`: never), once released.
    pub expiry: u32,
    /// When the session was released, while it is offline.
    /// In seconds since the Unix epoch: 8 bytes where a `SystemTime` takes 16.
    pub offline_since: Option<std::num::NonZeroU64>,
    /// A will waiting for its delay; published by the will timer or, if the
    /// session ends first, by its expiry (MQTT-3.1.3-9).
    pub pending_will: Option<Box<crate::packet::Will>>,
    /// The user whose session it is (`None`: anonymous). Another user may
    /// not resume it: its queued and in-flight messages were checked
    /// against this user's rights.
    pub owner: Option<Arc<str>>,
    /// Restored from a snapshot that did not record the owner: the first
    /// client to claim it becomes the owner.
    pub owner_unknown: bool,
}

impl SessionEntry {
    /// A new, empty entry, boxed as the table keeps it.
    pub fn new() -> Box<Self> {
        Box::new(SessionEntry {
            mailbox: Arc::new(Mailbox::new()),
            held: false,
            generation: 0,
            discard: false,
            subscriptions: BTreeMap::new(),
            expiry: 0,
            offline_since: None,
            pending_will: None,
            owner: None,
            owner_unknown: false,
        })
    }

    /// Marks the session offline from now.
    pub fn went_offline(&mut self) {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.offline_since = std::num::NonZeroU64::new(now.max(1));
    }
}

/// An in-process subscriber (the gateway's own consumers).
struct InternalSubscriber {
    filter: TopicFilter,
    tx: mpsc::Sender<Message>,
    dropped: u64,
}

/// A filter as subscribed: plain, or `$share/{group}/{filter}`.
pub struct ParsedFilter<'a> {
    /// The filter proper.
    pub filter: &'a str,
    /// The share group.
    pub group: Option<&'a str>,
}

/// Splits and checks a subscription's filter.
pub fn parse_filter(raw: &str) -> Result<ParsedFilter<'_>, TopicError> {
    let parsed = match raw.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest.split_once('/').ok_or(TopicError::Empty)?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(TopicError::MisplacedSingleLevel);
            }
            ParsedFilter { filter, group: Some(group) }
        }
        None => ParsedFilter { filter: raw, group: None },
    };
    TopicFilter::new(parsed.filter)?;
    Ok(parsed)
}

/// The routing state.
pub struct Router {
    /// Every session, by client id. Boxed: the table has up to twice as
    /// many buckets as sessions, and a bucket is then 24 bytes, not 112.
    pub sessions: HashMap<Arc<str>, Box<SessionEntry>>,
    subscriptions: SubscriptionTree,
    retained: BTreeMap<TopicName, Arc<Envelope>>,
    internal: Vec<InternalSubscriber>,
    next_generation: u64,
    share_cursor: usize,
    /// Deliveries dropped at a full client queue, for `$SYS`.
    dropped: std::cell::Cell<u64>,
    /// How much may wait for one client.
    limits: QueueLimits,
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Router {
            sessions: HashMap::new(),
            subscriptions: SubscriptionTree::default(),
            retained: BTreeMap::new(),
            internal: Vec::new(),
            next_generation: 1,
            share_cursor: 0,
            dropped: std::cell::Cell::new(0),
            limits: QueueLimits { messages: 10_000, bytes: 16 << 20 },
        }
    }

    /// An empty router whose clients' mailboxes hold what `limits` allow.
    pub fn with_limits(limits: QueueLimits) -> Self {
        Router { limits, ..Router::new() }
    }

    /// Counts a delivery dropped at a full queue outside routing.
    pub fn count_drop(&self) {
        self.dropped.set(self.dropped.get() + 1);
    }

    /// Deliveries dropped so far because a client's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// A fresh generation number for a claim.
    pub fn next_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Routes one message; returns how many clients it was queued for.
    pub fn route(&mut self, envelope: Arc<Envelope>) -> usize {
        if envelope.retain {
            // MQTT-3.3.1-10/-11: an empty retained payload clears the topic.
            if envelope.payload.is_empty() {
                self.retained.remove(&envelope.topic);
            } else {
                self.retained.insert(envelope.topic.clone(), envelope.clone());
            }
        }
        let mut per_client: HashMap<Arc<str>, (QoS, bool, Vec<u32>)> = HashMap::new();
        let mut groups: HashMap<(usize, Arc<str>), Vec<Subscriber>> = HashMap::new();
        self.subscriptions.for_each_match(envelope.topic.as_str(), |s, key| {
            if let Some(group) = &s.group {
                groups.entry((key, group.clone())).or_default().push(s.clone());
                return;
            }
            // MQTT-3.8.3-3: no-local.
            if s.options.no_local && envelope.publisher.as_deref() == Some(&*s.client) {
                return;
            }
            let entry = per_client.entry(s.client.clone()).or_insert((QoS::AtMostOnce, false, Vec::new()));
            entry.0 = entry.0.max(s.options.qos);
            entry.1 |= s.options.retain_as_published;
            entry.2.extend(s.id);
        });
        let mut delivered = 0;
        for (client, (qos, retain_as_published, ids)) in per_client {
            delivered += usize::from(self.deliver(&client, &envelope, qos, retain_as_published, ids));
        }
        for members in groups.into_values() {
            self.share_cursor = self.share_cursor.wrapping_add(1);
            let start = self.share_cursor % members.len();
            let online = |s: &Subscriber| self.sessions.get(&s.client).is_some_and(|e| e.mailbox.is_online());
            let rotated = members.iter().cycle().skip(start).take(members.len());
            let chosen = rotated.clone().find(|s| online(s)).or_else(|| rotated.clone().next());
            if let Some(s) = chosen.cloned() {
                let ids = s.id.into_iter().collect();
                delivered += usize::from(self.deliver(
                    &s.client,
                    &envelope,
                    s.options.qos,
                    s.options.retain_as_published,
                    ids,
                ));
            }
        }
        self.deliver_internal(&envelope);
        delivered
    }

    fn deliver(
        &self,
        client: &str,
        envelope: &Arc<Envelope>,
        max_qos: QoS,
        retain_as_published: bool,
        subscription_ids: Vec<u32>,
    ) -> bool {
        let Some(entry) = self.sessions.get(client) else { return false };
        let qos = envelope.qos.min(max_qos);
        // QoS 0 is not queued for a client that is away.
        if qos == QoS::AtMostOnce && !entry.mailbox.is_online() {
            return false;
        }
        let delivery = Delivery {
            envelope: envelope.clone(),
            qos,
            // MQTT-3.3.1-12/-13: the retain flag only survives with
            // retain-as-published.
            retain: retain_as_published && envelope.retain,
            subscription_ids,
        };
        let queued = entry.mailbox.push(client, delivery, self.limits);
        if !queued {
            self.dropped.set(self.dropped.get() + 1);
        }
        queued
    }

    fn deliver_internal(&mut self, envelope: &Envelope) {
        self.internal.retain_mut(|sub| {
            if !sub.filter.matches(&envelope.topic) {
                return true;
            }
            let message = Message {
                topic: envelope.topic.clone(),
                payload: envelope.payload.clone(),
                qos: envelope.qos,
                retain: envelope.retain,
            };
            match sub.tx.try_send(message) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.dropped += 1;
                    tracing::warn!(filter = %sub.filter, dropped = sub.dropped, "in-process subscriber is not keeping up; message dropped for it");
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Adds an in-process subscriber; the retained messages it matches are
    /// queued first.
    pub fn subscribe_internal(
        &mut self,
        filter: TopicFilter,
        tx: mpsc::Sender<Message>,
        with_retained: bool,
    ) {
        let retained = self.retained.values().filter(|_| with_retained);
        for envelope in retained.filter(|e| filter.matches(&e.topic) && !e.expired()) {
            let _ = tx.try_send(Message {
                topic: envelope.topic.clone(),
                payload: envelope.payload.clone(),
                qos: envelope.qos,
                retain: true,
            });
        }
        self.internal.push(InternalSubscriber { filter, tx, dropped: 0 });
    }

    /// Subscribes `client` to `raw` (as subscribed); returns whether the
    /// subscription existed.
    pub fn subscribe(
        &mut self,
        client: &Arc<str>,
        raw: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> bool {
        let Ok(filter) = parse_filter(raw) else { return false };
        let subscriber =
            Subscriber { client: client.clone(), options, id, group: filter.group.map(Arc::from) };
        if let Some(entry) = self.sessions.get_mut(client) {
            entry.subscriptions.insert(raw.to_owned(), (options, id));
        }
        self.subscriptions.insert(filter.filter, subscriber)
    }

    /// Unsubscribes `client`; whether it was subscribed.
    pub fn unsubscribe(&mut self, client: &str, raw_filter: &str) -> bool {
        if let Some(entry) = self.sessions.get_mut(client) {
            entry.subscriptions.remove(raw_filter);
        }
        match parse_filter(raw_filter) {
            Ok(f) => self.subscriptions.remove(f.filter, client, f.group),
            Err(_) => false,
        }
    }

    /// Removes every subscription of a session that ends.
    pub fn remove_subscriptions(&mut self, client: &str, state: &SessionState) {
        for raw in state.subscriptions.keys() {
            self.unsubscribe(client, raw);
        }
    }

    /// Every retained message, for a snapshot.
    pub fn all_retained(&self) -> impl Iterator<Item = &Arc<Envelope>> {
        self.retained.values()
    }

    /// Restores a retained message from a snapshot.
    pub fn restore_retained(&mut self, envelope: Arc<Envelope>) {
        self.retained.insert(envelope.topic.clone(), envelope);
    }

    /// The retained messages matching `filter`, not expired.
    pub fn retained_matching(&self, filter: &TopicFilter) -> Vec<Arc<Envelope>> {
        self.retained.values().filter(|e| filter.matches(&e.topic) && !e.expired()).cloned().collect()
    }

    /// The retained message on `topic`.
    pub fn retained(&self, topic: &TopicName) -> Option<Arc<Envelope>> {
        self.retained.get(topic).filter(|e| !e.expired()).cloned()
    }

    /// How many retained messages and subscriptions there are.
    pub fn counts(&self) -> (usize, usize) {
        // `$SYS`'s own retained messages are not counted, so the figure is
        // what clients and devices retained.
        let sys = self.retained.keys().filter(|t| t.is_sys()).count();
        (self.retained.len() - sys, self.subscriptions.len())
    }
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Properties;
    use bytes::Bytes;

    fn envelope(topic: &str, qos: QoS, retain: bool, publisher: Option<&str>) -> Arc<Envelope> {
        Arc::new(Envelope {
            topic: TopicName::new(topic).unwrap(),
            payload: Bytes::from_static(b"v"),
            qos,
            retain,
            properties: Properties::default(),
            expires_at: None,
            publisher: publisher.map(Arc::from),
        })
    }

    fn session(router: &mut Router, client: &str) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox::new());
        mailbox.set_online(true);
        let mut entry = SessionEntry::new();
        entry.mailbox = mailbox.clone();
        entry.generation = 1;
        router.sessions.insert(client.into(), entry);
        mailbox
    }

    fn sub(router: &mut Router, client: &str, filter: &str, qos: QoS, id: Option<u32>) {
        let options = SubscriptionOptions { qos, ..SubscriptionOptions::default() };
        router.subscribe(&Arc::from(client), filter, options, id);
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_the_highest_qos_with_every_id() {
        // MQTT-3.3.5-1 (mosquitto 2.0.11 delivers at the first match's QoS).
        let mut r = Router::new();
        let mb = session(&mut r, "c");
        sub(&mut r, "c", "a/+", QoS::AtMostOnce, Some(1));
        sub(&mut r, "c", "a/#", QoS::ExactlyOnce, Some(2));
        assert_eq!(r.route(envelope("a/b", QoS::ExactlyOnce, false, None)), 1);
        let d = mb.pop().unwrap();
        assert_eq!(d.qos, QoS::ExactlyOnce);
        let mut ids = d.subscription_ids.clone();
        ids.sort();
        assert_eq!(ids, [1, 2]);
        assert!(mb.pop().is_none());
    }

    #[test]
    fn delivery_qos_is_the_lower_of_publish_and_subscription() {
        let mut r = Router::new();
        let mb = session(&mut r, "c");
        sub(&mut r, "c", "t", QoS::AtLeastOnce, None);
        r.route(envelope("t", QoS::ExactlyOnce, false, None));
        r.route(envelope("t", QoS::AtMostOnce, false, None));
        assert_eq!(mb.pop().unwrap().qos, QoS::AtLeastOnce);
        assert_eq!(mb.pop().unwrap().qos, QoS::AtMostOnce);
    }

    #[test]
    fn no_local_skips_the_publisher_itself() {
        let mut r = Router::new();
        let mb = session(&mut r, "c");
        let options = SubscriptionOptions { no_local: true, ..SubscriptionOptions::default() };
        r.subscribe(&Arc::from("c"), "t", options, None);
        r.route(envelope("t", QoS::AtMostOnce, false, Some("c")));
        assert!(mb.pop().is_none());
        r.route(envelope("t", QoS::AtMostOnce, false, Some("other")));
        assert!(mb.pop().is_some());
    }

    #[test]
    fn a_share_group_gets_each_message_once_taking_turns() {
        let mut r = Router::new();
        let a = session(&mut r, "a");
        let b = session(&mut r, "b");
        sub(&mut r, "a", "$share/g/t/#", QoS::AtMostOnce, None);
        sub(&mut r, "b", "$share/g/t/#", QoS::AtMostOnce, None);
        for _ in 0..10 {
            r.route(envelope("t/x", QoS::AtMostOnce, false, None));
        }
        assert_eq!((a.len(), b.len()), (5, 5));
        // An offline member is passed over.
        b.set_online(false);
        for _ in 0..4 {
            r.route(envelope("t/x", QoS::AtMostOnce, false, None));
        }
        assert_eq!(a.len(), 9);
    }

    #[test]
    fn qos0_is_not_queued_for_an_offline_client_but_qos1_is() {
        let mut r = Router::new();
        let mb = session(&mut r, "c");
        sub(&mut r, "c", "t", QoS::AtLeastOnce, None);
        mb.set_online(false);
        r.route(envelope("t", QoS::AtMostOnce, false, None));
        r.route(envelope("t", QoS::AtLeastOnce, false, None));
        assert_eq!(mb.len(), 1);
    }

    #[test]
    fn retained_messages_are_replaced_and_cleared_by_an_empty_payload() {
        let mut r = Router::new();
        r.route(envelope("t", QoS::AtMostOnce, true, None));
        let filter = TopicFilter::new("#").unwrap();
        assert_eq!(r.retained_matching(&filter).len(), 1);
        let clear = Arc::new(Envelope {
            payload: Bytes::new(),
            ..Arc::unwrap_or_clone(envelope("t", QoS::AtMostOnce, true, None))
        });
        r.route(clear);
        assert!(r.retained_matching(&filter).is_empty());
    }

    #[test]
    fn a_live_subscription_gets_no_retained_replay() {
        // Commands: a retained `set` must not be acted on again at start.
        let mut r = Router::new();
        r.route(envelope("dev/set/x", QoS::AtLeastOnce, true, None));
        let (tx, mut rx) = mpsc::channel(4);
        r.subscribe_internal(TopicFilter::new("dev/set/+").unwrap(), tx, false);
        assert!(rx.try_recv().is_err());
        r.route(envelope("dev/set/x", QoS::AtLeastOnce, false, None));
        assert!(rx.try_recv().is_ok(), "live messages do arrive");
    }

    #[test]
    fn share_filters_are_parsed_and_checked() {
        assert_eq!(parse_filter("$share/g/a/+").unwrap().group, Some("g"));
        assert!(parse_filter("$share/g").is_err());
        assert!(parse_filter("$share//a").is_err());
        assert!(parse_filter("a/#/b").is_err());
    }
}
