//! Conversions between `drover.v1` wire messages and the controller's stored records. Nothing
//! outside the RPC handlers and the CLI sees prost types.

use drover_model::backup::catalog::{Backup, PruneLine};
use drover_model::backup::target::TargetSpec;
use drover_model::jobevent::{self, Release};
use drover_proto::v1;

use crate::jobs::JobRecord;

use crate::store::{
    AppStatusRecord, CheckRecord, DiskRecord, EventRecord, HealthSnapshot, HostRecord,
    OperatorCertRecord, TokenRecord,
};

pub fn status_name(status: i32) -> &'static str {
    match v1::CheckStatus::try_from(status) {
        Ok(v1::CheckStatus::Healthy) => "healthy",
        Ok(v1::CheckStatus::Degraded) => "degraded",
        Ok(v1::CheckStatus::Unhealthy) => "unhealthy",
        _ => "unknown",
    }
}

fn status_value(name: &str) -> i32 {
    match name {
        "healthy" => v1::CheckStatus::Healthy as i32,
        "degraded" => v1::CheckStatus::Degraded as i32,
        "unhealthy" => v1::CheckStatus::Unhealthy as i32,
        _ => v1::CheckStatus::Unspecified as i32,
    }
}

pub fn health_from_proto(r: &v1::HealthReport) -> HealthSnapshot {
    HealthSnapshot {
        status: status_name(r.status).to_string(),
        checks: r
            .checks
            .iter()
            .map(|c| CheckRecord {
                name: c.name.clone(),
                status: status_name(c.status).to_string(),
                reason: c.reason.clone(),
            })
            .collect(),
        load1: r.load1,
        load5: r.load5,
        load15: r.load15,
        mem_total_bytes: r.mem_total_bytes,
        mem_available_bytes: r.mem_available_bytes,
        disks: r
            .disks
            .iter()
            .map(|d| DiskRecord {
                mount: d.mount.clone(),
                total_bytes: d.total_bytes,
                free_bytes: d.free_bytes,
            })
            .collect(),
        uptime_secs: r.uptime_secs,
        docker_reachable: r.docker_reachable,
        docker_version: r.docker_version.clone(),
        containers_running: r.containers_running,
        containers_total: r.containers_total,
        agent_version: r.agent_version.clone(),
        cert_not_after_unix: r.cert_not_after_unix,
        clock_offset_ms: r.clock_offset_ms,
        collected_unix_ms: r.collected_unix_ms,
        apps: r
            .apps
            .iter()
            .map(|a| AppStatusRecord {
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

pub fn health_to_proto(h: &HealthSnapshot) -> v1::HealthReport {
    v1::HealthReport {
        status: status_value(&h.status),
        checks: h
            .checks
            .iter()
            .map(|c| v1::Check {
                name: c.name.clone(),
                status: status_value(&c.status),
                reason: c.reason.clone(),
            })
            .collect(),
        load1: h.load1,
        load5: h.load5,
        load15: h.load15,
        mem_total_bytes: h.mem_total_bytes,
        mem_available_bytes: h.mem_available_bytes,
        disks: h
            .disks
            .iter()
            .map(|d| v1::DiskUsage {
                mount: d.mount.clone(),
                total_bytes: d.total_bytes,
                free_bytes: d.free_bytes,
            })
            .collect(),
        uptime_secs: h.uptime_secs,
        docker_reachable: h.docker_reachable,
        docker_version: h.docker_version.clone(),
        containers_running: h.containers_running,
        containers_total: h.containers_total,
        agent_version: h.agent_version.clone(),
        cert_not_after_unix: h.cert_not_after_unix,
        clock_offset_ms: h.clock_offset_ms,
        collected_unix_ms: h.collected_unix_ms,
        apps: h
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

/// Why an event's record was not kept (the event itself is).
#[derive(Debug, thiserror::Error)]
pub enum UnreadPayload {
    #[error(transparent)]
    Wire(#[from] drover_proto::payload::PayloadError),
    #[error(transparent)]
    Legacy(#[from] jobevent::LegacyPayloadError),
    #[error("a {carried} record cannot ride on a {kind} event")]
    Misplaced { carried: &'static str, kind: String },
}

/// An event as received from `host`, with its payload read: the typed one, or (from an agent
/// before payloads) the JSON one taken out of its fields. A payload that does not read, or
/// that rides on an event of another kind, is dropped and the reason returned; the event is
/// kept either way, so its sequence number is taken and acknowledged.
pub fn event_from_proto(
    host: &str,
    e: &v1::JobEvent,
    received_unix_ms: i64,
) -> (EventRecord, Option<UnreadPayload>) {
    let mut fields: std::collections::BTreeMap<String, String> =
        e.fields.clone().into_iter().collect();
    let payload = match &e.payload {
        Some(wire) => drover_proto::payload::from_proto(wire.clone())
            .map(Some)
            .map_err(UnreadPayload::from),
        None => jobevent::legacy_payload(&e.kind, &mut fields).map_err(UnreadPayload::from),
    }
    .and_then(|payload| match payload {
        Some(p) if p.event_kind() != e.kind => Err(UnreadPayload::Misplaced {
            carried: p.event_kind(),
            kind: e.kind.clone(),
        }),
        other => Ok(other),
    });
    let (payload, unread) = match payload {
        Ok(p) => (p, None),
        Err(why) => (None, Some(why)),
    };
    let record = EventRecord {
        host: host.to_string(),
        seq: e.seq,
        job_id: e.job_id.clone(),
        at_unix_ms: e.at_unix_ms,
        kind: e.kind.clone(),
        message: e.message.clone(),
        fields,
        received_unix_ms,
        payload,
    };
    (record, unread)
}

pub fn event_to_proto(e: &EventRecord) -> v1::JobEvent {
    v1::JobEvent {
        seq: e.seq,
        job_id: e.job_id.clone(),
        at_unix_ms: e.at_unix_ms,
        kind: e.kind.clone(),
        message: e.message.clone(),
        fields: e.fields.clone().into_iter().collect(),
        host: e.host.clone(),
        payload: e.payload.as_ref().map(drover_proto::payload::to_proto),
    }
}

pub fn token_to_proto(t: &TokenRecord, now_ms: i64) -> v1::TokenInfo {
    let state = if t.revoked {
        "revoked"
    } else if t.used_unix_ms.is_some() {
        "used"
    } else if now_ms >= t.expires_unix_ms {
        "expired"
    } else {
        "pending"
    };
    v1::TokenInfo {
        id: t.id.clone(),
        host: t.host.clone(),
        labels: t.labels.clone().into_iter().collect(),
        created_unix_ms: t.created_unix_ms,
        expires_unix_ms: t.expires_unix_ms,
        created_by: t.created_by.clone(),
        state: state.to_string(),
    }
}

pub fn operator_to_proto(r: &OperatorCertRecord, now_ms: i64) -> v1::OperatorInfo {
    let state = if r.revoked_unix_ms.is_some() {
        "revoked"
    } else if now_ms >= r.expires_unix_ms {
        "expired"
    } else {
        "valid"
    };
    v1::OperatorInfo {
        name: r.name.clone(),
        role: r.role.clone(),
        serial: r.serial.clone(),
        issued_unix_ms: r.issued_unix_ms,
        expires_unix_ms: r.expires_unix_ms,
        created_by: r.created_by.clone(),
        revoked_unix_ms: r.revoked_unix_ms.unwrap_or(0),
        state: state.to_string(),
    }
}

pub fn host_to_proto(
    h: &HostRecord,
    state: &str,
    last_seen_unix_ms: i64,
    session_open: bool,
    acked_seq: u64,
) -> v1::HostInfo {
    v1::HostInfo {
        name: h.name.clone(),
        state: state.to_string(),
        health: h
            .health
            .as_ref()
            .map(|s| s.status.clone())
            .unwrap_or_else(|| "unknown".to_string()),
        last_seen_unix_ms,
        agent_version: h.agent_version.clone(),
        cert_not_after_unix: h.cert_not_after_unix,
        labels: h.labels.clone().into_iter().collect(),
        last_report: h.health.as_ref().map(health_to_proto),
        enrolled_unix_ms: h.enrolled_unix_ms,
        acked_seq,
        session_open,
        behind: Vec::new(),
    }
}

pub fn job_to_proto(j: &JobRecord) -> v1::JobInfo {
    v1::JobInfo {
        id: j.id.clone(),
        kind: j.kind.as_str().to_string(),
        app: j.app.clone(),
        version: j.version.clone(),
        requested_by: j.requested_by.clone(),
        created_unix_ms: j.created_unix_ms,
        finished_unix_ms: j.finished_unix_ms,
        state: j.state().as_str().to_string(),
        scheduled: None,
        cancel_requested_by: j.cancel.as_ref().map(|c| c.by.clone()).unwrap_or_default(),
        cancel_requested_unix_ms: j.cancel.as_ref().map_or(0, |c| c.at_unix_ms),
        targets: j
            .targets
            .iter()
            .map(|t| v1::JobTarget {
                host: t.host.clone(),
                state: t.state.as_str().to_string(),
                step: t.step.clone(),
                message: t.message.clone(),
                started_unix_ms: t.started_unix_ms,
                finished_unix_ms: t.finished_unix_ms,
                logs: t.logs.clone(),
                code: t.code.clone(),
            })
            .collect(),
        warnings: Vec::new(),
    }
}

/// The `Cancel` that asks an agent to stop its part of `j`.
pub fn cancel_to_proto(j: &JobRecord) -> v1::Cancel {
    v1::Cancel {
        job_id: j.id.clone(),
        requested_by: j.cancel.as_ref().map(|c| c.by.clone()).unwrap_or_default(),
    }
}

/// The `Command` that asks an agent to run its part of `j`.
pub fn command_to_proto(j: &JobRecord) -> v1::Command {
    drover_proto::command::to_proto(&j.id, &j.command)
}

/// One release of `host`'s table, with the flags the controller computes.
pub fn release_to_proto(
    host: &str,
    r: &Release,
    live: bool,
    rollback_target: bool,
) -> v1::ReleaseInfo {
    v1::ReleaseInfo {
        app: r.app.clone(),
        host: host.to_string(),
        id: r.id.clone(),
        version: r.version.clone(),
        image: r.image.clone(),
        digest: r.image_id.clone(),
        deployed_by: r.requested_by.clone(),
        job_id: r.job_id.clone(),
        started_unix_ms: r.started_unix_ms,
        finished_unix_ms: r.finished_unix_ms,
        result: r.result.map_or("running", |r| r.as_str()).to_string(),
        state: r.state.as_str().to_string(),
        live,
        rollback_target,
    }
}

/// One backup of `host`'s catalog.
pub fn backup_to_proto(host: &str, b: &Backup) -> v1::BackupInfo {
    v1::BackupInfo {
        id: b.id.clone(),
        target: b.target.clone(),
        host: host.to_string(),
        kind: b.kind.clone(),
        trigger: b.trigger.as_str().to_string(),
        job_id: b.job_id.clone(),
        requested_by: b.requested_by.clone(),
        started_unix_ms: b.started_unix_ms,
        finished_unix_ms: b.finished_unix_ms,
        size_bytes: b.size(),
        source_bytes: b.source_bytes(),
        ratio: b.ratio(),
        manifest_json: serde_json::to_string(b).unwrap_or_default(),
        local_dir: b.local_dir.clone(),
        remote: b.remote.clone(),
        verified_unix_ms: b.verified_unix_ms,
        encrypted: !b.recipients.is_empty(),
        release: b.release.clone(),
        local_corrupt: b.local_corrupt.clone(),
    }
}

/// A stored schedule with its next fire times.
pub fn schedule_to_proto(r: &crate::store::ScheduleRecord, next: Vec<i64>) -> v1::ScheduleInfo {
    v1::ScheduleInfo {
        id: r.id.clone(),
        kind: r.kind.map(|k| k.as_str().to_string()).unwrap_or_default(),
        target: r.target.clone(),
        version: r.version.clone(),
        hosts: r.hosts.clone(),
        cron: r.cron.clone(),
        at_unix_ms: r.at_unix_ms,
        tz: r.tz.clone(),
        jitter_secs: r.jitter_secs,
        paused: r.paused,
        created_by: r.created_by.clone(),
        created_unix_ms: r.created_unix_ms,
        last_fire_unix_ms: r.last_fire_unix_ms,
        last_run_job_id: r.last_run_job_id.clone(),
        last_result: r.last_result.clone(),
        runs_missed: r.runs_missed,
        next_runs_unix_ms: next,
        managed: r.managed,
    }
}

pub fn alert_to_proto(a: &crate::alerts::AlertRecord) -> v1::AlertInfo {
    v1::AlertInfo {
        key: a.key.clone(),
        kind: a.kind.clone(),
        subject: a.subject.clone(),
        message: a.message.clone(),
        opened_unix_ms: a.opened_unix_ms,
        last_sent_unix_ms: a.last_sent_unix_ms,
        resolved_unix_ms: a.resolved_unix_ms,
        sends: a.sends,
        pending: a.pending.clone(),
    }
}

/// A stored backup target as `drover backup target list` shows it; what its spec says (kind,
/// pinned host, copies, encryption) is empty when the stored TOML no longer reads.
pub fn target_to_proto(record: &crate::store::AppRecord) -> v1::BackupTargetInfo {
    let spec = TargetSpec::from_toml(&record.spec_toml, &record.name).ok();
    v1::BackupTargetInfo {
        name: record.name.clone(),
        revision: record.revision,
        target_toml: record.spec_toml.clone(),
        updated_unix_ms: record.updated_unix_ms,
        updated_by: record.updated_by.clone(),
        kind: spec
            .as_ref()
            .map(|s| s.kind().as_str().to_string())
            .unwrap_or_default(),
        host: spec
            .as_ref()
            .and_then(|s| s.host.clone())
            .unwrap_or_default(),
        remote: spec.as_ref().is_some_and(|s| s.storage.s3.is_some()),
        encrypted: spec
            .as_ref()
            .is_some_and(|s| !s.encryption.recipients.is_empty()),
    }
}

/// One line of a prune plan on `host`, with the backup it is about when the catalog has it.
pub fn prune_line_to_proto(
    host: &str,
    line: PruneLine,
    backup: Option<&Backup>,
) -> v1::PruneLineInfo {
    v1::PruneLineInfo {
        host: host.to_string(),
        started_unix_ms: backup.map(|b| b.started_unix_ms).unwrap_or(0),
        size_bytes: backup.map(|b| b.size()).unwrap_or(0),
        id: line.id,
        copy: line.copy,
        keep: line.keep,
        reasons: line.reasons,
    }
}

/// A fleet release to its wire form; `live` gives the version live on a host now.
pub fn fleet_release_to_proto(
    f: &crate::release::record::FleetRelease,
    live: impl Fn(&str) -> String,
    dry_run: bool,
) -> v1::FleetReleaseInfo {
    use crate::release::engine::{HostPhase, OnFailure, Phase, Pull};
    use drover_model::waves::Budget;
    let r = &f.release;
    let (wave, deadline, why) = match &r.phase {
        Phase::Pulling { deadline_ms } => (0, *deadline_ms, String::new()),
        Phase::Running { wave, deadline_ms } => (*wave, *deadline_ms, String::new()),
        Phase::Paused { wave, .. } => (*wave, 0, String::new()),
        Phase::Reverting { why } | Phase::Halted { why } | Phase::Reverted { why } => {
            (r.waves.saturating_sub(1), 0, why.clone())
        }
        Phase::Succeeded => (r.waves.saturating_sub(1), 0, String::new()),
    };
    // A halted release stopped in the wave of its furthest host that moved.
    let wave = match &r.phase {
        Phase::Reverting { .. } | Phase::Halted { .. } | Phase::Reverted { .. } => r
            .hosts
            .iter()
            .filter(|h| !matches!(h.phase, HostPhase::Pending | HostPhase::Skipped { .. }))
            .map(|h| h.wave)
            .max()
            .unwrap_or(0),
        _ => wave,
    };
    let hosts = r
        .hosts
        .iter()
        .map(|h| {
            let mut out = v1::FleetReleaseHost {
                host: h.host.clone(),
                wave: h.wave as u32,
                state: h.phase.as_str().to_string(),
                before: h.before.clone(),
                live_version: live(&h.host),
                connected: h.connected,
                migrates: h.migrates,
                pull: h.pull.as_str().to_string(),
                ..Default::default()
            };
            match &h.pull {
                Pull::Pulling { job_id } => out.pull_job_id = job_id.clone(),
                Pull::Failed { why } => out.pull_why = why.clone(),
                _ => {}
            }
            match &h.phase {
                HostPhase::Deploying { job_id, started_ms } => {
                    out.job_id = job_id.clone();
                    out.deploy_started_unix_ms = *started_ms;
                }
                HostPhase::Reverting { job_id } => out.job_id = job_id.clone(),
                HostPhase::Settling {
                    deployed_ms,
                    healthy_since_ms,
                } => {
                    out.deployed_unix_ms = *deployed_ms;
                    out.healthy_since_unix_ms = healthy_since_ms.unwrap_or(0);
                }
                HostPhase::Passed { at_ms } => out.passed_unix_ms = *at_ms,
                HostPhase::Failed { why }
                | HostPhase::Unhealthy { why }
                | HostPhase::Skipped { why }
                | HostPhase::RevertFailed { why } => out.why = why.clone(),
                HostPhase::Offline { .. } => {
                    out.why = "not connected when its wave came, for host_timeout".into()
                }
                _ => {}
            }
            out
        })
        .collect();
    let p = &r.policy;
    v1::FleetReleaseInfo {
        id: r.id.clone(),
        app: f.app.clone(),
        version: r.version.clone(),
        state: r.phase.as_str().to_string(),
        why,
        wave: wave as u32,
        waves: r.waves as u32,
        deadline_unix_ms: deadline,
        requested_by: f.requested_by.clone(),
        created_unix_ms: f.created_unix_ms,
        finished_unix_ms: f.finished_unix_ms,
        migration_host: r
            .hosts
            .iter()
            .find(|h| h.migrates)
            .map(|h| h.host.clone())
            .unwrap_or_default(),
        migration_ran: r.migration_ran,
        hosts,
        history: f
            .history
            .iter()
            .map(|e| v1::ReleaseHistoryEntry {
                at_unix_ms: e.at_unix_ms,
                by: e.by.clone(),
                what: e.what.clone(),
            })
            .collect(),
        waves_text: f.waves_text.clone(),
        canary: f.canary.clone(),
        max_parallel: p.max_parallel,
        min_healthy_ms: p.min_healthy_ms,
        progress_deadline_ms: p.progress_deadline_ms,
        host_timeout_ms: p.host_timeout_ms,
        on_failure: match p.on_failure {
            OnFailure::Halt => "halt",
            OnFailure::Revert => "revert",
        }
        .to_string(),
        max_failures: match p.max_failures {
            Budget::Hosts(n) => n.to_string(),
            Budget::Percent(n) => format!("{n}%"),
        },
        skip_offline: p.skip_offline,
        dry_run,
        scheduled: None,
    }
}
