//! The file endpoints (`docs/files.md`): upload into a room (`POST /api/files`, a
//! multipart form), read (`GET /api/files/{id}`), delete (`DELETE /api/files/{id}`), and a
//! room's files (`GET` and `DELETE /api/rooms/{id}/files`).
//!
//! A file is served so that it can never act as a page of Parlor's origin: `nosniff`, a
//! sandboxing `Content-Security-Policy`, and, for anything but a raster image, a download
//! (`Content-Disposition: attachment`) with a type a browser does not run.

use axum::Json;
use axum::body::Body;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{FromRequestParts, Multipart, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::{ApiQuery, Caller, bearer_token};
use crate::error_code::ErrorCode;
use crate::model::{Identity, iso};
use crate::service::ServiceError;
use crate::service::files::{self, Upload, UploadRoom};
use crate::store::files::StoredFile;
use crate::transport::AppState;

/// Room for the form around the file in a request to `POST /api/files`, in bytes.
pub const FORM_OVERHEAD_BYTES: usize = 64 * 1024;
/// Longest `roomId` field read, in bytes.
const MAX_ROOM_ID_BYTES: usize = 1024;
/// The policy of every file response: nothing loads, nothing runs, no same-origin access.
const FILE_POLICY: &str = "default-src 'none'; sandbox";

/// One attachment as a client names it on a message: its `fileId` (anything else it says
/// of the file is ignored; the server describes the file from the store).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRef {
    file_id: String,
}

/// The file ids of `refs`, in order.
pub fn attachment_ids(refs: &[AttachmentRef]) -> Vec<String> {
    refs.iter().map(|r| r.file_id.clone()).collect()
}

/// The caller of a file read: as for the rest of the API, or, for a browser's `<img src>`
/// or link that cannot send a header, the token in the `token` query parameter.
#[derive(Debug)]
pub struct Reader(pub Identity);

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        if bearer_token(&parts.headers).is_none()
            && let Some(token) = query_token(parts.uri.query())
        {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                app.metrics.client_error("invalid_token");
                ApiError::unauthorized(ErrorCode::InvalidToken, "the token is malformed")
            })?;
            parts.headers.insert(header::AUTHORIZATION, value);
        }
        Caller::from_request_parts(parts, app)
            .await
            .map(|Caller(identity)| Reader(identity))
    }
}

/// The `token` parameter of a query string, if any and not empty.
fn query_token(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, v)| k == "token" && !v.is_empty())
        .map(|(_, v)| v.into_owned())
}

/// A refusal, counted.
fn refused(app: &AppState, e: ApiError) -> ApiError {
    app.metrics.client_error(e.code().as_str());
    e
}

fn service(app: &AppState, e: ServiceError) -> ApiError {
    refused(app, e.into())
}

fn invalid_upload(app: &AppState, message: impl Into<String>) -> ApiError {
    refused(
        app,
        ApiError::bad_request(ErrorCode::InvalidUpload, message),
    )
}

/// A multipart body that could not be read: too large (the request's limit) or malformed.
fn unreadable(app: &AppState, e: &MultipartError, max_bytes: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return service(app, files::too_large(0, max_bytes));
    }
    invalid_upload(
        app,
        format!(
            "the multipart body is malformed or cut short: {}",
            e.body_text()
        ),
    )
}

/// A stored file as the API describes it.
pub fn describe(file: &StoredFile) -> Value {
    json!({
        "fileId": file.id,
        "roomId": file.room_id,
        "name": file.name,
        "size": file.size,
        "contentType": file.content_type,
        "url": files::file_url(&file.id),
        "uploadedBy": file.uploader_id,
        "createdAt": iso(file.created_at),
    })
}

/// What the form held.
#[derive(Default)]
struct Form {
    room_id: Option<String>,
    /// The room, once checked (when `roomId` came before the file, before reading it).
    room: Option<UploadRoom>,
    file: Option<Upload>,
}

/// `POST /api/files`: a `multipart/form-data` body with one `file` field and a `roomId`
/// field. Answers 201 with the stored file's description.
pub async fn upload(
    State(app): State<AppState>,
    Caller(identity): Caller,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut form = form.map_err(|r| {
        invalid_upload(
            &app,
            format!("send the file as multipart/form-data: {}", r.body_text()),
        )
    })?;
    let mut read = Form::default();
    let outcome = read_form(&app, &identity, &mut form, &mut read).await;
    if let Err(e) = outcome {
        // Read what is left, so the client hears the answer rather than a reset connection;
        // the request's body limit bounds it.
        while let Ok(Some(field)) = form.next_field().await {
            drop(field);
        }
        return Err(e);
    }
    let Some(room_id) = read.room_id else {
        return Err(invalid_upload(
            &app,
            "the form has no `roomId` field: name the room the file is for",
        ));
    };
    let Some(upload) = read.file else {
        return Err(invalid_upload(
            &app,
            "the form has no `file` field: send the file in a field named `file`",
        ));
    };
    let room = match read.room {
        Some(room) => room,
        None => app
            .files
            .upload_room(&identity, &room_id)
            .await
            .map_err(|e| service(&app, e))?,
    };
    let stored = app
        .files
        .upload(&identity, &room, upload)
        .await
        .map_err(|e| service(&app, e))?;
    Ok((StatusCode::CREATED, Json(describe(&stored))).into_response())
}

/// Reads the form's fields into `read`, checking the room as soon as it is named.
async fn read_form(
    app: &AppState,
    identity: &Identity,
    form: &mut Multipart,
    read: &mut Form,
) -> Result<(), ApiError> {
    let max_bytes = app.files.limits(&identity.domain_id).max_bytes;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| unreadable(app, &e, max_bytes))?
    {
        match field.name() {
            Some("roomId") => {
                if read.room_id.is_some() {
                    return Err(invalid_upload(app, "the form has two `roomId` fields"));
                }
                let bytes = read_field(app, field, MAX_ROOM_ID_BYTES as u64, max_bytes)
                    .await?
                    .ok_or_else(|| invalid_upload(app, "`roomId` is too long"))?;
                let room_id = String::from_utf8(bytes.to_vec())
                    .map_err(|_| invalid_upload(app, "`roomId` is not UTF-8 text"))?;
                read.room = Some(
                    app.files
                        .upload_room(identity, room_id.trim())
                        .await
                        .map_err(|e| service(app, e))?,
                );
                read.room_id = Some(room_id.trim().to_owned());
            }
            Some("file") => {
                // The room (and the caller's right to post in it) is checked before a byte
                // of the file is read: nobody gets megabytes held in memory for a room
                // they may not use.
                if read.room.is_none() {
                    return Err(invalid_upload(
                        app,
                        "the form must give `roomId` before `file`",
                    ));
                }
                if read.file.is_some() {
                    return Err(invalid_upload(
                        app,
                        "the form has two files: send one file per request",
                    ));
                }
                let name = field.file_name().unwrap_or("file").to_owned();
                let declared_type = field.content_type().map(str::to_owned);
                let bytes = read_field(app, field, max_bytes, max_bytes)
                    .await?
                    .ok_or_else(|| service(app, files::too_large(0, max_bytes)))?;
                read.file = Some(Upload {
                    name,
                    declared_type,
                    bytes: bytes.freeze(),
                });
            }
            Some(other) => {
                return Err(invalid_upload(
                    app,
                    format!("unknown form field {other:?}: send `file` and `roomId`"),
                ));
            }
            None => return Err(invalid_upload(app, "a form field has no name")),
        }
    }
    Ok(())
}

/// A field's bytes, or `None` once it is longer than `limit` (the rest of it is skipped).
async fn read_field(
    app: &AppState,
    mut field: Field<'_>,
    limit: u64,
    max_bytes: u64,
) -> Result<Option<BytesMut>, ApiError> {
    let mut bytes = BytesMut::new();
    let mut over = false;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| unreadable(app, &e, max_bytes))?
    {
        if over || (bytes.len() + chunk.len()) as u64 > limit {
            over = true;
            bytes.clear();
            continue;
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((!over).then_some(bytes))
}

/// `GET /api/files/{id}`: the file, for whoever may read its room; 404 for anyone else.
pub async fn download(
    State(app): State<AppState>,
    Reader(identity): Reader,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let found = app
        .files
        .open(&identity, &id)
        .await
        .map_err(|e| service(&app, e))?;
    let file = &found.file;
    let inline = files::inline(&file.content_type);
    let served_type = if inline || file.content_type == "application/pdf" {
        file.content_type.clone()
    } else if file.content_type.starts_with("text/") {
        "text/plain; charset=utf-8".to_owned()
    } else {
        "application/octet-stream".to_owned()
    };
    let disposition = format!(
        "{}; filename=\"{}\"; filename*=UTF-8''{}",
        if inline { "inline" } else { "attachment" },
        ascii_name(&file.name),
        percent_name(&file.name)
    );
    let mut response = Response::new(Body::from_stream(found.body));
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, served_type),
        (header::CONTENT_DISPOSITION, disposition),
        (header::CONTENT_LENGTH, file.size.to_string()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        (header::CONTENT_SECURITY_POLICY, FILE_POLICY.to_owned()),
        (header::CACHE_CONTROL, "private, max-age=3600".to_owned()),
        (header::ETAG, format!("\"{}\"", file.sha256)),
    ] {
        let value = HeaderValue::from_str(&value).map_err(|_| {
            refused(
                &app,
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    "the file's headers cannot be written",
                ),
            )
        })?;
        headers.insert(name, value);
    }
    Ok(response)
}

/// The name for `filename="…"`: ASCII, without quotes or backslashes.
fn ascii_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The name for `filename*=UTF-8''…` (RFC 8187): every byte but the unreserved ones
/// percent-encoded.
fn percent_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() * 3);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `DELETE /api/files/{id}`: its uploader, the domain's agents, admins and back end.
pub async fn delete(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let file = app
        .files
        .delete(&identity, &id)
        .await
        .map_err(|e| service(&app, e))?;
    Ok(Json(json!({ "deleted": true, "fileId": file.id })).into_response())
}

/// Query of `GET /api/rooms/{id}/files`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
}

/// `GET /api/rooms/{id}/files`: the room's files, oldest first, for whoever may read it.
pub async fn room_files(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = query
        .limit
        .unwrap_or(100)
        .clamp(1, app.config.limits.max_page);
    let found = app
        .files
        .room_files(&identity, &room_id, limit)
        .await
        .map_err(|e| service(&app, e))?;
    let listed: Vec<Value> = found.iter().map(describe).collect();
    Ok(Json(json!({ "roomId": room_id, "files": listed })).into_response())
}

/// `DELETE /api/rooms/{id}/files`: every file of the room (agents, admins, back end).
pub async fn delete_room_files(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
) -> Result<Response, ApiError> {
    let deleted = app
        .files
        .delete_room_files(&identity, &room_id)
        .await
        .map_err(|e| service(&app, e))?;
    Ok(Json(json!({ "roomId": room_id, "deleted": deleted })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_written_safely_into_the_disposition() {
        assert_eq!(ascii_name("ré\"sumé\\.pdf"), "r__sum__.pdf");
        assert_eq!(percent_name("ré sumé.pdf"), "r%C3%A9%20sum%C3%A9.pdf");
        assert_eq!(percent_name("a;b\r\n"), "a%3Bb%0D%0A");
    }

    #[test]
    fn the_token_may_come_in_the_query() {
        assert_eq!(query_token(Some("a=1&token=abc%2Bd")), Some("abc+d".into()));
        assert_eq!(query_token(Some("token=")), None);
        assert_eq!(query_token(None), None);
    }
}
