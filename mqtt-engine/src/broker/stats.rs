//! What the broker reports about itself under `$SYS/broker/...`, with
//! mosquitto's topic names, so dashboards made for mosquitto read them.
//!
//! Counters are relaxed atomics bumped per packet; the `$SYS` task reads
//! them every `sys_interval` and publishes retained messages to LAN
//! subscribers only (never upstream).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::session::Envelope;
use super::Broker;
use crate::packet::Properties;
use crate::{QoS, TopicName};

/// Traffic of network clients since the start.
#[derive(Debug)]
pub(crate) struct BrokerStats {
    started: Instant,
    pub(crate) messages_received: AtomicU64,
    pub(crate) messages_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    /// Publishes refused by the ACL.
    pub(crate) denied: AtomicU64,
    connected: AtomicU64,
    connected_max: AtomicU64,
}

impl Default for BrokerStats {
    fn default() -> Self {
        BrokerStats {
            started: Instant::now(),
            messages_received: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            connected_max: AtomicU64::new(0),
        }
    }
}

impl BrokerStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn client_connected(&self) {
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.connected_max.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn client_disconnected(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `$SYS` topics and their values now.
pub fn sys_values(broker: &Broker) -> Vec<(String, String)> {
    let stats = &broker.shared.stats;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
    let (sessions, online, retained, subscriptions) = broker.counts();
    let dropped = broker.router().dropped();
    let mut values = vec![
        ("version".to_owned(), format!("fieldmq {}", env!("CARGO_PKG_VERSION"))),
        ("uptime".to_owned(), format!("{} seconds", stats.started.elapsed().as_secs())),
        ("clients/connected".to_owned(), online.to_string()),
        ("clients/disconnected".to_owned(), (sessions - online.min(sessions)).to_string()),
        ("clients/total".to_owned(), sessions.to_string()),
        ("clients/maximum".to_owned(), get(&stats.connected_max)),
        ("messages/received".to_owned(), get(&stats.messages_received)),
        ("messages/sent".to_owned(), get(&stats.messages_sent)),
        ("messages/dropped".to_owned(), dropped.to_string()),
        ("messages/denied".to_owned(), get(&stats.denied)),
        ("bytes/received".to_owned(), get(&stats.bytes_received)),
        ("bytes/sent".to_owned(), get(&stats.bytes_sent)),
        ("subscriptions/count".to_owned(), subscriptions.to_string()),
        ("retained messages/count".to_owned(), retained.to_string()),
    ];
    if let Some(buffer) = broker.buffer() {
        for (name, waiting, dropped, last_delivery_ms) in buffer.upstream_figures() {
            let base = format!("store-and-forward/{name}");
            values.push((format!("{base}/waiting"), waiting.to_string()));
            values.push((format!("{base}/dropped"), dropped.to_string()));
            let last = if last_delivery_ms > 0 { rfc3339_ms(last_delivery_ms) } else { "never".to_owned() };
            values.push((format!("{base}/last_delivery"), last));
        }
    }
    values
}

/// Publishes the `$SYS` topics every `interval` until the broker stops;
/// only values that changed are sent again.
pub async fn publish_sys(broker: Broker, interval: Duration) {
    let shutdown = broker.shutdown_token();
    let mut last: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for (name, value) in sys_values(&broker) {
            if last.get(&name) == Some(&value) {
                continue;
            }
            let Ok(topic) = TopicName::new(format!("$SYS/broker/{name}")) else { continue };
            broker.route_from_upstream(Envelope {
                topic,
                payload: Bytes::from(value.clone().into_bytes()),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: Properties::default(),
                expires_at: None,
                publisher: None,
            });
            last.insert(name, value);
        }
    }
}

/// `2026-11-24T05:46:56.123Z` from ms since the epoch.
fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_499_216_123), "2026-11-24T05:46:56.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
