//! The agents' frames: hand-off actions on a room, notes, and the live inbox; and a
//! user's subscription to their notifications.

use super::*;

impl Connection {
    /// Runs a hand-off action on the frame's room (or the current one) and answers with the
    /// room's state.
    pub(super) async fn handoff(
        &mut self,
        socket: &mut WsSocket,
        room_id: Option<&str>,
        action: Action,
        reply_to: ReplyTo,
    ) -> Sent {
        let identity = Arc::clone(self.handle.identity());
        let result = match self.target_room(room_id) {
            Ok(room) => self.app.handoff.act(&identity, &room, action).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => {
                let frame = json!({
                    "type": "room-status",
                    "replyTo": reply_to,
                    "roomId": &*outcome.conversation.room.room_id,
                    "seq": outcome.seq,
                    "changed": outcome.changed,
                    "conversation": conversation_json(&outcome.conversation),
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    pub(super) async fn escalate(
        &mut self,
        socket: &mut WsSocket,
        f: EscalateFrame,
        reply_to: ReplyTo,
    ) -> Sent {
        let action = Action::Escalate { reason: f.reason };
        self.handoff(socket, f.room_id.as_deref(), action, reply_to)
            .await
    }

    pub(super) async fn assign(
        &mut self,
        socket: &mut WsSocket,
        f: AgentFrame,
        reply_to: ReplyTo,
    ) -> Sent {
        let agent = f.agent_id.map(|user_id| AgentRef {
            user_id,
            name: f.agent_name,
        });
        self.handoff(
            socket,
            f.room_id.as_deref(),
            Action::Assign(agent),
            reply_to,
        )
        .await
    }

    pub(super) async fn transfer(
        &mut self,
        socket: &mut WsSocket,
        f: AgentFrame,
        reply_to: ReplyTo,
    ) -> Sent {
        let Some(user_id) = f.agent_id else {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::InvalidFrame,
                    "invalid frame: missing field `agentId`",
                )
                .await;
        };
        let agent = AgentRef {
            user_id,
            name: f.agent_name,
        };
        self.handoff(
            socket,
            f.room_id.as_deref(),
            Action::Transfer(agent),
            reply_to,
        )
        .await
    }

    pub(super) async fn unassign(
        &mut self,
        socket: &mut WsSocket,
        f: RoomRef,
        reply_to: ReplyTo,
    ) -> Sent {
        self.handoff(socket, f.room_id.as_deref(), Action::Unassign, reply_to)
            .await
    }

    pub(super) async fn resolve(
        &mut self,
        socket: &mut WsSocket,
        f: RoomRef,
        reply_to: ReplyTo,
    ) -> Sent {
        self.handoff(socket, f.room_id.as_deref(), Action::Resolve, reply_to)
            .await
    }

    pub(super) async fn note(
        &mut self,
        socket: &mut WsSocket,
        f: NoteFrame,
        reply_to: ReplyTo,
    ) -> Sent {
        let identity = Arc::clone(self.handle.identity());
        let result = match self.target_room(f.room_id.as_deref()) {
            Ok(room) => self.app.handoff.add_note(&identity, &room, &f.text).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(note) => {
                let frame = json!({
                    "type": "note-added",
                    "replyTo": reply_to,
                    "roomId": &*note.room.room_id,
                    "note": note_json(&note),
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    pub(super) async fn subscribe_inbox(
        &mut self,
        socket: &mut WsSocket,
        f: SubscribeInbox,
        reply_to: ReplyTo,
    ) -> Sent {
        let statuses = match parse_statuses(f.status.as_deref()) {
            Ok(s) => s,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        match self.app.handoff.subscribe(&self.handle, statuses).await {
            Ok(entries) => {
                let list: Vec<Value> = entries.iter().map(|e| inbox_entry_json(e, true)).collect();
                let agents: Vec<Value> = self
                    .app
                    .handoff
                    .agents_online(&self.handle.identity().domain_id)
                    .await
                    .iter()
                    .map(agent_json)
                    .collect();
                let frame = json!({
                    "type": "inbox",
                    "replyTo": reply_to,
                    "conversations": list,
                    "agents": agents,
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }
}

/// The statuses an inbox filter names: `open` (all but resolved; the default), `all`, or
/// one status.
pub fn parse_statuses(filter: Option<&str>) -> Result<Vec<RoomStatus>, ServiceError> {
    match filter.unwrap_or("open") {
        "open" => Ok(vec![
            RoomStatus::Bot,
            RoomStatus::Waiting,
            RoomStatus::Assigned,
        ]),
        "all" => Ok(Vec::new()),
        other => RoomStatus::parse(other).map(|s| vec![s]).ok_or_else(|| {
            ServiceError::invalid(
                ErrorCode::InvalidStatus,
                "status must be open, all, bot, waiting, assigned or resolved",
            )
        }),
    }
}

impl Connection {
    /// `subscribe-notifications`: the user's notifications stored after `since` (at most
    /// the latest 256), then each new one, as `notification` frames
    /// (`docs/notifications.md`).
    pub(super) async fn subscribe_notifications(
        &mut self,
        socket: &mut WsSocket,
        f: SubscribeNotifications,
        reply_to: ReplyTo,
    ) -> Sent {
        // The stored ones are queued before this answer is written, and written after it.
        match self
            .app
            .notifications
            .subscribe(&self.handle, f.since)
            .await
        {
            Ok(count) => {
                let frame = json!({
                    "type": "notifications-subscribed",
                    "replyTo": reply_to,
                    "unread": count.unread,
                    "lastSeq": count.last_seq,
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }
}
