//! Who may do what. Every transport and handler asks here; none decides on its own.
//!
//! Rooms are addressed within the caller's own domain ([`room_key`]), so no request can name
//! a room of another tenant. Inside it, agents, admins and services use every room, and
//! visitors the rooms they created unless the domain is `open` ([`may_use_room`]).
//! Hand-off ([`may_escalate`], [`may_assign`]), usage ([`may_read_usage`]), the server API
//! ([`may_publish`], [`may_issue_tokens`]) and domain administration
//! ([`may_manage_domains`]) are decided here too.

use crate::config::VisitorRooms;
use crate::model::{Identity, MESSAGE_ROLES, Role, Room, RoomKey};

/// The domain of the server-wide administrator (an admin key): no tenant has this id.
pub const ALL_DOMAINS: &str = "*";

/// Whether `identity` may create, change and delete domains and their keys: only the
/// server-wide administrator, never an `admin` of one domain (whose token its own identity
/// provider may have issued).
pub fn may_manage_domains(identity: &Identity) -> bool {
    identity.role == Role::Admin && &*identity.domain_id == ALL_DOMAINS
}

/// The key of room `room_id` as seen by `identity`: always inside the identity's domain.
pub fn room_key(identity: &Identity, room_id: &str) -> RoomKey {
    RoomKey::new(identity.domain_id.clone(), room_id)
}

/// Whether `identity` may join, read and write `room` (`None`: it does not exist yet, and
/// using it creates it as the caller's).
pub fn may_use_room(identity: &Identity, visitor_rooms: VisitorRooms, room: Option<&Room>) -> bool {
    match identity.role {
        Role::Agent | Role::Admin | Role::Service => true,
        Role::Visitor => match (visitor_rooms, room) {
            (VisitorRooms::Open, _) | (VisitorRooms::Owned, None) => true,
            (VisitorRooms::Owned, Some(room)) => {
                room.created_by.as_deref() == Some(identity.user_id.as_str())
                    || identity.room.as_deref() == Some(&*room.key.room_id)
            }
        },
    }
}

/// Whether using a room of this domain needs [`may_use_room`] at all: saves the store a
/// lookup for everyone it would let in anyway.
pub fn room_check_needed(identity: &Identity, visitor_rooms: VisitorRooms) -> bool {
    identity.role == Role::Visitor && visitor_rooms == VisitorRooms::Owned
}

/// Whether `identity` may publish into its domain's rooms through the server API.
pub fn may_publish(identity: &Identity) -> bool {
    matches!(identity.role, Role::Service | Role::Admin)
}

/// Whether `identity` may ask for connection tokens for its domain's users.
pub fn may_issue_tokens(identity: &Identity) -> bool {
    matches!(identity.role, Role::Service | Role::Admin)
}

/// Whether a token may be issued with `role`: visitors and agents only, so a leaked server
/// key cannot mint administrators.
pub fn may_issue_role(role: Role) -> bool {
    matches!(role, Role::Visitor | Role::Agent)
}

/// Whether `identity` may ask for a human in `room` (hand-off): whoever may use the room —
/// its visitor, an agent, an admin or the domain's back end.
pub fn may_escalate(identity: &Identity, visitor_rooms: VisitorRooms, room: Option<&Room>) -> bool {
    may_use_room(identity, visitor_rooms, room)
}

/// Whether `identity` may assign a conversation of its domain to an agent (itself included),
/// take it back or resolve it: agents, admins and the domain's back end; never a visitor.
pub fn may_assign(identity: &Identity) -> bool {
    matches!(identity.role, Role::Agent | Role::Admin | Role::Service)
}

/// Whether `identity` may read its domain's usage and statistics (AI tokens, visitors,
/// conversations): the domain's admins and back end.
pub fn may_read_usage(identity: &Identity) -> bool {
    matches!(identity.role, Role::Admin | Role::Service)
}

/// Whether `identity` may read its domain's statistics page and endpoint (visitors,
/// conversations, response times): its agents as well as its admins and back end.
pub fn may_read_stats(identity: &Identity) -> bool {
    matches!(identity.role, Role::Agent | Role::Admin | Role::Service)
}

/// The role label a message written by `identity` carries. Only a service or an admin may
/// store a message under another label (the server API's `role` field, e.g. `assistant`);
/// anyone else writes as themselves, whatever the request says.
pub fn message_role(identity: &Identity, requested: Option<&str>) -> Result<String, &'static str> {
    match requested {
        Some(r) if !MESSAGE_ROLES.contains(&r) => Err("unknown message role"),
        Some(r) if matches!(identity.role, Role::Service | Role::Admin) => Ok(r.to_owned()),
        // The seeds' clients send `"role": "user"`/`"customer"` for their own messages; that
        // asks for nothing, so it is accepted and ignored.
        // A client-named identity (`anonymous_identity = "client"`) keeps the visitor name
        // it uses; everyone else's messages carry their role.
        Some(r @ ("user" | "customer" | "visitor")) if identity.label.is_some() => Ok(r.to_owned()),
        Some("user" | "customer" | "visitor") | None => {
            Ok(identity.label.unwrap_or(identity.role.as_str()).to_owned())
        }
        Some(r) if r == identity.role.as_str() => Ok(r.to_owned()),
        Some(_) => Err("a client cannot choose the role of its messages"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::anonymous;

    #[test]
    fn visitors_cannot_claim_roles() {
        let v = anonymous();
        assert_eq!(message_role(&v, None).as_deref(), Ok("visitor"));
        assert_eq!(message_role(&v, Some("user")).as_deref(), Ok("visitor"));
        assert!(message_role(&v, Some("assistant")).is_err());
        assert!(message_role(&v, Some("admin")).is_err());
        assert!(message_role(&v, Some("nonsense")).is_err());
        let mut s = anonymous();
        s.role = Role::Service;
        assert_eq!(
            message_role(&s, Some("assistant")).as_deref(),
            Ok("assistant")
        );
    }

    #[test]
    fn visitors_use_only_their_own_rooms_unless_the_domain_is_open() {
        let me = anonymous();
        let room = |by: Option<&str>| Room {
            key: RoomKey::new("demo", "r"),
            kind: "support".into(),
            created_by: by.map(str::to_owned),
            last_seq: 0,
            created_at: chrono::Utc::now(),
        };
        let mine = room(Some(&me.user_id));
        let theirs = room(Some("someone-else"));
        let nobodys = room(None);
        assert!(may_use_room(&me, VisitorRooms::Owned, None));
        assert!(may_use_room(&me, VisitorRooms::Owned, Some(&mine)));
        assert!(!may_use_room(&me, VisitorRooms::Owned, Some(&theirs)));
        assert!(!may_use_room(&me, VisitorRooms::Owned, Some(&nobodys)));
        assert!(may_use_room(&me, VisitorRooms::Open, Some(&theirs)));
        let mut agent = anonymous();
        agent.role = Role::Agent;
        assert!(may_use_room(&agent, VisitorRooms::Owned, Some(&theirs)));
        assert!(!room_check_needed(&agent, VisitorRooms::Owned));
        assert!(room_check_needed(&me, VisitorRooms::Owned));
        assert!(!room_check_needed(&me, VisitorRooms::Open));
    }

    #[test]
    fn hand_off_and_usage_follow_roles() {
        let me = anonymous();
        let room = Room {
            key: RoomKey::new("demo", "r"),
            kind: "support".into(),
            created_by: Some(me.user_id.clone()),
            last_seq: 0,
            created_at: chrono::Utc::now(),
        };
        let mut other = anonymous();
        other.user_id = "someone-else".into();
        assert!(may_escalate(&me, VisitorRooms::Owned, Some(&room)));
        assert!(!may_escalate(&other, VisitorRooms::Owned, Some(&room)));
        assert!(!may_assign(&me) && !may_read_usage(&me));
        for (role, assign, usage) in [
            (Role::Agent, true, false),
            (Role::Admin, true, true),
            (Role::Service, true, true),
        ] {
            let mut who = anonymous();
            who.role = role;
            assert_eq!(may_assign(&who), assign, "{role}");
            assert_eq!(may_read_usage(&who), usage, "{role}");
            assert!(may_escalate(&who, VisitorRooms::Owned, Some(&room)));
        }
        let mut domain_admin = anonymous();
        domain_admin.role = Role::Admin;
        assert!(
            !may_manage_domains(&domain_admin),
            "a domain's admin is not the server's"
        );
        domain_admin.domain_id = ALL_DOMAINS.into();
        assert!(may_manage_domains(&domain_admin));
    }

    #[test]
    fn keys_stay_in_domain() {
        let v = anonymous();
        assert_eq!(&*room_key(&v, "r1").domain_id, "demo");
    }
}
