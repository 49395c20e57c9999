//! `GET /v1/intents/{id}` and `GET /v1/messages/{id}`: status from the read
//! model, which is eventually consistent (the projector folds the log into
//! it within moments, not within the request).

use crate::request::Segment;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::campaigns::owned_intent;
use crate::problem::ApiError;
use crate::request::authenticate;
use crate::AppState;

pub async fn intent(State(state): State<Arc<AppState>>, Segment(id): Segment, request: Request) -> Response {
    intent_status(&state, &id, request).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn message(State(state): State<Arc<AppState>>, Segment(id): Segment, request: Request) -> Response {
    message_status(&state, &id, request).await.unwrap_or_else(IntoResponse::into_response)
}

fn eventually_consistent(body: Value) -> Response {
    let mut r = Json(body).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn intent_status(state: &AppState, id: &str, request: Request) -> Result<Response, ApiError> {
    let tenant = authenticate(state, request.headers()).await?;
    let intent = owned_intent(state, &tenant, id).await?;
    let row: Option<Value> = sqlx::query_scalar(
        "-- ingest::status::intent_status (intent)
         SELECT to_jsonb(i) - 'tenant_id' FROM intents i WHERE intent_id = $1 AND tenant_id = $2",
    )
    .bind(intent.0)
    .bind(tenant.as_str())
    .fetch_optional(&state.reporting)
    .await?;
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "-- ingest::status::intent_status (messages by status)
         SELECT status, count(*) FROM messages WHERE intent_id = $1 AND tenant_id = $2 GROUP BY status ORDER BY status",
    )
    .bind(intent.0)
    .bind(tenant.as_str())
    .fetch_all(&state.reporting)
    .await?;
    let cancelled_at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "-- ingest::status::intent_status (cancellation)
         SELECT cancelled_at FROM intent_cancellations WHERE intent_id = $1",
    )
    .bind(intent.0)
    .fetch_optional(&state.reporting)
    .await?;
    let terminal_statuses = ["delivered", "failed", "render_failed", "suppressed", "cancelled", "dead_lettered"];
    let terminal: i64 = counts.iter().filter(|(s, _)| terminal_statuses.contains(&s.as_str())).map(|(_, n)| n).sum();
    let by_status: Map<String, Value> = counts.iter().map(|(s, n)| (s.clone(), Value::from(*n))).collect();
    let recipients = row.as_ref().and_then(|r| r["recipient_count"].as_i64());
    let mut body = json!({
        "intent_id": intent,
        "consistency": "eventual",
        "projected": row.is_some(),
        "messages": by_status,
        "terminal": terminal,
        "complete": recipients.is_some_and(|n| terminal >= n),
        "cancelled_at": cancelled_at,
    });
    if let (Some(Value::Object(fields)), Some(out)) = (row, body.as_object_mut()) {
        for (k, v) in fields {
            out.entry(k).or_insert(v);
        }
    }
    Ok(eventually_consistent(body))
}

async fn message_status(state: &AppState, id: &str, request: Request) -> Result<Response, ApiError> {
    let tenant = authenticate(state, request.headers()).await?;
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    let row: Option<Value> = sqlx::query_scalar(
        "-- ingest::status::message_status
         SELECT to_jsonb(m) - 'status_rank' - 'error_attempt' - 'tenant_id'
         FROM messages m WHERE message_id = $1 AND tenant_id = $2",
    )
    .bind(id)
    .bind(tenant.as_str())
    .fetch_optional(&state.reporting)
    .await?;
    // Not yet projected looks the same as another tenant's: 404.
    let mut row = row.ok_or(ApiError::NotFound)?;
    if let Some(obj) = row.as_object_mut() {
        obj.insert("consistency".into(), Value::from("eventual"));
    }
    Ok(eventually_consistent(row))
}
