//! Operator RPCs about apps: apply a spec, list and get them.

use drover_model::appspec::AppSpec;
use drover_proto::v1;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::{authorize, operator_name};
use crate::shared::now_ms;

use super::backups::check_target_schedules;
use super::{OperatorApi, internal};

impl OperatorApi {
    pub(super) async fn apply_app(
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

    pub(super) async fn list_apps(
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

    pub(super) async fn get_app(
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
}

pub(super) fn app_info(record: &crate::store::AppRecord) -> v1::AppInfo {
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
