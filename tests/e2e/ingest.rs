//! The ingest API's forms, refusals, idempotency and tenant isolation.

use std::time::Duration;

use ledger_schemas::{EventBody, EventKind, Topic};
use ledger_tests::*;
use serde_json::{json, Value};

fn message(to: &str) -> Value {
    json!({ "to": to, "variables": { "name": "Ann" },
            "content": { "subject": "Hi {{ name }}", "text": "Hello {{ name }}" } })
}

async fn post_ndjson(app: &TestApp, key: &str, body: String) -> Reply {
    let response = app
        .http()
        .post(app.url("/v1/campaigns"))
        .bearer_auth(&app.api_key)
        .header("idempotency-key", key)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    Reply { status, headers, body: response.json().await.unwrap_or(Value::Null) }
}

fn campaign_header() -> Value {
    json!({ "name": "November news", "from": "news@example.com",
            "content": { "subject": "News for {{ name }}", "text": "Hello {{ name }}, item {{ n }}",
                         "html": "<p>Hello {{ name }}</p>" } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_accepts_each_valid_message_and_reports_each_invalid_one() {
    let app = spawn_app().await;
    let body = json!({ "messages": [message("a@example.com"), message("not an address"), message("b@example.com")] });
    let reply = app.post("/v1/messages/batch", Some("batch-1"), &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.body["accepted"], 2);
    assert_eq!(reply.body["rejected"], 1);
    let results = reply.body["results"].as_array().expect("results");
    assert_eq!(results[1]["status"], "rejected");
    assert_eq!(results[1]["errors"][0]["field"], "to");
    for i in [0, 2] {
        assert_eq!(results[i]["status"], "accepted");
        app.wait_for_status(results[i]["message_id"].as_str().expect("id"), "delivered").await;
    }
    assert_ne!(results[0]["intent_id"], results[2]["intent_id"], "independent messages are independent intents");

    let again = app.post("/v1/messages/batch", Some("batch-1"), &body).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.body, reply.body);
    // What is kept for the replay holds no accepted result: those are
    // derived again from the batch id and the request.
    let kept: Value = sqlx::query_scalar("SELECT response FROM idempotency_keys WHERE key = 'batch-1'")
        .fetch_one(&app.ops)
        .await
        .expect("kept response");
    assert!(kept.get("results").is_none(), "kept: {kept}");
    assert!(!kept.to_string().contains(results[0]["message_id"].as_str().expect("id")), "kept: {kept}");

    let all_bad = json!({ "messages": [message("x"), message("y")] });
    let refused = app.post("/v1/messages/batch", Some("batch-2"), &all_bad).await;
    assert_eq!(refused.status, 422);
    assert_eq!(refused.body["errors"][0]["field"], "messages[0].to");
    let too_many = json!({ "messages": vec![message("a@example.com"); 1001] });
    assert_eq!(app.post("/v1/messages/batch", Some("batch-3"), &too_many).await.status, 422);
    assert_eq!(app.post("/v1/messages/batch", Some("batch-4"), &json!({ "messages": [] })).await.status, 422);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_campaign_sends_each_distinct_recipient_once_and_reports_progress() {
    let app = spawn_app().await;
    let mut body = campaign_header();
    let mut recipients: Vec<Value> = (0..5)
        .map(|i| json!({ "address": format!("u{i}@example.com"), "variables": { "name": format!("U{i}"), "n": i } }))
        .collect();
    recipients.push(json!({ "address": "U0@Example.com", "variables": { "name": "again", "n": 0 } }));
    body["recipients"] = Value::from(recipients);
    let reply = app.post("/v1/campaigns", Some("camp-1"), &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.body["recipients"], 5);
    assert_eq!(reply.body["duplicates_ignored"], 1);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();

    let counts = app.wait_terminal(&intent, 5, Duration::from_secs(60)).await;
    assert_eq!(counts.get("delivered"), Some(&5));
    assert_eq!(app.sink_total(), 5);
    let status = eventually("a complete status", Duration::from_secs(30), || async {
        let s = app.get_as(&app.api_key, &format!("/v1/intents/{intent}")).await;
        (s.body["complete"] == true).then_some(s)
    })
    .await;
    assert_eq!(status.status, 200);
    assert_eq!(status.body["consistency"], "eventual");
    assert_eq!(status.body["kind"], "campaign");
    assert_eq!(status.body["name"], "November news");
    assert_eq!(status.body["messages"]["delivered"], 5);
    assert_eq!(status.headers["cache-control"], "no-store");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndjson_campaign_streams_into_bounded_batches_and_is_delivered() {
    let mut config = test_config();
    config.http.batch_max_recipients = 1000;
    let app = spawn_app_with(config).await;
    let mut body = campaign_header().to_string();
    for i in 0..2500 {
        body.push('\n');
        body.push_str(
            &json!({ "address": format!("p{i}@example.com"), "variables": { "name": format!("P{i}"), "n": i } })
                .to_string(),
        );
        // Repeats (the address normalised) inside and across batches: the
        // first line of each address is the one sent.
        if i % 700 == 699 {
            body.push('\n');
            body.push_str(
                &json!({ "address": format!("P{}@Example.COM", i - 1), "variables": { "n": -1 } }).to_string(),
            );
        }
    }
    body.push('\n');
    let reply = post_ndjson(&app, "nd-1", body.clone()).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.body["recipients"], 2500);
    assert_eq!(reply.body["duplicates_ignored"], 3);
    assert_eq!(reply.body["batches"], 3);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    let batches: Vec<_> =
        app.read_topic(Topic::Intents).into_iter().filter(|e| e.kind() == EventKind::RecipientBatch).collect();
    assert_eq!(batches.len(), 3);
    let sent: Vec<(String, Value)> = batches
        .iter()
        .flat_map(|e| match &e.body {
            EventBody::RecipientBatch(b) => {
                b.recipients.iter().map(|r| (r.address.clone(), r.variables["n"].clone())).collect::<Vec<_>>()
            }
            _ => Vec::new(),
        })
        .collect();
    let expected: Vec<(String, Value)> = (0..2500).map(|i| (format!("p{i}@example.com"), Value::from(i))).collect();
    assert_eq!(sent, expected, "each address once, in order, as its first line gave it");
    let counts = app.wait_terminal(&intent, 2500, Duration::from_secs(120)).await;
    assert_eq!(counts.get("delivered"), Some(&2500));
    // Each claim keeps the outcome event of its own message, recorded many
    // to a statement (published again from there if its record is read twice).
    let (claims, own): (i64, i64) = sqlx::query_as(
        "-- tests::claims_keep_their_own_outcome
         SELECT count(*), count(*) FILTER (WHERE outcome::jsonb ->> 'message_id' = message_id::text
                                            AND outcome::jsonb ->> 'type' = 'delivery.delivered.v1')
         FROM delivery_claims WHERE intent_id = $1::uuid AND state = 'done'",
    )
    .bind(&intent)
    .fetch_one(&app.ops)
    .await
    .expect("claims");
    assert_eq!((claims, own), (2500, 2500), "every claim done, each with its own message's outcome");

    let again = post_ndjson(&app, "nd-1", body.clone()).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.body["intent_id"], intent.as_str());
    assert_eq!(again.headers["idempotent-replayed"], "true");
    // The body's hash covers every byte up to the last one: one digit of
    // the last line changed is another body under the same key.
    let changed = body.replacen("\"n\":2499", "\"n\":2498", 1);
    assert_ne!(changed, body);
    let other = post_ndjson(&app, "nd-1", changed).await;
    assert_eq!(other.status, 409, "{}", other.body);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_with_one_bad_line_is_refused_whole_and_produces_nothing() {
    let app = spawn_roles(test_config(), false).await;
    let header = campaign_header().to_string();
    let good = json!({ "address": "ok@example.com" }).to_string();
    let cases = [
        (format!("{header}\n{good}\n{}\n", json!({ "address": "broken" })), 422, "line 3.address"),
        (format!("{header}\n{good}\n{{\"address\": \"x@example.com\", \"vars\": 1}}\n"), 422, "line 3.vars"),
        (format!("{good}\n"), 400, "line 1.address"),
        (format!("{header}\n"), 422, "recipients"),
        (format!("{header}\nnot json\n"), 422, "line 2"),
        (
            format!(
                "{header}\n{}\n",
                json!({ "address": "big@example.com", "variables": { "v": "x".repeat(20_000) } })
            ),
            422,
            "line 2.variables",
        ),
    ];
    for (i, (body, status, field)) in cases.into_iter().enumerate() {
        let reply = post_ndjson(&app, &format!("bad-{i}"), body).await;
        assert_eq!(reply.status, status, "case {i}: {}", reply.body);
        assert_eq!(reply.headers["content-type"], "application/problem+json");
        let fields: Vec<&str> =
            reply.body["errors"].as_array().expect("errors").iter().filter_map(|e| e["field"].as_str()).collect();
        assert!(fields.contains(&field), "case {i}: {fields:?} lacks {field}");
    }
    let mut json_campaign = campaign_header();
    json_campaign["recipients"] = json!([{ "address": "a@example.com" }]);
    json_campaign["send_at"] = json!("2099-01-01T00:00:00Z");
    let far = app.post("/v1/campaigns", Some("far"), &json_campaign).await;
    assert_eq!(far.status, 422);
    assert_eq!(far.body["errors"][0]["field"], "send_at");
    assert!(app.read_topic(Topic::Intents).is_empty(), "a refused campaign produced events");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_see_or_cancel_another_tenants_intents() {
    let app = spawn_app().await;
    let reply = app.post("/v1/messages", Some("mine"), &message("a@example.com")).await;
    assert_eq!(reply.status, 202);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    let message_id = reply.body["message_id"].as_str().expect("id").to_owned();
    app.wait_for_status(&message_id, "delivered").await;

    let mine = app.get_as(&app.api_key, &format!("/v1/messages/{message_id}")).await;
    assert_eq!(mine.status, 200);
    assert_eq!(mine.body["status"], "delivered");
    assert_eq!(mine.body["consistency"], "eventual");

    let other = app.other_tenant("globex").await;
    for path in
        [format!("/v1/intents/{intent}"), format!("/v1/messages/{message_id}"), "/v1/intents/not-a-uuid".to_owned()]
    {
        let r = app.get_as(&other, &path).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.body["type"], "urn:delivery-ledger:problem:not-found");
    }
    let cancel = app
        .http()
        .post(app.url(&format!("/v1/campaigns/{intent}/cancel")))
        .bearer_auth(&other)
        .send()
        .await
        .expect("request");
    assert_eq!(cancel.status(), 404);
    // The same idempotency key under another tenant is another intent.
    let theirs = app
        .http()
        .post(app.url("/v1/messages"))
        .bearer_auth(&other)
        .header("idempotency-key", "mine")
        .json(&message("a@example.com"))
        .send()
        .await
        .expect("request");
    assert_eq!(theirs.status(), 202);
    let theirs: Value = theirs.json().await.expect("json");
    assert_ne!(theirs["intent_id"], intent.as_str());
    assert_eq!(
        app.get_as(&app.api_key, &format!("/v1/intents/{}", theirs["intent_id"].as_str().expect("id"))).await.status,
        404
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_get_one_intent_and_one_delivery() {
    let app = spawn_app().await;
    let body = message("dup@example.com");
    let replies = futures::future::join_all((0..8).map(|_| app.post("/v1/messages", Some("same"), &body))).await;
    let ids: std::collections::BTreeSet<String> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, 202, "{}", r.body);
            r.body["message_id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    let message_id = ids.into_iter().next().expect("one id");
    app.wait_for_status(&message_id, "delivered").await;
    // Let any duplicate records drain through the pipeline, then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.sink_deliveries(&message_id), 1);
    app.stop().await;
}

/// Ingest records the response it gave without the answer waiting for it,
/// nor for its commit to reach the disk (`submit::record_accepted`). If ingest
/// or PostgreSQL crashes and the record is lost, the key is *pending* again:
/// a retry must get the same answer and cause no second delivery. Here the
/// record is taken away by hand, as such a crash would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_record_gives_the_same_answer_and_one_delivery() {
    let app = spawn_app().await;
    let relaxed = ledger_runtime::db::pool_without_commit_wait(&app.config.ops_database_url, 1).await.expect("pool");
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&relaxed).await.expect("show");
    assert_eq!(setting, "off", "the response record's pool does not wait for commits");
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&app.ops).await.expect("show");
    assert_eq!(setting, "on", "everything else does");

    let body = message("lost-record@example.com");
    let first = app.post("/v1/messages", Some("lost-record"), &body).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let message_id = first.body["message_id"].as_str().expect("id").to_owned();
    app.wait_for_status(&message_id, "delivered").await;
    let lost = sqlx::query(
        "UPDATE idempotency_keys SET state = 'pending', response = NULL WHERE key = 'lost-record' AND state = 'accepted'",
    )
    .execute(&app.ops)
    .await
    .expect("forget the response");
    assert_eq!(lost.rows_affected(), 1, "the response was recorded");

    let again = app.post("/v1/messages", Some("lost-record"), &body).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.body, first.body, "the same response, every id derived from the key");
    let other = app.post("/v1/messages", Some("lost-record"), &message("someone-else@example.com")).await;
    assert_eq!(other.status, 409, "the request hash survived: {}", other.body);
    // The retry records the response again, once it has answered.
    eventually("the response recorded again", Duration::from_secs(10), || async {
        let state: String = sqlx::query_scalar("SELECT state FROM idempotency_keys WHERE key = 'lost-record'")
            .fetch_one(&app.ops)
            .await
            .expect("state");
        (state == "accepted").then_some(())
    })
    .await;
    // The retry produced the same events again; let them drain, then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.sink_deliveries(&message_id), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_campaign_delivers_nothing_more_and_every_recipient_ends_terminal() {
    let mut config = test_config();
    config.sink.latency_ms = 20;
    config.identities[0].concurrency = 2;
    let app = spawn_app_with(config).await;
    let mut body = campaign_header();
    body["recipients"] = Value::from(
        (0..300)
            .map(|i| json!({ "address": format!("c{i}@example.com"), "variables": { "name": "C", "n": i } }))
            .collect::<Vec<_>>(),
    );
    let reply = app.post("/v1/campaigns", Some("to-cancel"), &body).await;
    assert_eq!(reply.status, 202);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    eventually("a first delivery", Duration::from_secs(30), || async { (app.sink_total() > 0).then_some(()) }).await;
    let cancel = app
        .http()
        .post(app.url(&format!("/v1/campaigns/{intent}/cancel")))
        .bearer_auth(&app.api_key)
        .json(&json!({ "reason": "wrong list" }))
        .send()
        .await
        .expect("request");
    assert_eq!(cancel.status(), 202);
    let delivered_at_cancel = app.sink_total();

    let counts = app.wait_terminal(&intent, 300, Duration::from_secs(60)).await;
    let delivered = counts.get("delivered").copied().unwrap_or(0);
    let cancelled = counts.get("cancelled").copied().unwrap_or(0);
    assert_eq!(delivered + cancelled, 300, "{counts:?}");
    assert!(cancelled > 0, "{counts:?}");
    // Only messages already in flight when the cancel returned may follow.
    let in_flight = 2;
    assert!(
        app.sink_total() <= delivered_at_cancel + in_flight,
        "{} > {delivered_at_cancel} + {in_flight}",
        app.sink_total()
    );
    assert_eq!(app.sink_total() as i64, delivered);
    let status = eventually("the cancellation in the read model", Duration::from_secs(30), || async {
        let s = app.get_as(&app.api_key, &format!("/v1/intents/{intent}")).await;
        s.body["cancelled_at"].is_string().then_some(s)
    })
    .await;
    assert_eq!(status.body["complete"], true);
    app.stop().await;
}

/// Peak resident memory of this process, in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300000_recipient_ndjson_campaign_is_accepted_without_holding_the_body() {
    let app = spawn_roles(test_config(), false).await;
    const N: usize = 300_000;
    let padding = "x".repeat(300);
    let header = campaign_header().to_string();
    // The body is generated as it is sent, so the test holds none of it.
    let lines = futures::stream::iter((0..=N).map(move |i| {
        let line = if i == 0 {
            header.clone()
        } else {
            json!({ "address": format!("r{i}@example.com"), "variables": { "name": format!("R{i}"), "n": i, "bio": padding } }).to_string()
        };
        Ok::<_, std::io::Error>(format!("{line}\n"))
    }));
    let body_bytes: usize = N * 360;
    let before = peak_rss_kib();
    let response = app
        .http()
        .post(app.url("/v1/campaigns"))
        .bearer_auth(&app.api_key)
        .header("idempotency-key", "big")
        .header("content-type", "application/x-ndjson")
        .body(reqwest::Body::wrap_stream(lines))
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 202);
    let reply: Value = response.json().await.expect("json");
    assert_eq!(reply["recipients"], N);
    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    let body_mib = (body_bytes / (1 << 20)) as u64;
    println!("body ≈ {body_mib} MiB, peak RSS grew {grown_mib} MiB");
    assert!(grown_mib < body_mib / 2, "peak RSS grew {grown_mib} MiB for a {body_mib} MiB body");
    app.stop().await;
}
