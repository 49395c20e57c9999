//! The local sink provider: records every delivery it receives in an
//! append-only JSON-lines file, synced to disk before the delivery counts as
//! accepted. For development, demos and benchmarks; tests count deliveries
//! per message id in it to prove that nothing is sent twice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use ledger_runtime::{SinkFailure, SinkFailureKind};
use ledger_schemas::{MessageId, MessageRendered};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use crate::provider::{Accepted, Delivery, Provider, ProviderError};

pub const FILE_NAME: &str = "deliveries.jsonl";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SinkRecord {
    pub message_id: MessageId,
    pub recipient: String,
    pub subject: Option<String>,
    pub provider_message_id: String,
    #[serde(serialize_with = "ledger_schemas::events::rfc3339")]
    pub received_at: DateTime<Utc>,
    #[serde(default)]
    pub identity: String,
    #[serde(default)]
    pub attempt: u32,
}

pub struct SinkProvider {
    writer: mpsc::Sender<(Vec<u8>, oneshot::Sender<std::io::Result<()>>)>,
    latency: Duration,
    failures: Vec<SinkFailure>,
}

/// Most lines written and synced together.
const GROUP: usize = 1_024;

impl SinkProvider {
    pub async fn open(dir: &Path, latency: Duration, failures: Vec<SinkFailure>) -> std::io::Result<SinkProvider> {
        tokio::fs::create_dir_all(dir).await?;
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(dir.join(FILE_NAME)).await?;
        let (writer, rx) = mpsc::channel(GROUP * 4);
        tokio::spawn(write_groups(file, rx));
        Ok(SinkProvider { writer, latency, failures })
    }

    /// The failure injected for this call, if any.
    fn injected(&self, delivery: &Delivery<'_>) -> Option<SinkFailureKind> {
        self.failures
            .iter()
            .find(|f| {
                delivery.message.recipient.contains(&f.recipient_contains)
                    && (f.attempts == 0 || delivery.attempt <= f.attempts)
            })
            .map(|f| f.kind)
    }

    async fn record(&self, delivery: &Delivery<'_>) -> std::io::Result<String> {
        // Random as a provider's would be; from the thread's generator, not
        // a system call for each message as `Uuid::new_v4` makes.
        let provider_message_id = format!("sink-{}", uuid::Builder::from_random_bytes(rand::random()).into_uuid());
        let message: &MessageRendered = delivery.message;
        let record = SinkRecord {
            message_id: delivery.message_id,
            recipient: message.recipient.clone(),
            subject: message.subject.clone(),
            provider_message_id: provider_message_id.clone(),
            received_at: Utc::now(),
            identity: delivery.identity.to_owned(),
            attempt: delivery.attempt,
        };
        let mut line = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        let gone = || std::io::Error::other("the sink writer stopped");
        self.writer.send((line, tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())??;
        Ok(provider_message_id)
    }
}

/// Group commit: whatever lines are waiting go out in one write and one
/// sync, and every caller hears back only after the sync.
async fn write_groups(
    mut file: tokio::fs::File,
    mut rx: mpsc::Receiver<(Vec<u8>, oneshot::Sender<std::io::Result<()>>)>,
) {
    let mut waiting = Vec::with_capacity(GROUP);
    let mut buffer = Vec::new();
    while rx.recv_many(&mut waiting, GROUP).await > 0 {
        buffer.clear();
        for (line, _) in &waiting {
            buffer.extend_from_slice(line);
        }
        let result = match file.write_all(&buffer).await {
            Ok(()) => file.sync_data().await,
            Err(e) => Err(e),
        };
        for (_, reply) in waiting.drain(..) {
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

impl Provider for SinkProvider {
    fn name(&self) -> &'static str {
        "sink"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery<'a>) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(async move {
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            match self.injected(delivery) {
                Some(SinkFailureKind::Transient) => {
                    return Err(ProviderError::transient("sink_451", "injected: mailbox temporarily unavailable"))
                }
                Some(SinkFailureKind::Permanent) => {
                    return Err(ProviderError::permanent("sink_550", "injected: no such mailbox"))
                }
                Some(SinkFailureKind::Timeout) => std::future::pending::<()>().await,
                None => {}
            }
            match self.record(delivery).await {
                Ok(id) => Ok(Accepted { provider_message_id: Some(id) }),
                // A failed write or sync may have left the line on disk.
                Err(e) => Err(ProviderError::ambiguous("sink_io", e.to_string())),
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
