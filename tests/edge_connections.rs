//! The attacks of a slow or hoarding client, each tried against a real server: half-open,
//! slow-header, slow-body, partial-upgrade and silent connections are closed within their
//! timeouts; one address cannot hold more than its share of TCP connections or WebSockets,
//! while another address still connects and a normal client's messages keep flowing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Client, TestServer, WAIT};
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.x).
async fn tcp_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.expect("connect")
}

/// Reads until the server closes the connection; what it sent, and how long it took.
async fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("the server closes the connection in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

/// Whether the server still has `stream` open after `wait` (no EOF or reset).
async fn still_open(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1];
    tokio::time::timeout(wait, stream.read(&mut buf))
        .await
        .is_err()
}

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: \
                       Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       Sec-WebSocket-Version: 13\r\n\r\n";

#[tokio::test]
async fn slow_and_half_open_http_connections_are_closed_in_time() {
    let server = TestServer::start_with(|c| {
        c.limits.header_timeout_ms = Duration::from_millis(600);
        c.limits.body_timeout_ms = Duration::from_millis(600);
    })
    .await;

    // Half-open: connects and sends nothing.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // Slow headers: a byte every 200 ms never finishes the request line in time.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    // Partial upgrade: the upgrade request without its final blank line.
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial
        .write_all(&UPGRADE.as_bytes()[..UPGRADE.len() - 2])
        .await
        .unwrap();
    let drip = tokio::spawn(async move {
        for b in b"GET /health HTTP/1.1\r\nHost: x\r\n" {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        slow
    });
    for (name, stream) in [
        ("half-open", &mut silent),
        ("partial upgrade", &mut partial),
    ] {
        let (_, took) = read_until_closed(stream).await;
        assert!(
            took < Duration::from_secs(3),
            "{name}: closed after {took:?}"
        );
    }
    let mut slow = drip.await.unwrap();
    let (answer, _) = read_until_closed(&mut slow).await;
    assert!(
        !answer.contains("200 OK"),
        "the slow request was never served: {answer}"
    );

    // Keep-alive idle: a served connection that sends nothing more is closed too.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, took) = read_until_closed(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(took < Duration::from_secs(3), "idle closed after {took:?}");

    // Slow body: the headers promise 64 bytes, 10 come.
    let mut body = TcpStream::connect(server.addr).await.unwrap();
    body.write_all(
        b"POST /api/visitor-token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 64\r\n\r\n{\"domain\":",
    )
    .await
    .unwrap();
    let (answer, took) = read_until_closed(&mut body).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(
        took < Duration::from_secs(3),
        "slow body cut after {took:?}"
    );

    // A normal request is untouched by all this.
    let ok = reqwest::get(server.http("/health")).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(
        server
            .metric("parlor_connections_refused_total", "header_timeout")
            .await
            >= 2.0
    );
    assert_eq!(
        server
            .metric("parlor_connections_refused_total", "body_timeout")
            .await,
        1.0
    );
    server.stop().await;
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_tcp_connections() {
    let server = TestServer::start_with(|c| {
        c.limits.ip_max_connections = 5;
        c.limits.header_timeout_ms = Duration::from_secs(30);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tcp_from("127.0.0.3", server.addr).await);
    }
    // Make sure the server has accepted all five before the sixth.
    for stream in &mut held {
        assert!(still_open(stream, Duration::from_millis(50)).await);
    }
    let mut refused = tcp_from("127.0.0.3", server.addr).await;
    let (answer, _) = read_until_closed(&mut refused).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("retry-after: 5"), "{answer}");
    assert!(answer.contains("\"too_many_connections\""), "{answer}");

    // Another address still gets in, and its chat works while the first is at its cap.
    let stream = tcp_from("127.0.0.4", server.addr).await;
    let (ws, _) = tokio_tungstenite::client_async(server.ws("/ws"), MaybeTlsStream::Plain(stream))
        .await
        .expect("another address connects");
    let mut client = Client { ws, next_id: 0 };
    client
        .send(json!({ "type": "join-room", "roomId": "lobby" }))
        .await;
    client.recv_type("room-joined").await;
    client.say("lobby", "still flowing", None).await;

    // One of the five closes: its place is free again.
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut stream = tcp_from("127.0.0.3", server.addr).await;
        if still_open(&mut stream, Duration::from_millis(100)).await {
            again = Some(stream);
            break;
        }
    }
    assert!(again.is_some(), "a freed place is given again");
    assert!(
        server
            .metric("parlor_connections_refused_total", "address_connections")
            .await
            >= 1.0
    );
    server.stop().await;
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_websockets() {
    let server = TestServer::start_with(|c| {
        c.limits.ip_max_websockets = 3;
    })
    .await;
    let url = server.ws("/ws");
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Client::connect(&url).await);
    }
    let refused = tokio_tungstenite::connect_async(&url).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(res)) = refused else {
        panic!("the fourth WebSocket is refused: {refused:?}");
    };
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "5");
    let body = String::from_utf8_lossy(res.body().as_deref().unwrap_or_default()).into_owned();
    assert!(body.contains("too_many_connections"), "{body}");

    // Another address is not affected.
    let stream = tcp_from("127.0.0.5", server.addr).await;
    tokio_tungstenite::client_async(url.as_str(), stream)
        .await
        .expect("another address connects");

    // A closed WebSocket gives its place back.
    let mut first = open.remove(0);
    first.ws.close(None).await.unwrap();
    first.closed().await;
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = Client::try_connect(&url).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "a freed place is given again");
    assert_eq!(
        server
            .metric("parlor_connections_refused_total", "address_websockets")
            .await,
        1.0
    );
    server.stop().await;
}

/// A WebSocket through the proxy at 127.0.0.1, for the client `forwarded`.
async fn via_proxy(
    server: &TestServer,
    forwarded: &str,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        server.ws("/ws"),
    )
    .unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", forwarded.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    Ok(ws)
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_capped() {
    let server = TestServer::start_with(|c| {
        c.trusted_proxies = vec!["127.0.0.1".into()];
        c.limits.ip_max_connections = 2;
        c.limits.ip_max_websockets = 2;
    })
    .await;
    // The proxy itself holds more TCP connections than an address may.
    let mut open = Vec::new();
    for client in [
        "198.51.100.1",
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.2",
    ] {
        open.push(via_proxy(&server, client).await.expect("proxied WebSocket"));
    }
    // A third WebSocket of the first client is refused.
    let refused = via_proxy(&server, "198.51.100.1").await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(res)) = refused else {
        panic!("the client's third WebSocket is refused: {refused:?}");
    };
    assert_eq!(res.status(), 429);
    server.stop().await;
}

#[tokio::test]
async fn a_websocket_that_answers_no_ping_is_closed_with_4011() {
    let server = TestServer::start_with(|c| {
        c.limits.ws_ping_interval_ms = Duration::from_millis(300);
        c.limits.ws_pong_timeout_ms = Duration::from_millis(300);
    })
    .await;
    // A client that reads (so tungstenite answers pings) stays.
    let mut live = Client::connect(&server.ws("/ws")).await;
    // A client that never reads, so never answers.
    let (mut silent, _) = tokio_tungstenite::connect_async(server.ws("/ws"))
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(2);
        while let Ok(Some(frame)) = tokio::time::timeout_at(until.into(), live.ws.next()).await {
            assert!(
                !matches!(frame, Ok(Message::Close(_)) | Err(_)),
                "the live client is kept: {frame:?}"
            );
        }
        live
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut pinged = false;
    let close = loop {
        match tokio::time::timeout(WAIT, silent.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => pinged = true,
            Some(Ok(Message::Close(frame))) => break frame,
            other => panic!("expected a ping then a close, got {other:?}"),
        }
    };
    assert!(pinged, "the server pinged first");
    let close = close.expect("a close frame");
    assert_eq!(close.code, CloseCode::Library(4011));
    let mut live = reader.await.unwrap();
    live.join("lobby-ping", None).await;
    live.say("lobby-ping", "still here", None).await;
    assert_eq!(
        server
            .metric("parlor_disconnects_total", "ping_timeout")
            .await,
        1.0
    );
    server.stop().await;
}

#[tokio::test]
async fn a_websocket_that_sends_nothing_is_closed_with_4012_when_configured() {
    let server = TestServer::start_with(|c| {
        c.limits.ws_ping_interval_ms = Duration::from_millis(200);
        c.limits.ws_idle_timeout_ms = Duration::from_millis(800);
    })
    .await;
    let mut quiet = Client::connect(&server.ws("/ws")).await;
    let mut talker = Client::connect(&server.ws("/ws")).await;
    talker.join("idle-room", None).await;
    let started = Instant::now();
    // The talker sends a frame every 300 ms; the quiet one only answers pings.
    let talk = tokio::spawn(async move {
        for i in 0..6 {
            talker.say("idle-room", &format!("tick {i}"), None).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        talker
    });
    let close = quiet.closed().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Library(4012));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    let mut talker = talk.await.unwrap();
    talker.say("idle-room", "kept", None).await;
    server.stop().await;
}
