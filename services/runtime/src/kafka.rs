//! Kafka client setup, shared by every role so that every producer is
//! idempotent with `acks=all` and every consumer stores offsets only after
//! its effects are done.

use std::time::Duration;

use ledger_schemas::{
    ConsumerGroup, DeadLettered, Event, EventBody, EventId, IntentId, TenantId, Topic, HEADER_CORRELATION_ID,
    HEADER_EVENT_TYPE,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::Message;
use uuid::Uuid;

use crate::config::Config;
use crate::error::RuntimeError;

fn base(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers)
        .set("client.id", "delivery-ledger")
        // Keep librdkafka's own logging quiet unless asked.
        .set("log_level", "4");
    c
}

/// An idempotent producer with `acks=all`: a send completes only when every
/// in-sync replica has the record, and retries never duplicate or reorder.
pub fn producer(config: &Config) -> Result<FutureProducer, RuntimeError> {
    producer_lingering(config, f64::from(config.kafka.linger_ms))
}

/// As [`producer`], waiting `linger_ms` (librdkafka takes fractions) to
/// fill a batch.
pub fn producer_lingering(config: &Config, linger_ms: f64) -> Result<FutureProducer, RuntimeError> {
    Ok(base(config)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms.to_string())
        .set("compression.type", &config.kafka.compression)
        .set("message.timeout.ms", config.kafka.produce_timeout_ms.to_string())
        .set("queue.buffering.max.messages", "500000")
        // Java's partitioner (murmur2 of the key), named rather than left to
        // librdkafka's default (crc32): other Kafka clients writing the same
        // keys agree, and the tooling finds a key's partition
        // (`partition_for`) without scanning every partition.
        .set("partitioner", "murmur2_random")
        .create()?)
}

/// The partition of `key` among `partitions`, as the producers choose it
/// (Kafka's murmur2 partitioner: the hash's positive 31 bits modulo the
/// count).
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// Reports each assigned partition's lag (librdkafka's own statistics,
/// every 5 s) as `ledger_consumer_lag_records{group,topic,partition}`, and
/// counts rebalances.
pub struct LagContext {
    group: &'static str,
    generation: std::sync::atomic::AtomicU64,
}

impl LagContext {
    /// Goes up with every assignment and revocation. Records read under an
    /// earlier generation may be read again under this one, from the
    /// committed offsets, so offset bookkeeping must not mix the two.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1: not assigned here, or not known yet.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!("ledger_consumer_lag_records", "group" => self.group, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for LagContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        use rdkafka::consumer::Rebalance;
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let list = |tpl: &rdkafka::TopicPartitionList| {
            tpl.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect::<Vec<_>>().join(" ")
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(group = self.group, partitions = %list(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => tracing::info!(group = self.group, partitions = %list(tpl), "partitions revoked"),
            Rebalance::Error(e) => tracing::warn!(group = self.group, error = %e, "rebalance failed"),
        }
    }
}

/// The consumers of the ledger's roles.
pub type LedgerConsumer = StreamConsumer<LagContext>;

/// A consumer in `group`, subscribed to `topics`. Offsets are committed
/// automatically in the background, but only offsets the caller stored with
/// `store_offset` after finishing a record: at-least-once.
pub fn consumer(config: &Config, group: ConsumerGroup, topics: &[Topic]) -> Result<LedgerConsumer, RuntimeError> {
    let consumer: LedgerConsumer = base(config)
        .set("group.id", config.group(group))
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // How long the broker may hold a fetch that finds nothing new. The
        // projector's is short: its lag is the read model's freshness
        // (bench-project on the local broker, six alternate runs each: lag
        // p50 86–155 ms at 10 ms, 152–299 ms at 50 ms).
        .set("fetch.wait.max.ms", if group == ConsumerGroup::Projector { "10" } else { "50" })
        .set("statistics.interval.ms", "5000")
        // The dispatcher reads ahead and stops polling when every record it
        // may hold is waiting (on a governor's day budget, a retry's due
        // time): waiting is its job, not a hang. A dead process is still
        // noticed by the session timeout.
        .set(
            "max.poll.interval.ms",
            match group {
                ConsumerGroup::Dispatcher | ConsumerGroup::DispatcherRetries => "86400000",
                _ => "300000",
            },
        )
        .create_with_context(LagContext { group: group.base_name(), generation: Default::default() })?;
    let names: Vec<String> = topics.iter().map(|t| config.topic(*t)).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    Ok(consumer)
}

/// Stores, for the next commit, the offsets of a set of records whose
/// effects are all durable: the highest of each partition.
pub fn store_done<M: Message>(consumer: &LedgerConsumer, done: &[M]) -> Result<(), KafkaError> {
    let mut last: std::collections::BTreeMap<(&str, i32), i64> = std::collections::BTreeMap::new();
    for m in done {
        let e = last.entry((m.topic(), m.partition())).or_insert(m.offset());
        *e = (*e).max(m.offset());
    }
    for ((topic, partition), offset) in last {
        consumer.store_offset(topic, partition, offset)?;
    }
    Ok(())
}

/// Creates every ledger topic with its partition count. Topics that exist
/// already are left as they are, so this is safe to run on every start.
pub async fn create_topics(config: &Config, replication: i32) -> Result<Vec<(String, &'static str)>, RuntimeError> {
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let names: Vec<(Topic, String)> = Topic::ALL.iter().map(|t| (*t, config.topic(*t))).collect();
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|(t, n)| {
            let topic = NewTopic::new(n, t.partitions(), TopicReplication::Fixed(replication));
            if t.compacted() {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&new, &opts).await?;
    let mut report = Vec::new();
    for r in results {
        match r {
            Ok(name) => report.push((name, "created")),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => report.push((name, "exists")),
            Err((name, code)) => {
                return Err(RuntimeError::Kafka(KafkaError::AdminOp(code))).inspect_err(|_| {
                    tracing::error!(topic = %name, error = %code, "topic creation failed");
                })
            }
        }
    }
    Ok(report)
}

/// Waits until the broker answers a metadata request, or `timeout` passes.
pub async fn wait_for_broker(config: &Config, timeout: Duration) -> Result<(), RuntimeError> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let admin: AdminClient<DefaultClientContext> = base(&config).create()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match admin.inner().fetch_metadata(None, Duration::from_secs(2)) {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() >= deadline => return Err(RuntimeError::Kafka(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    })
    .await
    .map_err(|e| RuntimeError::Config(e.to_string()))?
}

/// Whether the broker answers a metadata request within a second (the
/// readiness probes).
pub async fn broker_answers(producer: &FutureProducer) -> bool {
    use rdkafka::producer::Producer;
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, Duration::from_secs(1)).is_ok())
        .await
        .unwrap_or(false)
}

/// Builds the record of an event: JSON value, type and correlation headers.
pub fn headers_for(event: &Event) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header { key: HEADER_EVENT_TYPE, value: Some(event.kind().type_name()) })
        .insert(Header { key: HEADER_CORRELATION_ID, value: Some(event.correlation_id.as_str()) })
}

/// Produces `event` to `topic` under `key` and waits for the broker's
/// acknowledgement.
pub async fn send_event(
    producer: &FutureProducer,
    config: &Config,
    topic: Topic,
    key: &str,
    event: &Event,
) -> Result<(), KafkaError> {
    send_encoded(producer, config, topic, key, Encoded::from(event)).await
}

/// An event already serialised, so that large events need not be kept as
/// structures while their records wait for acknowledgement.
pub struct Encoded {
    pub payload: Vec<u8>,
    pub headers: OwnedHeaders,
}

impl From<&Event> for Encoded {
    fn from(event: &Event) -> Self {
        Encoded { payload: event.to_json(), headers: headers_for(event) }
    }
}

pub async fn send_encoded(
    producer: &FutureProducer,
    config: &Config,
    topic: Topic,
    key: &str,
    encoded: Encoded,
) -> Result<(), KafkaError> {
    let name = config.topic(topic);
    let Encoded { payload, headers } = encoded;
    let record = FutureRecord::to(&name).key(key).payload(&payload).headers(headers);
    // No latency histogram per record: two clock reads and a histogram
    // update per message showed in the renderer's profile; the roles time
    // their requests and batches instead.
    let result = producer
        .send(record, Duration::from_millis(config.kafka.produce_timeout_ms))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e);
    produced(topic, result.is_ok()).increment(1);
    result
}

/// Records produced to one topic with at most `in_flight` of them waiting
/// for their acknowledgement, which are taken in the order the records were
/// sent: [`send_encoded`] for many records, without a future polled per
/// record. A request of 1,000 messages is 2,000 records; polling each one's
/// future in a `buffered` stream took about a tenth of ingest's time in a
/// profile of `bench-ingest`'s batches.
pub struct ProduceWindow<'a> {
    producer: &'a FutureProducer,
    config: &'a Config,
    topic: Topic,
    name: String,
    in_flight: usize,
    waiting: std::collections::VecDeque<rdkafka::producer::DeliveryFuture>,
    acknowledged: u64,
    /// Where [`send_event`](Self::send_event) encodes: the producer copies
    /// each record's bytes, so one buffer serves every record.
    scratch: Vec<u8>,
}

impl<'a> ProduceWindow<'a> {
    pub fn new(producer: &'a FutureProducer, config: &'a Config, topic: Topic, in_flight: usize) -> Self {
        ProduceWindow {
            producer,
            config,
            topic,
            name: config.topic(topic),
            in_flight: in_flight.max(1),
            waiting: std::collections::VecDeque::new(),
            acknowledged: 0,
            scratch: Vec::new(),
        }
    }

    /// [`send`](Self::send) for `event`, encoded into the window's buffer
    /// rather than a fresh one each (allocated, grown past its first 512
    /// bytes and freed for every record). Encoding a batch's 634-byte
    /// events took 465–495 ns each this way against 533–639 ns.
    pub async fn send_event(&mut self, key: &str, event: &Event) -> Result<(), KafkaError> {
        let mut payload = std::mem::take(&mut self.scratch);
        event.write_json(&mut payload);
        let sent = self.send_bytes(key, &payload, headers_for(event)).await;
        self.scratch = payload;
        sent
    }

    /// [`send_event`](Self::send_event) for each of `events` in order, under
    /// the key `key` gives it (a uuid, written as text on the stack; none:
    /// an empty key). Stops at the first record the producer refuses.
    pub async fn send_events(
        &mut self,
        events: &[Event],
        key: impl Fn(&Event) -> Option<Uuid>,
    ) -> Result<(), KafkaError> {
        let mut buffer = Uuid::encode_buffer();
        for event in events {
            let key = match key(event) {
                Some(id) => &*id.hyphenated().encode_lower(&mut buffer),
                None => "",
            };
            self.send_event(key, event).await?;
        }
        Ok(())
    }

    /// Hands the record to the producer, first waiting for the oldest
    /// acknowledgement when `in_flight` wait already. A full local queue
    /// is waited out as [`FutureProducer::send`] does, for at most
    /// `kafka.produce_timeout_ms`.
    pub async fn send(&mut self, key: &str, encoded: Encoded) -> Result<(), KafkaError> {
        let Encoded { payload, headers } = encoded;
        self.send_bytes(key, &payload, headers).await
    }

    async fn send_bytes(&mut self, key: &str, payload: &[u8], headers: OwnedHeaders) -> Result<(), KafkaError> {
        if self.waiting.len() >= self.in_flight {
            take_oldest(&mut self.waiting, self.topic, &mut self.acknowledged).await?;
        }
        let mut record = FutureRecord::to(&self.name).key(key).payload(payload).headers(headers);
        let started = std::time::Instant::now();
        let timeout = Duration::from_millis(self.config.kafka.produce_timeout_ms);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.waiting.push_back(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < timeout =>
                {
                    record = back;
                    if self.waiting.is_empty() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    } else {
                        take_oldest(&mut self.waiting, self.topic, &mut self.acknowledged).await?;
                    }
                }
                Err((e, _)) => {
                    produced(self.topic, false).increment(1);
                    return Err(e);
                }
            }
        }
    }

    /// Waits for every acknowledgement; returns how many records were
    /// acknowledged in all.
    pub async fn finish(mut self) -> Result<u64, KafkaError> {
        while !self.waiting.is_empty() {
            self.take_oldest().await?;
        }
        Ok(self.acknowledged)
    }

    async fn take_oldest(&mut self) -> Result<(), KafkaError> {
        take_oldest(&mut self.waiting, self.topic, &mut self.acknowledged).await
    }
}

/// The oldest acknowledgement of a [`ProduceWindow`] (its fields apart, so
/// that a record borrowing the topic's name can wait for one).
async fn take_oldest(
    waiting: &mut std::collections::VecDeque<rdkafka::producer::DeliveryFuture>,
    topic: Topic,
    acknowledged: &mut u64,
) -> Result<(), KafkaError> {
    let Some(delivery) = waiting.pop_front() else { return Ok(()) };
    let result = match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    };
    produced(topic, result.is_ok()).increment(1);
    result?;
    *acknowledged += 1;
    Ok(())
}

/// `ledger_kafka_produced_total` of `topic` and outcome. The handles are
/// looked up once per process (at its first produce, after its telemetry
/// is installed), not for every record: the dispatcher produces two
/// records a message.
fn produced(topic: Topic, ok: bool) -> &'static metrics::Counter {
    static COUNTERS: std::sync::OnceLock<Vec<[metrics::Counter; 2]>> = std::sync::OnceLock::new();
    let all = COUNTERS.get_or_init(|| {
        Topic::ALL
            .iter()
            .map(|t| {
                let of = |outcome: &'static str| {
                    metrics::counter!("ledger_kafka_produced_total", "topic" => t.base_name(), "outcome" => outcome)
                };
                [of("ok"), of("error")]
            })
            .collect()
    });
    let i = Topic::ALL.iter().position(|t| *t == topic).unwrap_or_default();
    &all[i][usize::from(!ok)]
}

/// The correlation id header of a record, if any.
pub fn correlation_id<M: Message>(message: &M) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == HEADER_CORRELATION_ID)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

const MAX_DEAD_LETTER_PAYLOAD: usize = 64 * 1024;

/// Sends a record that `group` cannot process to the dead letter topic with
/// the reason, and waits for the acknowledgement: only then may the caller
/// move past it.
pub async fn dead_letter<M: Message>(
    producer: &FutureProducer,
    config: &Config,
    group: ConsumerGroup,
    message: &M,
    decoded: Option<&Event>,
    code: &str,
    reason: &str,
) -> Result<(), KafkaError> {
    let payload = message.payload().unwrap_or_default();
    let cut = &payload[..payload.len().min(MAX_DEAD_LETTER_PAYLOAD)];
    let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned());
    // The id derives from the record's position, so dead-lettering the same
    // record twice (after a crash) is recognisably one dead letter.
    let position = format!("{}/{}/{}/{}", group.base_name(), message.topic(), message.partition(), message.offset());
    let subject = Uuid::new_v5(&Uuid::NAMESPACE_OID, position.as_bytes());
    let event = Event {
        event_id: EventId::derive(subject, "dead_lettered", 0),
        body: EventBody::DeadLettered(DeadLettered {
            source_topic: message.topic().to_owned(),
            source_partition: message.partition(),
            source_offset: message.offset(),
            consumer: config.group(group),
            code: code.to_owned(),
            reason: reason.to_owned(),
            key: key.clone(),
            payload: String::from_utf8_lossy(cut).into_owned(),
        }),
        tenant_id: decoded.map(|e| e.tenant_id.clone()).unwrap_or_else(|| TenantId("unknown".into())),
        intent_id: decoded.map(|e| e.intent_id).unwrap_or(IntentId(Uuid::nil())),
        message_id: decoded.and_then(|e| e.message_id),
        occurred_at: chrono::Utc::now(),
        correlation_id: decoded
            .map(|e| e.correlation_id.clone())
            .or_else(|| correlation_id(message))
            .unwrap_or_default(),
    };
    tracing::warn!(
        topic = message.topic(),
        partition = message.partition(),
        offset = message.offset(),
        code,
        reason,
        "record dead-lettered"
    );
    metrics::counter!("ledger_dead_letters_total", "consumer" => group.base_name(), "code" => code.to_owned())
        .increment(1);
    send_event(producer, config, Topic::DeadLetter, key.as_deref().unwrap_or(""), &event).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_own_test_vectors() {
        // org.apache.kafka.common.utils.UtilsTest#testMurmur2
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()) as i32, expected, "murmur2({key:?})");
        }
    }

    #[test]
    fn a_key_always_maps_to_one_partition_within_range() {
        for n in [1, 2, 4, 8] {
            let p = partition_for(b"5f0c6f5e-4b1e-4f5e-9a3e-2f7a1b7c9d10", n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for(b"5f0c6f5e-4b1e-4f5e-9a3e-2f7a1b7c9d10", n));
        }
    }
}
