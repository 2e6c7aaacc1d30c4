//! Authentication: who is behind a connection or request.
//!
//! A token (`?token=` or `Authorization: Bearer`) is either:
//! - a domain's own JWT, recognised by its `iss` being in that domain's `jwt.issuer` list
//!   and verified with that domain's keys ([`jwt`]: secret, PEM keys or JWKS); or
//! - a Parlor token: HS256 signed with `auth.jwt_secret`, claims `sub`, `name`, `role`,
//!   `domain`.
//!
//! Without a token the caller is an anonymous `visitor` of the `demo` domain with a
//! server-generated id. A token that is present but invalid is refused — it never falls
//! back to anonymous.
//!
//! [`policy`] decides what an identity may do. Depends on the model and config only.

pub mod jwt;
pub mod keys;
pub mod policy;

use std::collections::{HashMap, HashSet};
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
    /// Domains with their own tokens, by the `iss` values they accept.
    by_issuer: HashMap<String, Arc<jwt::DomainVerifier>>,
    /// Server API keys (their hashes) and the domain each belongs to.
    server_keys: HashMap<keys::KeyHash, Arc<str>>,
    /// Signs the connection tokens Parlor issues.
    signing_secret: Option<crate::config::Secret>,
}

impl Authenticator {
    /// Builds the verifiers from configuration; refuses unusable per-domain JWT settings.
    pub fn new(config: &Config) -> Result<Self, jwt::JwtConfigError> {
        let mut by_issuer = HashMap::new();
        let mut server_keys = HashMap::new();
        for domain in &config.domains {
            for entry in &domain.server_keys {
                let hash = keys::parse_entry(entry)
                    .map_err(|m| jwt::JwtConfigError::new(&domain.id, m))?;
                server_keys.insert(hash, Arc::from(domain.id.as_str()));
            }
            if let Some(settings) = &domain.jwt {
                let verifier = Arc::new(jwt::DomainVerifier::new(&domain.id, settings)?);
                for iss in verifier.issuers() {
                    if by_issuer
                        .insert(iss.clone(), Arc::clone(&verifier))
                        .is_some()
                    {
                        return Err(jwt::JwtConfigError::new(
                            &domain.id,
                            format!("issuer {iss:?} is claimed by two domains"),
                        ));
                    }
                }
            }
        }
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
        Ok(Self {
            key,
            validation,
            domains: config.domains.iter().map(|d| d.id.clone()).collect(),
            by_issuer,
            server_keys,
            signing_secret: config.auth.jwt_secret.clone(),
        })
    }

    /// The identity for a request: from `token` when given, else a fresh anonymous visitor.
    pub async fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        match token.filter(|t| !t.is_empty()) {
            Some(key) if key.starts_with(keys::KEY_PREFIX) => self.server(key),
            Some(token) => match self.domain_of(token) {
                Some(verifier) => verifier.verify(token).await,
                None => self.verify_own(token),
            },
            None => Ok(anonymous()),
        }
    }

    /// The back end of the domain a server API key belongs to.
    fn server(&self, key: &str) -> Result<Identity, AuthError> {
        let domain = self
            .server_keys
            .get(&keys::hash(key))
            .ok_or_else(|| AuthError::InvalidToken("unknown server key".into()))?;
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
        let secret = self
            .signing_secret
            .as_ref()
            .ok_or(AuthError::TokensDisabled)?;
        issue_token(secret, user, name, role.as_str(), domain, ttl_secs)
            .map_err(|e| AuthError::InvalidToken(format!("cannot sign: {e}")))
    }

    /// The domain whose issuer the token names, read before any verification: it only
    /// chooses the keys that must then verify the token.
    fn domain_of(&self, token: &str) -> Option<&jwt::DomainVerifier> {
        if self.by_issuer.is_empty() {
            return None;
        }
        let payload = token.split('.').nth(1)?;
        let bytes =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let iss = claims.get("iss")?.as_str()?;
        self.by_issuer.get(iss).map(|v| &**v)
    }

    /// A Parlor token: HS256 with `auth.jwt_secret`.
    fn verify_own(&self, token: &str) -> Result<Identity, AuthError> {
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
