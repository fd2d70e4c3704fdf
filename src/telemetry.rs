//! Logging: tracing to stderr, human-readable on a TTY and JSON lines otherwise.
//!
//! The filter comes from `IBSTREAM_LOG` (then `RUST_LOG`), default `info`, in the
//! `target=level` syntax (`info,ibstream::crm=debug`).

use std::io::IsTerminal;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber; a second call does nothing.
pub fn init() {
    let spec = std::env::var("IBSTREAM_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_default();
    let filter = spec
        .parse::<Targets>()
        .unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO));
    let filter = if spec.trim().is_empty() {
        Targets::new().with_default(LevelFilter::INFO)
    } else {
        filter
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = if std::io::stderr().is_terminal() {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    let _ = result;
}
