//! One network client, from CONNECT to close.
//!
//! The task reads packets, answers them, and sends what the client's
//! mailbox holds, within the client's receive maximum. It waits on four
//! things at once: the next packet, new mail, the keepalive deadline
//! (1.5 x the keep alive, to the moment of the last packet: MQTT-3.1.2-22 /
//! 3.1.2-24) and a takeover. Any protocol error ends this connection only,
//! with a DISCONNECT carrying the reason in MQTT 5, and a log line.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};

use super::router::parse_filter;
use super::session::{Delivery, Envelope, Outgoing};
use super::{forwarded, Broker, Claim, Ending};
use crate::buffer::Offer;
use crate::connection::{ConnectionError, PacketReader, PacketWriter};
use crate::packet::*;
use crate::{QoS, TopicFilter, TopicName};

/// How long a write to a client may block before the client counts as gone.
const WRITE_LIMIT: Duration = Duration::from_secs(30);

/// Serves one client on `stream` until it leaves, fails or the broker stops.
pub async fn serve_client<S>(stream: S, broker: Broker, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let settings = broker.settings().clone();
    let mut reader = PacketReader::new(read, settings.max_packet_size);
    let mut writer = PacketWriter::new(write);
    let connect = match timeout(settings.connect_timeout, reader.read_packet()).await {
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within {}s; closing", settings.connect_timeout.as_secs());
            return;
        }
        Ok(Ok(Some(Packet::Connect(connect)))) => connect,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(other))) => {
            // MQTT-3.1.0-1: the first packet must be CONNECT.
            tracing::info!(%peer, packet = ?kind(&other), "first packet is not CONNECT; closing");
            return;
        }
        Ok(Err(e)) => {
            if e.reason() == Some(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION) {
                // MQTT-3.1.2-2: CONNACK 0x01 (3.1.1's code), then close.
                writer.queue(&Packet::Connack(Connack {
                    session_present: false,
                    code: ReasonCode(0x01),
                    properties: Properties::default(),
                }));
                writer.close().await;
            }
            tracing::info!(%peer, error = %e, "bad CONNECT; closing");
            return;
        }
    };
    let version = connect.protocol;
    reader.version = Some(version);
    writer.version = version;
    let mut client = Client::new(broker.clone(), *connect, peer, writer);
    let Some(claim) = client.accept().await else { return };
    let ending = client.run(reader, claim).await;
    if let Some((claim, ending)) = ending {
        broker.release(claim, ending);
    }
}

fn kind(packet: &Packet) -> &'static str {
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

/// Why the loop ended.
enum Exit {
    /// DISCONNECT from the client: normal (0x00) or with will (0x04).
    Disconnected { with_will: bool },
    /// The connection ended otherwise (error, timeout, close, takeover):
    /// the will is published. A reason is sent first in MQTT 5.
    Abnormal(Option<ReasonCode>),
    /// The broker stops: no will, DISCONNECT 0x8B.
    Shutdown,
}

struct Client<W> {
    broker: Broker,
    connect: Connect,
    client_id: Arc<str>,
    peer: String,
    writer: PacketWriter<W>,
    v5: bool,
    keep_alive: u16,
    /// How many QoS 1/2 messages we may have in flight to the client.
    send_quota: usize,
    /// The largest packet the client accepts.
    client_max_packet: usize,
    /// Aliases the client set for its publishes.
    inbound_aliases: HashMap<u16, String>,
    /// Aliases we set for topics we send, and how many the client allows.
    outbound_aliases: HashMap<String, u16>,
    outbound_alias_max: u16,
    session_expiry: u32,
    /// Acknowledgements waiting for the buffer to commit what they
    /// acknowledge (ticket 0: nothing to wait for, but queued behind the
    /// others: MQTT-4.6.0-2 wants them in order).
    held_acks: VecDeque<(u64, Packet)>,
    /// The buffer's commit progress, once this client published to it.
    committed: Option<watch::Receiver<u64>>,
}

impl<W: AsyncWrite + Unpin> Client<W> {
    fn new(broker: Broker, connect: Connect, peer: String, writer: PacketWriter<W>) -> Self {
        let v5 = connect.protocol == Protocol::V5;
        let settings = broker.settings();
        let p = &connect.properties;
        let send_quota = if v5 {
            usize::from(p.receive_maximum.unwrap_or(u16::MAX))
        } else {
            usize::from(settings.max_inflight)
        };
        // 3.1.1: a clean session ends with the connection; otherwise it
        // never expires. 5.0: as the client says (absent = 0).
        let session_expiry = if v5 {
            p.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let mut keep_alive = connect.keep_alive;
        if settings.max_keep_alive > 0 && (keep_alive == 0 || keep_alive > settings.max_keep_alive) {
            keep_alive = settings.max_keep_alive;
        }
        Client {
            client_id: Arc::from(connect.client_id.as_str()),
            client_max_packet: p.maximum_packet_size.map_or(usize::MAX, |m| m as usize),
            outbound_alias_max: if v5 { p.topic_alias_maximum.unwrap_or(0) } else { 0 },
            broker,
            peer,
            writer,
            v5,
            keep_alive,
            send_quota,
            inbound_aliases: HashMap::new(),
            outbound_aliases: HashMap::new(),
            session_expiry,
            connect,
            held_acks: VecDeque::new(),
            committed: None,
        }
    }

    /// Queues the held acknowledgements whose messages are committed.
    fn release_acks(&mut self) {
        let committed = self.committed.as_ref().map_or(u64::MAX, |c| *c.borrow());
        while let Some((seq, _)) = self.held_acks.front() {
            if *seq > committed {
                break;
            }
            if let Some((_, ack)) = self.held_acks.pop_front() {
                self.writer.queue(&ack);
            }
        }
    }

    async fn refuse(&mut self, code: ReasonCode, v311_code: u8, why: &str) {
        tracing::info!(peer = %self.peer, client = %self.client_id, %code, "connection refused: {why}");
        let code = if self.v5 { code } else { ReasonCode(v311_code) };
        self.writer.queue(&Packet::Connack(Connack {
            session_present: false,
            code,
            properties: Properties::default(),
        }));
        self.writer.close().await;
    }

    /// Checks the CONNECT, claims the session and answers CONNACK.
    async fn accept(&mut self) -> Option<Claim> {
        let mut assigned = None;
        if self.connect.client_id.is_empty() {
            if !self.v5 && !self.connect.clean_start {
                // MQTT-3.1.3-8: a zero-length id needs a clean session in 3.1.1.
                self.refuse(
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    0x02,
                    "empty client id without clean session",
                )
                .await;
                return None;
            }
            let id = format!("fieldmq-{:016x}", rand_u64());
            self.client_id = Arc::from(id.as_str());
            assigned = Some(id);
        }
        // The seam for authentication (passwords, certificates) to come.
        if !self.broker.settings().allow_anonymous && self.connect.username.is_none() {
            self.refuse(ReasonCode::NOT_AUTHORIZED, 0x05, "anonymous clients are not allowed").await;
            return None;
        }
        if let Some(will) = &self.connect.will {
            if TopicName::new(will.topic.as_str()).is_err() {
                self.refuse(ReasonCode::TOPIC_NAME_INVALID, 0x02, "invalid will topic").await;
                return None;
            }
        }
        let claim =
            self.broker.claim(self.client_id.clone(), self.connect.clean_start, self.session_expiry).await;
        let settings = self.broker.settings();
        let properties = if self.v5 {
            Properties {
                receive_maximum: Some(settings.receive_maximum),
                topic_alias_maximum: Some(settings.topic_alias_maximum),
                maximum_packet_size: Some(settings.max_packet_size as u32),
                assigned_client_identifier: assigned,
                server_keep_alive: (self.keep_alive != self.connect.keep_alive).then_some(self.keep_alive),
                retain_available: Some(1),
                wildcard_subscription_available: Some(1),
                subscription_identifier_available: Some(1),
                shared_subscription_available: Some(1),
                ..Properties::default()
            }
        } else {
            Properties::default()
        };
        self.writer.queue(&Packet::Connack(Connack {
            session_present: claim.session_present,
            code: ReasonCode::SUCCESS,
            properties,
        }));
        tracing::debug!(peer = %self.peer, client = %self.client_id, v5 = self.v5, session_present = claim.session_present, "client connected");
        Some(claim)
    }

    /// The connection's life after CONNACK; returns the claim and how it
    /// ended, for the broker to release the session.
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        mut reader: PacketReader<R>,
        mut claim: Claim,
    ) -> Option<(Claim, Ending)> {
        // MQTT-4.4.0-1: resend what was in flight, PUBLISH with DUP set.
        let inflight: Vec<(u16, Outgoing)> =
            claim.state.outgoing.iter().map(|(id, o)| (*id, o.clone())).collect();
        for (id, outgoing) in inflight {
            match outgoing {
                Outgoing::Published(delivery) => {
                    // Too large for the client now: it counts as delivered
                    // (MQTT-3.1.2-25), not as in flight for ever.
                    if !self.send_publish(id, &delivery, true) {
                        claim.state.outgoing.remove(&id);
                    }
                }
                Outgoing::Released => self.writer.queue(&Packet::Pubrel(Ack::ok(id))),
            }
        }
        let shutdown = self.broker.shutdown_token();
        let grace = Duration::from_millis(u64::from(self.keep_alive) * 1500);
        let write_limit = if self.keep_alive == 0 { WRITE_LIMIT } else { grace.min(WRITE_LIMIT) };
        let mut deadline = Instant::now() + grace;
        let exit = loop {
            self.pump(&mut claim);
            // Cloned before looking, so a commit after the look still wakes us.
            let mut committed = self.committed.clone();
            self.release_acks();
            // Answers to a burst of packets go out in one write, once no
            // whole packet is left to read.
            if !reader.has_complete_packet() || self.writer.pending() > 64 * 1024 {
                // A client that stops reading must not hold its task (and
                // its session, and a takeover, and shutdown) forever.
                match tokio::time::timeout(write_limit, self.writer.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(client = %self.client_id, error = %e, "write failed");
                        break Exit::Abnormal(None);
                    }
                    Err(_) => {
                        tracing::info!(client = %self.client_id, "client stopped reading; closing");
                        break Exit::Abnormal(None);
                    }
                }
            }
            let keepalive = async {
                if self.keep_alive == 0 {
                    std::future::pending::<()>().await
                } else {
                    sleep_until(deadline).await
                }
            };
            tokio::select! {
                packet = reader.read_packet() => match packet {
                    Ok(Some(packet)) => {
                        deadline = Instant::now() + grace;
                        if let Some(exit) = self.handle(packet, &mut claim) {
                            break exit;
                        }
                    }
                    Ok(None) => break Exit::Abnormal(None),
                    Err(e) => break self.on_read_error(e),
                },
                _ = claim.mailbox.notified() => {}
                Ok(()) = async { committed.as_mut().expect("guarded").changed().await }, if committed.is_some() && !self.held_acks.is_empty() => {}
                _ = keepalive => {
                    tracing::info!(client = %self.client_id, keep_alive = self.keep_alive, "keep alive expired (1.5 x); closing");
                    break Exit::Abnormal(Some(ReasonCode::KEEP_ALIVE_TIMEOUT));
                }
                reason = &mut claim.kicked => {
                    tracing::info!(client = %self.client_id, "session taken over by a new connection");
                    break Exit::Abnormal(Some(reason.unwrap_or(ReasonCode::SESSION_TAKEN_OVER)));
                }
                _ = shutdown.cancelled() => break Exit::Shutdown,
            }
        };
        if matches!(exit, Exit::Shutdown) {
            // What was queued before the stop (final statuses) goes out first.
            self.pump(&mut claim);
        }
        let will = self.connect.will.take();
        let (reason, will) = match exit {
            Exit::Disconnected { with_will } => (None, will.filter(|_| with_will)),
            Exit::Abnormal(reason) => (reason, will),
            Exit::Shutdown => (Some(ReasonCode::SERVER_SHUTTING_DOWN), None),
        };
        if let (Some(reason), true) = (reason, self.v5) {
            self.writer.queue(&Packet::Disconnect(Disconnect::new(reason)));
        }
        self.writer.close().await;
        tracing::debug!(client = %self.client_id, "client disconnected");
        Some((claim, Ending { will, session_expiry: self.session_expiry }))
    }

    fn on_read_error(&mut self, e: ConnectionError) -> Exit {
        tracing::info!(peer = %self.peer, client = %self.client_id, error = %e, "closing the connection");
        Exit::Abnormal(e.reason())
    }

    /// A protocol violation: logged, and the connection ends with `code`.
    fn violation(&self, code: ReasonCode, why: &str) -> Option<Exit> {
        tracing::info!(peer = %self.peer, client = %self.client_id, %code, "protocol violation: {why}");
        Some(Exit::Abnormal(Some(code)))
    }

    /// Answers one packet; `Some` ends the connection.
    fn handle(&mut self, packet: Packet, claim: &mut Claim) -> Option<Exit> {
        match packet {
            Packet::Publish(publish) => return self.on_publish(publish, claim),
            Packet::Pubrel(ack) => {
                let found = claim.state.incoming_qos2.remove(&ack.packet_id);
                let code = if found { ReasonCode::SUCCESS } else { ReasonCode::PACKET_IDENTIFIER_NOT_FOUND };
                self.writer.queue(&Packet::Pubcomp(Ack {
                    code: if self.v5 { code } else { ReasonCode::SUCCESS },
                    ..Ack::ok(ack.packet_id)
                }));
            }
            Packet::Puback(ack) => {
                if matches!(claim.state.outgoing.get(&ack.packet_id), Some(Outgoing::Published(d)) if d.qos == QoS::AtLeastOnce)
                {
                    claim.state.outgoing.remove(&ack.packet_id);
                }
            }
            Packet::Pubrec(ack) => {
                if matches!(claim.state.outgoing.get(&ack.packet_id), Some(Outgoing::Published(_))) {
                    if ack.code.is_error() {
                        claim.state.outgoing.remove(&ack.packet_id);
                    } else {
                        claim.state.outgoing.insert(ack.packet_id, Outgoing::Released);
                        self.writer.queue(&Packet::Pubrel(Ack::ok(ack.packet_id)));
                    }
                }
            }
            Packet::Pubcomp(ack) => {
                if matches!(claim.state.outgoing.get(&ack.packet_id), Some(Outgoing::Released)) {
                    claim.state.outgoing.remove(&ack.packet_id);
                }
            }
            Packet::Subscribe(subscribe) => return self.on_subscribe(subscribe, claim),
            Packet::Unsubscribe(unsubscribe) => {
                let mut codes = Vec::with_capacity(unsubscribe.filters.len());
                for filter in &unsubscribe.filters {
                    let existed = claim.state.subscriptions.remove(filter).is_some();
                    self.broker.router().unsubscribe(&self.client_id, filter);
                    codes.push(if existed {
                        ReasonCode::SUCCESS
                    } else {
                        ReasonCode::NO_SUBSCRIPTION_EXISTED
                    });
                }
                self.broker.touch();
                self.writer.queue(&Packet::Unsuback(Suback {
                    packet_id: unsubscribe.packet_id,
                    codes,
                    properties: Properties::default(),
                }));
            }
            Packet::Pingreq => self.writer.queue(&Packet::Pingresp),
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.session_expiry_interval {
                    if self.session_expiry == 0 && expiry != 0 {
                        // MQTT-3.14.2-2.
                        return self.violation(
                            ReasonCode::PROTOCOL_ERROR,
                            "session expiry set at DISCONNECT after 0 at CONNECT",
                        );
                    }
                    self.session_expiry = expiry;
                }
                return Some(Exit::Disconnected { with_will: d.code == ReasonCode::DISCONNECT_WITH_WILL });
            }
            // MQTT-3.1.0-2: a second CONNECT is a protocol violation.
            Packet::Connect(_) => return self.violation(ReasonCode::PROTOCOL_ERROR, "a second CONNECT"),
            other => return self.violation(ReasonCode::PROTOCOL_ERROR, kind(&other)),
        }
        None
    }

    fn on_publish(&mut self, mut publish: Publish, claim: &mut Claim) -> Option<Exit> {
        if let Some(alias) = publish.properties.topic_alias.take() {
            if alias == 0 || alias > self.broker.settings().topic_alias_maximum {
                return self.violation(ReasonCode::TOPIC_ALIAS_INVALID, "topic alias out of range");
            }
            if publish.topic.is_empty() {
                match self.inbound_aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return self.violation(ReasonCode::PROTOCOL_ERROR, "unknown topic alias"),
                }
            } else {
                self.inbound_aliases.insert(alias, publish.topic.clone());
            }
        }
        let Ok(topic) = TopicName::new(publish.topic.as_str()) else {
            return self.violation(ReasonCode::TOPIC_NAME_INVALID, "invalid topic name");
        };
        if publish.qos == QoS::ExactlyOnce {
            if claim.state.incoming_qos2.contains(&publish.packet_id) {
                // A resend of a message already routed: acknowledge only.
                self.writer.queue(&Packet::Pubrec(Ack::ok(publish.packet_id)));
                return None;
            }
            if claim.state.incoming_qos2.len() >= usize::from(self.broker.settings().receive_maximum) {
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
            publisher: Some(self.client_id.clone()),
        });
        let code = match offer {
            // The upstream will not get it: in MQTT 5 the publisher hears so.
            Offer::Refused if self.v5 => ReasonCode::QUOTA_EXCEEDED,
            Offer::Taken(_) | Offer::Refused => ReasonCode::SUCCESS,
            Offer::NotForwarded if self.v5 && delivered == 0 => ReasonCode::NO_MATCHING_SUBSCRIBERS,
            Offer::NotForwarded => ReasonCode::SUCCESS,
        };
        let ack = match publish.qos {
            QoS::AtMostOnce => return None,
            QoS::AtLeastOnce => Packet::Puback(Ack { code, ..Ack::ok(publish.packet_id) }),
            QoS::ExactlyOnce => {
                claim.state.incoming_qos2.insert(publish.packet_id);
                Packet::Pubrec(Ack { code, ..Ack::ok(publish.packet_id) })
            }
        };
        // Acknowledged only once durable, when an upstream takes it.
        let ticket = match offer {
            Offer::Taken(seq) => seq,
            _ => 0,
        };
        if ticket > 0 && self.committed.is_none() {
            self.committed = self.broker.buffer().map(|b| b.committed());
        }
        if ticket > 0 || !self.held_acks.is_empty() {
            self.held_acks.push_back((ticket, ack));
        } else {
            self.writer.queue(&ack);
        }
        None
    }

    fn on_subscribe(&mut self, subscribe: Subscribe, claim: &mut Claim) -> Option<Exit> {
        let id = subscribe.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained = Vec::new();
        for (raw, options) in &subscribe.filters {
            let Ok(parsed) = parse_filter(raw) else {
                // MQTT 5: 0x8F per filter (mosquitto 2.0.11 gets this wrong); 3.1.1: 0x80.
                codes.push(if self.v5 {
                    ReasonCode::TOPIC_FILTER_INVALID
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            };
            if parsed.group.is_some() && options.no_local {
                // MQTT-3.8.3-4.
                return self.violation(ReasonCode::PROTOCOL_ERROR, "no local on a shared subscription");
            }
            let existed = self.broker.router().subscribe(&self.client_id, raw, *options, id);
            claim.state.subscriptions.insert(raw.clone(), (*options, id));
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
        self.writer.queue(&Packet::Suback(Suback {
            packet_id: subscribe.packet_id,
            codes,
            properties: Properties::default(),
        }));
        for delivery in retained {
            claim.mailbox.push(&self.client_id, delivery);
        }
        None
    }

    /// Moves mail into the connection, within the client's receive maximum.
    fn pump(&mut self, claim: &mut Claim) {
        while let Some(delivery) = claim.mailbox.pop() {
            if delivery.envelope.expired() {
                continue;
            }
            if delivery.qos == QoS::AtMostOnce {
                self.send_publish(0, &delivery, false);
                continue;
            }
            if claim.state.outgoing.len() >= self.send_quota {
                claim.mailbox.unpop(delivery);
                break;
            }
            let Some(id) = claim.state.next_packet_id() else {
                claim.mailbox.unpop(delivery);
                break;
            };
            if self.send_publish(id, &delivery, false) {
                claim.state.outgoing.insert(id, Outgoing::Published(delivery));
            }
            if self.writer.pending() > 64 * 1024 {
                break;
            }
        }
    }

    /// Queues one PUBLISH; false when it was dropped for being larger than
    /// the client accepts (MQTT-3.1.2-25: then it counts as delivered).
    fn send_publish(&mut self, packet_id: u16, delivery: &Delivery, dup: bool) -> bool {
        let envelope = &delivery.envelope;
        let mut properties = Properties::default();
        if self.v5 {
            properties = envelope.properties.clone();
            properties.message_expiry_interval = envelope.remaining_expiry();
            properties.subscription_identifiers = delivery.subscription_ids.clone();
        }
        let mut publish = Publish {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: envelope.topic.as_str().to_owned(),
            packet_id,
            payload: envelope.payload.clone(),
            properties,
        };
        // Topic aliases towards the client, within its Topic Alias Maximum.
        // A new alias is recorded only once the packet is sure to go out,
        // so the client never meets an alias it was not given.
        let mut new_alias = None;
        if self.outbound_alias_max > 0 {
            if let Some(alias) = self.outbound_aliases.get(&publish.topic) {
                publish.properties.topic_alias = Some(*alias);
                publish.topic.clear();
            } else if self.outbound_aliases.len() < usize::from(self.outbound_alias_max) {
                let alias = self.outbound_aliases.len() as u16 + 1;
                publish.properties.topic_alias = Some(alias);
                new_alias = Some(alias);
            }
        }
        if self.client_max_packet != usize::MAX {
            // Measured as it will be sent, alias included.
            let size = self.writer.encoded_len(&Packet::Publish(publish.clone()));
            if size > self.client_max_packet {
                tracing::debug!(client = %self.client_id, size, "message larger than the client's maximum packet size dropped");
                return false;
            }
        }
        if let Some(alias) = new_alias {
            self.outbound_aliases.insert(publish.topic.clone(), alias);
        }
        self.writer.queue(&Packet::Publish(publish));
        true
    }
}

/// A random number for server-assigned client ids.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}
