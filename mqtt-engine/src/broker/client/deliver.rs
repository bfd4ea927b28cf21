//! The client's outgoing side: mail from its session's mailbox to its
//! output buffer, within its receive maximum, the ACL's read rights and
//! its maximum packet size; and what was in flight when it last left.

use super::Client;
use crate::broker::session::{Delivery, Outgoing};
use crate::broker::stats::BrokerStats;
use crate::connection::encoded_len;
use crate::packet::*;
use crate::QoS;

impl Client {
    /// Queues what was in flight when the session was last left.
    pub(in crate::broker) fn resend_inflight(&mut self) {
        // MQTT-4.4.0-1: resend what was in flight, PUBLISH with DUP set.
        let inflight: Vec<(u16, Outgoing)> =
            self.claim.state.outgoing.iter().map(|(id, o)| (*id, o.clone())).collect();
        for (id, outgoing) in inflight {
            match outgoing {
                Outgoing::Published(delivery) => {
                    // Too large for the client now: it counts as delivered
                    // (MQTT-3.1.2-25), not as in flight for ever.
                    if !self.send_publish(id, &delivery, true) {
                        self.claim.state.outgoing.remove(&id);
                    }
                }
                Outgoing::Released => self.queue(&Packet::Pubrel(Ack::ok(id))),
            }
        }
    }

    /// Moves mail into the connection, within the client's receive
    /// maximum; true when it stopped with mail left that it could send now
    /// (the output buffer was full enough for one write).
    pub(in crate::broker) fn pump(&mut self) -> bool {
        // Read access is checked at delivery too: the rules may have been
        // reloaded, and a deny may cover part of a filter.
        let access = self.broker.acl_access();
        while let Some(delivery) = self.claim.mailbox.pop() {
            if delivery.envelope.expired() {
                continue;
            }
            let topic = delivery.envelope.topic.as_str();
            if access
                .as_ref()
                .is_some_and(|a| !a.may_read(self.identity.user.as_deref(), &self.claim.client, topic))
            {
                continue;
            }
            if delivery.qos == QoS::AtMostOnce {
                self.send_publish(0, &delivery, false);
            } else {
                if self.claim.state.outgoing.len() >= usize::from(self.terms.send_quota) {
                    self.claim.mailbox.unpop(delivery);
                    break;
                }
                let Some(id) = self.claim.state.next_packet_id() else {
                    self.claim.mailbox.unpop(delivery);
                    break;
                };
                if self.send_publish(id, &delivery, false) {
                    self.claim.state.outgoing.insert(id, Outgoing::Published(delivery));
                }
            }
            // QoS 0 too: what waits beyond one write stays in the mailbox,
            // under its bounds, not in an output buffer without one.
            if self.outbox.pending() > 64 * 1024 {
                return !self.claim.mailbox.is_empty();
            }
        }
        false
    }

    /// Queues one PUBLISH; false when it was dropped for being larger than
    /// the client accepts (MQTT-3.1.2-25: then it counts as delivered).
    fn send_publish(&mut self, packet_id: u16, delivery: &Delivery, dup: bool) -> bool {
        let envelope = &delivery.envelope;
        let mut properties = Properties::default();
        if self.v5() {
            properties = envelope.properties.clone();
            properties.message_expiry_interval = envelope.remaining_expiry();
            properties.subscription_identifiers = delivery.subscription_ids.clone();
        }
        let mut publish = Publish {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: envelope.topic.as_str().to_owned(),
            packet_id,
            payload: envelope.payload.clone(),
            properties,
        };
        // Topic aliases towards the client, within its Topic Alias Maximum.
        // A new alias is recorded only once the packet is sure to go out,
        // so the client never meets an alias it was not given.
        let mut new_alias = None;
        if self.terms.outbound_alias_max > 0 {
            let max = usize::from(self.terms.outbound_alias_max);
            let aliases = &self.extra().outbound_aliases;
            if let Some(alias) = aliases.get(&publish.topic) {
                publish.properties.topic_alias = Some(*alias);
                publish.topic.clear();
            } else if aliases.len() < max {
                let alias = aliases.len() as u16 + 1;
                publish.properties.topic_alias = Some(alias);
                new_alias = Some(alias);
            }
        }
        if self.terms.client_max_packet != u32::MAX {
            // Measured as it will be sent, alias included.
            let size = encoded_len(&Packet::Publish(publish.clone()), self.terms.version);
            if size > self.terms.client_max_packet as usize {
                tracing::debug!(client = %self.client_id(), size, "message larger than the client's maximum packet size dropped");
                return false;
            }
        }
        if let Some(alias) = new_alias {
            self.extra().outbound_aliases.insert(publish.topic.clone(), alias);
        }
        self.queue(&Packet::Publish(publish));
        BrokerStats::add(&self.broker.shared.stats.messages_sent, 1);
        true
    }
}
