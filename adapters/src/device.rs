//! The interface between a device and the rest of the gateway.
//!
//! A device is either polled ([`PolledDevice`]) or pushes on its own
//! ([`PushDevice`]). Either way, what it produces goes into an [`Output`] as
//! [`SourceEvent`]s tagged with the device's [`SourceId`], so that one channel
//! can carry every device's events to the gateway in order.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Reading;

/// A boxed future, so both device traits stay object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a device did not answer. The text becomes the node's
/// `error: <reason>` status, so it must read well on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DeviceError {
    reason: String,
}

impl DeviceError {
    /// An error with a reason a person can act on, e.g. `timed out after 1s`.
    pub fn new(reason: impl Into<String>) -> Self {
        DeviceError { reason: reason.into() }
    }

    /// The reason, as it appears in the node status.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// A device asked for readings on a period: a Modbus meter, the host.
pub trait PolledDevice: Send {
    /// Reads the device once. Most devices return one reading for their own
    /// node; an error marks that node `error: <reason>` until a poll succeeds.
    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Reading>, DeviceError>>;

    /// Writes `value` (as published, text) to `attribute`. Nothing is
    /// written unless the value is valid for it; the error says why.
    fn write<'a>(&'a mut self, attribute: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), String>> {
        let _ = value;
        Box::pin(async move { Err(format!("`{attribute}` is not writable")) })
    }
}

/// A write for a polled device, answered on `reply`.
#[derive(Debug)]
pub struct WriteRequest {
    /// The attribute to write.
    pub attribute: String,
    /// The value, as published.
    pub value: String,
    /// `Ok` or the reason it was refused or failed.
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// A device that produces readings when it hears them, for any number of
/// nodes: a serial radio receiver, a BLE scanner.
pub trait PushDevice: Send {
    /// Runs until `shutdown` is cancelled, writing readings and node statuses
    /// into `output`. Returns an error only when it cannot go on at all.
    fn run(
        self: Box<Self>,
        output: Output,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), DeviceError>>;
}

/// Which configured device an event came from (its index in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceId(pub usize);

/// The health of one node, as published on its status topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeStatus {
    /// The node answers.
    Online,
    /// The last attempt failed, with the reason.
    Error(String),
}

/// What a device tells the gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// New values for one node.
    Reading(Reading),
    /// A node changed health; sent only on a change, not on every poll.
    Status {
        /// The node whose status changed.
        node: String,
        /// Its new status.
        status: NodeStatus,
    },
}

/// Where a device writes its events: a channel shared by every device, each
/// event tagged with the device's [`SourceId`].
#[derive(Debug, Clone)]
pub struct Output {
    source: SourceId,
    tx: mpsc::Sender<(SourceId, SourceEvent)>,
}

impl Output {
    /// An output that tags every event with `source`.
    pub fn new(source: SourceId, tx: mpsc::Sender<(SourceId, SourceEvent)>) -> Self {
        Output { source, tx }
    }

    /// Sends one event, waiting while the gateway is busy (backpressure
    /// rather than an unbounded queue). Returns false once the gateway has
    /// stopped listening, which tells the device to stop too.
    pub async fn send(&self, event: SourceEvent) -> bool {
        self.tx.send((self.source, event)).await.is_ok()
    }
}
