//! The HTTP edge: per-IP rate limits, CORS and the `Origin` rules of each domain.
//!
//! - **Rate limits** are kept per client IP address (the TCP peer, or behind a trusted
//!   proxy the address it forwards in `X-Forwarded-For`) in three `governor` keyed limiters: WebSocket connects, HTTP API requests
//!   and visitor tokens. A refusal is HTTP 429 `rate_limited` with `Retry-After`. `/`,
//!   `/health` and `/metrics` are never limited, so monitoring keeps working during a
//!   flood. Authenticated callers also have a budget per identity, across addresses
//!   (connects plus API requests). Idle entries are dropped every minute, so the limiters' memory follows the
//!   number of recently active addresses.
//! - **Open connections** are capped per address too ([`OpenPerAddress`]): TCP connections
//!   at accept (`limits.ip_max_connections`, not for trusted proxies) and WebSockets at the
//!   upgrade (`limits.ip_max_websockets`, by the forwarded address behind a proxy). An IPv6
//!   address is counted and limited by its /64 ([`ip_key`]).
//! - **Across nodes** (Redis broker): a request the node's own limiter allows is charged to
//!   the same budget in Redis ([`Shared::take`]), so a client spreading its requests over the
//!   nodes still gets one budget. When Redis does not answer in time the node's own limit
//!   stands.
//! - **Origins**: each domain lists the web origins whose pages may use it
//!   (`allowed_origins`, `"*"` for any). CORS answers for the union of all domains' lists;
//!   the WebSocket upgrade and `POST /api/visitor-token` check the caller's own domain.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::error::ApiError;
use crate::auth::Domains;
use crate::broker::shared::{Rate, Shared};
use crate::config::{Config, Limits};
use crate::transport::AppState;

/// Which per-IP budget a request draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// A WebSocket upgrade.
    Connect,
    /// An HTTP API request.
    Request,
    /// A visitor token.
    VisitorToken,
    /// A page reporting its visitor (`/visitors/add`, `/visitors/remove`).
    VisitorReport,
}

/// Per-IP limiters and each domain's origins.
#[derive(Debug)]
pub struct Edge {
    connects: DefaultKeyedRateLimiter<IpAddr>,
    requests: DefaultKeyedRateLimiter<IpAddr>,
    visitor_tokens: DefaultKeyedRateLimiter<IpAddr>,
    visitor_reports: DefaultKeyedRateLimiter<IpAddr>,
    /// Connects plus requests per authenticated identity, keyed `domain/user`.
    identities: DefaultKeyedRateLimiter<String>,
    /// The live domain table: each domain's origins.
    domains: Arc<Domains>,
    /// Proxies whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<ipnet::IpNet>,
    /// The same budgets across the cluster.
    shared: Shared,
    /// The rates of the budgets, for `shared`.
    rates: Rates,
    /// Open TCP connections per address (`limits.ip_max_connections`).
    pub tcp: Arc<OpenPerAddress>,
    /// Open WebSockets per address (`limits.ip_max_websockets`).
    pub websockets: Arc<OpenPerAddress>,
}

/// Each budget's rate.
#[derive(Debug, Clone, Copy)]
struct Rates {
    connect: Rate,
    request: Rate,
    visitor_token: Rate,
    visitor_report: Rate,
    identity: Rate,
}

fn quota_per_second(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(NonZeroU32::new(burst.max(1)).unwrap_or(rate))
}

impl Edge {
    /// Builds the limiters and origin rules from configuration.
    pub fn new(config: &Config, domains: Arc<Domains>, shared: Shared) -> Self {
        let l: &Limits = &config.limits;
        let per_minute = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        Self {
            connects: RateLimiter::keyed(quota_per_second(
                l.ip_connects_per_second,
                l.ip_connects_burst,
            )),
            requests: RateLimiter::keyed(quota_per_second(
                l.ip_requests_per_second,
                l.ip_requests_burst,
            )),
            visitor_tokens: RateLimiter::keyed(per_minute(l.ip_visitor_tokens_per_minute)),
            visitor_reports: RateLimiter::keyed(per_minute(l.ip_visitor_reports_per_minute)),
            identities: RateLimiter::keyed(quota_per_second(
                l.identity_requests_per_second,
                l.identity_requests_burst,
            )),
            domains,
            // `Config::validate` has parsed them already.
            trusted_proxies: config.trusted_proxy_ranges().unwrap_or_default(),
            shared,
            rates: Rates {
                connect: Rate::per_second(l.ip_connects_per_second, l.ip_connects_burst),
                request: Rate::per_second(l.ip_requests_per_second, l.ip_requests_burst),
                visitor_token: Rate::per_minute(l.ip_visitor_tokens_per_minute),
                visitor_report: Rate::per_minute(l.ip_visitor_reports_per_minute),
                identity: Rate::per_second(
                    l.identity_requests_per_second,
                    l.identity_requests_burst,
                ),
            },
            tcp: OpenPerAddress::new(l.ip_max_connections),
            websockets: OpenPerAddress::new(l.ip_max_websockets),
        }
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the TCP peer, or, when the peer is a trusted proxy, the
    /// right-most address in `X-Forwarded-For` that is not a trusted proxy (the left-most
    /// one if all are). `None` when the peer is unknown (in-process tests).
    pub fn client_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        let trusted = |ip: &IpAddr| self.is_trusted_proxy(*ip);
        if !trusted(&peer) {
            return Some(peer);
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map_while(|a| a.trim().parse::<IpAddr>().ok())
            .collect();
        forwarded
            .iter()
            .rev()
            .find(|ip| !trusted(ip))
            .or(forwarded.first())
            .copied()
            .or(Some(peer))
    }

    /// Takes one unit of `budget` for `ip`, on this node and across the cluster; on
    /// refusal, how long to wait.
    pub async fn check(&self, budget: Budget, ip: IpAddr) -> Result<(), Duration> {
        let (limiter, bucket, rate) = match budget {
            Budget::Connect => (&self.connects, "connect", self.rates.connect),
            Budget::Request => (&self.requests, "request", self.rates.request),
            Budget::VisitorToken => (
                &self.visitor_tokens,
                "visitor-token",
                self.rates.visitor_token,
            ),
            Budget::VisitorReport => (
                &self.visitor_reports,
                "visitor-report",
                self.rates.visitor_report,
            ),
        };
        let ip = ip_key(ip);
        limiter
            .check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))?;
        self.shared.take(bucket, &ip.to_string(), rate).await
    }

    /// Takes one unit of the identity's budget (connects plus requests), on this node and
    /// across the cluster; anonymous callers have none, their address budget covers them.
    pub async fn check_identity(&self, identity: &crate::model::Identity) -> Result<(), Duration> {
        if identity.anonymous {
            return Ok(());
        }
        let key = format!("{}/{}", identity.domain_id, identity.user_id);
        self.identities
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))?;
        self.shared
            .take("identity", &key, self.rates.identity)
            .await
    }

    /// Whether a page of `origin` may use `domain`. Requests without an `Origin` header
    /// (not from a browser page) pass when `origin` is `None`.
    pub fn origin_allowed(&self, domain: &str, origin: Option<&str>) -> bool {
        self.domains.load().origin_allowed(domain, origin)
    }

    /// Whether `domain` accepts any origin at all ("*").
    pub fn any_origin(&self, domain: &str) -> bool {
        self.domains.load().any_origin(domain)
    }

    /// The CORS layer: preflights and responses allow the union of every domain's origins,
    /// as the live table has them.
    pub fn cors(&self) -> CorsLayer {
        let domains = Arc::clone(&self.domains);
        CorsLayer::new()
            .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
                origin.to_str().is_ok_and(|o| domains.load().cors_allows(o))
            }))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([
                header::RETRY_AFTER,
                header::HeaderName::from_static("x-request-id"),
            ])
            .max_age(Duration::from_secs(600))
    }

    /// Forgets addresses that have not been limited recently.
    pub fn forget_idle(&self) {
        for limiter in [
            &self.connects,
            &self.requests,
            &self.visitor_tokens,
            &self.visitor_reports,
        ] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        self.identities.retain_recent();
        self.identities.shrink_to_fit();
    }
}

/// The key an address is counted and limited under: an IPv4 address (also when it comes
/// as an IPv4-mapped IPv6 address) as it is, an IPv6 address by its /64 network, since one
/// host or subscriber usually holds a whole /64.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !u128::from(u64::MAX),
            )),
        },
    }
}

/// Open connections per address, capped: [`OpenPerAddress::open`] gives a slot while the
/// address is under its cap, and the slot gives its place back when dropped.
#[derive(Debug)]
pub struct OpenPerAddress {
    open: dashmap::DashMap<IpAddr, u32>,
    /// Most open at once per address; 0 means no cap (nothing is counted).
    max: u32,
}

/// One open connection of an address (see [`OpenPerAddress`]).
#[derive(Debug)]
pub struct AddressSlot {
    counts: Option<(Arc<OpenPerAddress>, IpAddr)>,
}

impl OpenPerAddress {
    /// Counts at most `max` per address (0: no cap).
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            open: dashmap::DashMap::new(),
            max,
        })
    }

    /// A slot for one more connection of `ip` (counted under [`ip_key`]), or `None` when
    /// the address has `max` open already.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        if self.max == 0 {
            return Some(AddressSlot { counts: None });
        }
        let key = ip_key(ip);
        let mut open = self.open.entry(key).or_insert(0);
        if *open >= self.max {
            return None;
        }
        *open += 1;
        Some(AddressSlot {
            counts: Some((Arc::clone(self), key)),
        })
    }

    /// Connections `ip` holds open (counted under [`ip_key`]).
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.open.get(&ip_key(ip)).map_or(0, |n| *n)
    }

    /// The cap (0: none).
    pub fn max(&self) -> u32 {
        self.max
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Some((counts, key)) = self.counts.take() {
            // The entry goes when its last connection does, so the map holds only addresses
            // with connections open.
            counts.open.remove_if_mut(&key, |_, open| {
                *open = open.saturating_sub(1);
                *open == 0
            });
        }
    }
}

/// The `Origin` header, if any.
pub fn origin(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
}

/// Whether the request comes from one of Parlor's own pages (the inbox, the demo): its
/// `Origin` names the very host and port it was sent to (`Host`). Those pages are trusted
/// by every domain, whatever its `allowed_origins` say, because a page of another site
/// cannot make a browser send this server's origin. (Non-browser clients can send any
/// `Origin`; the token, not the origin, is what authenticates them.) Behind a reverse
/// proxy, the proxy must pass the client's `Host` on (see docs/deploy.md).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let (Some(origin), Some(host)) = (origin(headers), host) else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    match (
        host_and_port(authority, default_port),
        host_and_port(host, default_port),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// `host[:port]` (or `[v6]:port`) as lowercase host and port, the port defaulting to
/// `default_port`; `None` when malformed.
fn host_and_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    let authority = authority.trim_end_matches('/');
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        (format!("[{v6}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().ok()?),
            None => (authority.to_owned(), default_port),
        }
    };
    (!host.is_empty() && !host.contains(['/', '@', ' '])).then(|| (host.to_ascii_lowercase(), port))
}

/// The TCP peer's address, when the server knows it (not in in-process tests).
fn peer(extensions: &axum::http::Extensions) -> Option<IpAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The client's IP address as an extractor (see [`Edge::client_ip`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl ClientIp {
    /// The address of `req`'s client.
    pub fn of(app: &AppState, req: &Request) -> Self {
        Self(app.edge.client_ip(peer(req.extensions()), req.headers()))
    }
}

impl axum::extract::FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(
            app.edge.client_ip(peer(&parts.extensions), &parts.headers),
        ))
    }
}

/// Middleware: charges each request to its IP's connect or request budget.
pub async fn limit_by_ip(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // `/` is also a WebSocket endpoint (the Eclipse client's bare URL).
    let upgrade = req
        .headers()
        .get(axum::http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let budget = match path {
        "/" if upgrade => Some((Budget::Connect, "connections from this address")),
        "/" | "/health" | "/metrics" => None,
        "/ws" | "/chat" => Some((Budget::Connect, "connections from this address")),
        _ => Some((Budget::Request, "requests from this address")),
    };
    let ip = app.edge.client_ip(peer(req.extensions()), req.headers());
    if let (Some((budget, what)), Some(ip)) = (budget, ip)
        && let Err(wait) = app.edge.check(budget, ip).await
    {
        app.metrics.client_error("rate_limited");
        return ApiError::rate_limited(wait, what).into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_keyed_by_ipv4_or_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(ip_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(ip_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            ip_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            ip_key(ip("2001:db8:1:2::1")),
            ip_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(ip_key(ip("2001:db8:1:2::1")), ip_key(ip("2001:db8:1:3::1")));
    }

    #[test]
    fn open_slots_are_capped_per_address_and_given_back() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let open = OpenPerAddress::new(2);
        let a = open.open(ip("2001:db8::1")).unwrap();
        let b = open.open(ip("2001:db8::2")).unwrap();
        assert!(open.open(ip("2001:db8::3")).is_none(), "same /64: capped");
        let other = open.open(ip("2001:db8:0:1::1")).unwrap();
        assert_eq!(open.count(ip("2001:db8::99")), 2);
        drop(a);
        let c = open.open(ip("2001:db8::3")).unwrap();
        drop((b, c, other));
        assert!(open.open.is_empty(), "no entry outlives its connections");
        let unlimited = OpenPerAddress::new(0);
        let slots: Vec<_> = (0..10)
            .map(|_| unlimited.open(ip("192.0.2.1")).unwrap())
            .collect();
        assert_eq!(slots.len(), 10);
        assert!(unlimited.open.is_empty());
    }

    #[test]
    fn same_origin_compares_the_origin_with_the_host() {
        let check = |origin: &str, host: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ORIGIN, origin.parse().unwrap());
            h.insert(header::HOST, host.parse().unwrap());
            same_origin(&h)
        };
        assert!(check("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(check("https://Chat.Example.com", "chat.example.com"));
        assert!(check("https://chat.example.com", "chat.example.com:443"));
        assert!(check("http://[::1]:8080", "[::1]:8080"));
        assert!(!check("https://chat.example.com", "chat.example.com:8443"));
        assert!(!check("http://chat.example.com", "chat.example.com:443"));
        assert!(!check("https://evil.example", "chat.example.com"));
        assert!(!check(
            "https://chat.example.com.evil.example",
            "chat.example.com"
        ));
        assert!(!check("null", "chat.example.com"));
        assert!(!check("ftp://chat.example.com", "chat.example.com"));
        assert!(!check("http://[::1", "[::1]:80"));
        let mut no_host = HeaderMap::new();
        no_host.insert(header::ORIGIN, "http://a".parse().unwrap());
        assert!(!same_origin(&no_host));
    }
}
