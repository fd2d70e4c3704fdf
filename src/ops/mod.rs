//! Operations: the registry of counters and states every part of `run` updates, the
//! Prometheus metrics it is exported as, and the HTTP server (`/metrics`, `/health/live`,
//! `/health/ready`, `/status`, and the status page `/`) on `http.listen`.
//!
//! One registry is the single source: metrics and `/status` read the same values at the
//! moment they are asked for, so they never disagree.

pub mod http;
pub mod metrics;
pub mod page;
pub mod registry;

pub use registry::{CursorStatus, PollerStatus, Registry, Stats};
