//! The web pages compiled into the binary (`web/`): the embeddable widget (`/widget.js`),
//! the agent inbox (`/inbox`) and the demo page (`/` for a browser), plus the development
//! agent login the demo uses (`POST /api/dev/agent-token`, when `web.dev_login`).
//!
//! The pages are plain files embedded with `include_str!`; nothing is built with Node.js
//! and no page loads anything from another host. The helpers the widget and the inbox share
//! are one file, `web/common.js`, spliced into each of the two at its marker line
//! (`/* @include common.js */`) so that the widget stays one script: for the compiled-in
//! pages once, at first use. With `web.dir` set, the same files (and `common.js`) are read
//! from that folder on every request instead, for working on them without a rebuild.

use std::borrow::Cow;
use std::sync::LazyLock;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::edge::ClientIp;
use super::http::{ApiError, ApiJson, issue_token};
use crate::AppState;
use crate::config::DEMO_DOMAIN;
use crate::model::Role;

/// The code the widget and the inbox share, and its file name under `web/`.
const COMMON: &str = include_str!("../../web/common.js");
const COMMON_FILE: &str = "common.js";
/// Where a page wants [`COMMON`]: it stands on a line of its own, in a script.
const MARKER: &str = "/* @include common.js */";

const WIDGET_TEXT: &str = include_str!("../../web/widget.js");
const INBOX_TEXT: &str = include_str!("../../web/inbox.html");
const DEMO_TEXT: &str = include_str!("../../web/index.html");

/// A page: its file name under `web/`, its media type and its compiled-in text as served
/// (with `common.js` spliced in, the first time it is asked for).
#[derive(Debug)]
struct Page {
    file: &'static str,
    media_type: &'static str,
    text: LazyLock<String>,
}

static WIDGET: Page = Page {
    file: "widget.js",
    media_type: "text/javascript; charset=utf-8",
    text: LazyLock::new(|| with_common(WIDGET_TEXT, COMMON)),
};
static INBOX: Page = Page {
    file: "inbox.html",
    media_type: "text/html; charset=utf-8",
    text: LazyLock::new(|| with_common(INBOX_TEXT, COMMON)),
};
static DEMO: Page = Page {
    file: "index.html",
    media_type: "text/html; charset=utf-8",
    text: LazyLock::new(|| with_common(DEMO_TEXT, COMMON)),
};

/// `page` with `common` in place of its (first) [`MARKER`], each line of `common` indented
/// as the marker is; `page` as it is when it has no marker.
fn with_common(page: &str, common: &str) -> String {
    let Some(at) = page.find(MARKER) else {
        return page.to_owned();
    };
    let (before, after) = (&page[..at], &page[at + MARKER.len()..]);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let indent = &before[line_start..];
    let indent = if indent.chars().all(|c| c == ' ' || c == '\t') {
        indent
    } else {
        ""
    };
    let mut text = String::with_capacity(page.len() + common.len() * 3 / 2);
    text.push_str(before);
    for (i, line) in common.trim_end().lines().enumerate() {
        if i > 0 {
            text.push('\n');
            if !line.is_empty() {
                text.push_str(indent);
            }
        }
        text.push_str(line);
    }
    text.push_str(after);
    text
}

/// How long agent tokens from the development login last.
const DEV_TOKEN_TTL_SECS: u64 = 12 * 3600;

async fn serve(app: &AppState, page: &'static Page) -> Response {
    let text: Cow<'static, str> = match &app.config.web.dir {
        None => Cow::Borrowed(page.text.as_str()),
        Some(dir) => {
            let text = match read_page(dir, page.file).await {
                Ok(text) => text,
                Err(response) => return response,
            };
            if text.contains(MARKER) {
                match read_page(dir, COMMON_FILE).await {
                    Ok(common) => Cow::Owned(with_common(&text, &common)),
                    Err(response) => return response,
                }
            } else {
                Cow::Owned(text)
            }
        }
    };
    (
        [
            (header::CONTENT_TYPE, page.media_type),
            // Pages change with the server; let browsers revalidate instead of guessing.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        text,
    )
        .into_response()
}

/// A file of `web.dir`; a 404 (and a warning) when it cannot be read.
async fn read_page(dir: &std::path::Path, file: &str) -> Result<String, Response> {
    tokio::fs::read_to_string(dir.join(file))
        .await
        .map_err(|e| {
            tracing::warn!(file, error = %e, "cannot read a page from web.dir");
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "page not found").into_response()
        })
}

/// `GET /widget.js`.
pub async fn widget(State(app): State<AppState>) -> Response {
    serve(&app, &WIDGET).await
}

/// `GET /inbox`.
pub async fn inbox(State(app): State<AppState>) -> Response {
    serve(&app, &INBOX).await
}

/// `GET /`: the demo page for a browser (which asks for `text/html`); the JSON status, as
/// the seeds answer there, for everyone else.
pub async fn root(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        serve(&app, &DEMO).await
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

/// `POST /api/dev/agent-token {name}`: an agent token of the `demo` domain, for anyone on
/// the server's own machine (a loopback address, after `trusted_proxies`), when
/// `web.dev_login` is on (the demo's inbox); 404 when it is off, 403 from anywhere else, so
/// that a server reachable on a network never hands agent tokens to that network.
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
    if !ip.is_some_and(is_loopback) {
        app.metrics.client_error("dev_login_local_only");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "dev_login_local_only",
            "the development login works only from the server's own machine; sign in with an agent account or token",
        ));
    }
    if let Some(ip) = ip
        && let Err(wait) = app.edge.check(super::edge::Budget::VisitorToken, ip).await
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

/// Whether `ip` is this machine (IPv4 or IPv6 loopback, or IPv4 loopback mapped to IPv6).
pub(crate) fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_widget_and_the_inbox_are_served_with_common_js_at_their_marker() {
        for (file, source, page) in [
            ("widget.js", WIDGET_TEXT, &WIDGET),
            ("inbox.html", INBOX_TEXT, &INBOX),
        ] {
            assert_eq!(source.matches(MARKER).count(), 1, "{file}: one marker");
            let served = page.text.as_str();
            assert!(!served.contains(MARKER), "{file}: the marker is replaced");
            // Every line of common.js is there (indented as the marker is).
            for line in COMMON.lines().filter(|line| !line.trim().is_empty()) {
                assert!(served.contains(line), "{file} lacks common.js's {line:?}");
            }
            assert!(served.contains("function h(tag, attrs = {}, ...children) {"));
            // Nothing else changed: the page around the marker is as it is in the file.
            let at = source.find(MARKER).unwrap_or_default();
            assert!(
                served.starts_with(&source[..at]),
                "{file}: what comes before"
            );
            assert!(
                served.ends_with(&source[at + MARKER.len()..]),
                "{file}: what comes after"
            );
        }
        // In the inbox it stands inside a <script> element: it must not close it.
        assert!(!COMMON.to_ascii_lowercase().contains("</script"));
        assert_eq!(DEMO.text.as_str(), DEMO_TEXT, "the demo page has no marker");
    }

    #[test]
    fn splicing_indents_as_the_marker_and_leaves_pages_without_one_alone() {
        let page = format!("a();\n  {MARKER}\nb();\n");
        assert_eq!(
            with_common(&page, "one();\n\ntwo();\n"),
            "a();\n  one();\n\n  two();\nb();\n"
        );
        assert_eq!(with_common("a();\nb();\n", "one();\n"), "a();\nb();\n");
    }
}
