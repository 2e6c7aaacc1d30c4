//! Transports translate wire formats to and from service calls; nothing else does.
//!
//! - [`ws`]: the native WebSocket protocol at `/ws` (WeeziQ-compatible), and guided
//!   sessions at `/chat` ([`ws::guided`], Largence-compatible).
//! - [`sessions`]: templates, sessions and documents of guided sessions over HTTP.
//! - [`http`]: the JSON HTTP API, health and metrics.
//! - [`wire`]: JSON shapes both share.
//! - [`admin`]: the admin API (`/api/admin/domains`).
//! - [`ai`]: the seeds' AI endpoints (`/ai/chat`, `/ai/stream`) and shapes the WebSocket
//!   `ai-chat` / `ai-stream` frames share.
//! - [`edge`]: per-IP rate limits, CORS and each domain's allowed origins.
//! - [`handoff`]: the hand-off HTTP API (inbox, assign, resolve, notes).
//! - [`files`]: file uploads, reads and deletions (`/api/files`).
//! - [`web`]: the pages compiled into the binary (widget, agent inbox, demo page).
//! - [`listen`]: the TCP listener: per-address connection cap, header and body timeouts.
//! - [`visitor`]: the cookie that keeps a token-less browser one visitor.
//! - [`pusher`]: Pusher compatibility: the HTTP API (`/apps/{id}/…`) and `/pusher/auth`;
//!   the socket endpoint `/app/{key}` is [`ws::pusher`].
//!
//! [`router`] assembles them into one axum app, apart from serving it ([`listen::serve`]),
//! so tests can drive it with `oneshot` or a real listener.

pub mod accounts;
pub mod admin;
pub mod ai;
pub mod edge;
pub mod error;
pub mod files;
pub mod handoff;
pub mod http;
pub mod listen;
pub mod notifications;
pub mod pusher;
pub mod sessions;
pub mod state;
pub mod stats;
pub mod visitor;
pub mod visitors;
pub mod web;
pub mod wire;
pub mod ws;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use state::{AppInner, AppState};

/// The whole HTTP and WebSocket surface.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.limits.max_body_bytes;
    // An upload's request holds the largest file and the form around it.
    let upload_limit = usize::try_from(state.files.max_bytes())
        .unwrap_or(usize::MAX)
        .saturating_add(files::FORM_OVERHEAD_BYTES);
    let trace = TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        // The query string may hold a token: log the path only.
        tracing::debug_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
    });
    Router::new()
        .route("/", get(web::root))
        .route("/widget.js", get(web::widget))
        .route("/inbox", get(web::inbox))
        .route("/api/dev/agent-token", post(web::dev_agent_token))
        .route("/api/auth/login", post(accounts::login))
        .route("/api/auth/invite", post(accounts::accept_invite))
        .route("/api/auth/session", get(accounts::session))
        .route("/api/auth/token", post(accounts::token))
        .route("/api/auth/logout", post(accounts::logout))
        .route("/api/auth/methods", get(accounts::methods))
        .route("/health", get(http::health))
        .route("/metrics", get(http::metrics))
        .route("/ws", get(ws::upgrade))
        .route("/chat", get(ws::guided::upgrade))
        .route("/app/{key}", get(ws::pusher::upgrade))
        .route("/pusher/auth", post(pusher::auth::authorise))
        .route("/apps/{app_id}/events", post(pusher::api::events))
        .route(
            "/apps/{app_id}/batch_events",
            post(pusher::api::batch_events),
        )
        .route("/apps/{app_id}/channels", get(pusher::api::channels))
        .route(
            "/apps/{app_id}/channels/{channel}",
            get(pusher::api::channel),
        )
        .route(
            "/apps/{app_id}/channels/{channel}/users",
            get(pusher::api::users),
        )
        .route(
            "/apps/{app_id}/users/{user_id}/terminate_connections",
            post(pusher::api::terminate),
        )
        .route("/api/templates", get(sessions::templates))
        .route("/api/sessions", get(sessions::list_sessions))
        .route(
            "/api/sessions/{id}",
            get(sessions::get_session).delete(sessions::delete_session),
        )
        .route("/api/documents", get(sessions::list_documents))
        .route("/api/documents/{id}", get(sessions::get_document))
        .route(
            "/api/admin/domains/{id}/templates",
            get(sessions::admin_list_templates).post(sessions::admin_post_template),
        )
        .route(
            "/api/admin/domains/{id}/templates/{template}",
            get(sessions::admin_get_template)
                .put(sessions::admin_put_template)
                .delete(sessions::admin_delete_template),
        )
        .route(
            "/api/messages",
            get(http::list_messages).post(http::post_message),
        )
        .route("/api/rooms/{id}/messages", get(http::room_messages))
        .route(
            "/api/files",
            post(files::upload).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route(
            "/api/files/{id}",
            get(files::download).delete(files::delete),
        )
        .route(
            "/api/rooms/{id}/files",
            get(files::room_files).delete(files::delete_room_files),
        )
        .route("/api/rooms/{id}/conversation", get(handoff::conversation))
        .route("/api/rooms/{id}/escalate", post(handoff::escalate))
        .route("/api/rooms/{id}/assign", post(handoff::assign))
        // Eclipse's path for the same.
        .route("/api/chats/{id}/assign", post(handoff::assign))
        .route("/api/rooms/{id}/unassign", post(handoff::unassign))
        .route("/api/rooms/{id}/transfer", post(handoff::transfer))
        .route("/api/rooms/{id}/resolve", post(handoff::resolve))
        .route(
            "/api/rooms/{id}/notes",
            get(handoff::notes).post(handoff::add_note),
        )
        .route("/api/rooms/{id}/visitor", get(handoff::visitor))
        .route("/api/inbox", get(handoff::inbox))
        .route("/api/agents", get(handoff::agents))
        .route("/api/online", get(http::online))
        .route("/api/publish", post(http::publish))
        .route("/api/notifications", post(notifications::send))
        .route("/api/chat-messages", get(notifications::unread))
        .route(
            "/api/chat-messages/unread-count",
            get(notifications::unread_count),
        )
        .route(
            "/api/chat-messages/mark-read",
            post(notifications::mark_read),
        )
        .route(
            "/api/chat-messages/mark-all-read",
            post(notifications::mark_all_read),
        )
        .route("/api/chat-messages/stream", get(notifications::stream))
        .route("/api/chat-messages/{task_id}", get(notifications::task))
        .route("/api/ws/token", post(http::ws_token))
        .route("/api/visitor-token", post(http::visitor_token))
        .route("/visitors/add", post(visitors::add))
        .route("/visitors/remove", post(visitors::remove))
        .route("/stats/domain/{domain_id}", get(stats::domain))
        .route("/stats/domain/{domain_id}/visitors", get(stats::visitors))
        .route("/stats", get(web::stats))
        .route("/ai/chat", post(ai::chat))
        .route("/ai/stream", post(ai::stream))
        .route("/api/usage", get(ai::usage))
        .route("/api/admin/domains", get(admin::list_domains))
        .route(
            "/api/admin/domains/{id}",
            get(admin::get_domain)
                .put(admin::put_domain)
                .delete(admin::delete_domain),
        )
        .route("/api/admin/domains/{id}/keys", post(admin::add_key))
        .route(
            "/api/admin/domains/{id}/webhooks/deliveries",
            get(admin::webhook_deliveries),
        )
        .route(
            "/api/admin/domains/{id}/keys/{key_id}",
            axum::routing::delete(admin::delete_key),
        )
        .route(
            "/api/admin/domains/{id}/agents",
            get(accounts::list).post(accounts::create),
        )
        .route(
            "/api/admin/domains/{id}/agents/{account}",
            axum::routing::delete(accounts::remove),
        )
        .route(
            "/api/admin/domains/{id}/agents/{account}/invite",
            post(accounts::reinvite),
        )
        .route(
            "/api/admin/domains/{id}/agents/{account}/sessions/revoke",
            post(accounts::revoke_sessions),
        )
        .route(
            "/api/admin/domains/{id}/knowledge",
            get(admin::list_documents),
        )
        .route(
            "/api/admin/domains/{id}/knowledge/{name}",
            axum::routing::put(admin::put_document).delete(admin::delete_document),
        )
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            listen::body_in_time,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            visitor::remember,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            edge::limit_by_ip,
        ))
        .layer(state.edge.cors())
        .layer(axum::middleware::from_fn(web::security_headers))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(trace)
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}
