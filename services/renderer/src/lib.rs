//! The renderer: expands each recipient batch of an accepted intent into one
//! rendered message per recipient.
//!
//! Delivery guarantee: at-least-once, effectively-once downstream. A batch's
//! offset is stored only after every message it produced was acknowledged
//! (or after the batch was durably scheduled); after a crash the batch is
//! rendered again and yields the same message ids (derived from intent id
//! and recipient) and the same event ids, which the dispatcher's claims and
//! the projector's merges recognise (invariant 3).
//!
//! Templates come from the templates topic, read from its beginning by every
//! instance, so any renderer renders a pinned version the same way. A batch
//! whose `send_at` is ahead is held in the operational store and rendered
//! when due by whichever instance gets to it first, without holding up the
//! partition. A cancelled intent renders nothing further: its recipients get
//! a *cancelled* outcome. A render failure is an event for that recipient;
//! an undecodable record is dead-lettered; neither stops the partition.

pub mod cache;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use ledger_runtime::{kafka, Config, RuntimeError, Shutdown};
use ledger_schemas::{
    ConsumerGroup, Event, EventBody, EventId, MessageCancelled, MessageId, RecipientBatch, RenderFailed, Topic,
};
use ledger_templating::{RenderFailure, Templates};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use sqlx::PgPool;

use crate::cache::TemplateCache;

/// How long a batch waits for a template version the cache has not seen yet
/// (published moments before the intent) before it fails as unknown.
const TEMPLATE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("operational store: {0}")]
    Database(#[from] sqlx::Error),
}

impl RenderError {
    /// Both pass: the batch is retried until its effects are durable.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

pub struct Renderer {
    config: Config,
    consumer: kafka::LedgerConsumer,
    producer: FutureProducer,
    ops: PgPool,
    cache: Arc<TemplateCache>,
}

pub async fn build(config: &Config) -> Result<Renderer, RuntimeError> {
    Ok(Renderer {
        config: config.clone(),
        consumer: kafka::consumer(config, ConsumerGroup::Renderer, &[Topic::Intents])?,
        producer: kafka::producer(config)?,
        ops: ledger_runtime::db::pool(&config.ops_database_url, 4).await?,
        cache: Arc::new(TemplateCache::follow(config)?),
    })
}

impl Renderer {
    pub async fn run(self, shutdown: Shutdown) -> Result<(), RuntimeError> {
        tracing::info!(topic = %self.config.topic(Topic::Intents), "renderer started");
        let me = Arc::new(self);
        let follower = tokio::spawn(me.cache.clone().run(shutdown.clone()));
        let scheduler = tokio::spawn(me.clone().schedule_loop(shutdown.clone()));
        let result = me.clone().consume_loop(&shutdown).await;
        let _ = follower.await;
        let _ = scheduler.await;
        let _ = me.consumer.commit_consumer_state(CommitMode::Sync);
        tracing::info!("renderer stopped");
        result
    }

    /// Records are handled concurrently, up to `IN_FLIGHT` at once, so that
    /// rendering one batch overlaps waiting for the acks of the previous
    /// ones; offsets are stored strictly in arrival order, each only when it
    /// and everything before it is done.
    async fn consume_loop(self: Arc<Self>, shutdown: &Shutdown) -> Result<(), RuntimeError> {
        const IN_FLIGHT: usize = 16;
        let mut pending: VecDeque<(OwnedMessage, tokio::task::JoinHandle<bool>)> = VecDeque::new();
        loop {
            if pending.len() >= IN_FLIGHT || (shutdown.is_triggered() && !pending.is_empty()) {
                if let Some((message, task)) = pending.pop_front() {
                    if !task.await.unwrap_or(false) {
                        // Shut down before its effects were durable: it is
                        // redelivered, and so is everything after it.
                        return Ok(());
                    }
                    kafka::store_done(&self.consumer, std::slice::from_ref(&message))?;
                }
                continue;
            }
            if shutdown.is_triggered() {
                return Ok(());
            }
            let next = tokio::select! {
                _ = shutdown.wait() => continue,
                m = self.consumer.recv() => m,
                // Store finished offsets promptly while waiting for records.
                done = async { pending.front_mut().map(|(_, t)| t).expect("non-empty").await }, if !pending.is_empty() => {
                    let (message, _) = pending.pop_front().expect("non-empty");
                    if !done.unwrap_or(false) {
                        return Ok(());
                    }
                    kafka::store_done(&self.consumer, std::slice::from_ref(&message))?;
                    continue;
                }
            };
            let message = match next {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "consume failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let me = self.clone();
            let task_message = message.clone();
            let task_shutdown = shutdown.clone();
            let task = tokio::spawn(async move {
                // A record is retried until its effects are durable: skipping
                // it would lose recipients.
                let mut backoff = Duration::from_millis(100);
                while let Err(e) = me.handle(&task_message).await {
                    if task_shutdown.is_triggered() {
                        return false;
                    }
                    tracing::warn!(error = %e, offset = task_message.offset(), "render effects not durable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                true
            });
            pending.push_back((message, task));
        }
    }

    async fn handle(&self, message: &OwnedMessage) -> Result<(), RenderError> {
        let payload = message.payload().unwrap_or_default();
        let event = match Event::from_json(payload) {
            Ok(e) => e,
            Err(e) => {
                kafka::dead_letter(
                    &self.producer,
                    &self.config,
                    ConsumerGroup::Renderer,
                    message,
                    None,
                    e.code(),
                    &e.to_string(),
                )
                .await?;
                return Ok(());
            }
        };
        match &event.body {
            EventBody::RecipientBatch(batch) => {
                if self.is_cancelled(&event).await? {
                    return self.cancel_batch(&event, batch).await;
                }
                if let Some(due) = batch.send_at.filter(|at| *at > Utc::now()) {
                    return self.hold(&event, batch, due).await;
                }
                let rendered = self.render_and_send(&event, batch).await;
                tracing::debug!(
                    intent_id = %event.intent_id,
                    batch = batch.batch_index,
                    recipients = batch.recipients.len(),
                    correlation_id = %event.correlation_id,
                    "recipient batch rendered"
                );
                rendered
            }
            EventBody::IntentCancelled(_) => self.cancel_held(&event).await,
            _ => Ok(()),
        }
    }

    async fn is_cancelled(&self, event: &Event) -> Result<bool, RenderError> {
        Ok(sqlx::query_scalar(
            "-- renderer::is_cancelled
             SELECT EXISTS (SELECT 1 FROM cancelled_intents WHERE intent_id = $1)",
        )
        .bind(event.intent_id.0)
        .fetch_one(&self.ops)
        .await?)
    }

    /// Holds a batch until `due`; the scheduler renders it then.
    async fn hold(&self, event: &Event, batch: &RecipientBatch, due: chrono::DateTime<Utc>) -> Result<(), RenderError> {
        sqlx::query(
            "-- renderer::hold
             INSERT INTO scheduled_batches (intent_id, batch_index, tenant_id, due_at, event)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (intent_id, batch_index) DO NOTHING",
        )
        .bind(event.intent_id.0)
        .bind(batch.batch_index as i32)
        .bind(&event.tenant_id.0)
        .bind(due)
        .bind(serde_json::to_value(event).unwrap_or_default())
        .execute(&self.ops)
        .await?;
        metrics::counter!("ledger_batches_scheduled_total", "tenant" => event.tenant_id.0.clone()).increment(1);
        Ok(())
    }

    /// Renders the held batches that are due, a few at a time, under row
    /// locks that other renderer instances skip.
    async fn schedule_loop(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            loop {
                match self.render_due().await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "scheduled batches not rendered; retrying");
                        break;
                    }
                }
            }
        }
    }

    async fn render_due(&self) -> Result<usize, RenderError> {
        let mut tx = self.ops.begin().await?;
        let rows: Vec<(uuid::Uuid, i32, serde_json::Value)> = sqlx::query_as(
            "-- renderer::render_due
             SELECT intent_id, batch_index, event FROM scheduled_batches
             WHERE due_at <= now() ORDER BY due_at LIMIT 8 FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        for (_, _, value) in &rows {
            let Ok(event) = serde_json::from_value::<Event>(value.clone()) else { continue };
            if let EventBody::RecipientBatch(batch) = &event.body {
                if self.is_cancelled(&event).await? {
                    self.cancel_batch(&event, batch).await?;
                } else {
                    self.render_and_send(&event, batch).await?;
                }
            }
        }
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.0).collect();
        let indexes: Vec<i32> = rows.iter().map(|r| r.1).collect();
        sqlx::query(
            "-- renderer::render_due (done)
             DELETE FROM scheduled_batches
             WHERE (intent_id, batch_index) IN (SELECT * FROM UNNEST($1::uuid[], $2::int[]))",
        )
        .bind(&ids)
        .bind(&indexes)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    /// A cancelled intent's held batches: their recipients are cancelled now.
    async fn cancel_held(&self, event: &Event) -> Result<(), RenderError> {
        let mut tx = self.ops.begin().await?;
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(
            "-- renderer::cancel_held
             SELECT event FROM scheduled_batches WHERE intent_id = $1 FOR UPDATE",
        )
        .bind(event.intent_id.0)
        .fetch_all(&mut *tx)
        .await?;
        for value in rows {
            if let Ok(held) = serde_json::from_value::<Event>(value) {
                if let EventBody::RecipientBatch(batch) = &held.body {
                    self.cancel_batch(&held, batch).await?;
                }
            }
        }
        sqlx::query("-- renderer::cancel_held (done)\nDELETE FROM scheduled_batches WHERE intent_id = $1")
            .bind(event.intent_id.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn cancel_batch(&self, event: &Event, batch: &RecipientBatch) -> Result<(), RenderError> {
        let events: Vec<Event> = batch
            .recipients
            .iter()
            .map(|r| {
                let message_id = MessageId::derive(event.intent_id, &r.address);
                derived(
                    event,
                    message_id,
                    "cancelled",
                    EventBody::MessageCancelled(MessageCancelled {
                        channel: batch.channel,
                        recipient: ledger_schemas::ids::normalise_recipient(&r.address),
                        attempt: None,
                    }),
                )
            })
            .collect();
        self.send_all(&events).await
    }

    async fn render_and_send(&self, event: &Event, batch: &RecipientBatch) -> Result<(), RenderError> {
        let started = std::time::Instant::now();
        let events = match &batch.template {
            Some(t) => {
                let compiled = self.cache.get(&event.tenant_id.0, &t.name, t.version, TEMPLATE_WAIT).await;
                match compiled.as_deref() {
                    Some(Ok(templates)) => render_batch(event, batch, Ok(templates)),
                    Some(Err(e)) => render_batch(event, batch, Err(e.clone())),
                    None => render_batch(
                        event,
                        batch,
                        Err(RenderFailure {
                            code: "unknown_template_version",
                            reason: format!("template {} version {} is not on the templates topic", t.name, t.version),
                        }),
                    ),
                }
            }
            None => {
                let compiled = Templates::compile(&batch.content);
                render_batch(event, batch, compiled.as_ref().map_err(Clone::clone))
            }
        };
        self.send_all(&events).await?;
        metrics::histogram!("ledger_render_batch_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Produces message events (rendered, failed, cancelled) keyed by their
    /// message id and waits for every acknowledgement.
    ///
    /// Through one produce window as wide as the batch: every record is
    /// handed to the producer, encoded into the window's one buffer (its key
    /// on the stack), before the first acknowledgement is awaited. Until
    /// 2026-12-08 each record was a `send_event` future of its own, with its
    /// own buffer and key, polled through `join_all`.
    async fn send_all(&self, events: &[Event]) -> Result<(), RenderError> {
        let mut window = kafka::ProduceWindow::new(&self.producer, &self.config, Topic::Rendered, events.len());
        window.send_events(events, |e| e.message_id.map(|m| m.0)).await?;
        window.finish().await?;
        Ok(())
    }
}

/// An event about one message of `source`'s intent, with a derived id.
fn derived(source: &Event, message_id: MessageId, what: &str, body: EventBody) -> Event {
    Event {
        event_id: EventId::derive(message_id.0, what, 0),
        body,
        tenant_id: source.tenant_id.clone(),
        intent_id: source.intent_id,
        message_id: Some(message_id),
        occurred_at: Utc::now(),
        correlation_id: source.correlation_id.clone(),
    }
}

/// Renders every recipient of `batch`: one `message.rendered` or
/// `message.render_failed` event each, with derived ids.
pub fn render_batch(event: &Event, batch: &RecipientBatch, templates: Result<&Templates, RenderFailure>) -> Vec<Event> {
    let mut failed = 0u64;
    let events: Vec<Event> = batch
        .recipients
        .iter()
        .map(|recipient| {
            let message_id = MessageId::derive(event.intent_id, &recipient.address);
            let address = ledger_schemas::ids::normalise_recipient(&recipient.address);
            let outcome = templates.clone().and_then(|t| t.render(batch, &address, &recipient.variables));
            let (what, body) = match outcome {
                Ok(rendered) => ("rendered", EventBody::MessageRendered(rendered)),
                Err(failure) => {
                    failed += 1;
                    metrics::counter!("ledger_render_failures_total", "tenant" => event.tenant_id.0.clone(), "channel" => batch.channel.as_str(), "code" => failure.code).increment(1);
                    (
                        "render_failed",
                        EventBody::RenderFailed(RenderFailed {
                            channel: batch.channel,
                            recipient: address.clone(),
                            code: failure.code.to_owned(),
                            reason: failure.reason,
                        }),
                    )
                }
            };
            derived(event, message_id, what, body)
        })
        .collect();
    // Counted once per batch: label sets cost an allocation each.
    metrics::counter!("ledger_messages_rendered_total", "tenant" => event.tenant_id.0.clone(), "channel" => batch.channel.as_str())
        .increment(events.len() as u64 - failed);
    events
}
