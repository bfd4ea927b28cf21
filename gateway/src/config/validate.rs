//! What serde cannot check: names that become topic levels, unique devices,
//! topic templates, which keys suit which device kind, and the defaults.
//! Every problem is pushed as a [`Diagnostic`] and checking goes on, so the
//! user sees all of them at once.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::Spanned;
use tracing_subscriber::filter::Targets;

use super::file::{ConfigFile, DeviceKind, DeviceSection, Format, ProfileSection, PublishMode};
use super::modbus;
use super::{Config, ConfigSource, DeviceConfig, DeviceSettings, Diagnostic, PublishPolicy};
use crate::mapping::{topic_level_problem, TopicTemplate, DEFAULT_TOPIC, RESERVED_NODE};

const DEFAULT_POLL: Duration = Duration::from_secs(5);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(300);
const MIN_POLL: Duration = Duration::from_millis(10);

/// Resolves `file`. `touched(offset)` says whether the table holding that
/// offset lost an entry to an earlier error: its cross-key checks are skipped.
pub fn resolve(
    file: ConfigFile,
    source: &ConfigSource,
    touched: &dyn Fn(usize) -> bool,
    diags: &mut Vec<Diagnostic>,
) -> Option<Config> {
    let gateway_id = match &file.gateway.id {
        Some(id) => {
            check_topic_level(id, "the gateway id", diags);
            id.get_ref().clone()
        }
        None => hostname(),
    };
    if let Some(log) = &file.gateway.log {
        if !is_log_filter(log.get_ref()) {
            diags.push(Diagnostic::at(
                log.span(),
                format!("invalid log filter `{}`, expected a level (error, warn, info, debug, trace) or `target=level,...`", log.get_ref()),
            ));
        }
    }
    let data_dir = match &file.gateway.data_dir {
        Some(dir) => relative_to_config(dir, source),
        None => default_data_dir(),
    };

    let broker = super::broker::resolve_broker(&file.broker, source, diags);
    let buffer = super::upstream::resolve_buffer(&file.buffer, diags);
    let upstreams = super::upstream::resolve_upstreams(&file.upstreams, &gateway_id, source, diags);

    let builtin = modbus::builtin_profiles();
    let mut profiles: HashMap<&str, &ProfileSection> =
        builtin.iter().map(|p| (p.name.get_ref().as_str(), p)).collect();
    let mut defined = BTreeSet::new();
    for profile in &file.profiles {
        // A profile of the config replaces a built-in one of the same name.
        profiles.remove(profile.name.get_ref().as_str());
        if !defined.insert(profile.name.get_ref().as_str()) {
            diags.push(Diagnostic::at(
                profile.name.span(),
                format!("a profile named `{}` is already defined", profile.name.get_ref()),
            ));
        }
    }
    for profile in &file.profiles {
        if profiles.insert(profile.name.get_ref(), profile).is_some() {
            diags.push(Diagnostic::at(
                profile.name.span(),
                format!("a profile named `{}` is already defined", profile.name.get_ref()),
            ));
        }
    }
    let mut names = BTreeSet::new();
    let mut ports = HashMap::new();
    let mut devices = Vec::with_capacity(file.devices.len());
    for section in &file.devices {
        if !names.insert(section.name.get_ref().as_str()) {
            diags.push(Diagnostic::at(
                section.name.span(),
                format!(
                    "a device named `{}` is already defined: device names must be unique",
                    section.name.get_ref()
                ),
            ));
        }
        if touched(section.name.span().start) {
            continue;
        }
        if let Some(device) = resolve_device(section, source, &profiles, &mut ports, diags) {
            devices.push(device);
        }
    }

    Some(Config {
        source: source.clone(),
        gateway_id,
        data_dir,
        log: file.gateway.log.map(Spanned::into_inner),
        broker,
        buffer,
        upstreams,
        devices,
        warnings: Vec::new(),
    })
}

fn resolve_device(
    d: &DeviceSection,
    source: &ConfigSource,
    profiles: &HashMap<&str, &ProfileSection>,
    ports: &mut HashMap<String, adapters::modbus::SerialSettings>,
    diags: &mut Vec<Diagnostic>,
) -> Option<DeviceConfig> {
    let errors_before = diags.len();
    check_node_name(&d.name, diags);
    let kind = *d.kind.get_ref();

    let settings = match kind {
        DeviceKind::System => {
            let disks = d.disks.as_ref().map_or_else(Vec::new, |disks| {
                for label in disks.get_ref().keys() {
                    if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        diags.push(Diagnostic::at(
                            disks.span(),
                            format!("disk label `{label}` must be letters, digits and _ (it becomes the attribute disk_free_{label})"),
                        ));
                    }
                }
                disks
                    .get_ref()
                    .iter()
                    .map(|(label, path)| (label.clone(), relative_to_config(path, source)))
                    .collect()
            });
            modbus::refuse_device_keys(d, kind.as_str(), diags);
            DeviceSettings::System { disks }
        }
        DeviceKind::ModbusTcp => modbus::resolve_tcp(d, profiles, diags)?,
        DeviceKind::ModbusRtu => modbus::resolve_rtu(d, profiles, ports, diags)?,
        other => {
            diags.push(Diagnostic::at(
                d.kind.span(),
                format!(
                    "device kind `{}` is not available in this version of fieldmq yet; available: system, modbus-tcp, modbus-rtu",
                    other.as_str()
                ),
            ));
            return None;
        }
    };

    let poll = d.poll.as_ref().map_or(DEFAULT_POLL, |p| {
        if p.get_ref().0 < MIN_POLL {
            diags.push(Diagnostic::at(p.span(), "poll must be at least 10ms"));
        }
        p.get_ref().0
    });

    let topic = match &d.topic {
        None => TopicTemplate::parse(DEFAULT_TOPIC).ok()?,
        Some(t) => match TopicTemplate::parse(t.get_ref()) {
            Ok(template) => {
                if template.has_attribute() && d.format == Format::Json {
                    diags.push(Diagnostic::at(
                        t.span(),
                        "{attribute} needs format = \"value\": a json message carries every attribute of a reading",
                    ));
                }
                template
            }
            Err(message) => {
                diags.push(Diagnostic::at(t.span(), message));
                return None;
            }
        },
    };

    // Modbus devices define their attributes; `modbus.rs` checked them.
    let known = known_attributes(kind, &settings);
    for a in d.attributes.iter().filter(|_| kind == DeviceKind::System) {
        if !known.iter().any(|k| k == a.name.get_ref()) {
            diags.push(Diagnostic::at(
                a.name.span(),
                format!(
                    "a {} device has no attribute `{}`; it has: {}",
                    kind.as_str(),
                    a.name.get_ref(),
                    known.join(", ")
                ),
            ));
        }
        if let Some(deadband) = &a.deadband {
            let value = *deadband.get_ref();
            if !value.is_finite() || value < 0.0 {
                diags.push(Diagnostic::at(deadband.span(), "deadband must be a finite number >= 0"));
            }
        }
    }

    let mode = d.publish.as_ref().map_or(PublishMode::Always, |p| *p.get_ref());
    let publish = match mode {
        PublishMode::Always => {
            if let Some(h) = &d.heartbeat {
                diags.push(Diagnostic::at(h.span(), "heartbeat applies only with publish = \"on-change\""));
            }
            if let Some(deadband) = d.attributes.iter().find_map(|a| a.deadband.as_ref()) {
                diags.push(Diagnostic::at(
                    deadband.span(),
                    "deadband applies only with publish = \"on-change\"",
                ));
            }
            PublishPolicy::Always
        }
        PublishMode::OnChange => {
            let heartbeat = d.heartbeat.as_ref().map_or(DEFAULT_HEARTBEAT.max(poll), |h| {
                if h.get_ref().0 < poll {
                    diags.push(Diagnostic::at(
                        h.span(),
                        format!(
                            "heartbeat ({}) must be at least the poll period ({})",
                            h.get_ref(),
                            humantime::format_duration(poll)
                        ),
                    ));
                }
                h.get_ref().0
            });
            let deadbands = d
                .attributes
                .iter()
                .filter_map(|a| Some((a.name.get_ref().clone(), *a.deadband.as_ref()?.get_ref())))
                .collect();
            PublishPolicy::OnChange { heartbeat, deadbands }
        }
    };

    (diags.len() == errors_before).then(|| DeviceConfig {
        name: d.name.get_ref().clone(),
        kind,
        poll,
        topic,
        format: d.format,
        publish,
        settings,
    })
}

fn known_attributes(kind: DeviceKind, settings: &DeviceSettings) -> Vec<String> {
    match (kind, settings) {
        (DeviceKind::System, DeviceSettings::System { disks }) => adapters::system::ATTRIBUTES
            .iter()
            .map(|a| a.to_string())
            .chain(disks.iter().map(|(label, _)| format!("disk_free_{label}")))
            .collect(),
        (_, DeviceSettings::ModbusTcp { modbus, .. }) => {
            modbus.attributes.iter().map(|a| a.name.clone()).collect()
        }
        _ => Vec::new(),
    }
}

/// `info`, or `fieldmq=debug,warn`: each directive a level, or a target and
/// a level. (`Targets` alone would take a misspelt level as a target name.)
pub fn is_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |l: &str| LEVELS.iter().any(|level| level.eq_ignore_ascii_case(l.trim()));
    Targets::from_str(filter).is_ok()
        && filter.split(',').all(|directive| match directive.split_once('=') {
            Some((target, level)) => !target.trim().is_empty() && is_level(level),
            None => is_level(directive),
        })
}

/// Gateway ids and device names become single topic levels.
fn check_topic_level(value: &Spanned<String>, what: &str, diags: &mut Vec<Diagnostic>) {
    let v = value.get_ref();
    if let Some(problem) = topic_level_problem(v) {
        diags.push(Diagnostic::at(value.span(), format!("{what} {problem}: `{v}`")));
    }
}

fn check_node_name(value: &Spanned<String>, diags: &mut Vec<Diagnostic>) {
    if value.get_ref() == RESERVED_NODE {
        diags.push(Diagnostic::at(
            value.span(),
            "a device name must not be `status`: fieldmq/{gateway}/status is the gateway's own status",
        ));
    } else {
        check_topic_level(value, "a device name", diags);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains(['/', '+', '#']))
        .unwrap_or_else(|| "fieldmq".to_owned())
}

/// Where state goes when the config does not say: systemd's
/// StateDirectory, else the XDG state dir (`$XDG_STATE_HOME`, by default
/// `~/.local/state`), else `./fieldmq-data`, else a folder in the temp dir:
/// the first that this user can create, so the embedded default runs
/// anywhere without privileges (even as `nobody` in `/`).
fn default_data_dir() -> PathBuf {
    let env_dir = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(state) = env_dir("STATE_DIRECTORY") {
        return state;
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let candidates = [
        env_dir("XDG_STATE_HOME").map(|xdg| xdg.join("fieldmq")),
        env_dir("HOME").map(|home| home.join(".local/state/fieldmq")),
        Some(cwd.join("fieldmq-data")),
    ];
    let fallback = std::env::temp_dir().join(format!("fieldmq-{}", rustix::process::getuid().as_raw()));
    candidates.into_iter().flatten().find(|dir| can_create(dir)).unwrap_or(fallback)
}

/// Whether `dir` exists as a writable folder or could be made in one.
fn can_create(dir: &Path) -> bool {
    let existing = dir.ancestors().find(|a| a.exists());
    existing.is_some_and(|a| {
        a.is_dir()
            && rustix::fs::access(a, rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK).is_ok()
    })
}

/// A relative path in a config file is relative to that file's folder, so
/// the config means the same whatever directory the gateway starts in.
pub(super) fn relative_to_config(path: &Path, source: &ConfigSource) -> PathBuf {
    match source {
        ConfigSource::File(file) if path.is_relative() => file.parent().unwrap_or(Path::new(".")).join(path),
        _ => path.to_path_buf(),
    }
}
