//! Verifying a domain's own JWTs: a shared secret (HS256/384/512), PEM public keys or a
//! JWKS URL (RS256/384/512, PS256/384/512, ES256/384, EdDSA), with `exp`/`nbf` (and a
//! leeway), `iss` and `aud` checks, and configurable claim paths.
//!
//! Design:
//! - A token is matched to a domain by its (unverified) `iss`, then must verify with that
//!   domain's keys and nothing else; so choosing an `iss` only chooses which keys must
//!   sign, never grants anything.
//! - Algorithms come from the configuration, never from the token: `alg: none` cannot be
//!   parsed at all, an `alg` outside the list is refused, and a key only verifies its own
//!   family (an RSA public key is never used as an HMAC secret).
//! - JWKS: fetched on first use, kept `jwks_cache_secs`, fetched again sooner when a token
//!   names an unknown `kid` (rotation), but at most once per `jwks_min_refresh_secs` so
//!   random `kid`s cannot turn into a fetch storm. A failed fetch keeps the keys already
//!   held; only a key the server has never seen is refused while the JWKS is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::Value;

use super::AuthError;
use crate::config::{ClaimPaths, Dialect, JwtConfig};
use crate::model::{Identity, Role, valid_id};

/// A domain's JWT configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("domains.{domain}.jwt: {message}")]
pub struct JwtConfigError {
    domain: String,
    message: String,
}

impl JwtConfigError {
    pub(crate) fn new(domain: &str, message: String) -> Self {
        Self {
            domain: domain.to_owned(),
            message,
        }
    }
}

/// Verifies the tokens of one domain.
#[derive(Debug)]
pub struct DomainVerifier {
    domain: Arc<str>,
    keys: Keys,
    /// One validation per accepted algorithm: `jsonwebtoken` wants every algorithm of a
    /// validation to match the key's family.
    validations: Vec<(Algorithm, Validation)>,
    claims: ClaimPaths,
    default_role: Role,
    issuers: Vec<String>,
    /// Where the room a token is for is (see [`ClaimPaths::room_claim`]).
    room_claim: Option<String>,
}

#[derive(Debug)]
enum Keys {
    /// Keys known from the configuration.
    Fixed(Vec<DecodingKey>),
    /// Keys of a JWKS document.
    Jwks(Jwks),
}

impl DomainVerifier {
    /// Builds the verifier of a domain of `dialect`; reads PEM files named in
    /// `public_keys`.
    pub fn new(domain: &str, config: &JwtConfig, dialect: Dialect) -> Result<Self, JwtConfigError> {
        let err = |message: String| JwtConfigError::new(domain, message);
        let sources = usize::from(config.secret.is_some())
            + usize::from(!config.public_keys.is_empty())
            + usize::from(config.jwks_url.is_some());
        if sources != 1 {
            return Err(err(
                "set exactly one of `secret`, `public_keys` or `jwks_url`".to_owned(),
            ));
        }
        let algorithms = if config.algorithms.is_empty() {
            if config.secret.is_some() {
                vec![Algorithm::HS256]
            } else {
                vec![Algorithm::RS256, Algorithm::ES256]
            }
        } else {
            config
                .algorithms
                .iter()
                .map(|a| {
                    a.parse::<Algorithm>()
                        .map_err(|_| err(format!("unknown algorithm {a:?}")))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let hmac = |a: &Algorithm| a.family() == AlgorithmFamily::Hmac;
        let consistent = if config.secret.is_some() {
            algorithms.iter().all(hmac)
        } else {
            !algorithms.iter().any(hmac)
        };
        if !consistent {
            return Err(err(
                "HS256/384/512 go with `secret` only, and public-key algorithms with `public_keys` or `jwks_url` only"
                    .to_owned(),
            ));
        }
        let keys = if let Some(secret) = &config.secret {
            if secret.expose().len() < 32 {
                return Err(err("`secret` must be at least 32 bytes".to_owned()));
            }
            Keys::Fixed(vec![DecodingKey::from_secret(secret.expose().as_bytes())])
        } else if let Some(url) = &config.jwks_url {
            Keys::Jwks(Jwks::new(url, config).map_err(err)?)
        } else {
            let mut keys = Vec::new();
            for source in &config.public_keys {
                keys.push(read_pem(source).map_err(err)?);
            }
            Keys::Fixed(keys)
        };
        let default_role = Role::parse(&config.claims.default_role).ok_or_else(|| {
            err(format!(
                "unknown default_role {:?}",
                config.claims.default_role
            ))
        })?;
        let validations = algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = config.leeway_secs;
                v.validate_nbf = true;
                // Without an issuer list, the domain takes tokens that carry no `iss` (the
                // table routes only those to it).
                let mut required = vec!["exp"];
                if !config.issuer.is_empty() {
                    v.set_issuer(&config.issuer);
                    required.push("iss");
                }
                // With an audience configured, a token must name it: one without `aud` at
                // all is refused like one naming another audience.
                if config.audience.is_empty() {
                    v.validate_aud = false;
                } else {
                    v.set_audience(&config.audience);
                    required.push("aud");
                }
                v.set_required_spec_claims(&required);
                (alg, v)
            })
            .collect();
        Ok(Self {
            domain: Arc::from(domain),
            keys,
            validations,
            claims: config.claims.clone(),
            default_role,
            issuers: config.issuer.clone(),
            room_claim: config.claims.room_claim(dialect).map(str::to_owned),
        })
    }

    /// The domain it verifies tokens for.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The `iss` values this domain's tokens carry.
    pub fn issuers(&self) -> &[String] {
        &self.issuers
    }

    /// The identity in `token`, if it is valid for this domain.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(&e))?;
        let Some((alg, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg)
        else {
            return Err(AuthError::InvalidToken(format!(
                "algorithm {:?} is not accepted for this domain",
                header.alg
            )));
        };
        let claims: Value = match &self.keys {
            Keys::Fixed(keys) => decode_with_any(token, *alg, validation, keys.iter())?,
            Keys::Jwks(jwks) => {
                let keys = jwks.keys_for(header.kid.as_deref()).await?;
                decode_with_any(token, *alg, validation, keys.iter().map(|(_, k)| k))?
            }
        };
        self.identity(&claims)
    }

    fn identity(&self, claims: &Value) -> Result<Identity, AuthError> {
        let user_id = claim_str(claims, &self.claims.user_id).ok_or_else(|| {
            AuthError::InvalidToken(format!(
                "claim `{}` (user id) is missing",
                self.claims.user_id
            ))
        })?;
        if !valid_id(user_id) {
            return Err(AuthError::InvalidToken(format!(
                "claim `{}` is not a valid user id",
                self.claims.user_id
            )));
        }
        let role = match claim_str(claims, &self.claims.role) {
            None => self.default_role,
            Some(r) => Role::parse(r).ok_or_else(|| {
                AuthError::InvalidToken(format!(
                    "unknown role {r:?} in claim `{}`",
                    self.claims.role
                ))
            })?,
        };
        let name = claim_str(claims, &self.claims.name)
            .filter(|n| !n.trim().is_empty())
            .map_or_else(|| user_id.to_owned(), |n| n.chars().take(100).collect());
        let room = match self.room_claim.as_deref() {
            None => None,
            Some(path) => match claim(claims, path) {
                None | Some(Value::Null) => None,
                Some(Value::String(r)) if valid_id(r) => Some(Box::from(r.as_str())),
                Some(_) => {
                    return Err(AuthError::InvalidToken(format!(
                        "claim `{path}` (room) is not a valid room id"
                    )));
                }
            },
        };
        Ok(Identity {
            user_id: user_id.to_owned(),
            name,
            role,
            domain_id: Arc::clone(&self.domain),
            anonymous: false,
            room,
            label: None,
        })
    }
}

/// Tries each key of the token's algorithm family; the first that verifies wins.
fn decode_with_any<'a>(
    token: &str,
    alg: Algorithm,
    validation: &Validation,
    keys: impl Iterator<Item = &'a DecodingKey>,
) -> Result<Value, AuthError> {
    let mut last = None;
    for key in keys.filter(|k| k.family() == alg.family()) {
        match jsonwebtoken::decode::<Value>(token, key, validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(
        || AuthError::InvalidToken(format!("no key of this domain verifies {alg:?} tokens")),
        |e| invalid(&e),
    ))
}

/// A verification failure in words ("signature does not verify"), not the library's
/// variant name.
pub(super) fn invalid(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    let reason = match e.kind() {
        ErrorKind::ExpiredSignature => "token has expired".to_owned(),
        ErrorKind::ImmatureSignature => "token is not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidIssuer => "issuer (iss) is not accepted".to_owned(),
        ErrorKind::InvalidAudience => "audience (aud) is not accepted".to_owned(),
        ErrorKind::InvalidSignature => "signature does not verify".to_owned(),
        ErrorKind::InvalidAlgorithm => "algorithm does not match the key".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("claim `{c}` is required"),
        _ => format!("malformed token ({e})"),
    };
    AuthError::InvalidToken(reason)
}

/// The string at a dotted path in the claims, if there is one.
pub(crate) fn claim_str<'a>(claims: &'a Value, path: &str) -> Option<&'a str> {
    claim(claims, path).and_then(Value::as_str)
}

/// The claim at a dotted `path`, whatever its type.
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

/// A PEM key given inline or as a file path.
fn read_pem(source: &str) -> Result<DecodingKey, String> {
    let text = if source.trim_start().starts_with("-----BEGIN") {
        source.to_owned()
    } else {
        std::fs::read_to_string(source).map_err(|e| format!("cannot read {source:?}: {e}"))?
    };
    let bytes = text.as_bytes();
    DecodingKey::from_rsa_pem(bytes)
        .or_else(|_| DecodingKey::from_ec_pem(bytes))
        .or_else(|_| DecodingKey::from_ed_pem(bytes))
        .map_err(|_| format!("{source:?} holds no RSA, EC or Ed25519 public key in PEM form"))
}

/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// A JWKS document's keys, cached.
#[derive(Debug)]
struct Jwks {
    url: String,
    client: reqwest::Client,
    max_age: Duration,
    min_refresh: Duration,
    /// The keys held; never locked across an await.
    state: parking_lot::Mutex<JwksState>,
    /// Held while fetching, so that one fetch runs at a time; tokens with known keys do
    /// not wait for it.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct JwksState {
    keys: Arc<Vec<(Option<String>, DecodingKey)>>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
}

impl Jwks {
    fn new(url: &str, config: &JwtConfig) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("jwks_url {url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err(format!("jwks_url {url:?} must be http(s)"));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.jwks_timeout_ms.max(1)))
            .build()
            .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
        Ok(Self {
            url: url.to_owned(),
            client,
            max_age: Duration::from_secs(config.jwks_cache_secs),
            min_refresh: Duration::from_secs(config.jwks_min_refresh_secs),
            state: parking_lot::Mutex::new(JwksState::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The keys to try for a token with key id `kid`: that key, or (without a `kid`) all.
    async fn keys_for(
        &self,
        kid: Option<&str>,
    ) -> Result<Vec<(Option<String>, DecodingKey)>, AuthError> {
        if let Some(keys) = self.usable(kid) {
            return Ok(keys);
        }
        // Stale, or a key we do not hold: fetch, one caller at a time. Whoever waited
        // checks again first, since the fetch it waited for may have brought the key.
        let _fetching = self.fetching.lock().await;
        if let Some(keys) = self.usable(kid) {
            return Ok(keys);
        }
        let may_fetch = {
            let mut state = self.state.lock();
            let may = state
                .attempted
                .is_none_or(|t| t.elapsed() >= self.min_refresh);
            if may {
                state.attempted = Some(Instant::now());
            }
            may
        };
        if may_fetch {
            match self.fetch().await {
                Ok(keys) => {
                    let mut state = self.state.lock();
                    state.keys = Arc::new(keys);
                    state.fetched = Some(Instant::now());
                }
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed; keeping the cached keys");
                }
            }
        }
        let keys = self.matching(kid);
        if keys.is_empty() {
            return Err(AuthError::InvalidToken(match kid {
                Some(k) => format!("unknown key id {k:?}"),
                None => "no signing keys are available for this domain".to_owned(),
            }));
        }
        Ok(keys)
    }

    /// The matching keys, if the cache is fresh and holds them.
    fn usable(&self, kid: Option<&str>) -> Option<Vec<(Option<String>, DecodingKey)>> {
        let fresh = self
            .state
            .lock()
            .fetched
            .is_some_and(|t| t.elapsed() < self.max_age);
        let keys = self.matching(kid);
        (fresh && !keys.is_empty()).then_some(keys)
    }

    /// The held keys for `kid` (all of them without one).
    fn matching(&self, kid: Option<&str>) -> Vec<(Option<String>, DecodingKey)> {
        self.state
            .lock()
            .keys
            .iter()
            .filter(|(id, _)| kid.is_none() || id.as_deref() == kid)
            .cloned()
            .collect()
    }

    async fn fetch(&self) -> Result<Vec<(Option<String>, DecodingKey)>, String> {
        let mut response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        // A key set is a few KiB; a larger answer is not one, and is not read into memory.
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let keys: Vec<_> = set
            .keys
            .iter()
            .filter(|jwk| jwk.is_supported())
            .filter_map(|jwk| {
                DecodingKey::from_jwk(jwk)
                    .ok()
                    .map(|k| (jwk.common.key_id.clone(), k))
            })
            .collect();
        tracing::debug!(url = %self.url, keys = keys.len(), "fetched JWKS");
        Ok(keys)
    }
}
