//! Provider adapters behind one small trait.

use futures::future::BoxFuture;
use ledger_schemas::{MessageId, MessageRendered};

/// What a provider said about one message.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderError {
    /// Not delivered, worth retrying later (timeouts before sending, 429,
    /// 5xx, SMTP 4xx, connection refused).
    Transient { code: String, reason: String },
    /// The provider refused the message for good (invalid recipient, SMTP
    /// 5xx, webhook 4xx other than 408/429).
    Permanent { code: String, reason: String },
    /// The request may or may not have been delivered (the connection broke
    /// after the message was sent, no answer came).
    Ambiguous { code: String, reason: String },
}

impl ProviderError {
    pub fn transient(code: impl Into<String>, reason: impl Into<String>) -> Self {
        ProviderError::Transient { code: code.into(), reason: reason.into() }
    }

    pub fn permanent(code: impl Into<String>, reason: impl Into<String>) -> Self {
        ProviderError::Permanent { code: code.into(), reason: reason.into() }
    }

    pub fn ambiguous(code: impl Into<String>, reason: impl Into<String>) -> Self {
        ProviderError::Ambiguous { code: code.into(), reason: reason.into() }
    }
}

pub struct Accepted {
    pub provider_message_id: Option<String>,
}

/// One provider call.
pub struct Delivery<'a> {
    pub message_id: MessageId,
    /// 1 for the first call, then one more per retry.
    pub attempt: u32,
    pub identity: &'a str,
    pub message: &'a MessageRendered,
    /// The same for every attempt of the message: a provider that honours
    /// it delivers at most once however often it is called.
    pub idempotency_key: String,
}

pub trait Provider: Send + Sync {
    /// Name used in events and metrics.
    fn name(&self) -> &'static str;

    /// Whether the provider de-duplicates calls by `Delivery::idempotency_key`,
    /// so that a call whose outcome is unknown may be made again.
    fn honours_idempotency_key(&self) -> bool {
        false
    }

    fn send<'a>(&'a self, delivery: &'a Delivery<'a>) -> BoxFuture<'a, Result<Accepted, ProviderError>>;
}

/// The HTTP client of the HTTP providers: whole-call timeout, a shorter
/// connect timeout, our user agent.
pub fn http_client(timeout: std::time::Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(std::time::Duration::from_secs(5).min(timeout))
        .user_agent(concat!("delivery-ledger/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A failed HTTP call: nothing reached the other side when the connection
/// could not be made; otherwise the request may have been received.
pub fn http_error(e: reqwest::Error) -> ProviderError {
    if e.is_connect() || e.is_builder() {
        ProviderError::transient("connect", e.to_string())
    } else {
        ProviderError::ambiguous(if e.is_timeout() { "timeout" } else { "http" }, e.to_string())
    }
}

/// What an HTTP status means for the message: 2xx delivered; 408, 429 and
/// 5xx worth retrying; any other answer a refusal for good.
pub fn classify_status(status: u16) -> Result<(), ProviderError> {
    match status {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(ProviderError::transient(format!("http_{status}"), "the receiver asked to retry")),
        _ => Err(ProviderError::permanent(format!("http_{status}"), "the receiver refused the message")),
    }
}
