//! The accept loop of the broker's TCP listeners.
//!
//! Each accepted socket becomes its own task; whatever happens in it stays
//! in it. A semaphore caps the connections: past `max_connections` a new
//! socket is closed at once, with a log line, and the ones already
//! connected are not disturbed. TLS and WebSocket listeners will wrap the
//! stream before the same `serve_client`.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{serve_client, Broker};

/// Accepts clients on `listener` until `shutdown`; `slots` is shared by
/// every listener of the broker.
/// Returns once `shutdown` is cancelled and every client of this listener
/// has finished (each sends what it has queued, then closes).
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let clients = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => {
                clients.close();
                clients.wait().await;
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "max_connections reached: connection refused");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        clients.spawn(serve_client(stream, broker.clone(), peer.to_string(), permit));
    }
}
