//! `ledger lag`: how far behind the log each role is — consumer lag by
//! partition from the groups' committed offsets, and the projection's lag
//! in events and seconds from the read model's own offsets (which are the
//! truth for it: they commit with its rows).

use std::time::Duration;

use anyhow::Context;
use ledger_runtime::Config;
use ledger_schemas::{ConsumerGroup, Event, Topic};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::log;

const TIMEOUT: Duration = Duration::from_secs(10);

fn roles() -> [(ConsumerGroup, &'static str, Vec<Topic>); 4] {
    [
        (ConsumerGroup::Renderer, "render", vec![Topic::Intents]),
        (ConsumerGroup::Dispatcher, "dispatch", vec![Topic::Rendered]),
        (ConsumerGroup::DispatcherRetries, "dispatch", vec![Topic::Retries]),
        (ConsumerGroup::Projector, "project", ledger_projector::TOPICS.to_vec()),
    ]
}

pub async fn lag(config: &Config) -> anyhow::Result<()> {
    let reader = log::reader(config)?;
    println!("{:<9} {:<34} {:>9} {:>10} {:>10} {:>8}", "role", "group / topic", "partition", "committed", "end", "lag");
    for (group, role, topics) in roles() {
        let group_name = config.group(group);
        let member: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka.brokers)
            .set("group.id", &group_name)
            .set("enable.auto.commit", "false")
            .set("log_level", "4")
            .create()
            .context("a consumer to read committed offsets")?;
        let mut total = 0i64;
        for topic in topics {
            let name = config.topic(topic);
            let n = log::partitions(&reader, &name)?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..n {
                tpl.add_partition(&name, p);
            }
            let committed =
                member.committed_offsets(tpl, TIMEOUT).with_context(|| format!("{group_name} on {name}"))?;
            for p in 0..n {
                let (low, high) = reader.fetch_watermarks(&name, p, TIMEOUT)?;
                let at = match committed.find_partition(&name, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                };
                let lag = high - at.unwrap_or(low);
                total += lag;
                println!(
                    "{role:<9} {:<34} {p:>9} {:>10} {high:>10} {lag:>8}",
                    format!("{group_name} / {name}"),
                    at.map(|o| o.to_string()).unwrap_or_else(|| "-".into()),
                );
            }
        }
        println!("{role:<9} {:<34} {:>9} {:>10} {:>10} {total:>8}", format!("{group_name} in all"), "", "", "");
    }
    projection_lag(config, &reader).await
}

async fn projection_lag(config: &Config, reader: &BaseConsumer) -> anyhow::Result<()> {
    let pool = ledger_runtime::db::pool(&config.reporting_database_url, 1).await?;
    let consumer = config.group(ConsumerGroup::Projector);
    let applied: std::collections::HashMap<(String, i32), i64> = sqlx::query_as::<_, (String, i32, i64)>(
        "-- ledger::lag::projection
         SELECT topic, partition, next_offset FROM projector_offsets WHERE consumer = $1",
    )
    .bind(&consumer)
    .fetch_all(&pool)
    .await?
    .into_iter()
    .map(|(t, p, o)| ((t, p), o))
    .collect();
    let mut events = 0i64;
    let mut oldest: Option<chrono::DateTime<chrono::Utc>> = None;
    for topic in ledger_projector::TOPICS {
        let name = config.topic(topic);
        for p in 0..log::partitions(reader, &name)? {
            let (low, high) = reader.fetch_watermarks(&name, p, TIMEOUT)?;
            let next = applied.get(&(name.clone(), p)).copied().unwrap_or(low).max(low);
            if high > next {
                events += high - next;
                if let Some(t) = event_time_at(config, &name, p, next)? {
                    oldest = oldest.min(Some(t)).or(Some(t));
                }
            }
        }
    }
    let seconds = oldest.map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);
    println!(
        "projection lag: {events} event(s) not yet in the read model; {seconds:.1} s behind{}",
        oldest
            .map(|t| format!(" (the oldest is from {})", t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .unwrap_or_default()
    );
    Ok(())
}

/// The time of the event at `offset`, read from the log.
fn event_time_at(
    config: &Config,
    topic: &str,
    partition: i32,
    offset: i64,
) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    let consumer = log::reader(config)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            if m.offset() >= offset {
                return Ok(Event::from_json(m.payload().unwrap_or_default()).ok().map(|e| e.occurred_at));
            }
        }
    }
    Ok(None)
}
