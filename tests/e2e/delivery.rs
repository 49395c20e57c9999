//! Delivery: failure classes and retries, suppression, the governor shared
//! by tenants and by dispatcher instances, and the webhook and SMTP
//! providers against real local servers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ledger_runtime::{IdentityConfig, ProviderKind, SinkFailure, SinkFailureKind};
use ledger_schemas::{Channel, ConsumerGroup, EventBody, Topic};
use ledger_tests::*;
use serde_json::{json, Value};

fn email(to: &str) -> Value {
    json!({ "to": to, "from": "shop@example.com",
            "content": { "subject": "Hello", "text": "Hello there" } })
}

fn fail(recipient_contains: &str, kind: SinkFailureKind, attempts: u32) -> SinkFailure {
    SinkFailure { recipient_contains: recipient_contains.into(), kind, attempts }
}

/// The delivery outcomes of one message on the log, in order.
fn outcomes(app: &TestApp, message_id: &str) -> Vec<EventBody> {
    app.read_topic(Topic::Outcomes)
        .into_iter()
        .filter(|e| e.message_id.map(|m| m.to_string()).as_deref() == Some(message_id))
        .map(|e| e.body)
        .collect()
}

async fn send(app: &TestApp, key: &str, body: &Value) -> String {
    let reply = app.post("/v1/messages", Some(key), body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    reply.body["message_id"].as_str().expect("message id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_later_then_delivered_once() {
    let mut config = test_config();
    config.sink.failures = vec![fail("flaky", SinkFailureKind::Transient, 2)];
    config.dispatcher.retry_backoff_ms = 200;
    let app = spawn_app_with(config).await;
    let id = send(&app, "flaky-1", &email("flaky@example.com")).await;
    let row = app.wait_for_status(&id, "delivered").await;
    assert_eq!(row["attempts"], 3, "{row}");
    assert_eq!(app.sink_deliveries(&id), 1);

    let failures: Vec<_> = outcomes(&app, &id)
        .into_iter()
        .filter_map(|b| match b {
            EventBody::DeliveryFailed(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 2, "{failures:?}");
    for (i, f) in failures.iter().enumerate() {
        assert_eq!(f.attempt, i as u32 + 1);
        assert!(!f.permanent);
        assert_eq!(f.code, "sink_451");
        assert_eq!(f.identity.as_deref(), Some("local-sink"));
        assert!(f.retry_at.is_some(), "a retried failure says when the next attempt is due");
    }
    // The second wait is about twice the first (200 ms, then 400 ms, plus
    // at most a quarter of jitter).
    let retries = read_topic_raw(&app.config, Topic::Retries);
    assert_eq!(retries.len(), 2, "one retry record per retry");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_out_and_a_permanent_refusal_fails_at_once() {
    let mut config = test_config();
    config.sink.failures =
        vec![fail("always-busy", SinkFailureKind::Transient, 0), fail("no-such", SinkFailureKind::Permanent, 0)];
    let app = spawn_app_with(config).await;
    let busy = send(&app, "busy", &email("always-busy@example.com")).await;
    let gone = send(&app, "gone", &email("no-such@example.com")).await;
    let ok = send(&app, "ok", &email("fine@example.com")).await;

    let row = app.wait_for_status(&busy, "failed").await;
    assert_eq!(row["attempts"], 3, "max_attempts is 3: {row}");
    assert_eq!(row["last_error_code"], "sink_451");
    let row = app.wait_for_status(&gone, "failed").await;
    assert_eq!(row["attempts"], 1, "a permanent refusal is not retried: {row}");
    assert_eq!(row["last_error_code"], "sink_550");
    app.wait_for_status(&ok, "delivered").await;
    assert_eq!((app.sink_deliveries(&busy), app.sink_deliveries(&gone), app.sink_deliveries(&ok)), (0, 0, 1));
    let last = outcomes(&app, &busy).into_iter().rev().find_map(|b| match b {
        EventBody::DeliveryFailed(f) => Some(f),
        _ => None,
    });
    let last = last.expect("a failure");
    assert!(last.permanent && last.retry_at.is_none(), "{last:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_never_answers_is_ambiguous_and_not_resent_blindly() {
    let mut config = test_config();
    config.sink.failures = vec![fail("black-hole", SinkFailureKind::Timeout, 0)];
    config.dispatcher.provider_timeout_ms = 300;
    config.dispatcher.claim_lease_secs = 2;
    let app = spawn_app_with(config).await;
    let id = send(&app, "hole", &email("black-hole@example.com")).await;
    let row = app.wait_for_status(&id, "ambiguous").await;
    assert_eq!(row["attempts"], 1);
    let state: String =
        sqlx::query_scalar("-- tests::claim_state\nSELECT state FROM delivery_claims WHERE message_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.ops)
            .await
            .expect("claim");
    assert_eq!(state, "ambiguous");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = outcomes(&app, &id).iter().filter(|b| matches!(b, EventBody::DeliveryAttempted(_))).count();
    assert_eq!(attempts, 1, "the sink honours no idempotency key, so there is no second call");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suppressed_recipient_gets_a_suppressed_outcome_until_the_suppression_is_lifted() {
    let app = spawn_app().await;
    let add = app
        .post("/v1/suppressions", None, &json!({ "recipients": ["Gone@Example.com"], "reason": "unsubscribe" }))
        .await;
    assert_eq!(add.status, 200, "{}", add.body);
    assert_eq!(add.body["added"], 1);
    let again =
        app.post("/v1/suppressions", None, &json!({ "recipients": ["gone@example.com"], "reason": "complaint" })).await;
    assert_eq!((again.body["added"].as_u64(), again.body["already_suppressed"].as_u64()), (Some(0), Some(1)));

    let id = send(&app, "to-gone", &email("gone@example.com")).await;
    let row = app.wait_for_status(&id, "suppressed").await;
    assert_eq!(app.sink_deliveries(&id), 0);
    assert!(row["suppressed_at"].is_string(), "{row}");
    let reason = outcomes(&app, &id).into_iter().find_map(|b| match b {
        EventBody::Suppressed(s) => Some(s.reason),
        _ => None,
    });
    assert_eq!(reason, Some(ledger_schemas::SuppressionReason::SuppressionList));

    let shown = app.get_as(&app.api_key, "/v1/suppressions/gone@example.com").await;
    assert_eq!((shown.status, shown.body["reason"].as_str()), (200, Some("unsubscribe")));
    let other = app.other_tenant("globex").await;
    assert_eq!(app.get_as(&other, "/v1/suppressions/gone@example.com").await.status, 404, "tenants' lists are apart");

    let bad = app.post("/v1/suppressions", None, &json!({ "recipients": [], "reason": "unsubscribe" })).await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.body["errors"][0]["field"], "recipients");
    let bad = app.post("/v1/suppressions", None, &json!({ "recipients": ["a@example.com"], "reason": "bored" })).await;
    assert_eq!(bad.status, 400);

    let lifted = app
        .http()
        .delete(app.url("/v1/suppressions/GONE@example.com"))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .expect("delete");
    assert_eq!(lifted.status(), 204);
    let id = send(&app, "to-gone-again", &email("gone@example.com")).await;
    app.wait_for_status(&id, "delivered").await;
    app.stop().await;
}

/// Positions in the sink's delivery order of recipients containing `needle`.
fn positions(app: &TestApp, needle: &str) -> Vec<usize> {
    ledger_dispatcher::sink::read_deliveries(&app.config.sink.dir)
        .expect("sink")
        .iter()
        .enumerate()
        .filter(|(_, r)| r.recipient.contains(needle))
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_is_shared_fairly_between_tenants_and_transactional_mail_goes_first() {
    let mut config = test_config();
    let mut identity = IdentityConfig::new("shared", ProviderKind::Sink);
    identity.per_second = 20;
    identity.burst = 1;
    config.identities = vec![identity];
    let app = spawn_app_with(config).await;
    let recipients: Vec<Value> =
        (0..120).map(|i| json!({ "address": format!("bulk-{i}@example.com"), "variables": {} })).collect();
    let campaign = json!({ "name": "big", "from": "news@example.com", "priority": "bulk",
                           "content": { "subject": "News", "text": "News" }, "recipients": recipients });
    let reply = app.post("/v1/campaigns", Some("big"), &campaign).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let big = reply.body["intent_id"].as_str().expect("id").to_owned();
    eventually("the campaign under way", Duration::from_secs(30), || async { (app.sink_total() >= 5).then_some(()) })
        .await;
    let started = app.sink_total();

    // Another tenant's bulk mail, and the first tenant's transactional mail.
    let beta = app.other_tenant("beta").await;
    let batch = json!({ "messages": (0..10).map(|i| json!({ "to": format!("beta-{i}@example.com"), "priority": "bulk",
        "content": { "subject": "B", "text": "B" } })).collect::<Vec<_>>() });
    assert_eq!(app.post_as(&beta, "/v1/messages/batch", Some("beta"), &batch).await.status, 202);
    for i in 0..5 {
        let body = json!({ "to": format!("receipt-{i}@example.com"), "priority": "transactional",
                           "content": { "subject": "Receipt", "text": "R" } });
        send(&app, &format!("receipt-{i}"), &body).await;
    }
    // Counted from when the last of them was accepted: on a loaded machine
    // the submissions themselves take a while, and the campaign goes on.
    let submitted = app.sink_total();
    app.wait_terminal(&big, 120, Duration::from_secs(60)).await;
    eventually("every message delivered", Duration::from_secs(30), || async {
        (app.sink_total() == 135).then_some(())
    })
    .await;

    let receipts = positions(&app, "receipt-");
    let betas = positions(&app, "beta-");
    let bulk_after: Vec<usize> = positions(&app, "bulk-").into_iter().filter(|p| *p > started).collect();
    assert!(bulk_after.len() > 60, "the campaign still had most of its recipients waiting");
    // Transactional mail overtakes the waiting bulk mail at once...
    let last_receipt = *receipts.iter().max().expect("receipts");
    assert!(last_receipt < submitted + 25, "receipts at {receipts:?}, all accepted by delivery {submitted}");
    // ...and the second tenant takes turns with the first instead of
    // waiting behind the 100-odd messages it queued earlier.
    let last_beta = *betas.iter().max().expect("betas");
    assert!(last_beta < submitted + 50, "beta at {betas:?}, accepted by delivery {submitted}");
    assert!(*bulk_after.iter().max().expect("bulk") > last_beta, "the first tenant's bulk mail went on afterwards");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatcher_instances_together_stay_within_the_identity_rate() {
    let mut config = test_config();
    let mut identity = IdentityConfig::new("limited", ProviderKind::Sink);
    identity.per_second = 25;
    identity.burst = 1;
    config.identities = vec![identity];
    let app = spawn_app_with(config.clone()).await;
    let second = ledger_dispatcher::build(&config).await.expect("second dispatcher");
    let shutdown = app.shutdown.clone();
    let second = tokio::spawn(async move { second.run(shutdown).await });
    // Small campaigns first, until both instances have delivered some: the
    // second's join (and the rebalance it brings) can take longer on a
    // loaded machine than the 4 s the measured campaign's calls take.
    let both = || async {
        let n: i64 = sqlx::query_scalar(
            "-- tests::instances\nSELECT count(DISTINCT claimed_by) FROM delivery_claims WHERE state = 'done'",
        )
        .fetch_one(&app.ops)
        .await
        .expect("instances");
        n
    };
    for k in 0.. {
        if both().await == 2 {
            break;
        }
        assert!(k < 30, "the second dispatcher took part within 30 probes");
        let probe: Vec<Value> =
            (0..10).map(|i| json!({ "address": format!("p{k}-{i}@example.com"), "variables": {} })).collect();
        let campaign = json!({ "name": format!("probe-{k}"), "from": "news@example.com",
                               "content": { "subject": "S", "text": "T" }, "recipients": probe });
        let reply = app.post("/v1/campaigns", Some(&format!("probe-{k}")), &campaign).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
        app.wait_terminal(&intent, 10, Duration::from_secs(60)).await;
    }

    let recipients: Vec<Value> =
        (0..100).map(|i| json!({ "address": format!("r{i}@example.com"), "variables": {} })).collect();
    let campaign = json!({ "name": "limited", "from": "news@example.com",
                           "content": { "subject": "S", "text": "T" }, "recipients": recipients });
    let reply = app.post("/v1/campaigns", Some("limited"), &campaign).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    let counts = app.wait_terminal(&intent, 100, Duration::from_secs(60)).await;
    assert_eq!(counts.get("delivered"), Some(&100), "{counts:?}");

    let deliveries = ledger_dispatcher::sink::read_deliveries(&app.config.sink.dir).expect("sink");
    let mut times: Vec<_> = deliveries.iter().filter(|r| r.recipient.starts_with('r')).map(|r| r.received_at).collect();
    times.sort();
    assert_eq!(times.len(), 100);
    let mut all: Vec<_> = deliveries.iter().map(|r| r.received_at).collect();
    all.sort();
    // At 25 calls a second with a burst of 1, the 100 calls take at least
    // (100 − 1) / 25 s, and no second-long window holds many more than 26
    // (the sink's clock reads the call a little after the governor allowed
    // it, more so on a loaded test machine). Two instances each spending
    // the whole budget would show about 50, and no governor at all 100.
    for (i, t) in all.iter().enumerate() {
        let in_window = all[i..].iter().take_while(|u| **u - *t < chrono::Duration::seconds(1)).count();
        assert!(in_window <= 32, "{in_window} calls within a second from {t}");
    }
    let span = (times[99] - times[0]).num_milliseconds();
    assert!(span >= 3_900, "100 calls took only {span} ms");
    let instances: i64 = sqlx::query_scalar(
        "-- tests::instances (campaign)
         SELECT count(DISTINCT claimed_by) FROM delivery_claims WHERE state = 'done' AND intent_id = $1::uuid",
    )
    .bind(&intent)
    .fetch_one(&app.ops)
    .await
    .expect("instances");
    assert_eq!(instances, 2, "both instances delivered the campaign");
    app.shutdown.trigger();
    second.await.expect("join").expect("second dispatcher");
    app.stop().await;
}

/// A webhook receiver: checks every signature, answers by path.
#[derive(Clone, Default)]
struct Receiver {
    calls: Arc<Mutex<Vec<(String, String, bool)>>>,
    seen: Arc<Mutex<HashMap<String, u32>>>,
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Receiver>,
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let id = h("webhook-id");
    let ts: i64 = h("webhook-timestamp").parse().unwrap_or_default();
    let valid = ledger_dispatcher::webhook::signature(SECRET.as_bytes(), &id, ts, &body) == h("webhook-signature");
    r.calls.lock().expect("lock").push((path.clone(), id.clone(), valid));
    let n = {
        let mut seen = r.seen.lock().expect("lock");
        let n = seen.entry(id).or_default();
        *n += 1;
        *n
    };
    match path.as_str() {
        "gone" => axum::http::StatusCode::GONE,
        "flaky" if n == 1 => axum::http::StatusCode::SERVICE_UNAVAILABLE,
        _ if !valid => axum::http::StatusCode::UNAUTHORIZED,
        _ => axum::http::StatusCode::NO_CONTENT,
    }
}

const SECRET: &str = "whsec-test-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_and_the_receivers_answers_decide_the_outcome() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = axum::Router::new().route("/{path}", axum::routing::post(receive)).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let mut config = test_config();
    let mut sink = IdentityConfig::new("sink", ProviderKind::Sink);
    sink.channels = vec![Channel::Email];
    let mut hooks = IdentityConfig::new("hooks", ProviderKind::Webhook);
    hooks.secret = Some(SECRET.into());
    config.identities = vec![sink, hooks];
    let app = spawn_app_with(config).await;
    let hook = |path: &str| {
        json!({ "channel": "webhook", "to": format!("http://{addr}/{path}"),
                "content": { "json": { "event": "order.shipped", "order": 42 } } })
    };
    let ok = send(&app, "hook-ok", &hook("ok")).await;
    let flaky = send(&app, "hook-flaky", &hook("flaky")).await;
    let gone = send(&app, "hook-gone", &hook("gone")).await;

    let row = app.wait_for_status(&ok, "delivered").await;
    assert_eq!(row["attempts"], 1);
    assert_eq!(row["identity"], "hooks", "the read model names the sender identity");
    let row = app.wait_for_status(&flaky, "delivered").await;
    assert_eq!(row["attempts"], 2, "503 is retried: {row}");
    let row = app.wait_for_status(&gone, "failed").await;
    assert_eq!((row["attempts"].as_i64(), row["last_error_code"].as_str()), (Some(1), Some("http_410")));

    let calls = receiver.calls.lock().expect("lock").clone();
    assert!(calls.iter().all(|(_, _, valid)| *valid), "every call carried a valid signature: {calls:?}");
    let by_path =
        |p: &str| calls.iter().filter(|(path, _, _)| path == p).map(|(_, id, _)| id.clone()).collect::<Vec<_>>();
    assert_eq!(by_path("ok"), vec![ok.clone()], "webhook-id is the message id");
    assert_eq!(by_path("flaky"), vec![flaky.clone(), flaky.clone()], "the retry carries the same id");
    assert_eq!(by_path("gone").len(), 1, "a 4xx is not retried");
    let attempted_via = outcomes(&app, &ok).into_iter().find_map(|b| match b {
        EventBody::DeliveryAttempted(a) => Some((a.provider, a.identity)),
        _ => None,
    });
    assert_eq!(attempted_via, Some(("webhook".into(), Some("hooks".into()))));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_delivers_to_a_real_server_and_its_replies_decide_the_outcome() {
    let server = SmtpServer::start();
    let mut config = test_config();
    let mut smtp = IdentityConfig::new("mail", ProviderKind::Smtp);
    smtp.url = Some(format!("smtp://127.0.0.1:{}", server.port));
    config.identities = vec![smtp];
    config.sink.failures.clear();
    let app = spawn_app_with(config).await;
    let body = json!({ "to": "ann@example.com", "from": "shop@example.com", "variables": { "name": "Ann" },
                       "content": { "subject": "Order for {{ name }}", "text": "Hello {{ name }}",
                                    "html": "<p>Hello {{ name }}</p>" } });
    let ok = send(&app, "smtp-ok", &body).await;
    let perm = send(&app, "smtp-perm", &email("reject-perm@example.com")).await;
    let temp = send(&app, "smtp-temp", &email("reject-temp@example.com")).await;

    let row = app.wait_for_status(&ok, "delivered").await;
    assert!(row["provider_message_id"].as_str().unwrap_or_default().contains("queued as smtp-"), "{row}");
    let row = app.wait_for_status(&perm, "failed").await;
    assert_eq!((row["attempts"].as_i64(), row["last_error_code"].as_str()), (Some(1), Some("smtp_550")));
    let row = app.wait_for_status(&temp, "failed").await;
    assert_eq!((row["attempts"].as_i64(), row["last_error_code"].as_str()), (Some(3), Some("smtp_451")));

    let received = server.received();
    assert_eq!(received.len(), 1, "only the accepted message arrived");
    let mail = &received[0];
    assert!(mail.contains("X-Envelope-To: ann@example.com"), "{mail}");
    assert!(mail.contains("Subject: Order for Ann"), "{mail}");
    assert!(mail.contains(&format!("Message-ID: <{ok}@delivery-ledger>")), "{mail}");
    assert!(mail.contains("Hello Ann") && mail.contains("<p>Hello Ann</p>"), "{mail}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dispatcher_process_sends_nothing_twice_and_reports_what_is_ambiguous() {
    let mut config = test_config();
    config.sink.latency_ms = 300;
    config.identities[0].concurrency = 16;
    config.dispatcher.claim_lease_secs = 3;
    config.dispatcher.provider_timeout_ms = 2_000;
    let app = spawn_app_without_dispatcher(config.clone()).await;
    let mut dispatcher = ledger_process(&config, &["run", "dispatch"]);

    let recipients: Vec<Value> =
        (0..200).map(|i| json!({ "address": format!("k{i}@example.com"), "variables": {} })).collect();
    let campaign = json!({ "name": "crash", "from": "news@example.com",
                           "content": { "subject": "S", "text": "T" }, "recipients": recipients });
    let reply = app.post("/v1/campaigns", Some("crash"), &campaign).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let intent = uuid::Uuid::parse_str(reply.body["intent_id"].as_str().expect("id")).expect("uuid");
    // Killed while calls are in flight: attempted claims, each call taking
    // 300 ms. (Killed as soon as 30 had arrived, under the load of the whole
    // suite the dispatcher once had none in flight at that moment, and the
    // scenario then had nothing ambiguous to show.)
    eventually("deliveries under way, calls in flight", Duration::from_secs(60), || async {
        let in_flight: i64 = sqlx::query_scalar(
            "-- tests::calls_in_flight\nSELECT count(*) FROM delivery_claims WHERE state = 'attempted'",
        )
        .fetch_one(&app.ops)
        .await
        .expect("query");
        (app.sink_total() >= 30 && in_flight > 0).then_some(())
    })
    .await;
    dispatcher.kill().expect("SIGKILL");
    dispatcher.wait().expect("reaped");
    let at_kill = app.sink_total();
    assert!(at_kill < 200, "killed mid-campaign");

    let mut dispatcher = ledger_process(&config, &["run", "dispatch"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let settled = loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "-- tests::settled
             SELECT status, count(*) FROM messages WHERE intent_id = $1 GROUP BY status",
        )
        .bind(intent)
        .fetch_all(&app.reporting)
        .await
        .expect("query");
        let counts: HashMap<String, i64> = rows.into_iter().collect();
        let settled = counts.get("delivered").copied().unwrap_or(0) + counts.get("ambiguous").copied().unwrap_or(0);
        if settled == 200 {
            break counts;
        }
        if std::time::Instant::now() > deadline {
            let _ = dispatcher.kill();
            panic!(
                "not settled: {counts:?}\n{}",
                group_positions(&app.config, ConsumerGroup::Dispatcher, Topic::Rendered)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = std::process::Command::new("kill").args(["-TERM", &dispatcher.id().to_string()]).status();
    let exit = dispatcher.wait().expect("reaped");
    assert!(exit.success(), "a SIGTERM is a clean stop: {exit:?}");

    let sink = ledger_dispatcher::sink::read_deliveries(&app.config.sink.dir).expect("sink");
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &sink {
        *per_id.entry(r.message_id.to_string()).or_default() += 1;
    }
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    let delivered: Vec<String> = sqlx::query_scalar(
        "-- tests::delivered_ids\nSELECT message_id::text FROM messages WHERE intent_id = $1 AND status = 'delivered'",
    )
    .bind(intent)
    .fetch_all(&app.reporting)
    .await
    .expect("query");
    assert!(delivered.iter().all(|id| per_id.get(id) == Some(&1)), "every delivered message reached the sink once");
    let ambiguous: Vec<String> = sqlx::query_scalar(
        "-- tests::ambiguous_ids\nSELECT message_id::text FROM messages WHERE intent_id = $1 AND status = 'ambiguous' ORDER BY 1",
    )
    .bind(intent)
    .fetch_all(&app.reporting)
    .await
    .expect("query");
    assert!(!ambiguous.is_empty(), "calls were in flight at the kill: {settled:?}");
    assert_eq!(delivered.len() + ambiguous.len(), 200);

    // The CLI reports exactly those.
    let out = ledger_command(&config.sink.dir.parent().expect("dir").join("ledger.toml"))
        .arg("ambiguous")
        .output()
        .expect("ledger ambiguous");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("{} ambiguous message(s)", ambiguous.len())), "{text}");
    for id in &ambiguous {
        assert!(text.contains(id.as_str()), "{id} not listed:\n{text}");
    }
    app.stop().await;
}

/// A Mailgun-style API: records every form, answers by recipient.
#[derive(Clone, Default)]
struct MailApi {
    forms: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

async fn mail_api(
    axum::extract::State(api): axum::extract::State<MailApi>,
    headers: axum::http::HeaderMap,
    axum::extract::Form(form): axum::extract::Form<HashMap<String, String>>,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    use base64::Engine;
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("api:key-123"));
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(json!({ "message": "Forbidden" })));
    }
    let to = form.get("to").cloned().unwrap_or_default();
    let n = {
        let mut forms = api.forms.lock().expect("lock");
        forms.push(form);
        forms.iter().filter(|f| f.get("to") == Some(&to)).count()
    };
    if to.starts_with("invalid") {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(json!({ "message": "'to' parameter is not a valid address" })),
        );
    }
    if to.starts_with("busy") && n == 1 {
        return (axum::http::StatusCode::TOO_MANY_REQUESTS, axum::Json(json!({ "message": "rate limited" })));
    }
    (
        axum::http::StatusCode::OK,
        axum::Json(json!({ "id": format!("<api-{n}-{to}>"), "message": "Queued. Thank you." })),
    )
}

/// A Mailgun-style API on a port of its own, and an http_email identity
/// named `name` that sends to it.
async fn mail_api_identity(name: &str) -> (MailApi, IdentityConfig) {
    let api = MailApi::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router =
        axum::Router::new().route("/v3/mg.example.com/messages", axum::routing::post(mail_api)).with_state(api.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut identity = IdentityConfig::new(name, ProviderKind::HttpEmail);
    identity.url = Some(format!("http://{addr}/v3/mg.example.com"));
    identity.password = Some("key-123".into());
    (api, identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_email_api_gets_each_message_as_a_form_and_its_answers_decide_the_outcome() {
    let (api, identity) = mail_api_identity("mailgun").await;
    let mut config = test_config();
    config.identities = vec![identity];
    let app = spawn_app_with(config).await;
    let ok = send(&app, "api-ok", &email("ann@example.com")).await;
    let busy = send(&app, "api-busy", &email("busy@example.com")).await;
    let invalid = send(&app, "api-invalid", &email("invalid@example.com")).await;

    let row = app.wait_for_status(&ok, "delivered").await;
    assert_eq!(row["provider_message_id"], "<api-1-ann@example.com>");
    assert_eq!(row["identity"], "mailgun");
    let row = app.wait_for_status(&busy, "delivered").await;
    assert_eq!(row["attempts"], 2, "429 is retried: {row}");
    let row = app.wait_for_status(&invalid, "failed").await;
    assert_eq!((row["attempts"].as_i64(), row["last_error_code"].as_str()), (Some(1), Some("http_400")));

    let forms = api.forms.lock().expect("lock").clone();
    assert_eq!(forms.len(), 4, "ann once, busy twice, invalid once: {forms:?}");
    let ann = forms.iter().find(|f| f["to"] == "ann@example.com").expect("ann's form");
    assert_eq!(ann["from"], "shop@example.com");
    assert_eq!(ann["subject"], "Hello");
    assert_eq!(ann["text"], "Hello there");
    assert_eq!(ann["v:ledger-message-id"], ok);
    assert_eq!(ann["h:Message-Id"], format!("<{ok}@delivery-ledger>"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_daily_budget_holds_the_rest_back_without_failing_them() {
    let mut config = test_config();
    let mut identity = IdentityConfig::new("daily", ProviderKind::Sink);
    identity.per_day = 5;
    config.identities = vec![identity];
    let app = spawn_app_with(config).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(send(&app, &format!("daily-{i}"), &email(&format!("d{i}@example.com"))).await);
    }
    eventually("the day's five", Duration::from_secs(30), || async { (app.sink_total() == 5).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.sink_total(), 5, "nothing beyond the daily budget");
    let mut statuses = std::collections::BTreeMap::new();
    for id in &ids {
        let row = app.message_row(id).await.expect("row");
        *statuses.entry(row["status"].as_str().unwrap_or_default().to_owned()).or_insert(0) += 1;
    }
    assert_eq!(statuses.get("delivered"), Some(&5), "{statuses:?}");
    assert_eq!(
        statuses.get("rendered"),
        Some(&3),
        "the rest wait for tomorrow, neither failed nor skipped: {statuses:?}"
    );
    let used: i64 =
        sqlx::query_scalar("-- tests::day_used\nSELECT day_used FROM governor_state WHERE identity = 'daily'")
            .fetch_one(&app.ops)
            .await
            .expect("governor state");
    assert_eq!(used, 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_email_batch_form_sends_many_recipients_per_call_each_with_its_own_content() {
    let (api, mut identity) = mail_api_identity("mailgun-batch").await;
    let mut config = test_config();
    identity.batch_size = 100;
    identity.batch_wait_ms = 200;
    identity.concurrency = 300;
    config.identities = vec![identity];
    let app = spawn_app_with(config).await;
    const N: usize = 250;
    let recipients: Vec<Value> = (0..N)
        .map(|i| json!({ "address": format!("b{i}@example.com"), "variables": { "name": format!("Reader {i}") } }))
        .collect();
    let campaign = json!({ "name": "batched", "from": "news@example.com",
                           "content": { "subject": "Hi {{ name }}", "text": "Hello {{ name }}" },
                           "recipients": recipients });
    let reply = app.post("/v1/campaigns", Some("batched"), &campaign).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let intent = reply.body["intent_id"].as_str().expect("intent").to_owned();
    let statuses = app.wait_terminal(&intent, N as i64, Duration::from_secs(60)).await;
    assert_eq!(statuses.get("delivered"), Some(&(N as i64)), "{statuses:?}");

    let forms = api.forms.lock().expect("lock").clone();
    assert!(forms.len() < N / 10, "{} calls for {N} messages", forms.len());
    let mut seen = HashMap::new();
    for form in &forms {
        assert_eq!(form["subject"], "%recipient.subject%");
        assert_eq!(form["v:ledger-message-id"], "%recipient.ledger-message-id%");
        let variables: Value = serde_json::from_str(&form["recipient-variables"]).expect("recipient variables");
        let to: Vec<&str> = form["to"].split(',').collect();
        assert!(to.len() <= 100, "at most batch_size recipients a call");
        for address in to {
            let i: usize = address.trim_start_matches('b').trim_end_matches("@example.com").parse().expect("n");
            assert_eq!(variables[address]["subject"], format!("Hi Reader {i}"));
            assert_eq!(variables[address]["text"], format!("Hello Reader {i}"));
            *seen.entry(address.to_owned()).or_insert(0) += 1;
        }
    }
    assert_eq!(seen.len(), N, "every recipient in a call");
    assert!(seen.values().all(|n| *n == 1), "and in one call only");
    app.stop().await;
}

/// A push service: checks the VAPID authorization, decrypts each payload
/// with the subscriber's keys (RFC 8291), answers 201 or, for `gone`, 410.
#[derive(Clone)]
struct PushService {
    subscriber: p256::SecretKey,
    auth: [u8; 16],
    vapid_public: Vec<u8>,
    received: Arc<Mutex<Vec<(String, Value)>>>,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64url(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).expect("base64url")
}

impl PushService {
    fn subscription(&self, base: &str, path: &str) -> String {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let p256dh = b64url(self.subscriber.public_key().to_encoded_point(false).as_bytes());
        format!("{base}/push/{path}#p256dh={p256dh}&auth={}", b64url(&self.auth))
    }

    /// The receiving side of RFC 8291 / RFC 8188 (one record).
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        use aes_gcm::aead::{Aead, KeyInit};
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let (salt, rest) = body.split_at(16);
        let id_len = rest[4] as usize;
        let (as_public, sealed) = rest[5..].split_at(id_len);
        let sender = p256::PublicKey::from_sec1_bytes(as_public).expect("sender key");
        let shared = p256::ecdh::diffie_hellman(self.subscriber.to_nonzero_scalar(), sender.as_affine());
        let mut info = b"WebPush: info\0".to_vec();
        info.extend_from_slice(self.subscriber.public_key().to_encoded_point(false).as_bytes());
        info.extend_from_slice(as_public);
        let mut ikm = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(&self.auth), shared.raw_secret_bytes())
            .expand(&info, &mut ikm)
            .expect("ikm");
        let prk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), &ikm);
        let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
        prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek).expect("cek");
        prk.expand(b"Content-Encoding: nonce\0", &mut nonce).expect("nonce");
        let cipher = aes_gcm::Aes128Gcm::new_from_slice(&cek).expect("cipher");
        let mut plain = cipher.decrypt(aes_gcm::Nonce::from_slice(&nonce), sealed).expect("decrypts with our keys");
        assert_eq!(plain.pop(), Some(2), "the last record's delimiter");
        plain
    }

    /// Whether `Authorization: vapid t=…, k=…` is a valid ES256 JWT for
    /// `audience` under the identity's key.
    fn vapid_ok(&self, header: &str, audience: &str) -> bool {
        use p256::ecdsa::signature::Verifier;
        let Some(rest) = header.strip_prefix("vapid t=") else { return false };
        let Some((jwt, k)) = rest.split_once(", k=") else { return false };
        if unb64url(k) != self.vapid_public {
            return false;
        }
        let Some((signed, signature)) = jwt.rsplit_once('.') else { return false };
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&self.vapid_public).expect("key");
        let Ok(signature) = p256::ecdsa::Signature::from_slice(&unb64url(signature)) else { return false };
        let claims: Value =
            serde_json::from_slice(&unb64url(signed.split('.').nth(1).unwrap_or_default())).unwrap_or_default();
        key.verify(signed.as_bytes(), &signature).is_ok() && claims["aud"] == audience && claims["exp"].is_i64()
    }
}

async fn push_service(
    axum::extract::State(s): axum::extract::State<PushService>,
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, [(&'static str, String); 1]) {
    let host = headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let encoding = headers.get("content-encoding").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !s.vapid_ok(auth, &format!("http://{host}")) || encoding != "aes128gcm" {
        return (axum::http::StatusCode::UNAUTHORIZED, [("location", String::new())]);
    }
    if path == "gone" {
        return (axum::http::StatusCode::GONE, [("location", String::new())]);
    }
    let payload: Value = serde_json::from_slice(&s.decrypt(&body)).expect("json payload");
    s.received.lock().expect("lock").push((path.clone(), payload));
    (axum::http::StatusCode::CREATED, [("location", format!("http://{host}/messages/{path}"))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_push_is_encrypted_for_the_subscription_authorised_with_vapid_and_a_gone_one_is_suppressed() {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let vapid = p256::SecretKey::from_bytes(&[5u8; 32].into()).expect("vapid key");
    let service = PushService {
        subscriber: p256::SecretKey::from_bytes(&[11u8; 32].into()).expect("subscriber key"),
        auth: [9u8; 16],
        vapid_public: vapid.public_key().to_encoded_point(false).as_bytes().to_vec(),
        received: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let router =
        axum::Router::new().route("/push/{path}", axum::routing::post(push_service)).with_state(service.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let mut config = test_config();
    let mut push = IdentityConfig::new("browser-push", ProviderKind::Webpush);
    push.secret = Some(b64url(&vapid.to_bytes()));
    push.from = Some("mailto:ops@example.com".into());
    config.identities = vec![push];
    config.feedback.beacon_secret = Some("beacon".into());
    let app = spawn_app_with(config).await;
    let notify = |to: String| {
        json!({ "channel": "push", "to": to, "variables": { "name": "Ann" },
                "content": { "subject": "Hi {{ name }}", "text": "Your order shipped", "json": { "order": 42 } } })
    };
    let ok = send(&app, "push-ok", &notify(service.subscription(&base, "sub-1"))).await;
    let gone_to = service.subscription(&base, "gone");
    let gone = send(&app, "push-gone", &notify(gone_to.clone())).await;

    let row = app.wait_for_status(&ok, "delivered").await;
    assert_eq!(row["provider_message_id"], format!("{base}/messages/sub-1"));
    let received = service.received.lock().expect("lock").clone();
    assert_eq!(received.len(), 1, "{received:?}");
    let payload = &received[0].1;
    assert_eq!(payload["title"], "Hi Ann");
    assert_eq!(payload["body"], "Your order shipped");
    assert_eq!(payload["data"]["order"], 42);
    assert_eq!(payload["message_id"], ok.as_str());
    let beacon = ledger_schemas::beacon_token("beacon", uuid::Uuid::parse_str(&ok).expect("uuid"));
    assert_eq!(payload["beacon_token"], beacon, "the client can report it displayed");

    let row = app.wait_for_status(&gone, "failed").await;
    assert_eq!(row["last_error_code"], "expired_subscription");
    let reason: String = sqlx::query_scalar("-- tests::expired\nSELECT reason FROM suppressions WHERE recipient = $1")
        .bind(ledger_schemas::normalise_recipient(&gone_to))
        .fetch_one(&app.ops)
        .await
        .expect("suppressed");
    assert_eq!(reason, "expired_subscription");
    // The next message to it is not sent.
    let again = send(&app, "push-gone-2", &notify(gone_to)).await;
    app.wait_for_status(&again, "suppressed").await;
    app.stop().await;
}

/// Drives one governor (its budget in the ops database) with `n` callers
/// that, between their permission and their call, are held up now and then
/// — as a claim or an *attempted* event's ack is when the store or the
/// broker stalls — and returns when each call was made.
async fn calls_through_a_stalling_path(concurrency: usize, n: usize) -> Vec<std::time::Instant> {
    use ledger_dispatcher::governor::Governor;
    use ledger_schemas::Priority;

    let (config, _) = reporting_database().await;
    let ops = ledger_runtime::db::pool(&config.ops_database_url, 2).await.expect("ops pool");
    let mut identity = IdentityConfig::new("stalling", ProviderKind::Sink);
    identity.per_second = 100;
    identity.burst = 5;
    identity.concurrency = concurrency;
    let shutdown = ledger_runtime::Shutdown::new();
    let governor = Governor::start(&identity, Duration::from_millis(100), ops, shutdown.clone());
    // Twice a stall of 500 ms on the way from permission to call.
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let stalls = {
        let gate = gate.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                let _stalled = gate.write().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let calls = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..n {
        let (governor, gate, calls) = (governor.clone(), gate.clone(), calls.clone());
        callers.spawn(async move {
            let tenant = if i % 2 == 0 { "a" } else { "b" };
            let permission = governor.acquire(tenant, Priority::Bulk).await.expect("permission");
            drop(gate.read().await);
            let permission = governor.fresh(tenant, permission, Duration::from_secs(30)).await;
            calls.lock().expect("calls").push(std::time::Instant::now());
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(permission);
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(done) = callers.join_next().await {
            done.expect("caller");
        }
    })
    .await;
    shutdown.trigger();
    stalls.abort();
    assert!(all.is_ok(), "every caller got to call within 60 s ({} did)", calls.lock().expect("calls").len());
    drop_databases(&config).await;
    let mut calls = calls.lock().expect("calls").clone();
    calls.sort();
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_keep_to_the_rate_when_messages_are_held_up_between_permission_and_call() {
    // 100/s, burst 5, permissions good for 100 ms: any second holds at most
    // 100 × 1.1 + 5 = 115 calls. Without renewing stale permissions each
    // stall lets about 50 granted calls out at once (about 150 in a second).
    let calls = calls_through_a_stalling_path(64, 600).await;
    assert_eq!(calls.len(), 600);
    let (one, half) = (busiest(&calls, Duration::from_secs(1)), busiest(&calls, Duration::from_millis(500)));
    assert!(one <= 120 && half <= 70, "busiest second {one} calls, busiest half second {half} (limit 100/s, burst 5)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_permissions_are_renewed_when_every_call_slot_is_held() {
    // Two slots, both held by callers whose permission went stale in a
    // stall: their renewals must not wait for a slot.
    let calls = calls_through_a_stalling_path(2, 150).await;
    assert_eq!(calls.len(), 150);
    let one = busiest(&calls, Duration::from_secs(1));
    assert!(one <= 120, "busiest second {one} calls (limit 100/s, burst 5)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_permission_that_cannot_be_renewed_is_used_before_the_claim_lease_runs_out() {
    use ledger_dispatcher::governor::Governor;
    use ledger_schemas::Priority;

    let (config, _) = reporting_database().await;
    let ops = ledger_runtime::db::pool(&config.ops_database_url, 2).await.expect("ops pool");
    // One call a day: after it, nothing can be renewed before midnight.
    let mut identity = IdentityConfig::new("one-a-day", ProviderKind::Sink);
    identity.per_day = 1;
    let shutdown = ledger_runtime::Shutdown::new();
    let governor = Governor::start(&identity, Duration::from_millis(100), ops, shutdown.clone());
    let permission = governor.acquire("a", Priority::Bulk).await.expect("the day's one call");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let permission =
        tokio::time::timeout(Duration::from_secs(20), governor.fresh("a", permission, Duration::from_millis(1_500)))
            .await
            .expect("fresh came back within its patience");
    let waited = started.elapsed();
    drop(permission);
    shutdown.trigger();
    drop_databases(&config).await;
    assert!(
        waited >= Duration::from_millis(1_400) && waited < Duration::from_secs(10),
        "waited {waited:?} for a renewal that cannot come (patience 1.5 s)"
    );
}
