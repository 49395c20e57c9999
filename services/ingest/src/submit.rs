//! Accepting an intent: claim the idempotency key, produce the intent's
//! events and wait for every acknowledgement, remember the answer.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use ledger_runtime::kafka;
use ledger_schemas::{
    Channel, Content, Event, EventBody, EventId, IntentAccepted, IntentId, IntentKind, Priority, Recipient,
    RecipientBatch, TenantId, Topic,
};
use serde_json::Value;
use uuid::Uuid;

use crate::problem::ApiError;
use crate::AppState;

/// Records in flight to the broker at once for one request: many small
/// ones for messages, fewer for campaigns, whose records are large
/// recipient batches (the producer holds a copy of each until its ack).
pub const IN_FLIGHT_SMALL: usize = 4096;
pub const IN_FLIGHT_LARGE: usize = 32;

/// What an idempotency claim found.
pub enum Claim {
    /// First time, or an earlier attempt never got its acks: produce.
    Produce(IntentId),
    /// Accepted before: answer exactly the same again.
    Replay(Value),
}

/// Claims `key` for `tenant` and, when it is new, records in the same
/// statement (one commit on the hot path) which intents the tenant owns:
/// `owned(intent)` lists them (the intent itself, or a batch's items).
pub async fn claim_key(
    state: &AppState,
    tenant: &TenantId,
    key: &str,
    hash: &[u8],
    kind: IntentKind,
    owned: &(dyn Fn(IntentId) -> Vec<IntentId> + Sync),
) -> Result<Claim, ApiError> {
    let started = std::time::Instant::now();
    let (claim, fresh) = claim_or_find(state, tenant, key, hash, kind, owned).await?;
    if let (Claim::Produce(intent), false) = (&claim, fresh) {
        // An earlier attempt, or a renewed key: make sure the owner rows exist.
        record_owner(state, tenant, key, kind, &owned(*intent)).await?;
    }
    stage("claim", started);
    Ok(claim)
}

/// The claim, and whether this call created it (owner rows included).
async fn claim_or_find(
    state: &AppState,
    tenant: &TenantId,
    key: &str,
    hash: &[u8],
    kind: IntentKind,
    owned: &(dyn Fn(IntentId) -> Vec<IntentId> + Sync),
) -> Result<(Claim, bool), ApiError> {
    let ttl = chrono::Duration::hours(i64::from(state.config.http.idempotency_ttl_hours));
    let intent = IntentId::from_idempotency_key(tenant, key);
    let owners: Vec<Uuid> = owned(intent).into_iter().map(|i| i.0).collect();
    let inserted: bool = sqlx::query_scalar(
        "-- ingest::submit::claim_key (insert)
         WITH claim AS (
             INSERT INTO idempotency_keys (tenant_id, key, request_hash, intent_id, state, expires_at)
             VALUES ($1, $2, $3, $4, 'pending', $5)
             ON CONFLICT (tenant_id, key) DO NOTHING
             RETURNING 1
         ), owners AS (
             INSERT INTO intents (intent_id, tenant_id, kind, idempotency_key)
             SELECT id, $1, $7, $2 FROM UNNEST($6::uuid[]) AS u(id) WHERE EXISTS (SELECT 1 FROM claim)
             ON CONFLICT (intent_id) DO NOTHING
         )
         SELECT EXISTS (SELECT 1 FROM claim)",
    )
    .bind(tenant.as_str())
    .bind(key)
    .bind(hash)
    .bind(intent.0)
    .bind(Utc::now() + ttl)
    .bind(&owners)
    .bind(kind_name(kind))
    .fetch_one(&state.ops)
    .await?;
    if inserted {
        return Ok((Claim::Produce(intent), true));
    }
    let (stored_hash, intent_id, stored_state, response, expired): (Vec<u8>, Uuid, String, Option<Value>, bool) =
        sqlx::query_as(
            "-- ingest::submit::claim_key (existing)
             SELECT request_hash, intent_id, state, response, expires_at < now()
             FROM idempotency_keys WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant.as_str())
        .bind(key)
        .fetch_one(&state.ops)
        .await?;
    if expired {
        // The key outlived its retention: it starts a new intent, which must
        // not share message ids with the old one.
        let fresh = IntentId::fresh();
        let updated = sqlx::query(
            "-- ingest::submit::claim_key (reuse expired)
             UPDATE idempotency_keys
             SET request_hash = $3, intent_id = $4, state = 'pending', response = NULL, created_at = now(), expires_at = $5
             WHERE tenant_id = $1 AND key = $2 AND expires_at < now()",
        )
        .bind(tenant.as_str())
        .bind(key)
        .bind(hash)
        .bind(fresh.0)
        .bind(Utc::now() + ttl)
        .execute(&state.ops)
        .await?;
        if updated.rows_affected() == 1 {
            return Ok((Claim::Produce(fresh), false));
        }
        // Someone renewed it first: start over with their row.
        return Box::pin(claim_or_find(state, tenant, key, hash, kind, owned)).await;
    }
    if stored_hash != hash {
        return Err(ApiError::IdempotencyConflict);
    }
    match (stored_state.as_str(), response) {
        ("accepted", Some(r)) => Ok((Claim::Replay(r), false)),
        // Pending: an earlier attempt did not get its acks, or a concurrent
        // duplicate is producing right now. Producing again is safe: every
        // id is derived, so consumers see the same events twice and do
        // nothing new.
        _ => Ok((Claim::Produce(IntentId(intent_id)), false)),
    }
}

/// Responses being recorded at once (`record_accepted`): more requests wait
/// for a slot before they are answered.
pub const RECORDS_IN_FLIGHT: usize = 1024;

/// Remembers the answer, so a replay gets exactly the same one: in a task
/// of its own, which the answer does not wait for.
///
/// Neither the recording nor its commit is waited for (the response record
/// was a sixth of a single message's time in ingest at 70 % of the maximum
/// rate, one of its two round trips to PostgreSQL). Losing the record, to a
/// crash of ingest or of PostgreSQL, loses nothing accepted: the events are
/// on the log already, the key stays *pending* with the same request hash
/// and intent, and a retry with the same key produces the same derived
/// events again (which consumers drop) and gets the same response, since
/// every id in it is derived from the key. A retry that comes before the
/// record does the same. The claim before producing (`claim_key`) keeps
/// waiting: it holds the request hash and the tenant's ownership. The
/// server waits for the records under way before it stops
/// ([`crate::Ingest::run`]).
pub async fn record_accepted(state: &AppState, tenant: &TenantId, key: &str, response: Value) {
    // Never closed: a slot always comes.
    let Ok(slot) = state.record_slots.clone().acquire_owned().await else { return };
    let pool = state.ops_relaxed.clone();
    let (tenant, key) = (tenant.clone(), key.to_owned());
    state.records.spawn(async move {
        let started = std::time::Instant::now();
        let recorded = sqlx::query(
            "-- ingest::submit::record_accepted
             UPDATE idempotency_keys SET state = 'accepted', response = $3 WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant.as_str())
        .bind(&key)
        .bind(&response)
        .execute(&pool)
        .await;
        stage("record", started);
        if let Err(e) = recorded {
            // The key stays pending: a retry produces again and answers the same.
            metrics::counter!("ledger_ingest_records_failed_total").increment(1);
            tracing::warn!(tenant = %tenant, key = %key, error = %e, "response not recorded");
        }
        drop(slot);
    });
}

/// Where a submission's time goes, per step that waits on something:
/// `check` (a campaign's or a batch's body, received and checked), `claim` (the
/// idempotency key, PostgreSQL), `produce` (the broker's acknowledgement of
/// every event), `record` (the response, PostgreSQL).
pub(crate) fn stage(name: &'static str, started: std::time::Instant) {
    metrics::histogram!("ledger_ingest_stage_seconds", "stage" => name).record(started.elapsed().as_secs_f64());
}

/// Records which tenant owns the intents, before anything is produced: a
/// cancel or a status request can then be answered for any produced intent.
pub async fn record_owner(
    state: &AppState,
    tenant: &TenantId,
    key: &str,
    kind: IntentKind,
    intents: &[IntentId],
) -> Result<(), ApiError> {
    let ids: Vec<Uuid> = intents.iter().map(|i| i.0).collect();
    sqlx::query(
        "-- ingest::submit::record_owner
         INSERT INTO intents (intent_id, tenant_id, kind, idempotency_key)
         SELECT id, $2, $3, $4 FROM UNNEST($1::uuid[]) AS u(id)
         ON CONFLICT (intent_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(tenant.as_str())
    .bind(kind_name(kind))
    .bind(key)
    .execute(&state.ops)
    .await?;
    Ok(())
}

pub fn kind_name(kind: IntentKind) -> &'static str {
    match kind {
        IntentKind::Single => "single",
        IntentKind::Batch => "batch",
        IntentKind::Campaign => "campaign",
    }
}

/// Everything an intent's events share.
pub struct IntentSpec {
    pub intent: IntentId,
    pub kind: IntentKind,
    pub name: Option<String>,
    pub channel: Channel,
    pub priority: Priority,
    pub from: Option<String>,
    pub content: Content,
    pub template: Option<ledger_schemas::TemplateRef>,
    pub send_at: Option<DateTime<Utc>>,
    pub request_hash: String,
}

pub struct Envelope<'a> {
    pub tenant: &'a TenantId,
    pub correlation: &'a str,
    pub now: DateTime<Utc>,
}

impl IntentSpec {
    fn event(&self, env: &Envelope<'_>, body: EventBody, what: &str, seq: u32) -> Event {
        Event {
            event_id: EventId::derive(self.intent.0, what, seq),
            body,
            tenant_id: env.tenant.clone(),
            intent_id: self.intent,
            message_id: None,
            occurred_at: env.now,
            correlation_id: env.correlation.to_owned(),
        }
    }

    pub fn header(&self, env: &Envelope<'_>, recipient_count: u32, batch_count: u32) -> Event {
        self.event(
            env,
            EventBody::IntentAccepted(IntentAccepted {
                kind: self.kind,
                name: self.name.clone(),
                template: self.template.clone(),
                channel: self.channel,
                priority: self.priority,
                from: self.from.clone(),
                recipient_count,
                batch_count,
                send_at: self.send_at,
                request_hash: self.request_hash.clone(),
            }),
            "accepted",
            0,
        )
    }

    pub fn batch(&self, env: &Envelope<'_>, index: u32, count: u32, recipients: Vec<Recipient>) -> Event {
        self.event(
            env,
            EventBody::RecipientBatch(RecipientBatch {
                template: self.template.clone(),
                batch_index: index,
                batch_count: count,
                channel: self.channel,
                priority: self.priority,
                from: self.from.clone(),
                content: self.content.clone(),
                recipients,
                send_at: self.send_at,
            }),
            "batch",
            index,
        )
    }
}

/// Splits recipients into batches bounded by count and bytes. With `T = ()`
/// it only counts the batches that the same sizes will make.
pub struct Batcher<T = Recipient> {
    max_recipients: usize,
    max_bytes: usize,
    current: Vec<T>,
    bytes: usize,
}

impl<T> Batcher<T> {
    pub fn new(max_recipients: usize, max_bytes: usize) -> Self {
        Batcher { max_recipients, max_bytes, current: Vec::new(), bytes: 0 }
    }

    /// Adds a recipient of `size` serialised bytes; returns a full batch.
    pub fn push(&mut self, recipient: T, size: usize) -> Option<Vec<T>> {
        let full = !self.current.is_empty()
            && (self.current.len() >= self.max_recipients || self.bytes + size > self.max_bytes);
        let out = full.then(|| {
            self.bytes = 0;
            std::mem::take(&mut self.current)
        });
        self.bytes += size;
        self.current.push(recipient);
        out
    }

    pub fn finish(self) -> Option<Vec<T>> {
        (!self.current.is_empty()).then_some(self.current)
    }
}

/// Produces `events` (key = intent id) with a bounded number in flight and
/// returns once the broker acknowledged every one of them.
pub async fn produce_all(state: &AppState, in_flight: usize, events: &[Event]) -> Result<u64, ApiError> {
    let started = std::time::Instant::now();
    let mut window = kafka::ProduceWindow::new(&state.producer, &state.config, Topic::Intents, in_flight);
    let produced = match window.send_events(events, |e| Some(e.intent_id.0)).await {
        Ok(()) => window.finish().await,
        Err(e) => Err(e),
    };
    stage("produce", started);
    produced.map_err(|e| unavailable(state, e))
}

/// A record the broker did not take: 503, with when to try again.
fn unavailable(state: &AppState, e: rdkafka::error::KafkaError) -> ApiError {
    ApiError::BrokerUnavailable { detail: e.to_string(), retry_after_secs: state.config.http.retry_after_secs }
}

/// As [`produce_all`], for events encoded already, with their keys.
pub async fn produce_encoded(
    state: &AppState,
    in_flight: usize,
    events: impl futures::Stream<Item = Result<(String, kafka::Encoded), ApiError>>,
) -> Result<u64, ApiError> {
    let unavailable = |e| unavailable(state, e);
    let started = std::time::Instant::now();
    let mut window = kafka::ProduceWindow::new(&state.producer, &state.config, Topic::Intents, in_flight);
    let mut events = std::pin::pin!(events);
    let mut produced = Ok(());
    while let Some(event) = events.next().await {
        let sent = match event {
            Ok((key, encoded)) => window.send(&key, encoded).await.map_err(unavailable),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            produced = Err(e);
            break;
        }
    }
    let produced = match produced {
        Ok(()) => window.finish().await.map_err(unavailable),
        Err(e) => Err(e),
    };
    stage("produce", started);
    produced
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(i: usize) -> Recipient {
        Recipient { address: format!("u{i}@example.com"), variables: Default::default() }
    }

    #[test]
    fn batches_are_bounded_by_count_and_by_bytes() {
        let mut b = Batcher::new(3, 1000);
        let full: Vec<_> = (0..7).filter_map(|i| b.push(r(i), 10)).collect();
        assert_eq!(full.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3]);
        assert_eq!(b.finish().map(|v| v.len()), Some(1));

        let mut b = Batcher::new(100, 25);
        let full: Vec<_> = (0..5).filter_map(|i| b.push(r(i), 10)).collect();
        assert_eq!(full.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2]);
        // A recipient larger than the byte bound still gets a batch of its own.
        let mut b = Batcher::new(100, 25);
        assert!(b.push(r(0), 100).is_none());
        assert_eq!(b.push(r(1), 1).map(|v| v.len()), Some(1));
    }
}
