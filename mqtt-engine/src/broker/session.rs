//! What the broker keeps per client besides its mailbox: the messages it
//! routes ([`Envelope`], [`Delivery`]) and the session state.
//!
//! The state and the mailbox (`mailbox.rs`) are apart on purpose. The
//! mailbox is where routing drops deliveries, a short lock. The
//! [`SessionState`] (subscriptions, messages in flight, QoS 2 receipts)
//! belongs to whichever connection owns the session: that connection holds
//! its async lock for its whole life, so a client-id takeover is "kick the
//! old connection, wait for the lock".

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use crate::packet::{Properties, SubscriptionOptions};
use crate::{QoS, TopicName};

/// A published message as the broker routes it: shared by every delivery.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Where it was published.
    pub topic: TopicName,
    /// The payload.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// Its retain flag as published.
    pub retain: bool,
    /// The properties forwarded to subscribers (payload format, content
    /// type, response topic, correlation data, user properties).
    pub properties: Properties,
    /// When it expires (MQTT 5 message expiry), if ever.
    pub expires_at: Option<Instant>,
    /// The client that published it (for no-local), if any.
    pub publisher: Option<Arc<str>>,
}

impl Envelope {
    /// Whether the message has outlived its expiry interval.
    pub fn expired(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= Instant::now())
    }

    /// Seconds left before expiry, rounded up, for the forwarded property.
    pub fn remaining_expiry(&self) -> Option<u32> {
        let left = self.expires_at?.saturating_duration_since(Instant::now());
        Some(left.as_secs_f64().ceil() as u32)
    }
}

/// One message on its way to one client.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub envelope: Arc<Envelope>,
    /// The QoS it is sent with (the lower of publish and subscription).
    pub qos: QoS,
    /// The retain flag it is sent with.
    pub retain: bool,
    /// The identifiers of the subscriptions it matched (MQTT 5).
    pub subscription_ids: Vec<u32>,
}

/// A message sent to the client and not yet fully acknowledged.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published(Delivery),
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// The state of a session that outlives its connections.
///
/// Every connected client has one, mostly empty: B-trees, which allocate
/// nothing while empty and are half the size of a hash map, keep it small.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Filter (as subscribed, `$share/...` included) to options and id.
    pub subscriptions: BTreeMap<String, (SubscriptionOptions, Option<u32>)>,
    /// Messages to the client in flight, by packet identifier.
    pub outgoing: BTreeMap<u16, Outgoing>,
    /// The last packet identifier used.
    pub last_id: u16,
    /// QoS 2 messages received and not yet released (MQTT 4.3.3, method B's
    /// "store the packet identifier" so a resent PUBLISH is not routed twice).
    pub incoming_qos2: BTreeSet<u16>,
}

impl SessionState {
    /// The next packet identifier not in flight (MQTT-2.3.1-2), if any.
    pub fn next_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            if !self.outgoing.contains_key(&self.last_id) {
                return Some(self.last_id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap_past_zero() {
        let mut s = SessionState { last_id: u16::MAX - 1, ..SessionState::default() };
        s.outgoing.insert(u16::MAX, Outgoing::Released);
        s.outgoing.insert(1, Outgoing::Released);
        assert_eq!(s.next_packet_id(), Some(2));
    }
}
