//! The web pages compiled into the binary (`web/`): the embeddable widget (`/widget.js`),
//! the agent inbox (`/inbox`) and the demo page (`/` for a browser), plus the development
//! agent login the demo uses (`POST /api/dev/agent-token`, when `web.dev_login`).
//!
//! The pages are plain files embedded with `include_str!`; nothing is built with Node.js
//! and no page loads anything from another host. With `web.dir` set, the same files are read
//! from that folder on every request instead, for working on them without a rebuild.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::edge::ClientIp;
use super::http::{ApiError, ApiJson, issue_token};
use crate::AppState;
use crate::config::DEMO_DOMAIN;
use crate::model::Role;

/// A page: its file name under `web/`, its media type and its compiled-in text.
#[derive(Debug, Clone, Copy)]
struct Page {
    file: &'static str,
    media_type: &'static str,
    text: &'static str,
}

const WIDGET: Page = Page {
    file: "widget.js",
    media_type: "text/javascript; charset=utf-8",
    text: include_str!("../../web/widget.js"),
};
const INBOX: Page = Page {
    file: "inbox.html",
    media_type: "text/html; charset=utf-8",
    text: include_str!("../../web/inbox.html"),
};
const DEMO: Page = Page {
    file: "index.html",
    media_type: "text/html; charset=utf-8",
    text: include_str!("../../web/index.html"),
};

/// How long agent tokens from the development login last.
const DEV_TOKEN_TTL_SECS: u64 = 12 * 3600;

async fn serve(app: &AppState, page: Page) -> Response {
    let text = match &app.config.web.dir {
        None => std::borrow::Cow::Borrowed(page.text),
        Some(dir) => match tokio::fs::read_to_string(dir.join(page.file)).await {
            Ok(text) => std::borrow::Cow::Owned(text),
            Err(e) => {
                tracing::warn!(file = page.file, error = %e, "cannot read a page from web.dir");
                return ApiError::new(StatusCode::NOT_FOUND, "not_found", "page not found")
                    .into_response();
            }
        },
    };
    (
        [
            (header::CONTENT_TYPE, page.media_type),
            // Pages change with the server; let browsers revalidate instead of guessing.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        text.into_owned(),
    )
        .into_response()
}

/// `GET /widget.js`.
pub async fn widget(State(app): State<AppState>) -> Response {
    serve(&app, WIDGET).await
}

/// `GET /inbox`.
pub async fn inbox(State(app): State<AppState>) -> Response {
    serve(&app, INBOX).await
}

/// `GET /`: the demo page for a browser (which asks for `text/html`); the JSON status, as
/// the seeds answer there, for everyone else.
pub async fn root(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        serve(&app, DEMO).await
    } else {
        super::http::health(State(app)).await
    }
}

/// Body of `POST /api/dev/agent-token`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevLogin {
    name: String,
}

/// `POST /api/dev/agent-token {name}`: an agent token of the `demo` domain, for anyone,
/// when `web.dev_login` is on (the demo's inbox); 404 otherwise.
pub async fn dev_agent_token(
    State(app): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(body): ApiJson<DevLogin>,
) -> Result<Response, ApiError> {
    if !app.config.web.dev_login {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "dev_login_disabled",
            "the development login is off (web.dev_login)",
        ));
    }
    if let Some(ip) = ip
        && let Err(wait) = app.edge.check(super::edge::Budget::VisitorToken, ip)
    {
        return Err(ApiError::rate_limited(
            wait,
            "development logins from this address",
        ));
    }
    let name: String = body.name.trim().chars().take(60).collect();
    if name.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "name must not be empty",
        ));
    }
    // The same name gives the same agent, so a reload keeps one's assignments.
    let slug: String = name
        .chars()
        .filter_map(|c| {
            if c.is_ascii_alphanumeric() {
                Some(c.to_ascii_lowercase())
            } else if c == ' ' || c == '-' || c == '_' {
                Some('-')
            } else {
                None
            }
        })
        .take(40)
        .collect();
    let user_id = format!("agent-{}", if slug.is_empty() { "anon" } else { &slug });
    issue_token(
        &app,
        &user_id,
        Some(&name),
        Role::Agent,
        DEMO_DOMAIN,
        DEV_TOKEN_TTL_SECS,
    )
}
