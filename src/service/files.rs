//! Files: uploads into a room, their reading by whoever may read the room, their deletion,
//! and the checked attachments a message carries.
//!
//! The bytes go to an object store (`object_store`: a local folder, or S3 / R2 / any
//! S3-compatible bucket, `files.store`) under `{domain}/{id}`, the id generated here (a UUID
//! v7): nothing the client sends becomes part of a key. The description (room, uploader,
//! cleaned name, size, type, SHA-256) goes to the store ([`crate::store::files`]). The type
//! is decided from the bytes ([`sniff`]); the client's word is only checked against it.
//!
//! Who may read a file is who may read its room's messages (`auth::policy::may_use_room`);
//! to anyone else, including every other domain, the file does not exist.
//!
//! Depends on the store, the domain table and the policy; the chat service takes the
//! [`Attachments`] it makes.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, PutOptions, PutPayload};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::ServiceError;
use crate::auth::Domains;
use crate::auth::policy;
use crate::config::{FileLimits, FileStoreLocation, FilesConfig};
use crate::error_code::ErrorCode;
use crate::metrics::Metrics;
use crate::model::{Identity, RoomKey, valid_id};
use crate::store::Store;
use crate::store::files::StoredFile;

/// Longest file name kept, in characters (longer ones are cut, keeping the extension).
pub const MAX_NAME_CHARS: usize = 200;
/// Files removed per store read while a room's files are deleted.
const DELETE_BATCH: usize = 500;
/// Types a browser may show inline: raster images, which run no script.
const INLINE_TYPES: &[&str] = &["image/png", "image/jpeg", "image/gif", "image/webp"];

/// Files of every domain.
pub struct FileService {
    /// Where the bytes are.
    objects: Arc<dyn ObjectStore>,
    /// `files.store`, for logs.
    location: String,
    /// The descriptions.
    store: Arc<dyn Store>,
    /// Each domain's settings (its file limits, its rule for visitors' rooms).
    domains: Arc<Domains>,
    /// The server's file settings.
    config: FilesConfig,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for FileService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileService")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// A file as a client sent it.
#[derive(Debug)]
pub struct Upload {
    /// The name it gave (cleaned before it is kept).
    pub name: String,
    /// The content type it declared, if any.
    pub declared_type: Option<String>,
    /// The bytes.
    pub bytes: Bytes,
}

/// A room the caller may upload into: made by [`FileService::upload_room`].
#[derive(Debug, Clone)]
pub struct UploadRoom(RoomKey);

/// The attachments of a message, each checked to be a file of the message's room and
/// described by the store: only [`FileService::attachments`] makes them.
#[derive(Debug, Clone, Default)]
pub struct Attachments(Vec<Value>);

impl Attachments {
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The JSON list a message's `data.attachments` holds.
    pub fn into_value(self) -> Value {
        Value::Array(self.0)
    }
}

/// A file being read: its description and its bytes as they arrive.
pub struct Download {
    /// The description.
    pub file: StoredFile,
    /// The bytes.
    pub body: BoxStream<'static, Result<Bytes, object_store::Error>>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl FileService {
    /// Opens the object store `config.store` names. Nothing is written yet: a folder is
    /// created by the first upload. Fails when the location cannot be used.
    pub fn new(
        config: &FilesConfig,
        store: Arc<dyn Store>,
        domains: Arc<Domains>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let (objects, location) = open_objects(config)?;
        Ok(Self {
            objects,
            location,
            store,
            domains,
            config: config.clone(),
            metrics,
        })
    }

    /// Where the files are (`file:///…`, `s3://…`).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The largest file any domain may upload, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.config.max_bytes
    }

    /// The file limits of `domain_id`.
    pub fn limits(&self, domain_id: &str) -> FileLimits {
        match self.domains.load().get(domain_id) {
            Some(domain) => self.config.limits_for(&domain.settings.files),
            None => self
                .config
                .limits_for(&crate::config::DomainFiles::default()),
        }
    }

    /// The room `room_id` of the caller's domain if it exists and the caller may post in
    /// it, with room for one more file.
    pub async fn upload_room(
        &self,
        identity: &Identity,
        room_id: &str,
    ) -> Result<UploadRoom, ServiceError> {
        let key = room_key(identity, room_id)?;
        let room = self
            .store
            .room(&key)
            .await?
            .ok_or(ServiceError::RoomNotFound)?;
        let rule = self.domains.load().visitor_rooms(&identity.domain_id);
        if !policy::may_use_room(identity, rule, Some(&room)) {
            return Err(ServiceError::Forbidden(
                "this room belongs to someone else".to_owned(),
            ));
        }
        let limits = self.limits(&identity.domain_id);
        let held = self
            .store
            .count_room_files(&key.domain_id, &key.room_id)
            .await?;
        if held >= limits.max_per_room {
            return Err(ServiceError::Conflict {
                code: ErrorCode::TooManyFiles,
                message: format!(
                    "the room holds {held} files; the limit is {}",
                    limits.max_per_room
                ),
            });
        }
        Ok(UploadRoom(key))
    }

    /// Stores an upload in `room`: checks its size and type against the domain's limits,
    /// writes the bytes, then the description. Nothing is kept when any step fails.
    pub async fn upload(
        &self,
        identity: &Identity,
        room: &UploadRoom,
        upload: Upload,
    ) -> Result<StoredFile, ServiceError> {
        let key = &room.0;
        let limits = self.limits(&key.domain_id);
        let size = upload.bytes.len() as u64;
        if size > limits.max_bytes {
            return Err(too_large(size, limits.max_bytes));
        }
        if size == 0 {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidUpload,
                "the file is empty",
            ));
        }
        let content_type = decide_type(
            &upload.bytes,
            upload.declared_type.as_deref(),
            &limits.allowed_types,
        )?;
        let file = StoredFile {
            id: uuid::Uuid::now_v7().to_string(),
            domain_id: key.domain_id.to_string(),
            room_id: key.room_id.to_string(),
            uploader_id: identity.user_id.clone(),
            name: clean_name(&upload.name),
            size,
            content_type,
            sha256: hex::encode(Sha256::digest(&upload.bytes)),
            created_at: crate::model::now_ms(),
        };
        let path = object_path(&file);
        self.objects
            .put_opts(
                &path,
                PutPayload::from_bytes(upload.bytes),
                PutOptions::default(),
            )
            .await
            .map_err(|e| self.unavailable("write", &path, &e))?;
        if let Err(e) = self.store.add_file(file.clone()).await {
            // The description could not be kept: the bytes go too.
            if let Err(cleanup) = self.delete_object(&path).await {
                tracing::warn!(path = %path, error = %cleanup, "cannot remove an unrecorded upload");
            }
            return Err(e.into());
        }
        self.metrics.files_uploaded.inc();
        self.metrics.files_uploaded_bytes.inc_by(size);
        Ok(file)
    }

    /// The file `id` if the caller may read it: a file of its domain, in a room whose
    /// messages it may read. Otherwise `file_not_found`, whether the file exists or not.
    pub async fn visible(&self, identity: &Identity, id: &str) -> Result<StoredFile, ServiceError> {
        let file = if valid_id(id) {
            self.store.file(&identity.domain_id, id).await?
        } else {
            None
        };
        let Some(file) = file else {
            return Err(file_not_found());
        };
        let rule = self.domains.load().visitor_rooms(&identity.domain_id);
        if policy::room_check_needed(identity, rule) {
            let room = self
                .store
                .room(&RoomKey::new(
                    file.domain_id.as_str(),
                    file.room_id.as_str(),
                ))
                .await?;
            if !policy::may_use_room(identity, rule, room.as_ref()) {
                return Err(file_not_found());
            }
        }
        Ok(file)
    }

    /// The file `id` and its bytes, for a caller who may read it ([`Self::visible`]).
    pub async fn open(&self, identity: &Identity, id: &str) -> Result<Download, ServiceError> {
        let file = self.visible(identity, id).await?;
        let path = object_path(&file);
        match self.objects.get_opts(&path, GetOptions::default()).await {
            Ok(found) => {
                self.metrics.files_served.inc();
                Ok(Download {
                    file,
                    body: found.into_stream(),
                })
            }
            Err(object_store::Error::NotFound { .. }) => {
                tracing::warn!(path = %path, "a recorded file has no bytes in the file store");
                Err(file_not_found())
            }
            Err(e) => Err(self.unavailable("read", &path, &e)),
        }
    }

    /// The room's files, oldest first (at most `limit`), for a caller who may read the room.
    pub async fn room_files(
        &self,
        identity: &Identity,
        room_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredFile>, ServiceError> {
        let key = room_key(identity, room_id)?;
        let rule = self.domains.load().visitor_rooms(&identity.domain_id);
        if policy::room_check_needed(identity, rule) {
            let room = self.store.room(&key).await?;
            if !policy::may_use_room(identity, rule, room.as_ref()) {
                return Err(ServiceError::Forbidden(
                    "this room belongs to someone else".to_owned(),
                ));
            }
        }
        Ok(self
            .store
            .room_files(&key.domain_id, &key.room_id, limit)
            .await?)
    }

    /// Deletes the file `id`: its uploader, the domain's agents, admins and back end may.
    /// The bytes go first, then the description, so a failure leaves a file that can be
    /// deleted again, never a description without bytes.
    pub async fn delete(&self, identity: &Identity, id: &str) -> Result<StoredFile, ServiceError> {
        let file = self.visible(identity, id).await?;
        if file.uploader_id != identity.user_id && !policy::may_assign(identity) {
            return Err(ServiceError::Forbidden(
                "only its uploader, the domain's agents and its back end may delete a file"
                    .to_owned(),
            ));
        }
        self.remove(&file).await?;
        Ok(file)
    }

    /// Deletes every file of the room (the domain's agents, admins and back end); returns
    /// how many.
    pub async fn delete_room_files(
        &self,
        identity: &Identity,
        room_id: &str,
    ) -> Result<u64, ServiceError> {
        if !policy::may_assign(identity) {
            return Err(ServiceError::Forbidden(
                "a room's files are deleted by the domain's agents, admins and back end".to_owned(),
            ));
        }
        let key = room_key(identity, room_id)?;
        let mut removed = 0;
        loop {
            let batch = self
                .store
                .room_files(&key.domain_id, &key.room_id, DELETE_BATCH)
                .await?;
            if batch.is_empty() {
                return Ok(removed);
            }
            for file in &batch {
                self.remove(file).await?;
                removed += 1;
            }
        }
    }

    /// The attachments `ids` as a message of the caller in `room_id` may carry them: each a
    /// file of that room, named once, at most the domain's `max_per_message`; each described
    /// from the store, whatever the client said of it.
    pub async fn attachments(
        &self,
        identity: &Identity,
        room_id: &str,
        ids: &[String],
    ) -> Result<Attachments, ServiceError> {
        if ids.is_empty() {
            return Ok(Attachments::default());
        }
        let key = room_key(identity, room_id)?;
        let limits = self.limits(&identity.domain_id);
        if ids.len() > limits.max_per_message {
            return Err(invalid_attachments(format!(
                "a message carries at most {} attachments",
                limits.max_per_message
            )));
        }
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(invalid_attachments(format!(
                    "file {id:?} is attached twice"
                )));
            }
        }
        let found = if ids.iter().all(|id| valid_id(id)) {
            self.store.files(&key.domain_id, ids).await?
        } else {
            Vec::new()
        };
        ids.iter()
            .map(|id| {
                found
                    .iter()
                    .find(|f| &f.id == id && *f.room_id == *key.room_id)
                    .map(attachment)
                    .ok_or_else(|| {
                        invalid_attachments(format!("there is no file {id:?} in this room"))
                    })
            })
            .collect::<Result<_, _>>()
            .map(Attachments)
    }

    /// Removes a file's bytes, then its description.
    async fn remove(&self, file: &StoredFile) -> Result<(), ServiceError> {
        let path = object_path(file);
        self.delete_object(&path)
            .await
            .map_err(|e| self.unavailable("delete", &path, &e))?;
        if self.store.remove_file(&file.domain_id, &file.id).await? {
            self.metrics.files_deleted.inc();
        }
        Ok(())
    }

    /// Deletes one object; one already gone counts as deleted.
    async fn delete_object(&self, path: &ObjectPath) -> Result<(), object_store::Error> {
        let one = futures_util::stream::once(std::future::ready(Ok(path.clone()))).boxed();
        match self.objects.delete_stream(one).try_next().await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `files_unavailable`, with the cause logged.
    fn unavailable(&self, what: &str, path: &ObjectPath, e: &object_store::Error) -> ServiceError {
        tracing::warn!(store = %self.location, path = %path, error = %e, "file store {what} failed");
        ServiceError::NotAvailable {
            code: ErrorCode::FilesUnavailable,
            message: "the file store is unavailable; try again".to_owned(),
        }
    }
}

/// The object store `config.store` names, and how to name it in logs.
fn open_objects(config: &FilesConfig) -> Result<(Arc<dyn ObjectStore>, String), String> {
    match config.location()? {
        FileStoreLocation::Local(dir) => {
            let dir = match std::fs::metadata(&dir) {
                Ok(meta) if !meta.is_dir() => {
                    return Err(format!("files.store: {} is not a folder", dir.display()));
                }
                Ok(_) => std::fs::canonicalize(&dir),
                Err(_) => std::path::absolute(&dir),
            }
            .map_err(|e| format!("files.store: cannot use {}: {e}", dir.display()))?;
            let prefix = ObjectPath::from_absolute_path(&dir)
                .map_err(|e| format!("files.store: cannot use {}: {e}", dir.display()))?;
            let objects = object_store::prefix::PrefixStore::new(
                object_store::local::LocalFileSystem::new(),
                prefix,
            );
            Ok((Arc::new(objects), format!("file://{}", dir.display())))
        }
        FileStoreLocation::S3 { bucket, prefix } => {
            let mut builder =
                object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket);
            if let Some(endpoint) = &config.s3_endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(region) = &config.s3_region {
                builder = builder.with_region(region);
            }
            if let Some(key) = &config.s3_access_key_id {
                builder = builder.with_access_key_id(key);
            }
            if let Some(secret) = &config.s3_secret_access_key {
                builder = builder.with_secret_access_key(secret.expose());
            }
            if config.allow_http {
                builder = builder.with_allow_http(true);
            }
            let s3 = builder
                .build()
                .map_err(|e| format!("files.store: cannot use s3://{bucket}: {e}"))?;
            let described = if prefix.is_empty() {
                format!("s3://{bucket}")
            } else {
                format!("s3://{bucket}/{prefix}")
            };
            if prefix.is_empty() {
                Ok((Arc::new(s3), described))
            } else {
                let prefix = ObjectPath::parse(&prefix)
                    .map_err(|e| format!("files.store: the prefix {prefix:?}: {e}"))?;
                Ok((
                    Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)),
                    described,
                ))
            }
        }
    }
}

/// The key of a file's bytes: its domain and its id (each one segment, escaped if need be).
fn object_path(file: &StoredFile) -> ObjectPath {
    ObjectPath::from_iter([file.domain_id.as_str(), file.id.as_str()])
}

/// The room `room_id` of the caller's domain, or `invalid_room_id`.
fn room_key(identity: &Identity, room_id: &str) -> Result<RoomKey, ServiceError> {
    if !valid_id(room_id) {
        return Err(ServiceError::invalid(
            ErrorCode::InvalidRoomId,
            "roomId must be 1-128 characters of A-Z a-z 0-9 - _ . : @",
        ));
    }
    Ok(policy::room_key(identity, room_id))
}

/// A stored file as a message's attachment.
fn attachment(file: &StoredFile) -> Value {
    json!({
        "fileId": file.id,
        "name": file.name,
        "size": file.size,
        "contentType": file.content_type,
        "url": file_url(&file.id),
    })
}

/// Where a file is read, relative to the server.
pub fn file_url(id: &str) -> String {
    format!("/api/files/{id}")
}

/// Whether a file of `content_type` may be shown inline by a browser (raster images only).
pub fn inline(content_type: &str) -> bool {
    INLINE_TYPES.contains(&content_type)
}

/// `file_too_large`.
pub fn too_large(size: u64, max: u64) -> ServiceError {
    ServiceError::TooLarge {
        code: ErrorCode::FileTooLarge,
        message: if size > max {
            format!("the file is {size} bytes; the limit is {max}")
        } else {
            format!("the file is larger than the limit of {max} bytes")
        },
    }
}

fn file_not_found() -> ServiceError {
    ServiceError::NotFound {
        code: ErrorCode::FileNotFound,
        message: "file not found".to_owned(),
    }
}

fn invalid_attachments(message: String) -> ServiceError {
    ServiceError::invalid(ErrorCode::InvalidAttachments, message)
}

/// The content type of `bytes`, from their first bytes: a known format's (`infer`), else
/// `text/plain` for UTF-8 text without control characters, else
/// `application/octet-stream`.
pub fn sniff(bytes: &[u8]) -> String {
    if let Some(kind) = infer::get(bytes) {
        return kind.mime_type().to_owned();
    }
    let text = std::str::from_utf8(bytes).is_ok_and(|s| {
        !s.chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\u{c}'))
    });
    if text {
        "text/plain".to_owned()
    } else {
        "application/octet-stream".to_owned()
    }
}

/// The type a file is kept and served as: the one its bytes show ([`sniff`]), which must
/// be allowed. A file declared an image whose bytes are no image is refused; otherwise a
/// declared type that disagrees is replaced by the real one.
pub fn decide_type(
    bytes: &[u8],
    declared: Option<&str>,
    allowed: &[String],
) -> Result<String, ServiceError> {
    let real = sniff(bytes);
    let declared = declared
        .and_then(|d| d.split(';').next())
        .map(|d| d.trim().to_ascii_lowercase())
        .filter(|d| !d.is_empty());
    if let Some(declared) = &declared
        && declared.starts_with("image/")
        && !real.starts_with("image/")
    {
        return Err(ServiceError::invalid(
            ErrorCode::FileTypeNotAllowed,
            format!("the file is declared {declared} but its bytes are {real}"),
        ));
    }
    if !allowed.contains(&real) {
        return Err(ServiceError::invalid(
            ErrorCode::FileTypeNotAllowed,
            if allowed.is_empty() {
                "this domain takes no files".to_owned()
            } else {
                format!(
                    "files of type {real} are not allowed here (allowed: {})",
                    allowed.join(", ")
                )
            },
        ));
    }
    Ok(real)
}

/// A file name safe to keep and show: its last path component (after `/` or `\`), without
/// control or bidirectional-override characters, leading dots or surrounding spaces, cut
/// to [`MAX_NAME_CHARS`] characters (keeping a short extension); `file` when nothing is
/// left.
pub fn clean_name(raw: &str) -> String {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let kept: String = last
        .chars()
        .filter(|c| {
            !c.is_control()
                && !matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect();
    let kept = kept.trim().trim_start_matches('.').trim();
    if kept.is_empty() {
        return "file".to_owned();
    }
    if kept.chars().count() <= MAX_NAME_CHARS {
        return kept.to_owned();
    }
    let extension = kept
        .rsplit_once('.')
        .map(|(_, ext)| ext)
        .filter(|ext| (1..=10).contains(&ext.chars().count()));
    match extension {
        Some(ext) => {
            let stem: String = kept
                .chars()
                .take(MAX_NAME_CHARS - ext.chars().count() - 1)
                .collect();
            format!("{stem}.{ext}")
        }
        None => kept.chars().take(MAX_NAME_CHARS).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] =
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

    fn allowed() -> Vec<String> {
        FilesConfig::default().allowed_types
    }

    #[test]
    fn names_lose_their_paths_and_control_characters() {
        assert_eq!(clean_name("../../etc/passwd"), "passwd");
        assert_eq!(clean_name("C:\\Users\\me\\photo.png"), "photo.png");
        assert_eq!(clean_name("a\0b\nc\u{202e}gnp.exe"), "abcgnp.exe");
        assert_eq!(clean_name("../"), "file");
        assert_eq!(clean_name(".."), "file");
        assert_eq!(clean_name(".htaccess"), "htaccess");
        assert_eq!(clean_name("  report 2026.pdf "), "report 2026.pdf");
        let long = format!("{}.pdf", "x".repeat(500));
        let cut = clean_name(&long);
        assert_eq!(cut.chars().count(), MAX_NAME_CHARS);
        assert!(cut.ends_with(".pdf"));
        assert_eq!(clean_name(&"é".repeat(300)).chars().count(), MAX_NAME_CHARS);
    }

    #[test]
    fn the_type_comes_from_the_bytes() {
        assert_eq!(sniff(PNG), "image/png");
        assert_eq!(sniff(b"%PDF-1.7\n"), "application/pdf");
        assert_eq!(sniff("hello, wörld\n".as_bytes()), "text/plain");
        assert_eq!(
            sniff(b"<!DOCTYPE html><script>alert(1)</script>"),
            "text/html"
        );
        assert_eq!(sniff(b"\x00\x01\x02binary"), "application/octet-stream");
        // A PNG declared as something else is kept as a PNG.
        assert_eq!(
            decide_type(PNG, Some("application/octet-stream"), &allowed()).unwrap(),
            "image/png"
        );
        // HTML declared as a PNG is refused.
        let e = decide_type(
            b"<html><script>x</script></html>",
            Some("image/png"),
            &allowed(),
        )
        .unwrap_err();
        assert_eq!(e.code(), ErrorCode::FileTypeNotAllowed);
        // HTML declared as text is refused too: text/html is not allowed.
        let e = decide_type(
            b"<html><body>x</body></html>",
            Some("text/plain"),
            &allowed(),
        )
        .unwrap_err();
        assert_eq!(e.code(), ErrorCode::FileTypeNotAllowed);
        // Text declared as HTML is kept as plain text.
        assert_eq!(
            decide_type(b"just words", Some("text/html; charset=utf-8"), &allowed()).unwrap(),
            "text/plain"
        );
        assert!(decide_type(b"just words", None, &[]).is_err());
        assert!(inline("image/png") && !inline("image/svg+xml") && !inline("text/plain"));
    }
}
