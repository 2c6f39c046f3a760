//! Per-device message policy: which topics a device may publish and subscribe, and at what
//! rate, and how urgent each of its topics is. The edge consults it for every PUBLISH and SUBSCRIBE; quarantine, which acts on
//! what policy finds, is in [`crate::quarantine`].

pub mod acl;
pub mod priority;
pub mod rate;

pub use acl::{Acl, FilterTemplate, TopicError, TopicFilter};
pub use priority::{Priorities, Priority};
pub use rate::{Admission, DeviceRates, RateLimiter, RateLimits};
