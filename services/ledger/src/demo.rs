//! `ledger run all --demo N`: submits demo messages through the real API,
//! waits for the read model to show each one terminal, prints the summary.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use ledger_runtime::{Config, Shutdown};
use sqlx::PgPool;

pub const DEMO_TENANT: &str = "demo";

pub async fn summary(pool: &PgPool) -> anyhow::Result<String> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "-- ledger::demo::summary
         SELECT status, count(*) FROM messages GROUP BY status ORDER BY count(*) DESC, status",
    )
    .fetch_all(pool)
    .await?;
    let total: i64 = rows.iter().map(|r| r.1).sum();
    let mut out = String::from("status           messages\n---------------  --------\n");
    for (status, n) in rows {
        out.push_str(&format!("{status:<15}  {n:>8}\n"));
    }
    out.push_str(&format!("{:<15}  {total:>8}\n", "total"));
    Ok(out)
}

pub async fn run(config: &Config, addr: SocketAddr, count: u32, shutdown: &Shutdown) -> anyhow::Result<()> {
    let ops = ledger_runtime::db::pool(&config.ops_database_url, 2).await?;
    let key = ledger_ingest::tenants::rotate(&ops, DEMO_TENANT).await.context("creating the demo tenant")?;
    let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 2).await?;
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/messages");
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let mut intent_ids = Vec::with_capacity(count as usize);
    println!("demo: submitting {count} messages to {url}");
    for i in 0..count {
        // One in ten goes to a recipient outside the sandbox allow-list, to
        // show that nobody real is mailed outside production.
        let to = if i % 10 == 9 { format!("person{i}@elsewhere.test") } else { format!("user{i}@example.com") };
        let body = serde_json::json!({
            "to": to,
            "from": "demo@example.com",
            "variables": { "name": format!("User {i}"), "n": i },
            "content": {
                "subject": "Hello {{ name }}",
                "text": "Hi {{ name }}, this is demo message {{ n }}.",
                "html": "<p>Hi <b>{{ name }}</b>, this is demo message {{ n }}.</p>"
            }
        });
        let response = client
            .post(&url)
            .bearer_auth(&key)
            .header("idempotency-key", format!("demo-{run_id}-{i}"))
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let json: serde_json::Value = response.json().await.unwrap_or_default();
        if status.as_u16() != 202 {
            anyhow::bail!("demo message {i} was refused with {status}: {json}");
        }
        intent_ids.push(uuid::Uuid::parse_str(json["intent_id"].as_str().unwrap_or_default())?);
    }
    println!("demo: {count} accepted in {:.2}s; waiting for the read model", started.elapsed().as_secs_f64());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let terminal: i64 = sqlx::query_scalar(
            "-- ledger::demo::run (progress)
             SELECT count(*) FROM messages WHERE intent_id = ANY($1) AND status_rank = 50",
        )
        .bind(&intent_ids)
        .fetch_one(&reporting)
        .await?;
        if terminal >= i64::from(count) {
            break;
        }
        if Instant::now() > deadline || shutdown.is_triggered() {
            anyhow::bail!("only {terminal} of {count} demo messages reached a terminal state");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "demo: all {count} messages terminal in the read model after {:.2}s\n\nthe read model, every run so far:\n{}",
        started.elapsed().as_secs_f64(),
        summary(&reporting).await?
    );
    println!("The ingest API keeps running on http://{addr} (Ctrl-C to stop). Try:\n");
    println!(
        "  curl -i http://{addr}/v1/messages \\\n    -H 'Authorization: Bearer {key}' \\\n    -H 'Idempotency-Key: try-1' -H 'Content-Type: application/json' \\\n    -d '{{\"to\":\"you@example.com\",\"content\":{{\"subject\":\"Hi\",\"text\":\"Hello from the ledger\"}}}}'\n"
    );
    println!("  then: ledger summary   (or psql on the reporting database: SELECT * FROM messages)");
    Ok(())
}
