//! Reading the log directly, as the tooling does: spans of partitions, each
//! from an offset up to the partition's end as it stood when measured.
//! Records produced after that are not read, so a replay is a snapshot and
//! always finishes, however busy the producers are.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use ledger_runtime::Config;
use ledger_schemas::Topic;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

/// Records `from..to` of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

impl Span {
    pub fn len(&self) -> u64 {
        (self.to - self.from).max(0) as u64
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);
/// A reader that gets no record for this long, with records left to read,
/// gives up with the spans it has not finished.
const STALL: Duration = Duration::from_secs(60);

/// A consumer in a group of its own that commits nothing and reads as much
/// as a fetch allows.
pub fn reader(config: &Config) -> anyhow::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("client.id", "delivery-ledger-tooling")
        .set("group.id", format!("ledger-tooling-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "20")
        .set("queued.max.messages.kbytes", "65536")
        .set("log_level", "4")
        .create()
        .context("creating a log reader")
}

/// The number of partitions `topic` has on the broker (which may be more
/// than it was created with).
pub fn partitions(consumer: &BaseConsumer, name: &str) -> anyhow::Result<i32> {
    let metadata = consumer.fetch_metadata(Some(name), TIMEOUT).with_context(|| format!("metadata of {name}"))?;
    let count = metadata.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    anyhow::ensure!(count > 0, "topic {name} does not exist (run `ledger topics create`)");
    Ok(count as i32)
}

/// Every partition of `topics` from its first record to its end now.
pub fn whole(config: &Config, topics: &[Topic]) -> anyhow::Result<Vec<Span>> {
    let consumer = reader(config)?;
    let mut spans = Vec::new();
    for topic in topics {
        let name = config.topic(*topic);
        for partition in 0..partitions(&consumer, &name)? {
            spans.push(span(&consumer, &name, partition, None)?);
        }
    }
    Ok(spans)
}

/// One partition from `from` (its first record when `None`) to its end now.
pub fn span(consumer: &BaseConsumer, name: &str, partition: i32, from: Option<i64>) -> anyhow::Result<Span> {
    let (low, high) = consumer
        .fetch_watermarks(name, partition, TIMEOUT)
        .with_context(|| format!("the watermarks of {name}/{partition}"))?;
    Ok(Span { topic: name.to_owned(), partition, from: from.unwrap_or(low).max(low), to: high })
}

/// Reads the records of `spans` on a thread of its own and hands them over
/// in chunks of at most `chunk`, in offset order per partition. The channel
/// closes after the last one; an `Err` says what could not be read.
pub fn stream(config: &Config, spans: Vec<Span>, chunk: usize) -> mpsc::Receiver<anyhow::Result<Vec<OwnedMessage>>> {
    let (tx, rx) = mpsc::channel(4);
    let config = config.clone();
    std::thread::spawn(move || {
        if let Err(e) = read(&config, spans, chunk, &tx) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

fn read(
    config: &Config,
    spans: Vec<Span>,
    chunk: usize,
    tx: &mpsc::Sender<anyhow::Result<Vec<OwnedMessage>>>,
) -> anyhow::Result<()> {
    let spans: Vec<Span> = spans.into_iter().filter(|s| s.len() > 0).collect();
    if spans.is_empty() {
        return Ok(());
    }
    let consumer = reader(config)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for s in &spans {
        tpl.add_partition_offset(&s.topic, s.partition, Offset::Offset(s.from))?;
        ends.insert((s.topic.clone(), s.partition), s.to);
    }
    consumer.assign(&tpl).context("assigning the partitions to read")?;
    let mut open = ends.len();
    let mut done: HashMap<(String, i32), bool> = HashMap::new();
    let mut batch = Vec::with_capacity(chunk);
    let mut last_record = Instant::now();
    while open > 0 {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_record = Instant::now();
                let key = (m.topic().to_owned(), m.partition());
                let Some(&end) = ends.get(&key) else { continue };
                if m.offset() >= end {
                    continue; // produced after the snapshot
                }
                if m.offset() + 1 >= end && !done.insert(key.clone(), true).unwrap_or(false) {
                    open -= 1;
                    // Nothing more is wanted from it.
                    let mut one = TopicPartitionList::new();
                    one.add_partition(&key.0, key.1);
                    let _ = consumer.pause(&one);
                }
                batch.push(m.detach());
                if batch.len() >= chunk && tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                    return Ok(()); // the reader's user went away
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "reading the log");
                if last_record.elapsed() > STALL {
                    return Err(e).context("reading the log");
                }
            }
            None => {
                if !batch.is_empty() && tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                    return Ok(());
                }
                if last_record.elapsed() > STALL {
                    let left: Vec<String> =
                        ends.keys().filter(|k| !done.contains_key(*k)).map(|(t, p)| format!("{t}/{p}")).collect();
                    anyhow::bail!("the log stopped answering; unfinished partitions: {}", left.join(", "));
                }
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
    Ok(())
}

/// Every record of `spans`, collected.
pub async fn read_all(config: &Config, spans: Vec<Span>) -> anyhow::Result<Vec<OwnedMessage>> {
    let mut rx = stream(config, spans, 10_000);
    let mut out = Vec::new();
    while let Some(chunk) = rx.recv().await {
        out.extend(chunk?);
    }
    Ok(out)
}
