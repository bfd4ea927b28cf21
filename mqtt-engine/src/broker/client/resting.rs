//! A client at rest: what a [`Client`] keeps while its connection is
//! parked (`parking.rs`), less what an idle one does without (the broker,
//! which the lot knows, and its empty output buffer).

use super::{Client, Extra, Identity};
use crate::broker::{Broker, Claim, Mailbox};
use crate::connection::Outbox;
use crate::packet::{Protocol, Will};

/// A client whose connection is parked (`parking.rs`): a [`Client`] less
/// what an idle one does without (the broker, which the lot knows, and its
/// empty output buffer), as it waits in the lot's slab.
pub(in crate::broker) struct Resting {
    claim: Claim,
    identity: Identity,
    will: Option<Box<Will>>,
    extra: Option<Box<Extra>>,
    client_max_packet: u32,
    session_expiry: u32,
    keep_alive: u16,
    send_quota: u16,
    outbound_alias_max: u16,
    version: Protocol,
}

impl Resting {
    /// The mailbox that wakes it.
    pub(in crate::broker) fn mailbox(&self) -> &Mailbox {
        &self.claim.mailbox
    }
}

impl Client {
    /// The client at rest, while its connection is parked; only an idle
    /// one (nothing queued to send: see [`quiet`](Self::quiet)).
    pub(in crate::broker) fn rest(self) -> Resting {
        let Client {
            broker: _,
            claim,
            outbox: _,
            version,
            keep_alive,
            send_quota,
            outbound_alias_max,
            client_max_packet,
            session_expiry,
            will,
            identity,
            extra,
        } = self;
        Resting {
            claim,
            identity,
            will,
            extra,
            client_max_packet,
            session_expiry,
            keep_alive,
            send_quota,
            outbound_alias_max,
            version,
        }
    }

    /// The client of a parked connection that resumes.
    pub(in crate::broker) fn wake(resting: Resting, broker: Broker) -> Client {
        let Resting {
            claim,
            identity,
            will,
            extra,
            client_max_packet,
            session_expiry,
            keep_alive,
            send_quota,
            outbound_alias_max,
            version,
        } = resting;
        Client {
            broker,
            claim,
            outbox: Outbox::default(),
            version,
            keep_alive,
            send_quota,
            outbound_alias_max,
            client_max_packet,
            session_expiry,
            will,
            identity,
            extra,
        }
    }
}
