//! The renderer: expands each recipient batch of an accepted intent into one
//! rendered message per recipient.
//!
//! Delivery guarantee: at-least-once, effectively-once downstream. A batch's
//! offset is stored only after every message it produced was acknowledged;
//! after a crash the batch is rendered again and yields the same message ids
//! (derived from intent id and recipient) and the same event ids, which the
//! dispatcher's claims and the projector's merges recognise (invariant 3).
//! A render failure is an event for that recipient; an undecodable record is
//! dead-lettered with its reason; neither stops the partition.

pub mod render;

use std::time::Duration;

use futures::future::join_all;
use ledger_runtime::{kafka, Config, RuntimeError, Shutdown};
use ledger_schemas::{ConsumerGroup, Event, EventBody, EventId, MessageId, RecipientBatch, Topic};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message;

pub struct Renderer {
    config: Config,
    consumer: StreamConsumer,
    producer: FutureProducer,
}

pub fn build(config: &Config) -> Result<Renderer, RuntimeError> {
    Ok(Renderer {
        config: config.clone(),
        consumer: kafka::consumer(config, ConsumerGroup::Renderer, &[Topic::Intents])?,
        producer: kafka::producer(config)?,
    })
}

impl Renderer {
    pub async fn run(self, shutdown: Shutdown) -> Result<(), RuntimeError> {
        tracing::info!(topic = %self.config.topic(Topic::Intents), "renderer started");
        loop {
            let message = tokio::select! {
                _ = shutdown.wait() => break,
                m = self.consumer.recv() => m,
            };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "consume failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // A record is retried until its effects are durable: skipping it
            // would lose recipients.
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = self.handle(&message).await {
                if shutdown.is_triggered() {
                    break;
                }
                tracing::warn!(error = %e, offset = message.offset(), "render effects not acknowledged; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            if shutdown.is_triggered() {
                break;
            }
            self.consumer.store_offset_from_message(&message)?;
        }
        let _ = self.consumer.commit_consumer_state(CommitMode::Sync);
        tracing::info!("renderer stopped");
        Ok(())
    }

    async fn handle(&self, message: &BorrowedMessage<'_>) -> Result<(), rdkafka::error::KafkaError> {
        let payload = message.payload().unwrap_or_default();
        let event = match Event::from_json(payload) {
            Ok(e) => e,
            Err(e) => {
                return kafka::dead_letter(
                    &self.producer,
                    &self.config,
                    ConsumerGroup::Renderer,
                    message,
                    None,
                    e.code(),
                    &e.to_string(),
                )
                .await
            }
        };
        let EventBody::RecipientBatch(batch) = &event.body else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let events = render_batch(&event, batch);
        let sends = events.iter().map(|e| {
            let key = e.message_id.map(|m| m.to_string()).unwrap_or_default();
            async move { kafka::send_event(&self.producer, &self.config, Topic::Rendered, &key, e).await }
        });
        // Rendered messages go to the rendered topic, render failures too:
        // both are facts about one message, keyed by it.
        for result in join_all(sends).await {
            result?;
        }
        metrics::histogram!("ledger_render_batch_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Renders every recipient of `batch`: one `message.rendered` or
/// `message.render_failed` event each, with derived ids.
pub fn render_batch(event: &Event, batch: &RecipientBatch) -> Vec<Event> {
    let templates = render::Templates::compile(&batch.content);
    batch
        .recipients
        .iter()
        .map(|recipient| {
            let message_id = MessageId::derive(event.intent_id, &recipient.address);
            let address = ledger_schemas::ids::normalise_recipient(&recipient.address);
            let body = match templates.as_ref().map_err(Clone::clone).and_then(|t| t.render(batch, &address, &recipient.variables)) {
                Ok(rendered) => {
                    metrics::counter!("ledger_messages_rendered_total", "tenant" => event.tenant_id.0.clone(), "channel" => batch.channel.as_str()).increment(1);
                    EventBody::MessageRendered(rendered)
                }
                Err(failure) => {
                    metrics::counter!("ledger_render_failures_total", "tenant" => event.tenant_id.0.clone(), "channel" => batch.channel.as_str()).increment(1);
                    EventBody::RenderFailed(ledger_schemas::RenderFailed {
                        channel: batch.channel,
                        recipient: address.clone(),
                        code: failure.code.to_owned(),
                        reason: failure.reason,
                    })
                }
            };
            let what = match body {
                EventBody::MessageRendered(_) => "rendered",
                _ => "render_failed",
            };
            Event {
                event_id: EventId::derive(message_id.0, what, 0),
                body,
                tenant_id: event.tenant_id.clone(),
                intent_id: event.intent_id,
                message_id: Some(message_id),
                occurred_at: chrono::Utc::now(),
                correlation_id: event.correlation_id.clone(),
            }
        })
        .collect()
}
