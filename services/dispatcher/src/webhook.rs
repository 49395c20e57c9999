//! Webhooks: the rendered JSON payload POSTed to the recipient URL, signed
//! the Standard Webhooks way: `webhook-id` (the message id, the same on
//! every attempt, for the receiver to de-duplicate by), `webhook-timestamp`
//! (Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 over
//! "id.timestamp.body">`.
//!
//! 2xx is delivered; 408, 429 and 5xx are retried; any other 4xx fails for
//! good. A refused connection is retried; a call that got no answer is
//! ambiguous, and may be made again because the id lets the receiver drop
//! the duplicate.

use std::time::Duration;

use base64::Engine;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::provider::{classify_status, http_client, http_error, Accepted, Delivery, Provider, ProviderError};

pub struct WebhookProvider {
    client: reqwest::Client,
    secret: Vec<u8>,
}

/// `v1,<signature>` of `body` as sent with `id` at `timestamp`.
pub fn signature(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

impl WebhookProvider {
    pub fn new(secret: &str, timeout: Duration) -> Result<WebhookProvider, reqwest::Error> {
        Ok(WebhookProvider { client: http_client(timeout)?, secret: secret.as_bytes().to_vec() })
    }
}

impl Provider for WebhookProvider {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn honours_idempotency_key(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, delivery: &'a Delivery<'a>) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(async move {
            let body = match &delivery.message.json {
                Some(v) => serde_json::to_vec(v).unwrap_or_default(),
                None => serde_json::to_vec(&serde_json::json!({
                    "subject": delivery.message.subject,
                    "text": delivery.message.text,
                    "html": delivery.message.html,
                }))
                .unwrap_or_default(),
            };
            let id = delivery.idempotency_key.as_str();
            let timestamp = chrono::Utc::now().timestamp();
            let response = self
                .client
                .post(&delivery.message.recipient)
                .header("content-type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature(&self.secret, id, timestamp, &body))
                .body(body)
                .send()
                .await;
            match response {
                Ok(r) => {
                    classify_status(r.status().as_u16())?;
                    Ok(Accepted { provider_message_id: Some(format!("webhook-{id}")) })
                }
                Err(e) => Err(http_error(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receivers_status_codes_map_to_outcomes() {
        assert!(classify_status(204).is_ok());
        for transient in [408, 429, 500, 503] {
            assert!(matches!(classify_status(transient), Err(ProviderError::Transient { .. })), "{transient}");
        }
        for permanent in [400, 401, 404, 410, 422] {
            assert!(matches!(classify_status(permanent), Err(ProviderError::Permanent { .. })), "{permanent}");
        }
    }

    #[test]
    fn the_signature_covers_id_timestamp_and_body() {
        let s = signature(b"secret-secret-secret", "m1", 1_700_000_000, b"{}");
        assert!(s.starts_with("v1,"));
        assert_ne!(s, signature(b"secret-secret-secret", "m2", 1_700_000_000, b"{}"));
        assert_ne!(s, signature(b"secret-secret-secret", "m1", 1_700_000_001, b"{}"));
        assert_ne!(s, signature(b"secret-secret-secret", "m1", 1_700_000_000, b"[]"));
    }
}
