//! A session's life: claimed by a connection (kicking one that holds it,
//! MQTT-3.1.4-3, unless another user's), released when the connection
//! ends, its will published after its delay, expired after its interval.

use std::sync::Arc;
use std::time::Duration;

use super::router::SessionEntry;
use super::session::SessionState;
use super::{forwarded, Broker, Claim, Ending, Envelope};
use crate::packet::Will;
use crate::TopicName;

/// Why a connection may not have its client id's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRefused {
    /// Another user's connection holds it.
    OtherUser,
    /// The access rules were reloaded while the client logged in.
    Reloaded,
    /// A newer connection with the same client id claimed the session
    /// while this one waited for it.
    Superseded,
}

impl Broker {
    /// Claims the session of `client` for `user`, kicking a connection that
    /// holds it. A session another user holds is refused: no client takes
    /// over, or reads, a session that is not its user's. One another user
    /// left is not resumed but ended (its will goes) and started afresh.
    /// `login_epoch` is [`access_epoch`](Self::access_epoch) before the
    /// login: if the rules were reloaded since, the login is not trusted.
    /// With the claim: whether an earlier session was resumed (CONNACK's
    /// session present).
    pub async fn claim(
        &self,
        client: Arc<str>,
        clean_start: bool,
        session_expiry: u32,
        user: Option<Arc<str>>,
        login_epoch: u64,
    ) -> Result<(Claim, bool), ClaimRefused> {
        let (mailbox, generation, ended_will) = {
            let mut router = self.router();
            if self.access_epoch() != login_epoch {
                return Err(ClaimRefused::Reloaded);
            }
            let generation = router.next_generation();
            let entry = router.sessions.entry(client.clone()).or_insert_with(SessionEntry::new);
            let other_users = entry.generation != 0 && !entry.owner_unknown && entry.owner != user;
            if other_users && entry.held {
                tracing::warn!(client = %client, user = user.as_deref().unwrap_or(""), owner = entry.owner.as_deref().unwrap_or(""), "client id in use by another user's connection: refused");
                return Err(ClaimRefused::OtherUser);
            }
            // The other user's session ends here: a will it left goes now
            // (MQTT-3.1.3-9), rather than being cancelled by a stranger.
            let mut ended_will = None;
            if other_users {
                tracing::warn!(client = %client, user = user.as_deref().unwrap_or(""), owner = entry.owner.as_deref().unwrap_or(""), "another user's session under this client id is discarded, not resumed");
                ended_will = entry.pending_will.take();
            }
            entry.owner = user;
            entry.owner_unknown = false;
            // The new connection proved its credentials under these rules.
            entry.mailbox.clear_revoked();
            // A session held by a connection whose session ends with it (a
            // clean session) is not resumed by a takeover: it was never
            // going to outlive that connection.
            let ends_with_holder = entry.held && entry.expiry == 0;
            let existed = entry.generation != 0 && !ends_with_holder;
            // MQTT-3.1.2-4: a clean start discards the previous session.
            let discard = clean_start || !existed || other_users;
            entry.discard |= discard;
            if discard && ended_will.is_none() {
                // A will waiting for its delay goes now: its session ends
                // first (MQTT-3.1.3-9).
                ended_will = entry.pending_will.take();
            }
            // Tells the connection holding the session, if any, to go.
            entry.mailbox.take_over(generation);
            entry.held = true;
            entry.generation = generation;
            // Known from the start, so a snapshot taken while the client is
            // connected keeps only sessions meant to outlive the connection.
            entry.expiry = session_expiry;
            entry.offline_since = None;
            // Back before its will's delay: the will is not sent.
            entry.pending_will = None;
            (entry.mailbox.clone(), generation, ended_will)
        };
        if let Some(will) = ended_will {
            self.publish_will(&client, *will);
        }
        // Waits for a connection that was kicked to hand the state back.
        let Some((state, session_present)) = self.take_state(&client, generation).await else {
            tracing::info!(client = %client, "taken over by a newer connection before its CONNACK; closing");
            return Err(ClaimRefused::Superseded);
        };
        mailbox.set_online(true);
        self.touch();
        Ok((Claim { client, state, mailbox, generation }, session_present))
    }

    /// The session state of `client` for the claim `generation`, once the
    /// connection that held it has handed it back, emptied if a claim
    /// decided to discard it, and whether it was kept (session present);
    /// `None` if a newer claim came meanwhile (the state is for that one).
    async fn take_state(&self, client: &str, generation: u64) -> Option<(Box<SessionState>, bool)> {
        loop {
            // Listening before looking: a hand-back in between is not missed.
            let released = self.shared.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut router = self.router();
                let entry = router.sessions.get_mut(client)?;
                if entry.generation != generation {
                    return None;
                }
                if let Some(mut state) = entry.mailbox.take_state() {
                    let discard = std::mem::take(&mut entry.discard);
                    if discard {
                        entry.mailbox.clear();
                        router.remove_subscriptions(client, &state);
                        *state = SessionState::default();
                    }
                    return Some((state, !discard));
                }
            }
            // A claim dropped unreleased (its task panicked) hands the state
            // back without a signal: looked for again after a while.
            let _ = tokio::time::timeout(Duration::from_secs(1), released).await;
        }
    }

    /// Starts the keep alive of a claim's connection: it must send a
    /// packet within `grace` (1.5 x its keep alive), and then again.
    pub(crate) fn watch_keepalive(&self, claim: &Claim, grace: Duration) {
        let keepalives = &self.shared.keepalives;
        claim.mailbox.start_keepalive(keepalives.deadline(grace));
        keepalives.watch(claim.mailbox.clone(), claim.generation, &self.shared.shutdown);
    }

    /// Moves a claim's keep-alive deadline to `grace` from now, at a
    /// packet; false when it had expired already.
    pub(crate) fn keep_alive(&self, claim: &Claim, grace: Duration) -> bool {
        claim.mailbox.set_keepalive_deadline(self.shared.keepalives.deadline(grace))
    }

    /// Releases a session when its connection ends.
    /// The claim's state goes back to the session when the claim is dropped.
    pub fn release(&self, claim: Claim, ending: Ending) {
        let (client, mailbox, generation) = (claim.client.clone(), claim.mailbox.clone(), claim.generation);
        // Before the state is handed back: a connection taking over cannot
        // have registered its own waker and deadline yet.
        mailbox.disconnected();
        self.touch();
        let mut router = self.router();
        let still_ours = router.sessions.get(&client).is_some_and(|e| e.generation == generation);
        if !still_ours {
            // Taken over: the new connection owns the session now, and gets
            // its state. Our will goes now unless the session goes on and
            // the will may wait.
            let clean = router.sessions.get(&client).is_some_and(|e| e.discard);
            drop(claim);
            drop(router);
            self.shared.released.notify_waiters();
            if let Some(will) = ending.will {
                if clean || will.properties.will_delay_interval.unwrap_or(0) == 0 {
                    self.publish_will(&client, *will);
                }
            }
            return;
        }
        mailbox.set_online(false);
        // QoS 0 routed while the client was still here, and not sent, is
        // not kept for its return (MQTT 4.4: only QoS 1/2 are queued).
        mailbox.drop_qos0();
        if ending.session_expiry == 0 {
            router.remove_subscriptions(&client, &claim.state);
            router.sessions.remove(&client);
            drop(router);
            // Its state goes to a mailbox that goes with the session.
            drop(claim);
            if let Some(will) = ending.will {
                self.publish_will(&client, *will);
            }
            return;
        }
        let expiry = (ending.session_expiry != u32::MAX)
            .then(|| Duration::from_secs(u64::from(ending.session_expiry)));
        // MQTT-3.1.3-9: the will goes when its delay passes or the session
        // ends, whichever is first, unless the client is back.
        let (will_now, will_later, will_delay) = match ending.will {
            Some(will) => match will.properties.will_delay_interval.unwrap_or(0) {
                0 => (Some(will), None, None),
                _ if expiry.is_some_and(|e| e.is_zero()) => (Some(will), None, None),
                delay => (None, Some(will), Some(Duration::from_secs(u64::from(delay)))),
            },
            None => (None, None, None),
        };
        if let Some(entry) = router.sessions.get_mut(&client) {
            entry.held = false;
            entry.expiry = ending.session_expiry;
            entry.went_offline();
            // Before the lock goes: a claim right after finds it, and cancels it.
            entry.pending_will = will_later;
        }
        drop(claim);
        drop(router);
        if let Some(will) = will_now {
            self.publish_will(&client, *will);
        }
        if let Some(delay) = will_delay {
            let broker = self.clone();
            let client = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                broker.publish_pending_will(&client, generation);
            });
        }
        if let Some(expiry) = expiry {
            let broker = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(expiry).await;
                broker.expire(&client, generation);
            });
        }
    }

    /// Publishes the will a session left, if it is still pending.
    fn publish_pending_will(&self, client: &str, generation: u64) {
        let will = {
            let mut router = self.router();
            router
                .sessions
                .get_mut(client)
                .filter(|e| e.generation == generation)
                .and_then(|e| e.pending_will.take())
        };
        if let Some(will) = will {
            self.publish_will(client, *will);
        }
    }

    /// Ends a session whose expiry interval passed while it was away.
    pub(super) fn expire(&self, client: &str, generation: u64) {
        let mut router = self.router();
        let Some(entry) = router.sessions.get(client) else { return };
        if entry.generation != generation {
            return;
        }
        // Nobody holds an offline session's state; if somebody just claimed
        // it, the generation check above already returned.
        let Some(state) = entry.mailbox.take_state() else { return };
        router.remove_subscriptions(client, &state);
        let will = router.sessions.remove(client).and_then(|e| e.pending_will);
        drop(router);
        tracing::debug!(client, "session expired");
        // The session ended before its will's delay: the will goes now.
        if let Some(will) = will {
            self.publish_will(client, *will);
        }
    }

    fn publish_will(&self, client: &str, will: Will) {
        let Ok(topic) = TopicName::new(will.topic) else { return };
        tracing::debug!(client, topic = %topic, "publishing will");
        let expires_at = will
            .properties
            .message_expiry_interval
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(u64::from(s)));
        let properties = forwarded(will.properties);
        self.route(Envelope {
            topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties,
            expires_at,
            publisher: Some(Arc::from(client)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{Access, PasswordFile};

    fn line(user: &str, password: &str) -> String {
        format!("{user}:{}\n", crate::access::passwords::hash_password(password.as_bytes(), 10).unwrap())
    }

    #[tokio::test]
    async fn a_reload_revokes_removed_users_and_anonymous_clients_no_longer_allowed() {
        let broker = Broker::default();
        let (ops, eve) = (line("ops", "a"), line("eve", "b"));
        let file = PasswordFile::parse(&format!("{ops}{eve}")).unwrap();
        broker.set_access(Access::new(true, Some(file), None));
        let epoch = broker.access_epoch();
        let ops_claim =
            broker.claim(Arc::from("c1"), true, 0, Some(Arc::from("ops")), epoch).await.unwrap().0;
        let eve_claim =
            broker.claim(Arc::from("c2"), true, 0, Some(Arc::from("eve")), epoch).await.unwrap().0;
        let anon = broker.claim(Arc::from("c3"), true, 0, None, epoch).await.unwrap().0;
        // eve's password changes, ops's line stays as it was.
        let changed = PasswordFile::parse(&format!("{ops}{}", line("eve", "c"))).unwrap();
        broker.set_access(Access::new(true, Some(changed.clone()), None));
        assert!(eve_claim.mailbox.revoked());
        assert!(!ops_claim.mailbox.revoked());
        assert!(!anon.mailbox.revoked(), "anonymous clients are still allowed");
        broker.set_access(Access::new(false, Some(changed), None));
        assert!(anon.mailbox.revoked(), "anonymous clients are no longer allowed");
        assert!(!ops_claim.mailbox.revoked());
    }

    /// A held claim of client "c" (`clean`, `expiry`), then two more
    /// claims (not clean, expiry 3600) waiting for its state, the second
    /// claimed after the first: the held claim, and the two waiting.
    async fn held_then_two_claims(clean: bool, expiry: u32) -> (Broker, Claim, ClaimTask, ClaimTask) {
        let broker = Broker::default();
        let epoch = broker.access_epoch();
        let claim = |broker: &Broker| {
            let broker = broker.clone();
            tokio::spawn(async move { broker.claim(Arc::from("c"), false, 3600, None, epoch).await })
        };
        let (mut held, _) = broker.claim(Arc::from("c"), clean, expiry, None, epoch).await.unwrap();
        held.state.last_id = 41;
        let second = claim(&broker);
        while !held.taken_over() {
            tokio::task::yield_now().await;
        }
        let third = claim(&broker);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished() && !third.is_finished(), "both wait for the state");
        (broker, held, second, third)
    }

    type ClaimTask = tokio::task::JoinHandle<Result<(Claim, bool), ClaimRefused>>;

    #[tokio::test]
    async fn a_takeover_gets_the_state_handed_back_and_a_claim_superseded_meanwhile_is_refused() {
        let (broker, held, second, third) = held_then_two_claims(false, u32::MAX).await;
        broker.release(held, Ending { will: None, session_expiry: u32::MAX });
        assert!(matches!(second.await.unwrap(), Err(ClaimRefused::Superseded)));
        let (third, present) = third.await.unwrap().unwrap();
        assert!(present);
        assert_eq!(third.state.last_id, 41, "the state the first connection left");
    }

    #[tokio::test]
    async fn a_discard_decided_by_a_claim_superseded_meanwhile_still_happens() {
        // A clean session (expiry 0) is held: the second claim will not
        // resume it, and the third would resume the second's, which never
        // started.
        let (broker, held, second, third) = held_then_two_claims(true, 0).await;
        broker.release(held, Ending { will: None, session_expiry: 0 });
        assert!(matches!(second.await.unwrap(), Err(ClaimRefused::Superseded)));
        let (third, present) = third.await.unwrap().unwrap();
        assert!(!present, "the clean session was not to be resumed");
        assert_eq!(third.state.last_id, 0);
    }

    #[tokio::test]
    async fn a_clean_start_ends_the_session_and_sends_the_will_still_waiting_for_its_delay() {
        // MQTT-3.1.3-9: the will goes at its delay or when the session ends.
        let broker = Broker::default();
        let epoch = broker.access_epoch();
        let mut wills = broker.subscribe(crate::TopicFilter::new("wills/#").unwrap(), 4);
        let will = crate::packet::Will {
            topic: "wills/c".into(),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: crate::QoS::AtLeastOnce,
            retain: false,
            properties: crate::packet::Properties { will_delay_interval: Some(600), ..Default::default() },
        };
        let (claim, _) = broker.claim(Arc::from("c"), false, 3600, None, epoch).await.unwrap();
        broker.release(claim, Ending { will: Some(Box::new(will)), session_expiry: 3600 });
        assert!(wills.try_recv().is_none(), "the will waits for its delay");
        let (_claim, present) = broker.claim(Arc::from("c"), true, 3600, None, epoch).await.unwrap();
        assert!(!present);
        assert_eq!(wills.try_recv().map(|m| m.payload), Some(bytes::Bytes::from_static(b"gone")));
    }

    #[tokio::test]
    async fn a_login_checked_before_a_reload_cannot_claim_after_it() {
        let broker = Broker::default();
        let before = broker.access_epoch();
        broker.set_access(Access::default());
        let claim = broker.claim(Arc::from("late"), true, 0, None, before).await;
        assert!(matches!(claim, Err(ClaimRefused::Reloaded)));
        assert!(broker.claim(Arc::from("late"), true, 0, None, broker.access_epoch()).await.is_ok());
    }
}
