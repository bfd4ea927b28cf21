//! The broker's listeners: plain TCP, TLS, MQTT over WebSocket and
//! WebSocket over TLS, each an accept loop feeding the same
//! `serve_client`.
//!
//! Each accepted socket becomes its own task; whatever happens in it stays
//! in it, TLS and WebSocket handshakes included (bounded by the connect
//! timeout, so a socket that never speaks is closed). A semaphore shared
//! by every listener caps the connections: past `max_connections` a new
//! client is refused (CONNACK "server unavailable" on plain TCP, a close
//! otherwise) and the ones already connected are not disturbed.
//!
//! - `tls.rs`: the rustls server configuration and the client
//!   certificate's common name.

pub mod tls;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at};
pub use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{serve_client, Broker, Origin};
use crate::connection::{Inbox, Outbox};
use crate::packet::{Connack, Packet, Properties, Protocol, ReasonCode};
use crate::QuickAck;

/// What a listener speaks on top of TCP.
#[derive(Clone)]
pub enum Transport {
    /// MQTT straight on TCP.
    Tcp,
    /// MQTT over TLS.
    Tls(TlsAcceptor),
    /// MQTT over WebSocket (subprotocol `mqtt`).
    WebSocket,
    /// MQTT over WebSocket over TLS.
    WebSocketTls(TlsAcceptor),
}

impl Transport {
    /// How the config and the log call it.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "mqtt",
            Transport::Tls(_) => "mqtts",
            Transport::WebSocket => "ws",
            Transport::WebSocketTls(_) => "wss",
        }
    }
}

/// Refusals answered with a CONNACK at once, at most; past that a refused
/// socket is just closed (a flood must not become a flood of tasks).
const POLITE_REFUSALS: usize = 64;

/// The connection slots every listener of a broker shares.
pub struct Slots {
    free: Arc<Semaphore>,
    max: usize,
    refusing: AtomicBool,
    polite: Arc<Semaphore>,
}

impl Slots {
    /// Room for `max` connections.
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            free: Arc::new(Semaphore::new(max)),
            max,
            refusing: AtomicBool::new(false),
            polite: Arc::new(Semaphore::new(POLITE_REFUSALS)),
        })
    }

    fn take(&self) -> Option<OwnedSemaphorePermit> {
        match self.free.clone().try_acquire_owned() {
            Ok(permit) => {
                if self.refusing.swap(false, Ordering::Relaxed) {
                    tracing::info!("below max_connections again: accepting new connections");
                }
                Some(permit)
            }
            Err(_) => {
                // Said once per episode, not once per refused socket.
                if !self.refusing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(max = self.max, "max_connections reached: refusing new connections");
                }
                None
            }
        }
    }
}

/// Accepts clients on `listener` until `shutdown`; `slots` is shared by
/// every listener of the broker.
/// Returns once `shutdown` is cancelled and every client of this listener
/// has finished (each sends what it has queued, then closes).
pub async fn serve(
    listener: TcpListener,
    transport: Transport,
    broker: Broker,
    slots: Arc<Slots>,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let clients = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => {
                clients.close();
                clients.wait().await;
                // Idle clients parked outside any listener's tasks end too.
                broker.parked_connections_ended().await;
                return;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, then go on.
                tracing::warn!(listener = %local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(permit) = slots.take() else {
            if let (Transport::Tcp, Ok(polite)) = (&transport, slots.polite.clone().try_acquire_owned()) {
                clients.spawn(refuse_busy(stream, polite));
            }
            continue;
        };
        let origin = Origin { peer: peer.to_string(), ip: Some(peer.ip()), ..Origin::default() };
        match &transport {
            // The common case is spawned bare: its task is what an idle
            // client costs.
            Transport::Tcp => {
                clients.spawn(serve_client(stream, broker.clone(), origin, permit));
            }
            other => {
                clients.spawn(handshake_then_serve(stream, other.clone(), broker.clone(), origin, permit));
            }
        }
    }
}

/// The TLS and WebSocket handshakes, within the connect timeout, then the
/// client.
async fn handshake_then_serve(
    stream: TcpStream,
    transport: Transport,
    broker: Broker,
    mut origin: Origin,
    permit: OwnedSemaphorePermit,
) {
    // One budget for every handshake and the CONNECT after them.
    let deadline = tokio::time::Instant::now() + broker.settings().connect_timeout;
    origin.deadline = Some(deadline);
    match transport {
        Transport::Tcp => serve_client(stream, broker, origin, permit).await,
        Transport::Tls(acceptor) => {
            let Some(tls) = tls_accept(&acceptor, stream, deadline, &mut origin).await else { return };
            serve_client(tls, broker, origin, permit).await;
        }
        Transport::WebSocket => websocket_then_serve(stream, broker, origin, permit).await,
        Transport::WebSocketTls(acceptor) => {
            let Some(tls) = tls_accept(&acceptor, stream, deadline, &mut origin).await else { return };
            websocket_then_serve(tls, broker, origin, permit).await;
        }
    }
}

/// The WebSocket upgrade, by `origin.deadline`, then the client.
async fn websocket_then_serve<S>(stream: S, broker: Broker, origin: Origin, permit: OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + QuickAck + Unpin + Send + 'static,
{
    let settings = broker.settings();
    let deadline = origin.deadline.unwrap_or_else(|| tokio::time::Instant::now() + settings.connect_timeout);
    let why = match timeout_at(deadline, crate::websocket::accept_from(stream, &settings.ws_origins)).await {
        Ok(Ok(mut ws)) => {
            ws.set_max_frame(settings.max_packet_size + 16);
            return serve_client(ws, broker, origin, permit).await;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_owned(),
    };
    tracing::info!(peer = %origin.peer, "WebSocket handshake failed: {why}; closing");
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The TLS handshake; the client certificate's CN, if one was verified,
/// goes into `origin`. Boxed: a TLS stream is large, and the connection
/// task should not carry it inline.
async fn tls_accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    deadline: tokio::time::Instant,
    origin: &mut Origin,
) -> Option<Pin<Box<TlsStream>>> {
    match timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let (_, connection) = tls.get_ref();
            if let Some(certificate) = connection.peer_certificates().and_then(|c| c.first()) {
                match tls::common_name(certificate.as_ref()) {
                    Some(cn) => origin.certificate_user = Some(cn.into()),
                    None => {
                        tracing::info!(peer = %origin.peer, "client certificate without a common name; not used as a user name")
                    }
                }
            }
            Some(Box::pin(tls))
        }
        Ok(Err(e)) => {
            tracing::info!(peer = %origin.peer, error = %e, "TLS handshake failed; closing");
            None
        }
        Err(_) => {
            tracing::info!(peer = %origin.peer, "TLS handshake timed out; closing");
            None
        }
    }
}

/// Tells a client the broker is full: reads its CONNECT (briefly) and
/// answers CONNACK 0x03 (3.1.1) or 0x89 "server busy" (5.0).
async fn refuse_busy<S>(mut stream: S, _polite: OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut inbox = Inbox::new();
    let read = std::future::poll_fn(|cx| inbox.poll_packet(Pin::new(&mut stream), cx, 64 * 1024, None));
    let Ok(Ok(Some(Packet::Connect(connect)))) = timeout(Duration::from_secs(2), read).await else { return };
    let (code, version) = match connect.protocol {
        Protocol::V5 => (ReasonCode::SERVER_BUSY, Protocol::V5),
        _ => (ReasonCode(0x03), Protocol::V311),
    };
    let mut outbox = Outbox::default();
    let connack = Connack { session_present: false, code, properties: Properties::default() };
    outbox.queue(&Packet::Connack(connack), version);
    let _ = timeout(Duration::from_secs(1), async {
        let _ = std::future::poll_fn(|cx| outbox.poll_flush(Pin::new(&mut stream), cx)).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
    })
    .await;
}

/// Binds `addr` for `transport`, or says which address failed and why.
pub async fn bind(addr: SocketAddr, transport: &Transport) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr} ({}): {e}", transport.name()))
}
