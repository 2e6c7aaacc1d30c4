//! The HTTP API's error: a status, a stable code and a message, written as the JSON body
//! every endpoint uses (`{"error": {"code", "message"}}`), with `Retry-After` on 429. The
//! edge's refusals and every handler share it, so it sits below both.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::wire::{ErrorBody, ErrorDetail};
use crate::error_code::ErrorCode;
use crate::service::ServiceError;

/// An HTTP error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    /// Seconds for `Retry-After` (429).
    retry_after: Option<u64>,
}

impl ApiError {
    /// Any status and code.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 429 `rate_limited` with `Retry-After` in whole seconds (at least 1).
    pub fn rate_limited(wait: std::time::Duration, what: &str) -> Self {
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        Self {
            retry_after: Some(secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!("too many {what}; retry in {secs} s"),
            )
        }
    }

    /// 429 `too_many_connections`: an address over its cap of open connections.
    pub fn too_many_connections(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyConnections,
                message,
            )
        }
    }

    /// 401.
    pub fn unauthorized(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 503.
    pub fn unavailable(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// 400.
    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut res = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        res
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        if let ServiceError::Limited {
            code, retry_after, ..
        } = &e
        {
            let secs = retry_after.as_secs().max(1);
            return Self {
                retry_after: Some(secs),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, *code, e.to_string())
            };
        }
        let status = match &e {
            ServiceError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ServiceError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ServiceError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            ServiceError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServiceError::RoomNotFound | ServiceError::NotFound { .. } => StatusCode::NOT_FOUND,
            ServiceError::NotAvailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::Limited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ServiceError::Conflict { .. } => StatusCode::CONFLICT,
            ServiceError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "store unavailable");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        Self::new(status, e.code(), e.to_string())
    }
}
