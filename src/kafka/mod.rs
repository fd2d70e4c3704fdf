//! The Kafka side: topic creation, the start-up state restore, and the sink that owns the
//! producer. See `sink` for what is durable when.

pub mod refusal;
pub mod restore;
pub mod sink;

pub use restore::{
    check_state_topic, ensure_topics, first_with_records, probe_denied, probe_transactions,
    read_state, restore, transaction_log_problem, TopicSpec,
};
pub use sink::{Batch, OutRecord, Sink, SinkError, SinkHandle};
