//! Per-device message policy: which topics a device may publish and subscribe.
//!
//! Pure functions only; the edge calls them for every PUBLISH and SUBSCRIBE. Rate policy and
//! quarantine join this module in their own issue.

pub mod acl;

pub use acl::{Acl, FilterTemplate, TopicError, TopicFilter};
