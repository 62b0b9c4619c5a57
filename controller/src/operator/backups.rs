//! Operator RPCs about backups: targets (apply, remove, list), backups (run, list, get),
//! retention (prune, plan), restores, validations and their history.

use drover_model::appspec::AppSpec;
use drover_proto::v1;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::{authorize, operator_name};
use crate::convert;
use crate::launch::RestoreArgs;
use crate::scheduler;
use crate::shared::now_ms;
use crate::store::ScheduleKind;
use drover_model::backup::describe as describe_policy;
use drover_model::backup::retention;
use drover_model::backup::target::TargetSpec;

use super::{OperatorApi, internal};

impl OperatorApi {
    pub(super) async fn apply_backup_target(
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

    pub(super) async fn remove_backup_target(
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

    pub(super) async fn list_backup_targets(
        &self,
        request: Request<v1::ListBackupTargetsRequest>,
    ) -> Result<Response<v1::ListBackupTargetsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let mut targets = Vec::new();
        for record in self.shared.store.backup_targets().map_err(internal)? {
            targets.push(convert::target_to_proto(&record));
        }
        Ok(Response::new(v1::ListBackupTargetsResponse { targets }))
    }

    pub(super) async fn run_backup(
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

    pub(super) async fn list_backups(
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

    pub(super) async fn get_backup(
        &self,
        request: Request<v1::GetBackupRequest>,
    ) -> Result<Response<v1::BackupInfo>, Status> {
        authorize(&request, &self.shared.store)?;
        let (host, backup) = self.launcher().known_backup(&request.get_ref().id)?;
        Ok(Response::new(convert::backup_to_proto(&host, &backup)))
    }

    pub(super) async fn prune_backups(
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

    pub(super) async fn plan_prune(
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
                lines.push(convert::prune_line_to_proto(&host, line, backup));
            }
        }
        Ok(Response::new(v1::PlanPruneResponse {
            target: spec.name.clone(),
            local_policy: describe_policy(&local),
            remote_policy: describe_policy(&remote),
            lines,
        }))
    }

    pub(super) async fn restore(
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

    pub(super) async fn verify(
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

    pub(super) async fn list_verifications(
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
                .map(drover_proto::payload::verification_to_proto)
                .collect(),
        }))
    }
}

/// Refuses a target whose `[schedule]` has a bad cron expression or zone.
pub(super) fn check_target_schedules(spec: &TargetSpec, source: &str) -> Result<(), Status> {
    scheduler::target_schedules(spec, "", 0)
        .map(|_| ())
        .map_err(|(key, e)| Status::invalid_argument(format!("{source}: `{key}`: {e}")))
}
