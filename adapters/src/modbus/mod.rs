//! The Modbus adapter: polled devices over Modbus TCP.
//!
//! - `registers.rs`: attributes, data types, word and byte orders; decoding
//!   registers into values and values into registers.
//! - `plan.rs`: request coalescing.
//! - `tcp.rs`: shared TCP links with reconnect backoff.
//!
//! A [`ModbusPoller`] reads its planned requests each poll; if any fails
//! (timeout after its retries, exception, no connection) the whole poll
//! fails and the node is in error, with the reason, until a poll succeeds.

mod plan;
mod registers;
mod tcp;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use plan::{plan, ReadRequest, MAX_BITS, MAX_REGISTERS};
pub use registers::{AttributeSpec, ByteOrder, DataType, Table, WordOrder};
pub use tcp::{Links, Response, TcpLink};

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

/// Polls one Modbus TCP device.
#[derive(Debug)]
pub struct ModbusPoller {
    config: ModbusConfig,
    link: Arc<TcpLink>,
    requests: Vec<ReadRequest>,
}

impl ModbusPoller {
    /// A poller reading `config` over `link`.
    pub fn new(config: ModbusConfig, link: Arc<TcpLink>) -> Self {
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
}
