//! What flows through the engine: an application message.

use bytes::Bytes;

use crate::TopicName;

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum QoS {
    /// At most once.
    #[default]
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

/// One application message. The payload is reference-counted, so fanning
/// it out to many subscribers copies no bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Where it is published.
    pub topic: TopicName,
    /// The payload bytes.
    pub payload: Bytes,
    /// The quality of service it was published with.
    pub qos: QoS,
    /// Whether the broker keeps it for later subscribers.
    pub retain: bool,
}

impl Message {
    /// A QoS 1 message, not retained: how readings are published, so they
    /// can be buffered and acknowledged on their way upstream.
    pub fn new(topic: TopicName, payload: impl Into<Bytes>) -> Self {
        Message { topic, payload: payload.into(), qos: QoS::AtLeastOnce, retain: false }
    }

    /// The same message, retained.
    pub fn retained(mut self) -> Self {
        self.retain = true;
        self
    }
}
