//! The hand-off service as the commit pipeline's observer: each committed message judged
//! on the room's state (reopen, the bot's turn or the offer of a human, the first response),
//! and changes announced by other nodes.

use super::*;

impl HandoffService {
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
        // Judge the message on the room's state as it stands. The cached copy is current
        // when it already holds the change a status message records, or, with several
        // nodes, when this node committed the room's previous message too (another node's
        // change would have stored a message in between); otherwise the store is asked. A
        // single node makes every change itself, so its copy is current.
        let status = message.kind == STATUS_KIND;
        let cluster = self.broker.topology().is_cluster();
        let current = self.rooms.get(key).is_some_and(|s| {
            if status {
                s.conversation.status_seq >= message.seq
            } else {
                !cluster || s.observed + 1 == message.seq
            }
        });
        let mut fresh = current;
        if !current && (status || (cluster && (visitor || agent))) {
            self.metrics.handoff_state_reads.inc();
            match self.store().conversation(key).await {
                Ok(Some(c)) => {
                    self.remember_conversation(&Arc::new(c));
                    fresh = true;
                }
                Ok(None) => fresh = true,
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
        if fresh && let Some(mut entry) = self.rooms.get_mut(key) {
            entry.observed = entry.observed.max(message.seq);
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

    pub(super) async fn on_visitor_message(
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
                // Counted every time, logged once per room: a domain set up this way would
                // otherwise write a warning per message.
                self.metrics.unanswered("no_assistant_no_handoff");
                let first = self
                    .rooms
                    .get_mut(key)
                    .is_none_or(|mut entry| !std::mem::replace(&mut entry.warned_unanswered, true));
                if first {
                    tracing::warn!(
                        room = %key,
                        "a visitor wrote in a domain with neither an assistant nor hand-off: nobody will answer"
                    );
                }
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
    pub(super) async fn wait_for_a_person(
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
    pub(super) async fn offer_human(&self, key: &RoomKey, settings: &HandoffConfig) {
        let assistant = assistant_identity(&self.domains, &key.domain_id);
        let out = Outgoing {
            room_id: &key.room_id,
            text: settings.offer_text.clone(),
            role: Some("assistant"),
            data: Some(escalate_action(&settings.action_label)),
            ..Outgoing::default()
        };
        if let Err(e) = self.chat.send_internal(&assistant, out).await {
            tracing::warn!(room = %key, error = %e, "cannot store the offer of a human");
        }
    }

    pub(super) fn has_subscribers(&self, domain: &str) -> bool {
        self.inbox
            .get(domain)
            .is_some_and(|subs| !subs.lock().is_empty())
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
