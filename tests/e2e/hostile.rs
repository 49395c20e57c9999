//! Hostile input. HTTP: random and malformed bodies, headers, paths and
//! sizes against every submitting endpoint of the ingest API — never a 5xx,
//! never a dropped connection (a panic), and a refused request produces
//! nothing on the log. Kafka: poison written straight to every topic the
//! roles consume — each record dead-lettered with its reason, and the
//! pipeline goes on.

use std::collections::HashSet;

use ledger_schemas::Topic;
use ledger_tests::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
struct Case {
    path: String,
    auth: Option<String>,
    idempotency_key: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        ".{0,40}".prop_map(Value::String),
        Just(json!("x@example.com")),
    ];
    leaf.prop_recursive(3, 40, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("to".to_owned()),
                    Just("content".to_owned()),
                    Just("recipients".to_owned()),
                    ".{0,12}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid single message with one field replaced by anything, or removed.
fn mutated_message() -> impl Strategy<Value = Vec<u8>> {
    let fields = ["to", "from", "content", "channel", "priority", "send_at", "variables", "template", "extra"];
    (proptest::sample::select(fields.to_vec()), proptest::option::of(json_value())).prop_map(|(field, value)| {
        let mut body = json!({ "to": "fuzz@example.com", "from": "shop@example.com",
                               "content": { "subject": "S {{ n }}", "text": "T" } });
        match value {
            Some(v) => body[field] = v,
            None => {
                body.as_object_mut().map(|o| o.remove(field));
            }
        }
        body.to_string().into_bytes()
    })
}

fn case(api_key: String) -> impl Strategy<Value = Case> {
    let paths = prop_oneof![
        Just("/v1/messages".to_owned()),
        Just("/v1/messages/batch".to_owned()),
        Just("/v1/campaigns".to_owned()),
        Just("/v1/templates".to_owned()),
        Just("/v1/suppressions".to_owned()),
        "[a-z0-9%./-]{0,40}".prop_map(|id| format!("/v1/campaigns/{id}/cancel")),
        proptest::sample::select(vec!["mailgun", "sendgrid", "ses", "push", "nope"])
            .prop_map(|s| format!("/v1/feedback/{s}")),
    ];
    let auth = prop_oneof![
        3 => Just(Some(format!("Bearer {api_key}"))),
        1 => Just(None),
        1 => ".{0,60}".prop_map(Some),
    ];
    let bodies = prop_oneof![
        3 => mutated_message(),
        2 => json_value().prop_map(|v| v.to_string().into_bytes()),
        2 => proptest::collection::vec(any::<u8>(), 0..600),
        1 => (1usize..4).prop_map(|mb| {
            let mut b = br#"{"to":"big@example.com","content":{"text":""#.to_vec();
            b.extend(std::iter::repeat_n(b'a', mb * 1024 * 1024));
            b.extend_from_slice(br#""}}"#);
            b
        }),
    ];
    let content_type = prop_oneof![
        4 => Just(Some("application/json".to_owned())),
        1 => Just(Some("application/x-ndjson".to_owned())),
        1 => Just(None),
        1 => "[ -~]{0,30}".prop_map(Some),
    ];
    let key = prop_oneof![4 => "[a-z0-9-]{1,20}".prop_map(Some), 1 => Just(None), 1 => ".{0,300}".prop_map(Some)];
    (paths, auth, key, content_type, bodies).prop_map(|(path, auth, idempotency_key, content_type, body)| Case {
        path,
        auth,
        idempotency_key,
        content_type,
        body,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_malformed_requests_never_get_a_5xx_and_a_refused_one_produces_nothing() {
    let app = spawn_roles(test_config(), false).await;
    let mut runner = TestRunner::deterministic();
    let strategy = case(app.api_key.clone());
    let mut accepted: HashSet<String> = HashSet::new();
    let mut statuses: std::collections::BTreeMap<u16, usize> = Default::default();
    // A connection of its own per request: the server closes one whose
    // oversized body it refused unread, as HTTP allows.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    for _ in 0..400 {
        let c = strategy.new_tree(&mut runner).expect("case").current();
        let mut request = http.post(app.url(&c.path)).body(c.body.clone());
        if let Some(a) = &c.auth {
            if let Ok(v) = reqwest::header::HeaderValue::from_str(a) {
                request = request.header("authorization", v);
            }
        }
        if let Some(k) = &c.idempotency_key {
            if let Ok(v) = reqwest::header::HeaderValue::from_str(k) {
                request = request.header("idempotency-key", v);
            }
        }
        if let Some(t) = &c.content_type {
            if let Ok(v) = reqwest::header::HeaderValue::from_str(t) {
                request = request.header("content-type", v);
            }
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("no answer (a panic?) to {c:?}: {e}"));
        let status = response.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        let kind = response.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_owned());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(
            status < 500,
            "{status} for {} {:?}: {body}",
            c.path,
            String::from_utf8_lossy(&c.body[..c.body.len().min(300)])
        );
        if (400..500).contains(&status) {
            assert_eq!(kind.as_deref(), Some("application/problem+json"), "{status} for {}: {body}", c.path);
            assert!(body["type"].is_string() && body["title"].is_string(), "{body}");
        }
        if status == 202 {
            if let Some(id) = body["intent_id"].as_str() {
                accepted.insert(id.to_owned());
            }
        }
    }
    eprintln!("statuses: {statuses:?}");
    assert!(statuses.keys().any(|s| (400..500).contains(s)), "the fuzzer reached the refusals");
    // Only accepted intents are on the log.
    let on_log = app.read_topic(Topic::Intents);
    for e in &on_log {
        assert!(accepted.contains(&e.intent_id.to_string()), "{} is on the log but was never accepted", e.intent_id);
    }
    report(&Checked {
        scenario: "hostile HTTP input (400 generated requests)".into(),
        accepted: accepted.len() as i64,
        replay_differences: -1,
        notes: format!(
            "random and malformed bodies, headers, paths and sizes; statuses {statuses:?}: no 5xx, every 4xx \
             problem+json; {} records on the intents log, all of accepted intents (the ingest API alone: \
             accepted, not delivered)",
            on_log.len()
        ),
        ..Default::default()
    });
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_on_every_consumed_topic_is_dead_lettered_with_its_reason_and_the_pipeline_goes_on() {
    let app = spawn_app().await;
    let producer = ledger_runtime::kafka::producer(&app.config).expect("producer");
    let now = chrono::Utc::now().to_rfc3339();
    let id = uuid::Uuid::new_v4().to_string();
    let poison: [(&str, Vec<u8>); 3] = [
        ("garbage", b"\x00\x01not json at all".to_vec()),
        (
            "a version no role knows",
            json!({ "event_id": id, "type": "message.rendered.v9", "data": {}, "tenant_id": "acme",
                    "intent_id": id, "occurred_at": now, "correlation_id": "poison" })
            .to_string()
            .into_bytes(),
        ),
        (
            "missing fields",
            json!({ "event_id": id, "type": "message.rendered.v1", "data": { "channel": "email" },
                    "tenant_id": "acme", "intent_id": id, "occurred_at": now, "correlation_id": "poison" })
            .to_string()
            .into_bytes(),
        ),
    ];
    // Each consumed by its role: intents (renderer), rendered and retries
    // (dispatcher), outcomes (projector).
    let topics = [Topic::Intents, Topic::Rendered, Topic::Retries, Topic::Outcomes];
    for topic in topics {
        for (what, payload) in &poison {
            let name = app.config.topic(topic);
            producer
                .send(
                    rdkafka::producer::FutureRecord::to(&name).key(*what).payload(payload),
                    std::time::Duration::from_secs(5),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("produce poison");
        }
    }
    let reply = app
        .post(
            "/v1/messages",
            Some("after-poison"),
            &json!({ "to": "after@example.com", "from": "shop@example.com",
                                                            "content": { "subject": "S", "text": "T" } }),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    app.wait_for_status(reply.body["message_id"].as_str().expect("id"), "delivered").await;

    let mut expected = std::collections::BTreeMap::new();
    for topic in topics {
        expected.insert((app.config.topic(topic), "malformed_event".to_owned()), 2i64);
        expected.insert((app.config.topic(topic), "unknown_event_type".to_owned()), 1i64);
    }
    let found = eventually("a dead letter for every poison record", std::time::Duration::from_secs(60), || async {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "-- tests::hostile::dead_letters
             SELECT source_topic, code, count(*) FROM dead_letters GROUP BY 1, 2",
        )
        .fetch_all(&app.reporting)
        .await
        .expect("query");
        let found: std::collections::BTreeMap<(String, String), i64> =
            rows.into_iter().map(|(t, c, n)| ((t, c), n)).collect();
        (found == expected).then_some(found)
    })
    .await;
    assert_eq!(found.values().sum::<i64>(), 12);
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM dead_letters").fetch_all(&app.reporting).await.unwrap();
    assert!(reasons.iter().all(|r| !r.is_empty()), "every dead letter says why: {reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("message.rendered.v9")), "{reasons:?}");
    report(&Checked {
        scenario: "poison and malformed events (every consumed topic)".into(),
        accepted: 1,
        delivered: 1,
        dead_lettered: found.values().sum::<i64>(),
        replay_differences: -1,
        notes: format!(
            "garbage bytes, an unknown event version and missing fields on each of {} topics (intents, rendered, \
             retries, outcomes): {} dead-lettered as malformed_event, {} as unknown_event_type, each with its \
             reason; a message sent after them was delivered",
            topics.len(),
            found.iter().filter(|((_, code), _)| code == "malformed_event").map(|(_, n)| n).sum::<i64>(),
            found.iter().filter(|((_, code), _)| code == "unknown_event_type").map(|(_, n)| n).sum::<i64>()
        ),
        ..Default::default()
    });
    app.stop().await;
}
