//! An HTTP email API in the Mailgun style: `POST {url}/messages` with the
//! message as form fields (`from`, `to`, `subject`, `text`, `html`, custom
//! headers as `h:…`, variables as `v:…`), HTTP Basic auth `api:<key>`, and a
//! JSON answer `{"id": "<…>", "message": "Queued…"}`.
//!
//! 2xx is delivered (the answer's `id` is the provider message id); 408,
//! 429 and 5xx are retried; other 4xx fail for good. A refused connection is
//! retried; a call that got no answer is ambiguous (these APIs take no
//! idempotency key, so it is not resent).

use std::time::Duration;

use futures::future::BoxFuture;

use crate::provider::{classify_status, http_client, http_error, Accepted, Delivery, Provider, ProviderError};

pub struct HttpEmailProvider {
    client: reqwest::Client,
    endpoint: String,
    api_key: Option<String>,
    default_from: Option<String>,
}

impl HttpEmailProvider {
    pub fn new(
        url: &str,
        api_key: Option<String>,
        default_from: Option<String>,
        timeout: Duration,
    ) -> Result<HttpEmailProvider, reqwest::Error> {
        Ok(HttpEmailProvider {
            client: http_client(timeout)?,
            endpoint: format!("{}/messages", url.trim_end_matches('/')),
            api_key,
            default_from,
        })
    }
}

impl Provider for HttpEmailProvider {
    fn name(&self) -> &'static str {
        "http_email"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery<'a>) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(async move {
            let m = delivery.message;
            let from = m.from.as_deref().or(self.default_from.as_deref()).unwrap_or("ledger@localhost");
            let mut form: Vec<(&str, &str)> = vec![("from", from), ("to", m.recipient.as_str())];
            if let Some(s) = &m.subject {
                form.push(("subject", s));
            }
            if let Some(t) = &m.text {
                form.push(("text", t));
            }
            if let Some(h) = &m.html {
                form.push(("html", h));
            }
            let message_id = format!("<{}@delivery-ledger>", delivery.idempotency_key);
            form.push(("h:Message-Id", &message_id));
            form.push(("v:ledger-message-id", &delivery.idempotency_key));
            let mut request = self.client.post(&self.endpoint).form(&form);
            if let Some(key) = &self.api_key {
                request = request.basic_auth("api", Some(key));
            }
            match request.send().await {
                Ok(response) => {
                    classify_status(response.status().as_u16())?;
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    Ok(Accepted { provider_message_id: body["id"].as_str().map(str::to_owned) })
                }
                Err(e) => Err(http_error(e)),
            }
        })
    }
}
