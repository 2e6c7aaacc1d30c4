//! Agent accounts, their invites and sign-in sessions (see `docs/accounts.md`): what the
//! store keeps of them, and the [`Accounts`] trait every store implements.
//!
//! The store keeps secrets only as hashes: passwords as argon2id strings (made by the
//! accounts service), invite and session tokens as SHA-256 hex digests. It decides nothing
//! about them: expiry times and lock-out limits come from the caller.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// What an account may do in its domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountRole {
    /// Answers conversations.
    Agent,
    /// An agent who also administers the domain.
    Admin,
}

impl AccountRole {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountRole::Agent => "agent",
            AccountRole::Admin => "admin",
        }
    }

    /// Parses a stored or requested name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(AccountRole::Agent),
            "admin" => Some(AccountRole::Admin),
            _ => None,
        }
    }
}

/// A person who signs in to a domain's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Identifier (a UUID); also the user id of the account's tokens.
    pub id: String,
    /// The domain it belongs to.
    pub domain_id: String,
    /// Lower-case e-mail address, unique within the domain.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Agent or admin.
    pub role: AccountRole,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Whether a password has been set (the invite was used).
    pub has_password: bool,
}

/// An account to create.
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// Identifier, chosen by the caller.
    pub id: String,
    /// Domain.
    pub domain_id: String,
    /// Lower-case e-mail address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Agent or admin.
    pub role: AccountRole,
}

/// A signed-in session: the accounts (of one e-mail address) its cookie stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The e-mail address signed in with.
    pub email: String,
    /// The accounts whose password matched, oldest first.
    pub accounts: Vec<Account>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it ends.
    pub expires_at: DateTime<Utc>,
}

/// Storage of accounts, invites, sessions and failed sign-ins.
#[async_trait]
pub trait Accounts: Send + Sync {
    /// Creates an account; `None` when the domain already has one with that e-mail.
    async fn create_account(&self, account: NewAccount) -> Result<Option<Account>, StoreError>;

    /// One account.
    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError>;

    /// A domain's accounts, by e-mail.
    async fn domain_accounts(&self, domain_id: &str) -> Result<Vec<Account>, StoreError>;

    /// Every account with `email` (in any domain), oldest first, each with its password
    /// hash (`None` until set).
    async fn credentials(&self, email: &str) -> Result<Vec<(Account, Option<String>)>, StoreError>;

    /// Sets an account's password hash; false if there is no such account.
    async fn set_password(&self, id: &str, hash: &str) -> Result<bool, StoreError>;

    /// Removes an account with its invite and its place in sessions (a session left with
    /// no account is removed too); false if there was none.
    async fn delete_account(&self, id: &str) -> Result<bool, StoreError>;

    /// Makes `token_hash` the account's one invite, valid until `expires_at` (any earlier
    /// invite of the account stops working).
    async fn replace_invite(
        &self,
        account_id: &str,
        token_hash: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Uses up the invite `token_hash`: its account, if the invite exists and has not
    /// expired at `now`; the invite is gone either way.
    async fn take_invite(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Account>, StoreError>;

    /// Stores a session for `accounts` (ids) under `id_hash`.
    async fn create_session(
        &self,
        id_hash: &str,
        email: &str,
        accounts: &[String],
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The session `id_hash`, if it exists, has not expired at `now` and still stands for
    /// an account.
    async fn session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Session>, StoreError>;

    /// Ends the session `id_hash`.
    async fn delete_session(&self, id_hash: &str) -> Result<(), StoreError>;

    /// Ends every session of the account; returns how many it was part of.
    async fn delete_sessions_of(&self, account_id: &str) -> Result<u64, StoreError>;

    /// Counts a failed sign-in for `email` at `now`: failures older than `window` are
    /// forgotten, and the `limit`-th within it locks the address until `now + lock`.
    /// Returns when the address is locked until, if it is.
    async fn sign_in_failed(
        &self,
        email: &str,
        now: DateTime<Utc>,
        window: chrono::Duration,
        limit: u32,
        lock: chrono::Duration,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Until when `email` is locked at `now`, if it is.
    async fn sign_in_lock(
        &self,
        email: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Forgets the failed sign-ins of `email` (after a successful one).
    async fn sign_in_succeeded(&self, email: &str) -> Result<(), StoreError>;
}

/// The failed sign-ins of an address after one more at `now` (all times in unix
/// milliseconds), from what was stored (`failures`, `window_start`, `locked_until`):
/// failures older than `window` are forgotten; the `limit`-th within the window locks the
/// address for `lock`; a lock in force stays as it is. Both stores apply it in their
/// transaction.
pub fn next_failure(
    stored: Option<(u32, i64, Option<i64>)>,
    now: i64,
    window: i64,
    limit: u32,
    lock: i64,
) -> (u32, i64, Option<i64>) {
    let (failures, start, locked) = match stored {
        Some((n, start, locked)) if start.saturating_add(window) > now => {
            (n.saturating_add(1), start, locked)
        }
        Some((_, _, locked)) => (1, now, locked),
        None => (1, now, None),
    };
    let locked = match locked.filter(|l| *l > now) {
        Some(l) => Some(l),
        None if failures >= limit => Some(now.saturating_add(lock)),
        None => None,
    };
    (failures, start, locked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_th_failure_in_the_window_locks() {
        let (w, lock) = (900_000, 900_000);
        let mut state = None;
        for i in 1..=4 {
            let next = next_failure(state, 1_000 * i, w, 5, lock);
            assert_eq!(next.2, None, "failure {i}");
            state = Some(next);
        }
        let locked = next_failure(state, 5_000, w, 5, lock);
        assert_eq!(locked, (5, 1_000, Some(905_000)));
        // More failures while locked do not extend the lock.
        assert_eq!(
            next_failure(Some(locked), 6_000, w, 5, lock).2,
            Some(905_000)
        );
        // After the window, counting starts over (the lock has passed by then).
        assert_eq!(
            next_failure(Some(locked), 1_000_000, w, 5, lock),
            (1, 1_000_000, None)
        );
    }
}
