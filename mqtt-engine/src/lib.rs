//! The MQTT side of fieldmq: where messages go once the gateway has made them.
//!
//! The gateway hands every [`Message`] to the [`Broker`], an MQTT 3.1.1 and
//! 5.0 broker: readings enter it in-process, with no TCP hop, and LAN
//! clients reach it over the listeners `server::serve` runs. The SQLite
//! store-and-forward buffer and the upstream bridge grow here too.
//!
//! This crate knows MQTT and nothing of devices: it must never depend on
//! `adapters`.
//!
//! # Layout
//!
//! - `message.rs`: [`Message`] and [`QoS`], what flows through the engine.
//! - `topic.rs`: [`TopicName`] and [`TopicFilter`] validation and matching,
//!   with the specification's rules (`+`, `#`, `$`-topics).
//! - `packet/`: the MQTT 3.1.1 and 5.0 packet codec.
//! - `connection.rs`: framing, packets from and to a byte stream.
//! - `broker/`: sessions, subscriptions, retained messages, routing, and
//!   the protocol of one client.
//! - `access/`: passwords, the ACL, and slowing down password guessing.
//! - `server/`: the listeners (TCP, TLS, WebSocket) and their accept loop.
//! - `websocket/`: MQTT over WebSocket, a hand-written server side of
//!   RFC 6455 (the upgrade handshake and binary framing).
//! - `quickack.rs`: ACK at once what gets no answer (Nagle clients).
//! - `local.rs`: [`Subscription`], an in-process subscriber's end.
#![deny(missing_docs)]

pub mod access;
pub mod bridge;
pub mod broker;
pub mod buffer;
pub mod connection;
mod local;
mod message;
pub mod packet;
mod quickack;
mod random;
pub mod server;
mod topic;
pub mod websocket;

pub use broker::{Broker, BrokerSettings};
pub use local::Subscription;
pub use message::{Message, QoS};
pub use quickack::QuickAck;
pub use topic::{TopicError, TopicFilter, TopicName};
