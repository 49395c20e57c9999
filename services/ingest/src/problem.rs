//! Errors at the HTTP boundary, rendered as RFC 9457 problem+json with a
//! stable `type`. Internals are logged, never shown.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct FieldError {
    /// JSON path of the offending field, e.g. `content.subject`.
    pub field: String,
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("the Idempotency-Key header is required: {0}")]
    IdempotencyKey(String),
    #[error("the request body is not valid JSON for this endpoint")]
    InvalidBody(Vec<FieldError>),
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the body must be {0}")]
    UnsupportedMediaType(&'static str),
    #[error("no such resource for this tenant")]
    NotFound,
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyConflict,
    #[error("the broker did not acknowledge the intent, so it is not accepted; retry with the same Idempotency-Key")]
    BrokerUnavailable { detail: String, retry_after_secs: u32 },
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::IdempotencyKey(_) => {
                (StatusCode::BAD_REQUEST, "idempotency-key", "Missing or invalid Idempotency-Key")
            }
            ApiError::InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid-body", "Malformed request body"),
            ApiError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation", "Invalid request"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-large", "Request body too large"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type")
            }
            ApiError::IdempotencyConflict => (StatusCode::CONFLICT, "idempotency-conflict", "Idempotency-Key reused"),
            ApiError::BrokerUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable", "Intent not accepted")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(format!("database: {e}"))
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    r#type: String,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, title) = self.parts();
        match &self {
            ApiError::Internal(detail) => tracing::error!(%detail, "request failed"),
            ApiError::BrokerUnavailable { detail, .. } => tracing::warn!(%detail, "intent not acknowledged"),
            _ => {}
        }
        let errors: &[FieldError] = match &self {
            ApiError::InvalidBody(e) | ApiError::Validation(e) => e,
            _ => &[],
        };
        let detail = match &self {
            ApiError::IdempotencyKey(d) => format!("the Idempotency-Key header is required: {d}"),
            other => other.to_string(),
        };
        let body = Problem {
            r#type: format!("urn:delivery-ledger:problem:{code}"),
            title,
            status: status.as_u16(),
            detail,
            errors,
        };
        let mut response = (status, serde_json::to_vec(&body).unwrap_or_default()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let ApiError::BrokerUnavailable { retry_after_secs, .. } = &self {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        response
    }
}
