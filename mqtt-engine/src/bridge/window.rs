//! The InflightWindow: which packet id carries which buffer row, and how
//! far the upstream's cursor may move.
//!
//! Rows go out in id order. The cursor may only pass a row once it and
//! every row before it are acknowledged, so an acknowledgement that
//! arrives early (brokers may answer out of order) is remembered until the
//! ones before it come.

use std::collections::{HashMap, HashSet, VecDeque};

/// Packet ids of QoS 1 publishes awaiting PUBACK.
#[derive(Debug)]
pub struct InflightWindow {
    capacity: usize,
    next_id: u16,
    /// Rows in the order they were sent: (packet id, row id).
    order: VecDeque<(u16, i64)>,
    /// Every packet id in flight, with its row (None: not a row, e.g. the
    /// gateway's status message).
    in_flight: HashMap<u16, Option<i64>>,
    acked_early: HashSet<u16>,
}

impl InflightWindow {
    /// A window of at most `capacity` messages (1 to 65,535).
    pub fn new(capacity: usize) -> Self {
        InflightWindow {
            capacity: capacity.clamp(1, 65_535),
            next_id: 1,
            order: VecDeque::new(),
            in_flight: HashMap::new(),
            acked_early: HashSet::new(),
        }
    }

    /// Whether another message may go out.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.capacity
    }

    /// How many are in flight.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Takes a packet id for `row` (None: a message that is not a row).
    pub fn send(&mut self, row: Option<i64>) -> u16 {
        while self.next_id == 0 || self.in_flight.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.in_flight.insert(id, row);
        if let Some(row) = row {
            self.order.push_back((id, row));
        }
        id
    }

    /// A PUBACK for `packet_id`: Some(row id the cursor may now reach) when
    /// the oldest rows are all acknowledged, None otherwise (or when the
    /// id is not ours).
    pub fn ack(&mut self, packet_id: u16) -> Option<i64> {
        let row = self.in_flight.remove(&packet_id)?;
        row?;
        if self.order.front().map(|(id, _)| *id) != Some(packet_id) {
            self.acked_early.insert(packet_id);
            return None;
        }
        let mut reached = None;
        while let Some((id, row)) = self.order.front().copied() {
            if id != packet_id && !self.acked_early.remove(&id) {
                break;
            }
            reached = Some(row);
            self.order.pop_front();
        }
        reached
    }

    /// The oldest row not yet acknowledged.
    pub fn first_unacked(&self) -> Option<i64> {
        self.order.front().map(|(_, row)| *row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_moves_only_over_acknowledged_rows() {
        let mut w = InflightWindow::new(10);
        let a = w.send(Some(1));
        let b = w.send(Some(2));
        let c = w.send(Some(3));
        assert_eq!(w.ack(b), None, "row 1 is still out");
        assert_eq!(w.first_unacked(), Some(1));
        assert_eq!(w.ack(a), Some(2), "rows 1 and 2 are done");
        assert_eq!(w.ack(a), None, "a second PUBACK for the same id is ignored");
        assert_eq!(w.ack(c), Some(3));
        assert_eq!(w.len(), 0);
        assert_eq!(w.first_unacked(), None);
    }

    #[test]
    fn ids_skip_zero_and_those_in_flight() {
        let mut w = InflightWindow::new(3);
        w.next_id = u16::MAX;
        let a = w.send(None);
        let b = w.send(Some(7));
        assert_eq!((a, b), (u16::MAX, 1));
        assert!(w.has_room());
        w.send(Some(8));
        assert!(!w.has_room());
        assert_eq!(w.ack(a), None, "not a row");
        assert_eq!(w.ack(b), Some(7));
    }
}
