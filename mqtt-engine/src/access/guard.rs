//! Slows down password guessing.
//!
//! After a few failed logins from one address, each further attempt from
//! it waits before its password is checked, twice as long each time up to
//! [`MAX_DELAY`]; a success or ten quiet minutes forget the address. At
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
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    hashing: Semaphore,
}

impl Default for LoginGuard {
    fn default() -> Self {
        LoginGuard { failures: Mutex::new(HashMap::new()), hashing: Semaphore::new(HASHING) }
    }
}

impl LoginGuard {
    /// How long an attempt from `ip` waits now.
    pub(crate) fn delay(&self, ip: Option<IpAddr>) -> Duration {
        let Some(ip) = ip else { return Duration::ZERO };
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(&ip) {
            Some((count, last)) if *count >= FREE_FAILURES && last.elapsed() < FORGET_AFTER => {
                let doublings = (count - FREE_FAILURES).min(16);
                (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
            }
            _ => Duration::ZERO,
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
        let Some(ip) = ip else { return };
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= MAX_ADDRESSES {
            failures.retain(|_, (_, last)| last.elapsed() < FORGET_AFTER);
        }
        if failures.len() >= MAX_ADDRESSES && !failures.contains_key(&ip) {
            // Ten thousand addresses failing within ten minutes: a flood
            // from spoofed sources; drop the oldest rather than grow.
            if let Some(oldest) = failures.iter().min_by_key(|(_, (_, last))| *last).map(|(ip, _)| *ip) {
                failures.remove(&oldest);
            }
        }
        let now = Instant::now();
        let entry = failures.entry(ip).or_insert((0, now));
        if entry.1.elapsed() >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        if entry.0 == FREE_FAILURES {
            tracing::warn!(%ip, "repeated failed logins; further attempts from this address are slowed down");
        }
    }

    pub(crate) fn succeeded(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&ip);
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
}
