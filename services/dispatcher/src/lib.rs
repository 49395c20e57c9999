//! The dispatcher: delivers rendered messages through a provider.
//!
//! Delivery guarantee: at most one provider call per message and attempt,
//! never a silent resend (invariant 4). Each message is claimed in the
//! operational store before anything else; a `delivery.attempted` event is
//! acknowledged by the broker before the provider is called; the outcome is
//! recorded in the claim, then on the log. A redelivered record finds the
//! claim and re-publishes the recorded outcome instead of sending again. A
//! message left *attempted* by a dispatcher that vanished is declared
//! ambiguous once its lease runs out and held for reconciliation.
//!
//! Offsets are stored only after every message of a chunk has its outcome on
//! the log (at-least-once consumption, effectively-once delivery). Outside
//! production, recipients not on the sandbox allow-list are suppressed
//! (invariant 8).

pub mod provider;
pub mod sink;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ledger_runtime::{kafka, Config, Mode, RuntimeError, Shutdown};
use ledger_schemas::{
    ConsumerGroup, Delivered, DeliveryAmbiguous, DeliveryAttempted, DeliveryFailed, Event, EventBody, EventId,
    MessageCancelled, MessageId, MessageRendered, Suppressed, SuppressionReason, Topic,
};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use sqlx::PgPool;

use crate::provider::{Provider, ProviderError};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("operational store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("shutting down")]
    Shutdown,
}

impl DispatchError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, DispatchError::Shutdown)
    }
}

pub struct Dispatcher {
    config: Config,
    consumer: kafka::LedgerConsumer,
    producer: FutureProducer,
    ops: PgPool,
    provider: Arc<dyn Provider>,
    /// Identifies this process in claims.
    instance: String,
}

pub async fn build(config: &Config) -> Result<Dispatcher, RuntimeError> {
    let provider = sink::SinkProvider::open(&config.sink.dir, Duration::from_millis(config.sink.latency_ms))
        .await
        .map_err(|e| RuntimeError::Config(format!("sink directory {}: {e}", config.sink.dir.display())))?;
    Ok(Dispatcher {
        config: config.clone(),
        consumer: kafka::consumer(config, ConsumerGroup::Dispatcher, &[Topic::Rendered])?,
        producer: kafka::producer(config)?,
        ops: ledger_runtime::db::pool(&config.ops_database_url, config.dispatcher.concurrency.min(32) as u32).await?,
        provider: Arc::new(provider),
        instance: format!("dispatcher-{}", uuid::Uuid::new_v4()),
    })
}

/// Whether `recipient` may be delivered to outside production.
pub fn sandbox_allows(allow: &[String], recipient: &str) -> bool {
    let r = recipient.trim().to_lowercase();
    allow.iter().any(|a| {
        let a = a.trim().to_lowercase();
        if a.starts_with("http://") || a.starts_with("https://") {
            // Webhook and push endpoints: allowed by URL prefix.
            return r.starts_with(&a);
        }
        match a.strip_prefix('@') {
            Some(domain) => r.rsplit_once('@').is_some_and(|(_, d)| d == domain),
            None => r == a,
        }
    })
}

impl Dispatcher {
    pub async fn run(self, shutdown: Shutdown) -> Result<(), RuntimeError> {
        tracing::info!(instance = %self.instance, provider = self.provider.name(), mode = ?self.config.mode, "dispatcher started");
        'consume: loop {
            let first = tokio::select! {
                _ = shutdown.wait() => break,
                m = self.consumer.recv() => m,
            };
            let first = match first {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "consume failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut chunk = vec![first];
            while chunk.len() < self.config.dispatcher.concurrency {
                match tokio::time::timeout(Duration::from_millis(5), self.consumer.recv()).await {
                    Ok(Ok(m)) => chunk.push(m.detach()),
                    _ => break,
                }
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.process_chunk(&chunk, &shutdown).await {
                    Ok(()) => break,
                    Err(DispatchError::Shutdown) => break 'consume,
                    Err(e) => {
                        tracing::warn!(error = %e, "chunk not finished; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            kafka::store_done(&self.consumer, &chunk)?;
        }
        let _ = self.consumer.commit_consumer_state(CommitMode::Sync);
        tracing::info!("dispatcher stopped");
        Ok(())
    }

    /// Delivers every message of the chunk once. Duplicates within a chunk
    /// (a re-rendered intent) are delivered once.
    async fn process_chunk(&self, chunk: &[OwnedMessage], shutdown: &Shutdown) -> Result<(), DispatchError> {
        let mut seen = HashSet::new();
        let mut work = Vec::new();
        for m in chunk {
            match Event::from_json(m.payload().unwrap_or_default()) {
                Ok(event) => {
                    if let (EventBody::MessageRendered(_), Some(id)) = (&event.body, event.message_id) {
                        if seen.insert(id) {
                            work.push(event);
                        }
                    } else if matches!(event.body, EventBody::MessageRendered(_)) {
                        self.dead_letter(
                            m,
                            Some(&event),
                            "missing_message_id",
                            "a rendered message without message_id",
                        )
                        .await?;
                    }
                    // Render failures share the topic and need no delivery.
                }
                Err(e) => self.dead_letter(m, None, e.code(), &e.to_string()).await?,
            }
        }
        let results: Vec<Result<(), DispatchError>> = futures::stream::iter(work)
            .map(|event| self.deliver(event, shutdown))
            .buffer_unordered(self.config.dispatcher.concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn dead_letter(
        &self,
        m: &OwnedMessage,
        event: Option<&Event>,
        code: &str,
        reason: &str,
    ) -> Result<(), DispatchError> {
        kafka::dead_letter(&self.producer, &self.config, ConsumerGroup::Dispatcher, m, event, code, reason).await?;
        Ok(())
    }

    async fn publish(&self, event: &Event) -> Result<(), DispatchError> {
        let key = event.message_id.map(|m| m.to_string()).unwrap_or_default();
        kafka::send_event(&self.producer, &self.config, Topic::Outcomes, &key, event).await?;
        Ok(())
    }

    fn outcome(&self, rendered: &Event, id: MessageId, what: &str, attempt: u32, body: EventBody) -> Event {
        Event {
            event_id: EventId::derive(id.0, what, attempt),
            body,
            tenant_id: rendered.tenant_id.clone(),
            intent_id: rendered.intent_id,
            message_id: Some(id),
            occurred_at: chrono::Utc::now(),
            correlation_id: rendered.correlation_id.clone(),
        }
    }

    async fn deliver(&self, event: Event, shutdown: &Shutdown) -> Result<(), DispatchError> {
        let (EventBody::MessageRendered(message), Some(id)) = (&event.body, event.message_id) else {
            return Ok(());
        };
        let tenant = event.tenant_id.0.clone();
        if self.config.mode != Mode::Production && !sandbox_allows(&self.config.sandbox.allow, &message.recipient) {
            let suppressed = self.outcome(
                &event,
                id,
                "suppressed",
                0,
                EventBody::Suppressed(Suppressed {
                    channel: message.channel,
                    recipient: message.recipient.clone(),
                    reason: SuppressionReason::Sandbox,
                }),
            );
            self.publish(&suppressed).await?;
            metrics::counter!("ledger_deliveries_total", "tenant" => tenant, "outcome" => "suppressed_sandbox")
                .increment(1);
            return Ok(());
        }
        let lease = i64::from(self.config.dispatcher.claim_lease_secs);
        loop {
            if shutdown.is_triggered() {
                return Err(DispatchError::Shutdown);
            }
            let claimed: Option<i32> = sqlx::query_scalar(
                "-- dispatcher::deliver (claim)
                 INSERT INTO delivery_claims (message_id, tenant_id, state, attempt, claimed_by, lease_until)
                 SELECT $1, $2, 'claimed', 1, $3, now() + make_interval(secs => $4)
                 WHERE NOT EXISTS (SELECT 1 FROM cancelled_intents WHERE intent_id = $5)
                 ON CONFLICT (message_id) DO UPDATE
                 SET claimed_by = EXCLUDED.claimed_by, lease_until = EXCLUDED.lease_until, updated_at = now()
                 WHERE delivery_claims.state = 'claimed'
                 RETURNING attempt",
            )
            .bind(id.0)
            .bind(&tenant)
            .bind(&self.instance)
            .bind(lease as f64)
            .bind(event.intent_id.0)
            .fetch_optional(&self.ops)
            .await?;
            match claimed {
                Some(attempt) => {
                    if self.attempt(&event, message, id, attempt as u32).await? {
                        return Ok(());
                    }
                    // Lost the claim to another instance, or retrying: look again.
                }
                None => {
                    let existing: Option<(String, Option<serde_json::Value>, bool)> = sqlx::query_as(
                        "-- dispatcher::deliver (existing claim)
                         SELECT state, outcome, lease_until > now() FROM delivery_claims WHERE message_id = $1",
                    )
                    .bind(id.0)
                    .fetch_optional(&self.ops)
                    .await?;
                    let Some((state, outcome, live)) = existing else {
                        // No claim and none taken: the intent was cancelled.
                        self.record_cancelled(&event, message, id).await?;
                        continue;
                    };
                    match (state.as_str(), outcome) {
                        ("done" | "ambiguous", Some(recorded)) => {
                            // Already decided: make sure the log has it too.
                            if let Ok(recorded) = serde_json::from_value::<Event>(recorded) {
                                self.publish(&recorded).await?;
                            }
                            return Ok(());
                        }
                        ("attempted", _) if live => {
                            // Another dispatcher is calling the provider right now.
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        ("attempted", _) => self.declare_ambiguous(&event, id).await?,
                        _ => {}
                    }
                }
            }
        }
    }

    /// One provider call under a claim we hold. Returns `false` when the
    /// caller must look at the claim again (lost it, or a retry is due).
    async fn attempt(
        &self,
        event: &Event,
        message: &MessageRendered,
        id: MessageId,
        attempt: u32,
    ) -> Result<bool, DispatchError> {
        let provider = self.provider.name();
        let attempted = self.outcome(
            event,
            id,
            "attempted",
            attempt,
            EventBody::DeliveryAttempted(DeliveryAttempted {
                attempt,
                channel: message.channel,
                recipient: message.recipient.clone(),
                provider: provider.to_owned(),
            }),
        );
        self.publish(&attempted).await?;
        let ours = sqlx::query(
            "-- dispatcher::attempt (mark attempted)
             UPDATE delivery_claims SET state = 'attempted', lease_until = now() + make_interval(secs => $3), updated_at = now()
             WHERE message_id = $1 AND claimed_by = $2 AND state = 'claimed'",
        )
        .bind(id.0)
        .bind(&self.instance)
        .bind(f64::from(self.config.dispatcher.claim_lease_secs))
        .execute(&self.ops)
        .await?;
        if ours.rows_affected() == 0 {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let timeout = Duration::from_millis(self.config.dispatcher.provider_timeout_ms);
        let result = tokio::time::timeout(timeout, self.provider.send(id, message)).await;
        metrics::histogram!("ledger_provider_call_seconds", "provider" => provider)
            .record(started.elapsed().as_secs_f64());
        let tenant = event.tenant_id.0.clone();
        let (what, body, label) = match result {
            Ok(Ok(accepted)) => (
                "delivered",
                EventBody::Delivered(Delivered {
                    attempt,
                    provider: provider.to_owned(),
                    provider_message_id: accepted.provider_message_id,
                }),
                "delivered",
            ),
            Ok(Err(ProviderError::Permanent { code, reason })) => (
                "failed",
                EventBody::DeliveryFailed(DeliveryFailed {
                    attempt,
                    provider: provider.to_owned(),
                    code,
                    reason,
                    permanent: true,
                }),
                "failed",
            ),
            Ok(Err(ProviderError::Transient { code, reason })) => {
                let last = attempt >= self.config.dispatcher.max_attempts;
                let failed = DeliveryFailed { attempt, provider: provider.to_owned(), code, reason, permanent: last };
                if !last {
                    return self.retry_later(event, id, attempt, failed).await;
                }
                ("failed", EventBody::DeliveryFailed(failed), "failed")
            }
            Err(_) => (
                "ambiguous",
                EventBody::DeliveryAmbiguous(DeliveryAmbiguous {
                    attempt,
                    provider: provider.to_owned(),
                    reason: format!("provider call timed out after {timeout:?}; it may or may not have been delivered"),
                }),
                "ambiguous",
            ),
        };
        let outcome = self.outcome(event, id, what, attempt, body);
        let state = if label == "ambiguous" { "ambiguous" } else { "done" };
        sqlx::query(
            "-- dispatcher::attempt (record outcome)
             UPDATE delivery_claims SET state = $3, outcome = $4, updated_at = now()
             WHERE message_id = $1 AND claimed_by = $2",
        )
        .bind(id.0)
        .bind(&self.instance)
        .bind(state)
        .bind(serde_json::to_value(&outcome).unwrap_or_default())
        .execute(&self.ops)
        .await?;
        self.publish(&outcome).await?;
        metrics::counter!("ledger_deliveries_total", "tenant" => tenant, "outcome" => label).increment(1);
        Ok(true)
    }

    /// A transient failure: record it, hand the claim back for the next
    /// attempt and wait out the backoff. The message is delayed, not skipped.
    async fn retry_later(
        &self,
        event: &Event,
        id: MessageId,
        attempt: u32,
        failed: DeliveryFailed,
    ) -> Result<bool, DispatchError> {
        let failure = self.outcome(event, id, "failed", attempt, EventBody::DeliveryFailed(failed));
        sqlx::query(
            "-- dispatcher::retry_later
             UPDATE delivery_claims SET state = 'claimed', attempt = attempt + 1, updated_at = now()
             WHERE message_id = $1 AND claimed_by = $2 AND state = 'attempted'",
        )
        .bind(id.0)
        .bind(&self.instance)
        .execute(&self.ops)
        .await?;
        self.publish(&failure).await?;
        metrics::counter!("ledger_delivery_retries_total", "tenant" => event.tenant_id.0.clone()).increment(1);
        let backoff = self.config.dispatcher.retry_backoff_ms.saturating_mul(1 << (attempt - 1).min(10));
        tokio::time::sleep(Duration::from_millis(backoff)).await;
        Ok(false)
    }

    /// Records, in a claim of its own, that the message is not delivered
    /// because its intent was cancelled; the claim loop then publishes it.
    async fn record_cancelled(
        &self,
        event: &Event,
        message: &MessageRendered,
        id: MessageId,
    ) -> Result<(), DispatchError> {
        let cancelled = self.outcome(
            event,
            id,
            "cancelled",
            0,
            EventBody::MessageCancelled(MessageCancelled {
                channel: message.channel,
                recipient: message.recipient.clone(),
            }),
        );
        let inserted = sqlx::query(
            "-- dispatcher::record_cancelled
             INSERT INTO delivery_claims (message_id, tenant_id, state, attempt, claimed_by, lease_until, outcome)
             VALUES ($1, $2, 'done', 0, $3, now(), $4)
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(id.0)
        .bind(&event.tenant_id.0)
        .bind(&self.instance)
        .bind(serde_json::to_value(&cancelled).unwrap_or_default())
        .execute(&self.ops)
        .await?;
        if inserted.rows_affected() == 1 {
            metrics::counter!("ledger_deliveries_total", "tenant" => event.tenant_id.0.clone(), "outcome" => "cancelled")
                .increment(1);
        }
        Ok(())
    }

    async fn declare_ambiguous(&self, event: &Event, id: MessageId) -> Result<(), DispatchError> {
        let attempt: Option<i32> = sqlx::query_scalar(
            "-- dispatcher::declare_ambiguous (attempt)
             SELECT attempt FROM delivery_claims WHERE message_id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.ops)
        .await?;
        let attempt = attempt.unwrap_or(1) as u32;
        let ambiguous = self.outcome(
            event,
            id,
            "ambiguous",
            attempt,
            EventBody::DeliveryAmbiguous(DeliveryAmbiguous {
                attempt,
                provider: self.provider.name().to_owned(),
                reason: "the dispatcher that called the provider stopped before recording the outcome".into(),
            }),
        );
        let updated = sqlx::query(
            "-- dispatcher::declare_ambiguous
             UPDATE delivery_claims SET state = 'ambiguous', outcome = $2, updated_at = now()
             WHERE message_id = $1 AND state = 'attempted' AND lease_until < now()",
        )
        .bind(id.0)
        .bind(serde_json::to_value(&ambiguous).unwrap_or_default())
        .execute(&self.ops)
        .await?;
        if updated.rows_affected() == 1 {
            tracing::warn!(message_id = %id, "message is ambiguous; held for reconciliation");
            metrics::counter!("ledger_deliveries_total", "tenant" => event.tenant_id.0.clone(), "outcome" => "ambiguous").increment(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_allows_listed_addresses_and_domains_only() {
        let allow = vec!["@example.com".to_owned(), "qa@corp.io".to_owned()];
        assert!(sandbox_allows(&allow, "Ann@Example.com"));
        assert!(sandbox_allows(&allow, "qa@corp.io"));
        assert!(!sandbox_allows(&allow, "ceo@corp.io"));
        assert!(!sandbox_allows(&allow, "ann@notexample.com"));
        assert!(!sandbox_allows(&allow, "ann@sub.example.com"));
        assert!(!sandbox_allows(&[], "ann@example.com"));
    }
}
