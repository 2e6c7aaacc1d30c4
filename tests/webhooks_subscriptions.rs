//! What a write of a domain without webhooks asks of them: the store asks
//! [`Subscriptions::rows`] at every append, transition, notification and sighting. For a
//! domain no webhook wants (no domain has webhooks, another domain has, or the domain's
//! webhooks want other events) the answer is empty and the payload is never built; for a
//! subscribed event, one row with the partition and the payload. What the lookup costs a
//! write is measured by the benchmark tool (`BENCHMARKS.md`, the persist scenario), not
//! here.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use parlor::config::{DomainConfig, Secret, WebhookConfig, WebhookEvent};
use parlor::store::webhooks::{Partition, Subscriptions};

/// Asks for an event of domain `quiet`, whose payload must not be built.
fn ask_quiet(subscriptions: &Subscriptions) {
    let rows = subscriptions.rows(
        "quiet",
        WebhookEvent::MessageCreated,
        Partition::Room("room-1"),
        || unreachable!("no payload is built for a domain without webhooks"),
    );
    assert!(rows.is_empty());
}

fn hook(url: &str, events: Vec<WebhookEvent>) -> WebhookConfig {
    WebhookConfig {
        url: url.into(),
        secret: Secret::new("0123456789abcdef"),
        events,
    }
}

#[test]
fn a_domain_without_webhooks_builds_nothing() {
    let subscriptions = Subscriptions::default();
    ask_quiet(&subscriptions);

    let mut shop = DomainConfig::new("shop", "Shop");
    shop.webhooks = vec![hook(
        "https://shop.example/hook",
        vec![WebhookEvent::MessageCreated],
    )];
    subscriptions.replace([&shop, &DomainConfig::new("other", "Other")]);
    ask_quiet(&subscriptions);

    let mut quiet = DomainConfig::new("quiet", "Quiet");
    quiet.webhooks = vec![hook(
        "https://quiet.example/hook",
        vec![WebhookEvent::ConversationResolved],
    )];
    subscriptions.replace([&shop, &quiet]);
    ask_quiet(&subscriptions);

    // A subscribed event is built, once per URL that wants it.
    let rows = subscriptions.rows(
        "shop",
        WebhookEvent::MessageCreated,
        Partition::Room("room-1"),
        || serde_json::json!({ "seq": 1 }),
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].partition, "room:room-1");
    assert_eq!(rows[0].payload, r#"{"seq":1}"#);
}
