//! The in-process side of the local broker.
//!
//! Readings from the gateway and, later, publishes from LAN clients meet
//! here. A publish is delivered to every subscription whose filter matches
//! and, when retained, replaces the topic's retained message (an empty
//! retained payload clears it). A new subscription first receives the
//! retained messages it matches, as MQTT subscribers do.
//!
//! Delivery never waits on a subscriber: a subscriber whose queue is full
//! loses that message, and the loss is counted and logged, so one stuck
//! consumer cannot stall the devices behind the gateway.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use crate::{Message, TopicFilter, TopicName};

/// A handle on the local broker; clones share it.
#[derive(Debug, Clone, Default)]
pub struct LocalBroker {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug, Default)]
struct Shared {
    retained: BTreeMap<TopicName, Message>,
    subscribers: Vec<Subscriber>,
}

#[derive(Debug)]
struct Subscriber {
    filter: TopicFilter,
    tx: mpsc::Sender<Message>,
    dropped: u64,
}

/// The receiving end of an in-process subscription.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Message>,
}

impl Subscription {
    /// The next message, or `None` once the broker is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next message if one is already queued.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }
}

impl LocalBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves the maps consistent (every
        // update is a single insert, remove or push), so poisoning is ignored.
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes `message` to every matching subscriber, and keeps it if retained.
    pub fn publish(&self, message: Message) {
        let mut shared = self.lock();
        if message.retain {
            if message.payload.is_empty() {
                shared.retained.remove(&message.topic);
            } else {
                shared.retained.insert(message.topic.clone(), message.clone());
            }
        }
        shared.subscribers.retain_mut(|sub| {
            if !sub.filter.matches(&message.topic) {
                return true;
            }
            match sub.tx.try_send(message.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.dropped += 1;
                    tracing::warn!(
                        filter = %sub.filter, topic = %message.topic, dropped = sub.dropped,
                        "in-process subscriber is not keeping up; message dropped for it"
                    );
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Subscribes to `filter` with a queue of `capacity` messages; the
    /// retained messages it matches are queued first.
    pub fn subscribe(&self, filter: TopicFilter, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let mut shared = self.lock();
        for retained in shared.retained.values().filter(|m| filter.matches(&m.topic)) {
            let _ = tx.try_send(retained.clone());
        }
        shared.subscribers.push(Subscriber { filter, tx, dropped: 0 });
        Subscription { rx }
    }

    /// The retained message on `topic`, if any.
    pub fn retained(&self, topic: &TopicName) -> Option<Message> {
        self.lock().retained.get(topic).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &'static str) -> Message {
        Message::new(TopicName::new(topic).unwrap(), payload)
    }

    fn filter(f: &str) -> TopicFilter {
        TopicFilter::new(f).unwrap()
    }

    #[test]
    fn delivers_only_to_matching_subscribers() {
        let broker = LocalBroker::new();
        let mut all = broker.subscribe(filter("fieldmq/#"), 8);
        let mut one = broker.subscribe(filter("fieldmq/gw/meter-1"), 8);
        broker.publish(msg("fieldmq/gw/meter-1", "a"));
        broker.publish(msg("fieldmq/gw/meter-2", "b"));
        assert_eq!(all.try_recv().unwrap().payload, "a");
        assert_eq!(all.try_recv().unwrap().payload, "b");
        assert_eq!(one.try_recv().unwrap().payload, "a");
        assert!(one.try_recv().is_none());
    }

    #[test]
    fn retained_messages_reach_late_subscribers_and_empty_payload_clears() {
        let broker = LocalBroker::new();
        broker.publish(msg("fieldmq/gw/status", "online").retained());
        broker.publish(msg("fieldmq/gw/n/status", "online").retained());
        broker.publish(msg("fieldmq/gw/n/status", "error: timed out").retained());
        broker.publish(msg("fieldmq/gw/n", "not retained"));
        let mut late = broker.subscribe(filter("fieldmq/#"), 8);
        let mut got: Vec<_> = std::iter::from_fn(|| late.try_recv()).map(|m| m.payload).collect();
        got.sort();
        assert_eq!(got, ["error: timed out", "online"]);

        broker.publish(msg("fieldmq/gw/status", "").retained());
        assert!(broker.retained(&TopicName::new("fieldmq/gw/status").unwrap()).is_none());
    }

    #[test]
    fn a_full_subscriber_loses_messages_without_blocking_others() {
        let broker = LocalBroker::new();
        let mut slow = broker.subscribe(filter("#"), 1);
        let mut fast = broker.subscribe(filter("#"), 8);
        for payload in ["1", "2", "3"] {
            broker.publish(msg("t", payload));
        }
        assert_eq!(slow.try_recv().unwrap().payload, "1");
        assert!(slow.try_recv().is_none());
        assert_eq!(std::iter::from_fn(|| fast.try_recv()).count(), 3);
    }

    #[test]
    fn a_closed_subscription_is_forgotten() {
        let broker = LocalBroker::new();
        drop(broker.subscribe(filter("#"), 1));
        broker.publish(msg("t", "x"));
        assert!(broker.lock().subscribers.is_empty());
    }
}
