//! The seeds' AI endpoints: `POST /ai/chat` (one JSON answer) and `POST /ai/stream`
//! (server-sent events), plus the wire shapes the WebSocket `ai-chat` / `ai-stream` frames
//! share with them; and `GET /api/usage`, the AI usage report.
//!
//! Request body (seeds 000 and 001): `{ "message", "context"?, "model"?, "domainId"?,
//! "userId"?, "userName"?, "conversationId"? }`. The caller is whoever the token says; a
//! caller without one is a visitor of the demo, or of the public domain its `domainId`
//! names, under its own `userId` where that domain lets clients name themselves. With a
//! token, `domainId` must be the caller's own.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::edge::ClientIp;
use super::error::ApiError;
use super::http::{ApiJson, ApiQuery, Caller};
use crate::error_code::ErrorCode;
use crate::model::Identity;
use crate::service::ServiceError;
use crate::service::ai::{AiEvent, Ask, finish_label};
use crate::transport::AppState;

/// What the assistant says when nobody could answer.
pub const OFFER_HUMAN: &str =
    "I can't answer that right now. Would you like to talk to a human agent?";

/// The request body of `/ai/chat`, `/ai/stream` and the `ai-chat` / `ai-stream` frames.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AskBody {
    /// The question.
    pub message: String,
    /// Extra instructions.
    #[serde(default)]
    pub context: Option<String>,
    /// Provider, vendor alias (`openai`, `google`) or model name.
    #[serde(default)]
    pub model: Option<String>,
    /// Must be the caller's domain when given.
    #[serde(default)]
    pub domain_id: Option<String>,
    /// The caller's own id, taken only from a client without a token in a domain with
    /// `anonymous_identity = "client"` (otherwise the caller is whoever the token says).
    #[serde(default)]
    pub user_id: Option<String>,
    /// Its name, likewise.
    #[serde(default)]
    pub user_name: Option<String>,
    /// A conversation that keeps its history.
    #[serde(default)]
    pub conversation_id: Option<String>,
}

impl AskBody {
    /// Who asks: `identity` (whose domain `domainId` must be, if given), or for a client
    /// without a token, the identity its `domainId` and `userId` settle
    /// ([`crate::auth::Authenticator::settle`]).
    pub fn caller(
        &self,
        app: &AppState,
        identity: &Identity,
        origin: Option<&str>,
    ) -> Result<Identity, ServiceError> {
        let claimed = crate::auth::Claimed {
            domain_id: self.domain_id.as_deref(),
            user_id: self.user_id.as_deref(),
            user_name: self.user_name.as_deref(),
            role: None,
        };
        Ok(app.auth.settle(identity, claimed, origin)?)
    }

    /// The service request (the caller is [`Self::caller`]'s).
    pub fn into_ask(self) -> Ask {
        Ask {
            message: self.message,
            context: self.context,
            model: self.model,
            conversation_id: self.conversation_id,
        }
    }
}

/// A whole reply, gathered from its events.
#[derive(Debug, Default)]
pub struct Gathered {
    text: String,
    provider: Option<String>,
    model: Option<String>,
    end: Option<Value>,
    offer_human: bool,
    fallbacks: Vec<Value>,
}

impl Gathered {
    /// Takes one event in.
    pub fn add(&mut self, event: &AiEvent) {
        match event {
            AiEvent::Started { provider, model } => {
                self.provider = Some(provider.clone());
                self.model = Some(model.clone());
            }
            AiEvent::Text(t) => self.text.push_str(t),
            AiEvent::Fallback {
                provider,
                error,
                after_text,
            } => {
                if *after_text {
                    self.text.clear();
                }
                self.fallbacks
                    .push(json!({ "provider": provider, "error": error }));
            }
            AiEvent::Done { .. } => self.end = Some(end_fields(event)),
            AiEvent::NoAnswer => self.offer_human = true,
        }
    }

    /// `{response, model, provider, usage, finishReason, fallbacks, offerHuman?}`.
    pub fn answer(self) -> Value {
        if self.offer_human {
            return json!({
                "response": OFFER_HUMAN, "model": null, "provider": null, "usage": null,
                "offerHuman": true, "fallbacks": self.fallbacks,
            });
        }
        let mut out = self.end.unwrap_or_else(|| json!({}));
        out["response"] = Value::String(self.text);
        out["fallbacks"] = Value::Array(self.fallbacks);
        out
    }
}

/// `{provider, model, usage, finishReason, sources?}` of a [`AiEvent::Done`].
fn end_fields(event: &AiEvent) -> Value {
    match event {
        AiEvent::Done {
            provider,
            model,
            reason,
            usage,
            sources,
        } => {
            let mut fields = json!({
                "provider": provider,
                "model": model,
                "finishReason": finish_label(reason),
                "usage": {
                    "promptTokens": usage.prompt_tokens,
                    "completionTokens": usage.completion_tokens,
                    "totalTokens": usage.prompt_tokens + usage.completion_tokens,
                },
            });
            if !sources.is_empty() {
                fields["sources"] = json!(sources);
            }
            fields
        }
        _ => Value::Null,
    }
}

/// One event as a JSON object with a `type` (`start`, `delta`, `fallback`, `end`,
/// `no_answer`); `index` numbers the deltas.
pub fn event_json(event: &AiEvent, index: &mut u64) -> Value {
    match event {
        AiEvent::Started { provider, model } => {
            json!({ "type": "start", "provider": provider, "model": model })
        }
        AiEvent::Text(t) => {
            let v = json!({ "type": "delta", "delta": t, "index": *index });
            *index += 1;
            v
        }
        AiEvent::Fallback {
            provider,
            error,
            after_text,
        } => json!({ "type": "fallback", "provider": provider, "error": error,
                     "discardText": after_text }),
        AiEvent::Done { .. } => {
            let mut v = end_fields(event);
            v["type"] = "end".into();
            v
        }
        AiEvent::NoAnswer => {
            json!({ "type": "no_answer", "response": OFFER_HUMAN, "offerHuman": true })
        }
    }
}

/// Query of `GET /api/usage`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageQuery {
    /// The caller's domain (the default).
    #[serde(default)]
    domain_id: Option<String>,
    /// Start, inclusive: RFC 3339 or `YYYY-MM-DD` (UTC). Default: 30 days ago.
    #[serde(default)]
    from: Option<String>,
    /// End, exclusive, in the same forms (a date means the end of that day). Default: now.
    #[serde(default)]
    to: Option<String>,
    /// `model` (default) or `day`.
    #[serde(default)]
    group_by: Option<String>,
}

fn parse_time(value: &str, end_of_day: bool) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    let day = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d").ok()?;
    let day = if end_of_day { day.succ_opt()? } else { day };
    Some(day.and_hms_opt(0, 0, 0)?.and_utc())
}

/// The range a query's `from` and `to` give (RFC 3339 or `YYYY-MM-DD`, UTC; a date as `to`
/// means the end of that day), by default the 30 days up to `now` (and a second past it).
pub(super) fn time_range(
    from: Option<&str>,
    to: Option<&str>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>), ApiError> {
    let bad = |what: &str| {
        ApiError::bad_request(
            ErrorCode::InvalidQuery,
            format!("`{what}` must be RFC 3339 or YYYY-MM-DD"),
        )
    };
    let from = match from {
        Some(v) => parse_time(v, false).ok_or_else(|| bad("from"))?,
        None => now - chrono::Duration::days(30),
    };
    let to = match to {
        Some(v) => parse_time(v, true).ok_or_else(|| bad("to"))?,
        None => now + chrono::Duration::seconds(1),
    };
    Ok((from, to))
}

/// `GET /api/usage?domainId=&from=&to=&groupBy=model|day`: AI calls, tokens, failures
/// and mean latency, for the domain's admins and back end.
pub async fn usage(
    State(app): State<AppState>,
    Caller(me): Caller,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Response, ApiError> {
    let (from, to) = time_range(q.from.as_deref(), q.to.as_deref(), chrono::Utc::now())?;
    let group = match q.group_by.as_deref() {
        None | Some("model") => crate::store::UsageGrouping::Model,
        Some("day") => crate::store::UsageGrouping::Day,
        Some(_) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidQuery,
                "`groupBy` must be `model` or `day`",
            ));
        }
    };
    let groups = app
        .ai
        .usage(&me, q.domain_id.as_deref(), from, to, group)
        .await?;
    let mut total = json!({ "calls": 0, "failed": 0, "promptTokens": 0, "completionTokens": 0, "totalTokens": 0 });
    let rows: Vec<Value> = groups
        .iter()
        .map(|g| {
            for (k, v) in [
                ("calls", g.calls),
                ("failed", g.failed),
                ("promptTokens", g.prompt_tokens),
                ("completionTokens", g.completion_tokens),
                ("totalTokens", g.prompt_tokens + g.completion_tokens),
            ] {
                total[k] = json!(total[k].as_u64().unwrap_or(0) + v);
            }
            json!({
                "key": g.key, "calls": g.calls, "failed": g.failed,
                "promptTokens": g.prompt_tokens, "completionTokens": g.completion_tokens,
                "totalTokens": g.prompt_tokens + g.completion_tokens,
                "meanLatencyMs": g.mean_latency_ms,
            })
        })
        .collect();
    Ok(Json(json!({
        "domainId": q.domain_id.unwrap_or_else(|| me.domain_id.to_string()),
        "from": crate::model::iso(from),
        "to": crate::model::iso(to),
        "groupBy": if group == crate::store::UsageGrouping::Day { "day" } else { "model" },
        "groups": rows,
        "total": total,
    }))
    .into_response())
}

/// `POST /ai/chat`
pub async fn chat(
    State(app): State<AppState>,
    ClientIp(address): ClientIp,
    Caller(me): Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AskBody>,
) -> Result<Response, ApiError> {
    let conversation = body.conversation_id.clone();
    let me = body.caller(&app, &me, page_origin(&headers))?;
    let ask = body.into_ask();
    let mut events = app.ai.ask(&me, ask, address).await?;
    let mut gathered = Gathered::default();
    while let Some(event) = events.recv().await {
        gathered.add(&event);
    }
    let mut answer = gathered.answer();
    if let Some(id) = conversation {
        answer["conversationId"] = Value::String(id);
    }
    Ok(Json(answer).into_response())
}

/// `POST /ai/stream`: `start`, `delta`…, then `end` (or `no_answer`) as server-sent
/// events, each named by its `type`.
pub async fn stream(
    State(app): State<AppState>,
    ClientIp(address): ClientIp,
    Caller(me): Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AskBody>,
) -> Result<Response, ApiError> {
    let me = body.caller(&app, &me, page_origin(&headers))?;
    let ask = body.into_ask();
    let events = app.ai.ask(&me, ask, address).await?;
    Ok(Sse::new(sse_events(events))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The `Origin` of a page of another site (Parlor's own pages and non-browser clients:
/// none).
pub fn page_origin(headers: &HeaderMap) -> Option<&str> {
    if super::edge::same_origin(headers) {
        None
    } else {
        super::edge::origin(headers)
    }
}

fn sse_events(
    events: mpsc::Receiver<AiEvent>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    futures_util::stream::unfold((events, 0u64), |(mut events, mut index)| async move {
        let event = events.recv().await?;
        let v = event_json(&event, &mut index);
        let name = v["type"].as_str().unwrap_or("message").to_owned();
        let sse = SseEvent::default().event(name).data(v.to_string());
        Some((Ok(sse), (events, index)))
    })
}
