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
use std::time::{Duration, Instant};

use crate::device::DeviceId;
use crate::policy::Acl;

#[derive(Debug, Default)]
pub(super) struct Sessions {
    book: Mutex<HashMap<DeviceId, Kept>>,
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Kept {
    acl: Acl,
    /// The last connection asked for a session that outlives it.
    persistent: bool,
    /// The broker holds a session of the device that outlives its connection.
    brokered: bool,
    /// When the session ends, if it was kept with a Session Expiry Interval (MQTT 5);
    /// set when its connection ends.
    expires: Option<Instant>,
    /// Of the connection that opened it.
    generation: u64,
}

/// The session a CONNECT asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SessionAsk {
    /// Begin afresh: whatever was kept is discarded.
    pub clean_start: bool,
    /// How long the session outlives its connection: zero for not at all, `None` for
    /// ever.
    pub expiry: Option<Duration>,
}

impl SessionAsk {
    /// MQTT 3.1.1: clean session 1 is clean start and no expiry; 0, neither, for ever.
    pub(super) fn v4(clean_session: bool) -> SessionAsk {
        SessionAsk {
            clean_start: clean_session,
            expiry: if clean_session {
                Some(Duration::ZERO)
            } else {
                None
            },
        }
    }

    /// MQTT 5: Clean Start and a Session Expiry Interval (`u32::MAX`: never).
    pub(super) fn v5(clean_start: bool, expiry_secs: u32) -> SessionAsk {
        SessionAsk {
            clean_start,
            expiry: (expiry_secs != u32::MAX).then(|| Duration::from_secs(expiry_secs.into())),
        }
    }

    /// The session outlives its connection.
    pub(super) fn persistent(&self) -> bool {
        self.expiry != Some(Duration::ZERO)
    }

    /// The clean session flag of the broker's session (3.1.1): set only for a clean start
    /// of a session that ends with its connection. A resumed session that is to end then
    /// is resumed and purged at the end; a clean start of a lasting one purges first.
    pub(super) fn broker_clean(&self) -> bool {
        self.clean_start && !self.persistent()
    }
}

/// How a connection's session begins.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Opening {
    /// The broker holds a session of the device: attach before the CONNACK.
    pub attach: bool,
    /// A kept session was opened under other rights: it ends now (the broker's part by a
    /// purge before attaching, the edge's by forgetting it).
    pub stale: bool,
    /// The broker's part of the kept session ends before attaching, as asked (clean start
    /// of a session that outlives its connection) or because it expired.
    pub discard: bool,
    /// "Session present" for a CONNACK the edge answers itself.
    pub present: bool,
    /// This connection's, for [`Sessions::ended`].
    pub generation: u64,
}

impl Sessions {
    fn book(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Kept>> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection of `device`, admitted with `acl`, opens its session.
    pub(super) fn open(&self, device: &DeviceId, acl: &Acl, ask: SessionAsk) -> Opening {
        self.open_at(device, acl, ask, Instant::now())
    }

    fn open_at(&self, device: &DeviceId, acl: &Acl, ask: SessionAsk, now: Instant) -> Opening {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut book = self.book();
        let previous = book.remove(device);
        let clean = ask.clean_start;
        let persistent = ask.persistent();
        let opening = match &previous {
            None => Opening {
                attach: false,
                stale: false,
                discard: false,
                present: false,
                generation,
            },
            Some(k) => {
                let expired = k.expires.is_some_and(|at| at <= now);
                if expired {
                    tracing::info!(event = "edge.session_expired", %device, "the kept session expired; the device begins afresh");
                }
                // What a clean session discards anyway is not stale.
                let stale = !clean && !expired && k.persistent && k.acl != *acl;
                // A clean start with clean session 0 towards the broker (the session is
                // to outlive the connection) must end the broker's part first.
                let discard = k.brokered && (expired || (clean && persistent));
                Opening {
                    attach: k.brokered,
                    stale,
                    discard,
                    present: !clean && !expired && k.persistent && !stale,
                    generation,
                }
            }
        };
        book.insert(
            device.clone(),
            Kept {
                acl: acl.clone(),
                persistent,
                // Attached with a clean session, the broker ends its part of the session
                // at this connection's end.
                brokered: opening.attach && !ask.broker_clean(),
                expires: None,
                generation,
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

    /// The connection `generation` of `device` ended; its session outlives it by `expiry`
    /// (`None`: for ever), and the broker's part was purged if `purged`. A connection
    /// taken over by a newer one changes nothing.
    pub(super) fn ended(
        &self,
        device: &DeviceId,
        generation: u64,
        expiry: Option<Duration>,
        purged: bool,
    ) {
        self.ended_at(device, generation, expiry, purged, Instant::now());
    }

    fn ended_at(
        &self,
        device: &DeviceId,
        generation: u64,
        expiry: Option<Duration>,
        purged: bool,
        now: Instant,
    ) {
        let mut book = self.book();
        let Some(k) = book.get_mut(device).filter(|k| k.generation == generation) else {
            return;
        };
        if purged || expiry == Some(Duration::ZERO) {
            k.persistent = false;
            k.brokered &= !purged;
        }
        k.expires = expiry.map(|e| now + e);
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

    /// (attach, stale, discard, present)
    fn shape(o: &Opening) -> (bool, bool, bool, bool) {
        (o.attach, o.stale, o.discard, o.present)
    }

    #[test]
    fn a_device_is_attached_at_connect_only_while_the_broker_keeps_its_session() {
        let s = Sessions::default();
        let d = DeviceId::parse("pump-1").unwrap();
        let a = acl("ward/pump-1/#");
        let fresh = (false, false, false, false);
        let open = |clean| shape(&s.open(&d, &a, SessionAsk::v4(clean)));
        assert_eq!(open(true), fresh, "first, clean");
        assert_eq!(open(false), fresh, "nothing was kept");
        // Persistent, never attached: the edge keeps the session and says so.
        assert_eq!(open(false), (false, false, false, true));
        // Attached (it subscribed) with clean session 0: the broker keeps its part.
        s.attached(&d, false);
        assert_eq!(open(false), (true, false, false, true));
        // A clean session attaches once more, to end the broker's session, and then not.
        assert_eq!(open(true), (true, false, false, false));
        assert_eq!(open(true), fresh);
    }

    #[test]
    fn a_session_kept_under_other_rights_is_stale() {
        let s = Sessions::default();
        let d = DeviceId::parse("pump-1").unwrap();
        s.open(&d, &acl("ward/pump-1/#"), SessionAsk::v4(false));
        s.attached(&d, false);
        let o = s.open(&d, &acl("ward/pump-1/vitals/#"), SessionAsk::v4(false));
        assert!(o.attach && o.stale && !o.present, "{o:?}");
        // A clean session ends the old one anyway: nothing stale to report.
        s.open(&d, &acl("ward/pump-1/#"), SessionAsk::v4(false));
        let o = s.open(&d, &acl("ward/other/#"), SessionAsk::v4(true));
        assert!(!o.stale && !o.present, "{o:?}");
        // An attach with a clean session keeps nothing in the broker.
        s.attached(&d, true);
        assert!(
            !s.open(&d, &acl("ward/other/#"), SessionAsk::v4(false))
                .attach
        );
    }

    #[test]
    fn an_mqtt5_session_expires_after_its_interval() {
        let s = Sessions::default();
        let d = DeviceId::parse("pump-1").unwrap();
        let a = acl("ward/pump-1/#");
        let t0 = Instant::now();
        let o = s.open_at(&d, &a, SessionAsk::v5(false, 60), t0);
        s.attached(&d, false);
        s.ended_at(&d, o.generation, Some(Duration::from_secs(60)), false, t0);
        // Within the interval it resumes.
        let o = s.open_at(
            &d,
            &a,
            SessionAsk::v5(false, 60),
            t0 + Duration::from_secs(59),
        );
        assert_eq!(shape(&o), (true, false, false, true));
        s.ended_at(
            &d,
            o.generation,
            Some(Duration::from_secs(60)),
            false,
            t0 + Duration::from_secs(59),
        );
        // Past it, the broker's part is discarded and nothing is present.
        let o = s.open_at(
            &d,
            &a,
            SessionAsk::v5(false, 60),
            t0 + Duration::from_secs(120),
        );
        assert_eq!(shape(&o), (true, false, true, false));
        // An older connection ending changes nothing of the newer one's session.
        s.ended_at(
            &d,
            o.generation.wrapping_sub(1),
            Some(Duration::ZERO),
            true,
            t0,
        );
        s.attached(&d, false);
        let o = s.open_at(
            &d,
            &a,
            SessionAsk::v5(false, 60),
            t0 + Duration::from_secs(121),
        );
        assert!(o.present && o.attach, "{o:?}");
    }

    #[test]
    fn an_mqtt5_clean_start_of_a_lasting_session_discards_the_kept_one() {
        let s = Sessions::default();
        let d = DeviceId::parse("pump-1").unwrap();
        let a = acl("ward/pump-1/#");
        s.open(&d, &a, SessionAsk::v5(false, u32::MAX));
        s.attached(&d, false);
        let o = s.open(&d, &a, SessionAsk::v5(true, 3600));
        assert_eq!(shape(&o), (true, false, true, false));
        // Resumed with expiry 0 and purged at the end: nothing kept after.
        s.attached(&d, false);
        let o = s.open(&d, &a, SessionAsk::v5(false, 0));
        assert!(o.attach && o.present, "{o:?}");
        s.ended(&d, o.generation, Some(Duration::ZERO), true);
        let o = s.open(&d, &a, SessionAsk::v5(false, 0));
        assert_eq!(shape(&o), (false, false, false, false));
    }
}
