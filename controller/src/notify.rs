//! Notifications: the only module of the controller that sends anything about alerts to the
//! outside. Each configured destination is a channel with a stable id (`webhook:<name>`,
//! `email`), sent to one at a time by [`Notifier::send_to`], so the alert task can retry only
//! the channels that failed.
//!
//! Webhooks: HTTP/1.1 over hyper-util's client and hyper-rustls, as generic JSON or
//! Slack-compatible `{"text": ...}`. `https://` to any host, trusting the system's roots plus
//! the webhook's optional `ca_file`; plain `http://` only to a loopback host. E-mail: SMTP
//! through lettre, STARTTLS by default (the system's roots plus an optional `ca_file`), plain
//! SMTP to a loopback relay only; SMTP AUTH (PLAIN or LOGIN) with the password read from a
//! file that must be private to its owner.
//!
//! A webhook URL's path is a secret (a Slack hook's path is its key): errors, logs and `Debug`
//! show only scheme://host[:port] and the webhook's name. The SMTP password is read at each
//! send and never shown. Every request has a timeout, so a hung receiver cannot hold the tick.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use tracing::warn;

use drover_identity::files::{PrivateFileError, read_private_file};
use drover_identity::tls::is_loopback_host;
use drover_model::error::chain as error_chain;

use serde::Deserialize;

use crate::alerts::AlertRecord;

/// Where alerts go (`[notify]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// `[[notify.webhook]]`
    pub webhook: Vec<WebhookConfig>,
    /// `[notify.email]`
    pub email: Option<EmailConfig>,
}

/// SMTP e-mail: STARTTLS by default; plain SMTP only to a loopback server (a local relay).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub server: String,
    /// Default 587 with STARTTLS, 25 without.
    #[serde(default)]
    pub port: Option<u16>,
    pub from: String,
    pub to: Vec<String>,
    #[serde(default = "yes")]
    pub starttls: bool,
    /// SMTP AUTH user (PLAIN or LOGIN, whichever the server offers); needs `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// The file holding the SMTP password (its first line), mode 0600 or stricter. The
    /// password itself never appears in the config, a log or an error.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM certificates trusted for the server's STARTTLS certificate, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            server: String::new(),
            port: None,
            from: String::new(),
            to: Vec::new(),
            starttls: true,
            username: None,
            password_file: None,
            ca_file: None,
        }
    }
}

impl EmailConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.starttls { 587 } else { 25 })
    }
}

/// One webhook: `url` (`https://`, or `http://` to a loopback host), `format` (`json` or
/// `slack`), an optional `name` and an optional `ca_file`.
///
/// The URL's path can be a secret (a Slack hook's is): `Debug` shows only scheme://host[:port].
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the channel in logs, errors and the alert's delivery state; default `webhook-`
    /// and 8 hex digits of the URL's SHA-256 (so it does not change when the list is
    /// reordered).
    #[serde(default)]
    pub name: Option<String>,
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
    /// PEM certificates trusted for this webhook's server, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &url_origin(&self.url))
            .field("format", &self.format)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// `{"alert", "status", "kind", "subject", "message", "opened_at"}`
    #[default]
    Json,
    /// `{"text": "..."}` (Slack incoming webhooks and compatible chat servers)
    Slack,
}

/// How long one webhook request may take, connection included.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Events waiting for delivery at most; beyond, new ones are dropped (and logged).
pub const EVENTS_BUFFER: usize = 1024;

/// The channel id of `[notify.email]`.
pub const EMAIL_CHANNEL: &str = "email";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    Resolved,
    /// Something happened that needs no resolving (a release started, passed a wave, halted,
    /// reverted or finished): sent once, best effort.
    Event,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Resolved => "resolved",
            Status::Event => "event",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `origin` is scheme://host[:port], never the path (it may be the hook's secret).
    #[error("webhook `{name}` ({origin}): {message}")]
    Webhook {
        name: String,
        origin: String,
        message: String,
    },
    #[error("e-mail via {server}: {message}")]
    Email { server: String, message: String },
    #[error("no notification channel `{0}` is configured")]
    UnknownChannel(String),
}

/// A webhook's name: its `name`, else `webhook-` and 8 hex digits of its URL's SHA-256 (stable
/// when the list is reordered; the URL itself, which may hold a secret, is never shown).
pub fn webhook_name(hook: &WebhookConfig) -> String {
    use sha2::Digest;
    match &hook.name {
        Some(name) => name.clone(),
        None => {
            let digest = hex::encode(sha2::Sha256::digest(hook.url.as_bytes()));
            format!("webhook-{}", &digest[..8])
        }
    }
}

/// The channel id of a webhook called `name`.
pub fn webhook_channel(name: &str) -> String {
    format!("webhook:{name}")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Whether the `[[notify.webhook]]` list can be used: (key, message) when not. Messages name
/// the webhook and its scheme://host[:port], never the URL's path or query.
pub fn check_webhooks(hooks: &[WebhookConfig]) -> Result<(), (&'static str, String)> {
    let mut names = std::collections::BTreeSet::new();
    for hook in hooks {
        let name = webhook_name(hook);
        if !valid_name(&name) {
            return Err((
                "notify.webhook.name",
                format!("`{name}`: use 1 to 63 letters, digits, `-`, `_` or `.`"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err((
                "notify.webhook.name",
                format!("`{name}` names two webhooks: give each its own name"),
            ));
        }
        check_url(&hook.url)
            .map_err(|message| ("notify.webhook.url", format!("webhook `{name}`: {message}")))?;
        if hook.ca_file.is_some() && !hook.url.trim_start().starts_with("https://") {
            return Err((
                "notify.webhook.ca_file",
                format!("webhook `{name}`: ca_file applies to https:// webhooks only; remove it"),
            ));
        }
        if let Some(path) = &hook.ca_file {
            root_store(Vec::new(), Some(path))
                .map_err(|e| ("notify.webhook.ca_file", format!("webhook `{name}`: {e}")))?;
        }
    }
    Ok(())
}

/// Whether an `[notify.email]` section can be used: (key, message) when not.
pub fn check_email(email: &EmailConfig) -> Result<(), (&'static str, String)> {
    if email.server.trim().is_empty() {
        return Err(("notify.email.server", "must not be empty".into()));
    }
    // This also keeps credentials off the wire in the clear: they go over STARTTLS or to a
    // loopback relay only.
    if !email.starttls && !is_loopback_host(&email.server) {
        return Err((
            "notify.email.starttls",
            format!(
                "plain SMTP (starttls = false) is only allowed to a loopback server, not `{}`",
                email.server
            ),
        ));
    }
    email
        .from
        .parse::<Mailbox>()
        .map_err(|e| ("notify.email.from", format!("`{}`: {e}", email.from)))?;
    if email.to.is_empty() {
        return Err(("notify.email.to", "needs at least one address".into()));
    }
    for to in &email.to {
        to.parse::<Mailbox>()
            .map_err(|e| ("notify.email.to", format!("`{to}`: {e}")))?;
    }
    match (&email.username, &email.password_file) {
        (None, None) => {}
        (Some(_), None) => {
            return Err((
                "notify.email.password_file",
                "`username` needs `password_file` (a file holding the password, mode 0600)".into(),
            ));
        }
        (None, Some(_)) => {
            return Err((
                "notify.email.username",
                "`password_file` needs `username`".into(),
            ));
        }
        (Some(user), Some(path)) => {
            if user.trim().is_empty() {
                return Err(("notify.email.username", "must not be empty".into()));
            }
            read_password_file(path).map_err(|m| ("notify.email.password_file", m.to_string()))?;
        }
    }
    if let Some(path) = &email.ca_file {
        if !email.starttls {
            return Err((
                "notify.email.ca_file",
                "applies to STARTTLS only (starttls = false sends plain SMTP); remove it".into(),
            ));
        }
        root_store(Vec::new(), Some(path)).map_err(|m| ("notify.email.ca_file", m.to_string()))?;
    }
    Ok(())
}

/// Reads an SMTP password file: its first line. Refused unless private to its owner (no
/// access for group or others), like the other secret files Drover reads.
pub fn read_password_file(path: &Path) -> Result<String, PasswordFileError> {
    let file = path.to_path_buf();
    let text = read_private_file(path).map_err(|e| match e {
        PrivateFileError::Missing => PasswordFileError::Missing { file: file.clone() },
        PrivateFileError::Unreadable(err) => PasswordFileError::Unreadable {
            file: file.clone(),
            err,
        },
        PrivateFileError::Open { mode } => PasswordFileError::Open {
            file: file.clone(),
            mode,
        },
    })?;
    match text.lines().next() {
        Some(line) if !line.is_empty() => Ok(line.to_string()),
        _ => Err(PasswordFileError::Empty { file }),
    }
}

/// The PEM certificates of a `ca_file`, each checked to be usable as a trust anchor.
fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let file = || path.to_path_buf();
    let pem = std::fs::read(path).map_err(|err| CaFileError::Unreadable { file: file(), err })?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| CaFileError::Pem { file: file(), err })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty { file: file() });
    }
    Ok(certs)
}

/// `native` roots plus those of `ca_file`.
fn root_store(
    native: Vec<CertificateDer<'static>>,
    ca_file: Option<&Path>,
) -> Result<RootCertStore, CaFileError> {
    let mut roots = RootCertStore::empty();
    // A system store may hold a certificate rustls cannot use; the others still count.
    roots.add_parsable_certificates(native);
    if let Some(path) = ca_file {
        for (i, cert) in read_ca_file(path)?.into_iter().enumerate() {
            roots.add(cert).map_err(|err| CaFileError::Unusable {
                file: path.to_path_buf(),
                number: i + 1,
                err,
            })?;
        }
    }
    Ok(roots)
}

/// A `ca_file` that cannot be used as trust roots.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read {}: {err}", file.display())]
    Unreadable { file: PathBuf, err: std::io::Error },
    #[error("{} is not valid PEM: {err}", file.display())]
    Pem { file: PathBuf, err: std::io::Error },
    #[error(
        "{} holds no PEM certificate (want -----BEGIN CERTIFICATE-----)",
        file.display()
    )]
    Empty { file: PathBuf },
    #[error(
        "{}: certificate {number} is not a usable CA certificate: {err}",
        file.display()
    )]
    Unusable {
        file: PathBuf,
        number: usize,
        err: rustls::Error,
    },
}

/// The system's root certificates (read once per [`Notifier`]).
fn native_roots() -> Vec<CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        warn!(
            errors = found.errors.len(),
            "no system root certificates found: https webhooks trust only their ca_file"
        );
    }
    found.certs
}

/// scheme://host[:port] of a webhook URL: what errors and logs may show of it.
pub fn url_origin(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(uri) => origin(&uri),
        Err(_) => "(not a URL)".to_string(),
    }
}

fn origin(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("?");
    let host = uri.host().unwrap_or("");
    match uri.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

/// An SMTP password file that cannot be used; never holds the password.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("{} does not exist", file.display())]
    Missing { file: PathBuf },
    #[error("cannot read {}: {err}", file.display())]
    Unreadable { file: PathBuf, err: std::io::Error },
    #[error(
        "{} is open to group or others (mode {mode:o}): run `chmod 600 {}`",
        file.display(),
        file.display()
    )]
    Open { file: PathBuf, mode: u32 },
    #[error("{} is empty: the password goes on its first line", file.display())]
    Empty { file: PathBuf },
}

/// Whether a webhook URL can be used: `https://host[:port]/path`, or `http://` to a loopback
/// host. Messages show scheme://host[:port] at most.
pub fn check_url(url: &str) -> Result<Uri, UrlError> {
    let uri: Uri = url.parse().map_err(UrlError::Parse)?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost);
    }
    let shown = origin(&uri);
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(UrlError::UserInfo(shown));
    }
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if uri.host().is_some_and(is_loopback_host) => Ok(uri),
        Some("http") => Err(UrlError::PlainHttp(shown)),
        _ => Err(UrlError::Scheme(shown)),
    }
}

/// A webhook URL [`check_url`] refuses; holds scheme://host[:port] at most, never the path.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("not a URL: {0}")]
    Parse(hyper::http::uri::InvalidUri),
    #[error("the URL has no host")]
    NoHost,
    #[error("{0}: user:password@ in the URL is not supported")]
    UserInfo(String),
    #[error(
        "{0}: plain http:// is only allowed to a loopback host (127.0.0.0/8, ::1, \
         localhost); use https:// (with `ca_file` for a private CA)"
    )]
    PlainHttp(String),
    #[error("{0}: must start with https:// (or http:// to a loopback host)")]
    Scheme(String),
}

/// Cuts `uri`'s path and query out of `message`, in case a lower layer quoted them.
fn redact(message: &str, uri: &Uri) -> String {
    let mut text = message.to_string();
    for (secret, shown) in [
        (
            uri.path_and_query().map(|pq| pq.as_str()).unwrap_or(""),
            "/…",
        ),
        (uri.path(), "/…"),
        (uri.query().unwrap_or(""), "…"),
    ] {
        if secret.len() > 1 {
            text = text.replace(secret, shown);
        }
    }
    text
}

/// The e-mail's subject and text.
pub fn email_text(alert: &AlertRecord, status: Status) -> (String, String) {
    let subject = match status {
        Status::Open => format!("[drover] OPEN {}", alert.key),
        Status::Resolved => format!("[drover] RESOLVED {}", alert.key),
        Status::Event => format!("[drover] {}", alert.message),
    };
    let body = format!(
        "{}\n\nalert: {}\nstatus: {}\nkind: {}\nsubject: {}\nopened at: {}\n",
        alert.message,
        alert.key,
        status.as_str(),
        alert.kind,
        alert.subject,
        rfc3339(alert.opened_unix_ms)
    );
    (subject, body)
}

/// The generic JSON body.
pub fn json_body(alert: &AlertRecord, status: Status) -> serde_json::Value {
    serde_json::json!({
        "alert": alert.key,
        "status": status.as_str(),
        "kind": alert.kind,
        "subject": alert.subject,
        "message": alert.message,
        "opened_at": rfc3339(alert.opened_unix_ms),
    })
}

/// The Slack-compatible body.
pub fn slack_body(alert: &AlertRecord, status: Status) -> serde_json::Value {
    let text = match status {
        Status::Open => format!(
            ":rotating_light: [drover] {} — {} (since {})",
            alert.key,
            alert.message,
            rfc3339(alert.opened_unix_ms)
        ),
        Status::Resolved => format!(":white_check_mark: [drover] resolved: {}", alert.key),
        Status::Event => format!(":information_source: [drover] {}", alert.message),
    };
    serde_json::json!({ "text": text })
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One webhook, ready to post to.
#[derive(Clone)]
struct Webhook {
    id: String,
    name: String,
    origin: String,
    format: WebhookFormat,
    /// The parsed URL and its client, or why there is none (the config is validated before,
    /// so this is a `ca_file` that went away in between, or a test that skipped validation).
    ready: Result<(Uri, HttpsClient), String>,
}

impl Webhook {
    fn new(hook: &WebhookConfig, native: &mut Option<Vec<CertificateDer<'static>>>) -> Webhook {
        let name = webhook_name(hook);
        let ready = check_url(&hook.url)
            .map_err(|e| e.to_string())
            .and_then(|uri| {
                let roots = if uri.scheme_str() == Some("https") {
                    native.get_or_insert_with(native_roots).clone()
                } else {
                    Vec::new()
                };
                let roots =
                    root_store(roots, hook.ca_file.as_deref()).map_err(|e| e.to_string())?;
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS setup: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                let mut http = HttpConnector::new();
                http.enforce_http(false);
                http.set_connect_timeout(Some(SEND_TIMEOUT));
                let connector = HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http);
                Ok((uri, Client::builder(TokioExecutor::new()).build(connector)))
            });
        Webhook {
            id: webhook_channel(&name),
            origin: url_origin(&hook.url),
            name,
            format: hook.format,
            ready,
        }
    }
}

/// Sends alerts to the configured channels, one channel at a time.
#[derive(Clone)]
pub struct Notifier {
    webhooks: Vec<Webhook>,
    email: Option<EmailConfig>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("channels", &self.channels())
            .finish()
    }
}

impl Notifier {
    pub fn new(config: &NotifyConfig) -> Notifier {
        let mut native = None;
        Notifier {
            webhooks: config
                .webhook
                .iter()
                .map(|hook| Webhook::new(hook, &mut native))
                .collect(),
            email: config.email.clone(),
        }
    }

    /// The channel ids, in the order they are tried: the webhooks in configured order, then
    /// the e-mail.
    pub fn channels(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.webhooks.iter().map(|h| h.id.clone()).collect();
        if self.email.is_some() {
            ids.push(EMAIL_CHANNEL.to_string());
        }
        ids
    }

    /// Sends `alert` with `status` to the one channel `channel`.
    pub async fn send_to(
        &self,
        channel: &str,
        alert: &AlertRecord,
        status: Status,
    ) -> Result<(), NotifyError> {
        if channel == EMAIL_CHANNEL
            && let Some(email) = &self.email
        {
            return send_email(email, alert, status).await;
        }
        match self.webhooks.iter().find(|h| h.id == channel) {
            Some(hook) => post(hook, alert, status).await,
            None => Err(NotifyError::UnknownChannel(channel.to_string())),
        }
    }
}

async fn post(hook: &Webhook, alert: &AlertRecord, status: Status) -> Result<(), NotifyError> {
    let fail = |message: String| NotifyError::Webhook {
        name: hook.name.clone(),
        origin: hook.origin.clone(),
        message,
    };
    let (uri, client) = hook.ready.as_ref().map_err(|e| fail(e.clone()))?;
    let body = match hook.format {
        WebhookFormat::Json => json_body(alert, status),
        WebhookFormat::Slack => slack_body(alert, status),
    };
    let request = hyper::Request::post(uri.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "drover-controller")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| fail(redact(&error_chain(&e), uri)))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| redact(&error_chain(&e), uri))?;
        let code = response.status();
        // Read the body so the connection can be reused.
        let _ = response.into_body().collect().await;
        if code.is_success() {
            Ok(())
        } else {
            Err(format!("answered {code}"))
        }
    };
    match tokio::time::timeout(SEND_TIMEOUT, exchange).await {
        Ok(result) => result.map_err(fail),
        Err(_) => Err(fail(format!("no answer within {SEND_TIMEOUT:?}"))),
    }
}

async fn send_email(
    email: &EmailConfig,
    alert: &AlertRecord,
    status: Status,
) -> Result<(), NotifyError> {
    let fail = |message: String| NotifyError::Email {
        server: format!("{}:{}", email.server, email.port()),
        message,
    };
    let (subject, body) = email_text(alert, status);
    let mut builder = lettre::Message::builder()
        .from(
            email
                .from
                .parse::<Mailbox>()
                .map_err(|e| fail(e.to_string()))?,
        )
        .subject(subject);
    for to in &email.to {
        builder = builder.to(to.parse::<Mailbox>().map_err(|e| fail(e.to_string()))?);
    }
    let message = builder.body(body).map_err(|e| fail(e.to_string()))?;
    // Plain SMTP only to a loopback relay (checked by the config).
    let mut transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&email.server)
        .port(email.port())
        .timeout(Some(SEND_TIMEOUT));
    if email.starttls {
        let mut tls = TlsParameters::builder(email.server.clone());
        if let Some(path) = &email.ca_file {
            for der in read_ca_file(path).map_err(|e| fail(e.to_string()))? {
                let cert = Certificate::from_der(der.to_vec())
                    .map_err(|e| fail(format!("{}: {}", path.display(), error_chain(&e))))?;
                tls = tls.add_root_certificate(cert);
            }
        }
        let tls = tls
            .build_rustls()
            .map_err(|e| fail(format!("TLS setup: {}", error_chain(&e))))?;
        transport = transport.tls(Tls::Required(tls));
    }
    if let (Some(user), Some(path)) = (&email.username, &email.password_file) {
        let password = read_password_file(path).map_err(|e| fail(e.to_string()))?;
        transport = transport.credentials(Credentials::new(user.clone(), password));
    }
    let transport = transport.build();
    match tokio::time::timeout(SEND_TIMEOUT * 2, transport.send(message)).await {
        Ok(result) => result.map(|_| ()).map_err(|e| fail(error_chain(&e))),
        Err(_) => Err(fail(format!("no answer within {:?}", SEND_TIMEOUT * 2))),
    }
}

/// Sends each event from `events` to every channel, one after another in the order they came
/// (best effort: a channel that fails is logged, not retried), until `shutdown` or the sender
/// side is gone.
pub async fn deliver_events(
    notifier: Notifier,
    mut events: tokio::sync::mpsc::Receiver<AlertRecord>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        for channel in notifier.channels() {
            if let Err(e) = notifier.send_to(&channel, &event, Status::Event).await {
                tracing::warn!(channel = %channel, event = %event.kind, error = %e, "event not delivered");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SECRET_URL: &str = "https://hooks.example.org/services/T000/B000/SECRET?token=SECRET";

    #[test]
    fn urls() {
        assert!(check_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(check_url("http://127.1.2.3/hook").is_ok());
        assert!(check_url("http://[::1]:8080/hook").is_ok());
        assert!(check_url("http://LocalHost:8080/hook").is_ok());
        assert!(check_url("https://hooks.example.org/x").is_ok());
        assert!(check_url("https://127.0.0.1:8443/x").is_ok());
        let err = check_url("http://chat.example.org/hooks/x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("loopback") && err.contains("https://"),
            "{err}"
        );
        assert!(err.contains("http://chat.example.org"), "{err}");
        assert!(!err.contains("/hooks/x"), "{err}");
        assert!(check_url("ftp://example.org/y").is_err());
        assert!(check_url("not a url").is_err());
        assert!(check_url("/just/a/path").is_err());
        let err = check_url("https://user:SECRET@hooks.example.org/x")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("SECRET"), "{err}");
    }

    #[test]
    fn origins_never_show_the_path() {
        assert_eq!(url_origin(SECRET_URL), "https://hooks.example.org");
        assert_eq!(
            url_origin("http://127.0.0.1:9000/a/b"),
            "http://127.0.0.1:9000"
        );
        let hook = WebhookConfig {
            url: SECRET_URL.into(),
            ..WebhookConfig::default()
        };
        let debug = format!("{hook:?}");
        assert!(!debug.contains("SECRET"), "{debug}");
        let uri: Uri = SECRET_URL.parse().unwrap();
        let quoted = format!("error at {SECRET_URL} and {}", uri.path());
        let text = redact(&quoted, &uri);
        assert!(!text.contains("SECRET"), "{text}");
    }

    #[tokio::test]
    async fn a_failed_webhook_error_does_not_show_the_url_path() {
        // A real request to a closed port on this machine: the error is the real one.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("https://127.0.0.1:{port}/services/T000/B000/SECRET");
        let notifier = Notifier::new(&NotifyConfig {
            webhook: vec![WebhookConfig {
                name: Some("slack".into()),
                url,
                ..WebhookConfig::default()
            }],
            email: None,
        });
        assert_eq!(notifier.channels(), ["webhook:slack"]);
        let err = notifier
            .send_to("webhook:slack", &AlertRecord::default(), Status::Open)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("webhook `slack` (https://127.0.0.1:{port}): ")),
            "{err}"
        );
        assert!(
            !err.contains("SECRET") && !err.contains("/services"),
            "{err}"
        );
        let debug = format!("{notifier:?}");
        assert!(!debug.contains("SECRET"), "{debug}");
        // Built directly, the error type shows only what it was given.
        let err = NotifyError::Webhook {
            name: "slack".into(),
            origin: url_origin(SECRET_URL),
            message: redact(
                &format!("failed: {SECRET_URL}"),
                &SECRET_URL.parse().unwrap(),
            ),
        }
        .to_string();
        assert!(!err.contains("SECRET"), "{err}");
        assert!(
            notifier
                .send_to("email", &AlertRecord::default(), Status::Open)
                .await
                .is_err()
        );
    }

    #[test]
    fn webhook_names_and_channels() {
        let hook = |name: Option<&str>, url: &str| WebhookConfig {
            name: name.map(str::to_string),
            url: url.into(),
            ..WebhookConfig::default()
        };
        let hooks = vec![
            hook(None, "http://127.0.0.1/a"),
            hook(Some("ops"), "https://hooks.example.org/b"),
        ];
        assert!(check_webhooks(&hooks).is_ok());
        let notifier = Notifier::new(&NotifyConfig {
            webhook: hooks.clone(),
            email: Some(EmailConfig::default()),
        });
        assert_eq!(
            notifier.channels(),
            ["webhook:webhook-531148f0", "webhook:ops", "email"]
        );
        // Unnamed: the id follows the URL, not the position.
        let reordered = Notifier::new(&NotifyConfig {
            webhook: vec![hooks[1].clone(), hooks[0].clone()],
            email: None,
        });
        assert_eq!(
            reordered.channels(),
            ["webhook:ops", "webhook:webhook-531148f0"]
        );
        // A ca_file with plain http is a mistake, not silently ignored.
        let (key, _) = check_webhooks(&[WebhookConfig {
            ca_file: Some("/etc/ssl/ca.pem".into()),
            ..hook(None, "http://127.0.0.1/a")
        }])
        .unwrap_err();
        assert_eq!(key, "notify.webhook.ca_file");
        let twice = vec![
            hook(Some("a"), "http://127.0.0.1/"),
            hook(Some("a"), "http://127.0.0.1/"),
        ];
        let (key, message) = check_webhooks(&twice).unwrap_err();
        assert_eq!(key, "notify.webhook.name");
        assert!(message.contains("two webhooks"), "{message}");
        let (key, _) = check_webhooks(&[hook(Some("a b"), "http://127.0.0.1/")]).unwrap_err();
        assert_eq!(key, "notify.webhook.name");
        let (key, message) = check_webhooks(&[hook(
            Some("slack"),
            "http://hooks.example.org/services/T000/B000/SECRET",
        )])
        .unwrap_err();
        assert_eq!(key, "notify.webhook.url");
        assert!(
            message.starts_with("webhook `slack`: http://hooks.example.org:"),
            "{message}"
        );
        assert!(!message.contains("SECRET"), "{message}");
    }

    #[test]
    fn ca_files_must_hold_pem_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let hook = |path: &Path| WebhookConfig {
            url: "https://hooks.example.org/x".into(),
            ca_file: Some(path.to_path_buf()),
            ..WebhookConfig::default()
        };
        let missing = dir.path().join("missing.pem");
        let (key, message) = check_webhooks(&[hook(&missing)]).unwrap_err();
        assert_eq!(key, "notify.webhook.ca_file");
        assert!(message.contains("missing.pem"), "{message}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let (key, message) = check_webhooks(&[hook(&junk)]).unwrap_err();
        assert_eq!(key, "notify.webhook.ca_file");
        assert!(message.contains("no PEM certificate"), "{message}");
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let (key, message) = check_webhooks(&[hook(&bad)]).unwrap_err();
        assert_eq!(key, "notify.webhook.ca_file");
        assert!(message.contains("bad.pem"), "{message}");
    }

    #[test]
    fn password_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smtp-password");
        std::fs::write(&path, "hunter2\nignored\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_password_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("chmod 600") && err.contains("smtp-password"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password_file(&path).unwrap(), "hunter2");
        std::fs::write(&path, "").unwrap();
        assert!(
            read_password_file(&path)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        let err = read_password_file(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn email_credentials_need_both_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "hunter2\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let base = EmailConfig {
            server: "smtp.example.org".into(),
            from: "drover@example.org".into(),
            to: vec!["ops@example.org".into()],
            ..EmailConfig::default()
        };
        let with = |user: Option<&str>, file: Option<&Path>| EmailConfig {
            username: user.map(str::to_string),
            password_file: file.map(Path::to_path_buf),
            ..base.clone()
        };
        assert!(check_email(&with(Some("drover"), Some(&path))).is_ok());
        assert_eq!(
            check_email(&with(Some("drover"), None)).unwrap_err().0,
            "notify.email.password_file"
        );
        assert_eq!(
            check_email(&with(None, Some(&path))).unwrap_err().0,
            "notify.email.username"
        );
        // Credentials never go in the clear to another machine: plain SMTP is loopback only.
        let plain = EmailConfig {
            starttls: false,
            ..with(Some("drover"), Some(&path))
        };
        assert_eq!(check_email(&plain).unwrap_err().0, "notify.email.starttls");
        let local = EmailConfig {
            server: "127.0.0.1".into(),
            ..plain
        };
        assert!(check_email(&local).is_ok());
    }

    #[test]
    fn bodies() {
        let alert = AlertRecord {
            key: "backup_stale:db".into(),
            kind: "backup_stale".into(),
            subject: "db".into(),
            message: "old".into(),
            opened_unix_ms: 0,
            ..AlertRecord::default()
        };
        let j = json_body(&alert, Status::Open);
        assert_eq!(j["alert"], "backup_stale:db");
        assert_eq!(j["status"], "open");
        assert_eq!(j["opened_at"], "1970-01-01T00:00:00Z");
        let s = slack_body(&alert, Status::Resolved);
        assert!(
            s["text"]
                .as_str()
                .unwrap()
                .contains("resolved: backup_stale:db")
        );
    }
}
