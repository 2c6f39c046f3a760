//! What the edge knows of each device's MQTT session, and when it needs the broker.
//!
//! The edge answers a device's CONNECT, PINGREQ and QoS 1 PUBLISH itself; the embedded
//! broker is needed only for what it really does — subscriptions and local delivery,
//! retained messages, QoS 2's handshake, wills for local subscribers — so a device gets
//! a broker session ("is attached") only from the first packet that needs one. A
//! publish-only device (most of a ward: pumps, monitors, bed sensors sending telemetry)
//! never costs a broker connection.
//!
//! Per device the book keeps the rights its session was opened under, whether the
//! session outlives a disconnect (clean session 0), and whether the broker holds part of
//! it (it was attached with clean session 0). At a CONNECT ([`Sessions::open`]):
//! - the broker holds a session of the device: attach at once, to resume it (its
//!   subscriptions and queued messages) or, with a clean session, to end it; one opened
//!   under other rights is purged first;
//! - otherwise the edge answers the CONNACK, with "session present" when the device
//!   resumes a session the edge kept (its QoS 2 identifiers awaiting PUBREL) under the
//!   same rights.
//!
//! The broker's sessions end with the process, as this book does, so the two agree.
//! Pure bookkeeping under one lock; tested by the unit tests below and, against the real
//! broker, by `tests/system/data_path.rs`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::device::DeviceId;
use crate::policy::Acl;

#[derive(Debug, Default)]
pub(super) struct Sessions(Mutex<HashMap<DeviceId, Kept>>);

#[derive(Debug)]
struct Kept {
    acl: Acl,
    /// The last connection asked for a session that outlives it.
    persistent: bool,
    /// The broker holds a session of the device that outlives its connection.
    brokered: bool,
}

/// How a connection's session begins.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Opening {
    /// The broker holds a session of the device: attach before the CONNACK.
    pub attach: bool,
    /// A kept session was opened under other rights: it ends now (the broker's part by a
    /// purge before attaching, the edge's by forgetting it).
    pub stale: bool,
    /// "Session present" for a CONNACK the edge answers itself.
    pub present: bool,
}

impl Sessions {
    fn book(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Kept>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection of `device`, admitted with `acl`, opens its session.
    pub(super) fn open(&self, device: &DeviceId, acl: &Acl, clean: bool) -> Opening {
        let mut book = self.book();
        let previous = book.remove(device);
        let opening = match &previous {
            None => Opening {
                attach: false,
                stale: false,
                present: false,
            },
            Some(k) => {
                // What a clean session discards anyway is not stale.
                let stale = !clean && k.persistent && k.acl != *acl;
                Opening {
                    attach: k.brokered,
                    stale,
                    present: !clean && k.persistent && !stale,
                }
            }
        };
        book.insert(
            device.clone(),
            Kept {
                acl: acl.clone(),
                persistent: !clean,
                // Attached with a clean session, the broker ends its part of the session
                // at this connection's end.
                brokered: opening.attach && !clean,
            },
        );
        opening
    }

    /// The connection of `device` attached with `clean`: with clean session 0 the broker
    /// now keeps part of its session.
    pub(super) fn attached(&self, device: &DeviceId, clean: bool) {
        if clean {
            return;
        }
        if let Some(k) = self.book().get_mut(device) {
            k.brokered = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::acl::FilterTemplate;

    fn acl(filter: &str) -> Acl {
        let d = DeviceId::parse("pump-1").unwrap();
        Acl::for_device(&d, &[FilterTemplate::parse(filter).unwrap()], &[])
    }

    #[test]
    fn a_device_is_attached_at_connect_only_while_the_broker_keeps_its_session() {
        let s = Sessions::default();
        let d = DeviceId::parse("pump-1").unwrap();
        let a = acl("ward/pump-1/#");
        let fresh = Opening {
            attach: false,
            stale: false,
            present: false,
        };
        assert_eq!(s.open(&d, &a, true), fresh, "first, clean");
        assert_eq!(s.open(&d, &a, false), fresh, "nothing was kept");
        // Persistent, never attached: the edge keeps the session and says so.
        assert_eq!(
            s.open(&d, &a, false),
            Opening {
                attach: false,
                stale: false,
                present: true
            }
        );
        // Attached (it subscribed) with clean session 0: the broker keeps its part.
        s.attached(&d, false);
        let resumed = s.open(&d, &a, false);
        assert!(resumed.attach && resumed.present && !resumed.stale);
        // A clean session attaches once more, to end the broker's session, and then not.
        let ending = s.open(&d, &a, true);
        assert!(ending.attach && !ending.present);
        assert_eq!(s.open(&d, &a, true), fresh);
    }

    #[test]
    fn a_session_kept_under_other_rights_is_stale() {
        let s = Sessions::default();
        let d = DeviceId::parse("pump-1").unwrap();
        s.open(&d, &acl("ward/pump-1/#"), false);
        s.attached(&d, false);
        let o = s.open(&d, &acl("ward/pump-1/vitals/#"), false);
        assert!(o.attach && o.stale && !o.present, "{o:?}");
        // A clean session ends the old one anyway: nothing stale to report.
        s.open(&d, &acl("ward/pump-1/#"), false);
        let o = s.open(&d, &acl("ward/other/#"), true);
        assert!(!o.stale && !o.present, "{o:?}");
        // An attach with a clean session keeps nothing in the broker.
        s.attached(&d, true);
        assert!(!s.open(&d, &acl("ward/other/#"), false).attach);
    }
}
