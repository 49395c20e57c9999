//! `ledger inspect`: a message's or an intent's full history from the log,
//! next to what the read model has, so that an operator sees where they
//! disagree.

use std::collections::BTreeMap;

use anyhow::Context;
use ledger_projections::fold::{self, StatusTally};
use ledger_projections::Fold;
use ledger_runtime::Config;
use ledger_schemas::{Event, EventBody, IntentId, MessageId, Topic};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use serde_json::Value;
use uuid::Uuid;

use crate::log;

/// An event with where it is on the log.
struct Located {
    event: Event,
    topic: String,
    partition: i32,
    offset: i64,
    /// When it was written, for a retry record (which carries the rendered
    /// event of long before): with the attempt it is for.
    retry: Option<(chrono::DateTime<chrono::Utc>, String)>,
}

fn decode(records: Vec<OwnedMessage>, wanted: impl Fn(&Event) -> bool) -> Vec<Located> {
    records
        .into_iter()
        .filter_map(|m| {
            let event = Event::from_json(m.payload().unwrap_or_default()).ok()?;
            let header = |name: &str| {
                use rdkafka::message::Headers;
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let retry = header(ledger_schemas::HEADER_ATTEMPT).map(|attempt| {
                let written = m
                    .timestamp()
                    .to_millis()
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .unwrap_or(event.occurred_at);
                let due = header(ledger_schemas::HEADER_NOT_BEFORE).unwrap_or_default();
                (written, format!("retry record for attempt {attempt}, due {due}"))
            });
            wanted(&event).then(|| Located {
                event,
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                retry,
            })
        })
        .collect()
}

/// The partitions of `topics` where records keyed `key` are, whole.
fn spans_for_key(config: &Config, topics: &[Topic], key: &str) -> anyhow::Result<Vec<log::Span>> {
    let consumer = log::reader(config)?;
    let mut spans = Vec::new();
    for topic in topics {
        let name = config.topic(*topic);
        let n = log::partitions(&consumer, &name)?;
        let p = ledger_runtime::kafka::partition_for(key.as_bytes(), n);
        spans.push(log::span(&consumer, &name, p, None)?);
    }
    Ok(spans)
}

/// What one event says, on one line.
fn summary(e: &Event) -> String {
    match &e.body {
        EventBody::IntentAccepted(a) => format!(
            "{:?} {} recipient(s) in {} batch(es){}",
            a.kind,
            a.recipient_count,
            a.batch_count,
            a.name.as_deref().map(|n| format!(", name {n:?}")).unwrap_or_default()
        ),
        EventBody::RecipientBatch(b) => {
            format!("batch {}/{} of {} recipient(s)", b.batch_index + 1, b.batch_count, b.recipients.len())
        }
        EventBody::IntentCancelled(c) => format!("reason {:?}", c.reason.as_deref().unwrap_or("")),
        EventBody::MessageRendered(m) => {
            format!("to {} subject {:?}", m.recipient, m.subject.as_deref().unwrap_or(""))
        }
        EventBody::RenderFailed(f) => format!("code {} {}", f.code, f.reason),
        EventBody::DeliveryAttempted(a) => {
            format!("attempt {} via {} identity {}", a.attempt, a.provider, a.identity.as_deref().unwrap_or("-"))
        }
        EventBody::Delivered(d) => {
            format!("attempt {} provider id {}", d.attempt, d.provider_message_id.as_deref().unwrap_or("-"))
        }
        EventBody::DeliveryFailed(f) => format!(
            "attempt {} {} code {} {}{}",
            f.attempt,
            if f.permanent { "permanent" } else { "transient" },
            f.code,
            f.reason,
            f.retry_at.map(|t| format!(", retry at {}", rfc3339(t))).unwrap_or_default()
        ),
        EventBody::DeliveryAmbiguous(a) => format!("attempt {} {}", a.attempt, a.reason),
        EventBody::Suppressed(s) => format!("{:?}", s.reason),
        EventBody::MessageCancelled(_) => "intent cancelled first".to_owned(),
        EventBody::DeadLettered(d) => format!(
            "from {}/{}@{} by {}: {} {}",
            d.source_topic, d.source_partition, d.source_offset, d.consumer, d.code, d.reason
        ),
        EventBody::TemplatePublished(t) => format!("{} version {}", t.name, t.version),
        EventBody::Feedback(f) => format!("{} from {} ({})", f.kind.as_str(), f.source, f.provider_event_id),
    }
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Located {
    fn at(&self) -> chrono::DateTime<chrono::Utc> {
        self.retry.as_ref().map(|(t, _)| *t).unwrap_or(self.event.occurred_at)
    }
}

fn print_history(events: &mut [Located]) {
    events.sort_by(|a, b| (a.at(), &a.topic, a.partition, a.offset).cmp(&(b.at(), &b.topic, b.partition, b.offset)));
    for l in events.iter() {
        let what = match &l.retry {
            Some((_, retry)) => retry.clone(),
            None => summary(&l.event),
        };
        println!(
            "  {}  {:<28} {:<24} {what}",
            rfc3339(l.at()),
            format!("{}/{}@{}", l.topic, l.partition, l.offset),
            l.event.kind().type_name(),
        );
    }
}

pub async fn message(config: &Config, id: Uuid) -> anyhow::Result<()> {
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 1).await?;
    let row: Option<Value> = sqlx::query_scalar(
        "-- ledger::inspect::message (row)
         SELECT to_jsonb(m) FROM messages m WHERE message_id = $1",
    )
    .bind(id)
    .fetch_optional(&reporting)
    .await?;
    let key = id.to_string();
    let spans = spans_for_key(config, &[Topic::Rendered, Topic::Outcomes, Topic::Retries, Topic::DeadLetter], &key)?;
    let message_id = MessageId(id);
    let mut events = decode(log::read_all(config, spans).await?, |e| e.message_id == Some(message_id));
    let intent = row
        .as_ref()
        .and_then(|r| r["intent_id"].as_str())
        .and_then(|s| Uuid::parse_str(s).ok())
        .or_else(|| events.first().map(|l| l.event.intent_id.0));
    if let Some(intent) = intent {
        let spans = spans_for_key(config, &[Topic::Intents], &intent.to_string())?;
        let intent = IntentId(intent);
        events.extend(decode(log::read_all(config, spans).await?, |e| {
            e.intent_id == intent
                && match &e.body {
                    EventBody::RecipientBatch(b) => {
                        b.recipients.iter().any(|r| MessageId::derive(intent, &r.address) == message_id)
                    }
                    EventBody::IntentAccepted(_) | EventBody::IntentCancelled(_) => true,
                    _ => false,
                }
        }));
    }
    println!("message {id}");
    if events.is_empty() && row.is_none() {
        anyhow::bail!("message {id} is neither on the log nor in the read model");
    }
    println!("history on the log ({} events):", events.len());
    print_history(&mut events);
    let mut fold = Fold::default();
    for l in &events {
        fold.add(&l.event);
    }
    let from_log = fold.messages.get(&message_id);
    println!("read model:");
    let Some(row) = row else {
        println!("  no row: the projector has not applied this message (or the read model lost it)");
        if from_log.is_some() {
            println!("disagreement: the log has this message, the read model does not");
        }
        return Ok(());
    };
    let field = |name: &str| match &row[name] {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    for name in [
        "tenant_id",
        "intent_id",
        "channel",
        "recipient",
        "status",
        "attempts",
        "identity",
        "last_error_code",
        "last_error",
        "provider_message_id",
        "accepted_at",
        "rendered_at",
        "first_attempt_at",
        "delivered_at",
        "failed_at",
        "suppressed_at",
        "opened_at",
        "clicked_at",
        "bounced_at",
    ] {
        println!("  {name:<20} {}", field(name));
    }
    let Some(expected) = from_log else {
        println!("disagreement: the read model has a row, the log has no event about this message");
        return Ok(());
    };
    let mut differences = Vec::new();
    let mut compare = |name: &str, log: String| {
        if field(name) != log {
            differences.push(format!("  {name}: log says {log}, read model says {}", field(name)));
        }
    };
    compare("status", expected.status.as_str().to_owned());
    compare("attempts", expected.attempts.to_string());
    compare("last_error_code", expected.last_error_code.clone().unwrap_or_else(|| "-".into()));
    compare("provider_message_id", expected.provider_message_id.clone().unwrap_or_else(|| "-".into()));
    compare("identity", expected.identity.clone().unwrap_or_else(|| "-".into()));
    if differences.is_empty() {
        println!("the log and the read model agree");
    } else {
        println!("disagreement:");
        for d in differences {
            println!("{d}");
        }
    }
    Ok(())
}

pub async fn intent(config: &Config, id: Uuid) -> anyhow::Result<()> {
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 1).await?;
    let row: Option<Value> = sqlx::query_scalar(
        "-- ledger::inspect::intent (row)
         SELECT to_jsonb(i) FROM intents i WHERE intent_id = $1",
    )
    .bind(id)
    .fetch_optional(&reporting)
    .await?;
    let counts: BTreeMap<String, i64> = sqlx::query_as(
        "-- ledger::inspect::intent (counts)
         SELECT status, messages FROM intent_status_counts WHERE intent_id = $1 AND messages <> 0",
    )
    .bind(id)
    .fetch_all(&reporting)
    .await?
    .into_iter()
    .collect();
    let intent = IntentId(id);
    let spans = spans_for_key(config, &[Topic::Intents], &id.to_string())?;
    let mut events = decode(log::read_all(config, spans).await?, |e| e.intent_id == intent);
    // Its messages are spread over every partition of the message topics.
    eprintln!("reading the message topics for the intent's messages ...");
    let spans =
        log::whole(config, &[Topic::Rendered, Topic::Outcomes, Topic::DeadLetter]).context("the message topics")?;
    let messages = decode(log::read_all(config, spans).await?, |e| e.intent_id == intent);
    println!("intent {id}");
    if events.is_empty() && messages.is_empty() && row.is_none() {
        anyhow::bail!("intent {id} is neither on the log nor in the read model");
    }
    println!("history on the log (intents topic, {} events):", events.len());
    print_history(&mut events);
    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    let mut status = StatusTally::default();
    for l in events.iter().chain(messages.iter()) {
        fold::patches(&l.event).iter().for_each(|p| status.add(p));
    }
    for l in &messages {
        *by_type.entry(l.event.kind().type_name()).or_default() += 1;
    }
    println!("events about its messages: {}", messages.len());
    for (t, n) in &by_type {
        println!("  {t:<28} {n}");
    }
    let from_log = status.counts();
    println!("read model:");
    match &row {
        Some(r) => println!("  {r}"),
        None => println!("  no intent row"),
    }
    println!("  {:<16} {:>10} {:>12}", "status", "log", "read model");
    let mut names: Vec<&String> = from_log.keys().chain(counts.keys()).collect();
    names.sort();
    names.dedup();
    let mut agree = true;
    for name in names {
        let (l, r) = (from_log.get(name).copied().unwrap_or(0), counts.get(name).copied().unwrap_or(0));
        agree &= l == r;
        println!("  {name:<16} {l:>10} {r:>12}{}", if l == r { "" } else { "  DIFFERS" });
    }
    if agree {
        println!("the log and the read model agree");
    } else {
        println!("disagreement: see the statuses marked DIFFERS");
    }
    Ok(())
}
