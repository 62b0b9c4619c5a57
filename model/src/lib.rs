//! drover-model: the vocabulary the agent, the controller and the CLI share. Names and their
//! validation, durations and byte sizes, the app spec, the backup target, retention, the
//! catalog and verification records, releases, job kinds and job events, and config-file
//! helpers. Pure data and rules: no async runtime, no store, no Docker, no RPC, no S3 here
//! (the tidy test in `e2e/tests/tidy.rs` keeps it so).

pub mod appspec;
pub mod backup;
pub mod config;
pub mod error;
pub mod job;
pub mod jobevent;
pub mod names;
pub mod releases;
#[cfg(feature = "schedule")]
pub mod schedule;
pub mod units;
pub mod waves;
