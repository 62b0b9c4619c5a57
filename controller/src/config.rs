//! The controller's configuration: a TOML file (`/etc/drover/controller.toml`), flags over it,
//! then `validate()` with messages that name the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_daemon::LogFormat;
use drover_model::config::{
    ConfigError, check_count, check_duration, duration_str, parse_toml, read_toml_file,
};
use serde::Deserialize;

pub use crate::notify::{EmailConfig, NotifyConfig, WebhookConfig, WebhookFormat};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls_names: Vec<String>,
    #[serde(with = "duration_str")]
    pub agent_cert_ttl: Duration,
    #[serde(with = "duration_str")]
    pub operator_cert_ttl: Duration,
    /// How long after its certificate expired an agent may still get a new one by proving it
    /// holds the enrolled key (a controller outage, a host switched off); `0s`: never, such a
    /// host needs a new token.
    #[serde(with = "duration_str")]
    pub reenroll_grace: Duration,
    #[serde(with = "duration_str")]
    pub token_ttl: Duration,
    #[serde(with = "duration_str")]
    pub heartbeat_interval: Duration,
    #[serde(with = "duration_str")]
    pub suspect_after: Duration,
    #[serde(with = "duration_str")]
    pub down_after: Duration,
    pub log_format: LogFormat,
    /// How often the scheduler looks for due schedules; `0s` turns it off (tests drive
    /// `Scheduler::tick` themselves).
    #[serde(with = "duration_str")]
    pub scheduler_tick: Duration,
    /// How often alerts are evaluated; `0s` turns it off (tests drive `Alerting::tick`).
    #[serde(with = "duration_str")]
    pub alerts_every: Duration,
    /// How often an open alert is sent again.
    #[serde(with = "duration_str")]
    pub alert_resend: Duration,
    pub notify: NotifyConfig,
    /// `[connections]`: caps and timeouts on the controller port.
    pub connections: ConnectionsConfig,
    #[serde(skip)]
    pub source: String,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            data_dir: PathBuf::from("/var/lib/drover-controller"),
            tls_names: Vec::new(),
            agent_cert_ttl: Duration::from_secs(24 * 3600),
            operator_cert_ttl: DEFAULT_OPERATOR_CERT_TTL,
            reenroll_grace: DEFAULT_REENROLL_GRACE,
            token_ttl: Duration::from_secs(15 * 60),
            heartbeat_interval: Duration::from_secs(5),
            suspect_after: Duration::from_secs(15),
            down_after: Duration::from_secs(30),
            log_format: LogFormat::Text,
            scheduler_tick: Duration::from_secs(1),
            alerts_every: Duration::from_secs(30),
            alert_resend: crate::alerts::DEFAULT_RESEND,
            notify: NotifyConfig::default(),
            connections: ConnectionsConfig::default(),
            source: "(defaults)".into(),
        }
    }
}

/// Caps and timeouts on the controller port (`[connections]`). Every connection is a file
/// descriptor: at start the controller lowers `max` to fit its RLIMIT_NOFILE (and says so).
/// A connection without a client certificate (an agent enrolling) may only call Enrollment
/// and lives at most `unauthenticated_lifetime`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    /// Connections open at once, of every kind (handshakes in progress included).
    pub max: u64,
    /// Connections open at once from one source: an IPv4 address or an IPv6 /64.
    pub max_per_ip: u64,
    /// TLS sessions without a client certificate open at once.
    pub max_unauthenticated: u64,
    /// TLS sessions without a client certificate open at once from one source.
    pub max_unauthenticated_per_ip: u64,
    /// A TLS handshake not finished by then is closed.
    #[serde(with = "duration_str")]
    pub handshake_timeout: Duration,
    /// After the handshake, the first request's headers must arrive by then.
    #[serde(with = "duration_str")]
    pub first_request_timeout: Duration,
    /// A connection with no request open for this long is closed (an agent's session is a
    /// request open for as long as the agent is connected).
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// The longest a connection without a client certificate stays open.
    #[serde(with = "duration_str")]
    pub unauthenticated_lifetime: Duration,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max: 16_384,
            max_per_ip: 1024,
            max_unauthenticated: 512,
            max_unauthenticated_per_ip: 64,
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            unauthenticated_lifetime: Duration::from_secs(30),
        }
    }
}

/// The most connections `[connections] max` may ask for.
pub const MAX_CONNECTIONS: u64 = 1 << 20;

impl ConnectionsConfig {
    /// Checks every key against its range: `Err((key, message))`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        for (key, value, min, max) in [
            ("connections.max", self.max, 16, MAX_CONNECTIONS),
            ("connections.max_per_ip", self.max_per_ip, 1, self.max),
            (
                "connections.max_unauthenticated",
                self.max_unauthenticated,
                1,
                self.max,
            ),
            (
                "connections.max_unauthenticated_per_ip",
                self.max_unauthenticated_per_ip,
                1,
                self.max_unauthenticated.min(self.max_per_ip),
            ),
        ] {
            check_count(value, min, max).map_err(|m| (key, m.to_string()))?;
        }
        for (key, value, min, max) in [
            (
                "connections.handshake_timeout",
                self.handshake_timeout,
                ms(100),
                secs(300),
            ),
            (
                "connections.first_request_timeout",
                self.first_request_timeout,
                ms(100),
                secs(300),
            ),
            (
                "connections.idle_timeout",
                self.idle_timeout,
                secs(1),
                secs(86_400),
            ),
            (
                "connections.unauthenticated_lifetime",
                self.unauthenticated_lifetime,
                secs(1),
                secs(3600),
            ),
        ] {
            check_duration(value, min, max).map_err(|m| (key, m.to_string()))?;
        }
        Ok(())
    }
}

/// The longest an agent certificate may live (agents renew at 40 % of it).
pub const MAX_AGENT_CERT_TTL: Duration = Duration::from_secs(90 * 86_400);
/// The longest an operator certificate may live.
pub const MAX_OPERATOR_CERT_TTL: Duration = Duration::from_secs(366 * 86_400);

/// The longest an enrollment token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest life `drover token create --ttl` may ask for: less cannot be used in time.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Operator certificates live 30 days by default: a lost laptop's identity dies on its own
/// soon, and the admin bundle on the controller host is renewed by the controller itself.
pub const DEFAULT_OPERATOR_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// An agent whose certificate expired less than this ago re-enrolls by itself.
pub const DEFAULT_REENROLL_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest `reenroll_grace`: beyond a year offline, enroll again with a token.
pub const MAX_REENROLL_GRACE: Duration = Duration::from_secs(365 * 24 * 3600);

impl ControllerConfig {
    pub fn from_file(path: &Path) -> Result<ControllerConfig, ConfigError> {
        let mut config: ControllerConfig = read_toml_file(path)?;
        config.source = path.display().to_string();
        config.validate()?;
        Ok(config)
    }

    pub fn from_toml(text: &str, source: &str) -> Result<ControllerConfig, ConfigError> {
        let mut config: ControllerConfig = parse_toml(text, source)?;
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
        if self.agent_cert_ttl < Duration::from_secs(10) {
            return Err(invalid("agent_cert_ttl", "must be at least 10s"));
        }
        if self.operator_cert_ttl < Duration::from_secs(60) {
            return Err(invalid("operator_cert_ttl", "must be at least 60s"));
        }
        if self.reenroll_grace > MAX_REENROLL_GRACE {
            return Err(invalid(
                "reenroll_grace",
                "must be at most 365 days (0s turns re-enrollment of expired agent certificates off)",
            ));
        }
        if self.token_ttl.is_zero() || self.token_ttl > MAX_TOKEN_TTL {
            return Err(invalid("token_ttl", "must be between 1s and 7 days"));
        }
        // Every duration has an upper bound too: a certificate life of `100000000y` would
        // overflow the clock when a certificate is signed.
        let secs = Duration::from_secs;
        let day = 86_400;
        for (key, value, min, max) in [
            (
                "agent_cert_ttl",
                self.agent_cert_ttl,
                secs(10),
                MAX_AGENT_CERT_TTL,
            ),
            (
                "operator_cert_ttl",
                self.operator_cert_ttl,
                secs(60),
                MAX_OPERATOR_CERT_TTL,
            ),
            (
                "heartbeat_interval",
                self.heartbeat_interval,
                Duration::from_millis(1),
                secs(300),
            ),
            (
                "suspect_after",
                self.suspect_after,
                Duration::from_millis(1),
                secs(3600),
            ),
            (
                "down_after",
                self.down_after,
                Duration::from_millis(1),
                secs(day),
            ),
            (
                "scheduler_tick",
                self.scheduler_tick,
                Duration::ZERO,
                secs(3600),
            ),
            (
                "alerts_every",
                self.alerts_every,
                Duration::ZERO,
                secs(3600),
            ),
            ("alert_resend", self.alert_resend, secs(1), secs(30 * day)),
        ] {
            check_duration(value, min, max).map_err(|m| invalid(key, &m.to_string()))?;
        }
        if self.heartbeat_interval.is_zero() {
            return Err(invalid("heartbeat_interval", "must be more than 0s"));
        }
        if self.suspect_after <= self.heartbeat_interval {
            return Err(invalid(
                "suspect_after",
                "must be longer than heartbeat_interval",
            ));
        }
        if self.down_after <= self.suspect_after {
            return Err(invalid("down_after", "must be longer than suspect_after"));
        }
        if self.alert_resend.is_zero() {
            return Err(invalid("alert_resend", "must be more than 0s"));
        }
        if let Err((key, message)) = self.connections.check() {
            return Err(invalid(key, &message));
        }
        if let Err((key, message)) = crate::notify::check_webhooks(&self.notify.webhook) {
            return Err(invalid(key, &message));
        }
        if let Some(email) = &self.notify.email
            && let Err((key, message)) = crate::notify::check_email(email)
        {
            return Err(invalid(key, &message));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_in_the_repo_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/controller.toml");
        let config = ControllerConfig::from_file(&path).unwrap();
        let defaults = ControllerConfig::default();
        assert_eq!(config.listen, defaults.listen);
        assert_eq!(config.agent_cert_ttl, defaults.agent_cert_ttl);
        assert_eq!(
            config.operator_cert_ttl,
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(config.reenroll_grace, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(config.suspect_after, Duration::from_secs(15));
        assert_eq!(config.down_after, Duration::from_secs(30));
        assert_eq!(config.alerts_every, Duration::from_secs(30));
        assert_eq!(config.alert_resend, Duration::from_secs(4 * 3600));
        assert!(config.notify.webhook.is_empty());
        assert_eq!(config.connections, ConnectionsConfig::default());
    }

    /// `[connections]` (issue 11, item 2): every cap and timeout has a range, refused naming
    /// the key; a per-source cap may not exceed its total.
    #[test]
    fn connection_caps_and_timeouts_are_bounded() {
        for (text, key) in [
            ("max = 0", "connections.max"),
            ("max = 2000000", "connections.max"),
            ("max_per_ip = 0", "connections.max_per_ip"),
            ("max = 100\nmax_per_ip = 101", "connections.max_per_ip"),
            ("max_unauthenticated = 0", "connections.max_unauthenticated"),
            (
                "max = 100\nmax_per_ip = 100\nmax_unauthenticated = 101",
                "connections.max_unauthenticated",
            ),
            (
                "max_unauthenticated = 10\nmax_unauthenticated_per_ip = 11",
                "connections.max_unauthenticated_per_ip",
            ),
            (
                "handshake_timeout = \"0s\"",
                "connections.handshake_timeout",
            ),
            (
                "handshake_timeout = \"1h\"",
                "connections.handshake_timeout",
            ),
            (
                "first_request_timeout = \"10ms\"",
                "connections.first_request_timeout",
            ),
            ("idle_timeout = \"100000000y\"", "connections.idle_timeout"),
            ("idle_timeout = \"0s\"", "connections.idle_timeout"),
            (
                "unauthenticated_lifetime = \"2h\"",
                "connections.unauthenticated_lifetime",
            ),
        ] {
            let err = ControllerConfig::from_toml(&format!("[connections]\n{text}"), "c.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("invalid config c.toml: key `{key}`: ")),
                "{text}: {err}"
            );
            assert!(err.contains("out of range"), "{err}");
        }
        let err = ControllerConfig::from_toml("[connections]\nmax_connections = 5", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_connections"), "{err}");
        let config = ControllerConfig::from_toml(
            "[connections]\nmax = 100\nmax_per_ip = 100\nmax_unauthenticated = 10\n\
             max_unauthenticated_per_ip = 10\nhandshake_timeout = \"500ms\"\n\
             idle_timeout = \"1s\"\nunauthenticated_lifetime = \"1h\"",
            "c.toml",
        )
        .unwrap();
        assert_eq!(config.connections.max, 100);
        assert_eq!(
            config.connections.handshake_timeout,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn notify_config_parses_and_refuses_plain_http_off_this_machine() {
        let text = r#"
            alert_resend = "1h"
            [[notify.webhook]]
            url = "http://127.0.0.1:9000/hook"
            [[notify.webhook]]
            name = "ops-slack"
            url = "https://hooks.example.org/services/T000/B000/SECRET"
            format = "slack"
        "#;
        let config = ControllerConfig::from_toml(text, "c.toml").unwrap();
        assert_eq!(config.notify.webhook.len(), 2);
        assert_eq!(config.notify.webhook[0].format, WebhookFormat::Json);
        assert_eq!(config.notify.webhook[1].format, WebhookFormat::Slack);
        assert_eq!(
            crate::notify::Notifier::new(&config.notify).channels(),
            ["webhook:webhook-e26ff300", "webhook:ops-slack"]
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("SECRET"), "{debug}");
        let err = ControllerConfig::from_toml(
            "[[notify.webhook]]\nurl = \"http://hooks.example.org/services/T000/B000/SECRET\"",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("notify.webhook.url"), "{err}");
        assert!(
            err.contains("loopback") && err.contains("https://"),
            "{err}"
        );
        assert!(!err.contains("SECRET"), "{err}");
        let err = ControllerConfig::from_toml(
            "[[notify.webhook]]\nurl = \"https://hooks.example.org/x\"\nca_file = \"/nonexistent/ca.pem\"",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("notify.webhook.ca_file"), "{err}");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let email = "[notify.email]\nserver = \"mail.example\"\nfrom = \"drover@example.org\"\nto = [\"ops@example.org\"]\nstarttls = false";
        let err = ControllerConfig::from_toml(email, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("notify.email.starttls"), "{err}");
        let ok = email.replace("mail.example", "127.0.0.1");
        let config = ControllerConfig::from_toml(&ok, "c.toml").unwrap();
        assert_eq!(config.notify.email.unwrap().port(), 25);
        let bad = ok.replace("ops@example.org", "not an address");
        let err = ControllerConfig::from_toml(&bad, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("notify.email.to"), "{err}");
    }

    #[test]
    fn smtp_password_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("smtp-password");
        std::fs::write(&pw, "hunter2\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "[notify.email]\nserver = \"smtp.example.org\"\nfrom = \"drover@example.org\"\n\
             to = [\"ops@example.org\"]\nusername = \"drover\"\npassword_file = \"{}\"",
            pw.display()
        );
        let err = ControllerConfig::from_toml(&text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("notify.email.password_file"), "{err}");
        assert!(
            err.contains("chmod 600") && err.contains("smtp-password"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = ControllerConfig::from_toml(&text, "c.toml").unwrap();
        let email = config.notify.email.unwrap();
        assert_eq!(email.username.as_deref(), Some("drover"));
        assert!(!format!("{email:?}").contains("hunter2"));
        let err = ControllerConfig::from_toml(
            &format!("{text}\nca_file = \"{}\"", pw.display()),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("notify.email.ca_file"), "{err}");
    }

    /// `operator_cert_ttl = "100000000y"` panicked the controller and `agent_cert_ttl` every
    /// enrollment (issue 11, item 8): refused at validation, naming the key.
    #[test]
    fn every_duration_is_bounded() {
        for (text, key) in [
            ("operator_cert_ttl = \"100000000y\"", "operator_cert_ttl"),
            ("agent_cert_ttl = \"100000000y\"", "agent_cert_ttl"),
            ("agent_cert_ttl = \"91d\"", "agent_cert_ttl"),
            (
                "heartbeat_interval = \"18446744073709551615s\"",
                "heartbeat_interval",
            ),
            (
                "suspect_after = \"100000000y\"\ndown_after = \"200000000y\"",
                "suspect_after",
            ),
            ("scheduler_tick = \"100000000y\"", "scheduler_tick"),
            ("alerts_every = \"100000000y\"", "alerts_every"),
            ("alert_resend = \"100000000y\"", "alert_resend"),
        ] {
            let err = ControllerConfig::from_toml(text, "c.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("invalid config c.toml: key `{key}`: ")),
                "{err}"
            );
            assert!(err.contains("out of range"), "{err}");
        }
        ControllerConfig::from_toml(
            "agent_cert_ttl = \"90d\"\noperator_cert_ttl = \"366d\"",
            "c.toml",
        )
        .unwrap();
    }

    #[test]
    fn reenroll_grace_is_bounded() {
        let config = ControllerConfig::from_toml("reenroll_grace = \"0s\"", "c.toml").unwrap();
        assert!(config.reenroll_grace.is_zero());
        let err = ControllerConfig::from_toml("reenroll_grace = \"366d\"", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`reenroll_grace`") && err.contains("365 days"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_file_and_key() {
        let err = ControllerConfig::from_toml("down_after = \"10s\"", "c.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config c.toml: key `down_after`: must be longer than suspect_after"
        );
        let err = ControllerConfig::from_toml("listen = \"nowhere\"", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid config file c.toml"), "{err}");
    }
}
