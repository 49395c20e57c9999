//! Replay tooling (`ledger replay`, `redrive`, `inspect`, `dlq`, `lag`), run
//! as the operator runs it: the `ledger` binary against the real broker and
//! PostgreSQL, beside running roles.

use std::time::Duration;

use ledger_runtime::{SinkFailure, SinkFailureKind};
use ledger_schemas::{
    Channel, Event, EventBody, EventId, IntentId, MessageId, MessageRendered, Priority, TenantId, Topic,
};
use ledger_tests::*;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

fn fail(recipient_contains: &str, kind: SinkFailureKind, attempts: u32) -> SinkFailure {
    SinkFailure { recipient_contains: recipient_contains.into(), kind, attempts }
}

/// A campaign of `n` recipients `{prefix}{i}@example.com` plus one outside
/// the sandbox; returns its intent id.
async fn campaign(app: &TestApp, key: &str, prefix: &str, n: usize) -> String {
    let mut recipients: Vec<Value> =
        (0..n).map(|i| json!({ "address": format!("{prefix}{i}@example.com"), "variables": { "n": i } })).collect();
    recipients.push(json!({ "address": format!("{prefix}@elsewhere.test"), "variables": { "n": -1 } }));
    let body = json!({ "name": key, "from": "news@example.com",
                       "content": { "subject": "Hi {{ n }}", "text": "T" }, "recipients": recipients });
    let reply = app.post("/v1/campaigns", Some(key), &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    reply.body["intent_id"].as_str().expect("intent id").to_owned()
}

async fn status_counts(pool: &PgPool, schema: &str) -> std::collections::BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(&format!(
        "-- tests::replay::status_counts\nSELECT status, count(*) FROM {schema}.messages GROUP BY status"
    ))
    .fetch_all(pool)
    .await
    .expect("counts")
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_read_model_equals_the_live_one_and_as_of_gives_the_counts_of_that_time() {
    let mut config = test_config();
    config.sink.failures =
        vec![fail("bad", SinkFailureKind::Permanent, 0), fail("flaky", SinkFailureKind::Transient, 1)];
    let app = spawn_app_with(config).await;
    let first = campaign(&app, "first", "flaky", 12).await;
    let more = campaign(&app, "first-bad", "bad", 4).await;
    app.wait_terminal(&first, 13, Duration::from_secs(60)).await;
    app.wait_terminal(&more, 5, Duration::from_secs(60)).await;
    let then = status_counts(&app.reporting, "public").await;
    assert_eq!(then.get("failed"), Some(&4), "{then:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = campaign(&app, "second", "ok", 20).await;
    app.wait_terminal(&second, 21, Duration::from_secs(60)).await;

    let out = ledger_ok(&app.config, &["replay", "projections", "--schema", "rebuilt", "--window", "7"]);
    assert!(out.contains("checked against the log:") && !out.contains("DIFFERS"), "{out}");
    assert!(out.contains("messages delivered"), "{out}");
    // The live projector may still be applying its last batch.
    let diffs = eventually("the rebuild to equal the live read model", Duration::from_secs(20), || async {
        let d = read_model_differences(&app.reporting, "public", "rebuilt").await;
        d.iter().all(|(_, n)| *n == 0).then_some(d)
    })
    .await;
    assert_eq!(diffs.len(), READ_MODEL_TABLES.len());
    let rows: i64 = sqlx::query_scalar("-- tests::replay::rows\nSELECT count(*) FROM rebuilt.messages")
        .fetch_one(&app.reporting)
        .await
        .unwrap();
    assert_eq!(rows, 13 + 5 + 21);

    let as_of = cut.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let out = ledger_ok(&app.config, &["replay", "projections", "--schema", "earlier", "--as-of", &as_of]);
    assert!(!out.contains("DIFFERS"), "{out}");
    assert_eq!(status_counts(&app.reporting, "earlier").await, then, "{out}");

    // A schema that exists is refused, so is swapping a history.
    let refused = ledger_output(&app.config, &["replay", "projections", "--schema", "earlier"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("exists already"));
    let refused = ledger_output(&app.config, &["replay", "projections", "--as-of", &as_of, "--swap", "--yes"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--swap with --as-of"));
    let listed = ledger_ok(&app.config, &["replay", "list"]);
    assert!(listed.contains("public") && listed.contains("rebuilt") && listed.contains("earlier"), "{listed}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_does_not_interrupt_a_running_report_and_the_projector_follows_the_rebuild() {
    let app = spawn_app().await;
    let first = campaign(&app, "before", "a", 15).await;
    app.wait_terminal(&first, 16, Duration::from_secs(60)).await;

    // Without --yes and without a terminal to ask on, nothing is done.
    let refused = ledger_output(&app.config, &["replay", "projections", "--schema", "next", "--swap"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"), "{:?}", refused);
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'next')")
        .fetch_one(&app.reporting)
        .await
        .unwrap();
    assert!(!exists, "a refused command creates nothing");

    // A report that takes a while, on the live read model.
    let report_pool = app.reporting.clone();
    let report = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let n: i64 = sqlx::query_scalar("-- tests::replay::long_report\nSELECT count(*) FROM messages, pg_sleep(3)")
            .fetch_one(&report_pool)
            .await
            .expect("the report is not interrupted");
        (n, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let config = app.config.clone();
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        ledger_ok(&config, &["replay", "projections", "--schema", "next", "--swap", "--yes"])
    })
    .await
    .unwrap();
    let swap_took = started.elapsed();
    assert!(out.contains("swapped"), "{out}");
    let (n, report_took) = report.await.unwrap();
    assert_eq!(n, 16, "the report saw the read model it started on");
    assert!(report_took >= Duration::from_secs(3));
    let old =
        out.split("kept as schema ").nth(1).and_then(|s| s.split_whitespace().next()).expect("old schema").to_owned();
    eprintln!("swap took {swap_took:?}; the report {report_took:?}");

    // The projector carries on in the rebuild, not in the old schema.
    let second = campaign(&app, "after", "b", 9).await;
    app.wait_terminal(&second, 10, Duration::from_secs(60)).await;
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM public.messages").fetch_one(&app.reporting).await.unwrap();
    let kept: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {old}.messages")).fetch_one(&app.reporting).await.unwrap();
    assert_eq!((live, kept), (26, 16));
    let listed = ledger_ok(&app.config, &["replay", "list"]);
    assert!(listed.contains(&old), "{listed}");
    ledger_ok(&app.config, &["replay", "drop", &old, "--yes"]);
    let listed = ledger_ok(&app.config, &["replay", "list"]);
    assert!(!listed.contains(&old), "{listed}");
    let refused = ledger_output(&app.config, &["replay", "drop", "public", "--yes"]);
    assert!(!refused.status.success(), "the live read model is never dropped");
    app.stop().await;
}

/// How many times the sink received each message id.
fn sink_counts(app: &TestApp) -> std::collections::HashMap<String, usize> {
    let mut out = std::collections::HashMap::new();
    for r in ledger_dispatcher::sink::read_deliveries(&app.config.sink.dir).expect("sink") {
        *out.entry(r.message_id.to_string()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_sends_each_failed_message_once_even_when_run_twice_and_a_dry_run_sends_nothing() {
    let mut config = test_config();
    // The first attempt of these is refused for good; the provider has
    // "fixed" it by the second.
    config.sink.failures = vec![fail("refused", SinkFailureKind::Permanent, 1)];
    let app = spawn_app_with(config).await;
    let mut recipients: Vec<Value> = (0..4).map(|i| json!({ "address": format!("refused{i}@example.com") })).collect();
    recipients.extend((0..3).map(|i| json!({ "address": format!("fine{i}@example.com") })));
    let body = json!({ "name": "redrive", "from": "news@example.com",
                       "content": { "subject": "S", "text": "T" }, "recipients": recipients });
    let reply = app.post("/v1/campaigns", Some("redrive"), &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    let counts = app.wait_terminal(&intent, 7, Duration::from_secs(60)).await;
    assert_eq!((counts.get("failed"), counts.get("delivered")), (Some(&4), Some(&3)), "{counts:?}");
    let failed: Vec<String> = sqlx::query_scalar(
        "-- tests::replay::failed\nSELECT message_id::text FROM messages WHERE status = 'failed' ORDER BY 1",
    )
    .fetch_all(&app.reporting)
    .await
    .unwrap();

    let dry = ledger_ok(&app.config, &["redrive", "--status", "failed", "--campaign", &intent, "--dry-run"]);
    assert!(dry.starts_with("would redrive 4 failed message(s)"), "{dry}");
    for id in &failed {
        assert!(dry.contains(id.as_str()), "{id} not listed:\n{dry}");
    }
    assert!(dry.contains("refused0@example.com"), "to whom: {dry}");
    let unasked = ledger_output(&app.config, &["redrive", "--status", "failed"]);
    assert!(!unasked.status.success(), "sending needs --yes without a terminal");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.sink_total(), 3, "neither the dry run nor the refused run sent anything");
    let states: Vec<String> =
        sqlx::query_scalar("-- tests::replay::states\nSELECT DISTINCT state FROM delivery_claims")
            .fetch_all(&app.ops)
            .await
            .unwrap();
    assert_eq!(states, vec!["done".to_owned()]);

    // Twice in a row, before the dispatcher has done anything with the first.
    let once = ledger_ok(&app.config, &["redrive", "--status", "failed", "--tenant", "acme", "--yes"]);
    let twice = ledger_ok(&app.config, &["redrive", "--status", "failed", "--tenant", "acme", "--yes"]);
    assert!(once.contains("redriven 4 message(s): 4 as attempt 2"), "{once}");
    assert!(!twice.contains("redriven 4"), "the second run moves nothing: {twice}");
    for id in &failed {
        let row = app.wait_for_status(id, "delivered").await;
        assert_eq!(row["attempts"], 2, "{row}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = sink_counts(&app);
    for id in &failed {
        assert_eq!(sent.get(id), Some(&1), "{id} delivered once");
    }
    assert_eq!(sent.values().sum::<usize>(), 7);
    let again = ledger_ok(&app.config, &["redrive", "--status", "failed", "--yes"]);
    assert!(again.contains("no failed messages match"), "{again}");

    // The history of one of them shows both attempts; the log and the read
    // model agree.
    let history = ledger_ok(&app.config, &["inspect", "message", &failed[0]]);
    let order = [
        "intent.accepted.v1",
        "intent.recipient_batch.v1",
        "message.rendered.v1",
        "delivery.attempted.v1",
        "delivery.failed.v1",
        "delivery.attempted.v1",
        "delivery.delivered.v1",
    ];
    let mut at = 0;
    for t in order {
        let found = history[at..].find(t).unwrap_or_else(|| panic!("{t} missing after position {at}:\n{history}"));
        at += found + t.len();
    }
    assert!(history.contains("status               delivered"), "{history}");
    assert!(history.contains("the log and the read model agree"), "{history}");
    let whole = ledger_ok(&app.config, &["inspect", "intent", &intent]);
    assert!(whole.contains("delivered") && whole.contains("the log and the read model agree"), "{whole}");

    // A rebuild after the redrive equals the live read model, roll-ups too.
    let out = ledger_ok(&app.config, &["replay", "projections", "--schema", "after_redrive"]);
    assert!(!out.contains("DIFFERS"), "{out}");
    let diffs = read_model_differences(&app.reporting, "public", "after_redrive").await;
    assert!(diffs.iter().all(|(_, n)| *n == 0), "{diffs:?}");
    let failed_hourly: i64 = sqlx::query_scalar(
        "-- tests::replay::failed_hourly\nSELECT COALESCE(sum(messages), 0)::bigint FROM tenant_hourly WHERE status = 'failed'",
    )
    .fetch_one(&app.reporting)
    .await
    .unwrap();
    assert_eq!(failed_hourly, 0, "the redriven messages left the failed bucket");

    let lag = ledger_ok(&app.config, &["lag"]);
    assert!(lag.contains("projection lag: 0 event(s)"), "{lag}");
    assert!(lag.contains(&app.config.group(ledger_schemas::ConsumerGroup::Dispatcher)), "{lag}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_shown_and_reprocessed_once() {
    let app = spawn_app().await;
    // A retry record without its headers: the dispatcher dead-letters it.
    let intent = IntentId(Uuid::new_v4());
    let message = MessageId::derive(intent, "stray@example.com");
    let event = Event {
        event_id: EventId::derive(message.0, "rendered", 0),
        body: EventBody::MessageRendered(MessageRendered {
            channel: Channel::Email,
            priority: Priority::Transactional,
            recipient: "stray@example.com".into(),
            from: Some("news@example.com".into()),
            subject: Some("S".into()),
            text: Some("T".into()),
            html: None,
            json: None,
        }),
        tenant_id: TenantId::parse("acme").unwrap(),
        intent_id: intent,
        message_id: Some(message),
        occurred_at: chrono::Utc::now(),
        correlation_id: "dlq-test".into(),
    };
    let producer = ledger_runtime::kafka::producer(&app.config).unwrap();
    ledger_runtime::kafka::send_event(&producer, &app.config, Topic::Retries, &message.to_string(), &event)
        .await
        .unwrap();
    let row = app.wait_for_status(&message.to_string(), "dead_lettered").await;
    assert_eq!(row["last_error_code"], "bad_retry", "{row}");

    let listed = ledger_ok(&app.config, &["dlq", "list"]);
    assert!(listed.starts_with("1 dead letter(s)"), "{listed}");
    assert!(listed.contains("bad_retry"), "{listed}");
    let id = listed.lines().nth(1).and_then(|l| l.split_whitespace().next()).expect("id").to_owned();
    let shown = ledger_ok(&app.config, &["dlq", "show", &id]);
    assert!(shown.contains("stray@example.com") && shown.contains("\"message.rendered.v1\""), "{shown}");

    // Redrive of dead-lettered messages sends it back once: as the rendered
    // message it carries, which the dispatcher then delivers.
    let dry = ledger_ok(&app.config, &["redrive", "--status", "dead-lettered", "--dry-run"]);
    assert!(dry.contains(&message.to_string()), "{dry}");
    let out = ledger_ok(&app.config, &["redrive", "--status", "dead-lettered", "--yes"]);
    assert!(out.contains("reprocessed 1 dead letter(s)"), "{out}");
    app.wait_for_status(&message.to_string(), "delivered").await;
    let again = ledger_ok(&app.config, &["dlq", "reprocess", &id, "--yes"]);
    assert!(again.contains("reprocessed before; skipped"), "{again}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.sink_deliveries(&message.to_string()), 1);
    let listed = ledger_ok(&app.config, &["dlq", "list"]);
    assert!(listed.contains("reprocessed"), "{listed}");
    let unknown = ledger_output(&app.config, &["dlq", "show", &Uuid::new_v4().to_string()]);
    assert!(!unknown.status.success());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_message_is_sent_again_only_when_redriven_and_production_refuses_without_yes() {
    let mut config = test_config();
    // The first call never answers; the provider is back for the second.
    config.sink.failures = vec![fail("black-hole", SinkFailureKind::Timeout, 1)];
    config.dispatcher.provider_timeout_ms = 300;
    config.dispatcher.claim_lease_secs = 2;
    let app = spawn_app_with(config).await;
    let body = json!({ "to": "black-hole@example.com", "from": "shop@example.com",
                       "content": { "subject": "S", "text": "T" } });
    let reply = app.post("/v1/messages", Some("hole"), &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.body["message_id"].as_str().expect("id").to_owned();
    app.wait_for_status(&id, "ambiguous").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.sink_deliveries(&id), 0, "held for reconciliation, not resent");

    let mut production = app.config.clone();
    production.mode = ledger_runtime::Mode::Production;
    let refused = ledger_output(&production, &["redrive", "--status", "ambiguous"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refused in production mode"), "{refused:?}");

    let out = ledger_ok(&app.config, &["redrive", "--status", "ambiguous", "--yes"]);
    assert!(out.contains("redriven 1 message(s): 1 as attempt 2"), "{out}");
    let row = app.wait_for_status(&id, "delivered").await;
    assert_eq!(row["attempts"], 2, "{row}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.sink_deliveries(&id), 1);
    app.stop().await;
}
