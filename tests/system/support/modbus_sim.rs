//! A Modbus TCP device simulated in the test process with tokio-modbus's server: register
//! and coil tables per unit, a unit that answers every read with an exception, and a switch
//! that makes it stop answering (requests are held, so the client times out).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

#[derive(Debug, Default)]
pub struct Tables {
    /// (unit, address) → word, for holding and input registers alike.
    pub registers: HashMap<(u8, u16), u16>,
    pub coils: HashMap<(u8, u16), bool>,
    /// Units that answer every request with IllegalDataAddress.
    pub failing_units: HashSet<u8>,
}

#[derive(Debug, Clone)]
pub struct Sim {
    pub addr: SocketAddr,
    pub tables: Arc<Mutex<Tables>>,
    pub silent: Arc<AtomicBool>,
}

struct Service {
    tables: Arc<Mutex<Tables>>,
    silent: Arc<AtomicBool>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Answer;

    fn call(&self, req: Self::Request) -> Self::Future {
        if self.silent.load(Ordering::Relaxed) {
            return Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(ExceptionCode::ServerDeviceBusy)
            });
        }
        let unit = req.slave;
        let mut t = self.tables.lock().unwrap();
        if t.failing_units.contains(&unit) {
            return Box::pin(async { Err(ExceptionCode::IllegalDataAddress) });
        }
        let words = |t: &Tables, a: u16, n: u16| -> Vec<u16> {
            (a..a + n)
                .map(|i| t.registers.get(&(unit, i)).copied().unwrap_or(0))
                .collect()
        };
        let bits = |t: &Tables, a: u16, n: u16| -> Vec<bool> {
            (a..a + n)
                .map(|i| t.coils.get(&(unit, i)).copied().unwrap_or(false))
                .collect()
        };
        let r = match req.request {
            Request::ReadHoldingRegisters(a, n) => {
                Ok(Response::ReadHoldingRegisters(words(&t, a, n)))
            }
            Request::ReadInputRegisters(a, n) => Ok(Response::ReadInputRegisters(words(&t, a, n))),
            Request::ReadCoils(a, n) => Ok(Response::ReadCoils(bits(&t, a, n))),
            Request::ReadDiscreteInputs(a, n) => Ok(Response::ReadDiscreteInputs(bits(&t, a, n))),
            Request::WriteSingleRegister(a, w) => {
                t.registers.insert((unit, a), w);
                Ok(Response::WriteSingleRegister(a, w))
            }
            Request::WriteMultipleRegisters(a, ws) => {
                for (i, w) in ws.iter().enumerate() {
                    t.registers.insert((unit, a + i as u16), *w);
                }
                Ok(Response::WriteMultipleRegisters(a, ws.len() as u16))
            }
            Request::WriteSingleCoil(a, v) => {
                t.coils.insert((unit, a), v);
                Ok(Response::WriteSingleCoil(a, v))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(async move { r })
    }
}

impl Sim {
    /// Listens on a loopback port from the OS.
    pub async fn start() -> Sim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tables = Arc::new(Mutex::new(Tables::default()));
        let silent = Arc::new(AtomicBool::new(false));
        let (t, s) = (tables.clone(), silent.clone());
        tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = |stream, peer| {
                let (tables, silent) = (t.clone(), s.clone());
                async move {
                    accept_tcp_connection(stream, peer, move |_| {
                        Ok(Some(Service {
                            tables: tables.clone(),
                            silent: silent.clone(),
                        }))
                    })
                }
            };
            let _ = server.serve(&on_connected, |_| {}).await;
        });
        Sim {
            addr,
            tables,
            silent,
        }
    }

    /// Serves the same tables over Modbus RTU on the serial device (or pty) at `path`.
    pub fn start_rtu(path: &std::path::Path) -> Sim {
        use tokio_serial::SerialPortBuilderExt;
        let serial = tokio_serial::new(path.to_string_lossy(), 19_200)
            .open_native_async()
            .expect("open the simulator's side of the serial line");
        let tables = Arc::new(Mutex::new(Tables::default()));
        let silent = Arc::new(AtomicBool::new(false));
        let service = Service {
            tables: tables.clone(),
            silent: silent.clone(),
        };
        tokio::spawn(tokio_modbus::server::rtu::Server::new(serial).serve_forever(service));
        Sim {
            addr: "0.0.0.0:0".parse().unwrap(),
            tables,
            silent,
        }
    }

    pub fn set_words(&self, unit: u8, addr: u16, words: &[u16]) {
        let mut t = self.tables.lock().unwrap();
        for (i, w) in words.iter().enumerate() {
            t.registers.insert((unit, addr + i as u16), *w);
        }
    }

    pub fn words(&self, unit: u8, addr: u16, n: u16) -> Vec<u16> {
        let t = self.tables.lock().unwrap();
        (addr..addr + n)
            .map(|i| t.registers.get(&(unit, i)).copied().unwrap_or(0))
            .collect()
    }
}
