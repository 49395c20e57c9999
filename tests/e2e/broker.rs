//! What the ledger's consumers assume of any Kafka-API broker, checked
//! against the one the tests run on (see infra/tansu/README.md).

use std::time::{Duration, Instant};

use ledger_runtime::kafka;
use ledger_schemas::Topic;
use ledger_tests::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

async fn produce_batch(config: &ledger_runtime::Config, topic: &str, range: std::ops::Range<usize>) {
    let producer = kafka::producer(config).expect("producer");
    let sends = range.map(|i| {
        let (producer, payload) = (producer.clone(), format!("r{i}"));
        async move {
            producer
                .send(FutureRecord::to(topic).partition(0).key("k").payload(&payload), Duration::from_secs(10))
                .await
                .map(|d| d.offset)
                .map_err(|(e, _)| e)
        }
    });
    for r in futures::future::join_all(sends).await {
        r.expect("acknowledged");
    }
}

fn read_from(config: &ledger_runtime::Config, topic: &str, start: i64, want: usize) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", format!("{topic}-probe-{start}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(start)).expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            got.push(m.offset());
        }
    }
    got
}

/// A topic of its own whose partition 0 holds offsets 0-5 in one record
/// batch and 6-8 in another.
async fn two_batches() -> (ledger_runtime::Config, String) {
    let mut config = test_config();
    // Long enough for each group of sends to go as one batch.
    config.kafka.linger_ms = 50;
    prepare(&config).await.expect("prepare");
    let topic = config.topic(Topic::Rendered);
    produce_batch(&config, &topic, 0..6).await;
    produce_batch(&config, &topic, 6..9).await;
    (config, topic)
}

#[tokio::test]
async fn a_fetch_from_the_middle_of_a_record_batch_gets_every_record_from_there() {
    let (config, topic) = two_batches().await;
    assert_eq!(read_from(&config, &topic, 0, 9), (0..9).collect::<Vec<_>>());
    // What a consumer does after every restart and rebalance: resume from a
    // committed offset, which may fall inside a batch.
    assert_eq!(read_from(&config, &topic, 2, 7), (2..9).collect::<Vec<_>>(), "inside the first batch");
    assert_eq!(read_from(&config, &topic, 7, 2), vec![7, 8], "inside the last batch");
    drop_databases(&config).await;
}

#[tokio::test]
async fn the_end_of_a_partition_is_its_high_watermark_after_a_batch_of_several_records() {
    let (config, topic) = two_batches().await;
    // What a reader that stops at the end asks for (the replay tooling).
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &config.kafka.brokers).create().expect("consumer");
    let (low, high) = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10)).expect("watermarks");
    assert_eq!((low, high), (0, 9));
    drop_databases(&config).await;
}

#[tokio::test]
async fn the_producers_put_a_key_on_the_partition_the_tooling_computes_for_it() {
    let config = test_config();
    prepare(&config).await.expect("prepare");
    let producer = kafka::producer(&config).expect("producer");
    let topic = config.topic(Topic::Rendered);
    for i in 0..64 {
        let key = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("k{i}").as_bytes()).to_string();
        let (partition, _) = producer
            .send(FutureRecord::to(&topic).key(&key).payload("x"), Duration::from_secs(10))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e)
            .expect("acknowledged");
        assert_eq!(partition, kafka::partition_for(key.as_bytes(), Topic::Rendered.partitions()), "key {key}");
    }
    drop_databases(&config).await;
}

/// Kafka offsets of a plain topic have no gaps: a reader following the end
/// of a partition that several producers (connections) write at once must
/// see every offset once, in order. tansu 0.6.0 let such a reader step over
/// a batch that was still being stored while a later one was already
/// readable (a consumer group then commits past records it never saw), and
/// repeated a batch within one fetch response (infra/tansu/README.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_following_concurrent_producers_sees_every_offset() {
    const PRODUCERS: usize = 4;
    const WAVES: usize = 40;
    const PER_WAVE: usize = 50;
    let total = (PRODUCERS * WAVES * PER_WAVE) as i64;
    let config = test_config();
    prepare(&config).await.expect("prepare");
    let topic = config.topic(Topic::Rendered);
    let reader = {
        let (brokers, topic) = (config.kafka.brokers.clone(), topic.clone());
        std::thread::spawn(move || -> Result<i64, String> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("{topic}-follower"))
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "5")
                .create()
                .expect("consumer");
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Offset(0)).expect("tpl");
            consumer.assign(&tpl).expect("assign");
            let mut next = 0;
            let deadline = Instant::now() + Duration::from_secs(90);
            while next < total {
                if Instant::now() > deadline {
                    return Err(format!("read {next} of {total} offsets in 90 s"));
                }
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                    if m.offset() != next {
                        return Err(format!("offset {} came after {} (expected {next})", m.offset(), next - 1));
                    }
                    next += 1;
                }
            }
            Ok(next)
        })
    };
    let producers: Vec<_> = (0..PRODUCERS).map(|_| kafka::producer(&config).expect("producer")).collect();
    let acked = futures::future::join_all(producers.iter().enumerate().map(|(p, producer)| {
        let topic = topic.clone();
        async move {
            let mut acked = Vec::new();
            for wave in 0..WAVES {
                let sends = (0..PER_WAVE).map(|i| {
                    let payload = format!("p{p} w{wave} r{i}");
                    let topic = topic.clone();
                    async move {
                        producer
                            .send(
                                FutureRecord::to(&topic).partition(0).key("k").payload(&payload),
                                Duration::from_secs(10),
                            )
                            .await
                            .map(|d| d.offset)
                            .map_err(|(e, _)| e)
                            .expect("acknowledged")
                    }
                });
                acked.extend(futures::future::join_all(sends).await);
            }
            acked
        }
    }))
    .await;
    // Every acknowledged record got an offset of its own.
    let mut acked: Vec<i64> = acked.into_iter().flatten().collect();
    acked.sort_unstable();
    acked.dedup();
    assert_eq!(
        (acked.len(), acked.last().copied()),
        (total as usize, Some(total - 1)),
        "distinct acknowledged offsets"
    );
    let read = tokio::task::spawn_blocking(move || reader.join().expect("reader")).await.expect("join");
    assert_eq!(read, Ok(total));
    drop_databases(&config).await;
}
