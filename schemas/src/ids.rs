//! Identifiers, and the deterministic derivations that make re-processing
//! produce the same things instead of new ones (invariant 3).

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Namespaces for UUIDv5 derivations. Changing one changes every derived id:
/// never do it.
const NS_INTENT: Uuid = Uuid::from_u128(0x6c65_6467_6572_4000_8000_696e_7465_6e74);
const NS_MESSAGE: Uuid = Uuid::from_u128(0x6c65_6467_6572_4000_8000_6d65_7373_6167);
const NS_EVENT: Uuid = Uuid::from_u128(0x6c65_6467_6572_4000_8000_6576_656e_7421);

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
        )]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// One accepted send intent (a single message, a batch item or a campaign).
    IntentId
);
uuid_id!(
    /// One message: one recipient of one intent.
    MessageId
);
uuid_id!(
    /// One event. Derived where the same fact may be emitted twice, so the
    /// read model can recognise the duplicate.
    EventId
);

impl IntentId {
    /// The intent id of a submission: the same tenant and idempotency key give
    /// the same intent id on every ingest instance, after any restart.
    pub fn from_idempotency_key(tenant: &TenantId, key: &str) -> Self {
        let mut name = Vec::with_capacity(tenant.0.len() + key.len() + 1);
        name.extend_from_slice(tenant.0.as_bytes());
        name.push(0);
        name.extend_from_slice(key.as_bytes());
        Self(Uuid::new_v5(&NS_INTENT, &name))
    }
}

impl IntentId {
    /// The intent of item `index` of a batch submission whose own intent id
    /// is `self`: each item is an independent intent, derived so that
    /// replaying the batch yields the same ids.
    pub fn item(self, index: u32) -> IntentId {
        IntentId(Uuid::new_v5(&NS_INTENT, &[self.0.as_bytes().as_slice(), &index.to_be_bytes()].concat()))
    }
}

impl MessageId {
    /// A message id derives from (intent id, recipient), so rendering an
    /// intent twice yields the same messages. The recipient is normalised
    /// first: `A@Example.COM` and `a@example.com` are one recipient.
    pub fn derive(intent: IntentId, recipient: &str) -> Self {
        let normalised = normalise_recipient(recipient);
        let mut name = Vec::with_capacity(16 + normalised.len());
        name.extend_from_slice(intent.0.as_bytes());
        name.extend_from_slice(normalised.as_bytes());
        Self(Uuid::new_v5(&NS_MESSAGE, &name))
    }
}

impl EventId {
    /// The id of the `what` fact about `subject` (an intent or message id),
    /// `seq` distinguishing repeats such as attempt numbers.
    pub fn derive(subject: Uuid, what: &str, seq: u32) -> Self {
        let mut name = Vec::with_capacity(16 + what.len() + 5);
        name.extend_from_slice(subject.as_bytes());
        name.extend_from_slice(what.as_bytes());
        name.push(0);
        name.extend_from_slice(&seq.to_be_bytes());
        Self(Uuid::new_v5(&NS_EVENT, &name))
    }
}

/// Lower-cases and trims an address. Local parts are case-sensitive in theory
/// and never in practice; treating them as one recipient is what prevents a
/// double send to `Bob@x` and `bob@x`. An endpoint URL (webhook, push) keeps
/// the case of its path, query and fragment, which are case-sensitive (a
/// push subscription's keys ride in the fragment); only its scheme and host
/// are lower-cased.
pub fn normalise_recipient(recipient: &str) -> String {
    let r = recipient.trim();
    let scheme =
        ["https://", "http://"].into_iter().find(|s| r.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)));
    match scheme {
        Some(s) => {
            let rest = &r[s.len()..];
            let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            format!("{s}{}{}", rest[..host_end].to_lowercase(), &rest[host_end..])
        }
        None => r.to_lowercase(),
    }
}

/// A tenant: the customer on whose behalf messages are sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct TenantId(pub String);

impl TenantId {
    /// Tenant names are short slugs: `[a-z0-9][a-z0-9_-]{0,62}`.
    pub fn parse(s: &str) -> Result<Self, InvalidTenant> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && (b == b'-' || b == b'_')));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidTenant(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid tenant name {0:?}: use 1-63 characters a-z, 0-9, '-' or '_', starting with a letter or digit")]
pub struct InvalidTenant(pub String);

/// The token a push payload carries so that its client can report it
/// displayed or clicked (`POST /v1/feedback/push`): the hex HMAC-SHA256 of
/// the message id under the beacon secret. Only this ledger can make one,
/// and it is good for its one message.
pub fn beacon_token(secret: &str, message_id: Uuid) -> String {
    use hmac::{Hmac, Mac};
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(message_id.to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_same_tenant_and_key_always_give_the_same_intent_id() {
        let t = TenantId::parse("acme").unwrap();
        assert_eq!(IntentId::from_idempotency_key(&t, "k-1"), IntentId::from_idempotency_key(&t, "k-1"));
        assert_ne!(IntentId::from_idempotency_key(&t, "k-1"), IntentId::from_idempotency_key(&t, "k-2"));
        let other = TenantId::parse("globex").unwrap();
        assert_ne!(IntentId::from_idempotency_key(&t, "k-1"), IntentId::from_idempotency_key(&other, "k-1"));
    }

    #[test]
    fn tenant_and_key_cannot_be_confused_by_concatenation() {
        let a = IntentId::from_idempotency_key(&TenantId::parse("ab").unwrap(), "c");
        let b = IntentId::from_idempotency_key(&TenantId::parse("a").unwrap(), "bc");
        assert_ne!(a, b);
    }

    #[test]
    fn message_ids_ignore_recipient_case_and_whitespace() {
        let i = IntentId(Uuid::from_u128(7));
        assert_eq!(MessageId::derive(i, " Bob@Example.com"), MessageId::derive(i, "bob@example.com"));
    }

    #[test]
    fn an_endpoint_keeps_the_case_of_its_path_and_fragment() {
        assert_eq!(
            normalise_recipient(" HTTPS://Push.Example.NET/Send/AbC#p256dh=BXy&auth=Qq "),
            "https://push.example.net/Send/AbC#p256dh=BXy&auth=Qq"
        );
        assert_eq!(normalise_recipient("http://Hooks.Example.com?Token=X"), "http://hooks.example.com?Token=X");
        assert_ne!(normalise_recipient("https://x.io/A"), normalise_recipient("https://x.io/a"));
    }

    #[test]
    fn tenant_names_are_validated() {
        assert!(TenantId::parse("acme-eu_1").is_ok());
        for bad in ["", "Acme", "-acme", "a b", &"a".repeat(64)] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn distinct_recipients_of_one_intent_get_distinct_message_ids(a in "[a-z]{1,12}@[a-z]{1,8}\\.com", b in "[a-z]{1,12}@[a-z]{1,8}\\.com") {
            let i = IntentId(Uuid::from_u128(42));
            prop_assert_eq!(a == b, MessageId::derive(i, &a) == MessageId::derive(i, &b));
        }

        #[test]
        fn event_ids_differ_by_sequence(seq in 0u32..1000) {
            let s = Uuid::from_u128(1);
            prop_assert_ne!(EventId::derive(s, "attempted", seq), EventId::derive(s, "attempted", seq + 1));
        }
    }
}
