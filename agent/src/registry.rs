//! Private registry credentials: a file on the host in Docker's `config.json` format
//! (`{"auths": {"registry.example.com": {"auth": "<base64 of user:password>"}}}`, or
//! `username` and `password`, or `identitytoken`, per registry), a regular file (not a
//! symlink) that only its owner may read (mode 0600). It is read at each pull; the credentials
//! of the image's registry go to the local Docker Engine with that pull and nowhere else: never
//! to the controller, never into an event, a log line or an error message.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;

/// The credentials of one registry, for one pull (`crate::docker` hands them to the Engine).
/// Its `Debug` shows which fields are set, never their values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub registry: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub identitytoken: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("registry", &self.registry)
            .field("username", &self.username.as_ref().map(|_| "<set>"))
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field(
                "identitytoken",
                &self.identitytoken.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

/// A credentials file larger than this is refused unread.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why the credentials file cannot be used. No variant holds a credential.
#[derive(Debug, thiserror::Error)]
pub enum RegistryAuthError {
    #[error("{path}: is a symlink; registry credentials must be a regular file (mode 0600)")]
    Symlink { path: String },
    #[error("{path}: is not a regular file")]
    NotAFile { path: String },
    #[error(
        "{path}: mode {mode:o} lets group or others read the registry credentials; `chmod 600 {path}`"
    )]
    Open { path: String, mode: u32 },
    #[error("{path}: larger than {MAX_FILE_BYTES} bytes; is it the right file?")]
    TooLarge { path: String },
    #[error("{path}: cannot be read: {error}")]
    Unreadable { path: String, error: String },
    #[error("{path}: not Docker's config.json format: {why}")]
    Malformed { path: String, why: String },
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The registry an image reference pulls from, as Docker decides it: the first path
/// component when it has a `.` or a `:` or is `localhost`, else Docker Hub (`docker.io`).
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// A key of `auths` as a bare registry host: without a scheme or a path, and Docker Hub's
/// several names as `docker.io`.
fn normalize(key: &str) -> String {
    let key = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        other => other.to_ascii_lowercase(),
    }
}

/// The credentials for `registry` in a config.json's text, if it names the registry. Pure.
/// `path` is only for the error message.
pub fn credentials_in(
    text: &str,
    registry: &str,
    path: &str,
) -> Result<Option<Credentials>, RegistryAuthError> {
    let malformed = |why: String| RegistryAuthError::Malformed {
        path: path.to_string(),
        why,
    };
    // serde_json's message names the line and column, never the value.
    let file: ConfigFile = serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
    let wanted = normalize(registry);
    let Some((key, entry)) = file.auths.iter().find(|(k, _)| normalize(k) == wanted) else {
        return Ok(None);
    };
    let (mut username, mut password) = (entry.username.clone(), entry.password.clone());
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                malformed(format!("auths.{key:?}.auth is not base64 of user:password"))
            })?;
        let (u, p) = decoded.split_once(':').ok_or_else(|| {
            malformed(format!("auths.{key:?}.auth is not base64 of user:password"))
        })?;
        username = Some(u.to_string());
        password = Some(p.to_string());
    }
    if username.is_none() && entry.identitytoken.is_none() {
        return Err(malformed(format!(
            "auths.{key:?} has no auth, username/password or identitytoken"
        )));
    }
    Ok(Some(Credentials {
        registry: registry.to_string(),
        username,
        password,
        identitytoken: entry.identitytoken.clone(),
    }))
}

/// The credentials for `image`'s registry from the file at `path`: `None` when there is no
/// file or it does not name that registry (the pull goes without credentials). A file that is
/// a symlink, readable by others, too large or malformed is an error naming the fix.
pub fn for_image(path: &Path, image: &str) -> Result<Option<Credentials>, RegistryAuthError> {
    let shown = path.display().to_string();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RegistryAuthError::Unreadable {
                path: shown,
                error: e.to_string(),
            });
        }
    };
    if meta.file_type().is_symlink() {
        return Err(RegistryAuthError::Symlink { path: shown });
    }
    if !meta.is_file() {
        return Err(RegistryAuthError::NotAFile { path: shown });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(RegistryAuthError::Open { path: shown, mode });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(RegistryAuthError::TooLarge { path: shown });
    }
    let text = std::fs::read_to_string(path).map_err(|e| RegistryAuthError::Unreadable {
        path: shown.clone(),
        error: e.to_string(),
    })?;
    credentials_in(&text, registry_of(image), &shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_of_an_image_is_docker_s_rule() {
        assert_eq!(
            registry_of("registry.example.com/acme/api:v1"),
            "registry.example.com"
        );
        assert_eq!(registry_of("127.0.0.1:5000/api:v1"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/api:v1"), "localhost");
        assert_eq!(registry_of("acme/api:v1"), "docker.io");
        assert_eq!(registry_of("api:v1"), "docker.io");
    }

    #[test]
    fn credentials_come_from_auth_or_username_and_password_per_registry() {
        let auth = base64::engine::general_purpose::STANDARD.encode("ci:s3cret:with-colon");
        let text = format!(
            r#"{{"auths": {{
                "https://registry.example.com/v1/": {{"auth": "{auth}"}},
                "https://index.docker.io/v1/": {{"username": "hub", "password": "pw"}},
                "token.example.com": {{"identitytoken": "tok"}}
            }}}}"#
        );
        let c = credentials_in(&text, "registry.example.com", "f")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_deref(), c.password.as_deref()),
            (Some("ci"), Some("s3cret:with-colon"))
        );
        assert_eq!(c.registry, "registry.example.com");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("<set>"),
            "{shown}"
        );
        let c = credentials_in(&text, "docker.io", "f").unwrap().unwrap();
        assert_eq!(c.username.as_deref(), Some("hub"));
        let c = credentials_in(&text, "token.example.com", "f")
            .unwrap()
            .unwrap();
        assert_eq!(c.identitytoken.as_deref(), Some("tok"));
        assert!(
            credentials_in(&text, "other.example.com", "f")
                .unwrap()
                .is_none()
        );
        assert!(
            credentials_in(r#"{"credsStore": "x"}"#, "docker.io", "f")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_malformed_file_is_named_and_no_secret_is_echoed() {
        for text in [
            r#"{"auths": {"r.example.com": {"auth": "not base64 s3cret"}}}"#,
            r#"{"auths": {"r.example.com": {"auth": "czNjcmV0"}}}"#,
            r#"{"auths": {"r.example.com": {"email": "a@b"}}}"#,
            r#"{"auths": {"r.example.com": {"auth": "s3cret""#,
        ] {
            let err = credentials_in(text, "r.example.com", "/etc/drover/registry-auth.json")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("/etc/drover/registry-auth.json: "), "{err}");
            assert!(
                !err.contains("s3cret") && !err.contains("czNjcmV0"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_file_must_be_private_regular_and_not_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("auth.json");
        let image = "registry.example.com/api:v1";
        assert!(
            for_image(&path, image).unwrap().is_none(),
            "no file: no credentials"
        );
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p");
        std::fs::write(
            &path,
            format!(r#"{{"auths": {{"registry.example.com": {{"auth": "{auth}"}}}}}}"#),
        )
        .unwrap();
        let set = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        set(0o644).unwrap();
        let err = for_image(&path, image).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        set(0o600).unwrap();
        assert_eq!(
            for_image(&path, image)
                .unwrap()
                .unwrap()
                .username
                .as_deref(),
            Some("u")
        );
        let link = tmp.path().join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = for_image(&link, image).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        let err = for_image(tmp.path(), image).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
