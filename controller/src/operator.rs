//! OperatorService: what the `drover` CLI calls. Reads need any operator certificate; changes
//! (deploys, rollbacks and schedules among them) need the admin role. Jobs start through
//! `launch`, as the scheduler's do; a `LaunchError` becomes a status here, in one place.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use drover_identity::token::{EnrollToken, token_id};
use drover_identity::{Identity, Role, validate_name};
use drover_model::appspec::AppSpec;
use drover_model::releases;
use drover_proto::v1;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::{authorize, operator_name};
use crate::config::{MAX_TOKEN_TTL, MIN_TOKEN_TTL};
use crate::convert;
use crate::jobs::{self, JobRecord, JobUpdate};
use crate::launch::{DeployArgs, Hosts, LaunchError, Launcher, RestoreArgs, RollbackArgs};
use crate::scheduler;
use crate::sessions::send_cancel;
use crate::shared::{Shared, now_ms};
use crate::store::{EventRecord, HostRecord, ScheduleKind, ScheduleRecord, TokenRecord};
use drover_model::backup::describe as describe_policy;
use drover_model::backup::retention;
use drover_model::backup::target::TargetSpec;
use drover_model::schedule;

#[derive(Debug, Clone)]
pub struct OperatorApi {
    pub shared: Arc<Shared>,
}

fn internal(err: impl std::fmt::Display) -> Status {
    Status::internal(err.to_string())
}

/// The one mapping of a job that could not start to the RPC's status.
impl From<LaunchError> for Status {
    fn from(err: LaunchError) -> Status {
        match err {
            LaunchError::NotFound(m) => Status::not_found(m),
            LaunchError::Precondition(m) => Status::failed_precondition(m),
            LaunchError::Invalid(m) => Status::invalid_argument(m),
            LaunchError::Internal(m) => Status::internal(m),
        }
    }
}

impl OperatorApi {
    fn host_info(&self, h: &HostRecord) -> Result<v1::HostInfo, Status> {
        let view = self.shared.host_view(h, now_ms());
        let acked = self
            .shared
            .store
            .last_event_seq(&h.name)
            .map_err(internal)?;
        Ok(convert::host_to_proto(
            h,
            view.state.as_str(),
            view.last_seen_unix_ms,
            view.session_open,
            acked,
        ))
    }

    fn launcher(&self) -> Launcher {
        Launcher::new(self.shared.clone())
    }

    fn known_job(&self, id: &str) -> Result<JobRecord, Status> {
        self.shared.store.job(id).map_err(internal)?.ok_or_else(|| {
            Status::not_found(format!(
                "unknown job {id}; `drover jobs` lists the recent ones"
            ))
        })
    }
}

impl OperatorApi {
    /// Checks and stores (flushed) a new schedule; its id defaults to `<target>-<kind>` (a
    /// deploy: `<app>-deploy-<version>`).
    async fn add_schedule_record(
        &self,
        mut record: ScheduleRecord,
        by: &str,
    ) -> Result<v1::ScheduleInfo, Status> {
        let now = now_ms();
        let kind = record.kind.ok_or_else(|| {
            Status::invalid_argument("a schedule's kind is backup, verify or deploy")
        })?;
        match kind {
            ScheduleKind::Backup | ScheduleKind::Verify => {
                self.launcher().known_target(&record.target)?;
                if record.cron.is_empty() || record.at_unix_ms != 0 {
                    return Err(Status::invalid_argument(format!(
                        "a {} schedule needs a cron expression (--cron \"0 2 * * *\") and no --at",
                        kind.as_str()
                    )));
                }
                if record.hosts.len() > 1 {
                    return Err(Status::invalid_argument(format!(
                        "a {} schedule runs on at most one named host",
                        kind.as_str()
                    )));
                }
            }
            ScheduleKind::Deploy => {
                self.launcher()
                    .deployable(&record.target, &record.version)?;
                if !record.cron.is_empty() || record.at_unix_ms == 0 {
                    return Err(Status::invalid_argument(
                        "a deploy schedule is one-off: give its time (--at) and no cron expression",
                    ));
                }
                if record.at_unix_ms <= now {
                    return Err(Status::invalid_argument(
                        "the deploy time (--at) is in the past; deploy now without --at",
                    ));
                }
            }
        }
        if record.id.is_empty() {
            record.id = match kind {
                ScheduleKind::Deploy => format!("{}-deploy-{}", record.target, record.version),
                _ => format!("{}-{}", record.target, kind.as_str()),
            };
        }
        if record.id.len() > 128
            || !record
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(Status::invalid_argument(format!(
                "schedule id {:?}: use up to 128 letters, digits, '-', '_' or '.'",
                record.id
            )));
        }
        record.created_by = by.to_string();
        record.created_unix_ms = now;
        record.paused = false;
        record.last_fire_unix_ms = 0;
        record.last_run_job_id.clear();
        record.last_result.clear();
        record.runs_missed = 0;
        scheduler::schedule_of(&record).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !self.shared.store.add_schedule(&record).map_err(internal)? {
            if self.known_schedule(&record.id)?.managed {
                return Err(Status::already_exists(format!(
                    "schedule {} is kept by backup target {}'s [schedule]: change it there and \
                     apply the target, or add another with --id",
                    record.id, record.target
                )));
            }
            return Err(Status::already_exists(format!(
                "schedule {} exists; `drover schedule rm {}` first, or choose another --id",
                record.id, record.id
            )));
        }
        self.shared.store.flush().await.map_err(internal)?;
        info!(schedule = %record.id, kind = kind.as_str(), target = %record.target, by = %by, "schedule added");
        Ok(schedule_info(&record, now))
    }

    /// Makes the schedules `spec`'s `[schedule]` keeps match it (not flushed); the changes.
    fn sync_schedules(&self, spec: &TargetSpec, by: &str) -> Result<Vec<String>, Status> {
        let changes = scheduler::sync_target_schedules(&self.shared, spec, by, now_ms()).map_err(
            |e| match e {
                scheduler::SyncError::Spec { .. } => Status::invalid_argument(e.to_string()),
                scheduler::SyncError::Store(e) => internal(e),
            },
        )?;
        if !changes.is_empty() {
            info!(target = %spec.name, changes = ?changes, by = %by, "target schedules synced");
        }
        Ok(changes)
    }

    fn known_schedule(&self, id: &str) -> Result<ScheduleRecord, Status> {
        self.shared
            .store
            .schedule(id)
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown schedule {id}; `drover schedule list` shows them"
                ))
            })
    }

    async fn set_paused(
        &self,
        id: &str,
        paused: bool,
        by: &str,
    ) -> Result<v1::ScheduleInfo, Status> {
        self.known_schedule(id)?;
        let record = self
            .shared
            .store
            .update_schedule(id, |r| r.paused = paused)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("unknown schedule {id}")))?;
        self.shared.store.flush().await.map_err(internal)?;
        info!(schedule = %id, paused, by = %by, "schedule paused or resumed");
        Ok(schedule_info(&record, now_ms()))
    }
}

/// Refuses a target whose `[schedule]` has a bad cron expression or zone.
fn check_target_schedules(spec: &TargetSpec, source: &str) -> Result<(), Status> {
    scheduler::target_schedules(spec, "", 0)
        .map(|_| ())
        .map_err(|(key, e)| Status::invalid_argument(format!("{source}: `{key}`: {e}")))
}

/// A stored schedule for the wire, with its next 3 fire times after `now`.
fn schedule_info(record: &ScheduleRecord, now: i64) -> v1::ScheduleInfo {
    let next = scheduler::schedule_of(record)
        .map(|s| schedule::next_runs(&s, now.max(record.last_fire_unix_ms), 3))
        .unwrap_or_default();
    // A one-off that fired has no next run.
    let next = if record.cron.is_empty() && record.last_fire_unix_ms > 0 {
        Vec::new()
    } else {
        next
    };
    convert::schedule_to_proto(record, next)
}

/// Records a cancel (durable), tells the watchers, then sends `Cancel` to the hosts whose part
/// runs; the rest of the job's hosts never get their command.
async fn cancel_job(
    shared: Arc<Shared>,
    id: &str,
    by: &str,
) -> Result<v1::CancelJobResponse, Status> {
    let now = now_ms();
    let (job, outcome) = shared
        .store
        .update_job(id, |job| jobs::request_cancel(job, by, now))
        .map_err(internal)?
        .ok_or_else(|| {
            Status::not_found(format!(
                "unknown job {id}; `drover jobs` lists the recent ones"
            ))
        })?;
    let tell = match outcome {
        jobs::Cancelled::AlreadyFinished(state) => {
            info!(job = %id, by, state = state.as_str(), "cancel of a finished job: nothing to do");
            return Ok(v1::CancelJobResponse {
                job: Some(convert::job_to_proto(&job)),
                already_finished: true,
                ..Default::default()
            });
        }
        jobs::Cancelled::Requested { tell } => tell,
    };
    shared.store.flush().await.map_err(internal)?;
    let _ = shared
        .job_updates
        .send(JobUpdate::Job(Box::new(job.clone())));
    let (mut told, mut pending) = (Vec::new(), Vec::new());
    for host in tell {
        if send_cancel(&shared, &job, &host) {
            told.push(host);
        } else {
            pending.push(host);
        }
    }
    info!(job = %id, by, told = ?told, pending = ?pending, "job cancel requested");
    Ok(v1::CancelJobResponse {
        job: Some(convert::job_to_proto(&job)),
        already_finished: false,
        hosts_told: told,
        hosts_pending: pending,
    })
}

/// Streams a job to one `WatchJob` caller: the job, its stored events, then live events and
/// state changes, and the finished job last; then the stream ends.
async fn watch(
    shared: Arc<Shared>,
    job: JobRecord,
    mut updates: broadcast::Receiver<JobUpdate>,
    tx: mpsc::Sender<Result<v1::WatchJobResponse, Status>>,
) {
    let id = job.id.clone();
    if send_job(&tx, &job).await.is_err() {
        return;
    }
    let mut last_sent = job;
    // Events already sent: the stored ones and the broadcast ones overlap.
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let mut pending = catch_up(&shared, &id, &mut seen, &tx).await;
    loop {
        match pending {
            Ok(Some(latest)) => {
                if latest.state().is_finished() {
                    let _ = send_job(&tx, &latest).await;
                    return;
                }
                if latest != last_sent {
                    if send_job(&tx, &latest).await.is_err() {
                        return;
                    }
                    last_sent = latest;
                }
            }
            Ok(None) => {}
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
        pending = Ok(None);
        let update = tokio::select! {
            _ = shared.shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable(format!(
                    "the controller is shutting down; the job goes on: `drover watch {id}`"
                )))).await;
                return;
            }
            _ = tx.closed() => return,
            update = updates.recv() => update,
        };
        match update {
            Ok(JobUpdate::Event(event)) if event.job_id == id => {
                if seen.insert((event.host.clone(), event.seq))
                    && send_event(&tx, &event).await.is_err()
                {
                    return;
                }
            }
            // The store's copy, not the broadcast one: an update sent before this watcher read
            // the store may arrive after it, and must not take the job back in time. Its
            // events first, so the finished job never comes before its last events.
            Ok(JobUpdate::Job(changed)) if changed.id == id => {
                pending = catch_up(&shared, &id, &mut seen, &tx).await;
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Fell behind: what was missed is in the store.
                tracing::debug!(job = %id, missed, "watcher lagged; reading the store");
                pending = catch_up(&shared, &id, &mut seen, &tx).await;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Sends the job's stored events not sent yet, in order; returns the job as stored now.
async fn catch_up(
    shared: &Shared,
    id: &str,
    seen: &mut HashSet<(String, u64)>,
    tx: &mpsc::Sender<Result<v1::WatchJobResponse, Status>>,
) -> Result<Option<JobRecord>, Status> {
    let Some(job) = shared.store.job(id).map_err(internal)? else {
        return Ok(None);
    };
    let events = shared.store.job_events(id).map_err(internal)?;
    for event in jobs::replay_order(&job, events) {
        if seen.insert((event.host.clone(), event.seq)) && send_event(tx, &event).await.is_err() {
            return Err(Status::cancelled("the watcher went away"));
        }
    }
    Ok(Some(job))
}

async fn send_job(
    tx: &mpsc::Sender<Result<v1::WatchJobResponse, Status>>,
    job: &JobRecord,
) -> Result<(), ()> {
    tx.send(Ok(v1::WatchJobResponse {
        event: None,
        job: Some(convert::job_to_proto(job)),
    }))
    .await
    .map_err(|_| ())
}

async fn send_event(
    tx: &mpsc::Sender<Result<v1::WatchJobResponse, Status>>,
    event: &EventRecord,
) -> Result<(), ()> {
    tx.send(Ok(v1::WatchJobResponse {
        event: Some(convert::event_to_proto(event)),
        job: None,
    }))
    .await
    .map_err(|_| ())
}

fn app_info(record: &crate::store::AppRecord) -> v1::AppInfo {
    // Stored specs were valid when applied; a spec this version cannot read shows its text only.
    let spec = AppSpec::from_toml(&record.spec_toml, &record.name).ok();
    v1::AppInfo {
        name: record.name.clone(),
        revision: record.revision,
        spec_toml: record.spec_toml.clone(),
        updated_unix_ms: record.updated_unix_ms,
        updated_by: record.updated_by.clone(),
        image: spec.as_ref().map(|s| s.image.clone()).unwrap_or_default(),
        has_web: spec.as_ref().is_some_and(|s| s.web.is_some()),
        workers: spec
            .map(|s| s.workers.into_iter().map(|w| w.name).collect())
            .unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl v1::operator_service_server::OperatorService for OperatorApi {
    type WatchJobStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::WatchJobResponse, Status>> + Send>>;

    async fn deploy(
        &self,
        request: Request<v1::DeployRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let by = operator_name(&caller);
        if req.at_unix_ms != 0 {
            // A one-off scheduled deploy: checked now, stored, started by the scheduler.
            if !req.labels.is_empty() || req.skip_backup || req.wait_lock {
                return Err(Status::invalid_argument(
                    "a scheduled deploy (--at) keeps only its hosts: name them with --host; --label, --skip-backup and --wait apply to deploys started now",
                ));
            }
            let record = ScheduleRecord {
                kind: Some(ScheduleKind::Deploy),
                target: req.app.clone(),
                version: req.version.clone(),
                hosts: req.hosts.clone(),
                at_unix_ms: req.at_unix_ms,
                ..ScheduleRecord::default()
            };
            let info = self.add_schedule_record(record, &by).await?;
            return Ok(Response::new(v1::JobInfo {
                scheduled: Some(info),
                ..Default::default()
            }));
        }
        let args = DeployArgs {
            app: req.app,
            version: req.version,
            hosts: Hosts {
                names: req.hosts,
                labels: req.labels.into_iter().collect(),
            },
            skip_backup: req.skip_backup,
            wait_lock: req.wait_lock,
        };
        let job = self.launcher().deploy(args, &by, None).await?;
        Ok(Response::new(convert::job_to_proto(&job)))
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let args = RollbackArgs {
            app: req.app,
            to_version: req.to_version,
            hosts: Hosts {
                names: req.hosts,
                labels: req.labels.into_iter().collect(),
            },
            wait_lock: req.wait_lock,
        };
        let job = self
            .launcher()
            .rollback(args, &operator_name(&caller))
            .await?;
        Ok(Response::new(convert::job_to_proto(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let req = request.get_ref();
        let limit = match req.limit {
            0 => 50,
            n => n.min(1000),
        } as usize;
        let app = (!req.app.is_empty()).then_some(req.app.as_str());
        let jobs = self
            .shared
            .store
            .jobs(app, limit)
            .map_err(internal)?
            .iter()
            .map(convert::job_to_proto)
            .collect();
        Ok(Response::new(v1::ListJobsResponse { jobs }))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        authorize(&request, &self.shared.store)?;
        let job = self.known_job(&request.get_ref().id)?;
        Ok(Response::new(convert::job_to_proto(&job)))
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::CancelJobResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let id = request.get_ref().id.clone();
        let by = operator_name(&caller);
        let shared = self.shared.clone();
        // In its own task: a caller that goes away leaves no cancel recorded but never sent.
        tokio::spawn(async move { cancel_job(shared, &id, &by).await })
            .await
            .map_err(|e| Status::internal(format!("cancel task failed: {e}")))?
            .map(Response::new)
    }

    async fn watch_job(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        authorize(&request, &self.shared.store)?;
        // Subscribed before anything is read, so no update falls between the stored state
        // and the live one (the overlap is de-duplicated).
        let updates = self.shared.job_updates.subscribe();
        let job = self.known_job(&request.get_ref().id)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(watch(self.shared.clone(), job, updates, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_releases(
        &self,
        request: Request<v1::ListReleasesRequest>,
    ) -> Result<Response<v1::ListReleasesResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let req = request.get_ref();
        let app = self.launcher().known_app(&req.app)?;
        if !req.host.is_empty()
            && self
                .shared
                .store
                .host(&req.host)
                .map_err(internal)?
                .is_none()
        {
            return Err(Status::not_found(format!(
                "unknown host {}; `drover hosts` lists the enrolled ones",
                req.host
            )));
        }
        let mut out = Vec::new();
        // By host name (the store's order), each host's newest first.
        for (host, table) in self
            .shared
            .store
            .app_releases(&app.name)
            .map_err(internal)?
        {
            if !req.host.is_empty() && host != req.host {
                continue;
            }
            let live = releases::live(&table).map(|r| r.id.clone());
            let target = releases::rollback_target(&table, None).map(|r| r.id.clone());
            let mut rows: Vec<v1::ReleaseInfo> = table
                .iter()
                .map(|r| {
                    convert::release_to_proto(
                        &host,
                        r,
                        live.as_ref() == Some(&r.id),
                        target.as_ref() == Some(&r.id),
                    )
                })
                .collect();
            rows.sort_by_key(|r| std::cmp::Reverse(r.started_unix_ms));
            out.extend(rows);
        }
        Ok(Response::new(v1::ListReleasesResponse { releases: out }))
    }

    async fn apply_backup_target(
        &self,
        request: Request<v1::ApplyBackupTargetRequest>,
    ) -> Result<Response<v1::ApplyBackupTargetResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let source = if req.source.is_empty() {
            "(backup target)".to_string()
        } else {
            req.source.clone()
        };
        let spec = TargetSpec::from_toml(&req.target_toml, &source)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let by = operator_name(&caller);
        check_target_schedules(&spec, &source)?;
        let (record, changed) = self
            .shared
            .store
            .apply_backup_target(&spec.name, &req.target_toml, &by, now_ms())
            .map_err(internal)?;
        let schedule_changes = self.sync_schedules(&spec, &by)?;
        self.shared.store.flush().await.map_err(internal)?;
        if changed {
            info!(target = %record.name, revision = record.revision, by = %by, "backup target applied");
        }
        Ok(Response::new(v1::ApplyBackupTargetResponse {
            name: record.name,
            revision: record.revision,
            changed,
            schedule_changes,
        }))
    }

    async fn remove_backup_target(
        &self,
        request: Request<v1::RemoveBackupTargetRequest>,
    ) -> Result<Response<v1::RemoveBackupTargetResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let name = request.into_inner().name;
        let store = &self.shared.store;
        self.launcher().known_target(&name)?;
        // An app spec that declares it would bring it back at its next apply.
        for app in store.apps().map_err(internal)? {
            let declares = AppSpec::from_toml(&app.spec_toml, &app.name)
                .is_ok_and(|spec| spec.backups.iter().any(|t| t.name == name));
            if declares {
                return Err(Status::failed_precondition(format!(
                    "backup target {name} is declared by app {}'s [[backups]]: remove it there, \
                     `drover app apply` the app, then remove the target",
                    app.name
                )));
            }
        }
        if let Some(job) = store
            .open_jobs()
            .map_err(internal)?
            .into_iter()
            .find(|j| j.app == name && j.kind.is_backup())
        {
            return Err(Status::failed_precondition(format!(
                "job {} ({}) of {name} is not finished; wait for it (`drover watch {}`) and retry",
                job.id,
                job.kind.as_str(),
                job.id
            )));
        }
        let mut removed_schedules = Vec::new();
        for schedule in store.schedules().map_err(internal)? {
            if schedule.target == name
                && matches!(
                    schedule.kind,
                    Some(ScheduleKind::Backup | ScheduleKind::Verify)
                )
            {
                store.remove_schedule(&schedule.id).map_err(internal)?;
                removed_schedules.push(schedule.id);
            }
        }
        store.remove_backup_target(&name).map_err(internal)?;
        store.flush().await.map_err(internal)?;
        let backups_kept = store
            .target_backups(&name)
            .map_err(internal)?
            .iter()
            .map(|(_, table)| table.len() as u64)
            .sum();
        let by = operator_name(&caller);
        info!(target = %name, schedules = ?removed_schedules, backups_kept, by = %by, "backup target removed");
        Ok(Response::new(v1::RemoveBackupTargetResponse {
            name,
            removed_schedules,
            backups_kept,
        }))
    }

    async fn list_backup_targets(
        &self,
        request: Request<v1::ListBackupTargetsRequest>,
    ) -> Result<Response<v1::ListBackupTargetsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let mut targets = Vec::new();
        for record in self.shared.store.backup_targets().map_err(internal)? {
            let spec = TargetSpec::from_toml(&record.spec_toml, &record.name).ok();
            targets.push(v1::BackupTargetInfo {
                name: record.name.clone(),
                revision: record.revision,
                target_toml: record.spec_toml.clone(),
                updated_unix_ms: record.updated_unix_ms,
                updated_by: record.updated_by.clone(),
                kind: spec
                    .as_ref()
                    .map(|s| s.kind().as_str().to_string())
                    .unwrap_or_default(),
                host: spec
                    .as_ref()
                    .and_then(|s| s.host.clone())
                    .unwrap_or_default(),
                remote: spec.as_ref().is_some_and(|s| s.storage.s3.is_some()),
                encrypted: spec
                    .as_ref()
                    .is_some_and(|s| !s.encryption.recipients.is_empty()),
            });
        }
        Ok(Response::new(v1::ListBackupTargetsResponse { targets }))
    }

    async fn run_backup(
        &self,
        request: Request<v1::RunBackupRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let job = self
            .launcher()
            .backup(
                &req.target,
                &req.host,
                "manual",
                &operator_name(&caller),
                None,
            )
            .await?;
        Ok(Response::new(convert::job_to_proto(&job)))
    }

    async fn list_backups(
        &self,
        request: Request<v1::ListBackupsRequest>,
    ) -> Result<Response<v1::ListBackupsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let req = request.get_ref();
        let targets: Vec<String> = if req.target.is_empty() {
            self.shared
                .store
                .backup_targets()
                .map_err(internal)?
                .into_iter()
                .map(|t| t.name)
                .collect()
        } else {
            // A removed target's backups are still listed (they stay where they are).
            let cataloged = !self
                .shared
                .store
                .target_backups(&req.target)
                .map_err(internal)?
                .is_empty();
            if !cataloged {
                self.launcher().known_target(&req.target)?;
            }
            vec![req.target.clone()]
        };
        let mut backups = Vec::new();
        for target in targets {
            for (host, table) in self
                .shared
                .store
                .target_backups(&target)
                .map_err(internal)?
            {
                backups.extend(table.iter().map(|b| convert::backup_to_proto(&host, b)));
            }
        }
        backups.sort_by_key(|b| std::cmp::Reverse(b.started_unix_ms));
        Ok(Response::new(v1::ListBackupsResponse { backups }))
    }

    async fn get_backup(
        &self,
        request: Request<v1::GetBackupRequest>,
    ) -> Result<Response<v1::BackupInfo>, Status> {
        authorize(&request, &self.shared.store)?;
        let (host, backup) = self.launcher().known_backup(&request.get_ref().id)?;
        Ok(Response::new(convert::backup_to_proto(&host, &backup)))
    }

    async fn prune_backups(
        &self,
        request: Request<v1::PruneBackupsRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        // Even as a dry run this starts a job that takes the target's lock on the host: admin
        // only. A viewer's dry run is PlanPrune.
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let job = self
            .launcher()
            .prune(&req.target, &req.host, req.dry_run, &operator_name(&caller))
            .await?;
        Ok(Response::new(convert::job_to_proto(&job)))
    }

    async fn plan_prune(
        &self,
        request: Request<v1::PlanPruneRequest>,
    ) -> Result<Response<v1::PlanPruneResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let (_, spec) = self.launcher().known_target(&req.target)?;
        let (local, remote) = (spec.retention.local(), spec.retention.remote());
        let mut lines = Vec::new();
        for (host, table) in self
            .shared
            .store
            .target_backups(&spec.name)
            .map_err(internal)?
        {
            if !req.host.is_empty() && host != req.host {
                continue;
            }
            for line in retention::plan(&local, &remote, &table) {
                let backup = table.iter().find(|b| b.id == line.id);
                lines.push(v1::PruneLineInfo {
                    host: host.clone(),
                    started_unix_ms: backup.map(|b| b.started_unix_ms).unwrap_or(0),
                    size_bytes: backup.map(|b| b.size()).unwrap_or(0),
                    id: line.id,
                    copy: line.copy,
                    keep: line.keep,
                    reasons: line.reasons,
                });
            }
        }
        Ok(Response::new(v1::PlanPruneResponse {
            target: spec.name.clone(),
            local_policy: describe_policy(&local),
            remote_policy: describe_policy(&remote),
            lines,
        }))
    }

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let args = RestoreArgs {
            target: req.target,
            backup_id: req.backup_id,
            part: req.part,
            to_database: req.to_database,
            to_dir: req.to_dir,
            confirmed: req.confirmed,
            identity_file: req.identity_file,
        };
        let job = self
            .launcher()
            .restore(args, &operator_name(&caller))
            .await?;
        Ok(Response::new(convert::job_to_proto(&job)))
    }

    async fn verify(
        &self,
        request: Request<v1::VerifyRequest>,
    ) -> Result<Response<v1::VerifyResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let names: Vec<String> = match (req.all, req.target.is_empty()) {
            (true, true) => self
                .shared
                .store
                .backup_targets()
                .map_err(internal)?
                .into_iter()
                .map(|t| t.name)
                .collect(),
            (false, false) => vec![req.target.clone()],
            _ => {
                return Err(Status::invalid_argument(
                    "name a target or ask for --all (not both)",
                ));
            }
        };
        if names.is_empty() {
            return Err(Status::failed_precondition(
                "no backup targets; `drover backup-target apply FILE` adds one",
            ));
        }
        // Every target is checked before any job starts, so a bad one starts none.
        let jobs = self
            .launcher()
            .verify_all(&names, &req.host, &operator_name(&caller), None)
            .await?
            .iter()
            .map(convert::job_to_proto)
            .collect();
        Ok(Response::new(v1::VerifyResponse { jobs }))
    }

    async fn list_verifications(
        &self,
        request: Request<v1::ListVerificationsRequest>,
    ) -> Result<Response<v1::ListVerificationsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        if !req.target.is_empty() {
            self.launcher().known_target(&req.target)?;
        }
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit as usize
        };
        let found = self
            .shared
            .store
            .verifications(
                (!req.target.is_empty()).then_some(req.target.as_str()),
                limit,
            )
            .map_err(internal)?;
        Ok(Response::new(v1::ListVerificationsResponse {
            verifications: found
                .iter()
                .map(|v| convert::verification_to_proto(&v.host, v))
                .collect(),
        }))
    }

    async fn apply_app(
        &self,
        request: Request<v1::ApplyAppRequest>,
    ) -> Result<Response<v1::ApplyAppResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let source = if req.source.is_empty() {
            "(app spec)".to_string()
        } else {
            req.source.clone()
        };
        let spec = AppSpec::from_toml(&req.spec_toml, &source)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let by = operator_name(&caller);
        for target in &spec.backups {
            check_target_schedules(target, &source)?;
        }
        let (record, changed) = self
            .shared
            .store
            .apply_app(&spec.name, &req.spec_toml, &by, now_ms())
            .map_err(internal)?;
        // Backup targets declared in the app spec are stored like applied target files.
        for target in &spec.backups {
            let text = toml::to_string(target).map_err(internal)?;
            let (t, changed) = self
                .shared
                .store
                .apply_backup_target(&target.name, &text, &by, now_ms())
                .map_err(internal)?;
            self.sync_schedules(target, &by)?;
            if changed {
                info!(target = %t.name, revision = t.revision, app = %spec.name, by = %by, "backup target applied with its app");
            }
        }
        self.shared.store.flush().await.map_err(internal)?;
        if changed {
            info!(app = %record.name, revision = record.revision, by = %by, "app spec applied");
        }
        Ok(Response::new(v1::ApplyAppResponse {
            name: record.name,
            revision: record.revision,
            changed,
        }))
    }

    async fn list_apps(
        &self,
        request: Request<v1::ListAppsRequest>,
    ) -> Result<Response<v1::ListAppsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let apps = self
            .shared
            .store
            .apps()
            .map_err(internal)?
            .iter()
            .map(app_info)
            .collect();
        Ok(Response::new(v1::ListAppsResponse { apps }))
    }

    async fn get_app(
        &self,
        request: Request<v1::GetAppRequest>,
    ) -> Result<Response<v1::AppInfo>, Status> {
        authorize(&request, &self.shared.store)?;
        let name = &request.get_ref().name;
        let record = self
            .shared
            .store
            .app(name)
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown app {name}; `drover app list` shows the applied ones"
                ))
            })?;
        Ok(Response::new(app_info(&record)))
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let Identity::Operator { name, role } = caller.identity else {
            return Err(Status::permission_denied("not an operator"));
        };
        Ok(Response::new(v1::WhoAmIResponse {
            name,
            role: role.to_string(),
        }))
    }

    async fn list_hosts(
        &self,
        request: Request<v1::ListHostsRequest>,
    ) -> Result<Response<v1::ListHostsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let hosts = self
            .shared
            .store
            .hosts()
            .map_err(internal)?
            .iter()
            .map(|h| self.host_info(h))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(v1::ListHostsResponse { hosts }))
    }

    async fn get_host(
        &self,
        request: Request<v1::GetHostRequest>,
    ) -> Result<Response<v1::HostInfo>, Status> {
        authorize(&request, &self.shared.store)?;
        let name = &request.get_ref().name;
        let host = self
            .shared
            .store
            .host(name)
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown host {name}; `drover hosts` lists the enrolled ones"
                ))
            })?;
        Ok(Response::new(self.host_info(&host)?))
    }

    async fn revoke_host(
        &self,
        request: Request<v1::RevokeHostRequest>,
    ) -> Result<Response<v1::RevokeHostResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let name = request.get_ref().name.clone();
        let store = &self.shared.store;
        let now = now_ms();
        let host = store
            .update_host(&name, |h| {
                if h.revoked_unix_ms.is_none() {
                    h.revoked_unix_ms = Some(now);
                }
            })
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown host {name}; `drover hosts` lists the enrolled ones"
                ))
            })?;
        store
            .revoke_serials(&name, &host.serials)
            .map_err(internal)?;
        // Durable before the session is cut, so a restart cannot resurrect the certificate.
        store.flush().await.map_err(internal)?;
        let session_closed = self.shared.registry.close(&name);
        info!(host = %name, by = %operator_name(&caller), certificates = host.serials.len(), session_closed, "host revoked");
        Ok(Response::new(v1::RevokeHostResponse {
            certificates_revoked: host.serials.len() as u32,
            session_closed,
        }))
    }

    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let ttl = (req.ttl_secs > 0).then(|| Duration::from_secs(req.ttl_secs));
        let labels = req.labels.into_iter().collect();
        let (token, record) = issue_token(
            &self.shared,
            &req.host,
            labels,
            ttl,
            &operator_name(&caller),
        )
        .await?;
        Ok(Response::new(v1::CreateTokenResponse {
            token: token.encode(),
            id: record.id,
            expires_unix_ms: record.expires_unix_ms,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let now = now_ms();
        let mut tokens: Vec<v1::TokenInfo> = self
            .shared
            .store
            .tokens()
            .map_err(internal)?
            .iter()
            .map(|t| convert::token_to_proto(t, now))
            .collect();
        tokens.sort_by_key(|t| t.created_unix_ms);
        Ok(Response::new(v1::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let id = request.get_ref().id.clone();
        let store = &self.shared.store;
        let mut token = store
            .tokens()
            .map_err(internal)?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown token {id}; `drover token list` shows them"
                ))
            })?;
        token.revoked = true;
        store.put_token(&token).map_err(internal)?;
        store.flush().await.map_err(internal)?;
        info!(token = %id, by = %operator_name(&caller), "enrollment token revoked");
        Ok(Response::new(v1::RevokeTokenResponse {}))
    }

    async fn create_operator(
        &self,
        request: Request<v1::CreateOperatorRequest>,
    ) -> Result<Response<v1::CreateOperatorResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        validate_name(&req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let role = Role::parse(&req.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let identity = Identity::Operator {
            name: req.name.clone(),
            role,
        };
        let issued = self
            .shared
            .ca
            .sign_csr(
                &req.csr_pem,
                &identity,
                self.shared.config.operator_cert_ttl,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let by = operator_name(&caller);
        // Recorded (flushed) before it is handed out, so it can always be listed and revoked.
        crate::operators::record(&self.shared.store, &req.name, role, &issued, &by, now_ms())
            .map_err(internal)?;
        self.shared.store.flush().await.map_err(internal)?;
        info!(operator = %req.name, role = %role, serial = %issued.serial, by = %by, "operator certificate issued");
        Ok(Response::new(v1::CreateOperatorResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.shared.ca.cert_pem().to_string(),
        }))
    }

    async fn list_operators(
        &self,
        request: Request<v1::ListOperatorsRequest>,
    ) -> Result<Response<v1::ListOperatorsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let now = now_ms();
        let operators = self
            .shared
            .store
            .operator_certs()
            .map_err(internal)?
            .iter()
            .map(|r| convert::operator_to_proto(r, now))
            .collect();
        Ok(Response::new(v1::ListOperatorsResponse { operators }))
    }

    async fn revoke_operator(
        &self,
        request: Request<v1::RevokeOperatorRequest>,
    ) -> Result<Response<v1::RevokeOperatorResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let name = request.get_ref().name.clone();
        validate_name(&name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let by = operator_name(&caller);
        let store = &self.shared.store;
        let revoked = store
            .revoke_operator(&name, now_ms(), &by)
            .map_err(internal)?;
        // Durable before it is reported: a restart cannot bring the certificates back.
        store.flush().await.map_err(internal)?;
        info!(operator = %name, by = %by, certificates = revoked, "operator revoked");
        if name == crate::operators::ADMIN {
            // The controller's own admin bundle was among them: issue its successor now rather
            // than at the next check.
            if let Err(err) = crate::operators::renew_admin_bundle(
                self.shared.clone(),
                drover_identity::pki::unix_now(),
            )
            .await
            {
                tracing::warn!(error = %err, "could not renew the admin operator bundle after its revocation");
            }
        }
        Ok(Response::new(v1::RevokeOperatorResponse {
            certificates_revoked: revoked,
        }))
    }

    async fn add_schedule(
        &self,
        request: Request<v1::AddScheduleRequest>,
    ) -> Result<Response<v1::ScheduleInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let kind = ScheduleKind::parse(&req.kind).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown schedule kind {:?}: backup, verify or deploy",
                req.kind
            ))
        })?;
        let record = ScheduleRecord {
            id: req.id,
            kind: Some(kind),
            target: req.target,
            version: req.version,
            hosts: req.hosts,
            cron: req.cron.trim().to_string(),
            at_unix_ms: req.at_unix_ms,
            tz: req.tz,
            jitter_secs: req.jitter_secs,
            ..ScheduleRecord::default()
        };
        let info = self
            .add_schedule_record(record, &operator_name(&caller))
            .await?;
        Ok(Response::new(info))
    }

    async fn list_schedules(
        &self,
        request: Request<v1::ListSchedulesRequest>,
    ) -> Result<Response<v1::ListSchedulesResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let now = now_ms();
        let schedules = self
            .shared
            .store
            .schedules()
            .map_err(internal)?
            .iter()
            .map(|r| schedule_info(r, now))
            .collect();
        Ok(Response::new(v1::ListSchedulesResponse { schedules }))
    }

    async fn list_alerts(
        &self,
        request: Request<v1::ListAlertsRequest>,
    ) -> Result<Response<v1::ListAlertsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let all = request.get_ref().all;
        let mut alerts: Vec<_> = self
            .shared
            .store
            .alerts()
            .map_err(internal)?
            .into_iter()
            .filter(|a| all || a.is_open())
            .collect();
        // Open first, then newest first.
        alerts.sort_by_key(|a| (!a.is_open(), std::cmp::Reverse(a.opened_unix_ms)));
        Ok(Response::new(v1::ListAlertsResponse {
            alerts: alerts.iter().map(crate::convert::alert_to_proto).collect(),
        }))
    }

    async fn remove_schedule(
        &self,
        request: Request<v1::RemoveScheduleRequest>,
    ) -> Result<Response<v1::RemoveScheduleResponse>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let id = &request.get_ref().id;
        let record = self.known_schedule(id)?;
        if record.managed {
            return Err(Status::failed_precondition(format!(
                "schedule {id} is kept by backup target {}'s [schedule]: set `{} = \"off\"` there \
                 and apply the target, or `drover schedule pause {id}`",
                record.target,
                record.kind.map_or("backup", |k| k.as_str()),
            )));
        }
        self.shared.store.remove_schedule(id).map_err(internal)?;
        self.shared.store.flush().await.map_err(internal)?;
        info!(schedule = %id, by = %operator_name(&caller), "schedule removed");
        Ok(Response::new(v1::RemoveScheduleResponse {}))
    }

    async fn pause_schedule(
        &self,
        request: Request<v1::PauseScheduleRequest>,
    ) -> Result<Response<v1::ScheduleInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let info = self
            .set_paused(&request.get_ref().id, true, &operator_name(&caller))
            .await?;
        Ok(Response::new(info))
    }

    async fn resume_schedule(
        &self,
        request: Request<v1::ResumeScheduleRequest>,
    ) -> Result<Response<v1::ScheduleInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let info = self
            .set_paused(&request.get_ref().id, false, &operator_name(&caller))
            .await?;
        Ok(Response::new(info))
    }

    async fn list_events(
        &self,
        request: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let req = request.get_ref();
        let limit = match req.limit {
            0 => 1000,
            n => n.min(10_000),
        } as usize;
        let events = self
            .shared
            .store
            .events(&req.host, req.after_seq, limit)
            .map_err(internal)?
            .iter()
            .map(convert::event_to_proto)
            .collect();
        Ok(Response::new(v1::ListEventsResponse { events }))
    }
}

/// Creates and stores (flushed) a one-time enrollment token for `host`. Used by the
/// CreateToken RPC and by `drover-controller dev`.
pub async fn issue_token(
    shared: &Shared,
    host: &str,
    labels: BTreeMap<String, String>,
    ttl: Option<Duration>,
    created_by: &str,
) -> Result<(EnrollToken, TokenRecord), Status> {
    validate_name(host).map_err(|e| Status::invalid_argument(e.to_string()))?;
    for key in labels.keys() {
        validate_name(key).map_err(|e| Status::invalid_argument(format!("label key: {e}")))?;
    }
    if ttl.is_some_and(|t| t < MIN_TOKEN_TTL || t > MAX_TOKEN_TTL) {
        return Err(Status::invalid_argument(
            "a token must live at least 1 minute (1m) and at most 7 days (168h)",
        ));
    }
    let ttl = ttl.unwrap_or(shared.config.token_ttl);
    let token = EnrollToken::generate(host, &shared.ca.fingerprint())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let now = now_ms();
    let secret_hash = token.secret_hash();
    let record = TokenRecord {
        id: token_id(&secret_hash),
        secret_hash,
        host: host.to_string(),
        labels,
        created_unix_ms: now,
        expires_unix_ms: now + ttl.as_millis() as i64,
        created_by: created_by.to_string(),
        used_unix_ms: None,
        revoked: false,
    };
    shared.store.put_token(&record).map_err(internal)?;
    shared.store.flush().await.map_err(internal)?;
    info!(host = %record.host, token = %record.id, by = %record.created_by, "enrollment token created");
    Ok((token, record))
}
