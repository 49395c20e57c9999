//! One message end to end, and the invariants it rests on.

use std::time::Duration;

use ledger_schemas::{EventBody, EventKind, Topic};
use ledger_tests::*;
use serde_json::{json, Value};

fn email(to: &str) -> Value {
    json!({
        "to": to,
        "from": "shop@example.com",
        "variables": { "name": "Ann <3" },
        "content": {
            "subject": "Your order, {{ name }}",
            "text": "Hello {{ name }}",
            "html": "<p>Hello {{ name }}</p>"
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_accepted_delivered_once_and_projected() {
    let app = spawn_app().await;
    let first = app.post("/v1/messages", Some("order-1"), &email("ann@example.com")).await;
    assert_eq!(first.status, 202, "{:?}", first.body);
    let intent_id = first.body["intent_id"].as_str().expect("intent id").to_owned();
    let message_id = first.body["message_id"].as_str().expect("message id").to_owned();
    assert_eq!(first.headers["location"], format!("/v1/intents/{intent_id}").as_str());

    let row = app.wait_for_status(&message_id, "delivered").await;
    assert_eq!(row["intent_id"], intent_id.as_str());
    assert_eq!(row["tenant_id"], "acme");
    assert_eq!(row["recipient"], "ann@example.com");
    assert_eq!(row["attempts"], 1);
    for stage in ["accepted_at", "rendered_at", "first_attempt_at", "delivered_at"] {
        assert!(row[stage].is_string(), "{stage} missing in {row}");
    }
    assert!(row["provider_message_id"].as_str().unwrap_or_default().starts_with("sink-"));
    assert_eq!(app.sink_deliveries(&message_id), 1);

    let metrics = app.http().get(app.url("/metrics")).send().await.expect("metrics").text().await.expect("body");
    let delivered = metrics
        .lines()
        .find(|l| l.starts_with("ledger_deliveries_total") && l.contains("outcome=\"delivered\""))
        .unwrap_or_else(|| panic!("no delivered counter in:\n{metrics}"));
    assert!(delivered.ends_with(" 1"), "{delivered}");
    // Every consuming role reports its lag per partition (every 5 s).
    let lag = eventually("consumer lag series", Duration::from_secs(20), || async {
        let text = app.http().get(app.url("/metrics")).send().await.ok()?.text().await.ok()?;
        let groups = ["renderer", "dispatcher", "projector"];
        groups.iter().all(|g| text.contains(&format!("ledger_consumer_lag_records{{group=\"{g}\""))).then_some(text)
    })
    .await;
    assert!(lag.contains("ledger_render_batch_seconds"), "render latency histogram missing");

    // The rendered message reached the provider with its variables merged
    // and escaped in the HTML part.
    let rendered = app
        .read_topic(Topic::Rendered)
        .into_iter()
        .find_map(|e| match e.body {
            EventBody::MessageRendered(m) => Some(m),
            _ => None,
        })
        .expect("rendered event");
    assert_eq!(rendered.subject.as_deref(), Some("Your order, Ann <3"));
    assert_eq!(rendered.html.as_deref(), Some("<p>Hello Ann &lt;3</p>"));

    // The same request again: the same ids, flagged as a replay, no new events.
    let intents_before = app.read_topic(Topic::Intents).len();
    let again = app.post("/v1/messages", Some("order-1"), &email("ann@example.com")).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.body["intent_id"], intent_id.as_str());
    assert_eq!(again.body["message_id"], message_id.as_str());
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(app.read_topic(Topic::Intents).len(), intents_before);
    assert_eq!(app.sink_deliveries(&message_id), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_intent_renders_the_same_message_and_sends_it_once() {
    let app = spawn_app().await;
    let reply = app.post("/v1/messages", Some("k"), &email("bob@example.com")).await;
    assert_eq!(reply.status, 202);
    let message_id = reply.body["message_id"].as_str().expect("id").to_owned();
    app.wait_for_status(&message_id, "delivered").await;

    // Replay the intent's recipient batch as a crash before the renderer's
    // offset commit would: same key, same bytes.
    let producer = ledger_runtime::kafka::producer(&app.config).expect("producer");
    let batch =
        app.read_topic(Topic::Intents).into_iter().find(|e| e.kind() == EventKind::RecipientBatch).expect("batch");
    ledger_runtime::kafka::send_event(&producer, &app.config, Topic::Intents, &batch.intent_id.to_string(), &batch)
        .await
        .expect("produce");

    // The dispatcher sees the message again, finds its claim, and publishes
    // the recorded outcome again instead of calling the provider.
    let delivered_events = |events: Vec<ledger_schemas::Event>| {
        events
            .into_iter()
            .filter(|e| {
                e.kind() == EventKind::Delivered && e.message_id.map(|m| m.to_string()) == Some(message_id.clone())
            })
            .collect::<Vec<_>>()
    };
    let events = eventually("the re-published outcome", Duration::from_secs(30), || async {
        let d = delivered_events(app.read_topic(Topic::Outcomes));
        (d.len() >= 2).then_some(d)
    })
    .await;
    assert_eq!(events[0].event_id, events[1].event_id, "the outcome is the same fact, with the same id");
    assert_eq!(app.sink_deliveries(&message_id), 1, "the provider was called once");
    let rendered: Vec<_> = app
        .read_topic(Topic::Rendered)
        .into_iter()
        .filter(|e| e.message_id.map(|m| m.to_string()) == Some(message_id.clone()))
        .collect();
    assert_eq!(rendered.len(), 2);
    assert_eq!(rendered[0].event_id, rendered[1].event_id, "re-rendering yields the same message and event ids");
    let row = app.wait_for_status(&message_id, "delivered").await;
    assert_eq!(row["attempts"], 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_body_is_refused_with_409() {
    let app = spawn_app().await;
    assert_eq!(app.post("/v1/messages", Some("k1"), &email("ann@example.com")).await.status, 202);
    let conflict = app.post("/v1/messages", Some("k1"), &email("someone.else@example.com")).await;
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.headers["content-type"], "application/problem+json");
    assert_eq!(conflict.body["type"], "urn:delivery-ledger:problem:idempotency-conflict");
    // Reformatting the same body is the same request, not a conflict.
    let same = app.post("/v1/messages", Some("k1"), &email("ann@example.com")).await;
    assert_eq!(same.status, 202);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_production_a_recipient_not_on_the_allow_list_is_suppressed() {
    let app = spawn_app().await;
    let reply = app.post("/v1/messages", Some("qa-1"), &email("real.person@gmail.com")).await;
    assert_eq!(reply.status, 202);
    let message_id = reply.body["message_id"].as_str().expect("id").to_owned();
    let row = app.wait_for_status(&message_id, "suppressed").await;
    assert_eq!(row["last_error_code"], "sandbox");
    assert_eq!(app.sink_deliveries(&message_id), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_problem_json_and_produce_nothing() {
    let mut config = test_config();
    // Small, so the oversize body below is sent whole before the refusal
    // (a multi-megabyte one can be cut off by the early 413).
    config.http.max_body_bytes = 64 << 10;
    let app = spawn_app_with(config).await;
    let cases: Vec<(Option<&str>, Value, u16, &str)> = vec![
        (None, email("ann@example.com"), 400, "idempotency-key"),
        (Some("b1"), email("not-an-address"), 422, "validation"),
        (
            Some("b2"),
            json!({"to": "ann@example.com", "content": {"subject": "s", "text": "t"}, "cc": "x"}),
            400,
            "invalid-body",
        ),
        (Some("b3"), json!({"to": "ann@example.com", "content": {"text": "t"}}), 422, "validation"),
        (Some("b4"), json!({"to": "ann@example.com", "content": {"subject": "s"}}), 422, "validation"),
        (Some("b5"), json!([1, 2]), 400, "invalid-body"),
    ];
    for (key, body, status, code) in cases {
        let reply = app.post("/v1/messages", key, &body).await;
        assert_eq!(reply.status, status, "{body} gave {:?}", reply.body);
        assert_eq!(reply.headers["content-type"], "application/problem+json");
        assert_eq!(reply.body["type"], format!("urn:delivery-ledger:problem:{code}").as_str());
        assert!(reply.body["title"].is_string() && reply.body["detail"].is_string());
    }
    let invalid = app.post("/v1/messages", Some("b1"), &email("not-an-address")).await;
    assert_eq!(invalid.body["errors"][0]["field"], "to");

    // Wrong key, and a body too large.
    let unauthorised = app
        .http()
        .post(app.url("/v1/messages"))
        .bearer_auth("lk_wrong")
        .header("idempotency-key", "x")
        .json(&email("ann@example.com"))
        .send()
        .await
        .expect("request");
    assert_eq!(unauthorised.status(), 401);
    let mut huge = email("ann@example.com");
    huge["content"]["text"] = Value::String("x".repeat(100 << 10));
    assert_eq!(app.post("/v1/messages", Some("b6"), &huge).await.status, 413);
    let not_json = app
        .http()
        .post(app.url("/v1/messages"))
        .bearer_auth(&app.api_key)
        .header("idempotency-key", "b7")
        .body("to=ann@example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(not_json.status(), 415);

    assert!(app.read_topic(Topic::Intents).is_empty(), "a refused request produced an event");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_202_means_the_broker_has_the_intent_and_no_ack_means_no_202() {
    let app = spawn_app().await;
    let reply = app.post("/v1/messages", Some("durable"), &email("ann@example.com")).await;
    assert_eq!(reply.status, 202);
    // Read straight from the log, bypassing every consumer: both records of
    // the intent are there already.
    let intent_id = reply.body["intent_id"].as_str().expect("id");
    let on_log: Vec<_> =
        app.read_topic(Topic::Intents).into_iter().filter(|e| e.intent_id.to_string() == intent_id).collect();
    assert_eq!(on_log.len(), 2, "intent header and recipient batch");

    // An ingest whose broker never answers must not say 202.
    let mut config = app.config.clone();
    config.kafka.brokers = "127.0.0.1:1".into();
    config.kafka.produce_timeout_ms = 1_500;
    let unreachable = ledger_ingest::build(&config).await.expect("build");
    let addr = unreachable.local_addr();
    let shutdown = ledger_runtime::Shutdown::new();
    let server = tokio::spawn(unreachable.run(shutdown.clone()));
    let response = app
        .http()
        .post(format!("http://{addr}/v1/messages"))
        .bearer_auth(&app.api_key)
        .header("idempotency-key", "no-broker")
        .json(&email("ann@example.com"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let problem: Value = response.json().await.expect("json");
    assert_eq!(problem["type"], "urn:delivery-ledger:problem:broker-unavailable");

    // Retrying the same key once the broker is back is accepted.
    let retried = app.post("/v1/messages", Some("no-broker"), &email("ann@example.com")).await;
    assert_eq!(retried.status, 202);
    assert!(retried.headers.get("idempotent-replayed").is_none());
    shutdown.trigger();
    server.await.expect("join").expect("serve");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_dead_lettered_and_the_pipeline_goes_on() {
    let app = spawn_app().await;
    let producer = ledger_runtime::kafka::producer(&app.config).expect("producer");
    let topic = app.config.topic(Topic::Intents);
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&topic).key("garbage").payload(&b"\x00\x01not json"[..]),
            Duration::from_secs(5),
        )
        .await
        .expect("produce garbage");

    let reply = app.post("/v1/messages", Some("after-poison"), &email("ann@example.com")).await;
    assert_eq!(reply.status, 202);
    app.wait_for_status(reply.body["message_id"].as_str().expect("id"), "delivered").await;

    let dead = eventually("the dead letter in the read model", Duration::from_secs(30), || async {
        sqlx::query_as::<_, (String, String, String)>("SELECT code, consumer, source_topic FROM dead_letters")
            .fetch_optional(&app.reporting)
            .await
            .expect("query")
    })
    .await;
    assert_eq!(dead.0, "malformed_event");
    assert!(dead.1.ends_with("renderer"));
    assert_eq!(dead.2, topic);
    app.stop().await;
}
