//! Acknowledging a client's packet at once when the broker has nothing to
//! send back.
//!
//! Linux delays the TCP ACK of received data by up to 40 ms, hoping to
//! carry it on an answer. Some packets get no answer: a client's PUBACK
//! for a delivery, a QoS 0 publish. A client that leaves Nagle's algorithm
//! on (paho-mqtt for Python does) may not send its next packet while its
//! last is unacknowledged, so each of its publishes waited for that timer:
//! 20-40 ms per message where mosquitto showed under 1 ms (bench/abuse
//! found it). Asking for a quick ACK in that case costs one system call
//! and only when the connection would otherwise go idle.

use std::pin::Pin;

use tokio::net::TcpStream;

/// A stream whose TCP socket can be told to acknowledge now.
pub trait QuickAck {
    /// Sends the pending ACK now, if the stream is TCP underneath.
    fn quick_ack(&self);
}

impl QuickAck for TcpStream {
    fn quick_ack(&self) {
        // Not permanent on Linux (the kernel may go back to delaying), so
        // it is asked for each time; a failure changes nothing but timing.
        let _ = rustix::net::sockopt::set_tcp_quickack(self, true);
    }
}

impl<T: QuickAck> QuickAck for tokio_rustls::server::TlsStream<T> {
    fn quick_ack(&self) {
        self.get_ref().0.quick_ack();
    }
}

impl<T: QuickAck> QuickAck for crate::websocket::WebSocket<T> {
    fn quick_ack(&self) {
        self.get_ref().quick_ack();
    }
}

impl<T: QuickAck + ?Sized> QuickAck for Pin<Box<T>> {
    fn quick_ack(&self) {
        (**self).quick_ack();
    }
}

impl QuickAck for tokio::io::DuplexStream {
    fn quick_ack(&self) {}
}
