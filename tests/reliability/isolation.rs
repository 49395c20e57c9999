//! Tenant isolation: every endpoint of the API (as `openapi.json` lists
//! them) tried with another tenant's ids, names and idempotency keys, and
//! with no key or a wrong one. Another tenant's things are 404 — never 403,
//! never theirs — and nothing they do changes what the owner sees or what
//! the owner's recipients get.

use std::collections::BTreeSet;
use std::time::Duration;

use ledger_tests::*;
use serde_json::{json, Value};

fn message(to: &str) -> Value {
    json!({ "to": to, "variables": { "name": "Ann" }, "content": { "subject": "Hi {{ name }}", "text": "Hello" } })
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    api_key: Option<&str>,
    idem: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = app.http().request(method, app.url(path));
    if let Some(k) = api_key {
        request = request.bearer_auth(k);
    }
    if let Some(k) = idem {
        request = request.header("idempotency-key", k);
    }
    if let Some(b) = body {
        request = request.json(b);
    }
    let reply = request.send().await.expect("request");
    let status = reply.status().as_u16();
    let text = reply.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_keeps_each_tenant_to_its_own() {
    let app = spawn_app().await;
    let acme = app.api_key.clone();
    let globex = app.other_tenant("globex").await;
    let mut checks = 0usize;
    let mut covered: BTreeSet<String> = BTreeSet::new();
    let mut cover = |route: &str| {
        covered.insert(route.to_owned());
    };
    use reqwest::Method as M;

    // Acme's things: a template, a campaign held by send_at (so a cancel
    // would take effect), a delivered message, a suppression.
    let (s, _) = send(
        &app,
        M::POST,
        "/v1/templates",
        Some(&acme),
        None,
        Some(&json!({ "name": "welcome", "content": { "subject": "Acme {{ name }}", "text": "acme" } })),
    )
    .await;
    assert_eq!(s, 201);
    let later = (chrono::Utc::now() + chrono::Duration::seconds(8)).to_rfc3339();
    let (s, campaign) = send(
        &app,
        M::POST,
        "/v1/campaigns",
        Some(&acme),
        Some("shared-key"),
        Some(&json!({ "name": "held", "from": "news@example.com", "send_at": later, "template": { "name": "welcome" },
                      "recipients": [ { "address": "held1@example.com", "variables": { "name": "A" } },
                                      { "address": "held2@example.com", "variables": { "name": "B" } } ] })),
    )
    .await;
    assert_eq!(s, 202, "{campaign}");
    let campaign_id = campaign["intent_id"].as_str().expect("id").to_owned();
    let (s, single) =
        send(&app, M::POST, "/v1/messages", Some(&acme), Some("one"), Some(&message("a@example.com"))).await;
    assert_eq!(s, 202);
    let message_id = single["message_id"].as_str().expect("id").to_owned();
    let intent_id = single["intent_id"].as_str().expect("id").to_owned();
    let (s, batch) = send(
        &app,
        M::POST,
        "/v1/messages/batch",
        Some(&acme),
        Some("batch-key"),
        Some(&json!({ "messages": [message("b1@example.com"), message("b2@example.com")] })),
    )
    .await;
    assert_eq!(s, 202, "{batch}");
    let (s, _) = send(
        &app,
        M::POST,
        "/v1/suppressions",
        Some(&acme),
        None,
        Some(&json!({ "recipients": ["gone@example.com"], "reason": "unsubscribe" })),
    )
    .await;
    assert_eq!(s, 200);
    app.wait_for_status(&message_id, "delivered").await;

    // Without a key, or with one that is no tenant's: 401 on every
    // tenant endpoint, whatever the ids.
    let tenant_routes: Vec<(M, String, &str)> = vec![
        (M::POST, "/v1/messages".into(), "POST /v1/messages"),
        (M::POST, "/v1/messages/batch".into(), "POST /v1/messages/batch"),
        (M::POST, "/v1/campaigns".into(), "POST /v1/campaigns"),
        (M::POST, format!("/v1/campaigns/{campaign_id}/cancel"), "POST /v1/campaigns/{id}/cancel"),
        (M::GET, format!("/v1/intents/{intent_id}"), "GET /v1/intents/{id}"),
        (M::GET, format!("/v1/messages/{message_id}"), "GET /v1/messages/{id}"),
        (M::POST, "/v1/suppressions".into(), "POST /v1/suppressions"),
        (M::GET, "/v1/suppressions/gone@example.com".into(), "GET /v1/suppressions/{recipient}"),
        (M::DELETE, "/v1/suppressions/gone@example.com".into(), "DELETE /v1/suppressions/{recipient}"),
        (M::POST, "/v1/templates".into(), "POST /v1/templates"),
        (M::GET, "/v1/templates/welcome".into(), "GET /v1/templates/{name}"),
    ];
    for (method, path, route) in &tenant_routes {
        for key in [None, Some("ldg_not-a-key"), Some("")] {
            let (s, body) = send(&app, method.clone(), path, key, Some("k"), Some(&json!({}))).await;
            assert_eq!(s, 401, "{route} with key {key:?}: {body}");
            assert_eq!(body["status"], 401, "{route}: problem+json");
            checks += 1;
        }
        cover(route);
    }

    // Globex with Acme's ids and names: 404, nothing of Acme's in it.
    for (method, path, route) in [
        (M::GET, format!("/v1/intents/{intent_id}"), "GET /v1/intents/{id}"),
        (M::GET, format!("/v1/intents/{campaign_id}"), "GET /v1/intents/{id}"),
        (M::GET, format!("/v1/messages/{message_id}"), "GET /v1/messages/{id}"),
        (M::POST, format!("/v1/campaigns/{campaign_id}/cancel"), "POST /v1/campaigns/{id}/cancel"),
        (M::GET, "/v1/suppressions/gone@example.com".to_owned(), "GET /v1/suppressions/{recipient}"),
        (M::DELETE, "/v1/suppressions/gone@example.com".to_owned(), "DELETE /v1/suppressions/{recipient}"),
        (M::GET, "/v1/templates/welcome".to_owned(), "GET /v1/templates/{name}"),
    ] {
        let body = (method == M::POST).then(|| json!({}));
        let (s, reply) = send(&app, method, &path, Some(&globex), None, body.as_ref()).await;
        assert_eq!(s, 404, "{route} ({path}) as another tenant: {reply}");
        assert_eq!(reply["type"], "urn:delivery-ledger:problem:not-found", "{route}");
        assert!(!reply.to_string().contains("acme"), "{route} tells nothing of the owner: {reply}");
        checks += 1;
    }

    // Globex with Acme's idempotency keys: its own intents, never Acme's
    // response and never a 409.
    for (path, key, body) in [
        ("/v1/messages", "one", message("a@example.com")),
        ("/v1/messages/batch", "batch-key", json!({ "messages": [message("b1@example.com")] })),
        (
            "/v1/campaigns",
            "shared-key",
            json!({ "name": "theirs", "from": "news@globex.test", "content": { "subject": "G", "text": "g" },
                    "recipients": [ { "address": "held1@example.com", "variables": {} } ] }),
        ),
    ] {
        let (s, theirs) = send(&app, M::POST, path, Some(&globex), Some(key), Some(&body)).await;
        assert_eq!(s, 202, "{path} with another tenant's key: {theirs}");
        let ids = |v: &Value| {
            let mut ids: BTreeSet<String> = BTreeSet::new();
            for k in ["intent_id", "message_id"] {
                if let Some(s) = v[k].as_str() {
                    ids.insert(s.to_owned());
                }
            }
            for r in v["results"].as_array().into_iter().flatten() {
                for k in ["intent_id", "message_id"] {
                    if let Some(s) = r[k].as_str() {
                        ids.insert(s.to_owned());
                    }
                }
            }
            ids
        };
        let acme_ids = [&single, &batch, &campaign].iter().flat_map(|v| ids(v)).collect::<BTreeSet<_>>();
        assert!(ids(&theirs).is_disjoint(&acme_ids), "{path}: another tenant got the owner's ids: {theirs}");
        checks += 1;
    }
    // ... and Acme's keys still answer Acme's responses.
    let (s, again) =
        send(&app, M::POST, "/v1/messages", Some(&acme), Some("one"), Some(&message("a@example.com"))).await;
    assert_eq!((s, again["message_id"].as_str()), (202, Some(message_id.as_str())), "{again}");
    checks += 1;

    // Globex's template of the same name, and its suppression of the same
    // address, are its own.
    let (s, _) = send(
        &app,
        M::POST,
        "/v1/templates",
        Some(&globex),
        None,
        Some(&json!({ "name": "welcome", "content": { "subject": "Globex {{ name }}", "text": "globex" } })),
    )
    .await;
    assert_eq!(s, 201);
    let (_, acme_versions) = send(&app, M::GET, "/v1/templates/welcome", Some(&acme), None, None).await;
    assert_eq!(acme_versions["versions"].as_array().map(Vec::len), Some(1), "{acme_versions}");
    assert_eq!(acme_versions["versions"][0]["content"]["subject"], "Acme {{ name }}");
    let (s, _) = send(
        &app,
        M::POST,
        "/v1/suppressions",
        Some(&globex),
        None,
        Some(&json!({ "recipients": ["acme-customer@example.com"], "reason": "complaint" })),
    )
    .await;
    assert_eq!(s, 200);
    checks += 3;
    let (s, _) = send(&app, M::GET, "/v1/suppressions/gone@example.com", Some(&acme), None, None).await;
    assert_eq!(s, 200, "the owner's suppression is still there after another tenant's DELETE");
    let (s, kept) =
        send(&app, M::POST, "/v1/messages", Some(&acme), Some("kept"), Some(&message("acme-customer@example.com")))
            .await;
    assert_eq!(s, 202);
    app.wait_for_status(kept["message_id"].as_str().expect("id"), "delivered").await;
    checks += 2;

    // The held campaign was not cancelled by the other tenant: both its
    // recipients are delivered when their time comes, with Acme's template.
    let statuses = eventually("the held campaign delivered", Duration::from_secs(60), || async {
        let s = app.statuses(&campaign_id).await;
        (s.get("delivered") == Some(&2)).then_some(s)
    })
    .await;
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    let (s, owner) = send(&app, M::GET, &format!("/v1/intents/{campaign_id}"), Some(&acme), None, None).await;
    assert_eq!(s, 200, "{owner}");
    checks += 2;
    for route in [
        "POST /v1/messages",
        "POST /v1/messages/batch",
        "POST /v1/campaigns",
        "POST /v1/campaigns/{id}/cancel",
        "GET /v1/intents/{id}",
        "GET /v1/messages/{id}",
        "POST /v1/suppressions",
        "GET /v1/suppressions/{recipient}",
        "DELETE /v1/suppressions/{recipient}",
        "POST /v1/templates",
        "GET /v1/templates/{name}",
    ] {
        cover(route);
    }

    // Provider feedback is signed by the provider, not by a tenant: the
    // tenant of what it reports is the message's own (tests/e2e/feedback.rs).
    cover("POST /v1/feedback/{source}");
    // Every endpoint the API documents is in this test.
    let doc: Value = app.http().get(app.url("/openapi.json")).send().await.expect("doc").json().await.expect("json");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        if !path.starts_with("/v1/") {
            continue;
        }
        for method in item.as_object().expect("item").keys() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let missing: Vec<_> = documented.difference(&covered).collect();
    assert!(missing.is_empty(), "endpoints not tried with another tenant's ids: {missing:?}");

    // Every message Acme submitted is delivered (the other tenant's
    // suppression of the same address changed nothing).
    let delivered: i64 = eventually("acme's six messages delivered", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "-- tests::isolation::delivered\nSELECT count(*) FROM messages WHERE tenant_id = 'acme' AND status = 'delivered'",
        )
        .fetch_one(&app.reporting)
        .await
        .ok()?;
        (n == 6).then_some(n)
    })
    .await;
    report(&Checked {
        scenario: "tenant isolation (every /v1 endpoint)".into(),
        accepted: 6,
        delivered,
        replay_differences: -1,
        notes: format!(
            "{checks} checks over {} documented endpoints: 401 without or with a wrong key, 404 for another tenant's ids, \
             names and suppressions, idempotency keys per tenant, the owner's campaign, template and suppression unchanged",
            documented.len()
        ),
        ..Default::default()
    });
    app.stop().await;
}
