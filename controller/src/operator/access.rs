//! Operator RPCs about access: enrollment tokens and operator certificates (create, list,
//! revoke), and `issue_token`, which `drover-controller dev` uses too.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_identity::token::{EnrollToken, token_id};
use drover_identity::{Identity, Role, validate_name};
use drover_proto::v1;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth::{authorize, operator_name};
use crate::config::{MAX_TOKEN_TTL, MIN_TOKEN_TTL};
use crate::convert;
use crate::shared::{Shared, now_ms};
use crate::store::TokenRecord;

use super::{OperatorApi, internal};

impl OperatorApi {
    pub(super) async fn create_token(
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

    pub(super) async fn list_tokens(
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

    pub(super) async fn revoke_token(
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

    pub(super) async fn create_operator(
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

    pub(super) async fn list_operators(
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

    pub(super) async fn revoke_operator(
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
