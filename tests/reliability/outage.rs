//! Outages of what the roles depend on: the reporting PostgreSQL stops for
//! 30 s; the provider answers 503 for a while.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger_runtime::config::{IdentityConfig, ProviderKind};
use ledger_tests::*;
use serde_json::{json, Value};

use crate::common::*;

/// A PostgreSQL cluster of the test's own (Debian's server binaries, run as
/// `postgres` when the test runs as root), so that it can be stopped
/// without stopping the ops database.
struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn create(dir: &std::path::Path) -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries in /usr/lib/postgresql (Debian's postgresql package)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("initdb");
        std::fs::create_dir_all(dir).expect("dir");
        let this = PrivatePostgres { bin, data: dir.join("data"), port: free_port() };
        if is_root() {
            let ok = std::process::Command::new("chown").args(["postgres:", &dir.to_string_lossy()]).status();
            assert!(ok.is_ok_and(|s| s.success()), "chown to postgres");
        }
        let out = this
            .as_owner(&this.bin.join("initdb"))
            .args(["-D", &this.data.to_string_lossy(), "-U", "postgres", "-A", "trust", "--no-sync"])
            .output()
            .expect("initdb");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        this.start();
        this
    }

    fn as_owner(&self, program: &std::path::Path) -> std::process::Command {
        if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        }
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn start(&self) {
        let log = self.data.parent().expect("dir").join("server.log");
        let out = self
            .as_owner(&self.bin.join("pg_ctl"))
            .args(["-D", &self.data.to_string_lossy(), "-l", &log.to_string_lossy(), "-w", "-t", "60"])
            .arg("-o")
            .arg(format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.data.display()))
            .arg("start")
            .output()
            .expect("pg_ctl start");
        assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A fast shutdown: connections are cut, the server is gone.
    fn stop(&self) {
        let out = self
            .as_owner(&self.bin.join("pg_ctl"))
            .args(["-D", &self.data.to_string_lossy(), "-m", "fast", "-w", "stop"])
            .output()
            .expect("pg_ctl stop");
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .as_owner(&self.bin.join("pg_ctl"))
            .args(["-D", &self.data.to_string_lossy(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(self.data.parent().expect("dir"));
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_model_stopping_for_30_seconds_stalls_nothing_else_and_is_caught_up() {
    let n = 20_000;
    let mut config = test_config();
    let pg = PrivatePostgres::create(&std::env::temp_dir().join("ledger-tests").join(format!("pg-{}", free_port())));
    config.reporting_database_url = pg.url("reporting");
    // Delivery paced by the governor, so that it spans the outage.
    let mut identity = IdentityConfig::new("paced", ProviderKind::Sink);
    identity.per_second = 400;
    identity.burst = 20;
    config.identities = vec![identity];
    let Started { mut roles, api_key, reporting, http, base } = start(&config).await;

    let (intent, _) = submit_until_accepted(
        &http,
        &base,
        &api_key,
        "outage",
        &ndjson_campaign("outage", "o", n),
        Duration::from_secs(60),
    )
    .await;
    eventually("a first part in the read model", Duration::from_secs(120), || async {
        (settled_count(&status_counts_of(&reporting, &intent).await) >= 2_000).then_some(())
    })
    .await;

    // The outage.
    reporting.close().await;
    pg.stop();
    let stopped = Instant::now();
    let sent_at_stop = sink_counts(&config).len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Ingest still accepts (it never needs the read model to accept).
    let (_, _) = submit_until_accepted(
        &http,
        &base,
        &api_key,
        "during-outage",
        &ndjson_campaign("during", "d", 10),
        Duration::from_secs(5),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    roles.assert_running();
    let sent_during = sink_counts(&config).len() - sent_at_stop;
    pg.start();
    let outage = stopped.elapsed();
    let restarted = Instant::now();
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 2).await.expect("pool");
    wait_settled(&mut roles, &reporting, &intent, n, Duration::from_secs(300)).await;
    let caught_up = restarted.elapsed();
    let projector_log = roles.log_tail("project");
    roles.stop();

    assert!(
        sent_during >= 5_000,
        "delivery went on while the read model was down: {sent_during} sent in {outage:?} (governor 400/s)"
    );
    assert!(projector_log.contains("retrying"), "the projector said it was waiting:\n{projector_log}");
    let notes = format!(
        "reporting PostgreSQL down {:.1} s with {sent_at_stop} delivered; {sent_during} delivered meanwhile \
         (governor 400/s); a campaign accepted during it; projector never exited, caught up {:.1} s after the restart",
        outage.as_secs_f64(),
        caught_up.as_secs_f64()
    );
    let row = check(
        &config,
        &reporting,
        &intent,
        n,
        Received::Sink,
        "read-model outage (reporting PostgreSQL stopped 30 s)",
        notes,
    )
    .await;
    assert_eq!((row.delivered, row.ambiguous, row.dead_lettered), (n as i64, 0, 0), "{row:?}");
    reporting.close().await;
    drop_databases(&config).await;
}

/// A Mailgun-style API that answers 503 while `down`, and records when
/// each call came and what it answered.
#[derive(Clone, Default)]
struct FlakyApi {
    down: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<(Instant, String, u16)>>>,
}

async fn flaky_api(
    axum::extract::State(api): axum::extract::State<FlakyApi>,
    axum::extract::Form(form): axum::extract::Form<std::collections::HashMap<String, String>>,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    let id = form.get("v:ledger-message-id").cloned().unwrap_or_default();
    let down = api.down.load(Ordering::SeqCst);
    let status = if down { 503 } else { 200 };
    api.calls.lock().expect("lock").push((Instant::now(), id.clone(), status));
    if down {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "message": "try later" })));
    }
    (axum::http::StatusCode::OK, axum::Json(json!({ "id": format!("<{id}@api>"), "message": "Queued." })))
}

/// The governor must hold the calls the provider sees, not only the
/// permissions it grants: after the outage a backlog of retries and fresh
/// messages competes for the budget (this failed, 156–227 calls in a second,
/// until a permission came with its call slot and went stale after
/// `dispatcher.governor_grant_ttl_ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_answering_503_for_a_while_is_waited_out_within_the_rate_and_nothing_is_sent_twice() {
    let n = 3_000usize;
    let per_second = 100u32;
    let api = FlakyApi::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = axum::Router::new()
        .route("/v3/mg.example.com/messages", axum::routing::post(flaky_api))
        .with_state(api.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut identity = IdentityConfig::new("flaky", ProviderKind::HttpEmail);
    identity.url = Some(format!("http://{addr}/v3/mg.example.com"));
    identity.password = Some("key-123".into());
    identity.per_second = per_second;
    identity.burst = 10;
    identity.concurrency = 32;
    let mut config = test_config();
    config.identities = vec![identity];
    config.dispatcher.max_attempts = 12;
    config.dispatcher.retry_backoff_ms = 200;
    config.dispatcher.retry_backoff_max_ms = 3_000;
    let Started { mut roles, api_key, reporting, http, base } = start(&config).await;
    let (intent, _) = submit_until_accepted(
        &http,
        &base,
        &api_key,
        "flaky",
        &ndjson_campaign("flaky", "f", n),
        Duration::from_secs(60),
    )
    .await;

    let ok_calls = |api: &FlakyApi| api.calls.lock().expect("lock").iter().filter(|c| c.2 == 200).count();
    eventually("a first part delivered", Duration::from_secs(120), || async { (ok_calls(&api) >= 500).then_some(()) })
        .await;
    api.down.store(true, Ordering::SeqCst);
    let outage = Duration::from_secs(12);
    tokio::time::sleep(outage).await;
    api.down.store(false, Ordering::SeqCst);
    wait_settled(&mut roles, &reporting, &intent, n, Duration::from_secs(300)).await;
    roles.stop();

    let calls = api.calls.lock().expect("lock").clone();
    let refused = calls.iter().filter(|c| c.2 == 503).count();
    let mut accepted_per_id: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for c in calls.iter().filter(|c| c.2 == 200) {
        *accepted_per_id.entry(c.1.as_str()).or_default() += 1;
    }
    let twice = accepted_per_id.values().filter(|v| **v > 1).count();
    // The most calls the provider saw in any `window` (the governor counts
    // refused calls too: they spend the account's budget at the provider).
    // It paces the calls it grants; their arrival adds the network's and the
    // scheduler's jitter, so a one-second window can catch a few calls
    // granted late in the one before.
    let times: Vec<Instant> = calls.iter().map(|c| c.0).collect();
    let (busiest_1s, busiest_5s) = (busiest(&times, Duration::from_secs(1)), busiest(&times, Duration::from_secs(5)));
    let retried: i64 = sqlx::query_scalar(
        "-- tests::flaky::retried\nSELECT count(*) FROM messages WHERE intent_id = $1::uuid AND attempts > 1",
    )
    .bind(&intent)
    .fetch_one(&reporting)
    .await
    .expect("retried");
    let max_attempts: i32 = sqlx::query_scalar(
        "-- tests::flaky::max_attempts\nSELECT max(attempts) FROM messages WHERE intent_id = $1::uuid",
    )
    .bind(&intent)
    .fetch_one(&reporting)
    .await
    .expect("max attempts");
    let reasons: Vec<String> = sqlx::query_scalar(
        "-- tests::flaky::reasons\nSELECT DISTINCT error_code FROM delivery_attempts WHERE error_code IS NOT NULL",
    )
    .fetch_all(&reporting)
    .await
    .expect("reasons");

    let notes = format!(
        "provider down {} s: {refused} calls answered 503, {retried} messages retried (at most {max_attempts} attempts, \
         error codes {reasons:?}); busiest second {busiest_1s} calls, busiest 5 s {busiest_5s} (limit {per_second}/s, burst 10); {} accepted calls",
        outage.as_secs(),
        accepted_per_id.len()
    );
    let received = accepted_per_id.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let row = check(
        &config,
        &reporting,
        &intent,
        n,
        Received::Counted(received),
        "provider outage (HTTP API answers 503 for 12 s)",
        notes,
    )
    .await;
    assert_eq!(twice, 0, "the provider accepted a message twice");
    assert_eq!(accepted_per_id.len(), n, "the provider accepted every message");
    assert_eq!((row.delivered, row.ambiguous), (n as i64, 0), "{row:?}");
    assert!(refused > 0 && retried > 0, "the outage was felt: {refused} refused, {retried} retried");
    // GCRA allows rate × window + burst grants in any window; 250 ms of
    // arrival jitter on top (four debug-built processes on two cores).
    let allowed = |secs: f64| (f64::from(per_second) * (secs + 0.25) + 10.0) as usize;
    assert!(
        busiest_1s <= allowed(1.0) && busiest_5s <= allowed(5.0),
        "the governor held through the retries: {busiest_1s} calls in 1 s ({} allowed), {busiest_5s} in 5 s ({} allowed)",
        allowed(1.0),
        allowed(5.0)
    );
    reporting.close().await;
    drop_databases(&config).await;
}
