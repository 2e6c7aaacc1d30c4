//! AI providers: one streaming trait and real HTTP clients of the vendors' APIs
//! (design: `docs/ai.md`).
//!
//! A reply is a stream of [`Event`]s: text deltas, possibly the [`Source`]s it was taken
//! from, then one [`Event::Finish`] with the finish reason and token usage. Every client
//! reads its vendor's exact streaming wire format ([`openai`], [`anthropic`], [`gemini`]);
//! [`timed`] adds the first-token and total timeouts the same way to all of them.
//! Dropping a stream drops the HTTP response and so closes the upstream connection: that
//! is how a generation is cancelled.
//!
//! Depends on the config's [`Secret`] only.

pub mod anthropic;
pub mod gemini;
pub mod kb;
pub mod openai;
mod sse;

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::Stream;

use crate::config::Secret;

/// Who said a message of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// The visitor (or whoever asks).
    User,
    /// The AI (or an agent answering in its place).
    Assistant,
}

/// One message of the conversation so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Who said it.
    pub speaker: Speaker,
    /// What was said.
    pub text: String,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The vendor's model name.
    pub model: String,
    /// Instructions: the domain's system prompt and retrieved passages.
    pub system: Option<String>,
    /// The conversation, oldest first, ending with the message to answer.
    pub turns: Vec<Turn>,
    /// Longest reply, in tokens.
    pub max_tokens: u32,
    /// Sampling temperature, when set.
    pub temperature: Option<f32>,
}

/// Why a reply ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model finished its answer.
    Stop,
    /// The reply hit `max_tokens`.
    Length,
    /// The vendor's filter stopped it.
    ContentFilter,
    /// Anything else the vendor said (kept as given).
    Other(String),
}

/// Tokens a call used, as the vendor counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the request (prompt).
    pub prompt_tokens: u64,
    /// Tokens of the reply.
    pub completion_tokens: u64,
}

/// A document passage a reply was taken from, as clients show it under the reply.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    /// The document's title.
    pub title: String,
    /// The document's name in the knowledge base (`pricing.md`, `shipping/returns.md`).
    pub document: String,
    /// The heading of the passage, if it has one.
    pub heading: Option<String>,
}

/// One piece of a streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text.
    Text(String),
    /// Where the reply's text comes from (the knowledge base's passages), before
    /// [`Event::Finish`]. Vendors' replies have none.
    Sources(Vec<Source>),
    /// The end: why, and what it cost (zero when the vendor did not say).
    Finish {
        /// Why it ended.
        reason: FinishReason,
        /// Token usage.
        usage: Usage,
    },
}

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Connecting and getting the response headers.
    Connect,
    /// Waiting for the first text.
    FirstToken,
    /// The whole reply.
    Total,
}

/// Why a provider call failed. The message is safe to log and to show an operator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// 429: slow down; retry after `retry_after` when the vendor said.
    #[error("rate limited by the provider: {message}")]
    RateLimited {
        /// The vendor's `Retry-After`.
        retry_after: Option<Duration>,
        /// The vendor's message.
        message: String,
    },
    /// 5xx, overload or a failed connection: may work on a retry.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// Any other refusal (bad key, unknown model, invalid request): retrying cannot help.
    #[error("provider refused the request ({status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The vendor's message.
        message: String,
    },
    /// A deadline passed.
    #[error("provider timed out ({stage:?})")]
    Timeout {
        /// Which one.
        stage: Stage,
    },
    /// The answer could not be read.
    #[error("unreadable provider answer: {0}")]
    Protocol(String),
    /// The provider has nothing to say (the knowledge base holds no matching passage).
    #[error("no answer found")]
    NoAnswer,
}

impl ProviderError {
    /// Whether the same provider may succeed on a retry.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. } | ProviderError::Unavailable(_)
        )
    }

    /// Stable label for metrics and usage rows.
    pub fn label(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Unavailable(_) => "unavailable",
            ProviderError::Rejected { .. } => "rejected",
            ProviderError::Timeout { .. } => "timeout",
            ProviderError::Protocol(_) => "protocol",
            ProviderError::NoAnswer => "no_answer",
        }
    }
}

/// A streamed reply.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, ProviderError>> + Send>>;

/// A source of AI replies.
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Short name for logs, metrics and usage rows (`openai`, `anthropic`, `gemini`, `kb`).
    fn kind(&self) -> &'static str;

    /// Starts a reply. Returns once the vendor has answered with a streaming response (or
    /// refused); the reply then arrives on the stream. Dropping the stream cancels it.
    async fn stream(&self, request: &ChatRequest) -> Result<EventStream, ProviderError>;
}

/// How to reach one vendor.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// API base URL, without a trailing slash (`https://api.openai.com/v1`).
    pub base_url: String,
    /// API key; `None` for servers that need none (a local Ollama).
    pub api_key: Option<Secret>,
}

impl Endpoint {
    /// The HTTP client for this endpoint, kept by the provider so connections are reused.
    /// It sets no timeout: a streaming body may take long, and [`timed`] bounds each call.
    pub(crate) fn client() -> Result<reqwest::Client, ProviderError> {
        reqwest::Client::builder()
            .build()
            .map_err(|e| ProviderError::Unavailable(format!("cannot build HTTP client: {e}")))
    }

    /// `base_url` joined with `path`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url.trim_end_matches('/'))
    }
}

/// Deadlines applied to a whole call.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting and the response headers.
    pub connect: Duration,
    /// From the call to the first text.
    pub first_token: Duration,
    /// From the call to the end.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_token: Duration::from_secs(15),
            total: Duration::from_secs(120),
        }
    }
}

/// Calls `provider` under `timeouts`: the response must start within `connect`, the first
/// text arrive within `first_token` and the reply end within `total`, all counted from
/// now. A stream that ends without [`Event::Finish`] (a cut connection) ends with
/// [`ProviderError::Unavailable`].
pub async fn timed(
    provider: &dyn Provider,
    request: &ChatRequest,
    timeouts: Timeouts,
) -> Result<EventStream, ProviderError> {
    let start = tokio::time::Instant::now();
    let total_deadline = start + timeouts.total;
    let connect_deadline = (start + timeouts.connect).min(total_deadline);
    let inner = tokio::time::timeout_at(connect_deadline, provider.stream(request))
        .await
        .map_err(|_| ProviderError::Timeout {
            stage: Stage::Connect,
        })??;
    let first_deadline = (start + timeouts.first_token).min(total_deadline);
    let state = (inner, false, false);
    let stream =
        futures_util::stream::unfold(state, move |(mut inner, got_text, done)| async move {
            use futures_util::StreamExt;
            if done {
                return None;
            }
            let (deadline, stage) = if got_text {
                (total_deadline, Stage::Total)
            } else if first_deadline < total_deadline {
                (first_deadline, Stage::FirstToken)
            } else {
                (total_deadline, Stage::Total)
            };
            match tokio::time::timeout_at(deadline, inner.next()).await {
                Err(_) => Some((
                    Err(ProviderError::Timeout { stage }),
                    (inner, got_text, true),
                )),
                Ok(None) => Some((
                    Err(ProviderError::Unavailable(
                        "the reply stopped before its end (connection cut)".into(),
                    )),
                    (inner, got_text, true),
                )),
                Ok(Some(Ok(Event::Text(t)))) => Some((Ok(Event::Text(t)), (inner, true, false))),
                Ok(Some(Ok(sources @ Event::Sources(_)))) => {
                    Some((Ok(sources), (inner, got_text, false)))
                }
                Ok(Some(Ok(finish @ Event::Finish { .. }))) => {
                    Some((Ok(finish), (inner, got_text, true)))
                }
                Ok(Some(Err(e))) => Some((Err(e), (inner, got_text, true))),
            }
        });
    Ok(Box::pin(stream))
}

/// Turns a non-success HTTP response into the error it means, reading the vendor's error
/// message from its JSON body (`{"error": {"message": …}}` for all three vendors).
pub(crate) async fn error_from(response: reqwest::Response) -> ProviderError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64);
    let body = response.text().await.unwrap_or_default();
    let message = vendor_message(&body).unwrap_or_else(|| {
        let text: String = body.chars().take(200).collect();
        if text.trim().is_empty() {
            format!("HTTP {status}")
        } else {
            text
        }
    });
    match status {
        429 => ProviderError::RateLimited {
            retry_after,
            message,
        },
        // 529 is Anthropic's "overloaded".
        500..=599 => ProviderError::Unavailable(format!("HTTP {status}: {message}")),
        _ => ProviderError::Rejected { status, message },
    }
}

/// The `error.message` of a vendor's JSON error body.
pub(crate) fn vendor_message(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let error = value.get("error")?;
    error
        .get("message")
        .and_then(serde_json::Value::as_str)
        .or_else(|| error.as_str())
        .map(str::to_owned)
}

/// A failed transfer: connection refused, reset or cut.
pub(crate) fn transport_error(e: &reqwest::Error) -> ProviderError {
    ProviderError::Unavailable(format!("connection failed: {e}"))
}
