//! Operator certificates over real mTLS: every one issued is recorded and listed, `drover
//! operator revoke` refuses them on every call from then on (across a restart, and by name for
//! certificates issued before serials were recorded), and the controller keeps its admin bundle
//! renewed.

use std::time::Duration;

use drover_e2e::{TestController, fast_controller_config, init, operator_client};
use drover_identity::files::Bundle;
use drover_identity::pki::{CertInfo, unix_now};
use drover_identity::{Identity, Role};
use drover_proto::v1;

/// `name`'s call to the API is refused as revoked.
async fn assert_revoked(addr: &str, bundle: &Bundle, who: &str) {
    let status = operator_client(addr, bundle)
        .list_hosts(v1::ListHostsRequest {})
        .await
        .expect_err("a revoked operator is refused");
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{who}: {status:?}"
    );
    assert!(
        status.message().contains("revoked"),
        "{who}: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_operator_is_refused_on_every_call_across_a_restart() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let config = fast_controller_config(&tmp.path().join("ctl"));
    let controller = TestController::start(config.clone()).await;
    let addr = controller.addr.to_string();
    let vic = controller.viewer("vic").await;
    let vic_serial = CertInfo::from_pem(&vic.cert_pem).unwrap().serial;
    // A certificate from before serials were recorded: issued by the CA, never recorded.
    let unrecorded = {
        let identity = Identity::Operator {
            name: "old".into(),
            role: Role::Admin,
        };
        let (issued, key_pem) = controller
            .shared
            .ca
            .issue(&identity, Duration::from_secs(3600))
            .unwrap();
        Bundle {
            ca_pem: vic.ca_pem.clone(),
            cert_pem: issued.cert_pem,
            key_pem,
        }
    };
    for (who, bundle) in [("vic", &vic), ("old", &unrecorded)] {
        operator_client(&addr, bundle)
            .list_hosts(v1::ListHostsRequest {})
            .await
            .unwrap_or_else(|e| panic!("{who} works before: {e:?}"));
    }

    // `drover operator list`: the admin bundle and vic, with serial, role, dates, state.
    let list = controller.cli_json(&["operator", "list", "--json"]);
    let rows = list.as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {list}"))
            .clone()
    };
    let admin = row("admin");
    assert_eq!(
        (
            admin["role"].as_str(),
            admin["created_by"].as_str(),
            admin["state"].as_str()
        ),
        (Some("admin"), Some("controller"), Some("valid"))
    );
    let v = row("vic");
    assert_eq!(v["serial"], vic_serial.as_str());
    assert_eq!(v["role"], "viewer");
    assert_eq!(v["created_by"], "admin");
    assert!(v["issued_at"].as_str().unwrap().ends_with('Z'));
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    let (code, table, _) = controller.cli(&["operator", "list"]);
    assert_eq!(code, 0);
    assert!(table.contains("vic") && table.contains("viewer"), "{table}");

    // A viewer may list but not revoke.
    let status = operator_client(&addr, &vic)
        .revoke_operator(v1::RevokeOperatorRequest { name: "vic".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    // Revoke both: refused from now on.
    let (code, out, err) = controller.cli(&["operator", "revoke", "vic"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("operator vic revoked: 1 recorded"), "{out}");
    let (code, _, err) = controller.cli(&["operator", "revoke", "old"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no certificate was recorded for old"), "{err}");
    assert_revoked(&addr, &vic, "vic").await;
    assert_revoked(&addr, &unrecorded, "old").await;
    let list = controller.cli_json(&["operator", "list", "--json"]);
    let vic_row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "vic")
        .unwrap()
        .clone();
    assert_eq!(vic_row["state"], "revoked");
    assert!(vic_row["revoked_at"].as_str().unwrap().ends_with('Z'));

    // Across a restart on the same data dir.
    controller.stop().await;
    let controller = TestController::start(drover_controller::ControllerConfig {
        listen: addr.parse().unwrap(),
        ..config
    })
    .await;
    assert_revoked(&addr, &vic, "vic after a restart").await;
    assert_revoked(&addr, &unrecorded, "old after a restart").await;
    // Revocation is of certificates, not of the name: a new identity for vic works.
    let vic2 = controller.viewer("vic").await;
    operator_client(&addr, &vic2)
        .list_hosts(v1::ListHostsRequest {})
        .await
        .expect("a certificate issued after the revocation works");
    // The admin was untouched.
    controller
        .admin()
        .list_hosts(v1::ListHostsRequest {})
        .await
        .unwrap();
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_renews_its_admin_bundle_at_start_when_due_and_after_a_revocation() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("ctl");
    let admin_dir = drover_controller::operators::admin_bundle_dir(&data_dir);
    let serial = || {
        CertInfo::from_pem(&Bundle::load(&admin_dir).unwrap().cert_pem)
            .unwrap()
            .serial
    };

    // First start: the bundle lives operator_cert_ttl (30 days by default).
    let config = fast_controller_config(&data_dir);
    let controller = TestController::start(config.clone()).await;
    let first = CertInfo::from_pem(&Bundle::load(&admin_dir).unwrap().cert_pem).unwrap();
    let life = first.not_after_unix - unix_now();
    assert!(
        (30 * 24 * 3600 - 60..=30 * 24 * 3600).contains(&life),
        "30 days by default, got {life}s"
    );
    controller.stop().await;

    // A start with a shorter operator_cert_ttl: the bundle would outlive it, so it is renewed.
    let short = drover_controller::ControllerConfig {
        operator_cert_ttl: Duration::from_secs(3600),
        ..config
    };
    let controller = TestController::start(short).await;
    assert_ne!(serial(), first.serial, "renewed at start");
    let renewed = CertInfo::from_pem(&Bundle::load(&admin_dir).unwrap().cert_pem).unwrap();
    assert!(renewed.not_after_unix - unix_now() <= 3600);
    controller
        .admin()
        .list_hosts(v1::ListHostsRequest {})
        .await
        .expect("the renewed bundle works");

    // While it runs: nothing before 40 % of the life, a new bundle after.
    let shared = controller.shared.clone();
    let now = unix_now();
    assert_eq!(
        drover_controller::operators::renew_admin_bundle(shared.clone(), now)
            .await
            .unwrap(),
        None
    );
    let (new_serial, due) =
        drover_controller::operators::renew_admin_bundle(shared.clone(), renewed.renew_at_unix())
            .await
            .unwrap()
            .expect("due at 40 %");
    assert_eq!(due, drover_controller::operators::Due::Renewal);
    assert_eq!(serial(), new_serial);
    let recorded = shared.store.operator_certs().unwrap();
    assert!(
        recorded
            .iter()
            .any(|r| r.serial == new_serial && r.name == "admin" && r.created_by == "controller"),
        "{recorded:?}"
    );
    controller
        .admin()
        .list_hosts(v1::ListHostsRequest {})
        .await
        .expect("the renewed bundle works");

    // `drover operator revoke admin`: every admin certificate so far is refused, and the
    // controller writes a new bundle at once, so the controller host keeps its admin.
    let before = Bundle::load(&admin_dir).unwrap();
    let (code, _, err) = controller.cli(&["operator", "revoke", "admin"]);
    assert_eq!(code, 0, "{err}");
    assert_revoked(
        &controller.addr.to_string(),
        &before,
        "the old admin bundle",
    )
    .await;
    assert_ne!(serial(), new_serial);
    controller
        .admin()
        .list_hosts(v1::ListHostsRequest {})
        .await
        .expect("the admin bundle written after the revocation works");
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_operators_open_watch_is_cut() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();
    // A job that stays open: its host's (scripted) agent never reports on it.
    let b1 =
        drover_e2e::ScriptedAgent::enroll(&controller, "web-1", &[], &tmp.path().join("a")).await;
    let web1 = drover_e2e::ScriptedAgent::connect(&addr, &b1, "web-1").await;
    controller
        .apply_target("name = \"db\"\nhost = \"web-1\"\n[postgres]\ncontainer = \"db\"\ndatabases = [\"app\"]\n")
        .await;
    let job = controller
        .admin()
        .run_backup(v1::RunBackupRequest {
            target: "db".into(),
            host: String::new(),
        })
        .await
        .expect("run backup")
        .into_inner()
        .id;
    let vic = controller.viewer("vic").await;
    let mut stream = operator_client(&addr, &vic)
        .watch_job(v1::WatchJobRequest { id: job.clone() })
        .await
        .expect("a viewer may watch")
        .into_inner();
    // The job as it stands arrives first; the stream then stays open.
    let first = stream.message().await.expect("first message");
    assert!(first.is_some());
    let (code, _, err) = controller.cli(&["operator", "revoke", "vic"]);
    assert_eq!(code, 0, "{err}");
    let revoked_at = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream of a revoked operator ends within 10 s");
    let status = ended.expect_err("it ends with an error, not as a finished job");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{}", status.message());
    assert!(
        revoked_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        revoked_at.elapsed()
    );
    web1.close();
    controller.stop().await;
}
