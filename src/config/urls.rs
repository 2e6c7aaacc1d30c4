//! Connection URLs and environment variables: what is checked, and what is redacted.

use super::*;

/// A URL without its password (`postgres://parlor:…@db/parlor`), for logs and messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        // Only a password is hidden: `postgres://parlor@db` has none to hide.
        Some(at) if rest[..at].contains(':') => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{}{user}:…{}", &url[..scheme_end], &rest[at..])
        }
        _ => url.to_owned(),
    }
}

/// The query parameters of a `broker` URL Parlor honours (the CA that verifies a
/// `rediss://` server).
pub(super) const BROKER_PARAMETERS: &[&str] = &["sslrootcert"];

/// The query parameters of a PostgreSQL `database` URL the driver honours; it would ignore
/// any other (`sslnegotiation`, `channel_binding`, `gssencmode`…) with a warning, which for
/// a security setting means silently connecting without it.
pub(super) const POSTGRES_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The query of `url` as (name, value) pairs, undecoded.
pub(super) fn url_parameters(url: &str) -> impl Iterator<Item = (&str, &str)> {
    url.split_once('?')
        .map_or("", |(_, q)| q.split('#').next().unwrap_or_default())
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// The value of the query parameter `name` of `url`, undecoded.
pub fn url_parameter<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    url_parameters(url)
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Refuses a URL with a query parameter outside `known`: what the connection would not
/// honour must stop the start, not be dropped on the way.
pub(super) fn check_url_parameters(
    key: &str,
    url: &str,
    known: &[&str],
) -> Result<(), ConfigError> {
    for (name, _) in url_parameters(url) {
        let known = known.contains(&name) || (key == "database" && name.starts_with("options["));
        if !known {
            return Err(ConfigError::Invalid(format!(
                "{key}: the URL parameter {name:?} is not supported (supported: {})",
                if key == "database" {
                    POSTGRES_PARAMETERS.join(", ")
                } else {
                    BROKER_PARAMETERS.join(", ")
                }
            )));
        }
    }
    Ok(())
}

/// Top-level keys of [`Config`], as environment variables spell them (lowercased).
pub(super) const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "database",
    "broker",
    "broker_prefix",
    "broker_presence_ttl_secs",
    "broker_position_check_ms",
    "log_format",
    "log_level",
    "shutdown_timeout_ms",
    "limits",
    "store",
    "auth",
    "ai",
    "trusted_proxies",
    "web",
    "domains",
];

/// True when `key` (a `PARLOR_` variable without its prefix) sets a configuration key.
pub(super) fn is_config_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let top = key.split("__").next().unwrap_or_default();
    TOP_LEVEL_KEYS.contains(&top)
}

/// A `PARLOR_*` variable that names no configuration key and was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredVar {
    /// The variable.
    pub name: String,
    /// The configuration variable it is probably a typo of (`PARLOR_LISTEN` for
    /// `PARLOR_LISTN`).
    pub suggestion: Option<String>,
}

/// `PARLOR_*` variables that are not configuration and were ignored (for a start-up warning).
pub fn ignored_env_vars() -> Vec<IgnoredVar> {
    std::env::vars()
        .filter_map(|(name, _)| {
            let key = name.strip_prefix("PARLOR_")?;
            let lower = key.to_ascii_lowercase();
            if is_config_key(key) || lower.starts_with("test_") || lower == "config" {
                return None;
            }
            let mut parts = lower.split("__");
            let top = parts.next().unwrap_or_default();
            let rest: Vec<&str> = parts.collect();
            let suggestion = explain::closest(top, TOP_LEVEL_KEYS).map(|close| {
                let mut var = format!("PARLOR_{}", close.to_ascii_uppercase());
                for part in &rest {
                    var.push_str("__");
                    var.push_str(&part.to_ascii_uppercase());
                }
                var
            });
            Some(IgnoredVar { name, suggestion })
        })
        .collect()
}
