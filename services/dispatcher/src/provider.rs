//! Provider adapters behind one small trait.

use futures::future::BoxFuture;
use ledger_schemas::{MessageId, MessageRendered};

/// What a provider said about one message.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderError {
    /// Worth retrying later (timeouts, 5xx, throttling by the provider).
    Transient { code: String, reason: String },
    /// The provider refused the message for good.
    Permanent { code: String, reason: String },
}

pub struct Accepted {
    pub provider_message_id: Option<String>,
}

pub trait Provider: Send + Sync {
    /// Name used in events and metrics.
    fn name(&self) -> &'static str;
    fn send<'a>(
        &'a self,
        message_id: MessageId,
        message: &'a MessageRendered,
    ) -> BoxFuture<'a, Result<Accepted, ProviderError>>;
}
