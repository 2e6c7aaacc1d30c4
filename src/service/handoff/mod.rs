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
//! the cache keeps the copy with the highest `version`. With several nodes a cached state
//! is trusted for a message only when this node also committed the room's previous message
//! (every change stores a status message in the room, so another node's change leaves a gap
//! in the `seq`s this node saw); after a gap the state is read from the store once.
//!
//! Depends on the chat service (storing, the hub), the AI service (the bot), the domain
//! table (hand-off settings) and `auth::policy`.
//!
//! Files: `observer` (committed messages and other nodes' changes), `inbox` (the agents'
//! side), `decide` (the transitions); this file holds the service, its cache of room
//! states and the requests agents and visitors make.

mod decide;
mod inbox;
mod observer;

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

pub use decide::{STATUS_KIND, asks_for_human};
use decide::{decider, status_message};

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
    /// The `seq` of the room's last message this node observed with `conversation` known
    /// to be current (0: none). The next message at `observed + 1` was committed here with
    /// nothing in between, so no other node can have changed the room: every change stores
    /// a status message in the room's stream.
    observed: u64,
    /// Whether this node has logged that nobody answers the room (once per room, however
    /// many messages go unanswered).
    warned_unanswered: bool,
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
            observed: 0,
            warned_unanswered: false,
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
            observed: 0,
            warned_unanswered: false,
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
}
