//! The admin API (`/api/admin/…`), for the holder of an admin key (`auth.admin_keys`).
//!
//! - `GET /api/admin/domains` — every domain, config-file and run-time alike.
//! - `GET /api/admin/domains/{id}` — one domain.
//! - `PUT /api/admin/domains/{id}` — create or replace a run-time domain. The body holds the
//!   same settings as a `[[domains]]` table of the config file, with camelCase names
//!   (`visitorRooms`, `allowedOrigins`, `jwt.jwksUrl`, `limits.maxConnections`…).
//! - `DELETE /api/admin/domains/{id}` — remove a run-time domain (its rooms stay stored).
//! - `POST /api/admin/domains/{id}/keys` — add a server key or a Pusher key pair; with
//!   `retireOthersAfterSecs`, the domain's other run-time keys of that kind stop working
//!   after that grace period (a rotation). The key's secret is in this answer only.
//! - `DELETE /api/admin/domains/{id}/keys/{keyId}` — revoke a key at once.
//! - `GET /api/admin/domains/{id}/knowledge`, `PUT` / `DELETE …/knowledge/{name}` — the
//!   domain's uploaded knowledge-base documents (the body of a `PUT` is the text).
//!
//! - `GET /api/admin/domains/{id}/webhooks/deliveries?status=&limit=&before=` — the
//!   domain's webhook delivery log, newest first (`docs/webhooks.md`).
//!
//! Answers never contain a secret that was stored: JWT secrets and Pusher secrets are
//! replaced by `"hasSecret": true`, server keys appear as their hashes.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::http::{ApiJson, bearer_token};
use crate::auth::domains::Domain;
use crate::config::DomainConfig;
use crate::error_code::ErrorCode;
use crate::model::{Identity, iso};
use crate::store::KeyKind;
use crate::transport::AppState;

/// The caller of an admin route: whoever holds an admin key.
#[derive(Debug)]
pub struct Admin(pub Identity);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        app.auth
            .identify_admin(bearer_token(&parts.headers))
            .map(Admin)
            .map_err(|e| {
                app.metrics.client_error(e.code().as_str());
                ApiError::unauthorized(e.code(), e.to_string())
            })
    }
}

/// `GET /api/admin/domains`
pub async fn list_domains(
    State(app): State<AppState>,
    Admin(me): Admin,
) -> Result<Response, ApiError> {
    let table = app.domain_admin.table(&me)?;
    let mut domains: Vec<_> = table.iter().collect();
    domains.sort_by(|a, b| a.settings.id.cmp(&b.settings.id));
    let views: Vec<Value> = domains.into_iter().map(|d| view(d)).collect();
    Ok(Json(json!({ "domains": views })).into_response())
}

/// `GET /api/admin/domains/{id}`
pub async fn get_domain(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let table = app.domain_admin.table(&me)?;
    let domain = table.get(&id).ok_or_else(|| not_found(&id))?;
    Ok(Json(view(domain)).into_response())
}

/// `PUT /api/admin/domains/{id}`
pub async fn put_domain(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let Value::Object(mut fields) = rename_keys(body, &snake_case) else {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidBody,
            "the body must be a JSON object of domain settings",
        ));
    };
    match fields.get("id") {
        None => {
            fields.insert("id".to_owned(), Value::String(id.clone()));
        }
        Some(Value::String(body_id)) if *body_id == id => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidBody,
                "`id` in the body differs from the path",
            ));
        }
    }
    let settings: DomainConfig = serde_json::from_value(Value::Object(fields)).map_err(|e| {
        ApiError::bad_request(ErrorCode::InvalidDomain, camel_message(&e.to_string()))
    })?;
    let created = app.domain_admin.put(&me, settings).await?;
    let table = app.domain_admin.table(&me)?;
    let domain = table.get(&id).ok_or_else(|| not_found(&id))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(domain))).into_response())
}

/// `DELETE /api/admin/domains/{id}`
pub async fn delete_domain(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.domain_admin.remove(&me, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Body of `POST /api/admin/domains/{id}/keys`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewKeyBody {
    /// `server` (default) or `pusher`.
    #[serde(default)]
    kind: Option<String>,
    /// Grace period after which the domain's other run-time keys of this kind stop working.
    #[serde(default)]
    retire_others_after_secs: Option<u64>,
}

/// `POST /api/admin/domains/{id}/keys`
pub async fn add_key(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    // The body is optional: no body adds a server key beside the others.
    let body: NewKeyBody = if body.iter().all(u8::is_ascii_whitespace) {
        NewKeyBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(ErrorCode::InvalidBody, e.to_string()))?
    };
    let kind = match body.kind.as_deref() {
        None | Some("server") => KeyKind::Server,
        Some("pusher") => KeyKind::Pusher,
        Some(other) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidBody,
                format!("unknown key kind {other:?}: use \"server\" or \"pusher\""),
            ));
        }
    };
    let grace = body.retire_others_after_secs.map(Duration::from_secs);
    let new = app.domain_admin.add_key(&me, &id, kind, grace).await?;
    let mut answer = json!({
        "id": new.record.id,
        "domainId": new.record.domain_id,
        "kind": kind.as_str(),
        "key": new.key,
        "createdAt": iso(new.record.created_at),
    });
    if let Some(secret) = new.secret {
        answer["secret"] = Value::String(secret);
    }
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `DELETE /api/admin/domains/{id}/keys/{keyId}`
pub async fn delete_key(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    app.domain_admin.remove_key(&me, &id, &key_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/admin/domains/{id}/knowledge`: the uploaded documents.
pub async fn list_documents(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let docs = app.ai.documents(&me, &id).await?;
    let docs: Vec<Value> = docs
        .into_iter()
        .map(|(name, bytes, at)| json!({ "name": name, "bytes": bytes, "updatedAt": iso(at) }))
        .collect();
    Ok(Json(json!({ "documents": docs })).into_response())
}

/// `PUT /api/admin/domains/{id}/knowledge/{name}`: the body is the document (Markdown or
/// plain text, UTF-8). 201 when new, 200 when replaced.
pub async fn put_document(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path((id, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let text = String::from_utf8(body.to_vec()).map_err(|_| {
        ApiError::bad_request(ErrorCode::InvalidBody, "the document must be UTF-8 text")
    })?;
    let created = app.ai.put_document(&me, &id, &name, text).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "name": name, "domainId": id }))).into_response())
}

/// `DELETE /api/admin/domains/{id}/knowledge/{name}`
pub async fn delete_document(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    app.ai.remove_document(&me, &id, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/admin/domains/{id}/webhooks/deliveries?status=&limit=&before=`: the webhook
/// delivery log, newest first, and `next`, the `before` of the following page.
pub async fn webhook_deliveries(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path(id): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let mut params: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if !matches!(&*name, "status" | "limit" | "before") {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidQuery,
                format!("unknown parameter {name:?} (known: status, limit, before)"),
            ));
        }
        if params.insert(name.to_string(), value.to_string()).is_some() {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidQuery,
                format!("parameter {name:?} given twice"),
            ));
        }
    }
    let param = |name: &str| params.get(name).map(String::as_str);
    let (rows, next) = app
        .webhooks
        .deliveries(&me, &id, param("status"), param("limit"), param("before"))
        .await?;
    let deliveries: Vec<Value> = rows
        .iter()
        .map(|d| serde_json::to_value(d).unwrap_or(Value::Null))
        .collect();
    Ok(Json(json!({
        "deliveries": deliveries,
        "next": next.map(|n| n.to_string()),
    }))
    .into_response())
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::DomainNotFound,
        format!("no domain {id:?}"),
    )
}

/// A domain as the admin API shows it: its settings in camelCase without stored secrets,
/// where they live, and its run-time keys.
fn view(domain: &Domain) -> Value {
    let mut settings = serde_json::to_value(&domain.settings).unwrap_or(Value::Null);
    if let Some(jwt) = settings.get_mut("jwt").and_then(Value::as_object_mut)
        && jwt.remove("secret").is_some()
    {
        jwt.insert("has_secret".to_owned(), Value::Bool(true));
    }
    if let Some(obj) = settings.as_object_mut() {
        for (secret, flag) in [
            ("internal_secret", "has_internal_secret"),
            ("ai_service_api_key", "has_ai_service_api_key"),
        ] {
            if obj.remove(secret).is_some() {
                obj.insert(flag.to_owned(), Value::Bool(true));
            }
        }
    }
    if let Some(hooks) = settings.get_mut("webhooks").and_then(Value::as_array_mut) {
        for hook in hooks.iter_mut().filter_map(Value::as_object_mut) {
            hook.remove("secret");
            hook.insert("has_secret".to_owned(), Value::Bool(true));
        }
    }
    if let Some(pairs) = settings
        .get_mut("pusher_keys")
        .and_then(Value::as_array_mut)
    {
        for pair in pairs.iter_mut().filter_map(Value::as_object_mut) {
            pair.remove("secret");
            pair.insert("has_secret".to_owned(), Value::Bool(true));
        }
    }
    let now = chrono::Utc::now();
    let keys: Vec<Value> = domain
        .keys
        .iter()
        .map(|k| {
            json!({
                "id": k.id,
                "kind": k.kind.as_str(),
                "key": k.public_id,
                "createdAt": iso(k.created_at),
                "expiresAt": k.expires_at.map(iso),
                "active": k.live_at(now),
            })
        })
        .collect();
    let mut out = rename_keys(settings, &camel_case);
    if let Some(obj) = out.as_object_mut() {
        obj.insert(
            "source".to_owned(),
            Value::String(domain.source.as_str().to_owned()),
        );
        obj.insert("keys".to_owned(), Value::Array(keys));
    }
    out
}

/// Renames every object key in `value` with `f` (settings hold no user-chosen keys).
fn rename_keys(value: Value, f: &dyn Fn(&str) -> String) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (f(&k), rename_keys(v, f)))
                .collect::<Map<_, _>>(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(|v| rename_keys(v, f)).collect()),
        other => other,
    }
}

/// `jwksUrl` → `jwks_url`.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `jwks_url` → `jwksUrl`.
fn camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A serde message names fields as the API spells them (``unknown field `jwks_url` `` →
/// ``unknown field `jwksUrl` ``).
fn camel_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for (i, part) in message.split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        if i % 2 == 1 {
            out.push_str(&camel_case(part));
        } else {
            out.push_str(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_convert_both_ways() {
        for (camel, snake) in [
            ("jwksUrl", "jwks_url"),
            ("maxConnections", "max_connections"),
            ("id", "id"),
            ("leewaySecs", "leeway_secs"),
        ] {
            assert_eq!(snake_case(camel), snake);
            assert_eq!(camel_case(snake), camel);
        }
        assert_eq!(
            camel_message("unknown field `jwks_urll`, expected one of `jwks_url`, `issuer`"),
            "unknown field `jwksUrll`, expected one of `jwksUrl`, `issuer`"
        );
    }
}
