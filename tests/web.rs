//! The pages compiled into the binary as HTTP serves them: compressed once (gzip, brotli),
//! a strong `ETag` per representation with 304 for `If-None-Match`, the widget at a
//! versioned address browsers keep for a year, and `web.dir` (development) never cached.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Read;

use common::TestServer;
use reqwest::header::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

/// A GET of `path` with `headers`: (status, headers, body bytes as sent).
async fn get(
    s: &TestServer,
    path: &str,
    headers: &[(&'static str, &str)],
) -> (u16, HeaderMap, Vec<u8>) {
    let mut request = reqwest::Client::new().get(s.http(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let res = request.send().await.unwrap();
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    (status, headers, res.bytes().await.unwrap().to_vec())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v: &HeaderValue| v.to_str().unwrap())
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn unbrotli(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::BrotliDecompress(&mut &bytes[..], &mut out).unwrap();
    out
}

/// The first 16 hex digits of the SHA-256 of `bytes`.
fn hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn the_widget_is_compressed_tagged_and_revalidated() {
    let s = TestServer::start().await;

    let (code, plain, text) = get(&s, "/widget.js", &[]).await;
    assert_eq!(code, 200);
    assert_eq!(header(&plain, "content-encoding"), None);
    assert!(
        header(&plain, "content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    assert_eq!(header(&plain, "cache-control"), Some("public, max-age=300"));
    assert_eq!(header(&plain, "vary"), Some("accept-encoding"));
    let version = hash(&text);
    let etag = format!("\"{version}\"");
    assert_eq!(
        header(&plain, "etag"),
        Some(etag.as_str()),
        "a strong tag of the text"
    );

    // Compressed as the browser accepts it, each with a tag of its own; the same text.
    let (_, gz, body) = get(&s, "/widget.js", &[("accept-encoding", "gzip, deflate")]).await;
    assert_eq!(header(&gz, "content-encoding"), Some("gzip"));
    assert_eq!(
        header(&gz, "etag"),
        Some(format!("\"{version}-gzip\"").as_str())
    );
    assert!(
        body.len() * 3 < text.len(),
        "gzip: {} of {}",
        body.len(),
        text.len()
    );
    assert_eq!(gunzip(&body), text);
    let (_, br, body) = get(
        &s,
        "/widget.js",
        &[("accept-encoding", "gzip, deflate, br, zstd")],
    )
    .await;
    assert_eq!(header(&br, "content-encoding"), Some("br"));
    assert_eq!(
        header(&br, "etag"),
        Some(format!("\"{version}-br\"").as_str())
    );
    assert_eq!(unbrotli(&body), text);

    // A browser holding it is told so, with nothing to download.
    for held in [
        etag.clone(),
        format!("\"{version}-br\""),
        format!("\"old\", W/{etag}"),
    ] {
        let (code, headers, body) = get(
            &s,
            "/widget.js",
            &[("if-none-match", &held), ("accept-encoding", "br")],
        )
        .await;
        assert_eq!(code, 304, "{held}");
        assert!(body.is_empty());
        assert_eq!(
            header(&headers, "etag"),
            Some(format!("\"{version}-br\"").as_str())
        );
        assert_eq!(
            header(&headers, "cache-control"),
            Some("public, max-age=300")
        );
    }
    let (code, _, body) = get(
        &s,
        "/widget.js",
        &[("if-none-match", "\"0123456789abcdef\"")],
    )
    .await;
    assert_eq!((code, body), (200, text.clone()), "another version's tag");

    // The versioned address is kept for a year; an old version's is not.
    let (code, versioned, body) = get(&s, &format!("/widget.js?v={version}"), &[]).await;
    assert_eq!((code, &body), (200, &text));
    assert_eq!(
        header(&versioned, "cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let (_, old, body) = get(&s, "/widget.js?v=0123456789abcdef", &[]).await;
    assert_eq!(body, text, "the current script");
    assert_eq!(header(&old, "cache-control"), Some("public, max-age=300"));

    // The demo page loads it from the versioned address.
    let (_, _, demo) = get(&s, "/", &[("accept", "text/html")]).await;
    let demo = String::from_utf8(demo).unwrap();
    assert!(
        demo.contains(&format!(r#"<script src="/widget.js?v={version}""#)),
        "the demo page's script tag"
    );
    s.stop().await;
}

#[tokio::test]
async fn the_inbox_and_the_demo_page_revalidate_every_time() {
    let s = TestServer::start().await;
    for (path, accept) in [("/inbox", "*/*"), ("/", "text/html")] {
        let (code, headers, body) =
            get(&s, path, &[("accept", accept), ("accept-encoding", "gzip")]).await;
        assert_eq!(code, 200, "{path}");
        assert_eq!(header(&headers, "content-encoding"), Some("gzip"), "{path}");
        assert_eq!(
            header(&headers, "cache-control"),
            Some("no-cache"),
            "{path}"
        );
        assert!(
            header(&headers, "content-type")
                .unwrap()
                .starts_with("text/html")
        );
        let version = hash(&gunzip(&body));
        assert_eq!(
            header(&headers, "etag"),
            Some(format!("\"{version}-gzip\"").as_str()),
            "{path}"
        );
        let etag = header(&headers, "etag").unwrap().to_owned();
        let (code, _, body) = get(&s, path, &[("accept", accept), ("if-none-match", &etag)]).await;
        assert_eq!((code, body.len()), (304, 0), "{path}");
    }
    // Not a browser: the JSON status, not the page.
    let (_, headers, _) = get(&s, "/", &[("accept-encoding", "gzip")]).await;
    assert_eq!(header(&headers, "etag"), None);
    s.stop().await;
}

#[tokio::test]
async fn pages_from_web_dir_are_sent_as_they_are_and_never_cached() {
    let dir = tempfile::tempdir().unwrap();
    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    for file in ["widget.js", "common.js", "index.html"] {
        std::fs::copy(web.join(file), dir.path().join(file)).unwrap();
    }
    let root = dir.path().to_owned();
    let s = TestServer::start_with(move |c| c.web.dir = Some(root)).await;
    let (code, headers, body) = get(&s, "/widget.js?v=x", &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(code, 200);
    assert_eq!(header(&headers, "cache-control"), Some("no-cache"));
    assert_eq!(header(&headers, "content-encoding"), None);
    assert_eq!(header(&headers, "etag"), None);
    assert!(String::from_utf8(body).unwrap().contains("function h(tag"));
    // The demo page as the file has it.
    let (_, headers, demo) = get(&s, "/", &[("accept", "text/html")]).await;
    assert_eq!(header(&headers, "cache-control"), Some("no-cache"));
    assert!(
        String::from_utf8(demo)
            .unwrap()
            .contains(r#"<script src="/widget.js" "#)
    );
    s.stop().await;
}

/// The inline `<tag>` blocks (without `src`) of `html`, as CSP source expressions.
fn inline_sources(html: &str, tag: &str) -> Vec<String> {
    use base64::Engine;
    let mut out = Vec::new();
    for piece in html.split(&format!("<{tag}")).skip(1) {
        let Some((attributes, rest)) = piece.split_once('>') else {
            continue;
        };
        if attributes.contains("src=") {
            continue;
        }
        let body = rest.split(&format!("</{tag}>")).next().unwrap();
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
        out.push(format!("'sha256-{digest}'"));
    }
    out
}

#[tokio::test]
async fn every_response_carries_the_security_headers_and_pages_their_own_policy() {
    let s = TestServer::start().await;
    for (path, accept) in [("/inbox", "*/*"), ("/", "text/html")] {
        let (code, headers, body) = get(&s, path, &[("accept", accept)]).await;
        assert_eq!(code, 200);
        let html = String::from_utf8(body).unwrap();
        let policy = header(&headers, "content-security-policy").unwrap();
        assert!(
            policy.contains("frame-ancestors 'none'"),
            "{path}: {policy}"
        );
        assert!(policy.contains("default-src 'none'"), "{path}: {policy}");
        assert!(!policy.contains("unsafe-inline"), "{path}: {policy}");
        assert!(!policy.contains("unsafe-eval"), "{path}: {policy}");
        // Each inline script and style block of the page, and nothing else, by its hash.
        let scripts = inline_sources(&html, "script");
        let styles = inline_sources(&html, "style");
        assert!(!scripts.is_empty() && !styles.is_empty(), "{path}");
        let directive = |name: &str| {
            policy
                .split(';')
                .map(str::trim)
                .find_map(|d| d.strip_prefix(name))
                .unwrap()
                .split_whitespace()
                .filter(|s| s.starts_with("'sha256-"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(directive("script-src "), scripts, "{path}");
        assert_eq!(directive("style-src "), styles, "{path}");
        assert!(
            !html.contains(" style=\""),
            "{path}: no inline style attributes"
        );
        assert_eq!(header(&headers, "x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&headers, "referrer-policy"), Some("no-referrer"));
        assert!(
            header(&headers, "permissions-policy")
                .unwrap()
                .contains("camera=()")
        );
    }
    // Everything else: nothing runs from it, nothing frames it.
    for path in ["/widget.js", "/health", "/api/nope"] {
        let (_, headers, _) = get(&s, path, &[]).await;
        assert_eq!(
            header(&headers, "content-security-policy"),
            Some("default-src 'none'; frame-ancestors 'none'"),
            "{path}"
        );
        assert_eq!(header(&headers, "x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
    }
    s.stop().await;
}
