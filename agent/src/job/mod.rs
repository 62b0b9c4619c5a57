//! The agent's job kinds behind one dispatch. Each kind is one file with `run` (the job to its
//! outcome) and `converge` (what recovery does with a job of that kind a crash interrupted):
//! `deploy`, `rollback`, `backup`, `restore`, `prune`, `verify`. They share the step machinery
//! in `step` and the neutral modules below them (`crate::release` for the release kinds,
//! `crate::backup` for the backup kinds); a kind never imports another kind's module.
//!
//! Adding a kind: see "Adding a job kind" in ARCHITECTURE.md.

pub mod backup;
pub mod deploy;
pub mod prune;
pub mod restore;
pub mod rollback;
pub mod step;
pub mod verify;

use crate::store::{JobKind, JobRecord};
use step::{JobCtx, Outcome, RecoveryError, Report};

/// Runs a job to its outcome. Never panics on bad input; every failure is an outcome.
pub async fn run(ctx: &JobCtx, job: &mut JobRecord, report: &Report<'_>) -> Outcome {
    match job.kind {
        JobKind::Deploy => deploy::run(ctx, job, report).await,
        JobKind::Rollback => rollback::run(ctx, job, report).await,
        JobKind::Backup => backup::run(ctx, job, report).await,
        JobKind::Restore => restore::run(ctx, job, report).await,
        JobKind::Prune => prune::run(ctx, job, report).await,
        JobKind::Verify => verify::run(ctx, job, report).await,
    }
}

/// Converges a job a crash (or a panic) interrupted and reports it `interrupted`.
pub async fn converge(ctx: &JobCtx, job: JobRecord) -> Result<(), RecoveryError> {
    match job.kind {
        JobKind::Deploy => deploy::converge(ctx, job).await,
        JobKind::Rollback => rollback::converge(ctx, job).await,
        JobKind::Backup => backup::converge(ctx, job).await,
        JobKind::Restore => restore::converge(ctx, job).await,
        JobKind::Prune => prune::converge(ctx, job).await,
        JobKind::Verify => verify::converge(ctx, job).await,
    }
}
