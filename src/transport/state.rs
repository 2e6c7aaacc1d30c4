//! The state every handler and connection task shares: the node's services, its
//! supervisor and its limits. Built by `App::build` (in `lib.rs`), read by the transports.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::Config;
use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::broker::shared::Shared;
use crate::metrics::Metrics;
use crate::node;
use crate::service::ai::AiService;
use crate::service::chat::ChatService;
use crate::service::domains::DomainService;
use crate::service::handoff::HandoffService;
use crate::service::sessions::SessionService;

/// Shared server state, cheap to clone into every handler and connection task.
#[derive(Debug, Clone)]
pub struct AppState(Arc<State>);

#[derive(Debug)]
struct State {
    inner: AppInner,
    next_connection_id: AtomicU64,
}

/// What [`AppState`] holds.
#[derive(Debug)]
pub struct AppInner {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Chat operations.
    pub chat: Arc<ChatService>,
    /// Token verification.
    pub auth: Authenticator,
    /// Per-IP rate limits and allowed origins.
    pub edge: super::edge::Edge,
    /// AI replies: the bot and the AI endpoints.
    pub ai: Arc<AiService>,
    /// Hand-off from the bot to human agents, and the agents' inbox.
    pub handoff: Arc<HandoffService>,
    /// Domain administration (the admin API).
    pub domain_admin: Arc<DomainService>,
    /// Guided sessions that end in a document (`/chat`, `docs/sessions.md`).
    pub sessions: Arc<SessionService>,
    /// Typed notifications to users (`docs/notifications.md`).
    pub notifications: Arc<crate::service::notifications::NotificationService>,
    /// Agent accounts and their sign-in (`docs/accounts.md`).
    pub accounts: Arc<crate::service::accounts::AccountService>,
    /// A domain's visitors (`docs/visitors.md`).
    pub visitors: Arc<crate::service::visitors::VisitorService>,
    /// A domain's statistics (`docs/stats.md`).
    pub stats: Arc<crate::service::stats::StatsService>,
    /// Uploaded files (`docs/files.md`).
    pub files: Arc<crate::service::files::FileService>,
    /// The domains' webhooks: their delivery log (`docs/webhooks.md`).
    pub webhooks: Arc<crate::service::webhooks::WebhookService>,
    /// Message distribution between nodes.
    pub broker: Arc<dyn Broker>,
    /// Cluster-wide rate limits, counters, online users and claims (Redis with the Redis
    /// broker, this process otherwise).
    pub shared: Shared,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// Every task the node runs and its shutdown token (`supervisor.shutdown()`, cancelled
    /// when the server starts shutting down); shutdown waits for the tasks, and a worker's
    /// panic fails the node.
    pub supervisor: node::Supervisor,
    /// Every open `/ws` connection: their liveness sweep and their close at shutdown.
    pub sockets: Arc<super::ws::SocketWatch>,
    /// One permit per open WebSocket (`limits.max_connections`).
    pub connection_permits: Arc<Semaphore>,
    /// Start time, for uptime.
    pub started: Instant,
}

impl AppState {
    /// The state of a built node.
    pub fn new(inner: AppInner) -> Self {
        Self(Arc::new(State {
            inner,
            next_connection_id: AtomicU64::new(1),
        }))
    }

    /// A process-unique connection id.
    pub fn next_connection_id(&self) -> u64 {
        self.0.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}

impl Deref for AppState {
    type Target = AppInner;

    fn deref(&self) -> &AppInner {
        &self.0.inner
    }
}
