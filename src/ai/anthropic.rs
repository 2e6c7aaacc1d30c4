//! The Anthropic Messages API, streaming (`POST {base}/v1/messages` with `stream: true`).
//!
//! Wire format: named SSE events. `message_start` carries the input token count,
//! `content_block_delta` with a `text_delta` carries text, `message_delta` the stop reason
//! and the output token count, `message_stop` the end; `ping` is ignored and an `error`
//! event (e.g. `overloaded_error`) fails the reply.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::sse::{self, Decoder, SseEvent};
use super::{
    ChatRequest, Endpoint, Event, EventStream, FinishReason, Provider, ProviderError, Speaker,
    Usage,
};

/// The API version Parlor speaks.
pub const API_VERSION: &str = "2023-06-01";

/// A client of the Anthropic API.
#[derive(Debug)]
pub struct Anthropic {
    endpoint: Endpoint,
    client: reqwest::Client,
}

impl Anthropic {
    /// A client of `endpoint` (`https://api.anthropic.com`).
    pub fn new(endpoint: Endpoint) -> Result<Self, ProviderError> {
        Ok(Self {
            client: Endpoint::client()?,
            endpoint,
        })
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn kind(&self) -> &'static str {
        "anthropic"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<EventStream, ProviderError> {
        let messages: Vec<_> = request
            .turns
            .iter()
            .map(|t| {
                let role = match t.speaker {
                    Speaker::User => "user",
                    Speaker::Assistant => "assistant",
                };
                json!({ "role": role, "content": t.text })
            })
            .collect();
        let mut body = json!({
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": messages,
            "stream": true,
        });
        if let Some(system) = &request.system {
            body["system"] = json!(system);
        }
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        let mut call = self
            .client
            .post(self.endpoint.url("/v1/messages"))
            .header("anthropic-version", API_VERSION)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(key) = &self.endpoint.api_key {
            call = call.header("x-api-key", key.expose());
        }
        sse::send(call, EventDecoder::default()).await
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: Started,
    },
    ContentBlockStart {},
    ContentBlockDelta {
        delta: BlockDelta,
    },
    ContentBlockStop {},
    MessageDelta {
        #[serde(default)]
        delta: Option<StopDelta>,
        #[serde(default)]
        usage: Option<OutputUsage>,
    },
    MessageStop {},
    Ping {},
    Error {
        error: ApiError,
    },
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Deserialize)]
struct Started {
    #[serde(default)]
    usage: Option<InputUsage>,
}

#[derive(Debug, Deserialize)]
struct InputUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct StopDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OutputUsage {
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Default)]
struct EventDecoder {
    reason: Option<FinishReason>,
    usage: Usage,
}

impl Decoder for EventDecoder {
    fn step(&mut self, event: &SseEvent) -> Result<(Option<String>, bool), ProviderError> {
        let message: StreamEvent = sse::json("Anthropic", &event.data)?;
        Ok(match message {
            StreamEvent::MessageStart { message } => {
                if let Some(u) = message.usage {
                    self.usage.prompt_tokens = u.input_tokens;
                    self.usage.completion_tokens = u.output_tokens;
                }
                (None, false)
            }
            StreamEvent::ContentBlockDelta {
                delta: BlockDelta::TextDelta { text },
            } => (Some(text), false),
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.and_then(|d| d.stop_reason) {
                    self.reason = Some(match reason.as_str() {
                        "end_turn" | "stop_sequence" => FinishReason::Stop,
                        "max_tokens" => FinishReason::Length,
                        "refusal" => FinishReason::ContentFilter,
                        _ => FinishReason::Other(reason),
                    });
                }
                if let Some(u) = usage {
                    self.usage.completion_tokens = u.output_tokens;
                }
                (None, false)
            }
            StreamEvent::MessageStop {} => (None, true),
            StreamEvent::Error { error } => {
                let message = format!("{}: {}", error.kind, error.message);
                return Err(match error.kind.as_str() {
                    "rate_limit_error" => ProviderError::RateLimited {
                        retry_after: None,
                        message,
                    },
                    "overloaded_error" | "api_error" => ProviderError::Unavailable(message),
                    _ => ProviderError::Rejected {
                        status: 200,
                        message,
                    },
                });
            }
            StreamEvent::ContentBlockDelta { .. }
            | StreamEvent::ContentBlockStart {}
            | StreamEvent::ContentBlockStop {}
            | StreamEvent::Ping {}
            | StreamEvent::Unknown => (None, false),
        })
    }

    fn finish(&mut self, at_eof: bool) -> Option<Event> {
        if at_eof {
            return None;
        }
        Some(Event::Finish {
            reason: self.reason.take().unwrap_or(FinishReason::Stop),
            usage: self.usage,
        })
    }
}
