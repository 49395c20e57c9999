//! `make bench-ingest`: submission throughput and latency of the ingest API
//! against the real broker and PostgreSQL, each form as a ratio to raw
//! rdkafka produce of the same records (same sizes, same producer settings,
//! same bounded number in flight) measured in the same run.
//!
//! Prints a table and writes bench-out/ingest.{json,md}.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use ledger_runtime::kafka;
use ledger_schemas::{
    Channel, Content, Event, EventBody, EventId, IntentAccepted, IntentId, IntentKind, Priority, Recipient,
    RecipientBatch, TenantId, Topic,
};
use ledger_tests::*;
use serde_json::{json, Value};

fn content() -> Content {
    Content {
        subject: Some("Your order, {{ name }}".into()),
        text: Some("Hello {{ name }}, your order {{ n }} has shipped.".into()),
        html: Some("<p>Hello <b>{{ name }}</b>, your order {{ n }} has shipped.</p>".into()),
        json: None,
    }
}

fn recipient(i: usize) -> Recipient {
    let mut variables = std::collections::BTreeMap::new();
    variables.insert("name".to_owned(), Value::from(format!("Customer {i}")));
    variables.insert("n".to_owned(), Value::from(i));
    Recipient { address: format!("c{i}@example.com"), variables }
}

fn event(intent: IntentId, body: EventBody) -> Event {
    Event {
        event_id: EventId::derive(intent.0, "bench", 0),
        body,
        tenant_id: TenantId("acme".into()),
        intent_id: intent,
        message_id: None,
        occurred_at: chrono::Utc::now(),
        correlation_id: uuid::Uuid::new_v4().to_string(),
    }
}

fn header(intent: IntentId, recipients: u32, batches: u32) -> Event {
    event(
        intent,
        EventBody::IntentAccepted(IntentAccepted {
            template: None,
            kind: IntentKind::Single,
            name: None,
            channel: Channel::Email,
            priority: Priority::Transactional,
            from: Some("shop@example.com".into()),
            recipient_count: recipients,
            batch_count: batches,
            send_at: None,
            request_hash: "0".repeat(64),
        }),
    )
}

fn batch(intent: IntentId, index: u32, recipients: Vec<Recipient>) -> Event {
    event(
        intent,
        EventBody::RecipientBatch(RecipientBatch {
            template: None,
            batch_index: index,
            batch_count: 1,
            channel: Channel::Email,
            priority: Priority::Transactional,
            from: Some("shop@example.com".into()),
            content: content(),
            recipients,
            send_at: None,
        }),
    )
}

/// The baseline: raw produce of `events` (already encoded, same producer
/// settings, warmed up) as fast as the client allows: records/s.
async fn raw_produce(app: &TestApp, producer: &rdkafka::producer::FutureProducer, events: Vec<Event>) -> f64 {
    let n = events.len();
    let encoded: Vec<(String, kafka::Encoded)> =
        events.iter().map(|e| (e.intent_id.to_string(), kafka::Encoded::from(e))).collect();
    drop(events);
    let started = Instant::now();
    futures::stream::iter(encoded)
        .map(|(key, encoded)| {
            let config = &app.config;
            async move { kafka::send_encoded(producer, config, Topic::Intents, &key, encoded).await }
        })
        .buffer_unordered(RAW_IN_FLIGHT)
        .try_for_each(|()| async { Ok(()) })
        .await
        .expect("raw produce");
    n as f64 / started.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn post(app: &TestApp, path: &str, key: String, body: Value) -> Duration {
    post_bytes(app, path, key, serde_json::to_vec(&body).expect("json")).await
}

/// Posts a JSON body already serialised; the time until its 202.
async fn post_bytes(app: &TestApp, path: &str, key: String, body: Vec<u8>) -> Duration {
    let started = Instant::now();
    let r = app
        .http()
        .post(app.url(path))
        .bearer_auth(&app.api_key)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    started.elapsed()
}

/// Ingest's own time per step (`ledger_ingest_stage_seconds`): sum, count
/// and the 10 ms bucket per stage, from its /metrics.
async fn stage_totals(app: &TestApp) -> std::collections::BTreeMap<String, StageTotals> {
    let text = app.http().get(app.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    let mut totals: std::collections::BTreeMap<String, StageTotals> = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("ledger_ingest_stage_seconds") else { continue };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        let Some((kind, labels)) = labels.split_once("{stage=\"") else { continue };
        let (stage, le) = match labels.split_once("\",le=\"") {
            Some((stage, le)) => (stage, Some(le.trim_end_matches('"'))),
            None => (labels.trim_end_matches('"'), None),
        };
        let entry = totals.entry(stage.to_owned()).or_default();
        match (kind, le) {
            ("_sum", None) => entry.sum = value,
            ("_count", None) => entry.count = value,
            ("_bucket", Some("0.01")) => entry.within_10ms = Some(value),
            _ => {}
        }
    }
    totals
}

/// A stage's histogram (`ledger_ingest_stage_seconds`) as scraped.
#[derive(Clone, Copy, Default)]
struct StageTotals {
    sum: f64,
    count: f64,
    /// Requests whose stage took at most 10 ms (the p99 target); `None`
    /// if the histogram has no bucket at 10 ms.
    within_10ms: Option<f64>,
}

/// Per stage between two scrapes, as JSON: the mean milliseconds, and the
/// share of requests whose stage alone took more than 10 ms.
fn stage_means(
    before: &std::collections::BTreeMap<String, StageTotals>,
    after: &std::collections::BTreeMap<String, StageTotals>,
) -> Value {
    let mut means = serde_json::Map::new();
    for (stage, a) in after {
        let b = before.get(stage).copied().unwrap_or_default();
        let count = a.count - b.count;
        if count > 0.0 {
            means.insert(format!("{stage}_ms"), json!((a.sum - b.sum) / count * 1000.0));
            if let Some(within) = a.within_10ms {
                let over = count - (within - b.within_10ms.unwrap_or(0.0));
                means.insert(format!("{stage}_over_10ms"), json!(over / count * 100.0));
            }
        }
    }
    Value::Object(means)
}

/// 100000 → "100,000".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn single_body(i: usize) -> Value {
    let r = recipient(i);
    json!({ "to": r.address, "from": "shop@example.com", "variables": r.variables, "content": content() })
}

/// glibc's allocator spends a quarter of the renderer's time in arena
/// locks and consolidation (perf); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Records the raw baseline keeps outstanding: enough to saturate.
const RAW_IN_FLIGHT: usize = 20_000;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut config = test_config();
    config.telemetry.log_filter = "warn".into();
    if let Ok(linger) = std::env::var("BENCH_LINGER_MS") {
        config.kafka.ingest_linger_ms = linger.parse().expect("BENCH_LINGER_MS");
    }
    let app = spawn_roles(config, false).await;
    let producer = kafka::producer(&app.config).expect("producer");
    // Warm up: connection, metadata and producer id before any timing.
    raw_produce(&app, &producer, vec![header(IntentId(uuid::Uuid::new_v4()), 1, 1)]).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut rows: Vec<Value> = Vec::new();

    // Single messages, closed loop with 32 clients: the maximum rate
    // (`BENCH_SINGLES` requests, default 4,000).
    let singles = env_usize("BENCH_SINGLES", 4_000);
    const CLIENTS: usize = 32;
    let stages_before = stage_totals(&app).await;
    let started = Instant::now();
    let mut lat: Vec<Duration> = futures::stream::iter(0..singles)
        .map(|i| post(&app, "/v1/messages", format!("{run}-s{i}"), single_body(i)))
        .buffer_unordered(CLIENTS)
        .collect()
        .await;
    let single_rate = singles as f64 / started.elapsed().as_secs_f64();
    let stages_max = stage_totals(&app).await;
    lat.sort();
    let raw_single = raw_produce(
        &app,
        &producer,
        (0..singles)
            .flat_map(|i| {
                let id = IntentId(uuid::Uuid::new_v4());
                [header(id, 1, 1), batch(id, 0, vec![recipient(i)])]
            })
            .collect(),
    )
    .await
        / 2.0;
    rows.push(json!({ "form": "single (32 clients)", "intents_per_s": single_rate, "recipients_per_s": single_rate,
                      "raw_per_s": raw_single, "ratio": single_rate / raw_single,
                      "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
                      "stages": stage_means(&stages_before, &stages_max) }));

    // Single messages paced at 70 % of that maximum: latency under load.
    // (`BENCH_PACED_RATE`: at that many a second instead, to compare two
    // builds at the same rate.)
    let paced_rate = std::env::var("BENCH_PACED_RATE")
        .map(|r| r.parse::<f64>().expect("BENCH_PACED_RATE"))
        .unwrap_or(single_rate * 0.7);
    // For `BENCH_PACED_SECS` seconds (default 5).
    let paced_n = (paced_rate * env_usize("BENCH_PACED_SECS", 5) as f64) as usize;
    let interval = Duration::from_secs_f64(1.0 / paced_rate);
    let started = Instant::now();
    let mut handles = Vec::with_capacity(paced_n);
    let app_ref = std::sync::Arc::new(app);
    for i in 0..paced_n {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let app = app_ref.clone();
        let key = format!("{run}-p{i}");
        handles.push(tokio::spawn(async move { post(&app, "/v1/messages", key, single_body(i)).await }));
    }
    let mut paced: Vec<Duration> = Vec::with_capacity(paced_n);
    for h in handles {
        paced.push(h.await.expect("join"));
    }
    let stages_paced = stage_means(&stages_max, &stage_totals(&app_ref).await);
    let achieved = paced_n as f64 / started.elapsed().as_secs_f64();
    // `BENCH_LATENCY_DUMP=FILE`: each paced request's due time and latency
    // (ms), to see whether slow ones come together.
    if let Ok(path) = std::env::var("BENCH_LATENCY_DUMP") {
        let lines: String = paced
            .iter()
            .enumerate()
            .map(|(i, l)| {
                format!("{:.1} {:.2}\n", interval.mul_f64(i as f64).as_secs_f64() * 1e3, l.as_secs_f64() * 1e3)
            })
            .collect();
        std::fs::write(&path, lines).expect("BENCH_LATENCY_DUMP");
    }
    paced.sort();
    rows.push(json!({ "form": "single at 70% of max", "intents_per_s": achieved, "recipients_per_s": achieved,
                      "raw_per_s": Value::Null, "ratio": Value::Null,
                      "p50_ms": percentile(&paced, 0.5), "p99_ms": percentile(&paced, 0.99),
                      "stages": stages_paced }));
    let app = std::sync::Arc::try_unwrap(app_ref).unwrap_or_else(|_| panic!("app still shared"));

    // Batches of 1,000 messages (`BENCH_BATCHES`, default 48), some at a
    // time (`BENCH_BATCH_CLIENTS`, default 8). Their bodies are serialised
    // before the clock starts, as the raw baseline's records are.
    let batches = env_usize("BENCH_BATCHES", 48);
    let clients = env_usize("BENCH_BATCH_CLIENTS", 8);
    let bodies: Vec<Vec<u8>> = (0..batches)
        .map(|b| {
            let messages: Vec<Value> = (0..1000).map(|i| single_body(b * 1000 + i)).collect();
            serde_json::to_vec(&json!({ "messages": messages })).expect("json")
        })
        .collect();
    let stages_before = stage_totals(&app).await;
    let started = Instant::now();
    let mut blat: Vec<Duration> = futures::stream::iter(bodies.into_iter().enumerate())
        .map(|(b, body)| post_bytes(&app, "/v1/messages/batch", format!("{run}-b{b}"), body))
        .buffer_unordered(clients)
        .collect()
        .await;
    let batch_rate = (batches * 1000) as f64 / started.elapsed().as_secs_f64();
    let stages_batch = stage_means(&stages_before, &stage_totals(&app).await);
    blat.sort();
    let raw_batch = raw_produce(
        &app,
        &producer,
        (0..batches * 1000)
            .flat_map(|i| {
                let id = IntentId(uuid::Uuid::new_v4());
                [header(id, 1, 1), batch(id, 0, vec![recipient(i)])]
            })
            .collect(),
    )
    .await
        / 2.0;
    rows.push(json!({ "form": format!("batch of 1,000 ({clients} clients)"), "intents_per_s": batch_rate, "recipients_per_s": batch_rate,
                      "raw_per_s": raw_batch, "ratio": batch_rate / raw_batch,
                      "p50_ms": percentile(&blat, 0.5), "p99_ms": percentile(&blat, 0.99), "stages": stages_batch }));

    // NDJSON campaigns of `BENCH_CAMPAIGN_RECIPIENTS` recipients (default
    // 300,000, the campaign of the pipeline), `BENCH_CAMPAIGN_ROUNDS` times
    // (default 3), each followed by the raw produce of the same records:
    // one campaign is a fraction of a second, so the median of each is
    // reported (p99 column: the slowest campaign).
    let recipients_n = env_usize("BENCH_CAMPAIGN_RECIPIENTS", 300_000);
    let rounds = env_usize("BENCH_CAMPAIGN_ROUNDS", 3).max(1);
    let mut body = json!({ "name": "bench", "from": "shop@example.com", "content": content() }).to_string();
    body.push('\n');
    for i in 0..recipients_n {
        body.push_str(&serde_json::to_string(&recipient(i)).expect("json"));
        body.push('\n');
    }
    let mut campaign_times: Vec<Duration> = Vec::new();
    let mut raw_rates: Vec<f64> = Vec::new();
    let stages_before = stage_totals(&app).await;
    for round in 0..rounds {
        // Copied before the clock starts, as the raw records are encoded.
        let payload = body.clone();
        let started = Instant::now();
        let r = app
            .http()
            .post(app.url("/v1/campaigns"))
            .bearer_auth(&app.api_key)
            .header("idempotency-key", format!("{run}-c{round}"))
            .header("content-type", "application/x-ndjson")
            .body(payload)
            .send()
            .await
            .expect("request");
        campaign_times.push(started.elapsed());
        assert_eq!(r.status(), 202);
        let reply: Value = r.json().await.expect("json");
        let batches = reply["batches"].as_u64().unwrap_or(0) as usize;
        let per_batch = recipients_n.div_ceil(batches.max(1));
        let id = IntentId(uuid::Uuid::new_v4());
        let mut raw_events = vec![header(id, recipients_n as u32, batches as u32)];
        for b in 0..batches {
            raw_events.push(batch(
                id,
                b as u32,
                (b * per_batch..((b + 1) * per_batch).min(recipients_n)).map(recipient).collect(),
            ));
        }
        let raw_records = raw_produce(&app, &producer, raw_events).await;
        raw_rates.push(raw_records * recipients_n as f64 / (batches + 1) as f64);
    }
    // Means over the campaigns (the raw produce records no stage).
    let stages = stage_means(&stages_before, &stage_totals(&app).await);
    campaign_times.sort();
    raw_rates.sort_by(f64::total_cmp);
    let campaign_time = campaign_times[rounds / 2];
    let raw_campaign = raw_rates[rounds / 2];
    let campaign_rate = recipients_n as f64 / campaign_time.as_secs_f64();
    rows.push(json!({ "form": format!("campaign, {} recipients (NDJSON, median of {rounds})", thousands(recipients_n)),
                      "intents_per_s": 1.0 / campaign_time.as_secs_f64(),
                      "recipients_per_s": campaign_rate, "raw_per_s": raw_campaign, "ratio": campaign_rate / raw_campaign,
                      "p50_ms": campaign_time.as_secs_f64() * 1000.0,
                      "p99_ms": campaign_times[rounds - 1].as_secs_f64() * 1000.0, "stages": stages }));

    let mut md = String::from("| form | intents/s | recipients/s | raw produce (same records)/s | ratio | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|---:|\n");
    let f = |v: &Value, d: usize| v.as_f64().map(|x| format!("{x:.d$}")).unwrap_or_else(|| "–".into());
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r["form"].as_str().unwrap_or(""),
            f(&r["intents_per_s"], 1),
            f(&r["recipients_per_s"], 0),
            f(&r["raw_per_s"], 0),
            f(&r["ratio"], 2),
            f(&r["p50_ms"], 2),
            f(&r["p99_ms"], 2)
        ));
    }
    md.push_str("\nWhere a submission's time goes inside ingest (mean ms per request, `ledger_ingest_stage_seconds`; in brackets the share of requests whose step alone took over 10 ms):\n\n| form | receive and check the body | claim the key | produce (acks) | record the response (not waited for) |\n|---|---:|---:|---:|---:|\n");
    let step = |s: &Value, name: &str| match (s[format!("{name}_ms")].as_f64(), s[format!("{name}_over_10ms")].as_f64())
    {
        (Some(ms), Some(over)) => format!("{ms:.2} ({over:.1} %)"),
        (Some(ms), None) => format!("{ms:.2}"),
        _ => "–".into(),
    };
    for r in rows.iter().filter(|r| r.get("stages").is_some_and(Value::is_object)) {
        let s = &r["stages"];
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r["form"].as_str().unwrap_or(""),
            step(s, "check"),
            step(s, "claim"),
            step(s, "produce"),
            step(s, "record")
        ));
    }
    println!("\ningest benchmark (debug = {}):\n\n{md}", cfg!(debug_assertions));
    std::fs::create_dir_all("bench-out").expect("bench-out");
    std::fs::write("bench-out/ingest.md", &md).expect("write");
    std::fs::write(
        "bench-out/ingest.json",
        serde_json::to_string_pretty(&json!({ "rows": rows, "measured_at": chrono::Utc::now() })).expect("json"),
    )
    .expect("write");
    app.stop().await;
}
