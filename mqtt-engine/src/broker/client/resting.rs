//! A client at rest: what a [`Client`] keeps while its connection is
//! parked (`parking.rs`), less what an idle one does without (the broker,
//! which the lot knows, and its empty output buffer).

use super::{Client, Extra, Identity, Terms};
use crate::broker::{Broker, Claim, Mailbox};
use crate::connection::Outbox;

/// A client at rest, as it waits in the lot's slab.
pub(in crate::broker) struct Resting {
    claim: Claim,
    terms: Terms,
    identity: Identity,
    extra: Option<Box<Extra>>,
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
        let Client { broker: _, claim, outbox: _, terms, identity, extra } = self;
        Resting { claim, terms, identity, extra }
    }

    /// The client of a parked connection that resumes.
    pub(in crate::broker) fn wake(resting: Resting, broker: Broker) -> Client {
        let Resting { claim, terms, identity, extra } = resting;
        Client { broker, claim, outbox: Outbox::default(), terms, identity, extra }
    }
}
