//! Agent accounts over HTTP (`docs/accounts.md`).
//!
//! Sign-in, for Parlor's own pages (the inbox), with a session cookie:
//! - `POST /api/auth/login {email, password}` — sets the cookie; the session.
//! - `POST /api/auth/invite {token, password}` — uses an invite: sets the password, signs in.
//! - `GET /api/auth/session` — who is signed in, with their accounts (one per domain), or
//!   `{"signedIn": false}`.
//! - `POST /api/auth/token {domainId}` — a 15-minute agent (or admin) token of one of them.
//! - `POST /api/auth/logout` — ends the session, clears the cookie.
//! - `GET /api/auth/methods` — which ways of signing in this client has.
//!
//! The cookie (`HttpOnly`, `SameSite=Strict`) is read by these routes only; everything else
//! takes the tokens `/api/auth/token` hands out. Each of them refuses a request a page of
//! another site sent (an `Origin` or `Sec-Fetch-Site` saying so: CSRF), and `POST` bodies
//! must be JSON.
//!
//! Administration, for an admin key or an admin account (token) of the domain:
//! - `GET /api/admin/domains/{d}/agents`, `POST …/agents {email, name, role}` (with an invite)
//! - `DELETE …/agents/{id}`, `POST …/agents/{id}/invite`, `POST …/agents/{id}/sessions/revoke`

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::edge::{self, Budget, ClientIp};
use super::error::ApiError;
use super::http::{ApiJson, bearer_token};
use crate::error_code::ErrorCode;
use crate::model::{Identity, Role, iso};
use crate::service::ServiceError;
use crate::service::accounts::{Invited, SignedIn, TOKEN_TTL_SECS};
use crate::store::accounts::{Account, AccountRole, Session};
use crate::transport::AppState;

/// Name of the session cookie.
pub const COOKIE: &str = "parlor_session";

/// Refuses a request sent by a page of another site: its `Origin` names another host, or the
/// browser says it is cross-site. Requests of Parlor's own pages and of non-browser clients
/// (no `Origin`) pass.
fn own_page(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    same_site_only(
        app,
        headers,
        "sign-in requests are accepted from this server's own pages only",
    )
}

/// Refuses, with `cross_site` and `message`, a request a page of another site sent (see
/// [`own_page`]): what a request authenticated by a cookie must pass to change anything.
pub(super) fn same_site_only(
    app: &AppState,
    headers: &HeaderMap,
    message: &str,
) -> Result<(), ApiError> {
    let cross_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("cross-site"));
    if cross_site || (edge::origin(headers).is_some() && !edge::same_origin(headers)) {
        app.metrics.client_error("cross_site");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::CrossSite,
            message,
        ));
    }
    Ok(())
}

/// The session cookie's value, if the request carries one.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    named_cookie(headers, COOKIE)
}

/// The value of the cookie `name`, if the request has one.
pub(super) fn named_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (pair_name, value) = pair.trim().split_once('=')?;
            (pair_name == name && !value.is_empty()).then_some(value)
        })
}

/// Whether the page was served over HTTPS: its `Origin`, or a proxy's `X-Forwarded-Proto`.
pub(super) fn over_https(headers: &HeaderMap) -> bool {
    let header_is = |name: &str, prefix: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with(prefix))
    };
    header_is("origin", "https://") || header_is("x-forwarded-proto", "https")
}

/// The `Set-Cookie` value that stores `value` for `max_age` seconds (0: clears it).
fn set_cookie(headers: &HeaderMap, value: &str, max_age: i64) -> HeaderValue {
    let secure = if over_https(headers) { "; Secure" } else { "" };
    let text =
        format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn session_json(app: &AppState, session: &Session) -> Value {
    let accounts: Vec<Value> = session
        .accounts
        .iter()
        .map(|a| {
            json!({
                "id": a.id,
                "domainId": a.domain_id,
                "domainName": app.accounts.domain_name(&a.domain_id),
                "name": a.name,
                "role": a.role.as_str(),
            })
        })
        .collect();
    json!({
        "signedIn": true,
        "email": session.email,
        "accounts": accounts,
        "expiresAt": iso(session.expires_at),
    })
}

/// Answers a new session: its JSON, and the cookie.
fn signed_in(app: &AppState, headers: &HeaderMap, signed: &SignedIn) -> Response {
    let max_age = (signed.session.expires_at - chrono::Utc::now())
        .num_seconds()
        .max(0);
    let mut res = Json(session_json(app, &signed.session)).into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(headers, &signed.token, max_age),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn service(app: &AppState, e: ServiceError) -> ApiError {
    app.metrics.client_error(e.code().as_str());
    ApiError::from(e)
}

/// Spends a unit of the client address's sign-in budget (the visitor-token one).
async fn limit(app: &AppState, ip: Option<std::net::IpAddr>) -> Result<(), ApiError> {
    if let Some(ip) = ip
        && let Err(wait) = app.edge.check(Budget::VisitorToken, ip).await
    {
        app.metrics.client_error("rate_limited");
        return Err(ApiError::rate_limited(wait, "sign-ins from this address"));
    }
    Ok(())
}

/// The session of the request's cookie (and the cookie's value), if it is live.
async fn lookup(
    app: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(String, Session)>, ApiError> {
    let Some(token) = cookie(headers) else {
        return Ok(None);
    };
    match app.accounts.session(token).await {
        Ok(session) => Ok(session.map(|s| (token.to_owned(), s))),
        Err(e) => Err(service(app, e)),
    }
}

/// The session of the request's cookie, or 401 `not_signed_in`.
async fn current(app: &AppState, headers: &HeaderMap) -> Result<(String, Session), ApiError> {
    lookup(app, headers).await?.ok_or_else(|| {
        app.metrics.client_error("not_signed_in");
        ApiError::unauthorized(ErrorCode::NotSignedIn, "sign in first")
    })
}

/// `GET /api/auth/methods`: how this client can sign in here, for the inbox's sign-in page:
/// `{passwords: true, devLogin}` (`devLogin`: the development login is on and answers this
/// address).
pub async fn methods(State(app): State<AppState>, ClientIp(ip): ClientIp) -> Response {
    let dev = app.config.web.dev_login && ip.is_some_and(super::web::is_loopback);
    Json(json!({ "passwords": true, "devLogin": dev })).into_response()
}

/// Body of `POST /api/auth/login`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    email: String,
    password: String,
}

/// `POST /api/auth/login`
pub async fn login(
    State(app): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Login, false>,
) -> Result<Response, ApiError> {
    own_page(&app, &headers)?;
    limit(&app, ip).await?;
    let signed = app
        .accounts
        .sign_in(&body.email, &body.password)
        .await
        .map_err(|e| service(&app, e))?;
    Ok(signed_in(&app, &headers, &signed))
}

/// Body of `POST /api/auth/invite`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptInvite {
    token: String,
    password: String,
}

/// `POST /api/auth/invite`
pub async fn accept_invite(
    State(app): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AcceptInvite, false>,
) -> Result<Response, ApiError> {
    own_page(&app, &headers)?;
    limit(&app, ip).await?;
    let signed = app
        .accounts
        .accept_invite(&body.token, &body.password)
        .await
        .map_err(|e| service(&app, e))?;
    Ok(signed_in(&app, &headers, &signed))
}

/// `GET /api/auth/session`: the session, or `{"signedIn": false}` (a normal state for the
/// sign-in page to ask about, so not an error).
pub async fn session(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    own_page(&app, &headers)?;
    let body = match lookup(&app, &headers).await? {
        Some((_, session)) => session_json(&app, &session),
        None => json!({ "signedIn": false }),
    };
    let mut res = Json(body).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// Body of `POST /api/auth/token`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenFor {
    domain_id: String,
}

/// `POST /api/auth/token`
pub async fn token(
    State(app): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<TokenFor, false>,
) -> Result<Response, ApiError> {
    own_page(&app, &headers)?;
    let (_, session) = current(&app, &headers).await?;
    let (account, role) = app
        .accounts
        .account_in(&session, &body.domain_id)
        .map_err(|e| service(&app, e))?;
    let mut res = super::http::issue_token(
        &app,
        &account.id,
        Some(&account.name),
        role,
        &account.domain_id,
        TOKEN_TTL_SECS,
    )?;
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// `POST /api/auth/logout`
pub async fn logout(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    own_page(&app, &headers)?;
    if let Some(token) = cookie(&headers) {
        app.accounts
            .sign_out(token)
            .await
            .map_err(|e| service(&app, e))?;
    }
    let mut res = StatusCode::NO_CONTENT.into_response();
    res.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&headers, "", 0));
    Ok(res)
}

/// Who may manage a domain's accounts: an admin key holder (any domain) or an admin of that
/// domain (an admin account's token, or any token with `role: "admin"` of the domain).
#[derive(Debug)]
pub struct Manager(Identity);

impl FromRequestParts<AppState> for Manager {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers);
        if let Ok(admin) = app.auth.identify_admin(token) {
            return Ok(Manager(admin));
        }
        match app.auth.identify(token).await {
            Ok(identity) if !identity.anonymous && identity.role == Role::Admin => {
                Ok(Manager(identity))
            }
            Ok(_) => {
                app.metrics.client_error("forbidden");
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    "only an admin key or a domain's admin manages its agents",
                ))
            }
            Err(e) => {
                app.metrics.client_error(e.code().as_str());
                Err(ApiError::unauthorized(e.code(), e.to_string()))
            }
        }
    }
}

impl Manager {
    /// Refuses a domain admin acting on another domain (as if it did not exist).
    fn of(&self, app: &AppState, domain: &str) -> Result<(), ApiError> {
        let server_admin = &*self.0.domain_id == crate::auth::policy::ALL_DOMAINS;
        if server_admin || (self.0.role == Role::Admin && &*self.0.domain_id == domain) {
            return Ok(());
        }
        Err(service(
            app,
            ServiceError::NotFound {
                code: ErrorCode::DomainNotFound,
                message: format!("no domain {domain:?}"),
            },
        ))
    }
}

fn account_json(a: &Account) -> Value {
    json!({
        "id": a.id,
        "domainId": a.domain_id,
        "email": a.email,
        "name": a.name,
        "role": a.role.as_str(),
        "createdAt": iso(a.created_at),
        "hasPassword": a.has_password,
    })
}

/// The link of an invite, on the host the request was sent to.
fn invite_json(headers: &HeaderMap, invited: &Invited) -> Value {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let scheme = if over_https(headers) { "https" } else { "http" };
    json!({
        "account": account_json(&invited.account),
        "inviteToken": invited.token,
        "inviteUrl": format!("{scheme}://{host}/inbox#invite={}", invited.token),
        "inviteExpiresAt": iso(invited.expires_at),
    })
}

/// Body of `POST /api/admin/domains/{d}/agents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    email: String,
    name: String,
    #[serde(default)]
    role: Option<String>,
}

/// `GET /api/admin/domains/{d}/agents`
pub async fn list(
    State(app): State<AppState>,
    me: Manager,
    Path(domain): Path<String>,
) -> Result<Response, ApiError> {
    me.of(&app, &domain)?;
    let accounts = app
        .accounts
        .list(&domain)
        .await
        .map_err(|e| service(&app, e))?;
    let views: Vec<Value> = accounts.iter().map(account_json).collect();
    Ok(Json(json!({ "agents": views })).into_response())
}

/// `POST /api/admin/domains/{d}/agents`
pub async fn create(
    State(app): State<AppState>,
    me: Manager,
    Path(domain): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<NewAgent, false>,
) -> Result<Response, ApiError> {
    me.of(&app, &domain)?;
    let role = match body.role.as_deref() {
        None => AccountRole::Agent,
        Some(r) => AccountRole::parse(r).ok_or_else(|| {
            ApiError::bad_request(
                ErrorCode::InvalidRole,
                "role must be \"agent\" or \"admin\"",
            )
        })?,
    };
    let invited = app
        .accounts
        .invite(&domain, &body.email, &body.name, role)
        .await
        .map_err(|e| service(&app, e))?;
    tracing::info!(domain = %domain, account = %invited.account.id, "agent account created");
    Ok((StatusCode::CREATED, Json(invite_json(&headers, &invited))).into_response())
}

/// `DELETE /api/admin/domains/{d}/agents/{id}`
pub async fn remove(
    State(app): State<AppState>,
    me: Manager,
    Path((domain, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    me.of(&app, &domain)?;
    app.accounts
        .remove(&domain, &id)
        .await
        .map_err(|e| service(&app, e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /api/admin/domains/{d}/agents/{id}/invite`
pub async fn reinvite(
    State(app): State<AppState>,
    me: Manager,
    Path((domain, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    me.of(&app, &domain)?;
    let invited = app
        .accounts
        .reinvite(&domain, &id)
        .await
        .map_err(|e| service(&app, e))?;
    Ok(Json(invite_json(&headers, &invited)).into_response())
}

/// `POST /api/admin/domains/{d}/agents/{id}/sessions/revoke`
pub async fn revoke_sessions(
    State(app): State<AppState>,
    me: Manager,
    Path((domain, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    me.of(&app, &domain)?;
    let ended = app
        .accounts
        .revoke_sessions(&domain, &id)
        .await
        .map_err(|e| service(&app, e))?;
    Ok(Json(json!({ "sessionsEnded": ended })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; parlor_session=abc; b=2"),
        );
        assert_eq!(cookie(&h), Some("abc"));
        let mut empty = HeaderMap::new();
        empty.insert(header::COOKIE, HeaderValue::from_static("parlor_session="));
        assert_eq!(cookie(&empty), None);
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_over_https() {
        let mut h = HeaderMap::new();
        let plain = set_cookie(&h, "v", 60);
        assert_eq!(
            plain.to_str().unwrap(),
            "parlor_session=v; HttpOnly; SameSite=Strict; Path=/; Max-Age=60"
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(
            set_cookie(&h, "v", 60)
                .to_str()
                .unwrap()
                .ends_with("; Secure")
        );
    }
}
