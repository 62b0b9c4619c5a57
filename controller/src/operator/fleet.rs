//! Operator RPCs about fleet releases: start (or plan with a dry run), get, list, and pause,
//! resume or abort. The release driver (`release::driver`) does the work; these read the
//! request, call it, and wrap the stored release in its wire form.

use std::time::Duration;

use drover_model::releases;
use drover_model::waves::OnFailure;
use drover_proto::v1;
use tonic::{Request, Response, Status};

use crate::auth::{authorize, operator_name};
use crate::convert;
use crate::launch::Hosts;
use crate::release::driver::{Control, Releases, StartArgs};
use crate::release::record::{FleetRelease, Options};
use crate::store::{ScheduleKind, ScheduleRecord, ScheduledRelease};

use super::OperatorApi;

fn some_text(text: String) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.trim().to_string())
}

/// The request's options: each empty or zero one is left to the app spec.
fn options_of(req: &v1::StartReleaseRequest) -> Result<Options, Status> {
    let on_failure = match req.on_failure.trim() {
        "" => None,
        "revert" => Some(OnFailure::Revert),
        "halt" => Some(OnFailure::Halt),
        other => {
            return Err(Status::invalid_argument(format!(
                "--on-failure {other:?}: revert or halt"
            )));
        }
    };
    let ms = |v: u64| Duration::from_millis(v);
    Ok(Options {
        waves: some_text(req.waves.clone()),
        canary: some_text(req.canary.clone()),
        max_parallel: (req.max_parallel != 0).then_some(req.max_parallel),
        min_healthy: (req.min_healthy_set || req.min_healthy_ms != 0)
            .then(|| ms(req.min_healthy_ms)),
        progress_deadline: (req.progress_deadline_ms != 0).then(|| ms(req.progress_deadline_ms)),
        host_timeout: (req.host_timeout_set || req.host_timeout_ms != 0)
            .then(|| ms(req.host_timeout_ms)),
        on_failure,
        max_failures: some_text(req.max_failures.clone()),
        skip_offline: req.skip_offline,
    })
}

impl OperatorApi {
    fn releases(&self) -> Releases {
        Releases::new(self.shared.clone())
    }

    /// The wire form of a release, with each host's live version from its last report and,
    /// while it pulls, its pull job's last progress line.
    fn fleet_info(&self, f: &FleetRelease, dry_run: bool) -> v1::FleetReleaseInfo {
        let store = &self.shared.store;
        let mut info = convert::fleet_release_to_proto(
            f,
            |host| {
                store
                    .releases(&f.app, host)
                    .ok()
                    .and_then(|t| releases::live(&t).map(|r| r.version.clone()))
                    .unwrap_or_default()
            },
            dry_run,
        );
        for h in info.hosts.iter_mut().filter(|h| !h.pull_job_id.is_empty()) {
            if let Ok(Some(job)) = store.job(&h.pull_job_id)
                && let Some(target) = job.targets.iter().find(|t| t.host == h.host)
            {
                h.pull_progress = target.message.clone();
            }
        }
        info
    }

    pub(super) async fn start_release(
        &self,
        request: Request<v1::StartReleaseRequest>,
    ) -> Result<Response<v1::FleetReleaseInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let by = operator_name(&caller);
        let req = request.into_inner();
        let scheduled = req.at_unix_ms != 0 && !req.dry_run;
        let args = StartArgs {
            options: options_of(&req)?,
            app: req.app,
            version: req.version,
            hosts: Hosts {
                names: req.hosts,
                labels: req.labels.into_iter().collect(),
            },
            skip_backup: req.skip_backup,
            // A release for later is planned now, so a bad option fails at once.
            dry_run: req.dry_run || scheduled,
            id: None,
        };
        let release = self.releases().start(args.clone(), &by).await?;
        let mut info = self.fleet_info(&release, req.dry_run);
        if scheduled {
            // Stored as a one-off schedule; the scheduler starts it (hosts chosen then).
            let record = ScheduleRecord {
                kind: Some(ScheduleKind::Release),
                target: args.app,
                version: args.version,
                hosts: args.hosts.names,
                at_unix_ms: req.at_unix_ms,
                release: Some(ScheduledRelease {
                    labels: args.hosts.labels,
                    options: args.options,
                    skip_backup: args.skip_backup,
                }),
                ..ScheduleRecord::default()
            };
            info = v1::FleetReleaseInfo {
                scheduled: Some(self.add_schedule_record(record, &by).await?),
                ..info
            };
            info.id.clear();
            info.history.clear();
        }
        Ok(Response::new(info))
    }

    pub(super) async fn get_release(
        &self,
        request: Request<v1::GetReleaseRequest>,
    ) -> Result<Response<v1::FleetReleaseInfo>, Status> {
        authorize(&request, &self.shared.store)?;
        let release = self.releases().get(&request.get_ref().id)?;
        Ok(Response::new(self.fleet_info(&release, false)))
    }

    pub(super) async fn list_fleet_releases(
        &self,
        request: Request<v1::ListFleetReleasesRequest>,
    ) -> Result<Response<v1::ListFleetReleasesResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let app = some_text(request.get_ref().app.clone());
        let releases = self
            .releases()
            .list(app.as_deref())?
            .iter()
            .map(|r| self.fleet_info(r, false))
            .collect();
        Ok(Response::new(v1::ListFleetReleasesResponse { releases }))
    }

    pub(super) async fn control_release(
        &self,
        request: Request<v1::ControlReleaseRequest>,
    ) -> Result<Response<v1::FleetReleaseInfo>, Status> {
        let caller = authorize(&request, &self.shared.store)?;
        let req = request.into_inner();
        let control = match v1::ReleaseControl::try_from(req.control) {
            Ok(v1::ReleaseControl::Pause) => Control::Pause,
            Ok(v1::ReleaseControl::Resume) => Control::Resume,
            Ok(v1::ReleaseControl::Abort) => Control::Abort { revert: false },
            Ok(v1::ReleaseControl::AbortRevert) => Control::Abort { revert: true },
            Ok(v1::ReleaseControl::Converge) => Control::Converge,
            _ => {
                return Err(Status::invalid_argument(
                    "control: pause, resume, abort, abort with revert or converge",
                ));
            }
        };
        let release = self
            .releases()
            .control(&req.id, control, &operator_name(&caller))
            .await?;
        Ok(Response::new(self.fleet_info(&release, false)))
    }
}
