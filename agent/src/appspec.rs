//! App specs: the TOML that says how an app is deployed (image, roles, env and secrets,
//! volumes, health and smoke checks, migration, drain, watch window, releases kept), parsed
//! and validated with errors that name the file, the key and what is wrong. Pure: no I/O
//! beyond reading the file, so the controller validates at `drover app apply` and the agent
//! again before a deploy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::daemon::{ConfigError, duration_str, parse_toml, read_toml_file};

/// The default tag pattern: `vMAJOR.MINOR.PATCH`.
pub const DEFAULT_VERSION_PATTERN: &str = r"^v\d+\.\d+\.\d+$";

fn default_version_pattern() -> String {
    DEFAULT_VERSION_PATTERN.to_string()
}
fn default_keep() -> u32 {
    3
}
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub name: String,
    /// Image repository; the deployed version is its tag.
    pub image: String,
    #[serde(default = "default_version_pattern")]
    pub version_pattern: String,
    #[serde(default = "default_keep")]
    pub keep_releases: u32,
    #[serde(default = "DrainDefault::drain", with = "duration_str")]
    pub drain_timeout: Duration,
    #[serde(default = "DrainDefault::stop", with = "duration_str")]
    pub stop_timeout: Duration,
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub migrate: Vec<String>,
    #[serde(default)]
    pub pre_deploy_backup: Option<String>,
    /// Backup targets declared with the app (`[[backups]]`, same keys as a target file);
    /// `drover app apply` stores each as a backup target.
    #[serde(default)]
    pub backups: Vec<crate::backup::target::TargetSpec>,
    pub web: Option<WebRole>,
    #[serde(default)]
    pub workers: Vec<WorkerRole>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretRule>,
    #[serde(default)]
    pub health: HealthCheck,
    #[serde(default)]
    pub smoke: Vec<SmokeCheck>,
    #[serde(default)]
    pub watch: Watch,
}

struct DrainDefault;
impl DrainDefault {
    fn drain() -> Duration {
        secs(30)
    }
    fn stop() -> Duration {
        secs(10)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebRole {
    /// The port the app listens on inside its container.
    pub port: u16,
    /// The public address the agent's proxy owns.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerRole {
    pub name: String,
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRule {
    #[serde(default)]
    pub min_length: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub path: String,
    #[serde(with = "duration_str")]
    pub interval: Duration,
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    pub retries: u32,
    #[serde(with = "duration_str")]
    pub start_period: Duration,
}

impl Default for HealthCheck {
    /// Five tries one second apart.
    fn default() -> Self {
        HealthCheck {
            path: "/healthz".into(),
            interval: secs(1),
            timeout: secs(2),
            retries: 5,
            start_period: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeCheck {
    pub path: String,
    #[serde(default = "ok_status")]
    pub status: u16,
    #[serde(default)]
    pub body_contains: Option<String>,
}

fn ok_status() -> u16 {
    200
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Watch {
    #[serde(with = "duration_str")]
    pub window: Duration,
    pub max_5xx_ratio: f64,
    #[serde(with = "duration_str")]
    pub max_p95_latency: Duration,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            window: secs(120),
            max_5xx_ratio: 0.05,
            max_p95_latency: secs(1),
        }
    }
}

/// Values that mean "somebody forgot to fill this in".
pub fn is_placeholder(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    const EXACT: &[&str] = &[
        "",
        "xxx",
        "todo",
        "tbd",
        "changeme",
        "change_me",
        "change-me",
        "secret",
        "password",
        "placeholder",
    ];
    EXACT.contains(&v.as_str())
        || v.contains("change_me")
        || v.contains("changeme")
        || v.contains("change-me")
        || v.chars().all(|c| c == 'x')
        || (v.starts_with('<') && v.ends_with('>'))
}

/// Why a secret on the host is not fit for a deploy; never includes the value itself.
pub fn check_secret(name: &str, value: Option<&str>, rule: &SecretRule) -> Result<(), String> {
    match value {
        None => Err(format!("secret {name} is not set on this host")),
        Some(v) if is_placeholder(v) => Err(format!(
            "secret {name} holds a placeholder value; set the real one"
        )),
        Some(v) if v.chars().count() < rule.min_length => Err(format!(
            "secret {name} is {} characters long; at least {} are required",
            v.chars().count(),
            rule.min_length
        )),
        Some(_) => Ok(()),
    }
}

/// Whether `version` is a valid tag for this app.
pub fn check_version(spec: &AppSpec, version: &str) -> Result<(), String> {
    let re = regex::Regex::new(&spec.version_pattern)
        .map_err(|e| format!("bad version_pattern: {e}"))?;
    if re.is_match(version) {
        Ok(())
    } else {
        Err(format!(
            "version {version:?} does not match {} (e.g. v1.4.2)",
            spec.version_pattern
        ))
    }
}

/// A name for an app or a backup target: 1-63 of a-z, 0-9, '-', '_', starting with a letter.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
}

impl AppSpec {
    pub fn from_file(path: &Path) -> Result<AppSpec, ConfigError> {
        let spec: AppSpec = read_toml_file(path)?;
        spec.validate(&path.display().to_string())?;
        Ok(spec)
    }

    pub fn from_toml(text: &str, source: &str) -> Result<AppSpec, ConfigError> {
        let spec: AppSpec = parse_toml(text, source)?;
        spec.validate(source)?;
        Ok(spec)
    }

    /// Checks everything serde cannot; the error names `source` and the key.
    pub fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: String| ConfigError::Invalid {
            path: source.to_string(),
            key,
            message,
        };
        if !valid_name(&self.name) {
            return Err(bad(
                "name",
                format!(
                    "{:?}: use 1-63 of a-z, 0-9, '-', '_', starting with a letter",
                    self.name
                ),
            ));
        }
        if self.image.is_empty()
            || self.image.contains(char::is_whitespace)
            || self.image.contains('@')
        {
            return Err(bad(
                "image",
                format!("{:?} is not an image repository", self.image),
            ));
        }
        if self
            .image
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'))
        {
            return Err(bad(
                "image",
                "give the repository without a tag: the version is the tag".into(),
            ));
        }
        regex::Regex::new(&self.version_pattern)
            .map_err(|e| bad("version_pattern", e.to_string()))?;
        if self.keep_releases == 0 {
            return Err(bad("keep_releases", "must be at least 1".into()));
        }
        if self.web.is_none() && self.workers.is_empty() {
            return Err(bad(
                "web",
                "an app needs a [web] role or at least one [[workers]]".into(),
            ));
        }
        if let Some(web) = &self.web
            && web.port == 0
        {
            return Err(bad("web.port", "must be a port number (1-65535)".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for w in &self.workers {
            if !valid_name(&w.name) || w.name == "web" || !seen.insert(&w.name) {
                return Err(bad(
                    "workers.name",
                    format!("{:?} is not a valid, unique worker name", w.name),
                ));
            }
            if w.command.is_empty() {
                return Err(bad(
                    "workers.command",
                    format!("worker {} has no command", w.name),
                ));
            }
        }
        for (key, value) in &self.env {
            if self.secrets.contains_key(key) {
                return Err(bad(
                    "env",
                    format!("{key} is declared both in [env] and [secrets]"),
                ));
            }
            if is_placeholder(value) && !value.is_empty() {
                return Err(bad(
                    "env",
                    format!("{key} holds a placeholder value ({value:?})"),
                ));
            }
        }
        for v in &self.volumes {
            let ok = v
                .split_once(':')
                .is_some_and(|(src, dst)| !src.is_empty() && dst.starts_with('/'));
            if !ok {
                return Err(bad(
                    "volumes",
                    format!("{v:?} is not NAME:/path or /host/path:/path"),
                ));
            }
        }
        let h = &self.health;
        if !h.path.starts_with('/') {
            return Err(bad(
                "health.path",
                format!("{:?} must start with /", h.path),
            ));
        }
        if h.retries == 0 || h.interval.is_zero() || h.timeout.is_zero() {
            return Err(bad(
                "health",
                "retries, interval and timeout must be above zero".into(),
            ));
        }
        for s in &self.smoke {
            if !s.path.starts_with('/') {
                return Err(bad("smoke.path", format!("{:?} must start with /", s.path)));
            }
            if !(100..=599).contains(&s.status) {
                return Err(bad(
                    "smoke.status",
                    format!("{} is not an HTTP status", s.status),
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for target in &self.backups {
            target.validate(&format!("{source} [[backups]] {}", target.name))?;
            if !names.insert(&target.name) {
                return Err(bad(
                    "backups.name",
                    format!("backup target {} is declared twice", target.name),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.watch.max_5xx_ratio) {
            return Err(bad(
                "watch.max_5xx_ratio",
                format!(
                    "{} is not a ratio between 0 and 1",
                    self.watch.max_5xx_ratio
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "name = \"api\"\nimage = \"acme/api\"\n[web]\nport = 8000\nlisten = \"127.0.0.1:8080\"\n";

    #[test]
    fn the_example_spec_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/api.toml");
        let spec = AppSpec::from_file(&path).unwrap();
        assert_eq!(spec.name, "api");
        assert_eq!(spec.workers[0].command, ["python", "-m", "bot"]);
        assert_eq!(spec.secrets["SECRET_KEY"].min_length, 32);
        assert_eq!(spec.watch.window, Duration::from_secs(120));
        assert_eq!(spec.smoke[0].body_contains.as_deref(), Some("ok"));
        assert_eq!(spec.backups[0].name, "api-db");
        assert_eq!(spec.backups[0].retention.monthly, 3);
        // What the controller stores for it parses back to the same target.
        let text = toml::to_string(&spec.backups[0]).unwrap();
        let again = crate::backup::target::TargetSpec::from_toml(&text, "stored").unwrap();
        assert_eq!(again, spec.backups[0]);
    }

    #[test]
    fn the_demo_spec_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello.toml");
        let spec = AppSpec::from_file(&path).unwrap();
        assert_eq!(
            (spec.name.as_str(), spec.image.as_str()),
            ("hello", "drover-testapp")
        );
    }

    #[test]
    fn defaults_are_five_health_tries_a_second_apart_and_three_releases() {
        let spec = AppSpec::from_toml(MINIMAL, "m.toml").unwrap();
        assert_eq!(
            (spec.health.retries, spec.health.interval),
            (5, Duration::from_secs(1))
        );
        assert_eq!(spec.keep_releases, 3);
        assert!(check_version(&spec, "v1.2.3").is_ok());
        for bad in ["1.2.3", "v1.2", "latest", "v1.2.3-rc1"] {
            assert!(check_version(&spec, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invalid_specs_name_the_file_and_key() {
        let cases = [
            (
                "name = \"API\"\nimage = \"a\"\n[web]\nport = 1\nlisten = \"127.0.0.1:1\"\n",
                "name",
            ),
            (
                "name = \"a\"\nimage = \"acme/api:v1\"\n[web]\nport = 1\nlisten = \"127.0.0.1:1\"\n",
                "image",
            ),
            ("name = \"a\"\nimage = \"a\"\n", "web"),
            (&format!("{MINIMAL}[env]\nKEY = \"CHANGE_ME\"\n"), "env"),
            (
                &format!("{MINIMAL}[health]\npath = \"healthz\"\n"),
                "health.path",
            ),
            (
                &format!("{MINIMAL}[[smoke]]\npath = \"/s\"\nstatus = 42\n"),
                "smoke.status",
            ),
            (
                &format!("{MINIMAL}[[workers]]\nname = \"web\"\ncommand = [\"x\"]\n"),
                "workers.name",
            ),
            (&format!("volumes = [\"data\"]\n{MINIMAL}"), "volumes"),
            (
                &format!("{MINIMAL}[watch]\nmax_5xx_ratio = 5.0\n"),
                "watch.max_5xx_ratio",
            ),
            (
                &format!("version_pattern = \"(\"\n{MINIMAL}"),
                "version_pattern",
            ),
        ];
        for (text, key) in cases {
            let err = AppSpec::from_toml(text, "app.toml")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("invalid config app.toml: key `"), "{err}");
            assert!(
                err.contains(&format!("`{key}`")),
                "expected key {key}: {err}"
            );
        }
        let err = AppSpec::from_toml(&format!("{MINIMAL}helth = 1\n"), "app.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("app.toml") && err.contains("helth"),
            "unknown keys are refused: {err}"
        );
    }

    #[test]
    fn secrets_are_checked_without_revealing_them() {
        let rule = SecretRule { min_length: 12 };
        assert!(check_secret("K", Some("a-real-long-secret"), &rule).is_ok());
        for (value, why) in [
            (None, "not set"),
            (Some("CHANGE_ME"), "placeholder"),
            (Some("xxxx"), "placeholder"),
            (Some("<your key>"), "placeholder"),
            (Some("short-one"), "9 characters"),
        ] {
            let err = check_secret("K", value, &rule).unwrap_err();
            assert!(err.contains(why), "{value:?}: {err}");
            if let Some(v) = value {
                assert!(!err.contains(v), "the value leaked: {err}");
            }
        }
    }
}
