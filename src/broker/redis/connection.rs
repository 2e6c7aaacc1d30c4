//! The Redis connections of a node: a command client and a subscriber, over TLS for
//! `rediss://` (with the CA named by `?sslrootcert=`), reconnecting by themselves with
//! exponential back-off; and a start-up error that says why Redis cannot be used.
//!
//! [`open_clients`] is shared by the broker and the cluster-wide state
//! ([`crate::broker::shared`]); [`Link`] is the broker's pair, with its health.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, Config as RedisConfig, ReconnectPolicy};
use tokio_util::sync::CancellationToken;

use crate::node::Supervisor;

/// The broker's two connections to Redis and whether they work.
#[derive(Debug)]
pub(super) struct Link {
    /// Publishes, and reads and writes presence.
    pub(super) publisher: fred::clients::Client,
    /// Receives the bus.
    pub(super) subscriber: SubscriberClient,
    /// Whether the last PING (every second) was answered.
    reachable: AtomicBool,
}

impl Link {
    /// The pair, with a task that pings Redis every second until `stop`: a closed socket is
    /// noticed at once, a silent one only by asking.
    pub(super) fn start(
        publisher: fred::clients::Client,
        subscriber: SubscriberClient,
        supervisor: &Supervisor,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let link = Arc::new(Self {
            publisher,
            subscriber,
            reachable: AtomicBool::new(true),
        });
        let watched = Arc::downgrade(&link);
        supervisor.spawn("redis-ping", async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while stop.run_until_cancelled(tick.tick()).await.is_some() {
                let Some(link) = watched.upgrade() else {
                    return;
                };
                let ping = link.publisher.ping::<fred::types::Value>(None);
                let ok = matches!(
                    tokio::time::timeout(Duration::from_millis(900), ping).await,
                    Ok(Ok(_))
                );
                link.reachable.store(ok, Ordering::Relaxed);
            }
        });
        link
    }

    /// Whether Redis answers and both connections are up.
    pub(super) fn healthy(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
            && self.publisher.is_connected()
            && self.subscriber.is_connected()
    }
}

/// The TLS client of a `rediss://` broker: the server's certificate must chain to `ca` (a
/// PEM file of one or more certificates) when given, else to the system's roots
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
fn tls_connector(ca: Option<&str>) -> Result<fred::types::config::TlsConnector, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect)
                .map_err(|e| {
                    format!("broker: cannot read the CA file {path:?} (sslrootcert): {e}")
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "broker: the CA file {path:?} (sslrootcert) holds no certificate"
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("broker: a certificate in {path:?} is unusable: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // One odd certificate in the system store must not stop the start.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "broker: rediss:// needs CA certificates: none found in the system store; \
                     name a CA file with ?sslrootcert=PATH"
                        .to_owned(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("broker: TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config.into())
}

/// A command client and a subscriber client of the Redis at `url`, connected (within 10 s)
/// and reconnecting by themselves with exponential back-off from then on.
/// `delivery_buffer` sizes the subscriber's queue of received publications.
pub(crate) async fn open_clients(
    url: &str,
    delivery_buffer: Option<usize>,
) -> Result<(fred::clients::Client, SubscriberClient), String> {
    // `sslrootcert` is Parlor's (the CA of a `rediss://` server), not fred's.
    let ca = crate::config::url_parameter(url, "sslrootcert").map(str::to_owned);
    let bare = url.split_once('?').map_or(url, |(u, _)| u);
    let mut config = RedisConfig::from_url(bare).map_err(|e| format!("invalid broker URL: {e}"))?;
    if bare.starts_with("rediss://") {
        config.tls = Some(tls_connector(ca.as_deref())?.into());
    }
    let server = match &config.server {
        fred::types::config::ServerConfig::Centralized { server } => {
            Some((server.host.to_string(), server.port))
        }
        _ => None,
    };
    let mut builder = fred::types::Builder::from_config(config);
    builder
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = Duration::from_secs(5);
        })
        .with_performance_config(|p| {
            if let Some(n) = delivery_buffer {
                p.broadcast_channel_capacity = n;
            }
            p.default_command_timeout = Duration::from_secs(5);
        });
    let client = builder
        .build()
        .map_err(|e| format!("cannot build the Redis client: {e}"))?;
    let subscriber = builder
        .build_subscriber_client()
        .map_err(|e| format!("cannot build the Redis subscriber: {e}"))?;
    let connect = async {
        client.init().await?;
        subscriber.init().await?;
        Ok::<_, fred::error::Error>(())
    };
    let redacted = crate::config::redact_url(url);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(())) => Ok((client, subscriber)),
        Ok(Err(e)) => Err(format!(
            "cannot connect to Redis at {redacted}: {}",
            unreachable_reason(server.as_ref(), &e).await
        )),
        Err(_) => Err(format!("Redis at {redacted} did not answer within 10 s")),
    }
}

/// Why Redis could not be used, in words. fred keeps an I/O error only as its `Debug` text
/// (`Os { code: 111, … }`), so after a failed connection a plain one is tried to learn the
/// system's reason ("connection refused"); any other failure (a refused password) is fred's
/// own message.
async fn unreachable_reason(server: Option<&(String, u16)>, e: &fred::error::Error) -> String {
    if *e.kind() == fred::error::ErrorKind::IO
        && let Some((host, port)) = server
    {
        let probe = tokio::net::TcpStream::connect((host.as_str(), *port));
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Err(io)) => return crate::io_reason(&io),
            Err(_) => return "the connection timed out".to_owned(),
            Ok(Ok(_)) => {}
        }
    }
    let details = e.details();
    if details.contains("InvalidCertificate") {
        return format!(
            "the server's TLS certificate is not trusted ({details}); name the CA that signed \
             it with ?sslrootcert=PATH"
        );
    }
    details.to_owned()
}

/// A random node id.
pub(super) fn rand_node_id() -> u64 {
    let id = uuid::Uuid::new_v4();
    let (high, low) = id.as_u64_pair();
    high ^ low
}
