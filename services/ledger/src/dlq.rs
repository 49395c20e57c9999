//! `ledger dlq`: the dead letters on the log with their reasons, and
//! sending them back to be processed again once the cause is fixed.
//!
//! Reprocessing sends a dead letter's original record (key and value) back
//! to the topic it came from, except that a retry record goes back as the
//! rendered message it carries: the claim in the operational store decides
//! which attempt that is, so nothing is sent twice however often a record
//! comes back. Each dead letter is reprocessed once unless `--again`.

use std::collections::{HashMap, HashSet};

use ledger_runtime::{kafka, Config};
use ledger_schemas::{DeadLettered, Event, EventBody, Topic};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::Message;
use uuid::Uuid;

use crate::confirm::confirm;
use crate::log;

/// The dead-letter payload is cut at this size (`kafka::dead_letter`); a
/// payload that long may not be the whole record.
const CUT_AT: usize = 64 * 1024;

pub struct Letter {
    pub event: Event,
    pub dead: DeadLettered,
    pub partition: i32,
    pub offset: i64,
}

/// Every dead letter on the log, oldest first.
pub async fn letters(config: &Config) -> anyhow::Result<Vec<Letter>> {
    let spans = log::whole(config, &[Topic::DeadLetter])?;
    let mut out: Vec<Letter> = log::read_all(config, spans)
        .await?
        .into_iter()
        .filter_map(|m| {
            let event = Event::from_json(m.payload().unwrap_or_default()).ok()?;
            let EventBody::DeadLettered(dead) = event.body.clone() else { return None };
            Some(Letter { event, dead, partition: m.partition(), offset: m.offset() })
        })
        .collect();
    out.sort_by_key(|l| (l.event.occurred_at, l.partition, l.offset));
    // The same record dead-lettered twice (after a crash) is one letter.
    let mut seen = HashSet::new();
    out.retain(|l| seen.insert(l.event.event_id));
    Ok(out)
}

async fn reprocessed(config: &Config) -> anyhow::Result<HashMap<Uuid, chrono::DateTime<chrono::Utc>>> {
    let ops = ledger_runtime::db::pool(&config.ops_database_url, 1).await?;
    Ok(sqlx::query_as(
        "-- ledger::dlq::reprocessed
         SELECT event_id, reprocessed_at FROM dead_letters_reprocessed",
    )
    .fetch_all(&ops)
    .await?
    .into_iter()
    .collect())
}

pub async fn list(config: &Config, code: Option<&str>) -> anyhow::Result<()> {
    let done = reprocessed(config).await?;
    let letters: Vec<Letter> =
        letters(config).await?.into_iter().filter(|l| code.is_none_or(|c| l.dead.code == c)).collect();
    println!("{} dead letter(s)", letters.len());
    for l in &letters {
        let mark = match done.get(&l.event.event_id.0) {
            Some(t) => format!("  reprocessed {}", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            None => String::new(),
        };
        let mut reason = l.dead.reason.clone();
        if reason.chars().count() > 100 {
            reason = reason.chars().take(99).collect::<String>() + "…";
        }
        println!(
            "{}  {}  {}  from {}/{}@{}  {}: {reason}{mark}",
            l.event.event_id.0,
            l.event.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            l.dead.consumer,
            l.dead.source_topic,
            l.dead.source_partition,
            l.dead.source_offset,
            l.dead.code,
        );
    }
    Ok(())
}

pub async fn show(config: &Config, id: Uuid) -> anyhow::Result<()> {
    let letter = letters(config)
        .await?
        .into_iter()
        .find(|l| l.event.event_id.0 == id)
        .ok_or_else(|| anyhow::anyhow!("no dead letter {id} on the log"))?;
    let done = reprocessed(config).await?;
    let d = &letter.dead;
    println!("dead letter   {id}");
    println!("at            {}", letter.event.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    println!("on            {}@{}", letter.partition, letter.offset);
    println!("consumer      {}", d.consumer);
    println!("source        {}/{}@{}", d.source_topic, d.source_partition, d.source_offset);
    println!("key           {}", d.key.as_deref().unwrap_or("-"));
    println!("code          {}", d.code);
    println!("reason        {}", d.reason);
    println!("tenant        {}", letter.event.tenant_id.0);
    if let Some(m) = letter.event.message_id {
        println!("message       {}", m.0);
    }
    println!("correlation   {}", letter.event.correlation_id);
    match done.get(&id) {
        Some(t) => println!("reprocessed   {}", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        None => println!("reprocessed   no"),
    }
    println!("payload ({} bytes{}):", d.payload.len(), if d.payload.len() >= CUT_AT { ", cut" } else { "" });
    match serde_json::from_str::<serde_json::Value>(&d.payload) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => println!("{}", d.payload),
    }
    Ok(())
}

pub struct Selection {
    pub ids: Vec<Uuid>,
    pub all: bool,
    pub code: Option<String>,
    pub again: bool,
    pub dry_run: bool,
    pub yes: bool,
}

/// The topic a dead letter goes back to.
fn target(config: &Config, d: &DeadLettered) -> Option<Topic> {
    match Topic::from_name(&config.kafka.topic_prefix, &d.source_topic)? {
        Topic::Retries => Some(Topic::Rendered),
        t => Some(t),
    }
}

pub async fn reprocess(config: &Config, s: Selection) -> anyhow::Result<()> {
    anyhow::ensure!(s.all || !s.ids.is_empty(), "name the dead letters to reprocess, or --all");
    let letters = letters(config).await?;
    let wanted: HashSet<Uuid> = s.ids.iter().copied().collect();
    for id in &wanted {
        anyhow::ensure!(letters.iter().any(|l| l.event.event_id.0 == *id), "no dead letter {id} on the log");
    }
    let chosen: Vec<&Letter> = letters
        .iter()
        .filter(|l| s.all || wanted.contains(&l.event.event_id.0))
        .filter(|l| s.code.as_deref().is_none_or(|c| l.dead.code == c))
        .collect();
    send_back(config, &chosen, s.again, s.dry_run, s.yes).await
}

/// Sends `letters` back (see the module's documentation).
pub async fn send_back(
    config: &Config,
    letters: &[&Letter],
    again: bool,
    dry_run: bool,
    yes: bool,
) -> anyhow::Result<()> {
    let done = reprocessed(config).await?;
    let mut todo = Vec::new();
    for l in letters {
        let id = l.event.event_id.0;
        if done.contains_key(&id) && !again {
            println!("{id}: reprocessed before; skipped (--again sends it once more)");
        } else if l.dead.payload.len() >= CUT_AT {
            println!("{id}: its payload was cut at {CUT_AT} bytes; it cannot be sent back whole");
        } else if let Some(topic) = target(config, &l.dead) {
            todo.push((*l, topic));
        } else {
            println!("{id}: it came from {}, which is not a topic of this ledger", l.dead.source_topic);
        }
    }
    if todo.is_empty() {
        println!("nothing to reprocess");
        return Ok(());
    }
    if dry_run {
        println!("would send {} dead letter(s) back (dry run: nothing sent):", todo.len());
        for (l, topic) in &todo {
            println!("  {} -> {}", l.event.event_id.0, config.topic(*topic));
        }
        return Ok(());
    }
    confirm(config, yes, &format!("send {} dead letter(s) back to be processed again", todo.len()))?;
    let producer = kafka::producer(config)?;
    let ops = ledger_runtime::db::pool(&config.ops_database_url, 1).await?;
    let me = format!("ledger-cli@{}", hostname());
    for (l, topic) in &todo {
        let headers = OwnedHeaders::new().insert(Header {
            key: ledger_schemas::HEADER_CORRELATION_ID,
            value: Some(l.event.correlation_id.as_str()),
        });
        let encoded = kafka::Encoded { payload: l.dead.payload.clone().into_bytes(), headers };
        kafka::send_encoded(&producer, config, *topic, l.dead.key.as_deref().unwrap_or(""), encoded).await?;
        sqlx::query(
            "-- ledger::dlq::send_back
             INSERT INTO dead_letters_reprocessed (event_id, target_topic, reprocessed_by) VALUES ($1, $2, $3)
             ON CONFLICT (event_id) DO UPDATE SET reprocessed_at = now(), target_topic = EXCLUDED.target_topic,
                 reprocessed_by = EXCLUDED.reprocessed_by",
        )
        .bind(l.event.event_id.0)
        .bind(config.topic(*topic))
        .bind(&me)
        .execute(&ops)
        .await?;
        println!("{} -> {}", l.event.event_id.0, config.topic(*topic));
    }
    println!("reprocessed {} dead letter(s)", todo.len());
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}
