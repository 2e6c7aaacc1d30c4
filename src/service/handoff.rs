//! Hand-off: support rooms move from the bot to a human agent and back (design and wire
//! reference: `docs/handoff.md`).
//!
//! - **State machine.** `bot → waiting → assigned → resolved`, with unassign, transfer and
//!   a reopen when a visitor writes after `resolved`. Each transition is decided inside the
//!   store's transaction ([`Store::transition`]) from the state stored there, so two agents
//!   racing for a room get one winner, and the transition's system message is stored with
//!   it, in the room's stream, with a `seq`.
//! - **The bot's turn.** Every committed message passes through [`HandoffService::on_committed`]
//!   (fed by the chat dispatcher in commit order). A visitor's message is handed to the AI
//!   service only while the room is with the bot; one that asks for a person gets the
//!   offer of a human instead. An assignment stops a reply being streamed.
//! - **The inbox.** Agents subscribe over their socket; every change of a room's entry (a
//!   message, a status change, a note) is pushed to the domain's subscribers as one
//!   event, encoded once.
//!
//! Room states are cached here (bounded) so that a visitor's message costs no store read;
//! the cache keeps the copy with the highest `version`.
//!
//! Depends on the chat service (storing, the hub), the AI service (the bot), the domain
//! table (hand-off settings) and `auth::policy`.

use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

use super::ServiceError;
use super::ai::{AiService, CONVERSATION_PREFIX, assistant_identity, escalate_action};
use super::chat::{ChatService, Outgoing};
use crate::auth::Domains;
use crate::auth::policy;
use crate::broker::Broker;
use crate::broker::shared::{Online, Shared};
use crate::config::HandoffConfig;
use crate::error_code::ErrorCode;
use crate::hub::{ConnHandle, Envelope, Event, LeftReason};
use crate::metrics::{ActionLabel, Metrics};
use crate::model::{
    Agent, Author, Conversation, Identity, Message, NewMessage, Note, Role, RoomKey, RoomStatus,
    now_ms,
};
use crate::node::events::Remote;
use crate::store::{Customer, Decide, InboxEntry, InboxQuery, NewNote, Store, Transitioned};

/// Room states kept in memory before the cache is cleared.
const CACHE_MAX: usize = 100_000;
/// Notes listed by [`HandoffService::notes`].
const NOTES_PAGE: usize = 200;

/// The longest note, in bytes (the message limit applies too).
const MAX_NOTE_BYTES: usize = 16 * 1024;

/// A hand-off action a caller asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask for a human.
    Escalate {
        /// Why, if the caller said.
        reason: Option<String>,
    },
    /// Give the room to an agent (the caller when `None`).
    Assign(Option<AgentRef>),
    /// Put an assigned room back to waiting.
    Unassign,
    /// Give an assigned room to another agent.
    Transfer(AgentRef),
    /// Close the conversation.
    Resolve,
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Escalate { .. } => "escalate",
            Action::Assign(_) => "assign",
            Action::Unassign => "unassign",
            Action::Transfer(_) => "transfer",
            Action::Resolve => "resolve",
        }
    }
}

/// An agent named in a request: an id and, optionally, a display name.
/// Who answers a domain's visitors (see [`HandoffService::service`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// An assistant answers (a bot with a provider or a knowledge base).
    pub assistant: bool,
    /// Conversations can be handed to people (hand-off is on).
    pub people: bool,
    /// Within business hours (always, without hours).
    pub open: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRef {
    /// User id.
    pub user_id: String,
    /// Display name, if the caller gave one.
    pub name: Option<String>,
}

/// What a hand-off request did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The room's state afterwards.
    pub conversation: Arc<Conversation>,
    /// False when the room already was where the request would put it.
    pub changed: bool,
    /// The `seq` of the stored system message (when changed).
    pub seq: Option<u64>,
}

/// What is known of a room here: its state and who opened it.
#[derive(Debug, Clone)]
struct RoomState {
    conversation: Arc<Conversation>,
    created_by: Option<Arc<str>>,
    visitor_name: Option<Arc<str>>,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// The longest inbox search, in characters.
const MAX_SEARCH_CHARS: usize = 200;

/// Which conversations [`HandoffService::list`] returns.
#[derive(Debug, Clone, Default)]
pub struct InboxFilter {
    /// Statuses to list; empty: all.
    pub statuses: Vec<RoomStatus>,
    /// At most this many (default 50, at most `limits.max_page`).
    pub limit: Option<usize>,
    /// Only the conversations this visitor opened.
    pub visitor: Option<String>,
    /// Only the conversations whose id, visitor name or messages contain this text.
    pub text: Option<String>,
}

/// How many of a visitor's conversations [`HandoffService::visitor`] lists.
const VISITOR_ROOMS: usize = 20;

/// Who opened a room ([`HandoffService::visitor`]).
#[derive(Debug, Clone, Default)]
pub struct VisitorInfo {
    /// Their user id (`None` for a room nobody in particular opened).
    pub user_id: Option<String>,
    /// Their stored profile and context.
    pub customer: Option<Customer>,
    /// Their conversations in the domain, this one included.
    pub conversations: Vec<InboxEntry>,
}

/// What an agent watching the inbox is online as, across the cluster.
const INBOX_WATCHER: &str = "inbox";

/// An agent watching the domain's inbox on one connection.
#[derive(Debug, Clone)]
struct Subscriber {
    conn: ConnHandle,
    agent: Agent,
    /// Lists the agent among the domain's inbox watchers on every node.
    _watching: Arc<Online>,
}

/// The hand-off service.
#[derive(Debug)]
pub struct HandoffService {
    chat: Arc<ChatService>,
    ai: Arc<AiService>,
    domains: Arc<Domains>,
    metrics: Arc<Metrics>,
    /// Carries the agents' feed to the other nodes.
    broker: Arc<dyn Broker>,
    /// Known room states (see the module header).
    rooms: DashMap<RoomKey, RoomState>,
    /// Inbox subscribers by domain.
    inbox: DashMap<Arc<str>, Mutex<Vec<Subscriber>>>,
    /// The inbox watchers of every node.
    shared: Shared,
}

impl HandoffService {
    /// Creates the service.
    pub fn new(
        chat: Arc<ChatService>,
        ai: Arc<AiService>,
        domains: Arc<Domains>,
        metrics: Arc<Metrics>,
        broker: Arc<dyn Broker>,
        shared: Shared,
    ) -> Self {
        Self {
            chat,
            ai,
            domains,
            metrics,
            broker,
            shared,
            rooms: DashMap::new(),
            inbox: DashMap::new(),
        }
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.chat.store()
    }

    fn settings(&self, domain: &str) -> HandoffConfig {
        self.domains
            .load()
            .get(domain)
            .map(|d| d.settings.handoff.clone())
            .unwrap_or_default()
    }

    /// The room's state, from the cache or the store.
    async fn state(&self, key: &RoomKey) -> Result<RoomState, ServiceError> {
        if let Some(s) = self.rooms.get(key) {
            return Ok(s.clone());
        }
        let room = self.store().room(key).await?;
        let conversation = self
            .store()
            .conversation(key)
            .await?
            .unwrap_or_else(|| Conversation::new(key.clone()));
        let state = RoomState {
            conversation: Arc::new(conversation),
            created_by: room
                .as_ref()
                .and_then(|r| r.created_by.as_deref().map(Arc::from)),
            visitor_name: None,
            created_at: room.map_or_else(now_ms, |r| r.created_at),
        };
        Ok(self.remember(key, state))
    }

    /// Caches `state` unless a newer one is cached; returns the one kept.
    fn remember(&self, key: &RoomKey, state: RoomState) -> RoomState {
        if self.rooms.len() > CACHE_MAX {
            self.rooms.clear();
        }
        match self.rooms.entry(key.clone()) {
            dashmap::Entry::Vacant(v) => v.insert(state).clone(),
            dashmap::Entry::Occupied(mut o) => {
                let entry = o.get_mut();
                if state.conversation.version > entry.conversation.version {
                    entry.conversation = state.conversation;
                }
                if entry.visitor_name.is_none() {
                    entry.visitor_name = state.visitor_name;
                }
                entry.clone()
            }
        }
    }

    /// Updates the cached conversation if `c` is newer.
    fn remember_conversation(&self, c: &Arc<Conversation>) {
        if let Some(mut entry) = self.rooms.get_mut(&c.room)
            && c.version > entry.conversation.version
        {
            entry.conversation = Arc::clone(c);
        }
    }

    /// Who answers in the domain's support rooms right now, for the widget's header.
    pub async fn service(&self, domain: &str) -> Service {
        let settings = self.settings(domain);
        Service {
            assistant: self.ai.bot(domain).await.is_some(),
            people: settings.enabled,
            open: settings
                .hours()
                .map_or(true, |h| h.is_open(chrono::Utc::now())),
        }
    }

    /// The hand-off state of a support room (`None` for the `ai:` conversations), for a
    /// client joining it.
    pub async fn status_of(&self, key: &RoomKey) -> Option<Arc<Conversation>> {
        if key.room_id.starts_with(CONVERSATION_PREFIX) {
            return None;
        }
        match self.state(key).await {
            Ok(s) => Some(s.conversation),
            Err(e) => {
                tracing::warn!(room = %key, error = %e, "cannot read the room's hand-off state");
                None
            }
        }
    }

    /// `GET /api/rooms/{id}/conversation`: for whoever may use the room.
    pub async fn conversation(
        &self,
        identity: &Identity,
        room_id: &str,
    ) -> Result<Arc<Conversation>, ServiceError> {
        let key = self.support_room(identity, room_id)?;
        self.chat.authorize(identity, &key, false).await?;
        if self.store().room(&key).await?.is_none() {
            return Err(ServiceError::RoomNotFound);
        }
        Ok(self.state(&key).await?.conversation)
    }

    fn support_room(&self, identity: &Identity, room_id: &str) -> Result<RoomKey, ServiceError> {
        let key = self.chat.room_key(identity, room_id)?;
        if key.room_id.starts_with(CONVERSATION_PREFIX) {
            return Err(ServiceError::Conflict {
                code: ErrorCode::NoHandoff,
                message: "AI conversations (ai:…) have no hand-off".into(),
            });
        }
        Ok(key)
    }

    /// An agent (or admin) about to write in a support room that waits for a person takes
    /// it first: the room is assigned to them (announced to the visitor as usual) before
    /// their message is stored, as if they had pressed "Assign to me". Nothing happens for
    /// anyone else, in a domain without hand-off, or in a room with the bot, assigned or
    /// resolved; a lost race (another agent took it meanwhile) is no error: the message is
    /// sent anyway.
    pub async fn take_on_reply(&self, identity: &Identity, room_id: &str) {
        if !matches!(identity.role, Role::Agent | Role::Admin)
            || !self.settings(&identity.domain_id).enabled
        {
            return;
        }
        let Ok(key) = self.support_room(identity, room_id) else {
            return;
        };
        let waiting = self
            .status_of(&key)
            .await
            .is_some_and(|c| c.status == RoomStatus::Waiting);
        if !waiting {
            return;
        }
        match self.act(identity, room_id, Action::Assign(None)).await {
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(room = %key, error = %e, "an agent's reply did not take the room");
            }
        }
    }

    /// Carries out a hand-off request of `identity` in its domain's room `room_id`.
    pub async fn act(
        &self,
        identity: &Identity,
        room_id: &str,
        action: Action,
    ) -> Result<Outcome, ServiceError> {
        let key = self.support_room(identity, room_id)?;
        match &action {
            Action::Escalate { reason } => {
                if reason.as_ref().is_some_and(|r| r.len() > 1000) {
                    return Err(ServiceError::invalid(
                        ErrorCode::InvalidReason,
                        "reason may hold at most 1000 bytes",
                    ));
                }
                // Nobody would come: a room of a domain without hand-off stays with the bot.
                if !self.settings(&identity.domain_id).enabled {
                    return Err(ServiceError::Conflict {
                        code: ErrorCode::HandoffDisabled,
                        message: "this domain does not hand conversations to agents".into(),
                    });
                }
                let room = self.chat.authorize(identity, &key, true).await?;
                let rule = self.domains.load().visitor_rooms(&identity.domain_id);
                if !policy::may_escalate(identity, rule, room.as_ref()) {
                    return Err(ServiceError::Forbidden(
                        "this room belongs to someone else".into(),
                    ));
                }
            }
            _ => {
                if !policy::may_assign(identity) {
                    return Err(ServiceError::Forbidden(
                        "only agents assign, transfer and resolve conversations".into(),
                    ));
                }
                // Agents act on rooms that exist; nothing is created by assigning.
                if self.store().room(&key).await?.is_none() {
                    return Err(ServiceError::RoomNotFound);
                }
            }
        }
        let target = match &action {
            Action::Assign(a) => Some(self.resolve_agent(identity, a.as_ref()).await?),
            Action::Transfer(a) => Some(self.resolve_agent(identity, Some(a)).await?),
            _ => None,
        };
        let settings = self.settings(&identity.domain_id);
        let decide = decider(
            action.clone(),
            target.clone(),
            Agent {
                user_id: identity.user_id.clone(),
                name: identity.name.clone(),
            },
            settings,
        );
        // The state the store decided on, inside its transaction (the last try, when it
        // retried): what the announcement compares with, even if another node or request
        // changed the room since this node last looked.
        let seen: Arc<Mutex<Option<Conversation>>> = Arc::new(Mutex::new(None));
        let recorder = Arc::clone(&seen);
        let decide: Decide = Arc::new(move |current: &Conversation| {
            *recorder.lock() = Some(current.clone());
            decide(current)
        });
        let Transitioned {
            conversation,
            message,
        } = self
            .store()
            .transition(&key, Some(&identity.user_id), decide)
            .await?;
        let conversation = Arc::new(conversation);
        let Some(message) = message else {
            return self.unchanged(&action, target.as_ref(), conversation);
        };
        let decided_on = seen.lock().take().map(Arc::new);
        let before = match decided_on {
            Some(before) => before,
            None => self.state(&key).await?.conversation,
        };
        self.remember_conversation(&conversation);
        self.rooms.entry(key.clone()).or_insert_with(|| RoomState {
            conversation: Arc::clone(&conversation),
            created_by: Some(Arc::from(identity.user_id.as_str())),
            visitor_name: None,
            created_at: message.message.created_at,
        });
        self.announce(&before, &conversation, message.message.seq, &action);
        Ok(Outcome {
            conversation,
            changed: true,
            seq: Some(message.message.seq),
        })
    }

    /// The answer to a request that changed nothing: fine for an escalation (or an
    /// assignment to the agent who has the room), an `invalid_transition` otherwise.
    fn unchanged(
        &self,
        action: &Action,
        target: Option<&Agent>,
        conversation: Arc<Conversation>,
    ) -> Result<Outcome, ServiceError> {
        self.remember_conversation(&conversation);
        let same_agent = matches!(action, Action::Assign(_))
            && conversation.assignee.as_ref() == target
            && conversation.status == RoomStatus::Assigned;
        if matches!(action, Action::Escalate { .. }) || same_agent {
            return Ok(Outcome {
                conversation,
                changed: false,
                seq: None,
            });
        }
        let state = conversation.status.as_str();
        let message = match (&conversation.assignee, action) {
            (Some(a), Action::Assign(_)) => {
                format!(
                    "{} already has this conversation; transfer it instead",
                    a.name
                )
            }
            (Some(a), Action::Transfer(_)) => format!("{} already has this conversation", a.name),
            _ => format!("cannot {} a conversation that is {state}", action.name()),
        };
        Err(ServiceError::Conflict {
            code: ErrorCode::InvalidTransition,
            message,
        })
    }

    /// The agent a request names, with a display name: the one given, else that of an
    /// agent watching the inbox (on any node), else the id.
    async fn resolve_agent(
        &self,
        identity: &Identity,
        named: Option<&AgentRef>,
    ) -> Result<Agent, ServiceError> {
        let Some(named) = named else {
            if identity.role != Role::Agent && identity.role != Role::Admin {
                return Err(ServiceError::invalid(
                    ErrorCode::InvalidAgent,
                    "agentId is required when the caller is not an agent",
                ));
            }
            return Ok(Agent {
                user_id: identity.user_id.clone(),
                name: identity.name.clone(),
            });
        };
        if !crate::model::valid_id(&named.user_id) {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidAgent,
                "agentId must be 1-128 characters of A-Z a-z 0-9 - _ . : @",
            ));
        }
        let name = named
            .name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| n.chars().take(super::chat::MAX_NAME_CHARS).collect())
            .or_else(|| (named.user_id == identity.user_id).then(|| identity.name.clone()));
        let name = match name {
            Some(name) => name,
            None => self
                .agents_online(&identity.domain_id)
                .await
                .into_iter()
                .find(|a| a.user_id == named.user_id)
                .map_or_else(|| named.user_id.clone(), |a| a.name),
        };
        Ok(Agent {
            user_id: named.user_id.clone(),
            name,
        })
    }

    /// Tells the room's members what changed: `room-status`, and `agent-left` /
    /// `agent-joined` when the assignee changed. Assignment silences the bot.
    fn announce(
        &self,
        before: &Conversation,
        after: &Arc<Conversation>,
        seq: u64,
        action: &Action,
    ) {
        let label = if before.status == RoomStatus::Resolved && after.status == RoomStatus::Bot {
            "reopen"
        } else {
            action.name()
        };
        self.metrics
            .handoff_transitions
            .get_or_create(&ActionLabel { action: label })
            .inc();
        let hub = self.chat.hub();
        let room = &after.room;
        hub.broadcast(
            room,
            Event::RoomStatus {
                conversation: Arc::clone(after),
                seq,
            },
            None,
        );
        if before.assignee != after.assignee {
            if let Some(old) = &before.assignee {
                let reason = match action {
                    Action::Transfer(_) | Action::Assign(_) => LeftReason::Transferred,
                    Action::Resolve => LeftReason::Resolved,
                    _ => LeftReason::Unassigned,
                };
                hub.broadcast(
                    room,
                    Event::AgentLeft {
                        room: room.clone(),
                        agent: old.clone(),
                        reason,
                    },
                    None,
                );
            }
            if let Some(new) = &after.assignee {
                hub.broadcast(
                    room,
                    Event::AgentJoined {
                        room: room.clone(),
                        agent: new.clone(),
                    },
                    None,
                );
            }
        }
        // Whoever has the room now, it is no longer the bot's: a reply in flight stops.
        if after.status != RoomStatus::Bot {
            self.ai.stop(room);
        }
    }

    /// Reacts to a committed message (all of them, in commit order): reopens a resolved
    /// room when its visitor writes, lets the bot answer only while the room is with it
    /// (or offers a human), records the first agent response, and updates the inbox.
    pub async fn on_committed(self: &Arc<Self>, message: Arc<Message>) {
        // A room taken from the bot after this moment must not get a reply to `message`
        // (see `AiService::on_committed`).
        let judged_at = std::time::Instant::now();
        let key = &message.room;
        if key.room_id.starts_with(CONVERSATION_PREFIX) {
            return;
        }
        let role = message.author.role.as_str();
        let visitor = crate::model::is_visitor_label(role);
        let agent = role == Role::Agent.as_str();
        // With one node and nobody watching the inbox, only visitors' and agents' messages
        // matter here; with several, an agent elsewhere may be watching.
        if !visitor
            && !agent
            && !self.has_subscribers(&key.domain_id)
            && !self.broker.topology().is_cluster()
        {
            return;
        }
        // With several nodes, another node may have changed the room a moment ago: judge a
        // visitor's or an agent's message on the stored state, not on this node's copy.
        if (visitor || agent) && self.broker.topology().is_cluster() {
            match self.store().conversation(key).await {
                Ok(Some(c)) => self.remember_conversation(&Arc::new(c)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(room = %key, error = %e, "cannot read the room's hand-off state");
                }
            }
        }
        let mut state = match self.state(key).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(room = %key, error = %e, "cannot read the room's hand-off state");
                if visitor || agent {
                    self.ai.on_committed(message, judged_at).await;
                }
                return;
            }
        };
        if message.kind == STATUS_KIND {
            // A transition's own message: the store has the state it recorded.
            if let Ok(Some(c)) = self.store().conversation(key).await {
                let c = Arc::new(c);
                self.remember_conversation(&c);
                state.conversation = c;
            }
        }
        if visitor {
            // The room's visitor's latest name, for the inbox.
            if state.created_by.as_deref() == Some(message.author.user_id.as_str())
                && state.visitor_name.as_deref() != Some(message.author.name.as_str())
            {
                let name: Arc<str> = Arc::from(message.author.name.as_str());
                if let Some(mut entry) = self.rooms.get_mut(key) {
                    entry.visitor_name = Some(Arc::clone(&name));
                }
                state.visitor_name = Some(name);
            }
            self.on_visitor_message(&message, &mut state, judged_at)
                .await;
        } else if agent {
            if matches!(
                state.conversation.status,
                RoomStatus::Waiting | RoomStatus::Assigned
            ) && state.conversation.first_response_at.is_none()
            {
                match self.store().first_response(key, message.created_at).await {
                    Ok(Some(c)) => {
                        if let Some(secs) = c.first_response_secs() {
                            self.metrics.handoff_first_response.observe(secs as f64);
                        }
                        let c = Arc::new(c);
                        self.remember_conversation(&c);
                        state.conversation = c;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(room = %key, error = %e, "cannot record the first response");
                    }
                }
            }
            // The assistant gives way to a human.
            self.ai.on_committed(Arc::clone(&message), judged_at).await;
        }
        self.push_inbox(&state, &message);
    }

    async fn on_visitor_message(
        self: &Arc<Self>,
        message: &Arc<Message>,
        state: &mut RoomState,
        judged_at: std::time::Instant,
    ) {
        let key = &message.room;
        if state.conversation.status == RoomStatus::Resolved {
            // Only a message written after the resolve reopens the room: one the visitor
            // sent just before it was resolved (seen here later) does not.
            let seq = message.seq;
            let decide: Decide = Arc::new(move |current: &Conversation| {
                (current.status == RoomStatus::Resolved && seq > current.status_seq).then(|| {
                    let next = Conversation::new(current.room.clone());
                    let text = "Conversation reopened.".to_owned();
                    (next, status_message(&current.room, text, "reopen", None))
                })
            });
            let before = Arc::clone(&state.conversation);
            match self.store().transition(key, None, decide).await {
                Ok(Transitioned {
                    conversation,
                    message: Some(m),
                }) => {
                    let c = Arc::new(conversation);
                    self.remember_conversation(&c);
                    self.announce(&before, &c, m.message.seq, &Action::Resolve);
                    state.conversation = c;
                }
                Ok(Transitioned { conversation, .. }) => {
                    let c = Arc::new(conversation);
                    self.remember_conversation(&c);
                    state.conversation = c;
                }
                Err(e) => {
                    tracing::warn!(room = %key, error = %e, "cannot reopen the conversation");
                    return;
                }
            }
        }
        if state.conversation.status != RoomStatus::Bot {
            // Waiting for or talking to a human: the bot stays silent.
            return;
        }
        let Some(settings) = self
            .domains
            .load()
            .get(&key.domain_id)
            .map(|d| d.settings.handoff.clone())
        else {
            return;
        };
        // Without an assistant, a person answers: the visitor's own conversation waits for
        // one at once (as if the visitor had asked), so the message is never left in the
        // void. (A visitor writing in someone else's room, a group chat, is not a request.)
        if self.ai.bot(&key.domain_id).await.is_none() {
            let own = state.created_by.as_deref() == Some(message.author.user_id.as_str());
            if !own {
                return;
            }
            if settings.enabled {
                self.wait_for_a_person(key, state, &settings).await;
            } else {
                self.metrics.unanswered("no_assistant_no_handoff");
                tracing::warn!(
                    room = %key,
                    "a visitor wrote in a domain with neither an assistant nor hand-off: nobody will answer"
                );
            }
            return;
        }
        let offer = (settings.enabled && asks_for_human(&message.content, &settings.phrases))
            .then_some(settings);
        match offer {
            Some(settings) if self.ai.bot(&key.domain_id).await.is_some() => {
                self.offer_human(key, &settings).await;
            }
            _ => self.ai.on_committed(Arc::clone(message), judged_at).await,
        }
    }

    /// Puts a room of a domain without an assistant in the queue for a person, with the
    /// usual "connecting" (or out-of-hours) notice, and announces it to the room and the
    /// inbox like an escalation.
    async fn wait_for_a_person(
        &self,
        key: &RoomKey,
        state: &mut RoomState,
        settings: &HandoffConfig,
    ) {
        let decide = decider(
            Action::Escalate { reason: None },
            None,
            Agent {
                user_id: "system".to_owned(),
                name: "Parlor".to_owned(),
            },
            settings.clone(),
        );
        let before = Arc::clone(&state.conversation);
        match self.store().transition(key, None, decide).await {
            Ok(Transitioned {
                conversation,
                message,
            }) => {
                let c = Arc::new(conversation);
                self.remember_conversation(&c);
                if let Some(m) = message {
                    self.metrics
                        .handoff_transitions
                        .get_or_create(&crate::metrics::ActionLabel { action: "escalate" })
                        .inc();
                    self.announce(
                        &before,
                        &c,
                        m.message.seq,
                        &Action::Escalate { reason: None },
                    );
                }
                state.conversation = c;
            }
            Err(e) => {
                self.metrics.unanswered("store_unavailable");
                tracing::warn!(room = %key, error = %e, "cannot queue the conversation for a person");
            }
        }
    }

    /// The bot's offer of a human: an assistant message with the `escalate` action.
    async fn offer_human(&self, key: &RoomKey, settings: &HandoffConfig) {
        let assistant = assistant_identity(&self.domains, &key.domain_id);
        let out = Outgoing {
            room_id: &key.room_id,
            text: settings.offer_text.clone(),
            role: Some("assistant"),
            data: Some(escalate_action(&settings.action_label)),
            ..Outgoing::default()
        };
        if let Err(e) = self.chat.send(&assistant, out).await {
            tracing::warn!(room = %key, error = %e, "cannot store the offer of a human");
        }
    }

    fn has_subscribers(&self, domain: &str) -> bool {
        self.inbox
            .get(domain)
            .is_some_and(|subs| !subs.lock().is_empty())
    }

    /// Pushes the room's new inbox entry to the domain's subscribers.
    fn push_inbox(&self, state: &RoomState, message: &Message) {
        if !self.has_subscribers(&message.room.domain_id) && !self.broker.topology().is_cluster() {
            return;
        }
        let entry = InboxEntry {
            conversation: (*state.conversation).clone(),
            created_by: state.created_by.as_deref().map(str::to_owned),
            visitor_name: state.visitor_name.as_deref().map(str::to_owned),
            created_at: state.created_at,
            last_message: message.clone(),
            read_seq: 0,
        };
        self.push_to_agents(&message.room.domain_id, Event::InboxUpdate(Arc::new(entry)));
    }

    /// Sends an inbox event to the domain's agents on every node.
    fn push_to_agents(&self, domain: &str, event: Event) {
        self.broker.to_agents(domain, &event);
        self.push_to_local_agents(domain, event);
    }

    fn push_to_local_agents(&self, domain: &str, event: Event) {
        let Some(subs) = self.inbox.get(domain) else {
            return;
        };
        let envelope = Envelope::new(event);
        let mut subs = subs.lock();
        subs.retain(|s| !s.conn.is_closed());
        for s in subs.iter() {
            s.conn.push(Arc::clone(&envelope));
        }
    }

    /// Subscribes `conn` to its domain's inbox and returns the current list.
    pub async fn subscribe(
        &self,
        conn: &ConnHandle,
        statuses: Vec<RoomStatus>,
    ) -> Result<Vec<InboxEntry>, ServiceError> {
        let identity = conn.identity();
        let filter = InboxFilter {
            statuses,
            ..InboxFilter::default()
        };
        let list = self.list(identity, filter).await?;
        let domain = Arc::clone(&identity.domain_id);
        let subs = self.inbox.entry(domain).or_default();
        let mut subs = subs.lock();
        if !subs.iter().any(|s| s.conn.id() == conn.id()) {
            subs.push(Subscriber {
                conn: conn.clone(),
                agent: Agent {
                    user_id: identity.user_id.clone(),
                    name: identity.name.clone(),
                },
                _watching: Arc::new(self.shared.online(identity, INBOX_WATCHER)),
            });
        }
        Ok(list)
    }

    /// Ends `conn`'s inbox subscription; true if it had one.
    pub fn unsubscribe(&self, conn: &ConnHandle) -> bool {
        let Some(subs) = self.inbox.get(&*conn.identity().domain_id) else {
            return false;
        };
        let mut subs = subs.lock();
        let before = subs.len();
        subs.retain(|s| s.conn.id() != conn.id());
        subs.len() != before
    }

    /// The domain's inbox for `identity` (agents, admins, the back end).
    pub async fn list(
        &self,
        identity: &Identity,
        filter: InboxFilter,
    ) -> Result<Vec<InboxEntry>, ServiceError> {
        if !policy::may_assign(identity) {
            return Err(ServiceError::Forbidden(
                "the inbox is for the domain's agents".into(),
            ));
        }
        if filter
            .text
            .as_ref()
            .is_some_and(|t| t.chars().count() > MAX_SEARCH_CHARS)
        {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidQuery,
                format!("a search may hold at most {MAX_SEARCH_CHARS} characters"),
            ));
        }
        let max = self.chat.limits().max_page;
        let limit = filter.limit.unwrap_or(50).clamp(1, max);
        let entries = self
            .store()
            .inbox(InboxQuery {
                domain_id: identity.domain_id.to_string(),
                statuses: filter.statuses,
                reader: identity.user_id.clone(),
                limit,
                opened_by: filter.visitor,
                text: filter.text,
            })
            .await?;
        for e in &entries {
            self.remember(
                &e.conversation.room,
                RoomState {
                    conversation: Arc::new(e.conversation.clone()),
                    created_by: e.created_by.as_deref().map(Arc::from),
                    visitor_name: e.visitor_name.as_deref().map(Arc::from),
                    created_at: e.created_at,
                },
            );
        }
        Ok(entries)
    }

    /// The domain's agents with an inbox open on this node.
    pub async fn agents_online(&self, domain: &str) -> Vec<Agent> {
        let mut agents: Vec<Agent> = Vec::new();
        if let Some(subs) = self.inbox.get(domain) {
            for s in subs.lock().iter().filter(|s| !s.conn.is_closed()) {
                if !agents.iter().any(|a| a.user_id == s.agent.user_id) {
                    agents.push(s.agent.clone());
                }
            }
        }
        // Those watching on other nodes (with Redis; without it the list above is all).
        // Boxed: this future would otherwise sit in every connection's task, used or not.
        let remote = Box::pin(self.shared.online_users(domain, INBOX_WATCHER)).await;
        for (user_id, name) in remote {
            if !agents.iter().any(|a| a.user_id == user_id) {
                agents.push(Agent { user_id, name });
            }
        }
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        agents
    }

    /// `GET /api/agents`.
    pub async fn agents(&self, identity: &Identity) -> Result<Vec<Agent>, ServiceError> {
        if !policy::may_assign(identity) {
            return Err(ServiceError::Forbidden(
                "the agent list is for the domain's agents".into(),
            ));
        }
        Ok(self.agents_online(&identity.domain_id).await)
    }

    /// Stores an internal note and shows it to the domain's agents.
    pub async fn add_note(
        &self,
        identity: &Identity,
        room_id: &str,
        text: &str,
    ) -> Result<Note, ServiceError> {
        let key = self.support_room(identity, room_id)?;
        if !policy::may_assign(identity) {
            return Err(ServiceError::Forbidden(
                "notes are for the domain's agents".into(),
            ));
        }
        if text.trim().is_empty() {
            return Err(ServiceError::invalid(
                ErrorCode::EmptyMessage,
                "a note needs text",
            ));
        }
        let max = MAX_NOTE_BYTES.min(self.chat.limits().max_message_bytes);
        if text.len() > max {
            return Err(ServiceError::TooLarge {
                code: ErrorCode::MessageTooLong,
                message: format!("a note is {} bytes; the limit is {max}", text.len()),
            });
        }
        if self.store().room(&key).await?.is_none() {
            return Err(ServiceError::RoomNotFound);
        }
        let note = self
            .store()
            .add_note(NewNote {
                room: key,
                author: Agent {
                    user_id: identity.user_id.clone(),
                    name: identity.name.clone(),
                },
                text: text.to_owned(),
            })
            .await?;
        self.push_to_agents(
            &identity.domain_id,
            Event::NoteAdded(Arc::new(note.clone())),
        );
        Ok(note)
    }

    /// The room's notes (agents only).
    pub async fn notes(
        &self,
        identity: &Identity,
        room_id: &str,
    ) -> Result<Vec<Note>, ServiceError> {
        let key = self.support_room(identity, room_id)?;
        if !policy::may_assign(identity) {
            return Err(ServiceError::Forbidden(
                "notes are for the domain's agents".into(),
            ));
        }
        if self.store().room(&key).await?.is_none() {
            return Err(ServiceError::RoomNotFound);
        }
        Ok(self.store().notes(&key, NOTES_PAGE).await?)
    }

    /// Who opened a support room, for the agent beside it: their stored profile and
    /// context (page, browser, first and last seen) and their conversations in the domain,
    /// newest first. For the domain's agents.
    pub async fn visitor(
        &self,
        identity: &Identity,
        room_id: &str,
    ) -> Result<VisitorInfo, ServiceError> {
        let key = self.support_room(identity, room_id)?;
        if !policy::may_assign(identity) {
            return Err(ServiceError::Forbidden(
                "visitor details are for the domain's agents".into(),
            ));
        }
        let room = self
            .store()
            .room(&key)
            .await?
            .ok_or(ServiceError::RoomNotFound)?;
        let Some(user_id) = room.created_by else {
            return Ok(VisitorInfo::default());
        };
        let customer = self.store().customer(&key.domain_id, &user_id).await?;
        let filter = InboxFilter {
            limit: Some(VISITOR_ROOMS),
            visitor: Some(user_id.clone()),
            ..InboxFilter::default()
        };
        let conversations = self.list(identity, filter).await?;
        Ok(VisitorInfo {
            user_id: Some(user_id),
            customer,
            conversations,
        })
    }
}

impl crate::node::pipeline::Observer for HandoffService {
    fn observe(
        self: Arc<Self>,
        message: Arc<Message>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move { self.on_committed(message).await })
    }
}

impl Remote for HandoffService {
    fn conversation_changed(&self, conversation: Arc<Conversation>) {
        // A reply the bot streams on this node stops when a human takes the room elsewhere.
        // The state is remembered first: a visitor's message judged before it is caught by
        // the stop's time, one judged after it sees the new state.
        self.remember_conversation(&conversation);
        if conversation.status != RoomStatus::Bot {
            self.ai.stop(&conversation.room);
        }
    }

    fn to_agents(&self, domain: &str, event: Event) {
        self.push_to_local_agents(domain, event);
    }
}

/// `messageType` of the system messages recording transitions.
pub const STATUS_KIND: &str = "status";

/// The system message recording a transition.
fn status_message(
    room: &RoomKey,
    text: String,
    action: &str,
    next: Option<&Conversation>,
) -> NewMessage {
    let status = next.map_or("bot", |c| c.status.as_str());
    let assignee = next
        .and_then(|c| c.assignee.as_ref())
        .map(|a| serde_json::json!({ "userId": a.user_id, "name": a.name }));
    NewMessage {
        room: room.clone(),
        author: Author {
            user_id: "system".to_owned(),
            name: "System".to_owned(),
            role: "system".to_owned(),
        },
        kind: STATUS_KIND.to_owned(),
        content: text,
        data: Some(serde_json::json!({
            "event": "status",
            "status": status,
            "action": action,
            "assignee": assignee,
        })),
        client_message_id: None,
    }
}

/// The decision of `action` by `actor`, made from the room's stored state inside the
/// store's transaction.
fn decider(action: Action, target: Option<Agent>, actor: Agent, settings: HandoffConfig) -> Decide {
    Arc::new(move |current: &Conversation| {
        let now = now_ms();
        let mut next = current.clone();
        let room = &current.room;
        let (text, name) = match &action {
            Action::Escalate { .. } => {
                if !matches!(current.status, RoomStatus::Bot | RoomStatus::Resolved) {
                    return None;
                }
                next = Conversation::new(room.clone());
                next.status = RoomStatus::Waiting;
                next.waiting_since = Some(now);
                let open = settings.hours().map_or(true, |h| h.is_open(now));
                let text = if open {
                    settings.connecting_text.clone()
                } else {
                    settings.out_of_hours_text.clone()
                };
                (text, "escalate")
            }
            Action::Assign(_) => {
                let target = target.clone()?;
                if current.status == RoomStatus::Assigned {
                    return None;
                }
                if current.status == RoomStatus::Resolved {
                    next = Conversation::new(room.clone());
                }
                next.status = RoomStatus::Assigned;
                next.assigned_at = Some(now);
                let text = format!("✅ You're now connected to {}", target.name);
                next.assignee = Some(target);
                (text, "assign")
            }
            Action::Transfer(_) => {
                let target = target.clone()?;
                let from = current.assignee.clone()?;
                if current.status != RoomStatus::Assigned || from.user_id == target.user_id {
                    return None;
                }
                next.assigned_at = Some(now);
                let text = format!(
                    "{} transferred the conversation to {}. You're now connected to {}",
                    from.name, target.name, target.name
                );
                next.assignee = Some(target);
                (text, "transfer")
            }
            Action::Unassign => {
                let from = current.assignee.clone()?;
                if current.status != RoomStatus::Assigned {
                    return None;
                }
                next.status = RoomStatus::Waiting;
                next.assignee = None;
                next.assigned_at = None;
                next.waiting_since = current.waiting_since.or(Some(now));
                (
                    format!(
                        "{} left the conversation. Waiting for another agent…",
                        from.name
                    ),
                    "unassign",
                )
            }
            Action::Resolve => {
                if current.status == RoomStatus::Resolved {
                    return None;
                }
                next.status = RoomStatus::Resolved;
                next.assignee = None;
                next.resolved_at = Some(now);
                (
                    format!("This conversation was resolved by {}.", actor.name),
                    "resolve",
                )
            }
        };
        let message = status_message(room, text, name, Some(&next));
        Some((next, message))
    })
}

/// Whether `text` contains one of `phrases` as whole words, ignoring case.
pub fn asks_for_human(text: &str, phrases: &[String]) -> bool {
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric() && c != '\'')
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let text = words(text);
    phrases.iter().any(|p| {
        let phrase = words(p);
        !phrase.is_empty() && text.windows(phrase.len()).any(|w| w == phrase.as_slice())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_match_whole_words() {
        let phrases = HandoffConfig::default().phrases;
        assert!(asks_for_human("I need to speak with a HUMAN!", &phrases));
        assert!(asks_for_human("can I talk to a real person", &phrases));
        assert!(!asks_for_human("what is humane design", &phrases));
        assert!(!asks_for_human("how do reconnects work", &phrases));
        assert!(!asks_for_human("", &phrases));
    }

    fn agent(id: &str) -> Agent {
        Agent {
            user_id: id.into(),
            name: id.to_uppercase(),
        }
    }

    #[test]
    fn the_state_machine() {
        let room = RoomKey::new("d", "r");
        let settings = HandoffConfig::default();
        let run = |c: &Conversation, a: Action, t: Option<Agent>| {
            decider(a, t, agent("actor"), settings.clone())(c).map(|(n, _)| n)
        };
        let bot = Conversation::new(room);
        let waiting = run(&bot, Action::Escalate { reason: None }, None).unwrap();
        assert_eq!(waiting.status, RoomStatus::Waiting);
        assert!(waiting.waiting_since.is_some());
        assert!(run(&waiting, Action::Escalate { reason: None }, None).is_none());
        let assigned = run(&waiting, Action::Assign(None), Some(agent("a"))).unwrap();
        assert_eq!(assigned.assignee, Some(agent("a")));
        assert_eq!(assigned.waiting_since, waiting.waiting_since);
        assert!(run(&assigned, Action::Assign(None), Some(agent("b"))).is_none());
        let moved = run(
            &assigned,
            Action::Transfer(AgentRef {
                user_id: "b".into(),
                name: None,
            }),
            Some(agent("b")),
        )
        .unwrap();
        assert_eq!(moved.assignee, Some(agent("b")));
        let back = run(&moved, Action::Unassign, None).unwrap();
        assert_eq!(
            (back.status, back.assignee.clone()),
            (RoomStatus::Waiting, None)
        );
        assert!(run(&back, Action::Unassign, None).is_none());
        let done = run(&back, Action::Resolve, None).unwrap();
        assert_eq!(done.status, RoomStatus::Resolved);
        assert!(run(&done, Action::Resolve, None).is_none());
        let again = run(&done, Action::Escalate { reason: None }, None).unwrap();
        assert_eq!(again.status, RoomStatus::Waiting);
        assert!(again.resolved_at.is_none());
    }
}
