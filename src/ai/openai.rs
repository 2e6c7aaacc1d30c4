//! The OpenAI Chat Completions API, streaming (`POST {base}/chat/completions` with
//! `stream: true`). The base URL makes the same client serve every server that speaks this
//! API: OpenAI (`https://api.openai.com/v1`), Ollama (`http://localhost:11434/v1`), vLLM,
//! llama.cpp's server, OpenRouter, Groq.
//!
//! Wire format: `data: {chunk}` events whose `choices[0].delta.content` carries text and
//! `choices[0].finish_reason` the end; with `stream_options.include_usage` a last chunk
//! with empty `choices` carries `usage`; then `data: [DONE]`.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::sse::{self, Decoder, SseEvent};
use super::{
    ChatRequest, Endpoint, Event, EventStream, FinishReason, Provider, ProviderError, Speaker,
    Usage,
};

/// A client of one OpenAI-compatible server.
#[derive(Debug)]
pub struct OpenAi {
    endpoint: Endpoint,
    client: reqwest::Client,
}

impl OpenAi {
    /// A client of `endpoint`.
    pub fn new(endpoint: Endpoint) -> Result<Self, ProviderError> {
        Ok(Self {
            client: Endpoint::client()?,
            endpoint,
        })
    }
}

#[async_trait]
impl Provider for OpenAi {
    fn kind(&self) -> &'static str {
        "openai"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<EventStream, ProviderError> {
        let mut messages = Vec::with_capacity(request.turns.len() + 1);
        if let Some(system) = &request.system {
            messages.push(json!({ "role": "system", "content": system }));
        }
        for turn in &request.turns {
            let role = match turn.speaker {
                Speaker::User => "user",
                Speaker::Assistant => "assistant",
            };
            messages.push(json!({ "role": role, "content": turn.text }));
        }
        let mut body = json!({
            "model": request.model,
            "messages": messages,
            "stream": true,
            "stream_options": { "include_usage": true },
            "max_tokens": request.max_tokens,
        });
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        let mut call = self
            .client
            .post(self.endpoint.url("/chat/completions"))
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(key) = &self.endpoint.api_key {
            call = call.bearer_auth(key.expose());
        }
        sse::send(call, ChunkDecoder::default()).await
    }
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    /// Some servers report a failure inside the stream.
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChunkUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Debug, Default)]
struct ChunkDecoder {
    reason: Option<FinishReason>,
    usage: Usage,
}

impl Decoder for ChunkDecoder {
    fn step(&mut self, event: &SseEvent) -> Result<(Option<String>, bool), ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok((None, true));
        }
        let chunk: Chunk = sse::json("OpenAI", data)?;
        if let Some(error) = chunk.error {
            let message = error
                .get("message")
                .and_then(serde_json::Value::as_str)
                .map_or_else(|| error.to_string(), str::to_owned);
            return Err(ProviderError::Unavailable(format!(
                "error in stream: {message}"
            )));
        }
        if let Some(u) = chunk.usage {
            self.usage = Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            };
        }
        let mut text = None;
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(reason) = choice.finish_reason {
                self.reason = Some(match reason.as_str() {
                    "stop" => FinishReason::Stop,
                    "length" => FinishReason::Length,
                    "content_filter" => FinishReason::ContentFilter,
                    _ => FinishReason::Other(reason),
                });
            }
            text = choice.delta.and_then(|d| d.content);
        }
        Ok((text, false))
    }

    fn finish(&mut self, at_eof: bool) -> Option<Event> {
        // Without `[DONE]` the reply counts as cut, even after a finish reason: usage
        // follows the finish reason, so it would be missing.
        if at_eof {
            return None;
        }
        Some(Event::Finish {
            reason: self.reason.take().unwrap_or(FinishReason::Stop),
            usage: self.usage,
        })
    }
}
