//! The Avro event model: schemas, encoder, framing, Schema Registry, dead letters.
//!
//! Contract (docs/design.md, "Events (Avro)"): one Avro record per stream (`LeadEvent`, …)
//! with the entity's fields at top level, `meta` and `extra`; every CRM field optional; money as
//! `decimal(38, 8)`, instants as `timestamp-millis`. Schemas come from `schemas/*.avsc`
//! (embedded at build time) and are parsed once by [`Schemas::load`]; per record the
//! [`Encoder`] only builds and writes a value. Framing is Avro single-object encoding without
//! a registry, Confluent's wire format with one ([`encoder_for`] registers or looks up the
//! schemas under `<topic>-value` at start-up). A record the encoder rejects becomes a
//! [`DeadLetter`] for `<prefix>.dlq`; nothing is rounded or dropped silently.

pub mod dead_letter;
pub mod decode;
pub mod encode;
pub mod registry;
pub mod schema;
pub mod tail;

pub use dead_letter::DeadLetter;
pub use encode::{to_value, AvroEvent, EncodeError, Encoder, EventMeta, Framing, Op};
pub use registry::{value_subject, RegistryError, SchemaRegistry};
pub use schema::{EventSchema, EventType, SchemaError, Schemas};

use crate::config::{Config, ConfigError};

/// Errors of setting up the event encoder.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A schema is invalid.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The registry failed or refused.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The encoder could not be built.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Returns the registry subject of each event type under `config`'s topic names.
pub fn subjects(config: &Config) -> Vec<(EventType, String)> {
    EventType::ALL
        .into_iter()
        .map(|e| (e, value_subject(&config.topics.data_topic(e.stream()))))
        .collect()
}

/// Registers (or, without `auto_register`, looks up) every event schema and returns the ids,
/// in [`EventType::ALL`] order.
pub async fn registry_ids(
    config: &Config,
    schemas: &Schemas,
    registry: &SchemaRegistry,
) -> Result<[u32; 5], EventsError> {
    let mut ids = [0u32; 5];
    for (i, (event, subject)) in subjects(config).into_iter().enumerate() {
        ids[i] = registry.id_for(&subject, &schemas.get(event).json).await?;
    }
    Ok(ids)
}

/// Returns the framing `config` asks for: single-object without a registry, Confluent with
/// the registry's ids (registered or looked up now) with one.
pub async fn framing_for(config: &Config, schemas: &Schemas) -> Result<Framing, EventsError> {
    Ok(match &config.schema_registry {
        None => Framing::SingleObject,
        Some(registry_config) => {
            let registry = SchemaRegistry::build(registry_config)?;
            Framing::Confluent {
                ids: registry_ids(config, schemas, &registry).await?,
            }
        }
    })
}

/// Builds the encoder `config` asks for (see [`framing_for`]).
pub async fn encoder_for(config: &Config, schemas: &Schemas) -> Result<Encoder, EventsError> {
    let framing = framing_for(config, schemas).await?;
    Ok(Encoder::new(schemas, framing)?)
}
