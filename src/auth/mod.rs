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

use crate::config::{Config, DEMO_DOMAIN, Secret};
use crate::model::{Identity, Role, valid_id};
pub use domains::Domains;

/// Why a token was refused. The message is safe to show the client.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Signature, expiry, algorithm or format is wrong.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The token names a domain this server does not have.
    #[error("unknown domain {0:?}")]
    UnknownDomain(String),
}

impl AuthError {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::InvalidToken(_) => "invalid_token",
            AuthError::UnknownDomain(_) => "unknown_domain",
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
            Some(token) => {
                let verifier = self.domain_of(token);
                match verifier {
                    Some(verifier) => verifier.verify(token).await,
                    None => self.verify_own(token),
                }
            }
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
        })
    }

    /// The back end of the domain a server API key belongs to.
    fn server(&self, key: &str) -> Result<Identity, AuthError> {
        let table = self.domains.load();
        let domain = table
            .server_key_domain(key, chrono::Utc::now())
            .ok_or_else(|| AuthError::InvalidToken("unknown or expired server key".into()))?;
        Ok(Identity {
            user_id: "service".to_owned(),
            name: format!("{domain} back end"),
            role: Role::Service,
            domain_id: Arc::clone(domain),
            anonymous: false,
        })
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

    /// The domain whose issuer the token names, read before any verification: it only
    /// chooses the keys that must then verify the token.
    fn domain_of(&self, token: &str) -> Option<Arc<jwt::DomainVerifier>> {
        let table = self.domains.load();
        if !table.has_issuers() {
            return None;
        }
        let payload = token.split('.').nth(1)?;
        let bytes =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let iss = claims.get("iss")?.as_str()?;
        table.verifier_for(iss).cloned()
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
        })
    }
}

/// A new anonymous visitor of the demo domain.
pub fn anonymous() -> Identity {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Identity {
        user_id: format!("v_{}", &id[..16]),
        name: "Visitor".to_owned(),
        role: Role::Visitor,
        domain_id: Arc::from(DEMO_DOMAIN),
        anonymous: true,
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
