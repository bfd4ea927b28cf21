//! Slows down password guessing.
//!
//! After a few failed logins from one address, each further attempt from
//! it waits before its password is checked, twice as long each time up to
//! [`MAX_DELAY`], and only one attempt from it is checked at a time: the
//! others are refused at once, unhashed, so parallel connections gain an
//! attacker nothing. A success or ten quiet minutes forget the address.
//! An IPv6 address counts by its /64, which one host can hold whole. At
//! most [`HASHING`] PBKDF2 checks run at once, so a flood of logins cannot
//! take every core from the connections already served.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Failures an address may have before its attempts are delayed.
const FREE_FAILURES: u32 = 3;
const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(8);
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Addresses remembered at most; past it, the quiet ones are forgotten.
const MAX_ADDRESSES: usize = 10_000;
const HASHING: usize = 2;

/// Failed logins per address, and the PBKDF2 slots.
pub(crate) struct LoginGuard {
    failures: Mutex<HashMap<IpAddr, Record>>,
    hashing: Semaphore,
}

/// One address's failures, and its logins being checked now.
struct Record {
    count: u32,
    last: Instant,
    pending: u32,
}

impl Record {
    fn penalised(&self) -> bool {
        self.count >= FREE_FAILURES && self.last.elapsed() < FORGET_AFTER
    }
}

/// A login being checked; the address's count of them drops with it.
pub(crate) struct Pending<'a> {
    guard: &'a LoginGuard,
    ip: Option<IpAddr>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut failures = self.guard.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(record) = failures.get_mut(&ip) {
            record.pending = record.pending.saturating_sub(1);
            if record.count == 0 && record.pending == 0 {
                failures.remove(&ip);
            }
        }
    }
}

/// The key an address is counted under: an IPv6 address by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

impl Default for LoginGuard {
    fn default() -> Self {
        LoginGuard { failures: Mutex::new(HashMap::new()), hashing: Semaphore::new(HASHING) }
    }
}

impl LoginGuard {
    /// How long an attempt from `ip` waits now.
    pub(crate) fn delay(&self, ip: Option<IpAddr>) -> Duration {
        let Some(ip) = ip.map(key) else { return Duration::ZERO };
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(&ip) {
            Some(record) if record.penalised() => {
                let doublings = (record.count - FREE_FAILURES).min(16);
                (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
            }
            _ => Duration::ZERO,
        }
    }

    /// Starts checking a login from `ip`; `None` when the address is
    /// penalised and already has one being checked: refuse at once.
    pub(crate) fn begin(&self, ip: Option<IpAddr>) -> Option<Pending<'_>> {
        let Some(ip) = ip.map(key) else { return Some(Pending { guard: self, ip: None }) };
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        self.make_room(&mut failures, ip);
        let record = failures.entry(ip).or_insert(Record { count: 0, last: Instant::now(), pending: 0 });
        // Checks under way count as failures to come: a burst of parallel
        // attempts from a fresh address gets no more than the free ones.
        let due = record.count.saturating_add(record.pending) >= FREE_FAILURES;
        if record.pending > 0 && (record.penalised() || due) {
            return None;
        }
        record.pending += 1;
        Some(Pending { guard: self, ip: Some(ip) })
    }

    fn make_room(&self, failures: &mut HashMap<IpAddr, Record>, ip: IpAddr) {
        if failures.len() < MAX_ADDRESSES || failures.contains_key(&ip) {
            return;
        }
        failures.retain(|_, r| r.pending > 0 || (r.count > 0 && r.last.elapsed() < FORGET_AFTER));
        if failures.len() >= MAX_ADDRESSES {
            // Ten thousand addresses failing within ten minutes: a flood
            // from spoofed sources; drop the oldest rather than grow.
            if let Some(oldest) = failures.iter().min_by_key(|(_, r)| r.last).map(|(ip, _)| *ip) {
                failures.remove(&oldest);
            }
        }
    }

    /// Waits as long as the failures from `ip` call for.
    pub(crate) async fn wait_turn(&self, ip: Option<IpAddr>) {
        let delay = self.delay(ip);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// A slot to run one password check in.
    pub(crate) async fn hashing(&self) -> Option<SemaphorePermit<'_>> {
        self.hashing.acquire().await.ok()
    }

    pub(crate) fn failed(&self, ip: Option<IpAddr>) {
        let Some(ip) = ip.map(key) else { return };
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        self.make_room(&mut failures, ip);
        let now = Instant::now();
        let record = failures.entry(ip).or_insert(Record { count: 0, last: now, pending: 0 });
        if record.last.elapsed() >= FORGET_AFTER {
            record.count = 0;
        }
        record.count = record.count.saturating_add(1);
        record.last = now;
        if record.count == FREE_FAILURES {
            tracing::warn!(%ip, "repeated failed logins; further attempts from this address are slowed down, one at a time");
        }
    }

    pub(crate) fn succeeded(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip.map(key) {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(record) = failures.get_mut(&ip) {
                record.count = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_start_after_three_failures_double_and_stop_at_a_success() {
        let guard = LoginGuard::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..2 {
            guard.failed(Some(ip));
        }
        assert_eq!(guard.delay(Some(ip)), Duration::ZERO);
        guard.failed(Some(ip));
        assert_eq!(guard.delay(Some(ip)), FIRST_DELAY);
        guard.failed(Some(ip));
        assert_eq!(guard.delay(Some(ip)), FIRST_DELAY * 2);
        for _ in 0..20 {
            guard.failed(Some(ip));
        }
        assert_eq!(guard.delay(Some(ip)), MAX_DELAY);
        assert_eq!(guard.delay(Some(other)), Duration::ZERO);
        guard.succeeded(Some(ip));
        assert_eq!(guard.delay(Some(ip)), Duration::ZERO);
    }

    #[test]
    fn a_penalised_address_gets_one_check_at_a_time_and_ipv6_counts_by_its_64() {
        let guard = LoginGuard::default();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let parallel: Vec<_> = (0..FREE_FAILURES).map(|_| guard.begin(Some(ip))).collect();
        assert!(parallel.iter().all(Option::is_some), "before any failure, in parallel");
        assert!(guard.begin(Some(ip)).is_none(), "no more in parallel than the free failures");
        drop(parallel);
        for _ in 0..FREE_FAILURES {
            guard.failed(Some(ip));
        }
        let first = guard.begin(Some(ip));
        assert!(first.is_some());
        assert!(guard.begin(Some(ip)).is_none(), "a second one at the same time is refused");
        drop(first);
        assert!(guard.begin(Some(ip)).is_some());
        let one: IpAddr = "2001:db8::1".parse().unwrap();
        let other: IpAddr = "2001:db8::ffff:1234".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            guard.failed(Some(one));
        }
        assert_eq!(guard.delay(Some(other)), FIRST_DELAY, "same /64, same count");
        assert_eq!(guard.delay(Some("2001:db8:0:1::1".parse().unwrap())), Duration::ZERO);
        assert!(guard.failures.lock().unwrap().len() <= 3);
    }
}
