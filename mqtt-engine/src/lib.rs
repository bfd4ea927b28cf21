//! The MQTT side of fieldmq: where messages go once the gateway has made them.
//!
//! The gateway hands every [`Message`] to the [`LocalBroker`], which fans it
//! out in-process to the subscribers whose [`TopicFilter`] matches, and keeps
//! retained messages for subscribers that come later. Readings never make a
//! TCP hop to reach the broker. The network listener (MQTT 3.1.1 and 5), the
//! SQLite store-and-forward buffer and the upstream bridge grow here too.
//!
//! This crate knows MQTT and nothing of devices: it must never depend on
//! `adapters`.
//!
//! # Layout
//!
//! - `message.rs`: [`Message`] and [`QoS`], what flows through the engine.
//! - `topic.rs`: [`TopicName`] and [`TopicFilter`] validation and matching,
//!   with the specification's rules (`+`, `#`, `$`-topics).
//! - `local.rs`: [`LocalBroker`], the in-process fan-out and retained store.
#![deny(missing_docs)]

mod local;
mod message;
pub mod packet;
mod topic;

pub use local::{LocalBroker, Subscription};
pub use message::{Message, QoS};
pub use topic::{TopicError, TopicFilter, TopicName};
