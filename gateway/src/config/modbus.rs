//! `[modbus]`: the buses legacy equipment hangs on, each device's register map, and which
//! registers upstream may write.

use std::path::PathBuf;
use std::time::Duration;

use std::collections::BTreeMap;
use std::str::FromStr;

use super::classes::{DeviceClass, DeviceEntry};
use super::diag::Validator;
use super::raw::{self, S};
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

/// The Modbus table a register is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Function {
    /// Holding registers (function 3; written with 6/16).
    Holding,
    /// Input registers (function 4).
    Input,
    /// Coils (function 1; written with 5).
    Coil,
    /// Discrete inputs (function 2).
    Discrete,
}

impl FromStr for Function {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "holding" => Function::Holding,
            "input" => Function::Input,
            "coil" => Function::Coil,
            "discrete" => Function::Discrete,
            other => {
                return Err(format!(
                    "function {other:?}: write \"holding\", \"input\", \"coil\" or \"discrete\""
                ))
            }
        })
    }
}

impl Function {
    pub fn is_bits(self) -> bool {
        matches!(self, Function::Coil | Function::Discrete)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    F32,
    F64,
    Bool,
}

impl FromStr for ValueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "u16" => ValueType::U16,
            "i16" => ValueType::I16,
            "u32" => ValueType::U32,
            "i32" => ValueType::I32,
            "f32" => ValueType::F32,
            "f64" => ValueType::F64,
            "bool" => ValueType::Bool,
            other => {
                return Err(format!(
                    "type {other:?}: write u16, i16, u32, i32, f32, f64 or bool"
                ))
            }
        })
    }
}

impl ValueType {
    /// Registers (or coils, for bool) one value occupies.
    pub fn width(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 | ValueType::Bool => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::F64 => 4,
        }
    }
}

/// Which 16-bit word of a multi-word value comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordOrder {
    /// Most significant word first (Modbus's usual "big endian").
    Big,
    /// Least significant word first ("word swapped").
    Little,
}

impl FromStr for WordOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "big" => Ok(WordOrder::Big),
            "little" => Ok(WordOrder::Little),
            other => Err(format!("word_order {other:?}: write \"big\" or \"little\"")),
        }
    }
}

impl Validator<'_> {
    pub(super) fn modbus(
        &mut self,
        m: &S<raw::RawModbus>,
        devices: &BTreeMap<DeviceId, DeviceEntry>,
        classes: &BTreeMap<String, DeviceClass>,
    ) -> ModbusConfig {
        let m = m.get_ref();
        let mut buses: Vec<Bus> = Vec::new();
        for b in &m.bus {
            let span = b.span();
            let b = b.get_ref();
            let name = self
                .required(&b.name, &span, "name")
                .and_then(|n| self.name(n, "bus name"));
            let timeout = self.duration(b.timeout.as_ref(), DEFAULT_TIMEOUT);
            let kind = match (&b.tcp, &b.serial) {
                (Some(t), None) => {
                    let addr = t.get_ref();
                    let ok = addr.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0)
                    });
                    if ok {
                        Some(BusKind::Tcp(addr.clone()))
                    } else {
                        self.error(t.span(), format!("tcp {addr:?}: write \"HOST:PORT\""));
                        None
                    }
                }
                (None, Some(path)) => {
                    let baud = b.baud.as_ref().map_or(Some(i64::from(DEFAULT_BAUD)), |x| {
                        self.int_in(x, 300, 4_000_000, "baud")
                    });
                    let parity = match &b.parity {
                        None => Some(Parity::None),
                        Some(p) => {
                            let r = match p.get_ref().as_str() {
                                "none" => Ok(Parity::None),
                                "even" => Ok(Parity::Even),
                                "odd" => Ok(Parity::Odd),
                                other => Err(format!("parity {other:?}: write none, even or odd")),
                            };
                            self.check(p.span(), r)
                        }
                    };
                    let stop_bits = b
                        .stop_bits
                        .as_ref()
                        .map_or(Some(1), |x| self.int_in(x, 1, 2, "stop_bits"));
                    let data_bits = b
                        .data_bits
                        .as_ref()
                        .map_or(Some(8), |x| self.int_in(x, 7, 8, "data_bits"));
                    match (baud, parity, stop_bits, data_bits) {
                        (Some(baud), Some(parity), Some(stop_bits), Some(data_bits)) => {
                            Some(BusKind::Rtu {
                                path: self.path(path),
                                baud: u32::try_from(baud).unwrap_or(DEFAULT_BAUD),
                                parity,
                                stop_bits: u8::try_from(stop_bits).unwrap_or(1),
                                data_bits: u8::try_from(data_bits).unwrap_or(8),
                            })
                        }
                        _ => None,
                    }
                }
                _ => {
                    self.error(span.clone(), "a bus has exactly one of `tcp` or `serial`");
                    None
                }
            };
            if let (Some(name), Some(kind)) = (name, kind) {
                if buses.iter().any(|x| x.name == name) {
                    self.error(span, format!("bus {name} is defined twice"));
                } else {
                    buses.push(Bus {
                        name,
                        kind,
                        timeout,
                    });
                }
            }
        }
        let mut out = Vec::new();
        for d in &m.device {
            let span = d.span();
            let d = d.get_ref();
            let id = self.required(&d.id, &span, "id").and_then(|i| {
                let r = DeviceId::parse(i.get_ref())
                    .map_err(|e| e.to_string())
                    .and_then(|id| {
                        if devices.contains_key(&id) {
                            Ok(id)
                        } else {
                            Err(format!(
                                "modbus device {id} is not a registered [[device]] (its class decides its topics)"
                            ))
                        }
                    });
                self.check(i.span(), r)
            });
            let bus = self.required(&d.bus, &span, "bus").and_then(|b| {
                let found = buses.iter().find(|x| &x.name == b.get_ref());
                match found {
                    Some(x) => Some(x.clone()),
                    None => {
                        self.error(b.span(), format!("unknown bus {:?}", b.get_ref()));
                        None
                    }
                }
            });
            let rtu = matches!(bus.as_ref().map(|b| &b.kind), Some(BusKind::Rtu { .. }));
            let unit = match &d.unit {
                None => {
                    self.error(span.clone(), "missing field `unit`");
                    None
                }
                Some(u) if rtu => self.int_in(u, 1, 247, "unit (on a serial bus)"),
                Some(u) => self.int_in(u, 0, 255, "unit"),
            };
            let interval = self.duration(d.interval.as_ref(), DEFAULT_INTERVAL);
            let heartbeat = self.duration(d.heartbeat.as_ref(), DEFAULT_HEARTBEAT);
            let mut registers: Vec<Register> = Vec::new();
            for r in &d.register {
                let rspan = r.span();
                let r = r.get_ref();
                let name = self
                    .required(&r.name, &rspan, "name")
                    .and_then(|n| self.name(n, "register name"));
                let function = self
                    .required(&r.function, &rspan, "function")
                    .and_then(|f| self.parsed::<Function>(f));
                let address = match &r.address {
                    None => {
                        self.error(rspan.clone(), "missing field `address`");
                        None
                    }
                    Some(a) => self.int_in(a, 0, 65535, "address"),
                };
                let value_type = match (&r.value_type, function) {
                    (None, Some(f)) if f.is_bits() => Some(ValueType::Bool),
                    (None, _) => Some(ValueType::U16),
                    (Some(t), _) => self.parsed::<ValueType>(t),
                };
                let word_order = match &r.word_order {
                    None => Some(WordOrder::Big),
                    Some(w) => self.parsed::<WordOrder>(w),
                };
                let (Some(name), Some(function), Some(address), Some(value_type), Some(word_order)) =
                    (name, function, address, value_type, word_order)
                else {
                    continue;
                };
                let is_bool = value_type == ValueType::Bool;
                if function.is_bits() != is_bool {
                    self.error(
                        rspan.clone(),
                        format!("register {name}: coils and discrete inputs are bool, registers are numbers"),
                    );
                    continue;
                }
                let write = match (&r.write_min, &r.write_max) {
                    (None, None) => None,
                    (Some(lo), Some(hi)) => {
                        if !matches!(function, Function::Holding | Function::Coil) {
                            self.error(lo.span(), format!("register {name}: only holding registers and coils can be written"));
                        }
                        if lo.get_ref() > hi.get_ref() {
                            self.error(
                                hi.span(),
                                format!("register {name}: write_max is below write_min"),
                            );
                        }
                        Some((*lo.get_ref(), *hi.get_ref()))
                    }
                    _ => {
                        self.error(rspan.clone(), format!("register {name}: a writable register needs both write_min and write_max"));
                        None
                    }
                };
                let scale = r.scale.as_ref().map_or(1.0, |x| *x.get_ref());
                if scale == 0.0 {
                    if let Some(x) = &r.scale {
                        self.error(x.span(), "scale must not be zero");
                    }
                }
                let reg = Register {
                    address: u16::try_from(address).unwrap_or(0),
                    name: name.clone(),
                    function,
                    value_type,
                    word_order,
                    scale,
                    offset: r.offset.as_ref().map_or(0.0, |x| *x.get_ref()),
                    unit: r.unit.as_ref().map(|u| u.get_ref().clone()),
                    deadband: r.deadband.as_ref().map_or(0.0, |x| x.get_ref().abs()),
                    write,
                };
                if reg.span().end > 65536 {
                    self.error(
                        rspan.clone(),
                        format!("register {name} runs past address 65535"),
                    );
                    continue;
                }
                if registers.iter().any(|x| x.name == name) {
                    self.error(rspan.clone(), format!("register {name} is defined twice"));
                    continue;
                }
                if let Some(other) = registers.iter().find(|x| {
                    x.function == function
                        && x.span().start < reg.span().end
                        && reg.span().start < x.span().end
                }) {
                    self.error(
                        rspan.clone(),
                        format!(
                            "register {name} overlaps register {} in the same table",
                            other.name
                        ),
                    );
                    continue;
                }
                // Its values are published under its class's policy: a topic the class may
                // not publish is a configuration error, not a denial at every heartbeat.
                let acl = id.as_ref().and_then(|id| {
                    let class = classes.get(&devices.get(id)?.class)?;
                    Some(crate::policy::Acl::for_device(
                        id,
                        &class.publish,
                        &class.subscribe,
                    ))
                });
                if let (Some(acl), Some(id)) = (acl, id.as_ref()) {
                    let topic = format!("ward/{id}/modbus/{name}");
                    if !acl.may_publish(&topic) {
                        self.error(
                            rspan.clone(),
                            format!("register {name}: the class of {id} may not publish {topic}"),
                        );
                        continue;
                    }
                }
                registers.push(reg);
            }
            if d.register.is_empty() {
                self.error(
                    span.clone(),
                    "a modbus device needs at least one [[modbus.device.register]]",
                );
            }
            if let (Some(id), Some(bus), Some(unit)) = (id, bus, unit) {
                if out.iter().any(|x: &ModbusDevice| x.id == id) {
                    self.error(span, format!("modbus device {id} is defined twice"));
                    continue;
                }
                out.push(ModbusDevice {
                    id,
                    bus: bus.name,
                    unit: u8::try_from(unit).unwrap_or(1),
                    interval,
                    heartbeat,
                    registers,
                });
            }
        }
        ModbusConfig {
            buses,
            devices: out,
        }
    }
}
