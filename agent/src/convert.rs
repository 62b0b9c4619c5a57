//! Conversions between the agent's domain types and `drover.v1` wire messages. Nothing else in
//! the agent builds or reads prost types beyond the session loop that sends them.

use drover_proto::v1;

use crate::health::{Check, HostFacts, Status};
use crate::store::{Event, JobRecord};

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
        payload: event.payload.as_ref().map(drover_proto::payload::to_proto),
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

/// The job a controller's `Command` asks for, as this agent stores it.
pub fn job_from_command(cmd: &drover_proto::v1::Command, now_ms: i64) -> Option<JobRecord> {
    drover_proto::command::from_proto(cmd)
        .map(|c| crate::job::record_of(cmd.job_id.clone(), c, now_ms))
}
