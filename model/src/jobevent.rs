//! The vocabulary of job events: the kinds and field names the agent writes into its outbox and
//! the controller reads back (to track jobs, stream them to `drover watch`, and keep its copy of
//! each host's releases). One definition, used by both sides.
//!
//! Every job produces, in order: `job.started`, then `job.step` (started, then done, failed or
//! skipped) and `job.progress` lines, then exactly one `job.finished`. After a job that changed
//! an app's releases, `app.releases` carries that app's whole release table on the host.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backup::catalog::{self, Backup, PruneLine, Verification};

pub use crate::job::JobKind;

/// The agent took the job (stored it): `job_kind`, `app`, `version`, `requested_by`.
pub const STARTED: &str = "job.started";
/// A step changed state: `step`, `status` (`started|done|failed|skipped`), `duration_ms` once
/// it ended.
pub const STEP: &str = "job.step";
/// A line of progress within a step: `step`; the message says what happened.
pub const PROGRESS: &str = "job.progress";
/// The job ended: `result` (`succeeded|failed|rolled_back|interrupted|cancelled`), `step` (where it failed), `error`, `logs`, `code`, `duration_ms`,
/// `live_version`, `previous_version`.
pub const FINISHED: &str = "job.finished";
/// An app's release table on this host: `app`, and the table as [`Payload::Releases`].
pub const RELEASES: &str = "app.releases";

/// Field names.
pub mod field {
    pub const JOB_KIND: &str = "job_kind";
    pub const APP: &str = "app";
    pub const VERSION: &str = "version";
    pub const REQUESTED_BY: &str = "requested_by";
    pub const STEP: &str = "step";
    pub const STATUS: &str = "status";
    pub const DURATION_MS: &str = "duration_ms";
    pub const RESULT: &str = "result";
    pub const ERROR: &str = "error";
    pub const LOGS: &str = "logs";
    pub const CODE: &str = "code";
    pub const LIVE_VERSION: &str = "live_version";
    pub const PREVIOUS_VERSION: &str = "previous_version";
    /// Legacy: the JSON array agents before typed payloads sent (see [`super::legacy_payload`]).
    pub const RELEASES: &str = "releases";
    /// `job.progress` of the `switch` step: when the new release first answered healthy.
    pub const HEALTHY_AT_MS: &str = "healthy_at_unix_ms";
}

/// Step states in `job.step`.
pub mod status {
    pub const STARTED: &str = "started";
    pub const DONE: &str = "done";
    pub const FAILED: &str = "failed";
    pub const SKIPPED: &str = "skipped";
}

/// `code` of a job refused because another job holds the app's lock on the host.
pub const CODE_LOCKED: &str = "locked";

/// The UTC time of `now_ms` as it appears in job and backup ids: `20261123-142233`, so ids
/// sort by time.
pub fn id_stamp(now_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms.max(0) as u64);
    // "2026-11-23T14:22:33Z" -> "20261123-142233"
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .map(|c| if c == 'T' { '-' } else { c })
        .collect()
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobResult {
    Succeeded,
    /// Failed before traffic moved: the old release serves untouched.
    Failed,
    /// The watch window tripped and traffic went back to the old release.
    RolledBack,
    /// The agent stopped (crash, kill) during the job; on restart it converged to one serving
    /// release and reported what it did.
    Interrupted,
    /// An operator cancelled it (`drover cancel`): it stopped at a safe point and undid what
    /// it made (a deploy before the switch; in the watch window it switched back).
    Cancelled,
}

impl JobResult {
    pub fn as_str(self) -> &'static str {
        match self {
            JobResult::Succeeded => "succeeded",
            JobResult::Failed => "failed",
            JobResult::RolledBack => "rolled_back",
            JobResult::Interrupted => "interrupted",
            JobResult::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobResult> {
        Some(match s {
            "succeeded" => JobResult::Succeeded,
            "failed" => JobResult::Failed,
            "rolled_back" => JobResult::RolledBack,
            "interrupted" => JobResult::Interrupted,
            "cancelled" => JobResult::Cancelled,
            _ => return None,
        })
    }
}

/// Where a release stands on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    /// Being deployed now.
    Deploying,
    /// Serving.
    Live,
    /// Stopped, containers kept: a rollback starts them again.
    Kept,
    /// Pruned: containers removed; a rollback recreates them from `image_id` if it is present.
    Removed,
    /// Never went live (or went live and was switched back); its containers were removed.
    Failed,
}

impl ReleaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseState::Deploying => "deploying",
            ReleaseState::Live => "live",
            ReleaseState::Kept => "kept",
            ReleaseState::Removed => "removed",
            ReleaseState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<ReleaseState> {
        Some(match s {
            "deploying" => ReleaseState::Deploying,
            "live" => ReleaseState::Live,
            "kept" => ReleaseState::Kept,
            "removed" => ReleaseState::Removed,
            "failed" => ReleaseState::Failed,
            _ => return None,
        })
    }
}

/// One deploy of an app on one host, as the agent records it and reports it in `app.releases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Unique per host: the deploy job's id.
    pub id: String,
    pub app: String,
    pub version: String,
    /// `repository:tag` as deployed.
    pub image: String,
    /// The image ID (`sha256:...`) the tag resolved to; empty until the image step ran.
    pub image_id: String,
    pub job_id: String,
    pub requested_by: String,
    pub started_unix_ms: i64,
    /// 0 while the deploy runs.
    pub finished_unix_ms: i64,
    /// `None` while the deploy runs.
    pub result: Option<JobResult>,
    pub state: ReleaseState,
    /// The spec (TOML) it was deployed with: a rollback recreates its containers from it.
    pub spec_toml: String,
    /// Container names by role (`web`, or a worker's name).
    pub containers: BTreeMap<String, String>,
}

impl Release {
    pub fn duration_ms(&self) -> i64 {
        if self.finished_unix_ms > 0 {
            self.finished_unix_ms - self.started_unix_ms
        } else {
            0
        }
    }
}

/// The typed record an event carries beside its scalar `fields`. Events whose kind carries
/// one: `app.releases`, `backup.catalog`, `backup.verification`, and `job.finished` of a prune.
/// Field maps hold only scalars (names, states, numbers); records travel as records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// `app.releases`: the app's whole release table on the host.
    Releases { app: String, releases: Vec<Release> },
    /// `backup.catalog`: the target's whole catalog on the host.
    Catalog {
        target: String,
        backups: Vec<Backup>,
    },
    /// `backup.verification`: one validation of the target's newest backup.
    Verification(Box<Verification>),
    /// `job.finished` of a prune: what it deleted or kept, and why.
    Prune(Vec<PruneLine>),
}

impl Payload {
    /// The scalar fields that say what the payload is about, sent beside it: `app` of a
    /// release table, `target` of a catalog or a validation. None for a prune's lines, which
    /// ride on `job.finished` with that event's own fields.
    pub fn fields(&self) -> BTreeMap<String, String> {
        match self {
            Payload::Releases { app, .. } => {
                BTreeMap::from([(field::APP.to_string(), app.clone())])
            }
            Payload::Catalog { target, .. } => {
                BTreeMap::from([(catalog::field::TARGET.to_string(), target.clone())])
            }
            Payload::Verification(v) => {
                BTreeMap::from([(catalog::field::TARGET.to_string(), v.target.clone())])
            }
            Payload::Prune(_) => BTreeMap::new(),
        }
    }

    /// The kind of event that carries this payload (a prune's lines ride on `job.finished`).
    pub fn event_kind(&self) -> &'static str {
        match self {
            Payload::Releases { .. } => RELEASES,
            Payload::Catalog { .. } => catalog::CATALOG,
            Payload::Verification(_) => catalog::VERIFICATION,
            Payload::Prune(_) => FINISHED,
        }
    }
}

/// A record an agent from before typed payloads sent as JSON in a field, which did not read.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {field} does not read: {reason}")]
pub struct LegacyPayloadError {
    pub kind: String,
    pub field: &'static str,
    pub reason: String,
}

/// Agents before typed payloads sent the record as JSON inside `fields` (`releases`,
/// `backups`, `verification`, `prune`); their outboxes may still hold such events. Takes that
/// field out of `fields` and returns it as a [`Payload`]; `Ok(None)` when the event carries
/// none. Nothing writes this form any more.
pub fn legacy_payload(
    kind: &str,
    fields: &mut BTreeMap<String, String>,
) -> Result<Option<Payload>, LegacyPayloadError> {
    fn take<T: serde::de::DeserializeOwned>(
        kind: &str,
        fields: &mut BTreeMap<String, String>,
        field: &'static str,
    ) -> Result<Option<T>, LegacyPayloadError> {
        let Some(text) = fields.remove(field) else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| LegacyPayloadError {
                kind: kind.to_string(),
                field,
                reason: e.to_string(),
            })
    }
    let app_or_target = |fields: &BTreeMap<String, String>, name: &str| {
        fields.get(name).cloned().unwrap_or_default()
    };
    Ok(match kind {
        RELEASES => take(kind, fields, field::RELEASES)?.map(|releases| Payload::Releases {
            app: app_or_target(fields, field::APP),
            releases,
        }),
        catalog::CATALOG => {
            take(kind, fields, catalog::field::BACKUPS)?.map(|backups| Payload::Catalog {
                target: app_or_target(fields, catalog::field::TARGET),
                backups,
            })
        }
        catalog::VERIFICATION => take(kind, fields, catalog::field::VERIFICATION)?
            .map(|v| Payload::Verification(Box::new(v))),
        FINISHED => take(kind, fields, catalog::field::PRUNE)?.map(Payload::Prune),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str) -> Release {
        Release {
            id: format!("deploy-{version}"),
            app: "api".into(),
            version: version.into(),
            image: format!("api:{version}"),
            image_id: "sha256:abc".into(),
            job_id: format!("deploy-{version}"),
            requested_by: "ops".into(),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            result: Some(JobResult::Succeeded),
            state: ReleaseState::Live,
            spec_toml: "name = \"api\"".into(),
            containers: BTreeMap::from([("web".into(), "api-web-1".into())]),
        }
    }

    #[test]
    fn a_legacy_release_table_reads_and_leaves_only_scalars() {
        let table = vec![release("v1")];
        let mut fields = BTreeMap::from([
            (field::APP.to_string(), "api".to_string()),
            (
                field::RELEASES.to_string(),
                serde_json::to_string(&table).unwrap(),
            ),
        ]);
        let payload = legacy_payload(RELEASES, &mut fields).unwrap();
        assert_eq!(
            payload,
            Some(Payload::Releases {
                app: "api".into(),
                releases: table
            })
        );
        assert_eq!(fields.keys().collect::<Vec<_>>(), ["app"]);
    }

    #[test]
    fn a_legacy_record_that_does_not_read_names_the_kind_and_field() {
        let mut fields =
            BTreeMap::from([(catalog::field::BACKUPS.to_string(), "[{\"id\":".to_string())]);
        let err = legacy_payload(catalog::CATALOG, &mut fields).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("backup.catalog: backups does not read: "),
            "{err}"
        );
        // An event of another kind, or without the field, carries none.
        let mut plain = BTreeMap::from([(field::STEP.to_string(), "image".to_string())]);
        assert_eq!(legacy_payload(STEP, &mut plain).unwrap(), None);
        assert_eq!(
            legacy_payload(RELEASES, &mut BTreeMap::new()).unwrap(),
            None
        );
    }

    #[test]
    fn state_names_read_back() {
        for s in [
            ReleaseState::Deploying,
            ReleaseState::Live,
            ReleaseState::Kept,
            ReleaseState::Removed,
            ReleaseState::Failed,
        ] {
            assert_eq!(ReleaseState::parse(s.as_str()), Some(s));
        }
        assert_eq!(ReleaseState::parse("gone"), None);
    }
}
