//! Durable storage: the [`Store`] trait and its implementations.
//!
//! The store is the source of truth. It assigns every message its room `seq` inside the
//! transaction that stores it, so the order is decided once, and it acknowledges a write only
//! after the transaction has committed. Writes from many connections are batched into one
//! transaction (group commit) so persistence keeps up with chat.
//!
//! Committed messages are also handed, in commit order, to a [`CommitSink`]; the chat service
//! publishes them to the broker from there, which keeps live delivery in `seq` order without
//! any reordering on the hot path.
//!
//! Implementations: [`sqlite::SqliteStore`] (one node, one file) and
//! [`postgres::PostgresStore`] (several nodes sharing one database). Both take writes through
//! the same group commit (`batch`: the bounded write queue, the batches, the retry of a
//! failed batch one operation at a time, the answers and the sink), each with its own
//! transactions.
//!
//! Depends only on [`crate::model`] and [`crate::config`]. The conformance suite in
//! `tests/store.rs` runs against every implementation.

pub mod accounts;
mod batch;
pub use batch::Answer;
pub mod files;
pub mod guided;
pub mod notifications;
pub mod postgres;
pub mod sqlite;
pub mod stats;
pub mod visitors;
pub mod webhooks;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::model::{Agent, Conversation, Message, NewMessage, Note, Room, RoomKey, RoomStatus};

/// Deepest nesting of a message's `data` a store accepts (JSON parsers refuse to read back
/// deeper documents).
pub const MAX_DATA_DEPTH: usize = 64;

/// Where a store hands every newly committed message, in commit order (per room: `seq`
/// order), and where it reports that its writer died: the node's commit pipeline
/// (`crate::node::pipeline`) reads the one, its supervisor hears the other.
#[derive(Clone)]
pub struct CommitSink {
    committed: mpsc::UnboundedSender<Arc<Message>>,
    on_panic: Option<Arc<PanicHandler>>,
    /// Counts every message handed over (the pipeline's backlog).
    counted: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Told which writer panicked and with what.
pub type PanicHandler = dyn Fn(&'static str, &(dyn std::any::Any + Send)) + Send + Sync;

impl CommitSink {
    /// A sink whose messages go to `committed`; a writer's panic is only logged.
    pub fn new(committed: mpsc::UnboundedSender<Arc<Message>>) -> Self {
        Self {
            committed,
            on_panic: None,
            counted: None,
        }
    }

    /// The same sink, adding one to `counter` for every message handed over.
    #[must_use]
    pub fn counting(mut self, counter: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.counted = Some(counter);
        self
    }

    /// The same sink, telling `handler` when the writer panics.
    #[must_use]
    pub fn on_panic(mut self, handler: Arc<PanicHandler>) -> Self {
        self.on_panic = Some(handler);
        self
    }

    /// Hands over a committed message (dropped if nobody reads the sink any more).
    pub fn send(&self, message: Arc<Message>) {
        if let Some(counter) = &self.counted {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = self.committed.send(message);
    }

    /// Reports that the writer `name` panicked with `panic`: no write can commit after it.
    pub fn panicked(&self, name: &'static str, panic: &(dyn std::any::Any + Send)) {
        match &self.on_panic {
            Some(handler) => handler(name, panic),
            None => tracing::error!(
                writer = name,
                "the store's writer panicked; writes fail from now on"
            ),
        }
    }
}

impl From<mpsc::UnboundedSender<Arc<Message>>> for CommitSink {
    fn from(committed: mpsc::UnboundedSender<Arc<Message>>) -> Self {
        Self::new(committed)
    }
}

impl std::fmt::Debug for CommitSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitSink")
            .field("on_panic", &self.on_panic.is_some())
            .finish_non_exhaustive()
    }
}

/// The result of an append.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The stored message (for a duplicate: the one stored the first time).
    pub message: Arc<Message>,
    /// True when `client_message_id` matched an existing message and nothing was written.
    pub duplicate: bool,
}

/// Profile data a visitor gives about themselves (`join-room`'s `userName`, `customerData`).
#[derive(Debug, Clone, Default)]
pub struct CustomerProfile {
    /// Display name.
    pub name: Option<String>,
    /// Free-form JSON object.
    pub data: Option<serde_json::Value>,
    /// Where the visitor is (page, browser…): a JSON object the server composes.
    pub context: Option<serde_json::Value>,
}

/// A customer as stored: what they said about themselves and where they were last seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Customer {
    /// Display name.
    pub name: Option<String>,
    /// `customerData`, as given.
    pub data: Option<serde_json::Value>,
    /// The latest context (page, browser…).
    pub context: Option<serde_json::Value>,
    /// First stored.
    pub first_seen: DateTime<Utc>,
    /// Last updated.
    pub last_seen: DateTime<Utc>,
}

/// A domain as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDomain {
    /// Identifier.
    pub id: String,
    /// Display name.
    pub name: String,
    /// The settings of a domain created through the admin API, as JSON in the config file's
    /// shape; `None` for a domain declared in the config file.
    pub settings: Option<String>,
}

/// What a run-time key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A server API key (`pk_…`); only its hash is stored.
    Server,
    /// A Pusher-style app key and secret pair; the secret is stored, since it signs.
    Pusher,
}

impl KeyKind {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Server => "server",
            KeyKind::Pusher => "pusher",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "server" => Some(KeyKind::Server),
            "pusher" => Some(KeyKind::Pusher),
            _ => None,
        }
    }
}

/// A domain's secret added at run time (admin API).
#[derive(Debug, Clone, PartialEq)]
pub struct DomainKey {
    /// Identifier shown to administrators (never the secret).
    pub id: String,
    /// The domain it belongs to.
    pub domain_id: String,
    /// What it is.
    pub kind: KeyKind,
    /// Public part (a Pusher app key), if any.
    pub public_id: Option<String>,
    /// `sha256:HEX` of a server key, or a Pusher secret.
    pub secret: crate::config::Secret,
    /// When it was added.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
}

impl DomainKey {
    /// Whether the key works at `now`.
    pub fn live_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

/// A change to the stored domains.
#[derive(Debug, Clone)]
pub enum DomainChange {
    /// A domain of the config file: create it or update its name (its settings stay in the file).
    Declare {
        /// Identifier.
        id: String,
        /// Display name.
        name: String,
    },
    /// Create or replace a run-time domain.
    Save {
        /// Identifier.
        id: String,
        /// Display name.
        name: String,
        /// Settings as JSON.
        settings: String,
    },
    /// Remove a run-time domain and its keys; its rooms and messages stay stored.
    Remove {
        /// Identifier.
        id: String,
    },
    /// Add a key.
    AddKey(DomainKey),
    /// Make a domain's keys of one kind expire at `expires_at` (unless they expire sooner),
    /// except `keep`.
    ExpireKeys {
        /// The domain.
        domain_id: String,
        /// Which keys.
        kind: KeyKind,
        /// When they stop working.
        expires_at: DateTime<Utc>,
        /// A key left alone (the one just added).
        keep: Option<String>,
    },
    /// Delete a key at once.
    RemoveKey {
        /// The domain.
        domain_id: String,
        /// The key.
        id: String,
    },
    /// Create or replace a knowledge-base document of a domain.
    PutDocument {
        /// The domain.
        domain_id: String,
        /// Its name (`returns.md`).
        name: String,
        /// Its text.
        text: String,
    },
    /// Delete a knowledge-base document.
    RemoveDocument {
        /// The domain.
        domain_id: String,
        /// Its name.
        name: String,
    },
    /// Store a generated value under `name` unless one is already stored.
    InstallSetting {
        /// Name.
        name: String,
        /// Value.
        value: String,
    },
}

/// One AI provider call.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    /// The domain it was for.
    pub domain_id: String,
    /// The room answered in, if any.
    pub room_id: Option<String>,
    /// Who asked, if known.
    pub user_id: Option<String>,
    /// Configured provider name (`kb` for the knowledge base).
    pub provider: String,
    /// Model used.
    pub model: String,
    /// Tokens of the request.
    pub prompt_tokens: u64,
    /// Tokens of the reply.
    pub completion_tokens: u64,
    /// From the call to its end.
    pub latency_ms: u64,
    /// `ok`, `cancelled` or an error label.
    pub outcome: String,
    /// When it ended.
    pub created_at: DateTime<Utc>,
}

/// How usage is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGrouping {
    /// By provider and model.
    Model,
    /// By UTC day (`YYYY-MM-DD`).
    Day,
}

/// Usage totals of one group.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageGroup {
    /// `provider/model`, or the day.
    pub key: String,
    /// Calls.
    pub calls: u64,
    /// Calls whose outcome was not `ok`.
    pub failed: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Mean latency of the calls, in milliseconds.
    pub mean_latency_ms: u64,
}

/// Decides a hand-off transition from the room's current state: the new state and the
/// system message recording it, or `None` to leave the room as it is. Called inside the
/// store's transaction, so the decision and the write are one step (and may be called again
/// if that transaction is retried).
pub type Decide = Arc<dyn Fn(&Conversation) -> Option<(Conversation, NewMessage)> + Send + Sync>;

/// A conversation row's columns as both backends store them (times in unix milliseconds).
#[derive(Debug, Default)]
pub struct ConversationColumns {
    /// `bot`, `waiting`, `assigned`, `resolved`; `None` when the room has no row.
    pub status: Option<String>,
    /// Assignee's user id and name.
    pub assignee: (Option<String>, Option<String>),
    /// waiting_since, assigned_at, first_response_at, resolved_at, updated_at.
    pub times: [Option<i64>; 5],
    /// Change counter.
    pub version: i64,
    /// `seq` of the last status message.
    pub status_seq: i64,
}

impl ConversationColumns {
    /// The conversation these columns describe (a room without a row is with the bot), or
    /// the unknown status they hold.
    pub fn into_conversation(self, key: RoomKey) -> Result<Conversation, String> {
        let Some(status) = self.status else {
            return Ok(Conversation::new(key));
        };
        let status =
            RoomStatus::parse(&status).ok_or_else(|| format!("unknown room status {status:?}"))?;
        let time = |ms: Option<i64>| ms.and_then(DateTime::from_timestamp_millis);
        let [waiting, assigned, first, resolved, updated] = self.times;
        let (assignee_id, assignee_name) = self.assignee;
        Ok(Conversation {
            room: key,
            status,
            assignee: assignee_id.map(|user_id| Agent {
                name: assignee_name.unwrap_or_else(|| user_id.clone()),
                user_id,
            }),
            waiting_since: time(waiting),
            assigned_at: time(assigned),
            first_response_at: time(first),
            resolved_at: time(resolved),
            updated_at: time(updated).unwrap_or_default(),
            version: u64::try_from(self.version).unwrap_or(0),
            status_seq: u64::try_from(self.status_seq).unwrap_or(0),
        })
    }
}

/// The outcome of [`Store::transition`].
#[derive(Debug, Clone)]
pub struct Transitioned {
    /// The room's state afterwards (unchanged when `message` is `None`).
    pub conversation: Conversation,
    /// The stored system message, when the state changed.
    pub message: Option<Appended>,
}

/// Which rooms [`Store::inbox`] lists.
#[derive(Debug, Clone)]
pub struct InboxQuery {
    /// The domain.
    pub domain_id: String,
    /// Statuses to list; empty: all.
    pub statuses: Vec<RoomStatus>,
    /// Whose read positions to report.
    pub reader: String,
    /// At most this many.
    pub limit: usize,
    /// Only the rooms this user opened (one visitor's conversations); `None`: every room.
    pub opened_by: Option<String>,
    /// Only the rooms whose id, visitor name or one of whose messages contains this text,
    /// ignoring case; `None` (or blank): no text filter.
    pub text: Option<String>,
}

impl InboxQuery {
    /// [`InboxQuery::text`] as a `LIKE` pattern with `\` as its escape character: `%`, `_`
    /// and `\` in the text match themselves.
    pub fn text_pattern(&self) -> Option<String> {
        let text = self.text.as_deref()?.trim();
        if text.is_empty() {
            return None;
        }
        let mut pattern = String::with_capacity(text.len() + 2);
        pattern.push('%');
        for c in text.chars() {
            if matches!(c, '%' | '_' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('%');
        Some(pattern)
    }
}

/// One room in an agent inbox.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InboxEntry {
    /// Its hand-off state.
    pub conversation: Conversation,
    /// Who opened the room.
    pub created_by: Option<String>,
    /// The visitor's name: on their latest message in the room, else from their profile.
    pub visitor_name: Option<String>,
    /// When the room was created.
    pub created_at: DateTime<Utc>,
    /// Its newest message.
    pub last_message: Message,
    /// The reader's read position (each reader's own: it does not travel between nodes).
    #[serde(skip)]
    pub read_seq: u64,
}

/// A note about to be stored.
#[derive(Debug, Clone)]
pub struct NewNote {
    /// The room (it must exist).
    pub room: RoomKey,
    /// The agent writing it.
    pub author: Agent,
    /// The text.
    pub text: String,
}

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The value cannot be stored (it could not be read back); nothing was written.
    #[error("cannot store: {0}")]
    Invalid(String),
    /// The database could not be reached or refused the operation; nothing was written.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The store is shutting down.
    #[error("storage is closed")]
    Closed,
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// Durable storage of domains, customers, rooms, messages and read states.
#[async_trait]
pub trait Store:
    accounts::Accounts
    + files::Files
    + guided::Guided
    + notifications::Notifications
    + visitors::Visitors
    + stats::Stats
    + webhooks::Outbox
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// Stores a message, creating its room if needed, and returns it with its `seq`. `data`
    /// nested deeper than [`MAX_DATA_DEPTH`] is refused with [`StoreError::Invalid`]. If the
    /// message carries a `client_message_id` its author already used in that room, returns the
    /// stored message with `duplicate: true` and writes nothing. Returns only once durable.
    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        self.queue_append(message).await?.await
    }

    /// [`Self::append`] in two steps: returns once the message is queued for the writer,
    /// behind every write queued before it, with the [`Answer`] that resolves once it is
    /// durable. A caller that queues its messages one after another gets them committed (and
    /// numbered) in that order without waiting for each commit.
    async fn queue_append(&self, message: NewMessage) -> Result<Answer<Appended>, StoreError>;

    /// Returns the room, creating it (kind `support`) if it does not exist.
    async fn ensure_room(
        &self,
        key: &RoomKey,
        created_by: Option<&str>,
    ) -> Result<Room, StoreError>;

    /// Returns the room if it exists.
    async fn room(&self, key: &RoomKey) -> Result<Option<Room>, StoreError>;

    /// Up to `limit` messages with `seq > after`, ascending.
    async fn messages_after(
        &self,
        key: &RoomKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;

    /// The last `seq` of each room of `rooms`, in the order given: 0 for a room that has no
    /// message or does not exist. One round trip for the lot, so a node can compare all its
    /// active rooms with the store every second (the hub's position check).
    async fn last_seqs(&self, rooms: &[RoomKey]) -> Result<Vec<u64>, StoreError>;

    /// The last `limit` messages with `seq < before`, ascending.
    async fn messages_before(
        &self,
        key: &RoomKey,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;

    /// Raises the user's read position in the room to `seq` (never lowers it, never past the
    /// room's last message) and returns the stored position.
    async fn mark_read(&self, key: &RoomKey, user_id: &str, seq: u64) -> Result<u64, StoreError>;

    /// The user's read position in the room (0 when nothing read).
    async fn read_position(&self, key: &RoomKey, user_id: &str) -> Result<u64, StoreError>;

    /// A customer's stored profile, if any.
    async fn customer(
        &self,
        domain_id: &str,
        user_id: &str,
    ) -> Result<Option<Customer>, StoreError>;

    /// Creates or updates a customer's profile; fields left `None` keep their value.
    async fn upsert_customer(
        &self,
        domain_id: &str,
        user_id: &str,
        profile: CustomerProfile,
    ) -> Result<(), StoreError>;

    /// Creates or renames a domain declared in the config file.
    async fn upsert_domain(&self, id: &str, name: &str) -> Result<(), StoreError> {
        self.change_domains(DomainChange::Declare {
            id: id.to_owned(),
            name: name.to_owned(),
        })
        .await
        .map(|_| ())
    }

    /// Applies one change to the stored domains, their keys or the server settings, and
    /// returns how many rows it touched (0: nothing matched).
    async fn change_domains(&self, change: DomainChange) -> Result<u64, StoreError>;

    /// Every stored domain, including those declared in the config file (`settings: None`).
    async fn domains(&self) -> Result<Vec<StoredDomain>, StoreError>;

    /// Every key added at run time, expired ones included.
    async fn domain_keys(&self) -> Result<Vec<DomainKey>, StoreError>;

    /// A value the server generated and keeps (see [`DomainChange::InstallSetting`]).
    async fn setting(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// A domain's uploaded knowledge-base documents: (name, text, updated), by name.
    async fn documents(
        &self,
        domain_id: &str,
    ) -> Result<Vec<(String, String, DateTime<Utc>)>, StoreError>;

    /// Records one AI provider call.
    async fn record_usage(&self, record: UsageRecord) -> Result<(), StoreError>;

    /// A domain's AI usage with `from <= created_at < to`, grouped, ordered by key.
    async fn usage(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group: UsageGrouping,
    ) -> Result<Vec<UsageGroup>, StoreError>;

    /// The room's hand-off state; `None` when it never left the bot (or does not exist).
    async fn conversation(&self, key: &RoomKey) -> Result<Option<Conversation>, StoreError>;

    /// Changes the room's hand-off state if `decide` says so, storing the new state and its
    /// system message in one transaction (the room is created, by `created_by`, if
    /// missing). The message reaches the commit sink like any other. Concurrent calls for
    /// one room are decided one after the other, each seeing the previous one's result.
    async fn transition(
        &self,
        key: &RoomKey,
        created_by: Option<&str>,
        decide: Decide,
    ) -> Result<Transitioned, StoreError>;

    /// Records the first agent message of a waiting or assigned room at `at`, unless one is
    /// recorded already; returns the state afterwards if it changed.
    async fn first_response(
        &self,
        key: &RoomKey,
        at: DateTime<Utc>,
    ) -> Result<Option<Conversation>, StoreError>;

    /// Support rooms of a domain that hold messages (not the `ai:` conversations): waiting
    /// ones first, longest waiting first, then by latest activity.
    async fn inbox(&self, query: InboxQuery) -> Result<Vec<InboxEntry>, StoreError>;

    /// Stores an agent note on an existing room.
    async fn add_note(&self, note: NewNote) -> Result<Note, StoreError>;

    /// The room's latest `limit` notes, oldest first.
    async fn notes(&self, key: &RoomKey, limit: usize) -> Result<Vec<Note>, StoreError>;

    /// Checks that reads and writes work.
    async fn health(&self) -> Result<(), StoreError>;

    /// Writes waiting for the writer now (at most `store.write_queue`).
    fn queued(&self) -> usize {
        0
    }

    /// Stops accepting writes and commits those queued; the writer then exits, which
    /// closes the [`CommitSink`]. Reads keep working. Idempotent.
    async fn flush(&self);

    /// Flushes (see [`Store::flush`]), then releases the database: reads fail from here on.
    async fn close(&self);

    /// Short name for health output and metrics (`sqlite`, `postgres`).
    fn kind(&self) -> &'static str;
}

/// The value the server keeps under `name`, generated by `generate` and stored on first
/// use. Two nodes racing on first use both end up with the value stored first.
pub async fn generated_setting(
    store: &dyn Store,
    name: &str,
    generate: impl FnOnce() -> String,
) -> Result<String, StoreError> {
    if let Some(value) = store.setting(name).await? {
        return Ok(value);
    }
    store
        .change_domains(DomainChange::InstallSetting {
            name: name.to_owned(),
            value: generate(),
        })
        .await?;
    store
        .setting(name)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("setting {name:?} vanished")))
}
