//! The suppression list: recipients a tenant must not send to (hard
//! bounces, complaints, unsubscribes, manual). Dispatchers check it before
//! every attempt, retries included; a suppressed recipient gets a
//! *suppressed* outcome instead of a delivery.
//!
//! `POST /v1/suppressions` adds recipients, `GET` and `DELETE
//! /v1/suppressions/{recipient}` read and lift one.

use crate::request::Segment;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ledger_schemas::{normalise_recipient, TenantId};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

use crate::problem::ApiError;
use crate::request::{authenticate, read_body, require_json};
use crate::validate::{self, Errors};
use crate::AppState;

pub const MAX_RECIPIENTS: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    HardBounce,
    Complaint,
    Unsubscribe,
    Manual,
    /// A push subscription the push service reported gone.
    ExpiredSubscription,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HardBounce => "hard_bounce",
            Reason::Complaint => "complaint",
            Reason::Unsubscribe => "unsubscribe",
            Reason::Manual => "manual",
            Reason::ExpiredSubscription => "expired_subscription",
        }
    }
}

/// `POST /v1/suppressions`: recipients to stop sending to.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SuppressionRequest {
    /// Addresses or endpoint URLs, 1 to 1,000.
    pub recipients: Vec<String>,
    pub reason: Reason,
}

/// Adds `recipients` to `tenant`'s list; an existing entry keeps its first
/// reason. Returns how many were new.
pub async fn add(
    ops: &PgPool,
    tenant: &TenantId,
    recipients: &[String],
    reason: Reason,
    source: &str,
) -> Result<u64, sqlx::Error> {
    let normalised: Vec<String> = recipients.iter().map(|r| normalise_recipient(r)).collect();
    let added = sqlx::query(
        "-- ingest::suppressions::add
         INSERT INTO suppressions (tenant_id, recipient, reason, source)
         SELECT $1, r, $3, $4 FROM unnest($2::text[]) AS r
         ON CONFLICT (tenant_id, recipient) DO NOTHING",
    )
    .bind(tenant.as_str())
    .bind(&normalised)
    .bind(reason.as_str())
    .bind(source)
    .execute(ops)
    .await?;
    Ok(added.rows_affected())
}

pub async fn create(State(state): State<Arc<AppState>>, request: Request) -> Response {
    create_inner(&state, request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn create_inner(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let tenant = authenticate(state, &parts.headers).await?;
    require_json(&parts.headers)?;
    let bytes = read_body(body, state.config.http.max_body_bytes).await?;
    let request: SuppressionRequest = validate::parse(&bytes)?;
    let mut errors = Errors::new();
    if request.recipients.is_empty() || request.recipients.len() > MAX_RECIPIENTS {
        errors.add("recipients".into(), format!("between 1 and {MAX_RECIPIENTS} recipients"));
    }
    for (i, r) in request.recipients.iter().enumerate() {
        let r = r.trim();
        if r.is_empty() || r.len() > 2048 || r.chars().any(char::is_control) {
            errors.add(format!("recipients[{i}]"), "a recipient is 1 to 2048 printable characters".into());
        }
    }
    errors.into_result()?;
    let added = add(&state.ops, &tenant, &request.recipients, request.reason, "api").await?;
    Ok((StatusCode::OK, Json(json!({ "added": added, "already_suppressed": request.recipients.len() as u64 - added })))
        .into_response())
}

pub async fn show(State(state): State<Arc<AppState>>, Segment(recipient): Segment, request: Request) -> Response {
    show_inner(&state, &recipient, request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn show_inner(state: &AppState, recipient: &str, request: Request) -> Result<Response, ApiError> {
    let tenant = authenticate(state, request.headers()).await?;
    let row: Option<(String, String, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "-- ingest::suppressions::show
         SELECT recipient, reason, source, created_at FROM suppressions WHERE tenant_id = $1 AND recipient = $2",
    )
    .bind(tenant.as_str())
    .bind(normalise_recipient(recipient))
    .fetch_optional(&state.ops)
    .await?;
    let (recipient, reason, source, created_at) = row.ok_or(ApiError::NotFound)?;
    Ok(Json(json!({ "recipient": recipient, "reason": reason, "source": source, "created_at": created_at }))
        .into_response())
}

pub async fn remove(State(state): State<Arc<AppState>>, Segment(recipient): Segment, request: Request) -> Response {
    remove_inner(&state, &recipient, request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn remove_inner(state: &AppState, recipient: &str, request: Request) -> Result<Response, ApiError> {
    let tenant = authenticate(state, request.headers()).await?;
    let removed = sqlx::query(
        "-- ingest::suppressions::remove
         DELETE FROM suppressions WHERE tenant_id = $1 AND recipient = $2",
    )
    .bind(tenant.as_str())
    .bind(normalise_recipient(recipient))
    .execute(&state.ops)
    .await?;
    if removed.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
