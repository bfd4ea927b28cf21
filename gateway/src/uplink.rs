//! The way up: the store-and-forward buffer and one bridge per
//! [[upstream]], started, reloaded and stopped with the gateway.
//!
//! The broker offers every message to the buffer (readings and LAN
//! publishes alike); the buffer keeps what some upstream's `forward`
//! filters take; each bridge drains its own share. A reload with changed
//! upstreams hands the same buffer to a new writer (nothing committed or
//! in the channel is lost) and restarts the bridges.

use mqtt_engine::buffer::{Buffer, BufferSettings, Route};
use mqtt_engine::Broker;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The buffer and the running bridges.
#[derive(Default)]
pub struct Uplink {
    buffer: Option<Buffer>,
    bridges: Vec<(CancellationToken, JoinHandle<()>)>,
    /// What the running setup was made from, to skip no-op reloads.
    fingerprint: String,
}

fn settings(config: &Config) -> BufferSettings {
    BufferSettings {
        path: config.data_dir.join("buffer.db"),
        max_size: config.buffer.max_size,
        when_full: config.buffer.when_full,
        commit_interval: config.buffer.commit_interval,
    }
}

fn routes(config: &Config) -> Vec<Route> {
    config
        .upstreams
        .iter()
        .map(|u| Route { name: u.settings.name.clone(), forward: u.forward.clone() })
        .collect()
}

fn fingerprint(config: &Config) -> String {
    let parts: Vec<&str> = config.upstreams.iter().map(|u| u.fingerprint.as_str()).collect();
    format!("{:?}|{:?}|{}", config.buffer, config.data_dir, parts.join("|"))
}

impl Uplink {
    /// Opens the buffer and starts the bridges of `config` (nothing when it
    /// has no upstream).
    pub async fn start(config: &Config, broker: &Broker) -> Result<Uplink, String> {
        let mut uplink = Uplink::default();
        uplink.apply(config, broker).await?;
        Ok(uplink)
    }

    /// Applies a reloaded config.
    pub async fn apply(&mut self, config: &Config, broker: &Broker) -> Result<(), String> {
        let wanted = fingerprint(config);
        if wanted == self.fingerprint {
            return Ok(());
        }
        self.stop_bridges().await;
        if config.upstreams.is_empty() {
            broker.set_buffer(None);
            if let Some(buffer) = self.buffer.take() {
                let _ = tokio::task::spawn_blocking(move || buffer.close()).await;
            }
            self.fingerprint = wanted;
            return Ok(());
        }
        let (settings, routes) = (settings(config), routes(config));
        let buffer = match self.buffer.clone() {
            Some(buffer) => {
                let b = buffer.clone();
                tokio::task::spawn_blocking(move || b.reconfigure(settings, &routes))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot reopen the buffer: {e}"))?;
                buffer
            }
            None => {
                let buffer = tokio::task::spawn_blocking(move || Buffer::open(settings, &routes))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot open the buffer: {e}"))?;
                broker.set_buffer(Some(buffer.clone()));
                self.buffer = Some(buffer.clone());
                buffer
            }
        };
        for upstream in &config.upstreams {
            let stop = CancellationToken::new();
            let task = tokio::spawn(mqtt_engine::bridge::run(
                upstream.settings.clone(),
                buffer.clone(),
                broker.clone(),
                stop.clone(),
            ));
            self.bridges.push((stop, task));
        }
        self.fingerprint = wanted;
        Ok(())
    }

    async fn stop_bridges(&mut self) {
        for (stop, _) in &self.bridges {
            stop.cancel();
        }
        for (_, task) in self.bridges.drain(..) {
            let _ = task.await;
        }
    }

    /// Stops the bridges (each waits briefly for what is in flight) and
    /// commits everything the buffer took.
    pub async fn stop(mut self, broker: &Broker) {
        self.stop_bridges().await;
        broker.set_buffer(None);
        if let Some(buffer) = self.buffer.take() {
            let _ = tokio::task::spawn_blocking(move || buffer.close()).await;
        }
    }
}
