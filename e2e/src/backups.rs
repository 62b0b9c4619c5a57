//! A controller and one real agent (`db-1`) for backup, restore, validation and alert tests,
//! with helpers that start a job through the operator API, wait for its `job.finished` event
//! and for the agent's outbox to drain (so catalogs and validation history have reached the
//! controller).

use std::time::Duration;

use drover_controller::store::EventRecord;
use drover_model::jobevent::field;
use drover_proto::v1;

use crate::{TestAgent, TestController, eventually, fast_controller_config, init};

/// How long one backup, restore or validation job may take in a test.
pub const JOB_PATIENCE: Duration = Duration::from_secs(240);

pub struct BackupFixture {
    pub controller: TestController,
    /// `None` only while a test has taken it to restart it.
    pub agent: Option<TestAgent>,
    pub dir: tempfile::TempDir,
}

/// A controller with test timings and agent `db-1`, connected.
pub async fn backup_fixture() -> BackupFixture {
    init();
    let dir = tempfile::tempdir().unwrap();
    let controller = TestController::start(fast_controller_config(&dir.path().join("c"))).await;
    let addr = controller.addr.to_string();
    let mut agent =
        TestAgent::enroll_and_start(&controller, "db-1", &dir.path().join("a"), &addr).await;
    agent.wait_connected().await;
    BackupFixture {
        controller,
        agent: Some(agent),
        dir,
    }
}

/// A PostgreSQL target `name` dumped through the Docker exec API of container `name`,
/// database `app` (for tests of the controller's side: nothing runs it).
pub fn container_target(name: &str) -> String {
    format!("name = \"{name}\"\n[postgres]\ncontainer = \"{name}\"\ndatabases = [\"app\"]\n")
}

/// A field of an event ("" when absent).
pub fn event_field<'a>(e: &'a EventRecord, key: &str) -> &'a str {
    e.fields.get(key).map(String::as_str).unwrap_or("")
}

/// Asserts a job's `job.finished` event says it succeeded.
pub fn assert_job_succeeded(e: &EventRecord) {
    assert_eq!(event_field(e, field::RESULT), "succeeded", "{e:#?}");
}

/// Asserts a job failed at `step` with an error that contains `wanted`.
pub fn assert_job_failed_at(e: &EventRecord, step: &str, wanted: &str) {
    assert_eq!(event_field(e, field::RESULT), "failed", "{e:#?}");
    assert_eq!(event_field(e, field::STEP), step, "{e:#?}");
    assert!(
        event_field(e, field::ERROR).contains(wanted),
        "{e:#?}\nwanted {wanted}"
    );
}

impl BackupFixture {
    pub fn agent(&self) -> &TestAgent {
        self.agent.as_ref().expect("the agent is running")
    }

    pub async fn apply(&self, toml: &str) {
        self.controller.apply_target(toml).await;
    }

    /// Waits for job `id` and returns its `job.finished` event, once the agent's outbox has
    /// drained.
    pub async fn finish(&self, id: &str) -> EventRecord {
        let done = self
            .controller
            .wait_job(&self.agent().host, id, JOB_PATIENCE)
            .await;
        self.drained().await;
        done
    }

    /// Runs a backup of `target` to its end (whatever the result).
    pub async fn backup(&self, target: &str) -> EventRecord {
        let job = self
            .controller
            .admin()
            .run_backup(v1::RunBackupRequest {
                target: target.into(),
                host: String::new(),
            })
            .await
            .expect("run backup")
            .into_inner();
        self.finish(&job.id).await
    }

    pub async fn restore(&self, req: v1::RestoreRequest) -> EventRecord {
        let job = self
            .controller
            .admin()
            .restore(req)
            .await
            .expect("restore")
            .into_inner();
        self.finish(&job.id).await
    }

    /// Validates `target`'s newest backup to the end (whatever the result).
    pub async fn verify(&self, target: &str) -> EventRecord {
        let job = self.controller.start_verify(target).await;
        self.finish(&job).await
    }

    /// Waits until the controller has acknowledged everything the agent recorded (the
    /// catalog and the validation follow `job.finished` in the outbox).
    pub async fn drained(&self) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        eventually(
            "the agent's outbox drained",
            Duration::from_secs(30),
            || async { (self.agent().outbox.pending() == 0).then_some(()) },
        )
        .await;
    }

    /// `target`'s backups as the controller lists them, newest first.
    pub async fn backups(&self, target: &str) -> Vec<v1::BackupInfo> {
        self.drained().await;
        self.controller
            .admin()
            .list_backups(v1::ListBackupsRequest {
                target: target.into(),
            })
            .await
            .expect("list backups")
            .into_inner()
            .backups
    }

    pub async fn newest(&self, target: &str) -> v1::BackupInfo {
        self.backups(target)
            .await
            .into_iter()
            .next()
            .expect("a backup")
    }

    /// `target`'s validation history, newest first.
    pub async fn history(&self, target: &str) -> Vec<v1::VerificationInfo> {
        self.controller
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

    pub async fn stop(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop().await;
        }
        self.controller.stop().await;
    }
}
