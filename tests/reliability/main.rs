//! Reliability scenarios (`make test-reliability`, part of `make test`):
//! every role as a process of its own against the real broker and
//! PostgreSQL, killed, cut off or flooded while a campaign runs; then the
//! same questions each time — is every accepted recipient in exactly one
//! settled state, did anyone get a message twice, does the read model equal
//! a fresh replay of the log. Each scenario adds its row to
//! `target/reliability/report.md`.

mod broker_restart;
mod common;
mod crash;
mod isolation;
mod outage;
