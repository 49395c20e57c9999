//! The ingest API: event producers submit send intents over HTTP.
//!
//! Guarantees: a 202 is returned only after the broker acknowledged every
//! event of the intent (idempotent producer, `acks=all`), so an accepted
//! intent is durable (invariant 1). The same tenant, `Idempotency-Key` and
//! body always yield the same intent id; the same key with another body is
//! refused with 409 (invariant 2). Invalid requests are refused before
//! anything is written (invariant 7).

pub mod problem;
pub mod tenants;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use ledger_runtime::{kafka, Config, Shutdown};
use ledger_schemas::{
    Event, EventBody, EventId, IntentAccepted, IntentId, IntentKind, MessageId, Recipient, RecipientBatch, TenantId,
    Topic,
};
use rdkafka::producer::FutureProducer;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::problem::ApiError;
use crate::tenants::Authenticator;
use crate::validate::SendMessage;

pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const HEADER_CORRELATION_ID: &str = "x-correlation-id";

struct AppState {
    config: Config,
    producer: FutureProducer,
    ops: PgPool,
    auth: Authenticator,
}

/// A built ingest server, bound to its address and ready to run.
pub struct Ingest {
    listener: TcpListener,
    router: Router,
}

/// Connects to the broker and the operational store and binds the listener.
/// Nothing is sent until requests arrive.
pub async fn build(config: &Config) -> anyhow_free::Result<Ingest> {
    let producer = kafka::producer(config)?;
    let ops = ledger_runtime::db::pool(&config.ops_database_url, 16).await?;
    let listener = TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| ledger_runtime::RuntimeError::Config(format!("cannot listen on {}: {e}", config.http.listen)))?;
    let state = Arc::new(AppState { config: config.clone(), producer, ops, auth: Authenticator::default() });
    let router = Router::new()
        .route("/v1/messages", post(send_message))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_endpoint))
        .with_state(state);
    Ok(Ingest { listener, router })
}

/// `anyhow` stays at the edges; the library speaks `RuntimeError`.
mod anyhow_free {
    pub type Result<T> = std::result::Result<T, ledger_runtime::RuntimeError>;
}

impl Ingest {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until `shutdown`; in-flight requests finish first.
    pub async fn run(self, shutdown: Shutdown) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "ingest listening");
        axum::serve(self.listener, self.router).with_graceful_shutdown(async move { shutdown.wait().await }).await
    }
}

async fn metrics_endpoint() -> impl IntoResponse {
    let body = ledger_runtime::telemetry::metrics_handle().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let db = sqlx::query("-- ingest::ready\nSELECT 1").execute(&state.ops).await.is_ok();
    let producer = state.producer.clone();
    let broker = tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        producer.client().fetch_metadata(None, Duration::from_secs(1)).is_ok()
    })
    .await
    .unwrap_or(false);
    let status = if db && broker { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "database": db, "broker": broker }))).into_response()
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    state.auth.tenant(&state.ops, key.trim()).await?.ok_or(ApiError::Unauthorized)
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers.get(HEADER_IDEMPOTENCY_KEY).ok_or_else(|| ApiError::IdempotencyKey("it is missing".into()))?;
    let key = value.to_str().map_err(|_| ApiError::IdempotencyKey("it must be printable ASCII".into()))?.trim();
    if key.is_empty() || key.len() > 255 {
        return Err(ApiError::IdempotencyKey("it must be 1 to 255 characters".into()));
    }
    Ok(key.to_owned())
}

fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get(HEADER_CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

async fn read_json_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let mime = v.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = state.config.http.max_body_bytes;
    axum::body::to_bytes(body, limit).await.map(|b| b.to_vec()).map_err(|_| ApiError::TooLarge(limit))
}

/// SHA-256 of the body's canonical JSON (keys sorted, no whitespace): the
/// same request with other formatting is the same request.
fn request_hash(bytes: &[u8]) -> Result<Vec<u8>, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::InvalidBody(vec![problem::FieldError { field: String::new(), detail: e.to_string() }])
    })?;
    let canonical = serde_json::to_vec(&value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Sha256::digest(&canonical).to_vec())
}

/// What an idempotency claim found.
enum Claim {
    /// First time (or the previous attempt never got its ack): produce.
    Produce(IntentId),
    /// Accepted before: answer the same again.
    Replay(Value),
}

async fn claim_key(state: &AppState, tenant: &TenantId, key: &str, hash: &[u8]) -> Result<Claim, ApiError> {
    let ttl = chrono::Duration::hours(i64::from(state.config.http.idempotency_ttl_hours));
    let intent = IntentId::from_idempotency_key(tenant, key);
    let inserted = sqlx::query(
        "-- ingest::claim_key (insert)
         INSERT INTO idempotency_keys (tenant_id, key, request_hash, intent_id, state, expires_at)
         VALUES ($1, $2, $3, $4, 'pending', $5)
         ON CONFLICT (tenant_id, key) DO NOTHING",
    )
    .bind(tenant.as_str())
    .bind(key)
    .bind(hash)
    .bind(intent.0)
    .bind(Utc::now() + ttl)
    .execute(&state.ops)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Claim::Produce(intent));
    }
    let (stored_hash, intent_id, stored_state, response, expired): (Vec<u8>, Uuid, String, Option<Value>, bool) =
        sqlx::query_as(
            "-- ingest::claim_key (existing)
             SELECT request_hash, intent_id, state, response, expires_at < now()
             FROM idempotency_keys WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant.as_str())
        .bind(key)
        .fetch_one(&state.ops)
        .await?;
    if expired {
        // The key outlived its retention: it starts a new intent, which must
        // not share message ids with the old one.
        let fresh = IntentId(Uuid::new_v4());
        let updated = sqlx::query(
            "-- ingest::claim_key (reuse expired)
             UPDATE idempotency_keys
             SET request_hash = $3, intent_id = $4, state = 'pending', response = NULL, created_at = now(), expires_at = $5
             WHERE tenant_id = $1 AND key = $2 AND expires_at < now()",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(hash)
        .bind(fresh.0)
        .bind(Utc::now() + ttl)
        .execute(&state.ops)
        .await?;
        if updated.rows_affected() == 1 {
            return Ok(Claim::Produce(fresh));
        }
        // Someone else renewed it first: start over with their row.
        return Box::pin(claim_key(state, tenant, key, hash)).await;
    }
    if stored_hash != hash {
        return Err(ApiError::IdempotencyConflict);
    }
    match (stored_state.as_str(), response) {
        ("accepted", Some(r)) => Ok(Claim::Replay(r)),
        // Pending: an earlier attempt did not get its ack (or is in flight).
        // Producing again is safe: every id below is derived, so consumers
        // see the same events twice and do nothing new.
        _ => Ok(Claim::Produce(IntentId(intent_id))),
    }
}

fn accepted(response: Value, intent: &str, replayed: bool, correlation: &str) -> Response {
    let mut r = (StatusCode::ACCEPTED, Json(response)).into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/intents/{intent}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(correlation) {
        h.insert(HEADER_CORRELATION_ID, v);
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    r
}

async fn send_message(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let result = handle_send_message(&state, request).await;
    let response = result.unwrap_or_else(IntoResponse::into_response);
    metrics::counter!("ledger_http_requests_total", "route" => "/v1/messages", "status" => response.status().as_u16().to_string())
        .increment(1);
    metrics::histogram!("ledger_http_request_seconds", "route" => "/v1/messages")
        .record(started.elapsed().as_secs_f64());
    response
}

async fn handle_send_message(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let tenant = authenticate(state, &parts.headers).await?;
    let key = idempotency_key(&parts.headers)?;
    let correlation = correlation_id(&parts.headers);
    let bytes = read_json_body(state, &parts.headers, body).await?;
    let message: SendMessage = validate::parse(&bytes)?;
    message.validate()?;
    let hash = request_hash(&bytes)?;

    let intent = match claim_key(state, &tenant, &key, &hash).await? {
        Claim::Replay(response) => {
            let id = response["intent_id"].as_str().unwrap_or_default().to_owned();
            return Ok(accepted(response, &id, true, &correlation));
        }
        Claim::Produce(intent) => intent,
    };

    let now = Utc::now();
    let recipient = Recipient { address: message.to.clone(), variables: message.variables.clone() };
    let message_id = MessageId::derive(intent, &recipient.address);
    let envelope = |body: EventBody, what: &str, seq: u32| Event {
        event_id: EventId::derive(intent.0, what, seq),
        body,
        tenant_id: tenant.clone(),
        intent_id: intent,
        message_id: None,
        occurred_at: now,
        correlation_id: correlation.clone(),
    };
    let header = envelope(
        EventBody::IntentAccepted(IntentAccepted {
            kind: IntentKind::Single,
            channel: message.channel,
            priority: message.priority,
            from: message.from.clone(),
            recipient_count: 1,
            batch_count: 1,
            send_at: message.send_at,
            request_hash: hex::encode(&hash),
        }),
        "accepted",
        0,
    );
    let batch = envelope(
        EventBody::RecipientBatch(RecipientBatch {
            batch_index: 0,
            batch_count: 1,
            channel: message.channel,
            priority: message.priority,
            from: message.from.clone(),
            content: message.content.clone(),
            recipients: vec![recipient],
            send_at: message.send_at,
        }),
        "batch",
        0,
    );
    let key_str = intent.to_string();
    // Both records share the intent's key, hence its partition and order.
    let (a, b) = futures::join!(
        kafka::send_event(&state.producer, &state.config, Topic::Intents, &key_str, &header),
        kafka::send_event(&state.producer, &state.config, Topic::Intents, &key_str, &batch),
    );
    a.and(b).map_err(|e| ApiError::BrokerUnavailable(e.to_string()))?;

    let response = json!({
        "intent_id": intent,
        "message_id": message_id,
        "status": "accepted",
    });
    sqlx::query(
        "-- ingest::send_message (accepted)
         UPDATE idempotency_keys SET state = 'accepted', response = $3 WHERE tenant_id = $1 AND key = $2",
    )
    .bind(tenant.as_str())
    .bind(&key)
    .bind(&response)
    .execute(&state.ops)
    .await?;
    metrics::counter!("ledger_intents_accepted_total", "tenant" => tenant.0.clone(), "kind" => "single").increment(1);
    tracing::debug!(intent_id = %intent, tenant = %tenant, correlation_id = %correlation, "intent accepted");
    Ok(accepted(response, &key_str, false, &correlation))
}
