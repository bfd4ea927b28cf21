//! `fieldmq run`: the gateway's life cycle as a service.
//!
//! Start: load the config, create the data directory, log what will
//! happen, start the pipeline, tell systemd READY=1. SIGHUP: re-read the
//! config; a valid one replaces the running pipeline (the broker and its
//! retained state stay), an invalid one is logged error by error and the
//! old one keeps running. SIGTERM/SIGINT: stop the devices, drain what they
//! read, publish `offline`, exit 0, all within [`STOP_GRACE`].

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use mqtt_engine::access::Access;
use mqtt_engine::server::{Slots, Transport};
use mqtt_engine::{Broker, BrokerSettings};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Config, ListenerKind};
use crate::mapping::Mapper;
use crate::runtime::{self, SeenNodes};
use crate::signals::{Request, Signals};
use crate::uplink::Uplink;
use crate::{broker_state, plan, systemd};
use mqtt_engine::server;

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
        Ok(runtime) => {
            let code = runtime.block_on(serve(config_path, config));
            // A probe stuck in a hung filesystem must not hold the exit.
            runtime.shutdown_timeout(Duration::from_millis(100));
            code
        }
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

    let broker = Broker::new(broker_settings(&config));
    match Access::load(&config.broker.access) {
        Ok(access) => broker.set_access(access),
        Err(errors) => {
            // Checked with the config a moment ago: a file changed since.
            errors.iter().for_each(|e| tracing::error!("{e}"));
            return ExitCode::FAILURE;
        }
    }
    broker_state::load(&broker, &config.data_dir);
    let autosave_stop = CancellationToken::new();
    let autosave =
        tokio::spawn(broker_state::autosave(broker.clone(), config.data_dir.clone(), autosave_stop.clone()));
    // The buffer is attached before any LAN client can connect: a QoS 1
    // publish acknowledged in between would not have been buffered.
    let mut uplink = match Uplink::start(&config, &broker).await {
        Ok(uplink) => uplink,
        Err(message) => {
            tracing::error!("{message}");
            return ExitCode::FAILURE;
        }
    };
    let listeners = match bind(&config).await {
        Ok(listeners) => listeners,
        Err(message) => {
            tracing::error!("{message}");
            return ExitCode::FAILURE;
        }
    };
    let servers = TaskTracker::new();
    let slots = Slots::new(config.broker.max_connections as usize);
    for (listener, transport) in listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, transport = transport.name(), "MQTT listener ready");
        }
        let (broker, slots, stop) = (broker.clone(), slots.clone(), broker.shutdown_token());
        servers.spawn(server::serve(listener, transport, broker, slots, stop));
    }
    servers.close();
    if !config.broker.sys_interval.is_zero() {
        tokio::spawn(mqtt_engine::broker::publish_sys(broker.clone(), config.broker.sys_interval));
    }
    publish_gateway_status(&broker, &config, true);
    let mut pipeline = Pipeline::start(&config, &broker);
    systemd::notify("READY=1");
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    tracing::info!(devices = config.devices.len(), "gateway running");

    loop {
        let request = tokio::select! {
            request = signals.next() => request,
            ended = &mut pipeline.task => {
                // Only a bug ends the pipeline unasked: exit non-zero so the
                // service manager restarts the gateway.
                tracing::error!(?ended, "the device pipeline stopped unexpectedly; exiting");
                publish_gateway_status(&broker, &config, false);
                return ExitCode::FAILURE;
            }
            _ = tick(&mut watchdog) => {
                systemd::notify("WATCHDOG=1");
                continue;
            }
        };
        match request {
            Request::Stop(signal) => {
                tracing::info!("{signal} received, stopping");
                systemd::notify("STOPPING=1");
                let seen = pipeline.stop().await;
                runtime::publish_offline(&config, &broker, seen.iter().map(|(_, node)| node));
                publish_gateway_status(&broker, &config, false);
                // Clients get what is queued for them (the statuses above),
                // then DISCONNECT 0x8B. Each connection gives its peer up to
                // a second for that; one still open when the state is saved
                // below would lose its in-flight messages from the save.
                broker.shut_down();
                if tokio::time::timeout(Duration::from_millis(1500), servers.wait()).await.is_err() {
                    tracing::warn!("some MQTT clients did not take their last messages in time");
                }
                // After the last publish: the buffer commits all it took.
                uplink.stop(&broker).await;
                autosave_stop.cancel();
                let _ = autosave.await;
                if let Err(e) = broker_state::save(&broker, &config.data_dir) {
                    tracing::error!(error = %e, "could not save the broker state");
                }
                tracing::info!("stopped");
                return ExitCode::SUCCESS;
            }
            Request::Reload => {
                let new = match Config::load(config_path.as_deref()) {
                    Ok(new) => new,
                    Err(errors) => {
                        for line in errors.to_string().lines() {
                            tracing::error!("{line}");
                        }
                        tracing::error!("SIGHUP: the new config was refused; the running one stays");
                        continue;
                    }
                };
                if let Err(e) = std::fs::create_dir_all(&new.data_dir) {
                    tracing::error!(dir = %new.data_dir.display(), error = %e, "SIGHUP: the new config was refused: cannot create its data directory; the running one stays");
                    continue;
                }
                if let Err(errors) = reload_access(&config, &new, &broker) {
                    errors.iter().for_each(|e| tracing::error!("{e}"));
                    tracing::error!(
                        "SIGHUP: the new password or ACL file was refused; the running config stays"
                    );
                    continue;
                }
                // What is bound at start stays as it runs, so the plan logged
                // below is the truth and a later reload still compares with it.
                let mut new = new;
                new.broker = config::BrokerConfig {
                    access: new.broker.access.clone(),
                    ..config.broker.bound_at_start()
                };
                tracing::info!("SIGHUP: config reloaded, restarting the devices");
                let seen = pipeline.stop().await;
                retire(&config, &new, &broker, &seen);
                if let Err(message) = uplink.apply(&new, &broker).await {
                    tracing::error!(
                        "SIGHUP: {message}; messages bound upstream are not buffered until this is fixed"
                    );
                }
                config = new;
                log_plan(&config);
                pipeline = Pipeline::start(&config, &broker);
            }
        }
    }
}

/// What a reload ends: nodes of removed devices go `offline`; nodes that go
/// on keep their status (no false outage for subscribers). A new gateway id
/// retires every node and the old gateway status too.
fn retire(old: &Config, new: &Config, broker: &Broker, seen: &BTreeSet<(String, String)>) {
    if old.gateway_id != new.gateway_id {
        runtime::publish_offline(old, broker, seen.iter().map(|(_, node)| node));
        publish_gateway_status(broker, old, false);
        publish_gateway_status(broker, new, true);
        return;
    }
    let kept: BTreeSet<&str> = new.devices.iter().map(|d| d.name.as_str()).collect();
    let removed = seen.iter().filter(|(device, _)| !kept.contains(device.as_str())).map(|(_, node)| node);
    runtime::publish_offline(old, broker, removed);
}

async fn tick(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A running pipeline and the token that stops it.
struct Pipeline {
    stop: CancellationToken,
    task: JoinHandle<()>,
    seen: SeenNodes,
}

impl Pipeline {
    fn start(config: &Config, broker: &Broker) -> Pipeline {
        let stop = CancellationToken::new();
        let seen = SeenNodes::default();
        let task = {
            let (config, broker, seen, stop) = (config.clone(), broker.clone(), seen.clone(), stop.clone());
            tokio::spawn(async move { runtime::run_pipeline(&config, &broker, seen, stop).await })
        };
        Pipeline { stop, task, seen }
    }

    /// Stops the devices, waiting at most [`STOP_GRACE`]; returns the nodes
    /// the pipeline had reported.
    async fn stop(self) -> BTreeSet<(String, String)> {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(STOP_GRACE, self.task).await.is_err() {
            abort.abort();
            tracing::warn!("devices did not stop within {}ms; going on without them", STOP_GRACE.as_millis());
        }
        let seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        seen.clone()
    }
}

fn broker_settings(config: &Config) -> BrokerSettings {
    let b = &config.broker;
    BrokerSettings {
        max_packet_size: b.max_packet_size as usize,
        connect_timeout: b.connect_timeout,
        max_inflight: b.max_inflight,
        max_queued: b.max_queued as usize,
        max_queued_bytes: b.max_queued_bytes as usize,
        ws_origins: b.ws_origins.clone(),
        ..BrokerSettings::default()
    }
}

/// SIGHUP re-reads the password and ACL files (even when the config is
/// unchanged: that is how a new user is let in). Listeners and limits stay
/// as they were started: changing those needs a restart, and says so.
fn reload_access(old: &Config, new: &Config, broker: &Broker) -> Result<(), Vec<String>> {
    let access = Access::load(&new.broker.access)?;
    let (users, anonymous) = (access.passwords().map_or(0, |p| p.len()), access.allow_anonymous());
    broker.set_access(access);
    // Logged once in force: a packet sent after this line meets the new rules.
    tracing::info!(
        users,
        acl = new.broker.access.acl_file.is_some(),
        anonymous,
        "SIGHUP: password and ACL files read; connected clients keep their session under the new rules"
    );
    if old.broker.bound_at_start() != new.broker.bound_at_start() {
        tracing::warn!("SIGHUP: [broker] listeners, TLS files and limits take effect at the next restart");
    }
    Ok(())
}

/// Binds every listener of `[broker]`, or says which one failed and why.
async fn bind(config: &Config) -> Result<Vec<(TcpListener, Transport)>, String> {
    let b = &config.broker;
    let acceptor = match &b.tls {
        Some(files) if b.listeners.iter().any(|(_, k)| k.uses_tls()) => {
            let tls =
                mqtt_engine::server::tls::server_config(files).map_err(|e| format!("[broker] TLS: {e}"))?;
            Some(mqtt_engine::server::TlsAcceptor::from(tls))
        }
        _ => None,
    };
    let mut listeners = Vec::with_capacity(b.listeners.len());
    for (addr, kind) in &b.listeners {
        let transport = match (kind, &acceptor) {
            (ListenerKind::Tcp, _) => Transport::Tcp,
            (ListenerKind::WebSocket, _) => Transport::WebSocket,
            (ListenerKind::Tls, Some(a)) => Transport::Tls(a.clone()),
            (ListenerKind::WebSocketTls, Some(a)) => Transport::WebSocketTls(a.clone()),
            (_, None) => return Err(format!("{addr}: a TLS listener without tls_cert and tls_key")),
        };
        let listener =
            server::bind(*addr, &transport).await.map_err(|e| format!("{e} ([broker] {})", kind.key()))?;
        listeners.push((listener, transport));
    }
    Ok(listeners)
}

fn log_plan(config: &Config) {
    for line in plan::describe(config) {
        tracing::info!("{line}");
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
}

fn publish_gateway_status(broker: &Broker, config: &Config, online: bool) {
    if let Some(message) = Mapper::new(config).gateway_status(online) {
        runtime::publish(broker, message);
    }
}
