//! The Autobahn|Testsuite fuzzing client (cases 1–10: framing, pings, reserved bits,
//! opcodes, fragmentation, UTF-8, close handling, limits; the compression cases 12 and 13
//! are out, Parlor does not negotiate compression) against the WebSocket layer's echo mode
//! ([`parlor::transport::ws::socket::echo`]), served over the same hyper upgrade path as
//! `/ws`. Every case must end OK, NON-STRICT or INFORMATIONAL.
//!
//! The suite runs on Python 2.7 only; `tests/autobahn/run.sh` installs it (pinned, into
//! `target/autobahn`) and checks the report. Set `PARLOR_TEST_AUTOBAHN=1` to run it (CI
//! does); without it the test says it is skipped.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parlor::transport::ws::socket::{WsSocket, echo};

/// Largest message the echo server takes: the suite's biggest (case 9.x: 16 MiB).
const MAX_MESSAGE: usize = 16 * 1024 * 1024 + 1024;

/// Upgrades any request with a WebSocket key and echoes on the socket.
async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, hyper::Error> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        let mut res = Response::new(Empty::new());
        *res.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(res);
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            echo(WsSocket::new(upgraded, MAX_MESSAGE)).await;
        }
    });
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut res = Response::new(Empty::new());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept.parse().unwrap());
    Ok(res)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_fuzzing_client_cases_1_to_10() {
    if std::env::var_os("PARLOR_TEST_AUTOBAHN").is_none() {
        eprintln!("skipped: set PARLOR_TEST_AUTOBAHN=1 to run the Autobahn suite (Python 2.7)");
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(upgrade);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/autobahn/run.sh");
    let url = format!("ws://{addr}");
    let output =
        tokio::task::spawn_blocking(move || Command::new("bash").arg(script).arg(url).output())
            .await
            .unwrap()
            .expect("run tests/autobahn/run.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "the Autobahn suite failed ({}); the report is in target/autobahn/report/index.html",
        output.status
    );
}
