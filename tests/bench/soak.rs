//! `make soak` (not in CI): every role as a release process for
//! SOAK_SECS (default 600) at SOAK_RATE messages/s (default 70 % of the
//! end-to-end rate `make bench` last measured, bench-out/pipeline.json),
//! submitted as campaigns of one second's worth each second. Every 10 s it
//! samples each role's resident memory and the lag of every consumer (in
//! records, and the projection's in seconds of events); at the end it
//! checks they stayed flat — the last third no higher than the first third
//! allows — and writes bench-out/soak.{md,json}.

use std::time::{Duration, Instant};

use ledger_schemas::{ConsumerGroup, Topic};
use ledger_tests::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, TopicPartitionList};
use serde_json::{json, Value};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l["VmRSS:".len()..].trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Records of `topics` the group has not committed yet.
fn group_lag(config: &ledger_runtime::Config, group: ConsumerGroup, topics: &[Topic]) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", config.group(group))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut lag = 0;
    for topic in topics {
        let name = config.topic(*topic);
        let mut tpl = TopicPartitionList::new();
        for p in 0..topic.partitions() {
            let _ = tpl.add_partition(&name, p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(5)).ok();
        for p in 0..topic.partitions() {
            let high = consumer.fetch_watermarks(&name, p, Duration::from_secs(5)).map(|w| w.1).unwrap_or(0);
            let at = committed
                .as_ref()
                .and_then(|t| t.find_partition(&name, p))
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(0);
            lag += (high - at).max(0);
        }
    }
    lag
}

fn third(samples: &[f64], which: usize) -> f64 {
    let n = samples.len() / 3;
    let part = &samples[which * n..(which + 1) * n];
    part.iter().sum::<f64>() / part.len().max(1) as f64
}

fn main() {
    run_with_release_ledger("make soak", run());
}

async fn run() {
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    let measured = std::fs::read_to_string("bench-out/pipeline.json")
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["messages_per_s"].as_f64());
    let rate: f64 = std::env::var("SOAK_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| 0.7 * measured.unwrap_or(4_500.0));
    let mut config = test_config();
    config.telemetry.log_filter = "warn".into();
    config.projector = ledger_runtime::config::ProjectorConfig::default();
    prepare(&config).await.expect("topics and databases");
    let key = ledger_ok(&config, &["tenants", "create", "acme"]).lines().last().expect("key").trim().to_owned();
    let roles = Roles::start(config.clone(), &ROLES);
    let http = reqwest::Client::new();
    let base = roles.base_url();
    eventually("the API", Duration::from_secs(60), || async {
        http.get(format!("{base}/readyz")).send().await.ok().filter(|r| r.status() == 200)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    println!(
        "soak: {secs} s at {rate:.0} messages/s ({})",
        measured.map(|m| format!("70 % of the measured {m:.0}/s")).unwrap_or_else(|| "SOAK_RATE or a default".into())
    );

    // The load: each second, a campaign of that second's recipients.
    let started = Instant::now();
    let submitter = {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let (mut sent, mut second) = (0u64, 0u64);
            while started.elapsed() < Duration::from_secs(secs) {
                tick.tick().await;
                second += 1;
                let due = (rate * second as f64) as u64 - sent;
                let body = ndjson_campaign(&format!("soak-{second}"), &format!("s{second}-"), due as usize);
                if let Err(e) = post_campaign(&http, &base, &key, &format!("soak-{second}"), &body).await {
                    panic!("second {second}: {e}");
                }
                sent += due;
            }
            sent
        })
    };

    let mut samples: Vec<Value> = Vec::new();
    let mut lag_series: Vec<f64> = Vec::new();
    let mut rss_series: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 1).await.expect("pool");
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let c = config.clone();
        let (render, dispatch, project) = tokio::task::spawn_blocking(move || {
            (
                group_lag(&c, ConsumerGroup::Renderer, &[Topic::Intents]),
                group_lag(&c, ConsumerGroup::Dispatcher, &[Topic::Rendered]),
                group_lag(&c, ConsumerGroup::Projector, &ledger_projector::TOPICS),
            )
        })
        .await
        .expect("lag");
        let projection_secs: f64 = sqlx::query_scalar(
            "-- bench::soak::projection_lag
             SELECT COALESCE(EXTRACT(EPOCH FROM now() - max(updated_at)), 0)::float8 FROM projector_offsets",
        )
        .fetch_one(&reporting)
        .await
        .unwrap_or(f64::NAN);
        let mut rss = serde_json::Map::new();
        for role in ROLES {
            let mib = roles.pid(role).map(rss_mib).unwrap_or(f64::NAN);
            rss.insert(role.to_owned(), json!(mib));
            rss_series.entry(role).or_default().push(mib);
        }
        let total = (render + dispatch + project) as f64;
        lag_series.push(total);
        let at = started.elapsed().as_secs();
        println!(
            "{at:>4} s  lag render {render:>7} dispatch {dispatch:>7} project {project:>7} (last applied {projection_secs:.1} s ago)  rss {}",
            ROLES.iter().map(|r| format!("{r} {:.0}", rss[*r].as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(" ")
        );
        samples.push(json!({ "at_s": at, "lag": { "render": render, "dispatch": dispatch, "project": project },
                             "projection_idle_s": projection_secs, "rss_mib": rss }));
    }
    let sent = submitter.await.expect("submitter");
    roles.stop();

    // Flat: the last third's mean no more than the first third's allows
    // (lag: twice it, or two seconds of load; memory: +20 % and 64 MiB).
    let lag_first = third(&lag_series, 0);
    let lag_last = third(&lag_series, 2);
    let lag_flat = lag_last <= (2.0 * lag_first).max(2.0 * rate);
    let mut md = format!(
        "| soak: {secs} s at {rate:.0} messages/s ({sent} messages) | first third | last third | flat |\n|---|---:|---:|---|\n\
         | consumer lag, all roles (records) | {lag_first:.0} | {lag_last:.0} | {} |\n",
        if lag_flat { "yes" } else { "**no**" }
    );
    let mut all_flat = lag_flat;
    for (role, series) in &rss_series {
        let (a, b) = (third(series, 0), third(series, 2));
        let flat = b <= a * 1.2 + 64.0;
        all_flat &= flat;
        md +=
            &format!("| RSS `ledger run {role}` (MiB) | {a:.0} | {b:.0} | {} |\n", if flat { "yes" } else { "**no**" });
    }
    println!("\n{md}");
    std::fs::create_dir_all("bench-out").expect("bench-out");
    std::fs::write("bench-out/soak.md", &md).expect("write");
    std::fs::write(
        "bench-out/soak.json",
        serde_json::to_string_pretty(&json!({ "seconds": secs, "rate": rate, "messages": sent, "samples": samples,
                                              "flat": all_flat, "measured_at": chrono::Utc::now() }))
        .expect("json"),
    )
    .expect("write");
    reporting.close().await;
    drop_databases(&config).await;
    assert!(all_flat, "lag or memory grew during the soak (bench-out/soak.md)");
}
