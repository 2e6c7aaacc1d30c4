//! The domains' webhooks (`docs/webhooks.md`): delivery from the store's outbox, the
//! delivery log, and the pruning of old rows.
//!
//! The store writes an outbox row with every change a webhook wants, in the change's own
//! transaction ([`crate::store::webhooks`]). Here every node runs one [`Deliverer`]:
//! - it claims due partition heads with a lease (`webhooks.lease`), as many as it has room
//!   for (`webhooks.max_in_flight`), and posts each in a task of its own, at most
//!   `webhooks.per_destination` at once per URL;
//! - a 2xx answer marks the row delivered; anything else (or no answer within
//!   `webhooks.attempt_timeout`) schedules a retry after a back-off that doubles from
//!   `webhooks.min_backoff` up to `webhooks.max_backoff`, until `webhooks.retry_for` after
//!   the event: then the row is dead. Either way the partition's next row becomes its head;
//!   a retried row holds its partition back, so each room's events arrive in order;
//! - a node that dies holding rows loses nothing: their leases pass and any node claims
//!   them again. Delivery is therefore at least once: a receiver deduplicates by the
//!   `X-Parlor-Webhook-Id` header (the body's `id`).
//!
//! Each post is `{id, type, domainId, createdAt, data}` signed as
//! `X-Parlor-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//!
//! Depends on the store, the domain table (for the webhooks' secrets), metrics and the
//! node's supervisor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hmac::Mac;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::ServiceError;
use crate::auth::Domains;
use crate::auth::policy;
use crate::config::WebhooksConfig;
use crate::error_code::ErrorCode;
use crate::metrics::Metrics;
use crate::model::Identity;
use crate::node::Supervisor;
use crate::store::Store;
use crate::store::webhooks::{
    Attempt, Claim, ClaimedRow, Delivery, DeliveryQuery, DeliveryStatus, Outcome,
};

/// Most rows one page of the delivery log holds.
pub const MAX_PAGE: usize = 500;
/// Rows of a log page when the request names no `limit`.
pub const DEFAULT_PAGE: usize = 50;
/// Rows deleted per statement when pruning.
const PRUNE_BATCH: usize = 500;
/// How often the backlog gauges are refreshed.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);
/// How often a node claims when no domain has webhooks and its last claim found nothing
/// (events left by a webhook since removed are then given up).
const IDLE_CLAIM_EVERY: Duration = Duration::from_secs(60);
/// Longest an error text kept in the log.
const MAX_ERROR: usize = 300;

/// The signature header's value for `body` sent at `t` (unix seconds).
pub fn signature(secret: &str, t: i64, body: &str) -> String {
    format!("t={t},v1={}", sign(secret, t, body))
}

/// Hex HMAC-SHA256 of `"<t>.<body>"` with `secret`.
pub fn sign(secret: &str, t: i64, body: &str) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The body posted for `row`: the same bytes at every attempt.
pub fn body(row: &ClaimedRow) -> Result<String, String> {
    let data: Value = serde_json::from_str(&row.payload)
        .map_err(|e| format!("the stored event cannot be read: {e}"))?;
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Envelope<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        domain_id: &'a str,
        created_at: String,
        data: Value,
    }
    serde_json::to_string(&Envelope {
        id: &row.id,
        kind: &row.event,
        domain_id: &row.domain_id,
        created_at: crate::model::iso(row.created_at),
        data,
    })
    .map_err(|e| format!("the event cannot be encoded: {e}"))
}

/// How long an event whose URL this node does not know is retried before it is given up:
/// longer than a settings change takes to reach every node.
const UNKNOWN_URL_GRACE: chrono::Duration = chrono::Duration::minutes(2);

/// The wait after attempt number `attempts` (1: the first) failed.
pub fn backoff(config: &WebhooksConfig, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(30);
    config
        .min_backoff
        .saturating_mul(1 << doublings)
        .min(config.max_backoff)
}

/// The webhooks of every domain: delivery and the delivery log.
#[derive(Debug)]
pub struct WebhookService {
    store: Arc<dyn Store>,
    domains: Arc<Domains>,
}

impl WebhookService {
    /// The service, with this node's [`Deliverer`] and its pruning started (both end at
    /// shutdown).
    pub fn start(
        store: Arc<dyn Store>,
        domains: Arc<Domains>,
        metrics: Arc<Metrics>,
        config: WebhooksConfig,
        supervisor: &Supervisor,
    ) -> Arc<Self> {
        let client = reqwest::Client::builder()
            .timeout(config.attempt_timeout)
            .connect_timeout(config.attempt_timeout)
            .user_agent(concat!("Parlor-Webhooks/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let deliverer = Arc::new(Deliverer {
            store: Arc::clone(&store),
            domains: Arc::clone(&domains),
            metrics,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            destinations: Mutex::new(HashMap::new()),
            finished: Notify::new(),
            // The process id first: an operator reading `claimed_by` finds the process.
            node: format!(
                "pid{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
            client,
            supervisor: supervisor.clone(),
            config,
        });
        tracing::info!(node = %deliverer.node, "webhook delivery started");
        supervisor.spawn("webhook-delivery", Arc::clone(&deliverer).run());
        supervisor.spawn("webhook-cleanup", deliverer.prune_loop());
        Arc::new(Self { store, domains })
    }

    /// A page of `domain`'s delivery log, newest first, for an administrator, and the
    /// `before` of the next page (`None`: this was the last).
    pub async fn deliveries(
        &self,
        caller: &Identity,
        domain: &str,
        status: Option<&str>,
        limit: Option<&str>,
        before: Option<&str>,
    ) -> Result<(Vec<Delivery>, Option<i64>), ServiceError> {
        if !policy::may_manage_domains(caller) {
            return Err(ServiceError::Forbidden(
                "the delivery log needs an admin key".into(),
            ));
        }
        if self.domains.load().get(domain).is_none() {
            return Err(ServiceError::NotFound {
                code: ErrorCode::DomainNotFound,
                message: format!("no domain {domain:?}"),
            });
        }
        let invalid = |m: String| ServiceError::invalid(ErrorCode::InvalidQuery, m);
        let status = status
            .map(|s| {
                DeliveryStatus::parse(s).ok_or_else(|| {
                    invalid(format!(
                        "status {s:?} is not one of pending, delivered, dead"
                    ))
                })
            })
            .transpose()?;
        let limit = match limit {
            None => DEFAULT_PAGE,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=MAX_PAGE).contains(l))
                .ok_or_else(|| {
                    invalid(format!(
                        "limit {l:?} must be a whole number from 1 to {MAX_PAGE}"
                    ))
                })?,
        };
        let before = before
            .map(|b| {
                b.parse::<i64>().ok().filter(|b| *b > 0).ok_or_else(|| {
                    invalid(format!(
                        "before {b:?} must be the `next` of a previous page (a positive number)"
                    ))
                })
            })
            .transpose()?;
        let rows = self
            .store
            .webhook_deliveries(DeliveryQuery {
                domain_id: domain.to_owned(),
                status,
                before,
                limit,
            })
            .await?;
        let next = (rows.len() == limit)
            .then(|| rows.last().map(|r| r.position))
            .flatten();
        Ok((rows, next))
    }
}

/// One node's delivery of the outbox.
struct Deliverer {
    store: Arc<dyn Store>,
    domains: Arc<Domains>,
    metrics: Arc<Metrics>,
    config: WebhooksConfig,
    /// Rows this node holds at most (`webhooks.max_in_flight`).
    in_flight: Arc<Semaphore>,
    /// Per URL: the posts in flight (`webhooks.per_destination`) and the rows held.
    destinations: Mutex<HashMap<String, Destination>>,
    /// Rung when a delivery ends: room for another claim.
    finished: Notify,
    /// This node's name on its leases: `pid<process id>-<random>`.
    node: String,
    client: reqwest::Client,
    supervisor: Supervisor,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Deliverer {
    /// Claims and posts until shutdown.
    async fn run(self: Arc<Self>) {
        let stop = self.supervisor.shutdown().clone();
        // Measured at once, then every BACKLOG_EVERY.
        let mut backlog_at = Instant::now()
            .checked_sub(BACKLOG_EVERY)
            .unwrap_or_else(Instant::now);
        // Without webhooks anywhere, and nothing found last time, a node claims seldom: a
        // server without webhooks puts no claim on its store every second, nor one at start
        // (events a removed webhook left are given up within IDLE_CLAIM_EVERY).
        let mut idle_since: Option<Instant> = Some(Instant::now());
        loop {
            if stop.is_cancelled() {
                return;
            }
            if backlog_at.elapsed() >= BACKLOG_EVERY {
                backlog_at = Instant::now();
                self.measure_backlog().await;
            }
            let idle = self.store.webhook_subscriptions().is_empty()
                && idle_since.is_some_and(|at| at.elapsed() < IDLE_CLAIM_EVERY);
            let room = if idle {
                0
            } else {
                self.in_flight.available_permits()
            };
            let mut claimed = 0;
            if room > 0 {
                let claim = Claim {
                    holder: self.node.clone(),
                    now: Utc::now(),
                    lease: self.config.lease,
                    limit: room,
                    per_endpoint: self.config.per_destination,
                    skip: self.saturated(),
                };
                match self.store.claim_webhooks(&claim).await {
                    Ok(rows) => {
                        claimed = rows.len();
                        idle_since = rows.is_empty().then(Instant::now);
                        for row in rows {
                            self.post_later(row);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim webhook events; retrying");
                    }
                }
            }
            if claimed == room && room > 0 {
                // There may be more, and room for them: claim again at once.
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.finished.notified(), if room == 0 && !idle => {}
                () = tokio::time::sleep(self.config.poll_every) => {}
            }
        }
    }

    /// The URLs this node holds `per_destination` rows of or more.
    fn saturated(&self) -> Vec<String> {
        self.destinations
            .lock()
            .iter()
            .filter(|(_, d)| d.held >= self.config.per_destination)
            .map(|(url, _)| url.clone())
            .collect()
    }

    /// Posts `row` in a task of its own, holding one of the node's places.
    fn post_later(self: &Arc<Self>, row: ClaimedRow) {
        let Ok(place) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            // Claimed more than there is room for: give it back at once.
            let this = Arc::clone(self);
            self.supervisor.spawn("webhook-release", async move {
                this.record(&row, Outcome::Released, None, None).await;
            });
            return;
        };
        // Counted before the next claim looks at which URLs are saturated.
        let destination = {
            let mut all = self.destinations.lock();
            let d = all
                .entry(row.endpoint.clone())
                .or_insert_with(|| Destination {
                    posts: Arc::new(Semaphore::new(self.config.per_destination)),
                    held: 0,
                });
            d.held += 1;
            Arc::clone(&d.posts)
        };
        let this = Arc::clone(self);
        let claimed_at = Instant::now();
        self.supervisor.spawn("webhook-post", async move {
            this.deliver(row, claimed_at, destination, place).await;
            this.finished.notify_one();
        });
    }

    /// One attempt at `row`, its outcome recorded, and its URL's count of held rows
    /// lowered.
    async fn deliver(
        &self,
        row: ClaimedRow,
        claimed_at: Instant,
        destination: Arc<Semaphore>,
        _place: OwnedSemaphorePermit,
    ) {
        let stop = self.supervisor.shutdown().clone();
        self.attempt(&row, claimed_at, destination, &stop).await;
        let mut all = self.destinations.lock();
        if let Some(d) = all.get_mut(&row.endpoint) {
            d.held = d.held.saturating_sub(1);
            if d.held == 0 {
                all.remove(&row.endpoint);
            }
        }
    }

    /// Waits for a place to post to `row`'s URL, posts once, and records the outcome.
    async fn attempt(
        &self,
        row: &ClaimedRow,
        claimed_at: Instant,
        destination: Arc<Semaphore>,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        // The lease must outlast the attempt: a row that waited too long for its URL goes
        // back, unattempted, and is claimed again.
        let latest_start = self
            .config
            .lease
            .saturating_sub(self.config.attempt_timeout)
            .saturating_sub(Duration::from_millis(500));
        let wait = latest_start.saturating_sub(claimed_at.elapsed());
        let permit = tokio::select! {
            () = stop.cancelled() => None,
            p = tokio::time::timeout(wait, destination.acquire_owned()) => p.ok().and_then(Result::ok),
        };
        let Some(_permit) = permit else {
            self.record(row, Outcome::Released, None, None).await;
            return;
        };
        let attempt = tokio::select! {
            () = stop.cancelled() => None,
            a = self.post(row) => Some(a),
        };
        let Some(result) = attempt else {
            self.record(row, Outcome::Released, None, None).await;
            return;
        };
        let attempts = row.attempts.saturating_add(1);
        match result {
            Posted::Taken(status) => {
                self.metrics.webhook("delivered");
                let latency = (Utc::now() - row.created_at).to_std().unwrap_or_default();
                self.metrics.webhook_latency(latency);
                self.record(row, Outcome::Delivered, Some(status), None)
                    .await;
            }
            Posted::Refused(status, error) => {
                let next = Utc::now()
                    + chrono::Duration::from_std(backoff(&self.config, attempts))
                        .unwrap_or(chrono::Duration::MAX);
                let deadline = row.created_at
                    + chrono::Duration::from_std(self.config.retry_for)
                        .unwrap_or(chrono::Duration::MAX);
                let outcome = if next > deadline {
                    tracing::warn!(id = %row.id, url = %row.endpoint, attempts, error = %error,
                        "webhook event given up");
                    self.metrics.webhook("dead");
                    Outcome::Dead
                } else {
                    tracing::debug!(id = %row.id, url = %row.endpoint, attempts, error = %error,
                        retry_at = %next, "webhook event not taken");
                    self.metrics.webhook("failed");
                    Outcome::Retry(next)
                };
                self.record(row, outcome, status, Some(error)).await;
            }
            // This node may not know a webhook another node has just added (the domain
            // table reloads on every node when told): a young event waits for it.
            Posted::UnknownUrl(error) if Utc::now() - row.created_at < UNKNOWN_URL_GRACE => {
                tracing::debug!(id = %row.id, url = %row.endpoint,
                    "webhook event of a URL this node does not know yet; retried");
                self.metrics.webhook("failed");
                let next = Utc::now() + chrono::Duration::seconds(5);
                self.record(row, Outcome::Retry(next), None, Some(error))
                    .await;
            }
            Posted::Unsendable(error) | Posted::UnknownUrl(error) => {
                tracing::warn!(id = %row.id, url = %row.endpoint, error = %error,
                    "webhook event cannot be sent; given up");
                self.metrics.webhook("dead");
                self.record(row, Outcome::Dead, None, Some(error)).await;
            }
        }
    }

    /// Posts `row` once.
    async fn post(&self, row: &ClaimedRow) -> Posted {
        let table = self.domains.load();
        let Some(hook) = table.get(&row.domain_id).and_then(|d| {
            d.settings
                .webhooks
                .iter()
                .find(|h| h.url == row.endpoint)
                .cloned()
        }) else {
            return Posted::UnknownUrl(
                "the domain has no webhook with this URL any more".to_owned(),
            );
        };
        drop(table);
        let body = match body(row) {
            Ok(body) => body,
            Err(e) => return Posted::Unsendable(e),
        };
        let t = Utc::now().timestamp();
        let answer = self
            .client
            .post(&row.endpoint)
            .header("Content-Type", "application/json")
            .header("X-Parlor-Webhook-Id", &row.id)
            .header("X-Parlor-Event", &row.event)
            .header(
                "X-Parlor-Attempt",
                row.attempts.saturating_add(1).to_string(),
            )
            .header(
                "X-Parlor-Signature",
                signature(hook.secret.expose(), t, &body),
            )
            .body(body)
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => Posted::Taken(r.status().as_u16()),
            Ok(r) => {
                let status = r.status().as_u16();
                Posted::Refused(Some(status), format!("the receiver answered {status}"))
            }
            Err(e) => {
                let why = if e.is_timeout() {
                    format!(
                        "no answer within {} ms",
                        self.config.attempt_timeout.as_millis()
                    )
                } else if e.is_connect() {
                    "cannot connect to the receiver".to_owned()
                } else {
                    format!("the post failed: {e}")
                };
                Posted::Refused(None, why)
            }
        }
    }

    /// Stores an attempt's outcome; a failure to store it leaves the row to its lease.
    async fn record(
        &self,
        row: &ClaimedRow,
        outcome: Outcome,
        http_status: Option<u16>,
        error: Option<String>,
    ) {
        let error = error.map(|mut e| {
            if e.len() > MAX_ERROR {
                let mut end = MAX_ERROR;
                while !e.is_char_boundary(end) {
                    end -= 1;
                }
                e.truncate(end);
            }
            e
        });
        let attempt = Attempt {
            at: Utc::now(),
            outcome,
            http_status,
            error,
        };
        match self
            .store
            .finish_webhook(&row.id, &self.node, attempt)
            .await
        {
            Ok(_) => {}
            // Shutting down: the lease gives the row back.
            Err(crate::store::StoreError::Closed) => {}
            Err(e) => tracing::warn!(id = %row.id, error = %e,
                "cannot record a webhook attempt; the event is claimed again after its lease"),
        }
    }

    /// Refreshes the backlog gauges.
    async fn measure_backlog(&self) {
        match self.store.webhook_backlog().await {
            Ok((pending, oldest)) => {
                let age = oldest.map_or(0.0, |at: DateTime<Utc>| {
                    (Utc::now() - at).to_std().unwrap_or_default().as_secs_f64()
                });
                self.metrics.webhook_backlog(pending, age);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the webhook backlog"),
        }
    }

    /// Deletes rows that ended more than `webhooks.keep_finished` ago, in small batches,
    /// every `webhooks.cleanup_every`, until shutdown.
    async fn prune_loop(self: Arc<Self>) {
        if self.config.keep_finished.is_zero() {
            return;
        }
        let stop = self.supervisor.shutdown().clone();
        let mut tick = tokio::time::interval(self.config.cleanup_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Ok(keep) = chrono::Duration::from_std(self.config.keep_finished) else {
                return;
            };
            let before = Utc::now() - keep;
            loop {
                match self.store.prune_webhooks(before, PRUNE_BATCH).await {
                    Ok(n) if n as usize >= PRUNE_BATCH && !stop.is_cancelled() => {
                        tokio::task::yield_now().await;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot prune old webhook events; the next round retries");
                        break;
                    }
                }
            }
        }
    }
}

/// One webhook URL as one node sees it.
#[derive(Debug)]
struct Destination {
    /// Places for posts in flight (`webhooks.per_destination`).
    posts: Arc<Semaphore>,
    /// Rows this node holds for it, posting or waiting for a place. At
    /// `per_destination` or more the node claims none of its rows: a slow receiver keeps
    /// its own rows waiting, not every other URL's.
    held: usize,
}

/// What one post came to.
enum Posted {
    /// A 2xx answer.
    Taken(u16),
    /// Another answer, or none: try again later.
    Refused(Option<u16>, String),
    /// It cannot be sent at all (its payload is unreadable).
    Unsendable(String),
    /// The domain has no webhook with its URL (removed, or not known to this node yet).
    UnknownUrl(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_of_time_dot_body() {
        // Computed independently (Python's hmac module over b'1700000000.{"a":1}').
        let sig = signature("whsec_0123456789abcdef", 1_700_000_000, r#"{"a":1}"#);
        assert_eq!(
            sig,
            "t=1700000000,v1=9f5e37cdc7ea587c7c02062d93283cad000d66a831b2a1676418696db47ed6c2"
        );
        assert_ne!(
            sign("whsec_0123456789abcdef", 1_700_000_000, r#"{"a":1}"#),
            sign("whsec_0123456789abcdeX", 1_700_000_000, r#"{"a":1}"#)
        );
        assert_ne!(
            sign("whsec_0123456789abcdef", 1_700_000_000, r#"{"a":1}"#),
            sign("whsec_0123456789abcdef", 1_700_000_001, r#"{"a":1}"#)
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let config = WebhooksConfig {
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
            ..WebhooksConfig::default()
        };
        let waits: Vec<u64> = (1..=6).map(|n| backoff(&config, n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        assert_eq!(backoff(&config, 1000).as_secs(), 60);
    }

    #[test]
    fn the_body_is_the_envelope_around_the_stored_data() {
        let row = ClaimedRow {
            id: "wh_1".into(),
            domain_id: "shop".into(),
            endpoint: "http://x".into(),
            partition: "room:r".into(),
            event: "message.created".into(),
            payload: r#"{"seq":3}"#.into(),
            created_at: DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
            attempts: 0,
        };
        assert_eq!(
            body(&row).unwrap(),
            r#"{"id":"wh_1","type":"message.created","domainId":"shop","createdAt":"2023-11-14T22:13:20.123Z","data":{"seq":3}}"#
        );
        let broken = ClaimedRow {
            payload: "{".into(),
            ..row
        };
        assert!(body(&broken).is_err());
    }
}
