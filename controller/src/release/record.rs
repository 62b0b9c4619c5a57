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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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

/// An option (or the app spec's `[release]` key under it) out of its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// Names the flag and the key: `--max-parallel (or release.max_parallel …): why`.
    #[error("{flag} (or {key} in the app spec): {why}")]
    Bound {
        flag: String,
        key: &'static str,
        why: String,
    },
    /// The waves or the failure budget do not parse (the message names the flag).
    #[error(transparent)]
    Plan(#[from] waves::PlanError),
}

/// The options over the spec's defaults: the waves as asked for and the policy, checked with
/// the same bounds as the `[release]` table. The error names the flag and the table key.
pub fn resolve(
    defaults: &ReleaseDefaults,
    options: &Options,
) -> Result<(String, Vec<Reach>, Policy), OptionError> {
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
        return Err(OptionError::Bound {
            flag: flag_of(key),
            key,
            why,
        });
    }
    let reach = waves::parse_waves(&merged.waves)?;
    let budget = waves::parse_budget(&merged.max_failures)?;
    let policy = Policy {
        max_parallel: merged.max_parallel,
        min_healthy_ms: ms(merged.min_healthy),
        progress_deadline_ms: ms(merged.progress_deadline),
        host_timeout_ms: ms(merged.host_timeout),
        on_failure: merged.on_failure,
        max_failures: budget,
        skip_offline: merged.skip_offline,
        keep_previous: merged.keep_previous,
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

/// An app on a host that does not run the version its newest release there put on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    pub app: String,
    pub release_id: String,
    pub desired: String,
    pub live: String,
}

/// Per app, the newest finished release that included `host`: if it succeeded and the host
/// runs another version (`live(app)`, empty when none), the host is behind. `releases` oldest
/// first. A release still running, halted or reverted sets no desired version.
pub fn behind(releases: &[FleetRelease], host: &str, live: impl Fn(&str) -> String) -> Vec<Behind> {
    use super::engine::Phase;
    let mut newest: std::collections::BTreeMap<&str, &FleetRelease> = Default::default();
    for r in releases {
        if r.release.phase.is_finished() && r.release.hosts.iter().any(|h| h.host == host) {
            newest.insert(&r.app, r);
        }
    }
    newest
        .into_values()
        .filter(|r| r.release.phase == Phase::Succeeded)
        .filter_map(|r| {
            let now = live(&r.app);
            (now != r.release.version).then(|| Behind {
                app: r.app.clone(),
                release_id: r.id().to_string(),
                desired: r.release.version.clone(),
                live: now,
            })
        })
        .collect()
}

/// What to tell an operator who rolls `app` back on hosts running `live` (host, version):
/// the newest release of the app whose migration ran, if a host runs its version.
pub fn migration_warning(
    releases: &[FleetRelease],
    app: &str,
    live: &[(String, String)],
) -> Option<String> {
    let r = releases
        .iter()
        .rev()
        .find(|r| r.app == app && r.release.migration_ran)?;
    let (host, _) = live.iter().find(|(_, v)| *v == r.release.version)?;
    let migrated = r
        .release
        .hosts
        .iter()
        .find(|h| h.migrates)
        .map_or("", |h| h.host.as_str());
    Some(format!(
        "release {} ran the spec's migration for {} (on {migrated}); rolling {host} back does not undo it: Drover runs no down migration, so check that the older version works with the migrated schema",
        r.id(),
        r.release.version
    ))
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
        let err = resolve(&spec, &too_long).unwrap_err().to_string();
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
                .to_string()
                .starts_with("--waves ")
        );
        let none = Options {
            max_parallel: Some(0),
            ..Options::default()
        };
        assert!(
            resolve(&spec, &none)
                .unwrap_err()
                .to_string()
                .starts_with("--max-parallel ")
        );
    }

    fn finished(
        id: &str,
        version: &str,
        phase: super::super::engine::Phase,
        migrated: bool,
    ) -> FleetRelease {
        use super::super::engine::{self, Policy};
        let policy = Policy {
            max_parallel: 1,
            min_healthy_ms: 0,
            progress_deadline_ms: 1,
            host_timeout_ms: 0,
            on_failure: OnFailure::Revert,
            max_failures: Budget::Hosts(0),
            skip_offline: false,
            keep_previous: false,
        };
        let waves = [vec!["a".to_string()], vec!["b".to_string()]];
        let mut release =
            engine::new_release(id, version, &waves, policy, |_| "v1".into(), |_| true, 0);
        release.phase = phase;
        release.migration_ran = migrated;
        FleetRelease {
            release,
            app: "api".into(),
            requested_by: "alice".into(),
            created_unix_ms: 0,
            finished_unix_ms: 1,
            skip_backup: false,
            waves_text: "1,100%".into(),
            canary: String::new(),
            history: Vec::new(),
        }
    }

    #[test]
    fn a_host_is_behind_only_the_newest_succeeded_release_that_reached_it() {
        use super::super::engine::Phase;
        let ok = finished("r1", "v2", Phase::Succeeded, false);
        let on = |v: &'static str| move |_: &str| v.to_string();
        assert!(behind(std::slice::from_ref(&ok), "a", on("v2")).is_empty());
        assert_eq!(
            behind(std::slice::from_ref(&ok), "b", on("v1")),
            [Behind {
                app: "api".into(),
                release_id: "r1".into(),
                desired: "v2".into(),
                live: "v1".into(),
            }]
        );
        assert!(
            behind(std::slice::from_ref(&ok), "c", on("v1")).is_empty(),
            "not in it"
        );
        // A newer release that was reverted sets nothing; one still running neither.
        let reverted = finished("r2", "v3", Phase::Reverted { why: "x".into() }, false);
        assert!(behind(&[ok.clone(), reverted], "b", on("v1")).is_empty());
        let running = finished(
            "r3",
            "v3",
            Phase::Running {
                wave: 0,
                deadline_ms: 9,
            },
            false,
        );
        assert_eq!(behind(&[ok, running], "b", on("v1")).len(), 1);
    }

    #[test]
    fn a_rollback_past_a_migrated_release_is_warned() {
        use super::super::engine::Phase;
        let releases = [
            finished("r1", "v2", Phase::Succeeded, true),
            finished("r2", "v3", Phase::Succeeded, false),
        ];
        let live = |v: &str| vec![("b".to_string(), v.to_string())];
        let warning = migration_warning(&releases, "api", &live("v2")).unwrap();
        assert!(
            warning
                .starts_with("release r1 ran the spec's migration for v2 (on a); rolling b back"),
            "{warning}"
        );
        assert_eq!(migration_warning(&releases, "api", &live("v3")), None);
        assert_eq!(migration_warning(&releases, "web", &live("v2")), None);
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
