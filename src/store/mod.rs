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
//! Depends only on [`crate::model`] and [`crate::config`]. The conformance suite in
//! `tests/store.rs` runs against every implementation.

pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::model::{Message, NewMessage, Room, RoomKey};

/// Deepest nesting of a message's `data` a store accepts (JSON parsers refuse to read back
/// deeper documents).
pub const MAX_DATA_DEPTH: usize = 64;

/// Receives every newly committed message, in commit order (per room: `seq` order).
pub type CommitSink = mpsc::UnboundedSender<Arc<Message>>;

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
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a message, creating its room if needed, and returns it with its `seq`. `data`
    /// nested deeper than [`MAX_DATA_DEPTH`] is refused with [`StoreError::Invalid`]. If the
    /// message carries a `client_message_id` its author already used in that room, returns the
    /// stored message with `duplicate: true` and writes nothing. Returns only once durable.
    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError>;

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

    /// Creates or updates a customer's profile.
    async fn upsert_customer(
        &self,
        domain_id: &str,
        user_id: &str,
        profile: CustomerProfile,
    ) -> Result<(), StoreError>;

    /// Creates or renames a domain.
    async fn upsert_domain(&self, id: &str, name: &str) -> Result<(), StoreError>;

    /// Checks that reads and writes work.
    async fn health(&self) -> Result<(), StoreError>;

    /// Finishes queued writes and stops accepting new ones.
    async fn close(&self);

    /// Short name for health output and metrics (`sqlite`).
    fn kind(&self) -> &'static str;
}
