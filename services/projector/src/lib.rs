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
//! `projector.writers` transactions run side by side, each over its own
//! partitions (partition number modulo the writers): offset rows are never
//! shared between them, a partition's records are applied in order, and
//! rows that two writers touch (a message's accepted row from the intents
//! topic, an intent's counts) are locked in one order (sorted), so they
//! wait for each other; a deadlock the database breaks is applied again.
//!
//! Undecodable records on the outcomes topic (which only the projector
//! consumes) are dead-lettered; on the other topics their owning consumer
//! does that, and the projector counts and skips them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger_projections::store::{self, PartitionOffset};
use ledger_projections::Fold;
use ledger_runtime::{kafka, Config, RuntimeError, Shutdown};
use ledger_schemas::{ConsumerGroup, DecodeError, Event, Topic};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

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

pub async fn build(config: &Config) -> Result<Projector, RuntimeError> {
    Ok(Projector {
        config: config.clone(),
        consumer: kafka::consumer(config, ConsumerGroup::Projector, &TOPICS)?,
        producer: kafka::producer(config)?,
        reporting: ledger_runtime::db::pool(&config.reporting_database_url, config.projector.writers as u32 + 2)
            .await?,
        name: config.group(ConsumerGroup::Projector),
    })
}

impl Projector {
    pub async fn run(self, shutdown: Shutdown) -> Result<(), RuntimeError> {
        let writers = self.config.projector.writers.max(1);
        tracing::info!(group = %self.name, writers, "projector started");
        let this = Arc::new(self);
        // One reader hands each record to the writer of its partition: a
        // partition's records stay in order, and the writers' transactions
        // (disjoint offset rows) run side by side.
        let mut inboxes = Vec::with_capacity(writers);
        let mut running = tokio::task::JoinSet::new();
        for writer in 0..writers {
            let (tx, rx) = tokio::sync::mpsc::channel(this.config.projector.batch_size.max(64));
            inboxes.push(tx);
            running.spawn(this.clone().write(writer, rx, shutdown.clone()));
        }
        loop {
            let next = tokio::select! {
                _ = shutdown.wait() => break,
                m = this.consumer.recv() => m,
            };
            let m = match next {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "consume failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let inbox = &inboxes[writer_of(m.partition(), writers)];
            let sent = tokio::select! {
                _ = shutdown.wait() => break,
                sent = inbox.send(m) => sent,
            };
            if sent.is_err() {
                break; // that writer is gone: the join below says why
            }
        }
        drop(inboxes);
        let mut result = Ok(());
        while let Some(done) = running.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "projection writer failed");
                result = Err(RuntimeError::Task(e.to_string()));
            }
        }
        let _ = this.consumer.commit_consumer_state(CommitMode::Sync);
        tracing::info!("projector stopped");
        result
    }

    /// One writer: gathers its partitions' records into batches and applies
    /// each in one transaction with their offsets, retrying until it goes.
    async fn write(
        self: Arc<Self>,
        writer: usize,
        mut inbox: tokio::sync::mpsc::Receiver<OwnedMessage>,
        shutdown: Shutdown,
    ) {
        let gather = Duration::from_millis(self.config.projector.flush_interval_ms);
        // The writer's own connection, kept between batches: a pooled one
        // costs a round trip to the server when it is taken and another
        // when it comes back (sqlx checks it both times). Given back (and
        // replaced) when a batch fails.
        let mut held: Option<PoolConnection<Postgres>> = None;
        loop {
            let first = tokio::select! {
                _ = shutdown.wait() => return,
                m = inbox.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
            };
            let mut weight = rows_of(&first);
            let mut batch = vec![first];
            // Group commit: a batch is what is queued when the writer is
            // free (what arrived while its last transaction ran), up to
            // batch_size. Only while nothing is queued does it wait for more,
            // and no longer than `gather` after its first record. Busy, the
            // batches grow with the load; quiet, an event waits for one
            // transaction. (Waiting instead until the records stopped coming
            // for 5 ms, capped at 200 ms, held a steady stream's records up
            // to 200 ms in every batch: in bench-pipeline the read model's
            // last row came 8.4 and 9.3 s after the dispatcher's, 2.3 and
            // 2.3 s with this, in alternate runs.)
            let gather_until = Instant::now() + gather;
            while weight < self.config.projector.batch_size {
                let m = match inbox.try_recv() {
                    Ok(m) => m,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                        let left = gather_until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match tokio::time::timeout(left, inbox.recv()).await {
                            Ok(Some(m)) => m,
                            Ok(None) | Err(_) => break,
                        }
                    }
                };
                weight += rows_of(&m);
                batch.push(m);
            }
            // The batch is held until it is applied: a database outage delays
            // the read model, it never loses events.
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.apply(&mut held, &batch).await {
                    Ok(()) => break,
                    Err(e) => {
                        held = None;
                        if shutdown.is_triggered() {
                            return;
                        }
                        let deadlock = e.is_deadlock();
                        metrics::counter!("ledger_projection_retries_total", "reason" => if deadlock { "deadlock" } else { "error" })
                            .increment(1);
                        tracing::warn!(error = %e, writer, records = batch.len(), "projection batch failed; retrying");
                        // Two writers that locked the same rows in another
                        // order: the database rolled one back, and at once
                        // is the right time to try again.
                        if !deadlock {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }
            // Kafka's offsets are only where a restart begins to read; the
            // read model's own say what is applied. A partition revoked
            // meanwhile refuses the store, and its next owner skips what
            // this batch applied.
            if let Err(e) = kafka::store_done(&self.consumer, &batch) {
                tracing::debug!(error = %e, writer, "offsets not stored (partition revoked?)");
            }
        }
    }

    async fn apply(
        &self,
        held: &mut Option<PoolConnection<Postgres>>,
        batch: &[OwnedMessage],
    ) -> Result<(), ApplyError> {
        let started = Instant::now();
        let conn = match held {
            Some(c) => c,
            None => held.insert(self.reporting.acquire().await?),
        };
        let mut tx = sqlx::Acquire::begin(&mut **conn).await?;
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

/// The writer that applies `partition`'s records. Every topic that carries a
/// message's events has the same partition count and key, so one writer
/// holds all of a message's rendered and outcome events.
pub fn writer_of(partition: i32, writers: usize) -> usize {
    partition.max(0) as usize % writers.max(1)
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

impl ApplyError {
    /// Whether the database broke a deadlock by rolling this batch back.
    fn is_deadlock(&self) -> bool {
        let db = match self {
            ApplyError::Store(ledger_projections::StoreError::Database(e)) | ApplyError::Database(e) => e,
            ApplyError::Kafka(_) => return false,
        };
        db.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "40P01")
    }
}
