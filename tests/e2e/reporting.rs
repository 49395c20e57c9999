//! The read model people query: counts that match the rows, replays that
//! change nothing, and the documented queries.

use std::time::Duration;

use ledger_projections::{store, Fold};
use ledger_schemas::{Event, Topic};
use ledger_tests::*;
use serde_json::{json, Value};

/// A campaign with deliveries, sandbox suppressions and a render failure.
async fn run_campaign(app: &TestApp) -> String {
    let mut recipients: Vec<Value> = (0..18)
        .map(|i| json!({ "address": format!("r{i}@example.com"), "variables": { "name": format!("R{i}") } }))
        .collect();
    recipients.push(json!({ "address": "outside@elsewhere.test", "variables": { "name": "O" } }));
    recipients.push(json!({ "address": "nameless@example.com" }));
    let reply = app
        .post("/v1/campaigns", Some("report-1"), &json!({ "name": "report", "content": { "subject": "Hi {{ name }}", "text": "x" }, "recipients": recipients }))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    let counts = app.wait_terminal(&intent, 20, Duration::from_secs(60)).await;
    assert_eq!(counts.get("delivered"), Some(&18), "{counts:?}");
    intent
}

async fn snapshot(pool: &sqlx::PgPool, table: &str, order: &str) -> Value {
    sqlx::query_scalar(&format!("SELECT COALESCE(jsonb_agg(to_jsonb(t) ORDER BY {order}), '[]') FROM {table} t"))
        .fetch_one(pool)
        .await
        .expect("snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_counts_match_the_rows_and_a_replay_of_the_log_changes_nothing() {
    let app = spawn_app().await;
    let intent = run_campaign(&app).await;
    let id = uuid::Uuid::parse_str(&intent).expect("uuid");
    // Let the last outcomes settle into every table.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let from_rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM messages WHERE intent_id = $1 GROUP BY status ORDER BY status")
            .bind(id)
            .fetch_all(&app.reporting)
            .await
            .expect("rows");
    let maintained: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, messages FROM intent_status_counts WHERE intent_id = $1 AND messages <> 0 ORDER BY status",
    )
    .bind(id)
    .fetch_all(&app.reporting)
    .await
    .expect("counts");
    assert_eq!(maintained, from_rows);
    assert_eq!(from_rows, vec![("delivered".into(), 18), ("render_failed".into(), 1), ("suppressed".into(), 1)]);
    let progress: (i64, i64, i64, i64) =
        sqlx::query_as("SELECT terminal, delivered, failed, suppressed FROM campaign_progress WHERE intent_id = $1")
            .bind(id)
            .fetch_one(&app.reporting)
            .await
            .expect("progress");
    assert_eq!(progress, (20, 18, 1, 1));
    let (started, finished): (Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT started_at, finished_at FROM campaign_progress WHERE intent_id = $1")
            .bind(id)
            .fetch_one(&app.reporting)
            .await
            .expect("times");
    assert!(started.is_some() && finished >= started, "{started:?} {finished:?}");
    let attempts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM delivery_attempts WHERE intent_id = $1 AND outcome = 'delivered'")
            .bind(id)
            .fetch_one(&app.reporting)
            .await
            .expect("attempts");
    assert_eq!(attempts, 18);
    let hourly: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(messages), 0)::bigint FROM tenant_hourly WHERE tenant_id = 'acme'")
            .fetch_one(&app.reporting)
            .await
            .expect("hourly");
    assert_eq!(hourly, 20);
    // Through the one sender identity: the 18 delivered (the suppressed and
    // the render failure never reached one).
    let by_identity: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT identity, status, sum(messages)::bigint FROM identity_hourly GROUP BY 1, 2")
            .fetch_all(&app.reporting)
            .await
            .expect("identity_hourly");
    assert_eq!(by_identity, vec![("local-sink".into(), "delivered".into(), 18)]);

    let tables = [
        ("messages", "message_id"),
        ("delivery_attempts", "message_id, attempt"),
        ("intent_status_counts", "intent_id, status"),
        ("tenant_hourly", "tenant_id, hour, status"),
        ("identity_hourly", "identity, hour, status"),
        ("intents", "intent_id"),
    ];
    let mut before = Vec::new();
    for (t, o) in tables {
        before.push(snapshot(&app.reporting, t, o).await);
    }
    // Replay the whole log: once as one batch, once event by event in
    // reverse order.
    let mut events: Vec<Event> = Vec::new();
    for topic in [Topic::Intents, Topic::Rendered, Topic::Outcomes] {
        events.extend(app.read_topic(topic));
    }
    // Header and batch, 20 rendered or failed, 18 attempted, 18 delivered, 1 suppressed.
    assert_eq!(events.len(), 59);
    let mut fold = Fold::default();
    events.iter().for_each(|e| fold.add(e));
    let mut tx = app.reporting.begin().await.expect("tx");
    store::apply(&mut tx, &fold).await.expect("replay");
    tx.commit().await.expect("commit");
    for e in events.iter().rev() {
        let mut one = Fold::default();
        one.add(e);
        let mut tx = app.reporting.begin().await.expect("tx");
        store::apply(&mut tx, &one).await.expect("replay one");
        tx.commit().await.expect("commit");
    }
    for ((t, o), was) in tables.iter().zip(before) {
        assert_eq!(snapshot(&app.reporting, t, o).await, was, "{t} changed on replay");
    }
    app.stop().await;
}

/// The SQL blocks of docs/reporting.md.
fn documented_queries() -> Vec<String> {
    let doc = include_str!("../../docs/reporting.md");
    doc.split("```sql").skip(1).filter_map(|block| block.split("```").next()).map(|q| q.trim().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_query_in_the_docs_runs_as_the_reporting_role() {
    let app = spawn_app().await;
    run_campaign(&app).await;
    let queries = documented_queries();
    assert!(queries.len() >= 10, "only {} example queries", queries.len());
    let mut answered = 0;
    for q in &queries {
        let mut tx = app.reporting.begin().await.expect("tx");
        sqlx::query("SET LOCAL ROLE ledger_reporter").execute(&mut *tx).await.expect("role");
        let rows = sqlx::query(q).fetch_all(&mut *tx).await.unwrap_or_else(|e| panic!("{q}\n failed: {e}"));
        answered += usize::from(!rows.is_empty());
        tx.rollback().await.expect("rollback");
    }
    assert!(answered >= 8, "only {answered} of {} queries returned rows", queries.len());

    // The role reads; it cannot write.
    let mut tx = app.reporting.begin().await.expect("tx");
    sqlx::query("SET LOCAL ROLE ledger_reporter").execute(&mut *tx).await.expect("role");
    let denied = sqlx::query("DELETE FROM messages").execute(&mut *tx).await.expect_err("a reporter deleted rows");
    assert_eq!(denied.as_database_error().and_then(|e| e.code()).as_deref(), Some("42501"), "{denied}");
    tx.rollback().await.ok();
    app.stop().await;
}
