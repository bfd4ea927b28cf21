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
//! the allocator. A plain TCP connection that stays idle stops being a
//! task altogether: it is parked (`parking.rs`) and resumed when something
//! happens.

use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep, timeout, Sleep};

use super::client::{Client, Exit, Resting};
use super::connect::handshake;
use super::mailbox::Mailbox;
use super::parking::{Parkable, ParkingLot};
use super::stats::BrokerStats;
use super::{Broker, Ending};
use crate::connection::{Inbox, Outbox};
use crate::packet::*;
use crate::QuickAck;

/// Serves one client on `stream` until it leaves, fails or the broker
/// stops. `slot`, its place under `max_connections`, is held until then.
///
/// Any stream will do (TCP, TLS, WebSocket): the connection only polls it.
/// One that is not `Unpin` can come as `Pin<Box<S>>`.
pub fn serve_client<S>(stream: S, broker: Broker, origin: Origin, slot: OwnedSemaphorePermit) -> Serve<S>
where
    S: AsyncRead + AsyncWrite + QuickAck + Parkable + Unpin + Send + 'static,
{
    let handshake = async move {
        let (stream, client, inbox) = handshake(stream, broker, origin).await?;
        Some(Connection::new(stream, client, inbox, Idle::ParkNow))
    };
    Serve { step: Step::Handshake(Box::pin(handshake)), slot: Some(slot) }
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
    /// Given to the parking lot with the connection when it parks.
    slot: Option<OwnedSemaphorePermit>,
}

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

// `Run` is where a connection spends its life; boxing it would cost an
// allocation per connection to shrink states that last milliseconds.
#[allow(clippy::large_enum_variant)]
enum Step<S> {
    Handshake(Boxed<Option<Connection<S>>>),
    /// Back from the parking lot: the socket returns to tokio in the task,
    /// not in whatever woke the connection.
    Resume(Parked, Broker),
    Run(Connection<S>),
    Finish(Boxed<()>),
    Done,
}

impl<S> Future for Serve<S>
where
    S: AsyncRead + AsyncWrite + QuickAck + Parkable + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Serve { step, slot } = &mut *self;
        loop {
            match step {
                Step::Handshake(handshake) => match ready!(handshake.as_mut().poll(cx)) {
                    Some(connection) => *step = Step::Run(connection),
                    None => *step = Step::Done,
                },
                Step::Resume(..) => {
                    if let Step::Resume(parked, broker) = std::mem::replace(step, Step::Done) {
                        let Parked { socket, client, slot: held } = parked;
                        *slot = held;
                        let client = Client::wake(client, broker);
                        match S::from_socket(socket) {
                            Ok(stream) => {
                                // Waiting first: a takeover or a stop that came
                                // meanwhile is seen before any mail goes out.
                                let mut connection =
                                    Connection::new(stream, client, Inbox::new(), Idle::Resumed);
                                connection.phase = Phase::Wait;
                                *step = Step::Run(connection);
                            }
                            Err(e) => {
                                tracing::warn!(client = %client.client_id(), error = %e, "cannot resume a parked connection; closed");
                                end(client, Exit::Abnormal(None));
                            }
                        }
                    }
                }
                Step::Run(connection) => {
                    let outcome = ready!(connection.poll_run(cx));
                    if let Step::Run(connection) = std::mem::replace(step, Step::Done) {
                        match outcome {
                            Outcome::Park(lot) => {
                                // The task ends; the connection lives on in the lot.
                                connection.park(lot, slot.take());
                                return Poll::Ready(());
                            }
                            Outcome::Exit(exit) => *step = Step::Finish(Box::pin(connection.finish(exit))),
                        }
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
    idle: Idle,
}

/// How the connection stands with the parking lot (`parking.rs`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// Parks the first time it has nothing to do: a fresh connection.
    ParkNow,
    /// Resumed from the lot: asks to be looked at the next tick.
    Resumed,
    /// Asked to be looked at the next tick; parks then unless `active`
    /// (it read a packet or sent something since it asked).
    Asked { active: bool },
}

/// What the connection's run ends with.
enum Outcome {
    Exit(Exit),
    /// Idle: the connection goes to the lot.
    Park(Arc<ParkingLot>),
}

impl From<Exit> for Outcome {
    fn from(exit: Exit) -> Self {
        Outcome::Exit(exit)
    }
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

impl<S: AsyncRead + AsyncWrite + QuickAck + Parkable + Unpin> Connection<S> {
    fn new(stream: S, client: Client, inbox: Inbox, idle: Idle) -> Self {
        Connection { stream, client, inbox, phase: Phase::Work, noticed: false, write_timer: None, idle }
    }

    /// The connection's life after CONNACK; ready with how it ended, or
    /// when it is to be parked.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let Connection { stream, client, inbox, phase, noticed, write_timer, idle } = self;
        let mut stream = Pin::new(stream);
        loop {
            match *phase {
                Phase::Work => {
                    if client.pump() {
                        // More mail than one write takes: more work once written.
                        *noticed = true;
                    }
                    client.release_acks();
                    if client.outbox.pending() > 0 {
                        idle.active();
                    }
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
                        // Reading first, even with work due (`noticed`): a
                        // flood of mail must not keep the client's packets
                        // (its PINGREQ, its acknowledgements) unread.
                        *phase = Phase::Wait;
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(client = %client.client_id(), error = %e, "write failed");
                        return Poll::Ready(Exit::Abnormal(None).into());
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
                            return Poll::Ready(exit.into());
                        }
                        let limit = client.write_limit();
                        let timer = write_timer.get_or_insert_with(|| Box::pin(sleep(limit)));
                        if timer.as_mut().poll(cx).is_ready() {
                            tracing::info!(client = %client.client_id(), "client stopped reading; closing");
                            return Poll::Ready(Exit::Abnormal(None).into());
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
                        return Poll::Ready(exit.into());
                    }
                    if client.terms.keep_alive != 0 && client.claim.mailbox.keepalive_expired() {
                        return Poll::Ready(client.keepalive_expired().into());
                    }
                    let max = client.broker.settings().max_packet_size;
                    match inbox.poll_packet(stream.as_mut(), cx, max, Some(client.terms.version)) {
                        Poll::Ready(Ok(Some(packet))) => {
                            idle.active();
                            let stats = &client.broker.shared.stats;
                            BrokerStats::add(&stats.bytes_received, u64::from(inbox.take_consumed()));
                            // The deadline may have passed just before this
                            // packet was read: then it closes the connection.
                            if client.terms.keep_alive != 0
                                && !client.broker.keep_alive(&client.claim, client.grace())
                            {
                                return Poll::Ready(client.keepalive_expired().into());
                            }
                            if let Some(exit) = client.handle(packet) {
                                return Poll::Ready(exit.into());
                            }
                            *phase = Phase::Work;
                            continue;
                        }
                        Poll::Ready(Ok(None)) => return Poll::Ready(Exit::Abnormal(None).into()),
                        Poll::Ready(Err(e)) => return Poll::Ready(client.on_read_error(e).into()),
                        Poll::Pending => {}
                    }
                    if std::mem::take(noticed)
                        || client.claim.mailbox.poll_notified(cx).is_ready()
                        || client.poll_committed(cx).is_ready()
                    {
                        *phase = Phase::Work;
                        continue;
                    }
                    // Nothing to do until one of the wakers above fires.
                    inbox.release();
                    client.outbox.release();
                    if S::PARKABLE {
                        if let Some(lot) = time_to_park(client, inbox, idle) {
                            return Poll::Ready(Outcome::Park(lot));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Hands the connection to the parking lot; its task then ends.
    fn park(self, lot: Arc<ParkingLot>, slot: Option<OwnedSemaphorePermit>) {
        let Connection { stream, client, .. } = self;
        match stream.into_socket() {
            Ok(socket) => lot.park(Parked { socket, client: client.rest(), slot }),
            Err(e) => {
                tracing::warn!(client = %client.client_id(), error = %e, "cannot park the connection; closed");
                end(client, Exit::Abnormal(None));
            }
        }
    }

    /// Says goodbye as `exit` requires, closes, and releases the session.
    async fn finish(self, exit: Exit) {
        let Connection { mut stream, mut client, .. } = self;
        let reason = match exit {
            Exit::Disconnected { .. } => None,
            Exit::Abnormal(reason) => reason,
            Exit::Shutdown => {
                // What was queued before the stop (final statuses) goes out
                // first, all of it (the mailbox's bounds bound it).
                while client.pump() {}
                Some(ReasonCode::SERVER_SHUTTING_DOWN)
            }
        };
        if let (Some(reason), true) = (reason, client.v5()) {
            client.queue(&Packet::Disconnect(Disconnect::new(reason)));
        }
        close(&mut stream, &mut client.outbox).await;
        end(client, exit);
    }
}

impl Idle {
    fn active(&mut self) {
        if let Idle::Asked { active } = self {
            *active = true;
        }
    }
}

/// The lot to park in, when the connection (idle now) is to be parked:
/// a fresh one at once, a resumed one when the lot's ticker asks and it
/// did nothing since the last tick. Only a connection with nothing held
/// (a partial packet, acknowledgements waiting for the buffer) parks.
fn time_to_park(client: &Client, inbox: &Inbox, idle: &mut Idle) -> Option<Arc<ParkingLot>> {
    let lot = client.broker.parking().filter(|lot| lot.is_open())?;
    let quiet = !inbox.has_buffered() && client.quiet();
    match *idle {
        Idle::ParkNow if quiet => return Some(lot.clone()),
        Idle::ParkNow | Idle::Resumed => {}
        Idle::Asked { active } => {
            if !client.claim.mailbox.take_park_request() {
                return None;
            }
            if quiet && !active {
                return Some(lot.clone());
            }
        }
    }
    lot.ask_later(client.claim.mailbox.clone(), client.claim.generation);
    *idle = Idle::Asked { active: false };
    None
}

/// The connection is over: its will (unless it said goodbye without one,
/// or the broker stops) goes, and its session is released.
fn end(mut client: Client, exit: Exit) {
    tracing::debug!(client = %client.client_id(), "client disconnected");
    let will = client.terms.will.take();
    let will = match exit {
        Exit::Disconnected { with_will } => will.filter(|_| with_will),
        Exit::Abnormal(_) => will,
        Exit::Shutdown => None,
    };
    // A will is checked against the rules in force when it goes.
    let will = will.filter(|w| client.broker.access().may_write(client.user(), client.client_id(), &w.topic));
    let Client { broker, claim, terms, .. } = client;
    broker.shared.stats.client_disconnected();
    broker.release(claim, Ending { will, session_expiry: terms.session_expiry });
}

/// A connection parked while idle (see `parking.rs`): its socket, its
/// client at rest, its place under `max_connections`.
pub(super) struct Parked {
    pub(super) socket: std::net::TcpStream,
    client: Resting,
    slot: Option<OwnedSemaphorePermit>,
}

impl Parked {
    /// The mailbox that wakes it.
    pub(super) fn mailbox(&self) -> &Mailbox {
        self.client.mailbox()
    }

    /// The task that runs the connection again, as a client of `broker`;
    /// it first looks at its mailbox, then reads.
    pub(super) fn resume(self, broker: Broker) -> Serve<TcpStream> {
        Serve { step: Step::Resume(self, broker), slot: None }
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
pub(super) async fn close<S>(stream: &mut S, outbox: &mut Outbox)
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
    fn a_connection_task_stays_in_the_384_byte_class() {
        // tokio 1.54 puts 104 bytes around a task's future (header,
        // scheduler, id, stage tag, trailer) and rounds the cell up to 128
        // bytes; the listener's task tracker adds 8. Up to 272 bytes the
        // cell of a connection is 384 bytes, past that 512. Measured as the
        // gateway builds it (`cargo test --workspace`): tokio's
        // rt-multi-thread makes a TcpStream 8 bytes larger.
        let size = std::mem::size_of::<Serve<tokio::net::TcpStream>>();
        assert!(size <= 272, "the connection task grew to {size} bytes");
    }
}
