//! The Modbus parts of a device's config: address, unit, timing, and the
//! attributes (its own and its profile's), checked and turned into the
//! adapter's [`ModbusConfig`].

use std::collections::{BTreeSet, HashMap};
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use adapters::modbus::{
    AttributeSpec, ByteOrder, DataType, ModbusConfig, Parity, SerialSettings, Table, WordOrder,
};
use toml::Spanned;

use super::file::{
    AttributeSection, DeviceSection, OrderName, ParityName, ProfileSection, TableName, TypeName,
};
use super::{DeviceSettings, Diagnostic};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RETRIES: u32 = 1;
const DEFAULT_MAX_GAP: u16 = 10;

/// The register maps compiled into the binary (config/profiles/).
const BUILTIN_PROFILES: &[&str] = &[include_str!("../../../config/profiles/eastron-sdm630.toml")];

/// The built-in profiles, by the name they give themselves. They are
/// checked by a test, so a parse error here is a build mistake, not the
/// user's: such a file is skipped with a log line.
pub fn builtin_profiles() -> Vec<ProfileSection> {
    BUILTIN_PROFILES
        .iter()
        .filter_map(|text| match toml::from_str::<super::file::ConfigFile>(text) {
            Ok(file) => Some(file.profiles),
            Err(e) => {
                tracing::error!(error = %e, "a built-in Modbus profile does not parse");
                None
            }
        })
        .flatten()
        .collect()
}

/// The device-level keys only Modbus devices take.
pub fn refuse_device_keys(d: &DeviceSection, kind: &str, diags: &mut Vec<Diagnostic>) {
    let keys = [
        ("address", d.address.as_ref().map(Spanned::span)),
        ("unit_id", d.unit_id.as_ref().map(Spanned::span)),
        ("timeout", d.timeout.as_ref().map(Spanned::span)),
        ("retries", d.retries.as_ref().map(Spanned::span)),
        ("max_gap", d.max_gap.as_ref().map(Spanned::span)),
        ("profile", d.profile.as_ref().map(Spanned::span)),
        ("port", d.port.as_ref().map(Spanned::span)),
        ("baud", d.baud.as_ref().map(Spanned::span)),
        ("parity", d.parity.as_ref().map(Spanned::span)),
        ("data_bits", d.data_bits.as_ref().map(Spanned::span)),
        ("stop_bits", d.stop_bits.as_ref().map(Spanned::span)),
    ];
    for (key, span) in keys {
        if let Some(span) = span {
            diags.push(Diagnostic::at(span, format!("`{key}` is for Modbus devices, not for kind `{kind}`")));
        }
    }
    for a in &d.attributes {
        if let Some(span) = register_key_span(a) {
            diags.push(Diagnostic::at(
                span,
                format!("register keys are for Modbus devices, not for kind `{kind}`"),
            ));
        }
    }
}

fn register_key_span(a: &AttributeSection) -> Option<std::ops::Range<usize>> {
    a.table
        .as_ref()
        .map(Spanned::span)
        .or(a.register.as_ref().map(Spanned::span))
        .or(a.data_type.as_ref().map(Spanned::span))
        .or(a.scale.as_ref().map(Spanned::span))
        .or(a.unit.as_ref().map(Spanned::span))
}

/// Resolves a `modbus-tcp` device.
pub fn resolve_tcp(
    d: &DeviceSection,
    profiles: &HashMap<&str, &ProfileSection>,
    diags: &mut Vec<Diagnostic>,
) -> Option<DeviceSettings> {
    if let Some(disks) = &d.disks {
        diags.push(Diagnostic::at(disks.span(), "`disks` is for the system device"));
    }
    let Some(address) = &d.address else {
        diags.push(Diagnostic::at(d.kind.span(), "a modbus-tcp device needs address = \"host:port\""));
        return None;
    };
    let addr = match address.get_ref().to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => Some(addr),
        _ => {
            diags.push(Diagnostic::at(
                address.span(),
                format!(
                    "`{}` is not a reachable host:port, expected e.g. \"192.168.1.50:502\"",
                    address.get_ref()
                ),
            ));
            None
        }
    };
    for (key, span) in [
        ("port", d.port.as_ref().map(Spanned::span)),
        ("baud", d.baud.as_ref().map(Spanned::span)),
        ("parity", d.parity.as_ref().map(Spanned::span)),
    ] {
        if let Some(span) = span {
            diags.push(Diagnostic::at(
                span,
                format!("`{key}` is for modbus-rtu devices (a modbus-tcp device has an address)"),
            ));
        }
    }
    let modbus = resolve_common(d, profiles, diags)?;
    Some(DeviceSettings::ModbusTcp { address: addr?, modbus })
}

/// Resolves a `modbus-rtu` device; `ports` holds the settings each serial
/// port was first given, so every device on a port agrees.
pub fn resolve_rtu(
    d: &DeviceSection,
    profiles: &HashMap<&str, &ProfileSection>,
    ports: &mut HashMap<String, SerialSettings>,
    diags: &mut Vec<Diagnostic>,
) -> Option<DeviceSettings> {
    if let Some(disks) = &d.disks {
        diags.push(Diagnostic::at(disks.span(), "`disks` is for the system device"));
    }
    if let Some(address) = &d.address {
        diags.push(Diagnostic::at(
            address.span(),
            "`address` is for modbus-tcp devices (a modbus-rtu device has a port)",
        ));
    }
    let Some(port) = &d.port else {
        diags.push(Diagnostic::at(
            d.kind.span(),
            "a modbus-rtu device needs port = \"/dev/ttyUSB0\" (or a /dev/serial/by-id/ path)",
        ));
        return None;
    };
    let baud = d.baud.as_ref().map_or(9600, |b| *b.get_ref());
    if let Some(b) = d.baud.as_ref().filter(|b| *b.get_ref() == 0) {
        diags.push(Diagnostic::at(b.span(), "baud must be more than 0"));
    }
    let data_bits = d.data_bits.as_ref().map_or(8, |b| *b.get_ref());
    if let Some(b) = d.data_bits.as_ref().filter(|b| !(5..=8).contains(b.get_ref())) {
        diags.push(Diagnostic::at(b.span(), "data_bits must be 5 to 8"));
    }
    let stop_bits = d.stop_bits.as_ref().map_or(1, |b| *b.get_ref());
    if let Some(b) = d.stop_bits.as_ref().filter(|b| !(1..=2).contains(b.get_ref())) {
        diags.push(Diagnostic::at(b.span(), "stop_bits must be 1 or 2"));
    }
    let parity = match d.parity.as_ref().map(|p| *p.get_ref()) {
        None | Some(ParityName::None) => Parity::None,
        Some(ParityName::Even) => Parity::Even,
        Some(ParityName::Odd) => Parity::Odd,
    };
    if let Some(u) = d.unit_id.as_ref().filter(|u| *u.get_ref() == 0) {
        diags.push(Diagnostic::at(
            u.span(),
            "unit_id 0 is the broadcast address on RTU: every slave would act, none answer",
        ));
    }
    let serial = SerialSettings { port: port.get_ref().clone(), baud, parity, data_bits, stop_bits };
    match ports.get(port.get_ref()) {
        Some(first) if *first != serial => diags.push(Diagnostic::at(
            port.span(),
            format!("another device on {} sets baud, parity, data or stop bits otherwise: one bus has one setting", port.get_ref()),
        )),
        Some(_) => {}
        None => {
            ports.insert(port.get_ref().clone(), serial.clone());
        }
    }
    let modbus = resolve_common(d, profiles, diags)?;
    Some(DeviceSettings::ModbusRtu { serial, modbus })
}

fn resolve_common(
    d: &DeviceSection,
    profiles: &HashMap<&str, &ProfileSection>,
    diags: &mut Vec<Diagnostic>,
) -> Option<ModbusConfig> {
    let unit = d.unit_id.as_ref().map_or(1, |u| {
        if *u.get_ref() > 247 {
            diags.push(Diagnostic::at(u.span(), "unit_id must be 0 to 247"));
        }
        *u.get_ref()
    });
    let timeout = d.timeout.as_ref().map_or(DEFAULT_TIMEOUT, |t| t.get_ref().0);
    let attributes = resolve_attributes(d, profiles, diags)?;
    Some(ModbusConfig {
        node: d.name.get_ref().clone(),
        unit,
        attributes,
        timeout,
        retries: d.retries.as_ref().map_or(DEFAULT_RETRIES, |r| *r.get_ref()),
        max_gap: d.max_gap.as_ref().map_or(DEFAULT_MAX_GAP, |g| *g.get_ref()),
    })
}

/// The profile's attributes, then the device's own.
fn resolve_attributes(
    d: &DeviceSection,
    profiles: &HashMap<&str, &ProfileSection>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Vec<AttributeSpec>> {
    let mut sections: Vec<&AttributeSection> = Vec::new();
    if let Some(name) = &d.profile {
        match profiles.get(name.get_ref().as_str()) {
            Some(profile) => sections.extend(&profile.attributes),
            None => {
                let known: Vec<&str> = profiles.keys().copied().collect();
                diags.push(Diagnostic::at(
                    name.span(),
                    format!(
                        "no [[profile]] named `{}`; defined: {}",
                        name.get_ref(),
                        if known.is_empty() { "none".into() } else { known.join(", ") }
                    ),
                ));
                return None;
            }
        }
    }
    sections.extend(&d.attributes);
    if sections.is_empty() {
        diags.push(Diagnostic::at(
            d.name.span(),
            "a Modbus device needs attributes ([[device.attribute]] or a profile)",
        ));
        return None;
    }
    let mut names = BTreeSet::new();
    let mut specs = Vec::with_capacity(sections.len());
    let mut overrides = Vec::new();
    for a in sections {
        // An attribute that sets only a deadband refers to one defined
        // elsewhere (its profile's).
        if a.table.is_none() && a.register.is_none() && a.data_type.is_none() {
            overrides.push(a);
            continue;
        }
        if !names.insert(a.name.get_ref().as_str()) {
            diags.push(Diagnostic::at(
                a.name.span(),
                format!("attribute `{}` is defined twice", a.name.get_ref()),
            ));
        }
        specs.extend(resolve_attribute(a, diags));
    }
    for a in overrides {
        if !names.contains(a.name.get_ref().as_str()) {
            diags.push(Diagnostic::at(
                a.name.span(),
                format!(
                    "attribute `{}` is not defined here or in the profile (table and register missing)",
                    a.name.get_ref()
                ),
            ));
        }
    }
    Some(specs)
}

fn resolve_attribute(a: &AttributeSection, diags: &mut Vec<Diagnostic>) -> Option<AttributeSpec> {
    let name = a.name.get_ref();
    let Some(table) = &a.table else {
        diags.push(Diagnostic::at(
            a.name.span(),
            format!("attribute `{name}` needs table = \"holding\", \"input\", \"coil\" or \"discrete\""),
        ));
        return None;
    };
    let Some(register) = &a.register else {
        diags.push(Diagnostic::at(
            a.name.span(),
            format!("attribute `{name}` needs register = N (0-based, as on the wire)"),
        ));
        return None;
    };
    let table = match table.get_ref() {
        TableName::Holding => Table::Holding,
        TableName::Input => Table::Input,
        TableName::Coil => Table::Coil,
        TableName::Discrete => Table::Discrete,
    };
    let data_type = match a.data_type.as_ref().map(|t| *t.get_ref()) {
        None if table.is_bits() => DataType::Bool,
        None => DataType::U16,
        Some(t) => match t {
            TypeName::U16 => DataType::U16,
            TypeName::I16 => DataType::I16,
            TypeName::U32 => DataType::U32,
            TypeName::I32 => DataType::I32,
            TypeName::U64 => DataType::U64,
            TypeName::I64 => DataType::I64,
            TypeName::F32 => DataType::F32,
            TypeName::F64 => DataType::F64,
            TypeName::Bool => DataType::Bool,
            TypeName::String => DataType::String,
        },
    };
    let errors = diags.len();
    if table.is_bits() && data_type != DataType::Bool {
        let span = a.data_type.as_ref().map_or(a.name.span(), Spanned::span);
        diags.push(Diagnostic::at(span, "coils and discrete inputs are read as type = \"bool\""));
    }
    if let Some(bit) = &a.bit {
        if table.is_bits() || data_type != DataType::Bool || *bit.get_ref() > 15 {
            diags.push(Diagnostic::at(
                bit.span(),
                "bit = 0..15 picks one bit of a holding or input register, with type = \"bool\"",
            ));
        }
    } else if data_type == DataType::Bool && !table.is_bits() {
        diags.push(Diagnostic::at(
            a.name.span(),
            format!("attribute `{name}`: a bool from a register needs bit = 0..15"),
        ));
    }
    let count = a.count.as_ref().map_or(0, |c| *c.get_ref());
    if data_type == DataType::String && !(1..=125).contains(&count) {
        diags.push(Diagnostic::at(
            a.name.span(),
            format!("attribute `{name}`: a string needs count = 1..125 registers"),
        ));
    }
    let scale = a.scale.as_ref().map_or(1.0, |s| *s.get_ref());
    if let Some(s) = &a.scale {
        if !scale.is_finite() || scale == 0.0 {
            diags.push(Diagnostic::at(s.span(), "scale must be a finite, non-zero number"));
        }
    }
    for number in [&a.offset, &a.min, &a.max].into_iter().flatten() {
        if !number.get_ref().is_finite() {
            diags.push(Diagnostic::at(number.span(), "must be a finite number"));
        }
    }
    let order = |o: &Option<Spanned<OrderName>>| o.as_ref().map(|o| *o.get_ref() == OrderName::Little);
    let spec = AttributeSpec {
        name: name.clone(),
        table,
        register: *register.get_ref(),
        data_type,
        word_order: if order(&a.word_order) == Some(true) { WordOrder::Little } else { WordOrder::Big },
        byte_order: if order(&a.byte_order) == Some(true) { ByteOrder::Little } else { ByteOrder::Big },
        bit: a.bit.as_ref().map(|b| *b.get_ref()),
        count,
        scale,
        offset: a.offset.as_ref().map_or(0.0, |o| *o.get_ref()),
        unit: a.unit.as_ref().map(|u| Arc::from(u.get_ref().as_str())),
        writable: a.writable.as_ref().is_some_and(|w| *w.get_ref()),
        min: a.min.as_ref().map(|m| *m.get_ref()),
        max: a.max.as_ref().map(|m| *m.get_ref()),
    };
    if let Some(w) = a.writable.as_ref().filter(|w| *w.get_ref()) {
        let writable_kind = match table {
            Table::Coil => true,
            // A bit of a holding register is written with function 22.
            Table::Holding => spec.data_type != DataType::String,
            _ => false,
        };
        if !writable_kind {
            diags.push(Diagnostic::at(
                w.span(),
                "writable = true needs a coil, a numeric holding register or a bit of one (not input, discrete or a string)",
            ));
        }
    } else if let Some(m) = a.min.as_ref().or(a.max.as_ref()) {
        diags.push(Diagnostic::at(m.span(), "min and max bound writes: they need writable = true"));
    }
    (diags.len() == errors).then_some(spec)
}
