//! TLS to Redis (`rediss://`) and to PostgreSQL (`sslmode=`), against the machine's real
//! servers behind TLS-terminating relays this test runs, with a CA it makes itself. A relay
//! speaks only TLS, so a client that fell back to plain text would fail, and it counts the
//! handshakes it completed. Settings that cannot be honoured stop the start with a reason.
//!
//! Needs `PARLOR_TEST_REDIS_URL` and `PARLOR_TEST_DATABASE_URL` (each test says it is
//! skipped without its server).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::TestServer;
use common::cluster::Database;
use parlor::config::Config;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// A CA and a server certificate for `127.0.0.1` and `localhost` it signed, the CA's PEM
/// in a file.
struct Pki {
    acceptor: TlsAcceptor,
    ca_file: tempfile::NamedTempFile,
}

impl Pki {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Parlor test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let ca_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_file.path(), ca.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            ca_file,
        }
    }

    fn ca(&self) -> String {
        self.ca_file.path().display().to_string()
    }
}

/// What the relay expects before TLS starts.
#[derive(Clone, Copy)]
enum Speaks {
    /// TLS from the first byte (Redis).
    Tls,
    /// PostgreSQL's `SSLRequest`, answered `S`, then TLS; anything else is hung up on.
    PostgresSsl,
}

/// A TLS-terminating relay on 127.0.0.1 to `upstream` (host:port).
struct Relay {
    port: u16,
    handshakes: Arc<AtomicUsize>,
}

impl Relay {
    async fn start(pki: &Pki, upstream: String, speaks: Speaks) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let acceptor = pki.acceptor.clone();
        let counted = Arc::clone(&handshakes);
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, upstream, counted) =
                    (acceptor.clone(), upstream.clone(), Arc::clone(&counted));
                tokio::spawn(async move {
                    if let Speaks::PostgresSsl = speaks {
                        let mut request = [0u8; 8];
                        if tcp.read_exact(&mut request).await.is_err()
                            || request != [0, 0, 0, 8, 4, 210, 22, 47]
                        {
                            return;
                        }
                        if tcp.write_all(b"S").await.is_err() {
                            return;
                        }
                    }
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self { port, handshakes }
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

/// `host:port` of a `scheme://[auth@]host:port[/…]` URL.
fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").unwrap().1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap();
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

/// Starts Parlor with `configure`, or returns the start-up error.
async fn build(configure: impl FnOnce(&mut Config)) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        database: format!("sqlite://{}", dir.path().join("x.db").display()),
        ..Config::default()
    };
    configure(&mut config);
    config.validate().map_err(|e| e.to_string())?;
    parlor::App::build(config, tokio_util::sync::CancellationToken::new())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn rediss_works_and_a_broker_that_cannot_be_trusted_is_refused() {
    let Some(redis) = common::redis::test_url() else {
        return;
    };
    let pki = Pki::new();
    let relay = Relay::start(&pki, host_port(&redis, 6379), Speaks::Tls).await;
    let tls_url = format!(
        "rediss://127.0.0.1:{}/?sslrootcert={}",
        relay.port,
        pki.ca()
    );
    let s = TestServer::start_with(|c| {
        c.broker = tls_url.clone();
        c.broker_prefix = common::redis::prefix();
    })
    .await;
    let health: serde_json::Value = reqwest::get(s.http("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["broker"], json!({ "kind": "redis", "status": "ok" }));
    assert!(relay.handshakes() >= 2, "the publisher and the subscriber");
    // A message goes out through Redis and back.
    let mut a = s.connect_as("a").await;
    let mut b = s.connect_as("b").await;
    a.join("tls", None).await;
    b.join("tls", None).await;
    a.say("tls", "over TLS", None).await;
    assert_eq!(b.recv_type("message-received").await["message"], "over TLS");
    s.stop().await;

    let port = relay.port;
    let cases: [(String, &str); 5] = [
        // The system's roots do not know the test's CA.
        (
            format!("rediss://127.0.0.1:{port}"),
            "certificate is not trusted",
        ),
        // Plain text to a TLS server.
        (format!("redis://127.0.0.1:{port}"), "cannot connect"),
        (
            format!("redis://127.0.0.1:{port}/?sslrootcert={}", pki.ca()),
            "use a rediss:// URL",
        ),
        (
            format!("rediss://127.0.0.1:{port}/?sslrootcert=/nonexistent/ca.pem"),
            "cannot read the CA file",
        ),
        (
            format!("rediss://127.0.0.1:{port}/?tls_insecure=true"),
            "not supported",
        ),
    ];
    for (url, why) in cases {
        let err = build(|c| c.broker = url.clone())
            .await
            .expect_err("must not start");
        assert!(err.contains(why), "{url}: {err}");
    }
}

#[tokio::test]
async fn postgres_over_tls_works_and_what_cannot_be_honoured_is_refused() {
    let Ok(admin) = std::env::var("PARLOR_TEST_DATABASE_URL") else {
        eprintln!("skipped: PARLOR_TEST_DATABASE_URL is unset");
        return;
    };
    let pki = Pki::new();
    let relay = Relay::start(&pki, host_port(&admin, 5432), Speaks::PostgresSsl).await;
    let db = Database::create(&admin).await;
    let via = db.url_via(relay.port);
    for query in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-full&sslrootcert={}", pki.ca()),
    ] {
        let before = relay.handshakes();
        let url = format!("{via}?{query}");
        let s = TestServer::start_with(|c| c.database = url.clone()).await;
        let mut a = s.connect_as("a").await;
        a.join("tls", None).await;
        a.say("tls", &format!("stored over TLS ({query})"), None)
            .await;
        s.stop().await;
        assert!(relay.handshakes() > before, "{query}: no TLS handshake");
    }
    assert_eq!(db.count("tls").await, 2);

    for (query, why) in [
        // The relay takes nothing but TLS.
        ("sslmode=disable".to_owned(), "PostgreSQL"),
        // Verification against the system's roots, which do not know the test's CA.
        ("sslmode=verify-full".to_owned(), "PostgreSQL"),
        ("sslnegotiation=direct".to_owned(), "not supported"),
        ("channel_binding=require".to_owned(), "not supported"),
    ] {
        let url = format!("{via}?{query}");
        let err = build(|c| c.database = url.clone())
            .await
            .expect_err("must not start");
        assert!(err.contains(why), "{query}: {err}");
    }
    db.drop_it().await;
}
