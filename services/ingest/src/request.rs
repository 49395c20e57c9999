//! What every endpoint reads from a request: the tenant, the idempotency
//! key, the correlation id and the body.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use ledger_schemas::TenantId;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::problem::{ApiError, FieldError};
use crate::AppState;

pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const HEADER_CORRELATION_ID: &str = "x-correlation-id";

pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    state.auth.tenant(&state.ops, key.trim()).await?.ok_or(ApiError::Unauthorized)
}

/// What every submission starts with: who asks, under which key, with
/// which correlation id; the body is left to the endpoint.
pub struct Submission {
    pub tenant: TenantId,
    pub key: String,
    pub correlation: String,
    pub headers: HeaderMap,
    pub body: Body,
}

pub async fn submission(state: &AppState, request: axum::extract::Request) -> Result<Submission, ApiError> {
    let (parts, body) = request.into_parts();
    let tenant = authenticate(state, &parts.headers).await?;
    let key = idempotency_key(&parts.headers)?;
    let correlation = correlation_id(&parts.headers);
    Ok(Submission { tenant, key, correlation, headers: parts.headers, body })
}

/// A submission's JSON body, refused unless it is JSON and within `limit`.
pub async fn json_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    require_json(headers)?;
    read_body(body, limit).await
}

pub fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers.get(HEADER_IDEMPOTENCY_KEY).ok_or_else(|| ApiError::IdempotencyKey("it is missing".into()))?;
    let key = value.to_str().map_err(|_| ApiError::IdempotencyKey("it must be printable ASCII".into()))?.trim();
    if key.is_empty() || key.len() > 255 {
        return Err(ApiError::IdempotencyKey("it must be 1 to 255 characters".into()));
    }
    Ok(key.to_owned())
}

pub fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get(HEADER_CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Ndjson,
}

pub fn body_kind(headers: &HeaderMap) -> Option<BodyKind> {
    let mime = headers.get(header::CONTENT_TYPE)?.to_str().ok()?.split(';').next()?.trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Some(BodyKind::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Some(BodyKind::Ndjson),
        _ => None,
    }
}

pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match body_kind(headers) {
        Some(BodyKind::Json) => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType("application/json")),
    }
}

pub async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    axum::body::to_bytes(body, limit).await.map(|b| b.to_vec()).map_err(|_| ApiError::TooLarge(limit))
}

/// SHA-256 of the body's canonical JSON (keys sorted, no whitespace): the
/// same request with other formatting is the same request.
pub fn canonical_hash(bytes: &[u8]) -> Result<Vec<u8>, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::InvalidBody(vec![FieldError { field: String::new(), detail: e.to_string() }]))?;
    let canonical = serde_json::to_vec(&value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Sha256::digest(&canonical).to_vec())
}

/// One path parameter. A segment that is not valid percent-encoded UTF-8
/// names nothing here: a 404 problem+json, where axum's own rejection would
/// be a plain-text 400.
pub struct Segment(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Segment {
    type Rejection = crate::problem::ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(segment)) => Ok(Segment(segment)),
            Err(_) => Err(crate::problem::ApiError::NotFound),
        }
    }
}
