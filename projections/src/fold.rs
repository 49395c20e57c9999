//! Pure folds: events in, row patches out. No I/O.
//!
//! A patch merges with another patch (or a stored row) with the same rules
//! the SQL upsert uses: the status only moves forward by rank, stage times
//! keep the earliest value, counters keep the maximum. Merging is idempotent
//! and order-independent, so a redelivered or late event cannot move a
//! message backwards (invariant 6).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ledger_schemas::{Event, EventBody, IntentId, MessageId};

/// Where a message is. Ranks order the stages; terminal states share the
/// top rank and the first one recorded stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Accepted,
    Rendered,
    Sending,
    Ambiguous,
    Delivered,
    Failed,
    RenderFailed,
    Suppressed,
    Cancelled,
    DeadLettered,
}

impl Status {
    pub const ALL: [Status; 10] = [
        Status::Accepted,
        Status::Rendered,
        Status::Sending,
        Status::Ambiguous,
        Status::Delivered,
        Status::Failed,
        Status::RenderFailed,
        Status::Suppressed,
        Status::Cancelled,
        Status::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Rendered => "rendered",
            Status::Sending => "sending",
            Status::Ambiguous => "ambiguous",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::RenderFailed => "render_failed",
            Status::Suppressed => "suppressed",
            Status::Cancelled => "cancelled",
            Status::DeadLettered => "dead_lettered",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn rank(self) -> i16 {
        match self {
            Status::Accepted => 0,
            Status::Rendered => 10,
            Status::Sending => 20,
            Status::Ambiguous => 30,
            _ => 50,
        }
    }

    pub fn is_terminal(self) -> bool {
        self.rank() == 50
    }
}

/// Whether status `new`, reached in attempt `new_attempt`, replaces
/// `current` of `current_attempt`: a later delivery attempt always does (a
/// redriven message starts over from its terminal state), then the higher
/// rank. Ties between distinct terminal states (which the pipeline never
/// produces for one attempt) break by name so that the result does not
/// depend on arrival order.
pub fn supersedes(new: Status, new_attempt: i32, current: Status, current_attempt: i32) -> bool {
    (new_attempt, new.rank(), new.as_str()) > (current_attempt, current.rank(), current.as_str())
}

/// Each message's status as the folds decide it, without the rest of its
/// row: what the tooling checks a read model against.
#[derive(Debug, Default)]
pub struct StatusTally(pub HashMap<MessageId, (Status, i32)>);

impl StatusTally {
    pub fn add(&mut self, p: &MessagePatch) {
        self.0
            .entry(p.message_id)
            .and_modify(|(s, a)| {
                if supersedes(p.status, p.status_attempt, *s, *a) {
                    (*s, *a) = (p.status, p.status_attempt);
                }
            })
            .or_insert((p.status, p.status_attempt));
    }

    /// Messages by status name.
    pub fn counts(&self) -> std::collections::BTreeMap<String, i64> {
        let mut out = std::collections::BTreeMap::new();
        for (s, _) in self.0.values() {
            *out.entry(s.as_str().to_owned()).or_insert(0) += 1;
        }
        out
    }
}

/// The status attempt of what the recipient's side reports: above every
/// attempt, as the report is about the message whichever attempt sent it.
pub const FEEDBACK_ATTEMPT: i32 = i32::MAX;

/// What a batch of events says about one message.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagePatch {
    pub message_id: MessageId,
    pub tenant_id: String,
    pub intent_id: IntentId,
    pub channel: Option<String>,
    pub recipient: Option<String>,
    pub status: Status,
    /// The delivery attempt the status belongs to (0: before any attempt).
    pub status_attempt: i32,
    pub attempts: i32,
    /// Attempt that the error fields belong to.
    pub error_attempt: i32,
    pub last_error_code: Option<String>,
    pub last_error: Option<String>,
    pub provider_message_id: Option<String>,
    /// The sender identity of the latest attempt that named one, and that
    /// attempt (0: none yet).
    pub identity: Option<String>,
    pub identity_attempt: i32,
    pub accepted_at: Option<DateTime<Utc>>,
    pub rendered_at: Option<DateTime<Utc>>,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub suppressed_at: Option<DateTime<Utc>>,
    /// The template and version the message was rendered from (pinned at
    /// acceptance); none for inline content.
    pub template: Option<String>,
    pub template_version: Option<i32>,
    /// Provider feedback: the first report of each kind.
    pub opened_at: Option<DateTime<Utc>>,
    pub clicked_at: Option<DateTime<Utc>>,
    pub bounced_at: Option<DateTime<Utc>>,
    pub complained_at: Option<DateTime<Utc>>,
    pub unsubscribed_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn smallest(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

impl MessagePatch {
    fn new(event: &Event, message_id: MessageId, status: Status) -> Self {
        MessagePatch {
            message_id,
            tenant_id: event.tenant_id.0.clone(),
            intent_id: event.intent_id,
            channel: None,
            recipient: None,
            status,
            status_attempt: 0,
            attempts: 0,
            error_attempt: 0,
            last_error_code: None,
            last_error: None,
            provider_message_id: None,
            identity: None,
            identity_attempt: 0,
            accepted_at: None,
            rendered_at: None,
            first_attempt_at: None,
            delivered_at: None,
            failed_at: None,
            suppressed_at: None,
            template: None,
            template_version: None,
            opened_at: None,
            clicked_at: None,
            bounced_at: None,
            complained_at: None,
            unsubscribed_at: None,
            updated_at: event.occurred_at,
        }
    }

    fn with_error(mut self, attempt: u32, code: &str, reason: &str) -> Self {
        self.error_attempt = attempt as i32;
        self.last_error_code = Some(code.to_owned());
        self.last_error = Some(reason.to_owned());
        self
    }

    /// Merges `other` into `self`; the result is the same in either order.
    pub fn merge(&mut self, other: MessagePatch) {
        if supersedes(other.status, other.status_attempt, self.status, self.status_attempt) {
            self.status = other.status;
            self.status_attempt = other.status_attempt;
        }
        self.channel = smallest(self.channel.take(), other.channel);
        self.recipient = smallest(self.recipient.take(), other.recipient);
        self.attempts = self.attempts.max(other.attempts);
        let other_error_wins = (other.error_attempt, &other.last_error_code, &other.last_error)
            > (self.error_attempt, &self.last_error_code, &self.last_error);
        if other_error_wins {
            self.error_attempt = other.error_attempt;
            self.last_error_code = other.last_error_code;
            self.last_error = other.last_error;
        }
        self.provider_message_id = smallest(self.provider_message_id.take(), other.provider_message_id);
        if (other.identity_attempt, other.identity.as_deref().unwrap_or(""))
            > (self.identity_attempt, self.identity.as_deref().unwrap_or(""))
        {
            self.identity_attempt = other.identity_attempt;
            self.identity = other.identity;
        }
        self.accepted_at = earliest(self.accepted_at, other.accepted_at);
        self.rendered_at = earliest(self.rendered_at, other.rendered_at);
        self.first_attempt_at = earliest(self.first_attempt_at, other.first_attempt_at);
        self.delivered_at = earliest(self.delivered_at, other.delivered_at);
        self.failed_at = earliest(self.failed_at, other.failed_at);
        self.suppressed_at = earliest(self.suppressed_at, other.suppressed_at);
        if (other.template_version, &other.template) > (self.template_version, &self.template) {
            self.template_version = other.template_version;
            self.template = other.template;
        }
        self.opened_at = earliest(self.opened_at, other.opened_at);
        self.clicked_at = earliest(self.clicked_at, other.clicked_at);
        self.bounced_at = earliest(self.bounced_at, other.bounced_at);
        self.complained_at = earliest(self.complained_at, other.complained_at);
        self.unsubscribed_at = earliest(self.unsubscribed_at, other.unsubscribed_at);
        self.updated_at = self.updated_at.max(other.updated_at);
    }
}

/// What a batch of events says about one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptPatch {
    pub message_id: MessageId,
    pub attempt: i32,
    pub tenant_id: String,
    pub intent_id: IntentId,
    pub provider: Option<String>,
    pub identity: Option<String>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub outcome: Option<&'static str>,
    /// In flight 0, retrying 1, ambiguous 2, delivered or failed 3.
    pub outcome_rank: i16,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl AttemptPatch {
    fn new(event: &Event, message_id: MessageId, attempt: u32) -> Self {
        AttemptPatch {
            message_id,
            attempt: attempt as i32,
            tenant_id: event.tenant_id.0.clone(),
            intent_id: event.intent_id,
            provider: None,
            identity: None,
            attempted_at: None,
            outcome: None,
            outcome_rank: 0,
            error_code: None,
            error: None,
            finished_at: None,
        }
    }

    /// Same rules as the SQL upsert: the highest-ranked outcome (with its
    /// error) wins, times keep the earliest value.
    pub fn merge(&mut self, other: AttemptPatch) {
        if (other.outcome_rank, other.outcome) > (self.outcome_rank, self.outcome) {
            self.outcome_rank = other.outcome_rank;
            self.outcome = other.outcome;
            self.error_code = other.error_code;
            self.error = other.error;
        }
        self.provider = smallest(self.provider.take(), other.provider);
        self.identity = smallest(self.identity.take(), other.identity);
        self.attempted_at = earliest(self.attempted_at, other.attempted_at);
        self.finished_at = earliest(self.finished_at, other.finished_at);
    }
}

fn attempt_patch(event: &Event) -> Option<AttemptPatch> {
    let id = event.message_id?;
    let at = Some(event.occurred_at);
    let p = match &event.body {
        EventBody::DeliveryAttempted(a) => {
            let mut p = AttemptPatch::new(event, id, a.attempt);
            p.provider = Some(a.provider.clone());
            p.identity = a.identity.clone();
            p.attempted_at = at;
            p
        }
        EventBody::Delivered(d) => {
            let mut p = AttemptPatch::new(event, id, d.attempt);
            p.provider = Some(d.provider.clone());
            p.identity = d.identity.clone();
            (p.outcome, p.outcome_rank, p.finished_at) = (Some("delivered"), 3, at);
            p
        }
        EventBody::DeliveryFailed(f) => {
            let mut p = AttemptPatch::new(event, id, f.attempt);
            p.provider = Some(f.provider.clone());
            p.identity = f.identity.clone();
            let (outcome, rank) = if f.permanent { ("failed", 3) } else { ("retrying", 1) };
            (p.outcome, p.outcome_rank, p.finished_at) = (Some(outcome), rank, at);
            (p.error_code, p.error) = (Some(f.code.clone()), Some(f.reason.clone()));
            p
        }
        EventBody::DeliveryAmbiguous(a) => {
            let mut p = AttemptPatch::new(event, id, a.attempt);
            p.provider = Some(a.provider.clone());
            p.identity = a.identity.clone();
            (p.outcome, p.outcome_rank) = (Some("ambiguous"), 2);
            (p.error_code, p.error) = (Some("ambiguous".into()), Some(a.reason.clone()));
            p
        }
        _ => return None,
    };
    Some(p)
}

/// One row of `intents`.
#[derive(Debug, Clone, PartialEq)]
pub struct IntentRow {
    pub intent_id: IntentId,
    pub name: Option<String>,
    pub tenant_id: String,
    pub kind: String,
    pub channel: String,
    pub priority: String,
    pub recipient_count: i32,
    pub batch_count: i32,
    pub accepted_at: DateTime<Utc>,
}

/// One row of `dead_letters`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRow {
    pub event_id: uuid::Uuid,
    pub tenant_id: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub consumer: String,
    pub code: String,
    pub reason: String,
    pub occurred_at: DateTime<Utc>,
}

/// The folded effect of a batch of events.
#[derive(Debug, Default)]
pub struct Fold {
    pub messages: HashMap<MessageId, MessagePatch>,
    pub intents: HashMap<IntentId, IntentRow>,
    pub dead_letters: Vec<DeadLetterRow>,
    /// Intents cancelled, with the time of the cancellation.
    pub cancelled: HashMap<IntentId, DateTime<Utc>>,
    pub attempts: HashMap<(MessageId, i32), AttemptPatch>,
}

impl Fold {
    pub fn add(&mut self, event: &Event) {
        if let Some(a) = attempt_patch(event) {
            match self.attempts.get_mut(&(a.message_id, a.attempt)) {
                Some(existing) => existing.merge(a),
                None => {
                    self.attempts.insert((a.message_id, a.attempt), a);
                }
            }
        }
        for patch in patches(event) {
            match self.messages.get_mut(&patch.message_id) {
                Some(existing) => existing.merge(patch),
                None => {
                    self.messages.insert(patch.message_id, patch);
                }
            }
        }
        match &event.body {
            EventBody::IntentAccepted(a) => {
                self.intents.entry(event.intent_id).or_insert_with(|| IntentRow {
                    intent_id: event.intent_id,
                    name: a.name.clone(),
                    tenant_id: event.tenant_id.0.clone(),
                    kind: format!("{:?}", a.kind).to_lowercase(),
                    channel: a.channel.as_str().to_owned(),
                    priority: format!("{:?}", a.priority).to_lowercase(),
                    recipient_count: a.recipient_count as i32,
                    batch_count: a.batch_count as i32,
                    accepted_at: event.occurred_at,
                });
            }
            EventBody::IntentCancelled(_) => {
                let at = self.cancelled.entry(event.intent_id).or_insert(event.occurred_at);
                *at = (*at).min(event.occurred_at);
            }
            EventBody::DeadLettered(d) => self.dead_letters.push(DeadLetterRow {
                event_id: event.event_id.0,
                tenant_id: event.tenant_id.0.clone(),
                source_topic: d.source_topic.clone(),
                source_partition: d.source_partition,
                source_offset: d.source_offset,
                consumer: d.consumer.clone(),
                code: d.code.clone(),
                reason: d.reason.clone(),
                occurred_at: event.occurred_at,
            }),
            _ => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.intents.is_empty()
            && self.dead_letters.is_empty()
            && self.cancelled.is_empty()
            && self.attempts.is_empty()
    }
}

/// The message patches one event implies.
pub fn patches(event: &Event) -> Vec<MessagePatch> {
    let at = Some(event.occurred_at);
    if let EventBody::RecipientBatch(batch) = &event.body {
        return batch
            .recipients
            .iter()
            .map(|r| {
                let id = MessageId::derive(event.intent_id, &r.address);
                let mut p = MessagePatch::new(event, id, Status::Accepted);
                p.channel = Some(batch.channel.as_str().to_owned());
                p.recipient = Some(ledger_schemas::ids::normalise_recipient(&r.address));
                p.accepted_at = at;
                if let Some(t) = &batch.template {
                    p.template = Some(t.name.clone());
                    p.template_version = Some(t.version as i32);
                }
                p
            })
            .collect();
    }
    let Some(id) = event.message_id else { return Vec::new() };
    let patch = |status| MessagePatch::new(event, id, status);
    let p = match &event.body {
        EventBody::MessageRendered(m) => {
            let mut p = patch(Status::Rendered);
            p.channel = Some(m.channel.as_str().to_owned());
            p.recipient = Some(m.recipient.clone());
            p.rendered_at = at;
            p
        }
        EventBody::RenderFailed(f) => {
            let mut p = patch(Status::RenderFailed).with_error(0, &f.code, &f.reason);
            p.channel = Some(f.channel.as_str().to_owned());
            p.recipient = Some(f.recipient.clone());
            p.failed_at = at;
            p
        }
        EventBody::DeliveryAttempted(a) => {
            let mut p = patch(Status::Sending);
            p.channel = Some(a.channel.as_str().to_owned());
            p.recipient = Some(a.recipient.clone());
            p.attempts = a.attempt as i32;
            p.status_attempt = a.attempt as i32;
            p.first_attempt_at = at;
            p.rendered_at = a.rendered_at;
            p.identity_attempt = if a.identity.is_some() { a.attempt as i32 } else { 0 };
            p.identity = a.identity.clone();
            p
        }
        EventBody::Delivered(d) => {
            let mut p = patch(Status::Delivered);
            p.attempts = d.attempt as i32;
            p.status_attempt = d.attempt as i32;
            p.provider_message_id = d.provider_message_id.clone();
            p.delivered_at = at;
            p.identity_attempt = if d.identity.is_some() { d.attempt as i32 } else { 0 };
            p.identity = d.identity.clone();
            p
        }
        EventBody::DeliveryFailed(f) => {
            let status = if f.permanent { Status::Failed } else { Status::Sending };
            let mut p = patch(status).with_error(f.attempt, &f.code, &f.reason);
            p.attempts = f.attempt as i32;
            p.status_attempt = f.attempt as i32;
            if f.permanent {
                p.failed_at = at;
            }
            p.identity_attempt = if f.identity.is_some() { f.attempt as i32 } else { 0 };
            p.identity = f.identity.clone();
            p
        }
        EventBody::DeliveryAmbiguous(a) => {
            let mut p = patch(Status::Ambiguous).with_error(a.attempt, "ambiguous", &a.reason);
            p.attempts = a.attempt as i32;
            p.status_attempt = a.attempt as i32;
            p.identity_attempt = if a.identity.is_some() { a.attempt as i32 } else { 0 };
            p.identity = a.identity.clone();
            p
        }
        EventBody::Suppressed(s) => {
            let mut p = patch(Status::Suppressed);
            let code = match s.reason {
                ledger_schemas::SuppressionReason::Sandbox => "sandbox",
                ledger_schemas::SuppressionReason::SuppressionList => "suppression_list",
            };
            p = p.with_error(0, code, "recipient suppressed");
            p.channel = Some(s.channel.as_str().to_owned());
            p.recipient = Some(s.recipient.clone());
            p.suppressed_at = at;
            p.status_attempt = s.attempt.unwrap_or(0) as i32;
            p
        }
        EventBody::MessageCancelled(c) => {
            let mut p = patch(Status::Cancelled).with_error(0, "cancelled", "the intent was cancelled before delivery");
            p.channel = Some(c.channel.as_str().to_owned());
            p.recipient = Some(c.recipient.clone());
            p.failed_at = at;
            p.status_attempt = c.attempt.unwrap_or(0) as i32;
            p
        }
        EventBody::DeadLettered(d) => {
            let mut p = patch(Status::DeadLettered).with_error(0, &d.code, &d.reason);
            p.failed_at = at;
            p
        }
        EventBody::Feedback(f) => {
            use ledger_schemas::FeedbackKind as K;
            // Whatever the recipient's side reports shows the message
            // arrived (an ambiguous one included), except a bounce, which
            // leaves the status alone and is kept as its own stage.
            let status = if f.kind == K::Bounced { Status::Accepted } else { Status::Delivered };
            let mut p = patch(status);
            if f.kind != K::Bounced {
                p.status_attempt = FEEDBACK_ATTEMPT;
            }
            let reported = Some(f.reported_at);
            match f.kind {
                K::Delivered => p.delivered_at = reported,
                K::Bounced => p.bounced_at = reported,
                K::Complained => p.complained_at = reported,
                K::Opened => p.opened_at = reported,
                K::Clicked => p.clicked_at = reported,
                K::Unsubscribed => p.unsubscribed_at = reported,
            }
            p
        }
        EventBody::IntentAccepted(_)
        | EventBody::RecipientBatch(_)
        | EventBody::IntentCancelled(_)
        | EventBody::TemplatePublished(_) => return Vec::new(),
    };
    vec![p]
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use ledger_schemas::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn ev(n: i64, body: EventBody) -> Event {
        Event {
            event_id: EventId(Uuid::from_u128(n as u128)),
            body,
            tenant_id: TenantId::parse("acme").unwrap(),
            intent_id: IntentId(Uuid::from_u128(9)),
            message_id: Some(MessageId::derive(IntentId(Uuid::from_u128(9)), "a@x.io")),
            occurred_at: Utc.timestamp_opt(1_800_000_000 + n, 0).unwrap(),
            correlation_id: "c".into(),
        }
    }

    fn lifecycle() -> Vec<Event> {
        vec![
            ev(
                0,
                EventBody::RecipientBatch(RecipientBatch {
                    template: None,
                    batch_index: 0,
                    batch_count: 1,
                    channel: Channel::Email,
                    priority: Priority::Transactional,
                    from: None,
                    content: Content::default(),
                    recipients: vec![Recipient { address: "a@x.io".into(), variables: Default::default() }],
                    send_at: None,
                }),
            ),
            ev(
                1,
                EventBody::MessageRendered(MessageRendered {
                    channel: Channel::Email,
                    priority: Priority::Transactional,
                    recipient: "a@x.io".into(),
                    from: None,
                    subject: None,
                    text: None,
                    html: None,
                    json: None,
                }),
            ),
            ev(
                2,
                EventBody::DeliveryAttempted(DeliveryAttempted {
                    attempt: 1,
                    channel: Channel::Email,
                    recipient: "a@x.io".into(),
                    provider: "sink".into(),
                    identity: Some("mail-a".into()),
                    rendered_at: Some(Utc.timestamp_opt(1_800_000_001, 0).unwrap()),
                }),
            ),
            ev(
                3,
                EventBody::DeliveryFailed(DeliveryFailed {
                    attempt: 1,
                    provider: "sink".into(),
                    code: "timeout".into(),
                    reason: "timed out".into(),
                    permanent: false,
                    identity: Some("mail-a".into()),
                    retry_at: None,
                }),
            ),
            ev(
                4,
                EventBody::DeliveryAttempted(DeliveryAttempted {
                    attempt: 2,
                    channel: Channel::Email,
                    recipient: "a@x.io".into(),
                    provider: "sink".into(),
                    identity: Some("mail-a".into()),
                    rendered_at: Some(Utc.timestamp_opt(1_800_000_001, 0).unwrap()),
                }),
            ),
            ev(
                5,
                EventBody::Delivered(Delivered {
                    attempt: 2,
                    provider: "sink".into(),
                    provider_message_id: Some("p".into()),
                    identity: Some("mail-a".into()),
                }),
            ),
        ]
    }

    fn fold(events: &[Event]) -> MessagePatch {
        let mut f = Fold::default();
        for e in events {
            f.add(e);
        }
        assert_eq!(f.messages.len(), 1);
        f.messages.into_values().next().unwrap()
    }

    #[test]
    fn a_full_lifecycle_ends_delivered_with_every_stage_time() {
        let row = fold(&lifecycle());
        assert_eq!(row.status, Status::Delivered);
        assert_eq!(row.attempts, 2);
        assert_eq!(row.last_error_code.as_deref(), Some("timeout"));
        assert_eq!(row.recipient.as_deref(), Some("a@x.io"));
        assert!(row.accepted_at.is_some() && row.rendered_at.is_some() && row.delivered_at.is_some());
        assert_eq!(row.first_attempt_at, Some(Utc.timestamp_opt(1_800_000_002, 0).unwrap()));
    }

    #[test]
    fn a_late_event_never_moves_the_status_backwards() {
        let mut events = lifecycle();
        let rendered = events.remove(1);
        events.push(rendered);
        assert_eq!(fold(&events).status, Status::Delivered);
    }

    #[test]
    fn the_attempt_carries_the_rendered_time_so_a_late_rendered_event_adds_nothing() {
        let events = lifecycle();
        let without_rendered: Vec<Event> =
            events.iter().filter(|e| !matches!(e.body, EventBody::MessageRendered(_))).cloned().collect();
        let row = fold(&without_rendered);
        assert_eq!(row.rendered_at, Some(events[1].occurred_at));
        assert_eq!(row, fold(&events));
    }

    /// A permanent failure at attempt 1, redriven: attempt 2 delivers.
    fn redriven() -> Vec<Event> {
        let mut events = lifecycle();
        events.truncate(3);
        events.push(ev(
            3,
            EventBody::DeliveryFailed(DeliveryFailed {
                attempt: 1,
                provider: "sink".into(),
                code: "rejected".into(),
                reason: "mailbox full".into(),
                permanent: true,
                identity: Some("mail-a".into()),
                retry_at: None,
            }),
        ));
        let mut rest = lifecycle().split_off(4);
        events.append(&mut rest);
        events
    }

    #[test]
    fn a_redriven_message_starts_over_from_its_failure() {
        let events = redriven();
        assert_eq!(fold(&events[..4]).status, Status::Failed);
        assert_eq!(fold(&events[..5]).status, Status::Sending, "the redrive's attempt reopens it");
        let row = fold(&events);
        assert_eq!((row.status, row.status_attempt, row.attempts), (Status::Delivered, 2, 2));
        assert!(row.failed_at.is_some(), "the first attempt's failure stays on record");
    }

    #[test]
    fn provider_feedback_settles_an_ambiguous_message_but_a_bounce_changes_no_status() {
        let mut events = lifecycle();
        events.truncate(3);
        events.push(ev(
            3,
            EventBody::DeliveryAmbiguous(DeliveryAmbiguous {
                attempt: 1,
                provider: "sink".into(),
                reason: "timeout".into(),
                identity: None,
            }),
        ));
        let report = |n, kind| {
            ev(
                n,
                EventBody::Feedback(Feedback {
                    kind,
                    source: "mailgun".into(),
                    provider_event_id: format!("e{n}"),
                    recipient: "a@x.io".into(),
                    permanent: true,
                    reported_at: Utc.timestamp_opt(1_800_000_100 + n, 0).unwrap(),
                    reason: None,
                    url: None,
                }),
            )
        };
        let mut bounced = events.clone();
        bounced.push(report(4, FeedbackKind::Bounced));
        assert_eq!(fold(&bounced).status, Status::Ambiguous);
        events.push(report(5, FeedbackKind::Opened));
        assert_eq!(fold(&events).status, Status::Delivered);
    }

    proptest! {
        #[test]
        fn a_redrive_gives_the_same_row_in_any_order(
            order in Just((0..6usize).collect::<Vec<_>>()).prop_shuffle(),
        ) {
            let events = redriven();
            let expected = fold(&events);
            let shuffled: Vec<Event> = order.iter().map(|&i| events[i].clone()).collect();
            prop_assert_eq!(fold(&shuffled), expected);
        }

        #[test]
        fn any_order_and_any_duplicates_give_the_same_row(
            order in Just((0..6usize).collect::<Vec<_>>()).prop_shuffle(),
            dups in proptest::collection::vec(0..6usize, 0..6),
        ) {
            let events = lifecycle();
            let expected = fold(&events);
            let mut shuffled: Vec<Event> = order.iter().map(|&i| events[i].clone()).collect();
            shuffled.extend(dups.iter().map(|&i| events[i].clone()));
            prop_assert_eq!(fold(&shuffled), expected);
        }
    }
}
