//! [`Accounts`] on SQLite: reads on the reader pool, writes as jobs of the writer thread,
//! group-committed with everything else.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, from_ms, to_ms, unavailable};
use crate::store::StoreError;
use crate::store::accounts::{Account, AccountRole, Accounts, NewAccount, Session};

/// Columns matching [`account_at`] (table alias `a`).
const ACCOUNT_COLUMNS: &str =
    "a.id, a.domain_id, a.email, a.name, a.role, a.created_at, a.password_hash IS NOT NULL";

fn account_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    let role: String = row.get(4)?;
    Ok(Account {
        id: row.get(0)?,
        domain_id: row.get(1)?,
        email: row.get(2)?,
        name: row.get(3)?,
        role: AccountRole::parse(&role).unwrap_or(AccountRole::Agent),
        created_at: from_ms(row.get(5)?),
        has_password: row.get(6)?,
    })
}

fn select_account(conn: &Connection, id: &str) -> rusqlite::Result<Option<Account>> {
    conn.prepare_cached(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = ?1"
    ))?
    .query_row(params![id], account_at)
    .optional()
}

#[async_trait]
impl Accounts for SqliteStore {
    async fn create_account(&self, account: NewAccount) -> Result<Option<Account>, StoreError> {
        self.run(move |conn| {
            let now = to_ms(Utc::now());
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO accounts (id, domain_id, email, name, role, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (domain_id, email) DO NOTHING",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        account.id,
                        account.domain_id,
                        account.email,
                        account.name,
                        account.role.as_str(),
                        now
                    ])
                })
                .map_err(unavailable)?;
            if inserted == 0 {
                return Ok(None);
            }
            select_account(conn, &account.id).map_err(unavailable)
        })
        .await
    }

    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| select_account(c, &id)).await
    }

    async fn domain_accounts(&self, domain_id: &str) -> Result<Vec<Account>, StoreError> {
        let domain = domain_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.domain_id = ?1 ORDER BY a.email"
            ))?;
            let rows = stmt.query_map(params![domain], account_at)?;
            rows.collect()
        })
        .await
    }

    async fn credentials(&self, email: &str) -> Result<Vec<(Account, Option<String>)>, StoreError> {
        let email = email.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {ACCOUNT_COLUMNS}, a.password_hash FROM accounts a
                 WHERE a.email = ?1 ORDER BY a.created_at, a.id"
            ))?;
            let rows = stmt.query_map(params![email], |row| Ok((account_at(row)?, row.get(7)?)))?;
            rows.collect()
        })
        .await
    }

    async fn set_password(&self, id: &str, hash: &str) -> Result<bool, StoreError> {
        let (id, hash) = (id.to_owned(), hash.to_owned());
        self.run(move |conn| {
            conn.prepare_cached("UPDATE accounts SET password_hash = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id, hash]))
                .map(|n| n > 0)
                .map_err(unavailable)
        })
        .await
    }

    async fn delete_account(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.run(move |conn| {
            // The invite and the session links go with the account (ON DELETE CASCADE);
            // sessions left without an account are removed here.
            let sessions: Vec<String> = conn
                .prepare_cached("SELECT session FROM session_accounts WHERE account_id = ?1")
                .and_then(|mut s| {
                    s.query_map(params![id], |r| r.get(0))?
                        .collect::<rusqlite::Result<_>>()
                })
                .map_err(unavailable)?;
            let deleted = conn
                .prepare_cached("DELETE FROM accounts WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id]))
                .map_err(unavailable)?;
            for session in sessions {
                conn.prepare_cached(
                    "DELETE FROM sessions WHERE id_hash = ?1
                       AND NOT EXISTS (SELECT 1 FROM session_accounts WHERE session = ?1)",
                )
                .and_then(|mut s| s.execute(params![session]))
                .map_err(unavailable)?;
            }
            Ok(deleted > 0)
        })
        .await
    }

    async fn replace_invite(
        &self,
        account_id: &str,
        token_hash: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (account, hash) = (account_id.to_owned(), token_hash.to_owned());
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO account_invites (token_hash, account_id, expires_at)
                 VALUES (?1, ?2, ?3)
                 ON CONFLICT (account_id) DO UPDATE SET
                   token_hash = excluded.token_hash, expires_at = excluded.expires_at",
            )
            .and_then(|mut s| s.execute(params![hash, account, to_ms(expires_at)]))
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn take_invite(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Account>, StoreError> {
        let hash = token_hash.to_owned();
        self.run(move |conn| {
            let found: Option<(String, i64)> = conn
                .prepare_cached(
                    "SELECT account_id, expires_at FROM account_invites WHERE token_hash = ?1",
                )
                .and_then(|mut s| {
                    s.query_row(params![hash], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(unavailable)?;
            let Some((account, expires)) = found else {
                return Ok(None);
            };
            conn.prepare_cached("DELETE FROM account_invites WHERE token_hash = ?1")
                .and_then(|mut s| s.execute(params![hash]))
                .map_err(unavailable)?;
            if expires <= to_ms(now) {
                return Ok(None);
            }
            select_account(conn, &account).map_err(unavailable)
        })
        .await
    }

    async fn create_session(
        &self,
        id_hash: &str,
        email: &str,
        accounts: &[String],
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (hash, email, accounts) = (id_hash.to_owned(), email.to_owned(), accounts.to_vec());
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO sessions (id_hash, email, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![hash, email, to_ms(Utc::now()), to_ms(expires_at)]))
            .map_err(unavailable)?;
            for account in &accounts {
                conn.prepare_cached(
                    "INSERT INTO session_accounts (session, account_id) VALUES (?1, ?2)",
                )
                .and_then(|mut s| s.execute(params![hash, account]))
                .map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Session>, StoreError> {
        let hash = id_hash.to_owned();
        self.read(move |c| {
            let head: Option<(String, i64, i64)> = c
                .prepare_cached(
                    "SELECT email, created_at, expires_at FROM sessions
                     WHERE id_hash = ?1 AND expires_at > ?2",
                )?
                .query_row(params![hash, to_ms(now)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let Some((email, created, expires)) = head else {
                return Ok(None);
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM session_accounts s
                 JOIN accounts a ON a.id = s.account_id
                 WHERE s.session = ?1 ORDER BY a.created_at, a.id"
            ))?;
            let accounts = stmt
                .query_map(params![hash], account_at)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if accounts.is_empty() {
                return Ok(None);
            }
            Ok(Some(Session {
                email,
                accounts,
                created_at: from_ms(created),
                expires_at: from_ms(expires),
            }))
        })
        .await
    }

    async fn delete_session(&self, id_hash: &str) -> Result<(), StoreError> {
        let hash = id_hash.to_owned();
        self.run(move |conn| {
            conn.prepare_cached("DELETE FROM sessions WHERE id_hash = ?1")
                .and_then(|mut s| s.execute(params![hash]))
                .map(|_| ())
                .map_err(unavailable)
        })
        .await
    }

    async fn delete_sessions_of(&self, account_id: &str) -> Result<u64, StoreError> {
        let account = account_id.to_owned();
        self.run(move |conn| {
            conn.prepare_cached(
                "DELETE FROM sessions WHERE id_hash IN
                   (SELECT session FROM session_accounts WHERE account_id = ?1)",
            )
            .and_then(|mut s| s.execute(params![account]))
            .map(|n| n as u64)
            .map_err(unavailable)
        })
        .await
    }

    async fn sign_in_failed(
        &self,
        email: &str,
        now: DateTime<Utc>,
        window: chrono::Duration,
        limit: u32,
        lock: chrono::Duration,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let email = email.to_owned();
        self.run(move |conn| {
            let now_ms = to_ms(now);
            let row: Option<(u32, i64, Option<i64>)> = conn
                .prepare_cached(
                    "SELECT failures, window_start, locked_until FROM sign_in_failures
                     WHERE email = ?1",
                )
                .and_then(|mut s| {
                    s.query_row(params![email], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()
                })
                .map_err(unavailable)?;
            let (failures, start, locked) = crate::store::accounts::next_failure(
                row,
                now_ms,
                window.num_milliseconds(),
                limit,
                lock.num_milliseconds(),
            );
            conn.prepare_cached(
                "INSERT INTO sign_in_failures (email, failures, window_start, locked_until)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (email) DO UPDATE SET failures = excluded.failures,
                   window_start = excluded.window_start, locked_until = excluded.locked_until",
            )
            .and_then(|mut s| s.execute(params![email, failures, start, locked]))
            .map_err(unavailable)?;
            Ok(locked.filter(|l| *l > now_ms).map(from_ms))
        })
        .await
    }

    async fn sign_in_lock(
        &self,
        email: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let email = email.to_owned();
        self.read(move |c| {
            let locked: Option<Option<i64>> = c
                .prepare_cached("SELECT locked_until FROM sign_in_failures WHERE email = ?1")?
                .query_row(params![email], |r| r.get(0))
                .optional()?;
            Ok(locked.flatten().filter(|l| *l > to_ms(now)).map(from_ms))
        })
        .await
    }

    async fn sign_in_succeeded(&self, email: &str) -> Result<(), StoreError> {
        let email = email.to_owned();
        self.run(move |conn| {
            conn.prepare_cached("DELETE FROM sign_in_failures WHERE email = ?1")
                .and_then(|mut s| s.execute(params![email]))
                .map(|_| ())
                .map_err(unavailable)
        })
        .await
    }
}
