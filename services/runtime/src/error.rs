//! The runtime's error type.

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("telemetry: {0}")]
    Telemetry(String),
    /// A task of the role panicked or was cancelled.
    #[error("task: {0}")]
    Task(String),
}

impl RuntimeError {
    /// Broker and database errors may pass; configuration errors do not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RuntimeError::Kafka(_) | RuntimeError::Database(_))
    }
}
