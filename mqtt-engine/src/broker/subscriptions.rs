//! Who is subscribed to what: a trie of topic levels.
//!
//! Matching walks the topic's levels once, following the exact child, the
//! `+` child and collecting `#` subscribers on the way, so its cost depends
//! on the topic's depth, not on how many filters exist. A topic starting
//! with `$` is not matched by a filter starting with a wildcard
//! (MQTT-4.7.2-1). Shared subscriptions (`$share/group/filter`) live in the
//! same trie under their filter, tagged with their group; the router picks
//! one member of each group per message.

use std::collections::HashMap;
use std::sync::Arc;

use crate::packet::SubscriptionOptions;

/// One subscription of one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    /// The subscribing client.
    pub client: Arc<str>,
    /// Its options.
    pub options: SubscriptionOptions,
    /// Its MQTT 5 subscription identifier.
    pub id: Option<u32>,
    /// The share group, for `$share/group/filter`.
    pub group: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscribers whose filter ends here.
    exact: Vec<Subscriber>,
    /// Subscribers whose filter ends here with `/#` (or is `#`).
    rest: Vec<Subscriber>,
}

/// The subscriptions of every client.
#[derive(Debug, Default)]
pub struct SubscriptionTree {
    root: Node,
    count: usize,
}

impl SubscriptionTree {
    /// Adds or replaces (MQTT-3.8.4-3) the subscription of `subscriber.client`
    /// to `filter` (the filter without any `$share/group/` prefix). Returns
    /// whether it existed before.
    pub fn insert(&mut self, filter: &str, subscriber: Subscriber) -> bool {
        let list = self.list_mut(filter);
        let same = |s: &Subscriber| s.client == subscriber.client && s.group == subscriber.group;
        if let Some(existing) = list.iter_mut().find(|s| same(s)) {
            *existing = subscriber;
            return true;
        }
        list.push(subscriber);
        self.count += 1;
        false
    }

    /// Removes `client`'s subscription to `filter` in `group`; whether it existed.
    pub fn remove(&mut self, filter: &str, client: &str, group: Option<&str>) -> bool {
        let list = self.list_mut(filter);
        let before = list.len();
        list.retain(|s| !(&*s.client == client && s.group.as_deref() == group));
        let removed = list.len() < before;
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// How many subscriptions there are.
    pub fn len(&self) -> usize {
        self.count
    }

    fn list_mut(&mut self, filter: &str) -> &mut Vec<Subscriber> {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                return &mut node.rest;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        &mut node.exact
    }

    /// Calls `f` for every subscription matching `topic`, with a key that is
    /// the same for subscriptions to the same filter (to tell share groups of
    /// different filters apart).
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&Subscriber, usize)) {
        let levels: Vec<&str> = topic.split('/').collect();
        if topic.starts_with('$') {
            // MQTT-4.7.2-1: only an exact first level matches a $-topic.
            if let Some(child) = self.root.children.get(levels[0]) {
                collect(child, &levels[1..], &mut f);
            }
        } else {
            collect(&self.root, &levels, &mut f);
        }
    }
}

fn collect(node: &Node, levels: &[&str], f: &mut impl FnMut(&Subscriber, usize)) {
    // `a/#` matches `a/b/c` and also `a` itself (MQTT 4.7.1.2).
    let rest_key = std::ptr::addr_of!(node.rest) as usize;
    node.rest.iter().for_each(|s| f(s, rest_key));
    let Some((first, rest)) = levels.split_first() else {
        let exact_key = std::ptr::addr_of!(node.exact) as usize;
        node.exact.iter().for_each(|s| f(s, exact_key));
        return;
    };
    if let Some(child) = node.children.get(*first) {
        collect(child, rest, f);
    }
    if let Some(plus) = &node.plus {
        collect(plus, rest, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TopicFilter, TopicName};
    use proptest::prelude::*;

    fn sub(client: &str) -> Subscriber {
        Subscriber { client: client.into(), options: SubscriptionOptions::default(), id: None, group: None }
    }

    fn matches(tree: &SubscriptionTree, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        tree.for_each_match(topic, |s, _| out.push(s.client.to_string()));
        out.sort();
        out
    }

    #[test]
    fn the_trie_follows_the_wildcard_rules() {
        let mut t = SubscriptionTree::default();
        for (filter, client) in [
            ("a/b", "exact"),
            ("a/+", "plus"),
            ("a/#", "hash"),
            ("#", "all"),
            ("+/b", "plusb"),
            ("$SYS/#", "sys"),
        ] {
            t.insert(filter, sub(client));
        }
        assert_eq!(matches(&t, "a/b"), ["all", "exact", "hash", "plus", "plusb"]);
        assert_eq!(matches(&t, "a"), ["all", "hash"]);
        assert_eq!(matches(&t, "a/b/c"), ["all", "hash"]);
        assert_eq!(matches(&t, "$SYS/load"), ["sys"], "MQTT-4.7.2-1");
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn a_second_subscription_to_the_same_filter_replaces_the_first() {
        // MQTT-3.8.4-3.
        let mut t = SubscriptionTree::default();
        assert!(!t.insert("a/b", sub("c")));
        let mut again = sub("c");
        again.id = Some(7);
        assert!(t.insert("a/b", again));
        assert_eq!(t.len(), 1);
        assert!(t.remove("a/b", "c", None));
        assert!(!t.remove("a/b", "c", None));
        assert_eq!(t.len(), 0);
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".into()), Just("".into()), Just("$x".into())]
    }

    proptest! {
        /// The trie agrees with the reference matcher of `topic.rs` on every
        /// filter and topic built from a few levels.
        #[test]
        fn the_trie_agrees_with_the_reference_matcher(
            filter in proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 1..4),
            hash in any::<bool>(),
            topic in proptest::collection::vec(level(), 1..5),
        ) {
            let mut filter = filter.join("/");
            if hash { filter.push_str("/#"); }
            let topic = topic.join("/");
            prop_assume!(!topic.is_empty() && !filter.is_empty(), "empty topics and filters are invalid");
            let reference = TopicFilter::new(filter.clone()).unwrap().matches(&TopicName::new(topic.clone()).unwrap());
            let mut t = SubscriptionTree::default();
            t.insert(&filter, sub("c"));
            prop_assert_eq!(!matches(&t, &topic).is_empty(), reference, "filter {} topic {}", filter, topic);
        }
    }
}
