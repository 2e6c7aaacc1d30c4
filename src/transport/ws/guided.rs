//! `GET /chat?token=JWT&templateId=ID`: guided sessions over a WebSocket (seed 003's
//! protocol; see `docs/sessions.md`).
//!
//! Everything is checked before the connection exists: a missing or invalid token is a
//! 401 and an unknown template a 404, each with a JSON body, then the same gate as `/ws`
//! (origin, rate and connection limits). The client sends `{"type": "user_message",
//! "content"}`; the server answers with `session_resumed`, `next_question`,
//! `session_complete` (then a normal close) and `error {code, message}`. Other frames are
//! ignored, as the seed's clients expect, and counted; a connection that sends nothing but
//! such frames is closed (1008).
//!
//! A session has one connection: a newer one for the same user and template, on any node,
//! takes it over through the cluster claim, and the older one gets `error {code:
//! "replaced"}` and close 4013.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::socket::{Incoming, RecvError, WsSocket};
use super::{
    Admitted, End, Gate, Liveness, WRITE_TIMEOUT, close, handshake, switching_protocols,
    upgrade_token,
};
use crate::error_code::ErrorCode;
use crate::model::{Identity, Role};
use crate::service::ServiceError;
use crate::service::sessions::template::Template;
use crate::service::sessions::{Reply, template_not_found};
use crate::transport::AppState;
use crate::transport::error::ApiError;

/// Frames in a row that are not `user_message` after which the connection is closed.
const MAX_IGNORED_IN_A_ROW: u32 = 50;

/// Query parameters of `GET /chat`.
#[derive(Debug, Deserialize)]
pub struct ChatQuery {
    /// The user's token.
    token: Option<String>,
    /// The template to fill in.
    #[serde(rename = "templateId")]
    template_id: Option<String>,
}

/// `GET /chat`: authenticates, finds the template, checks capacity, and upgrades.
pub async fn upgrade(
    State(app): State<AppState>,
    Query(query): Query<ChatQuery>,
    mut req: Request,
) -> Response {
    let (key, offered) = match handshake(&app, req.headers()) {
        Ok(handshake) => handshake,
        Err(refused) => return *refused,
    };
    let Some(token) = upgrade_token(query.token.as_deref(), req.headers(), &offered) else {
        app.metrics.client_error("missing_token");
        return ApiError::unauthorized(
            ErrorCode::MissingToken,
            "a guided session needs the user's token: /chat?token=JWT&templateId=ID",
        )
        .into_response();
    };
    let identity = match app.auth.identify(Some(&token)).await {
        Ok(identity) => identity,
        Err(e) => {
            app.metrics.client_error(e.code().as_str());
            return ApiError::unauthorized(e.code(), e.to_string()).into_response();
        }
    };
    // Anyone can get a visitor token (the widget's); a guided session is for a signed-in
    // user, except in the demo and in domains open to token-less visitors.
    if crate::auth::is_server_made_visitor(&identity.user_id) && !open_to_visitors(&app, &identity)
    {
        app.metrics.client_error("forbidden");
        return ApiError::from(ServiceError::Forbidden(
            "a guided session needs a signed-in user's token, not a visitor token".into(),
        ))
        .into_response();
    }
    if identity.role == Role::Service {
        app.metrics.client_error("forbidden");
        return ApiError::from(ServiceError::Forbidden(
            "a guided session belongs to a user: connect with the user's token, not a server key"
                .into(),
        ))
        .into_response();
    }
    let Some(template_id) = query.template_id.filter(|t| !t.is_empty()) else {
        app.metrics.client_error("missing_template_id");
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MissingTemplateId,
            "name the template: /chat?token=JWT&templateId=ID",
        )
        .into_response();
    };
    let template = match app.sessions.template_for(&identity, &template_id).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            app.metrics.client_error("template_not_found");
            return ApiError::from(template_not_found(&template_id)).into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let gate = match Gate::pass(&app, &req, &identity).await {
        Ok(gate) => gate,
        Err(refused) => return refused,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let max_message = app.config.limits.max_frame_bytes;
    let task_app = app.clone();
    app.supervisor.spawn_isolated("connection", async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WsSocket::new(upgraded, max_message);
                run(task_app, identity, template, gate, socket).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    switching_protocols(&key, &offered)
}

/// Whether `identity`'s domain lets visitors without an account of their own open guided
/// sessions: the demo, and domains marked `public`.
fn open_to_visitors(app: &AppState, identity: &Identity) -> bool {
    *identity.domain_id == *crate::config::DEMO_DOMAIN
        || app
            .auth
            .domains()
            .load()
            .get(&identity.domain_id)
            .is_some_and(|d| d.settings.public)
}

/// One guided-session connection, from its first frame to its close.
async fn run(
    app: AppState,
    identity: Identity,
    template: Arc<Template>,
    gate: Gate,
    mut socket: WsSocket,
) {
    let metrics = Arc::clone(&app.metrics);
    metrics.connections.inc();
    metrics.connections_total.inc();
    let Gate {
        admitted, permits, ..
    } = gate;
    let end = Box::pin(serve(&app, &identity, template, admitted, &mut socket)).await;
    if let End::Replaced = end {
        metrics.guided("replaced");
    }
    Box::pin(close(&mut socket, end)).await;
    drop(permits);
    metrics.connections.dec();
    metrics.disconnect(end.label());
    tracing::debug!(user = %identity.user_id, reason = end.label(), "guided session disconnected");
}

/// Sends `replies` in order; true when the last was `session_complete`.
async fn send(socket: &mut WsSocket, replies: &[Reply]) -> Result<bool, End> {
    let mut complete = false;
    for reply in replies {
        socket.queue_text(reply.to_json().to_string().as_bytes());
        complete = matches!(reply, Reply::Complete { .. });
    }
    match tokio::time::timeout(WRITE_TIMEOUT, socket.flush()).await {
        Ok(Ok(())) => Ok(complete),
        Ok(Err(_)) => Err(End::TransportError),
        Err(_) => Err(End::SlowConsumer),
    }
}

/// What a connection another one took over is told.
fn replaced_reply() -> Reply {
    Reply::Error {
        code: ErrorCode::Replaced,
        message: "This session was opened in another window; this one is closed.".into(),
    }
}

/// The error frame for a service error.
fn error_reply(e: &ServiceError) -> Reply {
    Reply::Error {
        code: e.code(),
        message: e.to_string(),
    }
}

#[derive(Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: String,
    content: Option<serde_json::Value>,
}

/// The loop: the session is claimed, opened (resumed or created), then driven by the
/// client's answers and the AI service's retries until it completes or the client leaves.
async fn serve(
    app: &AppState,
    identity: &Identity,
    template: Arc<Template>,
    admitted: Admitted,
    socket: &mut WsSocket,
) -> End {
    let claim_key = json!([&*identity.domain_id, identity.user_id, template.spec.id]).to_string();
    let claim = app
        .shared
        .claim("guided", &claim_key, app.next_connection_id())
        .await;
    let (mut live, opening) = match app.sessions.open(identity, Arc::clone(&template)).await {
        Ok(opened) => opened,
        Err(e) => {
            let _ = send(socket, &[error_reply(&e)]).await;
            return End::Unavailable;
        }
    };
    // A newer connection may have claimed the session while this one opened it.
    if claim.is_displaced() {
        let _ = send(socket, &[replaced_reply()]).await;
        return End::Replaced;
    }
    match send(socket, &opening).await {
        Ok(true) => return End::Complete,
        Ok(false) => {}
        Err(end) => return end,
    }
    let shutdown = app.supervisor.shutdown().clone();
    let limits = &app.config.limits;
    let mut live_check = Liveness::new();
    let check = tokio::time::sleep_until(live_check.next_check(limits).into());
    let mut check = std::pin::pin!(check);
    let mut ignored = 0u32;
    loop {
        let retry_at = live.retry_at();
        let replies = tokio::select! {
            biased;
            () = shutdown.cancelled() => return End::Shutdown,
            () = claim.displaced() => {
                let _ = send(socket, &[replaced_reply()]).await;
                return End::Replaced;
            }
            () = &mut check => {
                match live_check.check(std::time::Instant::now(), limits) {
                    super::Check::Fine => {}
                    super::Check::Ping => {
                        socket.queue_ping();
                        if let Err(end) = send(socket, &[]).await {
                            return end;
                        }
                    }
                    super::Check::Dead(end) => return end,
                }
                check.as_mut().reset(live_check.next_check(limits).into());
                continue;
            }
            () = sleep_until(retry_at) => app.sessions.retry(&mut live).await,
            incoming = socket.recv() => match live_check.heard(incoming) {
                Ok(Incoming::Text(text)) => {
                    app.metrics.frames_in.inc();
                    if admitted.limiter.check().is_err() {
                        let limited = Reply::Error {
                            code: ErrorCode::RateLimited,
                            message: format!(
                                "at most {} messages per second; this one was not taken",
                                admitted.frame_rate
                            ),
                        };
                        Ok(vec![limited])
                    } else {
                        match user_message(&text) {
                            Some(content) => {
                                ignored = 0;
                                Box::pin(app.sessions.answer(&mut live, &content)).await
                            }
                            None => {
                                app.metrics.guided("ignored_frame");
                                ignored += 1;
                                if ignored >= MAX_IGNORED_IN_A_ROW {
                                    return End::Unusable;
                                }
                                continue;
                            }
                        }
                    }
                }
                Ok(Incoming::Binary(_)) => {
                    app.metrics.guided("ignored_frame");
                    ignored += 1;
                    if ignored >= MAX_IGNORED_IN_A_ROW {
                        return End::Unusable;
                    }
                    continue;
                }
                Ok(Incoming::Ping(payload)) => {
                    socket.queue_pong(&payload);
                    if let Err(end) = send(socket, &[]).await {
                        return end;
                    }
                    continue;
                }
                Ok(Incoming::Pong) => continue,
                Ok(Incoming::Close) => return End::ClientClosed,
                Err(RecvError::TooLarge) => {
                    let limit = app.config.limits.max_frame_bytes;
                    let too_big = Reply::Error {
                        code: ErrorCode::FrameTooLarge,
                        message: format!("frames are limited to {limit} bytes"),
                    };
                    let _ = send(socket, &[too_big]).await;
                    return End::FrameTooLarge;
                }
                Err(RecvError::Protocol(_)) => return End::ProtocolError,
                Err(RecvError::InvalidUtf8) => return End::InvalidUtf8,
                Err(RecvError::Gone) => return End::TransportError,
            },
        };
        let replies = match replies {
            Ok(replies) => replies,
            // Changed by the connection that took the session over (its claim may not have
            // been announced here yet: Redis says), or by one that opened it at the same
            // moment and lost the claim to this one (or by a write whose answer was lost):
            // then this connection still holds the session, so it reads it again and shows
            // where it stands; the answer was not taken.
            Err(ServiceError::Conflict {
                code: ErrorCode::Replaced,
                ..
            }) => {
                if !claim.confirmed().await {
                    let _ = send(socket, &[replaced_reply()]).await;
                    return End::Replaced;
                }
                match app.sessions.open(identity, Arc::clone(&template)).await {
                    Ok((reopened, replies)) => {
                        live = reopened;
                        replies
                    }
                    Err(e) => {
                        let _ = send(socket, &[error_reply(&e)]).await;
                        return End::Unavailable;
                    }
                }
            }
            Err(e) => vec![error_reply(&e)],
        };
        match send(socket, &replies).await {
            Ok(true) => return End::Complete,
            Ok(false) => {}
            Err(end) => return end,
        }
    }
}

/// The content of a `user_message` frame; `None` for anything else.
fn user_message(text: &str) -> Option<String> {
    let frame: ClientFrame = serde_json::from_str(text).ok()?;
    if frame.kind != "user_message" {
        return None;
    }
    match frame.content? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Waits until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_user_messages_with_content_are_taken() {
        assert_eq!(
            user_message(r#"{"type":"user_message","content":"Acme"}"#),
            Some("Acme".into())
        );
        assert_eq!(
            user_message(r#"{"type":"user_message","content":3}"#),
            Some("3".into())
        );
        for ignored in [
            r#"{"type":"ping"}"#,
            r#"{"type":"user_message"}"#,
            r#"{"type":"user_message","content":{"a":1}}"#,
            r#"not json"#,
            r#"[]"#,
        ] {
            assert_eq!(user_message(ignored), None, "{ignored}");
        }
    }
}
