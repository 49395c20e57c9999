//! The template cache: every published version, compiled, built by reading
//! the templates topic from its beginning and following it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ledger_runtime::{Config, RuntimeError, Shutdown};
use ledger_schemas::{Event, EventBody, Topic};
use ledger_templating::{RenderFailure, Templates};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

type Key = (String, String, u32);

pub struct TemplateCache {
    consumer: StreamConsumer,
    templates: RwLock<HashMap<Key, Arc<Result<Templates, RenderFailure>>>>,
}

impl TemplateCache {
    /// A cache that reads every partition of the templates topic from the
    /// beginning; no consumer group, so every instance sees every version.
    pub fn follow(config: &Config) -> Result<TemplateCache, RuntimeError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka.brokers)
            .set("group.id", format!("{}template-cache", config.kafka.topic_prefix))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            .set("log_level", "4")
            .create()?;
        let name = config.topic(Topic::Templates);
        let mut tpl = TopicPartitionList::new();
        for p in 0..Topic::Templates.partitions() {
            tpl.add_partition_offset(&name, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(TemplateCache { consumer, templates: RwLock::new(HashMap::new()) })
    }

    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            let message = tokio::select! {
                _ = shutdown.wait() => return,
                m = self.consumer.recv() => m,
            };
            let Ok(message) = message else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            match Event::from_json(message.payload().unwrap_or_default()) {
                Ok(Event { body: EventBody::TemplatePublished(t), tenant_id, .. }) => {
                    let compiled = Templates::compile(&t.content);
                    if let Err(e) = &compiled {
                        tracing::warn!(template = %t.name, version = t.version, reason = %e.reason, "template does not compile");
                    }
                    if let Ok(mut map) = self.templates.write() {
                        // Versions are immutable: the first record of a version wins.
                        map.entry((tenant_id.0, t.name, t.version)).or_insert_with(|| Arc::new(compiled));
                    }
                }
                _ => tracing::warn!(offset = message.offset(), "not a template on the templates topic; skipped"),
            }
        }
    }

    /// The compiled version, waiting up to `wait` for it to arrive.
    pub async fn get(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
        wait: Duration,
    ) -> Option<Arc<Result<Templates, RenderFailure>>> {
        let key = (tenant.to_owned(), name.to_owned(), version);
        let deadline = Instant::now() + wait;
        loop {
            if let Some(t) = self.templates.read().ok().and_then(|m| m.get(&key).cloned()) {
                return Some(t);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
