//! What a config makes the gateway do, in words: printed by `fieldmq check`
//! and logged at start-up, so a person can confirm it before trusting it.

use crate::config::{Config, DeviceConfig, DeviceSettings, Format, ListenerKind, PublishMode, PublishPolicy};
use crate::mapping::TopicValues;

/// One line per fact: gateway, broker, each device.
pub fn describe(config: &Config) -> Vec<String> {
    let mut lines = vec![
        format!("config: {}", config.source),
        format!("gateway: id {}, data in {}", config.gateway_id, config.data_dir.display()),
    ];
    let b = &config.broker;
    if b.listeners.is_empty() {
        lines.push("broker: no listener ([broker] listen = [])".into());
    } else {
        let listen: Vec<String> = b
            .listeners
            .iter()
            .map(|(addr, kind)| match kind {
                ListenerKind::Tcp => format!("mqtt://{addr}"),
                ListenerKind::Tls => format!("mqtts://{addr}"),
                ListenerKind::WebSocket => format!("ws://{addr}"),
                ListenerKind::WebSocketTls => format!("wss://{addr}"),
            })
            .collect();
        lines.push(format!(
            "broker: listen {}, {} clients at most, packets up to {}",
            listen.join(", "),
            b.max_connections,
            crate::config::units::ByteSize(b.max_packet_size),
        ));
        let a = &b.access;
        let mut who =
            vec![format!("anonymous clients {}", if a.allow_anonymous { "allowed" } else { "refused" })];
        if let Some(file) = &a.password_file {
            who.push(format!("passwords from {}", file.display()));
        }
        if let Some(ca) = b.tls.as_ref().and_then(|t| t.client_ca.as_ref()) {
            who.push(format!("client certificates from {} (CN = user)", ca.display()));
        }
        match &a.acl_file {
            Some(file) => who.push(format!("ACL {}", file.display())),
            None => who.push("no ACL: every client may read and write every topic".into()),
        }
        lines.push(format!("broker access: {}", who.join(", ")));
    }
    if config.upstreams.is_empty() {
        lines.push("upstreams: none (nothing is buffered)".into());
    } else {
        let buffer = &config.buffer;
        lines.push(format!(
            "buffer: {} at most, when full {}, commit every {}",
            crate::config::units::ByteSize(buffer.max_size),
            match buffer.when_full {
                mqtt_engine::buffer::WhenFull::DropOldest => "drop-oldest",
                mqtt_engine::buffer::WhenFull::RejectNew => "reject-new",
            },
            humantime::format_duration(buffer.commit_interval),
        ));
    }
    for u in &config.upstreams {
        let s = &u.settings;
        let forward: Vec<&str> = u.forward.iter().map(|f| f.as_str()).collect();
        let mut line = format!(
            "upstream {}: {}://{}:{} as {}, MQTT {}, forward {}",
            s.name,
            if s.tls.is_some() { "mqtts" } else { "mqtt" },
            s.host,
            s.port,
            s.client_id,
            if s.protocol == mqtt_engine::packet::Protocol::V5 { "5" } else { "3.1.1" },
            forward.join(" "),
        );
        if !s.topic_prefix.is_empty() {
            line.push_str(&format!(" with prefix {}", s.topic_prefix));
        }
        if !s.subscribe.is_empty() {
            line.push_str(&format!(", brings down {}", s.subscribe.join(" ")));
        }
        lines.push(line);
    }
    if config.devices.is_empty() {
        lines.push("devices: none".into());
    }
    lines.extend(config.devices.iter().map(|d| describe_device(d, &config.gateway_id)));
    lines
}

fn modbus_line(modbus: &adapters::modbus::ModbusConfig, at: &str) -> String {
    let requests = adapters::modbus::plan(&modbus.attributes, modbus.max_gap).len();
    format!(
        ", unit {} at {at}, {} attributes in {requests} request{} per poll",
        modbus.unit,
        modbus.attributes.len(),
        if requests == 1 { "" } else { "s" }
    )
}

fn describe_device(d: &DeviceConfig, gateway: &str) -> String {
    let values = TopicValues { gateway, node: &d.name, kind: d.kind.as_str(), attribute: None };
    let topic = match d.format {
        Format::Json => d.topic.render(values),
        Format::Value => d.topic.render(TopicValues { attribute: Some("<attribute>"), ..values }),
    };
    let topic = format!("{topic} ({})", d.format.as_str());
    let publish = match &d.publish {
        PublishPolicy::Always => format!("publish {}", PublishMode::Always.as_str()),
        PublishPolicy::OnChange { heartbeat, deadbands } => {
            let mode = PublishMode::OnChange.as_str();
            let mut s = format!("publish {mode}, heartbeat {}", humantime::format_duration(*heartbeat));
            for (name, deadband) in deadbands {
                s.push_str(&format!(", {name} deadband {deadband}"));
            }
            s
        }
    };
    let extra = match &d.settings {
        DeviceSettings::System { disks } if !disks.is_empty() => {
            let disks: Vec<String> = disks.iter().map(|(l, p)| format!("{l}={}", p.display())).collect();
            format!(", disks {}", disks.join(" "))
        }
        DeviceSettings::System { .. } => String::new(),
        DeviceSettings::ModbusTcp { address, modbus } => modbus_line(modbus, &address.to_string()),
        DeviceSettings::ModbusRtu { serial, modbus } => {
            let parity = format!("{:?}", serial.parity).chars().next().unwrap_or('N');
            let line =
                format!("{} {} {}{parity}{}", serial.port, serial.baud, serial.data_bits, serial.stop_bits);
            modbus_line(modbus, &line)
        }
    };
    format!(
        "device {} ({}): poll every {} -> {topic}, {publish}{extra}",
        d.name,
        d.kind.as_str(),
        humantime::format_duration(d.poll)
    )
}
