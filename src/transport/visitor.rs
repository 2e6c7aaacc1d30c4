//! One browser, one visitor: a stable id for clients that bring no token.
//!
//! A client without a token is an anonymous visitor. So that a browser that reconnects (or
//! asks the AI endpoints again) is the same visitor, with the same customer record and the
//! same per-visitor AI limit, the server hands it a cookie, `parlor_visitor`, holding a
//! visitor token it signed (`HttpOnly`; `SameSite=None; Secure` over HTTPS so that pages of
//! other sites keep it, `SameSite=Lax` over plain HTTP). Its next token-less request is that
//! visitor again. The cookie names an id and nothing more: it grants no room and no role,
//! and a client that sends no cookie (or a bad one) simply gets a new id.
//!
//! Only the endpoints where a token-less client gets an identity take part: the WebSocket
//! upgrade, `/ai/chat`, `/ai/stream` and `/api/messages`; and only for requests of no page
//! (another program, or Parlor's own pages) or of a page whose origin a domain lists by
//! name. The cookie is `SameSite=None` so a widget on a listed site keeps it; a page of
//! any other site could otherwise act as the visitor whose browser it runs in.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::accounts::{named_cookie, over_https};
use super::http::bearer_token;
use crate::model::Identity;
use crate::transport::AppState;

/// The cookie's name.
pub const COOKIE: &str = "parlor_visitor";

/// The visitor a token-less request is, put in its extensions by [`remember`].
#[derive(Debug, Clone)]
pub struct Visitor(pub Arc<Identity>);

/// The identity of a request that brought no token: the visitor [`remember`] found or made,
/// else a new one.
pub fn anonymous(extensions: &axum::http::Extensions) -> Identity {
    extensions
        .get::<Visitor>()
        .map_or_else(crate::auth::anonymous, |v| (*v.0).clone())
}

/// Middleware: on the endpoints named in the module's header, a request without a token
/// is the visitor of its cookie, or a new one that gets the cookie with the response.
pub async fn remember(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    if !takes_part(&req) || has_token(&req) {
        return next.run(req).await;
    }
    // The cookie goes with any request to this server, whatever page sent it: only a page
    // a domain names (or no page: another program, or Parlor's own) may be that visitor,
    // or be given the cookie. Any other page's client is a new visitor each time.
    if let Some(origin) = super::ai::page_origin(req.headers())
        && !app.auth.domains().load().lists_origin(origin)
    {
        return next.run(req).await;
    }
    let known = named_cookie(req.headers(), COOKIE).and_then(|v| app.auth.visitor_cookie(v));
    let (identity, fresh) = match known {
        Some(identity) => (identity, None),
        None => {
            let identity = crate::auth::anonymous();
            let ttl = app.config.auth.visitor_token_ttl_secs;
            let cookie = app
                .auth
                .issue(
                    &identity.user_id,
                    None,
                    identity.role,
                    &identity.domain_id,
                    ttl,
                )
                .ok()
                .and_then(|token| set_cookie(req.headers(), &token, ttl));
            (identity, cookie)
        }
    };
    req.extensions_mut().insert(Visitor(Arc::new(identity)));
    let mut res = next.run(req).await;
    if let Some(cookie) = fresh {
        res.headers_mut().append(header::SET_COOKIE, cookie);
    }
    res
}

fn takes_part(req: &Request) -> bool {
    let path = req.uri().path();
    match *req.method() {
        Method::GET => {
            path == "/ws" || path == "/api/messages" || (path == "/" && is_upgrade(req.headers()))
        }
        Method::POST => matches!(path, "/ai/chat" | "/ai/stream" | "/api/messages"),
        _ => false,
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// A token in any of the places one may come: `Authorization`, `?token=` or the
/// `bearer.` subprotocol.
fn has_token(req: &Request) -> bool {
    bearer_token(req.headers()).is_some_and(|t| !t.is_empty())
        || req.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|pair| pair.strip_prefix("token=").is_some_and(|t| !t.is_empty()))
        })
        || req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains(super::ws::TOKEN_SUBPROTOCOL_PREFIX))
}

fn set_cookie(headers: &HeaderMap, token: &str, max_age: u64) -> Option<HeaderValue> {
    let site = if over_https(headers) {
        "SameSite=None; Secure"
    } else {
        "SameSite=Lax"
    };
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; HttpOnly; {site}; Path=/; Max-Age={max_age}"
    ))
    .ok()
}
