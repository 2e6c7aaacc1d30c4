//! The web pages compiled into the binary (`web/`): the embeddable widget (`/widget.js`),
//! the agent inbox (`/inbox`), the statistics page (`/stats`) and the demo page (`/` for a
//! browser), plus the development
//! agent login the demo uses (`POST /api/dev/agent-token`, when `web.dev_login`).
//!
//! The pages are plain files embedded with `include_str!`; nothing is built with Node.js
//! and no page loads anything from another host. The helpers the widget, the inbox and the
//! stats page share are one file, `web/common.js`, spliced into each at its marker line
//! (`/* @include common.js */`) so that the widget stays one script: for the compiled-in
//! pages once, at first use. With `web.dir` set, the same files (and `common.js`) are read
//! from that folder on every request instead, for working on them without a rebuild.
//!
//! The compiled-in pages are also compressed once (gzip and brotli, at their best settings)
//! and named by a hash of their text: each representation has a strong `ETag`, and a client
//! that holds the text gets 304. The widget has two addresses: `/widget.js`, the one
//! customers paste, kept by browsers for five minutes, and `/widget.js?v={hash}`, which
//! always means the same text and is kept for a year (the demo page loads that one).

use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::edge::ClientIp;
use super::error::ApiError;
use super::http::{ApiJson, issue_token};
use crate::config::DEMO_DOMAIN;
use crate::error_code::ErrorCode;
use crate::model::Role;
use crate::transport::AppState;

/// The code the widget, the inbox and the stats page share, and its file name under `web/`.
const COMMON: &str = include_str!("../../web/common.js");
const COMMON_FILE: &str = "common.js";
/// Where a page wants [`COMMON`]: it stands on a line of its own, in a script.
const MARKER: &str = "/* @include common.js */";

const WIDGET_TEXT: &str = include_str!("../../web/widget.js");
const INBOX_TEXT: &str = include_str!("../../web/inbox.html");
const DEMO_TEXT: &str = include_str!("../../web/index.html");
const STATS_TEXT: &str = include_str!("../../web/stats.html");

/// A page: its file name under `web/`, its media type, and what is sent for it, made from
/// its compiled-in text the first time it is asked for (see [`Page::served`]).
#[derive(Debug)]
struct Page {
    file: &'static str,
    media_type: &'static str,
    /// The text as served (with `common.js` spliced in).
    text: fn() -> String,
    served: OnceLock<Served>,
}

static WIDGET: Page = Page {
    file: "widget.js",
    media_type: "text/javascript; charset=utf-8",
    text: || with_common(WIDGET_TEXT, COMMON),
    served: OnceLock::new(),
};
static INBOX: Page = Page {
    file: "inbox.html",
    media_type: "text/html; charset=utf-8",
    text: || with_common(INBOX_TEXT, COMMON),
    served: OnceLock::new(),
};
static STATS: Page = Page {
    file: "stats.html",
    media_type: "text/html; charset=utf-8",
    text: || with_common(STATS_TEXT, COMMON),
    served: OnceLock::new(),
};
static DEMO: Page = Page {
    file: "index.html",
    media_type: "text/html; charset=utf-8",
    text: || versioned_widget(&with_common(DEMO_TEXT, COMMON)),
    served: OnceLock::new(),
};

/// Where the demo page loads the widget, as written in `web/index.html`.
const WIDGET_SRC: &str = r#"src="/widget.js""#;

/// `page` loading the widget from its versioned address (`/widget.js?v=…`), which browsers
/// may keep for a year: the address changes with the widget's text.
fn versioned_widget(page: &str) -> String {
    let versioned = format!(r#"src="/widget.js?v={}""#, WIDGET.served_now().hash);
    page.replacen(WIDGET_SRC, &versioned, 1)
}

/// A page's text, compressed, and the hash that names it: made once, kept for the life of
/// the process, so a request costs no compression.
#[derive(Debug)]
struct Served {
    text: String,
    gzip: Vec<u8>,
    brotli: Vec<u8>,
    /// The first 16 hex digits of the SHA-256 of `text`: the page's version, in its
    /// `ETag` and in the widget's versioned address.
    hash: String,
    /// The `Content-Security-Policy` of an HTML page (see [`page_policy`]).
    policy: Option<HeaderValue>,
}

impl Served {
    fn of(text: String, html: bool) -> Self {
        let digest = Sha256::digest(text.as_bytes());
        let hash = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            policy: html.then(|| page_policy(&text)),
            gzip: gzip(text.as_bytes()),
            brotli: brotli(text.as_bytes()),
            text,
            hash,
        }
    }

    /// The `ETag` of the page in `coding`: one per representation, as HTTP asks of a strong
    /// validator (a cache must not answer a gzip request with brotli bytes it validated).
    fn etag(&self, coding: Coding) -> String {
        match coding {
            Coding::Identity => format!("\"{}\"", self.hash),
            Coding::Gzip => format!("\"{}-gzip\"", self.hash),
            Coding::Brotli => format!("\"{}-br\"", self.hash),
        }
    }

    /// Whether an `If-None-Match` value names this text, in any of its representations.
    fn matches(&self, if_none_match: &str) -> bool {
        if_none_match.split(',').any(|tag| {
            let tag = tag.trim();
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            tag == "*"
                || tag
                    .strip_prefix('"')
                    .and_then(|t| t.strip_suffix('"'))
                    .and_then(|t| t.strip_prefix(self.hash.as_str()))
                    .is_some_and(|rest| matches!(rest, "" | "-gzip" | "-br"))
        })
    }

    fn body(&'static self, coding: Coding) -> &'static [u8] {
        match coding {
            Coding::Identity => self.text.as_bytes(),
            Coding::Gzip => &self.gzip,
            Coding::Brotli => &self.brotli,
        }
    }
}

impl Page {
    /// What is sent for the page, made on a blocking thread the first time (compressing
    /// the inbox with brotli's best setting takes a noticeable moment).
    async fn served(&'static self) -> &'static Served {
        if let Some(served) = self.served.get() {
            return served;
        }
        tokio::task::spawn_blocking(|| self.served_now())
            .await
            .unwrap_or_else(|_| self.served_now())
    }

    fn served_now(&'static self) -> &'static Served {
        self.served
            .get_or_init(|| Served::of((self.text)(), self.is_html()))
    }

    fn is_html(&self) -> bool {
        self.media_type.starts_with("text/html")
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

fn brotli(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let params = brotli::enc::BrotliEncoderParams {
        quality: 11,
        lgwin: 22,
        size_hint: bytes.len(),
        ..Default::default()
    };
    // Reading a slice and writing to a Vec cannot fail.
    let _ = brotli::BrotliCompress(&mut &bytes[..], &mut out, &params);
    out
}

/// A content coding the pages are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
    Brotli,
}

impl Coding {
    /// The best coding an `Accept-Encoding` value allows: the highest `q`, brotli before
    /// gzip when they tie; identity when neither is accepted (or there is no header).
    fn negotiate(accept_encoding: Option<&str>) -> Self {
        let (mut any, mut gzip, mut br) = (None, None, None);
        for item in accept_encoding.unwrap_or_default().split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if name.eq_ignore_ascii_case("br") {
                br = Some(q);
            } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                gzip = Some(q);
            } else if name == "*" {
                any = Some(q);
            }
        }
        let (gzip, br) = (gzip.or(any).unwrap_or(0.0), br.or(any).unwrap_or(0.0));
        if br > 0.0 && br >= gzip {
            Self::Brotli
        } else if gzip > 0.0 {
            Self::Gzip
        } else {
            Self::Identity
        }
    }

    fn header(self) -> Option<&'static str> {
        match self {
            Self::Identity => None,
            Self::Gzip => Some("gzip"),
            Self::Brotli => Some("br"),
        }
    }
}

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

/// `Cache-Control` of the inbox and the demo page: kept, but asked about again each time
/// (an unchanged page costs a 304).
const REVALIDATE: &str = "no-cache";
/// `Cache-Control` of `/widget.js`, the address customers paste into their sites: every
/// page view of every site asks for it, so browsers keep it a few minutes, and a new
/// version reaches every visitor within that time.
const WIDGET_CACHE: &str = "public, max-age=300";
/// `Cache-Control` of `/widget.js?v={hash}`: that address always means the same text.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// `page` for a request with `request`'s headers: compressed as the client accepts it, and
/// 304 when the client already holds this text (`If-None-Match`). With `web.dir` set, the
/// file as it is on disk, uncompressed and never cached.
async fn serve(
    app: &AppState,
    page: &'static Page,
    request: &HeaderMap,
    cache_control: &'static str,
) -> Response {
    if let Some(dir) = &app.config.web.dir {
        return serve_from_dir(dir, page).await;
    }
    let served = page.served().await;
    let coding = Coding::negotiate(
        request
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    let held = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| served.matches(v));
    let mut response = if held {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = (
            [
                (header::CONTENT_TYPE, page.media_type),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            Body::from(served.body(coding)),
        )
            .into_response();
        if let Some(coding) = coding.header() {
            response
                .headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
        }
        response
    };
    let headers = response.headers_mut();
    if let Some(policy) = &served.policy {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy.clone());
    }
    if let Ok(etag) = HeaderValue::from_str(&served.etag(coding)) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    response
}

/// `page` read from `web.dir` (with `common.js` from there too), for working on the pages
/// without a rebuild: sent as it is and never cached.
async fn serve_from_dir(dir: &std::path::Path, page: &'static Page) -> Response {
    let text = match read_page(dir, page.file).await {
        Ok(text) => text,
        Err(response) => return response,
    };
    let text = if text.contains(MARKER) {
        match read_page(dir, COMMON_FILE).await {
            Ok(common) => with_common(&text, &common),
            Err(response) => return response,
        }
    } else {
        text
    };
    let policy = page.is_html().then(|| page_policy(&text));
    let mut response = (
        [
            (header::CONTENT_TYPE, page.media_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        text,
    )
        .into_response();
    if let Some(policy) = policy {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    response
}

/// The `Content-Security-Policy` of one of Parlor's HTML pages: everything from this origin
/// only, the page's own inline `<script>` and `<style>` blocks allowed by their SHA-256 (so
/// no other inline code runs, injected or not), and no framing by anyone (the inbox's
/// buttons cannot be clickjacked). `connect-src 'self'` covers the page's WebSocket to the
/// same host.
fn page_policy(html: &str) -> HeaderValue {
    let scripts = inline_hashes(html, "script");
    let styles = inline_hashes(html, "style");
    let policy = format!(
        "default-src 'none'; script-src 'self'{scripts}; style-src 'self'{styles}; \
         img-src 'self' data:; connect-src 'self'; font-src 'self'; manifest-src 'self'; \
         form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    );
    HeaderValue::from_str(&policy).unwrap_or_else(|_| HeaderValue::from_static(STRICT_POLICY))
}

/// The policy of every response that is not one of the pages (JSON, the widget script):
/// nothing may run from it or frame it.
pub const STRICT_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

/// ` 'sha256-…'` for each inline `<tag>` block of `html` (a `<script>` with a `src` is not
/// inline), in order.
fn inline_hashes(html: &str, tag: &str) -> String {
    use base64::Engine;
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut out = String::new();
    let mut rest = html;
    while let Some(at) = rest.find(&open) {
        let after = &rest[at + open.len()..];
        let Some(end_of_tag) = after.find('>') else {
            break;
        };
        let attributes = &after[..end_of_tag];
        // `<styles…` or `<scripting…` are other tags.
        if !attributes.is_empty() && !attributes.starts_with([' ', '\t', '\n']) {
            rest = after;
            continue;
        }
        let body = &after[end_of_tag + 1..];
        let Some(end) = body.find(&close) else {
            break;
        };
        if !attributes.contains("src=") {
            let digest = Sha256::digest(&body.as_bytes()[..end]);
            let digest = base64::engine::general_purpose::STANDARD.encode(digest);
            out.push_str(&format!(" 'sha256-{digest}'"));
        }
        rest = &body[end + close.len()..];
    }
    out
}

/// Middleware: the headers every response carries, unless the handler set its own: no
/// MIME sniffing, no framing (`X-Frame-Options` for browsers that predate
/// `frame-ancestors`), no referrer to other sites, none of the powerful browser features,
/// and [`STRICT_POLICY`] where a page did not set its own policy.
pub async fn security_headers(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CONTENT_SECURITY_POLICY, STRICT_POLICY),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    headers
        .entry(header::HeaderName::from_static("permissions-policy"))
        .or_insert(HeaderValue::from_static(PERMISSIONS_POLICY));
    response
}

/// No page of Parlor uses the camera, the microphone, location, payments or USB.
const PERMISSIONS_POLICY: &str = "camera=(), microphone=(), geolocation=(), payment=(), usb=()";

/// A file of `web.dir`; a 404 (and a warning) when it cannot be read.
async fn read_page(dir: &std::path::Path, file: &str) -> Result<String, Response> {
    tokio::fs::read_to_string(dir.join(file))
        .await
        .map_err(|e| {
            tracing::warn!(file, error = %e, "cannot read a page from web.dir");
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "page not found")
                .into_response()
        })
}

/// `GET /widget.js`, and `GET /widget.js?v={hash}`: the same script, at an address that
/// never changes its meaning when `v` is the hash of the script being served (any other
/// `v`, an old version's, gets the current script with the short cache).
pub async fn widget(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let cache_control = match query {
        Some(query) if app.config.web.dir.is_none() => {
            let hash = &WIDGET.served().await.hash;
            let current = query
                .split('&')
                .any(|pair| pair.strip_prefix("v=") == Some(hash.as_str()));
            if current { IMMUTABLE } else { WIDGET_CACHE }
        }
        _ => WIDGET_CACHE,
    };
    serve(&app, &WIDGET, &headers, cache_control).await
}

/// `GET /inbox`.
pub async fn inbox(State(app): State<AppState>, headers: HeaderMap) -> Response {
    serve(&app, &INBOX, &headers, REVALIDATE).await
}

/// `GET /stats`: the statistics page (`docs/stats.md`).
pub async fn stats(State(app): State<AppState>, headers: HeaderMap) -> Response {
    serve(&app, &STATS, &headers, REVALIDATE).await
}

/// `GET /`: the demo page for a browser (which asks for `text/html`); the JSON status, as
/// the seeds answer there, for everyone else.
pub async fn root(State(app): State<AppState>, req: axum::extract::Request) -> Response {
    // Eclipse's clients open their WebSocket at the server's bare URL.
    if req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    {
        return match axum::extract::Query::try_from_uri(req.uri()) {
            Ok(query) => super::ws::upgrade(State(app), query, req).await,
            Err(e) => super::error::ApiError::bad_request(ErrorCode::InvalidQuery, e.body_text())
                .into_response(),
        };
    }
    let headers = req.headers();
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        serve(&app, &DEMO, headers, REVALIDATE).await
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
    ApiJson(body): ApiJson<DevLogin, false>,
) -> Result<Response, ApiError> {
    if !app.config.web.dev_login {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::DevLoginDisabled,
            "the development login is off (web.dev_login)",
        ));
    }
    if !ip.is_some_and(is_loopback) {
        app.metrics.client_error("dev_login_local_only");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::DevLoginLocalOnly,
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
            ErrorCode::InvalidBody,
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
    fn a_page_policy_names_its_inline_blocks_by_hash() {
        let page = "<style>a{}</style><script src=\"/widget.js\"></script>\n<script>go()</script>\
                    <scripts>not a script</scripts>";
        let sha = |text: &str| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
        };
        assert_eq!(
            inline_hashes(page, "script"),
            format!(" 'sha256-{}'", sha("go()"))
        );
        assert_eq!(
            inline_hashes(page, "style"),
            format!(" 'sha256-{}'", sha("a{}"))
        );
        let policy = page_policy(page);
        let policy = policy.to_str().unwrap();
        assert!(policy.contains(&format!("script-src 'self' 'sha256-{}';", sha("go()"))));
        assert!(policy.ends_with("frame-ancestors 'none'"));
    }

    #[test]
    fn the_widget_the_inbox_and_the_stats_page_are_served_with_common_js_at_their_marker() {
        for (file, source, page) in [
            ("widget.js", WIDGET_TEXT, &WIDGET),
            ("inbox.html", INBOX_TEXT, &INBOX),
            ("stats.html", STATS_TEXT, &STATS),
        ] {
            assert_eq!(source.matches(MARKER).count(), 1, "{file}: one marker");
            let served = page.served_now().text.as_str();
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
        // The demo page has no marker; it loads the widget from its versioned address.
        assert_eq!(DEMO_TEXT.matches(WIDGET_SRC).count(), 1);
        let hash = &WIDGET.served_now().hash;
        assert_eq!(
            DEMO.served_now().text,
            DEMO_TEXT.replace(WIDGET_SRC, &format!(r#"src="/widget.js?v={hash}""#))
        );
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

    #[test]
    fn the_coding_is_the_best_the_client_accepts() {
        use Coding::{Brotli, Gzip, Identity};
        for (accept, want) in [
            (None, Identity),
            (Some(""), Identity),
            (Some("gzip, deflate, br, zstd"), Brotli),
            (Some("gzip, deflate"), Gzip),
            (Some("GZIP"), Gzip),
            (Some("br;q=0.5, gzip"), Gzip),
            (Some("br;q=0, gzip;q=0"), Identity),
            (Some("*"), Brotli),
            (Some("*;q=0.2, br;q=0"), Gzip),
            (Some("identity"), Identity),
        ] {
            assert_eq!(Coding::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn if_none_match_matches_every_representation_of_the_same_text() {
        let served = Served::of("console.log(1);\n".repeat(100), false);
        assert_eq!(served.hash.len(), 16);
        for coding in [Coding::Identity, Coding::Gzip, Coding::Brotli] {
            let etag = served.etag(coding);
            assert!(served.matches(&etag), "{etag}");
            assert!(served.matches(&format!("\"x\", W/{etag}")), "{etag}");
        }
        assert!(served.matches("*"));
        assert!(!served.matches("\"0123456789abcdef\""));
        assert!(!served.matches(&format!("\"{}-zstd\"", served.hash)));
        assert!(!served.matches(&served.hash), "a tag is quoted");
        // The compressed forms hold the same text.
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(served.gzip.as_slice()),
            &mut text,
        )
        .unwrap();
        assert_eq!(text, served.text);
        let mut text = Vec::new();
        brotli::BrotliDecompress(&mut served.brotli.as_slice(), &mut text).unwrap();
        assert_eq!(text, served.text.as_bytes());
    }
}
