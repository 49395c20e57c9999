//! `make bench-project`: the projection's write path (folds, UNNEST upserts
//! and offsets, one transaction per batch, as the projector runs it) on
//! 100,000 messages' lifecycles, as a ratio to raw binary COPY of the same
//! number of full message rows into a copy of the same table, in the same
//! run and database.
//!
//! Then the projection lag: the real projector consuming the real topics
//! while lifecycle events are produced at 70 % (BENCH_LAG_FRACTION) of the
//! rate the write path just managed; the lag of each *delivered* event is the time from its
//! produce to the moment the read model counts that many delivered
//! messages (its maintained counts, sampled every 10 ms), and the table
//! reports its p50 / p99.
//!
//! Prints a table and writes bench-out/project.{json,md}.

use std::time::Instant;

use chrono::{DateTime, Utc};
use ledger_projections::store::{self, PartitionOffset};
use ledger_projections::Fold;
use ledger_schemas::*;
use ledger_tests::*;
use serde_json::json;
use uuid::Uuid;

/// glibc's allocator spends a quarter of the renderer's time in arena
/// locks and consolidation (perf); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MESSAGES: usize = 100_000;
const BATCH_EVENTS: usize = 5_000;

fn lifecycle_events() -> Vec<Event> {
    lifecycle_events_of_size(MESSAGES)
}

fn push_field(buf: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            buf.extend_from_slice(&(b.len() as i32).to_be_bytes());
            buf.extend_from_slice(b);
        }
        None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
    }
}

fn pg_time(t: DateTime<Utc>) -> [u8; 8] {
    let epoch_2000 = 946_684_800_000_000i64;
    (t.timestamp_micros() - epoch_2000).to_be_bytes()
}

/// PostgreSQL's binary COPY format for `MESSAGES` full `messages` rows.
fn copy_rows() -> Vec<u8> {
    let mut buf = Vec::with_capacity(MESSAGES * 300);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    let intent = Uuid::new_v4();
    let now = pg_time(Utc::now());
    for i in 0..MESSAGES {
        buf.extend_from_slice(&19i16.to_be_bytes());
        let id = Uuid::new_v4();
        push_field(&mut buf, Some(id.as_bytes()));
        push_field(&mut buf, Some(b"acme"));
        push_field(&mut buf, Some(intent.as_bytes()));
        push_field(&mut buf, Some(b"email"));
        push_field(&mut buf, Some(format!("c{i}@example.com").as_bytes()));
        push_field(&mut buf, Some(b"delivered"));
        push_field(&mut buf, Some(&50i16.to_be_bytes()));
        push_field(&mut buf, Some(&1i32.to_be_bytes()));
        push_field(&mut buf, Some(&0i32.to_be_bytes()));
        push_field(&mut buf, None);
        push_field(&mut buf, None);
        push_field(&mut buf, Some(format!("p{i}").as_bytes()));
        for _ in 0..4 {
            push_field(&mut buf, Some(&now));
        }
        push_field(&mut buf, None);
        push_field(&mut buf, None);
        push_field(&mut buf, Some(&now));
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    buf
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let (config, pool) = reporting_database().await;

    // Raw: binary COPY of full rows into a copy of the table.
    sqlx::query("CREATE TABLE messages_copy (LIKE messages INCLUDING ALL)").execute(&pool).await.expect("copy table");
    let rows = copy_rows();
    let mut conn = pool.acquire().await.expect("conn");
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(
            "COPY messages_copy (message_id, tenant_id, intent_id, channel, recipient, status, status_rank, attempts, error_attempt,
             last_error_code, last_error, provider_message_id, accepted_at, rendered_at, first_attempt_at, delivered_at,
             failed_at, suppressed_at, updated_at) FROM STDIN (FORMAT binary)",
        )
        .await
        .expect("copy in");
    copy.send(rows).await.expect("send");
    let copied = copy.finish().await.expect("finish");
    let copy_secs = started.elapsed().as_secs_f64();
    assert_eq!(copied as usize, MESSAGES);
    drop(conn);

    // The projection: each batch folded and applied with its offsets in one
    // transaction; every message's row is written once per stage. Then, if
    // BENCH_PROJECT_ROUNDS asks for it, more rounds of new campaigns on top:
    // the write path's rate as the read model grows.
    let rounds: usize = std::env::var("BENCH_PROJECT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let mut round_rates = Vec::new();
    let (mut total_events, mut project_secs, mut row_writes) = (0, 0.0, 0u64);
    for round in 0..rounds {
        let events = lifecycle_events();
        let (writes, secs, folding) = project_round(&pool, &events, round * events.len()).await;
        let rate = writes as f64 / secs;
        println!(
            "round {}: {secs:.2} s, of which folding {folding:.2} s (the rest in the database); \
             {} messages in the read model after it, {rate:.0} rows/s",
            round + 1,
            (round + 1) * MESSAGES
        );
        round_rates.push(rate);
        if round == 0 {
            (total_events, project_secs, row_writes) = (events.len(), secs, writes);
        }
    }
    let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE status = 'delivered'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(delivered as usize, MESSAGES * rounds);

    let copy_rate = MESSAGES as f64 / copy_secs;
    let project_rate = row_writes as f64 / project_secs;
    let md = format!(
        "| path | rows | seconds | rows/s | ratio to COPY |\n|---|---:|---:|---:|---:|\n\
         | raw binary COPY (full message rows) | {MESSAGES} | {copy_secs:.2} | {copy_rate:.0} | 1.00 |\n\
         | projection ({total_events} events, batches of {BATCH_EVENTS}, rows + counts + attempts + offsets per transaction) | {row_writes} | {project_secs:.2} | {project_rate:.0} | {:.2} |\n",
        project_rate / copy_rate
    );
    let md = match round_rates.as_slice() {
        [first, .., last] => format!(
            "{md}| projection, round {rounds} of {rounds} ({} messages in the read model before it) | {row_writes} | – | {last:.0} | {:.2} ({:.2} of round 1) |\n",
            (rounds - 1) * MESSAGES,
            last / copy_rate,
            last / first
        ),
        _ => md,
    };
    pool.close().await;
    drop_databases(&config).await;

    if std::env::var_os("BENCH_PROJECT_WRITE_ONLY").is_some() {
        println!("\n{md}");
        return;
    }
    let events_per_s = total_events as f64 / project_secs;
    let fraction = std::env::var("BENCH_LAG_FRACTION").ok().and_then(|v| v.parse().ok()).unwrap_or(0.7);
    // BENCH_LAG_EVENTS_PER_S pins the rate (to compare two builds or
    // settings at the same load).
    let rate =
        std::env::var("BENCH_LAG_EVENTS_PER_S").ok().and_then(|v| v.parse().ok()).unwrap_or(fraction * events_per_s);
    let (lag_p50, lag_p99, paced_rate, raw_p50, raw_p99) = lag(rate).await;
    let md = format!(
        "{md}\n| projection lag, real projector, events produced at {:.0} % of the write path's rate ({paced_rate:.0} events/s) | value |\n\
         |---|---:|\n| p50 | {:.0} ms |\n| p99 | {:.0} ms |\n\
         | raw: the same *delivered* records from produce to a plain rdkafka consumer's receipt (same fetch settings), p50 / p99 | {:.0} / {:.0} ms |\n\
         | lag ÷ raw, p50 / p99 | {:.1} / {:.1} |\n",
        fraction * 100.0,
        lag_p50 * 1000.0,
        lag_p99 * 1000.0,
        raw_p50 * 1000.0,
        raw_p99 * 1000.0,
        lag_p50 / raw_p50.max(1e-6),
        lag_p99 / raw_p99.max(1e-6)
    );
    println!("\nprojection benchmark (debug = {}):\n\n{md}", cfg!(debug_assertions));
    std::fs::create_dir_all("bench-out").expect("bench-out");
    std::fs::write("bench-out/project.md", &md).expect("write");
    std::fs::write(
        "bench-out/project.json",
        serde_json::to_string_pretty(&json!({ "copy_rows_per_s": copy_rate, "projection_rows_per_s": project_rate,
            "ratio": project_rate / copy_rate, "events": total_events, "row_writes": row_writes,
            "lag_p50_s": lag_p50, "lag_p99_s": lag_p99, "raw_latency_p50_s": raw_p50, "raw_latency_p99_s": raw_p99, "round_rows_per_s": round_rates, "lag_events_per_s": paced_rate, "measured_at": Utc::now() }))
        .expect("json"),
    )
    .expect("write");
}

/// Messages in the lag phase: 3 events each (rendered, attempted,
/// delivered), plus one recipient batch per 1,000.
const LAG_MESSAGES: usize = 60_000;

/// Produces lifecycle events at `rate` events/s to the real topics, with the
/// real projector running, and returns the p50 and p99 lag of the delivered
/// events in seconds, the rate achieved, and the p50 and p99 of the raw
/// baseline: the same delivered records' time from produce to their receipt
/// by a plain consumer of the outcomes topic, measured at the same time.
async fn lag(rate: f64) -> (f64, f64, f64, f64, f64) {
    let mut config = test_config();
    // The production defaults (BENCH_PROJECT_WRITERS and BENCH_FLUSH_MS
    // change them).
    config.projector = ledger_runtime::config::ProjectorConfig::default();
    config.projector.writers = writers();
    if let Some(ms) = std::env::var("BENCH_FLUSH_MS").ok().and_then(|v| v.parse().ok()) {
        config.projector.flush_interval_ms = ms;
    }
    config.telemetry.log_filter = "warn".into();
    prepare(&config).await.expect("prepare");
    let shutdown = ledger_runtime::Shutdown::new();
    let projector = ledger_projector::build(&config).await.expect("projector");
    let running = tokio::spawn(projector.run(shutdown.clone()));
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 2).await.expect("pool");

    // Interleave the stages so that deliveries flow all along: batch
    // headers first, then per message rendered, attempted, delivered.
    let events = lifecycle_events_of_size(LAG_MESSAGES);
    let (headers, rest) = events.split_at(LAG_MESSAGES / 1000);
    let n = LAG_MESSAGES;
    let producer = ledger_runtime::kafka::producer(&config).expect("producer");
    // The batch headers first, and only once the projector has its
    // partitions and has applied them does the clock start: the lag of a
    // running projector, not of its start.
    for h in headers {
        ledger_runtime::kafka::send_event(&producer, &config, Topic::Intents, &h.intent_id.to_string(), h)
            .await
            .expect("header");
    }
    let mut accepted = 0i64;
    while (accepted as usize) < LAG_MESSAGES {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        accepted = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&reporting).await.unwrap_or(0);
    }
    let mut paced: Vec<&Event> = Vec::with_capacity(3 * n);
    for i in 0..n {
        paced.extend([&rest[i], &rest[n + i], &rest[2 * n + i]]);
    }

    // The raw baseline: a plain consumer of the outcomes topic (the same
    // fetch wait as the projector's), noting when each delivered record
    // arrives. The topic is empty until the paced events start.
    let raw_receipts = {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::Headers;
        use rdkafka::Message;
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &config.kafka.brokers)
            .set("group.id", format!("raw-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("raw consumer");
        let mut tpl = rdkafka::TopicPartitionList::new();
        let name = config.topic(Topic::Outcomes);
        for p in 0..Topic::Outcomes.partitions() {
            tpl.add_partition_offset(&name, p, rdkafka::Offset::Beginning).expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        let delivered_type = EventKind::Delivered.type_name().as_bytes();
        tokio::spawn(async move {
            let mut seen: std::collections::HashMap<String, Instant> = std::collections::HashMap::with_capacity(n);
            while seen.len() < n {
                let Ok(Ok(m)) = tokio::time::timeout(std::time::Duration::from_secs(120), consumer.recv()).await else {
                    break;
                };
                let delivered = m
                    .headers()
                    .is_some_and(|h| h.iter().any(|h| h.key == HEADER_EVENT_TYPE && h.value == Some(delivered_type)));
                if delivered {
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    seen.entry(key).or_insert_with(Instant::now);
                }
            }
            seen
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    // The sampler: (time, delivered rows) every 10 ms.
    let sampling = {
        let reporting = reporting.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(Instant, i64)> = Vec::new();
            loop {
                // The maintained counts: a count(*) over the rows every 10 ms
                // would itself load the database being measured.
                let count: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(sum(messages), 0)::bigint FROM intent_status_counts WHERE status = 'delivered'",
                )
                .fetch_one(&reporting)
                .await
                .unwrap_or(0);
                samples.push((Instant::now(), count));
                if count as usize >= LAG_MESSAGES {
                    return samples;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let mut delivered_sent: Vec<Instant> = Vec::with_capacity(n);
    let mut delivered_keys: Vec<String> = Vec::with_capacity(n);
    let mut acks = Vec::with_capacity(paced.len());
    for (k, mut e) in paced.into_iter().cloned().enumerate() {
        let due = started + std::time::Duration::from_secs_f64(k as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        e.occurred_at = Utc::now();
        let topic = if matches!(e.body, EventBody::MessageRendered(_)) {
            Topic::Rendered
        } else if e.message_id.is_some() {
            Topic::Outcomes
        } else {
            Topic::Intents
        };
        if matches!(e.body, EventBody::Delivered(_)) {
            delivered_sent.push(Instant::now());
            delivered_keys.push(e.message_id.map(|m| m.to_string()).unwrap_or_default());
        }
        let (producer, config) = (producer.clone(), config.clone());
        acks.push(tokio::spawn(async move {
            let key = e.message_id.map(|m| m.to_string()).unwrap_or_else(|| e.intent_id.to_string());
            ledger_runtime::kafka::send_event(&producer, &config, topic, &key, &e).await
        }));
    }
    let achieved = acks.len() as f64 / started.elapsed().as_secs_f64();
    for a in acks {
        a.await.expect("task").expect("acknowledged");
    }
    let samples = sampling.await.expect("sampler");
    shutdown.trigger();
    let _ = running.await;

    // The k-th delivered event is in the read model once the count reaches k.
    let lags = lags_until_counted(&delivered_sent, &samples, Instant::now(), |from, to| {
        to.saturating_duration_since(from).as_secs_f64()
    });
    let at = |q: f64| quantile(&lags, q);
    let receipts = raw_receipts.await.expect("raw consumer");
    assert_eq!(receipts.len(), n, "the raw consumer received every delivered record");
    let mut raw: Vec<f64> = delivered_keys
        .iter()
        .zip(&delivered_sent)
        .map(|(key, sent)| receipts[key].saturating_duration_since(*sent).as_secs_f64())
        .collect();
    raw.sort_by(|a, b| a.total_cmp(b));
    let raw_at = |q: f64| quantile(&raw, q);
    reporting.close().await;
    drop_databases(&config).await;
    (at(0.5), at(0.99), achieved, raw_at(0.5), raw_at(0.99))
}

/// The projector's writers: its default unless BENCH_PROJECT_WRITERS says
/// otherwise.
fn writers() -> usize {
    std::env::var("BENCH_PROJECT_WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ledger_runtime::config::ProjectorConfig::default().writers)
        .max(1)
}

/// One round of the write path over `events` as the projector runs it:
/// each event goes to the writer of its partition (`projector.writers`,
/// the production default unless BENCH_PROJECT_WRITERS says otherwise),
/// and each writer folds and applies its batches with their offsets, one
/// transaction each, beside the others. Returns (row writes, seconds, of
/// which seconds spent folding, summed over the writers).
async fn project_round(pool: &sqlx::PgPool, events: &[Event], offset_base: usize) -> (u64, f64, f64) {
    let writers = writers();
    let mut shares: Vec<Vec<Event>> = vec![Vec::new(); writers];
    for e in events {
        let (key, topic) = match e.message_id {
            Some(m) => (m.to_string(), Topic::Rendered),
            None => (e.intent_id.to_string(), Topic::Intents),
        };
        let partition = ledger_runtime::kafka::partition_for(key.as_bytes(), topic.partitions());
        shares[ledger_projector::writer_of(partition, writers)].push(e.clone());
    }
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for (writer, share) in shares.into_iter().enumerate() {
        let pool = pool.clone();
        running.spawn(async move {
            let (mut row_writes, mut folding) = (0u64, 0.0);
            let part = vec![("bench.topic".to_owned(), writer as i32)];
            for (n, chunk) in share.chunks(BATCH_EVENTS).enumerate() {
                let fold_started = Instant::now();
                let mut fold = Fold::default();
                chunk.iter().for_each(|e| fold.add(e));
                folding += fold_started.elapsed().as_secs_f64();
                let mut tx = pool.begin().await.expect("tx");
                store::lock_offsets(&mut tx, "bench", &part).await.expect("lock");
                row_writes += store::apply(&mut tx, &fold).await.expect("apply").messages;
                let next = (offset_base + (n + 1) * BATCH_EVENTS) as i64;
                store::save_offsets(
                    &mut tx,
                    "bench",
                    &[PartitionOffset { topic: "bench.topic".into(), partition: writer as i32, next_offset: next }],
                )
                .await
                .expect("offsets");
                tx.commit().await.expect("commit");
            }
            (row_writes, folding)
        });
    }
    let (mut row_writes, mut folding) = (0u64, 0.0);
    while let Some(done) = running.join_next().await {
        let (w, f) = done.expect("writer");
        row_writes += w;
        folding += f;
    }
    (row_writes, started.elapsed().as_secs_f64(), folding)
}
