//! OperatorService: what the `drover` CLI calls, its handlers grouped by noun (`jobs`,
//! `backups`, `apps`, `hosts`, `access`, `schedules`, `fleet`) behind one RPC table here. Who may call
//! each RPC is `auth::RPCS` (reads need any operator certificate, changes the admin role).
//! Jobs start through `launch`, as the scheduler's do; a `LaunchError` becomes a status here,
//! in one place.

mod access;
mod apps;
mod backups;
mod fleet;
mod hosts;
mod jobs;
mod schedules;

pub use access::issue_token;

use std::sync::Arc;

use drover_proto::v1;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::jobs::JobRecord;
use crate::launch::{LaunchError, Launcher};
use crate::release::record::{self, FleetRelease};
use crate::shared::{Shared, now_ms};
use crate::store::HostRecord;
use drover_model::releases;

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
    /// A host's wire form; `releases` (every fleet release, oldest first) say what it is
    /// behind on.
    fn host_info(&self, h: &HostRecord, releases: &[FleetRelease]) -> Result<v1::HostInfo, Status> {
        let view = self.shared.host_view(h, now_ms());
        let store = &self.shared.store;
        let acked = store.last_event_seq(&h.name).map_err(internal)?;
        let mut info = convert::host_to_proto(
            h,
            view.state.as_str(),
            view.last_seen_unix_ms,
            view.session_open,
            acked,
        );
        let live = |app: &str| {
            store
                .releases(app, &h.name)
                .ok()
                .and_then(|t| releases::live(&t).map(|r| r.version.clone()))
                .unwrap_or_default()
        };
        info.behind = record::behind(releases, &h.name, live)
            .into_iter()
            .map(|b| v1::BehindRelease {
                app: b.app,
                release_id: b.release_id,
                desired_version: b.desired,
                live_version: b.live,
            })
            .collect();
        Ok(info)
    }

    fn fleet_releases(&self) -> Result<Vec<FleetRelease>, Status> {
        self.shared.store.fleet_releases().map_err(internal)
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

/// The stream a `WatchJob` call returns.
pub type WatchJobStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::WatchJobResponse, Status>> + Send>>;

/// The RPC table: each RPC of OperatorService and the file of its noun that serves it. Who
/// may call each is `auth::RPCS`, checked in every handler's `authorize`.
#[tonic::async_trait]
impl v1::operator_service_server::OperatorService for OperatorApi {
    type WatchJobStream = WatchJobStream;

    async fn deploy(
        &self,
        request: Request<v1::DeployRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        OperatorApi::deploy(self, request).await
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        OperatorApi::rollback(self, request).await
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        OperatorApi::list_jobs(self, request).await
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        OperatorApi::get_job(self, request).await
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::CancelJobResponse>, Status> {
        OperatorApi::cancel_job(self, request).await
    }

    async fn watch_job(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        OperatorApi::watch_job(self, request).await
    }

    async fn list_releases(
        &self,
        request: Request<v1::ListReleasesRequest>,
    ) -> Result<Response<v1::ListReleasesResponse>, Status> {
        OperatorApi::list_releases(self, request).await
    }

    async fn apply_backup_target(
        &self,
        request: Request<v1::ApplyBackupTargetRequest>,
    ) -> Result<Response<v1::ApplyBackupTargetResponse>, Status> {
        OperatorApi::apply_backup_target(self, request).await
    }

    async fn remove_backup_target(
        &self,
        request: Request<v1::RemoveBackupTargetRequest>,
    ) -> Result<Response<v1::RemoveBackupTargetResponse>, Status> {
        OperatorApi::remove_backup_target(self, request).await
    }

    async fn list_backup_targets(
        &self,
        request: Request<v1::ListBackupTargetsRequest>,
    ) -> Result<Response<v1::ListBackupTargetsResponse>, Status> {
        OperatorApi::list_backup_targets(self, request).await
    }

    async fn run_backup(
        &self,
        request: Request<v1::RunBackupRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        OperatorApi::run_backup(self, request).await
    }

    async fn list_backups(
        &self,
        request: Request<v1::ListBackupsRequest>,
    ) -> Result<Response<v1::ListBackupsResponse>, Status> {
        OperatorApi::list_backups(self, request).await
    }

    async fn get_backup(
        &self,
        request: Request<v1::GetBackupRequest>,
    ) -> Result<Response<v1::BackupInfo>, Status> {
        OperatorApi::get_backup(self, request).await
    }

    async fn prune_backups(
        &self,
        request: Request<v1::PruneBackupsRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        OperatorApi::prune_backups(self, request).await
    }

    async fn plan_prune(
        &self,
        request: Request<v1::PlanPruneRequest>,
    ) -> Result<Response<v1::PlanPruneResponse>, Status> {
        OperatorApi::plan_prune(self, request).await
    }

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        OperatorApi::restore(self, request).await
    }

    async fn verify(
        &self,
        request: Request<v1::VerifyRequest>,
    ) -> Result<Response<v1::VerifyResponse>, Status> {
        OperatorApi::verify(self, request).await
    }

    async fn list_verifications(
        &self,
        request: Request<v1::ListVerificationsRequest>,
    ) -> Result<Response<v1::ListVerificationsResponse>, Status> {
        OperatorApi::list_verifications(self, request).await
    }

    async fn apply_app(
        &self,
        request: Request<v1::ApplyAppRequest>,
    ) -> Result<Response<v1::ApplyAppResponse>, Status> {
        OperatorApi::apply_app(self, request).await
    }

    async fn list_apps(
        &self,
        request: Request<v1::ListAppsRequest>,
    ) -> Result<Response<v1::ListAppsResponse>, Status> {
        OperatorApi::list_apps(self, request).await
    }

    async fn get_app(
        &self,
        request: Request<v1::GetAppRequest>,
    ) -> Result<Response<v1::AppInfo>, Status> {
        OperatorApi::get_app(self, request).await
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        OperatorApi::who_am_i(self, request).await
    }

    async fn list_hosts(
        &self,
        request: Request<v1::ListHostsRequest>,
    ) -> Result<Response<v1::ListHostsResponse>, Status> {
        OperatorApi::list_hosts(self, request).await
    }

    async fn get_host(
        &self,
        request: Request<v1::GetHostRequest>,
    ) -> Result<Response<v1::HostInfo>, Status> {
        OperatorApi::get_host(self, request).await
    }

    async fn revoke_host(
        &self,
        request: Request<v1::RevokeHostRequest>,
    ) -> Result<Response<v1::RevokeHostResponse>, Status> {
        OperatorApi::revoke_host(self, request).await
    }

    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        OperatorApi::create_token(self, request).await
    }

    async fn list_tokens(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        OperatorApi::list_tokens(self, request).await
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        OperatorApi::revoke_token(self, request).await
    }

    async fn create_operator(
        &self,
        request: Request<v1::CreateOperatorRequest>,
    ) -> Result<Response<v1::CreateOperatorResponse>, Status> {
        OperatorApi::create_operator(self, request).await
    }

    async fn list_operators(
        &self,
        request: Request<v1::ListOperatorsRequest>,
    ) -> Result<Response<v1::ListOperatorsResponse>, Status> {
        OperatorApi::list_operators(self, request).await
    }

    async fn revoke_operator(
        &self,
        request: Request<v1::RevokeOperatorRequest>,
    ) -> Result<Response<v1::RevokeOperatorResponse>, Status> {
        OperatorApi::revoke_operator(self, request).await
    }

    async fn add_schedule(
        &self,
        request: Request<v1::AddScheduleRequest>,
    ) -> Result<Response<v1::ScheduleInfo>, Status> {
        OperatorApi::add_schedule(self, request).await
    }

    async fn list_schedules(
        &self,
        request: Request<v1::ListSchedulesRequest>,
    ) -> Result<Response<v1::ListSchedulesResponse>, Status> {
        OperatorApi::list_schedules(self, request).await
    }

    async fn list_alerts(
        &self,
        request: Request<v1::ListAlertsRequest>,
    ) -> Result<Response<v1::ListAlertsResponse>, Status> {
        OperatorApi::list_alerts(self, request).await
    }

    async fn remove_schedule(
        &self,
        request: Request<v1::RemoveScheduleRequest>,
    ) -> Result<Response<v1::RemoveScheduleResponse>, Status> {
        OperatorApi::remove_schedule(self, request).await
    }

    async fn pause_schedule(
        &self,
        request: Request<v1::PauseScheduleRequest>,
    ) -> Result<Response<v1::ScheduleInfo>, Status> {
        OperatorApi::pause_schedule(self, request).await
    }

    async fn resume_schedule(
        &self,
        request: Request<v1::ResumeScheduleRequest>,
    ) -> Result<Response<v1::ScheduleInfo>, Status> {
        OperatorApi::resume_schedule(self, request).await
    }

    async fn list_events(
        &self,
        request: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        OperatorApi::list_events(self, request).await
    }

    async fn start_release(
        &self,
        request: Request<v1::StartReleaseRequest>,
    ) -> Result<Response<v1::FleetReleaseInfo>, Status> {
        OperatorApi::start_release(self, request).await
    }

    async fn get_release(
        &self,
        request: Request<v1::GetReleaseRequest>,
    ) -> Result<Response<v1::FleetReleaseInfo>, Status> {
        OperatorApi::get_release(self, request).await
    }

    async fn list_fleet_releases(
        &self,
        request: Request<v1::ListFleetReleasesRequest>,
    ) -> Result<Response<v1::ListFleetReleasesResponse>, Status> {
        OperatorApi::list_fleet_releases(self, request).await
    }

    async fn control_release(
        &self,
        request: Request<v1::ControlReleaseRequest>,
    ) -> Result<Response<v1::FleetReleaseInfo>, Status> {
        OperatorApi::control_release(self, request).await
    }
}
