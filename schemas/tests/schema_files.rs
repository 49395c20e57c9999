//! The committed schema files under `schemas/events/` and the Rust types
//! must agree. Run with `UPDATE_SCHEMAS=1` after a deliberate change to
//! rewrite the files; a new version of an event is a new file.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::Utc;
use ledger_schemas::events::*;
use ledger_schemas::ids::*;
use serde_json::Value;
use uuid::Uuid;

fn schema_path(kind: EventKind) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("events").join(format!("{}.json", kind.type_name()))
}

#[test]
fn every_event_type_has_a_schema_file_that_matches_its_rust_type() {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut stale = Vec::new();
    for kind in EventKind::ALL {
        let generated = kind.json_schema();
        let path = schema_path(kind);
        if update {
            let mut text = serde_json::to_string_pretty(&generated).unwrap();
            text.push('\n');
            std::fs::write(&path, text).unwrap();
            continue;
        }
        let committed: Value = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
            Err(_) => {
                stale.push(format!("{} is missing", path.display()));
                continue;
            }
        };
        if committed != generated {
            stale.push(format!("{} differs from the Rust type", path.display()));
        }
    }
    assert!(stale.is_empty(), "schema files out of date (rerun with UPDATE_SCHEMAS=1 if intended): {stale:#?}");
}

#[test]
fn there_is_no_schema_file_without_an_event_type() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("events");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let type_name = name.strip_suffix(".json").unwrap_or(&name);
        assert!(EventKind::from_type_name(type_name).is_some(), "orphan schema file {name}");
    }
}

fn sample(body: EventBody) -> Event {
    Event {
        event_id: EventId(Uuid::from_u128(1)),
        body,
        tenant_id: TenantId::parse("acme").unwrap(),
        intent_id: IntentId(Uuid::from_u128(2)),
        message_id: Some(MessageId(Uuid::from_u128(3))),
        occurred_at: Utc::now(),
        correlation_id: "corr".into(),
    }
}

fn samples() -> Vec<Event> {
    let content = Content { subject: Some("Hi {{ name }}".into()), text: Some("t".into()), html: None, json: None };
    let mut vars = BTreeMap::new();
    vars.insert("name".to_owned(), Value::from("Ann"));
    vec![
        sample(EventBody::IntentAccepted(IntentAccepted {
            template: None,
            kind: IntentKind::Single,
            name: None,
            channel: Channel::Email,
            priority: Priority::Bulk,
            from: Some("a@b.c".into()),
            recipient_count: 1,
            batch_count: 1,
            send_at: Some(Utc::now()),
            request_hash: "ab".into(),
        })),
        sample(EventBody::RecipientBatch(RecipientBatch {
            template: None,
            batch_index: 0,
            batch_count: 1,
            channel: Channel::Email,
            priority: Priority::Transactional,
            from: None,
            content: content.clone(),
            recipients: vec![Recipient { address: "x@y.z".into(), variables: vars }],
            send_at: None,
        })),
        sample(EventBody::MessageRendered(MessageRendered {
            channel: Channel::Email,
            priority: Priority::Transactional,
            recipient: "x@y.z".into(),
            from: Some("a@b.c".into()),
            subject: Some("s".into()),
            text: Some("t".into()),
            html: Some("<p>h</p>".into()),
            json: None,
        })),
        sample(EventBody::IntentCancelled(IntentCancelled { reason: Some("mistake".into()) })),
        sample(EventBody::MessageCancelled(MessageCancelled {
            channel: Channel::Email,
            recipient: "x@y.z".into(),
            attempt: Some(2),
        })),
        sample(EventBody::RenderFailed(RenderFailed {
            channel: Channel::Email,
            recipient: "x@y.z".into(),
            code: "undefined_variable".into(),
            reason: "name is undefined".into(),
        })),
        sample(EventBody::DeliveryAttempted(DeliveryAttempted {
            attempt: 1,
            channel: Channel::Email,
            recipient: "x@y.z".into(),
            provider: "sink".into(),
            identity: None,
            rendered_at: Some(Utc::now()),
        })),
        sample(EventBody::Delivered(Delivered {
            attempt: 1,
            provider: "sink".into(),
            provider_message_id: Some("p".into()),
            identity: None,
        })),
        sample(EventBody::DeliveryFailed(DeliveryFailed {
            attempt: 1,
            provider: "sink".into(),
            code: "rejected".into(),
            reason: "no".into(),
            permanent: true,
            identity: None,
            retry_at: None,
        })),
        sample(EventBody::DeliveryAmbiguous(DeliveryAmbiguous {
            attempt: 1,
            provider: "sink".into(),
            reason: "r".into(),
            identity: None,
        })),
        sample(EventBody::Suppressed(Suppressed {
            channel: Channel::Email,
            recipient: "x@y.z".into(),
            reason: SuppressionReason::Sandbox,
            attempt: None,
        })),
        sample(EventBody::DeadLettered(DeadLettered {
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: 5,
            consumer: "renderer".into(),
            code: "malformed_event".into(),
            reason: "r".into(),
            key: Some("k".into()),
            payload: "garbage".into(),
        })),
        sample(EventBody::TemplatePublished(TemplatePublished {
            name: "welcome".into(),
            version: 2,
            channel: Channel::Email,
            content: content.clone(),
        })),
        sample(EventBody::Feedback(Feedback {
            kind: FeedbackKind::Clicked,
            source: "mailgun".into(),
            provider_event_id: "ev-1".into(),
            recipient: "x@y.z".into(),
            permanent: false,
            reported_at: chrono::Utc::now(),
            reason: None,
            url: Some("https://example.com/a".into()),
        })),
    ]
}

/// Checks `value` against `schema` for what our schemas use: required
/// properties, closed objects, types of scalars; `$ref`s into `$defs`.
fn conforms(root: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/$defs/");
        return conforms(root, &root["$defs"][name], value, path, errors);
    }
    if let Some(c) = schema.get("const") {
        if c != value {
            errors.push(format!("{path}: expected {c}, got {value}"));
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        let Some(obj) = value.as_object() else {
            errors.push(format!("{path}: not an object"));
            return;
        };
        for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !obj.contains_key(req.as_str().unwrap()) {
                errors.push(format!("{path}: missing required {req}"));
            }
        }
        for (k, v) in obj {
            match props.get(k) {
                Some(s) => conforms(root, s, v, &format!("{path}.{k}"), errors),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{path}: property {k} not in schema"))
                }
                None => {}
            }
        }
    }
}

#[test]
fn a_sample_of_every_event_type_conforms_to_its_schema_file() {
    let all = samples();
    assert_eq!(all.len(), EventKind::ALL.len(), "one sample per event type");
    for event in all {
        let kind = event.kind();
        let schema: Value = serde_json::from_slice(&std::fs::read(schema_path(kind)).unwrap()).unwrap();
        let value: Value = serde_json::from_slice(&event.to_json()).unwrap();
        let mut errors = Vec::new();
        conforms(&schema, &schema, &value, kind.type_name(), &mut errors);
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(Event::from_json(&event.to_json()).unwrap(), event);
    }
}

/// `Event::from_json` reads the envelope in one pass; whatever it is given,
/// it must agree with the derived decoder: the same event, or an error for
/// both. The inputs are every sample, as written (`type` before `data`),
/// as a `Value` writes it (keys sorted, so `data` first), and mutated:
/// fields removed, replaced by other JSON values, or added.
mod one_pass_decoder {
    use super::*;
    use proptest::prelude::*;

    fn derived(bytes: &[u8]) -> Option<Event> {
        serde_json::from_slice::<Event>(bytes).ok()
    }

    fn odd_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(Value::from(7)),
            Just(Value::from(-1.5)),
            Just(Value::from(true)),
            Just(Value::from("x")),
            Just(Value::from("delivery.delivered.v9")),
            Just(serde_json::json!({})),
            Just(serde_json::json!([1, 2])),
            Just(Value::from("00000000-0000-0000-0000-000000000009")),
            Just(Value::from("2026-12-05T10:00:00Z")),
        ]
    }

    #[derive(Debug, Clone)]
    enum Change {
        Remove { top: bool, pick: usize },
        Replace { top: bool, pick: usize, with: Value },
        Add { top: bool, name: String, with: Value },
        TypeOf { pick: usize },
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (any::<bool>(), any::<usize>()).prop_map(|(top, pick)| Change::Remove { top, pick }),
            (any::<bool>(), any::<usize>(), odd_value()).prop_map(|(top, pick, with)| Change::Replace {
                top,
                pick,
                with
            }),
            (any::<bool>(), "[a-z_]{1,12}", odd_value()).prop_map(|(top, name, with)| Change::Add { top, name, with }),
            any::<usize>().prop_map(|pick| Change::TypeOf { pick }),
        ]
    }

    fn object(v: &mut Value, top: bool) -> Option<&mut serde_json::Map<String, Value>> {
        let target = if top { v } else { v.get_mut("data")? };
        target.as_object_mut()
    }

    fn apply(v: &mut Value, change: &Change) {
        match change {
            Change::Remove { top, pick } => {
                if let Some(m) = object(v, *top) {
                    if let Some(k) = m.keys().nth(pick % m.len().max(1)).cloned() {
                        m.remove(&k);
                    }
                }
            }
            Change::Replace { top, pick, with } => {
                if let Some(m) = object(v, *top) {
                    if let Some(k) = m.keys().nth(pick % m.len().max(1)).cloned() {
                        m.insert(k, with.clone());
                    }
                }
            }
            Change::Add { top, name, with } => {
                if let Some(m) = object(v, *top) {
                    m.insert(name.clone(), with.clone());
                }
            }
            Change::TypeOf { pick } => {
                let kinds = EventKind::ALL;
                v["type"] = Value::from(kinds[pick % kinds.len()].type_name());
            }
        }
    }

    #[test]
    fn every_sample_decodes_as_the_derived_decoder_does() {
        for e in samples() {
            let written = e.to_json();
            assert_eq!(Event::from_json(&written).ok(), Some(e.clone()));
            let sorted = serde_json::to_vec(&serde_json::to_value(&e).unwrap()).unwrap();
            assert_eq!(Event::from_json(&sorted).ok(), Some(e));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn mutated_events_decode_as_the_derived_decoder_does(
            which in any::<usize>(),
            changes in proptest::collection::vec(change(), 0..4),
        ) {
            let all = samples();
            let mut v = serde_json::to_value(&all[which % all.len()]).unwrap();
            for c in &changes {
                apply(&mut v, c);
            }
            let bytes = serde_json::to_vec(&v).unwrap();
            prop_assert_eq!(Event::from_json(&bytes).ok(), derived(&bytes), "{}", String::from_utf8_lossy(&bytes));
        }
    }
}
