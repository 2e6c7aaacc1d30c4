//! Guided sessions: a signed-in user answers a template's questions one at a time, may
//! leave and come back to the same point, and ends with a document only they can read
//! (seed 003, the Largence `/chat` service). This module is the service; `/chat` is its
//! transport.
//!
//! Design:
//! - **Templates** ([`template`]) are per domain: questions with their checks, and a
//!   Markdown document with `{{question_id}}` placeholders. They come from files the config
//!   names and from the admin API, are checked whole when loaded (a placeholder naming no
//!   question, two questions with one id, a pattern that does not compile), and are then
//!   immutable values: a session keeps the template version it started with.
//! - **A session** is one (user, template) pair with at most one incomplete session. Its
//!   state is the history of questions asked and answers given; it is written to the store
//!   after every message and before anything is sent back, so a crash between two answers
//!   loses nothing that was acknowledged.
//! - **Who asks the next question** is either the domain's AI service (the seed's contract,
//!   `POST {url}/v1/chat/next-question {sessionId}`), with retries with back-off on 5xx and
//!   network errors, or the built-in guide: the template's questions in order, each answer
//!   checked ([`template::Question::check`]), an invalid one asked again with the reason,
//!   and the document rendered from the answers ([`template::Template::render`]).
//! - **Last connection wins** across nodes through the existing cluster claim: a second
//!   connection for the same session takes it over and the first is closed.
//! - **Cleanup** of incomplete sessions untouched for `sessions.stale_after` runs on one
//!   node at a time under a lease.

pub mod guide;
pub mod remote;
pub mod template;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};

use self::remote::{Endpoint, Reply as ServiceReply};
use self::template::{MAX_ANSWER_CHARS, Template, TemplateError};
use super::ServiceError;
use super::ai::AiService;
use crate::auth::Domains;
use crate::config::{Config, SessionsConfig};
use crate::error_code::ErrorCode;
use crate::metrics::Metrics;
use crate::model::{Identity, Role};
use crate::store::Store;
use crate::store::guided::{
    GeneratedDocument, GuidedSession, NewDocument, NewSession, NewTurn, Pending, SessionQuery,
    SessionStatus, Speaker, Step, StoredTemplate, Turn,
};

/// The template the demo domain ships with, so that `cargo run` shows a guided session.
pub const DEMO_TEMPLATE: &str = include_str!("demo_template.json");

/// Reads of a session a connection makes to take it over from another that is still
/// writing to it.
const TAKE_OVER_ATTEMPTS: usize = 5;

/// Most turns (questions and answers) one session holds: 200 questions, each asked again
/// or followed up a few times.
pub const MAX_TURNS: u32 = 1000;

/// Most sessions or documents one list returns.
pub const MAX_LIST: usize = 200;

/// What the transport sends, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The session existed: everything said so far.
    Resumed {
        /// The session.
        session_id: String,
        /// Its turns.
        history: Vec<Turn>,
    },
    /// The question to answer now.
    Question {
        /// The session.
        session_id: String,
        /// The question's id.
        id: String,
        /// Its text.
        text: String,
        /// The template's question, for its hint and choices (none from an AI service).
        help: Option<String>,
        /// The answers taken, when the question lists them.
        choices: Option<Vec<String>>,
    },
    /// The document is ready; the connection closes after this.
    Complete {
        /// The session.
        session_id: String,
        /// The document.
        document_id: String,
    },
    /// Something the user should know; the connection stays open.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// In words for the user.
        message: String,
    },
}

impl Reply {
    /// The frame on the wire (seed 003's shapes, with `code` beside `message`).
    pub fn to_json(&self) -> Value {
        match self {
            Reply::Resumed {
                session_id,
                history,
            } => json!({
                "type": "session_resumed",
                "sessionId": session_id,
                "history": history.iter().map(turn_json).collect::<Vec<_>>(),
            }),
            Reply::Question {
                session_id,
                id,
                text,
                help,
                choices,
            } => {
                let mut question = json!({ "id": id, "text": text });
                if let Some(help) = help {
                    question["help"] = json!(help);
                }
                if let Some(choices) = choices {
                    question["choices"] = json!(choices);
                }
                json!({ "type": "next_question", "sessionId": session_id, "question": question })
            }
            Reply::Complete {
                session_id,
                document_id,
            } => json!({
                "type": "session_complete",
                "sessionId": session_id,
                "documentId": document_id,
            }),
            Reply::Error { code, message } => {
                json!({ "type": "error", "code": code, "message": message })
            }
        }
    }
}

/// A turn as the wire and the HTTP API show it.
pub fn turn_json(turn: &Turn) -> Value {
    let mut v = json!({
        "role": turn.speaker.as_str(),
        "content": turn.text,
        "timestamp": turn.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    if let Some(q) = &turn.question_id {
        v["questionId"] = json!(q);
    }
    v
}

/// Who asks a session's questions.
#[derive(Debug, Clone)]
enum Asker {
    /// Parlor's built-in guide, from the template.
    Guide,
    /// The domain's (or the template's) AI service.
    Service(Arc<Endpoint>),
}

/// A session a connection is driving.
#[derive(Debug)]
pub struct Live {
    session: GuidedSession,
    template: Arc<Template>,
    asker: Asker,
    /// The user (for the AI vendor's metering and limits).
    user_id: String,
    /// Whether the user is a visitor (whose AI questions per minute are limited).
    visitor: bool,
    /// Failed AI-service calls since the last success.
    failures: u32,
    /// When to call the AI service again on its own (after a failure it may retry).
    retry_at: Option<tokio::time::Instant>,
}

impl Live {
    /// When the AI service is to be called again without a message from the user.
    pub fn retry_at(&self) -> Option<tokio::time::Instant> {
        self.retry_at
    }

    /// Whether the session has ended.
    pub fn is_complete(&self) -> bool {
        self.session.status == SessionStatus::Complete
    }
}

/// Guided sessions (see the module header).
#[derive(Debug)]
pub struct SessionService {
    store: Arc<dyn Store>,
    domains: Arc<Domains>,
    ai: Arc<AiService>,
    config: SessionsConfig,
    /// Templates from the config's files, by domain and id.
    files: HashMap<String, BTreeMap<String, Arc<Template>>>,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
}

/// Why templates named in the config cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("domain {domain:?}: {message}")]
pub struct TemplateFileError {
    domain: String,
    message: String,
}

impl SessionService {
    /// The service, with the templates of `config`'s domains read from their files (and
    /// the demo domain's built-in one).
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        domains: Arc<Domains>,
        ai: Arc<AiService>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TemplateFileError> {
        let mut files: HashMap<String, BTreeMap<String, Arc<Template>>> = HashMap::new();
        for d in &config.domains {
            let fail = |message: String| TemplateFileError {
                domain: d.id.clone(),
                message,
            };
            let mut loaded = BTreeMap::new();
            if d.id == crate::config::DEMO_DOMAIN && d.templates.is_empty() {
                let t = Template::parse(DEMO_TEMPLATE).map_err(|e| fail(e.to_string()))?;
                loaded.insert(t.spec.id.clone(), Arc::new(t));
            }
            for pattern in &d.templates {
                let paths = expand(pattern).map_err(fail)?;
                for path in paths {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
                    let t = Template::parse(&text)
                        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
                    if loaded.contains_key(&t.spec.id) {
                        return Err(fail(format!(
                            "{}: another file already defines template {:?}",
                            path.display(),
                            t.spec.id
                        )));
                    }
                    loaded.insert(t.spec.id.clone(), Arc::new(t));
                }
            }
            if !loaded.is_empty() {
                files.insert(d.id.clone(), loaded);
            }
        }
        let client = reqwest::Client::builder()
            .connect_timeout(config.sessions.ai_service_timeout)
            .build()
            .map_err(|e| TemplateFileError {
                domain: String::new(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(Self {
            store,
            domains,
            ai,
            config: config.sessions.clone(),
            files,
            client,
            metrics,
        })
    }

    /// The store (for the cleanup job).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &SessionsConfig {
        &self.config
    }

    // --------------------------------------------------------------------------------
    // Templates
    // --------------------------------------------------------------------------------

    /// The template `id` of `domain`: a file's, else one added through the admin API.
    pub async fn template(
        &self,
        domain: &str,
        id: &str,
    ) -> Result<Option<Arc<Template>>, ServiceError> {
        if let Some(t) = self.files.get(domain).and_then(|m| m.get(id)) {
            return Ok(Some(Arc::clone(t)));
        }
        let Some(stored) = self.store.stored_template(domain, id).await? else {
            return Ok(None);
        };
        Template::parse(&stored.spec)
            .map(|t| Some(Arc::new(t)))
            .map_err(|e| {
                ServiceError::Unavailable(crate::store::StoreError::Corrupt(e.to_string()))
            })
    }

    /// Where template `id` of `domain` is defined: `config` (a file) or `api`.
    pub fn source_of(&self, domain: &str, id: &str) -> &'static str {
        if self.files.get(domain).is_some_and(|m| m.contains_key(id)) {
            "config"
        } else {
            "api"
        }
    }

    /// The template `id` for `identity` to open: the domain's, or, when the domain no longer
    /// has it, the one the user's session in progress began with (so that it can still be
    /// finished).
    pub async fn template_for(
        &self,
        identity: &Identity,
        id: &str,
    ) -> Result<Option<Arc<Template>>, ServiceError> {
        if let Some(t) = self.template(&identity.domain_id, id).await? {
            return Ok(Some(t));
        }
        let open = self
            .store
            .guided_sessions(SessionQuery {
                domain_id: identity.domain_id.to_string(),
                user_id: Some(identity.user_id.clone()),
                template_id: Some(id.to_owned()),
                status: Some(SessionStatus::InProgress),
                limit: 1,
            })
            .await?;
        Ok(open
            .first()
            .and_then(|s| Template::parse(&s.template).ok())
            .map(Arc::new))
    }

    /// Every template of `domain`, by id: its files' and the admin API's.
    pub async fn templates(&self, domain: &str) -> Result<Vec<Arc<Template>>, ServiceError> {
        let mut all: BTreeMap<String, Arc<Template>> =
            self.files.get(domain).cloned().unwrap_or_default();
        for stored in self.store.stored_templates(domain).await? {
            if all.contains_key(&stored.id) {
                continue;
            }
            match Template::parse(&stored.spec) {
                Ok(t) => {
                    all.insert(stored.id, Arc::new(t));
                }
                Err(e) => tracing::warn!(domain, error = %e, "a stored template is unreadable"),
            }
        }
        Ok(all.into_values().collect())
    }

    /// Creates or replaces a template through the admin API (`id` from the URL on a
    /// replace must match the body's); true when created. A template defined in a file
    /// of the config cannot be changed here.
    pub async fn put_template(
        &self,
        domain: &str,
        body: &Value,
        id: Option<&str>,
    ) -> Result<(bool, Arc<Template>), ServiceError> {
        if self.domains.load().get(domain).is_none() {
            return Err(ServiceError::NotFound {
                code: ErrorCode::DomainNotFound,
                message: format!("no domain {domain:?}"),
            });
        }
        // What the admin API shows beside a template may come back with it: `source` is
        // ignored, and `hasAiServiceApiKey: true` without a key keeps the stored key.
        let mut body = body.clone();
        let mut keep_key = false;
        if let Some(obj) = body.as_object_mut() {
            obj.remove("source");
            keep_key = obj.remove("hasAiServiceApiKey") == Some(Value::Bool(true))
                && !obj.contains_key("aiServiceApiKey");
        }
        let mut spec: template::TemplateSpec = serde_json::from_value(body).map_err(|e| {
            ServiceError::invalid(ErrorCode::InvalidTemplate, format!("not a template: {e}"))
        })?;
        if keep_key
            && let Some(stored) = self.store.stored_template(domain, &spec.id).await?
            && let Ok(previous) = serde_json::from_str::<template::TemplateSpec>(&stored.spec)
        {
            spec.ai_service_api_key = previous.ai_service_api_key;
        }
        if let Some(id) = id
            && id != spec.id
        {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidTemplate,
                format!("the body's id {:?} is not the URL's {id:?}", spec.id),
            ));
        }
        let t = Template::new(spec).map_err(|e: TemplateError| {
            ServiceError::invalid(ErrorCode::InvalidTemplate, e.message)
        })?;
        if self
            .files
            .get(domain)
            .is_some_and(|m| m.contains_key(&t.spec.id))
        {
            return Err(ServiceError::Conflict {
                code: ErrorCode::TemplateInConfig,
                message: format!(
                    "template {:?} comes from a file named in the config; change the file",
                    t.spec.id
                ),
            });
        }
        let spec = serde_json::to_string(&t.spec)
            .map_err(|e| ServiceError::invalid(ErrorCode::InvalidTemplate, e.to_string()))?;
        let created = self
            .store
            .put_template(StoredTemplate {
                domain_id: domain.to_owned(),
                id: t.spec.id.clone(),
                spec,
                updated_at: Utc::now(),
            })
            .await?;
        Ok((created, Arc::new(t)))
    }

    /// Removes a template added through the admin API.
    pub async fn delete_template(&self, domain: &str, id: &str) -> Result<(), ServiceError> {
        if self.files.get(domain).is_some_and(|m| m.contains_key(id)) {
            return Err(ServiceError::Conflict {
                code: ErrorCode::TemplateInConfig,
                message: format!(
                    "template {id:?} comes from a file named in the config; change the file"
                ),
            });
        }
        if self.store.delete_template(domain, id).await? {
            Ok(())
        } else {
            Err(template_not_found(id))
        }
    }

    // --------------------------------------------------------------------------------
    // Sessions
    // --------------------------------------------------------------------------------

    /// Opens `identity`'s session of `template`: the in-progress one, resumed (its history,
    /// then its pending question), or a new one with its first question. Everything is
    /// stored before it is returned.
    pub async fn open(
        &self,
        identity: &Identity,
        template: Arc<Template>,
    ) -> Result<(Live, Vec<Reply>), ServiceError> {
        let snapshot = serde_json::to_string(&template.spec)
            .map_err(|e| ServiceError::invalid(ErrorCode::InvalidTemplate, e.to_string()))?;
        let new = NewSession {
            id: uuid::Uuid::now_v7().to_string(),
            domain_id: identity.domain_id.to_string(),
            user_id: identity.user_id.clone(),
            template_id: template.spec.id.clone(),
            template: snapshot,
            state: guide::State::default().to_json(),
        };
        let (session, created) = self.take_over(new).await?;
        // The service and its key are the template's (or domain's) as they are now; a
        // resumed session keeps the questions it started with.
        let asker = self.asker(&identity.domain_id, &template);
        let template = if created {
            template
        } else {
            match Template::parse(&session.template) {
                Ok(t) => Arc::new(t),
                Err(_) => template,
            }
        };
        let mut live = Live {
            session,
            template,
            asker,
            user_id: identity.user_id.clone(),
            visitor: identity.role == Role::Visitor,
            failures: 0,
            retry_at: None,
        };
        // An open session keeps in memory only what it still needs: the parsed template,
        // and its turns only for the AI service (each call sends them); the built-in guide
        // works from its state.
        live.session.template = String::new();
        let keep_turns = matches!(live.asker, Asker::Service(_));
        let mut out = Vec::new();
        if created {
            self.metrics.guided("started");
        } else {
            self.metrics.guided("resumed");
            let history = if keep_turns {
                live.session.turns.clone()
            } else {
                std::mem::take(&mut live.session.turns)
            };
            out.push(Reply::Resumed {
                session_id: live.session.id.clone(),
                history,
            });
        }
        match live.session.pending.clone() {
            Some(p) => out.push(self.question_reply(&live, p)),
            None => out.extend(self.ask_next(&mut live).await?),
        }
        if !keep_turns {
            live.session.turns = Vec::new();
        }
        Ok((live, out))
    }

    /// The in-progress session of `new`'s user and template, or `new` created. A resumed
    /// session is taken over: its version is raised, so that a write the connection it
    /// belonged to still has in flight fails (that connection is being told it was
    /// replaced) instead of leaving this one a step behind. What such a write stored before
    /// the take-over is read again.
    async fn take_over(&self, new: NewSession) -> Result<(GuidedSession, bool), ServiceError> {
        for _ in 0..TAKE_OVER_ATTEMPTS {
            let (mut session, created) = self.store.open_session(new.clone()).await?;
            if created {
                return Ok((session, true));
            }
            let touch = Step {
                turns: Vec::new(),
                pending: session.pending.clone(),
                state: session.state.clone(),
            };
            if let Some(version) = self
                .store
                .advance_session(&session.id, session.version, touch)
                .await?
            {
                session.version = version;
                return Ok((session, false));
            }
            // Changed (or completed) since it was read: read it again.
        }
        Err(ServiceError::Conflict {
            code: ErrorCode::SessionBusy,
            message: "This session is changing in another connection; try again.".into(),
        })
    }

    /// Takes the user's answer: stores it and what comes next, then says what comes next.
    pub async fn answer(&self, live: &mut Live, content: &str) -> Result<Vec<Reply>, ServiceError> {
        if live.is_complete() {
            return Ok(vec![Reply::Error {
                code: ErrorCode::SessionComplete,
                message: "This session is complete.".into(),
            }]);
        }
        if content.chars().count() > MAX_ANSWER_CHARS {
            return Ok(vec![Reply::Error {
                code: ErrorCode::AnswerTooLong,
                message: format!("Please keep the answer under {MAX_ANSWER_CHARS} characters."),
            }]);
        }
        if live.session.turn_count >= MAX_TURNS {
            return Ok(vec![Reply::Error {
                code: ErrorCode::SessionTooLong,
                message: format!(
                    "This session holds {MAX_TURNS} messages, as many as one may; delete it to \
                     start again."
                ),
            }]);
        }
        if content.trim().is_empty() && live.session.pending.is_none() {
            return Ok(Vec::new());
        }
        match live.asker.clone() {
            Asker::Guide => self.guide_answer(live, content).await,
            Asker::Service(endpoint) => {
                let step = Step {
                    turns: vec![NewTurn {
                        speaker: Speaker::User,
                        question_id: live.session.pending.as_ref().map(|p| p.id.clone()),
                        text: content.to_owned(),
                    }],
                    pending: None,
                    state: live.session.state.clone(),
                };
                self.advance(live, step).await?;
                self.call_service(live, &endpoint).await
            }
        }
    }

    /// Calls the AI service again after a failure (the transport's retry timer).
    pub async fn retry(&self, live: &mut Live) -> Result<Vec<Reply>, ServiceError> {
        live.retry_at = None;
        match live.asker.clone() {
            Asker::Service(endpoint) if !live.is_complete() && live.session.pending.is_none() => {
                self.call_service(live, &endpoint).await
            }
            _ => Ok(Vec::new()),
        }
    }

    /// One session, for its owner or its domain's back end and admins; anyone else gets
    /// `session_not_found`.
    pub async fn session(
        &self,
        caller: &Identity,
        id: &str,
    ) -> Result<GuidedSession, ServiceError> {
        match self.store.guided_session(id).await? {
            Some(s) if may_read(caller, &s.domain_id, &s.user_id) => Ok(s),
            _ => Err(session_not_found(id)),
        }
    }

    /// The caller's sessions (its domain's, for its back end and admins, optionally one
    /// user's).
    pub async fn sessions(
        &self,
        caller: &Identity,
        template_id: Option<String>,
        status: Option<SessionStatus>,
        user_id: Option<String>,
    ) -> Result<Vec<GuidedSession>, ServiceError> {
        let user_id = if is_back_office(caller) {
            user_id
        } else {
            Some(caller.user_id.clone())
        };
        Ok(self
            .store
            .guided_sessions(SessionQuery {
                domain_id: caller.domain_id.to_string(),
                user_id,
                template_id,
                status,
                limit: MAX_LIST,
            })
            .await?)
    }

    /// Abandons a session (its document, if any, stays).
    pub async fn delete_session(&self, caller: &Identity, id: &str) -> Result<(), ServiceError> {
        self.session(caller, id).await?;
        if self.store.delete_guided_session(id).await? {
            Ok(())
        } else {
            Err(session_not_found(id))
        }
    }

    /// One document, for its owner or its domain's back end and admins.
    pub async fn document(
        &self,
        caller: &Identity,
        id: &str,
    ) -> Result<GeneratedDocument, ServiceError> {
        match self.store.generated_document(&caller.domain_id, id).await? {
            Some(d) if may_read(caller, &d.domain_id, &d.user_id) => Ok(d),
            _ => Err(ServiceError::NotFound {
                code: ErrorCode::DocumentNotFound,
                message: format!("no document {id:?}"),
            }),
        }
    }

    /// The caller's documents (a back end or admin names the user with `user_id`).
    pub async fn documents(
        &self,
        caller: &Identity,
        user_id: Option<&str>,
    ) -> Result<Vec<GeneratedDocument>, ServiceError> {
        let user = match user_id {
            Some(u) if is_back_office(caller) => u,
            _ => &caller.user_id,
        };
        Ok(self
            .store
            .generated_documents(&caller.domain_id, user, MAX_LIST)
            .await?)
    }

    /// Deletes stale incomplete sessions (and old complete ones when configured), if this
    /// node holds the cleanup lease; how many went.
    pub async fn clean_up(&self, node: &str) -> Result<u64, ServiceError> {
        let lease = self.config.cleanup_every.saturating_mul(2);
        if !self.store.take_lease("guided-cleanup", node, lease).await? {
            return Ok(0);
        }
        let now = Utc::now();
        let stale = chrono::Duration::from_std(self.config.stale_after)
            .unwrap_or(chrono::Duration::days(1));
        let keep = &self.config.keep_completed;
        let completed_before = (!keep.is_zero())
            .then(|| chrono::Duration::from_std(*keep).ok())
            .flatten()
            .map(|k| now - k);
        let gone = self
            .store
            .expire_sessions(now - stale, completed_before)
            .await?;
        if gone > 0 {
            self.metrics
                .guided
                .get_or_create(&crate::metrics::ReasonLabel { reason: "expired" })
                .inc_by(gone);
            tracing::info!(sessions = gone, "deleted stale guided sessions");
        }
        Ok(gone)
    }

    // --------------------------------------------------------------------------------
    // Driving a session
    // --------------------------------------------------------------------------------

    /// Who asks `template`'s questions in `domain`.
    fn asker(&self, domain: &str, template: &Template) -> Asker {
        let (url, key) = match &template.spec.ai_service_url {
            Some(url) if url.is_empty() => return Asker::Guide,
            Some(url) => (Some(url.clone()), template.spec.ai_service_api_key.clone()),
            None => {
                let table = self.domains.load();
                let settings = table.get(domain).map(|d| &d.settings);
                (
                    settings.and_then(|s| s.ai_service_url.clone()),
                    settings
                        .and_then(|s| s.ai_service_api_key.as_ref())
                        .map(|k| k.expose().to_owned()),
                )
            }
        };
        match url {
            Some(url) => Asker::Service(Arc::new(Endpoint {
                url,
                api_key: key,
                timeout: self.config.ai_service_timeout,
            })),
            None => Asker::Guide,
        }
    }

    /// Asks the session's next question when it waits on none (a new session, or one
    /// whose AI-service call failed).
    async fn ask_next(&self, live: &mut Live) -> Result<Vec<Reply>, ServiceError> {
        match live.asker.clone() {
            Asker::Guide => {
                let state = guide::State::parse(&live.session.state);
                let Some(q) = live.template.questions().get(state.index) else {
                    return self.guide_finish(live, state, Vec::new()).await;
                };
                let pending = Pending {
                    id: q.spec.id.clone(),
                    text: q.spec.text.clone(),
                };
                let step = Step {
                    turns: vec![assistant(&pending)],
                    pending: Some(pending.clone()),
                    state: state.to_json(),
                };
                self.advance(live, step).await?;
                Ok(vec![self.question_reply(live, pending)])
            }
            Asker::Service(endpoint) => self.call_service(live, &endpoint).await,
        }
    }

    /// The built-in guide's answer handling.
    async fn guide_answer(
        &self,
        live: &mut Live,
        content: &str,
    ) -> Result<Vec<Reply>, ServiceError> {
        let mut state = guide::State::parse(&live.session.state);
        let questions = live.template.questions();
        let Some(question) = questions.get(state.index) else {
            return self.guide_finish(live, state, Vec::new()).await;
        };
        let qid = question.spec.id.clone();
        let answer = NewTurn {
            speaker: Speaker::User,
            question_id: Some(qid.clone()),
            text: content.to_owned(),
        };
        let value = match question.check(content) {
            Ok(value) => value,
            Err(reason) => {
                self.metrics.guided("invalid_answer");
                let pending = Pending {
                    id: qid,
                    text: format!("{reason} {}", question.spec.text),
                };
                let step = Step {
                    turns: vec![answer, assistant(&pending)],
                    pending: Some(pending.clone()),
                    state: state.to_json(),
                };
                self.advance(live, step).await?;
                return Ok(vec![self.question_reply(live, pending)]);
            }
        };
        let next = questions.get(state.index + 1);
        // The vendor (if the domain has one) may ask a clarifying question, or word the
        // next one to follow the answer; offline, the template's words are used.
        let may_follow_up = state.follow_ups < self.config.follow_ups;
        let advice = if value.is_empty() || (next.is_none() && !may_follow_up) {
            guide::Advice::Verbatim
        } else {
            let (instructions, turns) = guide::prompt(&live.template, question, &value, next);
            let text = self
                .ai
                .phrase(
                    &live.session.domain_id,
                    &live.user_id,
                    live.visitor,
                    instructions,
                    turns,
                    guide::PHRASE_DEADLINE,
                )
                .await;
            guide::Advice::read(text.as_deref(), next.is_some())
        };
        if let guide::Advice::FollowUp(text) = &advice
            && may_follow_up
        {
            self.metrics.guided("follow_up");
            state.follow_ups += 1;
            state.answers.insert(qid.clone(), value);
            let pending = Pending {
                id: qid,
                text: text.clone(),
            };
            let step = Step {
                turns: vec![answer, assistant(&pending)],
                pending: Some(pending.clone()),
                state: state.to_json(),
            };
            self.advance(live, step).await?;
            return Ok(vec![self.question_reply(live, pending)]);
        }
        // The answer to a follow-up replaces the first one: it says what was missing.
        state.answers.insert(qid, value);
        state.index += 1;
        state.follow_ups = 0;
        let Some(next) = next else {
            return self.guide_finish(live, state, vec![answer]).await;
        };
        let text = match advice {
            guide::Advice::Next(text) => text,
            _ => next.spec.text.clone(),
        };
        let pending = Pending {
            id: next.spec.id.clone(),
            text,
        };
        let step = Step {
            turns: vec![answer, assistant(&pending)],
            pending: Some(pending.clone()),
            state: state.to_json(),
        };
        self.advance(live, step).await?;
        Ok(vec![self.question_reply(live, pending)])
    }

    /// Renders the document and completes the session.
    async fn guide_finish(
        &self,
        live: &mut Live,
        state: guide::State,
        turns: Vec<NewTurn>,
    ) -> Result<Vec<Reply>, ServiceError> {
        let content = live.template.render(&state.answers);
        let document = NewDocument {
            id: uuid::Uuid::now_v7().to_string(),
            title: live.template.spec.name.clone(),
            format: "markdown".into(),
            content: Some(content),
        };
        self.complete(live, turns, state.to_json(), document).await
    }

    /// Stores the completion with its document.
    async fn complete(
        &self,
        live: &mut Live,
        turns: Vec<NewTurn>,
        state: String,
        document: NewDocument,
    ) -> Result<Vec<Reply>, ServiceError> {
        let document_id = document.id.clone();
        let step = Step {
            turns,
            pending: None,
            state,
        };
        let version = self
            .store
            .complete_session(&live.session.id, live.session.version, step, document)
            .await?
            .ok_or_else(replaced)?;
        live.session.version = version;
        live.session.status = SessionStatus::Complete;
        live.session.pending = None;
        live.session.document_id = Some(document_id.clone());
        self.metrics.guided("completed");
        Ok(vec![Reply::Complete {
            session_id: live.session.id.clone(),
            document_id,
        }])
    }

    /// Stores `step`; a session another connection changed meanwhile is `replaced`.
    async fn advance(&self, live: &mut Live, step: Step) -> Result<(), ServiceError> {
        let added = u32::try_from(step.turns.len()).unwrap_or(u32::MAX);
        let at = Utc::now();
        let version = self
            .store
            .advance_session(&live.session.id, live.session.version, step.clone())
            .await?
            .ok_or_else(replaced)?;
        let s = &mut live.session;
        let kept = if matches!(live.asker, Asker::Service(_)) {
            step.turns
        } else {
            Vec::new()
        };
        for (i, t) in kept.into_iter().enumerate() {
            s.turns.push(Turn {
                n: s.turn_count + u32::try_from(i).unwrap_or(0) + 1,
                speaker: t.speaker,
                question_id: t.question_id,
                text: t.text,
                at,
            });
        }
        s.turn_count += added;
        s.version = version;
        s.pending = step.pending;
        s.state = step.state;
        s.updated_at = at;
        Ok(())
    }

    /// Calls the AI service for what comes next and stores its answer.
    async fn call_service(
        &self,
        live: &mut Live,
        endpoint: &Endpoint,
    ) -> Result<Vec<Reply>, ServiceError> {
        let reply = remote::next_question(&self.client, endpoint, &live.session).await;
        self.metrics
            .guided_ai_service
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reply.label(),
            })
            .inc();
        match reply {
            ServiceReply::Next { id, text } => {
                live.failures = 0;
                live.retry_at = None;
                let id = id.unwrap_or_else(|| format!("q{}", live.session.turn_count + 1));
                let pending = Pending { id, text };
                let step = Step {
                    turns: vec![assistant(&pending)],
                    pending: Some(pending.clone()),
                    state: live.session.state.clone(),
                };
                self.advance(live, step).await?;
                Ok(vec![self.question_reply(live, pending)])
            }
            ServiceReply::Complete { document } => {
                live.failures = 0;
                live.retry_at = None;
                let document = NewDocument {
                    id: document
                        .id
                        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                    title: document
                        .title
                        .unwrap_or_else(|| live.template.spec.name.clone()),
                    format: document.format,
                    content: document.content,
                };
                let state = live.session.state.clone();
                self.complete(live, Vec::new(), state, document).await
            }
            ServiceReply::Rejected { status } => {
                live.retry_at = None;
                tracing::warn!(
                    session = %live.session.id,
                    status,
                    "the AI service refused a guided session's call"
                );
                Ok(vec![Reply::Error {
                    code: ErrorCode::AiServiceRejected,
                    message: format!(
                        "The assistant could not take this (it answered {status}). Your answers \
                         are saved; send a message to try again."
                    ),
                }])
            }
            ServiceReply::Failed { why, .. } => {
                live.failures += 1;
                tracing::warn!(
                    session = %live.session.id,
                    attempt = live.failures,
                    error = %why,
                    "a guided session's AI service call failed"
                );
                let message = if live.failures <= self.config.ai_service_retries {
                    let wait = retry_delay(live.failures);
                    live.retry_at = Some(tokio::time::Instant::now() + wait);
                    format!(
                        "The assistant is unavailable right now; retrying in {} s. Your answers \
                         are saved.",
                        wait.as_secs().max(1)
                    )
                } else {
                    live.retry_at = None;
                    "The assistant is still unavailable. Your answers are saved; send a message \
                     to try again."
                        .to_owned()
                };
                Ok(vec![Reply::Error {
                    code: ErrorCode::AiServiceUnavailable,
                    message,
                }])
            }
        }
    }

    /// `next_question` for `pending`, with the template question's hint and choices.
    fn question_reply(&self, live: &Live, pending: Pending) -> Reply {
        let q = match &live.asker {
            Asker::Guide => live.template.question(&pending.id),
            Asker::Service(_) => None,
        };
        Reply::Question {
            session_id: live.session.id.clone(),
            id: pending.id,
            text: pending.text,
            help: q.and_then(|q| q.spec.help.clone()),
            choices: q.and_then(|q| q.spec.choices.clone()),
        }
    }
}

/// How long to wait before the `attempt`th retry: 1 s, 2 s, 4 s… at most 30 s.
fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs((1u64 << attempt.saturating_sub(1).min(5)).min(30))
}

fn assistant(pending: &Pending) -> NewTurn {
    NewTurn {
        speaker: Speaker::Assistant,
        question_id: Some(pending.id.clone()),
        text: pending.text.clone(),
    }
}

fn replaced() -> ServiceError {
    ServiceError::Conflict {
        code: ErrorCode::Replaced,
        message: "This session was continued in another connection.".into(),
    }
}

fn session_not_found(id: &str) -> ServiceError {
    ServiceError::NotFound {
        code: ErrorCode::SessionNotFound,
        message: format!("no session {id:?}"),
    }
}

/// The error for an unknown template.
pub fn template_not_found(id: &str) -> ServiceError {
    ServiceError::NotFound {
        code: ErrorCode::TemplateNotFound,
        message: format!("no template {id:?}"),
    }
}

/// A domain's back end and admins see every user's sessions and documents.
fn is_back_office(caller: &Identity) -> bool {
    matches!(caller.role, Role::Service | Role::Admin)
}

fn may_read(caller: &Identity, domain: &str, user: &str) -> bool {
    *caller.domain_id == *domain && (caller.user_id == user || is_back_office(caller))
}

/// The files `pattern` names: itself, or with a `*` in its file name every match, in name
/// order.
fn expand(pattern: &str) -> Result<Vec<std::path::PathBuf>, String> {
    let path = Path::new(pattern);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("template path {pattern:?} names no file"))?;
    if !name.contains('*') {
        return Ok(vec![path.to_path_buf()]);
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if dir.to_string_lossy().contains('*') {
        return Err(format!(
            "template path {pattern:?}: only the file name may hold a *"
        ));
    }
    let (prefix, suffix) = name.split_once('*').unwrap_or((name, ""));
    if suffix.contains('*') {
        return Err(format!("template path {pattern:?}: use one * at most"));
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut found: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.len() >= prefix.len() + suffix.len()
                        && n.starts_with(prefix)
                        && n.ends_with(suffix)
                })
        })
        .collect();
    if found.is_empty() {
        return Err(format!("template path {pattern:?} matches no file"));
    }
    found.sort();
    Ok(found)
}
