//! `make bench-deliver`: the dispatcher with the sink provider.
//!
//! 1. Throughput, governor off: rendered messages already on the topic,
//!    delivered by one dispatcher (claims, attempted and outcome events,
//!    durable sink), as a ratio to a raw consume of the same records in the
//!    same run; once at 30,000 messages and once sustained, at 200,000.
//! 2. The governor: a 6,000-a-minute identity served by two dispatcher
//!    instances with more than a minute's worth of messages waiting; the
//!    deliveries in the first 60 s against 6,000.
//! 3. The log floor: each rendered record consumed and two records the size
//!    of its attempted and outcome events produced, nothing else — what
//!    invariant 4 alone costs, as a ratio to raw consume in the same run.
//!
//! Prints a table and writes bench-out/deliver.{json,md}. BENCH_THROUGHPUT_ONLY=1
//! skips the second part, BENCH_GOVERNOR_ONLY=1 runs only the second.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use ledger_runtime::{kafka, Config, IdentityConfig, ProviderKind, Shutdown};
use ledger_schemas::{
    Channel, Event, EventBody, EventId, IntentId, MessageId, MessageRendered, Priority, TenantId, Topic,
};
use ledger_tests::*;
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Messages of the throughput part (`BENCH_DELIVER_MESSAGES`, default 30,000).
fn messages() -> usize {
    std::env::var("BENCH_DELIVER_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(30_000)
}
/// Messages of the sustained run (`BENCH_DELIVER_SUSTAINED`, default
/// 200,000; 0 skips it). At 30,000 both sides are a second or two, of which
/// starting up (joining the group, the first fetch) is a large part; the
/// sustained run shows the rates once both are going.
fn sustained() -> usize {
    std::env::var("BENCH_DELIVER_SUSTAINED").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000)
}
const GOVERNED: usize = 7_000;

fn rendered(intent: IntentId, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let recipient = format!("c{i}@example.com");
            let id = MessageId::derive(intent, &recipient);
            Event {
                event_id: EventId::derive(id.0, "rendered", 0),
                body: EventBody::MessageRendered(MessageRendered {
                    channel: Channel::Email,
                    priority: Priority::Bulk,
                    recipient,
                    from: Some("news@example.com".into()),
                    subject: Some(format!("Your November news, Customer {i}")),
                    text: Some(format!("Hello Customer {i},\nyour order {i} has shipped.")),
                    html: Some(format!("<p>Hello <b>Customer {i}</b>,</p><p>your order {i} has shipped.</p>")),
                    json: None,
                }),
                tenant_id: TenantId("acme".into()),
                intent_id: intent,
                message_id: Some(id),
                occurred_at: chrono::Utc::now(),
                correlation_id: "bench".into(),
            }
        })
        .collect()
}

async fn put(config: &Config, events: &[Event]) {
    let producer = kafka::producer(config).expect("producer");
    futures::stream::iter(events.iter())
        .map(|e| {
            let key = e.message_id.map(|m| m.to_string()).unwrap_or_default();
            let producer = &producer;
            async move { kafka::send_event(producer, config, Topic::Rendered, &key, e).await }
        })
        .buffer_unordered(2_000)
        .try_for_each(|()| async { Ok(()) })
        .await
        .expect("input");
}

/// Sets up `config`'s topics and store, puts `messages` rendered messages
/// on the topic, and times a raw consume of them: (the messages, seconds).
async fn rendered_and_raw_consume(config: &Config, messages: usize) -> (Vec<Event>, f64) {
    prepare(config).await.expect("prepare");
    let input = rendered(IntentId(uuid::Uuid::new_v4()), messages);
    put(config, &input).await;
    let started = Instant::now();
    let raw_done = count_until(config, Topic::Rendered, messages, Duration::from_secs(300)).await;
    (input, (raw_done - started).as_secs_f64())
}

async fn throughput(messages: usize) -> (f64, f64) {
    let mut config = test_config();
    config.telemetry.log_filter = "warn".into();
    // The sink identity's call slots (`BENCH_DELIVER_CONCURRENCY`, default
    // the configuration's own).
    if let Some(n) = std::env::var("BENCH_DELIVER_CONCURRENCY").ok().and_then(|v| v.parse().ok()) {
        for identity in &mut config.identities {
            identity.concurrency = n;
        }
    }
    let (_, raw_secs) = rendered_and_raw_consume(&config, messages).await;

    let shutdown = Shutdown::new();
    let dispatcher = ledger_dispatcher::build(&config).await.expect("dispatcher");
    let started = Instant::now();
    let task = tokio::spawn(dispatcher.run(shutdown.clone()));
    // Attempted and delivered: two outcome records per message.
    let done = count_until(&config, Topic::Outcomes, 2 * messages, Duration::from_secs(900)).await;
    let dispatch_secs = (done - started).as_secs_f64();
    shutdown.trigger();
    let _ = task.await;
    let sunk = ledger_dispatcher::sink::read_deliveries(&config.sink.dir).expect("sink").len();
    assert_eq!(sunk, messages, "every message reached the sink once");
    drop_databases(&config).await;
    (raw_secs, dispatch_secs)
}

/// The floor under any dispatcher that keeps invariant 4: what it must put
/// on the log for each message, and nothing else. Every rendered record is
/// read (the raw consumer's settings) and two records the size of the
/// message's attempted and delivered events go to the outcomes topic under
/// its key, through the dispatcher's own producer settings, without waiting
/// for their acknowledgements: no decoding, no claims, no provider, no
/// database. Ends as the dispatcher's run does, when the 2n records are
/// counted on the outcomes topic. Returns (raw consume s, floor s) of the
/// same records in the same run.
async fn log_floor(messages: usize) -> (f64, f64) {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::FutureRecord;
    use rdkafka::Message;
    let mut config = test_config();
    config.telemetry.log_filter = "warn".into();
    let (input, raw_secs) = rendered_and_raw_consume(&config, messages).await;

    // The two events of the first message, encoded once: their sizes stand
    // for every message's.
    let first = &input[0];
    let id = first.message_id.expect("id");
    let outcome = |what: &str, body: EventBody| Event {
        event_id: EventId::derive(id.0, what, 1),
        body,
        tenant_id: first.tenant_id.clone(),
        intent_id: first.intent_id,
        message_id: Some(id),
        occurred_at: chrono::Utc::now(),
        correlation_id: first.correlation_id.clone(),
    };
    let attempted = kafka::Encoded::from(&outcome(
        "attempted",
        EventBody::DeliveryAttempted(ledger_schemas::DeliveryAttempted {
            attempt: 1,
            channel: Channel::Email,
            recipient: "c0@example.com".into(),
            provider: "sink".into(),
            identity: Some("default".into()),
            rendered_at: Some(first.occurred_at),
        }),
    ));
    let delivered = kafka::Encoded::from(&outcome(
        "delivered",
        EventBody::Delivered(ledger_schemas::Delivered {
            attempt: 1,
            provider: "sink".into(),
            provider_message_id: Some(uuid::Uuid::new_v4().to_string()),
            identity: Some("default".into()),
        }),
    ));
    drop(input);
    let producer = kafka::producer(&config).expect("producer");
    let consumer: BaseConsumer = assigned(&config, Topic::Rendered);
    let outcomes = config.topic(Topic::Outcomes);
    let started = Instant::now();
    let counted = {
        let config = config.clone();
        tokio::spawn(async move { count_until(&config, Topic::Outcomes, 2 * messages, Duration::from_secs(300)).await })
    };
    tokio::task::spawn_blocking(move || {
        let mut seen = 0;
        while seen < messages {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else { continue };
            seen += 1;
            let key = m.key().unwrap_or_default();
            for e in [&attempted, &delivered] {
                loop {
                    let record = FutureRecord::to(&outcomes).key(key).payload(&e.payload).headers(e.headers.clone());
                    match producer.send_result(record) {
                        Ok(_) => break,
                        Err((e, _)) => {
                            assert!(
                                matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)),
                                "produce: {e}"
                            );
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            }
        }
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60)).expect("flush");
    })
    .await
    .expect("floor");
    let floor_secs = (counted.await.expect("count") - started).as_secs_f64();
    drop_databases(&config).await;
    (raw_secs, floor_secs)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut quiet = test_config().telemetry;
    quiet.log_filter = "warn".into();
    ledger_runtime::telemetry::init(&quiet);
    // 1. Throughput (BENCH_GOVERNOR_ONLY=1 skips it).
    let measure = std::env::var_os("BENCH_GOVERNOR_ONLY").is_none();
    let (raw_secs, dispatch_secs) = if measure { throughput(messages()).await } else { (f64::NAN, f64::NAN) };
    let long = sustained();
    let (long_raw_secs, long_dispatch_secs) =
        if measure && long > 0 { throughput(long).await } else { (f64::NAN, f64::NAN) };
    // The floor of the same size as the sustained run.
    let (floor_raw_secs, floor_secs) = if measure && long > 0 { log_floor(long).await } else { (f64::NAN, f64::NAN) };
    if std::env::var_os("BENCH_THROUGHPUT_ONLY").is_some() {
        if long > 0 {
            println!(
                "{long} messages: log floor (consume + 2 produces, nothing else): {:.0}/s, raw consume {:.0}/s, ratio {:.3}",
                long as f64 / floor_secs,
                long as f64 / floor_raw_secs,
                floor_raw_secs / floor_secs
            );
        }
        let runs = [(messages(), raw_secs, dispatch_secs), (long, long_raw_secs, long_dispatch_secs)];
        for (n, raw, dispatch) in runs.into_iter().filter(|(n, _, _)| *n > 0) {
            println!(
                "{n} messages: dispatcher → sink: {:.0}/s, raw consume {:.0}/s, ratio {:.3}",
                n as f64 / dispatch,
                n as f64 / raw,
                raw / dispatch
            );
        }
        return;
    }
    // 2. The governor: 6,000 a minute, two instances.
    let mut gconfig = test_config();
    gconfig.telemetry.log_filter = "warn".into();
    let mut identity = IdentityConfig::new("governed", ProviderKind::Sink);
    identity.per_minute = 6_000;
    gconfig.identities = vec![identity.clone()];
    prepare(&gconfig).await.expect("prepare");
    put(&gconfig, &rendered(IntentId(uuid::Uuid::new_v4()), GOVERNED)).await;
    let shutdown = Shutdown::new();
    let a = ledger_dispatcher::build(&gconfig).await.expect("dispatcher a");
    let b = ledger_dispatcher::build(&gconfig).await.expect("dispatcher b");
    let ta = tokio::spawn(a.run(shutdown.clone()));
    let tb = tokio::spawn(b.run(shutdown.clone()));
    let sink_dir = gconfig.sink.dir.clone();
    let first = eventually("a first governed delivery", Duration::from_secs(60), || {
        let dir = sink_dir.clone();
        async move { ledger_dispatcher::sink::read_deliveries(&dir).ok().and_then(|d| d.first().map(|r| r.received_at)) }
    })
    .await;
    let window_end = first + chrono::Duration::seconds(60);
    while chrono::Utc::now() < window_end + chrono::Duration::seconds(2) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    shutdown.trigger();
    let _ = (ta.await, tb.await);
    let deliveries = ledger_dispatcher::sink::read_deliveries(&gconfig.sink.dir).expect("sink");
    let in_window = deliveries.iter().filter(|r| r.received_at < window_end).count();
    let mut worst_second = 0;
    let times: Vec<_> = deliveries.iter().map(|r| r.received_at).collect();
    for (i, t) in times.iter().enumerate() {
        let n = times[i..].iter().take_while(|u| **u - *t < chrono::Duration::seconds(1)).count();
        worst_second = worst_second.max(n);
    }
    let deviation = (in_window as f64 - 6_000.0) / 6_000.0 * 100.0;
    let per_10s: Vec<usize> = (0..7)
        .map(|k| {
            let from = first + chrono::Duration::seconds(10 * k);
            times.iter().filter(|t| **t >= from && **t < from + chrono::Duration::seconds(10)).count()
        })
        .collect();
    println!("governed deliveries per 10 s from the first: {per_10s:?}");
    if std::env::var_os("BENCH_GOVERNOR_ONLY").is_some() {
        let per_s: Vec<usize> = (0..12)
            .map(|k| {
                let from = first + chrono::Duration::seconds(k);
                times.iter().filter(|t| **t >= from && **t < from + chrono::Duration::seconds(1)).count()
            })
            .collect();
        println!("per second: {per_s:?}");
        let mut by_attempt = std::collections::BTreeMap::new();
        for d in &deliveries {
            *by_attempt.entry(d.attempt).or_insert(0) += 1;
        }
        println!(
            "by attempt: {by_attempt:?}; distinct ids: {}",
            deliveries.iter().map(|d| d.message_id).collect::<std::collections::HashSet<_>>().len()
        );
    }
    drop_databases(&gconfig).await;

    let n = messages();
    let raw_rate = n as f64 / raw_secs;
    let rate = messages() as f64 / dispatch_secs;
    let (long_raw_rate, long_rate) = (long as f64 / long_raw_secs, long as f64 / long_dispatch_secs);
    let (floor_raw_rate, floor_rate) = (long as f64 / floor_raw_secs, long as f64 / floor_secs);
    let sustained_rows = if long > 0 {
        format!(
            "| raw consume, sustained | {long} | {long_raw_secs:.2} | {long_raw_rate:.0} | 1.00 |\n\
             | dispatcher → sink, sustained | {long} | {long_dispatch_secs:.2} | {long_rate:.0} | {:.3} |\n\
             | raw consume, floor run | {long} | {floor_raw_secs:.2} | {floor_raw_rate:.0} | 1.00 |\n\
             | log floor: consume + 2 produces, nothing else | {long} | {floor_secs:.2} | {floor_rate:.0} | {:.3} |\n",
            long_rate / long_raw_rate,
            floor_rate / floor_raw_rate
        )
    } else {
        String::new()
    };
    let md = format!(
        "| measure | messages | seconds | messages/s | ratio |\n|---|---:|---:|---:|---:|\n\
         | raw consume of the rendered records | {n} | {raw_secs:.2} | {raw_rate:.0} | 1.00 |\n\
         | dispatcher → sink, governor off | {n} | {dispatch_secs:.2} | {rate:.0} | {:.3} |\n\
         {sustained_rows}\n\
         | governor: 6,000/min identity, 2 instances | value |\n|---|---:|\n\
         | deliveries in the first 60 s | {in_window} |\n| deviation from 6,000 | {deviation:+.2} % |\n\
         | most in any 1 s | {worst_second} (limit 100, burst {}) |\n",
        rate / raw_rate,
        identity.effective_burst()
    );
    println!("\ndeliver benchmark (debug = {}):\n\n{md}", cfg!(debug_assertions));
    std::fs::create_dir_all("bench-out").expect("bench-out");
    std::fs::write("bench-out/deliver.md", &md).expect("write");
    std::fs::write(
        "bench-out/deliver.json",
        serde_json::to_string_pretty(&json!({
            "messages": messages(), "raw_consume_per_s": raw_rate, "dispatch_per_s": rate, "ratio": rate / raw_rate,
            "sustained": { "messages": long, "raw_consume_per_s": long_raw_rate, "dispatch_per_s": long_rate,
                           "ratio": long_rate / long_raw_rate },
            "log_floor": { "messages": long, "raw_consume_per_s": floor_raw_rate, "floor_per_s": floor_rate,
                           "ratio": floor_rate / floor_raw_rate },
            "governor": { "limit_per_minute": 6000, "instances": 2, "in_first_60s": in_window,
                          "deviation_percent": deviation, "max_in_one_second": worst_second },
            "measured_at": chrono::Utc::now() }))
        .expect("json"),
    )
    .expect("write");
}
