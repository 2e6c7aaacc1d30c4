//! A domain's visitors (seed 001's visitor tracking; `docs/visitors.md`): each sighting of a
//! visitor (a page reporting itself through `POST /visitors/add`) is stored with what it
//! says ([`crate::store::visitors`]), and the visitor counts as *on the site* until
//! [`ACTIVE_FOR`] passes without another sighting, or the page says it left
//! (`POST /visitors/remove`). Visitors with an open connection count too. Who is on the
//! site is the cluster's ([`Shared::mark`]), so every node gives the same answer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::shared::Shared;
use crate::model::Role;
use crate::service::ServiceError;
use crate::store::Store;
use crate::store::visitors::{Sighting, Visitor};

/// How long a sighting keeps a visitor on the site (pages report themselves more often).
pub const ACTIVE_FOR: Duration = Duration::from_secs(5 * 60);

/// Visitor tracking.
#[derive(Debug)]
pub struct VisitorService {
    store: Arc<dyn Store>,
    shared: Shared,
}

impl VisitorService {
    /// Tracks visitors in `store`, sharing who is on the site through `shared`.
    pub fn new(store: Arc<dyn Store>, shared: Shared) -> Self {
        Self { store, shared }
    }

    fn set(domain: &str) -> String {
        format!("visitors:{domain}")
    }

    /// Records `sighting` and counts its visitor on the site; returns the visitor as
    /// stored. Stored first: a sighting the store refuses counts nowhere.
    pub async fn add(&self, sighting: Sighting) -> Result<Visitor, ServiceError> {
        let (domain, id) = (sighting.domain_id.clone(), sighting.visitor_id.clone());
        let mut stored = self.store.record_sightings(vec![sighting]).await?;
        self.shared.mark(&Self::set(&domain), &id, ACTIVE_FOR).await;
        stored.pop().ok_or_else(|| {
            ServiceError::Unavailable(crate::store::StoreError::Unavailable(
                "the store recorded nothing".into(),
            ))
        })
    }

    /// The page of `visitor_id` says it left: no longer on the site (unless connected),
    /// and `visitor.removed` for the domain's webhooks that want it, stored first.
    pub async fn remove(&self, domain: &str, visitor_id: &str) -> Result<(), ServiceError> {
        let at = chrono::Utc::now();
        let events = self.store.webhook_subscriptions().rows(
            domain,
            crate::config::WebhookEvent::VisitorRemoved,
            crate::store::webhooks::Partition::Visitor(visitor_id),
            || crate::store::webhooks::visitor_removed_payload(visitor_id, at),
        );
        self.store.enqueue_webhooks(events).await?;
        self.shared.unmark(&Self::set(domain), visitor_id).await;
        Ok(())
    }

    /// The visitors on `domain`'s site now, on every node, by id.
    pub async fn active(&self, domain: &str) -> Vec<String> {
        let mut ids: BTreeSet<String> = self
            .shared
            .marked(&Self::set(domain))
            .await
            .into_iter()
            .collect();
        for (id, _) in self
            .shared
            .online_users(domain, Role::Visitor.as_str())
            .await
        {
            ids.insert(id);
        }
        ids.into_iter().collect()
    }
}
