//! Enrollment over real TLS: a token works once, expires, enrolls only its own host, and the
//! agent pins the controller's CA by the fingerprint in the token. A host's labels come from
//! its token only; token lifetimes that cannot work are refused; refused attempts are logged
//! with their source, rate-limited, never with a secret.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_e2e::{TestController, fast_controller_config, init};
use drover_identity::Identity;
use drover_identity::files::Bundle;
use drover_identity::pki::{CertInfo, new_key_and_csr};
use drover_identity::tls::{Trust, channel, client_config};
use drover_proto::v1;

fn enroll_err(
    result: Result<drover_agent::enroll::Enrollment, drover_agent::AgentError>,
) -> String {
    result.expect_err("enrollment must be refused").to_string()
}

#[tokio::test]
async fn enrollment_issues_a_short_lived_host_certificate_with_a_0600_key() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
    let token = controller.token_with_labels("web-1", labels).await;
    let agent_dir = tmp.path().join("agent");
    let enrollment = drover_agent::enroll::enroll(&controller.addr.to_string(), &token, &agent_dir)
        .await
        .expect("enroll");
    assert_eq!(enrollment.host, "web-1");

    let bundle = Bundle::load(&agent_dir.join("identity")).unwrap();
    let info = CertInfo::from_pem(&bundle.cert_pem).unwrap();
    assert_eq!(
        info.identity,
        Some(Identity::Agent {
            host: "web-1".into()
        })
    );
    let lifetime = info.not_after_unix - drover_identity::pki::unix_now();
    assert!(
        (24 * 3600 - 60..=24 * 3600).contains(&lifetime),
        "24h by default, got {lifetime}s"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent_dir.join("identity/key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let host = controller.host("web-1").await.expect("host is known");
    assert_eq!(host.labels.get("role").map(String::as_str), Some("web"));

    // The same token again: refused, and it says why.
    let err = enroll_err(
        drover_agent::enroll::enroll(
            &controller.addr.to_string(),
            &token,
            &tmp.path().join("agent2"),
        )
        .await,
    );
    assert!(err.contains("already used"), "{err}");
    // Enrolling an already enrolled data dir is refused locally.
    let token2 = controller.token("web-1").await;
    let err = enroll_err(
        drover_agent::enroll::enroll(&controller.addr.to_string(), &token2, &agent_dir).await,
    );
    assert!(err.contains("already enrolled"), "{err}");
}

#[tokio::test]
async fn expired_revoked_malformed_and_foreign_tokens_are_refused() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();

    // Expired: make the stored token's expiry lie in the past.
    let (token, mut record) = drover_controller::operator::issue_token(
        &controller.shared,
        "db-1",
        BTreeMap::new(),
        None,
        "test",
    )
    .await
    .unwrap();
    record.expires_unix_ms = drover_controller::server::now_ms() - 1;
    controller.shared.store.put_token(&record).unwrap();
    let err = enroll_err(
        drover_agent::enroll::enroll(&addr, &token.encode(), &tmp.path().join("a1")).await,
    );
    assert!(err.contains("expired"), "{err}");

    // Revoked through the operator API.
    let (token, record) = drover_controller::operator::issue_token(
        &controller.shared,
        "db-1",
        BTreeMap::new(),
        None,
        "test",
    )
    .await
    .unwrap();
    controller
        .admin()
        .revoke_token(v1::RevokeTokenRequest {
            id: record.id.clone(),
        })
        .await
        .unwrap();
    let err = enroll_err(
        drover_agent::enroll::enroll(&addr, &token.encode(), &tmp.path().join("a2")).await,
    );
    assert!(err.contains("revoked"), "{err}");

    // Malformed.
    let err = enroll_err(
        drover_agent::enroll::enroll(&addr, "drover1.nonsense", &tmp.path().join("a3")).await,
    );
    assert!(err.contains("malformed enrollment token"), "{err}");

    // A token minted by another controller: its CA fingerprint does not match, so the agent
    // refuses to talk to this controller at all.
    let other = TestController::start(fast_controller_config(&tmp.path().join("other"))).await;
    let foreign = other.token("db-1").await;
    let err =
        enroll_err(drover_agent::enroll::enroll(&addr, &foreign, &tmp.path().join("a4")).await);
    assert!(err.contains("fingerprint"), "{err}");
    assert!(
        !tmp.path().join("a4/identity").exists(),
        "nothing is written on failure"
    );
    other.stop().await;
    controller.stop().await;
}

#[tokio::test]
async fn a_token_enrolls_only_its_own_host() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let token = controller.token("web-1").await;
    let fingerprint = controller.shared.ca.fingerprint();
    let config = client_config(&Trust::PinnedFingerprint(fingerprint), None).unwrap();
    let mut client = v1::enrollment_client::EnrollmentClient::new(
        channel(&controller.addr.to_string(), config, Duration::from_secs(5)).unwrap(),
    );
    let (_key, csr_pem) = new_key_and_csr("web-2").unwrap();
    let status = client
        .enroll(v1::EnrollRequest {
            token: token.clone(),
            csr_pem: csr_pem.clone(),
            host: "web-2".into(),
            labels: Default::default(),
        })
        .await
        .expect_err("a token for web-1 must not enroll web-2");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("is for host web-1, not web-2"),
        "{}",
        status.message()
    );
    // The refused attempt did not burn the token: web-1 can still use it.
    let ok = client
        .enroll(v1::EnrollRequest {
            token,
            csr_pem,
            host: "web-1".into(),
            labels: Default::default(),
        })
        .await
        .expect("web-1 enrolls with its own token")
        .into_inner();
    let info = CertInfo::from_pem(&ok.cert_pem).unwrap();
    assert_eq!(
        info.identity,
        Some(Identity::Agent {
            host: "web-1".into()
        }),
        "names come from the token, not the CSR"
    );
    controller.stop().await;
}

#[tokio::test]
async fn a_hosts_own_labels_never_reach_its_record() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();
    let labels = BTreeMap::from([
        ("role".to_string(), "web".to_string()),
        ("tier".to_string(), "a".to_string()),
    ]);
    let token = controller.token_with_labels("web-1", labels.clone()).await;
    // The host asks for env=prod (and to be something else) at enrollment...
    let config = client_config(
        &Trust::PinnedFingerprint(controller.shared.ca.fingerprint()),
        None,
    )
    .unwrap();
    let mut client = v1::enrollment_client::EnrollmentClient::new(
        channel(&addr, config, Duration::from_secs(5)).unwrap(),
    );
    let (key_pem, csr_pem) = new_key_and_csr("web-1").unwrap();
    let own = [
        ("env".to_string(), "prod".to_string()),
        ("role".to_string(), "db".to_string()),
    ];
    let issued = client
        .enroll(v1::EnrollRequest {
            token,
            csr_pem,
            host: "web-1".into(),
            labels: own.clone().into_iter().collect(),
        })
        .await
        .expect("enrolled (its labels ignored)")
        .into_inner();
    assert_eq!(
        controller.host("web-1").await.unwrap().labels,
        labels.clone().into_iter().collect()
    );

    // ...and in every Hello.
    let bundle = Bundle {
        ca_pem: issued.ca_pem,
        cert_pem: issued.cert_pem,
        key_pem,
    };
    let tls = client_config(
        &Trust::Ca(bundle.ca_pem.clone()),
        Some(&drover_identity::tls::ClientCert {
            cert_pem: bundle.cert_pem.clone(),
            key_pem: bundle.key_pem.clone(),
        }),
    )
    .unwrap();
    let mut agent_api = v1::agent_service_client::AgentServiceClient::new(
        channel(&addr, tls, Duration::from_secs(5)).unwrap(),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Hello(v1::Hello {
            host: "web-1".into(),
            agent_version: "test".into(),
            labels: own.into_iter().collect(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = agent_api
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    let welcome = stream.message().await.expect("welcome").expect("a message");
    assert!(matches!(
        welcome.msg,
        Some(v1::controller_message::Msg::Welcome(_))
    ));
    assert_eq!(
        controller.host("web-1").await.unwrap().labels,
        labels.into_iter().collect()
    );
    drop(tx);

    // Enrolled again with a new token: the new token's labels, not a merge with the old.
    let token = controller
        .token_with_labels("web-1", BTreeMap::from([("role".into(), "db".into())]))
        .await;
    drover_agent::enroll::enroll(&addr, &token, &tmp.path().join("again"))
        .await
        .unwrap();
    assert_eq!(
        controller.host("web-1").await.unwrap().labels,
        [("role".to_string(), "db".to_string())]
            .into_iter()
            .collect()
    );
    controller.stop().await;
}

#[test]
fn the_agent_refuses_to_choose_its_own_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(drover_e2e::bin("drover-agent"))
        .args([
            "enroll",
            "--controller",
            "127.0.0.1:1",
            "--token",
            "drover1.x.y.z",
            "--label",
            "env=prod",
            "--data-dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("drover token create --host NAME --label k=v"),
        "{err}"
    );
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "[labels]\nenv = \"prod\"\n").unwrap();
    let out = std::process::Command::new(drover_e2e::bin("drover-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("`labels`") && err.contains("drover token create"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lifetimes_that_cannot_work_are_refused() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    for ttl in ["0s", "500ms"] {
        let (code, out, err) =
            controller.cli(&["token", "create", "--host", "web-1", "--ttl", ttl]);
        assert_eq!(code, 65, "--ttl {ttl}: {out}{err}");
        assert!(err.contains("at least 1m"), "{err}");
        assert!(out.is_empty(), "no token printed: {out}");
    }
    for secs in [1, 59, 7 * 24 * 3600 + 1] {
        let status = controller
            .admin()
            .create_token(v1::CreateTokenRequest {
                host: "web-1".into(),
                ttl_secs: secs,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{secs}s");
        assert!(
            status.message().contains("at least 1 minute") && status.message().contains("168h"),
            "{}",
            status.message()
        );
    }
    assert!(
        controller.shared.store.tokens().unwrap().is_empty(),
        "nothing stored"
    );
    let (code, _, err) = controller.cli(&["token", "create", "--host", "web-1", "--ttl", "1m"]);
    assert_eq!(code, 0, "{err}");
    controller.stop().await;
}

#[test]
fn a_flood_of_bad_tokens_is_logged_with_its_source_rate_limited_and_without_secrets() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("controller");
    let addr = format!("127.0.0.1:{}", drover_e2e::free_port());
    let config = tmp.path().join("controller.toml");
    std::fs::write(
        &config,
        format!("listen = \"{addr}\"\ndata_dir = \"{}\"\n", data.display()),
    )
    .unwrap();
    let log = tmp.path().join("controller.log");
    let mut controller = std::process::Command::new(drover_e2e::bin("drover-controller"))
        .args(["run", "--config"])
        .arg(&config)
        .args(["--log-format", "json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let ca_pem = data.join("ca/ca.pem");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let secrets: Vec<String> = runtime.block_on(async {
        let started = std::time::Instant::now();
        while !ca_pem.exists() || std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the controller serves"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let fingerprint =
            drover_identity::pki::fingerprint_pem(&std::fs::read_to_string(&ca_pem).unwrap())
                .unwrap();
        let config = client_config(&Trust::PinnedFingerprint(fingerprint.clone()), None).unwrap();
        let mut client = v1::enrollment_client::EnrollmentClient::new(
            channel(&addr, config, Duration::from_secs(5)).unwrap(),
        );
        let (_key, csr_pem) = new_key_and_csr("web-1").unwrap();
        let mut secrets = Vec::new();
        // 200 well-formed tokens this controller never issued.
        for _ in 0..200 {
            let token = drover_identity::token::EnrollToken::generate("web-1", &fingerprint)
                .unwrap()
                .encode();
            let status = client
                .enroll(v1::EnrollRequest {
                    token: token.clone(),
                    csr_pem: csr_pem.clone(),
                    host: "web-1".into(),
                    labels: Default::default(),
                })
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied);
            secrets.push(token.rsplit('.').next().unwrap().to_string());
        }
        secrets
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &controller.id().to_string()])
        .status();
    let _ = controller.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("enrollment refused"))
        .collect();
    assert!(!refused.is_empty(), "the refusals are logged:\n{text}");
    assert!(
        refused.len() <= 20,
        "rate-limited, not {} lines:\n{text}",
        refused.len()
    );
    for line in &refused {
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        let source = json["source"].as_str().unwrap_or_default();
        assert!(
            source.starts_with("127.0.0.1:"),
            "source address in: {line}"
        );
    }
    assert!(
        refused.last().unwrap().contains("counted, not logged"),
        "the last line says the rest is counted:\n{text}"
    );
    for secret in &secrets {
        assert!(!text.contains(secret.as_str()), "a token secret was logged");
    }
}
