//! The running gateway: devices (sources) -> mapping (transform) -> engine (sink).
//!
//! Every device runs in its own task and writes tagged events into one
//! bounded channel; a single mapping task turns them into messages and
//! hands those to the local broker. Shutdown is a cancellation token: the
//! devices stop, their senders drop, the mapping task drains what is left
//! in the channel and returns. Nothing read before the signal is dropped on
//! the way out. Which nodes went `offline` is for the caller to say: on a
//! reload most of them go on.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters::{run_polled, NodeStatus, Output, Reading, Schedule, SourceEvent, SourceId};
use mqtt_engine::Broker;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::devices::{self, Adapter};
use crate::mapping::Mapper;
use crate::writes as commands;

/// Room for a burst from every device while the mapping task is busy.
const EVENT_QUEUE: usize = 1024;

/// How long one poll may take before its node is in error, when the
/// adapter has no tighter timeout of its own: the poll period, kept
/// between 10 s and 60 s.
fn poll_limit(period: Duration) -> Duration {
    period.clamp(Duration::from_secs(10), Duration::from_secs(60))
}

/// The nodes a pipeline has reported, as `(device name, node)`; shared so
/// that they are known even if the pipeline had to be abandoned.
pub type SeenNodes = Arc<Mutex<BTreeSet<(String, String)>>>;

/// Runs the devices of `config` until `shutdown`, publishing to `broker`
/// and recording every node it hears of in `seen`.
pub async fn run_pipeline(config: &Config, broker: &Broker, seen: SeenNodes, shutdown: CancellationToken) {
    let mut links = adapters::modbus::Links::default();
    let adapters = config.devices.iter().map(|d| devices::build(d, config, &mut links)).collect();
    run_adapters(config, adapters, broker, seen, shutdown).await
}

/// Runs `adapters`, one per device of `config` in the same order.
async fn run_adapters(
    config: &Config,
    adapters: Vec<Adapter>,
    broker: &Broker,
    seen: SeenNodes,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
    let tasks = TaskTracker::new();
    for (index, (device, adapter)) in config.devices.iter().zip(adapters).enumerate() {
        let output = Output::new(SourceId(index), tx.clone());
        let shutdown = shutdown.clone();
        match adapter {
            Adapter::Polled(adapter) => {
                let schedule = Schedule { period: device.poll, limit: poll_limit(device.poll) };
                let (writes_tx, writes) = mpsc::channel(16);
                if device.has_writes() {
                    let base = commands::command_base(config, device);
                    let name = device.name.clone();
                    tasks.spawn(commands::serve_writes(
                        base,
                        name,
                        broker.clone(),
                        writes_tx,
                        shutdown.clone(),
                    ));
                }
                tasks.spawn(run_polled(adapter, device.name.clone(), schedule, output, writes, shutdown));
            }
            Adapter::Push(adapter) => {
                let name = device.name.clone();
                tasks.spawn(async move {
                    if let Err(e) = adapter.run(output, shutdown).await {
                        tracing::error!(device = %name, error = %e, "device stopped");
                    }
                });
            }
        }
    }
    tasks.close();
    drop(tx);

    let mut mapper = Mapper::new(config);
    while let Some((source, event)) = rx.recv().await {
        match event {
            SourceEvent::Reading(reading) => {
                let messages = mapper.map(source, &reading);
                tracing::debug!(node = %reading.node, messages = messages.len(), "reading {}", Summary(&reading));
                for message in messages {
                    publish(broker, message);
                }
            }
            SourceEvent::Status { node, status } => {
                if let NodeStatus::Error(reason) = &status {
                    tracing::debug!(node = %node, %reason, "node status error");
                }
                if let Some(message) = mapper.node_status(source, &node, &status) {
                    publish(broker, message);
                    if let Some(device) = config.devices.get(source.0) {
                        let mut seen = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                        seen.insert((device.name.clone(), node));
                    }
                }
            }
        }
    }
    tasks.wait().await;
    // Devices may all be gone (none configured, or each failed for good);
    // the pipeline still lives until it is asked to stop, so the gateway
    // and its broker go on.
    shutdown.cancelled().await;
}

/// Publishes `offline` for `nodes` under `config`'s gateway id.
pub fn publish_offline<'a>(config: &Config, broker: &Broker, nodes: impl IntoIterator<Item = &'a String>) {
    let mapper = Mapper::new(config);
    for node in nodes {
        if let Some(message) = mapper.node_offline(node) {
            publish(broker, message);
        }
    }
}

/// Hands one message to the broker; every message the gateway makes goes
/// through here, so `trace` logs each one.
pub fn publish(broker: &Broker, message: mqtt_engine::Message) {
    tracing::trace!(topic = %message.topic, bytes = message.payload.len(), retain = message.retain, "publish");
    broker.publish(message);
}

/// `load_1m=0.12 mem_used=812.3MiB ...`: a reading on one log line.
struct Summary<'a>(&'a Reading);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.attributes.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{}={}{}", a.name, a.value, a.unit.as_deref().unwrap_or_default())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSource;
    use mqtt_engine::TopicFilter;

    fn config(text: &str) -> Config {
        Config::parse(text, ConfigSource::Embedded).expect("valid test config")
    }

    /// Waits until a message on `topic` whose payload starts with `prefix` arrives.
    async fn wait_for(
        sub: &mut mqtt_engine::Subscription,
        seen: &mut Vec<(String, String)>,
        (topic, prefix): (&str, &str),
    ) {
        let found = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(m) = sub.recv().await {
                let pair = (m.topic.to_string(), String::from_utf8_lossy(&m.payload).into_owned());
                seen.push(pair.clone());
                if pair.0 == topic && pair.1.starts_with(prefix) {
                    return;
                }
            }
        })
        .await;
        assert!(found.is_ok(), "no {topic} {prefix}... in {seen:#?}");
    }

    #[tokio::test]
    async fn readings_of_every_device_reach_the_broker_and_a_failing_one_recovers() {
        let dir = std::env::temp_dir().join(format!("fieldmq-runtime-{}", std::process::id()));
        let config = config(&format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n\
             [[device]]\nname = \"host\"\nkind = \"system\"\npoll = \"50ms\"\n\
             [[device]]\nname = \"usb\"\nkind = \"system\"\npoll = \"50ms\"\ndisks = {{ usb = \"{}\" }}\n",
            dir.display(),
            dir.join("usb").display()
        ));
        let broker = Broker::default();
        let mut sub = broker.subscribe(TopicFilter::new("fieldmq/#").unwrap(), 256);
        let shutdown = CancellationToken::new();
        let nodes_seen = SeenNodes::default();
        let pipeline = {
            let (config, broker, seen, shutdown) =
                (config.clone(), broker.clone(), nodes_seen.clone(), shutdown.clone());
            tokio::spawn(async move { run_pipeline(&config, &broker, seen, shutdown).await })
        };

        // The usb device fails (its disk is missing) while host goes on; then
        // the disk appears and usb comes back online.
        let mut seen = Vec::new();
        wait_for(&mut sub, &mut seen, ("fieldmq/gw/usb/status", "error: disk usb (")).await;
        wait_for(&mut sub, &mut seen, ("fieldmq/gw/host", "{\"node\":\"host\"")).await;
        wait_for(&mut sub, &mut seen, ("fieldmq/gw/host", "{\"node\":\"host\"")).await;
        std::fs::create_dir_all(dir.join("usb")).unwrap();
        wait_for(&mut sub, &mut seen, ("fieldmq/gw/usb/status", "online")).await;
        wait_for(&mut sub, &mut seen, ("fieldmq/gw/usb", "{\"node\":\"usb\"")).await;

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), pipeline).await.unwrap().unwrap();
        let seen = nodes_seen.lock().unwrap().clone();
        assert_eq!(
            seen.iter().map(|(d, n)| (d.as_str(), n.as_str())).collect::<Vec<_>>(),
            [("host", "host"), ("usb", "usb")]
        );
        publish_offline(&config, &broker, seen.iter().map(|(_, node)| node));
        let status = |node: &str| {
            let topic = mqtt_engine::TopicName::new(format!("fieldmq/gw/{node}/status")).unwrap();
            broker.retained(&topic).map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        };
        assert_eq!(status("host").as_deref(), Some("offline"));
        assert_eq!(status("usb").as_deref(), Some("offline"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A radio receiver that hears several sensors: one device, many nodes.
    struct Receiver;

    impl adapters::PushDevice for Receiver {
        fn run(
            self: Box<Self>,
            output: Output,
            shutdown: CancellationToken,
        ) -> adapters::BoxFuture<'static, Result<(), adapters::DeviceError>> {
            Box::pin(async move {
                for (node, temp) in [("t-1", 20.5), ("t-2", 21.0), ("t-1", 20.5)] {
                    let attributes = vec![adapters::Attribute::new("temp", temp, Some("°C"))];
                    let reading = Reading { node: node.into(), ts: std::time::SystemTime::now(), attributes };
                    output.send(SourceEvent::Status { node: node.into(), status: NodeStatus::Online }).await;
                    output.send(SourceEvent::Reading(reading)).await;
                }
                shutdown.cancelled().await;
                Ok(())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipeline_without_devices_runs_until_it_is_stopped() {
        let config = config("[gateway]\nid = \"gw\"\n");
        let shutdown = CancellationToken::new();
        let pipeline = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { run_pipeline(&config, &Broker::default(), SeenNodes::default(), shutdown).await }
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!pipeline.is_finished(), "a broker-only gateway must keep running");
        shutdown.cancel();
        pipeline.await.unwrap();
    }

    #[tokio::test]
    async fn a_push_device_publishes_many_nodes_through_its_device_mapping() {
        let config = config(
            "[gateway]\nid = \"gw\"\n[[device]]\nname = \"radio\"\nkind = \"system\"\npublish = \"on-change\"\nformat = \"value\"\n",
        );
        let broker = Broker::default();
        let mut sub = broker.subscribe(TopicFilter::new("fieldmq/gw/+/temp").unwrap(), 16);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let seen = SeenNodes::default();
        run_adapters(&config, vec![Adapter::Push(Box::new(Receiver))], &broker, seen.clone(), shutdown).await;
        let nodes: Vec<String> = seen.lock().unwrap().iter().map(|(_, node)| node.clone()).collect();
        assert_eq!(nodes, ["t-1", "t-2"]);
        let got: Vec<_> = std::iter::from_fn(|| sub.try_recv())
            .map(|m| (m.topic.to_string(), String::from_utf8_lossy(&m.payload).into_owned()))
            .collect();
        // t-1's repeat of 20.5 is no change: on-change state is kept per node.
        assert_eq!(
            got,
            [
                ("fieldmq/gw/t-1/temp".to_string(), "20.5".to_string()),
                ("fieldmq/gw/t-2/temp".into(), "21".into())
            ]
        );
    }
}
