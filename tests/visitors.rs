//! Seed 001's visitor endpoints (`docs/visitors.md`): `POST /visitors/add` stores the
//! sighting and counts the visitor on the site, `POST /visitors/remove` takes it off; every
//! field wrong is refused with nothing stored or counted; the count is the cluster's.
//!
//! The two-node test (one node is killed at the end: its connected visitor stops counting)
//! needs `PARLOR_TEST_DATABASE_URL` and `PARLOR_TEST_REDIS_URL` and says it is skipped
//! without them.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::TestServer;
use serde_json::{Value, json};

const ORIGIN: &str = "https://shop.example";

/// A stored visitor: id, visits, page, referrer, user agent, data.
type Row = (
    String,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// A POST of `body` to `url` from a page of `origin` (none: not a browser).
async fn post(url: &str, origin: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("user-agent", "Mozilla/5.0 (test)")
        .json(body);
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    let res = request.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn shop() -> parlor::config::DomainConfig {
    let mut shop = common::chat_domain("shop", "Shop");
    shop.allowed_origins = vec![ORIGIN.to_owned()];
    shop
}

#[tokio::test]
async fn pages_report_their_visitors_and_bad_reports_change_nothing() {
    let s = TestServer::start_with(|c| c.domains.push(shop())).await;
    let add = s.http("/visitors/add");
    let remove = s.http("/visitors/remove");
    let data = json!({ "page": "https://shop.example/pricing", "referrer": "https://search.example/", "plan": "pro" });
    let (status, body) = post(
        &add,
        Some(ORIGIN),
        &json!({ "domainId": "shop", "visitorId": "v1", "visitorData": data }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({ "success": true, "domainId": "shop", "visitorId": "v1", "visits": 1, "activeVisitors": 1 })
    );
    let (_, body) = post(
        &add,
        Some(ORIGIN),
        &json!({ "domainId": "shop", "visitorId": "v2" }),
    )
    .await;
    assert_eq!(body["activeVisitors"], 2);
    // The same visitor again: the same visit, still two on the site.
    let (_, body) = post(
        &add,
        Some(ORIGIN),
        &json!({ "domainId": "shop", "visitorId": "v1", "visitorData": { "url": "https://shop.example/cart" } }),
    )
    .await;
    assert_eq!(
        (body["visits"].clone(), body["activeVisitors"].clone()),
        (json!(1), json!(2))
    );

    // Every field wrong: refused, nothing stored, nothing counted.
    let long = "x".repeat(2049);
    let big = json!({ "blob": "y".repeat(4100) });
    for (origin, request, status, code) in [
        (
            Some(ORIGIN),
            json!({ "domainId": "nope", "visitorId": "v9" }),
            404,
            "unknown_domain",
        ),
        (
            Some("https://evil.example"),
            json!({ "domainId": "shop", "visitorId": "v9" }),
            403,
            "origin_not_allowed",
        ),
        (
            None,
            json!({ "domainId": "shop", "visitorId": "v9" }),
            403,
            "origin_not_allowed",
        ),
        (
            Some(ORIGIN),
            json!({ "domainId": "shop", "visitorId": "" }),
            400,
            "invalid_user_id",
        ),
        (
            Some(ORIGIN),
            json!({ "domainId": "shop", "visitorId": "a b" }),
            400,
            "invalid_user_id",
        ),
        (
            Some(ORIGIN),
            json!({ "domainId": "shop", "visitorId": "v".repeat(129) }),
            400,
            "invalid_user_id",
        ),
        (
            Some(ORIGIN),
            json!({ "domainId": "shop", "visitorId": "v9", "visitorData": "str" }),
            400,
            "invalid_data",
        ),
        (
            Some(ORIGIN),
            json!({ "domainId": "shop", "visitorId": "v9", "visitorData": big }),
            400,
            "invalid_data",
        ),
        (
            Some(ORIGIN),
            json!({ "domainId": "shop", "visitorId": "v9", "visitorData": { "page": long } }),
            400,
            "invalid_data",
        ),
        (
            Some(ORIGIN),
            json!({ "domainId": "shop", "visitorId": "v9", "visitorData": { "referrer": 5 } }),
            400,
            "invalid_data",
        ),
        (
            Some(ORIGIN),
            json!({ "domainId": "shop", "visitorId": "v9", "extra": 1 }),
            400,
            "invalid_body",
        ),
        (
            Some(ORIGIN),
            json!({ "visitorId": "v9" }),
            400,
            "invalid_body",
        ),
        (
            Some(ORIGIN),
            json!({ "domainId": "shop", "visitorId": 9 }),
            400,
            "invalid_body",
        ),
    ] {
        let (got, body) = post(&add, origin, &request).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{request}: {body}"
        );
    }
    let (got, body) = post(
        &remove,
        Some(ORIGIN),
        &json!({ "domainId": "shop", "visitorId": "a b" }),
    )
    .await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (400, Some("invalid_user_id"))
    );

    // v1 leaves.
    let (status, body) = post(
        &remove,
        Some(ORIGIN),
        &json!({ "domainId": "shop", "visitorId": "v1" }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["activeVisitors"], 1);

    // What was stored: two visitors, v1 with its last page, the first referrer, the user
    // agent and its last data; nothing of the refused reports.
    let (config, _dir) = s.stop().await;
    let path = config.database.trim_start_matches("sqlite://").to_owned();
    let conn = rusqlite::Connection::open(path).unwrap();
    let rows: Vec<Row> = conn
        .prepare("SELECT visitor_id, visits, page, referrer, user_agent, data FROM visitors ORDER BY visitor_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (id, visits, page, referrer, agent, data) = &rows[0];
    assert_eq!((id.as_str(), *visits), ("v1", 1));
    assert_eq!(page.as_deref(), Some("https://shop.example/cart"));
    assert_eq!(referrer.as_deref(), Some("https://search.example/"));
    assert_eq!(agent.as_deref(), Some("Mozilla/5.0 (test)"));
    assert_eq!(
        data.as_deref(),
        Some(r#"{"url":"https://shop.example/cart"}"#)
    );
    let days: i64 = conn
        .query_row(
            "SELECT SUM(visitors) FROM visitor_days WHERE domain_id = 'shop'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(days, 2);
}

#[tokio::test]
async fn who_is_on_the_site_is_the_same_on_every_node() {
    let Some((db_url, redis)) = common::cluster::servers() else {
        return;
    };
    // A dead node's connections stop counting within the presence lifetime.
    let config = format!(
        "broker_presence_ttl_secs = 2\n{}[[domains]]\nid = \"shop\"\nname = \"Shop\"\nallowed_origins = [\"{ORIGIN}\"]\n",
        common::cluster::NODE_CONFIG
    );
    let db = common::cluster::Database::create(&db_url).await;
    let mut cluster = common::cluster::cluster_with_config(2, &redis, db, &config).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (status, body) = post(
        &a.http("/visitors/add"),
        Some(ORIGIN),
        &json!({ "domainId": "shop", "visitorId": "va" }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = post(
        &b.http("/visitors/add"),
        Some(ORIGIN),
        &json!({ "domainId": "shop", "visitorId": "vb" }),
    )
    .await;
    assert_eq!(body["activeVisitors"], 2, "node B counts node A's visitor");
    let (_, body) = post(
        &b.http("/visitors/remove"),
        Some(ORIGIN),
        &json!({ "domainId": "shop", "visitorId": "va" }),
    )
    .await;
    assert_eq!(body["activeVisitors"], 1);
    let (_, body) = post(
        &a.http("/visitors/add"),
        Some(ORIGIN),
        &json!({ "domainId": "shop", "visitorId": "vb" }),
    )
    .await;
    assert_eq!(
        (body["activeVisitors"].clone(), body["visits"].clone()),
        (json!(1), json!(1)),
        "one store"
    );

    // A visitor's page joining node B over /ws: on the site (on node A too) and stored.
    let token = |user: &str, role: &str| {
        parlor::auth::issue_token(
            &parlor::config::Secret::new(common::TEST_SECRET),
            user,
            Some(user),
            role,
            "shop",
            600,
        )
        .unwrap()
    };
    let mut vc = common::Client::connect(&format!(
        "ws://127.0.0.1:{}/ws?token={}",
        b.port,
        token("vc", "visitor")
    ))
    .await;
    let id = vc
        .request(json!({ "type": "join-room", "roomId": "support-vc",
            "context": { "page": "https://shop.example/cart" } }))
        .await;
    assert_eq!(vc.reply(&id).await["type"], "room-joined");
    let agent = token("ann", "agent");
    let stats = |url: String| {
        let agent = agent.clone();
        async move {
            let res = reqwest::Client::new()
                .get(url)
                .bearer_auth(agent)
                .send()
                .await
                .unwrap();
            res.json::<Value>().await.unwrap()
        }
    };
    let seen = stats(a.http("/stats/domain/shop")).await;
    assert_eq!(
        (
            seen["activeVisitors"].clone(),
            seen["visitorsToday"].clone()
        ),
        (json!(2), json!(3)),
        "vb reported, vc connected to node B; va, vb and vc seen today: {seen}"
    );
    let listed = stats(a.http("/stats/domain/shop/visitors")).await;
    let vc_row = listed["visitors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["visitorId"] == "vc")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        vc_row["visitor"]["page"], "https://shop.example/cart",
        "{listed}"
    );

    // Node B dies: its visitor stops counting on node A once its presence runs out; what
    // was stored stays.
    cluster.nodes[1].kill9();
    let a_stats = cluster.nodes[0].http("/stats/domain/shop");
    let gone = common::cluster::eventually(std::time::Duration::from_secs(15), || {
        let url = a_stats.clone();
        let stats = &stats;
        async move { stats(url).await["activeVisitors"] == 1 }
    })
    .await;
    assert!(
        gone,
        "node B's visitor still counted: {}",
        stats(a_stats.clone()).await
    );
    assert_eq!(stats(a_stats).await["visitorsToday"], 3);
    cluster.finish().await;
}
