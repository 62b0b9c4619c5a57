//! The agent library's error type: each variant says what went wrong and what to do.

use crate::store::StoreError;
use drover_identity::tls::describe_transport;
use drover_model::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "this host is not enrolled ({0} is missing): run `drover-agent enroll --controller ADDR --token TOKEN` first"
    )]
    NotEnrolled(String),
    #[error(
        "this host is already enrolled ({dir} holds its identity); to enroll again, stop the agent and remove that directory"
    )]
    AlreadyEnrolled { dir: String },
    #[error(transparent)]
    Identity(#[from] drover_identity::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot reach the controller at {controller}: {message}")]
    Unreachable { controller: String, message: String },
    #[error("the controller refused: {message}")]
    Refused { message: String },
    /// The certificate expired and the controller will not renew it: past its grace, the host
    /// revoked or enrolled again elsewhere. Only a new token helps (exit 78).
    #[error(
        "the controller at {controller} will not renew this host's expired certificate: {message}. Enroll again with a new token: `drover token create --host {host}`, then on this host `drover-agent enroll --controller {controller} --token TOKEN`"
    )]
    ReenrollRefused {
        host: String,
        controller: String,
        message: String,
    },
    #[error("the controller answered {code}: {message}")]
    Rpc { code: String, message: String },
    #[error("{0}")]
    Corrupt(String),
}

impl AgentError {
    /// Turns a gRPC status into an error that says whose fault it is.
    pub fn from_status(controller: &str, status: tonic::Status) -> AgentError {
        use tonic::Code;
        let message = status.message().to_string();
        let transport = std::error::Error::source(&status).is_some();
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => AgentError::Unreachable {
                controller: controller.to_string(),
                message: describe_transport(&status),
            },
            Code::Unknown if transport => AgentError::Unreachable {
                controller: controller.to_string(),
                message: describe_transport(&status),
            },
            Code::PermissionDenied
            | Code::Unauthenticated
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound => AgentError::Refused { message },
            code => AgentError::Rpc {
                code: format!("{code:?}"),
                message,
            },
        }
    }
}
