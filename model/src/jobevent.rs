//! The vocabulary of job events: the kinds and field names the agent writes into its outbox and
//! the controller reads back (to track jobs, stream them to `drover watch`, and keep its copy of
//! each host's releases). One definition, used by both sides.
//!
//! Every job produces, in order: `job.started`, then `job.step` (started, then done, failed or
//! skipped) and `job.progress` lines, then exactly one `job.finished`. After a job that changed
//! an app's releases, `app.releases` carries that app's whole release table on the host.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
/// An app's release table on this host: `app`, `releases` (JSON array of [`Release`]).
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

/// The fields of an `app.releases` event.
pub fn releases_fields(app: &str, releases: &[Release]) -> BTreeMap<String, String> {
    BTreeMap::from([
        (field::APP.to_string(), app.to_string()),
        (
            field::RELEASES.to_string(),
            serde_json::to_string(releases).unwrap_or_else(|_| "[]".into()),
        ),
    ])
}

/// Reads the `releases` field of an `app.releases` event.
pub fn parse_releases(fields: &BTreeMap<String, String>) -> Result<Vec<Release>, String> {
    let text = fields
        .get(field::RELEASES)
        .ok_or("app.releases event without a releases field")?;
    serde_json::from_str(text).map_err(|e| format!("app.releases: {e}"))
}
