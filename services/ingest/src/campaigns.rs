//! `POST /v1/campaigns` (one JSON document, or an NDJSON stream: a header
//! line, then one recipient per line) and `POST /v1/campaigns/{id}/cancel`.
//!
//! An NDJSON campaign is never held in memory whole: it is validated line by
//! line while it streams to a spool file, and only when every line is valid
//! is the idempotency key claimed and the spool produced as bounded
//! recipient batches. A refused campaign produces nothing.

use crate::request::Segment;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use ledger_runtime::kafka;
#[cfg(test)]
use ledger_schemas::RecipientBatch;
use ledger_schemas::{Event, EventBody, EventId, IntentCancelled, IntentId, IntentKind, Recipient, TenantId, Topic};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::problem::{ApiError, FieldError};
use crate::request::{
    authenticate, body_kind, canonical_hash, correlation_id, read_body, submission, BodyKind, Submission,
};
use crate::submit::{self, Batcher, Claim, Envelope, IntentSpec};
use crate::validate::{self, CampaignHeader, CampaignRequest, CancelRequest, Errors};
use crate::{accepted, templates, AppState};

/// Longest NDJSON line (the header line carries the content).
const MAX_LINE_BYTES: usize = 1 << 20;

pub async fn submit(State(state): State<Arc<AppState>>, request: Request) -> Response {
    campaign(&state, request).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn cancel(State(state): State<Arc<AppState>>, Segment(id): Segment, request: Request) -> Response {
    cancel_intent(&state, &id, request).await.unwrap_or_else(IntoResponse::into_response)
}

/// Recipients that passed validation, deduplicated, in order.
enum Recipients {
    Memory(Vec<Recipient>),
    /// NDJSON lines of `Recipient`, one per line.
    Spool(std::fs::File),
}

struct Checked {
    header: CampaignHeader,
    recipients: Recipients,
    count: usize,
    duplicates: usize,
    batches: u32,
    hash: Vec<u8>,
}

/// Skips repeated recipients (after normalisation): one person, one message.
struct Dedup {
    seen: HashSet<[u8; 16]>,
}

impl Dedup {
    fn new() -> Self {
        Dedup { seen: HashSet::new() }
    }

    fn first_time(&mut self, address: &str) -> bool {
        let digest = Sha256::digest(ledger_schemas::ids::normalise_recipient(address).as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        self.seen.insert(key)
    }
}

fn too_many(max: usize) -> ApiError {
    ApiError::Validation(vec![FieldError { field: "recipients".into(), detail: format!("more than {max} recipients") }])
}

fn empty() -> ApiError {
    ApiError::Validation(vec![FieldError {
        field: "recipients".into(),
        detail: "a campaign needs at least one recipient".into(),
    }])
}

fn check_json(state: &AppState, bytes: &[u8]) -> Result<Checked, ApiError> {
    let request: CampaignRequest = validate::parse(bytes)?;
    let hash = canonical_hash(bytes)?;
    let (header, all) = request.split();
    let max = state.config.http.max_campaign_recipients;
    if all.len() > max {
        return Err(too_many(max));
    }
    if all.is_empty() {
        return Err(empty());
    }
    let mut errors = Errors::new();
    header.check(&mut errors);
    let mut dedup = Dedup::new();
    let mut kept = Vec::with_capacity(all.len());
    let mut counter = Batcher::new(state.config.http.batch_max_recipients, state.config.http.batch_max_bytes);
    let (mut batches, mut duplicates) = (0u32, 0usize);
    for (i, r) in all.into_iter().enumerate() {
        validate::check_recipient(&mut errors, &format!("recipients[{i}]"), header.channel, &r.address, &r.variables);
        if dedup.first_time(&r.address) {
            let size = serde_json::to_vec(&r).map(|v| v.len()).unwrap_or(0);
            batches += u32::from(counter.push((), size).is_some());
            kept.push(r);
        } else {
            duplicates += 1;
        }
    }
    errors.into_result()?;
    batches += u32::from(counter.finish().is_some());
    Ok(Checked { header, count: kept.len(), recipients: Recipients::Memory(kept), duplicates, batches, hash })
}

async fn check_ndjson(state: &AppState, body: Body) -> Result<Checked, ApiError> {
    let dir = state.config.http.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    let file =
        tempfile::tempfile_in(&dir).map_err(|e| ApiError::Internal(format!("spool in {}: {e}", dir.display())))?;
    let mut spool = BufWriter::with_capacity(1 << 20, file);
    let max = state.config.http.max_campaign_recipients;
    let mut hasher = Sha256::new();
    let mut header: Option<CampaignHeader> = None;
    let mut errors = Errors::new();
    let mut dedup = Dedup::new();
    let mut counter = Batcher::new(state.config.http.batch_max_recipients, state.config.http.batch_max_bytes);
    let (mut count, mut duplicates, mut batches, mut line_no) = (0usize, 0usize, 0u32, 0usize);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut stream = body.into_data_stream();
    let mut finished = false;
    while !finished {
        match stream.next().await {
            Some(chunk) => {
                let chunk = chunk.map_err(|e| {
                    ApiError::InvalidBody(vec![FieldError {
                        field: String::new(),
                        detail: format!("reading the body: {e}"),
                    }])
                })?;
                hasher.update(&chunk);
                buf.extend_from_slice(&chunk);
            }
            None => {
                finished = true;
                buf.push(b'\n');
            }
        }
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|b| *b == b'\n') {
            let line = &buf[start..start + pos];
            start += pos + 1;
            line_no += 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let at = format!("line {line_no}");
            let Some(h) = &header else {
                match validate::parse_at::<CampaignHeader>(line, &at) {
                    Ok(h) => {
                        h.check(&mut errors);
                        header = Some(h);
                    }
                    Err(e) => return Err(ApiError::InvalidBody(vec![e])),
                }
                continue;
            };
            match validate::parse_at::<Recipient>(line, &at) {
                Ok(r) => {
                    validate::check_recipient(&mut errors, &at, h.channel, &r.address, &r.variables);
                    if !dedup.first_time(&r.address) {
                        duplicates += 1;
                        continue;
                    }
                    count += 1;
                    if count > max {
                        return Err(too_many(max));
                    }
                    if errors.is_empty() {
                        let mut json = serde_json::to_vec(&r).map_err(|e| ApiError::Internal(e.to_string()))?;
                        batches += u32::from(counter.push((), json.len()).is_some());
                        json.push(b'\n');
                        spool.write_all(&json).map_err(|e| ApiError::Internal(format!("spool: {e}")))?;
                    }
                }
                Err(e) => errors.add(e.field, e.detail),
            }
        }
        buf.drain(..start);
        if buf.len() > MAX_LINE_BYTES {
            return Err(ApiError::InvalidBody(vec![FieldError {
                field: format!("line {}", line_no + 1),
                detail: format!("longer than {MAX_LINE_BYTES} bytes"),
            }]));
        }
    }
    let Some(header) = header else {
        return Err(ApiError::InvalidBody(vec![FieldError {
            field: "line 1".into(),
            detail: "the first line must be the campaign header".into(),
        }]));
    };
    errors.into_result()?;
    if count == 0 {
        return Err(empty());
    }
    batches += u32::from(counter.finish().is_some());
    let mut file = spool.into_inner().map_err(|e| ApiError::Internal(format!("spool: {e}")))?;
    file.rewind().map_err(|e| ApiError::Internal(format!("spool: {e}")))?;
    Ok(Checked {
        header,
        recipients: Recipients::Spool(file),
        count,
        duplicates,
        batches,
        hash: hasher.finalize().to_vec(),
    })
}

async fn campaign(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let Submission { tenant, key, correlation, headers, body } = submission(state, request).await?;
    let checked = match body_kind(&headers) {
        Some(BodyKind::Json) => check_json(state, &read_body(body, state.config.http.max_campaign_json_bytes).await?)?,
        Some(BodyKind::Ndjson) => check_ndjson(state, body).await?,
        None => return Err(ApiError::UnsupportedMediaType("application/json or application/x-ndjson")),
    };
    let template = match &checked.header.template {
        Some(t) => Some(
            templates::resolve(&state.ops, &tenant, "", t, checked.header.channel)
                .await
                .map_err(|e| ApiError::Validation(vec![e]))?,
        ),
        None => None,
    };
    let intent =
        match submit::claim_key(state, &tenant, &key, &checked.hash, IntentKind::Campaign, &|i| vec![i]).await? {
            Claim::Replay(response) => {
                let location = response["intent_id"].as_str().map(|id| format!("/v1/intents/{id}"));
                return Ok(accepted(response, location.as_deref(), true, &correlation));
            }
            Claim::Produce(intent) => intent,
        };
    let Checked { header, recipients, count, duplicates, batches, hash } = checked;
    let spec = IntentSpec {
        intent,
        kind: IntentKind::Campaign,
        name: header.name.clone(),
        channel: header.channel,
        priority: header.priority,
        from: header.from.clone(),
        content: header.content.clone().unwrap_or_default(),
        template,
        send_at: header.send_at,
        request_hash: hex::encode(&hash),
    };
    let env = Envelope { tenant: &tenant, correlation: &correlation, now: Utc::now() };
    let events = campaign_events(state, &spec, &env, recipients, count as u32, batches);
    let record_key = intent.to_string();
    let produced = submit::produce_encoded(
        state,
        submit::IN_FLIGHT_LARGE,
        futures::stream::iter(events.map(|e| e.map(|e| (record_key.clone(), e)))),
    )
    .await?;
    debug_assert_eq!(produced, u64::from(batches) + 1);

    let response = json!({
        "intent_id": intent,
        "status": "accepted",
        "recipients": count,
        "duplicates_ignored": duplicates,
        "batches": batches,
    });
    submit::mark_accepted(state, &tenant, &key, &response).await?;
    metrics::counter!("ledger_intents_accepted_total", "tenant" => tenant.0.clone(), "kind" => "campaign").increment(1);
    metrics::counter!("ledger_recipients_accepted_total", "tenant" => tenant.0.clone(), "kind" => "campaign")
        .increment(count as u64);
    tracing::info!(intent_id = %intent, tenant = %tenant, recipients = count, batches, correlation_id = %correlation, "campaign accepted");
    Ok(accepted(response, Some(&format!("/v1/intents/{intent}")), false, &correlation))
}

/// The header, then the recipient batches, cut exactly as counted during
/// validation, already encoded. A batch's record is the encoded event with
/// the recipients' JSON (as validated and spooled) spliced into its empty
/// `recipients` array: a campaign's recipients are parsed once, not twice.
fn campaign_events<'a>(
    state: &AppState,
    spec: &'a IntentSpec,
    env: &'a Envelope<'a>,
    recipients: Recipients,
    count: u32,
    batches: u32,
) -> Box<dyn Iterator<Item = Result<kafka::Encoded, ApiError>> + Send + 'a> {
    let mut batcher: Batcher<Vec<u8>> =
        Batcher::new(state.config.http.batch_max_recipients, state.config.http.batch_max_bytes);
    let header = std::iter::once(Ok(kafka::Encoded::from(&spec.header(env, count, batches))));
    let sized: Box<dyn Iterator<Item = Result<Vec<u8>, ApiError>> + Send> = match recipients {
        Recipients::Memory(list) => {
            Box::new(list.into_iter().map(|r| serde_json::to_vec(&r).map_err(|e| ApiError::Internal(e.to_string()))))
        }
        Recipients::Spool(file) => Box::new(
            BufReader::with_capacity(1 << 20, file)
                .split(b'\n')
                .map(|line| line.map_err(|e| ApiError::Internal(format!("spool: {e}")))),
        ),
    };
    let batch = move |index: u32, members: Vec<Vec<u8>>| -> Result<kafka::Encoded, ApiError> {
        let mut encoded = kafka::Encoded::from(&spec.batch(env, index, batches, Vec::new()));
        splice_recipients(&mut encoded.payload, &members)?;
        Ok(encoded)
    };
    let mut index = 0u32;
    let mut sized = sized.fuse();
    let mut done = false;
    let body = std::iter::from_fn(move || loop {
        if done {
            return None;
        }
        match sized.next() {
            Some(Ok(json)) => {
                let size = json.len();
                if let Some(full) = batcher.push(json, size) {
                    index += 1;
                    return Some(batch(index - 1, full));
                }
            }
            Some(Err(e)) => {
                done = true;
                return Some(Err(e));
            }
            None => {
                done = true;
                let rest = std::mem::replace(&mut batcher, Batcher::new(1, 1)).finish()?;
                index += 1;
                return Some(batch(index - 1, rest));
            }
        }
    });
    Box::new(header.chain(body))
}

/// Fills the empty `"recipients":[]` of an encoded recipient batch. The
/// last occurrence is the field: everything after it in a batch (the
/// optional `send_at`) cannot contain the sequence, while inline JSON
/// content before it could.
fn splice_recipients(payload: &mut Vec<u8>, members: &[Vec<u8>]) -> Result<(), ApiError> {
    const EMPTY: &[u8] = b"\"recipients\":[]";
    let at = payload
        .windows(EMPTY.len())
        .rposition(|w| w == EMPTY)
        .ok_or_else(|| ApiError::Internal("encoded batch has no recipients field".into()))?;
    let insert_at = at + EMPTY.len() - 1;
    let mut joined = Vec::with_capacity(members.iter().map(|m| m.len() + 1).sum());
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            joined.push(b',');
        }
        joined.extend_from_slice(m);
    }
    payload.splice(insert_at..insert_at, joined);
    Ok(())
}

/// The intent if it belongs to `tenant`; otherwise (absent, or another
/// tenant's) not found, so that ids of others cannot even be confirmed.
pub async fn owned_intent(state: &AppState, tenant: &TenantId, id: &str) -> Result<IntentId, ApiError> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    let owner: Option<String> = sqlx::query_scalar(
        "-- ingest::campaigns::owned_intent
         SELECT tenant_id FROM intents WHERE intent_id = $1",
    )
    .bind(id)
    .fetch_optional(&state.ops)
    .await?;
    match owner {
        Some(t) if t == tenant.0 => Ok(IntentId(id)),
        _ => Err(ApiError::NotFound),
    }
}

async fn cancel_intent(state: &AppState, id: &str, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let tenant = authenticate(state, &parts.headers).await?;
    let correlation = correlation_id(&parts.headers);
    let intent = owned_intent(state, &tenant, id).await?;
    let bytes = read_body(body, 64 * 1024).await?;
    let cancel: CancelRequest =
        if bytes.iter().all(u8::is_ascii_whitespace) { CancelRequest::default() } else { validate::parse(&bytes)? };
    // The row first: dispatchers check it atomically with every claim, so
    // from here on nothing more of this intent is delivered. The event then
    // tells the log (and the read model).
    sqlx::query(
        "-- ingest::campaigns::cancel_intent
         INSERT INTO cancelled_intents (intent_id, tenant_id) VALUES ($1, $2) ON CONFLICT (intent_id) DO NOTHING",
    )
    .bind(intent.0)
    .bind(tenant.as_str())
    .execute(&state.ops)
    .await?;
    let event = Event {
        event_id: EventId::derive(intent.0, "cancelled", 0),
        body: EventBody::IntentCancelled(IntentCancelled { reason: cancel.reason }),
        tenant_id: tenant.clone(),
        intent_id: intent,
        message_id: None,
        occurred_at: Utc::now(),
        correlation_id: correlation.clone(),
    };
    kafka::send_event(&state.producer, &state.config, Topic::Intents, &intent.to_string(), &event).await.map_err(
        |e| ApiError::BrokerUnavailable { detail: e.to_string(), retry_after_secs: state.config.http.retry_after_secs },
    )?;
    metrics::counter!("ledger_intents_cancelled_total", "tenant" => tenant.0.clone()).increment(1);
    let response = json!({ "intent_id": intent, "status": "cancelled" });
    Ok(accepted(response, Some(&format!("/v1/intents/{intent}")), false, &correlation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_schemas::{Channel, Content, Priority};

    #[test]
    fn spliced_recipients_decode_as_the_batch_serde_would_write() {
        let spec = IntentSpec {
            intent: IntentId(Uuid::from_u128(1)),
            kind: IntentKind::Campaign,
            name: None,
            channel: Channel::Webhook,
            priority: Priority::Bulk,
            from: None,
            // Inline JSON content may itself hold the sequence searched for.
            content: Content { json: Some(json!({ "recipients": [] })), ..Content::default() },
            template: None,
            send_at: Some(Utc::now()),
            request_hash: String::new(),
        };
        let tenant = TenantId::parse("acme").unwrap();
        let env = Envelope { tenant: &tenant, correlation: "c", now: Utc::now() };
        let members: Vec<Recipient> = (0..3)
            .map(|i| Recipient { address: format!("https://example.com/{i}"), variables: Default::default() })
            .collect();
        let mut encoded = kafka::Encoded::from(&spec.batch(&env, 0, 1, Vec::new()));
        let json: Vec<Vec<u8>> = members.iter().map(|m| serde_json::to_vec(m).unwrap()).collect();
        splice_recipients(&mut encoded.payload, &json).unwrap();
        let decoded = Event::from_json(&encoded.payload).unwrap();
        assert_eq!(decoded, spec.batch(&env, 0, 1, members));
        let EventBody::RecipientBatch(RecipientBatch { content, .. }) = decoded.body else { panic!("not a batch") };
        assert_eq!(content.json, Some(json!({ "recipients": [] })));
    }
}
