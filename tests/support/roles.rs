//! Every role as a `ledger` process of its own, as production runs them,
//! so a test can `kill -9` one and start it again; and what the reliability
//! scenarios check afterwards, written to their report.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use ledger_runtime::Config;
use ledger_schemas::{ConsumerGroup, Topic};
use rdkafka::consumer::Consumer;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::*;

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Statuses a message ends in (`ambiguous` is held and reported: it is not
/// resent without an operator).
pub const SETTLED: [&str; 7] =
    ["delivered", "failed", "suppressed", "cancelled", "render_failed", "dead_lettered", "ambiguous"];

pub const ROLES: [&str; 4] = ["ingest", "render", "dispatch", "project"];

/// The four roles as processes sharing one configuration file, their output
/// appended to `<test dir>/<role>.log`.
pub struct Roles {
    pub config: Config,
    file: PathBuf,
    dir: PathBuf,
    children: HashMap<&'static str, Child>,
    pub starts: BTreeMap<&'static str, u32>,
}

impl Roles {
    /// Writes the configuration (the API on a fixed free port) and starts
    /// `roles`.
    pub fn start(mut config: Config, roles: &[&'static str]) -> Roles {
        if config.http.listen.port() == 0 {
            config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        }
        let dir = config.sink.dir.parent().expect("test directory").to_path_buf();
        std::fs::create_dir_all(&dir).expect("test directory");
        let file = dir.join("ledger.toml");
        std::fs::write(&file, toml::to_string(&config).expect("config as TOML")).expect("config file");
        let mut this = Roles { config, file, dir, children: HashMap::new(), starts: BTreeMap::new() };
        for role in roles {
            this.spawn(role);
        }
        this
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.config.http.listen)
    }

    pub fn spawn(&mut self, role: &'static str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{role}.log")))
            .expect("log file");
        let child = ledger_command(&self.file)
            .env("RUST_LOG", "warn,ledger_runtime::kafka=info")
            .args(["run", role])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start a role");
        *self.starts.entry(role).or_default() += 1;
        self.children.insert(role, child);
    }

    /// `kill -9`, and reaped.
    pub fn kill(&mut self, role: &str) {
        let mut child = self.children.remove(role).unwrap_or_else(|| panic!("{role} is not running"));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// Panics with its log when a role has exited on its own.
    pub fn assert_running(&mut self) {
        let mut exited = None;
        for (role, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some((*role, status));
            }
        }
        if let Some((role, status)) = exited {
            panic!("`ledger run {role}` exited by itself ({status}):\n{}", self.log_tail(role));
        }
    }

    pub fn log_tail(&self, role: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{role}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn pid(&self, role: &str) -> Option<u32> {
        self.children.get(role).map(Child::id)
    }

    /// SIGTERM to every role; each must stop cleanly.
    pub fn stop(mut self) {
        for child in self.children.values() {
            let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
        for (role, mut child) in std::mem::take(&mut self.children) {
            let status = child.wait().expect("reaped");
            assert!(status.success(), "`ledger run {role}` did not stop cleanly ({status}):\n{}", self.log_tail(role));
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An NDJSON campaign body: the header line, then `n` recipients
/// `{prefix}{i}@example.com` with their own variables.
pub fn ndjson_campaign(name: &str, prefix: &str, n: usize) -> String {
    let mut body = json!({ "name": name, "from": "news@example.com",
        "content": { "subject": "News for {{ name }}", "text": "Hello {{ name }}, order {{ order }} shipped." } })
    .to_string();
    body.push('\n');
    for i in 0..n {
        body.push_str(
            &json!({ "address": format!("{prefix}{i}@example.com"), "variables": { "name": format!("C{i}"), "order": i } })
                .to_string(),
        );
        body.push('\n');
    }
    body
}

/// POSTs an NDJSON campaign; `Ok(intent id)` on 202, `Err` with what
/// happened otherwise (a refused or cut connection included).
pub async fn post_campaign(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    key: &str,
    body: &str,
) -> Result<String, String> {
    let reply = http
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(api_key)
        .header("idempotency-key", key)
        .header("content-type", "application/x-ndjson")
        .body(body.to_owned())
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    let status = reply.status();
    let text = reply.text().await.map_err(|e| format!("{status}, body cut: {e}"))?;
    if status != 202 {
        return Err(format!("{status}: {text}"));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    Ok(v["intent_id"].as_str().ok_or_else(|| format!("no intent_id: {text}"))?.to_owned())
}

/// Submits until accepted, the same key and body each time (what a
/// producer does when its connection is cut), within `within`.
pub async fn submit_until_accepted(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    key: &str,
    body: &str,
    within: Duration,
) -> (String, u32) {
    let deadline = Instant::now() + within;
    let mut tries = 0;
    loop {
        tries += 1;
        match post_campaign(http, base, api_key, key, body).await {
            Ok(intent) => return (intent, tries),
            Err(e) => {
                assert!(Instant::now() < deadline, "not accepted after {tries} tries: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Messages of `intent` per status in the read model.
pub async fn status_counts_of(reporting: &PgPool, intent: &str) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "-- tests::status_counts_of
         SELECT status, count(*) FROM messages WHERE intent_id = $1::uuid GROUP BY status",
    )
    .bind(intent)
    .fetch_all(reporting)
    .await
    .expect("status counts")
    .into_iter()
    .collect()
}

pub fn settled_count(counts: &BTreeMap<String, i64>) -> i64 {
    counts.iter().filter(|(s, _)| SETTLED.contains(&s.as_str())).map(|(_, n)| n).sum()
}

/// True when the read model has applied every record on the projector's
/// topics: its own offsets (committed with its rows) at the high watermarks.
pub async fn projection_caught_up(config: &Config, reporting: &PgPool) -> bool {
    let rows: Vec<(String, i32, i64)> = match sqlx::query_as(
        "-- tests::projection_caught_up
         SELECT topic, partition, next_offset FROM projector_offsets WHERE consumer = $1",
    )
    .bind(config.group(ConsumerGroup::Projector))
    .fetch_all(reporting)
    .await
    {
        Ok(r) => r,
        Err(_) => return false,
    };
    let at: HashMap<(String, i32), i64> = rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let consumer = throwaway_consumer(&config);
        for topic in ledger_projector::TOPICS {
            let name = config.topic(topic);
            for p in 0..topic.partitions() {
                let Ok((_, high)) = consumer.fetch_watermarks(&name, p, Duration::from_secs(5)) else {
                    return false;
                };
                if at.get(&(name.clone(), p)).copied().unwrap_or(0) < high {
                    return false;
                }
            }
        }
        true
    })
    .await
    .unwrap_or(false)
}

/// What the sink received: per message id, how many times.
pub fn sink_counts(config: &Config) -> HashMap<String, usize> {
    let mut per_id = HashMap::new();
    for r in ledger_dispatcher::sink::read_deliveries(&config.sink.dir).unwrap_or_default() {
        *per_id.entry(r.message_id.to_string()).or_default() += 1;
    }
    per_id
}

/// Distinct message ids rendered on the log for `intent` (what was
/// accepted, as the log says), read up to each partition's high watermark.
pub fn rendered_ids(config: &Config, intent: &str) -> std::collections::HashSet<String> {
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer = throwaway_consumer(config);
    let name = config.topic(Topic::Rendered);
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..Topic::Rendered.partitions() {
        let (_, high) = consumer.fetch_watermarks(&name, p, Duration::from_secs(10)).expect("watermarks");
        if high > 0 {
            ends.insert(p, high);
            tpl.add_partition_offset(&name, p, Offset::Beginning).expect("tpl");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut ids = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !ends.is_empty() {
        assert!(Instant::now() < deadline, "{name} not read to its end in 180 s: {ends:?} left");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Ok(e) = ledger_schemas::Event::from_json(m.payload().unwrap_or_default()) {
                    if e.intent_id.0.to_string() == intent {
                        if let Some(id) = e.message_id {
                            ids.insert(id.0.to_string());
                        }
                    }
                }
                if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
                    ends.remove(&m.partition());
                }
            }
            Some(Err(e)) => panic!("reading {name}: {e}"),
            None => {}
        }
    }
    ids
}

/// The figures a reliability scenario checked, one row of the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Checked {
    pub scenario: String,
    pub accepted: i64,
    pub delivered: i64,
    pub ambiguous: i64,
    pub other_terminal: i64,
    pub duplicates: i64,
    pub lost: i64,
    pub dead_lettered: i64,
    pub replay_differences: i64,
    pub notes: String,
}

/// The report of `make test-reliability`: one JSON file per scenario under
/// `target/reliability/`, and `report.md` rebuilt from all of them.
pub fn report(row: &Checked) {
    let dir = workspace_root().join("target/reliability");
    std::fs::create_dir_all(&dir).expect("report dir");
    let name: String = row.scenario.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(row).expect("json")).expect("write");
    let mut rows: Vec<Value> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok())
        .collect();
    rows.sort_by(|a, b| a["scenario"].as_str().cmp(&b["scenario"].as_str()));
    let mut md = String::from(
        "| scenario | accepted | delivered | ambiguous (held) | other terminal | sent twice | lost | dead-lettered | read model vs replay | notes |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["scenario"].as_str().unwrap_or_default(),
            r["accepted"],
            r["delivered"],
            r["ambiguous"],
            r["other_terminal"],
            r["duplicates"],
            r["lost"],
            r["dead_lettered"],
            if r["replay_differences"] == json!(-1) {
                "n/a".to_owned()
            } else {
                format!("{} rows differ", r["replay_differences"])
            },
            r["notes"].as_str().unwrap_or_default()
        );
    }
    std::fs::write(dir.join("report.md"), md).expect("write report");
}
