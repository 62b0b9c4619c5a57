//! A fleet release as the controller stores it: the engine's state and what the driver keeps
//! around it (the app, who asked, every operator action and milestone with its time), and the
//! pure rules at its edges: an operator's options over the app spec's `[release]` table into
//! the waves and the policy, and a host's last report into "healthy" for `min_healthy`.

use std::time::Duration;

use drover_model::waves::{self, OnFailure, Reach, ReleaseDefaults};
use serde::{Deserialize, Serialize};

use super::engine::{HostPhase, Policy, Release};
use crate::store::HostRecord;

/// One line of a release's history: an operator's action (`by` set) or a milestone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub at_unix_ms: i64,
    /// The operator (from their certificate); empty for the controller itself.
    pub by: String,
    pub what: String,
}

/// A release as stored: the engine's part is changed only through `engine::step`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetRelease {
    pub release: Release,
    pub app: String,
    pub requested_by: String,
    pub created_unix_ms: i64,
    /// 0 while it runs.
    pub finished_unix_ms: i64,
    pub skip_backup: bool,
    /// The waves as asked for (`1,25%,100%`) and the canary, for display.
    pub waves_text: String,
    pub canary: String,
    pub history: Vec<Entry>,
}

impl FleetRelease {
    pub fn id(&self) -> &str {
        &self.release.id
    }

    pub fn note(&mut self, at_unix_ms: i64, by: &str, what: impl Into<String>) {
        self.history.push(Entry {
            at_unix_ms,
            by: by.to_string(),
            what: what.into(),
        });
    }

    /// The job ids this release has sent or will send to `host` (deploy, then rollback).
    pub fn job_of(&self, host: &str) -> Option<&str> {
        let h = self.release.hosts.iter().find(|h| h.host == host)?;
        match &h.phase {
            HostPhase::Deploying { job_id, .. } | HostPhase::Reverting { job_id } => Some(job_id),
            _ => None,
        }
    }
}

/// What an operator may set for one release; each unset one comes from the app spec's
/// `[release]` table (its defaults when the spec has none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    pub waves: Option<String>,
    pub canary: Option<String>,
    pub max_parallel: Option<u32>,
    pub min_healthy: Option<Duration>,
    pub progress_deadline: Option<Duration>,
    pub host_timeout: Option<Duration>,
    pub on_failure: Option<OnFailure>,
    pub max_failures: Option<String>,
    pub skip_offline: bool,
}

/// The flag that sets each `[release]` key, for error messages.
fn flag_of(key: &str) -> String {
    format!("--{}", key.trim_start_matches("release.").replace('_', "-"))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The options over the spec's defaults: the waves as asked for and the policy, checked with
/// the same bounds as the `[release]` table. The error names the flag and the table key.
pub fn resolve(
    defaults: &ReleaseDefaults,
    options: &Options,
) -> Result<(String, Vec<Reach>, Policy), String> {
    let mut merged = defaults.clone();
    if let Some(v) = &options.waves {
        merged.waves = v.clone();
    }
    if let Some(v) = options.max_parallel {
        merged.max_parallel = v;
    }
    if let Some(v) = options.min_healthy {
        merged.min_healthy = v;
    }
    if let Some(v) = options.progress_deadline {
        merged.progress_deadline = v;
    }
    if let Some(v) = options.host_timeout {
        merged.host_timeout = v;
    }
    if let Some(v) = options.on_failure {
        merged.on_failure = v;
    }
    if let Some(v) = &options.max_failures {
        merged.max_failures = v.clone();
    }
    merged.skip_offline |= options.skip_offline;
    if let Some((key, why)) = merged.problem() {
        return Err(format!(
            "{} (or {key} in the app spec): {why}",
            flag_of(key)
        ));
    }
    let reach = waves::parse_waves(&merged.waves).map_err(|e| e.to_string())?;
    let budget = waves::parse_budget(&merged.max_failures).map_err(|e| e.to_string())?;
    let policy = Policy {
        max_parallel: merged.max_parallel,
        min_healthy_ms: ms(merged.min_healthy),
        progress_deadline_ms: ms(merged.progress_deadline),
        host_timeout_ms: ms(merged.host_timeout),
        on_failure: merged.on_failure,
        max_failures: budget,
        skip_offline: merged.skip_offline,
    };
    Ok((merged.waves, reach, policy))
}

/// Whether a deployed host counts as healthy for `min_healthy`: its agent is connected, its
/// last health report is not `unhealthy`, and the app is running there if the report names it.
/// A report collected before `since_ms` (the deploy's end) is not about the new release: only
/// the session counts until the next one.
pub fn healthy(host: &HostRecord, session_open: bool, app: &str, since_ms: i64) -> bool {
    if !session_open {
        return false;
    }
    let Some(report) = host
        .health
        .as_ref()
        .filter(|r| r.collected_unix_ms >= since_ms)
    else {
        return true;
    };
    report.status != "unhealthy"
        && report
            .apps
            .iter()
            .filter(|a| a.app == app)
            .all(|a| a.running)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AppStatusRecord, HealthSnapshot};
    use drover_model::waves::Budget;

    #[test]
    fn options_override_the_spec_and_are_bounded() {
        let spec = ReleaseDefaults {
            waves: "1,50%".into(),
            max_parallel: 2,
            ..ReleaseDefaults::default()
        };
        let (text, reach, policy) = resolve(&spec, &Options::default()).unwrap();
        assert_eq!(text, "1,50%");
        assert_eq!(
            reach,
            [Reach::Hosts(1), Reach::Percent(50), Reach::Percent(100)]
        );
        assert_eq!(policy.max_parallel, 2);
        assert_eq!(policy.min_healthy_ms, 10_000);
        assert_eq!(policy.on_failure, OnFailure::Revert);
        assert_eq!(policy.max_failures, Budget::Hosts(0));

        let options = Options {
            waves: Some("25%".into()),
            min_healthy: Some(Duration::from_secs(3)),
            on_failure: Some(OnFailure::Halt),
            max_failures: Some("10%".into()),
            skip_offline: true,
            ..Options::default()
        };
        let (_, reach, policy) = resolve(&spec, &options).unwrap();
        assert_eq!(reach, [Reach::Percent(25), Reach::Percent(100)]);
        assert_eq!(policy.min_healthy_ms, 3_000);
        assert_eq!(policy.on_failure, OnFailure::Halt);
        assert_eq!(policy.max_failures, Budget::Percent(10));
        assert!(policy.skip_offline);

        let too_long = Options {
            progress_deadline: Some(Duration::from_secs(25 * 3600)),
            ..Options::default()
        };
        let err = resolve(&spec, &too_long).unwrap_err();
        assert!(
            err.starts_with("--progress-deadline (or release.progress_deadline in the app spec): "),
            "{err}"
        );
        let bad_waves = Options {
            waves: Some("50%,10%".into()),
            ..Options::default()
        };
        assert!(
            resolve(&spec, &bad_waves)
                .unwrap_err()
                .starts_with("--waves ")
        );
        let none = Options {
            max_parallel: Some(0),
            ..Options::default()
        };
        assert!(
            resolve(&spec, &none)
                .unwrap_err()
                .starts_with("--max-parallel ")
        );
    }

    #[test]
    fn health_needs_the_session_a_report_not_unhealthy_and_the_app_running() {
        let mut host = HostRecord {
            name: "web-1".into(),
            ..HostRecord::default()
        };
        assert!(
            healthy(&host, true, "api", 0),
            "no report yet: the session is enough"
        );
        assert!(!healthy(&host, false, "api", 0));
        host.health = Some(HealthSnapshot {
            status: "degraded".into(),
            apps: vec![AppStatusRecord {
                app: "api".into(),
                running: true,
                ..AppStatusRecord::default()
            }],
            ..HealthSnapshot::default()
        });
        assert!(healthy(&host, true, "api", 0));
        host.health.as_mut().unwrap().apps[0].running = false;
        assert!(!healthy(&host, true, "api", 0));
        assert!(healthy(&host, true, "other", 0));
        host.health.as_mut().unwrap().status = "unhealthy".into();
        assert!(!healthy(&host, true, "other", 0));
        host.health.as_mut().unwrap().collected_unix_ms = 5_000;
        assert!(!healthy(&host, true, "other", 5_000));
        assert!(
            healthy(&host, true, "other", 5_001),
            "a report from before the deploy ended is not about it"
        );
    }
}
