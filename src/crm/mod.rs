//! The CRM side: the HTTP client of the Impact CRM "IB Reports" API and its models.
//!
//! Contract (docs/crm-api.md): [`CrmClient`] logs in once and shares its token and request gate
//! with every stream; [`PageIter`] yields every page of a day window; records are read
//! tolerantly into the models of [`models`], and a record that cannot be read is a
//! [`RecordError`] carrying its raw JSON, never a failed page. Errors come as [`CrmError`],
//! whose variants are the classes the poll loop acts on.

pub mod client;
pub mod error;
pub mod fingerprint;
pub mod models;
pub mod page;
pub mod pressure;
pub mod raw;
pub mod stats;
pub mod time;

pub use client::{CrmClient, DateFilter, PageIter, WindowQuery};
pub use error::{CrmError, ForbiddenKind};
pub use models::{
    CrmRecord, Customer, Endpoint, Lead, Position, Server, TradingAccount, Transaction,
};
pub use page::{parse_page, Page, Record, RecordError};
pub use stats::CrmStats;
