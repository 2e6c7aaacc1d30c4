//! Prometheus metrics, exposed as text at `GET /metrics`.
//!
//! One [`Metrics`] value lives in the server state; every layer that counts something gets an
//! `Arc` of it. Names follow Prometheus conventions (`_total` counters, `_seconds` histograms).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set for store operations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// Operation name (`append`, `history`, …).
    pub op: &'static str,
}

/// Label set for the domains' webhook attempts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `delivered`, `failed` (to be retried) or `dead` (given up).
    pub result: &'static str,
}

/// Label set for hand-off transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// `escalate`, `assign`, `transfer`, `unassign`, `resolve` or `reopen`.
    pub action: &'static str,
}

/// Label set for refused requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The stable error code.
    pub code: &'static str,
}

/// An AI provider call: which provider (its configured name) and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AiCallLabel {
    /// Configured provider name (`kb` for the knowledge base).
    pub provider: String,
    /// `ok`, `cancelled` or an error label.
    pub outcome: &'static str,
}

/// Tokens of a provider, by kind (`prompt`, `completion`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AiTokenLabel {
    /// Configured provider name.
    pub provider: String,
    /// `prompt` or `completion`.
    pub kind: &'static str,
}

/// A provider, by configured name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    /// Configured provider name.
    pub provider: String,
}

/// Label set for closed connections and dropped broker work.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why the connection ended, or what was dropped.
    pub reason: &'static str,
}

/// Where a break in a room's live stream was seen.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AtLabel {
    /// `node`: a room's stream on this node (the hub); `connection`: one connection's
    /// position in a room.
    pub at: &'static str,
}

/// A supervised task, by what it does (`connection`, `sqlite-writer`, `dispatcher`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabel {
    /// The task's name.
    pub task: &'static str,
}

/// [`AtLabel`] of the hub.
pub const AT_NODE: AtLabel = AtLabel { at: "node" };
/// [`AtLabel`] of a connection.
pub const AT_CONNECTION: AtLabel = AtLabel { at: "connection" };

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// WebSocket connections open now.
    pub connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// WebSocket connections accepted since start.
    pub connections_total: Counter<u64, AtomicU64>,
    /// Connections closed, by reason.
    pub disconnects: Family<ReasonLabel, Counter>,
    /// Client frames received.
    pub frames_in: Counter,
    /// Frames written to clients.
    pub frames_out: Counter,
    /// Messages stored (sent over any transport).
    pub messages_stored: Counter,
    /// Events dropped because a connection's outbound queue was full (the connection is then
    /// closed as a slow consumer).
    pub fanout_dropped: Counter,
    /// Client errors answered with an `error` frame or 4xx, by code.
    pub client_errors: Family<CodeLabel, Counter>,
    /// Store operation latency.
    pub store_latency: Family<OpLabel, Histogram>,
    /// AI provider calls, by provider and outcome.
    pub ai_calls: Family<AiCallLabel, Counter>,
    /// AI tokens, by provider and kind.
    pub ai_tokens: Family<AiTokenLabel, Counter>,
    /// Time from an AI call to its first token.
    pub ai_first_token: Family<ProviderLabel, Histogram>,
    /// Time from an AI call to its end.
    pub ai_duration: Family<ProviderLabel, Histogram>,
    /// Hand-off transitions stored, by action.
    pub handoff_transitions: Family<ActionLabel, Counter>,
    /// Seconds from a room starting to wait (or being assigned) to the first agent message.
    pub handoff_first_response: Histogram,
    /// Reads of a room's hand-off state for a committed message, needed when this node's
    /// copy may be stale (another node wrote in the room since).
    pub handoff_state_reads: Counter,
    /// Cluster-state calls (rate limits, counters, online users, claims) this node answered
    /// alone because Redis did not answer in time.
    pub shared_fallbacks: Family<OpLabel, Counter>,
    /// Work the Redis broker dropped because its queue was full (Redis unreachable), by
    /// kind: `publication`, `presence`.
    pub broker_dropped: Family<ReasonLabel, Counter>,
    /// Messages that arrived ahead of a room's (or a connection's) position, so that the
    /// missing range had to be read first.
    pub stream_gaps: Family<AtLabel, Counter>,
    /// Messages read from the room cache or the store to fill a gap.
    pub stream_filled: Family<AtLabel, Counter>,
    /// Rooms the position check found behind the store (a publication the broker lost)
    /// and caught up.
    pub stream_tail_repairs: Counter,
    /// Connections closed with 4009 because a gap could not be filled: they reconnect and
    /// recover with `since`.
    pub stream_resyncs: Family<AtLabel, Counter>,
    /// Visitor messages nobody will answer, by why (`no_assistant_no_handoff`: the domain
    /// has neither an assistant nor hand-off).
    pub unanswered: Family<ReasonLabel, Counter>,
    /// Connections refused or cut by the edge, by why: `address_connections` and
    /// `address_websockets` (the per-address caps), `server_full`, `domain_full`,
    /// `header_timeout`, `body_timeout`.
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// Guided-session events, by kind: `started`, `resumed`, `completed`, `replaced`,
    /// `invalid_answer`, `follow_up`, `ignored_frame`, `expired`.
    pub guided: Family<ReasonLabel, Counter>,
    /// Calls to domains' AI services for guided sessions, by outcome: `ok`,
    /// `server_error`, `client_error`, `timeout`, `unreachable`, `bad_answer`.
    pub guided_ai_service: Family<ReasonLabel, Counter>,
    /// Supervised tasks that panicked, by task (a worker's panic also fails the node).
    pub task_panics: Family<TaskLabel, Counter>,
    /// Notifications, by what happened to them: `stored`, `pushed` (to a live subscriber
    /// here), `read` (marked), `expired`.
    pub notifications: Family<ReasonLabel, Counter>,
    /// Pusher webhook events, by outcome: `delivered`, `failed` (given up after
    /// retrying), `dropped` (a queue was full).
    pub pusher_webhooks: Family<ReasonLabel, Counter>,
    /// Files stored (`POST /api/files`).
    pub files_uploaded: Counter,
    /// Bytes of the files stored.
    pub files_uploaded_bytes: Counter,
    /// Files sent to a reader (`GET /api/files/{id}`).
    pub files_served: Counter,
    /// Files deleted, one by one or with their room.
    pub files_deleted: Counter,
    /// Attempts at the domains' webhook events, by result: `delivered`, `failed` (retried
    /// later), `dead` (given up).
    pub webhooks: Family<ResultLabel, Counter>,
    /// Events in the webhook outbox not delivered yet (all nodes; refreshed every 5 s).
    pub webhooks_backlog: Gauge,
    /// Age of the oldest undelivered webhook event, in seconds (0: none).
    pub webhooks_oldest_seconds: Gauge<f64, AtomicU64>,
    /// From an event to its delivery, in seconds.
    pub webhook_latency: Histogram,
}

impl Metrics {
    /// Creates and registers all metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("parlor");
        let connections = Gauge::default();
        let connections_total = Counter::default();
        let disconnects = Family::<ReasonLabel, Counter>::default();
        let frames_in = Counter::default();
        let frames_out = Counter::default();
        let messages_stored = Counter::default();
        let fanout_dropped = Counter::default();
        let client_errors = Family::<CodeLabel, Counter>::default();
        let store_latency = Family::<OpLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        registry.register(
            "connections",
            "WebSocket connections open now",
            connections.clone(),
        );
        registry.register(
            "connections_accepted",
            "WebSocket connections accepted",
            connections_total.clone(),
        );
        registry.register(
            "disconnects",
            "WebSocket connections closed, by reason",
            disconnects.clone(),
        );
        registry.register("frames_in", "Client frames received", frames_in.clone());
        registry.register(
            "frames_out",
            "Frames written to clients",
            frames_out.clone(),
        );
        registry.register(
            "messages_stored",
            "Messages stored",
            messages_stored.clone(),
        );
        registry.register(
            "fanout_dropped",
            "Events dropped because a connection's outbound queue was full",
            fanout_dropped.clone(),
        );
        registry.register(
            "client_errors",
            "Requests refused, by error code",
            client_errors.clone(),
        );
        registry.register(
            "store_latency_seconds",
            "Store operation latency",
            store_latency.clone(),
        );
        let ai_calls = Family::<AiCallLabel, Counter>::default();
        let ai_tokens = Family::<AiTokenLabel, Counter>::default();
        let seconds = || Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let ai_first_token = Family::<ProviderLabel, Histogram>::new_with_constructor(seconds);
        let ai_duration = Family::<ProviderLabel, Histogram>::new_with_constructor(seconds);
        registry.register(
            "ai_calls",
            "AI provider calls, by outcome",
            ai_calls.clone(),
        );
        registry.register("ai_tokens", "AI tokens, by kind", ai_tokens.clone());
        registry.register(
            "ai_first_token_seconds",
            "Time from an AI call to its first token",
            ai_first_token.clone(),
        );
        registry.register(
            "ai_duration_seconds",
            "Time from an AI call to its end",
            ai_duration.clone(),
        );
        let handoff_transitions = Family::<ActionLabel, Counter>::default();
        let handoff_first_response = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "handoff_transitions",
            "Hand-off transitions stored, by action",
            handoff_transitions.clone(),
        );
        registry.register(
            "handoff_first_response_seconds",
            "Time from a room starting to wait for a human to the first agent message",
            handoff_first_response.clone(),
        );
        let handoff_state_reads = Counter::default();
        registry.register(
            "handoff_state_reads",
            "Store reads of a room's hand-off state for a committed message this node's copy could not vouch for",
            handoff_state_reads.clone(),
        );
        let shared_fallbacks = Family::<OpLabel, Counter>::default();
        registry.register(
            "shared_fallbacks",
            "Cluster-state calls answered by this node alone because Redis did not answer",
            shared_fallbacks.clone(),
        );
        let broker_dropped = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "broker_dropped",
            "Publications and presence changes the Redis broker dropped from a full queue",
            broker_dropped.clone(),
        );
        let stream_gaps = Family::<AtLabel, Counter>::default();
        registry.register(
            "stream_gaps",
            "Messages that arrived ahead of a room's or a connection's position",
            stream_gaps.clone(),
        );
        let stream_filled = Family::<AtLabel, Counter>::default();
        registry.register(
            "stream_filled",
            "Messages read from the room cache or the store to fill a gap",
            stream_filled.clone(),
        );
        let stream_tail_repairs = Counter::default();
        registry.register(
            "stream_tail_repairs",
            "Rooms the position check found behind the store and caught up",
            stream_tail_repairs.clone(),
        );
        let stream_resyncs = Family::<AtLabel, Counter>::default();
        registry.register(
            "stream_resyncs",
            "Connections told to reconnect because a gap could not be filled",
            stream_resyncs.clone(),
        );
        let unanswered = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "unanswered",
            "Visitor messages nobody will answer, by reason",
            unanswered.clone(),
        );
        let connections_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused or cut at the edge (caps and timeouts), by reason",
            connections_refused.clone(),
        );
        let guided = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "guided_sessions",
            "Guided-session events, by kind",
            guided.clone(),
        );
        let guided_ai_service = Family::<ReasonLabel, Counter>::default();
        let task_panics = Family::<TaskLabel, Counter>::default();
        registry.register(
            "task_panics",
            "Supervised tasks that panicked, by task (a worker's panic also fails the node)",
            task_panics.clone(),
        );
        registry.register(
            "guided_ai_service_calls",
            "Calls to domains' AI services for guided sessions, by outcome",
            guided_ai_service.clone(),
        );
        let notifications = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "notifications",
            "Notifications, by what happened to them (stored, pushed, read, expired)",
            notifications.clone(),
        );
        let pusher_webhooks = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "pusher_webhooks",
            "Pusher webhook events, by outcome (delivered, failed, dropped)",
            pusher_webhooks.clone(),
        );
        let files_uploaded = Counter::default();
        registry.register("files_uploaded", "Files stored", files_uploaded.clone());
        let files_uploaded_bytes = Counter::default();
        registry.register(
            "files_uploaded_bytes",
            "Bytes of the files stored",
            files_uploaded_bytes.clone(),
        );
        let files_served = Counter::default();
        registry.register(
            "files_served",
            "Files sent to a reader",
            files_served.clone(),
        );
        let files_deleted = Counter::default();
        registry.register(
            "files_deleted",
            "Files deleted, one by one or with their room",
            files_deleted.clone(),
        );
        let webhooks = Family::<ResultLabel, Counter>::default();
        registry.register(
            "webhooks",
            "Attempts at the domains' webhook events, by result (delivered, failed, dead)",
            webhooks.clone(),
        );
        let webhooks_backlog = Gauge::default();
        registry.register(
            "webhooks_backlog",
            "Webhook events in the outbox not delivered yet",
            webhooks_backlog.clone(),
        );
        let webhooks_oldest_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "webhooks_oldest_pending_seconds",
            "Age of the oldest undelivered webhook event (0: none)",
            webhooks_oldest_seconds.clone(),
        );
        let webhook_latency = Histogram::new(exponential_buckets(0.01, 2.0, 20));
        registry.register(
            "webhook_delivery_seconds",
            "From a webhook event to its delivery",
            webhook_latency.clone(),
        );
        Self {
            registry,
            files_uploaded,
            files_uploaded_bytes,
            files_served,
            files_deleted,
            webhooks,
            webhooks_backlog,
            webhooks_oldest_seconds,
            webhook_latency,
            notifications,
            pusher_webhooks,
            guided,
            guided_ai_service,
            task_panics,
            unanswered,
            connections_refused,
            stream_gaps,
            stream_filled,
            stream_tail_repairs,
            stream_resyncs,
            broker_dropped,
            shared_fallbacks,
            handoff_transitions,
            handoff_first_response,
            handoff_state_reads,
            connections,
            connections_total,
            disconnects,
            frames_in,
            frames_out,
            messages_stored,
            fanout_dropped,
            client_errors,
            store_latency,
            ai_calls,
            ai_tokens,
            ai_first_token,
            ai_duration,
        }
    }

    /// Records one store operation's duration.
    pub fn observe_store(&self, op: &'static str, took: Duration) {
        self.store_latency
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
    }

    /// Counts one refused request.
    pub fn client_error(&self, code: &'static str) {
        self.client_errors.get_or_create(&CodeLabel { code }).inc();
    }

    /// Counts a visitor message left without an answer.
    pub fn unanswered(&self, reason: &'static str) {
        self.unanswered.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts `n` notifications that `what` happened to (`stored`, `pushed`, `read`,
    /// `expired`).
    pub fn notification(&self, what: &'static str, n: u64) {
        if n > 0 {
            self.notifications
                .get_or_create(&ReasonLabel { reason: what })
                .inc_by(n);
        }
    }

    /// Counts `n` Pusher webhook events that ended as `outcome`.
    pub fn pusher_webhook(&self, outcome: &'static str, n: u64) {
        self.pusher_webhooks
            .get_or_create(&ReasonLabel { reason: outcome })
            .inc_by(n);
    }

    /// Counts one attempt at a webhook event that ended as `result`.
    pub fn webhook(&self, result: &'static str) {
        self.webhooks.get_or_create(&ResultLabel { result }).inc();
    }

    /// Records the time from a webhook event to its delivery.
    pub fn webhook_latency(&self, took: Duration) {
        self.webhook_latency.observe(took.as_secs_f64());
    }

    /// Sets the webhook outbox's backlog: rows pending, age of the oldest in seconds.
    pub fn webhook_backlog(&self, pending: u64, oldest_seconds: f64) {
        self.webhooks_backlog
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.webhooks_oldest_seconds.set(oldest_seconds);
    }

    /// Counts a guided-session event.
    pub fn guided(&self, kind: &'static str) {
        self.guided
            .get_or_create(&ReasonLabel { reason: kind })
            .inc();
    }

    /// Counts one connection refused or cut at the edge.
    pub fn refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts one closed connection.
    pub fn disconnect(&self, reason: &'static str) {
        self.disconnects
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
