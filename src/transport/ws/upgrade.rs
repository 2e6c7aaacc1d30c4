//! The upgrade to a WebSocket at `/ws`: the handshake, the token, the caps a connection
//! is admitted under (server, domain, address), and the subprotocols.

use super::*;

/// Query parameters of the upgrade request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WsQuery {
    /// Join this room right away (the seed's `/ws?roomId=`).
    pub(super) room_id: Option<String>,
    /// Connection token.
    pub(super) token: Option<String>,
    /// Without a token: the domain to be a visitor of (the demo, or a public one).
    pub(super) domain_id: Option<String>,
}

/// `GET /ws`: checks the handshake, authenticates, checks capacity, and upgrades.
pub async fn upgrade(
    State(app): State<AppState>,
    Query(query): Query<WsQuery>,
    mut req: Request,
) -> Response {
    let (key, offered) = match handshake(&app, req.headers()) {
        Ok(handshake) => handshake,
        Err(refused) => return *refused,
    };
    let token = upgrade_token(query.token.as_deref(), req.headers(), &offered);
    let identified = match token.as_deref() {
        None => Ok(crate::transport::visitor::anonymous(req.extensions())),
        token => app.auth.identify(token).await,
    };
    let identity = match identified {
        Ok(identity) => identity,
        Err(e) => {
            app.metrics.client_error(e.code().as_str());
            return ApiError::unauthorized(e.code(), e.to_string()).into_response();
        }
    };
    // A token-less client from a public domain's own site is in that domain from the
    // start (`?domainId=` names one explicitly), so that its `?roomId=` room is that
    // domain's.
    let identity = if identity.anonymous {
        let claimed = crate::auth::Claimed {
            domain_id: query.domain_id.as_deref(),
            ..crate::auth::Claimed::default()
        };
        match app.auth.settle(
            &identity,
            claimed,
            crate::transport::ai::page_origin(req.headers()),
        ) {
            Ok(settled) => settled,
            Err(e) => {
                app.metrics.client_error(e.code().as_str());
                return crate::transport::error::ApiError::from(ServiceError::from(e))
                    .into_response();
            }
        }
    } else {
        identity
    };
    let gate = match Gate::pass(&app, &req, &identity).await {
        Ok(gate) => gate,
        Err(refused) => return refused,
    };
    let Gate {
        origin,
        address,
        admitted,
        permits,
    } = gate;
    // Only visitors have a context worth showing to agents.
    let browser = (identity.role == Role::Visitor)
        .then(|| req.headers().get(header::USER_AGENT)?.to_str().ok())
        .flatten()
        .map(|ua| Box::from(truncate(ua, MAX_CONTEXT_CHARS)));
    let limits = &app.config.limits;
    let identity_anonymous = identity.anonymous;
    let dialect = dialect_of(&app, &identity);
    // A token that names its room (Eclipse's `chatId`) joins it at once.
    let auto_join = query
        .room_id
        .or_else(|| identity.room.as_deref().map(str::to_owned));
    let id = app.next_connection_id();
    let (handle, rx) = ConnHandle::bounded(
        id,
        Arc::new(identity),
        limits.outbound_queue,
        limits.outbound_queue_bytes,
    );
    let online = app
        .shared
        .online(handle.identity(), handle.identity().role.as_str());
    let watched = app.sockets.watch(&handle);
    let auth_until = watched
        .elapsed_ms()
        .saturating_add(u64::try_from(AUTH_FRAME_WINDOW.as_millis()).unwrap_or(u64::MAX));
    let connection = Box::new(Connection {
        limiter: admitted.limiter,
        frame_rate: admitted.frame_rate,
        app: app.clone(),
        handle,
        rx,
        watched,
        rooms: Cursors::default(),
        current_room: None,
        sends: Sends::default(),
        display_name: None,
        origin,
        auth_until,
        settled: !identity_anonymous,
        pending_join: auto_join.map(Into::into),
        dialect,
        park: Park::Held,
        permits,
        address,
        online,
        browser,
    });
    let max_message = limits.max_frame_bytes;
    let on_upgrade = hyper::upgrade::on(&mut req);
    // Nothing but the boxes is kept across the connection's life: the task of an idle
    // connection is its smallest (`Connection::run`).
    app.supervisor.spawn_isolated("connection", async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        connection
            .run(Box::new(WsSocket::new(upgraded, max_message)))
            .await;
    });
    switching_protocols(&key, &offered)
}

/// An upgrade's token: `?token=`, else `Authorization: Bearer`, else the `bearer.<token>`
/// subprotocol (browsers cannot set headers on a WebSocket). An empty `?token=` is no
/// token: it must not hide the header.
pub(super) fn upgrade_token(
    query: Option<&str>,
    headers: &HeaderMap,
    offered: &[String],
) -> Option<String> {
    query
        .filter(|t| !t.is_empty())
        .or_else(|| bearer_token(headers))
        .or_else(|| {
            offered
                .iter()
                .find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
        })
        .map(str::to_owned)
}

/// A WebSocket opening handshake's key and offered subprotocols, or the 426 answer to a
/// request that is not one: how every WebSocket endpoint starts.
pub(super) fn handshake(
    app: &AppState,
    headers: &HeaderMap,
) -> Result<(String, Vec<String>), Box<Response>> {
    match handshake_key(headers) {
        Ok(key) => Ok((key, subprotocols(headers))),
        Err(message) => Err(Box::new(upgrade_required(app, message))),
    }
}

/// The answer to a request that is not a WebSocket handshake.
pub(super) fn upgrade_required(app: &AppState, message: &str) -> Response {
    app.metrics.client_error("upgrade_required");
    let mut res = ApiError::new(
        StatusCode::UPGRADE_REQUIRED,
        ErrorCode::UpgradeRequired,
        message,
    )
    .into_response();
    res.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    res.headers_mut().insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    res
}

/// The 101 that completes a handshake with `key`.
pub(super) fn switching_protocols(key: &str, offered: &[String]) -> Response {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = res.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    // A client that offers subprotocols must get one back; never echo the token.
    if offered.iter().any(|p| p == SUBPROTOCOL) {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    res
}

/// The places an admitted WebSocket holds in the server's and its domain's connection
/// limits, and under its address's caps on WebSockets and on TCP connections.
pub(super) type Permits = (
    OwnedSemaphorePermit,
    DomainPermit,
    Option<AddressSlot>,
    Option<TcpSlot>,
);

/// What an upgrade passed on its way in: the checks every WebSocket endpoint makes once its
/// caller is known.
pub(super) struct Gate {
    /// The page's origin (`None` for Parlor's own pages and non-browser clients).
    pub(super) origin: Option<Box<str>>,
    /// The client's address (behind a trusted proxy, the forwarded one).
    pub(super) address: Option<std::net::IpAddr>,
    /// The domain's frame limits.
    pub(super) admitted: Admitted,
    /// Its places in the connection limits.
    pub(super) permits: Permits,
}

impl Gate {
    /// The identity's connect rate, the page's origin, shutdown, and the address's, the
    /// server's and the domain's connection limits, in that order; the refusal as the
    /// response to send.
    pub(super) fn pass<'a>(
        app: &'a AppState,
        req: &Request,
        identity: &'a Identity,
    ) -> impl Future<Output = Result<Self, Response>> + Send + 'a {
        // Read what the request says before waiting: a request is not `Sync`.
        let origin = if crate::transport::edge::same_origin(req.headers()) {
            None
        } else {
            crate::transport::edge::origin(req.headers()).map(Box::<str>::from)
        };
        let address = crate::transport::edge::ClientIp::of(app, req).0;
        let tcp_slot = req.extensions().get::<TcpSlot>().cloned();
        Self::admit(app, identity, origin, address, tcp_slot)
    }

    pub(super) async fn admit(
        app: &AppState,
        identity: &Identity,
        origin: Option<Box<str>>,
        address: Option<std::net::IpAddr>,
        tcp_slot: Option<TcpSlot>,
    ) -> Result<Self, Response> {
        if let Err(wait) = app.edge.check_identity(identity).await {
            app.metrics.client_error("rate_limited");
            return Err(
                ApiError::rate_limited(wait, "connections by this identity").into_response()
            );
        }
        // A browser page may open sockets only for domains that list its origin; Parlor's
        // own pages (the inbox) serve every domain.
        if !app
            .edge
            .origin_allowed(&identity.domain_id, origin.as_deref())
        {
            app.metrics.client_error("origin_not_allowed");
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                ErrorCode::OriginNotAllowed,
                "this origin may not use the domain (allowed_origins)",
            )
            .into_response());
        }
        if app.supervisor.shutdown().is_cancelled() {
            return Err(
                ApiError::unavailable(ErrorCode::ShuttingDown, "server is shutting down")
                    .into_response(),
            );
        }
        let address_slot = match address.map(|ip| app.edge.websockets.open(ip)) {
            Some(None) => {
                app.metrics.refused("address_websockets");
                app.metrics.client_error("too_many_connections");
                let max = app.edge.websockets.max();
                return Err(ApiError::too_many_connections(format!(
                    "this address has {max} WebSockets open (limits.ip_max_websockets); close \
                     some first"
                ))
                .into_response());
            }
            Some(Some(slot)) => Some(slot),
            None => None,
        };
        let Ok(permit) = Arc::clone(&app.connection_permits).try_acquire_owned() else {
            app.metrics.refused("server_full");
            app.metrics.client_error("too_many_connections");
            return Err(ApiError::unavailable(
                ErrorCode::TooManyConnections,
                "connection limit reached",
            )
            .into_response());
        };
        let Some((domain_permit, admitted)) = admit_to_domain(app, identity) else {
            app.metrics.refused("domain_full");
            app.metrics.client_error("too_many_connections");
            return Err(
                ApiError::unavailable(ErrorCode::TooManyConnections, DOMAIN_FULL).into_response(),
            );
        };
        Ok(Self {
            origin,
            address,
            permits: (permit, domain_permit, address_slot, tcp_slot),
            admitted,
        })
    }
}

pub(super) const DOMAIN_FULL: &str = "this domain's connection limit is reached";

/// A connection's frame limiter, set by its domain.
pub(super) struct Admitted {
    pub(super) limiter: FrameLimiter,
    pub(super) frame_rate: u32,
}

/// Admits a connection of `identity` under its domain's limits (`None`: the domain is at
/// its connection limit): its place among the domain's connections, and its frame limiter
/// (the domain's frame rate, else the server's).
pub(super) fn admit_to_domain(
    app: &AppState,
    identity: &Identity,
) -> Option<(DomainPermit, Admitted)> {
    let domains = app.auth.domains();
    let domain_limits = domains
        .load()
        .get(&identity.domain_id)
        .map(|d| d.settings.limits.clone())
        .unwrap_or_default();
    let permit = domains.admit(&identity.domain_id, domain_limits.max_connections)?;
    let limits = &app.config.limits;
    let frame_rate = domain_limits
        .messages_per_second
        .unwrap_or(limits.messages_per_second);
    let per_second = NonZeroU32::new(frame_rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(
        domain_limits
            .messages_burst
            .unwrap_or(limits.messages_burst),
    )
    .unwrap_or(NonZeroU32::MIN);
    Some((
        permit,
        Admitted {
            limiter: RateLimiter::direct_with_clock(
                Quota::per_second(per_second).allow_burst(burst),
                MonotonicClock,
            ),
            frame_rate,
        },
    ))
}

/// The subprotocol Parlor answers with when a client offers it.
pub const SUBPROTOCOL: &str = "parlor";
/// A client may carry its token as the subprotocol `bearer.<token>` (next to `parlor`).
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "bearer.";

/// The subprotocols a client offered, in order.
pub(super) fn subprotocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Checks an RFC 6455 opening handshake and returns its `Sec-WebSocket-Key`.
pub(super) fn handshake_key(headers: &HeaderMap) -> Result<String, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(
            "this endpoint speaks WebSocket: send Connection: Upgrade and Upgrade: websocket",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err("Sec-WebSocket-Version must be 13");
    }
    match headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(key) if key.len() == 24 && key.ends_with("==") => Ok(key.to_owned()),
        _ => Err("missing or malformed Sec-WebSocket-Key"),
    }
}
