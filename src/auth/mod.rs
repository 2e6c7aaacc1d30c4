//! Authentication: who is behind a connection or request.
//!
//! A token (`?token=` or `Authorization: Bearer`) is either:
//! - a server API key (`pk_…`) of a domain's back end ([`keys`]);
//! - a domain's own JWT, recognised by its `iss` being in that domain's `jwt.issuer` list
//!   and verified with that domain's keys ([`jwt`]: secret, PEM keys or JWKS); or
//! - a Parlor token: HS256 signed with `auth.jwt_secret` (or, when that is unset, a secret
//!   the server generated once and keeps in its database), claims `sub`, `name`, `role`,
//!   `domain`.
//!
//! Admin keys (`ak_…`) are accepted only by the admin API ([`Authenticator::identify_admin`]).
//! Domains and their secrets are read from the live [`domains`] table, which the admin API
//! may change at run time.
//!
//! Without a token the caller is an anonymous `visitor` of the `demo` domain with a
//! server-generated id. A token that is present but invalid is refused — it never falls
//! back to anonymous.
//!
//! [`policy`] decides what an identity may do. Depends on the model, config and the store's
//! domain records.

pub mod domains;
pub mod jwt;
pub mod keys;
pub mod policy;

use std::collections::HashSet;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AnonymousIdentity, Config, DEMO_DOMAIN, Secret};
use crate::error_code::ErrorCode;
use crate::model::{Identity, Role, valid_id};
pub use domains::Domains;

/// Why a token was refused. The message is safe to show the client.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Signature, expiry, algorithm or format is wrong.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The token names a domain this server does not have (or, without a token, one that
    /// is not public).
    #[error("unknown domain {0:?}")]
    UnknownDomain(String),
    /// A client without a token asked for a role only a token gives.
    #[error("{0}")]
    Forbidden(String),
    /// A client without a token named itself with an id that cannot be one.
    #[error("{0}")]
    InvalidUser(String),
}

impl AuthError {
    /// Stable error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::InvalidToken(_) => ErrorCode::InvalidToken,
            AuthError::UnknownDomain(_) => ErrorCode::UnknownDomain,
            AuthError::Forbidden(_) => ErrorCode::Forbidden,
            AuthError::InvalidUser(_) => ErrorCode::InvalidUserId,
        }
    }
}

/// Claims Parlor reads from a connection token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    domain: Option<String>,
}

/// Verifies tokens and creates anonymous identities.
#[derive(Debug)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    /// Every domain's settings and secrets, as they are now.
    domains: Arc<Domains>,
    /// Hashes of the admin keys.
    admin_keys: HashSet<keys::KeyHash>,
    /// Signs the connection tokens Parlor issues.
    signing_secret: Secret,
}

impl Authenticator {
    /// Verifies Parlor tokens with `signing_secret` (`auth.jwt_secret`, or the one the
    /// server generated) and everything else with the domains' settings.
    pub fn new(
        config: &Config,
        domains: Arc<Domains>,
        signing_secret: Secret,
    ) -> Result<Self, String> {
        let mut admin_keys = HashSet::new();
        for entry in &config.auth.admin_keys {
            admin_keys
                .insert(keys::parse_entry(entry).map_err(|m| format!("auth.admin_keys: {m}"))?);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 30;
        validation.validate_nbf = true;
        // Parlor's own tokens carry no audience; an `aud` claim must not make them invalid.
        validation.validate_aud = false;
        Ok(Self {
            key: DecodingKey::from_secret(signing_secret.expose().as_bytes()),
            validation,
            domains,
            admin_keys,
            signing_secret,
        })
    }

    /// The live domain table this authenticator reads.
    pub fn domains(&self) -> &Arc<Domains> {
        &self.domains
    }

    /// The identity for a request: from `token` when given, else a fresh anonymous visitor.
    pub async fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        match token.filter(|t| !t.is_empty()) {
            Some(key) if key.starts_with(keys::KEY_PREFIX) => self.server(key),
            Some(key) if key.starts_with(keys::ADMIN_KEY_PREFIX) => Err(AuthError::InvalidToken(
                "an admin key works only on /api/admin".into(),
            )),
            Some(secret) if !secret.contains('.') => self.internal(secret),
            Some(token) => match self.route(token) {
                Route::Domain(verifier) => verifier.verify(token).await,
                Route::Own => self.verify_own(token),
                // No `iss`: Parlor's own token, else the issuer-less domain's.
                Route::OwnElse(verifier) => {
                    // Parlor's tokens are HS256: any other algorithm is the domain's.
                    let hs256 =
                        jsonwebtoken::decode_header(token).is_ok_and(|h| h.alg == Algorithm::HS256);
                    if !hs256 {
                        return verifier.verify(token).await;
                    }
                    match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
                        Err(e)
                            if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature =>
                        {
                            verifier.verify(token).await
                        }
                        _ => self.verify_own(token),
                    }
                }
            },
            None => Ok(anonymous()),
        }
    }

    /// The server-wide administrator holding admin key `key`.
    pub fn identify_admin(&self, key: Option<&str>) -> Result<Identity, AuthError> {
        let key = key.ok_or_else(|| AuthError::InvalidToken("an admin key is required".into()))?;
        if !key.starts_with(keys::ADMIN_KEY_PREFIX) || !self.admin_keys.contains(&keys::hash(key)) {
            return Err(AuthError::InvalidToken("unknown admin key".into()));
        }
        Ok(Identity {
            user_id: "admin".to_owned(),
            name: "administrator".to_owned(),
            role: Role::Admin,
            domain_id: Arc::from(policy::ALL_DOMAINS),
            anonymous: false,
            room: None,
            label: None,
        })
    }

    /// The back end of the domain a server API key belongs to.
    fn server(&self, key: &str) -> Result<Identity, AuthError> {
        let table = self.domains.load();
        let domain = table
            .server_key_domain(key, chrono::Utc::now())
            .ok_or_else(|| AuthError::InvalidToken("unknown or expired server key".into()))?;
        Ok(back_end(domain))
    }

    /// Signs a Parlor connection token for `user` in `domain`, valid `ttl_secs`.
    pub fn issue(
        &self,
        user: &str,
        name: Option<&str>,
        role: Role,
        domain: &str,
        ttl_secs: u64,
    ) -> Result<String, AuthError> {
        issue_token(
            &self.signing_secret,
            user,
            name,
            role.as_str(),
            domain,
            ttl_secs,
        )
        .map_err(|e| AuthError::InvalidToken(format!("cannot sign: {e}")))
    }

    /// Whose keys must verify `token`, read from its `iss` before any verification: the
    /// claim only chooses the keys.
    fn route(&self, token: &str) -> Route {
        let table = self.domains.load();
        if !table.has_issuers() {
            return Route::Own;
        }
        let claims = token.split('.').nth(1).and_then(|payload| {
            let bytes =
                base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                    .ok()?;
            serde_json::from_slice::<serde_json::Value>(&bytes).ok()
        });
        let Some(claims) = claims else {
            return Route::Own;
        };
        match claims.get("iss") {
            Some(iss) => iss
                .as_str()
                .and_then(|iss| table.verifier_for(iss))
                .map_or(Route::Own, |v| Route::Domain(Arc::clone(v))),
            None => table
                .issuerless()
                .map_or(Route::Own, |v| Route::OwnElse(Arc::clone(v))),
        }
    }

    /// The anonymous visitor a visitor cookie names: a visitor token of the demo that
    /// Parlor signed (see `transport::visitor`); `None` for anything else.
    pub fn visitor_cookie(&self, value: &str) -> Option<Identity> {
        let identity = self.verify_own(value).ok()?;
        (identity.role == Role::Visitor && &*identity.domain_id == DEMO_DOMAIN).then_some(
            Identity {
                anonymous: true,
                name: "Visitor".to_owned(),
                ..identity
            },
        )
    }

    /// The back end of the domain whose `internal_secret` is `secret`.
    fn internal(&self, secret: &str) -> Result<Identity, AuthError> {
        let table = self.domains.load();
        let domain = table
            .internal_secret_domain(secret)
            .ok_or_else(|| AuthError::InvalidToken("not a token, key or internal secret".into()))?;
        Ok(back_end(domain))
    }

    /// A Parlor token: HS256 with the signing secret.
    fn verify_own(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| jwt::invalid(&e))?;
        let claims = data.claims;
        if !valid_id(&claims.sub) {
            return Err(AuthError::InvalidToken(
                "claim `sub` is not a valid user id".into(),
            ));
        }
        let role = match claims.role.as_deref() {
            None => Role::Visitor,
            Some(r) => Role::parse(r).ok_or_else(|| {
                AuthError::InvalidToken(format!("unknown role {r:?} in claim `role`"))
            })?,
        };
        let domain = claims.domain.unwrap_or_else(|| DEMO_DOMAIN.to_owned());
        if self.domains.load().get(&domain).is_none() {
            return Err(AuthError::UnknownDomain(domain));
        }
        let name = claims.name.unwrap_or_else(|| claims.sub.clone());
        Ok(Identity {
            user_id: claims.sub,
            name,
            role,
            domain_id: Arc::from(domain),
            anonymous: false,
            room: None,
            label: None,
        })
    }
}

/// What a client without a token says about itself: `join-room`'s fields, or the body of
/// an AI or message request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Claimed<'a> {
    /// The domain it wants (`domainId`).
    pub domain_id: Option<&'a str>,
    /// Its user id (`userId`), taken only where the domain lets clients name themselves.
    pub user_id: Option<&'a str>,
    /// Its name (`userName`), likewise.
    pub user_name: Option<&'a str>,
    /// The role it says it has (`role`).
    pub role: Option<&'a str>,
}

/// User ids a client naming itself may not take: the server writes as them.
const RESERVED_IDS: [&str; 5] = ["system", "service", "assistant", "admin", "ai-assistant"];

/// Role names a client without a token may use: all mean `visitor` to the policy.
const CLIENT_ROLES: [&str; 3] = ["visitor", "customer", "user"];

impl Authenticator {
    /// The identity of an anonymous caller once what it `claimed` is applied: the domain
    /// it names, if that is the demo or a `public` domain that allows `origin` (naming
    /// none, the public domain that lists `origin` itself, if one does); in a domain
    /// with `anonymous_identity = "client"`, its own `userId`, `userName` and role name.
    /// A role only a token gives is refused everywhere. An identity from a token is
    /// returned as it is, if `claimed` names no other domain (`forbidden`).
    pub fn settle(
        &self,
        base: &Identity,
        claimed: Claimed<'_>,
        origin: Option<&str>,
    ) -> Result<Identity, AuthError> {
        if !base.anonymous {
            return match claimed.domain_id {
                Some(d) if d != &*base.domain_id => Err(AuthError::Forbidden(format!(
                    "domainId {:?} is not the caller's domain",
                    d.chars().take(DOMAIN_ID_SHOWN).collect::<String>()
                ))),
                _ => Ok(base.clone()),
            };
        }
        let role = claimed.role.map(str::trim).filter(|r| !r.is_empty());
        if let Some(r) = role
            && !CLIENT_ROLES.contains(&r)
        {
            return Err(AuthError::Forbidden(format!(
                "role {:?} comes only with a token; a client without one is a visitor \
                 (`customer` or `user`)",
                r.chars().take(32).collect::<String>()
            )));
        }
        let table = self.domains.load();
        // Unnamed: the public domain of the page's own site, if the caller is still in the
        // default one.
        let by_origin = (claimed.domain_id.is_none() && &*base.domain_id == DEMO_DOMAIN)
            .then(|| origin.and_then(|o| table.public_for_origin(o)))
            .flatten();
        let domain_id = claimed.domain_id.or(by_origin).unwrap_or(&base.domain_id);
        let domain = if domain_id == &*base.domain_id {
            table.get(domain_id)
        } else {
            table.public_domain(domain_id, origin)
        }
        .ok_or_else(|| {
            AuthError::UnknownDomain(domain_id.chars().take(DOMAIN_ID_SHOWN).collect())
        })?;
        let mut identity = base.clone();
        if domain_id != &*base.domain_id {
            identity.domain_id = Arc::from(domain_id);
        }
        if domain.settings.anonymous_identity == AnonymousIdentity::Client
            && let Some(user) = claimed.user_id
        {
            if !valid_id(user) {
                return Err(AuthError::InvalidUser(
                    "`userId` must be 1-128 characters of letters, digits and -_.:@".into(),
                ));
            }
            // Ids the server writes as: a client taking one would pass for the assistant
            // (and could pre-empt its replies) or for the system.
            let assistant = domain
                .settings
                .bot
                .as_ref()
                .map_or(crate::config::ASSISTANT_ID, |b| b.author_id.as_str());
            if user == assistant || RESERVED_IDS.contains(&user) {
                return Err(AuthError::InvalidUser(format!(
                    "`userId` {user:?} is the server's own; choose another"
                )));
            }
            identity.user_id = user.to_owned();
            identity.name = claimed
                .user_name
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map_or_else(|| user.to_owned(), |n| n.chars().take(100).collect());
            identity.label = Some(
                CLIENT_ROLES
                    .iter()
                    .copied()
                    .find(|r| Some(*r) == role)
                    .unwrap_or("visitor"),
            );
        }
        Ok(identity)
    }
}

/// Most characters of an unknown domain id an error repeats.
const DOMAIN_ID_SHOWN: usize = 64;

/// The back end of `domain` (a server key or its internal secret).
fn back_end(domain: &Arc<str>) -> Identity {
    Identity {
        user_id: "service".to_owned(),
        name: format!("{domain} back end"),
        role: Role::Service,
        domain_id: Arc::clone(domain),
        anonymous: false,
        room: None,
        label: None,
    }
}

/// Whose keys verify a token.
enum Route {
    /// The domain whose issuer list names the token's `iss`.
    Domain(Arc<jwt::DomainVerifier>),
    /// Parlor's own secret.
    Own,
    /// Parlor's own secret, else (its signature does not verify) the issuer-less domain.
    OwnElse(Arc<jwt::DomainVerifier>),
}

/// A new anonymous visitor of the demo domain.
/// The prefix of the ids the server makes for visitors without a token of their own.
const ANONYMOUS_PREFIX: &str = "v_";

/// Whether `user_id` is one the server made for a visitor without a token of their own
/// ([`anonymous`]: the widget's visitor tokens and the visitor cookie carry such ids).
pub fn is_server_made_visitor(user_id: &str) -> bool {
    user_id.len() == ANONYMOUS_PREFIX.len() + 16
        && user_id.starts_with(ANONYMOUS_PREFIX)
        && user_id[ANONYMOUS_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
}

pub fn anonymous() -> Identity {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Identity {
        user_id: format!("{ANONYMOUS_PREFIX}{}", &id[..16]),
        name: "Visitor".to_owned(),
        role: Role::Visitor,
        domain_id: Arc::from(DEMO_DOMAIN),
        anonymous: true,
        room: None,
        label: None,
    }
}

/// Signs an HS256 connection token (development tooling and tests).
pub fn issue_token(
    secret: &Secret,
    user: &str,
    name: Option<&str>,
    role: &str,
    domain: &str,
    ttl_secs: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let exp = chrono::Utc::now()
        .timestamp()
        .saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX));
    let claims = serde_json::json!({ "sub": user, "name": name, "role": role, "domain": domain, "exp": exp });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()),
    )
}
