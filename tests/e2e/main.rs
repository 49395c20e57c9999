//! End-to-end tests: every role built through its production `build`,
//! against the real broker and the real PostgreSQL.

mod broker;
mod delivery;
mod feedback;
mod foundation;
mod hostile;
mod ingest;
mod observability;
mod projection;
mod rendering;
mod replay;
mod reporting;
