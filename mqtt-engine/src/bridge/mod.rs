//! The upstream bridge: one task per [[upstream]], taking rows from the
//! buffer to a cloud broker and bringing its commands down.
//!
//! It is an MQTT client written on this crate's own codec rather than on
//! rumqttc: a row may leave the buffer only when *its* PUBACK arrives, so
//! the bridge must know which packet id carries which row, and rumqttc's
//! publish does not say (bytebeamio/rumqtt#349, #1007, still open in
//! 2026). Owning the client also gives one code path for MQTT 3.1.1 and 5,
//! resending on our terms (from the buffer, in order) and the batching
//! that lets a backlog drain at the upstream's speed.
//!
//! - `link.rs`: one connection, from CONNECT to its end.
//! - `window.rs`: packet ids in flight, and how far the cursor may move.
//! - `tls.rs`: the rustls client configuration.
//!
//! Reconnects back off exponentially with full jitter (a random wait
//! between zero and the current ceiling), so a thousand gateways do not
//! reconnect in step to a cloud broker that just came back. Failures are
//! logged once per change of reason, not at every attempt.

mod link;
pub mod tls;
mod window;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::packet::Protocol;
use crate::Broker;

pub use link::LinkError;

/// One [[upstream]], resolved.
#[derive(Clone)]
pub struct UpstreamSettings {
    /// Its name, in logs and in the buffer.
    pub name: String,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS, for mqtts://.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The name the server's certificate must carry (SNI too).
    pub server_name: String,
    /// The MQTT client id.
    pub client_id: String,
    /// User name, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Bytes>,
    /// 3.1.1 or 5.
    pub protocol: Protocol,
    /// Keep alive; a silent link is declared dead after 1.5 times this.
    pub keep_alive: Duration,
    /// Prepended to every topic sent up, stripped from topics coming down.
    pub topic_prefix: String,
    /// Instead of the prefix: the upstream topic made from this template,
    /// `{topic}` (the local topic) or `{topic_encoded}` (percent-encoded,
    /// for a property bag such as Azure IoT Hub's) replaced.
    pub topic_template: Option<String>,
    /// Upstream filters whose messages come down into the local broker.
    pub subscribe: Vec<String>,
    /// The most QoS 1 messages unacknowledged at once.
    pub max_inflight: u16,
    /// The most messages per second sent up (0: as fast as it takes them).
    pub max_rate: u32,
    /// Reconnect backoff bounds.
    pub backoff_min: Duration,
    /// Reconnect backoff bounds.
    pub backoff_max: Duration,
    /// Where the gateway's `online`/`offline` goes (its will), prefix included.
    pub status_topic: String,
}

impl UpstreamSettings {
    /// The topic a local message takes upstream.
    pub fn upstream_topic(&self, local: &str) -> String {
        match &self.topic_template {
            None => format!("{}{local}", self.topic_prefix),
            Some(template) => {
                template.replace("{topic}", local).replace("{topic_encoded}", &percent_encode(local))
            }
        }
    }
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl std::fmt::Debug for UpstreamSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSettings")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Runs the bridge of one upstream until `shutdown`.
pub async fn run(settings: UpstreamSettings, buffer: Buffer, broker: Broker, shutdown: CancellationToken) {
    let mut ceiling = settings.backoff_min;
    let mut last_failure: Option<String> = None;
    let mut failures = 0u64;
    loop {
        let started = tokio::time::Instant::now();
        let outcome = link::Link::new(&settings, &buffer, &broker, &shutdown).run().await;
        match outcome {
            Ok(()) => return,
            Err(LinkError::Stopped) => return,
            Err(e) => {
                let reason = e.to_string();
                failures += 1;
                if last_failure.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(upstream = %settings.name, "upstream {}: connection failed: {reason}", settings.name);
                    last_failure = Some(reason);
                } else {
                    tracing::debug!(upstream = %settings.name, attempt = failures, "upstream {}: connection failed again: {reason}", settings.name);
                }
                if e.was_connected() {
                    // It worked for a while: start the backoff over.
                    ceiling = settings.backoff_min;
                    last_failure = None;
                    if started.elapsed() > settings.backoff_max {
                        failures = 0;
                    }
                }
            }
        }
        let wait = jitter(ceiling);
        ceiling = (ceiling * 2).min(settings.backoff_max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// A random duration in [0, ceiling]: "full jitter".
fn jitter(ceiling: Duration) -> Duration {
    let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(crate::random::random_u64() % (nanos + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_encode_the_local_topic() {
        assert_eq!(percent_encode("fieldmq/pi 1/m"), "fieldmq%2Fpi%201%2Fm");
    }

    #[test]
    fn jitter_stays_within_the_ceiling_and_spreads() {
        let ceiling = Duration::from_millis(100);
        let waits: Vec<Duration> = (0..200).map(|_| jitter(ceiling)).collect();
        assert!(waits.iter().all(|w| *w <= ceiling));
        let below_half = waits.iter().filter(|w| **w < ceiling / 2).count();
        assert!((40..160).contains(&below_half), "{below_half} of 200 below half: not spread");
    }
}
