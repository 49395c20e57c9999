//! Observability and operation: the series a campaign moves, the alert
//! rules (promtool), the dashboard's queries, the metrics and probes of a
//! role process, and a SIGTERM mid-campaign.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ledger_tests::*;
use serde_json::{json, Value};

/// Prometheus text format → `name{labels}` (labels sorted) → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let mut labels: Vec<&str> = rest.trim_end_matches('}').split(',').filter(|l| !l.is_empty()).collect();
                labels.sort();
                (n, labels.join(","))
            }
            None => (series, String::new()),
        };
        out.insert(format!("{name}{{{labels}}}"), value);
    }
    out
}

async fn scrape(app: &TestApp) -> BTreeMap<String, f64> {
    let text = app.http().get(app.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    parse_metrics(&text)
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_moves_the_key_series_by_the_right_amounts() {
    let app = spawn_app().await;
    let before = scrape(&app).await;
    let mut recipients: Vec<Value> = (0..20).map(|i| json!({ "address": format!("m{i}@example.com") })).collect();
    recipients.push(json!({ "address": "someone@elsewhere.test" }));
    let body = json!({ "name": "metrics", "from": "news@example.com",
                       "content": { "subject": "S", "text": "T" }, "recipients": recipients });
    let reply = app.post("/v1/campaigns", Some("metrics"), &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    app.wait_terminal(&intent, 21, Duration::from_secs(60)).await;
    // The consumers' lag comes from librdkafka's statistics, every 5 s.
    let after = eventually("every key series", Duration::from_secs(20), || async {
        let m = scrape(&app).await;
        let lag = m.keys().any(|k| k.starts_with("ledger_consumer_lag_records{"));
        let projected = m.get("ledger_projection_events_total{}").copied().unwrap_or(0.0) >= 1.0 + 21.0 * 3.0;
        (lag && projected).then_some(m)
    })
    .await;
    let d = |s: &str| delta(&before, &after, s);
    assert_eq!(d(r#"ledger_http_requests_total{route="/v1/campaigns",status="202"}"#), 1.0);
    assert_eq!(d(r#"ledger_intents_accepted_total{kind="campaign",tenant="acme"}"#), 1.0);
    assert_eq!(d(r#"ledger_recipients_accepted_total{kind="campaign",tenant="acme"}"#), 21.0);
    assert_eq!(d(r#"ledger_messages_rendered_total{channel="email",tenant="acme"}"#), 21.0);
    assert_eq!(d(r#"ledger_deliveries_total{identity="local-sink",outcome="delivered",tenant="acme"}"#), 20.0);
    assert_eq!(d(r#"ledger_deliveries_total{identity="",outcome="suppressed_sandbox",tenant="acme"}"#), 1.0);
    assert_eq!(d(r#"ledger_kafka_produced_total{outcome="ok",topic="rendered"}"#), 21.0);
    for stage in ["check", "claim", "produce", "record"] {
        let key = format!(r#"ledger_ingest_stage_seconds_count{{stage="{stage}"}}"#);
        assert_eq!(d(&key), 1.0, "one {stage} step for one campaign");
    }
    assert!(after.keys().any(|k| k.starts_with("ledger_http_request_seconds_bucket{")), "latency histogram");
    assert!(after.keys().any(|k| k.starts_with("ledger_provider_call_seconds_bucket{")), "provider latency");
    assert!(after.contains_key("ledger_projection_lag_seconds{}"));
    app.stop().await;
}

/// Every `ledger_*` name in `text`, without histogram suffixes.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ledger_") {
        let start = i + at;
        let before_ok = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        if before_ok && name.len() > "ledger_".len() {
            let base = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            names.push(base.to_owned());
        }
        i = end.max(start + 1);
    }
    names.sort();
    names.dedup();
    names
}

/// Every file under `dir` ending in `.rs`, read.
fn sources(dir: &std::path::Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).expect("source"));
        }
    }
}

#[test]
fn the_dashboard_and_the_alerts_query_only_series_the_roles_emit() {
    let root = workspace_root();
    let mut code = String::new();
    sources(&root.join("services"), &mut code);
    let alerts = std::fs::read_to_string(root.join("infra/prometheus/alerts.yml")).expect("alerts");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("infra/grafana/dashboards/ledger.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "delivery-ledger");
    let mut exprs = String::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no queries", p["title"]));
        assert!(!targets.is_empty());
        for t in targets {
            let e = t["expr"].as_str().expect("expr");
            assert!(!e.trim().is_empty());
            exprs.push_str(e);
            exprs.push('\n');
        }
    }
    for title in ["Campaign throughput", "Governor", "Lags", "Errors"] {
        assert!(panels.iter().any(|p| p["title"] == title), "row {title}");
    }
    for (what, text) in [("alerts.yml", &alerts), ("the dashboard", &exprs)] {
        let names = metric_names(text);
        assert!(names.len() >= 5, "{what}: {names:?}");
        for name in names {
            assert!(code.contains(&format!("\"{name}\"")), "{what} queries {name}, which no role emits");
        }
    }
}

fn promtool() -> String {
    let out = std::process::Command::new(workspace_root().join("infra/promtool.sh")).output().expect("promtool.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = promtool();
    let dir = workspace_root().join("infra/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let out = std::process::Command::new(&promtool).args(&args).current_dir(&dir).output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_mid_campaign_stops_the_dispatcher_in_time_and_nothing_is_lost_or_sent_twice() {
    let mut config = test_config();
    config.sink.latency_ms = 100;
    config.identities[0].concurrency = 16;
    config.telemetry.metrics_listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let app = spawn_app_without_dispatcher(config.clone()).await;
    let mut dispatcher = ledger_process(&config, &["run", "dispatch"]);

    // The role process serves its metrics and probes.
    let base = format!("http://{}", config.telemetry.metrics_listen);
    let health = eventually("the dispatcher's probes", Duration::from_secs(30), || async {
        let r = app.http().get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(r.json::<Value>().await.ok()?)
    })
    .await;
    assert_eq!(health, json!({ "broker": true, "operational_store": true }));
    assert_eq!(app.http().get(format!("{base}/healthz")).send().await.expect("healthz").status(), 200);

    let recipients: Vec<Value> = (0..300).map(|i| json!({ "address": format!("t{i}@example.com") })).collect();
    let body = json!({ "name": "sigterm", "from": "news@example.com",
                       "content": { "subject": "S", "text": "T" }, "recipients": recipients });
    let reply = app.post("/v1/campaigns", Some("sigterm"), &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let intent = reply.body["intent_id"].as_str().expect("id").to_owned();
    eventually("deliveries under way", Duration::from_secs(60), || async { (app.sink_total() >= 40).then_some(()) })
        .await;
    let metrics = app.http().get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("ledger_deliveries_total{"), "the role's own series");

    let asked = Instant::now();
    let _ = std::process::Command::new("kill").args(["-TERM", &dispatcher.id().to_string()]).status();
    let exit = dispatcher.wait().expect("reaped");
    let took = asked.elapsed();
    assert!(exit.success(), "a SIGTERM is a clean stop: {exit:?}");
    assert!(took < Duration::from_secs(u64::from(config.shutdown_grace_secs) + 5), "stopped in {took:?}");
    let at_stop = app.sink_total();
    assert!(at_stop < 300, "stopped mid-campaign ({at_stop} sent)");
    eprintln!("stopped in {took:?} with {at_stop} of 300 sent");

    let mut dispatcher = ledger_process(&config, &["run", "dispatch"]);
    let counts = app.wait_terminal(&intent, 300, Duration::from_secs(90)).await;
    let _ = std::process::Command::new("kill").args(["-TERM", &dispatcher.id().to_string()]).status();
    dispatcher.wait().expect("reaped");
    assert_eq!(counts.get("delivered"), Some(&300), "a graceful stop leaves nothing ambiguous: {counts:?}");
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in ledger_dispatcher::sink::read_deliveries(&app.config.sink.dir).expect("sink") {
        *per_id.entry(r.message_id.to_string()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 300, "every message reached the sink");
    assert!(per_id.values().all(|n| *n == 1), "none twice");
    app.stop().await;
}

#[test]
fn the_kubernetes_manifests_validate_against_the_api_schemas() {
    // kubernetes-validate (PyPI, installed by `make test-tools`): offline,
    // strict (an unknown field fails), against the Kubernetes 1.30 schemas.
    let root = workspace_root();
    let tool = root.join(".local/venv/bin/kubernetes-validate");
    assert!(tool.exists(), "{} is missing: run `make test-tools`", tool.display());
    let out = std::process::Command::new(&tool)
        .args(["--strict", "-k", "1.30.0", "--no-warn"])
        .arg(root.join("infra/k8s/ledger.yaml"))
        .output()
        .expect("kubernetes-validate");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for kind in ["deployment/ledger-ingest", "deployment/ledger-dispatch", "horizontalpodautoscaler/ledger-dispatch"] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} checked:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_correlation_id_of_a_request_travels_through_every_role_into_the_logs_and_the_events() {
    let mut config = test_config();
    config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.telemetry.log_format = "json".into();
    ledger_ok(&config, &["db", "migrate"]);
    ledger_ok(&config, &["topics", "create"]);
    let created = ledger_ok(&config, &["tenants", "create", "acme"]);
    let key = created.lines().last().expect("the key").trim().to_owned();
    let file = config.sink.dir.parent().expect("dir").join("ledger.toml");
    let log_path = config.sink.dir.parent().expect("dir").join("ledger.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut ledger = ledger_command(&file)
        .env("RUST_LOG", "info,ledger_renderer=debug,ledger_dispatcher=debug")
        .args(["run", "all"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("ledger run all");

    let http = reqwest::Client::new();
    let base = format!("http://{}", config.http.listen);
    eventually("the API", Duration::from_secs(30), || async {
        http.get(format!("{base}/healthz")).send().await.ok().filter(|r| r.status() == 200)
    })
    .await;
    let trace = format!("trace-{}", uuid::Uuid::new_v4().simple());
    let reply = http
        .post(format!("{base}/v1/messages"))
        .bearer_auth(&key)
        .header("idempotency-key", "traced")
        .header("x-correlation-id", &trace)
        .json(&json!({ "to": "traced@example.com", "from": "shop@example.com",
                       "content": { "subject": "S", "text": "T" } }))
        .send()
        .await
        .expect("submit");
    assert_eq!(reply.status(), 202);
    assert_eq!(reply.headers()["x-correlation-id"], trace.as_str(), "echoed");
    let id = reply.json::<Value>().await.expect("json")["message_id"].as_str().expect("id").to_owned();
    let sink = config.sink.dir.clone();
    eventually("the delivery", Duration::from_secs(60), || {
        let sink = sink.clone();
        let id = id.clone();
        async move {
            let all = ledger_dispatcher::sink::read_deliveries(&sink).ok()?;
            all.iter().any(|r| r.message_id.to_string() == id).then_some(())
        }
    })
    .await;
    let _ = std::process::Command::new("kill").args(["-TERM", &ledger.id().to_string()]).status();
    assert!(ledger.wait().expect("reaped").success());

    // In the logs of every role that handled it...
    let text = std::fs::read_to_string(&log_path).expect("log");
    let mut roles: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["correlation_id"] == trace.as_str())
        .filter_map(|l| l["target"].as_str().and_then(|t| t.split("::").next()).map(str::to_owned))
        .collect();
    roles.sort();
    roles.dedup();
    assert_eq!(roles, ["ledger_dispatcher", "ledger_ingest", "ledger_renderer"], "{text}");
    // ...and on every event about it.
    for topic in [ledger_schemas::Topic::Intents, ledger_schemas::Topic::Rendered, ledger_schemas::Topic::Outcomes] {
        let events: Vec<ledger_schemas::Event> =
            read_topic_raw(&config, topic).iter().filter_map(|b| ledger_schemas::Event::from_json(b).ok()).collect();
        assert!(!events.is_empty(), "{topic:?}");
        assert!(events.iter().all(|e| e.correlation_id == trace), "{topic:?}: {events:?}");
    }
    drop_databases(&config).await;
}
