//! The AI service: each domain's assistant, its fallback chain, and the bot that answers
//! visitors in support rooms (design: `docs/ai.md`).
//!
//! - **Fallback chain.** A domain's bot tries its providers in order, then its knowledge
//!   base, then offers a human ([`AiEvent::NoAnswer`]), once per conversation: after that,
//!   a question nobody can answer gets a request to rephrase. A provider is retried (with
//!   back-off that honours `Retry-After`, at most 10 s) only when it failed before sending
//!   any text and the failure may pass (429, 5xx, a cut connection). A circuit breaker
//!   skips a provider for 30 s after 3 consecutive failures, so a dead vendor costs one
//!   timeout, not one per message.
//! - **Generation** runs in its own task and reports [`AiEvent`]s on a channel. Dropping
//!   the receiver cancels it: the task stops at its next event and drops the upstream HTTP
//!   request.
//! - **The bot** reacts to committed visitor messages (from the store's commit order, so
//!   on the node that stored them). A newer visitor message in the same room cancels the
//!   reply in progress, as do an agent's message (a human takes over) and the room
//!   emptying. Deltas go to the room as
//!   `message-delta`; the reply is stored once, as an `assistant` message whose
//!   `clientMessageId` is the deltas' `messageId` (with `data.interrupted` when it was
//!   stopped early, and `data.sources` when it was taken from the knowledge base). A client
//!   joining mid-reply gets the text so far.
//!
//! Rooms whose id starts with `ai:` hold the seeds' `/ai/chat` conversations and are not
//! answered by the bot.
//!
//! Files: `chain` (the fallback chain and its breakers), `knowledge` (a domain's bot and its
//! documents), `room` (the bot's replies in support rooms), `spending` (limits, budgets and
//! the meter); this file holds the service and the questions asked outside rooms.

mod chain;
mod knowledge;
mod room;
mod spending;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::num::NonZeroU32;

use dashmap::DashMap;
use futures_util::StreamExt;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ServiceError;
use super::chat::{ChatService, Outgoing};
use crate::ai::kb::{KbProvider, KnowledgeBase};
use crate::ai::{
    ChatRequest, Endpoint, Event, FinishReason, Provider, ProviderError, Source, Speaker, Timeouts,
    Turn, Usage, anthropic::Anthropic, gemini::Gemini, openai::OpenAi,
};
use crate::auth::Domains;
use crate::broker::shared::{Rate, Shared};
use crate::config::{AiConfig, BUILTIN_DEMO_KNOWLEDGE, BotConfig, ProviderConfig, ProviderKind};
use crate::error_code::ErrorCode;
use crate::hub::Event as HubEvent;
use crate::metrics::{AiCallLabel, AiTokenLabel, Metrics, ProviderLabel};
use crate::model::{Identity, Message, Role, RoomKey};
use crate::node::Supervisor;
use crate::store::{Store, UsageGrouping, UsageRecord};

pub use chain::finish_label;
use chain::{Breaker, Call, Slot, build_provider, ordered_chain, run_chain};
pub use knowledge::Bot;
use knowledge::IMPLICIT_BOT;
use room::Generation;
pub use spending::Meter;
use spending::{Admitted, DaySpend, Spending};

/// `data` of a message offering a human: the `escalate` action the widget draws as a button.
/// The assistant offers one when it cannot answer or sees a request for a person; the
/// hand-off service when a visitor asks in words.
pub fn escalate_action(label: &str) -> serde_json::Value {
    serde_json::json!({
        "offerHuman": true,
        "actions": [{ "id": "escalate", "label": label }],
    })
}

/// Room ids with this prefix hold `/ai/chat` conversations.
pub const CONVERSATION_PREFIX: &str = "ai:";

/// What a generation reports.
#[derive(Debug, Clone, PartialEq)]
pub enum AiEvent {
    /// A provider starts answering.
    Started {
        /// Its name.
        provider: String,
        /// The model.
        model: String,
    },
    /// More text.
    Text(String),
    /// The provider failed; the next one is tried. `after_text`: some of its text was
    /// already reported (and is now incomplete).
    Fallback {
        /// The provider that failed.
        provider: String,
        /// Why (an [`ProviderError::label`]).
        error: &'static str,
        /// Whether it had sent text.
        after_text: bool,
    },
    /// The reply is complete.
    Done {
        /// Who answered.
        provider: String,
        /// With which model.
        model: String,
        /// Why it ended.
        reason: FinishReason,
        /// What it cost.
        usage: Usage,
        /// The knowledge-base passages the text was taken from (none from a vendor).
        sources: Vec<Source>,
    },
    /// Nobody could answer: offer a human.
    NoAnswer,
}

/// What a late joiner needs.
#[derive(Debug, Clone, Default)]
pub struct Partial {
    /// The reply's id.
    pub message_id: Arc<str>,
    /// Its text so far.
    pub text: String,
    /// Index of the last delta sent.
    pub index: Option<u64>,
}

/// The AI service.
#[derive(Debug)]
pub struct AiService {
    chat: Arc<ChatService>,
    domains: Arc<Domains>,
    slots: HashMap<String, Arc<Slot>>,
    bots: DashMap<String, Arc<Bot>>,
    generations: DashMap<RoomKey, Generation>,
    metrics: Arc<Metrics>,
    /// Tokens each domain with a budget used today.
    spent: Arc<DashMap<String, DaySpend>>,
    /// When each visitor (`domain/user`) was last told the assistant is holding back.
    notices: DashMap<String, Instant>,
    /// Version of each domain's uploaded documents (bumped on every change).
    uploads: DashMap<String, u64>,
    /// Per domain without a bot section: (uploads version, has documents, when asked).
    upload_presence: DashMap<String, (u64, bool, Instant)>,
    /// Questions per visitor per minute, per domain (with the rate it was built for).
    visitor_limits: DashMap<String, (u32, DefaultKeyedRateLimiter<String>)>,
    /// The same limits and the daily token counts across the cluster.
    shared: Shared,
    /// When each room's reply was last stopped (an agent took over).
    stopped: DashMap<RoomKey, Instant>,
    /// What visitors' addresses may spend, and how many calls each domain may run at once.
    spending: Arc<Spending>,
    /// Runs the replies and the usage records; its shutdown ends replies in rooms (their
    /// text so far is stored as interrupted) before the store flushes.
    supervisor: Supervisor,
}

impl AiService {
    /// Builds every configured provider.
    pub fn new(
        config: &AiConfig,
        limits: &crate::config::Limits,
        chat: Arc<ChatService>,
        domains: Arc<Domains>,
        metrics: Arc<Metrics>,
        shared: Shared,
        supervisor: &Supervisor,
    ) -> Result<Self, String> {
        let mut slots = HashMap::new();
        for (name, p) in &config.providers {
            let provider = build_provider(p).map_err(|e| format!("ai.providers.{name}: {e}"))?;
            slots.insert(
                name.clone(),
                Arc::new(Slot {
                    name: name.clone(),
                    provider,
                    model: p.model.clone(),
                    max_tokens: p.max_tokens,
                    timeouts: Timeouts {
                        connect: Duration::from_millis(p.connect_timeout_ms),
                        first_token: Duration::from_millis(p.first_token_timeout_ms),
                        total: Duration::from_millis(p.total_timeout_ms),
                    },
                    retries: p.retries,
                    breaker: Mutex::new(Breaker::default()),
                }),
            );
        }
        Ok(Self {
            chat,
            domains,
            slots,
            bots: DashMap::new(),
            generations: DashMap::new(),
            metrics,
            spent: Arc::new(DashMap::new()),
            uploads: DashMap::new(),
            upload_presence: DashMap::new(),
            notices: DashMap::new(),
            visitor_limits: DashMap::new(),
            shared,
            stopped: DashMap::new(),
            spending: Arc::new(Spending::new(limits)),
            supervisor: supervisor.clone(),
        })
    }

    /// Notes where a visitor's message comes from, so that the assistant's reply to it in
    /// its room is charged to that address.
    pub fn note_visitor_address(&self, identity: &Identity, ip: std::net::IpAddr) {
        if identity.role == Role::Visitor {
            self.spending
                .note_visitor(&identity.domain_id, &identity.user_id, ip);
        }
    }

    /// Forgets per-address AI spending that went quiet (called every minute).
    pub fn forget_idle(&self) {
        self.spending.forget_idle();
    }
}

impl AiService {
    /// Starts answering `turns` (oldest first, ending with the question) as `bot`.
    /// `model` picks a provider: a provider name, a vendor alias (`openai`, `google`,
    /// `anthropic`) or a model name of a configured vendor (`gpt-4o`, `claude-…`,
    /// `gemini-…`), which is then used as given. Dropping the receiver cancels it.
    pub fn generate(
        &self,
        bot: &Arc<Bot>,
        turns: Vec<Turn>,
        model: Option<&str>,
        meter: Meter,
    ) -> mpsc::Receiver<AiEvent> {
        self.generate_with(bot, turns, model, None, meter)
    }

    /// [`Self::generate`] with extra instructions after the system prompt.
    fn generate_with(
        &self,
        bot: &Arc<Bot>,
        turns: Vec<Turn>,
        model: Option<&str>,
        context: Option<&str>,
        meter: Meter,
    ) -> mpsc::Receiver<AiEvent> {
        let (tx, rx) = mpsc::channel(64);
        let bot = Arc::clone(bot);
        let chain = ordered_chain(&bot.chain, model);
        let question = turns
            .iter()
            .rev()
            .find(|t| t.speaker == Speaker::User)
            .map(|t| t.text.clone())
            .unwrap_or_default();
        let system = prompt(&bot, &question, context);
        self.supervisor.spawn_isolated("ai-generate", async move {
            run_chain(&bot, &chain, system, turns, &tx, &meter).await;
        });
        rx
    }

    /// A short text from the domain's vendors (not the knowledge base) for `instructions`
    /// and `turns`, for the guided sessions' guide: `None` when the domain has no vendor,
    /// the domain or the user (a visitor's per-minute limit) is over its limits, or no
    /// vendor answered within `deadline`. The call is metered and counted against the
    /// domain's budget like any other.
    pub async fn phrase(
        &self,
        domain: &str,
        user: &str,
        visitor: bool,
        instructions: String,
        turns: Vec<Turn>,
        deadline: Duration,
    ) -> Option<String> {
        let bot = self.bot(domain).await?;
        let chain: Vec<(Arc<Slot>, String)> = bot
            .chain
            .iter()
            .filter(|s| s.provider.kind() != "kb")
            .map(|s| (Arc::clone(s), s.model.clone()))
            .collect();
        if chain.is_empty() {
            return None;
        }
        let admitted = self.admit(&bot, domain, user, visitor, None).await.ok()?;
        let meter = self.meter(domain, None, Some(user), admitted);
        let (tx, mut rx) = mpsc::channel(64);
        let call = async move {
            let run = run_chain(&bot, &chain, Some(instructions), turns, &tx, &meter);
            let collect = async {
                let mut text = String::new();
                while let Some(event) = rx.recv().await {
                    match event {
                        AiEvent::Text(t) => text.push_str(&t),
                        AiEvent::Fallback {
                            after_text: true, ..
                        } => text.clear(),
                        AiEvent::Done { .. } => return Some(text),
                        AiEvent::NoAnswer => return None,
                        AiEvent::Started { .. } | AiEvent::Fallback { .. } => {}
                    }
                }
                None
            };
            let ((), text) = tokio::join!(run, collect);
            text
        };
        let text = tokio::time::timeout(deadline, call).await.ok()??;
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_owned())
    }

    /// Stops the reply being generated in `room`, if any (its text so far is stored as
    /// interrupted). True when there was one.
    pub fn stop(&self, room: &RoomKey) -> bool {
        let now = Instant::now();
        // Remembered for a reply about to start (see `on_committed`); old stops are forgotten.
        if self.stopped.len() > 10_000 {
            self.stopped
                .retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        }
        self.stopped.insert(room.clone(), now);
        self.generations
            .get(room)
            .map(|g| g.cancel.cancel())
            .is_some()
    }

    /// The reply being streamed into `room`, for a client joining it now.
    pub fn partial(&self, room: &RoomKey) -> Option<Partial> {
        self.generations
            .get(room)
            .map(|g| g.partial.lock().clone())
            .filter(|p| p.index.is_some())
    }
}

/// A question to the assistant outside support rooms (`/ai/chat`, `/ai/stream`,
/// `ai-chat`, `ai-stream`), with the seeds' fields.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    /// The question.
    pub message: String,
    /// Extra instructions, added after the domain's system prompt.
    pub context: Option<String>,
    /// A provider name, vendor alias or model name (see [`AiService::generate`]).
    pub model: Option<String>,
    /// A conversation whose stored history gives the question context, and which keeps the
    /// question and the answer.
    pub conversation_id: Option<String>,
}

impl AiService {
    /// Answers `ask` for `identity`: the events of the reply. With a conversation id, the
    /// question is stored in the caller's conversation (room `ai:ID`, which only the caller
    /// may use when the domain's visitors own their rooms) before answering, with the
    /// conversation's earlier messages as context, and the complete answer is stored after.
    /// Dropping the receiver cancels the reply.
    pub async fn ask(
        self: &Arc<Self>,
        identity: &Identity,
        ask: Ask,
        address: Option<std::net::IpAddr>,
    ) -> Result<mpsc::Receiver<AiEvent>, ServiceError> {
        if ask.message.trim().is_empty() {
            return Err(ServiceError::invalid(
                ErrorCode::EmptyMessage,
                "message must not be empty",
            ));
        }
        let max = self.chat.limits().max_message_bytes;
        if ask.message.len() > max || ask.context.as_ref().is_some_and(|c| c.len() > max) {
            return Err(ServiceError::TooLarge {
                code: ErrorCode::MessageTooLong,
                message: format!("message and context may each hold {max} bytes"),
            });
        }
        let bot =
            self.bot(&identity.domain_id)
                .await
                .ok_or_else(|| ServiceError::NotAvailable {
                    code: ErrorCode::AiUnavailable,
                    message: "this domain has no AI assistant".into(),
                })?;
        let admitted = self
            .admit(
                &bot,
                &identity.domain_id,
                &identity.user_id,
                identity.role == Role::Visitor,
                address,
            )
            .await?;
        let (turns, room) = match &ask.conversation_id {
            None => (
                vec![Turn {
                    speaker: Speaker::User,
                    text: ask.message.clone(),
                }],
                None,
            ),
            Some(id) => {
                let room_id = format!("{CONVERSATION_PREFIX}{id}");
                let stored = self
                    .chat
                    .post(
                        identity,
                        Outgoing {
                            room_id: &room_id,
                            text: ask.message.clone(),
                            ..Outgoing::default()
                        },
                    )
                    .await
                    .map_err(|e| match e {
                        ServiceError::Invalid {
                            code: ErrorCode::InvalidRoomId,
                            ..
                        } => ServiceError::invalid(
                            ErrorCode::InvalidConversationId,
                            "conversationId must be 1-125 characters of A-Z a-z 0-9 - _ . : @",
                        ),
                        other => other,
                    })?;
                let key = stored.message.room.clone();
                let history = self
                    .chat
                    .store()
                    .messages_before(&key, stored.message.seq + 1, bot.config.history_messages)
                    .await?;
                (history_turns(&history), Some(key))
            }
        };
        let model = ask.model.as_deref();
        let (tx, rx) = mpsc::channel(64);
        let meter = self.meter(
            &identity.domain_id,
            room.as_ref(),
            Some(&identity.user_id),
            admitted,
        );
        let mut events = self.generate_with(&bot, turns, model, ask.context.as_deref(), meter);
        let this = Arc::clone(self);
        self.supervisor
            .spawn_isolated("ai-conversation", async move {
                let mut text = String::new();
                let mut from = (String::new(), String::new());
                let mut done = false;
                let mut cited = None;
                while let Some(event) = events.recv().await {
                    match &event {
                        AiEvent::Started { provider, model } => {
                            from = (provider.clone(), model.clone());
                        }
                        AiEvent::Text(t) => text.push_str(t),
                        AiEvent::Fallback {
                            after_text: true, ..
                        } => text.clear(),
                        AiEvent::Done { sources, .. } => {
                            done = true;
                            if !sources.is_empty() {
                                cited = Some(serde_json::json!({ "sources": sources }));
                            }
                        }
                        AiEvent::NoAnswer => done = true,
                        AiEvent::Fallback { .. } => {}
                    }
                    if tx.send(event).await.is_err() {
                        break;
                    }
                }
                if let Some(room) = room {
                    let id = format!("ai-{}", uuid::Uuid::now_v7().simple());
                    this.store_reply(&room, &id, text, &from.0, &from.1, cited, !done)
                        .await;
                }
            });
        Ok(rx)
    }
}

impl AiService {
    /// `domain`'s AI usage between `from` and `to`, for its admins and back end.
    pub async fn usage(
        &self,
        caller: &Identity,
        domain: Option<&str>,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
        group: UsageGrouping,
    ) -> Result<Vec<crate::store::UsageGroup>, ServiceError> {
        if !crate::auth::policy::may_read_usage(caller) {
            return Err(ServiceError::Forbidden(
                "usage is for the domain's admins and back end".into(),
            ));
        }
        let domain = domain.unwrap_or(&caller.domain_id);
        if domain != &*caller.domain_id {
            return Err(ServiceError::Forbidden(format!(
                "domainId {domain:?} is not the caller's domain"
            )));
        }
        if from >= to {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidQuery,
                "`from` must be before `to`",
            ));
        }
        Ok(self.chat.store().usage(domain, from, to, group).await?)
    }
}

/// The identity the assistant of `domain` writes with: its domain's back end, under the
/// author its bot settings name (`ai-assistant` / `AI Assistant` by default).
pub fn assistant_identity(domains: &Domains, domain: &Arc<str>) -> Identity {
    let table = domains.load();
    let bot = table
        .get(domain)
        .and_then(|d| d.settings.bot.as_ref())
        .unwrap_or(&IMPLICIT_BOT);
    Identity {
        user_id: bot.author_id.clone(),
        name: bot.author_name.clone(),
        role: Role::Service,
        domain_id: Arc::clone(domain),
        anonymous: false,
        room: None,
        label: None,
    }
}

/// A room's messages as the model's conversation: visitors speak as the user, the
/// assistant and agents as the assistant; system notes are left out.
fn history_turns(history: &[Message]) -> Vec<Turn> {
    history
        .iter()
        .filter_map(|m| {
            let speaker = match m.author.role.as_str() {
                r if crate::model::is_visitor_label(r) => Speaker::User,
                "assistant" | "agent" | "admin" => Speaker::Assistant,
                _ => return None,
            };
            Some(Turn {
                speaker,
                text: m.content.clone(),
            })
        })
        .collect()
}

/// The system prompt with the knowledge passages for `question`.
fn prompt(bot: &Bot, question: &str, context: Option<&str>) -> Option<String> {
    let mut system = bot.config.system_prompt.clone();
    if let Some(context) = context.map(str::trim).filter(|c| !c.is_empty()) {
        system.push_str("\n\n");
        system.push_str(context);
    }
    if let Some(kb) = &bot.kb {
        let hits = kb.search(question, bot.config.context_passages);
        if !hits.is_empty() {
            system.push_str("\n\nRelevant passages from the knowledge base:\n");
            for hit in hits {
                let p = hit.passage;
                let heading = p.heading.as_deref().map(|h| format!(" — {h}"));
                system.push_str(&format!(
                    "\n[{}{}]\n{}\n",
                    p.source,
                    heading.unwrap_or_default(),
                    p.text
                ));
            }
        }
    }
    (!system.trim().is_empty()).then_some(system)
}
