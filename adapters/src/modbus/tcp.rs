//! Modbus TCP links: one connection per host:port, shared by every unit id
//! behind it (a TCP-to-RTU gateway serves many meters on one socket, and
//! many of them accept only one connection).
//!
//! Requests on a link take turns. A timeout or a broken socket drops the
//! connection (a late answer would belong to the wrong request); the next
//! request reconnects, after an exponential backoff (0.5 s doubling to
//! 30 s) so a dead device is not hammered and costs nothing while it waits.
//! An exception response keeps the connection: the device answered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::{timeout, Instant};
use tokio_modbus::client::{tcp, Context};
use tokio_modbus::slave::{Slave, SlaveContext};

use super::ops::Op;
use crate::DeviceError;

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What a read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Registers of a register table.
    Registers(Vec<u16>),
    /// Bits of a bit table.
    Bits(Vec<bool>),
}

/// Why a read failed, and whether trying again on the spot may help.
#[derive(Debug)]
pub struct ReadError {
    /// The reason, for the node status.
    pub error: DeviceError,
    /// A timeout or a broken link (retry); not an exception (the device said no).
    pub retryable: bool,
}

/// One shared connection to a Modbus TCP server.
#[derive(Debug)]
pub struct TcpLink {
    addr: SocketAddr,
    state: Mutex<LinkState>,
}

#[derive(Debug, Default)]
struct LinkState {
    context: Option<ContextCell>,
    retry_at: Option<Instant>,
    backoff: Option<Duration>,
}

struct ContextCell(Context);

impl std::fmt::Debug for ContextCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Context")
    }
}

impl TcpLink {
    /// A link to `addr`; it connects on first use.
    pub fn new(addr: SocketAddr) -> Self {
        TcpLink { addr, state: Mutex::new(LinkState::default()) }
    }

    /// Makes `op` on `unit` within `limit`, connecting first if needed; a
    /// write answers `None`.
    pub async fn request(&self, unit: u8, op: Op, limit: Duration) -> Result<Option<Response>, ReadError> {
        let what = op.describe();
        let mut state = self.state.lock().await;
        if state.context.is_none() {
            if let Some(at) = state.retry_at.filter(|at| *at > Instant::now()) {
                let wait = at.saturating_duration_since(Instant::now());
                return Err(ReadError {
                    error: DeviceError::new(format!(
                        "cannot connect to {}; next try in {:.1}s",
                        self.addr,
                        wait.as_secs_f64()
                    )),
                    retryable: false,
                });
            }
            match timeout(limit, tcp::connect_slave(self.addr, Slave(unit))).await {
                Ok(Ok(context)) => {
                    state.context = Some(ContextCell(context));
                    state.backoff = None;
                    state.retry_at = None;
                }
                outcome => {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {}ms", limit.as_millis()),
                    };
                    let backoff = state.backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                    state.backoff = Some(backoff);
                    state.retry_at = Some(Instant::now() + backoff);
                    return Err(ReadError {
                        error: DeviceError::new(format!("cannot connect to {}: {why}", self.addr)),
                        retryable: false,
                    });
                }
            }
        }
        let Some(ContextCell(context)) = state.context.as_mut() else {
            return Err(ReadError { error: DeviceError::new("no connection"), retryable: true });
        };
        context.set_slave(Slave(unit));
        match timeout(limit, op.perform(context)).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(exception))) => Err(ReadError {
                error: DeviceError::new(format!("exception {exception} {what}")),
                retryable: false,
            }),
            Ok(Err(e)) => {
                state.context = None;
                Err(ReadError { error: DeviceError::new(format!("{e} {what}")), retryable: true })
            }
            Err(_) => {
                state.context = None;
                Err(ReadError {
                    error: DeviceError::new(format!("no answer within {}ms {what}", limit.as_millis())),
                    retryable: true,
                })
            }
        }
    }
}

/// The links of one gateway run, so devices on the same host:port or
/// serial port share one.
#[derive(Debug, Default)]
pub struct Links {
    tcp: HashMap<SocketAddr, Arc<TcpLink>>,
    rtu: HashMap<String, super::RtuBus>,
}

impl Links {
    /// The link to `addr`, made on first request.
    pub fn tcp(&mut self, addr: SocketAddr) -> super::Link {
        super::Link::Tcp(self.tcp.entry(addr).or_insert_with(|| Arc::new(TcpLink::new(addr))).clone())
    }

    /// The bus on `settings.port`, its task started on first request (the
    /// config check makes every device on a port agree on its settings).
    pub fn rtu(&mut self, settings: &super::SerialSettings) -> super::Link {
        let bus =
            self.rtu.entry(settings.port.clone()).or_insert_with(|| super::RtuBus::spawn(settings.clone()));
        super::Link::Rtu(bus.clone())
    }
}
