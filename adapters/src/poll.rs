//! The poll schedule of a [`PolledDevice`].
//!
//! Each device polls on its own period in its own task, so a slow device
//! never delays another. A poll that overruns (a stalled device, a
//! suspended machine) is followed by one poll at once and then the period
//! again, counted from that poll: the ticks it missed are dropped, never
//! fired in a burst, and no two polls are ever closer than one period.
//!
//! A poll that does not return within its limit, or that panics, marks the
//! node `error: <reason>` like any failed poll; the next tick polls again.
//! Status events are sent only when the node's health changes.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{interval, timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use tokio::sync::mpsc;

use crate::{BoxFuture, DeviceError, NodeStatus, Output, PolledDevice, Reading, SourceEvent, WriteRequest};

/// When a polled device is asked, and how long it may take to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The poll period.
    pub period: Duration,
    /// How long one poll may take before the node is in error.
    pub limit: Duration,
}

/// Polls `device` on `schedule` until `shutdown`, sending its readings and
/// its node's status changes (`node` is the device's own node) to `output`.
/// Writes arriving on `writes` run between polls, in the same task, so a
/// device never sees a write and a poll at once.
pub async fn run_polled(
    mut device: Box<dyn PolledDevice>,
    node: String,
    schedule: Schedule,
    output: Output,
    mut writes: mpsc::Receiver<WriteRequest>,
    shutdown: CancellationToken,
) {
    let mut ticker = interval(schedule.period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_status: Option<NodeStatus> = None;
    let mut writes_open = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            write = writes.recv(), if writes_open => {
                match write {
                    // The caller gave up waiting: the write is not made late.
                    Some(w) if w.reply.is_closed() => {}
                    Some(w) => {
                        let result = match timeout(schedule.limit, device.write(&w.attribute, &w.value)).await {
                            Ok(result) => result,
                            Err(_) => Err(format!("no answer within {}", humantime_secs(schedule.limit))),
                        };
                        let _ = w.reply.send(result);
                    }
                    None => writes_open = false,
                }
                continue;
            }
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = poll_once(device.as_mut(), schedule.limit) => result,
        };
        let (status, readings) = match result {
            Ok(readings) => (NodeStatus::Online, readings),
            Err(e) => (NodeStatus::Error(e.reason().to_owned()), Vec::new()),
        };
        if last_status.as_ref() != Some(&status) {
            match &status {
                NodeStatus::Online if last_status.is_some() => {
                    tracing::info!(node = %node, "device answers again")
                }
                NodeStatus::Online => {}
                NodeStatus::Error(reason) => {
                    tracing::warn!(node = %node, %reason, "device failed")
                }
            }
            let event = SourceEvent::Status { node: node.clone(), status: status.clone() };
            if !output.send(event).await {
                return;
            }
            last_status = Some(status);
        }
        for reading in readings {
            if !output.send(SourceEvent::Reading(reading)).await {
                return;
            }
        }
    }
}

/// Polls `device` once, giving up after `limit`; a panic in the adapter is
/// an error of this poll, not of the gateway.
pub async fn poll_once(device: &mut dyn PolledDevice, limit: Duration) -> Result<Vec<Reading>, DeviceError> {
    match timeout(limit, CatchUnwind(device.poll())).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(DeviceError::new(format!("the adapter failed: {}", panic_message(&*panic)))),
        Err(_) => Err(DeviceError::new(format!("no answer within {}", humantime_secs(limit)))),
    }
}

/// A future that turns a panic while it is polled into an error value.
struct CatchUnwind<'a, T>(BoxFuture<'a, T>);

impl<T> Future for CatchUnwind<'_, T> {
    type Output = Result<T, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // After a panic the inner future is never polled again (the caller
        // drops it), so state it left half-updated is never observed.
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic")
}

fn humantime_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BoxFuture, SourceId};
    use std::sync::{Arc, Mutex};
    use std::time::SystemTime;
    use tokio::time::Instant;

    /// A device whose answers and delays the test scripts, recording when it
    /// was polled.
    struct ScriptedDevice {
        polls: Arc<Mutex<Vec<Instant>>>,
        script: Vec<(Duration, Result<(), &'static str>)>,
    }

    impl PolledDevice for ScriptedDevice {
        fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Reading>, DeviceError>> {
            Box::pin(async move {
                self.polls.lock().unwrap().push(Instant::now());
                let (delay, outcome) =
                    if self.script.is_empty() { (Duration::ZERO, Ok(())) } else { self.script.remove(0) };
                tokio::time::sleep(delay).await;
                outcome.map_err(DeviceError::new)?;
                Ok(vec![Reading { node: "n".into(), ts: SystemTime::now(), attributes: vec![] }])
            })
        }
    }

    type Spawned = (Arc<Mutex<Vec<Instant>>>, mpsc::Receiver<(SourceId, SourceEvent)>, CancellationToken);

    /// Runs a scripted device every second, each poll limited to `limit`.
    fn spawn(script: Vec<(Duration, Result<(), &'static str>)>, limit: Duration) -> Spawned {
        let polls = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let device = Box::new(ScriptedDevice { polls: polls.clone(), script });
        let schedule = Schedule { period: Duration::from_secs(1), limit };
        let (_, writes) = mpsc::channel(1);
        tokio::spawn(run_polled(
            device,
            "n".into(),
            schedule,
            Output::new(SourceId(0), tx),
            writes,
            shutdown.clone(),
        ));
        (polls, rx, shutdown)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_poll_is_followed_by_one_poll_then_the_period_not_a_burst() {
        let start = Instant::now();
        // The second poll hangs for 3.5 periods.
        let script = vec![(Duration::ZERO, Ok(())), (Duration::from_millis(3500), Ok(()))];
        let (polls, _rx, shutdown) = spawn(script, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(8200)).await;
        shutdown.cancel();
        let offsets: Vec<u128> = polls.lock().unwrap().iter().map(|t| (*t - start).as_millis()).collect();
        // The poll at 1 stalls until 4.5; the missed 2, 3 and 4 are dropped,
        // not fired late; one poll at 4.5, then one period apart again.
        assert_eq!(offsets, vec![0, 1000, 4500, 5500, 6500, 7500]);
    }

    #[tokio::test(start_paused = true)]
    async fn status_is_sent_on_change_only_and_recovery_returns_online() {
        let script = vec![
            (Duration::ZERO, Ok(())),
            (Duration::ZERO, Err("timed out")),
            (Duration::ZERO, Err("timed out")),
            (Duration::ZERO, Ok(())),
        ];
        let (_polls, mut rx, shutdown) = spawn(script, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(4500)).await;
        shutdown.cancel();
        let mut events = Vec::new();
        while let Ok((_, e)) = rx.try_recv() {
            events.push(match e {
                SourceEvent::Reading(_) => "reading".to_string(),
                SourceEvent::Status { status: NodeStatus::Online, .. } => "online".into(),
                SourceEvent::Status { status: NodeStatus::Error(r), .. } => format!("error: {r}"),
            });
        }
        assert_eq!(events, ["online", "reading", "error: timed out", "online", "reading", "reading"]);
    }

    struct PanickingDevice;

    impl PolledDevice for PanickingDevice {
        fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Reading>, DeviceError>> {
            Box::pin(async { panic!("register map index out of range") })
        }
    }

    #[tokio::test]
    async fn a_panicking_adapter_fails_its_poll_not_the_gateway() {
        let err = poll_once(&mut PanickingDevice, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.reason(), "the adapter failed: register map index out of range");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_poll_marks_the_node_in_error_and_polling_goes_on() {
        let script = vec![(Duration::from_secs(3600), Ok(())), (Duration::ZERO, Ok(()))];
        let (_polls, mut rx, shutdown) = spawn(script, Duration::from_secs(2));
        let mut statuses = Vec::new();
        while statuses.len() < 2 {
            if let Some((_, SourceEvent::Status { status, .. })) = rx.recv().await {
                statuses.push(status);
            }
        }
        shutdown.cancel();
        assert_eq!(statuses, [NodeStatus::Error("no answer within 2s".into()), NodeStatus::Online]);
    }

    #[tokio::test(start_paused = true)]
    async fn poll_once_gives_up_after_its_limit() {
        let polls = Arc::new(Mutex::new(Vec::new()));
        let mut device = ScriptedDevice { polls, script: vec![(Duration::from_secs(60), Ok(()))] };
        let err = poll_once(&mut device, Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.reason(), "no answer within 2s");
    }
}
