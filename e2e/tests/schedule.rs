//! The scheduler on the controller's side, with time driven by the test: a real controller
//! (its own scheduler task off), a scripted agent session over real mTLS, and
//! `Scheduler::tick(now)` called with chosen times. Proves default schedules, one dispatch per
//! fire, no overlap while a run is unfinished, one catch-up run after a 3-day gap, pause and
//! resume, schedules kept across a controller restart, a one-off deploy (`--at`) firing once,
//! a verify schedule dispatching a verify job, and a target's `[schedule]` table kept in step
//! through the `drover` binary (override, turn off, pause kept, refusals, schedules of targets
//! stored before the table existed filled in at start), and that the scheduler, alert and
//! admin-bundle tasks are joined before the controller returns.

use drover_controller::scheduler::{Fired, Scheduler};
use drover_controller::store::{ScheduleKind, ScheduleRecord, Store};
use drover_e2e::backups::container_target;
use drover_e2e::{ScriptedAgent, TestController, fast_controller_config, init};
use drover_proto::v1;
use serde_json::Value;
use tonic::Code;

const DAY: i64 = 24 * 3600 * 1000;
const HOST: &str = "db-1";

async fn schedules(controller: &TestController) -> Vec<v1::ScheduleInfo> {
    controller
        .admin()
        .list_schedules(v1::ListSchedulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .schedules
}

async fn schedule(controller: &TestController, id: &str) -> v1::ScheduleInfo {
    schedules(controller)
        .await
        .into_iter()
        .find(|s| s.id == id)
        .unwrap_or_else(|| panic!("no schedule {id}"))
}

fn only<'a>(fired: &'a [Fired], id: &str) -> Vec<&'a Fired> {
    fired.iter().filter(|f| f.schedule == id).collect()
}

fn backup_of(cmd: &v1::Command) -> &v1::BackupCommand {
    match &cmd.job {
        Some(v1::command::Job::Backup(b)) => b,
        other => panic!("expected a backup command, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_fire_once_never_overlap_and_catch_up_once() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&tmp.path().join("ctl"))).await;
    let bundle = ScriptedAgent::enroll(&controller, HOST, &[], &tmp.path().join(HOST)).await;
    let mut agent = ScriptedAgent::connect(&controller.addr.to_string(), &bundle, HOST).await;
    controller.apply_target(&container_target("shop-db")).await;

    // The defaults: nightly backup with jitter, weekly verify, both UTC, 3 next runs each.
    let backup = schedule(&controller, "shop-db-backup").await;
    assert_eq!(
        (
            backup.kind.as_str(),
            backup.cron.as_str(),
            backup.jitter_secs
        ),
        ("backup", "0 2 * * *", 900)
    );
    assert_eq!(backup.next_runs_unix_ms.len(), 3);
    let verify = schedule(&controller, "shop-db-verify").await;
    assert_eq!(
        (verify.kind.as_str(), verify.cron.as_str()),
        ("verify", "0 6 * * 0")
    );
    assert_eq!(verify.next_runs_unix_ms.len(), 3);
    assert_eq!(
        verify.next_runs_unix_ms[1] - verify.next_runs_unix_ms[0],
        7 * DAY
    );

    // The weekly verify is paused here: the ticks below span days, and on some dates a
    // Sunday 06:00 falls among them, which would send a verify the agent does not expect.
    controller
        .admin()
        .pause_schedule(v1::PauseScheduleRequest {
            id: "shop-db-verify".into(),
        })
        .await
        .unwrap();
    let scheduler = Scheduler::new(controller.shared.clone());
    let first = backup.next_runs_unix_ms[0];
    assert!(only(&scheduler.tick(first - 1).await.unwrap(), "shop-db-backup").is_empty());

    // Due: one backup command, trigger "scheduled", under the recorded job id.
    let fired = scheduler.tick(first).await.unwrap();
    let fired = only(&fired, "shop-db-backup");
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!((fired[0].result.as_str(), fired[0].covers), ("started", 1));
    let job = fired[0].job_id.clone();
    let cmd = agent.next_command().await;
    assert_eq!(cmd.job_id, job);
    let b = backup_of(&cmd);
    assert_eq!(
        (b.target.as_str(), b.trigger.as_str()),
        ("shop-db", "scheduled")
    );
    assert_eq!(
        schedule(&controller, "shop-db-backup")
            .await
            .last_run_job_id,
        job
    );

    // The same tick again, and the next night while the run is unfinished: nothing.
    assert!(only(&scheduler.tick(first).await.unwrap(), "shop-db-backup").is_empty());
    assert!(
        only(
            &scheduler.tick(first + DAY + 1000).await.unwrap(),
            "shop-db-backup"
        )
        .is_empty()
    );
    agent.assert_no_command().await;

    // The run ends; three nights later (controller "down" meanwhile): one run covering 3.
    agent.finish_job(&job, "succeeded").await;
    let later = first + 3 * DAY + 3_600_000;
    let fired = scheduler.tick(later).await.unwrap();
    let fired = only(&fired, "shop-db-backup");
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].covers, 3);
    let second = fired[0].job_id.clone();
    assert_ne!(second, job);
    assert_eq!(agent.next_command().await.job_id, second);
    assert!(
        only(
            &scheduler.tick(later + 1000).await.unwrap(),
            "shop-db-backup"
        )
        .is_empty()
    );
    agent.assert_no_command().await;
    let s = schedule(&controller, "shop-db-backup").await;
    assert_eq!((s.runs_missed, s.last_result.as_str()), (2, "started"));
    agent.finish_job(&second, "succeeded").await;
    scheduler.tick(later + 2000).await.unwrap();
    assert_eq!(
        schedule(&controller, "shop-db-backup").await.last_result,
        "succeeded"
    );

    // The verify default fires on Sunday: a verify job goes to the host.
    controller
        .admin()
        .resume_schedule(v1::ResumeScheduleRequest {
            id: "shop-db-verify".into(),
        })
        .await
        .unwrap();
    let sunday = verify.next_runs_unix_ms[0];
    let fired = scheduler.tick(sunday).await.unwrap();
    let v = only(&fired, "shop-db-verify");
    assert_eq!(v.len(), 1, "{fired:?}");
    assert_eq!(v[0].result, "started", "{fired:?}");
    // (The nightly backup may be due at the same tick: its command can come first.)
    let mut command = agent.next_command().await;
    if command.kind != "verify" {
        command = agent.next_command().await;
    }
    assert_eq!(command.kind, "verify");
    assert_eq!(command.job_id, v[0].job_id);
    let s = schedule(&controller, "shop-db-verify").await;
    assert_eq!(s.last_run_job_id, v[0].job_id);
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_restart_and_a_one_off_deploy() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let config = fast_controller_config(&tmp.path().join("ctl"));
    let controller = TestController::start(config.clone()).await;
    let bundle = ScriptedAgent::enroll(&controller, HOST, &[], &tmp.path().join(HOST)).await;
    let mut admin = controller.admin();
    controller.apply_example_app().await;
    // Out of the way: the defaults would fire too in this test's far-apart ticks.
    let reply = controller
        .apply_target(&format!(
            "{}[schedule]\nbackup = \"off\"\nverify = \"off\"\n",
            container_target("api-db")
        ))
        .await;
    // (The app spec declared api-db already, with the default schedules.)
    assert_eq!(
        reply.schedule_changes,
        [
            "removed api-db-backup (turned off)",
            "removed api-db-verify (turned off)"
        ],
        "{reply:?}"
    );
    // Declared by the app: removing the target alone is refused (the app would bring it back).
    let err = admin
        .remove_backup_target(v1::RemoveBackupTargetRequest {
            name: "api-db".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("declared by app api"),
        "{}",
        err.message()
    );
    let err = admin
        .remove_schedule(v1::RemoveScheduleRequest {
            id: "api-db-backup".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Refusals name what is wrong.
    let add = |cron: &str, tz: &str, target: &str| v1::AddScheduleRequest {
        kind: "backup".into(),
        target: target.into(),
        cron: cron.into(),
        tz: tz.into(),
        ..Default::default()
    };
    let err = admin
        .add_schedule(add("0 25 * * *", "", "api-db"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("0 25 * * *"), "{}", err.message());
    let err = admin
        .add_schedule(add("0 2 * * *", "Mars/Base", "api-db"))
        .await
        .unwrap_err();
    assert!(err.message().contains("Mars/Base"), "{}", err.message());
    let err = admin
        .add_schedule(add("0 2 * * *", "", "nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A custom backup schedule in a zone: every day at half past an hour in Berlin that is
    // 11 to 13 hours away (Berlin is UTC+1 or +2), so the one-off deploy 30 minutes from now
    // below always comes first, whenever the test runs.
    let utc_hour = drover_controller::server::now_ms() / 3_600_000 % 24;
    let nightly = format!("30 {} * * *", (utc_hour + 13) % 24);
    let s = admin
        .add_schedule(v1::AddScheduleRequest {
            id: "api-db-nightly".into(),
            ..add(&nightly, "Europe/Berlin", "api-db")
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.next_runs_unix_ms[0];
    let err = admin
        .add_schedule(v1::AddScheduleRequest {
            id: "api-db-nightly".into(),
            ..add(&nightly, "", "api-db")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // A one-off deploy in 30 minutes: stored, not started.
    let at = drover_controller::server::now_ms() + 30 * 60 * 1000;
    let reply = admin
        .deploy(v1::DeployRequest {
            app: "api".into(),
            version: "v1.4.2".into(),
            at_unix_ms: at,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.id.is_empty());
    let once = reply.scheduled.expect("the one-off schedule");
    assert_eq!(once.id, "api-deploy-v1.4.2");
    assert_eq!(once.next_runs_unix_ms, vec![at]);

    // Restart on the same data dir: the schedules are still there.
    controller.stop().await;
    let controller = TestController::start(config).await;
    let mut admin = controller.admin();
    let ids: Vec<String> = schedules(&controller)
        .await
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, ["api-db-nightly", "api-deploy-v1.4.2"]);
    let mut agent = ScriptedAgent::connect(&controller.addr.to_string(), &bundle, HOST).await;
    let scheduler = Scheduler::new(controller.shared.clone());

    // The deploy fires once, at its time.
    assert!(scheduler.tick(at - 1).await.unwrap().is_empty());
    let fired = scheduler.tick(at).await.unwrap();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].schedule, "api-deploy-v1.4.2");
    let cmd = agent.next_command().await;
    assert_eq!(cmd.job_id, fired[0].job_id);
    match &cmd.job {
        Some(v1::command::Job::Deploy(d)) => assert_eq!(d.version, "v1.4.2"),
        other => panic!("expected a deploy, got {other:?}"),
    }
    agent.finish_job(&fired[0].job_id, "succeeded").await;
    assert!(scheduler.tick(at + 1000).await.unwrap().is_empty());
    let once = schedule(&controller, "api-deploy-v1.4.2").await;
    assert!(once.next_runs_unix_ms.is_empty());

    // Paused: not due at its time; resumed: one run for what it missed.
    admin
        .pause_schedule(v1::PauseScheduleRequest {
            id: "api-db-nightly".into(),
        })
        .await
        .unwrap();
    assert!(schedule(&controller, "api-db-nightly").await.paused);
    assert!(scheduler.tick(first + 2 * DAY).await.unwrap().is_empty());
    agent.assert_no_command().await;
    admin
        .resume_schedule(v1::ResumeScheduleRequest {
            id: "api-db-nightly".into(),
        })
        .await
        .unwrap();
    let fired = scheduler.tick(first + 2 * DAY).await.unwrap();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(
        (fired[0].schedule.as_str(), fired[0].covers),
        ("api-db-nightly", 3)
    );
    assert_eq!(agent.next_command().await.job_id, fired[0].job_id);
    controller.stop().await;
}

fn listed(controller: &TestController) -> Vec<Value> {
    controller
        .cli_json(&["schedule", "list", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

fn listed_one(controller: &TestController, id: &str) -> Option<Value> {
    listed(controller).into_iter().find(|s| s["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targets_schedule_table_is_kept_in_step_through_the_cli() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let config = fast_controller_config(&tmp.path().join("ctl"));
    let controller = TestController::start(config.clone()).await;
    let file = tmp.path().join("shop-db.toml");
    let write = |schedule: &str| {
        std::fs::write(&file, format!("{}{schedule}", container_target("shop-db"))).unwrap();
    };
    let apply = |controller: &TestController| {
        controller.cli_json(&["backup-target", "apply", file.to_str().unwrap(), "--json"])
    };

    // Overridden backup in a zone, validation turned off.
    write(
        "[schedule]\nbackup = \"30 1 * * *\"\ntimezone = \"Europe/Berlin\"\njitter = \"0s\"\nverify = \"off\"\n",
    );
    let reply = apply(&controller);
    assert_eq!(
        reply["schedule_changes"],
        serde_json::json!(["added shop-db-backup (\"30 1 * * *\" Europe/Berlin)"])
    );
    let backup = listed_one(&controller, "shop-db-backup").expect("the backup schedule");
    assert_eq!(backup["cron"], "30 1 * * *");
    assert_eq!(backup["tz"], "Europe/Berlin");
    assert_eq!(backup["jitter_secs"], 0);
    assert_eq!(backup["kept_by_target"], true);
    assert_eq!(backup["next_runs"].as_array().unwrap().len(), 3);
    assert!(listed_one(&controller, "shop-db-verify").is_none());
    let (code, table, _) = controller.cli(&["schedule", "list"]);
    assert_eq!(code, 0);
    assert!(table.contains("[target's schedule]"), "{table}");

    // Kept by the target: not removed by `schedule rm`, nor shadowed by `schedule add`.
    let (code, _, err) = controller.cli(&["schedule", "rm", "shop-db-backup"]);
    assert_ne!(code, 0);
    assert!(err.contains("[schedule]") && err.contains("off"), "{err}");
    let (code, _, err) = controller.cli(&[
        "schedule",
        "add",
        "backup",
        "shop-db",
        "--cron",
        "0 5 * * *",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("kept by backup target shop-db"), "{err}");
    let extra = controller.cli_json(&[
        "schedule",
        "add",
        "backup",
        "shop-db",
        "--cron",
        "0 5 * * *",
        "--id",
        "shop-db-extra",
        "--json",
    ]);
    assert_eq!(extra["kept_by_target"], false);
    let (code, _, err) = controller.cli(&["schedule", "rm", "shop-db-extra"]);
    assert_eq!(code, 0, "{err}");

    // Paused by the operator, then the table changes: the pause and history stay.
    let (code, _, err) = controller.cli(&["schedule", "pause", "shop-db-backup"]);
    assert_eq!(code, 0, "{err}");
    write("[schedule]\nbackup = \"0 4 * * *\"\n");
    let reply = apply(&controller);
    assert_eq!(
        reply["schedule_changes"],
        serde_json::json!([
            "updated shop-db-backup (\"0 4 * * *\" UTC, jitter 900s)",
            "added shop-db-verify (\"0 6 * * 0\" UTC)"
        ])
    );
    let backup = listed_one(&controller, "shop-db-backup").unwrap();
    assert_eq!(
        (backup["cron"].as_str(), backup["paused"].as_bool()),
        (Some("0 4 * * *"), Some(true))
    );
    assert_eq!(backup["tz"], "UTC");

    // A bad expression is refused before anything is stored, naming the key.
    write("[schedule]\nbackup = \"0 4 * *\"\n");
    let (code, _, err) = controller.cli(&["backup-target", "apply", file.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("schedule.backup") && err.contains("0 4 * *"),
        "{err}"
    );
    assert_eq!(
        listed_one(&controller, "shop-db-backup").unwrap()["cron"],
        "0 4 * * *"
    );

    // A store from before `[schedule]`: the defaults as an older controller made them (no
    // mark) and a missing verify schedule. At start the backup one is adopted, history kept,
    // and the verify one is added. Target crm-db had its default backup replaced by the
    // operator's own (`crm-db-nightly`): no default is added next to it, only the verify one.
    controller.apply_target(&container_target("crm-db")).await;
    controller.stop().await;
    {
        let store = Store::open(&config.data_dir.join("store")).unwrap();
        store.remove_schedule("shop-db-verify").unwrap();
        let old = ScheduleRecord {
            id: "shop-db-backup".into(),
            kind: Some(ScheduleKind::Backup),
            target: "shop-db".into(),
            cron: "0 2 * * *".into(),
            jitter_secs: 900,
            created_by: "admin".into(),
            created_unix_ms: 1_000,
            last_fire_unix_ms: 2_000,
            last_result: "succeeded".into(),
            ..ScheduleRecord::default()
        };
        store.remove_schedule("shop-db-backup").unwrap();
        assert!(store.add_schedule(&old).unwrap());
        for id in ["crm-db-backup", "crm-db-verify"] {
            store.remove_schedule(id).unwrap();
        }
        let nightly = ScheduleRecord {
            id: "crm-db-nightly".into(),
            kind: Some(ScheduleKind::Backup),
            target: "crm-db".into(),
            cron: "0 3 * * *".into(),
            created_by: "admin".into(),
            created_unix_ms: 1_000,
            ..ScheduleRecord::default()
        };
        assert!(store.add_schedule(&nightly).unwrap());
        store.flush().await.unwrap();
    }
    let controller = TestController::start(config).await;
    let backup = listed_one(&controller, "shop-db-backup").unwrap();
    assert_eq!(backup["cron"], "0 4 * * *");
    assert_eq!(backup["kept_by_target"], true);
    assert_eq!(backup["last_result"], "succeeded");
    assert_eq!(backup["last_fire"], "1970-01-01T00:00:02Z");
    let verify = listed_one(&controller, "shop-db-verify").expect("verify schedule filled in");
    assert_eq!(verify["kept_by_target"], true);
    assert!(listed_one(&controller, "crm-db-backup").is_none());
    assert_eq!(
        listed_one(&controller, "crm-db-nightly").unwrap()["kept_by_target"],
        false
    );
    assert_eq!(
        listed_one(&controller, "crm-db-verify").unwrap()["kept_by_target"],
        true
    );
    controller.stop().await;
}

/// The scheduler, alert and admin-bundle tasks run on their own clocks and are joined before
/// the final flush on shutdown: once `serve` returns, nothing holds the controller's state
/// (a task left running could still write to the store after its last flush).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_tasks_are_joined_before_the_controller_returns() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let config = drover_controller::config::ControllerConfig {
        scheduler_tick: std::time::Duration::from_millis(20),
        alerts_every: std::time::Duration::from_millis(20),
        ..fast_controller_config(&tmp.path().join("ctl"))
    };
    let controller = TestController::start(config).await;
    controller.apply_example_app().await;
    let shared = controller.shared.clone();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    controller.stop().await;
    assert_eq!(
        std::sync::Arc::strong_count(&shared),
        1,
        "a task still holds the controller's state after serve returned"
    );
}
