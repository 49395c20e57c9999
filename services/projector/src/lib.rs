//! The projector: folds every topic of the log into the reporting read model.
//!
//! Delivery guarantee: exactly-once effect on the read model (invariant 6).
//! Each batch is applied in one transaction together with the offsets it
//! consumed (`projector_offsets`), after locking those offset rows; records
//! below the stored offset are skipped. Kafka's committed offsets are only a
//! starting hint, committed after the database, so they never run ahead of
//! it. The folds themselves are idempotent and order-tolerant, so even a
//! re-applied event could not move a status backwards.
//!
//! Undecodable records on the outcomes topic (which only the projector
//! consumes) are dead-lettered; on the other topics their owning consumer
//! does that, and the projector counts and skips them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ledger_projections::store::{self, PartitionOffset};
use ledger_projections::Fold;
use ledger_runtime::{kafka, Config, RuntimeError, Shutdown};
use ledger_schemas::{ConsumerGroup, DecodeError, Event, Topic};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use sqlx::PgPool;

/// The topics folded into the read model.
pub const TOPICS: [Topic; 4] = [Topic::Intents, Topic::Rendered, Topic::Outcomes, Topic::DeadLetter];

pub struct Projector {
    config: Config,
    consumer: kafka::LedgerConsumer,
    producer: FutureProducer,
    reporting: PgPool,
    /// Key of this projection's rows in `projector_offsets`.
    name: String,
}

/// How long a batch waits for the next record before it is applied.
const IDLE_GAP: Duration = Duration::from_millis(5);

pub async fn build(config: &Config) -> Result<Projector, RuntimeError> {
    Ok(Projector {
        config: config.clone(),
        consumer: kafka::consumer(config, ConsumerGroup::Projector, &TOPICS)?,
        producer: kafka::producer(config)?,
        reporting: ledger_runtime::db::pool(&config.reporting_database_url, 4).await?,
        name: config.group(ConsumerGroup::Projector),
    })
}

impl Projector {
    pub async fn run(self, shutdown: Shutdown) -> Result<(), RuntimeError> {
        tracing::info!(group = %self.name, "projector started");
        let flush = Duration::from_millis(self.config.projector.flush_interval_ms);
        loop {
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
            let mut weight = rows_of(&first);
            let mut batch = vec![first];
            let deadline = Instant::now() + flush;
            while weight < self.config.projector.batch_size {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                // Group commit: what arrived while the last batch was being
                // applied goes in this one; once the records stop coming for
                // a moment, it goes. Busy, batches grow to batch_size; quiet,
                // an event waits for one transaction, not for the interval.
                match tokio::time::timeout(left.min(IDLE_GAP), self.consumer.recv()).await {
                    Ok(Ok(m)) => {
                        let m = m.detach();
                        weight += rows_of(&m);
                        batch.push(m);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "consume failed");
                        break;
                    }
                    Err(_) => break,
                }
            }
            // The batch is held until it is applied: a database outage delays
            // the read model, it never loses events.
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.apply(&batch).await {
                    Ok(()) => break,
                    Err(e) => {
                        if shutdown.is_triggered() {
                            let _ = self.consumer.commit_consumer_state(CommitMode::Sync);
                            return Ok(());
                        }
                        tracing::warn!(error = %e, records = batch.len(), "projection batch failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
            kafka::store_done(&self.consumer, &batch)?;
        }
        let _ = self.consumer.commit_consumer_state(CommitMode::Sync);
        tracing::info!("projector stopped");
        Ok(())
    }

    async fn apply(&self, batch: &[OwnedMessage]) -> Result<(), ApplyError> {
        let started = Instant::now();
        let mut tx = self.reporting.begin().await?;
        let applied = apply_records(&mut tx, &self.name, batch, &|_| true, &mut |_| {}).await?;
        for (i, e) in &applied.undecodable {
            let m = &batch[*i];
            let topic = Topic::from_name(&self.config.kafka.topic_prefix, m.topic());
            if topic == Some(Topic::Outcomes) {
                kafka::dead_letter(
                    &self.producer,
                    &self.config,
                    ConsumerGroup::Projector,
                    m,
                    None,
                    e.code(),
                    &e.to_string(),
                )
                .await?;
            } else {
                metrics::counter!("ledger_projection_skipped_total", "topic" => m.topic().to_owned(), "code" => e.code())
                    .increment(1);
            }
        }
        tx.commit().await?;
        metrics::counter!("ledger_projection_events_total").increment(applied.fresh);
        metrics::histogram!("ledger_projection_batch_size").record(applied.fresh as f64);
        metrics::histogram!("ledger_projection_batch_seconds").record(started.elapsed().as_secs_f64());
        if let Some(t) = applied.newest {
            let lag = (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::gauge!("ledger_projection_lag_seconds").set(lag);
        }
        tracing::debug!(
            records = batch.len(),
            fresh = applied.fresh,
            messages = applied.rows.messages,
            "projection batch applied"
        );
        Ok(())
    }
}

/// About how many message rows a record makes: a recipient batch one per
/// recipient (so that a campaign's batches do not make one transaction of
/// a hundred thousand rows), any other event one.
fn rows_of(m: &OwnedMessage) -> usize {
    use rdkafka::message::Headers;
    let batch_type = ledger_schemas::EventKind::RecipientBatch.type_name().as_bytes();
    let is_batch = m
        .headers()
        .is_some_and(|h| h.iter().any(|h| h.key == ledger_schemas::HEADER_EVENT_TYPE && h.value == Some(batch_type)));
    if !is_batch {
        return 1;
    }
    let payload = m.payload().unwrap_or_default();
    let needle = b"\"address\"";
    payload.windows(needle.len()).filter(|w| w == needle).count().max(1)
}

/// What [`apply_records`] did with a batch.
#[derive(Debug, Default)]
pub struct Applied {
    /// Records at or past the stored offsets (the others were applied by an
    /// earlier transaction).
    pub fresh: u64,
    /// Fresh events that `keep` passed and were folded in.
    pub folded: u64,
    /// Fresh records that are no event: their index in the batch, and why.
    pub undecodable: Vec<(usize, DecodeError)>,
    /// The latest time among the folded events.
    pub newest: Option<chrono::DateTime<chrono::Utc>>,
    pub rows: store::AppliedBatch,
}

/// Folds `records` into the read model in `tx` and advances the offsets of
/// `consumer` past them, both in the one transaction (invariant 6). Records
/// below the stored offsets are skipped; so are fresh events that `keep`
/// refuses (an as-of replay), whose offsets still advance. `seen` is shown
/// every folded event. The caller commits.
pub async fn apply_records(
    tx: &mut sqlx::PgConnection,
    consumer: &str,
    records: &[OwnedMessage],
    keep: &(dyn Fn(&Event) -> bool + Sync),
    seen: &mut (dyn FnMut(&Event) + Send),
) -> Result<Applied, ledger_projections::StoreError> {
    let mut partitions: Vec<(String, i32)> = records.iter().map(|m| (m.topic().to_owned(), m.partition())).collect();
    partitions.sort();
    partitions.dedup();
    let applied_up_to = store::lock_offsets(tx, consumer, &partitions).await?;
    let mut fold = Fold::default();
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut applied = Applied::default();
    for (i, m) in records.iter().enumerate() {
        let key = (m.topic().to_owned(), m.partition());
        if m.offset() < applied_up_to.get(&key).copied().unwrap_or(0) {
            continue; // applied by an earlier transaction
        }
        let n = next.entry(key).or_insert(0);
        *n = (*n).max(m.offset() + 1);
        applied.fresh += 1;
        match Event::from_json(m.payload().unwrap_or_default()) {
            Ok(event) if keep(&event) => {
                applied.newest = applied.newest.max(Some(event.occurred_at));
                applied.folded += 1;
                seen(&event);
                fold.add(&event);
            }
            Ok(_) => {}
            Err(e) => applied.undecodable.push((i, e)),
        }
    }
    applied.rows = store::apply(tx, &fold).await?;
    let offsets: Vec<PartitionOffset> = next
        .into_iter()
        .map(|((topic, partition), next_offset)| PartitionOffset { topic, partition, next_offset })
        .collect();
    store::save_offsets(tx, consumer, &offsets).await?;
    Ok(applied)
}

#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Store(#[from] ledger_projections::StoreError),
    #[error("reporting database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}
