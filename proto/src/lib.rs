//! Drover's wire protocol, `drover.v1`: generated tonic/prost code, and the conversions of the
//! records both sides share (`drover-model`'s event payloads) in [`payload`].
//!
//! The generated code lives in a private module with its lint exceptions; this crate re-exports
//! it as `drover_proto::v1`. Conversions of one side's own types live in that side's `convert`
//! module.

mod generated {
    #![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
    tonic::include_proto!("drover.v1");
}

/// Messages and services of `drover.v1`.
pub mod v1 {
    pub use super::generated::*;
}

pub mod command;
pub mod payload;
