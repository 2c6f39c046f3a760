//! The spool's decisions: records refused for want of room, evicted to make room, expired
//! unsent, set aside as undeliverable or unreadable.
//!
//! Records of the gateway's own stream (audit records, update reports) are spooled like a
//! device's, so forwarding them can cause more of these events. [`SPOOL_EVENTS`] names the
//! events the audit forwarder keeps local when they concern that stream (see
//! [`crate::audit_stream`]); the spool makes room for an own record only among own
//! records, so an eviction on the stream's behalf always names the stream as its device.

use super::Events;
use crate::device::DeviceId;
use crate::policy::Priority;

/// Every event the spool records, by name.
pub const SPOOL_EVENTS: [&str; 6] = [
    "spool.refused",
    "spool.evicted",
    "spool.expired",
    "spool.rejected",
    "spool.rejected_dropped",
    "spool.corrupt_record",
];

impl Events {
    /// No room could be made for a record: the device gets no acknowledgement.
    /// `refused` is the device's count of them, this one included.
    pub fn spool_refused(
        &self,
        device: &DeviceId,
        priority: Priority,
        size: u64,
        reason: &str,
        refused: u64,
    ) {
        self.metrics()
            .messages_refused
            .get_or_create(&[("reason", "no_room")])
            .inc();
        self.audit(
            "spool.refused",
            Some(device),
            format!("priority={priority} size={size} reason={reason}"),
        );
        tracing::warn!(
            event = "spool.refused",
            %device,
            priority = %priority,
            size,
            refused,
            reason,
            "record refused: no room in the spool"
        );
    }

    /// A record of `device` (`priority`, `seq`) was evicted to make room for one of
    /// `for_device`.
    pub fn spool_evicted(
        &self,
        device: &DeviceId,
        (priority, seq): (Priority, u64),
        for_device: &DeviceId,
        evicted: u64,
    ) {
        self.metrics()
            .spool_evicted
            .get_or_create(&[("priority", priority.name())])
            .inc();
        self.audit(
            "spool.evicted",
            Some(device),
            format!("priority={} seq={} for_device={for_device}", priority, seq),
        );
        tracing::warn!(
            event = "spool.evicted",
            %device,
            priority = %priority,
            seq,
            %for_device,
            evicted,
            "record evicted to make room"
        );
    }

    /// `count` records of `device` in `priority` expired unsent.
    pub fn spool_expired(&self, device: &DeviceId, priority: Priority, count: u64, expired: u64) {
        self.metrics()
            .spool_expired
            .get_or_create(&[("priority", priority.name())])
            .inc_by(count);
        self.audit(
            "spool.expired",
            Some(device),
            format!("priority={priority} count={count}"),
        );
        tracing::warn!(
            event = "spool.expired",
            %device,
            priority = %priority,
            count,
            expired,
            "records expired unsent (older than max_age or their own expiry)"
        );
    }

    /// A record of `device` was set aside: the upstream refused it or it cannot be
    /// published upstream at all.
    pub fn spool_rejected(
        &self,
        device: &DeviceId,
        (priority, seq): (Priority, u64),
        reason: &str,
        rejected: u64,
    ) {
        self.metrics().spool_set_aside.inc();
        self.audit(
            "spool.rejected",
            Some(device),
            format!("priority={priority} seq={seq} reason={reason}"),
        );
        tracing::warn!(
            event = "spool.rejected",
            %device,
            priority = %priority,
            seq,
            reason,
            rejected,
            "record set aside: it cannot be delivered upstream"
        );
    }

    /// The oldest record set aside was deleted: more than `max_rejected` bytes were.
    pub fn spool_rejected_dropped(&self, device: Option<&DeviceId>, record: &dyn std::fmt::Debug) {
        self.audit(
            "spool.rejected_dropped",
            device,
            format!("record={record:?} reason=more than max_rejected bytes set aside"),
        );
        tracing::warn!(
            event = "spool.rejected_dropped",
            device = super::dev(device),
            record = ?record,
            "oldest rejected record deleted: more than max_rejected bytes set aside"
        );
    }

    /// Damaged bytes (`what` names them) were set aside; the rest is forwarded.
    pub fn spool_corrupt_record(&self, what: &str, error: &str) {
        self.audit(
            "spool.corrupt_record",
            None,
            format!("record={what} error={error}"),
        );
        tracing::error!(
            event = "spool.corrupt_record",
            record = what,
            error,
            "unreadable spool record set aside; the rest is forwarded"
        );
    }
}
