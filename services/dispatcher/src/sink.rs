//! The local sink provider: records every delivery it receives in an
//! append-only JSON-lines file, synced to disk before the delivery counts as
//! accepted. For development, demos and benchmarks; tests count deliveries
//! per message id in it to prove that nothing is sent twice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use ledger_schemas::{MessageId, MessageRendered};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::provider::{Accepted, Provider, ProviderError};

pub const FILE_NAME: &str = "deliveries.jsonl";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SinkRecord {
    pub message_id: MessageId,
    pub recipient: String,
    pub subject: Option<String>,
    pub provider_message_id: String,
    pub received_at: DateTime<Utc>,
}

pub struct SinkProvider {
    file: Mutex<tokio::fs::File>,
    latency: Duration,
}

impl SinkProvider {
    pub async fn open(dir: &Path, latency: Duration) -> std::io::Result<SinkProvider> {
        tokio::fs::create_dir_all(dir).await?;
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(dir.join(FILE_NAME)).await?;
        Ok(SinkProvider { file: Mutex::new(file), latency })
    }

    async fn record(&self, message_id: MessageId, message: &MessageRendered) -> std::io::Result<String> {
        let provider_message_id = format!("sink-{}", uuid::Uuid::new_v4());
        let record = SinkRecord {
            message_id,
            recipient: message.recipient.clone(),
            subject: message.subject.clone(),
            provider_message_id: provider_message_id.clone(),
            received_at: Utc::now(),
        };
        let mut line = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().await;
        file.write_all(&line).await?;
        file.sync_data().await?;
        Ok(provider_message_id)
    }
}

impl Provider for SinkProvider {
    fn name(&self) -> &'static str {
        "sink"
    }

    fn send<'a>(
        &'a self,
        message_id: MessageId,
        message: &'a MessageRendered,
    ) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(async move {
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            match self.record(message_id, message).await {
                Ok(id) => Ok(Accepted { provider_message_id: Some(id) }),
                Err(e) => Err(ProviderError::Transient { code: "sink_io".into(), reason: e.to_string() }),
            }
        })
    }
}

/// Every delivery the sink in `dir` has received, in order.
pub fn read_deliveries(dir: &Path) -> std::io::Result<Vec<SinkRecord>> {
    let path: PathBuf = dir.join(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
        .collect()
}
