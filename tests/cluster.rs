//! Several Parlor processes on one PostgreSQL database and one Redis, as deployed behind a
//! load balancer: clients spread over the nodes see every message of a busy room in the
//! same `seq` order, with typing and presence crossing nodes; a node killed with SIGKILL
//! under load loses no acknowledged message and its clients carry on from another node; a
//! Redis restarted under load and PostgreSQL cut off for a few seconds are survived.
//!
//! Needs `PARLOR_TEST_DATABASE_URL` and `PARLOR_TEST_REDIS_URL`; each test makes a database
//! of its own on that server and uses a Redis channel prefix of its own. The Redis restart
//! test runs a `redis-server` of its own, and PostgreSQL is cut off through a TCP relay the
//! test controls, so the machine's shared servers are never stopped.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::cluster::{
    Cluster, Database, NODE_CONFIG, Node, cluster_with_config, collect_seqs, eventually, servers,
};
use common::redis::OwnRedis;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Client;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_on_three_nodes_see_one_order_and_each_others_typing_and_presence() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let db = Database::create(&db_url).await;
    let c = Cluster::start(3, None, &redis, db).await;
    let room = "busy";
    // Three listeners per node.
    let mut listeners = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        for j in 0..3 {
            let mut client = Client::connect(&node.ws(&format!("listener-{i}-{j}"))).await;
            client.join(room, None).await;
            listeners.push(client);
        }
    }
    // A visitor joining on node 0 is announced to a listener on node 2.
    let mut newcomer = Client::connect(&c.nodes[0].ws("newcomer")).await;
    newcomer.join(room, None).await;
    let joined = loop {
        let f = listeners[8].recv().await;
        if f["type"] == "presence" && f["user"]["userId"] == "newcomer" {
            break f;
        }
    };
    assert_eq!(joined["event"], "join");
    // Typing on node 0 reaches node 2.
    newcomer
        .send(json!({ "type": "typing", "roomId": room, "isTyping": true }))
        .await;
    let typing = loop {
        let f = listeners[7].recv().await;
        if f["type"] == "typing" {
            break f;
        }
    };
    assert_eq!(
        (typing["userId"].as_str(), typing["isTyping"].as_bool()),
        (Some("newcomer"), Some(true))
    );

    // One sender per node, all at once.
    let per_sender = 40;
    let mut senders = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let url = node.ws(&format!("sender-{i}"));
        senders.push(tokio::spawn(async move {
            let mut client = Client::connect(&url).await;
            client.join(room, None).await;
            for k in 0..per_sender {
                client
                    .say(room, &format!("s{i}-{k}"), Some(&format!("s{i}-{k}")))
                    .await;
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let total = 3 * per_sender;
    let mut orders = Vec::new();
    for l in &mut listeners {
        orders.push(collect_seqs(l, room, total).await);
    }
    let want: Vec<u64> = (1..=total as u64).collect();
    for (i, seqs) in orders.iter().enumerate() {
        assert_eq!(seqs, &want, "listener {i} saw a different order");
    }
    assert_eq!(c.db().count(room).await, total as i64);
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_under_load_loses_no_acknowledged_message() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let db = Database::create(&db_url).await;
    let mut c = Cluster::start(3, None, &redis, db).await;
    let room = "failover";
    let victim_url = c.nodes[1].ws("victim-client");
    let survivor_url = c.nodes[0].ws("victim-client");
    // A reader on the node that will die, and a sender on it, sending as fast as acks come.
    let mut reader = Client::connect(&victim_url).await;
    reader.join(room, None).await;
    let acked = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let acked = Arc::clone(&acked);
        let stop = Arc::clone(&stop);
        let url = c.nodes[1].ws("sender");
        tokio::spawn(async move {
            let mut client = Client::connect(&url).await;
            client.join(room, None).await;
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let id = client
                    .request(json!({ "type": "send-message", "roomId": room, "message": format!("m{k}") }))
                    .await;
                // The node dies at some point: stop at the first reply that does not come.
                let reply = tokio::time::timeout(Duration::from_secs(2), async {
                    loop {
                        let f =
                            tokio::time::timeout(Duration::from_secs(2), client.ws_next()).await;
                        match f {
                            Ok(Some(v)) if v["replyTo"] == id.as_str() => return Some(v),
                            Ok(Some(_)) => {}
                            _ => return None,
                        }
                    }
                })
                .await
                .ok()
                .flatten();
                match reply {
                    Some(ack) if ack["type"] == "message-ack" => {
                        acked.lock().push(ack["seq"].as_u64().unwrap());
                    }
                    _ => break,
                }
            }
        })
    };
    // And a sender on another node, which keeps going.
    let other = {
        let url = c.nodes[2].ws("other-sender");
        tokio::spawn(async move {
            let mut client = Client::connect(&url).await;
            client.join(room, None).await;
            let mut seqs = Vec::new();
            for k in 0..60 {
                let ack = client.say(room, &format!("o{k}"), None).await;
                seqs.push(ack["seq"].as_u64().unwrap());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seqs
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.nodes[1].kill9();
    stop.store(true, Ordering::Relaxed);
    let _ = sender.await;
    let other_seqs = other.await.unwrap();
    let acked = acked.lock().clone();
    assert!(
        !acked.is_empty(),
        "the victim's sender got acks before the kill"
    );

    // The reader's last seen position.
    let mut last = 0;
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(200), reader.ws_next()).await
    {
        if f["type"] == "message-received" {
            last = f["seq"].as_u64().unwrap();
        }
        if f["type"] == "message-history" {
            for m in f["messages"].as_array().unwrap() {
                last = last.max(m["seq"].as_u64().unwrap());
            }
        }
    }
    // It reconnects to a surviving node and recovers the rest, with no gap or duplicate.
    let mut reader = Client::connect(&survivor_url).await;
    let (_, missed) = reader.join(room, Some(last)).await;
    let total = c.db().count(room).await as u64;
    let seqs: Vec<u64> = missed.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, ((last + 1)..=total).collect::<Vec<_>>());
    // Every acknowledged message is stored.
    let stored: std::collections::HashSet<u64> = c.db().seqs(room).await.into_iter().collect();
    for seq in acked.iter().chain(other_seqs.iter()) {
        assert!(stored.contains(seq), "acknowledged seq {seq} is not stored");
    }
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_under_load_is_caught_up_from_the_store() {
    let Some((db_url, _)) = servers() else { return };
    let mut redis = OwnRedis::start();
    let db = Database::create(&db_url).await;
    let c = Cluster::start(2, None, &redis.url(), db).await;
    let room = "through-redis-restart";
    let mut listener = Client::connect(&c.nodes[1].ws("listener")).await;
    listener.join(room, None).await;
    let mut sender = Client::connect(&c.nodes[0].ws("sender")).await;
    sender.join(room, None).await;
    let mut sent = 0u64;
    for k in 0..10 {
        sender.say(room, &format!("before-{k}"), None).await;
        sent += 1;
    }
    redis.kill();
    // Sends keep working on node 0 (the store is fine); node 1 misses them live.
    for k in 0..10 {
        sender.say(room, &format!("during-{k}"), None).await;
        sent += 1;
    }
    // The node notices within a few seconds, and says it is degraded, not down.
    let deadline = Instant::now() + Duration::from_secs(5);
    let health = loop {
        let res = reqwest::get(c.nodes[0].http("/health")).await.unwrap();
        let code = res.status().as_u16();
        let h: Value = res.json().await.unwrap();
        if h["broker"]["status"] == "unavailable" || Instant::now() > deadline {
            assert_eq!(code, 200, "{h}");
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health["broker"]["status"], "unavailable", "{health}");
    assert_eq!(health["status"], "degraded");
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    for k in 0..10 {
        sender.say(room, &format!("after-{k}"), None).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The listener on node 1 ends with every message once, in order.
    let seqs = collect_seqs(&mut listener, room, sent as usize).await;
    assert_eq!(seqs, (1..=sent).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h: Value = reqwest::get(c.nodes[1].http("/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["status"] == "healthy" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 did not report Redis back: {h}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.finish().await;
}

/// A TCP relay to PostgreSQL that the test can cut and restore.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(target: (String, u16)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (Arc::clone(&up), Arc::clone(&conns));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                // Checked and recorded under the lock `cut` takes, so no connection accepted
                // around a cut escapes it.
                let mut conns = conns2.lock();
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                conns.push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Self { port, up, conns }
    }

    fn cut(&self) {
        let mut conns = self.conns.lock();
        self.up.store(false, Ordering::SeqCst);
        for c in conns.drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap();
    match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().unwrap()),
        None => (hostport.to_owned(), 5432),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_off_fails_sends_clearly_and_recovers() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let db = Database::create(&db_url).await;
    let relay = Relay::start(host_port(&db_url)).await;
    let via = db.url_via(relay.port);
    let c = Cluster::start(1, Some(&via), &redis, db).await;
    let room = "pg-outage";
    let mut client = Client::connect(&c.nodes[0].ws("writer")).await;
    client.join(room, None).await;
    let first = client.say(room, "before", None).await;
    assert_eq!(first["seq"], 1);
    relay.cut();
    let mut refused = HashMap::new();
    let started = Instant::now();
    for k in 0..3 {
        let id = client
            .request(
                json!({ "type": "send-message", "roomId": room, "message": format!("during-{k}") }),
            )
            .await;
        let reply = client.reply(&id).await;
        assert_eq!(
            reply["type"], "error",
            "nothing is acknowledged while the store is away: {reply}"
        );
        *refused
            .entry(reply["code"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(refused.get("store_unavailable"), Some(&3), "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "sends failed slowly: {:?}",
        started.elapsed()
    );
    let health = reqwest::get(c.nodes[0].http("/health")).await.unwrap();
    assert_eq!(health.status(), 503);
    relay.restore();
    // Sends work again, and nothing refused was stored. The retries carry one
    // `clientMessageId`, as a client's do: on a busy machine an attempt can time out after
    // its commit (the error says only that it is not known to be stored), and the retry
    // must not store it twice.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ack = loop {
        let id = client
            .request(json!({ "type": "send-message", "roomId": room, "message": "after", "clientMessageId": "after-1" }))
            .await;
        let reply = client.reply(&id).await;
        if reply["type"] == "message-ack" {
            break reply;
        }
        assert!(
            Instant::now() < deadline,
            "the store did not come back: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Nothing refused was stored: the room holds `before`, `after` once, and what the node
    // itself wrote (the hand-off service queues a visitor of a domain without an assistant
    // for a person), with no gap.
    let stored = c.db().contents(room).await;
    let texts: Vec<&str> = stored.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        !texts.iter().any(|t| t.starts_with("during-")),
        "the refused sends left no trace: {texts:?}"
    );
    assert_eq!(
        texts.iter().filter(|t| **t == "after").count(),
        1,
        "{texts:?}"
    );
    assert_eq!(texts.first(), Some(&"before"), "{texts:?}");
    let seqs: Vec<u64> = stored.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{texts:?}"
    );
    assert_eq!(
        stored
            .iter()
            .find(|(_, t)| t == "after")
            .map(|(seq, _)| *seq),
        ack["seq"].as_u64(),
        "{texts:?}"
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_spans_the_nodes_and_a_dead_nodes_users_leave() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let db = Database::create(&db_url).await;
    let mut c = Cluster::start(3, None, &redis, db).await;
    let room = "who-is-here";
    let mut ann = Client::connect(&c.nodes[0].ws("ann")).await;
    ann.join(room, None).await;
    // Bob has two tabs, on nodes 0 and 1.
    let mut bob_a = Client::connect(&c.nodes[0].ws("bob")).await;
    bob_a.join(room, None).await;
    let mut bob_b = Client::connect(&c.nodes[1].ws("bob")).await;
    bob_b.join(room, None).await;
    // A joiner on node 2 sees everyone, whichever node they are on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut carol = Client::connect(&c.nodes[2].ws("carol")).await;
    let (joined, _) = carol.join(room, None).await;
    let mut members: Vec<&str> = joined["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    members.sort_unstable();
    assert_eq!(members, ["ann", "bob", "carol"], "{joined}");
    assert_eq!(joined["memberCount"], 3);

    // Bob closing the tab on node 1 is not a leave: he is still on node 0.
    drop(bob_b);
    let quiet_until = Instant::now() + Duration::from_millis(800);
    while let Ok(Some(f)) = tokio::time::timeout_at(quiet_until.into(), carol.ws_next()).await {
        assert!(
            !(f["type"] == "presence" && f["event"] == "leave"),
            "a user still on another node was announced as gone: {f}"
        );
    }
    // Node 0 dies: Ann and Bob leave, announced to Carol within the TTL.
    c.nodes[0].kill9();
    let mut left = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while left.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no leave after the node died: {left:?}"
        );
        let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(1), carol.ws_next()).await
        else {
            continue;
        };
        if f["type"] == "presence" && f["event"] == "leave" {
            left.push(f["user"]["userId"].as_str().unwrap().to_owned());
        }
    }
    left.sort();
    assert_eq!(
        left,
        ["ann", "bob"],
        "exactly the dead node's users, once each"
    );
    let id = carol
        .request(json!({ "type": "presence", "roomId": room }))
        .await;
    let reply = carol.reply(&id).await;
    let now: Vec<&str> = reply["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    assert_eq!(now, ["carol"], "{reply}");
    c.finish().await;
}

/// `method path` on `node` with a bearer token: the status and the JSON body.
async fn admin_call(
    node: &Node,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    common::call(method, &node.http(path), token, body).await
}

const GLOBEX_SECRET: &str = "tenant-hs256-secret-0123456789-abcdef";

/// A parlor.toml like [`Node::start`]'s, with the admin key of hash `admin_entry`.
fn admin_config(admin_entry: &str) -> String {
    format!(
        r#"shutdown_timeout_ms = 3000
[auth]
admin_keys = ["{admin_entry}"]
[limits]
ip_requests_per_second = 100000
ip_requests_burst = 100000
ip_connects_per_second = 100000
ip_connects_burst = 100000
[[domains]]
id = "demo"
name = "Parlor demo"
allowed_origins = ["*"]
[domains.bot]
enabled = false
"#
    )
}

/// Settings of a run-time domain `globex` verifying its own HS256 tokens.
fn globex_settings() -> Value {
    json!({
        "name": "Globex",
        "allowedOrigins": ["https://globex.example"],
        "jwt": { "secret": GLOBEX_SECRET, "issuer": ["https://id.globex.example"] }
    })
}

/// A WebSocket URL of `node` with a token of globex's identity provider.
fn globex_ws(node: &Node) -> String {
    let exp = chrono::Utc::now().timestamp() + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "iss": "https://id.globex.example", "sub": "ann", "role": "visitor", "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(GLOBEX_SECRET.as_bytes()),
    )
    .unwrap();
    format!("ws://127.0.0.1:{}/ws?token={token}", node.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_domain_change_on_one_node_reaches_the_others() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let (admin, admin_entry) =
        parlor::auth::keys::generate_with(parlor::auth::keys::ADMIN_KEY_PREFIX);
    let db = Database::create(&db_url).await;
    let c = cluster_with_config(2, &redis, db, &admin_config(&admin_entry)).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let publish = |node: &Node, key: String| {
        let url = node.http("/api/publish");
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&json!({ "roomId": "g-1", "message": "hello", "role": "assistant" }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let within = Duration::from_secs(5);
    // Unknown on both nodes at first.
    assert!(Client::try_connect(&globex_ws(b)).await.is_err());

    // Created on node A: usable on node B.
    let settings = globex_settings();
    let (status, body) = admin_call(
        a,
        reqwest::Method::PUT,
        "/api/admin/domains/globex",
        &admin,
        Some(&settings),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(
        eventually(within, || async {
            Client::try_connect(&globex_ws(b)).await.is_ok()
        })
        .await,
        "node B does not know the domain created on node A: {}",
        b.log_tail()
    );
    let (status, body) = admin_call(
        b,
        reqwest::Method::GET,
        "/api/admin/domains/globex",
        &admin,
        None,
    )
    .await;
    assert_eq!(
        (status, body["name"].as_str()),
        (200, Some("Globex")),
        "{body}"
    );

    // A server key added on node A works on node B.
    let (status, key) = admin_call(
        a,
        reqwest::Method::POST,
        "/api/admin/domains/globex/keys",
        &admin,
        Some(&json!({})),
    )
    .await;
    assert_eq!(status, 201, "{key}");
    let secret = key["key"].as_str().unwrap().to_owned();
    let key_id = key["id"].as_str().unwrap().to_owned();
    assert!(
        eventually(within, || {
            let sent = publish(b, secret.clone());
            async move { sent.await == 201 }
        })
        .await,
        "node B refuses the key added on node A"
    );

    // Revoked on node A: refused on node B.
    let (status, _) = admin_call(
        a,
        reqwest::Method::DELETE,
        &format!("/api/admin/domains/globex/keys/{key_id}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        eventually(within, || {
            let sent = publish(b, secret.clone());
            async move { sent.await == 401 }
        })
        .await,
        "node B still takes the key revoked on node A"
    );

    // Removed on node B: node A refuses the tenant's tokens.
    let (status, _) = admin_call(
        b,
        reqwest::Method::DELETE,
        "/api/admin/domains/globex",
        &admin,
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        eventually(within, || async {
            Client::try_connect(&globex_ws(a)).await.is_err()
        })
        .await,
        "node A still knows the domain removed on node B"
    );
    c.finish().await;
}

/// The `presence` frames of `room` that `client` receives within `window`: (user, event).
async fn presence_within(
    client: &mut Client,
    room: &str,
    window: Duration,
) -> Vec<(String, String)> {
    let until = Instant::now() + window;
    let mut seen = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout_at(until.into(), client.ws_next()).await {
        if f["type"] == "presence" && f["roomId"] == room {
            seen.push((
                f["user"]["userId"].as_str().unwrap_or_default().to_owned(),
                f["event"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_still_on_another_node_is_not_announced_as_gone_on_this_one() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let db = Database::create(&db_url).await;
    let c = Cluster::start(2, None, &redis, db).await;
    let room = "two-tabs";
    let mut ann = Client::connect(&c.nodes[0].ws("ann")).await;
    ann.join(room, None).await;
    let mut carol = Client::connect(&c.nodes[1].ws("carol")).await;
    carol.join(room, None).await;
    // Bob has a tab on each node.
    let mut bob_a = Client::connect(&c.nodes[0].ws("bob")).await;
    bob_a.join(room, None).await;
    let mut bob_b = Client::connect(&c.nodes[1].ws("bob")).await;
    bob_b.join(room, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = presence_within(&mut ann, room, Duration::from_millis(100)).await;
    let _ = presence_within(&mut carol, room, Duration::from_millis(100)).await;

    // Bob closes the tab on node A, beside Ann: he is still on node B, so nobody is told.
    drop(bob_a);
    let (seen_a, seen_b) = tokio::join!(
        presence_within(&mut ann, room, Duration::from_millis(1500)),
        presence_within(&mut carol, room, Duration::from_millis(1500)),
    );
    let bob_left = |seen: &[(String, String)]| {
        seen.iter()
            .any(|(user, event)| user == "bob" && event == "leave")
    };
    assert!(
        !bob_left(&seen_a),
        "node A announced Bob as gone: {seen_a:?}"
    );
    assert!(
        !bob_left(&seen_b),
        "node B announced Bob as gone: {seen_b:?}"
    );

    // Bob closes his last tab, on node B: both nodes' members are told, once.
    drop(bob_b);
    let (seen_a, seen_b) = tokio::join!(
        presence_within(&mut ann, room, Duration::from_millis(1500)),
        presence_within(&mut carol, room, Duration::from_millis(1500)),
    );
    let leaves = |seen: &[(String, String)]| {
        seen.iter()
            .filter(|(user, event)| user == "bob" && event == "leave")
            .count()
    };
    assert_eq!(leaves(&seen_a), 1, "node A: {seen_a:?}");
    assert_eq!(leaves(&seen_b), 1, "node B: {seen_b:?}");

    // Quick joins and leaves on node A are shown in order and end with Dave gone.
    for _ in 0..5 {
        let mut dave = Client::connect(&c.nodes[0].ws("dave")).await;
        dave.join(room, None).await;
        drop(dave);
    }
    let (seen_a, seen_b) = tokio::join!(
        presence_within(&mut ann, room, Duration::from_millis(1500)),
        presence_within(&mut carol, room, Duration::from_millis(1500)),
    );
    for (node, seen) in [("A", &seen_a), ("B", &seen_b)] {
        let dave: Vec<&str> = seen
            .iter()
            .filter(|(user, _)| user == "dave")
            .map(|(_, event)| event.as_str())
            .collect();
        // Joins and leaves alternate: nothing shown twice, nothing the other way round.
        assert_eq!(dave.first(), Some(&"join"), "node {node}: {dave:?}");
        assert_eq!(dave.last(), Some(&"leave"), "node {node}: {dave:?}");
        assert!(
            !dave.windows(2).any(|w| w[0] == w[1]),
            "node {node} did not alternate: {dave:?}"
        );
    }
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_domain_change_announced_while_redis_was_away_arrives_when_it_is_back() {
    let Some((db_url, _)) = servers() else { return };
    let mut redis = OwnRedis::start();
    let (admin, admin_entry) =
        parlor::auth::keys::generate_with(parlor::auth::keys::ADMIN_KEY_PREFIX);
    let db = Database::create(&db_url).await;
    let c = cluster_with_config(2, &redis.url(), db, &admin_config(&admin_entry)).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    redis.kill();
    // Node A stores the domain and uses it; its announcement goes nowhere.
    let (status, body) = admin_call(
        a,
        reqwest::Method::PUT,
        "/api/admin/domains/globex",
        &admin,
        Some(&globex_settings()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(Client::try_connect(&globex_ws(a)).await.is_ok());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        Client::try_connect(&globex_ws(b)).await.is_err(),
        "node B cannot have heard of it"
    );
    // Once Redis is back, node B rebuilds its table.
    redis.restart();
    assert!(
        eventually(Duration::from_secs(15), || async {
            Client::try_connect(&globex_ws(b)).await.is_ok()
        })
        .await,
        "node B did not catch up with the domain created during the outage: {}",
        b.log_tail()
    );
    c.finish().await;
}

/// A room's hand-off state crosses nodes: an agent on one node takes a room whose visitor
/// writes on another, and the bot there falls silent. The node that commits a conversation's
/// messages judges them without asking the store for the state each time: only a message
/// after another node wrote in the room costs a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hand_off_state_crosses_nodes_and_a_quiet_room_costs_no_state_reads() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let db = Database::create(&db_url).await;
    let config = NODE_CONFIG.replace(
        "[domains.bot]\nenabled = false\n",
        "[domains.bot]\nknowledge_dir = \"builtin:demo\"\n[domains.handoff]\nenabled = true\n",
    );
    assert_ne!(config, NODE_CONFIG, "the bot and hand-off are switched on");
    let c = cluster_with_config(2, &redis, db, &config).await;
    let reads = "parlor_handoff_state_reads_total";
    let room = "support-quiet";
    let mut visitor = Client::connect(&c.nodes[0].ws("ann")).await;
    visitor.join(room, None).await;

    // The bot answers every question on the visitor's node; after the first message, the
    // node knows the room's state is its own.
    for _ in 0..10 {
        visitor
            .say(room, "How do I catch up after a reconnect?", None)
            .await;
        loop {
            let f = visitor.recv_type("message-received").await;
            if f["role"] == "assistant" {
                break;
            }
        }
    }
    let quiet = c.nodes[0].metric(reads, "").await;
    assert!(
        quiet <= 1.0,
        "{quiet} state reads for 20 messages committed on one node"
    );

    // An agent on the other node takes the room.
    let mut agent = Client::connect(&c.nodes[1].ws_as("alice", "agent")).await;
    agent.join(room, None).await;
    let id = agent
        .request(json!({ "type": "assign", "roomId": room }))
        .await;
    let taken = agent.reply(&id).await;
    assert_eq!(taken["conversation"]["status"], "assigned", "{taken}");
    loop {
        let f = visitor.recv_type("message-received").await;
        if f["messageType"] == "status" {
            break;
        }
    }
    // The visitor's next message is judged on the new state: no answer from the bot, then
    // the agent's.
    visitor.say(room, "Are you a person?", None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.say(room, "Yes, I'm Alice.", None).await;
    loop {
        let f = visitor.recv_type("message-received").await;
        assert_ne!(
            f["role"], "assistant",
            "the bot answered in a room an agent on another node took: {f}"
        );
        if f["role"] == "agent" {
            break;
        }
    }
    assert!(
        c.nodes[0].metric(reads, "").await > quiet,
        "a message after another node's change reads the state"
    );
    c.finish().await;
}
