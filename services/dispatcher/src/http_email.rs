//! An HTTP email API in the Mailgun style: `POST {url}/messages` with the
//! message as form fields (`from`, `to`, `subject`, `text`, `html`, custom
//! headers as `h:…`, variables as `v:…`), HTTP Basic auth `api:<key>`, and a
//! JSON answer `{"id": "<…>", "message": "Queued…"}`.
//!
//! 2xx is delivered (the answer's `id` is the provider message id); 408,
//! 429 and 5xx are retried; other 4xx fail for good. A refused connection is
//! retried; a call that got no answer is ambiguous (these APIs take no
//! idempotency key, so it is not resent).
//!
//! The batch form (`batch_size` > 1): up to 1,000 messages with the same
//! sender in one call, `to` listing every recipient and
//! `recipient-variables` carrying each one's own rendered subject, text,
//! HTML and message id, which the provider substitutes for
//! `%recipient.subject%` and the like. Every message of the call shares its
//! answer. Each message is still claimed, attempted and recorded on its
//! own; only the provider call is shared.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::provider::{classify_status, http_client, http_error, Accepted, Delivery, Provider, ProviderError};

pub struct HttpEmailProvider {
    api: Arc<Api>,
    default_from: Option<String>,
    batches: Option<mpsc::UnboundedSender<(Item, Reply)>>,
}

type Reply = oneshot::Sender<Result<Accepted, ProviderError>>;

struct Api {
    client: reqwest::Client,
    endpoint: String,
    api_key: Option<String>,
}

/// One message waiting for a batch call.
struct Item {
    from: String,
    to: String,
    subject: String,
    text: Option<String>,
    html: Option<String>,
    message_id: String,
}

impl HttpEmailProvider {
    /// `batch_size` > 1 turns on the batch form; `batch_wait` is how long a
    /// batch waits to fill.
    pub fn new(
        url: &str,
        api_key: Option<String>,
        default_from: Option<String>,
        timeout: Duration,
        batch_size: usize,
        batch_wait: Duration,
    ) -> Result<HttpEmailProvider, reqwest::Error> {
        let api = Arc::new(Api {
            client: http_client(timeout)?,
            endpoint: format!("{}/messages", url.trim_end_matches('/')),
            api_key,
        });
        let batches = (batch_size > 1).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(batcher(api.clone(), rx, batch_size.min(1_000), batch_wait));
            tx
        });
        Ok(HttpEmailProvider { api, default_from, batches })
    }
}

impl Api {
    async fn post(&self, form: &[(&str, &str)]) -> Result<Accepted, ProviderError> {
        let mut request = self.client.post(&self.endpoint).form(form);
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
    }
}

/// Gathers waiting messages into calls: the first waits up to `wait` for
/// company; a call holds one sender and each recipient once.
async fn batcher(api: Arc<Api>, mut rx: mpsc::UnboundedReceiver<(Item, Reply)>, max: usize, wait: Duration) {
    // Messages that did not fit the last call, oldest first.
    let mut carried = std::collections::VecDeque::new();
    loop {
        let mut batch: Vec<_> = carried.drain(..carried.len().min(max)).collect();
        if batch.is_empty() {
            match rx.recv().await {
                Some(item) => batch.push(item),
                None => return,
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        while batch.len() < max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => batch.push(item),
                Ok(None) | Err(_) => break,
            }
        }
        // One sender a call, each recipient once; the rest goes first in
        // the next round.
        let from = batch[0].0.from.clone();
        let mut seen = HashSet::new();
        let (call, rest): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|(item, _)| item.from == from && seen.insert(item.to.clone()));
        for item in rest.into_iter().rev() {
            carried.push_front(item);
        }
        let api = api.clone();
        tokio::spawn(async move {
            let (items, replies): (Vec<Item>, Vec<_>) = call.into_iter().unzip();
            let result = send_batch(&api, &from, &items).await;
            metrics::histogram!("ledger_http_email_batch_size").record(items.len() as f64);
            for reply in replies {
                let _ = reply.send(match &result {
                    Ok(a) => Ok(Accepted { provider_message_id: a.provider_message_id.clone() }),
                    Err(e) => Err(e.clone()),
                });
            }
        });
    }
}

async fn send_batch(api: &Api, from: &str, items: &[Item]) -> Result<Accepted, ProviderError> {
    let to = items.iter().map(|i| i.to.as_str()).collect::<Vec<_>>().join(",");
    let variables: HashMap<&str, serde_json::Value> = items
        .iter()
        .map(|i| {
            (
                i.to.as_str(),
                json!({ "subject": i.subject, "text": i.text.as_deref().unwrap_or_default(),
                        "html": i.html.as_deref().unwrap_or_default(), "ledger-message-id": i.message_id }),
            )
        })
        .collect();
    let variables = serde_json::to_string(&variables).unwrap_or_default();
    let mut form: Vec<(&str, &str)> = vec![
        ("from", from),
        ("to", &to),
        ("subject", "%recipient.subject%"),
        ("recipient-variables", &variables),
        ("v:ledger-message-id", "%recipient.ledger-message-id%"),
    ];
    if items.iter().any(|i| i.text.is_some()) {
        form.push(("text", "%recipient.text%"));
    }
    if items.iter().any(|i| i.html.is_some()) {
        form.push(("html", "%recipient.html%"));
    }
    api.post(&form).await
}

impl Provider for HttpEmailProvider {
    fn name(&self) -> &'static str {
        "http_email"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery<'a>) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(async move {
            let m = delivery.message;
            let from = m.from.as_deref().or(self.default_from.as_deref()).unwrap_or("ledger@localhost");
            if let Some(batches) = &self.batches {
                let item = Item {
                    from: from.to_owned(),
                    to: m.recipient.clone(),
                    subject: m.subject.clone().unwrap_or_default(),
                    text: m.text.clone(),
                    html: m.html.clone(),
                    message_id: delivery.idempotency_key.clone(),
                };
                let (reply, answer) = oneshot::channel();
                if batches.send((item, reply)).is_err() {
                    return Err(ProviderError::transient("stopping", "the batch sender has stopped"));
                }
                // Lost only if the call's task died: whether it was sent is unknown.
                return answer.await.unwrap_or_else(|_| {
                    Err(ProviderError::ambiguous("batch", "the batch call ended without an answer"))
                });
            }
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
            self.api.post(&form).await
        })
    }
}
