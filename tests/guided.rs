//! Guided sessions (`/chat`, seed 003): refusals at the upgrade, the built-in guide end to
//! end, resumption, documents and who may read them, the AI-service contract with its
//! failures, last connection wins, the HTTP and admin endpoints, and cleanup.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;
#[path = "common/fake_ai.rs"]
mod fake_ai;

use std::net::SocketAddr;
use std::time::Duration;

use common::fake_service::{FakeService, question};
use common::{Client, TestServer};
use fake_ai::FakeVendor;
use futures_util::SinkExt;
use parlor::config::{BotConfig, Config, ProviderConfig, ProviderKind};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The demo's template.
const NDA: &str = "mutual-nda";

/// Valid answers to the demo template's questions, in order.
const ANSWERS: [&str; 7] = [
    "Acme Ltd",
    "Globex <b>GmbH</b>",
    "To evaluate a possible partnership.",
    "2027-01-31",
    "3",
    "ireland",
    "legal@acme.example",
];

fn chat_url(s: &TestServer, token: &str, template: &str) -> String {
    s.ws(&format!("/chat?token={token}&templateId={template}"))
}

async fn open(s: &TestServer, user: &str, template: &str) -> Client {
    Client::connect(&chat_url(s, &s.token(user), template)).await
}

/// `user` answers the demo template through to its document; the document's id.
async fn finish_nda(s: &TestServer, user: &str) -> String {
    let mut c = open(s, user, NDA).await;
    c.recv().await;
    for a in &ANSWERS[..6] {
        answer(&mut c, a).await;
    }
    let done = answer(&mut c, ANSWERS[6]).await;
    assert_eq!(done["type"], "session_complete", "{done}");
    done["documentId"].as_str().unwrap().to_owned()
}

async fn answer(c: &mut Client, content: &str) -> Value {
    c.send(json!({ "type": "user_message", "content": content }))
        .await;
    c.recv().await
}

/// The status and the JSON error of a refused upgrade (`ws://` URL).
async fn refused(url: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .get(url.replacen("ws://", "http://", 1))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    assert_ne!(status, 101, "the upgrade was accepted");
    let body: Value = res.json().await.unwrap_or(Value::Null);
    (status, body["error"].clone())
}

#[tokio::test]
async fn no_connection_without_a_valid_token_and_a_known_template() {
    let s = TestServer::start_with(|c| c.domains.push(common::chat_domain("shop", "Shop"))).await;
    let good = s.token("ann");
    let (status, body) = refused(&s.ws(&format!("/chat?templateId={NDA}"))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("missing_token"))
    );
    let (status, body) = refused(&chat_url(&s, "not-a-token", NDA)).await;
    assert_eq!(status, 401, "{body}");
    let other_secret = parlor::auth::issue_token(
        &parlor::config::Secret::new("another-secret-0123456789abcdef"),
        "ann",
        None,
        "visitor",
        "demo",
        600,
    )
    .unwrap();
    assert_eq!(refused(&chat_url(&s, &other_secret, NDA)).await.0, 401);
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": "ann", "role": "visitor", "domain": "demo",
                 "exp": chrono::Utc::now().timestamp() - 120 }),
        &jsonwebtoken::EncodingKey::from_secret(common::TEST_SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(refused(&chat_url(&s, &expired, NDA)).await.0, 401);
    let (status, body) = refused(&chat_url(&s, &good, "no-such-template")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("template_not_found"))
    );
    let (status, body) = refused(&s.ws(&format!("/chat?token={good}"))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("missing_template_id"))
    );
    // A token of another domain finds none of the demo's templates.
    let (status, _) = refused(&chat_url(
        &s,
        &s.token_in("elsewhere", "ann", "visitor"),
        NDA,
    ))
    .await;
    assert!(status == 401 || status == 404, "{status}");
    // A widget's visitor token opens sessions in the demo only (and public domains); in
    // another domain a session needs a signed-in user.
    let visitor = s.token_in("shop", "v_0123456789abcdef", "visitor");
    let (status, body) = refused(&chat_url(&s, &visitor, NDA)).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let user = s.token_in("shop", "ann", "visitor");
    assert_eq!(
        refused(&chat_url(&s, &user, NDA)).await.0,
        404,
        "a user gets as far as the template"
    );
    // Nothing was created by any of these.
    let (_, sessions) = s.get_with("/api/sessions", &good).await;
    assert_eq!(sessions["sessions"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn the_built_in_guide_walks_the_template_and_ends_in_a_private_document() {
    let s = TestServer::start().await;
    let mut c = open(&s, "ann", NDA).await;
    let first = c.recv().await;
    assert_eq!(first["type"], "next_question", "{first}");
    assert_eq!(first["question"]["id"], "party_a");
    let session_id = first["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(
        first["question"]["help"],
        "A company or a person, e.g. Acme Ltd."
    );

    // Three answers, one of them invalid: asked again with the reason, same question.
    assert_eq!(
        answer(&mut c, ANSWERS[0]).await["question"]["id"],
        "party_b"
    );
    assert_eq!(
        answer(&mut c, ANSWERS[1]).await["question"]["id"],
        "purpose"
    );
    assert_eq!(answer(&mut c, ANSWERS[2]).await["question"]["id"], "start");
    let again = answer(&mut c, "next tuesday").await;
    assert_eq!(again["type"], "next_question");
    assert_eq!(again["question"]["id"], "start");
    assert!(
        again["question"]["text"]
            .as_str()
            .unwrap()
            .contains("YYYY-MM-DD"),
        "{again}"
    );

    // Leave halfway; come back to the exact point, with every answer in the history.
    drop(c);
    let mut c = open(&s, "ann", NDA).await;
    let resumed = c.recv().await;
    assert_eq!(resumed["type"], "session_resumed", "{resumed}");
    assert_eq!(resumed["sessionId"], session_id.as_str());
    let history = resumed["history"].as_array().unwrap();
    let said: Vec<&str> = history
        .iter()
        .filter(|t| t["role"] == "user")
        .map(|t| t["content"].as_str().unwrap())
        .collect();
    assert_eq!(said, [ANSWERS[0], ANSWERS[1], ANSWERS[2], "next tuesday"]);
    assert!(history.iter().all(|t| t["timestamp"].is_string()));
    let pending = c.recv().await;
    assert_eq!(pending["type"], "next_question");
    assert_eq!(pending["question"]["id"], "start");

    for a in &ANSWERS[3..6] {
        assert_eq!(answer(&mut c, a).await["type"], "next_question");
    }
    let done = answer(&mut c, ANSWERS[6]).await;
    assert_eq!(done["type"], "session_complete", "{done}");
    assert_eq!(done["sessionId"], session_id.as_str());
    let close = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1000);
    let document_id = done["documentId"].as_str().unwrap().to_owned();

    // The owner reads it in three forms; the answers are in it, escaped.
    let ann = s.token("ann");
    let (status, doc) = s
        .get_with(&format!("/api/documents/{document_id}"), &ann)
        .await;
    assert_eq!(status, 200, "{doc}");
    let content = doc["content"].as_str().unwrap();
    assert!(content.contains("**Acme Ltd**"), "{content}");
    assert!(content.contains("Globex &lt;b>GmbH&lt;/b>"), "{content}");
    assert!(
        content.contains("Ireland"),
        "choices are kept as the template spells them"
    );
    assert_eq!(doc["sessionId"], session_id.as_str());
    let md = reqwest::Client::new()
        .get(s.http(&format!("/api/documents/{document_id}.md")))
        .bearer_auth(&ann)
        .send()
        .await
        .unwrap();
    assert_eq!(md.headers()["content-type"], "text/markdown; charset=utf-8");
    assert_eq!(md.text().await.unwrap(), content);
    let html = reqwest::Client::new()
        .get(s.http(&format!("/api/documents/{document_id}.html")))
        .bearer_auth(&ann)
        .send()
        .await
        .unwrap();
    assert!(
        html.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let page = html.text().await.unwrap();
    assert!(page.contains("<strong>Acme Ltd</strong>"), "{page}");
    assert!(!page.contains("<b>GmbH"), "{page}");

    // Nobody else can: another user, another domain's user.
    for other in [s.token("bob"), s.token_in("elsewhere", "ann", "visitor")] {
        let (status, body) = s
            .get_with(&format!("/api/documents/{document_id}"), &other)
            .await;
        assert!(status == 404 || status == 401, "{status} {body}");
        let (status, _) = s
            .get_with(&format!("/api/sessions/{session_id}"), &other)
            .await;
        assert!(status == 404 || status == 401, "{status}");
    }
    let (_, mine) = s.get_with("/api/documents", &ann).await;
    assert_eq!(mine["documents"][0]["id"], document_id.as_str());
    assert!(mine["documents"][0].get("content").is_none());
    let (_, theirs) = s.get_with("/api/documents", &s.token("bob")).await;
    assert_eq!(theirs["documents"], json!([]));

    // The session is complete; opening the template again starts a new one.
    let (_, list) = s
        .get_with(&format!("/api/sessions?templateId={NDA}"), &ann)
        .await;
    assert_eq!(list["sessions"][0]["status"], "complete");
    let mut again = open(&s, "ann", NDA).await;
    let fresh = again.recv().await;
    assert_eq!(fresh["type"], "next_question");
    assert_ne!(fresh["sessionId"], session_id.as_str());
    s.stop().await;
}

#[tokio::test]
async fn bad_frames_are_ignored_and_oversize_answers_refused_without_losing_anything() {
    let s = TestServer::start().await;
    let mut c = open(&s, "ann", NDA).await;
    let first = c.recv().await;
    let session = first["sessionId"].as_str().unwrap().to_owned();
    c.send_raw(Message::Text("not json".into())).await;
    c.send(json!({ "type": "join-room", "roomId": "x" })).await;
    c.send(json!({ "type": "user_message" })).await;
    c.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    let long = "x".repeat(4001);
    let refused = answer(&mut c, &long).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "answer_too_long");
    // The connection still works, and nothing of the above was stored.
    let next = answer(&mut c, "Acme Ltd").await;
    assert_eq!(next["question"]["id"], "party_b");
    let (_, got) = s
        .get_with(&format!("/api/sessions/{session}"), &s.token("ann"))
        .await;
    let user_turns: Vec<&Value> = got["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "user")
        .collect();
    assert_eq!(user_turns.len(), 1, "{got}");
    assert!(
        s.metric("parlor_guided_sessions_total", "ignored_frame")
            .await
            >= 4.0
    );

    // A client that sends nothing but ignored frames is closed.
    for _ in 0..60 {
        if c.ws.send(Message::Text("{}".into())).await.is_err() {
            break;
        }
    }
    let close = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    s.stop().await;
}

#[tokio::test]
async fn the_last_connection_wins() {
    let s = TestServer::start().await;
    let mut first = open(&s, "ann", NDA).await;
    let q = first.recv().await;
    assert_eq!(q["type"], "next_question");
    let mut second = open(&s, "ann", NDA).await;
    assert_eq!(second.recv().await["type"], "session_resumed");
    assert_eq!(second.recv().await["question"]["id"], "party_a");
    let replaced = first.recv().await;
    assert_eq!(replaced["type"], "error");
    assert_eq!(replaced["code"], "replaced");
    // `/chat` connections count in /health.
    let (_, health) = common::status_and_body(reqwest::get(s.http("/health")).await.unwrap()).await;
    assert!(
        health["connections"]["active"].as_u64().unwrap() >= 1,
        "{health}"
    );
    assert!(
        health["connections"]["total"].as_u64().unwrap() >= 2,
        "{health}"
    );
    let close = first.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4013);
    // The new one carries on.
    assert_eq!(
        answer(&mut second, "Acme Ltd").await["question"]["id"],
        "party_b"
    );
    // Another user's session of the same template is not touched.
    let mut bob = open(&s, "bob", NDA).await;
    assert_eq!(bob.recv().await["type"], "next_question");
    assert_eq!(
        answer(&mut second, "Globex").await["question"]["id"],
        "purpose"
    );
    s.stop().await;
}

#[tokio::test]
async fn answers_survive_a_restart() {
    let s = TestServer::start().await;
    let mut c = open(&s, "ann", NDA).await;
    c.recv().await;
    answer(&mut c, ANSWERS[0]).await;
    answer(&mut c, ANSWERS[1]).await;
    drop(c);
    let s = s.restart().await;
    let mut c = open(&s, "ann", NDA).await;
    let resumed = c.recv().await;
    let answers: Vec<&str> = resumed["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "user")
        .map(|t| t["content"].as_str().unwrap())
        .collect();
    assert_eq!(answers, &ANSWERS[..2]);
    assert_eq!(c.recv().await["question"]["id"], "purpose");
    s.stop().await;
}

// ------------------------------------------------------------------------------------------
// The AI-service contract
// ------------------------------------------------------------------------------------------

async fn with_service(addr: SocketAddr, configure: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(move |c| {
        c.domains[0].ai_service_url = Some(format!("http://{addr}"));
        c.domains[0].ai_service_api_key = Some(parlor::config::Secret::new("service-key-123"));
        configure(c);
    })
    .await
}

#[tokio::test]
async fn an_ai_service_asks_the_questions_and_keeps_the_document() {
    let (fake, addr) = FakeService::start(vec![
        (200, question("Who are the parties?")),
        (200, question("What is the purpose?")),
        (
            200,
            json!({ "status": "completed", "documentId": "doc-42" }),
        ),
    ])
    .await;
    let (server_key, entry) = parlor::auth::keys::generate_with(parlor::auth::keys::KEY_PREFIX);
    let s = with_service(addr, move |c| c.domains[0].server_keys = vec![entry]).await;
    let mut c = open(&s, "ann", NDA).await;
    let q1 = c.recv().await;
    assert_eq!(q1["question"]["text"], "Who are the parties?");
    let session = q1["sessionId"].as_str().unwrap().to_owned();
    let q2 = answer(&mut c, "Acme and Globex").await;
    assert_eq!(q2["question"]["text"], "What is the purpose?");
    let done = answer(&mut c, "A partnership").await;
    assert_eq!(done["type"], "session_complete");
    assert_eq!(done["documentId"], "doc-42");

    // The contract: the path, the key, the session id (and the history Parlor adds).
    let received = fake.received();
    assert_eq!(received.len(), 3);
    let (headers, body) = (&received[2].headers, &received[2].body);
    assert_eq!(headers["authorization"], "Bearer service-key-123");
    assert_eq!(body["sessionId"], session.as_str());
    assert_eq!(body["templateId"], NDA);
    assert_eq!(body["userId"], "ann");
    let history = body["history"].as_array().unwrap();
    assert_eq!(history.len(), 4);
    assert_eq!(history[3]["content"], "A partnership");

    // The domain's back end reads the session (the seed's service reads it from the
    // database); a user of the domain who is not its owner cannot.
    let (status, read) = s
        .get_with(&format!("/api/sessions/{session}"), &server_key)
        .await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["history"].as_array().unwrap().len(), 4);
    assert_eq!(read["status"], "complete");
    let (status, all) = s.get_with("/api/sessions?userId=ann", &server_key).await;
    assert_eq!(status, 200);
    assert_eq!(all["sessions"][0]["id"], session.as_str());
    let (_, own) = s
        .get_with("/api/sessions?userId=ann", &s.token("bob"))
        .await;
    assert_eq!(
        own["sessions"],
        json!([]),
        "a user's userId filter is their own"
    );

    // The owner sees the reference; another user does not.
    let (status, doc) = s.get_with("/api/documents/doc-42", &s.token("ann")).await;
    assert_eq!(status, 200);
    assert_eq!(doc["external"], true);
    assert_eq!(
        s.get_with("/api/documents/doc-42", &s.token("bob")).await.0,
        404
    );
    s.stop().await;
}

#[tokio::test]
async fn ai_service_failures_are_retried_and_lose_no_answer() {
    let (fake, addr) = FakeService::start(vec![(200, question("Who are the parties?"))]).await;
    let s = with_service(addr, |c| {
        c.sessions.ai_service_timeout = Duration::from_millis(500);
    })
    .await;
    let mut c = open(&s, "ann", NDA).await;
    let session = c.recv().await["sessionId"].as_str().unwrap().to_owned();

    // 500: the user is told it retries, and the retry (1 s later) succeeds.
    fake.push(500, json!({ "error": "down" }), Duration::ZERO);
    fake.push(200, question("What is the purpose?"), Duration::ZERO);
    let told = answer(&mut c, "Acme and Globex").await;
    assert_eq!(told["type"], "error");
    assert_eq!(told["code"], "ai_service_unavailable");
    assert!(
        told["message"].as_str().unwrap().contains("retrying"),
        "{told}"
    );
    assert_eq!(c.recv().await["question"]["text"], "What is the purpose?");

    // A timeout, then the same.
    fake.push(200, question("late"), Duration::from_secs(2));
    fake.push(200, question("When does it start?"), Duration::ZERO);
    assert_eq!(
        answer(&mut c, "A partnership").await["code"],
        "ai_service_unavailable"
    );
    assert_eq!(c.recv().await["question"]["text"], "When does it start?");

    // 400: said clearly, not retried by itself, the connection kept; the next message
    // retries.
    fake.push(400, json!({ "error": "bad" }), Duration::ZERO);
    let rejected = answer(&mut c, "2027-01-31").await;
    assert_eq!(rejected["code"], "ai_service_rejected");
    fake.push(200, question("Which law?"), Duration::ZERO);
    assert_eq!(
        answer(&mut c, "From 31 January").await["question"]["text"],
        "Which law?"
    );

    // Every answer is stored, in order.
    let (_, got) = s
        .get_with(&format!("/api/sessions/{session}"), &s.token("ann"))
        .await;
    let said: Vec<&str> = got["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "user")
        .map(|t| t["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        said,
        [
            "Acme and Globex",
            "A partnership",
            "2027-01-31",
            "From 31 January"
        ]
    );
    assert!(
        s.metric("parlor_guided_ai_service_calls_total", "server_error")
            .await
            >= 1.0
    );
    assert!(
        s.metric("parlor_guided_ai_service_calls_total", "timeout")
            .await
            >= 1.0
    );
    s.stop().await;
}

#[tokio::test]
async fn an_unreachable_ai_service_is_retried_when_it_comes_back() {
    // A port nothing listens on yet.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let s = with_service(addr, |_| {}).await;
    let mut c = open(&s, "ann", NDA).await;
    let told = c.recv().await;
    assert_eq!(told["code"], "ai_service_unavailable", "{told}");
    // The service starts on that port; the automatic retry finds it.
    let fake = FakeService::default();
    fake.push(200, question("Who are the parties?"), Duration::ZERO);
    fake.serve_on(tokio::net::TcpListener::bind(addr).await.unwrap());
    let mut got = c.recv().await;
    while got["type"] == "error" {
        got = c.recv().await;
    }
    assert_eq!(got["question"]["text"], "Who are the parties?");
    s.stop().await;
}

// ------------------------------------------------------------------------------------------
// The built-in guide with a vendor
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn with_a_vendor_the_guide_asks_a_follow_up_and_words_the_next_question() {
    let vendor = FakeVendor::start(vec![
        fake_ai::Reply::stream(fake_ai::openai_stream(
            &["FOLLOW-UP: Which company exactly, with its registered name?"],
            (10, 5),
            true,
        )),
        fake_ai::Reply::stream(fake_ai::openai_stream(
            &["NEXT: Thanks! Who is the other party?"],
            (10, 5),
            true,
        )),
    ])
    .await;
    let base = vendor.url("/v1");
    let s = TestServer::start_with(move |c| {
        let mut p = ProviderConfig::new(ProviderKind::Openai, "gpt-4o-mini");
        p.base_url = Some(base);
        p.retries = 0;
        c.ai.providers.insert("fake".into(), p);
        c.domains[0].bot = Some(BotConfig {
            providers: vec!["fake".into()],
            ..BotConfig::default()
        });
    })
    .await;
    let mut c = open(&s, "ann", NDA).await;
    c.recv().await;
    let follow_up = answer(&mut c, "a company").await;
    assert_eq!(follow_up["question"]["id"], "party_a");
    assert_eq!(
        follow_up["question"]["text"],
        "Which company exactly, with its registered name?"
    );
    let next = answer(&mut c, "Acme Ltd").await;
    assert_eq!(next["question"]["id"], "party_b");
    assert_eq!(next["question"]["text"], "Thanks! Who is the other party?");
    // The vendor was told the question and the answer.
    let asked = vendor.received();
    assert_eq!(asked.len(), 2);
    let sent = asked[1].body.to_string();
    assert!(
        sent.contains("Acme Ltd") && sent.contains("full legal name"),
        "{sent}"
    );
    s.stop().await;
}

// ------------------------------------------------------------------------------------------
// Templates over HTTP and the admin API
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn templates_are_listed_for_users_and_managed_by_the_admin_api() {
    let (admin, entry) = parlor::auth::keys::generate_with(parlor::auth::keys::ADMIN_KEY_PREFIX);
    let s = TestServer::start_with(move |c| c.auth.admin_keys = vec![entry]).await;
    let admin_key = || admin.clone();
    let ann = s.token("ann");
    let (status, list) = s.get_with("/api/templates", &ann).await;
    assert_eq!(status, 200);
    assert_eq!(list["templates"][0]["id"], NDA);
    assert_eq!(list["templates"][0]["questionCount"], 7);

    let spec = json!({
        "id": "offer-letter",
        "name": "Offer letter",
        "questions": [
            { "id": "name", "text": "Candidate's name?" },
            { "id": "salary", "text": "Yearly salary?", "kind": "number" }
        ],
        "document": "Dear {{name}}, we offer {{salary}} a year.",
        "aiServiceApiKey": "never-shown"
    });
    let path = "/api/admin/domains/demo/templates";
    let (status, created) = s.post_with(path, &admin_key(), &spec).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["hasAiServiceApiKey"], true);
    assert!(created.get("aiServiceApiKey").is_none());
    let (status, _) = s.post_with(path, &admin_key(), &spec).await;
    assert_eq!(status, 200);
    let (_, listed) = s.get_with("/api/templates", &ann).await;
    let ids: Vec<&str> = listed["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [NDA, "offer-letter"]);

    // It can be used at once, and a whole session done with it.
    let mut c = open(&s, "ann", "offer-letter").await;
    assert_eq!(c.recv().await["question"]["id"], "name");
    answer(&mut c, "Ann").await;
    assert_eq!(answer(&mut c, "lots").await["question"]["id"], "salary");
    assert_eq!(answer(&mut c, "50000").await["type"], "session_complete");

    // Bad templates are refused whole, with the reason.
    for (bad, why) in [
        (
            json!({ "id": "x", "name": "X", "questions": [], "document": "" }),
            "questions",
        ),
        (
            json!({ "id": "x", "name": "X", "questions": [{ "id": "a", "text": "A?" }], "document": "{{b}}" }),
            "names no question",
        ),
        (json!({ "id": "x" }), "not a template"),
    ] {
        let (status, body) = s.post_with(path, &admin_key(), &bad).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{body}"
        );
    }
    // Not the users', and not over a file's template.
    assert_eq!(s.post_with(path, &ann, &spec).await.0, 401);
    let mut nda = spec.clone();
    nda["id"] = json!(NDA);
    assert_eq!(s.post_with(path, &admin_key(), &nda).await.0, 409);

    // A run-time domain names its AI service (its key never shown) but no template files.
    let (status, body) = s
        .call(
            reqwest::Method::PUT,
            "/api/admin/domains/legal",
            &admin_key(),
            Some(
                &json!({ "name": "Legal", "aiServiceUrl": "https://ai.legal.example",
                          "aiServiceApiKey": "secret-key" }),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["hasAiServiceApiKey"], true);
    assert!(!body.to_string().contains("secret-key"), "{body}");
    for settings in [
        json!({ "name": "Legal", "templates": ["templates/*.json"] }),
        json!({ "name": "Legal", "aiServiceUrl": "ftp://ai.legal.example" }),
    ] {
        let (status, body) = s
            .call(
                reqwest::Method::PUT,
                "/api/admin/domains/legal",
                &admin_key(),
                Some(&settings),
            )
            .await;
        assert_eq!(status, 400, "{body}");
    }
    let (status, _) = s
        .post_with("/api/admin/domains/legal/templates", &admin_key(), &spec)
        .await;
    assert_eq!(status, 201);
    let (status, _) = s
        .post_with("/api/admin/domains/nowhere/templates", &admin_key(), &spec)
        .await;
    assert_eq!(status, 404);

    // What GET shows can be sent back as it is; the key stays.
    let (_, shown) = s
        .get_with(&format!("{path}/offer-letter"), &admin_key())
        .await;
    assert_eq!(shown["source"], "api");
    let (status, back) = s
        .call(
            reqwest::Method::PUT,
            &format!("{path}/offer-letter"),
            &admin_key(),
            Some(&shown),
        )
        .await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["hasAiServiceApiKey"], true);

    // bob has a session under way when the template is removed: he can still finish it.
    let mut bob = open(&s, "bob", "offer-letter").await;
    bob.recv().await;
    answer(&mut bob, "Bob").await;
    drop(bob);
    let (status, _) = s
        .delete_with(&format!("{path}/offer-letter"), &admin_key())
        .await;
    assert_eq!(status, 204);
    assert_eq!(refused(&chat_url(&s, &ann, "offer-letter")).await.0, 404);
    let mut bob = open(&s, "bob", "offer-letter").await;
    assert_eq!(bob.recv().await["type"], "session_resumed");
    assert_eq!(bob.recv().await["question"]["id"], "salary");
    assert_eq!(answer(&mut bob, "60000").await["type"], "session_complete");
    s.stop().await;
}

#[tokio::test]
async fn stale_sessions_are_deleted_and_others_kept() {
    let s = TestServer::start_with(|c| {
        c.sessions.stale_after = Duration::from_secs(1);
        c.sessions.cleanup_every = Duration::from_millis(200);
    })
    .await;
    let ann = s.token("ann");
    // A finished session: kept with its document.
    let document = finish_nda(&s, "ann").await;
    // An abandoned one.
    let mut left = open(&s, "bob", NDA).await;
    let stale = left.recv().await["sessionId"].as_str().unwrap().to_owned();
    drop(left);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bob = s.token("bob");
    let mut gone = false;
    for _ in 0..50 {
        if s.get_with(&format!("/api/sessions/{stale}"), &bob).await.0 == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the stale session was not deleted");
    assert_eq!(
        s.get_with(&format!("/api/documents/{document}"), &ann)
            .await
            .0,
        200
    );
    let (_, list) = s.get_with("/api/sessions?status=complete", &ann).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    assert!(s.metric("parlor_guided_sessions_total", "expired").await >= 1.0);
    // The domain's admin reads any of its users' documents.
    let admin = s.token_in("demo", "boss", "admin");
    assert_eq!(
        s.get_with(&format!("/api/documents/{document}"), &admin)
            .await
            .0,
        200
    );
    // Abandoning by hand.
    let mut again = open(&s, "bob", NDA).await;
    let id = again.recv().await["sessionId"].as_str().unwrap().to_owned();
    drop(again);
    let (status, _) = s.delete_with(&format!("/api/sessions/{id}"), &ann).await;
    assert_eq!(status, 404, "another user cannot abandon it");
    let (status, _) = s.delete_with(&format!("/api/sessions/{id}"), &bob).await;
    assert_eq!(status, 204);
    s.stop().await;
}

#[tokio::test]
async fn templates_come_from_the_files_the_config_names_and_a_bad_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, spec: &Value| {
        std::fs::write(dir.path().join(name), spec.to_string()).unwrap();
    };
    let spec = |id: &str| {
        json!({ "id": id, "name": id.to_uppercase(), "questions": [{ "id": "q", "text": "Q?" }],
                "document": "A: {{q}}" })
    };
    write("a.json", &spec("alpha"));
    write("b.json", &spec("beta"));
    std::fs::write(dir.path().join("notes.txt"), "not a template").unwrap();
    let pattern = dir.path().join("*.json").display().to_string();
    let s = TestServer::start_with(|c| c.domains[0].templates = vec![pattern.clone()]).await;
    let (_, list) = s.get_with("/api/templates", &s.token("ann")).await;
    let ids: Vec<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    // The demo's built-in template gives way to the files the domain names.
    assert_eq!(ids, ["alpha", "beta"]);
    let mut c = open(&s, "ann", "beta").await;
    assert_eq!(c.recv().await["question"]["text"], "Q?");
    s.stop().await;

    // Each of these stops the start with the file and the reason.
    write(
        "c.json",
        &json!({ "id": "gamma", "name": "G", "questions": [], "document": "" }),
    );
    let duplicate = dir.path().join("dup");
    std::fs::create_dir(&duplicate).unwrap();
    std::fs::write(duplicate.join("one.json"), spec("same").to_string()).unwrap();
    std::fs::write(duplicate.join("two.json"), spec("same").to_string()).unwrap();
    for (templates, why) in [
        (pattern.clone(), "c.json"),
        (
            dir.path().join("missing.json").display().to_string(),
            "cannot read",
        ),
        (
            dir.path().join("*.yaml").display().to_string(),
            "matches no file",
        ),
        (
            duplicate.join("*.json").display().to_string(),
            "already defines",
        ),
    ] {
        let mut config = Config {
            database: format!("sqlite://{}", dir.path().join("refused.db").display()),
            ..Config::default()
        };
        config.domains[0].templates = vec![templates];
        config.validate().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let run = parlor::run(config, listener, tokio_util::sync::CancellationToken::new());
        let error = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the start fails at once")
            .expect_err("the start is refused");
        assert!(error.to_string().contains(why), "{error}");
    }
}

#[tokio::test]
async fn complete_sessions_and_their_documents_go_after_keep_completed() {
    let s = TestServer::start_with(|c| {
        c.sessions.keep_completed = Duration::from_secs(1);
        c.sessions.cleanup_every = Duration::from_millis(200);
    })
    .await;
    let ann = s.token("ann");
    let document = finish_nda(&s, "ann").await;
    // An incomplete session is kept (stale_after is a day).
    let mut open_one = open(&s, "bob", NDA).await;
    let kept = open_one.recv().await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(open_one);
    let mut gone = false;
    for _ in 0..60 {
        if s.get_with(&format!("/api/documents/{document}"), &ann)
            .await
            .0
            == 404
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the complete session's document was kept past keep_completed"
    );
    let (_, list) = s.get_with("/api/sessions", &ann).await;
    assert_eq!(list["sessions"], json!([]));
    assert_eq!(
        s.get_with(&format!("/api/sessions/{kept}"), &s.token("bob"))
            .await
            .0,
        200
    );
    s.stop().await;
}

#[tokio::test]
async fn a_session_holds_at_most_a_thousand_turns() {
    let s = TestServer::start().await;
    let ann = s.token("ann");
    let mut c = open(&s, "ann", NDA).await;
    let id = c.recv().await["sessionId"].as_str().unwrap().to_owned();
    for a in &ANSWERS[..3] {
        answer(&mut c, a).await;
    }
    // Every wrong date is stored with the question asked again: two turns each.
    let mut turns = 7;
    while turns < 1000 {
        let again = answer(&mut c, "soon").await;
        assert_eq!(again["question"]["id"], "start", "{again}");
        turns += 2;
    }
    let full = answer(&mut c, "2027-01-31").await;
    assert_eq!(full["type"], "error");
    assert_eq!(full["code"], "session_too_long");
    // Nothing more was stored, and the session can be abandoned to start again.
    let (_, got) = s.get_with(&format!("/api/sessions/{id}"), &ann).await;
    assert_eq!(got["turnCount"], 1001);
    let (status, _) = s.delete_with(&format!("/api/sessions/{id}"), &ann).await;
    assert_eq!(status, 204);
    s.stop().await;
}
