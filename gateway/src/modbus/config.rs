//! `[modbus]` in the configuration, validated.

use std::path::PathBuf;
use std::time::Duration;

use super::value::{Function, ValueType, WordOrder};
use crate::device::DeviceId;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(60);
pub const DEFAULT_BAUD: u32 = 19_200;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModbusConfig {
    pub buses: Vec<Bus>,
    pub devices: Vec<ModbusDevice>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bus {
    pub name: String,
    pub kind: BusKind,
    /// How long one request may take before it counts as a timeout.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusKind {
    /// Modbus TCP to `host:port`.
    Tcp(String),
    /// Modbus RTU on a serial line (a shared wire: one request at a time).
    Rtu {
        path: PathBuf,
        baud: u32,
        parity: Parity,
        stop_bits: u8,
        data_bits: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModbusDevice {
    /// A registered device: its class decides the topics it may publish and their priority.
    pub id: DeviceId,
    pub bus: String,
    pub unit: u8,
    pub interval: Duration,
    /// A value is published at least this often, changed or not.
    pub heartbeat: Duration,
    pub registers: Vec<Register>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Register {
    pub name: String,
    pub function: Function,
    pub address: u16,
    pub value_type: ValueType,
    pub word_order: WordOrder,
    /// value = raw × scale + offset.
    pub scale: f64,
    pub offset: f64,
    pub unit: Option<String>,
    /// A change smaller than this is not published (until the heartbeat).
    pub deadband: f64,
    /// Writes allowed only within these bounds (in the scaled unit); `None`: read-only.
    pub write: Option<(f64, f64)>,
}

impl Register {
    /// The addresses this register occupies in its table.
    pub fn span(&self) -> std::ops::Range<u32> {
        let start = u32::from(self.address);
        start..start + u32::from(self.value_type.width())
    }
}
