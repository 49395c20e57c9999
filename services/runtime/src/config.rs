//! Layered configuration: built-in defaults (local development), then an
//! optional TOML file (`LEDGER_CONFIG`), then `LEDGER_*` environment
//! variables, nested with `__` (`LEDGER_KAFKA__BROKERS=…`). Unknown keys are
//! refused so that a typo is an error, not a silent default.

use std::net::SocketAddr;
use std::path::PathBuf;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Sandbox: only allow-listed recipients are delivered to.
    #[default]
    Development,
    /// Everyone is delivered to. Must be chosen explicitly.
    Production,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mode: Mode,
    pub kafka: KafkaConfig,
    /// Operational store: idempotency keys, tenants, delivery claims.
    pub ops_database_url: String,
    /// Reporting read model; written only by the projector.
    pub reporting_database_url: String,
    pub http: HttpConfig,
    pub sandbox: SandboxConfig,
    pub sink: SinkConfig,
    pub projector: ProjectorConfig,
    pub dispatcher: DispatcherConfig,
    /// Sender identities: provider accounts with their own credentials,
    /// limits and tenants. A tenant's messages go through the identities
    /// that list it (or `*`) and serve the message's channel.
    pub identities: Vec<IdentityConfig>,
    /// Provider feedback intake (`POST /v1/feedback/{source}`): the keys
    /// each source's reports are verified with. A source without its key
    /// is refused.
    pub feedback: FeedbackConfig,
    pub telemetry: TelemetryConfig,
    /// After SIGTERM, the roles stop taking work and finish what is in
    /// flight; a process still running this many seconds later exits
    /// anyway (its claims' leases then decide what becomes of its calls).
    pub shutdown_grace_secs: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    /// Mailgun's webhook signing key: each event carries an HMAC-SHA256 of
    /// its timestamp and token under it.
    pub mailgun_signing_key: Option<String>,
    /// SendGrid's signed event webhook verification key: the base64 DER
    /// public key (ECDSA P-256) that SendGrid shows.
    pub sendgrid_public_key: Option<String>,
    /// Amazon SES through an SNS HTTPS subscription: the Basic-auth
    /// credentials put in the subscription URL (`user:password`), and the
    /// topic ARNs accepted.
    pub ses_basic_auth: Option<String>,
    pub ses_topic_arns: Vec<String>,
    /// Push *displayed* / *clicked* beacons carry a token, the hex
    /// HMAC-SHA256 of the message id under this secret.
    pub beacon_secret: Option<String>,
    /// How far a signed report's timestamp may be from now, in seconds
    /// (replayed reports older than this are refused).
    pub max_age_secs: Option<u64>,
}

/// The provider behind a sender identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// The local durable sink (every channel).
    Sink,
    /// SMTP submission (email).
    Smtp,
    /// Signed HTTP POST to the recipient URL (webhook).
    Webhook,
    /// An HTTP email API in the Mailgun style (email).
    HttpEmail,
    /// Browser push through Web Push with VAPID (push): `secret` is the
    /// VAPID private key (base64url), `from` the VAPID subject.
    Webpush,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub name: String,
    pub provider: ProviderKind,
    /// Tenant ids routed to this identity; `*` routes every tenant.
    #[serde(default = "all_tenants")]
    pub tenants: Vec<String>,
    /// Channels this identity carries; empty = every channel its provider
    /// can carry.
    #[serde(default)]
    pub channels: Vec<ledger_schemas::Channel>,
    /// Provider calls allowed per second, minute and UTC day, in total over
    /// every dispatcher instance; 0 = no limit.
    #[serde(default)]
    pub per_second: u32,
    #[serde(default)]
    pub per_minute: u32,
    #[serde(default)]
    pub per_day: u32,
    /// Calls that may go out at once after a quiet spell; 0 = a twentieth
    /// of a second's rate (at least 1).
    #[serde(default)]
    pub burst: u32,
    /// Provider calls in flight at once, per dispatcher instance.
    #[serde(default = "default_identity_concurrency")]
    pub concurrency: usize,
    /// SMTP: `smtp://host:port` (plain), `smtps://…` or `smtp://…?tls=required`;
    /// http_email: the API's base URL (`https://api.mailgun.net/v3/DOMAIN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// SMTP password; http_email: the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Webhook: the HMAC-SHA256 signing secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Sender address when a message has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// SMTP connections kept open.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// http_email only: up to this many messages (at most 1,000) in one
    /// API call, each recipient's rendered subject and body passed as its
    /// recipient variables; 0 sends one call per message. Needs a
    /// `concurrency` at least as large to fill its batches.
    #[serde(default)]
    pub batch_size: usize,
    /// How long a batch waits for more messages before it goes.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
}

fn default_batch_wait_ms() -> u64 {
    50
}

fn all_tenants() -> Vec<String> {
    vec!["*".into()]
}

fn default_identity_concurrency() -> usize {
    64
}

fn default_pool_size() -> u32 {
    4
}

impl IdentityConfig {
    /// An identity of `provider` for every tenant, without limits.
    pub fn new(name: &str, provider: ProviderKind) -> IdentityConfig {
        IdentityConfig {
            name: name.into(),
            provider,
            tenants: all_tenants(),
            channels: Vec::new(),
            per_second: 0,
            per_minute: 0,
            per_day: 0,
            burst: 0,
            // The local sink is a file with group commit: calls in flight
            // cost nothing but memory, and each waits for a batch's fsync.
            concurrency: if provider == ProviderKind::Sink { 1024 } else { default_identity_concurrency() },
            url: None,
            username: None,
            password: None,
            secret: None,
            from: None,
            pool_size: default_pool_size(),
            batch_size: 0,
            batch_wait_ms: default_batch_wait_ms(),
        }
    }

    pub fn serves_tenant(&self, tenant: &str) -> bool {
        self.tenants.iter().any(|t| t == "*" || t == tenant)
    }

    /// The steady rate in calls per second (the tighter of the per-second
    /// and per-minute limits), if limited.
    pub fn rate_per_second(&self) -> Option<f64> {
        let s = (self.per_second > 0).then_some(f64::from(self.per_second));
        let m = (self.per_minute > 0).then_some(f64::from(self.per_minute) / 60.0);
        match (s, m) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn effective_burst(&self) -> u32 {
        if self.burst > 0 {
            return self.burst;
        }
        self.rate_per_second().map(|r| ((r / 20.0) as u32).max(1)).unwrap_or(1)
    }
}

/// A failure the sink injects for recipients containing `recipient_contains`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SinkFailure {
    pub recipient_contains: String,
    pub kind: SinkFailureKind,
    /// The first this many attempts fail; 0 = every attempt.
    #[serde(default)]
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFailureKind {
    /// A 4xx-style temporary refusal: retried.
    Transient,
    /// A 5xx-style refusal for good: failed at once.
    Permanent,
    /// The call never answers (the dispatcher's provider timeout decides).
    Timeout,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    pub brokers: String,
    /// Prefix of every topic and consumer group name.
    pub topic_prefix: String,
    /// How long a produce may take before the request that caused it fails.
    pub produce_timeout_ms: u64,
    /// `lz4`, `zstd`, `snappy`, `gzip` or `none`.
    pub compression: String,
    /// How long the producer waits to fill a batch: latency against
    /// requests per second at the broker.
    pub linger_ms: u32,
    /// The same for ingest's producer, in milliseconds (fractions allowed).
    /// Every submission waits for its events' acknowledgement before it is
    /// answered, so this wait is part of every single message's latency;
    /// the other roles, which nobody waits on, use `linger_ms`.
    pub ingest_linger_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// How long an idempotency key is remembered, in hours.
    pub idempotency_ttl_hours: u32,
    /// Messages in one `POST /v1/messages/batch`.
    pub max_batch_messages: usize,
    /// Recipients in one campaign.
    pub max_campaign_recipients: usize,
    /// Largest JSON campaign body (held in memory); NDJSON campaigns stream
    /// to a spool file instead and are bounded by recipients only.
    pub max_campaign_json_bytes: usize,
    /// Recipients per recipient-batch event...
    pub batch_max_recipients: usize,
    /// ...and the most bytes of recipients in one, so that a record stays
    /// well under the broker's 1 MiB default.
    pub batch_max_bytes: usize,
    /// Where NDJSON campaigns are spooled while they are validated.
    pub spool_dir: Option<PathBuf>,
    /// `Retry-After` on a 503, in seconds.
    pub retry_after_secs: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Outside production, recipients delivered to: exact addresses, or
    /// `@domain` for a whole domain. Everyone else is suppressed.
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Directory of the local sink provider's durable delivery log.
    pub dir: PathBuf,
    /// Simulated provider latency per call, in milliseconds.
    pub latency_ms: u64,
    /// Failures injected for matching recipients (tests, demos).
    pub failures: Vec<SinkFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Most events in one transaction (a recipient batch counts as one per
    /// recipient: each makes a message row).
    pub batch_size: usize,
    /// Longest a batch waits after its first record for more while none
    /// are queued. Under load it does not wait: it takes what arrived while
    /// the last transaction ran.
    pub flush_interval_ms: u64,
    /// Transactions applied at once, each on its own connection over its
    /// own share of the partitions (partition number modulo this). One
    /// transaction at a time left a core idle while the reporting database
    /// worked on the last one.
    pub writers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherConfig {
    /// Records read ahead and in progress per dispatcher instance: the
    /// governor can only share fairly and put transactional mail first
    /// among messages it has seen.
    pub max_in_flight: usize,
    /// How long a dispatcher may hold an attempted message before another
    /// instance declares it ambiguous. Longer than any provider call.
    pub claim_lease_secs: u32,
    /// Provider calls per message before it fails for good.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for each further one, with up
    /// to a quarter added at random (jitter).
    pub retry_backoff_ms: u64,
    /// The longest wait between two attempts.
    pub retry_backoff_max_ms: u64,
    /// A provider call that takes longer is abandoned as ambiguous.
    pub provider_timeout_ms: u64,
    /// How long a rate-limited identity's permission to call stays good; a
    /// message that took longer to reach its call takes a fresh one first.
    /// Calls in any window stay within rate × (window + this) + burst.
    pub governor_grant_ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: String,
    /// Default filter when `RUST_LOG` is unset.
    pub log_filter: String,
    /// Where a process without the ingest role (which serves them on its
    /// API) serves `/metrics`, `/healthz` and `/readyz`; port 0 picks one.
    pub metrics_listen: std::net::SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Development,
            kafka: KafkaConfig::default(),
            ops_database_url: "postgres://postgres@127.0.0.1:5432/ledger".into(),
            reporting_database_url: "postgres://postgres@127.0.0.1:5432/ledger_reporting".into(),
            http: HttpConfig::default(),
            sandbox: SandboxConfig::default(),
            feedback: FeedbackConfig::default(),
            sink: SinkConfig::default(),
            projector: ProjectorConfig::default(),
            dispatcher: DispatcherConfig::default(),
            identities: vec![IdentityConfig::new("local-sink", ProviderKind::Sink)],
            telemetry: TelemetryConfig::default(),
            shutdown_grace_secs: 30,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "ledger.".into(),
            produce_timeout_ms: 10_000,
            compression: "none".into(),
            linger_ms: 2,
            ingest_linger_ms: 0.5,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 << 20,
            idempotency_ttl_hours: 24,
            max_batch_messages: 1_000,
            max_campaign_recipients: 1_000_000,
            max_campaign_json_bytes: 32 << 20,
            batch_max_recipients: 1_000,
            batch_max_bytes: 256 << 10,
            spool_dir: None,
            retry_after_secs: 5,
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        // example.com is reserved (RFC 2606): nobody real receives it.
        SandboxConfig { allow: vec!["@example.com".into(), "https://example.com/".into(), "http://127.0.0.1:".into()] }
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig { dir: PathBuf::from("var/sink"), latency_ms: 0, failures: Vec::new() }
    }
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig { batch_size: 5_000, flush_interval_ms: 2, writers: 2 }
    }
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            max_in_flight: 10_000,
            claim_lease_secs: 60,
            max_attempts: 3,
            retry_backoff_ms: 500,
            retry_backoff_max_ms: 300_000,
            provider_timeout_ms: 30_000,
            governor_grant_ttl_ms: 250,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: "text".into(),
            log_filter: "info,sqlx=warn,rdkafka=warn".into(),
            metrics_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// `LEDGER_*` variables that are not configuration: the test suite's
/// (`LEDGER_TEST_*`) and the infra scripts' (`LEDGER_BROKER_*`,
/// `LEDGER_PG_*`).
const NOT_CONFIG: [&str; 3] = ["test_", "broker_", "pg_"];

impl Config {
    /// Defaults, then the file named by `LEDGER_CONFIG` (if set), then the
    /// environment.
    pub fn load() -> Result<Config, RuntimeError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Ok(path) = std::env::var("LEDGER_CONFIG") {
            if !std::path::Path::new(&path).exists() {
                return Err(RuntimeError::Config(format!("LEDGER_CONFIG names {path}, which does not exist")));
            }
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment
            .merge(
                Env::prefixed("LEDGER_")
                    .filter(|k| {
                        let k = k.as_str().to_ascii_lowercase();
                        k != "config" && !NOT_CONFIG.iter().any(|p| k.starts_with(p))
                    })
                    .split("__"),
            )
            .extract()
            .map_err(|e| RuntimeError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |m: String| Err(RuntimeError::Config(m));
        if self.kafka.brokers.trim().is_empty() {
            return bad("kafka.brokers is empty".into());
        }
        if !["none", "lz4", "zstd", "snappy", "gzip"].contains(&self.kafka.compression.as_str()) {
            return bad(format!(
                "kafka.compression {:?} is not one of none, lz4, zstd, snappy, gzip",
                self.kafka.compression
            ));
        }
        if !(0.0..=900_000.0).contains(&self.kafka.ingest_linger_ms) {
            return bad(format!("kafka.ingest_linger_ms {} is not between 0 and 900000", self.kafka.ingest_linger_ms));
        }
        if self.ops_database_url == self.reporting_database_url {
            return bad("ops_database_url and reporting_database_url must name different databases".into());
        }
        if self.http.idempotency_ttl_hours < 24 {
            return bad("http.idempotency_ttl_hours must be at least 24".into());
        }
        if self.http.batch_max_recipients == 0 || self.http.batch_max_bytes < 4096 {
            return bad("http.batch_max_recipients must be at least 1 and http.batch_max_bytes at least 4096".into());
        }
        if self.projector.batch_size == 0 || self.dispatcher.max_in_flight == 0 {
            return bad("projector.batch_size and dispatcher.max_in_flight must be at least 1".into());
        }
        if !(1..=16).contains(&self.projector.writers) {
            return bad("projector.writers must be between 1 and 16".into());
        }
        if self.identities.is_empty() {
            return bad("no sender identity is configured".into());
        }
        let mut names = std::collections::HashSet::new();
        for i in &self.identities {
            if i.name.trim().is_empty() || !names.insert(i.name.as_str()) {
                return bad(format!("identity name {:?} is empty or used twice", i.name));
            }
            if i.concurrency == 0 || i.tenants.is_empty() {
                return bad(format!("identity {:?}: concurrency and tenants must not be empty", i.name));
            }
            if i.batch_size > 1_000 || (i.batch_size > 1 && i.provider != ProviderKind::HttpEmail) {
                return bad(format!("identity {:?}: batch_size is for http_email identities, up to 1000", i.name));
            }
            match i.provider {
                ProviderKind::Smtp | ProviderKind::HttpEmail if i.url.is_none() => {
                    return bad(format!("identity {:?}: an smtp or http_email identity needs a url", i.name))
                }
                ProviderKind::Webpush if i.secret.is_none() => {
                    return bad(format!(
                        "identity {:?}: a webpush identity needs its VAPID private key as secret",
                        i.name
                    ))
                }
                ProviderKind::Webhook if i.secret.as_deref().unwrap_or_default().len() < 16 => {
                    return bad(format!("identity {:?}: a webhook identity needs a secret of 16 bytes or more", i.name))
                }
                _ => {}
            }
        }
        if !["text", "json"].contains(&self.telemetry.log_format.as_str()) {
            return bad(format!("telemetry.log_format {:?} is not text or json", self.telemetry.log_format));
        }
        if self.dispatcher.governor_grant_ttl_ms == 0 {
            return bad("dispatcher.governor_grant_ttl_ms must be at least 1".into());
        }
        if self.dispatcher.provider_timeout_ms >= u64::from(self.dispatcher.claim_lease_secs) * 1000 {
            return bad("dispatcher.provider_timeout_ms must be shorter than dispatcher.claim_lease_secs".into());
        }
        if self.dispatcher.max_attempts == 0 {
            return bad("dispatcher.max_attempts must be at least 1".into());
        }
        for a in &self.sandbox.allow {
            if !a.contains('@') && !a.starts_with("http://") && !a.starts_with("https://") {
                return bad(format!("sandbox.allow entry {a:?} is neither an address, @domain nor a URL prefix"));
            }
        }
        Ok(())
    }

    pub fn topic(&self, topic: ledger_schemas::Topic) -> String {
        topic.name(&self.kafka.topic_prefix)
    }

    pub fn group(&self, group: ledger_schemas::ConsumerGroup) -> String {
        group.name(&self.kafka.topic_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_sandboxed() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.mode, Mode::Development);
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let r: Result<Config, _> = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[kafka]\nbrokerz = \"x\""))
            .extract();
        assert!(r.is_err());
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's signature, not ours
    fn the_environment_overrides_and_infra_variables_are_not_mistaken_for_config() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LEDGER_KAFKA__BROKERS", "kafka:9092");
            jail.set_env("LEDGER_BROKER_PORT", "19092");
            jail.set_env("LEDGER_PG_URL", "postgres://x");
            jail.set_env("LEDGER_TEST_BROKERS", "y");
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(c.kafka.brokers, "kafka:9092");
            jail.set_env("LEDGER_KAFKA__BROKERZ", "typo");
            assert!(Config::load().is_err(), "a typo must be refused");
            Ok(())
        });
    }

    #[test]
    fn one_database_for_both_roles_is_refused() {
        let mut c = Config::default();
        c.reporting_database_url = c.ops_database_url.clone();
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_projector_without_writers_or_with_too_many_is_refused() {
        for (writers, valid) in [(0, false), (1, true), (16, true), (17, false)] {
            let mut c = Config::default();
            c.projector.writers = writers;
            assert_eq!(c.validate().is_ok(), valid, "{writers} writers");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's signature, not ours
    fn ingest_linger_takes_fractions_of_a_millisecond_within_librdkafka_bounds() {
        for (linger, valid) in
            [(0.0, true), (0.5, true), (900_000.0, true), (-0.1, false), (900_001.0, false), (f64::NAN, false)]
        {
            let mut c = Config::default();
            c.kafka.ingest_linger_ms = linger;
            assert_eq!(c.validate().is_ok(), valid, "{linger} ms");
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("LEDGER_KAFKA__INGEST_LINGER_MS", "0.5");
            assert_eq!(Config::load().expect("config").kafka.ingest_linger_ms, 0.5);
            jail.set_env("LEDGER_KAFKA__INGEST_LINGER_MS", "3");
            assert_eq!(Config::load().expect("config").kafka.ingest_linger_ms, 3.0, "a whole number is a number of ms");
            Ok(())
        });
    }
}
