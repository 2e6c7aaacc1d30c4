//! Agent accounts and sign-in (see `docs/accounts.md`): inviting people to a domain's inbox,
//! their passwords, sessions, the lock-out after repeated failures, and the short-lived
//! tokens a session gets for one of its domains.
//!
//! Secrets never leave this module in the clear except once, to their owner: an invite token
//! in its link, a session token in its cookie. The store keeps their SHA-256 digests and
//! argon2id password hashes. Hashing runs on the blocking pool, so a burst of sign-ins
//! never stalls the chat.
//!
//! Depends on the store, the live domain table and the model; never on a transport.

use std::sync::Arc;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};

use super::ServiceError;
use crate::auth::Domains;
use crate::auth::keys;
use crate::error_code::ErrorCode;
use crate::model::Role;
use crate::store::Store;
use crate::store::accounts::{Account, AccountRole, NewAccount, Session};

/// How long an invite link works.
pub const INVITE_DAYS: i64 = 7;
/// How long a session lasts from sign-in.
pub const SESSION_DAYS: i64 = 7;
/// Failed sign-ins of one address within [`FAILURE_WINDOW`] that lock it.
pub const FAILURE_LIMIT: u32 = 5;
/// The window failures are counted in, and how long a lock lasts.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Lifetime of a token a session gets for the inbox (renewed by the page).
pub const TOKEN_TTL_SECS: u64 = 15 * 60;
/// Shortest and longest password accepted.
pub const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 10..=512;
/// Longest e-mail address and name accepted.
const MAX_EMAIL: usize = 254;
const MAX_NAME: usize = 100;

/// An argon2id hash of a password nobody has, checked when an address has no account so
/// that a sign-in takes as long whether or not the address is known.
static DECOY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    hash_password("decoy password that matches nothing").unwrap_or_default()
});

/// A signed-in session and the secret its cookie carries.
#[derive(Debug)]
pub struct SignedIn {
    /// The cookie's value (shown once).
    pub token: String,
    /// What it stands for.
    pub session: Session,
}

/// A new account or invite: the account and the token of its one-time link.
#[derive(Debug)]
pub struct Invited {
    /// The account.
    pub account: Account,
    /// The invite token (`/inbox#invite=TOKEN`), shown once.
    pub token: String,
    /// When the link stops working.
    pub expires_at: DateTime<Utc>,
}

/// Agent accounts and their sign-in.
#[derive(Debug)]
pub struct AccountService {
    store: Arc<dyn Store>,
    domains: Arc<Domains>,
}

impl AccountService {
    /// Accounts kept in `store`, for the domains of `domains`.
    pub fn new(store: Arc<dyn Store>, domains: Arc<Domains>) -> Self {
        Self { store, domains }
    }

    /// Creates an account of `domain` and its invite.
    pub async fn invite(
        &self,
        domain: &str,
        email: &str,
        name: &str,
        role: AccountRole,
    ) -> Result<Invited, ServiceError> {
        if self.domains.load().get(domain).is_none() {
            return Err(ServiceError::NotFound {
                code: ErrorCode::DomainNotFound,
                message: format!("no domain {domain:?}"),
            });
        }
        let email = normalize_email(email)?;
        let name = name.trim();
        if name.is_empty() || name.chars().count() > MAX_NAME {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidName,
                format!("name must be 1 to {MAX_NAME} characters"),
            ));
        }
        let new = NewAccount {
            id: uuid::Uuid::new_v4().to_string(),
            domain_id: domain.to_owned(),
            email: email.clone(),
            name: name.to_owned(),
            role,
        };
        let Some(account) = self.store.create_account(new).await? else {
            return Err(ServiceError::Conflict {
                code: ErrorCode::AccountExists,
                message: format!("{domain:?} already has an account for {email}"),
            });
        };
        self.new_invite(account).await
    }

    /// A new invite for the account `id` of `domain` (voiding an earlier one).
    pub async fn reinvite(&self, domain: &str, id: &str) -> Result<Invited, ServiceError> {
        let account = self.account_of(domain, id).await?;
        self.new_invite(account).await
    }

    async fn new_invite(&self, account: Account) -> Result<Invited, ServiceError> {
        let token = keys::random_hex();
        let expires_at = Utc::now() + chrono::Duration::days(INVITE_DAYS);
        self.store
            .replace_invite(&account.id, &digest(&token), expires_at)
            .await?;
        Ok(Invited {
            account,
            token,
            expires_at,
        })
    }

    /// The domain's accounts.
    pub async fn list(&self, domain: &str) -> Result<Vec<Account>, ServiceError> {
        Ok(self.store.domain_accounts(domain).await?)
    }

    /// Removes the account `id` of `domain` (and ends its sessions).
    pub async fn remove(&self, domain: &str, id: &str) -> Result<(), ServiceError> {
        self.account_of(domain, id).await?;
        self.store.delete_account(id).await?;
        Ok(())
    }

    /// Ends every session of the account `id` of `domain`; returns how many.
    pub async fn revoke_sessions(&self, domain: &str, id: &str) -> Result<u64, ServiceError> {
        self.account_of(domain, id).await?;
        Ok(self.store.delete_sessions_of(id).await?)
    }

    async fn account_of(&self, domain: &str, id: &str) -> Result<Account, ServiceError> {
        match self.store.account(id).await? {
            Some(a) if a.domain_id == domain => Ok(a),
            _ => Err(ServiceError::NotFound {
                code: ErrorCode::AccountNotFound,
                message: format!("{domain:?} has no account {id:?}"),
            }),
        }
    }

    /// Uses an invite: sets the account's password and signs it in.
    pub async fn accept_invite(
        &self,
        token: &str,
        password: &str,
    ) -> Result<SignedIn, ServiceError> {
        check_password(password)?;
        let Some(account) = self
            .store
            .take_invite(&digest(token.trim()), Utc::now())
            .await?
        else {
            return Err(ServiceError::NotFound {
                code: ErrorCode::InvalidInvite,
                message: "this invite link was used already or has expired; ask for a new one"
                    .into(),
            });
        };
        let hash = blocking(hash_password_owned(password.to_owned())).await??;
        self.store.set_password(&account.id, &hash).await?;
        self.store.sign_in_succeeded(&account.email).await?;
        self.start_session(&account.email, std::slice::from_ref(&account.id))
            .await
    }

    /// Signs in with an e-mail address and a password: a session for every account of the
    /// address whose password matches.
    pub async fn sign_in(&self, email: &str, password: &str) -> Result<SignedIn, ServiceError> {
        let email = normalize_email(email).map_err(|_| bad_credentials())?;
        let now = Utc::now();
        if let Some(until) = self.store.sign_in_lock(&email, now).await? {
            return Err(locked(until, now));
        }
        let candidates = self.store.credentials(&email).await?;
        let hashes: Vec<Option<String>> = candidates.iter().map(|(_, h)| h.clone()).collect();
        let password = password.to_owned();
        let matched = blocking(move || {
            if hashes.iter().all(Option::is_none) {
                // Take the same time as a real check.
                let _ = verify_password(&password, &DECOY);
                return Vec::new();
            }
            hashes
                .iter()
                .map(|h| h.as_deref().is_some_and(|h| verify_password(&password, h)))
                .collect()
        })
        .await?;
        let ids: Vec<String> = candidates
            .iter()
            .zip(matched.iter().chain(std::iter::repeat(&false)))
            .filter(|(_, ok)| **ok)
            .map(|((a, _), _)| a.id.clone())
            .collect();
        if ids.is_empty() {
            let window = chrono::Duration::from_std(FAILURE_WINDOW).unwrap_or_default();
            let locked_until = self
                .store
                .sign_in_failed(&email, now, window, FAILURE_LIMIT, window)
                .await?;
            tracing::info!(
                email = %email,
                locked = locked_until.is_some(),
                "sign-in refused: wrong e-mail address or password"
            );
            return Err(match locked_until {
                Some(until) => locked(until, now),
                None => bad_credentials(),
            });
        }
        self.store.sign_in_succeeded(&email).await?;
        self.start_session(&email, &ids).await
    }

    async fn start_session(
        &self,
        email: &str,
        accounts: &[String],
    ) -> Result<SignedIn, ServiceError> {
        let token = keys::random_hex();
        let expires = Utc::now() + chrono::Duration::days(SESSION_DAYS);
        self.store
            .create_session(&digest(&token), email, accounts, expires)
            .await?;
        let session = self
            .store
            .session(&digest(&token), Utc::now())
            .await?
            .ok_or_else(|| ServiceError::NotAvailable {
                code: ErrorCode::SessionLost,
                message: "the session could not be read back".into(),
            })?;
        Ok(SignedIn { token, session })
    }

    /// The session of a cookie's value, if it is live.
    pub async fn session(&self, token: &str) -> Result<Option<Session>, ServiceError> {
        Ok(self.store.session(&digest(token), Utc::now()).await?)
    }

    /// Ends the session of a cookie's value.
    pub async fn sign_out(&self, token: &str) -> Result<(), ServiceError> {
        Ok(self.store.delete_session(&digest(token)).await?)
    }

    /// The account of `session` in `domain`, as a token role: what a token for it says.
    pub fn account_in<'s>(
        &self,
        session: &'s Session,
        domain: &str,
    ) -> Result<(&'s Account, Role), ServiceError> {
        let account = session
            .accounts
            .iter()
            .find(|a| a.domain_id == domain)
            .ok_or_else(|| {
                ServiceError::Forbidden(format!("you have no account in the domain {domain:?}"))
            })?;
        if self.domains.load().get(domain).is_none() {
            return Err(ServiceError::NotFound {
                code: ErrorCode::DomainNotFound,
                message: format!("no domain {domain:?}"),
            });
        }
        let role = match account.role {
            AccountRole::Agent => Role::Agent,
            AccountRole::Admin => Role::Admin,
        };
        Ok((account, role))
    }

    /// The display name of a domain, for the inbox's domain switcher.
    pub fn domain_name(&self, domain: &str) -> Option<String> {
        self.domains
            .load()
            .get(domain)
            .map(|d| d.settings.name.clone())
    }
}

/// SHA-256 of a token, as stored.
fn digest(token: &str) -> String {
    keys::hash(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A trimmed, lower-case e-mail address, or `invalid_email`.
pub fn normalize_email(email: &str) -> Result<String, ServiceError> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= MAX_EMAIL
        && email.split_once('@').is_some_and(|(local, host)| {
            !local.is_empty()
                && host.contains('.')
                && !host.starts_with('.')
                && !host.ends_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(ServiceError::invalid(
            ErrorCode::InvalidEmail,
            "that is not an e-mail address",
        ))
    }
}

fn check_password(password: &str) -> Result<(), ServiceError> {
    let n = password.chars().count();
    if PASSWORD_CHARS.contains(&n) {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            ErrorCode::WeakPassword,
            format!(
                "a password must have {} to {} characters",
                PASSWORD_CHARS.start(),
                PASSWORD_CHARS.end()
            ),
        ))
    }
}

fn bad_credentials() -> ServiceError {
    ServiceError::Unauthenticated {
        code: ErrorCode::InvalidCredentials,
        message: "wrong e-mail address or password".into(),
    }
}

fn locked(until: DateTime<Utc>, now: DateTime<Utc>) -> ServiceError {
    ServiceError::Limited {
        code: ErrorCode::TooManyFailures,
        message: "too many failed sign-ins for this address; try again later".into(),
        retry_after: (until - now).to_std().unwrap_or(Duration::from_secs(1)),
    }
}

/// Runs CPU-heavy work (password hashing) on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| ServiceError::NotAvailable {
            code: ErrorCode::Internal,
            message: "password check failed".into(),
        })
}

fn hash_password_owned(password: String) -> impl FnOnce() -> Result<String, ServiceError> {
    move || hash_password(&password)
}

/// An argon2id hash (PHC string) of `password`, with a fresh salt.
pub fn hash_password(password: &str) -> Result<String, ServiceError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ServiceError::NotAvailable {
            code: ErrorCode::Internal,
            message: format!("cannot hash the password: {e}"),
        })
}

/// Whether `password` matches the PHC string `hash`.
fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_a_salt_and_verify() {
        let a = hash_password("correct horse battery").unwrap();
        let b = hash_password("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b, "salted");
        assert!(verify_password("correct horse battery", &a));
        assert!(!verify_password("correct horse batterY", &a));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn emails_are_trimmed_lowered_and_checked() {
        assert_eq!(
            normalize_email(" Ann@Shop.Example ").unwrap(),
            "ann@shop.example"
        );
        for bad in [
            "",
            "ann",
            "@shop.example",
            "ann@shop",
            "ann@.example",
            "a nn@x.example",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
    }
}
