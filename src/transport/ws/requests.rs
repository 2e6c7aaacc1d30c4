//! What a client frame asks of the connection: authenticate, join, send, leave, history,
//! typing, read state, presence and questions to the assistant.

use super::*;
use crate::transport::files::attachment_ids;

impl Connection {
    /// `auth`: an anonymous connection becomes the token's identity. Allowed once, within
    /// [`AUTH_FRAME_WINDOW`] of connecting and before joining any room, so no room ever saw
    /// the connection under another identity.
    pub(super) async fn auth(&mut self, socket: &mut WsSocket, f: Auth, reply_to: ReplyTo) -> Sent {
        if !self.handle.identity().anonymous
            || !self.rooms.is_empty()
            || self.watched.elapsed_ms() > self.auth_until
        {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::AuthNotAllowed,
                    "send `auth` once, first, within 10 s of connecting, before joining a room",
                )
                .await;
        }
        if f.token.is_empty() {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::InvalidFrame,
                    "`token` must not be empty",
                )
                .await;
        }
        let identity = match self.app.auth.identify(Some(&f.token)).await {
            Ok(identity) => identity,
            Err(e) => {
                let message = e.to_string();
                return self.error(socket, reply_to, e.code(), &message).await;
            }
        };
        if !self
            .app
            .edge
            .origin_allowed(&identity.domain_id, self.origin.as_deref())
        {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::OriginNotAllowed,
                    "this origin may not use the domain (allowed_origins)",
                )
                .await;
        }
        let frame = json!({
            "type": "authenticated",
            "replyTo": reply_to,
            "userId": identity.user_id,
            "userName": identity.name,
            "role": identity.role.as_str(),
            "domainId": &*identity.domain_id,
        });
        // The connection now counts against the new domain's limits.
        let admitted = if identity.domain_id == self.handle.identity().domain_id {
            None
        } else {
            let Some(admitted) = admit_to_domain(&self.app, &identity) else {
                return self
                    .error(socket, reply_to, ErrorCode::TooManyConnections, DOMAIN_FULL)
                    .await;
            };
            Some(admitted)
        };
        self.rebind(identity, admitted);
        self.settled = true;
        self.display_name = None;
        self.current_room = None;
        self.send(socket, to_bytes(&frame)).await
    }

    /// Makes `identity` the connection's, in a room-less connection: a new handle and
    /// queue, counted among its online users and, when `admitted` (to another domain),
    /// against that domain's limits.
    pub(super) fn rebind(
        &mut self,
        identity: Identity,
        admitted: Option<(DomainPermit, Admitted)>,
    ) {
        if let Some((permit, admitted)) = admitted {
            self.permits.1 = permit;
            self.limiter = admitted.limiter;
            self.frame_rate = admitted.frame_rate;
        }
        let (handle, rx) = ConnHandle::bounded(
            self.handle.id(),
            Arc::new(identity),
            self.app.config.limits.outbound_queue,
            self.app.config.limits.outbound_queue_bytes,
        );
        self.watched.replace(&self.handle, &handle);
        self.handle = handle;
        self.rx = rx;
        let who = self.handle.identity();
        self.online = self.app.shared.online(who, who.role.as_str());
        self.dialect = dialect_of(&self.app, who);
    }

    /// A token-less connection's first `join-room`: the identity its fields settle
    /// ([`crate::auth::Authenticator::settle`]) becomes the connection's. The `?roomId=`
    /// room joined at connect is left under the old identity and, in the same domain, kept
    /// with what the client was sent there (the join that follows sends only what is
    /// missing); a room of the domain it leaves is forgotten.
    pub(super) async fn settle(
        &mut self,
        socket: &mut WsSocket,
        f: &JoinRoom,
    ) -> Result<Sent, ServiceError> {
        let current = Arc::clone(self.handle.identity());
        let claimed = crate::auth::Claimed {
            domain_id: f.domain_id.as_deref(),
            user_id: f.user_id.as_deref(),
            user_name: f.user_name.as_deref(),
            role: f.role.as_deref(),
        };
        let identity = self
            .app
            .auth
            .settle(&current, claimed, self.origin.as_deref())?;
        if identity == *current {
            self.settled = true;
            return Ok(Ok(()));
        }
        // Admitted to the new domain first: a refusal leaves everything as it was.
        let admitted = if identity.domain_id == current.domain_id {
            None
        } else {
            Some(
                admit_to_domain(&self.app, &identity).ok_or_else(|| ServiceError::Conflict {
                    code: ErrorCode::TooManyConnections,
                    message: DOMAIN_FULL.to_owned(),
                })?,
            )
        };
        self.settled = true;
        let domain = Arc::clone(&identity.domain_id);
        for key in self.rooms.keys() {
            self.app.chat.leave(&self.handle, &key);
        }
        // What the old queue holds still goes out, in order, before the queue is replaced;
        // the positions it moves are the ones kept.
        while let Some(envelope) = self.rx.try_recv() {
            if let Err(gone) = Box::pin(self.write_events(socket, envelope)).await {
                return Ok(Err(gone));
            }
        }
        let joined = self.rooms.take();
        self.rebind(identity, admitted);
        // The current room stays the one named (a `join-room` without `roomId` joins it
        // in the new domain). A room of the same domain is joined again as the new
        // identity, from where the connection stands: what came meanwhile is written now.
        for (key, cursor) in joined {
            if key.domain_id != domain {
                continue;
            }
            let rejoined = self
                .app
                .chat
                .join(&self.handle, &key.room_id, Replay::Since(cursor.upto), None)
                .await?;
            self.rooms.insert(key, cursor);
            for m in rejoined.history {
                let envelope = Envelope::new(Event::Message(m));
                if self.rooms.advance(&envelope.event) == Step::Next {
                    write(socket, &envelope, self.dialect);
                }
            }
            if let Err(gone) = self.flush(socket).await {
                return Ok(Err(gone));
            }
        }
        Ok(Ok(()))
    }

    /// The key of the room a frame refers to: its `roomId`, else the current room.
    pub(super) fn room_of(&self, room_id: Option<&str>) -> Result<RoomKey, ServiceError> {
        let id = self.target_room(room_id)?;
        self.app.chat.room_key(self.handle.identity(), &id)
    }

    /// Like [`Self::room_of`], for a room this connection has joined.
    pub(super) fn joined_room(&self, room_id: Option<&str>) -> Result<RoomKey, ServiceError> {
        let key = self.room_of(room_id)?;
        if self.rooms.contains(&key) {
            Ok(key)
        } else {
            Err(not_joined())
        }
    }

    /// The room a frame refers to: its `roomId`, else the current room.
    pub(super) fn target_room(&self, room_id: Option<&str>) -> Result<String, ServiceError> {
        match room_id {
            Some(r) => Ok(r.to_owned()),
            None => self
                .current_room
                .as_deref()
                .map(str::to_owned)
                .ok_or_else(not_joined),
        }
    }

    /// Joins `room` as the `?roomId=` of the upgrade asked.
    pub(super) async fn auto_join(&mut self, socket: &mut WsSocket, room: String) -> Sent {
        let frame = JoinRoom {
            room_id: Some(room),
            auto: true,
            ..JoinRoom::default()
        };
        self.join(socket, frame, None).await
    }

    pub(super) async fn join(
        &mut self,
        socket: &mut WsSocket,
        mut f: JoinRoom,
        reply_to: ReplyTo,
    ) -> Sent {
        // The `?roomId=` room still waiting: this is the join it waited for (a `join-room`
        // naming no room joins it), and another room named here comes first.
        let pending = if f.auto {
            None
        } else {
            self.pending_join.take()
        };
        if let Some(room) = &pending
            && f.room_id.is_none()
        {
            f.room_id = Some(room.to_string());
        }
        // This frame asks for the waiting room itself (joined or refused, it is answered).
        let asks_for_it = pending
            .as_deref()
            .is_some_and(|room| f.room_id.as_deref() == Some(room));
        let sent = Box::pin(self.join_now(socket, f, reply_to)).await;
        match pending {
            // Still nobody (the frame was refused before it said who): it waits on.
            Some(room) if !self.settled => {
                self.pending_join = Some(room);
                sent
            }
            Some(_) if asks_for_it => sent,
            Some(room) if sent.is_ok() => Box::pin(self.auto_join(socket, room.to_string())).await,
            _ => sent,
        }
    }

    pub(super) async fn join_now(
        &mut self,
        socket: &mut WsSocket,
        f: JoinRoom,
        reply_to: ReplyTo,
    ) -> Sent {
        if !self.settled && !f.auto {
            match self.settle(socket, &f).await {
                Ok(sent) => sent?,
                Err(e) => return self.service_error(socket, reply_to, &e).await,
            }
        }
        let identity = Arc::clone(self.handle.identity());
        // A token's domain is the token's (a `domainId` beside it is not read); a
        // token-less connection stays in the domain its first `join-room` settled.
        if identity.anonymous
            && let Some(d) = f.domain_id.as_deref()
            && d != &*identity.domain_id
        {
            let message = format!(
                "this connection is in domain {:?}; use another connection for another domain",
                &*identity.domain_id
            );
            return self
                .error(socket, reply_to, ErrorCode::Forbidden, &message)
                .await;
        }
        if let Some(role) = f.role.as_deref()
            && let Err(m) = policy::message_role(&identity, Some(role))
        {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::Forbidden,
                    &format!("{m}; roles come from the token"),
                )
                .await;
        }
        let Ok(room_id) = self.target_room(f.room_id.as_deref()) else {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::InvalidFrame,
                    "missing `roomId`",
                )
                .await;
        };
        let key = match self.app.chat.room_key(&identity, &room_id) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let max_rooms = self.app.config.limits.rooms_per_connection;
        if !self.rooms.contains(&key) && self.rooms.len() >= max_rooms {
            let message = format!("a connection may join at most {max_rooms} rooms");
            return self
                .error(socket, reply_to, ErrorCode::TooManyRooms, &message)
                .await;
        }
        if identity.anonymous
            && let Some(name) = f.user_name.as_deref().filter(|n| !n.trim().is_empty())
        {
            self.display_name = Some(name.chars().take(MAX_NAME_CHARS).collect::<String>().into());
        }
        // The browser is kept only until the first join (the widget sends its context
        // then), not for the connection's whole life.
        let browser = self.browser.take();
        let context = f
            .context
            .as_ref()
            .filter(|_| identity.role == Role::Visitor)
            .and_then(|c| visitor_context(c, browser.as_deref()));
        let profile = (f.user_name.is_some() || f.customer_data.is_some() || context.is_some())
            .then(|| CustomerProfile {
                name: f.user_name.clone(),
                data: f.customer_data.clone().filter(Value::is_object),
                context,
            });
        // A room the connection is in already: only what it was never sent.
        let already = self.rooms.get(&key);
        let replay = match (already, f.since) {
            (Some(cursor), since) => Replay::Again { cursor, since },
            (None, Some(s)) => Replay::Since(s),
            (None, None) => Replay::Last(self.app.config.limits.history_on_join),
        };
        let joined = match self
            .app
            .chat
            .join(&self.handle, &room_id, replay, profile)
            .await
        {
            Ok(j) => j,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        self.current_room = Some(key.room_id.clone());
        let status = match self.app.handoff.status_of(&key).await {
            Some(c) => Some((c, self.app.handoff.service(&key.domain_id).await)),
            None => None,
        };
        let mut sent = self
            .send_joined(socket, &key, &joined, status.as_ref(), reply_to)
            .await;
        // A reply the assistant is streaming: its text so far, then the deltas that follow
        // (a delta whose index is not above this one's repeats text already given).
        if let (Ok(()), Some(partial)) = (&sent, self.app.ai.partial(&key)) {
            let frame = json!({
                "type": "message-delta",
                "roomId": &*key.room_id,
                "messageId": &*partial.message_id,
                "delta": partial.text,
                "index": partial.index,
                "catchUp": true,
            });
            sent = self.send(socket, to_bytes(&frame)).await;
        }
        let cursor = already.map_or_else(|| Cursor::of(&joined), |c| c.rejoined(&joined));
        // Under the hub's own key, which every message delivered here carries too.
        self.rooms
            .insert(self.app.chat.hub().canonical(key), cursor);
        sent
    }

    /// `room-joined`, then the catch-up as one or more `message-history` frames, written
    /// before anything from the queue so the client sees the room in `seq` order.
    pub(super) async fn send_joined(
        &self,
        socket: &mut WsSocket,
        key: &RoomKey,
        joined: &Joined,
        status: Option<&(Arc<Conversation>, Service)>,
        reply_to: ReplyTo,
    ) -> Sent {
        let members: Vec<WireUser<'_>> = joined.members.iter().map(WireUser::from).collect();
        let mut frame = json!({
            "type": "room-joined",
            "roomId": &*key.room_id,
            "replyTo": reply_to,
            "lastSeq": joined.last_seq,
            "members": members,
            "memberCount": joined.member_count,
            // So that a client can count what it may send (the widget's counter) instead
            // of learning it from a refusal.
            "limits": { "messageBytes": self.app.config.limits.max_message_bytes },
            "timestamp": iso(now_ms()),
        });
        // A support room says where it stands in the hand-off, and who answers there.
        if let Some((c, service)) = status {
            frame["status"] = c.status.as_str().into();
            frame["assignee"] = c.assignee.as_ref().map_or(Value::Null, agent_json);
            frame["service"] = json!({
                "assistant": service.assistant,
                "people": service.people,
                "open": service.open,
            });
        }
        socket.queue_text(&to_bytes(&frame));
        let chunk = self.app.config.limits.replay_chunk;
        let mut chunks = joined.history.chunks(chunk).peekable();
        if chunks.peek().is_none() {
            let frame = json!({ "type": "message-history", "roomId": &*key.room_id, "messages": [], "truncated": joined.truncated, "more": false });
            socket.queue_text(&to_bytes(&frame));
        }
        while let Some(part) = chunks.next() {
            let messages: Vec<WireMessage<'_>> = part.iter().map(|m| WireMessage::of(m)).collect();
            let frame = json!({
                "type": "message-history",
                "roomId": &*key.room_id,
                "messages": messages,
                "truncated": joined.truncated,
                "more": chunks.peek().is_some(),
            });
            socket.queue_text(&to_bytes(&frame));
        }
        self.flush(socket).await
    }

    /// Queues the message for the store and returns without waiting for its commit: its
    /// `message-ack` is written when the commit ends ([`Connection::queue_acks`]), while the
    /// client's next frames are read.
    pub(super) async fn send_message(
        &mut self,
        socket: &mut WsSocket,
        f: SendMessage,
        reply_to: ReplyTo,
    ) -> Sent {
        let key = match self.joined_room(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => {
                self.settle_sends(socket).await?;
                return self.service_error(socket, reply_to, &e).await;
            }
        };
        let identity = Arc::clone(self.handle.identity());
        self.app
            .handoff
            .take_on_reply(&identity, &key.room_id)
            .await;
        // Before the message is stored: the assistant's reply to it is charged to the
        // address it came from. Noted here, not at connect, so idle listeners cost nothing.
        if let Some(ip) = self.address {
            self.app.ai.note_visitor_address(&identity, ip);
        }
        let ids = attachment_ids(f.attachments.as_deref().unwrap_or_default());
        let attachments = match self
            .app
            .files
            .attachments(&identity, &key.room_id, &ids)
            .await
        {
            Ok(attachments) => attachments,
            Err(e) => {
                self.settle_sends(socket).await?;
                return self.service_error(socket, reply_to, &e).await;
            }
        };
        let out = Outgoing {
            room_id: &key.room_id,
            text: f.message,
            client_message_id: f.client_message_id,
            role: f.role.as_deref(),
            display_name: self.display_name.as_deref(),
            data: f.data,
            attachments,
        };
        match self.app.chat.submit(&identity, out).await {
            Ok(committing) => {
                self.sends.push_back(InFlight {
                    reply_to,
                    committing,
                });
                Ok(())
            }
            Err(e) => {
                self.settle_sends(socket).await?;
                self.service_error(socket, reply_to, &e).await
            }
        }
    }

    pub(super) async fn leave(
        &mut self,
        socket: &mut WsSocket,
        f: RoomRef,
        reply_to: ReplyTo,
    ) -> Sent {
        let key = match self.room_of(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        if !self.rooms.remove(&key) {
            return self.service_error(socket, reply_to, &not_joined()).await;
        }
        self.app.chat.leave(&self.handle, &key);
        if self.current_room.as_deref() == Some(&*key.room_id) {
            self.current_room = None;
        }
        let frame = json!({ "type": "room-left", "roomId": &*key.room_id, "replyTo": reply_to });
        self.send(socket, to_bytes(&frame)).await
    }

    pub(super) async fn history(
        &mut self,
        socket: &mut WsSocket,
        f: History,
        reply_to: ReplyTo,
    ) -> Sent {
        let key = match self.joined_room(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let room_id = &*key.room_id;
        let identity = Arc::clone(self.handle.identity());
        let limit = f.limit.unwrap_or(50);
        match self
            .app
            .chat
            .history(&identity, room_id, f.before, limit)
            .await
        {
            Ok((page, has_more)) => {
                let messages: Vec<WireMessage<'_>> = page.iter().map(WireMessage::of).collect();
                let frame = json!({
                    "type": "history",
                    "replyTo": reply_to,
                    "roomId": room_id,
                    "messages": messages,
                    "hasMore": has_more,
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    pub(super) async fn typing(
        &mut self,
        socket: &mut WsSocket,
        f: Typing,
        reply_to: ReplyTo,
    ) -> Sent {
        let result = self.room_of(f.room_id.as_deref()).and_then(|key| {
            self.app
                .chat
                .typing(&self.handle, &key, f.is_typing.unwrap_or(true))
        });
        match result {
            Ok(()) => Ok(()),
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    /// `ai-chat` → one `ai-response` when the answer is complete.
    pub(super) async fn ai_chat(
        &mut self,
        socket: &mut WsSocket,
        f: AskBody,
        reply_to: ReplyTo,
    ) -> Sent {
        self.ai(socket, f, reply_to, false).await
    }

    /// `ai-stream` → `ai-stream-start`, `ai-stream-delta`…, `ai-stream-end`.
    pub(super) async fn ai_stream(
        &mut self,
        socket: &mut WsSocket,
        f: AskBody,
        reply_to: ReplyTo,
    ) -> Sent {
        self.ai(socket, f, reply_to, true).await
    }

    /// Starts an answer; a task of its own sends it, so the connection keeps serving frames
    /// meanwhile. The answer stops when the connection ends.
    pub(super) async fn ai(
        &mut self,
        socket: &mut WsSocket,
        f: AskBody,
        reply_to: ReplyTo,
        stream: bool,
    ) -> Sent {
        let conversation = f.conversation_id.clone();
        let started = match f.caller(&self.app, self.handle.identity(), self.origin.as_deref()) {
            Ok(me) => self.app.ai.ask(&me, f.into_ask(), self.address).await,
            Err(e) => Err(e),
        };
        let mut events = match started {
            Ok(events) => events,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let handle = self.handle.clone();
        let reply_to: Option<Value> = reply_to;
        let stream_id = format!("ai-{}", uuid::Uuid::now_v7().simple());
        tokio::spawn(async move {
            let push = |frame: Value| {
                !handle.is_closed() && handle.push(Envelope::new(Event::Frame(to_bytes(&frame))))
            };
            let mut gathered = crate::transport::ai::Gathered::default();
            let mut index = 0;
            while let Some(event) = events.recv().await {
                gathered.add(&event);
                if !stream {
                    if handle.is_closed() {
                        return;
                    }
                    continue;
                }
                let mut v = crate::transport::ai::event_json(&event, &mut index);
                let kind = match v["type"].as_str() {
                    Some("start") => "ai-stream-start",
                    Some("delta") => "ai-stream-delta",
                    Some("fallback") => "ai-stream-fallback",
                    _ => continue,
                };
                v["type"] = kind.into();
                v["streamId"] = stream_id.as_str().into();
                v["replyTo"] = reply_to.clone().unwrap_or(Value::Null);
                if !push(v) {
                    return;
                }
            }
            let mut end = gathered.answer();
            end["type"] = if stream {
                "ai-stream-end"
            } else {
                "ai-response"
            }
            .into();
            end["replyTo"] = reply_to.unwrap_or(Value::Null);
            if stream {
                end["streamId"] = stream_id.into();
            }
            if let Some(id) = conversation {
                end["conversationId"] = id.into();
            }
            push(end);
        });
        Ok(())
    }

    pub(super) async fn read(&mut self, socket: &mut WsSocket, f: Read, reply_to: ReplyTo) -> Sent {
        let key = match self.joined_room(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let room_id = &*key.room_id;
        let identity = Arc::clone(self.handle.identity());
        match self.app.chat.mark_read(&identity, room_id, f.seq).await {
            Ok(seq) => {
                let frame = json!({
                    "type": "read-receipt",
                    "replyTo": reply_to,
                    "roomId": room_id,
                    "userId": identity.user_id,
                    "seq": seq,
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    pub(super) async fn presence(
        &mut self,
        socket: &mut WsSocket,
        f: RoomRef,
        reply_to: ReplyTo,
    ) -> Sent {
        let key = match self.joined_room(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let room_id = &*key.room_id;
        let users = self.app.chat.hub().presence_all(&key).await;
        let members: Vec<WireUser<'_>> = users.iter().map(WireUser::from).collect();
        let frame = json!({ "type": "presence", "replyTo": reply_to, "roomId": room_id, "members": members });
        self.send(socket, to_bytes(&frame)).await
    }
}
