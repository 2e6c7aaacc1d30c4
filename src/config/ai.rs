//! AI providers and each domain's assistant.

use super::*;

/// AI providers, by name. Domains' bots list the names they use, in fallback order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AiConfig {
    /// `[ai.providers.NAME]` tables. `OPENAI_API_KEY`, `ANTHROPIC_API_KEY` and
    /// `GOOGLE_AI_API_KEY`/`GEMINI_API_KEY` add `openai`, `anthropic` and `gemini` when no
    /// provider has that name.
    pub providers: std::collections::BTreeMap<String, ProviderConfig>,
}

/// Which API a provider speaks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI Chat Completions (also Ollama, vLLM, llama.cpp, OpenRouter, Groq).
    Openai,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini.
    Gemini,
}

impl ProviderKind {
    /// The vendor's public API base URL.
    pub fn default_base_url(self) -> &'static str {
        match self {
            ProviderKind::Openai => "https://api.openai.com/v1",
            ProviderKind::Anthropic => "https://api.anthropic.com",
            ProviderKind::Gemini => "https://generativelanguage.googleapis.com",
        }
    }
}

/// One AI provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The API it speaks.
    pub kind: ProviderKind,
    /// API base URL; the vendor's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// API key (prefer the environment: `PARLOR_AI__PROVIDERS__NAME__API_KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    /// Model name.
    pub model: String,
    /// Longest reply, in tokens.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Time to connect and get the response headers, in milliseconds.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Time from the call to the first token, in milliseconds.
    #[serde(default = "default_first_token_ms")]
    pub first_token_timeout_ms: u64,
    /// Time for the whole reply, in milliseconds.
    #[serde(default = "default_total_ms")]
    pub total_timeout_ms: u64,
    /// Retries after a 429, a 5xx or a failed connection, with back-off (honouring
    /// `Retry-After` up to 10 s) before the next provider is tried.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_max_tokens() -> u32 {
    512
}
fn default_connect_ms() -> u64 {
    5_000
}
fn default_first_token_ms() -> u64 {
    15_000
}
fn default_total_ms() -> u64 {
    120_000
}
fn default_retries() -> u32 {
    1
}

impl ProviderConfig {
    /// A provider of `kind` with `model` and the default timeouts.
    pub fn new(kind: ProviderKind, model: impl Into<String>) -> Self {
        Self {
            kind,
            base_url: None,
            api_key: None,
            model: model.into(),
            max_tokens: default_max_tokens(),
            connect_timeout_ms: default_connect_ms(),
            first_token_timeout_ms: default_first_token_ms(),
            total_timeout_ms: default_total_ms(),
            retries: default_retries(),
        }
    }
}

/// A domain's AI assistant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BotConfig {
    /// Whether it answers visitors' messages in support rooms.
    pub enabled: bool,
    /// Providers (names from `[ai.providers]`) in fallback order. After them come the
    /// knowledge-base answer and then the offer of a human. Empty: the knowledge base
    /// answers (and, on the demo, the providers the vendors' environment variables add).
    pub providers: Vec<String>,
    /// Instructions given to the model.
    pub system_prompt: String,
    /// Folder of Markdown/text documents to answer from; `"builtin:demo"` is the demo's
    /// shipped documents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knowledge_dir: Option<String>,
    /// How often the knowledge folder is checked for changed files, in seconds.
    pub knowledge_check_secs: u64,
    /// Knowledge-base passages put into the prompt.
    pub context_passages: usize,
    /// Recent room messages given to the model as the conversation.
    pub history_messages: usize,
    /// Questions one visitor may put to the assistant per minute (room messages and the
    /// AI endpoints together); beyond, `rate_limited`.
    pub visitor_messages_per_minute: u32,
    /// Provider tokens (prompt plus completion) the domain may use per UTC day; beyond,
    /// `budget_exceeded` until midnight. Unset: no budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_token_budget: Option<u64>,
    /// The user id the assistant's messages carry (`userId` on the wire).
    pub author_id: String,
    /// The name the assistant's messages carry (`userName` on the wire).
    pub author_name: String,
}

/// The assistant's user id unless a domain's bot says otherwise (WeeziQ's).
pub const ASSISTANT_ID: &str = "ai-assistant";
/// The assistant's name unless a domain's bot says otherwise (WeeziQ's).
pub const ASSISTANT_NAME: &str = "AI Assistant";

impl Default for BotConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            providers: Vec::new(),
            system_prompt: "You are a helpful support assistant. Answer briefly and only from \
                            what you know about this product; when unsure, offer a human agent."
                .to_owned(),
            knowledge_dir: None,
            knowledge_check_secs: 10,
            context_passages: 3,
            history_messages: 20,
            visitor_messages_per_minute: 10,
            daily_token_budget: None,
            author_id: ASSISTANT_ID.to_owned(),
            author_name: ASSISTANT_NAME.to_owned(),
        }
    }
}
/// The shipped documents, as a `knowledge_dir` value.
pub const BUILTIN_DEMO_KNOWLEDGE: &str = "builtin:demo";
