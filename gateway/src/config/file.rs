//! The config file as written: serde structs that mirror the TOML, one per
//! section, every one with `deny_unknown_fields` so a misspelt key is an
//! error rather than a silently ignored setting. Values that later checks
//! must point at keep their position with `Spanned`.
//!
//! Device tables are deliberately flat (one struct whatever the `kind`):
//! serde's tagged enums buffer their input and would lose the positions of
//! the keys inside them. Which keys suit which kind is checked afterwards,
//! in `validate.rs`, with a message naming the kind.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::units::{ByteSize, ConfigDuration};

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub broker: BrokerSection,
    #[serde(default)]
    pub buffer: BufferSection,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamSection>,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceSection>,
    #[serde(default, rename = "profile")]
    pub profiles: Vec<ProfileSection>,
}

/// `[[profile]]`: a register map shared by many Modbus devices.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSection {
    pub name: Spanned<String>,
    #[serde(default, rename = "attribute")]
    pub attributes: Vec<AttributeSection>,
}

/// `[gateway]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    pub id: Option<Spanned<String>>,
    pub data_dir: Option<PathBuf>,
    pub log: Option<Spanned<String>>,
}

/// `[broker]`, the local LAN broker.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub tls_listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub ws_listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub wss_listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub tls_cert: Option<Spanned<String>>,
    pub tls_key: Option<Spanned<String>>,
    pub tls_client_ca: Option<Spanned<String>>,
    pub allow_anonymous: Option<Spanned<bool>>,
    pub password_file: Option<Spanned<String>>,
    pub acl_file: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<u32>>,
    pub max_packet_size: Option<Spanned<ByteSize>>,
    pub connect_timeout: Option<Spanned<ConfigDuration>>,
    pub max_inflight: Option<Spanned<u16>>,
    pub max_queued: Option<Spanned<u32>>,
    pub max_queued_bytes: Option<Spanned<ByteSize>>,
    pub sys_interval: Option<Spanned<ConfigDuration>>,
    pub ws_origins: Option<Vec<Spanned<String>>>,
}

/// An enum written as one of a few strings, whose error lists them all
/// (serde's derive for enums reports "wanted string or table" through toml).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BufferSection {
    pub max_size: Option<Spanned<ByteSize>>,
    pub when_full: Option<Spanned<WhenFullName>>,
    pub commit_interval: Option<Spanned<ConfigDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub name: Spanned<String>,
    pub url: Spanned<String>,
    pub client_id: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
    pub alpn: Option<Vec<Spanned<String>>>,
    pub server_name: Option<Spanned<String>>,
    pub protocol: Option<Spanned<u8>>,
    pub topic_prefix: Option<Spanned<String>>,
    pub topic_template: Option<Spanned<String>>,
    pub forward: Option<Vec<Spanned<String>>>,
    pub subscribe: Option<Vec<Spanned<String>>>,
    pub keep_alive: Option<Spanned<ConfigDuration>>,
    pub max_inflight: Option<Spanned<u16>>,
    pub max_rate: Option<Spanned<u32>>,
    pub backoff_min: Option<Spanned<ConfigDuration>>,
    pub backoff_max: Option<Spanned<ConfigDuration>>,
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            const NAMES: &'static [&'static str] = &[$($text),+];

            #[allow(dead_code)] // not every config enum is printed
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct EnumVisitor;
                impl Visitor<'_> for EnumVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        let quoted: Vec<String> = $name::NAMES.iter().map(|n| format!("\"{n}\"")).collect();
                        write!(f, "one of {}", quoted.join(", "))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        match v {
                            $($text => Ok($name::$variant),)+
                            _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
                        }
                    }
                }
                deserializer.deserialize_str(EnumVisitor)
            }
        }
    };
}

string_enum! {
    /// The device kinds the config language knows.
    DeviceKind {
        ModbusTcp = "modbus-tcp",
        ModbusRtu = "modbus-rtu",
        Serial = "serial",
        Ble = "ble",
        System = "system",
    }
}

string_enum! {
    /// `format`: how a reading becomes payloads.
    #[derive(Default)]
    Format {
        /// One JSON document per reading on the device's topic.
        #[default]
        Json = "json",
        /// One message per attribute on `{topic}/{attribute}`, the bare value.
        Value = "value",
    }
}

string_enum! {
    /// `[buffer] when_full`.
    WhenFullName {
        DropOldest = "drop-oldest",
        RejectNew = "reject-new",
    }
}

string_enum! {
    /// `publish`: which attributes of a reading are sent.
    PublishMode {
        /// Every attribute of every reading.
        Always = "always",
        /// Only attributes that changed, and each at least once per heartbeat.
        OnChange = "on-change",
    }
}

/// `[[device]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    pub name: Spanned<String>,
    pub kind: Spanned<DeviceKind>,
    pub poll: Option<Spanned<ConfigDuration>>,
    pub topic: Option<Spanned<String>>,
    #[serde(default)]
    pub format: Format,
    pub publish: Option<Spanned<PublishMode>>,
    pub heartbeat: Option<Spanned<ConfigDuration>>,
    /// `system` only: extra filesystems to watch, label = path.
    pub disks: Option<Spanned<BTreeMap<String, PathBuf>>>,
    /// Modbus: `host:port` (TCP).
    pub address: Option<Spanned<String>>,
    /// Modbus: the unit (slave) id.
    pub unit_id: Option<Spanned<u8>>,
    /// Modbus: per request.
    pub timeout: Option<Spanned<ConfigDuration>>,
    /// Modbus: extra attempts after a timeout.
    pub retries: Option<Spanned<u32>>,
    /// Modbus: registers between attributes still read in one request.
    pub max_gap: Option<Spanned<u16>>,
    /// Modbus: a `[[profile]]` whose attributes the device has.
    pub profile: Option<Spanned<String>>,
    /// Modbus RTU: the serial port.
    pub port: Option<Spanned<String>>,
    /// Modbus RTU: bits per second (default 9600).
    pub baud: Option<Spanned<u32>>,
    /// Modbus RTU: none | even | odd (default none).
    pub parity: Option<Spanned<ParityName>>,
    /// Modbus RTU: 5 to 8 (default 8).
    pub data_bits: Option<Spanned<u8>>,
    /// Modbus RTU: 1 or 2 (default 1).
    pub stop_bits: Option<Spanned<u8>>,
    #[serde(default, rename = "attribute")]
    pub attributes: Vec<AttributeSection>,
}

/// `[[device.attribute]]` and `[[profile.attribute]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeSection {
    pub name: Spanned<String>,
    pub deadband: Option<Spanned<f64>>,
    // Modbus only:
    pub table: Option<Spanned<TableName>>,
    pub register: Option<Spanned<u16>>,
    #[serde(rename = "type")]
    pub data_type: Option<Spanned<TypeName>>,
    pub word_order: Option<Spanned<OrderName>>,
    pub byte_order: Option<Spanned<OrderName>>,
    pub bit: Option<Spanned<u8>>,
    pub count: Option<Spanned<u16>>,
    pub scale: Option<Spanned<f64>>,
    pub offset: Option<Spanned<f64>>,
    pub unit: Option<Spanned<String>>,
    pub writable: Option<Spanned<bool>>,
    pub min: Option<Spanned<f64>>,
    pub max: Option<Spanned<f64>>,
}

string_enum! {
    /// `table`: which Modbus table an attribute is in.
    TableName {
        Holding = "holding",
        Input = "input",
        Coil = "coil",
        Discrete = "discrete",
    }
}

string_enum! {
    /// `type`: how an attribute's registers are read.
    TypeName {
        U16 = "u16",
        I16 = "i16",
        U32 = "u32",
        I32 = "i32",
        U64 = "u64",
        I64 = "i64",
        F32 = "f32",
        F64 = "f64",
        Bool = "bool",
        String = "string",
    }
}

string_enum! {
    /// `parity` of a serial line.
    ParityName {
        None = "none",
        Even = "even",
        Odd = "odd",
    }
}

string_enum! {
    /// `word_order` and `byte_order`.
    OrderName {
        Big = "big",
        Little = "little",
    }
}
