//! `[buffer]` and `[[upstream]]`: checked and turned into the engine's
//! buffer and bridge settings. The TLS files are read here, so `fieldmq
//! check` refuses a missing, unreadable or malformed certificate or key,
//! with the position of the key that names it, before anything runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mqtt_engine::bridge::{tls, UpstreamSettings};
use mqtt_engine::buffer::WhenFull;
use mqtt_engine::packet::Protocol;
use mqtt_engine::TopicFilter;
use toml::Spanned;

use super::file::{BufferSection, UpstreamSection, WhenFullName};
use super::{relative_to_config, ConfigSource, Diagnostic};

const DEFAULT_MAX_SIZE: u64 = 256 << 20;
const DEFAULT_COMMIT: Duration = Duration::from_millis(100);
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
const DEFAULT_INFLIGHT: u16 = 256;

/// `[buffer]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferConfig {
    pub max_size: u64,
    pub when_full: WhenFull,
    pub commit_interval: Duration,
}

/// One `[[upstream]]`, resolved.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub settings: UpstreamSettings,
    pub forward: Vec<TopicFilter>,
    /// The section as written, to tell on reload whether it changed.
    pub fingerprint: String,
}

pub fn resolve_buffer(b: &BufferSection, diags: &mut Vec<Diagnostic>) -> BufferConfig {
    let max_size = b.max_size.as_ref().map_or(DEFAULT_MAX_SIZE, |m| {
        if m.get_ref().0 < 64 * 1024 {
            diags.push(Diagnostic::at(m.span(), "max_size must be at least 64KiB"));
        }
        m.get_ref().0
    });
    let commit_interval = b.commit_interval.as_ref().map_or(DEFAULT_COMMIT, |c| {
        if c.get_ref().0 < Duration::from_millis(1) || c.get_ref().0 > Duration::from_secs(60) {
            diags.push(Diagnostic::at(c.span(), "commit_interval must be between 1ms and 60s"));
        }
        c.get_ref().0
    });
    let when_full = match b.when_full.as_ref().map(|w| *w.get_ref()) {
        None | Some(WhenFullName::DropOldest) => WhenFull::DropOldest,
        Some(WhenFullName::RejectNew) => WhenFull::RejectNew,
    };
    BufferConfig { max_size, when_full, commit_interval }
}

/// `mqtt://host[:port]` or `mqtts://host[:port]`: (tls, host, port).
fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err("must start with mqtt:// or mqtts://".into());
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("an IPv6 address needs its closing `]`")?;
        match after.strip_prefix(':') {
            Some(port) => (host, port.parse().map_err(|_| format!("bad port `{port}`"))?),
            None if after.is_empty() => (host, default_port),
            None => return Err(format!("unexpected `{after}` after the address")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| format!("bad port `{port}`"))?),
            None => (rest, default_port),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err("expected mqtt[s]://HOST[:PORT]".into());
    }
    if port == 0 {
        return Err("the port must not be 0".into());
    }
    Ok((tls, host.to_owned(), port))
}

fn filters(list: &[Spanned<String>], what: &str, diags: &mut Vec<Diagnostic>) -> Vec<TopicFilter> {
    list.iter()
        .filter_map(|f| match TopicFilter::new(f.get_ref().as_str()) {
            Ok(filter) => Some(filter),
            Err(e) => {
                diags.push(Diagnostic::at(f.span(), format!("invalid {what} filter `{}`: {e}", f.get_ref())));
                None
            }
        })
        .collect()
}

fn file_path(value: &Option<Spanned<String>>, source: &ConfigSource) -> Option<PathBuf> {
    value.as_ref().map(|v| relative_to_config(Path::new(v.get_ref()), source))
}

pub fn resolve_upstreams(
    sections: &[UpstreamSection],
    gateway_id: &str,
    source: &ConfigSource,
    diags: &mut Vec<Diagnostic>,
) -> Vec<UpstreamConfig> {
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for u in sections {
        let name = u.name.get_ref().clone();
        if !names.insert(name.clone()) {
            diags.push(Diagnostic::at(
                u.name.span(),
                format!("an upstream named `{name}` is already defined"),
            ));
        }
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c.is_control()) {
            diags.push(Diagnostic::at(u.name.span(), "an upstream name must be non-empty, without spaces"));
        }
        let before = diags.len();
        let (use_tls, host, port) = match parse_url(u.url.get_ref()) {
            Ok(parts) => parts,
            Err(why) => {
                diags.push(Diagnostic::at(u.url.span(), format!("invalid url `{}`: {why}", u.url.get_ref())));
                (false, String::new(), 0)
            }
        };
        let protocol = match u.protocol.as_ref().map(|p| *p.get_ref()) {
            None | Some(4) => Protocol::V311,
            Some(5) => Protocol::V5,
            Some(other) => {
                let span = u.protocol.as_ref().map(|p| p.span()).unwrap_or(u.url.span());
                diags
                    .push(Diagnostic::at(span, format!("protocol must be 4 (MQTT 3.1.1) or 5, not {other}")));
                Protocol::V311
            }
        };
        let files = tls::TlsFiles {
            ca_file: file_path(&u.ca_file, source),
            cert_file: file_path(&u.cert_file, source),
            key_file: file_path(&u.key_file, source),
            alpn: u.alpn.iter().flatten().map(|a| a.get_ref().clone()).collect(),
        };
        let tls_keys = [&u.ca_file, &u.cert_file, &u.key_file, &u.server_name];
        if !use_tls {
            for key in tls_keys.iter().filter_map(|k| k.as_ref()) {
                diags.push(Diagnostic::at(key.span(), "TLS settings need an mqtts:// url"));
            }
        }
        let tls_config = if use_tls {
            let problems = tls::check_files(&files);
            for (which, e) in &problems {
                let key = match which {
                    tls::TlsFile::Ca => &u.ca_file,
                    tls::TlsFile::Cert => &u.cert_file,
                    tls::TlsFile::Key => &u.key_file,
                };
                let span = key.as_ref().map_or(u.url.span(), |k| k.span());
                diags.push(Diagnostic::at(span, format!("TLS: {e}")));
            }
            if problems.is_empty() {
                match tls::client_config(&files) {
                    Ok(config) => Some(config),
                    Err(e) => {
                        let key = u.cert_file.as_ref().or(u.key_file.as_ref()).or(u.ca_file.as_ref());
                        diags.push(Diagnostic::at(
                            key.map_or(u.url.span(), |k| k.span()),
                            format!("TLS: {e}"),
                        ));
                        None
                    }
                }
            } else {
                None
            }
        } else {
            None
        };
        let password = match (&u.password, &u.password_file) {
            (Some(_), Some(f)) => {
                diags.push(Diagnostic::at(f.span(), "give password or password_file, not both"));
                None
            }
            (Some(p), None) => Some(p.get_ref().clone()),
            (None, Some(f)) => {
                let path = relative_to_config(Path::new(f.get_ref()), source);
                match std::fs::read_to_string(&path) {
                    Ok(text) => Some(text.lines().next().unwrap_or("").to_owned()),
                    Err(e) => {
                        diags.push(Diagnostic::at(f.span(), format!("cannot read {}: {e}", path.display())));
                        None
                    }
                }
            }
            (None, None) => None,
        };
        let keep_alive = u.keep_alive.as_ref().map_or(DEFAULT_KEEP_ALIVE, |k| {
            let v = k.get_ref().0;
            if v < Duration::from_secs(1) || v > Duration::from_secs(65_535) {
                diags.push(Diagnostic::at(k.span(), "keep_alive must be between 1s and 65535s"));
            }
            v
        });
        let backoff_min = u.backoff_min.as_ref().map_or(Duration::from_secs(1), |b| b.get_ref().0);
        let backoff_max = u.backoff_max.as_ref().map_or(Duration::from_secs(60), |b| {
            if b.get_ref().0 < backoff_min {
                diags.push(Diagnostic::at(b.span(), "backoff_max must not be below backoff_min"));
            }
            b.get_ref().0
        });
        let max_inflight = u.max_inflight.as_ref().map_or(DEFAULT_INFLIGHT, |m| {
            if *m.get_ref() == 0 {
                diags.push(Diagnostic::at(m.span(), "max_inflight must be at least 1"));
            }
            *m.get_ref()
        });
        let topic_prefix = u.topic_prefix.as_ref().map(|p| p.get_ref().clone()).unwrap_or_default();
        if let Some(p) = &u.topic_prefix {
            if p.get_ref().contains(['+', '#', '\0']) {
                diags.push(Diagnostic::at(p.span(), "topic_prefix must not contain `+`, `#` or NUL"));
            }
        }
        if let (Some(t), Some(_)) = (&u.topic_template, &u.topic_prefix) {
            diags.push(Diagnostic::at(t.span(), "give topic_prefix or topic_template, not both"));
        }
        if let Some(t) = &u.topic_template {
            if t.get_ref().contains(['+', '#', '\0']) || t.get_ref().is_empty() {
                diags.push(Diagnostic::at(
                    t.span(),
                    "topic_template must be a topic name (no `+`, `#`), with {topic} or {topic_encoded}",
                ));
            }
        }
        let forward = match &u.forward {
            Some(list) => filters(list, "forward", diags),
            None => vec![TopicFilter::new("fieldmq/#").expect("a valid filter")],
        };
        let subscribe: Vec<String> = filters(u.subscribe.as_deref().unwrap_or(&[]), "subscribe", diags)
            .iter()
            .map(|f| f.as_str().to_owned())
            .collect();
        if diags.len() > before {
            continue;
        }
        let server_name = u.server_name.as_ref().map_or_else(|| host.clone(), |s| s.get_ref().clone());
        let client_id = u
            .client_id
            .as_ref()
            .map_or_else(|| format!("fieldmq-{gateway_id}-{name}"), |c| c.get_ref().clone());
        let settings = UpstreamSettings {
            name: name.clone(),
            host,
            port,
            tls: tls_config,
            server_name,
            client_id,
            username: u.username.as_ref().map(|n| n.get_ref().clone()),
            password: password.map(|p| p.into_bytes().into()),
            protocol,
            keep_alive,
            topic_prefix: topic_prefix.clone(),
            topic_template: u.topic_template.as_ref().map(|t| t.get_ref().clone()),
            subscribe,
            max_inflight,
            max_rate: u.max_rate.as_ref().map_or(0, |m| *m.get_ref()),
            backoff_min,
            backoff_max,
            status_topic: String::new(),
        };
        // The will and `online` go where the gateway status would go.
        let settings = UpstreamSettings {
            status_topic: settings.upstream_topic(&format!("fieldmq/{gateway_id}/status")),
            ..settings
        };
        let fingerprint = format!("{u:?}");
        out.push(UpstreamConfig { settings, forward, fingerprint });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls() {
        assert_eq!(parse_url("mqtts://a.example.com"), Ok((true, "a.example.com".into(), 8883)));
        assert_eq!(parse_url("mqtt://127.0.0.1:1884"), Ok((false, "127.0.0.1".into(), 1884)));
        assert_eq!(parse_url("mqtts://[::1]:8884"), Ok((true, "::1".into(), 8884)));
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://x:notaport").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
    }
}
