//! Database pools and setup. The operational store and the reporting read
//! model are separate databases with separate pools.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::error::RuntimeError;

pub async fn pool(url: &str, max_connections: u32) -> Result<PgPool, RuntimeError> {
    connect(url, &[], max_connections).await
}

/// A pool whose transactions commit without waiting for their WAL to reach
/// the disk (`synchronous_commit = off`). A crash of PostgreSQL itself can
/// lose the last few hundred milliseconds of them, never corrupt anything.
/// Only for writes whose loss the caller can repair: ingest's record of the
/// response it gave (the key stays *pending*, and a retry produces the same
/// derived events again and gets the same answer).
pub async fn pool_without_commit_wait(url: &str, max_connections: u32) -> Result<PgPool, RuntimeError> {
    connect(url, &[("synchronous_commit", "off")], max_connections).await
}

/// A pool whose connections resolve unqualified names in `schema` first
/// (a read model rebuilt beside the live one).
pub async fn pool_in_schema(url: &str, schema: &str, max_connections: u32) -> Result<PgPool, RuntimeError> {
    connect(url, &[("search_path", schema)], max_connections).await
}

/// A pool on `url` whose connections start with these session settings.
async fn connect(url: &str, settings: &[(&str, &str)], max_connections: u32) -> Result<PgPool, RuntimeError> {
    let mut options = PgConnectOptions::from_str(url)?.log_statements(tracing::log::LevelFilter::Trace);
    if !settings.is_empty() {
        options = options.options(settings.iter().copied());
    }
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?)
}

/// Creates the database `url` names when it does not exist, connecting to
/// the server's `postgres` database to do so.
pub async fn ensure_database(url: &str) -> Result<bool, RuntimeError> {
    let options = PgConnectOptions::from_str(url)?;
    let name = options
        .get_database()
        .ok_or_else(|| RuntimeError::Config(format!("database URL {url} names no database")))?
        .to_owned();
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool = sqlx::query_scalar(
        "-- runtime::db::ensure_database\nSELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
    )
    .bind(&name)
    .fetch_one(&mut admin)
    .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&format!("CREATE DATABASE {quoted}")).execute(&mut admin).await {
            Ok(_) => {}
            // Another process created it between our check and our create.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    admin.close().await?;
    Ok(!exists)
}

/// Creates (if needed) and migrates both databases.
pub async fn migrate(
    ops_url: &str,
    reporting_url: &str,
    reporting: &sqlx::migrate::Migrator,
) -> Result<(), RuntimeError> {
    ensure_database(ops_url).await?;
    ensure_database(reporting_url).await?;
    let ops = pool(ops_url, 2).await?;
    crate::OPS_MIGRATOR.run(&ops).await?;
    ops.close().await;
    let rep = pool(reporting_url, 2).await?;
    reporting.run(&rep).await?;
    rep.close().await;
    Ok(())
}
