//! The state machine itself: what each action does to a room's stored state, decided
//! inside the store's transaction, and the system message that records it.

use super::*;

/// `messageType` of the system messages recording transitions.
pub const STATUS_KIND: &str = "status";

/// The system message recording a transition.
pub(super) fn status_message(
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
pub(super) fn decider(
    action: Action,
    target: Option<Agent>,
    actor: Agent,
    settings: HandoffConfig,
) -> Decide {
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
