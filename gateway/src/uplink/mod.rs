//! The uplink: forwards the spool to the hospital's upstream broker, and commands back.
//!
//! - MQTT 5 over TLS (rumqttc, ring), with the gateway's own client certificate.
//! - Each connection attempt gets a fresh rumqttc client with a clean start, so rumqttc
//!   never retransmits on its own: the spool is the outbox, and everything not yet
//!   acknowledged is sent again, in order, after every reconnect.
//! - Drain order is the spool's key order: alarms, then vitals, then routine, oldest first.
//!   At most `inflight` publishes are unacknowledged at once, and at most `replay_rate`
//!   are sent per second, so a backlog after an outage drains at a known pace.
//! - Every record goes upstream at QoS 1 on `{prefix}/{site}/{gateway}/{device}/{rest}`
//!   (see [`TopicMap`]: `rest` is the device topic after `ward/{device}/`, or the whole
//!   topic otherwise),
//!   with MQTT 5 user properties `wardgate-seq` (the gateway sequence number: with the
//!   gateway id in the topic, a key the upstream can drop duplicates by),
//!   `wardgate-received-at` (ms since the epoch), `wardgate-priority` and `wardgate-qos`.
//!   The payload is untouched.
//! - A record is removed from the spool only when the PUBACK for its packet id arrives;
//!   `publish()` returning means only "queued", so packet ids are learnt from rumqttc's
//!   `Outgoing::Publish(pkid)` events, which come in the order the publishes were queued.
//! - A record the upstream refuses (a PUBACK reason other than success), or one that could
//!   not be published at all (its topic or packet over the limits: rumqttc would write a
//!   wrong length or fail the connection), is set aside ([`Spool::reject`]) and leaves the
//!   window at once: one refused record never holds back the ones behind it.
//! - Commands: the uplink subscribes to `{prefix}/{site}/{gateway}/+/cmd/#` with No Local
//!   (its own publishes never come back as commands; the edge also refuses device topics
//!   that would map there), and hands each command to the router ([`crate::commands`]),
//!   which delivers it to a device, a Modbus register or the update agent, or refuses it.
//!
//! Tested by the system tests against a real mosquitto with TLS (`tests/system/uplink.rs`).

mod pace;
mod window;

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAckReason, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio_util::sync::CancellationToken;

use crate::config::UplinkConfig;
use crate::pki::cert;
use crate::spool::{Key, Reads, Record, Spool};
pub use crate::topics::{TopicMap, UnmappableTopic, MAX_TOPIC_LEN};
use pace::{Backoff, Pace};

/// How long a connection attempt (TCP, TLS, CONNACK) may take.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// Largest packet accepted from upstream (commands).
const MAX_INCOMING: u32 = 1 << 20;
/// MQTT's largest packet: a remaining length of at most 268,435,455 bytes, plus its header.
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// Everything the uplink needs.
#[derive(Debug, Clone)]
pub struct Uplink {
    pub config: UplinkConfig,
    /// Device topics to upstream topics and back (the edge checks with the same map).
    pub topics: TopicMap,
    pub spool: Spool,
    /// True while a session with the upstream broker is up (for `wardgate status`).
    pub connected: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Where commands from upstream go.
    pub commands: crate::commands::Commands,
    pub events: crate::events::Events,
}

impl Uplink {
    fn options(&self) -> Result<MqttOptions, cert::ClientTlsError> {
        let c = &self.config;
        let tls = cert::client_config(&c.ca, &c.cert, &c.key)?;
        let mut o = MqttOptions::new(&c.client_id, &c.host, c.port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        o.set_keep_alive(c.keep_alive);
        o.set_clean_start(true);
        o.set_connection_timeout(CONNECT_TIMEOUT_SECS);
        o.set_max_packet_size(Some(MAX_INCOMING));
        o.set_outgoing_inflight_upper_limit(u16::try_from(c.inflight).unwrap_or(u16::MAX));
        Ok(o)
    }

    /// Connects, forwards, reconnects with backoff, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let commands = &self.commands;
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let mut pace = Pace::new(self.config.replay_rate);
        let progress = self.events.progress().clone();
        progress.uplink_configured();
        loop {
            progress.uplink_attempt(backoff.ceiling());
            let options = match self.options() {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(event = "uplink.tls_failed", error = %e, "uplink TLS material unusable");
                    if sleep_or_stop(backoff.next(), &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let (client, mut eventloop) = AsyncClient::new(options, self.config.inflight + 16);
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = wait_connack(&mut eventloop) => r,
            };
            let max_packet = match connected {
                Ok(max) => max,
                Err(e) => {
                    let delay = backoff.next();
                    tracing::warn!(
                        event = "uplink.connect_failed",
                        host = %self.config.host,
                        port = self.config.port,
                        error = %e,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "upstream broker unreachable"
                    );
                    if sleep_or_stop(delay, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            self.connected
                .store(true, std::sync::atomic::Ordering::Relaxed);
            progress.uplink_connected(true);
            self.events.metrics().uplink_connects.inc();
            let backlog = self.spool.stats().records;
            tracing::info!(
                event = "uplink.connected",
                host = %self.config.host,
                port = self.config.port,
                backlog,
                "connected to the upstream broker"
            );
            let mut commands_filter = Filter::new(self.topics.command_filter(), QoS::AtLeastOnce);
            commands_filter.nolocal = true;
            if let Err(e) = client.try_subscribe_many([commands_filter]) {
                tracing::error!(event = "uplink.subscribe_failed", error = %e, "cannot subscribe to commands");
            }
            // The eventloop runs in a task of its own and reports through a channel, so that
            // the session can wait on other things without ever cancelling a poll.
            let (events_tx, mut events) = tokio::sync::mpsc::channel(self.config.inflight * 2 + 64);
            let poller = tokio::spawn(async move {
                loop {
                    let event = eventloop.poll().await;
                    let failed = event.is_err();
                    if events_tx.send(event).await.is_err() || failed {
                        return;
                    }
                }
            });
            let reason = self
                .session(
                    &client,
                    &mut events,
                    &mut pace,
                    commands,
                    max_packet,
                    &shutdown,
                )
                .await;
            self.connected
                .store(false, std::sync::atomic::Ordering::Relaxed);
            progress.uplink_connected(false);
            match reason {
                None => {
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(1), poller).await;
                    return;
                }
                Some(reason) => {
                    poller.abort();
                    let delay = backoff.next();
                    tracing::warn!(
                        event = "uplink.disconnected",
                        reason,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "upstream connection lost; unacknowledged records will be sent again"
                    );
                    if sleep_or_stop(delay, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// One connected session. Returns `None` on shutdown, or why the connection ended.
    async fn session(
        &self,
        client: &AsyncClient,
        events: &mut tokio::sync::mpsc::Receiver<Result<Event, rumqttc::v5::ConnectionError>>,
        pace: &mut Pace,
        commands: &crate::commands::Commands,
        max_packet: usize,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let mut window = window::Window::new(self.config.inflight);
        // What the spool held when this session began is the backlog: it drains at
        // `replay_rate`; what arrives from now on is sent as it comes.
        let backlog_below = self.spool.next_seq();
        loop {
            let appended = self.spool.appended();
            tokio::pin!(appended);
            // Register for the wake-up before looking, so an append in between is not missed.
            appended.as_mut().enable();
            let mut idle = false;
            let mut paced = None;
            let room = window.room();
            if room > 0 {
                let budget = pace.available(room);
                let next = |reads| {
                    self.spool.next_batch_paced(
                        room,
                        window.in_flight(),
                        backlog_below,
                        budget,
                        reads,
                    )
                };
                // Recent records come from memory; older ones (a backlog) from the disk,
                // which may block: off this async worker.
                let mut batch = next(Reads::Memory);
                if batch.records.is_empty() && batch.on_disk {
                    batch = tokio::task::block_in_place(|| next(Reads::Disk));
                }
                if batch.paced {
                    paced = Some(pace.next_at());
                }
                idle = batch.records.is_empty() && !batch.paced && !batch.on_disk;
                for (key, record) in batch.records {
                    let publish = match self.prepare(key, &record, max_packet) {
                        Ok(p) => p,
                        Err(reason) => {
                            self.spool.reject(key, &reason);
                            continue;
                        }
                    };
                    let Publish {
                        topic,
                        payload,
                        properties,
                        ..
                    } = publish;
                    let queued_ok = client.try_publish_with_properties(
                        String::from_utf8_lossy(&topic),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                        properties.unwrap_or_default(),
                    );
                    if let Err(e) = queued_ok {
                        return Some(format!("cannot queue a publish: {e}"));
                    }
                    if key.seq < backlog_below {
                        pace.take();
                    }
                    window.sent(key);
                }
                self.events.progress().uplink_in_flight(window.len());
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                event = events.recv() => {
                    let mut event = event.unwrap_or_else(|| Err(rumqttc::v5::ConnectionError::RequestsDone));
                    // Every event already waiting is taken before the spool is read again:
                    // one batch per burst of acknowledgements, not one per acknowledgement.
                    loop {
                        if let Err(reason) = self.on_event(event, &mut window, commands) {
                            return Some(reason);
                        }
                        match events.try_recv() {
                            Ok(next) => event = next,
                            Err(_) => break,
                        }
                    }
                }
                _ = &mut appended, if idle => {}
                _ = tokio::time::sleep_until(paced.unwrap_or_else(tokio::time::Instant::now)), if paced.is_some() => {}
            }
        }
    }

    /// One event of the upstream session; `Err` ends the session with its reason.
    fn on_event(
        &self,
        event: Result<Event, rumqttc::v5::ConnectionError>,
        window: &mut window::Window,
        commands: &crate::commands::Commands,
    ) -> Result<(), String> {
        match event {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => window.numbered(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let Some((key, latency)) = window.acknowledged(ack.pkid) else {
                    return Ok(());
                };
                let (progress, metrics) = (self.events.progress(), self.events.metrics());
                progress.uplink_acknowledged();
                progress.uplink_in_flight(window.len());
                metrics.uplink_delivered.inc();
                metrics.uplink_puback_latency.observe(latency.as_secs_f64());
                if matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ) {
                    self.spool.remove(key);
                } else {
                    self.spool
                        .reject(key, &format!("upstream answered PUBACK {:?}", ack.reason));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                tracing::info!(
                    event = "uplink.commands_subscribed",
                    "subscribed to commands from upstream"
                );
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                commands.deliver(&p.topic, p.payload.clone());
            }
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
        Ok(())
    }

    /// The upstream PUBLISH of a record, or why it cannot be published (the topic or the
    /// packet would exceed MQTT's or the upstream's limits).
    fn prepare(&self, key: Key, record: &Record, max_packet: usize) -> Result<Publish, String> {
        self.topics
            .check(&record.device, &record.topic)
            .map_err(|e| e.to_string())?;
        let topic = self.topics.upstream(&record.device, &record.topic);
        // The device's own properties (MQTT 5) first, then the gateway's: a device cannot
        // set names under `wardgate-` (the edge refuses them).
        let p = &record.properties;
        let mut user_properties = p.user.clone();
        user_properties.extend([
            ("wardgate-seq".into(), key.seq.to_string()),
            (
                "wardgate-received-at".into(),
                record.received_at_ms.to_string(),
            ),
            ("wardgate-priority".into(), key.priority.name().into()),
            ("wardgate-qos".into(), record.qos.to_string()),
        ]);
        // What is left of its Message Expiry Interval (the spool expires it at 0).
        let message_expiry_interval = p.expiry_secs.map(|e| {
            let age_secs = crate::clock::now_ms().saturating_sub(record.received_at_ms) / 1000;
            u32::try_from(u64::from(e).saturating_sub(age_secs).max(1)).unwrap_or(e)
        });
        let properties = PublishProperties {
            user_properties,
            content_type: p.content_type.clone(),
            payload_format_indicator: p.utf8.then_some(1),
            message_expiry_interval,
            ..PublishProperties::default()
        };
        let publish = Publish::new(
            topic,
            QoS::AtLeastOnce,
            record.payload.clone(),
            Some(properties),
        );
        // `size()` leaves out the packet id, not assigned yet.
        let size = publish.size() + 2;
        if size > max_packet {
            return Err(format!(
                "its upstream packet would be {size} bytes, over the upstream's maximum of {max_packet}"
            ));
        }
        Ok(publish)
    }
}

/// Waits for the CONNACK; returns the largest packet the upstream accepts.
async fn wait_connack(eventloop: &mut EventLoop) -> Result<usize, rumqttc::v5::ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(ack)) = eventloop.poll().await? {
            let max = ack
                .properties
                .and_then(|p| p.max_packet_size)
                .map_or(MQTT_MAX_PACKET, |m| {
                    usize::try_from(m).unwrap_or(MQTT_MAX_PACKET)
                });
            return Ok(max);
        }
    }
}

/// Sleeps `delay` unless `shutdown` comes first (then returns true).
async fn sleep_or_stop(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}
