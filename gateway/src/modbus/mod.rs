//! The Modbus poller: legacy ward and building equipment (medication fridges, theatre
//! pressure controllers, oxygen plant monitors) read over Modbus TCP or RTU and turned into
//! telemetry on the same path as MQTT devices.
//!
//! - One task per bus; it keeps one connection and has at most one request outstanding
//!   (RTU is a shared wire). The devices on a bus are polled in order of when they are due,
//!   each at its own interval; a device that fails backs off exponentially (up to
//!   [`MAX_BACKOFF`]) without delaying the others.
//! - Timeouts, exception codes and other errors (connection, CRC) are counted per device
//!   (`wardgate device show`), logged, never fatal. A device that stops answering is
//!   audited once (`modbus.device_silent`, with the reason) and again when it answers
//!   (`modbus.device_returned`); while silent, its values are published once with quality
//!   `bad`.
//! - Each register's value (raw × scale + offset) is published as JSON on
//!   `ward/{device}/modbus/{name}`: `{"value":…,"unit":…,"ts":…,"quality":"good"}`, when it
//!   moves by more than its deadband or when the heartbeat is due, through the device's
//!   class policy (ACL and priority), into the spool and to local subscribers (retained
//!   on the embedded broker, so a display that subscribes later sees the latest value).
//! - Writes are refused unless the register lists `write_min`/`write_max`; a write arrives
//!   as an upstream command on `…/{device}/cmd/modbus/{name}` (payload: a number, or
//!   true/false for a coil) and is audited whether it lands (`modbus.write`) or not
//!   (`modbus.write_refused`).
//!
//! Tested by the unit tests of [`value`] and the system tests in `tests/system/modbus.rs`
//! (an in-process tokio-modbus server, pymodbus, and RTU over a socat pty pair).

mod poll;
pub mod value;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::modbus::{
    Bus, BusKind, ModbusConfig, ModbusDevice, Parity, Register, DEFAULT_BAUD, DEFAULT_HEARTBEAT,
    DEFAULT_INTERVAL, DEFAULT_TIMEOUT,
};
pub use value::{Function, Value, ValueType, WordOrder};

use crate::device::DeviceId;
use crate::registry::SharedRegistry;

/// The longest pause between polls of a device that does not answer.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A write for a bus task to carry out.
#[derive(Debug)]
struct WriteJob {
    unit: u8,
    register: Register,
    words: Vec<u16>,
    coil: Option<bool>,
    done: oneshot::Sender<Result<(), poll::Failure>>,
}

/// Writes to Modbus devices, from upstream commands.
#[derive(Debug, Clone, Default)]
pub struct ModbusHandle {
    devices: Arc<HashMap<DeviceId, (ModbusDevice, mpsc::Sender<WriteJob>)>>,
    events: crate::events::Events,
}

/// Where polled values go: the device's class policy, the spool, and local subscribers.
#[derive(Debug, Clone)]
pub struct Sink {
    pub ingest: crate::ingest::Ingest,
    pub registry: SharedRegistry,
    pub local: rumqttc::AsyncClient,
    pub events: crate::events::Events,
}

/// The local broker session values are published on (an id no device can have).
const LOCAL_CLIENT_ID: &str = "_wardgate-modbus";

/// Connects the poller's session to the embedded broker.
pub fn local_client(
    broker: &crate::broker::EmbeddedBroker,
    shutdown: CancellationToken,
) -> rumqttc::AsyncClient {
    crate::broker::local_session(broker, LOCAL_CLIENT_ID, shutdown)
}

/// Starts one task per bus on `tracker`; they stop with `shutdown`.
pub fn start(
    config: &ModbusConfig,
    sink: Sink,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> ModbusHandle {
    let mut devices = HashMap::new();
    for bus in &config.buses {
        let on_bus: Vec<ModbusDevice> = config
            .devices
            .iter()
            .filter(|d| d.bus == bus.name)
            .cloned()
            .collect();
        if on_bus.is_empty() {
            continue;
        }
        let (tx, rx) = mpsc::channel(16);
        for d in &on_bus {
            devices.insert(d.id.clone(), (d.clone(), tx.clone()));
        }
        tracker.spawn(poll::run_bus(
            bus.clone(),
            on_bus,
            sink.clone(),
            rx,
            shutdown.clone(),
        ));
    }
    ModbusHandle {
        devices: Arc::new(devices),
        events: sink.events,
    }
}

impl ModbusHandle {
    /// True if `device` is polled over Modbus.
    pub fn has(&self, device: &DeviceId) -> bool {
        self.devices.contains_key(device)
    }

    /// Writes `payload` to register `name` of `device` if its map allows it; audited either
    /// way. `origin` says where the command came from.
    pub async fn write(&self, device: &DeviceId, name: &str, payload: &[u8], origin: &str) {
        let result = self.try_write(device, name, payload).await;
        let text = String::from_utf8_lossy(payload);
        self.events.modbus_write(
            device,
            name,
            &text,
            origin,
            result.as_ref().map_err(|e| e as &dyn std::fmt::Display),
        );
    }

    async fn try_write(
        &self,
        device: &DeviceId,
        name: &str,
        payload: &[u8],
    ) -> Result<(), WriteRefused> {
        let (d, tx) = self.devices.get(device).ok_or(WriteRefused::NotModbus)?;
        let register = d
            .registers
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| WriteRefused::NoRegister(name.to_owned()))?;
        let (lo, hi) = register.write.ok_or(WriteRefused::NotWritable)?;
        let text = std::str::from_utf8(payload)
            .map_err(|_| WriteRefused::NotText)?
            .trim();
        let outside = |value: String| WriteRefused::Outside { value, lo, hi };
        let (words, coil) = if register.value_type == ValueType::Bool {
            let v = match text {
                "true" | "1" => true,
                "false" | "0" => false,
                other => return Err(WriteRefused::NotBool(other.to_owned())),
            };
            let n = if v { 1.0 } else { 0.0 };
            if n < lo || n > hi {
                return Err(outside(v.to_string()));
            }
            (Vec::new(), Some(v))
        } else {
            let v: f64 = text
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .ok_or_else(|| WriteRefused::NotANumber(text.to_owned()))?;
            if v < lo || v > hi {
                return Err(outside(v.to_string()));
            }
            let raw = (v - register.offset) / register.scale;
            (
                value::encode(register.value_type, register.word_order, raw)?,
                None,
            )
        };
        let (done, result) = oneshot::channel();
        tx.send(WriteJob {
            unit: d.unit,
            register: register.clone(),
            words,
            coil,
            done,
        })
        .await
        .map_err(|_| WriteRefused::BusNotRunning)?;
        result.await.map_err(|_| WriteRefused::BusStopped)??;
        Ok(())
    }
}

/// Why a command to write a register was not carried out (audited as its reason).
#[derive(Debug, thiserror::Error)]
enum WriteRefused {
    #[error("not a Modbus device")]
    NotModbus,
    #[error("no register {0:?}")]
    NoRegister(String),
    #[error("register is not writable (no write_min/write_max)")]
    NotWritable,
    #[error("payload is not text")]
    NotText,
    #[error("{0:?} is not true or false")]
    NotBool(String),
    #[error("{0:?} is not a number")]
    NotANumber(String),
    #[error("{value} is outside {lo}..={hi}")]
    Outside { value: String, lo: f64, hi: f64 },
    #[error(transparent)]
    Encode(#[from] value::EncodeError),
    #[error("the bus is not running")]
    BusNotRunning,
    #[error("the bus stopped before the write")]
    BusStopped,
    #[error(transparent)]
    Bus(#[from] poll::Failure),
}
