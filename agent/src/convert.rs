//! Conversions between the agent's domain types and `drover.v1` wire messages. Nothing else in
//! the agent builds or reads prost types beyond the session loop that sends them.

use drover_proto::v1;

use crate::health::{Check, HostFacts, Status};
use crate::store::{BackupJob, Event, JobRecord};
use drover_model::job::JobCommand;

pub fn status_to_proto(status: Status) -> v1::CheckStatus {
    match status {
        Status::Healthy => v1::CheckStatus::Healthy,
        Status::Degraded => v1::CheckStatus::Degraded,
        Status::Unhealthy => v1::CheckStatus::Unhealthy,
    }
}

pub fn event_to_proto(event: &Event) -> v1::JobEvent {
    v1::JobEvent {
        seq: event.seq,
        job_id: event.job_id.clone(),
        at_unix_ms: event.at_unix_ms,
        kind: event.kind.clone(),
        message: event.message.clone(),
        fields: event.fields.clone().into_iter().collect(),
        host: String::new(),
    }
}

pub fn health_to_proto(facts: &HostFacts, checks: &[Check], overall: Status) -> v1::HealthReport {
    v1::HealthReport {
        status: status_to_proto(overall) as i32,
        checks: checks
            .iter()
            .map(|c| v1::Check {
                name: c.name.clone(),
                status: status_to_proto(c.status) as i32,
                reason: c.reason.clone(),
            })
            .collect(),
        load1: facts.load1,
        load5: facts.load5,
        load15: facts.load15,
        mem_total_bytes: facts.mem_total_bytes,
        mem_available_bytes: facts.mem_available_bytes,
        disks: facts
            .disks
            .iter()
            .map(|d| v1::DiskUsage {
                mount: d.mount.clone(),
                total_bytes: d.total_bytes,
                free_bytes: d.free_bytes,
            })
            .collect(),
        uptime_secs: facts.uptime_secs,
        docker_reachable: facts.docker.reachable,
        docker_version: facts.docker.version.clone(),
        containers_running: facts.docker.containers_running,
        containers_total: facts.docker.containers_total,
        agent_version: facts.agent_version.clone(),
        cert_not_after_unix: facts.cert_not_after_unix.unwrap_or_default(),
        clock_offset_ms: facts.clock_offset_ms.unwrap_or_default(),
        collected_unix_ms: facts.now_unix * 1000,
        apps: facts
            .apps
            .iter()
            .map(|a| v1::AppStatus {
                app: a.app.clone(),
                version: a.version.clone(),
                running: a.running,
                listen: a.listen.clone(),
                requests: a.requests,
                status_5xx: a.status_5xx,
                p95_ms: a.p95_ms,
            })
            .collect(),
    }
}

/// The command a controller's `Command` carries (None: a kind this agent does not know).
pub fn command_from_proto(cmd: &drover_proto::v1::Command) -> Option<JobCommand> {
    use drover_proto::v1::command::Job;
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
    })
}

/// A job as this agent stores it, accepted from the controller's `command` at `now_ms`,
/// nothing done yet.
pub fn record_from_command(id: String, command: JobCommand, now_ms: i64) -> JobRecord {
    let base = JobRecord {
        id,
        kind: command.kind(),
        app: command.subject().to_string(),
        version: command.version().to_string(),
        spec_toml: String::new(),
        spec_revision: 0,
        skip_backup: false,
        wait_lock: false,
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
            ..
        } => JobRecord {
            spec_toml,
            spec_revision,
            skip_backup,
            wait_lock,
            backup: (!backup_target_toml.is_empty()).then(|| BackupJob {
                target_toml: backup_target_toml,
                trigger: "pre_deploy".into(),
                ..BackupJob::default()
            }),
            ..base
        },
        JobCommand::Rollback { wait_lock, .. } => JobRecord { wait_lock, ..base },
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

/// The job a controller's `Command` asks for, as this agent stores it.
pub fn job_from_command(cmd: &drover_proto::v1::Command, now_ms: i64) -> Option<JobRecord> {
    command_from_proto(cmd).map(|c| record_from_command(cmd.job_id.clone(), c, now_ms))
}
