//! Authorization over real mTLS: who may call what. Every refusal must be clear, and every
//! OperatorService RPC the proto declares is checked against a viewer and an agent certificate.

use std::time::Duration;

use drover_e2e::{TestAgent, TestController, fast_controller_config, init, operator_client};
use drover_identity::files::Bundle;
use drover_identity::pki::{Ca, unix_now};
use drover_identity::tls::describe_transport;
use drover_identity::tls::{ClientCert, Trust, channel, client_config};
use drover_identity::{Identity, Role};
use drover_proto::v1;
use drover_proto::v1::agent_message::Msg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn agent_client(
    addr: &str,
    bundle: &Bundle,
) -> v1::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
    let config = client_config(
        &Trust::Ca(bundle.ca_pem.clone()),
        Some(&ClientCert {
            cert_pem: bundle.cert_pem.clone(),
            key_pem: bundle.key_pem.clone(),
        }),
    )
    .unwrap();
    v1::agent_service_client::AgentServiceClient::new(
        channel(addr, config, Duration::from_secs(5)).unwrap(),
    )
}

fn msg(m: Msg) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(m) }
}

fn hello(host: &str) -> v1::AgentMessage {
    msg(Msg::Hello(v1::Hello {
        host: host.into(),
        agent_version: "test".into(),
        ..Default::default()
    }))
}

/// Opens a raw agent session, sends `messages`, and returns the first error the controller
/// answers with (on the call or on the stream).
async fn session_error(
    addr: &str,
    bundle: &Bundle,
    messages: Vec<v1::AgentMessage>,
) -> tonic::Status {
    let (tx, rx) = mpsc::channel(16);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    let mut client = agent_client(addr, bundle);
    let mut stream = match client.session(ReceiverStream::new(rx)).await {
        Err(status) => return status,
        Ok(response) => response.into_inner(),
    };
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the controller answers within 10s");
    drop(tx);
    result
}

fn bundle_from(
    ca: &Ca,
    identity: &Identity,
    cert_ca_pem: &str,
    validity: Option<(i64, i64)>,
) -> Bundle {
    let (issued, key_pem) = match validity {
        Some((nb, na)) => ca.issue_between(identity, nb, na).unwrap(),
        None => ca.issue(identity, Duration::from_secs(3600)).unwrap(),
    };
    Bundle {
        ca_pem: cert_ca_pem.to_string(),
        cert_pem: issued.cert_pem,
        key_pem,
    }
}

#[tokio::test]
async fn clients_without_a_valid_certificate_are_refused_clearly() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();
    let ca_pem = controller.shared.ca.cert_pem().to_string();

    // No client certificate at all.
    let config = client_config(&Trust::Ca(ca_pem.clone()), None).unwrap();
    let mut anonymous = v1::operator_service_client::OperatorServiceClient::new(
        channel(&addr, config, Duration::from_secs(5)).unwrap(),
    );
    let status = anonymous
        .list_hosts(v1::ListHostsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("no client certificate"),
        "{}",
        status.message()
    );

    // A certificate from a foreign CA: the TLS handshake is refused (under TLS 1.3 this shows
    // on the first call).
    let foreign_ca = Ca::generate().unwrap();
    let admin = Identity::Operator {
        name: "admin".into(),
        role: Role::Admin,
    };
    let foreign = bundle_from(&foreign_ca, &admin, &ca_pem, None);
    let status = operator_client(&addr, &foreign)
        .list_hosts(v1::ListHostsRequest {})
        .await
        .unwrap_err();
    let cause = describe_transport(&status);
    assert!(cause.contains("UnknownCA"), "foreign CA: {cause}");

    // An expired certificate from the right CA.
    let now = unix_now();
    let expired = bundle_from(
        &controller.shared.ca,
        &admin,
        &ca_pem,
        Some((now - 7200, now - 3600)),
    );
    let status = operator_client(&addr, &expired)
        .list_hosts(v1::ListHostsRequest {})
        .await
        .unwrap_err();
    let cause = describe_transport(&status);
    assert!(cause.contains("CertificateExpired"), "expired: {cause}");

    // The real admin works, for contrast.
    controller
        .admin()
        .list_hosts(v1::ListHostsRequest {})
        .await
        .expect("admin lists hosts");
    controller.stop().await;
}

/// A controller and a connected agent `web-1`, with the agent's certificate bundle.
async fn controller_and_agent(dir: &std::path::Path) -> (TestController, TestAgent, Bundle) {
    init();
    let controller = TestController::start(fast_controller_config(&dir.join("ctl"))).await;
    let addr = controller.addr.to_string();
    let mut agent =
        TestAgent::enroll_and_start(&controller, "web-1", &dir.join("agent"), &addr).await;
    agent.wait_connected().await;
    let agent_bundle = Bundle::load(&dir.join("agent/identity")).unwrap();
    (controller, agent, agent_bundle)
}

#[tokio::test]
async fn roles_and_services_are_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let (controller, agent, agent_bundle) = controller_and_agent(tmp.path()).await;
    let addr = controller.addr.to_string();

    // An agent certificate calling the operator API.
    let status = operator_client(&addr, &agent_bundle)
        .list_hosts(v1::ListHostsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("may not call the operator API"),
        "{}",
        status.message()
    );

    // An operator certificate calling the agent API.
    let admin_bundle = Bundle::load(&controller.admin_dir()).unwrap();
    let status = session_error(&addr, &admin_bundle, vec![hello("web-1")]).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // A viewer reads but may not change anything.
    let viewer = controller.viewer("vic").await;
    let mut viewer_api = operator_client(&addr, &viewer);
    let hosts = viewer_api
        .list_hosts(v1::ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), 1);
    let who = viewer_api
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((who.name.as_str(), who.role.as_str()), ("vic", "viewer"));
    let status = viewer_api
        .create_token(v1::CreateTokenRequest {
            host: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("read-only"),
        "{}",
        status.message()
    );
    let status = viewer_api
        .revoke_host(v1::RevokeHostRequest {
            name: "web-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    // An agent speaking as another host: in Hello, and in an event.
    let status = session_error(&addr, &agent_bundle, vec![hello("db-1")]).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("this certificate is for host web-1"),
        "{}",
        status.message()
    );
    let forged = msg(Msg::Event(v1::JobEvent {
        seq: 1_000_000,
        host: "db-1".into(),
        kind: "x".into(),
        ..Default::default()
    }));
    let status = session_error(&addr, &agent_bundle, vec![hello("web-1"), forged]).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("may not send events as host db-1"),
        "{}",
        status.message()
    );
    assert!(
        controller
            .shared
            .store
            .events("db-1", 0, 10)
            .unwrap()
            .is_empty(),
        "nothing stored for db-1"
    );
    assert!(
        controller
            .shared
            .store
            .events("web-1", 999_999, 10)
            .unwrap()
            .is_empty(),
        "nor for web-1"
    );

    agent.stop().await;
    controller.stop().await;
}

#[tokio::test]
async fn revoking_a_host_closes_its_session_and_survives_a_restart() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let config = fast_controller_config(&tmp.path().join("ctl"));
    let controller = TestController::start(config.clone()).await;
    let addr = controller.addr.to_string();
    let mut agent =
        TestAgent::enroll_and_start(&controller, "web-1", &tmp.path().join("agent"), &addr).await;
    agent.wait_connected().await;
    let agent_bundle = Bundle::load(&tmp.path().join("agent/identity")).unwrap();

    let resp = controller
        .admin()
        .revoke_host(v1::RevokeHostRequest {
            name: "web-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.session_closed);
    assert!(resp.certificates_revoked >= 1);
    // The live session is closed at once...
    tokio::time::timeout(
        Duration::from_secs(5),
        agent.status.wait_for(|s| !s.connected),
    )
    .await
    .expect("session closed within 5s")
    .unwrap();
    // ...the agent's reconnects are refused, saying why...
    let status = session_error(&addr, &agent_bundle, vec![hello("web-1")]).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("revoked"), "{}", status.message());
    let host = controller.host("web-1").await.unwrap();
    assert_eq!(host.state, "revoked");

    // ...and still after the controller restarts on the same data dir.
    controller.stop().await;
    let config = drover_controller::ControllerConfig {
        listen: addr.parse().unwrap(),
        ..config
    };
    let controller = TestController::start(config).await;
    let status = session_error(&addr, &agent_bundle, vec![hello("web-1")]).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("revoked"), "{}", status.message());
    assert!(!agent.status.borrow().connected);
    assert_eq!(controller.host("web-1").await.unwrap().state, "revoked");

    // Unknown hosts are named as such.
    let status = controller
        .admin()
        .revoke_host(v1::RevokeHostRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(status.message().contains("unknown host nope"));
    agent.stop().await;
    controller.stop().await;
}

/// The RPCs `service OperatorService` declares in the proto, in snake_case.
fn operator_rpcs() -> Vec<String> {
    let proto = include_str!("../../proto/proto/drover/v1/drover.proto");
    let service = proto
        .split("service OperatorService {")
        .nth(1)
        .and_then(|rest| rest.split("\n}").next())
        .expect("service OperatorService in the proto");
    service
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(|name| {
            let mut snake = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_lowercase());
            }
            snake
        })
        .collect()
}

/// Calls every OperatorService RPC with `client` (default requests: authorization comes
/// before any check of the arguments); (name, is a write, the error if any).
async fn call_every_rpc(
    client: &drover_e2e::OperatorServiceClient<drover_e2e::Channel>,
) -> Vec<(&'static str, bool, Option<tonic::Status>)> {
    macro_rules! call {
        ($out:ident, $method:ident, $request:ident, $write:expr) => {
            let result = client.clone().$method(v1::$request::default()).await;
            $out.push((stringify!($method), $write, result.err()));
        };
    }
    let mut out = Vec::new();
    // Reads.
    call!(out, who_am_i, WhoAmIRequest, false);
    call!(out, list_hosts, ListHostsRequest, false);
    call!(out, get_host, GetHostRequest, false);
    call!(out, list_tokens, ListTokensRequest, false);
    call!(out, list_operators, ListOperatorsRequest, false);
    call!(out, list_events, ListEventsRequest, false);
    call!(out, list_apps, ListAppsRequest, false);
    call!(out, get_app, GetAppRequest, false);
    call!(out, list_jobs, ListJobsRequest, false);
    call!(out, get_job, GetJobRequest, false);
    call!(out, watch_job, WatchJobRequest, false);
    call!(out, list_releases, ListReleasesRequest, false);
    call!(out, list_backup_targets, ListBackupTargetsRequest, false);
    call!(out, list_backups, ListBackupsRequest, false);
    call!(out, get_backup, GetBackupRequest, false);
    call!(out, list_verifications, ListVerificationsRequest, false);
    call!(out, plan_prune, PlanPruneRequest, false);
    call!(out, list_schedules, ListSchedulesRequest, false);
    call!(out, list_alerts, ListAlertsRequest, false);
    call!(out, get_release, GetReleaseRequest, false);
    call!(out, list_fleet_releases, ListFleetReleasesRequest, false);
    // Writes.
    call!(out, revoke_host, RevokeHostRequest, true);
    call!(out, create_token, CreateTokenRequest, true);
    call!(out, revoke_token, RevokeTokenRequest, true);
    call!(out, create_operator, CreateOperatorRequest, true);
    call!(out, revoke_operator, RevokeOperatorRequest, true);
    call!(out, apply_app, ApplyAppRequest, true);
    call!(out, deploy, DeployRequest, true);
    call!(out, rollback, RollbackRequest, true);
    call!(out, apply_backup_target, ApplyBackupTargetRequest, true);
    call!(out, remove_backup_target, RemoveBackupTargetRequest, true);
    call!(out, run_backup, RunBackupRequest, true);
    call!(out, prune_backups, PruneBackupsRequest, true);
    call!(out, restore, RestoreRequest, true);
    call!(out, verify, VerifyRequest, true);
    call!(out, add_schedule, AddScheduleRequest, true);
    call!(out, remove_schedule, RemoveScheduleRequest, true);
    call!(out, pause_schedule, PauseScheduleRequest, true);
    call!(out, resume_schedule, ResumeScheduleRequest, true);
    call!(out, cancel_job, CancelJobRequest, true);
    call!(out, start_release, StartReleaseRequest, true);
    call!(out, control_release, ControlReleaseRequest, true);
    out
}

#[tokio::test]
async fn every_operator_rpc_checks_the_callers_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (controller, agent, agent_bundle) = controller_and_agent(tmp.path()).await;
    let addr = controller.addr.to_string();

    // A viewer: every read is let through (it may then fail on the empty request), every
    // write is refused as read-only.
    let viewer = operator_client(&addr, &controller.viewer("vic").await);
    let calls = call_every_rpc(&viewer).await;
    let called: Vec<String> = calls.iter().map(|(name, _, _)| name.to_string()).collect();
    let mut declared = operator_rpcs();
    declared.sort();
    let mut sorted = called.clone();
    sorted.sort();
    assert_eq!(
        sorted, declared,
        "every OperatorService RPC of the proto, no other"
    );
    for (name, write, error) in &calls {
        let code = error.as_ref().map(|e| e.code());
        if *write {
            let e = error
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: a viewer wrote"));
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{name}: {e:?}");
            assert!(e.message().contains("read-only"), "{name}: {}", e.message());
        } else {
            assert!(
                !matches!(
                    code,
                    Some(tonic::Code::PermissionDenied | tonic::Code::Unauthenticated)
                ),
                "{name}: a viewer could not read: {error:?}"
            );
        }
    }

    // An agent's certificate reaches none of them.
    for (name, _, error) in call_every_rpc(&operator_client(&addr, &agent_bundle)).await {
        let e = error.unwrap_or_else(|| panic!("{name}: an agent called the operator API"));
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{name}: {e:?}");
        assert!(
            e.message().contains("may not call the operator API"),
            "{name}: {}",
            e.message()
        );
    }
    // Nothing was changed by any of it.
    assert!(controller.shared.store.schedules().unwrap().is_empty());
    assert!(controller.shared.store.backup_targets().unwrap().is_empty());
    assert!(controller.shared.store.jobs(None, 10).unwrap().is_empty());

    agent.stop().await;
    controller.stop().await;
}
