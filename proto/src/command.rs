//! The one conversion of a job's command between `drover-model`'s [`JobCommand`] and the
//! wire's `Command`: the controller sends with [`to_proto`], the agent reads with
//! [`from_proto`], so a field cannot be added on one side and forgotten on the other.

use drover_model::job::JobCommand;

use crate::v1;
use crate::v1::command::Job;

/// The `Command` that asks an agent to run job `job_id`'s `command`.
pub fn to_proto(job_id: &str, command: &JobCommand) -> v1::Command {
    let job = match command {
        JobCommand::Deploy {
            app,
            version,
            spec_toml,
            spec_revision,
            skip_backup,
            wait_lock,
            requested_by,
            backup_target_toml,
            skip_migration,
            keep_previous,
        } => Job::Deploy(v1::DeployCommand {
            app: app.clone(),
            version: version.clone(),
            spec_toml: spec_toml.clone(),
            spec_revision: *spec_revision,
            skip_backup: *skip_backup,
            wait_lock: *wait_lock,
            requested_by: requested_by.clone(),
            backup_target_toml: backup_target_toml.clone(),
            skip_migration: *skip_migration,
            keep_previous: *keep_previous,
        }),
        JobCommand::Rollback {
            app,
            to_version,
            wait_lock,
            requested_by,
        } => Job::Rollback(v1::RollbackCommand {
            app: app.clone(),
            to_version: to_version.clone(),
            wait_lock: *wait_lock,
            requested_by: requested_by.clone(),
        }),
        JobCommand::Backup {
            target,
            target_toml,
            trigger,
            requested_by,
        } => Job::Backup(v1::BackupCommand {
            target: target.clone(),
            target_toml: target_toml.clone(),
            trigger: trigger.clone(),
            requested_by: requested_by.clone(),
        }),
        JobCommand::Restore {
            target,
            target_toml,
            backup_id,
            part,
            to_database,
            to_dir,
            confirmed,
            identity_file,
            requested_by,
        } => Job::Restore(v1::RestoreCommand {
            target: target.clone(),
            target_toml: target_toml.clone(),
            backup_id: backup_id.clone(),
            part: part.clone(),
            to_database: to_database.clone(),
            to_dir: to_dir.clone(),
            confirmed: *confirmed,
            identity_file: identity_file.clone(),
            requested_by: requested_by.clone(),
        }),
        JobCommand::Prune {
            target,
            target_toml,
            dry_run,
            requested_by,
        } => Job::Prune(v1::PruneCommand {
            target: target.clone(),
            target_toml: target_toml.clone(),
            dry_run: *dry_run,
            requested_by: requested_by.clone(),
        }),
        JobCommand::Verify {
            target,
            target_toml,
            requested_by,
            identity_file,
        } => Job::Verify(v1::VerifyCommand {
            target: target.clone(),
            target_toml: target_toml.clone(),
            requested_by: requested_by.clone(),
            identity_file: identity_file.clone(),
        }),
        JobCommand::Pull {
            app,
            version,
            spec_toml,
            requested_by,
        } => Job::Pull(v1::PullCommand {
            app: app.clone(),
            version: version.clone(),
            spec_toml: spec_toml.clone(),
            requested_by: requested_by.clone(),
        }),
        JobCommand::Retire { app, requested_by } => Job::Retire(v1::RetireCommand {
            app: app.clone(),
            requested_by: requested_by.clone(),
        }),
    };
    v1::Command {
        job_id: job_id.to_string(),
        kind: command.kind().as_str().to_string(),
        spec: Vec::new(),
        job: Some(job),
    }
}

/// The command a controller's `Command` carries (None: a kind this agent does not know).
pub fn from_proto(cmd: &v1::Command) -> Option<JobCommand> {
    Some(match cmd.job.as_ref()? {
        Job::Deploy(d) => JobCommand::Deploy {
            app: d.app.clone(),
            version: d.version.clone(),
            spec_toml: d.spec_toml.clone(),
            spec_revision: d.spec_revision,
            skip_backup: d.skip_backup,
            wait_lock: d.wait_lock,
            requested_by: d.requested_by.clone(),
            backup_target_toml: d.backup_target_toml.clone(),
            skip_migration: d.skip_migration,
            keep_previous: d.keep_previous,
        },
        Job::Rollback(r) => JobCommand::Rollback {
            app: r.app.clone(),
            to_version: r.to_version.clone(),
            wait_lock: r.wait_lock,
            requested_by: r.requested_by.clone(),
        },
        Job::Backup(b) => JobCommand::Backup {
            target: b.target.clone(),
            target_toml: b.target_toml.clone(),
            trigger: b.trigger.clone(),
            requested_by: b.requested_by.clone(),
        },
        Job::Restore(r) => JobCommand::Restore {
            target: r.target.clone(),
            target_toml: r.target_toml.clone(),
            backup_id: r.backup_id.clone(),
            part: r.part.clone(),
            to_database: r.to_database.clone(),
            to_dir: r.to_dir.clone(),
            confirmed: r.confirmed,
            identity_file: r.identity_file.clone(),
            requested_by: r.requested_by.clone(),
        },
        Job::Prune(p) => JobCommand::Prune {
            target: p.target.clone(),
            target_toml: p.target_toml.clone(),
            dry_run: p.dry_run,
            requested_by: p.requested_by.clone(),
        },
        Job::Verify(v) => JobCommand::Verify {
            target: v.target.clone(),
            target_toml: v.target_toml.clone(),
            requested_by: v.requested_by.clone(),
            identity_file: v.identity_file.clone(),
        },
        Job::Pull(p) => JobCommand::Pull {
            app: p.app.clone(),
            version: p.version.clone(),
            spec_toml: p.spec_toml.clone(),
            requested_by: p.requested_by.clone(),
        },
        Job::Retire(r) => JobCommand::Retire {
            app: r.app.clone(),
            requested_by: r.requested_by.clone(),
        },
    })
}
