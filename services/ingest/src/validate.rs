//! Request bodies and their validation. A request that fails here produces
//! nothing.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ledger_schemas::{Channel, Content, Priority};
use serde::Deserialize;
use serde_json::Value;

use crate::problem::{ApiError, FieldError};

pub const MAX_SUBJECT_BYTES: usize = 998;
pub const MAX_PART_BYTES: usize = 512 * 1024;
pub const MAX_VARIABLES_BYTES: usize = 16 * 1024;

/// `POST /v1/messages`: one message to one recipient.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    #[serde(default = "default_channel")]
    pub channel: Channel,
    #[serde(default)]
    pub from: Option<String>,
    pub to: String,
    #[serde(default)]
    pub variables: BTreeMap<String, Value>,
    pub content: Content,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub send_at: Option<DateTime<Utc>>,
}

fn default_channel() -> Channel {
    Channel::Email
}

/// Parses a JSON body, reporting the path of the first offending field.
pub fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::InvalidBody(vec![FieldError {
            field: if path == "." { String::new() } else { path },
            detail: e.inner().to_string(),
        }])
    })
}

/// A pragmatic address check: what providers accept, not all of RFC 5322.
pub fn email_problem(address: &str) -> Option<&'static str> {
    if address.len() > 254 {
        return Some("longer than 254 characters");
    }
    if address.chars().any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>' || c == ',') {
        return Some("contains whitespace or a character not allowed in an address");
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Some("has no @");
    };
    if local.is_empty() || local.len() > 64 || local.contains('@') {
        return Some("has an invalid local part");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2
        || labels.iter().any(|l| {
            l.is_empty()
                || l.len() > 63
                || l.starts_with('-')
                || l.ends_with('-')
                || !l.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
    {
        return Some("has an invalid domain");
    }
    None
}

impl SendMessage {
    pub fn validate(&self) -> Result<(), ApiError> {
        let mut errors = Vec::new();
        let mut err = |field: &str, detail: String| errors.push(FieldError { field: field.into(), detail });
        if self.channel != Channel::Email {
            err("channel", format!("channel {} is not available yet; use email", self.channel.as_str()));
        }
        if let Some(p) = email_problem(&self.to) {
            err("to", format!("not a valid email address: {p}"));
        }
        if let Some(from) = &self.from {
            if let Some(p) = email_problem(from) {
                err("from", format!("not a valid email address: {p}"));
            }
        }
        match &self.content.subject {
            None => err("content.subject", "an email needs a subject".into()),
            Some(s) if s.trim().is_empty() => err("content.subject", "the subject is empty".into()),
            Some(s) if s.len() > MAX_SUBJECT_BYTES => {
                err("content.subject", format!("longer than {MAX_SUBJECT_BYTES} bytes"))
            }
            Some(s) if s.contains(['\r', '\n']) => err("content.subject", "contains a line break".into()),
            _ => {}
        }
        let text = self.content.text.as_deref().unwrap_or("");
        let html = self.content.html.as_deref().unwrap_or("");
        if text.trim().is_empty() && html.trim().is_empty() {
            err("content", "give a text part, an html part or both".into());
        }
        for (field, part) in [("content.text", text), ("content.html", html)] {
            if part.len() > MAX_PART_BYTES {
                err(field, format!("longer than {MAX_PART_BYTES} bytes"));
            }
        }
        let vars_len = serde_json::to_vec(&self.variables).map(|v| v.len()).unwrap_or(0);
        if vars_len > MAX_VARIABLES_BYTES {
            err("variables", format!("larger than {MAX_VARIABLES_BYTES} bytes"));
        }
        if let Some(at) = self.send_at {
            if at > Utc::now() + chrono::Duration::days(30) {
                err("send_at", "more than 30 days ahead".into());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_addresses_pass_and_broken_ones_do_not() {
        assert_eq!(email_problem("ann.lee+x@mail.example.com"), None);
        for bad in ["", "ann", "@example.com", "ann@", "ann@example", "a b@example.com", "ann@-x.com", "ann@ex..com"] {
            assert!(email_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let err = parse::<SendMessage>(br#"{"to":"a@example.com","content":{"subject":"s","text":"t","bcc":1}}"#)
            .unwrap_err();
        match err {
            ApiError::InvalidBody(e) => assert_eq!(e[0].field, "content.bcc"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
