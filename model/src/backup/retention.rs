//! The retention rule, pure: which backups a policy keeps and why (restic/borg style: the last
//! N, plus the newest backup of each of the last N days, ISO weeks and months, in UTC).
//!
//! Two guarantees hold whatever the policy: the newest verified backup is always kept, and a
//! policy of all zeros ("no policy") keeps everything. A rule that deletes all backups cannot
//! be written.
//!
//! [`plan`] applies a target's two policies (local and remote copies) to one host's catalog:
//! the agent's prune runs it on its own catalog, the controller's `drover backup prune
//! --dry-run` on the catalog the host last reported.

use time::OffsetDateTime;

use crate::backup::catalog::{Backup, PruneLine};

/// How many backups of each kind to keep. All zeros (the default) keeps everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(default)]
pub struct Policy {
    /// The newest N backups.
    pub keep_last: u32,
    /// The newest backup of each of the last N days (UTC) that have one.
    pub daily: u32,
    /// The newest backup of each of the last N ISO weeks (UTC) that have one.
    pub weekly: u32,
    /// The newest backup of each of the last N calendar months (UTC) that have one.
    pub monthly: u32,
}

impl Policy {
    /// No rule set: everything is kept.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// A backup the rule looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub created_unix: i64,
    /// Whether a verification of this backup succeeded.
    pub verified: bool,
}

/// What the rule says about one backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    /// Every rule that keeps it: "last", "daily", "weekly", "monthly", "newest verified", or
    /// "no policy". Empty when it goes.
    pub reasons: Vec<&'static str>,
}

/// Applies `policy` to `candidates`; returns one decision per candidate, newest first
/// (`created_unix` descending; on a tie the greater id counts as newer).
pub fn decide(policy: &Policy, candidates: &[Candidate]) -> Vec<Decision> {
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| {
        b.created_unix
            .cmp(&a.created_unix)
            .then_with(|| b.id.cmp(&a.id))
    });

    let mut daily = Bucket::new(policy.daily);
    let mut weekly = Bucket::new(policy.weekly);
    let mut monthly = Bucket::new(policy.monthly);
    let mut newest_verified_seen = false;

    sorted
        .iter()
        .enumerate()
        .map(|(index, candidate)| {
            let mut reasons = Vec::new();
            if policy.is_empty() {
                reasons.push("no policy");
            }
            if (index as u64) < u64::from(policy.keep_last) {
                reasons.push("last");
            }
            let date = OffsetDateTime::from_unix_timestamp(candidate.created_unix)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH)
                .date();
            if daily.take((date.year(), u32::from(date.ordinal()))) {
                reasons.push("daily");
            }
            let (iso_year, iso_week, _) = date.to_iso_week_date();
            if weekly.take((iso_year, u32::from(iso_week))) {
                reasons.push("weekly");
            }
            if monthly.take((date.year(), u32::from(u8::from(date.month())))) {
                reasons.push("monthly");
            }
            if candidate.verified && !newest_verified_seen {
                newest_verified_seen = true;
                reasons.push("newest verified");
            }
            Decision {
                id: candidate.id.clone(),
                keep: !reasons.is_empty(),
                reasons,
            }
        })
        .collect()
}

/// What `local` (for local copies) and `remote` (for S3 copies) say about each copy of
/// `backups` (one host's catalog of one target): the local copies first, then the remote
/// ones, each newest first. A backup is judged by when it was started; a verified one counts
/// for "newest verified".
pub fn plan(local: &Policy, remote: &Policy, backups: &[Backup]) -> Vec<PruneLine> {
    let candidates = |keep: fn(&Backup) -> bool| -> Vec<Candidate> {
        backups
            .iter()
            .filter(|b| keep(b))
            .map(|b| Candidate {
                id: b.id.clone(),
                created_unix: b.started_unix_ms / 1000,
                verified: b.verified_unix_ms > 0,
            })
            .collect()
    };
    let lines = |copy: &str, decisions: Vec<Decision>| -> Vec<PruneLine> {
        decisions
            .into_iter()
            .map(|d| PruneLine {
                id: d.id,
                copy: copy.into(),
                keep: d.keep,
                reasons: d.reasons.into_iter().map(String::from).collect(),
            })
            .collect()
    };
    let mut out = lines("local", decide(local, &candidates(Backup::is_local)));
    out.extend(lines(
        "remote",
        decide(remote, &candidates(Backup::is_remote)),
    ));
    out
}

/// One of the daily/weekly/monthly rules: walking newest first, the first backup of each new
/// period is kept until `left` periods have been kept.
struct Bucket {
    left: u32,
    last: Option<(i32, u32)>,
}

impl Bucket {
    fn new(count: u32) -> Bucket {
        Bucket {
            left: count,
            last: None,
        }
    }

    /// Whether the backup in `period` is kept by this rule.
    fn take(&mut self, period: (i32, u32)) -> bool {
        if self.left == 0 || self.last == Some(period) {
            return false;
        }
        self.last = Some(period);
        self.left -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn at(dt: time::PrimitiveDateTime) -> i64 {
        dt.assume_utc().unix_timestamp()
    }

    fn c(id: &str, created: time::PrimitiveDateTime) -> Candidate {
        Candidate {
            id: id.to_string(),
            created_unix: at(created),
            verified: false,
        }
    }

    fn verified(id: &str, created: time::PrimitiveDateTime) -> Candidate {
        Candidate {
            verified: true,
            ..c(id, created)
        }
    }

    fn policy(keep_last: u32, daily: u32, weekly: u32, monthly: u32) -> Policy {
        Policy {
            keep_last,
            daily,
            weekly,
            monthly,
        }
    }

    /// The kept ids with their reasons, newest first.
    fn kept(decisions: &[Decision]) -> Vec<(String, Vec<&'static str>)> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.id.clone(), d.reasons.clone()))
            .collect()
    }

    struct Case {
        name: &'static str,
        policy: Policy,
        candidates: Vec<Candidate>,
        /// (id, reasons) of every kept backup, newest first.
        expect: Vec<(&'static str, Vec<&'static str>)>,
    }

    #[test]
    fn table() {
        let cases = vec![
            Case {
                name: "all zeros keeps everything",
                policy: Policy::default(),
                candidates: vec![
                    c("a", datetime!(2024-01-01 00:00)),
                    c("b", datetime!(2024-01-02 00:00)),
                ],
                expect: vec![("b", vec!["no policy"]), ("a", vec!["no policy"])],
            },
            Case {
                name: "no candidates",
                policy: policy(3, 1, 1, 1),
                candidates: vec![],
                expect: vec![],
            },
            Case {
                name: "keep_last only, input order does not matter",
                policy: policy(2, 0, 0, 0),
                candidates: vec![
                    c("b", datetime!(2024-03-02 00:00)),
                    c("d", datetime!(2024-03-04 00:00)),
                    c("a", datetime!(2024-03-01 00:00)),
                    c("c", datetime!(2024-03-03 00:00)),
                ],
                expect: vec![("d", vec!["last"]), ("c", vec!["last"])],
            },
            Case {
                name: "daily keeps the newest of each day",
                policy: policy(0, 2, 0, 0),
                candidates: vec![
                    c("d1-early", datetime!(2024-03-01 01:00)),
                    c("d1-late", datetime!(2024-03-01 23:59:59)),
                    c("d2-early", datetime!(2024-03-02 00:00)),
                    c("d2-late", datetime!(2024-03-02 12:00)),
                    c("d0", datetime!(2024-02-29 12:00)),
                ],
                expect: vec![("d2-late", vec!["daily"]), ("d1-late", vec!["daily"])],
            },
            Case {
                name: "days without backups do not count",
                policy: policy(0, 3, 0, 0),
                candidates: vec![
                    c("jan1", datetime!(2024-01-01 10:00)),
                    c("jan5", datetime!(2024-01-05 10:00)),
                    c("jan9", datetime!(2024-01-09 10:00)),
                    c("dec20", datetime!(2023-12-20 10:00)),
                ],
                expect: vec![
                    ("jan9", vec!["daily"]),
                    ("jan5", vec!["daily"]),
                    ("jan1", vec!["daily"]),
                ],
            },
            Case {
                name: "monthly across month ends (leap February, 31-day months)",
                policy: policy(0, 0, 0, 3),
                candidates: vec![
                    c("jan31", datetime!(2024-01-31 23:59:59)),
                    c("feb01", datetime!(2024-02-01 00:00)),
                    c("feb29", datetime!(2024-02-29 23:00)),
                    c("mar01", datetime!(2024-03-01 00:00:01)),
                    c("mar31", datetime!(2024-03-31 23:59:59)),
                ],
                expect: vec![
                    ("mar31", vec!["monthly"]),
                    ("feb29", vec!["monthly"]),
                    ("jan31", vec!["monthly"]),
                ],
            },
            Case {
                // 2020-12-31 (Thursday) is in ISO week 2020-W53 and 2021-01-03 (Sunday) too;
                // 2021-01-04 (Monday) starts 2021-W01. 2020-12-27 (Sunday) is 2020-W52.
                name: "ISO weeks across the new year",
                policy: policy(0, 0, 2, 0),
                candidates: vec![
                    c("dec27", datetime!(2020-12-27 12:00)),
                    c("dec31", datetime!(2020-12-31 12:00)),
                    c("jan03", datetime!(2021-01-03 12:00)),
                    c("jan04", datetime!(2021-01-04 12:00)),
                ],
                expect: vec![("jan04", vec!["weekly"]), ("jan03", vec!["weekly"])],
            },
            Case {
                name: "the year changes but the ISO week does not",
                policy: policy(0, 0, 1, 0),
                candidates: vec![
                    c("dec31", datetime!(2020-12-31 12:00)),
                    c("jan02", datetime!(2021-01-02 12:00)),
                ],
                expect: vec![("jan02", vec!["weekly"])],
            },
            Case {
                name: "ties on time are ordered by id, the greater id newer",
                policy: policy(1, 1, 0, 0),
                candidates: vec![
                    c("x-1", datetime!(2024-05-01 00:00)),
                    c("x-2", datetime!(2024-05-01 00:00)),
                ],
                expect: vec![("x-2", vec!["last", "daily"])],
            },
            Case {
                name: "the newest verified is kept even when older than every rule keeps",
                policy: policy(1, 0, 0, 0),
                candidates: vec![
                    verified("old-ok", datetime!(2024-01-01 00:00)),
                    verified("older-ok", datetime!(2023-12-01 00:00)),
                    c("new", datetime!(2024-02-01 00:00)),
                    c("newer", datetime!(2024-02-02 00:00)),
                ],
                expect: vec![("newer", vec!["last"]), ("old-ok", vec!["newest verified"])],
            },
            Case {
                name: "unverified newest with a verified one just behind",
                policy: policy(1, 0, 0, 0),
                candidates: vec![
                    c("new", datetime!(2024-02-02 00:00)),
                    verified("ok", datetime!(2024-02-01 00:00)),
                ],
                expect: vec![("new", vec!["last"]), ("ok", vec!["newest verified"])],
            },
            Case {
                name: "rules combine and reasons accumulate",
                policy: policy(1, 2, 1, 2),
                candidates: vec![
                    verified("may31", datetime!(2024-05-31 20:00)),
                    c("jun01", datetime!(2024-06-01 08:00)),
                    c("jun01b", datetime!(2024-06-01 09:00)),
                    c("apr10", datetime!(2024-04-10 08:00)),
                ],
                expect: vec![
                    ("jun01b", vec!["last", "daily", "weekly", "monthly"]),
                    ("may31", vec!["daily", "monthly", "newest verified"]),
                ],
            },
        ];
        for case in cases {
            let decisions = decide(&case.policy, &case.candidates);
            assert_eq!(
                decisions.len(),
                case.candidates.len(),
                "{}: one decision per candidate",
                case.name
            );
            let expect: Vec<(String, Vec<&'static str>)> = case
                .expect
                .into_iter()
                .map(|(id, r)| (id.to_string(), r))
                .collect();
            assert_eq!(kept(&decisions), expect, "{}", case.name);
            for d in &decisions {
                assert_eq!(d.keep, !d.reasons.is_empty(), "{}: {}", case.name, d.id);
            }
        }
    }

    #[test]
    fn decisions_are_newest_first() {
        let decisions = decide(
            &policy(1, 0, 0, 0),
            &[
                c("a", datetime!(2024-01-01 00:00)),
                c("c", datetime!(2024-01-03 00:00)),
                c("b", datetime!(2024-01-02 00:00)),
            ],
        );
        let ids: Vec<&str> = decisions.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["c", "b", "a"]);
        assert!(!decisions[1].keep && !decisions[2].keep);
    }

    #[test]
    fn a_plan_judges_local_and_remote_copies_by_their_own_policy() {
        let backup = |id: &str, day: i64, local: bool, remote: bool, verified: bool| {
            let mut b: Backup = serde_json::from_value(serde_json::json!({
                "id": id, "target": "t", "host": "h", "kind": "path", "trigger": "manual",
                "job_id": "", "requested_by": "", "started_unix_ms": day * 86_400_000,
                "finished_unix_ms": day * 86_400_000 + 1000, "parts": [],
                "compression": "zstd-3", "recipients": [],
            }))
            .unwrap();
            if local {
                b.local_dir = format!("/b/{id}");
            }
            if remote {
                b.remote = format!("s3://b/t/{id}/");
            }
            if verified {
                b.verified_unix_ms = 1;
            }
            b
        };
        let backups = [
            backup("d1", 1, true, true, true),
            backup("d2", 2, true, false, false),
            backup("d3", 3, true, true, false),
        ];
        let lines = plan(&policy(1, 0, 0, 0), &policy(2, 0, 0, 0), &backups);
        let seen: Vec<(&str, &str, bool, Vec<&str>)> = lines
            .iter()
            .map(|l| {
                (
                    l.copy.as_str(),
                    l.id.as_str(),
                    l.keep,
                    l.reasons.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("local", "d3", true, vec!["last"]),
                ("local", "d2", false, vec![]),
                ("local", "d1", true, vec!["newest verified"]),
                ("remote", "d3", true, vec!["last"]),
                ("remote", "d1", true, vec!["last", "newest verified"]),
            ]
        );
    }

    #[test]
    fn policy_from_toml_defaults_to_keep_everything() {
        let empty: Policy = toml::from_str("").unwrap();
        assert!(empty.is_empty());
        let some: Policy = toml::from_str("daily = 7\nmonthly = 12").unwrap();
        assert_eq!(some, policy(0, 7, 0, 12));
    }
}
