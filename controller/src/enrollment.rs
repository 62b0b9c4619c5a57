//! The Enrollment service: a one-time, host-bound, expiring token and a CSR in; a short-lived
//! agent certificate out. Callers need no client certificate here.

use std::sync::Arc;

use drover_identity::Identity;
use drover_identity::token::EnrollToken;
use drover_proto::v1;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::server::{Shared, now_ms};
use crate::store::HostRecord;

#[derive(Debug, Clone)]
pub struct EnrollmentApi {
    pub shared: Arc<Shared>,
}

fn internal(err: impl std::fmt::Display) -> Status {
    Status::internal(err.to_string())
}

#[tonic::async_trait]
impl v1::enrollment_server::Enrollment for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        let shared = &self.shared;
        let req = request.into_inner();
        let token =
            EnrollToken::parse(&req.token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let record = shared
            .store
            .token(&token.secret_hash())
            .map_err(internal)?
            .ok_or_else(|| {
                Status::permission_denied(
                    "enrollment token not recognised by this controller; create one with `drover token create --host NAME`",
                )
            })?;
        let now = now_ms();
        let refuse = |why: String| {
            warn!(host = %req.host, token = %record.id, reason = %why, "enrollment refused");
            Status::permission_denied(why)
        };
        if record.revoked {
            return Err(refuse(format!(
                "enrollment token {} was revoked",
                record.id
            )));
        }
        if record.used_unix_ms.is_some() {
            return Err(refuse(format!(
                "enrollment token {} was already used; tokens work once, create a new one",
                record.id
            )));
        }
        if now >= record.expires_unix_ms {
            return Err(refuse(format!(
                "enrollment token {} expired; create a new one with `drover token create --host {}`",
                record.id, record.host
            )));
        }
        if req.host != record.host || token.host != record.host {
            return Err(refuse(format!(
                "enrollment token {} is for host {}, not {}",
                record.id, record.host, req.host
            )));
        }
        let identity = Identity::Agent {
            host: record.host.clone(),
        };
        let issued = shared
            .ca
            .sign_csr(&req.csr_pem, &identity, shared.config.agent_cert_ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Consume the token only once everything else has worked, and atomically: of two
        // racing enrollments one wins.
        if !shared.store.consume_token(&record, now).map_err(internal)? {
            return Err(refuse(format!(
                "enrollment token {} was already used",
                record.id
            )));
        }
        let mut host = shared
            .store
            .host(&record.host)
            .map_err(internal)?
            .unwrap_or_else(|| HostRecord {
                name: record.host.clone(),
                ..HostRecord::default()
            });
        host.labels.extend(req.labels);
        host.labels.extend(record.labels.clone());
        host.enrolled_unix_ms = now;
        host.revoked_unix_ms = None;
        host.serials.push(issued.serial.clone());
        host.cert_not_after_unix = issued.not_after_unix;
        shared.store.put_host(&host).map_err(internal)?;
        shared.store.flush().await.map_err(internal)?;
        info!(host = %host.name, serial = %issued.serial, token = %record.id, "host enrolled");
        Ok(Response::new(v1::EnrollResponse {
            cert_pem: issued.cert_pem,
            ca_pem: shared.ca.cert_pem().to_string(),
        }))
    }
}
