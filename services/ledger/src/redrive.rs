//! `ledger redrive`: sends failed, ambiguous or dead-lettered messages again
//! as new attempts through the normal path (the dispatcher, so the
//! governor, suppression and the sandbox all apply).
//!
//! A failed or ambiguous message is moved, in the operational store, from
//! its decided attempt N to *retrying* attempt N + 1 — a compare-and-set on
//! (state, attempt), so of two redrives of the same messages only one moves
//! each — and its rendered message (read from the log) is put on the
//! retries topic for attempt N + 1. Only the claim in *retrying* at N + 1
//! lets a dispatcher call the provider, so a record sent twice sends once.
//! Dead-lettered messages go back through `ledger dlq` reprocessing.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::ValueEnum;
use ledger_runtime::Config;
use ledger_schemas::{Event, EventBody, MessageId, Topic};
use rdkafka::Message;
use uuid::Uuid;

use crate::confirm::confirm;
use crate::{dlq, log};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedriveStatus {
    Failed,
    DeadLettered,
    Ambiguous,
}

impl RedriveStatus {
    fn read_model(self) -> &'static str {
        match self {
            RedriveStatus::Failed => "failed",
            RedriveStatus::DeadLettered => "dead_lettered",
            RedriveStatus::Ambiguous => "ambiguous",
        }
    }
}

pub struct Options {
    pub status: RedriveStatus,
    pub tenant: Option<String>,
    pub campaign: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub dry_run: bool,
    pub yes: bool,
}

#[derive(sqlx::FromRow)]
struct Candidate {
    message_id: Uuid,
    tenant_id: String,
    recipient: Option<String>,
    attempts: i32,
    last_error_code: Option<String>,
}

pub async fn redrive(config: &Config, o: Options) -> anyhow::Result<()> {
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 1).await?;
    let candidates: Vec<Candidate> = sqlx::query_as(
        "-- ledger::redrive::candidates
         SELECT message_id, tenant_id, recipient, attempts, last_error_code FROM messages
         WHERE status = $1 AND ($2::text IS NULL OR tenant_id = $2) AND ($3::uuid IS NULL OR intent_id = $3)
           AND ($4::timestamptz IS NULL OR updated_at >= $4)
         ORDER BY message_id",
    )
    .bind(o.status.read_model())
    .bind(&o.tenant)
    .bind(o.campaign)
    .bind(o.since)
    .fetch_all(&reporting)
    .await
    .context("reading the read model")?;
    let status = o.status.read_model();
    if candidates.is_empty() {
        println!("no {status} messages match");
        return Ok(());
    }
    if o.dry_run {
        println!("would redrive {} {status} message(s) (dry run: nothing sent):", candidates.len());
        for c in &candidates {
            println!(
                "  {}  tenant={}  to={}  attempts={}  last_error={}",
                c.message_id,
                c.tenant_id,
                c.recipient.as_deref().unwrap_or("-"),
                c.attempts,
                c.last_error_code.as_deref().unwrap_or("-")
            );
        }
        return Ok(());
    }
    confirm(config, o.yes, &format!("send {} {status} message(s) again", candidates.len()))?;
    if o.status == RedriveStatus::DeadLettered {
        let ids: HashSet<MessageId> = candidates.iter().map(|c| MessageId(c.message_id)).collect();
        let letters = dlq::letters(config).await?;
        let chosen: Vec<&dlq::Letter> =
            letters.iter().filter(|l| l.event.message_id.is_some_and(|m| ids.contains(&m))).collect();
        return dlq::send_back(config, &chosen, false, false, true).await;
    }

    // Each message's rendered record, from its partition of the rendered topic.
    let rendered = rendered_messages(config, candidates.iter().map(|c| c.message_id)).await?;
    let missing: Vec<Uuid> = candidates.iter().map(|c| c.message_id).filter(|id| !rendered.contains_key(id)).collect();
    for id in &missing {
        println!("{id}: its rendered message is not on the log any more; not redriven");
    }
    let ids: Vec<Uuid> = candidates.iter().map(|c| c.message_id).filter(|id| rendered.contains_key(id)).collect();

    let ops = ledger_runtime::db::pool(&config.ops_database_url, 1).await?;
    let moved: Vec<(Uuid, i32)> = sqlx::query_as(
        "-- ledger::redrive::reopen
         UPDATE delivery_claims SET state = 'retrying', attempt = attempt + 1, next_attempt_at = now(),
                updated_at = now()
         WHERE message_id = ANY($1)
           AND ((state = 'done' AND outcome::jsonb->>'type' = 'delivery.failed.v1' AND $2 = 'failed')
             OR (state = 'ambiguous' AND $2 = 'ambiguous'))
         RETURNING message_id, attempt",
    )
    .bind(&ids)
    .bind(status)
    .fetch_all(&ops)
    .await?;
    // Redriven before and not yet taken up (the read model still has the
    // old status): their retry records are sent again, which is harmless.
    let moved_ids: Vec<Uuid> = moved.iter().map(|(id, _)| *id).collect();
    let waiting: Vec<(Uuid, i32)> = sqlx::query_as(
        "-- ledger::redrive::waiting
         SELECT message_id, attempt FROM delivery_claims
         WHERE message_id = ANY($1) AND state = 'retrying' AND NOT message_id = ANY($2)",
    )
    .bind(&ids)
    .bind(&moved_ids)
    .fetch_all(&ops)
    .await?;
    let producer = ledger_runtime::kafka::producer(config)?;
    let now = Utc::now();
    for (id, attempt) in moved.iter().chain(waiting.iter()) {
        let event = &rendered[id];
        ledger_dispatcher::send_retry_record(&producer, config, event, *attempt as u32, now).await?;
    }
    let mut by_attempt: BTreeMap<i32, usize> = BTreeMap::new();
    for (_, a) in &moved {
        *by_attempt.entry(*a).or_default() += 1;
    }
    let attempts: Vec<String> = by_attempt.iter().map(|(a, n)| format!("{n} as attempt {a}")).collect();
    println!(
        "redriven {} message(s){}",
        moved.len(),
        if attempts.is_empty() { String::new() } else { format!(": {}", attempts.join(", ")) }
    );
    if !waiting.is_empty() {
        println!(
            "{} message(s) were redriven before and not yet taken up: their retry records were sent again",
            waiting.len()
        );
    }
    let untouched = ids.len() - moved.len() - waiting.len();
    if untouched > 0 {
        println!(
            "{untouched} message(s) left alone: the operational store has moved them on since the read model saw them"
        );
    }
    Ok(())
}

/// The rendered message of each of `ids` on the log (the first one, should
/// a message have been rendered twice: they are the same).
async fn rendered_messages(config: &Config, ids: impl Iterator<Item = Uuid>) -> anyhow::Result<HashMap<Uuid, Event>> {
    let consumer = log::reader(config)?;
    let name = config.topic(Topic::Rendered);
    let n = log::partitions(&consumer, &name)?;
    let mut wanted: HashSet<Uuid> = HashSet::new();
    let mut partitions: Vec<i32> = Vec::new();
    for id in ids {
        wanted.insert(id);
        partitions.push(ledger_runtime::kafka::partition_for(id.to_string().as_bytes(), n));
    }
    partitions.sort();
    partitions.dedup();
    let spans =
        partitions.into_iter().map(|p| log::span(&consumer, &name, p, None)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut found = HashMap::new();
    let mut chunks = log::stream(config, spans, 10_000);
    while let Some(chunk) = chunks.recv().await {
        for m in chunk? {
            let Ok(event) = Event::from_json(m.payload().unwrap_or_default()) else { continue };
            let Some(id) = event.message_id.map(|m| m.0) else { continue };
            if matches!(event.body, EventBody::MessageRendered(_)) && wanted.contains(&id) {
                found.entry(id).or_insert(event);
            }
        }
    }
    Ok(found)
}
