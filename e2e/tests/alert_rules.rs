//! The job, validation and certificate alerts end to end, on a real agent (in this process,
//! over mTLS) backing up a directory, with `Alerting::tick(now)` driven by the test and the
//! alerts read back through the real `drover` binary: a failed backup opens `job_failed` and
//! a later good one resolves it, even when more than the newest 500 jobs came in between; a
//! failed validation (a flipped byte) likewise; a target without a passed validation for 8
//! days raises `validation_stale` until `drover verify` passes; an agent certificate near its
//! end raises `cert_expiring`; `drover backup-target rm` retires a target with its schedules
//! and alerts, and keeps its backups listed.

use drover_controller::alerting::{Alerting, RECENT_JOBS};
use drover_controller::jobs::TargetState;
use drover_controller::server::now_ms;
use drover_e2e::backups::{BackupFixture, assert_job_succeeded, backup_fixture, event_field};
use drover_model::jobevent::field;

const DAY: i64 = 24 * 3600 * 1000;
const HOUR: i64 = 3600 * 1000;

/// The open alerts' keys as `drover alerts --json` shows them.
fn open_keys(f: &BackupFixture) -> Vec<String> {
    f.controller
        .cli_json(&["alerts", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_jobs_stale_validations_and_expiring_certificates_alert_and_resolve() {
    let f = backup_fixture().await;
    let alerting = Alerting::new(f.controller.shared.clone());
    let files = f.dir.path().join("files");
    f.apply(&format!(
        "name = \"files\"\n[path]\ndir = \"{}\"\n\
         [verify]\nmin_free_bytes = 0\nmin_free_fraction = 0.0\n",
        files.display()
    ))
    .await;

    // A backup of a directory that is not there fails: one job_failed alert, shown by the CLI.
    let failed = f.backup("files").await;
    assert_eq!(event_field(&failed, field::RESULT), "failed", "{failed:#?}");
    let failed_key = format!("job_failed:{}", failed.job_id);
    let report = alerting.tick(now_ms()).await.unwrap();
    assert_eq!(
        report.opened,
        std::slice::from_ref(&failed_key),
        "{report:?}"
    );
    assert_eq!(open_keys(&f), std::slice::from_ref(&failed_key));
    let shown = f.controller.cli_json(&["alerts", "--json"]);
    assert_eq!(shown[0]["kind"], "job_failed");
    assert!(
        shown[0]["message"]
            .as_str()
            .unwrap()
            .contains("backup failed: files"),
        "{shown}"
    );
    let (code, table, _) = f.controller.cli(&["alerts"]);
    assert_eq!(code, 0);
    assert!(table.contains(&failed_key), "{table}");

    // More than the newest RECENT_JOBS jobs (successful backups of another target) arrive:
    // the failure stays open.
    let store = &f.controller.shared.store;
    let template = store.job(&failed.job_id).unwrap().unwrap();
    let t = now_ms();
    for i in 0..(RECENT_JOBS as i64 + 20) {
        let mut filler = template.clone();
        filler.id = format!("filler-{i:04}");
        filler.app = "elsewhere".into();
        filler.created_unix_ms = t + i;
        filler.finished_unix_ms = t + i;
        for target in &mut filler.targets {
            target.state = TargetState::Succeeded;
        }
        assert!(store.create_job(&filler).unwrap());
    }
    let report = alerting.tick(now_ms()).await.unwrap();
    assert!(report.resolved.is_empty(), "{report:?}");
    assert!(open_keys(&f).contains(&failed_key));

    // The directory appears and a backup succeeds: resolved.
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("a.txt"), "hello").unwrap();
    assert_job_succeeded(&f.backup("files").await);
    let report = alerting.tick(now_ms()).await.unwrap();
    assert!(report.resolved.contains(&failed_key), "{report:?}");
    assert!(open_keys(&f).is_empty(), "{:?}", open_keys(&f));

    // A byte of the backup flipped: `drover verify` fails (exit 1) and opens a job_failed
    // alert for the validation; a new backup that passes resolves it.
    let newest = f.newest("files").await;
    let manifest: drover_model::backup::catalog::Backup =
        serde_json::from_str(&newest.manifest_json).unwrap();
    let part = std::path::Path::new(&newest.local_dir).join(&manifest.parts[0].file);
    let mut bytes = std::fs::read(&part).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&part, bytes).unwrap();
    let (code, _, _) = f.controller.cli(&["verify", "files"]);
    assert_eq!(code, 1, "a failed validation exits 1");
    f.drained().await;
    let report = alerting.tick(now_ms()).await.unwrap();
    assert_eq!(report.opened.len(), 1, "{report:?}");
    let verify_key = report.opened[0].clone();
    let shown = f.controller.cli_json(&["alerts", "--json"]);
    assert_eq!(shown[0]["key"], verify_key.as_str());
    assert!(
        shown[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("validation failed: files"),
        "{shown}"
    );
    assert_job_succeeded(&f.backup("files").await);
    let (code, out, err) = f.controller.cli(&["verify", "files"]);
    assert_eq!(code, 0, "drover verify: {out}{err}");
    f.drained().await;
    let report = alerting.tick(now_ms()).await.unwrap();
    assert_eq!(report.resolved, [verify_key], "{report:?}");

    // Eight days and an hour on, with no passed validation: validation_stale (and the backup
    // is stale, the silent agent down, its certificate ended). `drover verify` passes; at the
    // real time they all clear.
    let later = now_ms() + 8 * DAY + HOUR;
    let report = alerting.tick(later).await.unwrap();
    for key in ["backup_stale:files", "validation_stale:files"] {
        assert!(report.opened.contains(&key.to_string()), "{report:?}");
    }
    let (code, out, err) = f.controller.cli(&["verify", "files"]);
    assert_eq!(code, 0, "drover verify: {out}{err}");
    f.drained().await;
    let history = f
        .controller
        .cli_json(&["verify", "history", "files", "--json"]);
    assert_eq!(history.as_array().unwrap().len(), 3, "{history}");
    assert_eq!(history[1]["passed"], true, "{history}");
    assert_eq!(history[2]["passed"], false, "{history}");
    assert_eq!(history[0]["passed"], true, "{history}");
    let report = alerting.tick(now_ms()).await.unwrap();
    for key in ["backup_stale:files", "validation_stale:files"] {
        assert!(report.resolved.contains(&key.to_string()), "{report:?}");
    }
    assert!(open_keys(&f).is_empty(), "{:?}", open_keys(&f));

    // db-1's certificate, six hours or less before it ends: cert_expiring (the agent, silent
    // for that long by then, is down too). At the real time both clear.
    let host = f.controller.host("db-1").await.expect("db-1");
    let not_after = host.cert_not_after_unix * 1000;
    assert!(not_after > now_ms() + 6 * HOUR, "a fresh certificate");
    let report = alerting.tick(not_after - HOUR).await.unwrap();
    assert!(
        report.opened.contains(&"cert_expiring:db-1".to_string()),
        "{report:?}"
    );
    let shown = f.controller.cli_json(&["alerts", "--json"]);
    let cert = shown
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "cert_expiring:db-1")
        .expect("shown");
    assert_eq!(cert["subject"], "db-1");
    let report = alerting.tick(now_ms()).await.unwrap();
    assert!(
        report.resolved.contains(&"cert_expiring:db-1".to_string()),
        "{report:?}"
    );
    let all = f.controller.cli_json(&["alerts", "--all", "--json"]);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|a| a["key"] == "cert_expiring:db-1" && a["status"] == "resolved"),
        "{all}"
    );

    // A target retired with `drover backup-target rm`: its schedules go, its failed backup and
    // stale alerts resolve, its backups stay listed.
    let gone = f.dir.path().join("not-there");
    f.apply(&format!(
        "name = \"gone\"\n[path]\ndir = \"{}\"\n",
        gone.display()
    ))
    .await;
    let failed = f.backup("gone").await;
    let gone_failed = format!("job_failed:{}", failed.job_id);
    let report = alerting.tick(now_ms() + 3 * DAY).await.unwrap();
    assert!(report.opened.contains(&gone_failed), "{report:?}");
    assert!(
        report.opened.contains(&"backup_stale:gone".to_string()),
        "{report:?}"
    );
    let removed = f
        .controller
        .cli_json(&["backup-target", "rm", "gone", "--json"]);
    assert_eq!(
        removed["removed_schedules"],
        serde_json::json!(["gone-backup", "gone-verify"])
    );
    assert_eq!(removed["backups_kept"], 0);
    let report = alerting.tick(now_ms() + 3 * DAY + 1000).await.unwrap();
    assert!(report.resolved.contains(&gone_failed), "{report:?}");
    assert!(
        report.resolved.contains(&"backup_stale:gone".to_string()),
        "{report:?}"
    );
    let (code, _, err) = f.controller.cli(&["backup-target", "rm", "gone"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown backup target gone"), "{err}");
    let kept = f.backups("files").await.len();
    let removed = f
        .controller
        .cli_json(&["backup-target", "rm", "files", "--json"]);
    assert_eq!(removed["backups_kept"], kept as u64);
    assert_eq!(f.backups("files").await.len(), kept, "backups stay listed");
    f.stop().await;
}
