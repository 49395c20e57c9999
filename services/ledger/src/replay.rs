//! `ledger replay`: rebuilds the read model from the log into a schema of
//! its own beside the live one (which keeps serving reports), checks it
//! against the log, and can switch readers to it.
//!
//! The live read model is the reporting database's `public` schema. A
//! rebuild is migrated into its own schema and folded with the projector's
//! own code ([`ledger_projector::apply_records`]), under the projector's
//! offset rows, so that after a swap the running projector carries on from
//! where the rebuild stopped. The swap holds the live projector (a lock on
//! its offsets), folds into the rebuild whatever the live projector applied
//! meanwhile, and renames both schemas in one transaction: a report that is
//! running keeps reading the tables it started on; the next one, and the
//! projector's next batch, resolve `public` to the rebuild.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use ledger_projections::fold::StatusTally;
use ledger_projections::store::{self, PartitionOffset};
use ledger_projections::Fold;
use ledger_runtime::Config;
use ledger_schemas::{ConsumerGroup, Event, EventId, IntentId};
use rdkafka::Message;
use sqlx::PgPool;

use crate::confirm::confirm;
use crate::log::{self, Span};

/// The schema readers and the projector use.
pub const LIVE: &str = "public";

pub struct Options {
    pub as_of: Option<DateTime<Utc>>,
    pub schema: Option<String>,
    pub swap: bool,
    pub yes: bool,
    /// Distinct messages folded in memory before they are written (each
    /// message's row is then written once per window, not once per event).
    pub window: usize,
}

/// A schema name the tooling accepts: lower-case letters, digits and `_`.
pub fn check_schema_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && !name.starts_with("pg_")
        && name != LIVE;
    anyhow::ensure!(
        ok,
        "schema name {name:?}: use lower-case letters, digits and _ (not starting with a digit or pg_), \
         at most 63 characters, and not {LIVE:?} (the live read model)"
    );
    Ok(())
}

async fn schema_exists(pool: &PgPool, name: &str) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "-- ledger::replay::schema_exists
         SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
    )
    .bind(name)
    .fetch_one(pool)
    .await?)
}

/// What the log says the read model must hold, tallied from the events the
/// rebuild folded, independently of the database.
#[derive(Default)]
struct Tally {
    messages: StatusTally,
    intents: HashSet<IntentId>,
    dead_letters: HashSet<EventId>,
    records: u64,
    folded: u64,
    undecodable: u64,
    after_as_of: u64,
}

impl Tally {
    /// Takes in a window's fold, before it is written.
    fn see(&mut self, window: &Fold) {
        window.messages.values().for_each(|p| self.messages.add(p));
        self.intents.extend(window.intents.keys().copied());
        self.dead_letters.extend(window.dead_letters.iter().map(|d| EventId(d.event_id)));
    }
}

pub async fn projections(config: &Config, o: Options) -> anyhow::Result<()> {
    if o.swap && o.as_of.is_some() {
        anyhow::bail!(
            "--swap with --as-of: a read model as of a past time leaves out what came after it, and the \
             projector would never add it; rebuild without --as-of to swap"
        );
    }
    let schema = o.schema.clone().unwrap_or_else(|| format!("rebuild_{}", Utc::now().format("%Y%m%d_%H%M%S")));
    check_schema_name(&schema)?;
    if o.swap {
        confirm(config, o.yes, &format!("rebuild the read model into schema {schema} and switch every reader to it"))?;
    }
    let admin = ledger_runtime::db::pool(&config.reporting_database_url, 2).await.context("the reporting database")?;
    if schema_exists(&admin, &schema).await? {
        anyhow::bail!(
            "schema {schema} exists already: choose another --schema, or drop it (`ledger replay drop {schema}`)"
        );
    }
    create(&admin, config, &schema).await?;
    rebuild(config, &o, &admin, &schema).await.with_context(|| {
        format!("rebuilding into schema {schema} (kept as it is; drop it with `ledger replay drop {schema}`)")
    })?;
    if o.swap {
        let old = swap(config, &schema).await?;
        println!(
            "swapped: readers now use the rebuild as {LIVE}; the previous read model is kept as schema {old} \
             (drop it with `ledger replay drop {old}`)"
        );
    } else {
        println!("schema {schema} is ready; compare it with {LIVE}, or rebuild with --swap to switch readers");
    }
    Ok(())
}

/// Reads the log into the new `schema` and checks it against the log.
async fn rebuild(config: &Config, o: &Options, admin: &PgPool, schema: &str) -> anyhow::Result<()> {
    let pool = ledger_runtime::db::pool_in_schema(&config.reporting_database_url, schema, WRITERS as u32 + 1).await?;

    // Secondary indexes are built once at the end, not row by row.
    let indexes = drop_secondary_indexes(admin, schema).await?;
    let spans = log::whole(config, &ledger_projector::TOPICS)?;
    let total: u64 = spans.iter().map(Span::len).sum();
    let what = match o.as_of {
        Some(t) => format!(" as of {}", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        None => String::new(),
    };
    eprintln!("replaying {total} records of {} partitions into schema {schema}{what}", spans.len());
    let consumer = config.group(ConsumerGroup::Projector);
    let mut tally = Tally::default();
    let progress = Progress::new(total);
    let started = Instant::now();
    let as_of = o.as_of;
    let keep = move |e: &Event| as_of.is_none_or(|t| e.occurred_at <= t);
    // Folds are order-independent merges, so a window of the log folds in
    // memory and is written in one transaction with the offsets it reached;
    // the schema is new and nobody else writes to it.
    let mut window = Fold::default();
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut flushes = 0u32;
    let mut writing = std::time::Duration::ZERO;
    let mut chunks = log::stream(config, spans, 20_000);
    while let Some(chunk) = chunks.recv().await {
        let chunk = chunk?;
        for m in &chunk {
            next.insert((m.topic().to_owned(), m.partition()), m.offset() + 1);
            match Event::from_json(m.payload().unwrap_or_default()) {
                Ok(event) if keep(&event) => {
                    tally.folded += 1;
                    window.add(&event);
                }
                Ok(_) => tally.after_as_of += 1,
                Err(_) => tally.undecodable += 1,
            }
        }
        tally.records += chunk.len() as u64;
        progress.advance(chunk.len() as u64);
        if window.messages.len() >= o.window.max(1) {
            tally.see(&window);
            let t = Instant::now();
            write(&pool, &consumer, std::mem::take(&mut window), &next).await?;
            writing += t.elapsed();
            flushes += 1;
        }
    }
    tally.see(&window);
    let t = Instant::now();
    write(&pool, &consumer, window, &next).await?;
    writing += t.elapsed();
    flushes += 1;
    let t = Instant::now();
    for definition in &indexes {
        sqlx::query(&format!("-- ledger::replay::projections (index)\n{definition}")).execute(admin).await?;
    }
    writing += t.elapsed();
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        tally.records == total,
        "read {} of the {total} records the log held when the replay started",
        tally.records
    );
    println!(
        "replayed {} records into schema {schema} in {seconds:.2} s ({:.0} events/s, {flushes} write(s) taking {:.1} s, peak memory {}): \
         {} events folded, {} after the as-of time left out, {} undecodable records skipped",
        tally.records,
        tally.records as f64 / seconds.max(1e-9),
        writing.as_secs_f64(),
        peak_memory(),
        tally.folded,
        tally.after_as_of,
        tally.undecodable
    );
    let checks = verify(&pool, &tally).await?;
    let failed = checks.iter().filter(|c| c.log != c.read_model).count();
    println!("checked against the log:");
    for c in &checks {
        let mark = if c.log == c.read_model { "ok" } else { "DIFFERS" };
        println!("  {:<32} log {:>10}  read model {:>10}  {mark}", c.what, c.log, c.read_model);
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) differ from the log: not swapped");
    }
    Ok(())
}

/// Drops the indexes of `schema` that back no constraint; returns their
/// definitions, to be created again.
async fn drop_secondary_indexes(admin: &PgPool, schema: &str) -> anyhow::Result<Vec<String>> {
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "-- ledger::replay::drop_secondary_indexes
         SELECT i.indexname::text, i.indexdef FROM pg_indexes i
         WHERE i.schemaname = $1
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                           WHERE c.conindid = format('%I.%I', i.schemaname, i.indexname)::regclass)",
    )
    .bind(schema)
    .fetch_all(admin)
    .await?;
    for (name, _) in &indexes {
        sqlx::query(&format!("-- ledger::replay::drop_secondary_indexes\nDROP INDEX \"{schema}\".\"{name}\""))
            .execute(admin)
            .await?;
    }
    Ok(indexes.into_iter().map(|(_, definition)| definition).collect())
}

/// Writers of one window, each on its own connection.
const WRITERS: usize = 2;

/// Writes a folded window, then the offsets it reached. The window is split
/// by message id between [`WRITERS`] transactions that run at once (the
/// schema is new and only this replay writes to it: a replay that fails is
/// dropped and run again, so the parts need not commit as one).
async fn write(pool: &PgPool, consumer: &str, fold: Fold, next: &BTreeMap<(String, i32), i64>) -> anyhow::Result<()> {
    let writes = split(fold, WRITERS).into_iter().map(|part| async move {
        let mut tx = pool.begin().await?;
        store::apply(&mut tx, &part).await?;
        tx.commit().await?;
        anyhow::Ok(())
    });
    for done in futures::future::join_all(writes).await {
        done?;
    }
    let offsets: Vec<PartitionOffset> = next
        .iter()
        .map(|((topic, partition), o)| PartitionOffset { topic: topic.clone(), partition: *partition, next_offset: *o })
        .collect();
    let mut tx = pool.begin().await?;
    store::save_offsets(&mut tx, consumer, &offsets).await?;
    tx.commit().await?;
    Ok(())
}

/// `fold` in `n` parts by message id; what is not about one message goes
/// in the first.
fn split(fold: Fold, n: usize) -> Vec<Fold> {
    let mut parts: Vec<Fold> = (0..n.max(1)).map(|_| Fold::default()).collect();
    let count = parts.len();
    let which = |id: &ledger_schemas::MessageId| (id.0.as_u128() % count as u128) as usize;
    for (id, m) in fold.messages {
        parts[which(&id)].messages.insert(id, m);
    }
    for (key, a) in fold.attempts {
        parts[which(&key.0)].attempts.insert(key, a);
    }
    let first = &mut parts[0];
    first.intents = fold.intents;
    first.dead_letters = fold.dead_letters;
    first.cancelled = fold.cancelled;
    parts
}

/// The schema, its tables (the read model's migrations) and the reporting
/// role's grants.
async fn create(admin: &PgPool, config: &Config, schema: &str) -> anyhow::Result<()> {
    sqlx::query(&format!("-- ledger::replay::create\nCREATE SCHEMA \"{schema}\"")).execute(admin).await?;
    let pool = ledger_runtime::db::pool_in_schema(&config.reporting_database_url, schema, 1).await?;
    ledger_projections::MIGRATOR.run(&pool).await.with_context(|| format!("migrating schema {schema}"))?;
    pool.close().await;
    for grant in [
        format!("GRANT USAGE ON SCHEMA \"{schema}\" TO ledger_reporter"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA \"{schema}\" TO ledger_reporter"),
        format!("ALTER DEFAULT PRIVILEGES IN SCHEMA \"{schema}\" GRANT SELECT ON TABLES TO ledger_reporter"),
    ] {
        sqlx::query(&format!("-- ledger::replay::create (grants)\n{grant}")).execute(admin).await?;
    }
    Ok(())
}

struct Check {
    what: String,
    log: i64,
    read_model: i64,
}

/// Row counts and per-status totals of the rebuild against the tally.
async fn verify(pool: &PgPool, tally: &Tally) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let count = |sql: &'static str| async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await };
    checks.push(Check {
        what: "messages".into(),
        log: tally.messages.0.len() as i64,
        read_model: count("-- ledger::replay::verify (messages)\nSELECT count(*) FROM messages").await?,
    });
    checks.push(Check {
        what: "intents".into(),
        log: tally.intents.len() as i64,
        read_model: count("-- ledger::replay::verify (intents)\nSELECT count(*) FROM intents").await?,
    });
    checks.push(Check {
        what: "dead letters".into(),
        log: tally.dead_letters.len() as i64,
        read_model: count("-- ledger::replay::verify (dead letters)\nSELECT count(*) FROM dead_letters").await?,
    });
    let by_status: BTreeMap<String, i64> = sqlx::query_as(
        "-- ledger::replay::verify (statuses)
         SELECT status, count(*) FROM messages GROUP BY status",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    let rolled_up: BTreeMap<String, i64> = sqlx::query_as(
        "-- ledger::replay::verify (roll-up)
         SELECT status, sum(messages)::bigint FROM intent_status_counts GROUP BY status HAVING sum(messages) <> 0",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    let expected = tally.messages.counts();
    let mut names: Vec<&String> = expected.keys().chain(by_status.keys()).chain(rolled_up.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let log = expected.get(name).copied().unwrap_or(0);
        checks.push(Check {
            what: format!("messages {name}"),
            log,
            read_model: by_status.get(name).copied().unwrap_or(0),
        });
        checks.push(Check {
            what: format!("campaign counts {name}"),
            log,
            read_model: rolled_up.get(name).copied().unwrap_or(0),
        });
    }
    Ok(checks)
}

/// Switches readers to `schema`; returns the name the previous live schema
/// is kept under.
async fn swap(config: &Config, schema: &str) -> anyhow::Result<String> {
    let consumer = config.group(ConsumerGroup::Projector);
    let old = format!("replaced_{}", Utc::now().format("%Y%m%d_%H%M%S"));
    let pool = ledger_runtime::db::pool(&config.reporting_database_url, 1).await?;
    let mut tx = pool.begin().await?;
    // The live projector's next batch waits here (it locks these rows
    // first); reports, which only read, do not.
    sqlx::query(&format!(
        "-- ledger::replay::swap (hold the live projector)\nLOCK TABLE {LIVE}.projector_offsets IN EXCLUSIVE MODE"
    ))
    .execute(&mut *tx)
    .await?;
    let live: Vec<(String, i32, i64)> = sqlx::query_as(&format!(
        "-- ledger::replay::swap (live offsets)
         SELECT topic, partition, next_offset FROM {LIVE}.projector_offsets WHERE consumer = $1"
    ))
    .bind(&consumer)
    .fetch_all(&mut *tx)
    .await?;
    let rebuilt: HashMap<(String, i32), i64> = sqlx::query_as::<_, (String, i32, i64)>(&format!(
        "-- ledger::replay::swap (rebuild offsets)
         SELECT topic, partition, next_offset FROM \"{schema}\".projector_offsets WHERE consumer = $1"
    ))
    .bind(&consumer)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|(t, p, o)| ((t, p), o))
    .collect();
    // What the live projector applied since the rebuild read the log.
    let behind: Vec<Span> = live
        .into_iter()
        .filter_map(|(topic, partition, live)| {
            let from = rebuilt.get(&(topic.clone(), partition)).copied().unwrap_or(0);
            (live > from).then_some(Span { topic, partition, from, to: live })
        })
        .collect();
    if !behind.is_empty() {
        let records = log::read_all(config, behind).await?;
        sqlx::query(&format!("-- ledger::replay::swap (catch up)\nSET LOCAL search_path TO \"{schema}\""))
            .execute(&mut *tx)
            .await?;
        let applied = ledger_projector::apply_records(&mut tx, &consumer, &records, &|_| true, &mut |_| {}).await?;
        eprintln!("caught up with the live projector: {} records", applied.fresh);
    }
    sqlx::query(&format!("-- ledger::replay::swap (rename)\nALTER SCHEMA {LIVE} RENAME TO \"{old}\""))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("-- ledger::replay::swap (rename)\nALTER SCHEMA \"{schema}\" RENAME TO {LIVE}"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(old)
}

/// Drops a read-model schema kept by a rebuild or a swap.
pub async fn drop(config: &Config, schema: &str, yes: bool) -> anyhow::Result<()> {
    check_schema_name(schema)?;
    let pool = ledger_runtime::db::pool(&config.reporting_database_url, 1).await?;
    let is_read_model: bool = sqlx::query_scalar(
        "-- ledger::replay::drop (is it a read model)
         SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'projector_offsets')",
    )
    .bind(schema)
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(is_read_model, "schema {schema} is not a read model kept by `ledger replay`");
    confirm(config, yes, &format!("drop schema {schema} and every table in it"))?;
    sqlx::query(&format!("-- ledger::replay::drop\nDROP SCHEMA \"{schema}\" CASCADE")).execute(&pool).await?;
    println!("dropped schema {schema}");
    Ok(())
}

/// The read-model schemas in the reporting database, with their sizes.
pub async fn list(config: &Config) -> anyhow::Result<()> {
    let pool = ledger_runtime::db::pool(&config.reporting_database_url, 1).await?;
    let schemas: Vec<String> = sqlx::query_scalar(
        "-- ledger::replay::list
         SELECT schemaname::text FROM pg_tables WHERE tablename = 'projector_offsets' ORDER BY schemaname = 'public' DESC, schemaname",
    )
    .fetch_all(&pool)
    .await?;
    for s in schemas {
        let messages: i64 =
            sqlx::query_scalar(&format!("-- ledger::replay::list (size)\nSELECT count(*) FROM \"{s}\".messages"))
                .fetch_one(&pool)
                .await?;
        let role = if s == LIVE { "live" } else { "kept" };
        println!("{s:<32} {role:<5} {messages:>10} messages");
    }
    Ok(())
}

/// This process's peak resident memory (Linux), for the summary.
fn peak_memory() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l["VmHWM:".len()..].trim().to_owned()))
        .and_then(|kb| kb.trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map(|kb| format!("{} MiB", kb / 1024))
        .unwrap_or_else(|| "unknown".into())
}

/// A progress bar on a terminal; a line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: std::cell::Cell<u64>,
    started: Instant,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:32}] {pos}/{len} events  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        let now = Instant::now();
        Progress { bar, total, done: 0.into(), started: now, last_line: now.into() }
    }

    fn advance(&self, n: u64) {
        self.done.set(self.done.get() + n);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        } else if self.last_line.get().elapsed().as_secs() >= 5 {
            self.last_line.set(Instant::now());
            let rate = self.done.get() as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            let eta = (self.total - self.done.get().min(self.total)) as f64 / rate.max(1e-9);
            eprintln!("{}/{} events  {rate:.0}/s  ETA {eta:.0} s", self.done.get(), self.total);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers_and_never_the_live_one() {
        for good in ["rebuild_20261201", "shadow", "_x1"] {
            assert!(check_schema_name(good).is_ok(), "{good}");
        }
        for bad in ["public", "pg_temp", "1abc", "Shadow", "a-b", "a\"b", "", &"x".repeat(64)] {
            assert!(check_schema_name(bad).is_err(), "{bad}");
        }
    }
}
