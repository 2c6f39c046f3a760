//! Per-device message policy: which topics a device may publish and subscribe, and at what
//! rate, and how urgent each of its topics is; what counts as a violation, and what a
//! violation costs the device ([`sanction`]). The edge consults it for every PUBLISH and
//! SUBSCRIBE; [`crate::quarantine`] keeps each device's history and carries sanctions out.

pub mod acl;
pub mod priority;
pub mod rate;
pub mod sanction;
pub mod violation;

pub use acl::{Acl, FilterTemplate, TopicError, TopicFilter};
pub use priority::{Priorities, Priority};
pub use rate::{Admission, DeviceRates, RateLimiter, RateLimits};
pub use sanction::{sanction, Offence, Sanction, Threshold};
pub use violation::{Violation, ViolationKind};
