//! Device adapters: the *sources* of fieldmq.
//!
//! An adapter knows one kind of field device (the host itself, and later
//! Modbus, serial line devices, BLE sensors) and turns what it reads into
//! [`Reading`]s: one poll of one node, with named, typed attributes.
//! Adapters know nothing of MQTT, topics or payloads; that mapping belongs to
//! the gateway. This crate must never depend on `mqtt-engine`.
//!
//! Two shapes of device exist, and the interface has both from the start:
//!
//! - a [`PolledDevice`] is asked for readings on a period (Modbus meters, the
//!   host); [`run_polled`] owns its schedule and its error/recovery status;
//! - a [`PushDevice`] runs on its own and emits readings as they come, for
//!   any number of nodes (a serial radio receiver hearing twenty sensors, a
//!   BLE scanner).
//!
//! Both write [`SourceEvent`]s into an [`Output`]: readings, and node status
//! changes (`online`, `error: <reason>`), tagged with the device they came
//! from so the gateway can apply that device's mapping.
//!
//! # Layout
//!
//! - `reading.rs`: [`Reading`], [`Attribute`], [`Value`], what every adapter yields.
//! - `device.rs`: the two device traits, [`Output`] and [`DeviceError`].
//! - `poll.rs`: [`run_polled`], the per-device poll schedule (no burst after a stall).
//! - `system.rs`: the `system` adapter, real data from the host.
//! - `modbus/`: Modbus TCP devices: registers, coalescing, shared links.
#![deny(missing_docs)]

mod device;
pub mod modbus;
mod poll;
mod reading;
pub mod system;

pub use device::{
    BoxFuture, DeviceError, NodeStatus, Output, PolledDevice, PushDevice, SourceEvent, SourceId, WriteRequest,
};
pub use poll::{poll_once, run_polled, Schedule};
pub use reading::{Attribute, Reading, Value};
