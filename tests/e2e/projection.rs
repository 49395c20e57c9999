//! The SQL upsert folds exactly as the pure fold does, in any order, and
//! applying a batch twice changes nothing.

use chrono::TimeZone;
use ledger_projections::store;
use ledger_projections::Fold;
use ledger_schemas::*;
use ledger_tests::*;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

fn events() -> Vec<Event> {
    let intent = IntentId(Uuid::new_v4());
    let id = MessageId::derive(intent, "a@example.com");
    let ev = |n: i64, body| Event {
        event_id: EventId(Uuid::new_v4()),
        body,
        tenant_id: TenantId::parse("acme").expect("tenant"),
        intent_id: intent,
        message_id: Some(id),
        occurred_at: chrono::Utc.timestamp_opt(1_800_000_000 + n, 0).unwrap(),
        correlation_id: "c".into(),
    };
    vec![
        ev(
            0,
            EventBody::RecipientBatch(RecipientBatch {
                template: Some(TemplateRef { name: "welcome".into(), version: 3 }),
                batch_index: 0,
                batch_count: 1,
                channel: Channel::Email,
                priority: Priority::Transactional,
                from: None,
                content: Content::default(),
                recipients: vec![Recipient { address: "a@example.com".into(), variables: Default::default() }],
                send_at: None,
            }),
        ),
        ev(
            1,
            EventBody::MessageRendered(MessageRendered {
                channel: Channel::Email,
                priority: Priority::Transactional,
                recipient: "a@example.com".into(),
                from: None,
                subject: None,
                text: None,
                html: None,
                json: None,
            }),
        ),
        ev(
            2,
            EventBody::DeliveryAttempted(DeliveryAttempted {
                attempt: 1,
                channel: Channel::Email,
                recipient: "a@example.com".into(),
                provider: "sink".into(),
                identity: Some("mail-a".into()),
                rendered_at: Some(chrono::Utc.timestamp_opt(1_800_000_001, 0).unwrap()),
            }),
        ),
        ev(
            3,
            EventBody::DeliveryFailed(DeliveryFailed {
                attempt: 1,
                provider: "sink".into(),
                code: "timeout".into(),
                reason: "slow".into(),
                permanent: false,
                identity: Some("mail-a".into()),
                retry_at: None,
            }),
        ),
        ev(
            4,
            EventBody::DeliveryAttempted(DeliveryAttempted {
                attempt: 2,
                channel: Channel::Email,
                recipient: "a@example.com".into(),
                provider: "sink".into(),
                identity: Some("mail-a".into()),
                rendered_at: Some(chrono::Utc.timestamp_opt(1_800_000_001, 0).unwrap()),
            }),
        ),
        ev(
            5,
            EventBody::Delivered(Delivered {
                attempt: 2,
                provider: "sink".into(),
                provider_message_id: Some("p-1".into()),
                identity: Some("mail-a".into()),
            }),
        ),
        ev(6, feedback(FeedbackKind::Opened, "o-1", 6)),
        ev(7, feedback(FeedbackKind::Clicked, "c-1", 7)),
        // A second open later, and a provider's delivery report.
        ev(8, feedback(FeedbackKind::Opened, "o-2", 9)),
        ev(9, feedback(FeedbackKind::Delivered, "d-1", 5)),
    ]
}

fn feedback(kind: FeedbackKind, id: &str, at: i64) -> EventBody {
    EventBody::Feedback(Feedback {
        kind,
        source: "mailgun".into(),
        provider_event_id: id.into(),
        recipient: "a@example.com".into(),
        permanent: false,
        reported_at: chrono::Utc.timestamp_opt(1_800_000_000 + at, 0).unwrap(),
        reason: None,
        url: (kind == FeedbackKind::Clicked).then(|| "https://example.com/x".into()),
    })
}

async fn row(pool: &sqlx::PgPool) -> Value {
    sqlx::query_scalar("SELECT to_jsonb(m) - 'updated_at' FROM messages m").fetch_one(pool).await.expect("row")
}

async fn apply_one_by_one(pool: &sqlx::PgPool, events: &[Event]) {
    for e in events {
        let mut fold = Fold::default();
        fold.add(e);
        let mut tx = pool.begin().await.expect("tx");
        store::apply(&mut tx, &fold).await.expect("apply");
        tx.commit().await.expect("commit");
    }
}

#[tokio::test]
async fn the_sql_merge_agrees_with_the_pure_fold_in_any_order_and_on_replay() {
    let (config, pool) = reporting_database().await;

    let events = events();
    apply_one_by_one(&pool, &events).await;
    let in_order = row(&pool).await;
    assert_eq!(in_order["status"], "delivered");
    assert_eq!(in_order["attempts"], 2);
    assert_eq!(in_order["last_error_code"], "timeout");
    assert_eq!(in_order["provider_message_id"], "p-1");
    // Feedback: the first open, the click, the provider's delivery time
    // (earlier than our own record of the call) — whatever the order.
    assert_eq!(in_order["opened_at"], "2027-01-15T08:00:06+00:00");
    assert_eq!(in_order["clicked_at"], "2027-01-15T08:00:07+00:00");
    assert_eq!(in_order["delivered_at"], "2027-01-15T08:00:05+00:00");
    assert_eq!(in_order["bounced_at"], Value::Null);
    assert_eq!((in_order["template"].as_str(), in_order["template_version"].as_i64()), (Some("welcome"), Some(3)));

    // Applied again, every event is one the row already holds: the merge
    // changes nothing, so no new row version is written (its xmin stays).
    let xmin = || sqlx::query_scalar::<_, String>("SELECT xmin::text FROM messages").fetch_one(&pool);
    let written = xmin().await.expect("xmin");
    apply_one_by_one(&pool, &events).await;
    assert_eq!(xmin().await.expect("xmin"), written, "a replayed event rewrote an unchanged row");
    assert_eq!(row(&pool).await, in_order);

    // A rendered event that reaches the read model after its attempt, which
    // carried the rendered time, is one of those too.
    sqlx::query("TRUNCATE messages").execute(&pool).await.expect("truncate");
    let rendered = events.iter().position(|e| matches!(e.body, EventBody::MessageRendered(_))).expect("rendered");
    let mut late = events.clone();
    let rendered = late.remove(rendered);
    apply_one_by_one(&pool, &late).await;
    assert_eq!(row(&pool).await, in_order, "the attempt gave the row its rendered time");
    let written = xmin().await.expect("xmin");
    apply_one_by_one(&pool, &[rendered]).await;
    assert_eq!(xmin().await.expect("xmin"), written, "the late rendered event rewrote an unchanged row");

    // Reversed, with everything applied twice: the same row.
    sqlx::query("TRUNCATE messages").execute(&pool).await.expect("truncate");
    let mut reversed: Vec<Event> = events.iter().rev().cloned().collect();
    reversed.extend(events.iter().cloned());
    apply_one_by_one(&pool, &reversed).await;
    assert_eq!(row(&pool).await, in_order);

    // And the pure fold of the whole batch says the same.
    let mut fold = Fold::default();
    for e in &events {
        fold.add(e);
    }
    let patch = fold.messages.values().next().expect("patch");
    assert_eq!(patch.status.as_str(), in_order["status"]);
    assert_eq!(Value::from(patch.attempts), in_order["attempts"]);
    assert_eq!(patch.opened_at.map(|t| t.timestamp()), Some(1_800_000_006));

    // An event that does say something new is written.
    let written = xmin().await.expect("xmin");
    let mut complaint = events[0].clone();
    complaint.body = feedback(FeedbackKind::Complained, "c-1", 8);
    apply_one_by_one(&pool, &[complaint]).await;
    assert_ne!(xmin().await.expect("xmin"), written);
    assert_eq!(row(&pool).await["complained_at"], "2027-01-15T08:00:08+00:00");
    pool.close().await;
    drop_databases(&config).await;
}

#[tokio::test]
async fn offsets_are_locked_and_saved_with_the_rows() {
    let (config, pool) = reporting_database().await;
    let parts = vec![("t.outcomes".to_owned(), 3)];
    let mut tx = pool.begin().await.expect("tx");
    assert_eq!(store::lock_offsets(&mut tx, "p", &parts).await.expect("lock")[&parts[0]], 0);
    store::save_offsets(
        &mut tx,
        "p",
        &[store::PartitionOffset { topic: "t.outcomes".into(), partition: 3, next_offset: 42 }],
    )
    .await
    .expect("save");
    tx.rollback().await.expect("rollback");
    // Rolled back with its rows: nothing moved.
    let mut tx = pool.begin().await.expect("tx");
    assert_eq!(store::lock_offsets(&mut tx, "p", &parts).await.expect("lock")[&parts[0]], 0);
    store::save_offsets(
        &mut tx,
        "p",
        &[store::PartitionOffset { topic: "t.outcomes".into(), partition: 3, next_offset: 42 }],
    )
    .await
    .expect("save");
    tx.commit().await.expect("commit");
    // Offsets never move backwards.
    let mut tx = pool.begin().await.expect("tx");
    store::save_offsets(
        &mut tx,
        "p",
        &[store::PartitionOffset { topic: "t.outcomes".into(), partition: 3, next_offset: 7 }],
    )
    .await
    .expect("save");
    assert_eq!(store::lock_offsets(&mut tx, "p", &parts).await.expect("lock")[&parts[0]], 42);
    tx.commit().await.expect("commit");
    pool.close().await;
    drop_databases(&config).await;
}

/// Applies `events` in transactions of `per` events, retrying a batch that
/// the database aborts (a deadlock between the two writers), as the
/// projector does.
async fn apply_in_batches(pool: &sqlx::PgPool, events: &[Event], per: usize) {
    for chunk in events.chunks(per) {
        let mut fold = Fold::default();
        chunk.iter().for_each(|e| fold.add(e));
        let mut tries = 0;
        loop {
            let mut tx = pool.begin().await.expect("tx");
            match store::apply(&mut tx, &fold).await {
                Ok(_) => {
                    tx.commit().await.expect("commit");
                    break;
                }
                Err(e) => {
                    tries += 1;
                    assert!(tries < 20, "batch failed {tries} times: {e}");
                    tx.rollback().await.expect("rollback");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_the_same_messages_keep_the_counts_exact() {
    // A message's accepted and rendered events come from other partitions
    // than its attempts and outcomes, so two projector instances can write
    // its row at the same moment, the first insert of the row included.
    let (config, pool) = reporting_database().await;
    let events = lifecycle_events_of_size(3_000);
    let intent = events[0].intent_id;
    let (early, late): (Vec<Event>, Vec<Event>) = events
        .into_iter()
        .partition(|e| matches!(e.body, EventBody::RecipientBatch(_) | EventBody::MessageRendered(_)));
    // The rendered events first and the batches last on one side, the
    // outcomes newest first on the other: both sides insert rows.
    let early: Vec<Event> = early.into_iter().rev().collect();
    let late: Vec<Event> = late.into_iter().rev().collect();
    let (a, b) = (pool.clone(), pool.clone());
    tokio::join!(apply_in_batches(&a, &early, 100), apply_in_batches(&b, &late, 100));

    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM messages GROUP BY status").fetch_all(&pool).await.expect("rows");
    assert_eq!(rows, vec![("delivered".to_owned(), 3_000)]);
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, messages FROM intent_status_counts WHERE intent_id = $1 AND messages <> 0 ORDER BY status",
    )
    .bind(intent.0)
    .fetch_all(&pool)
    .await
    .expect("counts");
    assert_eq!(counts, rows, "intent_status_counts against the rows");
    let hourly: Vec<(chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(
        "SELECT hour, messages FROM tenant_hourly WHERE status = 'delivered' AND messages <> 0 ORDER BY hour",
    )
    .fetch_all(&pool)
    .await
    .expect("hourly");
    let by_hour: Vec<(chrono::DateTime<chrono::Utc>, i64)> =
        sqlx::query_as("SELECT date_trunc('hour', delivered_at, 'UTC'), count(*) FROM messages GROUP BY 1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .expect("by hour");
    assert_eq!(hourly, by_hour, "tenant_hourly against the rows");
    pool.close().await;
    drop_databases(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_with_several_writers_applies_every_record_once_and_equals_a_replay() {
    // Four writers over the partitions, each message's events produced out
    // of order: every partition's offset row ends at its end of the log
    // (nothing skipped, nothing applied twice), and the read model equals a
    // rebuild from the log by the replay tooling.
    let mut config = test_config();
    config.projector.writers = 4;
    prepare(&config).await.expect("prepare");
    let messages = 4_000;
    let mut events = lifecycle_events_of_size(messages);
    // Derived event ids are as good as a shuffle, and the same every run.
    events[messages / 1000..].sort_by_key(|e| e.event_id.0);
    let producer = ledger_runtime::kafka::producer(&config).expect("producer");
    let mut produced: std::collections::BTreeMap<(String, i32), i64> = Default::default();
    let sends = events.iter().map(|e| {
        let topic = match (&e.body, e.message_id) {
            (EventBody::MessageRendered(_), _) => Topic::Rendered,
            (_, Some(_)) => Topic::Outcomes,
            (_, None) => Topic::Intents,
        };
        let key = e.message_id.map(|m| m.to_string()).unwrap_or_else(|| e.intent_id.to_string());
        let partition = ledger_runtime::kafka::partition_for(key.as_bytes(), topic.partitions());
        *produced.entry((config.topic(topic), partition)).or_default() += 1;
        let (producer, config) = (&producer, &config);
        async move { ledger_runtime::kafka::send_event(producer, config, topic, &key, e).await }
    });
    use futures::StreamExt;
    let acks: Vec<_> = futures::stream::iter(sends).buffer_unordered(512).collect().await;
    assert!(acks.iter().all(Result::is_ok), "every event acknowledged");

    let shutdown = ledger_runtime::Shutdown::new();
    let projector = ledger_projector::build(&config).await.expect("projector");
    let running = tokio::spawn(projector.run(shutdown.clone()));
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 2).await.expect("pool");
    let group = config.group(ConsumerGroup::Projector);
    let offsets = eventually("every partition applied to its end", Duration::from_secs(60), || async {
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_offset FROM projector_offsets WHERE consumer = $1 ORDER BY 1, 2",
        )
        .bind(&group)
        .fetch_all(&reporting)
        .await
        .expect("offsets");
        let rows: std::collections::BTreeMap<(String, i32), i64> =
            rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
        (rows == produced).then_some(rows)
    })
    .await;
    assert_eq!(offsets.len(), 1 + 8 + 8, "the intent's partition, every rendered and outcome partition");
    shutdown.trigger();
    running.await.expect("projector task").expect("projector");
    let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE status = 'delivered'")
        .fetch_one(&reporting)
        .await
        .expect("count");
    assert_eq!(delivered, messages as i64);

    let out = ledger_ok(&config, &["replay", "projections", "--schema", "rebuilt"]);
    assert!(!out.contains("DIFFERS"), "{out}");
    let diffs = read_model_differences(&reporting, "public", "rebuilt").await;
    assert!(diffs.iter().all(|(_, n)| *n == 0), "the live read model differs from the replay: {diffs:?}");
    reporting.close().await;
    drop_databases(&config).await;
}
