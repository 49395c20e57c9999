//! `/metrics`, `/healthz` and `/readyz` for a process that runs roles but
//! not the ingest API (which serves them itself): what Prometheus scrapes
//! and what a cluster's probes ask.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ledger_runtime::{Config, Shutdown};
use rdkafka::producer::FutureProducer;
use serde_json::json;
use sqlx::PgPool;

struct Probe {
    producer: FutureProducer,
    /// The databases the process's roles use, by name.
    databases: Vec<(&'static str, PgPool)>,
}

/// Binds the listener now (so that a taken port fails the start) and
/// returns the address and the server to run.
pub async fn serve(
    config: &Config,
    databases: Vec<(&'static str, String)>,
    shutdown: Shutdown,
) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = anyhow::Result<()>>)> {
    let mut pools = Vec::new();
    for (name, url) in databases {
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        pools.push((name, sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_lazy_with(options)));
    }
    let probe = Arc::new(Probe { producer: ledger_runtime::kafka::producer(config)?, databases: pools });
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(ready))
        .with_state(probe);
    let listener = tokio::net::TcpListener::bind(config.telemetry.metrics_listen).await.map_err(|e| {
        anyhow::anyhow!("serving metrics on {}: {e} (telemetry.metrics_listen)", config.telemetry.metrics_listen)
    })?;
    let addr = listener.local_addr()?;
    let server = async move {
        axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.wait().await }).await?;
        Ok(())
    };
    Ok((addr, server))
}

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ledger_runtime::telemetry::metrics_handle().render())
}

async fn ready(State(probe): State<Arc<Probe>>) -> Response {
    let broker = ledger_runtime::kafka::broker_answers(&probe.producer).await;
    let mut body = serde_json::Map::new();
    body.insert("broker".into(), broker.into());
    let mut ok = broker;
    for (name, pool) in &probe.databases {
        let up =
            tokio::time::timeout(Duration::from_secs(2), sqlx::query("-- ledger::ops::ready\nSELECT 1").execute(pool))
                .await
                .is_ok_and(|r| r.is_ok());
        ok &= up;
        body.insert((*name).into(), up.into());
    }
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(serde_json::Value::Object(body))).into_response()
}
