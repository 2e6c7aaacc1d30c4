//! Cluster-wide state in a real Redis: rate-limit budgets, counters, online users and
//! "last connection wins" claims shared by several nodes; a node that loses Redis decides
//! alone instead of failing. Then whole servers on one Redis: one HTTP budget, one AI
//! token budget, one online count and one agent list across nodes with separate stores.
//!
//! Needs `PARLOR_TEST_REDIS_URL`; the outage test starts a `redis-server` of its own.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;
#[path = "common/fake_ai.rs"]
mod fake_ai;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use common::redis::OwnRedis;
use fake_ai::{FakeVendor, Reply};
use parlor::broker::shared::{OnlineCounts, Rate, Shared};
use parlor::config::{BotConfig, Config, DomainConfig, ProviderConfig, ProviderKind};
use parlor::metrics::Metrics;
use parlor::model::{Identity, Role};
use parlor::node::Supervisor;
use serde_json::{Value, json};

/// A supervisor of its own for one node's tasks.
fn supervisor() -> Supervisor {
    Supervisor::new(
        tokio_util::sync::CancellationToken::new(),
        Arc::new(Metrics::new()),
    )
}

async fn nodes(url: &str, prefix: &str, n: usize, ttl: Duration) -> Vec<Shared> {
    let mut list = Vec::new();
    for _ in 0..n {
        list.push(
            Shared::connect(url, prefix, ttl, Arc::new(Metrics::new()), &supervisor())
                .await
                .expect("connects"),
        );
    }
    list
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 10 s: {what}");
}

/// An identity of `user` (named `name`) in `domain`.
fn who(domain: &str, user: &str, name: &str) -> Arc<Identity> {
    Arc::new(Identity {
        user_id: user.to_owned(),
        name: name.to_owned(),
        role: Role::Visitor,
        domain_id: Arc::from(domain),
        anonymous: false,
        room: None,
        label: None,
    })
}

#[tokio::test]
async fn nodes_draw_on_one_rate_budget() {
    let Some(url) = common::redis::test_url() else {
        return;
    };
    let n = nodes(&url, &common::redis::prefix(), 2, Duration::from_secs(30)).await;
    let rate = Rate::per_second(1, 3);
    assert!(n[0].take("request", "10.0.0.1", rate).await.is_ok());
    assert!(n[1].take("request", "10.0.0.1", rate).await.is_ok());
    assert!(n[0].take("request", "10.0.0.1", rate).await.is_ok());
    // The burst of 3 is spent, whichever node is asked.
    let wait = n[1]
        .take("request", "10.0.0.1", rate)
        .await
        .expect_err("the fourth unit within a second is refused");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    assert!(n[0].take("request", "10.0.0.1", rate).await.is_err());
    // Other keys and buckets have budgets of their own.
    assert!(n[0].take("request", "10.0.0.2", rate).await.is_ok());
    assert!(n[0].take("connect", "10.0.0.1", rate).await.is_ok());
    // The budget refills at the rate: one unit after a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(n[1].take("request", "10.0.0.1", rate).await.is_ok());
    assert!(n[0].take("request", "10.0.0.1", rate).await.is_err());
}

#[tokio::test]
async fn a_counter_is_seeded_once_and_grows_from_every_node() {
    let Some(url) = common::redis::test_url() else {
        return;
    };
    let n = nodes(&url, &common::redis::prefix(), 2, Duration::from_secs(30)).await;
    let ttl = Duration::from_secs(60);
    // Nothing to add to before it is seeded.
    assert_eq!(n[0].add("tokens", 5).await, None);
    assert_eq!(
        n[0].counter("tokens", ttl, async { Some(100) }).await,
        Some(100)
    );
    // A second seed (another node, another store) does not reset it.
    assert_eq!(
        n[1].counter("tokens", ttl, async { Some(7) }).await,
        Some(100)
    );
    assert_eq!(n[1].add("tokens", 20).await, Some(120));
    assert_eq!(n[0].add("tokens", 3).await, Some(123));
    assert_eq!(
        n[1].counter("tokens", ttl, async { panic!("not seeded again") })
            .await,
        Some(123)
    );
}

#[tokio::test]
async fn online_users_are_counted_once_across_nodes_and_a_dead_nodes_go() {
    let Some(url) = common::redis::test_url() else {
        return;
    };
    let n = nodes(&url, &common::redis::prefix(), 3, Duration::from_secs(1)).await;
    let ann_a = n[0].online(&who("shop", "ann", "Ann"), "visitor");
    let ann_b = n[1].online(&who("shop", "ann", "Ann"), "visitor");
    let bob_b = n[1].online(&who("shop", "bob", "Bob"), "visitor");
    let eve_c = n[2].online(&who("shop", "eve", "Eve"), "agent");
    let _other = n[2].online(&who("other", "zed", "Zed"), "visitor");
    let counts = |want: OnlineCounts| {
        let node = n[0].clone();
        move || {
            let node = node.clone();
            async move { node.online_counts("shop").await == want }
        }
    };
    eventually(
        "ann and bob counted once each, eve as an agent",
        counts(OnlineCounts {
            visitors: 2,
            agents: 1,
        }),
    )
    .await;
    // Ann is still on node B.
    drop(ann_a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        n[2].online_counts("shop").await,
        OnlineCounts {
            visitors: 2,
            agents: 1
        }
    );
    drop(ann_b);
    eventually(
        "ann gone",
        counts(OnlineCounts {
            visitors: 1,
            agents: 1,
        }),
    )
    .await;
    assert_eq!(
        n[1].online_users("shop", "agent").await,
        vec![("eve".to_owned(), "Eve".to_owned())]
    );
    // Node C dies without a word: its agent stops counting within the TTL.
    std::mem::forget(eve_c);
    n[2].close().await;
    eventually(
        "the dead node's agent expired",
        counts(OnlineCounts {
            visitors: 1,
            agents: 0,
        }),
    )
    .await;
    drop(bob_b);
}

#[tokio::test]
async fn the_newest_claim_wins_on_any_node() {
    let Some(url) = common::redis::test_url() else {
        return;
    };
    let n = nodes(&url, &common::redis::prefix(), 2, Duration::from_secs(30)).await;
    let first = n[0].claim("session", "s-1", 1).await;
    let other_key = n[0].claim("session", "s-2", 2).await;
    assert!(!first.is_displaced());
    // A newer connection on another node takes the key over.
    let second = n[1].claim("session", "s-1", 7).await;
    tokio::time::timeout(Duration::from_secs(5), first.displaced())
        .await
        .expect("the older holder on node A is told");
    assert!(!second.is_displaced());
    assert!(!other_key.is_displaced());
    // And a newer one on the same node displaces it at once.
    let third = n[1].claim("session", "s-1", 8).await;
    assert!(second.is_displaced());
    // A holder that gives up does not clear a newer claim.
    drop(first);
    let fourth = n[0].claim("session", "s-1", 9).await;
    tokio::time::timeout(Duration::from_secs(5), third.displaced())
        .await
        .expect("node B's holder is told");
    assert!(!fourth.is_displaced());
}

#[tokio::test]
async fn without_redis_a_node_decides_alone_and_quickly() {
    if common::redis::test_url().is_none() {
        return;
    }
    let mut redis = OwnRedis::start();
    let metrics = Arc::new(Metrics::new());
    let node = Shared::connect(
        &redis.url(),
        &common::redis::prefix(),
        Duration::from_secs(30),
        Arc::clone(&metrics),
        &supervisor(),
    )
    .await
    .unwrap();
    let rate = Rate::per_second(1, 1);
    assert!(node.take("request", "k", rate).await.is_ok());
    assert!(node.take("request", "k", rate).await.is_err());
    redis.kill();
    let started = Instant::now();
    for _ in 0..5 {
        assert!(
            node.take("request", "k", rate).await.is_ok(),
            "with Redis gone, the node's own limiter is the limit"
        );
    }
    assert_eq!(
        node.counter("c", Duration::from_secs(60), async { Some(1) })
            .await,
        None
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "each call gives up within its timeout: {:?}",
        started.elapsed()
    );
    assert!(metrics.encode().contains("parlor_shared_fallbacks_total"));
    // Back again: the budget is Redis's once more.
    redis.restart();
    eventually("Redis answers again", || {
        let node = node.clone();
        async move {
            node.take("request", "k2", rate).await.is_ok()
                && node.take("request", "k2", rate).await.is_err()
        }
    })
    .await;
}

/// Two servers with stores of their own on one Redis (the state under test lives only
/// there).
async fn two_servers(
    url: &str,
    configure: impl Fn(&mut Config) + Clone,
) -> (TestServer, TestServer) {
    let prefix = common::redis::prefix();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let url = url.to_owned();
        let prefix = prefix.clone();
        let configure = configure.clone();
        servers.push(
            TestServer::start_with(move |c| {
                c.broker = url;
                c.broker_prefix = prefix;
                configure(c);
            })
            .await,
        );
    }
    let b = servers.pop().unwrap();
    let a = servers.pop().unwrap();
    (a, b)
}

fn token(user: &str, role: &str, domain: &str) -> String {
    parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        user,
        Some(user),
        role,
        domain,
        600,
    )
    .unwrap()
}

#[tokio::test]
async fn an_address_has_one_request_budget_across_servers() {
    let Some(url) = common::redis::test_url() else {
        return;
    };
    let (a, b) = two_servers(&url, |c| {
        c.limits.ip_requests_per_second = 1;
        c.limits.ip_requests_burst = 4;
    })
    .await;
    let http = reqwest::Client::new();
    let status = |s: &TestServer| {
        let req = http.get(s.http("/api/agents"));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // Each server alone would allow 4 at once; together they allow 4. (Without a token the
    // caller is an anonymous visitor, whom the agent list refuses.)
    assert_eq!(status(&a).await, 403);
    assert_eq!(status(&b).await, 403);
    assert_eq!(status(&a).await, 403);
    assert_eq!(status(&b).await, 403);
    let res = http.get(b.http("/api/agents")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 429);
    assert!(res.headers().get("retry-after").is_some());
    let (_, body) = common::status_and_body(res).await;
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(status(&a).await, 429);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn online_counts_and_the_agent_list_span_servers() {
    let Some(url) = common::redis::test_url() else {
        return;
    };
    let (a, b) = two_servers(&url, |_| {}).await;
    let agent = token("eve", "agent", "demo");
    let (status, body) = b.get_with("/api/online", &agent).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["visitors"].as_u64(), body["cluster"].as_bool()),
        (Some(0), Some(true))
    );
    // Visitors on either server, one of them on both.
    let _ann_a =
        common::Client::connect(&a.ws(&format!("/ws?token={}", token("ann", "visitor", "demo"))))
            .await;
    let _ann_b =
        common::Client::connect(&b.ws(&format!("/ws?token={}", token("ann", "visitor", "demo"))))
            .await;
    let _bob_a =
        common::Client::connect(&a.ws(&format!("/ws?token={}", token("bob", "visitor", "demo"))))
            .await;
    // An agent watching the inbox on server A.
    let mut eve = common::Client::connect(&a.ws(&format!("/ws?token={agent}"))).await;
    let id = eve.request(json!({ "type": "subscribe-inbox" })).await;
    assert_eq!(eve.reply(&id).await["type"], "inbox");
    eventually("two visitors and one agent counted on server B", || {
        let b = &b;
        let agent = agent.clone();
        async move {
            let (_, body) = b.get_with("/api/online", &agent).await;
            body["visitors"] == 2 && body["agents"] == 1
        }
    })
    .await;
    // Server B's transfer list has the agent watching on server A.
    let (status, body) = b.get_with("/api/agents", &agent).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["agents"],
        json!([{ "userId": "eve", "name": "eve" }]),
        "{body}"
    );
    // Visitors may not read the counts.
    let (status, body) = b
        .get_with("/api/online", &token("ann", "visitor", "demo"))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    drop(eve);
    eventually("the agent's inbox watch ended", || {
        let b = &b;
        let agent = agent.clone();
        async move {
            let (_, body) = b.get_with("/api/agents", &agent).await;
            body["agents"] == json!([])
        }
    })
    .await;
    a.stop().await;
    b.stop().await;
}

async fn ask(s: &TestServer, token: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(s.http("/ai/chat"))
        .bearer_auth(token)
        .json(&json!({ "message": "How do returns work?" }))
        .send()
        .await
        .unwrap();
    common::status_and_body(res).await
}

#[tokio::test]
async fn a_domains_daily_ai_budget_is_spent_across_servers() {
    let Some(url) = common::redis::test_url() else {
        return;
    };
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &["Hi"],
        (30, 19),
        true,
    ))])
    .await;
    let base = fake.url("/v1");
    let (a, b) = two_servers(&url, move |c| {
        let mut p = ProviderConfig::new(ProviderKind::Openai, "gpt-4o-mini");
        p.base_url = Some(base.clone());
        p.retries = 0;
        c.ai.providers.insert("fake".into(), p);
        c.domains.push(DomainConfig {
            bot: Some(BotConfig {
                providers: vec!["fake".into()],
                daily_token_budget: Some(40),
                ..BotConfig::default()
            }),
            ..common::chat_domain("shop", "Shop")
        });
    })
    .await;
    // 49 tokens on server A spend the day's 40 for the whole cluster.
    let (status, body) = ask(&a, &token("ann", "visitor", "shop")).await;
    assert_eq!(status, 200, "{body}");
    // The count is added in the background as the call ends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = ask(&b, &token("bob", "visitor", "shop")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("budget_exceeded")),
        "{body}"
    );
    assert_eq!(fake.received().len(), 1, "server B never called the vendor");
    a.stop().await;
    b.stop().await;
}
