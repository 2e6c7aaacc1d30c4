//! The HTTP API: the seeds' message endpoints, room history, health and metrics.
//!
//! Every error leaves as `{"error":{"code","message"}}` with a stable snake_case code; the
//! cause of a server-side failure is logged, never returned.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::edge::{self, ClientIp};
use super::error::ApiError;
use super::wire::WireMessage;
use crate::auth::policy;
use crate::error_code::ErrorCode;
use crate::model::{Identity, Role, iso, now_ms, valid_id};
use crate::service::ServiceError;
use crate::service::chat::Outgoing;
use crate::service::files::Attachments;
use crate::transport::AppState;

/// The bearer token of a request, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The caller of an HTTP request: from `Authorization: Bearer`, else an anonymous visitor.
#[derive(Debug)]
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let identity = match bearer_token(&parts.headers).filter(|t| !t.is_empty()) {
            None => super::visitor::anonymous(&parts.extensions),
            token => app.auth.identify(token).await.map_err(|e| {
                app.metrics.client_error(e.code().as_str());
                ApiError::unauthorized(e.code(), e.to_string())
            })?,
        };
        if let Err(wait) = app.edge.check_identity(&identity).await {
            app.metrics.client_error("rate_limited");
            return Err(ApiError::rate_limited(wait, "requests by this identity"));
        }
        Ok(Caller(identity))
    }
}

/// `Json<T>` whose rejections use the API's error shape. A body sent without a
/// `Content-Type`, as `text/plain` or as a form is read as JSON too: the seeds' clients post
/// JSON that way (`fetch` with a string body), and so does `curl -d`. These endpoints take bearer tokens; the only
/// cookie they read, the visitor's, counts only for pages a domain names
/// (`transport::visitor`), so such a body gives another site's form nothing (and the
/// cookie-session endpoints refuse cross-site requests on their own). Any other non-JSON
/// type is 415. With
/// `LENIENT = false` (the cookie-session endpoints, as a second line of defence) only
/// `application/json` is read.
#[derive(Debug)]
pub struct ApiJson<T, const LENIENT: bool = true>(pub T);

impl<T: DeserializeOwned, S: Send + Sync, const LENIENT: bool> FromRequest<S>
    for ApiJson<T, LENIENT>
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !LENIENT || !lenient_content_type(req.headers()) {
            return match Json::<T>::from_request(req, state).await {
                Ok(Json(v)) => Ok(Self(v)),
                Err(rejection) => Err(json_rejection(&rejection)),
            };
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::PayloadTooLarge,
                    "request body is too large",
                )
            } else {
                ApiError::bad_request(ErrorCode::InvalidBody, r.body_text())
            }
        })?;
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

/// No `Content-Type` at all, `text/plain` (what `fetch` sends with a string body) or
/// `application/x-www-form-urlencoded` (what `curl -d` sends), with any parameters.
fn lenient_content_type(headers: &HeaderMap) -> bool {
    match headers.get(header::CONTENT_TYPE) {
        None => true,
        Some(v) => v.to_str().is_ok_and(|v| {
            v.split(';').next().is_some_and(|t| {
                let t = t.trim();
                t.eq_ignore_ascii_case("text/plain")
                    || t.eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        }),
    }
}

fn json_rejection(r: &JsonRejection) -> ApiError {
    match r {
        JsonRejection::JsonDataError(e) => {
            ApiError::bad_request(ErrorCode::InvalidBody, e.body_text())
        }
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::bad_request(ErrorCode::InvalidJson, "body is not valid JSON")
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "send Content-Type: application/json",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            "request body is too large",
        ),
        other => ApiError::bad_request(ErrorCode::InvalidBody, other.body_text()),
    }
}

/// `Query<T>` whose rejections use the API's error shape.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => Err(ApiError::bad_request(
                ErrorCode::InvalidQuery,
                e.body_text(),
            )),
            Err(e) => Err(ApiError::bad_request(
                ErrorCode::InvalidQuery,
                e.body_text(),
            )),
        }
    }
}

/// `GET /` and `GET /health`.
pub async fn health(State(app): State<AppState>) -> Response {
    let store = match app.chat.store().health().await {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(error = %e, "store health check failed");
            "unavailable"
        }
    };
    let total = app.metrics.connections_total.get();
    let active = app.metrics.connections.get();
    let broker = if app.broker.healthy() {
        "ok"
    } else {
        "unavailable"
    };
    // Without the broker a node still serves its own clients: it is degraded, not down,
    // so a load balancer keeps sending it traffic (taking every node out when Redis
    // restarts would be worse).
    let failure = app.supervisor.failure();
    let healthy = store == "ok" && !app.supervisor.shutdown().is_cancelled() && failure.is_none();
    let mut body = json!({
        "status": match (healthy, broker) {
            (false, _) => "unhealthy",
            (true, "ok") => "healthy",
            (true, _) => "degraded",
        },
        "service": "parlor",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": app.started.elapsed().as_secs(),
        "connections": { "total": total, "active": active },
        "store": {
            "kind": app.chat.store().kind(),
            "status": store,
            "queued": app.chat.store().queued(),
        },
        "pipeline": { "backlog": app.chat.backlog().len() },
        "broker": { "kind": app.broker.kind(), "status": broker },
        "rooms": { "active": app.chat.hub().active_rooms() },
        "timestamp": iso(now_ms()),
    });
    if let Some(failure) = failure {
        body["failure"] = json!(failure);
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /api/online`: how many distinct visitors and agents of the caller's domain are
/// connected, on every node (with Redis) — for the domain's agents, admins and back end.
pub async fn online(
    State(app): State<AppState>,
    Caller(identity): Caller,
) -> Result<Response, ApiError> {
    if !policy::may_assign(&identity) {
        app.metrics.client_error("forbidden");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "online counts are for the domain's agents, admins and back end",
        ));
    }
    let counts = app.shared.online_counts(&identity.domain_id).await;
    Ok(Json(json!({
        "domainId": &*identity.domain_id,
        "visitors": counts.visitors,
        "agents": counts.agents,
        "cluster": app.shared.is_cluster(),
    }))
    .into_response())
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

/// Body of `POST /api/messages` (the seed's shape).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostMessage {
    message: String,
    chat_room_id: String,
    /// Without a token: the domain (the demo's, or a public one's).
    domain_id: Option<String>,
    /// Without a token, where the domain lets clients name themselves: who writes.
    user_id: Option<String>,
    user_name: Option<String>,
    role: Option<String>,
    client_message_id: Option<String>,
    data: Option<Value>,
    /// Files of the room to attach (`[{"fileId"}]`).
    attachments: Option<Vec<super::files::AttachmentRef>>,
}

/// `POST /api/messages`: stores a message and broadcasts it to the room.
pub async fn post_message(
    State(app): State<AppState>,
    Caller(identity): Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PostMessage>,
) -> Result<Response, ApiError> {
    let claimed = crate::auth::Claimed {
        domain_id: body.domain_id.as_deref(),
        user_id: body.user_id.as_deref(),
        user_name: body.user_name.as_deref(),
        role: body.role.as_deref(),
    };
    let identity = settled(&app, &identity, claimed, &headers)?;
    let ids = super::files::attachment_ids(body.attachments.as_deref().unwrap_or_default());
    let attachments = if ids.is_empty() {
        Attachments::default()
    } else {
        // The room first: only someone who may post in it learns what files it holds.
        let key = app
            .chat
            .room_key(&identity, &body.chat_room_id)
            .map_err(|e| error(&app, e))?;
        app.chat
            .authorize(&identity, &key, true)
            .await
            .map_err(|e| error(&app, e))?;
        app.files
            .attachments(&identity, &body.chat_room_id, &ids)
            .await
            .map_err(|e| error(&app, e))?
    };
    app.handoff
        .take_on_reply(&identity, &body.chat_room_id)
        .await;
    let out = Outgoing {
        room_id: &body.chat_room_id,
        text: body.message,
        client_message_id: body.client_message_id,
        role: body.role.as_deref(),
        display_name: None,
        data: body.data,
        attachments,
    };
    store_message(&app, &identity, out).await
}

/// The caller once what a token-less one `claimed` is applied
/// ([`crate::auth::Authenticator::settle`]); with a token, a `domainId` must be its own.
fn settled(
    app: &AppState,
    identity: &Identity,
    claimed: crate::auth::Claimed<'_>,
    headers: &HeaderMap,
) -> Result<Identity, ApiError> {
    app.auth
        .settle(identity, claimed, super::ai::page_origin(headers))
        .map_err(|e| error(app, e.into()))
}

/// Stores an HTTP caller's message (asking the policy first) and answers with it: 201 when
/// new, 200 with the original for a repeated `clientMessageId`.
async fn store_message(
    app: &AppState,
    identity: &Identity,
    out: Outgoing<'_>,
) -> Result<Response, ApiError> {
    let appended = app
        .chat
        .post(identity, out)
        .await
        .map_err(|e| error(app, e))?;
    let status = if appended.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(WireMessage::of(&appended.message))).into_response())
}

/// Body of `POST /api/publish`: a back end's message into one of its domain's rooms.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Publish {
    #[serde(alias = "content")]
    message: String,
    #[serde(alias = "chatRoomId", alias = "chatId")]
    room_id: String,
    role: Option<String>,
    client_message_id: Option<String>,
    data: Option<Value>,
    /// Optional; when given it must be the key's own domain.
    domain_id: Option<String>,
    /// Who the message is from, when the back end writes for one of its users (an agent
    /// who replied in its own app); the back end itself when absent.
    user_id: Option<String>,
    /// That user's name.
    user_name: Option<String>,
}

/// `POST /api/publish`: stores a message from a back end (server API key) and broadcasts
/// it. The back end may label it (`assistant`, `system`…).
pub async fn publish(
    State(app): State<AppState>,
    Caller(identity): Caller,
    ApiJson(body): ApiJson<Publish>,
) -> Result<Response, ApiError> {
    if !policy::may_publish(&identity) {
        return Err(error(
            &app,
            ServiceError::Forbidden("publishing needs a server key".into()),
        ));
    }
    if body
        .domain_id
        .as_deref()
        .is_some_and(|d| d != &*identity.domain_id)
    {
        return Err(error(
            &app,
            ServiceError::Forbidden("a server key publishes only into its own domain".into()),
        ));
    }
    let mut identity = identity;
    if let Some(user) = body.user_id {
        if !valid_id(&user) {
            return Err(error(
                &app,
                ServiceError::invalid(ErrorCode::InvalidUserId, "`userId` is not a valid user id"),
            ));
        }
        identity.name = body
            .user_name
            .filter(|n| !n.trim().is_empty())
            .map_or_else(|| user.clone(), |n| n.chars().take(100).collect());
        identity.user_id = user;
    }
    let out = Outgoing {
        room_id: &body.room_id,
        text: body.message,
        client_message_id: body.client_message_id,
        role: body.role.as_deref(),
        display_name: None,
        data: body.data,
        attachments: Attachments::default(),
    };
    store_message(&app, &identity, out).await
}

/// Body of `POST /api/ws/token`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    user_id: String,
    name: Option<String>,
    role: Option<String>,
    ttl_secs: Option<u64>,
}

/// Longest lifetime of a token from `POST /api/ws/token`, in seconds.
const MAX_TOKEN_TTL_SECS: u64 = 86_400;

/// `POST /api/ws/token`: a back end (server API key) gets a connection token for one of
/// its users, as a visitor or an agent.
pub async fn ws_token(
    State(app): State<AppState>,
    Caller(identity): Caller,
    ApiJson(body): ApiJson<TokenRequest>,
) -> Result<Response, ApiError> {
    if !policy::may_issue_tokens(&identity) {
        return Err(error(
            &app,
            ServiceError::Forbidden("issuing tokens needs a server key".into()),
        ));
    }
    if !valid_id(&body.user_id) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidUserId,
            "userId must be 1-128 characters of A-Z a-z 0-9 - _ . : @",
        ));
    }
    let role = match body.role.as_deref() {
        None => Role::Visitor,
        Some(r) => Role::parse(r).ok_or_else(|| {
            ApiError::bad_request(ErrorCode::InvalidRole, format!("unknown role {r:?}"))
        })?,
    };
    if !policy::may_issue_role(role) {
        return Err(error(
            &app,
            ServiceError::Forbidden(format!(
                "tokens are issued for visitors and agents, not {}",
                role.as_str()
            )),
        ));
    }
    let ttl = body.ttl_secs.unwrap_or(3600);
    if ttl == 0 || ttl > MAX_TOKEN_TTL_SECS {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidTtl,
            format!("ttlSecs must be between 1 and {MAX_TOKEN_TTL_SECS}"),
        ));
    }
    let name: Option<String> = body.name.map(|n| n.chars().take(100).collect());
    issue_token(
        &app,
        &body.user_id,
        name.as_deref(),
        role,
        &identity.domain_id,
        ttl,
    )
}

/// Signs a connection token and answers `{token, expiresAt, userId, name, role, domainId}`.
pub(crate) fn issue_token(
    app: &AppState,
    user_id: &str,
    name: Option<&str>,
    role: Role,
    domain_id: &str,
    ttl: u64,
) -> Result<Response, ApiError> {
    let token = app
        .auth
        .issue(user_id, name, role, domain_id, ttl)
        .map_err(|e| {
            tracing::error!(error = %e, "cannot sign a token");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "cannot sign a token",
            )
        })?;
    let expires =
        chrono::Utc::now() + chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX));
    Ok(Json(json!({
        "token": token,
        "expiresAt": iso(expires),
        "userId": user_id,
        "name": name,
        "role": role.as_str(),
        "domainId": domain_id,
    }))
    .into_response())
}

/// Body of `POST /api/visitor-token`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VisitorTokenRequest {
    domain_id: String,
}

/// `POST /api/visitor-token`: a new anonymous visitor identity of a domain, for a browser
/// page of one of the domain's allowed origins. The page keeps the token, and with it the
/// same visitor id, for `auth.visitor_token_ttl_secs`.
pub async fn visitor_token(
    State(app): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiJson(body): ApiJson<VisitorTokenRequest>,
) -> Result<Response, ApiError> {
    admit_page(
        &app,
        ip,
        &headers,
        &body.domain_id,
        (
            edge::Budget::VisitorToken,
            "visitor tokens from this address",
        ),
    )
    .await?;
    let visitor = crate::auth::anonymous();
    issue_token(
        &app,
        &visitor.user_id,
        Some(&visitor.name),
        Role::Visitor,
        &body.domain_id,
        app.config.auth.visitor_token_ttl_secs,
    )
}

/// Admits a request of a browser page of `domain` (a visitor token, a visitor reporting
/// itself): within the address's `budget` (every attempt counts, refused ones too, so the
/// endpoints cannot be used to probe; `what` names it in the refusal), for a domain that
/// exists, from one of its allowed origins; a caller without `Origin` (not a browser) only
/// where the domain accepts any origin.
pub(super) async fn admit_page(
    app: &AppState,
    ip: Option<std::net::IpAddr>,
    headers: &HeaderMap,
    domain: &str,
    (budget, what): (edge::Budget, &str),
) -> Result<(), ApiError> {
    if let Some(ip) = ip
        && let Err(wait) = app.edge.check(budget, ip).await
    {
        app.metrics.client_error("rate_limited");
        return Err(ApiError::rate_limited(wait, what));
    }
    if app.auth.domains().load().get(domain).is_none() {
        app.metrics.client_error("unknown_domain");
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownDomain,
            format!("unknown domain {domain:?}"),
        ));
    }
    let origin = edge::origin(headers);
    let allowed = match origin {
        Some(_) => app.edge.origin_allowed(domain, origin),
        None => app.edge.any_origin(domain),
    };
    if !allowed {
        app.metrics.client_error("origin_not_allowed");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::OriginNotAllowed,
            "this origin may not use the domain (allowed_origins)",
        ));
    }
    Ok(())
}

/// Query of `GET /api/messages`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    chat_room_id: String,
    limit: Option<usize>,
    /// Without a token: the domain (the demo's, or a public one's).
    domain_id: Option<String>,
}

/// `GET /api/messages?chatRoomId=`: the room's latest messages, oldest first.
pub async fn list_messages(
    State(app): State<AppState>,
    Caller(identity): Caller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let claimed = crate::auth::Claimed {
        domain_id: q.domain_id.as_deref(),
        ..crate::auth::Claimed::default()
    };
    let identity = settled(&app, &identity, claimed, &headers)?;
    let limit = q.limit.unwrap_or(app.config.limits.max_page);
    let (page, has_more) = app
        .chat
        .history(&identity, &q.chat_room_id, None, limit)
        .await
        .map_err(|e| error(&app, e))?;
    let messages: Vec<WireMessage<'_>> = page.iter().map(WireMessage::of).collect();
    Ok(
        Json(json!({ "chatRoomId": q.chat_room_id, "messages": messages, "hasMore": has_more }))
            .into_response(),
    )
}

/// Query of `GET /api/rooms/{id}/messages`.
#[derive(Debug, Deserialize)]
pub struct RoomPageQuery {
    after: Option<u64>,
    before: Option<u64>,
    limit: Option<usize>,
}

/// `GET /api/rooms/{id}/messages?after=&before=&limit=`: a page of a room's messages,
/// ascending. `after` pages forwards, `before` backwards; neither gives the latest page.
pub async fn room_messages(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
    ApiQuery(q): ApiQuery<RoomPageQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(50);
    let (room, page, has_more) = app
        .chat
        .room_page(&identity, &room_id, q.after, q.before, limit)
        .await
        .map_err(|e| error(&app, e))?;
    let messages: Vec<WireMessage<'_>> = page.iter().map(WireMessage::of).collect();
    Ok(Json(json!({
        "roomId": room_id,
        "lastSeq": room.last_seq,
        "messages": messages,
        "hasMore": has_more,
    }))
    .into_response())
}

/// Unknown paths.
pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
}

/// Known paths with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
}

fn error(app: &AppState, e: ServiceError) -> ApiError {
    app.metrics.client_error(e.code().as_str());
    ApiError::from(e)
}
