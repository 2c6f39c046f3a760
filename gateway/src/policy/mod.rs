//! Per-device message policy: which topics a device may publish and subscribe.
//!
//! Pure functions only; the edge calls them for every PUBLISH and SUBSCRIBE. Quarantine
//! joins this module in its own issue.

pub mod acl;
pub mod rate;

pub use acl::{Acl, FilterTemplate, TopicError, TopicFilter};
pub use rate::{RateLimiter, RateLimits};
