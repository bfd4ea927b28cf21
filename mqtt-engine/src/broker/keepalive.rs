//! One timer for the keep alive of every connection.
//!
//! A tokio timer is 96 bytes, and a connection waits for its keep alive
//! all its life: a timer in each connection's task made every idle
//! connection's task a size class larger. Instead a connection keeps its
//! deadline in its session's mailbox, an atomic moved forward at each
//! packet (no lock, no timer to reset), and registers it here once. One
//! task sleeps until the earliest deadline it knows; there it finds the
//! deadline moved on (and waits for the new one) or the connection gone
//! (and forgets it), or marks it expired and wakes the connection, which
//! then closes (MQTT-3.1.2-22 / 3.1.2-24). Deadlines are kept to the
//! millisecond, as a tokio timer would.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::mailbox::{KeepAliveCheck, Mailbox};

/// The keep-alive deadlines of a broker's connections.
pub(crate) struct KeepAlives {
    /// Deadlines are milliseconds since this instant.
    epoch: Instant,
    watched: Mutex<Watched>,
    /// Wakes the watching task for a deadline earlier than it sleeps to.
    earlier: Notify,
}

#[derive(Default)]
struct Watched {
    deadlines: BinaryHeap<Reverse<Entry>>,
    /// Whether the watching task runs.
    watching: bool,
}

/// A deadline to look at, of the connection that claimed a session as
/// `generation`.
struct Entry {
    at: u64,
    generation: u64,
    mailbox: Arc<Mailbox>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.generation).cmp(&(other.at, other.generation))
    }
}

impl KeepAlives {
    pub(crate) fn new() -> Self {
        KeepAlives { epoch: Instant::now(), watched: Mutex::default(), earlier: Notify::new() }
    }

    /// The deadline `grace` from now, as the mailbox keeps it.
    pub(crate) fn deadline(&self, grace: Duration) -> u64 {
        let now = Instant::now().saturating_duration_since(self.epoch) + grace;
        // Rounded up, as tokio rounds timers up: never early.
        now.as_millis() as u64 + u64::from(now.subsec_nanos() % 1_000_000 != 0)
    }

    fn now(&self) -> u64 {
        Instant::now().saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Watches the deadline the connection that claimed `mailbox`'s session
    /// as `generation` keeps there, until it expires or the connection goes.
    pub(crate) fn watch(
        self: &Arc<Self>,
        mailbox: Arc<Mailbox>,
        generation: u64,
        shutdown: &CancellationToken,
    ) {
        let Some(at) = mailbox.keepalive_deadline() else { return };
        let mut watched = self.lock();
        let earliest = watched.deadlines.peek().is_none_or(|Reverse(first)| at < first.at);
        watched.deadlines.push(Reverse(Entry { at, generation, mailbox }));
        if !watched.watching {
            watched.watching = true;
            tokio::spawn(self.clone().run(shutdown.clone()));
        } else if earliest {
            drop(watched);
            self.earlier.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        // Each update is one heap operation: a poisoned heap is still whole.
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            // Created before looking, so a notification sent after the look
            // is not missed.
            let earlier = self.earlier.notified();
            let next = self.expire_due();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(self.epoch + Duration::from_millis(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = earlier => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Looks at every deadline that is due; the next one to look at.
    fn expire_due(&self) -> Option<u64> {
        let now = self.now();
        let mut expired = Vec::new();
        let mut watched = self.lock();
        let next = loop {
            match watched.deadlines.peek() {
                None => break None,
                Some(Reverse(first)) if first.at > now => break Some(first.at),
                Some(_) => {}
            }
            let Some(Reverse(mut entry)) = watched.deadlines.pop() else { break None };
            if entry.mailbox.taken_over(entry.generation) {
                // The connection that took over registered its own deadline.
                continue;
            }
            match entry.mailbox.check_keepalive(now) {
                KeepAliveCheck::Later(at) => {
                    entry.at = at;
                    watched.deadlines.push(Reverse(entry));
                }
                KeepAliveCheck::Expired => expired.push(entry.mailbox),
                KeepAliveCheck::Gone => {}
            }
        };
        drop(watched);
        for mailbox in expired {
            mailbox.wake();
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_on_is_waited_for_and_a_passed_one_wakes_its_connection() {
        let keepalives = Arc::new(KeepAlives::new());
        let mailbox = Arc::new(Mailbox::new());
        mailbox.take_over(1);
        assert!(mailbox.set_keepalive_deadline(keepalives.deadline(Duration::from_millis(1500))));
        keepalives.watch(mailbox.clone(), 1, &CancellationToken::new());
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(mailbox.set_keepalive_deadline(keepalives.deadline(Duration::from_millis(1500))));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!mailbox.keepalive_expired(), "moved on at 1 s: due at 2.5 s");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(mailbox.keepalive_expired());
        assert!(!mailbox.set_keepalive_deadline(keepalives.deadline(Duration::from_millis(1500))));
        assert_eq!(keepalives.lock().deadlines.len(), 0, "an expired connection is forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_gone_or_taken_over_is_forgotten() {
        let keepalives = Arc::new(KeepAlives::new());
        let shutdown = CancellationToken::new();
        let (gone, taken) = (Arc::new(Mailbox::new()), Arc::new(Mailbox::new()));
        for (mailbox, generation) in [(&gone, 1), (&taken, 2)] {
            mailbox.take_over(generation);
            mailbox.set_keepalive_deadline(keepalives.deadline(Duration::from_secs(1)));
            keepalives.watch(mailbox.clone(), generation, &shutdown);
        }
        gone.disconnected();
        taken.take_over(3);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!gone.keepalive_expired() && !taken.keepalive_expired());
        assert_eq!(keepalives.lock().deadlines.len(), 0);
    }
}
