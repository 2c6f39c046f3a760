//! One bus: its connection, the schedule of its devices, their writes.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::Duration;

use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;
use tokio_util::sync::CancellationToken;

use super::{
    Bus, BusKind, Function, ModbusDevice, Parity, Register, Sink, Value, WriteJob, MAX_BACKOFF,
};
use crate::clock::now_ms;
use crate::events::ModbusFailure;
use crate::ingest::{Message, Refused};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    #[error("timeout")]
    Timeout,
    #[error("exception {0}")]
    Exception(String),
    /// Connection, CRC, framing: the link is rebuilt before the next request.
    #[error("error {0}")]
    Error(String),
}

struct DeviceState {
    device: ModbusDevice,
    due: Instant,
    failures: u32,
    silent: bool,
    /// Per register: the last value published and when.
    published: HashMap<String, (Value, Instant)>,
}

pub(super) async fn run_bus(
    bus: Bus,
    devices: Vec<ModbusDevice>,
    sink: Sink,
    mut writes: mpsc::Receiver<WriteJob>,
    shutdown: CancellationToken,
) {
    let now = Instant::now();
    let mut states: Vec<DeviceState> = devices
        .into_iter()
        .map(|device| DeviceState {
            device,
            due: now,
            failures: 0,
            silent: false,
            published: HashMap::new(),
        })
        .collect();
    let mut link: Option<Context> = None;
    let mut writes_open = true;
    tracing::info!(
        event = "modbus.bus_started",
        bus = bus.name,
        devices = states.len(),
        "Modbus bus polling"
    );
    loop {
        // The device due first; ties go to the one listed first, so every device gets its turn.
        let Some(next) = (0..states.len()).min_by_key(|i| states[*i].due) else {
            return;
        };
        let due = states[next].due;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            job = writes.recv(), if writes_open => match job {
                Some(job) => {
                    let result = write(&bus, &mut link, &job).await;
                    let _ = job.done.send(result);
                }
                // No one can ask for writes any more (no uplink): keep polling.
                None => writes_open = false,
            },
            _ = tokio::time::sleep_until(due) => {
                poll_device(&bus, &mut link, &mut states[next], &sink).await;
            }
        }
    }
}

/// Opens the bus's link if it is not open.
async fn connect<'a>(bus: &Bus, link: &'a mut Option<Context>) -> Result<&'a mut Context, Failure> {
    if link.is_none() {
        let ctx = match &bus.kind {
            BusKind::Tcp(addr) => {
                let stream = timeout(bus.timeout, tokio::net::TcpStream::connect(addr.as_str()))
                    .await
                    .map_err(|_| Failure::Timeout)?
                    .map_err(|e| Failure::Error(format!("connect {addr}: {e}")))?;
                let _ = stream.set_nodelay(true);
                tokio_modbus::client::tcp::attach(stream)
            }
            BusKind::Rtu {
                path,
                baud,
                parity,
                stop_bits,
                data_bits,
            } => {
                use tokio_serial::SerialPortBuilderExt;
                let port = tokio_serial::new(path.to_string_lossy(), *baud)
                    .parity(match parity {
                        Parity::None => tokio_serial::Parity::None,
                        Parity::Even => tokio_serial::Parity::Even,
                        Parity::Odd => tokio_serial::Parity::Odd,
                    })
                    .stop_bits(if *stop_bits == 2 {
                        tokio_serial::StopBits::Two
                    } else {
                        tokio_serial::StopBits::One
                    })
                    .data_bits(if *data_bits == 7 {
                        tokio_serial::DataBits::Seven
                    } else {
                        tokio_serial::DataBits::Eight
                    })
                    .open_native_async()
                    .map_err(|e| Failure::Error(format!("open {}: {e}", path.display())))?;
                tokio_modbus::client::rtu::attach(port)
            }
        };
        *link = Some(ctx);
    }
    link.as_mut()
        .ok_or_else(|| Failure::Error("no link".into()))
}

/// Runs one request under the bus timeout; a timeout or link error closes the link (a late
/// answer must not be taken for the next request's).
async fn request<T, F>(bus: &Bus, link: &mut Option<Context>, unit: u8, f: F) -> Result<T, Failure>
where
    F: for<'c> FnOnce(
        &'c mut Context,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = tokio_modbus::Result<T>> + Send + 'c>,
    >,
{
    let ctx = connect(bus, link).await?;
    ctx.set_slave(Slave(unit));
    let result = match timeout(bus.timeout, f(ctx)).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Err(e)) => Err(Failure::Error(e.to_string())),
        Ok(Ok(Err(code))) => Err(Failure::Exception(format!("{code:?}"))),
        Ok(Ok(Ok(v))) => Ok(v),
    };
    if matches!(result, Err(Failure::Timeout | Failure::Error(_))) {
        *link = None;
    }
    result
}

async fn read(
    bus: &Bus,
    link: &mut Option<Context>,
    unit: u8,
    r: &Register,
) -> Result<Value, Failure> {
    let (addr, n) = (r.address, r.value_type.width());
    match r.function {
        Function::Coil | Function::Discrete => {
            let coil = r.function == Function::Coil;
            let bits = request(bus, link, unit, move |c| {
                if coil {
                    c.read_coils(addr, n)
                } else {
                    c.read_discrete_inputs(addr, n)
                }
            })
            .await?;
            bits.first()
                .map(|b| Value::Bool(*b))
                .ok_or_else(|| Failure::Error("empty answer".into()))
        }
        Function::Holding | Function::Input => {
            let holding = r.function == Function::Holding;
            let words = request(bus, link, unit, move |c| {
                if holding {
                    c.read_holding_registers(addr, n)
                } else {
                    c.read_input_registers(addr, n)
                }
            })
            .await?;
            let raw =
                super::value::decode(r.value_type, r.word_order, &words).ok_or_else(|| {
                    Failure::Error(format!("{} words for a {:?}", words.len(), r.value_type))
                })?;
            Ok(Value::Number(raw * r.scale + r.offset))
        }
    }
}

async fn write(bus: &Bus, link: &mut Option<Context>, job: &WriteJob) -> Result<(), Failure> {
    let addr = job.register.address;
    match (job.register.function, job.coil) {
        (Function::Coil, Some(v)) => {
            request(bus, link, job.unit, move |c| c.write_single_coil(addr, v)).await
        }
        (Function::Holding, None) if job.words.len() == 1 => {
            let w = job.words[0];
            request(bus, link, job.unit, move |c| {
                c.write_single_register(addr, w)
            })
            .await
        }
        (Function::Holding, None) => {
            let words = job.words.clone();
            request(bus, link, job.unit, move |c| {
                Box::pin(async move { c.write_multiple_registers(addr, &words).await })
            })
            .await
        }
        _ => Err(Failure::Error("register cannot be written".into())),
    }
}

fn backoff(interval: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX);
    interval
        .saturating_mul(factor)
        .min(MAX_BACKOFF.max(interval))
}

async fn poll_device(bus: &Bus, link: &mut Option<Context>, st: &mut DeviceState, sink: &Sink) {
    let d = st.device.clone();
    let mut values = Vec::new();
    let mut failure = None;
    for r in &d.registers {
        match read(bus, link, d.unit, r).await {
            Ok(v) => values.push((r, v)),
            Err(f) => {
                let kind = match f {
                    Failure::Timeout => ModbusFailure::Timeout,
                    Failure::Exception(_) => ModbusFailure::Exception,
                    Failure::Error(_) => ModbusFailure::Other,
                };
                sink.events
                    .modbus_read_failed(&bus.name, &d.id, &r.name, kind, &f);
                failure = Some(format!("register {}: {f}", r.name));
                break;
            }
        }
    }
    let now = Instant::now();
    match failure {
        None => {
            sink.events.modbus_polled(&bus.name, &d.id, st.silent);
            st.failures = 0;
            st.silent = false;
            st.due = now + d.interval;
            for (r, v) in values {
                let publish = match st.published.get(&r.name) {
                    None => true,
                    Some((last, at)) => {
                        now.duration_since(*at) >= d.heartbeat
                            || match (last, v) {
                                (Value::Number(a), Value::Number(b)) => (a - b).abs() > r.deadband,
                                (a, b) => *a != b,
                            }
                    }
                };
                if publish {
                    let value = match v {
                        Value::Number(n) => serde_json::json!(n),
                        Value::Bool(b) => serde_json::json!(b),
                    };
                    let body = serde_json::json!({
                        "value": value,
                        "unit": r.unit,
                        "ts": now_ms(),
                        "quality": "good",
                    });
                    emit(sink, &d, r, &body);
                    st.published.insert(r.name.clone(), (v, now));
                }
            }
        }
        Some(reason) => {
            st.failures += 1;
            st.due = now + backoff(d.interval, st.failures);
            if !st.silent {
                st.silent = true;
                sink.events.modbus_device_silent(&bus.name, &d.id, &reason);
                for r in &d.registers {
                    let body = serde_json::json!({
                        "value": null,
                        "unit": r.unit,
                        "ts": now_ms(),
                        "quality": "bad",
                        "error": reason,
                    });
                    emit(sink, &d, r, &body);
                    st.published.remove(&r.name);
                }
            }
        }
    }
}

/// Publishes one value through the device's class policy: spool, then local subscribers.
fn emit(sink: &Sink, d: &ModbusDevice, r: &Register, body: &serde_json::Value) {
    let topic = format!("ward/{}/modbus/{}", d.id, r.name);
    let grant = sink
        .registry
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .grant(&d.id);
    let Some(grant) = grant else {
        tracing::warn!(event = "modbus.unregistered", device = %d.id, "Modbus device no longer registered; value dropped");
        return;
    };
    let payload = bytes::Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let m = Message {
        topic: &topic,
        payload: &payload,
        qos: 1,
        properties: None,
    };
    // Nobody waits for it to be durable: a Modbus device has no acknowledgement to get.
    match sink.ingest.device(&d.id, &grant, m) {
        Ok(_) => {}
        Err(Refused::Policy(v)) => {
            sink.events.modbus_publish_denied(&d.id, &topic, &v);
            return;
        }
        // The spool has counted and logged the refusal.
        Err(Refused::Spool(_)) => return,
    }
    // Retained: a display that subscribes later gets each register's latest value at once.
    if let Err(e) = sink
        .local
        .try_publish(topic, QoS::AtLeastOnce, true, payload)
    {
        tracing::warn!(event = "modbus.local_publish_failed", device = %d.id, error = %e, "value not delivered to local subscribers");
    }
}
