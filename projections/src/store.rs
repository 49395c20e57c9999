//! Writes folded rows to the reporting database. Every statement is a bulk
//! statement over arrays (UNNEST), so a batch costs a fixed number of round
//! trips whatever its size.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::fold::{Fold, MessagePatch};

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

/// The rows of a batch's messages as a relation `input`, one array per
/// column ($1 … $29, bound by [`bind_messages`]).
const MESSAGES_INPUT: &str = r#"WITH input AS (
                SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                    $7::smallint[], $8::int[], $9::int[], $10::text[], $11::text[], $12::text[],
                    $13::timestamptz[], $14::timestamptz[], $15::timestamptz[], $16::timestamptz[],
                    $17::timestamptz[], $18::timestamptz[], $19::timestamptz[], $20::text[], $21::int[],
                    $22::timestamptz[], $23::timestamptz[], $24::timestamptz[], $25::timestamptz[], $26::timestamptz[],
                    $27::text[], $28::int[], $29::int[])
                AS u(message_id, tenant_id, intent_id, channel, recipient, status, status_rank,
                     attempts, error_attempt, last_error_code, last_error, provider_message_id,
                     accepted_at, rendered_at, first_attempt_at, delivered_at, failed_at, suppressed_at, updated_at,
                     identity, identity_attempt, opened_at, clicked_at, bounced_at, complained_at, unsubscribed_at,
                     template, template_version, status_attempt)
            )"#;

/// How a stored row (`messages`) and a batch's patch (`NEW`) merge: the
/// rules of [`crate::fold::MessagePatch::merge`] as a SET list, in which
/// `x.wins` stands for the comparisons of [`MESSAGES_WINS`].
const MESSAGES_MERGE: &str = r#"
    status = CASE WHEN s.wins THEN NEW.status ELSE messages.status END,
    status_rank = CASE WHEN s.wins THEN NEW.status_rank ELSE messages.status_rank END,
    status_attempt = CASE WHEN s.wins THEN NEW.status_attempt ELSE messages.status_attempt END,
    channel = LEAST(messages.channel COLLATE "C", NEW.channel COLLATE "C"),
    recipient = LEAST(messages.recipient COLLATE "C", NEW.recipient COLLATE "C"),
    attempts = GREATEST(messages.attempts, NEW.attempts),
    error_attempt = CASE WHEN e.wins THEN NEW.error_attempt ELSE messages.error_attempt END,
    last_error_code = CASE WHEN e.wins THEN NEW.last_error_code ELSE messages.last_error_code END,
    last_error = CASE WHEN e.wins THEN NEW.last_error ELSE messages.last_error END,
    provider_message_id = LEAST(messages.provider_message_id COLLATE "C", NEW.provider_message_id COLLATE "C"),
    accepted_at = LEAST(messages.accepted_at, NEW.accepted_at),
    rendered_at = LEAST(messages.rendered_at, NEW.rendered_at),
    first_attempt_at = LEAST(messages.first_attempt_at, NEW.first_attempt_at),
    delivered_at = LEAST(messages.delivered_at, NEW.delivered_at),
    failed_at = LEAST(messages.failed_at, NEW.failed_at),
    suppressed_at = LEAST(messages.suppressed_at, NEW.suppressed_at),
    opened_at = LEAST(messages.opened_at, NEW.opened_at),
    clicked_at = LEAST(messages.clicked_at, NEW.clicked_at),
    bounced_at = LEAST(messages.bounced_at, NEW.bounced_at),
    complained_at = LEAST(messages.complained_at, NEW.complained_at),
    unsubscribed_at = LEAST(messages.unsubscribed_at, NEW.unsubscribed_at),
    template = CASE WHEN t.wins THEN NEW.template ELSE messages.template END,
    template_version = CASE WHEN t.wins THEN NEW.template_version ELSE messages.template_version END,
    updated_at = GREATEST(messages.updated_at, NEW.updated_at),
    identity = CASE WHEN i.wins THEN NEW.identity ELSE messages.identity END,
    identity_attempt = CASE WHEN i.wins THEN NEW.identity_attempt ELSE messages.identity_attempt END"#;

/// Whether the patch's status (s), error (e), template (t) and identity (i)
/// replace the row's.
const MESSAGES_WINS: [(&str, &str); 4] = [
    (
        "s.wins",
        r#"((NEW.status_attempt, NEW.status_rank, NEW.status COLLATE "C")
          > (messages.status_attempt, messages.status_rank, messages.status COLLATE "C"))"#,
    ),
    (
        "e.wins",
        r#"((NEW.error_attempt, NEW.last_error_code IS NOT NULL,
             COALESCE(NEW.last_error_code, '') COLLATE "C", COALESCE(NEW.last_error, '') COLLATE "C")
          > (messages.error_attempt, messages.last_error_code IS NOT NULL,
             COALESCE(messages.last_error_code, '') COLLATE "C", COALESCE(messages.last_error, '') COLLATE "C"))"#,
    ),
    (
        "t.wins",
        r#"((NEW.template_version IS NOT NULL, COALESCE(NEW.template_version, 0), COALESCE(NEW.template, '') COLLATE "C")
          > (messages.template_version IS NOT NULL, COALESCE(messages.template_version, 0), COALESCE(messages.template, '') COLLATE "C"))"#,
    ),
    (
        "i.wins",
        r#"((NEW.identity_attempt, COALESCE(NEW.identity, '') COLLATE "C")
          > (messages.identity_attempt, COALESCE(messages.identity, '') COLLATE "C"))"#,
    ),
];

/// [`MESSAGES_MERGE`] with the patch's row called `new`, followed by the
/// condition under which that merge changes the stored row: a patch that
/// the row already holds (a replayed event, or a rendered event that
/// arrives after its attempt, which carried the same time) is skipped
/// rather than rewritten as an identical new row version.
fn messages_merge(new: &str) -> String {
    let resolve = |expr: &str| {
        MESSAGES_WINS
            .iter()
            .fold(expr.to_owned(), |e, (name, comparison)| e.replace(name, comparison))
            .replace("NEW.", &format!("{new}."))
    };
    let (columns, merged): (Vec<&str>, Vec<String>) = MESSAGES_MERGE
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (column, expr) = l.split_once(" = ").expect("each line of MESSAGES_MERGE is `column = expression`");
            (column.trim(), resolve(expr.trim().trim_end_matches(',')))
        })
        .unzip();
    let set: Vec<String> = columns.iter().zip(&merged).map(|(c, e)| format!("{c} = {e}")).collect();
    let stored: Vec<String> = columns.iter().map(|c| format!("messages.{c}")).collect();
    format!("{}\n    WHERE ({}) IS DISTINCT FROM ({})", set.join(",\n    "), stored.join(", "), merged.join(", "))
}

/// Inserts the batch's messages, merging those that exist already.
static INSERT_MESSAGES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "-- projections::store::apply (messages)\n{MESSAGES_INPUT}
         INSERT INTO messages (message_id, tenant_id, intent_id, channel, recipient, status, status_rank,
             attempts, error_attempt, last_error_code, last_error, provider_message_id,
             accepted_at, rendered_at, first_attempt_at, delivered_at, failed_at, suppressed_at, updated_at,
             identity, identity_attempt, opened_at, clicked_at, bounced_at, complained_at, unsubscribed_at,
             template, template_version, status_attempt)
         SELECT * FROM input
         ON CONFLICT (message_id) DO UPDATE SET {}",
        messages_merge("EXCLUDED")
    )
});

type MessagesQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds the 29 columns of `rows` to a statement that starts with
/// [`MESSAGES_INPUT`].
fn bind_messages<'q>(query: MessagesQuery<'q>, rows: &[&MessagePatch]) -> MessagesQuery<'q> {
    macro_rules! col {
        ($f:expr) => {
            rows.iter().map($f).collect::<Vec<_>>()
        };
    }
    query
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
        .bind(col!(|r| r.identity.clone()))
        .bind(col!(|r| r.identity_attempt))
        .bind(col!(|r| r.opened_at))
        .bind(col!(|r| r.clicked_at))
        .bind(col!(|r| r.bounced_at))
        .bind(col!(|r| r.complained_at))
        .bind(col!(|r| r.unsubscribed_at))
        .bind(col!(|r| r.template.clone()))
        .bind(col!(|r| r.template_version))
        .bind(col!(|r| r.status_attempt))
}

/// Upserts the folded rows with the same merge rules as
/// [`crate::fold::MessagePatch::merge`].
pub async fn apply(conn: &mut PgConnection, fold: &Fold) -> Result<AppliedBatch, StoreError> {
    let mut applied = AppliedBatch::default();
    if !fold.messages.is_empty() {
        // Sorted so concurrent writers lock rows in the same order.
        let mut rows: Vec<_> = fold.messages.values().collect();
        rows.sort_by_key(|r| r.message_id);
        // The status counts and hourly roll-ups follow the rows written
        // here by the triggers of migration 0007, which see each updated
        // row's old and new version: a replayed event changes no status, so
        // it changes no count.
        bind_messages(sqlx::query(INSERT_MESSAGES.as_str()), &rows).execute(&mut *conn).await?;
        applied.messages = rows.len() as u64;
    }
    if !fold.attempts.is_empty() {
        let mut rows: Vec<_> = fold.attempts.values().collect();
        rows.sort_by_key(|r| (r.message_id, r.attempt));
        sqlx::query(
            r#"-- projections::store::apply (delivery_attempts)
            INSERT INTO delivery_attempts (message_id, attempt, tenant_id, intent_id, provider, attempted_at,
                outcome, outcome_rank, error_code, error, finished_at, identity)
            SELECT * FROM UNNEST($1::uuid[], $2::int[], $3::text[], $4::uuid[], $5::text[], $6::timestamptz[],
                $7::text[], $8::smallint[], $9::text[], $10::text[], $11::timestamptz[], $12::text[])
            ON CONFLICT (message_id, attempt) DO UPDATE SET
                provider = LEAST(delivery_attempts.provider COLLATE "C", EXCLUDED.provider COLLATE "C"),
                identity = LEAST(delivery_attempts.identity COLLATE "C", EXCLUDED.identity COLLATE "C"),
                attempted_at = LEAST(delivery_attempts.attempted_at, EXCLUDED.attempted_at),
                finished_at = LEAST(delivery_attempts.finished_at, EXCLUDED.finished_at),
                outcome = CASE WHEN o.wins THEN EXCLUDED.outcome ELSE delivery_attempts.outcome END,
                error_code = CASE WHEN o.wins THEN EXCLUDED.error_code ELSE delivery_attempts.error_code END,
                error = CASE WHEN o.wins THEN EXCLUDED.error ELSE delivery_attempts.error END,
                outcome_rank = GREATEST(delivery_attempts.outcome_rank, EXCLUDED.outcome_rank)
            "#
            .replace(
                "o.wins",
                r#"((EXCLUDED.outcome_rank, COALESCE(EXCLUDED.outcome, '') COLLATE "C")
                  > (delivery_attempts.outcome_rank, COALESCE(delivery_attempts.outcome, '') COLLATE "C"))"#,
            )
            .as_str(),
        )
        .bind(rows.iter().map(|r| r.message_id.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.attempt).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.tenant_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.intent_id.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.provider.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.attempted_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.outcome).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.outcome_rank).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.error_code.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.error.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.finished_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.identity.clone()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merge_sets_every_column_and_compares_the_same_columns_with_their_merged_values() {
        let sql = INSERT_MESSAGES.as_str();
        for name in ["s.wins", "e.wins", "t.wins", "i.wins", "NEW."] {
            assert!(!sql.contains(name), "{name} left unresolved");
        }
        let columns: Vec<&str> = MESSAGES_MERGE
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split_once(" = ").expect("column = expression").0.trim())
            .collect();
        assert_eq!(columns.len(), 26);
        let (set, condition) = sql.split_once("\n    WHERE (").expect("a condition after the SET list");
        for column in &columns {
            let set_here = [format!("SET {column} = "), format!(",\n    {column} = ")];
            assert!(set_here.iter().any(|s| set.contains(s.as_str())), "{column} is not set");
        }
        let stored: Vec<String> = columns.iter().map(|c| format!("messages.{c}")).collect();
        let (compared, merged) = condition.split_once(") IS DISTINCT FROM (").expect("IS DISTINCT FROM");
        assert_eq!(compared, stored.join(", "));
        assert_eq!(merged.matches("EXCLUDED.").count(), set.matches("EXCLUDED.").count());
    }
}
