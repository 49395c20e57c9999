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
        Self(clustering(Uuid::new_v5(&NS_INTENT, &name)))
    }

    /// A new intent id that derives from nothing (an idempotency key that
    /// outlived its retention starts one).
    pub fn fresh() -> Self {
        Self(clustering(Uuid::new_v4()))
    }

    /// Whether this intent's message ids begin with its own first 48 bits
    /// (see `MessageId::derive`). Intents get such ids (version 8) since
    /// 2026-12-03; older ones (version 5, or 4 from a renewed key) keep the
    /// plain derivation, so re-rendering one never changes its message ids.
    pub fn clusters_messages(self) -> bool {
        self.0.get_version_num() == 8
    }
}

/// The same 122 bits marked as version 8 (RFC 9562 §5.8): an id of this
/// crate's layout rather than a name-based one.
fn clustering(id: Uuid) -> Uuid {
    uuid::Builder::from_custom_bytes(*id.as_bytes()).into_uuid()
}

/// How many leading bytes a message id shares with its intent's id.
const INTENT_PREFIX: usize = 6;

impl IntentId {
    /// The intent of item `index` of a batch submission whose own intent id
    /// is `self`: each item is an independent intent, derived so that
    /// replaying the batch yields the same ids. An item's id follows its
    /// batch's in how its messages' ids derive (see `clusters_messages`).
    pub fn item(self, index: u32) -> IntentId {
        let derived = Uuid::new_v5(&NS_INTENT, &[self.0.as_bytes().as_slice(), &index.to_be_bytes()].concat());
        IntentId(if self.clusters_messages() { clustering(derived) } else { derived })
    }
}

impl MessageId {
    /// A message id derives from (intent id, recipient), so rendering an
    /// intent twice yields the same messages. The recipient is normalised
    /// first: `A@Example.COM` and `a@example.com` are one recipient.
    ///
    /// The messages of an intent whose id is of version 8 (every intent
    /// accepted now) begin with the intent id's first 48 bits, the other 74
    /// bits coming from the hash. So a campaign's messages sit side by side
    /// in every index keyed by message id (claims, read-model rows,
    /// attempts): their inserts touch a few new index pages instead of
    /// pages all over an index that grows with every campaign, each of which
    /// the database must write whole into its log once per checkpoint.
    pub fn derive(intent: IntentId, recipient: &str) -> Self {
        let normalised = normalise_recipient(recipient);
        let mut name = Vec::with_capacity(16 + normalised.len());
        name.extend_from_slice(intent.0.as_bytes());
        name.extend_from_slice(normalised.as_bytes());
        let hashed = Uuid::new_v5(&NS_MESSAGE, &name);
        if !intent.clusters_messages() {
            return Self(hashed);
        }
        let mut bytes = *hashed.as_bytes();
        bytes[..INTENT_PREFIX].copy_from_slice(&intent.0.as_bytes()[..INTENT_PREFIX]);
        Self(clustering(Uuid::from_bytes(bytes)))
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
    fn an_older_intent_keeps_the_message_ids_it_always_had() {
        // Version 5 as every intent before 2026-12-03 (and 4, a renewed
        // key's): the plain derivation, pinned.
        let old = IntentId(Uuid::from_u128(7));
        assert!(!old.clusters_messages());
        assert_eq!(MessageId::derive(old, "Bob@example.com").to_string(), "aa1213a5-2694-50eb-a39e-f0c7f39d9273");
        let batch = IntentId(Uuid::new_v5(&NS_INTENT, b"old batch"));
        assert!(!batch.item(3).clusters_messages(), "an old batch's items keep the old derivation");
        assert!(!IntentId(Uuid::new_v4()).clusters_messages());
    }

    #[test]
    fn a_new_intents_messages_share_its_first_48_bits() {
        let t = TenantId::parse("acme").unwrap();
        for intent in [IntentId::from_idempotency_key(&t, "k-1"), IntentId::fresh()] {
            assert!(intent.clusters_messages());
            assert_eq!(intent.0.get_version_num(), 8);
            assert!(intent.item(0).clusters_messages() && intent.item(0) != intent.item(1));
            let a = MessageId::derive(intent, "a@example.com");
            let b = MessageId::derive(intent, "b@example.com");
            assert_ne!(a, b);
            assert_eq!(a, MessageId::derive(intent, " A@Example.com"), "still derived from (intent, recipient)");
            for m in [a, b] {
                assert_eq!(m.0.get_version_num(), 8);
                assert_eq!(m.0.get_variant(), uuid::Variant::RFC4122);
                assert_eq!(m.0.as_bytes()[..INTENT_PREFIX], intent.0.as_bytes()[..INTENT_PREFIX]);
            }
        }
        // Pinned: a key gives this intent id, and so these message ids, on
        // every instance and release.
        let intent = IntentId::from_idempotency_key(&t, "k-1");
        assert_eq!(intent.0.to_string(), PINNED_INTENT);
        assert_eq!(MessageId::derive(intent, "bob@example.com").to_string(), PINNED_MESSAGE);
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

    const PINNED_INTENT: &str = "e798548e-13d5-87ee-a615-06fc43e90632";
    const PINNED_MESSAGE: &str = "e798548e-13d5-8fda-a25c-39782a3f0c26";

    proptest! {
        #[test]
        fn distinct_recipients_of_one_intent_get_distinct_message_ids(a in "[a-z]{1,12}@[a-z]{1,8}\\.com", b in "[a-z]{1,12}@[a-z]{1,8}\\.com") {
            for i in [IntentId(Uuid::from_u128(42)), IntentId::from_idempotency_key(&TenantId::parse("acme").unwrap(), "k")] {
                prop_assert_eq!(a == b, MessageId::derive(i, &a) == MessageId::derive(i, &b));
            }
        }

        #[test]
        fn event_ids_differ_by_sequence(seq in 0u32..1000) {
            let s = Uuid::from_u128(1);
            prop_assert_ne!(EventId::derive(s, "attempted", seq), EventId::derive(s, "attempted", seq + 1));
        }
    }
}
