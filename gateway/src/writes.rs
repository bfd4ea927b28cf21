//! Commands to devices: a value published to `{topic}/set/{attribute}`
//! (by a LAN client, or brought down from an upstream) is written to that
//! attribute, and the outcome, `ok` or `error: <reason>`, is published to
//! `{topic}/set/{attribute}/result`.
//!
//! `{topic}` is the device's topic for its own node (the template rendered
//! without an attribute). The write itself runs in the device's poll task,
//! between polls.

use std::time::Duration;

use adapters::WriteRequest;
use mqtt_engine::{Broker, Message, TopicFilter, TopicName};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DeviceConfig};
use crate::mapping::TopicValues;
use crate::runtime::publish;

/// How long a write may wait for its device (a poll may be under way).
const WRITE_LIMIT: Duration = Duration::from_secs(30);

/// `{topic}` of a device: its template rendered for its own node.
pub fn command_base(config: &Config, device: &DeviceConfig) -> String {
    let values = TopicValues {
        gateway: &config.gateway_id,
        node: &device.name,
        kind: device.kind.as_str(),
        attribute: None,
    };
    device.topic.render(values).trim_end_matches('/').to_owned()
}

/// Serves the writes of device `name`, commanded under `base`, until `shutdown`.
pub async fn serve_writes(
    base: String,
    name: String,
    broker: Broker,
    writes: mpsc::Sender<WriteRequest>,
    shutdown: CancellationToken,
) {
    let Ok(filter) = TopicFilter::new(format!("{base}/set/+")) else {
        tracing::error!(device = %name, "no command topic for this device");
        return;
    };
    // Live only: a retained command must not be written again at every start.
    let mut commands = broker.subscribe_live(filter, 64);
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            message = commands.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let Some(attribute) = message.topic.as_str().rsplit('/').next().map(str::to_owned) else { continue };
        let outcome = match std::str::from_utf8(&message.payload) {
            Err(_) => Err("the value is not UTF-8 text".to_owned()),
            Ok(value) => write(&writes, &attribute, value).await,
        };
        let payload = match &outcome {
            Ok(()) => "ok".to_owned(),
            Err(reason) => format!("error: {reason}"),
        };
        tracing::info!(device = %name, %attribute, value = %String::from_utf8_lossy(&message.payload), result = %payload, "write");
        if let Ok(topic) = TopicName::new(format!("{}/result", message.topic)) {
            publish(&broker, Message::new(topic, payload));
        }
    }
}

async fn write(writes: &mpsc::Sender<WriteRequest>, attribute: &str, value: &str) -> Result<(), String> {
    let (reply, answer) = oneshot::channel();
    let request = WriteRequest { attribute: attribute.to_owned(), value: value.to_owned(), reply };
    if writes.send(request).await.is_err() {
        return Err("the device is stopping".into());
    }
    match tokio::time::timeout(WRITE_LIMIT, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err("the device is stopping".into()),
        Err(_) => Err(format!("the device did not take the write within {}s", WRITE_LIMIT.as_secs())),
    }
}
