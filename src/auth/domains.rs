//! The live table of domains: every tenant's settings and secrets, as the server uses them
//! now.
//!
//! Domains come from two places: the config file (`[[domains]]`, read-only at run time) and
//! the admin API (`/api/admin/domains`, stored in the database). Keys may be added to any
//! domain at run time; each key may carry an expiry, which is how a rotation keeps the old
//! key working for a grace period.
//!
//! Design:
//! - The table is immutable once built and published through an [`ArcSwap`]: a request
//!   reads one consistent snapshot without a lock, and a change builds a whole new table
//!   and swaps it in. Domains are few and change rarely, so rebuilding is cheap; JWKS
//!   verifiers whose settings did not change are carried over with their cached keys.
//! - Everything derived from a domain's settings (origin rules, verifiers, key lookups) is
//!   computed at build time, so an invalid setting is refused when it is saved, never
//!   discovered on a request.
//! - Expiry is checked when a key is used; nothing has to run when a grace period ends.
//! - Live connections per domain are counted here (not in the table) so a rebuild keeps them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use dashmap::DashMap;

use super::jwt::{DomainVerifier, JwtConfigError};
use super::keys::{self, KeyHash};
use crate::config::{DomainConfig, Secret, VisitorRooms};
use crate::model::valid_id;
use crate::store::{DomainKey, KeyKind, StoredDomain};

/// Where a domain's settings live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config file; the admin API cannot change them.
    Config,
    /// The database, through the admin API.
    Admin,
}

impl Source {
    /// Name shown by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Admin => "api",
        }
    }
}

/// One domain as the server uses it.
#[derive(Debug)]
pub struct Domain {
    /// Its settings.
    pub settings: DomainConfig,
    /// Where they live.
    pub source: Source,
    /// Keys added at run time (expired ones included, for the admin listing).
    pub keys: Vec<DomainKey>,
    origins: Origins,
    verifier: Option<Arc<DomainVerifier>>,
}

/// The web origins a domain accepts.
#[derive(Debug, Clone)]
enum Origins {
    Any,
    Listed(HashSet<String>),
}

/// A server key's owner and expiry.
#[derive(Debug, Clone)]
struct ServerKey {
    domain: Arc<str>,
    expires_at: Option<DateTime<Utc>>,
}

/// A Pusher-style key pair.
#[derive(Debug, Clone)]
pub struct PusherKey {
    /// The domain it belongs to.
    pub domain: Arc<str>,
    /// The app it opens (`app_id`, by default the domain id).
    pub app_id: Arc<str>,
    /// Its secret.
    pub secret: Secret,
    /// Where its app's channel changes are posted, signed with it.
    pub webhooks: Arc<[crate::config::PusherWebhookConfig]>,
    expires_at: Option<DateTime<Utc>>,
}

/// Why a set of domain settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// JWT settings that cannot verify anything.
    #[error(transparent)]
    Jwt(#[from] JwtConfigError),
    /// Any other unusable value.
    #[error("domains.{domain}: {message}")]
    Invalid {
        /// The domain.
        domain: String,
        /// What is wrong.
        message: String,
    },
}

impl DomainError {
    fn new(domain: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            domain: domain.to_owned(),
            message: message.into(),
        }
    }
}

/// An immutable snapshot of every domain.
#[derive(Debug, Default)]
pub struct DomainTable {
    domains: HashMap<String, Arc<Domain>>,
    by_issuer: HashMap<String, Arc<DomainVerifier>>,
    /// The one domain whose JWT settings list no issuer: tokens without `iss` that
    /// Parlor's own secret does not verify go to it.
    issuerless: Option<Arc<DomainVerifier>>,
    /// Hashes of the domains' internal secrets.
    internal_secrets: HashMap<KeyHash, Arc<str>>,
    server_keys: HashMap<KeyHash, ServerKey>,
    pusher_keys: HashMap<String, PusherKey>,
    any_origin: bool,
    listed_origins: HashSet<String>,
}

impl DomainTable {
    /// Builds the table from the config file's domains, the stored ones and the run-time
    /// keys. A config-file domain wins over a stored one of the same id. Verifiers of
    /// `previous` whose settings did not change are reused with their cached keys.
    ///
    /// A config-file domain that cannot be used is an error; a stored one is skipped with
    /// an error in the log, so one bad row cannot keep the server from starting.
    pub fn build(
        config: &[DomainConfig],
        stored: &[StoredDomain],
        keys: &[DomainKey],
        previous: Option<&DomainTable>,
    ) -> Result<Self, DomainError> {
        let mut table = DomainTable::default();
        let mut settings: Vec<(DomainConfig, Source)> = Vec::new();
        for d in config {
            settings.push((d.clone(), Source::Config));
        }
        for row in stored {
            let Some(json) = &row.settings else { continue };
            if config.iter().any(|d| d.id == row.id) {
                tracing::warn!(domain = %row.id, "domain is in the config file and the database; the file wins");
                continue;
            }
            match serde_json::from_str::<DomainConfig>(json) {
                Ok(d) if d.id == row.id => settings.push((d, Source::Admin)),
                Ok(_) => {
                    tracing::error!(domain = %row.id, "stored domain names another id; skipped");
                }
                Err(e) => {
                    tracing::error!(domain = %row.id, error = %e, "stored domain settings unreadable; skipped");
                }
            }
        }
        for (d, source) in settings {
            let id = d.id.clone();
            let run_time_keys: Vec<DomainKey> =
                keys.iter().filter(|k| k.domain_id == id).cloned().collect();
            let previous = previous.and_then(|p| p.domains.get(&id));
            match table.add(d, source, run_time_keys, previous) {
                Ok(()) => {}
                Err(e) if source == Source::Admin => {
                    tracing::error!(domain = %id, error = %e, "stored domain cannot be used; skipped");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(table)
    }

    /// Adds one domain with its derived lookups.
    fn add(
        &mut self,
        settings: DomainConfig,
        source: Source,
        run_time_keys: Vec<DomainKey>,
        previous: Option<&Arc<Domain>>,
    ) -> Result<(), DomainError> {
        let id = settings.id.clone();
        check(&settings)?;
        if self.domains.contains_key(&id) {
            return Err(DomainError::new(&id, "declared twice"));
        }
        let owner: Arc<str> = Arc::from(id.as_str());
        let verifier = match &settings.jwt {
            None => None,
            Some(jwt) => Some(
                match previous.map(|p| &**p).filter(|p| {
                    p.settings.jwt.as_ref() == Some(jwt) && p.settings.dialect == settings.dialect
                }) {
                    Some(Domain {
                        verifier: Some(v), ..
                    }) => Arc::clone(v),
                    _ => Arc::new(DomainVerifier::new(&id, jwt, settings.dialect)?),
                },
            ),
        };
        if let Some(v) = &verifier {
            if v.issuers().is_empty() {
                if let Some(other) = &self.issuerless {
                    return Err(DomainError::new(
                        &id,
                        format!(
                            "jwt.issuer is empty here and in domain {:?}: at most one domain may \
                             take tokens without `iss` (the issuer is what says which domain a \
                             token is for)",
                            other.domain()
                        ),
                    ));
                }
                self.issuerless = Some(Arc::clone(v));
            }
            for iss in v.issuers() {
                if self.by_issuer.insert(iss.clone(), Arc::clone(v)).is_some() {
                    return Err(DomainError::new(
                        &id,
                        format!("issuer {iss:?} is claimed by two domains"),
                    ));
                }
            }
        }
        let mut add_server_key = |hash: KeyHash, expires_at| {
            let entry = ServerKey {
                domain: Arc::clone(&owner),
                expires_at,
            };
            match self.server_keys.insert(hash, entry) {
                Some(other) if *other.domain != *owner => Err(DomainError::new(
                    &id,
                    format!("a server key is also listed by domain {:?}", other.domain),
                )),
                _ => Ok(()),
            }
        };
        if let Some(secret) = &settings.internal_secret {
            let hash = keys::hash(secret.expose());
            if self
                .internal_secrets
                .insert(hash, Arc::clone(&owner))
                .is_some()
            {
                return Err(DomainError::new(
                    &id,
                    "the internal secret is also another domain's",
                ));
            }
        }
        for entry in &settings.server_keys {
            let hash = keys::parse_entry(entry).map_err(|m| DomainError::new(&id, m))?;
            add_server_key(hash, None)?;
        }
        let mut pusher = Vec::new();
        for p in &settings.pusher_keys {
            let app_id = p
                .app_id
                .as_deref()
                .map_or_else(|| Arc::clone(&owner), Arc::from);
            let hooks: Arc<[_]> = Arc::from(p.webhooks.as_slice());
            pusher.push((p.key.clone(), app_id, p.secret.clone(), hooks, None, None));
        }
        // A bad run-time key is left out with an error in the log: it must not take its
        // domain (or, for a config-file domain, the server's start) down with it.
        for k in &run_time_keys {
            match k.kind {
                KeyKind::Server => {
                    let added = keys::parse_entry(k.secret.expose())
                        .map_err(|m| DomainError::new(&id, m))
                        .and_then(|hash| add_server_key(hash, k.expires_at));
                    if let Err(e) = added {
                        tracing::error!(key = %k.id, error = %e, "run-time key left out");
                    }
                }
                KeyKind::Pusher => {
                    if let Some(public) = &k.public_id {
                        pusher.push((
                            public.clone(),
                            Arc::clone(&owner),
                            k.secret.clone(),
                            Arc::from([]),
                            k.expires_at,
                            Some(&k.id),
                        ));
                    }
                }
            }
        }
        for (key, app_id, secret, webhooks, expires_at, run_time) in pusher {
            let entry = PusherKey {
                domain: Arc::clone(&owner),
                app_id,
                secret,
                webhooks,
                expires_at,
            };
            if self.pusher_keys.contains_key(&key) {
                let e = DomainError::new(&id, format!("Pusher key {key:?} is used twice"));
                match run_time {
                    None => return Err(e),
                    Some(k) => tracing::error!(key = %k, error = %e, "run-time key left out"),
                }
                continue;
            }
            self.pusher_keys.insert(key, entry);
        }
        let origins = if settings.allowed_origins.iter().any(|o| o == "*") {
            self.any_origin = true;
            Origins::Any
        } else {
            let list: HashSet<String> = settings
                .allowed_origins
                .iter()
                .map(|o| normalise(o))
                .collect();
            self.listed_origins.extend(list.iter().cloned());
            Origins::Listed(list)
        };
        self.domains.insert(
            id,
            Arc::new(Domain {
                settings,
                source,
                keys: run_time_keys,
                origins,
                verifier,
            }),
        );
        Ok(())
    }

    /// The domain `id`, if it exists.
    pub fn get(&self, id: &str) -> Option<&Arc<Domain>> {
        self.domains.get(id)
    }

    /// Every domain, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Domain>> {
        self.domains.values()
    }

    /// The verifier of the domain whose `issuer` list holds `iss`.
    pub fn verifier_for(&self, iss: &str) -> Option<&Arc<DomainVerifier>> {
        self.by_issuer.get(iss)
    }

    /// Whether any domain accepts its own tokens (saves decoding a token's claims when not).
    pub fn has_issuers(&self) -> bool {
        !self.by_issuer.is_empty() || self.issuerless.is_some()
    }

    /// The verifier of the domain that takes tokens without `iss`, if there is one.
    pub fn issuerless(&self) -> Option<&Arc<DomainVerifier>> {
        self.issuerless.as_ref()
    }

    /// The domain whose internal secret is `secret`.
    pub fn internal_secret_domain(&self, secret: &str) -> Option<&Arc<str>> {
        self.internal_secrets.get(&keys::hash(secret))
    }

    /// The public domain whose `allowed_origins` name `origin` itself (not through `"*"`),
    /// if exactly one does: a page's own site, which a token-less client from it is in
    /// unless it names another domain.
    pub fn public_for_origin(&self, origin: &str) -> Option<&str> {
        let origin = normalise(origin);
        let mut found = self.domains.values().filter(|d| {
            d.settings.public
                && matches!(&d.origins, Origins::Listed(list) if list.contains(&origin))
        });
        let first = found.next()?;
        found.next().is_none().then_some(first.settings.id.as_str())
    }

    /// The domain `id` if a client without a token may choose it: the demo, or a domain
    /// marked `public` whose `allowed_origins` hold `origin` (when the request has one).
    pub fn public_domain(&self, id: &str, origin: Option<&str>) -> Option<&Arc<Domain>> {
        let domain = self.domains.get(id)?;
        if id != crate::config::DEMO_DOMAIN && !domain.settings.public {
            return None;
        }
        self.origin_allowed(id, origin).then_some(domain)
    }

    /// The domain whose back end holds server key `key`, if the key works at `now`.
    pub fn server_key_domain(&self, key: &str, now: DateTime<Utc>) -> Option<&Arc<str>> {
        self.server_keys
            .get(&keys::hash(key))
            .filter(|k| k.expires_at.is_none_or(|at| at > now))
            .map(|k| &k.domain)
    }

    /// The Pusher key pair `key`, if it works at `now`.
    pub fn pusher_key(&self, key: &str, now: DateTime<Utc>) -> Option<&PusherKey> {
        self.pusher_keys
            .get(key)
            .filter(|k| k.expires_at.is_none_or(|at| at > now))
    }

    /// `domain`'s Pusher key named `key`, or its first working one by name, if it works at
    /// `now`: the key and its pair.
    pub fn pusher_key_of(
        &self,
        domain: &str,
        key: Option<&str>,
        now: DateTime<Utc>,
    ) -> Option<(&str, &PusherKey)> {
        self.pusher_keys
            .iter()
            .filter(|(name, k)| {
                &*k.domain == domain
                    && key.is_none_or(|wanted| wanted == name.as_str())
                    && k.expires_at.is_none_or(|at| at > now)
            })
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(name, k)| (name.as_str(), k))
    }

    /// The webhooks of app `app_id` of `domain`, each with the key that signs it.
    pub fn pusher_webhooks(&self, domain: &str, app_id: &str) -> Vec<(&str, &PusherKey)> {
        self.pusher_keys
            .iter()
            .filter(|(_, k)| &*k.domain == domain && &*k.app_id == app_id && !k.webhooks.is_empty())
            .map(|(name, k)| (name.as_str(), k))
            .collect()
    }

    /// Which rooms visitors of `domain` may use; `owned` (the strictest) for a domain that
    /// no longer exists.
    pub fn visitor_rooms(&self, domain: &str) -> VisitorRooms {
        self.domains
            .get(domain)
            .map_or(VisitorRooms::Owned, |d| d.settings.visitor_rooms)
    }

    /// Whether a page of `origin` may use `domain`. Requests without an `Origin` header
    /// (not from a browser page) pass when `origin` is `None`.
    pub fn origin_allowed(&self, domain: &str, origin: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        match self.domains.get(domain).map(|d| &d.origins) {
            Some(Origins::Any) => true,
            Some(Origins::Listed(list)) => list.contains(&normalise(origin)),
            None => false,
        }
    }

    /// Whether `domain` accepts any origin at all (`"*"`).
    pub fn any_origin(&self, domain: &str) -> bool {
        matches!(
            self.domains.get(domain).map(|d| &d.origins),
            Some(Origins::Any)
        )
    }

    /// Whether some domain lists `origin` by name (not only through `"*"`).
    pub fn lists_origin(&self, origin: &str) -> bool {
        self.listed_origins.contains(&normalise(origin))
    }

    /// Whether some domain accepts `origin` (what CORS answers for).
    pub fn cors_allows(&self, origin: &str) -> bool {
        self.any_origin || self.listed_origins.contains(&normalise(origin))
    }
}

/// Checks what serde cannot: ids, origins and limits.
fn check(d: &DomainConfig) -> Result<(), DomainError> {
    if !valid_id(&d.id) {
        return Err(DomainError::new(&d.id, "invalid domain id"));
    }
    for o in &d.allowed_origins {
        let ok = o == "*"
            || ((o.starts_with("https://") || o.starts_with("http://"))
                && !o.contains(char::is_whitespace));
        if !ok {
            return Err(DomainError::new(
                &d.id,
                format!("allowed origin {o:?} must be \"*\" or scheme://host[:port]"),
            ));
        }
    }
    let l = &d.limits;
    if l.max_connections == Some(0)
        || l.messages_per_second == Some(0)
        || l.messages_burst == Some(0)
    {
        return Err(DomainError::new(&d.id, "limits must be greater than 0"));
    }
    if let Some(bot) = &d.bot
        && (!valid_id(&bot.author_id) || bot.author_name.trim().is_empty())
    {
        return Err(DomainError::new(
            &d.id,
            "bot.author_id must be a valid user id and bot.author_name not empty",
        ));
    }
    if let Some(secret) = &d.internal_secret {
        let s = secret.expose();
        // Anything else would be read as a JWT or a key and never reach the secret.
        if s.len() < 16
            || s.contains(['.', ' ', '\t'])
            || s.starts_with(keys::KEY_PREFIX)
            || s.starts_with(keys::ADMIN_KEY_PREFIX)
        {
            return Err(DomainError::new(
                &d.id,
                "internal_secret must be at least 16 bytes, without dots or spaces, and not \
                 start with pk_ or ak_",
            ));
        }
    }
    if let Some(url) = &d.ai_service_url
        && (!(url.starts_with("https://") || url.starts_with("http://"))
            || reqwest::Url::parse(url).is_err())
    {
        return Err(DomainError::new(
            &d.id,
            "ai_service_url must be an http:// or https:// URL",
        ));
    }
    check_webhooks(d)?;
    for p in &d.pusher_keys {
        if p.key.is_empty() || p.secret.expose().len() < 16 {
            return Err(DomainError::new(
                &d.id,
                "a Pusher key needs a key and a secret of at least 16 bytes",
            ));
        }
        if let Some(app_id) = &p.app_id
            && !crate::model::valid_id(app_id)
        {
            return Err(DomainError::new(
                &d.id,
                format!("Pusher app_id {app_id:?}: 1–128 characters of A-Z a-z 0-9 - _ . : @"),
            ));
        }
        for hook in &p.webhooks {
            let url = reqwest::Url::parse(&hook.url).ok();
            if !url.is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host()) {
                return Err(DomainError::new(
                    &d.id,
                    format!(
                        "Pusher webhook url {:?} must be an http:// or https:// URL",
                        hook.url
                    ),
                ));
            }
            if hook.events.is_empty() {
                return Err(DomainError::new(
                    &d.id,
                    "a Pusher webhook needs at least one event (or none given: all four)",
                ));
            }
        }
    }
    Ok(())
}

/// Checks a domain's webhooks: http(s) URLs with a host, each once, secrets of 16 bytes or
/// more, at least one event.
fn check_webhooks(d: &DomainConfig) -> Result<(), DomainError> {
    for (i, hook) in d.webhooks.iter().enumerate() {
        let url = reqwest::Url::parse(&hook.url).ok();
        if !url.is_some_and(|u| {
            matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
        }) {
            return Err(DomainError::new(
                &d.id,
                format!(
                    "webhooks[{i}].url {:?} must be an http:// or https:// URL with a host",
                    hook.url
                ),
            ));
        }
        if d.webhooks[..i].iter().any(|h| h.url == hook.url) {
            return Err(DomainError::new(
                &d.id,
                format!("webhooks[{i}].url {:?} is listed twice", hook.url),
            ));
        }
        if hook.secret.expose().len() < 16 {
            return Err(DomainError::new(
                &d.id,
                format!("webhooks[{i}].secret must be at least 16 bytes"),
            ));
        }
        if hook.events.is_empty() {
            return Err(DomainError::new(
                &d.id,
                format!(
                    "webhooks[{i}].events is empty; name at least one event (message.created, \
                     conversation.escalated, …)"
                ),
            ));
        }
    }
    Ok(())
}

/// Origins compare without a trailing slash and case-insensitively.
fn normalise(origin: &str) -> String {
    origin.trim_end_matches('/').to_ascii_lowercase()
}

/// The current table, swapped whole on every change, and live connection counts.
#[derive(Debug)]
pub struct Domains {
    table: ArcSwap<DomainTable>,
    /// The config file's domains, rebuilt into every table.
    config: Vec<DomainConfig>,
    connections: DashMap<String, Arc<AtomicUsize>>,
}

impl Domains {
    /// The table of the config file's domains alone (before the store is open).
    pub fn new(config: &[DomainConfig]) -> Result<Self, DomainError> {
        let table = DomainTable::build(config, &[], &[], None)?;
        Ok(Self {
            table: ArcSwap::from_pointee(table),
            config: config.to_vec(),
            connections: DashMap::new(),
        })
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<DomainTable> {
        self.table.load_full()
    }

    /// Rebuilds the table from stored domains and keys and publishes it.
    pub fn replace(&self, stored: &[StoredDomain], keys: &[DomainKey]) -> Result<(), DomainError> {
        let current = self.table.load();
        let table = DomainTable::build(&self.config, stored, keys, Some(&current))?;
        self.table.store(Arc::new(table));
        Ok(())
    }

    /// Checks that `candidate` could join the current table (ids, issuers and keys unique,
    /// JWT settings usable) without changing anything.
    pub fn check_candidate(&self, candidate: &DomainConfig) -> Result<(), DomainError> {
        let current = self.table.load();
        let mut table = DomainTable::default();
        for d in current.iter().filter(|d| d.settings.id != candidate.id) {
            table.add(d.settings.clone(), d.source, d.keys.clone(), Some(d))?;
        }
        table.add(
            candidate.clone(),
            Source::Admin,
            Vec::new(),
            current.get(&candidate.id),
        )
    }

    /// Counts a new connection of `domain` unless it already has `max`; the permit gives
    /// the place back when dropped.
    pub fn admit(&self, domain: &str, max: Option<usize>) -> Option<DomainPermit> {
        let counter = Arc::clone(
            self.connections
                .entry(domain.to_owned())
                .or_insert_with(|| Arc::new(AtomicUsize::new(0)))
                .value(),
        );
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max.is_none_or(|m| n < m)).then_some(n + 1)
            })
            .is_ok();
        admitted.then_some(DomainPermit(counter))
    }
}

/// One counted connection of a domain.
#[derive(Debug)]
pub struct DomainPermit(Arc<AtomicUsize>);

impl Drop for DomainPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
