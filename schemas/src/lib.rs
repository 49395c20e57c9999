//! The delivery ledger's event contracts: every event type and its version,
//! the ids the events talk about, and the topics they travel on.
//!
//! This crate performs no I/O and depends on no runtime (no tokio, rdkafka or
//! sqlx): producers, consumers and projections all agree through it.

pub mod events;
pub mod ids;
pub mod topics;

pub use events::{
    Channel, Content, DeadLettered, DecodeError, Delivered, DeliveryAmbiguous, DeliveryAttempted, DeliveryFailed,
    Event, EventBody, EventKind, Feedback, FeedbackKind, IntentAccepted, IntentCancelled, IntentKind, MessageCancelled,
    MessageRendered, Priority, Recipient, RecipientBatch, RenderFailed, Suppressed, SuppressionReason,
    TemplatePublished, TemplateRef,
};
pub use ids::{beacon_token, normalise_recipient, EventId, IntentId, MessageId, TenantId};
pub use topics::{ConsumerGroup, Topic};

/// Kafka header carrying the event type (`intent.accepted.v1`, ...), so a
/// consumer can route or skip a record without decoding its body.
pub const HEADER_EVENT_TYPE: &str = "ledger-event-type";
/// Kafka header carrying the correlation id of the request that caused it.
pub const HEADER_CORRELATION_ID: &str = "ledger-correlation-id";
/// On a retries record: the attempt it is for.
pub const HEADER_ATTEMPT: &str = "ledger-attempt";
/// On a retries record: when the attempt is due (RFC 3339).
pub const HEADER_NOT_BEFORE: &str = "ledger-not-before";
