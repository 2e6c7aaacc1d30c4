//! Who is present in one room or Pusher channel on this node: connections per user (tabs
//! of one user count once), and the leaves the [`Presence`] holds back until it knows
//! whether the user is on another node. Rooms and channels keep one each, behind their own
//! lock; the roster decides, the caller announces.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::broker::Presence;
use crate::event::PresentUser;
use crate::model::{Identity, RoomKey};

/// What a roster knows of a user: an id, and how the user is shown.
pub trait Named: std::fmt::Debug {
    /// The user's id.
    fn user_id(&self) -> &str;
    /// How the user is shown in presence.
    fn present(&self) -> PresentUser;
}

impl Named for Identity {
    fn user_id(&self) -> &str {
        &self.user_id
    }

    fn present(&self) -> PresentUser {
        PresentUser {
            user_id: self.user_id.clone(),
            name: self.name.clone(),
            role: self.role,
            info: None,
        }
    }
}

impl Named for PresentUser {
    fn user_id(&self) -> &str {
        &self.user_id
    }

    fn present(&self) -> PresentUser {
        self.clone()
    }
}

/// A user as one of their connections has them, keyed by user id: a room's users cost it a
/// pointer each rather than copies of the user's fields.
#[derive(Debug)]
pub struct ByUser<T>(pub Arc<T>);

impl<T: Named> PartialEq for ByUser<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.user_id() == other.0.user_id()
    }
}

impl<T: Named> Eq for ByUser<T> {}

impl<T: Named> Hash for ByUser<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that a lookup by `&str` (through `Borrow`) finds it.
        self.0.user_id().hash(state);
    }
}

impl<T: Named> Borrow<str> for ByUser<T> {
    fn borrow(&self) -> &str {
        self.0.user_id()
    }
}

/// The users present in one room or channel on this node.
#[derive(Debug)]
pub struct Roster<T> {
    /// Connections per present user; a user is shown as their first connection has them.
    users: HashMap<ByUser<T>, usize>,
    /// Users whose leave the presence holds back (see [`Presence::left`]), with how many of
    /// their leaves are still to be settled. The members here never saw them go, so a
    /// rejoin meanwhile is not announced, and only the last of the leaves is.
    leaving: HashMap<String, u32>,
}

impl<T> Default for Roster<T> {
    fn default() -> Self {
        Self {
            users: HashMap::new(),
            leaving: HashMap::new(),
        }
    }
}

impl<T: Named> Roster<T> {
    /// A connection of `user` arrived; true when it is the user's first here.
    pub fn arrive(&mut self, user: Arc<T>) -> bool {
        let count = self.users.entry(ByUser(user)).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// Whether a leave of `user_id` is held back: the members here never saw the user go,
    /// so the user's return is no news to them.
    pub fn is_leaving(&self, user_id: &str) -> bool {
        self.leaving.contains_key(user_id)
    }

    /// A connection of `user_id` went; the user, when it was their last one here.
    pub fn depart(&mut self, user_id: &str) -> Option<PresentUser> {
        let count = self.users.get_mut(user_id)?;
        *count -= 1;
        if *count > 0 {
            return None;
        }
        self.users
            .remove_entry(user_id)
            .map(|(user, _)| user.0.present())
    }

    /// `user`'s last connection here went ([`Self::depart`]): tells `presence`, and returns
    /// the user when this node's members are to hear of it now; `None` when the presence
    /// holds the leave back until it knows whether the user is on another node (it then
    /// calls the node's `leave_settled`, which comes to [`Self::settle`]).
    pub fn left(
        &mut self,
        key: &RoomKey,
        user: PresentUser,
        presence: &dyn Presence,
    ) -> Option<PresentUser> {
        if presence.left(key, &user) {
            *self.leaving.entry(user.user_id).or_insert(0) += 1;
            None
        } else {
            // Announced now: a leave still held back has nothing left to say.
            self.leaving.remove(&user.user_id);
            Some(user)
        }
    }

    /// The presence settled a leave of `user_id` it held back; true when the members here
    /// are to hear of it now: it was the user's last outstanding leave, the user is on no
    /// other node (`gone`) and has not come back here.
    pub fn settle(&mut self, user_id: &str, gone: bool) -> bool {
        let Some(outstanding) = self.leaving.get_mut(user_id) else {
            return false;
        };
        *outstanding = outstanding.saturating_sub(1);
        if *outstanding > 0 {
            return false;
        }
        self.leaving.remove(user_id);
        gone && !self.users.contains_key(user_id)
    }

    /// Whether another node's announcement that `user_id` left is news here: not while the
    /// user is present here, or leaving here too (then this node's own leave tells).
    pub fn remote_leave_is_news(&self, user_id: &str) -> bool {
        !self.users.contains_key(user_id) && !self.leaving.contains_key(user_id)
    }

    /// Whether `user_id` is present here.
    pub fn contains(&self, user_id: &str) -> bool {
        self.users.contains_key(user_id)
    }

    /// How many users are present here.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether nobody is present here.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// At most `limit` of the users present here.
    pub fn present(&self, limit: usize) -> Vec<PresentUser> {
        self.users
            .keys()
            .take(limit)
            .map(|user| user.0.present())
            .collect()
    }
}
