//! Decisions outside the edge and the spool: the gateway's start and its configuration,
//! the admin socket and the registry changes it makes, quarantine, the firewall, the
//! embedded broker's refusals, upstream commands, Modbus and the update agent's reports.

use super::{shown, Events, Violation};
use crate::device::DeviceId;

/// How a Modbus request failed, as the device's counters tell it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModbusFailure {
    Timeout,
    /// The device answered with an exception code.
    Exception,
    /// Connection, CRC, framing.
    Other,
}

impl Events {
    /// The gateway started with the configuration it had last time (`previous` = its
    /// digest then), with a changed one, or for the first time (`previous` = `None`).
    pub fn config_in_force(&self, detail: &str, digest: &str, previous: Option<&str>) {
        match previous {
            Some(p) if p == digest => self.audit("gateway.started", None, detail),
            Some(p) => {
                self.audit("config.changed", None, format!("{detail} previous={p}"));
                tracing::info!(
                    event = "config.changed",
                    previous = p,
                    sha256 = digest,
                    "configuration changed since the last start"
                );
            }
            None => self.audit("config.loaded", None, detail),
        }
    }

    /// A reload of `path` changed nothing, for `error` (every diagnostic of an invalid file).
    pub fn config_reload_failed(&self, path: &std::path::Path, error: &dyn std::fmt::Display) {
        self.audit(
            "config.reload_failed",
            None,
            format!("file={} error={error}", path.display()),
        );
        tracing::error!(event = "config.reload_failed", path = %path.display(), error = %error, "configuration not reloaded; the previous one stays in force");
    }

    /// The configuration `what` describes (of `digest`) replaced the one of digest
    /// `previous` while running; `rechecked` connected devices were disconnected to be
    /// judged anew; `needs_restart` sections changed but apply at the next start.
    pub fn config_reloaded(
        &self,
        what: &str,
        digest: &str,
        previous: &str,
        rechecked: usize,
        needs_restart: &[&str],
    ) {
        let restart = if needs_restart.is_empty() {
            "none".to_owned()
        } else {
            needs_restart.join(",")
        };
        self.audit(
            "config.changed",
            None,
            format!("{what} previous={previous} rechecked={rechecked} needs_restart={restart}"),
        );
        tracing::info!(event = "config.changed", sha256 = digest, previous, rechecked, needs_restart = %restart, "configuration reloaded");
    }

    /// A connected device was disconnected by a reload, to be judged anew (`why`).
    pub fn device_rechecked(&self, device: &DeviceId, why: &str, closed: usize) {
        self.audit(
            "config.device_rechecked",
            Some(device),
            format!("reason={why} closed={closed}"),
        );
        tracing::info!(event = "config.device_rechecked", %device, reason = why, closed, "device disconnected by a reload, to be judged anew");
    }

    /// A connection to the admin socket from `who` (its peer credentials) was refused.
    pub fn admin_refused(&self, who: &str) {
        self.audit("admin.refused", None, who);
        tracing::warn!(
            event = "admin.refused",
            peer = who,
            "admin connection refused"
        );
    }

    /// `who` asked the admin socket for a change (`request`, as JSON).
    pub fn admin_command(&self, who: &str, request: &str) {
        self.audit("admin.command", None, format!("{who} request={request}"));
    }

    pub fn device_added(
        &self,
        device: &DeviceId,
        class: &str,
        address: std::net::IpAddr,
        who: &str,
    ) {
        let detail = format!("class={class} address={address} by {who}");
        self.audit("device.added", Some(device), detail);
        tracing::info!(event = "device.added", %device, class, %address, "device registered");
    }

    /// `device` was unregistered and `closed` of its connections closed.
    pub fn device_removed(
        &self,
        device: &DeviceId,
        class: &str,
        address: std::net::IpAddr,
        closed: usize,
        who: &str,
    ) {
        let detail = format!("class={class} address={address} closed={closed} by {who}");
        self.audit("device.removed", Some(device), detail);
        tracing::info!(event = "device.removed", %device, closed, "device unregistered");
    }

    pub fn device_quarantined(&self, device: &DeviceId, reason: &str) {
        self.metrics()
            .policy_events
            .get_or_create(&[("kind", "quarantined")])
            .inc();
        self.audit("device.quarantined", Some(device), reason);
        tracing::warn!(event = "device.quarantined", %device, reason, "device quarantined");
    }

    pub fn device_released(&self, device: &DeviceId, by: &str) {
        self.metrics()
            .policy_events
            .get_or_create(&[("kind", "released")])
            .inc();
        self.audit("device.released", Some(device), by);
        tracing::warn!(event = "device.released", %device, by, "device released from quarantine");
    }

    /// The firewall table was loaded; `detail` summarises it.
    pub fn firewall_applied(&self, detail: &str) {
        self.audit("firewall.applied", None, detail);
        tracing::info!(
            event = "firewall.applied",
            detail,
            "firewall table inet wardgate loaded"
        );
    }

    /// The firewall's sets (or its whole table) were brought in step; `detail` says how.
    pub fn firewall_updated(&self, detail: &str) {
        self.audit("firewall.updated", None, detail);
        tracing::info!(event = "firewall.updated", detail, "firewall sets updated");
    }

    pub fn firewall_update_failed(&self, error: &dyn std::error::Error) {
        self.audit("firewall.update_failed", None, error.to_string());
        tracing::error!(
            event = "firewall.update_failed",
            error = %error,
            "firewall not updated; the edge still enforces the registry and quarantine"
        );
    }

    /// The embedded broker refused a CONNECT without the gateway's credentials. Audited
    /// when `others` (the refusals since the last audited one) are summed up with it,
    /// logged at debug level otherwise.
    pub fn broker_auth_refused(&self, client_id: &str, username: &str, others: Option<u64>) {
        let client_id = shown(client_id);
        let Some(others) = others else {
            tracing::debug!(event = "broker.auth_refused", client_id = %client_id, "embedded broker refused a CONNECT");
            return;
        };
        let user = shown(username);
        self.audit(
            "broker.auth_refused",
            None,
            format!("client_id={client_id} username={user} others_since_last={others}"),
        );
        tracing::warn!(
            event = "broker.auth_refused",
            client_id = %client_id,
            username = %user,
            others_since_last = others,
            "embedded broker refused a CONNECT without the gateway's credentials"
        );
    }

    /// A command from upstream was queued to `topic` on the embedded broker, for `device`
    /// (the gateway's stream: for the update agent).
    pub fn command_delivered(&self, device: &DeviceId, topic: &str) {
        self.metrics()
            .commands
            .get_or_create(&[("outcome", "delivered")])
            .inc();
        self.audit(
            "uplink.command_delivered",
            Some(device),
            format!("topic={topic:?}"),
        );
        if device.is_gateway() {
            tracing::info!(
                event = "uplink.command_delivered",
                topic,
                "update check requested from upstream"
            );
        } else {
            tracing::info!(event = "uplink.command_delivered", %device, topic = ?topic, "command from upstream delivered");
        }
    }

    pub fn command_refused(&self, topic: &str, reason: &str) {
        self.metrics()
            .commands
            .get_or_create(&[("outcome", "refused")])
            .inc();
        self.audit(
            "uplink.command_refused",
            None,
            format!("topic={topic:?} reason={reason}"),
        );
        tracing::warn!(event = "uplink.command_refused", topic = ?topic, reason, "command from upstream refused");
    }

    /// A Modbus poll of `device` failed on register `register`: `kind` is counted, `reason`
    /// says what happened.
    pub fn modbus_read_failed(
        &self,
        bus: &str,
        device: &DeviceId,
        register: &str,
        kind: ModbusFailure,
        reason: &dyn std::fmt::Display,
    ) {
        self.count(device, |c| match kind {
            ModbusFailure::Timeout => c.modbus_timeouts += 1,
            ModbusFailure::Exception => c.modbus_exceptions += 1,
            ModbusFailure::Other => c.modbus_errors += 1,
        });
        let result = match kind {
            ModbusFailure::Timeout => "timeout",
            ModbusFailure::Exception => "exception",
            ModbusFailure::Other => "error",
        };
        self.metrics()
            .modbus_polls
            .get_or_create(&[("result", result)])
            .inc();
        tracing::warn!(event = "modbus.read_failed", bus, %device, register, reason = %reason, "Modbus read failed");
    }

    /// A Modbus poll of `device` completed; `returned`: after the device had been silent.
    pub fn modbus_polled(&self, bus: &str, device: &DeviceId, returned: bool) {
        self.count(device, |c| c.modbus_polls += 1);
        self.metrics()
            .modbus_polls
            .get_or_create(&[("result", "ok")])
            .inc();
        if returned {
            self.audit("modbus.device_returned", Some(device), format!("bus={bus}"));
            tracing::info!(event = "modbus.device_returned", bus, %device, "Modbus device answers again");
        }
    }

    pub fn modbus_device_silent(&self, bus: &str, device: &DeviceId, reason: &str) {
        self.audit(
            "modbus.device_silent",
            Some(device),
            format!("bus={bus} {reason}"),
        );
        tracing::warn!(event = "modbus.device_silent", bus, %device, reason, "Modbus device does not answer");
    }

    /// A value read from `device` was refused by its class's policy.
    pub fn modbus_publish_denied(&self, device: &DeviceId, topic: &str, v: &Violation) {
        self.count_violation(device, v);
        self.audit(
            "modbus.publish_denied",
            Some(device),
            format!("code={} reason={v}", v.code()),
        );
        tracing::warn!(event = "modbus.publish_denied", %device, topic, code = v.code(), reason = %v, "value refused by the device's class policy");
    }

    /// A register write (`value`, as the command's text) from `origin` was done, or
    /// refused for `Err(reason)`.
    pub fn modbus_write(
        &self,
        device: &DeviceId,
        register: &str,
        value: &str,
        origin: &str,
        outcome: Result<&(), &dyn std::fmt::Display>,
    ) {
        match outcome {
            Ok(&()) => {
                let detail = format!("register={register} value={value} from={origin}");
                self.audit("modbus.write", Some(device), detail);
                tracing::info!(event = "modbus.write", %device, register, value, "Modbus write done");
            }
            Err(reason) => {
                let detail =
                    format!("register={register:?} value={value:?} from={origin} reason={reason}");
                self.audit("modbus.write_refused", Some(device), detail);
                tracing::warn!(event = "modbus.write_refused", %device, register, %reason, "Modbus write refused");
            }
        }
    }

    /// A report from the update agent that is not one (`why`).
    pub fn update_report_refused(&self, why: &str) {
        self.audit("update.report_refused", None, why);
        tracing::warn!(
            event = "update.report_refused",
            reason = why,
            "agent report refused"
        );
    }

    /// A step the update agent reported; `audited` for the steps a security officer
    /// follows (the rest are logged only).
    pub fn update_reported(
        &self,
        event: &str,
        version: &str,
        slot: &str,
        detail: &str,
        audited: bool,
    ) {
        let name = format!("update.{event}");
        tracing::info!(event = name.as_str(), version, slot, detail, "update agent");
        if audited {
            self.audit(
                &name,
                None,
                format!("version={version:?} slot={slot:?} detail={detail:?}"),
            );
        }
    }
}
