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

use super::Joined;

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
    fn sent_only_moves_forward() {
        let mut c = Cursor { from: 0, upto: 5 };
        c.sent(6);
        assert_eq!(c.upto, 6);
        c.sent(4);
        assert_eq!(c.upto, 6);
    }
}
