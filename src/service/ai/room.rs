//! The bot in support rooms: replies to committed visitor messages, streamed as deltas
//! and stored once, cancelled by a newer question, an agent or the room emptying.

use super::*;

/// How many of a room's latest messages are searched for an earlier offer of a human.
pub(super) const OFFER_LOOKBACK: usize = 500;
/// What the assistant says to a question nobody can answer once it has offered a human.
pub(super) const REPHRASE: &str =
    "Sorry, I couldn't find an answer to that. Could you put it another way?";

/// A reply being streamed into a room.
#[derive(Debug)]
pub(super) struct Generation {
    pub(super) cancel: CancellationToken,
    pub(super) partial: Arc<Mutex<Partial>>,
}

impl AiService {
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
    pub(super) async fn answer_in_room(
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
    pub(super) async fn offered_human(&self, question: &Message) -> bool {
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
    pub(super) async fn store_reply(
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

    pub(super) async fn store_system(&self, room: &RoomKey, text: &str, data: serde_json::Value) {
        self.post(room, "system", text.to_owned(), None, data).await;
    }

    pub(super) async fn post(
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
            ..Outgoing::default()
        };
        if let Err(e) = self.chat.send_internal(&assistant, out).await {
            tracing::warn!(room = %room, error = %e, "cannot store the assistant's message");
        }
    }
}

/// What the model is told so it can hand over by itself.
pub(super) const HANDOFF_INSTRUCTION: &str = "If the visitor asks to talk to a person, or you cannot help \
     them, say so briefly and end your reply with the marker [handoff]; the visitor will then \
     be offered a human agent.";

/// Takes the `[handoff]` marker out of a streamed reply, even when it arrives split over
/// several deltas: text that could be the start of the marker is held back until the next
/// delta shows whether it is.
#[derive(Debug, Default)]
pub(super) struct HandoffMarker {
    pub(super) held: String,
    pub(super) seen: bool,
}

impl HandoffMarker {
    const MARKER: &'static str = "[handoff]";

    /// The part of `delta` that can be shown now.
    pub(super) fn filter(&mut self, delta: &str) -> String {
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
    pub(super) fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.held);
        rest.trim_end().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::HandoffMarker;

    #[test]
    pub(super) fn the_handoff_marker_is_taken_out_even_when_split() {
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
