//! What every role of the ledger shares: layered configuration, Kafka client
//! setup, database pools, telemetry and graceful shutdown.

pub mod config;
pub mod db;
pub mod error;
pub mod kafka;
pub mod shutdown;
pub mod telemetry;

pub use config::{Config, FeedbackConfig, IdentityConfig, Mode, ProviderKind, SinkFailure, SinkFailureKind};
pub use error::RuntimeError;
pub use shutdown::Shutdown;

/// Operational-store migrations (idempotency keys, tenants, delivery
/// claims): the state the sending machinery needs, kept apart from the
/// reporting read model.
pub static OPS_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
