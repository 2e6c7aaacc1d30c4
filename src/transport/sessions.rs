//! Guided sessions over HTTP (`docs/sessions.md`): the templates a domain's users may open,
//! their sessions and documents, and the admin API's templates.
//!
//! A user sees only their own sessions and documents; the domain's back end (a server key
//! or its internal secret) and its admins see every user's. Anyone else gets 404, never
//! 403, so an id reveals nothing.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::admin::Admin;
use super::error::ApiError;
use super::http::{ApiJson, ApiQuery, Caller};
use crate::error_code::ErrorCode;
use crate::model::Identity;
use crate::service::ServiceError;
use crate::service::sessions::template::{Template, markdown_options};
use crate::service::sessions::{template_not_found, turn_json};
use crate::store::guided::{GeneratedDocument, GuidedSession, SessionStatus};
use crate::transport::AppState;

/// Refuses callers without a user: token-less clients.
fn signed_in(app: &AppState, caller: &Identity) -> Result<(), ApiError> {
    if caller.anonymous {
        app.metrics.client_error("missing_token");
        return Err(ApiError::unauthorized(
            ErrorCode::MissingToken,
            "send the user's token as Authorization: Bearer",
        ));
    }
    Ok(())
}

/// A template as users list it.
fn template_summary(t: &Template) -> Value {
    json!({
        "id": t.spec.id,
        "name": t.spec.name,
        "description": t.spec.description,
        "questionCount": t.questions().len(),
    })
}

/// `GET /api/templates`: the templates of the caller's domain.
pub async fn templates(
    State(app): State<AppState>,
    Caller(caller): Caller,
) -> Result<Response, ApiError> {
    signed_in(&app, &caller)?;
    let all = app.sessions.templates(&caller.domain_id).await?;
    let list: Vec<Value> = all.iter().map(|t| template_summary(t)).collect();
    Ok(Json(json!({ "templates": list })).into_response())
}

/// Filters of `GET /api/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFilter {
    #[serde(rename = "templateId")]
    template_id: Option<String>,
    status: Option<String>,
    /// For the back end and admins: one user's.
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

fn session_json(s: &GuidedSession, with_history: bool) -> Value {
    let mut v = json!({
        "id": s.id,
        "domainId": s.domain_id,
        "userId": s.user_id,
        "templateId": s.template_id,
        "status": s.status.as_str(),
        "pendingQuestion": s.pending.as_ref().map(|p| json!({ "id": p.id, "text": p.text })),
        "documentId": s.document_id,
        "turnCount": s.turn_count,
        "createdAt": iso(s.created_at),
        "updatedAt": iso(s.updated_at),
        "completedAt": s.completed_at.map(iso),
    });
    if with_history {
        v["history"] = s.turns.iter().map(turn_json).collect();
    }
    v
}

fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `GET /api/sessions?templateId=&status=`: the caller's sessions, latest first.
pub async fn list_sessions(
    State(app): State<AppState>,
    Caller(caller): Caller,
    ApiQuery(filter): ApiQuery<SessionFilter>,
) -> Result<Response, ApiError> {
    signed_in(&app, &caller)?;
    let status = match filter.status.as_deref() {
        None => None,
        Some(s) => Some(SessionStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                ErrorCode::InvalidStatus,
                "status is in_progress or complete",
            )
        })?),
    };
    let sessions = app
        .sessions
        .sessions(&caller, filter.template_id, status, filter.user_id)
        .await?;
    let list: Vec<Value> = sessions.iter().map(|s| session_json(s, false)).collect();
    Ok(Json(json!({ "sessions": list })).into_response())
}

/// `GET /api/sessions/{id}`: one session with its history.
pub async fn get_session(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    signed_in(&app, &caller)?;
    let session = app.sessions.session(&caller, &id).await?;
    Ok(Json(session_json(&session, true)).into_response())
}

/// `DELETE /api/sessions/{id}`: abandons a session (its document stays).
pub async fn delete_session(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    signed_in(&app, &caller)?;
    app.sessions.delete_session(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Filter of `GET /api/documents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentFilter {
    /// For the back end and admins: one user's.
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

fn document_json(d: &GeneratedDocument) -> Value {
    let mut v = json!({
        "id": d.id,
        "userId": d.user_id,
        "sessionId": d.session_id,
        "templateId": d.template_id,
        "title": d.title,
        "format": d.format,
        "bytes": d.bytes,
        "external": d.bytes == 0 && d.content.is_none(),
        "createdAt": iso(d.created_at),
    });
    if let Some(content) = &d.content {
        v["content"] = json!(content);
    }
    v
}

/// `GET /api/documents`: the caller's documents, newest first, without their content.
pub async fn list_documents(
    State(app): State<AppState>,
    Caller(caller): Caller,
    ApiQuery(filter): ApiQuery<DocumentFilter>,
) -> Result<Response, ApiError> {
    signed_in(&app, &caller)?;
    let documents = app
        .sessions
        .documents(&caller, filter.user_id.as_deref())
        .await?;
    let list: Vec<Value> = documents.iter().map(document_json).collect();
    Ok(Json(json!({ "documents": list })).into_response())
}

/// `GET /api/documents/{id}` (JSON), `{id}.md` (the text) and `{id}.html` (rendered and
/// sanitised, under a policy that runs nothing).
pub async fn get_document(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    signed_in(&app, &caller)?;
    let (id, as_) = match (name.strip_suffix(".md"), name.strip_suffix(".html")) {
        (Some(id), _) => (id, Some("md")),
        (_, Some(id)) => (id, Some("html")),
        _ => (name.as_str(), None),
    };
    let document = app.sessions.document(&caller, id).await?;
    let Some(as_) = as_ else {
        return Ok(Json(document_json(&document)).into_response());
    };
    let Some(content) = &document.content else {
        return Err(ApiError::from(ServiceError::NotFound {
            code: ErrorCode::DocumentExternal,
            message: "the AI service keeps this document's text; ask it for the content".into(),
        }));
    };
    let mut res = if as_ == "md" {
        let mut res = content.clone().into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/markdown; charset=utf-8"),
        );
        res
    } else {
        let body = render_html(&document.title, &document.format, content);
        let mut res = body.into_response();
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; sandbox",
            ),
        );
        res
    };
    res.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    Ok(res)
}

/// A whole HTML page for a document: Markdown rendered, HTML as given, text preformatted,
/// each cleaned by an allow-list sanitiser (no scripts, handlers or `javascript:` links).
pub fn render_html(title: &str, format: &str, content: &str) -> String {
    let inner = match format {
        "html" => content.to_owned(),
        "text" => format!("<pre>{}</pre>", escape(content)),
        _ => {
            let mut html = String::with_capacity(content.len() * 2);
            pulldown_cmark::html::push_html(
                &mut html,
                pulldown_cmark::Parser::new_ext(content, markdown_options()),
            );
            html
        }
    };
    let clean = ammonia::clean(&inner);
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>body{{font:16px/1.5 system-ui,sans-serif;max-width:46rem;margin:2rem auto;\
         padding:0 1rem}}pre{{white-space:pre-wrap}}</style></head><body>\n{clean}</body></html>\n",
        escape(title)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

// ------------------------------------------------------------------------------------------
// Admin API
// ------------------------------------------------------------------------------------------

/// A template as the admin API shows it: as written, its AI-service key hidden.
fn template_view(t: &Template, source: &str) -> Value {
    let mut v = serde_json::to_value(&t.spec).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        if obj.remove("aiServiceApiKey").is_some() {
            obj.insert("hasAiServiceApiKey".into(), Value::Bool(true));
        }
        obj.insert("source".into(), json!(source));
    }
    v
}

/// `GET /api/admin/domains/{d}/templates`
pub async fn admin_list_templates(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path(domain): Path<String>,
) -> Result<Response, ApiError> {
    let table = app.domain_admin.table(&me)?;
    if table.get(&domain).is_none() {
        return Err(domain_not_found(&domain));
    }
    let all = app.sessions.templates(&domain).await?;
    let list: Vec<Value> = all
        .iter()
        .map(|t| template_view(t, app.sessions.source_of(&domain, &t.spec.id)))
        .collect();
    Ok(Json(json!({ "templates": list })).into_response())
}

/// `GET /api/admin/domains/{d}/templates/{id}`
pub async fn admin_get_template(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path((domain, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    app.domain_admin.table(&me)?;
    let t = app
        .sessions
        .template(&domain, &id)
        .await?
        .ok_or_else(|| ApiError::from(template_not_found(&id)))?;
    Ok(Json(template_view(&t, app.sessions.source_of(&domain, &id))).into_response())
}

/// `POST /api/admin/domains/{d}/templates`: creates (or replaces) the body's template.
pub async fn admin_post_template(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path(domain): Path<String>,
    ApiJson(body): ApiJson<Value, false>,
) -> Result<Response, ApiError> {
    app.domain_admin.table(&me)?;
    let (created, t) = app.sessions.put_template(&domain, &body, None).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(template_view(&t, "api"))).into_response())
}

/// `PUT /api/admin/domains/{d}/templates/{id}`
pub async fn admin_put_template(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path((domain, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<Value, false>,
) -> Result<Response, ApiError> {
    app.domain_admin.table(&me)?;
    let (created, t) = app.sessions.put_template(&domain, &body, Some(&id)).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(template_view(&t, "api"))).into_response())
}

/// `DELETE /api/admin/domains/{d}/templates/{id}`
pub async fn admin_delete_template(
    State(app): State<AppState>,
    Admin(me): Admin,
    Path((domain, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    app.domain_admin.table(&me)?;
    app.sessions.delete_template(&domain, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn domain_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::DomainNotFound,
        format!("no domain {id:?}"),
    )
}
