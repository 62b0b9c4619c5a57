//! Alerts end to end, with time driven by the test: a real controller (its alert task off), a
//! scripted agent over real mTLS, a local webhook receiver, and `Alerting::tick(now)` called
//! with chosen times. Proves a stale backup raises exactly one alert although no job failed,
//! that it is re-sent after `alert_resend` and resolved once a fresh backup is in the catalog;
//! that a silent host raises `host_down` and recovers; and the Slack-format body.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use drover_agent::backup::catalog;
use drover_controller::alerting::Alerting;
use drover_controller::config::{WebhookConfig, WebhookFormat};
use drover_controller::server::now_ms;
use drover_e2e::{ScriptedAgent, TestController, fast_controller_config, init};
use drover_proto::v1;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

const DAY: i64 = 24 * 3600 * 1000;
const HOUR: i64 = 3600 * 1000;

/// (path, JSON body) of every request received.
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// A tiny HTTP server on 127.0.0.1:0 that answers 200 and keeps every JSON body.
async fn webhook_receiver() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let bodies = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let bodies = bodies.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let bytes = req.into_body().collect().await?.to_bytes();
                            let value: Value =
                                serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                            bodies.lock().unwrap().push((path, value));
                            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                                "ok",
                            ))))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, received)
}

/// The statuses sent for `key` to `path`, in order.
fn sent(received: &Received, path: &str, key: &str) -> Vec<String> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, v)| p == path && v["alert"] == key)
        .map(|(_, v)| v["status"].as_str().unwrap_or("").to_string())
        .collect()
}

fn target_toml(name: &str) -> String {
    format!("name = \"{name}\"\n[postgres]\ncontainer = \"{name}\"\ndatabases = [\"app\"]\n")
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
    let (hook, received) = webhook_receiver().await;
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.alert_resend = Duration::from_secs(3600);
    config.notify.webhook = vec![
        WebhookConfig {
            url: format!("http://{hook}/json"),
            format: WebhookFormat::Json,
        },
        WebhookConfig {
            url: format!("http://{hook}/slack"),
            format: WebhookFormat::Slack,
        },
    ];
    let controller = TestController::start(config).await;
    let bundle = ScriptedAgent::enroll(&controller, "db-1", &[], &tmp.path().join("db-1")).await;
    let mut agent = ScriptedAgent::connect(&controller.addr.to_string(), &bundle, "db-1").await;
    controller
        .admin()
        .apply_backup_target(v1::ApplyBackupTargetRequest {
            target_toml: target_toml("shop-db"),
            source: "shop-db.toml".into(),
        })
        .await
        .unwrap();
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
    assert_eq!(sent(&received, "/json", key), ["open"]);
    let slack: Vec<Value> = received
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == "/slack")
        .map(|(_, v)| v.clone())
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
    assert_eq!(sent(&received, "/json", key), ["open"]);
    alerting.tick(t1 + HOUR).await.unwrap();
    assert_eq!(sent(&received, "/json", key), ["open", "open"]);

    // A fresh backup arrives in the catalog: the alert resolves, once.
    let fresh = t1 + HOUR + 1000;
    agent
        .event_with(
            "",
            catalog::CATALOG,
            "",
            catalog::catalog_fields("shop-db", &[backup("shop-db", "db-1", fresh)]),
        )
        .await;
    let report = alerting.tick(t1 + 2 * HOUR).await.unwrap();
    assert!(report.resolved.contains(&key.to_string()), "{report:?}");
    alerting.tick(t1 + 2 * HOUR + 1000).await.unwrap();
    assert_eq!(sent(&received, "/json", key), ["open", "open", "resolved"]);
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
    let (hook, received) = webhook_receiver().await;
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.notify.webhook = vec![WebhookConfig {
        url: format!("http://{hook}/json"),
        format: WebhookFormat::Json,
    }];
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
    assert_eq!(sent(&received, "/json", key), ["open"]);
    let body = received.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(body["kind"], "host_down");
    assert_eq!(body["subject"], "web-1");

    // It speaks again: recovered.
    agent.assert_no_command().await;
    let report = alerting.tick(now_ms()).await.unwrap();
    assert_eq!(report.resolved, [key.to_string()], "{report:?}");
    assert_eq!(sent(&received, "/json", key), ["open", "resolved"]);
    controller.stop().await;
}

/// A minimal SMTP sink on 127.0.0.1:0: 220, EHLO/HELO 250, MAIL/RCPT 250, DATA 354, `.` 250,
/// QUIT 221. Keeps each message's DATA.
async fn smtp_sink() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let messages: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = messages.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let kept = kept.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 sink ESMTP\r\n").await.unwrap();
                let mut data: Option<String> = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(body) = data.as_mut() {
                        if line == "." {
                            kept.lock().unwrap().push(data.take().unwrap());
                            write.write_all(b"250 queued\r\n").await.unwrap();
                        } else {
                            body.push_str(&line);
                            body.push('\n');
                        }
                        continue;
                    }
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 sink\r\n",
                        "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 ok\r\n",
                        "DATA" => {
                            data = Some(String::new());
                            b"354 go ahead\r\n"
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"502 not here\r\n",
                    };
                    write.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (addr, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_is_mailed_to_a_local_smtp_sink() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let (smtp, messages) = smtp_sink().await;
    let mut config = fast_controller_config(&tmp.path().join("ctl"));
    config.notify.email = Some(drover_controller::config::EmailConfig {
        server: "127.0.0.1".into(),
        port: Some(smtp.port()),
        from: "drover@example.org".into(),
        to: vec!["ops@example.org".into()],
        starttls: false,
    });
    let controller = TestController::start(config).await;
    controller
        .admin()
        .apply_backup_target(v1::ApplyBackupTargetRequest {
            target_toml: target_toml("shop-db"),
            source: "shop-db.toml".into(),
        })
        .await
        .unwrap();
    let alerting = Alerting::new(controller.shared.clone());
    let report = alerting.tick(now_ms() + 3 * DAY).await.unwrap();
    assert_eq!(report.opened, ["backup_stale:shop-db"], "{report:?}");
    assert_eq!(report.failed_sends, 0);
    let mail = messages.lock().unwrap().clone();
    assert_eq!(mail.len(), 1, "{mail:?}");
    assert!(
        mail[0].contains("Subject: [drover] OPEN backup_stale:shop-db"),
        "{}",
        mail[0]
    );
    assert!(mail[0].contains("To: ops@example.org"), "{}", mail[0]);
    controller.stop().await;
}
