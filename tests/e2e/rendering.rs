//! Templates as events, mail merge, scheduled sends and cancellation in the
//! renderer.

use std::time::Duration;

use chrono::Utc;
use ledger_schemas::{EventBody, MessageRendered, Topic};
use ledger_tests::*;
use serde_json::{json, Value};

async fn publish(app: &TestApp, body: Value) -> Reply {
    app.post("/v1/templates", None, &body).await
}

/// Rendered messages on the log, by recipient.
fn rendered(app: &TestApp) -> std::collections::BTreeMap<String, MessageRendered> {
    app.read_topic(Topic::Rendered)
        .into_iter()
        .filter_map(|e| match e.body {
            EventBody::MessageRendered(m) => Some((m.recipient.clone(), m)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_template_renders_with_defaults_escaping_inlined_css_and_a_derived_text_part() {
    let app = spawn_app().await;
    let template = json!({ "name": "welcome", "content": {
        "subject": "Welcome {{ name | default('friend') }}",
        "html": "<html><head><style>p.hi { color: red; }</style></head><body><p class=\"hi\">Hi {{ name | default('friend') }}</p>{% if vip %}<p>VIP</p>{% endif %}</body></html>"
    } });
    let first = publish(&app, template.clone()).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.body["version"], 1);
    let same = publish(&app, template).await;
    assert_eq!(same.status, 200);
    assert_eq!(same.body["version"], 1);
    assert_eq!(same.body["created"], false);

    let ann = app
        .post(
            "/v1/messages",
            Some("w1"),
            &json!({ "to": "ann@example.com", "template": { "name": "welcome" },
                                                    "variables": { "name": "<Ann>", "vip": true } }),
        )
        .await;
    assert_eq!(ann.status, 202, "{}", ann.body);
    let bob = app
        .post(
            "/v1/messages",
            Some("w2"),
            &json!({ "to": "bob@example.com", "template": { "name": "welcome", "version": 1 } }),
        )
        .await;
    assert_eq!(bob.status, 202, "{}", bob.body);
    let row = app.wait_for_status(ann.body["message_id"].as_str().expect("id"), "delivered").await;
    assert_eq!((row["template"].as_str(), row["template_version"].as_i64()), (Some("welcome"), Some(1)), "{row}");
    app.wait_for_status(bob.body["message_id"].as_str().expect("id"), "delivered").await;

    let by_recipient = rendered(&app);
    let a = &by_recipient["ann@example.com"];
    assert_eq!(a.subject.as_deref(), Some("Welcome <Ann>"));
    let html = a.html.as_deref().expect("html");
    assert!(html.contains(r#"<p class="hi" style="color: red;">Hi &lt;Ann&gt;</p>"#), "{html}");
    assert!(html.contains("<p>VIP</p>") && !html.contains("<style"), "{html}");
    let text = a.text.as_deref().expect("derived text");
    assert!(text.contains("Hi <Ann>") && text.contains("VIP"), "{text}");
    let b = &by_recipient["bob@example.com"];
    assert_eq!(b.subject.as_deref(), Some("Welcome friend"));
    assert!(!b.html.as_deref().unwrap_or_default().contains("VIP"));

    let versions = app.get_as(&app.api_key, "/v1/templates/welcome").await;
    assert_eq!(versions.status, 200);
    assert_eq!(versions.body["versions"].as_array().map(Vec::len), Some(1));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_campaign_waits_without_blocking_others_and_keeps_its_pinned_version() {
    let app = spawn_app().await;
    let v1 = json!({ "name": "news", "content": { "subject": "Version one for {{ name }}", "text": "one" } });
    assert_eq!(publish(&app, v1).await.body["version"], 1);
    let send_at = Utc::now() + chrono::Duration::seconds(6);
    let campaign = app
        .post("/v1/campaigns", Some("sched"), &json!({ "template": { "name": "news" }, "send_at": send_at,
            "recipients": (0..3).map(|i| json!({ "address": format!("s{i}@example.com"), "variables": { "name": format!("S{i}") } })).collect::<Vec<_>>() }))
        .await;
    assert_eq!(campaign.status, 202, "{}", campaign.body);
    let intent = campaign.body["intent_id"].as_str().expect("id").to_owned();

    // A new version while the campaign waits; a message sent now pins it.
    let v2 = json!({ "name": "news", "content": { "subject": "Version two for {{ name }}", "text": "two" } });
    assert_eq!(publish(&app, v2).await.body["version"], 2);
    let now = app
        .post(
            "/v1/messages",
            Some("now"),
            &json!({ "to": "now@example.com", "template": { "name": "news" }, "variables": { "name": "N" } }),
        )
        .await;
    assert_eq!(now.status, 202);
    let row = app.wait_for_status(now.body["message_id"].as_str().expect("id"), "delivered").await;
    let delivered_now: chrono::DateTime<Utc> = serde_json::from_value(row["delivered_at"].clone()).expect("time");
    assert!(delivered_now < send_at, "the immediate message waited for the scheduled campaign");

    let counts = app.wait_terminal(&intent, 3, Duration::from_secs(60)).await;
    assert_eq!(counts.get("delivered"), Some(&3));
    let by_recipient = rendered(&app);
    assert_eq!(by_recipient["now@example.com"].subject.as_deref(), Some("Version two for N"));
    for i in 0..3 {
        assert_eq!(
            by_recipient[&format!("s{i}@example.com")].subject.as_deref(),
            Some(format!("Version one for S{i}").as_str())
        );
    }
    let first_render: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT min(rendered_at) FROM messages WHERE intent_id = $1")
            .bind(uuid::Uuid::parse_str(&intent).expect("uuid"))
            .fetch_one(&app.reporting)
            .await
            .expect("query");
    assert!(first_render.expect("rendered") >= send_at, "rendered before its send_at");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_recipient_failing_to_render_does_not_stop_the_campaign() {
    let app = spawn_app().await;
    let mut recipients: Vec<Value> = (0..4)
        .map(|i| json!({ "address": format!("f{i}@example.com"), "variables": { "name": format!("F{i}") } }))
        .collect();
    recipients.push(json!({ "address": "nameless@example.com" }));
    let reply = app
        .post(
            "/v1/campaigns",
            Some("fail-one"),
            &json!({ "content": { "subject": "Hi {{ name }}", "text": "Hello {{ name }}" }, "recipients": recipients }),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    let counts = app.wait_terminal(&intent, 5, Duration::from_secs(60)).await;
    assert_eq!(counts.get("delivered"), Some(&4), "{counts:?}");
    assert_eq!(counts.get("render_failed"), Some(&1), "{counts:?}");
    let (code, reason): (String, String) =
        sqlx::query_as("SELECT last_error_code, last_error FROM messages WHERE recipient = 'nameless@example.com'")
            .fetch_one(&app.reporting)
            .await
            .expect("row");
    assert_eq!(code, "undefined_variable");
    assert!(reason.contains("undefined"), "{reason}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_template_or_a_broken_one_is_refused_at_acceptance() {
    let app = spawn_roles(test_config(), false).await;
    assert_eq!(publish(&app, json!({ "name": "t", "content": { "subject": "s", "text": "x" } })).await.status, 201);
    let cases = [
        json!({ "to": "a@example.com", "template": { "name": "nope" } }),
        json!({ "to": "a@example.com", "template": { "name": "t", "version": 9 } }),
        json!({ "to": "a@example.com", "template": { "name": "t" }, "content": { "subject": "s", "text": "x" } }),
        json!({ "to": "a@example.com", "content": { "subject": "Hi {{ name", "text": "x" } }),
    ];
    for (i, body) in cases.iter().enumerate() {
        let r = app.post("/v1/messages", Some(&format!("u{i}")), body).await;
        assert_eq!(r.status, 422, "{body}: {}", r.body);
        let field = r.body["errors"][0]["field"].as_str().unwrap_or_default().to_owned();
        assert!(field == "template" || field == "content", "{field}");
    }
    let broken = publish(&app, json!({ "name": "broken", "content": { "subject": "{% if %}", "text": "x" } })).await;
    assert_eq!(broken.status, 422);
    assert!(app.read_topic(Topic::Intents).is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_campaign_cancelled_before_it_is_due_renders_nothing() {
    let app = spawn_app().await;
    let reply = app
        .post(
            "/v1/campaigns",
            Some("later"),
            &json!({ "content": { "subject": "Hi", "text": "x" },
            "send_at": Utc::now() + chrono::Duration::seconds(3),
            "recipients": (0..5).map(|i| json!({ "address": format!("l{i}@example.com") })).collect::<Vec<_>>() }),
        )
        .await;
    assert_eq!(reply.status, 202);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    let cancel = app
        .http()
        .post(app.url(&format!("/v1/campaigns/{intent}/cancel")))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancel.status(), 202);
    let counts = app.wait_terminal(&intent, 5, Duration::from_secs(60)).await;
    assert_eq!(counts.get("cancelled"), Some(&5), "{counts:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(app.sink_total(), 0);
    assert!(rendered(&app).is_empty(), "a cancelled campaign was rendered");
    app.stop().await;
}
