//! `GET /stats/domain/{domainId}` (seed 001's path) and `GET /stats/domain/{domainId}/visitors`:
//! a domain's statistics and who is on its site now, for its agents, admins and back end
//! (`docs/stats.md`). The page drawing them is `/stats` (`web/stats.html`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::ai::time_range;
use super::error::ApiError;
use super::http::{ApiQuery, Caller};
use crate::error_code::ErrorCode;
use crate::service::stats::Range;
use crate::store::visitors::Interval;
use crate::transport::AppState;

/// Query of `GET /stats/domain/{domainId}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Start, inclusive: RFC 3339 or `YYYY-MM-DD` (UTC). Default: 30 days ago.
    #[serde(default)]
    from: Option<String>,
    /// End, exclusive (a date means the end of that day). Default: now.
    #[serde(default)]
    to: Option<String>,
    /// `hour` or `day` (default).
    #[serde(default)]
    interval: Option<String>,
}

/// 404 for a domain the server does not have (whoever asks).
fn known(app: &AppState, domain: &str) -> Result<(), ApiError> {
    if app.auth.domains().load().get(domain).is_some() {
        return Ok(());
    }
    app.metrics.client_error("unknown_domain");
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownDomain,
        format!("unknown domain {domain:?}"),
    ))
}

/// `GET /stats/domain/{domainId}?from=&to=&interval=hour|day`.
pub async fn domain(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(domain): Path<String>,
    ApiQuery(q): ApiQuery<StatsQuery>,
) -> Result<Response, ApiError> {
    known(&app, &domain)?;
    let now = chrono::Utc::now();
    let (from, to) = time_range(q.from.as_deref(), q.to.as_deref(), now)?;
    let interval = match q.interval.as_deref() {
        None | Some("day") => Interval::Day,
        Some("hour") => Interval::Hour,
        Some(_) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidQuery,
                "`interval` must be `hour` or `day`",
            ));
        }
    };
    let range = Range { from, to, interval };
    let stats = app.stats.domain(&me, &domain, range, now).await?;
    Ok(Json(stats).into_response())
}

/// `GET /stats/domain/{domainId}/visitors`: who is on the site now.
pub async fn visitors(
    State(app): State<AppState>,
    Caller(me): Caller,
    Path(domain): Path<String>,
) -> Result<Response, ApiError> {
    known(&app, &domain)?;
    let visitors = app.stats.active_visitors(&me, &domain).await?;
    Ok(Json(json!({ "domainId": domain, "visitors": visitors })).into_response())
}
