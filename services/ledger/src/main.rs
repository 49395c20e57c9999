//! `ledger`: runs any role of the delivery ledger, or all of them in one
//! process, and does the administration around them.

mod confirm;
mod demo;
mod dlq;
mod inspect;
mod lag;
mod log;
mod ops;
mod redrive;
mod replay;

/// glibc's allocator spends a quarter of the renderer's time in arena
/// locks and consolidation (perf); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ledger_runtime::{telemetry, Config, Shutdown};

#[derive(Parser)]
#[command(name = "ledger", version, about = "Event-sourced delivery ledger")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one role, several, or all of them in this process until Ctrl-C.
    Run {
        #[arg(value_enum, required = true)]
        roles: Vec<Role>,
        /// After start-up, submit this many demo messages through the API,
        /// wait until each is terminal and print the read model's summary.
        #[arg(long)]
        demo: Option<u32>,
    },
    /// Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Databases (operational store and reporting read model).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Tenants and their API keys.
    Tenants {
        #[command(subcommand)]
        command: TenantsCommand,
    },
    /// Templates: immutable, versioned, published to the templates topic.
    Templates {
        #[command(subcommand)]
        command: TemplatesCommand,
    },
    /// Messages by status, from the reporting read model.
    Summary,
    /// Rebuild the read model from the log.
    Replay {
        #[command(subcommand)]
        command: ReplayCommand,
    },
    /// Send failed, dead-lettered or ambiguous messages again, as new
    /// attempts through the dispatcher (governor, suppression and sandbox
    /// apply). Running it twice never sends a message twice.
    Redrive {
        #[arg(long, value_enum)]
        status: redrive::RedriveStatus,
        #[arg(long)]
        tenant: Option<String>,
        /// Only the messages of this intent (campaign) id.
        #[arg(long)]
        campaign: Option<uuid::Uuid>,
        /// Only messages whose last change was at or after this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// List what would be sent and to whom; send nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        yes: bool,
    },
    /// A message's or an intent's full history from the log, next to the
    /// read model's row.
    Inspect {
        #[command(subcommand)]
        command: InspectCommand,
    },
    /// Dead letters: list, show, reprocess.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Consumer lag by role and partition, and the projection's lag.
    Lag,
    /// Messages whose delivery is ambiguous (the provider was called, the
    /// outcome is unknown), held for reconciliation; from the operational
    /// store, which decides them.
    Ambiguous {
        #[arg(long)]
        tenant: Option<String>,
        /// At most this many, oldest first.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum InspectCommand {
    Message { id: uuid::Uuid },
    Intent { id: uuid::Uuid },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Every dead letter on the log, oldest first.
    List {
        #[arg(long)]
        code: Option<String>,
    },
    /// One dead letter with its payload.
    Show { id: uuid::Uuid },
    /// Send dead letters back to their topic to be processed again.
    Reprocess {
        ids: Vec<uuid::Uuid>,
        /// Every dead letter (with --code: every one with that code).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        code: Option<String>,
        /// Also those reprocessed before.
        #[arg(long)]
        again: bool,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum ReplayCommand {
    /// Rebuild the whole read model from the log into a schema of its own
    /// (the live one keeps serving), check it against the log, and with
    /// --swap switch every reader to it.
    Projections {
        /// Only events that happened at or before this time (RFC 3339), by
        /// their own timestamps: the read model as it was then.
        #[arg(long, value_parser = parse_time)]
        as_of: Option<chrono::DateTime<chrono::Utc>>,
        /// The schema to build into (default rebuild_<time>); it must not exist.
        #[arg(long)]
        schema: Option<String>,
        /// Switch readers to the rebuild atomically; the previous read
        /// model is kept as replaced_<time> until dropped.
        #[arg(long)]
        swap: bool,
        /// Distinct messages folded in memory before they are written
        /// (about 2.5 KiB each, measured): each message's row is written
        /// once per window.
        #[arg(long, default_value_t = 1_000_000)]
        window: usize,
        /// Do it without asking.
        #[arg(long)]
        yes: bool,
    },
    /// The read-model schemas: the live one and those kept by rebuilds.
    List,
    /// Drop a read-model schema kept by a rebuild or a swap.
    Drop {
        schema: String,
        #[arg(long)]
        yes: bool,
    },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time such as 2026-12-01T09:30:00Z: {e}"))
}

#[derive(Subcommand)]
enum TemplatesCommand {
    /// Publish FILE (JSON or TOML: name, channel, content.subject/text/html/json)
    /// as the next version of its template.
    Publish {
        file: std::path::PathBuf,
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create every ledger topic with its partition count (existing ones are kept).
    Create {
        #[arg(long, default_value_t = 1)]
        replication: i32,
        /// Wait this many seconds for the broker to answer first.
        #[arg(long, default_value_t = 30)]
        wait: u64,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create the databases if missing and apply every migration.
    Migrate,
    /// Delete every intent, claim and read-model row (tenants and templates
    /// stay): for a development log that was started afresh. Refused in
    /// production mode.
    Reset {
        /// Do it without asking.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// Create a tenant and print its API key (shown only this once).
    Create { name: String },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Ingest,
    Render,
    Dispatch,
    Project,
    All,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = async {
        let config = Config::load()?;
        telemetry::init(&config.telemetry);
        dispatch(cli, config).await
    }
    .await;
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn dispatch(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { roles, demo } => run(config, roles, demo).await,
        Command::Topics { command: TopicsCommand::Create { replication, wait } } => {
            ledger_runtime::kafka::wait_for_broker(&config, Duration::from_secs(wait))
                .await
                .with_context(|| format!("no Kafka broker answered at {}", config.kafka.brokers))?;
            for (name, what) in ledger_runtime::kafka::create_topics(&config, replication).await? {
                println!("{what:>8}  {name}");
            }
            Ok(())
        }
        Command::Db { command: DbCommand::Migrate } => {
            ledger_runtime::db::migrate(
                &config.ops_database_url,
                &config.reporting_database_url,
                &ledger_projections::MIGRATOR,
            )
            .await
            .context("migrating the databases")?;
            println!("migrated {} and {}", redact(&config.ops_database_url), redact(&config.reporting_database_url));
            Ok(())
        }
        Command::Db { command: DbCommand::Reset { yes } } => {
            if config.mode == ledger_runtime::Mode::Production {
                anyhow::bail!("ledger db reset is refused in production mode");
            }
            confirm::confirm(&config, yes, "ledger db reset deletes every intent, claim and read-model row")?;
            let ops = ledger_runtime::db::pool(&config.ops_database_url, 1).await?;
            sqlx::query(
                "-- ledger::db_reset (operational)
                 TRUNCATE idempotency_keys, intents, cancelled_intents, delivery_claims, scheduled_batches,
                          dead_letters_reprocessed",
            )
            .execute(&ops)
            .await?;
            let reporting = ledger_runtime::db::pool(&config.reporting_database_url, 1).await?;
            sqlx::query(
                "-- ledger::db_reset (read model)
                 TRUNCATE messages, intents, intent_cancellations, dead_letters, projector_offsets,
                          delivery_attempts, intent_status_counts, tenant_hourly, identity_hourly",
            )
            .execute(&reporting)
            .await?;
            println!("reset the operational store and the read model for a fresh log");
            Ok(())
        }
        Command::Tenants { command: TenantsCommand::Create { name } } => {
            let pool = ledger_runtime::db::pool(&config.ops_database_url, 1).await?;
            let key = ledger_ingest::tenants::create(&pool, &name).await?;
            println!("tenant {name} created; its API key (shown only now):\n{key}");
            Ok(())
        }
        Command::Templates { command: TemplatesCommand::Publish { file, tenant } } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let request: ledger_ingest::validate::TemplateRequest = if file.extension().is_some_and(|e| e == "toml") {
                toml::from_str(&text).with_context(|| format!("{} is not a template (TOML)", file.display()))?
            } else {
                serde_json::from_str(&text).with_context(|| format!("{} is not a template (JSON)", file.display()))?
            };
            let tenant = ledger_schemas::TenantId::parse(&tenant)?;
            let ops = ledger_runtime::db::pool(&config.ops_database_url, 1).await?;
            let producer = ledger_runtime::kafka::producer(&config)?;
            match ledger_ingest::templates::publish(&config, &producer, &ops, &tenant, &request, "cli").await {
                Ok((version, true)) => println!("published {} version {version}", request.name),
                Ok((version, false)) => println!("{} version {version} has this content already", request.name),
                Err(e) => {
                    let detail = match &e {
                        ledger_ingest::problem::ApiError::Validation(errors) => {
                            errors.iter().map(|f| format!("\n  {}: {}", f.field, f.detail)).collect::<String>()
                        }
                        _ => String::new(),
                    };
                    anyhow::bail!("{e}{detail}");
                }
            }
            Ok(())
        }
        Command::Ambiguous { tenant, limit } => {
            let ops = ledger_runtime::db::pool(&config.ops_database_url, 1).await?;
            let rows: Vec<AmbiguousRow> = sqlx::query_as(
                "-- ledger::ambiguous
                     SELECT message_id, tenant_id, attempt, identity, updated_at, outcome::json AS outcome FROM delivery_claims
                     WHERE state = 'ambiguous' AND ($1::text IS NULL OR tenant_id = $1)
                     ORDER BY updated_at LIMIT $2",
            )
            .bind(&tenant)
            .bind(limit)
            .fetch_all(&ops)
            .await?;
            println!("{} ambiguous message(s)", rows.len());
            for (id, tenant, attempt, identity, since, outcome) in rows {
                let reason = outcome
                    .as_ref()
                    .and_then(|o| o.pointer("/data/reason"))
                    .and_then(|r| r.as_str())
                    .unwrap_or_default()
                    .to_owned();
                println!(
                    "{id}  tenant={tenant}  attempt={attempt}  identity={}  since={}  {reason}",
                    identity.unwrap_or_default(),
                    since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
            }
            Ok(())
        }
        Command::Replay { command } => match command {
            ReplayCommand::Projections { as_of, schema, swap, window, yes } => {
                replay::projections(&config, replay::Options { as_of, schema, swap, yes, window }).await
            }
            ReplayCommand::List => replay::list(&config).await,
            ReplayCommand::Drop { schema, yes } => replay::drop(&config, &schema, yes).await,
        },
        Command::Redrive { status, tenant, campaign, since, dry_run, yes } => {
            redrive::redrive(&config, redrive::Options { status, tenant, campaign, since, dry_run, yes }).await
        }
        Command::Inspect { command: InspectCommand::Message { id } } => inspect::message(&config, id).await,
        Command::Inspect { command: InspectCommand::Intent { id } } => inspect::intent(&config, id).await,
        Command::Dlq { command } => match command {
            DlqCommand::List { code } => dlq::list(&config, code.as_deref()).await,
            DlqCommand::Show { id } => dlq::show(&config, id).await,
            DlqCommand::Reprocess { ids, all, code, again, dry_run, yes } => {
                dlq::reprocess(&config, dlq::Selection { ids, all, code, again, dry_run, yes }).await
            }
        },
        Command::Lag => lag::lag(&config).await,
        Command::Summary => {
            let pool = ledger_runtime::db::pool(&config.reporting_database_url, 1).await?;
            print!("{}", demo::summary(&pool).await?);
            Ok(())
        }
    }
}

/// message id, tenant, attempt, identity, since, recorded outcome
type AmbiguousRow = (uuid::Uuid, String, i32, Option<String>, chrono::DateTime<chrono::Utc>, Option<serde_json::Value>);

/// Hides a password in a database URL.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if url[s + 3..at].contains(':') => {
            let user_end = s + 3 + url[s + 3..at].find(':').unwrap_or(0);
            format!("{}:***{}", &url[..user_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

async fn run(config: Config, roles: Vec<Role>, demo: Option<u32>) -> anyhow::Result<()> {
    let all = roles.contains(&Role::All);
    let has = |r: Role| all || roles.contains(&r);
    let shutdown = Shutdown::new();
    shutdown.on_signal();
    let mut tasks = tokio::task::JoinSet::new();
    let mut api = None;
    if has(Role::Ingest) {
        let ingest = ledger_ingest::build(&config).await.context("building ingest")?;
        api = Some(ingest.local_addr());
        let s = shutdown.clone();
        tasks.spawn(async move { ingest.run(s).await.map_err(anyhow::Error::from) });
    }
    if has(Role::Render) {
        let renderer = ledger_renderer::build(&config).await.context("building renderer")?;
        let s = shutdown.clone();
        tasks.spawn(async move { renderer.run(s).await.map_err(anyhow::Error::from) });
    }
    if has(Role::Dispatch) {
        let dispatcher = ledger_dispatcher::build(&config).await.context("building dispatcher")?;
        let s = shutdown.clone();
        tasks.spawn(async move { dispatcher.run(s).await.map_err(anyhow::Error::from) });
    }
    if has(Role::Project) {
        let projector = ledger_projector::build(&config).await.context("building projector")?;
        let s = shutdown.clone();
        tasks.spawn(async move { projector.run(s).await.map_err(anyhow::Error::from) });
    }
    if api.is_none() {
        let mut databases = Vec::new();
        if has(Role::Render) || has(Role::Dispatch) {
            databases.push(("operational_store", config.ops_database_url.clone()));
        }
        if has(Role::Project) {
            databases.push(("read_model", config.reporting_database_url.clone()));
        }
        let (addr, server) = ops::serve(&config, databases, shutdown.clone()).await?;
        println!("metrics and probes on http://{addr}/metrics, /healthz, /readyz  (Ctrl-C to stop)");
        tasks.spawn(server);
    }
    if let Some(count) = demo {
        let addr = api.context("--demo needs the ingest role")?;
        if !(all || (has(Role::Render) && has(Role::Dispatch) && has(Role::Project))) {
            anyhow::bail!("--demo needs every role: use `ledger run all --demo N`");
        }
        let demo_shutdown = shutdown.clone();
        let demo_config = config.clone();
        tasks.spawn(async move {
            let result = demo::run(&demo_config, addr, count, &demo_shutdown).await;
            if let Err(e) = &result {
                eprintln!("demo failed: {e:#}");
                demo_shutdown.trigger();
            }
            result
        });
    } else if let Some(addr) = api {
        println!("ingest API on http://{addr}  (Ctrl-C to stop)");
    }
    // A bounded stop: what is not done within the grace period is left to
    // the claims' leases and the uncommitted offsets (read again, decided
    // again by the claims), never lost.
    let grace = Duration::from_secs(u64::from(config.shutdown_grace_secs));
    let watchdog = shutdown.clone();
    tokio::spawn(async move {
        watchdog.wait().await;
        tokio::time::sleep(grace).await;
        eprintln!("still stopping after {}s (shutdown_grace_secs): exiting now", grace.as_secs());
        std::process::exit(2);
    });
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            // One role failing stops the others: a half-running ledger would
            // accept work it cannot finish.
            failure.get_or_insert(e);
            shutdown.trigger();
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
