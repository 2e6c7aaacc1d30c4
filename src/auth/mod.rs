//! Authentication: who is behind a connection or request.
//!
//! Today an identity comes from an HS256 JWT (`?token=` or `Authorization: Bearer`) signed
//! with `auth.jwt_secret`, with claims `sub`, `name`, `role` and `domain`; without a token the
//! caller is an anonymous `visitor` of the `demo` domain with a server-generated id. A token
//! that is present but invalid is refused — it never falls back to anonymous.
//!
//! [`policy`] decides what an identity may do. Depends on the model and config only.

pub mod policy;

use std::collections::HashSet;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{Config, DEMO_DOMAIN};
use crate::model::{Identity, Role, valid_id};

/// Why a token was refused. The message is safe to show the client.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No secret is configured, so no token can be verified.
    #[error("this server does not accept tokens (auth.jwt_secret is not set)")]
    TokensDisabled,
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
            AuthError::TokensDisabled | AuthError::InvalidToken(_) => "invalid_token",
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
    key: Option<DecodingKey>,
    validation: Validation,
    domains: HashSet<String>,
}

impl Authenticator {
    /// Builds the verifier from configuration.
    pub fn new(config: &Config) -> Self {
        let key = config
            .auth
            .jwt_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.expose().as_bytes()));
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 30;
        validation.validate_nbf = true;
        // No audience is configured yet, so an `aud` claim (which many identity providers
        // always set) must not make every token invalid. Audience checks arrive with
        // per-domain JWT settings.
        validation.validate_aud = false;
        // No audience is configured yet, so an `aud` claim (which many identity providers
        // always set) must not make every token invalid. Audience checks arrive with
        // per-domain JWT settings.
        validation.validate_aud = false;
        Self {
            key,
            validation,
            domains: config.domains.iter().map(|d| d.id.clone()).collect(),
        }
    }

    /// The identity for a request: from `token` when given, else a fresh anonymous visitor.
    pub fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        match token.filter(|t| !t.is_empty()) {
            Some(token) => self.verify(token),
            None => Ok(anonymous()),
        }
    }

    fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let key = self.key.as_ref().ok_or(AuthError::TokensDisabled)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
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
        if !self.domains.contains(&domain) {
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
    secret: &crate::config::Secret,
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
