//! Pusher's webhooks: an app's `channel_occupied`, `channel_vacated`, `member_added` and
//! `member_removed`, posted to the URLs of its `pusher_keys` entries (`docs/pusher.md`,
//! "Webhooks").
//!
//! The hub reports each change once for the whole cluster ([`Watcher`]; the broker's
//! [`Occupancy`](crate::broker::Occupancy) and presence decide on a cluster). Reports wait
//! in one queue of [`QUEUE`]; one task takes them in, up to [`BATCH`] at a time, and groups
//! them by destination (URL and signing key): each group is one POST of Pusher's body,
//! `{"time_ms": …, "events": [{"name": …, "channel": …, "user_id"?: …}]}`, with the
//! headers `X-Pusher-Key` (the key) and `X-Pusher-Signature` (hex HMAC-SHA256 of the body
//! with its secret).
//!
//! Each destination has its own worker, so a slow or failing receiver holds up only its
//! own posts, which stay in order. A post that fails (no answer in ten seconds, or a status
//! other than 2xx) is tried again after 1, 2, 4 … 60 seconds, for [`RETRY_FOR`], then
//! dropped with a warning, as Pusher does. Delivery is best effort: what waits in memory
//! is lost with the node (Parlor's own webhooks, with a durable outbox, are another
//! thing). The outcomes are counted in `parlor_pusher_webhooks_total`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::App;
use crate::auth::domains::Domains;
use crate::broker::ChannelChange;
use crate::config::PusherWebhookEvent;
use crate::hub::Watcher;
use crate::hub::channels::{channel_app, channel_name};
use crate::metrics::Metrics;
use crate::node::Supervisor;

/// Changes waiting to be sent at most; further ones are dropped and counted.
pub const QUEUE: usize = 65_536;
/// Changes taken in per round, so per post at most.
pub const BATCH: usize = 100;
/// Posts waiting per destination at most.
const PER_DESTINATION: usize = 1_024;
/// How long a post is tried again.
pub const RETRY_FOR: Duration = Duration::from_secs(300);
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One post: its events, and the app whose key signs them.
#[derive(Debug)]
struct Post {
    app: App,
    events: Vec<Value>,
}

/// Where the hub's channel changes go to become webhooks.
#[derive(Debug)]
pub struct PusherWebhooks {
    queue: mpsc::Sender<ChannelChange>,
    metrics: Arc<Metrics>,
}

impl PusherWebhooks {
    /// Starts the task that sends the webhooks of the apps of `domains` (it ends at
    /// shutdown).
    pub fn start(
        domains: Arc<Domains>,
        metrics: Arc<Metrics>,
        supervisor: &Supervisor,
    ) -> Arc<Self> {
        let (queue, mut changes) = mpsc::channel(QUEUE);
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .unwrap_or_default();
        let stop = supervisor.shutdown().clone();
        let counted = Arc::clone(&metrics);
        let workers_of = supervisor.clone();
        supervisor.spawn("pusher-webhooks", async move {
            let mut workers: HashMap<(String, String), mpsc::Sender<Post>> = HashMap::new();
            let mut round = Vec::with_capacity(BATCH);
            while stop
                .run_until_cancelled(changes.recv_many(&mut round, BATCH))
                .await
                .is_some_and(|n| n > 0)
            {
                let posts = group(&domains, round.drain(..));
                for ((url, key), post) in posts {
                    let worker = workers.entry((url.clone(), key)).or_insert_with(|| {
                        spawn_worker(&workers_of, url, client.clone(), &counted, stop.clone())
                    });
                    if worker.try_send(post).is_err() {
                        counted.pusher_webhook("dropped", 1);
                    }
                }
            }
        });
        Arc::new(Self { queue, metrics })
    }
}

impl Watcher for PusherWebhooks {
    fn change(&self, change: ChannelChange) {
        if self.queue.try_send(change).is_err() {
            self.metrics.pusher_webhook("dropped", 1);
        }
    }
}

/// Pusher's name of `change`, its channel's key and its event object.
fn event_of(change: &ChannelChange) -> (PusherWebhookEvent, &crate::model::RoomKey, Value) {
    let (kind, key, user) = match change {
        ChannelChange::Occupied(key) => (PusherWebhookEvent::ChannelOccupied, key, None),
        ChannelChange::Vacated(key) => (PusherWebhookEvent::ChannelVacated, key, None),
        ChannelChange::MemberAdded(key, user) => (PusherWebhookEvent::MemberAdded, key, Some(user)),
        ChannelChange::MemberRemoved(key, user) => {
            (PusherWebhookEvent::MemberRemoved, key, Some(user))
        }
    };
    let channel = channel_name(key).unwrap_or_default();
    let mut event = json!({ "name": kind.name(), "channel": channel });
    if let Some(user) = user {
        event["user_id"] = Value::from(user.as_str());
    }
    (kind, key, event)
}

/// The posts `changes` make, by destination (URL, signing key), in the order of the
/// changes.
fn group(
    domains: &Domains,
    changes: impl Iterator<Item = ChannelChange>,
) -> Vec<((String, String), Post)> {
    let table = domains.load();
    let mut posts: Vec<((String, String), Post)> = Vec::new();
    for change in changes {
        let (kind, key, event) = event_of(&change);
        let (Some(app_id), Some(channel)) = (channel_app(key), channel_name(key)) else {
            continue;
        };
        // A signed-in user's server-to-user channel is Parlor's, not the app's.
        if channel.starts_with('#') {
            continue;
        }
        for (name, k) in table.pusher_webhooks(&key.domain_id, app_id) {
            for hook in k.webhooks.iter().filter(|h| h.events.contains(&kind)) {
                let destination = (hook.url.clone(), name.to_owned());
                match posts.iter_mut().find(|(d, _)| *d == destination) {
                    Some((_, post)) => post.events.push(event.clone()),
                    None => posts.push((
                        destination,
                        Post {
                            app: App::new(name, k),
                            events: vec![event.clone()],
                        },
                    )),
                }
            }
        }
    }
    posts
}

/// Starts the worker posting to `url`, one post at a time, in order.
fn spawn_worker(
    supervisor: &Supervisor,
    url: String,
    client: reqwest::Client,
    metrics: &Arc<Metrics>,
    stop: CancellationToken,
) -> mpsc::Sender<Post> {
    let (tx, mut rx) = mpsc::channel::<Post>(PER_DESTINATION);
    let metrics = Arc::clone(metrics);
    supervisor.spawn("pusher-webhook-worker", async move {
        while let Some(Some(post)) = stop.run_until_cancelled(rx.recv()).await {
            let n = post.events.len() as u64;
            let outcome = match stop
                .run_until_cancelled(deliver(&client, &url, &post))
                .await
            {
                Some(true) => "delivered",
                Some(false) => "failed",
                None => return,
            };
            metrics.pusher_webhook(outcome, n);
        }
    });
    tx
}

/// Posts `post` to `url` until it is taken (true) or [`RETRY_FOR`] has passed (false).
async fn deliver(client: &reqwest::Client, url: &str, post: &Post) -> bool {
    let time_ms = chrono::Utc::now().timestamp_millis();
    let body = json!({ "time_ms": time_ms, "events": post.events }).to_string();
    let signature = post.app.sign(&[body.as_bytes()]);
    let started = Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        let answer = client
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Pusher-Key", &post.app.key)
            .header("X-Pusher-Signature", &signature)
            .body(body.clone())
            .send()
            .await;
        let why = match answer {
            Ok(r) if r.status().is_success() => return true,
            Ok(r) => format!("status {}", r.status().as_u16()),
            Err(e) => e.to_string(),
        };
        if started.elapsed() + backoff > RETRY_FOR {
            tracing::warn!(url, error = %why, events = post.events.len(),
                "Pusher webhook not taken; given up");
            return false;
        }
        tracing::debug!(url, error = %why, retry_in = ?backoff, "Pusher webhook not taken");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
