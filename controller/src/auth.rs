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
    /// When its certificate was issued (operators revoked by name before serials were
    /// recorded are matched by it).
    pub issued_unix: i64,
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
    let caller = Caller {
        identity,
        serial: info.serial.clone(),
        issued_unix: info.issued_unix(),
    };
    still_valid(&caller, store)?;
    Ok(caller)
}

/// Refuses `caller` once its certificate is revoked: checked on every call, and again while a
/// long stream (`WatchJob`) stays open.
pub fn still_valid(caller: &Caller, store: &Store) -> Result<(), Status> {
    let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
    let identity = &caller.identity;
    let mut revoked = store.is_revoked(&caller.serial).map_err(internal)?;
    if let Identity::Operator { name, .. } = identity
        && !revoked
    {
        // Operator certificates issued before serials were recorded are refused by name.
        revoked = store
            .operator_revoked_by_name(name, &caller.serial, caller.issued_unix)
            .map_err(internal)?;
    }
    if revoked {
        return Err(Status::permission_denied(format!(
            "the certificate of {identity} was revoked; an agent must be enrolled again with a new token, an operator needs a new identity from an admin (`drover operator create`)"
        )));
    }
    Ok(())
}

/// The pure rule: may `identity` do what `need` asks?
pub fn permits(identity: &Identity, need: Need) -> Result<(), Denied> {
    match (identity, need) {
        (Identity::Agent { .. }, Need::Agent) => Ok(()),
        (Identity::Agent { host }, _) => Err(Denied::AgentOnOperatorApi { host: host.clone() }),
        (Identity::Operator { name, .. }, Need::Agent) => {
            Err(Denied::OperatorOnAgentApi { name: name.clone() })
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
        ) => Err(Denied::Viewer { name: name.clone() }),
    }
}

/// Why [`permits`] refuses a caller; the transport and the handlers send it as
/// `PERMISSION_DENIED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("agent {host} may not call the operator API; use an operator identity")]
    AgentOnOperatorApi { host: String },
    #[error("operator {name} may not call the agent API")]
    OperatorOnAgentApi { name: String },
    #[error("operator {name} has the viewer role, which is read-only; ask an admin")]
    Viewer { name: String },
}

impl From<Denied> for Status {
    fn from(denied: Denied) -> Status {
        Status::permission_denied(denied.to_string())
    }
}

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with a certificate or without: enrollment proves itself with a token (or, for
    /// Reenroll, an expired certificate of this CA).
    Open,
    /// A certificate that permits this need.
    Only(Need),
}

use Access::{Only, Open};

/// The one authorization table: every RPC the controller serves, by its HTTP/2 path, and who
/// may call it. The transport applies it to each request's headers, before the body is read;
/// each handler's [`authorize`] looks its own entry up again once the caller's certificate is
/// checked against revocation, and refuses an RPC missing here. A unit test holds it equal to
/// the RPCs of `drover.proto`.
pub const RPCS: &[(&str, Access)] = &[
    ("/drover.v1.Enrollment/Enroll", Open),
    ("/drover.v1.Enrollment/Reenroll", Open),
    ("/drover.v1.AgentService/Session", Only(Need::Agent)),
    (
        "/drover.v1.OperatorService/WhoAmI",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/ListHosts",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/GetHost",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/RevokeHost",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/CreateToken",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListTokens",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/RevokeToken",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/CreateOperator",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListOperators",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/RevokeOperator",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListEvents",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/ApplyApp",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListApps",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/GetApp",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/Deploy",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/Rollback",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListJobs",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/GetJob",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/CancelJob",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/WatchJob",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/ListReleases",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/ApplyBackupTarget",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListBackupTargets",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/RemoveBackupTarget",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/RunBackup",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListBackups",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/GetBackup",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/PruneBackups",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/PlanPrune",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/Restore",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/Verify",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListVerifications",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/AddSchedule",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListSchedules",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/RemoveSchedule",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/PauseSchedule",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ResumeSchedule",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/ListAlerts",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/StartRelease",
        Only(Need::OperatorAdmin),
    ),
    (
        "/drover.v1.OperatorService/GetRelease",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/ListFleetReleases",
        Only(Need::OperatorRead),
    ),
    (
        "/drover.v1.OperatorService/ControlRelease",
        Only(Need::OperatorAdmin),
    ),
];

/// The table's entry for `path`.
pub fn access_of(path: &str) -> Option<Access> {
    RPCS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// The HTTP/2 path of the request being served, put in its extensions by the transport, so
/// [`authorize`] finds the request's entry in [`RPCS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcPath(pub String);

/// Authenticates the caller and authorizes the request by its entry in [`RPCS`].
pub fn authorize<T>(request: &Request<T>, store: &Store) -> Result<Caller, Status> {
    let path = request
        .extensions()
        .get::<RpcPath>()
        .map_or("", |p| p.0.as_str());
    let access = access_of(path).ok_or_else(|| {
        Status::permission_denied(format!("{path:?} is not in the authorization table"))
    })?;
    let caller = caller(request, store)?;
    if let Only(need) = access {
        permits(&caller.identity, need)?;
    }
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
                .to_string()
                .contains("read-only")
        );
    }

    /// Every RPC in drover.proto has exactly one entry, and the table names no other.
    #[test]
    fn the_table_holds_every_rpc_of_the_proto_and_no_other() {
        let proto = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../proto/proto/drover/v1/drover.proto"),
        )
        .unwrap();
        let package = "drover.v1";
        let mut in_proto = Vec::new();
        let mut service = "";
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap().trim();
                in_proto.push(format!("/{package}.{service}/{method}"));
            }
        }
        assert!(in_proto.len() > 30, "{in_proto:?}");
        let mut in_table: Vec<String> = RPCS.iter().map(|(p, _)| p.to_string()).collect();
        let count = in_table.len();
        in_table.sort();
        in_table.dedup();
        assert_eq!(count, in_table.len(), "an RPC is listed twice");
        in_proto.sort();
        assert_eq!(in_table, in_proto);
        // Only enrollment is open; the agent service is the agents'.
        for (path, access) in RPCS {
            match *access {
                Open => assert!(path.starts_with("/drover.v1.Enrollment/"), "{path}"),
                Only(Need::Agent) => {
                    assert!(path.starts_with("/drover.v1.AgentService/"), "{path}")
                }
                Only(_) => assert!(path.starts_with("/drover.v1.OperatorService/"), "{path}"),
            }
        }
    }
}
