//! `[uplink]`: the hospital's broker, and how the gateway keeps its session with it.

use std::path::PathBuf;
use std::time::Duration;

use super::diag::Validator;
use super::gateway::GatewayConfig;
use super::raw::{self, S};

pub const DEFAULT_UPLINK_PORT: u16 = 8883;
pub const DEFAULT_TOPIC_PREFIX: &str = "wardgate";
/// Unacknowledged upstream publishes at most. 32 capped the uplink near 12-16k msg/s on
/// loopback (measured by `wardgate-bench`); 256 sustained 20k. The upstream's Receive
/// Maximum, if lower, still rules (rumqttc keeps to it).
pub const DEFAULT_INFLIGHT: usize = 256;
/// Backlog records sent upstream per second at most after an outage. 500, the earlier
/// default, drained a 5,000-message backlog at 0.03 × a mosquitto bridge's rate; 10,000
/// drained it at 2.7-3.4 × (`wardgate-bench --scenario outage`), leaving the uplink
/// (about 20k msg/s on loopback) room for live traffic meanwhile.
pub const DEFAULT_REPLAY_RATE: u32 = 10_000;
pub const DEFAULT_UPLINK_KEEP_ALIVE: Duration = Duration::from_secs(30);
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Short enough that the uplink is back within 1.5 s (plus its handshake) of the upstream's
/// return; a fleet of N gateways costs a down upstream about N/1.1 handshakes a second.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(1500);
/// rumqttc's in-flight window is a u16.
pub const MAX_INFLIGHT: usize = 1024;

#[derive(Debug, Clone)]
pub struct UplinkConfig {
    pub host: String,
    pub port: u16,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_id: String,
    pub topic_prefix: String,
    pub inflight: usize,
    /// Messages per second the uplink sends at most (a backlog drains at this pace).
    pub replay_rate: u32,
    pub keep_alive: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Validator<'_> {
    pub(super) fn uplink(
        &mut self,
        u: &S<raw::RawUplink>,
        gateway: Option<&GatewayConfig>,
    ) -> Option<Option<UplinkConfig>> {
        let span = u.span();
        let u = u.get_ref();
        let host = self
            .required(&u.host, &span, "host")
            .map(|h| h.get_ref().clone());
        let ca = self.required(&u.ca, &span, "ca").map(|p| self.path(p));
        let cert = self.required(&u.cert, &span, "cert").map(|p| self.path(p));
        let key = self.required(&u.key, &span, "key").map(|p| self.path(p));
        let port = match &u.port {
            None => Some(DEFAULT_UPLINK_PORT),
            Some(p) => self.port(p),
        };
        let client_id = match &u.client_id {
            Some(c) => self.name(c, "uplink client id"),
            None => gateway.map(|g| g.id.clone()),
        };
        let topic_prefix = match &u.topic_prefix {
            None => Some(DEFAULT_TOPIC_PREFIX.to_owned()),
            Some(t) => {
                let r = crate::policy::acl::validate_topic_name(t.get_ref())
                    .map(|_| t.get_ref().trim_end_matches('/').to_owned())
                    .map_err(|e| format!("topic_prefix: {e}"));
                self.check(t.span(), r)
            }
        };
        let inflight = self.count(u.inflight.as_ref(), DEFAULT_INFLIGHT, "inflight");
        if let Some(i) = &u.inflight {
            if inflight > MAX_INFLIGHT {
                self.error(i.span(), format!("inflight must be at most {MAX_INFLIGHT}"));
            }
        }
        let replay_rate = self.count(
            u.replay_rate.as_ref(),
            DEFAULT_REPLAY_RATE as usize,
            "replay_rate",
        );
        let keep_alive = self.duration(u.keep_alive.as_ref(), DEFAULT_UPLINK_KEEP_ALIVE);
        let backoff_min = self.duration(u.backoff_min.as_ref(), DEFAULT_BACKOFF_MIN);
        let backoff_max = self.duration(u.backoff_max.as_ref(), DEFAULT_BACKOFF_MAX);
        if let (Some(b), true) = (&u.backoff_max, backoff_max < backoff_min) {
            self.error(b.span(), "backoff_max must not be below backoff_min");
        }
        Some(match (host, port, ca, cert, key, client_id, topic_prefix) {
            (
                Some(host),
                Some(port),
                Some(ca),
                Some(cert),
                Some(key),
                Some(client_id),
                Some(topic_prefix),
            ) => Some(UplinkConfig {
                host,
                port,
                ca,
                cert,
                key,
                client_id,
                topic_prefix,
                inflight,
                replay_rate: u32::try_from(replay_rate).unwrap_or(u32::MAX),
                keep_alive,
                backoff_min,
                backoff_max,
            }),
            _ => None,
        })
    }
}
