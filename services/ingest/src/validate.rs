//! Request bodies and their validation. A request that fails here produces
//! nothing.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ledger_schemas::{Channel, Content, Priority, Recipient};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::problem::{ApiError, FieldError};

pub const MAX_SUBJECT_BYTES: usize = 998;
pub const MAX_PART_BYTES: usize = 256 * 1024;
pub const MAX_VARIABLES_BYTES: usize = 16 * 1024;
pub const MAX_NAME_BYTES: usize = 200;
/// Field errors reported for one request; past this, the count is given.
pub const MAX_REPORTED_ERRORS: usize = 50;

/// `POST /v1/messages`: one message to one recipient.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    /// `email` (default), `webhook` or `push`.
    #[serde(default = "default_channel")]
    pub channel: Channel,
    /// Sender address (email).
    #[serde(default)]
    pub from: Option<String>,
    /// Email address, or the endpoint URL for webhook and push.
    pub to: String,
    /// Template variables of this recipient.
    #[serde(default)]
    pub variables: BTreeMap<String, Value>,
    /// Inline content (templates in minijinja syntax)...
    #[serde(default)]
    pub content: Option<Content>,
    /// ...or a published template; without a version, the latest one is
    /// pinned at acceptance.
    #[serde(default)]
    pub template: Option<TemplateSelector>,
    #[serde(default)]
    pub priority: Priority,
    /// Deliver no earlier than this (RFC 3339), at most 30 days ahead.
    #[serde(default)]
    pub send_at: Option<DateTime<Utc>>,
}

/// A published template by name, and optionally version.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateSelector {
    pub name: String,
    #[serde(default)]
    pub version: Option<u32>,
}

/// `POST /v1/templates`: publish a new immutable version of a template.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateRequest {
    /// `[a-z0-9][a-z0-9._-]*`, at most 100 characters.
    pub name: String,
    #[serde(default = "default_channel")]
    pub channel: Channel,
    pub content: Content,
}

/// `POST /v1/messages/batch`: independent messages, each with its own result.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub messages: Vec<MessageRequest>,
}

/// What a campaign says once for all its recipients. In the NDJSON form this
/// is the first line, and every further line is one `Recipient`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CampaignHeader {
    /// A name for reports.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_channel")]
    pub channel: Channel,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub template: Option<TemplateSelector>,
    /// Campaigns default to bulk.
    #[serde(default = "bulk")]
    pub priority: Priority,
    #[serde(default)]
    pub send_at: Option<DateTime<Utc>>,
}

/// `POST /v1/campaigns` as one JSON document.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CampaignRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_channel")]
    pub channel: Channel,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub template: Option<TemplateSelector>,
    #[serde(default = "bulk")]
    pub priority: Priority,
    #[serde(default)]
    pub send_at: Option<DateTime<Utc>>,
    pub recipients: Vec<Recipient>,
}

impl CampaignRequest {
    /// The header and the recipients, as in the NDJSON form.
    pub fn split(self) -> (CampaignHeader, Vec<Recipient>) {
        let header = CampaignHeader {
            name: self.name,
            channel: self.channel,
            from: self.from,
            content: self.content,
            template: self.template,
            priority: self.priority,
            send_at: self.send_at,
        };
        (header, self.recipients)
    }
}

/// `POST /v1/campaigns/{id}/cancel`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

fn default_channel() -> Channel {
    Channel::Email
}

fn bulk() -> Priority {
    Priority::Bulk
}

/// Parses a JSON body, reporting the path of the offending field.
pub fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    parse_at(bytes, "").map_err(|e| ApiError::InvalidBody(vec![e]))
}

/// Parses one JSON value; the error's field path starts with `prefix`.
pub fn parse_at<T: serde::de::DeserializeOwned>(bytes: &[u8], prefix: &str) -> Result<T, FieldError> {
    // The plain parser is faster; the path-tracking one runs only to explain
    // a failure.
    if let Ok(v) = serde_json::from_slice(bytes) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        FieldError { field: join(prefix, &path), detail: e.inner().to_string() }
    })
}

pub fn join(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, _) => field.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}.{field}"),
    }
}

/// A pragmatic address check: what providers accept, not all of RFC 5322.
pub fn email_problem(address: &str) -> Option<&'static str> {
    if address.len() > 254 {
        return Some("longer than 254 characters");
    }
    if address.is_ascii() {
        return ascii_email_problem(address.as_bytes());
    }
    any_email_problem(address)
}

/// [`email_problem`] of any address, within the length bound.
fn any_email_problem(address: &str) -> Option<&'static str> {
    if address.chars().any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>' || c == ',') {
        return Some("contains whitespace or a character not allowed in an address");
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Some("has no @");
    };
    if local.is_empty() || local.len() > 64 || local.contains('@') {
        return Some("has an invalid local part");
    }
    let mut labels = 0;
    for l in domain.split('.') {
        labels += 1;
        if l.is_empty()
            || l.len() > 63
            || l.starts_with('-')
            || l.ends_with('-')
            || !l.chars().all(|c| c.is_alphanumeric() || c == '-')
        {
            return Some("has an invalid domain");
        }
    }
    if labels < 2 {
        return Some("has an invalid domain");
    }
    None
}

/// [`email_problem`] of an ASCII address (most addresses; a campaign
/// checks a million): the same answers, in the same order of precedence.
/// The classes of its bytes are gathered without a branch per byte, and
/// its @ found by a search; only the domain's labels are walked.
fn ascii_email_problem(a: &[u8]) -> Option<&'static str> {
    let classes = |bytes: &[u8]| bytes.iter().fold(0u8, |seen, &b| seen | ASCII_CLASS[b as usize]);
    if classes(a) & BAD != 0 {
        return Some("contains whitespace or a character not allowed in an address");
    }
    let Some(at) = memchr::memrchr(b'@', a) else {
        return Some("has no @");
    };
    if at == 0 || at > 64 || memchr::memchr(b'@', &a[..at]).is_some() {
        return Some("has an invalid local part");
    }
    let domain = &a[at + 1..];
    let mut labels = 0;
    let fine = classes(domain) & LOCAL_ONLY == 0
        && domain.split(|&b| b == b'.').all(|l| {
            labels += 1;
            label_ok(l)
        });
    if !(fine && labels >= 2) {
        return Some("has an invalid domain");
    }
    None
}

/// A domain label's length and ends (its bytes are checked apart).
fn label_ok(l: &[u8]) -> bool {
    !l.is_empty() && l.len() <= 63 && l[0] != b'-' && l[l.len() - 1] != b'-'
}

/// What a byte of an ASCII address is to [`ascii_email_problem`], as a bit:
/// a domain's byte (a letter, a digit or `-`), a dot, an @, a byte never
/// allowed, or one allowed in the local part only.
const DOMAIN: u8 = 1;
const DOT: u8 = 2;
const AT: u8 = 4;
const BAD: u8 = 8;
const LOCAL_ONLY: u8 = 16;
const ASCII_CLASS: [u8; 256] = {
    let mut class = [LOCAL_ONLY; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        class[b] = if c <= b' ' || c == 0x7f || c == b'<' || c == b'>' || c == b',' {
            BAD
        } else if c.is_ascii_alphanumeric() || c == b'-' {
            DOMAIN
        } else if c == b'.' {
            DOT
        } else if c == b'@' {
            AT
        } else {
            LOCAL_ONLY
        };
        b += 1;
    }
    class
};

/// Webhook and push recipients are endpoint URLs.
pub fn url_problem(url: &str) -> Option<&'static str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    match rest {
        None => Some("must be an http(s) URL"),
        Some(_) if url.len() > 2048 => Some("longer than 2048 characters"),
        Some(r) if r.is_empty() || r.starts_with('/') => Some("has no host"),
        Some(_) if url.chars().any(|c| c.is_whitespace() || c.is_control()) => Some("contains whitespace"),
        _ => None,
    }
}

pub struct Errors {
    pub list: Vec<FieldError>,
    pub total: usize,
}

impl Errors {
    pub fn new() -> Self {
        Errors { list: Vec::new(), total: 0 }
    }

    pub fn add(&mut self, field: String, detail: String) {
        self.total += 1;
        if self.list.len() < MAX_REPORTED_ERRORS {
            self.list.push(FieldError { field, detail });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Adds `later`'s errors after these, as if added one by one.
    pub fn extend(&mut self, later: Errors) {
        let room = MAX_REPORTED_ERRORS.saturating_sub(self.list.len());
        self.list.extend(later.list.into_iter().take(room));
        self.total += later.total;
    }

    pub fn into_result(mut self) -> Result<(), ApiError> {
        if self.total == 0 {
            return Ok(());
        }
        if self.total > self.list.len() {
            let more = self.total - self.list.len();
            self.list.push(FieldError { field: String::new(), detail: format!("and {more} more errors") });
        }
        Err(ApiError::Validation(self.list))
    }
}

impl Default for Errors {
    fn default() -> Self {
        Self::new()
    }
}

pub fn check_recipient(
    errors: &mut Errors,
    at: &str,
    channel: Channel,
    address: &str,
    variables: &BTreeMap<String, Value>,
) {
    if let Some(p) = address_problem(channel, address) {
        errors.add(join(at, "address"), p);
    }
    if !variables.is_empty() {
        let size = serde_json::to_vec(variables).map(|v| v.len()).unwrap_or(usize::MAX);
        if let Some(p) = variables_problem(size) {
            errors.add(join(at, "variables"), p);
        }
    }
}

/// What is wrong with a recipient's address on `channel`, if anything.
pub fn address_problem(channel: Channel, address: &str) -> Option<String> {
    match channel {
        Channel::Email => email_problem(address).map(|p| format!("not a valid email address: {p}")),
        Channel::Webhook | Channel::Push => url_problem(address).map(|p| format!("not a valid endpoint: {p}")),
    }
}

/// Variables of `size` bytes (compact JSON) are too large.
pub fn variables_problem(size: usize) -> Option<String> {
    (size > MAX_VARIABLES_BYTES).then(|| format!("{size} bytes, more than {MAX_VARIABLES_BYTES}"))
}

/// Checks what an intent says besides its recipients: exactly one of
/// inline content and template, the sender, the schedule.
pub fn check_common(
    errors: &mut Errors,
    at: &str,
    channel: Channel,
    from: Option<&str>,
    content: Option<&Content>,
    template: Option<&TemplateSelector>,
    send_at: Option<DateTime<Utc>>,
) {
    if let Some(from) = from {
        if let Some(p) = email_problem(from) {
            errors.add(join(at, "from"), format!("not a valid email address: {p}"));
        }
    }
    if let Some(at_time) = send_at {
        let now = Utc::now();
        if at_time > now + chrono::Duration::days(30) {
            errors.add(join(at, "send_at"), "more than 30 days ahead".into());
        } else if at_time < now - chrono::Duration::days(1) {
            errors.add(join(at, "send_at"), "more than a day in the past".into());
        }
    }
    match (content, template) {
        (Some(c), None) => check_content(errors, at, channel, c),
        (None, Some(t)) => {
            if let Some(p) = template_name_problem(&t.name) {
                errors.add(join(at, "template.name"), p.into());
            }
        }
        (Some(_), Some(_)) => errors.add(join(at, "template"), "give content or a template, not both".into()),
        (None, None) => errors.add(join(at, "content"), "give content or a template".into()),
    }
}

pub fn template_name_problem(name: &str) -> Option<&'static str> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && matches!(b, b'.' | b'_' | b'-')));
    (!ok).then_some("use 1-100 characters a-z, 0-9, '.', '_' or '-', starting with a letter or digit")
}

/// The content itself: the parts the channel needs, sizes, and templates
/// that compile (a syntax error is refused here, not found at render time).
pub fn check_content(errors: &mut Errors, at: &str, channel: Channel, content: &Content) {
    let text = content.text.as_deref().unwrap_or("");
    let html = content.html.as_deref().unwrap_or("");
    match channel {
        Channel::Email => {
            match &content.subject {
                None => errors.add(join(at, "content.subject"), "an email needs a subject".into()),
                Some(s) if s.trim().is_empty() => {
                    errors.add(join(at, "content.subject"), "the subject is empty".into())
                }
                Some(s) if s.len() > MAX_SUBJECT_BYTES => {
                    errors.add(join(at, "content.subject"), format!("longer than {MAX_SUBJECT_BYTES} bytes"))
                }
                Some(s) if s.contains(['\r', '\n']) => {
                    errors.add(join(at, "content.subject"), "contains a line break".into())
                }
                _ => {}
            }
            if text.trim().is_empty() && html.trim().is_empty() {
                errors.add(join(at, "content"), "give a text part, an html part or both".into());
            }
            if content.json.is_some() {
                errors.add(join(at, "content.json"), "json content is for webhook and push".into());
            }
        }
        Channel::Webhook | Channel::Push => {
            if content.json.is_none() && text.trim().is_empty() {
                errors.add(join(at, "content"), "give json (or text) content".into());
            }
        }
    }
    for (field, part) in [("content.text", text), ("content.html", html)] {
        if part.len() > MAX_PART_BYTES {
            errors.add(join(at, field), format!("longer than {MAX_PART_BYTES} bytes"));
        }
    }
    if let Some(json) = &content.json {
        if serde_json::to_vec(json).map(|v| v.len()).unwrap_or(usize::MAX) > MAX_PART_BYTES {
            errors.add(join(at, "content.json"), format!("larger than {MAX_PART_BYTES} bytes"));
        }
    }
    if errors.is_empty() {
        if let Err(e) = compiles(content) {
            errors.add(join(at, "content"), e);
        }
    }
}

/// Whether `content` compiles, remembered by content hash: most requests
/// reuse the content of earlier ones, and compiling (with CSS inlining) is
/// the dearest part of validation.
fn compiles(content: &Content) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    const REMEMBERED: usize = 4096;
    type Verdicts = HashMap<[u8; 32], Result<(), String>>;
    static SEEN: OnceLock<Mutex<Verdicts>> = OnceLock::new();
    let key: [u8; 32] = Sha256::digest(serde_json::to_vec(content).unwrap_or_default()).into();
    let seen = SEEN.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(known) = seen.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return known;
    }
    let result =
        ledger_templating::Templates::compile(content).map(|_| ()).map_err(|e| format!("{}: {}", e.code, e.reason));
    if let Ok(mut m) = seen.lock() {
        if m.len() >= REMEMBERED {
            m.clear();
        }
        m.insert(key, result.clone());
    }
    result
}

impl MessageRequest {
    pub fn check(&self, errors: &mut Errors, at: &str) {
        check_common(
            errors,
            at,
            self.channel,
            self.from.as_deref(),
            self.content.as_ref(),
            self.template.as_ref(),
            self.send_at,
        );
        let mut inner = Errors::new();
        check_recipient(&mut inner, "", self.channel, &self.to, &self.variables);
        // A single message names its recipient `to`, not `address`.
        for e in inner.list {
            let field = if e.field == "address" { join(at, "to") } else { join(at, &e.field) };
            errors.add(field, e.detail);
        }
    }

    pub fn validate(&self) -> Result<(), ApiError> {
        let mut errors = Errors::new();
        self.check(&mut errors, "");
        errors.into_result()
    }
}

impl CampaignHeader {
    pub fn check(&self, errors: &mut Errors) {
        check_common(
            errors,
            "",
            self.channel,
            self.from.as_deref(),
            self.content.as_ref(),
            self.template.as_ref(),
            self.send_at,
        );
        if let Some(name) = &self.name {
            if name.len() > MAX_NAME_BYTES {
                errors.add("name".into(), format!("longer than {MAX_NAME_BYTES} bytes"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// The one-pass check of ASCII addresses answers as the general one.
        #[test]
        fn ascii_addresses_get_the_general_checks_answer(address in "[a-c@.<>, \t\x00\x7f-]{0,12}|[a-z0-9._-]{0,70}@[a-z0-9.-]{0,70}|[a-z+_.@]{0,4}@[a-zA-Z_-]{0,66}(\\.[a-z0-9-]{0,66}){0,3}|[a-z]{60,66}@[a-z]{60,66}\\.[a-z-]{1,3}") {
            proptest::prop_assert_eq!(ascii_email_problem(address.as_bytes()), any_email_problem(&address), "{:?}", address);
        }
    }

    use super::*;

    #[test]
    fn ordinary_addresses_pass_and_broken_ones_do_not() {
        assert_eq!(email_problem("ann.lee+x@mail.example.com"), None);
        for bad in ["", "ann", "@example.com", "ann@", "ann@example", "a b@example.com", "ann@-x.com", "ann@ex..com"] {
            assert!(email_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        assert_eq!(url_problem("https://hooks.example.com/x"), None);
        for bad in ["ftp://x", "https://", "hooks.example.com", "https:// x"] {
            assert!(url_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let err = parse::<MessageRequest>(br#"{"to":"a@example.com","content":{"subject":"s","text":"t","bcc":1}}"#)
            .unwrap_err();
        match err {
            ApiError::InvalidBody(e) => assert_eq!(e[0].field, "content.bcc"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn too_many_errors_are_counted_not_listed() {
        let mut e = Errors::new();
        for i in 0..(MAX_REPORTED_ERRORS + 7) {
            e.add(format!("recipients[{i}].address"), "bad".into());
        }
        match e.into_result() {
            Err(ApiError::Validation(list)) => {
                assert_eq!(list.len(), MAX_REPORTED_ERRORS + 1);
                assert_eq!(list.last().unwrap().detail, "and 7 more errors");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
