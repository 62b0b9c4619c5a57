//! Operator RPCs about schedules: add, list, remove, pause and resume.

use drover_proto::v1;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::{authorize, operator_name};
use crate::convert;
use crate::scheduler;
use crate::shared::now_ms;
use crate::store::{ScheduleKind, ScheduleRecord};
use drover_model::backup::target::TargetSpec;
use drover_model::schedule;

use super::{OperatorApi, internal};

impl OperatorApi {
    pub(super) async fn add_schedule(
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
        if kind == ScheduleKind::Release {
            return Err(Status::invalid_argument(
                "a release is scheduled with its options by `drover release APP VERSION --at TIME`",
            ));
        }
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

    pub(super) async fn list_schedules(
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

    pub(super) async fn remove_schedule(
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

    pub(super) async fn pause_schedule(
        &self,
        request: Request<v1::PauseScheduleRequest>,
    ) -> Result<Response<v1::ScheduleInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let info = self
            .set_paused(&request.get_ref().id, true, &operator_name(&caller))
            .await?;
        Ok(Response::new(info))
    }

    pub(super) async fn resume_schedule(
        &self,
        request: Request<v1::ResumeScheduleRequest>,
    ) -> Result<Response<v1::ScheduleInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let info = self
            .set_paused(&request.get_ref().id, false, &operator_name(&caller))
            .await?;
        Ok(Response::new(info))
    }
}

impl OperatorApi {
    /// Checks and stores (flushed) a new schedule; its id defaults to `<target>-<kind>` (a
    /// deploy: `<app>-deploy-<version>`).
    pub(super) async fn add_schedule_record(
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
            ScheduleKind::Deploy | ScheduleKind::Release => {
                let what = kind.as_str();
                self.launcher()
                    .deployable(&record.target, &record.version)?;
                if !record.cron.is_empty() || record.at_unix_ms == 0 {
                    return Err(Status::invalid_argument(format!(
                        "a {what} schedule is one-off: give its time (--at) and no cron expression"
                    )));
                }
                if record.at_unix_ms <= now {
                    return Err(Status::invalid_argument(format!(
                        "the {what} time (--at) is in the past; {what} now without --at"
                    )));
                }
            }
        }
        if record.id.is_empty() {
            record.id = match kind {
                ScheduleKind::Deploy | ScheduleKind::Release => {
                    format!("{}-{}-{}", record.target, kind.as_str(), record.version)
                }
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
    pub(super) fn sync_schedules(
        &self,
        spec: &TargetSpec,
        by: &str,
    ) -> Result<Vec<String>, Status> {
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

    pub(super) fn known_schedule(&self, id: &str) -> Result<ScheduleRecord, Status> {
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

    pub(super) async fn set_paused(
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

/// A stored schedule for the wire, with its next 3 fire times after `now`.
pub(super) fn schedule_info(record: &ScheduleRecord, now: i64) -> v1::ScheduleInfo {
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
