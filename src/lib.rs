//! ibstream streams a forex broker's CRM (the Impact CRM "IB Reports" API) into Kafka.
//!
//! Modules, one per concern: [`config`] (figment configuration, validation without IO),
//! [`crm`] (HTTP client and models), [`events`] (Avro schemas, encoder, registry, dead letters), [`sim`] (a CRM simulator serving the same API),
//! [`check`] (the `ibstream check` connectivity report), [`verify`] (`ibstream verify`: the
//! topics against the CRM), [`telemetry`] (logging).

pub mod check;
pub mod config;
pub mod crm;
pub mod demo;
pub mod events;
pub mod kafka;
pub mod net;
pub mod ops;
pub mod run;
pub mod sim;
pub mod state_tool;
pub mod stream;
pub mod telemetry;
pub mod verify;
