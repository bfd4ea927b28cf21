//! The poll schedule of a [`PolledDevice`].
//!
//! Each device polls on its own period in its own task, so a slow device
//! never delays another. Ticks fall on the grid `start + k * period`; a poll
//! that overruns (a stalled device, a suspended machine) makes the schedule
//! skip the ticks it missed instead of firing them all at once afterwards:
//! after a stall of any length there is exactly one catch-up poll, then the
//! grid resumes. Status events are sent only when the node's health changes.

use std::time::Duration;

use tokio::time::{interval, timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::{DeviceError, NodeStatus, Output, PolledDevice, Reading, SourceEvent};

/// Polls `device` every `period` until `shutdown`, sending its readings and
/// its node's status changes (`node` is the device's own node) to `output`.
pub async fn run_polled(
    mut device: Box<dyn PolledDevice>,
    node: String,
    period: Duration,
    output: Output,
    shutdown: CancellationToken,
) {
    let mut ticker = interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut last_status: Option<NodeStatus> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = device.poll() => result,
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

/// Polls `device` once, giving up after `limit`: the commissioning path of
/// `fieldmq test`.
pub async fn poll_once(device: &mut dyn PolledDevice, limit: Duration) -> Result<Vec<Reading>, DeviceError> {
    match timeout(limit, device.poll()).await {
        Ok(result) => result,
        Err(_) => Err(DeviceError::new(format!("no answer within {}", humantime_secs(limit)))),
    }
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
    use tokio::sync::mpsc;
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

    fn spawn(script: Vec<(Duration, Result<(), &'static str>)>) -> Spawned {
        let polls = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let device = Box::new(ScriptedDevice { polls: polls.clone(), script });
        tokio::spawn(run_polled(
            device,
            "n".into(),
            Duration::from_secs(1),
            Output::new(SourceId(0), tx),
            shutdown.clone(),
        ));
        (polls, rx, shutdown)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_poll_is_followed_by_one_catch_up_not_a_burst() {
        let start = Instant::now();
        // The second poll hangs for 3.5 periods.
        let script = vec![(Duration::ZERO, Ok(())), (Duration::from_millis(3500), Ok(()))];
        let (polls, _rx, shutdown) = spawn(script);
        tokio::time::sleep(Duration::from_millis(8200)).await;
        shutdown.cancel();
        let offsets: Vec<u128> = polls.lock().unwrap().iter().map(|t| (*t - start).as_millis()).collect();
        // 0 and 1 on the grid; 1 stalls until 4.5; one catch-up poll at 4.5,
        // then back on the grid at 5, 6, 7, 8: never two polls closer than
        // the stall allows, never the missed 2, 3, 4 fired late.
        assert_eq!(offsets, vec![0, 1000, 4500, 5000, 6000, 7000, 8000]);
    }

    #[tokio::test(start_paused = true)]
    async fn status_is_sent_on_change_only_and_recovery_returns_online() {
        let script = vec![
            (Duration::ZERO, Ok(())),
            (Duration::ZERO, Err("timed out")),
            (Duration::ZERO, Err("timed out")),
            (Duration::ZERO, Ok(())),
        ];
        let (_polls, mut rx, shutdown) = spawn(script);
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

    #[tokio::test(start_paused = true)]
    async fn poll_once_gives_up_after_its_limit() {
        let polls = Arc::new(Mutex::new(Vec::new()));
        let mut device = ScriptedDevice { polls, script: vec![(Duration::from_secs(60), Ok(()))] };
        let err = poll_once(&mut device, Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.reason(), "no answer within 2s");
    }
}
