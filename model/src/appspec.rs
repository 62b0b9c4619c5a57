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

use crate::config::{
    ConfigError, check_count, check_duration, duration_str, parse_toml, read_toml_file,
};
use crate::names::{check_name, valid_name};

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
    /// Host directories in `volumes` (`/srv/data:/data`) give the container the host's files
    /// (`/`, the Docker socket: the whole host). Refused unless this says yes.
    #[serde(default)]
    pub allow_host_mounts: bool,
    #[serde(default)]
    pub networks: Vec<String>,
    /// `networks = ["host"]` puts the container in the host's network namespace (no isolation,
    /// every host port). Refused unless this says yes, and never for a web role (the proxy
    /// forwards to a published port, which host networking does not have).
    #[serde(default)]
    pub allow_host_network: bool,
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
    /// How a fleet release of this app proceeds unless the operator says otherwise.
    #[serde(default)]
    pub release: crate::waves::ReleaseDefaults,
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

/// A smoke check, run against the new release before it gets traffic: an HTTP `GET path`
/// (expecting `status`, default 200, and `body_contains`), or, with `websocket_send`, a
/// WebSocket on `path` that is sent a text message and must answer (containing
/// `websocket_expect`, when given).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeCheck {
    pub path: String,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub body_contains: Option<String>,
    #[serde(default)]
    pub websocket_send: Option<String>,
    #[serde(default)]
    pub websocket_expect: Option<String>,
}

/// What a smoke check does, once its spec is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmokeProbe<'a> {
    Http {
        status: u16,
        body_contains: Option<&'a str>,
    },
    WebSocket {
        send: &'a str,
        expect: Option<&'a str>,
    },
}

impl SmokeCheck {
    pub fn probe(&self) -> SmokeProbe<'_> {
        match &self.websocket_send {
            Some(send) => SmokeProbe::WebSocket {
                send,
                expect: self.websocket_expect.as_deref(),
            },
            None => SmokeProbe::Http {
                status: self.status.unwrap_or(200),
                body_contains: self.body_contains.as_deref(),
            },
        }
    }

    /// Checks what serde cannot: the key at fault and why.
    fn problem(&self) -> Option<(&'static str, String)> {
        if !self.path.starts_with('/') {
            return Some(("smoke.path", format!("{:?} must start with /", self.path)));
        }
        if self.path.len() > limits::MAX_SMOKE_PATH
            || self
                .path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '#')
        {
            return Some((
                "smoke.path",
                format!(
                    "{:?} is not a request path (at most {} bytes, no whitespace, control characters or #)",
                    self.path,
                    limits::MAX_SMOKE_PATH
                ),
            ));
        }
        if let Some(status) = self.status
            && !(100..=599).contains(&status)
        {
            return Some(("smoke.status", format!("{status} is not an HTTP status")));
        }
        let text = |key: &'static str, value: &Option<String>| match value {
            Some(v) if v.is_empty() || v.len() > limits::MAX_SMOKE_TEXT || v.contains('\0') => {
                Some((
                    key,
                    format!("must be 1-{} bytes, without NUL", limits::MAX_SMOKE_TEXT),
                ))
            }
            _ => None,
        };
        text("smoke.body_contains", &self.body_contains)
            .or_else(|| text("smoke.websocket_send", &self.websocket_send))
            .or_else(|| text("smoke.websocket_expect", &self.websocket_expect))
            .or_else(|| {
                if self.websocket_send.is_some() {
                    if self.status.is_some() {
                        return Some((
                            "smoke.status",
                            "a WebSocket check (websocket_send) is judged by its answer, not a status; \
                             use websocket_expect"
                                .into(),
                        ));
                    }
                    if self.body_contains.is_some() {
                        return Some((
                            "smoke.body_contains",
                            "a WebSocket check (websocket_send) has no body; use websocket_expect"
                                .into(),
                        ));
                    }
                } else if self.websocket_expect.is_some() {
                    return Some((
                        "smoke.websocket_expect",
                        "needs websocket_send: the message to send first".into(),
                    ));
                }
                None
            })
    }
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
pub fn check_secret(name: &str, value: Option<&str>, rule: &SecretRule) -> Result<(), SecretError> {
    let name = name.to_string();
    match value {
        None => Err(SecretError::NotSet { name }),
        Some(v) if is_placeholder(v) => Err(SecretError::Placeholder { name }),
        Some(v) if v.chars().count() < rule.min_length => Err(SecretError::TooShort {
            name,
            length: v.chars().count(),
            min: rule.min_length,
        }),
        Some(_) => Ok(()),
    }
}

/// Why a secret is refused: names the secret, never holds its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name} is not set on this host")]
    NotSet { name: String },
    #[error("secret {name} holds a placeholder value; set the real one")]
    Placeholder { name: String },
    #[error("secret {name} is {length} characters long; at least {min} are required")]
    TooShort {
        name: String,
        length: usize,
        min: usize,
    },
}

/// Whether `version` is a valid tag for this app.
pub fn check_version(spec: &AppSpec, version: &str) -> Result<(), VersionError> {
    let re = regex::Regex::new(&spec.version_pattern).map_err(VersionError::Pattern)?;
    if re.is_match(version) {
        Ok(())
    } else {
        Err(VersionError::Mismatch {
            version: version.to_string(),
            pattern: spec.version_pattern.clone(),
        })
    }
}

/// A version refused for an app.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VersionError {
    #[error("bad version_pattern: {0}")]
    Pattern(regex::Error),
    #[error("version {version:?} does not match {pattern} (e.g. v1.4.2)")]
    Mismatch { version: String, pattern: String },
}

/// Bounds of an app spec's durations and counts: beyond them a value is a mistake (and a huge
/// one would overflow a clock or hold the app's lock for days).
pub mod limits {
    use std::time::Duration;

    pub const MAX_KEEP_RELEASES: u64 = 100;
    pub const MAX_DRAIN: Duration = Duration::from_secs(3600);
    pub const MAX_STOP: Duration = Duration::from_secs(600);
    pub const MIN_HEALTH_STEP: Duration = Duration::from_millis(10);
    pub const MAX_HEALTH_STEP: Duration = Duration::from_secs(300);
    pub const MAX_HEALTH_RETRIES: u64 = 1000;
    pub const MAX_START_PERIOD: Duration = Duration::from_secs(3600);
    /// The longest the health step may take in all (start period plus every try).
    pub const MAX_HEALTH_TOTAL: Duration = Duration::from_secs(3600);
    pub const MAX_WATCH_WINDOW: Duration = Duration::from_secs(3600);
    pub const MIN_P95: Duration = Duration::from_millis(1);
    pub const MAX_P95: Duration = Duration::from_secs(600);
    pub const MAX_WORKERS: u64 = 32;
    pub const MAX_SMOKE: u64 = 32;
    pub const MAX_SMOKE_PATH: usize = 2048;
    pub const MAX_SMOKE_TEXT: usize = 4096;
    pub const MAX_LIST: u64 = 64;
    pub const MAX_ENV: u64 = 1024;
    pub const MAX_VALUE_BYTES: usize = 32 * 1024;
    pub const MAX_ARG_BYTES: usize = 4096;
}

/// An environment variable name Docker and the app can use: not empty, no `=`, no NUL, no
/// whitespace or control characters.
fn env_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.contains('=') {
        Some("contains '=' (it would split into another name and value)")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace or a control character (NUL included)")
    } else if name.len() > 256 {
        Some("is longer than 256 bytes")
    } else {
        None
    }
}

/// A Docker name (volume or network): 1-128 of letters, digits, `_`, `.`, `-`, not starting
/// with a punctuation mark.
fn docker_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A clean absolute path: `/` itself, or `/` then components that are not empty, `.` or
/// `..`; no NUL.
fn clean_absolute(p: &str) -> bool {
    p == "/"
        || (p.starts_with('/')
            && !p.contains('\0')
            && p[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."))
}

/// What a `volumes` entry mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    Volume { name: String, target: String },
    Host { path: String, target: String },
}

/// Parses `NAME:/path`, `/host/path:/path`, each with an optional `:ro` or `:rw`.
pub fn parse_mount(v: &str) -> Result<Mount, MountError> {
    let entry = v.to_string();
    let parts: Vec<&str> = v.split(':').collect();
    let (source, target) = match parts.as_slice() {
        [s, t] | [s, t, "ro"] | [s, t, "rw"] => (*s, *t),
        [_, _, mode] => {
            let mode = mode.to_string();
            return Err(MountError::Mode { entry, mode });
        }
        _ => return Err(MountError::Shape { entry }),
    };
    if !clean_absolute(target) || target == "/" {
        let target = target.to_string();
        return Err(MountError::Target { entry, target });
    }
    if source.starts_with('/') {
        if !clean_absolute(source) {
            let path = source.to_string();
            return Err(MountError::HostPath { entry, path });
        }
        Ok(Mount::Host {
            path: source.to_string(),
            target: target.to_string(),
        })
    } else if docker_name(source) {
        Ok(Mount::Volume {
            name: source.to_string(),
            target: target.to_string(),
        })
    } else {
        let name = source.to_string();
        Err(MountError::Neither { entry, name })
    }
}

/// A `volumes` entry that does not parse; the message quotes the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    #[error("{entry:?}: mode {mode:?} is not ro or rw")]
    Mode { entry: String, mode: String },
    #[error("{entry:?} is not NAME:/path or /host/path:/path (with an optional :ro)")]
    Shape { entry: String },
    #[error("{entry:?}: the container path {target:?} must be absolute, clean and not /")]
    Target { entry: String, target: String },
    #[error("{entry:?}: the host path {path:?} must be absolute and clean (no . or ..)")]
    HostPath { entry: String, path: String },
    #[error("{entry:?}: {name:?} is neither a volume name nor an absolute host path")]
    Neither { entry: String, name: String },
}

/// Why a host path is more dangerous than most: said in the refusal.
fn host_mount_danger(path: &str) -> &'static str {
    match path {
        "/" => " (the host's whole file system)",
        "/var/run/docker.sock" | "/run/docker.sock" | "/var/run" | "/run" => {
            " (the Docker socket: root on the host)"
        }
        "/etc" | "/root" | "/home" | "/var/lib/drover-agent" | "/etc/drover" => {
            " (host credentials)"
        }
        _ => "",
    }
}

impl AppSpec {
    /// What this spec is allowed beyond a plain container, for `drover app show`.
    pub fn privileges(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.allow_host_mounts {
            let hosts: Vec<String> = self
                .volumes
                .iter()
                .filter_map(|v| match parse_mount(v) {
                    Ok(Mount::Host { path, target }) => Some(format!("{path}:{target}")),
                    _ => None,
                })
                .collect();
            out.push(format!("host mounts ({})", hosts.join(", ")));
        }
        if self.allow_host_network {
            out.push("host network".into());
        }
        out
    }

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
        check_name(&self.name).map_err(|m| bad("name", m.to_string()))?;
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
        let duration = |key: &'static str, value, min, max| {
            check_duration(value, min, max).map_err(|m| bad(key, m.to_string()))
        };
        let count = |key: &'static str, value: u64, min, max| {
            check_count(value, min, max).map_err(|m| bad(key, m.to_string()))
        };
        count(
            "keep_releases",
            self.keep_releases.into(),
            1,
            limits::MAX_KEEP_RELEASES,
        )?;
        duration(
            "drain_timeout",
            self.drain_timeout,
            Duration::ZERO,
            limits::MAX_DRAIN,
        )?;
        duration(
            "stop_timeout",
            self.stop_timeout,
            Duration::ZERO,
            limits::MAX_STOP,
        )?;
        count("workers", self.workers.len() as u64, 0, limits::MAX_WORKERS)?;
        count("smoke", self.smoke.len() as u64, 0, limits::MAX_SMOKE)?;
        count("volumes", self.volumes.len() as u64, 0, limits::MAX_LIST)?;
        count("networks", self.networks.len() as u64, 0, limits::MAX_LIST)?;
        count("backups", self.backups.len() as u64, 0, limits::MAX_LIST)?;
        count(
            "env",
            (self.env.len() + self.secrets.len()) as u64,
            0,
            limits::MAX_ENV,
        )?;
        let args = |key: &'static str, list: &[String]| -> Result<(), ConfigError> {
            count(key, list.len() as u64, 0, limits::MAX_LIST)?;
            for a in list {
                if a.contains('\0') || a.len() > limits::MAX_ARG_BYTES {
                    return Err(bad(
                        key,
                        format!(
                            "an argument holds a NUL or is longer than {} bytes",
                            limits::MAX_ARG_BYTES
                        ),
                    ));
                }
            }
            Ok(())
        };
        args("migrate", &self.migrate)?;
        for w in &self.workers {
            args("workers.command", &w.command)?;
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
        if let Some(web) = &self.web
            && web.listen.port() == 0
        {
            return Err(bad(
                "web.listen",
                "needs a port: 0 would pick a random one clients cannot know".into(),
            ));
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
            if let Some(problem) = env_name_problem(key) {
                return Err(bad("env", format!("the name {key:?} {problem}")));
            }
            if self.secrets.contains_key(key) {
                return Err(bad(
                    "env",
                    format!("{key} is declared both in [env] and [secrets]"),
                ));
            }
            if value.contains('\0') || value.len() > limits::MAX_VALUE_BYTES {
                return Err(bad(
                    "env",
                    format!(
                        "{key} holds a NUL or is longer than {} bytes",
                        limits::MAX_VALUE_BYTES
                    ),
                ));
            }
            if is_placeholder(value) && !value.is_empty() {
                return Err(bad(
                    "env",
                    format!("{key} holds a placeholder value ({value:?})"),
                ));
            }
        }
        for name in self.secrets.keys() {
            if let Some(problem) = env_name_problem(name) {
                return Err(bad("secrets", format!("the name {name:?} {problem}")));
            }
        }
        for v in &self.volumes {
            match parse_mount(v).map_err(|m| bad("volumes", m.to_string()))? {
                Mount::Host { path, .. } if !self.allow_host_mounts => {
                    return Err(bad(
                        "volumes",
                        format!(
                            "{v:?} mounts the host's {path}{} into the container; \
                             set allow_host_mounts = true if that is meant, or use a named volume",
                            host_mount_danger(&path)
                        ),
                    ));
                }
                _ => {}
            }
        }
        let mut networks = std::collections::BTreeSet::new();
        for n in &self.networks {
            if n.starts_with("container:") {
                return Err(bad(
                    "networks",
                    format!("{n:?}: sharing another container's network is not supported"),
                ));
            }
            if !docker_name(n) || !networks.insert(n) {
                return Err(bad(
                    "networks",
                    format!("{n:?} is not a valid, unique Docker network name"),
                ));
            }
            let isolated = n == "host" || n == "none";
            if isolated && self.networks.len() > 1 {
                return Err(bad(
                    "networks",
                    format!("{n:?} cannot be combined with other networks"),
                ));
            }
            if isolated && self.web.is_some() {
                return Err(bad(
                    "networks",
                    format!(
                        "{n:?} with a [web] role: the proxy forwards to the container's published port, which {n:?} networking does not have"
                    ),
                ));
            }
            if n == "host" && !self.allow_host_network {
                return Err(bad(
                    "networks",
                    "\"host\" gives the containers the host's network (every port, no isolation); \
                     set allow_host_network = true if that is meant"
                        .into(),
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
        duration(
            "health.interval",
            h.interval,
            limits::MIN_HEALTH_STEP,
            limits::MAX_HEALTH_STEP,
        )?;
        duration(
            "health.timeout",
            h.timeout,
            limits::MIN_HEALTH_STEP,
            limits::MAX_HEALTH_STEP,
        )?;
        count(
            "health.retries",
            h.retries.into(),
            1,
            limits::MAX_HEALTH_RETRIES,
        )?;
        duration(
            "health.start_period",
            h.start_period,
            Duration::ZERO,
            limits::MAX_START_PERIOD,
        )?;
        let total = h.start_period + (h.interval + h.timeout) * h.retries;
        if total > limits::MAX_HEALTH_TOTAL {
            return Err(bad(
                "health.retries",
                format!(
                    "start_period + retries x (interval + timeout) is {}; the health step may take at most {} (it holds the app's lock)",
                    crate::units::human(total),
                    crate::units::human(limits::MAX_HEALTH_TOTAL)
                ),
            ));
        }
        for s in &self.smoke {
            if let Some((key, message)) = s.problem() {
                return Err(bad(key, message));
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
        duration(
            "watch.window",
            self.watch.window,
            Duration::ZERO,
            limits::MAX_WATCH_WINDOW,
        )?;
        duration(
            "watch.max_p95_latency",
            self.watch.max_p95_latency,
            limits::MIN_P95,
            limits::MAX_P95,
        )?;
        if let Some((key, message)) = self.release.problem() {
            return Err(bad(key, message));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each spec is refused with the one-line error that names its key and says why.
    fn assert_refused<T: AsRef<str>>(cases: &[(T, &str, &str)]) {
        for (text, key, why) in cases {
            let err = AppSpec::from_toml(text.as_ref(), "app.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("invalid config app.toml: key `{key}`: ")),
                "expected key {key}: {err}"
            );
            assert!(err.contains(why), "expected {why:?}: {err}");
        }
    }

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
        assert_eq!(
            spec.smoke[1].probe(),
            SmokeProbe::WebSocket {
                send: "ping",
                expect: Some("ping")
            }
        );
        assert_eq!(spec.health.start_period, Duration::from_secs(20));
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

    /// The values that once passed validation and then broke the agent (issue 11, item 8), and
    /// the mounts, networks and names accepted without a word (item 10).
    #[test]
    fn every_duration_and_count_has_bounds_and_the_impossible_is_refused() {
        let cases: &[(String, &str, &str)] = &[
            (
                format!("{MINIMAL}[watch]\nwindow = \"18446744073709551615s\"\n"),
                "watch.window",
                "out of range",
            ),
            (
                format!("{MINIMAL}[health]\nretries = 4294967295\n"),
                "health.retries",
                "out of range",
            ),
            (
                format!("{MINIMAL}[health]\nretries = 1000\ninterval = \"5m\"\n"),
                "health.retries",
                "holds the app's lock",
            ),
            (
                format!("{MINIMAL}[health]\ninterval = \"0s\"\n"),
                "health.interval",
                "out of range",
            ),
            (
                format!("{MINIMAL}[health]\nstart_period = \"3y\"\n"),
                "health.start_period",
                "out of range",
            ),
            (
                format!("drain_timeout = \"100000000y\"\n{MINIMAL}"),
                "drain_timeout",
                "out of range",
            ),
            (
                format!("stop_timeout = \"2h\"\n{MINIMAL}"),
                "stop_timeout",
                "out of range",
            ),
            (
                format!("keep_releases = 4294967295\n{MINIMAL}"),
                "keep_releases",
                "out of range",
            ),
            (
                format!("{MINIMAL}[watch]\nmax_p95_latency = \"0s\"\n"),
                "watch.max_p95_latency",
                "out of range",
            ),
            (
                format!("volumes = [\"/:/host\"]\n{MINIMAL}"),
                "volumes",
                "whole file system",
            ),
            (
                format!("volumes = [\"/var/run/docker.sock:/var/run/docker.sock\"]\n{MINIMAL}"),
                "volumes",
                "Docker socket",
            ),
            (
                format!("volumes = [\"/srv/data:/data\"]\n{MINIMAL}"),
                "volumes",
                "allow_host_mounts = true",
            ),
            (
                format!("volumes = [\"data:/\"]\n{MINIMAL}"),
                "volumes",
                "not /",
            ),
            (
                format!("volumes = [\"data:/a/../b\"]\n{MINIMAL}"),
                "volumes",
                "clean",
            ),
            (
                format!("volumes = [\"data:/data:rx\"]\n{MINIMAL}"),
                "volumes",
                "not ro or rw",
            ),
            (
                format!("networks = [\"host\"]\n{MINIMAL}"),
                "networks",
                "published port",
            ),
            (
                "name = \"bot\"\nimage = \"acme/bot\"\nnetworks = [\"host\"]\n[[workers]]\nname = \"bot\"\ncommand = [\"bot\"]\n".into(),
                "networks",
                "allow_host_network = true",
            ),
            (
                format!("networks = [\"container:db\"]\n{MINIMAL}"),
                "networks",
                "not supported",
            ),
            (
                format!("networks = [\"a b\"]\n{MINIMAL}"),
                "networks",
                "not a valid",
            ),
            (
                format!("{MINIMAL}[env]\n\"A=B\" = \"x\"\n"),
                "env",
                "contains '='",
            ),
            (format!("{MINIMAL}[env]\n\"\" = \"x\"\n"), "env", "is empty"),
            (
                format!("{MINIMAL}[env]\n\"A\\u0000\" = \"x\"\n"),
                "env",
                "control character",
            ),
            (
                format!("{MINIMAL}[env]\nA = \"x\\u0000y\"\n"),
                "env",
                "NUL",
            ),
            (
                format!("{MINIMAL}[secrets.\"DB=URL\"]\nmin_length = 1\n"),
                "secrets",
                "contains '='",
            ),
            (
                MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0"),
                "web.listen",
                "needs a port",
            ),
        ];
        assert_refused(cases);
        // The dangerous but meant: said so in the spec, and shown by `drover app show`.
        let spec = AppSpec::from_toml(
            &format!(
                "volumes = [\"/srv/data:/data:ro\", \"cache:/cache\"]\nallow_host_mounts = true\n{MINIMAL}"
            ),
            "app.toml",
        )
        .unwrap();
        assert_eq!(spec.privileges(), ["host mounts (/srv/data:/data)"]);
        let worker = "name = \"bot\"\nimage = \"acme/bot\"\nnetworks = [\"host\"]\nallow_host_network = true\n[[workers]]\nname = \"bot\"\ncommand = [\"bot\"]\n";
        assert_eq!(
            AppSpec::from_toml(worker, "app.toml").unwrap().privileges(),
            ["host network"]
        );
        assert!(
            AppSpec::from_toml(MINIMAL, "app.toml")
                .unwrap()
                .privileges()
                .is_empty()
        );
        // The bounds themselves are accepted.
        let edge = format!(
            "keep_releases = 100\ndrain_timeout = \"1h\"\n{MINIMAL}[watch]\nwindow = \"1h\"\n[health]\nretries = 1000\ninterval = \"1s\"\ntimeout = \"2s\"\n"
        );
        AppSpec::from_toml(&edge, "app.toml").unwrap();
    }

    /// The `[release]` table (issue 13): defaults when absent, every key read, each wrong value
    /// refused naming its key, every wait and count bounded.
    #[test]
    fn the_release_table_gives_defaults_and_is_checked() {
        use crate::waves::{OnFailure, ReleaseDefaults};
        let spec = AppSpec::from_toml(MINIMAL, "app.toml").unwrap();
        assert_eq!(spec.release, ReleaseDefaults::default());
        let full = format!(
            "{MINIMAL}[release]\nwaves = \"1,25%,100%\"\nmax_parallel = 3\nmin_healthy = \"5s\"\nprogress_deadline = \"20m\"\nhost_timeout = \"1m\"\non_failure = \"halt\"\nmax_failures = \"10%\"\nskip_offline = true\n"
        );
        let r = AppSpec::from_toml(&full, "app.toml").unwrap().release;
        assert_eq!(r.waves, "1,25%,100%");
        assert_eq!(r.max_parallel, 3);
        assert_eq!(r.min_healthy, Duration::from_secs(5));
        assert_eq!(r.progress_deadline, Duration::from_secs(1200));
        assert_eq!(r.host_timeout, Duration::from_secs(60));
        assert_eq!(r.on_failure, OnFailure::Halt);
        assert_eq!(r.max_failures, "10%");
        assert!(r.skip_offline);
        let release = |keys: &str| format!("{MINIMAL}[release]\n{keys}");
        let cases: &[(String, &str, &str)] = &[
            (
                release("waves = \"50%,10%\"\n"),
                "release.waves",
                "does not reach more hosts",
            ),
            (
                release("waves = \"0\"\n"),
                "release.waves",
                "not a host count",
            ),
            (
                release("max_failures = \"101%\"\n"),
                "release.max_failures",
                "share from 0%",
            ),
            (
                release("max_parallel = 0\n"),
                "release.max_parallel",
                "out of range",
            ),
            (
                release("max_parallel = 1001\n"),
                "release.max_parallel",
                "out of range",
            ),
            (
                release("min_healthy = \"25h\"\n"),
                "release.min_healthy",
                "out of range",
            ),
            (
                release("progress_deadline = \"0s\"\n"),
                "release.progress_deadline",
                "out of range",
            ),
            (
                release("host_timeout = \"1000h\"\n"),
                "release.host_timeout",
                "out of range",
            ),
        ];
        assert_refused(cases);
        for text in [
            release("on_failure = \"explode\"\n"),
            release("canary = \"a\"\n"),
        ] {
            let err = AppSpec::from_toml(&text, "app.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains("app.toml"), "{err}");
        }
        // The bounds themselves are accepted.
        AppSpec::from_toml(
            &release("max_parallel = 1000\nmin_healthy = \"24h\"\nprogress_deadline = \"1s\"\nhost_timeout = \"0s\"\nmax_failures = \"100%\"\n"),
            "app.toml",
        )
        .unwrap();
    }

    /// WebSocket smoke checks (issue 11, item 15): the keys belong together, and every text is
    /// bounded.
    #[test]
    fn smoke_checks_are_http_or_websocket_and_bounded() {
        let smoke = |keys: &str| format!("{MINIMAL}[[smoke]]\npath = \"/ws\"\n{keys}");
        let long = "x".repeat(limits::MAX_SMOKE_TEXT + 1);
        let cases: &[(String, &str, &str)] = &[
            (
                smoke("websocket_send = \"\"\n"),
                "smoke.websocket_send",
                "must be 1-4096 bytes",
            ),
            (
                smoke(&format!("websocket_send = \"{long}\"\n")),
                "smoke.websocket_send",
                "must be 1-4096 bytes",
            ),
            (
                smoke("websocket_send = \"a\"\nwebsocket_expect = \"a\\u0000\"\n"),
                "smoke.websocket_expect",
                "without NUL",
            ),
            (
                smoke("websocket_expect = \"pong\"\n"),
                "smoke.websocket_expect",
                "needs websocket_send",
            ),
            (
                smoke("websocket_send = \"ping\"\nstatus = 101\n"),
                "smoke.status",
                "judged by its answer",
            ),
            (
                smoke("websocket_send = \"ping\"\nbody_contains = \"ok\"\n"),
                "smoke.body_contains",
                "has no body",
            ),
            (
                smoke(&format!("body_contains = \"{long}\"\n")),
                "smoke.body_contains",
                "must be 1-4096 bytes",
            ),
            (
                format!("{MINIMAL}[[smoke]]\npath = \"/a b\"\n"),
                "smoke.path",
                "not a request path",
            ),
            (
                format!("{MINIMAL}[[smoke]]\npath = \"/{}\"\n", "a".repeat(3000)),
                "smoke.path",
                "at most 2048 bytes",
            ),
        ];
        assert_refused(cases);
        let spec = AppSpec::from_toml(
            &format!(
                "{}[[smoke]]\npath = \"/smoke\"\n",
                smoke("websocket_send = \"ping\"\n")
            ),
            "app.toml",
        )
        .unwrap();
        assert_eq!(
            spec.smoke[0].probe(),
            SmokeProbe::WebSocket {
                send: "ping",
                expect: None
            }
        );
        assert_eq!(
            spec.smoke[1].probe(),
            SmokeProbe::Http {
                status: 200,
                body_contains: None
            }
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
            let err = check_secret("K", value, &rule).unwrap_err().to_string();
            assert!(err.contains(why), "{value:?}: {err}");
            if let Some(v) = value {
                assert!(!err.contains(v), "the value leaked: {err}");
            }
        }
    }
}
