//! `POST /pusher/auth`: Parlor's own channel authorisation endpoint, for apps that have
//! none (`docs/pusher.md`). `pusher-js` posts `socket_id` and `channel_name` as a form, with
//! the user's Parlor or domain token as a bearer (or the `notifications.token_cookie`
//! cookie); Parlor signs with the caller's domain's Pusher app:
//! - `private-user-{id}` for the user `{id}` only (their notifications);
//! - a `presence-` channel with the caller as the member: `user_id` the token's user,
//!   `user_info` `{"name", "role"}`.
//!
//! Other channels are the app's to authorise (who may listen to what is its business):
//! they are refused (403 `forbidden`). An optional `key` names which of the domain's keys
//! signs (default: the first by name).

use axum::Json;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{App, Kind, invalid_channel};
use crate::error_code::ErrorCode;
use crate::transport::AppState;
use crate::transport::error::ApiError;
use crate::transport::notifications::Reader;

/// The form `pusher-js` posts.
#[derive(Debug, Deserialize)]
pub struct AuthForm {
    socket_id: String,
    channel_name: String,
    #[serde(default)]
    key: Option<String>,
}

/// `POST /pusher/auth`.
pub async fn authorise(
    State(state): State<AppState>,
    Reader(identity): Reader,
    Form(form): Form<AuthForm>,
) -> Result<Json<Value>, ApiError> {
    if !super::api::valid_socket_id(&form.socket_id) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidSocketId,
            "socket_id is of the form digits.digits",
        ));
    }
    let channel = form.channel_name;
    if let Some(message) = invalid_channel(&channel) {
        return Err(ApiError::bad_request(ErrorCode::InvalidChannel, message));
    }
    let app =
        App::of_domain(&state, &identity.domain_id, form.key.as_deref()).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NoPusherApp,
                "this domain has no Pusher app of that key (pusher_keys)",
            )
        })?;
    let socket = form.socket_id.as_bytes();
    match Kind::of(&channel) {
        Kind::Presence => {
            let data = json!({
                "user_id": identity.user_id,
                "user_info": { "name": identity.name, "role": identity.role },
            })
            .to_string();
            let signature = app.sign(&[socket, b":", channel.as_bytes(), b":", data.as_bytes()]);
            Ok(Json(json!({
                "auth": format!("{}:{signature}", app.key),
                "channel_data": data,
            })))
        }
        Kind::Private if channel.strip_prefix("private-user-") == Some(&identity.user_id) => {
            let signature = app.sign(&[socket, b":", channel.as_bytes()]);
            Ok(Json(json!({ "auth": format!("{}:{signature}", app.key) })))
        }
        _ => {
            state.metrics.client_error("forbidden");
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!(
                    "Parlor signs private-user-{} (your own) and presence channels; \
                     this channel is the app's to authorise",
                    identity.user_id
                ),
            ))
        }
    }
}
