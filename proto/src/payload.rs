//! Conversions between `drover-model`'s event payloads ([`Payload`]) and their wire messages,
//! in one place for both sides: the agent sends them, the controller reads them and sends them
//! on to `drover watch`, and the CLI shows them.

use drover_model::backup::catalog::{
    Backup, Check, CheckResult, Part, PruneLine, Table, Trigger, Verification,
};
use drover_model::jobevent::{JobResult, Payload, Release, ReleaseState};

use crate::v1;
use crate::v1::job_event::Payload as Wire;

/// A payload whose enumerated field holds a name this side does not know.
#[derive(Debug, thiserror::Error)]
#[error("{record} {id}: {field} {value:?} is not one this controller knows (upgrade it)")]
pub struct PayloadError {
    pub record: &'static str,
    pub id: String,
    pub field: &'static str,
    pub value: String,
}

pub fn to_proto(payload: &Payload) -> Wire {
    match payload {
        Payload::Releases { app, releases } => Wire::Releases(v1::ReleaseTable {
            app: app.clone(),
            releases: releases.iter().map(release_to_proto).collect(),
        }),
        Payload::Catalog { target, backups } => Wire::Catalog(v1::BackupCatalog {
            target: target.clone(),
            backups: backups.iter().map(backup_to_proto).collect(),
        }),
        Payload::Verification(v) => Wire::Verification(verification_to_proto(v)),
        Payload::Prune(lines) => Wire::Prune(v1::PruneReport {
            lines: lines
                .iter()
                .map(|l| v1::PruneLineInfo {
                    id: l.id.clone(),
                    copy: l.copy.clone(),
                    keep: l.keep,
                    reasons: l.reasons.clone(),
                    ..Default::default()
                })
                .collect(),
        }),
    }
}

pub fn from_proto(wire: Wire) -> Result<Payload, PayloadError> {
    Ok(match wire {
        Wire::Releases(t) => Payload::Releases {
            app: t.app,
            releases: t
                .releases
                .into_iter()
                .map(release_from_proto)
                .collect::<Result<_, _>>()?,
        },
        Wire::Catalog(c) => Payload::Catalog {
            target: c.target,
            backups: c.backups.into_iter().map(backup_from_proto).collect(),
        },
        Wire::Verification(v) => Payload::Verification(Box::new(verification_from_proto(v)?)),
        Wire::Prune(p) => Payload::Prune(
            p.lines
                .into_iter()
                .map(|l| PruneLine {
                    id: l.id,
                    copy: l.copy,
                    keep: l.keep,
                    reasons: l.reasons,
                })
                .collect(),
        ),
    })
}

fn release_to_proto(r: &Release) -> v1::ReleaseRecord {
    v1::ReleaseRecord {
        id: r.id.clone(),
        app: r.app.clone(),
        version: r.version.clone(),
        image: r.image.clone(),
        image_id: r.image_id.clone(),
        job_id: r.job_id.clone(),
        requested_by: r.requested_by.clone(),
        started_unix_ms: r.started_unix_ms,
        finished_unix_ms: r.finished_unix_ms,
        result: r.result.map(|x| x.as_str().to_string()).unwrap_or_default(),
        state: r.state.as_str().to_string(),
        spec_toml: r.spec_toml.clone(),
        containers: r.containers.clone().into_iter().collect(),
    }
}

fn release_from_proto(r: v1::ReleaseRecord) -> Result<Release, PayloadError> {
    let unknown = |field: &'static str, value: &str| PayloadError {
        record: "release",
        id: r.id.clone(),
        field,
        value: value.to_string(),
    };
    let result = match r.result.as_str() {
        "" => None,
        s => Some(JobResult::parse(s).ok_or_else(|| unknown("result", s))?),
    };
    let state = ReleaseState::parse(&r.state).ok_or_else(|| unknown("state", &r.state))?;
    Ok(Release {
        result,
        state,
        containers: r.containers.into_iter().collect(),
        id: r.id,
        app: r.app,
        version: r.version,
        image: r.image,
        image_id: r.image_id,
        job_id: r.job_id,
        requested_by: r.requested_by,
        started_unix_ms: r.started_unix_ms,
        finished_unix_ms: r.finished_unix_ms,
        spec_toml: r.spec_toml,
    })
}

fn backup_to_proto(b: &Backup) -> v1::BackupRecord {
    v1::BackupRecord {
        id: b.id.clone(),
        target: b.target.clone(),
        host: b.host.clone(),
        kind: b.kind.clone(),
        trigger: b.trigger.as_str().to_string(),
        job_id: b.job_id.clone(),
        requested_by: b.requested_by.clone(),
        started_unix_ms: b.started_unix_ms,
        finished_unix_ms: b.finished_unix_ms,
        parts: b
            .parts
            .iter()
            .map(|p| v1::BackupPart {
                name: p.name.clone(),
                file: p.file.clone(),
                size: p.size,
                sha256: p.sha256.clone(),
                source_bytes: p.source_bytes,
                pg_dump_version: p.pg_dump_version.clone(),
                server_version: p.server_version.clone(),
                tables: p
                    .tables
                    .iter()
                    .map(|t| v1::TableEstimate {
                        schema: t.schema.clone(),
                        name: t.name.clone(),
                        rows: t.rows,
                    })
                    .collect(),
            })
            .collect(),
        compression: b.compression.clone(),
        recipients: b.recipients.clone(),
        release: b.release.clone(),
        local_dir: b.local_dir.clone(),
        remote: b.remote.clone(),
        verified_unix_ms: b.verified_unix_ms,
        local_corrupt: b.local_corrupt.clone(),
        extra: b.extra.clone().into_iter().collect(),
    }
}

/// Backups read whatever trigger they name: an unknown one is `manual`, as in the catalog.
fn backup_from_proto(b: v1::BackupRecord) -> Backup {
    Backup {
        trigger: Trigger::parse(&b.trigger),
        parts: b
            .parts
            .into_iter()
            .map(|p| Part {
                name: p.name,
                file: p.file,
                size: p.size,
                sha256: p.sha256,
                source_bytes: p.source_bytes,
                pg_dump_version: p.pg_dump_version,
                server_version: p.server_version,
                tables: p
                    .tables
                    .into_iter()
                    .map(|t| Table {
                        schema: t.schema,
                        name: t.name,
                        rows: t.rows,
                    })
                    .collect(),
            })
            .collect(),
        extra: b.extra.into_iter().collect(),
        id: b.id,
        target: b.target,
        host: b.host,
        kind: b.kind,
        job_id: b.job_id,
        requested_by: b.requested_by,
        started_unix_ms: b.started_unix_ms,
        finished_unix_ms: b.finished_unix_ms,
        compression: b.compression,
        recipients: b.recipients,
        release: b.release,
        local_dir: b.local_dir,
        remote: b.remote,
        verified_unix_ms: b.verified_unix_ms,
        local_corrupt: b.local_corrupt,
    }
}

/// The wire form of a validation, as the agent reports it and `drover backup verifications`
/// lists it.
pub fn verification_to_proto(v: &Verification) -> v1::VerificationInfo {
    v1::VerificationInfo {
        job_id: v.job_id.clone(),
        target: v.target.clone(),
        host: v.host.clone(),
        backup_id: v.backup_id.clone(),
        started_unix_ms: v.started_unix_ms,
        finished_unix_ms: v.finished_unix_ms,
        passed: v.passed(),
        checks: v
            .checks
            .iter()
            .map(|c| v1::VerificationCheck {
                name: c.name.clone(),
                result: c.result.as_str().to_string(),
                message: c.message.clone(),
                duration_ms: c.duration_ms,
                evidence: c.evidence.clone().into_iter().collect(),
            })
            .collect(),
        copy: v.copy.clone(),
        local_corrupt: v.local_corrupt.clone(),
    }
}

/// `passed` is not read: it follows from the checks ([`Verification::passed`]).
fn verification_from_proto(v: v1::VerificationInfo) -> Result<Verification, PayloadError> {
    let checks = v
        .checks
        .into_iter()
        .map(|c| {
            let result = CheckResult::parse(&c.result).ok_or_else(|| PayloadError {
                record: "verification",
                id: v.job_id.clone(),
                field: "check result",
                value: c.result.clone(),
            })?;
            Ok(Check {
                name: c.name,
                result,
                message: c.message,
                duration_ms: c.duration_ms,
                evidence: c.evidence.into_iter().collect(),
            })
        })
        .collect::<Result<_, PayloadError>>()?;
    Ok(Verification {
        checks,
        job_id: v.job_id,
        target: v.target,
        host: v.host,
        backup_id: v.backup_id,
        started_unix_ms: v.started_unix_ms,
        finished_unix_ms: v.finished_unix_ms,
        copy: v.copy,
        local_corrupt: v.local_corrupt,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn backup() -> Backup {
        Backup {
            id: "db-20261202-120000-00ab".into(),
            target: "db".into(),
            host: "web-1".into(),
            kind: "postgres".into(),
            trigger: Trigger::PreDeploy,
            job_id: "backup-1".into(),
            requested_by: "alice".into(),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            parts: vec![Part {
                name: "app".into(),
                file: "app.dump.zst.age".into(),
                size: 3,
                sha256: "ab".repeat(32),
                source_bytes: 4,
                pg_dump_version: "pg_dump (PostgreSQL) 17.2".into(),
                server_version: "17.2".into(),
                tables: vec![Table {
                    schema: "public".into(),
                    name: "orders".into(),
                    rows: 5,
                }],
            }],
            compression: "zstd-3".into(),
            recipients: vec!["age1xyz".into()],
            release: "api v1".into(),
            local_dir: "/var/lib/drover-agent/backups/db/x".into(),
            remote: "s3://b/p/db/x/".into(),
            verified_unix_ms: 6,
            local_corrupt: "sha256 mismatch".into(),
            extra: BTreeMap::from([("k".into(), "v".into())]),
        }
    }

    fn verification() -> Verification {
        Verification {
            job_id: "verify-1".into(),
            target: "db".into(),
            host: "web-1".into(),
            backup_id: "db-1".into(),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            checks: vec![Check {
                name: "restore".into(),
                result: CheckResult::Failed,
                message: "3 tables restored, 1 empty".into(),
                duration_ms: 7,
                evidence: BTreeMap::from([("tables".into(), "3".into())]),
            }],
            copy: "remote".into(),
            local_corrupt: "corrupt (sha256 mismatch)".into(),
        }
    }

    fn release(result: Option<JobResult>, state: ReleaseState) -> Release {
        Release {
            id: "deploy-1".into(),
            app: "api".into(),
            version: "v1".into(),
            image: "api:v1".into(),
            image_id: "sha256:1".into(),
            job_id: "deploy-1".into(),
            requested_by: "bob".into(),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            result,
            state,
            spec_toml: "name = \"api\"".into(),
            containers: BTreeMap::from([("web".into(), "api-web-1".into())]),
        }
    }

    #[test]
    fn every_payload_comes_back_unchanged_from_the_wire() {
        let payloads = [
            Payload::Releases {
                app: "api".into(),
                releases: vec![
                    release(None, ReleaseState::Deploying),
                    release(Some(JobResult::RolledBack), ReleaseState::Failed),
                    release(Some(JobResult::Succeeded), ReleaseState::Live),
                ],
            },
            Payload::Catalog {
                target: "db".into(),
                backups: vec![backup()],
            },
            Payload::Verification(Box::new(verification())),
            Payload::Prune(vec![PruneLine {
                id: "db-1".into(),
                copy: "local".into(),
                keep: true,
                reasons: vec!["last".into(), "daily".into()],
            }]),
        ];
        for payload in payloads {
            let back = from_proto(to_proto(&payload)).unwrap();
            assert_eq!(back, payload);
        }
    }

    #[test]
    fn an_unknown_name_in_a_record_is_refused_naming_it() {
        let mut wire = verification_to_proto(&verification());
        wire.checks[0].result = "maybe".into();
        let err = from_proto(Wire::Verification(wire)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "verification verify-1: check result \"maybe\" is not one this controller knows (upgrade it)"
        );
        let mut wire = release_to_proto(&release(None, ReleaseState::Live));
        wire.result = "exploded".into();
        let err = release_from_proto(wire).unwrap_err();
        assert_eq!(err.field, "result");
    }
}
