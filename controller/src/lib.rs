//! The Drover controller: the control plane agents connect out to, and the operator CLI.
//!
//! `server` opens the data dir and serves `enrollment`, `sessions` (AgentService) and
//! `operator` (OperatorService) over mTLS through `transport` (the accept loop: connection caps,
//! handshake, first-request and idle timeouts, what a connection without a certificate may do); `auth` decides who may call what; `operators` records operator certificates and keeps the
//! admin bundle valid; `store` is the
//! only module that touches sled; `jobs` and `selection` are the pure rules of deploy and
//! rollback jobs; `schedule` the pure scheduling rules and `scheduler` the task that
//! fires due schedules; `provenance` the pure rule of which host may report which backup records; `alerts` the pure alert rules, `alerting` the task that
//! raises and resolves alerts and `notify` the only module that sends notifications; `cli` is the `drover` command. See ARCHITECTURE.md.

pub mod alerting;
pub mod alerts;
pub mod auth;
pub mod config;
pub mod convert;
pub mod dev;
pub mod enrollment;
pub mod error;
pub mod hoststate;
pub mod jobs;
pub mod launch;
pub mod notify;
pub mod operator;
pub mod operators;
pub mod provenance;
pub mod registry;
pub mod release;
pub mod rollout;
pub mod scheduler;
pub mod selection;
pub mod server;
pub mod sessions;
pub mod shared;
pub mod store;
pub mod transport;

pub use config::ControllerConfig;
pub use error::ControllerError;
pub use server::Controller;
