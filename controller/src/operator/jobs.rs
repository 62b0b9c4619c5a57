//! Operator RPCs about jobs: deploy, rollback, list and get jobs, cancel, `WatchJob` streams,
//! and the release tables hosts report.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use drover_model::releases;
use drover_proto::v1;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{authorize, operator_name};
use crate::convert;
use crate::jobs::{self, JobRecord, JobUpdate};
use crate::launch::{DeployArgs, Hosts, Launcher, RollbackArgs};
use crate::shared::Shared;
use crate::store::{EventRecord, ScheduleKind, ScheduleRecord};

use super::WatchJobStream;
use super::{OperatorApi, internal};

impl OperatorApi {
    pub(super) async fn deploy(
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
            skip_migration: false,
            keep_previous: false,
        };
        let job = self.launcher().deploy(args, &by, None).await?;
        Ok(Response::new(convert::job_to_proto(&job)))
    }

    pub(super) async fn rollback(
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
        let app = args.app.clone();
        let job = self
            .launcher()
            .rollback(args, &operator_name(&caller), None)
            .await?;
        // What the hosts run before the rollback (it has not run yet).
        let mut live = Vec::new();
        for target in &job.targets {
            live.push((target.host.clone(), self.live_version(&app, &target.host)?));
        }
        let mut info = convert::job_to_proto(&job);
        let fleet = self.shared.store.fleet_releases().map_err(internal)?;
        info.warnings
            .extend(crate::release::record::migration_warning(
                &fleet, &app, &live,
            ));
        Ok(Response::new(info))
    }

    /// The version live on `host` for `app`, as its agent last reported (empty: none).
    fn live_version(&self, app: &str, host: &str) -> Result<String, Status> {
        let table = self.shared.store.releases(app, host).map_err(internal)?;
        Ok(releases::live(&table)
            .map(|r| r.version.clone())
            .unwrap_or_default())
    }

    pub(super) async fn list_jobs(
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

    pub(super) async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        authorize(&request, &self.shared.store)?;
        let job = self.known_job(&request.get_ref().id)?;
        Ok(Response::new(convert::job_to_proto(&job)))
    }

    pub(super) async fn cancel_job(
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

    pub(super) async fn watch_job(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<WatchJobStream>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        // Subscribed before anything is read, so no update falls between the stored state
        // and the live one (the overlap is de-duplicated).
        let updates = self.shared.job_updates.subscribe();
        let job = self.known_job(&request.get_ref().id)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(watch(self.shared.clone(), caller, job, updates, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    pub(super) async fn list_releases(
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
}

/// Cancels a job through `launch` and answers with what was done.
pub(super) async fn cancel_job(
    shared: Arc<Shared>,
    id: &str,
    by: &str,
) -> Result<v1::CancelJobResponse, Status> {
    let outcome = Launcher::new(shared).cancel(id, by).await?;
    Ok(v1::CancelJobResponse {
        job: Some(convert::job_to_proto(&outcome.job)),
        already_finished: outcome.already_finished,
        hosts_told: outcome.told,
        hosts_pending: outcome.pending,
    })
}

/// How often an open `WatchJob` stream checks that its caller's certificate is not revoked.
const RECHECK_EVERY: Duration = Duration::from_secs(2);

/// Streams a job to one `WatchJob` caller: the job, its stored events, then live events and
/// state changes, and the finished job last; then the stream ends. A caller whose certificate
/// is revoked meanwhile is cut within [`RECHECK_EVERY`].
pub(super) async fn watch(
    shared: Arc<Shared>,
    caller: crate::auth::Caller,
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
    let mut recheck = tokio::time::interval(RECHECK_EVERY);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = recheck.tick() => {
                if let Err(status) = crate::auth::still_valid(&caller, &shared.store) {
                    tracing::info!(job = %id, caller = %caller.identity, "a revoked caller's WatchJob stream is cut");
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                continue;
            }
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
pub(super) async fn catch_up(
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

pub(super) async fn send_job(
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

pub(super) async fn send_event(
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
