//! [`Accounts`] on PostgreSQL: straight on the pool (account writes are rare and need no
//! place in the message writer's order), each multi-statement change in a transaction, every
//! call under the store's deadline.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{PostgresStore, count, from_ms, store_error, to_ms};
use crate::store::StoreError;
use crate::store::accounts::{Account, AccountRole, Accounts, NewAccount, Session, next_failure};

/// Columns matching [`account_at`] (table alias `a`).
const ACCOUNT_COLUMNS: &str =
    "a.id, a.domain_id, a.email, a.name, a.role, a.created_at, a.password_hash IS NOT NULL";

fn account_at(row: &PgRow) -> Result<Account, sqlx::Error> {
    let role: String = row.try_get(4)?;
    Ok(Account {
        id: row.try_get(0)?,
        domain_id: row.try_get(1)?,
        email: row.try_get(2)?,
        name: row.try_get(3)?,
        role: AccountRole::parse(&role).unwrap_or(AccountRole::Agent),
        created_at: from_ms(row.try_get(5)?),
        has_password: row.try_get(6)?,
    })
}

impl PostgresStore {
    async fn account_row(&self, id: &str) -> Result<Option<Account>, StoreError> {
        let row = self
            .read(
                "an account read",
                sqlx::query(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.pool),
            )
            .await?;
        row.as_ref()
            .map(account_at)
            .transpose()
            .map_err(store_error)
    }
}

#[async_trait]
impl Accounts for PostgresStore {
    async fn create_account(&self, account: NewAccount) -> Result<Option<Account>, StoreError> {
        let inserted = self
            .read(
                "an account write",
                sqlx::query(
                    "INSERT INTO accounts (id, domain_id, email, name, role, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (domain_id, email) DO NOTHING",
                )
                .bind(&account.id)
                .bind(&account.domain_id)
                .bind(&account.email)
                .bind(&account.name)
                .bind(account.role.as_str())
                .bind(to_ms(Utc::now()))
                .execute(&self.pool),
            )
            .await?;
        if inserted.rows_affected() == 0 {
            return Ok(None);
        }
        self.account_row(&account.id).await
    }

    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        self.account_row(id).await
    }

    async fn domain_accounts(&self, domain_id: &str) -> Result<Vec<Account>, StoreError> {
        let rows = self
            .read(
                "an account read",
                sqlx::query(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.domain_id = $1
                     ORDER BY a.email COLLATE \"C\""
                ))
                .bind(domain_id)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(account_at)
            .collect::<Result<_, _>>()
            .map_err(store_error)
    }

    async fn credentials(&self, email: &str) -> Result<Vec<(Account, Option<String>)>, StoreError> {
        let rows = self
            .read(
                "an account read",
                sqlx::query(&format!(
                    "SELECT {ACCOUNT_COLUMNS}, a.password_hash FROM accounts a
                     WHERE a.email = $1 ORDER BY a.created_at, a.id COLLATE \"C\""
                ))
                .bind(email)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| Ok((account_at(row)?, row.try_get(7)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store_error)
    }

    async fn set_password(&self, id: &str, hash: &str) -> Result<bool, StoreError> {
        let done = self
            .read(
                "an account write",
                sqlx::query("UPDATE accounts SET password_hash = $2 WHERE id = $1")
                    .bind(id)
                    .bind(hash)
                    .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_account(&self, id: &str) -> Result<bool, StoreError> {
        self.read("an account removal", async {
            let mut tx = self.pool.begin().await?;
            let sessions: Vec<String> =
                sqlx::query_scalar("SELECT session FROM session_accounts WHERE account_id = $1")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
            let deleted = sqlx::query("DELETE FROM accounts WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(
                "DELETE FROM sessions s WHERE s.id_hash = ANY($1)
                   AND NOT EXISTS (SELECT 1 FROM session_accounts a WHERE a.session = s.id_hash)",
            )
            .bind(&sessions)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
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
        self.read(
            "an invite write",
            sqlx::query(
                "INSERT INTO account_invites (token_hash, account_id, expires_at)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (account_id) DO UPDATE SET
                   token_hash = excluded.token_hash, expires_at = excluded.expires_at",
            )
            .bind(token_hash)
            .bind(account_id)
            .bind(to_ms(expires_at))
            .execute(&self.pool),
        )
        .await
        .map(|_| ())
    }

    async fn take_invite(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Account>, StoreError> {
        // DELETE … RETURNING uses the invite up exactly once, whoever else tries at once.
        let taken: Option<(String, i64)> = self
            .read(
                "an invite use",
                sqlx::query_as(
                    "DELETE FROM account_invites WHERE token_hash = $1
                     RETURNING account_id, expires_at",
                )
                .bind(token_hash)
                .fetch_optional(&self.pool),
            )
            .await?;
        match taken {
            Some((account, expires)) if expires > to_ms(now) => self.account_row(&account).await,
            _ => Ok(None),
        }
    }

    async fn create_session(
        &self,
        id_hash: &str,
        email: &str,
        accounts: &[String],
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.read("a session write", async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO sessions (id_hash, email, created_at, expires_at)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(id_hash)
            .bind(email)
            .bind(to_ms(Utc::now()))
            .bind(to_ms(expires_at))
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO session_accounts (session, account_id)
                 SELECT $1, unnest($2::text[])",
            )
            .bind(id_hash)
            .bind(accounts)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })
        .await
    }

    async fn session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Session>, StoreError> {
        let head: Option<(String, i64, i64)> = self
            .read(
                "a session read",
                sqlx::query_as(
                    "SELECT email, created_at, expires_at FROM sessions
                     WHERE id_hash = $1 AND expires_at > $2",
                )
                .bind(id_hash)
                .bind(to_ms(now))
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some((email, created, expires)) = head else {
            return Ok(None);
        };
        let rows = self
            .read(
                "a session read",
                sqlx::query(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM session_accounts s
                     JOIN accounts a ON a.id = s.account_id
                     WHERE s.session = $1 ORDER BY a.created_at, a.id COLLATE \"C\""
                ))
                .bind(id_hash)
                .fetch_all(&self.pool),
            )
            .await?;
        let accounts = rows
            .iter()
            .map(account_at)
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)?;
        if accounts.is_empty() {
            return Ok(None);
        }
        Ok(Some(Session {
            email,
            accounts,
            created_at: from_ms(created),
            expires_at: from_ms(expires),
        }))
    }

    async fn delete_session(&self, id_hash: &str) -> Result<(), StoreError> {
        self.read(
            "a session removal",
            sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
                .bind(id_hash)
                .execute(&self.pool),
        )
        .await
        .map(|_| ())
    }

    async fn delete_sessions_of(&self, account_id: &str) -> Result<u64, StoreError> {
        let done = self
            .read(
                "a session removal",
                sqlx::query(
                    "DELETE FROM sessions WHERE id_hash IN
                       (SELECT session FROM session_accounts WHERE account_id = $1)",
                )
                .bind(account_id)
                .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected())
    }

    async fn sign_in_failed(
        &self,
        email: &str,
        now: DateTime<Utc>,
        window: chrono::Duration,
        limit: u32,
        lock: chrono::Duration,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let now_ms = to_ms(now);
        let locked = self
            .read("a sign-in failure", async {
                let mut tx = self.pool.begin().await?;
                // The row lock makes concurrent failures of one address count one by one.
                sqlx::query(
                    "INSERT INTO sign_in_failures (email, failures, window_start)
                     VALUES ($1, 0, $2) ON CONFLICT (email) DO NOTHING",
                )
                .bind(email)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
                let (failures, start, locked): (i32, i64, Option<i64>) = sqlx::query_as(
                    "SELECT failures, window_start, locked_until FROM sign_in_failures
                     WHERE email = $1 FOR UPDATE",
                )
                .bind(email)
                .fetch_one(&mut *tx)
                .await?;
                let stored = (failures > 0).then(|| (count(failures.into()) as u32, start, locked));
                let (failures, start, locked) = next_failure(
                    stored,
                    now_ms,
                    window.num_milliseconds(),
                    limit,
                    lock.num_milliseconds(),
                );
                sqlx::query(
                    "UPDATE sign_in_failures SET failures = $2, window_start = $3,
                       locked_until = $4 WHERE email = $1",
                )
                .bind(email)
                .bind(i32::try_from(failures).unwrap_or(i32::MAX))
                .bind(start)
                .bind(locked)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(locked)
            })
            .await?;
        Ok(locked.filter(|l| *l > now_ms).map(from_ms))
    }

    async fn sign_in_lock(
        &self,
        email: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let locked: Option<Option<i64>> = self
            .read(
                "a sign-in lock read",
                sqlx::query_scalar("SELECT locked_until FROM sign_in_failures WHERE email = $1")
                    .bind(email)
                    .fetch_optional(&self.pool),
            )
            .await?;
        Ok(locked.flatten().filter(|l| *l > to_ms(now)).map(from_ms))
    }

    async fn sign_in_succeeded(&self, email: &str) -> Result<(), StoreError> {
        self.read(
            "a sign-in success",
            sqlx::query("DELETE FROM sign_in_failures WHERE email = $1")
                .bind(email)
                .execute(&self.pool),
        )
        .await
        .map(|_| ())
    }
}
