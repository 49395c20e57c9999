//! `make bench-replay`: `ledger replay projections` (the release binary, as
//! an operator runs it) rebuilding the read model from a log of 300,000
//! messages' lifecycles (BENCH_REPLAY_MESSAGES; 900,300 events), as events/s
//! and as a ratio to a raw rdkafka consume of the same partitions in the same
//! run: with the default window, a window of 250,000 messages
//! (BENCH_REPLAY_BIG_WINDOW) and one of 20,000.
//!
//! Prints a table and writes bench-out/replay.{json,md}.

use std::time::{Duration, Instant};

use ledger_schemas::{EventBody, Topic};
use ledger_tests::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    run_with_release_ledger("make bench-replay", run());
}

async fn run() {
    let messages: usize = std::env::var("BENCH_REPLAY_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(300_000);
    let mut config = test_config();
    config.telemetry.log_filter = "warn".into();
    prepare(&config).await.expect("topics and databases");

    // The log: batches on the intents topic, then each message's rendered,
    // attempted and delivered events on their topics, keyed as the roles key them.
    let events = lifecycle_events_of_size(messages);
    let producer = ledger_runtime::kafka::producer(&config).expect("producer");
    let started = Instant::now();
    for chunk in events.chunks(20_000) {
        let sends = chunk.iter().map(|e| {
            let (topic, key) = match (&e.body, e.message_id) {
                (EventBody::RecipientBatch(_), _) => (Topic::Intents, e.intent_id.to_string()),
                (EventBody::MessageRendered(_), Some(m)) => (Topic::Rendered, m.to_string()),
                (_, Some(m)) => (Topic::Outcomes, m.to_string()),
                _ => (Topic::Intents, e.intent_id.to_string()),
            };
            let (producer, config) = (&producer, &config);
            async move { ledger_runtime::kafka::send_event(producer, config, topic, &key, e).await }
        });
        for r in futures::future::join_all(sends).await {
            r.expect("produced");
        }
    }
    let total = events.len();
    println!("produced {total} events in {:.1} s", started.elapsed().as_secs_f64());
    drop(events);

    // Raw: every partition of the projector's topics read to its end.
    let raw_secs = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &config.kafka.brokers)
                .set("group.id", format!("bench-raw-{}", uuid::Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "20")
                .set("queued.max.messages.kbytes", "65536")
                .create()
                .expect("consumer");
            let mut tpl = rdkafka::TopicPartitionList::new();
            for topic in ledger_projector::TOPICS {
                for p in 0..topic.partitions() {
                    tpl.add_partition_offset(&config.topic(topic), p, rdkafka::Offset::Beginning).expect("tpl");
                }
            }
            consumer.assign(&tpl).expect("assign");
            let started = Instant::now();
            let mut seen = 0usize;
            while seen < total {
                assert!(started.elapsed() < Duration::from_secs(300), "raw consume read {seen} of {total}");
                if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                    seen += 1;
                }
            }
            started.elapsed().as_secs_f64()
        }
    })
    .await
    .expect("raw consume");
    let raw_rate = total as f64 / raw_secs;

    // The replay, as a process (the release build, see `main`).
    // The default window, then a small one (each message's row written
    // about once per stage, as the projector's batches write it).
    let mut rows = Vec::new();
    let big = std::env::var("BENCH_REPLAY_BIG_WINDOW").unwrap_or_else(|_| "250000".into());
    for (schema, window) in
        [("bench_replay", None), ("bench_replay_mid", Some(big.as_str())), ("bench_replay_small", Some("20000"))]
    {
        let mut args = vec!["replay", "projections", "--schema", schema];
        if let Some(w) = window {
            args.extend(["--window", w]);
        }
        let started = Instant::now();
        let out = ledger_ok(&config, &args);
        let wall_secs = started.elapsed().as_secs_f64();
        println!("{out}");
        assert!(!out.contains("DIFFERS"), "the rebuild must check out");
        // "replayed N records into schema S in X s (R events/s, …): …"
        let replay_secs: f64 = out
            .split(" in ")
            .nth(1)
            .and_then(|s| s.split(" s (").next())
            .and_then(|s| s.parse().ok())
            .expect("the replay's own timing");
        rows.push((window.unwrap_or("1000000 (default)"), replay_secs, wall_secs));
    }
    let mut md = format!(
        "| path | events | seconds | events/s | ratio to raw consume |\n|---|---:|---:|---:|---:|\n\
         | raw rdkafka consume of the same partitions | {total} | {raw_secs:.2} | {raw_rate:.0} | 1.00 |\n"
    );
    for (window, replay_secs, wall_secs) in &rows {
        let rate = total as f64 / replay_secs;
        md += &format!(
            "| `ledger replay projections`, window {window} messages | {total} | {replay_secs:.2} | {rate:.0} | {:.2} |\n\
             | the same, wall clock of the process (schema, migrations, checks included) | {total} | {wall_secs:.2} | {:.0} | {:.2} |\n",
            rate / raw_rate,
            total as f64 / wall_secs,
            total as f64 / wall_secs / raw_rate,
        );
    }
    let replay_rate = total as f64 / rows[0].1;
    let wall_secs = rows[0].2;
    println!("\nreplay benchmark ({messages} messages; target 100,000 events/s):\n\n{md}");
    std::fs::create_dir_all("bench-out").expect("bench-out");
    std::fs::write("bench-out/replay.md", &md).expect("write");
    std::fs::write(
        "bench-out/replay.json",
        serde_json::to_string_pretty(&json!({ "events": total, "raw_consume_events_per_s": raw_rate,
            "replay_events_per_s": replay_rate, "ratio": replay_rate / raw_rate, "wall_seconds": wall_secs,
            "measured_at": chrono::Utc::now() }))
        .expect("json"),
    )
    .expect("write");
    drop_databases(&config).await;
}
