//! One network client's protocol: what its packets do, and what it is sent.
//!
//! [`Client`] answers packets and moves the session's mail into its output
//! buffer, within the client's receive maximum. It never waits: the task
//! around it (`serve.rs`) does the waiting and the I/O. Any protocol error
//! ends this connection only, with a DISCONNECT carrying the reason in
//! MQTT 5, and a log line. `deliver.rs` is its outgoing side.

mod deliver;
mod resting;

pub(super) use resting::Resting;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::router::parse_filter;
use super::session::{Delivery, Envelope, Outgoing};
use super::stats::BrokerStats;
use super::{forwarded, Broker, Claim};
use crate::buffer::Offer;
use crate::connection::{ConnectionError, Outbox};
use crate::packet::*;
use crate::{QoS, TopicFilter, TopicName};

/// How long a write to a client may block before the client counts as gone.
const WRITE_LIMIT: Duration = Duration::from_secs(30);

pub(super) fn kind(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::Connack(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::Puback(_) => "PUBACK",
        Packet::Pubrec(_) => "PUBREC",
        Packet::Pubrel(_) => "PUBREL",
        Packet::Pubcomp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::Suback(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::Unsuback(_) => "UNSUBACK",
        Packet::Pingreq => "PINGREQ",
        Packet::Pingresp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}

/// Why a connection ended.
pub(super) enum Exit {
    /// DISCONNECT from the client: normal (0x00) or with will (0x04).
    Disconnected { with_will: bool },
    /// The connection ended otherwise (error, timeout, close, takeover):
    /// the will is published. A reason is sent first in MQTT 5.
    Abnormal(Option<ReasonCode>),
    /// The broker stops: no will, DISCONNECT 0x8B.
    Shutdown,
}

/// A connected client: its session, its limits and its output buffer.
///
/// It lives in the connection's task for as long as the client is
/// connected, idle or not, so it is kept small: what few clients use sits
/// behind `extra`, allocated on first use.
pub(super) struct Client {
    pub(super) broker: Broker,
    pub(super) claim: Claim,
    pub(super) outbox: Outbox,
    pub(super) terms: Terms,
    pub(super) identity: Identity,
    extra: Option<Box<Extra>>,
}

/// Who the client is: where it connects from and the user it logged in
/// as (`None`: anonymous), which the ACL is checked against.
pub(super) struct Identity {
    pub(super) peer: Box<str>,
    pub(super) user: Option<Arc<str>>,
}

/// The state of topic aliases and of acknowledgements held for the buffer.
#[derive(Default)]
struct Extra {
    /// Aliases the client set for its publishes.
    inbound_aliases: HashMap<u16, String>,
    /// Aliases we set for topics we send.
    outbound_aliases: HashMap<String, u16>,
    /// Acknowledgements waiting for the buffer to commit what they
    /// acknowledge (ticket 0: nothing to wait for, but queued behind the
    /// others: MQTT-4.6.0-2 wants them in order).
    held_acks: VecDeque<(u64, Packet)>,
    /// The buffer's commit progress, once this client published to it.
    committed: Option<watch::Receiver<u64>>,
    /// Ready when the buffer commits more, while acknowledgements wait.
    commit_wait: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// What CONNECT settled: the client's limits and its will.
pub(super) struct Terms {
    pub(super) version: Protocol,
    /// The keep alive in force (the client's, or the broker's maximum).
    pub(super) keep_alive: u16,
    /// How many QoS 1/2 messages we may have in flight to the client.
    pub(super) send_quota: u16,
    /// Topic aliases the client allows us.
    pub(super) outbound_alias_max: u16,
    /// The largest packet the client accepts; `u32::MAX` when it set no
    /// limit (no packet can be that large).
    pub(super) client_max_packet: u32,
    /// May change at DISCONNECT (MQTT 5).
    pub(super) session_expiry: u32,
    pub(super) will: Option<Box<Will>>,
}

impl Client {
    pub(super) fn new(broker: Broker, claim: Claim, terms: Terms, identity: Identity) -> Self {
        Client { broker, claim, outbox: Outbox::default(), terms, identity, extra: None }
    }

    pub(super) fn v5(&self) -> bool {
        self.terms.version == Protocol::V5
    }

    pub(super) fn client_id(&self) -> &str {
        &self.claim.client
    }

    /// Queues a packet for the client.
    pub(super) fn queue(&mut self, packet: &Packet) {
        let before = self.outbox.pending();
        self.outbox.queue(packet, self.terms.version);
        let stats = &self.broker.shared.stats;
        BrokerStats::add(&stats.bytes_sent, (self.outbox.pending() - before) as u64);
    }

    /// The user the client acts as, for the ACL.
    pub(super) fn user(&self) -> Option<&str> {
        self.identity.user.as_deref()
    }

    /// Whether nothing waits to be sent, now or once the buffer commits:
    /// the client can be parked.
    pub(super) fn quiet(&self) -> bool {
        self.outbox.pending() == 0 && self.extra.as_ref().is_none_or(|e| e.held_acks.is_empty())
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// 1.5 x the keep alive (MQTT-3.1.2-22 / 3.1.2-24): how long the
    /// client may stay silent.
    pub(super) fn grace(&self) -> Duration {
        Duration::from_millis(u64::from(self.terms.keep_alive) * 1500)
    }

    /// How long a write may block: a client that stops reading must not
    /// hold its task (and its session, and a takeover, and shutdown) forever.
    pub(super) fn write_limit(&self) -> Duration {
        if self.terms.keep_alive == 0 {
            WRITE_LIMIT
        } else {
            self.grace().min(WRITE_LIMIT)
        }
    }

    /// Queues the held acknowledgements whose messages are committed.
    pub(super) fn release_acks(&mut self) {
        let Some(extra) = self.extra.as_deref_mut() else { return };
        if extra.held_acks.is_empty() {
            return;
        }
        // Marked seen, so the wait below ends only on a later commit.
        let committed = extra.committed.as_mut().map_or(u64::MAX, |c| *c.borrow_and_update());
        let before = self.outbox.pending();
        while let Some((seq, _)) = extra.held_acks.front() {
            if *seq > committed {
                break;
            }
            if let Some((_, ack)) = extra.held_acks.pop_front() {
                self.outbox.queue(&ack, self.terms.version);
            }
        }
        let stats = &self.broker.shared.stats;
        BrokerStats::add(&stats.bytes_sent, (self.outbox.pending() - before) as u64);
    }

    /// Ready when the buffer committed more while acknowledgements wait for it.
    pub(super) fn poll_committed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(extra) = self.extra.as_deref_mut() else { return Poll::Pending };
        let Some(committed) = &extra.committed else { return Poll::Pending };
        if extra.held_acks.is_empty() {
            return Poll::Pending;
        }
        let wait = extra.commit_wait.get_or_insert_with(|| {
            let mut committed = committed.clone();
            Box::pin(async move {
                if committed.changed().await.is_err() {
                    // The buffer is gone: nothing more will be committed.
                    std::future::pending::<()>().await;
                }
            })
        });
        let ready = wait.as_mut().poll(cx);
        if ready.is_ready() {
            extra.commit_wait = None;
        }
        ready
    }

    pub(super) fn on_read_error(&mut self, e: ConnectionError) -> Exit {
        tracing::info!(peer = %self.identity.peer, client = %self.client_id(), error = %e, "closing the connection");
        Exit::Abnormal(e.reason())
    }

    /// The keep alive expired: logged, and the connection ends with 0x8D.
    pub(super) fn keepalive_expired(&self) -> Exit {
        tracing::info!(client = %self.client_id(), keep_alive = self.terms.keep_alive, "keep alive expired (1.5 x); closing");
        Exit::Abnormal(Some(ReasonCode::KEEP_ALIVE_TIMEOUT))
    }

    /// A protocol violation: logged, and the connection ends with `code`.
    fn violation(&self, code: ReasonCode, why: &str) -> Option<Exit> {
        tracing::info!(peer = %self.identity.peer, client = %self.client_id(), %code, "protocol violation: {why}");
        Some(Exit::Abnormal(Some(code)))
    }

    /// Answers one packet; `Some` ends the connection.
    pub(super) fn handle(&mut self, packet: Packet) -> Option<Exit> {
        match packet {
            Packet::Publish(publish) => return self.on_publish(publish),
            Packet::Pubrel(ack) => {
                let found = self.claim.state.incoming_qos2.remove(&ack.packet_id);
                let code = if found { ReasonCode::SUCCESS } else { ReasonCode::PACKET_IDENTIFIER_NOT_FOUND };
                self.queue(&Packet::Pubcomp(Ack {
                    code: if self.v5() { code } else { ReasonCode::SUCCESS },
                    ..Ack::ok(ack.packet_id)
                }));
            }
            Packet::Puback(ack) => {
                if matches!(self.claim.state.outgoing.get(&ack.packet_id), Some(Outgoing::Published(d)) if d.qos == QoS::AtLeastOnce)
                {
                    self.claim.state.outgoing.remove(&ack.packet_id);
                }
            }
            Packet::Pubrec(ack) => {
                if matches!(self.claim.state.outgoing.get(&ack.packet_id), Some(Outgoing::Published(_))) {
                    if ack.code.is_error() {
                        self.claim.state.outgoing.remove(&ack.packet_id);
                    } else {
                        self.claim.state.outgoing.insert(ack.packet_id, Outgoing::Released);
                        self.queue(&Packet::Pubrel(Ack::ok(ack.packet_id)));
                    }
                }
            }
            Packet::Pubcomp(ack) => {
                if matches!(self.claim.state.outgoing.get(&ack.packet_id), Some(Outgoing::Released)) {
                    self.claim.state.outgoing.remove(&ack.packet_id);
                }
            }
            Packet::Subscribe(subscribe) => return self.on_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => {
                let mut codes = Vec::with_capacity(unsubscribe.filters.len());
                for filter in &unsubscribe.filters {
                    let existed = self.claim.state.subscriptions.remove(filter).is_some();
                    self.broker.router().unsubscribe(self.client_id(), filter);
                    codes.push(if existed {
                        ReasonCode::SUCCESS
                    } else {
                        ReasonCode::NO_SUBSCRIPTION_EXISTED
                    });
                }
                self.broker.touch();
                self.queue(&Packet::Unsuback(Suback {
                    packet_id: unsubscribe.packet_id,
                    codes,
                    properties: Properties::default(),
                }));
            }
            Packet::Pingreq => self.queue(&Packet::Pingresp),
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.session_expiry_interval {
                    if self.terms.session_expiry == 0 && expiry != 0 {
                        // MQTT-3.14.2-2.
                        return self.violation(
                            ReasonCode::PROTOCOL_ERROR,
                            "session expiry set at DISCONNECT after 0 at CONNECT",
                        );
                    }
                    self.terms.session_expiry = expiry;
                }
                return Some(Exit::Disconnected { with_will: d.code == ReasonCode::DISCONNECT_WITH_WILL });
            }
            // MQTT-3.1.0-2: a second CONNECT is a protocol violation.
            Packet::Connect(_) => return self.violation(ReasonCode::PROTOCOL_ERROR, "a second CONNECT"),
            other => return self.violation(ReasonCode::PROTOCOL_ERROR, kind(&other)),
        }
        None
    }

    fn on_publish(&mut self, mut publish: Publish) -> Option<Exit> {
        if let Some(alias) = publish.properties.topic_alias.take() {
            if alias == 0 || alias > self.broker.settings().topic_alias_maximum {
                return self.violation(ReasonCode::TOPIC_ALIAS_INVALID, "topic alias out of range");
            }
            if publish.topic.is_empty() {
                match self.extra().inbound_aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return self.violation(ReasonCode::PROTOCOL_ERROR, "unknown topic alias"),
                }
            } else {
                self.extra().inbound_aliases.insert(alias, publish.topic.clone());
            }
        }
        let Ok(topic) = TopicName::new(publish.topic.as_str()) else {
            return self.violation(ReasonCode::TOPIC_NAME_INVALID, "invalid topic name");
        };
        BrokerStats::add(&self.broker.shared.stats.messages_received, 1);
        // `$SYS` is the broker's own, ACL or not.
        let denied = topic.is_sys()
            || self
                .broker
                .acl_access()
                .is_some_and(|a| !a.may_write(self.user(), self.client_id(), topic.as_str()));
        if denied {
            return self.deny_publish(&publish, &topic);
        }
        if publish.qos == QoS::ExactlyOnce {
            if self.claim.state.incoming_qos2.contains(&publish.packet_id) {
                // A resend of a message already routed: acknowledge only.
                self.queue(&Packet::Pubrec(Ack::ok(publish.packet_id)));
                return None;
            }
            if self.claim.state.incoming_qos2.len() >= usize::from(self.broker.settings().receive_maximum) {
                // MQTT-3.3.4-7 (mosquitto 2.0.11 does not send 0x93).
                return self.violation(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded");
            }
        }
        let expires_at = publish
            .properties
            .message_expiry_interval
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s)));
        let (delivered, offer) = self.broker.route_forwarded(Envelope {
            topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: forwarded(publish.properties),
            expires_at,
            publisher: Some(self.claim.client.clone()),
        });
        let code = match offer {
            // The upstream will not get it: in MQTT 5 the publisher hears so.
            Offer::Refused if self.v5() => ReasonCode::QUOTA_EXCEEDED,
            Offer::Taken(_) | Offer::Refused => ReasonCode::SUCCESS,
            Offer::NotForwarded if self.v5() && delivered == 0 => ReasonCode::NO_MATCHING_SUBSCRIBERS,
            Offer::NotForwarded => ReasonCode::SUCCESS,
        };
        let ack = match publish.qos {
            QoS::AtMostOnce => return None,
            QoS::AtLeastOnce => Packet::Puback(Ack { code, ..Ack::ok(publish.packet_id) }),
            QoS::ExactlyOnce => {
                self.claim.state.incoming_qos2.insert(publish.packet_id);
                Packet::Pubrec(Ack { code, ..Ack::ok(publish.packet_id) })
            }
        };
        // Acknowledged only once durable, when an upstream takes it.
        let ticket = match offer {
            Offer::Taken(seq) => seq,
            _ => 0,
        };
        let holding = self.extra.as_ref().is_some_and(|e| !e.held_acks.is_empty());
        if ticket > 0 || holding {
            if ticket > 0 && self.extra.as_ref().is_none_or(|e| e.committed.is_none()) {
                let committed = self.broker.buffer().map(|b| b.committed());
                self.extra().committed = committed;
            }
            self.extra().held_acks.push_back((ticket, ack));
        } else {
            self.queue(&ack);
        }
        None
    }

    /// A publish the ACL does not allow: dropped, and acknowledged with
    /// 0x87 in MQTT 5 (3.1.1 has no way to say no: a plain ack, as
    /// mosquitto does). The ack waits its turn behind held ones.
    fn deny_publish(&mut self, publish: &Publish, topic: &TopicName) -> Option<Exit> {
        BrokerStats::add(&self.broker.shared.stats.denied, 1);
        tracing::info!(client = %self.client_id(), user = self.user().unwrap_or(""), topic = %topic, "publish denied by the ACL; dropped");
        let code = if self.v5() { ReasonCode::NOT_AUTHORIZED } else { ReasonCode::SUCCESS };
        let ack = match publish.qos {
            QoS::AtMostOnce => return None,
            QoS::AtLeastOnce => Packet::Puback(Ack { code, ..Ack::ok(publish.packet_id) }),
            QoS::ExactlyOnce => {
                // An error PUBREC ends the exchange (v5); in 3.1.1 a PUBREL follows.
                if !self.v5() {
                    self.claim.state.incoming_qos2.insert(publish.packet_id);
                }
                Packet::Pubrec(Ack { code, ..Ack::ok(publish.packet_id) })
            }
        };
        match self.extra.as_deref_mut() {
            Some(extra) if !extra.held_acks.is_empty() => extra.held_acks.push_back((0, ack)),
            _ => self.queue(&ack),
        }
        None
    }

    fn on_subscribe(&mut self, subscribe: Subscribe) -> Option<Exit> {
        let id = subscribe.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained = Vec::new();
        let access = self.broker.access();
        for (raw, options) in &subscribe.filters {
            let Ok(parsed) = parse_filter(raw) else {
                if !self.v5() {
                    // 3.1.1 has no code for it: a filter breaking 4.7 is a
                    // protocol violation, which closes (MQTT-4.8.0-1). A
                    // valid one that is a bad shared subscription (a 5.0
                    // notion) only fails.
                    if TopicFilter::new(raw.as_str()).is_err() {
                        return self.violation(ReasonCode::PROTOCOL_ERROR, "invalid topic filter");
                    }
                    codes.push(ReasonCode::UNSPECIFIED_ERROR);
                    continue;
                }
                // MQTT 5: 0x8F per filter (mosquitto 2.0.11 gets this wrong).
                codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            };
            if parsed.group.is_some() && options.no_local {
                // MQTT-3.8.3-4.
                return self.violation(ReasonCode::PROTOCOL_ERROR, "no local on a shared subscription");
            }
            // The ACL strips `$share/group/` itself: given the raw filter.
            if !access.may_subscribe(self.user(), self.client_id(), raw) {
                tracing::info!(client = %self.client_id(), user = self.user().unwrap_or(""), filter = %raw, "subscription denied by the ACL");
                codes.push(if self.v5() {
                    ReasonCode::NOT_AUTHORIZED
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            }
            let existed = self.broker.router().subscribe(&self.claim.client, raw, *options, id);
            self.claim.state.subscriptions.insert(raw.clone(), (*options, id));
            codes.push(ReasonCode(options.qos as u8));
            // MQTT-3.3.1-9 and retain handling (3.8.3.1); never for shares.
            let send_retained = parsed.group.is_none()
                && (options.retain_handling == 0 || (options.retain_handling == 1 && !existed));
            if send_retained {
                if let Ok(filter) = TopicFilter::new(parsed.filter) {
                    for envelope in self.broker.router().retained_matching(&filter) {
                        retained.push(Delivery {
                            qos: envelope.qos.min(options.qos),
                            retain: true,
                            subscription_ids: id.into_iter().collect(),
                            envelope,
                        });
                    }
                }
            }
        }
        self.broker.touch();
        self.queue(&Packet::Suback(Suback {
            packet_id: subscribe.packet_id,
            codes,
            properties: Properties::default(),
        }));
        for delivery in retained {
            let limits = self.broker.settings().queue_limits();
            if !self.claim.mailbox.push(self.client_id(), delivery, limits) {
                self.broker.router().count_drop();
            }
        }
        None
    }
}
