//! The agent's job kinds behind one dispatch. Each kind is one file with `run` (the job to its
//! outcome) and `converge` (what recovery does with a job of that kind a crash interrupted):
//! `deploy`, `rollback`, `backup`, `restore`, `prune`, `verify`, `pull`, `retire`. They share the step machinery
//! in `step` and the neutral modules below them (`crate::release` for the release kinds,
//! `crate::backup` for the backup kinds); a kind never imports another kind's module.
//! `record_of` is what the agent stores of a command it accepts.
//!
//! Adding a kind: see "Adding a job kind" in ARCHITECTURE.md.

pub mod backup;
pub mod deploy;
pub mod prune;
pub mod pull;
pub mod restore;
pub mod retire;
pub mod rollback;
pub mod step;
pub mod verify;

use crate::store::{BackupJob, JobKind, JobRecord};
use drover_model::job::JobCommand;
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
        JobKind::Pull => pull::run(ctx, job, report).await,
        JobKind::Retire => retire::run(ctx, job, report).await,
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
        JobKind::Pull => pull::converge(ctx, job).await,
        JobKind::Retire => retire::converge(ctx, job).await,
    }
}

/// A job as this agent stores it, accepted from the controller's `command` at `now_ms`,
/// nothing done yet.
pub fn record_of(id: String, command: JobCommand, now_ms: i64) -> JobRecord {
    let base = JobRecord {
        id,
        kind: command.kind(),
        app: command.subject().to_string(),
        version: command.version().to_string(),
        spec_toml: String::new(),
        spec_revision: 0,
        skip_backup: false,
        wait_lock: false,
        skip_migration: false,
        keep_previous: false,
        requested_by: command.requested_by().to_string(),
        accepted_unix_ms: now_ms,
        step: String::new(),
        finished: false,
        release: String::new(),
        previous: String::new(),
        switched: false,
        backup: None,
    };
    match command {
        JobCommand::Deploy {
            spec_toml,
            spec_revision,
            skip_backup,
            wait_lock,
            backup_target_toml,
            skip_migration,
            keep_previous,
            ..
        } => JobRecord {
            spec_toml,
            spec_revision,
            skip_backup,
            wait_lock,
            skip_migration,
            keep_previous,
            backup: (!backup_target_toml.is_empty()).then(|| BackupJob {
                target_toml: backup_target_toml,
                trigger: "pre_deploy".into(),
                ..BackupJob::default()
            }),
            ..base
        },
        JobCommand::Rollback { wait_lock, .. } => JobRecord { wait_lock, ..base },
        JobCommand::Pull { spec_toml, .. } => JobRecord { spec_toml, ..base },
        JobCommand::Retire { .. } => JobRecord {
            wait_lock: true,
            ..base
        },
        JobCommand::Backup {
            target_toml,
            trigger,
            ..
        } => JobRecord {
            backup: Some(BackupJob {
                target_toml,
                trigger,
                ..BackupJob::default()
            }),
            ..base
        },
        JobCommand::Verify {
            target_toml,
            identity_file,
            ..
        } => JobRecord {
            backup: Some(BackupJob {
                target_toml,
                identity_file,
                ..BackupJob::default()
            }),
            ..base
        },
        JobCommand::Restore {
            target_toml,
            backup_id,
            part,
            to_database,
            to_dir,
            confirmed,
            identity_file,
            ..
        } => JobRecord {
            backup: Some(BackupJob {
                target_toml,
                backup_id,
                part,
                to_database,
                to_dir,
                confirmed,
                identity_file,
                ..BackupJob::default()
            }),
            ..base
        },
        JobCommand::Prune {
            target_toml,
            dry_run,
            ..
        } => JobRecord {
            backup: Some(BackupJob {
                target_toml,
                dry_run,
                ..BackupJob::default()
            }),
            ..base
        },
    }
}
