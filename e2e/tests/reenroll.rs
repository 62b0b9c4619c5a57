//! Agents whose certificate expired while they could not renew it, over real mTLS: within the
//! controller's `reenroll_grace` they get a new one by proving they hold the enrolled key;
//! past it (or revoked, or superseded, or from another CA) they are refused, and the real
//! agent says in one line to enroll again and exits 78. Expired certificates still open no
//! session and call no operator RPC.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_e2e::{
    TestAgent, TestController, bin, eventually, fast_agent_config, fast_controller_config, init,
    operator_client,
};
use drover_identity::files::Bundle;
use drover_identity::pki::{Ca, CertInfo, csr_for_key, new_key_and_csr, unix_now};
use drover_identity::tls::describe_transport;
use drover_identity::tls::{ClientCert, Trust, channel, client_config};
use drover_identity::{Identity, Role};
use drover_proto::v1;

const DAY: i64 = 24 * 3600;

fn web1() -> Identity {
    Identity::Agent {
        host: "web-1".into(),
    }
}

/// An Enrollment client pinned to the controller's CA, without a client certificate (as the
/// agent re-enrolls).
fn enrollment_client(
    controller: &TestController,
) -> v1::enrollment_client::EnrollmentClient<tonic::transport::Channel> {
    let config = client_config(
        &Trust::Ca(controller.shared.ca.cert_pem().to_string()),
        None,
    )
    .unwrap();
    v1::enrollment_client::EnrollmentClient::new(
        channel(&controller.addr.to_string(), config, Duration::from_secs(5)).unwrap(),
    )
}

/// Replaces the enrolled agent's certificate in `dir` by one with the same key that expired
/// `ago` seconds ago (issued by the controller's CA, recorded as the host's newest), as if the
/// host had been switched off that long.
fn expire_identity(controller: &TestController, dir: &std::path::Path, ago: i64) -> Bundle {
    let identity_dir = dir.join("identity");
    let bundle = Bundle::load(&identity_dir).unwrap();
    let now = unix_now();
    let csr = csr_for_key(&bundle.key_pem, "web-1").unwrap();
    let issued = controller
        .shared
        .ca
        .sign_csr_between(&csr, &web1(), now - ago - DAY, now - ago)
        .unwrap();
    controller
        .shared
        .store
        .update_host("web-1", |h| h.serials.push(issued.serial.clone()))
        .unwrap();
    let expired = Bundle {
        cert_pem: issued.cert_pem,
        ..bundle
    };
    expired.replace(&identity_dir).unwrap();
    expired
}

#[tokio::test]
async fn an_agent_whose_certificate_expired_while_the_controller_was_down_reconnects_by_itself() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    // The shortest certificate life the controller allows, so it runs out during the outage.
    let config = drover_controller::ControllerConfig {
        agent_cert_ttl: Duration::from_secs(10),
        ..fast_controller_config(&tmp.path().join("ctl"))
    };
    let controller = TestController::start(config.clone()).await;
    let addr = controller.addr;
    let agent_dir = tmp.path().join("agent");
    let mut agent =
        TestAgent::enroll_and_start(&controller, "web-1", &agent_dir, &addr.to_string()).await;
    agent.wait_connected().await;
    controller.stop().await;

    // The controller is down; the agent's certificate runs out (whatever it renewed before).
    let identity_dir = agent_dir.join("identity");
    let held = eventually(
        "the agent's certificate expired",
        Duration::from_secs(30),
        || async {
            let bundle = Bundle::load(&identity_dir).ok()?;
            let cert = CertInfo::from_pem(&bundle.cert_pem).ok()?;
            (cert.not_after_unix < unix_now()).then_some(cert)
        },
    )
    .await;

    // The controller comes back on the same address: the agent reconnects without help.
    let controller = TestController::start(drover_controller::ControllerConfig {
        listen: addr,
        ..config
    })
    .await;
    let sessions_before = agent.status.borrow().sessions;
    tokio::time::timeout(
        Duration::from_secs(30),
        agent
            .status
            .wait_for(|s| s.connected && s.sessions > sessions_before),
    )
    .await
    .expect("the agent reconnects within 30s")
    .unwrap();
    assert!(agent.status.borrow().reenrollments >= 1);
    let now = Bundle::load(&identity_dir).unwrap();
    let fresh = CertInfo::from_pem(&now.cert_pem).unwrap();
    assert!(fresh.not_after_unix > unix_now(), "a valid certificate");
    assert_ne!(fresh.serial, held.serial);
    let host = controller.shared.store.host("web-1").unwrap().unwrap();
    assert!(
        host.serials.contains(&fresh.serial),
        "the new serial is recorded: {:?}",
        host.serials
    );
    assert_eq!(controller.host("web-1").await.unwrap().state, "connected");
    agent.stop().await;
    controller.stop().await;
}

#[test]
fn past_the_grace_the_real_agent_says_in_one_line_to_enroll_again_and_exits_78() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let controller = runtime.block_on(TestController::start(fast_controller_config(
        &tmp.path().join("ctl"),
    )));
    let agent_dir = tmp.path().join("agent");
    runtime.block_on(async {
        let token = controller.token("web-1").await;
        drover_agent::enroll::enroll(&controller.addr.to_string(), &token, &agent_dir)
            .await
            .unwrap();
    });
    // Switched off for 31 days; the default grace is 30.
    let expired = expire_identity(&controller, &agent_dir, 31 * DAY);
    let not_after = CertInfo::from_pem(&expired.cert_pem)
        .unwrap()
        .not_after_unix;

    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "reconnect_max = \"1s\"\n").unwrap();
    let mut child = Command::new(bin("drover-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&agent_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the agent did not exit within 30s (it loops)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(78), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("drover token create"))
        .collect();
    assert_eq!(lines.len(), 1, "one line that says what to do:\n{stderr}");
    let line = lines[0];
    let date = drover_controller::enrollment::rfc3339(not_after);
    for needle in [
        "Enroll again with a new token",
        "drover token create --host web-1",
        "drover-agent enroll --controller",
        date.as_str(),
        "grace",
    ] {
        assert!(line.contains(needle), "{needle:?} missing in: {line}");
    }
    // Nothing was issued.
    let host = controller.shared.store.host("web-1").unwrap().unwrap();
    assert_eq!(
        host.serials.last().map(String::as_str),
        Some(
            CertInfo::from_pem(&expired.cert_pem)
                .unwrap()
                .serial
                .as_str()
        )
    );

    // Doing what the line says works as it is written: `drover-agent enroll` replaces the
    // expired identity (for the same host only), no file to remove first.
    let enroll = |token: &str| {
        Command::new(bin("drover-agent"))
            .args(["enroll", "--controller", &controller.addr.to_string()])
            .args(["--token", token, "--data-dir"])
            .arg(&agent_dir)
            .output()
            .unwrap()
    };
    let other = runtime.block_on(controller.token("db-1"));
    let out = enroll(&other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("belongs to host web-1"), "{err}");
    let token = runtime.block_on(controller.token("web-1"));
    let out = enroll(&token);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let renewed = Bundle::load(&agent_dir.join("identity")).unwrap();
    assert!(
        CertInfo::from_pem(&renewed.cert_pem)
            .unwrap()
            .not_after_unix
            > unix_now()
    );
    runtime.block_on(controller.stop());
}

#[tokio::test]
async fn reenrollment_is_refused_without_the_key_for_old_serials_revoked_hosts_and_foreign_cas() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let agent_dir = tmp.path().join("agent");
    let token = controller.token("web-1").await;
    drover_agent::enroll::enroll(&controller.addr.to_string(), &token, &agent_dir)
        .await
        .unwrap();
    let enrolled = Bundle::load(&agent_dir.join("identity")).unwrap();
    let client = enrollment_client(&controller);
    let reenroll = |cert_pem: &str, csr_pem: &str| {
        let request = v1::ReenrollRequest {
            cert_pem: cert_pem.to_string(),
            csr_pem: csr_pem.to_string(),
        };
        let mut client = client.clone();
        async move { client.reenroll(request).await }
    };
    let denied = |result: Result<tonic::Response<v1::EnrollResponse>, tonic::Status>,
                  needle: &str| {
        let status = result.expect_err("re-enrollment must be refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{needle:?} missing in: {}",
            status.message()
        );
    };

    // A CSR made with another key than the certificate's.
    let old = expire_identity(&controller, &agent_dir, 60);
    let (_, other_csr) = new_key_and_csr("web-1").unwrap();
    denied(
        reenroll(&old.cert_pem, &other_csr).await,
        "not signed with the key",
    );

    // The right key, an expired certificate within the grace: a fresh certificate, same key.
    let csr = csr_for_key(&old.key_pem, "web-1").unwrap();
    let fresh = reenroll(&old.cert_pem, &csr)
        .await
        .expect("re-enrolled")
        .into_inner();
    let fresh_info = CertInfo::from_pem(&fresh.cert_pem).unwrap();
    let old_info = CertInfo::from_pem(&old.cert_pem).unwrap();
    assert_eq!(fresh_info.identity, Some(web1()));
    assert_eq!(fresh_info.public_key, old_info.public_key);
    assert!(fresh_info.not_after_unix > unix_now() + 3600);
    assert_eq!(
        controller
            .shared
            .store
            .host("web-1")
            .unwrap()
            .unwrap()
            .serials
            .last(),
        Some(&fresh_info.serial)
    );

    // The same expired certificate again: a newer one was issued, so it is superseded. So is
    // the certificate from the original enrollment.
    denied(reenroll(&old.cert_pem, &csr).await, "not the newest");
    let csr0 = csr_for_key(&enrolled.key_pem, "web-1").unwrap();
    denied(reenroll(&enrolled.cert_pem, &csr0).await, "not the newest");

    // A certificate from another CA, for the same host name and with its own key.
    let foreign = Ca::generate().unwrap();
    let now = unix_now();
    let (theirs, their_key) = foreign
        .issue_between(&web1(), now - 7200, now - 60)
        .unwrap();
    let their_csr = csr_for_key(&their_key, "web-1").unwrap();
    denied(
        reenroll(&theirs.cert_pem, &their_csr).await,
        "not issued by this controller's CA",
    );

    // An operator certificate of this CA is no agent.
    let operator = Identity::Operator {
        name: "web-1".into(),
        role: Role::Admin,
    };
    let (op, op_key) = controller
        .shared
        .ca
        .issue_between(&operator, now - 7200, now - 60)
        .unwrap();
    denied(
        reenroll(&op.cert_pem, &csr_for_key(&op_key, "web-1").unwrap()).await,
        "only agent certificates",
    );

    // A revoked host: refused, even with its newest certificate and key.
    let newest = Bundle {
        cert_pem: fresh.cert_pem.clone(),
        ..old.clone()
    };
    controller
        .admin()
        .revoke_host(v1::RevokeHostRequest {
            name: "web-1".into(),
        })
        .await
        .unwrap();
    denied(reenroll(&newest.cert_pem, &csr).await, "was revoked");

    // Garbage and oversized input are refused without a certificate.
    let status = reenroll("not a certificate", &csr).await.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);
    let status = reenroll(&"A".repeat(20 * 1024), &csr).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // Beyond what Enrollment reads at all, the message is refused from its length.
    let status = reenroll(&"A".repeat(64 * 1024), &csr).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    controller.stop().await;
}

#[tokio::test]
async fn past_the_grace_reenrollment_is_refused_naming_the_date() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let config = drover_controller::ControllerConfig {
        reenroll_grace: Duration::from_secs(3600),
        ..fast_controller_config(&tmp.path().join("ctl"))
    };
    let controller = TestController::start(config).await;
    let agent_dir = tmp.path().join("agent");
    let token = controller.token("web-1").await;
    drover_agent::enroll::enroll(&controller.addr.to_string(), &token, &agent_dir)
        .await
        .unwrap();
    let expired = expire_identity(&controller, &agent_dir, 7200);
    let csr = csr_for_key(&expired.key_pem, "web-1").unwrap();
    let status = enrollment_client(&controller)
        .reenroll(v1::ReenrollRequest {
            cert_pem: expired.cert_pem.clone(),
            csr_pem: csr,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let not_after = CertInfo::from_pem(&expired.cert_pem)
        .unwrap()
        .not_after_unix;
    let date = drover_controller::enrollment::rfc3339(not_after);
    assert!(
        status.message().contains(&date) && status.message().contains("grace (1h)"),
        "{}",
        status.message()
    );
    controller.stop().await;
}

#[tokio::test]
async fn an_expired_certificate_opens_no_session_and_calls_no_operator_rpc() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();
    let agent_dir = tmp.path().join("agent");
    let token = controller.token("web-1").await;
    drover_agent::enroll::enroll(&addr, &token, &agent_dir)
        .await
        .unwrap();
    // The agent's newest certificate, expired a minute ago, with its real key: good enough to
    // re-enroll, and for nothing else.
    let expired = expire_identity(&controller, &agent_dir, 60);
    let config = client_config(
        &Trust::Ca(expired.ca_pem.clone()),
        Some(&ClientCert {
            cert_pem: expired.cert_pem.clone(),
            key_pem: expired.key_pem.clone(),
        }),
    )
    .unwrap();
    let mut agent_api = v1::agent_service_client::AgentServiceClient::new(
        channel(&addr, config, Duration::from_secs(5)).unwrap(),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Hello(v1::Hello {
            host: "web-1".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let status = match agent_api
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .expect_err("no session with an expired certificate"),
    };
    let cause = describe_transport(&status);
    assert!(cause.contains("CertificateExpired"), "session: {cause}");
    let status = operator_client(&addr, &expired)
        .list_hosts(v1::ListHostsRequest {})
        .await
        .unwrap_err();
    let cause = describe_transport(&status);
    assert!(
        cause.contains("CertificateExpired"),
        "operator API: {cause}"
    );

    // An expired admin certificate likewise, however it was issued.
    let now = unix_now();
    let admin = Identity::Operator {
        name: "admin".into(),
        role: Role::Admin,
    };
    let (issued, key_pem) = controller
        .shared
        .ca
        .issue_between(&admin, now - 7200, now - 60)
        .unwrap();
    let expired_admin = Bundle {
        ca_pem: expired.ca_pem.clone(),
        cert_pem: issued.cert_pem,
        key_pem,
    };
    let status = operator_client(&addr, &expired_admin)
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .unwrap_err();
    assert!(
        describe_transport(&status).contains("CertificateExpired"),
        "{status:?}"
    );
    // The agent daemon itself, started on that identity, re-enrolls and connects.
    let mut agent = TestAgent::start(fast_agent_config(&agent_dir, &addr)).await;
    agent.wait_connected().await;
    assert_eq!(agent.status.borrow().reenrollments, 1);
    agent.stop().await;
    controller.stop().await;
}
