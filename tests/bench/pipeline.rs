//! `make bench-pipeline` (the last part of `make bench`): a 300,000-recipient
//! campaign with per-recipient variables (BENCH_PIPELINE_RECIPIENTS), from
//! the first byte of the POST until every message's row is terminal in the
//! read model, with each role in its own release process (`ledger run
//! ingest|render|dispatch|project`, the sink provider, governor off), and
//! each role's peak RSS.
//!
//! Then the summary of `make bench`: every stage measured alone (the JSON
//! the other benchmarks wrote to bench-out/ in this run) as a ratio to its
//! raw baseline, and end to end as a ratio to the prediction from the
//! stages: the slowest stage (they run at once) and their sum (one after
//! the other); and the raw work of the stages one after the other (their
//! baselines in messages/s; for the dispatcher the log floor), the most
//! this machine could do with stages that only moved their records.
//! Writes bench-out/pipeline.{json,md} and bench-out/summary.md.

use std::time::{Duration, Instant};

use ledger_tests::*;
use serde_json::{json, Value};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Peak resident memory of a process, from /proc, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line["VmHWM:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time (user + system, in seconds) of the processes that share the
/// machine, read from /proc: the four roles, PostgreSQL's server processes
/// (by process, to be told apart by database afterwards; those that ended
/// count in the postmaster's children's times), the broker, this
/// benchmark, and the whole machine's busy and total time (all cores).
struct Cpu {
    roles: Vec<f64>,
    /// Server process id → its CPU time; the postmaster's includes its
    /// children that have ended.
    postgres: std::collections::HashMap<u32, f64>,
    broker: f64,
    bench: f64,
    busy: f64,
    total: f64,
}

/// What /proc counts CPU time in (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// A process's name, parent, and (utime + stime, cutime + cstime) in
/// seconds, from /proc/<pid>/stat.
fn proc_times(pid: u32) -> Option<(String, u32, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0) / TICKS_PER_S;
    Some((name, fields.get(1)?.parse().ok()?, ticks(11) + ticks(12), ticks(13) + ticks(14)))
}

impl Cpu {
    fn now(role_pids: &[Option<u32>]) -> Cpu {
        let processes: Vec<(u32, String, u32, f64, f64)> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| proc_times(pid).map(|(name, parent, own, children)| (pid, name, parent, own, children)))
            .collect();
        let of = |pid: u32| processes.iter().find(|p| p.0 == pid).map(|p| p.3).unwrap_or(f64::NAN);
        let server: Vec<u32> = processes.iter().filter(|p| p.1 == "postgres").map(|p| p.0).collect();
        let postgres = processes
            .iter()
            .filter(|p| p.1 == "postgres")
            // The postmaster (whose parent is no server process) also
            // counts the server processes that have ended.
            .map(|p| (p.0, p.3 + if server.contains(&p.2) { 0.0 } else { p.4 }))
            .collect();
        let broker = processes.iter().filter(|p| p.1.starts_with("tansu")).map(|p| p.3).sum();
        let (busy, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let v: Vec<f64> = s.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal (guest time is in user)
                let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum::<f64>() / TICKS_PER_S;
                let idle = [3, 4].iter().filter_map(|&i| v.get(i)).sum::<f64>() / TICKS_PER_S;
                Some((busy, busy + idle))
            })
            .unwrap_or((f64::NAN, f64::NAN));
        Cpu {
            roles: role_pids.iter().map(|p| p.map(of).unwrap_or(f64::NAN)).collect(),
            postgres,
            broker,
            bench: of(std::process::id()),
            busy,
            total,
        }
    }

    /// (what, CPU-seconds) from `self` to `later`: each role, PostgreSQL's
    /// share by what its server processes served (`served`: process id →
    /// the database's name, from `pg_stat_activity`; the rest is its own
    /// work: WAL writer, checkpointer, autovacuum, ended processes), the
    /// broker, this benchmark, and the machine's busy time no process above
    /// accounts for ("other"); then the machine's capacity (CPU-seconds of
    /// every core) over that time.
    fn spent(&self, later: &Cpu, served: &[(u32, String)]) -> (Vec<(String, f64)>, f64) {
        let mut rows: Vec<(String, f64)> = ROLES
            .iter()
            .zip(self.roles.iter().zip(&later.roles))
            .map(|(role, (a, b))| (format!("`ledger run {role}`"), b - a))
            .collect();
        let mut by_database: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
        for (pid, secs) in &later.postgres {
            let spent = secs - self.postgres.get(pid).copied().unwrap_or(0.0);
            let what = served
                .iter()
                .find(|(p, _)| p == pid)
                .map(|(_, db)| format!("PostgreSQL: sessions of database `{db}`"))
                .unwrap_or_else(|| "PostgreSQL: its own processes (WAL, checkpoints, vacuum, ended sessions)".into());
            *by_database.entry(what).or_default() += spent;
        }
        rows.extend(by_database);
        rows.push(("the broker (tansu)".into(), later.broker - self.broker));
        rows.push(("this benchmark (the POST, then polling the read model)".into(), later.bench - self.bench));
        let listed: f64 = rows.iter().map(|r| r.1).filter(|v| v.is_finite()).sum();
        rows.push(("other (kernel threads, the rest of the machine)".into(), (later.busy - self.busy) - listed));
        (rows, later.total - self.total)
    }
}

fn read_json(name: &str) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(format!("bench-out/{name}.json")).ok()?).ok()
}

fn main() {
    run_with_release_ledger("make bench", run());
}

async fn run() {
    let recipients: usize =
        std::env::var("BENCH_PIPELINE_RECIPIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(300_000);
    // Checked before the campaign: the lag table at the end needs delivered
    // messages to measure (0 used to end the run in a panic after its work).
    let lag_secs: u64 = std::env::var("BENCH_PIPELINE_LAG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    assert!(lag_secs >= 1, "BENCH_PIPELINE_LAG_SECS must be a whole number of seconds, at least 1");
    let mut config = test_config();
    config.telemetry.log_filter = "warn".into();
    config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.projector = ledger_runtime::config::ProjectorConfig::default();
    let config = with_overrides(config);
    prepare(&config).await.expect("topics and databases");
    let key = ledger_ok(&config, &["tenants", "create", "acme"]).lines().last().expect("key").trim().to_owned();

    // Killed when dropped, also when the benchmark panics.
    let mut roles = Roles::start(config.clone(), &ROLES);
    let http = reqwest::Client::new();
    let base = format!("http://{}", config.http.listen);
    eventually("the API", Duration::from_secs(60), || async {
        http.get(format!("{base}/readyz")).send().await.ok().filter(|r| r.status() == 200)
    })
    .await;
    // Let the consumers join their groups before the clock starts.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut body = json!({ "name": "pipeline", "from": "news@example.com",
        "content": { "subject": "Your November news, {{ name }}",
                     "text": "Hello {{ name }},\nyour order {{ order }} has shipped.",
                     "html": "<p>Hello <b>{{ name }}</b>,</p><p>your order {{ order }} has shipped.</p>" } })
    .to_string();
    body.push('\n');
    for i in 0..recipients {
        body.push_str(
            &json!({ "address": format!("c{i}@example.com"), "variables": { "name": format!("Customer {i}"), "order": i } })
                .to_string(),
        );
        body.push('\n');
    }
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 1).await.expect("pool");
    let ops = ledger_runtime::db::pool(&config.ops_database_url, 1).await.expect("pool");
    let role_pids: Vec<Option<u32>> = ROLES.iter().map(|role| roles.pid(role)).collect();
    let cpu_before = Cpu::now(&role_pids);
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let reply = http
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .header("idempotency-key", "pipeline")
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("submit");
    assert_eq!(reply.status(), 202);
    let accepted_secs = started.elapsed().as_secs_f64();
    // Where that time went inside ingest (the campaign is its only
    // submission so far): sums of `ledger_ingest_stage_seconds`.
    let metrics = http.get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("text");
    let stage_ms = |stage: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ledger_ingest_stage_seconds_sum{{stage=\"{stage}\"}} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|secs| secs * 1000.0)
    };
    let accepted_stages: Vec<(&str, Option<f64>)> =
        ["check", "claim", "produce", "record"].into_iter().map(|s| (s, stage_ms(s))).collect();
    let intent = uuid::Uuid::parse_str(reply.json::<Value>().await.expect("json")["intent_id"].as_str().expect("id"))
        .expect("uuid");
    // Until every message is terminal in the read model: one cheap query on
    // the maintained counts every 50 ms. When the dispatcher had decided
    // them all is read from its claims afterwards (below), not polled: a
    // count over the claims while they are being written cost the shared
    // PostgreSQL 130 ms a time (6 s of CPU a run), taken from the pipeline
    // it measures.
    loop {
        let terminal: i64 = sqlx::query_scalar(
            "-- bench::pipeline::terminal
             SELECT COALESCE(sum(messages), 0)::bigint FROM intent_status_counts
             WHERE intent_id = $1 AND status IN ('delivered', 'failed', 'suppressed', 'cancelled', 'render_failed', 'dead_lettered')",
        )
        .bind(intent)
        .fetch_one(&reporting)
        .await
        .expect("count");
        if terminal as usize >= recipients {
            break;
        }
        // A role that died (a failing statement, a panic) would otherwise
        // leave this loop waiting out its ten minutes in silence.
        roles.assert_running();
        assert!(started.elapsed() < Duration::from_secs(600), "only {terminal} of {recipients} terminal after 10 min");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total_secs = started.elapsed().as_secs_f64();
    let cpu_after = Cpu::now(&role_pids);
    let served: Vec<(u32, String)> = sqlx::query_as::<_, (i32, String)>(
        "-- bench::pipeline::sessions
         SELECT pid, datname FROM pg_stat_activity WHERE datname IS NOT NULL",
    )
    .fetch_all(&ops)
    .await
    .expect("sessions")
    .into_iter()
    .map(|(pid, db)| (pid as u32, db))
    .collect();
    let (cpu, capacity) = cpu_before.spent(&cpu_after, &served);
    // The last outcome the dispatcher recorded in a claim (`updated_at` is
    // its statement's start), on the same clock as `started_at`.
    let decided_at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "-- bench::pipeline::decided
         SELECT max(updated_at) FROM delivery_claims WHERE state = 'done'",
    )
    .fetch_one(&ops)
    .await
    .expect("claims");
    let dispatched_secs = decided_at.map(|t| (t - started_at).as_seconds_f64());
    // Terminal is not the end of the projector's work: it reads the
    // rendered and outcome topics side by side, and the rendered records
    // (the larger) come behind. Since 2026-12-06 an attempt carries its
    // rendered time, so those late records change no row (and cost no
    // write), but they are still read. The paced phase below starts once
    // the projector is at the end of the log; started at once, its first
    // seconds' events queued behind that backlog (the projector's batches
    // took 100-300 ms for 4 s after terminal, then under 100 ms).
    let complete_secs = loop {
        if projection_caught_up(&config, &reporting).await {
            break started.elapsed().as_secs_f64();
        }
        roles.assert_running();
        assert!(started.elapsed() < Duration::from_secs(900), "the projector not at the end of the log after 15 min");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing: i64 = sqlx::query_scalar(
        "-- bench::pipeline::rendered_missing
         SELECT count(*) FROM messages WHERE intent_id = $1 AND rendered_at IS NULL",
    )
    .bind(intent)
    .fetch_one(&reporting)
    .await
    .expect("count");
    assert_eq!(missing, 0, "rows without their rendered stage with the projector at the end of the log");
    // How often each message's row was written to get there: inserts and
    // updates of the read model's `messages` (this run's database), once
    // the projector's statistics are in (a backend reports them when idle,
    // at most once a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (inserted, updated, hot): (i64, i64, i64) = sqlx::query_as(
        "-- bench::pipeline::row_writes
         SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'messages'",
    )
    .fetch_one(&reporting)
    .await
    .expect("statistics");
    let writes_per_message = (inserted + updated) as f64 / recipients as f64;
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE intent_id = $1 AND status = 'delivered'")
            .bind(intent)
            .fetch_one(&reporting)
            .await
            .expect("count");
    assert_eq!(delivered as usize, recipients, "every recipient delivered");
    let rss: Vec<(&str, f64)> =
        ROLES.iter().map(|role| (*role, roles.pid(role).and_then(peak_rss_mib).unwrap_or(f64::NAN))).collect();
    let rate = recipients as f64 / total_secs;

    // Then the same processes at 70 % (BENCH_LAG_FRACTION) of that rate for
    // BENCH_PIPELINE_LAG_SECS (20): the projection's lag while the pipeline
    // runs below its maximum, as an operator's would.
    let fraction: f64 = std::env::var("BENCH_LAG_FRACTION").ok().and_then(|v| v.parse().ok()).unwrap_or(0.7);
    let paced = paced_lag(&http, &base, &key, &reporting, intent, fraction * rate, lag_secs).await;
    drop(roles);
    let split = lag_from_the_log(&config, intent, &paced);

    let mut md = format!(
        "| end to end: {recipients}-recipient campaign (NDJSON, per-recipient variables) | value |\n|---|---:|\n\
         | accepted (202) after | {accepted_secs:.2} s |\n\
         | of which, inside ingest: receive and check the body / claim the key / produce (acks) / record the response (not waited for) | {} ms |\n\
         | every message decided by the dispatcher (claims) after | {} s |\n\
         | every row terminal in the read model after | {total_secs:.2} s |\n\
         | the projector at the end of the log (every row with every stage) after | {complete_secs:.2} s |\n\
         | messages/s end to end | {rate:.0} (target 20,000; stretch 50,000) |\n",
        accepted_stages
            .iter()
            .map(|(_, ms)| ms.map(|ms| format!("{ms:.0}")).unwrap_or_else(|| "–".into()))
            .collect::<Vec<_>>()
            .join(" / "),
        dispatched_secs.map(|s| format!("{s:.2}")).unwrap_or_else(|| "(with the read model)".into())
    );
    md += &format!(
        "| writes of a message's row in the read model (inserts + updates, of which HOT) | {writes_per_message:.2} ({inserted} + {updated}, {hot} HOT) |\n"
    );
    for (role, mib) in &rss {
        md += &format!("| peak RSS, `ledger run {role}` | {mib:.0} MiB |\n");
    }
    // Where the machine's time went while the campaign ran: what each
    // process cost a message, and how much of the machine it took.
    md += &format!(
        "\n| CPU from the first byte to terminal: {:.1} CPU-seconds busy of {:.1} | CPU-seconds | share of the machine | µs of CPU a message |\n|---|---:|---:|---:|\n",
        cpu.iter().map(|r| r.1).filter(|v| v.is_finite()).sum::<f64>(),
        capacity
    );
    for (name, secs) in &cpu {
        md += &format!(
            "| {name} | {secs:.2} | {:.0} % | {:.1} |\n",
            100.0 * secs / capacity,
            secs * 1e6 / recipients as f64
        );
    }
    md += &format!(
        "\n| the same processes at {:.0} % of that rate: campaigns of {} recipients every 100 ms for {lag_secs} s | value |\n|---|---:|\n\
         | messages/s submitted / delivered | {:.0} / {:.0} |\n\
         | projection lag (a *delivered* event's time to the read model counting it), p50 | {:.0} ms |\n\
         | projection lag, p99 | {:.0} ms (target 250 ms) |\n",
        fraction * 100.0,
        paced.per_tick,
        paced.submitted_per_s,
        paced.delivered_per_s,
        paced.p50 * 1000.0,
        paced.p99 * 1000.0
    );
    if let Some([before_50, before_99, after_50, after_99]) = split {
        md += &format!(
            "| of which before the log: the event's time to its record's timestamp (dispatcher: outcome statement, produce call), p50 / p99 | {:.0} / {:.0} ms |\n\
             | projection lag from the log (record timestamp to the read model counting it), p50 / p99 | {:.0} / {:.0} ms |\n",
            before_50 * 1000.0,
            before_99 * 1000.0,
            after_50 * 1000.0,
            after_99 * 1000.0
        );
    }

    // The stages measured alone in this run (messages/s), each with its
    // raw baseline in messages/s: what the machine does for that stage's
    // records with no logic at all. For the dispatcher that is the log
    // floor (each record read, its attempted and outcome records written),
    // not the bare consume its ratio is taken against.
    struct Stage {
        name: &'static str,
        per_s: f64,
        ratio: f64,
        baseline: &'static str,
        floor_per_s: f64,
    }
    let stage = |name, per_s: f64, ratio: f64, baseline| Stage {
        name,
        per_s,
        ratio,
        baseline,
        floor_per_s: if ratio > 0.0 { per_s / ratio } else { f64::NAN },
    };
    let mut stages: Vec<Stage> = Vec::new();
    if let Some(v) = read_json("ingest") {
        if let Some(row) = v["rows"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["form"].as_str().is_some_and(|f| f.starts_with("campaign"))))
        {
            stages.push(stage(
                "ingest (campaign, NDJSON)",
                row["recipients_per_s"].as_f64().unwrap_or(0.0),
                row["ratio"].as_f64().unwrap_or(0.0),
                "raw produce",
            ));
        }
    }
    if let Some(v) = read_json("render") {
        stages.push(stage(
            "render",
            v["render_per_s"].as_f64().unwrap_or(0.0),
            v["ratio"].as_f64().unwrap_or(0.0),
            "raw consume + produce",
        ));
    }
    if let Some(v) = read_json("deliver") {
        // The sustained run where there is one: its 200,000 messages are far
        // past the start-up that dominates the 30,000-message run.
        let run =
            if v["sustained"]["dispatch_per_s"].as_f64().is_some_and(f64::is_finite) { &v["sustained"] } else { &v };
        let mut s = stage(
            "dispatch → sink (governor off)",
            run["dispatch_per_s"].as_f64().unwrap_or(0.0),
            run["ratio"].as_f64().unwrap_or(0.0),
            "raw consume",
        );
        if let Some(floor) = v["log_floor"]["floor_per_s"].as_f64().filter(|f| f.is_finite()) {
            s.floor_per_s = floor;
        }
        stages.push(s);
    }
    if let Some(v) = read_json("project") {
        // Rows written per message in its run: messages/s from rows/s.
        let rows = v["row_writes"].as_f64().unwrap_or(1.0);
        let per_s = v["projection_rows_per_s"].as_f64().unwrap_or(0.0) * 100_000.0 / rows.max(1.0);
        stages.push(stage("project", per_s, v["ratio"].as_f64().unwrap_or(0.0), "binary COPY"));
    }
    let mut summary = String::from(
        "| stage alone | messages/s | ratio to its raw baseline | baseline | the raw work alone, messages/s |\n|---|---:|---:|---|---:|\n",
    );
    for s in &stages {
        let floor_name = if s.name.starts_with("dispatch") { " (log floor)" } else { "" };
        summary += &format!(
            "| {} | {:.0} | {:.2} | {} | {:.0}{floor_name} |\n",
            s.name, s.per_s, s.ratio, s.baseline, s.floor_per_s
        );
    }
    let slowest = stages.iter().map(|s| s.per_s).fold(f64::INFINITY, f64::min);
    let sequential = 1.0 / stages.iter().map(|s| 1.0 / s.per_s.max(1e-9)).sum::<f64>();
    // The raw work of every stage one after the other: what the pipeline
    // could reach on this machine if its stages did nothing but move their
    // records.
    let raw_sequential = 1.0 / stages.iter().map(|s| 1.0 / s.floor_per_s.max(1e-9)).sum::<f64>();
    let complete = stages.len() == 4;
    if complete {
        summary += &format!(
            "| **end to end** | **{rate:.0}** | {:.2} of the slowest stage ({slowest:.0}/s, all stages at once); {:.2} of their sum ({sequential:.0}/s, one after the other) | target ≥ 0.8 of the prediction | {raw_sequential:.0} (the raw work one after the other; end to end {:.2} of it) |\n",
            rate / slowest,
            rate / sequential,
            rate / raw_sequential
        );
    } else {
        summary += &format!("| **end to end** | **{rate:.0}** | (run `make bench` for the stages) | | |\n");
    }
    let out = format!("{md}\n{summary}");
    println!("\npipeline benchmark:\n\n{out}");
    std::fs::create_dir_all("bench-out").expect("bench-out");
    std::fs::write("bench-out/pipeline.md", &md).expect("write");
    std::fs::write("bench-out/summary.md", &out).expect("write");
    std::fs::write(
        "bench-out/pipeline.json",
        serde_json::to_string_pretty(&json!({
            "recipients": recipients, "accepted_seconds": accepted_secs,
            "accepted_stages_ms": accepted_stages.iter().map(|(s, ms)| (s.to_string(), json!(ms))).collect::<serde_json::Map<_, _>>(), "terminal_seconds": total_secs, "complete_seconds": complete_secs,
            "messages_per_s": rate, "row_writes_per_message": writes_per_message,
            "paced_fraction": fraction, "paced_messages_per_s": paced.delivered_per_s,
            "paced_lag_p50_s": paced.p50, "paced_lag_p99_s": paced.p99,
            "paced_before_log_p50_s": split.map(|s| s[0]), "paced_before_log_p99_s": split.map(|s| s[1]),
            "paced_lag_from_log_p50_s": split.map(|s| s[2]), "paced_lag_from_log_p99_s": split.map(|s| s[3]),
            "cpu_seconds": cpu.iter().map(|(n, s)| json!({ "process": n, "seconds": s, "us_per_message": s * 1e6 / recipients as f64 })).collect::<Vec<_>>(),
            "cpu_capacity_seconds": capacity,
            "peak_rss_mib": rss.iter().map(|(r, m)| (r.to_string(), json!(m))).collect::<serde_json::Map<_, _>>(),
            "stages": stages.iter().map(|s| json!({ "stage": s.name, "messages_per_s": s.per_s, "ratio": s.ratio,
                                                    "baseline": s.baseline, "raw_work_per_s": s.floor_per_s })).collect::<Vec<_>>(),
            "raw_work_one_after_the_other_per_s": if complete { json!(raw_sequential) } else { Value::Null },
            "ratio_to_slowest_stage": if complete { json!(rate / slowest) } else { Value::Null },
            "ratio_to_sum_of_stages": if complete { json!(rate / sequential) } else { Value::Null },
            "measured_at": chrono::Utc::now() }))
        .expect("json"),
    )
    .expect("write");
    reporting.close().await;
    drop_databases(&config).await;
}

/// What [`paced_lag`] measured.
struct Paced {
    /// (time, delivered messages the read model counted), every 10 ms.
    samples: Vec<(chrono::DateTime<chrono::Utc>, i64)>,
    expected: usize,
    per_tick: usize,
    submitted_per_s: f64,
    delivered_per_s: f64,
    p50: f64,
    p99: f64,
}

/// Submits a campaign of `rate` / 10 recipients every 100 ms for `secs`
/// seconds to the running roles, waits until the read model has them all
/// delivered, and returns the projection's lag: for the k-th *delivered*
/// event (by its time), from that time until the read model's maintained
/// count of delivered messages (sampled every 10 ms) reaches k.
async fn paced_lag(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    reporting: &sqlx::PgPool,
    first: uuid::Uuid,
    rate: f64,
    secs: u64,
) -> Paced {
    use chrono::{DateTime, Utc};
    let per_tick = ((rate / 10.0).round() as usize).clamp(1, 100_000);
    let ticks = secs * 10;
    let expected = per_tick * ticks as usize;
    let delivered_sql = "-- bench::pipeline::paced_delivered
        SELECT COALESCE(sum(messages), 0)::bigint FROM intent_status_counts WHERE status = 'delivered' AND intent_id <> $1";
    let sampling = {
        let reporting = reporting.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(DateTime<Utc>, i64)> = Vec::new();
            let started = Instant::now();
            loop {
                let count: i64 = sqlx::query_scalar(delivered_sql).bind(first).fetch_one(&reporting).await.unwrap_or(0);
                samples.push((Utc::now(), count));
                if count as usize >= expected || started.elapsed() > Duration::from_secs(secs + 300) {
                    return samples;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let mut recipient = 0usize;
    for tick in 0..ticks {
        let due = started + Duration::from_millis(100 * tick);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let recipients: Vec<Value> = (recipient..recipient + per_tick)
            .map(|i| json!({ "address": format!("p{i}@example.com"), "variables": { "name": format!("Customer {i}"), "order": i } }))
            .collect();
        recipient += per_tick;
        let body = json!({ "name": format!("paced {tick}"), "from": "news@example.com",
            "content": { "subject": "Your order, {{ name }}", "text": "Hello {{ name }},\nyour order {{ order }} has shipped.",
                         "html": "<p>Hello <b>{{ name }}</b>,</p><p>your order {{ order }} has shipped.</p>" },
            "recipients": recipients });
        let reply = http
            .post(format!("{base}/v1/campaigns"))
            .bearer_auth(key)
            .header("idempotency-key", format!("paced-{tick}"))
            .json(&body)
            .send()
            .await
            .expect("submit");
        assert_eq!(reply.status(), 202, "paced campaign {tick}");
    }
    let submitted_per_s = expected as f64 / started.elapsed().as_secs_f64();
    let samples = sampling.await.expect("sampler");
    let last = samples.last().map(|s| s.1).unwrap_or(0) as usize;
    assert!(last >= expected, "only {last} of {expected} paced messages delivered in the read model");

    // The delivered events of the paced campaigns, by their time: a row's
    // delivered_at is its *delivered* event's own time.
    let delivered: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "-- bench::pipeline::paced_delivered_at
         SELECT delivered_at FROM messages WHERE intent_id <> $1 AND status = 'delivered' ORDER BY delivered_at",
    )
    .bind(first)
    .fetch_all(reporting)
    .await
    .expect("delivered times");
    assert_eq!(delivered.len(), expected, "one delivered event per paced message");
    let span = (*delivered.last().expect("last") - delivered[0]).num_milliseconds().max(1) as f64 / 1000.0;
    let lags = lags_until_counted(&delivered, &samples, Utc::now(), |from, to| {
        (to - from).num_microseconds().unwrap_or(0) as f64 / 1e6
    });
    let at = |q: f64| quantile(&lags, q);
    Paced {
        samples,
        expected,
        per_tick,
        submitted_per_s,
        delivered_per_s: expected as f64 / span,
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// `BENCH_CONFIG`: TOML merged over the roles' configuration, to compare
/// settings (`BENCH_CONFIG='projector.writers = 4'`). It is the only way
/// in: the role processes see no `LEDGER_*` variable (`ledger_command`
/// removes them), and read what this benchmark writes to their file.
fn with_overrides(config: ledger_runtime::Config) -> ledger_runtime::Config {
    use figment::providers::{Format, Serialized, Toml};
    let Ok(text) = std::env::var("BENCH_CONFIG") else { return config };
    // Layered as `Config::load` layers its file over the defaults.
    let config: ledger_runtime::Config = figment::Figment::from(Serialized::defaults(config))
        .merge(Toml::string(&text))
        .extract()
        .unwrap_or_else(|e| panic!("BENCH_CONFIG: {e}"));
    config.validate().unwrap_or_else(|e| panic!("BENCH_CONFIG: {e}"));
    eprintln!("BENCH_CONFIG applied: {text}");
    config
}

/// The paced phase's lag split in two at the log: for every paced
/// *delivered* event, its record's timestamp (set when the dispatcher
/// handed it to its producer) against the event's own time, and the
/// projection's lag counted from that timestamp instead of the event's
/// time. Returns (dispatcher p50, p99; projection from the log p50, p99)
/// in seconds, or `None` when the log did not give every record back.
fn lag_from_the_log(config: &ledger_runtime::Config, first: uuid::Uuid, paced: &Paced) -> Option<[f64; 4]> {
    use rdkafka::consumer::Consumer;
    use rdkafka::Message;
    let consumer = throwaway_consumer(config);
    let topic = ledger_schemas::Topic::Outcomes;
    let name = config.topic(topic);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..topic.partitions() {
        tpl.add_partition_offset(&name, p, rdkafka::Offset::Beginning).ok()?;
    }
    consumer.assign(&tpl).ok()?;
    let mut times: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while times.len() < paced.expected && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else { continue };
        let Ok(event) = ledger_schemas::Event::from_json(m.payload().unwrap_or_default()) else { continue };
        if event.intent_id.0 == first || !matches!(event.body, ledger_schemas::EventBody::Delivered(_)) {
            continue;
        }
        let logged = m.timestamp().to_millis().and_then(chrono::DateTime::from_timestamp_millis)?;
        times.push((logged, event.occurred_at));
    }
    if times.len() < paced.expected {
        return None;
    }
    let seconds = |from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>| {
        (to - from).num_microseconds().unwrap_or(0) as f64 / 1e6
    };
    let mut before: Vec<f64> = times.iter().map(|(logged, at)| seconds(*at, *logged).max(0.0)).collect();
    before.sort_by(|a, b| a.total_cmp(b));
    let mut logged: Vec<_> = times.iter().map(|t| t.0).collect();
    logged.sort();
    let after = lags_until_counted(&logged, &paced.samples, chrono::Utc::now(), seconds);
    Some([quantile(&before, 0.5), quantile(&before, 0.99), quantile(&after, 0.5), quantile(&after, 0.99)])
}
