//! Seed 001's visitor endpoints (`docs/visitors.md`): a page of a domain's site reports its
//! visitor with `POST /visitors/add` (on load, and again while it stays open) and says it
//! left with `POST /visitors/remove`. Both are a browser page's calls: they pass the same
//! gate as visitor tokens (an address's budget, `limits.ip_visitor_reports_per_minute`,
//! and the domain's allowed origins).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use serde::Deserialize;
use serde_json::{Value, json};

use super::edge::{Budget, ClientIp};
use super::error::ApiError;
use super::http::{ApiJson, admit_page};
use crate::error_code::ErrorCode;
use crate::model::valid_id;
use crate::store::visitors::Sighting;
use crate::transport::AppState;

/// The budget reports draw on (`limits.ip_visitor_reports_per_minute`).
const REPORTS: (Budget, &str) = (Budget::VisitorReport, "visitor reports from this address");

/// Largest `visitorData`, in bytes of JSON.
pub const MAX_VISITOR_DATA_BYTES: usize = crate::store::visitors::MAX_DATA_BYTES;
/// Longest page URL or referrer kept.
pub const MAX_URL_CHARS: usize = 2048;
/// Longest user agent kept (longer ones are cut).
const MAX_USER_AGENT_CHARS: usize = 512;

/// Body of `POST /visitors/add`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddBody {
    domain_id: String,
    visitor_id: String,
    #[serde(default)]
    visitor_data: Option<Value>,
}

/// Body of `POST /visitors/remove`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoveBody {
    domain_id: String,
    visitor_id: String,
}

fn check_visitor_id(id: &str) -> Result<(), ApiError> {
    if valid_id(id) {
        return Ok(());
    }
    Err(ApiError::bad_request(
        ErrorCode::InvalidUserId,
        "visitorId: 1–128 characters of A-Z a-z 0-9 - _ . : @",
    ))
}

/// A string field of `visitorData` (`page` or `url`, `referrer`): at most
/// [`MAX_URL_CHARS`].
fn url_field(
    data: &serde_json::Map<String, Value>,
    names: &[&str],
) -> Result<Option<String>, ApiError> {
    for name in names {
        match data.get(*name) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.chars().count() <= MAX_URL_CHARS => {
                return Ok(Some(s.clone()));
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidData,
                    format!("visitorData.{name}: a string of at most {MAX_URL_CHARS} characters"),
                ));
            }
        }
    }
    Ok(None)
}

/// `POST /visitors/add`: stores a sighting of the visitor (its `visitorData`: `page` or
/// `url`, `referrer`, and the whole object as the visitor's data; the user agent from the
/// request) and counts it on the site for the next five minutes.
pub async fn add(
    State(app): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AddBody>,
) -> Result<Json<Value>, ApiError> {
    admit_page(&app, ip, &headers, &body.domain_id, REPORTS).await?;
    check_visitor_id(&body.visitor_id)?;
    let (page, referrer, data) = match &body.visitor_data {
        None | Some(Value::Null) => (None, None, None),
        Some(Value::Object(fields)) => {
            let text = Value::Object(fields.clone()).to_string();
            if text.len() > MAX_VISITOR_DATA_BYTES {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidData,
                    format!("visitorData is over {MAX_VISITOR_DATA_BYTES} bytes"),
                ));
            }
            (
                url_field(fields, &["page", "url"])?,
                url_field(fields, &["referrer"])?,
                Some(text),
            )
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidData,
                "visitorData must be an object",
            ));
        }
    };
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|ua| ua.chars().take(MAX_USER_AGENT_CHARS).collect::<String>());
    let visitor = app
        .visitors
        .add(Sighting {
            domain_id: body.domain_id.clone(),
            visitor_id: body.visitor_id.clone(),
            at: chrono::Utc::now(),
            page,
            referrer,
            user_agent,
            data,
        })
        .await?;
    let active = app.visitors.active(&body.domain_id).await.len();
    Ok(Json(json!({
        "success": true,
        "domainId": body.domain_id,
        "visitorId": body.visitor_id,
        "visits": visitor.visits,
        "activeVisitors": active,
    })))
}

/// `POST /visitors/remove`: the visitor left the site (it still counts while connected).
pub async fn remove(
    State(app): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RemoveBody>,
) -> Result<Json<Value>, ApiError> {
    admit_page(&app, ip, &headers, &body.domain_id, REPORTS).await?;
    check_visitor_id(&body.visitor_id)?;
    app.visitors
        .remove(&body.domain_id, &body.visitor_id)
        .await?;
    let active = app.visitors.active(&body.domain_id).await.len();
    Ok(Json(json!({
        "success": true,
        "domainId": body.domain_id,
        "visitorId": body.visitor_id,
        "activeVisitors": active,
    })))
}
