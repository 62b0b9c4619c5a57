//! The agent's configuration: a TOML file (`/etc/drover/agent.toml`), then flags, then
//! `validate()` with messages that name the file and the key.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::health::Thresholds;
use crate::proxy::ConnLimits;
use drover_daemon::LogFormat;
use drover_model::config::{
    ConfigError, check_count, check_duration, duration_str, parse_toml, read_toml_file,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Controller address (`host:port`). Empty: the one recorded at enrollment.
    pub controller: String,
    /// Where the identity, the outbox and job state live.
    pub data_dir: PathBuf,
    #[serde(with = "duration_str")]
    pub heartbeat_interval: Duration,
    /// How often a HealthReport is sent even when nothing changed.
    #[serde(with = "duration_str")]
    pub health_interval: Duration,
    /// How often health is sampled to notice changes.
    #[serde(with = "duration_str")]
    pub health_sample_interval: Duration,
    /// Upper bound of the reconnect backoff.
    #[serde(with = "duration_str")]
    pub reconnect_max: Duration,
    /// Docker Engine socket; empty means the default (`DOCKER_HOST` or /var/run/docker.sock).
    pub docker_socket: String,
    pub log_format: LogFormat,
    /// Refused when not empty: a host's labels come from its enrollment token
    /// (`drover token create --label k=v`), never from the host. Kept as a key so an old
    /// config says why instead of "unknown key".
    pub labels: BTreeMap<String, String>,
    /// App secrets: `<secrets_dir>/<app>.env`, KEY=value lines, owned by the agent's user,
    /// mode 0600. Read at each deploy; never sent to the controller.
    pub secrets_dir: PathBuf,
    /// Private registry credentials, in Docker's `config.json` format (`auths` per registry),
    /// owned by the agent's user, mode 0600, not a symlink. Read at each pull; no file: pulls
    /// go without credentials. Never sent to the controller.
    pub registry_auth: PathBuf,
    /// A deploy lock expires this long after its holder last renewed it (a crashed agent's
    /// lock does not block the app forever).
    #[serde(with = "duration_str")]
    pub lock_lease: Duration,
    pub health: Thresholds,
    /// Limits on the client connections of the app proxies.
    pub proxy: ProxyConfig,
    /// Where this config came from, for error messages.
    #[serde(skip)]
    pub source: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            controller: String::new(),
            data_dir: PathBuf::from("/var/lib/drover-agent"),
            heartbeat_interval: Duration::from_secs(5),
            health_interval: Duration::from_secs(30),
            health_sample_interval: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(60),
            docker_socket: String::new(),
            log_format: LogFormat::Text,
            labels: BTreeMap::new(),
            secrets_dir: PathBuf::from("/etc/drover/secrets"),
            registry_auth: PathBuf::from("/etc/drover/registry-auth.json"),
            lock_lease: Duration::from_secs(60),
            health: Thresholds::default(),
            proxy: ProxyConfig::default(),
            source: "(defaults)".into(),
        }
    }
}

/// The `[proxy]` table: where the app proxies listen, how long a client may take and how many
/// connections it may hold.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// The IP an app proxy binds when its app's `web.listen` is a wildcard (`0.0.0.0:8080` or
    /// `[::]:8080`): this host's address, so several agents on one machine (each with its own
    /// IP) can serve the same app spec on the same port. Unset: the wildcard itself. An app
    /// whose spec names an IP binds that IP whatever this says.
    pub listen_ip: Option<IpAddr>,
    /// A request head must be complete this long after the connection opened or its previous
    /// response ended (slowloris clients are cut off here).
    #[serde(with = "duration_str")]
    pub header_timeout: Duration,
    /// A keep-alive connection with no byte moving for this long is closed.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Client connections of one app's proxy at most; beyond, new ones get a 503. All proxies
    /// together also stay within a budget taken from the open-file limit at start.
    pub max_connections: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen_ip: None,
            header_timeout: ConnLimits::DEFAULT_HEADER_TIMEOUT,
            idle_timeout: ConnLimits::DEFAULT_IDLE_TIMEOUT,
            max_connections: ConnLimits::DEFAULT_MAX_CONNECTIONS as u64,
        }
    }
}

impl ProxyConfig {
    /// The proxies' limits, with a shared budget of `budget` connections.
    pub fn limits(&self, budget: usize) -> ConnLimits {
        ConnLimits::new(
            self.header_timeout,
            self.idle_timeout,
            usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            budget,
        )
    }

    /// Bounds every value; the error names the `proxy.` key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(ip) = self.listen_ip
            && ip.is_unspecified()
        {
            return Err((
                "proxy.listen_ip",
                format!(
                    "{ip} is the wildcard itself: give one of this host's addresses, or leave the key out"
                ),
            ));
        }
        let secs = Duration::from_secs;
        check_duration(self.header_timeout, secs(1), secs(600))
            .map_err(|m| ("proxy.header_timeout", m.to_string()))?;
        check_duration(self.idle_timeout, secs(1), secs(600))
            .map_err(|m| ("proxy.idle_timeout", m.to_string()))?;
        if self.idle_timeout > self.header_timeout {
            // hyper's header clock also runs while a keep-alive connection waits for its next
            // request: a longer idle timeout would never be reached.
            return Err((
                "proxy.idle_timeout",
                "must not exceed proxy.header_timeout".into(),
            ));
        }
        check_count(self.max_connections, 1, 1_000_000)
            .map_err(|m| ("proxy.max_connections", m.to_string()))
    }
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut config: AgentConfig = read_toml_file(path)?;
        config.source = path.display().to_string();
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates TOML text; `source` names it in errors.
    pub fn from_toml(text: &str, source: &str) -> Result<AgentConfig, ConfigError> {
        let mut config: AgentConfig = parse_toml(text, source)?;
        config.source = source.to_string();
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| ConfigError::Invalid {
            path: self.source.clone(),
            key,
            message: message.to_string(),
        };
        if self.heartbeat_interval < Duration::from_millis(100) {
            return Err(invalid("heartbeat_interval", "must be at least 100ms"));
        }
        if self.reconnect_max < Duration::from_secs(1) {
            return Err(invalid("reconnect_max", "must be at least 1s"));
        }
        if self.lock_lease < Duration::from_secs(3) {
            return Err(invalid("lock_lease", "must be at least 3s"));
        }
        // Every duration has both bounds: a zero interval would stop its task (a tokio
        // interval of 0 panics), a huge one would overflow the clock.
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        for (key, value, min, max) in [
            (
                "heartbeat_interval",
                self.heartbeat_interval,
                ms(100),
                secs(300),
            ),
            ("health_interval", self.health_interval, ms(100), secs(3600)),
            (
                "health_sample_interval",
                self.health_sample_interval,
                ms(100),
                secs(3600),
            ),
            ("reconnect_max", self.reconnect_max, secs(1), secs(3600)),
            ("lock_lease", self.lock_lease, secs(3), secs(3600)),
        ] {
            check_duration(value, min, max).map_err(|m| invalid(key, &m.to_string()))?;
        }
        if self.health_interval < self.heartbeat_interval {
            return Err(invalid(
                "health_interval",
                "must not be shorter than heartbeat_interval",
            ));
        }
        if !self.labels.is_empty() {
            return Err(invalid(
                "labels",
                "a host does not choose its own labels: they come from its enrollment token (`drover token create --host NAME --label k=v`); remove [labels] from this file",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if !self.controller.is_empty() {
            drover_identity::tls::controller_authority(&self.controller)
                .map_err(|e| invalid("controller", &e.to_string()))?;
        }
        self.proxy
            .validate()
            .map_err(|(key, message)| invalid(key, &message))?;
        self.health
            .validate()
            .map_err(|(key, message)| invalid(key, &message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_in_the_repo_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/agent.toml");
        let config = AgentConfig::from_file(&path).unwrap();
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.health_interval, Duration::from_secs(30));
        assert_eq!(config.proxy, ProxyConfig::default());
        assert_eq!(config.health, Thresholds::default());
    }

    #[test]
    fn the_idle_timeout_fits_in_the_header_timeout() {
        let err = AgentConfig::from_toml(
            "[proxy]\nheader_timeout = \"10s\"\nidle_timeout = \"20s\"",
            "a.toml",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid config a.toml: key `proxy.idle_timeout`: must not exceed proxy.header_timeout"
        );
        let ok = AgentConfig::from_toml(
            "[proxy]\nheader_timeout = \"10s\"\nidle_timeout = \"5s\"\nmax_connections = 50",
            "a.toml",
        )
        .unwrap();
        assert_eq!(ok.proxy.max_connections, 50);
    }

    #[test]
    fn the_proxy_listen_ip_is_an_address_not_a_wildcard() {
        let ok = AgentConfig::from_toml("[proxy]\nlisten_ip = \"127.0.0.2\"", "a.toml").unwrap();
        assert_eq!(ok.proxy.listen_ip, Some("127.0.0.2".parse().unwrap()));
        let ok = AgentConfig::from_toml("[proxy]\nlisten_ip = \"fd00::2\"", "a.toml").unwrap();
        assert_eq!(ok.proxy.listen_ip, Some("fd00::2".parse().unwrap()));
        for wildcard in ["0.0.0.0", "::"] {
            let err =
                AgentConfig::from_toml(&format!("[proxy]\nlisten_ip = \"{wildcard}\""), "a.toml")
                    .unwrap_err()
                    .to_string();
            assert!(
                err.starts_with("invalid config a.toml: key `proxy.listen_ip`: "),
                "{err}"
            );
        }
        let err = AgentConfig::from_toml("[proxy]\nlisten_ip = \"host-1\"", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.toml"), "{err}");
    }

    #[test]
    fn errors_name_file_and_key() {
        let err = AgentConfig::from_toml("heartbeat_interval = \"1ms\"", "a.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config a.toml: key `heartbeat_interval`: must be at least 100ms"
        );
        let err = AgentConfig::from_toml("nope = 1", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.toml") && err.contains("nope"), "{err}");
        // An empty [labels] table (the old example config) is fine; labels in it are not.
        AgentConfig::from_toml("[labels]\n", "a.toml").unwrap();
        let err = AgentConfig::from_toml("[labels]\nenv = \"prod\"", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`labels`") && err.contains("drover token create --host NAME --label"),
            "{err}"
        );
        let err = AgentConfig::from_toml("heartbeat_interval = \"soon\"", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid duration"), "{err}");
    }

    /// `health_sample_interval = "0s"` used to kill the health task silently (issue 11, 8).
    #[test]
    fn every_duration_is_bounded() {
        for (text, key) in [
            ("health_sample_interval = \"0s\"", "health_sample_interval"),
            ("heartbeat_interval = \"100000000y\"", "heartbeat_interval"),
            ("health_interval = \"100000000y\"", "health_interval"),
            ("reconnect_max = \"18446744073709551615s\"", "reconnect_max"),
            ("lock_lease = \"30d\"", "lock_lease"),
            (
                "[health]\ncert_degraded_before_expiry = \"100000000y\"",
                "health.cert_degraded_before_expiry",
            ),
            (
                "[health]\nclock_unhealthy_offset = \"100000000y\"",
                "health.clock_unhealthy_offset",
            ),
            ("[proxy]\nheader_timeout = \"0s\"", "proxy.header_timeout"),
            (
                "[proxy]\nheader_timeout = \"100000000y\"",
                "proxy.header_timeout",
            ),
            ("[proxy]\nidle_timeout = \"0s\"", "proxy.idle_timeout"),
            ("[proxy]\nmax_connections = 0", "proxy.max_connections"),
            (
                "[proxy]\nmax_connections = 2000000",
                "proxy.max_connections",
            ),
        ] {
            let err = AgentConfig::from_toml(text, "a.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("invalid config a.toml: key `{key}`: ")),
                "{err}"
            );
            assert!(err.contains("out of range"), "{err}");
        }
    }
}
