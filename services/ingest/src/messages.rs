//! `POST /v1/messages` and `POST /v1/messages/batch`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use ledger_schemas::{IntentId, IntentKind, MessageId, Recipient, TemplateRef};
use serde_json::{json, Value};

use crate::problem::{ApiError, FieldError};
use crate::request::{canonical_hash, json_body, submission, Submission};
use crate::submit::{self, Claim, Envelope, IntentSpec};
use crate::validate::{self, BatchRequest, Errors, MessageRequest};
use crate::{accepted, templates, AppState};

pub async fn send_message(State(state): State<Arc<AppState>>, request: Request) -> Response {
    single(&state, request).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn send_batch(State(state): State<Arc<AppState>>, request: Request) -> Response {
    batch(&state, request).await.unwrap_or_else(IntoResponse::into_response)
}

fn spec(
    intent: IntentId,
    kind: IntentKind,
    m: &MessageRequest,
    template: Option<TemplateRef>,
    hash: &str,
) -> IntentSpec {
    IntentSpec {
        intent,
        kind,
        name: None,
        channel: m.channel,
        priority: m.priority,
        from: m.from.clone(),
        content: m.content.clone().unwrap_or_default(),
        template,
        send_at: m.send_at,
        request_hash: hash.to_owned(),
    }
}

/// The header and the one-recipient batch of a message.
fn message_events(spec: &IntentSpec, env: &Envelope<'_>, m: &MessageRequest) -> [ledger_schemas::Event; 2] {
    let recipient = Recipient { address: m.to.clone(), variables: m.variables.clone() };
    [spec.header(env, 1, 1), spec.batch(env, 0, 1, vec![recipient])]
}

async fn single(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let Submission { tenant, key, correlation, headers, body } = submission(state, request).await?;
    let bytes = json_body(&headers, body, state.config.http.max_body_bytes).await?;
    let message: MessageRequest = validate::parse(&bytes)?;
    message.validate()?;
    let template = match &message.template {
        Some(t) => Some(
            templates::resolve(&state.ops, &tenant, "", t, message.channel)
                .await
                .map_err(|e| ApiError::Validation(vec![e]))?,
        ),
        None => None,
    };
    let hash = canonical_hash(&bytes)?;

    let intent = match submit::claim_key(state, &tenant, &key, &hash, IntentKind::Single, &|i| vec![i]).await? {
        Claim::Replay(response) => {
            let location = response["intent_id"].as_str().map(|id| format!("/v1/intents/{id}"));
            return Ok(accepted(response, location.as_deref(), true, &correlation));
        }
        Claim::Produce(intent) => intent,
    };
    let env = Envelope { tenant: &tenant, correlation: &correlation, now: Utc::now() };
    let spec = spec(intent, IntentKind::Single, &message, template, &hex::encode(&hash));
    let events = message_events(&spec, &env, &message);
    submit::produce_all(state, submit::IN_FLIGHT_SMALL, futures::stream::iter(events.into_iter().map(Ok))).await?;

    let response = json!({
        "intent_id": intent,
        "message_id": MessageId::derive(intent, &message.to),
        "status": "accepted",
    });
    submit::mark_accepted(state, &tenant, &key, &response).await?;
    metrics::counter!("ledger_intents_accepted_total", "tenant" => tenant.0.clone(), "kind" => "single").increment(1);
    metrics::counter!("ledger_recipients_accepted_total", "tenant" => tenant.0.clone(), "kind" => "single")
        .increment(1);
    tracing::info!(intent_id = %intent, tenant = %tenant, correlation_id = %correlation, "intent accepted");
    Ok(accepted(response, Some(&format!("/v1/intents/{intent}")), false, &correlation))
}

async fn batch(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let Submission { tenant, key, correlation, headers, body } = submission(state, request).await?;
    let started = std::time::Instant::now();
    let bytes = json_body(&headers, body, state.config.http.max_body_bytes).await?;
    let request: BatchRequest = validate::parse(&bytes)?;
    let max = state.config.http.max_batch_messages;
    if request.messages.is_empty() || request.messages.len() > max {
        return Err(ApiError::Validation(vec![FieldError {
            field: "messages".into(),
            detail: format!("give 1 to {max} messages, not {}", request.messages.len()),
        }]));
    }
    // Each message is judged on its own: the valid ones are accepted, the
    // others get their problems in their own result.
    let mut checked: Vec<Result<Option<TemplateRef>, Vec<FieldError>>> = Vec::with_capacity(request.messages.len());
    for m in &request.messages {
        let mut errors = Errors::new();
        m.check(&mut errors, "");
        checked.push(if !errors.is_empty() {
            Err(errors.list)
        } else if let Some(t) = &m.template {
            templates::resolve(&state.ops, &tenant, "", t, m.channel).await.map(Some).map_err(|e| vec![e])
        } else {
            Ok(None)
        });
    }
    if checked.iter().all(Result::is_err) {
        let all = checked
            .into_iter()
            .enumerate()
            .flat_map(|(i, r)| r.err().unwrap_or_default().into_iter().map(move |e| (i, e)))
            .map(|(i, e)| FieldError { field: validate::join(&format!("messages[{i}]"), &e.field), detail: e.detail })
            .take(validate::MAX_REPORTED_ERRORS)
            .collect();
        return Err(ApiError::Validation(all));
    }
    let hash = canonical_hash(&bytes)?;
    submit::stage("check", started);
    let valid_indexes: Vec<u32> = (0..checked.len() as u32).filter(|i| checked[*i as usize].is_ok()).collect();
    let items = |batch: IntentId| valid_indexes.iter().map(|i| batch.item(*i)).collect::<Vec<_>>();
    let batch_id = match submit::claim_key(state, &tenant, &key, &hash, IntentKind::Batch, &items).await? {
        Claim::Replay(response) => return Ok(accepted(response, None, true, &correlation)),
        Claim::Produce(intent) => intent,
    };
    let valid: Vec<(u32, &MessageRequest, Option<TemplateRef>)> = request
        .messages
        .iter()
        .enumerate()
        .filter_map(|(i, m)| checked[i].as_ref().ok().map(|t| (i as u32, m, t.clone())))
        .collect();
    let env = Envelope { tenant: &tenant, correlation: &correlation, now: Utc::now() };
    let hex_hash = hex::encode(&hash);
    let mut events = Vec::with_capacity(valid.len() * 2);
    for (i, m, t) in &valid {
        events.extend(
            message_events(&spec(batch_id.item(*i), IntentKind::Batch, m, t.clone(), &hex_hash), &env, m).map(Ok),
        );
    }
    submit::produce_all(state, submit::IN_FLIGHT_SMALL, futures::stream::iter(events)).await?;

    let results: Vec<Value> = request
        .messages
        .iter()
        .zip(&checked)
        .enumerate()
        .map(|(i, (m, check))| match check {
            Ok(_) => {
                let intent = batch_id.item(i as u32);
                json!({ "index": i, "status": "accepted", "intent_id": intent, "message_id": MessageId::derive(intent, &m.to) })
            }
            Err(errors) => json!({ "index": i, "status": "rejected", "errors": errors }),
        })
        .collect();
    let response = json!({
        "batch_id": batch_id,
        "accepted": valid.len(),
        "rejected": request.messages.len() - valid.len(),
        "results": results,
    });
    submit::mark_accepted(state, &tenant, &key, &response).await?;
    metrics::counter!("ledger_intents_accepted_total", "tenant" => tenant.0.clone(), "kind" => "batch")
        .increment(valid.len() as u64);
    metrics::counter!("ledger_recipients_accepted_total", "tenant" => tenant.0.clone(), "kind" => "batch")
        .increment(valid.len() as u64);
    Ok(accepted(response, None, false, &correlation))
}
