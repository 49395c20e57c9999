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
    submit::produce_all(state, submit::IN_FLIGHT_SMALL, &events).await?;

    let response = json!({
        "intent_id": intent,
        "message_id": MessageId::derive(intent, &message.to),
        "status": "accepted",
    });
    submit::record_accepted(state, &tenant, &key, response.clone()).await;
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
        Claim::Replay(kept) => return Ok(accepted(replayed(kept, &request.messages, None), None, true, &correlation)),
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
    // Each message's intent id, derived once for its events and its result.
    let items: Vec<IntentId> = (0..request.messages.len() as u32).map(|i| batch_id.item(i)).collect();
    let mut events = Vec::with_capacity(valid.len() * 2);
    for (i, m, t) in &valid {
        events.extend(message_events(&spec(items[*i as usize], IntentKind::Batch, m, t.clone(), &hex_hash), &env, m));
    }
    submit::produce_all(state, submit::IN_FLIGHT_SMALL, &events).await?;

    let rejected: Vec<Value> = checked
        .iter()
        .enumerate()
        .filter_map(|(i, check)| {
            check.as_ref().err().map(|errors| json!({ "index": i, "status": "rejected", "errors": errors }))
        })
        .collect();
    let kept = json!({
        "batch_id": batch_id,
        "accepted": valid.len(),
        "rejected": request.messages.len() - valid.len(),
        KEPT_REJECTED: rejected,
    });
    submit::record_accepted(state, &tenant, &key, kept.clone()).await;
    let response = replayed(kept, &request.messages, Some(&items));
    metrics::counter!("ledger_intents_accepted_total", "tenant" => tenant.0.clone(), "kind" => "batch")
        .increment(valid.len() as u64);
    metrics::counter!("ledger_recipients_accepted_total", "tenant" => tenant.0.clone(), "kind" => "batch")
        .increment(valid.len() as u64);
    Ok(accepted(response, None, false, &correlation))
}

/// Where the response kept for a batch's replays holds its rejected
/// results: the accepted ones are left out, and derived again from the
/// batch id and the request (the same request on every replay: its hash is
/// the key's). About 140 bytes a message were stored and parsed into jsonb
/// by PostgreSQL otherwise, several milliseconds of its time for a batch of
/// 1,000; the response is the same either way.
const KEPT_REJECTED: &str = "rejected_results";

/// The response to a batch from what was kept of it (see [`KEPT_REJECTED`]):
/// each message's result in order, the accepted ones derived (their intent
/// ids from `items` when the caller has them). A response kept whole (before
/// [`KEPT_REJECTED`]) is the response.
fn replayed<'a>(kept: Value, messages: &'a [MessageRequest], items: Option<&'a [IntentId]>) -> BatchResponse<'a> {
    let Value::Object(mut response) = kept else { return BatchResponse::Whole(kept) };
    let Some(Value::Array(rejected)) = response.remove(KEPT_REJECTED) else {
        return BatchResponse::Whole(Value::Object(response));
    };
    let Some(batch) = response.get("batch_id").and_then(|id| serde_json::from_value::<IntentId>(id.clone()).ok())
    else {
        return BatchResponse::Whole(Value::Object(response));
    };
    BatchResponse::Derived { kept: response, results: Results { batch, messages, items, rejected } }
}

/// A batch's response, written as JSON as it is serialised: a thousand
/// results built as `serde_json::Value` maps first (and their ids derived
/// again) were about 5 % of ingest's time on batches of 1,000.
enum BatchResponse<'a> {
    Whole(Value),
    /// The kept fields (`accepted`, `batch_id`, `rejected`), then `results`.
    Derived {
        kept: serde_json::Map<String, Value>,
        results: Results<'a>,
    },
}

struct Results<'a> {
    batch: IntentId,
    messages: &'a [MessageRequest],
    items: Option<&'a [IntentId]>,
    /// The rejected messages' results, in index order.
    rejected: Vec<Value>,
}

/// An accepted message's result, its fields in the order a `Value` map
/// writes them.
#[derive(serde::Serialize)]
struct AcceptedResult {
    index: usize,
    intent_id: IntentId,
    message_id: MessageId,
    status: &'static str,
}

impl serde::Serialize for BatchResponse<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            BatchResponse::Whole(v) => v.serialize(serializer),
            BatchResponse::Derived { kept, results } => {
                // `results` sorts after every kept field, as in a `Value` map.
                let mut map = serializer.serialize_map(Some(kept.len() + 1))?;
                for (k, v) in kept {
                    map.serialize_entry(k, v)?;
                }
                map.serialize_entry("results", results)?;
                map.end()
            }
        }
    }
}

impl serde::Serialize for Results<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.messages.len()))?;
        let mut rejected = self.rejected.iter().peekable();
        for (i, m) in self.messages.iter().enumerate() {
            match rejected.next_if(|r| r["index"] == i) {
                Some(r) => seq.serialize_element(r)?,
                None => {
                    let intent = match self.items {
                        Some(items) => items[i],
                        None => self.batch.item(i as u32),
                    };
                    let message_id = MessageId::derive(intent, &m.to);
                    seq.serialize_element(&AcceptedResult {
                        index: i,
                        intent_id: intent,
                        message_id,
                        status: "accepted",
                    })?
                }
            }
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(addresses: &[&str]) -> Vec<MessageRequest> {
        addresses
            .iter()
            .map(|to| {
                validate::parse(
                    json!({ "to": to, "from": "shop@example.com", "content": { "text": "hi" } }).to_string().as_bytes(),
                )
                .expect("a message")
            })
            .collect()
    }

    /// The response as the batch built it whole, each result in order.
    fn whole(batch: IntentId, messages: &[MessageRequest], rejected: &[usize]) -> Value {
        let results: Vec<Value> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if rejected.contains(&i) {
                    json!({ "index": i, "status": "rejected", "errors": [{ "field": "to", "detail": format!("bad {i}") }] })
                } else {
                    let intent = batch.item(i as u32);
                    json!({ "index": i, "status": "accepted", "intent_id": intent, "message_id": MessageId::derive(intent, &m.to) })
                }
            })
            .collect();
        json!({ "batch_id": batch, "accepted": messages.len() - rejected.len(), "rejected": rejected.len(), "results": results })
    }

    #[test]
    fn a_batch_kept_without_its_accepted_results_is_replayed_as_it_was_answered() {
        let list = messages(&["a@example.com", "b@example.com", "c@example.com", "d@example.com", "e@example.com"]);
        for rejected in [vec![], vec![0], vec![2], vec![4], vec![0, 1, 3], vec![1, 2, 3, 4]] {
            let batch = IntentId::fresh();
            let answered = whole(batch, &list, &rejected);
            let kept = json!({
                "batch_id": batch,
                "accepted": list.len() - rejected.len(),
                "rejected": rejected.len(),
                KEPT_REJECTED: answered["results"].as_array().unwrap().iter().filter(|r| r["status"] == "rejected").collect::<Vec<_>>(),
            });
            assert!(kept.to_string().len() < 200 + 80 * rejected.len(), "kept small: {kept}");
            let items: Vec<IntentId> = (0..list.len() as u32).map(|i| batch.item(i)).collect();
            for ids in [None, Some(items.as_slice())] {
                // Byte for byte as the `Value` would have been written.
                let written = serde_json::to_string(&replayed(kept.clone(), &list, ids)).expect("json");
                assert_eq!(written, answered.to_string(), "rejected {rejected:?}, ids given: {}", ids.is_some());
            }
        }
    }

    #[test]
    fn a_batch_response_kept_whole_is_replayed_unchanged() {
        let list = messages(&["a@example.com", "b@example.com"]);
        let answered = whole(IntentId::fresh(), &list, &[1]);
        let written = serde_json::to_string(&replayed(answered.clone(), &list, None)).expect("json");
        assert_eq!(written, answered.to_string());
    }
}
