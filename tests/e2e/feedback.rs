//! Provider feedback intake: each provider's format, signed or
//! authenticated as that provider does it, recorded once, folded into the
//! read model, and suppressing hard bounces, complaints and unsubscribes.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use ledger_runtime::FeedbackConfig;
use ledger_schemas::{EventBody, FeedbackKind, Topic};
use ledger_tests::*;
use p256::ecdsa::signature::Signer;
use p256::pkcs8::EncodePublicKey;
use serde_json::{json, Value};
use sha2::Sha256;

const MAILGUN_KEY: &str = "mg-signing-key";
const SES_AUTH: &str = "sns:s3cret";
const SES_TOPIC: &str = "arn:aws:sns:eu-west-1:123456789012:ses-feedback";
const BEACON: &str = "beacon-secret";

fn sendgrid_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_bytes(&[7u8; 32].into()).expect("key")
}

fn feedback_config() -> FeedbackConfig {
    let public = p256::PublicKey::from(sendgrid_key().verifying_key()).to_public_key_der().expect("der");
    FeedbackConfig {
        mailgun_signing_key: Some(MAILGUN_KEY.into()),
        sendgrid_public_key: Some(base64::engine::general_purpose::STANDARD.encode(public.as_bytes())),
        ses_basic_auth: Some(SES_AUTH.into()),
        ses_topic_arns: vec![SES_TOPIC.into()],
        beacon_secret: Some(BEACON.into()),
        max_age_secs: None,
    }
}

fn mailgun(event: &str, severity: Option<&str>, id: &str, recipient: &str, message_id: &str, key: &str) -> Value {
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let token = format!("token-{id}");
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("key");
    mac.update(format!("{timestamp}{token}").as_bytes());
    let mut data = json!({ "event": event, "id": id, "recipient": recipient,
                           "timestamp": chrono::Utc::now().timestamp() as f64,
                           "user-variables": { "ledger-message-id": message_id } });
    if let Some(s) = severity {
        data["severity"] = json!(s);
        data["delivery-status"] = json!({ "description": "550 5.1.1 No such user" });
    }
    json!({ "signature": { "timestamp": timestamp, "token": token,
                           "signature": hex::encode(mac.finalize().into_bytes()) },
            "event-data": data })
}

async fn post_raw(app: &TestApp, path: &str, body: Vec<u8>, headers: &[(&str, String)]) -> (u16, Value) {
    let mut request = app.http().post(app.url(path)).header("content-type", "application/json").body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let problem = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap_or_default() == "application/problem+json");
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert!(problem, "a refusal is problem+json: {status} {body}");
    }
    (status, body)
}

async fn post_json(app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    post_raw(app, path, serde_json::to_vec(body).expect("json"), &[]).await
}

async fn sendgrid(app: &TestApp, events: &Value, key: &p256::ecdsa::SigningKey) -> (u16, Value) {
    let body = serde_json::to_vec(events).expect("json");
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let mut signed = timestamp.as_bytes().to_vec();
    signed.extend_from_slice(&body);
    let signature: p256::ecdsa::Signature = key.sign(&signed);
    let signature = base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes());
    post_raw(
        app,
        "/v1/feedback/sendgrid",
        body,
        &[("x-twilio-email-event-webhook-signature", signature), ("x-twilio-email-event-webhook-timestamp", timestamp)],
    )
    .await
}

fn ses_bounce(sns_id: &str, recipient: &str, message_id: &str, topic: &str) -> Value {
    let inner = json!({
        "notificationType": "Bounce",
        "bounce": { "bounceType": "Permanent", "timestamp": "2026-12-01T10:00:00.000Z",
                    "bouncedRecipients": [{ "emailAddress": recipient, "diagnosticCode": "smtp; 550 5.1.1 user unknown" }] },
        "mail": { "messageId": "0100018c-ses-id", "destination": [recipient],
                  "headers": [{ "name": "Message-ID", "value": format!("<{message_id}@delivery-ledger>") }] }
    });
    json!({ "Type": "Notification", "MessageId": sns_id, "TopicArn": topic,
            "Message": inner.to_string(), "Timestamp": "2026-12-01T10:00:01.000Z" })
}

async fn ses(app: &TestApp, body: &Value, auth: &str) -> (u16, Value) {
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(auth));
    post_raw(
        app,
        "/v1/feedback/ses",
        serde_json::to_vec(body).expect("json"),
        &[("authorization", basic), ("x-amz-sns-message-type", "Notification".into())],
    )
    .await
}

/// Sends one plain email to `to` under the idempotency key `key`.
async fn send_to(app: &TestApp, key: &str, to: &str) -> String {
    let body = json!({ "to": to, "content": { "subject": "S", "text": "T" } });
    let reply = app.post("/v1/messages", Some(key), &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    reply.body["message_id"].as_str().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_feedback_in_each_format_is_verified_recorded_once_and_suppresses_where_it_should() {
    let mut config = test_config();
    config.feedback = feedback_config();
    // One call that never answers: held as ambiguous until feedback says.
    config.sink.failures = vec![ledger_runtime::SinkFailure {
        recipient_contains: "fe-lost".into(),
        kind: ledger_runtime::SinkFailureKind::Timeout,
        attempts: 0,
    }];
    config.dispatcher.provider_timeout_ms = 1_000;
    let app = spawn_app_with(config).await;
    let mut ids = Vec::new();
    for who in ["fa", "fb", "fc", "fd"] {
        ids.push(send_to(&app, who, &format!("{who}@example.com")).await);
    }
    for id in &ids {
        app.wait_for_status(id, "delivered").await;
    }
    let (a, b, c, d) = (&ids[0], &ids[1], &ids[2], &ids[3]);

    // Mailgun: an open, the same report again, a forged one, a hard bounce.
    let open = mailgun("opened", None, "mg-1", "fa@example.com", a, MAILGUN_KEY);
    assert_eq!(
        post_json(&app, "/v1/feedback/mailgun", &open).await,
        (200, json!({ "recorded": 1, "duplicates": 0, "unmatched": 0, "ignored": 0 }))
    );
    assert_eq!(
        post_json(&app, "/v1/feedback/mailgun", &open).await.1["duplicates"],
        1,
        "a repeated report adds nothing"
    );
    let forged = mailgun("complained", None, "mg-2", "fa@example.com", a, "not-the-key");
    assert_eq!(post_json(&app, "/v1/feedback/mailgun", &forged).await.0, 401);
    let bounce = mailgun("failed", Some("permanent"), "mg-3", "fb@example.com", b, MAILGUN_KEY);
    assert_eq!(post_json(&app, "/v1/feedback/mailgun", &bounce).await.1["recorded"], 1);
    let soft = mailgun("failed", Some("temporary"), "mg-4", "fb@example.com", b, MAILGUN_KEY);
    assert_eq!(
        post_json(&app, "/v1/feedback/mailgun", &soft).await.1["ignored"],
        1,
        "Mailgun retries soft failures itself"
    );
    let stranger = mailgun("opened", None, "mg-5", "x@example.com", &uuid::Uuid::new_v4().to_string(), MAILGUN_KEY);
    assert_eq!(post_json(&app, "/v1/feedback/mailgun", &stranger).await.1["unmatched"], 1);

    // SendGrid: a signed array; a click, a spam report, and an event kind
    // that is not feedback. Signed by another key: refused.
    let events = json!([
        { "event": "click", "sg_event_id": "sg-1", "email": "fc@example.com", "timestamp": 1_796_000_000,
          "url": "https://example.com/offer", "ledger_message_id": c },
        { "event": "spamreport", "sg_event_id": "sg-2", "email": "fc@example.com", "timestamp": 1_796_000_100,
          "ledger_message_id": c },
        { "event": "processed", "sg_event_id": "sg-3", "email": "fc@example.com", "timestamp": 1_796_000_000 }
    ]);
    assert_eq!(
        sendgrid(&app, &events, &sendgrid_key()).await,
        (200, json!({ "recorded": 2, "duplicates": 0, "unmatched": 0, "ignored": 1 }))
    );
    let other = p256::ecdsa::SigningKey::from_bytes(&[9u8; 32].into()).expect("key");
    assert_eq!(sendgrid(&app, &events, &other).await.0, 401);

    // SES through SNS: Basic auth and the topic are checked.
    assert_eq!(ses(&app, &ses_bounce("sns-1", "fd@example.com", d, SES_TOPIC), SES_AUTH).await.1["recorded"], 1);
    assert_eq!(ses(&app, &ses_bounce("sns-2", "fd@example.com", d, SES_TOPIC), "sns:wrong").await.0, 401);
    assert_eq!(ses(&app, &ses_bounce("sns-3", "fd@example.com", d, "arn:aws:sns:other"), SES_AUTH).await.0, 401);

    // A push beacon: the token binds it to its message.
    let token = ledger_schemas::beacon_token(BEACON, uuid::Uuid::parse_str(a).expect("uuid"));
    let beacon = json!({ "message_id": a, "event": "displayed", "token": token });
    assert_eq!(post_json(&app, "/v1/feedback/push", &beacon).await.1["recorded"], 1);
    let wrong = json!({ "message_id": b, "event": "displayed", "token": token });
    assert_eq!(post_json(&app, "/v1/feedback/push", &wrong).await.0, 401);
    assert_eq!(post_json(&app, "/v1/feedback/carrier-pigeon", &json!({})).await.0, 404);
    assert_eq!(post_raw(&app, "/v1/feedback/mailgun", b"{not json".to_vec(), &[]).await.0, 400);

    // A provider's delivery report settles an ambiguous message.
    let lost = send_to(&app, "fe-lost", "fe-lost@example.com").await;
    app.wait_for_status(&lost, "ambiguous").await;
    let report = mailgun("delivered", None, "mg-9", "fe-lost@example.com", &lost, MAILGUN_KEY);
    assert_eq!(post_json(&app, "/v1/feedback/mailgun", &report).await.1["recorded"], 1);
    app.wait_for_status(&lost, "delivered").await;
    let claim: String =
        sqlx::query_scalar("-- tests::claim_state\nSELECT state FROM delivery_claims WHERE message_id = $1")
            .bind(uuid::Uuid::parse_str(&lost).expect("uuid"))
            .fetch_one(&app.ops)
            .await
            .expect("claim");
    assert_eq!(claim, "done", "no longer listed by `ledger ambiguous`");

    // The read model: each kind's first report, the status left delivered.
    let row = |id: &str| {
        let id = id.to_owned();
        let app = &app;
        async move { app.message_row(&id).await }
    };
    let ra = eventually("a's open in the read model", Duration::from_secs(30), || async {
        row(a).await.filter(|r| r["opened_at"].is_string())
    })
    .await;
    assert_eq!(ra["status"], "delivered");
    let rb = eventually("b's bounce", Duration::from_secs(30), || async {
        row(b).await.filter(|r| r["bounced_at"].is_string())
    })
    .await;
    assert_eq!(rb["status"], "delivered", "a bounce is its own stage: {rb}");
    let rc = eventually("c's click and complaint", Duration::from_secs(30), || async {
        row(c).await.filter(|r| r["clicked_at"].is_string() && r["complained_at"].is_string())
    })
    .await;
    assert!(rc["opened_at"].is_null(), "{rc}");
    eventually("d's bounce", Duration::from_secs(30), || async {
        row(d).await.filter(|r| r["bounced_at"].is_string())
    })
    .await;

    // On the log: each accepted report once, whatever was repeated.
    let feedback: Vec<(String, FeedbackKind)> = app
        .read_topic(Topic::Outcomes)
        .into_iter()
        .filter_map(|e| match e.body {
            EventBody::Feedback(f) => Some((e.message_id.expect("id").to_string(), f.kind)),
            _ => None,
        })
        .collect();
    let mut expected = vec![
        (a.clone(), FeedbackKind::Opened),
        (b.clone(), FeedbackKind::Bounced),
        (c.clone(), FeedbackKind::Clicked),
        (c.clone(), FeedbackKind::Complained),
        (d.clone(), FeedbackKind::Bounced),
        (a.clone(), FeedbackKind::Opened),
        (lost.clone(), FeedbackKind::Delivered),
    ];
    let mut got = feedback.clone();
    expected.sort_by_key(|(id, k)| (id.clone(), k.as_str()));
    got.sort_by_key(|(id, k)| (id.clone(), k.as_str()));
    assert_eq!(got, expected);

    // Hard bounces and complaints suppress; an open does not.
    for (who, reason) in
        [("fb", Some("hard_bounce")), ("fc", Some("complaint")), ("fd", Some("hard_bounce")), ("fa", None)]
    {
        let reply = app.get_as(&app.api_key, &format!("/v1/suppressions/{who}@example.com")).await;
        match reason {
            Some(reason) => {
                assert_eq!(reply.status, 200, "{who}: {}", reply.body);
                assert_eq!(reply.body["reason"], reason);
                assert_eq!(reply.body["source"].as_str().map(|s| s.starts_with("feedback:")), Some(true));
            }
            None => assert_eq!(reply.status, 404, "{who}"),
        }
    }
    // And the next message to a hard-bounced recipient is not sent.
    let again = send_to(&app, "fb-again", "fb@example.com").await;
    app.wait_for_status(&again, "suppressed").await;
    assert_eq!(app.sink_deliveries(&again), 0);
    app.stop().await;
}
