//! The receiving end of an in-process subscription to the broker.

use tokio::sync::mpsc;

use crate::Message;

/// Messages matching an in-process subscription, in order.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Message>,
}

impl Subscription {
    pub(crate) fn new(rx: mpsc::Receiver<Message>) -> Self {
        Subscription { rx }
    }

    /// The next message, or `None` once the broker is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next message if one is already queued.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }
}
