//! The hand-off HTTP API (`docs/handoff.md` §4): the inbox, a room's conversation state,
//! escalate / assign / unassign / transfer / resolve, internal notes and the agents online.
//! The same operations exist as WebSocket frames (`transport::ws`); both call
//! [`HandoffService`](crate::service::handoff::HandoffService).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::{ApiJson, ApiQuery, Caller};
use super::wire::{agent_json, conversation_json, customer_json, inbox_entry_json, note_json};
use super::ws::parse_statuses;
use crate::error_code::ErrorCode;
use crate::service::ServiceError;
use crate::service::handoff::{Action, AgentRef, InboxFilter, Outcome};
use crate::transport::AppState;

fn error(app: &AppState, e: ServiceError) -> ApiError {
    app.metrics.client_error(e.code().as_str());
    ApiError::from(e)
}

/// A JSON body that may be left out entirely (`POST …/resolve` with no body).
fn optional_body<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::bad_request(ErrorCode::InvalidJson, "body is not valid JSON")
        } else {
            let text = e.to_string();
            let text = text.split(" at line").next().unwrap_or("invalid body");
            ApiError::bad_request(ErrorCode::InvalidBody, text.to_owned())
        }
    })
}

fn outcome(o: &Outcome) -> Response {
    Json(json!({
        "roomId": &*o.conversation.room.room_id,
        "changed": o.changed,
        "seq": o.seq,
        "conversation": conversation_json(&o.conversation),
    }))
    .into_response()
}

/// Query of `GET /api/inbox`.
#[derive(Debug, Deserialize)]
pub struct InboxParams {
    status: Option<String>,
    limit: Option<usize>,
    /// Only this visitor's conversations.
    visitor: Option<String>,
    /// Text to search for in room ids, visitor names and messages.
    q: Option<String>,
}

/// `GET /api/inbox?status=&limit=&visitor=&q=`.
pub async fn inbox(
    State(app): State<AppState>,
    Caller(identity): Caller,
    ApiQuery(q): ApiQuery<InboxParams>,
) -> Result<Response, ApiError> {
    let statuses = parse_statuses(q.status.as_deref()).map_err(|e| error(&app, e))?;
    let entries = app
        .handoff
        .list(
            &identity,
            InboxFilter {
                statuses,
                limit: q.limit,
                visitor: q.visitor,
                text: q.q,
            },
        )
        .await
        .map_err(|e| error(&app, e))?;
    let list: Vec<Value> = entries.iter().map(|e| inbox_entry_json(e, true)).collect();
    Ok(Json(json!({ "conversations": list })).into_response())
}

/// `GET /api/rooms/{id}/conversation`.
pub async fn conversation(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
) -> Result<Response, ApiError> {
    let c = app
        .handoff
        .conversation(&identity, &room_id)
        .await
        .map_err(|e| error(&app, e))?;
    Ok(Json(conversation_json(&c)).into_response())
}

/// Body of `POST /api/rooms/{id}/escalate`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalateBody {
    reason: Option<String>,
}

/// Body of `POST /api/rooms/{id}/assign` and `/transfer`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentBody {
    agent_id: Option<String>,
    agent_name: Option<String>,
}

/// An empty body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoBody {}

async fn act(
    app: &AppState,
    identity: &crate::model::Identity,
    room_id: &str,
    action: Action,
) -> Result<Response, ApiError> {
    app.handoff
        .act(identity, room_id, action)
        .await
        .map(|o| outcome(&o))
        .map_err(|e| error(app, e))
}

/// `POST /api/rooms/{id}/escalate {reason?}`.
pub async fn escalate(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: EscalateBody = optional_body(&body)?;
    act(
        &app,
        &identity,
        &room_id,
        Action::Escalate { reason: b.reason },
    )
    .await
}

/// `POST /api/rooms/{id}/assign {agentId?, agentName?}`.
pub async fn assign(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: AgentBody = optional_body(&body)?;
    let agent = b.agent_id.map(|user_id| AgentRef {
        user_id,
        name: b.agent_name,
    });
    act(&app, &identity, &room_id, Action::Assign(agent)).await
}

/// `POST /api/rooms/{id}/transfer {agentId, agentName?}`.
pub async fn transfer(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: AgentBody = optional_body(&body)?;
    let Some(user_id) = b.agent_id else {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidBody,
            "agentId is required",
        ));
    };
    let agent = AgentRef {
        user_id,
        name: b.agent_name,
    };
    act(&app, &identity, &room_id, Action::Transfer(agent)).await
}

/// `POST /api/rooms/{id}/unassign`.
pub async fn unassign(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let NoBody {} = optional_body(&body)?;
    act(&app, &identity, &room_id, Action::Unassign).await
}

/// `POST /api/rooms/{id}/resolve`.
pub async fn resolve(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let NoBody {} = optional_body(&body)?;
    act(&app, &identity, &room_id, Action::Resolve).await
}

/// `GET /api/rooms/{id}/notes`.
pub async fn notes(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
) -> Result<Response, ApiError> {
    let notes = app
        .handoff
        .notes(&identity, &room_id)
        .await
        .map_err(|e| error(&app, e))?;
    let list: Vec<Value> = notes.iter().map(note_json).collect();
    Ok(Json(json!({ "roomId": room_id, "notes": list })).into_response())
}

/// `GET /api/rooms/{id}/visitor`: who opened the room, where they were (page, browser),
/// when they were first and last seen, and their conversations in the domain.
pub async fn visitor(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
) -> Result<Response, ApiError> {
    let info = app
        .handoff
        .visitor(&identity, &room_id)
        .await
        .map_err(|e| error(&app, e))?;
    let visitor = match &info.user_id {
        Some(id) => customer_json(id, info.customer.as_ref()),
        None => Value::Null,
    };
    let conversations: Vec<Value> = info
        .conversations
        .iter()
        .map(|e| inbox_entry_json(e, true))
        .collect();
    Ok(Json(json!({
        "roomId": room_id,
        "visitor": visitor,
        "conversations": conversations,
    }))
    .into_response())
}

/// Body of `POST /api/rooms/{id}/notes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoteBody {
    text: String,
}

/// `POST /api/rooms/{id}/notes {text}`.
pub async fn add_note(
    State(app): State<AppState>,
    Caller(identity): Caller,
    Path(room_id): Path<String>,
    ApiJson(body): ApiJson<NoteBody>,
) -> Result<Response, ApiError> {
    let note = app
        .handoff
        .add_note(&identity, &room_id, &body.text)
        .await
        .map_err(|e| error(&app, e))?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({ "note": note_json(&note) })),
    )
        .into_response())
}

/// `GET /api/agents`: the domain's agents with an inbox open.
pub async fn agents(
    State(app): State<AppState>,
    Caller(identity): Caller,
) -> Result<Response, ApiError> {
    let agents = app
        .handoff
        .agents(&identity)
        .await
        .map_err(|e| error(&app, e))?;
    let list: Vec<Value> = agents.iter().map(agent_json).collect();
    Ok(Json(json!({ "agents": list })).into_response())
}
