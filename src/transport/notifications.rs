//! Notifications over HTTP (`docs/notifications.md`): the back ends' send, and the users'
//! unread list, count, mark-read, per-task timeline and server-sent events — seed 004's
//! endpoints and shapes.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::{ApiJson, ApiQuery, Caller, bearer_token};
use super::wire::notification_json;
use crate::error_code::ErrorCode;
use crate::model::Identity;
use crate::service::ServiceError;
use crate::service::notifications::{Draft, Sent};
use crate::transport::AppState;

/// One notification of `POST /api/notifications`, in seed 004's shape.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DraftBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    user_id: Option<String>,
    content: Option<String>,
    task_id: Option<String>,
    org_id: Option<String>,
    data: Option<Value>,
    timestamp: Option<String>,
}

impl From<DraftBody> for Draft {
    fn from(b: DraftBody) -> Self {
        Draft {
            kind: b.kind,
            user_id: b.user_id,
            content: b.content,
            task_id: b.task_id,
            org_id: b.org_id,
            data: b.data,
            timestamp: b.timestamp,
        }
    }
}

/// Reads one notification object; `at` names it in a batch.
fn draft(value: Value, at: Option<usize>) -> Result<Draft, ApiError> {
    let name = at.map_or_else(String::new, |i| format!("items[{i}]: "));
    if !value.is_object() {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidBody,
            format!("{name}a notification is a JSON object"),
        ));
    }
    serde_json::from_value::<DraftBody>(value)
        .map(Draft::from)
        .map_err(|e| ApiError::bad_request(ErrorCode::InvalidBody, format!("{name}{e}")))
}

/// The seed's result of one send.
fn sent_json(sent: &Sent) -> Value {
    json!({
        "success": true,
        "pusherSent": sent.pushed,
        "databaseStored": true,
        "messageId": sent.notification.id,
    })
}

/// `POST /api/notifications`: a back end (a server key of the domain, or its internal
/// secret) sends one notification, or an array of up to 100.
pub async fn send(
    State(app): State<AppState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let (drafts, several) = match body {
        Value::Array(items) => (
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| draft(v, Some(i)))
                .collect::<Result<Vec<_>, _>>()?,
            true,
        ),
        other => (vec![draft(other, None)?], false),
    };
    match app.notifications.send(&caller, drafts).await {
        Ok(sent) if several => {
            Ok(Json(sent.iter().map(sent_json).collect::<Vec<_>>()).into_response())
        }
        Ok(sent) => Ok(Json(sent.first().map(sent_json).unwrap_or(Value::Null)).into_response()),
        // Nothing was stored: the seed's result says so, with the code beside it.
        Err(e @ ServiceError::Unavailable(_)) => {
            tracing::warn!(error = %e, "cannot store notifications");
            app.metrics.client_error(e.code().as_str());
            Ok((
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "success": false,
                    "pusherSent": false,
                    "databaseStored": false,
                    "messageId": null,
                    "error": e.to_string(),
                    "code": e.code(),
                })),
            )
                .into_response())
        }
        Err(e) => Err(refused(&app, e)),
    }
}

/// A refusal, counted by its code.
fn refused(app: &AppState, e: ServiceError) -> ApiError {
    app.metrics.client_error(e.code().as_str());
    ApiError::from(e)
}

/// The user of a notification request: from `Authorization: Bearer`, else from the JWT in
/// the cookie `notifications.token_cookie` names (when it names one). A request that the
/// cookie authenticates and that changes something must come from a page of this site
/// (`cross_site` otherwise): another site's page would send the cookie too.
#[derive(Debug)]
pub struct Reader(pub Identity);

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        if let Some(token) = cookie_token(app, &parts.headers) {
            if parts.method != Method::GET {
                super::accounts::same_site_only(
                    app,
                    &parts.headers,
                    "a request signed in by cookie is accepted from this site's pages only",
                )?;
            }
            let identity = identify(app, token).await?;
            if let Err(wait) = app.edge.check_identity(&identity).await {
                app.metrics.client_error("rate_limited");
                return Err(ApiError::rate_limited(wait, "requests by this identity"));
            }
            return Ok(Reader(identity));
        }
        let Caller(identity) = Caller::from_request_parts(parts, app).await?;
        Ok(Reader(identity))
    }
}

/// The JWT of the `notifications.token_cookie` cookie, for a request without an
/// `Authorization` header.
fn cookie_token<'a>(app: &AppState, headers: &'a HeaderMap) -> Option<&'a str> {
    if headers.contains_key(axum::http::header::AUTHORIZATION) {
        return None;
    }
    let name = app.config.notifications.token_cookie.as_deref()?;
    super::accounts::named_cookie(headers, name).filter(|t| !t.is_empty())
}

/// The identity `token` stands for, or the API's refusal.
async fn identify(app: &AppState, token: &str) -> Result<Identity, ApiError> {
    app.auth.identify(Some(token)).await.map_err(|e| {
        app.metrics.client_error(e.code().as_str());
        ApiError::unauthorized(e.code(), e.to_string())
    })
}

/// Query of `GET /api/chat-messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
    before: Option<u64>,
}

/// `GET /api/chat-messages?limit=&before=`: the caller's unread notifications, newest first.
pub async fn unread(
    State(app): State<AppState>,
    Reader(caller): Reader,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let (page, more, count) = app
        .notifications
        .unread(&caller, q.limit.unwrap_or(50), q.before)
        .await
        .map_err(|e| refused(&app, e))?;
    let next = if more {
        page.last().map(|n| n.seq)
    } else {
        None
    };
    Ok(Json(json!({
        "messages": page.iter().map(notification_json).collect::<Vec<_>>(),
        "total": count.unread,
        "hasMore": more,
        "nextBefore": next,
    }))
    .into_response())
}

/// `GET /api/chat-messages/unread-count`.
pub async fn unread_count(
    State(app): State<AppState>,
    Reader(caller): Reader,
) -> Result<Response, ApiError> {
    let count = app
        .notifications
        .count(&caller)
        .await
        .map_err(|e| refused(&app, e))?;
    Ok(Json(json!({ "count": count.unread, "lastSeq": count.last_seq })).into_response())
}

/// Body of `POST /api/chat-messages/mark-read`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MarkRead {
    message_ids: Vec<String>,
}

/// `POST /api/chat-messages/mark-read {messageIds}`.
pub async fn mark_read(
    State(app): State<AppState>,
    Reader(caller): Reader,
    ApiJson(body): ApiJson<MarkRead>,
) -> Result<Response, ApiError> {
    let marked = app
        .notifications
        .mark_read(&caller, body.message_ids)
        .await
        .map_err(|e| refused(&app, e))?;
    Ok(Json(json!({ "success": true, "markedCount": marked })).into_response())
}

/// `POST /api/chat-messages/mark-all-read`.
pub async fn mark_all_read(
    State(app): State<AppState>,
    Reader(caller): Reader,
) -> Result<Response, ApiError> {
    let marked = app
        .notifications
        .mark_all_read(&caller)
        .await
        .map_err(|e| refused(&app, e))?;
    Ok(Json(json!({ "success": true, "markedCount": marked })).into_response())
}

/// `GET /api/chat-messages/{taskId}`: the caller's notifications of a task, oldest first.
pub async fn task(
    State(app): State<AppState>,
    Reader(caller): Reader,
    Path(task_id): Path<String>,
) -> Result<Response, ApiError> {
    let list = app
        .notifications
        .task(&caller, &task_id)
        .await
        .map_err(|e| refused(&app, e))?;
    Ok(Json(json!({
        "taskId": task_id,
        "messages": list.iter().map(notification_json).collect::<Vec<_>>(),
        "count": list.len(),
    }))
    .into_response())
}

/// Query of `GET /api/chat-messages/stream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// The user's token, for `EventSource`, which cannot set headers.
    token: Option<String>,
    /// Start after this `seq` (what `Last-Event-ID` says too; the header wins).
    since: Option<u64>,
}

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /api/chat-messages/stream`: server-sent events, one `chat-message` per
/// notification, its `id` the notification's `seq`; resumes after `Last-Event-ID`.
pub async fn stream(
    State(app): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    let token = bearer_token(&headers)
        .filter(|t| !t.is_empty())
        .or(q.token.as_deref().filter(|t| !t.is_empty()))
        .or_else(|| cookie_token(&app, &headers));
    let Some(token) = token else {
        app.metrics.client_error("missing_token");
        return Err(ApiError::unauthorized(
            ErrorCode::MissingToken,
            "send the user's token as Authorization: Bearer or ?token=",
        ));
    };
    let caller = identify(&app, token).await?;
    let last_event = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        ErrorCode::InvalidQuery,
                        "Last-Event-ID is a notification's seq",
                    )
                })?,
        ),
    };
    let caller = std::sync::Arc::new(caller);
    let (listener, _) = app
        .notifications
        .stream(&caller, last_event.or(q.since))
        .await
        .map_err(|e| refused(&app, e))?;
    let events = futures_util::stream::unfold(listener, |mut listener| async move {
        let n = listener.next().await?;
        let event = SseEvent::default()
            .event("chat-message")
            .id(n.seq.to_string())
            .data(notification_json(&n).to_string());
        Some((Ok::<_, Infallible>(event), listener))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}
