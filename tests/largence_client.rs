//! The Largence web app's guided-session client against Parlor (`/chat`, seed 003):
//! `tests/browser/largence_client.mjs`, a replica of that client written from the seed's
//! message types (Node and the `ws` package), runs a whole session against a server whose
//! AI service is a fake speaking the seed's contract. It leaves halfway and comes back
//! (`session_resumed` with every answer), finishes (`session_complete`, close 1000) and
//! reads the document as its owner and as another user. This side checks what the AI
//! service was sent and the document the script read, once with a `documentId` the
//! service keeps and once with a `document` Parlor keeps.
//!
//! They run when `PARLOR_TEST_CHROMIUM` is set (CI sets it, after
//! `npm ci --prefix tests/browser`, which installs `ws`); otherwise the test says so and
//! passes.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::TestServer;
use common::fake_service::{FakeService, Received, question};
use serde_json::{Value, json};

/// The demo's template.
const NDA: &str = "mutual-nda";

/// The key the server sends the fake AI service.
const SERVICE_KEY: &str = "service-key-123";

/// The script's own waits are 10 s each and 60 s in all; past this it is killed.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

/// The questions the fake AI service asks, in order, before it completes the session.
const QUESTIONS: [&str; 4] = [
    "Who are the parties?",
    "What is the purpose?",
    "From which date does it apply?",
    "For how long, and under which law?",
];

/// The whole session's script: each question, then `end`.
fn script(end: Value) -> Vec<(u16, Value)> {
    QUESTIONS
        .iter()
        .map(|text| question(text))
        .chain([end])
        .map(|body| (200, body))
        .collect()
}

/// `tests/browser`, or `None` (the test is skipped) when `PARLOR_TEST_CHROMIUM` is unset.
/// Panics when it is set but `ws` is not installed.
fn suite() -> Option<PathBuf> {
    if std::env::var_os("PARLOR_TEST_CHROMIUM")
        .filter(|v| !v.is_empty())
        .is_none()
    {
        println!(
            "skipped: set PARLOR_TEST_CHROMIUM=/usr/bin/chromium (and run \
             `npm ci --prefix tests/browser`) to run the Largence client"
        );
        return None;
    }
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        suite.join("node_modules/ws").is_dir(),
        "PARLOR_TEST_CHROMIUM is set but the `ws` package is missing: \
         run `npm ci --prefix tests/browser` first"
    );
    Some(suite)
}

/// Runs the script against `s` as `ann` (the other user is `bob`) and returns what it read,
/// the `RESULT` line's JSON. Panics with the script's output when it fails.
async fn run_client(s: &TestServer, suite: &Path) -> Value {
    let child = Command::new("node")
        .arg(suite.join("largence_client.mjs"))
        .current_dir(suite)
        .env("LARGENCE_SERVER_URL", s.http(""))
        .env("LARGENCE_TOKEN", s.token("ann"))
        .env("LARGENCE_OTHER_TOKEN", s.token("bob"))
        .env("LARGENCE_TEMPLATE_ID", NDA)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start `node` (is Node.js installed?)");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    // The server runs on this runtime: wait for the script off it.
    let mut waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    let output = match tokio::time::timeout(SCRIPT_TIMEOUT, &mut waiting).await {
        Ok(done) => done.unwrap().unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let output = waiting.await.unwrap().unwrap();
            panic!(
                "the Largence client did not finish within {} s\n--- stdout\n{}--- stderr\n{}",
                SCRIPT_TIMEOUT.as_secs(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Largence client failed ({})\n--- stdout\n{stdout}--- stderr\n{stderr}",
        output.status
    );
    print!("{stdout}");
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line\n--- stdout\n{stdout}--- stderr\n{stderr}"));
    serde_json::from_str(result).expect("the RESULT line is JSON")
}

/// The contract as the fake service saw it: one call when the session started and one
/// after each answer, none on resuming (the pending question is stored), each to the
/// path, with the key, for the session the client was in, and the last with every answer
/// in order.
fn check_calls(fake: &FakeService, result: &Value) {
    let session = result["sessionId"].as_str().unwrap();
    let answers: Vec<&str> = result["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(answers.len(), QUESTIONS.len(), "{result}");
    assert_eq!(result["questions"], json!(QUESTIONS), "{result}");
    let received = fake.received();
    assert_eq!(received.len(), QUESTIONS.len() + 1, "{received:?}");
    for Received {
        path,
        headers,
        body,
    } in &received
    {
        assert_eq!(path, "/v1/chat/next-question");
        assert_eq!(headers["authorization"], format!("Bearer {SERVICE_KEY}"));
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        assert_eq!(body["sessionId"], session, "{body}");
        assert_eq!(body["templateId"], NDA);
        assert_eq!(body["userId"], "ann");
    }
    let last = &received.last().unwrap().body;
    let said: Vec<&str> = last["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "user")
        .map(|t| t["content"].as_str().unwrap())
        .collect();
    assert_eq!(said, answers);
}

async fn with_service(addr: SocketAddr) -> TestServer {
    TestServer::start_with(move |c| {
        c.domains[0].ai_service_url = Some(format!("http://{addr}"));
        c.domains[0].ai_service_api_key = Some(parlor::config::Secret::new(SERVICE_KEY));
    })
    .await
}

#[tokio::test]
async fn the_largence_client_resumes_and_finishes_with_a_document_the_service_keeps() {
    let Some(suite) = suite() else { return };
    let (fake, addr) = FakeService::start(script(
        json!({ "status": "completed", "documentId": "doc-42" }),
    ))
    .await;
    let s = with_service(addr).await;
    let result = run_client(&s, &suite).await;
    check_calls(&fake, &result);
    assert_eq!(result["documentId"], "doc-42");
    assert_eq!(result["document"]["external"], true, "{result}");
    s.stop().await;
}

#[tokio::test]
async fn the_largence_client_resumes_and_finishes_with_a_document_parlor_keeps() {
    let Some(suite) = suite() else { return };
    let content = "# NDA\n\nBetween Acme Ltd and Globex GmbH.";
    let (fake, addr) = FakeService::start(script(json!({
        "status": "complete",
        "document": { "title": "NDA", "content": content, "format": "markdown" }
    })))
    .await;
    let s = with_service(addr).await;
    let result = run_client(&s, &suite).await;
    check_calls(&fake, &result);
    let document = &result["document"];
    assert_eq!(document["external"], false, "{result}");
    assert_eq!(document["title"], "NDA");
    assert_eq!(document["format"], "markdown");
    assert_eq!(document["content"], content);
    s.stop().await;
}
