//! The gateway's metrics, named and typed by Prometheus's conventions (`wardgate_` prefix,
//! `_total` counters, `_bytes` and `_seconds` units), in the OpenMetrics text format that
//! Prometheus scrapes; served with `/health` on `[admin] metrics_listen` (`crate::exporter`).
//!
//! Two kinds of series. Counters and the uplink's latency histogram are bumped as things
//! happen: [`crate::events::Events`] holds one [`Metrics`] and every decision it records
//! bumps its series there, so a metric never disagrees with the audit log about what was
//! decided. Levels (devices connected, spool depth, the oldest record's age, the uplink's
//! state, firewall drops, the process's memory) are read when scraped: the exporter fills a
//! [`Levels`] from the live state and [`Metrics::encode`] writes it beside the counters.
//!
//! Every label is a closed set (a refusal's or violation's code, a priority, a poll's
//! result, a firewall rule's comment), so no peer can grow the series. Series per device
//! exist only with `[admin] metrics_per_device = true`, and for at most
//! `metrics_max_devices` devices: the ones seen first; the rest count under
//! `device="_other"`.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// One label: its name and value (a closed set's member).
pub type Label = [(&'static str, &'static str); 1];

/// Series per device, if asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerDevice {
    pub max_devices: usize,
}

/// The label of a device in per-device series.
type DeviceLabel = [(&'static str, String); 1];

pub struct Metrics {
    registry: Registry,
    levels: std::sync::Arc<LevelsCollector>,
    pub messages_accepted: Counter,
    pub messages_refused: Family<Label, Counter>,
    pub messages_throttled: Counter,
    pub connections_refused: Family<Label, Counter>,
    pub policy_events: Family<Label, Counter>,
    pub spool_evicted: Family<Label, Counter>,
    pub spool_expired: Family<Label, Counter>,
    pub spool_set_aside: Counter,
    pub uplink_connects: Counter,
    pub uplink_delivered: Counter,
    pub uplink_puback_latency: Histogram,
    pub modbus_polls: Family<Label, Counter>,
    pub commands: Family<Label, Counter>,
    pub audit_records: Counter,
    per_device: Option<(PerDevice, Mutex<HashSet<String>>)>,
    device_accepted: Family<DeviceLabel, Counter>,
    device_throttled: Family<DeviceLabel, Counter>,
    device_violations: Family<DeviceLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(None)
    }
}

/// What a scrape reads from the live state: set by the exporter before each
/// [`Metrics::encode`].
#[derive(Debug, Clone, Default)]
pub struct Levels {
    pub devices_registered: u64,
    pub devices_connected: u64,
    pub devices_quarantined: u64,
    /// Records and sealed bytes waiting, by priority name.
    pub spool: Vec<(&'static str, u64, u64)>,
    /// The oldest waiting record's age, seconds (0 with none).
    pub spool_oldest_age: f64,
    pub spool_set_aside_records: u64,
    /// `None` without an `[uplink]`.
    pub uplink_connected: Option<bool>,
    pub uplink_in_flight: u64,
    /// Seconds since the last PUBACK, if there was one.
    pub uplink_last_ack_age: Option<f64>,
    /// Whether each part shows progress (`crate::progress`): 1 ready, 0 not.
    pub ready: bool,
    /// Packets and bytes each firewall drop rule counted, by its comment.
    pub firewall_drops: Vec<(String, u64, u64)>,
    pub resident_memory_bytes: u64,
    pub open_fds: u64,
}

#[derive(Debug, Default)]
struct LevelsCollector(Mutex<Levels>);

impl Metrics {
    pub fn new(per_device: Option<PerDevice>) -> Metrics {
        let mut r = Registry::with_prefix("wardgate");
        let m = Metrics {
            registry: Registry::default(),
            levels: Default::default(),
            messages_accepted: Counter::default(),
            messages_refused: Family::default(),
            messages_throttled: Counter::default(),
            connections_refused: Family::default(),
            policy_events: Family::default(),
            spool_evicted: Family::default(),
            spool_expired: Family::default(),
            spool_set_aside: Counter::default(),
            uplink_connects: Counter::default(),
            uplink_delivered: Counter::default(),
            // 1 ms to about 33 s.
            uplink_puback_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16),
            ),
            modbus_polls: Family::default(),
            commands: Family::default(),
            audit_records: Counter::default(),
            per_device: per_device.map(|p| (p, Mutex::default())),
            device_accepted: Family::default(),
            device_throttled: Family::default(),
            device_violations: Family::default(),
        };
        r.register(
            "messages_accepted",
            "PUBLISHes and Modbus values accepted into the spool",
            m.messages_accepted.clone(),
        );
        r.register(
            "messages_refused",
            "messages refused, by reason (a violation's code, or no_room in the spool)",
            m.messages_refused.clone(),
        );
        r.register(
            "messages_throttled",
            "times a device was held back by its rate (nothing dropped)",
            m.messages_throttled.clone(),
        );
        r.register(
            "connections_refused",
            "device connections refused, by reason",
            m.connections_refused.clone(),
        );
        r.register(
            "policy_events",
            "policy events, by kind: violations by code, rate_hard_limit, quarantined, released",
            m.policy_events.clone(),
        );
        r.register(
            "spool_evicted_records",
            "records evicted to make room, by priority",
            m.spool_evicted.clone(),
        );
        r.register(
            "spool_expired_records",
            "records expired unsent, by priority",
            m.spool_expired.clone(),
        );
        r.register(
            "spool_set_aside_records",
            "records set aside as undeliverable",
            m.spool_set_aside.clone(),
        );
        r.register(
            "uplink_connects",
            "sessions established with the upstream broker",
            m.uplink_connects.clone(),
        );
        r.register(
            "uplink_delivered_records",
            "records the upstream broker acknowledged (rate() of it is the drain rate)",
            m.uplink_delivered.clone(),
        );
        r.register_with_unit(
            "uplink_puback_latency",
            "time from a record's PUBLISH upstream to its PUBACK",
            Unit::Seconds,
            m.uplink_puback_latency.clone(),
        );
        r.register(
            "modbus_polls",
            "Modbus polls, by result (ok, timeout, exception, error)",
            m.modbus_polls.clone(),
        );
        r.register(
            "commands",
            "commands from upstream, by outcome (delivered, refused)",
            m.commands.clone(),
        );
        r.register(
            "audit_records",
            "records appended to the audit log by this process",
            m.audit_records.clone(),
        );
        if m.per_device.is_some() {
            r.register(
                "device_messages_accepted",
                "messages accepted, by device",
                m.device_accepted.clone(),
            );
            r.register(
                "device_messages_throttled",
                "times held back by its rate, by device",
                m.device_throttled.clone(),
            );
            r.register(
                "device_policy_violations",
                "policy violations, by device",
                m.device_violations.clone(),
            );
        }
        r.register_collector(Box::new(m.levels.clone()));
        Metrics { registry: r, ..m }
    }

    /// The label `device` gets in per-device series, if there are any: its id while fewer
    /// than `max_devices` have one, `_other` after.
    fn device_label(&self, device: &str) -> Option<DeviceLabel> {
        let (p, seen) = self.per_device.as_ref()?;
        let mut seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = if seen.contains(device)
            || (seen.len() < p.max_devices && seen.insert(device.to_owned()))
        {
            device.to_owned()
        } else {
            "_other".to_owned()
        };
        Some([("device", name)])
    }

    pub fn accepted(&self, device: &str) {
        self.messages_accepted.inc();
        if let Some(l) = self.device_label(device) {
            self.device_accepted.get_or_create(&l).inc();
        }
    }

    pub fn throttled(&self, device: &str) {
        self.messages_throttled.inc();
        if let Some(l) = self.device_label(device) {
            self.device_throttled.get_or_create(&l).inc();
        }
    }

    pub fn violation(&self, device: &str, code: &'static str) {
        self.policy_events.get_or_create(&[("kind", code)]).inc();
        if let Some(l) = self.device_label(device) {
            self.device_violations.get_or_create(&l).inc();
        }
    }

    /// The whole exposition, with `levels` as the live state: OpenMetrics text.
    pub fn encode(&self, levels: Levels) -> String {
        *self
            .levels
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = levels;
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, unit, g.metric_type())?)
}

impl Collector for LevelsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let l = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        gauge(
            &mut e,
            "devices_registered",
            "devices in the registry",
            None,
            l.devices_registered as i64,
        )?;
        gauge(
            &mut e,
            "devices_connected",
            "devices with a session now",
            None,
            l.devices_connected as i64,
        )?;
        gauge(
            &mut e,
            "devices_quarantined",
            "devices in quarantine",
            None,
            l.devices_quarantined as i64,
        )?;
        {
            let mut m = e.encode_descriptor(
                "spool_records",
                "records waiting in the spool, by priority",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (p, records, _) in &l.spool {
                ConstGauge::new(*records as i64).encode(m.encode_family(&[("priority", *p)])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "spool",
                "sealed bytes waiting in the spool, by priority",
                Some(&Unit::Bytes),
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (p, _, bytes) in &l.spool {
                ConstGauge::new(*bytes as i64).encode(m.encode_family(&[("priority", *p)])?)?;
            }
        }
        gauge(
            &mut e,
            "spool_oldest_record_age",
            "age of the oldest record waiting",
            Some(&Unit::Seconds),
            l.spool_oldest_age,
        )?;
        gauge(
            &mut e,
            "spool_set_aside_records_kept",
            "records set aside and kept",
            None,
            l.spool_set_aside_records as i64,
        )?;
        if let Some(c) = l.uplink_connected {
            gauge(
                &mut e,
                "uplink_connected",
                "1 while a session with the upstream broker is up",
                None,
                i64::from(c),
            )?;
            gauge(
                &mut e,
                "uplink_in_flight_records",
                "records sent upstream and not yet acknowledged",
                None,
                l.uplink_in_flight as i64,
            )?;
            if let Some(age) = l.uplink_last_ack_age {
                gauge(
                    &mut e,
                    "uplink_last_ack_age",
                    "time since the upstream broker last acknowledged a record",
                    Some(&Unit::Seconds),
                    age,
                )?;
            }
        }
        gauge(
            &mut e,
            "ready",
            "1 while messages are moving (GET /health says why not)",
            None,
            i64::from(l.ready),
        )?;
        if !l.firewall_drops.is_empty() {
            let mut m = e.encode_descriptor(
                "firewall_dropped_packets",
                "packets the firewall dropped, by rule",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (rule, packets, _) in &l.firewall_drops {
                ConstCounter::new(*packets).encode(m.encode_family(&[("rule", rule.as_str())])?)?;
            }
        }
        gauge(
            &mut e,
            "process_resident_memory",
            "resident memory of the gateway process",
            Some(&Unit::Bytes),
            l.resident_memory_bytes as i64,
        )?;
        gauge(
            &mut e,
            "process_open_fds",
            "open file descriptors of the gateway process",
            None,
            l.open_fds as i64,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_per_device_are_bounded_and_absent_unless_asked_for() {
        let m = Metrics::new(Some(PerDevice { max_devices: 2 }));
        for d in ["pump-1", "pump-2", "pump-3", "pump-4", "pump-1"] {
            m.accepted(d);
        }
        let text = m.encode(Levels::default());
        let mut series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("wardgate_device_messages_accepted_total"))
            .collect();
        series.sort_unstable();
        // The first two seen have their own; the rest count together.
        assert_eq!(
            series,
            [
                r#"wardgate_device_messages_accepted_total{device="_other"} 2"#,
                r#"wardgate_device_messages_accepted_total{device="pump-1"} 2"#,
                r#"wardgate_device_messages_accepted_total{device="pump-2"} 1"#,
            ],
            "{text}"
        );
        assert!(
            text.contains("wardgate_messages_accepted_total 5"),
            "{text}"
        );

        let off = Metrics::new(None);
        off.accepted("pump-1");
        assert!(!off.encode(Levels::default()).contains("wardgate_device_"));
    }
}
