//! `[admin] metrics_listen` (loopback by default): `GET /metrics`, the gateway's metrics
//! in OpenMetrics text (see [`crate::metrics`]), and `GET /health`, whether messages are
//! moving and why not ([`crate::progress`]), 200 when ready and 503 otherwise. `GET
//! /health/working` is narrower: 200 unless a stage of the gateway itself is stuck (the
//! verdict the watchdog follows), so an outage of the hospital's network does not fail it;
//! the update agent's trial checks it, so that a good slot is not rolled back because the
//! network was down while it was tried. Plain HTTP: put it on a management network only
//! through the firewall's `management_ports`.
//!
//! A hostile or broken scraper gets little: at most [`MAX_CONNECTIONS`] connections at
//! once (more are closed at once), [`HEADER_TIMEOUT`] to send its request head, GET only,
//! two paths. The levels a scrape reads are gathered off the async workers (the firewall's
//! counters come from `nft`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::edge::EdgeHandle;
use crate::events::Events;
use crate::firewall::live::LiveFirewall;
use crate::metrics::{Levels, CONTENT_TYPE};
use crate::policy::Priority;
use crate::progress::{Backlog, Health, Progress};
use crate::quarantine::Quarantine;
use crate::registry::SharedRegistry;
use crate::spool::Spool;

/// Connections served at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 8;
/// The pause after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a scrape and a health check read.
#[derive(Debug, Clone)]
pub struct Sources {
    pub events: Events,
    pub progress: Arc<Progress>,
    pub edge: EdgeHandle,
    pub spool: Spool,
    pub registry: SharedRegistry,
    pub quarantine: Arc<Quarantine>,
    pub firewall: Option<Arc<LiveFirewall>>,
}

impl Sources {
    /// The health verdict now.
    pub fn health(&self) -> Health {
        let waiting = self.spool.levels().by_priority.iter().map(|(r, _)| r).sum();
        self.progress.health(Backlog { records: waiting })
    }

    /// Everything a scrape reads from the live state, with the firewall's counters
    /// (`drops`, read before: they come from `nft`). Blocks on the spool's lock.
    pub fn levels(&self, drops: Vec<(String, u64, u64)>) -> Levels {
        let (rss, fds) = process();
        Levels {
            firewall_drops: drops,
            resident_memory_bytes: rss,
            open_fds: fds,
            ..self.levels_light()
        }
    }

    /// The levels without the firewall's counters and the process's figures.
    pub fn levels_light(&self) -> Levels {
        let spool = self.spool.levels();
        let stats = self.spool.stats();
        let mut connected: Vec<_> = self.edge.connected().into_iter().map(|(d, _)| d).collect();
        connected.dedup();
        let health = self.progress.health(Backlog {
            records: stats.records as u64,
        });
        Levels {
            devices_registered: self
                .registry
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .list()
                .len() as u64,
            devices_connected: connected.len() as u64,
            devices_quarantined: self.quarantine.list().len() as u64,
            spool: Priority::ALL
                .iter()
                .map(|p| {
                    let (records, bytes) = spool.by_priority[*p as usize];
                    (p.name(), records, bytes)
                })
                .collect(),
            spool_oldest_age: spool.oldest_age.map_or(0.0, |a| a.as_secs_f64()),
            spool_set_aside_records: stats.rejected,
            uplink_connected: self.progress.is_uplink_connected(),
            uplink_in_flight: self.progress.uplink_in_flight_now(),
            uplink_last_ack_age: self.progress.uplink_last_ack_age().map(|a| a.as_secs_f64()),
            ready: health.ready,
            ..Levels::default()
        }
    }
}

/// The process's resident memory (bytes) and open file descriptors, from /proc.
fn process() -> (u64, u64) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    (rss, fds)
}

/// Serves until `shutdown`.
pub async fn run(listener: TcpListener, sources: Sources, shutdown: CancellationToken) {
    let sources = Arc::new(sources);
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(event = "exporter.accept_failed", error = %e);
                    // Out of descriptors or similar: pause, so a persistent error does not
                    // spin this loop (as the edge's accept loop does).
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let (sources, open, shutdown) = (sources.clone(), open.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let sources = sources.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&sources, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn answer(
    sources: &Arc<Sources>,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let s = sources.clone();
    match req.uri().path() {
        "/metrics" => {
            let drops = match &s.firewall {
                Some(f) => f.drops().await,
                None => Vec::new(),
            };
            let text =
                tokio::task::spawn_blocking(move || s.events.metrics().encode(s.levels(drops)))
                    .await
                    .unwrap_or_default();
            reply(StatusCode::OK, CONTENT_TYPE, text)
        }
        path @ ("/health" | "/health/working") => {
            let working = path == "/health/working";
            let health = tokio::task::spawn_blocking(move || s.health())
                .await
                .unwrap_or_else(|e| Health {
                    ready: false,
                    stalled: false,
                    reasons: vec![format!("health could not be judged: {e}")],
                });
            let ok = if working {
                !health.stalled
            } else {
                health.ready
            };
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::to_string(&health).unwrap_or_default() + "\n";
            reply(status, "application/json", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "/metrics, /health or /health/working\n".into(),
        ),
    }
}
