//! One connection to an upstream, from TCP connect to its end.
//!
//! After CONNACK the link publishes `online` (retained; its will says
//! `offline`), subscribes to the `subscribe` filters, then streams rows
//! from the buffer in id order within the in-flight window, writing each
//! burst in one system call. It waits on the socket, on new commits, on
//! its keepalive and on shutdown. A link that hears nothing for 1.5 times
//! its keep alive (a frozen, half-open TCP connection) is declared dead;
//! the next link starts again from the cursor, so rows that were in
//! flight are sent again, in order.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::window::InflightWindow;
use super::UpstreamSettings;
use crate::broker::{forwarded, Envelope};
use crate::buffer::{Buffer, Row, RowReader};
use crate::connection::{PacketReader, PacketWriter};
use crate::packet::*;
use crate::{Broker, QoS, TopicName};

/// Rows read from the buffer at a time.
const BATCH: usize = 2048;
/// The largest packet accepted from the upstream.
const MAX_INCOMING: usize = 1 << 20;
/// How long a TCP connect or TLS handshake may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The gateway is stopping.
    #[error("stopping")]
    Stopped,
    /// The upstream cannot be reached.
    #[error("cannot reach {0}")]
    Unreachable(String),
    /// The TLS handshake failed (wrong CA, wrong host name, no client certificate...).
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// The server refused CONNECT.
    #[error("CONNACK refused: {0}")]
    Refused(String),
    /// The link broke before CONNACK.
    #[error("{0}")]
    Handshake(String),
    /// The link broke after it was up.
    #[error("connection lost: {0}")]
    Lost(String),
}

impl LinkError {
    /// Whether the link had been up (CONNACK received) before it ended.
    pub fn was_connected(&self) -> bool {
        matches!(self, LinkError::Lost(_))
    }
}

fn connack_meaning(code: ReasonCode, v5: bool) -> String {
    let text = match (v5, code.0) {
        (false, 1) => "unacceptable protocol version",
        (false, 2) => "client identifier rejected",
        (false, 3) => "server unavailable",
        (false, 4) => "bad user name or password",
        (false, 5) => "not authorized",
        (true, 0x84) => "unsupported protocol version",
        (true, 0x85) => "client identifier not valid",
        (true, 0x86) => "bad user name or password",
        (true, 0x87) => "not authorized",
        (true, 0x88) => "server unavailable",
        (true, 0x89) => "server busy",
        (true, 0x8A) => "banned",
        (true, 0x8C) => "bad authentication method",
        (true, 0x95) => "packet too large",
        (true, 0x97) => "quota exceeded",
        (true, 0x9F) => "connection rate exceeded",
        _ => "refused",
    };
    format!("{code} ({text})")
}

/// One connection's state.
pub struct Link<'a> {
    settings: &'a UpstreamSettings,
    buffer: &'a Buffer,
    broker: &'a Broker,
    shutdown: &'a CancellationToken,
}

impl<'a> Link<'a> {
    pub fn new(
        settings: &'a UpstreamSettings,
        buffer: &'a Buffer,
        broker: &'a Broker,
        shutdown: &'a CancellationToken,
    ) -> Self {
        Link { settings, buffer, broker, shutdown }
    }

    /// Connects and runs until the link ends.
    pub async fn run(self) -> Result<(), LinkError> {
        let s = self.settings;
        let address = format!("{}:{}", s.host, s.port);
        let tcp = tokio::select! {
            r = timeout(CONNECT_LIMIT, TcpStream::connect((s.host.as_str(), s.port))) => match r {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(LinkError::Unreachable(format!("{address}: {e}"))),
                Err(_) => return Err(LinkError::Unreachable(format!("{address}: no answer within {}s", CONNECT_LIMIT.as_secs()))),
            },
            _ = self.shutdown.cancelled() => return Err(LinkError::Stopped),
        };
        let _ = tcp.set_nodelay(true);
        match &s.tls {
            None => self.session(tcp).await,
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(s.server_name.clone())
                    .map_err(|e| LinkError::Handshake(format!("server name {:?}: {e}", s.server_name)))?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = tokio::select! {
                    r = timeout(CONNECT_LIMIT, connector.connect(name, tcp)) => match r {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return Err(LinkError::Tls(e)),
                        Err(_) => return Err(LinkError::Tls(io::Error::new(io::ErrorKind::TimedOut, "no answer"))),
                    },
                    _ = self.shutdown.cancelled() => return Err(LinkError::Stopped),
                };
                self.session(tls).await
            }
        }
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin>(self, stream: S) -> Result<(), LinkError> {
        let s = self.settings;
        let v5 = s.protocol == Protocol::V5;
        let (read, write) = tokio::io::split(stream);
        let mut reader = PacketReader::new(read, MAX_INCOMING);
        reader.version = Some(s.protocol);
        let mut writer = PacketWriter::new(write);
        writer.version = s.protocol;
        let keep_alive_secs = s.keep_alive.as_secs().clamp(1, 65_535) as u16;
        writer.queue(&Packet::Connect(Box::new(Connect {
            protocol: s.protocol,
            clean_start: true,
            keep_alive: keep_alive_secs,
            client_id: s.client_id.clone(),
            will: Some(Will {
                topic: s.status_topic.clone(),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
            }),
            username: s.username.clone(),
            password: s.password.clone(),
            properties: Properties::default(),
        })));
        let answer_limit = (s.keep_alive * 3 / 2).clamp(Duration::from_secs(2), Duration::from_secs(30));
        let handshake = async {
            writer.flush().await.map_err(|e| LinkError::Handshake(format!("sending CONNECT: {e}")))?;
            match reader.read_packet().await {
                Ok(Some(Packet::Connack(c))) => Ok(c),
                Ok(Some(other)) => Err(LinkError::Handshake(format!("expected CONNACK, got {other:?}"))),
                Ok(None) => {
                    Err(LinkError::Handshake("the upstream closed the connection before CONNACK".into()))
                }
                Err(e) => Err(LinkError::Handshake(format!("reading CONNACK: {e}"))),
            }
        };
        let connack = tokio::select! {
            r = timeout(answer_limit, handshake) => match r {
                Ok(r) => r?,
                Err(_) => return Err(LinkError::Handshake(format!("no CONNACK within {}s", answer_limit.as_secs()))),
            },
            _ = self.shutdown.cancelled() => return Err(LinkError::Stopped),
        };
        if connack.code.0 != 0 {
            return Err(LinkError::Refused(connack_meaning(connack.code, v5)));
        }
        let p = &connack.properties;
        let mut capacity = usize::from(s.max_inflight.max(1));
        if let Some(max) = p.receive_maximum {
            capacity = capacity.min(usize::from(max));
        }
        let keep_alive = p.server_keep_alive.map_or(s.keep_alive, |k| Duration::from_secs(u64::from(k)));
        let server_max_packet = p.maximum_packet_size.map_or(usize::MAX, |m| m as usize);
        tracing::info!(upstream = %s.name, "upstream {} connected to {}:{}", s.name, s.host, s.port);

        let mut state = Streaming {
            settings: s,
            buffer: self.buffer,
            broker: self.broker,
            window: InflightWindow::new(capacity),
            queue: VecDeque::new(),
            scanned_to: 0,
            reader: None,
            incoming_qos2: HashSet::new(),
            server_max_packet,
            tokens: 0.0,
            refilled: Instant::now(),
        };
        let cursor_name = s.name.clone();
        let cursor = self
            .buffer
            .cursor(&cursor_name)
            .ok_or_else(|| LinkError::Lost("no cursor for this upstream".into()))?;
        state.scanned_to = cursor.acked();
        state.reader = Some(self.buffer.reader(&cursor_name).map_err(|e| LinkError::Lost(e.to_string()))?);

        // The gateway is online; the will says otherwise if it goes.
        let id = state.window.send(None);
        writer.queue(&publish(&s.status_topic, Bytes::from_static(b"online"), true, id));
        if !s.subscribe.is_empty() {
            let id = state.window.send(None);
            let options = SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                // MQTT 5: no replay of retained commands at every reconnect.
                retain_handling: 2,
                ..Default::default()
            };
            writer.queue(&Packet::Subscribe(Subscribe {
                packet_id: id,
                filters: s.subscribe.iter().map(|f| (f.clone(), options)).collect(),
                properties: Properties::default(),
            }));
        }

        let mut committed = self.buffer.committed_rows();
        let mut last_received = Instant::now();
        let mut last_sent = Instant::now();
        let dead_after = keep_alive * 3 / 2;
        loop {
            let upto = *committed.borrow_and_update();
            if state.queue.len() < BATCH && state.scanned_to < upto {
                state.fetch(upto).await?;
            }
            let next_token = state.send(&mut writer);
            state.advance(&cursor, false);
            if writer.pending() > 0 {
                let deadline = last_received + dead_after;
                match tokio::time::timeout_at(
                    deadline.max(Instant::now() + Duration::from_millis(100)),
                    writer.flush(),
                )
                .await
                {
                    Ok(Ok(())) => last_sent = Instant::now(),
                    Ok(Err(e)) => return Err(LinkError::Lost(format!("writing: {e}"))),
                    Err(_) => {
                        return Err(LinkError::Lost(format!(
                            "the upstream stopped reading for {:.1}s (1.5 x keep alive)",
                            dead_after.as_secs_f64()
                        )))
                    }
                }
            }
            let caught_up = state.queue.is_empty() && state.scanned_to >= upto;
            let ping_at = (last_sent + keep_alive).min(last_received + dead_after);
            tokio::select! {
                packet = reader.read_packet() => match packet {
                    Ok(Some(packet)) => {
                        last_received = Instant::now();
                        state.handle(packet, &mut writer, &cursor)?;
                        // Every acknowledgement already read is handled
                        // before the next write: one write answers a burst.
                        while reader.has_complete_packet() {
                            match reader.read_packet().await {
                                Ok(Some(packet)) => state.handle(packet, &mut writer, &cursor)?,
                                Ok(None) => return Err(LinkError::Lost("the upstream closed the connection".into())),
                                Err(e) => return Err(LinkError::Lost(e.to_string())),
                            }
                        }
                    }
                    Ok(None) => return Err(LinkError::Lost("the upstream closed the connection".into())),
                    Err(e) => return Err(LinkError::Lost(e.to_string())),
                },
                Ok(()) = committed.changed(), if caught_up => {}
                _ = sleep_until(next_token.unwrap_or_else(Instant::now)), if next_token.is_some() => {}
                _ = sleep_until(ping_at) => {
                    if last_received.elapsed() >= dead_after {
                        return Err(LinkError::Lost(format!(
                            "no answer for {:.1}s (1.5 x keep alive)",
                            dead_after.as_secs_f64()
                        )));
                    }
                    if last_sent.elapsed() >= keep_alive {
                        writer.queue(&Packet::Pingreq);
                    }
                }
                _ = self.shutdown.cancelled() => {
                    state.finish(&mut writer, &mut reader, &cursor).await;
                    return Err(LinkError::Stopped);
                }
            }
        }
    }
}

fn publish(topic: &str, payload: Bytes, retain: bool, packet_id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain,
        topic: topic.to_owned(),
        packet_id,
        payload,
        properties: Properties::default(),
    })
}

/// The link's state once connected.
struct Streaming<'a> {
    settings: &'a UpstreamSettings,
    buffer: &'a Buffer,
    broker: &'a Broker,
    window: InflightWindow,
    /// Rows read and not yet sent.
    queue: VecDeque<Row>,
    /// Every row up to here has been read (or is not for this upstream).
    scanned_to: i64,
    reader: Option<RowReader>,
    incoming_qos2: HashSet<u16>,
    server_max_packet: usize,
    /// max_rate's token bucket.
    tokens: f64,
    refilled: Instant,
}

impl Streaming<'_> {
    /// Reads the next batch of rows (SQLite is blocking: off the runtime).
    async fn fetch(&mut self, upto: i64) -> Result<(), LinkError> {
        let Some(mut reader) = self.reader.take() else {
            return Err(LinkError::Lost("buffer reader lost".into()));
        };
        let after = self.scanned_to;
        let (reader, batch) = tokio::task::spawn_blocking(move || {
            let batch = reader.batch(after, upto, BATCH);
            (reader, batch)
        })
        .await
        .map_err(|e| LinkError::Lost(format!("buffer read failed: {e}")))?;
        self.reader = Some(reader);
        let batch = batch.map_err(|e| LinkError::Lost(format!("buffer read failed: {e}")))?;
        self.queue.extend(batch.rows);
        self.scanned_to = batch.scanned_to;
        Ok(())
    }

    /// Sends queued rows while the window (and max_rate) allows; returns
    /// when the next token comes if max_rate holds rows back.
    fn send<W: AsyncWrite + Unpin>(&mut self, writer: &mut PacketWriter<W>) -> Option<Instant> {
        let rate = self.settings.max_rate;
        if rate > 0 {
            let now = Instant::now();
            let burst = (f64::from(rate) / 10.0).max(1.0);
            self.tokens =
                (self.tokens + now.duration_since(self.refilled).as_secs_f64() * f64::from(rate)).min(burst);
            self.refilled = now;
        }
        while self.window.has_room() {
            if rate > 0 && self.tokens < 1.0 {
                return (!self.queue.is_empty()).then(|| {
                    Instant::now() + Duration::from_secs_f64((1.0 - self.tokens) / f64::from(rate))
                });
            }
            let Some(row) = self.queue.pop_front() else { break };
            let topic = self.settings.upstream_topic(&row.topic);
            let id = self.window.send(Some(row.id));
            if topic.len() + row.payload.len() + 16 > self.server_max_packet {
                tracing::warn!(upstream = %self.settings.name, %topic, bytes = row.payload.len(), "message larger than the upstream accepts: skipped");
                self.window.ack(id);
                continue;
            }
            writer.queue(&publish(&topic, row.payload, row.retain, id));
            if rate > 0 {
                self.tokens -= 1.0;
            }
            if writer.pending() > 256 * 1024 {
                break;
            }
        }
        None
    }

    /// Moves the cursor as far as every row before it is done.
    fn advance(&self, cursor: &crate::buffer::Cursor, delivered: bool) {
        let safe = match (self.window.first_unacked(), self.queue.front()) {
            (Some(id), _) => id - 1,
            (None, Some(row)) => row.id - 1,
            (None, None) => self.scanned_to,
        };
        if safe > cursor.acked() {
            cursor.advance(safe, delivered);
            self.buffer.nudge();
        }
    }

    fn handle<W: AsyncWrite + Unpin>(
        &mut self,
        packet: Packet,
        writer: &mut PacketWriter<W>,
        cursor: &crate::buffer::Cursor,
    ) -> Result<(), LinkError> {
        match packet {
            Packet::Puback(ack) => {
                if ack.code.is_error() {
                    tracing::warn!(upstream = %self.settings.name, code = %ack.code, "upstream refused a message (PUBACK); it is not sent again");
                }
                if self.window.ack(ack.packet_id).is_some() {
                    self.advance(cursor, true);
                }
            }
            Packet::Suback(suback) => {
                self.window.ack(suback.packet_id);
                for (filter, code) in self.settings.subscribe.iter().zip(&suback.codes) {
                    if code.0 >= 0x80 {
                        tracing::warn!(upstream = %self.settings.name, %filter, %code, "upstream refused a subscription");
                    }
                }
            }
            Packet::Publish(publish) => self.bring_down(publish, writer),
            Packet::Pubrel(ack) => {
                self.incoming_qos2.remove(&ack.packet_id);
                writer.queue(&Packet::Pubcomp(Ack::ok(ack.packet_id)));
            }
            Packet::Pingresp => {}
            Packet::Disconnect(d) => {
                let why = d.properties.reason_string.unwrap_or_default();
                return Err(LinkError::Lost(format!("the upstream sent DISCONNECT {} {why}", d.code)));
            }
            other => {
                return Err(LinkError::Lost(format!("unexpected packet from the upstream: {other:?}")));
            }
        }
        Ok(())
    }

    /// A message from a `subscribe` filter: into the local broker, the
    /// prefix stripped, never forwarded back up.
    fn bring_down<W: AsyncWrite + Unpin>(&mut self, publish: Publish, writer: &mut PacketWriter<W>) {
        let local = publish.topic.strip_prefix(self.settings.topic_prefix.as_str()).unwrap_or(&publish.topic);
        let fresh = publish.qos != QoS::ExactlyOnce || self.incoming_qos2.insert(publish.packet_id);
        if fresh {
            match TopicName::new(local) {
                Ok(topic) => {
                    self.broker.route_from_upstream(Envelope {
                        topic,
                        payload: publish.payload,
                        qos: publish.qos,
                        retain: publish.retain,
                        properties: forwarded(publish.properties),
                        expires_at: None,
                        publisher: None,
                    });
                }
                Err(e) => {
                    tracing::warn!(upstream = %self.settings.name, topic = %publish.topic, "message from upstream ignored: {e}")
                }
            }
        }
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => writer.queue(&Packet::Puback(Ack::ok(publish.packet_id))),
            QoS::ExactlyOnce => writer.queue(&Packet::Pubrec(Ack::ok(publish.packet_id))),
        }
    }

    /// A clean stop: waits briefly for what is in flight to be
    /// acknowledged (so a restart does not send it again), says `offline`
    /// and disconnects.
    async fn finish<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut PacketWriter<W>,
        reader: &mut PacketReader<R>,
        cursor: &crate::buffer::Cursor,
    ) {
        let id = self.window.send(None);
        writer.queue(&publish(&self.settings.status_topic, Bytes::from_static(b"offline"), true, id));
        let _ = timeout(Duration::from_secs(2), async {
            if writer.flush().await.is_err() {
                return;
            }
            while self.window.len() > 0 {
                match reader.read_packet().await {
                    Ok(Some(Packet::Puback(ack))) => {
                        if self.window.ack(ack.packet_id).is_some() {
                            self.advance(cursor, true);
                        }
                    }
                    Ok(Some(_)) => {}
                    _ => return,
                }
            }
        })
        .await;
        writer.queue(&Packet::Disconnect(Disconnect::new(ReasonCode::SUCCESS)));
        writer.close().await;
        tracing::info!(upstream = %self.settings.name, "upstream {} disconnected", self.settings.name);
    }
}
