//! Alerts end to end, with time driven by the test: a real controller (its alert task off), a
//! scripted agent over real mTLS, a local webhook receiver, and `Alerting::tick(now)` called
//! with chosen times. Proves a stale backup raises exactly one alert although no job failed,
//! that it is re-sent after `alert_resend` and resolved once a fresh backup is in the catalog;
//! that a silent host raises `host_down` and recovers; the Slack-format body; delivery to a
//! local SMTP sink; and a failed and a rolled-back deploy each raising `job_failed` until a
//! deploy of the app succeeds.

use std::time::Duration;

use drover_controller::alerting::Alerting;
use drover_controller::config::{WebhookConfig, WebhookFormat};
use drover_controller::server::now_ms;
use drover_e2e::backups::container_target;
use drover_e2e::notify::{SmtpSink, WebhookReceiver};
use drover_e2e::{ScriptedAgent, TestController, fast_controller_config, init};
use drover_model::backup::catalog;
use drover_proto::v1;
use serde_json::Value;

const DAY: i64 = 24 * 3600 * 1000;
const HOUR: i64 = 3600 * 1000;

/// The one generic-JSON webhook of a test, at `hook`'s `/json`.
fn json_hook(hook: &WebhookReceiver) -> Vec<WebhookConfig> {
    vec![WebhookConfig {
        url: format!("http://{}/json", hook.addr),
        ..WebhookConfig::default()
    }]
}

fn backup(target: &str, host: &str, finished: i64) -> catalog::Backup {
    serde_json::from_value(serde_json::json!({
        "id": format!("{target}-fresh"),
        "target": target,
        "host": host,
        "kind": "postgres",
        "trigger": "scheduled",
        "job_id": "",
        "requested_by": "test",
        "started_unix_ms": finished - 1000,
        "finished_unix_ms": finished,
        "parts": [],
        "compression": "zstd",
        "recipients": [],
        "local_dir": format!("/var/backups/{target}/fresh"),
    }))
    .unwrap()
}

async fn alerts(controller: &TestController, all: bool) -> Vec<v1::AlertInfo> {
    controller
        .admin()
        .list_alerts(v1::ListAlertsRequest { all })
        .await
        .unwrap()
        .into_inner()
        .alerts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_backup_alerts_once_resends_and_resolves_without_any_failed_job() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let hook = WebhookReceiver::start_ok().await;
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.alert_resend = Duration::from_secs(3600);
    config.notify.webhook = vec![
        WebhookConfig {
            url: format!("http://{}/json", hook.addr),
            format: WebhookFormat::Json,
            ..WebhookConfig::default()
        },
        WebhookConfig {
            url: format!("http://{}/slack", hook.addr),
            format: WebhookFormat::Slack,
            ..WebhookConfig::default()
        },
    ];
    let controller = TestController::start(config).await;
    let bundle = ScriptedAgent::enroll(&controller, "db-1", &[], &tmp.path().join("db-1")).await;
    let mut agent = ScriptedAgent::connect(&controller.addr.to_string(), &bundle, "db-1").await;
    controller.apply_target(&container_target("shop-db")).await;
    let alerting = Alerting::new(controller.shared.clone());
    let key = "backup_stale:shop-db";

    // Just applied: nothing is stale yet.
    let t0 = now_ms();
    let report = alerting.tick(t0).await.unwrap();
    assert!(report.opened.is_empty(), "{report:?}");

    // Three days later no backup ever ran and no job failed: the controller notices itself.
    let t1 = t0 + 3 * DAY;
    let report = alerting.tick(t1).await.unwrap();
    assert!(report.opened.contains(&key.to_string()), "{report:?}");
    assert_eq!(report.failed_sends, 0);
    assert_eq!(hook.delivered("/json", key), ["open"]);
    let slack: Vec<Value> = hook
        .received()
        .into_iter()
        .filter(|r| r.path == "/slack")
        .map(|r| r.body)
        .collect();
    assert!(
        slack
            .iter()
            .any(|v| v["text"].as_str().is_some_and(|t| t.contains(key))),
        "{slack:?}"
    );
    let open = alerts(&controller, false).await;
    let a = open.iter().find(|a| a.key == key).expect("listed");
    assert_eq!(
        (a.kind.as_str(), a.subject.as_str()),
        ("backup_stale", "shop-db")
    );
    assert_eq!(
        (a.opened_unix_ms, a.last_sent_unix_ms, a.sends),
        (t1, t1, 1)
    );

    // De-duplicated: the next ticks send nothing until alert_resend has passed.
    alerting.tick(t1 + 10 * 60 * 1000).await.unwrap();
    assert_eq!(hook.delivered("/json", key), ["open"]);
    alerting.tick(t1 + HOUR).await.unwrap();
    assert_eq!(hook.delivered("/json", key), ["open", "open"]);

    // A backup job runs and a fresh backup arrives in the catalog (under the job, as the
    // controller keeps only those): the alert resolves, once.
    let job = controller
        .admin()
        .run_backup(v1::RunBackupRequest {
            target: "shop-db".into(),
            host: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    assert_eq!(agent.next_command().await.job_id, job);
    agent.finish_job(&job, "succeeded").await;
    let fresh = t1 + HOUR + 1000;
    agent
        .send_catalog(&job, "shop-db", &[backup("shop-db", "db-1", fresh)])
        .await;
    let report = alerting.tick(t1 + 2 * HOUR).await.unwrap();
    assert!(report.resolved.contains(&key.to_string()), "{report:?}");
    alerting.tick(t1 + 2 * HOUR + 1000).await.unwrap();
    assert_eq!(hook.delivered("/json", key), ["open", "open", "resolved"]);
    assert!(
        alerts(&controller, false)
            .await
            .iter()
            .all(|a| a.key != key)
    );
    let all = alerts(&controller, true).await;
    let a = all.iter().find(|a| a.key == key).expect("kept as resolved");
    assert_eq!(a.resolved_unix_ms, t1 + 2 * HOUR);
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_goes_down_and_recovers() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let hook = WebhookReceiver::start_ok().await;
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.notify.webhook = json_hook(&hook);
    let controller = TestController::start(config).await;
    let bundle = ScriptedAgent::enroll(&controller, "web-1", &[], &tmp.path().join("web-1")).await;
    let mut agent = ScriptedAgent::connect(&controller.addr.to_string(), &bundle, "web-1").await;
    agent.assert_no_command().await;
    let alerting = Alerting::new(controller.shared.clone());
    let key = "host_down:web-1";

    let t0 = now_ms();
    let report = alerting.tick(t0).await.unwrap();
    assert!(!report.opened.contains(&key.to_string()), "{report:?}");
    // down_after is 6 s in the fast config: 7 s of silence is down.
    let report = alerting.tick(t0 + 7000).await.unwrap();
    assert_eq!(report.opened, [key.to_string()], "{report:?}");
    assert_eq!(hook.delivered("/json", key), ["open"]);
    let body = hook.received().last().unwrap().body.clone();
    assert_eq!(body["kind"], "host_down");
    assert_eq!(body["subject"], "web-1");

    // It speaks again: recovered.
    agent.assert_no_command().await;
    let report = alerting.tick(now_ms()).await.unwrap();
    assert_eq!(report.resolved, [key.to_string()], "{report:?}");
    assert_eq!(hook.delivered("/json", key), ["open", "resolved"]);
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_is_mailed_to_a_local_smtp_sink() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let smtp = SmtpSink::start(None, &[]).await;
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.notify.email = Some(drover_controller::config::EmailConfig {
        server: "127.0.0.1".into(),
        port: Some(smtp.addr.port()),
        from: "drover@example.org".into(),
        to: vec!["ops@example.org".into()],
        starttls: false,
        ..Default::default()
    });
    let controller = TestController::start(config).await;
    controller.apply_target(&container_target("shop-db")).await;
    let alerting = Alerting::new(controller.shared.clone());
    let report = alerting.tick(now_ms() + 3 * DAY).await.unwrap();
    assert_eq!(report.opened, ["backup_stale:shop-db"], "{report:?}");
    assert_eq!(report.failed_sends, 0);
    let mail = smtp.messages();
    assert_eq!(mail.len(), 1, "{mail:?}");
    assert!(
        mail[0].contains("Subject: [drover] OPEN backup_stale:shop-db"),
        "{}",
        mail[0]
    );
    assert!(mail[0].contains("To: ops@example.org"), "{}", mail[0]);
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_rolled_back_deploys_alert_until_a_deploy_of_the_app_succeeds() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let hook = WebhookReceiver::start_ok().await;
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.notify.webhook = json_hook(&hook);
    let controller = TestController::start(config).await;
    let bundle = ScriptedAgent::enroll(&controller, "web-1", &[], &tmp.path().join("web-1")).await;
    let mut agent = ScriptedAgent::connect(&controller.addr.to_string(), &bundle, "web-1").await;
    controller.apply_example_app().await;
    let mut admin = controller.admin();
    let alerting = Alerting::new(controller.shared.clone());
    let mut deploy = async |result: &str| {
        let id = admin
            .deploy(v1::DeployRequest {
                app: "api".into(),
                version: "v1.4.2".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .id;
        assert_eq!(agent.next_command().await.job_id, id);
        agent.finish_job(&id, result).await;
        id
    };

    // A failed deploy, then one that rolled back: two alerts, each sent once.
    let failed = deploy("failed").await;
    let rolled_back = deploy("rolled_back").await;
    let report = alerting.tick(now_ms()).await.unwrap();
    let (failed_key, rolled_key) = (
        format!("job_failed:{failed}"),
        format!("job_failed:{rolled_back}"),
    );
    assert!(report.opened.contains(&failed_key), "{report:?}");
    assert!(report.opened.contains(&rolled_key), "{report:?}");
    let messages: Vec<String> = hook
        .received()
        .iter()
        .map(|r| r.body["message"].as_str().unwrap_or("").to_string())
        .collect();
    // Named by what failed and where, keyed by the job.
    assert!(
        messages
            .iter()
            .any(|m| m == &format!("deploy failed: api on web-1 (job {failed})")),
        "{messages:?}"
    );
    let body = hook
        .received()
        .into_iter()
        .find(|r| r.body["alert"] == failed_key.as_str())
        .expect("the failed deploy's alert")
        .body;
    assert_eq!(body["subject"], "api", "{body}");
    let listed = alerts(&controller, false).await;
    let a = listed.iter().find(|a| a.key == failed_key).expect("listed");
    assert_eq!(a.subject, "api");
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("deploy rolled back: api")),
        "{messages:?}"
    );

    // A deploy of the app that succeeds clears both.
    deploy("succeeded").await;
    let report = alerting.tick(now_ms()).await.unwrap();
    let mut resolved = report.resolved.clone();
    resolved.sort();
    let mut wanted = vec![failed_key.clone(), rolled_key.clone()];
    wanted.sort();
    assert_eq!(resolved, wanted, "{report:?}");
    assert_eq!(hook.delivered("/json", &failed_key), ["open", "resolved"]);
    controller.stop().await;
}
