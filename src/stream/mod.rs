//! The streams: pollers, day windows, change detection and the state they keep.
//!
//! Contract: a poller's in-memory cursor and fingerprints move only after the sink has
//! acknowledged the batch that persists them (`state`), so the state topic is always at or
//! behind what was emitted – never ahead. A crash therefore re-reads at most the windows in
//! flight, and the fingerprints of what was already committed keep it from being emitted
//! again (in at-least-once mode, events whose state did not make it are emitted again with the
//! same `eventId`).

pub mod change;
pub mod poller;
pub mod state;
pub mod window;
