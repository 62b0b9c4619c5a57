//! Who is calling, from the client certificate, and may they do this. Every RPC handler
//! starts here.
//!
//! Architecture invariant: agent certificates reach only AgentService and only as their own
//! host; operator certificates reach only OperatorService; viewers only read.

use drover_identity::pki::CertInfo;
use drover_identity::{Identity, Role};
use tonic::{Request, Status};

use crate::store::Store;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: Identity,
    pub serial: String,
}

/// What an RPC requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Agent,
    OperatorRead,
    OperatorAdmin,
}

/// What a caller without a client certificate is told.
pub const NO_CLIENT_CERT: &str = "no client certificate: agents must enroll (`drover-agent enroll`), operators need an identity bundle (`drover --identity DIR`)";

/// Reads and checks the caller's certificate: present, a Drover identity, not revoked.
pub fn caller<T>(request: &Request<T>, store: &Store) -> Result<Caller, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated(NO_CLIENT_CERT))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let info = CertInfo::from_der(leaf)
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
    let identity = info.identity.clone().ok_or_else(|| {
        Status::permission_denied("the client certificate carries no Drover identity")
    })?;
    let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
    let mut revoked = store.is_revoked(&info.serial).map_err(internal)?;
    if let Identity::Operator { name, .. } = &identity
        && !revoked
    {
        // Operator certificates issued before serials were recorded are refused by name.
        revoked = store
            .operator_revoked_by_name(name, &info.serial, info.issued_unix())
            .map_err(internal)?;
    }
    if revoked {
        return Err(Status::permission_denied(format!(
            "the certificate of {identity} was revoked; an agent must be enrolled again with a new token, an operator needs a new identity from an admin (`drover operator create`)"
        )));
    }
    Ok(Caller {
        identity,
        serial: info.serial,
    })
}

/// The pure rule: may `identity` do what `need` asks?
pub fn permits(identity: &Identity, need: Need) -> Result<(), String> {
    match (identity, need) {
        (Identity::Agent { .. }, Need::Agent) => Ok(()),
        (Identity::Agent { host }, _) => Err(format!(
            "agent {host} may not call the operator API; use an operator identity"
        )),
        (Identity::Operator { name, .. }, Need::Agent) => {
            Err(format!("operator {name} may not call the agent API"))
        }
        (Identity::Operator { .. }, Need::OperatorRead) => Ok(()),
        (
            Identity::Operator {
                role: Role::Admin, ..
            },
            Need::OperatorAdmin,
        ) => Ok(()),
        (
            Identity::Operator {
                name,
                role: Role::Viewer,
            },
            Need::OperatorAdmin,
        ) => Err(format!(
            "operator {name} has the viewer role, which is read-only; ask an admin"
        )),
    }
}

/// Authenticates and authorizes in one step.
pub fn authorize<T>(request: &Request<T>, store: &Store, need: Need) -> Result<Caller, Status> {
    let caller = caller(request, store)?;
    permits(&caller.identity, need).map_err(Status::permission_denied)?;
    Ok(caller)
}

/// The operator's name, for audit fields.
pub fn operator_name(caller: &Caller) -> String {
    match &caller.identity {
        Identity::Operator { name, .. } => name.clone(),
        Identity::Agent { host } => format!("agent:{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authorization_table() {
        let agent = Identity::Agent { host: "h".into() };
        let admin = Identity::Operator {
            name: "a".into(),
            role: Role::Admin,
        };
        let viewer = Identity::Operator {
            name: "v".into(),
            role: Role::Viewer,
        };
        let table = [
            (&agent, Need::Agent, true),
            (&agent, Need::OperatorRead, false),
            (&agent, Need::OperatorAdmin, false),
            (&admin, Need::Agent, false),
            (&admin, Need::OperatorRead, true),
            (&admin, Need::OperatorAdmin, true),
            (&viewer, Need::Agent, false),
            (&viewer, Need::OperatorRead, true),
            (&viewer, Need::OperatorAdmin, false),
        ];
        for (who, need, allowed) in table {
            assert_eq!(permits(who, need).is_ok(), allowed, "{who} {need:?}");
        }
        assert!(
            permits(&viewer, Need::OperatorAdmin)
                .unwrap_err()
                .contains("read-only")
        );
    }
}
