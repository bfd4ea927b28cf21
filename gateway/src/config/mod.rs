//! The gateway's configuration: where it is found, how it is read, and the
//! checked, typed form the rest of the gateway uses.
//!
//! Reading happens in three steps, one file each: `file.rs` mirrors the
//! TOML with serde; `diagnostic.rs` parses it collecting every error with
//! its position; `validate.rs` checks what serde cannot (unique names,
//! topic templates, which keys suit which device kind) and resolves
//! defaults into a [`Config`]. A config with any error is refused whole.

mod broker;
mod diagnostic;
mod file;
mod modbus;
pub mod units;
mod upstream;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use broker::{BrokerConfig, ListenerKind};
pub use diagnostic::Diagnostic;
pub use file::{DeviceKind, Format, PublishMode};
pub use upstream::{BufferConfig, UpstreamConfig};
pub use validate::is_log_filter;
use validate::relative_to_config;

use crate::mapping::TopicTemplate;

/// The config compiled into the binary: runs anywhere, without privileges.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../config/default.toml");

/// Where the system-wide config lives.
pub const SYSTEM_CONFIG: &str = "/etc/fieldmq/fieldmq.toml";

/// Where a config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file on disk.
    File(PathBuf),
    /// The default compiled into the binary.
    Embedded,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::Embedded => f.write_str("<embedded default>"),
        }
    }
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: ConfigSource,
    pub gateway_id: String,
    pub data_dir: PathBuf,
    /// The `[gateway] log` filter, used when `RUST_LOG` is not set.
    pub log: Option<String>,
    pub broker: BrokerConfig,
    pub buffer: BufferConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub devices: Vec<DeviceConfig>,
    /// What is allowed but probably not meant, as `file:line:col: what`.
    pub warnings: Vec<String>,
}

/// One `[[device]]`, resolved.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub name: String,
    pub kind: DeviceKind,
    pub poll: Duration,
    pub topic: TopicTemplate,
    pub format: Format,
    pub publish: PublishPolicy,
    pub settings: DeviceSettings,
}

impl DeviceConfig {
    /// Whether the device has attributes written from MQTT.
    pub fn has_writes(&self) -> bool {
        match &self.settings {
            DeviceSettings::ModbusTcp { modbus, .. } | DeviceSettings::ModbusRtu { modbus, .. } => {
                modbus.attributes.iter().any(|a| a.writable)
            }
            DeviceSettings::System { .. } => false,
        }
    }
}

/// Which attributes of a reading are sent.
#[derive(Debug, Clone, PartialEq)]
pub enum PublishPolicy {
    /// Every attribute, every time.
    Always,
    /// Only changes beyond the attribute's deadband (0 when absent), and
    /// every attribute at least once per heartbeat.
    OnChange { heartbeat: Duration, deadbands: Vec<(String, f64)> },
}

/// What only one kind of device needs.
#[derive(Debug, Clone)]
pub enum DeviceSettings {
    /// The host: extra filesystems to watch, `(label, path)`.
    System { disks: Vec<(String, PathBuf)> },
    /// A Modbus TCP device.
    ModbusTcp { address: SocketAddr, modbus: adapters::modbus::ModbusConfig },
    /// A Modbus RTU device on a serial line.
    ModbusRtu { serial: adapters::modbus::SerialSettings, modbus: adapters::modbus::ModbusConfig },
}

/// A config that was refused, with every reason.
#[derive(Debug)]
pub struct ConfigErrors {
    pub source: ConfigSource,
    pub text: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.source.to_string();
        for d in &self.diagnostics {
            writeln!(f, "error: {}", d.render(&name, &self.text))?;
        }
        let n = self.diagnostics.len();
        write!(f, "{name}: {n} error{} found; the config was not applied", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Finds and loads the config: `explicit` (`--config`), else
    /// `$FIELDMQ_CONFIG`, else /etc/fieldmq/fieldmq.toml, else the embedded default.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigErrors> {
        let from_env = std::env::var_os("FIELDMQ_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from);
        let path = explicit
            .map(Path::to_path_buf)
            .or(from_env)
            .or_else(|| Path::new(SYSTEM_CONFIG).exists().then(|| PathBuf::from(SYSTEM_CONFIG)));
        match path {
            None => Config::parse(EMBEDDED_DEFAULT, ConfigSource::Embedded),
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(text) => Config::parse(&text, ConfigSource::File(path)),
                Err(e) => Err(ConfigErrors {
                    source: ConfigSource::File(path),
                    text: String::new(),
                    diagnostics: vec![Diagnostic::whole_file(format!("cannot read the config: {e}"))],
                }),
            },
        }
    }

    /// Parses and checks `text`, reporting every error at once.
    pub fn parse(text: &str, source: ConfigSource) -> Result<Config, ConfigErrors> {
        let mut parsed = diagnostic::parse_all(text);
        let mut diagnostics = std::mem::take(&mut parsed.diagnostics);
        let file = parsed.file.take();
        let touched = |offset: usize| parsed.touched(text, offset);
        let config = file.and_then(|file| validate::resolve(file, &source, &touched, &mut diagnostics));
        match config {
            Some(mut config) if diagnostics.is_empty() => {
                let name = source.to_string();
                let mut warnings = std::mem::take(&mut config.broker.warnings);
                warnings.sort_by_key(Diagnostic::position);
                config.warnings = warnings.iter().map(|w| w.render(&name, text).to_string()).collect();
                Ok(config)
            }
            _ => {
                diagnostics.sort_by_key(Diagnostic::position);
                Err(ConfigErrors { source, text: text.to_owned(), diagnostics })
            }
        }
    }
}

#[cfg(test)]
mod tests;
