//! Backup records as the controller keeps them, with scripted agents over real mTLS (real
//! enrolled certificates): a host cannot write another host's catalog or validations, nor
//! report under a job it was not sent, while the genuine path still lists, verifies and
//! resolves the stale-backup alert; and a viewer's `drover backup prune --dry-run` (the real
//! binary) answers from the controller's catalog without creating a job.

use std::collections::BTreeMap;

use drover_controller::alerting::Alerting;
use drover_controller::server::now_ms;
use drover_e2e::{ScriptedAgent, TestController, drover_cli, fast_controller_config, init};
use drover_model::backup::catalog::{self, Backup, Check, CheckResult, Trigger, Verification};
use drover_proto::v1;

const DAY: i64 = 24 * 3600 * 1000;
const HOUR: i64 = 3600 * 1000;

/// A PostgreSQL target `name` pinned to `host` (nothing runs it: the agents are scripted).
fn pinned_target(name: &str, host: &str) -> String {
    format!(
        "name = \"{name}\"\nhost = \"{host}\"\n[postgres]\ncontainer = \"{name}\"\ndatabases = [\"app\"]\n"
    )
}

fn backup(id: &str, target: &str, host: &str, finished: i64, verified: i64) -> Backup {
    Backup {
        id: id.into(),
        target: target.into(),
        host: host.into(),
        kind: "postgres".into(),
        trigger: Trigger::Manual,
        job_id: String::new(),
        requested_by: "test".into(),
        started_unix_ms: finished - 1000,
        finished_unix_ms: finished,
        parts: vec![],
        compression: "zstd-3".into(),
        recipients: vec![],
        release: String::new(),
        local_dir: format!("/var/lib/drover-agent/backups/{target}/{id}"),
        remote: String::new(),
        verified_unix_ms: verified,
        local_corrupt: String::new(),
        extra: BTreeMap::new(),
    }
}

fn passed_verification(job_id: &str, target: &str, backup_id: &str, at: i64) -> Verification {
    Verification {
        job_id: job_id.into(),
        target: target.into(),
        host: String::new(),
        backup_id: backup_id.into(),
        started_unix_ms: at - 1000,
        finished_unix_ms: at,
        checks: vec![Check {
            name: "hash_local".into(),
            result: CheckResult::Passed,
            message: "matches the manifest".into(),
            duration_ms: 5,
            evidence: BTreeMap::new(),
        }],
        copy: String::new(),
        local_corrupt: String::new(),
    }
}

async fn send_catalog(agent: &mut ScriptedAgent, job_id: &str, target: &str, backups: &[Backup]) {
    agent.send_catalog(job_id, target, backups).await;
}

async fn send_verification(agent: &mut ScriptedAgent, job_id: &str, v: &Verification) {
    agent.send_verification(job_id, v).await;
}

async fn run_backup(controller: &TestController, target: &str) -> String {
    controller
        .admin()
        .run_backup(v1::RunBackupRequest {
            target: target.into(),
            host: String::new(),
        })
        .await
        .expect("run backup")
        .into_inner()
        .id
}

async fn listed(controller: &TestController, target: &str) -> Vec<v1::BackupInfo> {
    controller
        .admin()
        .list_backups(v1::ListBackupsRequest {
            target: target.into(),
        })
        .await
        .expect("list backups")
        .into_inner()
        .backups
}

async fn history(controller: &TestController, target: &str) -> Vec<v1::VerificationInfo> {
    controller
        .admin()
        .list_verifications(v1::ListVerificationsRequest {
            target: target.into(),
            limit: 0,
        })
        .await
        .expect("list verifications")
        .into_inner()
        .verifications
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cannot_forge_another_hosts_backups_or_validations() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();
    let b1 = ScriptedAgent::enroll(&controller, "web-1", &[], &tmp.path().join("web-1")).await;
    let b2 = ScriptedAgent::enroll(&controller, "web-2", &[], &tmp.path().join("web-2")).await;
    let mut web1 = ScriptedAgent::connect(&addr, &b1, "web-1").await;
    let mut web2 = ScriptedAgent::connect(&addr, &b2, "web-2").await;
    controller
        .apply_target(&pinned_target("shop-db", "web-1"))
        .await;
    controller
        .apply_target(&pinned_target("crm-db", "web-2"))
        .await;
    let alerting = Alerting::new(controller.shared.clone());
    let stale = "backup_stale:shop-db".to_string();
    let t1 = now_ms() + 3 * DAY;
    let report = alerting.tick(t1).await.unwrap();
    assert!(report.opened.contains(&stale), "{report:?}");
    // Fresh and verified as of the next tick, were they believed.
    let fresh = t1 + 1000;
    let forged = [backup("shop-db-forged", "shop-db", "web-1", fresh, fresh)];

    // web-2, with its own certificate, for web-1's target: without a job, under a job that
    // never existed, under web-1's backup and verify jobs.
    send_catalog(&mut web2, "", "shop-db", &forged).await;
    send_catalog(&mut web2, "backup-20261201-000000-0000", "shop-db", &forged).await;
    let backup_job = run_backup(&controller, "shop-db").await;
    assert_eq!(web1.next_command().await.job_id, backup_job);
    send_catalog(&mut web2, &backup_job, "shop-db", &forged).await;
    let verify_job = controller.start_verify("shop-db").await;
    assert_eq!(web1.next_command().await.job_id, verify_job);
    send_verification(
        &mut web2,
        &verify_job,
        &passed_verification(&verify_job, "shop-db", "shop-db-forged", fresh),
    )
    .await;
    send_catalog(&mut web2, &verify_job, "shop-db", &forged).await;
    // A validation under a backup job is no validation either.
    send_verification(
        &mut web1,
        &backup_job,
        &passed_verification(&backup_job, "shop-db", "shop-db-forged", fresh),
    )
    .await;

    // web-1 under a job it was not sent (web-2's backup of crm-db), for either target.
    let crm_job = run_backup(&controller, "crm-db").await;
    assert_eq!(web2.next_command().await.job_id, crm_job);
    send_catalog(&mut web1, &crm_job, "shop-db", &forged).await;
    let crm_forged = [backup("crm-db-forged", "crm-db", "web-1", fresh, fresh)];
    send_catalog(&mut web1, &crm_job, "crm-db", &crm_forged).await;

    // Every one was acknowledged (event_with waits for it), none was kept.
    assert!(listed(&controller, "shop-db").await.is_empty());
    assert!(listed(&controller, "crm-db").await.is_empty());
    assert!(history(&controller, "shop-db").await.is_empty());
    assert!(controller.shared.store.all_backups().unwrap().is_empty());
    let (code, out, err) = controller.cli(&["backup", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "[]", "{out}");
    let report = alerting.tick(t1 + HOUR).await.unwrap();
    assert!(!report.resolved.contains(&stale), "{report:?}");
    let open = controller.shared.store.alert(&stale).unwrap().unwrap();
    assert!(open.is_open(), "{open:?}");
    // What is stored of them says why, outside any job, without the forged record.
    let events = controller.shared.store.events("web-2", 0, 100).unwrap();
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.fields.contains_key("refused"))
        .collect();
    assert_eq!(refused.len(), 5, "{events:#?}");
    assert!(refused.iter().all(|e| e.job_id.is_empty()
        && !e.fields.contains_key(catalog::field::BACKUPS)
        && !e.fields.contains_key(catalog::field::VERIFICATION)
        && e.payload.is_none()));
    assert!(
        refused[2].fields["refused"].contains("was not sent to host \"web-2\""),
        "{:?}",
        refused[2]
    );
    assert!(controller.job_events("web-2", &backup_job).is_empty());
    let web1_refused: Vec<String> = controller
        .shared
        .store
        .events("web-1", 0, 100)
        .unwrap()
        .into_iter()
        .filter_map(|e| e.fields.get("refused").cloned())
        .collect();
    assert_eq!(web1_refused.len(), 3, "{web1_refused:?}");
    assert!(
        web1_refused[0].contains("does not report backup.verification"),
        "{web1_refused:?}"
    );
    assert!(
        web1_refused[1..]
            .iter()
            .all(|r| r.contains("was not sent to host \"web-1\"")),
        "{web1_refused:?}"
    );

    // The genuine path: web-1 reports its own backup and validation under its own jobs.
    web1.finish_job(&backup_job, "succeeded").await;
    let genuine = backup("shop-db-genuine", "shop-db", "", fresh, 0);
    send_catalog(
        &mut web1,
        &backup_job,
        "shop-db",
        std::slice::from_ref(&genuine),
    )
    .await;
    let shown = listed(&controller, "shop-db").await;
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(
        (shown[0].id.as_str(), shown[0].host.as_str()),
        ("shop-db-genuine", "web-1")
    );
    assert_eq!(shown[0].verified_unix_ms, 0);
    send_verification(
        &mut web1,
        &verify_job,
        &passed_verification(&verify_job, "shop-db", "shop-db-genuine", fresh),
    )
    .await;
    web1.finish_job(&verify_job, "succeeded").await;
    let verified = Backup {
        verified_unix_ms: fresh,
        ..genuine.clone()
    };
    send_catalog(&mut web1, &verify_job, "shop-db", &[verified]).await;
    let shown = listed(&controller, "shop-db").await;
    assert_eq!(shown[0].verified_unix_ms, fresh, "{shown:?}");
    let validations = history(&controller, "shop-db").await;
    assert_eq!(validations.len(), 1, "{validations:?}");
    assert!(validations[0].passed);
    assert_eq!(validations[0].host, "web-1");
    let report = alerting.tick(t1 + 2 * HOUR).await.unwrap();
    assert!(report.resolved.contains(&stale), "{report:?}");
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewers_prune_dry_run_creates_no_job_and_names_the_backups() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let addr = controller.addr.to_string();
    let bundle = ScriptedAgent::enroll(&controller, "db-1", &[], &tmp.path().join("db-1")).await;
    let mut agent = ScriptedAgent::connect(&addr, &bundle, "db-1").await;
    controller
        .apply_target(
            "name = \"site\"\n[postgres]\ncontainer = \"site\"\ndatabases = [\"app\"]\n\
             [retention]\nkeep_last = 1\ndaily = 0\nweekly = 0\nmonthly = 0\n",
        )
        .await;
    let job = run_backup(&controller, "site").await;
    assert_eq!(agent.next_command().await.job_id, job);
    agent.finish_job(&job, "succeeded").await;
    let now = now_ms();
    let old = backup("site-20261101-020000-0001", "site", "", now - 2 * DAY, 0);
    let new = backup("site-20261102-020000-0002", "site", "", now - DAY, 0);
    send_catalog(&mut agent, &job, "site", &[old.clone(), new.clone()]).await;

    let viewer_dir = tmp.path().join("viewer");
    controller.viewer("vic").await.save(&viewer_dir).unwrap();
    let jobs_before = controller.shared.store.jobs(None, 100).unwrap();
    let out = drover_cli(
        &addr,
        &viewer_dir,
        &["backup", "prune", "site", "--dry-run"],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&new.id) && stdout.contains(&old.id),
        "{stdout}"
    );
    assert!(stdout.contains("local copies: last 1"), "{stdout}");
    assert!(
        stdout.contains(&format!("would delete {} (local on db-1)", old.id)),
        "{stdout}"
    );
    let out = drover_cli(
        &addr,
        &viewer_dir,
        &["backup", "prune", "site", "--dry-run", "--json"],
    );
    assert_eq!(out.status.code(), Some(0));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["would_delete"], 1, "{plan}");
    let lines = plan["lines"].as_array().unwrap();
    let line = |id: &str| lines.iter().find(|l| l["id"] == id).unwrap().clone();
    assert_eq!(line(&new.id)["keep"], true, "{plan}");
    assert_eq!(line(&new.id)["reasons"], serde_json::json!(["last"]));
    assert_eq!(line(&old.id)["keep"], false, "{plan}");
    assert_eq!(line(&old.id)["host"], "db-1");

    // No job was created, nothing reached the host, and the job route stays admin-only.
    let jobs_after = controller.shared.store.jobs(None, 100).unwrap();
    assert_eq!(jobs_after, jobs_before);
    let (code, out, err) = controller.cli(&["jobs", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    agent.assert_no_command().await;
    let viewer = drover_e2e::operator_client(
        &addr,
        &drover_identity::files::Bundle::load(&viewer_dir).unwrap(),
    );
    let status = viewer
        .clone()
        .prune_backups(v1::PruneBackupsRequest {
            target: "site".into(),
            host: String::new(),
            dry_run: true,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("read-only"), "{status:?}");
    controller.stop().await;
}
