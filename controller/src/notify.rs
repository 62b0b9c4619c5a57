//! Notifications: the only module of the controller that sends anything about alerts to the
//! outside. Webhooks over HTTP/1.1 (hyper-util's client), as generic JSON or Slack-compatible
//! `{"text": ...}`, and SMTP e-mail (lettre). Plain `http://` only for webhooks: an `https://`
//! URL is refused when the config is validated (no TLS client for webhooks yet). E-mail uses
//! STARTTLS, or plain SMTP to a loopback relay only.
//!
//! Every request has a timeout, so a hung receiver cannot hold the alert tick.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::alerts::AlertRecord;
use crate::config::{EmailConfig, NotifyConfig, WebhookConfig, WebhookFormat};
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

/// How long one webhook request may take, connection included.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Resolved => "resolved",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("webhook {url}: {message}")]
    Webhook { url: String, message: String },
    #[error("e-mail via {server}: {message}")]
    Email { server: String, message: String },
}

/// Whether an `[notify.email]` section can be used: (key, message) when not.
pub fn check_email(email: &EmailConfig) -> Result<(), (&'static str, String)> {
    if email.server.trim().is_empty() {
        return Err(("notify.email.server", "must not be empty".into()));
    }
    if !email.starttls && !is_loopback(&email.server) {
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
    Ok(())
}

fn is_loopback(server: &str) -> bool {
    server == "localhost"
        || server
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The e-mail's subject and text.
pub fn email_text(alert: &AlertRecord, status: Status) -> (String, String) {
    let subject = match status {
        Status::Open => format!("[drover] OPEN {}", alert.key),
        Status::Resolved => format!("[drover] RESOLVED {}", alert.key),
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

/// Whether a webhook URL can be used: `http://host[:port]/path`.
pub fn check_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "`{url}`: https webhooks are not supported yet (no TLS client is built in); \
                 use http:// to a local relay"
            ));
        }
        _ => return Err(format!("`{url}`: must start with http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}`: has no host"));
    }
    Ok(uri)
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
    };
    serde_json::json!({ "text": text })
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Sends alerts to every configured webhook.
#[derive(Debug, Clone)]
pub struct Notifier {
    webhooks: Vec<WebhookConfig>,
    client: Client<HttpConnector, Full<Bytes>>,
    email: Option<EmailConfig>,
}

impl Notifier {
    pub fn new(config: &NotifyConfig) -> Notifier {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(SEND_TIMEOUT));
        Notifier {
            webhooks: config.webhook.clone(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            email: config.email.clone(),
        }
    }

    /// Sends `alert` with `status` to every webhook; an error names the first that failed
    /// (the others were still tried).
    pub async fn send(&self, alert: &AlertRecord, status: Status) -> Result<(), NotifyError> {
        let mut first_error = None;
        for hook in &self.webhooks {
            if let Err(e) = self.post(hook, alert, status).await {
                first_error.get_or_insert(e);
            }
        }
        if let Some(email) = &self.email
            && let Err(e) = send_email(email, alert, status).await
        {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn post(
        &self,
        hook: &WebhookConfig,
        alert: &AlertRecord,
        status: Status,
    ) -> Result<(), NotifyError> {
        let fail = |message: String| NotifyError::Webhook {
            url: hook.url.clone(),
            message,
        };
        let uri = check_url(&hook.url).map_err(fail)?;
        let body = match hook.format {
            WebhookFormat::Json => json_body(alert, status),
            WebhookFormat::Slack => slack_body(alert, status),
        };
        let request = hyper::Request::post(uri)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "drover-controller")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| fail(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
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
    let transport = if email.starttls {
        AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&email.server)
            .map_err(|e| fail(e.to_string()))?
    } else {
        // Plain SMTP: only to a loopback relay (checked by the config).
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&email.server)
    }
    .port(email.port())
    .timeout(Some(SEND_TIMEOUT))
    .build();
    match tokio::time::timeout(SEND_TIMEOUT * 2, transport.send(message)).await {
        Ok(result) => result.map(|_| ()).map_err(|e| fail(e.to_string())),
        Err(_) => Err(fail(format!("no answer within {:?}", SEND_TIMEOUT * 2))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(check_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(
            check_url("https://hooks.slack.com/x")
                .unwrap_err()
                .contains("https")
        );
        assert!(check_url("ftp://x/y").is_err());
        assert!(check_url("not a url").is_err());
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
