//! What every endpoint reads from a request: the tenant, the idempotency
//! key, the correlation id and the body.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use ledger_schemas::TenantId;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::problem::{ApiError, FieldError};
use crate::AppState;

pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const HEADER_CORRELATION_ID: &str = "x-correlation-id";

pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    state.auth.tenant(&state.ops, key.trim()).await?.ok_or(ApiError::Unauthorized)
}

/// What every submission starts with: who asks, under which key, with
/// which correlation id; the body is left to the endpoint.
pub struct Submission {
    pub tenant: TenantId,
    pub key: String,
    pub correlation: String,
    pub headers: HeaderMap,
    pub body: Body,
}

pub async fn submission(state: &AppState, request: axum::extract::Request) -> Result<Submission, ApiError> {
    let (parts, body) = request.into_parts();
    let tenant = authenticate(state, &parts.headers).await?;
    let key = idempotency_key(&parts.headers)?;
    let correlation = correlation_id(&parts.headers);
    Ok(Submission { tenant, key, correlation, headers: parts.headers, body })
}

/// A submission's JSON body, refused unless it is JSON and within `limit`.
pub async fn json_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    require_json(headers)?;
    read_body(body, limit).await
}

pub fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers.get(HEADER_IDEMPOTENCY_KEY).ok_or_else(|| ApiError::IdempotencyKey("it is missing".into()))?;
    let key = value.to_str().map_err(|_| ApiError::IdempotencyKey("it must be printable ASCII".into()))?.trim();
    if key.is_empty() || key.len() > 255 {
        return Err(ApiError::IdempotencyKey("it must be 1 to 255 characters".into()));
    }
    Ok(key.to_owned())
}

pub fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get(HEADER_CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Ndjson,
}

pub fn body_kind(headers: &HeaderMap) -> Option<BodyKind> {
    let mime = headers.get(header::CONTENT_TYPE)?.to_str().ok()?.split(';').next()?.trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Some(BodyKind::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Some(BodyKind::Ndjson),
        _ => None,
    }
}

pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match body_kind(headers) {
        Some(BodyKind::Json) => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType("application/json")),
    }
}

pub async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    axum::body::to_bytes(body, limit).await.map(|b| b.to_vec()).map_err(|_| ApiError::TooLarge(limit))
}

/// SHA-256 of the body's canonical JSON (keys sorted, no whitespace): the
/// same request with other formatting is the same request.
///
/// The canonical form is written while the body is read, without building
/// a `serde_json::Value` (a tree of maps: a tenth of the ingest API's time
/// on a batch of 1,000 messages went there). It is byte for byte what
/// `serde_json::to_vec(&serde_json::from_slice::<Value>(body))` gives, so
/// the hashes stored with idempotency keys stay valid (a test compares
/// the two).
pub fn canonical_hash(bytes: &[u8]) -> Result<Vec<u8>, ApiError> {
    let canonical = canonical_json(bytes)
        .map_err(|e| ApiError::InvalidBody(vec![FieldError { field: String::new(), detail: e.to_string() }]))?;
    Ok(Sha256::digest(&canonical).to_vec())
}

/// `bytes` as canonical JSON: object keys in byte order, the last of
/// duplicate keys kept, numbers and strings as serde_json writes them.
pub fn canonical_json(bytes: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut out = Vec::with_capacity(bytes.len());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Canonical(&mut out).deserialize(&mut de)?;
    de.end()?;
    Ok(out)
}

/// Writes the value it reads, canonically, into its buffer.
struct Canonical<'o>(&'o mut Vec<u8>);

impl<'de> serde::de::DeserializeSeed<'de> for Canonical<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Canonical<'_> {
    fn number<E: serde::de::Error>(self, n: serde_json::Number) -> Result<(), E> {
        serde_json::to_writer(&mut *self.0, &n).map_err(E::custom)
    }
}

impl<'de> serde::de::Visitor<'de> for Canonical<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.0.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.number(v.into())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.number(v.into())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        // As `Value` does: a float JSON cannot hold becomes null.
        match serde_json::Number::from_f64(v) {
            Some(n) => self.number(n),
            None => self.visit_unit(),
        }
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        serde_json::to_writer(&mut *self.0, v).map_err(E::custom)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push(b'[');
        let mut first = true;
        loop {
            let mark = self.0.len();
            if !first {
                self.0.push(b',');
            }
            if seq.next_element_seed(Canonical(&mut *self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            first = false;
        }
        self.0.push(b']');
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Each value is written once into `values`; the entries are then
        // put in key order and copied out.
        let mut values: Vec<u8> = Vec::new();
        let mut entries: Vec<(std::borrow::Cow<'de, str>, std::ops::Range<usize>)> = Vec::new();
        while let Some(key) = map.next_key_seed(Key)? {
            let start = values.len();
            map.next_value_seed(Canonical(&mut values))?;
            entries.push((key, start..values.len()));
        }
        // Stable: of equal keys the last one read comes last, and is kept.
        entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        self.0.push(b'{');
        let mut first = true;
        for (i, (key, range)) in entries.iter().enumerate() {
            if entries.get(i + 1).is_some_and(|next| next.0 == *key) {
                continue;
            }
            if !first {
                self.0.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut *self.0, key.as_ref()).map_err(serde::de::Error::custom)?;
            self.0.push(b':');
            self.0.extend_from_slice(&values[range.clone()]);
        }
        self.0.push(b'}');
        Ok(())
    }
}

/// An object key, borrowed from the body where it has no escapes.
struct Key;

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v))
    }
}

/// One path parameter. A segment that is not valid percent-encoded UTF-8
/// names nothing here: a 404 problem+json, where axum's own rejection would
/// be a plain-text 400.
pub struct Segment(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Segment {
    type Rejection = crate::problem::ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(segment)) => Ok(Segment(segment)),
            Err(_) => Err(crate::problem::ApiError::NotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the hash was computed from before: a `Value`, written out.
    fn by_value(bytes: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(bytes)?)
    }

    #[test]
    fn canonical_json_is_what_a_value_writes() {
        let cases: &[&str] = &[
            r#"{"b":1,"a":[true,false,null,{"z":"x","y":-2}],"c":{}}"#,
            "  { \"messages\" : [ { \"to\":\"a@b.c\", \"n\": 1.50, \"e\": 1e3, \"big\": 18446744073709551615 } ] }\n",
            r#"{"k":1,"k":2,"j":[],"\u00e9t\u00e9":"\ud83d\ude00 \"q\" \\ \n\t\u0001"}"#,
            r#"{"b":{"y":1,"x":2},"a":{"d":[1,[2,[3]]],"c":-0.0,"e":-9223372036854775808}}"#,
            "[]",
            "\"just a string\"",
            "12.000",
            r#"{"Z":1,"a":2,"_":3,"ä":4,"A":5}"#,
        ];
        for case in cases {
            assert_eq!(
                String::from_utf8(canonical_json(case.as_bytes()).expect("canonical")).unwrap(),
                String::from_utf8(by_value(case.as_bytes()).expect("value")).unwrap(),
                "{case}"
            );
        }
    }

    #[test]
    fn invalid_json_is_refused_as_before() {
        for bad in ["", "{", r#"{"a":1} x"#, r#"{"a":}"#, "[1,]", r#"{"a" 1}"#, "nul", "\"\\x\""] {
            assert!(canonical_json(bad.as_bytes()).is_err(), "{bad:?}");
            assert!(by_value(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(canonical_json(deep.as_bytes()).is_err(), "nesting past serde_json's limit");
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::vec((".{0,6}", inner), 0..6)
                    .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Writes `v` with its object keys in the order given by `rotate` (not
    /// sorted) and some whitespace, as a client might.
    fn unsorted(v: &serde_json::Value, rotate: usize, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                if !entries.is_empty() {
                    let n = rotate % entries.len();
                    entries.rotate_left(n);
                }
                out.push_str("{ ");
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(" ,\n");
                    }
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push_str(" : ");
                    unsorted(v, rotate + 1, out);
                }
                out.push('}');
            }
            serde_json::Value::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    unsorted(v, rotate + 1, out);
                }
                out.push(']');
            }
            other => out.push_str(&serde_json::to_string(other).unwrap()),
        }
    }

    proptest! {
        #[test]
        fn any_document_hashes_as_its_value_did(v in json_value(), rotate in 0usize..7) {
            let mut text = String::new();
            unsorted(&v, rotate, &mut text);
            // (Not always `to_vec(&v)`: serde_json reads some floats back
            // one unit off in the last place, both ways alike.)
            prop_assert_eq!(canonical_json(text.as_bytes()).unwrap(), by_value(text.as_bytes()).unwrap());
        }
    }
}
