//! `fieldmq run`: the gateway's life cycle as a service.
//!
//! Start: load the config, create the data directory, log what will
//! happen, start the pipeline, tell systemd READY=1. SIGHUP: re-read the
//! config; a valid one replaces the running pipeline (the broker and its
//! retained state stay), an invalid one is logged error by error and the
//! old one keeps running. SIGTERM/SIGINT: stop the devices, drain what they
//! read, publish `offline`, exit 0, all within [`STOP_GRACE`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use mqtt_engine::LocalBroker;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::mapping::Mapper;
use crate::signals::{Request, Signals};
use crate::{plan, runtime, systemd};

/// How long devices get to finish after a stop signal; well inside the 2 s
/// a service manager or a person at a terminal is promised.
pub const STOP_GRACE: Duration = Duration::from_millis(1500);

/// Runs the gateway until a stop signal.
pub fn main(config_path: Option<PathBuf>, config: Config) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fieldmq")
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(serve(config_path, config)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config_path: Option<PathBuf>, mut config: Config) -> ExitCode {
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&config.data_dir) {
        tracing::error!(dir = %config.data_dir.display(), error = %e, "cannot create the data directory");
        return ExitCode::FAILURE;
    }
    tracing::info!("fieldmq {} starting", env!("CARGO_PKG_VERSION"));
    log_plan(&config);
    if !config.broker.listen.is_empty() {
        tracing::warn!("the MQTT network listener is not part of this version yet: messages are published in-process only");
    }

    let broker = LocalBroker::new();
    publish_gateway_status(&broker, &config, true);
    let mut pipeline = start(&config, &broker);
    systemd::notify("READY=1");
    let watchdog = systemd::watchdog_interval().map(|period| {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            loop {
                ticker.tick().await;
                systemd::notify("WATCHDOG=1");
            }
        })
    });
    tracing::info!(devices = config.devices.len(), "gateway running");

    loop {
        match signals.next().await {
            Request::Stop(signal) => {
                tracing::info!("{signal} received, stopping");
                systemd::notify("STOPPING=1");
                pipeline.stop().await;
                publish_gateway_status(&broker, &config, false);
                if let Some(watchdog) = watchdog {
                    watchdog.abort();
                }
                tracing::info!("stopped");
                return ExitCode::SUCCESS;
            }
            Request::Reload => match Config::load(config_path.as_deref()) {
                Ok(new) => {
                    tracing::info!("SIGHUP: config reloaded, restarting the devices");
                    pipeline.stop().await;
                    config = new;
                    log_plan(&config);
                    pipeline = start(&config, &broker);
                }
                Err(errors) => {
                    for line in errors.to_string().lines() {
                        tracing::error!("{line}");
                    }
                    tracing::error!("SIGHUP: the new config was refused; the running one stays");
                }
            },
        }
    }
}

/// A running pipeline and the token that stops it.
struct Pipeline {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Pipeline {
    async fn stop(self) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(STOP_GRACE, self.task).await.is_err() {
            abort.abort();
            tracing::warn!("devices did not stop within {}ms; going on without them", STOP_GRACE.as_millis());
        }
    }
}

fn start(config: &Config, broker: &LocalBroker) -> Pipeline {
    let stop = CancellationToken::new();
    let task = {
        let (config, broker, stop) = (config.clone(), broker.clone(), stop.clone());
        tokio::spawn(async move { runtime::run_pipeline(&config, &broker, stop).await })
    };
    Pipeline { stop, task }
}

fn log_plan(config: &Config) {
    for line in plan::describe(config) {
        tracing::info!("{line}");
    }
}

fn publish_gateway_status(broker: &LocalBroker, config: &Config, online: bool) {
    if let Some(message) = Mapper::new(config).gateway_status(online) {
        broker.publish(message);
    }
}
