//! The claims of messages in the operational store, on the hot path of
//! every delivery: look, claim, mark attempted, record the outcome. Each is
//! one statement over the arrays of many messages at once (see `batch`),
//! so the store's round trips do not grow with the message rate. The first
//! attempt of a message through an identity without rate limits takes its
//! claim as *attempted* in one statement (`claim_first`), so it costs two
//! statements instead of four.
//!
//! Rows are locked in message-id order within every statement, so two
//! statements of the same kind never deadlock each other.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use uuid::Uuid;

use crate::batch::{first_of_each, Batched};

/// The claim of a message as the operational store has it, with what else
/// decides its fate.
#[derive(Debug, Default, sqlx::FromRow)]
pub struct Look {
    pub state: Option<String>,
    pub attempt: Option<i32>,
    /// The outcome event as it went on the log (JSON).
    pub outcome: Option<String>,
    pub claimed_by: Option<String>,
    pub live: Option<bool>,
    pub identity: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub suppressed: Option<String>,
    pub cancelled: bool,
}

#[derive(sqlx::FromRow)]
struct LookRow {
    i: i64,
    #[sqlx(flatten)]
    look: Look,
}

pub struct LookFor {
    pub message_id: Uuid,
    pub tenant_id: String,
    /// Normalised, as the suppression list stores it.
    pub recipient: String,
    pub intent_id: Uuid,
}

pub struct ClaimFor {
    pub message_id: Uuid,
    pub tenant_id: String,
    pub intent_id: Uuid,
    pub identity: String,
}

/// A first claim taken without a look first.
pub struct FirstFor {
    pub message_id: Uuid,
    pub tenant_id: String,
    /// Normalised, as the suppression list stores it.
    pub recipient: String,
    pub intent_id: Uuid,
    pub identity: String,
}

pub struct OutcomeFor {
    pub message_id: Uuid,
    /// `done` or `ambiguous`.
    pub state: &'static str,
    /// The outcome event, serialised (as it goes on the log).
    pub outcome: String,
}

/// The batched statements of one dispatcher instance.
pub struct Claims {
    looks: Batched<LookFor, Look>,
    firsts: Batched<FirstFor, bool>,
    claims: Batched<ClaimFor, Option<i32>>,
    marks: Batched<Uuid, bool>,
    outcomes: Batched<OutcomeFor, bool>,
}

const MAX_BATCH: usize = 1_000;
const PARALLEL: usize = 2;

impl Claims {
    /// `instance` names this dispatcher in its claims; `lease` is how long
    /// a claim or an attempt stays ours without a word from us.
    pub fn start(pool: PgPool, instance: &str, lease_secs: f64) -> Claims {
        let instance: Arc<str> = instance.into();
        let held = Arc::new(Held::new(pool, PARALLEL));
        let h = held.clone();
        let looks = Batched::start("look", MAX_BATCH, PARALLEL, move |rs: Vec<LookFor>| {
            let h = h.clone();
            async move { h.run(|c| Box::pin(look(c, rs))).await }
        });
        let (h, me) = (held.clone(), instance.clone());
        let firsts = Batched::start("claim_first", MAX_BATCH, PARALLEL, move |rs: Vec<FirstFor>| {
            let (h, me) = (h.clone(), me.clone());
            async move { h.run(move |c| Box::pin(async move { claim_first(c, &me, lease_secs, rs).await })).await }
        });
        let (h, me) = (held.clone(), instance.clone());
        let claims = Batched::start("claim", MAX_BATCH, PARALLEL, move |rs: Vec<ClaimFor>| {
            let (h, me) = (h.clone(), me.clone());
            async move { h.run(move |c| Box::pin(async move { claim(c, &me, lease_secs, rs).await })).await }
        });
        let (h, me) = (held.clone(), instance.clone());
        let marks = Batched::start("mark_attempted", MAX_BATCH, PARALLEL, move |rs: Vec<Uuid>| {
            let (h, me) = (h.clone(), me.clone());
            async move { h.run(move |c| Box::pin(async move { mark_attempted(c, &me, lease_secs, rs).await })).await }
        });
        let (h, me) = (held, instance);
        let outcomes = Batched::start("record_outcome", MAX_BATCH, PARALLEL, move |rs: Vec<OutcomeFor>| {
            let (h, me) = (h.clone(), me.clone());
            async move { h.run(move |c| Box::pin(async move { record_outcome(c, &me, rs).await })).await }
        });
        Claims { looks, firsts, claims, marks, outcomes }
    }

    pub async fn look(&self, r: LookFor) -> Result<Look, Arc<sqlx::Error>> {
        self.looks.run(r).await
    }

    /// The claim of a message that has none yet, whose recipient is not
    /// suppressed and whose intent is not cancelled, taken as *attempted*
    /// at once: look, claim and mark in one statement, for the common case.
    /// `false` when any of that is not so (the message is looked at then).
    pub async fn claim_first(&self, r: FirstFor) -> Result<bool, Arc<sqlx::Error>> {
        self.firsts.run(r).await
    }

    /// A fresh claim, or taking over our own or an expired one before any
    /// call. The attempt number when it is ours now; `None` when someone
    /// else holds it, it moved on, or its intent was cancelled.
    pub async fn claim(&self, r: ClaimFor) -> Result<Option<i32>, Arc<sqlx::Error>> {
        self.claims.run(r).await
    }

    /// Moves our claim to *attempted* (the attempted event is on the log);
    /// `false` when it is no longer ours to call.
    pub async fn mark_attempted(&self, message_id: Uuid) -> Result<bool, Arc<sqlx::Error>> {
        self.marks.run(message_id).await
    }

    /// Records the outcome of our attempt; `false` when the claim was not
    /// ours in *attempted* any more.
    pub async fn record_outcome(&self, r: OutcomeFor) -> Result<bool, Arc<sqlx::Error>> {
        self.outcomes.run(r).await
    }
}

/// Connections kept out of the pool for the batched statements. A pooled
/// connection costs two round trips to the server besides each statement:
/// sqlx checks it when it is taken and again when it comes back (in the
/// dispatcher's profile, bench-pipeline, 2026-12-07, the check when taken
/// alone was 3.7 % of its CPU, half of what its statements cost it). A
/// connection whose statement failed is given back to the pool (which
/// closes it if it broke) and a new one is taken next time.
struct Held {
    pool: PgPool,
    idle: std::sync::Mutex<Vec<PoolConnection<Postgres>>>,
    /// Most connections kept.
    keep: usize,
}

type BoxFuture<'c, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

impl Held {
    fn new(pool: PgPool, keep_per_statement: usize) -> Held {
        // Five statements share them.
        Held { pool, idle: Default::default(), keep: keep_per_statement * 5 }
    }

    async fn run<T>(
        &self,
        statement: impl for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, T>,
    ) -> Result<T, sqlx::Error> {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match taken {
            Some(c) => c,
            None => self.pool.acquire().await?,
        };
        let result = statement(&mut conn).await;
        if result.is_ok() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < self.keep {
                idle.push(conn);
            }
        }
        result
    }
}

/// For a batch of requests with these message ids: whether each is the
/// first with its id, and the indexes of the first ones in ascending id
/// order (the order rows are locked in).
fn firsts_in_id_order(ids: &[Uuid]) -> (Vec<bool>, Vec<usize>) {
    let first = first_of_each(ids.iter().copied());
    let mut order: Vec<usize> = (0..ids.len()).filter(|&i| first[i]).collect();
    order.sort_by_key(|&i| ids[i]);
    (first, order)
}

async fn look(conn: &mut PgConnection, rs: Vec<LookFor>) -> Result<Vec<Look>, sqlx::Error> {
    let rows: Vec<LookRow> = sqlx::query_as(
        "-- dispatcher::claims::look
         SELECT r.i, c.state, c.attempt, c.outcome, c.claimed_by, c.lease_until > now() AS live, c.identity,
                c.next_attempt_at, s.reason AS suppressed,
                EXISTS (SELECT 1 FROM cancelled_intents ci WHERE ci.intent_id = r.intent_id) AS cancelled
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[])
              WITH ORDINALITY AS r(message_id, tenant_id, recipient, intent_id, i)
         LEFT JOIN delivery_claims c ON c.message_id = r.message_id
         LEFT JOIN suppressions s ON s.tenant_id = r.tenant_id AND s.recipient = r.recipient",
    )
    .bind(rs.iter().map(|r| r.message_id).collect::<Vec<_>>())
    .bind(rs.iter().map(|r| r.tenant_id.as_str()).collect::<Vec<_>>())
    .bind(rs.iter().map(|r| r.recipient.as_str()).collect::<Vec<_>>())
    .bind(rs.iter().map(|r| r.intent_id).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let mut looks: Vec<Option<Look>> = (0..rs.len()).map(|_| None).collect();
    for row in rows {
        if let Some(slot) = usize::try_from(row.i - 1).ok().and_then(|i| looks.get_mut(i)) {
            *slot = Some(row.look);
        }
    }
    looks.into_iter().map(|l| l.ok_or_else(|| sqlx::Error::Protocol("a look without its row".into()))).collect()
}

async fn claim(
    conn: &mut PgConnection,
    instance: &str,
    lease_secs: f64,
    rs: Vec<ClaimFor>,
) -> Result<Vec<Option<i32>>, sqlx::Error> {
    let ids: Vec<Uuid> = rs.iter().map(|r| r.message_id).collect();
    let (first, order) = firsts_in_id_order(&ids);
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(
        "-- dispatcher::claims::claim
         INSERT INTO delivery_claims (message_id, tenant_id, state, attempt, claimed_by, lease_until, identity, intent_id)
         SELECT r.message_id, r.tenant_id, 'claimed', 1, $5, now() + make_interval(secs => $6), r.identity, r.intent_id
         FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[]) AS r(message_id, tenant_id, intent_id, identity)
         WHERE NOT EXISTS (SELECT 1 FROM cancelled_intents ci WHERE ci.intent_id = r.intent_id)
         ON CONFLICT (message_id) DO UPDATE
         SET claimed_by = EXCLUDED.claimed_by, lease_until = EXCLUDED.lease_until,
             identity = EXCLUDED.identity, updated_at = now()
         WHERE delivery_claims.state = 'claimed'
           AND (delivery_claims.claimed_by = EXCLUDED.claimed_by OR delivery_claims.lease_until < now())
         RETURNING message_id, attempt",
    )
    .bind(order.iter().map(|&i| rs[i].message_id).collect::<Vec<_>>())
    .bind(order.iter().map(|&i| rs[i].tenant_id.as_str()).collect::<Vec<_>>())
    .bind(order.iter().map(|&i| rs[i].intent_id).collect::<Vec<_>>())
    .bind(order.iter().map(|&i| rs[i].identity.as_str()).collect::<Vec<_>>())
    .bind(instance)
    .bind(lease_secs)
    .fetch_all(&mut *conn)
    .await?;
    let won: std::collections::HashMap<Uuid, i32> = rows.into_iter().collect();
    Ok(rs.iter().zip(first).map(|(r, first)| if first { won.get(&r.message_id).copied() } else { None }).collect())
}

async fn claim_first(
    conn: &mut PgConnection,
    instance: &str,
    lease_secs: f64,
    rs: Vec<FirstFor>,
) -> Result<Vec<bool>, sqlx::Error> {
    let ids: Vec<Uuid> = rs.iter().map(|r| r.message_id).collect();
    let (first, order) = firsts_in_id_order(&ids);
    let rows: Vec<Uuid> = sqlx::query_scalar(
        "-- dispatcher::claims::claim_first
         INSERT INTO delivery_claims (message_id, tenant_id, state, attempt, claimed_by, lease_until, identity, intent_id)
         SELECT r.message_id, r.tenant_id, 'attempted', 1, $6, now() + make_interval(secs => $7), r.identity, r.intent_id
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[])
              AS r(message_id, tenant_id, recipient, intent_id, identity)
         WHERE NOT EXISTS (SELECT 1 FROM cancelled_intents ci WHERE ci.intent_id = r.intent_id)
           AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.tenant_id = r.tenant_id AND s.recipient = r.recipient)
         ON CONFLICT (message_id) DO NOTHING
         RETURNING message_id",
    )
    .bind(order.iter().map(|&i| rs[i].message_id).collect::<Vec<_>>())
    .bind(order.iter().map(|&i| rs[i].tenant_id.as_str()).collect::<Vec<_>>())
    .bind(order.iter().map(|&i| rs[i].recipient.as_str()).collect::<Vec<_>>())
    .bind(order.iter().map(|&i| rs[i].intent_id).collect::<Vec<_>>())
    .bind(order.iter().map(|&i| rs[i].identity.as_str()).collect::<Vec<_>>())
    .bind(instance)
    .bind(lease_secs)
    .fetch_all(&mut *conn)
    .await?;
    let won: std::collections::HashSet<Uuid> = rows.into_iter().collect();
    Ok(rs.iter().zip(first).map(|(r, first)| first && won.contains(&r.message_id)).collect())
}

async fn mark_attempted(
    conn: &mut PgConnection,
    instance: &str,
    lease_secs: f64,
    ids: Vec<Uuid>,
) -> Result<Vec<bool>, sqlx::Error> {
    let (first, order) = firsts_in_id_order(&ids);
    let order: Vec<Uuid> = order.into_iter().map(|i| ids[i]).collect();
    let rows: Vec<Uuid> = sqlx::query_scalar(
        "-- dispatcher::claims::mark_attempted
         UPDATE delivery_claims c
         SET state = 'attempted', lease_until = now() + make_interval(secs => $3), updated_at = now()
         WHERE c.message_id = ANY($1::uuid[]) AND c.claimed_by = $2 AND c.state = 'claimed'
         RETURNING c.message_id",
    )
    .bind(order)
    .bind(instance)
    .bind(lease_secs)
    .fetch_all(&mut *conn)
    .await?;
    let ours: std::collections::HashSet<Uuid> = rows.into_iter().collect();
    Ok(ids.iter().zip(first).map(|(id, first)| first && ours.contains(id)).collect())
}

async fn record_outcome(
    conn: &mut PgConnection,
    instance: &str,
    rs: Vec<OutcomeFor>,
) -> Result<Vec<bool>, sqlx::Error> {
    let ids: Vec<Uuid> = rs.iter().map(|r| r.message_id).collect();
    let (first, order) = firsts_in_id_order(&ids);
    // Each row finds its outcome at its id's place in the ids, which are
    // ascending and distinct (`order`): `width_bucket` is a binary search
    // there. Why not a join to the arrays: on a table without statistics
    // yet (a new store, the first seconds of a campaign) the planner
    // guesses that one claim matches, scans the claims and walks the whole
    // array for each: 4 s instead of 20 ms for 1,000 outcomes against
    // 20,000 claims, measured. Keys found through `= ANY` leave it no such
    // plan. (Until 2026-12-07 the outcomes came as one JSON object keyed by
    // id, which PostgreSQL parsed whole for each statement.)
    let rows: Vec<Uuid> = sqlx::query_scalar(
        "-- dispatcher::claims::record_outcome
         UPDATE delivery_claims c
         SET state = CASE WHEN c.message_id = ANY($2::uuid[]) THEN 'ambiguous' ELSE 'done' END,
             outcome = ($3::text[])[width_bucket(c.message_id, $1::uuid[])], updated_at = now()
         WHERE c.message_id = ANY($1::uuid[]) AND c.claimed_by = $4 AND c.state = 'attempted'
         RETURNING c.message_id",
    )
    .bind(order.iter().map(|&i| rs[i].message_id).collect::<Vec<_>>())
    .bind(order.iter().filter(|&&i| rs[i].state == "ambiguous").map(|&i| rs[i].message_id).collect::<Vec<_>>())
    .bind(order.iter().map(|&i| rs[i].outcome.as_str()).collect::<Vec<_>>())
    .bind(instance)
    .fetch_all(&mut *conn)
    .await?;
    let recorded: std::collections::HashSet<Uuid> = rows.into_iter().collect();
    Ok(rs.iter().zip(first).map(|(r, first)| first && recorded.contains(&r.message_id)).collect())
}
