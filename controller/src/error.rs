//! The controller library's error type.

use crate::store::StoreError;
use drover_model::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Identity(#[from] drover_identity::Error),
    #[error("TLS server: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(String),
}
