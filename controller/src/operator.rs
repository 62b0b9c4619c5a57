//! OperatorService: what the `drover` CLI calls. Reads need any operator certificate; changes
//! need the admin role.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use drover_agent::appspec::AppSpec;
use drover_identity::token::{EnrollToken, token_id};
use drover_identity::{Identity, Role, validate_name};
use drover_proto::v1;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::{Need, authorize, operator_name};
use crate::config::MAX_TOKEN_TTL;
use crate::convert;
use crate::hoststate::host_state;
use crate::server::{Shared, now_ms};
use crate::store::{HostRecord, TokenRecord};

#[derive(Debug, Clone)]
pub struct OperatorApi {
    pub shared: Arc<Shared>,
}

fn internal(err: impl std::fmt::Display) -> Status {
    Status::internal(err.to_string())
}

impl OperatorApi {
    fn host_info(&self, h: &HostRecord) -> Result<v1::HostInfo, Status> {
        let shared = &self.shared;
        let (seen, open) = shared.registry.seen(&h.name);
        let last_seen = seen.unwrap_or(0).max(h.last_seen_unix_ms);
        let silence =
            (last_seen > 0).then(|| Duration::from_millis((now_ms() - last_seen).max(0) as u64));
        let state = host_state(
            h.revoked_unix_ms.is_some(),
            silence,
            shared.config.suspect_after,
            shared.config.down_after,
        );
        let acked = shared.store.last_event_seq(&h.name).map_err(internal)?;
        Ok(convert::host_to_proto(
            h,
            state.as_str(),
            last_seen,
            open,
            acked,
        ))
    }
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
        _request: Request<v1::DeployRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        Err(Status::unimplemented("deploy: work in progress"))
    }

    async fn rollback(
        &self,
        _request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        Err(Status::unimplemented("rollback: work in progress"))
    }

    async fn list_jobs(
        &self,
        _request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        Err(Status::unimplemented("jobs: work in progress"))
    }

    async fn get_job(
        &self,
        _request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        Err(Status::unimplemented("jobs: work in progress"))
    }

    async fn watch_job(
        &self,
        _request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(Status::unimplemented("watch: work in progress"))
    }

    async fn list_releases(
        &self,
        _request: Request<v1::ListReleasesRequest>,
    ) -> Result<Response<v1::ListReleasesResponse>, Status> {
        Err(Status::unimplemented("releases: work in progress"))
    }

    async fn apply_app(
        &self,
        request: Request<v1::ApplyAppRequest>,
    ) -> Result<Response<v1::ApplyAppResponse>, Status> {
        let caller = authorize(&request, &self.shared.store, Need::OperatorAdmin)?;
        let req = request.into_inner();
        let source = if req.source.is_empty() {
            "(app spec)".to_string()
        } else {
            req.source.clone()
        };
        let spec = AppSpec::from_toml(&req.spec_toml, &source)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let by = operator_name(&caller);
        let (record, changed) = self
            .shared
            .store
            .apply_app(&spec.name, &req.spec_toml, &by, now_ms())
            .map_err(internal)?;
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
        authorize(&request, &self.shared.store, Need::OperatorRead)?;
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
        authorize(&request, &self.shared.store, Need::OperatorRead)?;
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
        let caller = authorize(&request, &self.shared.store, Need::OperatorRead)?;
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
        authorize(&request, &self.shared.store, Need::OperatorRead)?;
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
        authorize(&request, &self.shared.store, Need::OperatorRead)?;
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
        let caller = authorize(&request, &self.shared.store, Need::OperatorAdmin)?;
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
        let caller = authorize(&request, &self.shared.store, Need::OperatorAdmin)?;
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
        authorize(&request, &self.shared.store, Need::OperatorRead)?;
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
        let caller = authorize(&request, &self.shared.store, Need::OperatorAdmin)?;
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
        let caller = authorize(&request, &self.shared.store, Need::OperatorAdmin)?;
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
        info!(operator = %req.name, role = %role, serial = %issued.serial, by = %operator_name(&caller), "operator certificate issued");
        Ok(Response::new(v1::CreateOperatorResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.shared.ca.cert_pem().to_string(),
        }))
    }

    async fn list_events(
        &self,
        request: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        authorize(&request, &self.shared.store, Need::OperatorRead)?;
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
    let ttl = ttl.unwrap_or(shared.config.token_ttl);
    if ttl > MAX_TOKEN_TTL {
        return Err(Status::invalid_argument(
            "a token may live at most 7 days (168h)",
        ));
    }
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
