//! What webhooks cost a write of a domain without them: the store asks
//! [`Subscriptions::rows`] at every append, transition, notification and sighting. For a
//! domain no webhook wants, that is one lookup in a table swapped whole on change: the
//! partition and the payload are not built (nothing is formatted or allocated for them).
//! Measured here per ask, whether no domain or another domain has webhooks; the figures
//! are printed (`--nocapture`) and held to a bound far above them, so a slow machine does
//! not fail the test but a lookup turned into real work would.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Instant;

use parlor::config::{DomainConfig, Secret, WebhookConfig, WebhookEvent};
use parlor::store::webhooks::{Partition, Subscriptions};

/// The bound per ask, in nanoseconds (a debug build measures well under a microsecond).
const BOUND_NS: f64 = 20_000.0;

/// Asks for `n` events of domain `quiet`; returns the nanoseconds per ask.
fn ask(subscriptions: &Subscriptions, n: u32) -> f64 {
    let started = Instant::now();
    for _ in 0..n {
        let rows = subscriptions.rows(
            "quiet",
            WebhookEvent::MessageCreated,
            Partition::Room("room-1"),
            || unreachable!("no payload is built for a domain without webhooks"),
        );
        assert!(rows.is_empty());
    }
    started.elapsed().as_secs_f64() * 1e9 / f64::from(n)
}

#[test]
fn a_domain_without_webhooks_pays_a_lookup() {
    let subscriptions = Subscriptions::default();
    let ns = ask(&subscriptions, 100_000);
    eprintln!("no domain has webhooks: {ns:.1} ns per write");
    assert!(ns < BOUND_NS, "{ns} ns");

    let mut shop = DomainConfig::new("shop", "Shop");
    shop.webhooks = vec![WebhookConfig {
        url: "https://shop.example/hook".into(),
        secret: Secret::new("0123456789abcdef"),
        events: vec![WebhookEvent::MessageCreated],
    }];
    let mut quiet = DomainConfig::new("quiet", "Quiet");
    quiet.webhooks = vec![WebhookConfig {
        url: "https://quiet.example/hook".into(),
        secret: Secret::new("0123456789abcdef"),
        // Another event only.
        events: vec![WebhookEvent::ConversationResolved],
    }];
    subscriptions.replace([&shop, &DomainConfig::new("other", "Other")]);
    let ns = ask(&subscriptions, 100_000);
    eprintln!("another domain has webhooks: {ns:.1} ns per write");
    assert!(ns < BOUND_NS, "{ns} ns");

    subscriptions.replace([&shop, &quiet]);
    let ns = ask(&subscriptions, 100_000);
    eprintln!("the domain's webhooks want other events: {ns:.1} ns per write");
    assert!(ns < BOUND_NS, "{ns} ns");

    // A subscribed event is built.
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
