//! Pusher Channels compatibility (`docs/pusher.md`): what the socket endpoint
//! (`crate::transport::ws::pusher`), the HTTP API ([`api`]) and Parlor's own channel
//! authorisation endpoint ([`auth`]) share: the app an app key or id names, the channel
//! kinds and names, and Pusher's HMAC-SHA256 signatures.
//!
//! An app is one of a domain's `pusher_keys` (`app_id`, `key`, `secret`; the app id is the
//! domain id unless set). Its channels are the hub's channels under the domain
//! ([`crate::hub::channels`]), so two domains never share a channel whatever their apps
//! are called, and the channels of one app reach every node.

pub mod api;
pub mod auth;
pub mod webhooks;

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;
use crate::model::RoomKey;
use crate::transport::AppState;

/// Longest channel name Pusher accepts.
pub const MAX_CHANNEL_LEN: usize = 164;
/// Largest event data Pusher accepts, in bytes (10 KB).
pub const MAX_EVENT_BYTES: usize = 10 * 1024;
/// Longest event name Pusher accepts.
pub const MAX_EVENT_NAME_LEN: usize = 200;
/// The prefix of the channel a signed-in user's server-to-user events take.
pub const SERVER_TO_USER: &str = "#server-to-user-";

/// One Pusher app: its domain, id, key and secret.
#[derive(Debug, Clone)]
pub struct App {
    /// The domain whose app it is.
    pub domain: Arc<str>,
    /// The app id (`/apps/{id}`).
    pub id: Arc<str>,
    /// The key clients and SDKs name it by.
    pub key: String,
    /// What signs for it.
    pub secret: Secret,
}

impl App {
    /// The app of the key `key`, if some domain has it and it works now.
    pub fn by_key(state: &AppState, key: &str) -> Option<Self> {
        let table = state.auth.domains().load();
        let k = table.pusher_key(key, chrono::Utc::now())?;
        Some(Self::new(key, k))
    }

    /// `domain`'s app of the key `key`, or of its first key by name.
    pub fn of_domain(state: &AppState, domain: &str, key: Option<&str>) -> Option<Self> {
        let table = state.auth.domains().load();
        let (key, k) = table.pusher_key_of(domain, key, chrono::Utc::now())?;
        Some(Self::new(key, k))
    }

    fn new(key: &str, k: &crate::auth::domains::PusherKey) -> Self {
        Self {
            domain: Arc::clone(&k.domain),
            id: Arc::clone(&k.app_id),
            key: key.to_owned(),
            secret: k.secret.clone(),
        }
    }

    /// The hub key of the app's channel `name`.
    pub fn channel(&self, name: &str) -> RoomKey {
        crate::hub::channels::channel_key(&self.domain, &self.id, name)
    }

    /// HMAC-SHA256 of `parts` (concatenated) with the app's secret, as lower-case hex.
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        hex::encode(self.mac(parts).finalize().into_bytes())
    }

    /// Whether `signature` (hex, either case) is the app's HMAC-SHA256 of `parts`;
    /// compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], signature: &str) -> bool {
        hex::decode(signature).is_ok_and(|sig| self.mac(parts).verify_slice(&sig).is_ok())
    }

    /// Whether `auth` is `key:signature` of `parts` by this app, as Pusher's channel and
    /// user authorisations are.
    pub fn verify_auth(&self, auth: &str, parts: &[&[u8]]) -> bool {
        auth.split_once(':')
            .is_some_and(|(key, signature)| key == self.key && self.verify(parts, signature))
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.expose().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        for part in parts {
            mac.update(part);
        }
        mac
    }
}

/// What a channel's name makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anyone may subscribe.
    Public,
    /// `private-`: a subscription needs the app's signature.
    Private,
    /// `private-encrypted-`: as private; the events are end-to-end encrypted by the
    /// clients, and clients may not send events on it.
    Encrypted,
    /// `presence-`: signed, with the member's `channel_data`.
    Presence,
}

impl Kind {
    /// The kind of the channel `name`.
    pub fn of(name: &str) -> Self {
        if name.starts_with("private-encrypted-") {
            Kind::Encrypted
        } else if name.starts_with("private-") {
            Kind::Private
        } else if name.starts_with("presence-") {
            Kind::Presence
        } else {
            Kind::Public
        }
    }
}

/// Why a channel name is refused; `None` for a good one: 1–164 characters of
/// `A-Z a-z 0-9 _ - = @ , . ;`.
pub fn invalid_channel(name: &str) -> Option<String> {
    let good = !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b));
    (!good).then(|| {
        format!(
            "invalid channel name {:?}: 1–{MAX_CHANNEL_LEN} characters of A-Z a-z 0-9 _ - = @ , . ;",
            truncate(name)
        )
    })
}

/// At most 64 characters of `s`, for messages that quote the client.
pub fn truncate(s: &str) -> &str {
    s.char_indices().nth(64).map_or(s, |(at, _)| &s[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App {
            domain: Arc::from("demo"),
            id: Arc::from("app"),
            key: "app-key".to_owned(),
            secret: Secret::new("app-secret-of-16-bytes"),
        }
    }

    #[test]
    fn a_signature_verifies_in_either_case_and_only_for_its_parts() {
        let app = app();
        let sig = app.sign(&[b"1.2", b":", b"private-a"]);
        assert!(app.verify(&[b"1.2:private-a"], &sig));
        assert!(app.verify(&[b"1.2:private-a"], &sig.to_uppercase()));
        assert!(!app.verify(&[b"1.2:private-b"], &sig));
        assert!(!app.verify(&[b"1.2:private-a"], "zz"));
        assert!(app.verify_auth(&format!("app-key:{sig}"), &[b"1.2:private-a"]));
        assert!(!app.verify_auth(&format!("other:{sig}"), &[b"1.2:private-a"]));
        assert!(!app.verify_auth(&sig, &[b"1.2:private-a"]));
    }

    #[test]
    fn channel_kinds_and_names() {
        assert_eq!(Kind::of("private-encrypted-x"), Kind::Encrypted);
        assert_eq!(Kind::of("private-x"), Kind::Private);
        assert_eq!(Kind::of("presence-x"), Kind::Presence);
        assert_eq!(Kind::of("x"), Kind::Public);
        assert!(invalid_channel("a-Z_0=@,.;").is_none());
        assert!(invalid_channel("").is_some());
        assert!(invalid_channel("a b").is_some());
        assert!(invalid_channel("#server-to-user-1").is_some());
        assert!(invalid_channel(&"a".repeat(165)).is_some());
    }
}
