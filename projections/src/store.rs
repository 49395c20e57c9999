//! Writes folded rows to the reporting database. Every statement is a bulk
//! statement over arrays (UNNEST), so a batch costs a fixed number of round
//! trips whatever its size.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::fold::Fold;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reporting database: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Database errors are worth retrying: the batch is re-applied whole.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AppliedBatch {
    pub messages: u64,
    pub intents: u64,
    pub dead_letters: u64,
}

/// Locks the offset rows of `partitions` for this transaction and returns
/// the next offset to apply for each (absent: never applied). Holding the
/// lock until commit makes two projector instances that briefly own the same
/// partition (during a rebalance) apply each record once.
pub async fn lock_offsets(
    conn: &mut PgConnection,
    consumer: &str,
    partitions: &[(String, i32)],
) -> Result<HashMap<(String, i32), i64>, StoreError> {
    let topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
    let parts: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
    // Create missing rows first so that they can be locked too.
    sqlx::query(
        "-- projections::store::lock_offsets (seed)
         INSERT INTO projector_offsets (consumer, topic, partition, next_offset)
         SELECT $1, t, p, 0 FROM UNNEST($2::text[], $3::int[]) AS u(t, p)
         ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(&topics)
    .bind(&parts)
    .execute(&mut *conn)
    .await?;
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "-- projections::store::lock_offsets
         SELECT topic, partition, next_offset FROM projector_offsets
         WHERE consumer = $1
           AND (topic, partition) IN (SELECT t, p FROM UNNEST($2::text[], $3::int[]) AS u(t, p))
         ORDER BY topic, partition
         FOR UPDATE",
    )
    .bind(consumer)
    .bind(&topics)
    .bind(&parts)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

pub async fn save_offsets(
    conn: &mut PgConnection,
    consumer: &str,
    offsets: &[PartitionOffset],
) -> Result<(), StoreError> {
    let topics: Vec<&str> = offsets.iter().map(|o| o.topic.as_str()).collect();
    let parts: Vec<i32> = offsets.iter().map(|o| o.partition).collect();
    let next: Vec<i64> = offsets.iter().map(|o| o.next_offset).collect();
    sqlx::query(
        "-- projections::store::save_offsets
         INSERT INTO projector_offsets (consumer, topic, partition, next_offset, updated_at)
         SELECT $1, t, p, o, now() FROM UNNEST($2::text[], $3::int[], $4::bigint[]) AS u(t, p, o)
         ON CONFLICT (consumer, topic, partition) DO UPDATE
         SET next_offset = GREATEST(projector_offsets.next_offset, EXCLUDED.next_offset),
             updated_at = now()",
    )
    .bind(consumer)
    .bind(&topics)
    .bind(&parts)
    .bind(&next)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Upserts the folded rows with the same merge rules as
/// [`crate::fold::MessagePatch::merge`].
pub async fn apply(conn: &mut PgConnection, fold: &Fold) -> Result<AppliedBatch, StoreError> {
    let mut applied = AppliedBatch::default();
    if !fold.messages.is_empty() {
        // Sorted so concurrent writers lock rows in the same order.
        let mut rows: Vec<_> = fold.messages.values().collect();
        rows.sort_by_key(|r| r.message_id);
        macro_rules! col {
            ($f:expr) => {
                rows.iter().map($f).collect::<Vec<_>>()
            };
        }
        let result = sqlx::query(
            r#"-- projections::store::apply (messages)
            INSERT INTO messages (message_id, tenant_id, intent_id, channel, recipient, status, status_rank,
                attempts, error_attempt, last_error_code, last_error, provider_message_id,
                accepted_at, rendered_at, first_attempt_at, delivered_at, failed_at, suppressed_at, updated_at)
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                $7::smallint[], $8::int[], $9::int[], $10::text[], $11::text[], $12::text[],
                $13::timestamptz[], $14::timestamptz[], $15::timestamptz[], $16::timestamptz[],
                $17::timestamptz[], $18::timestamptz[], $19::timestamptz[])
            ON CONFLICT (message_id) DO UPDATE SET
                status = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.status COLLATE "C")
                                 > (messages.status_rank, messages.status COLLATE "C")
                              THEN EXCLUDED.status ELSE messages.status END,
                status_rank = GREATEST(messages.status_rank, EXCLUDED.status_rank),
                channel = LEAST(messages.channel COLLATE "C", EXCLUDED.channel COLLATE "C"),
                recipient = LEAST(messages.recipient COLLATE "C", EXCLUDED.recipient COLLATE "C"),
                attempts = GREATEST(messages.attempts, EXCLUDED.attempts),
                error_attempt = CASE WHEN e.wins THEN EXCLUDED.error_attempt ELSE messages.error_attempt END,
                last_error_code = CASE WHEN e.wins THEN EXCLUDED.last_error_code ELSE messages.last_error_code END,
                last_error = CASE WHEN e.wins THEN EXCLUDED.last_error ELSE messages.last_error END,
                provider_message_id = LEAST(messages.provider_message_id COLLATE "C", EXCLUDED.provider_message_id COLLATE "C"),
                accepted_at = LEAST(messages.accepted_at, EXCLUDED.accepted_at),
                rendered_at = LEAST(messages.rendered_at, EXCLUDED.rendered_at),
                first_attempt_at = LEAST(messages.first_attempt_at, EXCLUDED.first_attempt_at),
                delivered_at = LEAST(messages.delivered_at, EXCLUDED.delivered_at),
                failed_at = LEAST(messages.failed_at, EXCLUDED.failed_at),
                suppressed_at = LEAST(messages.suppressed_at, EXCLUDED.suppressed_at),
                updated_at = GREATEST(messages.updated_at, EXCLUDED.updated_at)
            "#
            .replace(
                "e.wins",
                r#"((EXCLUDED.error_attempt, EXCLUDED.last_error_code IS NOT NULL,
                     COALESCE(EXCLUDED.last_error_code, '') COLLATE "C", COALESCE(EXCLUDED.last_error, '') COLLATE "C")
                  > (messages.error_attempt, messages.last_error_code IS NOT NULL,
                     COALESCE(messages.last_error_code, '') COLLATE "C", COALESCE(messages.last_error, '') COLLATE "C"))"#,
            )
            .as_str(),
        )
        .bind(col!(|r| r.message_id.0))
        .bind(col!(|r| r.tenant_id.clone()))
        .bind(col!(|r| r.intent_id.0))
        .bind(col!(|r| r.channel.clone()))
        .bind(col!(|r| r.recipient.clone()))
        .bind(col!(|r| r.status.as_str()))
        .bind(col!(|r| r.status.rank()))
        .bind(col!(|r| r.attempts))
        .bind(col!(|r| r.error_attempt))
        .bind(col!(|r| r.last_error_code.clone()))
        .bind(col!(|r| r.last_error.clone()))
        .bind(col!(|r| r.provider_message_id.clone()))
        .bind(col!(|r| r.accepted_at))
        .bind(col!(|r| r.rendered_at))
        .bind(col!(|r| r.first_attempt_at))
        .bind(col!(|r| r.delivered_at))
        .bind(col!(|r| r.failed_at))
        .bind(col!(|r| r.suppressed_at))
        .bind(col!(|r| r.updated_at))
        .execute(&mut *conn)
        .await?;
        applied.messages = result.rows_affected();
    }
    if !fold.intents.is_empty() {
        let rows: Vec<_> = fold.intents.values().collect();
        let result = sqlx::query(
            "-- projections::store::apply (intents)
             INSERT INTO intents (intent_id, tenant_id, kind, channel, priority, recipient_count, batch_count, accepted_at, name)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::int[],
                                  $8::timestamptz[], $9::text[])
             ON CONFLICT (intent_id) DO NOTHING",
        )
        .bind(rows.iter().map(|r| r.intent_id.0).collect::<Vec<Uuid>>())
        .bind(rows.iter().map(|r| r.tenant_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.kind.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.channel.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.priority.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.recipient_count).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.batch_count).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.accepted_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
        applied.intents = result.rows_affected();
    }
    if !fold.cancelled.is_empty() {
        let (ids, at): (Vec<Uuid>, Vec<DateTime<Utc>>) = fold.cancelled.iter().map(|(i, t)| (i.0, *t)).unzip();
        sqlx::query(
            "-- projections::store::apply (intent_cancellations)
             INSERT INTO intent_cancellations (intent_id, cancelled_at)
             SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[])
             ON CONFLICT (intent_id) DO UPDATE SET cancelled_at = LEAST(intent_cancellations.cancelled_at, EXCLUDED.cancelled_at)",
        )
        .bind(&ids)
        .bind(&at)
        .execute(&mut *conn)
        .await?;
    }
    if !fold.dead_letters.is_empty() {
        let rows = &fold.dead_letters;
        let result = sqlx::query(
            "-- projections::store::apply (dead_letters)
             INSERT INTO dead_letters (event_id, tenant_id, source_topic, source_partition, source_offset, consumer, code, reason, occurred_at)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::timestamptz[])
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.tenant_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.source_topic.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.source_partition).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.source_offset).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.consumer.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.code.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.reason.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
        applied.dead_letters = result.rows_affected();
    }
    Ok(applied)
}
