//! Provider feedback intake: `POST /v1/feedback/{source}` takes what
//! providers report after a call — delivered, bounced, complained, opened,
//! clicked, unsubscribed — in their own formats (`mailgun`, `sendgrid`,
//! `ses` through SNS) and push clients' *displayed* / *clicked* beacons
//! (`push`), and records each as a `delivery.feedback.v1` event on the
//! outcomes topic, keyed by the message like its other outcomes.
//!
//! Guarantees: a report is verified before anything is done with it (the
//! provider's signature, or credentials where the provider does not sign);
//! a 200 means its events are acknowledged by the broker; the same report
//! again (providers retry until they get a 2xx) is recognised by the
//! provider's event id and adds nothing, and even if it got through twice,
//! its event id is derived from the provider's, so the read model would
//! fold it once. Hard bounces, complaints and unsubscribes put the
//! recipient on the tenant's suppression list; any report but a bounce
//! settles a message held as ambiguous (it arrived). Reports about messages this
//! ledger does not know are counted and dropped, not retried forever.

use crate::request::Segment;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use ledger_runtime::{kafka, FeedbackConfig};
use ledger_schemas::{
    beacon_token, Event, EventBody, EventId, Feedback, FeedbackKind, IntentId, MessageId, TenantId, Topic,
};
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

use crate::problem::{ApiError, FieldError};
use crate::request::{correlation_id, read_body};
use crate::suppressions::{self, Reason};
use crate::AppState;

/// The formats taken, as they appear in the path.
pub const SOURCES: [&str; 4] = ["mailgun", "sendgrid", "ses", "push"];

/// Signed reports older (or newer) than this are refused as replays.
const DEFAULT_MAX_AGE_SECS: u64 = 15 * 60;

/// One report about one message, as parsed from a provider's format.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub kind: FeedbackKind,
    /// Our message id, when the report names it.
    pub message_id: Option<Uuid>,
    pub provider_event_id: String,
    pub recipient: String,
    pub permanent: bool,
    pub reported_at: DateTime<Utc>,
    pub reason: Option<String>,
    pub url: Option<String>,
}

/// What a body held: the reports to record, and how many events of kinds
/// that are not feedback (queued, deferred, soft failures the provider
/// retries itself, …) were left aside.
#[derive(Debug, Default)]
pub struct Parsed {
    pub reports: Vec<Report>,
    pub ignored: usize,
}

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::InvalidBody(vec![FieldError { field: String::new(), detail: detail.into() }])
}

fn text(v: &Value, path: &[&str]) -> Option<String> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Our message id from an id we gave the provider: a bare UUID, or a
/// Message-ID header `<uuid@delivery-ledger>`.
pub fn message_id_in(s: &str) -> Option<Uuid> {
    let s = s.trim().trim_start_matches('<').trim_end_matches('>');
    let local = s.split('@').next().unwrap_or(s);
    Uuid::parse_str(local).ok()
}

fn at_secs(secs: f64) -> Option<DateTime<Utc>> {
    if !secs.is_finite() {
        return None;
    }
    Utc.timestamp_millis_opt((secs * 1000.0) as i64).single()
}

fn fresh(config: &FeedbackConfig, at: DateTime<Utc>) -> Result<(), ApiError> {
    let max = config.max_age_secs.unwrap_or(DEFAULT_MAX_AGE_SECS) as i64;
    if (Utc::now() - at).num_seconds().abs() > max {
        return Err(ApiError::Unauthorized);
    }
    Ok(())
}

fn verify_hmac_hex(key: &str, data: &[u8], signature_hex: &str) -> Result<(), ApiError> {
    let signature = hex::decode(signature_hex.trim()).map_err(|_| ApiError::Unauthorized)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).map_err(|_| ApiError::Unauthorized)?;
    mac.update(data);
    mac.verify_slice(&signature).map_err(|_| ApiError::Unauthorized)
}

/// Mailgun webhooks: one event a request, `{"signature": {timestamp,
/// token, signature}, "event-data": {...}}`, signed with HMAC-SHA256 of
/// timestamp + token under the signing key. Our message id comes back in
/// the user variable `ledger-message-id` (sent as `v:ledger-message-id`).
pub fn mailgun(config: &FeedbackConfig, body: &[u8]) -> Result<Parsed, ApiError> {
    let key = config.mailgun_signing_key.as_deref().ok_or(ApiError::NotFound)?;
    let v: Value = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    let timestamp = text(&v, &["signature", "timestamp"]).ok_or_else(|| invalid("signature.timestamp is missing"))?;
    let token = text(&v, &["signature", "token"]).ok_or_else(|| invalid("signature.token is missing"))?;
    let signature = text(&v, &["signature", "signature"]).ok_or_else(|| invalid("signature.signature is missing"))?;
    verify_hmac_hex(key, format!("{timestamp}{token}").as_bytes(), &signature)?;
    fresh(config, timestamp.parse::<f64>().ok().and_then(at_secs).ok_or(ApiError::Unauthorized)?)?;
    let e = v.get("event-data").ok_or_else(|| invalid("event-data is missing"))?;
    let event = text(e, &["event"]).ok_or_else(|| invalid("event-data.event is missing"))?;
    let severity = text(e, &["severity"]).unwrap_or_default();
    let (kind, permanent) = match event.as_str() {
        "delivered" => (FeedbackKind::Delivered, false),
        "failed" if severity == "permanent" => (FeedbackKind::Bounced, true),
        "opened" => (FeedbackKind::Opened, false),
        "clicked" => (FeedbackKind::Clicked, false),
        "unsubscribed" => (FeedbackKind::Unsubscribed, false),
        "complained" => (FeedbackKind::Complained, false),
        // accepted, rejected, stored, temporary failures (Mailgun retries).
        _ => return Ok(Parsed { reports: Vec::new(), ignored: 1 }),
    };
    let message_id = text(e, &["user-variables", "ledger-message-id"])
        .or_else(|| text(e, &["message", "headers", "message-id"]))
        .as_deref()
        .and_then(message_id_in);
    let report = Report {
        kind,
        message_id,
        provider_event_id: text(e, &["id"]).ok_or_else(|| invalid("event-data.id is missing"))?,
        recipient: text(e, &["recipient"]).unwrap_or_default(),
        permanent,
        reported_at: e.get("timestamp").and_then(Value::as_f64).and_then(at_secs).unwrap_or_else(Utc::now),
        reason: text(e, &["delivery-status", "description"])
            .filter(|s| !s.is_empty())
            .or_else(|| text(e, &["delivery-status", "message"]))
            .or_else(|| text(e, &["reason"])),
        url: text(e, &["url"]),
    };
    Ok(Parsed { reports: vec![report], ignored: 0 })
}

pub const SENDGRID_SIGNATURE: &str = "x-twilio-email-event-webhook-signature";
pub const SENDGRID_TIMESTAMP: &str = "x-twilio-email-event-webhook-timestamp";

/// SendGrid's signed event webhook: a JSON array of events; the signature
/// header is a base64 DER ECDSA (P-256, SHA-256) signature of the timestamp
/// header followed by the raw body. Our message id comes back in the custom
/// argument `ledger_message_id`, or in the `smtp-id`.
pub fn sendgrid(config: &FeedbackConfig, headers: &HeaderMap, body: &[u8]) -> Result<Parsed, ApiError> {
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    let key = config.sendgrid_public_key.as_deref().ok_or(ApiError::NotFound)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let der =
        b64.decode(key.trim()).map_err(|_| ApiError::Internal("feedback.sendgrid_public_key is not base64".into()))?;
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(&der)
        .map_err(|e| ApiError::Internal(format!("feedback.sendgrid_public_key: {e}")))?;
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok()).ok_or(ApiError::Unauthorized);
    let timestamp = header(SENDGRID_TIMESTAMP)?;
    let signature = b64.decode(header(SENDGRID_SIGNATURE)?.trim()).map_err(|_| ApiError::Unauthorized)?;
    let signature = p256::ecdsa::Signature::from_der(&signature).map_err(|_| ApiError::Unauthorized)?;
    let mut signed = timestamp.as_bytes().to_vec();
    signed.extend_from_slice(body);
    key.verify(&signed, &signature).map_err(|_| ApiError::Unauthorized)?;
    fresh(config, timestamp.trim().parse::<f64>().ok().and_then(at_secs).ok_or(ApiError::Unauthorized)?)?;
    let events: Vec<Value> = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    let mut parsed = Parsed::default();
    for (i, e) in events.iter().enumerate() {
        let event = text(e, &["event"]).ok_or_else(|| invalid(format!("[{i}].event is missing")))?;
        let (kind, permanent) = match event.as_str() {
            "delivered" => (FeedbackKind::Delivered, false),
            "bounce" => (FeedbackKind::Bounced, text(e, &["type"]).as_deref() != Some("blocked")),
            "open" => (FeedbackKind::Opened, false),
            "click" => (FeedbackKind::Clicked, false),
            "spamreport" => (FeedbackKind::Complained, false),
            "unsubscribe" | "group_unsubscribe" => (FeedbackKind::Unsubscribed, false),
            // processed, deferred, dropped, group_resubscribe, …
            _ => {
                parsed.ignored += 1;
                continue;
            }
        };
        let message_id =
            text(e, &["ledger_message_id"]).or_else(|| text(e, &["smtp-id"])).as_deref().and_then(message_id_in);
        parsed.reports.push(Report {
            kind,
            message_id,
            provider_event_id: text(e, &["sg_event_id"])
                .ok_or_else(|| invalid(format!("[{i}].sg_event_id is missing")))?,
            recipient: text(e, &["email"]).unwrap_or_default(),
            permanent,
            reported_at: e.get("timestamp").and_then(Value::as_f64).and_then(at_secs).unwrap_or_else(Utc::now),
            reason: text(e, &["reason"]),
            url: text(e, &["url"]),
        });
    }
    Ok(parsed)
}

/// Amazon SES notifications through an SNS HTTPS subscription. SNS does
/// not sign with a shared key (its signatures need AWS's certificate,
/// fetched from AWS), so the subscription URL carries Basic-auth
/// credentials, which are checked, and only the configured topics are
/// taken. Our message id is the SMTP Message-ID the SMTP provider sets, or
/// the message tag `ledger-message-id`.
pub fn ses(config: &FeedbackConfig, headers: &HeaderMap, body: &[u8]) -> Result<Parsed, ApiError> {
    let expected = config.ses_basic_auth.as_deref().ok_or(ApiError::NotFound)?;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v.trim()).ok())
        .ok_or(ApiError::Unauthorized)?;
    if !constant_time_eq(&given, expected.as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    let sns: Value = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    let topic = text(&sns, &["TopicArn"]).unwrap_or_default();
    if !config.ses_topic_arns.contains(&topic) {
        return Err(ApiError::Unauthorized);
    }
    match text(&sns, &["Type"]).as_deref() {
        Some("Notification") => {}
        Some("SubscriptionConfirmation" | "UnsubscribeConfirmation") => {
            tracing::warn!(
                topic,
                url = text(&sns, &["SubscribeURL"]).unwrap_or_default(),
                "SNS subscription to confirm by hand"
            );
            return Ok(Parsed { reports: Vec::new(), ignored: 1 });
        }
        other => return Err(invalid(format!("unknown SNS message type {other:?}"))),
    }
    let sns_id = text(&sns, &["MessageId"]).ok_or_else(|| invalid("MessageId is missing"))?;
    let inner = text(&sns, &["Message"]).ok_or_else(|| invalid("Message is missing"))?;
    let m: Value = serde_json::from_str(&inner).map_err(|e| invalid(format!("Message: {e}")))?;
    let kind = text(&m, &["eventType"]).or_else(|| text(&m, &["notificationType"])).unwrap_or_default();
    let mail = m.get("mail").cloned().unwrap_or(Value::Null);
    let header_id = mail.get("headers").and_then(Value::as_array).and_then(|hs| {
        hs.iter()
            .find(|h| text(h, &["name"]).is_some_and(|n| n.eq_ignore_ascii_case("message-id")))
            .and_then(|h| text(h, &["value"]))
    });
    let message_id = mail
        .get("tags")
        .and_then(|t| t.get("ledger-message-id"))
        .and_then(|t| t.get(0))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or(header_id)
        .or_else(|| text(&mail, &["commonHeaders", "messageId"]))
        .as_deref()
        .and_then(message_id_in);
    let time = |section: &str| {
        text(&m, &[section, "timestamp"])
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(Utc::now)
    };
    let recipients = |section: &str, list: &str| -> Vec<(String, Option<String>)> {
        m.get(section)
            .and_then(|s| s.get(list))
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .map(|r| (text(r, &["emailAddress"]).unwrap_or_default(), text(r, &["diagnosticCode"])))
                    .collect()
            })
            .unwrap_or_default()
    };
    let dest = || -> Vec<(String, Option<String>)> {
        mail.get("destination")
            .and_then(Value::as_array)
            .map(|d| d.iter().filter_map(Value::as_str).map(|s| (s.to_owned(), None)).collect())
            .unwrap_or_default()
    };
    let (kind, permanent, at, who, url) = match kind.as_str() {
        "Delivery" => (FeedbackKind::Delivered, false, time("delivery"), dest(), None),
        "Bounce" => {
            let permanent = text(&m, &["bounce", "bounceType"]).as_deref() == Some("Permanent");
            if !permanent {
                // Transient bounces: SES retried and gave up, or will; not a
                // reason to stop sending to the recipient.
                return Ok(Parsed { reports: Vec::new(), ignored: 1 });
            }
            (FeedbackKind::Bounced, true, time("bounce"), recipients("bounce", "bouncedRecipients"), None)
        }
        "Complaint" => {
            (FeedbackKind::Complained, false, time("complaint"), recipients("complaint", "complainedRecipients"), None)
        }
        "Open" => (FeedbackKind::Opened, false, time("open"), dest(), None),
        "Click" => (FeedbackKind::Clicked, false, time("click"), dest(), text(&m, &["click", "link"])),
        "Subscription" => (FeedbackKind::Unsubscribed, false, time("subscription"), dest(), None),
        _ => return Ok(Parsed { reports: Vec::new(), ignored: 1 }),
    };
    let reports = who
        .into_iter()
        .enumerate()
        .map(|(i, (recipient, reason))| Report {
            kind,
            message_id,
            provider_event_id: format!("{sns_id}/{i}"),
            recipient,
            permanent,
            reported_at: at,
            reason,
            url: url.clone(),
        })
        .collect();
    Ok(Parsed { reports, ignored: 0 })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A push client's beacon: `{"message_id", "event": "displayed"|"clicked",
/// "token", "url"?}`, the token proving the payload came from us. Only the
/// first of each event per message counts.
pub fn push(config: &FeedbackConfig, body: &[u8]) -> Result<Parsed, ApiError> {
    let secret = config.beacon_secret.as_deref().ok_or(ApiError::NotFound)?;
    let v: Value = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    let message_id = text(&v, &["message_id"])
        .and_then(|s| Uuid::parse_str(&s).ok())
        .ok_or_else(|| invalid("message_id must be a message id"))?;
    let token = text(&v, &["token"]).ok_or(ApiError::Unauthorized)?;
    if !constant_time_eq(token.as_bytes(), beacon_token(secret, message_id).as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    let event = text(&v, &["event"]).unwrap_or_default();
    let kind = match event.as_str() {
        "displayed" => FeedbackKind::Opened,
        "clicked" => FeedbackKind::Clicked,
        other => return Err(invalid(format!("event must be displayed or clicked, not {other:?}"))),
    };
    Ok(Parsed {
        reports: vec![Report {
            kind,
            message_id: Some(message_id),
            provider_event_id: format!("{event}:{message_id}"),
            recipient: String::new(),
            permanent: false,
            reported_at: Utc::now(),
            reason: None,
            url: text(&v, &["url"]),
        }],
        ignored: 0,
    })
}

pub async fn receive(State(state): State<Arc<AppState>>, Segment(source): Segment, request: Request) -> Response {
    receive_inner(&state, &source, request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn receive_inner(state: &AppState, source: &str, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = read_body(body, state.config.http.max_body_bytes).await?;
    let config = &state.config.feedback;
    let parsed = match source {
        "mailgun" => mailgun(config, &bytes),
        "sendgrid" => sendgrid(config, &parts.headers, &bytes),
        "ses" => ses(config, &parts.headers, &bytes),
        "push" => push(config, &bytes),
        _ => Err(ApiError::NotFound),
    }
    .inspect_err(|e| {
        if e.status() == StatusCode::UNAUTHORIZED {
            tracing::warn!(source, "feedback refused: bad or missing signature or credentials");
        }
    })?;
    let correlation = correlation_id(&parts.headers);

    // Which messages the reports are about, and which were seen before.
    let ids: Vec<Uuid> = parsed.reports.iter().filter_map(|r| r.message_id).collect();
    let known: HashMap<Uuid, (String, Option<Uuid>)> = sqlx::query_as::<_, (Uuid, String, Option<Uuid>)>(
        "-- ingest::feedback::receive (messages)
         SELECT message_id, tenant_id, intent_id FROM delivery_claims WHERE message_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&state.ops)
    .await?
    .into_iter()
    .map(|(m, t, i)| (m, (t, i)))
    .collect();
    let event_ids: Vec<&str> = parsed.reports.iter().map(|r| r.provider_event_id.as_str()).collect();
    let seen: HashSet<String> = sqlx::query_scalar(
        "-- ingest::feedback::receive (seen)
         SELECT provider_event_id FROM feedback_seen WHERE source = $1 AND provider_event_id = ANY($2)",
    )
    .bind(source)
    .bind(&event_ids)
    .fetch_all(&state.ops)
    .await?
    .into_iter()
    .collect();

    let (mut duplicates, mut unmatched) = (0usize, 0usize);
    let mut fresh_ids = HashSet::new();
    let mut new: Vec<(Report, Event)> = Vec::new();
    for report in parsed.reports {
        if seen.contains(&report.provider_event_id) || !fresh_ids.insert(report.provider_event_id.clone()) {
            duplicates += 1;
            continue;
        }
        let Some((id, (tenant, Some(intent)))) =
            report.message_id.and_then(|id| known.get(&id).map(|k| (id, k.clone())))
        else {
            unmatched += 1;
            metrics::counter!("ledger_feedback_total", "source" => source.to_owned(), "kind" => report.kind.as_str(), "outcome" => "unmatched").increment(1);
            continue;
        };
        let recipient = report.recipient.clone();
        let event = Event {
            event_id: EventId::derive(id, &format!("feedback:{source}:{}", report.provider_event_id), 0),
            body: EventBody::Feedback(Feedback {
                kind: report.kind,
                source: source.to_owned(),
                provider_event_id: report.provider_event_id.clone(),
                recipient,
                permanent: report.permanent,
                reported_at: report.reported_at,
                reason: report.reason.clone(),
                url: report.url.clone(),
            }),
            tenant_id: TenantId(tenant),
            intent_id: IntentId(intent),
            message_id: Some(MessageId(id)),
            occurred_at: Utc::now(),
            correlation_id: correlation.clone(),
        };
        new.push((report, event));
    }

    // On the log first: a 200 means the reports are durable.
    let sends = new.iter().map(|(_, e)| {
        let key = e.message_id.map(|m| m.to_string()).unwrap_or_default();
        async move { kafka::send_event(&state.producer, &state.config, Topic::Outcomes, &key, e).await }
    });
    for result in futures::future::join_all(sends).await {
        if let Err(e) = result {
            return Err(ApiError::BrokerUnavailable { detail: e.to_string(), retry_after_secs: 1 });
        }
    }
    // One statement per tenant and reason, whatever the number of reports.
    let mut suppress: HashMap<(&TenantId, &'static str), (Reason, Vec<String>)> = HashMap::new();
    for (report, event) in &new {
        let reason = match report.kind {
            FeedbackKind::Bounced if report.permanent => Some(Reason::HardBounce),
            FeedbackKind::Complained => Some(Reason::Complaint),
            FeedbackKind::Unsubscribed => Some(Reason::Unsubscribe),
            _ => None,
        };
        if let (Some(reason), EventBody::Feedback(f)) = (reason, &event.body) {
            if !f.recipient.is_empty() {
                suppress
                    .entry((&event.tenant_id, reason.as_str()))
                    .or_insert((reason, Vec::new()))
                    .1
                    .push(f.recipient.clone());
            }
        }
    }
    for ((tenant, _), (reason, recipients)) in &suppress {
        suppressions::add(&state.ops, tenant, recipients, *reason, &format!("feedback:{source}")).await?;
    }
    for (report, event) in &new {
        metrics::counter!("ledger_feedback_total", "source" => source.to_owned(), "kind" => report.kind.as_str(), "outcome" => "recorded", "tenant" => event.tenant_id.0.clone()).increment(1);
    }
    // The recipient's side has seen the message: an attempt held as
    // ambiguous was delivered after all, and is no longer to reconcile.
    let arrived: Vec<Uuid> = new
        .iter()
        .filter(|(r, _)| r.kind != FeedbackKind::Bounced)
        .filter_map(|(_, e)| e.message_id.map(|m| m.0))
        .collect();
    if !arrived.is_empty() {
        sqlx::query(
            "-- ingest::feedback::receive (ambiguous resolved)
             UPDATE delivery_claims SET state = 'done', updated_at = now()
             WHERE message_id = ANY($1) AND state = 'ambiguous'",
        )
        .bind(&arrived)
        .execute(&state.ops)
        .await?;
    }
    sqlx::query(
        "-- ingest::feedback::receive (mark seen)
         INSERT INTO feedback_seen (source, provider_event_id, message_id)
         SELECT $1, e, m FROM UNNEST($2::text[], $3::uuid[]) AS u(e, m)
         ON CONFLICT DO NOTHING",
    )
    .bind(source)
    .bind(new.iter().map(|(r, _)| r.provider_event_id.as_str()).collect::<Vec<_>>())
    .bind(new.iter().filter_map(|(_, e)| e.message_id.map(|m| m.0)).collect::<Vec<_>>())
    .execute(&state.ops)
    .await?;
    Ok((
        StatusCode::OK,
        Json(json!({
            "recorded": new.len(),
            "duplicates": duplicates,
            "unmatched": unmatched,
            "ignored": parsed.ignored,
        })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_message_id_is_found_in_the_forms_we_send_it() {
        let id = Uuid::from_u128(42);
        assert_eq!(message_id_in(&id.to_string()), Some(id));
        assert_eq!(message_id_in(&format!("<{id}@delivery-ledger>")), Some(id));
        assert_eq!(message_id_in("<20261201.abc@mailgun.org>"), None);
    }

    #[test]
    fn a_mailgun_event_needs_its_signature() {
        let config = FeedbackConfig { mailgun_signing_key: Some("key-1".into()), ..Default::default() };
        let ts = Utc::now().timestamp().to_string();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key-1").expect("key");
        mac.update(format!("{ts}tok").as_bytes());
        let good = hex::encode(mac.finalize().into_bytes());
        let body = |sig: &str| {
            serde_json::to_vec(&json!({
                "signature": { "timestamp": ts, "token": "tok", "signature": sig },
                "event-data": { "event": "failed", "severity": "permanent", "id": "e1", "recipient": "a@x.io",
                                "timestamp": 1.8e9, "user-variables": { "ledger-message-id": Uuid::from_u128(7).to_string() },
                                "delivery-status": { "description": "No such mailbox" } }
            }))
            .expect("json")
        };
        let parsed = mailgun(&config, &body(&good)).expect("verified");
        assert_eq!(parsed.reports.len(), 1);
        let r = &parsed.reports[0];
        assert_eq!((r.kind, r.permanent, r.message_id), (FeedbackKind::Bounced, true, Some(Uuid::from_u128(7))));
        assert_eq!(r.reason.as_deref(), Some("No such mailbox"));
        assert!(matches!(mailgun(&config, &body(&"0".repeat(64))), Err(ApiError::Unauthorized)));
        assert!(matches!(mailgun(&FeedbackConfig::default(), &body(&good)), Err(ApiError::NotFound)));
    }

    #[test]
    fn a_beacon_token_is_bound_to_its_message() {
        let config = FeedbackConfig { beacon_secret: Some("s".into()), ..Default::default() };
        let id = Uuid::from_u128(9);
        let body = |token: String| {
            serde_json::to_vec(&json!({ "message_id": id, "event": "displayed", "token": token })).expect("json")
        };
        let parsed = push(&config, &body(beacon_token("s", id))).expect("ok");
        assert_eq!(parsed.reports[0].kind, FeedbackKind::Opened);
        assert!(matches!(push(&config, &body(beacon_token("s", Uuid::from_u128(10)))), Err(ApiError::Unauthorized)));
    }
}
