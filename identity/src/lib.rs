//! Drover's identities and PKI, shared by the agent, the controller and the CLI.
//!
//! Who a peer is lives in its certificate: a SAN URI `drover://agent/<host>` or
//! `drover://operator/<name>`, with an operator's role in the subject's OU. This crate makes
//! keys and CSRs, runs the controller's CA, parses certificates, writes key files 0600 and
//! builds the rustls client that dials the controller (pinned to the Drover CA).

pub mod files;
pub mod pki;
pub mod tls;
pub mod token;

use std::fmt;

/// The fixed DNS name every controller certificate carries and every client verifies.
/// The address a client dials only says where to connect; trust comes from the pinned CA.
pub const CONTROLLER_SERVER_NAME: &str = "drover-controller";

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate error: {0}")]
    Cert(String),
    #[error("invalid identity: {0}")]
    Identity(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

impl From<rcgen::Error> for Error {
    fn from(err: rcgen::Error) -> Self {
        Error::Cert(err.to_string())
    }
}

/// An operator's role: admins may change things, viewers may only read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Result<Role, Error> {
        match s {
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            other => Err(Error::Identity(format!(
                "unknown role {other:?}: expected admin or viewer"
            ))),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who holds a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Agent { host: String },
    Operator { name: String, role: Role },
}

impl Identity {
    /// The SAN URI that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Agent { host } => format!("drover://agent/{host}"),
            Identity::Operator { name, .. } => format!("drover://operator/{name}"),
        }
    }

    /// Builds an identity from a SAN URI and, for operators, the role from the subject OU.
    pub fn from_uri(uri: &str, role: Option<&str>) -> Result<Identity, Error> {
        if let Some(host) = uri.strip_prefix("drover://agent/") {
            validate_name(host)?;
            return Ok(Identity::Agent {
                host: host.to_string(),
            });
        }
        if let Some(name) = uri.strip_prefix("drover://operator/") {
            validate_name(name)?;
            let role =
                Role::parse(role.ok_or_else(|| {
                    Error::Identity("operator certificate carries no role".into())
                })?)?;
            return Ok(Identity::Operator {
                name: name.to_string(),
                role,
            });
        }
        Err(Error::Identity(format!("not a Drover identity URI: {uri}")))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Agent { host } => write!(f, "agent {host}"),
            Identity::Operator { name, role } => write!(f, "operator {name} ({role})"),
        }
    }
}

/// Host and operator names: 1-63 characters of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok_len = !name.is_empty() && name.len() <= 63;
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if ok_len && ok_first && ok_chars {
        Ok(())
    } else {
        Err(Error::Identity(format!(
            "invalid name {name:?}: use 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_uri() {
        let agent = Identity::Agent {
            host: "web-1".into(),
        };
        assert_eq!(Identity::from_uri(&agent.uri(), None).unwrap(), agent);
        let op = Identity::Operator {
            name: "alice".into(),
            role: Role::Viewer,
        };
        assert_eq!(Identity::from_uri(&op.uri(), Some("viewer")).unwrap(), op);
    }

    #[test]
    fn bad_names_and_uris_are_refused() {
        assert!(validate_name("").is_err());
        assert!(validate_name("Web").is_err());
        assert!(validate_name("-web").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
        assert!(Identity::from_uri("drover://agent/../x", None).is_err());
        assert!(Identity::from_uri("https://agent/x", None).is_err());
        assert!(Identity::from_uri("drover://operator/bob", None).is_err());
        assert!(Identity::from_uri("drover://operator/bob", Some("root")).is_err());
    }
}
