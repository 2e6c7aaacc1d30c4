//! Who may do what. Every transport and handler asks here; none decides on its own.
//!
//! Rooms are addressed within the caller's own domain ([`room_key`]), so no request can name
//! a room of another tenant. Finer rules (visitors limited to rooms they own, agents,
//! services) belong here as they arrive.

use crate::model::{Identity, MESSAGE_ROLES, Role, RoomKey};

/// The key of room `room_id` as seen by `identity`: always inside the identity's domain.
pub fn room_key(identity: &Identity, room_id: &str) -> RoomKey {
    RoomKey::new(identity.domain_id.clone(), room_id)
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
        Some("user" | "customer" | "visitor") | None => Ok(identity.role.as_str().to_owned()),
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
    fn keys_stay_in_domain() {
        let v = anonymous();
        assert_eq!(&*room_key(&v, "r1").domain_id, "demo");
    }
}
