//! The agents' side: the live inbox, its list and subscribers on every node, the agents
//! online, internal notes and the visitor beside a conversation.

use super::*;

impl HandoffService {
    /// Pushes the room's new inbox entry to the domain's subscribers.
    pub(super) fn push_inbox(&self, state: &RoomState, message: &Message) {
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
    pub(super) fn push_to_agents(&self, domain: &str, event: Event) {
        self.broker.to_agents(domain, &event);
        self.push_to_local_agents(domain, event);
    }

    pub(super) fn push_to_local_agents(&self, domain: &str, event: Event) {
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
                    observed: 0,
                    warned_unanswered: false,
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
