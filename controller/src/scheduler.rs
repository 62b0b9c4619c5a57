//! The scheduler task: every tick it reads the stored schedules, asks the pure rules in
//! `schedule` which are due, and starts their jobs through the same code the operator RPCs
//! use (`launch::Launcher`). Time comes in as an argument:
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

use drover_model::backup::target::TargetSpec;

use crate::jobs::{JobKind, job_id};
use crate::launch::{DeployArgs, Hosts, Launcher};
use crate::release::driver::{Releases, StartArgs, release_id};
use crate::shared::Shared;
use crate::store::{ScheduleKind, ScheduleRecord, StoreError};
use drover_model::schedule::{self, Schedule, ScheduleError};

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

/// The id of the `kind` schedule a target's `[schedule]` keeps: `<target>-backup`,
/// `<target>-verify`.
pub fn target_schedule_id(target: &str, kind: ScheduleKind) -> String {
    format!("{target}-{}", kind.as_str())
}

/// Per kind, the schedule a target wants (`None`: turned off).
pub type Wanted = Vec<(ScheduleKind, Option<ScheduleRecord>)>;

/// The schedules a target's `[schedule]` asks for, with the defaults for keys left out:
/// `(kind, None)` where it says `"off"`. Pure; an error names the bad key.
pub fn target_schedules(
    spec: &TargetSpec,
    by: &str,
    now_ms: i64,
) -> Result<Wanted, (&'static str, ScheduleError)> {
    let wanted = &spec.schedule;
    let tz = wanted.timezone.clone().unwrap_or_default();
    schedule::parse_tz(&tz).map_err(|e| ("schedule.timezone", e))?;
    let mut out = Vec::new();
    for (kind, key, expr, default, jitter) in [
        (
            ScheduleKind::Backup,
            "schedule.backup",
            &wanted.backup,
            DEFAULT_BACKUP_CRON,
            wanted.jitter().unwrap_or(DEFAULT_BACKUP_JITTER),
        ),
        (
            ScheduleKind::Verify,
            "schedule.verify",
            &wanted.verify,
            DEFAULT_VERIFY_CRON,
            Duration::ZERO,
        ),
    ] {
        let cron = expr.as_deref().map(str::trim).unwrap_or(default);
        if cron == "off" {
            out.push((kind, None));
            continue;
        }
        let record = ScheduleRecord {
            id: target_schedule_id(&spec.name, kind),
            kind: Some(kind),
            target: spec.name.clone(),
            cron: cron.to_string(),
            tz: tz.clone(),
            jitter_secs: jitter.as_secs(),
            created_by: by.to_string(),
            created_unix_ms: now_ms,
            managed: true,
            ..ScheduleRecord::default()
        };
        schedule_of(&record).map_err(|e| (key, e))?;
        out.push((kind, Some(record)));
    }
    Ok(out)
}

/// Whether a stored schedule is the one a target's `[schedule]` keeps: marked so, or made
/// before the mark existed with exactly the old defaults.
fn kept_by_target(existing: &ScheduleRecord, target: &str, kind: ScheduleKind) -> bool {
    existing.target == target
        && existing.kind == Some(kind)
        && (existing.managed
            || (existing.tz.is_empty()
                && existing.at_unix_ms == 0
                && match kind {
                    ScheduleKind::Backup => {
                        existing.cron == DEFAULT_BACKUP_CRON
                            && existing.jitter_secs == DEFAULT_BACKUP_JITTER.as_secs()
                    }
                    ScheduleKind::Verify => {
                        existing.cron == DEFAULT_VERIFY_CRON && existing.jitter_secs == 0
                    }
                    ScheduleKind::Deploy | ScheduleKind::Release => false,
                }))
}

/// What syncing one kept schedule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncAction {
    Nothing,
    Add(ScheduleRecord),
    /// New cron, zone or jitter; pause state and history are kept.
    Update(ScheduleRecord),
    Remove(String),
    /// A schedule with that id exists but the operator made it: left alone.
    LeaveOperators(String),
}

/// The pure decision for one kind: the stored record (if any) against the wanted one.
/// `default_covered`: the wanted one is only the default (the table does not name this kind)
/// and an operator's schedule of this kind for the target exists under another id; then no
/// default is added next to it.
pub fn sync_action(
    existing: Option<&ScheduleRecord>,
    target: &str,
    kind: ScheduleKind,
    wanted: Option<&ScheduleRecord>,
    default_covered: bool,
    now_ms: i64,
) -> SyncAction {
    match (existing, wanted) {
        (None, None) => SyncAction::Nothing,
        (None, Some(_)) if default_covered => SyncAction::Nothing,
        (None, Some(w)) => SyncAction::Add(w.clone()),
        (Some(e), _) if !kept_by_target(e, target, kind) => {
            SyncAction::LeaveOperators(e.id.clone())
        }
        (Some(e), None) => SyncAction::Remove(e.id.clone()),
        (Some(e), Some(w)) => {
            if e.managed && e.cron == w.cron && e.tz == w.tz && e.jitter_secs == w.jitter_secs {
                return SyncAction::Nothing;
            }
            let mut updated = e.clone();
            updated.managed = true;
            if (e.cron.as_str(), e.tz.as_str(), e.jitter_secs)
                != (w.cron.as_str(), w.tz.as_str(), w.jitter_secs)
            {
                updated.cron = w.cron.clone();
                updated.tz = w.tz.clone();
                updated.jitter_secs = w.jitter_secs;
                // Fire times of the new expression before now are not caught up on.
                updated.created_unix_ms = now_ms;
            }
            SyncAction::Update(updated)
        }
    }
}

/// Makes the stored schedules of `spec`'s target match its `[schedule]` (not flushed).
/// Returns a line per change, for the log and the operator.
pub fn sync_target_schedules(
    shared: &Shared,
    spec: &TargetSpec,
    by: &str,
    now_ms: i64,
) -> Result<Vec<String>, SyncError> {
    let wanted = target_schedules(spec, by, now_ms).map_err(|(key, error)| SyncError::Spec {
        target: spec.name.clone(),
        key,
        error,
    })?;
    let store = &shared.store;
    let all = store.schedules()?;
    let mut changes = Vec::new();
    for (kind, wanted) in wanted {
        let id = target_schedule_id(&spec.name, kind);
        let existing = all.iter().find(|s| s.id == id);
        let named = match kind {
            ScheduleKind::Backup => spec.schedule.backup.is_some(),
            _ => spec.schedule.verify.is_some(),
        };
        let default_covered = !named
            && all
                .iter()
                .any(|s| s.id != id && s.target == spec.name && s.kind == Some(kind));
        match sync_action(
            existing,
            &spec.name,
            kind,
            wanted.as_ref(),
            default_covered,
            now_ms,
        ) {
            SyncAction::Nothing => {}
            SyncAction::Add(record) => {
                if store.add_schedule(&record)? {
                    changes.push(format!("added {id} ({})", describe(&record)));
                }
            }
            SyncAction::Update(record) => {
                store.update_schedule(&id, |r| *r = record.clone())?;
                changes.push(format!("updated {id} ({})", describe(&record)));
            }
            SyncAction::Remove(id) => {
                store.remove_schedule(&id)?;
                changes.push(format!("removed {id} (turned off)"));
            }
            SyncAction::LeaveOperators(id) => {
                warn!(schedule = %id, target = %spec.name, "a schedule the operator added has the id the target's [schedule] would use; left as it is");
            }
        }
    }
    Ok(changes)
}

/// Syncs every stored target's schedules (at controller start: targets applied before
/// `[schedule]` existed get theirs). A target that cannot be read is logged and skipped.
pub fn sync_all_targets(shared: &Shared, now_ms: i64) -> Result<Vec<String>, StoreError> {
    let mut changes = Vec::new();
    for t in shared.store.backup_targets()? {
        let spec = match TargetSpec::from_toml(&t.spec_toml, &t.name) {
            Ok(spec) => spec,
            Err(e) => {
                warn!(target = %t.name, error = %e, "stored backup target unreadable; its schedules are left as they are");
                continue;
            }
        };
        match sync_target_schedules(shared, &spec, &t.updated_by, now_ms) {
            Ok(mut c) => changes.append(&mut c),
            Err(SyncError::Store(e)) => return Err(e),
            Err(e) => warn!(target = %t.name, error = %e, "schedules of the target not synced"),
        }
    }
    Ok(changes)
}

fn describe(record: &ScheduleRecord) -> String {
    let tz = if record.tz.is_empty() {
        "UTC"
    } else {
        &record.tz
    };
    if record.jitter_secs > 0 {
        format!("\"{}\" {tz}, jitter {}s", record.cron, record.jitter_secs)
    } else {
        format!("\"{}\" {tz}", record.cron)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("backup target {target}: `{key}`: {error}")]
    Spec {
        target: String,
        key: &'static str,
        error: ScheduleError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
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
    shared: Arc<Shared>,
    launcher: Launcher,
    lock: Arc<Mutex<()>>,
}

impl Scheduler {
    pub fn new(shared: Arc<Shared>) -> Scheduler {
        let lock = shared.scheduler_lock.clone();
        Scheduler {
            launcher: Launcher::new(shared.clone()),
            shared,
            lock,
        }
    }

    /// One pass at `now_ms`: starts every due schedule's run, and records the final state of
    /// runs that finished. Returns what fired.
    pub async fn tick(&self, now_ms: i64) -> Result<Vec<Fired>, SchedulerError> {
        let _one_at_a_time = self.lock.lock().await;
        let store = &self.shared.store;
        let mut fired = Vec::new();
        for record in store.schedules()? {
            let schedule = match schedule_of(&record) {
                Ok(s) => s,
                Err(e) => {
                    warn!(schedule = %record.id, error = %e, "schedule skipped");
                    continue;
                }
            };
            let last_run = self.last_run(&record)?;
            let running = last_run.is_some_and(|(finished, _)| !finished);
            if let Some((true, state)) = last_run
                && record.last_result != state
            {
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

    /// The state of a schedule's last run, if it exists: (finished, state). A release
    /// schedule's run is the release it started, the others' a job.
    fn last_run(
        &self,
        record: &ScheduleRecord,
    ) -> Result<Option<(bool, &'static str)>, StoreError> {
        let store = &self.shared.store;
        let id = &record.last_run_job_id;
        if id.is_empty() {
            return Ok(None);
        }
        Ok(match record.kind {
            Some(ScheduleKind::Release) => store.fleet_release(id)?.map(|r| {
                let phase = r.release.phase;
                (phase.is_finished(), phase.as_str())
            }),
            _ => store.job(id)?.map(|j| {
                let state = j.state();
                (state.is_finished(), state.as_str())
            }),
        })
    }

    async fn fire(
        &self,
        record: &ScheduleRecord,
        run: schedule::DueRun,
        now_ms: i64,
    ) -> Result<Fired, SchedulerError> {
        let store = &self.shared.store;
        let kind = record.kind.unwrap_or(ScheduleKind::Backup);
        let id = match kind {
            ScheduleKind::Backup => job_id(JobKind::Backup, now_ms, rand::random()),
            ScheduleKind::Deploy => job_id(JobKind::Deploy, now_ms, rand::random()),
            ScheduleKind::Verify => job_id(JobKind::Verify, now_ms, rand::random()),
            ScheduleKind::Release => release_id(now_ms),
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
            ScheduleKind::Backup => self
                .launcher
                .backup(&record.target, &host, "scheduled", &by, Some(id.clone()))
                .await
                .map(|job| job.id),
            ScheduleKind::Deploy => {
                let args = DeployArgs {
                    app: record.target.clone(),
                    version: record.version.clone(),
                    hosts: Hosts {
                        names: record.hosts.clone(),
                        labels: Default::default(),
                    },
                    ..Default::default()
                };
                self.launcher
                    .deploy(args, &by, Some(id.clone()))
                    .await
                    .map(|job| job.id)
            }
            ScheduleKind::Verify => self
                .launcher
                .verify(&record.target, &host, &by, Some(id.clone()))
                .await
                .map(|job| job.id),
            ScheduleKind::Release => {
                let asked = record.release.clone().unwrap_or_default();
                let args = StartArgs {
                    app: record.target.clone(),
                    version: record.version.clone(),
                    hosts: Hosts {
                        names: record.hosts.clone(),
                        labels: asked.labels,
                    },
                    options: asked.options,
                    skip_backup: asked.skip_backup,
                    dry_run: false,
                    id: Some(id.clone()),
                };
                Releases::new(self.shared.clone())
                    .start(args, &by)
                    .await
                    .map(|release| release.id().to_string())
            }
        };
        let (job_id, result) = match started {
            Ok(job) => {
                info!(schedule = %record.id, job = %job, covers = run.covers, scheduled_unix_ms = run.scheduled_unix_ms, "schedule fired");
                (job, "started".to_string())
            }
            Err(err) => {
                let result = format!("failed: {err}");
                warn!(schedule = %record.id, error = %err, "scheduled run could not start");
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
        crate::shared::every(every, shutdown, || async {
            if let Err(e) = self.tick(clock()).await {
                warn!(error = %e, "scheduler tick failed");
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG: &str = "name = \"shop-db\"\n[postgres]\ncontainer = \"db\"\ndatabases = [\"shop\"]\n";

    fn spec(schedule: &str) -> TargetSpec {
        TargetSpec::from_toml(&format!("{PG}{schedule}"), "t.toml").unwrap()
    }

    fn wanted(schedule: &str) -> Wanted {
        target_schedules(&spec(schedule), "admin", 1_000).unwrap()
    }

    #[test]
    fn default_schedules_are_nightly_and_sundays_in_utc() {
        let got = wanted("");
        let (ScheduleKind::Backup, Some(backup)) = &got[0] else {
            panic!("{got:?}")
        };
        let (ScheduleKind::Verify, Some(verify)) = &got[1] else {
            panic!("{got:?}")
        };
        assert_eq!(backup.id, "shop-db-backup");
        assert_eq!(verify.id, "shop-db-verify");
        assert_eq!(
            (backup.cron.as_str(), backup.jitter_secs),
            ("0 2 * * *", 900)
        );
        assert_eq!((verify.cron.as_str(), verify.jitter_secs), ("0 6 * * 0", 0));
        for r in [backup, verify] {
            assert!(r.managed);
            assert_eq!(r.tz, "");
            assert!(schedule_of(r).is_ok(), "{r:?}");
        }
    }

    #[test]
    fn a_schedule_table_overrides_and_turns_off() {
        let got = wanted(
            "[schedule]\nbackup = \"30 1 * * *\"\nverify = \"off\"\ntimezone = \"Europe/Berlin\"\njitter = \"0s\"\n",
        );
        let (_, Some(backup)) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(backup.cron, "30 1 * * *");
        assert_eq!(backup.tz, "Europe/Berlin");
        assert_eq!(backup.jitter_secs, 0);
        assert_eq!(got[1], (ScheduleKind::Verify, None));
    }

    #[test]
    fn bad_expressions_and_zones_name_their_key() {
        for (table, key) in [
            ("[schedule]\nbackup = \"0 2 * *\"\n", "schedule.backup"),
            ("[schedule]\nverify = \"61 6 * * 0\"\n", "schedule.verify"),
            (
                "[schedule]\ntimezone = \"Mars/Olympus\"\n",
                "schedule.timezone",
            ),
        ] {
            let (got, _) = target_schedules(&spec(table), "admin", 0).unwrap_err();
            assert_eq!(got, key, "{table}");
        }
    }

    #[test]
    fn sync_decisions() {
        let backup = |cron: &str, managed: bool| ScheduleRecord {
            id: "shop-db-backup".into(),
            kind: Some(ScheduleKind::Backup),
            target: "shop-db".into(),
            cron: cron.into(),
            jitter_secs: 900,
            managed,
            paused: true,
            last_fire_unix_ms: 500,
            created_unix_ms: 100,
            ..ScheduleRecord::default()
        };
        let want = backup("0 2 * * *", true);
        let b = ScheduleKind::Backup;
        assert_eq!(
            sync_action(None, "shop-db", b, None, false, 9),
            SyncAction::Nothing
        );
        assert_eq!(
            sync_action(None, "shop-db", b, Some(&want), false, 9),
            SyncAction::Add(want.clone())
        );
        // Unchanged: nothing.
        assert_eq!(
            sync_action(Some(&want), "shop-db", b, Some(&want), false, 9),
            SyncAction::Nothing
        );
        // A record from before the mark with the old defaults is adopted, history kept.
        let SyncAction::Update(adopted) = sync_action(
            Some(&backup("0 2 * * *", false)),
            "shop-db",
            b,
            Some(&want),
            false,
            9,
        ) else {
            panic!()
        };
        assert!(adopted.managed && adopted.paused);
        assert_eq!(
            (adopted.created_unix_ms, adopted.last_fire_unix_ms),
            (100, 500)
        );
        // A new expression: kept pause and history, no catch-up on the past.
        let SyncAction::Update(changed) = sync_action(
            Some(&want),
            "shop-db",
            b,
            Some(&backup("0 4 * * *", true)),
            false,
            9,
        ) else {
            panic!()
        };
        assert_eq!(changed.cron, "0 4 * * *");
        assert!(changed.paused);
        assert_eq!(
            (changed.created_unix_ms, changed.last_fire_unix_ms),
            (9, 500)
        );
        // Turned off.
        assert_eq!(
            sync_action(Some(&want), "shop-db", b, None, false, 9),
            SyncAction::Remove("shop-db-backup".into())
        );
        // The operator's own schedule under that id is never touched.
        let operators = backup("15 3 * * *", false);
        for w in [None, Some(&want)] {
            assert_eq!(
                sync_action(Some(&operators), "shop-db", b, w, false, 9),
                SyncAction::LeaveOperators("shop-db-backup".into())
            );
        }
        // Only the default is wanted and the operator schedules this target's backups under
        // another id: no default next to it.
        assert_eq!(
            sync_action(None, "shop-db", b, Some(&want), true, 9),
            SyncAction::Nothing
        );
    }
}
