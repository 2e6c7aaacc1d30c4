//! Typed configuration.
//!
//! One [`Config`] value is built at start-up from, in increasing priority: built-in defaults,
//! a TOML file (`parlor.toml` when present, or `--config FILE`), `PARLOR_*` environment
//! variables (`PARLOR_SECTION__KEY`, e.g. `PARLOR_LIMITS__MESSAGES_PER_SECOND=50`) and
//! command-line flags. It is validated once ([`Config::validate`]) and then passed down
//! through state; nothing reads configuration from a global.
//!
//! Every key is documented in `parlor.example.toml`; a test keeps that file and these
//! defaults in step. Secrets are wrapped in [`Secret`] so `Debug` never prints them.
//!
//! Files: `server` (listening, limits, storage, the server's tokens), `domain` (a tenant's
//! settings), `ai` (providers and bots), `urls` (connection URLs and environment checks),
//! `explain` (figment's errors as sentences), `durations`; this file holds [`Config`], its
//! loading and validation.

mod ai;
mod domain;
mod durations;
mod explain;
mod files;
mod server;
#[cfg(test)]
mod tests;
mod urls;

pub use ai::*;
pub use domain::*;
use durations::{duration_ms, duration_text};
pub use files::*;
pub use server::*;
pub use urls::*;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP and WebSocket listener binds to: `HOST:PORT`, the host an IP
    /// address or a name resolved at start-up. The default, `127.0.0.1:8080`, is reachable
    /// from this machine only; servers and containers listen on `0.0.0.0:8080`.
    pub listen: ListenAddr,
    /// Storage location: `sqlite://PATH` (created if missing), or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` (also `postgresql://`) for several
    /// nodes sharing one PostgreSQL database (its schema is created or migrated at start-up).
    pub database: String,
    /// Message distribution between nodes: `memory` (one node) or `redis://HOST:PORT` (several
    /// nodes sharing a PostgreSQL database; see `docs/deploy.md`).
    pub broker: String,
    /// Prefix of the Redis keys and channels, so several clusters can share one Redis.
    pub broker_prefix: String,
    /// With Redis: how long a node's presence entries live without renewal (renewed every
    /// third of it); the users of a node that died disappear from rooms after this long.
    pub broker_presence_ttl_secs: u64,
    /// With Redis: how often each node compares its active rooms' last `seq` with the store,
    /// so that a room's last message lost between nodes (which no later message reveals)
    /// reaches every member within two of these intervals and a store read.
    #[serde(with = "duration_ms")]
    pub broker_position_check_ms: Duration,
    /// Log output format: `text` for people, `json` for log collectors.
    pub log_format: LogFormat,
    /// Log filter in `tracing_subscriber::EnvFilter` syntax; `RUST_LOG` overrides it.
    pub log_level: String,
    /// How long a graceful shutdown may take before the process exits anyway.
    #[serde(with = "duration_ms")]
    pub shutdown_timeout_ms: Duration,
    /// Per-connection and per-message limits.
    pub limits: Limits,
    /// Storage tuning.
    pub store: StoreConfig,
    /// Authentication settings.
    pub auth: AuthConfig,
    /// AI providers (see `docs/ai.md`).
    pub ai: AiConfig,
    /// Reverse proxies (addresses or CIDR ranges, e.g. `10.0.0.0/8`) whose
    /// `X-Forwarded-For` header is believed: a request from one of them is limited by the
    /// client address it forwarded. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<String>,
    /// The web pages: widget, agent inbox, demo (see `docs/handoff.md`).
    pub web: WebConfig,
    /// Guided sessions (`/chat`, see `docs/sessions.md`).
    pub sessions: SessionsConfig,
    /// Notifications (see `docs/notifications.md`).
    pub notifications: NotificationsConfig,
    /// Uploaded files: where they are kept and their limits (see `docs/files.md`).
    pub files: FilesConfig,
    /// Delivery of the domains' webhooks (see `docs/webhooks.md`).
    pub webhooks: WebhooksConfig,
    /// Tenants. A `demo` domain is always present (see [`Config::validate`]).
    pub domains: Vec<DomainConfig>,
}

/// Guided sessions: how long they are kept, and how the domain's AI service is called.
/// Durations are written with a unit: `500ms`, `30s`, `15m`, `24h`, `7d`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Incomplete sessions untouched for this long are deleted.
    #[serde(with = "duration_text")]
    pub stale_after: Duration,
    /// Complete sessions and their documents are deleted this long after completion;
    /// `0s` keeps them.
    #[serde(with = "duration_text")]
    pub keep_completed: Duration,
    /// How often one node looks for sessions to delete.
    #[serde(with = "duration_text")]
    pub cleanup_every: Duration,
    /// Longest a call to a domain's AI service may take, connecting included.
    #[serde(with = "duration_text")]
    pub ai_service_timeout: Duration,
    /// Automatic retries of a failed AI-service call (1 s, 2 s, 4 s… apart); after them the
    /// user's next message retries.
    pub ai_service_retries: u32,
    /// Clarifying questions the built-in guide may ask per question when the domain's AI
    /// vendor finds an answer vague (0: never).
    pub follow_ups: u32,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(24 * 3600),
            keep_completed: Duration::ZERO,
            cleanup_every: Duration::from_secs(600),
            ai_service_timeout: Duration::from_secs(30),
            ai_service_retries: 5,
            follow_ups: 1,
        }
    }
}

/// Notifications: how long they are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationsConfig {
    /// Notifications older than this many days are deleted, read or not; `0` keeps them.
    pub retain_days: u32,
    /// How often one node looks for notifications to delete.
    #[serde(with = "duration_text")]
    pub cleanup_every: Duration,
    /// A cookie that carries the user's JWT (the app's own session cookie, when it is a
    /// JWT Parlor can verify): the notification endpoints read the user from it when a
    /// request has no `Authorization` header. Unset: the header only.
    pub token_cookie: Option<String>,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            retain_days: 90,
            cleanup_every: Duration::from_secs(3600),
            token_cookie: None,
        }
    }
}

/// How the domains' webhooks are delivered from the outbox: every node takes part, each
/// event partition (a room, a user, a visitor, a session) by one node at a time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// How long a node holds the events it took; once it passes (the node died), another
    /// node takes them over. Longer than `attempt_timeout`.
    #[serde(with = "duration_text")]
    pub lease: Duration,
    /// How often a node looks for events to send when it has nothing to do.
    #[serde(with = "duration_text")]
    pub poll_every: Duration,
    /// Longest one POST may take, connecting included.
    #[serde(with = "duration_text")]
    pub attempt_timeout: Duration,
    /// Wait after the first failed attempt; it doubles after each failure.
    #[serde(with = "duration_text")]
    pub min_backoff: Duration,
    /// Longest wait between two attempts.
    #[serde(with = "duration_text")]
    pub max_backoff: Duration,
    /// An event not delivered this long after it happened is given up (`dead`).
    #[serde(with = "duration_text")]
    pub retry_for: Duration,
    /// Posts in flight to one URL at once, per node.
    pub per_destination: usize,
    /// Events one node has in flight at most.
    pub max_in_flight: usize,
    /// Delivered and dead events are deleted this long after they ended (`0s`: kept).
    #[serde(with = "duration_text")]
    pub keep_finished: Duration,
    /// How often one node deletes them (in small batches).
    #[serde(with = "duration_text")]
    pub cleanup_every: Duration,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
            poll_every: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(3600),
            retry_for: Duration::from_secs(24 * 3600),
            per_destination: 4,
            max_in_flight: 64,
            keep_finished: Duration::from_secs(7 * 24 * 3600),
            cleanup_every: Duration::from_secs(600),
        }
    }
}

/// The pages compiled into the binary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Whether `POST /api/dev/agent-token` hands out agent tokens of the `demo` domain to
    /// anyone, so the demo's inbox can be tried at once. Turn it off in production.
    pub dev_login: bool,
    /// Serve the pages from this folder instead of the copies compiled in (for working on
    /// them without rebuilding). Unset: the compiled-in pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            dev_login: true,
            dir: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ListenAddr::new("127.0.0.1", 8080),
            database: "sqlite://parlor.db".to_owned(),
            broker: "memory".to_owned(),
            broker_prefix: "parlor".to_owned(),
            broker_presence_ttl_secs: 30,
            broker_position_check_ms: Duration::from_secs(1),
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            shutdown_timeout_ms: Duration::from_secs(10),
            limits: Limits::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            ai: AiConfig::default(),
            trusted_proxies: Vec::new(),
            web: WebConfig::default(),
            sessions: SessionsConfig::default(),
            notifications: NotificationsConfig::default(),
            files: FilesConfig::default(),
            webhooks: WebhooksConfig::default(),
            domains: vec![DomainConfig::demo()],
        }
    }
}

/// Identifier of the built-in demo domain.
pub const DEMO_DOMAIN: &str = "demo";

/// A configuration value that must never be printed.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why a configuration was refused. Each is one sentence naming the key as the user wrote
/// it: in the file (with its line) or as an environment variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file is missing, unreadable or not TOML.
    #[error("cannot read the configuration file {}: {reason}", path.display())]
    File {
        /// The file, as it was named.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A key of the file or the environment is unknown, or its value has the wrong type.
    #[error("{place} {problem}")]
    Key {
        /// Where the key was written: "`limits.x` in parlor.toml, line 3", or "the
        /// environment variable PARLOR_LIMITS__X".
        place: String,
        /// What is wrong, with a suggestion when one is close ("is not a configuration
        /// key; did you mean …?").
        problem: String,
    },
    /// A value parsed but makes no sense.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Command-line values that override the file and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<ListenAddr>,
    /// `--database`
    pub database: Option<String>,
    /// `--broker`
    pub broker: Option<String>,
    /// `--log-format`
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// Loads defaults, then `file` (or `./parlor.toml` when `file` is `None` and it exists),
    /// then `PARLOR_*` variables, then `overrides`, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let file = match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::File {
                        path: path.to_owned(),
                        reason: "there is no such file".to_owned(),
                    });
                }
                Some(path.to_owned())
            }
            None => Some(PathBuf::from("parlor.toml")).filter(|p| p.exists()),
        };
        if let Some(path) = &file {
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only variables naming a configuration key are read: `PARLOR_TEST_*` configures the
        // test suite, `PARLOR_CONFIG` names the file, and a deployment may have other
        // `PARLOR_*` variables of its own (see [`ignored_env_vars`]). A typo inside a known
        // section (`PARLOR_LIMITS__TYPO`) is still refused.
        let env = Env::prefixed("PARLOR_")
            .filter(|key| is_config_key(key.as_str()))
            .split("__");
        figment = figment.merge(env);
        let mut config: Config = figment
            .extract()
            .map_err(|e| explain::figment_error(e, file.as_deref()))?;
        if let Some(listen) = &overrides.listen {
            config.listen.clone_from(listen);
        }
        if let Some(database) = &overrides.database {
            config.database.clone_from(database);
        }
        if let Some(broker) = &overrides.broker {
            config.broker.clone_from(broker);
        }
        if let Some(format) = overrides.log_format {
            config.log_format = format;
        }
        config.add_vendor_providers(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work, and adds the `demo` domain when missing.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let positive = [
            ("limits.max_connections", l.max_connections),
            ("limits.max_frame_bytes", l.max_frame_bytes),
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.messages_per_second", l.messages_per_second as usize),
            ("limits.messages_burst", l.messages_burst as usize),
            ("limits.rooms_per_connection", l.rooms_per_connection),
            ("limits.outbound_queue", l.outbound_queue),
            ("limits.outbound_queue_bytes", l.outbound_queue_bytes),
            ("limits.replay_chunk", l.replay_chunk),
            ("limits.max_replay", l.max_replay),
            ("limits.presence_max_members", l.presence_max_members),
            ("limits.max_page", l.max_page),
            ("limits.max_body_bytes", l.max_body_bytes),
            (
                "limits.ip_connects_per_second",
                l.ip_connects_per_second as usize,
            ),
            ("limits.ip_connects_burst", l.ip_connects_burst as usize),
            (
                "limits.ip_requests_per_second",
                l.ip_requests_per_second as usize,
            ),
            ("limits.ip_requests_burst", l.ip_requests_burst as usize),
            (
                "limits.ip_visitor_tokens_per_minute",
                l.ip_visitor_tokens_per_minute as usize,
            ),
            (
                "limits.ip_visitor_reports_per_minute",
                l.ip_visitor_reports_per_minute as usize,
            ),
            (
                "limits.header_timeout_ms",
                usize::from(!l.header_timeout_ms.is_zero()),
            ),
            (
                "limits.body_timeout_ms",
                usize::from(!l.body_timeout_ms.is_zero()),
            ),
            (
                "limits.ws_pong_timeout_ms",
                usize::from(!l.ws_pong_timeout_ms.is_zero()),
            ),
            (
                "limits.ip_ai_requests_per_minute",
                l.ip_ai_requests_per_minute as usize,
            ),
            (
                "limits.ip_ai_tokens_per_minute",
                usize::try_from(l.ip_ai_tokens_per_minute).unwrap_or(usize::MAX),
            ),
            ("limits.ai_calls_per_domain", l.ai_calls_per_domain),
            ("store.max_batch", self.store.max_batch),
            ("store.write_queue", self.store.write_queue),
            ("store.room_cache", self.store.room_cache),
            ("store.read_pool", self.store.read_pool),
            ("store.postgres_pool", self.store.postgres_pool),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be greater than 0"
                )));
            }
        }
        if l.max_message_bytes > l.max_frame_bytes {
            return Err(ConfigError::Invalid(
                "limits.max_message_bytes cannot exceed limits.max_frame_bytes".to_owned(),
            ));
        }
        let s = &self.sessions;
        for (name, value) in [
            ("sessions.stale_after", s.stale_after),
            ("sessions.cleanup_every", s.cleanup_every),
            ("sessions.ai_service_timeout", s.ai_service_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be longer than 0s"
                )));
            }
        }
        let w = &self.webhooks;
        for (name, value) in [
            ("webhooks.lease", w.lease),
            ("webhooks.poll_every", w.poll_every),
            ("webhooks.attempt_timeout", w.attempt_timeout),
            ("webhooks.min_backoff", w.min_backoff),
            ("webhooks.max_backoff", w.max_backoff),
            ("webhooks.retry_for", w.retry_for),
            ("webhooks.cleanup_every", w.cleanup_every),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be longer than 0s"
                )));
            }
        }
        if w.per_destination == 0 || w.max_in_flight == 0 {
            return Err(ConfigError::Invalid(
                "webhooks.per_destination and webhooks.max_in_flight must be greater than 0"
                    .to_owned(),
            ));
        }
        if w.lease <= w.attempt_timeout {
            return Err(ConfigError::Invalid(
                "webhooks.lease must be longer than webhooks.attempt_timeout (a node holds an \
                 event for the whole attempt)"
                    .to_owned(),
            ));
        }
        if w.min_backoff > w.max_backoff {
            return Err(ConfigError::Invalid(
                "webhooks.min_backoff cannot exceed webhooks.max_backoff".to_owned(),
            ));
        }
        if self.database_path().is_none() && self.postgres_url().is_none() {
            return Err(ConfigError::Invalid(format!(
                "database must be sqlite://PATH or postgres://USER@HOST/DATABASE (got {:?})",
                self.database
            )));
        }
        if self.broker_url().is_none() && self.broker != "memory" {
            return Err(ConfigError::Invalid(format!(
                "broker must be \"memory\" or redis://HOST:PORT (got {:?})",
                self.broker
            )));
        }
        if let Some(url) = self.broker_url() {
            check_url_parameters("broker", url, BROKER_PARAMETERS)?;
            if url.starts_with("redis://") && url_parameter(url, "sslrootcert").is_some() {
                return Err(ConfigError::Invalid(
                    "broker: sslrootcert is for TLS; use a rediss:// URL".to_owned(),
                ));
            }
        }
        if let Some(url) = self.postgres_url() {
            check_url_parameters("database", url, POSTGRES_PARAMETERS)?;
        }
        if self.broker_position_check_ms < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                "broker_position_check_ms must be at least 100".to_owned(),
            ));
        }
        if self.broker_presence_ttl_secs == 0 {
            return Err(ConfigError::Invalid(
                "broker_presence_ttl_secs must be greater than 0".to_owned(),
            ));
        }
        if !crate::model::valid_id(&self.broker_prefix) {
            return Err(ConfigError::Invalid(
                "broker_prefix must be 1-128 characters of A-Z a-z 0-9 - _ . : @".to_owned(),
            ));
        }
        if let Some(secret) = &self.auth.jwt_secret
            && secret.expose().len() < 16
        {
            return Err(ConfigError::Invalid(
                "auth.jwt_secret must be at least 16 bytes".to_owned(),
            ));
        }
        for d in &self.domains {
            if !crate::model::valid_id(&d.id) {
                return Err(ConfigError::Invalid(format!(
                    "invalid domain id {:?}",
                    d.id
                )));
            }
            d.handoff
                .hours()
                .map_err(|e| ConfigError::Invalid(format!("domains.{}.handoff: {e}", d.id)))?;
        }
        self.trusted_proxy_ranges()?;
        self.files.validate(&self.domains)?;
        for (name, p) in &self.ai.providers {
            if p.model.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "ai.providers.{name}.model is empty"
                )));
            }
            if p.connect_timeout_ms == 0 || p.first_token_timeout_ms == 0 || p.total_timeout_ms == 0
            {
                return Err(ConfigError::Invalid(format!(
                    "ai.providers.{name}: timeouts must be greater than 0"
                )));
            }
        }
        for d in &self.domains {
            for name in d.bot.iter().flat_map(|b| &b.providers) {
                if !self.ai.providers.contains_key(name) {
                    return Err(ConfigError::Invalid(format!(
                        "domains.{}.bot.providers names {name:?}, which is not in [ai.providers]",
                        d.id
                    )));
                }
            }
        }
        if !self.domains.iter().any(|d| d.id == DEMO_DOMAIN) {
            self.domains.push(DomainConfig::demo());
        }
        Ok(())
    }

    /// Adds the providers the vendors' own environment variables describe (`OPENAI_API_KEY`
    /// with `OPENAI_BASE_URL` and `OPENAI_MODEL`; `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`,
    /// `ANTHROPIC_MODEL`; `GOOGLE_AI_API_KEY` or `GEMINI_API_KEY`, `GEMINI_BASE_URL`,
    /// `GEMINI_MODEL`), unless a provider of that name is configured. A demo bot without
    /// its own provider list then uses them, OpenAI first.
    pub fn add_vendor_providers(&mut self, env: impl Fn(&str) -> Option<String>) {
        let vendors = [
            (
                "openai",
                ProviderKind::Openai,
                &["OPENAI_API_KEY"][..],
                "OPENAI",
                "gpt-4o-mini",
            ),
            (
                "anthropic",
                ProviderKind::Anthropic,
                &["ANTHROPIC_API_KEY"][..],
                "ANTHROPIC",
                "claude-haiku-4-5",
            ),
            (
                "gemini",
                ProviderKind::Gemini,
                &["GOOGLE_AI_API_KEY", "GEMINI_API_KEY"][..],
                "GEMINI",
                "gemini-2.5-flash",
            ),
        ];
        let mut added = Vec::new();
        for (name, kind, keys, prefix, model) in vendors {
            let Some(key) = keys.iter().find_map(|k| env(k)) else {
                continue;
            };
            if self.ai.providers.contains_key(name) {
                continue;
            }
            let mut provider = ProviderConfig::new(
                kind,
                env(&format!("{prefix}_MODEL")).unwrap_or_else(|| model.to_owned()),
            );
            provider.base_url = env(&format!("{prefix}_BASE_URL"));
            provider.api_key = Some(Secret::new(key));
            self.ai.providers.insert(name.to_owned(), provider);
            added.push(name.to_owned());
        }
        if let Some(bot) = self
            .domains
            .iter_mut()
            .find(|d| d.id == DEMO_DOMAIN)
            .and_then(|d| d.bot.as_mut())
            && bot.providers.is_empty()
        {
            bot.providers = added;
        }
    }

    /// `trusted_proxies` parsed; a bare address is a range of one.
    pub fn trusted_proxy_ranges(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::Invalid(format!(
                            "trusted_proxies: {p:?} is not an IP address or CIDR range"
                        ))
                    })
            })
            .collect()
    }

    /// The Redis URL of `broker`, if it names one (`memory` does not).
    pub fn broker_url(&self) -> Option<&str> {
        (self.broker.starts_with("redis://") || self.broker.starts_with("rediss://"))
            .then_some(self.broker.as_str())
    }

    /// The SQLite file path of `database`, if it is a `sqlite://` URL.
    pub fn database_path(&self) -> Option<PathBuf> {
        let rest = self
            .database
            .strip_prefix("sqlite://")
            .or_else(|| self.database.strip_prefix("sqlite:"))?;
        (!rest.is_empty()).then(|| PathBuf::from(rest))
    }

    /// `database`, if it is a `postgres://` or `postgresql://` URL.
    pub fn postgres_url(&self) -> Option<&str> {
        let rest = self
            .database
            .strip_prefix("postgres://")
            .or_else(|| self.database.strip_prefix("postgresql://"))?;
        (!rest.is_empty()).then_some(self.database.as_str())
    }
}
