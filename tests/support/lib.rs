//! Test support: `spawn_app()` builds every role through the same `build`
//! functions production uses, against the real broker and PostgreSQL, with
//! its own topic prefix, consumer groups and databases so tests run in
//! parallel without seeing each other.
//!
//! `LEDGER_TEST_BROKERS` (default `127.0.0.1:9092`) and
//! `LEDGER_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) say where they are.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ledger_runtime::{Config, Shutdown};
use ledger_schemas::{Event, Topic};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;
use sqlx::PgPool;

pub mod roles;
pub use roles::*;

pub fn brokers() -> String {
    std::env::var("LEDGER_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn admin_database_url() -> String {
    std::env::var("LEDGER_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `base` with its database name replaced by `name`.
pub fn database_url(base: &str, name: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (base, String::new()),
    };
    let after_scheme = head.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match head[after_scheme..].find('/') {
        Some(i) => &head[..after_scheme + i],
        None => head,
    };
    format!("{root}/{name}{query}")
}

/// A configuration of its own for one test: unique prefix, databases and
/// sink directory, API on an ephemeral port.
pub fn test_config() -> Config {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let mut config = Config::default();
    config.kafka.brokers = brokers();
    config.kafka.topic_prefix = format!("t{id}.");
    let base = admin_database_url();
    config.ops_database_url = database_url(&base, &format!("t{id}_ops"));
    config.reporting_database_url = database_url(&base, &format!("t{id}_reporting"));
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.telemetry.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.sink.dir = std::env::temp_dir().join("ledger-tests").join(&id).join("sink");
    config.dispatcher.retry_backoff_ms = 50;
    config
}

pub struct TestApp {
    pub config: Config,
    pub api: SocketAddr,
    pub tenant: String,
    pub api_key: String,
    pub ops: PgPool,
    pub reporting: PgPool,
    pub shutdown: Shutdown,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    http: reqwest::Client,
}

/// Sets up topics and databases for `config`.
pub async fn prepare(config: &Config) -> anyhow::Result<()> {
    ledger_runtime::db::migrate(
        &config.ops_database_url,
        &config.reporting_database_url,
        &ledger_projections::MIGRATOR,
    )
    .await?;
    ledger_runtime::kafka::wait_for_broker(config, Duration::from_secs(30)).await?;
    ledger_runtime::kafka::create_topics(config, 1).await?;
    Ok(())
}

/// A migrated reporting database of its own (and its configuration, for
/// `drop_databases`), without broker or roles.
pub async fn reporting_database() -> (Config, PgPool) {
    let config = test_config();
    ledger_runtime::db::migrate(
        &config.ops_database_url,
        &config.reporting_database_url,
        &ledger_projections::MIGRATOR,
    )
    .await
    .expect("migrate");
    let pool = ledger_runtime::db::pool(&config.reporting_database_url, 4).await.expect("pool");
    (config, pool)
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(test_config()).await
}

pub async fn spawn_app_with(config: Config) -> TestApp {
    spawn_roles(config, true).await
}

/// The ingest API alone (`pipeline == false`), or with every other role.
pub async fn spawn_roles(config: Config, pipeline: bool) -> TestApp {
    spawn(config, pipeline, pipeline).await
}

/// Every role but the dispatcher, which the test runs as a process of its
/// own (`ledger_process`).
pub async fn spawn_app_without_dispatcher(config: Config) -> TestApp {
    spawn(config, true, false).await
}

async fn spawn(config: Config, pipeline: bool, dispatcher: bool) -> TestApp {
    ledger_runtime::telemetry::init(&config.telemetry);
    prepare(&config).await.expect("topics and databases");
    let ops = ledger_runtime::db::pool(&config.ops_database_url, 4).await.expect("ops pool");
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 4).await.expect("reporting pool");
    let tenant = "acme".to_owned();
    let api_key = ledger_ingest::tenants::create(&ops, &tenant).await.expect("tenant");

    let shutdown = Shutdown::new();
    let mut tasks = tokio::task::JoinSet::new();
    let ingest = ledger_ingest::build(&config).await.expect("ingest");
    let api = ingest.local_addr();
    let s = shutdown.clone();
    tasks.spawn(async move { ingest.run(s).await.map_err(anyhow::Error::from) });
    if pipeline {
        let renderer = ledger_renderer::build(&config).await.expect("renderer");
        let s = shutdown.clone();
        tasks.spawn(async move { renderer.run(s).await.map_err(anyhow::Error::from) });
        if dispatcher {
            let dispatcher = ledger_dispatcher::build(&config).await.expect("dispatcher");
            let s = shutdown.clone();
            tasks.spawn(async move { dispatcher.run(s).await.map_err(anyhow::Error::from) });
        }
        let projector = ledger_projector::build(&config).await.expect("projector");
        let s = shutdown.clone();
        tasks.spawn(async move { projector.run(s).await.map_err(anyhow::Error::from) });
    }

    TestApp { config, api, tenant, api_key, ops, reporting, shutdown, tasks, http: reqwest::Client::new() }
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// POSTs `body` to `path` with this app's API key and `key` as the
    /// Idempotency-Key.
    pub async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Reply {
        self.post_as(&self.api_key, path, key, body).await
    }

    /// POSTs `body` to `path` as the tenant of `api_key`.
    pub async fn post_as(&self, api_key: &str, path: &str, key: Option<&str>, body: &Value) -> Reply {
        let mut request = self.http.post(self.url(path)).bearer_auth(api_key).json(body);
        if let Some(k) = key {
            request = request.header("idempotency-key", k);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        Reply { status, headers, body }
    }

    /// GETs `path` with `key` as the API key.
    pub async fn get_as(&self, key: &str, path: &str) -> Reply {
        let response = self.http.get(self.url(path)).bearer_auth(key).send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        Reply { status, headers, body }
    }

    /// A second tenant and its API key.
    pub async fn other_tenant(&self, name: &str) -> String {
        ledger_ingest::tenants::create(&self.ops, name).await.expect("tenant")
    }

    /// Messages of `intent_id` in the read model by status.
    pub async fn statuses(&self, intent_id: &str) -> std::collections::BTreeMap<String, i64> {
        let id = uuid::Uuid::parse_str(intent_id).expect("uuid");
        sqlx::query_as::<_, (String, i64)>(
            "-- tests::statuses
             SELECT status, count(*) FROM messages WHERE intent_id = $1 GROUP BY status",
        )
        .bind(id)
        .fetch_all(&self.reporting)
        .await
        .expect("query")
        .into_iter()
        .collect()
    }

    /// Waits until `n` messages of the intent are terminal; returns the counts.
    pub async fn wait_terminal(
        &self,
        intent_id: &str,
        n: i64,
        timeout: Duration,
    ) -> std::collections::BTreeMap<String, i64> {
        let id = uuid::Uuid::parse_str(intent_id).expect("uuid");
        eventually(&format!("{n} terminal messages of {intent_id}"), timeout, || async move {
            let terminal: i64 = sqlx::query_scalar(
                "-- tests::wait_terminal
                 SELECT count(*) FROM messages WHERE intent_id = $1 AND status_rank = 50",
            )
            .bind(id)
            .fetch_one(&self.reporting)
            .await
            .expect("query");
            (terminal >= n).then_some(())
        })
        .await;
        self.statuses(intent_id).await
    }

    /// How many deliveries the sink received in all.
    pub fn sink_total(&self) -> usize {
        ledger_dispatcher::sink::read_deliveries(&self.config.sink.dir).expect("sink log").len()
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The read model's row for `message_id`, as JSON, if it exists.
    pub async fn message_row(&self, message_id: &str) -> Option<Value> {
        let id = uuid::Uuid::parse_str(message_id).ok()?;
        sqlx::query_scalar(
            "-- tests::message_row
             SELECT to_jsonb(m) FROM messages m WHERE message_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.reporting)
        .await
        .expect("query")
    }

    /// Waits until the message's row has `status`, and returns the row.
    pub async fn wait_for_status(&self, message_id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let row = self.message_row(message_id).await;
            if let Some(r) = &row {
                if r["status"] == status {
                    return r.clone();
                }
            }
            assert!(Instant::now() < deadline, "message {message_id} never reached {status}; last row: {row:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many times the sink received each message id.
    pub fn sink_deliveries(&self, message_id: &str) -> usize {
        ledger_dispatcher::sink::read_deliveries(&self.config.sink.dir)
            .expect("sink log")
            .iter()
            .filter(|r| r.message_id.to_string() == message_id)
            .count()
    }

    /// Every event on `topic`, read from the beginning up to its current end.
    pub fn read_topic(&self, topic: Topic) -> Vec<Event> {
        read_topic_raw(&self.config, topic).into_iter().filter_map(|bytes| Event::from_json(&bytes).ok()).collect()
    }

    pub async fn stop(mut self) {
        self.shutdown.trigger();
        while let Some(joined) = self.tasks.join_next().await {
            joined.expect("role panicked").expect("role failed");
        }
        self.ops.close().await;
        self.reporting.close().await;
        drop_databases(&self.config).await;
        let _ = std::fs::remove_dir_all(self.config.sink.dir.parent().unwrap_or(&self.config.sink.dir));
    }
}

pub async fn drop_databases(config: &Config) {
    use sqlx::Connection;
    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_database_url()).await {
        for url in [&config.ops_database_url, &config.reporting_database_url] {
            let name = url.rsplit('/').next().unwrap_or_default().split('?').next().unwrap_or_default();
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await;
        }
    }
}

/// A consumer in a group of its own that commits nothing: for reading the
/// log or its watermarks beside the roles, never moving their groups.
pub fn throwaway_consumer(config: &Config) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// Record values on `topic` from the beginning until it has been quiet
/// for a second. Watermarks are not used: the local broker reports a high
/// watermark one short when a produce request carried several records.
pub fn read_topic_raw(config: &Config, topic: Topic) -> Vec<Vec<u8>> {
    let consumer = throwaway_consumer(config);
    let name = config.topic(topic);
    let mut tpl = TopicPartitionList::new();
    for p in 0..topic.partitions() {
        tpl.add_partition_offset(&name, p, Offset::Beginning).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Until the first record, allow for connecting and fetching offsets.
    let mut last_seen = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline && Instant::now() < last_seen + Duration::from_secs(1) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(m.payload().unwrap_or_default().to_vec());
                last_seen = Instant::now();
            }
            Some(Err(e)) => panic!("reading {name}: {e}"),
            None => {}
        }
    }
    out
}

/// The `ledger` binary next to the test executable (built by the same
/// `cargo nextest run --workspace`), or `LEDGER_TEST_BIN`.
pub fn ledger_bin() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("LEDGER_TEST_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target directory");
    let bin = dir.join("ledger");
    assert!(bin.exists(), "{} is missing: build the workspace first (cargo build)", bin.display());
    bin
}

/// A `ledger` process with `args`, configured by `config` (written to a
/// TOML file next to its sink directory).
pub fn ledger_process(config: &Config, args: &[&str]) -> std::process::Child {
    let dir = config.sink.dir.parent().expect("test directory").to_path_buf();
    std::fs::create_dir_all(&dir).expect("test directory");
    let file = dir.join("ledger.toml");
    std::fs::write(&file, toml::to_string(config).expect("config as TOML")).expect("config file");
    ledger_command(&file).args(args).spawn().expect("start ledger")
}

/// Runs `ledger` with `args`, configured by `config`, to the end; its
/// standard input is no terminal.
pub fn ledger_output(config: &Config, args: &[&str]) -> std::process::Output {
    let dir = config.sink.dir.parent().expect("test directory").to_path_buf();
    std::fs::create_dir_all(&dir).expect("test directory");
    let file = dir.join("ledger.toml");
    std::fs::write(&file, toml::to_string(config).expect("config as TOML")).expect("config file");
    ledger_command(&file).args(args).output().expect("run ledger")
}

/// Like [`ledger_output`], and asserts that it succeeded; returns its
/// standard output.
pub fn ledger_ok(config: &Config, args: &[&str]) -> String {
    let out = ledger_output(config, args);
    assert!(
        out.status.success(),
        "ledger {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `ledger` binary configured by the TOML file `config` alone: the
/// `LEDGER_*` variables of the test's own environment (`make test` exports
/// local defaults) would override it.
pub fn ledger_command(config: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(ledger_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LEDGER_") {
            command.env_remove(&key);
        }
    }
    command.env("LEDGER_CONFIG", config).env("RUST_LOG", "warn,ledger_runtime::kafka=info");
    command
}

/// A consumer of every partition of `topic` from the beginning, in a group
/// of its own that commits nothing (benchmarks' readers).
pub fn assigned<C: rdkafka::config::FromClientConfig + Consumer>(config: &Config, topic: Topic) -> C {
    let consumer: C = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", format!("bench-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..topic.partitions() {
        tpl.add_partition_offset(&config.topic(topic), p, Offset::Beginning).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// Waits until `n` records have arrived on `topic` (read from the
/// beginning) and returns when the last did, or panics after `within`. A
/// plain polling consumer on a thread of its own: it reads several times
/// faster than the roles write, so it bounds none of them.
pub async fn count_until(config: &Config, topic: Topic, n: usize, within: Duration) -> Instant {
    let consumer: BaseConsumer = assigned(config, topic);
    let name = config.topic(topic);
    tokio::task::spawn_blocking(move || {
        let mut seen = 0;
        let deadline = Instant::now() + within;
        while seen < n {
            assert!(Instant::now() < deadline, "only {seen} of {n} records on {name}");
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                seen += 1;
            }
        }
        Instant::now()
    })
    .await
    .expect("reader")
}

/// Runs `main` on a multi-threaded tokio runtime, with the role processes
/// it starts (`ledger_bin`) being the release build of `ledger`. `make`
/// names the target that builds it. The variable is set before the runtime
/// starts any thread. Setting the environment while another thread reads it
/// is a data race: C code such as mimalloc's option reader or librdkafka
/// reads `environ` without Rust's lock. That race is the likely cause of a
/// benchmark that exited with SIGSEGV before its first line, once in nine
/// runs (2026-12-07).
pub fn run_with_release_ledger<F: std::future::Future<Output = ()>>(make: &str, main: F) {
    let bin = workspace_root().join("target/release/ledger");
    assert!(bin.exists(), "{} is missing: `cargo build --release -p ledger` ({make} does)", bin.display());
    std::env::set_var("LEDGER_TEST_BIN", &bin);
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime").block_on(main)
}

/// The workspace's root directory.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// A real SMTP server (aiosmtpd, installed by `make test-tools` into
/// `.local/venv`) on a free port, writing what it accepts to `dir`. Killed
/// when dropped.
pub struct SmtpServer {
    pub port: u16,
    pub dir: std::path::PathBuf,
    child: std::process::Child,
}

impl SmtpServer {
    pub fn start() -> SmtpServer {
        use std::io::BufRead;
        let python = std::env::var("LEDGER_TEST_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join(".local/venv/bin/python"));
        assert!(python.exists(), "{} is missing: run `make test-tools`", python.display());
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let dir = std::env::temp_dir().join("ledger-tests").join(format!("smtp-{}", uuid::Uuid::new_v4().simple()));
        let mut child = std::process::Command::new(python)
            .arg(workspace_root().join("tests/support/smtp_server.py"))
            .arg(port.to_string())
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the SMTP server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
        assert_eq!(line.trim(), "ready", "the SMTP server did not start");
        SmtpServer { port, dir, child }
    }

    /// Every message received, as raw text, in order.
    pub fn received(&self) -> Vec<String> {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.iter().map(|p| std::fs::read_to_string(p).expect("message")).collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// For diagnosing a stalled consumer group: per partition of `topic`, the
/// group's committed offset and the partition's watermarks.
pub fn group_positions(config: &Config, group: ledger_schemas::ConsumerGroup, topic: Topic) -> String {
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", config.group(group))
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(c) => c,
        Err(e) => return format!("no consumer: {e}"),
    };
    let name = config.topic(topic);
    let mut tpl = TopicPartitionList::new();
    for p in 0..topic.partitions() {
        let _ = tpl.add_partition(&name, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(5));
    let mut out = format!("group {} on {name}:\n", config.group(group));
    for p in 0..topic.partitions() {
        let c = committed
            .as_ref()
            .ok()
            .and_then(|t| t.find_partition(&name, p))
            .map(|e| format!("{:?}", e.offset()))
            .unwrap_or_else(|| "?".into());
        let w = consumer.fetch_watermarks(&name, p, Duration::from_secs(5));
        out.push_str(&format!("  partition {p}: committed {c}, watermarks {w:?}\n"));
    }
    out
}

/// The most of `times` (sorted) within any `window`: how many calls a
/// provider saw in its busiest second, say.
pub fn busiest(times: &[Instant], window: Duration) -> usize {
    let (mut most, mut lo) = (0, 0);
    for hi in 0..times.len() {
        while times[hi].duration_since(times[lo]) >= window {
            lo += 1;
        }
        most = most.max(hi - lo + 1);
    }
    most
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long the k-th of `sent` (event times, oldest first) waited until a
/// sampled count (`samples`: time and count, in order) first reached k + 1,
/// in seconds, sorted; `now` stands for a count never reached, and
/// `elapsed(from, to)` measures.
pub fn lags_until_counted<T: Copy>(
    sent: &[T],
    samples: &[(T, i64)],
    now: T,
    elapsed: impl Fn(T, T) -> f64,
) -> Vec<f64> {
    let mut lags: Vec<f64> = Vec::with_capacity(sent.len());
    let mut s = 0;
    for (k, at) in sent.iter().enumerate() {
        while s < samples.len() && (samples[s].1 as usize) < k + 1 {
            s += 1;
        }
        let seen = samples.get(s).map(|x| x.0).unwrap_or(now);
        lags.push(elapsed(*at, seen).max(0.0));
    }
    lags.sort_by(|a, b| a.total_cmp(b));
    lags
}

/// The `q` quantile (0 to 1) of sorted values, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// Benchmarks' synthetic log: one intent of `messages` recipients (a
/// recipient batch per 1,000), then every message rendered, attempted and
/// delivered, stage by stage.
pub fn lifecycle_events_of_size(messages: usize) -> Vec<Event> {
    use ledger_schemas::*;
    use uuid::Uuid;
    let tenant = TenantId("acme".into());
    let intent = IntentId(Uuid::new_v4());
    let ev = |body, message_id: Option<MessageId>, what: &str, seq: u32| Event {
        event_id: EventId::derive(message_id.map(|m| m.0).unwrap_or(intent.0), what, seq),
        body,
        tenant_id: tenant.clone(),
        intent_id: intent,
        message_id,
        occurred_at: chrono::Utc::now(),
        correlation_id: "bench".into(),
    };
    let address = |i: usize| format!("c{i}@example.com");
    let mut events = Vec::new();
    for b in 0..messages / 1000 {
        let recipients = (b * 1000..(b + 1) * 1000)
            .map(|i| Recipient { address: address(i), variables: Default::default() })
            .collect();
        events.push(ev(
            EventBody::RecipientBatch(RecipientBatch {
                batch_index: b as u32,
                batch_count: (messages / 1000) as u32,
                channel: Channel::Email,
                priority: Priority::Bulk,
                from: None,
                content: Content::default(),
                template: None,
                recipients,
                send_at: None,
            }),
            None,
            "batch",
            b as u32,
        ));
    }
    for stage in 0..3 {
        for i in 0..messages {
            let id = MessageId::derive(intent, &address(i));
            let (body, what) = match stage {
                0 => (
                    EventBody::MessageRendered(MessageRendered {
                        channel: Channel::Email,
                        priority: Priority::Bulk,
                        recipient: address(i),
                        from: None,
                        subject: Some("s".into()),
                        text: None,
                        html: None,
                        json: None,
                    }),
                    "rendered",
                ),
                1 => (
                    EventBody::DeliveryAttempted(DeliveryAttempted {
                        attempt: 1,
                        channel: Channel::Email,
                        recipient: address(i),
                        provider: "sink".into(),
                        identity: None,
                        rendered_at: None,
                    }),
                    "attempted",
                ),
                _ => (
                    EventBody::Delivered(Delivered {
                        attempt: 1,
                        provider: "sink".into(),
                        provider_message_id: Some(format!("p{i}")),
                        identity: None,
                    }),
                    "delivered",
                ),
            };
            events.push(ev(body, Some(id), what, 1));
        }
    }
    events
}

/// The tables of the read model whose rows must be the same in two schemas
/// (roll-up rows that went back to zero are left out: a rebuild that saw
/// two transitions in one batch never wrote them).
pub const READ_MODEL_TABLES: [(&str, &str); 9] = [
    ("messages", "TRUE"),
    ("intents", "TRUE"),
    ("intent_cancellations", "TRUE"),
    ("dead_letters", "TRUE"),
    ("delivery_attempts", "TRUE"),
    ("intent_status_counts", "messages <> 0"),
    ("tenant_hourly", "messages <> 0"),
    ("identity_hourly", "messages <> 0"),
    ("(SELECT consumer, topic, partition, next_offset FROM {s}.projector_offsets) AS", "TRUE"),
];

/// Rows of `a` not in `b` and of `b` not in `a`, per table.
pub async fn read_model_differences(pool: &PgPool, a: &str, b: &str) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for (table, filter) in READ_MODEL_TABLES {
        let from = |s: &str| {
            if table.starts_with('(') {
                format!("{} t WHERE {filter}", table.replace("{s}", s))
            } else {
                format!("{s}.{table} WHERE {filter}")
            }
        };
        let sql = format!(
            "-- tests::read_model_differences
             SELECT count(*) FROM ((SELECT * FROM {} EXCEPT ALL SELECT * FROM {})
                                   UNION ALL (SELECT * FROM {} EXCEPT ALL SELECT * FROM {})) d",
            from(a),
            from(b),
            from(b),
            from(a)
        );
        let n: i64 = sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        out.push((table.split_whitespace().last().unwrap_or(table).to_owned(), n));
    }
    out
}
