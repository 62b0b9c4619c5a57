//! Operator RPCs about the fleet's state: who am I, hosts (list, get, revoke), their events,
//! and open alerts.

use drover_identity::Identity;
use drover_proto::v1;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::{authorize, operator_name};
use crate::convert;
use crate::shared::now_ms;

use super::{OperatorApi, internal};

impl OperatorApi {
    pub(super) async fn who_am_i(
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

    pub(super) async fn list_hosts(
        &self,
        request: Request<v1::ListHostsRequest>,
    ) -> Result<Response<v1::ListHostsResponse>, Status> {
        authorize(&request, &self.shared.store)?;
        let releases = self.fleet_releases()?;
        let hosts = self
            .shared
            .store
            .hosts()
            .map_err(internal)?
            .iter()
            .map(|h| self.host_info(h, &releases))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(v1::ListHostsResponse { hosts }))
    }

    pub(super) async fn get_host(
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
        Ok(Response::new(
            self.host_info(&host, &self.fleet_releases()?)?,
        ))
    }

    pub(super) async fn revoke_host(
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

    pub(super) async fn list_events(
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

    pub(super) async fn list_alerts(
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
}
