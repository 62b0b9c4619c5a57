//! Notification channels end to end, with time driven by the test: a real controller (its
//! alert task off) raising a `backup_stale` alert at `Alerting::tick(now)`, delivered to local
//! receivers over real sockets and real TLS. Proves an https webhook is reached when its
//! `ca_file` trusts the server and fails with a certificate error (that does not show the
//! URL's secret path) when not; that e-mail goes over STARTTLS with SMTP AUTH (PLAIN and LOGIN)
//! from a private password file, and that a password file open to others is refused; and that
//! a channel that failed is retried alone, so the others never get the message twice.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use drover_controller::alerting::Alerting;
use drover_controller::alerts::AlertRecord;
use drover_controller::config::{EmailConfig, NotifyConfig, WebhookConfig};
use drover_controller::notify::{Notifier, Status};
use drover_controller::server::now_ms;
use drover_e2e::backups::container_target;
use drover_e2e::notify::{SmtpLogin, SmtpSink, TestCa, WebhookReceiver};
use drover_e2e::{TestController, fast_controller_config, init};

const DAY: i64 = 24 * 3600 * 1000;
const KEY: &str = "backup_stale:shop-db";
const SECRET_PATH: &str = "/services/T000/B000/SECRET";

/// Starts `config`'s controller with one backup target applied: three days later (no backup
/// ever ran) its `backup_stale` alert opens.
async fn controller_with_a_target(config: drover_controller::ControllerConfig) -> TestController {
    config.validate().expect("the test config is valid");
    let controller = TestController::start(config).await;
    controller.apply_target(&container_target("shop-db")).await;
    controller
}

/// Plain-http webhooks at `hook`'s `/<name>`, one per name.
fn named_hooks(hook: &WebhookReceiver, names: &[&str]) -> Vec<WebhookConfig> {
    names
        .iter()
        .map(|name| WebhookConfig {
            name: Some(name.to_string()),
            url: format!("http://{}/{name}", hook.addr),
            ..WebhookConfig::default()
        })
        .collect()
}

fn stored(controller: &TestController) -> AlertRecord {
    controller.shared.store.alert(KEY).unwrap().expect("stored")
}

fn alert() -> AlertRecord {
    AlertRecord {
        key: KEY.into(),
        kind: "backup_stale".into(),
        subject: "shop-db".into(),
        message: "test".into(),
        opened_unix_ms: now_ms(),
        ..AlertRecord::default()
    }
}

fn private_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_is_reached_with_its_ca_file_and_refused_without_it() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = tmp.path().join("ca.pem");
    ca.write(&ca_file);
    let hook = WebhookReceiver::start(Some(ca.server_config(&["127.0.0.1"])), |_, _| 200).await;
    let url = format!("https://{}{SECRET_PATH}", hook.addr);
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.notify.webhook = vec![
        WebhookConfig {
            name: Some("trusted".into()),
            url: url.clone(),
            ca_file: Some(ca_file.clone()),
            ..WebhookConfig::default()
        },
        WebhookConfig {
            name: Some("untrusted".into()),
            url: url.clone(),
            ..WebhookConfig::default()
        },
    ];
    let notify = config.notify.clone();
    let controller = controller_with_a_target(config).await;
    let alerting = Alerting::new(controller.shared.clone());

    let report = alerting.tick(now_ms() + 3 * DAY).await.unwrap();
    assert_eq!(report.opened, [KEY], "{report:?}");
    assert_eq!(report.failed_sends, 1, "the untrusted one: {report:?}");
    let received = hook.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(received[0].over_tls);
    assert_eq!(received[0].path, SECRET_PATH);
    assert_eq!(received[0].body["alert"], KEY);
    assert_eq!(received[0].body["status"], "open");
    assert_eq!(stored(&controller).pending, ["webhook:untrusted"]);

    // Without the CA the handshake fails on the certificate, and the error keeps the path out.
    let notifier = Notifier::new(&notify);
    let err = notifier
        .send_to("webhook:untrusted", &alert(), Status::Open)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("certificate"), "{err}");
    assert!(
        err.contains(&format!("webhook `untrusted` (https://{})", hook.addr)),
        "{err}"
    );
    assert!(
        !err.contains("SECRET") && !err.contains("/services"),
        "{err}"
    );
    assert_eq!(hook.received().len(), 1);
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_goes_over_starttls_with_smtp_auth_from_a_private_password_file() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = tmp.path().join("ca.pem");
    ca.write(&ca_file);
    let tls = ca.server_config(&["127.0.0.1"]);
    let smtp = SmtpSink::start(Some(tls.clone()), &["PLAIN", "LOGIN"]).await;
    let password_file = tmp.path().join("smtp-password");
    private_file(&password_file, "pa55-word\n", 0o600);
    let email = EmailConfig {
        server: "127.0.0.1".into(),
        port: Some(smtp.addr.port()),
        from: "drover@example.org".into(),
        to: vec!["ops@example.org".into()],
        starttls: true,
        username: Some("drover".into()),
        password_file: Some(password_file.clone()),
        ca_file: Some(ca_file.clone()),
    };
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.notify.email = Some(email.clone());
    let controller = controller_with_a_target(config.clone()).await;
    let alerting = Alerting::new(controller.shared.clone());

    let report = alerting.tick(now_ms() + 3 * DAY).await.unwrap();
    assert_eq!(report.opened, [KEY], "{report:?}");
    assert_eq!(report.failed_sends, 0, "{report:?}");
    assert_eq!(
        smtp.logins(),
        [SmtpLogin {
            mechanism: "PLAIN".into(),
            username: "drover".into(),
            password: "pa55-word".into(),
            over_tls: true,
        }]
    );
    let mail = smtp.messages();
    assert_eq!(mail.len(), 1, "{mail:?}");
    assert!(mail[0].contains("Subject: [drover] OPEN backup_stale:shop-db"));
    controller.stop().await;

    // A server that offers only LOGIN gets the same credentials that way.
    let login_only = SmtpSink::start(Some(tls), &["LOGIN"]).await;
    let notifier = Notifier::new(&NotifyConfig {
        email: Some(EmailConfig {
            port: Some(login_only.addr.port()),
            ..email.clone()
        }),
        ..NotifyConfig::default()
    });
    notifier
        .send_to("email", &alert(), Status::Resolved)
        .await
        .unwrap();
    assert_eq!(login_only.logins()[0].mechanism, "LOGIN");
    assert_eq!(login_only.logins()[0].password, "pa55-word");
    assert!(login_only.messages()[0].contains("Subject: [drover] RESOLVED"));

    // Without the CA, STARTTLS fails on the certificate before any credential is sent.
    let notifier = Notifier::new(&NotifyConfig {
        email: Some(EmailConfig {
            ca_file: None,
            ..email.clone()
        }),
        ..NotifyConfig::default()
    });
    let err = notifier
        .send_to("email", &alert(), Status::Open)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(smtp.logins().len(), 1);

    // A password file others can read is refused when the config is validated, and at send.
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("notify.email.password_file"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains("pa55-word"), "{err}");
    let err = Notifier::new(&config.notify)
        .send_to("email", &alert(), Status::Open)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chmod 600") && !err.contains("pa55-word"),
        "{err}"
    );
    assert_eq!(smtp.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_failed_is_retried_alone() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    // `/flaky` answers 500 to its first request, then 200; `/good` always 200.
    let hook = WebhookReceiver::start(
        None,
        |path, n| {
            if path == "/flaky" && n == 0 { 500 } else { 200 }
        },
    )
    .await;
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.notify.webhook = named_hooks(&hook, &["flaky", "good"]);
    let controller = controller_with_a_target(config).await;
    let alerting = Alerting::new(controller.shared.clone());

    let t1 = now_ms() + 3 * DAY;
    let report = alerting.tick(t1).await.unwrap();
    assert_eq!(report.opened, [KEY], "{report:?}");
    assert_eq!(report.failed_sends, 1, "{report:?}");
    assert_eq!(hook.delivered("/good", KEY), ["open"]);
    assert_eq!(
        (hook.attempts("/flaky"), hook.delivered("/flaky", KEY).len()),
        (1, 0)
    );
    let a = stored(&controller);
    assert_eq!(a.pending, ["webhook:flaky"]);
    assert_eq!((a.last_sent_unix_ms, a.sends), (0, 0), "round not complete");
    // The operator sees which channel is still owed the message.
    let shown = controller.cli_json(&["alerts", "--json"]);
    assert_eq!(shown[0]["pending"], serde_json::json!(["webhook:flaky"]));

    // Next tick: only the channel that failed is tried; the round completes.
    let t2 = t1 + 30_000;
    let report = alerting.tick(t2).await.unwrap();
    assert_eq!(report.failed_sends, 0, "{report:?}");
    assert!(report.resent.is_empty(), "{report:?}");
    assert_eq!(hook.delivered("/good", KEY), ["open"], "no duplicate");
    assert_eq!(hook.attempts("/good"), 1);
    assert_eq!(hook.delivered("/flaky", KEY), ["open"]);
    assert_eq!(hook.attempts("/flaky"), 2);
    let a = stored(&controller);
    assert!(a.pending.is_empty(), "{a:?}");
    assert_eq!((a.last_sent_unix_ms, a.sends), (t2, 1));

    // And nothing more until a re-send is due.
    let report = alerting.tick(t2 + 30_000).await.unwrap();
    assert_eq!(report.failed_sends, 0);
    assert_eq!(hook.received().len(), 3);
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_channel_waits_longer_each_time_and_does_not_hold_up_the_others() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    // `/dead` always answers 500; `/good` 200.
    let hook =
        WebhookReceiver::start(None, |path, _| if path == "/dead" { 500 } else { 200 }).await;
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.notify.webhook = named_hooks(&hook, &["dead", "good"]);
    let controller = controller_with_a_target(config).await;
    controller.apply_target(&container_target("crm-db")).await;
    let alerting = Alerting::new(controller.shared.clone());

    // Two alerts open: the good channel gets both, the dead one is tried once (not per alert).
    let t1 = now_ms() + 3 * DAY;
    let report = alerting.tick(t1).await.unwrap();
    assert_eq!(report.opened.len(), 2, "{report:?}");
    assert_eq!(
        (report.failed_sends, report.deferred_sends),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(hook.attempts("/good"), 2);
    assert_eq!(hook.attempts("/dead"), 1);

    // Tried again after 30 s, then 60 s, then 120 s: not at every tick.
    let mut tries = Vec::new();
    for secs in (10..=240).step_by(10) {
        let before = hook.attempts("/dead");
        alerting.tick(t1 + secs * 1000).await.unwrap();
        if hook.attempts("/dead") > before {
            tries.push(secs);
        }
    }
    assert_eq!(tries, [30, 90, 210], "seconds after the first failure");
    assert_eq!(
        hook.attempts("/good"),
        2,
        "the good channel got each alert once"
    );
    controller.stop().await;
}
