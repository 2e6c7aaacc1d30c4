//! Guided sessions (see `docs/sessions.md`): what the store keeps of templates added at run
//! time, of sessions and their turns, and of the documents sessions end in, and the
//! [`Guided`] trait every store implements.
//!
//! A session's turns are appended, never rewritten: each answer is one short transaction
//! (its turns plus the session's new pending question and guide state), committed before
//! the server says anything back, so a crash between two answers loses nothing that was
//! acknowledged. Every change to a session names the `version` it was read at; a change
//! made from a stale read (another connection took the session over) is refused and writes
//! nothing.
//!
//! The store checks no template and no answer: the sessions service does that.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStatus {
    /// Questions remain.
    InProgress,
    /// Finished; its document exists.
    Complete,
}

impl SessionStatus {
    /// Stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::InProgress => "in_progress",
            SessionStatus::Complete => "complete",
        }
    }

    /// Parses a stored or requested name (`completed` is read as `complete`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "in_progress" => Some(SessionStatus::InProgress),
            "complete" | "completed" => Some(SessionStatus::Complete),
            _ => None,
        }
    }
}

/// Who said a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// The server, its guide or the AI service: a question, a follow-up, a reason to answer
    /// again.
    Assistant,
    /// The session's user: an answer.
    User,
}

impl Speaker {
    /// Stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Speaker::Assistant => "assistant",
            Speaker::User => "user",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "assistant" => Some(Speaker::Assistant),
            "user" => Some(Speaker::User),
            _ => None,
        }
    }
}

/// One stored turn of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Position in the session, from 1, without gaps.
    pub n: u32,
    /// Who said it.
    pub speaker: Speaker,
    /// The question it asks or answers, when it belongs to one.
    pub question_id: Option<String>,
    /// What was said.
    pub text: String,
    /// When it was stored.
    pub at: DateTime<Utc>,
}

/// A turn to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTurn {
    /// Who said it.
    pub speaker: Speaker,
    /// The question it asks or answers.
    pub question_id: Option<String>,
    /// What was said.
    pub text: String,
}

/// The question a session waits on an answer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The question's id (a template question's, or one the AI service's turn was given).
    pub id: String,
    /// Its text as asked.
    pub text: String,
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuidedSession {
    /// Identifier (a UUID).
    pub id: String,
    /// Its domain.
    pub domain_id: String,
    /// Its user.
    pub user_id: String,
    /// The template it follows.
    pub template_id: String,
    /// In progress or complete.
    pub status: SessionStatus,
    /// The template as it was when the session started (its JSON), so a session keeps the
    /// questions it began with when the template changes.
    pub template: String,
    /// The question it waits on; `None` before the first question and once complete (and
    /// while an AI service has not yet answered).
    pub pending: Option<Pending>,
    /// The guide's own state (JSON the sessions service reads and writes).
    pub state: String,
    /// The document it ended in.
    pub document_id: Option<String>,
    /// Raised by every change; a change names the version it was read at.
    pub version: u64,
    /// How many turns it holds.
    pub turn_count: u32,
    /// Its turns in order ([`Guided::guided_session`] and [`Guided::open_session`] fill
    /// them; lists leave them empty).
    pub turns: Vec<Turn>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it was completed.
    pub completed_at: Option<DateTime<Utc>>,
}

/// A session to create.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Identifier, chosen by the caller.
    pub id: String,
    /// Domain.
    pub domain_id: String,
    /// User.
    pub user_id: String,
    /// Template id.
    pub template_id: String,
    /// The template's JSON.
    pub template: String,
    /// The guide's initial state (JSON).
    pub state: String,
}

/// One change to an in-progress session: turns to append, and what it waits on next.
#[derive(Debug, Clone)]
pub struct Step {
    /// Appended in order after the existing turns.
    pub turns: Vec<NewTurn>,
    /// The question it waits on afterwards (`None`: none yet).
    pub pending: Option<Pending>,
    /// The guide's state afterwards (JSON).
    pub state: String,
}

/// A document to store with a session's completion.
#[derive(Debug, Clone)]
pub struct NewDocument {
    /// Identifier (a UUID made by the server, or the AI service's id).
    pub id: String,
    /// Title.
    pub title: String,
    /// `markdown`, `html` or `text`.
    pub format: String,
    /// The text; `None` when the AI service keeps the document and gave only its id.
    pub content: Option<String>,
}

/// A stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedDocument {
    /// Identifier.
    pub id: String,
    /// Domain.
    pub domain_id: String,
    /// The user it belongs to.
    pub user_id: String,
    /// The session it ended.
    pub session_id: String,
    /// That session's template.
    pub template_id: String,
    /// Title.
    pub title: String,
    /// `markdown`, `html` or `text`.
    pub format: String,
    /// The text ([`Guided::generated_document`] fills it; lists leave it `None`). `None` in
    /// a full read when the AI service keeps the document.
    pub content: Option<String>,
    /// Length of the text in bytes (0 when the AI service keeps it).
    pub bytes: u64,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// A template added through the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTemplate {
    /// Domain.
    pub domain_id: String,
    /// Template id.
    pub id: String,
    /// Its JSON, as checked by the sessions service.
    pub spec: String,
    /// When it was last written.
    pub updated_at: DateTime<Utc>,
}

/// Which sessions to list.
#[derive(Debug, Clone)]
pub struct SessionQuery {
    /// Domain.
    pub domain_id: String,
    /// Only this user's (`None`: everyone's in the domain).
    pub user_id: Option<String>,
    /// Only this template's.
    pub template_id: Option<String>,
    /// Only those in this status.
    pub status: Option<SessionStatus>,
    /// At most this many, latest change first.
    pub limit: usize,
}

/// Storage of guided sessions, their documents and run-time templates.
#[async_trait]
pub trait Guided: Send + Sync {
    /// The in-progress session of `new`'s (domain, user, template), with its turns, and
    /// false; or, when there is none, `new` created and true. Two concurrent calls for one
    /// (domain, user, template) return the same session, one of them created.
    async fn open_session(&self, new: NewSession) -> Result<(GuidedSession, bool), StoreError>;

    /// One session with its turns.
    async fn guided_session(&self, id: &str) -> Result<Option<GuidedSession>, StoreError>;

    /// Sessions matching `query`, latest change first, without their turns.
    async fn guided_sessions(&self, query: SessionQuery) -> Result<Vec<GuidedSession>, StoreError>;

    /// Applies `step` to the in-progress session `id` if it is still at `version`, in one
    /// transaction, and returns its new version; `None` (nothing written) when it is gone,
    /// complete or at another version.
    async fn advance_session(
        &self,
        id: &str,
        version: u64,
        step: Step,
    ) -> Result<Option<u64>, StoreError>;

    /// Like [`Guided::advance_session`], and in the same transaction stores `document` for
    /// the session's user and marks the session complete with it. Document ids are per domain;
    /// one the domain already has is kept as it is (an AI service that names the same
    /// document twice).
    async fn complete_session(
        &self,
        id: &str,
        version: u64,
        step: Step,
        document: NewDocument,
    ) -> Result<Option<u64>, StoreError>;

    /// Removes a session and its turns (not its document); false if there was none.
    async fn delete_guided_session(&self, id: &str) -> Result<bool, StoreError>;

    /// Removes in-progress sessions last changed before `before`, and, when
    /// `completed_before` is given, complete ones (with their documents) completed before
    /// it, and documents stored before it whose session was removed by hand; returns how
    /// many sessions went.
    async fn expire_sessions(
        &self,
        before: DateTime<Utc>,
        completed_before: Option<DateTime<Utc>>,
    ) -> Result<u64, StoreError>;

    /// One of a domain's documents, with its content (ids are per domain).
    async fn generated_document(
        &self,
        domain_id: &str,
        id: &str,
    ) -> Result<Option<GeneratedDocument>, StoreError>;

    /// A user's documents, newest first, without their content.
    async fn generated_documents(
        &self,
        domain_id: &str,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<GeneratedDocument>, StoreError>;

    /// Creates or replaces a domain's template; true when it was created.
    async fn put_template(&self, template: StoredTemplate) -> Result<bool, StoreError>;

    /// One of a domain's run-time templates.
    async fn stored_template(
        &self,
        domain_id: &str,
        id: &str,
    ) -> Result<Option<StoredTemplate>, StoreError>;

    /// A domain's run-time templates, by id.
    async fn stored_templates(&self, domain_id: &str) -> Result<Vec<StoredTemplate>, StoreError>;

    /// Removes one; false if there was none.
    async fn delete_template(&self, domain_id: &str, id: &str) -> Result<bool, StoreError>;

    /// Takes or renews the lease `name` for `holder` until `ttl` from now: true when
    /// `holder` holds it afterwards (it was free, expired, or already `holder`'s).
    async fn take_lease(&self, name: &str, holder: &str, ttl: Duration)
    -> Result<bool, StoreError>;
}
