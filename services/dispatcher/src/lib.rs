//! The dispatcher: delivers rendered messages through the providers of
//! configured sender identities.
//!
//! Delivery guarantee: at most one provider call per message and attempt,
//! never a silent resend (invariant 4). A message is claimed in the
//! operational store; a `delivery.attempted` event is acknowledged by the
//! broker before the provider is called; the outcome is recorded in the
//! claim, then on the log. A redelivered record finds the claim and
//! re-publishes the recorded outcome instead of sending again. A message
//! left *attempted* by a dispatcher that vanished becomes ambiguous once its
//! lease runs out: resent with the same idempotency key where the provider
//! honours one, otherwise held and reported.
//!
//! Records are read ahead (up to `dispatcher.max_in_flight`) and finish in
//! any order, so the governor can share an identity fairly and put
//! transactional mail first, and a throttled or retried message holds up
//! nobody. Offsets are stored up to the lowest record still in flight
//! (at-least-once consumption, effectively-once delivery).
//!
//! Transient failures go to the retries topic with the time the next
//! attempt is due; a second consumer takes them from there.
//!
//! Before any of that: outside production, recipients not on the sandbox
//! allow-list are suppressed (invariant 8); recipients on the tenant's
//! suppression list are suppressed; messages of a cancelled intent are
//! cancelled.

mod batch;
mod claims;
pub mod governor;
pub mod http_email;
mod offsets;
pub mod provider;
pub mod sink;
pub mod smtp;
pub mod webhook;
pub mod webpush;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use ledger_runtime::{kafka, Config, IdentityConfig, Mode, ProviderKind, RuntimeError, Shutdown};
use ledger_schemas::{
    normalise_recipient, Channel, ConsumerGroup, Delivered, DeliveryAmbiguous, DeliveryAttempted, DeliveryFailed,
    Event, EventBody, EventId, MessageCancelled, MessageId, MessageRendered, Suppressed, SuppressionReason, Topic,
    HEADER_ATTEMPT, HEADER_NOT_BEFORE,
};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Header, Headers, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use sqlx::PgPool;
use tokio::sync::{mpsc, Semaphore};

use crate::claims::{ClaimFor, Claims, FirstFor, Look, LookFor, OutcomeFor};
use crate::governor::{Governor, Permission};
use crate::offsets::Offsets;
use crate::provider::{Delivery, Provider, ProviderError};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("operational store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("operational store: {0}")]
    Store(#[from] Arc<sqlx::Error>),
    #[error("shutting down")]
    Shutdown,
}

pub struct Dispatcher {
    config: Config,
    rendered: kafka::LedgerConsumer,
    retries: kafka::LedgerConsumer,
    producer: FutureProducer,
    ops: PgPool,
    /// The governors' own connections: their reservations must not queue
    /// behind the work of thousands of messages read ahead.
    governor_pool: PgPool,
    providers: Vec<(IdentityConfig, Arc<dyn Provider>)>,
    instance: String,
}

/// A sender identity at work: its provider and its governor (which hands
/// out its call slots too).
struct Identity {
    config: IdentityConfig,
    provider: Arc<dyn Provider>,
    governor: Arc<Governor>,
    /// `ledger_provider_call_seconds` of this identity.
    calls: metrics::Histogram,
}

struct Inner {
    config: Config,
    producer: FutureProducer,
    ops: PgPool,
    identities: Vec<Identity>,
    /// Bounds the lookups of messages read ahead, so that thousands of them
    /// never queue in front of the calls the governor just allowed (which
    /// would bunch those calls up at the provider).
    looks: Semaphore,
    /// The hot-path statements on claims, batched across messages.
    claims: Claims,
    /// Identifies this process in claims.
    instance: String,
    deliveries: Deliveries,
}

/// `ledger_deliveries_total` by outcome, tenant and identity. A handle's
/// labels are built, and the recorder's registry searched, once for each
/// combination instead of for every message.
#[derive(Default)]
struct Deliveries(std::sync::Mutex<HashMap<&'static str, ByTenant>>);

/// Counters by tenant, then identity.
type ByTenant = HashMap<String, HashMap<String, metrics::Counter>>;

impl Deliveries {
    fn count(&self, tenant: &str, identity: &str, outcome: &'static str) {
        let mut by_outcome = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let by_tenant = by_outcome.entry(outcome).or_default();
        if !by_tenant.contains_key(tenant) {
            by_tenant.insert(tenant.to_owned(), HashMap::new());
        }
        let Some(by_identity) = by_tenant.get_mut(tenant) else { return };
        if let Some(counter) = by_identity.get(identity) {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!("ledger_deliveries_total", "tenant" => tenant.to_owned(), "identity" => identity.to_owned(), "outcome" => outcome);
        counter.increment(1);
        by_identity.insert(identity.to_owned(), counter);
    }
}

/// Which topic a record came from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    Rendered,
    Retries,
}

impl Source {
    fn topic_name(self) -> &'static str {
        match self {
            Source::Rendered => Topic::Rendered.base_name(),
            Source::Retries => Topic::Retries.base_name(),
        }
    }
}

/// Builds the provider of one identity.
pub async fn provider_for(config: &Config, identity: &IdentityConfig) -> Result<Arc<dyn Provider>, RuntimeError> {
    let timeout = Duration::from_millis(config.dispatcher.provider_timeout_ms);
    let bad = |e: String| RuntimeError::Config(format!("identity {:?}: {e}", identity.name));
    Ok(match identity.provider {
        ProviderKind::Sink => Arc::new(
            sink::SinkProvider::open(
                &config.sink.dir,
                Duration::from_millis(config.sink.latency_ms),
                config.sink.failures.clone(),
            )
            .await
            .map_err(|e| bad(format!("sink directory {}: {e}", config.sink.dir.display())))?,
        ),
        ProviderKind::Smtp => {
            let url = identity.url.as_deref().unwrap_or_default();
            let credentials = identity.username.clone().zip(identity.password.clone());
            Arc::new(
                smtp::SmtpProvider::new(url, credentials, identity.pool_size, identity.from.clone(), timeout)
                    .map_err(|e| bad(format!("smtp url {url:?}: {e}")))?,
            )
        }
        ProviderKind::HttpEmail => Arc::new(
            http_email::HttpEmailProvider::new(
                identity.url.as_deref().unwrap_or_default(),
                identity.password.clone(),
                identity.from.clone(),
                timeout,
                identity.batch_size,
                Duration::from_millis(identity.batch_wait_ms),
            )
            .map_err(|e| bad(e.to_string()))?,
        ),
        ProviderKind::Webpush => Arc::new(
            webpush::WebPushProvider::new(
                identity.secret.as_deref().unwrap_or_default(),
                identity.from.clone(),
                config.feedback.beacon_secret.clone(),
                timeout,
            )
            .map_err(bad)?,
        ),
        ProviderKind::Webhook => Arc::new(
            webhook::WebhookProvider::new(identity.secret.as_deref().unwrap_or_default(), timeout)
                .map_err(|e| bad(e.to_string()))?,
        ),
    })
}

pub async fn build(config: &Config) -> Result<Dispatcher, RuntimeError> {
    let mut providers = Vec::new();
    for identity in &config.identities {
        providers.push((identity.clone(), provider_for(config, identity).await?));
    }
    Ok(Dispatcher {
        config: config.clone(),
        rendered: kafka::consumer(config, ConsumerGroup::Dispatcher, &[Topic::Rendered])?,
        retries: kafka::consumer(config, ConsumerGroup::DispatcherRetries, &[Topic::Retries])?,
        producer: kafka::producer(config)?,
        ops: ledger_runtime::db::pool(&config.ops_database_url, 32).await?,
        governor_pool: ledger_runtime::db::pool(&config.ops_database_url, 2).await?,
        providers,
        instance: format!("dispatcher-{}", uuid::Uuid::new_v4()),
    })
}

/// Messages read ahead that may look at their claims at once. Looks are
/// batched, so this bounds the size of a look statement, and keeps
/// thousands of waiting messages from queueing in front of the calls the
/// governor just allowed.
const LOOKS_AHEAD: usize = 512;

/// Where a claim stands when its call begins.
#[derive(Clone, Copy)]
enum Marked {
    /// *claimed*: the attempted event goes on the log, then the claim
    /// moves to *attempted*.
    NotYet,
    /// Taken as *attempted* at once (a first claim, see `claim_first`): a
    /// crash before the attempted event is on the log leaves it ambiguous,
    /// held like any other, never resent blindly.
    Already,
}

/// Whether `recipient` may be delivered to outside production.
pub fn sandbox_allows(allow: &[String], recipient: &str) -> bool {
    let r = recipient.trim().to_lowercase();
    allow.iter().any(|a| {
        let a = a.trim().to_lowercase();
        if a.starts_with("http://") || a.starts_with("https://") {
            // Webhook and push endpoints: allowed by URL prefix.
            return r.starts_with(&a);
        }
        match a.strip_prefix('@') {
            Some(domain) => r.rsplit_once('@').is_some_and(|(_, d)| d == domain),
            None => r == a,
        }
    })
}

/// Whether an identity's provider can carry a channel.
pub fn serves_channel(provider: ProviderKind, channel: Channel) -> bool {
    match provider {
        ProviderKind::Sink => true,
        ProviderKind::Smtp | ProviderKind::HttpEmail => channel == Channel::Email,
        ProviderKind::Webhook => channel == Channel::Webhook,
        ProviderKind::Webpush => channel == Channel::Push,
    }
}

/// The wait before attempt `next` (2, 3, …): the base doubled per retry,
/// capped, plus up to a quarter more at random so that retries of many
/// messages spread out.
pub fn backoff(base_ms: u64, max_ms: u64, next: u32) -> Duration {
    let exp = base_ms.saturating_mul(1u64 << (next.saturating_sub(2)).min(20)).min(max_ms.max(base_ms));
    let jitter = if exp >= 4 { rand::random_range(0..=exp / 4) } else { 0 };
    Duration::from_millis(exp + jitter)
}

impl Dispatcher {
    pub async fn run(self, shutdown: Shutdown) -> Result<(), RuntimeError> {
        let identities = self
            .providers
            .into_iter()
            .map(|(config, provider)| Identity {
                governor: Governor::start(
                    &config,
                    Duration::from_millis(self.config.dispatcher.governor_grant_ttl_ms),
                    self.governor_pool.clone(),
                    shutdown.clone(),
                ),
                calls: metrics::histogram!("ledger_provider_call_seconds", "identity" => config.name.clone(), "provider" => provider.name()),
                config,
                provider,
            })
            .collect();
        let claims =
            Claims::start(self.ops.clone(), &self.instance, f64::from(self.config.dispatcher.claim_lease_secs));
        let inner = Arc::new(Inner {
            config: self.config,
            producer: self.producer,
            ops: self.ops,
            identities,
            looks: Semaphore::new(LOOKS_AHEAD),
            claims,
            instance: self.instance,
            deliveries: Deliveries::default(),
        });
        // The first produce to a topic waits for its metadata and leader,
        // hundreds of milliseconds on a local broker: calls the governor
        // allowed meanwhile would then reach the provider together.
        warm_up(&inner.producer, &inner.config).await;
        tracing::info!(
            instance = %inner.instance,
            identities = ?inner.identities.iter().map(|i| i.config.name.as_str()).collect::<Vec<_>>(),
            mode = ?inner.config.mode,
            "dispatcher started"
        );
        let (a, b) = tokio::join!(
            consume(inner.clone(), self.rendered, Source::Rendered, shutdown.clone()),
            consume(inner.clone(), self.retries, Source::Retries, shutdown.clone()),
        );
        tracing::info!("dispatcher stopped");
        a.and(b)
    }
}

/// Learns the leaders of the topics the dispatcher writes, before the
/// first record is read.
async fn warm_up(producer: &FutureProducer, config: &Config) {
    use rdkafka::producer::Producer;
    for topic in [Topic::Outcomes, Topic::Retries] {
        let (producer, name) = (producer.clone(), config.topic(topic));
        let known = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&name), Duration::from_secs(5)).is_ok()
        })
        .await
        .unwrap_or(false);
        if !known {
            tracing::warn!(topic = topic.base_name(), "no metadata yet; the first sends will wait for it");
        }
    }
}

/// Reads `consumer` ahead, one task per record, and stores offsets as
/// records finish.
async fn consume(
    inner: Arc<Inner>,
    consumer: kafka::LedgerConsumer,
    source: Source,
    shutdown: Shutdown,
) -> Result<(), RuntimeError> {
    let max = inner.config.dispatcher.max_in_flight;
    let permits = Arc::new(Semaphore::new(max));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, String, i32, i64)>();
    let mut offsets = Offsets::default();
    // The handle is looked up once, not for every record.
    let in_flight = metrics::gauge!("ledger_dispatcher_in_flight", "topic" => source.topic_name());
    let store = |offsets: &mut Offsets, (generation, topic, partition, offset): (u64, String, i32, i64)| {
        let moved = offsets.finish(generation, &topic, partition, offset);
        in_flight.set(offsets.in_flight() as f64);
        if let Some(done) = moved {
            // Fails only for a partition taken away meanwhile: its new
            // owner sees the record again and finds its claim.
            if let Err(e) = consumer.store_offset(&topic, partition, done) {
                tracing::debug!(topic, partition, offset = done, error = %e, "offset not stored");
            }
        }
    };
    {
        let mut stream = consumer.stream();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(done) = done_rx.recv() => store(&mut offsets, done),
                m = stream.next(), if permits.available_permits() > 0 => {
                    let m = match m {
                        Some(Ok(m)) => m.detach(),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "consume failed; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                        None => break,
                    };
                    // Never fails: permits are only taken here, and one was free.
                    let Ok(permit) = permits.clone().acquire_owned().await else { break };
                    // Read after the poll that delivered the record, which is
                    // where rebalances run: the record's own generation.
                    let generation = consumer.context().generation();
                    offsets.begin(generation, m.topic(), m.partition(), m.offset());
                    let (inner, done_tx, shutdown) = (inner.clone(), done_tx.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        let position = (generation, m.topic().to_owned(), m.partition(), m.offset());
                        if inner.handle(&m, source, &shutdown).await.is_ok() {
                            let _ = done_tx.send(position);
                        }
                        drop(permit);
                    });
                }
            }
        }
    }
    // Let what is in flight finish or give up, then commit what finished.
    let _ = permits.acquire_many(max as u32).await;
    while let Ok(done) = done_rx.try_recv() {
        store(&mut offsets, done);
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    Ok(())
}

impl Inner {
    /// Processes one record until it is done; transient trouble (broker,
    /// store) is retried here. `Err` only when shutting down.
    async fn handle(&self, m: &OwnedMessage, source: Source, shutdown: &Shutdown) -> Result<(), DispatchError> {
        let mut pause = Duration::from_millis(100);
        loop {
            match self.process(m, source, shutdown).await {
                Ok(()) => return Ok(()),
                Err(DispatchError::Shutdown) => return Err(DispatchError::Shutdown),
                Err(e) => {
                    tracing::warn!(error = %e, offset = m.offset(), "record not finished; retrying");
                    tokio::select! {
                        _ = shutdown.wait() => return Err(DispatchError::Shutdown),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn process(&self, m: &OwnedMessage, source: Source, shutdown: &Shutdown) -> Result<(), DispatchError> {
        let group = match source {
            Source::Rendered => ConsumerGroup::Dispatcher,
            Source::Retries => ConsumerGroup::DispatcherRetries,
        };
        let event = match Event::from_json(m.payload().unwrap_or_default()) {
            Ok(e) => e,
            Err(e) => {
                kafka::dead_letter(&self.producer, &self.config, group, m, None, e.code(), &e.to_string()).await?;
                return Ok(());
            }
        };
        let (EventBody::MessageRendered(message), Some(id)) = (&event.body, event.message_id) else {
            if matches!(event.body, EventBody::MessageRendered(_)) {
                let reason = "a rendered message without message_id";
                kafka::dead_letter(&self.producer, &self.config, group, m, Some(&event), "missing_message_id", reason)
                    .await?;
            }
            // Render failures share the topic and need no delivery.
            return Ok(());
        };
        let retry_of = match source {
            Source::Rendered => None,
            Source::Retries => {
                let header = |name: &str| {
                    m.headers()
                        .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                let attempt = header(HEADER_ATTEMPT).and_then(|a| a.parse::<u32>().ok());
                let due = header(HEADER_NOT_BEFORE).and_then(|a| a.parse::<DateTime<Utc>>().ok());
                let (Some(attempt), Some(due)) = (attempt, due) else {
                    let reason = "a retry record without valid ledger-attempt and ledger-not-before headers";
                    kafka::dead_letter(&self.producer, &self.config, group, m, Some(&event), "bad_retry", reason)
                        .await?;
                    return Ok(());
                };
                if let Ok(wait) = (due - Utc::now()).to_std() {
                    tokio::select! {
                        _ = shutdown.wait() => return Err(DispatchError::Shutdown),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Some(attempt)
            }
        };
        self.deliver(&event, message, id, retry_of, shutdown).await
    }

    async fn publish(&self, event: &Event) -> Result<(), DispatchError> {
        let key = event.message_id.map(|m| m.to_string()).unwrap_or_default();
        kafka::send_event(&self.producer, &self.config, Topic::Outcomes, &key, event).await?;
        Ok(())
    }

    /// Puts the rendered message on the retries topic for `attempt`, due
    /// at `due`.
    async fn schedule_retry(&self, rendered: &Event, attempt: u32, due: DateTime<Utc>) -> Result<(), DispatchError> {
        send_retry_record(&self.producer, &self.config, rendered, attempt, due).await?;
        Ok(())
    }

    fn outcome(&self, rendered: &Event, id: MessageId, what: &str, attempt: u32, body: EventBody) -> Event {
        Event {
            event_id: EventId::derive(id.0, what, attempt),
            body,
            tenant_id: rendered.tenant_id.clone(),
            intent_id: rendered.intent_id,
            message_id: Some(id),
            occurred_at: Utc::now(),
            correlation_id: rendered.correlation_id.clone(),
        }
    }

    /// The identity for a message: among those serving its tenant and
    /// channel, one chosen by its id (so its attempts tend to go the same
    /// way), or the one an earlier attempt used.
    fn route(&self, tenant: &str, channel: Channel, id: MessageId, earlier: Option<&str>) -> Option<&Identity> {
        if let Some(i) = earlier.and_then(|name| self.identities.iter().find(|i| i.config.name == name)) {
            return Some(i);
        }
        let candidates: Vec<&Identity> = self
            .identities
            .iter()
            .filter(|i| {
                i.config.serves_tenant(tenant)
                    && serves_channel(i.config.provider, channel)
                    && (i.config.channels.is_empty() || i.config.channels.contains(&channel))
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let n = (id.0.as_u128() % candidates.len() as u128) as usize;
        Some(candidates[n])
    }

    async fn look(&self, event: &Event, message: &MessageRendered, id: MessageId) -> Result<Look, DispatchError> {
        Ok(self
            .claims
            .look(LookFor {
                message_id: id.0,
                tenant_id: event.tenant_id.0.clone(),
                recipient: normalise_recipient(&message.recipient),
                intent_id: event.intent_id.0,
            })
            .await?)
    }

    async fn deliver(
        &self,
        event: &Event,
        message: &MessageRendered,
        id: MessageId,
        retry_of: Option<u32>,
        shutdown: &Shutdown,
    ) -> Result<(), DispatchError> {
        let tenant = event.tenant_id.0.as_str();
        if self.config.mode != Mode::Production && !sandbox_allows(&self.config.sandbox.allow, &message.recipient) {
            let body = EventBody::Suppressed(Suppressed {
                channel: message.channel,
                recipient: message.recipient.clone(),
                reason: SuppressionReason::Sandbox,
                attempt: None,
            });
            self.publish(&self.outcome(event, id, "suppressed", 0, body)).await?;
            self.deliveries.count(tenant, "", "suppressed_sandbox");
            return Ok(());
        }
        let lease = f64::from(self.config.dispatcher.claim_lease_secs);
        // A first attempt through an identity without rate limits: claim
        // as attempted without looking first (one statement instead of
        // three: look, claim, mark attempted). Anything
        // but a fresh message (claimed before, suppressed, cancelled) finds
        // no claim taken and is looked at below. A limited identity looks
        // first, so that what needs no call never waits for the governor.
        if retry_of.is_none() {
            if let Some(identity) = self.route(tenant, message.channel, id, None).filter(|i| !i.governor.is_limited()) {
                let Some(permission) = identity.governor.acquire(tenant, message.priority).await else {
                    return Err(DispatchError::Shutdown);
                };
                if shutdown.is_triggered() {
                    return Err(DispatchError::Shutdown);
                }
                let first = FirstFor {
                    message_id: id.0,
                    tenant_id: tenant.to_owned(),
                    recipient: normalise_recipient(&message.recipient),
                    intent_id: event.intent_id.0,
                    identity: identity.config.name.clone(),
                };
                if self.claims.claim_first(first).await?
                    && self.attempt(event, message, id, 1, identity, permission, Marked::Already).await?
                {
                    return Ok(());
                }
            }
        }
        loop {
            if shutdown.is_triggered() {
                return Err(DispatchError::Shutdown);
            }
            let look = {
                let Ok(_turn) = self.looks.acquire().await else { return Err(DispatchError::Shutdown) };
                self.look(event, message, id).await?
            };
            let attempt = look.attempt.unwrap_or(1).max(1) as u32;
            let mine = look.claimed_by.as_deref() == Some(self.instance.as_str());
            let live = look.live.unwrap_or(false);
            match look.state.as_deref() {
                Some("done" | "ambiguous") => {
                    // Already decided: make sure the log has it too.
                    if let Some(Ok(recorded)) = look.outcome.map(|o| Event::from_json(o.as_bytes())) {
                        self.publish(&recorded).await?;
                    }
                    return Ok(());
                }
                Some("retrying") if retry_of != Some(attempt) => {
                    // Another record's business; make sure the failure and
                    // its retry record are on the log (a crash may have come
                    // between recording and producing them).
                    if let Some(Ok(recorded)) = look.outcome.map(|o| Event::from_json(o.as_bytes())) {
                        self.publish(&recorded).await?;
                    }
                    if retry_of.is_none_or(|r| r < attempt) {
                        self.schedule_retry(event, attempt, look.next_attempt_at.unwrap_or_else(Utc::now)).await?;
                    }
                    return Ok(());
                }
                Some("attempted") if live => {
                    // Another dispatcher is calling the provider right now.
                    sleep(shutdown, Duration::from_millis(250)).await?;
                    continue;
                }
                Some("attempted") => {
                    self.resolve_abandoned(event, message, id, attempt, look.identity.as_deref()).await?;
                    continue;
                }
                Some("claimed") if !mine && live => {
                    sleep(shutdown, Duration::from_millis(250)).await?;
                    continue;
                }
                _ => {}
            }
            // Fresh, claimed by us or abandoned before any call, or a retry
            // that is due.
            if look.cancelled {
                let body = EventBody::MessageCancelled(MessageCancelled {
                    channel: message.channel,
                    recipient: message.recipient.clone(),
                    attempt: Some(attempt),
                });
                self.record_final(event, id, self.outcome(event, id, "cancelled", 0, body), "cancelled").await?;
                continue;
            }
            if look.suppressed.is_some() {
                let body = EventBody::Suppressed(Suppressed {
                    channel: message.channel,
                    recipient: message.recipient.clone(),
                    reason: SuppressionReason::SuppressionList,
                    attempt: Some(attempt),
                });
                self.record_final(event, id, self.outcome(event, id, "suppressed", 0, body), "suppressed_list").await?;
                continue;
            }
            let Some(identity) = self.route(tenant, message.channel, id, look.identity.as_deref()) else {
                let body = EventBody::DeliveryFailed(DeliveryFailed {
                    attempt,
                    provider: "none".into(),
                    code: "no_identity".into(),
                    reason: format!(
                        "no sender identity serves tenant {tenant:?} on the {} channel",
                        message.channel.as_str()
                    ),
                    permanent: true,
                    identity: None,
                    retry_at: None,
                });
                self.record_final(event, id, self.outcome(event, id, "failed", attempt, body), "failed").await?;
                continue;
            };
            // The permission comes with a call slot, held until the outcome
            // is recorded.
            let Some(permission) = identity.governor.acquire(tenant, message.priority).await else {
                return Err(DispatchError::Shutdown);
            };
            // Stopping: what has not reached the provider yet is handed back
            // (its offset is not stored; the next owner reads it again).
            if shutdown.is_triggered() {
                identity.governor.pass_on(permission);
                return Err(DispatchError::Shutdown);
            }
            let claimed: Option<i32> = if look.state.as_deref() == Some("retrying") {
                sqlx::query_scalar(
                    "-- dispatcher::deliver (claim a retry)
                     UPDATE delivery_claims
                     SET state = 'claimed', claimed_by = $2, lease_until = now() + make_interval(secs => $3),
                         identity = $5, updated_at = now()
                     WHERE message_id = $1 AND state = 'retrying' AND attempt = $4
                       AND NOT EXISTS (SELECT 1 FROM cancelled_intents WHERE intent_id = $6)
                     RETURNING attempt",
                )
                .bind(id.0)
                .bind(&self.instance)
                .bind(lease)
                .bind(attempt as i32)
                .bind(&identity.config.name)
                .bind(event.intent_id.0)
                .fetch_optional(&self.ops)
                .await?
            } else {
                self.claims
                    .claim(ClaimFor {
                        message_id: id.0,
                        tenant_id: tenant.to_owned(),
                        intent_id: event.intent_id.0,
                        identity: identity.config.name.clone(),
                    })
                    .await?
            };
            match claimed {
                Some(attempt) => {
                    if self.attempt(event, message, id, attempt as u32, identity, permission, Marked::NotYet).await? {
                        return Ok(());
                    }
                }
                // Lost a race, or cancelled meanwhile: look again, and let
                // someone else use the permission.
                None => {
                    identity.governor.pass_on(permission);
                    sleep(shutdown, Duration::from_millis(20)).await?
                }
            }
        }
    }

    /// One provider call under a claim we hold. Returns `false` when the
    /// caller must look at the claim again (we lost it).
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        event: &Event,
        message: &MessageRendered,
        id: MessageId,
        attempt: u32,
        identity: &Identity,
        permission: Permission,
        marked: Marked,
    ) -> Result<bool, DispatchError> {
        let provider = identity.provider.name();
        let name = identity.config.name.as_str();
        let attempted = self.outcome(
            event,
            id,
            "attempted",
            attempt,
            EventBody::DeliveryAttempted(DeliveryAttempted {
                attempt,
                channel: message.channel,
                recipient: message.recipient.clone(),
                provider: provider.to_owned(),
                identity: Some(name.to_owned()),
                rendered_at: Some(event.occurred_at),
            }),
        );
        match marked {
            Marked::NotYet => {
                self.publish(&attempted).await?;
                if !self.claims.mark_attempted(id.0).await? {
                    identity.governor.pass_on(permission);
                    return Ok(false);
                }
            }
            Marked::Already => {
                if let Err(e) = self.publish(&attempted).await {
                    // Nothing was called: the claim goes back to *claimed*,
                    // its lease over, for whoever looks at it next.
                    sqlx::query(
                        "-- dispatcher::attempt (no attempted event: claimed again)
                         UPDATE delivery_claims SET state = 'claimed', lease_until = now(), updated_at = now()
                         WHERE message_id = $1 AND claimed_by = $2 AND state = 'attempted'",
                    )
                    .bind(id.0)
                    .bind(&self.instance)
                    .execute(&self.ops)
                    .await?;
                    return Err(e);
                }
            }
        }
        // The permission may have gone stale on the way here; a fresh one
        // comes first in the queue, so this wait is short.
        let patience = Duration::from_secs(u64::from(self.config.dispatcher.claim_lease_secs)) / 2;
        let permission = identity.governor.fresh(event.tenant_id.0.as_str(), permission, patience).await;
        identity.governor.used(&permission);
        // Its slot stays taken until the outcome is recorded: a crash leaves
        // at most `concurrency` messages attempted without one (ambiguous).
        let delivery = Delivery { message_id: id, attempt, identity: name, message, idempotency_key: id.0.to_string() };
        let started = std::time::Instant::now();
        let timeout = Duration::from_millis(self.config.dispatcher.provider_timeout_ms);
        let result = match tokio::time::timeout(timeout, identity.provider.send(&delivery)).await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::ambiguous(
                "timeout",
                format!("provider call timed out after {timeout:?}; it may or may not have been delivered"),
            )),
        };
        identity.calls.record(started.elapsed().as_secs_f64());
        if let Err(ProviderError::Permanent { code, .. }) = &result {
            if code == webpush::EXPIRED_SUBSCRIPTION {
                // The push service says the subscription is gone: nothing
                // more goes to it, for this tenant.
                sqlx::query(
                    "-- dispatcher::attempt (expired subscription)
                     INSERT INTO suppressions (tenant_id, recipient, reason, source)
                     VALUES ($1, $2, 'expired_subscription', $3) ON CONFLICT (tenant_id, recipient) DO NOTHING",
                )
                .bind(&event.tenant_id.0)
                .bind(normalise_recipient(&message.recipient))
                .bind(format!("provider:{name}"))
                .execute(&self.ops)
                .await?;
            }
        }
        let last = attempt >= self.config.dispatcher.max_attempts;
        let failed = |code: String, reason: String, permanent: bool| DeliveryFailed {
            attempt,
            provider: provider.to_owned(),
            code,
            reason,
            permanent,
            identity: Some(name.to_owned()),
            retry_at: None,
        };
        let (what, body, label) = match result {
            Ok(accepted) => (
                "delivered",
                EventBody::Delivered(Delivered {
                    attempt,
                    provider: provider.to_owned(),
                    provider_message_id: accepted.provider_message_id,
                    identity: Some(name.to_owned()),
                }),
                "delivered",
            ),
            Err(ProviderError::Permanent { code, reason }) => {
                ("failed", EventBody::DeliveryFailed(failed(code, reason, true)), "failed")
            }
            Err(ProviderError::Transient { code, reason }) if !last => {
                return self.retry_later(event, id, attempt, failed(code, reason, false)).await;
            }
            // Resending is safe when the provider drops duplicates by key.
            Err(ProviderError::Ambiguous { code, reason }) if !last && identity.provider.honours_idempotency_key() => {
                return self.retry_later(event, id, attempt, failed(code, reason, false)).await;
            }
            Err(ProviderError::Transient { code, reason }) => (
                "failed",
                EventBody::DeliveryFailed(failed(code, format!("{reason} (after {attempt} attempts)"), true)),
                "failed",
            ),
            Err(ProviderError::Ambiguous { code, reason }) => (
                "ambiguous",
                EventBody::DeliveryAmbiguous(DeliveryAmbiguous {
                    attempt,
                    provider: provider.to_owned(),
                    reason: format!("{code}: {reason}"),
                    identity: Some(name.to_owned()),
                }),
                "ambiguous",
            ),
        };
        let outcome = self.outcome(event, id, what, attempt, body);
        let state = if label == "ambiguous" { "ambiguous" } else { "done" };
        // Serialised once: the same bytes go into the claim and on the log.
        let encoded = kafka::Encoded::from(&outcome);
        // serde_json writes UTF-8 only: a plain check, not a lossy rescan.
        let json = String::from_utf8(encoded.payload.clone()).unwrap_or_default();
        self.claims.record_outcome(OutcomeFor { message_id: id.0, state, outcome: json }).await?;
        kafka::send_encoded(&self.producer, &self.config, Topic::Outcomes, &id.to_string(), encoded).await?;
        if label == "ambiguous" {
            tracing::warn!(message_id = %id, identity = name, correlation_id = %event.correlation_id, "message is ambiguous; held for reconciliation");
        } else {
            tracing::debug!(message_id = %id, identity = name, attempt, outcome = label, correlation_id = %event.correlation_id, "delivery decided");
        }
        self.deliveries.count(&event.tenant_id.0, name, label);
        Ok(true)
    }

    /// A transient failure: record it with the time the next attempt is
    /// due, hand the message to the retries topic, and let this record go.
    /// The message is delayed, never skipped.
    async fn retry_later(
        &self,
        event: &Event,
        id: MessageId,
        attempt: u32,
        mut failed: DeliveryFailed,
    ) -> Result<bool, DispatchError> {
        let wait =
            backoff(self.config.dispatcher.retry_backoff_ms, self.config.dispatcher.retry_backoff_max_ms, attempt + 1);
        let due = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
        failed.retry_at = Some(due);
        let identity = failed.identity.clone().unwrap_or_default();
        let failure = self.outcome(event, id, "failed", attempt, EventBody::DeliveryFailed(failed));
        let updated = sqlx::query(
            "-- dispatcher::retry_later
             UPDATE delivery_claims
             SET state = 'retrying', attempt = attempt + 1, next_attempt_at = $3, outcome = $4, updated_at = now()
             WHERE message_id = $1 AND claimed_by = $2 AND state = 'attempted'",
        )
        .bind(id.0)
        .bind(&self.instance)
        .bind(due)
        .bind(serde_json::to_string(&failure).unwrap_or_default())
        .execute(&self.ops)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(false);
        }
        self.publish(&failure).await?;
        self.schedule_retry(event, attempt + 1, due).await?;
        metrics::counter!("ledger_delivery_retries_total", "identity" => identity).increment(1);
        Ok(true)
    }

    /// Records a decision reached without a provider call (cancelled,
    /// suppressed, unroutable) in the claim, unless a call is under way;
    /// the caller's next look publishes it.
    async fn record_final(
        &self,
        event: &Event,
        id: MessageId,
        outcome: Event,
        label: &'static str,
    ) -> Result<(), DispatchError> {
        let recorded = sqlx::query(
            "-- dispatcher::record_final
             INSERT INTO delivery_claims (message_id, tenant_id, state, attempt, claimed_by, lease_until, outcome, intent_id)
             VALUES ($1, $2, 'done', 0, $3, now(), $4, $5)
             ON CONFLICT (message_id) DO UPDATE SET state = 'done', outcome = EXCLUDED.outcome, updated_at = now()
             WHERE delivery_claims.state = 'retrying'
                OR (delivery_claims.state = 'claimed'
                    AND (delivery_claims.claimed_by = EXCLUDED.claimed_by OR delivery_claims.lease_until < now()))",
        )
        .bind(id.0)
        .bind(&event.tenant_id.0)
        .bind(&self.instance)
        .bind(serde_json::to_string(&outcome).unwrap_or_default())
        .bind(event.intent_id.0)
        .execute(&self.ops)
        .await?;
        if recorded.rows_affected() == 1 {
            self.deliveries.count(&event.tenant_id.0, "", label);
        }
        Ok(())
    }

    /// An attempt whose dispatcher vanished mid-call. Where the provider
    /// honours the idempotency key, the next attempt goes out with the same
    /// key; otherwise the message is ambiguous, held and reported.
    async fn resolve_abandoned(
        &self,
        event: &Event,
        message: &MessageRendered,
        id: MessageId,
        attempt: u32,
        identity: Option<&str>,
    ) -> Result<(), DispatchError> {
        let identity = self.route(&event.tenant_id.0, message.channel, id, identity);
        let resendable = identity.is_some_and(|i| i.provider.honours_idempotency_key())
            && attempt < self.config.dispatcher.max_attempts;
        if resendable {
            let taken = sqlx::query(
                "-- dispatcher::resolve_abandoned (resend with the same key)
                 UPDATE delivery_claims
                 SET state = 'claimed', attempt = attempt + 1, claimed_by = $2, lease_until = now(), updated_at = now()
                 WHERE message_id = $1 AND state = 'attempted' AND lease_until < now()",
            )
            .bind(id.0)
            .bind(&self.instance)
            .execute(&self.ops)
            .await?;
            if taken.rows_affected() == 1 {
                tracing::info!(message_id = %id, "abandoned attempt; resending with the same idempotency key");
            }
            return Ok(());
        }
        let name = identity.map(|i| i.config.name.clone());
        let ambiguous = self.outcome(
            event,
            id,
            "ambiguous",
            attempt,
            EventBody::DeliveryAmbiguous(DeliveryAmbiguous {
                attempt,
                provider: identity.map(|i| i.provider.name()).unwrap_or("unknown").to_owned(),
                reason: "the dispatcher that claimed the call stopped before recording the outcome; the provider may have been called".into(),
                identity: name.clone(),
            }),
        );
        let updated = sqlx::query(
            "-- dispatcher::resolve_abandoned (ambiguous)
             UPDATE delivery_claims SET state = 'ambiguous', outcome = $2, updated_at = now()
             WHERE message_id = $1 AND state = 'attempted' AND lease_until < now()",
        )
        .bind(id.0)
        .bind(serde_json::to_string(&ambiguous).unwrap_or_default())
        .execute(&self.ops)
        .await?;
        if updated.rows_affected() == 1 {
            tracing::warn!(message_id = %id, "message is ambiguous; held for reconciliation");
            self.deliveries.count(&event.tenant_id.0, name.as_deref().unwrap_or_default(), "ambiguous");
        }
        Ok(())
    }
}

/// Puts the rendered message `rendered` on the retries topic for `attempt`,
/// due at `due`. Only the claim in *retrying* at that attempt lets it call
/// the provider, so a second record of the same attempt sends nothing.
pub async fn send_retry_record(
    producer: &FutureProducer,
    config: &Config,
    rendered: &Event,
    attempt: u32,
    due: DateTime<Utc>,
) -> Result<(), rdkafka::error::KafkaError> {
    let attempt = attempt.to_string();
    let due = due.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let headers = kafka::headers_for(rendered)
        .insert(Header { key: HEADER_ATTEMPT, value: Some(attempt.as_str()) })
        .insert(Header { key: HEADER_NOT_BEFORE, value: Some(due.as_str()) });
    let key = rendered.message_id.map(|m| m.to_string()).unwrap_or_default();
    let encoded = kafka::Encoded { payload: rendered.to_json(), headers };
    kafka::send_encoded(producer, config, Topic::Retries, &key, encoded).await
}

async fn sleep(shutdown: &Shutdown, d: Duration) -> Result<(), DispatchError> {
    tokio::select! {
        _ = shutdown.wait() => Err(DispatchError::Shutdown),
        _ = tokio::time::sleep(d) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_allows_listed_addresses_and_domains_only() {
        let allow = vec!["@example.com".to_owned(), "qa@corp.io".to_owned()];
        assert!(sandbox_allows(&allow, "Ann@Example.com"));
        assert!(sandbox_allows(&allow, "qa@corp.io"));
        assert!(!sandbox_allows(&allow, "ceo@corp.io"));
        assert!(!sandbox_allows(&allow, "ann@notexample.com"));
        assert!(!sandbox_allows(&allow, "ann@sub.example.com"));
        assert!(!sandbox_allows(&[], "ann@example.com"));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_at_most_a_quarter_of_jitter() {
        for _ in 0..100 {
            let b2 = backoff(100, 1_000, 2).as_millis();
            let b3 = backoff(100, 1_000, 3).as_millis();
            let b9 = backoff(100, 1_000, 9).as_millis();
            assert!((100..=125).contains(&b2), "{b2}");
            assert!((200..=250).contains(&b3), "{b3}");
            assert!((1_000..=1_250).contains(&b9), "{b9}");
        }
    }

    #[test]
    fn providers_serve_their_channels() {
        assert!(serves_channel(ProviderKind::Sink, Channel::Push));
        assert!(serves_channel(ProviderKind::Smtp, Channel::Email));
        assert!(!serves_channel(ProviderKind::Smtp, Channel::Webhook));
        assert!(serves_channel(ProviderKind::Webhook, Channel::Webhook));
        assert!(!serves_channel(ProviderKind::Webhook, Channel::Email));
    }
}
