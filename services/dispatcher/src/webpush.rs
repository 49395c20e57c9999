//! Browser push notifications through Web Push: the payload encrypted for
//! the subscription (RFC 8291, `aes128gcm` content coding of RFC 8188) and
//! the request authorised with VAPID (RFC 8292), POSTed to the push service
//! (RFC 8030).
//!
//! A push recipient is the subscription's endpoint URL with its keys in
//! the fragment, which no HTTP request carries:
//! `https://push.example.net/send/abc#p256dh=<base64url>&auth=<base64url>`.
//! The identity's `secret` is the VAPID private key (the base64url P-256
//! scalar) and `from` the VAPID subject (`mailto:` or `https:`).
//!
//! 201/202 is delivered (the `Location` header is the provider message
//! id); 404 and 410 mean the subscription is gone: the message fails and
//! the recipient is suppressed (`expired_subscription`); 429 and 5xx are
//! retried; other answers fail for good. Push services do not de-duplicate,
//! so a call without an answer is ambiguous.

use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use futures::future::BoxFuture;
use hkdf::Hkdf;
use p256::ecdsa::signature::Signer;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde_json::json;
use sha2::Sha256;

use crate::provider::{classify_status, http_client, http_error, Accepted, Delivery, Provider, ProviderError};

/// The failure code of a subscription the push service says is gone.
pub const EXPIRED_SUBSCRIPTION: &str = "expired_subscription";

/// Record size announced in the header: the payload goes as one record.
const RECORD_SIZE: u32 = 4096;

pub struct WebPushProvider {
    client: reqwest::Client,
    vapid: p256::ecdsa::SigningKey,
    vapid_public: String,
    subject: String,
    beacon_secret: Option<String>,
}

/// A push subscription as the browser gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub endpoint: String,
    pub p256dh: p256::PublicKey,
    pub auth: [u8; 16],
}

/// Splits a push recipient into its endpoint and keys.
pub fn parse_subscription(recipient: &str) -> Result<Subscription, String> {
    let (endpoint, fragment) = recipient.split_once('#').ok_or("the recipient has no #p256dh=…&auth=… keys")?;
    let mut p256dh = None;
    let mut auth = None;
    for pair in fragment.split('&') {
        match pair.split_once('=') {
            Some(("p256dh", v)) => {
                p256dh = Some(B64URL.decode(v.trim_end_matches('=')).map_err(|e| format!("p256dh: {e}"))?)
            }
            Some(("auth", v)) => auth = Some(B64URL.decode(v.trim_end_matches('=')).map_err(|e| format!("auth: {e}"))?),
            _ => {}
        }
    }
    let p256dh = p256::PublicKey::from_sec1_bytes(&p256dh.ok_or("p256dh is missing")?)
        .map_err(|_| "p256dh is not a P-256 public key")?;
    let auth: [u8; 16] = auth.ok_or("auth is missing")?.try_into().map_err(|_| "auth is not 16 bytes")?;
    Ok(Subscription { endpoint: endpoint.to_owned(), p256dh, auth })
}

fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
    // Expanding at most 32 bytes from SHA-256 cannot fail.
    let _ = Hkdf::<Sha256>::new(Some(salt), ikm).expand(info, out);
}

/// The `aes128gcm` body of `payload` for `subscription`, under a fresh
/// ephemeral key and salt (RFC 8291 §3.4, RFC 8188 §2).
pub fn encrypt(subscription: &Subscription, payload: &[u8]) -> Result<Vec<u8>, String> {
    let ephemeral = random_secret_key();
    let as_public = ephemeral.public_key().to_encoded_point(false);
    let ua_public = subscription.p256dh.to_encoded_point(false);
    let shared = p256::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), subscription.p256dh.as_affine());
    let mut key_info = b"WebPush: info\0".to_vec();
    key_info.extend_from_slice(ua_public.as_bytes());
    key_info.extend_from_slice(as_public.as_bytes());
    let mut ikm = [0u8; 32];
    hkdf(&subscription.auth, shared.raw_secret_bytes(), &key_info, &mut ikm);
    let salt: [u8; 16] = rand::random();
    let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
    hkdf(&salt, &ikm, b"Content-Encoding: aes128gcm\0", &mut cek);
    hkdf(&salt, &ikm, b"Content-Encoding: nonce\0", &mut nonce);
    let mut plaintext = payload.to_vec();
    plaintext.push(2); // the last (and only) record's delimiter
    if plaintext.len() + 16 > RECORD_SIZE as usize - 86 {
        return Err(format!("the payload is {} bytes; a push message takes about 4,000", payload.len()));
    }
    let cipher = aes_gcm::Aes128Gcm::new_from_slice(&cek).map_err(|e| e.to_string())?;
    let sealed = cipher.encrypt(aes_gcm::Nonce::from_slice(&nonce), plaintext.as_slice()).map_err(|e| e.to_string())?;
    let mut body = Vec::with_capacity(86 + sealed.len());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(as_public.as_bytes().len() as u8);
    body.extend_from_slice(as_public.as_bytes());
    body.extend_from_slice(&sealed);
    Ok(body)
}

fn random_secret_key() -> p256::SecretKey {
    loop {
        let bytes: [u8; 32] = rand::random();
        if let Ok(key) = p256::SecretKey::from_bytes(&bytes.into()) {
            return key;
        }
    }
}

/// The scheme and authority of a URL: VAPID's audience.
fn origin(url: &str) -> Option<&str> {
    let scheme_end = url.find("://")? + 3;
    let host_end = url[scheme_end..].find('/').map(|i| scheme_end + i).unwrap_or(url.len());
    Some(&url[..host_end])
}

impl WebPushProvider {
    /// `vapid_private_key`: the base64url 32-byte P-256 scalar.
    pub fn new(
        vapid_private_key: &str,
        subject: Option<String>,
        beacon_secret: Option<String>,
        timeout: Duration,
    ) -> Result<WebPushProvider, String> {
        let raw =
            B64URL.decode(vapid_private_key.trim().trim_end_matches('=')).map_err(|e| format!("VAPID key: {e}"))?;
        let vapid =
            p256::ecdsa::SigningKey::from_slice(&raw).map_err(|_| "the VAPID key is not a P-256 private key")?;
        let vapid_public = B64URL.encode(vapid.verifying_key().to_encoded_point(false).as_bytes());
        Ok(WebPushProvider {
            client: http_client(timeout).map_err(|e| e.to_string())?,
            vapid,
            vapid_public,
            subject: subject.unwrap_or_else(|| "mailto:postmaster@localhost".into()),
            beacon_secret,
        })
    }

    /// `Authorization: vapid t=<ES256 JWT>, k=<public key>` for `endpoint`.
    fn authorization(&self, endpoint: &str) -> Result<String, String> {
        let audience = origin(endpoint).ok_or("the endpoint is not a URL")?;
        let exp = chrono::Utc::now().timestamp() + 12 * 3600;
        let header = B64URL.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = B64URL.encode(json!({ "aud": audience, "exp": exp, "sub": self.subject }).to_string());
        let signing_input = format!("{header}.{claims}");
        let signature: p256::ecdsa::Signature = self.vapid.sign(signing_input.as_bytes());
        Ok(format!("vapid t={signing_input}.{}, k={}", B64URL.encode(signature.to_bytes()), self.vapid_public))
    }
}

impl Provider for WebPushProvider {
    fn name(&self) -> &'static str {
        "webpush"
    }

    fn send<'a>(&'a self, delivery: &'a Delivery<'a>) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(async move {
            let m = delivery.message;
            let subscription =
                parse_subscription(&m.recipient).map_err(|e| ProviderError::permanent("invalid_subscription", e))?;
            // What the service worker gets: the rendered notification, and
            // what it needs to report it displayed or clicked.
            let mut payload =
                json!({ "message_id": delivery.message_id.0, "title": m.subject, "body": m.text, "data": m.json });
            if let Some(secret) = &self.beacon_secret {
                payload["beacon_token"] = json!(ledger_schemas::beacon_token(secret, delivery.message_id.0));
            }
            let body = encrypt(&subscription, payload.to_string().as_bytes())
                .map_err(|e| ProviderError::permanent("payload_too_large", e))?;
            let authorization = self
                .authorization(&subscription.endpoint)
                .map_err(|e| ProviderError::permanent("invalid_subscription", e))?;
            let request = self
                .client
                .post(&subscription.endpoint)
                .header("content-encoding", "aes128gcm")
                .header("content-type", "application/octet-stream")
                .header("ttl", "86400")
                .header("authorization", authorization)
                .body(body);
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if status == 404 || status == 410 {
                        return Err(ProviderError::permanent(
                            EXPIRED_SUBSCRIPTION,
                            format!("the push service answered {status}: the subscription is gone"),
                        ));
                    }
                    classify_status(status)?;
                    let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    Ok(Accepted { provider_message_id: location })
                }
                Err(e) => Err(http_error(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_is_read_from_the_recipient() {
        let ua = random_secret_key();
        let p = B64URL.encode(ua.public_key().to_encoded_point(false).as_bytes());
        let a = B64URL.encode([3u8; 16]);
        let s = parse_subscription(&format!("https://push.example.net/x/1#p256dh={p}&auth={a}")).expect("parsed");
        assert_eq!(s.endpoint, "https://push.example.net/x/1");
        assert_eq!(s.auth, [3u8; 16]);
        assert!(parse_subscription("https://push.example.net/x/1").is_err());
        assert!(parse_subscription(&format!("https://p.example/x#p256dh={p}&auth=AAAA")).is_err());
    }

    #[test]
    fn the_audience_is_the_endpoints_origin() {
        assert_eq!(origin("https://fcm.googleapis.com/fcm/send/abc"), Some("https://fcm.googleapis.com"));
        assert_eq!(origin("http://127.0.0.1:4000/push/1"), Some("http://127.0.0.1:4000"));
    }
}
