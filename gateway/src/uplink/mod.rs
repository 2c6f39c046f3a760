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
//!   (`rest` is the device topic after `ward/{device}/`, or the whole topic otherwise),
//!   with MQTT 5 user properties `wardgate-seq` (the gateway sequence number: with the
//!   gateway id in the topic, a key the upstream can drop duplicates by),
//!   `wardgate-received-at` (ms since the epoch), `wardgate-priority` and `wardgate-qos`.
//!   The payload is untouched.
//! - A record is removed from the spool only when the PUBACK for its packet id arrives;
//!   `publish()` returning means only "queued", so packet ids are learnt from rumqttc's
//!   `Outgoing::Publish(pkid)` events, which come in the order the publishes were queued.
//! - Commands: the uplink subscribes to `{prefix}/{site}/{gateway}/+/cmd/#`, and delivers
//!   `…/{device}/cmd/{rest}` to the local topic `ward/{device}/cmd/{rest}` only if that
//!   device is registered and its class may subscribe to that topic; otherwise the command
//!   is refused and logged (`uplink.command_refused`).
//!
//! Tested by the system tests against a real mosquitto with TLS (`tests/system/uplink.rs`).

mod command;
mod pace;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio_util::sync::CancellationToken;

use crate::config::UplinkConfig;
use crate::device::DeviceId;
use crate::pki::cert;
use crate::registry::SharedRegistry;
use crate::spool::{Key, Record, Spool};
use pace::{Backoff, Pace};

/// How long a connection attempt (TCP, TLS, CONNACK) may take.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// Largest packet accepted from upstream (commands).
const MAX_INCOMING: u32 = 1 << 20;

/// Everything the uplink needs.
#[derive(Debug, Clone)]
pub struct Uplink {
    pub config: UplinkConfig,
    pub site: String,
    pub gateway_id: String,
    pub spool: Spool,
    pub registry: SharedRegistry,
    /// The embedded broker, for delivering commands to devices.
    pub broker: SocketAddr,
    /// True while a session with the upstream broker is up (for `wardgate status`).
    pub connected: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Modbus devices, whose commands are register writes.
    pub modbus: crate::modbus::ModbusHandle,
}

/// The upstream topic of a device topic.
pub fn upstream_topic(
    prefix: &str,
    site: &str,
    gateway: &str,
    device: &DeviceId,
    topic: &str,
) -> String {
    let own = format!("ward/{device}/");
    let rest = topic.strip_prefix(&own).unwrap_or(topic);
    format!("{prefix}/{site}/{gateway}/{device}/{rest}")
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

    fn command_filter(&self) -> String {
        format!(
            "{}/{}/{}/+/cmd/#",
            self.config.topic_prefix, self.site, self.gateway_id
        )
    }

    /// Connects, forwards, reconnects with backoff, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let commands = command::LocalDelivery::start(self.broker, shutdown.clone());
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let mut pace = Pace::new(self.config.replay_rate);
        loop {
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
            if let Err(e) = connected {
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
            backoff.reset();
            self.connected
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let backlog = self.spool.stats().records;
            tracing::info!(
                event = "uplink.connected",
                host = %self.config.host,
                port = self.config.port,
                backlog,
                "connected to the upstream broker"
            );
            if let Err(e) = client.try_subscribe(self.command_filter(), QoS::AtLeastOnce) {
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
                .session(&client, &mut events, &mut pace, &commands, &shutdown)
                .await;
            self.connected
                .store(false, std::sync::atomic::Ordering::Relaxed);
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
        commands: &command::LocalDelivery,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let window = self.config.inflight;
        // Sent and not acknowledged (or refused by the upstream until the next session).
        let mut inflight: HashSet<Key> = HashSet::new();
        // Queued to rumqttc, packet id not yet known.
        let mut queued: VecDeque<Key> = VecDeque::new();
        let mut by_pkid: HashMap<u16, Key> = HashMap::new();
        loop {
            let appended = self.spool.appended();
            tokio::pin!(appended);
            // Register for the wake-up before looking, so an append in between is not missed.
            appended.as_mut().enable();
            let mut idle = false;
            let mut paced = None;
            let room = window.saturating_sub(inflight.len());
            if room > 0 {
                let allowed = pace.available(room);
                if allowed == 0 {
                    paced = Some(pace.next_at());
                } else {
                    let batch = self.spool.next_batch(allowed, &inflight);
                    idle = batch.is_empty();
                    for (key, record) in batch {
                        if let Err(e) = self.publish(client, key, &record) {
                            return Some(format!("cannot queue a publish: {e}"));
                        }
                        pace.take();
                        inflight.insert(key);
                        queued.push_back(key);
                    }
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                event = events.recv() => match event.unwrap_or_else(|| Err(rumqttc::v5::ConnectionError::RequestsDone)) {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(key) = queued.pop_front() {
                            by_pkid.insert(pkid, key);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let Some(key) = by_pkid.remove(&ack.pkid) else { continue };
                        if matches!(ack.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers) {
                            self.spool.remove(key);
                            inflight.remove(&key);
                        } else {
                            // Kept, and not sent again in this session.
                            tracing::error!(
                                event = "uplink.rejected",
                                seq = key.seq,
                                reason = ?ack.reason,
                                "upstream refused a record; it stays in the spool"
                            );
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        tracing::info!(
                            event = "uplink.commands_subscribed",
                            "subscribed to commands from upstream"
                        );
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        commands.deliver(self, &p.topic, p.payload.clone());
                    }
                    Ok(_) => {}
                    Err(e) => return Some(e.to_string()),
                },
                _ = &mut appended, if idle => {}
                _ = tokio::time::sleep_until(paced.unwrap_or_else(tokio::time::Instant::now)), if paced.is_some() => {}
            }
        }
    }

    fn publish(&self, client: &AsyncClient, key: Key, record: &Record) -> Result<(), String> {
        let topic = upstream_topic(
            &self.config.topic_prefix,
            &self.site,
            &self.gateway_id,
            &record.device,
            &record.topic,
        );
        let properties = PublishProperties {
            user_properties: vec![
                ("wardgate-seq".into(), key.seq.to_string()),
                (
                    "wardgate-received-at".into(),
                    record.received_at_ms.to_string(),
                ),
                ("wardgate-priority".into(), key.priority.name().into()),
                ("wardgate-qos".into(), record.qos.to_string()),
            ],
            ..PublishProperties::default()
        };
        client
            .try_publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                record.payload.clone(),
                properties,
            )
            .map_err(|e| e.to_string())
    }
}

async fn wait_connack(eventloop: &mut EventLoop) -> Result<(), rumqttc::v5::ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
            return Ok(());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_under_site_gateway_and_device() {
        let d = DeviceId::parse("pump-1").unwrap();
        assert_eq!(
            upstream_topic("h", "st-mary", "gw1", &d, "ward/pump-1/vitals/hr"),
            "h/st-mary/gw1/pump-1/vitals/hr"
        );
        assert_eq!(
            upstream_topic("h", "st-mary", "gw1", &d, "ward/shared/x"),
            "h/st-mary/gw1/pump-1/ward/shared/x"
        );
    }
}
