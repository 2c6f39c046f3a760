//! The load: devices publishing numbered, timestamped QoS 1 messages over TLS with their own
//! certificates, and a receiver on the upstream broker that times and counts them.
//!
//! Payload: `device index (u32 BE) ‖ seq (u64 BE) ‖ sent (µs since the bench started, u64
//! BE)`, padded to the configured size. One process sends and receives, so one clock times
//! both ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio_util::sync::CancellationToken;

const HEADER: usize = 4 + 8 + 8;

/// Microseconds since the bench started.
pub fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A TLS identity: CA, certificate, key.
#[derive(Debug, Clone)]
pub struct Identity {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn options(id: &str, port: u16, who: &Identity, inflight: u16) -> anyhow::Result<MqttOptions> {
    let tls = wardgate::pki::cert::client_config(&who.ca, &who.cert, &who.key)
        .with_context(|| format!("TLS identity of {id}"))?;
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(60));
    o.set_inflight(inflight);
    o.set_max_packet_size(1 << 20, 1 << 20);
    Ok(o)
}

/// What the receiver saw of one device.
#[derive(Debug, Default)]
struct Seen {
    /// Copies received, by sequence number.
    copies: Vec<u8>,
}

/// Every message the receiver got: (device, seq, sent µs, received µs).
#[derive(Debug, Default)]
pub struct Received {
    seen: Vec<Seen>,
    pub arrivals: Vec<(u64, u64)>,
    pub duplicates: u64,
    pub unique: u64,
}

/// The receiver on the upstream: subscribed to `hospital/#` until `stop`.
pub struct Receiver {
    pub got: Arc<Mutex<Received>>,
    pub count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Receiver {
    pub async fn start(
        port: u16,
        who: &Identity,
        devices: usize,
        stop: CancellationToken,
    ) -> anyhow::Result<Receiver> {
        let mut o = options("bench-receiver", port, who, u16::MAX)?;
        o.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(o, 1024);
        let got = Arc::new(Mutex::new(Received {
            seen: (0..devices).map(|_| Seen::default()).collect(),
            ..Received::default()
        }));
        let count = Arc::new(AtomicU64::new(0));
        client.subscribe("hospital/#", QoS::AtLeastOnce).await?;
        // Subscribed before any load starts.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let polled = tokio::time::timeout_at(deadline.into(), eventloop.poll())
                .await
                .context("the receiver could not subscribe upstream in 20 s")?;
            if let Event::Incoming(Packet::SubAck(_)) = polled? {
                break;
            }
        }
        let task = {
            let (got, count) = (got.clone(), count.clone());
            tokio::spawn(async move {
                let _client = client;
                loop {
                    let event = tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        e = eventloop.poll() => e?,
                    };
                    let Event::Incoming(Packet::Publish(p)) = event else {
                        continue;
                    };
                    let at = now_us();
                    if p.topic.contains("/_gateway/") || p.payload.len() < HEADER {
                        continue; // the gateway's audit stream
                    }
                    let b = &p.payload;
                    let device = u32::from_be_bytes(b[0..4].try_into()?) as usize;
                    let seq = usize::try_from(u64::from_be_bytes(b[4..12].try_into()?))?;
                    let sent = u64::from_be_bytes(b[12..20].try_into()?);
                    let mut g = got
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let Some(seen) = g.seen.get_mut(device) else {
                        continue;
                    };
                    if seen.copies.len() <= seq {
                        seen.copies.resize(seq + 1, 0);
                    }
                    seen.copies[seq] = seen.copies[seq].saturating_add(1);
                    if seen.copies[seq] > 1 {
                        g.duplicates += 1;
                    } else {
                        g.unique += 1;
                        g.arrivals.push((sent, at));
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Ok(Receiver { got, count, task })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.task.abort();
        match self.task.await {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The devices' side: how many each sent, and their errors.
#[derive(Debug, Default)]
pub struct Sent {
    pub messages: AtomicU64,
    pub errors: Mutex<Vec<String>>,
}

/// One publishing device: `rate` messages/s of `size` bytes until `stop`, starting at
/// `phase` into its first period.
#[allow(clippy::too_many_arguments)]
async fn device(
    index: usize,
    id: String,
    port: u16,
    who: Identity,
    rate: f64,
    size: usize,
    phase: Duration,
    stop: CancellationToken,
    sent: Arc<Sent>,
) {
    let run = async {
        let (client, mut eventloop) = AsyncClient::new(options(&id, port, &who, 100)?, 64);
        // Connected before it counts.
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                break;
            }
        }
        let poller = tokio::spawn(async move {
            loop {
                eventloop.poll().await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), rumqttc::ConnectionError>(())
        });
        let period = Duration::from_secs_f64(1.0 / rate);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let topic = format!("ward/{id}/vitals/hr");
        let mut seq: u64 = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mut payload = Vec::with_capacity(size.max(HEADER));
            payload.extend_from_slice(&u32::try_from(index)?.to_be_bytes());
            payload.extend_from_slice(&seq.to_be_bytes());
            payload.extend_from_slice(&now_us().to_be_bytes());
            payload.resize(size.max(HEADER), b'.');
            tokio::select! {
                () = stop.cancelled() => break,
                r = client.publish(&topic, QoS::AtLeastOnce, false, payload) => r?,
            }
            seq += 1;
            sent.messages.fetch_add(1, Ordering::Relaxed);
            if poller.is_finished() {
                break;
            }
        }
        if poller.is_finished() {
            return match poller.await? {
                Err(e) => Err(anyhow::Error::from(e)),
                Ok(()) => Ok(()),
            };
        }
        // Let the last acknowledgements come in; the session ends with the task.
        tokio::time::sleep(Duration::from_millis(200)).await;
        poller.abort();
        Ok::<(), anyhow::Error>(())
    };
    if let Err(e) = run.await {
        sent.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(format!("{id}: {e}"));
    }
}

/// `devices` devices (`dev-0` …) publishing `rate` messages/s in all, `size` bytes each,
/// until `stop`.
pub fn start_devices(
    port: u16,
    identities: &[Identity],
    rate: f64,
    size: usize,
    stop: &CancellationToken,
) -> anyhow::Result<(Arc<Sent>, Vec<tokio::task::JoinHandle<()>>)> {
    if identities.is_empty() {
        bail!("no devices");
    }
    let sent = Arc::new(Sent::default());
    let per_device = rate / identities.len() as f64;
    let period = 1.0 / per_device;
    let tasks = identities
        .iter()
        .enumerate()
        .map(|(i, who)| {
            let phase = Duration::from_secs_f64(period * i as f64 / identities.len() as f64);
            tokio::spawn(device(
                i,
                format!("dev-{i}"),
                port,
                who.clone(),
                per_device,
                size,
                phase,
                stop.clone(),
                sent.clone(),
            ))
        })
        .collect();
    Ok((sent, tasks))
}
