//! `POST /v1/campaigns` (one JSON document, or an NDJSON stream: a header
//! line, then one recipient per line) and `POST /v1/campaigns/{id}/cancel`.
//!
//! An NDJSON campaign is never held in memory whole: it is validated line by
//! line while it streams to a spool file, and only when every line is valid
//! is the idempotency key claimed and the spool produced as bounded
//! recipient batches. A refused campaign produces nothing.

use crate::request::Segment;
use std::io::{BufWriter, Seek, Write};
use std::ops::Range;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use ledger_runtime::kafka;
use ledger_schemas::{
    Channel, Event, EventBody, EventId, IntentCancelled, IntentId, IntentKind, Recipient, TenantId, Topic,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use siphasher::sip128::SipHasher13;
use uuid::Uuid;

use crate::problem::{ApiError, FieldError};
use crate::request::{
    authenticate, body_kind, canonical_hash, correlation_id, read_body, submission, BodyKind, Submission,
};
use crate::submit::{self, Batcher, Claim, Envelope, IntentSpec};
use crate::validate::{self, CampaignHeader, CampaignRequest, CancelRequest, Errors};
use crate::{accepted, recipient_line, templates, AppState};

/// Longest NDJSON line (the header line carries the content).
const MAX_LINE_BYTES: usize = 1 << 20;

/// Chunks of a campaign's body received but not yet hashed, at most.
const HASH_QUEUE: usize = 64;

pub async fn submit(State(state): State<Arc<AppState>>, request: Request) -> Response {
    campaign(&state, request).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn cancel(State(state): State<Arc<AppState>>, Segment(id): Segment, request: Request) -> Response {
    cancel_intent(&state, &id, request).await.unwrap_or_else(IntoResponse::into_response)
}

/// Recipients that passed validation, in order, as recipient batches carry
/// them, and how they are cut into batches: producing them is reading and
/// splicing bytes, not parsing.
struct Recipients {
    bytes: RecipientBytes,
    /// The size of each written recipient's JSON; in `bytes` a comma
    /// follows each one.
    sizes: Vec<u32>,
    /// Positions of repeated recipients, ascending: written, never sent.
    dropped: Vec<u32>,
    /// The positions of each batch (repeats inside are skipped).
    batches: Vec<Range<u32>>,
}

impl Recipients {
    fn count(&self) -> usize {
        self.sizes.len() - self.dropped.len()
    }
}

enum RecipientBytes {
    Memory {
        bytes: Vec<u8>,
        at: usize,
    },
    /// An NDJSON campaign's, which is never held in memory whole.
    Spool(std::fs::File),
}

impl RecipientBytes {
    /// Fills `into` with the next bytes.
    fn take(&mut self, into: &mut [u8]) -> Result<(), ApiError> {
        match self {
            RecipientBytes::Memory { bytes, at } => {
                let end = *at + into.len();
                let from = bytes.get(*at..end).ok_or_else(|| ApiError::Internal("recipients end early".into()))?;
                into.copy_from_slice(from);
                *at = end;
                Ok(())
            }
            RecipientBytes::Spool(file) => {
                std::io::Read::read_exact(file, into).map_err(|e| ApiError::Internal(format!("spool: {e}")))
            }
        }
    }
}

/// Collects recipients as they pass validation: writes their JSON, each
/// followed by a comma, and remembers each one's size, and a 128-bit key
/// of its normalised address with its position (28 bytes a line, for at
/// most twice `max` lines). Repeats (one person, one message: the first is
/// kept) are found by sorting those keys at the end: a hash set of a
/// million random keys cost more in cache misses than parsing the lines.
///
/// The key is SipHash-1-3 (128 bits) under a key drawn for each request:
/// the keys are compared only within one campaign, so they need not be
/// stable, and a tenant cannot choose addresses that collide without
/// knowing it. In a profile of the check, SHA-256 took about 2.5 times
/// as long a line.
struct Collector<W> {
    out: W,
    sizes: Vec<u32>,
    keys: Vec<(u64, u64, u32)>,
    hasher: SipHasher13,
    /// Most distinct recipients.
    max: usize,
}

impl<W: Write> Collector<W> {
    fn new(out: W, max: usize) -> Self {
        Collector {
            out,
            sizes: Vec::new(),
            keys: Vec::new(),
            hasher: SipHasher13::new_with_keys(rand::random(), rand::random()),
            max,
        }
    }

    /// Recipient lines taken, repeats included: twice the distinct maximum
    /// (each line costs a few bytes of memory until the end).
    fn max_lines(&self) -> usize {
        self.max.saturating_mul(2).min(u32::MAX as usize)
    }

    fn push(&mut self, address: &str, json: &[u8]) -> Result<(), ApiError> {
        if self.sizes.len() >= self.max_lines() {
            return Err(ApiError::Validation(vec![FieldError {
                field: "recipients".into(),
                detail: format!("more than {} recipient lines, repeats included", self.max_lines()),
            }]));
        }
        let size = u32::try_from(json.len()).map_err(|_| ApiError::Internal("recipient too large".into()))?;
        let key = address_key(&self.hasher, address);
        self.keys.push((key.0, key.1, self.sizes.len() as u32));
        self.sizes.push(size);
        self.out
            .write_all(json)
            .and_then(|()| self.out.write_all(b","))
            .map_err(|e| ApiError::Internal(format!("spool: {e}")))?;
        Ok(())
    }

    /// Takes recipients checked elsewhere, as `push` would one by one:
    /// `out` holds their JSON, each followed by a comma.
    fn extend(&mut self, out: &[u8], sizes: &[u32], keys: &[(u64, u64)]) -> Result<(), ApiError> {
        if self.sizes.len() + sizes.len() > self.max_lines() {
            return Err(ApiError::Validation(vec![FieldError {
                field: "recipients".into(),
                detail: format!("more than {} recipient lines, repeats included", self.max_lines()),
            }]));
        }
        let first = self.sizes.len() as u32;
        self.keys.extend(keys.iter().zip(first..).map(|(k, i)| (k.0, k.1, i)));
        self.sizes.extend_from_slice(sizes);
        self.out.write_all(out).map_err(|e| ApiError::Internal(format!("spool: {e}")))
    }

    /// The output, and the recipients cut into batches bounded by count
    /// and bytes (as [`Batcher`] bounds them) with their repeats skipped.
    fn finish(mut self, max_recipients: usize, max_bytes: usize) -> Result<(W, Recipients), ApiError> {
        // Equal addresses end up together, the first line first.
        sort_keys(&mut self.keys);
        let mut dropped: Vec<u32> =
            self.keys.windows(2).filter(|w| (w[0].0, w[0].1) == (w[1].0, w[1].1)).map(|w| w[1].2).collect();
        drop(std::mem::take(&mut self.keys));
        if self.sizes.len() - dropped.len() > self.max {
            return Err(too_many(self.max));
        }
        dropped.sort_unstable();
        let mut counter: Batcher<()> = Batcher::new(max_recipients, max_bytes);
        let mut batches = Vec::new();
        let mut start = 0u32;
        let mut skip = dropped.iter().peekable();
        for (i, size) in self.sizes.iter().enumerate() {
            let i = i as u32;
            if skip.next_if(|d| **d == i).is_some() {
                continue;
            }
            if counter.push((), *size as usize).is_some() {
                batches.push(start..i);
                start = i;
            }
        }
        if counter.finish().is_some() {
            batches.push(start..self.sizes.len() as u32);
        }
        let recipients = Recipients {
            bytes: RecipientBytes::Memory { bytes: Vec::new(), at: 0 },
            sizes: self.sizes,
            dropped,
            batches,
        };
        Ok((self.out, recipients))
    }
}

/// Sorts keys whose first half is uniformly distributed (a keyed hash): a
/// counting pass on its top bits into buckets of about eight keys, then
/// each bucket sorted. Keys spread unevenly only cost more time.
fn sort_keys(keys: &mut Vec<(u64, u64, u32)>) {
    let n = keys.len();
    if n < 1024 {
        keys.sort_unstable();
        return;
    }
    let bits = (usize::BITS - n.leading_zeros() - 3).min(20);
    let bucket = |k: &(u64, u64, u32)| (k.0 >> (64 - bits)) as usize;
    let mut starts = vec![0u32; (1 << bits) + 1];
    for k in keys.iter() {
        starts[bucket(k) + 1] += 1;
    }
    for i in 1..starts.len() {
        starts[i] += starts[i - 1];
    }
    let mut next = starts.clone();
    let mut sorted = vec![(0u64, 0u64, 0u32); n];
    for k in keys.iter() {
        let b = bucket(k);
        sorted[next[b] as usize] = *k;
        next[b] += 1;
    }
    for w in starts.windows(2) {
        let bucket = &mut sorted[w[0] as usize..w[1] as usize];
        if bucket.len() > 1 {
            bucket.sort_unstable();
        }
    }
    *keys = sorted;
}

/// The 128-bit key of the normalised address (`normalise_recipient`). An
/// ASCII address that is not a URL (an email address, nearly always) is
/// lower-cased on the stack, without building the normalised string.
fn address_key(hasher: &SipHasher13, address: &str) -> (u64, u64) {
    let trimmed = address.trim();
    let url = ["https://", "http://"].iter().any(|s| trimmed.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)));
    let mut lower = [0u8; 256];
    let hash = match lower.get_mut(..trimmed.len()) {
        Some(buf) if !url && trimmed.is_ascii() => {
            buf.copy_from_slice(trimmed.as_bytes());
            buf.make_ascii_lowercase();
            hasher.hash(buf)
        }
        _ => hasher.hash(ledger_schemas::ids::normalise_recipient(address).as_bytes()),
    };
    hash.as_u64()
}

/// Writes `r` as serde writes a [`Recipient`] (the renderer reads it as
/// one), and returns the size of its variables' JSON, which is bounded:
/// one serialisation does both.
pub(crate) fn write_recipient(out: &mut Vec<u8>, r: &Recipient) -> Result<usize, ApiError> {
    let internal = |e: serde_json::Error| ApiError::Internal(e.to_string());
    out.extend_from_slice(b"{\"address\":");
    serde_json::to_writer(&mut *out, &r.address).map_err(internal)?;
    let mut size = 0;
    if !r.variables.is_empty() {
        out.extend_from_slice(b",\"variables\":");
        let start = out.len();
        serde_json::to_writer(&mut *out, &r.variables).map_err(internal)?;
        size = out.len() - start;
    }
    out.push(b'}');
    Ok(size)
}

struct Checked {
    header: CampaignHeader,
    recipients: Recipients,
    hash: Vec<u8>,
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
    let http = &state.config.http;
    let max = http.max_campaign_recipients;
    if all.len() > max {
        return Err(too_many(max));
    }
    if all.is_empty() {
        return Err(empty());
    }
    let mut errors = Errors::new();
    header.check(&mut errors);
    let mut collector = Collector::new(Vec::with_capacity(bytes.len()), max);
    let mut json = Vec::with_capacity(256);
    for (i, r) in all.iter().enumerate() {
        json.clear();
        let size = write_recipient(&mut json, r)?;
        if let Some(p) = validate::address_problem(header.channel, &r.address) {
            errors.add(format!("recipients[{i}].address"), p);
        }
        if let Some(p) = validate::variables_problem(size) {
            errors.add(format!("recipients[{i}].variables"), p);
        }
        if errors.is_empty() {
            collector.push(&r.address, &json)?;
        }
    }
    errors.into_result()?;
    let (bytes, mut recipients) = collector.finish(http.batch_max_recipients, http.batch_max_bytes)?;
    recipients.bytes = RecipientBytes::Memory { bytes, at: 0 };
    Ok(Checked { header, recipients, hash })
}

async fn check_ndjson(state: &AppState, body: Body) -> Result<Checked, ApiError> {
    let http = &state.config.http;
    let dir = http.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    let file =
        tempfile::tempfile_in(&dir).map_err(|e| ApiError::Internal(format!("spool in {}: {e}", dir.display())))?;
    let spool = BufWriter::with_capacity(1 << 20, file);
    let mut check = NdjsonCheck::new(Collector::new(spool, http.max_campaign_recipients));
    // The body's hash (its idempotency) is taken on a thread of its own
    // while the lines are checked: in a profile it took as long as parsing
    // them. The chunks are shared, not copied, and at most `HASH_QUEUE`
    // wait.
    let (to_hash, mut chunks_to_hash) = tokio::sync::mpsc::channel::<axum::body::Bytes>(HASH_QUEUE);
    let hashed = tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        while let Some(chunk) = chunks_to_hash.blocking_recv() {
            hasher.update(&chunk);
        }
        hasher.finalize().to_vec()
    });
    let chunks = body.into_data_stream().then(|chunk| {
        let to_hash = to_hash.clone();
        async move {
            let chunk = chunk.map_err(|e| {
                ApiError::InvalidBody(vec![FieldError {
                    field: String::new(),
                    detail: format!("reading the body: {e}"),
                }])
            })?;
            to_hash.send(chunk.clone()).await.map_err(|_| ApiError::Internal("the body's hash stopped".into()))?;
            Ok(chunk)
        }
    });
    check.read(chunks).await?;
    drop(to_hash);
    let (header, spool, mut recipients) = check.finish(http.batch_max_recipients, http.batch_max_bytes)?;
    let mut file = spool.into_inner().map_err(|e| ApiError::Internal(format!("spool: {e}")))?;
    file.rewind().map_err(|e| ApiError::Internal(format!("spool: {e}")))?;
    recipients.bytes = RecipientBytes::Spool(file);
    let hash = hashed.await.map_err(|e| ApiError::Internal(format!("the body's hash: {e}")))?;
    Ok(Checked { header, recipients, hash })
}

/// An NDJSON campaign checked line by line as it arrives: the header line,
/// then one recipient per line, validated and collected while every line
/// so far is valid. Errors are collected (up to the reported maximum)
/// except for a bad header or too many recipient lines, which end the
/// request at once; too many distinct recipients are found at the end.
///
/// After the header, the body is cut into segments of whole lines
/// (`segment_bytes` or a little more), each checked by a [`LineCheck`] on a
/// thread of its own while the next arrive, and taken in order: the
/// outcome is the same as checking every line one after the other.
struct NdjsonCheck<W> {
    header: Option<CampaignHeader>,
    errors: Errors,
    collector: Collector<W>,
    /// Lines taken (checked, or handed to a segment's check).
    line_no: usize,
    /// Where the body is cut into segments checked in parallel.
    segment_bytes: usize,
    /// Buffers of segments taken, for the next ones: fresh ones cost as
    /// much in page faults as a good part of checking their lines.
    spare_segments: Vec<Vec<u8>>,
    spare_checks: Vec<LineCheck>,
}

/// The body's bytes a segment holds, at least: large enough that handing
/// it to a thread costs little against checking it, small enough that the
/// segments in flight take little memory.
const SEGMENT_BYTES: usize = 256 << 10;

/// Segments being checked at once, at most (besides the one being cut).
const SEGMENTS_IN_FLIGHT: usize = 3;

/// A segment being checked: its check, and its buffer back.
type Checking = tokio::task::JoinHandle<Result<(LineCheck, Vec<u8>), ApiError>>;

impl<W: Write> NdjsonCheck<W> {
    fn new(collector: Collector<W>) -> Self {
        NdjsonCheck {
            header: None,
            errors: Errors::new(),
            collector,
            line_no: 0,
            segment_bytes: SEGMENT_BYTES,
            spare_segments: Vec::new(),
            spare_checks: Vec::new(),
        }
    }

    /// Checks the body as its chunks arrive.
    async fn read(
        &mut self,
        chunks: impl futures::Stream<Item = Result<axum::body::Bytes, ApiError>>,
    ) -> Result<(), ApiError> {
        let mut chunks = std::pin::pin!(chunks);
        let mut buf: Vec<u8> = Vec::with_capacity(self.segment_bytes + (1 << 16));
        // `buf[..whole]` is whole lines, the rest a line still arriving.
        let mut whole = 0;
        let mut checking = std::collections::VecDeque::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if let Some(end) = memchr::memrchr(b'\n', &chunk) {
                whole = buf.len() + end + 1;
            }
            buf.extend_from_slice(&chunk);
            if self.header.is_none() {
                let done = self.header_lines(&buf[..whole])?;
                buf.drain(..done);
                whole -= done;
            }
            if self.header.is_some() && whole >= self.segment_bytes {
                let mut next = self.spare_segments.pop().unwrap_or_default();
                next.clear();
                next.extend_from_slice(&buf[whole..]);
                buf.truncate(whole);
                let segment = std::mem::replace(&mut buf, next);
                whole = 0;
                checking.push_back(self.check_apart(segment));
                while checking.len() > SEGMENTS_IN_FLIGHT {
                    self.take_next(&mut checking).await?;
                }
            }
            if buf.len() - whole > MAX_LINE_BYTES {
                // What ends the request at once in a line before it comes first.
                while !checking.is_empty() {
                    self.take_next(&mut checking).await?;
                }
                self.lines(&buf[..whole])?;
                return Err(ApiError::InvalidBody(vec![FieldError {
                    field: format!("line {}", self.line_no + 1),
                    detail: format!("longer than {MAX_LINE_BYTES} bytes"),
                }]));
            }
        }
        while !checking.is_empty() {
            self.take_next(&mut checking).await?;
        }
        let done = self.lines(&buf)?;
        self.line(&buf[done..])
    }

    /// Hands the whole lines of `segment` to a thread of their own.
    fn check_apart(&mut self, segment: Vec<u8>) -> Checking {
        let mut check = self.line_check();
        self.line_no += memchr::memchr_iter(b'\n', &segment).count();
        tokio::task::spawn_blocking(move || {
            check.lines(&segment)?;
            Ok((check, segment))
        })
    }

    /// Takes the outcome of the oldest segment still being checked.
    async fn take_next(&mut self, checking: &mut std::collections::VecDeque<Checking>) -> Result<(), ApiError> {
        let Some(next) = checking.pop_front() else { return Ok(()) };
        let (check, segment) = next.await.map_err(|e| ApiError::Internal(format!("checking recipients: {e}")))??;
        self.spare_segments.push(segment);
        self.take(check)
    }

    /// Checks the lines of `bytes` up to the header's, one by one; returns
    /// how many bytes that was.
    fn header_lines(&mut self, bytes: &[u8]) -> Result<usize, ApiError> {
        let mut start = 0;
        while self.header.is_none() {
            let Some(end) = memchr::memchr(b'\n', &bytes[start..]) else { break };
            self.line(&bytes[start..start + end])?;
            start += end + 1;
        }
        Ok(start)
    }

    /// Checks every complete line of `bytes`; returns how many bytes that
    /// was (the rest is a line still arriving).
    fn lines(&mut self, bytes: &[u8]) -> Result<usize, ApiError> {
        let start = self.header_lines(bytes)?;
        if self.header.is_none() {
            return Ok(start);
        }
        let mut check = self.line_check();
        let done = check.lines(&bytes[start..])?;
        self.line_no = check.line_no;
        self.take(check)?;
        Ok(start + done)
    }

    fn line(&mut self, line: &[u8]) -> Result<(), ApiError> {
        if self.header.is_some() {
            let mut check = self.line_check();
            check.line(line)?;
            self.line_no = check.line_no;
            return self.take(check);
        }
        self.line_no += 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let at = format!("line {}", self.line_no);
        let header = validate::parse_at::<CampaignHeader>(line, &at).map_err(|e| ApiError::InvalidBody(vec![e]))?;
        header.check(&mut self.errors);
        self.header = Some(header);
        Ok(())
    }

    /// A check of the lines after those taken so far.
    fn line_check(&mut self) -> LineCheck {
        let channel = self.header.as_ref().map_or(Channel::Email, |h| h.channel);
        match self.spare_checks.pop() {
            Some(mut check) => {
                (check.channel, check.line_no) = (channel, self.line_no);
                check
            }
            None => LineCheck::new(channel, self.collector.hasher, self.line_no),
        }
    }

    /// Takes what a segment's check found, in the order of the lines: its
    /// recipients while no line so far has a problem, and its problems.
    fn take(&mut self, mut check: LineCheck) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            self.collector.extend(&check.out, &check.sizes, &check.keys)?;
        }
        self.errors.extend(std::mem::take(&mut check.errors));
        check.out.clear();
        check.sizes.clear();
        check.keys.clear();
        self.spare_checks.push(check);
        Ok(())
    }

    /// The header, the collector's output and the recipients; or every
    /// problem found.
    fn finish(self, max_recipients: usize, max_bytes: usize) -> Result<(CampaignHeader, W, Recipients), ApiError> {
        let Some(header) = self.header else {
            return Err(ApiError::InvalidBody(vec![FieldError {
                field: "line 1".into(),
                detail: "the first line must be the campaign header".into(),
            }]));
        };
        self.errors.into_result()?;
        let (out, recipients) = self.collector.finish(max_recipients, max_bytes)?;
        if recipients.count() == 0 {
            return Err(empty());
        }
        Ok((header, out, recipients))
    }
}

/// The check of a run of recipient lines (those after the header), apart
/// from the lines before it: what it finds is taken by [`NdjsonCheck`] in
/// the order of the lines. Its recipients are collected until its first
/// problem.
struct LineCheck {
    channel: Channel,
    hasher: SipHasher13,
    /// The number of the last line checked.
    line_no: usize,
    /// The recipients' JSON, each followed by a comma, with each one's size
    /// and key, as [`Collector`] takes them.
    out: Vec<u8>,
    sizes: Vec<u32>,
    keys: Vec<(u64, u64)>,
    errors: Errors,
    /// The JSON of the recipient being checked; kept for the next.
    json: Vec<u8>,
    /// The fast path's scratch space for its variables; kept too.
    variables: Vec<u8>,
}

impl LineCheck {
    fn new(channel: Channel, hasher: SipHasher13, line_no: usize) -> Self {
        LineCheck {
            channel,
            hasher,
            line_no,
            out: Vec::new(),
            sizes: Vec::new(),
            keys: Vec::new(),
            errors: Errors::new(),
            json: Vec::with_capacity(256),
            variables: Vec::with_capacity(256),
        }
    }

    /// Checks every complete line of `bytes`; returns how many bytes that
    /// was.
    fn lines(&mut self, bytes: &[u8]) -> Result<usize, ApiError> {
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', bytes) {
            self.line(&bytes[start..end])?;
            start = end + 1;
        }
        Ok(start)
    }

    fn line(&mut self, line: &[u8]) -> Result<(), ApiError> {
        self.line_no += 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        // Most lines: written straight from their bytes, as serde's path
        // below would write them (see `recipient_line`).
        if let Some(w) = recipient_line::recipient(line, &mut self.json, &mut self.variables) {
            return self.checked(w.address, w.variables_size);
        }
        let r = match serde_json::from_slice::<Recipient>(line) {
            Ok(r) => r,
            Err(_) => match validate::parse_at::<Recipient>(line, &format!("line {}", self.line_no)) {
                Ok(r) => r,
                Err(e) => {
                    self.errors.add(e.field, e.detail);
                    return Ok(());
                }
            },
        };
        self.json.clear();
        let size = write_recipient(&mut self.json, &r)?;
        self.checked(&r.address, size)
    }

    /// The checks of a recipient whose JSON is in `self.json`, and its
    /// collection when no line so far has a problem.
    fn checked(&mut self, address: &str, variables_size: usize) -> Result<(), ApiError> {
        if let Some(p) = validate::address_problem(self.channel, address) {
            self.errors.add(format!("line {}.address", self.line_no), p);
        }
        if let Some(p) = validate::variables_problem(variables_size) {
            self.errors.add(format!("line {}.variables", self.line_no), p);
        }
        if self.errors.is_empty() {
            let size = u32::try_from(self.json.len()).map_err(|_| ApiError::Internal("recipient too large".into()))?;
            self.keys.push(address_key(&self.hasher, address));
            self.sizes.push(size);
            self.out.extend_from_slice(&self.json);
            self.out.push(b',');
        }
        Ok(())
    }
}

async fn campaign(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let Submission { tenant, key, correlation, headers, body } = submission(state, request).await?;
    let started = std::time::Instant::now();
    let checked = match body_kind(&headers) {
        Some(BodyKind::Json) => check_json(state, &read_body(body, state.config.http.max_campaign_json_bytes).await?)?,
        Some(BodyKind::Ndjson) => check_ndjson(state, body).await?,
        None => return Err(ApiError::UnsupportedMediaType("application/json or application/x-ndjson")),
    };
    submit::stage("check", started);
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
    let Checked { header, recipients, hash } = checked;
    let (count, duplicates, batches) = (recipients.count(), recipients.dropped.len(), recipients.batches.len() as u32);
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
    let events = campaign_events(&spec, &env, recipients, count as u32);
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
    submit::record_accepted(state, &tenant, &key, response.clone()).await;
    metrics::counter!("ledger_intents_accepted_total", "tenant" => tenant.0.clone(), "kind" => "campaign").increment(1);
    metrics::counter!("ledger_recipients_accepted_total", "tenant" => tenant.0.clone(), "kind" => "campaign")
        .increment(count as u64);
    tracing::info!(intent_id = %intent, tenant = %tenant, recipients = count, batches, correlation_id = %correlation, "campaign accepted");
    Ok(accepted(response, Some(&format!("/v1/intents/{intent}")), false, &correlation))
}

/// The header, then the recipient batches as cut during validation,
/// already encoded. A batch's record is the encoded event with the
/// recipients' JSON (as validated and spooled) spliced into its empty
/// `recipients` array: a campaign's recipients are parsed once, not twice.
fn campaign_events<'a>(
    spec: &'a IntentSpec,
    env: &'a Envelope<'a>,
    recipients: Recipients,
    count: u32,
) -> impl Iterator<Item = Result<kafka::Encoded, ApiError>> + Send + 'a {
    let Recipients { mut bytes, sizes, dropped, batches } = recipients;
    let count_batches = batches.len() as u32;
    let header = std::iter::once(Ok(kafka::Encoded::from(&spec.header(env, count, count_batches))));
    let mut dropped = dropped.into_iter().peekable();
    let mut span = Vec::new();
    let body = batches.into_iter().enumerate().map(move |(index, range)| {
        let members = &sizes[range.start as usize..range.end as usize];
        // The batch's bytes: each member's JSON and a comma.
        let len: usize = members.iter().map(|s| *s as usize + 1).sum();
        let mut repeats = Vec::new();
        while let Some(d) = dropped.next_if(|d| *d < range.end) {
            repeats.push(d);
        }
        let mut encoded = kafka::Encoded::from(&spec.batch(env, index as u32, count_batches, Vec::new()));
        if repeats.is_empty() {
            // All but the last comma, read straight into the record.
            splice_recipients(&mut encoded.payload, len - 1, |into| bytes.take(into))?;
            bytes.take(&mut [0u8; 1])?;
        } else {
            span.resize(len, 0);
            bytes.take(&mut span)?;
            let mut joined = Vec::with_capacity(len);
            let (mut at, mut repeats) = (0, repeats.into_iter().peekable());
            for (i, size) in (range.start..).zip(members) {
                let end = at + *size as usize;
                if repeats.next_if_eq(&i).is_none() {
                    joined.extend_from_slice(&span[at..=end]);
                }
                at = end + 1;
            }
            joined.pop();
            splice_recipients(&mut encoded.payload, joined.len(), |into| {
                into.copy_from_slice(&joined);
                Ok(())
            })?;
        }
        Ok(encoded)
    });
    header.chain(body)
}

/// Fills the empty `"recipients":[]` of an encoded recipient batch with
/// `len` bytes that `fill` writes. The last occurrence is the field:
/// everything after it in a batch (the optional `send_at`) cannot contain
/// the sequence, while inline JSON content before it could.
fn splice_recipients(
    payload: &mut Vec<u8>,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    const EMPTY: &[u8] = b"\"recipients\":[]";
    let at = payload
        .windows(EMPTY.len())
        .rposition(|w| w == EMPTY)
        .ok_or_else(|| ApiError::Internal("encoded batch has no recipients field".into()))?;
    let insert_at = at + EMPTY.len() - 1;
    let tail = payload.split_off(insert_at);
    payload.reserve_exact(len + tail.len());
    payload.resize(insert_at + len, 0);
    fill(&mut payload[insert_at..])?;
    payload.extend_from_slice(&tail);
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

    fn recipient(address: &str, variables: serde_json::Value) -> Recipient {
        Recipient { address: address.into(), variables: serde_json::from_value(variables).unwrap_or_default() }
    }

    fn spec(content: Content) -> IntentSpec {
        IntentSpec {
            intent: IntentId(Uuid::from_u128(1)),
            kind: IntentKind::Campaign,
            name: None,
            channel: Channel::Webhook,
            priority: Priority::Bulk,
            from: None,
            content,
            template: None,
            send_at: Some(Utc::now()),
            request_hash: String::new(),
        }
    }

    /// `list` collected in memory and cut with these bounds.
    fn collect(list: &[Recipient], max_recipients: usize, max_bytes: usize) -> Result<Recipients, ApiError> {
        let mut collector = Collector::new(Vec::new(), 1000);
        let mut json = Vec::new();
        for r in list {
            json.clear();
            write_recipient(&mut json, r)?;
            collector.push(&r.address, &json)?;
        }
        let (bytes, mut recipients) = collector.finish(max_recipients, max_bytes)?;
        recipients.bytes = RecipientBytes::Memory { bytes, at: 0 };
        Ok(recipients)
    }

    /// The recipients of each batch record that `campaign_events` makes.
    fn produced(spec: &IntentSpec, recipients: Recipients) -> Vec<Vec<Recipient>> {
        let tenant = TenantId::parse("acme").unwrap();
        let env = Envelope { tenant: &tenant, correlation: "c", now: Utc::now() };
        let count = recipients.count() as u32;
        let events: Vec<Event> = campaign_events(spec, &env, recipients, count)
            .map(|e| Event::from_json(&e.unwrap().payload).unwrap())
            .collect();
        let EventBody::IntentAccepted(header) = &events[0].body else { panic!("no header first") };
        assert_eq!((header.recipient_count, header.batch_count), (count, events.len() as u32 - 1));
        events[1..]
            .iter()
            .enumerate()
            .map(|(i, e)| {
                assert_eq!(*e, spec.batch(&env, i as u32, header.batch_count, Vec::new()).with_recipients_of(e));
                let EventBody::RecipientBatch(b) = &e.body else { panic!("not a batch") };
                b.recipients.clone()
            })
            .collect()
    }

    trait WithRecipients {
        fn with_recipients_of(self, other: &Event) -> Event;
    }

    impl WithRecipients for Event {
        fn with_recipients_of(mut self, other: &Event) -> Event {
            if let (EventBody::RecipientBatch(mine), EventBody::RecipientBatch(theirs)) = (&mut self.body, &other.body)
            {
                mine.recipients = theirs.recipients.clone();
            }
            self
        }
    }

    #[test]
    fn spliced_recipients_decode_as_the_batch_serde_would_write() {
        // Inline JSON content may itself hold the sequence searched for.
        let spec = spec(Content { json: Some(json!({ "recipients": [] })), ..Content::default() });
        let members: Vec<Recipient> =
            (0..3).map(|i| recipient(&format!("https://example.com/{i}"), json!({ "i": i }))).collect();
        let batches = produced(&spec, collect(&members, 10, 4096).unwrap());
        assert_eq!(batches, vec![members]);
    }

    #[test]
    fn repeats_are_skipped_and_the_first_is_kept() {
        let spec = spec(Content::default());
        let list: Vec<Recipient> = ["A@x.io", "b@x.io", "a@X.IO", "c@x.io", "B@x.io", "d@x.io", " a@x.io"]
            .iter()
            .enumerate()
            .map(|(i, a)| recipient(a, json!({ "i": i })))
            .collect();
        let recipients = collect(&list, 2, 4096).unwrap();
        assert_eq!((recipients.count(), recipients.dropped.clone()), (4, vec![2, 4, 6]));
        let kept: Vec<Recipient> = [0, 1, 3, 5].iter().map(|i| list[*i].clone()).collect();
        // Two a batch: the repeats inside a batch's positions are cut out.
        assert_eq!(produced(&spec, recipients), vec![kept[..2].to_vec(), kept[2..].to_vec()]);
    }

    #[test]
    fn repeats_are_found_among_many_and_the_bounds_hold() {
        let n = 100_010;
        let list: Vec<Recipient> = (0..n).map(|i| recipient(&format!("u{}@x.io", i % 1000), json!({}))).collect();
        let mut collector = Collector::new(std::io::sink(), 100_000);
        let mut json = Vec::new();
        for r in &list {
            json.clear();
            write_recipient(&mut json, r).unwrap();
            collector.push(&r.address, &json).unwrap();
        }
        let (_, recipients) = collector.finish(1000, 1 << 20).unwrap();
        assert_eq!((recipients.count(), recipients.dropped.len()), (1000, n - 1000));
        assert!(recipients.dropped.windows(2).all(|w| w[0] < w[1]) && recipients.dropped[0] == 1000);
        assert_eq!(recipients.batches, vec![0..n as u32]);

        // More distinct recipients than allowed; more lines than allowed.
        let mut collector = Collector::new(std::io::sink(), 10);
        let pushed: Result<Vec<()>, ApiError> = (0..11).map(|i| collector.push(&format!("u{i}@x.io"), b"{}")).collect();
        pushed.unwrap();
        assert!(
            matches!(collector.finish(100, 4096), Err(ApiError::Validation(e)) if e[0].detail.contains("more than 10 recipients"))
        );
        let mut collector = Collector::new(std::io::sink(), 10);
        let refused = (0..25).map(|_| collector.push("same@x.io", b"{}")).find_map(Result::err);
        assert!(
            matches!(refused, Some(ApiError::Validation(e)) if e[0].detail.contains("more than 20 recipient lines"))
        );
    }

    #[test]
    fn a_recipient_is_written_as_serde_writes_it_with_the_size_of_its_variables() {
        let cases = [
            recipient("a@example.com", json!({})),
            recipient("a\"quoted\"\\@example.com", json!({ "name": "Zoë \u{1F600}\n", "n": 12.5, "z": null })),
            recipient("https://example.com/hook?x=1", json!({ "b": [1, { "c": "d" }], "a": true })),
        ];
        for r in cases {
            let mut out = Vec::new();
            let size = write_recipient(&mut out, &r).unwrap();
            assert_eq!(out, serde_json::to_vec(&r).unwrap());
            let expected = if r.variables.is_empty() { 0 } else { serde_json::to_vec(&r.variables).unwrap().len() };
            assert_eq!(size, expected);
        }
    }

    #[test]
    fn batches_are_cut_where_the_batcher_cuts_them() {
        // By count (3), then by bytes (a batch under 40 bytes).
        for (max_n, max_bytes, sizes) in
            [(3, 1000, vec![10; 8]), (100, 40, vec![10, 20, 15, 5, 30, 30, 1]), (100, 40, vec![90, 1])]
        {
            let mut batcher: Batcher<u32> = Batcher::new(max_n, max_bytes);
            let mut expected: Vec<Vec<u32>> =
                sizes.iter().enumerate().filter_map(|(i, n)| batcher.push(i as u32, *n)).collect();
            expected.extend(batcher.finish());
            let mut collector = Collector::new(std::io::sink(), 1000);
            for (i, size) in sizes.iter().enumerate() {
                collector.push(&format!("u{i}@x.io"), &vec![b'x'; *size]).unwrap();
            }
            let (_, recipients) = collector.finish(max_n, max_bytes).unwrap();
            let got: Vec<Vec<u32>> = recipients.batches.iter().map(|r| r.clone().collect()).collect();
            assert_eq!(got, expected, "{max_n} {max_bytes} {sizes:?}");
        }
    }

    #[test]
    fn the_key_is_of_the_normalised_address() {
        let hasher = SipHasher13::new_with_keys(rand::random(), rand::random());
        let long = format!("{}@Example.COM", "A".repeat(150));
        let longer = format!("{}@Example.COM", "B".repeat(300));
        for address in [
            "a@example.com",
            "  MiXeD.Case@Example.COM\t",
            "ZOË@Example.com",
            "\u{a0}x@example.com\u{2003}",
            "HTTPS://Hooks.Example.COM/Path/A?B=C",
            "http://EXAMPLE.com",
            "httpx://Not.A.Url",
            "",
            &long,
            &longer,
        ] {
            let expected = hasher.hash(ledger_schemas::ids::normalise_recipient(address).as_bytes()).as_u64();
            assert_eq!(address_key(&hasher, address), expected, "{address:?}");
        }
    }

    proptest::proptest! {
        /// The bucketed sort orders keys as `sort_unstable` does, whatever
        /// their spread (few distinct first halves included).
        #[test]
        fn keys_sort_as_sort_unstable_sorts_them(
            keys in proptest::collection::vec((0u64..4, proptest::num::u64::ANY, 0u64..3, 0u32..5000), 0..5000),
            shift in 0u32..63,
        ) {
            let mut keys: Vec<(u64, u64, u32)> = keys.into_iter().map(|(a, b, c, p)| (a << 62 | b >> shift, c, p)).collect();
            let mut expected = keys.clone();
            expected.sort_unstable();
            sort_keys(&mut keys);
            proptest::prop_assert_eq!(keys, expected);
        }
    }

    fn ndjson_body(recipients: usize) -> Vec<u8> {
        let mut body =
            br#"{"name":"n","from":"shop@example.com","content":{"subject":"Hi {{ name }}","text":"t"}}"#.to_vec();
        body.push(b'\n');
        for i in 0..recipients {
            let r = recipient(&format!("c{i}@example.com"), json!({ "name": format!("Customer {i}"), "n": i }));
            body.extend(serde_json::to_vec(&r).unwrap());
            body.push(b'\n');
        }
        body
    }

    #[test]
    fn an_ndjson_campaign_is_checked_the_same_whatever_its_chunks() {
        let body = ndjson_body(50);
        let whole = {
            let mut check = NdjsonCheck::new(Collector::new(Vec::new(), 1000));
            let done = check.lines(&body).unwrap();
            check.line(&body[done..]).unwrap();
            check.finish(7, 4096).unwrap()
        };
        assert_eq!((whole.2.count(), whole.2.batches.len()), (50, 8));
        // Lines cut anywhere by chunks, as check_ndjson feeds them.
        for size in [1, 2, 3, 17, 64, 1000] {
            let mut check = NdjsonCheck::new(Collector::new(Vec::new(), 1000));
            let mut buf = Vec::new();
            for chunk in body.chunks(size) {
                buf.extend_from_slice(chunk);
                let done = check.lines(&buf).unwrap();
                buf.drain(..done);
            }
            check.line(&buf).unwrap();
            let got = check.finish(7, 4096).unwrap();
            assert_eq!(
                (&got.1, &got.2.sizes, &got.2.batches),
                (&whole.1, &whole.2.sizes, &whole.2.batches),
                "chunks of {size}"
            );
        }
    }

    /// `body` as a stream of chunks of 64 KiB, shared, not copied.
    fn chunks_of_64k(
        body: &axum::body::Bytes,
    ) -> impl futures::Stream<Item = Result<axum::body::Bytes, ApiError>> + use<> {
        let chunks: Vec<_> =
            (0..body.len()).step_by(1 << 16).map(|at| Ok(body.slice(at..body.len().min(at + (1 << 16))))).collect();
        futures::stream::iter(chunks)
    }

    #[test]
    fn a_line_longer_than_the_limit_is_refused_by_its_number() {
        // Refused while it arrives: over the limit before its end is.
        let long = format!(r#"{{"address":"a@x.io","variables":{{"v":"{}"}}}}"#, "x".repeat(MAX_LINE_BYTES * 2));
        let mut recipients = String::from_utf8(ndjson_body(3000)).unwrap();
        recipients.push_str(&long);
        recipients.push('\n');
        let long_header = format!(r#"{{"name":"{}"}}"#, "n".repeat(MAX_LINE_BYTES * 2)) + "\n";
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for (body, line) in [(recipients, 3002), (long_header, 1)] {
            let mut check = NdjsonCheck::new(Collector::new(Vec::new(), 10_000));
            let result = runtime.block_on(check.read(chunks_of_64k(&axum::body::Bytes::from(body))));
            match result {
                Err(ApiError::InvalidBody(errors)) => {
                    assert_eq!(errors[0].field, format!("line {line}"));
                    assert!(errors[0].detail.starts_with("longer than"), "{errors:?}");
                }
                other => panic!("line {line}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_extended_are_errors_added_one_by_one() {
        for (n, cut) in [(0, 0), (3, 1), (60, 10), (60, 50), (60, 55), (120, 70)] {
            let error = |i: usize| (format!("line {i}"), "bad".to_owned());
            let mut one_by_one = Errors::new();
            (0..n).for_each(|i| one_by_one.add(error(i).0, error(i).1));
            let (mut first, mut later) = (Errors::new(), Errors::new());
            (0..cut).for_each(|i| first.add(error(i).0, error(i).1));
            (cut..n).for_each(|i| later.add(error(i).0, error(i).1));
            first.extend(later);
            assert_eq!(
                format!("{:?}", first.into_result()),
                format!("{:?}", one_by_one.into_result()),
                "{n} cut at {cut}"
            );
        }
    }

    /// What checking `body` ends with: comparable, success or refusal.
    fn outcome(check: NdjsonCheck<Vec<u8>>, result: Result<(), ApiError>) -> String {
        let line_no = check.line_no;
        match result.and_then(|()| check.finish(3, 4096)) {
            Ok((_, out, r)) => format!(
                "lines {line_no}, {:?} {:?} {:?} {:?}",
                String::from_utf8_lossy(&out),
                r.sizes,
                r.dropped,
                r.batches
            ),
            Err(e) => format!("{e:?}"),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn chunks_do_not_change_what_a_campaign_is(
            lines in proptest::collection::vec((0u8..7, 0u8..20, proptest::bool::ANY), 0..40),
            chunk in 1usize..200,
            segment in 1usize..400,
            trailing_newline in proptest::bool::ANY,
        ) {
            let mut body = String::from(r#"{"content":{"text":"hi"}}"#);
            for (kind, k, upper) in lines {
                let address = if upper { format!("U{k}@X.IO") } else { format!("u{k}@x.io") };
                body.push('\n');
                body.push_str(&match kind {
                    0 => format!(r#"{{"address":"{address}","variables":{{"k":{k}}}}}"#),
                    1 => " ".repeat(usize::from(k % 3)),
                    2 => format!("{{\"address\":\"{address}\"}}\r"),
                    3 => "{".into(),
                    4 => r#"{"address":"nope"}"#.into(),
                    5 => format!(r#"{{"address":"{address}","x":1}}"#),
                    _ => format!(r#"{{ "address" : "{address}" , "variables" : {{ "b" : [1, 2], "a" : "z" }} }}"#),
                });
            }
            if trailing_newline {
                body.push('\n');
            }
            let body = body.into_bytes();
            // The reference: one line after the other.
            let mut one_by_one = NdjsonCheck::new(Collector::new(Vec::new(), 10));
            let result = body.split(|b| *b == b'\n').try_for_each(|line| one_by_one.line(line));
            let expected = outcome(one_by_one, result);
            // Every line at once.
            let mut whole = NdjsonCheck::new(Collector::new(Vec::new(), 10));
            let result = whole.lines(&body).and_then(|done| whole.line(&body[done..]));
            proptest::prop_assert_eq!(outcome(whole, result), expected.clone());

            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
            let got = runtime.block_on(async {
                let chunks: Vec<Result<axum::body::Bytes, ApiError>> =
                    body.chunks(chunk).map(|c| Ok(axum::body::Bytes::copy_from_slice(c))).collect();
                let mut check = NdjsonCheck::new(Collector::new(Vec::new(), 10));
                // Cut into segments checked apart, of one line or more.
                check.segment_bytes = segment;
                let result = check.read(futures::stream::iter(chunks)).await;
                outcome(check, result)
            });
            proptest::prop_assert_eq!(got, expected);
        }
    }

    /// `cargo test --release -p ledger-ingest ndjson_check_speed -- --ignored --nocapture`:
    /// the time per line of checking a campaign (`LINES`, default
    /// 1,000,000; `ROUNDS` times, default 1, for a profile).
    #[test]
    #[ignore]
    fn ndjson_check_speed() {
        let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        let n = env("LINES", 1_000_000);
        let body = ndjson_body(n);
        // As `check_ndjson` checks a body: chunks of 64 KiB, segments
        // checked on threads of their own.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
        let body_chunks = axum::body::Bytes::from(body.clone());
        for _ in 0..env("ROUNDS", 1) {
            let chunks = chunks_of_64k(&body_chunks);
            let started = std::time::Instant::now();
            let mut check = NdjsonCheck::new(Collector::new(std::io::sink(), usize::MAX));
            runtime.block_on(check.read(chunks)).unwrap();
            let read = started.elapsed();
            let (_, _, recipients) = check.finish(1000, 256 << 10).unwrap();
            let elapsed = started.elapsed();
            println!(
                "in segments: {} recipients in {} batches: {:.0} ns a line ({:.0} of them reading)",
                recipients.count(),
                recipients.batches.len(),
                elapsed.as_nanos() as f64 / n as f64,
                read.as_nanos() as f64 / n as f64
            );
        }
        for _ in 0..env("ROUNDS", 1) {
            let started = std::time::Instant::now();
            let mut check = NdjsonCheck::new(Collector::new(std::io::sink(), usize::MAX));
            let done = check.lines(&body).unwrap();
            check.line(&body[done..]).unwrap();
            let (_, _, recipients) = check.finish(1000, 256 << 10).unwrap();
            let elapsed = started.elapsed();
            println!(
                "{} recipients in {} batches: {:.0} ns a line",
                recipients.count(),
                recipients.batches.len(),
                elapsed.as_nanos() as f64 / n as f64
            );
        }
    }
}
