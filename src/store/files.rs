//! Uploaded files' descriptions, and the [`Files`] trait every store implements.
//!
//! The bytes are not here: they live in the object store (`service::files`), under a key
//! made of the domain and the file's generated id, never of anything the client sent. A row
//! says which domain and room a file was posted in (who may read it follows from the room),
//! who posted it, its cleaned name, its size, the content type the server decided from its
//! bytes, and their SHA-256.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// A stored file's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Generated id (a UUID v7): the object's key and the `fileId` on the wire.
    pub id: String,
    /// The domain it belongs to.
    pub domain_id: String,
    /// The room it was posted in.
    pub room_id: String,
    /// Who posted it (user id).
    pub uploader_id: String,
    /// Its name, cleaned of paths and control characters.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The content type the server decided from its bytes.
    pub content_type: String,
    /// SHA-256 of its bytes, as lowercase hex.
    pub sha256: String,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// Storage of file descriptions.
#[async_trait]
pub trait Files: Send + Sync {
    /// Stores a new file's description. An id already stored is refused with
    /// [`StoreError::Invalid`] and nothing is written.
    async fn add_file(&self, file: StoredFile) -> Result<(), StoreError>;

    /// The file `id` of the domain, if any (a file of another domain is not found).
    async fn file(&self, domain_id: &str, id: &str) -> Result<Option<StoredFile>, StoreError>;

    /// The files of the domain among `ids`, in no particular order; unknown ids are left out.
    async fn files(&self, domain_id: &str, ids: &[String]) -> Result<Vec<StoredFile>, StoreError>;

    /// The room's files, oldest first, at most `limit`.
    async fn room_files(
        &self,
        domain_id: &str,
        room_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredFile>, StoreError>;

    /// How many files the room holds.
    async fn count_room_files(&self, domain_id: &str, room_id: &str) -> Result<u64, StoreError>;

    /// Removes the file's description; false when there was none.
    async fn remove_file(&self, domain_id: &str, id: &str) -> Result<bool, StoreError>;
}
