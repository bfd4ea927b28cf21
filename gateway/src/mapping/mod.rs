//! The *transform* between devices and MQTT: a [`Reading`] becomes
//! [`Message`]s through its device's topic template, payload format and
//! publish policy; a node's health becomes its retained status message.
//!
//! - `template.rs`: topic templates (`fieldmq/{gateway}/{node}`).
//! - `payload.rs`: the `json` and `value` formats, byte for byte.
//! - `policy.rs`: on-change publishing with deadbands and heartbeats.

mod payload;
mod policy;
mod template;

pub use policy::ChangeFilter;
pub use template::{topic_level_problem, TopicTemplate, TopicValues, DEFAULT_TOPIC, RESERVED_NODE};

use std::collections::HashMap;

use adapters::{NodeStatus, Reading, SourceId};
use mqtt_engine::{Message, TopicName};

use crate::config::{Config, DeviceConfig, Format, PublishPolicy};

/// Maps every configured device's readings and statuses to messages.
#[derive(Debug)]
pub struct Mapper {
    gateway: String,
    devices: Vec<DeviceMapping>,
    statuses: HashMap<(SourceId, String), NodeStatus>,
}

#[derive(Debug)]
struct DeviceMapping {
    kind: &'static str,
    topic: TopicTemplate,
    format: Format,
    on_change: Option<ChangeFilter>,
}

impl DeviceMapping {
    fn new(device: &DeviceConfig) -> Self {
        let on_change = match &device.publish {
            PublishPolicy::Always => None,
            PublishPolicy::OnChange { heartbeat, deadbands } => {
                Some(ChangeFilter::new(*heartbeat, deadbands, device.poll))
            }
        };
        DeviceMapping {
            kind: device.kind.as_str(),
            topic: device.topic.clone(),
            format: device.format,
            on_change,
        }
    }
}

impl Mapper {
    /// A mapper for the devices of `config`, indexed as `SourceId`s.
    pub fn new(config: &Config) -> Self {
        Mapper {
            gateway: config.gateway_id.clone(),
            devices: config.devices.iter().map(DeviceMapping::new).collect(),
            statuses: HashMap::new(),
        }
    }

    /// The messages for one reading of device `source`: none when on-change
    /// publishing finds nothing new.
    pub fn map(&mut self, source: SourceId, reading: &Reading) -> Vec<Message> {
        let Some(device) = self.devices.get_mut(source.0) else {
            tracing::error!(source = source.0, "reading from an unknown device dropped");
            return Vec::new();
        };
        if !valid_node(&reading.node) {
            return Vec::new();
        }
        let attributes = match device.on_change.as_mut() {
            Some(filter) => filter.select(reading),
            None => reading.attributes.iter().collect(),
        };
        if attributes.is_empty() {
            return Vec::new();
        }
        let values =
            TopicValues { gateway: &self.gateway, node: &reading.node, kind: device.kind, attribute: None };
        let mut messages = Vec::new();
        let mut push = |topic: String, payload: String| match TopicName::new(topic.as_str()) {
            Ok(topic) => messages.push(Message::new(topic, payload)),
            Err(e) => tracing::warn!(%topic, error = %e, "reading not published: invalid topic"),
        };
        match device.format {
            Format::Json => {
                push(device.topic.render(values), payload::json(&reading.node, reading.ts, &attributes))
            }
            Format::Value => {
                for attribute in attributes {
                    let topic =
                        device.topic.render(TopicValues { attribute: Some(&attribute.name), ..values });
                    push(topic, payload::value(&attribute.value));
                }
            }
        }
        messages
    }

    /// The retained status message of a node when its status changed
    /// (`None` when it did not); a node coming back online is sent whole on
    /// its next reading.
    pub fn node_status(&mut self, source: SourceId, node: &str, status: &NodeStatus) -> Option<Message> {
        if !valid_node(node) {
            return None;
        }
        let previous = self.statuses.insert((source, node.to_owned()), status.clone());
        if previous.as_ref() == Some(status) {
            return None;
        }
        if let (NodeStatus::Online, Some(device)) = (status, self.devices.get_mut(source.0)) {
            if let Some(filter) = device.on_change.as_mut() {
                filter.forget(node);
            }
        }
        let payload = match status {
            NodeStatus::Online => "online".to_owned(),
            NodeStatus::Error(reason) => format!("error: {reason}"),
        };
        self.status_message(&format!("fieldmq/{}/{node}/status", self.gateway), payload)
    }

    /// The retained `offline` status of a node, on shutdown.
    pub fn node_offline(&self, node: &str) -> Option<Message> {
        self.status_message(&format!("fieldmq/{}/{node}/status", self.gateway), "offline".into())
    }

    /// The retained status of the gateway itself.
    pub fn gateway_status(&self, online: bool) -> Option<Message> {
        let payload = if online { "online" } else { "offline" };
        self.status_message(&format!("fieldmq/{}/status", self.gateway), payload.into())
    }

    fn status_message(&self, topic: &str, payload: String) -> Option<Message> {
        Some(Message::new(TopicName::new(topic).ok()?, payload).retained())
    }
}

/// A node name a push device reported must make a topic level of its own
/// and must not land on the gateway's status topic; a config's device
/// names are checked the same way when the config is loaded.
fn valid_node(node: &str) -> bool {
    let problem = if node == RESERVED_NODE { Some("is reserved") } else { topic_level_problem(node) };
    if let Some(problem) = problem {
        tracing::warn!(node, "reading dropped: the node name {problem}");
    }
    problem.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSource;
    use adapters::Attribute;
    use std::time::{Duration, UNIX_EPOCH};

    fn mapper(devices: &str) -> Mapper {
        let text = format!("[gateway]\nid = \"pi-01\"\n{devices}");
        Mapper::new(&Config::parse(&text, ConfigSource::Embedded).expect("valid test config"))
    }

    fn reading(node: &str, attributes: Vec<Attribute>) -> Reading {
        Reading { node: node.into(), ts: UNIX_EPOCH + Duration::from_millis(1_795_428_900_123), attributes }
    }

    fn pairs(messages: &[Message]) -> Vec<(String, String)> {
        messages
            .iter()
            .map(|m| (m.topic.to_string(), String::from_utf8_lossy(&m.payload).into_owned()))
            .collect()
    }

    #[test]
    fn json_goes_to_the_default_topic_as_one_message() {
        let mut m = mapper("[[device]]\nname = \"host\"\nkind = \"system\"\n");
        let r = reading(
            "host",
            vec![Attribute::new("load_1m", 0.5, None), Attribute::new("uptime", 7i64, Some("s"))],
        );
        assert_eq!(
            pairs(&m.map(SourceId(0), &r)),
            [(
                "fieldmq/pi-01/host".into(),
                r#"{"node":"host","ts":"2026-11-23T10:15:00.123Z","attributes":{"load_1m":0.5,"uptime":7},"units":{"uptime":"s"}}"#.into()
            )]
        );
    }

    #[test]
    fn value_format_publishes_each_attribute_on_its_own_topic() {
        let mut m = mapper("[[device]]\nname = \"host\"\nkind = \"system\"\nformat = \"value\"\ntopic = \"site/{kind}/{node}\"\n");
        let r = reading(
            "host",
            vec![Attribute::new("load_1m", 0.5, None), Attribute::new("uptime", 7i64, Some("s"))],
        );
        assert_eq!(
            pairs(&m.map(SourceId(0), &r)),
            [
                ("site/system/host/load_1m".into(), "0.5".into()),
                ("site/system/host/uptime".into(), "7".into())
            ]
        );
    }

    #[test]
    fn on_change_sends_only_what_changed_and_all_again_after_recovery() {
        let mut m = mapper(
            "[[device]]\nname = \"host\"\nkind = \"system\"\npublish = \"on-change\"\nformat = \"value\"\n",
        );
        let r1 =
            reading("host", vec![Attribute::new("load_1m", 0.5, None), Attribute::new("uptime", 7i64, None)]);
        let r2 =
            reading("host", vec![Attribute::new("load_1m", 0.5, None), Attribute::new("uptime", 8i64, None)]);
        assert_eq!(m.map(SourceId(0), &r1).len(), 2);
        assert_eq!(pairs(&m.map(SourceId(0), &r2)), [("fieldmq/pi-01/host/uptime".into(), "8".into())]);
        assert!(m.map(SourceId(0), &r2).is_empty());
        m.node_status(SourceId(0), "host", &NodeStatus::Error("timed out".into()));
        let online = m.node_status(SourceId(0), "host", &NodeStatus::Online).unwrap();
        assert_eq!(pairs(&[online]), [("fieldmq/pi-01/host/status".into(), "online".into())]);
        assert_eq!(m.map(SourceId(0), &r2).len(), 2);
    }

    #[test]
    fn statuses_are_retained_with_the_documented_payloads() {
        let mut m = mapper("[[device]]\nname = \"host\"\nkind = \"system\"\n");
        let error =
            m.node_status(SourceId(0), "host", &NodeStatus::Error("timed out after 1s".into())).unwrap();
        assert!(error.retain);
        assert_eq!(
            pairs(&[error]),
            [("fieldmq/pi-01/host/status".into(), "error: timed out after 1s".into())]
        );
        let gw = m.gateway_status(false).unwrap();
        assert_eq!(pairs(&[gw]), [("fieldmq/pi-01/status".into(), "offline".into())]);
    }

    #[test]
    fn a_pushed_node_name_that_is_not_one_topic_level_is_not_published() {
        let mut m = mapper("[[device]]\nname = \"host\"\nkind = \"system\"\n");
        for node in ["bad/+", "meter-1/status", "status", "$SYS", ""] {
            assert!(
                m.map(SourceId(0), &reading(node, vec![Attribute::new("x", 1i64, None)])).is_empty(),
                "{node}"
            );
            assert!(m.node_status(SourceId(0), node, &NodeStatus::Online).is_none(), "{node}");
        }
    }
}
