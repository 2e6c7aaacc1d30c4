//! Uploaded files: where their bytes are kept (`[files]`), the limits every domain starts
//! from, and a domain's own tighter limits (`[domains.files]`).

use super::*;

/// The default `files.store`: a folder beside the working directory.
pub const DEFAULT_FILE_STORE: &str = "./parlor-files";

/// Where uploaded files are kept, and the limits every domain starts from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Where the bytes go: a folder (`./parlor-files`, relative to the working directory, or
    /// `file:///var/lib/parlor/files`), created on the first upload; or `s3://BUCKET` /
    /// `s3://BUCKET/PREFIX` for S3, R2 or any S3-compatible store (the bucket must exist).
    pub store: String,
    /// S3: the endpoint of an S3-compatible store (`https://ACCOUNT.r2.cloudflarestorage.com`,
    /// `http://127.0.0.1:9000`); unset, AWS's (or `AWS_ENDPOINT_URL`).
    pub s3_endpoint: Option<String>,
    /// S3: the region (`us-east-1`; R2 takes `auto`); unset, `AWS_REGION` or `us-east-1`.
    pub s3_region: Option<String>,
    /// S3: the access key id; unset, `AWS_ACCESS_KEY_ID` (or the instance's role).
    pub s3_access_key_id: Option<String>,
    /// S3: the secret access key; unset, `AWS_SECRET_ACCESS_KEY`.
    pub s3_secret_access_key: Option<Secret>,
    /// S3: whether an `http://` endpoint may be used (a store on this machine or network).
    pub allow_http: bool,
    /// Largest file, in bytes; a domain may set less, never more. Also the size of the
    /// largest request `POST /api/files` reads (plus 64 KiB for the form around the file).
    pub max_bytes: u64,
    /// Most attachments on one message.
    pub max_per_message: usize,
    /// Most files one room may hold.
    pub max_per_room: u64,
    /// Content types that may be uploaded, as decided from the bytes (`image/png`…). An
    /// upload of any other type is refused.
    pub allowed_types: Vec<String>,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            store: DEFAULT_FILE_STORE.to_owned(),
            s3_endpoint: None,
            s3_region: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            allow_http: false,
            max_bytes: 10 * 1024 * 1024,
            max_per_message: 10,
            max_per_room: 1000,
            allowed_types: [
                "image/png",
                "image/jpeg",
                "image/gif",
                "image/webp",
                "application/pdf",
                "text/plain",
            ]
            .map(str::to_owned)
            .to_vec(),
        }
    }
}

/// Where `files.store` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileStoreLocation {
    /// A folder of this machine (relative paths are relative to the working directory).
    Local(PathBuf),
    /// An S3 bucket, and a prefix inside it (empty: none).
    S3 {
        /// The bucket.
        bucket: String,
        /// Keys start with it (no slash at either end).
        prefix: String,
    },
}

impl FilesConfig {
    /// Where `store` points, or why it cannot be used.
    pub fn location(&self) -> Result<FileStoreLocation, String> {
        let store = self.store.trim();
        let bad = || {
            format!(
                "files.store must be a folder (./parlor-files, file:///var/lib/parlor/files) or \
                 s3://BUCKET[/PREFIX] (got {store:?})"
            )
        };
        if let Some(rest) = store.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                })
                && !bucket.starts_with(['-', '.'])
                && !bucket.ends_with(['-', '.']);
            if !valid_bucket {
                return Err(format!(
                    "files.store: {bucket:?} is not an S3 bucket name (3-63 characters of a-z \
                     0-9 . -)"
                ));
            }
            let prefix = prefix.trim_matches('/');
            if !prefix.is_empty()
                && prefix
                    .split('/')
                    .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(format!(
                    "files.store: the prefix {prefix:?} is not a key prefix"
                ));
            }
            return Ok(FileStoreLocation::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        let path = match store.strip_prefix("file://") {
            // file:///var/lib/parlor/files, or file://localhost/var/…
            Some(rest) => rest.strip_prefix("localhost").unwrap_or(rest),
            None if store.contains("://") => return Err(bad()),
            None => store,
        };
        if path.is_empty() || path.contains('\0') {
            return Err(bad());
        }
        Ok(FileStoreLocation::Local(PathBuf::from(path)))
    }

    /// The limits of a domain whose own settings are `domain`: each unset value is the
    /// server's, and no size is above the server's `max_bytes`.
    pub fn limits_for(&self, domain: &DomainFiles) -> FileLimits {
        FileLimits {
            max_bytes: domain
                .max_bytes
                .map_or(self.max_bytes, |m| m.min(self.max_bytes)),
            max_per_message: domain.max_per_message.unwrap_or(self.max_per_message),
            max_per_room: domain.max_per_room.unwrap_or(self.max_per_room),
            allowed_types: domain
                .allowed_types
                .clone()
                .unwrap_or_else(|| self.allowed_types.clone()),
        }
    }

    /// Checks the section (and the domains' `files`) once at start.
    pub(super) fn validate(&self, domains: &[DomainConfig]) -> Result<(), ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        self.location().map_err(invalid)?;
        if self.max_bytes == 0 || self.max_per_message == 0 || self.max_per_room == 0 {
            return Err(invalid(
                "files.max_bytes, files.max_per_message and files.max_per_room must be greater \
                 than 0"
                    .to_owned(),
            ));
        }
        check_types("files.allowed_types", &self.allowed_types).map_err(invalid)?;
        if let Some(endpoint) = &self.s3_endpoint {
            let http = endpoint.starts_with("http://");
            if !http && !endpoint.starts_with("https://") {
                return Err(invalid(format!(
                    "files.s3_endpoint must be an http:// or https:// URL (got {endpoint:?})"
                )));
            }
            if http && !self.allow_http {
                return Err(invalid(
                    "files.s3_endpoint is http://: set files.allow_http = true to use a store \
                     without TLS"
                        .to_owned(),
                ));
            }
        }
        for d in domains {
            d.files
                .check(self)
                .map_err(|e| invalid(format!("domains.{}.files: {e}", d.id)))?;
        }
        Ok(())
    }
}

/// Content types written as `type/subtype`, lowercase.
fn check_types(key: &str, types: &[String]) -> Result<(), String> {
    for t in types {
        let valid = t.split_once('/').is_some_and(|(a, b)| {
            let part = |p: &str| {
                !p.is_empty()
                    && p.bytes().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(&c)
                    })
            };
            part(a) && part(b)
        });
        if !valid {
            return Err(format!(
                "{key}: {t:?} is not a content type (write e.g. \"image/png\", lowercase)"
            ));
        }
    }
    Ok(())
}

/// A domain's own file limits; unset values are `[files]`'s.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DomainFiles {
    /// Largest file, in bytes, at most `files.max_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Most attachments on one message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_message: Option<usize>,
    /// Most files one room may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_room: Option<u64>,
    /// Content types that may be uploaded; empty: no uploads in this domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_types: Option<Vec<String>>,
}

impl DomainFiles {
    /// True when nothing is set.
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }

    /// Why these settings cannot be used under `server`'s, if they cannot.
    pub fn check(&self, server: &FilesConfig) -> Result<(), String> {
        if let Some(max) = self.max_bytes
            && (max == 0 || max > server.max_bytes)
        {
            return Err(format!(
                "max_bytes must be between 1 and files.max_bytes ({})",
                server.max_bytes
            ));
        }
        if self.max_per_message == Some(0) || self.max_per_room == Some(0) {
            return Err("max_per_message and max_per_room must be greater than 0".to_owned());
        }
        if let Some(types) = &self.allowed_types {
            check_types("allowed_types", types)?;
        }
        Ok(())
    }
}

/// The file limits in force for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLimits {
    /// Largest file, in bytes.
    pub max_bytes: u64,
    /// Most attachments on one message.
    pub max_per_message: usize,
    /// Most files one room may hold.
    pub max_per_room: u64,
    /// Content types that may be uploaded.
    pub allowed_types: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(store: &str) -> Result<FileStoreLocation, String> {
        FilesConfig {
            store: store.to_owned(),
            ..FilesConfig::default()
        }
        .location()
    }

    #[test]
    fn the_store_is_a_folder_or_a_bucket() {
        assert_eq!(
            at("./parlor-files"),
            Ok(FileStoreLocation::Local("./parlor-files".into()))
        );
        assert_eq!(
            at("file:///var/lib/parlor/files"),
            Ok(FileStoreLocation::Local("/var/lib/parlor/files".into()))
        );
        assert_eq!(
            at("s3://my-bucket/chat/files/"),
            Ok(FileStoreLocation::S3 {
                bucket: "my-bucket".into(),
                prefix: "chat/files".into()
            })
        );
        assert_eq!(
            at("s3://my-bucket"),
            Ok(FileStoreLocation::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            })
        );
        for bad in [
            "",
            "s3://",
            "s3://Bad_Bucket",
            "s3://b",
            "s3://bucket/a//b",
            "s3://bucket/../up",
            "gs://bucket",
            "http://example.com/files",
            "file://",
        ] {
            assert!(at(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn a_domain_tightens_the_server_limits_and_never_loosens_them() {
        let server = FilesConfig::default();
        let domain = DomainFiles {
            max_bytes: Some(1024),
            allowed_types: Some(vec!["image/png".into()]),
            ..DomainFiles::default()
        };
        assert!(domain.check(&server).is_ok());
        let limits = server.limits_for(&domain);
        assert_eq!(limits.max_bytes, 1024);
        assert_eq!(limits.max_per_message, server.max_per_message);
        assert_eq!(limits.allowed_types, ["image/png"]);
        let greedy = DomainFiles {
            max_bytes: Some(server.max_bytes + 1),
            ..DomainFiles::default()
        };
        assert!(greedy.check(&server).is_err());
        assert_eq!(server.limits_for(&greedy).max_bytes, server.max_bytes);
        let typo = DomainFiles {
            allowed_types: Some(vec!["PNG".into()]),
            ..DomainFiles::default()
        };
        assert!(typo.check(&server).is_err());
    }

    #[test]
    fn an_http_endpoint_needs_allow_http() {
        let mut c = FilesConfig {
            store: "s3://bucket".into(),
            s3_endpoint: Some("http://127.0.0.1:9000".into()),
            ..FilesConfig::default()
        };
        assert!(c.validate(&[]).is_err());
        c.allow_http = true;
        assert!(c.validate(&[]).is_ok());
        c.s3_endpoint = Some("127.0.0.1:9000".into());
        assert!(c.validate(&[]).is_err());
    }
}
