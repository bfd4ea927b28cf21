//! The one-shot commands: `fieldmq check` and `fieldmq test`.
//!
//! Exit codes are part of the contract: `check` exits 0 or 2 (config
//! errors); `test` exits 0 when every device answered, 1 when one did not,
//! 2 when the config is refused.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use adapters::{poll_once, NodeStatus, Output, Reading, SourceEvent, SourceId};
use mqtt_engine::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::devices::{self, Adapter};
use crate::mapping::Mapper;
use crate::plan;

/// How long `fieldmq test` waits for a polled device.
const POLL_LIMIT: Duration = Duration::from_secs(10);
/// How long `fieldmq test` listens to a device that pushes readings.
const LISTEN_WINDOW: Duration = Duration::from_secs(10);

/// Loads the config or prints why not; the exit code for a refused config is 2.
pub fn load_or_report(path: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(2)
    })
}

/// `fieldmq check`: print what the config would do, or every error in it.
pub fn check(path: Option<&Path>) -> ExitCode {
    match load_or_report(path) {
        Ok(config) => {
            for line in plan::describe(&config) {
                println!("{line}");
            }
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            println!("config ok");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// What one device gave during `fieldmq test`.
struct Outcome {
    events: Vec<SourceEvent>,
    error: Option<String>,
}

/// `fieldmq test`: poll every device once, concurrently, and print the
/// messages it would publish (topic, a space, the payload), in config order.
pub fn test(path: Option<&Path>) -> ExitCode {
    let config = match load_or_report(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcomes = runtime.block_on(async {
        let mut links = adapters::modbus::Links::default();
        let handles: Vec<_> = config
            .devices
            .iter()
            .map(|device| {
                tokio::spawn(sample(devices::build(device, &config, &mut links), device.name.clone()))
            })
            .collect();
        let mut outcomes = Vec::with_capacity(handles.len());
        for handle in handles {
            outcomes.push(handle.await.unwrap_or_else(|e| Outcome {
                events: Vec::new(),
                error: Some(format!("the adapter panicked: {e}")),
            }));
        }
        outcomes
    });

    let mut mapper = Mapper::new(&config);
    let mut failed = 0;
    for (index, (device, outcome)) in config.devices.iter().zip(outcomes).enumerate() {
        let source = SourceId(index);
        for event in &outcome.events {
            let messages: Vec<Message> = match event {
                SourceEvent::Reading(reading) => mapper.map(source, reading),
                SourceEvent::Status { node, status } => {
                    mapper.node_status(source, node, status).into_iter().collect()
                }
            };
            for m in messages {
                println!("{} {}", m.topic, String::from_utf8_lossy(&m.payload));
            }
        }
        if let Some(error) = outcome.error {
            failed += 1;
            eprintln!("error: device {}: {error}", device.name);
        }
    }
    let total = config.devices.len();
    eprintln!("{total} device{} polled, {failed} failed", if total == 1 { "" } else { "s" });
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn sample(adapter: Adapter, node: String) -> Outcome {
    match adapter {
        Adapter::Polled(mut device) => match poll_once(device.as_mut(), POLL_LIMIT).await {
            Ok(readings) => {
                let mut events = vec![SourceEvent::Status { node, status: NodeStatus::Online }];
                events.extend(readings.into_iter().map(SourceEvent::Reading));
                Outcome { events, error: None }
            }
            Err(e) => Outcome {
                events: vec![SourceEvent::Status { node, status: NodeStatus::Error(e.reason().to_owned()) }],
                error: Some(e.reason().to_owned()),
            },
        },
        Adapter::Push(device) => {
            let (tx, mut rx) = mpsc::channel(256);
            let stop = CancellationToken::new();
            let run = tokio::spawn(device.run(Output::new(SourceId(0), tx), stop.clone()));
            let mut events = Vec::new();
            let _ = tokio::time::timeout(LISTEN_WINDOW, async {
                while let Some((_, event)) = rx.recv().await {
                    events.push(event);
                }
            })
            .await;
            stop.cancel();
            let ended = run.await.ok().and_then(Result::err).map(|e| e.reason().to_owned());
            let heard = events.iter().any(|e| matches!(e, SourceEvent::Reading(Reading { .. })));
            let error = ended
                .or_else(|| (!heard).then(|| format!("nothing heard within {}s", LISTEN_WINDOW.as_secs())));
            Outcome { events, error }
        }
    }
}
