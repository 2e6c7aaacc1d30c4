//! Services: what Parlor does, independent of how a client talks to it.
//!
//! Transports call services with an [`Identity`](crate::model::Identity) and plain values;
//! services ask [`auth::policy`](crate::auth::policy), use the store and the hub, and return
//! typed results or a [`ServiceError`] with a stable code. Services never see a wire format.

pub mod accounts;
pub mod ai;
pub mod chat;
pub mod domains;
pub mod files;
pub mod handoff;
pub mod notifications;
pub mod sessions;
pub mod stats;
pub mod visitors;
pub mod webhooks;

use crate::error_code::ErrorCode;
use crate::store::StoreError;

/// Why a service refused or failed a request. Each variant has a stable snake_case code that
/// clients may rely on; the HTTP status and the `error` frame are derived from it.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed in a way the code names (`invalid_room_id`, `empty_message`…).
    #[error("{message}")]
    Invalid {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// A size limit was exceeded (`message_too_long`).
    #[error("{message}")]
    TooLarge {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// The caller could not be identified (`invalid_credentials`, `not_signed_in`).
    #[error("{message}")]
    Unauthenticated {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The room does not exist (in the caller's domain).
    #[error("room not found")]
    RoomNotFound,
    /// Something else the request names does not exist (`domain_not_found`, `key_not_found`).
    #[error("{message}")]
    NotFound {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// A per-connection limit was reached (`too_many_rooms`, `not_joined`).
    #[error("{message}")]
    Conflict {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// Too much, too fast (`rate_limited`, `budget_exceeded`): retry after `retry_after`.
    #[error("{message}")]
    Limited {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
        /// When to try again.
        retry_after: std::time::Duration,
    },
    /// A feature is not available right now (`ai_unavailable`).
    #[error("{message}")]
    NotAvailable {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// Storage failed; nothing was stored or acknowledged.
    #[error("storage unavailable, try again")]
    Unavailable(#[source] StoreError),
}

impl ServiceError {
    /// The stable code sent to clients.
    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::Invalid { code, .. }
            | ServiceError::TooLarge { code, .. }
            | ServiceError::Conflict { code, .. }
            | ServiceError::NotFound { code, .. }
            | ServiceError::NotAvailable { code, .. }
            | ServiceError::Unauthenticated { code, .. }
            | ServiceError::Limited { code, .. } => *code,
            ServiceError::Forbidden(_) => ErrorCode::Forbidden,
            ServiceError::RoomNotFound => ErrorCode::RoomNotFound,
            ServiceError::Unavailable(_) => ErrorCode::StoreUnavailable,
        }
    }

    pub(crate) fn invalid(code: ErrorCode, message: impl Into<String>) -> Self {
        ServiceError::Invalid {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(message) => ServiceError::Invalid {
                code: ErrorCode::InvalidData,
                message,
            },
            other => ServiceError::Unavailable(other),
        }
    }
}

impl From<crate::hub::HubError> for ServiceError {
    fn from(e: crate::hub::HubError) -> Self {
        match e {
            crate::hub::HubError::Store(s) => ServiceError::Unavailable(s),
        }
    }
}

impl From<crate::auth::AuthError> for ServiceError {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError;
        let message = e.to_string();
        match e {
            AuthError::UnknownDomain(_) => ServiceError::NotFound {
                code: ErrorCode::UnknownDomain,
                message: format!(
                    "{message}: without a token a client may name the demo or a public domain \
                     that allows its page"
                ),
            },
            AuthError::Forbidden(m) => ServiceError::Forbidden(m),
            AuthError::InvalidUser(m) => ServiceError::invalid(ErrorCode::InvalidUserId, m),
            AuthError::InvalidToken(_) => ServiceError::Unauthenticated {
                code: ErrorCode::InvalidToken,
                message,
            },
        }
    }
}
