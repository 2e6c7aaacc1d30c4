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

/// Consecutive failures that open a provider's circuit.
const BREAKER_FAILURES: u32 = 3;
/// How long an open circuit skips its provider.
const BREAKER_OPEN: Duration = Duration::from_secs(30);
/// Longest back-off before a retry.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How many of a room's latest messages are searched for an earlier offer of a human.
const OFFER_LOOKBACK: usize = 500;
/// How long "this domain has (no) uploaded documents" is believed before the store is
/// asked again.
const UPLOADS_RECHECK: Duration = Duration::from_secs(10);
/// The assistant of a domain without a `[domains.bot]` section that has uploaded documents:
/// no vendor, its knowledge base only.
static IMPLICIT_BOT: std::sync::LazyLock<BotConfig> = std::sync::LazyLock::new(BotConfig::default);
/// What the assistant says to a question nobody can answer once it has offered a human.
const REPHRASE: &str = "Sorry, I couldn't find an answer to that. Could you put it another way?";

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

/// One configured provider with its settings and circuit breaker.
#[derive(Debug)]
struct Slot {
    name: String,
    provider: Arc<dyn Provider>,
    model: String,
    max_tokens: u32,
    timeouts: Timeouts,
    retries: u32,
    breaker: Mutex<Breaker>,
}

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

impl Slot {
    fn is_open(&self) -> bool {
        self.breaker
            .lock()
            .open_until
            .is_some_and(|t| t > Instant::now())
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock();
        if ok {
            *b = Breaker::default();
        } else {
            b.failures += 1;
            if b.failures >= BREAKER_FAILURES {
                b.open_until = Some(Instant::now() + BREAKER_OPEN);
                b.failures = 0;
                tracing::warn!(provider = %self.name, "circuit open for 30 s after repeated failures");
            }
        }
    }
}

/// A domain's assistant, built from its [`BotConfig`] and its knowledge documents.
#[derive(Debug)]
pub struct Bot {
    config: BotConfig,
    chain: Vec<Arc<Slot>>,
    kb: Option<Arc<KnowledgeBase>>,
    /// The uploads version the knowledge base was built from.
    uploads: u64,
    /// The knowledge folder as it was when indexed, and when that was last checked.
    folder: Mutex<(Option<FolderStamp>, Instant)>,
}

type FolderStamp = (u64, u64, std::time::SystemTime);

/// A reply being streamed into a room.
#[derive(Debug)]
struct Generation {
    cancel: CancellationToken,
    partial: Arc<Mutex<Partial>>,
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

    /// Meters calls made for `domain` (in `room`, asked by `user`, let in by `admitted`).
    fn meter(
        &self,
        domain: &str,
        room: Option<&RoomKey>,
        user: Option<&str>,
        admitted: Admitted,
    ) -> Meter {
        Meter {
            admitted: Arc::new(admitted),
            spending: Arc::clone(&self.spending),
            store: Arc::clone(self.chat.store()),
            metrics: Arc::clone(&self.metrics),
            spent: Arc::clone(&self.spent),
            shared: self.shared.clone(),
            domain: domain.to_owned(),
            room: room.map(|r| r.room_id.to_string()),
            user: user.map(str::to_owned),
            supervisor: self.supervisor.clone(),
        }
    }

    /// Whether `user` (a visitor when `visitor`, asking from `address`) of `domain` may ask
    /// now: the address's requests and tokens per minute, the visitor's questions per
    /// minute, the domain's daily token budget and its calls running at once. What lets it
    /// in goes with the call ([`Admitted`]).
    async fn admit(
        &self,
        bot: &Bot,
        domain: &str,
        user: &str,
        visitor: bool,
        address: Option<std::net::IpAddr>,
    ) -> Result<Admitted, ServiceError> {
        let address = address.filter(|_| visitor);
        if let Some(ip) = address {
            Box::pin(self.spending.admit_address(ip, &self.shared)).await?;
        }
        if visitor {
            let rate = bot.config.visitor_messages_per_minute.max(1);
            let mut entry = self
                .visitor_limits
                .entry(domain.to_owned())
                .or_insert_with(|| {
                    (
                        rate,
                        RateLimiter::keyed(Quota::per_minute(
                            NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN),
                        )),
                    )
                });
            if entry.0 != rate {
                *entry = (
                    rate,
                    RateLimiter::keyed(Quota::per_minute(
                        NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN),
                    )),
                );
            }
            // Visitors who went quiet are forgotten, so the map follows the active ones.
            if entry.1.len() > 10_000 {
                entry.1.retain_recent();
            }
            let local = entry
                .1
                .check_key(&user.to_owned())
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()));
            drop(entry);
            let checked = match local {
                // Boxed, like the counter below: the Redis call's future would otherwise sit in
                // every connection's task, used or not.
                Ok(()) => {
                    Box::pin(self.shared.take(
                        "ai-visitor",
                        &format!("{domain}/{user}"),
                        Rate::per_minute(rate),
                    ))
                    .await
                }
                Err(wait) => Err(wait),
            };
            if let Err(wait) = checked {
                return Err(ServiceError::Limited {
                    code: ErrorCode::RateLimited,
                    message: format!(
                        "more than {rate} questions to the assistant per minute; slow down"
                    ),
                    retry_after: wait,
                });
            }
        }
        self.within_daily_budget(bot, domain).await?;
        let running = self.spending.start_call(domain)?;
        Ok(Admitted {
            address,
            _running: running,
        })
    }

    /// Whether `domain` has tokens left of its daily budget (if it has one).
    async fn within_daily_budget(&self, bot: &Bot, domain: &str) -> Result<(), ServiceError> {
        let Some(budget) = bot.config.daily_token_budget else {
            return Ok(());
        };
        let now = chrono::Utc::now();
        let today = now.date_naive();
        let midnight = today.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
        // What the store holds for today (other nodes, restarts).
        let stored = || async {
            let used: u64 = self
                .chat
                .store()
                .usage(
                    domain,
                    midnight,
                    now + chrono::Duration::days(1),
                    UsageGrouping::Day,
                )
                .await?
                .iter()
                .map(|g| g.prompt_tokens + g.completion_tokens)
                .sum();
            Ok::<u64, ServiceError>(used)
        };
        // With several nodes the count is the cluster's, kept in Redis; this node's own
        // count stands in when Redis does not answer.
        let cluster = if self.shared.is_cluster() {
            Box::pin(
                self.shared
                    .counter(&day_key(domain, today), DAY_COUNTER_TTL, async {
                        stored().await.ok()
                    }),
            )
            .await
        } else {
            None
        };
        if cluster.is_none() && self.spent.get(domain).is_none_or(|s| s.day != today) {
            let used = stored().await?;
            self.spent.insert(
                domain.to_owned(),
                DaySpend {
                    day: today,
                    tokens: used,
                },
            );
        }
        let used = cluster.unwrap_or_else(|| self.spent.get(domain).map_or(0, |s| s.tokens));
        if used >= budget {
            let tomorrow = (today + chrono::Duration::days(1))
                .and_hms_opt(0, 0, 0)
                .unwrap_or_default()
                .and_utc();
            return Err(ServiceError::Limited {
                code: ErrorCode::BudgetExceeded,
                message: format!("this domain used its {budget} AI tokens for today"),
                retry_after: (tomorrow - now).to_std().unwrap_or(Duration::from_secs(60)),
            });
        }
        Ok(())
    }

    /// The domain's assistant, or `None` when it has none (or it is disabled). Built on
    /// first use and again whenever the domain's bot settings, its uploaded documents or
    /// its knowledge folder (checked every `knowledge_check_secs`) change.
    ///
    /// A domain without a `[domains.bot]` section gets the built-in assistant (no vendor,
    /// answers from the knowledge base alone) as soon as it has uploaded documents; one whose
    /// section says `enabled = false` has none.
    pub async fn bot(&self, domain: &str) -> Option<Arc<Bot>> {
        let configured = {
            let table = self.domains.load();
            let settings = &table.get(domain)?.settings;
            match &settings.bot {
                Some(bot) if !bot.enabled => return None,
                Some(_) => true,
                None => false,
            }
        };
        if !configured && !self.has_uploads(domain).await {
            return None;
        }
        let table = self.domains.load();
        let current = match table.get(domain).and_then(|d| d.settings.bot.as_ref()) {
            Some(bot) if bot.enabled => bot,
            Some(_) => return None,
            None => &IMPLICIT_BOT,
        };
        let uploads = self.uploads.get(domain).map_or(0, |v| *v);
        let cached = self
            .bots
            .get(domain)
            .filter(|b| b.config == *current && b.uploads == uploads)
            .map(|b| Arc::clone(b.value()));
        if let Some(bot) = cached {
            if self.folder_unchanged(&bot).await {
                return Some(bot);
            }
            tracing::info!(domain, "knowledge folder changed; re-indexing");
        }
        let config = current.clone();
        drop(table);
        let dir = config
            .knowledge_dir
            .clone()
            .filter(|d| d != BUILTIN_DEMO_KNOWLEDGE);
        let builtin = config.knowledge_dir.as_deref() == Some(BUILTIN_DEMO_KNOWLEDGE);
        let mut documents: Vec<(String, String)> = Vec::new();
        if builtin {
            documents.extend(
                crate::ai::kb::DEMO_DOCUMENTS
                    .iter()
                    .map(|(n, t)| ((*n).to_owned(), (*t).to_owned())),
            );
        }
        let mut stamp = None;
        if let Some(dir) = dir.clone() {
            let read = tokio::task::spawn_blocking(move || {
                let path = std::path::Path::new(&dir);
                Ok::<_, std::io::Error>((
                    crate::ai::kb::read_dir(path)?,
                    crate::ai::kb::folder_stamp(path)?,
                ))
            })
            .await;
            match read {
                Ok(Ok((docs, s))) => {
                    documents.extend(docs);
                    stamp = Some(s);
                }
                Ok(Err(e)) => tracing::error!(domain, error = %e, "knowledge folder unreadable"),
                Err(_) => {}
            }
        }
        match self.chat.store().documents(domain).await {
            Ok(docs) => documents.extend(docs.into_iter().map(|(n, t, _)| (n, t))),
            Err(e) => tracing::error!(domain, error = %e, "uploaded knowledge unreadable"),
        }
        let kb = if documents.is_empty() {
            None
        } else {
            let kb = tokio::task::spawn_blocking(move || KnowledgeBase::new(documents))
                .await
                .ok()
                .map(Arc::new);
            if let Some(kb) = &kb {
                let (docs, passages) = kb.size();
                tracing::info!(domain, docs, passages, "knowledge base indexed");
            }
            kb
        };
        let chain = config
            .providers
            .iter()
            .filter_map(|name| {
                let slot = self.slots.get(name);
                if slot.is_none() {
                    tracing::warn!(domain, provider = %name, "bot names an unknown provider; skipped");
                }
                slot.cloned()
            })
            .collect();
        let bot = Arc::new(Bot {
            config,
            chain,
            kb,
            uploads,
            folder: Mutex::new((stamp, Instant::now())),
        });
        self.bots.insert(domain.to_owned(), Arc::clone(&bot));
        Some(bot)
    }

    /// Whether `bot`'s knowledge folder is as it was indexed (checked at most every
    /// `knowledge_check_secs`).
    async fn folder_unchanged(&self, bot: &Bot) -> bool {
        let Some(dir) = bot
            .config
            .knowledge_dir
            .clone()
            .filter(|d| d != BUILTIN_DEMO_KNOWLEDGE)
        else {
            return true;
        };
        let known = {
            let mut folder = bot.folder.lock();
            if folder.1.elapsed() < Duration::from_secs(bot.config.knowledge_check_secs) {
                return true;
            }
            folder.1 = Instant::now();
            folder.0
        };
        let now = tokio::task::spawn_blocking(move || {
            crate::ai::kb::folder_stamp(std::path::Path::new(&dir)).ok()
        })
        .await
        .ok()
        .flatten();
        now == known
    }

    /// Whether a domain has uploaded knowledge documents: asked of the store again after a
    /// change on this node, or [`UPLOADS_RECHECK`] after the last answer (a change made
    /// through another node).
    async fn has_uploads(&self, domain: &str) -> bool {
        let version = self.uploads.get(domain).map_or(0, |v| *v);
        if let Some(known) = self.upload_presence.get(domain)
            && known.0 == version
            && known.2.elapsed() < UPLOADS_RECHECK
        {
            return known.1;
        }
        let has = match self.chat.store().documents(domain).await {
            Ok(docs) => !docs.is_empty(),
            Err(e) => {
                tracing::warn!(domain, error = %e, "cannot tell whether the domain has documents");
                false
            }
        };
        self.upload_presence
            .insert(domain.to_owned(), (version, has, Instant::now()));
        has
    }

    /// A domain's uploaded knowledge documents: (name, bytes, updated), for administrators.
    pub async fn documents(
        &self,
        caller: &Identity,
        domain: &str,
    ) -> Result<Vec<(String, usize, chrono::DateTime<chrono::Utc>)>, ServiceError> {
        self.document_access(caller, domain)?;
        let docs = self.chat.store().documents(domain).await?;
        Ok(docs
            .into_iter()
            .map(|(n, t, at)| (n, t.len(), at))
            .collect())
    }

    /// Adds or replaces an uploaded knowledge document; the domain's knowledge base is
    /// re-indexed on its next question. True when it was new.
    pub async fn put_document(
        &self,
        caller: &Identity,
        domain: &str,
        name: &str,
        text: String,
    ) -> Result<bool, ServiceError> {
        self.document_access(caller, domain)?;
        if !crate::ai::kb::valid_document_name(name) {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidDocumentName,
                "a document name is 1-128 characters of A-Z a-z 0-9 . _ - ending in .md, .markdown or .txt",
            ));
        }
        if text.trim().is_empty() {
            return Err(ServiceError::invalid(
                ErrorCode::EmptyDocument,
                "the document is empty",
            ));
        }
        let existed = self
            .chat
            .store()
            .documents(domain)
            .await?
            .iter()
            .any(|(n, _, _)| n == name);
        self.chat
            .store()
            .change_domains(crate::store::DomainChange::PutDocument {
                domain_id: domain.to_owned(),
                name: name.to_owned(),
                text,
            })
            .await?;
        *self.uploads.entry(domain.to_owned()).or_insert(0) += 1;
        Ok(!existed)
    }

    /// Deletes an uploaded knowledge document.
    pub async fn remove_document(
        &self,
        caller: &Identity,
        domain: &str,
        name: &str,
    ) -> Result<(), ServiceError> {
        self.document_access(caller, domain)?;
        let removed = self
            .chat
            .store()
            .change_domains(crate::store::DomainChange::RemoveDocument {
                domain_id: domain.to_owned(),
                name: name.to_owned(),
            })
            .await?;
        if removed == 0 {
            return Err(ServiceError::NotFound {
                code: ErrorCode::DocumentNotFound,
                message: format!("domain {domain:?} has no document {name:?}"),
            });
        }
        *self.uploads.entry(domain.to_owned()).or_insert(0) += 1;
        Ok(())
    }

    fn document_access(&self, caller: &Identity, domain: &str) -> Result<(), ServiceError> {
        if !crate::auth::policy::may_manage_domains(caller) {
            return Err(ServiceError::Forbidden(
                "managing knowledge needs an admin key".into(),
            ));
        }
        if self.domains.load().get(domain).is_none() {
            return Err(ServiceError::NotFound {
                code: ErrorCode::DomainNotFound,
                message: format!("no domain {domain:?}"),
            });
        }
        Ok(())
    }

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

    /// Reacts to a committed message: a visitor's message in a support room of a domain
    /// with a bot gets a reply, cancelling one still in progress there. `judged_at` is when
    /// the caller found the room with the bot: if the room was stopped ([`Self::stop`]: an
    /// agent took it, here or on another node) after that, no reply starts.
    pub async fn on_committed(self: &Arc<Self>, message: Arc<Message>, judged_at: Instant) {
        // A human agent answering takes over: the assistant stops mid-reply.
        if message.author.role == Role::Agent.as_str() {
            self.stop(&message.room);
            return;
        }
        if !crate::model::is_visitor_label(&message.author.role)
            || message.room.room_id.starts_with(CONVERSATION_PREFIX)
        {
            return;
        }
        // Nobody in the room (on this node) would read the reply.
        if !self.chat.hub().is_active(&message.room) {
            return;
        }
        let Some(bot) = self.bot(&message.room.domain_id).await else {
            return;
        };
        let address = self
            .spending
            .visitor_address(&message.room.domain_id, &message.author.user_id);
        let admitted = match self
            .admit(
                &bot,
                &message.room.domain_id,
                &message.author.user_id,
                true,
                address,
            )
            .await
        {
            Ok(admitted) => admitted,
            Err(e) => {
                // Say so once a minute per visitor, not after every message.
                let key = format!("{}/{}", message.room.domain_id, message.author.user_id);
                let now = Instant::now();
                let quiet = self
                    .notices
                    .get(&key)
                    .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(60));
                if quiet {
                    return;
                }
                self.notices.insert(key, now);
                self.notices
                    .retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
                let text = match e.code() {
                    ErrorCode::BudgetExceeded => {
                        "The assistant has reached today's limit. A human agent can still help."
                    }
                    _ => {
                        "You're sending messages faster than the assistant can answer. Please wait a moment."
                    }
                };
                self.store_system(
                    &message.room,
                    text,
                    serde_json::json!({ "error": e.code() }),
                )
                .await;
                return;
            }
        };
        // A shutdown stops the reply like an agent taking over: its text so far is stored.
        let cancel = self.supervisor.shutdown().child_token();
        let partial = Arc::new(Mutex::new(Partial {
            message_id: Arc::from(format!("ai-{}", uuid::Uuid::now_v7().simple())),
            ..Partial::default()
        }));
        let previous = self.generations.insert(
            message.room.clone(),
            Generation {
                cancel: cancel.clone(),
                partial: Arc::clone(&partial),
            },
        );
        if let Some(previous) = previous {
            previous.cancel.cancel();
        }
        // Registered now, so a later stop reaches it; one that came while this was being
        // decided is seen here.
        if self
            .stopped
            .get(&message.room)
            .is_some_and(|at| *at >= judged_at)
        {
            cancel.cancel();
            self.generations
                .remove_if(&message.room, |_, g| g.cancel.is_cancelled());
            return;
        }
        let this = Arc::clone(self);
        self.supervisor.spawn_isolated("ai-reply", async move {
            this.answer_in_room(&bot, &message, cancel, partial, admitted)
                .await;
        });
    }

    /// Streams the bot's reply into the room, then stores it.
    async fn answer_in_room(
        &self,
        bot: &Arc<Bot>,
        question: &Message,
        cancel: CancellationToken,
        partial: Arc<Mutex<Partial>>,
        admitted: Admitted,
    ) {
        let room = question.room.clone();
        let turns = match self
            .chat
            .store()
            .messages_before(&room, question.seq + 1, bot.config.history_messages)
            .await
        {
            Ok(history) => history_turns(&history),
            Err(e) => {
                tracing::warn!(room = %room, error = %e, "cannot read the room for the bot");
                vec![Turn {
                    speaker: Speaker::User,
                    text: question.content.clone(),
                }]
            }
        };
        let meter = self.meter(
            &room.domain_id,
            Some(&room),
            Some(&question.author.user_id),
            admitted,
        );
        // With hand-off on, the model may ask for a human itself (see `HandoffMarker`).
        let handoff = self
            .domains
            .load()
            .get(&room.domain_id)
            .map(|d| d.settings.handoff.clone())
            .filter(|h| h.enabled);
        let context = handoff.as_ref().map(|_| HANDOFF_INSTRUCTION);
        let mut events = self.generate_with(bot, turns, None, context, meter);
        let mut marker = HandoffMarker::default();
        let mut provider = String::new();
        let mut model = String::new();
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => None,
                e = events.recv() => e,
            };
            let hub = self.chat.hub();
            // Nobody left to read it: stop as if cancelled.
            let event = event.filter(|_| hub.is_active(&room));
            match event {
                None => {
                    let text = std::mem::take(&mut partial.lock().text);
                    if !text.is_empty() {
                        let id = partial.lock().message_id.clone();
                        self.store_reply(&room, &id, text, &provider, &model, None, true)
                            .await;
                    }
                    break;
                }
                Some(AiEvent::Started {
                    provider: p,
                    model: m,
                }) => {
                    provider = p;
                    model = m;
                }
                Some(AiEvent::Text(delta)) => {
                    let delta = marker.filter(&delta);
                    if delta.is_empty() {
                        continue;
                    }
                    let (message_id, index) = {
                        let mut p = partial.lock();
                        p.text.push_str(&delta);
                        let index = p.index.map_or(0, |i| i + 1);
                        p.index = Some(index);
                        (Arc::clone(&p.message_id), index)
                    };
                    hub.broadcast(
                        &room,
                        HubEvent::Delta {
                            room: room.clone(),
                            message_id,
                            delta,
                            index,
                        },
                        None,
                    );
                }
                Some(AiEvent::Fallback {
                    provider: failed,
                    error,
                    after_text,
                }) => {
                    if after_text {
                        // The incomplete reply is kept, marked, and a new one begins.
                        let (id, text) = {
                            let mut p = partial.lock();
                            let id = std::mem::replace(
                                &mut p.message_id,
                                Arc::from(format!("ai-{}", uuid::Uuid::now_v7().simple())),
                            );
                            p.index = None;
                            (id, std::mem::take(&mut p.text))
                        };
                        self.store_reply(&room, &id, text, &provider, &model, None, true)
                            .await;
                    }
                    self.store_system(
                        &room,
                        "The assistant had a problem; trying another way to answer.",
                        serde_json::json!({ "fallbackFrom": failed, "error": error }),
                    )
                    .await;
                }
                Some(AiEvent::Done {
                    provider,
                    model,
                    reason,
                    usage,
                    sources,
                }) => {
                    let (id, text) = {
                        let mut p = partial.lock();
                        p.text.push_str(&marker.finish());
                        let text = std::mem::take(&mut p.text);
                        let text = if marker.seen {
                            text.trim_end().to_owned()
                        } else {
                            text
                        };
                        (Arc::clone(&p.message_id), text)
                    };
                    let mut extra = serde_json::json!({
                        "finishReason": finish_label(&reason),
                        "usage": { "promptTokens": usage.prompt_tokens,
                                   "completionTokens": usage.completion_tokens },
                    });
                    if !sources.is_empty() {
                        extra["sources"] = serde_json::json!(sources);
                    }
                    if let (true, Some(h)) = (marker.seen, &handoff)
                        && let serde_json::Value::Object(action) = escalate_action(&h.action_label)
                    {
                        for (k, v) in action {
                            extra[k] = v;
                        }
                    }
                    self.store_reply(&room, &id, text, &provider, &model, Some(extra), false)
                        .await;
                    break;
                }
                Some(AiEvent::NoAnswer) => {
                    // The bot's own offer, so it is the assistant's message; with the button
                    // only where agents can be reached. Offered once per conversation: asked
                    // again, a visitor who did not take it would only be pushed away.
                    let (text, mut data) = if self.offered_human(question).await {
                        (REPHRASE, serde_json::json!({}))
                    } else {
                        (
                            "I can't answer that right now. Would you like to talk to a human agent?",
                            handoff.as_ref().map_or_else(
                                || serde_json::json!({ "offerHuman": true }),
                                |h| escalate_action(&h.action_label),
                            ),
                        )
                    };
                    data["noAnswer"] = true.into();
                    self.post(&room, "assistant", text.to_owned(), None, data)
                        .await;
                    break;
                }
            }
        }
        // Forget this generation unless a newer one replaced it.
        self.generations
            .remove_if(&room, |_, g| Arc::ptr_eq(&g.partial, &partial));
    }

    /// Whether the assistant has offered a human in `question`'s conversation before it: a
    /// message of the assistant with `data.offerHuman` since the room's last change of
    /// hand-off status (a resolved and reopened room is a new conversation), among its
    /// latest [`OFFER_LOOKBACK`] messages. The visitor's explicit request for a person,
    /// answered with the same offer, counts too. When the store cannot tell, it says no,
    /// so an unreadable store costs a repeated offer, never a missing one.
    async fn offered_human(&self, question: &Message) -> bool {
        let store = self.chat.store();
        let since = match store.conversation(&question.room).await {
            Ok(conversation) => conversation.map_or(0, |c| c.status_seq),
            Err(e) => {
                tracing::warn!(room = %question.room, error = %e, "cannot read the room's status");
                return false;
            }
        };
        match store
            .messages_before(&question.room, question.seq, OFFER_LOOKBACK)
            .await
        {
            Ok(recent) => recent.iter().any(|m| {
                m.seq > since
                    && m.author.role == "assistant"
                    && m.data
                        .as_ref()
                        .and_then(|d| d.get("offerHuman"))
                        .and_then(serde_json::Value::as_bool)
                        == Some(true)
            }),
            Err(e) => {
                tracing::warn!(room = %question.room, error = %e, "cannot read the room for the bot");
                false
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_reply(
        &self,
        room: &RoomKey,
        id: &str,
        text: String,
        provider: &str,
        model: &str,
        extra: Option<serde_json::Value>,
        interrupted: bool,
    ) {
        if text.trim().is_empty() {
            return;
        }
        let mut data = serde_json::json!({ "provider": provider, "model": model });
        if interrupted {
            data["interrupted"] = true.into();
        }
        if let Some(serde_json::Value::Object(extra)) = extra {
            for (k, v) in extra {
                data[k] = v;
            }
        }
        self.post(room, "assistant", text, Some(id.to_owned()), data)
            .await;
    }

    async fn store_system(&self, room: &RoomKey, text: &str, data: serde_json::Value) {
        self.post(room, "system", text.to_owned(), None, data).await;
    }

    async fn post(
        &self,
        room: &RoomKey,
        role: &str,
        text: String,
        client_message_id: Option<String>,
        data: serde_json::Value,
    ) {
        let assistant = assistant_identity(&self.domains, &room.domain_id);
        let mut text = text;
        let max = self.chat.limits().max_message_bytes;
        if text.len() > max {
            let mut cut = max;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let out = Outgoing {
            room_id: &room.room_id,
            text,
            client_message_id,
            role: Some(role),
            display_name: None,
            data: Some(data),
        };
        if let Err(e) = self.chat.send(&assistant, out).await {
            tracing::warn!(room = %room, error = %e, "cannot store the assistant's message");
        }
    }
}

/// What the model is told so it can hand over by itself.
const HANDOFF_INSTRUCTION: &str = "If the visitor asks to talk to a person, or you cannot help \
     them, say so briefly and end your reply with the marker [handoff]; the visitor will then \
     be offered a human agent.";

/// Takes the `[handoff]` marker out of a streamed reply, even when it arrives split over
/// several deltas: text that could be the start of the marker is held back until the next
/// delta shows whether it is.
#[derive(Debug, Default)]
struct HandoffMarker {
    held: String,
    seen: bool,
}

impl HandoffMarker {
    const MARKER: &'static str = "[handoff]";

    /// The part of `delta` that can be shown now.
    fn filter(&mut self, delta: &str) -> String {
        self.held.push_str(delta);
        // Models do not always keep the case: `[HANDOFF]` and `[Handoff]` count too. ASCII
        // lowercasing keeps every byte offset.
        while let Some(at) = self.held.to_ascii_lowercase().find(Self::MARKER) {
            self.held.replace_range(at..at + Self::MARKER.len(), "");
            self.seen = true;
        }
        // Hold back the longest tail that is a beginning of the marker.
        let keep = (1..Self::MARKER.len())
            .rev()
            .find(|&n| {
                self.held.len() >= n
                    && self.held.is_char_boundary(self.held.len() - n)
                    && Self::MARKER[..n].eq_ignore_ascii_case(&self.held[self.held.len() - n..])
            })
            .unwrap_or(0);
        let shown = self.held.len() - keep;
        let out = self.held[..shown].to_owned();
        self.held.replace_range(..shown, "");
        out
    }

    /// What is still held at the end of the reply.
    fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.held);
        rest.trim_end().to_owned()
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

/// `chain` with the provider `model` asks for first (see [`AiService::generate`]), and
/// the model name to use with it.
fn ordered_chain(chain: &[Arc<Slot>], model: Option<&str>) -> Vec<(Arc<Slot>, String)> {
    let mut ordered: Vec<(Arc<Slot>, String)> = chain
        .iter()
        .map(|s| (Arc::clone(s), s.model.clone()))
        .collect();
    let Some(wanted) = model.map(str::trim).filter(|m| !m.is_empty()) else {
        return ordered;
    };
    let kind_of = |m: &str| -> Option<&'static str> {
        let m = m.to_ascii_lowercase();
        match m.as_str() {
            "openai" => Some("openai"),
            "google" | "gemini" => Some("gemini"),
            "anthropic" | "claude" => Some("anthropic"),
            _ if m.starts_with("gpt-")
                || m.starts_with("o1")
                || m.starts_with("o3")
                || m.starts_with("o4") =>
            {
                Some("openai")
            }
            _ if m.starts_with("gemini-") => Some("gemini"),
            _ if m.starts_with("claude-") => Some("anthropic"),
            _ => None,
        }
    };
    let alias = matches!(
        wanted.to_ascii_lowercase().as_str(),
        "openai" | "google" | "gemini" | "anthropic" | "claude"
    );
    let pick = ordered
        .iter()
        .position(|(s, _)| s.name == wanted)
        .or_else(|| {
            let kind = kind_of(wanted)?;
            ordered.iter().position(|(s, _)| s.provider.kind() == kind)
        });
    if let Some(i) = pick {
        let (slot, mut m) = ordered.remove(i);
        if !alias && slot.name != wanted {
            wanted.clone_into(&mut m);
        }
        ordered.insert(0, (slot, m));
    }
    ordered
}

/// Runs the fallback chain, reporting on `tx`; returns early when `tx` is closed.
async fn run_chain(
    bot: &Bot,
    chain: &[(Arc<Slot>, String)],
    system: Option<String>,
    turns: Vec<Turn>,
    tx: &mpsc::Sender<AiEvent>,
    meter: &Meter,
) {
    for (slot, model) in chain {
        if slot.is_open() {
            if tx
                .send(AiEvent::Fallback {
                    provider: slot.name.clone(),
                    error: "circuit_open",
                    after_text: false,
                })
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        let request = ChatRequest {
            model: model.clone(),
            system: system.clone(),
            turns: turns.clone(),
            max_tokens: slot.max_tokens,
            temperature: None,
        };
        match attempt(
            &*slot.provider,
            &slot.name,
            &request,
            slot.timeouts,
            slot.retries,
            tx,
            meter,
        )
        .await
        {
            Attempt::Done => {
                slot.record(true);
                return;
            }
            Attempt::Closed => return,
            Attempt::Failed { error, after_text } => {
                slot.record(false);
                tracing::warn!(provider = %slot.name, error = %error, "AI provider failed; falling back");
                if tx
                    .send(AiEvent::Fallback {
                        provider: slot.name.clone(),
                        error: error.label(),
                        after_text,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    if let Some(kb) = &bot.kb {
        let provider = KbProvider::new(Arc::clone(kb));
        let request = ChatRequest {
            model: "kb".to_owned(),
            system: None,
            turns,
            max_tokens: 0,
            temperature: None,
        };
        match attempt(&provider, "kb", &request, Timeouts::default(), 0, tx, meter).await {
            Attempt::Done | Attempt::Closed => return,
            Attempt::Failed { .. } => {}
        }
    }
    let _ = tx.send(AiEvent::NoAnswer).await;
}

enum Attempt {
    Done,
    Closed,
    Failed {
        error: ProviderError,
        after_text: bool,
    },
}

/// Where a generation's provider calls are recorded: usage rows, metrics, the domain's
/// daily token count.
#[derive(Debug, Clone)]
pub struct Meter {
    /// What let the call in: the visitor's address (charged the tokens) and the domain's
    /// running-call place, given back when the call ends.
    admitted: Arc<Admitted>,
    spending: Arc<Spending>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    spent: Arc<DashMap<String, DaySpend>>,
    shared: Shared,
    domain: String,
    room: Option<String>,
    user: Option<String>,
    supervisor: Supervisor,
}

/// What lets one AI call in (see [`AiService::admit`]): the asking visitor's address, which
/// is charged the call's tokens, and the call's place among its domain's running calls.
#[derive(Debug)]
struct Admitted {
    address: Option<std::net::IpAddr>,
    _running: tokio::sync::OwnedSemaphorePermit,
}

/// What callers without an account may make the assistant spend, per address (an IPv6
/// address by its /64): requests per minute (across the cluster, like the other per-address
/// limits) and tokens per minute (on each node), and how many calls each domain may have
/// running at once. A token-less caller is a new visitor on every request, so these, not
/// the per-visitor limit, are what bound the bill a stranger can run up.
#[derive(Debug)]
struct Spending {
    requests: DefaultKeyedRateLimiter<std::net::IpAddr>,
    requests_per_minute: u32,
    /// Tokens each address spent in its current one-minute window (window start, tokens).
    tokens: DashMap<std::net::IpAddr, (Instant, u64)>,
    tokens_per_minute: u64,
    /// Calls running per domain.
    running: DashMap<String, Arc<tokio::sync::Semaphore>>,
    max_running: usize,
    /// Where each visitor on this node last wrote from (`domain/user`), with when it was
    /// noted, so that the bot's replies in rooms are charged to an address too.
    visitors: DashMap<String, (std::net::IpAddr, Instant)>,
}

/// The length of a per-address token window.
const TOKEN_WINDOW: Duration = Duration::from_secs(60);
/// How long a visitor's address is remembered after it was last noted.
const VISITOR_ADDRESS_TTL: Duration = Duration::from_secs(3600);

impl Spending {
    fn new(limits: &crate::config::Limits) -> Self {
        let rate = NonZeroU32::new(limits.ip_ai_requests_per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            requests: RateLimiter::keyed(Quota::per_minute(rate)),
            requests_per_minute: rate.get(),
            tokens: DashMap::new(),
            tokens_per_minute: limits.ip_ai_tokens_per_minute,
            running: DashMap::new(),
            max_running: limits.ai_calls_per_domain,
            visitors: DashMap::new(),
        }
    }

    /// Charges one request to `ip` and checks its tokens this minute.
    async fn admit_address(
        &self,
        ip: std::net::IpAddr,
        shared: &Shared,
    ) -> Result<(), ServiceError> {
        let ip = crate::transport::edge::ip_key(ip);
        let now = Instant::now();
        if let Some(window) = self.tokens.get(&ip)
            && now.duration_since(window.0) < TOKEN_WINDOW
            && window.1 >= self.tokens_per_minute
        {
            let per_minute = self.tokens_per_minute;
            return Err(ServiceError::Limited {
                code: ErrorCode::RateLimited,
                message: format!(
                    "questions from this address used their {per_minute} AI tokens for this minute; slow down"
                ),
                retry_after: TOKEN_WINDOW.saturating_sub(now.duration_since(window.0)),
            });
        }
        let rate = self.requests_per_minute;
        let local = self
            .requests
            .check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()));
        let checked = match local {
            Ok(()) => {
                shared
                    .take("ai-address", &ip.to_string(), Rate::per_minute(rate))
                    .await
            }
            Err(wait) => Err(wait),
        };
        checked.map_err(|wait| ServiceError::Limited {
            code: ErrorCode::RateLimited,
            message: format!(
                "more than {rate} questions to the assistant per minute from this address; slow down"
            ),
            retry_after: wait,
        })
    }

    /// Adds a call's tokens to `ip`'s minute.
    fn spent(&self, ip: std::net::IpAddr, tokens: u64) {
        let ip = crate::transport::edge::ip_key(ip);
        let now = Instant::now();
        let mut window = self.tokens.entry(ip).or_insert((now, 0));
        if now.duration_since(window.0) >= TOKEN_WINDOW {
            *window = (now, 0);
        }
        window.1 += tokens;
    }

    /// A place among `domain`'s running calls, if one is free.
    fn start_call(&self, domain: &str) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        let running = Arc::clone(
            self.running
                .entry(domain.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.max_running)))
                .value(),
        );
        running.try_acquire_owned().map_err(|_| {
            let max = self.max_running;
            ServiceError::Limited {
                code: ErrorCode::RateLimited,
                message: format!(
                    "this domain's assistant is already answering its limit of {max} questions at once; ask again in a moment"
                ),
                retry_after: Duration::from_secs(1),
            }
        })
    }

    /// Notes that `user` of `domain` is writing from `ip` (once a minute per visitor at
    /// most, so a chatty visitor costs a lookup per message, not a write).
    fn note_visitor(&self, domain: &str, user: &str, ip: std::net::IpAddr) {
        let key = format!("{domain}/{user}");
        let now = Instant::now();
        let fresh = self
            .visitors
            .get(&key)
            .is_some_and(|v| v.0 == ip && now.duration_since(v.1) < Duration::from_secs(60));
        if !fresh {
            self.visitors.insert(key, (ip, now));
        }
    }

    /// Where `user` of `domain` was last noted connecting from (on this node).
    fn visitor_address(&self, domain: &str, user: &str) -> Option<std::net::IpAddr> {
        self.visitors
            .get(&format!("{domain}/{user}"))
            .filter(|v| v.1.elapsed() < VISITOR_ADDRESS_TTL)
            .map(|v| v.0)
    }

    /// Forgets addresses and visitors that went quiet.
    fn forget_idle(&self) {
        let now = Instant::now();
        self.tokens
            .retain(|_, w| now.duration_since(w.0) < TOKEN_WINDOW);
        self.visitors
            .retain(|_, v| now.duration_since(v.1) < VISITOR_ADDRESS_TTL);
        self.requests.retain_recent();
        self.requests.shrink_to_fit();
        self.running
            .retain(|_, s| s.available_permits() < self.max_running);
    }
}

/// How long a domain's daily token counter lives in Redis (past its day, for late calls).
const DAY_COUNTER_TTL: Duration = Duration::from_secs(2 * 24 * 3600);

/// The cluster counter of the tokens `domain` used on `day`.
fn day_key(domain: &str, day: chrono::NaiveDate) -> String {
    format!("ai-tokens:{domain}:{day}")
}

/// Tokens a domain used on one UTC day (on this node, plus what the store had when the
/// count started).
#[derive(Debug, Clone, Copy)]
struct DaySpend {
    day: chrono::NaiveDate,
    tokens: u64,
}

impl Meter {
    /// Records one call: a usage row (written in the background, so a slow store never
    /// holds up a reply), metrics and the day's token count.
    fn record(&self, call: &Call<'_>, usage: Usage, outcome: &'static str) {
        let provider = call.provider.to_owned();
        let took = call.started.elapsed();
        let m = &self.metrics;
        m.ai_calls
            .get_or_create(&AiCallLabel {
                provider: provider.clone(),
                outcome,
            })
            .inc();
        let label = ProviderLabel {
            provider: provider.clone(),
        };
        m.ai_duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if let Some(first) = call.first_token {
            m.ai_first_token
                .get_or_create(&label)
                .observe(first.as_secs_f64());
        }
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            m.ai_tokens
                .get_or_create(&AiTokenLabel {
                    provider: provider.clone(),
                    kind,
                })
                .inc_by(n);
        }
        let tokens = usage.prompt_tokens + usage.completion_tokens;
        if let Some(ip) = self.admitted.address {
            self.spending.spent(ip, tokens);
        }
        let today = chrono::Utc::now().date_naive();
        if let Some(mut spend) = self.spent.get_mut(&self.domain) {
            if spend.day == today {
                spend.tokens += tokens;
            } else {
                *spend = DaySpend { day: today, tokens };
            }
        }
        let record = UsageRecord {
            domain_id: self.domain.clone(),
            room_id: self.room.clone(),
            user_id: self.user.clone(),
            provider,
            model: call.model.to_owned(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            latency_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            outcome: outcome.to_owned(),
            created_at: chrono::Utc::now(),
        };
        if self.shared.is_cluster() && tokens > 0 {
            let shared = self.shared.clone();
            let key = day_key(&self.domain, today);
            self.supervisor.spawn_isolated("ai-usage", async move {
                shared.add(&key, tokens).await;
            });
        }
        let store = Arc::clone(&self.store);
        self.supervisor.spawn_isolated("ai-usage", async move {
            if let Err(e) = store.record_usage(record).await {
                tracing::warn!(error = %e, "cannot record AI usage");
            }
        });
    }
}

/// One try of one provider.
struct Call<'a> {
    provider: &'a str,
    model: &'a str,
    started: Instant,
    first_token: Option<Duration>,
}

/// One provider, with retries while nothing has been said. Every try is metered.
async fn attempt(
    provider: &dyn Provider,
    name: &str,
    request: &ChatRequest,
    timeouts: Timeouts,
    retries: u32,
    tx: &mpsc::Sender<AiEvent>,
    meter: &Meter,
) -> Attempt {
    let mut tries = 0;
    loop {
        let mut call = Call {
            provider: name,
            model: &request.model,
            started: Instant::now(),
            first_token: None,
        };
        let mut sources = Vec::new();
        let result = match crate::ai::timed(provider, request, timeouts).await {
            Err(e) => Err(e),
            Ok(mut stream) => loop {
                match stream.next().await {
                    Some(Ok(Event::Sources(s))) => sources.extend(s),
                    Some(Ok(Event::Text(t))) => {
                        if call.first_token.is_none() {
                            call.first_token = Some(call.started.elapsed());
                            let started = AiEvent::Started {
                                provider: name.to_owned(),
                                model: request.model.clone(),
                            };
                            if tx.send(started).await.is_err() {
                                meter.record(&call, Usage::default(), "cancelled");
                                return Attempt::Closed;
                            }
                        }
                        if tx.send(AiEvent::Text(t)).await.is_err() {
                            meter.record(&call, Usage::default(), "cancelled");
                            return Attempt::Closed;
                        }
                    }
                    Some(Ok(Event::Finish { reason, usage })) => {
                        if call.first_token.is_none() {
                            // An empty answer is no answer.
                            break Err(ProviderError::NoAnswer);
                        }
                        meter.record(&call, usage, "ok");
                        let done = AiEvent::Done {
                            provider: name.to_owned(),
                            model: request.model.clone(),
                            reason,
                            usage,
                            sources: std::mem::take(&mut sources),
                        };
                        return if tx.send(done).await.is_err() {
                            Attempt::Closed
                        } else {
                            Attempt::Done
                        };
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Err(ProviderError::Unavailable("stream ended".into())),
                }
            },
        };
        let error = match result {
            Ok(()) => return Attempt::Done,
            Err(e) => e,
        };
        meter.record(&call, Usage::default(), error.label());
        let after_text = call.first_token.is_some();
        if after_text || !error.retryable() || tries >= retries || tx.is_closed() {
            return Attempt::Failed { error, after_text };
        }
        tries += 1;
        let wait = match &error {
            ProviderError::RateLimited {
                retry_after: Some(d),
                ..
            } => (*d).min(MAX_BACKOFF),
            _ => Duration::from_millis(250 * 2u64.pow(tries.min(5))),
        };
        tracing::info!(provider = %name, error = %error, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "retrying AI provider");
        tokio::time::sleep(wait).await;
    }
}

fn build_provider(p: &ProviderConfig) -> Result<Arc<dyn Provider>, ServiceError> {
    let endpoint = Endpoint {
        base_url: p
            .base_url
            .clone()
            .unwrap_or_else(|| p.kind.default_base_url().to_owned()),
        api_key: p.api_key.clone(),
    };
    let built: Result<Arc<dyn Provider>, ProviderError> = match p.kind {
        ProviderKind::Openai => OpenAi::new(endpoint).map(|c| Arc::new(c) as Arc<dyn Provider>),
        ProviderKind::Anthropic => {
            Anthropic::new(endpoint).map(|c| Arc::new(c) as Arc<dyn Provider>)
        }
        ProviderKind::Gemini => Gemini::new(endpoint).map(|c| Arc::new(c) as Arc<dyn Provider>),
    };
    built.map_err(|e| ServiceError::invalid(ErrorCode::InvalidProvider, e.to_string()))
}

/// The wire name of a finish reason.
pub fn finish_label(reason: &FinishReason) -> &str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Other(other) => other,
    }
}

#[cfg(test)]
mod tests {
    use super::HandoffMarker;

    #[test]
    fn the_handoff_marker_is_taken_out_even_when_split() {
        let mut m = HandoffMarker::default();
        let mut shown = String::new();
        for d in ["Let me get ", "you a person. [hand", "off", "]"] {
            shown.push_str(&m.filter(d));
        }
        shown.push_str(&m.finish());
        assert_eq!(shown.trim_end(), "Let me get you a person.");
        assert!(m.seen);

        let mut m = HandoffMarker::default();
        let mut shown = m.filter("arrays [1, 2] and [h");
        shown.push_str(&m.filter("ello]"));
        shown.push_str(&m.finish());
        assert_eq!(shown, "arrays [1, 2] and [hello]");
        assert!(!m.seen);

        // Whatever the case the model wrote it in; text around it keeps its case.
        let mut m = HandoffMarker::default();
        let mut shown = m.filter("Ça va. [HAND");
        shown.push_str(&m.filter("Off] Über"));
        shown.push_str(&m.finish());
        assert_eq!(shown, "Ça va.  Über");
        assert!(m.seen);
    }
}
