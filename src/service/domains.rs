//! Managing domains at run time (the admin API): create, replace and remove domains, add,
//! rotate and revoke their keys.
//!
//! Every change is written to the store first and then the live table
//! ([`Domains`](crate::auth::Domains)) is rebuilt from the store, so what the server uses is
//! always what a restart would load. Changes are serialised by one lock: two administrators
//! cannot interleave a write and a rebuild. Domains of the config file can be read and get
//! keys, but their settings belong to the file.
//!
//! Settings are validated by building them into a table beside the current domains
//! (unique issuers and keys, usable JWT keys) before anything is stored.
//!
//! **Several nodes.** After a committed change the node tells the others through the broker
//! ([`Broker::domains_changed`]); each of them rebuilds its table from the shared store
//! ([`DomainListener`], called by the node's broker handler, under the same lock as local
//! changes, so a rebuild never overwrites a newer table with an older read). The broker's delivery is at most once, so every node
//! also rebuilds after its broker reconnects, and a reconnecting node announces a change to
//! the others in case its own announcement was lost. A node therefore uses a change within
//! a broker round trip, or once the broker is back. With the in-process broker there is
//! nobody to tell.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Mutex;

use super::ServiceError;
use crate::auth::domains::{DomainTable, Source};
use crate::auth::{Domains, keys, policy};
use crate::broker::Broker;
use crate::config::{DomainConfig, Secret};
use crate::error_code::ErrorCode;
use crate::model::Identity;
use crate::node::events::DomainListener;
use crate::store::{DomainChange, DomainKey, KeyKind, Store};

/// A key just made: the only time its secret is shown.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The stored record (for a server key, its secret is the hash).
    pub record: DomainKey,
    /// What the holder presents: the server key, or the Pusher app key.
    pub key: String,
    /// The Pusher secret, for a Pusher pair.
    pub secret: Option<String>,
}

/// Domain administration.
#[derive(Debug)]
pub struct DomainService {
    store: Arc<dyn Store>,
    domains: Arc<Domains>,
    /// Serialises changes and rebuilds (local and announced by other nodes).
    changes: Mutex<()>,
    /// Tells the other nodes of a committed change (set once by [`Self::attach`]).
    broker: OnceLock<Arc<dyn Broker>>,
}

impl DomainService {
    /// A service writing to `store` and publishing into `domains`.
    pub fn new(store: Arc<dyn Store>, domains: Arc<Domains>) -> Self {
        Self {
            store,
            domains,
            changes: Mutex::new(()),
            broker: OnceLock::new(),
        }
    }

    /// Announces committed changes to the other nodes through `broker` (once, at start-up;
    /// their announcements reach this service through the node's broker handler).
    pub fn attach(&self, broker: &Arc<dyn Broker>) {
        let _ = self.broker.set(Arc::clone(broker));
    }

    /// Tells the other nodes that the stored domains changed.
    fn announce(&self) {
        if let Some(broker) = self.broker.get() {
            broker.domains_changed();
        }
    }

    /// Rebuilds the table after a change on another node, serialised with local changes.
    /// Retries for a while if the store does not answer.
    async fn reload_announced(&self) {
        const ATTEMPTS: u32 = 10;
        for attempt in 1..=ATTEMPTS {
            let reloaded = {
                let _guard = self.changes.lock().await;
                self.reload().await
            };
            match reloaded {
                Ok(()) => {
                    tracing::debug!("domain table rebuilt after a change on another node");
                    return;
                }
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "cannot rebuild the domain table; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        "cannot rebuild the domain table; another node's change is not in use here yet"
                    );
                }
            }
        }
    }

    /// Rebuilds the live table from the store.
    pub async fn reload(&self) -> Result<(), ServiceError> {
        let stored = self.store.domains().await?;
        let keys = self.store.domain_keys().await?;
        self.domains
            .replace(&stored, &keys)
            .map_err(|e| ServiceError::invalid(ErrorCode::InvalidDomain, e.to_string()))?;
        // The store's writes add webhook events for the domains of the new table.
        let table = self.domains.load();
        self.store
            .webhook_subscriptions()
            .replace(table.iter().map(|d| &d.settings));
        Ok(())
    }

    /// The current table, for listing.
    pub fn table(&self, caller: &Identity) -> Result<Arc<DomainTable>, ServiceError> {
        allowed(caller)?;
        Ok(self.domains.load())
    }

    /// Creates or replaces run-time domain `settings.id`; true when it was created.
    pub async fn put(
        &self,
        caller: &Identity,
        settings: DomainConfig,
    ) -> Result<bool, ServiceError> {
        allowed(caller)?;
        let _guard = self.changes.lock().await;
        let existing = self.domains.load().get(&settings.id).map(|d| d.source);
        if existing == Some(Source::Config) {
            return Err(in_config_file(&settings.id));
        }
        if !settings.templates.is_empty() {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidDomain,
                "template files are read from the config file at start; add a run-time \
                 domain's templates at /api/admin/domains/{id}/templates",
            ));
        }
        self.domains
            .check_candidate(&settings)
            .map_err(|e| ServiceError::invalid(ErrorCode::InvalidDomain, e.to_string()))?;
        let json = serde_json::to_string(&settings)
            .map_err(|e| ServiceError::invalid(ErrorCode::InvalidDomain, e.to_string()))?;
        self.store
            .change_domains(DomainChange::Save {
                id: settings.id.clone(),
                name: settings.name.clone(),
                settings: json,
            })
            .await?;
        self.announce();
        self.reload().await?;
        Ok(existing.is_none())
    }

    /// Removes run-time domain `id` and its keys. Its rooms and messages stay stored; a
    /// domain created again with the same id reaches them.
    pub async fn remove(&self, caller: &Identity, id: &str) -> Result<(), ServiceError> {
        allowed(caller)?;
        let _guard = self.changes.lock().await;
        match self.domains.load().get(id).map(|d| d.source) {
            None => return Err(domain_not_found(id)),
            Some(Source::Config) => return Err(in_config_file(id)),
            Some(Source::Admin) => {}
        }
        self.store
            .change_domains(DomainChange::Remove { id: id.to_owned() })
            .await?;
        self.announce();
        self.reload().await
    }

    /// Adds a key of `kind` to domain `id`. With `retire_others_after`, the domain's other
    /// run-time keys of that kind stop working after that grace period (a rotation).
    pub async fn add_key(
        &self,
        caller: &Identity,
        id: &str,
        kind: KeyKind,
        retire_others_after: Option<Duration>,
    ) -> Result<NewKey, ServiceError> {
        allowed(caller)?;
        let _guard = self.changes.lock().await;
        if self.domains.load().get(id).is_none() {
            return Err(domain_not_found(id));
        }
        let now = Utc::now();
        let (key, stored_secret, public_id, secret) = match kind {
            KeyKind::Server => {
                let (key, entry) = keys::generate();
                (key, entry, None, None)
            }
            KeyKind::Pusher => {
                let random = keys::random_hex();
                let app_key = random[..20].to_owned();
                let secret = random[20..52].to_owned();
                (app_key.clone(), secret.clone(), Some(app_key), Some(secret))
            }
        };
        let record = DomainKey {
            id: format!("key_{}", &keys::random_hex()[..16]),
            domain_id: id.to_owned(),
            kind,
            public_id,
            secret: Secret::new(stored_secret),
            created_at: now,
            expires_at: None,
        };
        let grace = retire_others_after
            .map(|grace| {
                chrono::Duration::from_std(grace).map_err(|_| {
                    ServiceError::invalid(ErrorCode::InvalidGrace, "grace period too long")
                })
            })
            .transpose()?;
        self.store
            .change_domains(DomainChange::AddKey(record.clone()))
            .await?;
        // The key is stored: whatever happens next, the other nodes must hear of it.
        let expired = match grace {
            Some(grace) => self
                .store
                .change_domains(DomainChange::ExpireKeys {
                    domain_id: id.to_owned(),
                    kind,
                    expires_at: now + grace,
                    keep: Some(record.id.clone()),
                })
                .await
                .map(|_| ()),
            None => Ok(()),
        };
        self.announce();
        let reloaded = self.reload().await;
        expired?;
        reloaded?;
        Ok(NewKey {
            record,
            key,
            secret,
        })
    }

    /// Revokes key `key_id` of domain `id` at once.
    pub async fn remove_key(
        &self,
        caller: &Identity,
        id: &str,
        key_id: &str,
    ) -> Result<(), ServiceError> {
        allowed(caller)?;
        let _guard = self.changes.lock().await;
        let removed = self
            .store
            .change_domains(DomainChange::RemoveKey {
                domain_id: id.to_owned(),
                id: key_id.to_owned(),
            })
            .await?;
        if removed == 0 {
            return Err(ServiceError::NotFound {
                code: ErrorCode::KeyNotFound,
                message: format!("domain {id:?} has no key {key_id:?}"),
            });
        }
        self.announce();
        self.reload().await
    }
}

impl DomainListener for DomainService {
    fn domains_changed(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.reload_announced())
    }
}

fn allowed(caller: &Identity) -> Result<(), ServiceError> {
    if policy::may_manage_domains(caller) {
        Ok(())
    } else {
        Err(ServiceError::Forbidden(
            "managing domains needs an admin key".into(),
        ))
    }
}

fn domain_not_found(id: &str) -> ServiceError {
    ServiceError::NotFound {
        code: ErrorCode::DomainNotFound,
        message: format!("no domain {id:?}"),
    }
}

fn in_config_file(id: &str) -> ServiceError {
    ServiceError::Conflict {
        code: ErrorCode::DomainInConfigFile,
        message: format!(
            "domain {id:?} is declared in the config file; change it there (keys can be added here)"
        ),
    }
}
