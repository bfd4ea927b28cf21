//! Report by exception: `publish = "on-change"` with deadbands and a heartbeat.
//!
//! Over a metered uplink most readings repeat the last one. A [`ChangeFilter`]
//! remembers, per node and attribute, the value last *sent* and when, and
//! lets an attribute through only when
//! - it was never sent, or
//! - it differs from the last sent value (numbers: by more than the
//!   attribute's deadband; comparing against the last sent value, not the
//!   last read one, so a slow drift is still reported once it adds up), or
//! - its heartbeat is due, so a quiet sensor still proves it is alive.
//!
//! Heartbeats are judged at poll granularity with half a poll of slack: with
//! `poll = "5s"` and `heartbeat = "1m"`, an attribute is re-sent on the
//! twelfth poll even if that poll ran a few milliseconds early.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use adapters::{Attribute, Reading, Value};

/// The on-change state of one device (all the nodes it reports).
#[derive(Debug)]
pub struct ChangeFilter {
    heartbeat: Duration,
    slack: Duration,
    deadbands: HashMap<String, f64>,
    nodes: HashMap<String, HashMap<String, Sent>>,
}

#[derive(Debug)]
struct Sent {
    value: Value,
    at: SystemTime,
}

impl ChangeFilter {
    /// A filter with this heartbeat, per-attribute deadbands (0 when absent)
    /// and the device's poll period (for the heartbeat's slack).
    pub fn new(heartbeat: Duration, deadbands: &[(String, f64)], poll: Duration) -> Self {
        ChangeFilter {
            heartbeat,
            slack: poll / 2,
            deadbands: deadbands.iter().cloned().collect(),
            nodes: HashMap::new(),
        }
    }

    /// The attributes of `reading` to send now; remembers them as sent.
    pub fn select<'r>(&mut self, reading: &'r Reading) -> Vec<&'r Attribute> {
        let sent = self.nodes.entry(reading.node.clone()).or_default();
        let mut selected = Vec::with_capacity(reading.attributes.len());
        for attribute in &reading.attributes {
            let deadband = self.deadbands.get(&attribute.name).copied().unwrap_or(0.0);
            let due = match sent.get(&attribute.name) {
                None => true,
                Some(last) => {
                    // A clock stepped backwards makes the age unknown: send.
                    let heartbeat_due = reading
                        .ts
                        .duration_since(last.at)
                        .map_or(true, |age| age + self.slack >= self.heartbeat);
                    heartbeat_due || changed(&last.value, &attribute.value, deadband)
                }
            };
            if due {
                sent.insert(attribute.name.clone(), Sent { value: attribute.value.clone(), at: reading.ts });
                selected.push(attribute);
            }
        }
        selected
    }

    /// Forgets what was sent for `node`, so its next reading goes out whole
    /// (after an error, consumers may hold its last values as stale).
    pub fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
    }
}

fn changed(last: &Value, new: &Value, deadband: f64) -> bool {
    match (last.as_f64(), new.as_f64()) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() => {
            (b - a).abs() > deadband || (deadband == 0.0 && last != new)
        }
        (Some(a), Some(b)) => !(a.is_nan() && b.is_nan()) && a != b,
        _ => last != new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn reading(at_secs: u64, attributes: &[(&str, Value)]) -> Reading {
        Reading {
            node: "meter".into(),
            ts: UNIX_EPOCH + Duration::from_secs(1_800_000_000 + at_secs),
            attributes: attributes.iter().map(|(n, v)| Attribute::new(*n, v.clone(), None)).collect(),
        }
    }

    fn names(selected: Vec<&Attribute>) -> Vec<String> {
        selected.into_iter().map(|a| a.name.clone()).collect()
    }

    fn filter() -> ChangeFilter {
        let deadbands = [("voltage".to_string(), 0.5)];
        ChangeFilter::new(Duration::from_secs(60), &deadbands, Duration::from_secs(5))
    }

    #[test]
    fn only_changes_beyond_the_deadband_are_sent() {
        let mut f = filter();
        let r = |t, v: f64, on: bool| reading(t, &[("voltage", v.into()), ("breaker", on.into())]);
        assert_eq!(names(f.select(&r(0, 230.0, true))), ["voltage", "breaker"], "first reading: all");
        assert!(f.select(&r(5, 230.4, true)).is_empty(), "0.4 V is within the 0.5 V deadband");
        assert!(f.select(&r(10, 230.5, true)).is_empty(), "exactly the deadband is not more than it");
        assert_eq!(names(f.select(&r(15, 230.6, true))), ["voltage"], "0.6 V drift from the last sent value");
        assert_eq!(names(f.select(&r(20, 230.6, false))), ["breaker"], "a bool change, no deadband");
    }

    #[test]
    fn a_slow_drift_is_reported_once_it_adds_up() {
        let mut f = filter();
        let mut sent = 0;
        for step in 0..10 {
            let v = 230.0 + step as f64 * 0.2;
            sent += f.select(&reading(step * 5, &[("voltage", v.into())])).len();
        }
        // 230.0 sent, then 230.6 (0.6 > 0.5), then 231.2, then 231.8 (=0.6 above 231.2).
        assert_eq!(sent, 4);
    }

    #[test]
    fn without_a_deadband_any_change_is_sent() {
        let mut f = filter();
        assert_eq!(f.select(&reading(0, &[("count", Value::Integer(1))])).len(), 1);
        assert_eq!(f.select(&reading(5, &[("count", Value::Integer(2))])).len(), 1);
        assert!(f.select(&reading(10, &[("count", Value::Integer(2))])).is_empty());
        assert_eq!(f.select(&reading(15, &[("fw", "1.1".into())])).len(), 1);
        assert!(f.select(&reading(20, &[("fw", "1.1".into())])).is_empty());
    }

    #[test]
    fn every_attribute_is_sent_at_least_once_per_heartbeat() {
        let mut f = filter();
        let mut sent_at = Vec::new();
        for t in (0..=180).step_by(5) {
            if !f.select(&reading(t, &[("voltage", 230.0.into())])).is_empty() {
                sent_at.push(t);
            }
        }
        assert_eq!(sent_at, [0, 60, 120, 180]);
    }

    #[test]
    fn a_heartbeat_a_little_early_is_still_due() {
        let mut f = filter();
        let mut r = reading(0, &[("voltage", 230.0.into())]);
        f.select(&r);
        r.ts += Duration::from_millis(59_990);
        assert_eq!(f.select(&r).len(), 1);
    }

    #[test]
    fn forgetting_a_node_sends_it_whole_again() {
        let mut f = filter();
        let r = reading(0, &[("voltage", 230.0.into())]);
        f.select(&r);
        assert!(f.select(&r).is_empty());
        f.forget("meter");
        assert_eq!(f.select(&r).len(), 1);
    }

    #[test]
    fn a_clock_stepped_back_sends_rather_than_goes_quiet() {
        let mut f = filter();
        f.select(&reading(100, &[("voltage", 230.0.into())]));
        assert_eq!(f.select(&reading(50, &[("voltage", 230.0.into())])).len(), 1);
    }
}
