//! Which backup records a host may report, pure: a `backup.catalog` or `backup.verification`
//! is kept only when it comes from a host the controller sent a job of a fitting kind for
//! that target. Without this rule any enrolled host could write another host's catalog (or a
//! passed validation) and make a target look backed up and verified.
//!
//! The rule, for an event sent with host H's certificate, naming target T and job J:
//! - J is a job this controller created, and H is one of its targets whose turn came (its
//!   command was dispatched to H);
//! - J works on T: a backup, restore, prune or verify job of T, or a deploy whose spec's
//!   `pre_deploy_backup` is T (a catalog only); a verification only from a verify job of T;
//! - the records inside agree: every backup of a catalog is of T, a verification is of T and
//!   of J. (The host a record names is not trusted: the controller records H.)
//!
//! The hosts a job runs on are the controller's choice (the target's `host` or `labels`, an
//! operator's `--host`, the host holding the backup for a restore or validation), so "the host
//! the target runs on" is the host the job was dispatched to: a host cannot get a job sent to
//! itself. `sessions.rs` applies it before storing; a refused record is logged and not kept, and its
//! event is still acknowledged (the agent's outbox must not resend it forever).

use std::fmt;

use drover_model::backup::catalog::{Backup, Verification};

use crate::jobs::{JobCommand, JobKind, JobRecord};

/// The longest excerpt of a name a refusal (and its log line) quotes.
pub const EXCERPT_CHARS: usize = 64;

/// Which record an event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Catalog,
    Verification,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Catalog => "backup.catalog",
            RecordKind::Verification => "backup.verification",
        }
    }
}

/// Why a record was not kept. Names are excerpts (at most [`EXCERPT_CHARS`], quoted), never
/// the record's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The event names no target.
    NoTarget,
    /// The event carries no job id.
    NoJob,
    /// No job with this id was ever created here.
    UnknownJob { job: String },
    /// The job exists but was never sent to this host.
    NotSentToHost { job: String, host: String },
    /// The job's kind does not produce this record (a rollback's catalog, a backup's
    /// validation).
    WrongKind {
        job: String,
        kind: JobKind,
        record: RecordKind,
    },
    /// The job works on another target.
    WrongTarget {
        job: String,
        job_target: String,
        claimed: String,
    },
    /// A record inside disagrees with the event (a backup of another target, a verification
    /// of another job).
    Inconsistent { what: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoTarget => write!(f, "the event names no target"),
            Refusal::NoJob => write!(
                f,
                "the event carries no job id; backup records are kept only from jobs the controller sent"
            ),
            Refusal::UnknownJob { job } => {
                write!(f, "job {job} was never created by this controller")
            }
            Refusal::NotSentToHost { job, host } => {
                write!(f, "job {job} was not sent to host {host}")
            }
            Refusal::WrongKind { job, kind, record } => write!(
                f,
                "job {job} is a {} job, which does not report {}",
                kind.as_str(),
                record.as_str()
            ),
            Refusal::WrongTarget {
                job,
                job_target,
                claimed,
            } => write!(f, "job {job} works on target {job_target}, not {claimed}"),
            Refusal::Inconsistent { what } => write!(f, "{what}"),
        }
    }
}

/// `text` quoted, at most [`EXCERPT_CHARS`] characters, control characters escaped: safe to
/// put in a log line or an error.
pub fn excerpt(text: &str) -> String {
    let mut cut: String = text.chars().take(EXCERPT_CHARS).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

/// The target a job works on: a backup job's own, a deploy's pre-deploy backup target (read
/// from the TOML it carries, else its spec). `None` when the job works on no target.
fn job_target(job: &JobRecord) -> Option<String> {
    let toml_text = match &job.command {
        JobCommand::Backup { target_toml, .. }
        | JobCommand::Restore { target_toml, .. }
        | JobCommand::Prune { target_toml, .. }
        | JobCommand::Verify { target_toml, .. } => target_toml,
        JobCommand::Deploy {
            skip_backup: true, ..
        }
        | JobCommand::Rollback { .. }
        | JobCommand::Pull { .. }
        | JobCommand::Retire { .. } => {
            return None;
        }
        JobCommand::Deploy {
            backup_target_toml,
            spec_toml,
            ..
        } if backup_target_toml.trim().is_empty() => {
            // No target attached (an older controller): the agent takes the spec's own
            // `[[backups]]` entry named by `pre_deploy_backup`.
            return string_key(spec_toml, "pre_deploy_backup");
        }
        JobCommand::Deploy {
            backup_target_toml, ..
        } => backup_target_toml,
    };
    if job.kind.is_backup() {
        // The job's own record of its target wins over what the TOML says.
        Some(job.app.clone())
    } else {
        string_key(toml_text, "name")
    }
}

/// A top-level string key of a TOML document, when set and not empty.
fn string_key(toml_text: &str, key: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(toml_text).ok()?;
    table
        .get(key)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Whether `host` may report `record` of `target` under job `job_id`; `job` is the stored
/// job with that id, if any.
pub fn check_job(
    record: RecordKind,
    host: &str,
    job_id: &str,
    target: &str,
    job: Option<&JobRecord>,
) -> Result<(), Refusal> {
    if target.is_empty() {
        return Err(Refusal::NoTarget);
    }
    if job_id.is_empty() {
        return Err(Refusal::NoJob);
    }
    let Some(job) = job.filter(|j| j.id == job_id) else {
        return Err(Refusal::UnknownJob {
            job: excerpt(job_id),
        });
    };
    let sent = job.targets.iter().any(|t| t.host == host && t.dispatched);
    if !sent {
        return Err(Refusal::NotSentToHost {
            job: excerpt(job_id),
            host: excerpt(host),
        });
    }
    let fits = match record {
        RecordKind::Catalog => job.kind.is_backup() || job.kind == JobKind::Deploy,
        RecordKind::Verification => job.kind == JobKind::Verify,
    };
    let worked_on = job_target(job).filter(|_| fits);
    let Some(job_target) = worked_on else {
        return Err(Refusal::WrongKind {
            job: excerpt(job_id),
            kind: job.kind,
            record,
        });
    };
    if job_target != target {
        return Err(Refusal::WrongTarget {
            job: excerpt(job_id),
            job_target: excerpt(&job_target),
            claimed: excerpt(target),
        });
    }
    Ok(())
}

/// Whether `host` may report `backups` as its catalog of `target` under `job_id`.
pub fn check_catalog(
    host: &str,
    job_id: &str,
    target: &str,
    backups: &[Backup],
    job: Option<&JobRecord>,
) -> Result<(), Refusal> {
    check_job(RecordKind::Catalog, host, job_id, target, job)?;
    if let Some(other) = backups.iter().find(|b| b.target != target) {
        return Err(Refusal::Inconsistent {
            what: format!(
                "the catalog of {} holds backup {} of target {}",
                excerpt(target),
                excerpt(&other.id),
                excerpt(&other.target)
            ),
        });
    }
    Ok(())
}

/// Whether `host` may report `verification` (its event naming `target`) under `job_id`.
pub fn check_verification(
    host: &str,
    job_id: &str,
    target: &str,
    verification: &Verification,
    job: Option<&JobRecord>,
) -> Result<(), Refusal> {
    // The event's `target` field, else the record's own.
    let target = if target.is_empty() {
        verification.target.as_str()
    } else {
        target
    };
    check_job(RecordKind::Verification, host, job_id, target, job)?;
    if verification.target != target {
        return Err(Refusal::Inconsistent {
            what: format!(
                "the event names target {} but its verification is of {}",
                excerpt(target),
                excerpt(&verification.target)
            ),
        });
    }
    if verification.job_id != job_id {
        return Err(Refusal::Inconsistent {
            what: format!(
                "the verification says job {}, the event job {}",
                excerpt(&verification.job_id),
                excerpt(job_id)
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use drover_model::backup::catalog::Trigger;

    use super::*;
    use crate::jobs::TargetState;

    const PINNED: &str = "name = \"shop-db\"\nhost = \"web-1\"\n[postgres]\ncontainer = \"db\"\ndatabases = [\"shop\"]\n";
    const UNPINNED: &str =
        "name = \"shop-db\"\n[postgres]\ncontainer = \"db\"\ndatabases = [\"shop\"]\n";

    fn command(kind: JobKind, target_toml: &str) -> JobCommand {
        let (target, target_toml, requested_by) = (
            "shop-db".to_string(),
            target_toml.to_string(),
            "ops".to_string(),
        );
        match kind {
            JobKind::Backup => JobCommand::Backup {
                target,
                target_toml,
                trigger: "manual".into(),
                requested_by,
            },
            JobKind::Restore => JobCommand::Restore {
                target,
                target_toml,
                backup_id: "b".into(),
                part: String::new(),
                to_database: "x".into(),
                to_dir: String::new(),
                confirmed: false,
                identity_file: String::new(),
                requested_by,
            },
            JobKind::Prune => JobCommand::Prune {
                target,
                target_toml,
                dry_run: false,
                requested_by,
            },
            JobKind::Verify => JobCommand::Verify {
                target,
                target_toml,
                requested_by,
                identity_file: String::new(),
            },
            JobKind::Deploy => JobCommand::Deploy {
                app: "shop".into(),
                version: "v2".into(),
                spec_toml: String::new(),
                spec_revision: 1,
                skip_backup: false,
                wait_lock: false,
                requested_by,
                backup_target_toml: target_toml,
                skip_migration: false,
                keep_previous: false,
            },
            JobKind::Rollback => JobCommand::Rollback {
                app: "shop".into(),
                to_version: String::new(),
                wait_lock: false,
                requested_by,
            },
            JobKind::Pull => JobCommand::Pull {
                app: "shop".into(),
                version: "v2".into(),
                spec_toml: String::new(),
                requested_by,
            },
            JobKind::Retire => JobCommand::Retire {
                app: "shop".into(),
                requested_by,
            },
        }
    }

    /// Job `j1` of `kind` on `hosts` (the first dispatched).
    fn job(kind: JobKind, target_toml: &str, hosts: &[&str]) -> JobRecord {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        JobRecord::new("j1".into(), 1, command(kind, target_toml), &hosts)
    }

    /// A deploy job on web-1 with no target attached and `spec_toml` as its spec.
    fn deploy_with_spec(spec_toml: &str, skip_backup: bool) -> JobRecord {
        let mut j = job(JobKind::Deploy, "", &["web-1"]);
        if let JobCommand::Deploy {
            spec_toml: spec,
            skip_backup: skip,
            ..
        } = &mut j.command
        {
            *spec = spec_toml.to_string();
            *skip = skip_backup;
        }
        j
    }

    fn backup(target: &str, host: &str) -> Backup {
        Backup {
            id: format!("{target}-1"),
            target: target.into(),
            host: host.into(),
            kind: "postgres".into(),
            trigger: Trigger::Manual,
            job_id: "j1".into(),
            requested_by: "ops".into(),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            parts: vec![],
            compression: "zstd-3".into(),
            recipients: vec![],
            release: String::new(),
            local_dir: "/b".into(),
            remote: String::new(),
            verified_unix_ms: 0,
            local_corrupt: String::new(),
            extra: BTreeMap::new(),
        }
    }

    fn verification(target: &str, job_id: &str) -> Verification {
        Verification {
            job_id: job_id.into(),
            target: target.into(),
            host: String::new(),
            backup_id: format!("{target}-1"),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            checks: vec![],
            copy: String::new(),
            local_corrupt: String::new(),
        }
    }

    #[test]
    fn who_may_report_what() {
        use RecordKind::{Catalog, Verification as Ver};
        let mut second_turn = job(JobKind::Backup, UNPINNED, &["web-1", "web-2"]);
        let second_done = {
            let mut j = second_turn.clone();
            j.targets[0].state = TargetState::Succeeded;
            j.targets[1].dispatched = true;
            j
        };
        second_turn.targets[0].state = TargetState::Running;
        /// (case, record, host, job id, target, stored job, Ok or a piece of the refusal)
        type Case = (
            &'static str,
            RecordKind,
            &'static str,
            &'static str,
            &'static str,
            Option<JobRecord>,
            Result<(), &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "the genuine backup",
                Catalog,
                "web-1",
                "j1",
                "shop-db",
                Some(job(JobKind::Backup, PINNED, &["web-1"])),
                Ok(()),
            ),
            (
                "another host, the target pinned to web-1",
                Catalog,
                "web-2",
                "j1",
                "shop-db",
                Some(job(JobKind::Backup, PINNED, &["web-1"])),
                Err("not sent to host"),
            ),
            (
                "a pinned target run elsewhere by the controller (--host): where it was sent",
                Catalog,
                "web-2",
                "j1",
                "shop-db",
                Some(job(JobKind::Backup, PINNED, &["web-2"])),
                Ok(()),
            ),
            (
                "no job id",
                Catalog,
                "web-1",
                "",
                "shop-db",
                None,
                Err("no job id"),
            ),
            (
                "a job never created",
                Catalog,
                "web-1",
                "backup-forged",
                "shop-db",
                None,
                Err("never created"),
            ),
            (
                "the stored job has another id",
                Catalog,
                "web-1",
                "j2",
                "shop-db",
                Some(job(JobKind::Backup, PINNED, &["web-1"])),
                Err("never created"),
            ),
            (
                "no target",
                Catalog,
                "web-1",
                "j1",
                "",
                Some(job(JobKind::Backup, PINNED, &["web-1"])),
                Err("names no target"),
            ),
            (
                "a job of another target",
                Catalog,
                "web-1",
                "j1",
                "crm-db",
                Some(job(JobKind::Backup, PINNED, &["web-1"])),
                Err("works on target \"shop-db\", not \"crm-db\""),
            ),
            (
                "restore (emergency backups) and prune report catalogs",
                Catalog,
                "web-1",
                "j1",
                "shop-db",
                Some(job(JobKind::Restore, PINNED, &["web-1"])),
                Ok(()),
            ),
            (
                "prune",
                Catalog,
                "web-1",
                "j1",
                "shop-db",
                Some(job(JobKind::Prune, UNPINNED, &["web-1"])),
                Ok(()),
            ),
            (
                "a deploy with a pre-deploy backup of the target",
                Catalog,
                "web-1",
                "j1",
                "shop-db",
                Some(job(JobKind::Deploy, PINNED, &["web-1"])),
                Ok(()),
            ),
            (
                "a deploy without a pre-deploy backup",
                Catalog,
                "web-1",
                "j1",
                "shop-db",
                Some(job(JobKind::Deploy, "", &["web-1"])),
                Err("deploy job"),
            ),
            (
                "a deploy of a spec naming the target, none attached",
                Catalog,
                "web-1",
                "j1",
                "shop-db",
                Some(deploy_with_spec("pre_deploy_backup = \"shop-db\"\n", false)),
                Ok(()),
            ),
            (
                "a deploy with --skip-backup",
                Catalog,
                "web-1",
                "j1",
                "shop-db",
                Some(deploy_with_spec("pre_deploy_backup = \"shop-db\"\n", true)),
                Err("deploy job"),
            ),
            (
                "a rollback never reports a catalog",
                Catalog,
                "web-1",
                "j1",
                "shop-db",
                Some(job(JobKind::Rollback, "", &["web-1"])),
                Err("rollback job"),
            ),
            (
                "a host whose turn has not come",
                Catalog,
                "web-2",
                "j1",
                "shop-db",
                Some(second_turn),
                Err("not sent to host \"web-2\""),
            ),
            (
                "a host whose turn came, target not pinned",
                Catalog,
                "web-2",
                "j1",
                "shop-db",
                Some(second_done),
                Ok(()),
            ),
            (
                "the genuine validation",
                Ver,
                "web-1",
                "j1",
                "shop-db",
                Some(job(JobKind::Verify, PINNED, &["web-1"])),
                Ok(()),
            ),
            (
                "a validation from another host",
                Ver,
                "web-2",
                "j1",
                "shop-db",
                Some(job(JobKind::Verify, PINNED, &["web-1"])),
                Err("not sent to host"),
            ),
            (
                "a validation under a backup job",
                Ver,
                "web-1",
                "j1",
                "shop-db",
                Some(job(JobKind::Backup, PINNED, &["web-1"])),
                Err("backup job, which does not report backup.verification"),
            ),
        ];
        for (name, record, host, job_id, target, stored, want) in cases {
            let got = check_job(record, host, job_id, target, stored.as_ref());
            match (want, got) {
                (Ok(()), Ok(())) => {}
                (Err(wanted), Err(refusal)) => {
                    let text = refusal.to_string();
                    assert!(text.contains(wanted), "{name}: {text} (wanted {wanted})");
                }
                (want, got) => panic!("{name}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn the_records_inside_must_agree_with_the_event() {
        let stored = job(JobKind::Backup, PINNED, &["web-1"]);
        let ok = [backup("shop-db", "web-1"), backup("shop-db", "")];
        assert_eq!(
            check_catalog("web-1", "j1", "shop-db", &ok, Some(&stored)),
            Ok(())
        );
        let err = check_catalog(
            "web-1",
            "j1",
            "shop-db",
            &[backup("crm-db", "web-1")],
            Some(&stored),
        )
        .unwrap_err();
        assert!(err.to_string().contains("of target \"crm-db\""), "{err}");
        // The host a backup names is not trusted either way: the controller records the sender.
        assert_eq!(
            check_catalog(
                "web-1",
                "j1",
                "shop-db",
                &[backup("shop-db", "web-9")],
                Some(&stored)
            ),
            Ok(())
        );

        let verify = job(JobKind::Verify, PINNED, &["web-1"]);
        let v = verification("shop-db", "j1");
        assert_eq!(
            check_verification("web-1", "j1", "shop-db", &v, Some(&verify)),
            Ok(())
        );
        // The record's own target stands in for a missing field.
        assert_eq!(
            check_verification("web-1", "j1", "", &v, Some(&verify)),
            Ok(())
        );
        let err = check_verification(
            "web-1",
            "j1",
            "shop-db",
            &verification("crm-db", "j1"),
            Some(&verify),
        )
        .unwrap_err();
        assert!(err.to_string().contains("is of \"crm-db\""), "{err}");
        let err = check_verification(
            "web-1",
            "j1",
            "shop-db",
            &verification("shop-db", "verify-other"),
            Some(&verify),
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"verify-other\""), "{err}");
    }

    #[test]
    fn refusals_quote_bounded_excerpts() {
        let long = "x".repeat(10_000);
        let err = check_job(RecordKind::Catalog, "web-1", &long, "shop-db", None).unwrap_err();
        let text = err.to_string();
        assert!(text.len() < 200, "{text}");
        assert!(text.contains('…'), "{text}");
        assert_eq!(excerpt("a\nb"), "\"a\\nb\"");
    }
}
