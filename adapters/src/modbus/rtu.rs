//! Modbus RTU: every device on one serial port shares one bus task.
//!
//! A multi-drop RS-485 line has one master, so the bus task owns the port
//! and serves requests from all its devices one at a time, in arrival
//! order, keeping the inter-frame silence of 3.5 characters (at least
//! 1.75 ms above 19,200 baud, as the specification allows). A unit that
//! does not answer costs its own timeout and no more: the next device's
//! request goes right after. After a timeout the bus stays quiet for a
//! guard time and the port is opened afresh with its input cleared, so a
//! late answer cannot be mistaken for the next request's.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_modbus::client::{rtu, Context};
use tokio_modbus::slave::{Slave, SlaveContext};

use super::ops::Op;
use super::tcp::{ReadError, Response};
use crate::DeviceError;

/// Parity of the serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// How the serial port is set up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SerialSettings {
    /// The device path, e.g. /dev/ttyUSB0.
    pub port: String,
    /// Bits per second.
    pub baud: u32,
    /// Parity.
    pub parity: Parity,
    /// 5 to 8.
    pub data_bits: u8,
    /// 1 or 2.
    pub stop_bits: u8,
}

impl SerialSettings {
    /// Bits on the wire per character (start, data, parity, stop).
    pub fn bits_per_char(&self) -> u32 {
        1 + u32::from(self.data_bits) + u32::from(self.parity != Parity::None) + u32::from(self.stop_bits)
    }

    /// The silence between frames: 3.5 characters, 1.75 ms at least.
    pub fn frame_gap(&self) -> Duration {
        if self.baud > 19_200 {
            return Duration::from_micros(1750);
        }
        Duration::from_secs_f64(3.5 * f64::from(self.bits_per_char()) / f64::from(self.baud.max(1)))
    }
}

/// How long the bus stays quiet after a timeout, for a late answer to end.
const LATE_ANSWER_GUARD: Duration = Duration::from_millis(100);

struct BusRequest {
    unit: u8,
    op: Op,
    limit: Duration,
    reply: oneshot::Sender<Result<Option<Response>, ReadError>>,
}

/// A handle on the bus task of one serial port.
#[derive(Debug, Clone)]
pub struct RtuBus {
    tx: mpsc::Sender<BusRequest>,
    port: String,
}

impl RtuBus {
    /// Starts the bus task for `settings` (it opens the port on first use).
    pub fn spawn(settings: SerialSettings) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let port = settings.port.clone();
        tokio::spawn(run_bus(settings, rx));
        RtuBus { tx, port }
    }

    /// Makes `op` on `unit`, within `limit` once on the wire; a write answers `None`.
    pub async fn request(&self, unit: u8, op: Op, limit: Duration) -> Result<Option<Response>, ReadError> {
        let (reply, answer) = oneshot::channel();
        let gone = || ReadError {
            error: DeviceError::new(format!("the bus task of {} stopped", self.port)),
            retryable: false,
        };
        self.tx.send(BusRequest { unit, op, limit, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Waits until `until` to within a tenth of a millisecond. tokio's timer
/// counts whole milliseconds and rounds up (and so does epoll_wait), which
/// turned a 1.75 ms inter-frame silence into about 3 ms (bench/modbus
/// measured it with a pacing relay): the last stretch is a thread sleep.
async fn quiet(until: Instant) {
    if let Some(coarse) = until.checked_sub(Duration::from_millis(2)) {
        sleep_until(coarse).await;
    }
    let left = until.saturating_duration_since(Instant::now());
    if !left.is_zero() {
        // A blocking-pool thread, not block_in_place: `fieldmq modbus read`
        // runs on a current-thread runtime, where block_in_place panics.
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(left)).await;
    }
}

async fn run_bus(settings: SerialSettings, mut requests: mpsc::Receiver<BusRequest>) {
    let mut context: Option<Context> = None;
    let mut quiet_until = Instant::now();
    let mut retry_at: Option<Instant> = None;
    while let Some(request) = requests.recv().await {
        if request.reply.is_closed() {
            // Its poll or write gave up waiting: nothing goes on the bus.
            continue;
        }
        if context.is_none() {
            if retry_at.is_some_and(|at| at > Instant::now()) {
                let _ = request.reply.send(Err(ReadError {
                    error: DeviceError::new(format!("cannot open {}; retrying shortly", settings.port)),
                    retryable: false,
                }));
                continue;
            }
            match open(&settings) {
                Ok(c) => {
                    context = Some(c);
                    retry_at = None;
                }
                Err(e) => {
                    retry_at = Some(Instant::now() + Duration::from_secs(2));
                    let _ = request.reply.send(Err(ReadError {
                        error: DeviceError::new(format!("cannot open {}: {e}", settings.port)),
                        retryable: false,
                    }));
                    continue;
                }
            }
        }
        let Some(ctx) = context.as_mut() else { continue };
        quiet(quiet_until).await;
        ctx.set_slave(Slave(request.unit));
        let what = request.op.describe();
        let answer = timeout(request.limit, request.op.perform(ctx)).await;
        quiet_until = Instant::now() + settings.frame_gap();
        let result = match answer {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(exception))) => Err(ReadError {
                error: DeviceError::new(format!("exception {exception} {what}")),
                retryable: false,
            }),
            Ok(Err(e)) => {
                context = None;
                Err(ReadError { error: DeviceError::new(format!("{e} {what}")), retryable: true })
            }
            Err(_) => {
                // A late answer may still come: wait it out; the reopened
                // port starts with its input cleared, so it cannot be taken
                // for the next unit's answer.
                context = None;
                quiet_until = Instant::now() + LATE_ANSWER_GUARD.max(settings.frame_gap());
                Err(ReadError {
                    error: DeviceError::new(format!(
                        "no answer within {}ms {what}",
                        request.limit.as_millis()
                    )),
                    retryable: true,
                })
            }
        };
        let _ = request.reply.send(result);
    }
}

fn open(settings: &SerialSettings) -> std::io::Result<Context> {
    use tokio_serial::SerialPortBuilderExt;
    let parity = match settings.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let data_bits = match settings.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let stop_bits =
        if settings.stop_bits == 2 { tokio_serial::StopBits::Two } else { tokio_serial::StopBits::One };
    let port = tokio_serial::new(&settings.port, settings.baud)
        .parity(parity)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .open_native_async()?;
    tokio_serial::SerialPort::clear(&port, tokio_serial::ClearBuffer::Input)?;
    Ok(rtu::attach(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_gap_is_three_and_a_half_characters() {
        let s =
            |baud, parity| SerialSettings { port: String::new(), baud, parity, data_bits: 8, stop_bits: 1 };
        // 9600 8N1: 10 bits a character, 3.5 x 10 / 9600 = 3.65 ms.
        assert_eq!(s(9600, Parity::None).frame_gap().as_micros(), 3645);
        // 8E1 is 11 bits.
        assert_eq!(s(9600, Parity::Even).bits_per_char(), 11);
        // Above 19200 baud: the fixed 1.75 ms.
        assert_eq!(s(115_200, Parity::None).frame_gap(), Duration::from_micros(1750));
    }
}
