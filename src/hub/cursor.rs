//! Where one connection stands in one room: the stretch of the room's stream it has been
//! sent.
//!
//! The hub hands every member a room's messages in `seq` order, but a connection does not
//! take that on trust. A transport keeps one [`Cursor`] per joined room and passes each
//! stored message it is about to write through [`Cursor::step`]:
//!
//! - the next `seq` is written and becomes the position;
//! - a `seq` the connection was already sent is dropped (a rejoin, or a catch-up that
//!   overlapped the queue);
//! - a `seq` further ahead is a gap: the transport reads the missing range with
//!   [`super::Hub::messages_between`] (the room cache, else the store) and writes it first.
//!
//! So whichever way a message reached the connection (this node's commit, the broker, a
//! catch-up from the store), the client gets the room in `seq` order with no gap and no
//! duplicate (invariant 2 of the design).

use super::{Event, Joined};
use crate::model::RoomKey;

/// The part of a room's stream a connection has been sent: every message with
/// `from < seq <= upto`. Older messages it was never sent; later ones are on their way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The connection's catch-up started after this `seq`.
    pub from: u64,
    /// The last `seq` sent: the connection's position.
    pub upto: u64,
}

/// What to do with a stored message of the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It is the next one: write it.
    Next,
    /// The connection was sent it already: drop it.
    Sent,
    /// Messages `after + 1 ..= before - 1` are missing: write them first, then this one.
    Gap {
        /// The position.
        after: u64,
        /// The message's `seq`.
        before: u64,
    },
}

impl Cursor {
    /// Where a connection stands once it has been sent the catch-up of `joined`.
    pub fn of(joined: &Joined) -> Self {
        Self {
            from: joined
                .history
                .first()
                .map_or(joined.last_seq, |m| m.seq.saturating_sub(1)),
            upto: joined.last_seq,
        }
    }

    /// Where a connection that was at `self` stands once it has been sent the catch-up of
    /// a rejoin (older messages it had never been sent; the position does not move).
    #[must_use]
    pub fn rejoined(self, joined: &Joined) -> Self {
        Self {
            from: joined
                .history
                .first()
                .map_or(self.from, |m| m.seq.saturating_sub(1).min(self.from)),
            upto: self.upto,
        }
    }

    /// What to do with the message `seq` of the room.
    pub fn step(&self, seq: u64) -> Step {
        if seq <= self.upto {
            Step::Sent
        } else if seq == self.upto + 1 {
            Step::Next
        } else {
            Step::Gap {
                after: self.upto,
                before: seq,
            }
        }
    }

    /// The message `seq` was written.
    pub fn sent(&mut self, seq: u64) {
        self.upto = self.upto.max(seq);
    }
}

/// A connection's [`Cursor`] in each room it joined.
///
/// A list, not a map: most connections are in one room and none in more than
/// `limits.rooms_per_connection` (64), so a scan costs less than hashing the key, and one
/// entry costs 48 bytes on the heap where a hash map's smallest table took over 200.
#[derive(Debug, Default)]
pub struct Cursors(Vec<(RoomKey, Cursor)>);

impl Cursors {
    /// The cursor in `room`, if the connection joined it.
    pub fn get(&self, room: &RoomKey) -> Option<Cursor> {
        self.0.iter().find(|(k, _)| k == room).map(|(_, c)| *c)
    }

    /// The cursor in `room`, to move it.
    pub fn get_mut(&mut self, room: &RoomKey) -> Option<&mut Cursor> {
        self.0.iter_mut().find(|(k, _)| k == room).map(|(_, c)| c)
    }

    /// Where `event` stands against the connection's position in its room, moving the
    /// position past it when it is the next message. Events other than stored messages
    /// are always `Next`; a message of a room the connection is not in is `Sent` (nothing
    /// more to get there).
    pub fn advance(&mut self, event: &Event) -> Step {
        let Event::Message(message) = event else {
            return Step::Next;
        };
        let Some(cursor) = self.get_mut(&message.room) else {
            return Step::Sent;
        };
        let step = cursor.step(message.seq);
        if step == Step::Next {
            cursor.sent(message.seq);
        }
        step
    }

    /// Whether the connection joined `room`.
    pub fn contains(&self, room: &RoomKey) -> bool {
        self.0.iter().any(|(k, _)| k == room)
    }

    /// Sets the cursor in `room`.
    pub fn insert(&mut self, room: RoomKey, cursor: Cursor) {
        match self.get_mut(&room) {
            Some(c) => *c = cursor,
            None => {
                // Exactly one more: a `Vec` would otherwise start at four entries.
                self.0.reserve_exact(1);
                self.0.push((room, cursor));
            }
        }
    }

    /// Forgets `room`; false if the connection had not joined it.
    pub fn remove(&mut self, room: &RoomKey) -> bool {
        let Some(i) = self.0.iter().position(|(k, _)| k == room) else {
            return false;
        };
        self.0.swap_remove(i);
        true
    }

    /// How many rooms.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the connection is in no room.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rooms, in no particular order.
    pub fn keys(&self) -> Vec<RoomKey> {
        self.0.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Empties the list and returns it.
    pub fn take(&mut self) -> Vec<(RoomKey, Cursor)> {
        std::mem::take(&mut self.0)
    }

    /// Empties the list and returns the rooms.
    pub fn take_rooms(&mut self) -> Vec<RoomKey> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps() {
        let c = Cursor { from: 3, upto: 10 };
        assert_eq!(c.step(2), Step::Sent);
        assert_eq!(c.step(10), Step::Sent);
        assert_eq!(c.step(11), Step::Next);
        assert_eq!(
            c.step(14),
            Step::Gap {
                after: 10,
                before: 14
            }
        );
    }

    #[test]
    fn cursors_of_several_rooms() {
        let (a, b) = (RoomKey::new("d", "a"), RoomKey::new("d", "b"));
        let mut all = Cursors::default();
        assert!(all.is_empty());
        all.insert(a.clone(), Cursor { from: 0, upto: 1 });
        all.insert(b.clone(), Cursor { from: 5, upto: 9 });
        all.insert(a.clone(), Cursor { from: 0, upto: 2 });
        assert_eq!(all.len(), 2);
        assert_eq!(all.get(&a), Some(Cursor { from: 0, upto: 2 }));
        all.get_mut(&b).unwrap().sent(10);
        assert_eq!(all.get(&b).map(|c| c.upto), Some(10));
        assert!(all.remove(&a));
        assert!(!all.remove(&a));
        assert!(!all.contains(&a) && all.contains(&b));
        assert_eq!(all.take_rooms(), [b]);
        assert!(all.is_empty());
    }

    #[test]
    fn advancing_moves_only_on_the_next_message_of_a_joined_room() {
        let message = |room: &RoomKey, seq: u64| {
            Event::Message(crate::model::Message::sample(room.clone(), seq))
        };
        let (a, left) = (RoomKey::new("d", "a"), RoomKey::new("d", "left"));
        let mut all = Cursors::default();
        all.insert(a.clone(), Cursor { from: 0, upto: 4 });
        assert_eq!(all.advance(&message(&a, 5)), Step::Next);
        assert_eq!(all.advance(&message(&a, 5)), Step::Sent);
        assert_eq!(all.advance(&message(&a, 3)), Step::Sent);
        assert_eq!(
            all.advance(&message(&a, 8)),
            Step::Gap {
                after: 5,
                before: 8
            }
        );
        assert_eq!(
            all.get(&a).map(|c| c.upto),
            Some(5),
            "a gap does not move it"
        );
        assert_eq!(all.advance(&message(&left, 1)), Step::Sent);
        let typing = Event::Frame(bytes::Bytes::from_static(b"{}"));
        assert_eq!(all.advance(&typing), Step::Next);
        assert_eq!(all.get(&a).map(|c| c.upto), Some(5));
    }

    #[test]
    fn sent_only_moves_forward() {
        let mut c = Cursor { from: 0, upto: 5 };
        c.sent(6);
        assert_eq!(c.upto, 6);
        c.sent(4);
        assert_eq!(c.upto, 6);
    }
}
