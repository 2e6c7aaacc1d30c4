//! Google Gemini, streaming
//! (`POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse`).
//!
//! Wire format: `data: {GenerateContentResponse}` events; text in
//! `candidates[0].content.parts[].text`, the end in `candidates[0].finishReason`, token
//! counts in `usageMetadata` (usually on the last event). There is no end marker: the body
//! ends after the event with a finish reason. An error body is
//! `{"error": {"code", "message", "status"}}`.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::sse::{self, Decoder, SseEvent};
use super::{
    ChatRequest, Endpoint, Event, EventStream, FinishReason, Provider, ProviderError, Speaker,
    Usage,
};

/// A client of the Gemini API.
#[derive(Debug)]
pub struct Gemini {
    endpoint: Endpoint,
    client: reqwest::Client,
}

impl Gemini {
    /// A client of `endpoint` (`https://generativelanguage.googleapis.com`).
    pub fn new(endpoint: Endpoint) -> Result<Self, ProviderError> {
        Ok(Self {
            client: Endpoint::client()?,
            endpoint,
        })
    }
}

#[async_trait]
impl Provider for Gemini {
    fn kind(&self) -> &'static str {
        "gemini"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<EventStream, ProviderError> {
        let contents: Vec<_> = request
            .turns
            .iter()
            .map(|t| {
                let role = match t.speaker {
                    Speaker::User => "user",
                    Speaker::Assistant => "model",
                };
                json!({ "role": role, "parts": [{ "text": t.text }] })
            })
            .collect();
        let mut config = json!({ "maxOutputTokens": request.max_tokens });
        if let Some(t) = request.temperature {
            config["temperature"] = json!(t);
        }
        let mut body = json!({ "contents": contents, "generationConfig": config });
        if let Some(system) = &request.system {
            body["systemInstruction"] = json!({ "parts": [{ "text": system }] });
        }
        if request.model.is_empty() || request.model.contains(['/', '?', '#', ':']) {
            return Err(ProviderError::Rejected {
                status: 400,
                message: format!("invalid Gemini model name {:?}", request.model),
            });
        }
        let path = format!(
            "/v1beta/models/{}:streamGenerateContent?alt=sse",
            request.model
        );
        let mut call = self
            .client
            .post(self.endpoint.url(&path))
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(key) = &self.endpoint.api_key {
            call = call.header("x-goog-api-key", key.expose());
        }
        sse::send(call, ResponseDecoder::default()).await
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
    /// A model's thinking, which is not part of the answer.
    #[serde(default)]
    thought: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Debug, Default)]
struct ResponseDecoder {
    reason: Option<FinishReason>,
    usage: Usage,
}

impl Decoder for ResponseDecoder {
    fn step(&mut self, event: &SseEvent) -> Result<(Option<String>, bool), ProviderError> {
        let response: Response = sse::json("Gemini", &event.data)?;
        if let Some(u) = response.usage_metadata {
            self.usage = Usage {
                prompt_tokens: u.prompt_token_count,
                completion_tokens: u.candidates_token_count + u.thoughts_token_count,
            };
        }
        if let Some(reason) = response.prompt_feedback.and_then(|f| f.block_reason) {
            self.reason = Some(FinishReason::ContentFilter);
            tracing::debug!(%reason, "Gemini blocked the prompt");
            return Ok((None, true));
        }
        let Some(candidate) = response.candidates.into_iter().next() else {
            return Ok((None, false));
        };
        if let Some(reason) = candidate.finish_reason {
            self.reason = Some(match reason.as_str() {
                "STOP" => FinishReason::Stop,
                "MAX_TOKENS" => FinishReason::Length,
                "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => {
                    FinishReason::ContentFilter
                }
                _ => FinishReason::Other(reason),
            });
        }
        let text: String = candidate
            .content
            .map(|c| {
                c.parts
                    .into_iter()
                    .filter(|p| p.thought != Some(true))
                    .filter_map(|p| p.text)
                    .collect()
            })
            .unwrap_or_default();
        // The body ends after the last event; a later event may still carry usage.
        Ok((Some(text), false))
    }

    fn finish(&mut self, _at_eof: bool) -> Option<Event> {
        // Complete only if an event said why it ended; otherwise the body was cut.
        self.reason.take().map(|reason| Event::Finish {
            reason,
            usage: self.usage,
        })
    }
}
