//! What every scenario does after its disruption: wait for the campaign to
//! settle, then count, compare with the log and a fresh replay, and report.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ledger_runtime::Config;
use ledger_schemas::Topic;
use ledger_tests::*;
use rdkafka::consumer::Consumer;
use sqlx::PgPool;

/// Recipients of the crash and restart campaigns
/// (`LEDGER_RELIABILITY_RECIPIENTS`, default 50,000).
pub fn recipients() -> usize {
    std::env::var("LEDGER_RELIABILITY_RECIPIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000)
}

/// A small deterministic generator for the moments of the disruptions; the
/// seed is printed and reported so a run can be repeated
/// (`LEDGER_RELIABILITY_SEED`).
pub struct Moments(u64);

impl Moments {
    pub fn new() -> (Moments, u64) {
        let seed = std::env::var("LEDGER_RELIABILITY_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7)
        });
        println!("moments seed {seed} (LEDGER_RELIABILITY_SEED={seed} repeats them)");
        (Moments(seed | 1), seed)
    }

    /// Uniform in `[lo, hi)`.
    pub fn between(&mut self, lo: f64, hi: f64) -> f64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        lo + (hi - lo) * (x as f64 / (1u64 << 53) as f64)
    }
}

/// Records on `topic` so far (the sum of its partitions' high watermarks).
pub fn topic_end(config: &Config, topic: Topic) -> i64 {
    let consumer = throwaway_consumer(config);
    let name = config.topic(topic);
    (0..topic.partitions())
        .map(|p| consumer.fetch_watermarks(&name, p, Duration::from_secs(5)).map(|(_, h)| h).unwrap_or(0))
        .sum()
}

/// A scenario under way: topics and databases prepared, tenant `acme`
/// created with the CLI, every role started as a process, the API ready.
pub struct Started {
    pub roles: Roles,
    pub api_key: String,
    pub reporting: PgPool,
    pub http: reqwest::Client,
    pub base: String,
}

pub async fn start(config: &Config) -> Started {
    prepare(config).await.expect("topics and databases");
    let api_key = ledger_ok(config, &["tenants", "create", "acme"]).lines().last().expect("key").trim().to_owned();
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 2).await.expect("pool");
    let roles = Roles::start(config.clone(), &ROLES);
    let http = reqwest::Client::new();
    let base = roles.base_url();
    wait_ready(&http, &base).await;
    Started { roles, api_key, reporting, http, base }
}

pub async fn wait_ready(http: &reqwest::Client, base: &str) {
    eventually("the API ready", Duration::from_secs(60), || async {
        http.get(format!("{base}/readyz")).send().await.ok().filter(|r| r.status() == 200)
    })
    .await;
}

/// Waits until every message of `intent` is settled in the read model and
/// the projection has applied the whole log, checking the roles stay up.
pub async fn wait_settled(roles: &mut Roles, reporting: &PgPool, intent: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        roles.assert_running();
        let counts = status_counts_of(reporting, intent).await;
        if settled_count(&counts) as usize == n && projection_caught_up(&roles.config, reporting).await {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "not settled after {within:?}: {counts:?}\n{}\n{}\ndispatcher log:\n{}",
                group_positions(&roles.config, ledger_schemas::ConsumerGroup::Dispatcher, Topic::Rendered),
                group_positions(&roles.config, ledger_schemas::ConsumerGroup::Renderer, Topic::Intents),
                roles.log_tail("dispatch")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the provider received (`received`: per message id, how many
/// times it accepted it).
pub enum Received {
    /// The local sink's delivery log.
    Sink,
    Counted(HashMap<String, usize>),
}

/// The roles stopped (cleanly), the checks every scenario makes: the log
/// holds `n` distinct rendered messages; the read model has each in exactly
/// one settled state; the provider got none twice and every delivered one
/// once; the ambiguous ones are what `ledger ambiguous` lists; a fresh
/// replay of the log equals the read model. Asserts, and returns the row.
pub async fn check(
    config: &Config,
    reporting: &PgPool,
    intent: &str,
    n: usize,
    received: Received,
    scenario: &str,
    notes: String,
) -> Checked {
    let counts = status_counts_of(reporting, intent).await;
    let rows: i64 = counts.values().sum();
    let settled = settled_count(&counts);
    let delivered = counts.get("delivered").copied().unwrap_or(0);
    let ambiguous = counts.get("ambiguous").copied().unwrap_or(0);

    let on_log = rendered_ids(config, intent);
    let sink = match received {
        Received::Sink => sink_counts(config),
        Received::Counted(c) => c,
    };
    let duplicates: usize = sink.values().filter(|c| **c > 1).map(|c| c - 1).sum();
    let delivered_ids: Vec<String> = sqlx::query_scalar(
        "-- tests::reliability::delivered_ids
         SELECT message_id::text FROM messages WHERE intent_id = $1::uuid AND status = 'delivered'",
    )
    .bind(intent)
    .fetch_all(reporting)
    .await
    .expect("delivered ids");
    let delivered_not_in_sink = delivered_ids.iter().filter(|id| sink.get(*id) != Some(&1)).count();
    let dead_lettered: i64 =
        sqlx::query_scalar("-- tests::reliability::dead_letters\nSELECT count(*) FROM dead_letters")
            .fetch_one(reporting)
            .await
            .expect("dead letters");

    // Every one of them: the default page (1,000) is smaller than what a
    // run can hold (1,132 in one CI run, most of them calls that timed out).
    let listed = ledger_ok(config, &["ambiguous", "--limit", &n.to_string()]);
    let listed_count: i64 = listed.split_whitespace().next().and_then(|w| w.parse().ok()).unwrap_or(-1);

    let schema = "reliability_replay";
    ledger_ok(config, &["replay", "projections", "--schema", schema]);
    let differences: i64 = read_model_differences(reporting, "public", schema).await.iter().map(|(_, d)| d).sum();

    let row = Checked {
        scenario: scenario.to_owned(),
        accepted: n as i64,
        delivered,
        ambiguous,
        other_terminal: settled - delivered - ambiguous,
        duplicates: duplicates as i64,
        lost: n as i64 - settled,
        dead_lettered,
        replay_differences: differences,
        notes,
    };
    println!("{scenario}: {row:?} (status counts {counts:?})");
    report(&row);
    assert_eq!(on_log.len(), n, "the log holds every accepted recipient's message once");
    assert_eq!(rows, n as i64, "one read-model row per accepted recipient: {counts:?}");
    assert_eq!(row.lost, 0, "every message settled: {counts:?}");
    assert_eq!(row.duplicates, 0, "nobody got a message twice");
    assert_eq!(delivered_not_in_sink, 0, "every delivered message reached the provider exactly once");
    assert_eq!(listed_count, ambiguous, "`ledger ambiguous` lists the held ones:\n{listed}");
    assert_eq!(differences, 0, "the read model equals a fresh replay of the log");
    row
}
