//! The task of one network connection, from CONNECT to close.
//!
//! Most connections of a broker are idle most of the time (a sensor that
//! publishes once a minute), so what an idle connection holds is kept
//! small. The task is [`Serve`], a plain state machine: the CONNECT
//! handshake and the closing run in boxed futures, freed when they end, so
//! the task does not carry their largest state for its whole life. In
//! between, the connection waits in one poll function over the socket, its
//! mailbox (new mail, a takeover, the broker stopping, the keep alive
//! expiring: see `keepalive.rs`), without a future or a timer per wait; and
//! whenever it has nothing to do, its read and write buffers go back to
//! the allocator.

use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep, timeout, Sleep};

use super::client::{kind, Client, Exit, Identity, Terms};
use super::stats::BrokerStats;
use super::{Broker, ClaimRefused, Ending};
use crate::access::{login, Refusal};
use crate::connection::{Inbox, Outbox};
use crate::packet::*;
use crate::{QuickAck, TopicName};

/// Serves one client on `stream` until it leaves, fails or the broker
/// stops. `slot`, its place under `max_connections`, is held until then.
///
/// Any stream will do (TCP, TLS, WebSocket): the connection only polls it.
/// One that is not `Unpin` can come as `Pin<Box<S>>`.
pub fn serve_client<S>(stream: S, broker: Broker, origin: Origin, slot: OwnedSemaphorePermit) -> Serve<S>
where
    S: AsyncRead + AsyncWrite + QuickAck + Unpin + Send + 'static,
{
    Serve { step: Step::Handshake(Box::pin(handshake(stream, broker, origin))), _slot: slot }
}

/// Where a connection comes from.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The peer's address, for log lines.
    pub peer: String,
    /// Its IP address, which failed logins are counted against.
    pub ip: Option<IpAddr>,
    /// The CN of the client certificate TLS verified, if any: the client
    /// is that user without a password.
    pub certificate_user: Option<Arc<str>>,
    /// When the connection must have logged in by, when a TLS or
    /// WebSocket handshake already used part of `connect_timeout`;
    /// otherwise `connect_timeout` from the start of the handshake.
    pub deadline: Option<tokio::time::Instant>,
}

/// The task of one connection: see [`serve_client`].
pub struct Serve<S> {
    step: Step<S>,
    _slot: OwnedSemaphorePermit,
}

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

enum Step<S> {
    Handshake(Boxed<Option<Connection<S>>>),
    Run(Connection<S>),
    Finish(Boxed<()>),
    Done,
}

impl<S> Future for Serve<S>
where
    S: AsyncRead + AsyncWrite + QuickAck + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let step = &mut self.step;
        loop {
            match step {
                Step::Handshake(handshake) => match ready!(handshake.as_mut().poll(cx)) {
                    Some(connection) => *step = Step::Run(connection),
                    None => *step = Step::Done,
                },
                Step::Run(connection) => {
                    let exit = ready!(connection.poll_run(cx));
                    if let Step::Run(connection) = std::mem::replace(step, Step::Done) {
                        *step = Step::Finish(Box::pin(connection.finish(exit)));
                    }
                }
                Step::Finish(finish) => {
                    ready!(finish.as_mut().poll(cx));
                    *step = Step::Done;
                }
                Step::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Reads and checks CONNECT, claims the session and queues CONNACK; `None`
/// when the connection is refused or gone.
async fn handshake<S>(mut stream: S, broker: Broker, origin: Origin) -> Option<Connection<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let peer = origin.peer.as_str();
    let mut inbox = Inbox::new();
    let settings = broker.settings();
    let read = poll_fn(|cx| inbox.poll_packet(Pin::new(&mut stream), cx, settings.max_packet_size, None));
    let deadline = origin.deadline.unwrap_or_else(|| tokio::time::Instant::now() + settings.connect_timeout);
    let first = tokio::time::timeout_at(deadline, read).await;
    let mut connect = match first {
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within {}s; closing", settings.connect_timeout.as_secs());
            return None;
        }
        Ok(Ok(Some(Packet::Connect(connect)))) => connect,
        Ok(Ok(None)) => return None,
        Ok(Ok(Some(other))) => {
            // MQTT-3.1.0-1: the first packet must be CONNECT.
            tracing::info!(%peer, packet = ?kind(&other), "first packet is not CONNECT; closing");
            return None;
        }
        Ok(Err(e)) => {
            if e.reason() == Some(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION) {
                // MQTT-3.1.2-2: CONNACK 0x01 (3.1.1's code), then close.
                let mut outbox = Outbox::default();
                outbox.queue(&connack(false, ReasonCode(0x01), Properties::default()), Protocol::V311);
                close(&mut stream, &mut outbox).await;
            }
            tracing::info!(%peer, error = %e, "bad CONNECT; closing");
            return None;
        }
    };
    BrokerStats::add(&broker.shared.stats.bytes_received, u64::from(inbox.take_consumed()));
    let version = connect.protocol;
    let v5 = version == Protocol::V5;
    let refuse = |code: ReasonCode, v311_code: u8, client: &str, why: &str| {
        tracing::info!(%peer, %client, %code, "connection refused: {why}");
        let mut outbox = Outbox::default();
        outbox.queue(
            &connack(false, if v5 { code } else { ReasonCode(v311_code) }, Properties::default()),
            version,
        );
        outbox
    };
    let mut assigned = None;
    if connect.client_id.is_empty() {
        if !v5 && !connect.clean_start {
            // MQTT-3.1.3-8: a zero-length id needs a clean session in 3.1.1.
            let why = "empty client id without clean session";
            let mut outbox = refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, 0x02, "", why);
            close(&mut stream, &mut outbox).await;
            return None;
        }
        let id = format!("fieldmq-{:016x}", crate::random::random_u64());
        connect.client_id.clone_from(&id);
        assigned = Some(id);
    }
    // Read before the rules the login uses: a reload in between is caught.
    let login_epoch = broker.access_epoch();
    let access = broker.access();
    let checked = login(
        access.clone(),
        &broker.shared.guard,
        deadline,
        origin.ip,
        origin.certificate_user.clone(),
        connect.username.as_deref(),
        connect.password.as_deref(),
    );
    // Waiting for a password check counts against the connect timeout too.
    let user = match checked.await {
        Ok(user) => user,
        Err(refusal) => {
            // The same answer for an unknown user and a wrong password.
            let (code, why) = match refusal {
                Refusal::BadCredentials => {
                    (ReasonCode::BAD_USER_NAME_OR_PASSWORD, "bad user name or password")
                }
                Refusal::AnonymousNotAllowed => {
                    (ReasonCode::NOT_AUTHORIZED, "anonymous clients are not allowed")
                }
                Refusal::Busy => (ReasonCode::SERVER_BUSY, "the password check waited past connect_timeout"),
            };
            // 3.1.1's 0x05 (not authorized) for both, as mosquitto answers;
            // 0x03 (server unavailable) when it was only busy.
            let v311 = if refusal == Refusal::Busy { 0x03 } else { 0x05 };
            let why = match &connect.username {
                Some(user) => format!("{why} (user `{user}`)"),
                None => why.to_owned(),
            };
            let mut outbox = refuse(code, v311, &connect.client_id, &why);
            close(&mut stream, &mut outbox).await;
            return None;
        }
    };
    if let Some(will) = &connect.will {
        if TopicName::new(will.topic.as_str()).is_err() {
            let mut outbox =
                refuse(ReasonCode::TOPIC_NAME_INVALID, 0x02, &connect.client_id, "invalid will topic");
            close(&mut stream, &mut outbox).await;
            return None;
        }
        // A will is a publish like any other: the ACL must allow it.
        if !access.may_write(user.as_deref(), &connect.client_id, &will.topic) {
            let why = "the ACL does not allow the will's topic";
            let mut outbox = refuse(ReasonCode::NOT_AUTHORIZED, 0x05, &connect.client_id, why);
            close(&mut stream, &mut outbox).await;
            return None;
        }
    }
    drop(access);
    let terms = terms(&broker, &mut connect);
    let client_id: Arc<str> = connect.client_id.as_str().into();
    let claim = broker.claim(client_id, connect.clean_start, terms.session_expiry, user.clone(), login_epoch);
    let claim = match claim.await {
        Ok(claim) => claim,
        Err(refused) => {
            let (code, v311, why) = match refused {
                ClaimRefused::OtherUser => (
                    ReasonCode::NOT_AUTHORIZED,
                    0x05,
                    "the client id's session belongs to another user's connection",
                ),
                ClaimRefused::Reloaded => (
                    ReasonCode::SERVER_BUSY,
                    0x03,
                    "the password and ACL files were reloaded during the login; try again",
                ),
            };
            let mut outbox = refuse(code, v311, &connect.client_id, why);
            close(&mut stream, &mut outbox).await;
            return None;
        }
    };
    let settings = broker.settings();
    let properties = if v5 {
        Properties {
            receive_maximum: Some(settings.receive_maximum),
            topic_alias_maximum: Some(settings.topic_alias_maximum),
            maximum_packet_size: Some(settings.max_packet_size as u32),
            assigned_client_identifier: assigned,
            server_keep_alive: (terms.keep_alive != connect.keep_alive).then_some(terms.keep_alive),
            retain_available: Some(1),
            wildcard_subscription_available: Some(1),
            subscription_identifier_available: Some(1),
            shared_subscription_available: Some(1),
            ..Properties::default()
        }
    } else {
        Properties::default()
    };
    let session_present = claim.session_present;
    let identity = Box::new(Identity { peer: peer.into(), user });
    let mut client = Client::new(broker, claim, terms, identity);
    client.broker.shared.stats.client_connected();
    client.queue(&connack(session_present, ReasonCode::SUCCESS, properties));
    tracing::debug!(peer = %client.identity.peer, client = %client.client_id(), v5, session_present, "client connected");
    client.resend_inflight();
    if client.keep_alive != 0 {
        client.broker.watch_keepalive(&client.claim, client.grace());
    }
    Some(Connection { stream, client, inbox, phase: Phase::Work, noticed: false, write_timer: None })
}

/// The limits CONNECT settles; takes the will out of it.
fn terms(broker: &Broker, connect: &mut Connect) -> Terms {
    let v5 = connect.protocol == Protocol::V5;
    let settings = broker.settings();
    let p = &connect.properties;
    // A 5.0 client's Receive Maximum is its limit, ours is max_inflight:
    // in-flight messages have left the bounded mailbox, so they need one.
    let send_quota = if v5 {
        p.receive_maximum.unwrap_or(u16::MAX).min(settings.max_inflight)
    } else {
        settings.max_inflight
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
    Terms {
        version: connect.protocol,
        keep_alive,
        send_quota,
        outbound_alias_max: if v5 { p.topic_alias_maximum.unwrap_or(0) } else { 0 },
        client_max_packet: p.maximum_packet_size.unwrap_or(u32::MAX),
        session_expiry,
        will: connect.will.take().map(Box::new),
    }
}

fn connack(session_present: bool, code: ReasonCode, properties: Properties) -> Packet {
    Packet::Connack(Connack { session_present, code, properties })
}

/// A connected client, its stream, and where its connection stands.
struct Connection<S> {
    stream: S,
    client: Client,
    inbox: Inbox,
    phase: Phase,
    /// The mailbox signalled while a write was blocked: work is due once
    /// the write is done (the signal was taken to be woken again).
    noticed: bool,
    /// Runs while a write is blocked (the client does not read).
    write_timer: Option<Pin<Box<Sleep>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Mail and released acknowledgements go to the output buffer.
    Work,
    /// The output buffer goes to the socket.
    Flush,
    /// Waiting for the next thing to happen.
    Wait,
}

impl<S: AsyncRead + AsyncWrite + QuickAck + Unpin> Connection<S> {
    /// The connection's life after CONNACK; ready with how it ended.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Exit> {
        let Connection { stream, client, inbox, phase, noticed, write_timer } = self;
        let mut stream = Pin::new(stream);
        loop {
            match *phase {
                Phase::Work => {
                    client.pump();
                    client.release_acks();
                    // Answers to a burst of packets go out in one write, once
                    // no whole packet is left to read.
                    let flush = !inbox.has_complete_packet() || client.outbox.pending() > 64 * 1024;
                    if flush && client.outbox.pending() == 0 && !inbox.has_buffered() {
                        // Nothing to carry the ACK: see quickack.rs.
                        stream.quick_ack();
                    }
                    *phase = if flush { Phase::Flush } else { Phase::Wait };
                }
                Phase::Flush => match client.outbox.poll_flush(stream.as_mut(), cx) {
                    Poll::Ready(Ok(())) => {
                        *write_timer = None;
                        *phase = if std::mem::take(noticed) { Phase::Work } else { Phase::Wait };
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(client = %client.client_id(), error = %e, "write failed");
                        return Poll::Ready(Exit::Abnormal(None));
                    }
                    Poll::Pending => {
                        // A client that stopped reading must not hold off a
                        // takeover, a revocation or the broker's stop until its
                        // write limit: each wakes the task through the mailbox
                        // (registered here), and ends it here.
                        // Until Pending: that is when the waker is registered.
                        while client.claim.mailbox.poll_notified(cx).is_ready() {
                            *noticed = true;
                        }
                        if let Some(exit) = told_to_go(client) {
                            return Poll::Ready(exit);
                        }
                        let limit = client.write_limit();
                        let timer = write_timer.get_or_insert_with(|| Box::pin(sleep(limit)));
                        if timer.as_mut().poll(cx).is_ready() {
                            tracing::info!(client = %client.client_id(), "client stopped reading; closing");
                            return Poll::Ready(Exit::Abnormal(None));
                        }
                        return Poll::Pending;
                    }
                },
                Phase::Wait => {
                    // Looked at before reading, so a client that never stops
                    // sending can still be taken over, and stopped. Each is
                    // set before the mailbox is woken for it, and the mailbox
                    // is polled after: one of the two is seen.
                    if let Some(exit) = told_to_go(client) {
                        return Poll::Ready(exit);
                    }
                    if client.keep_alive != 0 && client.claim.mailbox.keepalive_expired() {
                        return Poll::Ready(client.keepalive_expired());
                    }
                    let max = client.broker.settings().max_packet_size;
                    match inbox.poll_packet(stream.as_mut(), cx, max, Some(client.version)) {
                        Poll::Ready(Ok(Some(packet))) => {
                            let stats = &client.broker.shared.stats;
                            BrokerStats::add(&stats.bytes_received, u64::from(inbox.take_consumed()));
                            // The deadline may have passed just before this
                            // packet was read: then it closes the connection.
                            if client.keep_alive != 0
                                && !client.broker.keep_alive(&client.claim, client.grace())
                            {
                                return Poll::Ready(client.keepalive_expired());
                            }
                            if let Some(exit) = client.handle(packet) {
                                return Poll::Ready(exit);
                            }
                            *phase = Phase::Work;
                            continue;
                        }
                        Poll::Ready(Ok(None)) => return Poll::Ready(Exit::Abnormal(None)),
                        Poll::Ready(Err(e)) => return Poll::Ready(client.on_read_error(e)),
                        Poll::Pending => {}
                    }
                    if client.claim.mailbox.poll_notified(cx).is_ready()
                        || client.poll_committed(cx).is_ready()
                    {
                        *phase = Phase::Work;
                        continue;
                    }
                    // Nothing to do until one of the wakers above fires.
                    inbox.release();
                    client.outbox.release();
                    return Poll::Pending;
                }
            }
        }
    }

    /// Says goodbye as `exit` requires, closes, and releases the session.
    async fn finish(self, exit: Exit) {
        let Connection { mut stream, mut client, .. } = self;
        if matches!(exit, Exit::Shutdown) {
            // What was queued before the stop (final statuses) goes out first.
            client.pump();
        }
        let will = client.will.take();
        let (reason, will) = match exit {
            Exit::Disconnected { with_will } => (None, will.filter(|_| with_will)),
            Exit::Abnormal(reason) => (reason, will),
            Exit::Shutdown => (Some(ReasonCode::SERVER_SHUTTING_DOWN), None),
        };
        if let (Some(reason), true) = (reason, client.v5()) {
            client.queue(&Packet::Disconnect(Disconnect::new(reason)));
        }
        close(&mut stream, &mut client.outbox).await;
        tracing::debug!(client = %client.client_id(), "client disconnected");
        // A will is checked against the rules in force when it goes.
        let will =
            will.filter(|w| client.broker.access().may_write(client.user(), client.client_id(), &w.topic));
        let Client { broker, claim, session_expiry, .. } = client;
        broker.shared.stats.client_disconnected();
        broker.release(claim, Ending { will, session_expiry });
    }
}

/// How the connection ends when something outside it says it must: a
/// takeover, the broker stopping, or its credentials revoked by a reload.
/// Each is set before the mailbox is woken for it.
fn told_to_go(client: &Client) -> Option<Exit> {
    if client.claim.taken_over() {
        tracing::info!(client = %client.client_id(), "session taken over by a new connection");
        return Some(Exit::Abnormal(Some(ReasonCode::SESSION_TAKEN_OVER)));
    }
    if client.broker.is_shutting_down() {
        return Some(Exit::Shutdown);
    }
    if client.claim.mailbox.revoked() {
        tracing::info!(client = %client.client_id(), user = client.user().unwrap_or(""), "password removed or changed by a reload; disconnected");
        return Some(Exit::Abnormal(Some(ReasonCode::NOT_AUTHORIZED)));
    }
    None
}

/// Writes what is queued, then shuts the stream down; gives up after a
/// second (a peer that does not read must not hold the connection's task).
async fn close<S>(stream: &mut S, outbox: &mut Outbox)
where
    S: AsyncWrite + Unpin,
{
    let mut flushed = false;
    let closing = poll_fn(|cx| {
        if !flushed {
            // A failed write does not stop the shutdown.
            let _ = ready!(outbox.poll_flush(Pin::new(&mut *stream), cx));
            flushed = true;
        }
        Pin::new(&mut *stream).poll_shutdown(cx)
    });
    let _ = timeout(Duration::from_secs(1), closing).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_connection_task_stays_in_the_384_byte_class() {
        // tokio 1.54 puts 104 bytes around a task's future (header,
        // scheduler, id, stage tag, trailer) and rounds the cell up to 128
        // bytes; the listener's task tracker adds 8. Up to 272 bytes the
        // cell of an idle connection is 384 bytes, past that 512.
        let size = std::mem::size_of::<Serve<tokio::net::TcpStream>>();
        assert!(size <= 272, "the connection task grew to {size} bytes");
    }
}
