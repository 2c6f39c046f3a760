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
                        () = stop.cancelled() => return Ok::<(), anyhow::Error>(()),
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

/// The devices' side: how many they sent, how many of each device's were acknowledged,
/// and their errors.
#[derive(Debug, Default)]
pub struct Sent {
    pub messages: AtomicU64,
    /// How many of each device's messages were acknowledged: with `reconnect`, its
    /// sequence numbers below this, exactly (one message in flight, sent again until
    /// acknowledged); otherwise unused.
    pub acked: Vec<AtomicU64>,
    pub errors: Mutex<Vec<String>>,
}

impl Received {
    /// How many of `device`'s sequence numbers below `n` never arrived.
    pub fn missing_below(&self, device: usize, n: u64) -> u64 {
        let copies = self.seen.get(device).map_or(&[][..], |s| &s.copies[..]);
        (0..usize::try_from(n).unwrap_or(usize::MAX))
            .filter(|&seq| copies.get(seq).is_none_or(|&c| c == 0))
            .count() as u64
    }
}

/// How long a device that lost its connection waits before its client reconnects.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

fn payload(index: usize, seq: u64, size: usize) -> anyhow::Result<Vec<u8>> {
    let mut payload = Vec::with_capacity(size.max(HEADER));
    payload.extend_from_slice(&u32::try_from(index)?.to_be_bytes());
    payload.extend_from_slice(&seq.to_be_bytes());
    payload.extend_from_slice(&now_us().to_be_bytes());
    payload.resize(size.max(HEADER), b'.');
    Ok(payload)
}

/// A device that survives restarts of the target and knows exactly what was
/// acknowledged: one message in flight, sent again (the same bytes) after every reconnect
/// until its PUBACK comes (rumqttc drops what is unacknowledged when it reconnects to a
/// clean session), the next one only then, at most `rate` a second.
async fn stop_and_wait_device(d: DeviceLoad) {
    let DeviceLoad {
        index,
        id,
        port,
        who,
        rate,
        size,
        phase,
        stop,
        sent,
    } = d;
    let run = async {
        let (client, mut eventloop) = AsyncClient::new(options(&id, port, &who, 1)?, 8);
        // Polled in a task of its own: a poll is never cancelled midway.
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let _poller = AbortOnDrop(tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(Event::Incoming(p @ (Packet::PubAck(_) | Packet::ConnAck(_)))) => p,
                    Ok(_) => continue,
                    // The target is restarting: the next poll reconnects.
                    Err(_) => {
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                        continue;
                    }
                };
                if events_tx.send(event).is_err() {
                    return;
                }
            }
        }));
        let topic = format!("ward/{id}/vitals/hr");
        let period = Duration::from_secs_f64(1.0 / rate);
        let mut next_at = tokio::time::Instant::now() + phase;
        let mut seq: u64 = 0;
        // The message in flight, if any.
        let mut waiting: Option<Vec<u8>> = None;
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return Ok::<(), anyhow::Error>(()),
                () = tokio::time::sleep_until(next_at), if waiting.is_none() => {
                    let message = payload(index, seq, size)?;
                    client.try_publish(&topic, QoS::AtLeastOnce, false, message.clone())?;
                    sent.messages.fetch_add(1, Ordering::Relaxed);
                    waiting = Some(message);
                    next_at += period;
                    continue;
                }
                e = events.recv() => e,
            };
            match event {
                Some(Packet::PubAck(_)) => {
                    if waiting.take().is_some() {
                        seq += 1;
                        if let Some(a) = sent.acked.get(index) {
                            a.store(seq, Ordering::Relaxed);
                        }
                    }
                }
                // Connected again: what was in flight goes again.
                Some(_) => {
                    if let Some(message) = &waiting {
                        client.try_publish(&topic, QoS::AtLeastOnce, false, message.clone())?;
                    }
                }
                None => anyhow::bail!("the client's event loop ended"),
            }
        }
    };
    if let Err(e) = run.await {
        sent.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(format!("{id}: {e:#}"));
    }
}

/// What one device of the load is: its place, identity, share of the rate, and where it
/// counts what it sent.
struct DeviceLoad {
    index: usize,
    id: String,
    port: u16,
    who: Identity,
    rate: f64,
    size: usize,
    /// How far into its first period it starts, so that the devices' sends spread.
    phase: Duration,
    stop: CancellationToken,
    sent: Arc<Sent>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One publishing device: `rate` messages/s of `size` bytes until `stop`, starting at
/// `phase` into its first period.
async fn device(d: DeviceLoad) {
    let DeviceLoad {
        index,
        id,
        port,
        who,
        rate,
        size,
        phase,
        stop,
        sent,
    } = d;
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
            tokio::select! {
                () = stop.cancelled() => break,
                r = client.publish(&topic, QoS::AtLeastOnce, false, payload(index, seq, size)?) => r?,
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
/// until `stop`; with `reconnect`, stop-and-wait devices that survive restarts of the
/// target and count exactly what was acknowledged.
pub fn start_devices(
    port: u16,
    identities: &[Identity],
    rate: f64,
    size: usize,
    stop: &CancellationToken,
    reconnect: bool,
) -> anyhow::Result<(Arc<Sent>, Vec<tokio::task::JoinHandle<()>>)> {
    if identities.is_empty() {
        bail!("no devices");
    }
    let sent = Arc::new(Sent {
        acked: identities.iter().map(|_| AtomicU64::new(0)).collect(),
        ..Sent::default()
    });
    let per_device = rate / identities.len() as f64;
    let period = 1.0 / per_device;
    let tasks = identities
        .iter()
        .enumerate()
        .map(|(i, who)| {
            let d = DeviceLoad {
                index: i,
                id: format!("dev-{i}"),
                port,
                who: who.clone(),
                rate: per_device,
                size,
                phase: Duration::from_secs_f64(period * i as f64 / identities.len() as f64),
                stop: stop.clone(),
                sent: sent.clone(),
            };
            if reconnect {
                tokio::spawn(stop_and_wait_device(d))
            } else {
                tokio::spawn(device(d))
            }
        })
        .collect();
    Ok((sent, tasks))
}
