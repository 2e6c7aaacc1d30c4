//! Server API keys: what a domain's back end presents (`Authorization: Bearer pk_…`) to
//! mint connection tokens and publish into rooms; admin keys (`ak_…`) for the admin API.
//!
//! Parlor stores only a key's SHA-256 (`sha256:HEX` in `domains.server_keys`), so the
//! configuration never holds a usable key. A domain lists several while keys rotate: add
//! the new one, move the back end to it, then remove the old one. Keys carry 244 random
//! bits, so a plain hash is enough: there is nothing to guess from it.

use sha2::{Digest, Sha256};

/// Every server key starts with this.
pub const KEY_PREFIX: &str = "pk_";
/// Every admin key starts with this.
pub const ADMIN_KEY_PREFIX: &str = "ak_";

/// A key's hash, as looked up.
pub type KeyHash = [u8; 32];

/// A new random server key and the `domains.server_keys` entry that accepts it.
pub fn generate() -> (String, String) {
    generate_with(KEY_PREFIX)
}

/// A new random key starting with `prefix` and the `sha256:HEX` entry that accepts it.
pub fn generate_with(prefix: &str) -> (String, String) {
    let key = format!("{prefix}{}", random_hex());
    let entry = entry_for(&key);
    (key, entry)
}

/// 64 random hex digits (244 random bits: two v4 UUIDs).
pub fn random_hex() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The configuration entry (`sha256:HEX`) that accepts `key`.
pub fn entry_for(key: &str) -> String {
    let mut out = String::from("sha256:");
    for b in hash(key) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The hash of a presented key.
pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Parses a `sha256:HEX` configuration entry.
pub fn parse_entry(entry: &str) -> Result<KeyHash, String> {
    let hex = entry.strip_prefix("sha256:").ok_or_else(|| {
        format!("server key entry {entry:?} must be sha256:HEX (see `parlor key`)")
    })?;
    if hex.len() != 64 {
        return Err(format!(
            "server key entry {entry:?} must hold 64 hex digits"
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("server key entry {entry:?} is not hexadecimal"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_matches_its_entry_and_nothing_else() {
        let (key, entry) = generate();
        assert!(key.starts_with(KEY_PREFIX) && key.len() == 67);
        assert_eq!(parse_entry(&entry), Ok(hash(&key)));
        let (other, _) = generate();
        assert_ne!(hash(&other), hash(&key));
        assert!(parse_entry("md5:abcd").is_err());
        assert!(parse_entry("sha256:abcd").is_err());
        assert!(parse_entry(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }
}
