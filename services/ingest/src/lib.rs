//! The ingest API: event producers submit send intents over HTTP.
//!
//! Guarantees: a 202 is returned only after the broker acknowledged every
//! event of the intent (idempotent producer, `acks=all`), so an accepted
//! intent is durable (invariant 1). The same tenant, `Idempotency-Key` and
//! body always yield the same response and ids; the same key with another
//! body is refused with 409 (invariant 2). Invalid requests are refused
//! before anything is written (invariant 7). A tenant sees only its own
//! intents and messages: another tenant's ids are 404.

pub mod campaigns;
pub mod feedback;
pub mod linger;
pub mod messages;
pub mod openapi;
pub mod problem;
mod recipient_line;
pub mod request;
pub mod status;
pub mod submit;
pub mod suppressions;
pub mod templates;
pub mod tenants;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use axum::{Json, Router};
use ledger_runtime::{kafka, Config, RuntimeError, Shutdown};
use rdkafka::producer::FutureProducer;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::request::HEADER_CORRELATION_ID;
use crate::tenants::Authenticator;

pub struct AppState {
    pub config: Config,
    pub producer: FutureProducer,
    pub ops: PgPool,
    /// The operational store without waiting for commits to reach the disk:
    /// for `submit::record_accepted` only.
    pub ops_relaxed: PgPool,
    /// The responses being recorded, which their answers do not wait for
    /// (`submit::record_accepted`); the server waits for them on shutdown.
    pub records: TaskTracker,
    /// Bounds `records`: a request whose response cannot be recorded yet
    /// waits for a slot before it is answered.
    pub record_slots: Arc<Semaphore>,
    /// The read model, for status requests only.
    pub reporting: PgPool,
    pub auth: Authenticator,
}

/// Every route, as (method, path): the router and the OpenAPI document are
/// both checked against this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/messages"),
    ("post", "/v1/messages/batch"),
    ("post", "/v1/campaigns"),
    ("post", "/v1/campaigns/{id}/cancel"),
    ("get", "/v1/intents/{id}"),
    ("get", "/v1/messages/{id}"),
    ("post", "/v1/templates"),
    ("get", "/v1/templates/{name}"),
    ("post", "/v1/suppressions"),
    ("get", "/v1/suppressions/{recipient}"),
    ("delete", "/v1/suppressions/{recipient}"),
    ("post", "/v1/feedback/{source}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// A built ingest server, bound to its address and ready to run.
pub struct Ingest {
    listener: TcpListener,
    router: Router,
    records: TaskTracker,
}

/// Connects to the broker and the databases and binds the listener. Nothing
/// is sent until requests arrive.
pub async fn build(config: &Config) -> Result<Ingest, RuntimeError> {
    let producer = kafka::producer_lingering(config, config.kafka.ingest_linger_ms)?;
    let ops = ledger_runtime::db::pool(&config.ops_database_url, 16).await?;
    let ops_relaxed = ledger_runtime::db::pool_without_commit_wait(&config.ops_database_url, 8).await?;
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 4).await?;
    let listener = TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| RuntimeError::Config(format!("cannot listen on {}: {e}", config.http.listen)))?;
    let records = TaskTracker::new();
    let state = Arc::new(AppState {
        config: config.clone(),
        producer,
        ops,
        ops_relaxed,
        reporting,
        auth: Authenticator::default(),
        records: records.clone(),
        record_slots: Arc::new(Semaphore::new(submit::RECORDS_IN_FLIGHT)),
    });
    let router = Router::new()
        .route(ROUTES[0].1, post(messages::send_message))
        .route(ROUTES[1].1, post(messages::send_batch))
        .route(ROUTES[2].1, post(campaigns::submit))
        .route(ROUTES[3].1, post(campaigns::cancel))
        .route(ROUTES[4].1, get(status::intent))
        .route(ROUTES[5].1, get(status::message))
        .route(ROUTES[6].1, post(templates::create))
        .route(ROUTES[7].1, get(templates::list))
        .route(ROUTES[8].1, post(suppressions::create))
        .route(ROUTES[9].1, get(suppressions::show).delete(suppressions::remove))
        .route(ROUTES[11].1, post(feedback::receive))
        .route(ROUTES[12].1, get(|| async { "ok" }))
        .route(ROUTES[13].1, get(ready))
        .route(ROUTES[14].1, get(metrics_endpoint))
        .route(ROUTES[15].1, get(openapi::serve))
        .fallback(|| async { problem::ApiError::NotFound })
        .layer(middleware::from_fn(observe))
        .with_state(state);
    Ok(Ingest { listener, router, records })
}

impl Ingest {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until `shutdown`; in-flight requests finish first, then the
    /// recording of the responses already sent.
    pub async fn run(self, shutdown: Shutdown) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "ingest listening");
        let served = axum::serve(linger::LingeringListener(self.listener), self.router)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        self.records.close();
        self.records.wait().await;
        served
    }
}

/// Request metrics by route and status, and the correlation id echoed.
async fn observe(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let correlation = request::correlation_id(request.headers());
    let mut response = next.run(request).await;
    metrics::counter!("ledger_http_requests_total", "route" => route.clone(), "status" => response.status().as_u16().to_string())
        .increment(1);
    metrics::histogram!("ledger_http_request_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    if !response.headers().contains_key(HEADER_CORRELATION_ID) {
        if let Ok(v) = HeaderValue::from_str(&correlation) {
            response.headers_mut().insert(HEADER_CORRELATION_ID, v);
        }
    }
    response
}

async fn metrics_endpoint() -> impl IntoResponse {
    let body = ledger_runtime::telemetry::metrics_handle().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let db = sqlx::query("-- ingest::ready\nSELECT 1").execute(&state.ops).await.is_ok();
    let broker = ledger_runtime::kafka::broker_answers(&state.producer).await;
    let status = if db && broker { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "database": db, "broker": broker }))).into_response()
}

/// A 202 with the intent's location and the correlation id.
pub fn accepted(
    response: impl serde::Serialize,
    location: Option<&str>,
    replayed: bool,
    correlation: &str,
) -> Response {
    let mut r = (StatusCode::ACCEPTED, Json(response)).into_response();
    let h = r.headers_mut();
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        h.insert(header::LOCATION, loc);
    }
    if let Ok(v) = HeaderValue::from_str(correlation) {
        h.insert(HEADER_CORRELATION_ID, v);
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    r
}
