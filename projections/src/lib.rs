//! The read model: pure folds from events to rows (`fold`), the SQL that
//! writes folded rows (`store`), and the reporting database's migrations.

pub mod fold;
pub mod store;

pub use fold::{AttemptPatch, Fold, IntentRow, MessagePatch, Status};
pub use store::{apply, AppliedBatch, PartitionOffset, StoreError};

/// Migrations of the reporting database, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
