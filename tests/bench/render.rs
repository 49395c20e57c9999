//! `make bench-render`: the renderer alone on a 300,000-recipient campaign
//! (recipient batches already on the intents topic), as a ratio to raw
//! consume + produce of the same records in the same run: the raw side
//! reads the same batches and produces one record per recipient of the
//! rendered size, without rendering.
//!
//! Prints a table and writes bench-out/render.{json,md}.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use ledger_runtime::{kafka, Shutdown};
use ledger_schemas::{
    Channel, Content, Event, EventBody, EventId, IntentId, MessageId, Priority, Recipient, RecipientBatch, TenantId,
    Topic,
};
use ledger_tests::*;
use rdkafka::consumer::StreamConsumer;
use rdkafka::Message;
use serde_json::{json, Value};

/// glibc's allocator spends a quarter of the renderer's time in arena
/// locks and consolidation (perf); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECIPIENTS: usize = 300_000;
const PER_BATCH: usize = 1_000;

fn content() -> Content {
    Content {
        subject: Some("Your November news, {{ name }}".into()),
        text: Some("Hello {{ name }},\nyour order {{ n }} has shipped.\n{% if vip %}Thank you for being a VIP.{% endif %}".into()),
        html: Some("<p>Hello <b>{{ name }}</b>,</p><p>your order {{ n }} has shipped.</p>{% if vip %}<p>Thank you for being a VIP.</p>{% endif %}".into()),
        json: None,
    }
}

fn batches(intent: IntentId) -> Vec<Event> {
    (0..RECIPIENTS / PER_BATCH)
        .map(|b| {
            let recipients = (b * PER_BATCH..(b + 1) * PER_BATCH)
                .map(|i| {
                    let mut variables = std::collections::BTreeMap::new();
                    variables.insert("name".to_owned(), Value::from(format!("Customer {i}")));
                    variables.insert("n".to_owned(), Value::from(i));
                    variables.insert("vip".to_owned(), Value::from(i % 7 == 0));
                    Recipient { address: format!("c{i}@example.com"), variables }
                })
                .collect();
            Event {
                event_id: EventId::derive(intent.0, "batch", b as u32),
                body: EventBody::RecipientBatch(RecipientBatch {
                    batch_index: b as u32,
                    batch_count: (RECIPIENTS / PER_BATCH) as u32,
                    channel: Channel::Email,
                    priority: Priority::Bulk,
                    from: Some("news@example.com".into()),
                    content: content(),
                    template: None,
                    recipients,
                    send_at: None,
                }),
                tenant_id: TenantId("acme".into()),
                intent_id: intent,
                message_id: None,
                occurred_at: chrono::Utc::now(),
                correlation_id: "bench".into(),
            }
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut config = test_config();
    config.telemetry.log_filter = "warn".into();
    ledger_runtime::telemetry::init(&config.telemetry);
    prepare(&config).await.expect("prepare");
    let producer = kafka::producer(&config).expect("producer");

    // The renderer, built as production builds it, started first so that its
    // consumer group has settled (a group join is not rendering).
    let shutdown = Shutdown::new();
    let renderer = ledger_renderer::build(&config).await.expect("renderer");
    let task = tokio::spawn(renderer.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(6)).await;

    // The input: a campaign's batches on the intents topic. The renderer's
    // time runs from here (it includes producing these 300 records).
    let intent = IntentId(uuid::Uuid::new_v4());
    let input = batches(intent);
    let encoded: Vec<kafka::Encoded> = input.iter().map(kafka::Encoded::from).collect();
    let key = intent.to_string();
    let render_started = Instant::now();
    let counted = tokio::spawn({
        let config = config.clone();
        async move { count_until(&config, Topic::Rendered, RECIPIENTS, Duration::from_secs(600)).await }
    });
    futures::stream::iter(encoded)
        .map(|e| kafka::send_encoded(&producer, &config, Topic::Intents, &key, e))
        .buffer_unordered(64)
        .try_for_each(|()| async { Ok(()) })
        .await
        .expect("input");
    let done = counted.await.expect("count");
    let render_secs = (done - render_started).as_secs_f64();
    shutdown.trigger();
    let _ = task.await;

    // Raw: consume those records and produce one record per recipient of the
    // size a rendered message has, to another prefix's rendered topic.
    let sample = ledger_renderer::render_batch(
        &input[0],
        match &input[0].body {
            EventBody::RecipientBatch(b) => b,
            _ => unreachable!(),
        },
        ledger_templating::Templates::compile(&content()).as_ref().map_err(Clone::clone),
    );
    let rendered_size = sample.iter().map(|e| e.to_json().len()).sum::<usize>() / sample.len();
    let mut raw_config = test_config();
    raw_config.kafka.topic_prefix = format!("raw{}", &config.kafka.topic_prefix[1..]);
    prepare(&raw_config).await.expect("raw topics");
    let payload = vec![b'x'; rendered_size];
    let input_reader: StreamConsumer = assigned(&config, Topic::Intents);
    let started = Instant::now();
    // Both sides end when a reader has seen their last output record, so
    // both pay for the same reader.
    let raw_counted = tokio::spawn({
        let raw_config = raw_config.clone();
        async move { count_until(&raw_config, Topic::Rendered, RECIPIENTS, Duration::from_secs(600)).await }
    });
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut consumed = 0;
    while consumed < input.len() {
        let m = input_reader.recv().await.expect("consume");
        consumed += 1;
        let _len = m.payload().map(<[u8]>::len);
        for r in 0..PER_BATCH {
            let k = MessageId::derive(intent, &format!("c{r}@example.com")).to_string();
            let payload = payload.clone();
            let producer = &producer;
            let topic = raw_config.topic(Topic::Rendered);
            in_flight.push(async move {
                let record = rdkafka::producer::FutureRecord::to(&topic).key(&k).payload(&payload);
                producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
            });
        }
        while in_flight.len() > 20_000 {
            in_flight.next().await.expect("some").expect("raw produce");
        }
    }
    while let Some(r) = in_flight.next().await {
        r.expect("raw produce");
    }
    let raw_secs = (raw_counted.await.expect("count") - started).as_secs_f64();
    drop(in_flight);

    let raw_rate = RECIPIENTS as f64 / raw_secs;
    let render_rate = RECIPIENTS as f64 / render_secs;
    let md = format!(
        "| stage | messages | seconds | messages/s | ratio to raw |\n|---|---:|---:|---:|---:|\n\
         | raw consume + produce (same records, {rendered_size} B each) | {RECIPIENTS} | {raw_secs:.2} | {raw_rate:.0} | 1.00 |\n\
         | renderer (from producing its input) | {RECIPIENTS} | {render_secs:.2} | {render_rate:.0} | {:.2} |\n",
        render_rate / raw_rate
    );
    println!("\nrender benchmark (debug = {}):\n\n{md}", cfg!(debug_assertions));
    std::fs::create_dir_all("bench-out").expect("bench-out");
    std::fs::write("bench-out/render.md", &md).expect("write");
    std::fs::write(
        "bench-out/render.json",
        serde_json::to_string_pretty(&json!({ "raw_per_s": raw_rate, "render_per_s": render_rate, "ratio": render_rate / raw_rate,
                                              "messages": RECIPIENTS, "rendered_bytes": rendered_size, "measured_at": chrono::Utc::now() }))
        .expect("json"),
    )
    .expect("write");
    drop_databases(&config).await;
    drop_databases(&raw_config).await;
}
