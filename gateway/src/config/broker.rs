//! `[broker]`: the listeners, their TLS files, who may connect and what
//! they may do, and the limits.
//!
//! The password and ACL files are read here, so `fieldmq check` refuses
//! a bad line in them (with its place in that file) before anything runs,
//! and warns when a listener other than loopback lets anonymous clients
//! write: on a plant LAN that means anyone plugged in can drive a device.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use mqtt_engine::access::{AccessFiles, Acl, PasswordFile};
use mqtt_engine::server::tls::{check_server_files, ServerTlsFiles};
use toml::Spanned;

use super::file::BrokerSection;
use super::{relative_to_config, ConfigSource, Diagnostic};

const DEFAULT_LISTEN: &str = "127.0.0.1:1883";

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// `listen`: MQTT on TCP.
    Tcp,
    /// `tls_listen`: MQTT over TLS.
    Tls,
    /// `ws_listen`: MQTT over WebSocket.
    WebSocket,
    /// `wss_listen`: MQTT over WebSocket over TLS.
    WebSocketTls,
}

impl ListenerKind {
    pub fn key(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "listen",
            ListenerKind::Tls => "tls_listen",
            ListenerKind::WebSocket => "ws_listen",
            ListenerKind::WebSocketTls => "wss_listen",
        }
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::WebSocketTls)
    }
}

/// `[broker]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    /// Every listener, in the order of the keys.
    pub listeners: Vec<(SocketAddr, ListenerKind)>,
    /// The certificate and key of the TLS listeners.
    pub tls: Option<ServerTlsFiles>,
    pub access: AccessFiles,
    pub max_connections: u32,
    pub max_packet_size: u64,
    /// How long a new connection may take to send CONNECT.
    pub connect_timeout: Duration,
    /// QoS 1/2 messages in flight to one client at most.
    pub max_inflight: u16,
    /// Messages waiting for one client at most.
    pub max_queued: u32,
    /// Their topic and payload bytes at most.
    pub max_queued_bytes: u64,
    /// How often `$SYS` is published; zero: never.
    pub sys_interval: Duration,
    /// Browser origins the WebSocket listeners accept; empty: any.
    pub ws_origins: Vec<String>,
    /// Allowed but probably not meant; rendered into `Config::warnings`.
    pub warnings: Vec<Diagnostic>,
}

impl BrokerConfig {
    /// What the broker takes at start and keeps until a restart: all but
    /// the access files (which SIGHUP re-reads) and the warnings.
    pub fn bound_at_start(&self) -> BrokerConfig {
        BrokerConfig { access: AccessFiles::default(), warnings: Vec::new(), ..self.clone() }
    }
}

fn addresses(
    list: &Option<Spanned<Vec<Spanned<String>>>>,
    kind: ListenerKind,
    default: &[&str],
    diags: &mut Vec<Diagnostic>,
) -> Vec<(SocketAddr, ListenerKind)> {
    let parse = |text: &str| SocketAddr::from_str(text).ok();
    match list {
        None => default.iter().filter_map(|a| parse(a)).map(|a| (a, kind)).collect(),
        Some(list) => list
            .get_ref()
            .iter()
            .filter_map(|a| match parse(a.get_ref()) {
                Some(addr) => Some((addr, kind)),
                None => {
                    diags.push(Diagnostic::at(
                        a.span(),
                        format!(
                            "invalid {} address `{}`, expected IP:PORT like \"0.0.0.0:1883\" or \"[::]:1883\"",
                            kind.key(),
                            a.get_ref()
                        ),
                    ));
                    None
                }
            })
            .collect(),
    }
}

pub fn resolve_broker(b: &BrokerSection, source: &ConfigSource, diags: &mut Vec<Diagnostic>) -> BrokerConfig {
    let mut warnings = Vec::new();
    let mut listeners = addresses(&b.listen, ListenerKind::Tcp, &[DEFAULT_LISTEN], diags);
    listeners.extend(addresses(&b.tls_listen, ListenerKind::Tls, &[], diags));
    listeners.extend(addresses(&b.ws_listen, ListenerKind::WebSocket, &[], diags));
    listeners.extend(addresses(&b.wss_listen, ListenerKind::WebSocketTls, &[], diags));
    let mut seen = BTreeSet::new();
    for (addr, kind) in &listeners {
        // Port 0 is a fresh port for each listener.
        if addr.port() != 0 && !seen.insert(*addr) {
            diags.push(whole_key(b, *kind, format!("{addr} is given to two listeners")));
        }
    }

    let path =
        |v: &Option<Spanned<String>>| v.as_ref().map(|v| relative_to_config(Path::new(v.get_ref()), source));
    let needs_tls = listeners.iter().any(|(_, k)| k.uses_tls());
    let tls = match (path(&b.tls_cert), path(&b.tls_key)) {
        (Some(cert), Some(key)) => Some(ServerTlsFiles { cert, key, client_ca: path(&b.tls_client_ca) }),
        (None, None) => {
            if needs_tls {
                let kind =
                    if b.tls_listen.is_some() { ListenerKind::Tls } else { ListenerKind::WebSocketTls };
                diags.push(whole_key(b, kind, format!("{} needs tls_cert and tls_key", kind.key())));
            }
            None
        }
        (Some(_), None) => {
            diags.push(at(&b.tls_cert, "tls_cert and tls_key go together: tls_key is missing"));
            None
        }
        (None, Some(_)) => {
            diags.push(at(&b.tls_key, "tls_cert and tls_key go together: tls_cert is missing"));
            None
        }
    };
    if let Some(files) = &tls {
        for (file, problem) in check_server_files(files) {
            let key = if file == files.cert {
                &b.tls_cert
            } else if file == files.key {
                &b.tls_key
            } else {
                &b.tls_client_ca
            };
            diags.push(at(key, &problem.to_string()));
        }
        if !needs_tls {
            warnings.push(at(&b.tls_cert, "tls_cert is set but no tls_listen or wss_listen uses it"));
        }
    }

    let allow_anonymous = b.allow_anonymous.as_ref().is_none_or(|a| *a.get_ref());
    let access =
        AccessFiles { allow_anonymous, password_file: path(&b.password_file), acl_file: path(&b.acl_file) };
    // Read now, so a bad line is refused before the gateway runs.
    if let Some(file) = &access.password_file {
        match PasswordFile::load(file) {
            Ok(passwords) => {
                for user in passwords.weak_users() {
                    warnings.push(at(
                        &b.password_file,
                        &format!(
                            "user `{user}` has a weak hash (mosquitto 1.x's, or under 10,000 rounds as mosquitto_passwd writes): a stolen file gives its password away fast, and its quicker logins tell which users exist; set it again with `fieldmq passwd`"
                        ),
                    ));
                }
            }
            Err(errors) => errors.iter().for_each(|e| diags.push(at(&b.password_file, e))),
        }
    }
    let acl = access.acl_file.as_deref().map(Acl::load);
    if let Some(Err(errors)) = &acl {
        errors.iter().for_each(|e| diags.push(at(&b.acl_file, e)));
    }
    let anonymous_writes = allow_anonymous
        && match &acl {
            None => true,
            Some(Ok(acl)) => acl.grants_anonymous_write(),
            Some(Err(_)) => false,
        };
    if anonymous_writes {
        for (addr, kind) in &listeners {
            if !addr.ip().is_loopback() {
                let why =
                    if access.acl_file.is_none() { "there is no acl_file" } else { "the acl_file allows it" };
                warnings.push(whole_key(
                    b,
                    *kind,
                    format!("{addr} lets anonymous clients write, and so command devices ({why}); set acl_file (see /usr/share/doc/fieldmq/acl.example) or allow_anonymous = false"),
                ));
            }
        }
    }
    if !allow_anonymous
        && access.password_file.is_none()
        && b.tls_client_ca.is_none()
        && !listeners.is_empty()
    {
        let span = b.allow_anonymous.as_ref().map(Spanned::span);
        warnings.push(Diagnostic {
            span,
            message: "allow_anonymous = false without password_file or tls_client_ca: no client can connect"
                .into(),
        });
    }
    if b.tls_client_ca.is_some() && !needs_tls {
        warnings.push(at(&b.tls_client_ca, "tls_client_ca is set but no tls_listen or wss_listen uses it"));
    }

    let max_connections = b.max_connections.as_ref().map_or(1000, |m| {
        if *m.get_ref() == 0 {
            diags.push(Diagnostic::at(m.span(), "max_connections must be at least 1"));
        }
        *m.get_ref()
    });
    // MQTT's remaining length caps a packet at 256 MiB.
    let max_packet_size = b.max_packet_size.as_ref().map_or(1 << 20, |m| {
        let size = m.get_ref().0;
        if !(16..=268_435_455 + 5).contains(&size) {
            diags.push(Diagnostic::at(m.span(), "max_packet_size must be between 16B and 256MiB"));
        }
        size
    });
    let connect_timeout = b.connect_timeout.as_ref().map_or(Duration::from_secs(10), |t| {
        if t.get_ref().0 < Duration::from_millis(100) {
            diags.push(Diagnostic::at(t.span(), "connect_timeout must be at least 100ms"));
        }
        t.get_ref().0
    });
    let max_inflight = b.max_inflight.as_ref().map_or(64, |m| {
        if *m.get_ref() == 0 {
            diags.push(Diagnostic::at(m.span(), "max_inflight must be at least 1"));
        }
        *m.get_ref()
    });
    let max_queued = b.max_queued.as_ref().map_or(10_000, |m| {
        if *m.get_ref() == 0 {
            diags.push(Diagnostic::at(m.span(), "max_queued must be at least 1"));
        }
        *m.get_ref()
    });
    let max_queued_bytes = b.max_queued_bytes.as_ref().map_or(16 << 20, |m| {
        let size = m.get_ref().0;
        if size < 1024 || size > u64::from(u32::MAX) {
            diags.push(Diagnostic::at(m.span(), "max_queued_bytes must be between 1KiB and 4GiB"));
        }
        size
    });
    let sys_interval = b.sys_interval.as_ref().map_or(Duration::from_secs(10), |t| {
        let d = t.get_ref().0;
        if !d.is_zero() && d < Duration::from_millis(100) {
            diags.push(Diagnostic::at(t.span(), "sys_interval must be 0 (off) or at least 100ms"));
        }
        d
    });
    let ws_origins: Vec<String> = b.ws_origins.as_ref().map_or_else(Vec::new, |list| {
        list.iter()
            .filter(|o| {
                let text = o.get_ref();
                let host = text.strip_prefix("https://").or_else(|| text.strip_prefix("http://"));
                let ok = host.is_some_and(|host| !host.is_empty() && !host.contains('/'));
                if !ok {
                    diags.push(Diagnostic::at(o.span(), format!("`{text}` is not an origin: expected scheme://host[:port], like \"https://dashboard.plant.local\" (no path)")));
                }
                ok
            })
            .map(|o| o.get_ref().clone())
            .collect()
    });
    BrokerConfig {
        listeners,
        tls,
        access,
        max_connections,
        max_packet_size,
        connect_timeout,
        max_inflight,
        max_queued,
        max_queued_bytes,
        sys_interval,
        ws_origins,
        warnings,
    }
}

/// A diagnostic at a key's value, or for the whole file when it is absent.
fn at<T>(key: &Option<Spanned<T>>, message: &str) -> Diagnostic {
    match key {
        Some(key) => Diagnostic::at(key.span(), message),
        None => Diagnostic::whole_file(message),
    }
}

fn whole_key(b: &BrokerSection, kind: ListenerKind, message: String) -> Diagnostic {
    let list = match kind {
        ListenerKind::Tcp => &b.listen,
        ListenerKind::Tls => &b.tls_listen,
        ListenerKind::WebSocket => &b.ws_listen,
        ListenerKind::WebSocketTls => &b.wss_listen,
    };
    match list {
        Some(list) => Diagnostic::at(list.span(), message),
        None => Diagnostic::whole_file(message),
    }
}
