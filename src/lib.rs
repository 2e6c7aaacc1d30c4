//! Parlor: a self-hosted real-time conversation server.
//!
//! The parts, in the order a message flows through them (see `ARCHITECTURE.md`):
//!
//! - [`transport`] — wire formats: the native WebSocket protocol (`/ws`) and the HTTP API.
//!   Transports call services; they reach the store and hub only through a service's
//!   accessors (health checks, presence lists), never their internals.
//! - [`service`] — what Parlor does (chat, the AI assistant, hand-off to human agents,
//!   domains), independent of any wire format.
//! - [`ai`] — AI providers: one streaming trait, real clients of OpenAI-compatible servers,
//!   Anthropic and Gemini.
//! - [`auth`] — who is calling ([`auth::Authenticator`]) and what they may do
//!   ([`auth::policy`]).
//! - [`hub`] — active rooms, their members and presence; fans stored messages out to every
//!   member's bounded queue in `seq` order.
//! - [`broker`] — carries stored messages, room events and presence to every node
//!   (in-process by default); it delivers to one registered handler and never sees the hub.
//! - [`node`] — the node's supervisor (every task and thread it runs; a worker's panic fails
//!   the node), its broker handler (`node::Events`: what the broker delivers, to the hub or
//!   the service it is for), the commit pipeline from the store to the broker and the
//!   hand-off observer, and whether the node is alone or one of several.
//! - [`store`] — durable storage behind a trait; SQLite with group commit.
//! - [`model`], [`event`], [`config`], [`metrics`] — shared vocabulary, the room-event type
//!   (made by the hub, carried by the broker), typed configuration, counters;
//!   [`failpoint`] — faults injected by tests (debug builds only).
//!
//! [`run`] is the entry point: it takes a validated [`Config`], a bound listener and a
//! cancellation token, serves until the token is cancelled (or the node fails), then shuts
//! down in order: stop accepting, tell clients to reconnect, let connections finish, flush
//! writes, drain the commit pipeline, close the broker, close the store.

pub mod ai;
pub mod auth;
pub mod broker;
pub mod config;
pub mod error_code;
pub mod event;
pub mod failpoint;
pub mod hub;
pub mod metrics;
pub mod model;
pub mod node;
pub mod service;
pub mod store;
pub mod transport;

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

pub use config::Config;
use transport::{AppInner, AppState};

use crate::auth::{Authenticator, Domains};
use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::shared::Shared;
use crate::config::Secret;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::service::ai::AiService;
use crate::service::chat::ChatService;
use crate::service::domains::DomainService;
use crate::service::handoff::HandoffService;
use crate::service::sessions::SessionService;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// Name of the stored setting holding the generated token-signing secret (used when
/// `auth.jwt_secret` is not configured).
pub const SIGNING_SECRET_SETTING: &str = "jwt_secret";

/// An I/O error in words, without the system's error number: "connection refused", "the
/// address is already in use". Errors people read use it instead of `io::Error`'s text.
pub fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let text = match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused",
        ErrorKind::ConnectionReset => "the connection was reset",
        ErrorKind::TimedOut => "the connection timed out",
        ErrorKind::AddrInUse => "the address is already in use",
        ErrorKind::AddrNotAvailable => "the address is not one of this machine's",
        ErrorKind::PermissionDenied => "permission denied",
        ErrorKind::NotFound => "no such file or directory",
        ErrorKind::HostUnreachable => "the host is unreachable",
        ErrorKind::NetworkUnreachable => "the network is unreachable",
        _ => {
            let text = e.to_string();
            return match text.find(" (os error") {
                Some(end) => text[..end].to_owned(),
                None => text,
            };
        }
    };
    text.to_owned()
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store failed after it was opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database could not be opened: which one, and why.
    #[error("{0}")]
    Database(String),
    /// The configuration cannot be served.
    #[error("{0}")]
    Config(String),
    /// The listener failed.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    /// A part of the node stopped working (a worker panicked); it shut down.
    #[error("the node failed: {0}")]
    Failed(String),
}

/// Runs `round` every `every` (at least 100 ms) until shutdown, one round at a time: the
/// periodic clean-ups, which the store's leases give to one node at a time.
fn spawn_every<F, R>(
    supervisor: &node::Supervisor,
    name: &'static str,
    every: std::time::Duration,
    round: F,
) where
    F: Fn() -> R + Send + 'static,
    R: Future<Output = ()> + Send,
{
    let shutdown = supervisor.shutdown().clone();
    let every = every.max(std::time::Duration::from_millis(100));
    supervisor.spawn(name, async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => round().await,
            }
        }
    });
}

/// Deletes stale guided sessions every `sessions.cleanup_every`, and notifications past
/// `notifications.retain_days` every `notifications.cleanup_every`, on one node at a time.
fn spawn_cleanups(
    sessions: &Arc<SessionService>,
    notifications: &Arc<crate::service::notifications::NotificationService>,
    supervisor: &node::Supervisor,
) {
    let node: Arc<str> = uuid::Uuid::now_v7().to_string().into();
    let (service, holder) = (Arc::clone(sessions), Arc::clone(&node));
    spawn_every(
        supervisor,
        "session-cleanup",
        sessions.config().cleanup_every,
        move || {
            let (service, holder) = (Arc::clone(&service), Arc::clone(&holder));
            async move {
                if let Err(e) = service.clean_up(&holder).await {
                    tracing::warn!(error = %e, "cannot delete stale guided sessions; the next round retries");
                }
            }
        },
    );
    if notifications.config().retain_days == 0 {
        return;
    }
    let service = Arc::clone(notifications);
    spawn_every(
        supervisor,
        "notification-cleanup",
        notifications.config().cleanup_every,
        move || {
            let (service, holder) = (Arc::clone(&service), Arc::clone(&node));
            async move {
                if let Err(e) = service.clean_up(&holder).await {
                    tracing::warn!(error = %e, "cannot delete old notifications; the next round retries");
                }
            }
        },
    );
}

/// A built server: state, router and the background pieces shutdown must stop.
#[derive(Debug)]
pub struct App {
    /// Shared state (also inside the router).
    pub state: AppState,
    store: Arc<dyn Store>,
    pipeline: tokio::task::JoinHandle<()>,
}

impl App {
    /// Opens the store, creates the configured domains and wires hub, broker and services.
    /// Nothing listens yet: [`App::router`] gives the HTTP app, [`run`] serves it.
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, RunError> {
        let config = Arc::new(config);
        let invalid = |e: String| RunError::Config(format!("invalid configuration: {e}"));
        // Unusable domain settings stop the start before anything is opened.
        let domains = Arc::new(Domains::new(&config.domains).map_err(|e| invalid(e.to_string()))?);
        let metrics = Arc::new(Metrics::new());
        let supervisor = node::Supervisor::new(shutdown.clone(), Arc::clone(&metrics));
        let (committed_tx, committed_rx) = mpsc::unbounded_channel();
        let backlog = node::pipeline::Backlog::new(config.store.pipeline_backlog);
        let failed = supervisor.clone();
        let sink = store::CommitSink::new(committed_tx)
            .counting(backlog.entries())
            .on_panic(Arc::new(move |name, panic| {
                failed.panicked(name, panic);
            }));
        let store = open_store(&config, sink).await?;
        for domain in &config.domains {
            store.upsert_domain(&domain.id, &domain.name).await?;
        }
        let domain_admin = Arc::new(DomainService::new(Arc::clone(&store), Arc::clone(&domains)));
        domain_admin
            .reload()
            .await
            .map_err(|e| invalid(e.to_string()))?;
        let signing_secret = signing_secret(&config, &*store).await?;
        let auth =
            Authenticator::new(&config, Arc::clone(&domains), signing_secret).map_err(invalid)?;

        // The broker first: it knows nothing of the hub or the services, and delivers to
        // the handler registered once they exist. One process: everything in memory.
        // Several nodes: the broker and the cluster-wide state share the Redis.
        let (broker, shared): (Arc<dyn Broker>, Shared) = match config.broker_url() {
            None => (
                Arc::new(MemoryBroker::new()),
                Shared::local(Arc::clone(&metrics)),
            ),
            Some(url) => {
                let config_error = |e: &dyn std::fmt::Display| RunError::Config(e.to_string());
                let ttl = std::time::Duration::from_secs(config.broker_presence_ttl_secs);
                let broker =
                    RedisBroker::connect(url, &config.broker_prefix, ttl, &metrics, &supervisor)
                        .await
                        .map_err(|e| config_error(&e))?;
                let shared = Shared::connect(
                    url,
                    &config.broker_prefix,
                    ttl,
                    Arc::clone(&metrics),
                    &supervisor,
                )
                .await
                .map_err(|e| config_error(&e))?;
                (broker, shared)
            }
        };
        // The hub sends its room events and presence changes through the broker.
        let hub = Hub::new(
            Arc::clone(&store),
            Arc::clone(&metrics),
            config.store.room_cache,
            config.limits.presence_max_members,
            &*broker,
            &supervisor,
        );
        // Pusher apps' webhooks hear of their channels' changes on the cluster.
        hub.watch_channels(crate::transport::pusher::webhooks::PusherWebhooks::start(
            Arc::clone(&domains),
            Arc::clone(&metrics),
            &supervisor,
        ));
        // A publication lost between nodes is found by the next message of its room; the
        // last one of a room, only by comparing the room with the store.
        if broker.may_lose() {
            spawn_position_checks(
                Arc::clone(&hub),
                config.broker_position_check_ms,
                &supervisor,
            );
        }
        let chat = Arc::new(ChatService::new(
            Arc::clone(&store),
            Arc::clone(&hub),
            Arc::clone(&metrics),
            config.limits.clone(),
            Arc::clone(&domains),
            Arc::clone(&backlog),
        ));
        let ai = Arc::new(
            AiService::new(
                &config.ai,
                &config.limits,
                Arc::clone(&chat),
                Arc::clone(&domains),
                Arc::clone(&metrics),
                shared.clone(),
                &supervisor,
            )
            .map_err(invalid)?,
        );
        let handoff = Arc::new(HandoffService::new(
            Arc::clone(&chat),
            Arc::clone(&ai),
            Arc::clone(&domains),
            Arc::clone(&metrics),
            Arc::clone(&broker),
            shared.clone(),
        ));
        // Domain changes travel to the other nodes.
        domain_admin.attach(&broker);
        // Last, what the broker delivers finds the node's parts: messages and room events
        // the hub, state changes and the agents' feed the hand-off service, the other
        // nodes' domain changes the domain service, their notifications the notifications
        // service.
        let notifications = crate::service::notifications::NotificationService::new(
            Arc::clone(&store),
            Arc::clone(&broker),
            shared.clone(),
            Arc::clone(&metrics),
            config.notifications.clone(),
            &supervisor,
        );
        broker.register(Arc::new(
            node::Events::new(hub)
                .with_remote(&handoff)
                .with_domains(&domain_admin)
                .with_notifications(&notifications),
        ));
        // A change announced while this node was cut off from Redis is caught up when it
        // reconnects; the periodic rebuild also bounds how long a node that never noticed the
        // outage (a lost publication) uses a revoked key.
        if broker.topology().is_cluster() {
            let watched = Arc::downgrade(&domain_admin);
            let stop = shutdown.clone();
            supervisor.spawn("domain-rebuild", async move {
                let mut tick = tokio::time::interval(DOMAIN_REBUILD_EVERY);
                tick.tick().await;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let Some(service) = watched.upgrade() else {
                        return;
                    };
                    node::events::DomainListener::domains_changed(&*service).await;
                }
            });
        }
        // Committed messages, in commit order per room, to the broker and the hand-off
        // service, which keeps the inbox current and hands visitors' messages to the bot
        // while a room is with it.
        let pipeline = node::pipeline::start(
            &supervisor,
            committed_rx,
            Arc::clone(&broker),
            Arc::clone(&handoff) as Arc<dyn node::pipeline::Observer>,
            &backlog,
        );
        let accounts = Arc::new(crate::service::accounts::AccountService::new(
            Arc::clone(&store),
            Arc::clone(&domains),
        ));
        let sessions = Arc::new(
            SessionService::new(
                &config,
                Arc::clone(&store),
                Arc::clone(&domains),
                Arc::clone(&ai),
                Arc::clone(&metrics),
            )
            .map_err(|e| invalid(e.to_string()))?,
        );
        spawn_cleanups(&sessions, &notifications, &supervisor);
        let sockets = transport::ws::SocketWatch::new(supervisor.shutdown().clone());
        supervisor.spawn(
            "socket-watch",
            Arc::clone(&sockets).run(config.limits.clone()),
        );
        let visitors = Arc::new(crate::service::visitors::VisitorService::new(
            Arc::clone(&store),
            shared.clone(),
        ));
        let stats = Arc::new(crate::service::stats::StatsService::new(
            Arc::clone(&store),
            Arc::clone(&visitors),
            Arc::clone(&ai),
        ));
        let files = Arc::new(
            crate::service::files::FileService::new(
                &config.files,
                Arc::clone(&store),
                Arc::clone(&domains),
                Arc::clone(&metrics),
            )
            .map_err(invalid)?,
        );
        tracing::info!(store = files.location(), "files are kept in the file store");
        // The domains' webhooks, delivered from the store's outbox by every node.
        let webhooks = crate::service::webhooks::WebhookService::start(
            Arc::clone(&store),
            Arc::clone(&domains),
            Arc::clone(&metrics),
            config.webhooks.clone(),
            &supervisor,
        );
        let state = AppState::new(AppInner {
            sockets,
            accounts,
            visitors,
            stats,
            files,
            webhooks,
            sessions,
            notifications,
            ai,
            handoff,
            auth,
            edge: transport::edge::Edge::new(&config, domains, shared.clone()),
            shared,
            domain_admin,
            connection_permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            config,
            chat,
            broker,
            metrics,
            supervisor,
            started: Instant::now(),
        });
        Ok(Self {
            state,
            store,
            pipeline,
        })
    }

    /// The HTTP and WebSocket app.
    pub fn router(&self) -> axum::Router {
        transport::router(self.state.clone())
    }

    /// Stops the node in order, each step within `until`: waits for the connections to
    /// finish, flushes the store's writes, lets the commit pipeline publish and observe what
    /// was committed, closes the broker, then the store. Call after the shutdown token is
    /// cancelled. Returns why the node failed, if it did.
    pub async fn shutdown(self, until: tokio::time::Instant) -> Option<String> {
        let supervisor = &self.state.supervisor;
        let connections = supervisor.connections();
        connections.close();
        if tokio::time::timeout_at(until, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections did not finish in time; closing anyway");
        }
        // The writer commits what is queued and exits, which closes the commit sink.
        self.store.flush().await;
        if tokio::time::timeout_at(until, self.pipeline).await.is_err() {
            tracing::warn!("committed messages were still being published at the deadline");
        }
        let workers = supervisor.workers();
        workers.close();
        if tokio::time::timeout_at(until, workers.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not finish in time; closing anyway");
        }
        self.state.broker.close().await;
        self.state.shared.close().await;
        self.store.close().await;
        supervisor.failure().map(str::to_owned)
    }
}

/// Compares `hub`'s active rooms with the store every `every` until `stop`, catching up the
/// rooms a lost publication left behind ([`hub::Check::Lost`]). A store that does not answer
/// is reported once, and again when it answers.
fn spawn_position_checks(hub: Arc<Hub>, every: std::time::Duration, supervisor: &node::Supervisor) {
    let stop = supervisor.shutdown().clone();
    supervisor.spawn("position-checks", async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match hub.check_positions(hub::Check::Lost).await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("position checks against the store work again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot compare rooms with the store; retrying");
                }
                Err(_) => {}
            }
        }
    });
}

/// How often a node of a cluster rebuilds its domain table from the store, whatever it heard.
const DOMAIN_REBUILD_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens the configured store; committed messages go to `sink`.
async fn open_store(config: &Config, sink: store::CommitSink) -> Result<Arc<dyn Store>, RunError> {
    // The store's reason without its "storage unavailable" prefix, which says nothing here.
    let reason = |e: StoreError| match e {
        StoreError::Unavailable(reason) | StoreError::Corrupt(reason) => reason,
        other => other.to_string(),
    };
    if let Some(url) = config.postgres_url() {
        let store = store::postgres::PostgresStore::open(url, &config.store, sink)
            .await
            .map_err(|e| RunError::Database(reason(e)))?;
        return Ok(Arc::new(store));
    }
    let path = config
        .database_path()
        .ok_or_else(|| RunError::Config(format!("unsupported database {:?}", config.database)))?;
    let shown = path.display().to_string();
    let store_config = config.store.clone();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path, &store_config, sink))
        .await
        .map_err(|e| RunError::Config(format!("store start-up failed: {e}")))?
        .map_err(|e| {
            RunError::Database(format!(
                "cannot open the SQLite database {shown}: {}",
                reason(e)
            ))
        })?;
    Ok(Arc::new(store))
}

/// The secret signing Parlor's own tokens: `auth.jwt_secret`, or else the one generated on
/// first start and kept in the store.
async fn signing_secret(config: &Config, store: &dyn Store) -> Result<Secret, StoreError> {
    match &config.auth.jwt_secret {
        Some(secret) => Ok(secret.clone()),
        None => store::generated_setting(store, SIGNING_SECRET_SETTING, auth::keys::random_hex)
            .await
            .map(Secret::new),
    }
}

/// Why `parlor token` cannot sign a token that the server would accept.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The SQLite file does not exist: this is not where the server keeps its data.
    #[error(
        "there is no Parlor database at {}, so there is no server secret to sign with; run \
         `parlor token` where the server runs (in its directory), or pass the server's \
         --config FILE or --database URL",
        .0.display()
    )]
    NoDatabase(std::path::PathBuf),
    /// The database exists but no Parlor server has used it.
    #[error(
        "{0} has no Parlor schema, so there is no server secret to sign with; start the \
         server on it once, or pass the server's --config FILE or --database URL"
    )]
    NoSchema(String),
    /// The server has not generated its secret yet.
    #[error(
        "{0} holds no signing secret yet; start the server on it once, or set \
         auth.jwt_secret (the same for the server and `parlor token`)"
    )]
    NoSecret(String),
    /// The domain is neither in the configuration nor created through the admin API.
    #[error(
        "there is no domain {domain:?} in the configuration or the database (domains: {})",
        .known.join(", ")
    )]
    UnknownDomain {
        /// The domain asked for.
        domain: String,
        /// The domains there are.
        known: Vec<String>,
    },
    /// The database could not be read.
    #[error("cannot read {place}: {reason}")]
    Unreadable {
        /// The database, for people ("the SQLite database parlor.db").
        place: String,
        /// Why.
        reason: String,
    },
}

/// What `parlor token` reads from a server's database.
#[derive(Debug, Default)]
struct StoredForTokens {
    /// The generated signing secret, if the server made one.
    secret: Option<String>,
    /// The domains created through the admin API.
    domains: Vec<String>,
}

/// The secret that signs a token for `domain` which a server with `config` accepts:
/// `auth.jwt_secret`, or the secret the server generated in its database.
///
/// Nothing is created or migrated: a database that does not exist, or that no server has
/// started on, is an error, since a token signed with a secret made up here would be refused
/// by the server (`signature does not verify`). The domain must be in the configuration or
/// have been created through the admin API.
pub async fn token_secret(config: &Config, domain: &str) -> Result<Secret, TokenError> {
    let in_config = config.domains.iter().any(|d| d.id == domain);
    let stored = if config.auth.jwt_secret.is_none() || !in_config {
        Some(read_for_tokens(config).await)
    } else {
        None
    };
    let stored = match (stored, &config.auth.jwt_secret) {
        // The secret can come only from the database.
        (Some(Err(e)), None) => return Err(e),
        (Some(Ok(stored)), _) => Some(stored),
        // A configured secret: the database could only have named more domains.
        _ => None,
    };
    let secret = match (&config.auth.jwt_secret, &stored) {
        (Some(secret), _) => secret.clone(),
        (
            None,
            Some(StoredForTokens {
                secret: Some(secret),
                ..
            }),
        ) => Secret::new(secret.clone()),
        (None, _) => return Err(TokenError::NoSecret(database_place(config))),
    };
    let runtime_domains = stored.map(|s| s.domains).unwrap_or_default();
    if !in_config && !runtime_domains.iter().any(|d| d == domain) {
        let mut known: Vec<String> = config.domains.iter().map(|d| d.id.clone()).collect();
        known.extend(runtime_domains);
        return Err(TokenError::UnknownDomain {
            domain: domain.to_owned(),
            known,
        });
    }
    Ok(secret)
}

/// The agent accounts of the server whose configuration is `config`, for `parlor agent`:
/// its store opened (the server's own database, which must exist: nothing is created) and
/// its domains, those of the configuration and those created through the admin API.
pub async fn account_admin(
    config: &Config,
) -> Result<(service::accounts::AccountService, Arc<dyn Store>), AccountAdminError> {
    // The same check `parlor token` makes: a server has used this database.
    match read_for_tokens(config).await {
        Ok(_) => {}
        Err(TokenError::NoDatabase(path)) => return Err(AccountAdminError::NoDatabase(path)),
        Err(TokenError::NoSchema(place)) => return Err(AccountAdminError::NoSchema(place)),
        Err(e) => return Err(AccountAdminError::Open(e.to_string())),
    }
    let store = open_store(config, mpsc::unbounded_channel().0.into())
        .await
        .map_err(|e| AccountAdminError::Open(e.to_string()))?;
    let domains = Arc::new(
        Domains::new(&config.domains).map_err(|e| AccountAdminError::Open(e.to_string()))?,
    );
    DomainService::new(Arc::clone(&store), Arc::clone(&domains))
        .reload()
        .await
        .map_err(|e| AccountAdminError::Open(e.to_string()))?;
    let accounts = service::accounts::AccountService::new(Arc::clone(&store), domains);
    Ok((accounts, store))
}

/// Why `parlor agent` cannot reach the server's accounts.
#[derive(Debug, thiserror::Error)]
pub enum AccountAdminError {
    /// The SQLite file does not exist: this is not where the server keeps its data.
    #[error(
        "there is no Parlor database at {}; run `parlor agent` where the server runs (in its \
         directory), or pass the server's --config FILE or --database URL",
        .0.display()
    )]
    NoDatabase(std::path::PathBuf),
    /// No server has used the database.
    #[error(
        "{0} has no Parlor schema; start the server on it once, or pass the server's \
         --config FILE or --database URL"
    )]
    NoSchema(String),
    /// It could not be opened.
    #[error("cannot open the server's database: {0}")]
    Open(String),
}

/// The configured database, for people.
fn database_place(config: &Config) -> String {
    match config.database_path() {
        Some(path) => format!("the SQLite database {}", path.display()),
        None => format!(
            "the PostgreSQL database {}",
            config::redact_url(&config.database)
        ),
    }
}

/// Reads the signing secret and the admin-created domains without writing anything.
async fn read_for_tokens(config: &Config) -> Result<StoredForTokens, TokenError> {
    let place = database_place(config);
    if let Some(url) = config.postgres_url() {
        return read_postgres_for_tokens(url, place).await;
    }
    let path = config
        .database_path()
        .ok_or_else(|| TokenError::NoSchema(place.clone()))?;
    tokio::task::spawn_blocking(move || read_sqlite_for_tokens(&path, place))
        .await
        .map_err(|e| TokenError::Unreadable {
            place: "the database".to_owned(),
            reason: e.to_string(),
        })?
}

/// [`read_for_tokens`] of a SQLite file. It is opened without `CREATE`, so a missing file
/// stays missing.
fn read_sqlite_for_tokens(
    path: &std::path::Path,
    place: String,
) -> Result<StoredForTokens, TokenError> {
    use rusqlite::{OpenFlags, OptionalExtension};
    if !path.exists() {
        return Err(TokenError::NoDatabase(path.to_owned()));
    }
    let unreadable = |e: rusqlite::Error| TokenError::Unreadable {
        place: place.clone(),
        reason: e.to_string(),
    };
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(unreadable)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(unreadable)?;
    let has_schema: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'server_settings')",
            [],
            |r| r.get(0),
        )
        .map_err(unreadable)?;
    if !has_schema {
        return Err(TokenError::NoSchema(place));
    }
    let secret = conn
        .query_row(
            "SELECT value FROM server_settings WHERE name = ?1",
            [SIGNING_SECRET_SETTING],
            |r| r.get(0),
        )
        .optional()
        .map_err(unreadable)?;
    let mut stmt = conn
        .prepare("SELECT id FROM domains WHERE settings IS NOT NULL ORDER BY id")
        .map_err(unreadable)?;
    let domains = stmt
        .query_map([], |r| r.get(0))
        .and_then(Iterator::collect)
        .map_err(unreadable)?;
    Ok(StoredForTokens { secret, domains })
}

/// [`read_for_tokens`] of a PostgreSQL database: reads only, never migrates.
async fn read_postgres_for_tokens(url: &str, place: String) -> Result<StoredForTokens, TokenError> {
    use sqlx::Connection;
    let unreadable = |reason: String| TokenError::Unreadable {
        place: place.clone(),
        reason,
    };
    let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url)
        .map_err(|e| unreadable(format!("the URL is invalid ({e})")))?;
    let mut conn = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        sqlx::postgres::PgConnection::connect_with(&options),
    )
    .await
    .map_err(|_| unreadable("PostgreSQL did not answer within 10 s".to_owned()))?
    .map_err(|e| unreadable(store::postgres::reason(&e)))?;
    let read = async {
        let table: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('server_settings')::text")
                .fetch_one(&mut conn)
                .await?;
        if table.is_none() {
            return Ok(None);
        }
        let secret: Option<String> =
            sqlx::query_scalar("SELECT value FROM server_settings WHERE name = $1")
                .bind(SIGNING_SECRET_SETTING)
                .fetch_optional(&mut conn)
                .await?;
        let domains: Vec<String> =
            sqlx::query_scalar("SELECT id FROM domains WHERE settings IS NOT NULL ORDER BY id")
                .fetch_all(&mut conn)
                .await?;
        Ok::<_, sqlx::Error>(Some(StoredForTokens { secret, domains }))
    };
    let result = read.await;
    let _ = conn.close().await;
    match result {
        Ok(Some(stored)) => Ok(stored),
        Ok(None) => Err(TokenError::NoSchema(place)),
        Err(e) => Err(unreadable(store::postgres::reason(&e))),
    }
}

/// `http://HOST:PORT` of a server listening on `addr`, as a browser on this machine opens
/// it: `localhost` for the loopback and the unspecified address (`0.0.0.0`), which a browser
/// cannot open.
pub fn base_url(addr: std::net::SocketAddr) -> String {
    let ip = addr.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        format!("http://localhost:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

/// Serves Parlor on `listener` until `shutdown` is cancelled, then shuts down gracefully
/// within `config.shutdown_timeout_ms`: stop accepting, send `reconnect` and close frames,
/// let connections finish, flush writes, close the store.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let app = App::build(config, shutdown.clone()).await?;
    let addr = listener.local_addr()?;
    if app.state.config.web.dev_login {
        tracing::warn!(
            "web.dev_login is on: anyone on this machine can get an agent token of the demo \
             domain (POST /api/dev/agent-token); set web.dev_login = false in production"
        );
    }
    tracing::info!(
        %addr,
        database = %config::redact_url(&app.state.config.database),
        broker = %config::redact_url(&app.state.config.broker),
        "parlor listening"
    );
    let base = base_url(addr);
    tracing::info!(url = %format!("{base}/"), "demo page");
    tracing::info!(url = %format!("{base}/inbox"), "agent inbox");
    tracing::info!(url = %format!("{base}/health"), "health check");
    let server = transport::listen::serve(listener, app.router(), app.state.clone());
    // Rate-limit state of addresses that went quiet is dropped every minute.
    let edge_state = app.state.clone();
    let edge_stop = shutdown.clone();
    app.state.supervisor.spawn("forget-idle", async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                () = edge_stop.cancelled() => break,
                _ = tick.tick() => {
                    edge_state.edge.forget_idle();
                    edge_state.ai.forget_idle();
                }
            }
        }
    });
    // Serves until the shutdown token is cancelled.
    server.await;
    tracing::info!("shutting down");
    // One deadline for the whole shutdown: HTTP requests and WebSocket connections finish
    // concurrently (both saw the token), then the store is flushed and closed.
    let until = tokio::time::Instant::now() + app.state.config.shutdown_timeout_ms;
    if let Some(failure) = app.shutdown(until).await {
        return Err(RunError::Failed(failure));
    }
    tracing::info!("stopped");
    Ok(())
}
