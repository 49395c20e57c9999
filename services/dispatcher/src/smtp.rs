//! SMTP submission through a pool of connections (lettre).
//!
//! A 4xx reply is retried, a 5xx reply fails for good. A connection that
//! could not be opened is retried; one that broke while the message was on
//! its way is ambiguous (the server may have taken it), and SMTP has no
//! idempotency key, so it is not resent blindly.

use std::time::Duration;

use futures::future::BoxFuture;
use lettre::message::{header::ContentType, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::provider::{Accepted, Delivery, Provider, ProviderError};

pub struct SmtpProvider {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    default_from: Option<String>,
}

impl SmtpProvider {
    pub fn new(
        url: &str,
        credentials: Option<(String, String)>,
        pool_size: u32,
        default_from: Option<String>,
        timeout: Duration,
    ) -> Result<SmtpProvider, lettre::transport::smtp::Error> {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)?
            .pool_config(PoolConfig::new().max_size(pool_size.max(1)))
            .timeout(Some(timeout));
        if let Some((user, password)) = credentials {
            builder = builder.credentials(Credentials::new(user, password));
        }
        Ok(SmtpProvider { transport: builder.build(), default_from })
    }

    fn build(&self, delivery: &Delivery<'_>) -> Result<Message, ProviderError> {
        let m = delivery.message;
        let from = m.from.as_deref().or(self.default_from.as_deref()).unwrap_or("ledger@localhost");
        let from: Mailbox =
            from.parse().map_err(|e| ProviderError::permanent("invalid_sender", format!("from {from:?}: {e}")))?;
        let to: Mailbox = m
            .recipient
            .parse()
            .map_err(|e| ProviderError::permanent("invalid_recipient", format!("{:?}: {e}", m.recipient)))?;
        let builder = Message::builder()
            .from(from)
            .to(to)
            .subject(m.subject.clone().unwrap_or_default())
            .message_id(Some(format!("<{}@delivery-ledger>", delivery.idempotency_key)));
        let text = m.text.clone().unwrap_or_default();
        let built = match &m.html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(text, html.clone())),
            None => builder.singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(text)),
        };
        built.map_err(|e| ProviderError::permanent("invalid_message", e.to_string()))
    }
}

/// What an SMTP error means for the message.
fn classify(e: &lettre::transport::smtp::Error) -> ProviderError {
    let code = e.status().map(|c| format!("smtp_{c}")).unwrap_or_else(|| "smtp".into());
    if e.is_permanent() {
        ProviderError::permanent(code, e.to_string())
    } else if e.is_transient() {
        ProviderError::transient(code, e.to_string())
    } else if e.is_client() {
        ProviderError::permanent("smtp_client", e.to_string())
    } else if e.is_tls() || e.to_string().starts_with("Connection error") {
        // No session came about: nothing was sent. (lettre has no predicate
        // for its connection kind; its message is stable.)
        ProviderError::transient("smtp_connect", e.to_string())
    } else if e.is_timeout() {
        ProviderError::ambiguous("smtp_timeout", e.to_string())
    } else {
        // The session broke mid-way: the server may have taken the message.
        ProviderError::ambiguous(code, e.to_string())
    }
}

impl Provider for SmtpProvider {
    fn name(&self) -> &'static str {
        "smtp"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery<'a>) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(async move {
            let message = self.build(delivery)?;
            match self.transport.send(message).await {
                Ok(response) => Ok(Accepted {
                    provider_message_id: Some(response.message().collect::<Vec<_>>().join(" ").trim().to_owned())
                        .filter(|s| !s.is_empty()),
                }),
                Err(e) => Err(classify(&e)),
            }
        })
    }
}
