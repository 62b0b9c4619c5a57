//! Enrollment over real TLS: a token works once, expires, enrolls only its own host, and the
//! agent pins the controller's CA by the fingerprint in the token.

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
    let token = controller.token("web-1").await;
    let agent_dir = tmp.path().join("agent");
    let mut labels = BTreeMap::new();
    labels.insert("role".to_string(), "web".to_string());
    let enrollment =
        drover_agent::enroll::enroll(&controller.addr.to_string(), &token, &agent_dir, labels)
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
            BTreeMap::new(),
        )
        .await,
    );
    assert!(err.contains("already used"), "{err}");
    // Enrolling an already enrolled data dir is refused locally.
    let token2 = controller.token("web-1").await;
    let err = enroll_err(
        drover_agent::enroll::enroll(
            &controller.addr.to_string(),
            &token2,
            &agent_dir,
            BTreeMap::new(),
        )
        .await,
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
        drover_agent::enroll::enroll(
            &addr,
            &token.encode(),
            &tmp.path().join("a1"),
            BTreeMap::new(),
        )
        .await,
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
        drover_agent::enroll::enroll(
            &addr,
            &token.encode(),
            &tmp.path().join("a2"),
            BTreeMap::new(),
        )
        .await,
    );
    assert!(err.contains("revoked"), "{err}");

    // Malformed.
    let err = enroll_err(
        drover_agent::enroll::enroll(
            &addr,
            "drover1.nonsense",
            &tmp.path().join("a3"),
            BTreeMap::new(),
        )
        .await,
    );
    assert!(err.contains("malformed enrollment token"), "{err}");

    // A token minted by another controller: its CA fingerprint does not match, so the agent
    // refuses to talk to this controller at all.
    let other = TestController::start(fast_controller_config(&tmp.path().join("other"))).await;
    let foreign = other.token("db-1").await;
    let err = enroll_err(
        drover_agent::enroll::enroll(&addr, &foreign, &tmp.path().join("a4"), BTreeMap::new())
            .await,
    );
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
