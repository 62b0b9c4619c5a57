//! S3-compatible storage for backup files: the only module that talks S3 (through the
//! `object_store` crate). Uploads stream in 8 MiB multipart parts and downloads stream to a
//! `.partial` file, so memory stays bounded whatever the object size.
//!
//! Credentials come from a TOML file that must be private to its owner (mode 0600). The
//! secret key never appears in an error, a `Debug` output or a log line.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use drover_identity::files::{PrivateFileError, read_private_file};

/// Size of one multipart part (S3 wants at least 5 MiB for all but the last).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight at once during an upload.
const UPLOAD_CONCURRENCY: usize = 2;
/// Size of the local read buffer.
const CHUNK: usize = 1024 * 1024;

/// Where backups go: an S3-compatible endpoint, bucket and key prefix.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct S3Config {
    /// `https://...`; plain `http://` only to a loopback host.
    pub endpoint: String,
    pub bucket: String,
    /// Put in front of every key, joined with `/` (`drover/prod` + `db/x` = `drover/prod/db/x`).
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// TOML with `access_key_id` and `secret_access_key`, mode 0600.
    pub credentials_file: PathBuf,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

/// Why an S3 operation failed: the operation, the bucket and key, the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    #[error("S3 endpoint {endpoint:?} is not usable: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("S3 credentials file {path}: {reason}")]
    CredentialsFile { path: PathBuf, reason: String },
    #[error(
        "S3 credentials file {path} is readable by group or others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    CredentialsMode { path: PathBuf, mode: u32 },
    #[error(
        "{op} s3://{bucket}/{key} failed: S3 refused the credentials in {file} ({detail}): check access_key_id and secret_access_key there, and that the key may use this bucket"
    )]
    Credentials {
        op: &'static str,
        bucket: String,
        key: String,
        file: PathBuf,
        detail: String,
    },
    #[error(
        "{op} s3://{bucket}/{key} failed: the bucket {bucket:?} does not exist at {endpoint}: create it, or fix `bucket` in the S3 configuration"
    )]
    NoBucket {
        op: &'static str,
        bucket: String,
        key: String,
        endpoint: String,
    },
    #[error("{op} s3://{bucket}/{key} failed: no such object")]
    NotFound {
        op: &'static str,
        bucket: String,
        key: String,
    },
    #[error(
        "{op} s3://{bucket}/{key} failed: the endpoint {endpoint} cannot be reached ({detail}): check `endpoint` and the network"
    )]
    Unreachable {
        op: &'static str,
        bucket: String,
        key: String,
        endpoint: String,
        detail: String,
    },
    #[error("{op} s3://{bucket}/{key} failed: {path}: {source}")]
    Local {
        op: &'static str,
        bucket: String,
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} s3://{bucket}/{key} failed: {detail}")]
    Other {
        op: &'static str,
        bucket: String,
        key: String,
        detail: String,
    },
}

/// The credentials file's content. `Debug` leaves the secret out.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    access_key_id: String,
    secret_access_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// An open S3 bucket (no request is made until an operation runs).
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    endpoint: String,
    bucket: String,
    /// The configured prefix without slashes at either end; empty for none.
    prefix: String,
    credentials_file: PathBuf,
}

/// The store holds the secret (and its own `Debug` might show it): only the where is shown.
impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("credentials_file", &self.credentials_file)
            .finish_non_exhaustive()
    }
}

/// Checks an endpoint URL: `https://` anywhere, `http://` only to a loopback host (a secret's
/// signature and every backup would otherwise cross the network in the clear).
pub fn check_endpoint(endpoint: &str) -> Result<(), EndpointError> {
    if let Some(rest) = endpoint.strip_prefix("https://") {
        if host_of(rest).is_empty() {
            return Err(EndpointError::NoHost);
        }
        return Ok(());
    }
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err(EndpointError::Scheme);
    };
    let host = host_of(rest);
    if drover_identity::tls::is_loopback_host(host) {
        Ok(())
    } else {
        Err(EndpointError::PlainHttp(host.to_string()))
    }
}

/// An endpoint URL [`check_endpoint`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("the URL has no host")]
    NoHost,
    #[error("the URL must start with https:// (or http:// for a loopback address)")]
    Scheme,
    #[error(
        "plain http:// is only allowed to a loopback address (127.0.0.0/8, ::1, localhost), \
         not {0:?}: use https://"
    )]
    PlainHttp(String),
}

/// The host part of `host[:port][/path]`, brackets kept for IPv6.
fn host_of(rest: &str) -> &str {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map(|end| &authority[..=end])
            .unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or("")
}

/// The secret access key of a credentials file, for the agent's redactor (`redact`).
pub fn secret_key_of(path: &Path) -> Result<String, ObjectStoreError> {
    read_credentials(path).map(|c| c.secret_access_key)
}

/// Reads and checks the credentials file.
fn read_credentials(path: &Path) -> Result<Credentials, ObjectStoreError> {
    let file_error = |reason: String| ObjectStoreError::CredentialsFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = read_private_file(path).map_err(|e| match e {
        PrivateFileError::Missing => file_error("the file does not exist".to_string()),
        PrivateFileError::Unreadable(e) => file_error(format!("cannot read it: {e}")),
        PrivateFileError::Open { mode } => ObjectStoreError::CredentialsMode {
            path: path.to_path_buf(),
            mode,
        },
    })?;
    // toml's full error quotes the offending line, which may hold the secret: only its message.
    let creds: Credentials = toml::from_str(&text).map_err(|e| {
        file_error(format!(
            "not valid (want access_key_id and secret_access_key): {}",
            e.message()
        ))
    })?;
    if creds.access_key_id.trim().is_empty() || creds.secret_access_key.trim().is_empty() {
        return Err(file_error(
            "access_key_id and secret_access_key must not be empty".to_string(),
        ));
    }
    Ok(creds)
}

/// Joins the configured prefix and a key with one `/`.
fn join_key(prefix: &str, key: &str) -> String {
    let key = key.trim_start_matches('/');
    if prefix.is_empty() {
        key.to_string()
    } else if key.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}/{key}")
    }
}

impl Remote {
    /// Checks the configuration and reads the credentials; makes no request.
    pub fn open(cfg: &S3Config) -> Result<Remote, ObjectStoreError> {
        let endpoint = cfg.endpoint.trim_end_matches('/').to_string();
        check_endpoint(&endpoint).map_err(|reason| ObjectStoreError::Endpoint {
            endpoint: endpoint.clone(),
            reason: reason.to_string(),
        })?;
        if cfg.bucket.is_empty() || cfg.bucket.contains('/') {
            return Err(ObjectStoreError::Endpoint {
                endpoint: endpoint.clone(),
                reason: format!("{:?} is not a bucket name", cfg.bucket),
            });
        }
        let creds = read_credentials(&cfg.credentials_file)?;
        let options = ClientOptions::new()
            .with_allow_http(endpoint.starts_with("http://"))
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(300));
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(60),
            ..RetryConfig::default()
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&creds.access_key_id)
            .with_secret_access_key(&creds.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(|e| ObjectStoreError::Endpoint {
                endpoint: endpoint.clone(),
                // The builder's errors name options, never their values.
                reason: e.to_string(),
            })?;
        Ok(Remote {
            store: Arc::new(store),
            endpoint,
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.trim_matches('/').to_string(),
            credentials_file: cfg.credentials_file.clone(),
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        ObjectPath::from(join_key(&self.prefix, key))
    }

    /// Translates a failure of `op` on `key` into a cause and a fix.
    fn error(&self, op: &'static str, key: &str, err: object_store::Error) -> ObjectStoreError {
        let detail = drover_model::error::chain(&err);
        let key = join_key(&self.prefix, key);
        let bucket = self.bucket.clone();
        let refused = [
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "AccessDenied",
        ]
        .iter()
        .find(|code| detail.contains(*code))
        .map(|code| code.to_string());
        match &err {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => ObjectStoreError::Credentials {
                op,
                bucket,
                key,
                file: self.credentials_file.clone(),
                detail: refused.unwrap_or_else(|| "403/401".to_string()),
            },
            _ if refused.is_some() => ObjectStoreError::Credentials {
                op,
                bucket,
                key,
                file: self.credentials_file.clone(),
                detail: refused.unwrap_or_default(),
            },
            _ if detail.contains("NoSuchBucket") => ObjectStoreError::NoBucket {
                op,
                bucket,
                key,
                endpoint: self.endpoint.clone(),
            },
            object_store::Error::NotFound { .. } => ObjectStoreError::NotFound { op, bucket, key },
            _ if is_unreachable(&detail) => ObjectStoreError::Unreachable {
                op,
                bucket,
                key,
                endpoint: self.endpoint.clone(),
                detail,
            },
            _ => ObjectStoreError::Other {
                op,
                bucket,
                key,
                detail,
            },
        }
    }

    fn local(
        &self,
        op: &'static str,
        key: &str,
        path: &Path,
        source: std::io::Error,
    ) -> ObjectStoreError {
        ObjectStoreError::Local {
            op,
            bucket: self.bucket.clone(),
            key: join_key(&self.prefix, key),
            path: path.to_path_buf(),
            source,
        }
    }

    /// Uploads the file at `local` to `key` (under the configured prefix), streamed in 8 MiB
    /// multipart parts; `progress` hears the bytes handed to the upload so far. A failed
    /// multipart upload is aborted.
    pub async fn upload_file(
        &self,
        local: &Path,
        key: &str,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), ObjectStoreError> {
        const OP: &str = "uploading";
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|e| self.local(OP, key, local, e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| self.local(OP, key, local, e))?
            .len();
        let path = self.path(key);

        // One part is all a small file needs (and S3 wants no multipart for an empty one).
        if size <= PART_SIZE as u64 {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes)
                .await
                .map_err(|e| self.local(OP, key, local, e))?;
            let sent = bytes.len() as u64;
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(|e| self.error(OP, key, e))?;
            progress(sent);
            return Ok(());
        }

        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.error(OP, key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut buf = vec![0u8; CHUNK];
        let mut sent: u64 = 0;
        loop {
            let n = match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(self.local(OP, key, local, e));
                }
            };
            // Bounded memory: wait while the parts in flight are at the limit.
            if let Err(e) = writer.wait_for_capacity(UPLOAD_CONCURRENCY).await {
                let _ = writer.abort().await;
                return Err(self.error(OP, key, e));
            }
            writer.write(&buf[..n]);
            sent += n as u64;
            progress(sent);
        }
        if sent != size {
            let _ = writer.abort().await;
            return Err(self.local(
                OP,
                key,
                local,
                std::io::Error::other(format!(
                    "the file changed during the upload ({size} bytes before, {sent} read)"
                )),
            ));
        }
        writer.finish().await.map_err(|e| self.error(OP, key, e))?;
        Ok(())
    }

    /// Stores a small object (a manifest) in one request.
    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), ObjectStoreError> {
        self.store
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.error("storing", key, e))
    }

    /// Reads the stored object back, streamed: its size and SHA-256 (hex).
    pub async fn read_back(&self, key: &str) -> Result<(u64, String), ObjectStoreError> {
        const OP: &str = "reading back";
        let mut stream = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| self.error(OP, key, e))?
            .into_stream();
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.error(OP, key, e))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
        }
        Ok((size, hex::encode(hasher.finalize())))
    }

    /// Downloads the object to `local` (through `local.partial`, synced, then renamed);
    /// returns its size. On failure no file named `local` is made.
    pub async fn download_to(&self, key: &str, local: &Path) -> Result<u64, ObjectStoreError> {
        const OP: &str = "downloading";
        let mut partial_name = local.as_os_str().to_owned();
        partial_name.push(".partial");
        let partial = PathBuf::from(partial_name);
        let result = self.download_partial(key, &partial).await;
        let size = match result {
            Ok(size) => size,
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
        };
        if let Err(e) = tokio::fs::rename(&partial, local).await {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(self.local(OP, key, local, e));
        }
        Ok(size)
    }

    async fn download_partial(&self, key: &str, partial: &Path) -> Result<u64, ObjectStoreError> {
        const OP: &str = "downloading";
        let mut stream = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| self.error(OP, key, e))?
            .into_stream();
        let mut file = tokio::fs::File::create(partial)
            .await
            .map_err(|e| self.local(OP, key, partial, e))?;
        let mut size: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.error(OP, key, e))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| self.local(OP, key, partial, e))?;
            size += chunk.len() as u64;
        }
        file.flush()
            .await
            .map_err(|e| self.local(OP, key, partial, e))?;
        file.sync_all()
            .await
            .map_err(|e| self.local(OP, key, partial, e))?;
        Ok(size)
    }

    /// Objects under `key_prefix` (a folder: `db` lists `db/...`, not `db2/...`), as (key
    /// without the configured prefix, size), sorted by key.
    pub async fn list(&self, key_prefix: &str) -> Result<Vec<(String, u64)>, ObjectStoreError> {
        let base = self.path(key_prefix);
        let base = (!base.as_ref().is_empty()).then_some(base);
        let mut stream = self.store.list(base.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(|e| self.error("listing", key_prefix, e))?;
            let full = meta.location.as_ref();
            let key = if self.prefix.is_empty() {
                full
            } else {
                full.strip_prefix(self.prefix.as_str())
                    .map(|k| k.trim_start_matches('/'))
                    .unwrap_or(full)
            };
            out.push((key.to_string(), meta.size));
        }
        out.sort();
        Ok(out)
    }

    /// Deletes the object (deleting one that does not exist succeeds, as in S3).
    pub async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        self.store
            .delete(&self.path(key))
            .await
            .map_err(|e| self.error("deleting", key, e))
    }
}

fn is_unreachable(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    [
        "connection refused",
        "error sending request",
        "dns error",
        "timed out",
        "connection reset",
        "tcp connect error",
        "no route to host",
    ]
    .iter()
    .any(|needle| detail.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRET";

    fn creds_file(dir: &Path, mode: u32, text: &str) -> PathBuf {
        let path = dir.join("s3.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn config(endpoint: &str, credentials_file: PathBuf) -> S3Config {
        // As the agent binary does at start: S3 clients may compile in a second provider.
        drover_identity::tls::install_crypto_provider();
        S3Config {
            endpoint: endpoint.to_string(),
            bucket: "backups".to_string(),
            prefix: "/drover/prod/".to_string(),
            region: default_region(),
            credentials_file,
        }
    }

    fn good_creds(dir: &Path) -> PathBuf {
        creds_file(
            dir,
            0o600,
            &format!("access_key_id = \"AKIDTEST\"\nsecret_access_key = \"{SECRET}\"\n"),
        )
    }

    #[test]
    fn endpoints() {
        for ok in [
            "https://s3.example.com",
            "https://s3.example.com:9000/",
            "http://127.0.0.1:9000",
            "http://127.8.9.10",
            "http://localhost:9000/",
            "http://LOCALHOST",
            "http://[::1]:9000",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://10.0.0.5:9000",
            "http://s3.example.com",
            "http://localhost.example.com",
            "http://[::2]:9000",
            "ftp://127.0.0.1",
            "s3.example.com",
            "https://",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
        let err = check_endpoint("http://192.168.1.10:9000")
            .unwrap_err()
            .to_string();
        assert!(err.contains("use https://"), "{err}");
    }

    #[test]
    fn open_refuses_plain_http_off_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config("http://s3.internal:9000", good_creds(dir.path()));
        let err = Remote::open(&cfg).unwrap_err();
        assert!(matches!(err, ObjectStoreError::Endpoint { .. }), "{err:?}");
        assert!(err.to_string().contains("https://"), "{err}");
    }

    #[test]
    fn credentials_file_checks() {
        let dir = tempfile::tempdir().unwrap();
        let https = "https://s3.example.com";

        let path = creds_file(
            dir.path(),
            0o644,
            &format!("access_key_id = \"A\"\nsecret_access_key = \"{SECRET}\"\n"),
        );
        let err = Remote::open(&config(https, path.clone())).unwrap_err();
        assert!(
            matches!(err, ObjectStoreError::CredentialsMode { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("chmod 600"), "{text}");

        let err = Remote::open(&config(https, dir.path().join("missing.toml"))).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");

        // A broken line holding the secret must not be quoted back.
        let path = creds_file(
            dir.path(),
            0o600,
            &format!("access_key_id = \"A\"\nsecret_access_key = {SECRET}\n"),
        );
        let err = Remote::open(&config(https, path)).unwrap_err();
        assert!(
            matches!(err, ObjectStoreError::CredentialsFile { .. }),
            "{err:?}"
        );
        assert!(!err.to_string().contains(SECRET), "{err}");
        assert!(!format!("{err:?}").contains(SECRET), "{err:?}");
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config("https://s3.example.com", good_creds(dir.path()));
        let remote = Remote::open(&cfg).unwrap();
        assert!(!format!("{remote:?}").contains(SECRET));
        let creds = read_credentials(&cfg.credentials_file).unwrap();
        assert!(!format!("{creds:?}").contains(SECRET));

        let refused = remote.error(
            "uploading",
            "db/1.zst",
            object_store::Error::Generic {
                store: "S3",
                source: "Server returned non-2xx status code: 403 Forbidden: <Code>SignatureDoesNotMatch</Code>".into(),
            },
        );
        let text = refused.to_string();
        assert!(text.contains("S3 refused the credentials in"), "{text}");
        assert!(text.contains("s3://backups/drover/prod/db/1.zst"), "{text}");
        assert!(!text.contains(SECRET) && !format!("{refused:?}").contains(SECRET));
    }

    #[test]
    fn keys_join_the_prefix() {
        assert_eq!(join_key("", "db/1"), "db/1");
        assert_eq!(join_key("drover", "/db/1"), "drover/db/1");
        assert_eq!(join_key("drover/prod", ""), "drover/prod");
    }

    #[test]
    fn config_defaults() {
        let cfg: S3Config = toml::from_str(
            "endpoint = \"https://s3.example.com\"\nbucket = \"b\"\ncredentials_file = \"/etc/drover/s3.toml\"\n",
        )
        .unwrap();
        assert_eq!(cfg.region, "us-east-1");
        assert_eq!(cfg.prefix, "");
    }
}
