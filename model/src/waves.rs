//! A release's plan, pure: which hosts go in which wave, in order. Waves are written as the
//! operator types them (`1,25%,100%`): each entry is how many hosts have been reached once that
//! wave is done, as a count or a share of the fleet, so waves only grow and the last one takes
//! every host. A canary host goes first, alone. Also the failure budget (`3` or `10%`), what a
//! release does past it (`OnFailure`), and the `[release]` table of an app spec that gives a
//! release's defaults (`ReleaseDefaults`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{check_count, check_duration, duration_str};

/// At most this many waves: a plan longer than this is a typing mistake, not a rollout.
pub const MAX_WAVES: usize = 20;

/// One entry of `--waves`: hosts reached once the wave is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reach {
    /// This many hosts (at least 1).
    Hosts(u32),
    /// This share of the fleet, 1 to 100, rounded up (so `1%` of 3 hosts is 1 host).
    Percent(u32),
}

impl Reach {
    /// Hosts reached out of `fleet`, at least 1 and at most `fleet`.
    fn of(self, fleet: usize) -> usize {
        let n = match self {
            Reach::Hosts(n) => n as usize,
            Reach::Percent(p) => (fleet * p as usize).div_ceil(100),
        };
        n.clamp(1, fleet.max(1))
    }
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reach::Hosts(n) => write!(f, "{n}"),
            Reach::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How many hosts may fail before the release halts: it halts when failures exceed this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    Hosts(u32),
    /// A share of the fleet, 0 to 100, rounded down (so `10%` of 5 hosts is 0).
    Percent(u32),
}

impl Budget {
    /// Failures allowed out of `fleet` hosts.
    pub fn of(self, fleet: usize) -> usize {
        match self {
            Budget::Hosts(n) => n as usize,
            Budget::Percent(p) => fleet * p as usize / 100,
        }
    }
}

impl Default for Budget {
    /// The first failure halts.
    fn default() -> Budget {
        Budget::Hosts(0)
    }
}

/// What happens when failures exceed the budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop starting hosts; leave the updated ones as they are.
    Halt,
    /// Stop, and roll every updated host back to the release it ran before, in parallel.
    #[default]
    Revert,
}

/// At most this long for `min_healthy`, `progress_deadline` and `host_timeout`.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// At most this many hosts deploy at once within a wave.
pub const MAX_PARALLEL: u64 = 1000;

/// The `[release]` table of an app spec: how a fleet release of the app proceeds unless the
/// operator says otherwise on the command line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReleaseDefaults {
    /// As `--waves`: `1,25%,100%`.
    pub waves: String,
    /// Hosts deploying at once within a wave.
    pub max_parallel: u32,
    /// How long a deployed host has to stay healthy before it counts as passed.
    #[serde(with = "duration_str")]
    pub min_healthy: Duration,
    /// A wave not passed within this fails.
    #[serde(with = "duration_str")]
    pub progress_deadline: Duration,
    /// How long a host that is down when its wave comes is waited for.
    #[serde(with = "duration_str")]
    pub host_timeout: Duration,
    pub on_failure: OnFailure,
    /// As `--max-failures`: `0`, `2` or `10%`.
    pub max_failures: String,
    /// An offline host is skipped instead of counted as a failure.
    pub skip_offline: bool,
    /// Each updated host keeps its previous web container running, not routed, until the
    /// release ends, so a revert switches traffic back at once instead of starting it again.
    pub keep_previous: bool,
}

impl Default for ReleaseDefaults {
    fn default() -> ReleaseDefaults {
        ReleaseDefaults {
            waves: "100%".into(),
            max_parallel: 1,
            min_healthy: Duration::from_secs(10),
            progress_deadline: Duration::from_secs(600),
            host_timeout: Duration::from_secs(300),
            on_failure: OnFailure::Revert,
            max_failures: "0".into(),
            skip_offline: false,
            keep_previous: true,
        }
    }
}

impl ReleaseDefaults {
    /// The first key of the `[release]` table that is wrong (`release.KEY`) and why, or None.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if let Err(e) = parse_waves(&self.waves) {
            return Some(("release.waves", e.to_string()));
        }
        if let Err(e) = parse_budget(&self.max_failures) {
            return Some(("release.max_failures", e.to_string()));
        }
        if let Err(e) = check_count(self.max_parallel.into(), 1, MAX_PARALLEL) {
            return Some(("release.max_parallel", e.to_string()));
        }
        let waits = [
            ("release.min_healthy", self.min_healthy, Duration::ZERO),
            (
                "release.progress_deadline",
                self.progress_deadline,
                Duration::from_secs(1),
            ),
            ("release.host_timeout", self.host_timeout, Duration::ZERO),
        ];
        for (key, value, min) in waits {
            if let Err(e) = check_duration(value, min, MAX_WAIT) {
                return Some((key, e.to_string()));
            }
        }
        None
    }
}

/// Why a plan, a wave list or a budget was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("--waves {text:?}: {why} (for example 1,25%,100%)")]
    Waves { text: String, why: String },
    #[error("--max-failures {text:?}: {why} (a count such as 2, or a share such as 10%)")]
    Budget { text: String, why: String },
    #[error("no hosts to release to: name them with --host NAME or --label k=v")]
    NoHosts,
    #[error("canary host {0:?} is not one of the release's hosts")]
    CanaryNotTargeted(String),
}

/// Reads `--waves`: comma-separated counts or shares, each reaching more hosts than the one
/// before; `100%` is added at the end when the list stops short of it.
pub fn parse_waves(text: &str) -> Result<Vec<Reach>, PlanError> {
    let bad = |why: String| PlanError::Waves {
        text: text.to_string(),
        why,
    };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        let reach = match part.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(p @ 1..=100) => Reach::Percent(p),
                _ => return Err(bad(format!("{part:?} is not a share from 1% to 100%"))),
            },
            None => match part.parse::<u32>() {
                Ok(n @ 1..=100_000) => Reach::Hosts(n),
                _ => return Err(bad(format!("{part:?} is not a host count from 1"))),
            },
        };
        out.push(reach);
    }
    if out.last() != Some(&Reach::Percent(100)) {
        out.push(Reach::Percent(100));
    }
    if out.len() > MAX_WAVES {
        return Err(bad(format!("{} waves; at most {MAX_WAVES}", out.len())));
    }
    // Shares must grow, and so must counts; a count and a share are compared per fleet.
    for pair in out.windows(2) {
        let same_kind_not_growing = match pair {
            [Reach::Hosts(a), Reach::Hosts(b)] | [Reach::Percent(a), Reach::Percent(b)] => a >= b,
            _ => false,
        };
        if same_kind_not_growing {
            return Err(bad(format!(
                "{} does not reach more hosts than {} before it",
                pair[1], pair[0]
            )));
        }
    }
    Ok(out)
}

/// Reads `--max-failures`: a count, or a share of the fleet.
pub fn parse_budget(text: &str) -> Result<Budget, PlanError> {
    let bad = |why: &str| PlanError::Budget {
        text: text.to_string(),
        why: why.to_string(),
    };
    let text = text.trim();
    match text.strip_suffix('%') {
        Some(p) => match p.parse::<u32>() {
            Ok(p @ 0..=100) => Ok(Budget::Percent(p)),
            _ => Err(bad("not a share from 0% to 100%")),
        },
        None => match text.parse::<u32>() {
            Ok(n @ 0..=100_000) => Ok(Budget::Hosts(n)),
            _ => Err(bad("not a count from 0")),
        },
    }
}

/// The waves of a release to `hosts`: hosts by name, the canary (if any) first and alone, then
/// as many per wave as `waves` reaches. Waves that would add no host are dropped, so every
/// wave has at least one host.
pub fn plan(
    hosts: &[String],
    waves: &[Reach],
    canary: Option<&str>,
) -> Result<Vec<Vec<String>>, PlanError> {
    if hosts.is_empty() {
        return Err(PlanError::NoHosts);
    }
    let mut order: Vec<String> = hosts.to_vec();
    order.sort();
    order.dedup();
    let mut out: Vec<Vec<String>> = Vec::new();
    if let Some(c) = canary {
        let at = order
            .iter()
            .position(|h| h == c)
            .ok_or_else(|| PlanError::CanaryNotTargeted(c.to_string()))?;
        out.push(vec![order.remove(at)]);
    }
    let fleet = order.len() + out.len();
    let mut reached = out.len();
    let mut rest = order.into_iter();
    for reach in waves.iter().chain(std::iter::once(&Reach::Percent(100))) {
        let upto = reach.of(fleet);
        if upto <= reached {
            continue;
        }
        let wave: Vec<String> = rest.by_ref().take(upto - reached).collect();
        reached += wave.len();
        if !wave.is_empty() {
            out.push(wave);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("web-{i:03}")).collect()
    }

    fn sizes(plan: &[Vec<String>]) -> Vec<usize> {
        plan.iter().map(Vec::len).collect()
    }

    #[test]
    fn waves_reach_a_growing_part_of_the_fleet_and_end_with_all_of_it() {
        let w = parse_waves("1,25%,100%").unwrap();
        // (fleet size, hosts per wave)
        let cases: &[(usize, &[usize])] = &[
            (1, &[1]),
            (2, &[1, 1]),
            (4, &[1, 3]),
            (8, &[1, 1, 6]),
            (10, &[1, 2, 7]),
            (100, &[1, 24, 75]),
        ];
        for (fleet, want) in cases {
            let p = plan(&hosts(*fleet), &w, None).unwrap();
            assert_eq!(sizes(&p), *want, "{fleet} hosts");
            assert_eq!(p.concat(), hosts(*fleet), "every host once, in order");
        }
        // A list that stops short gets 100% added; one wave is a plain deploy of all.
        assert_eq!(
            parse_waves("1").unwrap(),
            [Reach::Hosts(1), Reach::Percent(100)]
        );
        assert_eq!(
            sizes(&plan(&hosts(5), &parse_waves("100%").unwrap(), None).unwrap()),
            [5]
        );
        // Counts beyond the fleet reach all of it.
        assert_eq!(
            sizes(&plan(&hosts(3), &parse_waves("2,50").unwrap(), None).unwrap()),
            [2, 1]
        );
    }

    #[test]
    fn a_canary_goes_first_and_alone() {
        let w = parse_waves("50%,100%").unwrap();
        let p = plan(&hosts(4), &w, Some("web-003")).unwrap();
        assert_eq!(
            p,
            vec![
                vec!["web-003".to_string()],
                vec!["web-001".to_string()],
                vec!["web-002".to_string(), "web-004".to_string()],
            ]
        );
        assert_eq!(
            plan(&hosts(2), &w, Some("db-1")).unwrap_err(),
            PlanError::CanaryNotTargeted("db-1".into())
        );
        assert_eq!(plan(&[], &w, None).unwrap_err(), PlanError::NoHosts);
    }

    #[test]
    fn bad_wave_lists_and_budgets_are_refused_naming_the_entry() {
        for (text, says) in [
            ("0", "\"0\" is not a host count from 1"),
            ("1,0%", "\"0%\" is not a share from 1% to 100%"),
            (
                "50%,25%",
                "25% does not reach more hosts than 50% before it",
            ),
            ("2,2", "2 does not reach more hosts than 2 before it"),
            ("1,,100%", "\"\" is not a host count from 1"),
            ("x", "\"x\" is not a host count from 1"),
            ("101%", "\"101%\" is not a share from 1% to 100%"),
        ] {
            let err = parse_waves(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains("for example 1,25%,100%"), "{err}");
        }
        let long = (1..=25)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(
            parse_waves(&long)
                .unwrap_err()
                .to_string()
                .contains("at most 20")
        );

        assert_eq!(parse_budget("2").unwrap(), Budget::Hosts(2));
        assert_eq!(parse_budget("10%").unwrap(), Budget::Percent(10));
        assert_eq!(Budget::Percent(10).of(25), 2);
        assert_eq!(Budget::Percent(10).of(5), 0);
        assert_eq!(Budget::default().of(10), 0);
        for text in ["-1", "x", "150%", ""] {
            assert!(parse_budget(text).is_err(), "{text}");
        }
    }
}
