//! The Modbus adapter: polled devices over Modbus TCP and RTU.
//!
//! - `registers.rs`: attributes, data types, word and byte orders; decoding
//!   registers into values and values into registers.
//! - `plan.rs`: request coalescing.
//! - `ops.rs`: one request (read or write), made the same on either transport.
//! - `tcp.rs`: shared TCP links with reconnect backoff.
//! - `rtu.rs`: one bus task per serial port, serving all its devices.
//!
//! A [`ModbusPoller`] reads its planned requests each poll; if any fails
//! (timeout after its retries, exception, no connection) the whole poll
//! fails and the node is in error, with the reason, until a poll succeeds.
//! It writes `writable` attributes (a coil with function 5, one register
//! with 6, several with 16), scale and offset undone, after checking the
//! value against the type's range and the attribute's `min`/`max`: a
//! malformed or out-of-range value writes nothing.

mod ops;

use ops::Op;
mod plan;
mod registers;
mod rtu;
mod tcp;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use plan::{plan, ReadRequest, MAX_BITS, MAX_REGISTERS};
pub use registers::{AttributeSpec, ByteOrder, DataType, Table, WordOrder};
pub use rtu::{Parity, RtuBus, SerialSettings};
pub use tcp::{Links, ReadError, Response, TcpLink};

use crate::device::BoxFuture;
use crate::{Attribute, DeviceError, PolledDevice, Reading, Value};

/// How a Modbus device is read.
#[derive(Debug, Clone)]
pub struct ModbusConfig {
    /// The node name.
    pub node: String,
    /// The unit (slave) id.
    pub unit: u8,
    /// Its attributes.
    pub attributes: Vec<AttributeSpec>,
    /// Per request.
    pub timeout: Duration,
    /// Extra attempts after a timeout, per request.
    pub retries: u32,
    /// Registers between two attributes that are still read in one request.
    pub max_gap: u16,
}

/// The way to a device: a TCP link or an RTU bus, each shared by every
/// device behind it.
#[derive(Debug, Clone)]
pub enum Link {
    /// Modbus TCP.
    Tcp(Arc<TcpLink>),
    /// Modbus RTU on a serial port.
    Rtu(RtuBus),
}

impl Link {
    /// Makes `op` on `unit` over whichever transport this is.
    async fn request(&self, unit: u8, op: Op, limit: Duration) -> Result<Option<Response>, ReadError> {
        match self {
            Link::Tcp(link) => link.request(unit, op, limit).await,
            Link::Rtu(bus) => bus.request(unit, op, limit).await,
        }
    }

    /// Reads `request` from `unit`, within `limit`.
    pub async fn read(
        &self,
        unit: u8,
        request: &ReadRequest,
        limit: Duration,
    ) -> Result<Response, ReadError> {
        match self.request(unit, Op::Read(request.clone()), limit).await? {
            Some(response) => Ok(response),
            None => Err(ReadError { error: DeviceError::new("no data"), retryable: true }),
        }
    }
}

/// Polls one Modbus device.
#[derive(Debug)]
pub struct ModbusPoller {
    config: ModbusConfig,
    link: Link,
    requests: Vec<ReadRequest>,
}

impl ModbusPoller {
    /// A poller reading `config` over `link`.
    pub fn new(config: ModbusConfig, link: Link) -> Self {
        let requests = plan(&config.attributes, config.max_gap);
        ModbusPoller { config, link, requests }
    }

    /// The requests one poll makes.
    pub fn requests(&self) -> &[ReadRequest] {
        &self.requests
    }

    async fn read(&self) -> Result<Reading, DeviceError> {
        let mut values: Vec<Option<Value>> = vec![None; self.config.attributes.len()];
        for request in &self.requests {
            let mut attempt = 0;
            let response = loop {
                match self.link.read(self.config.unit, request, self.config.timeout).await {
                    Ok(response) => break response,
                    Err(e) if e.retryable && attempt < self.config.retries => attempt += 1,
                    Err(e) => return Err(e.error),
                }
            };
            for &i in &request.attributes {
                let a = &self.config.attributes[i];
                let offset = usize::from(a.register - request.start);
                values[i] = match &response {
                    Response::Registers(regs) => regs.get(offset..).and_then(|r| a.decode_registers(r)),
                    Response::Bits(bits) => bits.get(offset).map(|b| a.decode_bit(*b)),
                };
                if values[i].is_none() {
                    return Err(DeviceError::new(format!("short answer for {}", a.name)));
                }
            }
        }
        let attributes = self
            .config
            .attributes
            .iter()
            .zip(values)
            .filter_map(|(a, v)| Some(Attribute { name: a.name.clone(), value: v?, unit: a.unit.clone() }))
            .collect();
        Ok(Reading { node: self.config.node.clone(), ts: SystemTime::now(), attributes })
    }
}

impl PolledDevice for ModbusPoller {
    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Reading>, DeviceError>> {
        Box::pin(async move { self.read().await.map(|r| vec![r]) })
    }

    fn write<'a>(&'a mut self, attribute: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let data = self.prepare_write(attribute, value)?;
            let Some(spec) = self.config.attributes.iter().find(|a| a.name == attribute) else {
                return Err(format!("no attribute `{attribute}`"));
            };
            let op = match (spec.bit, data) {
                (Some(bit), Response::Bits(b)) => {
                    Op::WriteBit(spec.register, bit, b.first().copied().unwrap_or(false))
                }
                (_, data) => Op::Write(spec.register, data),
            };
            self.link
                .request(self.config.unit, op, self.config.timeout)
                .await
                .map(|_| ())
                .map_err(|e| e.error.reason().to_owned())
        })
    }
}

impl ModbusPoller {
    /// What to write for `value`, or why nothing may be written.
    fn prepare_write(&self, attribute: &str, value: &str) -> Result<Response, String> {
        let spec = self
            .config
            .attributes
            .iter()
            .find(|a| a.name == attribute)
            .ok_or_else(|| format!("no attribute `{attribute}`"))?;
        if !spec.writable {
            return Err(format!("`{attribute}` is not writable"));
        }
        if spec.table == Table::Coil || spec.bit.is_some() {
            return match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "on" => Ok(Response::Bits(vec![true])),
                "false" | "0" | "off" => Ok(Response::Bits(vec![false])),
                other => Err(format!("`{other}` is not true/false, 1/0 or on/off")),
            };
        }
        let v: f64 = value.trim().parse().map_err(|_| format!("`{}` is not a number", value.trim()))?;
        if let Some(min) = spec.min.filter(|min| v < *min) {
            return Err(format!("{v} is below the minimum {min}"));
        }
        if let Some(max) = spec.max.filter(|max| v > *max) {
            return Err(format!("{v} is above the maximum {max}"));
        }
        spec.encode_registers(v).map(Response::Registers)
    }
}
