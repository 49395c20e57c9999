//! Templates: `POST /v1/templates` publishes a new immutable version to the
//! templates topic (the renderers' source); `GET /v1/templates/{name}` lists
//! the versions. The operational store keeps the registry that assigns
//! version numbers and resolves "latest" when an intent is accepted.

use crate::request::Segment;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use ledger_runtime::{kafka, Config};
use ledger_schemas::{Channel, Event, EventBody, EventId, IntentId, TemplatePublished, TemplateRef, TenantId, Topic};
use rdkafka::producer::FutureProducer;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::problem::{ApiError, FieldError};
use crate::request::{authenticate, correlation_id, read_body, require_json};
use crate::validate::{self, Errors, TemplateRequest, TemplateSelector};
use crate::AppState;

pub async fn create(State(state): State<Arc<AppState>>, request: Request) -> Response {
    create_template(&state, request).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn list(State(state): State<Arc<AppState>>, Segment(name): Segment, request: Request) -> Response {
    list_versions(&state, &name, request).await.unwrap_or_else(IntoResponse::into_response)
}

/// The version an intent pins: the one named, or the latest; refused when
/// the template does not exist or is for another channel.
pub async fn resolve(
    ops: &PgPool,
    tenant: &TenantId,
    at: &str,
    selector: &TemplateSelector,
    channel: Channel,
) -> Result<TemplateRef, FieldError> {
    let found: Option<(i32, String)> = sqlx::query_as(
        "-- ingest::templates::resolve
         SELECT version, channel FROM templates
         WHERE tenant_id = $1 AND name = $2 AND ($3::int IS NULL OR version = $3)
         ORDER BY version DESC LIMIT 1",
    )
    .bind(tenant.as_str())
    .bind(&selector.name)
    .bind(selector.version.map(|v| v as i32))
    .fetch_optional(ops)
    .await
    .map_err(|e| FieldError { field: validate::join(at, "template"), detail: format!("lookup failed: {e}") })?;
    match found {
        None => Err(FieldError {
            field: validate::join(at, "template"),
            detail: match selector.version {
                Some(v) => format!("unknown template {} version {v}", selector.name),
                None => format!("unknown template {}", selector.name),
            },
        }),
        Some((_, c)) if c != channel.as_str() => Err(FieldError {
            field: validate::join(at, "template"),
            detail: format!("template {} is for the {c} channel, not {}", selector.name, channel.as_str()),
        }),
        Some((version, _)) => Ok(TemplateRef { name: selector.name.clone(), version: version as u32 }),
    }
}

/// Publishes `request` as the next version of its template, unless the
/// latest version has the same content (then that one is returned, and
/// `created` is false). The version is on the templates topic, acknowledged,
/// before it is committed to the registry.
pub async fn publish(
    config: &Config,
    producer: &FutureProducer,
    ops: &PgPool,
    tenant: &TenantId,
    request: &TemplateRequest,
    correlation: &str,
) -> Result<(u32, bool), ApiError> {
    let mut errors = Errors::new();
    if let Some(p) = validate::template_name_problem(&request.name) {
        errors.add("name".into(), p.into());
    }
    validate::check_content(&mut errors, "", request.channel, &request.content);
    errors.into_result()?;
    let canonical = serde_json::to_vec(&json!({ "channel": request.channel, "content": request.content }))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let hash = Sha256::digest(&canonical).to_vec();

    let mut tx = ops.begin().await?;
    // Publishers of one template take turns; others are not held up.
    sqlx::query("-- ingest::templates::publish (lock)\nSELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("{}/{}", tenant.0, request.name))
        .execute(&mut *tx)
        .await?;
    let latest: Option<(i32, Vec<u8>)> = sqlx::query_as(
        "-- ingest::templates::publish (latest)
         SELECT version, content_hash FROM templates WHERE tenant_id = $1 AND name = $2 ORDER BY version DESC LIMIT 1",
    )
    .bind(tenant.as_str())
    .bind(&request.name)
    .fetch_optional(&mut *tx)
    .await?;
    let (version, created) = match latest {
        Some((v, h)) if h == hash => (v as u32, false),
        Some((v, _)) => (v as u32 + 1, true),
        None => (1, true),
    };
    let published = TemplatePublished {
        name: request.name.clone(),
        version,
        channel: request.channel,
        content: request.content.clone(),
    };
    let key = published.key(tenant);
    let event = Event {
        event_id: EventId::derive(Uuid::new_v5(&Uuid::NAMESPACE_OID, key.as_bytes()), "template", version),
        body: EventBody::TemplatePublished(published),
        tenant_id: tenant.clone(),
        intent_id: IntentId(Uuid::nil()),
        message_id: None,
        occurred_at: Utc::now(),
        correlation_id: correlation.to_owned(),
    };
    // Re-published when unchanged too: harmless (same key and id), and it
    // repairs a version whose record never got its acknowledgement.
    kafka::send_event(producer, config, Topic::Templates, &key, &event).await.map_err(|e| {
        ApiError::BrokerUnavailable { detail: e.to_string(), retry_after_secs: config.http.retry_after_secs }
    })?;
    if created {
        sqlx::query(
            "-- ingest::templates::publish (insert)
             INSERT INTO templates (tenant_id, name, version, channel, content, content_hash) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(tenant.as_str())
        .bind(&request.name)
        .bind(version as i32)
        .bind(request.channel.as_str())
        .bind(serde_json::to_value(&request.content).unwrap_or_default())
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok((version, created))
}

async fn create_template(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let tenant = authenticate(state, &parts.headers).await?;
    let correlation = correlation_id(&parts.headers);
    require_json(&parts.headers)?;
    let bytes = read_body(body, state.config.http.max_body_bytes).await?;
    let request: TemplateRequest = validate::parse(&bytes)?;
    let (version, created) =
        publish(&state.config, &state.producer, &state.ops, &tenant, &request, &correlation).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(json!({ "name": request.name, "version": version, "created": created }))).into_response())
}

async fn list_versions(state: &AppState, name: &str, request: Request) -> Result<Response, ApiError> {
    let tenant = authenticate(state, request.headers()).await?;
    let rows: Vec<(i32, String, Value, chrono::DateTime<Utc>)> = sqlx::query_as(
        "-- ingest::templates::list_versions
         SELECT version, channel, content, created_at FROM templates
         WHERE tenant_id = $1 AND name = $2 ORDER BY version",
    )
    .bind(tenant.as_str())
    .bind(name)
    .fetch_all(&state.ops)
    .await?;
    if rows.is_empty() {
        return Err(ApiError::NotFound);
    }
    let versions: Vec<Value> = rows
        .into_iter()
        .map(|(v, c, content, at)| json!({ "version": v, "channel": c, "content": content, "created_at": at }))
        .collect();
    Ok(Json(json!({ "name": name, "versions": versions })).into_response())
}
