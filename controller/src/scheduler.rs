//! The scheduler task: every tick it reads the stored schedules, asks the pure rules in
//! `schedule` which are due, and starts their jobs through the same code the operator RPCs
//! use (`OperatorApi::backup_job`, `OperatorApi::deploy_job`). Time comes in as an argument:
//! production ticks with the wall clock every second, tests call [`Scheduler::tick`] with the
//! times they choose.
//!
//! A fire is recorded (time, job id, flushed) before its job is started, so a crash between
//! the two loses that one run instead of starting it twice; the run is then seen as finished
//! (its job does not exist) and the schedule waits for its next fire time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::jobs::{JobKind, job_id};
use crate::operator::OperatorApi;
use crate::schedule::{self, Schedule, ScheduleError};
use crate::server::Shared;
use crate::store::{ScheduleKind, ScheduleRecord, StoreError};
use drover_proto::v1;

/// The default nightly backup of a newly applied target: 02:00 UTC, spread over 15 minutes.
pub const DEFAULT_BACKUP_CRON: &str = "0 2 * * *";
pub const DEFAULT_BACKUP_JITTER: Duration = Duration::from_secs(15 * 60);
/// The default weekly validation: Sundays 06:00 UTC.
pub const DEFAULT_VERIFY_CRON: &str = "0 6 * * 0";

/// The pure rules' view of a stored schedule; an error if its cron, zone or jitter is bad.
pub fn schedule_of(record: &ScheduleRecord) -> Result<Schedule, ScheduleError> {
    if record.cron.is_empty() {
        Ok(Schedule::once(
            &record.id,
            record.at_unix_ms,
            record.paused,
            record.created_unix_ms,
        ))
    } else {
        Schedule::cron(
            &record.id,
            &record.cron,
            &record.tz,
            Duration::from_secs(record.jitter_secs),
            record.paused,
            record.created_unix_ms,
        )
    }
}

/// The two default schedules of a backup target applied for the first time:
/// `<target>-backup` (nightly) and `<target>-verify` (weekly).
pub fn default_schedules(target: &str, by: &str, now_ms: i64) -> [ScheduleRecord; 2] {
    let base = ScheduleRecord {
        target: target.to_string(),
        created_by: by.to_string(),
        created_unix_ms: now_ms,
        ..ScheduleRecord::default()
    };
    [
        ScheduleRecord {
            id: format!("{target}-backup"),
            kind: Some(ScheduleKind::Backup),
            cron: DEFAULT_BACKUP_CRON.into(),
            jitter_secs: DEFAULT_BACKUP_JITTER.as_secs(),
            ..base.clone()
        },
        ScheduleRecord {
            id: format!("{target}-verify"),
            kind: Some(ScheduleKind::Verify),
            cron: DEFAULT_VERIFY_CRON.into(),
            ..base
        },
    ]
}

/// Stores the default schedules of `target` that do not exist yet (not flushed). Returns the
/// ids created.
pub fn add_default_schedules(
    shared: &Shared,
    target: &str,
    by: &str,
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let mut created = Vec::new();
    for record in default_schedules(target, by, now_ms) {
        if shared.store.add_schedule(&record)? {
            created.push(record.id);
        }
    }
    Ok(created)
}

/// What one tick did with one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    pub schedule: String,
    /// The job started, or empty when it could not start.
    pub job_id: String,
    /// `started`, or `failed: …`.
    pub result: String,
    pub covers: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Fires due schedules. Cheap to clone; clones share one lock, so two ticks never race.
#[derive(Debug, Clone)]
pub struct Scheduler {
    api: OperatorApi,
    lock: Arc<Mutex<()>>,
}

impl Scheduler {
    pub fn new(shared: Arc<Shared>) -> Scheduler {
        let lock = shared.scheduler_lock.clone();
        Scheduler {
            api: OperatorApi { shared },
            lock,
        }
    }

    /// One pass at `now_ms`: starts every due schedule's run, and records the final state of
    /// runs that finished. Returns what fired.
    pub async fn tick(&self, now_ms: i64) -> Result<Vec<Fired>, SchedulerError> {
        let _one_at_a_time = self.lock.lock().await;
        let store = &self.api.shared.store;
        let mut fired = Vec::new();
        for record in store.schedules()? {
            let schedule = match schedule_of(&record) {
                Ok(s) => s,
                Err(e) => {
                    warn!(schedule = %record.id, error = %e, "schedule skipped");
                    continue;
                }
            };
            let job = if record.last_run_job_id.is_empty() {
                None
            } else {
                store.job(&record.last_run_job_id)?
            };
            let running = job.as_ref().is_some_and(|j| !j.state().is_finished());
            if let Some(j) = &job
                && !running
                && record.last_result != j.state().as_str()
            {
                let state = j.state().as_str();
                store.update_schedule(&record.id, |r| r.last_result = state.to_string())?;
            }
            let last = (record.last_fire_unix_ms > 0).then_some(record.last_fire_unix_ms);
            let Some(run) = schedule::due(&schedule, last, now_ms, running) else {
                continue;
            };
            fired.push(self.fire(&record, run, now_ms).await?);
        }
        store.flush().await?;
        Ok(fired)
    }

    async fn fire(
        &self,
        record: &ScheduleRecord,
        run: schedule::DueRun,
        now_ms: i64,
    ) -> Result<Fired, SchedulerError> {
        let store = &self.api.shared.store;
        let kind = record.kind.unwrap_or(ScheduleKind::Backup);
        let id = match kind {
            ScheduleKind::Backup => job_id(JobKind::Backup, now_ms, rand::random()),
            ScheduleKind::Deploy => job_id(JobKind::Deploy, now_ms, rand::random()),
            ScheduleKind::Verify => job_id(JobKind::Verify, now_ms, rand::random()),
        };
        // Recorded and durable before anything starts: a crash now cannot fire it twice.
        store.update_schedule(&record.id, |r| {
            r.last_fire_unix_ms = now_ms;
            r.last_run_job_id = id.clone();
            r.last_result = "started".into();
            r.runs_missed = run.covers.saturating_sub(1);
        })?;
        store.flush().await?;
        let by = format!("schedule:{}", record.id);
        let host = record.hosts.first().cloned().unwrap_or_default();
        let started = match kind {
            ScheduleKind::Backup => {
                self.api
                    .backup_job(&record.target, &host, "scheduled", &by, Some(id.clone()))
                    .await
            }
            ScheduleKind::Deploy => {
                let req = v1::DeployRequest {
                    app: record.target.clone(),
                    version: record.version.clone(),
                    hosts: record.hosts.clone(),
                    ..Default::default()
                };
                self.api.deploy_job(req, &by, Some(id.clone())).await
            }
            ScheduleKind::Verify => {
                self.api
                    .verify_job(&record.target, &host, &by, Some(id.clone()))
                    .await
            }
        };
        let (job_id, result) = match started {
            Ok(job) => {
                info!(schedule = %record.id, job = %job.id, covers = run.covers, scheduled_unix_ms = run.scheduled_unix_ms, "schedule fired");
                (job.id, "started".to_string())
            }
            Err(status) => {
                let result = format!("failed: {}", status.message());
                warn!(schedule = %record.id, error = %status.message(), "scheduled run could not start");
                store.update_schedule(&record.id, |r| {
                    r.last_run_job_id = String::new();
                    r.last_result = result.clone();
                })?;
                store.flush().await?;
                (String::new(), result)
            }
        };
        Ok(Fired {
            schedule: record.id.clone(),
            job_id,
            result,
            covers: run.covers,
        })
    }

    /// Ticks every `every` with `clock()` until `shutdown` fires.
    pub async fn run(
        self,
        clock: impl Fn() -> i64 + Send + 'static,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            if let Err(e) = self.tick(clock()).await {
                warn!(error = %e, "scheduler tick failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedules_are_valid() {
        let [backup, verify] = default_schedules("shop-db", "admin", 1_000);
        assert_eq!(backup.id, "shop-db-backup");
        assert_eq!(verify.id, "shop-db-verify");
        assert_eq!(backup.kind, Some(ScheduleKind::Backup));
        assert_eq!(verify.kind, Some(ScheduleKind::Verify));
        assert_eq!(backup.jitter_secs, 900);
        assert_eq!(verify.jitter_secs, 0);
        for r in [&backup, &verify] {
            assert!(schedule_of(r).is_ok(), "{r:?}");
            assert_eq!(r.tz, "");
        }
    }
}
