//! From a device's config to a running adapter: the one place that knows
//! which adapter serves which `kind`.

use adapters::modbus::{Links, ModbusPoller};
use adapters::system::{SystemConfig, SystemPoller};
use adapters::{PolledDevice, PushDevice};

use crate::config::{Config, DeviceConfig, DeviceSettings};

/// An adapter ready to run, in one of the two shapes.
pub enum Adapter {
    /// Asked for readings every `poll`.
    Polled(Box<dyn PolledDevice>),
    /// Runs on its own and pushes readings for its nodes. The serial and BLE
    /// adapters are of this shape; the pipeline and `fieldmq test` already
    /// drive it, and their tests use it.
    #[cfg_attr(not(test), allow(dead_code))]
    Push(Box<dyn PushDevice>),
}

/// Builds the adapter for `device`; devices on the same Modbus TCP
/// host:port share one link from `links`.
pub fn build(device: &DeviceConfig, config: &Config, links: &mut Links) -> Adapter {
    match &device.settings {
        DeviceSettings::ModbusTcp { address, modbus } => {
            Adapter::Polled(Box::new(ModbusPoller::new(modbus.clone(), links.tcp(*address))))
        }
        DeviceSettings::ModbusRtu { serial, modbus } => {
            Adapter::Polled(Box::new(ModbusPoller::new(modbus.clone(), links.rtu(serial))))
        }
        DeviceSettings::System { disks } => Adapter::Polled(Box::new(SystemPoller::new(SystemConfig {
            node: device.name.clone(),
            data_dir: config.data_dir.clone(),
            disks: disks.clone(),
        }))),
    }
}
